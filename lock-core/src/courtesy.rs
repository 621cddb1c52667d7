//! The courtesy to other processes (see `Locker::with_courtesy`): which keys a client won after
//! contention, and which it holds or is releasing itself.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::Instant;

use crate::key::Key;

/// The courtesy's longest wait on a store that wakes its waiters on release (see
/// [`Courtesy`]): they ask within a round trip or two of the release, not at their next poll.
pub(crate) const WOKEN_COURTESY: std::time::Duration = std::time::Duration::from_millis(5);

/// A map by key with a fast hash, seeded at random per map as the in-process queue's is
/// (keys may come from requests; these maps also hold few of them: see [`Courtesy::MAX`]).
type KeyMap<V> = std::collections::HashMap<Key, V, foldhash::fast::RandomState>;

/// Keys this client won after finding them held elsewhere, until when the courtesy lasts (one
/// ttl after the win). On a store whose waiters in other processes poll in no order (not
/// [`Capabilities::fair`](crate::Capabilities::fair)), a client that takes a key straight back after releasing it wins
/// far more often than they do (it asks first, while they sleep out their delays), so its
/// next acquisition of a key it had to wait for starts with one delay of its policy, as a
/// waiter refused once would: the key goes to whoever asks first in that time. A win at its
/// first attempt (nobody else asked) ends the courtesy; an acquisition that finds the key
/// held again renews it.
#[derive(Debug, Default)]
pub(crate) struct Courtesy {
    /// Entries held (read without the lock: the uncontended path looks no further).
    len: std::sync::atomic::AtomicUsize,
    until: std::sync::Mutex<KeyMap<Instant>>,
    /// Keys this client holds or is releasing (every key of its guards, until the store let go
    /// or the lease lapsed), with those leases; and how many keys have some (read without the
    /// lock). Each key's leases come with the number of its latest lease's start (from
    /// `starts`), kept a while after its last lease ended: an acquisition during which a lease
    /// of its key started here contended (at least) with a task of this client, and owes no
    /// courtesy.
    held_len: std::sync::atomic::AtomicUsize,
    held: std::sync::Mutex<KeyMap<Marks>>,
    starts: AtomicU64,
}

/// The leases of one key that this client holds or is releasing (see [`Courtesy`]).
#[derive(Debug, Default)]
struct Marks {
    /// Each lease's start number and the cell its validity moves in: a lease past its validity
    /// (expired, or found lost by its watchdog) is no longer held here, even while its guard
    /// lives on (kept past its ttl, or leaked).
    leases: Vec<(u64, tokio::sync::watch::Receiver<crate::lease::Live>)>,
    /// The number of the latest lease start.
    start: u64,
}

impl Courtesy {
    /// At most this many keys are remembered; more clears the oldest half's worth (expired first).
    const MAX: usize = 1024;

    /// Whether this client holds `key` or is releasing it.
    pub(crate) fn held_here(&self, key: &Key) -> bool {
        if self.held_len.load(Ordering::SeqCst) == 0 {
            return false;
        }
        let mut map = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(marks) = map.get_mut(key) else {
            return false;
        };
        // Leases past their validity are forgotten here (those of guards dropped outside a
        // runtime, or leaked, have no other end).
        let now = Instant::now();
        let before = marks.leases.len();
        marks
            .leases
            .retain(|(_, live)| live.borrow().lapses_at() > now);
        if before > 0 && marks.leases.is_empty() {
            self.held_len.fetch_sub(1, Ordering::SeqCst);
        }
        !marks.leases.is_empty()
    }

    /// Whether this client holds or is releasing any of `keys` (what an attempt on them that
    /// found them held may have met).
    pub(crate) fn any_held_here(&self, keys: &[Key]) -> bool {
        keys.iter().any(|key| self.held_here(key))
    }

    /// The number of the latest lease start of this client (a mark for `started_since`).
    pub(crate) fn last_start(&self) -> u64 {
        self.starts.load(Ordering::SeqCst)
    }

    /// Whether a lease of one of `keys` started here after `mark` (a task of this client won
    /// it while the acquisition that took `mark` waited). Unknown (forgotten) counts as no.
    pub(crate) fn started_since(&self, keys: &[Key], mark: u64) -> bool {
        let map = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        keys.iter()
            .any(|key| map.get(key).is_some_and(|marks| marks.start > mark))
    }

    /// A lease of `keys` of this client starts, whose validity moves in `live`; returns its
    /// start number (for `unmark`).
    pub(crate) fn mark_held(
        &self,
        keys: &[Key],
        live: &tokio::sync::watch::Sender<crate::lease::Live>,
    ) -> u64 {
        let mut map = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let start = self.starts.fetch_add(1, Ordering::SeqCst) + 1;
        for key in keys {
            let marks = map.entry(key.clone()).or_default();
            if marks.leases.is_empty() {
                self.held_len.fetch_add(1, Ordering::SeqCst);
            }
            marks.leases.push((start, live.subscribe()));
            marks.start = start;
        }
        start
    }

    /// The lease of `keys` that started as `start` ended (the store let go).
    pub(crate) fn unmark(&self, keys: &[Key], start: u64) {
        let mut map = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut emptied = false;
        for key in keys {
            if let Some(marks) = map.get_mut(key) {
                let before = marks.leases.len();
                marks.leases.retain(|(number, _)| *number != start);
                if before > 0 && marks.leases.is_empty() {
                    self.held_len.fetch_sub(1, Ordering::SeqCst);
                    emptied = true;
                }
            }
        }
        if emptied && map.len() > Self::MAX {
            map.retain(|_, marks| !marks.leases.is_empty());
        }
    }

    /// Whether an acquisition of `key` starting now should first wait one delay.
    pub(crate) fn owed(&self, key: &Key, now: Instant) -> bool {
        if self.len.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let until = self
            .until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        until.get(key).is_some_and(|until| *until > now)
    }

    /// An acquisition of `key` won: after finding the key held (`contended`) the courtesy lasts
    /// until `until`; otherwise it ends.
    pub(crate) fn won(&self, key: &Key, contended: bool, until: Instant) {
        if !contended && self.len.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut map = self
            .until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if contended {
            if map.len() >= Self::MAX {
                let now = Instant::now();
                map.retain(|_, until| *until > now);
                if map.len() >= Self::MAX {
                    // The half whose courtesy ends first goes; the keys won lately stay.
                    let mut ends: Vec<Instant> = map.values().copied().collect();
                    let middle = ends.len() / 2;
                    let (_, middle, _) = ends.select_nth_unstable(middle);
                    let middle = *middle;
                    map.retain(|_, until| *until > middle);
                }
            }
            map.insert(key.clone(), until);
        } else {
            map.remove(key);
        }
        self.len.store(map.len(), Ordering::Relaxed);
    }
}

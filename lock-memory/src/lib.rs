#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use lock_core::{
    Capabilities, Holding, Key, KeyState, Lease, LeaseKind, LockError, Result, Token,
    raw::{Acquired, Answer, Handle, Lock, LockRequest, async_trait},
};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The backend's name in messages and configuration.
pub const NAME: &str = "memory";

/// Configuration of a [`MemoryLock`]: nothing to set today, but a document naming the memory
/// backend is read into it, so that an option meant for another backend is refused by name.
///
/// # Default
/// Empty.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {}

/// How many acquisitions pass between sweeps of expired, never-released entries.
const SWEEP_EVERY: u64 = 4096;

/// How long a released key is held back for the waiter it woke, so that a newcomer cannot
/// barge in ahead of tasks that queued first. A woken waiter normally runs within microseconds;
/// this only bounds the cost of a waiter that vanished.
const HANDOFF_GRACE: Duration = Duration::from_millis(20);

/// The shortest time a place in a key's line, or a waiting writer's claim, lasts after the
/// attempt that renewed it, whatever the attempt's ttl. A waiter renews it every half ttl on
/// tokio's millisecond timer, which fires up to two ticks late, on a thread a busy machine may
/// not run for some milliseconds more: one lasting only a ttl of a few milliseconds would lapse
/// between renewals, and the line would lose its order (readers would pass the writer) with
/// nothing leaked. A waiting future leaked with such a ttl holds the line (keeps readers out)
/// this long.
const PLACE_AT_LEAST: Duration = Duration::from_millis(50);

/// An in-process lock over a sharded map; clones share the same locks.
///
/// Every map access is synchronous: no shard guard is ever held across an `.await`. Waiting
/// mutex acquisitions on one key are served first come, first served (see the crate's README
/// and [`Capabilities::fair`]): each keeps its place in the key's line across its attempts, and a
/// release wakes the first in line alone. Other waiters are served in the order their current
/// wait began: a release wakes the longest waiter and holds the key back for it briefly.
#[derive(Clone, Default)]
pub struct MemoryLock {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// One slot per key that is held or waited for; removed when neither, so the map returns
    /// to empty.
    slots: DashMap<Key, Slot, foldhash::fast::RandomState>,
    /// Fencing tokens come from one counter, so they increase per key without keeping any
    /// per-key state after release.
    /// Also counts acquisitions, to sweep now and then.
    fence: AtomicU64,
}

#[derive(Default)]
struct Slot {
    /// The holder of a mutex.
    holder: Option<Holder>,
    /// The holders of a semaphore or a read-write lock (boxed: a mutex's slot stays small).
    shared: Option<Box<Shared>>,
    /// Present while tasks wait for this key; it outlives holders, so waiters keep their
    /// place in line across hand-offs.
    waiters: Option<Arc<Notify>>,
    /// The waiting mutex acquisitions that name a waiter ([`LockRequest::waiter`]), in the
    /// order they first found the key held: while there is one, only the first may take the
    /// free key (boxed: an uncontended slot stays small).
    line: Option<Box<Line>>,
    /// Until then, only an attempt that followed a wait may take the (free) key.
    reserved_until: Option<Instant>,
    /// Changes whenever the holder changes, so a waiter can tell whether it missed an event.
    /// Its top bit ([`LINED_HOLDER`]) says the holder took the key as a member of the line: at
    /// its release, waiters outside the line (multi-key locks) get the next turn if any wait
    /// (see [`Line::outside_until`]). A bit, not a field: the slot of an uncontended lock stays
    /// as small as it was.
    generation: u64,
}

/// The bit of [`Slot::generation`] that says the holder took the key as a member of the line.
const LINED_HOLDER: u64 = 1 << 63;

struct Holder {
    token: Token,
    expires_at: Instant,
}

/// The line of a mutex key's waiters, first come, first served (see [`Slot::line`]). A waiter
/// keeps its place across its attempts, each of which renews it; the core takes it out when
/// the waiter stops waiting ([`Lock::abandon`]). A place that no attempt renewed for a ttl
/// ([`PLACE_AT_LEAST`] at least; a waiting future leaked without being dropped) lapses, so
/// that nobody waits behind it for longer.
struct Line {
    entries: VecDeque<LineEntry>,
    /// Until then, the free key is kept for the waiters outside the line (multi-key locks, woken
    /// by the key's shared `Notify`), whose turn it is: after a hand-off within the line, a
    /// release while such waiters wait gives them the next turn, so that two mutex clients
    /// handing the key to each other cannot keep a multi-key waiter out for ever. The first in
    /// line is refused meanwhile, and looks again when the turn ends unused. A line begun while
    /// the key was held back for the waiters a release woke begins with their turn.
    outside_until: Option<Instant>,
}

struct LineEntry {
    waiter: Token,
    lapses_at: Instant,
    /// Wakes this waiter alone when its turn comes; a wake-up sent while it is not waiting is
    /// kept for its next wait.
    turn: Arc<Notify>,
}

impl Line {
    /// Forgets lapsed places; whether the first place changed hands.
    fn prune(&mut self, now: Instant) -> bool {
        let head = self.entries.front().map(|entry| Arc::as_ptr(&entry.turn));
        self.entries.retain(|entry| entry.lapses_at > now);
        head.is_some() && head != self.entries.front().map(|entry| Arc::as_ptr(&entry.turn))
    }

    /// Puts `waiter` at the back of the line, or renews its place.
    fn join(&mut self, waiter: &Token, lapses_at: Instant) {
        match self
            .entries
            .iter_mut()
            .find(|entry| entry.waiter == *waiter)
        {
            Some(entry) => entry.lapses_at = entry.lapses_at.max(lapses_at),
            None => self.entries.push_back(LineEntry {
                waiter: waiter.clone(),
                lapses_at,
                turn: Arc::default(),
            }),
        }
    }

    /// Wakes the first waiter: its turn came (the key is free).
    fn wake_first(&self) {
        if let Some(first) = self.entries.front() {
            first.turn.notify_one();
        }
    }
}

/// The holders of a key used as a semaphore or a read-write lock.
struct Shared {
    /// What every holder asked for: a semaphore of some size, or a read-write lock.
    family: Family,
    holders: Vec<SharedHolder>,
    /// A writer that found readers: until then, no new reader gets in. Taken back by the
    /// writer's token when it stops waiting, consumed when a writer takes the lock.
    claim: Option<Holder>,
}

/// What a key is used as, besides a mutex.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Semaphore(std::num::NonZeroU32),
    ReadWrite,
}

impl Family {
    fn of(kind: LeaseKind) -> Self {
        match kind {
            LeaseKind::Permit { permits } => Self::Semaphore(permits),
            _ => Self::ReadWrite,
        }
    }

    fn describe(self) -> String {
        match self {
            Self::Semaphore(permits) => LeaseKind::Permit { permits }.to_string(),
            Self::ReadWrite => "a read-write lock".to_owned(),
        }
    }
}

struct SharedHolder {
    token: Token,
    expires_at: Instant,
    writer: bool,
}

impl Shared {
    /// Forgets holders and a claim whose time has passed.
    fn prune(&mut self, now: Instant) {
        self.holders.retain(|holder| holder.expires_at > now);
        if self
            .claim
            .as_ref()
            .is_some_and(|claim| claim.expires_at <= now)
        {
            self.claim = None;
        }
    }

    /// True while a holder or a claim is live at `now`.
    fn in_use(&self, now: Instant) -> bool {
        self.holders.iter().any(|holder| holder.expires_at > now)
            || self
                .claim
                .as_ref()
                .is_some_and(|claim| claim.expires_at > now)
    }

    /// The earliest moment a live holder or the claim lapses: when a waiter should look again.
    fn next_change(&self, now: Instant) -> Option<Instant> {
        self.holders
            .iter()
            .map(|holder| holder.expires_at)
            .chain(self.claim.as_ref().map(|claim| claim.expires_at))
            .filter(|at| *at > now)
            .min()
    }

    /// The latest moment a live holder or the claim lapses: how long the key stays held (a
    /// claim alone keeps readers out, so it counts).
    fn held_until(&self, now: Instant) -> Option<Instant> {
        self.holders
            .iter()
            .map(|holder| holder.expires_at)
            .chain(self.claim.as_ref().map(|claim| claim.expires_at))
            .filter(|at| *at > now)
            .max()
    }
}

impl Slot {
    #[inline]
    fn held_at(&self, now: Instant) -> bool {
        self.holder
            .as_ref()
            .is_some_and(|holder| holder.expires_at > now)
            || self
                .shared
                .as_ref()
                .is_some_and(|shared| shared.in_use(now))
    }

    /// The expiry of `token`'s lease on this key, while it is live at `now`.
    fn expiry_of(&mut self, token: &Token, now: Instant) -> Option<&mut Instant> {
        if let Some(holder) = self.holder.as_mut()
            && holder.token == *token
        {
            return (holder.expires_at > now).then_some(&mut holder.expires_at);
        }
        self.shared
            .as_mut()?
            .holders
            .iter_mut()
            .find(|holder| holder.token == *token && holder.expires_at > now)
            .map(|holder| &mut holder.expires_at)
    }

    fn has_waiters(&self) -> bool {
        self.waiters
            .as_ref()
            .is_some_and(|n| Arc::strong_count(n) > 1)
    }

    fn is_idle(&self) -> bool {
        self.holder.is_none() && self.shared.is_none() && !self.has_waiters() && self.line.is_none()
    }

    /// Whether the line keeps an attempt of `waiter` (or of none) out of this key, which is
    /// free when `!busy`: joins the line (or renews the waiter's place) when the attempt is
    /// refused; takes the waiter out of it when its turn came.
    #[inline]
    fn lined_out(
        &mut self,
        now: Instant,
        waiter: Option<&Token>,
        ttl: Duration,
        busy: bool,
    ) -> bool {
        let Some(line) = self.line.as_deref_mut() else {
            if busy && let Some(waiter) = waiter {
                // A key held back for the waiters a release woke (none of them in line, there
                // being none) stays theirs until then: the line starts with their turn.
                let mut line = Line {
                    entries: VecDeque::with_capacity(4),
                    outside_until: self.reserved_until.filter(|until| *until > now),
                };
                line.join(waiter, now + ttl.max(PLACE_AT_LEAST));
                self.line = Some(Box::new(line));
            }
            return busy;
        };
        let first_changed = line.prune(now);
        if !busy {
            match line.entries.front() {
                None => {
                    self.line = None;
                    return false;
                }
                Some(first) if waiter.is_some_and(|waiter| first.waiter == *waiter) => {
                    line.entries.pop_front();
                    if line.entries.is_empty() {
                        self.line = None;
                    }
                    return false;
                }
                // The key waits for the first in line; a first that just took the place of a
                // lapsed one is woken now (nobody released the key for it).
                Some(_) if first_changed => line.wake_first(),
                Some(_) => {}
            }
        }
        if let Some(waiter) = waiter {
            line.join(waiter, now + ttl.max(PLACE_AT_LEAST));
        }
        true
    }

    /// Whether the free key is kept for waiters outside the line now ([`Line::outside_until`]).
    fn outside_turn(&self, now: Instant) -> bool {
        self.line
            .as_ref()
            .and_then(|line| line.outside_until)
            .is_some_and(|until| until > now)
    }

    /// After a lease on the key was shortened (an extend by a shorter ttl): wakes the first in
    /// line and the other waiters, which planned to look again at the later expiry, so that
    /// the key is served when it expires (they look again, and wait on until then).
    fn replan_waiters(&self) {
        if let Some(line) = self.line.as_deref() {
            line.wake_first();
        }
        if let Some(waiters) = &self.waiters {
            waiters.notify_waiters();
        }
    }

    /// After the key was freed (released, purged): wakes the first in line, if any.
    fn wake_line(&mut self, now: Instant) {
        if let Some(line) = self.line.as_deref_mut() {
            line.prune(now);
            if line.entries.is_empty() {
                self.line = None;
            } else {
                line.wake_first();
            }
        }
    }

    /// Until when no waiter of any kind could get in: a live mutex holder, a semaphore whose
    /// permits are all held, a read-write lock held by a writer, or by readers while a
    /// writer's claim keeps new readers out (the earliest change of its holders and claim).
    /// `None` otherwise (readers may join readers).
    fn full_until(&self, now: Instant) -> Option<Instant> {
        if let Some(holder) = self
            .holder
            .as_ref()
            .filter(|holder| holder.expires_at > now)
        {
            return Some(holder.expires_at);
        }
        let shared = self.shared.as_deref()?;
        let mut live = shared
            .holders
            .iter()
            .filter(|holder| holder.expires_at > now);
        let full = match shared.family {
            Family::Semaphore(permits) => live.count() >= permits.get() as usize,
            Family::ReadWrite => {
                let claimed = shared
                    .claim
                    .as_ref()
                    .is_some_and(|claim| claim.expires_at > now);
                let mut any = false;
                let writer = live.any(|holder| {
                    any = true;
                    holder.writer
                });
                writer || (any && claimed)
            }
        };
        full.then(|| shared.next_change(now)).flatten()
    }

    /// When the key may next be free for anyone: `None` if it is free now.
    fn busy_until(&self, now: Instant, after_wait: bool) -> Option<Instant> {
        if let Some(holder) = self
            .holder
            .as_ref()
            .filter(|holder| holder.expires_at > now)
        {
            return Some(holder.expires_at);
        }
        if let Some(at) = self
            .shared
            .as_ref()
            .and_then(|shared| shared.next_change(now))
        {
            return Some(at);
        }
        self.reserved_until
            .filter(|until| *until > now && !after_wait)
    }
}

/// Test probes for leak checks, with the `testing` feature (and in this crate's tests): not
/// part of the API, whose users see a lock table only through locks. Hidden from the docs,
/// which docs.rs builds with every feature.
#[cfg(any(test, feature = "testing"))]
impl MemoryLock {
    /// How many keys have an entry (held, waited for, or expired and not yet reclaimed).
    #[doc(hidden)]
    pub fn len(&self) -> usize {
        self.inner.slots.len()
    }

    /// True when no key has an entry.
    #[doc(hidden)]
    pub fn is_empty(&self) -> bool {
        self.inner.slots.is_empty()
    }

    /// How many keys currently have tasks waiting for them.
    #[doc(hidden)]
    pub fn waited_keys(&self) -> usize {
        self.inner
            .slots
            .iter()
            .filter(|slot| slot.has_waiters() || slot.line.is_some())
            .count()
    }
}

impl MemoryLock {
    /// A new, empty lock table.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new, empty lock table configured by `config`.
    pub fn from_config(config: MemoryConfig) -> Self {
        let MemoryConfig {} = config;
        Self::new()
    }

    /// The capacity of the lock table: it tracks the most keys held at once, not every key
    /// ever locked.
    pub fn capacity(&self) -> usize {
        self.inner.slots.capacity()
    }

    /// One attempt; it never waits, so the answer is decided in the call.
    ///
    /// The fencing token is drawn while the key's shard is locked, at the moment the key is
    /// taken, so fences follow the order of acquisitions on every key; the clock is read there
    /// too, so a holder preempted between its clock read and the take is never handed a
    /// validity that began before it held the key.
    #[inline]
    fn acquire_now(&self, request: &LockRequest) -> Result<Option<Box<dyn Handle>>> {
        let token = request.token();
        let taken = match (request.keys(), request.kind()) {
            ([key], LeaseKind::Exclusive) => self.inner.take(
                key,
                token,
                request.ttl(),
                request.after_wait(),
                waiter_of(request),
                true,
            )?,
            ([key], kind) => self.inner.take_shared(key, token, kind, request)?,
            (keys, _) => self
                .inner
                .take_all(keys, token, request.ttl(), request.after_wait())?,
        };
        let Some((valid_until, fence)) = taken else {
            return Ok(None);
        };
        if fence.is_multiple_of(SWEEP_EVERY) {
            self.inner.sweep();
        }
        Ok(Some(Box::new(MemoryHandle {
            inner: Arc::clone(&self.inner),
            lease: Lease::new(request, valid_until).with_fencing_token(fence),
        })))
    }
}

impl Inner {
    /// Takes `key` for `token` if it is free (or its holder expired) and not held back for a
    /// waiter: the expiry it was given, and a fencing token drawn under the shard lock when
    /// `draw` (0 otherwise).
    #[inline]
    fn take(
        &self,
        key: &Key,
        token: &Token,
        ttl: Duration,
        after_wait: bool,
        waiter: Option<&Token>,
        draw: bool,
    ) -> Result<Option<(Instant, u64)>> {
        let draw = || {
            if draw {
                self.fence.fetch_add(1, Ordering::SeqCst) + 1
            } else {
                0
            }
        };
        match self.slots.entry(key.clone()) {
            Entry::Occupied(mut slot) => {
                let slot = slot.get_mut();
                let now = Instant::now();
                if let Some(shared) = slot.shared.as_mut() {
                    shared.prune(now);
                    if !shared.holders.is_empty() {
                        return Err(LockError::KindMismatch {
                            key: key.to_string(),
                            found: shared.family.describe(),
                            asked: LeaseKind::Exclusive.to_string(),
                        });
                    }
                    if shared.claim.is_some() {
                        return Ok(None);
                    }
                    slot.shared = None;
                }
                let busy = slot.busy_until(now, after_wait).is_some();
                if busy || slot.line.is_some() {
                    let outside_turn = slot.outside_turn(now);
                    // An outside waiter's attempt in its turn takes the key past the line;
                    // the line's own attempts wait for the turn to end.
                    let outsider_in_turn = !busy && outside_turn && waiter.is_none() && after_wait;
                    if !outsider_in_turn && slot.lined_out(now, waiter, ttl, busy || outside_turn) {
                        return Ok(None);
                    }
                    if let Some(line) = slot.line.as_deref_mut() {
                        line.outside_until = None;
                    }
                }
                let expires_at = now + ttl;
                slot.holder = Some(Holder {
                    token: token.clone(),
                    expires_at,
                });
                slot.reserved_until = None;
                slot.generation += 1;
                if waiter.is_some() {
                    slot.generation |= LINED_HOLDER;
                } else {
                    slot.generation &= !LINED_HOLDER;
                }
                Ok(Some((expires_at, draw())))
            }
            Entry::Vacant(free) => {
                let expires_at = Instant::now() + ttl;
                let fence = draw();
                free.insert(Slot {
                    holder: Some(Holder {
                        token: token.clone(),
                        expires_at,
                    }),
                    ..Slot::default()
                });
                Ok(Some((expires_at, fence)))
            }
        }
    }

    /// Takes a permit of a semaphore or a side of a read-write lock on `key` for `token`: the
    /// expiry it was given and a fencing token drawn under the shard lock.
    ///
    /// A writer that finds readers leaves a claim that keeps new readers out until it gets in,
    /// takes the claim back (`abandon`) or the claim's ttl ([`PLACE_AT_LEAST`] at least) passes.
    fn take_shared(
        &self,
        key: &Key,
        token: &Token,
        kind: LeaseKind,
        request: &LockRequest,
    ) -> Result<Option<(Instant, u64)>> {
        let family = Family::of(kind);
        let mut slot = self.slots.entry(key.clone()).or_default();
        let now = Instant::now();
        let mismatch = |found: String| LockError::KindMismatch {
            key: key.to_string(),
            found,
            asked: kind.to_string(),
        };
        if slot
            .holder
            .as_ref()
            .is_some_and(|holder| holder.expires_at > now)
        {
            return Err(mismatch(LeaseKind::Exclusive.to_string()));
        }
        if slot.reserved_until.is_some_and(|until| until > now) && !request.after_wait() {
            return Ok(None);
        }
        // Mutex waiters in line come first.
        if slot.line.is_some() && slot.lined_out(now, None, request.ttl(), false) {
            return Ok(None);
        }
        slot.holder = None;
        let shared = slot.shared.get_or_insert_with(|| {
            Box::new(Shared {
                family,
                holders: Vec::new(),
                claim: None,
            })
        });
        shared.prune(now);
        if shared.family != family {
            if !shared.holders.is_empty() || shared.claim.is_some() {
                return Err(mismatch(shared.family.describe()));
            }
            shared.family = family;
        }
        let admitted = match kind {
            LeaseKind::Permit { permits } => shared.holders.len() < permits.get() as usize,
            LeaseKind::Read => {
                shared.claim.is_none() && !shared.holders.iter().any(|holder| holder.writer)
            }
            _ => {
                let free = shared.holders.is_empty();
                if !free && request.will_wait() {
                    shared.claim = Some(Holder {
                        token: token.clone(),
                        expires_at: now + request.ttl().max(PLACE_AT_LEAST),
                    });
                }
                free
            }
        };
        if !admitted {
            return Ok(None);
        }
        let expires_at = now + request.ttl();
        let writer = kind == LeaseKind::Write;
        if writer {
            shared.claim = None;
        }
        shared.holders.push(SharedHolder {
            token: token.clone(),
            expires_at,
            writer,
        });
        slot.reserved_until = None;
        slot.generation += 1;
        Ok(Some((
            expires_at,
            self.fence.fetch_add(1, Ordering::SeqCst) + 1,
        )))
    }

    /// Turns `token`'s write lock on `key` into a read lock; false if it does not hold one.
    fn downgrade(&self, key: &Key, token: &Token) -> bool {
        let Some(mut slot) = self.slots.get_mut(key) else {
            return false;
        };
        let now = Instant::now();
        let Some(holder) = slot.shared.as_mut().and_then(|shared| {
            shared
                .holders
                .iter_mut()
                .find(|holder| holder.token == *token && holder.writer && holder.expires_at > now)
        }) else {
            return false;
        };
        holder.writer = false;
        slot.generation += 1;
        // Readers that wait may join now.
        if let Some(waiters) = &slot.waiters {
            waiters.notify_waiters();
        }
        true
    }

    /// Takes every key of a multi-key lock, all or none.
    ///
    /// The keys are taken one by one, then one fencing token is drawn, then each key is checked
    /// to be still ours. A key that expired and was taken by someone else meanwhile fails the
    /// attempt: so every key was ours, without interruption, from before the draw until after
    /// it, and the fence sits between the fences of the holders before and after us on each key.
    fn take_all(
        &self,
        keys: &[Key],
        token: &Token,
        ttl: Duration,
        after_wait: bool,
    ) -> Result<Option<(Instant, u64)>> {
        let mut valid_until = None;
        for (taken, key) in keys.iter().enumerate() {
            match self.take(key, token, ttl, after_wait, None, false) {
                // The first key's expiry is the earliest.
                Ok(Some((expires_at, _))) => {
                    valid_until.get_or_insert(expires_at);
                }
                outcome => {
                    self.release_each(&keys[..taken], token);
                    // Woken by the release of a later key, the attempt failed before reaching
                    // it: the wake-up it spent goes on to that key's next waiter.
                    if after_wait {
                        self.pass_on(&keys[taken + 1..]);
                    }
                    return outcome.map(|_| None);
                }
            }
        }
        let fence = self.fence.fetch_add(1, Ordering::SeqCst) + 1;
        let still_ours = keys.iter().all(|key| {
            self.slots.get(key).is_some_and(|slot| {
                slot.holder
                    .as_ref()
                    .is_some_and(|holder| holder.token == *token)
            })
        });
        // The validity is the first key's expiry, set when it was taken: with many keys and a
        // short ttl it may have passed while the others were taken. Such a lock is let go and
        // the attempt fails as the core fails an answer that came back too late ("raise the
        // ttl"): no guard is handed out with its validity already over, and keys nobody else
        // holds are not reported held.
        let still_valid = valid_until.is_some_and(|valid_until| valid_until > Instant::now());
        if !still_ours || !still_valid {
            self.release_each(keys, token);
            if still_ours {
                return Err(LockError::backend(
                    NAME,
                    format!(
                        "taking the {} keys of `{}` outlasted the lock's ttl of {} ms, so it was let go; raise the ttl",
                        keys.len(),
                        keys[0],
                        ttl.as_millis()
                    ),
                ));
            }
            return Ok(None);
        }
        Ok(valid_until.map(|valid_until| (valid_until, fence)))
    }

    fn release_each(&self, keys: &[Key], token: &Token) {
        let now = Instant::now();
        for key in keys {
            self.release(key, token, now);
        }
    }

    /// Wakes the longest waiter of each of `keys` that is free and waited for, and holds the key
    /// back for it, as a release does: a waiter woken for a key that it then did not take (its
    /// multi-key attempt failed on another key, or it ran past its deadline and gave up) would
    /// otherwise have spent the only wake-up, and the others would sleep out their delays on a
    /// free key.
    fn pass_on(&self, keys: &[Key]) {
        let now = Instant::now();
        for key in keys {
            if let Some(mut slot) = self.slots.get_mut(key)
                && slot.busy_until(now, true).is_none()
                && slot.has_waiters()
            {
                let until = now + HANDOFF_GRACE;
                slot.reserved_until = Some(slot.reserved_until.map_or(until, |at| at.max(until)));
                if let Some(waiters) = &slot.waiters {
                    waiters.notify_one();
                }
            }
        }
    }

    /// Frees `key` if `token` holds it and wakes the longest waiter; returns whether the lock
    /// was still valid at `now`, or `None` if `token` did not hold it.
    #[inline]
    fn release(&self, key: &Key, token: &Token, now: Instant) -> Option<bool> {
        let ours = |slot: &Slot| {
            slot.holder
                .as_ref()
                .is_some_and(|holder| holder.token == *token)
        };
        // Fast path: nobody waits, so the slot goes away in one step.
        if let Some((_, slot)) = self.slots.remove_if(key, |_, slot| {
            ours(slot) && slot.waiters.is_none() && slot.line.is_none()
        }) {
            return Some(slot.held_at(now));
        }
        let (valid, woke) = {
            let mut slot = self.slots.get_mut(key)?;
            if !ours(&slot) {
                drop(slot);
                return self.release_shared(key, token, now);
            }
            let valid = slot.held_at(now);
            slot.holder = None;
            slot.generation += 1;
            // Notify under the shard lock: a clone of the notifier taken out would briefly
            // count as a waiter and could keep an idle slot alive.
            let woke = slot.has_waiters();
            let lined_holder = slot.generation & LINED_HOLDER != 0;
            slot.generation &= !LINED_HOLDER;
            match slot.line.as_deref_mut() {
                // A hand-off within the line while others wait outside it: their turn.
                // Its first is woken too, to look again when the turn ends: nobody may take
                // the turn (an outsider cancelled, or past its deadline, before it asks).
                Some(line) if woke && lined_holder => {
                    line.outside_until = Some(now + HANDOFF_GRACE);
                    line.wake_first();
                    if let Some(waiters) = &slot.waiters {
                        waiters.notify_waiters();
                    }
                }
                // The line's turn: its first alone is woken.
                Some(_) => slot.wake_line(now),
                None if woke => {
                    slot.reserved_until = Some(now + HANDOFF_GRACE);
                    if let Some(waiters) = &slot.waiters {
                        waiters.notify_one();
                    }
                }
                None => {}
            }
            (valid, woke)
        };
        if !woke {
            self.slots.remove_if(key, |_, slot| slot.is_idle());
        }
        Some(valid)
    }

    /// Frees `token`'s permit, read or write lock on `key`, or takes back its claim, and wakes
    /// every waiter (several may get in now); as [`Inner::release`].
    fn release_shared(&self, key: &Key, token: &Token, now: Instant) -> Option<bool> {
        let valid = {
            let mut slot = self.slots.get_mut(key)?;
            let shared = slot.shared.as_mut()?;
            let valid = match shared
                .holders
                .iter()
                .position(|holder| holder.token == *token)
            {
                Some(at) => shared.holders.swap_remove(at).expires_at > now,
                None if shared
                    .claim
                    .as_ref()
                    .is_some_and(|claim| claim.token == *token) =>
                {
                    shared.claim = None;
                    false
                }
                None => return None,
            };
            shared.prune(now);
            if shared.holders.is_empty() && shared.claim.is_none() {
                slot.shared = None;
            }
            slot.generation += 1;
            if let Some(waiters) = &slot.waiters {
                waiters.notify_waiters();
            }
            valid
        };
        self.slots.remove_if(key, |_, slot| slot.is_idle());
        Some(valid)
    }

    /// Removes whatever the attempt `request` left on its keys (a lock or a writer's claim),
    /// by its token; whether anything was removed.
    fn abandon(&self, request: &LockRequest) -> bool {
        let now = Instant::now();
        let mut removed = false;
        for key in request.keys() {
            removed |= self.release(key, request.token(), now).is_some();
        }
        if let (Some(waiter), [key]) = (waiter_of(request), request.keys()) {
            removed |= self.leave_line(key, waiter, now);
        }
        removed
    }

    /// Takes `waiter` out of the line of `key`; the next in line is woken if the waiter was
    /// first and the key is free. Whether it had a place.
    fn leave_line(&self, key: &Key, waiter: &Token, now: Instant) -> bool {
        let left = (|| {
            let mut slot = self.slots.get_mut(key)?;
            let free = slot.busy_until(now, true).is_none();
            let line = slot.line.as_deref_mut()?;
            let at = line
                .entries
                .iter()
                .position(|entry| entry.waiter == *waiter)?;
            line.entries.remove(at);
            let first_changed = line.prune(now) || at == 0;
            if line.entries.is_empty() {
                slot.line = None;
            } else if free && first_changed {
                line.wake_first();
            }
            Some(())
        })()
        .is_some();
        // Also when it had no place left (a line emptied by lapses): an idle slot goes.
        self.slots.remove_if(key, |_, slot| slot.is_idle());
        left
    }

    /// Where `waiter` stands in the line of `key` at `now`: `None` when it should ask now (its
    /// turn came, or it has no place: the attempt lines it up again); otherwise its wake-up,
    /// and when it should look again by itself: the first in line at the holder's expiry, a
    /// waiter behind it when the earliest place ahead of it lapses (a leaked waiter's place:
    /// nobody else would notice, and the key would wait for the next poll).
    fn place(
        &self,
        key: &Key,
        waiter: &Token,
        now: Instant,
    ) -> Option<(Arc<Notify>, Option<Instant>)> {
        let mut slot = self.slots.get_mut(key)?;
        // The outsiders' turn keeps the key from the line until it ends.
        let busy_until = slot.busy_until(now, true).or_else(|| {
            slot.outside_turn(now)
                .then(|| slot.line.as_ref()?.outside_until)
                .flatten()
        });
        let line = slot.line.as_deref_mut()?;
        if line.prune(now) && busy_until.is_none() {
            line.wake_first();
        }
        if line.entries.is_empty() {
            // Every place lapsed: no line left (the waiter's attempt lines it up again).
            slot.line = None;
            return None;
        }
        let line = slot.line.as_deref_mut()?;
        let at = line
            .entries
            .iter()
            .position(|entry| entry.waiter == *waiter)?;
        match (at, busy_until) {
            (0, None) => None,
            (0, until) => Some((Arc::clone(&line.entries[0].turn), until)),
            _ => Some((
                Arc::clone(&line.entries[at].turn),
                line.entries
                    .iter()
                    .take(at)
                    .map(|entry| entry.lapses_at)
                    .min(),
            )),
        }
    }

    /// Sweeps out expired entries that were never released (every [`SWEEP_EVERY`]th
    /// acquisition does).
    fn sweep(&self) {
        let now = Instant::now();
        self.slots.retain(|_, slot| {
            if let Some(line) = slot.line.as_deref_mut() {
                line.prune(now);
                if line.entries.is_empty() {
                    slot.line = None;
                }
            }
            slot.held_at(now) || slot.has_waiters() || slot.line.is_some()
        });
    }

    /// Joins the waiters of `key` if it is busy: until when, the generation seen, the notifier.
    fn wait_on(
        &self,
        key: &Key,
        now: Instant,
        after_wait: bool,
    ) -> Option<(Instant, u64, Arc<Notify>)> {
        let mut slot = self.slots.get_mut(key)?;
        let busy_until = slot.busy_until(now, after_wait)?;
        let waiters = Arc::clone(slot.waiters.get_or_insert_with(Default::default));
        Some((busy_until, slot.generation, waiters))
    }

    /// Leaves the waiters of `key`: the slot goes when nobody holds or waits for it.
    fn stop_waiting(&self, key: &Key, waiters: Arc<Notify>) {
        drop(waiters);
        if let Some(mut slot) = self.slots.get_mut(key)
            && slot.waiters.is_some()
            && !slot.has_waiters()
        {
            slot.waiters = None;
        }
        self.slots.remove_if(key, |_, slot| slot.is_idle());
    }
}

#[async_trait]
impl Lock for MemoryLock {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE
            .with_extend()
            .with_multi_key()
            .with_fencing()
            .with_wake_on_release()
            .with_purge()
            .with_semaphore()
            .with_read_write()
            .with_fair()
    }

    fn try_acquire<'a>(&'a self, request: &'a LockRequest) -> Answer<'a, Acquired> {
        Answer::ready(self.acquire_now(request))
    }

    fn abandon<'a>(&'a self, request: &'a LockRequest) -> Answer<'a, Result<bool>> {
        Answer::ready(Ok(self.inner.abandon(request)))
    }

    async fn wait_for_release(&self, keys: &[Key], max_wait: Duration) -> Result<()> {
        let now = Instant::now();
        let give_up_at = now + max_wait;
        // A caller that waits is in line: a key held back for the line does not stop it here.
        // Wait on the first busy key; the others are re-checked by the next attempt.
        let Some((key, (_, generation, waiters))) = keys
            .iter()
            .find_map(|key| Some((key, self.inner.wait_on(key, now, false)?)))
        else {
            return Ok(());
        };
        // Left however the wait ends: a waiter cancelled after a release woke it would
        // otherwise leave its slot behind until the next sweep.
        let place = Waiting {
            inner: &self.inner,
            key,
            waiters: Some(waiters),
        };
        let mut woken_late = false;
        if let Some(waiters) = &place.waiters {
            let mut woken = false;
            loop {
                let notified = waiters.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                // The holder may have left between joining the line and enabling the
                // notification. After a wake-up that cannot let this waiter in (a lease
                // shortened, see `Slot::replan_waiters`; a release whose key another woken
                // waiter took first), the wait goes on: returning would make the caller count
                // an early wake-up, and after two it spaces its attempts.
                let now = Instant::now();
                let still = self.inner.slots.get(key).and_then(|slot| {
                    if woken {
                        // Woken in vain (another waiter won, or a lease was shortened): the
                        // wait goes on while nobody could get in.
                        return slot.full_until(now);
                    }
                    if slot.generation != generation {
                        return None;
                    }
                    slot.busy_until(now, false)
                });
                let Some(until) = still else {
                    break;
                };
                tokio::select! {
                    // Woken by a release, but run only once the wait was over: the caller may
                    // give up without an attempt (its deadline passed), so the wake-up is
                    // passed on, once this waiter has left. (A wake-up not taken at all, the
                    // other branch chosen, goes on by itself.)
                    () = &mut notified => {
                        if Instant::now() >= give_up_at {
                            woken_late = true;
                            break;
                        }
                        woken = true;
                    }
                    () = tokio::time::sleep_until(until.min(give_up_at)) => break,
                }
            }
        }
        drop(place);
        if woken_late {
            self.inner.pass_on(std::slice::from_ref(key));
        }
        Ok(())
    }

    async fn wait_for_turn(&self, request: &LockRequest, max_wait: Duration) -> Result<bool> {
        let (Some(waiter), [key]) = (waiter_of(request), request.keys()) else {
            return self
                .wait_for_release(request.keys(), max_wait)
                .await
                .map(|()| false);
        };
        let give_up_at = Instant::now() + max_wait;
        loop {
            // Its turn, or no place in line (the next attempt lines it up again).
            let Some((turn, look_again)) = self.inner.place(key, waiter, Instant::now()) else {
                return Ok(true);
            };
            let until = look_again.map_or(give_up_at, |at| at.min(give_up_at));
            tokio::select! {
                biased;
                // Woken: its turn, unless the key is kept for others for now (the
                // outsiders' turn): it looks again (above), and waits for that to end.
                () = turn.notified() => {}
                () = tokio::time::sleep_until(until) => {
                    // The holder expired or extended its lease, or a place ahead lapsed or was
                    // renewed: it looks again until then.
                    if Instant::now() >= give_up_at {
                        return Ok(false);
                    }
                }
            }
        }
    }

    async fn inspect(&self, key: &Key) -> Result<Vec<KeyState>> {
        let now = Instant::now();
        let holding = match self.inner.slots.get(key) {
            Some(slot) if slot.held_at(now) => Holding::Held {
                ttl: slot
                    .holder
                    .as_ref()
                    .map(|holder| holder.expires_at)
                    .or_else(|| slot.shared.as_ref()?.held_until(now))
                    .map(|until| until - now),
            },
            _ => Holding::Free,
        };
        Ok(vec![KeyState {
            node: "local".to_owned(),
            server: None,
            holding,
        }])
    }

    async fn purge(&self, prefix: &str) -> Result<u64> {
        let mut purged = 0;
        let now = Instant::now();
        self.inner.slots.retain(|key, slot| {
            if !key.as_str().starts_with(prefix) || (slot.holder.is_none() && slot.shared.is_none())
            {
                return true;
            }
            // Only live locks count, as a Redis server counts the keys it deletes: a lease that
            // expired and was not swept yet is removed without being counted.
            let live = slot.holder.as_ref().is_some_and(|h| h.expires_at > now)
                || slot
                    .shared
                    .as_ref()
                    .is_some_and(|shared| shared.holders.iter().any(|h| h.expires_at > now));
            purged += u64::from(live);
            slot.holder = None;
            slot.shared = None;
            slot.generation += 1;
            slot.wake_line(now);
            if let Some(waiters) = &slot.waiters {
                waiters.notify_waiters();
            }
            !slot.is_idle()
        });
        Ok(purged)
    }
}

impl fmt::Debug for MemoryLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLock")
            .field("keys", &self.inner.slots.len())
            .finish()
    }
}

/// The waiter `request` lines up as, if it is a waiting mutex request on one key that names
/// one (see [`Capabilities::fair`]).
#[inline]
fn waiter_of(request: &LockRequest) -> Option<&Token> {
    match (request.keys(), request.kind()) {
        ([_], LeaseKind::Exclusive) => request.waiter(),
        _ => None,
    }
}

/// A place among the waiters of a key, left when dropped.
struct Waiting<'a> {
    inner: &'a Inner,
    key: &'a Key,
    waiters: Option<Arc<Notify>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(waiters) = self.waiters.take() {
            self.inner.stop_waiting(self.key, waiters);
        }
    }
}

/// A lock held in this process.
struct MemoryHandle {
    inner: Arc<Inner>,
    lease: Lease,
}

impl MemoryHandle {
    fn not_held(&self) -> LockError {
        LockError::NotHeld {
            key: self.lease.key().to_string(),
        }
    }

    /// Frees every key still ours; `NotHeld` if any had expired or been taken over.
    #[inline]
    fn release_all(&self) -> Result<()> {
        let now = Instant::now();
        let mut all_valid = true;
        for key in self.lease.keys() {
            all_valid &= self.inner.release(key, self.lease.token(), now) == Some(true);
        }
        if all_valid {
            Ok(())
        } else {
            Err(self.not_held())
        }
    }
}

#[async_trait]
impl Handle for MemoryHandle {
    fn lease(&self) -> &Lease {
        &self.lease
    }

    async fn extend(&mut self, ttl: Duration) -> Result<()> {
        let now = Instant::now();
        let expires_at = now + ttl;
        let (keys, token) = (self.lease.keys(), self.lease.token());
        // All or nothing: a key found lost puts the keys already moved back as they were.
        let mut moved = Vec::with_capacity(keys.len());
        for key in keys {
            let held = self.inner.slots.get_mut(key).and_then(|mut slot| {
                let expiry = slot.expiry_of(token, now)?;
                let before = std::mem::replace(expiry, expires_at);
                if expires_at < before {
                    // Its waiters planned to look again at the later expiry.
                    slot.replan_waiters();
                }
                Some(before)
            });
            match held {
                Some(before) => moved.push((key, before)),
                None => {
                    for (key, before) in moved {
                        if let Some(mut slot) = self.inner.slots.get_mut(key)
                            && let Some(expiry) = slot.expiry_of(token, now)
                        {
                            let moved_to = std::mem::replace(expiry, before);
                            if before < moved_to {
                                // Put back earlier: waiters that looked meanwhile planned for
                                // the later expiry (rev34).
                                slot.replan_waiters();
                            }
                        }
                    }
                    return Err(self.not_held());
                }
            }
        }
        self.lease.set_valid_until(expires_at);
        Ok(())
    }

    #[inline]
    fn release(&mut self) -> Answer<'_, Result<()>> {
        Answer::ready(self.release_all())
    }

    async fn downgrade(&mut self) -> Result<()> {
        if self.inner.downgrade(self.lease.key(), self.lease.token()) {
            self.lease.set_downgraded();
            Ok(())
        } else {
            Err(self.not_held())
        }
    }
}

impl fmt::Debug for MemoryHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryHandle")
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use lock_core::{LockOptions, Locker};

    use super::*;

    lock_core::conformance_tests!(
        async { MemoryLock::new() },
        capabilities: [extend, multi_key, fencing, wake_on_release, purge, semaphore, read_write, fair]
    );

    fn locker(lock: &MemoryLock, ttl: Duration) -> Locker {
        Locker::new(lock.clone())
            .with_options(LockOptions::default().with_ttl(ttl))
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entry_is_reclaimed_and_stale_guard_is_powerless() {
        let lock = MemoryLock::new();
        let locker = locker(&lock, Duration::from_secs(1));
        let mut stale = locker.acquire("k").await.unwrap();
        tokio::time::advance(Duration::from_millis(1_001)).await;
        let next = locker
            .try_acquire("k")
            .await
            .unwrap()
            .expect("expired entry reclaimed");
        assert!(matches!(
            stale.extend(Duration::from_secs(5)).await,
            Err(LockError::NotHeld { .. })
        ));
        assert!(matches!(
            stale.release().await,
            Err(LockError::NotHeld { .. })
        ));
        assert_eq!(lock.len(), 1, "the stale release removed the next holder");
        next.release().await.unwrap();
        assert!(lock.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn release_of_an_expired_but_untaken_lock_reports_not_held_and_cleans_up() {
        let lock = MemoryLock::new();
        let guard = locker(&lock, Duration::from_millis(100))
            .acquire("k")
            .await
            .unwrap();
        tokio::time::advance(Duration::from_millis(150)).await;
        assert!(matches!(
            guard.release().await,
            Err(LockError::NotHeld { .. })
        ));
        assert!(lock.is_empty());
    }

    #[tokio::test]
    async fn memory_returns_to_baseline_after_many_distinct_keys() {
        let lock = MemoryLock::new();
        let locker = locker(&lock, Duration::from_secs(10));
        for i in 0..100_000 {
            let guard = locker.acquire(&format!("key-{i}")).await.unwrap();
            guard.release().await.unwrap();
        }
        assert_eq!(lock.len(), 0);
        assert_eq!(lock.waited_keys(), 0);
        assert!(
            lock.capacity() < 1_000,
            "the table grew to {} slots",
            lock.capacity()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiters_leave_no_entries_behind() {
        let lock = MemoryLock::new();
        let locker = locker(&lock, Duration::from_secs(10));
        let holder = locker.acquire("k").await.unwrap();
        let mut waiters = Vec::new();
        for _ in 0..16 {
            let locker = locker.clone();
            waiters.push(tokio::spawn(async move {
                locker.acquire("k").await.unwrap().release().await.unwrap();
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(lock.waited_keys(), 1);
        assert_eq!(lock.len(), 1);
        holder.release().await.unwrap();
        for waiter in waiters {
            waiter.await.unwrap();
        }
        assert!(lock.is_empty());
        assert_eq!(lock.waited_keys(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn never_released_entries_are_swept() {
        let lock = MemoryLock::new();
        let locker = locker(&lock, Duration::from_millis(5));
        for i in 0..SWEEP_EVERY {
            std::mem::forget(locker.acquire(&format!("leaked-{i}")).await.unwrap());
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert!(lock.len() < 10, "{} expired entries were kept", lock.len());
    }

    #[tokio::test]
    async fn an_arc_of_the_backend_is_a_backend_too() {
        let lock = std::sync::Arc::new(MemoryLock::new());
        let locker = Locker::new(std::sync::Arc::clone(&lock));
        let guard = locker.acquire("shared").await.unwrap();
        assert_eq!(lock.len(), 1, "the Arc forwards to the same map");
        assert!(locker.try_acquire("shared").await.unwrap().is_none());
        guard.release().await.unwrap();
        assert_eq!(lock.len(), 0);
    }

    #[test]
    fn a_guard_dropped_outside_a_runtime_releases_at_once() {
        let lock = MemoryLock::new();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let guard = runtime
            .block_on(locker(&lock, Duration::from_secs(60)).acquire("k"))
            .unwrap();
        drop(runtime);
        assert_eq!(lock.len(), 1);
        drop(guard);
        assert!(lock.is_empty(), "the lock waited for its ttl");
    }

    /// Counts the attempts that reach the backend, whichever way they come.
    #[derive(Debug, Default)]
    struct Counting {
        lock: MemoryLock,
        attempts: AtomicU64,
    }

    #[async_trait]
    impl Lock for Counting {
        fn name(&self) -> &'static str {
            self.lock.name()
        }

        fn capabilities(&self) -> Capabilities {
            self.lock.capabilities()
        }

        fn try_acquire<'a>(&'a self, request: &'a LockRequest) -> Answer<'a, Acquired> {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            self.lock.try_acquire(request)
        }

        fn abandon<'a>(&'a self, request: &'a LockRequest) -> Answer<'a, Result<bool>> {
            self.lock.abandon(request)
        }

        async fn wait_for_release(&self, keys: &[Key], max_wait: Duration) -> Result<()> {
            self.lock.wait_for_release(keys, max_wait).await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_found_held_at_once_counts_as_the_first_attempt() {
        let counting = Arc::new(Counting::default());
        let holder = locker(&counting.lock, Duration::from_secs(60))
            .acquire("k")
            .await
            .unwrap();
        let retry = lock_core::RetryPolicy::forever()
            .with_retry_count(lock_core::RetryCount::Limited(2))
            .with_retry_jitter(Duration::ZERO);
        let waiter = Locker::new(Arc::clone(&counting))
            .with_options(LockOptions::default().with_retry(retry))
            .unwrap();
        match waiter.acquire("k").await {
            Err(LockError::Timeout { attempts, .. }) => assert_eq!(attempts, 3),
            other => panic!("expected a timeout after 3 attempts, got {other:?}"),
        }
        assert_eq!(counting.attempts.load(Ordering::SeqCst), 3);
        assert!(matches!(waiter.try_acquire("k").await, Ok(None)));
        assert_eq!(
            counting.attempts.load(Ordering::SeqCst),
            4,
            "a single attempt is one attempt"
        );
        holder.release().await.unwrap();
    }

    /// The memory path never boxes a future: every answer of the store is decided in the call,
    /// so the core takes it without awaiting (and a guard dropped outside a runtime still
    /// releases, a cancelled writer's claim is gone before the next line).
    #[test]
    fn every_answer_is_decided_in_the_call() {
        let lock = MemoryLock::new();
        let request = LockRequest::new(
            lock_core::raw::KeySet::one(Key::new("k").unwrap()),
            Token::generate().unwrap(),
            Duration::from_secs(10),
        )
        .unwrap();
        let mut handle = lock
            .try_acquire(&request)
            .into_ready()
            .expect("decided in the call")
            .unwrap()
            .expect("a free key is taken");
        assert!(matches!(
            lock.try_acquire(&request).into_ready(),
            Some(Ok(None))
        ));
        assert!(matches!(handle.release().into_ready(), Some(Ok(()))));
        assert!(matches!(
            lock.abandon(&request).into_ready(),
            Some(Ok(false))
        ));
        assert!(lock.is_empty());
    }

    #[tokio::test]
    async fn purge_removes_only_the_prefix() {
        let lock = MemoryLock::new();
        let locker = locker(&lock, Duration::from_secs(10));
        let a = locker.acquire("jobs:1").await.unwrap();
        let b = locker.acquire("jobs:2").await.unwrap();
        let other = locker.acquire("other").await.unwrap();
        assert_eq!(locker.purge("jobs:").await.unwrap(), 2);
        assert_eq!(lock.len(), 1);
        assert!(matches!(a.release().await, Err(LockError::NotHeld { .. })));
        drop(b);
        other.release().await.unwrap();
    }

    /// A lease that expired before the purge (not swept yet) is removed but not counted.
    #[tokio::test]
    async fn purge_counts_only_live_locks() {
        let lock = MemoryLock::new();
        let short = locker(&lock, Duration::from_millis(20));
        let expired = short.acquire("jobs:old").await.unwrap();
        let expired_permit = short.acquire_permit("jobs:sem", 2).await.unwrap();
        tokio::time::sleep(Duration::from_millis(40)).await;
        let live = locker(&lock, Duration::from_secs(10));
        let held = live.acquire("jobs:new").await.unwrap();
        let permit = live.acquire_permit("jobs:sem2", 2).await.unwrap();
        assert_eq!(live.purge("jobs:").await.unwrap(), 2);
        assert_eq!(lock.len(), 0);
        drop((expired, expired_permit, held, permit));
    }
}

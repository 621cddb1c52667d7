//! The waiters of push-based wake-ups, for backends that announce releases (Redis pub/sub, …)
//! and implement [`Lock::wait_for_release`](crate::raw::Lock::wait_for_release) on top.
//!
//! Waiters register per channel; the backend's message reader wakes the channel's waiters, or
//! every waiter when its connection drops (messages may have been missed). A channel's first
//! waiter subscribes; when its last waiter leaves, the subscription lingers a little
//! ([`LINGER`]) so that a waiter coming back soon — the usual case under contention — finds it
//! in place instead of paying a `SUBSCRIBE` and an `UNSUBSCRIBE` per wait.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

/// How long a subscription outlives its last waiter.
pub const LINGER: Duration = Duration::from_secs(2);

/// Waiters grouped by channel; cheap to clone (shared).
#[derive(Clone, Debug, Default)]
pub struct WakeRegistry(Arc<Mutex<HashMap<String, Channel>>>);

#[derive(Debug, Default)]
struct Channel {
    notify: Arc<Notify>,
    waiters: usize,
    /// Whether a waiter has subscribed (or is subscribing) to the channel.
    subscribed: bool,
    /// Bumped by every registration, so that a lingering unsubscribe can tell whether someone
    /// came back meanwhile.
    generation: u64,
}

/// How a channel's subscription is retired, once its last waiter is gone.
type Unsubscribe = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// A wait in progress: ends its registration when dropped, however the wait ended.
struct Waiting<'a> {
    registry: &'a WakeRegistry,
    channel: &'a str,
    /// This waiter was to subscribe the channel and has not finished doing so.
    subscribing: bool,
    unsubscribe: Option<Unsubscribe>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.subscribing {
            self.registry.subscription_abandoned(self.channel);
        }
        if let Some(unsubscribe) = self.unsubscribe.take() {
            self.registry.unregister(self.channel, unsubscribe);
        }
    }
}

/// One waiter's registration.
#[derive(Debug)]
struct Registration {
    /// Notified when a release on the channel is announced.
    notify: Arc<Notify>,
    /// True when the channel has no subscription yet: this waiter should subscribe.
    subscribe: bool,
}

impl WakeRegistry {
    /// Registers a waiter on `channel`.
    fn register(&self, channel: &str) -> Registration {
        let mut channels = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = channels.entry(channel.to_owned()).or_default();
        let subscribe = !entry.subscribed;
        entry.subscribed = true;
        entry.waiters += 1;
        entry.generation += 1;
        Registration {
            notify: Arc::clone(&entry.notify),
            subscribe,
        }
    }

    /// Waits on `channel` for an announced release, the holder's expiry, or `max_wait`,
    /// whichever comes first, then ends the registration.
    ///
    /// `remaining_ttl` asks the store how long the holder has left (expiry is not announced);
    /// `subscribe` runs when the channel has no subscription yet, and says whether it made
    /// one (when it did not, the next waiter tries again: a channel whose subscription failed
    /// must not count as subscribed while waiters keep coming); both run while the wait has
    /// already begun, so neither delays a wake-up. `unsubscribe` runs when the channel's
    /// subscription is retired: [`LINGER`] after its last waiter left, unless another came.
    ///
    /// Cancel safe: a wait dropped at any point ends its registration, and a subscription it
    /// had not finished is left to the next waiter to make.
    pub async fn wait<P, S, U, UF>(
        &self,
        channel: &str,
        max_wait: Duration,
        remaining_ttl: P,
        subscribe: S,
        unsubscribe: U,
    ) where
        P: Future<Output = Option<Duration>>,
        S: Future<Output = bool>,
        U: FnOnce() -> UF + Send + 'static,
        UF: Future<Output = ()> + Send + 'static,
    {
        let registration = self.register(channel);
        let mut waiting = Waiting {
            registry: self,
            channel,
            subscribing: registration.subscribe,
            unsubscribe: Some(Box::new(move || Box::pin(unsubscribe()))),
        };
        let notified = registration.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let deadline = tokio::time::Instant::now() + max_wait;
        let sleep = tokio::time::sleep_until(deadline);
        tokio::pin!(sleep);
        tokio::pin!(remaining_ttl);
        tokio::pin!(subscribe);
        let mut probed = false;
        loop {
            tokio::select! {
                () = &mut notified => break,
                () = &mut sleep => break,
                ttl = &mut remaining_ttl, if !probed => {
                    probed = true;
                    if let Some(ttl) = ttl {
                        let expiry = tokio::time::Instant::now() + ttl;
                        if expiry < deadline {
                            sleep.as_mut().reset(expiry);
                        }
                    }
                }
                subscribed = &mut subscribe, if waiting.subscribing => {
                    waiting.subscribing = false;
                    if !subscribed {
                        self.subscription_abandoned(channel);
                    }
                }
            }
        }
        // `waiting` ends the registration as it drops, here or wherever the wait is cancelled.
    }

    /// Ends a registration. When it was the channel's last waiter, `unsubscribe` runs after
    /// [`LINGER`] unless a waiter registered meanwhile (on the current tokio runtime; without
    /// one, the subscription is forgotten at once and the next waiter subscribes again).
    fn unregister(&self, channel: &str, unsubscribe: Unsubscribe) {
        let generation = {
            let mut channels = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(entry) = channels.get_mut(channel) else {
                return;
            };
            entry.waiters = entry.waiters.saturating_sub(1);
            if entry.waiters > 0 {
                return;
            }
            entry.generation
        };
        let (registry, channel) = (self.clone(), channel.to_owned());
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            registry.retire(&channel, generation);
            return;
        };
        runtime.spawn(async move {
            tokio::time::sleep(LINGER).await;
            if registry.retire(&channel, generation) {
                unsubscribe().await;
                registry.after_unsubscribe(&channel);
            }
        });
    }

    /// The waiter that was to subscribe `channel` left before its subscription was made, or
    /// failed to make it: the next waiter makes it.
    fn subscription_abandoned(&self, channel: &str) {
        if let Some(entry) = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(channel)
        {
            entry.subscribed = false;
        }
    }

    /// Forgets `channel` if nobody registered since `generation`; true when forgotten.
    fn retire(&self, channel: &str, generation: u64) -> bool {
        let mut channels = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let idle = channels
            .get(channel)
            .is_some_and(|entry| entry.waiters == 0 && entry.generation == generation);
        if idle {
            channels.remove(channel);
        }
        idle
    }

    /// A waiter that registered while the channel was being unsubscribed may have subscribed
    /// before the unsubscription landed: have the next waiter subscribe again, and wake the
    /// current ones so that they do.
    fn after_unsubscribe(&self, channel: &str) {
        let notify = {
            let mut channels = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(entry) = channels.get_mut(channel) else {
                return;
            };
            entry.subscribed = false;
            Arc::clone(&entry.notify)
        };
        notify.notify_waiters();
    }

    /// Wakes the waiters of `channel`.
    pub fn wake(&self, channel: &str) {
        let notify = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(channel)
            .map(|entry| Arc::clone(&entry.notify));
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
    }

    /// Wakes every waiter and has the next waiter of every channel subscribe again (after a
    /// lost connection: messages may have been missed, and the connection made anew has no
    /// subscription). The channels are not forgotten: those nobody waits on any more are
    /// still retired after their linger, on every connection (a lost connection of one node
    /// must not leave the channels subscribed on the others for good).
    pub fn wake_all(&self) {
        let all = self.resubscribe_all();
        for notify in all {
            notify.notify_waiters();
        }
    }

    /// Has the next waiter of every channel subscribe again, without waking the current ones:
    /// after a lost connection of a backend that hears every release on other connections too
    /// (a release is announced on every node that held the key), whose waiters are still
    /// listening there. A wake-up is an early wake for the retry loop, which spaces its
    /// attempts after two in a row: a flapping connection must not spend them.
    pub fn resubscribe(&self) {
        self.resubscribe_all();
    }

    /// The channels that have waiters now: what a connection made again after a loss
    /// subscribes at once.
    pub fn channels(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, entry)| entry.waiters > 0)
            .map(|(channel, _)| channel.clone())
            .collect()
    }

    fn resubscribe_all(&self) -> Vec<Arc<Notify>> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values_mut()
            .map(|entry| {
                entry.subscribed = false;
                Arc::clone(&entry.notify)
            })
            .collect()
    }
}

/// Waiters of fair lines, each woken by a message meant for it alone (its id), for backends
/// with [`Capabilities::fair`](crate::Capabilities::fair): a release passes the turn to the
/// head of the line and wakes that one waiter, so the work per hand-off does not grow with the
/// number of waiters. Cheap to clone (shared).
///
/// A waiter *listens* before its attempt goes out, so that a message sent while the answer is
/// on its way is kept until it waits; it is *forgotten* when its acquisition ends (won, or
/// taken back by [`Lock::abandon`](crate::raw::Lock::abandon)). Entries untouched for
/// [`TURN_IDLE`] are dropped when the registry grows, should an acquisition end without
/// either.
///
/// A backend that gives the key to the head of the line as it passes the turn (the
/// reservation is the head's lock) sends a *grant* naming when that key lapses
/// ([`TurnRegistry::wake_granted`]); the waiter may hold it without asking again only if its
/// latest attempt, whose send time it recorded ([`TurnRegistry::anchor`]), renewed its place to
/// exactly that expiry: see [`TurnRegistry::granted`]. A waiter an attempt of which was taken
/// back ([`TurnRegistry::taken_back`]) holds no grant from then on.
#[derive(Clone, Debug, Default)]
pub struct TurnRegistry(Arc<Turns>);

#[derive(Debug, Default)]
struct Turns {
    waiters: Mutex<HashMap<String, Arc<Turn>>>,
    /// Waiters an attempt of which was taken back, and until when that counts (pruned past it
    /// once the map grows).
    taken_back: Mutex<HashMap<String, std::time::Instant>>,
    /// When `waiters` and `taken_back` are pruned next (read and written under their mutex).
    waiters_pruned: PruneSchedule,
    taken_back_pruned: PruneSchedule,
    /// How many times `taken_back` pruned (the unit tests count them).
    #[cfg(test)]
    taken_back_prunes: AtomicUsize,
    /// A message came on this client's turn channel: its wake-ups reach it (see
    /// [`TurnRegistry::behind`]).
    heard: std::sync::atomic::AtomicBool,
    /// The latest longest wait of a waiter between its attempts, in µs (0 before any): how
    /// long it goes before its next poll unless woken (see [`TurnRegistry::tell_place_from`]).
    poll_us: AtomicU64,
    /// The latest fair attempt's round trip, in µs (0 before any).
    round_trip_us: AtomicU64,
}

/// When a map whose entries may all still be live (waiters, marks, places) is pruned next: once
/// it holds more than [`TURN_PRUNE_ABOVE`] entries and twice what the previous prune left, so
/// that a map of live entries is not scanned again at every insert (quadratic). Read and
/// written under the map's own mutex.
#[derive(Debug, Default)]
pub struct PruneSchedule(AtomicUsize);

impl PruneSchedule {
    /// Whether a map of `len` entries is due for a prune.
    pub fn due(&self, len: usize) -> bool {
        len > self.0.load(Ordering::Relaxed).max(TURN_PRUNE_ABOVE)
    }

    /// A prune left `len` entries: the next comes once the map has doubled.
    pub fn pruned(&self, len: usize) {
        self.0.store(len.saturating_mul(2), Ordering::Relaxed);
    }
}

/// A turn that came with the key (see [`TurnRegistry::granted`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Granted {
    /// When the waiter's attempt was sent whose place the grant names: the key lapses no
    /// earlier than a ttl after it.
    pub sent: tokio::time::Instant,
    /// The fencing token the store drew for the waiter as it gave it the key, when it did.
    pub fence: Option<u64>,
}

/// Entries of a [`TurnRegistry`] left alone this long are dropped once it holds more than
/// [`TURN_PRUNE_ABOVE`] waiters (and twice what the previous prune left).
pub const TURN_IDLE: Duration = Duration::from_secs(600);

/// See [`TURN_IDLE`].
pub const TURN_PRUNE_ABOVE: usize = 1024;

/// The longest a waiter far back in line goes without asking the store, unless woken (see
/// [`TurnRegistry::behind`]): a quarter of its place's lease (every attempt renews the place
/// for one ttl), and 10 s at most — what a lost wake-up can cost such a waiter.
pub fn behind_at_most(ttl: Duration) -> Duration {
    (ttl / 4).min(Duration::from_secs(10))
}

/// A take-back and its re-sends end a ttl after it began (they stop once the keys would be gone
/// by themselves), each send bounded by a node or command timeout: a waiter whose attempt was
/// taken back is marked for its ttl and this long (see [`TurnRegistry::taken_back`]).
pub const TAKE_BACK_SETTLED: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Turn {
    /// Holds one wake-up until it is waited for.
    notify: Notify,
    /// When the waiter, first in line behind a holder, should try again by itself: the holder's
    /// expiry, which nobody announces.
    retry_at: Mutex<Option<tokio::time::Instant>>,
    touched: Mutex<tokio::time::Instant>,
    /// The expiry (the store's clock) and the fencing token named by the latest grant, until
    /// taken.
    grant: Mutex<Option<(u64, Option<u64>)>>,
    /// When the waiter's latest attempt that renewed its place was sent, and the expiry the
    /// store gave its place then.
    anchor: Mutex<Option<(tokio::time::Instant, u64)>>,
    /// The key the waiter's attempts renewed its place on; `Some(None)` once they named two
    /// keys (a grant names the waiter and an expiry, not the key).
    anchored_on: Mutex<Option<Option<String>>>,
    /// Until when the waiter, far back in line at its latest attempt, need not ask again unless
    /// woken (see [`TurnRegistry::behind`]).
    behind_until: Mutex<Option<tokio::time::Instant>>,
    /// A wake-up came since the waiter's latest attempt began listening.
    woken: std::sync::atomic::AtomicBool,
}

impl TurnRegistry {
    fn waiters(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Turn>>> {
        self.0
            .waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn turn(&self, waiter: &str) -> Arc<Turn> {
        let mut turns = self.waiters();
        let now = tokio::time::Instant::now();
        if self.0.waiters_pruned.due(turns.len()) && !turns.contains_key(waiter) {
            turns.retain(|_, turn| {
                now.duration_since(*turn.touched.lock().unwrap_or_else(PoisonError::into_inner))
                    < TURN_IDLE
            });
            self.0.waiters_pruned.pruned(turns.len());
        }
        let turn = turns.entry(waiter.to_owned()).or_insert_with(|| {
            Arc::new(Turn {
                notify: Notify::new(),
                retry_at: Mutex::new(None),
                touched: Mutex::new(now),
                grant: Mutex::new(None),
                anchor: Mutex::new(None),
                anchored_on: Mutex::new(None),
                behind_until: Mutex::new(None),
                woken: std::sync::atomic::AtomicBool::new(false),
            })
        });
        *turn.touched.lock().unwrap_or_else(PoisonError::into_inner) = now;
        Arc::clone(turn)
    }

    /// Starts (or goes on) listening for `waiter`'s turn: from now on a wake-up is kept until
    /// the waiter waits. A wake-up kept from before is dropped (the attempt about to go out
    /// sees what it announced: with several nodes each one announces the same turn), and so is
    /// the first-in-line deadline, if any: the attempt says afresh.
    pub fn listen(&self, waiter: &str) {
        let turn = self.turn(waiter);
        *turn.retry_at.lock().unwrap_or_else(PoisonError::into_inner) = None;
        // A grant heard before this attempt is answered by it (the attempt takes the turn).
        *turn.grant.lock().unwrap_or_else(PoisonError::into_inner) = None;
        *turn
            .behind_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        turn.woken.store(false, Ordering::SeqCst);
        // Polled once, a `Notified` takes a kept wake-up if there is one, and is dropped
        // otherwise (a wake-up that races with the drop is kept: tokio passes it on).
        let notified = std::pin::pin!(turn.notify.notified());
        let _ = std::future::Future::poll(
            notified,
            &mut std::task::Context::from_waker(std::task::Waker::noop()),
        );
    }

    /// Records that `waiter` is first in line behind a holder with `holder_left` to live: its
    /// next wait ends then at the latest.
    pub fn first_in_line(&self, waiter: &str, holder_left: Duration) {
        let turn = self.turn(waiter);
        *turn.retry_at.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(tokio::time::Instant::now() + holder_left);
    }

    /// Records that `waiter`'s attempt, answered `round_trip` after it was sent, left it `rank`
    /// places behind the head of its line (1: second). Each hand-off ahead of it takes a round
    /// trip at least (a release reaching the store, a wake-up the next head), so before `rank`
    /// of them have passed it cannot be first: until twice that long (at most `at_most`, which
    /// keeps its place renewed), [`TurnRegistry::still_behind`] says it need not ask the store,
    /// unless it is woken. Its turn still comes as a wake-up; only the fallback poll for a lost
    /// one waits, so that a long line's waiters do not each poll the store every fallback
    /// period, which would cost every hand-off work in proportion to the line's length.
    ///
    /// Not before a message has come on the client's channel: until then nothing shows that
    /// wake-ups reach it (a subscription refused, an ACL user without channels, which a client
    /// may not be told; or publishers refused), and polls may be all that find its turn.
    pub fn behind(&self, waiter: &str, rank: u64, round_trip: Duration, at_most: Duration) {
        self.answered(round_trip);
        if !self.0.heard.load(Ordering::SeqCst) {
            return;
        }
        let turn = self.turn(waiter);
        let far = round_trip
            .saturating_mul(u32::try_from(rank.saturating_mul(2)).unwrap_or(u32::MAX))
            .min(at_most);
        *turn
            .behind_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(tokio::time::Instant::now() + far);
    }

    /// Records a fair attempt of `waiter` answered `round_trip` after it was sent: its place
    /// behind the head when the store told it ([`TurnRegistry::behind`]), its round trip
    /// either way ([`TurnRegistry::answered`]).
    pub fn attempt_answered(
        &self,
        waiter: &str,
        place: Option<u64>,
        round_trip: Duration,
        at_most: Duration,
    ) {
        match place {
            Some(rank) => self.behind(waiter, rank, round_trip, at_most),
            None => self.answered(round_trip),
        }
    }

    /// Records a fair attempt's round trip (see [`TurnRegistry::tell_place_from`]).
    pub fn answered(&self, round_trip: Duration) {
        let micros = u64::try_from(round_trip.as_micros()).unwrap_or(u64::MAX);
        self.0.round_trip_us.store(micros.max(1), Ordering::Relaxed);
    }

    /// The first place behind the head (1: second) worth telling a refused waiter of this
    /// client (see [`TurnRegistry::behind`]), which the store then finds out only from there
    /// on (the line's gate looks whether anything in line can lapse first, two commands): a
    /// waiter closer to the head would be deferred for less than half its next poll's wait, on
    /// the latest round trip, which saves no poll. `u64::MAX` (tell no place) until the client
    /// has heard a message on its channel, which a deferral needs, and when the deferral's cap
    /// `at_most` (see [`behind_at_most`]) is itself under half that wait; 1 (every place) until
    /// an attempt's round trip and a wait are known.
    pub fn tell_place_from(&self, at_most: Duration) -> u64 {
        if !self.0.heard.load(Ordering::SeqCst) {
            return u64::MAX;
        }
        let poll = self.0.poll_us.load(Ordering::Relaxed);
        let round_trip = self.0.round_trip_us.load(Ordering::Relaxed);
        if poll == 0 || round_trip == 0 {
            return 1;
        }
        let cap = u64::try_from(at_most.as_micros()).unwrap_or(u64::MAX);
        if cap.saturating_mul(2) <= poll {
            return u64::MAX;
        }
        // Deferred for 2 × place × round trip: told from where that exceeds half the poll's wait.
        poll / round_trip.saturating_mul(4) + 1
    }

    /// Whether `waiter` is still too far back in line to be first (see
    /// [`TurnRegistry::behind`]) and was not woken since its latest attempt: its next attempt
    /// may be answered as refused without asking the store.
    pub fn still_behind(&self, waiter: &str) -> bool {
        let Some(turn) = self.waiters().get(waiter).map(Arc::clone) else {
            return false;
        };
        !turn.woken.load(Ordering::SeqCst)
            && turn
                .behind_until
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some_and(|until| tokio::time::Instant::now() < until)
    }

    /// Stops listening for `waiter` (its acquisition ended).
    pub fn forget(&self, waiter: &str) {
        self.waiters().remove(waiter);
    }

    /// Wakes `waiter` (or keeps the wake-up until it waits); false when nobody listens by that
    /// id.
    pub fn wake(&self, waiter: &str) -> bool {
        self.wake_with(waiter, None)
    }

    /// Wakes the waiter a message on its client's turn channel names: `<waiter>` for a turn to
    /// ask for, `<waiter>:<expiry>` for a turn that came with the key, lapsing at `expiry` (see
    /// [`TurnRegistry::wake_granted`]), `<waiter>:<expiry>:<fence>` for one that came with the
    /// key and the fencing token `fence`. A waiter id may hold `:` itself (ids are the
    /// caller's in the raw API): the whole message is a waiter first, then the numbers are
    /// read from the end, for a waiter that listens (when both readings name one, ids `a` and
    /// `a:5`, the waiter whose latest attempt was given the expiry named). False when nobody
    /// listens by that id.
    pub fn wake_message(&self, message: &str) -> bool {
        self.0.heard.store(true, Ordering::SeqCst);
        if self.wake(message) {
            return true;
        }
        let Some((head, last)) = message.rsplit_once(':') else {
            return false;
        };
        let Ok(last) = last.parse::<u64>() else {
            return false;
        };
        // The two readings, `<waiter>:<expiry>:<fence>` first, of those that name a waiter
        // listening here: when both do (ids `a` and `a:5`), the one whose latest attempt was
        // given the expiry the message names is the one the grant is for.
        let mut readings = Vec::with_capacity(2);
        if let Some((waiter, expiry)) = head.rsplit_once(':')
            && let Ok(expiry) = expiry.parse::<u64>()
        {
            readings.push((waiter, expiry, Some(last)));
        }
        readings.push((head, last, None));
        let anchored = |waiter: &str| {
            let turn = self.waiters().get(waiter).map(Arc::clone)?;
            let anchor = *turn.anchor.lock().unwrap_or_else(PoisonError::into_inner);
            Some(anchor.map(|(_, expiry)| expiry))
        };
        let listening: Vec<_> = readings
            .into_iter()
            .filter_map(|(waiter, expiry, fence)| {
                anchored(waiter).map(|anchor| (waiter, expiry, fence, anchor == Some(expiry)))
            })
            .collect();
        let chosen = listening
            .iter()
            .find(|reading| reading.3)
            .or_else(|| listening.first());
        chosen.is_some_and(|&(waiter, expiry, fence, _)| self.wake_granted(waiter, expiry, fence))
    }

    /// Wakes `waiter`, recording `grant` first when given; false when nobody listens.
    fn wake_with(&self, waiter: &str, grant: Option<(u64, Option<u64>)>) -> bool {
        let turn = self.waiters().get(waiter).map(Arc::clone);
        let Some(turn) = turn else {
            return false;
        };
        if grant.is_some() {
            *turn.grant.lock().unwrap_or_else(PoisonError::into_inner) = grant;
        }
        turn.woken.store(true, Ordering::SeqCst);
        turn.notify.notify_one();
        true
    }

    /// Wakes `waiter` for a turn that came with the key: the store gave it the key, which
    /// lapses at `expiry` (the store's clock, as in [`TurnRegistry::anchor`]), with the fencing
    /// token `fence` when the store drew one. False when nobody listens by that id.
    pub fn wake_granted(&self, waiter: &str, expiry: u64, fence: Option<u64>) -> bool {
        self.wake_with(waiter, Some((expiry, fence)))
    }

    /// Records that `waiter`'s attempt on `key` sent at `sent` renewed its place in line to
    /// lapse at `expiry` (the store's clock). A waiter id is one acquisition's, of one key: one
    /// whose attempts named two keys (a caller of the raw API reusing an id) holds no grant
    /// until it is forgotten, since the grant of one key could name the expiry its place on
    /// the other got.
    pub fn anchor(&self, waiter: &str, key: &str, sent: tokio::time::Instant, expiry: u64) {
        let turn = self.turn(waiter);
        {
            let mut on = turn
                .anchored_on
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match on.as_ref() {
                None => *on = Some(Some(key.to_owned())),
                Some(Some(before)) if before != key => *on = Some(None),
                Some(_) => {}
            }
        }
        *turn.anchor.lock().unwrap_or_else(PoisonError::into_inner) = Some((sent, expiry));
    }

    /// Takes the grant `waiter` heard since its latest attempt, if it names the expiry that
    /// attempt's place was given, the waiter's attempts renewed places on `key` alone, and no
    /// attempt of the waiter was taken back: then the key the store gave it lapses no earlier
    /// than a ttl (the lease of the place) after that attempt was sent. A grant of an earlier
    /// place (one that lapsed since, its message late) is not one. A grant not held is taken
    /// all the same (the waiter asks).
    pub fn granted(&self, waiter: &str, key: &str) -> Option<Granted> {
        if self
            .0
            .taken_back
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(waiter)
        {
            return None;
        }
        let turn = self.waiters().get(waiter).map(Arc::clone)?;
        let (expiry, fence) = turn
            .grant
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()?;
        let (sent, anchored) = (*turn.anchor.lock().unwrap_or_else(PoisonError::into_inner))?;
        let on_key = turn
            .anchored_on
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(|on| on.as_deref() == Some(key));
        (expiry == anchored && on_key).then_some(Granted { sent, fence })
    }

    /// An attempt of `waiter`, with a ttl of `ttl`, is being taken back: from now on (for the
    /// ttl and [`TAKE_BACK_SETTLED`] more, the take-back's re-sends included) the waiter holds
    /// no key given to it without asking: the take-back gives up whatever is reserved for the
    /// waiter, maybe after the grant was sent. Call it before the take-back is sent. Marks are
    /// pruned once past their time and more than [`TURN_PRUNE_ABOVE`] are kept (and twice what
    /// the previous prune left).
    pub fn taken_back(&self, waiter: &str, ttl: Duration) {
        let keep = ttl.saturating_add(TAKE_BACK_SETTLED);
        let mut marks = self
            .0
            .taken_back
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = std::time::Instant::now();
        if self.0.taken_back_pruned.due(marks.len()) {
            #[cfg(test)]
            self.0.taken_back_prunes.fetch_add(1, Ordering::Relaxed);
            marks.retain(|_, until| *until > now);
            self.0.taken_back_pruned.pruned(marks.len());
        }
        let until = now.checked_add(keep).unwrap_or(now);
        marks.insert(waiter.to_owned(), until);
    }

    /// Wakes every waiter (after a lost connection: messages may have been missed).
    pub fn wake_all(&self) {
        let all: Vec<Arc<Turn>> = self.waiters().values().map(Arc::clone).collect();
        for turn in all {
            turn.woken.store(true, Ordering::SeqCst);
            turn.notify.notify_one();
        }
    }

    /// Waits for `waiter`'s turn: a wake-up, the expiry of the holder it is first in line
    /// behind, or `max_wait`, whichever comes first. True when woken by a message.
    pub async fn wait(&self, waiter: &str, max_wait: Duration) -> bool {
        self.0.poll_us.store(
            u64::try_from(max_wait.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        let turn = self.turn(waiter);
        let mut until = tokio::time::Instant::now() + max_wait;
        if let Some(at) = *turn.retry_at.lock().unwrap_or_else(PoisonError::into_inner) {
            until = until.min(at);
        }
        tokio::select! {
            () = turn.notify.notified() => true,
            () = tokio::time::sleep_until(until) => false,
        }
    }

    /// How many waiters listen.
    pub fn len(&self) -> usize {
        self.waiters().len()
    }

    /// True when no waiter listens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_first_waiter_subscribes_and_the_subscription_lingers() {
        let registry = WakeRegistry::default();
        let unsubscribed = Arc::new(AtomicUsize::new(0));
        let counter = |unsubscribed: &Arc<AtomicUsize>| {
            let unsubscribed = Arc::clone(unsubscribed);
            move || -> Pin<Box<dyn Future<Output = ()> + Send>> {
                Box::pin(async move {
                    unsubscribed.fetch_add(1, Ordering::SeqCst);
                })
            }
        };
        let a = registry.register("k");
        let b = registry.register("k");
        assert!(a.subscribe && !b.subscribe);
        let waiting = Arc::clone(&b.notify);
        let woken = tokio::spawn(async move { waiting.notified().await });
        tokio::task::yield_now().await;
        registry.wake("k");
        woken.await.expect("woken");

        drop(a);
        registry.unregister("k", Box::new(counter(&unsubscribed)));
        drop(b);
        registry.unregister("k", Box::new(counter(&unsubscribed)));
        // A waiter back within the linger keeps the subscription.
        tokio::time::sleep(LINGER / 2).await;
        let c = registry.register("k");
        assert!(!c.subscribe, "the subscription is still in place");
        tokio::time::sleep(LINGER * 2).await;
        assert_eq!(unsubscribed.load(Ordering::SeqCst), 0);
        drop(c);
        registry.unregister("k", Box::new(counter(&unsubscribed)));
        tokio::time::sleep(LINGER * 2).await;
        assert_eq!(unsubscribed.load(Ordering::SeqCst), 1);
        assert!(registry.register("k").subscribe, "the channel starts over");

        registry.wake_all();
        assert!(
            registry.register("k").subscribe,
            "a lost connection forgets subscriptions"
        );
    }

    /// A registry that counts subscriptions made and retired.
    #[derive(Clone, Default)]
    struct Counts {
        subscribed: Arc<AtomicUsize>,
        unsubscribed: Arc<AtomicUsize>,
    }

    impl Counts {
        /// One wait on `k` whose subscription takes `subscribe_takes` (forever when `None`).
        async fn wait(
            &self,
            registry: &WakeRegistry,
            max_wait: Duration,
            subscribe_takes: Option<Duration>,
        ) {
            let (subscribed, unsubscribed) =
                (Arc::clone(&self.subscribed), Arc::clone(&self.unsubscribed));
            registry
                .wait(
                    "k",
                    max_wait,
                    async { None },
                    async move {
                        match subscribe_takes {
                            Some(takes) => tokio::time::sleep(takes).await,
                            None => std::future::pending().await,
                        }
                        subscribed.fetch_add(1, Ordering::SeqCst);
                        true
                    },
                    move || async move {
                        unsubscribed.fetch_add(1, Ordering::SeqCst);
                    },
                )
                .await;
        }
    }

    /// Promised (`WakeRegistry::wait`: "when it did not, the next waiter tries again"): a
    /// subscription that failed (the server was down at the first wait) is made by the next
    /// waiter, even while waiters keep coming within the linger.
    ///
    /// Broken before: the channel counted as subscribed after the first waiter's failed try, so
    /// that no later waiter subscribed while the channel stayed busy (push wake-ups gone for
    /// good under steady contention; `tests/tests/attack_s15c.rs` shows it on inc).
    #[tokio::test(start_paused = true)]
    async fn a_failed_subscription_is_made_by_the_next_waiter() {
        let registry = WakeRegistry::default();
        let tries = Arc::new(AtomicUsize::new(0));
        let wait = |works: bool| {
            let tries = Arc::clone(&tries);
            registry.wait(
                "k",
                Duration::from_millis(10),
                async { None },
                async move {
                    tries.fetch_add(1, Ordering::SeqCst);
                    works
                },
                || async {},
            )
        };
        // A second waiter stays registered throughout, so the channel never goes idle.
        let holder = registry.register("k");
        assert!(holder.subscribe);
        registry.subscription_abandoned("k");
        wait(false).await;
        assert_eq!(tries.load(Ordering::SeqCst), 1);
        wait(true).await;
        assert_eq!(
            tries.load(Ordering::SeqCst),
            2,
            "the waiter after a failed subscription did not try again"
        );
        wait(true).await;
        assert_eq!(
            tries.load(Ordering::SeqCst),
            2,
            "a channel subscribed once is subscribed again by every waiter"
        );
        drop(holder);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_wait_ends_its_registration() {
        let registry = WakeRegistry::default();
        let counts = Counts::default();
        let cancelled = tokio::time::timeout(
            Duration::from_millis(10),
            counts.wait(&registry, Duration::from_secs(60), Some(Duration::ZERO)),
        )
        .await;
        assert!(cancelled.is_err(), "the wait was to be cancelled");
        assert_eq!(counts.subscribed.load(Ordering::SeqCst), 1);
        tokio::time::sleep(LINGER * 2).await;
        assert_eq!(
            counts.unsubscribed.load(Ordering::SeqCst),
            1,
            "the subscription of a cancelled waiter was never retired"
        );
        assert!(
            registry
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_turn_sent_before_the_wait_is_kept_and_only_its_waiter_wakes() {
        let turns = TurnRegistry::default();
        turns.listen("a");
        turns.listen("b");
        assert!(turns.wake("a"), "a listens");
        assert!(!turns.wake("c"), "nobody listens as c");
        // Sent before the wait: kept.
        assert!(turns.wait("a", Duration::from_secs(60)).await);
        // b was not woken: its wait runs out.
        assert!(!turns.wait("b", Duration::from_millis(10)).await);
        // First in line behind a holder: the wait ends at its expiry.
        turns.first_in_line("b", Duration::from_millis(5));
        let started = tokio::time::Instant::now();
        assert!(!turns.wait("b", Duration::from_secs(60)).await);
        assert!(started.elapsed() < Duration::from_secs(1));
        turns.forget("a");
        turns.forget("b");
        assert!(turns.is_empty());
    }

    /// Several nodes each announce the same turn: the copies that arrive before the next
    /// attempt goes out (`listen`) are dropped, so that they do not end the wait after it at
    /// once; one that arrives after `listen` is kept.
    #[tokio::test(start_paused = true)]
    async fn a_turn_kept_from_before_the_next_attempt_is_dropped_by_listen() {
        let turns = TurnRegistry::default();
        turns.listen("a");
        assert!(turns.wake("a"));
        assert!(turns.wait("a", Duration::from_secs(60)).await);
        // A later copy of the same turn is kept until the next attempt's `listen`, which drops
        // it.
        assert!(turns.wake("a"));
        turns.listen("a");
        assert!(!turns.wait("a", Duration::from_millis(10)).await);
        turns.listen("a");
        assert!(turns.wake("a"));
        assert!(turns.wait("a", Duration::from_secs(60)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_subscription_left_unfinished_is_made_by_the_next_waiter() {
        let registry = WakeRegistry::default();
        let counts = Counts::default();
        // The first waiter's wait ends before its subscription is made.
        counts
            .wait(
                &registry,
                Duration::from_millis(5),
                Some(Duration::from_secs(1)),
            )
            .await;
        assert_eq!(counts.subscribed.load(Ordering::SeqCst), 0);
        let next = registry.register("k");
        assert!(
            next.subscribe,
            "the channel counts as subscribed though nobody finished subscribing"
        );
    }

    /// A grant is held only when it names the expiry of the waiter's latest attempt, and it
    /// carries the fencing token of a `<waiter>:<expiry>:<fence>` message; anything else in
    /// a message makes the turn one to ask for.
    #[tokio::test(start_paused = true)]
    async fn a_grant_names_the_latest_attempt_and_carries_its_fence() {
        let turns = TurnRegistry::default();
        turns.listen("w");
        let sent = tokio::time::Instant::now();
        turns.anchor("w", "k", sent, 1_000);
        assert!(turns.wake_message("w:999:7"));
        assert_eq!(turns.granted("w", "k"), None, "a grant of another expiry");
        assert!(turns.wake_message("w:1000:7"));
        assert_eq!(
            turns.granted("w", "other"),
            None,
            "a grant held on another key"
        );
        assert!(turns.wake_message("w:1000:7"));
        assert_eq!(
            turns.granted("w", "k"),
            Some(Granted {
                sent,
                fence: Some(7)
            })
        );
        assert_eq!(turns.granted("w", "k"), None, "a grant is taken once");
        assert!(turns.wake_message("w:1000"));
        assert_eq!(
            turns.granted("w", "k").and_then(|granted| granted.fence),
            None
        );
        assert!(turns.wake_message("w"));
        assert_eq!(turns.granted("w", "k"), None);
        for garbled in ["w:soon", "w:1000:x", "w:-1"] {
            assert!(!turns.wake_message(garbled), "{garbled}");
        }
        // A waiter id with `:` in it (the raw API's ids are the caller's) is woken, with its
        // grant.
        turns.listen("x:y");
        turns.anchor("x:y", "k", sent, 2_000);
        assert!(turns.wake_message("x:y"));
        assert!(turns.wake_message("x:y:2000:9"));
        assert_eq!(turns.granted("x:y", "k").and_then(|g| g.fence), Some(9));
        assert!(turns.wake_message("x:y:2000"));
        assert_eq!(turns.granted("x:y", "k").map(|g| g.fence), Some(None));
        // Attempts on two keys: no grant is held from then on, on either.
        turns.anchor("w", "k2", sent, 1_000);
        turns.anchor("w", "k", sent, 1_000);
        assert!(turns.wake_message("w:1000:7"));
        assert_eq!(turns.granted("w", "k"), None, "a waiter id on two keys");
        assert!(!turns.wake_message("other:1000:7"));
    }

    /// The negative control of the grant: once an attempt of the waiter is taken back, a grant
    /// that names its latest attempt is not held (the take-back gave the key up).
    #[tokio::test(start_paused = true)]
    async fn a_waiter_whose_attempt_was_taken_back_holds_no_grant() {
        let turns = TurnRegistry::default();
        turns.listen("w");
        turns.anchor("w", "k", tokio::time::Instant::now(), 1_000);
        turns.taken_back("w", Duration::from_secs(1));
        assert!(turns.wake_message("w:1000:7"));
        assert_eq!(turns.granted("w", "k"), None);
    }

    /// `taken_back` marks live a ttl and 10 s: 40 000 take-backs within a 30 s ttl (waits timing
    /// out at 1 000 a second) leave every mark live, and a prune at every insert past
    /// `TURN_PRUNE_ABOVE` scanned them all (quadratic: 8.7 s in a debug build). Counted, not
    /// timed: a prune comes only once the marks have doubled since the last one.
    #[test]
    fn many_take_backs_within_a_ttl_prune_a_logarithmic_number_of_times() {
        let turns = TurnRegistry::default();
        for n in 0..40_000 {
            turns.taken_back(&format!("waiter-{n}"), Duration::from_secs(30));
        }
        assert_eq!(
            turns
                .0
                .taken_back
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len(),
            40_000
        );
        let prunes = turns.0.taken_back_prunes.load(Ordering::Relaxed);
        // At 1 025, 2 051, 4 101, ..., 32 801 marks: six prunes (38 976 before the fix).
        assert!(prunes <= 8, "{prunes} prunes of live marks");
    }

    /// A waiter far back in line need not ask until twice its place's worth of round trips has
    /// passed (bounded by `at_most`), unless it is woken: by its turn, or by a lost connection
    /// (`wake_all`). Its next attempt's `listen` starts afresh.
    #[tokio::test(start_paused = true)]
    async fn a_waiter_far_back_is_behind_until_its_place_s_round_trips_pass_or_it_is_woken() {
        let turns = TurnRegistry::default();
        let rtt = Duration::from_millis(10);
        assert!(!turns.still_behind("w"), "unknown waiter");
        turns.listen("w");
        assert!(!turns.still_behind("w"), "no place said yet");
        // No message came on the client's channel yet: nothing shows a wake-up would reach it.
        turns.behind("w", 5, rtt, Duration::from_secs(10));
        assert!(!turns.still_behind("w"), "never heard a message");
        assert!(!turns.wake_message("someone else"));
        turns.behind("w", 5, rtt, Duration::from_secs(10));
        assert!(turns.still_behind("w"));
        tokio::time::advance(Duration::from_millis(99)).await;
        assert!(turns.still_behind("w"));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!turns.still_behind("w"), "2 × 5 × 10 ms passed");
        // Capped.
        turns.behind("w", 1_000, rtt, Duration::from_millis(30));
        tokio::time::advance(Duration::from_millis(30)).await;
        assert!(!turns.still_behind("w"));
        // Woken by its turn: asks at once.
        turns.behind("w", 5, rtt, Duration::from_secs(10));
        assert!(turns.wake("w"));
        assert!(!turns.still_behind("w"));
        // The next attempt listens afresh, and is told its place again.
        turns.listen("w");
        assert!(!turns.still_behind("w"));
        turns.behind("w", 5, rtt, Duration::from_secs(10));
        assert!(turns.still_behind("w"));
        // A lost connection wakes everyone: they ask.
        turns.wake_all();
        assert!(!turns.still_behind("w"));
        // The second in line (place 1) waits two round trips at most; the first is never behind.
        turns.listen("w");
        turns.behind("w", 1, rtt, Duration::from_secs(10));
        tokio::time::advance(Duration::from_millis(20)).await;
        assert!(!turns.still_behind("w"));
        turns.listen("w");
        turns.behind("w", 0, rtt, Duration::from_secs(10));
        assert!(!turns.still_behind("w"));
        turns.forget("w");
        assert!(!turns.still_behind("w"));
    }

    /// The first place worth telling: none before a message was heard, every place until a
    /// round trip and a wait are known, then from where the deferral (2 × place × round trip)
    /// would exceed half the poll's wait.
    #[tokio::test(start_paused = true)]
    async fn a_place_is_told_only_where_its_deferral_could_outlast_the_next_poll() {
        let turns = TurnRegistry::default();
        turns.answered(Duration::from_micros(100));
        assert_eq!(
            turns.tell_place_from(Duration::from_secs(10)),
            u64::MAX,
            "nothing heard yet"
        );
        turns.listen("w");
        assert!(turns.wake_message("w"));
        assert_eq!(
            turns.tell_place_from(Duration::from_secs(10)),
            1,
            "no wait known yet"
        );
        // A 200 ms wait on a 100 µs round trip: 2 × 501 × 0.1 ms > 100 ms.
        // (The message above is kept for this wait, which returns at once.)
        turns.wait("w", Duration::from_millis(200)).await;
        assert_eq!(turns.tell_place_from(Duration::from_secs(10)), 501);
        // A 1 ms link (round trips of 2 ms): from the 26th place.
        turns.answered(Duration::from_millis(2));
        assert_eq!(turns.tell_place_from(Duration::from_secs(10)), 26);
        // A round trip longer than the wait: every place.
        turns.answered(Duration::from_millis(300));
        assert_eq!(turns.tell_place_from(Duration::from_secs(10)), 1);
        // Recorded by `behind` too.
        turns.behind("w", 3, Duration::from_millis(1), Duration::from_secs(10));
        assert_eq!(turns.tell_place_from(Duration::from_secs(10)), 51);
        // A cap under half the wait (a ttl of 400 ms: 100 ms against a 200 ms poll): none.
        assert_eq!(turns.tell_place_from(Duration::from_millis(100)), u64::MAX);
        assert_eq!(turns.tell_place_from(Duration::from_millis(101)), 51);
    }
}

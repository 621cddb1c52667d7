//! The contract between the core and a backend: [`Lock`] and [`Handle`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{LockError, Result};
use crate::key::{Key, KeySet};
use crate::lease::Lease;
use crate::token::Token;

/// What a backend can do beyond taking and releasing a lock; the core and the conformance suite
/// read these flags to choose behaviour and test cases.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// [`Handle::extend`] works (otherwise it returns [`LockError::Unsupported`]).
    pub extend: bool,
    /// The backend's natural mode is to answer "locked" at once: the core then defaults to a
    /// single attempt (see [`RetryPolicy::none`](crate::RetryPolicy::none)).
    pub fail_fast: bool,
    /// [`Lock::purge`] removes every lock under a prefix.
    pub purge: bool,
    /// Locks are shared between processes and machines (not only tasks of one process).
    pub distributed: bool,
    /// [`LockRequest`]s may name several keys, taken all-or-nothing.
    pub multi_key: bool,
    /// [`Lease::fencing_token`] returns strictly increasing numbers per key.
    pub fencing: bool,
    /// [`Lock::wait_for_release`] returns early when a key is released or expires, so waiters
    /// do not poll.
    pub wake_on_release: bool,
    /// Semaphores: requests of kind [`LeaseKind::Permit`] are served, at most `permits` holders
    /// at once per key.
    pub semaphore: bool,
    /// Read-write locks: requests of kind [`LeaseKind::Read`] and [`LeaseKind::Write`] are
    /// served, and [`Handle::downgrade`] works.
    pub read_write: bool,
    /// Waiters of every client of the store (across processes, for a store shared between
    /// them) are served first come, first served: a waiting mutex request on one key (one that
    /// carries a [`LockRequest::waiter`]) that finds the key held joins a line in the store,
    /// which the core takes back by [`Lock::abandon`] when the waiter stops waiting, and
    /// [`Lock::wait_for_turn`] returns when its turn comes. For a store in this process (not
    /// [`Capabilities::distributed`]) the core names the first attempt's own token as the
    /// waiter (an uncontended acquisition draws no second token), and the same waiter in the
    /// attempts after it. A wrapper of another `Lock` that reports `fair` must forward
    /// [`Lock::wait_for_turn`] and [`Lock::abandon`] too (the trait's default waits for a
    /// release, which a line's turn is not: the first in line would wait for its poll), or
    /// clear `fair`.
    pub fair: bool,
}

impl Capabilities {
    /// No capability at all: a plain lock with ttl and token-checked release.
    pub const NONE: Self = Self {
        extend: false,
        fail_fast: false,
        purge: false,
        distributed: false,
        multi_key: false,
        fencing: false,
        wake_on_release: false,
        semaphore: false,
        read_write: false,
        fair: false,
    };

    /// Adds [`Capabilities::extend`].
    #[must_use]
    pub const fn with_extend(mut self) -> Self {
        self.extend = true;
        self
    }

    /// Adds [`Capabilities::fail_fast`].
    #[must_use]
    pub const fn with_fail_fast(mut self) -> Self {
        self.fail_fast = true;
        self
    }

    /// Adds [`Capabilities::purge`].
    #[must_use]
    pub const fn with_purge(mut self) -> Self {
        self.purge = true;
        self
    }

    /// Adds [`Capabilities::distributed`].
    #[must_use]
    pub const fn with_distributed(mut self) -> Self {
        self.distributed = true;
        self
    }

    /// Adds [`Capabilities::multi_key`].
    #[must_use]
    pub const fn with_multi_key(mut self) -> Self {
        self.multi_key = true;
        self
    }

    /// Adds [`Capabilities::fencing`].
    #[must_use]
    pub const fn with_fencing(mut self) -> Self {
        self.fencing = true;
        self
    }

    /// Adds [`Capabilities::wake_on_release`].
    #[must_use]
    pub const fn with_wake_on_release(mut self) -> Self {
        self.wake_on_release = true;
        self
    }

    /// Adds [`Capabilities::semaphore`].
    #[must_use]
    pub const fn with_semaphore(mut self) -> Self {
        self.semaphore = true;
        self
    }

    /// Adds [`Capabilities::read_write`].
    #[must_use]
    pub const fn with_read_write(mut self) -> Self {
        self.read_write = true;
        self
    }

    /// Adds [`Capabilities::fair`].
    #[must_use]
    pub const fn with_fair(mut self) -> Self {
        self.fair = true;
        self
    }

    /// Whether a backend with these capabilities serves requests of `kind`; when not, the
    /// capability that is missing, as [`LockError::Unsupported`] names it.
    pub fn serves(&self, kind: LeaseKind) -> std::result::Result<(), &'static str> {
        match kind {
            LeaseKind::Exclusive => Ok(()),
            LeaseKind::Permit { .. } if self.semaphore => Ok(()),
            LeaseKind::Permit { .. } => Err("semaphores"),
            LeaseKind::Read | LeaseKind::Write if self.read_write => Ok(()),
            LeaseKind::Read | LeaseKind::Write => Err("read-write locks"),
        }
    }
}

/// What kind of lease a request asks for: the one thing that tells a mutex, a semaphore permit
/// and the two sides of a read-write lock apart. Everything else (ttl, extend, release,
/// `keep_alive`, fencing, cancel safety, the retry policy) is the same for all of them.
///
/// A key is used as one kind of lock by every client: a backend that finds a key held as
/// another kind (a semaphore of another size, a read-write lock asked for as a mutex) refuses
/// with [`LockError::KindMismatch`] or treats the key as held; it never admits both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LeaseKind {
    /// A mutex: one holder at a time.
    #[default]
    Exclusive,
    /// One permit of a semaphore: at most `permits` holders at a time. Every client of the key
    /// must ask with the same number.
    Permit {
        /// How many holders the semaphore admits at once.
        permits: std::num::NonZeroU32,
    },
    /// The shared side of a read-write lock: any number of readers together, never with a
    /// writer. A writer that waits keeps new readers out, so writers are not starved.
    Read,
    /// The exclusive side of a read-write lock: one writer, no reader.
    Write,
}

impl LeaseKind {
    /// A permit of a semaphore of `permits` holders.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming `permits` when it is 0 or above
    /// [`MAX_PERMITS`](crate::raw::validate::MAX_PERMITS).
    pub fn permit(permits: u32) -> Result<Self> {
        let permits = crate::raw::validate::permits("permits", permits)?;
        Ok(Self::Permit { permits })
    }

    /// True for the kinds that admit one holder only (a mutex and a writer).
    pub fn is_exclusive(&self) -> bool {
        matches!(self, Self::Exclusive | Self::Write)
    }

    /// How many holders may hold a key together under this kind (`u32::MAX` for readers).
    pub fn holders(&self) -> u32 {
        match self {
            Self::Exclusive | Self::Write => 1,
            Self::Permit { permits } => permits.get(),
            Self::Read => u32::MAX,
        }
    }
}

impl fmt::Display for LeaseKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exclusive => f.write_str("a mutex"),
            Self::Permit { permits } => write!(f, "a semaphore of {permits} permit(s)"),
            Self::Read => f.write_str("a read-write lock (read)"),
            Self::Write => f.write_str("a read-write lock (write)"),
        }
    }
}

/// One acquisition attempt, as the core hands it to a backend.
///
/// Keys are validated and namespaced, there is at least one, the ttl is within bounds and the
/// token is fresh.
#[derive(Clone, Debug)]
pub struct LockRequest {
    keys: KeySet,
    token: Token,
    ttl: Duration,
    after_wait: bool,
    will_wait: bool,
    kind: LeaseKind,
    waiter: Option<Token>,
    /// The waiter is this attempt's own token (see `LockRequest::name_own_waiter`).
    own_waiter: bool,
    acquisition: u64,
}

impl LockRequest {
    /// Builds a request, checking the ttl.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming `ttl`.
    pub fn new(keys: KeySet, token: Token, ttl: Duration) -> Result<Self> {
        crate::raw::validate::ttl("ttl", ttl)?;
        Ok(Self::prevalidated(keys, token, ttl))
    }

    /// For the core, whose options were validated when they were set.
    /// An attempt of the core's, built in one go: its inputs were validated when they were set.
    #[inline]
    pub(crate) fn attempt(
        keys: KeySet,
        token: Token,
        ttl: Duration,
        kind: LeaseKind,
        after_wait: bool,
        will_wait: bool,
        waiter: Option<Token>,
    ) -> Self {
        Self {
            keys,
            token,
            ttl,
            after_wait,
            will_wait,
            kind,
            waiter,
            own_waiter: false,
            acquisition: 0,
        }
    }

    #[inline]
    pub(crate) fn prevalidated(keys: KeySet, token: Token, ttl: Duration) -> Self {
        Self {
            keys,
            token,
            ttl,
            after_wait: false,
            will_wait: false,
            kind: LeaseKind::Exclusive,
            waiter: None,
            own_waiter: false,
            acquisition: 0,
        }
    }

    /// Names the waiter this attempt belongs to: a random id that stays the same across every
    /// attempt of one acquisition (each attempt has a fresh token), by which a backend with
    /// [`Capabilities::fair`] keeps the waiter's place in line. The core sets it on waiting
    /// mutex requests on one key to such a backend.
    #[must_use]
    pub fn with_waiter(mut self, waiter: Token) -> Self {
        self.waiter = Some(waiter);
        self.own_waiter = false;
        self
    }

    /// The waiter this attempt belongs to, if it waits in line (see [`LockRequest::with_waiter`]).
    #[inline]
    pub fn waiter(&self) -> Option<&Token> {
        if self.own_waiter {
            return Some(&self.token);
        }
        self.waiter.as_ref()
    }

    /// Names this attempt's own token as its waiter (the core's first attempt on an in-process
    /// fair store: no second token drawn, nor copied, on the uncontended path).
    #[inline]
    pub(crate) fn name_own_waiter(&mut self) {
        self.own_waiter = true;
    }

    /// Names the acquisition this attempt belongs to: a number that stays the same across
    /// every attempt of one acquisition of this process and differs between acquisitions (0
    /// when unset). The core sets it on requests to a [`Capabilities::distributed`] store, so
    /// that a backend can tell the leftovers of one waiting writer's earlier attempts (each has
    /// a fresh token) from those of another writer of the process.
    #[must_use]
    #[inline]
    pub fn with_acquisition(mut self, acquisition: u64) -> Self {
        self.acquisition = acquisition;
        self
    }

    /// The acquisition this attempt belongs to (see [`LockRequest::with_acquisition`]).
    pub fn acquisition(&self) -> u64 {
        self.acquisition
    }

    /// Marks an attempt whose caller will wait and try again if it finds the keys held (as
    /// opposed to a single try). A writer that will wait may leave a claim that keeps new
    /// readers out (see [`LeaseKind::Write`]); a single try leaves nothing.
    #[must_use]
    pub fn with_will_wait(mut self, will_wait: bool) -> Self {
        self.will_wait = will_wait;
        self
    }

    /// True when the caller will wait and try again if this attempt finds the keys held.
    pub fn will_wait(&self) -> bool {
        self.will_wait
    }

    /// Sets the kind of lease asked for ([`LeaseKind::Exclusive`] unless set).
    #[must_use]
    pub fn with_kind(mut self, kind: LeaseKind) -> Self {
        self.kind = kind;
        self
    }

    /// The kind of lease asked for. The core sends a kind other than
    /// [`LeaseKind::Exclusive`] only to a backend whose [`Capabilities`] serve it.
    #[inline]
    pub fn kind(&self) -> LeaseKind {
        self.kind
    }

    /// Marks an attempt that follows a wait for the same keys. Backends that hold a released
    /// key back for its waiters (first come, first served) let such attempts in.
    #[must_use]
    pub fn with_after_wait(mut self, after_wait: bool) -> Self {
        self.after_wait = after_wait;
        self
    }

    /// The keys to take, all or none; one unless the backend has [`Capabilities::multi_key`].
    #[inline]
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// The keys as a cheaply cloned set, for handles that keep them.
    #[inline]
    pub fn key_set(&self) -> &KeySet {
        &self.keys
    }

    /// The first key, used to name the lock in messages and spans.
    pub fn primary_key(&self) -> &Key {
        self.keys.primary()
    }

    /// The fresh random value to store as proof of ownership.
    #[inline]
    pub fn token(&self) -> &Token {
        &self.token
    }

    /// How long the lock lives unless extended.
    #[inline]
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// True when this attempt follows a wait for the same keys.
    #[inline]
    pub fn after_wait(&self) -> bool {
        self.after_wait
    }
}

/// What one node of a store says about a key, for status displays (never the token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyState {
    /// The node, as `host:port` (or `local` in process).
    pub node: String,
    /// Which server runs there and its version (`redis 7.0.15`, `valkey 8.0.1`), when known.
    pub server: Option<String>,
    /// Held or free, and for how long.
    pub holding: Holding,
}

/// Whether a key is held on one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holding {
    /// Nobody holds it there.
    Free,
    /// Somebody holds it, for `ttl` more (`None`: no expiry set).
    Held {
        /// Time left before it expires.
        ttl: Option<Duration>,
    },
    /// The node could not be asked.
    Unknown(String),
}

/// What [`Lock::try_acquire`] answers: the handle of the lock taken, or `None` when another
/// holder has a key.
pub type Acquired = Result<Option<Box<dyn Handle>>>;

/// The one answer of a backend's operation ([`Lock::try_acquire`], [`Lock::abandon`],
/// [`Handle::release`]): a future, which is either already decided (a store in this process
/// answers in the call, with no allocation: [`Answer::ready`]) or a boxed future that does the
/// I/O ([`Answer::later`]).
///
/// The core awaits it like any future. Where it cannot await (a guard dropped outside a
/// runtime, a cancelled attempt's clean-up) it takes a decided answer at once with
/// [`Answer::now`], and otherwise drops the answer unpolled and asks again from a task; the
/// first attempt of an acquisition on a store that is not
/// [`distributed`](Capabilities::distributed) is asked in the acquisition's first poll, and an
/// answer that needs awaiting is dropped unpolled and asked again with the same request. So an
/// operation that answers with [`Answer::later`] must do nothing before that future is first
/// polled: neither the future (an `async` block does nothing until then) nor the call that
/// made it. A wrapper around another backend calls it inside its own future, or hands a
/// decided answer on as decided.
#[must_use = "an answer does nothing unless awaited or taken with `now`"]
pub struct Answer<'a, T>(Decided<'a, T>);

enum Decided<'a, T> {
    Ready(T),
    Later(Pin<Box<dyn Future<Output = T> + Send + 'a>>),
    /// Awaited to its end.
    Spent,
}

impl<'a, T> Answer<'a, T> {
    /// An answer decided in the call: awaiting it returns `value` in its first poll.
    #[inline]
    pub fn ready(value: T) -> Self {
        Self(Decided::Ready(value))
    }

    /// An answer that needs I/O: `future`, boxed. It must do nothing before it is first polled
    /// (see [`Answer`]).
    pub fn later(future: impl Future<Output = T> + Send + 'a) -> Self {
        Self(Decided::Later(Box::pin(future)))
    }

    /// The value of an answer decided in the call; `None` (and the answer dropped unpolled)
    /// when it needs awaiting.
    #[inline]
    pub fn into_ready(self) -> Option<T> {
        match self.0 {
            Decided::Ready(value) => Some(value),
            Decided::Later(_) | Decided::Spent => None,
        }
    }

    /// The value of an answer decided in the call, or the answer back when it needs awaiting.
    ///
    /// # Errors
    /// The answer itself, when it was made by [`Answer::later`] (or already awaited).
    #[inline]
    pub fn now(self) -> std::result::Result<T, Self> {
        match self.0 {
            Decided::Ready(value) => Ok(value),
            other => Err(Self(other)),
        }
    }
}

// The value is only ever moved out, never pinned in place.
impl<T> Unpin for Answer<'_, T> {}

impl<T> Future for Answer<'_, T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<T> {
        let this = self.get_mut();
        if let Decided::Later(future) = &mut this.0 {
            return future.as_mut().poll(cx);
        }
        match std::mem::replace(&mut this.0, Decided::Spent) {
            Decided::Ready(value) => std::task::Poll::Ready(value),
            _ => panic!("an answer is awaited once"),
        }
    }
}

impl<T> fmt::Debug for Answer<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Decided::Ready(_) => "Answer::Ready",
            Decided::Later(_) => "Answer::Later",
            Decided::Spent => "Answer::Spent",
        })
    }
}

/// A lock backend: one attempt at a time, never a sleep or a retry loop on the caller's path
/// (what must reach every node is sent again in the background, by a
/// [`FollowUp`](crate::raw::FollowUp)).
///
/// The retry policy, deadline, token generation, namespacing and tracing live once, in
/// [`Locker`](crate::Locker); a backend implements the primitives below. Use it as
/// `Arc<dyn Lock>`.
///
/// # Behavior
/// - `try_acquire` returns `Ok(None)` when another holder has any of the keys, and leaves
///   nothing behind in that case (a partial acquisition is undone before returning).
/// - Every operation that changes a lock compares the stored token with the caller's, so a
///   holder whose lock expired can neither release nor extend the next holder's lock.
/// - Errors are mapped into [`LockError`] and contain no secrets.
/// - No call blocks its thread beyond a short critical section: a tokio worker blocked in a
///   backend (one that was driving the runtime's timers) can keep every timer from firing
///   until it is let go, and with them every bounded wait of the core (deadlines, `stop`'s
///   [`CLEANUP_WAIT`](crate::CLEANUP_WAIT)).
#[async_trait]
pub trait Lock: Send + Sync + fmt::Debug + 'static {
    /// A short name for messages and spans (`memory`, `redlock`, `inc`…); read once by each
    /// [`Locker`](crate::Locker) made over the backend.
    fn name(&self) -> &'static str;

    /// What this backend supports; constant, read once by each [`Locker`](crate::Locker) made
    /// over the backend.
    fn capabilities(&self) -> Capabilities;

    /// Makes one attempt to take every key of `request`.
    ///
    /// A store in this process answers with [`Answer::ready`]; one that needs I/O with
    /// [`Answer::later`], and then does nothing in the call itself: the core may drop that
    /// answer unpolled and ask again with the same request (see [`Answer`]).
    ///
    /// # Errors
    /// [`LockError::Backend`] or [`LockError::QuorumNotReached`] when the store failed; being held
    /// by someone else is `Ok(None)`, not an error.
    fn try_acquire<'a>(&'a self, request: &'a LockRequest) -> Answer<'a, Acquired>;

    /// Removes whatever the attempt `request` may have left on its keys, compared by its token:
    /// a lock (of the request's kind) or a writer's claim to be next
    /// ([`LeaseKind::Write`] attempts that found readers).
    ///
    /// The core calls it when an attempt was cancelled mid-flight or its outcome is unknown
    /// (a timed-out write may still have landed), and when a writer stops waiting. Returns
    /// whether anything was removed. An answer decided in the call ([`Answer::ready`]) is taken
    /// at once, so that what a cancelled or finished attempt left (a writer's claim above all)
    /// is gone by the time the caller's next line runs, even when the future is dropped outside
    /// a runtime, where no background clean-up can run.
    ///
    /// # Errors
    /// [`LockError::Backend`] when the store cannot be reached.
    fn abandon<'a>(&'a self, request: &'a LockRequest) -> Answer<'a, Result<bool>>;

    /// Waits until one of `keys` may have become free, or `max_wait` has passed.
    ///
    /// The default sleeps for `max_wait`; backends with [`Capabilities::wake_on_release`]
    /// return early when a key is released or expires.
    ///
    /// # Errors
    /// None by default; backends may report a broken notification channel.
    async fn wait_for_release(&self, keys: &[Key], max_wait: Duration) -> Result<()> {
        let _ = keys;
        tokio::time::sleep(max_wait).await;
        Ok(())
    }

    /// Waits until the turn of the waiter `request` belongs to may have come, or `max_wait` has
    /// passed; `request` is the waiter's latest attempt, which found the key held.
    ///
    /// The default is [`Lock::wait_for_release`] on the request's keys; a backend with
    /// [`Capabilities::fair`] returns when the waiter is woken for its turn (a message meant
    /// for it alone), when the holder it found expires if it is first in line, or after
    /// `max_wait` (the retry delay: the fallback should a message be lost). It returns
    /// `Ok(true)` when woken for the turn, which the core always follows with an attempt (the
    /// time alone cannot tell: a message handled just after the wait's end was due, before its
    /// timer fired, must not be taken for the end of the wait), `Ok(false)` otherwise.
    ///
    /// # Errors
    /// As [`Lock::wait_for_release`].
    async fn wait_for_turn(&self, request: &LockRequest, max_wait: Duration) -> Result<bool> {
        self.wait_for_release(request.keys(), max_wait)
            .await
            .map(|()| false)
    }

    /// Removes every lock whose key starts with `prefix` and returns how many were removed.
    ///
    /// # Errors
    /// [`LockError::Unsupported`] unless the backend has [`Capabilities::purge`].
    async fn purge(&self, prefix: &str) -> Result<u64> {
        let _ = prefix;
        Err(LockError::Unsupported {
            backend: self.name(),
            capability: "purge",
        })
    }

    /// Reports, per node, whether `key` is held and for how long (never by whom).
    ///
    /// # Errors
    /// [`LockError::Unsupported`] for backends that cannot tell.
    async fn inspect(&self, key: &Key) -> Result<Vec<KeyState>> {
        let _ = key;
        Err(LockError::Unsupported {
            backend: self.name(),
            capability: "inspect",
        })
    }

    /// Frees connections and background tasks. Locks still held expire with their ttl.
    ///
    /// # Errors
    /// [`LockError::Backend`] if closing failed.
    async fn shutdown(&self) -> Result<()> {
        Ok(())
    }
}

/// One held lock, as a backend returns it.
///
/// Users hold it through [`LockGuard`](crate::LockGuard), which adds release-on-drop.
///
/// # Behavior
/// - `extend` sets the expiry to now + ttl, only while the stored token is still ours, and
///   moves the validity of [`Handle::lease`]; a failed extend leaves it as it was (or ends it,
///   [`Lease::set_valid_until`] with now, when the lock is left in doubt).
/// - `release` deletes the lock only while the stored token is still ours.
/// - Both return [`LockError::NotHeld`] once the lock expired or was taken over.
#[async_trait]
pub trait Handle: Send + Sync + fmt::Debug {
    /// The lease held: keys (namespaced as stored), kind, token, validity and fencing token,
    /// built with [`Lease::new`] from the request that was granted.
    ///
    /// The handle keeps it up to date, and it is the only place these live: `extend` moves
    /// its validity ([`Lease::set_valid_until`]) and `downgrade` its kind
    /// ([`Lease::set_downgraded`]). The guard, the watchdog and the waiters of this process
    /// all read them from here.
    fn lease(&self) -> &Lease;

    /// Sets the lock's expiry to now + `ttl`.
    ///
    /// # Errors
    /// [`LockError::NotHeld`] if the lock was lost, [`LockError::Unsupported`] without the extend
    /// capability, [`LockError::Backend`] on failure.
    async fn extend(&mut self, ttl: Duration) -> Result<()>;

    /// Releases the lock. An answer decided in the call ([`Answer::ready`]) is taken at once
    /// by the guard, so an in-process lock is freed even when its guard is dropped outside a
    /// tokio runtime.
    ///
    /// # Errors
    /// [`LockError::NotHeld`] if the lock had already expired or been taken over,
    /// [`LockError::Backend`] on failure.
    fn release(&mut self) -> Answer<'_, Result<()>>;

    /// Turns a held write lock ([`LeaseKind::Write`]) into a read lock on the same keys, with
    /// no moment in between where another writer could enter, and records it in the lease
    /// ([`Lease::set_downgraded`]). The expiry and the fencing token stay as they were. The core calls it only on a write lock of a backend with
    /// [`Capabilities::read_write`].
    ///
    /// # Errors
    /// [`LockError::NotHeld`] if the lock was lost, [`LockError::Unsupported`] by default,
    /// [`LockError::Backend`] on failure.
    async fn downgrade(&mut self) -> Result<()> {
        Err(LockError::Unsupported {
            backend: "this",
            capability: "downgrade",
        })
    }
}

#[async_trait]
impl<L: Lock + ?Sized> Lock for Arc<L> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }

    fn try_acquire<'a>(&'a self, request: &'a LockRequest) -> Answer<'a, Acquired> {
        (**self).try_acquire(request)
    }

    fn abandon<'a>(&'a self, request: &'a LockRequest) -> Answer<'a, Result<bool>> {
        (**self).abandon(request)
    }

    async fn wait_for_release(&self, keys: &[Key], max_wait: Duration) -> Result<()> {
        (**self).wait_for_release(keys, max_wait).await
    }

    async fn wait_for_turn(&self, request: &LockRequest, max_wait: Duration) -> Result<bool> {
        (**self).wait_for_turn(request, max_wait).await
    }

    async fn purge(&self, prefix: &str) -> Result<u64> {
        (**self).purge(prefix).await
    }

    async fn inspect(&self, key: &Key) -> Result<Vec<KeyState>> {
        (**self).inspect(key).await
    }

    async fn shutdown(&self) -> Result<()> {
        (**self).shutdown().await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_ready_answer_is_taken_at_once_and_a_later_one_is_handed_back() {
        assert_eq!(Answer::<'_, u32>::ready(7).now().unwrap(), 7);
        assert_eq!(Answer::<'_, u32>::ready(7).into_ready(), Some(7));
        let later = Answer::<'_, u32>::later(async { 8 });
        assert_eq!(format!("{later:?}"), "Answer::Later");
        let later = later.now().unwrap_err();
        assert_eq!(Answer::<'_, u32>::later(async { 8 }).into_ready(), None);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(
            runtime.block_on(later),
            8,
            "the answer handed back still answers"
        );
        assert_eq!(runtime.block_on(Answer::ready(9)), 9);
    }

    #[test]
    fn a_ready_answer_completes_in_its_first_poll() {
        let mut answer = Answer::<'_, u32>::ready(3);
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        assert_eq!(
            Pin::new(&mut answer).poll(&mut context),
            std::task::Poll::Ready(3)
        );
        assert_eq!(format!("{answer:?}"), "Answer::Spent");
    }
}

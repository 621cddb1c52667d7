//! The contract between the core and a backend: [`Lock`] and [`Handle`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::error::{LockError, Result};
use crate::key::{Key, KeySet};
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
    /// [`Handle::fencing_token`] returns strictly increasing numbers per key.
    pub fencing: bool,
    /// [`Lock::wait_for_release`] returns early when a key is released or expires, so waiters
    /// do not poll.
    pub wake_on_release: bool,
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
}

impl LockRequest {
    /// Builds a request, checking the ttl.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming `ttl`.
    pub fn new(keys: KeySet, token: Token, ttl: Duration) -> Result<Self> {
        crate::validate::ttl("ttl", ttl)?;
        Ok(Self::prevalidated(keys, token, ttl))
    }

    /// For the core, whose options were validated when they were set.
    pub(crate) fn prevalidated(keys: KeySet, token: Token, ttl: Duration) -> Self {
        Self {
            keys,
            token,
            ttl,
            after_wait: false,
        }
    }

    /// Marks an attempt that follows a wait for the same keys. Backends that hold a released
    /// key back for its waiters (first come, first served) let such attempts in.
    #[must_use]
    pub fn with_after_wait(mut self, after_wait: bool) -> Self {
        self.after_wait = after_wait;
        self
    }

    /// The keys to take, all or none; one unless the backend has [`Capabilities::multi_key`].
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// The keys as a cheaply cloned set, for handles that keep them.
    pub fn key_set(&self) -> &KeySet {
        &self.keys
    }

    /// The first key, used to name the lock in messages and spans.
    pub fn primary_key(&self) -> &Key {
        self.keys.primary()
    }

    /// The fresh random value to store as proof of ownership.
    pub fn token(&self) -> &Token {
        &self.token
    }

    /// How long the lock lives unless extended.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// True when this attempt follows a wait for the same keys.
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

/// The server and version an `INFO server` report names, as `name version` (`valkey 8.0.1`,
/// `redis 7.0.15`), for [`KeyState::server`].
///
/// Valkey reports `redis_version:7.2.4` whatever its release, for compatibility: its own name
/// and version are in `server_name` and `valkey_version`, which are read first.
pub fn server_from_info(info: &str) -> Option<String> {
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.trim_end().strip_prefix(name)?.strip_prefix(':'))
            .map(str::to_owned)
    };
    let name = field("server_name").unwrap_or_else(|| "redis".to_owned());
    let version = field(&format!("{name}_version")).or_else(|| field("redis_version"))?;
    Some(format!("{name} {version}"))
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

/// A lock backend: one attempt at a time, never a sleep or a retry loop.
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
#[async_trait]
pub trait Lock: Send + Sync + fmt::Debug + 'static {
    /// A short name for messages and spans (`memory`, `redlock`, `inc`…).
    fn name(&self) -> &'static str;

    /// What this backend supports.
    fn capabilities(&self) -> Capabilities;

    /// Makes one attempt to take every key of `request`.
    ///
    /// # Errors
    /// [`LockError::Backend`] or [`LockError::QuorumNotReached`] when the store failed; being held
    /// by someone else is `Ok(None)`, not an error.
    async fn try_acquire(&self, request: &LockRequest) -> Result<Option<Box<dyn Handle>>>;

    /// Makes one attempt without awaiting, for stores that answer without I/O (locks in this
    /// process); `None` means "ask [`Lock::try_acquire`]", which is the default.
    ///
    /// The core tries this first: it spares an in-process backend a boxed future per attempt.
    /// Where it answers, it must answer exactly as `try_acquire` would.
    ///
    /// # Errors
    /// As [`Lock::try_acquire`].
    fn try_acquire_now(&self, request: &LockRequest) -> Option<Result<Option<Box<dyn Handle>>>> {
        let _ = request;
        None
    }

    /// Removes whatever an attempt with `token` may have left on `keys`, compared by token.
    ///
    /// The core calls it when an attempt was cancelled mid-flight or its outcome is unknown
    /// (a timed-out write may still have landed). Returns whether anything was removed.
    ///
    /// # Errors
    /// [`LockError::Backend`] when the store cannot be reached.
    async fn abandon(&self, keys: &[Key], token: &Token) -> Result<bool>;

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
///   updates [`Handle::valid_until`].
/// - `release` deletes the lock only while the stored token is still ours.
/// - Both return [`LockError::NotHeld`] once the lock expired or was taken over.
#[async_trait]
pub trait Handle: Send + Sync + fmt::Debug {
    /// The keys held, namespaced as stored.
    fn keys(&self) -> &[Key];

    /// The token that proves ownership.
    fn token(&self) -> &Token;

    /// The local instant until which the lock is safe to rely on (a monotonic clock, with
    /// clock drift and the time spent acquiring already taken off).
    fn valid_until(&self) -> Instant;

    /// A number that strictly increases with every acquisition of the same key, for backends with
    /// [`Capabilities::fencing`]; pass it to the protected resource so it can refuse stale writers.
    fn fencing_token(&self) -> Option<u64> {
        None
    }

    /// Sets the lock's expiry to now + `ttl`.
    ///
    /// # Errors
    /// [`LockError::NotHeld`] if the lock was lost, [`LockError::Unsupported`] without the extend
    /// capability, [`LockError::Backend`] on failure.
    async fn extend(&mut self, ttl: Duration) -> Result<()>;

    /// Releases the lock.
    ///
    /// # Errors
    /// [`LockError::NotHeld`] if the lock had already expired or been taken over,
    /// [`LockError::Backend`] on failure.
    async fn release(&mut self) -> Result<()>;

    /// Releases without awaiting, for locks in this process; `None` means "call
    /// [`Handle::release`]", which is the default.
    ///
    /// The guard tries this first, so an in-process lock is freed without a boxed future, and
    /// at once even when its guard is dropped outside a tokio runtime. Where it answers, it
    /// must answer exactly as `release` would.
    ///
    /// # Errors
    /// As [`Handle::release`].
    fn release_now(&mut self) -> Option<Result<()>> {
        None
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

    // Written out as `async_trait` expands it, to hand on the backend's boxed future instead of
    // boxing it once more (this is the hot path of an `Arc` passed as a backend).
    fn try_acquire<'life0, 'life1, 'async_trait>(
        &'life0 self,
        request: &'life1 LockRequest,
    ) -> Pin<Box<dyn Future<Output = Result<Option<Box<dyn Handle>>>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        (**self).try_acquire(request)
    }

    fn try_acquire_now(&self, request: &LockRequest) -> Option<Result<Option<Box<dyn Handle>>>> {
        (**self).try_acquire_now(request)
    }

    async fn abandon(&self, keys: &[Key], token: &Token) -> Result<bool> {
        (**self).abandon(keys, token).await
    }

    async fn wait_for_release(&self, keys: &[Key], max_wait: Duration) -> Result<()> {
        (**self).wait_for_release(keys, max_wait).await
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

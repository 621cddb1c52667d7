//! The client users hold: the retry loop, deadline, tokens, namespacing and tracing, once for
//! every backend.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::time::Instant;
use tracing::Instrument;

use crate::courtesy::{Courtesy, WOKEN_COURTESY};
use crate::error::{LockError, Result};
use crate::guard::LockGuard;
use crate::key::{Key, KeySet, Namespace, key_for};
use crate::lease::Lease;
use crate::local::LocalQueue;
use crate::lock::{Acquired, Answer, Capabilities, Handle, KeyState, LeaseKind, Lock, LockRequest};
use crate::metrics::Acquisition;
use crate::options::LockOptions;
use crate::retry::{RetryCount, RetryPolicy};
use crate::token::Token;
use crate::watchdog::LostSignal;

/// A lock client over any backend: `acquire`, `try_acquire`, `with_lock`.
///
/// Cheap to clone; clones share the backend and its connections. A namespace, if set, prefixes
/// every key (`namespace:key`), so applications sharing a store under distinct namespaces
/// that hold no `:` cannot collide. (A `:` in a namespace can meet another's keys: namespace
/// `a` with key `b:c` and namespace `a:b` with key `c` are both `a:b:c`.)
///
/// # Cancel safety
/// Dropping an `acquire` future at any point leaves no lock behind: an attempt in flight is
/// followed by a token-checked cleanup in the background, and a lock won just before the drop
/// is released by its guard.
#[derive(Clone)]
pub struct Locker {
    lock: Arc<dyn Lock>,
    /// The backend's name and capabilities, read once.
    name: &'static str,
    capabilities: Capabilities,
    options: LockOptions,
    namespace: Option<Namespace>,
    stopped: Arc<AtomicBool>,
    /// Clean-ups of interrupted attempts still running; `stop` lets them finish first.
    cleanups: Arc<Cleanups>,
    /// Tasks of this process line up here before asking a distributed store.
    local: Option<Arc<LocalQueue>>,
    /// Whether a key won after contention is not taken straight back (see
    /// [`Locker::with_courtesy`]).
    courtesy: bool,
}

/// What a critical section run by [`Locker::with_lock`] knows about its lock: the [`Lease`]
/// itself (also reached through `Deref`, as `info.fencing_token()`) and the signal of its loss.
#[derive(Clone, Debug)]
pub struct LeaseInfo {
    /// The lease held: keys, kind, token, fencing token, and the validity, which follows the
    /// watchdog's extends while the section runs.
    pub lease: Lease,
    /// Fires if the lock is lost while the section runs: stop work when it does.
    pub lost: LostSignal,
}

impl std::ops::Deref for LeaseInfo {
    type Target = Lease;

    fn deref(&self) -> &Lease {
        &self.lease
    }
}

impl Locker {
    /// A client over `lock` with default options; a fail-fast backend defaults to one attempt.
    pub fn new(lock: impl Lock) -> Self {
        Self::from_arc(Arc::new(lock))
    }

    /// A client over a shared backend.
    pub fn from_arc(lock: Arc<dyn Lock>) -> Self {
        let (name, capabilities) = (lock.name(), lock.capabilities());
        let mut options = LockOptions::default();
        if capabilities.fail_fast {
            options = options.with_retry(RetryPolicy::none());
        }
        let local = capabilities
            .distributed
            .then(|| Arc::new(LocalQueue::default()));
        Self {
            lock,
            name,
            capabilities,
            options,
            namespace: None,
            stopped: Arc::new(AtomicBool::new(false)),
            cleanups: Arc::default(),
            local,
            courtesy: true,
        }
    }

    /// Turns the in-process queue on or off. It is on by default for distributed backends:
    /// tasks of this process that wait for the same key retrying forever (up to the deadline)
    /// line up first come, first served, and only the head of the line asks the store, so a
    /// task that just released cannot barge back in ahead of the others. A holder's place is
    /// given up when it releases or when its validity lapses. Mutual exclusion comes from the
    /// store either way; single attempts and counted retries go to the store directly.
    #[must_use]
    pub fn with_local_queue(mut self, enabled: bool) -> Self {
        self.local = enabled.then(|| self.local.take().unwrap_or_default());
        self
    }

    /// Turns the courtesy to other processes on or off. It is on by default, and matters only
    /// for a store shared between processes whose waiters poll in no order (not
    /// [`Capabilities::fair`]): after this client won a key it had found held, its next
    /// acquisition of that key within one ttl waits one delay of its retry policy before asking
    /// (5 ms at most on a store that wakes its waiters on release, whose waiters ask within a
    /// round trip or two; half the time to its deadline at most), as a waiter refused once
    /// would, instead of taking the key straight back while the other processes' waiters
    /// sleep out their delays. A win at the first attempt (nobody else asked meanwhile) ends
    /// the courtesy; finding the key held again renews it. Single attempts never wait. Off, a
    /// client that releases and asks again keeps winning, which is the most throughput and the
    /// longest tail of waits elsewhere.
    #[must_use]
    pub fn with_courtesy(mut self, enabled: bool) -> Self {
        self.courtesy = enabled;
        self
    }

    /// Replaces the default options of this client.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming the bad field.
    pub fn with_options(mut self, options: LockOptions) -> Result<Self> {
        options.validate()?;
        self.options = options;
        Ok(self)
    }

    /// Prefixes every key with `namespace:`; `None` removes the prefix.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] for an empty or too long namespace.
    pub fn with_namespace(mut self, namespace: Option<&str>) -> Result<Self> {
        self.namespace = namespace.map(Namespace::new).transpose()?;
        Ok(self)
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn Lock> {
        &self.lock
    }

    /// What the backend supports.
    pub fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    /// The default options of this client.
    pub fn options(&self) -> &LockOptions {
        &self.options
    }

    /// The namespace, if any.
    pub fn namespace(&self) -> Option<&Namespace> {
        self.namespace.as_ref()
    }

    /// The stored key for `key` under this client's namespace: the seed facade's `lockNs(key)`.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] for an empty or too long key.
    #[inline]
    pub fn lock_ns(&self, key: &str) -> Result<Key> {
        key_for(self.namespace.as_ref(), key)
    }

    /// The stored key for `key` under another namespace (or none): the seed facade's `getKey`.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] for an empty or too long key or namespace.
    pub fn key_for(&self, namespace: Option<&str>, key: &str) -> Result<Key> {
        let namespace = namespace.map(Namespace::new).transpose()?;
        key_for(namespace.as_ref(), key)
    }

    /// Takes the lock on `key`, retrying per the client's policy.
    ///
    /// As with an `async fn`, nothing happens until the returned future is first polled (the
    /// key is checked then), and dropping it cancels the acquisition.
    ///
    /// # Errors
    /// [`LockError::Locked`] when a single-attempt policy found the key held,
    /// [`LockError::Timeout`] when retries or the deadline ran out, the last backend error if
    /// the store kept failing, and [`LockError::InvalidInput`] for a bad key.
    pub fn acquire<'a>(
        &'a self,
        key: &'a str,
    ) -> impl Future<Output = Result<LockGuard>> + Send + 'a {
        // The client's own options were validated when they were set.
        self.acquire_one(key, LeaseKind::Exclusive, &self.options)
    }

    /// Like [`Locker::acquire`], with options for this call only.
    ///
    /// # Errors
    /// As [`Locker::acquire`]; also [`LockError::InvalidInput`] for bad options.
    pub async fn acquire_with(&self, key: &str, options: &LockOptions) -> Result<LockGuard> {
        let wanted = options
            .validate()
            .and_then(|()| self.one(key, LeaseKind::Exclusive));
        self.acquire_keys(wanted, options).await
    }

    /// Takes a lease of `kind` on `key` (a mutex, a semaphore permit, a read or a write lock),
    /// retrying per `options`. [`Locker::acquire`], [`Locker::acquire_permit`],
    /// [`Locker::acquire_read`] and [`Locker::acquire_write`] are this with one kind.
    ///
    /// # Errors
    /// As [`Locker::acquire`]; [`LockError::Unsupported`] when the backend does not serve
    /// `kind`; [`LockError::KindMismatch`] when the key is in use as another kind (a semaphore
    /// of another size, say).
    pub async fn acquire_kind(
        &self,
        key: &str,
        kind: LeaseKind,
        options: &LockOptions,
    ) -> Result<LockGuard> {
        let wanted = options.validate().and_then(|()| self.one(key, kind));
        self.acquire_keys(wanted, options).await
    }

    /// Makes one attempt at a lease of `kind`: `Ok(None)` when the key is held (for a
    /// semaphore: when every permit is taken; for a reader: when a writer holds or waits).
    ///
    /// # Errors
    /// As [`Locker::acquire_kind`].
    pub async fn try_acquire_kind(&self, key: &str, kind: LeaseKind) -> Result<Option<LockGuard>> {
        let options = self.options.clone().with_retry(RetryPolicy::none());
        match self.acquire_one(key, kind, &options).await {
            Ok(guard) => Ok(Some(guard)),
            Err(LockError::Locked { .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Takes one of the `permits` permits of the semaphore `key`, retrying per the client's
    /// policy: at most `permits` holders hold the key at once. Every client must ask with the
    /// same `permits`.
    ///
    /// # Errors
    /// As [`Locker::acquire_kind`]; [`LockError::InvalidInput`] for 0 or too many permits.
    pub async fn acquire_permit(&self, key: &str, permits: u32) -> Result<LockGuard> {
        let wanted = LeaseKind::permit(permits).and_then(|kind| self.one(key, kind));
        self.acquire_keys(wanted, &self.options).await
    }

    /// Takes the read (shared) side of the read-write lock `key`: together with other readers,
    /// never with a writer.
    ///
    /// # Errors
    /// As [`Locker::acquire_kind`].
    pub fn acquire_read<'a>(
        &'a self,
        key: &'a str,
    ) -> impl Future<Output = Result<LockGuard>> + Send + 'a {
        self.acquire_one(key, LeaseKind::Read, &self.options)
    }

    /// Takes the write (exclusive) side of the read-write lock `key`: no reader, no other
    /// writer. While it waits, new readers are kept out, so a stream of readers cannot starve
    /// it.
    ///
    /// # Errors
    /// As [`Locker::acquire_kind`].
    pub fn acquire_write<'a>(
        &'a self,
        key: &'a str,
    ) -> impl Future<Output = Result<LockGuard>> + Send + 'a {
        self.acquire_one(key, LeaseKind::Write, &self.options)
    }

    /// Takes several keys as one lock, all or none (backends with
    /// [`Capabilities::multi_key`]).
    ///
    /// # Errors
    /// As [`Locker::acquire`]; [`LockError::Unsupported`] without the capability.
    pub async fn acquire_many(&self, keys: &[&str]) -> Result<LockGuard> {
        let wanted = self.keys(keys).map(|keys| (keys, LeaseKind::Exclusive));
        self.acquire_keys(wanted, &self.options).await
    }

    /// Makes one attempt: `Ok(None)` when someone else holds the key.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] for a bad key; backend failures.
    pub async fn try_acquire(&self, key: &str) -> Result<Option<LockGuard>> {
        self.try_acquire_kind(key, LeaseKind::Exclusive).await
    }

    /// Runs `critical_section` while holding the lock on `key`, then releases it.
    ///
    /// The lock is kept alive meanwhile (see [`LockGuard::keep_alive`]): a backend that can
    /// extend extends it before it expires, and the section receives a [`LostSignal`] in its
    /// [`LeaseInfo`] that fires if the lock is lost anyway.
    ///
    /// # Errors
    /// The acquisition errors of [`Locker::acquire`]; [`LockError::NotHeld`] if the lock was lost
    /// before the section finished (its result is then discarded, since mutual exclusion may not
    /// have held); release failures.
    pub async fn with_lock<T, F, Fut>(&self, key: &str, critical_section: F) -> Result<T>
    where
        F: FnOnce(LeaseInfo) -> Fut,
        Fut: Future<Output = T>,
    {
        self.with_lease(key, LeaseKind::Exclusive, critical_section)
            .await
    }

    /// [`Locker::with_lock`] for a lease of any kind: runs `critical_section` while holding a
    /// permit, a read or a write lock on `key`, kept alive meanwhile, then releases it.
    ///
    /// # Errors
    /// As [`Locker::with_lock`] and [`Locker::acquire_kind`].
    pub async fn with_lease<T, F, Fut>(
        &self,
        key: &str,
        kind: LeaseKind,
        critical_section: F,
    ) -> Result<T>
    where
        F: FnOnce(LeaseInfo) -> Fut,
        Fut: Future<Output = T>,
    {
        let mut guard = self.acquire_one(key, kind, &self.options).await?;
        let lost = guard.keep_alive()?;
        let info = LeaseInfo {
            lease: guard.lease().clone(),
            lost: lost.clone(),
        };
        let value = critical_section(info).await;
        let lost = lost.is_lost() || !guard.is_valid();
        let key = guard.key().to_string();
        let released = guard.release().await;
        if lost {
            // The store may not have noticed yet, but another holder could have entered.
            return Err(LockError::NotHeld { key });
        }
        released?;
        Ok(value)
    }

    /// Removes every lock under `prefix` (namespaced like keys) and returns how many.
    ///
    /// # Errors
    /// [`LockError::Unsupported`] unless the backend can purge.
    pub async fn purge(&self, prefix: &str) -> Result<u64> {
        self.check_running()?;
        let prefix = match &self.namespace {
            Some(namespace) => format!("{namespace}{}{prefix}", crate::key::NAMESPACE_SEPARATOR),
            None => prefix.to_owned(),
        };
        self.store().purge(&prefix).await
    }

    /// Reports, per node, whether `key` (namespaced) is held and for how long.
    ///
    /// # Errors
    /// [`LockError::Unsupported`] for backends that cannot tell; [`LockError::InvalidInput`] for
    /// a bad key.
    pub async fn inspect(&self, key: &str) -> Result<Vec<KeyState>> {
        self.check_running()?;
        self.store().inspect(&self.lock_ns(key)?).await
    }

    /// Frees the backend's connections and tasks; every later call on this client (and its
    /// clones) fails with [`LockError::Stopped`]. Locks still held expire with their ttl; their
    /// guards' calls fail with [`LockError::Stopped`] on a backend whose connections are
    /// closed, while a store in this process, which has nothing to close (and may be shared
    /// with other clients), keeps serving them until they are released or dropped.
    ///
    /// The clean-ups of attempts that were cancelled or cut short (see "Cancel safety"), and the
    /// releases of guards dropped before (which a backend that needs I/O sends from a task), are
    /// given up to [`CLEANUP_WAIT`] to finish first, so that a process that stops its client and
    /// exits right after cancelling an acquisition or dropping a guard leaves no lock behind.
    /// A release that failed and that the backend would send again later is not waited for:
    /// that lock expires with its ttl. Acquisitions waiting to retry or in this process's queue
    /// end with [`LockError::Stopped`], and those that hold a claim in the store (a fair
    /// waiter's place in line, a waiting writer's claim) take it back before the backend
    /// closes. An attempt on the wire counts among the clean-ups: its answer is let come (for
    /// half of [`CLEANUP_WAIT`] at most, whatever the backend's own timeouts), whatever it took
    /// is taken back by token before the backend closes, and its acquisition ends with
    /// [`LockError::Stopped`]. The backend may then let what its own operations left running
    /// finish before it closes, for [`CLEANUP_WAIT`] at most too (Redlock: a release that
    /// answered once a majority of nodes did reaches the others, and a node that took the key
    /// after the release reached it hears it again; see [`raw::Settling`](crate::raw::Settling)).
    /// A further call (of this client or a clone) returns once the first has finished.
    ///
    /// # Errors
    /// Backend errors while closing (to the first call).
    pub async fn stop(&self) -> Result<()> {
        self.stopped.store(true, Ordering::SeqCst);
        loop {
            if self
                .cleanups
                .stop_running
                .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                // Stopped by another call (of a clone, say): return once it is done, so that
                // whoever returns from `stop` finds the clean-ups run and the backend closed;
                // if that call was cancelled first, this one does the job.
                if self.cleanups.stop_finished().await {
                    return Ok(());
                }
                continue;
            }
            if self.cleanups.stopped.load(Ordering::SeqCst) {
                self.cleanups.stop_running.store(false, Ordering::SeqCst);
                return Ok(());
            }
            // Marks the stop finished when this call ends, or hands the job on to the other
            // callers of `stop` if it is cancelled first, so that none is left waiting.
            let mut finished = StopFinished {
                cleanups: &self.cleanups,
                done: false,
            };
            // Acquisitions waiting to retry end now; those with a claim in the store (a fair
            // waiter's place in line, a writer's claim) take it back before the backend closes.
            self.cleanups.stopping.notify_waiters();
            self.cleanups.settled(CLEANUP_WAIT).await;
            let closed = self.store().shutdown().await;
            finished.done = true;
            return closed;
        }
    }

    #[inline]
    fn check_running(&self) -> Result<()> {
        if self.stopped.load(Ordering::SeqCst) {
            return Err(LockError::Stopped);
        }
        Ok(())
    }

    /// The backend itself: calls through `Arc<dyn Lock>` would go through the `Arc` forwarding
    /// impl and box every future twice.
    #[inline]
    fn store(&self) -> &dyn Lock {
        &*self.lock
    }

    /// A lease of `kind` on the one key `key`, namespaced.
    #[inline(always)]
    fn one(&self, key: &str, kind: LeaseKind) -> Result<(KeySet, LeaseKind)> {
        Ok((KeySet::one(self.lock_ns(key)?), kind))
    }

    fn keys(&self, keys: &[&str]) -> Result<KeySet> {
        KeySet::many(
            keys.iter()
                .map(|key| self.lock_ns(key))
                .collect::<Result<_>>()?,
        )
    }

    /// Refuses calls on a stopped client, kinds the backend does not serve, semaphores beyond
    /// [`MAX_PERMITS`](crate::raw::validate::MAX_PERMITS) (a `LeaseKind::Permit` built by hand skips
    /// [`LeaseKind::permit`]), and multi-key locks on backends without them (multi-key locks
    /// are mutexes only).
    #[inline(always)]
    fn check_keys(&self, keys: &KeySet, kind: LeaseKind) -> Result<()> {
        self.check_running()?;
        if let LeaseKind::Permit { permits } = kind {
            crate::raw::validate::permits("permits", permits.get())?;
        }
        let capabilities = self.capabilities;
        let backend = self.name;
        if let Err(capability) = capabilities.serves(kind) {
            return Err(LockError::Unsupported {
                backend,
                capability,
            });
        }
        if keys.len() > 1 {
            if kind != LeaseKind::Exclusive {
                return Err(LockError::Unsupported {
                    backend,
                    capability: "multi-key semaphores or read-write locks",
                });
            }
            if !capabilities.multi_key {
                return Err(LockError::Unsupported {
                    backend,
                    capability: "multi-key locks",
                });
            }
        }
        Ok(())
    }

    /// The in-process queue, if this call lines up in it: waits bounded by time rather than by
    /// a count of attempts. A single attempt asks the store directly, which alone knows about
    /// purges.
    ///
    /// Only leases with one holder line up: a permit or a reader would hold its place in line
    /// while it holds the lease and keep out the other holders the lease admits.
    fn queue_for(&self, options: &LockOptions, kind: LeaseKind) -> Option<&Arc<LocalQueue>> {
        self.local
            .as_ref()
            .filter(|_| kind.is_exclusive() && options.retry().retry_count() == RetryCount::Forever)
    }

    #[inline(always)]
    fn acquire_span(&self, keys: &KeySet, kind: LeaseKind) -> tracing::Span {
        tracing::debug_span!(
            "lock.acquire",
            backend = self.name,
            key = %keys.primary(),
            kind = %kind,
        )
    }

    /// Every acquisition goes through here, `wanted` unchecked so that one refused for bad
    /// input (a key, options, a number of permits) is recorded too: its metrics are recorded
    /// here, once (a dropped future records itself as cancelled).
    ///
    /// The one acquisition path: each attempt's request is made by [`Locker::request`], the
    /// backend's answer read by [`Locker::attempt`] and a win turned into a guard by
    /// [`Locker::won`]; [`Locker::retry_loop`] waits between attempts.
    ///
    /// For a store in this process (not [`Capabilities::distributed`]), the first attempt is
    /// made when the future is first polled, before anything awaits (unless the in-process
    /// queue comes first), by [`Locker::first_attempt`]: an answer decided in the call (see
    /// [`Answer::ready`](crate::raw::Answer::ready)) settles a free key in that poll, without
    /// the waiting path's future being built, which is most of an in-process lock's cost.
    /// Otherwise the waiting path, boxed, takes over from that attempt (or makes it).
    fn acquire_keys<'a>(
        &'a self,
        wanted: Result<(KeySet, LeaseKind)>,
        options: &'a LockOptions,
    ) -> Acquire<'a> {
        Acquire(Stage::Start {
            locker: self,
            wanted,
            options,
        })
    }

    /// [`Locker::acquire_keys`] for one key, checked when the future is first polled: the key
    /// is made where it is used, not moved into the future and out again.
    fn acquire_one<'a>(
        &'a self,
        key: &'a str,
        kind: LeaseKind,
        options: &'a LockOptions,
    ) -> Acquire<'a> {
        Acquire(Stage::StartOne {
            locker: self,
            key,
            kind,
            options,
        })
    }

    /// The guard of a finished acquisition, set up for this client: a release that needs I/O
    /// is spawned when the guard is dropped, and `stop` lets it finish.
    #[inline]
    fn finished(&self, result: Result<LockGuard>, acquisition: Acquisition) -> Result<LockGuard> {
        acquisition.finish(&result);
        if self.capabilities.distributed {
            let courteous = self.courteous();
            return result.map(|guard| guard.with_cleanups(&self.cleanups, courteous));
        }
        result
    }

    /// Whether this client keeps the courtesy (see [`Locker::with_courtesy`]): on, on a store
    /// shared between processes that does not line waiters up.
    fn courteous(&self) -> bool {
        self.courtesy && self.capabilities.distributed && !self.capabilities.fair
    }

    /// The first attempt, without awaiting: the acquisition settled, or what the waiting path
    /// goes on with.
    #[inline(always)]
    fn first_attempt<'a>(&self, wanted: Wanted<'a>, acquisition: &mut Acquisition) -> Begun<'a> {
        let span = self.acquire_span(&wanted.keys, wanted.kind);
        let (started, deadline) = deadline(wanted.options);
        // An in-process store's waiter is the first attempt's own token (see below): an
        // uncontended acquisition draws no second token.
        let waiter = if self.capabilities.distributed {
            match self.waiter(&wanted) {
                Ok(waiter) => waiter,
                Err(error) => return Begun::Settled(Err(error)),
            }
        } else {
            None
        };
        let waiting = |wanted, span, waiter, first| Waiting {
            wanted,
            span,
            started,
            deadline,
            waiter,
            first,
        };
        // A store shared between processes answers after a round trip: its first attempt is
        // made by the loop (asking here would build a future only to drop it). So is one that
        // lines up in the in-process queue first.
        if self.capabilities.distributed || self.queue_for(wanted.options, wanted.kind).is_some() {
            return Begun::Waits(Box::new(waiting(wanted, span, waiter, None)));
        }
        let lines_up = self.lines_up(&wanted);
        let Wanted {
            keys,
            kind,
            options,
        } = wanted;
        // The keys move into the first request (and are copied back only if it must wait).
        let mut request = match self.request(keys, kind, options, 1, waiter.as_ref(), 0) {
            Ok(request) => request,
            Err(error) => return Begun::Settled(Err(error)),
        };
        if lines_up {
            request.name_own_waiter();
        }
        acquisition.attempt();
        let entered = span.enter();
        // An answer that needs awaiting (a store in this process that answers later) is
        // dropped unpolled, which the contract makes free of effects (see `Lock::try_acquire`):
        // the loop asks again with the same request.
        let decided = self.store().try_acquire(&request).into_ready();
        let first = match decided {
            Some(Ok(Some(handle))) => return Begun::Settled(self.won(handle, 1, options)),
            Some(decided) => First::Decided(request, decided.map(Attempt::from)),
            None => First::Ask(request),
        };
        drop(entered);
        let keys = match &first {
            First::Decided(request, _) | First::Ask(request) => request.key_set().clone(),
        };
        let wanted = Wanted {
            keys,
            kind,
            options,
        };
        Begun::Waits(Box::new(waiting(wanted, span, waiter, Some(first))))
    }

    /// The acquisition after its first attempt (or before it, when it lines up in the
    /// in-process queue first).
    async fn acquire_waiting(
        &self,
        waiting: Waiting<'_>,
        acquisition: &mut Acquisition,
    ) -> Result<LockGuard> {
        let span = waiting.span.clone();
        async {
            let Some(queue) = self.queue_for(waiting.wanted.options, waiting.wanted.kind) else {
                return self.retry_loop(waiting, acquisition).await;
            };
            let keys = waiting.wanted.keys.clone();
            let (started, deadline) = (waiting.started, waiting.deadline);
            self.check_running()?;
            let enter = async {
                match deadline {
                    None => Ok(queue.enter(&keys).await),
                    Some(deadline) => tokio::time::timeout_at(deadline, queue.enter(&keys))
                        .await
                        .map_err(|_| LockError::Timeout {
                            key: keys.primary().to_string(),
                            attempts: 0,
                            waited: started.map(|started| started.elapsed()).unwrap_or_default(),
                        }),
                }
            };
            tokio::pin!(enter);
            // A free place in line is taken in the first poll; a wait for one ends at a `stop`
            // too (listened for only then: the uncontended path registers nothing), and a task
            // that reaches the head of the line after it does not go on to ask the stopped
            // store.
            let tickets =
                match std::future::poll_fn(|cx| Poll::Ready(enter.as_mut().poll(cx))).await {
                    Poll::Ready(tickets) => tickets?,
                    Poll::Pending => {
                        let stopping = self.cleanups.stopping.notified();
                        tokio::pin!(stopping);
                        stopping.as_mut().enable();
                        self.check_running()?;
                        tokio::select! {
                            biased;
                            () = &mut stopping => return Err(LockError::Stopped),
                            tickets = enter => tickets?,
                        }
                    }
                };
            self.check_running()?;
            let guard = self.retry_loop(waiting, acquisition).await?;
            Ok(guard.with_tickets(tickets))
        }
        .instrument(span)
        .await
    }

    /// The request of attempt number `attempt` (from 1) of a lease of `kind` on `keys`: a
    /// fresh token each time.
    #[inline(always)]
    fn request(
        &self,
        keys: KeySet,
        kind: LeaseKind,
        options: &LockOptions,
        attempt: u32,
        waiter: Option<&Token>,
        acquisition: u64,
    ) -> Result<LockRequest> {
        Ok(LockRequest::attempt(
            keys,
            Token::generate()?,
            options.ttl(),
            kind,
            attempt > 1,
            !options.retry().is_single_attempt(),
            waiter.cloned(),
        )
        .with_acquisition(acquisition))
    }

    /// A fair backend lines waiting mutexes on one key up in the store: every attempt of an
    /// acquisition names the same waiter, whose place in line is a claim like a writer's
    /// (renewed by the attempts, taken back when the waiter stops waiting).
    #[inline(always)]
    fn waiter(&self, wanted: &Wanted<'_>) -> Result<Option<Token>> {
        self.lines_up(wanted).then(Token::generate).transpose()
    }

    /// Whether `wanted` waits in the store's line (see [`Locker::waiter`]).
    #[inline(always)]
    fn lines_up(&self, wanted: &Wanted<'_>) -> bool {
        !wanted.options.retry().is_single_attempt()
            && wanted.kind == LeaseKind::Exclusive
            && wanted.keys.len() == 1
            && self.capabilities.fair
    }

    /// The guard of a won attempt.
    #[inline(always)]
    fn won(
        &self,
        handle: Box<dyn Handle>,
        attempts: u32,
        options: &LockOptions,
    ) -> Result<LockGuard> {
        // Taken as `stop` ran: an answer decided in the call is not checked after it (an
        // answer awaited is, in `attempt`), and a thread preempted after the last check of
        // `stopped` may take the key after `stop` returned. The stopped client lets it go and
        // hands out no guard.
        if self.stopped.load(Ordering::SeqCst) {
            tracing::debug!(
                attempts,
                "acquired as the client was stopped; letting it go"
            );
            let_go(handle, &self.cleanups);
            return Err(LockError::Stopped);
        }
        tracing::debug!(attempts, "acquired");
        LockGuard::new(handle, self.name, options.ttl())
    }

    /// The attempts after the first (whose outcome, or request to ask again, `waiting.first`
    /// hands over), or all of them when it is `None`. The clock is read only when needed:
    /// before the first attempt if there is a deadline, otherwise after the first attempt that
    /// finds the key held.
    async fn retry_loop(
        &self,
        waiting: Waiting<'_>,
        acquisition: &mut Acquisition,
    ) -> Result<LockGuard> {
        let Waiting {
            wanted,
            span: _,
            mut started,
            deadline,
            mut waiter,
            mut first,
        } = waiting;
        let options = wanted.options;
        // An in-process fair store's first attempt named its own token as the waiter (see
        // `Locker::first_attempt`), which names it in the attempts after it too.
        if waiter.is_none() && !self.capabilities.distributed {
            waiter = match &first {
                Some(First::Decided(request, _) | First::Ask(request)) => request.waiter().cloned(),
                None => None,
            };
            if waiter.is_none() {
                waiter = self.waiter(&wanted)?;
            }
        }
        // Every attempt of this acquisition names it, for a store shared between processes
        // (see `LockRequest::with_acquisition`); an in-process store's attempts name none.
        let acquisition_id = if self.capabilities.distributed {
            next_acquisition()
        } else {
            0
        };
        let mut backoff = options.retry().backoff();
        let mut attempts = 0u32;
        // Waits in a row that the backend ended before their time, each followed by an attempt
        // that still found the key held. A backend may wake a waiter early (that is the point of
        // push wake-ups), but never so often that the loop stops awaiting its backoff: from the
        // third on, the attempt after a wake-up waits [`early_spacing`] first (see there).
        let mut early_wakes = 0u32;
        // The error of the latest attempt that failed outright; contention clears it, an
        // attempt cut short by the deadline leaves it, so the caller learns why it gave up.
        let mut last_error = None;
        // A writer that found readers has left a claim in the store that keeps new readers out;
        // whoever stops waiting (given up, cancelled, failed) takes it back. So does a waiter in
        // a fair line (its place in line is a claim).
        let mut claim = Claim {
            lock: &self.lock,
            cleanups: &self.cleanups,
            request: None,
            running: None,
        };
        // The end of the policy's delay when a claim's renewal cut the wait short.
        let mut planned_wake = None;
        // Whether an attempt found the key held (see `Courtesy`).
        let courteous = self.courteous();
        let mut found_held = false;
        // Leases of this client started after this mark were won by its other tasks.
        let started_mark = if courteous {
            self.cleanups.courtesy.last_start()
        } else {
            0
        };
        if courteous && first.is_none() && !options.retry().is_single_attempt() {
            self.courtesy_wait(&wanted, deadline).await?;
        }
        loop {
            attempts += 1;
            // A key found held while this client holds it or is releasing it (a sibling task's
            // guard, or a guard dropped just before, whose release runs on a task) is no
            // contention with another process, and owes nobody a courtesy.
            let own_lease = courteous && self.cleanups.courtesy.any_held_here(&wanted.keys);
            let fresh;
            let (request, outcome) = match first.take() {
                Some(First::Decided(request, outcome)) => {
                    fresh = request;
                    (&fresh, outcome)
                }
                Some(First::Ask(request)) => {
                    fresh = request;
                    let answer = self.store().try_acquire(&fresh);
                    (&fresh, self.attempt(&fresh, answer, deadline).await)
                }
                None => {
                    fresh = self.request(
                        wanted.keys.clone(),
                        wanted.kind,
                        options,
                        attempts,
                        waiter.as_ref(),
                        acquisition_id,
                    )?;
                    acquisition.attempt();
                    let answer = self.store().try_acquire(&fresh);
                    (&fresh, self.attempt(&fresh, answer, deadline).await)
                }
            };
            // A fair waiter's attempt that missed the quorum without a refusal may still have
            // joined the line of a node that answered too late (or not at all): it is a claim
            // too, taken back when the waiter stops waiting (otherwise the late entry holds the
            // key on that node for the waiter, gone, until the entry expires).
            if ((wanted.kind == LeaseKind::Write || waiter.is_some())
                && matches!(outcome, Ok(Attempt::Held)))
                || (waiter.is_some() && matches!(outcome, Err(LockError::QuorumNotReached { .. })))
            {
                claim.request = Some(request.clone());
                // `stop` waits for the claim to be taken back.
                if claim.running.is_none() {
                    claim.running = Some(self.cleanups.start());
                }
            }
            // A single attempt cut short by the deadline gives up on time (`Timeout`): it did
            // not find the key held.
            let cut_short = matches!(outcome, Ok(Attempt::CutShort));
            match outcome {
                Ok(Attempt::Won(handle)) => {
                    // Taking the lock consumed the claim.
                    claim.request = None;
                    if courteous {
                        let until = Instant::now() + options.ttl();
                        let key = wanted.keys.primary();
                        // Contention with this client's own tasks owes nobody a courtesy.
                        let contended = found_held
                            && !self
                                .cleanups
                                .courtesy
                                .started_since(&wanted.keys, started_mark);
                        self.cleanups.courtesy.won(key, contended, until);
                    }
                    return self.won(handle, attempts, options);
                }
                Ok(Attempt::Held) => {
                    last_error = None;
                    // Held by a sibling task that won meanwhile: neither.
                    found_held |= !own_lease && !self.cleanups.courtesy.any_held_here(&wanted.keys);
                }
                Ok(Attempt::CutShort) => {}
                Err(error @ (LockError::Backend { .. } | LockError::QuorumNotReached { .. })) => {
                    tracing::debug!(attempts, %error, "attempt failed");
                    last_error = Some(error);
                }
                Err(error) => return Err(error),
            }
            let started = *started.get_or_insert_with(Instant::now);
            let gave_up = |last_error: Option<LockError>| {
                let key = wanted.keys.primary().to_string();
                let error = match last_error {
                    Some(error) => error,
                    None if options.retry().is_single_attempt() && !cut_short => {
                        LockError::Locked { key }
                    }
                    None => LockError::Timeout {
                        key,
                        attempts,
                        waited: started.elapsed(),
                    },
                };
                tracing::debug!(attempts, %error, "giving up");
                error
            };
            // A waiter in a fair line is woken by a message when its turn comes: it asks the
            // store every `FAIR_POLL` (or at the end of a longer delay of its policy: a lost
            // message costs no more than either), not at every short delay of its policy, which
            // would cost every waiter's polls per hand-off. The policy's delays are still spent
            // (a waiter gives up when it would have, after one last attempt).
            let last_sent = Instant::now();
            let mut skipped = false;
            loop {
                let now = Instant::now();
                // Set when this wait is a merged one whose crossing delay is planned for after it.
                let mut merged_plan = false;
                let mut wake_at = match planned_wake.take().filter(|at| *at > now) {
                    Some(at) => at,
                    None => {
                        let Some(delay) = backoff.next() else {
                            if skipped {
                                break; // the last attempt the policy allows
                            }
                            return Err(gave_up(last_error.take()));
                        };
                        // Between the polls, the policy's delays pass without an attempt
                        // (a millisecond at least: no spinning on a zero delay), in one wait
                        // up to the next poll or the deadline: a waiter in line is woken by
                        // its turn, and waking at every short delay only to wait on would cost
                        // every waiting process its CPU per delay (64 waiters at 5–10 ms: the
                        // hand-off's own work got late). A delay that would cross the poll or
                        // the deadline is left for the next round, as it would have come. Only
                        // when the policy counts no retries: a wait ended early by the store
                        // would otherwise have spent retries it did not wait for.
                        if skipped && options.retry().retry_count() == RetryCount::Forever {
                            let step = |delay: std::time::Duration| {
                                delay.max(std::time::Duration::from_millis(1))
                            };
                            let poll_at = last_sent + fair_poll(options.ttl());
                            let limit = deadline.map_or(poll_at, |deadline| poll_at.min(deadline));
                            let mut at = now + step(delay);
                            while at < limit {
                                let Some(delay) = backoff.next() else {
                                    break;
                                };
                                if at + step(delay) >= limit {
                                    planned_wake = Some(at + step(delay));
                                    merged_plan = true;
                                    break;
                                }
                                at += step(delay);
                            }
                            at
                        } else if skipped {
                            now + delay.max(std::time::Duration::from_millis(1))
                        } else {
                            now + delay
                        }
                    }
                };
                // A claim lives for the ttl: a writer whose delay is longer sleeps it in parts, with
                // an attempt between that renews the claim (or wins), so new readers stay out for
                // the whole wait. A fair waiter that skipped a poll asks again no later than
                // `FAIR_POLL` after its last attempt, however long the policy's next delay is
                // (skipped short delays and a long one must not add up). The policy's delays and
                // count of retries are kept: the rest of the delay is spent after the attempt.
                let mut cut_at = claim.request.as_ref().map(|_| now + options.ttl() / 2);
                if skipped {
                    let poll_at = last_sent + fair_poll(options.ttl());
                    cut_at = Some(cut_at.map_or(poll_at, |cut_at| cut_at.min(poll_at)));
                }
                if let Some(cut_at) = cut_at
                    && wake_at > cut_at
                {
                    planned_wake = Some(wake_at);
                    wake_at = cut_at;
                }
                // The next poll would come at the deadline or after it: the waiter asks now, as
                // it would have at this point of its policy's delays, rather than give up without
                // asking again (as it does with counted retries).
                if skipped && deadline.is_some_and(|deadline| wake_at >= deadline) {
                    planned_wake = planned_wake.or(Some(wake_at));
                    break;
                }
                if let Some(deadline) = deadline {
                    if now >= deadline {
                        return Err(gave_up(last_error.take()));
                    }
                    wake_at = wake_at.min(deadline);
                }
                tracing::debug!(
                    attempts,
                    delay_ms = (wake_at - now).as_millis() as u64,
                    "held elsewhere; waiting to retry"
                );
                // Whatever the backend's wait does, the loop spends tokio's cooperative budget, so
                // it yields now and then even with a zero delay: `timeout` can always cancel it.
                tokio::task::consume_budget().await;
                // A `stop` ends the wait: the claim is taken back while the backend still runs.
                let stopping = self.cleanups.stopping.notified();
                tokio::pin!(stopping);
                stopping.as_mut().enable();
                if self.stopped.load(Ordering::SeqCst) {
                    return Err(LockError::Stopped);
                }
                let wait = async {
                    match claim.request.as_ref().filter(|r| r.waiter().is_some()) {
                        // Until `wake_at` as the store counts it (the budget above may
                        // have yielded since `now`): a wake-up it finds late is late here.
                        Some(request) => {
                            let max_wait = wake_at.saturating_duration_since(Instant::now());
                            self.store().wait_for_turn(request, max_wait).await
                        }
                        None => self
                            .store()
                            .wait_for_release(
                                &wanted.keys,
                                wake_at.saturating_duration_since(Instant::now()),
                            )
                            .await
                            .map(|()| false),
                    }
                };
                // A `stop` ready in the same poll as the wait's end wins: the wait is then
                // dropped unfinished, and a wake-up meant for it goes on to the store's
                // next waiter (of another client of the store) instead of being spent here.
                let woken_for_turn = tokio::select! {
                    biased;
                    () = &mut stopping => return Err(LockError::Stopped),
                    waited = wait => waited?,
                };
                // Decided before the spacing below, which may run to `wake_at`: a wait the
                // backend ended early is still an early wake-up then, followed by an attempt
                // (a fair waiter that polled lately would otherwise skip it as if its wait had
                // run out, and miss the wake-up until its next poll).
                let woke_early = woken_for_turn || Instant::now() < wake_at;
                if woke_early {
                    early_wakes = early_wakes.saturating_add(1);
                    // The wake-up has been heard: whatever it announced, the attempt after
                    // the spacing sees (a deaf sleep instead would miss what comes next —
                    // a release announced by several nodes one after the other, or after
                    // the clean-up of this waiter's own failed attempt — for a whole delay).
                    if let Some(spacing) = early_spacing(early_wakes) {
                        let until = (Instant::now() + spacing).min(wake_at);
                        tokio::select! {
                            biased;
                            () = &mut stopping => return Err(LockError::Stopped),
                            () = tokio::time::sleep_until(until) => {}
                        }
                    }
                } else {
                    early_wakes = 0;
                }
                let polled_lately = last_sent.elapsed() < fair_poll(options.ttl());
                // A waiter woken for its turn asks now, whatever the clock says.
                let on_time = !woke_early;
                let past_deadline = deadline.is_some_and(|deadline| Instant::now() >= deadline);
                // A merged wait ended early (woken for the turn, or by the holder's expiry): its
                // plan belonged to the wait that did not happen. The attempt that follows starts
                // the policy's delays afresh, as after any early wake-up; kept, the plan (the
                // poll or the deadline) would carry over the attempt, and a waiter would wait
                // to its deadline without its last attempt.
                if merged_plan && !on_time {
                    planned_wake = None;
                }
                if waiter.is_none() || !on_time || !polled_lately || past_deadline {
                    break;
                }
                skipped = true;
                tracing::trace!(attempts, "in line; waiting on for the turn");
            }
            // A wait that ended as `stop` ran (a release, or a claim that `stop` made another
            // acquisition take back, woke it in the same tick as the stop's notification) goes
            // on to its attempt, which ends it with `Stopped`: a distributed store is not asked
            // (`Locker::attempt`), and a lock an in-process store grants is let go at once
            // (`Locker::won`), whose release passes the wake-up on to the store's next waiter
            // (returning here instead would spend it).
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                return Err(gave_up(last_error.take()));
            }
        }
    }

    /// A client that won `wanted`'s key after finding it held, and asks for it again within a
    /// ttl, first waits one delay of its policy (half the time to the deadline at most), so
    /// that waiters of other processes polling in no order get their chance (see
    /// [`Courtesy`]). A `stop` ends the wait.
    async fn courtesy_wait(&self, wanted: &Wanted<'_>, deadline: Option<Instant>) -> Result<()> {
        let now = Instant::now();
        if !self.cleanups.courtesy.owed(wanted.keys.primary(), now) {
            return Ok(());
        }
        let Some(mut delay) = wanted.options.retry().backoff().next() else {
            return Ok(());
        };
        if self.capabilities.wake_on_release {
            // Waiters elsewhere are woken by the release and ask within a round trip or two.
            delay = delay.min(WOKEN_COURTESY);
        }
        if let Some(deadline) = deadline {
            delay = delay.min(deadline.saturating_duration_since(now) / 2);
        }
        tracing::debug!(
            delay_ms = delay.as_millis() as u64,
            "won after contention lately; letting other processes ask first"
        );
        let stopping = self.cleanups.stopping.notified();
        tokio::pin!(stopping);
        stopping.as_mut().enable();
        self.check_running()?;
        tokio::select! {
            () = tokio::time::sleep_until(now + delay) => Ok(()),
            () = &mut stopping => Err(LockError::Stopped),
        }
    }

    /// The outcome of one attempt from the backend's answer: decided in the call, or awaited,
    /// bounded by the deadline and cleaned up if it does not complete.
    async fn attempt(
        &self,
        request: &LockRequest,
        answer: Answer<'_, Acquired>,
        deadline: Option<Instant>,
    ) -> Result<Attempt> {
        // An in-process store answers at once, with an outcome that is always known.
        let answer = match answer.now() {
            Ok(decided) => return decided.map(Attempt::from),
            Err(later) => later,
        };
        // Counted among the clean-ups `stop` waits for while it is on the wire: a `stop` in the
        // meantime lets the answer come (for a while), then `pending` takes back whatever it
        // took before the backend closes, and the acquisition ends with `Stopped` instead of
        // handing out a guard of a stopped client.
        let mut pending = PendingAttempt {
            lock: Some(Arc::clone(&self.lock)),
            cleanups: &self.cleanups,
            request,
            _running: self.cleanups.start(),
        };
        // `stop` waits for clean-ups no longer than `CLEANUP_WAIT`, and an answer may take
        // longer (the backend's own timeouts may be longer): after a `stop` the answer is let
        // come for half of that at most, then the attempt is taken back by token while the
        // backend still runs.
        let stopping = self.cleanups.stopping.notified();
        tokio::pin!(stopping);
        stopping.as_mut().enable();
        if self.stopped.load(Ordering::SeqCst) {
            return Err(LockError::Stopped);
        }
        let answered = async {
            match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, answer).await.ok(),
                None => Some(answer.await),
            }
        };
        tokio::pin!(answered);
        let answered = tokio::select! {
            biased;
            answered = &mut answered => answered,
            () = &mut stopping => {
                let _ = tokio::time::timeout(CLEANUP_WAIT / 2, &mut answered).await;
                return Err(LockError::Stopped);
            }
        };
        let Some(result) = answered else {
            // Cut short: `pending` cleans up whatever the attempt may have left.
            return Ok(Attempt::CutShort);
        };
        if self.stopped.load(Ordering::SeqCst) {
            return Err(LockError::Stopped);
        }
        // A backend error (a timeout, a dropped connection) leaves the outcome unknown: the
        // write may have landed, so `pending` releases it by token. Other outcomes are known.
        if !matches!(result, Err(LockError::Backend { .. })) {
            pending.lock = None;
        }
        Ok(match result? {
            Some(handle) => match born_valid(handle, &self.cleanups) {
                // Won as `stop` ran: let go while this attempt still counts among the
                // clean-ups, so that `stop` waits for the release before the backend closes
                // (`Locker::won` would let it go too, but after `pending` has ended).
                Some(handle) if self.stopped.load(Ordering::SeqCst) => {
                    let_go(handle, &self.cleanups);
                    return Err(LockError::Stopped);
                }
                Some(handle) => Attempt::Won(handle),
                // Nobody else holds the key: the answer came too late. Said as the error a
                // single try or an exhausted wait returns (retried like any failed attempt),
                // never "held by another holder".
                None => {
                    return Err(LockError::backend(
                        self.name,
                        format!(
                            "the store granted `{}` but its answer came back after the lock's validity (the ttl of {} ms, less the store's own margins) had passed; raise the ttl",
                            request.primary_key(),
                            request.ttl().as_millis()
                        ),
                    ));
                }
            },
            None => Attempt::Held,
        })
    }
}

/// A number for a new acquisition, unique in this process (from 1).
fn next_acquisition() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// When the clock started and when the acquisition gives up, if its policy has a deadline.
#[inline(always)]
fn deadline(options: &LockOptions) -> (Option<Instant>, Option<Instant>) {
    match options.retry().deadline() {
        Some(deadline) => {
            let started = Instant::now();
            (Some(started), Some(started + deadline))
        }
        None => (None, None),
    }
}

/// The handle of a won attempt that awaited its answer, unless its validity had already passed
/// when it came back (the holder was delayed past its ttl between taking the key and seeing
/// the answer, or the ttl is too short for a round trip): such a lock is released,
/// token-checked, and the attempt fails with a backend error ending in "raise the ttl" (see
/// `Locker::attempt`). So no guard is ever handed out with its validity already over.
///
/// An answer decided in the call ([`Answer::ready`]) took no round trip: its validity was set
/// from a clock read in the same call, a ttl ahead, and is not checked again.
///
/// A release that needs I/O runs on a task counted among the clean-ups that [`Locker::stop`]
/// lets finish.
fn born_valid(handle: Box<dyn Handle>, cleanups: &Arc<Cleanups>) -> Option<Box<dyn Handle>> {
    if handle.lease().valid_until() > Instant::now() {
        return Some(handle);
    }
    tracing::debug!("the lock's validity passed before the attempt returned; releasing it");
    let_go(handle, cleanups);
    None
}

/// Releases a won lock that is not handed out: at once when the backend's answer is decided in
/// the call, otherwise on a task counted among the clean-ups that [`Locker::stop`] lets finish.
fn let_go(mut handle: Box<dyn Handle>, cleanups: &Arc<Cleanups>) {
    if handle.release().into_ready().is_none()
        && let Ok(runtime) = tokio::runtime::Handle::try_current()
    {
        let running = cleanups.start();
        runtime.spawn(async move {
            let _running = running;
            let _ = handle.release().await;
        });
    }
}

/// The future of an acquisition (see [`Locker::acquire_keys`]): small, and settled in its
/// first poll when the first attempt is decided in the call.
struct Acquire<'a>(Stage<'a>);

enum Stage<'a> {
    /// Not polled yet, on one key: nothing has happened, the key is not checked yet.
    StartOne {
        locker: &'a Locker,
        key: &'a str,
        kind: LeaseKind,
        options: &'a LockOptions,
    },
    /// Not polled yet: nothing has happened.
    Start {
        locker: &'a Locker,
        wanted: Result<(KeySet, LeaseKind)>,
        options: &'a LockOptions,
    },
    /// The waiting path.
    Waiting(Pin<Box<dyn Future<Output = Result<LockGuard>> + Send + 'a>>),
    /// Finished.
    Done,
}

impl Future for Acquire<'_> {
    type Output = Result<LockGuard>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Stage::Waiting(waiting) = &mut this.0 {
            let result = std::task::ready!(waiting.as_mut().poll(cx));
            this.0 = Stage::Done;
            return Poll::Ready(result);
        }
        // The fields of a one-key start are read one by one (copies of references), not
        // moved out with the whole stage.
        let (locker, wanted, options) = match this.0 {
            Stage::StartOne {
                locker,
                key,
                kind,
                options,
            } => {
                this.0 = Stage::Done;
                (locker, locker.one(key, kind), options)
            }
            _ => match std::mem::replace(&mut this.0, Stage::Done) {
                Stage::Start {
                    locker,
                    wanted,
                    options,
                } => (locker, wanted, options),
                _ => panic!("an acquisition polled after it finished"),
            },
        };
        let mut acquisition = Acquisition::start(locker.name);
        let wanted = wanted.and_then(|(keys, kind)| {
            locker.check_keys(&keys, kind)?;
            Ok(Wanted {
                keys,
                kind,
                options,
            })
        });
        let waiting = match wanted.map(|wanted| locker.first_attempt(wanted, &mut acquisition)) {
            Err(error) => return Poll::Ready(locker.finished(Err(error), acquisition)),
            Ok(Begun::Settled(settled)) => {
                return Poll::Ready(locker.finished(settled, acquisition));
            }
            Ok(Begun::Waits(waiting)) => waiting,
        };
        this.0 = Stage::Waiting(Box::pin(async move {
            let result = locker.acquire_waiting(*waiting, &mut acquisition).await;
            locker.finished(result, acquisition)
        }));
        Pin::new(this).poll(cx)
    }
}

/// How an acquisition's first step ended (see [`Locker::first_attempt`]).
enum Begun<'a> {
    /// Decided without awaiting: won, refused for good, or failed.
    Settled(Result<LockGuard>),
    /// It goes on in the waiting path.
    Waits(Box<Waiting<'a>>),
}

/// An acquisition that goes on to wait: what it wants, its span, clock and waiter, and the
/// first attempt if it was made.
struct Waiting<'a> {
    wanted: Wanted<'a>,
    span: tracing::Span,
    started: Option<Instant>,
    deadline: Option<Instant>,
    /// The waiter's token in a fair line (see [`Locker::waiter`]).
    waiter: Option<Token>,
    first: Option<First>,
}

/// The first attempt, made before anything awaits, as the retry loop takes it over.
enum First {
    /// The store decided in the call: the key was held, or the attempt failed (a win settles
    /// at once).
    Decided(LockRequest, Result<Attempt>),
    /// The store's answer needs awaiting: the loop asks again with this request.
    Ask(LockRequest),
}

/// What an acquisition wants: its keys, the kind of lease and the options it runs under.
struct Wanted<'a> {
    keys: KeySet,
    kind: LeaseKind,
    options: &'a LockOptions,
}

/// How one attempt ended.
enum Attempt {
    Won(Box<dyn Handle>),
    Held,
    CutShort,
}

impl From<Option<Box<dyn Handle>>> for Attempt {
    fn from(handle: Option<Box<dyn Handle>>) -> Self {
        match handle {
            Some(handle) => Self::Won(handle),
            None => Self::Held,
        }
    }
}

/// Cleans up after an attempt that did not run to completion (cancelled, timed out, or failed
/// with a backend error): its write may still land, so the keys are released by token in the
/// background.
struct PendingAttempt<'a> {
    lock: Option<Arc<dyn Lock>>,
    cleanups: &'a Arc<Cleanups>,
    request: &'a LockRequest,
    /// Counts the attempt among the clean-ups `stop` waits for until its clean-up has started.
    _running: CleanupRunning,
}

/// A writer's claim to be next, left in the store by its latest attempt: taken back by token
/// when the writer stops waiting without the lock, in the background (the claim also expires
/// by itself after the attempt's ttl).
struct Claim<'a> {
    lock: &'a Arc<dyn Lock>,
    cleanups: &'a Arc<Cleanups>,
    request: Option<LockRequest>,
    /// Counts the claim among the clean-ups `stop` waits for, from the attempt that made it
    /// until it is taken back (dropped after the clean-up it hands over to has started).
    running: Option<CleanupRunning>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let Some(request) = self.request.take() else {
            return;
        };
        abandon_in_background(Arc::clone(self.lock), self.cleanups, request);
    }
}

/// Abandons `request`: at once if the backend's answer is decided in the call
/// ([`Answer::ready`](crate::raw::Answer::ready)), otherwise on a task of the current runtime, counted among the clean-ups
/// that [`Locker::stop`] lets finish.
fn abandon_in_background(lock: Arc<dyn Lock>, cleanups: &Arc<Cleanups>, request: LockRequest) {
    if let Ok(result) = lock.abandon(&request).now() {
        if let Err(error) = result {
            tracing::warn!(key = %request.primary_key(), %error, "cleanup of an interrupted attempt failed; what it left expires with its ttl");
        }
        return;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            let running = cleanups.start();
            runtime.spawn(async move {
                let _running = running;
                if let Err(error) = (*lock).abandon(&request).await {
                    tracing::warn!(key = %request.primary_key(), %error, "cleanup of an interrupted attempt failed; what it left expires with its ttl");
                }
            });
        }
        Err(_) => tracing::warn!(
            key = %request.primary_key(),
            "attempt interrupted outside a tokio runtime; what it left expires with its ttl"
        ),
    }
}

/// How long [`Locker::stop`] waits for the clean-ups of interrupted attempts and the releases
/// of dropped guards.
pub const CLEANUP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How often a waiter in a fair line asks the store whether its turn came when no message
/// says so: the longest a lost message can delay it, at most a quarter of the ttl (each
/// attempt renews the waiter's place in line, which lasts one ttl).
const FAIR_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// [`FAIR_POLL`] for a lease of `ttl`.
fn fair_poll(ttl: std::time::Duration) -> std::time::Duration {
    FAIR_POLL.min(ttl / 4)
}

/// How long the attempt after the `early_wakes`-th early wake-up in a row waits first: nothing
/// for the first two, then 1 ms, 2 ms, 4 ms, … (capped by the caller at the end of the delay).
///
/// One release may wake a waiter several times (a message from each node that held the key,
/// landing one after the other; the clean-up of the waiter's own failed attempt announced
/// too), so a few early wake-ups in vain are normal. A backend whose wait returns at once
/// (buggy, or sure the key is free) gets fewer than a dozen quick attempts before they are a
/// whole delay apart, and the count starts again only once a wait lasts to its end.
fn early_spacing(early_wakes: u32) -> Option<std::time::Duration> {
    let doublings = early_wakes.checked_sub(3)?;
    Some(EARLY_SPACING_FLOOR.saturating_mul(1u32.checked_shl(doublings).unwrap_or(u32::MAX)))
}

/// The first spacing of [`early_spacing`].
const EARLY_SPACING_FLOOR: std::time::Duration = std::time::Duration::from_millis(1);

/// The clean-ups of interrupted attempts, and the releases of dropped guards, still running in
/// the background.
#[derive(Debug, Default)]
pub(crate) struct Cleanups {
    running: crate::raw::Settling,
    /// Notified by `stop`: acquisitions waiting to retry end.
    stopping: tokio::sync::Notify,
    /// Set, and `stop_done` notified, when the first call of `stop` has finished.
    stopped: AtomicBool,
    /// Set while a call of `stop` does the job (cleared, and `stop_done` notified, when it
    /// is cancelled before it finished: another call takes over).
    stop_running: AtomicBool,
    stop_done: tokio::sync::Notify,
    /// Keys this client won after finding them held by another process (see [`Courtesy`]).
    courtesy: Courtesy,
}

/// Marks the `stop` doing the job finished when dropped, or (cancelled before it was `done`)
/// hands the job on to the other callers.
struct StopFinished<'a> {
    cleanups: &'a Cleanups,
    done: bool,
}

impl Drop for StopFinished<'_> {
    fn drop(&mut self) {
        if self.done {
            self.cleanups.stopped.store(true, Ordering::SeqCst);
        }
        self.cleanups.stop_running.store(false, Ordering::SeqCst);
        self.cleanups.stop_done.notify_waiters();
    }
}

/// One clean-up in progress; counted down when it ends, however it ends.
pub(crate) type CleanupRunning = crate::raw::InProgress;

/// A lease of a key of this client, until the store let go of it (its guard released, or its
/// release on drop done): an attempt that finds the key held meanwhile met no other process
/// (see [`Courtesy`]). Ends when dropped, however the release ends, or when the lease lapses.
pub(crate) struct OwnLease(Option<Arc<Cleanups>>, KeySet, u64);

impl OwnLease {
    /// Leaves the mark in place until the lease lapses (a lease left in the store to expire:
    /// its guard dropped outside a runtime).
    pub(crate) fn until_lapsed(mut self) {
        self.0 = None;
    }
}

impl Drop for OwnLease {
    fn drop(&mut self) {
        if let Some(cleanups) = self.0.take() {
            cleanups.courtesy.unmark(self.1.as_slice(), self.2);
        }
    }
}

impl Cleanups {
    /// Marks every key of `lease` as held by this client until the mark is dropped or the
    /// lease lapses.
    pub(crate) fn own_lease(self: &Arc<Self>, lease: &crate::lease::Lease) -> OwnLease {
        let start = self.courtesy.mark_held(lease.keys(), lease.live());
        OwnLease(Some(Arc::clone(self)), lease.key_set().clone(), start)
    }

    pub(crate) fn start(&self) -> CleanupRunning {
        self.running.enter()
    }

    /// Waits until the call of `stop` doing the job has finished (true), or was cancelled
    /// before it did (false: the job is free to take).
    async fn stop_finished(&self) -> bool {
        loop {
            let notified = self.stop_done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.stopped.load(Ordering::SeqCst) {
                return true;
            }
            if !self.stop_running.load(Ordering::SeqCst) {
                return false;
            }
            notified.await;
        }
    }

    /// Waits until no clean-up runs, or `limit` has passed.
    async fn settled(&self, limit: std::time::Duration) {
        self.running.settled(limit).await;
    }
}

impl Drop for PendingAttempt<'_> {
    fn drop(&mut self) {
        let Some(lock) = self.lock.take() else {
            return;
        };
        abandon_in_background(lock, self.cleanups, self.request.clone());
    }
}

impl fmt::Debug for Locker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Locker")
            .field("backend", &self.lock)
            .field("namespace", &self.namespace)
            .field("options", &self.options)
            .field("stopped", &self.stopped.load(Ordering::Relaxed))
            .field("local_queue", &self.local.is_some())
            .field("courtesy", &self.courtesy)
            .finish()
    }
}

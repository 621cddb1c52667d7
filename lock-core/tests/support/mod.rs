//! What several test files of lock-core share: the memory lock seen as a distributed store.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use lock_core::{
    Capabilities, Key, KeyState, Lease, LockError, LockOptions, Locker, Result, RetryPolicy,
    raw::{Answer, Handle, Lock, LockRequest, async_trait},
};
use lock_memory::MemoryLock;
use tokio::time::Instant;

/// The memory lock seen as a distributed store (so a locker lines its waiters up in this
/// process's queue and awaits every answer), counting attempts. Its extends can be made to
/// take a while (an I/O round), and its downgrades to fail the way Redlock's does when a round
/// reaches no quorum: the lock is then in doubt and its validity ends at once.
#[derive(Debug, Default)]
pub(crate) struct Store {
    memory: MemoryLock,
    /// Every attempt made, counted when it is polled.
    pub(crate) attempts: Arc<AtomicUsize>,
    downgrade_fails: bool,
    extend_takes: Duration,
    /// Whether it claims `wake_on_release` (its waits still sleep their whole time).
    claims_wake_ups: bool,
}

#[derive(Debug)]
struct StoreHandle {
    inner: Box<dyn Handle>,
    lease: Lease,
    downgrade_fails: bool,
    extend_takes: Duration,
}

impl Store {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Its downgrades fail without a quorum, ending the lease.
    pub(crate) fn failing_downgrades(mut self) -> Self {
        self.downgrade_fails = true;
        self
    }

    /// It claims `Capabilities::wake_on_release`, as a store whose waiters are woken on
    /// release does (its waits still sleep their whole time).
    pub(crate) fn claiming_wake_ups(mut self) -> Self {
        self.claims_wake_ups = true;
        self
    }

    /// Its extends take `extend_takes` before they reach the store.
    pub(crate) fn extends_taking(mut self, extend_takes: Duration) -> Self {
        self.extend_takes = extend_takes;
        self
    }
}

#[async_trait]
impl Lock for Store {
    fn name(&self) -> &'static str {
        "store"
    }
    fn capabilities(&self) -> Capabilities {
        // Its waits sleep out their time (the default `wait_for_release`): no push wake-ups
        // unless told to claim them.
        let mut capabilities = self.memory.capabilities().with_distributed();
        capabilities.wake_on_release = self.claims_wake_ups;
        // A store without lines, as Redlock with `fair` off.
        capabilities.fair = false;
        capabilities
    }
    fn try_acquire<'a>(
        &'a self,
        request: &'a LockRequest,
    ) -> Answer<'a, Result<Option<Box<dyn Handle>>>> {
        Answer::later(async move {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            let Some(inner) = self.memory.try_acquire(request).await? else {
                return Ok(None);
            };
            let lease = inner.lease().clone();
            Ok(Some(Box::new(StoreHandle {
                inner,
                lease,
                downgrade_fails: self.downgrade_fails,
                extend_takes: self.extend_takes,
            }) as Box<dyn Handle>))
        })
    }
    fn abandon<'a>(&'a self, request: &'a LockRequest) -> Answer<'a, Result<bool>> {
        Answer::later(async move { self.memory.abandon(request).await })
    }
    async fn purge(&self, prefix: &str) -> Result<u64> {
        self.memory.purge(prefix).await
    }
    async fn inspect(&self, key: &Key) -> Result<Vec<KeyState>> {
        self.memory.inspect(key).await
    }
    async fn shutdown(&self) -> Result<()> {
        self.memory.shutdown().await
    }
}

#[async_trait]
impl Handle for StoreHandle {
    fn lease(&self) -> &Lease {
        &self.lease
    }
    async fn extend(&mut self, ttl: Duration) -> Result<()> {
        if !self.extend_takes.is_zero() {
            tokio::time::sleep(self.extend_takes).await;
        }
        self.inner.extend(ttl).await?;
        self.lease.set_valid_until(self.inner.lease().valid_until());
        Ok(())
    }
    fn release(&mut self) -> Answer<'_, Result<()>> {
        Answer::later(async move { self.inner.release().await })
    }
    async fn downgrade(&mut self) -> Result<()> {
        if self.downgrade_fails {
            self.lease.set_valid_until(Instant::now());
            return Err(LockError::QuorumNotReached {
                key: self.lease.key().to_string(),
                got: 1,
                needed: 2,
                failures: "n2: timed out".into(),
            });
        }
        self.inner.downgrade().await?;
        self.lease.set_downgraded();
        Ok(())
    }
}

/// The memory lock seen as a distributed store that takes the key in its answer's first poll
/// and answers `late` after (a slow node, within the backend's own timeouts), whose validity
/// is its expiry less a `drift` (as Redlock's is), whose releases take `release_takes`, and
/// whose calls fail once it is shut down (its connections closed). It cannot extend.
#[derive(Debug)]
pub(crate) struct Late {
    memory: Arc<MemoryLock>,
    late: Duration,
    drift: Duration,
    release_takes: Duration,
    /// Set once it is shut down.
    pub(crate) shut: Arc<AtomicBool>,
}

#[derive(Debug)]
struct LateHandle {
    inner: Box<dyn Handle>,
    lease: Lease,
    release_takes: Duration,
    shut: Arc<AtomicBool>,
}

impl Late {
    /// Over `memory` (which the test keeps, to look at the keys behind its back): answers at
    /// once, no drift, releases at once.
    pub(crate) fn new(memory: &Arc<MemoryLock>) -> Self {
        Self {
            memory: Arc::clone(memory),
            late: Duration::ZERO,
            drift: Duration::ZERO,
            release_takes: Duration::ZERO,
            shut: Arc::default(),
        }
    }

    /// Its answers come back `late` after it took the key.
    pub(crate) fn answering_after(mut self, late: Duration) -> Self {
        self.late = late;
        self
    }

    /// Its validity is the store's expiry less `drift`.
    pub(crate) fn drifting(mut self, drift: Duration) -> Self {
        self.drift = drift;
        self
    }

    /// Its releases take `release_takes` before they reach the store.
    pub(crate) fn releases_taking(mut self, release_takes: Duration) -> Self {
        self.release_takes = release_takes;
        self
    }
}

#[async_trait]
impl Lock for Late {
    fn name(&self) -> &'static str {
        "late"
    }
    fn capabilities(&self) -> Capabilities {
        // A store without lines, as Redlock with `fair` off.
        let mut capabilities = self.memory.capabilities().with_distributed();
        capabilities.fair = false;
        capabilities
    }
    fn try_acquire<'a>(
        &'a self,
        request: &'a LockRequest,
    ) -> Answer<'a, Result<Option<Box<dyn Handle>>>> {
        Answer::later(async move {
            if self.shut.load(Ordering::SeqCst) {
                return Err(LockError::backend("late", "shut down"));
            }
            let Some(inner) = self.memory.try_acquire(request).await? else {
                return Ok(None);
            };
            let mut lease = inner.lease().clone();
            lease.set_valid_until(inner.lease().valid_until() - self.drift);
            tokio::time::sleep(self.late).await;
            Ok(Some(Box::new(LateHandle {
                inner,
                lease,
                release_takes: self.release_takes,
                shut: Arc::clone(&self.shut),
            }) as Box<dyn Handle>))
        })
    }
    fn abandon<'a>(&'a self, request: &'a LockRequest) -> Answer<'a, Result<bool>> {
        Answer::later(async move {
            tokio::task::yield_now().await;
            if self.shut.load(Ordering::SeqCst) {
                return Err(LockError::backend("late", "shut down"));
            }
            self.memory.abandon(request).await
        })
    }
    async fn shutdown(&self) -> Result<()> {
        self.shut.store(true, Ordering::SeqCst);
        Ok(())
    }
}

#[async_trait]
impl Handle for LateHandle {
    fn lease(&self) -> &Lease {
        &self.lease
    }
    async fn extend(&mut self, _ttl: Duration) -> Result<()> {
        Err(LockError::Unsupported {
            backend: "late",
            capability: "extend",
        })
    }
    fn release(&mut self) -> Answer<'_, Result<()>> {
        Answer::later(async move {
            tokio::time::sleep(self.release_takes).await;
            tokio::task::yield_now().await;
            if self.shut.load(Ordering::SeqCst) {
                return Err(LockError::backend("late", "shut down"));
            }
            self.inner.release().await
        })
    }
}

/// Whether `key` is free in `memory` (one attempt, no retry, behind the back of the store the
/// test wraps around it).
pub(crate) async fn free(memory: &Arc<MemoryLock>, key: &str) -> bool {
    let probe = Locker::from_arc(Arc::clone(memory) as Arc<dyn Lock>)
        .with_options(LockOptions::default().with_retry(RetryPolicy::none()))
        .expect("valid options");
    probe
        .try_acquire(key)
        .await
        .expect("the memory lock answers")
        .is_some()
}

/// Lets every task run until all of them wait (the paused clock moves only then).
pub(crate) async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// The memory lock as a store shared between processes (answers awaited, releases of dropped
/// guards on a task) whose releases wake waiters (pub/sub wake-ups, as `wake_on_release`).
#[derive(Debug, Default)]
pub(crate) struct Woken {
    memory: MemoryLock,
}

#[async_trait]
impl Lock for Woken {
    fn name(&self) -> &'static str {
        "woken"
    }
    fn capabilities(&self) -> Capabilities {
        // A store without lines, as Redlock with `fair` off.
        let mut capabilities = self.memory.capabilities().with_distributed();
        capabilities.fair = false;
        capabilities
    }
    fn try_acquire<'a>(
        &'a self,
        request: &'a LockRequest,
    ) -> Answer<'a, Result<Option<Box<dyn Handle>>>> {
        Answer::later(async move { self.memory.try_acquire(request).await })
    }
    fn abandon<'a>(&'a self, request: &'a LockRequest) -> Answer<'a, Result<bool>> {
        Answer::later(async move { self.memory.abandon(request).await })
    }
    async fn wait_for_release(&self, keys: &[Key], max_wait: Duration) -> Result<()> {
        self.memory.wait_for_release(keys, max_wait).await
    }
    async fn purge(&self, prefix: &str) -> Result<u64> {
        self.memory.purge(prefix).await
    }
    async fn inspect(&self, key: &Key) -> Result<Vec<KeyState>> {
        self.memory.inspect(key).await
    }
    async fn shutdown(&self) -> Result<()> {
        self.memory.shutdown().await
    }
}
/// A client on `store` retrying forever every `delay` (no jitter), with a one-hour ttl (so no
/// courtesy expires during a test).
pub(crate) fn woken_client(store: &Arc<Woken>, delay: u64) -> Locker {
    Locker::from_arc(Arc::clone(store) as Arc<dyn Lock>)
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(3600))
                .with_retry(
                    RetryPolicy::forever()
                        .with_retry_delay(Duration::from_millis(delay))
                        .with_retry_jitter(Duration::ZERO),
                ),
        )
        .unwrap()
}
/// Makes `a` win `key` after finding it held by `c`, and release it.
pub(crate) async fn win_after_contention(a: &Locker, c: &Locker, key: &str) {
    let held = c.acquire(key).await.unwrap();
    let task = tokio::spawn({
        let (a, key) = (a.clone(), key.to_owned());
        async move { a.acquire(&key).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(1)).await;
    held.release().await.unwrap();
    task.await.unwrap().release().await.unwrap();
}

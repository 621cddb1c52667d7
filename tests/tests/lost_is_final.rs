//! A loss, once reported, is never undone. The watchdog of a kept-alive guard whose extends
//! fail sleeps until the validity lapses and then reports the lock lost without waiting for
//! the handle; an extend by hand sent just before the lapse and answered Ok just after it
//! used to move the validity again: `extend` answered Ok and `is_valid` said true after the
//! lost signal had fired and the watchdog had ended. It now answers `NotHeld` and the
//! validity stays over.
//!
//! A backend on tokio's paused clock (the in-process store, wrapped): the watchdog's extends
//! (the guard's ttl) fail; an extend by hand with another ttl answers Ok 10 ms after it is
//! sent. The control: the same extend sent well before the lapse succeeds.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use lock_core::{
    Capabilities, Key, KeyState, Lease, LockError, LockOptions, Locker, Result, RetryPolicy,
    raw::{Handle, Lock, LockRequest, async_trait},
};
use lock_memory::MemoryLock;
use tokio::time::{Instant, sleep, sleep_until};

const TTL: Duration = Duration::from_millis(100);
const BY_HAND: Duration = Duration::from_millis(200);

#[derive(Debug)]
struct Slow {
    memory: MemoryLock,
}

#[derive(Debug)]
struct SlowHandle {
    inner: Box<dyn Handle>,
    lease: Lease,
}

#[async_trait]
impl Lock for Slow {
    fn name(&self) -> &'static str {
        "slow"
    }

    fn capabilities(&self) -> Capabilities {
        self.memory.capabilities()
    }

    fn try_acquire<'a>(
        &'a self,
        request: &'a LockRequest,
    ) -> lock_core::raw::Answer<'a, Result<Option<Box<dyn Handle>>>> {
        lock_core::raw::Answer::later(async move {
            let start = Instant::now();
            let Some(inner) = self.memory.try_acquire(request).await? else {
                return Ok(None);
            };
            Ok(Some(Box::new(SlowHandle {
                inner,
                lease: Lease::new(request, start + request.ttl()),
            }) as Box<dyn Handle>))
        })
    }

    fn abandon<'a>(&'a self, request: &'a LockRequest) -> lock_core::raw::Answer<'a, Result<bool>> {
        lock_core::raw::Answer::later(async move { self.memory.abandon(request).await })
    }

    async fn purge(&self, prefix: &str) -> Result<u64> {
        self.memory.purge(prefix).await
    }

    async fn inspect(&self, key: &Key) -> Result<Vec<KeyState>> {
        self.memory.inspect(key).await
    }
}

#[async_trait]
impl Handle for SlowHandle {
    fn lease(&self) -> &Lease {
        &self.lease
    }

    async fn extend(&mut self, ttl: Duration) -> Result<()> {
        if ttl == TTL {
            // The watchdog's: the store cannot be reached.
            return Err(LockError::backend("slow", "the store cannot be reached"));
        }
        // By hand: the store takes it, and answers 10 ms later.
        let sent = Instant::now();
        sleep(Duration::from_millis(10)).await;
        self.lease.set_valid_until(sent + ttl);
        Ok(())
    }

    fn release(&mut self) -> lock_core::raw::Answer<'_, Result<()>> {
        lock_core::raw::Answer::later(async move { self.inner.release().await })
    }
}

/// A kept-alive guard on `k`, extended by hand at `at` after it was taken: the extend's
/// answer, and then `is_valid` and the lost signal.
async fn extend_by_hand_at(at: Duration) -> (Result<()>, bool, bool) {
    let locker = Locker::new(Arc::new(Slow {
        memory: MemoryLock::new(),
    }) as Arc<dyn Lock>)
    .with_options(
        LockOptions::default()
            .with_ttl(TTL)
            .with_retry(RetryPolicy::none()),
    )
    .unwrap();
    let taken = Instant::now();
    let mut guard = locker.acquire("k").await.unwrap();
    let lost = guard.keep_alive().unwrap();
    sleep_until(taken + at).await;
    let extended = guard.extend(BY_HAND).await;
    (extended, guard.is_valid(), lost.is_lost())
}

#[tokio::test(start_paused = true)]
async fn an_extend_answered_after_the_watchdog_reported_the_loss_does_not_revive_the_lock() {
    let (extended, valid, lost) = extend_by_hand_at(Duration::from_millis(98)).await;
    assert!(lost, "the watchdog did not report the lapse");
    assert!(
        matches!(extended, Err(LockError::NotHeld { .. })),
        "an extend answered after the loss was reported: {extended:?}"
    );
    assert!(
        !valid,
        "the guard is valid again after its loss was reported"
    );
}

#[tokio::test(start_paused = true)]
async fn control_the_same_extend_well_before_the_lapse_succeeds() {
    let (extended, valid, lost) = extend_by_hand_at(Duration::from_millis(50)).await;
    extended.unwrap();
    assert!(valid && !lost);
}

//! Adversarial review s11 (adv11d): the in-process queue's fast path (`wait_for_head` takes a
//! free head with `try_lock_owned` before lining up), on a multi-threaded runtime, right at a
//! release.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lock_core::{
    Capabilities, LockOptions, Locker, Result, RetryPolicy,
    raw::{Handle, Lock, LockRequest, async_trait},
};
use lock_memory::MemoryLock;

/// The in-memory lock dressed as a distributed one, so that the core puts its queue in front.
#[derive(Debug, Default)]
struct Distributed(MemoryLock);

#[async_trait]
impl Lock for Distributed {
    fn name(&self) -> &'static str {
        "distributed-memory"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE.with_distributed().with_extend()
    }

    fn try_acquire<'a>(
        &'a self,
        request: &'a LockRequest,
    ) -> lock_core::raw::Answer<'a, Result<Option<Box<dyn Handle>>>> {
        lock_core::raw::Answer::later(async move { self.0.try_acquire(request).await })
    }

    fn abandon<'a>(&'a self, request: &'a LockRequest) -> lock_core::raw::Answer<'a, Result<bool>> {
        lock_core::raw::Answer::later(async move { self.0.abandon(request).await })
    }
}

/// Held. Promise (`Locker::with_local_queue`: "tasks of this process that wait for the same
/// key ... line up first come, first served, and only the head of the line asks the store, so
/// a task that just released cannot barge back in ahead of the others"; the fast path's
/// comment: a free head taken at once "never overtakes a waiting task").
///
/// Each round a holder releases and at once asks for the key again, on another worker thread
/// than the task already waiting for it; the waiter must get in first, every round. The
/// waiter retries the store only every 50 ms, so a barging holder would win by far.
///
/// Negative control (as run): the same test with `.with_local_queue(false)` on the locker
/// failed in the first round (the holder got back in ahead of the waiter: the store alone does
/// not order them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_coming_straight_back_never_overtakes_a_waiter() {
    let lock = Arc::new(Distributed::default());
    let locker = Locker::new(Arc::clone(&lock))
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(10))
                .with_retry(
                    RetryPolicy::forever()
                        .with_retry_delay(Duration::from_millis(50))
                        .with_retry_jitter(Duration::ZERO)
                        .with_deadline(Duration::from_secs(10)),
                ),
        )
        .unwrap();
    let sequence = Arc::new(AtomicU64::new(0));
    for round in 0..30 {
        let holder = locker.acquire("k").await.unwrap();
        let waiter = tokio::spawn({
            let (locker, sequence) = (locker.clone(), Arc::clone(&sequence));
            async move {
                let guard = locker.acquire("k").await.unwrap();
                let at = sequence.fetch_add(1, Ordering::SeqCst);
                guard.release().await.unwrap();
                at
            }
        });
        // The waiter lines up (and finds the key held).
        tokio::time::sleep(Duration::from_millis(20)).await;
        holder.release().await.unwrap();
        let again = locker.acquire("k").await.unwrap();
        let holder_at = sequence.fetch_add(1, Ordering::SeqCst);
        again.release().await.unwrap();
        let waiter_at = waiter.await.unwrap();
        assert!(
            waiter_at < holder_at,
            "round {round}: the releasing holder got back in ahead of the task waiting for the key"
        );
    }
}

//! Early wake-ups in vain: one release may wake a waiter several times before the key is free
//! (a message from each node that held it, landing one after the other; the announced
//! clean-up of the waiter's own failed attempt). The retry loop spaces the attempts that
//! follow such wake-ups; it must not stop listening.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lock_core::{
    Capabilities, Key, LockOptions, Locker, Result, RetryPolicy,
    raw::{Acquired, Answer, Lock, LockRequest, async_trait},
};
use lock_memory::MemoryLock;
use tokio::time::Instant;

/// An in-process store whose `wait_for_release` is woken at the instants of `announcements`
/// (from `start`), as a store announcing releases would be.
#[derive(Debug)]
struct Announcing {
    store: MemoryLock,
    start: Instant,
    announcements: Vec<Duration>,
    attempts: Arc<AtomicU64>,
}

#[async_trait]
impl Lock for Announcing {
    fn name(&self) -> &'static str {
        "announcing"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE.with_wake_on_release()
    }
    fn try_acquire<'a>(&'a self, request: &'a LockRequest) -> Answer<'a, Acquired> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        self.store.try_acquire(request)
    }
    fn abandon<'a>(&'a self, request: &'a LockRequest) -> Answer<'a, Result<bool>> {
        self.store.abandon(request)
    }
    async fn wait_for_release(&self, _keys: &[Key], max_wait: Duration) -> Result<()> {
        let now = Instant::now();
        let next = self
            .announcements
            .iter()
            .map(|at| self.start + *at)
            .find(|at| *at > now);
        let until = next.map_or(now + max_wait, |at| at.min(now + max_wait));
        tokio::time::sleep_until(until).await;
        Ok(())
    }
}

/// How long after the start a waiter (retry delay 5 s, no jitter) wins `k`, which a holder
/// releases at 150 ms, when its waits are woken at `announcements` (from the start).
async fn won_after(announcements: &[u64]) -> (Duration, u64) {
    let store = MemoryLock::new();
    let holder = Locker::new(store.clone());
    let guard = holder.acquire("k").await.unwrap();
    let start = Instant::now();
    let attempts = Arc::new(AtomicU64::new(0));
    let backend = Announcing {
        store,
        start,
        announcements: announcements
            .iter()
            .copied()
            .map(Duration::from_millis)
            .collect(),
        attempts: Arc::clone(&attempts),
    };
    let waiter = waiting(backend, Duration::from_secs(5));
    let release = tokio::spawn(async move {
        tokio::time::sleep_until(start + Duration::from_millis(150)).await;
        guard.release().await.unwrap();
    });
    let won = waiter.acquire("k").await.unwrap();
    let took = start.elapsed();
    release.await.unwrap();
    won.release().await.unwrap();
    (took, attempts.load(Ordering::SeqCst))
}

/// A locker on `backend` retrying for good every `delay` (no jitter), without the in-process
/// queue.
fn waiting(backend: impl Lock, delay: Duration) -> Locker {
    let retry = RetryPolicy::forever()
        .with_retry_delay(delay)
        .with_retry_jitter(Duration::ZERO);
    Locker::new(backend)
        .with_local_queue(false)
        .with_options(LockOptions::default().with_retry(retry))
        .unwrap()
}

/// A holder releases `k` at 150 ms; the waiter (retry delay 5 s) is woken in vain at 100, 101
/// and 102 ms (the key still held) and then by the release.
///
/// Broken before: after two early wake-ups in a row the loop slept its next whole delay
/// without listening, and won 5.1 s after the start. Now it wins within milliseconds of the
/// release.
#[tokio::test(start_paused = true)]
async fn a_waiter_woken_in_vain_three_times_still_hears_the_release() {
    let (took, attempts) = won_after(&[100, 101, 102, 150]).await;
    assert!(
        took < Duration::from_millis(200),
        "won {took:?} after the start ({attempts} attempts)"
    );
}

/// Negative control of the test above: with no announcement of the release (only the three in
/// vain), the waiter wins at its next poll, a whole delay later — the announcement is what the
/// test measures.
#[tokio::test(start_paused = true)]
async fn control_without_the_release_announced_the_waiter_polls_a_delay_later() {
    let (took, _) = won_after(&[100, 101, 102]).await;
    assert!(
        took >= Duration::from_secs(5),
        "won {took:?} after the start"
    );
}

/// A wait that always returns at once, on a key that stays held: the attempts after the
/// third early wake-up are spaced 1, 2, 4, … ms apart up to the delay (50 ms), so 2 s cost
/// about 50 attempts, not thousands.
#[tokio::test(start_paused = true)]
async fn wake_ups_in_vain_forever_cost_about_one_attempt_a_delay() {
    let store = MemoryLock::new();
    let holder = Locker::new(store.clone());
    let _guard = holder.acquire("k").await.unwrap();
    let attempts = Arc::new(AtomicU64::new(0));
    let backend = Announcing {
        store,
        start: Instant::now(),
        announcements: Vec::new(),
        attempts: Arc::clone(&attempts),
    };
    let waiter = waiting(AtOnce(backend), Duration::from_millis(50));
    let outcome = tokio::time::timeout(Duration::from_secs(2), waiter.acquire("k")).await;
    assert!(outcome.is_err(), "the key stays held");
    let made = attempts.load(Ordering::SeqCst);
    // 2 s / 50 ms = 40 delays, plus the quick attempts before the spacing reaches the delay.
    assert!((40..=60).contains(&made), "{made} attempts in 2 s");
}

/// [`Announcing`] whose wait returns at once.
#[derive(Debug)]
struct AtOnce(Announcing);

#[async_trait]
impl Lock for AtOnce {
    fn name(&self) -> &'static str {
        "at-once"
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    fn try_acquire<'a>(&'a self, request: &'a LockRequest) -> Answer<'a, Acquired> {
        self.0.try_acquire(request)
    }
    fn abandon<'a>(&'a self, request: &'a LockRequest) -> Answer<'a, Result<bool>> {
        self.0.abandon(request)
    }
    async fn wait_for_release(&self, _keys: &[Key], _max_wait: Duration) -> Result<()> {
        Ok(())
    }
}

//! A waiter in a fair line (a backend with `Capabilities::fair`) is woken by its turn message:
//! when its policy's delays are short, it still asks the store only every 200 ms (at most a
//! quarter of the ttl), so that the waiters' polls do not grow with every hand-off; the
//! policy's delays are still spent, so it gives up when it would have, after one last attempt.
//! The same backend without `fair` (the negative control) is asked at every delay.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lock_core::{
    Capabilities, Key, LockError, LockOptions, Locker, Result, RetryPolicy,
    raw::{Handle, Lock, LockRequest, async_trait},
};

/// Always held; waits sleep out their time (no message ever comes).
#[derive(Debug)]
struct AlwaysHeld {
    fair: bool,
    attempts: Arc<AtomicU64>,
}

#[async_trait]
impl Lock for AlwaysHeld {
    fn name(&self) -> &'static str {
        "always-held"
    }
    fn capabilities(&self) -> Capabilities {
        let distributed = Capabilities::NONE.with_distributed();
        if self.fair {
            distributed.with_fair()
        } else {
            distributed
        }
    }
    async fn try_acquire(&self, _request: &LockRequest) -> Result<Option<Box<dyn Handle>>> {
        // On a paused clock, a loop that never sleeps never reaches its deadline: fail instead.
        let made = self.attempts.fetch_add(1, Ordering::SeqCst);
        assert!(made < 100_000, "the retry loop spins: {made} attempts");
        Ok(None)
    }
    async fn abandon(&self, _request: &LockRequest) -> Result<bool> {
        Ok(false)
    }
    async fn wait_for_release(&self, _keys: &[Key], max_wait: Duration) -> Result<()> {
        tokio::time::sleep(max_wait).await;
        Ok(())
    }
}

/// Attempts made by an acquisition with `retry` and a 10 s ttl on an always-held key, and
/// how long it took to give up (paused clock).
async fn attempts(fair: bool, retry: RetryPolicy, ttl: Duration) -> (u64, Duration, LockError) {
    let made = Arc::new(AtomicU64::new(0));
    let locker = Locker::new(AlwaysHeld {
        fair,
        attempts: Arc::clone(&made),
    })
    .with_local_queue(false)
    .with_options(LockOptions::default().with_ttl(ttl).with_retry(retry))
    .unwrap();
    let started = tokio::time::Instant::now();
    let error = locker.acquire("k").await.unwrap_err();
    (made.load(Ordering::SeqCst), started.elapsed(), error)
}

fn every_5ms() -> RetryPolicy {
    RetryPolicy::forever()
        .with_retry_delay(Duration::from_millis(5))
        .with_retry_jitter(Duration::ZERO)
}

#[tokio::test(start_paused = true)]
async fn a_fair_waiter_polls_every_200ms_not_at_every_short_delay() {
    let policy = every_5ms().with_deadline(Duration::from_secs(2));
    let (fair, waited, _) = attempts(true, policy.clone(), Duration::from_secs(10)).await;
    let (plain, _, _) = attempts(false, policy, Duration::from_secs(10)).await;
    // 2 s: the first attempt and one every 200 ms (10), against one every 5 ms (400).
    assert!(
        (10..=12).contains(&fair),
        "fair: {fair} attempts in {waited:?}"
    );
    assert!(plain >= 350, "without fair: {plain} attempts (the control)");
    assert!(
        waited >= Duration::from_secs(2),
        "gave up early: {waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_short_ttl_makes_a_fair_waiter_poll_within_a_quarter_of_it() {
    // A waiter's place in line lasts one ttl and each attempt renews it.
    let policy = every_5ms().with_deadline(Duration::from_secs(1));
    let (fair, _, _) = attempts(true, policy, Duration::from_millis(200)).await;
    // Every 50 ms for 1 s.
    assert!((18..=22).contains(&fair), "fair: {fair} attempts");
}

#[tokio::test(start_paused = true)]
async fn a_fair_waiter_with_few_retries_gives_up_on_time_after_a_last_attempt() {
    // Ten retries 5 ms apart: given up after 50 ms, as without fair, and the last retry is
    // still sent (the waiter may have become first in line meanwhile).
    let policy = every_5ms().with_retry_count(lock_core::RetryCount::Limited(10));
    let (fair, waited, error) = attempts(true, policy.clone(), Duration::from_secs(10)).await;
    let (plain, plain_waited, _) = attempts(false, policy, Duration::from_secs(10)).await;
    assert_eq!(plain, 11, "without fair: the first attempt and ten retries");
    assert_eq!(fair, 2, "fair: the first attempt and the last");
    assert!(
        waited >= Duration::from_millis(50) && waited <= plain_waited + Duration::from_millis(5),
        "fair gave up after {waited:?}, without fair after {plain_waited:?}"
    );
    assert!(
        matches!(error, LockError::Timeout { attempts: 2, .. }),
        "{error:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_fair_waiter_on_a_zero_delay_does_not_spin() {
    // A zero delay: the polls are still 200 ms apart, the time between passes in 1 ms steps.
    let policy = RetryPolicy::forever()
        .with_retry_delay(Duration::ZERO)
        .with_retry_jitter(Duration::ZERO)
        .with_deadline(Duration::from_secs(1));
    let (fair, _, _) = attempts(true, policy, Duration::from_secs(10)).await;
    assert!((5..=7).contains(&fair), "fair: {fair} attempts");
}

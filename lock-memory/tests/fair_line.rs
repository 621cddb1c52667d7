//! The memory backend's line (`Capabilities::fair`): waiting mutex acquisitions on one key are
//! served in the order they first found the key held, whatever their retry delays, and a
//! waiter that stops waiting leaves the line at once (or, leaked, after a ttl). The clock is
//! paused: every wait is exact.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use lock_core::{RetryCount, RetryPolicy};
use lock_memory::MemoryLock;
use tokio::time::Instant;

mod support;
use support::{locker, ms, poll_once};

/// `waiters` tasks ask for `k` 1 ms apart while `holder` holds it for 200 ms, each with its own
/// client and policy, then hold it 2 ms each: the order they were served in.
async fn served_order(policies: &[RetryPolicy]) -> Vec<usize> {
    let lock = MemoryLock::new();
    let holder = locker(&lock, ms(60_000), RetryPolicy::none())
        .acquire("k")
        .await
        .unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (at, retry) in policies.iter().enumerate() {
        let (locker, order) = (locker(&lock, ms(60_000), retry.clone()), Arc::clone(&order));
        tasks.push(tokio::spawn(async move {
            let guard = locker.acquire("k").await.unwrap();
            order.lock().unwrap().push(at);
            tokio::time::sleep(ms(2)).await;
            guard.release().await.unwrap();
        }));
        tokio::time::sleep(ms(1)).await;
    }
    tokio::time::sleep(ms(200)).await;
    holder.release().await.unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    order.lock().unwrap().clone()
}

/// Delays shorter than the hold, with jitter, forever or counted: before the line, each wait
/// ended after one delay and the waiter rejoined the store's waiters at the back, so a release
/// woke whoever happened to be waiting longest at that moment.
#[tokio::test(start_paused = true)]
async fn waiters_are_served_in_arrival_order_whatever_their_delays() {
    let policies: Vec<RetryPolicy> = (0..12u64)
        .map(|i| {
            let retry = RetryPolicy::forever()
                .with_retry_delay(ms(3 + i % 5))
                .with_retry_jitter(ms(i % 3));
            if i % 2 == 0 {
                retry.with_retry_count(RetryCount::Limited(1_000))
            } else {
                retry
            }
        })
        .collect();
    let order = served_order(&policies).await;
    assert_eq!(
        order,
        (0..12).collect::<Vec<_>>(),
        "served out of arrival order"
    );
}

/// The default policy (counted retries, 200 ms delays with jitter) keeps the order too.
#[tokio::test(start_paused = true)]
async fn the_default_policy_keeps_the_arrival_order() {
    let order = served_order(&vec![RetryPolicy::default(); 6]).await;
    assert_eq!(
        order,
        (0..6).collect::<Vec<_>>(),
        "served out of arrival order"
    );
}

/// A waiter cancelled while in line (its future dropped) leaves it at once: the one behind it
/// is served as soon as the one before it releases.
#[tokio::test(start_paused = true)]
async fn a_cancelled_waiter_leaves_the_line_at_once() {
    let lock = MemoryLock::new();
    let retry = RetryPolicy::forever().with_retry_delay(ms(50));
    let holder = locker(&lock, ms(60_000), RetryPolicy::none())
        .acquire("k")
        .await
        .unwrap();
    let first = tokio::spawn({
        let locker = locker(&lock, ms(60_000), retry.clone());
        async move { locker.acquire("k").await.unwrap() }
    });
    tokio::time::sleep(ms(1)).await;
    let cancelled = tokio::spawn({
        let locker = locker(&lock, ms(60_000), retry.clone());
        async move { locker.acquire("k").await.unwrap() }
    });
    tokio::time::sleep(ms(1)).await;
    let last = tokio::spawn({
        let locker = locker(&lock, ms(60_000), retry.clone());
        async move {
            let guard = locker.acquire("k").await.unwrap();
            (guard, Instant::now())
        }
    });
    tokio::time::sleep(ms(10)).await;
    cancelled.abort();
    assert!(cancelled.await.unwrap_err().is_cancelled());
    holder.release().await.unwrap();
    let first = first.await.unwrap();
    tokio::time::sleep(ms(5)).await;
    let released = Instant::now();
    first.release().await.unwrap();
    let (last, served) = last.await.unwrap();
    assert!(
        served - released <= ms(1),
        "the waiter behind a cancelled one was served {:?} after the release",
        served - released
    );
    last.release().await.unwrap();
}

/// A waiting future leaked in line (forgotten, never dropped: nothing takes its place back)
/// holds the line for one ttl after its last attempt at most.
#[tokio::test(start_paused = true)]
async fn a_leaked_waiter_holds_the_line_one_ttl_at_most() {
    let lock = MemoryLock::new();
    let ttl = ms(1_000);
    let retry = RetryPolicy::forever().with_retry_delay(ms(20));
    let holder = locker(&lock, ttl, RetryPolicy::none())
        .acquire("k")
        .await
        .unwrap();
    let leaked_client = locker(&lock, ttl, retry.clone());
    let mut leaked = Box::pin(leaked_client.acquire("k"));
    assert!(
        poll_once(leaked.as_mut()).is_pending(),
        "the key is held: the leaked waiter waits"
    );
    let last_attempt = Instant::now();
    std::mem::forget(leaked);
    tokio::time::sleep(ms(1)).await;
    let behind = tokio::spawn({
        let locker = locker(&lock, ttl, retry);
        async move {
            let guard = locker.acquire("k").await.unwrap();
            (guard, Instant::now())
        }
    });
    tokio::time::sleep(ms(10)).await;
    holder.release().await.unwrap();
    let (guard, served) = behind.await.unwrap();
    let waited = served - last_attempt;
    assert!(
        waited <= ttl + ms(250),
        "served {waited:?} after the leaked waiter's last attempt (its place lapses after {ttl:?})"
    );
    guard.release().await.unwrap();
}

/// A holder that crashes (its guard forgotten) is followed by the first in line at its expiry;
/// one that extends its lease is followed at its release, not before.
#[tokio::test(start_paused = true)]
async fn the_first_in_line_follows_an_expiry_and_an_extended_holder() {
    let lock = MemoryLock::new();
    let ttl = ms(500);
    let retry = RetryPolicy::forever()
        .with_retry_delay(ms(2_000))
        .with_max_delay(ms(2_000));
    let crashed = locker(&lock, ttl, RetryPolicy::none())
        .acquire("k")
        .await
        .unwrap();
    let expires = Instant::now() + ttl;
    std::mem::forget(crashed);
    let (guard, served) = {
        let locker = locker(&lock, ttl, retry.clone());
        let guard = locker.acquire("k").await.unwrap();
        (guard, Instant::now())
    };
    assert!(
        served >= expires && served - expires <= ms(1),
        "served {:?} after the crashed holder's expiry",
        served.saturating_duration_since(expires)
    );
    let mut holder = guard;
    let waiter = tokio::spawn({
        let locker = locker(&lock, ttl, retry);
        async move {
            let guard = locker.acquire("k").await.unwrap();
            (guard, Instant::now())
        }
    });
    for _ in 0..4 {
        tokio::time::sleep(ttl / 2).await;
        holder.extend(ttl).await.unwrap();
    }
    assert!(!waiter.is_finished(), "served while the holder extended");
    tokio::time::sleep(ms(100)).await;
    let released = Instant::now();
    holder.release().await.unwrap();
    let (guard, served) = waiter.await.unwrap();
    assert!(
        served - released <= ms(1),
        "served {:?} after the release",
        served - released
    );
    guard.release().await.unwrap();
}

/// While a line waits, the free key is not taken past it: not by a single attempt, a
/// multi-key lock, or a semaphore permit, between a release and the first in line's attempt.
#[tokio::test(start_paused = true)]
async fn nothing_takes_the_key_past_the_line() {
    let lock = MemoryLock::new();
    let retry = RetryPolicy::forever().with_retry_delay(ms(10));
    let other = locker(&lock, ms(60_000), RetryPolicy::none());
    let holder = other.acquire("k").await.unwrap();
    let waiter = tokio::spawn({
        let locker = locker(&lock, ms(60_000), retry);
        async move { locker.acquire("k").await.unwrap() }
    });
    tokio::time::sleep(ms(5)).await;
    // No await between the release and the attempts: the waiter has not run yet.
    holder.release().await.unwrap();
    assert!(
        other.try_acquire("k").await.unwrap().is_none(),
        "a single attempt"
    );
    assert!(
        matches!(
            other.acquire_many(&["k", "j"]).await,
            Err(lock_core::LockError::Locked { .. })
        ),
        "a multi-key lock"
    );
    assert!(
        other
            .try_acquire_kind("k", lock_core::LeaseKind::Read)
            .await
            .unwrap()
            .is_none(),
        "a reader"
    );
    let served = waiter.await.unwrap();
    served.release().await.unwrap();
    assert!(
        other.try_acquire("k").await.unwrap().is_some(),
        "the line is gone"
    );
}

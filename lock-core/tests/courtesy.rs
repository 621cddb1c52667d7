//! The courtesy to other processes (`Locker::with_courtesy`): on a store shared between
//! processes whose waiters poll in no order, a client that won a key after finding it held does
//! not take it straight back when it asks again, so a polling waiter elsewhere gets it. Each
//! `Locker` over the same store stands for a process (its own queue and clean-ups). The clock is
//! paused: every wait is exact, so the order of events is fixed.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lock_core::{LockError, LockOptions, Locker, RetryPolicy, raw::Lock};
use support::Store;
use tokio::time::Instant;

/// A process on `store` retrying forever every `delay` (no jitter), with a 10 s ttl.
fn process(store: &Arc<Store>, delay: u64) -> Locker {
    let policy = RetryPolicy::forever()
        .with_retry_delay(Duration::from_millis(delay))
        .with_retry_jitter(Duration::ZERO);
    Locker::from_arc(Arc::clone(store) as Arc<dyn Lock>)
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(10))
                .with_retry(policy),
        )
        .unwrap()
}

/// Makes `a` win key `k` after finding it held by another process, and release it.
async fn owe_courtesy(store: &Arc<Store>, a: &Locker) {
    let c = process(store, 5);
    let held_by_c = c.acquire("k").await.unwrap();
    let a_first = tokio::spawn({
        let a = a.clone();
        async move { a.acquire("k").await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    held_by_c.release().await.unwrap();
    a_first.await.unwrap().release().await.unwrap();
}

/// Process `a` (delay 20 ms) waits for `c`'s key and wins it; `b` (delay 5 ms) then waits while
/// `a` holds it; `a` releases and at once asks again. Returns whether `b` won before `a`'s
/// second acquisition.
async fn the_waiter_elsewhere_wins(courtesy: bool) -> bool {
    let store = Arc::new(Store::new());
    let a = process(&store, 20).with_courtesy(courtesy);
    let b = process(&store, 5);
    let c = process(&store, 5);
    let held_by_c = c.acquire("k").await.unwrap();
    let a_first = tokio::spawn({
        let a = a.clone();
        async move { a.acquire("k").await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    held_by_c.release().await.unwrap();
    let guard = a_first.await.unwrap(); // won at its second attempt (t = 40 ms), after contention
    let b_wins = tokio::spawn(async move {
        let guard = b.acquire("k").await.unwrap();
        let won_at = Instant::now();
        tokio::time::sleep(Duration::from_millis(100)).await;
        guard.release().await.unwrap();
        won_at
    });
    tokio::time::sleep(Duration::from_millis(12)).await; // b found it held and polls every 5 ms
    guard.release().await.unwrap();
    let again = a.acquire("k").await.unwrap();
    let a_won_at = Instant::now();
    again.release().await.unwrap();
    let b_won_at = b_wins.await.unwrap();
    b_won_at < a_won_at
}

#[tokio::test(start_paused = true)]
async fn a_client_that_won_after_contention_lets_a_polling_waiter_elsewhere_go_first() {
    assert!(the_waiter_elsewhere_wins(true).await);
}

/// The negative control: without the courtesy the releaser takes the key straight back, and the
/// waiter elsewhere waits out the whole of its next section too.
#[tokio::test(start_paused = true)]
async fn without_courtesy_the_releaser_takes_the_key_straight_back() {
    assert!(!the_waiter_elsewhere_wins(false).await);
}

/// Uncontended cycles never wait: no delay before any of them, and one attempt each.
#[tokio::test(start_paused = true)]
async fn uncontended_cycles_owe_no_courtesy() {
    let store = Arc::new(Store::new());
    let a = process(&store, 20);
    let started = Instant::now();
    for _ in 0..50 {
        a.acquire("k").await.unwrap().release().await.unwrap();
    }
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(store.attempts.load(Ordering::SeqCst), 50);
}

/// A courtesy is paid once: the acquisition after a contended win waits one delay and wins at
/// its first attempt (nobody else asked), which ends the courtesy; the next one does not wait.
/// Other keys never wait.
#[tokio::test(start_paused = true)]
async fn a_courtesy_is_paid_once_and_only_for_the_contended_key() {
    let store = Arc::new(Store::new());
    let a = process(&store, 20);
    owe_courtesy(&store, &a).await;

    let other = Instant::now();
    a.acquire("other").await.unwrap().release().await.unwrap();
    assert_eq!(other.elapsed(), Duration::ZERO, "another key owes nothing");

    let paid = Instant::now();
    a.acquire("k").await.unwrap().release().await.unwrap();
    assert_eq!(
        paid.elapsed(),
        Duration::from_millis(20),
        "one delay of the policy"
    );

    let after = Instant::now();
    a.acquire("k").await.unwrap().release().await.unwrap();
    assert_eq!(after.elapsed(), Duration::ZERO, "paid once");
}

/// The courtesy never takes more than half the time left to the deadline, so the acquisition
/// still asks (and wins a free key) within its deadline; single tries never wait.
#[tokio::test(start_paused = true)]
async fn a_courtesy_keeps_within_the_deadline_and_single_tries_skip_it() {
    let store = Arc::new(Store::new());
    let a = process(&store, 20);
    owe_courtesy(&store, &a).await;
    let tried = Instant::now();
    a.try_acquire("k")
        .await
        .unwrap()
        .unwrap()
        .release()
        .await
        .unwrap();
    assert_eq!(
        tried.elapsed(),
        Duration::ZERO,
        "a single try does not wait"
    );

    owe_courtesy(&store, &a).await;
    let options = a.options().clone().with_retry(
        RetryPolicy::forever()
            .with_retry_delay(Duration::from_millis(20))
            .with_retry_jitter(Duration::ZERO)
            .with_deadline(Duration::from_millis(10)),
    );
    let bounded = Instant::now();
    a.acquire_with("k", &options)
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    assert_eq!(
        bounded.elapsed(),
        Duration::from_millis(5),
        "half the time to the deadline"
    );
}

/// A `stop` ends a courtesy's wait at once.
#[tokio::test(start_paused = true)]
async fn a_stop_ends_a_courtesy_wait() {
    let store = Arc::new(Store::new());
    let a = process(&store, 1000);
    owe_courtesy(&store, &a).await;
    let waiting = tokio::spawn({
        let a = a.clone();
        async move { a.acquire("k").await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let stopped = Instant::now();
    a.stop().await.unwrap();
    let error = waiting.await.unwrap().unwrap_err();
    assert!(matches!(error, LockError::Stopped), "{error}");
    assert!(stopped.elapsed() < Duration::from_millis(100));
}

/// On a store that wakes its waiters on release, they ask within a round trip or two of it:
/// the courtesy lasts 5 ms at most, however long the policy's delay.
#[tokio::test(start_paused = true)]
async fn a_courtesy_before_woken_waiters_is_short() {
    let store = Arc::new(Store::new().claiming_wake_ups());
    let a = process(&store, 200);
    owe_courtesy(&store, &a).await;
    let paid = Instant::now();
    a.acquire("k").await.unwrap().release().await.unwrap();
    assert_eq!(paid.elapsed(), Duration::from_millis(5));
}

//! The cases themselves. Each takes the backend as `Arc<dyn Lock>` and panics on failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::{Instant, sleep};

use crate::{
    LeaseKind, LockError, LockGuard, LockOptions, Locker, RetryCount, RetryPolicy, Token,
    raw::{Handle, KeySet, Lock, LockRequest},
};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A client under a fresh random namespace, with quick retries.
fn locker(lock: &Arc<dyn Lock>) -> Locker {
    let namespace = format!("conformance-{}", Token::generate().unwrap().fingerprint());
    locker_in(lock, &namespace)
}

fn locker_in(lock: &Arc<dyn Lock>, namespace: &str) -> Locker {
    Locker::from_arc(Arc::clone(lock))
        .with_namespace(Some(namespace))
        .unwrap()
        .with_options(options(ms(10_000), quick_retry()))
        .unwrap()
}

fn quick_retry() -> RetryPolicy {
    RetryPolicy::forever()
        .with_retry_delay(ms(2))
        .with_retry_jitter(ms(3))
        .with_deadline(Duration::from_secs(30))
}

fn options(ttl: Duration, retry: RetryPolicy) -> LockOptions {
    LockOptions::default().with_ttl(ttl).with_retry(retry)
}

fn with_options(locker: &Locker, ttl: Duration, retry: RetryPolicy) -> Locker {
    locker.clone().with_options(options(ttl, retry)).unwrap()
}

async fn assert_free(locker: &Locker, key: &str, why: &str) {
    let guard = locker.try_acquire(key).await.unwrap();
    assert!(guard.is_some(), "`{key}` should be free: {why}");
    guard.unwrap().release().await.unwrap();
}

async fn assert_held(locker: &Locker, key: &str, why: &str) {
    let guard = locker.try_acquire(key).await.unwrap();
    assert!(guard.is_none(), "`{key}` should be held: {why}");
}

/// Polls until `key` can be taken (and releases it), for at most `within`.
async fn eventually_free(locker: &Locker, key: &str, within: Duration, why: &str) {
    let started = Instant::now();
    loop {
        if let Some(guard) = locker.try_acquire(key).await.unwrap() {
            guard.release().await.unwrap();
            return;
        }
        assert!(
            started.elapsed() < within,
            "`{key}` still held after {within:?}: {why}"
        );
        sleep(ms(10)).await;
    }
}

/// A lock can be taken, describes itself, and can be taken again once released.
pub async fn acquire_release(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    let before = Instant::now();
    let guard = locker.acquire("resource").await.unwrap();
    let namespace = locker.namespace().unwrap().as_str().to_owned();
    assert_eq!(guard.key().as_str(), format!("{namespace}:resource"));
    assert_eq!(guard.keys().len(), 1);
    assert_eq!(guard.token().expose().len(), 32);
    assert!(guard.is_valid());
    assert!(guard.valid_until() > before);
    assert!(guard.valid_until() <= Instant::now() + locker.options().ttl());
    assert_eq!(guard.backend(), lock.name());
    assert!(
        !format!("{guard:?}").contains(&*guard.token().expose()),
        "Debug leaks the token"
    );
    guard.release().await.unwrap();
    assert_free(&locker, "resource", "it was released").await;
}

/// N tasks × M critical sections on one key: never two holders, no lost update.
pub async fn mutual_exclusion(lock: Arc<dyn Lock>) {
    const TASKS: usize = 8;
    const SECTIONS: usize = 25;
    let locker = locker(&lock);
    let active = Arc::new(AtomicUsize::new(0));
    let max_active = Arc::new(AtomicUsize::new(0));
    let counter = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..TASKS {
        let (locker, active, max_active, counter) = (
            locker.clone(),
            active.clone(),
            max_active.clone(),
            counter.clone(),
        );
        tasks.spawn(async move {
            for _ in 0..SECTIONS {
                let guard = locker.acquire("counter").await.unwrap();
                let now_active = active.fetch_add(1, Ordering::SeqCst) + 1;
                max_active.fetch_max(now_active, Ordering::SeqCst);
                // A non-atomic read, yield, write: any overlap loses an update.
                let seen = counter.load(Ordering::SeqCst);
                tokio::task::yield_now().await;
                sleep(Duration::from_micros(200)).await;
                counter.store(seen + 1, Ordering::SeqCst);
                active.fetch_sub(1, Ordering::SeqCst);
                guard.release().await.unwrap();
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
    }
    assert_eq!(
        max_active.load(Ordering::SeqCst),
        1,
        "two holders overlapped"
    );
    assert_eq!(
        counter.load(Ordering::SeqCst),
        (TASKS * SECTIONS) as u64,
        "lost updates"
    );
}

/// A lock that is never released frees itself after its ttl.
pub async fn ttl_expiry_lets_next_holder_in(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    let short = with_options(&locker, ms(150), quick_retry());
    let first = short.acquire("expiring").await.unwrap();
    assert_held(&locker, "expiring", "its ttl has not passed").await;
    sleep(ms(300)).await;
    assert!(!first.is_valid());
    assert_free(&locker, "expiring", "its ttl passed").await;
    drop(first);
}

/// Extending moves the expiry to now + ttl.
pub async fn extend_prolongs(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    let short = with_options(&locker, ms(300), quick_retry());
    let mut guard = short.acquire("extended").await.unwrap();
    sleep(ms(150)).await;
    let before = guard.valid_until();
    guard.extend(ms(800)).await.unwrap();
    assert!(guard.valid_until() > before, "validity did not move");
    sleep(ms(350)).await;
    assert!(guard.is_valid());
    assert_held(&locker, "extended", "it was extended past its first ttl").await;
    guard.release().await.unwrap();
    assert_free(&locker, "extended", "it was released").await;
}

/// A holder whose lock expired and was taken over can neither release nor extend it.
pub async fn expired_holder_cannot_release_or_extend(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    let short = with_options(&locker, ms(100), quick_retry());
    let mut stale = short.acquire("taken-over").await.unwrap();
    sleep(ms(250)).await;
    let next = locker.acquire("taken-over").await.unwrap();
    assert_ne!(next.token(), stale.token());

    if lock.capabilities().extend {
        let error = stale.extend(ms(5_000)).await.unwrap_err();
        assert!(
            matches!(error, LockError::NotHeld { .. }),
            "stale extend: {error:?}"
        );
    }
    assert_held(
        &locker,
        "taken-over",
        "a stale extend must not disturb the next holder",
    )
    .await;
    let error = stale.release().await.unwrap_err();
    assert!(
        matches!(error, LockError::NotHeld { .. }),
        "stale release: {error:?}"
    );
    assert_held(
        &locker,
        "taken-over",
        "a stale release must not free the next holder's lock",
    )
    .await;
    next.release().await.unwrap();
    assert_free(&locker, "taken-over", "the real holder released it").await;
}

/// `try_acquire` on a held key is `Ok(None)`, not an error, and does not wait.
pub async fn try_acquire_on_held_key(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    let slow = with_options(
        &locker,
        ms(10_000),
        RetryPolicy::forever().with_retry_delay(ms(500)),
    );
    let guard = locker.acquire("busy").await.unwrap();
    let started = Instant::now();
    assert!(slow.try_acquire("busy").await.unwrap().is_none());
    assert!(
        started.elapsed() < ms(400),
        "try_acquire waited {:?}",
        started.elapsed()
    );
    guard.release().await.unwrap();
}

/// When retries or the deadline run out, the error is `Timeout`, on time.
pub async fn retry_exhaustion_times_out_within_deadline(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    let holder = locker.acquire("contended").await.unwrap();

    let deadline = ms(300);
    let bounded = with_options(
        &locker,
        ms(10_000),
        RetryPolicy::forever()
            .with_retry_delay(ms(20))
            .with_retry_jitter(ms(10))
            .with_deadline(deadline),
    );
    let started = Instant::now();
    let error = bounded.acquire("contended").await.unwrap_err();
    let waited = started.elapsed();
    assert!(matches!(error, LockError::Timeout { .. }), "{error:?}");
    assert!(
        waited >= deadline - ms(30),
        "gave up early, after {waited:?}"
    );
    assert!(
        waited <= deadline + ms(250),
        "overran the deadline: {waited:?}"
    );

    let counted = with_options(
        &locker,
        ms(10_000),
        RetryPolicy::default()
            .with_retry_count(RetryCount::Limited(3))
            .with_retry_delay(ms(5))
            .with_retry_jitter(Duration::ZERO),
    );
    // A waiter in a fair line lets short delays pass without asking (it is woken by its turn)
    // but still makes the first attempt and the last its policy allows.
    let expected = if lock.capabilities().fair {
        2..=4
    } else {
        4..=4
    };
    match counted.acquire("contended").await.unwrap_err() {
        LockError::Timeout { attempts, .. } => assert!(
            expected.contains(&attempts),
            "{attempts} attempts, expected {expected:?}"
        ),
        other => panic!("expected a timeout after 4 attempts, got {other:?}"),
    }
    holder.release().await.unwrap();
}

/// A single-attempt policy answers `Locked` at once; so does a fail-fast backend by default.
pub async fn single_attempt_returns_locked_at_once(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    let holder = locker.acquire("locked").await.unwrap();
    let once = with_options(&locker, ms(10_000), RetryPolicy::none());
    let started = Instant::now();
    let error = once.acquire("locked").await.unwrap_err();
    assert!(matches!(error, LockError::Locked { .. }), "{error:?}");
    assert!(error.to_string().contains("locked"), "{error}");
    assert!(started.elapsed() < ms(400), "took {:?}", started.elapsed());

    if lock.capabilities().fail_fast {
        let default = Locker::from_arc(Arc::clone(&lock))
            .with_namespace(locker.namespace().map(|ns| ns.as_str()))
            .unwrap();
        let error = default.acquire("locked").await.unwrap_err();
        assert!(
            matches!(error, LockError::Locked { .. }),
            "fail-fast default: {error:?}"
        );
    }
    holder.release().await.unwrap();
}

/// Namespaces keep equal keys apart; `lock_ns` and `key_for` name the stored keys.
pub async fn namespace_isolation(lock: Arc<dyn Lock>) {
    let a = locker(&lock);
    let b = locker(&lock);
    let a_again = locker_in(&lock, a.namespace().unwrap().as_str());
    let in_a = a.acquire("shared").await.unwrap();
    let in_b = b.acquire("shared").await.unwrap();
    assert_ne!(in_a.key(), in_b.key());
    assert_held(&a_again, "shared", "same namespace, same key").await;
    assert_eq!(&a.lock_ns("shared").unwrap(), in_a.key());
    let b_name = b.namespace().unwrap().as_str().to_owned();
    assert_eq!(&a.key_for(Some(&b_name), "shared").unwrap(), in_b.key());
    assert_eq!(a.key_for(None, "shared").unwrap().as_str(), "shared");
    in_a.release().await.unwrap();
    in_b.release().await.unwrap();
}

/// Dropping a guard releases the lock in the background.
pub async fn guard_drop_releases(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    let guard = locker.acquire("dropped").await.unwrap();
    drop(guard);
    eventually_free(&locker, "dropped", ms(2_000), "its guard was dropped").await;
}

/// Acquisitions dropped at any point, waiting or mid-attempt, leave no lock behind.
pub async fn cancelled_acquire_leaves_nothing(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    // Cancel while waiting behind a holder.
    let holder = locker.acquire("cancelled").await.unwrap();
    let waiter = locker.clone();
    let cancelled =
        tokio::time::timeout(ms(50), async move { waiter.acquire("cancelled").await }).await;
    assert!(
        cancelled.is_err(),
        "the waiter should still have been waiting"
    );
    holder.release().await.unwrap();
    assert_free(
        &locker,
        "cancelled",
        "the cancelled waiter must not take it",
    )
    .await;

    // Cancel at many points of an uncontended acquisition, including mid-flight.
    for step in 0..40u64 {
        let attempt = locker.clone();
        let _ = tokio::time::timeout(Duration::from_micros(step * 50), async move {
            attempt.acquire("cancelled").await
        })
        .await;
    }
    eventually_free(
        &locker,
        "cancelled",
        ms(2_000),
        "every cancelled acquisition cleaned up",
    )
    .await;
}

/// Tokens are fresh and distinct for every acquisition.
pub async fn token_uniqueness(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    let mut seen = HashSet::new();
    for _ in 0..100 {
        let guard = locker.acquire("tokens").await.unwrap();
        assert!(
            guard
                .token()
                .expose()
                .bytes()
                .all(|b| b.is_ascii_hexdigit())
        );
        assert!(
            seen.insert(guard.token().expose().to_string()),
            "token repeated"
        );
        guard.release().await.unwrap();
    }
    let one = locker.acquire("tokens-a").await.unwrap();
    let two = locker.acquire("tokens-b").await.unwrap();
    assert_ne!(one.token(), two.token());
    one.release().await.unwrap();
    two.release().await.unwrap();
}

fn assert_invalid(result: Result<impl std::fmt::Debug, LockError>, field: &str) {
    match result {
        Err(LockError::InvalidInput { field: got, .. }) => assert_eq!(got, field),
        other => panic!("expected invalid {field}, got {other:?}"),
    }
}

/// Bad keys and ttls are refused with a typed error naming the field, before any I/O.
pub async fn bad_input_rejected(lock: Arc<dyn Lock>) {
    let plain = Locker::from_arc(Arc::clone(&lock));
    assert_invalid(plain.acquire("").await, "key");
    assert_invalid(plain.try_acquire("").await, "key");
    assert_invalid(plain.acquire(&"k".repeat(4096)).await, "key");
    let locker = locker(&lock);
    assert_invalid(locker.acquire("").await, "key");
    for ttl in [Duration::ZERO, Duration::from_secs(400 * 24 * 3600)] {
        let options = LockOptions::default().with_ttl(ttl);
        assert_invalid(locker.acquire_with("k", &options).await, "ttl");
        assert_invalid(locker.clone().with_options(options), "ttl");
    }
    assert_invalid(locker.clone().with_namespace(Some("")), "namespace");
    let mut guard = locker.acquire("k").await.unwrap();
    assert_invalid(guard.extend(Duration::ZERO).await, "ttl");
    assert_held(&locker, "k", "a rejected extend must not release the lock").await;
    guard.release().await.unwrap();
}

/// Unicode and hostile keys are stored verbatim and work like any other.
pub async fn unicode_and_hostile_keys(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    for key in ["clé🔒", "x'); redis.call('flushall') --", "a b\tc\"d", "*"] {
        let guard = locker.acquire(key).await.unwrap();
        assert!(guard.key().as_str().ends_with(key));
        assert_held(&locker, key, "it is locked").await;
        guard.release().await.unwrap();
        assert_free(&locker, key, "it was released").await;
    }
}

/// `with_lock` holds the lock around the section, releases it, and reports a section that
/// outlived its lock.
pub async fn with_lock_runs_and_releases(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    let probe = locker.clone();
    let value = locker
        .with_lock("scoped", |info| async move {
            assert!(info.key().as_str().ends_with(":scoped"));
            assert!(
                probe.try_acquire("scoped").await.unwrap().is_none(),
                "not held inside"
            );
            42
        })
        .await
        .unwrap();
    assert_eq!(value, 42);
    assert_free(&locker, "scoped", "with_lock released it").await;

    // A ttl of 1 s leaves the watchdog a third of it (333 ms) to extend on every node, even on
    // a loaded machine (200 ms, with 600 ms, was passed now and then under a parallel test
    // run); the section outlives the ttl more than twice.
    let short = with_options(&locker, ms(1_000), quick_retry());
    let outcome = short
        .with_lock("scoped", |lease| async move {
            sleep(ms(2_200)).await;
            lease.lost.is_lost()
        })
        .await;
    if lock.capabilities().extend {
        // The watchdog extended the lock through the long section.
        assert!(
            !outcome.unwrap(),
            "the lock was lost although it could be extended"
        );
    } else {
        let error = outcome.unwrap_err();
        assert!(matches!(error, LockError::NotHeld { .. }), "{error:?}");
    }
}

/// Several keys are taken as one lock, and a partial acquisition leaves nothing behind.
pub async fn multi_key_all_or_nothing(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    let both = locker.acquire_many(&["a", "b"]).await.unwrap();
    assert_eq!(both.keys().len(), 2);
    assert_held(&locker, "a", "part of a multi-key lock").await;
    assert_held(&locker, "b", "part of a multi-key lock").await;
    both.release().await.unwrap();
    assert_free(&locker, "a", "released").await;

    let b = locker.acquire("b").await.unwrap();
    let once = with_options(&locker, ms(10_000), RetryPolicy::none());
    let error = once.acquire_many(&["a", "b"]).await.unwrap_err();
    assert!(matches!(error, LockError::Locked { .. }), "{error:?}");
    assert_free(
        &locker,
        "a",
        "a failed multi-key attempt must undo its partial win",
    )
    .await;
    b.release().await.unwrap();
}

/// A backend without `multi_key` refuses several keys with `Unsupported`, and takes nothing.
pub async fn multi_key_refused_without_the_capability(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    let error = locker.acquire_many(&["a", "b"]).await.unwrap_err();
    assert!(
        matches!(error, LockError::Unsupported { .. }),
        "acquire_many without multi_key: {error:?}"
    );
    assert_free(&locker, "a", "a refused multi-key request takes nothing").await;
    assert_free(&locker, "b", "a refused multi-key request takes nothing").await;
}

/// Fencing tokens strictly increase per key, across releases and expiry.
pub async fn fencing_tokens_increase(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    let short = with_options(&locker, ms(100), quick_retry());
    let mut last = 0;
    for round in 0..10 {
        let guard = if round % 2 == 0 {
            locker.acquire("fenced").await.unwrap()
        } else {
            short.acquire("fenced").await.unwrap()
        };
        let fence = guard
            .fencing_token()
            .expect("a fencing backend must return a fencing token");
        assert!(fence > last, "fencing token went from {last} to {fence}");
        last = fence;
        if round % 2 == 0 {
            guard.release().await.unwrap();
        } else {
            sleep(ms(200)).await;
            drop(guard);
        }
    }
}

/// Waiters are woken by a release, long before their retry delay.
pub async fn waiters_wake_on_release(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    let patient = with_options(
        &locker,
        ms(10_000),
        RetryPolicy::forever()
            .with_retry_delay(ms(5_000))
            .with_retry_jitter(Duration::ZERO),
    );
    let holder = locker.acquire("wake").await.unwrap();
    let waiter = tokio::spawn(async move {
        let started = Instant::now();
        let guard = patient.acquire("wake").await.unwrap();
        let waited = started.elapsed();
        guard.release().await.unwrap();
        waited
    });
    sleep(ms(100)).await;
    holder.release().await.unwrap();
    let waited = waiter.await.unwrap();
    assert!(
        waited < ms(2_000),
        "the waiter slept {waited:?} instead of waking on release"
    );

    let short = with_options(&locker, ms(200), quick_retry());
    let expiring = short.acquire("wake").await.unwrap();
    let patient = with_options(
        &locker,
        ms(10_000),
        RetryPolicy::forever()
            .with_retry_delay(ms(5_000))
            .with_retry_jitter(Duration::ZERO),
    );
    let started = Instant::now();
    patient
        .acquire("wake")
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    assert!(
        started.elapsed() < ms(2_000),
        "the waiter did not wake when the lock expired"
    );
    drop(expiring);
}

/// A watched lock outlives its ttl many times over, and is released normally.
pub async fn watchdog_keeps_the_lock_alive(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    // 1 s leaves the watchdog 333 ms to extend on every node, even on a loaded machine.
    let short = with_options(&locker, ms(1_000), quick_retry());
    let mut guard = short.acquire("watched").await.unwrap();
    let lost = guard.keep_alive().unwrap();
    sleep(ms(2_500)).await;
    assert!(!lost.is_lost(), "the watchdog let the lock go");
    assert!(guard.is_valid());
    assert_held(&locker, "watched", "the watchdog keeps extending it").await;
    guard.release().await.unwrap();
    assert_free(&locker, "watched", "it was released").await;
    assert!(!lost.is_lost(), "a release is not a loss");
}

/// When the lock is taken away, the lost signal fires (at the next extension, or when the
/// validity lapses for a backend that cannot extend).
pub async fn lost_signal_fires_when_the_lock_is_taken_away(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    let short = with_options(&locker, ms(300), quick_retry());
    let mut guard = short.acquire("taken-away").await.unwrap();
    let lost = guard.keep_alive().unwrap();
    assert!(!lost.is_lost());
    // Remove it behind the holder's back, as an expiry or an operator would.
    let request = LockRequest::new(
        KeySet::many(guard.keys().to_vec()).unwrap(),
        guard.token().clone(),
        ms(300),
    )
    .unwrap();
    assert!(lock.abandon(&request).await.unwrap());
    let started = Instant::now();
    tokio::time::timeout(ms(2_000), lost.lost())
        .await
        .expect("the lost signal did not fire");
    assert!(lost.is_lost());
    assert!(
        started.elapsed() <= ms(600),
        "it took {:?} to notice",
        started.elapsed()
    );
    let next = locker.acquire("taken-away").await.unwrap();
    drop(guard);
    sleep(ms(100)).await;
    assert_held(
        &locker,
        "taken-away",
        "dropping the lost guard must not free the new holder",
    )
    .await;
    next.release().await.unwrap();
}

/// A backend whose answers are decided in the call ([`Answer::ready`](crate::raw::Answer::ready))
/// answers exactly as when they are awaited, and both ways of taking an answer work with both
/// kinds of handle; on every backend a handle is released once, whichever way its release is
/// taken, and a second release reports that it is not held.
pub async fn immediate_and_awaited_answers_agree(lock: Arc<dyn Lock>) {
    let key = locker(&lock).lock_ns("at-once").unwrap();
    let request = || {
        LockRequest::new(
            KeySet::one(key.clone()),
            Token::generate().unwrap(),
            ms(10_000),
        )
        .unwrap()
    };
    // Only a backend that answers at once for a free key has immediate answers to compare.
    let first = request();
    if let Ok(first) = lock.try_acquire(&first).now() {
        let mut taken_at_once = first.unwrap().expect("a free key is taken at once");
        assert!(
            lock.try_acquire(&request()).await.unwrap().is_none(),
            "the awaited attempt must see the key taken at once"
        );
        let again = request();
        assert!(
            matches!(lock.try_acquire(&again).now(), Ok(Ok(None))),
            "the immediate attempt must see the key held"
        );
        taken_at_once.release().await.unwrap();
    }

    let mut taken_awaited = lock
        .try_acquire(&request())
        .await
        .unwrap()
        .expect("the key is free");
    let again = request();
    if let Ok(answer) = lock.try_acquire(&again).now() {
        assert!(
            matches!(answer, Ok(None)),
            "the immediate attempt must see the key taken when awaited"
        );
    }
    release_either_way(taken_awaited.as_mut()).await.unwrap();
    let again = release_either_way(taken_awaited.as_mut()).await;
    assert!(
        matches!(again, Err(LockError::NotHeld { .. })),
        "a second release must report not held, got {again:?}"
    );
    let last = request();
    let mut last = match lock.try_acquire(&last).now() {
        Ok(answer) => answer,
        Err(later) => later.await,
    }
    .unwrap()
    .expect("the released key is free");
    release_either_way(last.as_mut()).await.unwrap();
}

/// An answer that needs awaiting ([`Answer::later`](crate::raw::Answer::later)) does nothing
/// before it is first polled, neither in its future nor in the call that made it: the core
/// drops such answers unpolled and asks again (see [`Answer`](crate::raw::Answer)). An attempt
/// dropped unpolled leaves the key free, and a release dropped unpolled leaves the lock held.
pub async fn an_answer_dropped_unpolled_does_nothing(lock: Arc<dyn Lock>) {
    let key = locker(&lock).lock_ns("unpolled").unwrap();
    let request = || {
        LockRequest::new(
            KeySet::one(key.clone()),
            Token::generate().unwrap(),
            ms(10_000),
        )
        .unwrap()
    };
    let dropped = request();
    if let Ok(taken) = lock.try_acquire(&dropped).now() {
        // Decided in the call: the attempt has happened; give the key back.
        let mut taken = taken.unwrap().expect("a free key is taken at once");
        release_either_way(taken.as_mut()).await.unwrap();
    }
    let mut held = lock
        .try_acquire(&request())
        .await
        .unwrap()
        .expect("an attempt dropped unpolled must leave the key free");
    if let Ok(released) = held.release().now() {
        // Decided in the call: the release has happened.
        released.unwrap();
        return;
    }
    assert!(
        lock.try_acquire(&request()).await.unwrap().is_none(),
        "a release dropped unpolled must leave the lock held"
    );
    held.release().await.unwrap();
}

async fn release_either_way(handle: &mut dyn Handle) -> crate::Result<()> {
    match handle.release().now() {
        Ok(result) => result,
        Err(later) => later.await,
    }
}

// ---- Semaphores -------------------------------------------------------------------------

fn permit(permits: u32) -> LeaseKind {
    LeaseKind::permit(permits).unwrap()
}

/// Takes `n` leases of `kind` on `key` at once with single attempts, for at most `within`
/// (backends that clean up in the background may need a moment after a release).
async fn eventually_takes(
    locker: &Locker,
    key: &str,
    kind: LeaseKind,
    n: usize,
    within: Duration,
    why: &str,
) -> Vec<LockGuard> {
    let started = Instant::now();
    loop {
        let mut taken = Vec::new();
        for _ in 0..n {
            match locker.try_acquire_kind(key, kind).await.unwrap() {
                Some(guard) => taken.push(guard),
                None => break,
            }
        }
        if taken.len() == n {
            return taken;
        }
        let got = taken.len();
        for guard in taken {
            guard.release().await.unwrap();
        }
        assert!(
            started.elapsed() < within,
            "only {got} of {n} leases of {kind} on `{key}` could be taken after {within:?}: {why}"
        );
        sleep(ms(10)).await;
    }
}

/// Many tasks on a semaphore of 3 permits: never more than 3 holders, and 3 at times.
pub async fn semaphore_admits_at_most_its_permits(lock: Arc<dyn Lock>) {
    const PERMITS: u32 = 3;
    const TASKS: usize = 8;
    const SECTIONS: usize = 8;
    let locker = locker(&lock);
    let active = Arc::new(AtomicUsize::new(0));
    let max_active = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..TASKS {
        let (locker, active, max_active) = (locker.clone(), active.clone(), max_active.clone());
        tasks.spawn(async move {
            let mut fences = Vec::new();
            for _ in 0..SECTIONS {
                let guard = locker.acquire_permit("pool", PERMITS).await.unwrap();
                assert_eq!(guard.kind(), permit(PERMITS));
                fences.extend(guard.fencing_token());
                let now_active = active.fetch_add(1, Ordering::SeqCst) + 1;
                max_active.fetch_max(now_active, Ordering::SeqCst);
                sleep(ms(5)).await;
                active.fetch_sub(1, Ordering::SeqCst);
                guard.release().await.unwrap();
            }
            fences
        });
    }
    let mut fences = Vec::new();
    while let Some(result) = tasks.join_next().await {
        fences.extend(result.unwrap());
    }
    let max = max_active.load(Ordering::SeqCst);
    assert!(
        max <= PERMITS as usize,
        "{max} holders of a semaphore of {PERMITS}"
    );
    let distinct: HashSet<_> = fences.iter().collect();
    assert_eq!(
        distinct.len(),
        fences.len(),
        "two permits shared a fencing token"
    );
    // All of them at once, and not one more. (Whether the contention above happened to reach
    // N holders at once depends on timing; this does not.)
    let all = eventually_takes(
        &locker,
        "pool",
        permit(PERMITS),
        PERMITS as usize,
        ms(2_000),
        "all released",
    )
    .await;
    assert!(
        locker
            .try_acquire_kind("pool", permit(PERMITS))
            .await
            .unwrap()
            .is_none(),
        "a permit beyond the {PERMITS} held"
    );
    for guard in all {
        guard.release().await.unwrap();
    }
}

/// A permit is a lease: extend, release, a single try when full, and the permit back after
/// release.
pub async fn permits_are_leases(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    let mut a = locker.acquire_permit("lease", 2).await.unwrap();
    let b = locker.acquire_permit("lease", 2).await.unwrap();
    assert_ne!(a.token(), b.token());
    assert!(
        locker
            .try_acquire_kind("lease", permit(2))
            .await
            .unwrap()
            .is_none(),
        "a third permit of a semaphore of 2"
    );
    if lock.capabilities().extend {
        a.extend(ms(20_000)).await.unwrap();
        assert!(
            a.remaining() > ms(10_000),
            "extend did not move the permit's validity"
        );
    }
    a.release().await.unwrap();
    let c = eventually_takes(
        &locker,
        "lease",
        permit(2),
        1,
        ms(2_000),
        "a permit was released",
    )
    .await;
    b.release().await.unwrap();
    for guard in c {
        guard.release().await.unwrap();
    }
    let zero = locker.acquire_permit("lease", 0).await.unwrap_err();
    assert!(
        matches!(zero, LockError::InvalidInput { .. }),
        "0 permits: {zero:?}"
    );
}

/// An expired permit frees its place, and its holder can neither release nor extend the
/// permit of whoever came next.
pub async fn expired_permit_is_powerless(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    let short = with_options(&locker, ms(300), quick_retry());
    let mut stale = short.acquire_permit("expiring", 1).await.unwrap();
    sleep(ms(450)).await;
    let next = locker
        .try_acquire_kind("expiring", permit(1))
        .await
        .unwrap()
        .expect("the expired permit was not reclaimed");
    if lock.capabilities().extend {
        let error = stale.extend(ms(5_000)).await.unwrap_err();
        assert!(matches!(error, LockError::NotHeld { .. }), "{error:?}");
    }
    let error = stale.release().await.unwrap_err();
    assert!(matches!(error, LockError::NotHeld { .. }), "{error:?}");
    assert!(
        locker
            .try_acquire_kind("expiring", permit(1))
            .await
            .unwrap()
            .is_none(),
        "the stale release freed the next holder's permit"
    );
    next.release().await.unwrap();
}

/// Waits for a permit dropped at any point leave no permit taken.
pub async fn cancelled_permit_waits_leave_nothing(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    let held = eventually_takes(&locker, "busy", permit(2), 2, ms(2_000), "fresh").await;
    for _ in 0..3 {
        let waiter = locker.clone();
        let cancelled =
            tokio::time::timeout(
                ms(50),
                async move { waiter.acquire_permit("busy", 2).await },
            )
            .await;
        assert!(cancelled.is_err(), "a third permit was handed out");
    }
    for guard in held {
        guard.release().await.unwrap();
    }
    for step in 0..40u64 {
        let attempt = locker.clone();
        let _ = tokio::time::timeout(Duration::from_micros(step * 50), async move {
            attempt.acquire_permit("busy", 2).await
        })
        .await;
    }
    let again = eventually_takes(&locker, "busy", permit(2), 2, ms(2_000), "cancelled waits").await;
    for guard in again {
        guard.release().await.unwrap();
    }
}

/// A key is one kind of lock: a semaphore asked for with another size is refused with
/// `KindMismatch`; a mutex and a semaphore on one key never both get in.
pub async fn a_key_is_one_kind_of_lock(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    let two = locker.acquire_permit("sized", 2).await.unwrap();
    match locker.try_acquire_kind("sized", permit(3)).await {
        Err(LockError::KindMismatch { ref found, .. }) => {
            assert!(
                found.contains('2'),
                "the error should name the size in use: {found}"
            );
        }
        other => panic!("a semaphore of 2 asked for as one of 3: {other:?}"),
    }
    match locker.try_acquire("sized").await {
        Ok(None) | Err(LockError::KindMismatch { .. }) => {}
        other => panic!("a mutex on a key held as a semaphore: {other:?}"),
    }
    two.release().await.unwrap();
    let mutex = locker.acquire("mutex").await.unwrap();
    match locker.try_acquire_kind("mutex", permit(5)).await {
        Ok(None) | Err(LockError::KindMismatch { .. }) => {}
        other => panic!("a semaphore on a key held as a mutex: {other:?}"),
    }
    mutex.release().await.unwrap();
    // Once nobody holds it, a key can be used another way.
    let three = eventually_takes(&locker, "sized", permit(3), 3, ms(2_000), "all released").await;
    for guard in three {
        guard.release().await.unwrap();
    }
}

/// A backend without semaphores says so, and takes nothing.
pub async fn semaphore_refused_without_the_capability(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    let error = locker.acquire_permit("pool", 2).await.unwrap_err();
    assert!(matches!(error, LockError::Unsupported { .. }), "{error:?}");
    assert_free(&locker, "pool", "a refused permit takes nothing").await;
}

// ---- Read-write locks -------------------------------------------------------------------

/// Readers share; a writer excludes readers and other writers.
pub async fn readers_share_and_writers_exclude(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    let r1 = locker.acquire_read("rw").await.unwrap();
    let r2 = locker.acquire_read("rw").await.unwrap();
    assert_eq!(r1.kind(), LeaseKind::Read);
    assert!(
        locker
            .try_acquire_kind("rw", LeaseKind::Write)
            .await
            .unwrap()
            .is_none(),
        "a writer got in beside readers"
    );
    r1.release().await.unwrap();
    r2.release().await.unwrap();
    let w = eventually_takes(
        &locker,
        "rw",
        LeaseKind::Write,
        1,
        ms(2_000),
        "readers left",
    )
    .await;
    assert!(
        locker
            .try_acquire_kind("rw", LeaseKind::Read)
            .await
            .unwrap()
            .is_none(),
        "a reader got in beside a writer"
    );
    assert!(
        locker
            .try_acquire_kind("rw", LeaseKind::Write)
            .await
            .unwrap()
            .is_none(),
        "two writers"
    );
    for guard in w {
        guard.release().await.unwrap();
    }
    let r = eventually_takes(
        &locker,
        "rw",
        LeaseKind::Read,
        3,
        ms(2_000),
        "the writer left",
    )
    .await;
    for guard in r {
        guard.release().await.unwrap();
    }
}

/// Readers and writers under contention: never a writer with anyone else, no lost update.
pub async fn read_write_exclusion_under_contention(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    let readers = Arc::new(AtomicUsize::new(0));
    let writers = Arc::new(AtomicUsize::new(0));
    let counter = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for task in 0..8usize {
        let (locker, readers, writers, counter) = (
            locker.clone(),
            readers.clone(),
            writers.clone(),
            counter.clone(),
        );
        tasks.spawn(async move {
            for _ in 0..8 {
                if task % 2 == 0 {
                    let guard = locker.acquire_write("shared").await.unwrap();
                    assert_eq!(writers.fetch_add(1, Ordering::SeqCst), 0, "two writers");
                    assert_eq!(readers.load(Ordering::SeqCst), 0, "a writer beside readers");
                    let seen = counter.load(Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    counter.store(seen + 1, Ordering::SeqCst);
                    writers.fetch_sub(1, Ordering::SeqCst);
                    guard.release().await.unwrap();
                } else {
                    let guard = locker.acquire_read("shared").await.unwrap();
                    readers.fetch_add(1, Ordering::SeqCst);
                    assert_eq!(
                        writers.load(Ordering::SeqCst),
                        0,
                        "a reader beside a writer"
                    );
                    sleep(ms(2)).await;
                    readers.fetch_sub(1, Ordering::SeqCst);
                    guard.release().await.unwrap();
                }
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
    }
    assert_eq!(counter.load(Ordering::SeqCst), 32, "a write was lost");
}

/// A stream of overlapping readers does not starve a writer: once it waits, new readers stay
/// out until it has had its turn.
pub async fn waiting_writer_is_not_starved(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = JoinSet::new();
    for _ in 0..4 {
        let (locker, stop) = (locker.clone(), stop.clone());
        readers.spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let guard = locker.acquire_read("busy").await.unwrap();
                sleep(ms(30)).await;
                guard.release().await.unwrap();
            }
        });
    }
    sleep(ms(100)).await;
    let writer = with_options(
        &locker,
        ms(10_000),
        quick_retry().with_deadline(Duration::from_secs(5)),
    );
    let result = writer.acquire_write("busy").await;
    stop.store(true, Ordering::SeqCst);
    let guard = result.expect("a writer starved by overlapping readers");
    guard.release().await.unwrap();
    while let Some(result) = readers.join_next().await {
        result.unwrap();
    }
}

/// A writer that stops waiting (cancelled or out of time) lets readers in again at once, not
/// only when its claim expires.
pub async fn a_writer_that_stops_waiting_lets_readers_in(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    let reader = locker.acquire_read("claimed").await.unwrap();
    let writer = locker.clone();
    let cancelled = tokio::time::timeout(
        ms(100),
        async move { writer.acquire_write("claimed").await },
    )
    .await;
    assert!(cancelled.is_err(), "the writer got in beside a reader");
    // The writer's claim lives for its ttl (10 s): only taking it back lets readers in now.
    let more = eventually_takes(
        &locker,
        "claimed",
        LeaseKind::Read,
        1,
        ms(2_000),
        "cancelled",
    )
    .await;
    let timed_out = with_options(&locker, ms(10_000), quick_retry().with_deadline(ms(100)));
    let error = timed_out.acquire_write("claimed").await.unwrap_err();
    assert!(matches!(error, LockError::Timeout { .. }), "{error:?}");
    let again = eventually_takes(
        &locker,
        "claimed",
        LeaseKind::Read,
        1,
        ms(2_000),
        "timed out",
    )
    .await;
    for guard in more.into_iter().chain(again) {
        guard.release().await.unwrap();
    }
    reader.release().await.unwrap();
}

/// A write lock turns into a read lock in place: readers join, writers stay out; a read lock
/// cannot be downgraded (and there is no upgrade).
pub async fn downgrade_keeps_the_lock_and_lets_readers_in(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    let mut w = locker.acquire_write("down").await.unwrap();
    let fence = w.fencing_token();
    assert!(
        locker
            .try_acquire_kind("down", LeaseKind::Read)
            .await
            .unwrap()
            .is_none()
    );
    w.downgrade().await.unwrap();
    assert_eq!(w.kind(), LeaseKind::Read);
    assert_eq!(
        w.fencing_token(),
        fence,
        "downgrade changed the fencing token"
    );
    let r = locker
        .try_acquire_kind("down", LeaseKind::Read)
        .await
        .unwrap()
        .expect("a reader after the downgrade");
    assert!(
        locker
            .try_acquire_kind("down", LeaseKind::Write)
            .await
            .unwrap()
            .is_none(),
        "a writer beside a downgraded reader"
    );
    let mut r2 = r;
    let error = r2.downgrade().await.unwrap_err();
    assert!(matches!(error, LockError::InvalidInput { .. }), "{error:?}");
    w.release().await.unwrap();
    r2.release().await.unwrap();
    let free = eventually_takes(&locker, "down", LeaseKind::Write, 1, ms(2_000), "released").await;
    for guard in free {
        guard.release().await.unwrap();
    }
}

/// An expired reader frees its place, and can neither release nor extend anything after.
pub async fn expired_reader_is_powerless(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    let short = with_options(&locker, ms(300), quick_retry());
    let mut stale = short.acquire_read("expiring").await.unwrap();
    sleep(ms(450)).await;
    let writer = locker
        .try_acquire_kind("expiring", LeaseKind::Write)
        .await
        .unwrap()
        .expect("the expired reader was not reclaimed");
    if lock.capabilities().extend {
        let error = stale.extend(ms(5_000)).await.unwrap_err();
        assert!(matches!(error, LockError::NotHeld { .. }), "{error:?}");
    }
    let error = stale.release().await.unwrap_err();
    assert!(matches!(error, LockError::NotHeld { .. }), "{error:?}");
    assert!(
        locker
            .try_acquire_kind("expiring", LeaseKind::Read)
            .await
            .unwrap()
            .is_none(),
        "the stale reader freed the writer's lock"
    );
    writer.release().await.unwrap();
}

/// A backend without read-write locks says so, and takes nothing.
pub async fn read_write_refused_without_the_capability(lock: Arc<dyn Lock>) {
    let locker = locker(&lock);
    let error = locker.acquire_read("rw").await.unwrap_err();
    assert!(matches!(error, LockError::Unsupported { .. }), "{error:?}");
    let error = locker.acquire_write("rw").await.unwrap_err();
    assert!(matches!(error, LockError::Unsupported { .. }), "{error:?}");
    assert_free(&locker, "rw", "a refused read-write lock takes nothing").await;
}

//! A fair waiter's first attempt on one node (`redis`). On a key its client's waiters lately
//! lined up on, it goes through the line at once, not through a plain `SET NX` the line would
//! refuse; and a refused waiter's attempt reads the key's value in the same round trip, so that
//! the look at the key's type (a key of another type, or a lease, would refuse every attempt)
//! is only asked where that value was not a lock's. Neither shortcut may cost a typed error:
//! a waiter that expects a line and meets another type, or a lease, still gets one at once.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::{LockError, Locker, RetryPolicy};
use lock_tests::fair::{Store, Target, connect};
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(10);

/// A fair client that waits up to `deadline`, polling every 100 ms besides its wake-ups.
async fn client(target: &Target, deadline: Duration) -> Locker {
    target
        .locker(
            true,
            TTL,
            RetryPolicy::forever()
                .with_retry_delay(Duration::from_millis(100))
                .with_deadline(deadline),
        )
        .await
}

/// `waiter` waits on `key` behind `holder` (its client lines up there), and takes it when
/// `holder` lets go; both release.
async fn wait_behind(holder: &Locker, waiter: &Locker, key: &str) {
    let held = holder.acquire(key).await.unwrap();
    let waiting = {
        let waiter = waiter.clone();
        let key = key.to_owned();
        tokio::spawn(async move { waiter.acquire(&key).await })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    held.release().await.unwrap();
    waiting.await.unwrap().unwrap().release().await.unwrap();
}

/// Contended acquisitions of a lock's key ask the server for no key type: the refused attempt
/// read the key's value (a lock's, or a reservation) and said so.
///
/// Broken before: every acquisition's first refusal sent `TYPE` and `GETRANGE` in a round trip
/// of its own (20 here, one per wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contended_waiters_on_a_lock_s_key_ask_no_type() {
    let Some(target) = Target::start(Store::Redis, "line_first_attempt").await else {
        return;
    };
    let (first, second) = (
        client(&target, Duration::from_secs(5)).await,
        client(&target, Duration::from_secs(5)).await,
    );
    for round in 0..10 {
        let (holder, waiter) = if round % 2 == 0 {
            (&first, &second)
        } else {
            (&second, &first)
        };
        wait_behind(holder, waiter, "contended").await;
        wait_behind(waiter, holder, "contended").await;
    }
    let types = target.servers[0].calls("type").unwrap();
    println!("TYPE calls over 20 waits: {types}");
    assert_eq!(types, 0, "contended waits looked at the key's type");
    first.stop().await.unwrap();
    second.stop().await.unwrap();
    assert!(
        target.keys().await.is_empty(),
        "left in Redis: {:?}",
        target.keys().await
    );
}

/// A waiter whose client lately lined up on the key (its first attempt goes through the line)
/// and that finds a value of another type there, or a lease's, gets the typed error at once —
/// not a wait until its deadline — and leaves nothing in line.
///
/// Broken by a line attempt that calls every refusal plain (tried: the script answering
/// `plain` 1 always): the waiter sits in line until its 3 s deadline and ends with `Timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_expecting_a_line_still_meets_another_type_with_a_typed_error() {
    let Some(target) = Target::start(Store::Redis, "line_first_attempt").await else {
        return;
    };
    let deadline = Duration::from_secs(3);
    let (holder, waiter) = (
        client(&target, deadline).await,
        client(&target, deadline).await,
    );
    let mut raw = connect(&target.url).await;
    let foreign: [(&str, redis::Cmd); 3] = [
        ("a list", redis::cmd("RPUSH").arg("k").arg("theirs").clone()),
        (
            "a hash",
            redis::cmd("HSET").arg("k").arg("f").arg("theirs").clone(),
        ),
        (
            "a string beginning with 0xFF",
            redis::cmd("SET").arg("k").arg(b"\xFFtheirs").clone(),
        ),
    ];
    for (what, write) in foreign {
        wait_behind(&holder, &waiter, "k").await;
        let () = write.query_async(&mut raw).await.unwrap();
        let started = Instant::now();
        let outcome = waiter.acquire("k").await;
        let took = started.elapsed();
        println!("{what}: {outcome:?} after {took:?}");
        assert!(
            matches!(
                outcome,
                Err(LockError::InvalidInput { .. } | LockError::KindMismatch { .. })
            ),
            "{what}: {outcome:?}"
        );
        assert!(
            took < Duration::from_secs(1),
            "{what}: the error took {took:?}"
        );
        assert!(
            target.line_keys("k").await.is_empty(),
            "{what}: the refused waiter stayed in line: {:?}",
            target.line_keys("k").await
        );
        let () = redis::cmd("DEL")
            .arg("k")
            .query_async(&mut raw)
            .await
            .unwrap();
    }
    // A lease of ours (a semaphore) on the key: a mutex waiter is refused with `KindMismatch`.
    wait_behind(&holder, &waiter, "k").await;
    let permit = holder.acquire_permit("k", 2).await.unwrap();
    let started = Instant::now();
    let outcome = waiter.acquire("k").await;
    println!("a semaphore: {outcome:?} after {:?}", started.elapsed());
    assert!(
        matches!(outcome, Err(LockError::KindMismatch { .. })),
        "a semaphore: {outcome:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    permit.release().await.unwrap();
    holder.stop().await.unwrap();
    waiter.stop().await.unwrap();
    assert!(
        target.keys().await.is_empty(),
        "left in Redis: {:?}",
        target.keys().await
    );
}

/// A waiter that expects a line on a key that has none any more takes the free key at its
/// first attempt, and stays mutually exclusive with a plain client (no `fair`) and a fair one
/// taking it in turns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_expecting_a_line_takes_a_free_key_at_once() {
    let Some(target) = Target::start(Store::Redis, "line_first_attempt").await else {
        return;
    };
    let (holder, waiter) = (
        client(&target, Duration::from_secs(5)).await,
        client(&target, Duration::from_secs(5)).await,
    );
    wait_behind(&holder, &waiter, "k").await;
    let started = Instant::now();
    let guard = waiter.acquire("k").await.unwrap();
    println!("taken after {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_millis(500));
    // Held: a plain client and the other fair one are refused.
    let plain = target
        .locker(
            false,
            TTL,
            RetryPolicy::forever().with_deadline(Duration::from_secs(1)),
        )
        .await;
    assert!(plain.try_acquire("k").await.unwrap().is_none());
    assert!(holder.try_acquire("k").await.unwrap().is_none());
    guard.release().await.unwrap();
    let again = plain.acquire("k").await.unwrap();
    assert!(waiter.try_acquire("k").await.unwrap().is_none());
    again.release().await.unwrap();
    for locker in [&holder, &waiter, &plain] {
        locker.stop().await.unwrap();
    }
    assert!(
        target.keys().await.is_empty(),
        "left in Redis: {:?}",
        target.keys().await
    );
}

//! adv33b: attacks on the outsiders' turn (d9808e2) and the own-waiter flag (f2d0bb3).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::raw::Lock;
use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_memory::MemoryLock;
use tokio::time::Instant;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Retries forever every `delay`, no jitter.
fn every(delay: Duration) -> RetryPolicy {
    RetryPolicy::forever()
        .with_retry_delay(delay)
        .with_retry_jitter(Duration::ZERO)
        .with_max_delay(delay)
}

fn client(lock: impl Lock, ttl: Duration, retry: RetryPolicy) -> Locker {
    Locker::new(lock)
        .with_options(LockOptions::default().with_ttl(ttl).with_retry(retry))
        .unwrap()
}

/// Builds a line on `k` whose holder took the key as a line member (`LINED_HOLDER`), with a
/// second member behind it and a multi-key waiter `[k, j]` outside the line: returns the
/// lined holder's guard, the second member's task (its acquisition's instant) and the
/// outsider's task.
async fn lined_holder_with_outsider(
    lock: &MemoryLock,
    j_free: bool,
) -> (
    lock_core::LockGuard,
    tokio::task::JoinHandle<Instant>,
    tokio::task::JoinHandle<lock_core::Result<lock_core::LockGuard>>,
) {
    let first = client(lock.clone(), ms(10_000), every(ms(1_000)));
    let a = first.acquire("k").await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let b = client(lock.clone(), ms(10_000), every(ms(1_000)));
    tokio::spawn(async move {
        let guard = b.acquire("k").await.unwrap();
        tx.send(guard).ok();
    });
    tokio::time::sleep(ms(1)).await;
    let c = client(lock.clone(), ms(10_000), every(ms(1_000)));
    let second = tokio::spawn(async move {
        let guard = c.acquire("k").await.unwrap();
        let at = Instant::now();
        guard.release().await.unwrap();
        at
    });
    tokio::time::sleep(ms(1)).await;
    if !j_free {
        let j = client(lock.clone(), ms(10_000), every(ms(1_000)));
        std::mem::forget(j.acquire("j").await.unwrap());
    }
    let o = client(lock.clone(), ms(10_000), every(ms(1_000)));
    let outsider = tokio::spawn(async move { o.acquire_many(&["k", "j"]).await });
    tokio::time::sleep(ms(1)).await;
    // A's release hands the key to B, the first in line: B holds as a line member.
    a.release().await.unwrap();
    let b = rx.await.unwrap();
    tokio::time::sleep(ms(5)).await;
    (b, second, outsider)
}

/// The outsiders' turn opens at B's release (C in line, O waiting outside), but O is
/// cancelled before it asks: nobody takes the turn. C, first in line, should be served when
/// the turn ends (HANDOFF_GRACE, 20 ms), not at its next poll.
#[tokio::test(start_paused = true)]
async fn an_unused_outsiders_turn_ends_on_time_for_the_first_in_line() {
    let lock = MemoryLock::new();
    let (b, second, outsider) = lined_holder_with_outsider(&lock, true).await;
    b.release().await.unwrap();
    let released = Instant::now();
    // Cancelled before its wake-up is polled.
    outsider.abort();
    let served = second.await.unwrap();
    let after = served - released;
    assert!(
        after <= ms(25),
        "the first in line was served {after:?} after a release whose outsiders' turn went unused"
    );
    tokio::time::sleep(ms(10)).await;
    assert!(lock.is_empty(), "the table is not empty");
}

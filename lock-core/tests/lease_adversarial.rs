//! Attacks on the one lease (issue 17 item 3) that held: the waiters of this process, the
//! guard, its watchdog and its lost signal agree on every path tried below. Paused clock: it
//! moves only when every task waits, so "before the holder's validity" is exact.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lock_core::{LeaseKind, LockError, LockOptions, Locker, RetryPolicy};

mod support;
use support::{Store, settle};
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(3);

fn locker(store: Store) -> Locker {
    Locker::new(store)
        .with_options(
            LockOptions::default()
                .with_ttl(TTL)
                .with_retry(RetryPolicy::forever().with_retry_delay(Duration::from_millis(50))),
        )
        .unwrap()
}

/// A kept-alive guard dropped while its watchdog's extend is on the wire: the release waits for
/// the handle, no loss is reported, the task waiting in this process goes once the store let
/// go, and nothing is left in the store.
#[tokio::test(start_paused = true)]
async fn a_guard_dropped_mid_extend_reports_no_loss_and_lets_the_waiter_go() {
    let store = Store::new().extends_taking(Duration::from_millis(200));
    let locker = locker(store);
    let mut holder = locker.acquire("k").await.unwrap();
    let lost = holder.keep_alive().unwrap();
    let waiter = tokio::spawn({
        let locker = locker.clone();
        async move { locker.acquire("k").await }
    });
    settle().await;
    // The watchdog extends with a third of the ttl left, and its extend takes 200 ms.
    tokio::time::sleep(TTL * 2 / 3 + Duration::from_millis(100)).await;
    let dropped_at = Instant::now();
    drop(holder);
    let won = waiter.await.unwrap().unwrap();
    assert!(!lost.is_lost(), "a released lease was reported lost");
    assert!(
        Instant::now() < dropped_at + TTL,
        "the waiter went only when the dropped lease lapsed"
    );
    won.release().await.unwrap();
    assert!(
        locker.try_acquire("k").await.unwrap().is_some(),
        "a lease was left in the store"
    );
}

/// A multi-key holder that neither extends nor releases: the waiters on each of its keys give
/// up its places once its lease lapses (all of them, whichever key sees it first), and not
/// before; its late release is refused.
#[tokio::test(start_paused = true)]
async fn a_lapsed_multi_key_holder_frees_every_key_for_the_waiters() {
    let store = Store::new();
    let attempts = Arc::clone(&store.attempts);
    let locker = locker(store);
    let holder = locker.acquire_many(&["a", "b"]).await.unwrap();
    let until = holder.valid_until();
    let waiters: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|key| {
            let locker = locker.clone();
            tokio::spawn(async move {
                let guard = locker.acquire(key).await.unwrap();
                (Instant::now(), guard)
            })
        })
        .collect();
    settle().await;
    tokio::time::sleep(TTL - Duration::from_millis(1)).await;
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        1,
        "a waiter left its line early"
    );
    for waiter in waiters {
        let (won_at, guard) = waiter.await.unwrap();
        assert!(won_at >= until, "won at {won_at:?}, before {until:?}");
        guard.release().await.unwrap();
    }
    assert!(matches!(
        holder.release().await,
        Err(LockError::NotHeld { .. })
    ));
}

/// A kept-alive write lock downgraded: every clone of its lease (the guard's, one taken after
/// `keep_alive`) reads a reader; the writer waiting behind it in this process goes at once, is
/// kept out by the reader, and wins once the reader is released. The watchdog goes on
/// extending the reader.
#[tokio::test(start_paused = true)]
async fn a_kept_alive_downgrade_is_seen_by_every_clone_and_the_waiter() {
    let store = Store::new();
    let attempts = Arc::clone(&store.attempts);
    let locker = locker(store);
    let mut writer = locker.acquire_write("k").await.unwrap();
    let lost = writer.keep_alive().unwrap();
    let clone = writer.lease().clone();
    let waiter = tokio::spawn({
        let locker = locker.clone();
        async move { locker.acquire_write("k").await }
    });
    settle().await;
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
    writer.downgrade().await.unwrap();
    assert_eq!(writer.kind(), LeaseKind::Read);
    assert_eq!(clone.kind(), LeaseKind::Read, "a clone kept the write kind");
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(
        attempts.load(Ordering::SeqCst) > 1,
        "the writer behind a downgraded lease kept waiting in this process"
    );
    // Several ttls: the reader is kept alive, the writer kept out.
    tokio::time::sleep(TTL * 3).await;
    assert!(!lost.is_lost() && writer.is_valid() && clone.is_valid());
    assert!(!waiter.is_finished(), "a writer entered beside a reader");
    writer.release().await.unwrap();
    waiter.await.unwrap().unwrap().release().await.unwrap();
}

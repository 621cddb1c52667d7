//! One lease: the guard, the watchdog, the waiters of this process and a `with_lock` section all
//! follow the validity the backend's handle sets, whichever path moves it.
//!
//! The clock is tokio's, paused: it moves only when every task waits, so "before the holder's
//! validity" below is exact, not a race against a noisy machine.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lock_core::{
    Capabilities, Lease, LockError, LockOptions, Locker, Result, RetryPolicy,
    raw::{Handle, Lock, LockRequest, async_trait},
};

use lock_memory::MemoryLock;

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

/// A downgrade that leaves the lock in doubt ends the lease (Redlock's, on a round without a
/// quorum): the task waiting behind it in this process stops keeping out at once, rather than
/// at the validity the holder had before.
#[tokio::test(start_paused = true)]
async fn a_failed_downgrade_that_ends_the_lease_lets_the_waiters_behind_it_go() {
    let store = Store::new().failing_downgrades();
    let attempts = Arc::clone(&store.attempts);
    let locker = locker(store);
    let mut writer = locker.acquire_write("k").await.unwrap();
    let before = writer.valid_until();
    let waiter = tokio::spawn({
        let locker = locker.clone();
        async move { locker.acquire_write("k").await }
    });
    settle().await;
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        1,
        "the waiter kept in line"
    );

    let error = writer.downgrade().await.unwrap_err();
    assert!(
        matches!(error, LockError::QuorumNotReached { .. }),
        "{error}"
    );
    assert!(!writer.is_valid(), "the lease in doubt is over");
    // Well before the validity the writer had: the waiter asks the store by then.
    tokio::time::sleep(TTL / 3).await;
    assert!(Instant::now() < before);
    assert!(
        attempts.load(Ordering::SeqCst) > 1,
        "the waiter kept out behind a lease that had ended"
    );
    drop(writer);
    waiter.await.unwrap().unwrap().release().await.unwrap();
}

/// The same downgrade on a kept-alive write lock: the guard, its watchdog and its lost signal
/// read the lease the handle ended, not the validity published at the last extend.
#[tokio::test(start_paused = true)]
async fn a_failed_downgrade_ends_a_kept_alive_lease_too() {
    let locker = locker(Store::new().failing_downgrades());
    let mut writer = locker.acquire_write("k").await.unwrap();
    let before = writer.valid_until();
    let lost = writer.keep_alive().unwrap();
    assert!(writer.downgrade().await.is_err());
    assert!(
        !writer.is_valid(),
        "the kept-alive guard still relied on the lease"
    );
    lost.lost().await;
    assert!(
        Instant::now() < before,
        "the loss was seen only at the old validity"
    );
    drop(writer);
}

/// A lease its watchdog finds lost (purged from the store) lets the task waiting behind it in
/// this process go at once, not at the validity it had.
#[tokio::test(start_paused = true)]
async fn a_lease_the_watchdog_finds_lost_lets_the_waiters_behind_it_go() {
    let locker = locker(Store::new());
    let mut holder = locker.acquire("k").await.unwrap();
    let lost = holder.keep_alive().unwrap();
    let waiter = tokio::spawn({
        let locker = locker.clone();
        async move { locker.acquire("k").await }
    });
    settle().await;
    let validity = holder.valid_until();
    locker.purge("k").await.unwrap();

    lost.lost().await;
    // The lost lease is not valid any more, whatever validity it had: the guard agrees with
    // the signal (it said valid until its old validity).
    assert!(!holder.is_valid() && holder.remaining().is_zero());
    assert!(!holder.lease().is_valid());
    let won = waiter.await.unwrap().unwrap();
    assert!(
        tokio::time::Instant::now() < validity,
        "the waiter went only once the lost lease's validity had passed"
    );
    won.release().await.unwrap();
    assert!(holder.release().await.is_err());
}

/// An extend by hand that finds the lock gone from the store (purged) ends the lease at once,
/// as the watchdog does: the guard stops saying it is valid and the task waiting behind it in
/// this process goes, rather than at the validity it had.
#[tokio::test(start_paused = true)]
async fn an_extend_by_hand_that_finds_the_lock_lost_ends_the_lease() {
    let store = Store::new();
    let attempts = Arc::clone(&store.attempts);
    let locker = locker(store);
    let mut holder = locker.acquire("k").await.unwrap();
    let waiter = tokio::spawn({
        let locker = locker.clone();
        async move { locker.acquire("k").await }
    });
    settle().await;
    let validity = holder.valid_until();
    locker.purge("k").await.unwrap();

    let error = holder.extend(TTL).await.unwrap_err();
    assert!(matches!(error, LockError::NotHeld { .. }), "{error}");
    assert!(
        !holder.is_valid() && holder.remaining().is_zero(),
        "the guard still said a lost lock was valid"
    );
    let won = waiter.await.unwrap().unwrap();
    assert!(
        Instant::now() < validity,
        "the waiter went only once the lost lease's validity had passed"
    );
    assert!(attempts.load(Ordering::SeqCst) >= 2);
    won.release().await.unwrap();
    assert!(holder.release().await.is_err());
}

/// The same on a kept-alive guard: its lost signal fires at the extend by hand, before the
/// watchdog's next round would have found the loss.
#[tokio::test(start_paused = true)]
async fn an_extend_by_hand_that_finds_a_kept_alive_lock_lost_fires_the_lost_signal() {
    let locker = locker(Store::new());
    let mut holder = locker.acquire("k").await.unwrap();
    let lost = holder.keep_alive().unwrap();
    locker.purge("k").await.unwrap();
    let error = holder.extend(TTL).await.unwrap_err();
    assert!(matches!(error, LockError::NotHeld { .. }), "{error}");
    assert!(lost.is_lost(), "the lost signal waited for the watchdog");
    assert!(!holder.is_valid());
    drop(holder);
}

/// The lease a `with_lock` section holds follows the watchdog's extends: its validity is the
/// guard's, not a copy taken when the section began.
#[tokio::test(start_paused = true)]
async fn a_with_lock_sections_lease_follows_the_watchdog() {
    let locker = locker(Store::new());
    locker
        .with_lock("k", |info| async move {
            let first = info.valid_until();
            tokio::time::sleep(TTL * 2).await;
            assert!(!info.lost.is_lost());
            assert!(
                info.valid_until() > first + TTL,
                "the section's lease did not follow the watchdog"
            );
            assert!(info.is_valid());
        })
        .await
        .unwrap();
}

/// The holder's place in this process's queue follows every extend, by hand (held or kept
/// alive) and by the watchdog: the task behind it never asks the store while the holder's
/// lease is valid, however long it lasts, and goes once it is released.
///
/// The negative control of the three tests above: it passes before and after the change, and
/// fails when an extend does not reach the shared lease (see the report of the change).
#[tokio::test(start_paused = true)]
async fn the_waiters_follow_every_extend_and_go_on_release() {
    let store = Store::new();
    let attempts = Arc::clone(&store.attempts);
    let locker = locker(store);
    let mut holder = locker.acquire("k").await.unwrap();
    let waiter = tokio::spawn({
        let locker = locker.clone();
        async move { locker.acquire("k").await }
    });
    settle().await;
    // By hand, held: past the first validity.
    tokio::time::sleep(TTL / 2).await;
    holder.extend(TTL).await.unwrap();
    tokio::time::sleep(TTL * 3 / 4).await;
    assert!(holder.is_valid());
    // By the watchdog, several times over.
    let lost = holder.keep_alive().unwrap();
    tokio::time::sleep(TTL * 3).await;
    // By hand, kept alive, to a longer ttl.
    holder.extend(TTL * 2).await.unwrap();
    tokio::time::sleep(TTL * 3 / 2).await;
    assert!(!lost.is_lost() && holder.is_valid());
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        1,
        "the waiter left its line while the holder's lease was valid"
    );
    holder.release().await.unwrap();
    waiter.await.unwrap().unwrap().release().await.unwrap();
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
}

/// A backend whose extends succeed but leave less than the watchdog's lead (a third of the ttl)
/// is extended again no sooner than a retry would be, not in a busy loop; the lease is
/// reported lost once it lapses, if it does.
#[tokio::test(start_paused = true)]
async fn a_watchdog_whose_extends_leave_little_does_not_spin() {
    #[derive(Debug)]
    struct Short(MemoryLock, Arc<AtomicUsize>);
    #[derive(Debug)]
    struct ShortHandle(Box<dyn Handle>, Lease, Arc<AtomicUsize>);
    #[async_trait]
    impl Lock for Short {
        fn name(&self) -> &'static str {
            "short"
        }
        fn capabilities(&self) -> Capabilities {
            self.0.capabilities()
        }
        fn try_acquire<'a>(
            &'a self,
            request: &'a LockRequest,
        ) -> lock_core::raw::Answer<'a, Result<Option<Box<dyn Handle>>>> {
            lock_core::raw::Answer::later(async move {
                let Some(inner) = self.0.try_acquire(request).await? else {
                    return Ok(None);
                };
                let lease = inner.lease().clone();
                Ok(Some(
                    Box::new(ShortHandle(inner, lease, Arc::clone(&self.1))) as Box<dyn Handle>,
                ))
            })
        }
        fn abandon<'a>(
            &'a self,
            request: &'a LockRequest,
        ) -> lock_core::raw::Answer<'a, Result<bool>> {
            lock_core::raw::Answer::later(async move { self.0.abandon(request).await })
        }
    }
    #[async_trait]
    impl Handle for ShortHandle {
        fn lease(&self) -> &Lease {
            &self.1
        }
        async fn extend(&mut self, ttl: Duration) -> Result<()> {
            // Past this many, the loop is a spin: end it so the test fails instead of hanging.
            if self.2.fetch_add(1, Ordering::SeqCst) > 1_000 {
                return Err(LockError::NotHeld { key: String::new() });
            }
            self.0.extend(ttl).await?;
            self.1.set_valid_until(Instant::now() + ttl / 4);
            Ok(())
        }
        fn release(&mut self) -> lock_core::raw::Answer<'_, Result<()>> {
            lock_core::raw::Answer::later(async move { self.0.release().await })
        }
    }
    let extends = Arc::new(AtomicUsize::new(0));
    let locker = Locker::new(Short(MemoryLock::new(), Arc::clone(&extends)))
        .with_options(LockOptions::default().with_ttl(TTL))
        .unwrap();
    let mut guard = locker.acquire("k").await.unwrap();
    let lost = guard.keep_alive().unwrap();
    tokio::time::sleep(TTL * 2).await;
    let extended = extends.load(Ordering::SeqCst);
    assert!(
        extended < 100,
        "{extended} extends in two ttls: the watchdog spun"
    );
    assert!(!lost.is_lost(), "every extend succeeded in time");
    guard.release().await.unwrap();
}

//! What the model-based tests (`model_*.rs`) found, each as the minimal sequence they shrank
//! it to, written out with the public API. Each failed on the code it was found on and passes
//! since its fix; the model no longer tolerates any of these behaviours, so it catches their
//! return too (the comments naming these tests in `lock_tests::model` say where).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::{LockError, LockOptions, Locker, RetryPolicy};
use lock_inc::{IncConfig, IncLock};
use lock_memory::MemoryLock;
use lock_tests::server::{RedisServer, redis_or_skip};

fn locker(lock: &MemoryLock, ttl: Duration) -> Locker {
    Locker::new(lock.clone())
        .with_options(
            LockOptions::default()
                .with_ttl(ttl)
                .with_retry(RetryPolicy::none()),
        )
        .unwrap()
}

/// The guard's docs: "Dropping never blocks: a lock in this process is released at once". A
/// kept-alive guard's release was spawned instead, so the key stayed held until the dropping
/// task yielded (and past its ttl if it was dropped outside a runtime).
#[tokio::test(start_paused = true)]
async fn a_dropped_kept_alive_guard_frees_its_key_at_once() {
    let lock = MemoryLock::new();
    let locker = locker(&lock, Duration::from_secs(10));
    let mut guard = locker.acquire("x").await.unwrap();
    guard.keep_alive().unwrap();
    drop(guard);
    assert!(
        locker.try_acquire("x").await.unwrap().is_some(),
        "`x` is still held right after its kept-alive guard was dropped"
    );
}

/// `keep_alive` promises to keep the lock "until it is released or dropped". An explicit
/// `extend` to a shorter ttl is not seen by the watchdog, asleep until a plan made from the
/// earlier validity: the lock lapses with the shorter ttl, and the lost signal fires only when
/// the watchdog wakes, seconds after another holder could have taken the key.
#[tokio::test(start_paused = true)]
async fn a_shorter_extend_of_a_kept_alive_guard_keeps_it_alive() {
    let lock = MemoryLock::new();
    let locker = locker(&lock, Duration::from_secs(10));
    let mut guard = locker.acquire("x").await.unwrap();
    let lost = guard.keep_alive().unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await; // the watchdog plans from 10 s
    guard.extend(Duration::from_millis(100)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let other = locker.try_acquire("x").await.unwrap();
    assert!(
        other.is_none() || lost.is_lost(),
        "another holder took `x` while its kept-alive guard was held and the lost signal was silent"
    );
    assert!(
        other.is_none(),
        "the kept-alive lock lapsed after the shorter extend"
    );
}

/// The guard's docs: "A failed extend leaves the lock as it was". On a multi-key lock whose
/// second key was purged, extend fails with `NotHeld` but has already moved the first key's
/// expiry, which then outlives the lock's ttl.
#[tokio::test(start_paused = true)]
async fn a_failed_extend_leaves_every_key_as_it_was() {
    let lock = MemoryLock::new();
    let locker = locker(&lock, Duration::from_millis(100));
    let mut guard = locker.acquire_many(&["y", "x"]).await.unwrap();
    assert_eq!(locker.purge("x").await.unwrap(), 1);
    assert!(matches!(
        guard.extend(Duration::from_secs(10)).await,
        Err(LockError::NotHeld { .. })
    ));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        locker.try_acquire("y").await.unwrap().is_some(),
        "`y` outlived its ttl after an extend that failed"
    );
}

/// `Locker::stop`: "every later call on this client (and its clones) fails with
/// `LockError::Stopped`". A guard of a stopped Redlock client does (at once); a guard of a
/// stopped inc client failed with a backend error from its closed connection ("Canceled", or
/// "Request timed out" once the command timeout had passed), and a failed release was then
/// retried in the background.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_guard_calls_after_stop_fail_at_once_with_stopped() {
    let Some(binary) = redis_or_skip("inc guard calls after stop") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let lock = IncLock::connect(IncConfig::new(server.url()))
        .await
        .unwrap();
    let locker = Locker::new(lock)
        .with_options(LockOptions::default().with_ttl(Duration::from_secs(10)))
        .unwrap();
    let mut guard = locker.acquire("x").await.unwrap();
    locker.stop().await.unwrap();
    let started = tokio::time::Instant::now();
    let extended = guard.extend(Duration::from_secs(10)).await;
    println!(
        "extend after stop: {extended:?} after {:?}",
        started.elapsed()
    );
    assert!(
        matches!(extended, Err(LockError::Stopped)),
        "extend after stop: {extended:?}"
    );
    let released = guard.release().await;
    assert!(
        matches!(released, Err(LockError::Stopped)),
        "release after stop: {released:?}"
    );
}

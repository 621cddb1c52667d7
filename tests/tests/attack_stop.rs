//! Adversarial cases for `Locker::stop` on the Redis backends: what a guard dropped just
//! before it, or a release still being sent again, leaves behind.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_inc::{IncConfig, IncLock};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::server::{RedisServer, redis_or_skip};

fn options() -> LockOptions {
    LockOptions::default()
        .with_ttl(Duration::from_secs(30))
        .with_retry(RetryPolicy::none())
}

async fn inc(server: &RedisServer) -> Locker {
    let lock = IncLock::connect(IncConfig::new(server.url()))
        .await
        .unwrap();
    Locker::new(lock).with_options(options()).unwrap()
}

fn redlock(server: &RedisServer) -> Locker {
    let lock = Redlock::new(RedlockConfig::new([server.url()])).unwrap();
    Locker::new(lock).with_options(options()).unwrap()
}

/// `{ let _guard = locker.acquire(k).await?; … } locker.stop().await?;` — the guard's release
/// is spawned on drop; `stop` must not leave the lock to its ttl.
async fn dropped_then_stopped(locker: Locker, fresh: Locker, what: &str) {
    let guard = locker.acquire("x").await.unwrap();
    drop(guard);
    locker.stop().await.unwrap();
    let again = fresh.try_acquire("x").await.unwrap();
    assert!(
        again.is_some(),
        "{what}: `x` is still held (ttl 30 s) after its guard was dropped and the client stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_a_guard_dropped_right_before_stop_is_released() {
    let Some(binary) = redis_or_skip("inc drop then stop") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    dropped_then_stopped(inc(&server).await, inc(&server).await, "inc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_a_guard_dropped_right_before_stop_is_released() {
    let Some(binary) = redis_or_skip("redlock drop then stop") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    dropped_then_stopped(redlock(&server), redlock(&server), "redlock").await;
}

#[tokio::test]
async fn inc_a_guard_dropped_right_before_stop_is_released_current_thread() {
    let Some(binary) = redis_or_skip("inc drop then stop") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    dropped_then_stopped(inc(&server).await, inc(&server).await, "inc").await;
}

#[tokio::test]
async fn redlock_a_guard_dropped_right_before_stop_is_released_current_thread() {
    let Some(binary) = redis_or_skip("redlock drop then stop") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    dropped_then_stopped(redlock(&server), redlock(&server), "redlock").await;
}

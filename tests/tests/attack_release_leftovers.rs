//! Adversarial cases on the Redis backends: what a release leaves behind (a guard dropped just
//! before `Locker::stop`, a release that overtakes its own acquisition on a slow node).
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

/// Redlock on three nodes, the third behind a proxy that delays every chunk by 20 ms, where the
/// acquisition script is not loaded yet but the release script is (a node restarted or had
/// `SCRIPT FLUSH`, and another client has released on it since). The quorum of the two fast
/// nodes decides the acquisition while the third is still in EVALSHA / NOSCRIPT / SCRIPT LOAD /
/// EVALSHA; the release, sent at once, reaches the third node first and finds nothing, and the
/// acquisition's retried script then takes the key there, for the whole ttl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_a_release_does_not_overtake_its_acquisition_on_a_slow_node() {
    let Some(binary) = redis_or_skip("redlock release overtakes acquisition") else {
        return;
    };
    let servers: Vec<RedisServer> = (0..3)
        .map(|_| RedisServer::start(&binary, &[]).unwrap())
        .collect();
    let proxy = lock_tests::proxy::LatencyProxy::start(servers[2].port())
        .await
        .unwrap();
    let urls = vec![servers[0].url(), servers[1].url(), proxy.url()];
    let lock = Redlock::new(RedlockConfig::new(urls).with_node_timeout(Duration::from_millis(500)))
        .unwrap();
    let locker = Locker::new(lock).with_options(options()).unwrap();
    // The release script is known to the slow node; the multi-key acquisition script is not.
    {
        let client = redis::Client::open(servers[2].url()).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let _: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(include_str!("../../lock-redlock/src/lua/release.lua"))
            .query_async(&mut connection)
            .await
            .unwrap();
    }
    proxy.set_delay(Duration::from_millis(20));
    let guard = locker.acquire_many(&["x", "y"]).await.unwrap();
    guard.release().await.unwrap();
    // Past the slow node's whole exchange (six 20 ms hops), and its re-sends.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for key in ["x", "y"] {
        let pttl = servers[2]
            .command(&format!("PTTL {key}"), Duration::from_secs(2))
            .unwrap();
        assert_eq!(
            pttl, ":-2",
            "node 2 still holds `{key}` (PTTL {pttl}) after the lock was released"
        );
    }
}

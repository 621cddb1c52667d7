//! Attack on cancel safety: fenced Redlock acquisitions (with pub/sub wake-ups and the in-process
//! queue) dropped at random points by tiny `tokio::time::timeout`s while a holder keeps taking
//! the key; afterwards no lock key of ours may be left in Redis (the ttl is long, so only the
//! clean-up can have removed them) and the key must be free for a fresh single attempt.
//! Prints its figures on one line.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_redlock::{ConnectionKind, FENCE_SUFFIX, Redlock, RedlockConfig};
use lock_tests::backed::ServerBacked;
use lock_tests::proxy::LatencyProxy;
use lock_tests::server::{RedisServer, redis_or_skip};
use rand::Rng;

/// Keys on `server` that are not fencing counters.
fn lock_keys(server: &RedisServer) -> Vec<String> {
    let mut connection = redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query(&mut connection).unwrap();
    keys.into_iter()
        .filter(|key| !key.ends_with(FENCE_SUFFIX))
        .map(|key| String::from_utf8_lossy(&key).into_owned())
        .collect()
}

async fn storm(
    connection: ConnectionKind,
    delays_ms: [u64; 3],
) -> (u64, u64, Vec<Vec<String>>, bool) {
    let ttl = Duration::from_secs(20);
    let servers = lock_tests::backed::start_servers(3);
    let mut proxies = Vec::new();
    for (server, delay) in servers.iter().zip(delays_ms) {
        let proxy = LatencyProxy::start(server.port()).await.unwrap();
        proxy.set_delay(Duration::from_millis(delay));
        proxies.push(proxy);
    }
    let mut backed = ServerBacked::new(
        Redlock::new(
            RedlockConfig::new(proxies.iter().map(LatencyProxy::url))
                .with_fencing(true)
                .with_wake_on_release(true)
                .with_connection(connection)
                .with_node_timeout(Duration::from_millis(300)),
        )
        .unwrap(),
        servers,
    );
    let locker = Locker::new(backed.lock().clone())
        .with_options(
            LockOptions::default().with_ttl(ttl).with_retry(
                RetryPolicy::forever()
                    .with_retry_delay(Duration::from_millis(2))
                    .with_retry_jitter(Duration::from_millis(2)),
            ),
        )
        .unwrap();
    locker
        .acquire_many(&["k", "j"])
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (cancelled, won) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (locker, stop, cancelled, won) = (
            locker.clone(),
            Arc::clone(&stop),
            Arc::clone(&cancelled),
            Arc::clone(&won),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let cut = Duration::from_micros(rand::rng().random_range(0..40000));
                match tokio::time::timeout(cut, locker.acquire_many(&["k", "j"])).await {
                    Ok(Ok(guard)) => {
                        won.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        guard.release().await.unwrap();
                    }
                    Ok(Err(error)) => panic!("{error}"),
                    Err(_) => {
                        cancelled.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.unwrap();
    }
    // Clean-ups run in the background; give them time (the ttl is 20 s).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let left: Vec<Vec<String>> = backed.servers().iter().map(lock_keys).collect();
    let single = Locker::new(backed.lock().clone())
        .with_options(
            LockOptions::default()
                .with_ttl(ttl)
                .with_retry(RetryPolicy::none()),
        )
        .unwrap();
    let mut free = false;
    for round in 0..20 {
        match single.acquire_many(&["k", "j"]).await {
            Ok(guard) => {
                guard.release().await.unwrap();
                free = round == 0;
                println!("fresh attempt after the storm: won at try {round}");
                break;
            }
            Err(error) => {
                println!("fresh attempt {round} after the storm: {error}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    (
        cancelled.load(Ordering::SeqCst),
        won.load(Ordering::SeqCst),
        left,
        free,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_fenced_acquisitions_leave_nothing_manager() {
    if redis_or_skip("cancel storm").is_none() {
        return;
    }
    let (cancelled, won, left, free) = storm(ConnectionKind::Manager, [0, 2, 4]).await;
    println!(
        "cancel storm (manager): {cancelled} cancelled, {won} won, left {left:?}, free {free}"
    );
    assert!(cancelled > 0, "the storm cancelled nothing ({won} won)");
    assert!(left.iter().all(Vec::is_empty), "lock keys left: {left:?}");
    assert!(free, "the keys were not free after the storm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_fenced_acquisitions_leave_nothing_pooled() {
    if redis_or_skip("cancel storm").is_none() {
        return;
    }
    let (cancelled, won, left, free) = storm(ConnectionKind::Pool, [0, 2, 4]).await;
    println!("cancel storm (pool): {cancelled} cancelled, {won} won, left {left:?}, free {free}");
    assert!(cancelled > 0, "the storm cancelled nothing ({won} won)");
    assert!(left.iter().all(Vec::is_empty), "lock keys left: {left:?}");
    assert!(free, "the keys were not free after the storm");
}

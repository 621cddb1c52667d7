//! Adversarial review of the INCR backend's semaphores and read-write locks on real servers:
//! each case is a break found by attacking the scripts, kept as a regression test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_inc::{IncConfig, IncLock};
use lock_tests::server::{RedisServer, redis_or_skip};

const PROBE: Duration = Duration::from_millis(500);

async fn connect(url: String, command_timeout: u64) -> IncLock {
    IncLock::connect(IncConfig {
        command_timeout,
        ..IncConfig::new(url)
    })
    .await
    .expect("connect")
}

fn single(lock: &IncLock, ttl: Duration) -> Locker {
    Locker::new(lock.clone())
        .with_options(
            LockOptions::default()
                .with_ttl(ttl)
                .with_retry(RetryPolicy::none()),
        )
        .unwrap()
}

fn pttl(server: &RedisServer, key: &str) -> i64 {
    let reply = server.command(&format!("PTTL {key}"), PROBE).unwrap();
    reply.trim_start_matches(':').parse().unwrap()
}

/// A writer that downgrades and then dies (never releases): its read lease must expire like
/// any other. `downgrade.lua` removed the `w` entry first, which emptied the set (Redis deletes
/// an empty sorted set, and its expiry with it) and re-created it with the `r` entry and no
/// expiry: the key stayed forever, and a mutex on the key (whose script does not prune
/// holders) found it held forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downgraded_writer_that_dies_leaves_nothing_behind() {
    let Some(binary) = redis_or_skip("attack inc semaphores: downgrade") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("server");
    let lock = connect(server.url(), 2_000).await;
    let ttl = Duration::from_millis(400);
    let locker = single(&lock, ttl);
    let mut writer = locker.acquire_write("doc").await.expect("write lock");
    writer.downgrade().await.expect("downgrade");
    let set_ttl = pttl(&server, "lock:{doc}");
    assert!(
        set_ttl > 0 && set_ttl <= 401,
        "after a downgrade the holder set has PTTL {set_ttl} (ttl 400 ms)"
    );
    // The holder dies: no release.
    std::mem::forget(writer);
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    // Nobody else touched the key: its own expiry must have removed it.
    assert_eq!(
        pttl(&server, "lock:{doc}"),
        -2,
        "the holder set outlived its only (expired) holder"
    );
    let mutex = locker
        .try_acquire("doc")
        .await
        .expect("mutex attempt")
        .expect("a mutex on the key once its reader expired");
    mutex.release().await.unwrap();
}

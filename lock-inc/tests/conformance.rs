//! The conformance suite on a real redis-server, with and without pub/sub wake-ups, and on a
//! Redis Cluster of three primaries (every key of one lock, semaphore or read-write lock in the
//! slot of its hash tag).

use lock_inc::{IncConfig, IncLock};
use lock_tests::backed::{ServerBacked, start_servers};
use lock_tests::server::{cluster_url, redis_server_binary, start_cluster};

async fn inc_lock(wake_on_release: bool) -> ServerBacked<IncLock> {
    inc_lock_with(|config| config.with_wake_on_release(wake_on_release)).await
}

async fn inc_lock_with(configure: impl FnOnce(IncConfig) -> IncConfig) -> ServerBacked<IncLock> {
    let servers = start_servers(1);
    let lock = IncLock::connect(configure(IncConfig::new(servers[0].url())))
        .await
        .expect("connect");
    ServerBacked::new(lock, servers)
}

/// A fresh cluster of three primaries per case; commands may wait longer than the default on a
/// shared machine (this is about routing, not latency).
async fn inc_on_a_cluster() -> ServerBacked<IncLock> {
    inc_on_a_cluster_with(|config| config.with_wake_on_release(true)).await
}

async fn inc_on_a_cluster_with(
    configure: impl FnOnce(IncConfig) -> IncConfig,
) -> ServerBacked<IncLock> {
    let binary = redis_server_binary().expect(
        "redis-server not found: run `cargo xtask it`, which installs it, or set REDIS_SERVER",
    );
    let servers = start_cluster(&binary, 3).expect("cluster");
    let url = cluster_url(&servers);
    let lock = IncLock::connect(configure(IncConfig {
        command_timeout: 5_000,
        ..IncConfig::new(url)
    }))
    .await
    .expect("connect to the cluster");
    ServerBacked::new(lock, servers)
}

mod plain {
    lock_core::conformance_tests!(
        crate::inc_lock(false),
        capabilities: [extend, fail_fast, purge, distributed, fencing, semaphore, read_write]
    );
}

mod with_wakeups {
    lock_core::conformance_tests!(
        crate::inc_lock(true),
        capabilities: [extend, fail_fast, purge, distributed, fencing, wake_on_release, semaphore, read_write]
    );
}

mod on_a_cluster {
    lock_core::conformance_tests!(
        crate::inc_on_a_cluster(),
        capabilities: [extend, fail_fast, purge, distributed, fencing, wake_on_release, semaphore, read_write]
    );
}

mod fair {
    lock_core::conformance_tests!(
        crate::inc_lock_with(|config| config.with_fair(true)),
        capabilities: [extend, fail_fast, purge, distributed, fencing, semaphore, read_write, fair]
    );
}

mod fair_on_a_cluster {
    lock_core::conformance_tests!(
        crate::inc_on_a_cluster_with(|config| config.with_fair(true)),
        capabilities: [extend, fail_fast, purge, distributed, fencing, semaphore, read_write, fair]
    );
}

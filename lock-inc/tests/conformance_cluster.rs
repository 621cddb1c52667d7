//! The conformance suite on a Redis Cluster of three primaries, fresh for each case (every key
//! of one lock, semaphore or read-write lock in the slot of its hash tag), with pub/sub
//! wake-ups and with fair waiting.
//!
//! A new cluster turns writable about 2 s after its servers start (Redis keeps a primary's
//! cluster state failed for 2 s after it starts), so each case spends most of its time waiting
//! for it. This
//! target is left out of a plain `cargo test` (`test = false` in the manifest); `cargo xtask
//! it` runs it with many cases at a time (`cargo test --workspace --test conformance_cluster
//! -- --test-threads 8`).

use lock_inc::{IncConfig, IncLock};
use lock_tests::backed::ServerBacked;
use lock_tests::server::{cluster_url, redis_server_binary, start_cluster};

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

mod on_a_cluster {
    lock_core::conformance_tests!(
        crate::inc_on_a_cluster(),
        capabilities: [extend, fail_fast, purge, distributed, fencing, wake_on_release, semaphore, read_write]
    );
}

mod fair_on_a_cluster {
    lock_core::conformance_tests!(
        crate::inc_on_a_cluster_with(|config| config.with_fair(true)),
        capabilities: [extend, fail_fast, purge, distributed, fencing, semaphore, read_write, fair]
    );
}

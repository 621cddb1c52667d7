//! The conformance suite on a real redis-server, with and without pub/sub wake-ups and fair
//! waiting. The same cases on a Redis Cluster are in `conformance_cluster.rs`.

use lock_inc::{IncConfig, IncLock};
use lock_tests::backed::{ServerBacked, start_servers};

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

/// As [`inc_lock_with`], over RESP3 (that the connections speak it: `tests/tests/inc_resp3.rs`).
async fn inc_lock_resp3(configure: impl FnOnce(IncConfig) -> IncConfig) -> ServerBacked<IncLock> {
    let servers = start_servers(1);
    let url = format!("{}?protocol=resp3", servers[0].url());
    let lock = IncLock::connect(configure(IncConfig::new(url)))
        .await
        .expect("connect");
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

mod fair {
    lock_core::conformance_tests!(
        crate::inc_lock_with(|config| config.with_fair(true)),
        capabilities: [extend, fail_fast, purge, distributed, fencing, semaphore, read_write, fair]
    );
}

/// RESP3 (`?protocol=resp3`): the scripts' answers, the subscriber's pushes and the line's turns
/// over the other protocol.
mod resp3_fair {
    lock_core::conformance_tests!(
        crate::inc_lock_resp3(|config| config.with_fair(true)),
        capabilities: [extend, fail_fast, purge, distributed, fencing, semaphore, read_write, fair]
    );
}

mod resp3_with_wakeups {
    lock_core::conformance_tests!(
        crate::inc_lock_resp3(|config| config.with_wake_on_release(true)),
        capabilities: [extend, fail_fast, purge, distributed, fencing, wake_on_release, semaphore, read_write]
    );
}

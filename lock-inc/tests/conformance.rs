//! The conformance suite on a real redis-server, with and without pub/sub wake-ups.

use lock_inc::{IncConfig, IncLock};
use lock_tests::backed::{ServerBacked, start_servers};

async fn inc_lock(wake_on_release: bool) -> ServerBacked<IncLock> {
    let servers = start_servers(1);
    let lock =
        IncLock::connect(IncConfig::new(servers[0].url()).with_wake_on_release(wake_on_release))
            .await
            .expect("connect");
    ServerBacked::new(lock, servers)
}

mod plain {
    lock_core::conformance_tests!(
        crate::inc_lock(false),
        capabilities: [extend, fail_fast, purge, distributed, fencing]
    );
}

mod with_wakeups {
    lock_core::conformance_tests!(
        crate::inc_lock(true),
        capabilities: [extend, fail_fast, purge, distributed, fencing, wake_on_release]
    );
}

//! The conformance suite on a real redis-server.

use lock_inc::{IncConfig, IncLock};
use lock_tests::backed::{ServerBacked, start_servers};

async fn inc_lock() -> ServerBacked<IncLock> {
    let servers = start_servers(1);
    let lock = IncLock::connect(IncConfig::new(servers[0].url()))
        .await
        .expect("connect");
    ServerBacked::new(lock, servers)
}

lock_core::conformance_tests!(crate::inc_lock());

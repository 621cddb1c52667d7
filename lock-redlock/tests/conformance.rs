//! The whole conformance suite on real redis-servers: 1, 3 and 5 independent nodes.

use std::time::Duration;

use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::backed::ServerBacked;

fn redlock(nodes: usize) -> ServerBacked<Redlock> {
    ServerBacked::start(nodes, |urls| {
        // Cases use ttls of a few hundred ms; a loaded CI machine needs a roomy node timeout.
        Redlock::new(RedlockConfig::new(urls).with_node_timeout(Duration::from_millis(250)))
    })
}

mod one_node {
    lock_core::conformance_tests!(async { crate::redlock(1) });
}

mod three_nodes {
    lock_core::conformance_tests!(async { crate::redlock(3) });
}

fn redlock_with_wakeups(nodes: usize) -> ServerBacked<Redlock> {
    ServerBacked::start(nodes, |urls| {
        Redlock::new(
            RedlockConfig::new(urls)
                .with_node_timeout(Duration::from_millis(250))
                .with_wake_on_release(true),
        )
    })
}

mod three_nodes_with_wakeups {
    lock_core::conformance_tests!(async { crate::redlock_with_wakeups(3) });
}

mod five_nodes {
    lock_core::conformance_tests!(async { crate::redlock(5) });
}

//! The whole conformance suite on real redis-servers: 1 (fair by default, and not), 3 and 5
//! independent nodes (fair and wake-ups by default), 3 nodes without wake-ups, with fencing
//! tokens and without `fair`, and through a deadpool pool (1 fair node, and 3 fenced nodes).

use std::time::Duration;

use lock_redlock::{ConnectionKind, Redlock, RedlockConfig};
use lock_tests::backed::ServerBacked;

fn redlock_with(
    nodes: usize,
    configure: impl FnOnce(RedlockConfig) -> RedlockConfig,
) -> ServerBacked<Redlock> {
    ServerBacked::start(nodes, |urls| {
        // Cases use ttls of a few hundred ms; a loaded CI machine needs a roomy node timeout.
        Redlock::new(configure(
            RedlockConfig::new(urls).with_node_timeout(Duration::from_millis(250)),
        ))
    })
}

fn redlock(nodes: usize) -> ServerBacked<Redlock> {
    redlock_with(nodes, |config| config)
}

/// One node: `fair` by default.
mod one_node {
    lock_core::conformance_tests!(
        async { crate::redlock(1) },
        capabilities: [extend, distributed, multi_key, semaphore, read_write, fair]
    );
}

/// Several nodes: `fair` and wake-ups by default.
mod three_nodes {
    lock_core::conformance_tests!(
        async { crate::redlock(3) },
        capabilities: [extend, distributed, multi_key, semaphore, read_write, wake_on_release, fair]
    );
}

/// Several nodes with `fair` turned off: woken by every release.
mod three_nodes_not_fair {
    lock_core::conformance_tests!(async {
        crate::redlock_with(3, |config| config.with_fair(false))
    }, capabilities: [extend, distributed, multi_key, semaphore, read_write, wake_on_release]);
}

/// Several nodes polling (wake-ups turned off).
mod three_nodes_without_wakeups {
    lock_core::conformance_tests!(async {
        crate::redlock_with(3, |config| config.with_wake_on_release(false))
    }, capabilities: [extend, distributed, multi_key, semaphore, read_write, fair]);
}

mod three_nodes_with_fencing {
    lock_core::conformance_tests!(async {
        crate::redlock_with(3, |config| config.with_fencing(true))
    }, capabilities: [extend, distributed, multi_key, semaphore, read_write, wake_on_release, fencing, fair]);
}

mod five_nodes {
    lock_core::conformance_tests!(
        async { crate::redlock(5) },
        capabilities: [extend, distributed, multi_key, semaphore, read_write, wake_on_release, fair]
    );
}

mod one_node_pooled {
    lock_core::conformance_tests!(async {
        crate::redlock_with(1, |config| config.with_connection(crate::ConnectionKind::Pool))
    }, capabilities: [extend, distributed, multi_key, semaphore, read_write, fair]);
}

mod three_nodes_pooled_with_fencing {
    lock_core::conformance_tests!(async {
        crate::redlock_with(3, |config| {
            config
                .with_connection(crate::ConnectionKind::Pool)
                .with_fencing(true)
        })
    }, capabilities: [extend, distributed, multi_key, semaphore, read_write, wake_on_release, fencing, fair]);
}

/// One node with `fair` turned off: the plain lock of other libraries.
mod one_node_not_fair {
    lock_core::conformance_tests!(async {
        crate::redlock_with(1, |config| config.with_fair(false))
    }, capabilities: [extend, distributed, multi_key, semaphore, read_write]);
}

mod one_node_fair_with_fencing {
    lock_core::conformance_tests!(async {
        crate::redlock_with(1, |config| config.with_fair(true).with_fencing(true))
    }, capabilities: [extend, distributed, multi_key, semaphore, read_write, fencing, fair]);
}

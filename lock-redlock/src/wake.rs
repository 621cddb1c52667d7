//! Push-based wake-ups: releases are announced on `lock-released:<key>`, and waiters subscribe
//! on every node (through the client's one pub/sub connection per node, see `pubsub.rs`) and
//! retry as soon as a message arrives (or when their delay runs out, so a missed message costs
//! one retry delay at most).

use std::sync::Arc;
use std::time::Duration;

use lock_core::raw::redis::{gone_in, release_channel};

use crate::node::Node;
use crate::pubsub::{Channel, PubSub};

/// The waiters for releases of one backend.
pub(crate) struct Wakeups {
    pubsub: Arc<PubSub>,
}

/// How long until `key` is held on too few nodes to block a quorum of `quorum`: zero when it
/// already is (it expired or was released meanwhile), `None` when that depends on nodes that
/// did not answer or hold it without expiry.
async fn until_free(
    nodes: &[Node],
    key: &str,
    quorum: usize,
    timeout: Duration,
) -> Option<Duration> {
    let key = lock_core::Key::new(key).ok()?;
    let asks = nodes
        .iter()
        .map(|node| tokio::time::timeout(timeout, node.pttl(&key)));
    let mut expiries = Vec::new();
    let mut holders = 0usize;
    for answer in futures::future::join_all(asks).await {
        match answer.map(|pttl| pttl.map(gone_in)) {
            Ok(Ok(Some(Duration::ZERO))) => {}
            Ok(Ok(gone_in)) => {
                holders += 1;
                expiries.extend(gone_in);
            }
            // No answer (or no expiry): it may hold the key for good.
            _ => holders += 1,
        }
    }
    let tolerable = nodes.len().saturating_sub(quorum);
    if holders <= tolerable {
        return Some(Duration::ZERO);
    }
    expiries.sort_unstable();
    expiries.get(holders - tolerable - 1).copied()
}

impl Wakeups {
    pub(crate) fn new(pubsub: Arc<PubSub>) -> Self {
        Self { pubsub }
    }

    /// Waits for a release of `key` announced by any node, the holder's expiry (on enough
    /// nodes to let a quorum of `quorum` in), or `max_wait`.
    ///
    /// Subscribing (for the channel's first waiter) and asking the nodes for the holder's
    /// remaining ttl run while the wait has already begun, so neither delays a wake-up.
    pub(crate) async fn wait(
        &self,
        nodes: &Arc<[Node]>,
        key: &str,
        quorum: usize,
        max_wait: Duration,
        timeout: Duration,
    ) {
        let channel = release_channel(key);
        // Subscribed when any node is: a release is announced by every node that held the
        // key, and a node whose subscription failed is tried again by the next waiter of a
        // channel that no node subscribed.
        let subscribe = async {
            futures::future::join_all(nodes.iter().enumerate().map(|(index, node)| {
                self.pubsub
                    .subscribe(index, node, Channel::Release(&channel), timeout)
            }))
            .await
            .into_iter()
            .any(|subscribed| subscribed)
        };
        // The retiring task holds no strong reference (a client dropped meanwhile closes its
        // connections at once) and bounds each `UNSUBSCRIBE` by the node timeout: a node that
        // answers nothing (black-holed) must not keep the task, and with it the other nodes'
        // pub/sub connections, alive for good.
        let (pubsub, name) = (Arc::downgrade(&self.pubsub), channel.clone());
        let unsubscribe = move || PubSub::unsubscribe(pubsub, name, timeout);
        self.pubsub
            .releases()
            .wait(
                &channel,
                max_wait,
                until_free(nodes, key, quorum, timeout),
                subscribe,
                unsubscribe,
            )
            .await;
    }
}

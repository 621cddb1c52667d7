//! Push-based wake-ups: releases are announced on `lock-released:<key>`, and waiters subscribe
//! on every node and retry as soon as a message arrives (or when their delay runs out, so a
//! missed message costs one retry delay at most).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use lock_core::raw::wake::WakeRegistry;
use redis::aio::{PubSubSink, PubSubStream};

use lock_core::raw::redis::{gone_in, release_channel};

use crate::node::Node;

/// The subscriptions of one backend: one pub/sub connection per node, shared by all waiters.
pub(crate) struct Wakeups {
    waiters: WakeRegistry,
    subscribers: Vec<tokio::sync::Mutex<Option<Subscriber>>>,
    /// The pub/sub connections whose reader still runs: a connection lost while another one is
    /// up wakes nobody (see `connect`).
    connected: Arc<AtomicUsize>,
    /// Set by `close`: an attempt still under way subscribes nowhere after it, and a reader
    /// connects nowhere again.
    closed: Arc<AtomicBool>,
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

impl Subscriber {
    /// The current connection's sink.
    fn sink(&self) -> PubSubSink {
        self.sink
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

struct Subscriber {
    /// Replaced by the reader when it connects again after a loss.
    sink: Arc<std::sync::Mutex<PubSubSink>>,
    alive: Arc<AtomicBool>,
    /// Reads the messages; aborting it closes the pub/sub connection.
    reader: tokio::task::JoinHandle<()>,
}

/// Dropped without `close` (a client dropped without `shutdown`), the pub/sub connections
/// close too: their reading tasks own them and would otherwise keep them for good.
impl Drop for Wakeups {
    fn drop(&mut self) {
        for slot in &mut self.subscribers {
            if let Some(subscriber) = slot.get_mut().take() {
                subscriber.reader.abort();
            }
        }
    }
}

impl Wakeups {
    pub(crate) fn new(nodes: usize) -> Self {
        Self {
            waiters: WakeRegistry::default(),
            subscribers: (0..nodes).map(|_| tokio::sync::Mutex::new(None)).collect(),
            connected: Arc::default(),
            closed: Arc::default(),
        }
    }

    /// Waits for a release of `key` announced by any node, the holder's expiry (on enough
    /// nodes to let a quorum of `quorum` in), or `max_wait`.
    ///
    /// Subscribing (for the channel's first waiter) and asking the nodes for the holder's
    /// remaining ttl run while the wait has already begun, so neither delays a wake-up.
    pub(crate) async fn wait(
        self: &Arc<Self>,
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
            futures::future::join_all(
                nodes
                    .iter()
                    .enumerate()
                    .map(|(index, node)| self.subscribe(index, node, &channel, timeout)),
            )
            .await
            .into_iter()
            .any(|subscribed| subscribed)
        };
        // The retiring task holds no strong reference (a client dropped meanwhile closes its
        // connections at once) and bounds each `UNSUBSCRIBE` by the node timeout: a node that
        // answers nothing (black-holed) must not keep the task, and with it the other nodes'
        // pub/sub connections, alive for good.
        let (wakeups, name) = (Arc::downgrade(self), channel.clone());
        let unsubscribe = move || async move {
            for index in 0.. {
                let sink = {
                    let Some(wakeups) = wakeups.upgrade() else {
                        return;
                    };
                    let Some(subscriber) = wakeups.subscribers.get(index) else {
                        return;
                    };
                    subscriber.lock().await.as_ref().map(Subscriber::sink)
                };
                if let Some(mut sink) = sink {
                    let _ = tokio::time::timeout(timeout, sink.unsubscribe(&name)).await;
                }
            }
        };
        self.waiters
            .wait(
                &channel,
                max_wait,
                until_free(nodes, key, quorum, timeout),
                subscribe,
                unsubscribe,
            )
            .await;
    }

    /// Closes every pub/sub connection (on shutdown), for good: an attempt still under way
    /// subscribes nowhere after it.
    ///
    /// A subscription under way holds its slot across its connect, within a waiter's future:
    /// one kept but no longer polled would hold it for good, and the shutdown with it. A slot
    /// still held after [`crate::fair::CLOSE_SLOT_WAIT`] is left to its holder, which closes
    /// what it connects once it sees `closed` (read under the slot's lock, after the connect)
    /// and ends the reader left in the slot; that reader connects nowhere again meanwhile.
    pub(crate) async fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for slot in &self.subscribers {
            let Ok(mut slot) =
                tokio::time::timeout(crate::fair::CLOSE_SLOT_WAIT, slot.lock()).await
            else {
                continue;
            };
            if let Some(subscriber) = slot.take() {
                subscriber.reader.abort();
            }
        }
    }

    /// Subscribes `channel` on the node at `index` (bounded by `timeout`); whether it is.
    async fn subscribe(&self, index: usize, node: &Node, channel: &str, timeout: Duration) -> bool {
        let Some(slot) = self.subscribers.get(index) else {
            return false;
        };
        let attempt = async {
            let mut slot = slot.lock().await;
            // Read under the slot's lock, which `close` takes after setting it: a connection is
            // either made before `close` takes it away, or not at all.
            if self.closed.load(Ordering::SeqCst) {
                return Ok(());
            }
            let reuse = slot
                .as_ref()
                .filter(|s| s.alive.load(Ordering::SeqCst))
                .map(Subscriber::sink);
            if let Some(mut sink) = reuse {
                drop(slot);
                return sink.subscribe(channel).await;
            }
            // A connection made anew (none yet, or the reader is still connecting again after
            // a loss, or gave up) subscribes every channel that has waiters, this one's among
            // them: the current waiters of the others would hear no release on this node until
            // their next wait. Only a connection so subscribed replaces the reader: a wait that
            // ends meanwhile (woken by another node, its delay over, cancelled) drops what it
            // made, and a reader still reconnecting goes on.
            let mut channels = self.waiters.channels();
            if !channels.iter().any(|subscribed| subscribed == channel) {
                channels.push(channel.to_owned());
            }
            let (mut sink, stream) = node.client().get_async_pubsub().await?.split();
            sink.subscribe(channels).await?;
            // Closed while connecting (`close` does not wait for a slot held across a connect,
            // see there): what was made is dropped, and with it its connection, and the reader
            // left in the slot is ended here.
            if self.closed.load(Ordering::SeqCst) {
                if let Some(old) = slot.take() {
                    old.reader.abort();
                }
                return Ok(());
            }
            if let Some(old) = slot.take() {
                old.reader.abort();
            }
            *slot = Some(self.reader(node, sink, stream));
            Ok(())
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(())) => true,
            Ok(Err(error)) => {
                tracing::debug!(node = node.label(), error = %lock_core::raw::redis::shown_error(&error), "cannot subscribe for wake-ups; falling back to the retry delay");
                false
            }
            Err(_) => {
                tracing::debug!(
                    node = node.label(),
                    "subscribing for wake-ups timed out; falling back to the retry delay"
                );
                false
            }
        }
    }

    /// The reader of a pub/sub connection made and subscribed.
    fn reader(&self, node: &Node, sink: PubSubSink, mut stream: PubSubStream) -> Subscriber {
        let sink = Arc::new(std::sync::Mutex::new(sink));
        let alive = Arc::new(AtomicBool::new(true));
        let (waiters, still_alive) = (self.waiters.clone(), Arc::clone(&alive));
        let (shared_sink, closed) = (Arc::clone(&sink), Arc::clone(&self.closed));
        // Counted while its connection is up, and no longer once the reader is gone, however
        // it ends (aborted when replaced or closed, too).
        let mut up = Up::new(Arc::clone(&self.connected));
        let node = node.clone();
        let reader = tokio::spawn(async move {
            // When this reader last connected again itself.
            let mut reconnected: Option<tokio::time::Instant> = None;
            loop {
                while let Some(message) = stream.next().await {
                    waiters.wake(message.get_channel_name());
                }
                still_alive.store(false, Ordering::SeqCst);
                // The connection is gone. A release is announced on every node that held the
                // key: while another connection is up, the waiters may still hear it there
                // (waking them would spend the retry loop's early wake-ups, after which its
                // attempts are spaced), and the next waiters subscribe again. With none up,
                // messages may have been missed: everyone retries now.
                if up.down() > 1 {
                    waiters.resubscribe();
                } else {
                    waiters.wake_all();
                }
                // Connected and subscribed again at once: the holder may hold the key on this
                // node and not on those still connected (a quorum is enough), and its release
                // would then reach none of the current waiters. A node that cannot be reached
                // is tried again every `RECONNECT_PAUSE` while waiters are left (the waiters'
                // own subscriptions try it no more once another node subscribed their
                // channel). Never after `close` (which may have left this reader in a slot
                // held by a subscription under way).
                // A connection this reader made again and lost within `RECONNECT_PAUSE` (a node,
                // or a proxy in front of it, that closes connections soon after they are made)
                // is made again only once that pause has passed since: one connection a second,
                // not one per round trip (20 a second per client for connections closed after
                // 50 ms). A connection lost after a steady while is made again at once.
                if let Some(reconnected) = reconnected {
                    tokio::time::sleep_until(reconnected + RECONNECT_PAUSE).await;
                }
                let mut failed = false;
                loop {
                    if closed.load(Ordering::SeqCst) {
                        return;
                    }
                    let again = async {
                        let (mut sink, stream) = node.client().get_async_pubsub().await?.split();
                        // One `SUBSCRIBE` for them all: one round trip, however many channels
                        // (one each took 30 of them on a 40 ms link past `RECONNECT_WITHIN`).
                        let channels = waiters.channels();
                        if !channels.is_empty() {
                            sink.subscribe(channels.clone()).await?;
                        }
                        Ok::<_, redis::RedisError>((sink, stream, channels))
                    };
                    if let Ok(Ok((sink, again, channels))) =
                        tokio::time::timeout(crate::fair::RECONNECT_WITHIN, again).await
                        && !closed.load(Ordering::SeqCst)
                    {
                        *shared_sink
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = sink;
                        stream = again;
                        reconnected = Some(tokio::time::Instant::now());
                        up.again();
                        still_alive.store(true, Ordering::SeqCst);
                        // After a failed try the node was not listened to for a second or
                        // more: a release it announced meanwhile (it may be the only one to,
                        // as above) reached nobody. The waiters of what is subscribed again
                        // retry now (once per outage, not per loss: a flapping connection
                        // reconnects at its first try and spends no early wake-up).
                        if failed {
                            for channel in &channels {
                                waiters.wake(channel);
                            }
                        }
                        break;
                    }
                    failed = true;
                    if waiters.channels().is_empty() {
                        return;
                    }
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                }
            }
        });
        Subscriber {
            sink,
            alive,
            reader,
        }
    }
}

/// How long a reader whose node could not be reached waits before it tries again.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// A reader's count in `Wakeups::connected` while its connection is up; given back when the
/// reader ends however it ends (an aborted reader whose connection was up must not count as
/// connected for good: a later loss would then wake nobody though no connection is left).
struct Up {
    connected: Arc<AtomicUsize>,
    up: bool,
}

impl Up {
    fn new(connected: Arc<AtomicUsize>) -> Self {
        connected.fetch_add(1, Ordering::SeqCst);
        Self {
            connected,
            up: true,
        }
    }

    /// The connection is lost: how many were counted up before (this one included).
    fn down(&mut self) -> usize {
        self.up = false;
        self.connected.fetch_sub(1, Ordering::SeqCst)
    }

    /// The connection is made again.
    fn again(&mut self) {
        self.connected.fetch_add(1, Ordering::SeqCst);
        self.up = true;
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if self.up {
            self.connected.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use lock_core::SecretUrl;

    use super::*;
    use crate::RedlockConfig;
    use crate::config::NodeUrl;

    /// Promised (`Lock::shutdown`: the client's pub/sub connections are closed): a waiter that
    /// was under way when the client stopped and subscribes only now opens no new pub/sub
    /// connection, which nothing would close before the client is dropped.
    ///
    /// Broken before the fix: a subscription after `close` connected to the node (here: a bare
    /// TCP listener standing for it, which sees the connection).
    #[tokio::test]
    async fn a_subscription_after_close_opens_no_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = SecretUrl::new(format!("redis://{}", listener.local_addr().unwrap()));
        let config = RedlockConfig::new([url.clone()]);
        let node = Node::new(&NodeUrl::parse(&url).unwrap(), &config).unwrap();
        let wakeups = Wakeups::new(1);
        wakeups.close().await;
        let subscribed = wakeups.subscribe(0, &node, "lock-release:k", Duration::from_millis(300));
        let accepted = tokio::time::timeout(Duration::from_millis(300), listener.accept());
        let (_, accepted) = tokio::join!(subscribed, accepted);
        assert!(
            accepted.is_err(),
            "a subscription after close connected to the node"
        );
    }
}

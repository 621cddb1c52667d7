//! One pub/sub connection per node for the whole client, shared by the waiters for releases
//! (`wake.rs`: `lock-released:<key>`, one channel per key waited on) and the fair waiters
//! (`fair.rs`: `lock-turn:<client>`, one channel for the client), with one reader per
//! connection that hands each message to the waiters it names.
//!
//! A lost connection is made again at once by its reader, subscribed to every channel that
//! has waiters (the turn channel once any fair waiter listened); a node that cannot be reached
//! is tried again every [`RECONNECT_PAUSE`] while anyone waits, and once it is back, the
//! waiters of what is subscribed again are woken (a release or a turn it announced meanwhile
//! reached nobody: it may be the only node to announce it, a quorum being enough). While
//! another connection of the client is up, a loss wakes nobody: releases and turns are
//! announced by every node that had the key, and the waiters still hear them there. With none
//! up, every waiter retries now.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::StreamExt;
use lock_core::raw::redis::{TURN_CHANNEL, shown_error};
use lock_core::raw::wake::{TurnRegistry, WakeRegistry};
use redis::aio::{PubSubSink, PubSubStream};

use crate::node::Node;

/// How long a reader whose node could not be reached waits before it tries again, and the
/// least time between two connections a reader makes (see [`PubSub::reader`]).
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// How long one try of a reader to connect again may take.
const RECONNECT_WITHIN: Duration = Duration::from_secs(1);

/// How long `close` waits for a slot held by a connect under way (see [`PubSub::close`]).
const CLOSE_SLOT_WAIT: Duration = Duration::from_millis(100);

/// After a fair waiter's subscription failed for want of an answer (timed out; a refusal
/// leaves no cooldown), the node is not asked again by fair waiters for this long: a node that
/// does not answer (black-holed) must not make every attempt of every waiter wait for it (they
/// listen before each attempt). The others' messages still wake the waiter meanwhile, a reader
/// left in the slot goes on trying every second, and the retry delay is the fallback.
const TURN_COOLDOWN: Duration = Duration::from_secs(5);

/// What a subscription is for.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Channel<'a> {
    /// The release channel of a key.
    Release(&'a str),
    /// This client's turn channel.
    Turn,
}

/// The pub/sub connections of one client, one per node.
pub(crate) struct PubSub {
    listeners: Listeners,
    slots: Vec<tokio::sync::Mutex<Slot>>,
    /// By node: until when fair waiters leave the node alone after their subscription went
    /// unanswered (see [`TURN_COOLDOWN`]); read before the slot's lock, which a connect under
    /// way holds.
    turn_retry_at: Vec<std::sync::Mutex<Option<tokio::time::Instant>>>,
    /// The connections whose reader is connected, and those of them that subscribed the turn
    /// channel: a connection lost while another one is up wakes nobody (a turn connection,
    /// while another turn connection is up).
    connected: Counts,
    /// Set by `close`: an attempt still under way subscribes nowhere after it, and a reader
    /// connects nowhere again.
    closed: Arc<AtomicBool>,
}

/// Who is woken by what a connection hears.
#[derive(Clone)]
struct Listeners {
    releases: WakeRegistry,
    turns: Option<Turns>,
}

/// The fair waiters of this client and their channel.
#[derive(Clone)]
struct Turns {
    registry: TurnRegistry,
    channel: Arc<str>,
    /// Set once a fair waiter listened: every connection made from then on subscribes the
    /// channel.
    wanted: Arc<AtomicBool>,
}

/// A node's connection.
#[derive(Default)]
struct Slot {
    subscriber: Option<Subscriber>,
}

/// How many connections are up, and how many of them subscribed the turn channel.
#[derive(Clone, Default)]
struct Counts {
    up: Arc<AtomicUsize>,
    turn: Arc<AtomicUsize>,
}

struct Subscriber {
    /// Replaced by the reader when it connects again after a loss.
    sink: Arc<std::sync::Mutex<PubSubSink>>,
    /// Whether the connection is up (false while the reader connects again, and once it gave
    /// up or ended).
    alive: Arc<AtomicBool>,
    /// Whether the connection up now subscribed the turn channel (counted in
    /// `Counts::turn` while it is).
    turn: Arc<AtomicBool>,
    /// Whether the node was out of reach since the connection was lost (a failed try, or the
    /// reconnect pause waited out): its announcements meanwhile reached nobody, and whoever
    /// connects again (the reader, or a subscription that replaces it) wakes the waiters of
    /// what it subscribes.
    missed: Arc<AtomicBool>,
    /// Reads the messages; aborting it closes the connection.
    reader: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    fn sink(&self) -> PubSubSink {
        self.sink
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Listeners {
    /// What a connection made now subscribes: every release channel with waiters, and the
    /// turn channel once wanted.
    fn channels(&self) -> Vec<String> {
        let mut channels = self.releases.channels();
        if let Some(turns) = self.turns.as_ref().filter(|turns| turns.wanted()) {
            channels.push(turns.channel.to_string());
        }
        channels
    }

    fn is_turn(&self, channel: &str) -> bool {
        self.turns
            .as_ref()
            .is_some_and(|turns| *turns.channel == *channel)
    }

    fn deliver(&self, message: &redis::Msg) {
        let channel = message.get_channel_name();
        match &self.turns {
            Some(turns) if *turns.channel == *channel => {
                if let Ok(payload) = std::str::from_utf8(message.get_payload_bytes()) {
                    turns.registry.wake_message(payload);
                }
            }
            _ => self.releases.wake(channel),
        }
    }

    /// A connection was lost; `others_up`: another one of the client is up; `last_turn`: it
    /// was the last one up that subscribed the turn channel.
    fn lost(&self, others_up: bool, last_turn: bool) {
        if others_up {
            // The release waiters still listen on the others; their channels are subscribed
            // again by their next waiter (waking them would spend the retry loop's early
            // wake-ups, after which its attempts are spaced).
            self.releases.resubscribe();
        } else {
            self.releases.wake_all();
        }
        if last_turn && let Some(turns) = &self.turns {
            turns.registry.wake_all();
        }
    }

    /// `channels` are subscribed again after a node could not be reached for a while: what
    /// it announced meanwhile reached nobody, so their waiters retry now.
    fn back(&self, channels: &[String]) {
        for channel in channels {
            match &self.turns {
                Some(turns) if *turns.channel == **channel => turns.registry.wake_all(),
                _ => self.releases.wake(channel),
            }
        }
    }

    /// Whether anyone waits: a reader whose node cannot be reached goes on trying only then.
    fn anyone_waits(&self) -> bool {
        !self.releases.channels().is_empty()
            || self
                .turns
                .as_ref()
                .is_some_and(|turns| turns.wanted() && !turns.registry.is_empty())
    }
}

impl Turns {
    fn wanted(&self) -> bool {
        self.wanted.load(Ordering::SeqCst)
    }
}

/// Dropped without `close` (a client dropped without `shutdown`), the connections close too:
/// their readers own them and would otherwise keep them for good.
impl Drop for PubSub {
    fn drop(&mut self) {
        for slot in &mut self.slots {
            if let Some(subscriber) = slot.get_mut().subscriber.take() {
                subscriber.reader.abort();
            }
        }
    }
}

impl PubSub {
    /// The connections of a client of `nodes` nodes, none made yet; `instance` names a fair
    /// client's turn channel.
    pub(crate) fn new(nodes: usize, instance: Option<&str>) -> Self {
        Self {
            listeners: Listeners {
                releases: WakeRegistry::default(),
                turns: instance.map(|instance| Turns {
                    registry: TurnRegistry::default(),
                    channel: Arc::from(format!("{TURN_CHANNEL}{instance}")),
                    wanted: Arc::default(),
                }),
            },
            slots: (0..nodes).map(|_| tokio::sync::Mutex::default()).collect(),
            turn_retry_at: (0..nodes).map(|_| std::sync::Mutex::default()).collect(),
            connected: Counts::default(),
            closed: Arc::default(),
        }
    }

    /// The waiters for releases.
    pub(crate) fn releases(&self) -> &WakeRegistry {
        &self.listeners.releases
    }

    /// The fair waiters (a fair client's).
    pub(crate) fn turns(&self) -> Option<&TurnRegistry> {
        self.listeners.turns.as_ref().map(|turns| &turns.registry)
    }

    /// Subscribes `channel` on the node at `index`, bounded by `timeout`; whether it is.
    ///
    /// The node's connection is used if it is up; otherwise one is made, subscribed to every
    /// channel that has waiters (this one among them: the current waiters of the others would
    /// hear nothing on this node until their next wait), and replaces the reader left in the
    /// slot only once made: a wait that ends meanwhile (woken by another node, its delay over,
    /// cancelled) drops what it made, and a reader still trying goes on. For the turn channel,
    /// a node whose subscription went unanswered lately is left alone (see [`TURN_COOLDOWN`]).
    pub(crate) async fn subscribe(
        &self,
        index: usize,
        node: &Node,
        channel: Channel<'_>,
        timeout: Duration,
    ) -> bool {
        let Some(slot) = self.slots.get(index) else {
            return false;
        };
        let name = match (channel, &self.listeners.turns) {
            (Channel::Release(name), _) => name.to_owned(),
            (Channel::Turn, Some(turns)) => {
                // Before anything else: a reader connecting again from now on subscribes it.
                turns.wanted.store(true, Ordering::SeqCst);
                turns.channel.to_string()
            }
            (Channel::Turn, None) => return false,
        };
        let turn = matches!(channel, Channel::Turn);
        let retry_at = self.turn_retry_at.get(index);
        // Marked failed until it succeeds or its connection fails at once (a node down): one
        // cut short by the timeout (a node that does not answer) or refused by the server (an
        // ACL user without the channel) leaves the mark, and fair waiters leave the node alone
        // until it passes, without waiting for the slot (a connect under way holds it).
        let mark = |until: Option<tokio::time::Instant>| {
            if let Some(retry_at) = retry_at.filter(|_| turn) {
                *retry_at
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = until;
            }
        };
        if turn
            && retry_at.is_some_and(|retry_at| {
                retry_at
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .is_some_and(|at| at > tokio::time::Instant::now())
            })
        {
            return false;
        }
        let attempt = async {
            let mut slot = slot.lock().await;
            // Read under the slot's lock, which `close` takes after setting it: a connection is
            // either made before `close` takes it away, or not at all.
            if self.closed.load(Ordering::SeqCst) {
                return Ok(false);
            }
            if let Some(subscriber) = slot
                .subscriber
                .as_ref()
                .filter(|subscriber| subscriber.alive.load(Ordering::SeqCst))
            {
                if turn && subscriber.turn.load(Ordering::SeqCst) {
                    return Ok(true);
                }
                let (mut sink, subscribed) = (subscriber.sink(), Arc::clone(&subscriber.turn));
                let alive = Arc::clone(&subscriber.alive);
                drop(slot);
                mark(Some(tokio::time::Instant::now() + TURN_COOLDOWN));
                match sink.subscribe(&name).await {
                    Ok(()) => {
                        mark(None);
                        // Counted once, and only on a connection still up (a reader that lost
                        // it meanwhile counts its connection as without the channel).
                        if turn
                            && alive.load(Ordering::SeqCst)
                            && !subscribed.swap(true, Ordering::SeqCst)
                        {
                            self.connected.turn.fetch_add(1, Ordering::SeqCst);
                        }
                        return Ok(true);
                    }
                    Err(error) => {
                        // A node that does not answer, or refuses the channel for good (an ACL
                        // user without it), keeps the cooldown; a broken connection does not
                        // (the reader is connecting again).
                        if !error.is_timeout() && !refused(&error) {
                            mark(None);
                        }
                        return Err(error);
                    }
                }
            }
            if turn {
                mark(Some(tokio::time::Instant::now() + TURN_COOLDOWN));
            }
            let mut channels = self.listeners.channels();
            if !channels.contains(&name) {
                channels.push(name.clone());
            }
            let made = async {
                let (mut sink, stream) = node.client().get_async_pubsub().await?.split();
                let subscribed = subscribe_each(&mut sink, &channels).await?;
                Ok::<_, redis::RedisError>((sink, stream, subscribed))
            };
            let (sink, stream, subscribed) = match made.await {
                Ok(made) => made,
                Err(error) => {
                    // The connection refused or closed at once: the cooldown is for a node
                    // that does not answer, and one that is down costs nothing to ask again.
                    // Left alone for it, a node back meanwhile would pass turns nobody hears
                    // (no reader may be left in the slot to try again: one gives up while
                    // nobody waits).
                    if !error.is_timeout() {
                        mark(None);
                    }
                    return Err(error);
                }
            };
            // A reader ended here before its node was back wakes nobody: this connection does.
            let missed = slot.subscriber.take().is_some_and(|old| {
                old.reader.abort();
                old.missed.load(Ordering::SeqCst)
            });
            // Closed while connecting (`close` does not wait for a slot held across a
            // connect, see there): what was made is dropped, and with it its connection.
            if self.closed.load(Ordering::SeqCst) {
                return Ok(false);
            }
            let with_turn = subscribed.iter().any(|name| self.listeners.is_turn(name));
            slot.subscriber = Some(self.reader(node, sink, stream, with_turn));
            if missed {
                self.listeners.back(&subscribed);
            }
            // Refused (an ACL user without the channel): the connection serves the others,
            // and fair waiters leave the node alone for the cooldown.
            let ours = subscribed.contains(&name);
            if ours {
                mark(None);
            }
            Ok::<_, redis::RedisError>(ours)
        };
        let what = if turn { "turns" } else { "wake-ups" };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(subscribed)) => subscribed,
            Ok(Err(error)) => {
                tracing::debug!(node = node.label(), error = %shown_error(&error), "cannot subscribe for {what}; falling back to the retry delay");
                false
            }
            Err(_) => {
                tracing::debug!(
                    node = node.label(),
                    "subscribing for {what} timed out; falling back to the retry delay"
                );
                false
            }
        }
    }

    /// Unsubscribes `channel` on every node that has a connection, each bounded by `timeout`
    /// (a node that answers nothing must not keep the task, and with it the client's
    /// connections, alive for good), unless the client is gone.
    pub(crate) async fn unsubscribe(pubsub: Weak<Self>, channel: String, timeout: Duration) {
        for index in 0.. {
            let sink = {
                let Some(pubsub) = pubsub.upgrade() else {
                    return;
                };
                let Some(slot) = pubsub.slots.get(index) else {
                    return;
                };
                slot.lock().await.subscriber.as_ref().map(Subscriber::sink)
            };
            if let Some(mut sink) = sink {
                let _ = tokio::time::timeout(timeout, sink.unsubscribe(&channel)).await;
            }
        }
    }

    /// Closes every connection (on shutdown), for good: an attempt still under way subscribes
    /// nowhere after it.
    ///
    /// A subscription under way holds its slot across its connect, within a waiter's future:
    /// one kept but no longer polled would hold it for good, and the shutdown with it. A slot
    /// still held after [`CLOSE_SLOT_WAIT`] is left to its holder, which closes what it
    /// connects once it sees `closed` (read under the slot's lock, after the connect) and ends
    /// the reader left in the slot; that reader connects nowhere again meanwhile.
    pub(crate) async fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for slot in &self.slots {
            let Ok(mut slot) = tokio::time::timeout(CLOSE_SLOT_WAIT, slot.lock()).await else {
                continue;
            };
            if let Some(subscriber) = slot.subscriber.take() {
                subscriber.reader.abort();
            }
        }
    }

    /// The reader of a connection to `node` made and subscribed (`with_turn`: to the turn
    /// channel too).
    fn reader(
        &self,
        node: &Node,
        sink: PubSubSink,
        mut stream: PubSubStream,
        with_turn: bool,
    ) -> Subscriber {
        let sink = Arc::new(std::sync::Mutex::new(sink));
        let alive = Arc::new(AtomicBool::new(true));
        let turn = Arc::new(AtomicBool::new(false));
        let missed = Arc::new(AtomicBool::new(false));
        let outage = Arc::clone(&missed);
        let listeners = self.listeners.clone();
        let (shared_sink, still_alive) = (Arc::clone(&sink), Arc::clone(&alive));
        let closed = Arc::clone(&self.closed);
        // Counted while its connection is up, and no longer once the reader is gone, however
        // it ends (aborted when replaced or closed, too).
        let mut up = Up::new(self.connected.clone(), Arc::clone(&turn), with_turn);
        let node = node.clone();
        let reader = tokio::spawn(async move {
            // When this reader last connected again itself.
            let mut reconnected: Option<tokio::time::Instant> = None;
            loop {
                while let Some(message) = stream.next().await {
                    listeners.deliver(&message);
                }
                still_alive.store(false, Ordering::SeqCst);
                let (others_up, last_turn) = up.down();
                listeners.lost(others_up, last_turn);
                // A connection this reader made again and lost within `RECONNECT_PAUSE` (a
                // node, or a proxy in front of it, that closes connections soon after they are
                // made) is made again only once that pause has passed since: one connection a
                // second, not one per round trip. A connection lost after a steady while is
                // made again at once.
                // Down for the pause, the node's announcements meanwhile reached nobody (the
                // loss woke nobody while another connection was up, though that node may not
                // hold the key): woken once back, as after a failed try (one wake-up a second
                // at most, as many as connections), also by a subscription that replaces this
                // reader during the pause (marked before it).
                let mut paused = false;
                if let Some(reconnected) = reconnected {
                    let until = reconnected + RECONNECT_PAUSE;
                    paused = until > tokio::time::Instant::now();
                    outage.store(paused, Ordering::SeqCst);
                    tokio::time::sleep_until(until).await;
                }
                let mut failed = paused;
                outage.store(failed, Ordering::SeqCst);
                loop {
                    // Never after `close` (which may have left this reader in a slot held by a
                    // subscription under way).
                    if closed.load(Ordering::SeqCst) {
                        return;
                    }
                    let again = async {
                        let (mut sink, stream) = node.client().get_async_pubsub().await?.split();
                        let channels = subscribe_each(&mut sink, &listeners.channels()).await?;
                        Ok::<_, redis::RedisError>((sink, stream, channels))
                    };
                    if let Ok(Ok((sink, again, channels))) =
                        tokio::time::timeout(RECONNECT_WITHIN, again).await
                        && !closed.load(Ordering::SeqCst)
                    {
                        *shared_sink
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = sink;
                        stream = again;
                        reconnected = Some(tokio::time::Instant::now());
                        up.again(channels.iter().any(|name| listeners.is_turn(name)));
                        still_alive.store(true, Ordering::SeqCst);
                        // Once per outage, not per loss: a connection lost after a steady while
                        // connects again at its first try and spends no early wake-up.
                        if failed {
                            listeners.back(&channels);
                        }
                        outage.store(false, Ordering::SeqCst);
                        break;
                    }
                    failed = true;
                    outage.store(true, Ordering::SeqCst);
                    // Asked after the pause, not at once: a failed try right after a loss that
                    // woke the waiters finds them between two waits (their attempts under way),
                    // registered nowhere, and a reader that gave up then would leave them
                    // with no one trying the node.
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                    if !listeners.anyone_waits() {
                        return;
                    }
                }
            }
        });
        Subscriber {
            sink,
            alive,
            turn,
            missed,
            reader,
        }
    }
}

/// Subscribes `channels` on `sink`, all in one `SUBSCRIBE` (one round trip, however many), or,
/// when the server refuses that (it refuses the whole command when it refuses one channel: an
/// ACL user allowed some channels only), one command each, leaving out those it refuses: a refused
/// channel must not take the others with it (the turn channel with a release channel). The
/// channels subscribed.
///
/// # Errors
/// The connection's: it is broken, or did not answer.
async fn subscribe_each(
    sink: &mut PubSubSink,
    channels: &[String],
) -> redis::RedisResult<Vec<String>> {
    if channels.is_empty() {
        return Ok(Vec::new());
    }
    match sink.subscribe(channels).await {
        Ok(()) => return Ok(channels.to_vec()),
        Err(error) if refused(&error) => {}
        Err(error) => return Err(error),
    }
    // All sent at once on clones of the sink, which pipelines them: one round trip still, so
    // that many channels fit in a reconnect's time however slow the link.
    let answers = futures::future::join_all(channels.iter().map(|channel| {
        let mut sink = sink.clone();
        async move { (channel, sink.subscribe(channel).await) }
    }))
    .await;
    let mut subscribed = Vec::with_capacity(channels.len());
    for (channel, answer) in answers {
        match answer {
            Ok(()) => subscribed.push(channel.clone()),
            Err(error) if refused(&error) => {
                tracing::debug!(error = %shown_error(&error), "a channel was refused; its waiters fall back to their retry delay");
            }
            Err(error) => return Err(error),
        }
    }
    Ok(subscribed)
}

/// Whether the server refused a command (an error it answered, such as `NOPERM`), rather than
/// the connection failing.
fn refused(error: &redis::RedisError) -> bool {
    error.code().is_some()
}

/// A reader's count in `PubSub::connected` while its connection is up (and in the turn count
/// while it also subscribed the turn channel); given back when the reader ends however it ends
/// (an aborted reader whose connection was up must not count as connected for good: a later
/// loss would then wake nobody though no connection is left).
struct Up {
    counts: Counts,
    up: bool,
    /// The connection's `Subscriber::turn`, also set by a subscription on it.
    turn: Arc<AtomicBool>,
}

impl Up {
    fn new(counts: Counts, turn: Arc<AtomicBool>, with_turn: bool) -> Self {
        counts.up.fetch_add(1, Ordering::SeqCst);
        let mut up = Self {
            counts,
            up: true,
            turn,
        };
        up.set_turn(with_turn);
        up
    }

    fn set_turn(&mut self, with_turn: bool) {
        if with_turn && !self.turn.swap(true, Ordering::SeqCst) {
            self.counts.turn.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The turn channel is no longer heard here: whether this was the last connection up
    /// that heard it.
    fn turn_down(&mut self) -> bool {
        self.turn.swap(false, Ordering::SeqCst)
            && self.counts.turn.fetch_sub(1, Ordering::SeqCst) == 1
    }

    /// The connection is lost: whether another one is up, and whether this was the last one
    /// up with the turn channel.
    fn down(&mut self) -> (bool, bool) {
        self.up = false;
        let others_up = self.counts.up.fetch_sub(1, Ordering::SeqCst) > 1;
        (others_up, self.turn_down())
    }

    /// The connection is made again (`with_turn`: subscribed to the turn channel).
    fn again(&mut self, with_turn: bool) {
        self.counts.up.fetch_add(1, Ordering::SeqCst);
        self.up = true;
        self.set_turn(with_turn);
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if self.up {
            self.counts.up.fetch_sub(1, Ordering::SeqCst);
        }
        self.turn_down();
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
    /// was under way when the client stopped and subscribes only now (for a release or for its
    /// turn) opens no new pub/sub connection, which nothing would close before the client is
    /// dropped.
    ///
    /// Broken before the fix: a subscription after `close` connected to the node (here: a bare
    /// TCP listener standing for it, which sees the connection).
    #[tokio::test]
    async fn a_subscription_after_close_opens_no_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = SecretUrl::new(format!("redis://{}", listener.local_addr().unwrap()));
        let config = RedlockConfig::new([url.clone()]);
        let node = Node::new(&NodeUrl::parse(&url).unwrap(), &config).unwrap();
        let pubsub = PubSub::new(1, Some("me"));
        pubsub.close().await;
        for channel in [Channel::Release("lock-released:k"), Channel::Turn] {
            let subscribed = pubsub.subscribe(0, &node, channel, Duration::from_millis(300));
            let accepted = tokio::time::timeout(Duration::from_millis(300), listener.accept());
            let (subscribed, accepted) = tokio::join!(subscribed, accepted);
            assert!(!subscribed);
            assert!(
                accepted.is_err(),
                "a subscription after close connected to the node: {channel:?}"
            );
        }
    }
}

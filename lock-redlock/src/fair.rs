//! Fair waiting across processes (`fair`): waiters line up in a sorted set beside the key on
//! each node (see `lock_core::raw::redis::LINE_SCRIPT`), and the head of the line is woken
//! alone, by a message naming it on the channel of its client (`lock-turn:<instance>`), which
//! every fair client subscribes to on every node, on its first wait. With one node the line is
//! ordered by the server's clock; with several, by a place each waiter chooses once (its
//! client's clock when it first lines up, in µs), so that every node orders the same waiters
//! alike and a release reserves the key on all of them for the same waiter. A lost message
//! costs the waiter its fallback poll at most (the longer of its retry delay and 200 ms, a
//! quarter of the ttl at most: see the core's retry loop); a lost pub/sub connection wakes
//! every waiter of this client, and the next wait subscribes again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use lock_core::raw::wake::TurnRegistry;
use lock_core::{Result, Token};

use lock_core::raw::redis::{TURN_CHANNEL, line_member};

use crate::node::Node;

/// The waiters of one fair client and its subscription.
pub(crate) struct FairLine {
    /// 32 hex digits naming this client in the members of every line it waits in.
    instance: String,
    turns: TurnRegistry,
    /// One subscription per node, by the node's index.
    subscribers: tokio::sync::Mutex<Vec<Option<Subscriber>>>,
    /// The place in line each waiter chose (several nodes only), in µs since the Unix epoch.
    places: Mutex<HashMap<String, u64>>,
}

/// Places older than this are dropped once more than [`PLACES_PRUNE_ABOVE`] waiters have one
/// (an acquisition that ended without `forget`).
const PLACE_IDLE: Duration = lock_core::raw::wake::TURN_IDLE;
const PLACES_PRUNE_ABOVE: usize = lock_core::raw::wake::TURN_PRUNE_ABOVE;

struct Subscriber {
    alive: Arc<AtomicBool>,
    /// Reads the messages; aborting it closes the pub/sub connection.
    reader: tokio::task::JoinHandle<()>,
}

/// A client dropped without `shutdown` closes its pub/sub connection too: the reading task
/// owns it and would otherwise keep it (and the subscription) for good.
impl Drop for FairLine {
    fn drop(&mut self) {
        for subscriber in self.subscribers.get_mut().drain(..).flatten() {
            subscriber.reader.abort();
        }
    }
}

impl FairLine {
    pub(crate) fn new() -> Result<Self> {
        Ok(Self {
            instance: Token::generate()?.expose().to_string(),
            turns: TurnRegistry::default(),
            subscribers: tokio::sync::Mutex::new(Vec::new()),
            places: Mutex::new(HashMap::new()),
        })
    }

    /// `waiter`'s place in every node's line: chosen on its first call (this client's clock,
    /// in µs since the Unix epoch), the same on every later one, so that a waiter that left a
    /// node's line (it took a turn there but not a quorum) joins it again where it stood.
    /// Clocks of clients that disagree reorder their waiters, never the nodes' agreement.
    pub(crate) fn place(&self, waiter: &Token) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
            });
        let mut places = self.places.lock().unwrap_or_else(PoisonError::into_inner);
        let key = waiter.expose();
        if let Some(place) = places.get(&*key) {
            return *place;
        }
        if places.len() > PLACES_PRUNE_ABOVE {
            let idle = u64::try_from(PLACE_IDLE.as_micros()).unwrap_or(u64::MAX);
            places.retain(|_, place| now.saturating_sub(*place) < idle);
        }
        places.insert(key.to_string(), now);
        now
    }

    /// The member of a line that stands for `waiter` of this client.
    pub(crate) fn member(&self, waiter: &Token) -> Vec<u8> {
        line_member(&self.instance, &waiter.expose()).into_bytes()
    }

    /// Listens for `waiter`'s turn before its attempt goes out, subscribing this client's
    /// channel first on every node where it is not (all at once, bounded by `timeout`; a node
    /// without it leaves the retry delay as the fallback, the others' messages still wake).
    pub(crate) async fn listen(&self, waiter: &Token, nodes: &[Node], timeout: Duration) {
        self.turns.listen(&waiter.expose());
        let mut slots = self.subscribers.lock().await;
        if slots.len() < nodes.len() {
            slots.resize_with(nodes.len(), || None);
        }
        let missing: Vec<usize> = (0..nodes.len())
            .filter(|index| {
                !slots[*index]
                    .as_ref()
                    .is_some_and(|s| s.alive.load(Ordering::SeqCst))
            })
            .collect();
        if missing.is_empty() {
            return;
        }
        let connects = missing.iter().map(|index| {
            let node = &nodes[*index];
            async move {
                match tokio::time::timeout(timeout, self.connect(node)).await {
                    Ok(Ok(subscriber)) => Some(subscriber),
                    Ok(Err(error)) => {
                        tracing::debug!(node = node.label(), %error, "cannot subscribe for turns; falling back to the retry delay");
                        None
                    }
                    Err(_) => {
                        tracing::debug!(
                            node = node.label(),
                            "subscribing for turns timed out; falling back to the retry delay"
                        );
                        None
                    }
                }
            }
        });
        let made = futures::future::join_all(connects).await;
        for (index, subscriber) in missing.into_iter().zip(made) {
            if let Some(subscriber) = subscriber
                && let Some(old) = slots[index].replace(subscriber)
            {
                old.reader.abort();
            }
        }
    }

    /// `waiter` is first in line behind a holder with `left` to live.
    pub(crate) fn first_in_line(&self, waiter: &Token, left: Duration) {
        self.turns.first_in_line(&waiter.expose(), left);
    }

    /// `waiter`'s acquisition ended.
    pub(crate) fn forget(&self, waiter: &Token) {
        let key = waiter.expose();
        self.turns.forget(&key);
        self.places
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&*key);
    }

    /// Waits for `waiter`'s turn, the expiry of the holder it is first in line behind, or
    /// `max_wait`.
    pub(crate) async fn wait(&self, waiter: &Token, max_wait: Duration) -> bool {
        self.turns.wait(&waiter.expose(), max_wait).await
    }

    /// Closes the pub/sub connection (on shutdown).
    pub(crate) async fn close(&self) {
        for subscriber in self.subscribers.lock().await.drain(..).flatten() {
            subscriber.reader.abort();
        }
    }

    async fn connect(&self, node: &Node) -> redis::RedisResult<Subscriber> {
        let mut pubsub = node.client().get_async_pubsub().await?;
        pubsub
            .subscribe(format!("{TURN_CHANNEL}{}", self.instance))
            .await?;
        let mut stream = pubsub.into_on_message();
        let alive = Arc::new(AtomicBool::new(true));
        let (turns, still_alive) = (self.turns.clone(), Arc::clone(&alive));
        let reader = tokio::spawn(async move {
            while let Some(message) = stream.next().await {
                if let Ok(waiter) = std::str::from_utf8(message.get_payload_bytes()) {
                    turns.wake(waiter);
                }
            }
            // The connection is gone: messages may have been missed, so everyone retries now.
            still_alive.store(false, Ordering::SeqCst);
            turns.wake_all();
        });
        Ok(Subscriber { alive, reader })
    }
}

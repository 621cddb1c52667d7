//! Fair waiting across processes (`fair`, one node): waiters line up in a sorted set beside the
//! key (see `lock_core::raw::redis::LINE_SCRIPT`), and the head of the line is woken alone, by a message naming it on
//! the channel of its client (`lock-turn:<instance>`), which every fair client subscribes to
//! once, on its first wait. A lost message costs the waiter its fallback poll at most (the
//! longer of its retry delay and 200 ms, a quarter of the ttl at most: see the core's retry
//! loop); a lost pub/sub connection wakes every waiter of this client, and the next wait
//! subscribes again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

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
    subscriber: tokio::sync::Mutex<Option<Subscriber>>,
}

struct Subscriber {
    alive: Arc<AtomicBool>,
    /// Reads the messages; aborting it closes the pub/sub connection.
    reader: tokio::task::JoinHandle<()>,
}

/// A client dropped without `shutdown` closes its pub/sub connection too: the reading task
/// owns it and would otherwise keep it (and the subscription) for good.
impl Drop for FairLine {
    fn drop(&mut self) {
        if let Some(subscriber) = self.subscriber.get_mut().take() {
            subscriber.reader.abort();
        }
    }
}

impl FairLine {
    pub(crate) fn new() -> Result<Self> {
        Ok(Self {
            instance: Token::generate()?.expose().to_string(),
            turns: TurnRegistry::default(),
            subscriber: tokio::sync::Mutex::new(None),
        })
    }

    /// The member of a line that stands for `waiter` of this client.
    pub(crate) fn member(&self, waiter: &Token) -> Vec<u8> {
        line_member(&self.instance, &waiter.expose()).into_bytes()
    }

    /// Listens for `waiter`'s turn before its attempt goes out, subscribing this client's
    /// channel first if it is not (bounded by `timeout`; without it, the retry delay is the
    /// fallback).
    pub(crate) async fn listen(&self, waiter: &Token, node: &Node, timeout: Duration) {
        self.turns.listen(&waiter.expose());
        let subscribed = async {
            let mut slot = self.subscriber.lock().await;
            if slot
                .as_ref()
                .is_some_and(|s| s.alive.load(Ordering::SeqCst))
            {
                return Ok(());
            }
            if let Some(old) = slot.take() {
                old.reader.abort();
            }
            *slot = Some(self.connect(node).await?);
            Ok::<(), redis::RedisError>(())
        };
        match tokio::time::timeout(timeout, subscribed).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::debug!(node = node.label(), %error, "cannot subscribe for turns; falling back to the retry delay");
            }
            Err(_) => tracing::debug!(
                node = node.label(),
                "subscribing for turns timed out; falling back to the retry delay"
            ),
        }
    }

    /// `waiter` is first in line behind a holder with `left` to live.
    pub(crate) fn first_in_line(&self, waiter: &Token, left: Duration) {
        self.turns.first_in_line(&waiter.expose(), left);
    }

    /// `waiter`'s acquisition ended.
    pub(crate) fn forget(&self, waiter: &Token) {
        self.turns.forget(&waiter.expose());
    }

    /// Waits for `waiter`'s turn, the expiry of the holder it is first in line behind, or
    /// `max_wait`.
    pub(crate) async fn wait(&self, waiter: &Token, max_wait: Duration) -> bool {
        self.turns.wait(&waiter.expose(), max_wait).await
    }

    /// Closes the pub/sub connection (on shutdown).
    pub(crate) async fn close(&self) {
        if let Some(subscriber) = self.subscriber.lock().await.take() {
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

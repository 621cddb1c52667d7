//! Push-based wake-ups: with `wake_on_release`, the release script announces each release on
//! `lock-released:<lock key>`, and waiters subscribe through one shared subscriber connection
//! (fred's `SubscriberClient`, which resubscribes after a reconnect). A waiter retries on a
//! message, when the holder's ttl runs out, or after its retry delay, whichever comes first.

use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::{ClientLike, EventInterface, KeysInterface, PubsubInterface};
use fred::types::Message;
use lock_core::raw::redis::{gone_in, release_channel};
use lock_core::raw::wake::{TurnRegistry, WakeRegistry};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;

/// The waiters and the subscriber connection of one backend.
pub(crate) struct Wakeups {
    waiters: WakeRegistry,
    listener: Listener,
}

impl Wakeups {
    pub(crate) fn new(subscriber: SubscriberClient) -> Self {
        Self {
            waiters: WakeRegistry::default(),
            listener: Listener::new(subscriber),
        }
    }

    /// Waits for a release of the lock whose counter key is `counter`, its expiry, or
    /// `max_wait`. `client` (the commands connection) reads the holder's remaining ttl while
    /// the wait has already begun, as does the subscription of the channel's first waiter.
    pub(crate) async fn wait(
        &self,
        client: &fred::clients::Client,
        counter: &str,
        max_wait: Duration,
    ) {
        let channel = release_channel(counter);
        // Zero when gone already (expired or released meanwhile): retry at once.
        let remaining_ttl = async { gone_in(client.pttl::<i64, _>(counter).await.ok()?) };
        let (subscriber, name) = (self.listener.subscriber.clone(), channel.clone());
        let unsubscribe = move || async move {
            let _ = subscriber.unsubscribe(name).await;
        };
        self.waiters
            .wait(
                &channel,
                max_wait,
                remaining_ttl,
                self.subscribe(&channel),
                unsubscribe,
            )
            .await;
    }

    /// Closes the subscriber connection (on shutdown).
    pub(crate) async fn close(&self) {
        self.listener.close().await;
    }

    async fn subscribe(&self, channel: &str) {
        if let Err(error) = self.listener.start(None, self.waiters.clone()).await {
            tracing::debug!(%error, "cannot connect for wake-ups; falling back to the retry delay");
            return;
        }
        if let Err(error) = self.listener.subscriber.subscribe(channel).await {
            tracing::debug!(%error, "cannot subscribe for wake-ups; falling back to the retry delay");
        }
    }
}

/// Waiters that messages wake.
pub(crate) trait Waiters: Clone + Send + Sync + 'static {
    /// Wakes the waiters `message` is for.
    fn wake(&self, message: &Message);
    /// Wakes every waiter: messages may have been missed.
    fn wake_all(&self);
}

impl Waiters for WakeRegistry {
    /// A release message wakes the waiters of its channel.
    fn wake(&self, message: &Message) {
        WakeRegistry::wake(self, &message.channel);
    }

    fn wake_all(&self) {
        WakeRegistry::wake_all(self);
    }
}

impl Waiters for TurnRegistry {
    /// A turn message names the waiter whose turn it is.
    fn wake(&self, message: &Message) {
        if let Some(waiter) = message.value.as_str() {
            TurnRegistry::wake(self, &waiter);
        }
    }

    fn wake_all(&self) {
        TurnRegistry::wake_all(self);
    }
}

/// A subscriber connection (fred's `SubscriberClient`, which subscribes again after a
/// reconnect) and the tasks that read it, started by the first waiter.
pub(crate) struct Listener {
    pub(crate) subscriber: SubscriberClient,
    /// The message reader, the reconnect watcher and the subscription manager.
    tasks: tokio::sync::Mutex<Option<Vec<JoinHandle<()>>>>,
}

/// Dropped without `close` (a client dropped without `shutdown`), the subscriber connection
/// closes too: its tasks, and fred's own connection task, would otherwise keep it (and its
/// subscriptions) for good.
impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(tasks) = self.tasks.get_mut().take() {
            for task in tasks {
                task.abort();
            }
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let subscriber = self.subscriber.clone();
                runtime.spawn(async move {
                    let _ = subscriber.quit().await;
                });
            }
        }
    }
}

impl Listener {
    pub(crate) fn new(subscriber: SubscriberClient) -> Self {
        Self {
            subscriber,
            tasks: tokio::sync::Mutex::new(None),
        }
    }

    /// Connects the subscriber, subscribes `channel` when given, and starts the reader that
    /// hands each message to `waiters` (and wakes them all when messages may have been lost:
    /// the reader fell behind, or the connection was made again), once.
    pub(crate) async fn start(
        &self,
        channel: Option<String>,
        waiters: impl Waiters,
    ) -> Result<(), fred::error::Error> {
        let mut tasks = self.tasks.lock().await;
        if tasks.is_some() {
            return Ok(());
        }
        let mut messages = self.subscriber.message_rx();
        self.subscriber.init().await?;
        // Taken after the first connection, which also counts as a "reconnect".
        let mut reconnects = self.subscriber.reconnect_rx();
        if let Some(channel) = channel {
            self.subscriber.subscribe(channel).await?;
        }
        let reader = {
            let waiters = waiters.clone();
            tokio::spawn(async move {
                loop {
                    match messages.recv().await {
                        Ok(message) => waiters.wake(&message),
                        // Too slow to keep up: some messages are gone, so everyone retries now.
                        Err(RecvError::Lagged(_)) => waiters.wake_all(),
                        Err(RecvError::Closed) => break,
                    }
                }
            })
        };
        let reconnected = tokio::spawn(async move {
            // After a reconnect, messages may have been missed while the link was down.
            while reconnects.recv().await.is_ok() {
                waiters.wake_all();
            }
        });
        *tasks = Some(vec![
            reader,
            reconnected,
            self.subscriber.manage_subscriptions(),
        ]);
        Ok(())
    }

    /// Stops reading and closes the subscriber connection (on shutdown).
    pub(crate) async fn close(&self) {
        if let Some(tasks) = self.tasks.lock().await.take() {
            for task in tasks {
                task.abort();
            }
            let _ = self.subscriber.quit().await;
        }
    }
}

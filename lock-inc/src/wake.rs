//! Push-based wake-ups: with `wake_on_release`, the release script announces each release on
//! `lock-released:<lock key>`, and waiters subscribe through one shared subscriber connection
//! (fred's `SubscriberClient`, which resubscribes after a reconnect). A waiter retries on a
//! message, when the holder's ttl runs out, or after its retry delay, whichever comes first.

use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::{ClientLike, EventInterface, KeysInterface, PubsubInterface};
use lock_core::raw::redis::{gone_in, release_channel};
use lock_core::raw::wake::WakeRegistry;
use tokio::task::JoinHandle;

/// The waiters and the subscriber connection of one backend.
pub(crate) struct Wakeups {
    waiters: WakeRegistry,
    subscriber: SubscriberClient,
    /// The message reader and the subscription manager, started by the first waiter.
    tasks: tokio::sync::Mutex<Option<Vec<JoinHandle<()>>>>,
}

impl Wakeups {
    pub(crate) fn new(subscriber: SubscriberClient) -> Self {
        Self {
            waiters: WakeRegistry::default(),
            subscriber,
            tasks: tokio::sync::Mutex::new(None),
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
        let (subscriber, name) = (self.subscriber.clone(), channel.clone());
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
        if let Some(tasks) = self.tasks.lock().await.take() {
            for task in tasks {
                task.abort();
            }
            let _ = self.subscriber.quit().await;
        }
    }

    async fn subscribe(&self, channel: &str) {
        if let Err(error) = self.connect().await {
            tracing::debug!(%error, "cannot connect for wake-ups; falling back to the retry delay");
            return;
        }
        if let Err(error) = self.subscriber.subscribe(channel).await {
            tracing::debug!(%error, "cannot subscribe for wake-ups; falling back to the retry delay");
        }
    }

    /// Connects the subscriber and starts its reader, once.
    async fn connect(&self) -> Result<(), fred::error::Error> {
        let mut tasks = self.tasks.lock().await;
        if tasks.is_some() {
            return Ok(());
        }
        let mut messages = self.subscriber.message_rx();
        self.subscriber.init().await?;
        // Taken after the first connection, which also counts as a "reconnect".
        let mut reconnects = self.subscriber.reconnect_rx();
        let waiters = self.waiters.clone();
        let reader = tokio::spawn(async move {
            loop {
                match messages.recv().await {
                    Ok(message) => waiters.wake(&message.channel),
                    // Too slow to keep up: some messages are gone, so everyone retries now.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => waiters.wake_all(),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        let waiters = self.waiters.clone();
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
}

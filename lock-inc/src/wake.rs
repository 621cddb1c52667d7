//! Push-based wake-ups: with `wake_on_release`, the release script announces each release on
//! `lock-released:<lock key>`, and waiters subscribe through the client's one subscriber
//! connection (fred's `SubscriberClient`; its channels are subscribed again, one by one, after
//! a reconnect), which also carries a fair client's turn channel (see `fair.rs`). A waiter
//! retries on a message, when the holder's ttl runs out, or after its retry delay, whichever
//! comes first.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::{ClientLike, EventInterface, KeysInterface, PubsubInterface};
use fred::types::{ConnectHandle, Message};
use lock_core::raw::redis::{TURN_CHANNEL, gone_in, release_channel};
use lock_core::raw::wake::{TurnRegistry, WakeRegistry};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;

/// The waiters for releases of one backend.
pub(crate) struct Wakeups {
    waiters: WakeRegistry,
    listener: Arc<Listener>,
}

impl Wakeups {
    /// The waiters for releases whose channels `listener` carries.
    pub(crate) fn new(listener: Arc<Listener>) -> Self {
        Self {
            waiters: listener.waiters.releases.clone(),
            listener,
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

    /// Subscribes `channel`; whether it is (the next waiter tries again when not).
    async fn subscribe(&self, channel: &str) -> bool {
        if let Err(error) = self.listener.start().await {
            tracing::debug!(error = %lock_core::raw::redis::shown_error(&error), "cannot connect for wake-ups; falling back to the retry delay");
            return false;
        }
        if let Err(error) = self.listener.subscriber.subscribe(channel).await {
            tracing::debug!(error = %lock_core::raw::redis::shown_error(&error), "cannot subscribe for wake-ups; falling back to the retry delay");
            return false;
        }
        true
    }
}

/// Who is woken by what the subscriber connection hears: the waiters for releases, and a fair
/// client's waiters for their turn.
#[derive(Clone)]
pub(crate) struct Waiters {
    releases: WakeRegistry,
    /// The fair waiters and this client's turn channel.
    turns: Option<(TurnRegistry, Arc<str>)>,
}

impl Waiters {
    /// The waiters of a client; `instance` names a fair client's turn channel.
    pub(crate) fn new(instance: Option<&str>) -> Self {
        Self {
            releases: WakeRegistry::default(),
            turns: instance.map(|instance| {
                (
                    TurnRegistry::default(),
                    Arc::from(format!("{TURN_CHANNEL}{instance}")),
                )
            }),
        }
    }

    /// The fair waiters (a fair client's).
    pub(crate) fn turns(&self) -> Option<&TurnRegistry> {
        self.turns.as_ref().map(|(turns, _)| turns)
    }

    /// A turn message names the waiter whose turn it is, and what came with the turn (see
    /// [`TurnRegistry::wake_message`]); a release message wakes the waiters of its channel.
    fn wake(&self, message: &Message) {
        match &self.turns {
            Some((turns, channel)) if *message.channel == **channel => {
                if let Some(text) = message.value.as_str() {
                    turns.wake_message(&text);
                }
            }
            _ => self.releases.wake(&message.channel),
        }
    }

    /// Wakes every waiter: messages may have been missed.
    fn wake_all(&self) {
        self.releases.wake_all();
        if let Some((turns, _)) = &self.turns {
            turns.wake_all();
        }
    }
}

/// The client's one subscriber connection (fred's `SubscriberClient`, its channels subscribed
/// again one by one after a reconnect) and the tasks that read it, started by the first waiter
/// (of a release or of a turn).
pub(crate) struct Listener {
    pub(crate) subscriber: SubscriberClient,
    /// Who the messages wake.
    pub(crate) waiters: Waiters,
    state: tokio::sync::Mutex<ListenerState>,
    /// The runtime the client was made on, which drives fred's connection task: a listener
    /// dropped off it (on another thread, or inside a short-lived runtime) closes its
    /// connection there.
    runtime: Option<tokio::runtime::Handle>,
    /// Whether the reader runs: set once `start` installed it, cleared by `close` (read without
    /// the state's lock, which every subscription of a release takes for a moment too).
    running: AtomicBool,
}

#[derive(Default)]
struct ListenerState {
    /// fred's connection task, from the first waiter's attempt to connect until `close`: made
    /// once (a second `connect` would replace fred's router and leave the first connection to
    /// itself), and awaited again by the next waiter when the first one gave up waiting.
    connection: Option<ConnectHandle>,
    /// The message reader, the reconnect watcher and the subscription manager.
    tasks: Option<Vec<JoinHandle<()>>>,
    /// Set by `close`: an attempt still under way connects nowhere after it.
    closed: bool,
}

impl ListenerState {
    /// Stops the tasks; the connection task, if one was started, for the caller to end.
    fn take(&mut self) -> Option<ConnectHandle> {
        for task in self.tasks.take().into_iter().flatten() {
            task.abort();
        }
        self.connection.take()
    }
}

/// How long a closing listener waits for its `QUIT` to be written before it ends the
/// connection task anyway (a server that does not answer must not hold a `stop`).
const QUIT_WITHIN: Duration = Duration::from_millis(500);

/// Sends `QUIT` on `client` (bounded by [`QUIT_WITHIN`]), then ends its connection task, which
/// would otherwise go on connecting (or stay connected) for good.
pub(crate) async fn quit(client: impl ClientLike, connection: Option<ConnectHandle>) {
    let _ = tokio::time::timeout(QUIT_WITHIN, client.quit()).await;
    if let Some(connection) = connection {
        connection.abort();
    }
}

/// Dropped without `close` (a client dropped without `shutdown`), the subscriber connection
/// closes too: its tasks, and fred's own connection task, would otherwise keep it (and its
/// subscriptions) for good; so does one still being made for a waiter that gave up.
impl Drop for Listener {
    fn drop(&mut self) {
        let Some(connection) = self.state.get_mut().take() else {
            return;
        };
        match &self.runtime {
            Some(runtime) => {
                runtime.spawn(quit(self.subscriber.clone(), Some(connection)));
            }
            None => connection.abort(),
        }
    }
}

impl Listener {
    /// Whether the reader runs (it was started, and `close` not called).
    pub(crate) fn started(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    pub(crate) fn new(subscriber: SubscriberClient, waiters: Waiters) -> Self {
        Self {
            subscriber,
            waiters,
            state: tokio::sync::Mutex::default(),
            runtime: tokio::runtime::Handle::try_current().ok(),
            running: AtomicBool::new(false),
        }
    }

    /// Connects the subscriber and starts the reader that hands each message to the waiters it
    /// is for (and wakes them all when messages may have been lost: the reader fell behind, or
    /// the connection was made again), once.
    pub(crate) async fn start(&self) -> Result<(), fred::error::Error> {
        let mut state = self.state.lock().await;
        if state.closed {
            return Err(fred::error::Error::new(
                fred::error::ErrorKind::Canceled,
                "the client was stopped",
            ));
        }
        if state.tasks.is_some() {
            return Ok(());
        }
        let mut messages = self.subscriber.message_rx();
        // Connected once: a waiter that gave up waiting (its timeout, or cancelled) leaves the
        // connection task to the next one, which waits for the same connection.
        if state
            .connection
            .as_ref()
            .is_none_or(tokio::task::JoinHandle::is_finished)
        {
            state.connection = Some(self.subscriber.connect());
        }
        self.subscriber.wait_for_connect().await?;
        // Taken after the first connection, which also counts as a "reconnect".
        let mut reconnects = self.subscriber.reconnect_rx();
        let waiters = self.waiters.clone();
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
        state.tasks = Some(vec![reader, reconnected, self.resubscriber()]);
        self.running.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// The task that subscribes again, after each reconnect, the channels fred tracks (those
    /// subscribed and not unsubscribed since), one `SUBSCRIBE` each.
    ///
    /// Not fred's `manage_subscriptions`, which sends them all in one `SUBSCRIBE`: a server
    /// refuses such a command as a whole when it refuses one of its channels (an ACL user
    /// allowed the release channels of some keys only), and the turn channel, or any other
    /// channel, would not be heard again after the reconnect.
    fn resubscriber(&self) -> JoinHandle<()> {
        let subscriber = self.subscriber.clone();
        let mut reconnects = self.subscriber.reconnect_rx();
        tokio::spawn(async move {
            loop {
                match reconnects.recv().await {
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => break,
                }
                // All at once (fred pipelines them): one round trip, so that the turn channel
                // (last in order) is not heard only after every release channel, and a channel
                // unsubscribed meanwhile is taken back into fred's set for one round trip at
                // most.
                let channels = subscriber.tracked_channels();
                let again = channels.iter().map(|channel| {
                    let subscriber = subscriber.clone();
                    let channel = channel.to_string();
                    async move { subscriber.subscribe(channel).await }
                });
                for answer in futures::future::join_all(again).await {
                    if let Err(error) = answer {
                        tracing::debug!(error = %lock_core::raw::redis::shown_error(&error), "cannot subscribe again after a reconnect");
                    }
                }
            }
        })
    }

    /// Stops reading and closes the subscriber connection (on shutdown), also one still
    /// being made.
    ///
    /// For good: an attempt still under way (a fair waiter whose answer comes back after the
    /// shutdown, on a client stopped through another `Locker`) connects nowhere after it.
    pub(crate) async fn close(&self) {
        let connection = {
            let mut state = self.state.lock().await;
            state.closed = true;
            self.running.store(false, Ordering::SeqCst);
            state.take()
        };
        if let Some(connection) = connection {
            quit(self.subscriber.clone(), Some(connection)).await;
        }
    }
}

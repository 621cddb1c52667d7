//! The waiters of push-based wake-ups, for backends that announce releases (Redis pub/sub, …)
//! and implement [`Lock::wait_for_release`](crate::Lock::wait_for_release) on top.
//!
//! Waiters register per channel; the backend's message reader wakes the channel's waiters, or
//! every waiter when its connection drops (messages may have been missed). A channel's first
//! waiter subscribes; when its last waiter leaves, the subscription lingers a little
//! ([`LINGER`]) so that a waiter coming back soon — the usual case under contention — finds it
//! in place instead of paying a `SUBSCRIBE` and an `UNSUBSCRIBE` per wait.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

/// How long a subscription outlives its last waiter.
pub const LINGER: Duration = Duration::from_secs(2);

/// Waiters grouped by channel; cheap to clone (shared).
#[derive(Clone, Debug, Default)]
pub struct WakeRegistry(Arc<Mutex<HashMap<String, Channel>>>);

#[derive(Debug, Default)]
struct Channel {
    notify: Arc<Notify>,
    waiters: usize,
    /// Whether a waiter has subscribed (or is subscribing) to the channel.
    subscribed: bool,
    /// Bumped by every registration, so that a lingering unsubscribe can tell whether someone
    /// came back meanwhile.
    generation: u64,
}

/// One waiter's registration.
#[derive(Debug)]
struct Registration {
    /// Notified when a release on the channel is announced.
    notify: Arc<Notify>,
    /// True when the channel has no subscription yet: this waiter should subscribe.
    subscribe: bool,
}

impl WakeRegistry {
    /// Registers a waiter on `channel`.
    fn register(&self, channel: &str) -> Registration {
        let mut channels = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = channels.entry(channel.to_owned()).or_default();
        let subscribe = !entry.subscribed;
        entry.subscribed = true;
        entry.waiters += 1;
        entry.generation += 1;
        Registration {
            notify: Arc::clone(&entry.notify),
            subscribe,
        }
    }

    /// Waits on `channel` for an announced release, the holder's expiry, or `max_wait`,
    /// whichever comes first, then ends the registration.
    ///
    /// `remaining_ttl` asks the store how long the holder has left (expiry is not announced);
    /// `subscribe` runs when the channel has no subscription yet; both run while the wait has
    /// already begun, so neither delays a wake-up. `unsubscribe` runs when the channel's
    /// subscription is retired: [`LINGER`] after its last waiter left, unless another came.
    pub async fn wait<P, S, U, UF>(
        &self,
        channel: &str,
        max_wait: Duration,
        remaining_ttl: P,
        subscribe: S,
        unsubscribe: U,
    ) where
        P: Future<Output = Option<Duration>>,
        S: Future<Output = ()>,
        U: FnOnce() -> UF + Send + 'static,
        UF: Future<Output = ()> + Send,
    {
        let registration = self.register(channel);
        {
            let notified = registration.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let deadline = tokio::time::Instant::now() + max_wait;
            let sleep = tokio::time::sleep_until(deadline);
            tokio::pin!(sleep);
            tokio::pin!(remaining_ttl);
            tokio::pin!(subscribe);
            let (mut probed, mut subscribed) = (false, !registration.subscribe);
            loop {
                tokio::select! {
                    () = &mut notified => break,
                    () = &mut sleep => break,
                    ttl = &mut remaining_ttl, if !probed => {
                        probed = true;
                        if let Some(ttl) = ttl {
                            let expiry = tokio::time::Instant::now() + ttl;
                            if expiry < deadline {
                                sleep.as_mut().reset(expiry);
                            }
                        }
                    }
                    () = &mut subscribe, if !subscribed => subscribed = true,
                }
            }
        }
        self.unregister(channel, registration, unsubscribe);
    }

    /// Ends a registration. When it was the channel's last waiter, `unsubscribe` runs after
    /// [`LINGER`] unless a waiter registered meanwhile (needs a tokio runtime).
    fn unregister<F, Fut>(&self, channel: &str, registration: Registration, unsubscribe: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        drop(registration);
        let generation = {
            let mut channels = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(entry) = channels.get_mut(channel) else {
                return;
            };
            entry.waiters = entry.waiters.saturating_sub(1);
            if entry.waiters > 0 {
                return;
            }
            entry.generation
        };
        let (registry, channel) = (self.clone(), channel.to_owned());
        tokio::spawn(async move {
            tokio::time::sleep(LINGER).await;
            if registry.retire(&channel, generation) {
                unsubscribe().await;
                registry.after_unsubscribe(&channel);
            }
        });
    }

    /// Forgets `channel` if nobody registered since `generation`; true when forgotten.
    fn retire(&self, channel: &str, generation: u64) -> bool {
        let mut channels = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let idle = channels
            .get(channel)
            .is_some_and(|entry| entry.waiters == 0 && entry.generation == generation);
        if idle {
            channels.remove(channel);
        }
        idle
    }

    /// A waiter that registered while the channel was being unsubscribed may have subscribed
    /// before the unsubscription landed: have the next waiter subscribe again, and wake the
    /// current ones so that they do.
    fn after_unsubscribe(&self, channel: &str) {
        let notify = {
            let mut channels = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(entry) = channels.get_mut(channel) else {
                return;
            };
            entry.subscribed = false;
            Arc::clone(&entry.notify)
        };
        notify.notify_waiters();
    }

    /// Wakes the waiters of `channel`.
    pub fn wake(&self, channel: &str) {
        let notify = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(channel)
            .map(|entry| Arc::clone(&entry.notify));
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
    }

    /// Wakes every waiter and forgets every subscription (after a lost connection: messages
    /// may have been missed, and the next waiters must subscribe again).
    pub fn wake_all(&self) {
        let all: Vec<Arc<Notify>> = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .map(|(_, entry)| entry.notify)
            .collect();
        for notify in all {
            notify.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_first_waiter_subscribes_and_the_subscription_lingers() {
        let registry = WakeRegistry::default();
        let unsubscribed = Arc::new(AtomicUsize::new(0));
        let counter = |unsubscribed: &Arc<AtomicUsize>| {
            let unsubscribed = Arc::clone(unsubscribed);
            move || async move {
                unsubscribed.fetch_add(1, Ordering::SeqCst);
            }
        };
        let a = registry.register("k");
        let b = registry.register("k");
        assert!(a.subscribe && !b.subscribe);
        let waiting = Arc::clone(&b.notify);
        let woken = tokio::spawn(async move { waiting.notified().await });
        tokio::task::yield_now().await;
        registry.wake("k");
        woken.await.expect("woken");

        registry.unregister("k", a, counter(&unsubscribed));
        registry.unregister("k", b, counter(&unsubscribed));
        // A waiter back within the linger keeps the subscription.
        tokio::time::sleep(LINGER / 2).await;
        let c = registry.register("k");
        assert!(!c.subscribe, "the subscription is still in place");
        tokio::time::sleep(LINGER * 2).await;
        assert_eq!(unsubscribed.load(Ordering::SeqCst), 0);
        registry.unregister("k", c, counter(&unsubscribed));
        tokio::time::sleep(LINGER * 2).await;
        assert_eq!(unsubscribed.load(Ordering::SeqCst), 1);
        assert!(registry.register("k").subscribe, "the channel starts over");

        registry.wake_all();
        assert!(
            registry.register("k").subscribe,
            "a lost connection forgets subscriptions"
        );
    }
}

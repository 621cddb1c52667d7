//! The waiters of push-based wake-ups, for backends that announce releases (Redis pub/sub, …)
//! and implement [`Lock::wait_for_release`](crate::Lock::wait_for_release) on top.
//!
//! Waiters register per channel; the backend's message reader wakes the channel's waiters, or
//! every waiter when its connection drops (messages may have been missed). The first waiter of
//! a channel subscribes, the last one unsubscribes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

/// Waiters grouped by channel; cheap to clone (shared).
#[derive(Clone, Debug, Default)]
pub struct WakeRegistry(Arc<Mutex<HashMap<String, Arc<Notify>>>>);

/// One waiter's registration, from [`WakeRegistry::register`].
#[derive(Debug)]
pub struct Registration {
    /// Notified when a release on the channel is announced.
    pub notify: Arc<Notify>,
    /// True for the channel's first waiter, who should subscribe.
    pub first: bool,
}

impl WakeRegistry {
    /// Registers a waiter on `channel`.
    pub fn register(&self, channel: &str) -> Registration {
        let mut waiters = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let notify = Arc::clone(waiters.entry(channel.to_owned()).or_default());
        // The map holds one reference, this waiter the other.
        let first = Arc::strong_count(&notify) == 2;
        Registration { notify, first }
    }

    /// Ends a registration; true when it was the channel's last waiter (unsubscribe then).
    pub fn unregister(&self, channel: &str, registration: Registration) -> bool {
        let mut waiters = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let last = Arc::strong_count(&registration.notify) == 2;
        if last {
            waiters.remove(channel);
        }
        last
    }

    /// Wakes the waiters of `channel`.
    pub fn wake(&self, channel: &str) {
        let notify = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(channel)
            .cloned();
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
    }

    /// Wakes every waiter (after a lost connection: messages may have been missed).
    pub fn wake_all(&self) {
        let all: Vec<Arc<Notify>> = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for notify in all {
            notify.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn first_and_last_waiters_are_told_and_wakes_reach_the_channel() {
        let registry = WakeRegistry::default();
        let a = registry.register("k");
        let b = registry.register("k");
        let other = registry.register("other");
        assert!(a.first && !b.first && other.first);
        let waiting = Arc::clone(&b.notify);
        let woken = tokio::spawn(async move { waiting.notified().await });
        tokio::task::yield_now().await;
        registry.wake("k");
        tokio::time::timeout(Duration::from_secs(1), woken)
            .await
            .expect("woken")
            .expect("task");
        assert!(!registry.unregister("k", a));
        assert!(registry.unregister("k", b));
        assert!(registry.register("k").first, "the channel starts over");
        assert!(registry.unregister("other", other));
    }
}

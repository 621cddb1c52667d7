//! An in-process queue in front of a distributed backend: tasks of one process that want the
//! same key line up here first (first come, first served), and only the head of the line talks
//! to the store. Mutual exclusion still comes from the store; the queue only stops a releasing
//! task from barging back in ahead of its neighbours, and saves the store their retries.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::OwnedMutexGuard;

use crate::key::Key;

type Slot = Arc<tokio::sync::Mutex<()>>;

/// One FIFO mutex per key that is held or waited for in this process.
#[derive(Default)]
pub(crate) struct LocalQueue {
    slots: Mutex<HashMap<Key, Slot>>,
}

/// A place at the head of the line for one key; leaving frees the place for the next task.
pub(crate) struct Ticket {
    queue: Arc<LocalQueue>,
    key: Key,
    guard: Option<OwnedMutexGuard<()>>,
}

impl LocalQueue {
    fn slot(&self, key: &Key) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(slots.entry(key.clone()).or_default())
    }

    /// Waits for the head of the line of every key, in key order (so that tasks taking several
    /// keys cannot deadlock each other).
    pub(crate) async fn enter(self: &Arc<Self>, keys: &[Key]) -> Vec<Ticket> {
        let mut ordered: Vec<&Key> = keys.iter().collect();
        ordered.sort();
        ordered.dedup();
        let mut tickets = Vec::with_capacity(ordered.len());
        for key in ordered {
            let guard = self.slot(key).lock_owned().await;
            tickets.push(self.ticket(key, guard));
        }
        tickets
    }

    fn ticket(self: &Arc<Self>, key: &Key, guard: OwnedMutexGuard<()>) -> Ticket {
        Ticket {
            queue: Arc::clone(self),
            key: key.clone(),
            guard: Some(guard),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut slots = self
            .queue
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Nobody else holds or waits for the key: forget it, so the map does not grow.
        if slots
            .get(&self.key)
            .is_some_and(|slot| Arc::strong_count(slot) == 1)
        {
            slots.remove(&self.key);
        }
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket").field("key", &self.key).finish()
    }
}

impl fmt::Debug for LocalQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("LocalQueue")
            .field("keys", &slots.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn tickets_are_exclusive_and_leave_nothing_behind() {
        let queue = Arc::new(LocalQueue::default());
        let keys = [Key::new("a").unwrap(), Key::new("b").unwrap()];
        let held = queue.enter(&keys).await;
        let blocked = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            queue.enter(&keys[..1]),
        )
        .await;
        assert!(
            blocked.is_err(),
            "a second task entered while the first held the key"
        );
        drop(held);
        let again = queue.enter(&keys).await;
        drop(again);
        assert_eq!(queue.len(), 0);
    }
}

//! An in-process queue in front of a distributed backend: tasks of one process that want the
//! same key line up here first (first come, first served), and only the head of the line talks
//! to the store. Mutual exclusion still comes from the store; the queue only stops a releasing
//! task from barging back in ahead of its neighbours, and saves the store their retries.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use tokio::sync::{Notify, OwnedMutexGuard, watch};
use tokio::time::Instant;

use crate::key::Key;
use crate::lease::Live;

/// One FIFO line per key that is held or waited for in this process.
#[derive(Default)]
pub(crate) struct LocalQueue {
    slots: Mutex<HashMap<Key, Arc<Slot>, foldhash::fast::RandomState>>,
}

/// The line for one key.
#[derive(Default)]
struct Slot {
    /// Held by the task at the head of the line; tokio's mutex serves waiters in order.
    head: Arc<tokio::sync::Mutex<()>>,
    /// Once the head holds the lock: until when it may keep its place. The waiters (not the
    /// holder, which costs nothing this way when nobody waits) give the place up for it.
    lapse: Mutex<Option<Lapse>>,
    /// Wakes waiters when a head records its lapse.
    lapse_recorded: Notify,
}

/// A holder's claim on its places, which waiters end once its lease has lapsed.
struct Lapse {
    /// The holder's lease, as the core shares it: moved by every extend and downgrade (by
    /// hand or by the watchdog), marked on loss.
    until: watch::Sender<Live>,
    places: Weak<Places>,
}

/// The places one lock holds in the lines of its keys; emptied to give them up.
pub(crate) type Places = Mutex<Vec<Ticket>>;

/// Leaves every place in `places`. The tickets are dropped outside its lock (and outside any
/// slot's): leaving takes the queue's lock.
pub(crate) fn give_up(places: &Places) {
    let left = std::mem::take(&mut *places.lock().unwrap_or_else(PoisonError::into_inner));
    drop(left);
}

/// A place at the head of the line for one key; leaving frees the place for the next task.
pub(crate) struct Ticket {
    queue: Arc<LocalQueue>,
    key: Key,
    slot: Option<Arc<Slot>>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl LocalQueue {
    fn slot(&self, key: &Key) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(slots.entry(key.clone()).or_default())
    }

    /// Waits for the head of the line of every key, in key order (so that tasks taking several
    /// keys cannot deadlock each other).
    pub(crate) async fn enter(self: &Arc<Self>, keys: &[Key]) -> Vec<Ticket> {
        if let [key] = keys {
            return vec![self.enter_one(key).await];
        }
        let mut ordered: Vec<&Key> = keys.iter().collect();
        ordered.sort();
        ordered.dedup();
        let mut tickets = Vec::with_capacity(ordered.len());
        for key in ordered {
            tickets.push(self.enter_one(key).await);
        }
        tickets
    }

    /// Waits for the head of the line of `key`.
    async fn enter_one(self: &Arc<Self>, key: &Key) -> Ticket {
        // The slot is held by the ticket while it waits, so that a wait cancelled (even right
        // after the head was handed to it) still forgets a slot that nobody else uses.
        let mut ticket = Ticket {
            queue: Arc::clone(self),
            key: key.clone(),
            slot: Some(self.slot(key)),
            guard: None,
        };
        if let Some(slot) = &ticket.slot {
            ticket.guard = Some(slot.wait_for_head().await);
        }
        ticket
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Slot {
    /// Waits in line; meanwhile, gives up the place of a head whose lease lapsed (or was
    /// found lost), following its validity as it moves.
    async fn wait_for_head(&self) -> OwnedMutexGuard<()> {
        // A free head is taken at once. tokio's mutex hands a released head to the task that
        // waited longest, so this never overtakes a waiting task.
        if let Ok(guard) = Arc::clone(&self.head).try_lock_owned() {
            return guard;
        }
        let head = Arc::clone(&self.head).lock_owned();
        tokio::pin!(head);
        loop {
            let recorded = self.lapse_recorded.notified();
            tokio::pin!(recorded);
            recorded.as_mut().enable();
            let mut lease = self
                .lapse
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .map(|lapse| lapse.until.subscribe());
            let lapse_at = lease
                .as_mut()
                .map(|lease| lease.borrow_and_update().lapses_at());
            let moved = async {
                match lease.as_mut() {
                    Some(lease) => lease.changed().await.is_ok(),
                    None => false,
                }
            };
            tokio::select! {
                biased;
                guard = &mut head => return guard,
                () = &mut recorded, if lapse_at.is_none() => {}
                // An extend, a downgrade or a loss: plan from the lease as it is now.
                true = moved, if lapse_at.is_some() => {}
                () = tokio::time::sleep_until(lapse_at.unwrap_or_else(Instant::now)), if lapse_at.is_some() => {
                    self.end_lapsed();
                }
            }
        }
    }

    /// Gives up the places of the head if its validity has lapsed.
    fn end_lapsed(&self) {
        let places = {
            let mut lapse = self.lapse.lock().unwrap_or_else(PoisonError::into_inner);
            match lapse.as_ref() {
                Some(recorded) if recorded.until.borrow().lapses_at() <= Instant::now() => {
                    lapse.take().and_then(|lapse| lapse.places.upgrade())
                }
                _ => None,
            }
        };
        if let Some(places) = places {
            give_up(&places);
        }
    }
}

impl Ticket {
    /// Records that the holder of this place keeps it while its lease, `until`, has not
    /// lapsed.
    pub(crate) fn keep_until(&self, until: &watch::Sender<Live>, places: Weak<Places>) {
        if let Some(slot) = &self.slot {
            *slot.lapse.lock().unwrap_or_else(PoisonError::into_inner) = Some(Lapse {
                until: until.clone(),
                places,
            });
            slot.lapse_recorded.notify_waiters();
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let slot = self.slot.take();
        // Only the head's ticket ends the lapse it recorded (a waiter's leaves the holder's).
        if let Some(guard) = self.guard.take() {
            if let Some(slot) = &slot {
                *slot.lapse.lock().unwrap_or_else(PoisonError::into_inner) = None;
            }
            drop(guard);
        }
        drop(slot);
        let mut slots = self
            .queue
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Nobody else holds or waits for the key: forget it, so the map does not grow.
        if let Entry::Occupied(slot) = slots.entry(self.key.clone())
            && Arc::strong_count(slot.get()) == 1
        {
            slot.remove();
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

    /// A task holding the head of key `a`'s line and another waiting behind it.
    async fn holder_and_waiter(
        queue: &Arc<LocalQueue>,
    ) -> (Vec<Ticket>, tokio::task::JoinHandle<Vec<Ticket>>) {
        let key = Key::new("a").unwrap();
        let held = queue.enter(std::slice::from_ref(&key)).await;
        let waiter = tokio::spawn({
            let queue = Arc::clone(queue);
            async move { queue.enter(&[key]).await }
        });
        // The waiter lines up (one thread: it runs only while this task yields).
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished(), "the waiter entered past the holder");
        (held, waiter)
    }

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

    /// Promise (the `Ticket` drop: "Nobody else holds or waits for the key: forget it, so the
    /// map does not grow"): once every task that held or waited for a key has left, the key
    /// has no slot in the map.
    ///
    /// Broken on main: a waiter to which the head was just handed (the holder's ticket
    /// dropped, the waiter's permit assigned, the waiter not yet polled) and which is then
    /// cancelled (its deadline's timeout firing at that instant, an `abort`, a `select!` that
    /// took another branch) leaves without a ticket: the holder's drop saw the waiter's `Arc`
    /// and kept the slot, and the waiter's drop never looks at the map. The slot stays for good
    /// (one per such key: with keys that are not used again, the map grows without bound).
    #[tokio::test]
    async fn a_waiter_cancelled_right_after_the_hand_over_leaves_no_slot() {
        let queue = Arc::new(LocalQueue::default());
        let (held, waiter) = holder_and_waiter(&queue).await;
        drop(held);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(
            queue.len(),
            0,
            "a slot stayed in the map after every task left the key"
        );
    }

    /// The holder's lapse recorded after a task already waits in line: the waiter learns of it
    /// (it fails with the record's notification left out) and takes the head once the holder's
    /// validity has passed, the holder never leaving.
    #[tokio::test(start_paused = true)]
    async fn a_waiter_already_in_line_learns_of_a_lapse_recorded_after_it_came() {
        let queue = Arc::new(LocalQueue::default());
        let (held, waiter) = holder_and_waiter(&queue).await;
        let live = watch::Sender::new(Live {
            valid_until: Instant::now() + std::time::Duration::from_millis(50),
            kind: crate::LeaseKind::Exclusive,
            lost: false,
            ended: false,
        });
        let places: Arc<Places> = Arc::new(Mutex::new(held));
        for ticket in places.lock().unwrap().iter() {
            ticket.keep_until(&live, Arc::downgrade(&places));
        }
        let entered = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the waiter never took the head of a lapsed holder")
            .unwrap();
        assert!(
            places.lock().unwrap().is_empty(),
            "the lapsed holder kept its place"
        );
        drop(entered);
        drop(places);
        assert_eq!(queue.len(), 0);
    }

    /// As `a_waiter_already_in_line_learns_of_a_lapse_recorded_after_it_came`, for a waiter
    /// that comes after the record: it reads it and takes the head once it has lapsed.
    #[tokio::test(start_paused = true)]
    async fn a_waiter_coming_after_the_record_reads_it() {
        let queue = Arc::new(LocalQueue::default());
        let key = Key::new("a").unwrap();
        let places: Arc<Places> =
            Arc::new(Mutex::new(queue.enter(std::slice::from_ref(&key)).await));
        let live = watch::Sender::new(Live {
            valid_until: Instant::now() + std::time::Duration::from_millis(50),
            kind: crate::LeaseKind::Exclusive,
            lost: false,
            ended: false,
        });
        for ticket in places.lock().unwrap().iter() {
            ticket.keep_until(&live, Arc::downgrade(&places));
        }
        let entered = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            queue.enter(std::slice::from_ref(&key)),
        )
        .await
        .expect("the waiter never took the head of a lapsed holder");
        assert!(places.lock().unwrap().is_empty());
        drop(entered);
    }

    /// As `a_waiter_cancelled_right_after_the_hand_over_leaves_no_slot`, for a task taking
    /// two keys: it holds the first and is handed the second, then is cancelled. On main the
    /// second key's slot stays in the map (the first's goes with its ticket).
    #[tokio::test]
    async fn a_multi_key_waiter_cancelled_right_after_the_hand_over_leaves_no_slot() {
        let queue = Arc::new(LocalQueue::default());
        let keys = [Key::new("a").unwrap(), Key::new("b").unwrap()];
        let held = queue.enter(&keys[1..]).await;
        let waiter = tokio::spawn({
            let (queue, keys) = (Arc::clone(&queue), keys.clone());
            async move { queue.enter(&keys).await }
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished(), "the waiter entered past the holder");
        drop(held);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(
            queue.len(),
            0,
            "a slot stayed in the map after every task left the keys"
        );
    }
}

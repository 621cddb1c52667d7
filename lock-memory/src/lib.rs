#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use lock_core::{Capabilities, Handle, Key, Lock, LockError, LockRequest, Result, Token, async_trait};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The backend's name in messages and configuration.
pub const NAME: &str = "memory";

/// How many acquisitions pass between sweeps of expired, never-released entries.
const SWEEP_EVERY: u64 = 4096;

/// An in-process lock over a sharded map; clones share the same locks.
///
/// Every map access is synchronous: no shard guard is ever held across an `.await`.
#[derive(Clone, Default)]
pub struct MemoryLock {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The current holder of each locked key; removed on release, so the map returns to empty.
    held: DashMap<Key, Holder>,
    /// One notifier per key that has waiters; removed when the last waiter leaves.
    waiters: DashMap<Key, Arc<Notify>>,
    /// Fencing tokens come from one counter, so they increase per key without keeping any
    /// per-key state after release.
    fence: AtomicU64,
    acquisitions: AtomicU64,
}

struct Holder {
    token: Token,
    expires_at: Instant,
}

impl MemoryLock {
    /// A new, empty lock table.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many keys have an entry (held, or expired and not yet reclaimed).
    pub fn len(&self) -> usize {
        self.inner.held.len()
    }

    /// True when no key has an entry.
    pub fn is_empty(&self) -> bool {
        self.inner.held.is_empty()
    }

    /// How many keys currently have tasks waiting for them.
    pub fn waited_keys(&self) -> usize {
        self.inner.waiters.len()
    }

    /// The capacity of the lock table: it tracks the most keys held at once, not every key
    /// ever locked.
    pub fn capacity(&self) -> usize {
        self.inner.held.capacity()
    }
}

impl Inner {
    /// Takes `key` for `token` if it is free or its holder expired.
    fn take(&self, key: &Key, token: &Token, expires_at: Instant, now: Instant) -> bool {
        let holder = Holder {
            token: token.clone(),
            expires_at,
        };
        match self.held.entry(key.clone()) {
            Entry::Occupied(mut held) if held.get().expires_at <= now => {
                held.insert(holder);
                true
            }
            Entry::Occupied(_) => false,
            Entry::Vacant(free) => {
                free.insert(holder);
                true
            }
        }
    }

    /// Removes `key` if `token` holds it; returns whether it was still valid at `now`.
    fn remove_if_ours(&self, key: &Key, token: &Token, now: Instant) -> Option<bool> {
        let removed = self.held.remove_if(key, |_, holder| holder.token == *token);
        removed.map(|(key, holder)| {
            self.notify(&key);
            holder.expires_at > now
        })
    }

    fn notify(&self, key: &Key) {
        let notify = self.waiters.get(key).map(|entry| Arc::clone(entry.value()));
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
    }

    fn sweep_now_and_then(&self, now: Instant) {
        if self.acquisitions.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.held.retain(|_, holder| holder.expires_at > now);
        }
    }
}

#[async_trait]
impl Lock for MemoryLock {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE
            .with_extend()
            .with_multi_key()
            .with_fencing()
            .with_wake_on_release()
            .with_purge()
    }

    async fn try_acquire(&self, request: &LockRequest) -> Result<Option<Box<dyn Handle>>> {
        let now = Instant::now();
        let expires_at = now + request.ttl();
        let token = request.token();
        for (taken, key) in request.keys().iter().enumerate() {
            if !self.inner.take(key, token, expires_at, now) {
                for key in &request.keys()[..taken] {
                    self.inner.remove_if_ours(key, token, now);
                }
                return Ok(None);
            }
        }
        self.inner.sweep_now_and_then(now);
        let fence = self.inner.fence.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(Some(Box::new(MemoryHandle {
            inner: Arc::clone(&self.inner),
            keys: request.keys().to_vec(),
            token: token.clone(),
            valid_until: expires_at,
            fence,
        })))
    }

    async fn abandon(&self, keys: &[Key], token: &Token) -> Result<bool> {
        let now = Instant::now();
        let mut removed = false;
        for key in keys {
            removed |= self.inner.remove_if_ours(key, token, now).is_some();
        }
        Ok(removed)
    }

    async fn wait_for_release(&self, keys: &[Key], max_wait: Duration) -> Result<()> {
        let now = Instant::now();
        let give_up_at = now + max_wait;
        // Wait on the first key still held; the others are re-checked by the next attempt.
        let Some((key, expires_at)) = keys.iter().find_map(|key| {
            let holder = self.inner.held.get(key)?;
            (holder.expires_at > now).then(|| (key, holder.expires_at))
        }) else {
            return Ok(());
        };
        let notify = Arc::clone(self.inner.waiters.entry(key.clone()).or_default().value());
        {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // The holder may have left between the look-up and the registration above.
            let still_held = self
                .inner
                .held
                .get(key)
                .is_some_and(|holder| holder.expires_at > Instant::now());
            if still_held {
                tokio::select! {
                    () = notified => {}
                    () = tokio::time::sleep_until(expires_at.min(give_up_at)) => {}
                }
            }
        }
        drop(notify);
        self.inner
            .waiters
            .remove_if(key, |_, notify| Arc::strong_count(notify) == 1);
        Ok(())
    }

    async fn purge(&self, prefix: &str) -> Result<u64> {
        let mut purged = Vec::new();
        self.inner.held.retain(|key, _| {
            let matches = key.as_str().starts_with(prefix);
            if matches {
                purged.push(key.clone());
            }
            !matches
        });
        for key in &purged {
            self.inner.notify(key);
        }
        Ok(purged.len() as u64)
    }
}

impl fmt::Debug for MemoryLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLock")
            .field("held", &self.inner.held.len())
            .field("waited_keys", &self.inner.waiters.len())
            .finish()
    }
}

/// A lock held in this process.
struct MemoryHandle {
    inner: Arc<Inner>,
    keys: Vec<Key>,
    token: Token,
    valid_until: Instant,
    fence: u64,
}

impl MemoryHandle {
    fn not_held(&self) -> LockError {
        LockError::NotHeld {
            key: self.keys[0].to_string(),
        }
    }
}

#[async_trait]
impl Handle for MemoryHandle {
    fn keys(&self) -> &[Key] {
        &self.keys
    }

    fn token(&self) -> &Token {
        &self.token
    }

    fn valid_until(&self) -> Instant {
        self.valid_until
    }

    fn fencing_token(&self) -> Option<u64> {
        Some(self.fence)
    }

    async fn extend(&mut self, ttl: Duration) -> Result<()> {
        let now = Instant::now();
        let expires_at = now + ttl;
        for key in &self.keys {
            let Some(mut holder) = self.inner.held.get_mut(key) else {
                return Err(self.not_held());
            };
            if holder.token != self.token || holder.expires_at <= now {
                return Err(self.not_held());
            }
            holder.expires_at = expires_at;
        }
        self.valid_until = expires_at;
        Ok(())
    }

    async fn release(&mut self) -> Result<()> {
        let now = Instant::now();
        let mut all_valid = true;
        for key in &self.keys {
            all_valid &= self.inner.remove_if_ours(key, &self.token, now) == Some(true);
        }
        if all_valid { Ok(()) } else { Err(self.not_held()) }
    }
}

impl fmt::Debug for MemoryHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryHandle")
            .field("keys", &self.keys)
            .field("fence", &self.fence)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use lock_core::{LockOptions, Locker};

    use super::*;

    lock_core::conformance_tests!(async { MemoryLock::new() });

    fn locker(lock: &MemoryLock, ttl: Duration) -> Locker {
        Locker::new(lock.clone())
            .with_options(LockOptions::default().with_ttl(ttl))
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entry_is_reclaimed_and_stale_guard_is_powerless() {
        let lock = MemoryLock::new();
        let locker = locker(&lock, Duration::from_secs(1));
        let mut stale = locker.acquire("k").await.unwrap();
        tokio::time::advance(Duration::from_millis(1_001)).await;
        let next = locker.try_acquire("k").await.unwrap().expect("expired entry reclaimed");
        assert!(matches!(stale.extend(Duration::from_secs(5)).await, Err(LockError::NotHeld { .. })));
        assert!(matches!(stale.release().await, Err(LockError::NotHeld { .. })));
        assert_eq!(lock.len(), 1, "the stale release removed the next holder");
        next.release().await.unwrap();
        assert!(lock.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn release_of_an_expired_but_untaken_lock_reports_not_held_and_cleans_up() {
        let lock = MemoryLock::new();
        let guard = locker(&lock, Duration::from_millis(100)).acquire("k").await.unwrap();
        tokio::time::advance(Duration::from_millis(150)).await;
        assert!(matches!(guard.release().await, Err(LockError::NotHeld { .. })));
        assert!(lock.is_empty());
    }

    #[tokio::test]
    async fn memory_returns_to_baseline_after_many_distinct_keys() {
        let lock = MemoryLock::new();
        let locker = locker(&lock, Duration::from_secs(10));
        for i in 0..100_000 {
            let guard = locker.acquire(&format!("key-{i}")).await.unwrap();
            guard.release().await.unwrap();
        }
        assert_eq!(lock.len(), 0);
        assert_eq!(lock.waited_keys(), 0);
        assert!(lock.capacity() < 1_000, "the table grew to {} slots", lock.capacity());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiters_leave_no_entries_behind() {
        let lock = MemoryLock::new();
        let locker = locker(&lock, Duration::from_secs(10));
        let holder = locker.acquire("k").await.unwrap();
        let mut waiters = Vec::new();
        for _ in 0..16 {
            let locker = locker.clone();
            waiters.push(tokio::spawn(async move {
                locker.acquire("k").await.unwrap().release().await.unwrap();
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(lock.waited_keys(), 1);
        holder.release().await.unwrap();
        for waiter in waiters {
            waiter.await.unwrap();
        }
        assert!(lock.is_empty());
        assert_eq!(lock.waited_keys(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn never_released_entries_are_swept() {
        let lock = MemoryLock::new();
        let locker = locker(&lock, Duration::from_millis(5));
        for i in 0..SWEEP_EVERY {
            std::mem::forget(locker.acquire(&format!("leaked-{i}")).await.unwrap());
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert!(lock.len() < 10, "{} expired entries were kept", lock.len());
    }

    #[tokio::test]
    async fn purge_removes_only_the_prefix() {
        let lock = MemoryLock::new();
        let locker = locker(&lock, Duration::from_secs(10));
        let a = locker.acquire("jobs:1").await.unwrap();
        let b = locker.acquire("jobs:2").await.unwrap();
        let other = locker.acquire("other").await.unwrap();
        assert_eq!(locker.purge("jobs:").await.unwrap(), 2);
        assert_eq!(lock.len(), 1);
        assert!(matches!(a.release().await, Err(LockError::NotHeld { .. })));
        drop(b);
        other.release().await.unwrap();
    }
}

//! The in-process queue in front of a distributed backend: first come, first served, and a
//! holder that neither releases nor extends gives its place up when its validity lapses.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use lock_core::{
    Capabilities, LockOptions, Locker, Result, RetryPolicy,
    raw::{Handle, Lock, LockRequest, async_trait},
};
use lock_memory::MemoryLock;
use tokio::time::Instant;

/// The in-memory lock dressed as a distributed one, so that the core puts its queue in front.
/// Counts the attempts that reach it.
#[derive(Debug, Default)]
struct Distributed(MemoryLock, std::sync::atomic::AtomicU64);

impl Distributed {
    fn attempts(&self) -> u64 {
        self.1.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[async_trait]
impl Lock for Distributed {
    fn name(&self) -> &'static str {
        "distributed-memory"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE.with_distributed().with_extend()
    }

    fn try_acquire<'a>(
        &'a self,
        request: &'a LockRequest,
    ) -> lock_core::raw::Answer<'a, Result<Option<Box<dyn Handle>>>> {
        lock_core::raw::Answer::later(async move {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.0.try_acquire(request).await
        })
    }

    fn abandon<'a>(&'a self, request: &'a LockRequest) -> lock_core::raw::Answer<'a, Result<bool>> {
        lock_core::raw::Answer::later(async move { self.0.abandon(request).await })
    }
}

fn locker(lock: &Arc<Distributed>, ttl: Duration) -> Locker {
    Locker::new(Arc::clone(lock))
        .with_options(
            LockOptions::default().with_ttl(ttl).with_retry(
                RetryPolicy::forever()
                    .with_retry_delay(Duration::from_millis(5))
                    .with_retry_jitter(Duration::ZERO)
                    .with_deadline(Duration::from_secs(10)),
            ),
        )
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_holder_that_never_releases_gives_its_place_up_when_its_validity_lapses() {
    let lock = Arc::new(Distributed::default());
    let locker = locker(&lock, Duration::from_millis(200));
    let started = Instant::now();
    std::mem::forget(locker.acquire("k").await.unwrap());
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let locker = locker.clone();
            tokio::spawn(async move {
                let guard = locker.acquire("k").await.unwrap();
                let waited = started.elapsed();
                guard.release().await.unwrap();
                waited
            })
        })
        .collect();
    for waiter in waiters {
        let waited = waiter.await.unwrap();
        assert!(
            waited >= Duration::from_millis(200),
            "a waiter got in after {waited:?}, before the holder's validity lapsed"
        );
        assert!(
            waited < Duration::from_millis(400),
            "a waiter still queued behind the lapsed holder after {waited:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn waiters_of_one_process_are_served_in_arrival_order() {
    let lock = Arc::new(Distributed::default());
    let locker = locker(&lock, Duration::from_secs(5));
    let holder = locker.acquire("k").await.unwrap();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for index in 0..4 {
        let (locker, order) = (locker.clone(), Arc::clone(&order));
        waiters.push(tokio::spawn(async move {
            let guard = locker.acquire("k").await.unwrap();
            order.lock().unwrap().push(index);
            tokio::time::sleep(Duration::from_millis(1)).await;
            guard.release().await.unwrap();
        }));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    holder.release().await.unwrap();
    for waiter in waiters {
        waiter.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
}

/// A holder that extends (by hand, or through its watchdog) keeps its place: the waiters of
/// this process stay in line and do not ask the store while it holds the lock.
#[tokio::test(start_paused = true)]
async fn an_extended_holder_keeps_its_place_in_line() {
    for watchdog in [false, true] {
        let lock = Arc::new(Distributed::default());
        let locker = locker(&lock, Duration::from_millis(200));
        let mut holder = locker.acquire("k").await.unwrap();
        if watchdog {
            holder.keep_alive().unwrap();
        }
        let waiter = {
            let locker = locker.clone();
            tokio::spawn(async move { locker.acquire("k").await.unwrap().release().await })
        };
        tokio::time::sleep(Duration::from_millis(150)).await;
        if !watchdog {
            holder.extend(Duration::from_millis(600)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(550)).await;
        assert!(holder.is_valid(), "the holder's lock lapsed");
        let asked = lock.attempts();
        assert_eq!(
            asked,
            1,
            "the waiter asked the store {} times while the holder held the lock (watchdog: {watchdog})",
            asked - 1
        );
        holder.release().await.unwrap();
        waiter.await.unwrap().unwrap();
        assert_eq!(lock.attempts(), 2);
    }
}

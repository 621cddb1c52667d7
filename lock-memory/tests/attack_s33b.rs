//! adv33a: a hostile user, scheduler and clock against the memory backend's fair line
//! (`Capabilities::fair`, 6971de7): waiters of other kinds on a lined key, wrappers that keep
//! the trait's default `wait_for_turn`, cancellation at every poll on a multi-thread runtime,
//! a head that stops waiting as its turn comes, a clock that jumps, and the table afterwards.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lock_core::raw::{Answer, Handle, Lock, LockRequest, async_trait};
use lock_core::{Capabilities, Key, LockOptions, Locker, Result, RetryPolicy};
use lock_memory::MemoryLock;
use tokio::time::Instant;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Retries forever every `delay`, no jitter.
fn every(delay: Duration) -> RetryPolicy {
    RetryPolicy::forever()
        .with_retry_delay(delay)
        .with_retry_jitter(Duration::ZERO)
        .with_max_delay(delay)
}

fn client(lock: impl Lock, ttl: Duration, retry: RetryPolicy) -> Locker {
    Locker::new(lock)
        .with_options(LockOptions::default().with_ttl(ttl).with_retry(retry))
        .unwrap()
}

/// Two mutex clients take `k` in turns (each hands it to the other, who already waits in
/// line), while a multi-key acquisition of `[k, j]` waits: the key is never free with an empty
/// line, and the line lets nobody but its first in. The multi-key waiter's delay (50 ms) is
/// longer than the holds (10 ms), the mutex clients' (200 ms) longer still: before the line, a
/// release woke the longest waiter, the multi-key one among them, which got in within a delay.
#[tokio::test(start_paused = true)]
async fn a_multi_key_waiter_is_not_starved_by_a_busy_mutex_line() {
    let lock = MemoryLock::new();
    let stop = Arc::new(AtomicBool::new(false));
    let mut loops = Vec::new();
    for _ in 0..2 {
        let (locker, stop) = (
            client(lock.clone(), ms(10_000), every(ms(200))),
            Arc::clone(&stop),
        );
        loops.push(tokio::spawn(async move {
            let mut rounds = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let guard = locker.acquire("k").await.unwrap();
                tokio::time::sleep(ms(10)).await;
                guard.release().await.unwrap();
                rounds += 1;
            }
            rounds
        }));
        tokio::time::sleep(ms(1)).await;
    }
    tokio::time::sleep(ms(50)).await;
    let many = client(
        lock.clone(),
        ms(10_000),
        every(ms(50)).with_deadline(ms(2_000)),
    );
    let started = Instant::now();
    let outcome = many.acquire_many(&["k", "j"]).await;
    let waited = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    if let Ok(guard) = outcome {
        guard.release().await.unwrap();
        for task in loops {
            task.await.unwrap();
        }
        assert!(lock.is_empty(), "entries left behind");
        return;
    }
    for task in &loops {
        task.abort();
    }
    panic!(
        "the multi-key waiter never got in within {waited:?} ({:?}): a line of two mutex \
         waiters that hand the key to each other starves it",
        outcome.err()
    );
}

/// `MemoryLock` behind a wrapper that forwards `capabilities()` (fair) but keeps the trait's
/// default `wait_for_turn` (a wait for a release).
#[derive(Clone, Debug, Default)]
struct Wrapped(MemoryLock);

#[async_trait]
impl Lock for Wrapped {
    fn name(&self) -> &'static str {
        "wrapped-memory"
    }

    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }

    fn try_acquire<'a>(
        &'a self,
        request: &'a LockRequest,
    ) -> Answer<'a, Result<Option<Box<dyn Handle>>>> {
        self.0.try_acquire(request)
    }

    fn abandon<'a>(&'a self, request: &'a LockRequest) -> Answer<'a, Result<bool>> {
        self.0.abandon(request)
    }

    async fn wait_for_release(&self, keys: &[Key], max_wait: Duration) -> Result<()> {
        self.0.wait_for_release(keys, max_wait).await
    }
}

/// Behind the wrapper, `n` waiters line up on `k` held for 100 ms; each holds it 2 ms. The
/// hand-offs go by release wake-ups (every waiter of the key looks): served in arrival order,
/// and the whole line through in about its holds, not a poll per waiter.
#[tokio::test(start_paused = true)]
async fn a_wrapper_with_the_default_wait_for_turn_hands_off_in_order_and_promptly() {
    let lock = Wrapped::default();
    let retry = RetryPolicy::default().with_retry_jitter(Duration::ZERO);
    let holder = client(lock.clone(), ms(60_000), RetryPolicy::none())
        .acquire("k")
        .await
        .unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for at in 0..8usize {
        let (locker, order) = (
            client(lock.clone(), ms(60_000), retry.clone()),
            Arc::clone(&order),
        );
        tasks.push(tokio::spawn(async move {
            let guard = locker
                .acquire("k")
                .await
                .expect("a waiter behind the wrapper gave up");
            order.lock().unwrap().push((at, Instant::now()));
            tokio::time::sleep(ms(2)).await;
            guard.release().await.unwrap();
        }));
        tokio::time::sleep(ms(1)).await;
    }
    tokio::time::sleep(ms(100)).await;
    let released = Instant::now();
    holder.release().await.unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    let ats: Vec<usize> = order.iter().map(|(at, _)| *at).collect();
    assert_eq!(ats, (0..8).collect::<Vec<_>>(), "served out of order");
    let took = order.last().unwrap().1 - released;
    assert!(
        took <= ms(8 * 2 + 50),
        "8 hand-offs of a 2 ms hold took {took:?} behind the wrapper"
    );
    assert!(lock.0.is_empty());
}
/// Behind the wrapper, 16 waiters with the default policy (10 retries 200 ms apart, no
/// jitter) line up on `k`, each holding it 2 ms: all of them get in (the whole line goes
/// through in some 32 ms of holds), none gives up with `Timeout`. Every release wakes every
/// waiter of the key (the line's first may be among them) and each one not first spends one
/// of its counted retries on a refused attempt.
#[tokio::test(start_paused = true)]
async fn a_wrapper_with_counted_retries_does_not_time_out_in_a_long_line() {
    let lock = Wrapped::default();
    let retry = RetryPolicy::default().with_retry_jitter(Duration::ZERO);
    let holder = client(lock.clone(), ms(60_000), RetryPolicy::none())
        .acquire("k")
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..16usize {
        let locker = client(lock.clone(), ms(60_000), retry.clone());
        tasks.push(tokio::spawn(async move {
            let guard = locker.acquire("k").await?;
            tokio::time::sleep(ms(2)).await;
            guard.release().await
        }));
        tokio::time::sleep(ms(1)).await;
    }
    tokio::time::sleep(ms(50)).await;
    holder.release().await.unwrap();
    let mut failed = Vec::new();
    for task in tasks {
        if let Err(error) = task.await.unwrap() {
            failed.push(error);
        }
    }
    assert!(
        failed.is_empty(),
        "{} of 16 waiters gave up: {:?}",
        failed.len(),
        failed.first()
    );
}

/// The clock jumps past the ttl while the line waits (the whole process stalled): every place
/// has lapsed when the waiters run again, and the first to run prunes the others and goes
/// first. The line's order should survive a stall of all of its waiters at once (nobody leaked
/// anything). A limit of the new guarantee rather than a regression: before the line there
/// was no order across attempts to lose.
#[tokio::test(start_paused = true)]
async fn the_line_keeps_its_order_across_a_stall_longer_than_the_ttl() {
    let lock = MemoryLock::new();
    let ttl = ms(400);
    // The holder holds for much longer than the ttl, by extending.
    let mut holder = client(lock.clone(), ttl, RetryPolicy::none())
        .acquire("k")
        .await
        .unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    // Later arrivals poll more often, so they run first after the stall.
    for at in 0..4usize {
        let retry = every(ms(97 - 20 * at as u64));
        let (locker, order) = (client(lock.clone(), ttl, retry), Arc::clone(&order));
        tasks.push(tokio::spawn(async move {
            let guard = locker.acquire("k").await.unwrap();
            order.lock().unwrap().push(at);
            guard.release().await.unwrap();
        }));
        tokio::time::sleep(ms(1)).await;
    }
    tokio::time::sleep(ms(50)).await;
    // A stall: nothing runs for 2 ttls (the holder extends right after, as its watchdog would).
    tokio::time::advance(ms(800)).await;
    holder.extend(ttl).await.ok();
    tokio::time::sleep(ms(100)).await;
    holder.release().await.ok();
    for task in tasks {
        task.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    assert_eq!(order, vec![0, 1, 2, 3], "order after the stall");
}

//! Adversarial cases for releasing a kept-alive guard while its watchdog runs.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lock_core::{
    Capabilities, Lease, LeaseKind, LockOptions, Locker, Result, RetryPolicy,
    raw::{Handle, Lock, LockRequest, async_trait},
};
use lock_memory::MemoryLock;
use tokio::sync::Notify;

fn locker(lock: &MemoryLock, ttl: Duration) -> Locker {
    Locker::new(lock.clone())
        .with_options(
            LockOptions::default()
                .with_ttl(ttl)
                .with_retry(RetryPolicy::none()),
        )
        .unwrap()
}

/// Drops each kept-alive guard at the very tick its watchdog wakes to extend it, on another
/// worker thread; a clean release must never be followed by a lost signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_released_as_its_watchdog_wakes_is_not_reported_lost() {
    let ttl = Duration::from_millis(30);
    let lock = MemoryLock::new();
    let locker = locker(&lock, ttl);
    let lost_after_release = Arc::new(AtomicUsize::new(0));
    let rounds = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for task in 0..8 {
        let (locker, lost_after_release, rounds) = (
            locker.clone(),
            Arc::clone(&lost_after_release),
            Arc::clone(&rounds),
        );
        tasks.push(tokio::spawn(async move {
            for round in 0..300 {
                let key = format!("k{task}-{round}");
                let mut guard = locker.acquire(&key).await.unwrap();
                let lost = guard.keep_alive().unwrap();
                // The watchdog's own wake-up: same instant, same timer tick.
                let wake = guard.valid_until() - ttl / 3;
                tokio::time::sleep_until(wake).await;
                if lost.is_lost() || !guard.is_valid() {
                    continue; // a loaded machine: not this case
                }
                drop(guard);
                tokio::time::sleep(Duration::from_millis(2)).await;
                rounds.fetch_add(1, Ordering::SeqCst);
                if lost.is_lost() {
                    lost_after_release.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let lost = lost_after_release.load(Ordering::SeqCst);
    println!(
        "{lost} of {} cleanly dropped guards reported lost afterwards",
        rounds.load(Ordering::SeqCst)
    );
    assert_eq!(
        lost, 0,
        "{lost} kept-alive guards were reported lost after a clean release"
    );
}

/// A memory lock behind another face: with releases that need awaiting (a store that needs I/O
/// to release, as Redis does) or, in process, with an extend that awaits for `slow_extend`.
#[derive(Debug)]
struct Wrapped {
    inner: MemoryLock,
    in_process: bool,
    slow_extend: Duration,
    extending: Arc<Notify>,
}

#[derive(Debug)]
struct WrappedHandle {
    inner: Box<dyn Handle>,
    in_process: bool,
    slow_extend: Duration,
    extending: Arc<Notify>,
}

#[async_trait]
impl Lock for Wrapped {
    fn name(&self) -> &'static str {
        "wrapped"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn try_acquire<'a>(
        &'a self,
        request: &'a LockRequest,
    ) -> lock_core::raw::Answer<'a, Result<Option<Box<dyn Handle>>>> {
        lock_core::raw::Answer::later(async move {
            Ok(self.inner.try_acquire(request).await?.map(|inner| {
                Box::new(WrappedHandle {
                    inner,
                    in_process: self.in_process,
                    slow_extend: self.slow_extend,
                    extending: Arc::clone(&self.extending),
                }) as Box<dyn Handle>
            }))
        })
    }
    fn abandon<'a>(&'a self, request: &'a LockRequest) -> lock_core::raw::Answer<'a, Result<bool>> {
        lock_core::raw::Answer::later(async move { self.inner.abandon(request).await })
    }
}

#[async_trait]
impl Handle for WrappedHandle {
    fn lease(&self) -> &Lease {
        self.inner.lease()
    }
    async fn extend(&mut self, ttl: Duration) -> Result<()> {
        self.extending.notify_one();
        tokio::time::sleep(self.slow_extend).await;
        self.inner.extend(ttl).await
    }
    fn release(&mut self) -> lock_core::raw::Answer<'_, Result<()>> {
        if self.in_process {
            self.inner.release()
        } else {
            lock_core::raw::Answer::later(async move { self.inner.release().await })
        }
    }
}

fn wrapped(in_process: bool, slow_extend: Duration) -> (MemoryLock, Wrapped) {
    let inner = MemoryLock::new();
    let wrapped = Wrapped {
        inner: inner.clone(),
        in_process,
        slow_extend,
        extending: Arc::new(Notify::new()),
    };
    (inner, wrapped)
}

/// The guard's docs said a lock dropped outside a runtime "stays until its ttl expires", since
/// nothing can be sent to a store there; a kept-alive guard knows a runtime, its watchdog's.
#[tokio::test(start_paused = true)]
async fn a_kept_alive_guard_dropped_outside_a_runtime_is_released_on_its_watchdogs_runtime() {
    let (memory, lock) = wrapped(false, Duration::ZERO);
    let mut guard = locker_of(lock, Duration::from_secs(10))
        .acquire("x")
        .await
        .unwrap();
    guard.keep_alive().unwrap();
    std::thread::spawn(move || drop(guard)).join().unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(
        locker(&memory, Duration::from_secs(10))
            .try_acquire("x")
            .await
            .unwrap()
            .is_some(),
        "`x` is still held after its kept-alive guard was dropped outside a runtime"
    );
}

/// An in-process lock whose watchdog is extending it (the handle is busy) when its guard is
/// dropped outside a runtime: released once the extend is done, not left for a whole ttl.
#[tokio::test(start_paused = true)]
async fn an_in_process_guard_dropped_outside_a_runtime_mid_extend_is_released_after_it() {
    let (memory, lock) = wrapped(true, Duration::from_millis(50));
    let extending = Arc::clone(&lock.extending);
    let mut guard = locker_of(lock, Duration::from_millis(300))
        .acquire("x")
        .await
        .unwrap();
    guard.keep_alive().unwrap();
    extending.notified().await; // the watchdog holds the handle for 50 ms
    std::thread::spawn(move || drop(guard)).join().unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(
        locker(&memory, Duration::from_secs(10))
            .try_acquire("x")
            .await
            .unwrap()
            .is_some(),
        "`x` is still held 60 ms after its kept-alive guard was dropped outside a runtime \
         while its watchdog was extending it (ttl 300 ms)"
    );
}

/// Held: dropped inside `spawn_blocking` while the watchdog extends, the release is spawned
/// on the blocking thread's runtime and runs once the extend is done.
#[tokio::test(start_paused = true)]
async fn a_guard_dropped_in_spawn_blocking_mid_extend_is_released_after_it() {
    let (memory, lock) = wrapped(true, Duration::from_millis(50));
    let extending = Arc::clone(&lock.extending);
    let mut guard = locker_of(lock, Duration::from_millis(300))
        .acquire("x")
        .await
        .unwrap();
    let lost = guard.keep_alive().unwrap();
    extending.notified().await;
    tokio::task::spawn_blocking(move || drop(guard))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(
        locker(&memory, Duration::from_secs(10))
            .try_acquire("x")
            .await
            .unwrap()
            .is_some(),
        "`x` is still held after its guard was dropped in spawn_blocking"
    );
    assert!(!lost.is_lost(), "a dropped guard was reported lost");
}

/// Held: a kept-alive write lock downgraded to a read lock and dropped frees the key at once,
/// and the watchdog that kept the read lock alive stops.
#[tokio::test(start_paused = true)]
async fn a_downgraded_kept_alive_guard_frees_its_key_on_drop() {
    let lock = MemoryLock::new();
    let locker = locker(&lock, Duration::from_millis(300));
    let mut guard = locker.acquire_write("x").await.unwrap();
    let lost = guard.keep_alive().unwrap();
    guard.downgrade().await.unwrap();
    // Kept alive as a read lock past several ttls.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !lost.is_lost(),
        "the downgraded lock was lost while kept alive"
    );
    assert!(
        locker
            .try_acquire_kind("x", LeaseKind::Write)
            .await
            .unwrap()
            .is_none()
    );
    drop(guard);
    assert!(
        locker
            .try_acquire_kind("x", LeaseKind::Write)
            .await
            .unwrap()
            .is_some(),
        "a writer cannot take `x` right after its downgraded kept-alive guard was dropped"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!lost.is_lost(), "the dropped guard was reported lost");
}

fn locker_of(lock: Wrapped, ttl: Duration) -> Locker {
    Locker::new(lock)
        .with_options(
            LockOptions::default()
                .with_ttl(ttl)
                .with_retry(RetryPolicy::none()),
        )
        .unwrap()
}

//! The history checkers on contending workers: zero violations with a real lock, and — the
//! negative controls — violations detected without one or with a broken one.

use std::sync::Arc;
use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_memory::MemoryLock;
use lock_tests::history::{FencedResource, Intervals, RacyCounter};
use tokio::time::Instant;

#[derive(Default)]
struct Checkers {
    intervals: Intervals,
    counter: RacyCounter,
    fenced: FencedResource,
}

/// `workers` × `sections` critical sections, each guarded by `locker` when there is one; each
/// section pauses for `pause` between its read and its write.
async fn contend(
    locker: Option<Locker>,
    workers: usize,
    sections: usize,
    pause: Duration,
) -> Arc<Checkers> {
    let checkers = Arc::new(Checkers::default());
    let fence = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (locker, checkers, fence) = (locker.clone(), Arc::clone(&checkers), Arc::clone(&fence));
        tasks.spawn(async move {
            for _ in 0..sections {
                let guard = match &locker {
                    Some(locker) => Some(locker.acquire("history").await.expect("acquire")),
                    None => None,
                };
                let acquired = Instant::now();
                // Without a lock, a stand-in fence in acquisition order: late writers go stale.
                let token = guard
                    .as_ref()
                    .and_then(lock_core::LockGuard::fencing_token)
                    .unwrap_or_else(|| fence.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1);
                checkers.counter.increment(pause).await;
                checkers.fenced.write(token);
                let released = Instant::now();
                checkers.intervals.record(acquired, released);
                if let Some(guard) = guard {
                    guard.release().await.expect("release");
                }
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.expect("worker");
    }
    checkers
}

fn memory_locker() -> Locker {
    Locker::new(MemoryLock::new())
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(30))
                .with_retry(RetryPolicy::forever().with_deadline(Duration::from_secs(60))),
        )
        .expect("options")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d1_memory_32_workers_by_1000_sections_have_no_violation() {
    let started = Instant::now();
    let checkers = contend(Some(memory_locker()), 32, 1_000, Duration::ZERO).await;
    let total = 32 * 1_000;
    let (overlaps, lost, stale) = (
        checkers.intervals.overlaps(),
        checkers.counter.lost_updates(total),
        checkers.fenced.stale_writes(),
    );
    println!(
        "D1 (memory, 32 × 1000): critical sections {}, overlaps {overlaps}, lost updates {lost}, stale writes {stale} in {:?}",
        checkers.intervals.len(),
        started.elapsed()
    );
    assert_eq!(checkers.intervals.len(), 32_000);
    assert_eq!((overlaps, lost, stale), (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_without_a_lock_every_checker_fires() {
    let checkers = contend(None, 8, 50, Duration::from_micros(50)).await;
    let (overlaps, lost, stale) = (
        checkers.intervals.overlaps(),
        checkers.counter.lost_updates(8 * 50),
        checkers.fenced.stale_writes(),
    );
    println!(
        "negative control (no lock, 8 × 50): overlaps {overlaps}, lost updates {lost}, stale writes {stale}"
    );
    assert!(
        overlaps > 0,
        "the interval checker missed unguarded sections"
    );
    assert!(lost > 0, "the counter missed lost updates");
    assert!(stale > 0, "the fence checker missed stale writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d3_aborted_panicking_and_cancelled_holders_leave_no_entry() {
    let lock = MemoryLock::new();
    let locker = Locker::new(lock.clone())
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(30))
                .with_retry(RetryPolicy::forever().with_deadline(Duration::from_secs(10))),
        )
        .expect("options");
    // A task aborted while it holds the lock.
    let holder = locker.clone();
    let task = tokio::spawn(async move {
        let _guard = holder.acquire("d3").await.expect("acquire");
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    task.abort();
    let _ = task.await;
    // A critical section that panics.
    let panicking = locker.clone();
    let outcome = tokio::spawn(async move {
        let _guard = panicking
            .acquire("d3")
            .await
            .expect("acquire after the abort");
        panic!("the critical section failed");
    })
    .await;
    assert!(outcome.is_err_and(|error| error.is_panic()));
    // Acquisitions cancelled while waiting behind a holder.
    let holder = locker.acquire("d3").await.expect("acquire after the panic");
    for _ in 0..10 {
        let waiter = locker.clone();
        let _ = tokio::time::timeout(Duration::from_millis(5), async move {
            waiter.acquire("d3").await
        })
        .await;
    }
    holder.release().await.expect("release");
    tokio::time::sleep(Duration::from_millis(50)).await;
    println!(
        "D3 (abort, panic, cancelled waits): entries left {}",
        lock.len()
    );
    assert_eq!(lock.len(), 0, "an entry leaked");
    assert_eq!(lock.waited_keys(), 0);
}

/// D4: no deadlock from map guards held across `.await` or re-entry into a shard. 64 tasks mix
/// every operation on four keys (which share shards with one another and with the purge and
/// inspect scans), including calls made while holding a lock on the same key; the whole run
/// must finish well within a watchdog timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d4_every_operation_mixed_on_shared_shards_never_hangs() {
    let lock = MemoryLock::new();
    let locker = Locker::new(lock.clone())
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_millis(50))
                .with_retry(
                    RetryPolicy::forever()
                        .with_retry_delay(Duration::from_millis(1))
                        .with_deadline(Duration::from_secs(5)),
                ),
        )
        .expect("options");
    let run_for = Duration::from_millis(1_500);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..64usize {
        let locker = locker.clone();
        tasks.spawn(async move {
            let mut operations = 0u64;
            let mut step = task;
            while started.elapsed() < run_for {
                step = step.wrapping_mul(31).wrapping_add(7);
                let key = ["d4:a", "d4:b", "d4:c", "d4:d"][step % 4];
                match step % 5 {
                    0 => {
                        if let Ok(Some(guard)) = locker.try_acquire(key).await {
                            // Re-entry while holding: inspect and a second try on the same key.
                            let _ = locker.inspect(key).await;
                            let _ = locker.try_acquire(key).await;
                            let _ = guard.release().await;
                        }
                    }
                    1 => {
                        if let Ok(mut guard) = locker.acquire(key).await {
                            let _ = guard.extend(Duration::from_millis(50)).await;
                            tokio::task::yield_now().await;
                            drop(guard); // released in the background
                        }
                    }
                    2 => {
                        let _ = locker.purge("d4:").await;
                    }
                    3 => {
                        let _ = locker.acquire_many(&[key, "d4:a"]).await;
                    }
                    _ => {
                        let _ = locker.inspect(key).await;
                    }
                }
                operations += 1;
            }
            operations
        });
    }
    let finished = tokio::time::timeout(Duration::from_secs(30), async {
        let mut operations = 0;
        while let Some(done) = tasks.join_next().await {
            operations += done.expect("task");
        }
        operations
    })
    .await;
    let hangs = usize::from(finished.is_err());
    println!(
        "D4 (64 tasks, every operation, shared shards): operations {}, hangs {hangs}",
        finished.unwrap_or(0)
    );
    assert_eq!(
        hangs, 0,
        "the run did not finish within the watchdog's 30 s"
    );
}

//! adv34a: the in-process lock and the core's `Locker` under hostile runtimes, clocks and
//! schedules: runtimes dropped under a kept-alive guard, holders that shorten their lease,
//! mixed runtimes on one store.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_memory::MemoryLock;

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

fn client(lock: &MemoryLock, ttl: Duration, retry: RetryPolicy) -> Locker {
    Locker::new(lock.clone())
        .with_options(LockOptions::default().with_ttl(ttl).with_retry(retry))
        .unwrap()
}

fn multi_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_time()
        .build()
        .unwrap()
}

/// `keep_alive`'s promise: the signal "fires when an extension finds the lock lost or the
/// local validity lapses". A guard kept alive on one runtime and held on after that runtime
/// was shut down (a worker runtime of a library, a temporary runtime of a sync caller) has no
/// watchdog left: nothing extends the lock, it lapses, another task takes the key, and the
/// section, waiting on `lost()` to stop its work, must hear of it by the validity's end.
#[test]
fn a_kept_alive_guard_whose_watchdogs_runtime_is_gone_is_reported_lost_when_it_lapses() {
    let lock = MemoryLock::new();
    let ttl = ms(150);
    let temporary = multi_thread();
    let (guard, lost) = temporary.block_on(async {
        let mut guard = client(&lock, ttl, RetryPolicy::none())
            .acquire("k")
            .await
            .unwrap();
        let lost = guard.keep_alive().unwrap();
        (guard, lost)
    });
    drop(temporary);
    let main = multi_thread();
    main.block_on(async {
        let other = client(&lock, ms(10_000), every(ms(5)));
        let taken = tokio::time::timeout(ms(2_000), other.acquire("k"))
            .await
            .expect("the unextended lock lapses")
            .unwrap();
        assert!(!guard.is_valid(), "another holder while the guard is valid");
        let heard = tokio::time::timeout(ms(500), lost.lost()).await.is_ok();
        assert!(
            heard,
            "another task holds `k` while the kept-alive guard's lost signal stays silent \
             (its watchdog's runtime is gone)"
        );
        drop(taken);
    });
    drop(guard);
    assert!(
        lock.is_empty(),
        "the table keeps an entry once every guard is gone"
    );
}

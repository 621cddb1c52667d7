//! Attacks on the courtesy (`Locker::with_courtesy`, on by default, 9e52d96). The store here is
//! the memory lock seen as a distributed store that wakes its waiters on release — as Redlock
//! over several nodes does by default now (`wake_on_release` unset is on there, 5ed6751). The
//! clock is paused: every wait is exact.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy, raw::Lock};
use support::{Woken, win_after_contention, woken_client};
use tokio::time::Instant;

/// The default policy's shape (counted retries, no deadline) with a 200 ms delay and no jitter.
fn default_like() -> RetryPolicy {
    RetryPolicy::default().with_retry_jitter(Duration::ZERO)
}

/// How long `cycles` RAII cycles (`acquire`, then drop the guard) of one task of one client,
/// alone on the store, take.
async fn raii_cycles(courtesy: bool, cycles: usize) -> Duration {
    let store = Arc::new(Woken::default());
    let locker = Locker::from_arc(store as Arc<dyn Lock>)
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(10))
                .with_retry(default_like()),
        )
        .unwrap()
        .with_courtesy(courtesy);
    let started = Instant::now();
    for _ in 0..cycles {
        let _guard = locker.acquire("k").await.unwrap();
        // The critical section; the guard is dropped at the end of the scope.
    }
    started.elapsed()
}

/// Promised (9e52d96, README "Waiting where there is no line": "uncontended cycles never pay
/// it"; `Locker::with_courtesy`: a courtesy *to other processes*, paid after winning a key
/// "it had found held", "a win at the first attempt (nobody else asked meanwhile) ends the
/// courtesy"): a client alone on a store — no other process, one task, strictly one
/// acquisition after another — never sleeps a courtesy delay.
///
/// Broken on main: the most common way to hold a lock, a guard dropped at the end of its scope,
/// releases on a spawned task; the next acquisition of the same task finds the key still held
/// by its own lease being released, is woken by that release and wins, which counts as "won
/// after contention": the acquisition after it sleeps one whole delay of the policy (200 ms by
/// default) before asking for a key nobody else wants. Every second cycle pays it: 20 cycles
/// take 2 s of delays with the courtesy, 0 s without (the control). Found with the default
/// policy shape (counted retries skip the in-process queue, which would have waited for the
/// release).
#[tokio::test(start_paused = true)]
async fn a_client_alone_dropping_its_guards_never_pays_a_courtesy() {
    let control = raii_cycles(false, 20).await;
    assert!(control < Duration::from_millis(200), "control: {control:?}");
    let by_default = raii_cycles(true, 20).await;
    assert!(
        by_default < Duration::from_millis(200),
        "20 uncontended RAII cycles of a lone client took {by_default:?} (control: {control:?})"
    );
}

/// Promised (9e52d96, `Courtesy::MAX`: "At most this many keys are remembered; more clears
/// the oldest half's worth (expired first)"; `Locker::with_courtesy`: the acquisition after a
/// contended win "within one ttl waits one delay"): when a client has won more than 1024 keys
/// after contention within a ttl, only the oldest half is forgotten — the courtesy owed for a
/// key won lately still holds.
///
/// Broken on main: once 1024 unexpired keys are remembered, the next contended win clears
/// them all: the key won just before is taken straight back (no wait), as if never contended.
#[tokio::test(start_paused = true)]
async fn past_the_cap_only_the_oldest_courtesies_are_forgotten() {
    let store = Arc::new(Woken::default());
    let a = woken_client(&store, 20);
    let c = woken_client(&store, 20);
    for i in 0..1023 {
        win_after_contention(&a, &c, &format!("old-{i}")).await;
    }
    win_after_contention(&a, &c, "recent").await; // the 1024th key remembered
    win_after_contention(&a, &c, "one-more").await; // past the cap
    let asked = Instant::now();
    a.acquire("recent").await.unwrap().release().await.unwrap();
    // The store wakes its waiters on release: the courtesy is 5 ms, not the 20 ms delay.
    assert_eq!(
        asked.elapsed(),
        Duration::from_millis(5),
        "the courtesy owed for a key won lately"
    );
}

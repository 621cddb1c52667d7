//! Attacks on the courtesy's own-lease tracking (`OwnLease`, `Courtesy::held_here`,
//! 3cad8fb/b822452): the store is the memory lock seen as a distributed store that wakes its
//! waiters on release (as in `attack_s13a.rs`). The clock is paused: every wait is exact.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy, raw::Lock};
use support::{Woken, win_after_contention, woken_client};
use tokio::time::Instant;

/// How long an acquisition of `key` by `locker` takes (the key is free: only a courtesy
/// delays it), its guard released after.
async fn time_to_acquire(locker: &Locker, key: &str) -> Duration {
    let asked = Instant::now();
    let guard = locker.acquire(key).await.unwrap();
    let took = asked.elapsed();
    guard.release().await.unwrap();
    took
}

/// The default policy's shape (counted retries, which skip the in-process queue) with a 20 ms
/// delay and no jitter, and a one-hour ttl.
fn counted(store: &Arc<Woken>) -> Locker {
    Locker::from_arc(Arc::clone(store) as Arc<dyn Lock>)
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(3600))
                .with_retry(
                    RetryPolicy::default()
                        .with_retry_delay(Duration::from_millis(20))
                        .with_retry_jitter(Duration::ZERO),
                ),
        )
        .unwrap()
}

/// A task of `a` acquires `key` while `holder` (a guard of `a`) holds it, and wins it once
/// `holder` is released; its guard is released after.
async fn sibling_waits_for(a: &Locker, holder: lock_core::LockGuard, key: &str) {
    let task = tokio::spawn({
        let (a, key) = (a.clone(), key.to_owned());
        async move { a.acquire(&key).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(1)).await;
    holder.release().await.unwrap();
    task.await.unwrap().release().await.unwrap();
}

/// Promised (b822452, `Locker::retry_loop`: "A key found held while this client holds it or
/// is releasing it (a sibling task's guard …) is no contention with another process, and owes
/// nobody a courtesy"; README: uncontended cycles never pay it): a lone client whose task waits
/// for a key its own other task holds owes no courtesy afterwards — whether that task's guard
/// is over the key alone or over several keys (`acquire_many`).
///
/// Broken on main: only a guard's *primary* key (the first of its set) is marked as held here
/// (`LockGuard::with_cleanups` marks `key_set().primary()`). A task that waits for "b" while
/// its sibling holds `acquire_many(["a", "b"])` counts the wait as contention with another
/// process: the client's next acquisition of "b", alone on the store, sleeps the courtesy
/// (5 ms here; a whole delay of the policy on a store that does not wake its waiters). The
/// control (the sibling's guard over "b" alone) takes no time.
#[tokio::test(start_paused = true)]
async fn a_key_held_by_a_sibling_multi_key_guard_owes_no_courtesy() {
    let store = Arc::new(Woken::default());
    let a = counted(&store);
    // Control: the sibling's guard is over "c" alone.
    let single = a.acquire("c").await.unwrap();
    sibling_waits_for(&a, single, "c").await;
    assert_eq!(time_to_acquire(&a, "c").await, Duration::ZERO, "control");

    let both = a.acquire_many(&["a", "b"]).await.unwrap();
    sibling_waits_for(&a, both, "b").await;
    assert_eq!(
        time_to_acquire(&a, "b").await,
        Duration::ZERO,
        "a lone client paid a courtesy for a key its own multi-key guard held"
    );
}

/// Options of one acquisition whose lease lasts 100 ms.
fn short_ttl() -> LockOptions {
    LockOptions::default()
        .with_ttl(Duration::from_millis(100))
        .with_retry(RetryPolicy::none())
}

/// Promised (`OwnLease`: the key is marked "until the store let go of it"; `Courtesy`: "Keys
/// this client won after finding them held by another process" owe the courtesy): once the
/// store has let go of a lease of this client (its ttl ran out), a key found held by another
/// process is contention again, and winning it owes the courtesy.
///
/// Broken on main: the mark lasts as long as the guard *object*, not the lease: a guard kept
/// past its ttl (a stalled section, a lost lease whose guard is still in scope) — or leaked with
/// `mem::forget`, then for good — makes every wait of the client on that key, even behind
/// another process, count as "held here": the client wins after contention and takes the key
/// straight back (0 ms, where the control without the stale guard waits the 5 ms courtesy).
#[tokio::test(start_paused = true)]
async fn a_guard_past_its_ttl_does_not_hide_other_processes() {
    let store = Arc::new(Woken::default());
    let (a, c) = (woken_client(&store, 20), woken_client(&store, 20));
    // Control.
    win_after_contention(&a, &c, "control").await;
    assert_eq!(
        time_to_acquire(&a, "control").await,
        Duration::from_millis(5)
    );

    let stale = a.acquire_with("k", &short_ttl()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!stale.is_valid(), "the store let go of it");
    win_after_contention(&a, &c, "k").await;
    assert_eq!(
        time_to_acquire(&a, "k").await,
        Duration::from_millis(5),
        "a guard past its ttl hid the contention with another process"
    );
    drop(stale);
}

/// As above, with the guard leaked (`mem::forget`): the key stays marked "held here" for the
/// life of the client, long after the store let go of the lease.
#[tokio::test(start_paused = true)]
async fn a_forgotten_guard_does_not_hide_other_processes_for_good() {
    let store = Arc::new(Woken::default());
    let (a, c) = (woken_client(&store, 20), woken_client(&store, 20));
    std::mem::forget(a.acquire_with("k", &short_ttl()).await.unwrap());
    tokio::time::sleep(Duration::from_secs(60)).await;
    win_after_contention(&a, &c, "k").await;
    assert_eq!(
        time_to_acquire(&a, "k").await,
        Duration::from_millis(5),
        "a leaked guard hid the contention with another process a minute after its ttl"
    );
}

/// Held (and a guard for the validity-bound mark): a kept-alive guard stays "held here" past
/// its first ttl, as its watchdog extends it — a sibling task that waits for it owes no
/// courtesy afterwards. Negative control: with the mark reading a validity cell of its own
/// (not the one the watchdog moves), the next acquisition sleeps the 5 ms courtesy.
#[tokio::test(start_paused = true)]
async fn a_kept_alive_guard_past_its_first_ttl_is_still_held_here() {
    let store = Arc::new(Woken::default());
    let a = counted(&store);
    let mut kept = a
        .acquire_with("k", &short_ttl().with_retry(RetryPolicy::default()))
        .await
        .unwrap();
    let _lost = kept.keep_alive().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(kept.is_valid(), "extended by its watchdog");
    sibling_waits_for(&a, kept, "k").await;
    assert_eq!(time_to_acquire(&a, "k").await, Duration::ZERO);
}

/// Promised (b822452: "A key found held while this client holds it … is no contention with
/// another process, and owes nobody a courtesy"; `LockGuard`'s drop outside a runtime: "the
/// lock stays until its ttl expires"): a lone client whose guard was dropped outside any
/// runtime still holds the key in the store until the ttl; its task that waits for that key
/// meanwhile met no other process, and owes no courtesy afterwards.
///
/// Broken on main: the guard's mark ends with the guard (`own` dropped with it), while its
/// lease stays in the store: the task's wait counts as contention with another process, and
/// the client's next acquisition of the key, alone on the store, sleeps the 5 ms courtesy.
#[tokio::test(start_paused = true)]
async fn a_guard_dropped_outside_a_runtime_is_still_held_here_until_its_ttl() {
    let store = Arc::new(Woken::default());
    let a = woken_client(&store, 20);
    let guard = a
        .acquire_with("k", &short_ttl().with_retry(RetryPolicy::none()))
        .await
        .unwrap();
    std::thread::spawn(move || drop(guard)).join().unwrap();
    let task = tokio::spawn({
        let a = a.clone();
        async move { a.acquire("k").await.unwrap().release().await.unwrap() }
    });
    task.await.unwrap();
    assert_eq!(
        time_to_acquire(&a, "k").await,
        Duration::ZERO,
        "a lone client paid a courtesy for its own lease left to expire"
    );
}

/// Promised (as above: a key found held while this client holds it owes no courtesy): a lone
/// client whose multi-key acquisition (`acquire_many(["x", "b"])`) waits for "b", held by its
/// own other task, owes no courtesy afterwards.
///
/// Broken on main (and with the fix marking every key of a guard): the retry loop asks
/// whether the *wanted* set's primary key ("x", free) is held here, not whether the key that
/// blocked it is: the wait counts as contention with another process, and the client's next
/// `acquire_many(["x", "b"])`, alone on the store, sleeps the 5 ms courtesy.
#[tokio::test(start_paused = true)]
async fn a_multi_key_wait_behind_a_sibling_owes_no_courtesy() {
    let store = Arc::new(Woken::default());
    let a = counted(&store);
    let b = a.acquire("b").await.unwrap();
    let task = tokio::spawn({
        let a = a.clone();
        async move { a.acquire_many(&["x", "b"]).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(1)).await;
    b.release().await.unwrap();
    task.await.unwrap().release().await.unwrap();
    let asked = Instant::now();
    a.acquire_many(&["x", "b"])
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    assert_eq!(
        asked.elapsed(),
        Duration::ZERO,
        "a lone client paid a courtesy for a multi-key wait behind its own task"
    );
}

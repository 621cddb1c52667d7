//! adv33b: attacks on the outsiders' turn (d9808e2) and the own-waiter flag (f2d0bb3).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use lock_core::raw::Lock;
use lock_memory::MemoryLock;
use tokio::time::Instant;

mod support;
use support::{client, every, ms};

/// Builds a line on `k` whose holder took the key as a line member (`LINED_HOLDER`), with a
/// second member behind it and a multi-key waiter `[k, j]` outside the line: returns the
/// lined holder's guard, the second member's task (its acquisition's instant) and the
/// outsider's task.
async fn lined_holder_with_outsider(
    lock: &MemoryLock,
    j_free: bool,
) -> (
    lock_core::LockGuard,
    tokio::task::JoinHandle<Instant>,
    tokio::task::JoinHandle<lock_core::Result<lock_core::LockGuard>>,
) {
    let first = client(lock.clone(), ms(10_000), every(ms(1_000)));
    let a = first.acquire("k").await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let b = client(lock.clone(), ms(10_000), every(ms(1_000)));
    tokio::spawn(async move {
        let guard = b.acquire("k").await.unwrap();
        tx.send(guard).ok();
    });
    tokio::time::sleep(ms(1)).await;
    let c = client(lock.clone(), ms(10_000), every(ms(1_000)));
    let second = tokio::spawn(async move {
        let guard = c.acquire("k").await.unwrap();
        let at = Instant::now();
        guard.release().await.unwrap();
        at
    });
    tokio::time::sleep(ms(1)).await;
    if !j_free {
        let j = client(lock.clone(), ms(10_000), every(ms(1_000)));
        std::mem::forget(j.acquire("j").await.unwrap());
    }
    let o = client(lock.clone(), ms(10_000), every(ms(1_000)));
    let outsider = tokio::spawn(async move { o.acquire_many(&["k", "j"]).await });
    tokio::time::sleep(ms(1)).await;
    // A's release hands the key to B, the first in line: B holds as a line member.
    a.release().await.unwrap();
    let b = rx.await.unwrap();
    tokio::time::sleep(ms(5)).await;
    (b, second, outsider)
}

/// The outsiders' turn opens at B's release (C in line, O waiting outside), but O is
/// cancelled before it asks: nobody takes the turn. C, first in line, should be served when
/// the turn ends (HANDOFF_GRACE, 20 ms), not at its next poll.
#[tokio::test(start_paused = true)]
async fn an_unused_outsiders_turn_ends_on_time_for_the_first_in_line() {
    let lock = MemoryLock::new();
    let (b, second, outsider) = lined_holder_with_outsider(&lock, true).await;
    b.release().await.unwrap();
    let released = Instant::now();
    // Cancelled before its wake-up is polled.
    outsider.abort();
    let served = second.await.unwrap();
    let after = served - released;
    assert!(
        after <= ms(25),
        "the first in line was served {after:?} after a release whose outsiders' turn went unused"
    );
    tokio::time::sleep(ms(10)).await;
    assert!(lock.is_empty(), "the table is not empty");
}

/// The same, but the outsider's other key is held: its attempt in the turn takes `k`, fails
/// on `j` and lets `k` go, which wakes the first in line at once.
#[tokio::test(start_paused = true)]
async fn an_outsider_failing_on_its_other_key_hands_the_turn_back_at_once() {
    let lock = MemoryLock::new();
    let (b, second, outsider) = lined_holder_with_outsider(&lock, false).await;
    b.release().await.unwrap();
    let released = Instant::now();
    let served = second.await.unwrap();
    assert!(
        served - released <= ms(1),
        "served {:?} after the release",
        served - released
    );
    outsider.abort();
}

/// Counts the holders of `k`: one more while alive.
struct Holding(Arc<AtomicUsize>);

impl Holding {
    fn enter(count: &Arc<AtomicUsize>) -> Self {
        let before = count.fetch_add(1, Ordering::SeqCst);
        assert_eq!(before, 0, "two holders of k at once");
        Self(Arc::clone(count))
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// Mutex line waiters, multi-key waiters on `[k, j]` and `[j, k]`, single tries and a `j`
/// holder, all with cancellations at random points, on a multi-thread runtime: never two
/// holders of `k`, every waiting client gets in, and the table empties afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_exclusion_with_the_outsiders_turn_under_cancellation() {
    let lock = MemoryLock::new();
    let holders = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for id in 0..9u64 {
        let (lock, holders, stop) = (lock.clone(), Arc::clone(&holders), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(id * 7919 + 1);
            let locker = client(lock, ms(5_000), every(ms(1 + id % 3)));
            let mut got = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let cancel_after = Duration::from_micros(rng.below(3_000));
                let hold = Duration::from_micros(rng.below(500));
                let attempt = async {
                    match id % 9 {
                        0..=3 => Some((locker.acquire("k").await.unwrap(), true)),
                        4 => Some((locker.acquire_many(&["k", "j"]).await.unwrap(), true)),
                        5 => Some((locker.acquire_many(&["j", "k"]).await.unwrap(), true)),
                        6 => locker.try_acquire("k").await.unwrap().map(|g| (g, true)),
                        _ => Some((locker.acquire("j").await.unwrap(), false)),
                    }
                };
                let taken = if rng.below(3) == 0 {
                    tokio::time::timeout(cancel_after, attempt)
                        .await
                        .ok()
                        .flatten()
                } else {
                    attempt.await
                };
                let Some((guard, on_k)) = taken else {
                    tokio::task::yield_now().await;
                    continue;
                };
                got += 1;
                let holding = on_k.then(|| Holding::enter(&holders));
                let section = tokio::time::sleep(hold);
                if rng.below(4) == 0 {
                    // Cancelled inside its section: the guard is dropped, not released.
                    let _ = tokio::time::timeout(hold / 2, section).await;
                    drop(holding);
                    drop(guard);
                } else {
                    section.await;
                    drop(holding);
                    guard.release().await.unwrap();
                }
            }
            got
        }));
    }
    tokio::time::sleep(ms(2_000)).await;
    stop.store(true, Ordering::SeqCst);
    for (id, task) in tasks.into_iter().enumerate() {
        let got = tokio::time::timeout(ms(5_000), task)
            .await
            .unwrap_or_else(|_| panic!("client {id} did not finish"))
            .unwrap();
        // A single try (client 6) never takes a key a line waits for: it may never get in.
        assert!(got > 0 || id == 6, "client {id} never got in");
    }
    let settled = Instant::now();
    while !lock.is_empty() && settled.elapsed() < ms(1_000) {
        tokio::time::sleep(ms(10)).await;
    }
    assert!(
        lock.is_empty(),
        "the table keeps {} entries ({} waited)",
        lock.len(),
        lock.waited_keys()
    );
}

/// A key released by a holder that was not in line (it took the key uncontended) is held back
/// for the waiter the release woke (HANDOFF_GRACE): here a multi-key waiter `[k, j]` that has
/// waited since before. A mutex newcomer that asks in that moment is refused, but the line it
/// starts should not outrank the woken waiter: the waiter that came first is served first.
#[tokio::test(start_paused = true)]
async fn a_newcomer_does_not_pass_the_waiter_a_release_woke() {
    let lock = MemoryLock::new();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let x = client(lock.clone(), ms(10_000), every(ms(1_000)));
    let held = x.acquire("k").await.unwrap();
    let o = client(lock.clone(), ms(10_000), every(ms(1_000)));
    let o_order = Arc::clone(&order);
    let outsider = tokio::spawn(async move {
        let guard = o.acquire_many(&["k", "j"]).await.unwrap();
        o_order.lock().unwrap().push("outsider");
        tokio::time::sleep(ms(5)).await;
        guard.release().await.unwrap();
    });
    tokio::time::sleep(ms(10)).await;
    held.release().await.unwrap();
    // The newcomer's first attempt runs now, before the woken waiter is polled.
    let n = client(lock.clone(), ms(10_000), every(ms(1_000)));
    let n_order = Arc::clone(&order);
    let mut newcomer = Box::pin(async move {
        let guard = n.acquire("k").await.unwrap();
        n_order.lock().unwrap().push("newcomer");
        tokio::time::sleep(ms(5)).await;
        guard.release().await.unwrap();
    });
    tokio::select! {
        biased;
        () = &mut newcomer => panic!("the newcomer took the key held back for the woken waiter"),
        () = std::future::ready(()) => {}
    }
    let newcomer = tokio::spawn(newcomer);
    outsider.await.unwrap();
    newcomer.await.unwrap();
    assert_eq!(*order.lock().unwrap(), ["outsider", "newcomer"]);
    assert!(lock.is_empty(), "the table is not empty");
}

/// A purge of a lined holder (its `LINED_HOLDER` mark left on the slot's generation) while
/// the line and an outsider wait: the first in line is served at once (a purge opens no
/// outsiders' turn), and the outsider right after it; the purged guard's release takes no one's
/// key, and the table empties.
#[tokio::test(start_paused = true)]
async fn a_purge_of_a_lined_holder_serves_the_line_then_the_outsider() {
    let lock = MemoryLock::new();
    let (b, second, outsider) = lined_holder_with_outsider(&lock, true).await;
    let purged = Instant::now();
    assert_eq!(lock.purge("").await.unwrap(), 1);
    let served = second.await.unwrap();
    assert!(
        served - purged <= ms(1),
        "served {:?} after the purge",
        served - purged
    );
    let guard = tokio::time::timeout(ms(5), outsider)
        .await
        .expect("the outsider was not served right after the line")
        .unwrap()
        .unwrap();
    assert!(
        b.release().await.is_err(),
        "the purged guard released a key"
    );
    assert_eq!(
        client(lock.clone(), ms(1_000), every(ms(1)))
            .inspect("k")
            .await
            .unwrap()
            .len(),
        1,
        "the outsider's lock on k is gone"
    );
    guard.release().await.unwrap();
    assert!(lock.is_empty(), "the table is not empty");
}

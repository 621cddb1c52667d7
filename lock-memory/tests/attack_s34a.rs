//! adv34a: the in-process lock and the core's `Locker` under hostile runtimes, clocks and
//! schedules: runtimes dropped under a kept-alive guard, holders that shorten their lease,
//! mixed runtimes on one store.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::{Locker, RetryPolicy};
use lock_memory::MemoryLock;

mod support;
use support::{every, ms};

/// A client of the store `lock`.
fn client(lock: &MemoryLock, ttl: Duration, retry: RetryPolicy) -> Locker {
    support::locker(lock, ttl, retry)
}

/// The tests of this file that keep a machine's two cores busy, or time what a busy machine
/// would delay, run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
    let _serial = SERIAL.blocking_lock();
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

/// As above, with the watchdog's runtime still there but run no more: a current-thread runtime
/// runs its tasks only inside `block_on`, and the guard was kept alive in one that returned.
/// The watchdog exists but never wakes; the lock lapses, and the signal must still fire (at
/// most a few milliseconds after the lapse, the time it leaves a watchdog that exists to say
/// so itself).
#[test]
#[ignore = "known limitation (LostSignal::lost): while the watchdog's task exists it alone reports the loss; a runtime nothing runs any more reports nothing (telling the lapse 10 ms after it fired falsely while an extend in flight across the lapse still succeeded, and a lost() re-made in a select! loop never fired: rev34)"]
fn a_kept_alive_guard_whose_watchdogs_runtime_is_not_run_is_reported_lost_when_it_lapses() {
    let _serial = SERIAL.blocking_lock();
    let lock = MemoryLock::new();
    let ttl = ms(150);
    let idle = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let (guard, lost) = idle.block_on(async {
        let mut guard = client(&lock, ttl, RetryPolicy::none())
            .acquire("k")
            .await
            .unwrap();
        let lost = guard.keep_alive().unwrap();
        (guard, lost)
    });
    let main = multi_thread();
    main.block_on(async {
        let heard = tokio::time::timeout(ms(1_000), lost.lost()).await.is_ok();
        let late = tokio::time::Instant::now().saturating_duration_since(guard.valid_until());
        assert!(
            heard && late < ms(100),
            "the kept-alive lock lapsed unextended and its lost signal said nothing \
             (heard: {heard}, {late:?} after the lapse)"
        );
    });
    drop(guard);
    drop(idle);
    assert!(
        lock.is_empty(),
        "the table keeps an entry once every guard is gone"
    );
}

/// lock-memory's README: "the first in line is woken alone when the key is released or
/// expires". A holder that shortens its lease (an extend by a shorter ttl, which the guard's
/// docs allow) and then lets it lapse: the first in line, which planned to look again at the
/// expiry the lease had when it lined up, must still be served when the key expires, not at
/// its next fallback poll (200 ms later here, on the paused clock; a 1 s ttl's poll).
#[tokio::test(start_paused = true)]
async fn the_first_in_line_is_served_when_a_shortened_lease_expires() {
    let lock = MemoryLock::new();
    let mut holder = client(&lock, ms(10_000), RetryPolicy::none())
        .acquire("k")
        .await
        .unwrap();
    let waiter = client(&lock, ms(10_000), every(ms(1_000)));
    let served = tokio::spawn(async move {
        let guard = waiter.acquire("k").await.unwrap();
        let at = tokio::time::Instant::now();
        drop(guard);
        at
    });
    tokio::time::sleep(ms(50)).await;
    holder.extend(ms(20)).await.unwrap();
    let expires = holder.valid_until();
    std::mem::forget(holder); // left to lapse
    let at = served.await.unwrap();
    let late = at.saturating_duration_since(expires);
    assert!(
        late <= ms(5),
        "the first in line took the key {late:?} after the shortened lease expired"
    );
}

/// The same for waiters outside the line ("other waiters (multi-key locks, semaphores,
/// read-write locks) are woken when a key is released or expires, instead of polling"): a
/// permit holder of a one-permit semaphore shortens its lease and lets it lapse; the waiting
/// permit is served when it expires, not a retry delay later.
#[tokio::test(start_paused = true)]
async fn a_semaphore_waiter_is_served_when_a_shortened_permit_expires() {
    let lock = MemoryLock::new();
    let mut holder = client(&lock, ms(10_000), RetryPolicy::none())
        .acquire_permit("s", 1)
        .await
        .unwrap();
    let waiter = client(&lock, ms(10_000), every(ms(1_000)));
    let served = tokio::spawn(async move {
        let guard = waiter.acquire_permit("s", 1).await.unwrap();
        let at = tokio::time::Instant::now();
        drop(guard);
        at
    });
    tokio::time::sleep(ms(50)).await;
    holder.extend(ms(20)).await.unwrap();
    let expires = holder.valid_until();
    std::mem::forget(holder);
    let at = served.await.unwrap();
    let late = at.saturating_duration_since(expires);
    assert!(
        late <= ms(5),
        "the waiting permit took the semaphore {late:?} after the shortened permit expired"
    );
}

/// "Waiting mutex acquisitions on one key line up: they are served in the order they first
/// found the key held, whatever their retry delays." Waiters with the shortest ttls the core
/// allows (1–5 ms), on a real clock: each renews its place every half ttl, on tokio's
/// millisecond timer, which fires up to two ticks late; nothing stalls, yet places lapse
/// between renewals and the waiters are served in any order (on main, 31 of 40 rounds out of
/// order, and still 1 in 10 with 5 ms). Five waiters line up 5 ms apart behind a holder of
/// 50 ms and must be served in the order they came, round after round. On one thread, each
/// waiter makes its first attempt before the next is spawned (whatever the machine's load).
#[tokio::test]
async fn waiters_with_the_shortest_ttls_keep_their_order() {
    let _serial = SERIAL.lock().await;
    let lock = MemoryLock::new();
    let mut bad = Vec::new();
    for round in 0..40u64 {
        let ttl = ms([1, 2, 3, 5][(round % 4) as usize]);
        let holder = client(&lock, ms(10_000), RetryPolicy::none())
            .acquire("k")
            .await
            .unwrap();
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for n in 0..5 {
            let waiter = client(&lock, ttl, every(ms(10)));
            let order = std::sync::Arc::clone(&order);
            waiters.push(tokio::spawn(async move {
                let guard = waiter.acquire("k").await.unwrap();
                order.lock().unwrap().push(n);
                drop(guard);
            }));
            tokio::task::yield_now().await;
            tokio::time::sleep(ms(5)).await;
        }
        tokio::time::sleep(ms(25)).await;
        drop(holder);
        for waiter in waiters {
            waiter.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        if order != vec![0, 1, 2, 3, 4] {
            bad.push((ttl, order));
        }
    }
    assert!(
        bad.is_empty(),
        "waiters with short ttls were served out of the order they lined up in: {bad:?}"
    );
    assert!(lock.is_empty());
}

/// One `MemoryLock` shared by a runtime on the real clock and a paused one (`start_paused`, as
/// `#[tokio::test(start_paused = true)]` builds; a table in a `static` shared by a test suite's
/// tests): the paused runtime's clock is its own (tokio's `Instant::now` reads the paused clock
/// inside it), so the store compares a lease taken on one clock with the time of the other. A
/// waiter on the paused runtime sleeps until the real holder's expiry, its clock jumps there at
/// once (auto-advance), and it takes the key the real holder still holds: mutual exclusion
/// does not hold across clocks.
#[test]
#[ignore = "known limitation (lock-memory README): one table serves runtimes on one clock; a paused runtime's clock is its own"]
fn a_paused_runtime_does_not_take_a_key_held_on_the_real_clock() {
    let lock = MemoryLock::new();
    let real = multi_thread();
    let holder = real
        .block_on(client(&lock, ms(60_000), RetryPolicy::none()).acquire("k"))
        .unwrap();
    let paused = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    let waiter = client(
        &lock,
        ms(60_000),
        every(ms(1_000)).with_deadline(Duration::from_secs(120)),
    );
    let taken = paused.block_on(waiter.acquire("k"));
    let overlap = taken.is_ok() && holder.is_valid();
    println!(
        "the paused waiter: {:?} after {:?} of real time",
        taken.as_ref().map(|_| "held"),
        started.elapsed()
    );
    drop(taken);
    drop(holder);
    assert!(
        !overlap,
        "a waiter on a paused runtime took `k` while the real runtime's holder held it"
    );
}

/// A small xorshift generator: seeded rounds without a dependency.
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        Self(u64::from(nanos) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Counts holders inside the section of `k`: more than one, while each still holds a valid
/// guard, is an overlap.
#[derive(Default)]
struct Section {
    inside: std::sync::atomic::AtomicUsize,
    overlaps: std::sync::atomic::AtomicUsize,
}

impl Section {
    async fn run(&self, guard: &lock_core::LockGuard, hold: Duration) {
        use std::sync::atomic::Ordering::SeqCst;
        // Left however the section ends: a runtime dropped mid-section drops it too (and the
        // guard right after, which releases).
        struct Inside<'a>(&'a Section);
        impl Drop for Inside<'_> {
            fn drop(&mut self) {
                self.0.inside.fetch_sub(1, SeqCst);
            }
        }
        if self.inside.fetch_add(1, SeqCst) > 0 && guard.is_valid() {
            self.overlaps.fetch_add(1, SeqCst);
        }
        let _inside = Inside(self);
        tokio::time::sleep(hold).await;
    }
}

/// Runtimes shut down under the line: doomed runtimes (current-thread and multi-thread) run
/// tasks that wait for `k` in its line, hold it (some with `keep_alive`), wait as multi-key
/// outsiders on `[k, j]`, or sit in a read of `r`, and each runtime is dropped at a random
/// moment while a surviving runtime's tasks keep taking `k`. The ttl is 3 s, so a place or a
/// lock a dropped runtime left behind would stall the survivors for seconds: they must each
/// finish their rounds within the time the holds take plus a margin far below the ttl, never
/// overlap, and leave the table empty.
///
/// Checked against broken variants: with `Inner::abandon` not taking the waiter out of the
/// line (`leave_line` skipped), the survivors stalled behind dropped waiters' places (3.2 s,
/// failing the time bound); with `Inner::take` ignoring a live holder once the clock moved
/// under the shard lock, the section counted 92 overlaps.
#[test]
fn runtimes_dropped_under_the_line_leave_nothing_behind() {
    let _serial = SERIAL.blocking_lock();
    use std::sync::Arc;
    use std::sync::atomic::Ordering::SeqCst;
    let mut rng = Rng::seeded();
    let seed = rng.0;
    let ttl = ms(3_000);
    for round in 0..6 {
        let lock = MemoryLock::new();
        let section = Arc::new(Section::default());
        let survivor = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        let started = std::time::Instant::now();
        let mut survivors = Vec::new();
        for _ in 0..3 {
            let (locker, section) = (client(&lock, ttl, every(ms(500))), Arc::clone(&section));
            survivors.push(survivor.spawn(async move {
                for _ in 0..20 {
                    let guard = locker.acquire("k").await.unwrap();
                    section.run(&guard, ms(2)).await;
                    drop(guard);
                }
            }));
        }
        for doomed in 0..4 {
            let runtime = if doomed % 2 == 0 {
                tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .unwrap()
            } else {
                multi_thread()
            };
            for task in 0..4 {
                let locker = client(&lock, ttl, every(ms(500)));
                let section = Arc::clone(&section);
                let hold = ms(1 + rng.below(4));
                let what = (task + doomed) % 4;
                runtime.spawn(async move {
                    loop {
                        match what {
                            0 => {
                                let guard = locker.acquire("k").await.unwrap();
                                section.run(&guard, hold).await;
                            }
                            1 => {
                                let mut guard = locker.acquire("k").await.unwrap();
                                let _lost = guard.keep_alive().unwrap();
                                section.run(&guard, hold).await;
                            }
                            2 => {
                                let guard = locker.acquire_many(&["k", "j"]).await.unwrap();
                                section.run(&guard, hold).await;
                            }
                            _ => {
                                let _read = locker.acquire_read("r").await.unwrap();
                                tokio::time::sleep(hold).await;
                            }
                        }
                    }
                });
            }
            // A current-thread runtime runs its tasks only while driven.
            let drive = ms(rng.below(15));
            runtime.block_on(async move { tokio::time::sleep(drive).await });
            drop(runtime);
        }
        survivor.block_on(async {
            for task in survivors {
                task.await.unwrap();
            }
        });
        let took = started.elapsed();
        drop(survivor);
        assert_eq!(
            section.overlaps.load(SeqCst),
            0,
            "two holders of `k` at once (seed {seed}, round {round})"
        );
        assert!(
            took < ms(2_000),
            "the survivors took {took:?} for 60 holds of 2 ms: something a dropped runtime left \
             stalled them (seed {seed}, round {round})"
        );
        assert!(
            lock.is_empty(),
            "{} entries left once every runtime is gone (seed {seed}, round {round})",
            lock.len()
        );
    }
}

/// Bounded waits: "an acquisition with a deadline returns by it". A hostile holder on another
/// thread shortens and lengthens its lease in a loop (every shortening wakes the first in
/// line to plan for the earlier expiry): the first in line, with a deadline of 100 ms, must
/// still give up by its deadline rather than loop on wake-ups. Checked against a broken
/// variant: with `wait_for_turn` giving up 500 ms past its time, the waiter returned after
/// 516 ms and the test failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_in_line_gives_up_by_its_deadline_under_a_storm_of_shortened_leases() {
    let _serial = SERIAL.lock().await;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    let lock = MemoryLock::new();
    let mut holder = client(&lock, ms(60_000), RetryPolicy::none())
        .acquire("k")
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let storm = std::thread::spawn({
        let stop = Arc::clone(&stop);
        move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            runtime.block_on(async {
                while !stop.load(SeqCst) {
                    holder.extend(ms(60_000)).await.unwrap();
                    holder.extend(ms(30_000)).await.unwrap();
                }
            });
            holder
        }
    });
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let waiter = client(&lock, ms(60_000), every(ms(10)).with_deadline(ms(100)));
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(ms(2_000), waiter.acquire("k")).await;
        let took = started.elapsed();
        worst = worst.max(took);
        assert!(
            matches!(outcome, Ok(Err(lock_core::LockError::Timeout { .. }))),
            "the waiter with a 100 ms deadline did not give up by it: {:?} after {took:?}",
            outcome.map(|result| result.map(|_| "held"))
        );
    }
    stop.store(true, SeqCst);
    drop(storm.join().unwrap());
    assert!(
        worst < ms(300),
        "a waiter with a 100 ms deadline returned after {worst:?}"
    );
    assert!(lock.is_empty());
}

/// Thousands of waiters on one key keep first come, first served: 3 000 waiters (each with its
/// own retry delay, from 1 ms to 3 s) line up one by one behind a holder, which releases; each
/// holds the key for a millisecond. They must be served in the order they came, each exactly
/// once, and leave the table empty. On the paused clock: the line's bookkeeping, not the
/// machine, is under test. Checked against a broken variant: with newcomers put at the front
/// of the line, the last came first and the test failed.
#[tokio::test(start_paused = true)]
async fn three_thousand_waiters_are_served_in_the_order_they_came() {
    use std::sync::{Arc, Mutex};
    let lock = MemoryLock::new();
    let holder = client(&lock, ms(60_000), RetryPolicy::none())
        .acquire("k")
        .await
        .unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut rng = Rng::seeded();
    let mut waiters = Vec::new();
    for n in 0..3_000u32 {
        let waiter = client(&lock, ms(60_000), every(ms(1 + rng.below(3_000))));
        let order = Arc::clone(&order);
        waiters.push(tokio::spawn(async move {
            let guard = waiter.acquire("k").await.unwrap();
            order.lock().unwrap().push(n);
            tokio::time::sleep(ms(1)).await;
            drop(guard);
        }));
        // Each finds the key held before the next comes.
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(ms(10)).await;
    drop(holder);
    for waiter in waiters {
        waiter.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    let first_out_of_order = order
        .iter()
        .enumerate()
        .find(|(at, n)| **n as usize != *at)
        .map(|(at, n)| (at, *n));
    assert_eq!(
        first_out_of_order, None,
        "served out of order (position, waiter)"
    );
    assert_eq!(order.len(), 3_000);
    assert!(lock.is_empty());
}

/// The paused clock with auto-advance, where every wait ends at once in real time and the
/// clock jumps from one timer to the next: a `with_lock` section sleeps for an hour, kept alive
/// by its watchdog (ttl 10 s: 540 extends); waiters in line with a deadline of ten minutes give
/// up exactly by it (as `Timeout`), one with two hours is served right after the section, the
/// section's lost signal never fires, and the table empties. Checked against a broken
/// variant: with the memory handle's extend leaving the store's expiry where it was, a waiter
/// took the key from the section and the test failed.
#[tokio::test(start_paused = true)]
async fn on_the_paused_clock_an_hour_long_section_keeps_its_lock_and_deadlines_hold() {
    use tokio::time::Instant;
    let lock = MemoryLock::new();
    let holder = client(&lock, ms(10_000), RetryPolicy::none());
    let (entered_tx, entered) = tokio::sync::oneshot::channel();
    let section = tokio::spawn(async move {
        holder
            .with_lock("k", |info| async move {
                entered_tx.send(()).unwrap();
                tokio::select! {
                    () = info.lost.lost() => panic!("the kept-alive lock was lost"),
                    () = tokio::time::sleep(Duration::from_secs(3_600)) => {}
                }
                Instant::now()
            })
            .await
            .unwrap()
    });
    entered.await.unwrap();
    let mut short = Vec::new();
    for n in 0..4u64 {
        let waiter = client(
            &lock,
            ms(10_000),
            every(ms(250 * (n + 1))).with_deadline(Duration::from_secs(600)),
        );
        short.push(tokio::spawn(async move {
            let started = Instant::now();
            let outcome = waiter.acquire("k").await.map(|_| ());
            (outcome, started.elapsed())
        }));
    }
    let patient = client(
        &lock,
        ms(10_000),
        every(ms(5_000)).with_deadline(Duration::from_secs(7_200)),
    );
    let patient = tokio::spawn(async move {
        let guard = patient.acquire("k").await.unwrap();
        (Instant::now(), guard.fencing_token())
    });
    for waiter in short {
        let (outcome, waited) = waiter.await.unwrap();
        assert!(
            matches!(outcome, Err(lock_core::LockError::Timeout { .. })),
            "a waiter took `k` from the kept-alive section, or failed: {outcome:?}"
        );
        assert!(
            waited >= Duration::from_secs(600) && waited <= Duration::from_secs(600) + ms(1),
            "a waiter with a 600 s deadline gave up after {waited:?}"
        );
    }
    let ended = section.await.unwrap();
    let (served, _) = patient.await.unwrap();
    assert!(
        served >= ended && served - ended <= ms(5),
        "the patient waiter was served {:?} after the section ended",
        served.saturating_duration_since(ended)
    );
    assert!(lock.is_empty());
}

/// Who holds which key, as the holders themselves see it: each entry is the holder's lease
/// (kept alive, so its validity is the shared cell every extend moves, the watchdog's and the
/// holder's own, a shortening one capped before it is sent).
#[derive(Default)]
struct Registry {
    held: std::sync::Mutex<std::collections::HashMap<String, (u64, lock_core::Lease)>>,
    last_fence: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    entered: std::sync::atomic::AtomicUsize,
    overlaps: std::sync::atomic::AtomicUsize,
    inversions: std::sync::atomic::AtomicUsize,
}

impl Registry {
    fn enter(&self, lease: &lock_core::Lease) {
        use std::sync::atomic::Ordering::SeqCst;
        let fence = lease.fencing_token().unwrap();
        self.entered.fetch_add(1, SeqCst);
        let mut held = self.held.lock().unwrap();
        let mut last = self.last_fence.lock().unwrap();
        for key in lease.keys() {
            let key = key.to_string();
            if let Some((_, other)) = held.get(&key)
                && other.is_valid()
            {
                self.overlaps.fetch_add(1, SeqCst);
            }
            let before = last.insert(key.clone(), fence).unwrap_or(0);
            if fence <= before {
                self.inversions.fetch_add(1, SeqCst);
            }
            held.insert(key, (fence, lease.clone()));
        }
    }

    fn leave(&self, lease: &lock_core::Lease) {
        let fence = lease.fencing_token().unwrap();
        let mut held = self.held.lock().unwrap();
        for key in lease.keys() {
            if held.get(key.as_str()).is_some_and(|(f, _)| *f == fence) {
                held.remove(key.as_str());
            }
        }
    }
}

/// Everything at once, on two runtimes (a multi-thread one and a current-thread one on its own
/// thread) sharing one table: mutexes in the line of `a` or `b`, multi-key locks on both, ttls
/// of 5–60 ms, sections of 0–20 ms (some outliving the ttl unextended, some kept alive), extends
/// by hand that shorten or lengthen the lease, acquisitions cancelled by timeouts at random
/// moments, and deadlines. Checked: no key is entered while another holder's lease on it is
/// still valid, fencing tokens increase per key in the order the holders entered, every
/// acquisition with a deadline returns within 150 ms of it, and the table is empty at the end.
///
/// Checked against broken variants: with `Inner::take` ignoring a live holder once the clock
/// moved under the shard lock, overlaps were counted; with the handle's extend leaving the
/// store's expiry where it was, overlaps were counted (holders entered under a lease the
/// watchdog had extended).
#[test]
fn everything_at_once_on_two_runtimes_keeps_exclusion_fences_and_deadlines() {
    let _serial = SERIAL.blocking_lock();
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    let lock = MemoryLock::new();
    let registry = Arc::new(Registry::default());
    let late = Arc::new(AtomicUsize::new(0));
    let worst_late = Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let seed = Rng::seeded().0;
    let run = {
        let (lock, registry, late, worst_late) = (
            lock.clone(),
            Arc::clone(&registry),
            Arc::clone(&late),
            Arc::clone(&worst_late),
        );
        move |runtime_seed: u64, tasks: u64| {
            let (lock, registry, late, worst_late) = (
                lock.clone(),
                Arc::clone(&registry),
                Arc::clone(&late),
                Arc::clone(&worst_late),
            );
            async move {
                let mut handles = Vec::new();
                for task in 0..tasks {
                    let (lock, registry, late, worst_late) = (
                        lock.clone(),
                        Arc::clone(&registry),
                        Arc::clone(&late),
                        Arc::clone(&worst_late),
                    );
                    let mut rng =
                        Rng(runtime_seed ^ (task + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
                    handles.push(tokio::spawn(async move {
                        let started = std::time::Instant::now();
                        while started.elapsed() < ms(4_000) {
                            let ttl = ms(5 + rng.below(56));
                            let deadline = (rng.below(3) == 0).then(|| ms(1 + rng.below(40)));
                            let mut retry = every(ms(1 + rng.below(10)));
                            if let Some(deadline) = deadline {
                                retry = retry.with_deadline(deadline);
                            }
                            let locker = client(&lock, ttl, retry);
                            let keys: &[&str] = match rng.below(5) {
                                0 => &["a", "b"],
                                1 | 2 => &["a"],
                                _ => &["b"],
                            };
                            let cancel_after = ms(rng.below(60));
                            let asked = std::time::Instant::now();
                            let acquired = tokio::time::timeout(cancel_after, async {
                                if keys.len() == 1 {
                                    locker.acquire(keys[0]).await
                                } else {
                                    locker.acquire_many(keys).await
                                }
                            })
                            .await;
                            if let Some(deadline) = deadline {
                                let took = asked.elapsed();
                                if took > deadline + ms(150) {
                                    late.fetch_add(1, SeqCst);
                                    let mut worst = worst_late.lock().unwrap();
                                    *worst = (*worst).max(took - deadline);
                                }
                            }
                            let Ok(Ok(mut guard)) = acquired else {
                                continue;
                            };
                            let kept_alive = rng.below(2) == 0;
                            let _lost = guard.keep_alive().unwrap();
                            let lease = guard.lease().clone();
                            registry.enter(&lease);
                            let hold = ms(rng.below(21));
                            if kept_alive {
                                tokio::time::sleep(hold).await;
                            } else {
                                // Not kept alive in spirit: the watchdog runs, but the holder
                                // moves the lease by hand too, shorter or longer.
                                let by = ms(1 + rng.below(60));
                                let _ = guard.extend(by).await;
                                tokio::time::sleep(hold).await;
                            }
                            registry.leave(&lease);
                            drop(guard);
                        }
                    }));
                }
                for handle in handles {
                    handle.await.unwrap();
                }
            }
        }
    };
    let other = std::thread::spawn({
        let run = run.clone();
        move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap()
                .block_on(run(seed.rotate_left(17), 4));
        }
    });
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap()
        .block_on(run(seed, 8));
    other.join().unwrap();
    let entered = registry.entered.load(SeqCst);
    println!("{entered} sections entered (seed {seed})");
    assert!(entered > 200, "only {entered} sections entered");
    assert_eq!(
        registry.overlaps.load(SeqCst),
        0,
        "a key entered while another holder's lease on it was valid (seed {seed})"
    );
    assert_eq!(
        registry.inversions.load(SeqCst),
        0,
        "fencing tokens went backwards on a key (seed {seed})"
    );
    assert_eq!(
        late.load(SeqCst),
        0,
        "acquisitions returned up to {:?} after their deadline (seed {seed})",
        *worst_late.lock().unwrap()
    );
    assert!(lock.is_empty(), "{} entries left (seed {seed})", lock.len());
}

/// Keys at the edges of their representation (inline up to 23 bytes, shared beyond; the 1 024
/// byte limit) and with odd bytes: a key made by a namespace (`ns` + `:` + key) and the same
/// text given whole to a client without namespace are one key in the table, whichever form
/// either took, so each keeps the other out; a key that differs by a trailing NUL, a
/// non-ASCII character or a byte of length is another key; purge by the namespace's prefix
/// reaches exactly the namespaced keys; the table empties. Checked against a broken variant:
/// with `Namespace::key` always building the shared form, `ns` + `k` was taken while `ns:k`
/// (inline) was held, and the test failed.
#[tokio::test]
async fn keys_at_the_edges_of_their_forms_are_one_key_whoever_builds_them() {
    let lock = MemoryLock::new();
    let plain = client(&lock, ms(60_000), RetryPolicy::none());
    let spaced = client(&lock, ms(60_000), RetryPolicy::none())
        .with_namespace(Some("ns"))
        .unwrap();
    let odd = ["", "\0", "\u{1F512}", "\u{7F}", "é", "ns:", "*", "\u{FEFF}"];
    let mut lengths: Vec<usize> = (1..=30).collect();
    lengths.extend(1_015..=1_021);
    for len in lengths {
        for tail in odd {
            let body = "k".repeat(len.saturating_sub(tail.len()).max(1));
            let key = format!("{body}{tail}");
            let whole = format!("ns:{key}");
            if whole.len() > lock_core::MAX_KEY_LEN {
                assert!(
                    spaced.try_acquire(&key).await.is_err(),
                    "{} bytes",
                    whole.len()
                );
                continue;
            }
            let held = plain.try_acquire(&whole).await.unwrap().unwrap();
            assert!(
                spaced.try_acquire(&key).await.unwrap().is_none(),
                "`ns` + `{key:?}` was taken while `{whole:?}` was held"
            );
            // Neighbours are other keys.
            let mut neighbours = vec![format!("{key}\0"), format!("{key}k")];
            let mut shorter = key.clone();
            shorter.pop();
            if !shorter.is_empty() {
                neighbours.push(shorter);
            }
            for neighbour in &neighbours {
                let other = spaced.try_acquire(neighbour).await;
                if let Ok(other) = other {
                    assert!(other.is_some(), "`ns` + `{neighbour:?}` was refused");
                }
            }
            drop(held);
            let held = spaced.try_acquire(&key).await.unwrap().unwrap();
            assert!(
                plain.try_acquire(&whole).await.unwrap().is_none(),
                "`{whole:?}` was taken while `ns` + `{key:?}` was held"
            );
            let other = plain.try_acquire(&key).await.unwrap().unwrap();
            assert_eq!(plain.purge("ns:").await.unwrap(), 1, "{whole:?}");
            assert!(other.release().await.is_ok(), "the purge reached `{key:?}`");
            drop(held);
        }
    }
    assert!(lock.is_empty(), "{} entries left", lock.len());
}

/// Release, the head's wake-up, its cancellation, its client's `stop` and a purge, racing on a
/// multi-thread runtime in random order and timing: the waiters still waiting behind (ttl and
/// retry delays of 10 s, so only wake-ups serve them in time) must all be served within
/// 300 ms (a purge may free the key under one of them: exclusion is not checked here), the
/// stopped head must end with `Stopped` (or hold the key, had it won
/// first), and the table must be empty once they are done.
///
/// Checked against a broken variant: with `Inner::leave_line` not waking the next in line when
/// the first leaves a free key, the waiters behind a cancelled head waited for their 10 s
/// delays and the test failed on its bound (in round 70 of that run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_wake_cancel_stop_and_purge_race_and_the_line_still_moves() {
    let _serial = SERIAL.lock().await;
    let mut rng = Rng::seeded();
    let seed = rng.0;
    for round in 0..300 {
        let lock = MemoryLock::new();
        let long = every(ms(10_000));
        let holder = client(&lock, ms(10_000), RetryPolicy::none())
            .acquire("k")
            .await
            .unwrap();
        let head_client = client(&lock, ms(10_000), long.clone());
        let head = tokio::spawn({
            let head_client = head_client.clone();
            async move { head_client.acquire("k").await.map(drop) }
        });
        tokio::time::sleep(ms(1)).await;
        let mut behind = Vec::new();
        for _ in 0..3 {
            let locker = client(&lock, ms(10_000), long.clone());
            behind.push(tokio::spawn(async move {
                let guard = locker.acquire("k").await.unwrap();
                tokio::time::sleep(ms(1)).await;
                drop(guard);
            }));
            tokio::time::sleep(ms(1)).await;
        }
        // The four moves, each after a random pause of 0–2 ms, on tasks of their own.
        let purger = client(&lock, ms(10_000), RetryPolicy::none());
        let moves: Vec<tokio::task::JoinHandle<()>> = vec![
            tokio::spawn({
                let pause = rng.below(3);
                async move {
                    tokio::time::sleep(ms(pause)).await;
                    drop(holder);
                }
            }),
            tokio::spawn({
                let (pause, head) = (rng.below(3), head.abort_handle());
                async move {
                    tokio::time::sleep(ms(pause)).await;
                    if pause % 2 == 0 {
                        head.abort();
                    }
                }
            }),
            tokio::spawn({
                let pause = rng.below(3);
                async move {
                    tokio::time::sleep(ms(pause)).await;
                    head_client.stop().await.unwrap();
                }
            }),
            tokio::spawn({
                let pause = rng.below(3);
                async move {
                    tokio::time::sleep(ms(pause)).await;
                    purger.purge("k").await.unwrap();
                }
            }),
        ];
        let started = std::time::Instant::now();
        for one in moves {
            one.await.unwrap();
        }
        match head.await {
            Err(aborted) => assert!(aborted.is_cancelled()),
            Ok(outcome) => assert!(
                matches!(outcome, Ok(()) | Err(lock_core::LockError::Stopped)),
                "the stopped head: {outcome:?} (seed {seed}, round {round})"
            ),
        }
        for waiter in behind {
            tokio::time::timeout(ms(300).saturating_sub(started.elapsed()), waiter)
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "a waiter behind was not served within 300 ms (seed {seed}, round {round})"
                    )
                })
                .unwrap();
        }
        assert!(
            lock.is_empty(),
            "{} entries left (seed {seed}, round {round})",
            lock.len()
        );
    }
}

/// Thousands of keys in one multi-key lock, with the shortest ttl: taking 3 000 keys one by one
/// outlasts a 1 ms ttl, so memory lets the lock go rather than hand out a guard born expired
/// (as the core does with an answer that came back too late). The core says of that case:
/// "said as the error a single try or an exhausted wait returns ..., never 'held by another
/// holder'" ("raise the ttl"). Nobody holds any of these keys: a single try must not answer
/// `Locked` ("a single-attempt policy found the key held"), and a wait must not end in a bare
/// `Timeout` that blames contention; the table is empty afterwards.
#[tokio::test]
async fn a_multi_key_lock_outlasting_its_ttl_is_not_reported_held_by_another() {
    let lock = MemoryLock::new();
    let names: Vec<String> = (0..3_000).map(|n| format!("many:{n}")).collect();
    let keys: Vec<&str> = names.iter().map(String::as_str).collect();
    let single = client(&lock, ms(1), RetryPolicy::none());
    let mut outcomes = Vec::new();
    for _ in 0..5 {
        match single.acquire_many(&keys).await {
            Ok(guard) => drop(guard),
            Err(error) => outcomes.push(error),
        }
    }
    assert!(
        !outcomes.is_empty(),
        "3 000 keys were taken within 1 ms five times: nothing to check on this machine"
    );
    for error in &outcomes {
        assert!(
            !matches!(error, lock_core::LockError::Locked { .. }),
            "free keys reported held by another holder: {error}"
        );
    }
    let waiting = client(&lock, ms(1), every(ms(1)).with_deadline(ms(100)));
    match waiting.acquire_many(&keys).await {
        Ok(guard) => drop(guard),
        Err(error) => assert!(
            !matches!(error, lock_core::LockError::Timeout { .. }),
            "free keys reported as a wait that timed out on contention: {error}"
        ),
    }
    assert!(lock.is_empty(), "{} entries left", lock.len());
}

/// "While a line waits, a single try, a reader or a newcomer does not take the free key."
/// Single tries hammer `k` from another thread while its holder releases to the first in line,
/// at a random moment: no single try may win before the waiter in line has had the key.
///
/// Checked against a broken variant: with `Inner::take` letting an attempt that names no waiter
/// and follows no wait past a line when the key is free, tries won ahead of the line.
#[test]
fn single_tries_racing_a_hand_off_never_pass_the_line() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    let _serial = SERIAL.blocking_lock();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let mut rng = Rng::seeded();
    let seed = rng.0;
    let passed = Arc::new(AtomicUsize::new(0));
    runtime.block_on(async {
        for _ in 0..300 {
            let lock = MemoryLock::new();
            let holder = client(&lock, ms(10_000), RetryPolicy::none())
                .acquire("k")
                .await
                .unwrap();
            let served = Arc::new(AtomicBool::new(false));
            let waiter = tokio::spawn({
                let (locker, served) = (
                    client(&lock, ms(10_000), every(ms(10_000))),
                    Arc::clone(&served),
                );
                async move {
                    let guard = locker.acquire("k").await.unwrap();
                    served.store(true, SeqCst);
                    drop(guard);
                }
            });
            // The waiter is in line before the tries begin (a millisecond's sleep was not
            // always enough under load: with no line yet, the tries took the key rightly).
            while lock.waited_keys() == 0 {
                tokio::time::sleep(ms(1)).await;
            }
            let tries = tokio::spawn({
                let (locker, served, passed) = (
                    client(&lock, ms(10_000), RetryPolicy::none()),
                    Arc::clone(&served),
                    Arc::clone(&passed),
                );
                async move {
                    while !served.load(SeqCst) {
                        if let Some(guard) = locker.try_acquire("k").await.unwrap()
                            && !served.load(SeqCst)
                        {
                            passed.fetch_add(1, SeqCst);
                            drop(guard);
                        }
                        tokio::task::yield_now().await;
                    }
                }
            });
            let pause = rng.below(200);
            tokio::time::sleep(Duration::from_micros(pause)).await;
            drop(holder);
            waiter.await.unwrap();
            tries.await.unwrap();
            assert!(lock.is_empty());
        }
    });
    assert_eq!(
        passed.load(SeqCst),
        0,
        "single tries took `k` ahead of the waiter in line (seed {seed})"
    );
}

/// "`stop` ... given up to `CLEANUP_WAIT` to finish first": fair waiters whose futures were
/// polled once and leaked (forgotten, never dropped: their places in line, claims the stop
/// waits for, are never taken back) cannot hold `stop` beyond `CLEANUP_WAIT`; a waiter of the
/// same client still polled ends with `Stopped` at once, and the line moves on for another
/// client's waiter as soon as the leaked places lapse (one ttl after their only attempt).
/// Checked against a broken variant: with places lasting two ttls, the other client's waiter
/// was served 8 s late and the test failed.
#[tokio::test(start_paused = true)]
async fn leaked_fair_waiters_hold_stop_no_longer_than_cleanup_wait() {
    use tokio::time::Instant;
    let lock = MemoryLock::new();
    let ttl = ms(8_000);
    let holder = client(&lock, ms(60_000), RetryPolicy::none())
        .acquire("k")
        .await
        .unwrap();
    let stopped = client(&lock, ttl, every(ms(1_000)));
    let waker = std::task::Waker::noop();
    let mut last_attempt = Instant::now();
    for _ in 0..3 {
        let mut leaked = Box::pin(stopped.acquire("k"));
        assert!(
            leaked
                .as_mut()
                .poll(&mut std::task::Context::from_waker(waker))
                .is_pending()
        );
        last_attempt = Instant::now();
        std::mem::forget(leaked);
        tokio::time::sleep(ms(1)).await;
    }
    let polled = tokio::spawn({
        let stopped = stopped.clone();
        async move { stopped.acquire("k").await.map(drop) }
    });
    let other = tokio::spawn({
        let locker = client(&lock, ttl, every(ms(1_000)));
        async move {
            let guard = locker.acquire("k").await.unwrap();
            let at = Instant::now();
            drop(guard);
            at
        }
    });
    tokio::time::sleep(ms(10)).await;
    let asked = Instant::now();
    stopped.stop().await.unwrap();
    let took = asked.elapsed();
    assert!(
        took <= lock_core::CLEANUP_WAIT + ms(1),
        "stop took {took:?} (CLEANUP_WAIT is {:?})",
        lock_core::CLEANUP_WAIT
    );
    assert!(matches!(
        polled.await.unwrap(),
        Err(lock_core::LockError::Stopped)
    ));
    drop(holder);
    let served = other.await.unwrap();
    let lapse = last_attempt + ttl;
    assert!(
        served <= lapse + ms(5),
        "the other client's waiter was served {:?} after the leaked places lapsed",
        served.saturating_duration_since(lapse)
    );
}

/// "A waiting writer ... new readers are kept out, so a stream of readers cannot starve it."
/// The writer's claim lasts its attempt's ttl and is renewed every half ttl: with the shortest
/// ttls (1–5 ms) on tokio's millisecond timer, a claim may lapse between renewals, as the
/// line's places did. Three readers overlap without pause (each holds 5 ms with a long ttl);
/// a writer with a ttl of 1–3 ms must get in within 100 ms (the readers drain in 5 ms), round
/// after round. On main, writers with a 1 ms ttl waited 100 ms to 1.3 s in every run.
#[test]
fn a_writer_with_the_shortest_ttl_is_not_starved_by_a_stream_of_readers() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    let _serial = SERIAL.blocking_lock();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut starved = Vec::new();
        for round in 0..24u64 {
            let ttl = ms([1, 1, 2, 3][(round % 4) as usize]);
            let lock = MemoryLock::new();
            let done = Arc::new(AtomicBool::new(false));
            let mut readers = Vec::new();
            for _ in 0..3 {
                let (locker, done) = (client(&lock, ms(1_000), every(ms(1))), Arc::clone(&done));
                readers.push(tokio::spawn(async move {
                    while !done.load(SeqCst) {
                        let read = locker.acquire_read("rw").await.unwrap();
                        tokio::time::sleep(ms(5)).await;
                        drop(read);
                    }
                }));
                tokio::time::sleep(ms(2)).await;
            }
            let writer = client(&lock, ttl, every(ms(1)).with_deadline(ms(2_000)));
            let started = std::time::Instant::now();
            let outcome = writer.acquire_write("rw").await;
            let took = started.elapsed();
            done.store(true, SeqCst);
            let outcome = outcome.map(drop);
            if outcome.is_err() || took > ms(100) {
                starved.push((ttl, took, outcome.err()));
            }
            for reader in readers {
                reader.await.unwrap();
            }
        }
        assert!(
            starved.is_empty(),
            "writers with short ttls waited behind a stream of readers: {starved:?}"
        );
    });
}

/// The wake-ups a shortened lease sends must not cost a waiter outside the line its wake-up on
/// release: a permit holder shortens its lease twice (each time waking the waiting permit to
/// plan for the earlier expiry, an early wake-up that finds the semaphore still full), then
/// releases; the waiting permit (retry delay 1 s) must be served at the release.
#[tokio::test(start_paused = true)]
async fn a_waiter_woken_by_shortened_leases_is_still_woken_by_the_release() {
    let lock = MemoryLock::new();
    let mut holder = client(&lock, ms(10_000), RetryPolicy::none())
        .acquire_permit("s", 1)
        .await
        .unwrap();
    let waiter = client(&lock, ms(10_000), every(ms(1_000)));
    let served = tokio::spawn(async move {
        let guard = waiter.acquire_permit("s", 1).await.unwrap();
        let at = tokio::time::Instant::now();
        drop(guard);
        at
    });
    tokio::time::sleep(ms(10)).await;
    holder.extend(ms(9_000)).await.unwrap();
    tokio::time::sleep(ms(10)).await;
    holder.extend(ms(8_000)).await.unwrap();
    tokio::time::sleep(ms(10)).await;
    holder.extend(ms(7_000)).await.unwrap();
    tokio::time::sleep(ms(20)).await;
    let released = tokio::time::Instant::now();
    holder.release().await.unwrap();
    let at = served.await.unwrap();
    let late = at.saturating_duration_since(released);
    assert!(
        late <= ms(5),
        "the waiting permit was served {late:?} after the release"
    );
    assert!(lock.is_empty());
}

/// "Other waiters (multi-key locks, semaphores, read-write locks) are woken when a key is
/// released or expires, instead of polling." Five permits wait for a semaphore of one permit
/// (retry delay 1 s) whose holders pass it on every 10 ms: each release wakes them all and one
/// wins, so the others count early wake-ups; none of them may fall back to sleeping its whole
/// delay and miss the releases that follow. All five must be served within 100 ms.
#[tokio::test(start_paused = true)]
async fn permit_waiters_woken_in_vain_are_still_woken_by_the_next_releases() {
    use tokio::time::Instant;
    let lock = MemoryLock::new();
    let holder = client(&lock, ms(10_000), RetryPolicy::none())
        .acquire_permit("s", 1)
        .await
        .unwrap();
    let mut waiters = Vec::new();
    for _ in 0..5 {
        let waiter = client(&lock, ms(10_000), every(ms(1_000)));
        waiters.push(tokio::spawn(async move {
            let guard = waiter.acquire_permit("s", 1).await.unwrap();
            tokio::time::sleep(ms(10)).await;
            drop(guard);
            Instant::now()
        }));
        tokio::time::sleep(ms(1)).await;
    }
    let released = Instant::now();
    drop(holder);
    let mut last = released;
    for waiter in waiters {
        last = last.max(waiter.await.unwrap());
    }
    let took = last - released;
    assert!(
        took <= ms(100),
        "five holds of 10 ms took {took:?}: waiters slept through releases"
    );
    assert!(lock.is_empty());
}

/// The same for a writer behind readers: three readers leave one by one, 10 ms apart; each
/// release wakes the waiting writer (retry delay 1 s), which finds readers still in, until the
/// last leaves. The writer must get in when the last reader leaves, not a delay later.
#[tokio::test(start_paused = true)]
async fn a_writer_woken_by_each_reader_leaving_gets_in_when_the_last_leaves() {
    use tokio::time::Instant;
    let lock = MemoryLock::new();
    let readers = client(&lock, ms(10_000), RetryPolicy::none());
    let mut reads = Vec::new();
    for _ in 0..3 {
        reads.push(readers.acquire_read("rw").await.unwrap());
    }
    let writer = client(&lock, ms(10_000), every(ms(1_000)));
    let served = tokio::spawn(async move {
        let guard = writer.acquire_write("rw").await.unwrap();
        let at = Instant::now();
        drop(guard);
        at
    });
    tokio::time::sleep(ms(5)).await;
    for read in reads {
        tokio::time::sleep(ms(10)).await;
        drop(read);
    }
    let last_left = Instant::now();
    let at = served.await.unwrap();
    let late = at.saturating_duration_since(last_left);
    assert!(
        late <= ms(5),
        "the writer got in {late:?} after the last reader left"
    );
    assert!(lock.is_empty());
}

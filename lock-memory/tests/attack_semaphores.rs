//! Adversarial tests of semaphores and read-write locks on the memory backend: a hostile user,
//! scheduler and clock (tokio's paused time) against the invariants the core documents.
#![allow(clippy::unwrap_used)]

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lock_core::{
    Holding, LeaseKind, LockError, LockGuard, LockOptions, Locker, RetryCount, RetryPolicy,
};
use lock_memory::MemoryLock;
use tokio::time::Instant;

mod support;
use support::{every, locker, ms};

async fn try_read(locker: &Locker, key: &str) -> Option<LockGuard> {
    locker.try_acquire_kind(key, LeaseKind::Read).await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// Claims left behind by a writer that stopped waiting
// ---------------------------------------------------------------------------------------------

/// A writer that has given up (its `acquire_write` returned `Timeout`) no longer waits, so it
/// must not keep readers out: the very next reader gets in. On a current-thread runtime the
/// claim is taken back by a spawned task that has not run yet when the caller tries.
#[tokio::test(start_paused = true)]
async fn a_writer_that_gave_up_lets_the_next_reader_in_at_once() {
    let lock = MemoryLock::new();
    let readers = locker(&lock, Duration::from_secs(60), every(ms(10)));
    let first = readers.acquire_read("k").await.unwrap();
    let writer = locker(
        &lock,
        Duration::from_secs(60),
        every(ms(10)).with_retry_count(RetryCount::Limited(2)),
    );
    let error = writer.acquire_write("k").await.unwrap_err();
    assert!(matches!(error, LockError::Timeout { .. }), "{error:?}");
    let second = try_read(&readers, "k").await;
    assert!(
        second.is_some(),
        "a writer that gave up still keeps readers out (its claim outlives its wait)"
    );
    second.unwrap().release().await.unwrap();
    first.release().await.unwrap();
    assert!(lock.is_empty(), "{} slot(s) left", lock.len());
}

/// A writer whose `acquire_write` future is dropped outside a runtime (the runtime shut down
/// first) takes its claim back at once, as a guard dropped outside a runtime releases at once;
/// otherwise readers are kept out for the writer's whole ttl.
#[test]
fn a_writer_dropped_outside_a_runtime_takes_its_claim_back() {
    let lock = MemoryLock::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let readers = locker(&lock, Duration::from_secs(600), every(ms(10)));
    let first = runtime.block_on(readers.acquire_read("k")).unwrap();
    let writer = locker(&lock, Duration::from_secs(600), every(ms(10)));
    let mut waiting = Box::pin(writer.acquire_write("k"));
    runtime.block_on(async {
        tokio::select! {
            biased;
            result = &mut waiting => panic!("the writer got in beside a reader: {result:?}"),
            () = tokio::time::sleep(ms(50)) => {}
        }
    });
    drop(runtime);
    drop(waiting);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let second = runtime.block_on(try_read(&readers, "k"));
    assert!(
        second.is_some(),
        "the claim of a writer dropped outside a runtime keeps readers out for its ttl"
    );
    runtime.block_on(async {
        second.unwrap().release().await.unwrap();
        first.release().await.unwrap();
    });
    assert!(lock.is_empty(), "{} slot(s) left", lock.len());
}

/// "While it waits, new readers are kept out": also when the writer's ttl is shorter than its
/// retry delay (the claim lives for the ttl, the writer sleeps for the delay).
#[tokio::test(start_paused = true)]
async fn a_waiting_writer_keeps_readers_out_for_its_whole_wait() {
    let lock = MemoryLock::new();
    let readers = locker(&lock, Duration::from_secs(600), RetryPolicy::none());
    let first = readers.acquire_read("k").await.unwrap();
    let writer = locker(&lock, ms(100), every(Duration::from_secs(1)));
    let waiting = tokio::spawn(async move { writer.acquire_write("k").await });
    tokio::task::yield_now().await;
    let mut admitted = Vec::new();
    for step in 0..300u64 {
        tokio::time::advance(ms(10)).await;
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "the writer got in beside a reader");
        if let Some(guard) = try_read(&readers, "k").await {
            admitted.push(step * 10 + 10);
            guard.release().await.unwrap();
        }
    }
    waiting.abort();
    first.release().await.unwrap();
    assert!(
        admitted.is_empty(),
        "new readers got in while a writer waited, at (ms): {:?}",
        &admitted[..admitted.len().min(8)]
    );
}

/// A waiting writer's retries keep the policy's delays: its own claim lapsing is not a reason
/// to spend a retry early (2 retries 1 s apart wait about 2 s, not twice the ttl).
#[tokio::test(start_paused = true)]
async fn a_waiting_writer_keeps_its_policy_s_delays() {
    let lock = MemoryLock::new();
    let readers = locker(&lock, Duration::from_secs(600), RetryPolicy::none());
    let first = readers.acquire_read("k").await.unwrap();
    let writer = locker(
        &lock,
        ms(100),
        every(Duration::from_secs(1)).with_retry_count(RetryCount::Limited(2)),
    );
    match writer.acquire_write("k").await {
        Err(LockError::Timeout { waited, .. }) => assert!(
            waited >= Duration::from_secs(2),
            "gave up after {waited:?}, before its 2 retries 1 s apart"
        ),
        other => panic!("expected a timeout, got {other:?}"),
    }
    first.release().await.unwrap();
    assert!(lock.is_empty());
}

/// Two writers wait; the second gives up. The first still waits, so new readers must stay out.
/// The store keeps one claim (the latest writer's); taking it back wakes the first writer,
/// which claims again before the reader runs.
#[tokio::test(start_paused = true)]
async fn a_second_writer_giving_up_does_not_let_readers_past_the_first() {
    let lock = MemoryLock::new();
    let readers = locker(&lock, Duration::from_secs(600), RetryPolicy::none());
    let first = readers.acquire_read("k").await.unwrap();
    let w1 = locker(
        &lock,
        Duration::from_secs(600),
        every(Duration::from_secs(5)),
    );
    let waiting = tokio::spawn(async move { w1.acquire_write("k").await });
    tokio::time::sleep(ms(10)).await;
    let w2 = locker(
        &lock,
        Duration::from_secs(600),
        every(Duration::from_secs(5)),
    );
    let second = tokio::spawn(async move { w2.acquire_write("k").await });
    tokio::time::sleep(ms(10)).await;
    second.abort();
    assert!(second.await.unwrap_err().is_cancelled());
    assert!(!waiting.is_finished());
    let reader = try_read(&readers, "k").await;
    assert!(reader.is_none(), "a reader got in while a writer waited");
    waiting.abort();
    first.release().await.unwrap();
}

/// A reader that waits behind a claim is woken when the claim is taken back, not only when its
/// own backoff runs out.
#[tokio::test(start_paused = true)]
async fn a_reader_behind_a_claim_is_woken_when_the_claim_goes() {
    let lock = MemoryLock::new();
    let readers = locker(
        &lock,
        Duration::from_secs(600),
        every(Duration::from_secs(300)),
    );
    let first = readers.acquire_read("k").await.unwrap();
    let writer = locker(&lock, Duration::from_secs(600), every(ms(10)));
    let waiting = tokio::spawn(async move { writer.acquire_write("k").await });
    tokio::time::sleep(ms(50)).await;
    let reader = readers.clone();
    let started = Instant::now();
    let second = tokio::spawn(async move { reader.acquire_read("k").await.unwrap() });
    tokio::time::sleep(ms(50)).await;
    assert!(!second.is_finished(), "a reader got in past the claim");
    waiting.abort();
    let second = second.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(300),
        "the reader slept through its backoff: {:?}",
        started.elapsed()
    );
    second.release().await.unwrap();
    first.release().await.unwrap();
    tokio::time::sleep(ms(10)).await;
    assert!(lock.is_empty(), "{} slot(s) left", lock.len());
}

/// `inspect` on a key that only a waiting writer's claim keeps: held, and for how long (the
/// claim expires), not "no expiry set".
#[tokio::test(start_paused = true)]
async fn inspect_of_a_claimed_key_reports_when_the_claim_ends() {
    let lock = MemoryLock::new();
    let readers = locker(&lock, Duration::from_secs(60), every(ms(10)));
    let first = readers.acquire_read("k").await.unwrap();
    let writer = locker(
        &lock,
        Duration::from_secs(60),
        every(Duration::from_secs(30)),
    );
    let waiting = tokio::spawn(async move { writer.acquire_write("k").await });
    tokio::time::sleep(ms(10)).await;
    first.release().await.unwrap();
    // The writer is in its backoff; only its claim is on the key.
    let states = readers.inspect("k").await.unwrap();
    assert!(
        matches!(states[0].holding, Holding::Held { ttl: Some(_) }),
        "{:?}",
        states[0].holding
    );
    waiting.abort();
}

// ---------------------------------------------------------------------------------------------
// Permits
// ---------------------------------------------------------------------------------------------

/// `LeaseKind::Permit` can be built by hand (its field is public): the limit that
/// `LeaseKind::permit` enforces must hold for every call that takes a kind.
#[tokio::test]
async fn permits_above_the_limit_are_refused_however_the_kind_is_built() {
    let lock = MemoryLock::new();
    let locker = locker(&lock, Duration::from_secs(10), every(ms(10)));
    let kind = LeaseKind::Permit {
        permits: NonZeroU32::MAX,
    };
    assert!(matches!(
        LeaseKind::permit(u32::MAX),
        Err(LockError::InvalidInput { .. })
    ));
    assert!(matches!(
        LeaseKind::permit(0),
        Err(LockError::InvalidInput { .. })
    ));
    let options = LockOptions::default();
    let acquired = locker.acquire_kind("k", kind, &options).await;
    assert!(
        matches!(acquired, Err(LockError::InvalidInput { .. })),
        "acquire_kind accepted {kind}: {acquired:?}"
    );
    let tried = locker.try_acquire_kind("k", kind).await;
    assert!(
        matches!(tried, Err(LockError::InvalidInput { .. })),
        "try_acquire_kind accepted {kind}: {tried:?}"
    );
    let leased = locker.with_lease("k", kind, |_| async {}).await;
    assert!(
        matches!(leased, Err(LockError::InvalidInput { .. })),
        "with_lease accepted {kind}: {leased:?}"
    );
    assert!(lock.is_empty());
}

/// The limit itself is accepted, and the largest semaphore works.
#[tokio::test]
async fn the_largest_semaphore_admits_many() {
    let lock = MemoryLock::new();
    let locker = locker(&lock, Duration::from_secs(10), RetryPolicy::none());
    let mut guards = Vec::new();
    for _ in 0..1000 {
        guards.push(
            locker
                .acquire_permit("k", lock_core::raw::validate::MAX_PERMITS)
                .await
                .unwrap(),
        );
    }
    for guard in guards {
        guard.release().await.unwrap();
    }
    assert!(lock.is_empty());
}

/// Never more than N live holders of a semaphore of N, with holders that expire (short ttl,
/// long critical sections), extend, release, get dropped, and waiters that get cancelled; checked
/// from the holders' own validity intervals.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_semaphore_never_over_admits_under_churn() {
    const PERMITS: u32 = 2;
    let lock = MemoryLock::new();
    let locker = locker(&lock, ms(4), every(Duration::ZERO));
    let log = Arc::new(std::sync::Mutex::new(Vec::<(Instant, Instant)>::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..12u64 {
        let (locker, log) = (locker.clone(), log.clone());
        tasks.spawn(async move {
            for round in 0..150u64 {
                let mix = (task * 7 + round * 13) % 10;
                let acquire = locker.acquire_permit("sem", PERMITS);
                let Ok(Ok(mut guard)) = tokio::time::timeout(ms(1 + mix % 3), acquire).await else {
                    continue;
                };
                let from = Instant::now();
                match mix {
                    0..=2 => tokio::time::sleep(ms(6)).await, // expires
                    3..=4 => {
                        let _ = guard.extend(ms(3)).await;
                        tokio::task::yield_now().await;
                    }
                    _ => tokio::task::yield_now().await,
                }
                let until = guard.valid_until().min(Instant::now());
                if from < until {
                    log.lock().unwrap().push((from, until));
                }
                if mix % 2 == 0 {
                    drop(guard);
                } else {
                    let _ = guard.release().await;
                }
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
    }
    let log = std::mem::take(&mut *log.lock().unwrap());
    let mut events: Vec<(Instant, i32)> = log
        .iter()
        .flat_map(|(from, until)| [(*from, 1), (*until, -1)])
        .collect();
    // Ends before starts at the same instant: touching intervals do not overlap.
    events.sort_by_key(|(at, delta)| (*at, *delta));
    let (mut live, mut most) = (0i32, 0i32);
    for (_, delta) in events {
        live += delta;
        most = most.max(live);
    }
    assert!(log.len() > 100, "too few holds to judge: {}", log.len());
    assert!(
        most <= PERMITS as i32,
        "{most} holders of a semaphore of {PERMITS}"
    );
    tokio::time::sleep(ms(20)).await;
    // Expired entries stay until swept or touched; touching the key reclaims it.
    drop(
        locker
            .try_acquire_kind("sem", LeaseKind::permit(PERMITS).unwrap())
            .await,
    );
    assert!(lock.is_empty(), "{} slot(s) left", lock.len());
}

/// A semaphore release wakes a waiting permit at once.
#[tokio::test(start_paused = true)]
async fn a_permit_release_wakes_a_waiter() {
    let lock = MemoryLock::new();
    let holders = locker(&lock, Duration::from_secs(600), RetryPolicy::none());
    let a = holders.acquire_permit("k", 2).await.unwrap();
    let b = holders.acquire_permit("k", 2).await.unwrap();
    let waiter = locker(
        &lock,
        Duration::from_secs(600),
        every(Duration::from_secs(300)),
    );
    let started = Instant::now();
    let waiting = tokio::spawn(async move { waiter.acquire_permit("k", 2).await.unwrap() });
    tokio::time::sleep(ms(10)).await;
    assert!(!waiting.is_finished());
    a.release().await.unwrap();
    let c = waiting.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(300));
    c.release().await.unwrap();
    b.release().await.unwrap();
    assert!(lock.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Kinds on one key, fencing
// ---------------------------------------------------------------------------------------------

/// Every pair of kinds on one key: while one holds, the other is refused or finds the key held;
/// never both.
#[tokio::test]
async fn a_key_switching_kinds_never_has_two_kinds_of_holders() {
    let kinds = [
        LeaseKind::Exclusive,
        LeaseKind::permit(1).unwrap(),
        LeaseKind::permit(3).unwrap(),
        LeaseKind::Read,
        LeaseKind::Write,
    ];
    let lock = MemoryLock::new();
    let locker = locker(&lock, Duration::from_secs(10), RetryPolicy::none());
    let mut last_fence = 0;
    for first in kinds {
        for second in kinds {
            let held = locker.try_acquire_kind("k", first).await.unwrap().unwrap();
            let fence = held.fencing_token().unwrap();
            assert!(fence > last_fence, "fence {fence} after {last_fence}");
            last_fence = fence;
            let other = locker.try_acquire_kind("k", second).await;
            let compatible = first == second && first.holders() > 1;
            match other {
                Ok(Some(guard)) => {
                    assert!(compatible, "{second} admitted beside {first}");
                    let fence = guard.fencing_token().unwrap();
                    assert!(fence > last_fence);
                    last_fence = fence;
                    guard.release().await.unwrap();
                }
                Ok(None) => assert!(!compatible, "{second} refused beside {first}"),
                Err(LockError::KindMismatch { .. }) => assert_ne!(first, second),
                Err(error) => panic!("{second} beside {first}: {error:?}"),
            }
            held.release().await.unwrap();
            assert!(lock.is_empty(), "{first} then {second} left a slot");
        }
    }
}

/// The same across expiry: a holder of one kind expires, another kind takes the key, and the
/// expired holder can neither extend, downgrade nor release the new one's lease.
#[tokio::test(start_paused = true)]
async fn an_expired_holder_of_another_kind_is_powerless() {
    let lock = MemoryLock::new();
    let locker = locker(&lock, ms(100), RetryPolicy::none());
    let mut old = locker.acquire_write("k").await.unwrap();
    tokio::time::advance(ms(101)).await;
    let new = locker.acquire_permit("k", 1).await.unwrap();
    assert!(matches!(
        old.extend(ms(100)).await,
        Err(LockError::NotHeld { .. })
    ));
    assert!(matches!(
        old.downgrade().await,
        Err(LockError::NotHeld { .. })
    ));
    assert!(matches!(
        old.release().await,
        Err(LockError::NotHeld { .. })
    ));
    let full = locker
        .try_acquire_kind("k", LeaseKind::permit(1).unwrap())
        .await
        .unwrap();
    assert!(
        full.is_none(),
        "the expired writer's release freed the new permit"
    );
    new.release().await.unwrap();
    assert!(lock.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Downgrade
// ---------------------------------------------------------------------------------------------

/// Downgrade under a running watchdog: the lease stays alive as a read lock past many ttls,
/// readers join, writers stay out; twice is refused; after release nothing is left.
#[tokio::test(start_paused = true)]
async fn downgrade_of_a_watched_guard_keeps_a_live_read_lock() {
    let lock = MemoryLock::new();
    let locker = locker(&lock, ms(300), RetryPolicy::none());
    let mut guard = locker.acquire_write("k").await.unwrap();
    let lost = guard.keep_alive().unwrap();
    guard.downgrade().await.unwrap();
    assert_eq!(guard.kind(), LeaseKind::Read);
    assert!(matches!(
        guard.downgrade().await,
        Err(LockError::InvalidInput { .. })
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!lost.is_lost(), "the watchdog lost a downgraded lock");
    assert!(guard.is_valid());
    let reader = try_read(&locker, "k").await.expect("readers join");
    assert!(
        locker
            .try_acquire_kind("k", LeaseKind::Write)
            .await
            .unwrap()
            .is_none()
    );
    reader.release().await.unwrap();
    guard.release().await.unwrap();
    assert!(lock.is_empty());
}

/// Downgrade of an expired write lock: not held, and no reader is created by it.
#[tokio::test(start_paused = true)]
async fn downgrade_of_an_expired_write_lock_is_refused() {
    let lock = MemoryLock::new();
    let locker = locker(&lock, ms(100), RetryPolicy::none());
    let mut guard = locker.acquire_write("k").await.unwrap();
    tokio::time::advance(ms(150)).await;
    assert!(matches!(
        guard.downgrade().await,
        Err(LockError::NotHeld { .. })
    ));
    let writer = locker
        .try_acquire_kind("k", LeaseKind::Write)
        .await
        .unwrap();
    assert!(writer.is_some(), "an expired writer still holds the key");
    writer.unwrap().release().await.unwrap();
    drop(guard);
    assert!(lock.is_empty());
}

/// A write lock that a waiting writer has claimed: after a downgrade the claim still keeps new
/// readers out, and the waiting writer gets in once the downgraded reader leaves.
#[tokio::test(start_paused = true)]
async fn downgrade_does_not_let_readers_past_a_waiting_writer() {
    let lock = MemoryLock::new();
    let locker = locker(&lock, Duration::from_secs(60), every(ms(10)));
    let mut guard = locker.acquire_write("k").await.unwrap();
    let writer = locker.clone();
    let waiting = tokio::spawn(async move { writer.acquire_write("k").await.unwrap() });
    tokio::time::sleep(ms(50)).await;
    guard.downgrade().await.unwrap();
    assert!(
        try_read(&locker, "k").await.is_none(),
        "reader jumped a writer"
    );
    guard.release().await.unwrap();
    let next = waiting.await.unwrap();
    next.release().await.unwrap();
    assert!(lock.is_empty());
}

// ---------------------------------------------------------------------------------------------
// with_lease, purge, leaks
// ---------------------------------------------------------------------------------------------

/// A lease lost during `with_lease` (purged and taken by a writer) is reported as lost, and the
/// purge wakes nobody into two holders.
#[tokio::test(start_paused = true)]
async fn with_lease_reports_a_lost_read_lock() {
    let lock = MemoryLock::new();
    let locker = locker(&lock, Duration::from_secs(10), every(ms(10)));
    let inner = locker.clone();
    let result = locker
        .with_lease("k", LeaseKind::Read, |info| async move {
            assert_eq!(info.kind(), LeaseKind::Read);
            assert_eq!(inner.purge("").await.unwrap(), 1);
            let writer = inner.try_acquire_kind("k", LeaseKind::Write).await.unwrap();
            assert!(writer.is_some());
            tokio::time::sleep(Duration::from_secs(30)).await;
            assert!(info.lost.is_lost());
            drop(writer);
        })
        .await;
    assert!(
        matches!(result, Err(LockError::NotHeld { .. })),
        "{result:?}"
    );
    assert!(lock.is_empty());
}

/// Everything released, cancelled or taken back: the table returns to empty, with no sweep.
#[tokio::test(start_paused = true)]
async fn the_table_empties_after_every_kind_of_use() {
    let lock = MemoryLock::new();
    let locker = locker(&lock, Duration::from_secs(60), every(ms(5)));
    let cancelled_waits = Arc::new(AtomicUsize::new(0));
    for round in 0..50usize {
        let key = format!("k{}", round % 5);
        let r1 = locker.acquire_read(&key).await.unwrap();
        let mut tasks = Vec::new();
        // A writer that is cancelled, a reader behind its claim, a permit ask that mismatches.
        let writer = locker.clone();
        let k = key.clone();
        tasks.push(tokio::spawn(async move {
            drop(writer.acquire_write(&k).await);
        }));
        let reader = locker.clone();
        let k = key.clone();
        tasks.push(tokio::spawn(async move {
            drop(reader.acquire_read(&k).await);
        }));
        tokio::time::sleep(ms(20)).await;
        assert!(matches!(
            locker
                .try_acquire_kind(&key, LeaseKind::permit(2).unwrap())
                .await,
            Err(LockError::KindMismatch { .. })
        ));
        for task in &tasks {
            task.abort();
            cancelled_waits.fetch_add(1, Ordering::SeqCst);
        }
        r1.release().await.unwrap();
        let mut w = locker.acquire_write(&key).await.unwrap();
        w.downgrade().await.unwrap();
        w.release().await.unwrap();
        let p = locker.acquire_permit(&key, 3).await.unwrap();
        drop(p);
    }
    tokio::time::sleep(ms(10)).await;
    assert_eq!(lock.waited_keys(), 0);
    assert!(lock.is_empty(), "{} slot(s) left", lock.len());
}

/// A waiter woken by a release and cancelled before it runs: its slot goes once nobody holds or
/// waits, not only at the next sweep. Semaphores wake every waiter on each release, so this is
/// their common case.
#[tokio::test(start_paused = true)]
async fn a_permit_waiter_cancelled_after_a_release_leaves_no_slot() {
    let lock = MemoryLock::new();
    let locker = locker(&lock, Duration::from_secs(60), every(ms(500)));
    let holder = locker.acquire_permit("k", 1).await.unwrap();
    let waiter = locker.clone();
    let waiting = tokio::spawn(async move { drop(waiter.acquire_permit("k", 1).await) });
    tokio::time::sleep(ms(10)).await;
    holder.release().await.unwrap();
    waiting.abort();
    assert!(waiting.await.unwrap_err().is_cancelled());
    assert_eq!(lock.waited_keys(), 0);
    assert!(lock.is_empty(), "{} slot(s) left", lock.len());
}

/// The same for a mutex (the released key is held back for the woken waiter, which vanished).
#[tokio::test(start_paused = true)]
async fn a_mutex_waiter_cancelled_after_a_release_leaves_no_slot() {
    let lock = MemoryLock::new();
    let locker = locker(&lock, Duration::from_secs(60), every(ms(500)));
    let holder = locker.acquire("k").await.unwrap();
    let waiter = locker.clone();
    let waiting = tokio::spawn(async move { drop(waiter.acquire("k").await) });
    tokio::time::sleep(ms(10)).await;
    holder.release().await.unwrap();
    waiting.abort();
    assert!(waiting.await.unwrap_err().is_cancelled());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(lock.is_empty(), "{} slot(s) left", lock.len());
}

// ---------------------------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------------------------

fn assert_house_style(message: &str) {
    assert!(
        message.chars().next().is_some_and(|c| !c.is_uppercase()),
        "starts upper case: {message}"
    );
    assert!(!message.ends_with('.'), "ends with a period: {message}");
    assert!(!message.contains("``"), "an empty key: {message}");
}

#[tokio::test]
async fn the_new_errors_read_well() {
    let lock = MemoryLock::new();
    let locker = locker(&lock, Duration::from_secs(10), RetryPolicy::none());
    let held = locker.acquire_permit("k", 3).await.unwrap();
    let token = held.token().to_string();
    let mut messages = vec![
        LeaseKind::permit(0).unwrap_err().to_string(),
        LeaseKind::permit(u32::MAX).unwrap_err().to_string(),
        locker.acquire_permit("k", 2).await.unwrap_err().to_string(),
        locker.acquire_read("k").await.unwrap_err().to_string(),
        locker.acquire("k").await.unwrap_err().to_string(),
    ];
    let mut mutex = locker.acquire("m").await.unwrap();
    messages.push(mutex.downgrade().await.unwrap_err().to_string());
    for message in &messages {
        assert_house_style(message);
        assert!(!message.contains(&token), "a token in: {message}");
    }
    mutex.release().await.unwrap();
    held.release().await.unwrap();
}

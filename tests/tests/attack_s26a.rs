//! adv26a: hostile tests of the INCR lock's grant (6328bad): with `fair: true`, a release that
//! finds waiters in line takes the lock for the head (owner `lock-turn-reserved:<member>`,
//! expiring with the head's entry), draws its fencing token and names both in its message; the
//! head holds it without a round trip when its latest attempt named that expiry, else its
//! attempt takes the lock over. Real redis-server processes on 127.0.0.1; every client is a
//! backend instance of its own (a process of its own, as far as the server can tell).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use lock_core::raw::{KeySet, Lock, LockRequest};
use lock_core::{LockError, Locker, RetryPolicy, Token};
use lock_inc::{IncConfig, IncLock};
use lock_tests::fair::{Store, Target, connect, waiting};
use lock_tests::history::{FencedResource, Intervals};
use lock_tests::proxy::LatencyProxy;
use redis::aio::MultiplexedConnection;
use tokio::time::{Instant, sleep};

const RESERVED: &str = "lock-turn-reserved:";

use lock_tests::inc_kit::{
    counter_key, get, granted, inc_backend, inc_locker, line, line_key, ms, next, nothing_left,
    owner_key, pttl, until_in_line,
};

// ---------------------------------------------------------------------------------------------
// Validity and fencing order
// ---------------------------------------------------------------------------------------------

/// For every lock handed out under contention (ttl 120 ms, four clients), the counter's and
/// the owner's PTTL, each counted from when it was answered, put the lock's expiry on the
/// server after the guard's `valid_until` (1 ms allowed for PTTL's truncation); the fencing tokens, in the order the
/// holders got the lock, strictly increase. Granted locks must be among them (not vacuous).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_granted_validity_ends_before_the_lock_lapses_and_fences_increase() {
    let Some(target) = Target::start(Store::Inc, "adv26a").await else {
        return;
    };
    let key = "margin";
    let url = target.url.clone();
    let worst = Arc::new(std::sync::Mutex::new((i64::MAX, i64::MAX)));
    let grants = Arc::new(AtomicU64::new(0));
    let fences = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let locker = inc_locker(&url, true, ms(120), waiting(ms(5))).await;
        let mut connection = connect(&url).await;
        let (worst, grants, fences) =
            (Arc::clone(&worst), Arc::clone(&grants), Arc::clone(&fences));
        tasks.push(tokio::spawn(async move {
            for _ in 0..40 {
                let guard = locker.acquire(key).await.unwrap();
                let acquired = Instant::now();
                // Each PTTL is counted from when its answer came (an upper bound of the expiry
                // it reports: counted from `acquired`, a loaded machine's delay before the
                // server read it made a lock look short by milliseconds).
                let counter = pttl(&mut connection, &counter_key(key)).await;
                let counter_read = Instant::now();
                let owner = pttl(&mut connection, &owner_key(key)).await;
                let owner_read = Instant::now();
                let lapses = (counter_read + ms(u64::try_from(counter.max(0)).unwrap()))
                    .min(owner_read + ms(u64::try_from(owner.max(0)).unwrap()));
                #[allow(clippy::cast_possible_truncation)]
                let margin = if lapses >= guard.valid_until() {
                    (lapses - guard.valid_until()).as_micros() as i64
                } else {
                    -((guard.valid_until() - lapses).as_micros() as i64)
                };
                {
                    let mut worst = worst.lock().unwrap();
                    if granted(&guard) {
                        grants.fetch_add(1, Ordering::Relaxed);
                        worst.0 = worst.0.min(margin);
                    } else {
                        worst.1 = worst.1.min(margin);
                    }
                }
                fences
                    .lock()
                    .unwrap()
                    .push((acquired, guard.fencing_token().unwrap()));
                guard.release().await.unwrap();
            }
            locker.stop().await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let (granted_worst, asked_worst) = *worst.lock().unwrap();
    println!(
        "{} grants; worst margin {granted_worst} µs (granted), {asked_worst} µs (asked)",
        grants.load(Ordering::Relaxed)
    );
    assert!(granted_worst > -1_000, "{granted_worst} µs");
    assert!(asked_worst > -1_000, "{asked_worst} µs");
    assert!(grants.load(Ordering::Relaxed) > 20, "vacuous");
    let mut fences = fences.lock().unwrap().clone();
    fences.sort();
    for pair in fences.windows(2) {
        assert!(pair[0].1 < pair[1].1, "fences out of order: {pair:?}");
    }
    let left = nothing_left(&target, key, ms(1_000)).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[derive(Default)]
struct Tally {
    sections: AtomicU64,
    grants: AtomicU64,
    cancelled: AtomicU64,
    died: AtomicU64,
    stale: AtomicU64,
}

/// Fair and non-fair inc clients on one key, ttl 80 ms: holders that die holding, acquisitions
/// cut by `tokio::time::timeout` at every point (0–12 ms), and a `SCRIPT FLUSH` every 30 ms.
/// Within their validity no two holders overlap, and each holder's fencing token is above
/// every one written before it.
async fn mixed_hammer(
    target: &Target,
    key: &'static str,
    run: Duration,
    per_locker: u64,
) -> (Tally, usize) {
    let tally = Arc::new(Tally::default());
    let intervals = Arc::new(Intervals::default());
    let resource = Arc::new(FencedResource::default());
    let stop = Arc::new(AtomicUsize::new(0));
    let mut flush_connection = connect(&target.servers[0].url()).await;
    let flush_stop = Arc::clone(&stop);
    let flusher = tokio::spawn(async move {
        while flush_stop.load(Ordering::Relaxed) == 0 {
            let _: Result<(), _> = redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query_async(&mut flush_connection)
                .await;
            sleep(ms(30)).await;
        }
    });
    let mut tasks = Vec::new();
    let mut lockers = Vec::new();
    for client in 0..8u64 {
        // Two in eight are not fair (they skip the line, as documented), the rest are.
        let fair = client % 4 != 3;
        if client % per_locker == 0 || !fair {
            lockers.push(Arc::new(
                inc_locker(&target.url, fair, ms(80), waiting(ms(3))).await,
            ));
        }
        let locker = Arc::clone(lockers.last().unwrap());
        let (tally, intervals, resource) = (
            Arc::clone(&tally),
            Arc::clone(&intervals),
            Arc::clone(&resource),
        );
        tasks.push(tokio::spawn(async move {
            let mut seed = 0x9E37_79B9_7F4A_7C15 ^ ((client + 1) * 7919);
            let end = Instant::now() + run;
            while Instant::now() < end {
                let cut = next(&mut seed).is_multiple_of(5);
                let guard = if cut {
                    let limit = ms(next(&mut seed) % 13);
                    match tokio::time::timeout(limit, locker.acquire(key)).await {
                        Ok(guard) => guard.unwrap(),
                        Err(_) => {
                            tally.cancelled.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                } else {
                    locker.acquire(key).await.unwrap()
                };
                let acquired = Instant::now();
                if granted(&guard) {
                    tally.grants.fetch_add(1, Ordering::Relaxed);
                }
                if guard.is_valid() && !resource.write(guard.fencing_token().unwrap()) {
                    tally.stale.fetch_add(1, Ordering::Relaxed);
                }
                let hold = [0, 0, 1, 4, 10][(next(&mut seed) % 5) as usize];
                if hold > 0 {
                    sleep(ms(hold)).await;
                } else {
                    tokio::task::yield_now().await;
                }
                tally.sections.fetch_add(1, Ordering::Relaxed);
                intervals.record(acquired, Instant::now().min(guard.valid_until()));
                if next(&mut seed).is_multiple_of(10) {
                    tally.died.fetch_add(1, Ordering::Relaxed);
                    std::mem::forget(guard);
                } else {
                    let _ = guard.release().await;
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    stop.store(1, Ordering::Relaxed);
    flusher.await.unwrap();
    for locker in lockers {
        locker.stop().await.unwrap();
    }
    let tally = Arc::try_unwrap(tally).ok().unwrap();
    tally
        .stale
        .fetch_add(resource.stale_writes(), Ordering::Relaxed);
    (tally, intervals.overlaps())
}

/// The mixed hammer on one server: no overlap, no stale fence, grants held (not vacuous),
/// nothing left once everyone stopped (the dead holders' locks lapse within their ttl).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_mixed_hammer_tiny_ttl_cancels_deaths_and_script_flushes() {
    let Some(target) = Target::start(Store::Inc, "adv26a").await else {
        return;
    };
    let key = "mixed";
    let (tally, overlaps) = mixed_hammer(&target, key, Duration::from_secs(5), 1).await;
    println!(
        "{} sections, {} grants, {} cancelled, {} died, {} stale fences, {overlaps} overlaps",
        tally.sections.load(Ordering::Relaxed),
        tally.grants.load(Ordering::Relaxed),
        tally.cancelled.load(Ordering::Relaxed),
        tally.died.load(Ordering::Relaxed),
        tally.stale.load(Ordering::Relaxed),
    );
    assert_eq!(overlaps, 0, "two holders");
    assert_eq!(tally.stale.load(Ordering::Relaxed), 0, "a fence went back");
    assert!(tally.grants.load(Ordering::Relaxed) > 0, "vacuous");
    let left = nothing_left(&target, key, ms(1_500)).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The same on a Redis Cluster of three primaries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_cluster_mixed_hammer_never_overlaps() {
    let Some(target) = Target::start(Store::IncCluster, "adv26a").await else {
        return;
    };
    let key = "mixed-cluster";
    let (tally, overlaps) = mixed_hammer(&target, key, Duration::from_secs(4), 1).await;
    println!(
        "cluster: {} sections, {} grants, {} cancelled, {} died, {} stale fences, {overlaps} overlaps",
        tally.sections.load(Ordering::Relaxed),
        tally.grants.load(Ordering::Relaxed),
        tally.cancelled.load(Ordering::Relaxed),
        tally.died.load(Ordering::Relaxed),
        tally.stale.load(Ordering::Relaxed),
    );
    assert_eq!(overlaps, 0, "two holders");
    assert_eq!(tally.stale.load(Ordering::Relaxed), 0, "a fence went back");
    assert!(tally.grants.load(Ordering::Relaxed) > 0, "vacuous");
}

/// The mixed hammer with fair tasks sharing clients (three tasks per fair client: its
/// in-process queue and one turn registry for several waiters of one key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_mixed_hammer_with_tasks_sharing_clients_never_overlaps() {
    let Some(target) = Target::start(Store::Inc, "adv26a").await else {
        return;
    };
    let key = "mixed-shared";
    let (tally, overlaps) = mixed_hammer(&target, key, Duration::from_secs(4), 3).await;
    println!(
        "shared: {} sections, {} grants, {} cancelled, {} died, {} stale fences, {overlaps} overlaps",
        tally.sections.load(Ordering::Relaxed),
        tally.grants.load(Ordering::Relaxed),
        tally.cancelled.load(Ordering::Relaxed),
        tally.died.load(Ordering::Relaxed),
        tally.stale.load(Ordering::Relaxed),
    );
    assert_eq!(overlaps, 0, "two holders");
    assert_eq!(tally.stale.load(Ordering::Relaxed), 0, "a fence went back");
    assert!(tally.grants.load(Ordering::Relaxed) > 0, "vacuous");
    let left = nothing_left(&target, key, ms(1_500)).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The server restarts empty (no persistence) in the middle of a fair hammer (ttl 300 ms):
/// holders and heads with grants lose them (a documented hazard: exclusion is not checked
/// across the restart); every client keeps being served after the restart (each is served
/// again more than 500 ms after it), grants resume, and nothing is left once everyone
/// stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_a_restart_under_grants_serves_everyone_again_and_leaves_nothing() {
    let Some(mut target) = Target::start(Store::Inc, "adv26a").await else {
        return;
    };
    let key = "restarted";
    let last_served: Arc<Vec<AtomicU64>> = Arc::new((0..4).map(|_| AtomicU64::new(0)).collect());
    let grants = Arc::new(AtomicU64::new(0));
    let begin = Instant::now();
    let mut tasks = Vec::new();
    let mut lockers = Vec::new();
    for client in 0..4usize {
        let locker = Arc::new(inc_locker(&target.url, true, ms(300), waiting(ms(5))).await);
        lockers.push(Arc::clone(&locker));
        let (last_served, grants) = (Arc::clone(&last_served), Arc::clone(&grants));
        tasks.push(tokio::spawn(async move {
            while begin.elapsed() < ms(4_000) {
                let Ok(Ok(guard)) = tokio::time::timeout(ms(1_000), locker.acquire(key)).await
                else {
                    continue;
                };
                if granted(&guard) {
                    grants.fetch_add(1, Ordering::Relaxed);
                }
                last_served[client].store(
                    u64::try_from(begin.elapsed().as_millis()).unwrap(),
                    Ordering::Relaxed,
                );
                sleep(ms(3)).await;
                let _ = guard.release().await;
            }
        }));
    }
    sleep(ms(1_200)).await;
    target.servers[0].restart().unwrap();
    let restarted = u64::try_from(begin.elapsed().as_millis()).unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    for locker in lockers {
        locker.stop().await.unwrap();
    }
    let served: Vec<u64> = last_served
        .iter()
        .map(|at| at.load(Ordering::Relaxed))
        .collect();
    println!(
        "restarted at {restarted} ms; last served (ms) {served:?}; {} grants",
        grants.load(Ordering::Relaxed)
    );
    for (client, at) in served.iter().enumerate() {
        assert!(
            *at > restarted + 500,
            "client {client} last served at {at} ms (restart at {restarted} ms)"
        );
    }
    assert!(grants.load(Ordering::Relaxed) > 0, "vacuous");
    let left = nothing_left(&target, key, ms(1_500)).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}

// ---------------------------------------------------------------------------------------------
// Cancelled, paused, deaf and stalled heads
// ---------------------------------------------------------------------------------------------

/// A waiter's acquisition aborted from 0 to 2 ms after the release that gives it the lock
/// (before or after it read the message, or with the guard already out): nothing of it is
/// left, and the waiter in line behind it is served within a second, not after the aborted
/// one's 5 s ttl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_waiter_aborted_around_its_grant_leaves_nothing_and_blocks_nobody() {
    let Some(target) = Target::start(Store::Inc, "adv26a").await else {
        return;
    };
    let key = "aborted";
    let mut connection = connect(&target.url).await;
    let holder = inc_locker(&target.url, true, ms(10_000), RetryPolicy::none()).await;
    let waiter = Arc::new(inc_locker(&target.url, true, ms(5_000), waiting(ms(20))).await);
    let next = Arc::new(inc_locker(&target.url, true, ms(5_000), waiting(ms(20))).await);
    let mut won_before_abort = 0;
    for round in 0..14u64 {
        let held = holder.acquire(key).await.unwrap();
        let w = Arc::clone(&waiter);
        let acquiring = tokio::spawn(async move { w.acquire(key).await });
        until_in_line(&mut connection, key, 1).await;
        let n = Arc::clone(&next);
        let behind = tokio::spawn(async move {
            let guard = n.acquire(key).await.unwrap();
            let at = Instant::now();
            guard.release().await.unwrap();
            at
        });
        until_in_line(&mut connection, key, 2).await;
        let released = Instant::now();
        let release = tokio::spawn(held.release());
        match round % 7 {
            0 => tokio::task::yield_now().await,
            r => std::thread::sleep(Duration::from_micros(r * r * 40)),
        }
        acquiring.abort();
        release.await.unwrap().unwrap();
        if let Ok(Ok(guard)) = acquiring.await {
            won_before_abort += 1;
            drop(guard);
        }
        let served = tokio::time::timeout(ms(3_000), behind)
            .await
            .expect("the waiter behind was blocked")
            .unwrap();
        assert!(
            served - released < ms(1_000),
            "round {round}: served {:?} after the release",
            served - released
        );
        let left = nothing_left(&target, key, ms(1_000)).await;
        assert!(left.is_empty(), "round {round}: left behind: {left:?}");
    }
    println!("won before the abort: {won_before_abort} of 14");
    holder.stop().await.unwrap();
    waiter.stop().await.unwrap();
    next.stop().await.unwrap();
}

/// The head's whole process stops (its current-thread runtime blocked) for 2 s while in line
/// with a ttl of 600 ms; the release gives it the lock. The waiter behind it is served once the
/// head's entry lapses (within its 600 ms lease and a poll), and the head, resumed, does not
/// hold the lapsed grant while the second holds the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_a_paused_head_blocks_no_longer_than_its_lease_and_holds_no_lapsed_grant() {
    let Some(target) = Target::start(Store::Inc, "adv26a").await else {
        return;
    };
    let key = "paused";
    let url = target.url.clone();
    let mut connection = connect(&url).await;
    let holder = inc_locker(&url, true, ms(10_000), RetryPolicy::none()).await;
    let held = holder.acquire(key).await.unwrap();
    let (pause_tx, pause_rx) = std::sync::mpsc::channel::<Duration>();
    let (paused_tx, paused_rx) = tokio::sync::oneshot::channel::<()>();
    let waiter_url = url.clone();
    let waiter = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let locker = inc_locker(&waiter_url, true, ms(600), waiting(ms(20))).await;
            tokio::spawn(async move {
                loop {
                    if let Ok(pause) = pause_rx.try_recv() {
                        let _ = paused_tx.send(());
                        std::thread::sleep(pause);
                        return;
                    }
                    sleep(ms(1)).await;
                }
            });
            let guard = locker.acquire(key).await.unwrap();
            let at = std::time::Instant::now();
            let was_granted = granted(&guard);
            let valid_until = guard.valid_until();
            guard.release().await.unwrap();
            locker.stop().await.unwrap();
            (at, was_granted, valid_until)
        })
    });
    until_in_line(&mut connection, key, 1).await;
    pause_tx.send(ms(2_000)).unwrap();
    paused_rx.await.unwrap();
    let second = inc_locker(&url, true, ms(10_000), waiting(ms(20))).await;
    let behind = tokio::spawn(async move {
        let guard = second.acquire(key).await.unwrap();
        (second, guard, std::time::Instant::now())
    });
    until_in_line(&mut connection, key, 2).await;
    let released = std::time::Instant::now();
    held.release().await.unwrap();
    let reserved = get(&mut connection, &owner_key(key)).await;
    let (second, guard, second_from) = tokio::time::timeout(ms(5_000), behind)
        .await
        .unwrap()
        .unwrap();
    sleep(ms(2_500)).await;
    let second_until = std::time::Instant::now();
    guard.release().await.unwrap();
    let (waiter_at, waiter_granted, _) =
        tokio::task::spawn_blocking(move || waiter.join().unwrap())
            .await
            .unwrap();
    println!(
        "reserved {reserved:?}; second served {:?} after the release; the paused head got it {:?} after the second (granted: {waiter_granted})",
        second_from - released,
        waiter_at.saturating_duration_since(second_from)
    );
    assert!(
        reserved.as_deref().is_some_and(|v| v.starts_with(RESERVED)),
        "not on the new path: {reserved:?}"
    );
    assert!(
        second_from - released < ms(600 + 400),
        "the second waited {:?} behind a paused head with a 600 ms lease",
        second_from - released
    );
    assert!(
        waiter_at >= second_until,
        "the paused head held the lock while the second did"
    );
    second.stop().await.unwrap();
    holder.stop().await.unwrap();
    let left = nothing_left(&target, key, ms(1_000)).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The head's subscriber connection is killed (`CLIENT KILL TYPE pubsub`) just before the
/// release: the grant's message is lost. The head still gets the lock within its fallback poll
/// (a quarter of its 2 s ttl) even though its policy's delay is 5 s, and nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_a_head_that_lost_its_grant_message_is_served_within_its_poll() {
    let Some(target) = Target::start(Store::Inc, "adv26a").await else {
        return;
    };
    let key = "deaf";
    let mut connection = connect(&target.url).await;
    let holder = inc_locker(&target.url, true, ms(10_000), RetryPolicy::none()).await;
    for round in 0..3 {
        let held = holder.acquire(key).await.unwrap();
        let waiter = inc_locker(&target.url, true, ms(2_000), waiting(ms(5_000))).await;
        let acquiring = tokio::spawn(async move {
            let guard = waiter.acquire(key).await.unwrap();
            (waiter, guard, Instant::now())
        });
        until_in_line(&mut connection, key, 1).await;
        sleep(ms(50)).await;
        let killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut connection)
            .await
            .unwrap();
        let released = Instant::now();
        held.release().await.unwrap();
        let (waiter, guard, at) = tokio::time::timeout(ms(3_000), acquiring)
            .await
            .expect("the deaf head was not served within 3 s")
            .unwrap();
        println!(
            "round {round}: killed {killed}, served {:?} after the release (granted {})",
            at - released,
            granted(&guard)
        );
        assert!(killed >= 1, "no subscriber killed");
        assert!(at - released < ms(900), "{:?}", at - released);
        guard.release().await.unwrap();
        waiter.stop().await.unwrap();
        let left = nothing_left(&target, key, ms(1_000)).await;
        assert!(left.is_empty(), "round {round}: left behind: {left:?}");
    }
    holder.stop().await.unwrap();
}

/// Take-back race: the head's connection stalls (a proxy holds what it sends), its poll gets no
/// answer within the command timeout and is taken back (the take-back stalls too); the release
/// gives the head the lock, naming the expiry its last answered attempt got, so the grant
/// matches its anchor; then the stalled poll and take-back land (the poll takes the lock over,
/// the take-back gives it up and passes it on). The head must not hold the lock its take-back
/// gives up while the next waiter holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_a_head_whose_attempt_was_taken_back_does_not_hold_its_grant() {
    let Some(target) = Target::start(Store::Inc, "adv26a").await else {
        return;
    };
    let key = "taken-back";
    let mut connection = connect(&target.url).await;
    let proxy = LatencyProxy::start(target.servers[0].port()).await.unwrap();
    let holder = inc_locker(&target.url, true, ms(10_000), RetryPolicy::none()).await;
    let held = holder.acquire(key).await.unwrap();
    let waiter = Locker::from_arc(Arc::new(
        IncLock::connect(IncConfig {
            command_timeout: 300,
            ..IncConfig::new(proxy.url()).with_fair(true)
        })
        .await
        .unwrap(),
    ))
    .with_options(
        lock_core::LockOptions::default()
            .with_ttl(ms(2_000))
            .with_retry(waiting(ms(20))),
    )
    .unwrap();
    let intervals = Arc::new(Intervals::default());
    let granted_count = Arc::new(AtomicUsize::new(0));
    let (i, g) = (Arc::clone(&intervals), Arc::clone(&granted_count));
    let acquiring = tokio::spawn(async move {
        let guard = waiter.acquire(key).await.unwrap();
        let from = Instant::now();
        if granted(&guard) {
            g.fetch_add(1, Ordering::Relaxed);
        }
        sleep(ms(300)).await;
        i.record(from, Instant::now().min(guard.valid_until()));
        let _ = guard.release().await;
        waiter.stop().await.unwrap();
    });
    until_in_line(&mut connection, key, 1).await;
    // Right after an answered attempt: the next poll comes within 500 ms.
    let entry = line(&mut connection, key).await;
    proxy.stall_existing(0);
    let next = Arc::new(inc_locker(&target.url, true, ms(10_000), waiting(ms(20))).await);
    let (i, n) = (Arc::clone(&intervals), Arc::clone(&next));
    let behind = tokio::spawn(async move {
        let guard = n.acquire(key).await.unwrap();
        let from = Instant::now();
        sleep(ms(1_500)).await;
        i.record(from, Instant::now().min(guard.valid_until()));
        guard.release().await.unwrap();
    });
    until_in_line(&mut connection, key, 2).await;
    // Past the head's poll and its 300 ms command timeout, well within its 2 s lease.
    sleep(ms(1_000)).await;
    held.release().await.unwrap();
    let reserved = get(&mut connection, &owner_key(key)).await;
    sleep(ms(100)).await;
    proxy.release_stall();
    tokio::time::timeout(ms(15_000), behind)
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(ms(15_000), acquiring)
        .await
        .unwrap()
        .unwrap();
    println!(
        "line {entry:?}; reserved {reserved:?}; the head's lock was a grant: {}",
        granted_count.load(Ordering::Relaxed)
    );
    assert_eq!(
        reserved.as_deref(),
        Some(format!("{RESERVED}{}", entry[0]).as_str()),
        "not on the new path"
    );
    assert_eq!(intervals.len(), 2);
    assert_eq!(intervals.overlaps(), 0, "two holders");
    holder.stop().await.unwrap();
    next.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Forged tokens and the raw API
// ---------------------------------------------------------------------------------------------

fn request(key: &str, token: Token, ttl: Duration) -> LockRequest {
    LockRequest::new(KeySet::one(lock_core::Key::new(key).unwrap()), token, ttl).unwrap()
}

/// A granted holder's token (`lock-turn-reserved:<member>`, known to anyone who reads the
/// owner key or the grant's message): an acquisition with it is refused (fair or not), a
/// take-back with it deletes nothing, another client's acquisitions are refused, and the
/// granted holder itself extends and releases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_a_forged_reservation_token_is_refused_and_the_granted_holder_keeps_the_lock() {
    let Some(target) = Target::start(Store::Inc, "adv26a").await else {
        return;
    };
    let key = "forged";
    let mut connection = connect(&target.url).await;
    let holder = inc_locker(&target.url, true, ms(10_000), RetryPolicy::none()).await;
    let held = holder.acquire(key).await.unwrap();
    let waiter = inc_locker(&target.url, true, ms(3_000), waiting(ms(20))).await;
    let acquiring = tokio::spawn(async move {
        let guard = waiter.acquire(key).await.unwrap();
        (waiter, guard)
    });
    until_in_line(&mut connection, key, 1).await;
    held.release().await.unwrap();
    let (waiter, mut guard) = acquiring.await.unwrap();
    assert!(granted(&guard), "not on the new path");
    let forged = guard.token().expose().to_string();
    for fair in [true, false] {
        let raw = inc_backend(&target.url, fair).await;
        let refused = raw
            .try_acquire(&request(
                key,
                Token::from_stored(forged.clone()).unwrap(),
                ms(1_000),
            ))
            .await;
        assert!(
            matches!(refused, Err(LockError::InvalidInput { .. })),
            "fair {fair}: {:?}",
            refused.map(|h| h.is_some())
        );
        let abandoned = raw
            .abandon(&request(
                key,
                Token::from_stored(forged.clone()).unwrap(),
                ms(1_000),
            ))
            .await
            .unwrap();
        assert!(!abandoned, "fair {fair}");
        let other = raw
            .try_acquire(&request(key, Token::generate().unwrap(), ms(1_000)))
            .await
            .unwrap();
        assert!(other.is_none(), "fair {fair}: a second holder");
        assert_eq!(
            get(&mut connection, &owner_key(key)).await.as_deref(),
            Some(forged.as_str())
        );
    }
    guard.extend(ms(5_000)).await.unwrap();
    let left = pttl(&mut connection, &counter_key(key)).await;
    assert!(left > 4_000, "{left}");
    guard.release().await.unwrap();
    assert_eq!(get(&mut connection, &owner_key(key)).await, None);
    waiter.stop().await.unwrap();
    holder.stop().await.unwrap();
    let left = nothing_left(&target, key, ms(1_000)).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// `stop()` of the head's client from 0 to 2 ms after the release that gives it the lock went
/// out: the acquisition ends (a guard or `Stopped`); when it ended with `Stopped`, nothing of it
/// is left and the waiter behind is served within a second, not after the head's ttl. (A
/// guard handed out before the `stop` and dropped after it lapses with its ttl, as
/// `Locker::stop` documents.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_a_stop_around_the_grant_leaves_nothing_and_blocks_nobody() {
    let Some(target) = Target::start(Store::Inc, "adv26a").await else {
        return;
    };
    let key = "stopped";
    let mut connection = connect(&target.url).await;
    let holder = inc_locker(&target.url, true, ms(10_000), RetryPolicy::none()).await;
    let next = Arc::new(inc_locker(&target.url, true, ms(5_000), waiting(ms(20))).await);
    let mut stopped = 0;
    for round in 0..10u64 {
        let waiter = Arc::new(inc_locker(&target.url, true, ms(1_200), waiting(ms(20))).await);
        let held = holder.acquire(key).await.unwrap();
        let w = Arc::clone(&waiter);
        let acquiring = tokio::spawn(async move { w.acquire(key).await });
        until_in_line(&mut connection, key, 1).await;
        let n = Arc::clone(&next);
        let behind = tokio::spawn(async move {
            let guard = n.acquire(key).await.unwrap();
            let at = Instant::now();
            guard.release().await.unwrap();
            at
        });
        until_in_line(&mut connection, key, 2).await;
        let released = Instant::now();
        let release = tokio::spawn(held.release());
        match round % 5 {
            0 => tokio::task::yield_now().await,
            r => std::thread::sleep(Duration::from_micros(r * r * 100)),
        }
        waiter.stop().await.unwrap();
        release.await.unwrap().unwrap();
        let outcome = tokio::time::timeout(ms(3_000), acquiring)
            .await
            .expect("stop did not end the acquisition")
            .unwrap();
        let how = match outcome {
            Ok(guard) => {
                let how = format!("guard (granted: {})", granted(&guard));
                drop(guard);
                how
            }
            Err(LockError::Stopped) => {
                stopped += 1;
                "Stopped".to_owned()
            }
            Err(error) => panic!("round {round}: {error:?}"),
        };
        let Ok(served) = tokio::time::timeout(ms(6_000), behind).await else {
            panic!(
                "round {round} ({how}): the waiter behind was blocked; owner {:?}",
                get(&mut connection, &owner_key(key)).await
            );
        };
        let served = served.unwrap();
        println!(
            "round {round} ({how}): served {:?} after the release",
            served - released
        );
        assert!(
            how != "Stopped" || served - released < ms(1_000),
            "round {round} ({how}): served {:?} after the release",
            served - released
        );
        let left = nothing_left(&target, key, ms(1_000)).await;
        assert!(left.is_empty(), "round {round}: left behind: {left:?}");
    }
    println!("stopped before the guard: {stopped} of 10");
    holder.stop().await.unwrap();
    next.stop().await.unwrap();
}
/// Raw API: one waiter id used by two acquisitions of one client, on two keys (the id is the
/// caller's: `LockRequest::with_waiter`). The grant of key A, which names the expiry the
/// waiter's latest attempt (on A) got, must not make the waiter hold key B, which another
/// client holds: a grant is for the key it was given on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_raw_a_grant_on_one_key_is_not_held_on_another() {
    let Some(target) = Target::start(Store::Inc, "adv26a").await else {
        return;
    };
    let (a, b) = ("raw-a", "raw-b");
    let mut connection = connect(&target.url).await;
    let holder = inc_locker(&target.url, true, ms(10_000), RetryPolicy::none()).await;
    let held_a = holder.acquire(a).await.unwrap();
    let held_b = holder.acquire(b).await.unwrap();
    let raw = inc_backend(&target.url, true).await;
    let waiter = Token::generate().unwrap();
    let attempt = |key: &str, after_wait: bool| {
        request(key, Token::generate().unwrap(), ms(5_000))
            .with_waiter(waiter.clone())
            .with_after_wait(after_wait)
            .with_will_wait(true)
    };
    // The waiter asks for A and lines up there.
    let refused = raw.try_acquire(&attempt(a, true)).await.unwrap();
    assert!(refused.is_none());
    until_in_line(&mut connection, a, 1).await;
    // A's release gives A to the waiter.
    held_a.release().await.unwrap();
    let reserved = get(&mut connection, &owner_key(a)).await;
    assert!(
        reserved.as_deref().is_some_and(|v| v.starts_with(RESERVED)),
        "{reserved:?}"
    );
    sleep(ms(200)).await;
    // The same waiter's attempt on B, which another client holds.
    let on_b = raw.try_acquire(&attempt(b, true)).await.unwrap();
    let b_owner = get(&mut connection, &owner_key(b)).await;
    println!(
        "B's attempt: {:?}; B's owner {b_owner:?}",
        on_b.as_ref()
            .map(|h| h.lease().token().expose().to_string())
    );
    assert!(
        on_b.is_none(),
        "the waiter holds B, whose owner is {b_owner:?} (the holder's guard is live: {})",
        held_b.is_valid()
    );
    held_b.release().await.unwrap();
    holder.stop().await.unwrap();
}

/// Hostile network: two of five inc clients reach the server through a proxy that delays every
/// chunk 40 ms each way (their attempts, and the grants they hear, come late); ttl 300 ms. No
/// two holders within their validity, and the slow clients hold grants too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_slow_clients_holding_grants_never_overlap_fast_ones() {
    let Some(target) = Target::start(Store::Inc, "adv26a").await else {
        return;
    };
    let key = "slow";
    let proxy = LatencyProxy::start(target.servers[0].port()).await.unwrap();
    proxy.set_delay(ms(40));
    let intervals = Arc::new(Intervals::default());
    let resource = Arc::new(FencedResource::default());
    let grants = Arc::new(AtomicU64::new(0));
    let slow_grants = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for client in 0..5usize {
        let slow = client < 2;
        let url = if slow {
            proxy.url()
        } else {
            target.url.clone()
        };
        let locker = inc_locker(&url, true, ms(300), waiting(ms(5))).await;
        let (intervals, resource, grants, slow_grants) = (
            Arc::clone(&intervals),
            Arc::clone(&resource),
            Arc::clone(&grants),
            Arc::clone(&slow_grants),
        );
        tasks.push(tokio::spawn(async move {
            let end = Instant::now() + Duration::from_secs(3);
            while Instant::now() < end {
                let guard = locker.acquire(key).await.unwrap();
                let from = Instant::now();
                if granted(&guard) {
                    grants.fetch_add(1, Ordering::Relaxed);
                    if slow {
                        slow_grants.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if guard.is_valid() {
                    resource.write(guard.fencing_token().unwrap());
                }
                sleep(ms(2)).await;
                intervals.record(from, Instant::now().min(guard.valid_until()));
                let _ = guard.release().await;
            }
            locker.stop().await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    println!(
        "{} sections, {} grants ({} to slow clients), {} overlaps, {} stale fences",
        intervals.len(),
        grants.load(Ordering::Relaxed),
        slow_grants.load(Ordering::Relaxed),
        intervals.overlaps(),
        resource.stale_writes()
    );
    assert_eq!(intervals.overlaps(), 0);
    assert_eq!(resource.stale_writes(), 0);
    assert!(slow_grants.load(Ordering::Relaxed) > 0, "vacuous");
}

/// RESP3 connections (`?protocol=resp3`): the anchored attempt's `{answer, expiry}` reply and
/// the grant with its fence still work (the waiter holds the lock a release gives it), and
/// nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_grants_work_over_resp3_connections() {
    let Some(target) = Target::start(Store::Inc, "adv26a").await else {
        return;
    };
    let key = "resp3";
    let url = format!("{}?protocol=resp3", target.url);
    let mut connection = connect(&target.url).await;
    let holder = inc_locker(&url, true, ms(10_000), RetryPolicy::none()).await;
    let held = holder.acquire(key).await.unwrap();
    let held_fence = held.fencing_token().unwrap();
    let waiter = inc_locker(&url, true, ms(2_000), waiting(ms(20))).await;
    let acquiring = tokio::spawn(async move {
        let guard = waiter.acquire(key).await.unwrap();
        let was = (granted(&guard), guard.fencing_token().unwrap());
        guard.release().await.unwrap();
        waiter.stop().await.unwrap();
        was
    });
    until_in_line(&mut connection, key, 1).await;
    held.release().await.unwrap();
    let (was_granted, fence) = tokio::time::timeout(ms(3_000), acquiring)
        .await
        .unwrap()
        .unwrap();
    assert!(was_granted, "not handed the lock by a grant over RESP3");
    assert!(fence > held_fence, "{fence} after {held_fence}");
    holder.stop().await.unwrap();
    let left = nothing_left(&target, key, ms(1_000)).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}
// ---------------------------------------------------------------------------------------------
// Mixed versions
// ---------------------------------------------------------------------------------------------

/// The fair acquisition of inc before 6328bad (its line gate, then the plain acquisition; no
/// take-over of a lock given to the waiter), as a client of that version sends it.
fn acquire_fair_before_the_grant() -> redis::Script {
    redis::Script::new(
        &[
            include_str!("../../lock-inc/src/lua/fence.lua"),
            "if not (redis.call('exists', KEYS[#KEYS]) == 0 and (ARGV[3] == '' or redis.call('exists', KEYS[1]) == 0)) then\n",
            lock_core::raw::redis::LINE_SCRIPT,
            "local gate = line_gate(KEYS[1], KEYS[2], ARGV[1], ARGV[3], tonumber(ARGV[2]), ARGV[4])\n",
            "if gate then\n  return gate\nend\n",
            "end\n",
            include_str!("../../lock-inc/src/lua/acquire.lua"),
        ]
        .concat(),
    )
}

/// Rolling upgrade: a fair inc waiter of the version before the grant (emulated: its own
/// attempts, every 50 ms, never acting on a message, since it took the whole message for a
/// waiter id) is at the head when a client of this version releases. The release gives it the
/// lock (`lock-turn-reserved:<member>`), which it cannot take over: its attempts find the lock
/// held and it waits until the lock lapses with its entry, up to a whole ttl (2 s here, 10 s by
/// default) — and the whole line with it — where before it was served at its next poll.
/// The CHANGELOG's Redlock entry promises "their next poll (200 ms at most)" for the same
/// mix-up; inc's old waiters pay a ttl per hand-over. Fails on main (1.97 s of the 2 s ttl);
/// ignored: a rollout hazard for the CHANGELOG to state (upgrade every fair client of a key
/// together), not a safety issue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fails on main: a rollout hazard (an old inc waiter given the lock waits up to a ttl)"]
async fn inc_an_old_version_waiter_given_the_lock_is_served_within_a_poll() {
    let Some(target) = Target::start(Store::Inc, "adv26a").await else {
        return;
    };
    let key = "old-waiter";
    let mut connection = connect(&target.url).await;
    let holder = inc_locker(&target.url, true, ms(10_000), RetryPolicy::none()).await;
    let held = holder.acquire(key).await.unwrap();
    let member = [
        Token::generate().unwrap().expose().to_string(),
        Token::generate().unwrap().expose().to_string(),
    ]
    .concat();
    let script = acquire_fair_before_the_grant();
    let keys = [
        counter_key(key),
        owner_key(key),
        format!("lock:{{{key}}}:fence"),
        line_key(key),
        format!("lock:{{{key}}}:queue-expiry"),
    ];
    let attempt = |connection: &mut MultiplexedConnection| {
        let mut invocation = script.prepare_invoke();
        for name in &keys {
            invocation.key(name);
        }
        invocation
            .arg(Token::generate().unwrap().expose().to_string())
            .arg(2_000)
            .arg(&member)
            .arg(lock_core::raw::redis::TURN_CHANNEL);
        let connection = connection.clone();
        async move {
            let mut connection = connection;
            invocation
                .invoke_async::<i64>(&mut connection)
                .await
                .unwrap()
        }
    };
    assert!(
        attempt(&mut connection).await <= 0,
        "the old waiter won at once"
    );
    until_in_line(&mut connection, key, 1).await;
    sleep(ms(50)).await;
    let released = Instant::now();
    held.release().await.unwrap();
    let owner = get(&mut connection, &owner_key(key)).await;
    let served = loop {
        if attempt(&mut connection).await > 0 {
            break Instant::now();
        }
        assert!(
            released.elapsed() < ms(5_000),
            "the old waiter never got it"
        );
        sleep(ms(50)).await;
    };
    println!(
        "owner after the release {owner:?}; the old waiter was served {:?} after the release",
        served - released
    );
    let _: () = redis::cmd("DEL")
        .arg(&keys[0])
        .arg(&keys[1])
        .arg(&keys[3])
        .arg(&keys[4])
        .query_async(&mut connection)
        .await
        .unwrap();
    holder.stop().await.unwrap();
    assert!(
        served - released < ms(400),
        "an old-version waiter at the head waited {:?} for the lock a new release gave it",
        served - released
    );
}

//! adv25a: hostile tests of the fair hand-off that gives the key to the head of the line
//! (92eea2a: on one node, a waiter whose latest attempt renewed its place to exactly the expiry a
//! release's message names holds the reservation as its lock, without asking again) and of the
//! merged waits between polls (8f15c79). Real redis-server processes on 127.0.0.1; every client
//! is a backend instance of its own (a process of its own, as far as the server can tell).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use lock_core::{LockError, LockGuard, LockOptions, Locker, RetryCount, RetryPolicy};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::fair::{Store, Target, connect, line_members, waiting};
use lock_tests::history::Intervals;
use lock_tests::proxy::LatencyProxy;
use redis::aio::MultiplexedConnection;
use tokio::time::{Instant, sleep};

const RESERVED: &str = "lock-turn-reserved:";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// True when `guard` holds a reservation given to it by a release (the new hand-off).
fn granted(guard: &LockGuard) -> bool {
    guard.token().expose().starts_with(RESERVED)
}

/// A fair Redlock client of its own on `urls`.
fn redlock_locker(urls: &[String], ttl: Duration, retry: RetryPolicy) -> Locker {
    Locker::from_arc(Arc::new(
        Redlock::new(
            RedlockConfig::new(urls.iter().cloned())
                .with_fair(true)
                .with_node_timeout(ms(500)),
        )
        .unwrap(),
    ))
    .with_options(LockOptions::default().with_ttl(ttl).with_retry(retry))
    .unwrap()
}

async fn get(connection: &mut MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query_async(connection)
        .await
        .unwrap()
}

async fn expiry_set(connection: &mut MultiplexedConnection, key: &str) -> Vec<(String, i64)> {
    let raw: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg([key.as_bytes(), b"\xff:queue-expiry"].concat())
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(connection)
        .await
        .unwrap();
    #[allow(clippy::cast_possible_truncation)]
    raw.into_iter().map(|(m, s)| (m, s as i64)).collect()
}

/// Waits until `key`'s line on the node holds `count` waiters.
async fn until_in_line(connection: &mut MultiplexedConnection, key: &str, count: usize) {
    for _ in 0..2_000 {
        if line_members(connection, key).await.len() >= count {
            return;
        }
        sleep(ms(2)).await;
    }
    panic!("nobody lined up for {key}");
}

/// Waits up to `within` until nothing of `key` (the key, its line) is left on the target.
async fn nothing_left(target: &Target, key: &str, within: Duration) -> Vec<String> {
    let until = Instant::now() + within;
    loop {
        let left: Vec<String> = target
            .keys()
            .await
            .into_iter()
            .map(|k| String::from_utf8_lossy(&k).into_owned())
            .filter(|k| k.starts_with(key))
            .collect();
        if left.is_empty() || Instant::now() >= until {
            return left;
        }
        sleep(ms(20)).await;
    }
}

/// A small deterministic generator (no shared state between workers).
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[derive(Default)]
struct Tally {
    sections: AtomicU64,
    grants: AtomicU64,
    lost_updates: AtomicU64,
    invalid_at_end: AtomicU64,
}

/// `clients` workers hammer `key` for `run`: each holds for `section(seed)` ms (zero often),
/// bumping a counter in Redis by GET/SET (lost updates expose two holders) and recording its
/// hold interval; a worker whose `die(seed)` is true forgets its guard (its process died:
/// the key lapses with its ttl). `per_locker` workers share a client (its in-process queue).
#[allow(clippy::too_many_arguments)]
async fn hammer(
    target: &Target,
    key: &'static str,
    clients: usize,
    ttl: Duration,
    run: Duration,
    section: fn(&mut u64) -> u64,
    die: fn(&mut u64) -> bool,
    per_locker: usize,
) -> (Arc<Tally>, Arc<Intervals>) {
    let tally = Arc::new(Tally::default());
    let intervals = Arc::new(Intervals::default());
    let counter = format!("{key}-counter");
    let mut tasks = Vec::new();
    let mut lockers: Vec<Arc<Locker>> = Vec::new();
    for client in 0..clients {
        if client % per_locker == 0 {
            lockers.push(Arc::new(target.locker(true, ttl, waiting(ms(5))).await));
        }
        let locker = Arc::clone(lockers.last().unwrap());
        let mut connection = connect(&target.servers[0].url()).await;
        let (tally, intervals, counter) =
            (Arc::clone(&tally), Arc::clone(&intervals), counter.clone());
        tasks.push(tokio::spawn(async move {
            let mut seed = 0x9E37_79B9_7F4A_7C15 ^ ((client as u64 + 1) * 7919);
            let end = Instant::now() + run;
            while Instant::now() < end {
                let guard = locker.acquire(key).await.unwrap();
                let acquired = Instant::now();
                if granted(&guard) {
                    tally.grants.fetch_add(1, Ordering::Relaxed);
                }
                let before: Option<u64> = redis::cmd("GET")
                    .arg(&counter)
                    .query_async(&mut connection)
                    .await
                    .unwrap();
                let hold = section(&mut seed);
                if hold > 0 {
                    sleep(ms(hold)).await;
                } else {
                    tokio::task::yield_now().await;
                }
                let _: () = redis::cmd("SET")
                    .arg(&counter)
                    .arg(before.unwrap_or(0) + 1)
                    .query_async(&mut connection)
                    .await
                    .unwrap();
                tally.sections.fetch_add(1, Ordering::Relaxed);
                let valid = guard.is_valid();
                if !valid {
                    tally.invalid_at_end.fetch_add(1, Ordering::Relaxed);
                }
                let released = Instant::now().min(guard.valid_until());
                intervals.record(acquired, released);
                if die(&mut seed) {
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
    for locker in lockers {
        locker.stop().await.unwrap();
    }
    let mut connection = connect(&target.servers[0].url()).await;
    let total: Option<u64> = redis::cmd("GET")
        .arg(&counter)
        .query_async(&mut connection)
        .await
        .unwrap();
    let sections = tally.sections.load(Ordering::Relaxed);
    tally
        .lost_updates
        .store(sections - total.unwrap_or(0), Ordering::Relaxed);
    let _: () = redis::cmd("DEL")
        .arg(&counter)
        .query_async(&mut connection)
        .await
        .unwrap();
    (tally, intervals)
}

fn report(name: &str, tally: &Tally, intervals: &Intervals) {
    println!(
        "{name}: {} sections, {} held by a grant, {} lost updates, {} overlaps, {} ended past validity",
        tally.sections.load(Ordering::Relaxed),
        tally.grants.load(Ordering::Relaxed),
        tally.lost_updates.load(Ordering::Relaxed),
        intervals.overlaps(),
        tally.invalid_at_end.load(Ordering::Relaxed),
    );
}

// ---------------------------------------------------------------------------------------------
// Mutual exclusion under load, one node (the new hand-off), three nodes and inc (unchanged)
// ---------------------------------------------------------------------------------------------

/// Ten clients, ttl 400 ms, sections of 0–3 ms: no two holders, no lost update, and the new
/// hand-off is used (control: the grant counter is not zero, so the check is not vacuous);
/// nothing of the key is left once everyone stopped. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_hammer_short_ttl_never_overlaps_and_grants_are_held() {
    let Some(target) = Target::start(Store::Redis, "adv25a").await else {
        return;
    };
    let key = "hammer-short";
    let (tally, intervals) = hammer(
        &target,
        key,
        10,
        ms(400),
        Duration::from_secs(4),
        |seed| [0, 0, 1, 3][(next(seed) % 4) as usize],
        |_| false,
        1,
    )
    .await;
    report(key, &tally, &intervals);
    assert_eq!(intervals.overlaps(), 0);
    assert_eq!(tally.lost_updates.load(Ordering::Relaxed), 0);
    assert_eq!(tally.invalid_at_end.load(Ordering::Relaxed), 0);
    assert!(
        tally.grants.load(Ordering::Relaxed) > 10,
        "the new hand-off never fired: the check is vacuous"
    );
    let left = nothing_left(&target, key, ms(1_500)).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Ttl 300 ms (the ttl/2 rule and the reservation's expiry fire): sections up to 100 ms, and
/// one holder in twelve dies holding (its key lapses, nobody passes the turn). No two holders
/// within their validity, no lost update. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_hammer_with_dying_holders_and_long_sections_never_overlaps() {
    let Some(target) = Target::start(Store::Redis, "adv25a").await else {
        return;
    };
    let key = "hammer-dying";
    let (tally, intervals) = hammer(
        &target,
        key,
        8,
        ms(300),
        Duration::from_secs(5),
        |seed| [0, 0, 2, 10, 40, 100][(next(seed) % 6) as usize],
        |seed| next(seed).is_multiple_of(12),
        1,
    )
    .await;
    report(key, &tally, &intervals);
    assert_eq!(intervals.overlaps(), 0);
    assert_eq!(tally.lost_updates.load(Ordering::Relaxed), 0);
    assert!(tally.grants.load(Ordering::Relaxed) > 0, "vacuous");
}

/// Three nodes are not on the new path (no grant ever): still exclusive. Held. inc grants too
/// since session 26 (the release takes the lock and draws the fence for the head): exclusive,
/// and its heads hold what they are given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock3_never_grants_inc_grants_and_neither_overlaps() {
    for store in [Store::Redlock3, Store::Inc] {
        let Some(target) = Target::start(store, "adv25a").await else {
            return;
        };
        let key = "hammer-other";
        let (tally, intervals) = hammer(
            &target,
            key,
            6,
            ms(500),
            Duration::from_secs(2),
            |seed| [0, 1, 3][(next(seed) % 3) as usize],
            |_| false,
            1,
        )
        .await;
        report(&format!("{store:?}"), &tally, &intervals);
        assert_eq!(intervals.overlaps(), 0, "{store:?}");
        assert_eq!(tally.lost_updates.load(Ordering::Relaxed), 0, "{store:?}");
        let grants = tally.grants.load(Ordering::Relaxed);
        if store == Store::Inc {
            assert!(grants > 0, "{store:?}: no grant held");
        } else {
            assert_eq!(grants, 0, "{store:?}");
        }
        assert!(tally.sections.load(Ordering::Relaxed) > 20, "{store:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// A grant read late, forged, or after a take-back
// ---------------------------------------------------------------------------------------------

/// A waiter's whole process stops (its current-thread runtime blocked, the pub/sub reader
/// with it) for more than its ttl while in line; the release gives it the key and names the
/// expiry its latest attempt got; the reservation lapses; a third client takes the key and
/// holds it. Resumed, the waiter reads the grant: it must not hold the key (its validity, counted
/// from its attempt's send time, is over), and it is served only after the third client lets go.
/// Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_read_after_a_pause_longer_than_the_ttl_is_not_held() {
    let Some(target) = Target::start(Store::Redis, "adv25a").await else {
        return;
    };
    let key = "paused";
    let url = target.servers[0].url();
    let mut connection = connect(&url).await;
    let holder = target
        .locker(true, Duration::from_secs(10), RetryPolicy::none())
        .await;
    let held = holder.acquire(key).await.unwrap();

    let (pause_tx, pause_rx) = std::sync::mpsc::channel::<Duration>();
    let (paused_tx, paused_rx) = tokio::sync::oneshot::channel::<()>();
    let urls = vec![url.clone()];
    let waiter = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let locker = redlock_locker(&urls, ms(600), waiting(ms(20)));
            // Blocks the whole runtime (a SIGSTOP of the process) when told to.
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
            guard.release().await.unwrap();
            locker.stop().await.unwrap();
            (at, was_granted)
        })
    });
    until_in_line(&mut connection, key, 1).await;
    let entry = expiry_set(&mut connection, key).await;
    pause_tx.send(Duration::from_millis(2_000)).unwrap();
    paused_rx.await.unwrap();
    // The waiter's process is stopped: the release gives it the key.
    held.release().await.unwrap();
    let reserved = get(&mut connection, key).await;
    assert!(
        reserved.as_deref().is_some_and(|v| v.starts_with(RESERVED)),
        "{reserved:?} (entry {entry:?})"
    );
    // A third client takes the key once the reservation lapsed, and holds it 2.5 s.
    let third = target
        .locker(true, Duration::from_secs(10), waiting(ms(20)))
        .await;
    let guard = third.acquire(key).await.unwrap();
    let third_from = std::time::Instant::now();
    sleep(ms(2_500)).await;
    let third_until = std::time::Instant::now();
    guard.release().await.unwrap();
    let (waiter_at, waiter_granted) = tokio::task::spawn_blocking(move || waiter.join().unwrap())
        .await
        .unwrap();
    println!(
        "third held {:?}..{:?}; the paused waiter got it at {:?} (granted: {waiter_granted})",
        Duration::ZERO,
        third_until - third_from,
        waiter_at.saturating_duration_since(third_from)
    );
    assert!(
        waiter_at >= third_until || waiter_at < third_from,
        "the paused waiter held the key while the third client did"
    );
    assert!(waiter_at >= third_until);
    third.stop().await.unwrap();
    holder.stop().await.unwrap();
}

/// The granted guard behaves as any: `extend`, a keep-alive past several ttls, `inspect` by
/// another client (held), a release that frees the key and leaves nothing; and one that lapsed
/// answers `NotHeld` to its late release, which must not free the key for the next holder.
/// Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_granted_guard_extends_keeps_alive_releases_and_lapses_like_any() {
    let Some(target) = Target::start(Store::Redis, "adv25a").await else {
        return;
    };
    let key = "granted-guard";
    let url = target.servers[0].url();
    let mut connection = connect(&url).await;
    let ttl = ms(600);
    let holder = target
        .locker(true, Duration::from_secs(10), RetryPolicy::none())
        .await;
    let held = holder.acquire(key).await.unwrap();
    let waiter = target.locker(true, ttl, waiting(ms(20))).await;
    let acquiring = tokio::spawn(async move {
        let guard = waiter.acquire(key).await.unwrap();
        (waiter, guard)
    });
    until_in_line(&mut connection, key, 1).await;
    held.release().await.unwrap();
    let (waiter, mut guard) = acquiring.await.unwrap();
    assert!(
        granted(&guard),
        "not on the new path: {}",
        &*guard.token().expose()
    );
    assert!(guard.remaining() >= ttl / 2, "{:?}", guard.remaining());
    guard.extend(ttl).await.unwrap();
    let lost = guard.keep_alive().unwrap();
    sleep(ttl * 3).await;
    assert!(guard.is_valid(), "the keep-alive lost the granted lock");
    drop(lost);
    let other = target
        .locker(true, Duration::from_secs(10), RetryPolicy::none())
        .await;
    let states = other.inspect(key).await.unwrap();
    assert!(
        matches!(states[0].holding, lock_core::Holding::Held { .. }),
        "{states:?}"
    );
    assert!(other.try_acquire(key).await.unwrap().is_none());
    guard.release().await.unwrap();
    assert_eq!(get(&mut connection, key).await, None);
    let left = nothing_left(&target, key, ms(500)).await;
    assert!(left.is_empty(), "left behind: {left:?}");

    // A grant that lapses (no keep-alive) while another waits: the late release is NotHeld
    // and leaves the next holder alone.
    let held = holder.acquire(key).await.unwrap();
    let acquiring = tokio::spawn(async move {
        let guard = waiter.acquire(key).await.unwrap();
        (waiter, guard)
    });
    until_in_line(&mut connection, key, 1).await;
    held.release().await.unwrap();
    let (waiter, guard) = acquiring.await.unwrap();
    assert!(granted(&guard));
    let next = target
        .locker(true, Duration::from_secs(10), waiting(ms(20)))
        .await;
    let next_guard = tokio::time::timeout(ms(3_000), next.acquire(key))
        .await
        .unwrap()
        .unwrap();
    assert!(!guard.is_valid());
    let late = guard.release().await;
    assert!(matches!(late, Err(LockError::NotHeld { .. })), "{late:?}");
    assert_eq!(
        get(&mut connection, key).await.as_deref(),
        Some(&*next_guard.token().expose())
    );
    next_guard.release().await.unwrap();
    for locker in [waiter, holder, other, next] {
        locker.stop().await.unwrap();
    }
    let left = nothing_left(&target, key, ms(1_000)).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// A waiter's acquisition dropped from 0 to 2 ms after the release that gives it the key went out (before or
/// after it read the message, or with the guard already out): nothing of it is left, and the
/// next waiter (in line behind it) is served within a second, not after the dropped one's 5 s
/// ttl. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_dropped_around_its_grant_leaves_nothing_and_blocks_nobody() {
    let Some(target) = Target::start(Store::Redis, "adv25a").await else {
        return;
    };
    let key = "dropped";
    let url = target.servers[0].url();
    let mut connection = connect(&url).await;
    let holder = target
        .locker(true, Duration::from_secs(10), RetryPolicy::none())
        .await;
    let waiter = Arc::new(
        target
            .locker(true, Duration::from_secs(5), waiting(ms(20)))
            .await,
    );
    let next = Arc::new(
        target
            .locker(true, Duration::from_secs(5), waiting(ms(20)))
            .await,
    );
    let won_before_drop = AtomicUsize::new(0);
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
            won_before_drop.fetch_add(1, Ordering::Relaxed);
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
    println!(
        "won before the drop: {} of 14",
        won_before_drop.load(Ordering::Relaxed)
    );
    holder.stop().await.unwrap();
    waiter.stop().await.unwrap();
    next.stop().await.unwrap();
}

/// Take-back race: the waiter's connection to the node stalls (a proxy holds what it sends), so
/// its next attempt gets no answer and is taken back; meanwhile the release gives it the key,
/// naming the expiry its earlier attempt got (the grant matches its anchor), and the stalled
/// attempt and take-back land afterwards (the take-back passes the turn on). The waiter must
/// not hold the key given up by its take-back while the next waiter holds it. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_attempt_was_taken_back_does_not_hold_its_grant() {
    let Some(target) = Target::start(Store::Redis, "adv25a").await else {
        return;
    };
    let key = "taken-back";
    let url = target.servers[0].url();
    let mut connection = connect(&url).await;
    let proxy = LatencyProxy::start(target.servers[0].port()).await.unwrap();
    let holder = target
        .locker(true, Duration::from_secs(10), RetryPolicy::none())
        .await;
    let held = holder.acquire(key).await.unwrap();
    let waiter = redlock_locker(&[proxy.url()], ms(2_000), waiting(ms(20)));
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
    let before = expiry_set(&mut connection, key).await;
    // The waiter's next poll (within 500 ms) is held by the proxy, its answer never comes.
    proxy.stall_existing(0);
    let next = Arc::new(
        target
            .locker(true, Duration::from_secs(10), waiting(ms(20)))
            .await,
    );
    let (i, n) = (Arc::clone(&intervals), Arc::clone(&next));
    let behind = tokio::spawn(async move {
        let guard = n.acquire(key).await.unwrap();
        let from = Instant::now();
        sleep(ms(1_500)).await;
        i.record(from, Instant::now().min(guard.valid_until()));
        guard.release().await.unwrap();
    });
    until_in_line(&mut connection, key, 2).await;
    // Wait past the waiter's node timeout (500 ms) after its stalled poll.
    sleep(ms(1_000)).await;
    let after = expiry_set(&mut connection, key).await;
    // The waiter's entry was not renewed since (its attempts are stalled): the grant names the
    // expiry its last answered attempt got.
    held.release().await.unwrap();
    let reserved = get(&mut connection, key).await;
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
        "line before {before:?} after {after:?}; reserved {reserved:?}; the waiter's lock was a grant: {}",
        granted_count.load(Ordering::Relaxed)
    );
    // Not vacuous: the release gave the key to the waiter, naming the expiry its last answered
    // attempt got (its entry was not renewed since).
    assert_eq!(before[0], after[0]);
    assert_eq!(
        reserved.as_deref(),
        Some(format!("{RESERVED}{}", before[0].0).as_str())
    );
    assert_eq!(intervals.len(), 2);
    assert_eq!(intervals.overlaps(), 0, "two holders");
    holder.stop().await.unwrap();
    next.stop().await.unwrap();
}

/// The waiter `member` (instance + id) as a release's message names it: `<id>:<expiry>` on
/// `lock-turn:<instance>`.
async fn publish_grant(connection: &mut MultiplexedConnection, member: &str, expiry: i64) -> i64 {
    let (instance, waiter) = member.split_at(32);
    redis::cmd("PUBLISH")
        .arg(format!("{}{instance}", lock_core::raw::redis::TURN_CHANNEL))
        .arg(format!("{waiter}:{expiry}"))
        .query_async(connection)
        .await
        .unwrap()
}

/// Control for the forgery below: a forged grant naming any other expiry than the one the
/// waiter's latest attempt got (one off, an old one) is not held; the waiter asks and is
/// refused. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_grant_with_another_expiry_is_not_held() {
    let Some(target) = Target::start(Store::Redis, "adv25a").await else {
        return;
    };
    let key = "forged-off";
    let mut connection = connect(&target.servers[0].url()).await;
    let holder = target
        .locker(true, Duration::from_secs(10), RetryPolicy::none())
        .await;
    let held = holder.acquire(key).await.unwrap();
    let waiter = target
        .locker(true, Duration::from_secs(2), waiting(ms(500)))
        .await;
    let acquiring = tokio::spawn(async move {
        let guard = waiter.acquire(key).await.unwrap();
        (Instant::now(), granted(&guard))
    });
    until_in_line(&mut connection, key, 1).await;
    for _ in 0..20 {
        let entries = expiry_set(&mut connection, key).await;
        let (member, expiry) = entries[0].clone();
        for forged in [expiry + 1, expiry - 1, expiry - 2_000, 0] {
            publish_grant(&mut connection, &member, forged).await;
        }
        sleep(ms(20)).await;
        assert!(!acquiring.is_finished(), "a forged grant was held");
    }
    let released = Instant::now();
    held.release().await.unwrap();
    let (at, _) = acquiring.await.unwrap();
    assert!(at >= released);
    holder.stop().await.unwrap();
}

/// Forgery: anyone who may `PUBLISH` on the node and read the line (`ZRANGE … WITHSCORES`)
/// sends the waiter `<id>:<its entry's expiry>` while another client holds the key: the waiter
/// holds a key it was never given, beside the holder. Before 92eea2a a forged message only made
/// the waiter ask (and be refused). Judged low severity (a client that may PUBLISH may usually
/// DEL keys too; only an ACL user with channel rights and no key rights gains something).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "judged low severity: a forged grant needs PUBLISH on the node and the waiter's entry expiry (see adv25a report)"]
async fn a_forged_grant_naming_the_waiters_expiry_is_not_held_while_another_holds() {
    let Some(target) = Target::start(Store::Redis, "adv25a").await else {
        return;
    };
    let key = "forged";
    let mut connection = connect(&target.servers[0].url()).await;
    let holder = target
        .locker(true, Duration::from_secs(10), RetryPolicy::none())
        .await;
    let held = holder.acquire(key).await.unwrap();
    let waiter = target
        .locker(true, Duration::from_secs(2), waiting(ms(500)))
        .await;
    let acquiring = tokio::spawn(async move {
        let guard = waiter.acquire(key).await.unwrap();
        (Instant::now(), granted(&guard))
    });
    until_in_line(&mut connection, key, 1).await;
    for _ in 0..20 {
        let entries = expiry_set(&mut connection, key).await;
        let (member, expiry) = entries[0].clone();
        publish_grant(&mut connection, &member, expiry).await;
        sleep(ms(20)).await;
        if acquiring.is_finished() {
            break;
        }
    }
    let still_held = get(&mut connection, key).await;
    assert!(
        !acquiring.is_finished(),
        "the waiter holds a key held by another client ({still_held:?}) on a forged grant"
    );
    held.release().await.unwrap();
    let _ = acquiring.await;
    holder.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Merged waits (8f15c79): a fake fair store on a paused clock
// ---------------------------------------------------------------------------------------------

mod fake {
    use std::sync::Mutex;
    use std::time::Duration;

    use lock_core::raw::{Handle, Lock, LockRequest, async_trait};
    use lock_core::{Capabilities, Key, Lease, LockError, Result};
    use tokio::time::Instant;

    /// A fair, distributed store: the key is held until `free_at` and then granted to whoever
    /// asks, and no message says so (the turn message was lost); the waiter is woken once at
    /// `woken_at` (its first-in-line timer, or a message whose turn its attempt still finds
    /// held). Records when each attempt was made.
    #[derive(Debug)]
    pub(crate) struct Store {
        pub(crate) free_at: Instant,
        pub(crate) woken_at: Mutex<Option<Instant>>,
        pub(crate) attempts: Mutex<Vec<Instant>>,
    }

    #[derive(Debug)]
    struct Granted(Lease);

    #[async_trait]
    impl Handle for Granted {
        fn lease(&self) -> &Lease {
            &self.0
        }
        async fn extend(&mut self, _ttl: Duration) -> Result<()> {
            Err(LockError::Unsupported {
                backend: "fake",
                capability: "extend",
            })
        }
        fn release(&mut self) -> lock_core::raw::Answer<'_, Result<()>> {
            lock_core::raw::Answer::later(async move { Ok(()) })
        }
    }

    #[async_trait]
    impl Lock for Store {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::NONE.with_distributed().with_fair()
        }
        fn try_acquire<'a>(
            &'a self,
            request: &'a LockRequest,
        ) -> lock_core::raw::Answer<'a, Result<Option<Box<dyn Handle>>>> {
            lock_core::raw::Answer::later(async move {
                let now = Instant::now();
                let mut attempts = self.attempts.lock().unwrap();
                attempts.push(now);
                assert!(attempts.len() < 10_000, "spinning");
                if now < self.free_at {
                    return Ok(None);
                }
                let lease = Lease::from_parts(
                    request.key_set().clone(),
                    request.kind(),
                    request.token().clone(),
                    now + request.ttl(),
                );
                Ok(Some(Box::new(Granted(lease)) as Box<dyn Handle>))
            })
        }
        fn abandon<'a>(
            &'a self,
            _request: &'a LockRequest,
        ) -> lock_core::raw::Answer<'a, Result<bool>> {
            lock_core::raw::Answer::later(async move { Ok(false) })
        }
        async fn wait_for_release(&self, _keys: &[Key], max_wait: Duration) -> Result<()> {
            tokio::time::sleep(max_wait).await;
            Ok(())
        }
        async fn wait_for_turn(&self, _request: &LockRequest, max_wait: Duration) -> Result<bool> {
            let until = Instant::now() + max_wait;
            let woken = *self.woken_at.lock().unwrap();
            if let Some(at) = woken.filter(|at| *at < until && *at >= Instant::now()) {
                tokio::time::sleep_until(at).await;
                *self.woken_at.lock().unwrap() = None;
                return Ok(true);
            }
            tokio::time::sleep(max_wait).await;
            Ok(false)
        }
    }
}

/// A fair waiter with a deadline policy (5 ms delays, 1 s deadline, polls every 200 ms) is
/// woken at 850 ms and its attempt finds the key still held; the key is freed at 900 ms with no
/// message (lost). Before 8f15c79 it asked again at the last delay before the deadline (995 ms)
/// and got the key; with the merged waits, the wake-up planned at the end of the merged wait
/// (1 000 ms, the deadline) is carried over the early attempt, and it waits to the deadline and
/// gives up without a last attempt: the promises "a deadline policy makes its last attempt
/// before the deadline" and "a lost message costs at most one poll" both break.
#[tokio::test(start_paused = true)]
async fn a_merged_wait_cut_by_an_early_wake_still_makes_the_last_attempt_before_the_deadline() {
    let started = Instant::now();
    let store = Arc::new(fake::Store {
        free_at: started + ms(900),
        woken_at: std::sync::Mutex::new(Some(started + ms(850))),
        attempts: std::sync::Mutex::new(Vec::new()),
    });
    let locker = Locker::from_arc(Arc::clone(&store) as Arc<dyn lock_core::raw::Lock>)
        .with_local_queue(false)
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(10))
                .with_retry(
                    RetryPolicy::forever()
                        .with_retry_delay(ms(5))
                        .with_retry_jitter(Duration::ZERO)
                        .with_deadline(ms(1_000)),
                ),
        )
        .unwrap();
    let outcome = locker.acquire("k").await;
    let attempts: Vec<u128> = store
        .attempts
        .lock()
        .unwrap()
        .iter()
        .map(|at| (*at - started).as_millis())
        .collect();
    println!(
        "attempts at {attempts:?} ms: {:?}",
        outcome.as_ref().map(|_| ())
    );
    assert!(
        attempts.contains(&850),
        "the early wake was not used: {attempts:?}"
    );
    assert!(
        outcome.is_ok(),
        "gave up with the key free since 900 ms and no attempt after 850 ms: attempts {attempts:?}, {outcome:?}"
    );
}

/// Control: the same waiter, not woken early, makes its last attempt at 995 ms and gets the key;
/// with counted retries (never merged) the early wake changes nothing either. Held.
#[tokio::test(start_paused = true)]
async fn merged_waits_control_last_attempt_without_early_wake_and_counted() {
    for (woken, retry) in [
        (
            None,
            RetryPolicy::forever()
                .with_retry_delay(ms(5))
                .with_retry_jitter(Duration::ZERO)
                .with_deadline(ms(1_000)),
        ),
        (
            Some(850),
            RetryPolicy::forever()
                .with_retry_count(RetryCount::Limited(10_000))
                .with_retry_delay(ms(5))
                .with_retry_jitter(Duration::ZERO)
                .with_deadline(ms(1_000)),
        ),
    ] {
        let started = Instant::now();
        let store = Arc::new(fake::Store {
            free_at: started + ms(900),
            woken_at: std::sync::Mutex::new(woken.map(|w| started + ms(w))),
            attempts: std::sync::Mutex::new(Vec::new()),
        });
        let locker = Locker::from_arc(Arc::clone(&store) as Arc<dyn lock_core::raw::Lock>)
            .with_local_queue(false)
            .with_options(
                LockOptions::default()
                    .with_ttl(Duration::from_secs(10))
                    .with_retry(retry),
            )
            .unwrap();
        let guard = locker.acquire("k").await;
        let attempts: Vec<u128> = store
            .attempts
            .lock()
            .unwrap()
            .iter()
            .map(|at| (*at - started).as_millis())
            .collect();
        println!("woken {woken:?}: attempts at {attempts:?}");
        let guard = guard.unwrap();
        assert!((*attempts.last().unwrap()) < 1_000);
        guard.release().await.unwrap();
    }
}

/// Real server: `stop()` ends a merged wait at once (at any point between two polls), and a
/// key freed without a message (a plain `DEL`: the turn message lost) is found within one poll
/// (200 ms) plus slack. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merged_wait_ends_at_stop_and_a_lost_message_costs_one_poll() {
    let Some(target) = Target::start(Store::Redis, "adv25a").await else {
        return;
    };
    let key = "merged";
    let url = target.servers[0].url();
    let mut connection = connect(&url).await;
    let holder = target
        .locker(true, Duration::from_secs(10), RetryPolicy::none())
        .await;
    for round in 0..5u64 {
        let held = holder.acquire(key).await.unwrap();
        let waiter = Arc::new(
            target
                .locker(true, Duration::from_secs(10), waiting(ms(5)))
                .await,
        );
        let w = Arc::clone(&waiter);
        let acquiring = tokio::spawn(async move { w.acquire(key).await });
        until_in_line(&mut connection, key, 1).await;
        sleep(ms(37 * round + 10)).await;
        let asked = Instant::now();
        waiter.stop().await.unwrap();
        let outcome = tokio::time::timeout(ms(150), acquiring)
            .await
            .expect("stop did not end the merged wait")
            .unwrap();
        assert!(
            matches!(outcome, Err(LockError::Stopped)),
            "{:?}",
            outcome.map(|_| ())
        );
        assert!(asked.elapsed() < ms(150));
        held.release().await.unwrap();
        let left = nothing_left(&target, key, ms(1_000)).await;
        assert!(left.is_empty(), "round {round}: left behind: {left:?}");
    }
    for round in 0..5u64 {
        let held = holder.acquire(key).await.unwrap();
        let waiter = target
            .locker(true, Duration::from_secs(10), waiting(ms(5)))
            .await;
        let acquiring = tokio::spawn(async move {
            let guard = waiter.acquire(key).await.unwrap();
            let at = Instant::now();
            guard.release().await.unwrap();
            waiter.stop().await.unwrap();
            at
        });
        until_in_line(&mut connection, key, 1).await;
        sleep(ms(41 * round + 5)).await;
        // The holder's key vanishes with no message (as if its release's message were lost).
        let _: i64 = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut connection)
            .await
            .unwrap();
        let freed = Instant::now();
        std::mem::forget(held);
        let at = acquiring.await.unwrap();
        println!("round {round}: found the freed key after {:?}", at - freed);
        assert!(at - freed <= ms(300), "round {round}: {:?}", at - freed);
    }
    holder.stop().await.unwrap();
}

/// The granted lock's validity (from its attempt's send time) must end before the key lapses on
/// the server: for every lock handed out under contention (drift factor 0: only the 2 ms floor
/// is left as margin), the key's expiry read at once (`PEXPIRETIME`, on the host's wall clock
/// the test shares with the server) comes after the guard's `valid_until` (measured so, a loaded host cannot fail it: the
/// expiry is stored in whole ms, so 1 to 2 ms of the 2 ms floor remain). Also with fencing on (no grant then, the
/// fences increase). Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_granted_locks_validity_ends_before_the_key_lapses_on_the_server() {
    let Some(target) = Target::start(Store::Redis, "adv25a").await else {
        return;
    };
    for fencing in [false, true] {
        let key = if fencing { "margin-fenced" } else { "margin" };
        let url = target.servers[0].url();
        let worst = Arc::new(std::sync::Mutex::new((i64::MAX, i64::MAX)));
        let grants = Arc::new(AtomicU64::new(0));
        let fences = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let locker = Locker::from_arc(Arc::new(
                Redlock::new(
                    RedlockConfig::new([url.clone()])
                        .with_fair(true)
                        .with_fencing(fencing)
                        .with_drift_factor(0.0),
                )
                .unwrap(),
            ))
            .with_options(
                LockOptions::default()
                    .with_ttl(ms(500))
                    .with_retry(waiting(ms(5))),
            )
            .unwrap();
            let mut connection = connect(&url).await;
            let (worst, grants, fences) =
                (Arc::clone(&worst), Arc::clone(&grants), Arc::clone(&fences));
            tasks.push(tokio::spawn(async move {
                for _ in 0..60 {
                    let guard = locker.acquire(key).await.unwrap();
                    // The key's expiry as the server holds it (Unix ms), set on this host's
                    // own wall clock: read into the monotonic clock at the answer, so that the
                    // time the read took (a loaded host) costs the bound nothing.
                    let expires_at: i64 = redis::cmd("PEXPIRETIME")
                        .arg(key)
                        .query_async(&mut connection)
                        .await
                        .unwrap();
                    // The wall clock first: a pause between the two reads errs on the lenient
                    // side (a later `now`), by as much as the pause.
                    let wall = std::time::SystemTime::now();
                    let now = Instant::now();
                    let wall_ms = wall
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_micros() as f64
                        / 1_000.0;
                    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                    let left = Duration::from_micros(
                        ((expires_at as f64 - wall_ms).max(0.0) * 1_000.0) as u64,
                    );
                    let lapses = now + left;
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
                    if let Some(fence) = guard.fencing_token() {
                        fences.lock().unwrap().push(fence);
                    }
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
            "fencing {fencing}: {} grants; worst margin {granted_worst} µs (granted), {asked_worst} µs (asked)",
            grants.load(Ordering::Relaxed)
        );
        assert!(granted_worst > 0, "{granted_worst} µs");
        assert!(asked_worst > 0, "{asked_worst} µs");
        if fencing {
            assert_eq!(grants.load(Ordering::Relaxed), 0, "a grant with fencing on");
            let fences = fences.lock().unwrap();
            let mut sorted = fences.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), fences.len(), "a fence drawn twice");
        } else {
            assert!(grants.load(Ordering::Relaxed) > 50, "vacuous");
        }
    }
}

/// Order: six waiters line up one after another behind a holder; each is handed the key by a
/// grant in the order it arrived, and half of them drop their guard instead of releasing it
/// (the drop's release passes the turn as well): the whole line is served within a second and
/// nothing is left. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_serve_the_line_in_order_and_a_dropped_granted_guard_passes_the_turn() {
    let Some(target) = Target::start(Store::Redis, "adv25a").await else {
        return;
    };
    let key = "order";
    let mut connection = connect(&target.servers[0].url()).await;
    let holder = target
        .locker(true, Duration::from_secs(10), RetryPolicy::none())
        .await;
    let held = holder.acquire(key).await.unwrap();
    let served = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for index in 0..6usize {
        let locker = target
            .locker(true, Duration::from_secs(5), waiting(ms(20)))
            .await;
        let served = Arc::clone(&served);
        tasks.push(tokio::spawn(async move {
            let guard = locker.acquire(key).await.unwrap();
            served
                .lock()
                .unwrap()
                .push((index, granted(&guard), Instant::now()));
            sleep(ms(5)).await;
            if index % 2 == 0 {
                drop(guard);
            } else {
                guard.release().await.unwrap();
            }
            sleep(ms(50)).await;
            locker.stop().await.unwrap();
        }));
        until_in_line(&mut connection, key, index + 1).await;
    }
    let released = Instant::now();
    held.release().await.unwrap();
    for task in tasks {
        tokio::time::timeout(ms(3_000), task)
            .await
            .unwrap()
            .unwrap();
    }
    let served = served.lock().unwrap().clone();
    let order: Vec<usize> = served.iter().map(|(index, _, _)| *index).collect();
    println!(
        "served {order:?}, grants {:?}, last after {:?}",
        served.iter().map(|s| s.1).collect::<Vec<_>>(),
        served.last().unwrap().2 - released
    );
    assert_eq!(order, (0..6).collect::<Vec<_>>());
    assert!(served.iter().all(|(_, granted, _)| *granted));
    assert!(served.last().unwrap().2 - released < ms(1_000));
    holder.stop().await.unwrap();
    let left = nothing_left(&target, key, ms(1_000)).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// A tiny ttl (40 ms: polls every 10 ms, a grant held only with 20 ms left): hold intervals,
/// each cut at the guard's validity, never overlap, and no update is lost. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_hammer_tiny_ttl_never_overlaps_within_validity() {
    let Some(target) = Target::start(Store::Redis, "adv25a").await else {
        return;
    };
    let key = "hammer-tiny";
    let (tally, intervals) = hammer(
        &target,
        key,
        6,
        ms(40),
        Duration::from_secs(3),
        |seed| [0, 0, 1, 2][(next(seed) % 4) as usize],
        |_| false,
        1,
    )
    .await;
    report(key, &tally, &intervals);
    assert_eq!(intervals.overlaps(), 0);
    assert!(tally.grants.load(Ordering::Relaxed) > 0, "vacuous");
}

/// Several tasks per client (the in-process queue in front of the line, on by default), three
/// clients, ttl 300 ms, one holder in ten dying: no two holders, no lost update. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_hammer_with_tasks_sharing_clients_never_overlaps() {
    let Some(target) = Target::start(Store::Redis, "adv25a").await else {
        return;
    };
    let key = "hammer-shared";
    let (tally, intervals) = hammer(
        &target,
        key,
        9,
        ms(300),
        Duration::from_secs(3),
        |seed| [0, 0, 1, 5][(next(seed) % 4) as usize],
        |seed| next(seed).is_multiple_of(10),
        3,
    )
    .await;
    report(key, &tally, &intervals);
    assert_eq!(intervals.overlaps(), 0);
    assert_eq!(tally.lost_updates.load(Ordering::Relaxed), 0);
    assert!(tally.grants.load(Ordering::Relaxed) > 0, "vacuous");
}

/// A granted holder dies holding (its guard forgotten, no keep-alive): the key lapses with the
/// reservation, at its line entry's expiry. The waiter behind it should be served about then, as
/// when the holder had asked (then it left the line, and the next waiter, first in line, was
/// told the holder's time left and asked at its expiry). A granted holder stays at the head of
/// the line while it holds, so the next waiter is never told it is first: it finds the key
/// free only at its next poll, up to 200 ms after it lapsed (2–4 ms before 92eea2a). Five
/// rounds, the second waiter arriving 0–160 ms later each time (its polls' phase): each within
/// 60 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waiter_behind_a_dead_granted_holder_is_served_when_the_key_lapses() {
    let Some(target) = Target::start(Store::Redis, "adv25a").await else {
        return;
    };
    let key = "dead-granted";
    let mut connection = connect(&target.servers[0].url()).await;
    let holder = target
        .locker(true, Duration::from_secs(10), RetryPolicy::none())
        .await;
    let mut lateness = Vec::new();
    for round in 0..5u64 {
        let held = holder.acquire(key).await.unwrap();
        let dying = target.locker(true, ms(1_000), waiting(ms(20))).await;
        let next = target.locker(true, ms(1_000), waiting(ms(20))).await;
        let first = tokio::spawn(async move {
            let guard = dying.acquire(key).await.unwrap();
            let got = (granted(&guard), Instant::now());
            std::mem::forget(guard);
            (dying, got)
        });
        until_in_line(&mut connection, key, 1).await;
        sleep(ms(40 * round)).await;
        let second = tokio::spawn(async move {
            let guard = next.acquire(key).await.unwrap();
            let at = Instant::now();
            guard.release().await.unwrap();
            next.stop().await.unwrap();
            at
        });
        until_in_line(&mut connection, key, 2).await;
        held.release().await.unwrap();
        let (dying, (was_granted, _)) = first.await.unwrap();
        assert!(was_granted, "round {round}: not on the new path");
        let asked = Instant::now();
        let pttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut connection)
            .await
            .unwrap();
        #[allow(clippy::cast_sign_loss)]
        let lapses = asked + ms(pttl.max(0) as u64);
        let served = tokio::time::timeout(ms(3_000), second)
            .await
            .unwrap()
            .unwrap();
        let late = served.saturating_duration_since(lapses);
        println!("round {round}: served {late:?} after the dead holder's key lapsed");
        lateness.push(late);
        dying.stop().await.unwrap();
    }
    holder.stop().await.unwrap();
    assert!(
        lateness.iter().all(|late| *late <= ms(60)),
        "the waiter behind a dead granted holder was served late: {lateness:?}"
    );
}

/// `stop()` of the waiter's client from 0 to 2 ms after the release that gives it the key went
/// out (before it read the grant, while it claims it, or with the guard out): the acquisition
/// ends (a guard or `Stopped`); when it ended with `Stopped`, nothing of it is left and the
/// waiter behind is served within a second. (A guard handed out before the `stop` and dropped
/// after it is not released: its key lapses with its ttl, as `Locker::stop` documents, granted
/// or not.) Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_around_the_grant_leaves_nothing_and_blocks_nobody() {
    let Some(target) = Target::start(Store::Redis, "adv25a").await else {
        return;
    };
    let key = "stopped";
    let mut connection = connect(&target.servers[0].url()).await;
    let holder = target
        .locker(true, Duration::from_secs(10), RetryPolicy::none())
        .await;
    let next = Arc::new(
        target
            .locker(true, Duration::from_secs(5), waiting(ms(20)))
            .await,
    );
    let mut stopped = 0;
    for round in 0..10u64 {
        let waiter = Arc::new(target.locker(true, ms(1_000), waiting(ms(20))).await);
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
        let Ok(served) = tokio::time::timeout(ms(3_000), behind).await else {
            let value = get(&mut connection, key).await;
            let pttl: i64 = redis::cmd("PTTL")
                .arg(key)
                .query_async(&mut connection)
                .await
                .unwrap();
            let line = expiry_set(&mut connection, key).await;
            panic!(
                "round {round} ({how}): the waiter behind was blocked; key {value:?} pttl {pttl}, line {line:?}"
            );
        };
        let served = served.unwrap();
        assert!(
            how != "Stopped" || served - released < ms(1_000),
            "round {round} ({how}): served {:?} after the release",
            served - released
        );
        println!(
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

/// Hostile network: two of five clients reach the node through a proxy that delays every chunk
/// 40 ms each way (their attempts, and the grants they hear, come late); ttl 300 ms. No two
/// holders within their validity. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_holding_grants_never_overlap_fast_ones() {
    let Some(target) = Target::start(Store::Redis, "adv25a").await else {
        return;
    };
    let key = "slow";
    let proxy = LatencyProxy::start(target.servers[0].port()).await.unwrap();
    proxy.set_delay(ms(40));
    let intervals = Arc::new(Intervals::default());
    let grants = Arc::new(AtomicU64::new(0));
    let slow_grants = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for client in 0..5usize {
        let slow = client < 2;
        let url = if slow {
            proxy.url()
        } else {
            target.servers[0].url()
        };
        let locker = redlock_locker(&[url], ms(300), waiting(ms(5)));
        let (intervals, grants, slow_grants) = (
            Arc::clone(&intervals),
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
        "{} sections, {} grants ({} to slow clients), {} overlaps",
        intervals.len(),
        grants.load(Ordering::Relaxed),
        slow_grants.load(Ordering::Relaxed),
        intervals.overlaps()
    );
    assert_eq!(intervals.overlaps(), 0);
    assert!(grants.load(Ordering::Relaxed) > 0, "vacuous");
}

/// RESP3 connections (`?protocol=resp3`): the anchored attempt's `{answer, expiry}` reply and the
/// grant still work (the waiter is handed the key by a grant), and nothing is left. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_work_over_resp3_connections() {
    let Some(target) = Target::start(Store::Redis, "adv25a").await else {
        return;
    };
    let key = "resp3";
    let url = format!("{}?protocol=resp3", target.servers[0].url());
    let mut connection = connect(&target.servers[0].url()).await;
    let holder = redlock_locker(std::slice::from_ref(&url), ms(10_000), RetryPolicy::none());
    let held = holder.acquire(key).await.unwrap();
    let waiter = redlock_locker(std::slice::from_ref(&url), ms(2_000), waiting(ms(20)));
    let acquiring = tokio::spawn(async move {
        let guard = waiter.acquire(key).await.unwrap();
        let was = granted(&guard);
        guard.release().await.unwrap();
        waiter.stop().await.unwrap();
        was
    });
    until_in_line(&mut connection, key, 1).await;
    held.release().await.unwrap();
    assert!(
        tokio::time::timeout(ms(3_000), acquiring)
            .await
            .unwrap()
            .unwrap(),
        "not handed the key by a grant over RESP3"
    );
    holder.stop().await.unwrap();
    let left = nothing_left(&target, key, ms(1_000)).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}

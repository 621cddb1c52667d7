//! adv26b: hostile tests of three follow-ups of the fair grant (98e9fbc and the two before it):
//! the one hand-over in line.lua (`line_give`, `line_give_back`), `TurnRegistry`'s anchoring by
//! key and its reading of turn messages from the end, and inc's subscribed client lining a
//! waiter up with its first attempt. Real redis-server processes on 127.0.0.1; every client is a
//! backend instance of its own (a process of its own, as far as the server can tell).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use lock_core::raw::wake::TurnRegistry;
use lock_core::raw::{KeySet, Lock, LockRequest};
use lock_core::{Locker, RetryPolicy, Token};
use lock_tests::fair::{Store, Target, connect, waiting};
use lock_tests::history::{FencedResource, Intervals};
use redis::aio::MultiplexedConnection;
use tokio::time::{Instant, sleep};

use lock_tests::inc_kit::{
    granted, inc_locker, line, line_key, ms, next, nothing_left, until_in_line,
};

/// Makes `locker` wait once (on a key of its own), so that its turn channel is subscribed.
async fn warm(target: &Target, locker: &Locker, key: &'static str) {
    let other = inc_locker(&target.url, true, ms(5_000), RetryPolicy::none()).await;
    let held = other.acquire(key).await.unwrap();
    let waiter = locker.clone();
    let waiting = tokio::spawn(async move { waiter.acquire(key).await.unwrap().release().await });
    let mut connection = connect(&target.url).await;
    until_in_line(&mut connection, key, 1).await;
    held.release().await.unwrap();
    waiting.await.unwrap().unwrap();
    other.stop().await.unwrap();
}

async fn kill_pubsub(connection: &mut MultiplexedConnection) -> i64 {
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(connection)
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// TurnRegistry::wake_message: waiter ids with ':'
// ---------------------------------------------------------------------------------------------

/// Raw API: two waiters of one client whose ids are `a` and `a:5`. The one-node Redlock grant
/// of `a:5` (`a:5:<expiry>`, no fence) must wake `a:5` with its grant, not `a` (reading
/// `a`, expiry 5, fence `<expiry>`), and inc's grant of `a` (`a:<expiry>:<fence>`) must reach `a`
/// while a waiter `a:<expiry>` listens too.
#[test]
fn wake_message_names_the_waiter_whose_place_the_grant_names() {
    let turns = TurnRegistry::default();
    let sent = tokio::time::Instant::now();
    turns.listen("a");
    turns.listen("a:5");
    turns.anchor("a", "k1", sent, 1_000);
    turns.anchor("a:5", "k2", sent, 2_000);
    assert!(turns.wake_message("a:5:2000"));
    assert!(
        turns.granted("a:5", "k2").is_some(),
        "the Redlock grant of `a:5` was not heard by `a:5`"
    );
    // Inc's grant of `a` while `a:1000` listens too.
    turns.listen("a:1000");
    turns.anchor("a:1000", "k3", sent, 7);
    assert!(turns.wake_message("a:1000:7"));
    assert!(
        turns.granted("a", "k1").is_some(),
        "the inc grant of `a` was not heard by `a`"
    );
}

// `TurnRegistry::taken_back`'s pruning (quadratic before 9a27afa: 40 000 take-backs within a
// ttl took 8.7 s) is counted, not timed, in lock-core's
// `raw::wake::tests::many_take_backs_within_a_ttl_prune_a_logarithmic_number_of_times`.

// ---------------------------------------------------------------------------------------------
// inc: a subscribed client's first attempt lines up
// ---------------------------------------------------------------------------------------------

/// `try_acquire` (no waiter) on a client that waited before never joins a line: many tries on a
/// held key leave the line empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_subscribed_try_acquire_never_lines_up() {
    let Some(target) = Target::start(Store::Inc, "adv26b").await else {
        return;
    };
    let subscribed = inc_locker(&target.url, true, ms(5_000), waiting(ms(50))).await;
    warm(&target, &subscribed, "warm-try").await;
    let holder = inc_locker(&target.url, true, ms(5_000), RetryPolicy::none()).await;
    let key = "try";
    let held = holder.acquire(key).await.unwrap();
    let mut connection = connect(&target.url).await;
    for _ in 0..20 {
        assert!(subscribed.try_acquire(key).await.unwrap().is_none());
        // A single-attempt policy has no waiter either.
        assert!(
            subscribed
                .acquire_with(
                    key,
                    &lock_core::LockOptions::default().with_retry(RetryPolicy::none())
                )
                .await
                .is_err()
        );
        assert!(line(&mut connection, key).await.is_empty());
    }
    held.release().await.unwrap();
    assert!(subscribed.try_acquire(key).await.unwrap().is_some_and(|g| {
        drop(g);
        true
    }));
    subscribed.stop().await.unwrap();
    holder.stop().await.unwrap();
    let left = nothing_left(&target, key, ms(1_000)).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The server's count of script calls (`EVALSHA` and `EVAL`) so far.
async fn script_calls(connection: &mut MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(connection)
        .await
        .unwrap();
    info.lines()
        .filter(|line| line.starts_with("cmdstat_evalsha:") || line.starts_with("cmdstat_eval:"))
        .filter_map(|line| {
            line.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Uncontended acquisitions of a subscribed client (its first attempts ask in line) are one
/// script call each, as a fresh client's single try is, and leave no line behind, while held
/// or after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_subscribed_uncontended_acquisitions_are_one_call_and_leave_no_line() {
    let Some(target) = Target::start(Store::Inc, "adv26b").await else {
        return;
    };
    let subscribed = inc_locker(&target.url, true, ms(5_000), waiting(ms(50))).await;
    warm(&target, &subscribed, "warm-quiet").await;
    let mut connection = connect(&target.url).await;
    let key = "quiet";
    // Scripts loaded.
    subscribed
        .acquire(key)
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    for round in 0..30 {
        let before = script_calls(&mut connection).await;
        let guard = subscribed.acquire(key).await.unwrap();
        let calls = script_calls(&mut connection).await - before;
        assert_eq!(calls, 1, "round {round}: {calls} script calls to acquire");
        assert!(!granted(&guard));
        assert!(target.line_keys(key).await.is_empty(), "round {round}");
        guard.release().await.unwrap();
        assert!(target.line_keys(key).await.is_empty(), "round {round}");
    }
    subscribed.stop().await.unwrap();
    let left = nothing_left(&target, key, ms(1_000)).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// A subscribed client's waiter is cancelled 0–14 ms into its acquisition (while it listens,
/// while its first attempt lines it up, or once in line), while the holder releases around that
/// time (the waiter may be the head, given the lock, when cancelled). A waiter of a fresh
/// client behind it is served within a second of the release, not after the cancelled one's 5 s
/// ttl, and nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_subscribed_first_attempt_cancelled_leaves_nothing_and_blocks_nobody() {
    let Some(target) = Target::start(Store::Inc, "adv26b").await else {
        return;
    };
    let subscribed = inc_locker(&target.url, true, ms(5_000), waiting(ms(5_000))).await;
    warm(&target, &subscribed, "warm-cancel").await;
    let holder = inc_locker(&target.url, true, ms(5_000), RetryPolicy::none()).await;
    let key = "cancel";
    let mut slow = Duration::ZERO;
    for round in 0..15u64 {
        let held = holder.acquire(key).await.unwrap();
        let cancelled = subscribed.clone();
        let cut =
            tokio::spawn(
                async move { tokio::time::timeout(ms(round), cancelled.acquire(key)).await },
            );
        sleep(ms(round / 2)).await;
        let fresh = inc_locker(&target.url, true, ms(5_000), waiting(ms(100))).await;
        let behind = fresh.clone();
        let acquiring = tokio::spawn(async move {
            let guard = behind.acquire(key).await.unwrap();
            (guard, Instant::now())
        });
        sleep(ms(3)).await;
        let released = Instant::now();
        held.release().await.unwrap();
        if let Ok(Ok(guard)) = cut.await.unwrap() {
            guard.release().await.unwrap();
        }
        let (guard, at) = tokio::time::timeout(ms(3_000), acquiring)
            .await
            .unwrap_or_else(|_| panic!("round {round}: the waiter behind was not served"))
            .unwrap();
        slow = slow.max(at - released);
        assert!(
            at - released < ms(1_000),
            "round {round}: served {:?} after the release",
            at - released
        );
        guard.release().await.unwrap();
        fresh.stop().await.unwrap();
        let left = nothing_left(&target, key, ms(1_000)).await;
        assert!(left.is_empty(), "round {round}: left behind: {left:?}");
    }
    println!("slowest: {slow:?}");
    subscribed.stop().await.unwrap();
    holder.stop().await.unwrap();
}

/// The subscribed client's subscriber connection is killed (`CLIENT KILL TYPE pubsub`) just
/// before its waiter's first attempt, which lines up at once (the client thinks it is
/// subscribed); the holder releases 0–100 ms later, its grant message maybe lost while fred
/// resubscribes. The waiter (ttl 2 s, policy delay 5 s) is served within its poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_subscribed_waiter_after_a_lost_subscription_is_served_within_its_poll() {
    let Some(target) = Target::start(Store::Inc, "adv26b").await else {
        return;
    };
    let subscribed = inc_locker(&target.url, true, ms(2_000), waiting(ms(5_000))).await;
    warm(&target, &subscribed, "warm-deaf").await;
    let holder = inc_locker(&target.url, true, ms(10_000), RetryPolicy::none()).await;
    let mut connection = connect(&target.url).await;
    let key = "deaf";
    for (round, gap) in [0u64, 1, 5, 20, 100, 0, 3].into_iter().enumerate() {
        let held = holder.acquire(key).await.unwrap();
        let killed = kill_pubsub(&mut connection).await;
        let waiter = subscribed.clone();
        let acquiring = tokio::spawn(async move {
            let guard = waiter.acquire(key).await.unwrap();
            (guard, Instant::now())
        });
        until_in_line(&mut connection, key, 1).await;
        sleep(ms(gap)).await;
        let released = Instant::now();
        held.release().await.unwrap();
        let (guard, at) = tokio::time::timeout(ms(3_000), acquiring)
            .await
            .unwrap_or_else(|_| panic!("round {round}: not served within 3 s"))
            .unwrap();
        println!(
            "round {round} (gap {gap} ms, killed {killed}): served {:?} after the release, granted {}",
            at - released,
            granted(&guard)
        );
        assert!(
            at - released < ms(900),
            "round {round}: {:?}",
            at - released
        );
        guard.release().await.unwrap();
        let left = nothing_left(&target, key, ms(1_000)).await;
        assert!(left.is_empty(), "round {round}: left behind: {left:?}");
    }
    subscribed.stop().await.unwrap();
    holder.stop().await.unwrap();
}

/// Many waiters sharing one subscribed client, and fresh clients made for every acquisition,
/// on one key with a 60 ms ttl: acquisitions cut at every point (0–12 ms), holders that die
/// holding, the subscriber connections killed every 45 ms and `SCRIPT FLUSH` every 70 ms.
/// Within their validity no two holders overlap, fencing tokens increase, every task keeps
/// being served, and nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_shared_subscribed_and_fresh_clients_hammer_never_overlaps() {
    let Some(target) = Target::start(Store::Inc, "adv26b").await else {
        return;
    };
    let key = "hammer";
    let run = ms(4_000);
    let shared = Arc::new(inc_locker(&target.url, true, ms(60), waiting(ms(3))).await);
    warm(&target, &shared, "warm-hammer").await;
    let intervals = Arc::new(Intervals::default());
    let resource = Arc::new(FencedResource::default());
    let (sections, grants, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let mut chaos_connection = connect(&target.url).await;
    let chaos_stop = Arc::clone(&stop);
    let chaos = tokio::spawn(async move {
        let mut tick = 0u64;
        while chaos_stop.load(Ordering::Relaxed) == 0 {
            sleep(ms(5)).await;
            tick += 5;
            if tick.is_multiple_of(45) {
                let _ = kill_pubsub(&mut chaos_connection).await;
            }
            if tick.is_multiple_of(70) {
                let _: Result<(), _> = redis::cmd("SCRIPT")
                    .arg("FLUSH")
                    .query_async(&mut chaos_connection)
                    .await;
            }
        }
    });
    let mut tasks = Vec::new();
    for task in 0..8u64 {
        let fresh = task >= 6;
        let shared = Arc::clone(&shared);
        let url = target.url.clone();
        let (intervals, resource, sections, grants) = (
            Arc::clone(&intervals),
            Arc::clone(&resource),
            Arc::clone(&sections),
            Arc::clone(&grants),
        );
        tasks.push(tokio::spawn(async move {
            let mut seed = 0x2545_F491_4F6C_DD1D ^ ((task + 1) * 104_729);
            let end = Instant::now() + run;
            let mut served = 0u64;
            let mut last_served = Instant::now();
            while Instant::now() < end {
                let locker = if fresh {
                    Arc::new(inc_locker(&url, true, ms(60), waiting(ms(3))).await)
                } else {
                    Arc::clone(&shared)
                };
                let attempt = async {
                    if next(&mut seed).is_multiple_of(4) {
                        let limit = ms(next(&mut seed) % 13);
                        tokio::time::timeout(limit, locker.acquire(key)).await.ok()
                    } else {
                        Some(locker.acquire(key).await)
                    }
                };
                if let Some(guard) = attempt.await {
                    let guard = guard.unwrap();
                    let acquired = Instant::now();
                    if granted(&guard) {
                        grants.fetch_add(1, Ordering::Relaxed);
                    }
                    if guard.is_valid() {
                        resource.write(guard.fencing_token().unwrap());
                    }
                    let hold = [0, 1, 2, 5][(next(&mut seed) % 4) as usize];
                    sleep(ms(hold)).await;
                    intervals.record(acquired, Instant::now().min(guard.valid_until()));
                    sections.fetch_add(1, Ordering::Relaxed);
                    served += 1;
                    last_served = Instant::now();
                    if next(&mut seed).is_multiple_of(12) {
                        std::mem::forget(guard);
                    } else {
                        let _ = guard.release().await;
                    }
                }
                if fresh {
                    locker.stop().await.unwrap();
                }
            }
            (task, served, end.saturating_duration_since(last_served))
        }));
    }
    let mut starved = Vec::new();
    for task in tasks {
        let (task, served, since) = task.await.unwrap();
        if served == 0 || since > ms(1_500) {
            starved.push((task, served, since));
        }
    }
    stop.store(1, Ordering::Relaxed);
    chaos.await.unwrap();
    Arc::try_unwrap(shared).ok().unwrap().stop().await.unwrap();
    let overlaps = intervals.overlaps();
    println!(
        "sections {}, grants {}, overlaps {overlaps}, stale {}",
        sections.load(Ordering::Relaxed),
        grants.load(Ordering::Relaxed),
        resource.stale_writes()
    );
    assert_eq!(overlaps, 0, "holders overlapped within their validity");
    assert_eq!(
        resource.stale_writes(),
        0,
        "a stale fencing token was written"
    );
    assert!(starved.is_empty(), "tasks not served lately: {starved:?}");
    let left = nothing_left(&target, key, ms(1_000)).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}

// ---------------------------------------------------------------------------------------------
// line.lua: a line whose expiry index lost an entry (eviction)
// ---------------------------------------------------------------------------------------------

/// A waiter's process dies in line (raw API: its attempt lined it up, nobody takes it back),
/// then the line's expiry index (`…:queue-expiry`) is evicted (a server under `maxmemory` with
/// a volatile policy: both keys carry a ttl; shown here by deleting it). A live waiter lines
/// up behind the dead entry, which now has no expiry. The holder's release must not fail, and
/// the live waiter must get the lock within its lease: the dead entry, whose expiry is unknown,
/// must not head the line for good (before, the release's hand-over did arithmetic on its
/// missing expiry and raised a script error, and every attempt of the live waiter, which keeps
/// renewing the line's ttl, found the dead member first).
async fn a_line_entry_without_expiry(store: Store, key: &'static str) {
    let Some(target) = Target::start(store, "adv26b").await else {
        return;
    };
    let (line, expiry_index): (Vec<u8>, Vec<u8>) = match store {
        Store::Inc => (
            line_key(key).into_bytes(),
            format!("{}-expiry", line_key(key)).into_bytes(),
        ),
        _ => (
            [key.as_bytes(), b"\xff:queue"].concat(),
            [key.as_bytes(), b"\xff:queue-expiry"].concat(),
        ),
    };
    let mut connection = connect(&target.url).await;
    let in_line = |connection: &mut MultiplexedConnection, count: i64| {
        let mut connection = connection.clone();
        let line = line.clone();
        async move {
            for _ in 0..2_000 {
                let members: i64 = redis::cmd("ZCARD")
                    .arg(&line)
                    .query_async(&mut connection)
                    .await
                    .unwrap();
                if members >= count {
                    return;
                }
                sleep(ms(2)).await;
            }
            panic!("nobody lined up");
        }
    };
    let holder = target.locker(true, ms(10_000), RetryPolicy::none()).await;
    let held = holder.acquire(key).await.unwrap();
    // The dead waiter: one in-line attempt, never taken back.
    let dead = target.backend(true).await;
    let attempt = LockRequest::new(
        KeySet::one(lock_core::Key::new(key).unwrap()),
        Token::generate().unwrap(),
        ms(600),
    )
    .unwrap()
    .with_waiter(Token::generate().unwrap())
    .with_after_wait(true)
    .with_will_wait(true);
    assert!(dead.try_acquire(&attempt).await.unwrap().is_none());
    drop(dead);
    in_line(&mut connection, 1).await;
    // The expiry index is evicted.
    let deleted: i64 = redis::cmd("DEL")
        .arg(&expiry_index)
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    let live = target.locker(true, ms(600), waiting(ms(50))).await;
    let waiter = live.clone();
    let acquiring = tokio::spawn(async move {
        let guard = waiter.acquire(key).await;
        (guard, Instant::now())
    });
    in_line(&mut connection, 2).await;
    let released = Instant::now();
    let release = held.release().await;
    println!("{store:?}: the holder's release: {release:?}");
    let (guard, at) = tokio::time::timeout(ms(5_000), acquiring)
        .await
        .expect("the live waiter was not served within 5 s of the release")
        .unwrap();
    println!("{store:?}: live waiter served after {:?}", at - released);
    release.unwrap();
    let guard = guard.unwrap();
    assert!(
        at - released < ms(1_500),
        "served {:?} after the release",
        at - released
    );
    guard.release().await.unwrap();
    live.stop().await.unwrap();
    holder.stop().await.unwrap();
    let left: Vec<String> = target.line_keys(key).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_a_line_entry_without_expiry_does_not_block_the_line_for_good() {
    a_line_entry_without_expiry(Store::Inc, "evicted").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_line_entry_without_expiry_does_not_block_the_line_for_good() {
    a_line_entry_without_expiry(Store::Redis, "evicted-one-node").await;
}

//! The line's keys take some slack (session 28): a join sets their expiry only when it would
//! outlive them, to a quarter of its lease past its own entry, so the joins of a busy line leave
//! them alone; they never expire before an entry still in line, and are gone at most a quarter
//! lease after the latest entry. A Redis without `PEXPIRETIME` (before 7) sets them at every join. A
//! line of lapsed entries only, its keys still there, holds up no single try.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::RetryPolicy;
use lock_tests::fair::{Store, Target, connect, lapsed_line, line_names};
use lock_tests::server::{RedisServer, redis_or_skip};
use redis::aio::MultiplexedConnection;

const STORES: [Store; 3] = [Store::Redis, Store::Redlock3, Store::Inc];

/// Both line keys' `PEXPIRETIME` (-2 when gone, -1 without an expiry).
async fn keys_expire_at(c: &mut MultiplexedConnection, names: &[Vec<u8>; 2]) -> [i64; 2] {
    let mut at = [0; 2];
    for (slot, name) in at.iter_mut().zip(names) {
        *slot = redis::cmd("PEXPIRETIME")
            .arg(name)
            .query_async(c)
            .await
            .unwrap();
    }
    at
}

/// The entries' expiries (ms), as the line's expiry index holds them.
async fn entry_expiries(c: &mut MultiplexedConnection, names: &[Vec<u8>; 2]) -> Vec<i64> {
    let entries: Vec<(Vec<u8>, f64)> = redis::cmd("ZRANGE")
        .arg(&names[1])
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(c)
        .await
        .unwrap();
    entries.into_iter().map(|(_, at)| at as i64).collect()
}

/// The server's clock in ms.
async fn server_ms(c: &mut MultiplexedConnection) -> i64 {
    let (seconds, micros): (i64, i64) = redis::cmd("TIME").query_async(c).await.unwrap();
    seconds * 1_000 + micros / 1_000
}

/// Seven joins behind the first in a held key's line leave the keys' expiry as the first one
/// set it (a quarter lease past its entry), and that expiry is past every entry.
async fn busy_joins_leave_the_keys_alone(store: Store) {
    let Some(target) = Target::start(store, "line slack").await else {
        return;
    };
    let key = "busy";
    let names = line_names(store, key);
    let holder = target
        .locker(true, Duration::from_secs(10), RetryPolicy::none())
        .await;
    let guard = holder.acquire(key).await.unwrap();
    let lease = Duration::from_secs(10);
    target.dead_waiter(key, lease).await;
    let mut c = connect(&target.servers[0].url()).await;
    let first = keys_expire_at(&mut c, &names).await;
    for _ in 0..7 {
        target.dead_waiter(key, lease).await;
    }
    let after = keys_expire_at(&mut c, &names).await;
    let entries = entry_expiries(&mut c, &names).await;
    println!("S28 ({store:?}): keys expire at {first:?} then {after:?}; entries {entries:?}");
    assert_eq!(entries.len(), 8, "eight waiters in line");
    assert_eq!(
        first, after,
        "a join that did not outlive the keys set their expiry"
    );
    let latest = *entries.iter().max().unwrap();
    assert!(
        first.iter().all(|at| *at >= latest),
        "a line key expires at {first:?}, before an entry (latest {latest})"
    );
    assert!(
        first[0] == first[1]
            && (entries[0] + 10_000 / 4 - 5..=entries[0] + 10_000 / 4).contains(&first[0]),
        "the first join set the keys to {first:?}, not a quarter lease past its entry {}",
        entries[0]
    );
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_of_a_busy_line_leave_its_keys_expiry_alone_redis() {
    busy_joins_leave_the_keys_alone(Store::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_of_a_busy_line_leave_its_keys_expiry_alone_inc() {
    busy_joins_leave_the_keys_alone(Store::Inc).await;
}

/// Waiters that die in line: the keys expire past every entry, at most a quarter lease after
/// the latest, and once that has passed nothing of the lock is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_line_is_gone_a_quarter_lease_after_its_latest_entry() {
    let lease = Duration::from_millis(400);
    for store in STORES {
        let Some(target) = Target::start(store, "line slack").await else {
            return;
        };
        let key = "dead-line";
        let names = line_names(store, key);
        let holder = target
            .locker(true, Duration::from_secs(10), RetryPolicy::none())
            .await;
        let guard = holder.acquire(key).await.unwrap();
        for _ in 0..3 {
            target.dead_waiter(key, lease).await;
        }
        let mut c = connect(&target.servers[0].url()).await;
        let joined = server_ms(&mut c).await;
        let at = keys_expire_at(&mut c, &names).await;
        let latest = *entry_expiries(&mut c, &names).await.iter().max().unwrap();
        println!("S28 ({store:?}): last join by {joined}, entries to {latest}, keys to {at:?}");
        for expires in at {
            assert!(expires >= latest, "a line key expires before an entry");
            assert!(
                expires <= latest + 400 / 4,
                "a line key expires at {expires}, past a quarter lease after the latest entry"
            );
        }
        guard.release().await.unwrap();
        holder.stop().await.unwrap();
        tokio::time::sleep(Duration::from_millis(400 + 100 + 300)).await;
        let left = target.keys().await;
        assert!(left.is_empty(), "{store:?}: left behind: {left:?}");
    }
}

/// A server without `PEXPIRETIME` (as Redis before 7): every join sets the keys' expiry, still
/// past every entry; contending fair clients take turns one at a time and leave nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pexpiretime_every_join_sets_the_keys() {
    let Some(binary) = redis_or_skip("line slack") else {
        return;
    };
    for store in [Store::Redis, Store::Inc] {
        let server = RedisServer::start(&binary, &["--rename-command", "PEXPIRETIME", ""]).unwrap();
        let url = server.url();
        let target = Target {
            store,
            servers: vec![server],
            url,
        };
        let key = "old-server";
        let names = line_names(store, key);
        let holder = target
            .locker(true, Duration::from_secs(10), RetryPolicy::none())
            .await;
        let guard = holder.acquire(key).await.unwrap();
        let mut c = connect(&target.url).await;
        let ttl = |c: &mut MultiplexedConnection| {
            let names = names.clone();
            let mut c = c.clone();
            async move {
                // Absolute (the server's clock in ms), as PEXPIRETIME would answer.
                let now = server_ms(&mut c).await;
                let mut at = Vec::new();
                for name in &names {
                    let left: i64 = redis::cmd("PTTL")
                        .arg(name)
                        .query_async(&mut c)
                        .await
                        .unwrap();
                    assert!(left > 0, "a line key without expiry");
                    at.push(now + left);
                }
                at
            }
        };
        target.dead_waiter(key, Duration::from_secs(10)).await;
        let first = ttl(&mut c).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        target.dead_waiter(key, Duration::from_secs(10)).await;
        let second = ttl(&mut c).await;
        println!("S28 ({store:?}, no PEXPIRETIME): keys expire at {first:?} then {second:?}");
        assert!(
            second
                .iter()
                .zip(&first)
                .all(|(later, earlier)| *later >= earlier + 40),
            "the second join did not set the keys' expiry: {first:?} then {second:?}"
        );
        guard.release().await.unwrap();
        holder.stop().await.unwrap();
        // Contending clients take turns one at a time.
        let inside = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let locker = target
                .locker(
                    true,
                    Duration::from_secs(2),
                    lock_tests::fair::waiting(Duration::from_millis(20)),
                )
                .await;
            let inside = std::sync::Arc::clone(&inside);
            tasks.push(tokio::spawn(async move {
                for _ in 0..15 {
                    let guard = locker.acquire("contended").await.unwrap();
                    assert!(
                        !inside.swap(true, std::sync::atomic::Ordering::SeqCst),
                        "two holders"
                    );
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    inside.store(false, std::sync::atomic::Ordering::SeqCst);
                    guard.release().await.unwrap();
                }
                locker.stop().await.unwrap();
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert!(
            target.line_keys("contended").await.is_empty(),
            "{store:?}: the line outlived its last waiter"
        );
    }
}

/// A line whose entries all lapsed while its keys are still there (the slack): a single try
/// takes the key, and the line is gone after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_try_takes_a_key_whose_line_holds_only_lapsed_entries() {
    for store in STORES {
        let Some(target) = Target::start(store, "line slack").await else {
            return;
        };
        let key = "lapsed-line";
        let holder = target
            .locker(true, Duration::from_secs(10), RetryPolicy::none())
            .await;
        let guard = holder.acquire(key).await.unwrap();
        // Its entry lapses in 1 s; the line's keys stay 250 ms longer.
        target.dead_waiter(key, Duration::from_secs(1)).await;
        guard.release().await.unwrap();
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        assert!(
            !target.line_keys(key).await.is_empty(),
            "{store:?}: the line's keys are gone with its entry: this test shows nothing"
        );
        let taken = holder.try_acquire(key).await.unwrap();
        assert!(
            taken.is_some(),
            "{store:?}: a line of lapsed entries held up a single try"
        );
        taken.unwrap().release().await.unwrap();
        assert!(
            target.line_keys(key).await.is_empty(),
            "{store:?}: the lapsed line outlived the try"
        );
    }
}

/// A waiter's attempt behind a holder on one Redlock node reads the key once: the turn's check
/// and the gate share the read (session 28; two `GET`s before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redlock_waiter_s_attempt_reads_the_key_once() {
    let Some(target) = Target::start(Store::Redis, "line slack").await else {
        return;
    };
    let key = "one-read";
    let holder = target
        .locker(true, Duration::from_secs(10), RetryPolicy::none())
        .await;
    let guard = holder.acquire(key).await.unwrap();
    let mut c = connect(&target.url).await;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut c)
        .await
        .unwrap();
    target.dead_waiter(key, Duration::from_secs(10)).await;
    let gets = target.servers[0].calls("get").unwrap();
    println!("S28: a waiter's attempt (and its client's shutdown): {gets} GET");
    assert_eq!(gets, 1, "the attempt read the key {gets} times");
    guard.release().await.unwrap();
}

/// Broken in session 28 (the give-back retry): three fair nodes, the third behind a 50 ms proxy
/// with a line of one lapsed entry on it. The plain round is won by the two fast nodes, and the
/// release is sent at once: on the slow node it lands behind the plain `SET` and deletes it
/// (so that node is not sent the release again), and the attempt's give-back then found nothing
/// and its second `SET` took the key again, left there for the whole ttl. The give-back and
/// the retry are now one script that retakes the key only if the first write was still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_landing_between_the_give_back_s_writes_leaves_nothing() {
    let Some(_) = redis_or_skip("line slack give-back") else {
        return;
    };
    let nodes = lock_tests::nodes::Nodes::start().await;
    let (servers, proxy) = (&nodes.servers, &nodes.proxy);
    let lock = lock_redlock::Redlock::new(
        lock_redlock::RedlockConfig::new(nodes.urls())
            .with_fair(true)
            .with_node_timeout(Duration::from_secs(2)),
    )
    .unwrap();
    let locker = lock_core::Locker::new(lock)
        .with_options(
            lock_core::LockOptions::default()
                .with_ttl(Duration::from_secs(10))
                .with_retry(RetryPolicy::none()),
        )
        .unwrap();
    // Warm up connections and scripts.
    locker
        .acquire("warm")
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    lapsed_line(&servers[2].url(), "k").await;
    proxy.set_delay(Duration::from_millis(50));
    locker.acquire("k").await.unwrap().release().await.unwrap();
    // The slow node's exchange: a few 100 ms round trips, then any re-sends.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for (index, server) in servers.iter().enumerate() {
        let value = server.command("GET k", Duration::from_secs(2)).unwrap();
        let pttl = server.command("PTTL k", Duration::from_secs(2)).unwrap();
        assert_eq!(
            pttl, ":-2",
            "node {index}: the key is left after its release (value {value})"
        );
    }
    locker.stop().await.unwrap();
}

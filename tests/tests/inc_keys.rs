//! What the INCR lock keeps in Redis, and which keys it touches: purge removes exactly its own
//! locks for any configured prefix (glob characters, hash-tag braces, unicode), on one server
//! and on a Redis Cluster; the bookkeeping keys go away once locks are released and their ttl
//! has passed, while fencing tokens keep increasing; keys that look like the library's own
//! bookkeeping keys are independent locks.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use fred::prelude::{ClientLike, KeysInterface};
use lock_core::{LockError, LockGuard, LockOptions, Locker, RetryPolicy};
use lock_inc::{IncConfig, IncLock};
use lock_tests::server::{RedisServer, cluster_url, redis_or_skip, start_cluster};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use tokio::time::Instant;

const PROBE: Duration = Duration::from_millis(500);

fn locker(lock: &IncLock, ttl: Duration) -> Locker {
    Locker::new(lock.clone())
        .with_options(
            LockOptions::default()
                .with_ttl(ttl)
                .with_retry(RetryPolicy::none()),
        )
        .expect("options")
}

/// The servers of one test: a single server, or the primaries of a cluster; and the URL the
/// library connects to.
struct Deployment {
    servers: Vec<RedisServer>,
    url: String,
}

impl Deployment {
    fn single(binary: &std::path::Path) -> Self {
        let server = RedisServer::start(binary, &[]).expect("server");
        let url = server.url();
        Self {
            servers: vec![server],
            url,
        }
    }

    fn cluster(binary: &std::path::Path) -> Self {
        let servers = start_cluster(binary, 3).expect("cluster");
        let url = cluster_url(&servers);
        Self { servers, url }
    }

    /// A backend with `prefix`; generous command timeout, as the machine is shared.
    async fn lock(&self, prefix: &str) -> IncLock {
        IncLock::connect(IncConfig {
            prefix: prefix.to_owned(),
            command_timeout: 5_000,
            ..IncConfig::new(self.url.clone())
        })
        .await
        .expect("connect")
    }

    /// A plain fred client (cluster-aware) to write keys of our own.
    async fn raw(&self) -> fred::clients::Client {
        let config = fred::prelude::Config::from_url(&self.url).expect("fred config");
        let client = fred::types::Builder::from_config(config)
            .build()
            .expect("client");
        client.init().await.expect("connect");
        client
    }

    fn flush(&self) {
        for server in &self.servers {
            assert_eq!(server.command("FLUSHALL", PROBE).expect("FLUSHALL"), "+OK");
        }
    }

    /// Every key on every node, by `SCAN` (which also drops the expired keys it meets).
    async fn keys(&self) -> BTreeSet<Vec<u8>> {
        let mut all = BTreeSet::new();
        for server in &self.servers {
            let mut con = redis::Client::open(server.url())
                .expect("client")
                .get_multiplexed_async_connection()
                .await
                .expect("connection");
            let mut cursor = 0u64;
            loop {
                let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut con)
                    .await
                    .expect("SCAN");
                all.extend(keys);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        all
    }

    /// `DBSIZE` summed over the nodes: keys in memory, expired ones not yet reclaimed included.
    fn dbsize(&self) -> u64 {
        self.servers
            .iter()
            .map(|server| {
                let reply = server.command("DBSIZE", PROBE).expect("DBSIZE");
                reply
                    .trim_start_matches(':')
                    .parse::<u64>()
                    .expect("integer")
            })
            .sum()
    }
}

/// One purge scenario: backends with `prefixes` side by side, each holding the locks `keys`,
/// beside keys of other shapes that share each prefix; then the backend `purger` purges
/// `purge_prefix`.
#[derive(Clone, Debug)]
struct PurgeCase {
    prefixes: Vec<String>,
    keys: Vec<String>,
    purger: usize,
    purge_prefix: String,
}

impl PurgeCase {
    fn new(prefixes: &[&str], keys: &[&str], purger: usize, purge_prefix: &str) -> Self {
        Self {
            prefixes: prefixes.iter().map(|p| (*p).to_owned()).collect(),
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            purger,
            purge_prefix: purge_prefix.to_owned(),
        }
    }

    /// Two backends share keys only when one's prefix is the other's followed by `{` (the lock
    /// `x}{y` under `a` is the lock `y` under `a{x}`): such prefixes are not independent
    /// namespaces, and a purge cannot tell their locks apart.
    fn prefixes_are_independent(prefixes: &[String]) -> bool {
        prefixes.iter().enumerate().all(|(i, p)| {
            prefixes
                .iter()
                .enumerate()
                .all(|(j, q)| i == j || (p != q && !q.starts_with(&format!("{p}{{"))))
        })
    }
}

/// Keys that share `prefix` but belong to no lock: the library must leave them alone.
fn foreign_keys(prefix: &str) -> Vec<Vec<u8>> {
    let mut keys: Vec<Vec<u8>> = [
        "",
        "{",
        "{x",
        "{x}tail",
        "{x}:own",
        "{x}:ownerz",
        "{x}:fencer",
        "{}",
        "{}:owner",
        "x",
        ":x",
    ]
    .iter()
    .map(|tail| format!("{prefix}{tail}").into_bytes())
    .collect();
    // Not UTF-8, so no lock's key (a purge must neither take it nor fail on it).
    for tail in [&b"{\xff}"[..], b"{\xff}:owner"] {
        keys.push([prefix.as_bytes(), tail].concat());
    }
    keys.retain(|key| !key.is_empty());
    keys
}

/// Runs `case` on a flushed deployment; `Err` says what went wrong.
async fn run_purge_case(
    deployment: &Deployment,
    raw: &fred::clients::Client,
    case: &PurgeCase,
) -> Result<(), String> {
    deployment.flush();
    let mut lockers = Vec::new();
    for prefix in &case.prefixes {
        lockers.push(locker(
            &deployment.lock(prefix).await,
            Duration::from_secs(60),
        ));
    }
    let mut guards: Vec<LockGuard> = Vec::new();
    for (locker, prefix) in lockers.iter().zip(&case.prefixes) {
        for key in &case.keys {
            let guard = locker
                .acquire(key)
                .await
                .map_err(|e| format!("acquire {key:?} under {prefix:?}: {e}"))?;
            guards.push(guard);
        }
    }
    for prefix in &case.prefixes {
        for key in foreign_keys(prefix) {
            let key = fred::types::Key::from(key.as_slice());
            let _: () = raw
                .set(key, "foreign", None, None, false)
                .await
                .map_err(|e| format!("SET: {e}"))?;
        }
    }
    let before = deployment.keys().await;
    let purger = &case.prefixes[case.purger];
    let mut expected_gone = BTreeSet::new();
    for key in case
        .keys
        .iter()
        .filter(|k| k.starts_with(&case.purge_prefix))
    {
        let counter = format!("{purger}{{{key}}}");
        expected_gone.insert(format!("{counter}:owner").into_bytes());
        expected_gone.insert(counter.into_bytes());
    }
    let expected_count = expected_gone.len() as u64 / 2;
    let purged = lockers[case.purger]
        .purge(&case.purge_prefix)
        .await
        .map_err(|e| format!("purge: {e}"))?;
    let after = deployment.keys().await;
    let gone: BTreeSet<Vec<u8>> = before.difference(&after).cloned().collect();
    let show = |keys: &BTreeSet<Vec<u8>>| -> Vec<String> {
        keys.iter()
            .map(|key| key.escape_ascii().to_string())
            .collect()
    };
    if gone != expected_gone || purged != expected_count {
        return Err(format!(
            "purge({:?}) with prefix {purger:?} removed {purged} locks and the keys {:?}; \
             expected {expected_count} locks and the keys {:?}",
            case.purge_prefix,
            show(&gone),
            show(&expected_gone),
        ));
    }
    if !after.is_subset(&before) {
        return Err(format!(
            "keys appeared: {:?}",
            show(&after.difference(&before).cloned().collect())
        ));
    }
    drop(guards);
    for locker in lockers {
        let _ = locker.stop().await;
    }
    Ok(())
}

/// Table cases first: the reviewer's example (`[app]:` matched `a:` as a glob class), then each
/// glob character, hash-tag braces and unicode, side by side with their look-alikes.
fn table() -> Vec<PurgeCase> {
    let keys = &[
        "x", "x}:fence", "x}:owner", "{x}", "jobs:1", "[j]obs", "*", "ü",
    ];
    vec![
        PurgeCase::new(&["[app]:", "a:", "p:"], keys, 0, ""),
        PurgeCase::new(&["[app]:", "a:", "p:"], keys, 1, ""),
        PurgeCase::new(&["a*", "ab", "a"], keys, 0, ""),
        PurgeCase::new(&["a?", "ab", "a"], keys, 0, ""),
        PurgeCase::new(&["a\\", "a", "a\\\\"], keys, 0, ""),
        PurgeCase::new(&["a]", "a", "]"], keys, 0, "x"),
        PurgeCase::new(&["*", "?", "[", "]", "\\"], keys, 2, ""),
        PurgeCase::new(&["{tag}:", "tag:", "{tag}"], keys, 0, ""),
        PurgeCase::new(&["}", "{", "x"], keys, 1, "x}"),
        PurgeCase::new(&["ü:", "u:", "日本:"], keys, 2, "j"),
        PurgeCase::new(&["lock:", "lock"], keys, 0, "x}:"),
        PurgeCase::new(&["lock:", "lock"], keys, 1, "*"),
        PurgeCase::new(&["lock:", ""], keys, 1, "[j]"),
    ]
}

/// Prefixes and keys drawn from glob characters, braces, colons, unicode and plain letters.
fn purge_cases() -> impl Strategy<Value = PurgeCase> {
    const ALPHABET: &[&str] = &[
        "a", "b", ":", "*", "?", "[", "]", "^", "-", "\\", "{", "}", "ü", "日",
    ];
    let text = |len: std::ops::Range<usize>| {
        prop::collection::vec(prop::sample::select(ALPHABET), len).prop_map(|parts| parts.concat())
    };
    let prefixes = prop::collection::vec(text(0..5), 2..5)
        .prop_filter("independent prefixes", |p| {
            PurgeCase::prefixes_are_independent(p)
        });
    let keys = prop::collection::btree_set(text(1..5), 1..6);
    (prefixes, keys, any::<prop::sample::Index>(), text(0..3)).prop_map(
        |(prefixes, keys, purger, purge_prefix)| PurgeCase {
            purger: purger.index(prefixes.len()),
            prefixes,
            keys: keys.into_iter().collect(),
            purge_prefix,
        },
    )
}

/// Finding 7: purge escaped the caller's prefix but put the configured prefix into `SCAN
/// MATCH` as it was, so `[app]:` purged another application's locks under `a:` and missed its
/// own; and it deleted any key under the prefix that was not a fencing counter. Now it removes
/// exactly the counter and owner keys of its own locks under the purge prefix.
#[test]
fn purge_removes_exactly_its_own_locks_for_any_prefix() {
    let Some(binary) = redis_or_skip("inc purge prefixes") else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let deployment = Deployment::single(&binary);
    let raw = runtime.block_on(deployment.raw());
    for case in table() {
        assert!(PurgeCase::prefixes_are_independent(&case.prefixes));
        if let Err(failure) = runtime.block_on(run_purge_case(&deployment, &raw, &case)) {
            panic!("{failure}\n{case:?}");
        }
    }
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let result = runner.run(&purge_cases(), |case| {
        runtime
            .block_on(run_purge_case(&deployment, &raw, &case))
            .map_err(TestCaseError::fail)
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
    println!(
        "I-purge-prefixes: {} table cases and 64 generated cases purged exactly their own locks",
        table().len()
    );
}

/// The same table on a Redis Cluster (SCAN on every primary, UNLINK key by key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_removes_exactly_its_own_locks_on_a_cluster() {
    let Some(binary) = redis_or_skip("inc purge prefixes on a cluster") else {
        return;
    };
    let deployment = Deployment::cluster(&binary);
    let raw = deployment.raw().await;
    let cases = table();
    for case in &cases {
        if let Err(failure) = run_purge_case(&deployment, &raw, case).await {
            panic!("{failure}\n{case:?}");
        }
    }
    println!(
        "I-purge-prefixes (cluster of 3): {} table cases purged exactly their own locks",
        cases.len()
    );
}

/// Finding 8: the fencing counter `<prefix>{K}:fence` never expired, so a service locking ever
/// new keys (an order id each) grew Redis without bound. Now every key the library writes
/// expires: after 100 000 distinct locks are released (or left to expire) and the ttl has
/// passed, nothing is left; and the fencing tokens of those keys still increase.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_left_after_a_hundred_thousand_locks() {
    let Some(binary) = redis_or_skip("inc bookkeeping keys") else {
        return;
    };
    let deployment = Deployment::single(&binary);
    let lock = deployment.lock("lock:").await;
    let ttl = Duration::from_millis(100);
    let locker = locker(&lock, ttl);
    let (total, tasks) = (100_000usize, 100usize);
    let started = Instant::now();
    let mut pending = tokio::task::JoinSet::new();
    for task in 0..tasks {
        let locker = locker.clone();
        pending.spawn(async move {
            let (mut sampled, mut expired_first) = (Vec::new(), 0usize);
            for i in (task..total).step_by(tasks) {
                let key = format!("order:{i}");
                // On a loaded machine an answer can come back after the 100 ms ttl: the core then
                // releases that lock (a guard is never born expired) and says so, "raise the
                // ttl" (a backend error since session 33; `Locked` before); ask again.
                let guard = loop {
                    match locker.acquire(&key).await {
                        Ok(guard) => break guard,
                        Err(lock_core::LockError::Locked { .. }) => continue,
                        Err(LockError::Backend { message, .. })
                            if message.ends_with("raise the ttl") =>
                        {
                            continue;
                        }
                        Err(error) => panic!("acquire: {error:?}"),
                    }
                };
                let fence = guard.fencing_token().expect("fence");
                if i % 1_000 == 0 {
                    sampled.push((key.clone(), fence));
                }
                if i % 10 == 0 {
                    // A holder that never releases: its lock expires.
                    std::mem::forget(guard);
                } else {
                    match guard.release().await {
                        Ok(()) => {}
                        // On a busy machine the lock may expire before its release.
                        Err(LockError::NotHeld { .. }) => expired_first += 1,
                        Err(error) => panic!("release {key}: {error}"),
                    }
                }
            }
            (sampled, expired_first)
        });
    }
    let (mut sampled, mut expired_first) = (Vec::new(), 0);
    while let Some(joined) = pending.join_next().await {
        let (fences, expired) = joined.expect("task");
        sampled.extend(fences);
        expired_first += expired;
    }
    let took = started.elapsed();
    let right_after = deployment.dbsize();
    // The last fencing counters expire `ttl` + 1 ms after the clock passed their token.
    tokio::time::sleep(ttl * 3).await;
    let left = deployment.keys().await;
    let dbsize_after = deployment.dbsize();
    println!(
        "I-bookkeeping: {total} distinct keys locked ({} released, {} left to expire, {expired_first} expired before their release) in {took:?}; \
         keys in Redis right after: {right_after}; after waiting {:?}: SCAN finds {}, DBSIZE {dbsize_after}",
        total - total / 10 - expired_first,
        total / 10,
        ttl * 3,
        left.len(),
    );
    let shown: Vec<String> = left
        .iter()
        .take(3)
        .map(|k| k.escape_ascii().to_string())
        .collect();
    assert_eq!(
        left.len(),
        0,
        "keys left once every lock is gone and its ttl has passed (first: {shown:?})"
    );
    assert_eq!(dbsize_after, 0);
    for (key, fence) in sampled {
        let again = locker.acquire(&key).await.expect("free again");
        let next = again.fencing_token().expect("fence");
        assert!(
            next > fence,
            "{key}: fencing token {next} after the counter expired, not above {fence}"
        );
        again.release().await.expect("release");
    }
}

/// The acquisition script, run by hand (as a client resending it would).
fn acquire_script() -> redis::Script {
    redis::Script::new(concat!(
        include_str!("../../lock-inc/src/lua/fence.lua"),
        include_str!("../../lock-inc/src/lua/acquire.lua")
    ))
}

async fn acquire_raw(
    con: &mut redis::aio::MultiplexedConnection,
    key: &str,
    token: &str,
    ttl_ms: u64,
) -> i64 {
    let counter = format!("lock:{{{key}}}");
    acquire_script()
        .key(&counter)
        .key(format!("{counter}:owner"))
        .key(format!("{counter}:fence"))
        .arg(token)
        .arg(ttl_ms)
        .invoke_async(con)
        .await
        .expect("acquire script")
}

/// The fencing counter lives until the server's clock has passed the token it holds — not just
/// for the ttl — even when the counter runs ahead of the clock (more than one acquisition per
/// microsecond, or a clock that was set back): a later token is higher all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fencing_counter_outlives_the_token_it_holds() {
    use redis::AsyncCommands;
    let Some(binary) = redis_or_skip("inc fencing counter expiry") else {
        return;
    };
    let deployment = Deployment::single(&binary);
    let mut con = redis::Client::open(deployment.url.clone())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connection");
    let now_us = |time: (u64, u64)| time.0 * 1_000_000 + time.1;

    // In step with the clock: the counter expires ttl + 1 ms after its token's time.
    let fence = acquire_raw(&mut con, "plain", "token-a", 50).await;
    let expires_at: i64 = redis::cmd("PEXPIRETIME")
        .arg("lock:{plain}:fence")
        .query_async(&mut con)
        .await
        .expect("PEXPIRETIME");
    println!("I-fence-expiry: token {fence} µs, counter expires at {expires_at} ms");
    assert!(
        expires_at * 1_000 > fence,
        "the fencing counter {fence} expires at {expires_at} ms, before the clock passes it"
    );

    // Ahead of the clock by 10 s: it must live about 10 s, not 50 ms.
    let time: (u64, u64) = redis::cmd("TIME").query_async(&mut con).await.unwrap();
    let ahead = now_us(time) + 10_000_000;
    let _: () = con.set("lock:{ahead}:fence", ahead).await.unwrap();
    let fence = acquire_raw(&mut con, "ahead", "token-b", 50).await;
    assert_eq!(fence, i64::try_from(ahead).unwrap() + 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stored: Option<i64> = con.get("lock:{ahead}:fence").await.unwrap();
    assert_eq!(
        stored,
        Some(fence),
        "the fencing counter expired before the clock passed its token"
    );
    let pttl: i64 = con.pttl("lock:{ahead}:fence").await.unwrap();
    assert!(pttl > 9_000, "PTTL {pttl} ms");
    let next = acquire_raw(&mut con, "ahead", "token-c", 50).await;
    assert_eq!(next, fence + 1);
}

/// The replay path reads the fencing counter back; now that it expires, a replay that finds it
/// gone still answers a win (a new, higher token), never "locked".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_whose_fencing_counter_is_gone_still_wins() {
    use redis::AsyncCommands;
    let Some(binary) = redis_or_skip("inc replay without fencing counter") else {
        return;
    };
    let deployment = Deployment::single(&binary);
    let mut con = redis::Client::open(deployment.url.clone())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connection");
    let first = acquire_raw(&mut con, "replayed", "token-a", 10_000).await;
    let replay = acquire_raw(&mut con, "replayed", "token-a", 10_000).await;
    assert_eq!(replay, first, "a replay answers its own token");
    let _: () = con.del("lock:{replayed}:fence").await.unwrap();
    let replay = acquire_raw(&mut con, "replayed", "token-a", 10_000).await;
    let other = acquire_raw(&mut con, "replayed", "token-b", 10_000).await;
    println!(
        "I-replay-fence: first {first}; replay after the fencing counter went: {replay}; another client: {other}"
    );
    assert!(
        replay > first,
        "the replay answered {replay}: not a win above {first}"
    );
    assert_eq!(other, 0, "a second holder appeared");
    let stored: Option<i64> = con.get("lock:{replayed}:fence").await.unwrap();
    assert_eq!(stored, Some(replay));
}

/// Keys that look like the library's own bookkeeping keys (`<prefix>{K}`, `…:owner`,
/// `…:fence`) are locks of their own: all held at once, each released alone, three Redis keys
/// each and none shared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_look_like_bookkeeping_keys_are_independent_locks() {
    let Some(binary) = redis_or_skip("inc look-alike keys") else {
        return;
    };
    let deployment = Deployment::single(&binary);
    let keys: [&'static str; 18] = [
        "x",
        "x}",
        "{x",
        "{x}",
        "}x",
        "x}:fence",
        "x}:owner",
        "x:fence",
        "x:owner",
        "x}:fence}",
        "x}:owner}",
        "x}:fence}:owner",
        "x}}",
        "{x}:fence",
        "*",
        "x*",
        "[x]",
        "x\\",
    ];
    for prefix in ["lock:", "", "{", "}"] {
        deployment.flush();
        let locker = locker(&deployment.lock(prefix).await, Duration::from_secs(30));
        // All at once, each from its own task.
        let mut acquiring = tokio::task::JoinSet::new();
        for (i, &key) in keys.iter().enumerate() {
            let locker = locker.clone();
            acquiring.spawn(async move { (i, locker.try_acquire(key).await) });
        }
        let mut guards: Vec<Option<LockGuard>> = keys.iter().map(|_| None).collect();
        while let Some(joined) = acquiring.join_next().await {
            let (i, result) = joined.expect("task");
            let guard = result
                .expect("try_acquire")
                .unwrap_or_else(|| panic!("{:?} under {prefix:?} was already locked", keys[i]));
            guards[i] = Some(guard);
        }
        let stored = deployment.keys().await.len();
        assert_eq!(
            stored,
            3 * keys.len(),
            "under {prefix:?}: {} locks share Redis keys",
            keys.len()
        );
        for (released, guard) in guards.into_iter().enumerate() {
            guard.expect("held").release().await.expect("release");
            for (i, key) in keys.iter().enumerate() {
                let probe = locker.try_acquire(key).await.expect("probe");
                assert_eq!(
                    probe.is_some(),
                    i == released,
                    "under {prefix:?}, after releasing {:?}: {key:?} is {}",
                    keys[released],
                    if probe.is_some() { "free" } else { "held" }
                );
                if let Some(probe) = probe {
                    probe.release().await.expect("release probe");
                }
            }
            // Held again, so that only the next one is free in the next round.
            let again = locker.try_acquire(keys[released]).await.expect("again");
            std::mem::forget(again.expect("free after release"));
        }
        println!(
            "I-lookalikes (prefix {prefix:?}): {} look-alike keys, {stored} Redis keys, each released alone",
            keys.len()
        );
    }
}

/// A purge removes each lock's counter and owner key together: a lock taken again between the
/// two removals would otherwise lose its owner key (its holder could neither release nor
/// extend it) while its counter kept everyone else out for the whole ttl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_racing_acquisitions_leaves_no_half_lock() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let Some(binary) = redis_or_skip("inc purge against acquisitions") else {
        return;
    };
    let deployment = Deployment::single(&binary);
    let locker = locker(&deployment.lock("lock:").await, Duration::from_secs(60));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (locker, stop) = (locker.clone(), Arc::clone(&stop));
        workers.spawn(async move {
            let mut taken = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for i in 0..50 {
                    if let Some(guard) = locker.try_acquire(&format!("hot:{i}")).await.unwrap() {
                        taken += 1;
                        match guard.release().await {
                            Ok(()) | Err(LockError::NotHeld { .. }) => {}
                            Err(error) => panic!("release: {error}"),
                        }
                    }
                }
            }
            taken
        });
    }
    // A half lock lasts until the next purge removes its counter: look after every purge.
    let (mut purged, mut half) = (0, BTreeSet::new());
    for _ in 0..200 {
        purged += locker.purge("hot:").await.expect("purge");
        half.extend(half_locks(&deployment.keys().await));
    }
    stop.store(true, Ordering::Relaxed);
    let mut taken = 0;
    while let Some(joined) = workers.join_next().await {
        taken += joined.expect("worker");
    }
    half.extend(half_locks(&deployment.keys().await));
    println!(
        "I-purge-race: 200 purges while 4 tasks took {taken} locks on 50 keys; {purged} locks purged; half locks seen: {}",
        half.len()
    );
    assert!(half.is_empty(), "half locks: {half:?}");
}

/// The counters without their owner key, and owner keys without their counter, among `keys`.
fn half_locks(keys: &BTreeSet<Vec<u8>>) -> Vec<String> {
    keys.iter()
        .filter_map(|key| {
            let key = String::from_utf8(key.clone()).ok()?;
            let partner = match key.strip_suffix(":owner") {
                Some(counter) => counter.to_owned(),
                None if key.ends_with('}') => format!("{key}:owner"),
                None => return None,
            };
            (!keys.contains(partner.as_bytes())).then_some(key)
        })
        .collect()
}

/// Fencing tokens are exact only below 2^53 (the script's numbers are doubles): a counter at or
/// past it would hand the same token out again, so the acquisition is refused with an error
/// naming the bound, before anything is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fencing_counter_past_two_to_the_53_is_refused_not_repeated() {
    let Some(binary) = redis_or_skip("inc fence precision") else {
        return;
    };
    let deployment = Deployment::single(&binary);
    let lock = deployment.lock("lock:").await;
    let locker = locker(&lock, Duration::from_secs(5));
    let () = redis::cmd("SET")
        .arg("lock:{k}:fence")
        .arg("36028797018963968")
        .query(
            &mut redis::Client::open(deployment.servers[0].url())
                .expect("client")
                .get_connection()
                .expect("connection"),
        )
        .expect("SET");
    let outcome = locker.acquire("k").await.map(|guard| guard.fencing_token());
    println!("inc fence precision: counter 2^55, acquire -> {outcome:?}");
    assert!(
        matches!(&outcome, Err(LockError::Backend { .. }) if outcome.as_ref().is_err_and(|e| e.to_string().contains("2^53"))),
        "{outcome:?}"
    );
    let left = deployment.servers[0]
        .command("EXISTS lock:{k}", PROBE)
        .expect("EXISTS");
    assert_eq!(left, ":0", "a refused acquisition left its counter behind");
}

//! Semaphores and read-write locks of the INCR backend on real servers: a holder that dies
//! frees its permit at its ttl, a stopped server and a restarted one, a Redis Cluster (every key
//! of one semaphore in one slot, hostile key characters handled as the mutex handles them),
//! nothing left behind once holders are gone, and an over-admission checker under contention
//! with random cancellations (and its negative control).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lock_core::{
    Capabilities, Key, LeaseKind, LockError, LockOptions, Locker, RetryPolicy,
    raw::{Handle, Lock, LockRequest, async_trait},
};
use lock_inc::{IncConfig, IncLock};
use lock_tests::server::{RedisServer, cluster_url, redis_or_skip, start_cluster};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

const PROBE: Duration = Duration::from_millis(500);

fn permit(permits: u32) -> LeaseKind {
    LeaseKind::permit(permits).unwrap()
}

fn locker(lock: impl Lock, ttl: Duration, retry: RetryPolicy) -> Locker {
    Locker::new(lock)
        .with_options(LockOptions::default().with_ttl(ttl).with_retry(retry))
        .unwrap()
}

fn single(lock: &IncLock, ttl: Duration) -> Locker {
    locker(lock.clone(), ttl, RetryPolicy::none())
}

async fn connect(url: String, command_timeout: u64) -> IncLock {
    IncLock::connect(IncConfig {
        command_timeout,
        ..IncConfig::new(url)
    })
    .await
    .expect("connect")
}

async fn one_server() -> Option<(RedisServer, IncLock)> {
    let binary = redis_or_skip("inc semaphores")?;
    let server = RedisServer::start(&binary, &[]).expect("server");
    let lock = connect(server.url(), 2_000).await;
    Some((server, lock))
}

/// Every key on the servers (by `SCAN`, which also drops the expired keys it meets).
async fn keys_on(servers: &[RedisServer]) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for server in servers {
        let mut con = redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut con)
                .await
                .unwrap();
            all.extend(keys);
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    all
}

fn dbsize(servers: &[RedisServer]) -> u64 {
    servers
        .iter()
        .map(|server| {
            let reply = server.command("DBSIZE", PROBE).unwrap();
            reply.trim_start_matches(':').parse::<u64>().unwrap()
        })
        .sum()
}

fn pttl(server: &RedisServer, key: &str) -> i64 {
    let reply = server.command(&format!("PTTL {key}"), PROBE).unwrap();
    reply.trim_start_matches(':').parse().unwrap()
}

/// A permit whose holder dies (its guard never released, its connection closed) is freed by
/// the server's clock at its ttl, not before, and the semaphore's keys carry that expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holders_permit_frees_at_its_ttl() {
    let Some((server, lock)) = one_server().await else {
        return;
    };
    let ttl = Duration::from_millis(800);
    let doomed = connect(server.url(), 2_000).await;
    let started = Instant::now();
    let guard = single(&doomed, ttl)
        .acquire_permit("pool", 2)
        .await
        .expect("permit");
    // The holder "dies": it never releases, and its connection goes.
    std::mem::forget(guard);
    doomed.shutdown().await.expect("quit");
    for key in ["lock:{pool}", "lock:{pool}:owner", "lock:{pool}:fence"] {
        let ms = pttl(&server, key);
        assert!(
            ms > 0 && ms <= 801,
            "{key} has PTTL {ms} for a ttl of 800 ms"
        );
    }
    let live = single(&lock, Duration::from_secs(10));
    let second = live
        .acquire_permit("pool", 2)
        .await
        .expect("the other permit");
    assert!(
        live.try_acquire_kind("pool", permit(2))
            .await
            .unwrap()
            .is_none(),
        "a third permit while the dead holder's is live"
    );
    let freed = loop {
        if let Some(guard) = live.try_acquire_kind("pool", permit(2)).await.unwrap() {
            break (started.elapsed(), guard);
        }
        assert!(
            started.elapsed() < ttl + Duration::from_secs(2),
            "the dead holder's permit never came back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!(
        "S-dead-holder: permit freed {:?} after it was taken (ttl {ttl:?})",
        freed.0
    );
    assert!(freed.0 >= ttl - Duration::from_millis(50), "freed early");
    freed.1.release().await.unwrap();
    second.release().await.unwrap();
}

/// A stopped server: an attempt answers with a backend error within the command timeout; a
/// release (of a permit, a reader, a writer) that timed out is sent again once the server
/// answers, so the lease is freed at once rather than at its ttl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_that_timed_out_are_sent_again_for_every_kind() {
    let Some(binary) = redis_or_skip("inc semaphores, stopped server") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("server");
    let lock = connect(server.url(), 100).await;
    let locker = single(&lock, Duration::from_secs(5));
    let options = LockOptions::default()
        .with_ttl(Duration::from_secs(5))
        .with_retry(RetryPolicy::none());
    for (key, kind) in [
        ("permits", permit(1)),
        ("readers", LeaseKind::Read),
        ("writers", LeaseKind::Write),
    ] {
        let held = locker
            .acquire_kind(key, kind, &options)
            .await
            .expect("acquire");
        server.pause().expect("SIGSTOP");
        let started = Instant::now();
        // A key of its own per kind: the stopped server runs this attempt once it resumes.
        let error = locker
            .acquire_kind(&format!("elsewhere-{key}"), kind, &options)
            .await
            .expect_err("no answer");
        let took = started.elapsed();
        assert!(matches!(error, LockError::Backend { .. }), "{error:?}");
        assert!(took < Duration::from_millis(100) + PROBE, "waited {took:?}");
        let error = held.release().await.expect_err("no answer");
        assert!(matches!(error, LockError::Backend { .. }), "{error:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        server.resume().expect("SIGCONT");
        let resumed = Instant::now();
        // A writer is refused while the reader (or writer, or permit) is still there.
        let probe = match kind {
            LeaseKind::Read => LeaseKind::Write,
            other => other,
        };
        loop {
            if let Some(again) = locker.try_acquire_kind(key, probe).await.expect("probe") {
                again.release().await.expect("release when healthy");
                break;
            }
            assert!(
                resumed.elapsed() < Duration::from_secs(2),
                "{kind}: the timed-out release was never sent again (it waits for its 5 s ttl)"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        println!(
            "S-stopped ({kind}): attempt failed in {took:?}; lease free {:?} after SIGCONT",
            resumed.elapsed()
        );
    }
}

/// A server restarted without its data: clients reconnect by themselves, the semaphore starts
/// empty, and fencing tokens keep increasing (the clock rule).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_serves_permits_again_with_higher_fences() {
    let Some((mut server, lock)) = one_server().await else {
        return;
    };
    let retrying = RetryPolicy::forever()
        .with_retry_delay(Duration::from_millis(20))
        .with_deadline(Duration::from_secs(5));
    let locker = locker(lock.clone(), Duration::from_secs(30), retrying);
    let a = locker.acquire_permit("restart", 2).await.unwrap();
    let b = locker.acquire_permit("restart", 2).await.unwrap();
    let before = a.fencing_token().max(b.fencing_token()).unwrap();
    let reader = locker.acquire_read("restart-rw").await.unwrap();
    std::mem::forget(reader);
    server.restart().expect("restart");
    // The holders' permits went with the data: two new ones fit.
    let c = locker
        .acquire_permit("restart", 2)
        .await
        .expect("after restart");
    let d = locker
        .acquire_permit("restart", 2)
        .await
        .expect("after restart");
    let writer = locker.acquire_write("restart-rw").await.expect("writer");
    let after = c.fencing_token().min(d.fencing_token()).unwrap();
    println!("S-restart: fences {before} -> {after}; permits and the writer served again");
    assert!(
        after > before,
        "fencing went backwards: {before} -> {after}"
    );
    // The old holders learn that they lost their permits.
    assert!(matches!(a.release().await, Err(LockError::NotHeld { .. })));
    assert!(matches!(b.release().await, Err(LockError::NotHeld { .. })));
    for guard in [c, d, writer] {
        guard.release().await.unwrap();
    }
}

fn keyslot(servers: &[RedisServer], key: &str) -> u64 {
    let mut con = redis::Client::open(servers[0].url())
        .unwrap()
        .get_connection()
        .unwrap();
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query(&mut con)
        .unwrap()
}

/// On a Redis Cluster: every key a semaphore or read-write lock writes is in one slot (checked
/// with `CLUSTER KEYSLOT`), for keys made of hostile characters too; a key the mutex cannot
/// take on a cluster (an empty hash tag) is refused the same way for every kind, never half
/// taken; release and purge leave only fencing counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_every_key_of_a_semaphore_is_in_one_slot() {
    let Some(binary) = redis_or_skip("inc semaphores on a cluster") else {
        return;
    };
    let servers = start_cluster(&binary, 3).expect("cluster");
    let lock = connect(cluster_url(&servers), 5_000).await;
    let locker = single(&lock, Duration::from_secs(30));
    let hostile = [
        "plain",
        "a{b}c",
        "{",
        "}x",
        "x}",
        "{x}",
        "a*b",
        "?",
        "[a-z]",
        "*",
        "{}",
        "a{",
        "日本{*}",
    ];
    let mut taken = 0;
    let mut refused = Vec::new();
    for key in hostile {
        let mutex = locker.try_acquire(key).await;
        let mutex_ok = match mutex {
            Ok(Some(guard)) => {
                guard.release().await.unwrap();
                true
            }
            Ok(None) => panic!("{key}: a free key was found held"),
            Err(LockError::Backend { .. }) => false,
            Err(other) => panic!("{key}: {other:?}"),
        };
        for kind in [permit(2), LeaseKind::Read, LeaseKind::Write] {
            match locker.try_acquire_kind(key, kind).await {
                Ok(Some(guard)) => {
                    assert!(mutex_ok, "{key} ({kind}): taken where the mutex is refused");
                    let counter = format!("lock:{{{key}}}");
                    let ours = [
                        counter.clone(),
                        format!("{counter}:owner"),
                        format!("{counter}:fence"),
                    ];
                    let stored = keys_on(&servers).await;
                    for name in &ours {
                        assert!(stored.contains(name), "{key} ({kind}): {name} missing");
                    }
                    // Nothing else is written: the other locks were released (fences stay).
                    let others: Vec<&String> = stored
                        .iter()
                        .filter(|k| !ours.contains(k) && !k.ends_with(":fence"))
                        .collect();
                    assert!(others.is_empty(), "{key} ({kind}): also {others:?}");
                    let slots: BTreeSet<u64> = ours.iter().map(|k| keyslot(&servers, k)).collect();
                    assert_eq!(slots.len(), 1, "{key} ({kind}): keys {ours:?} in {slots:?}");
                    guard.release().await.unwrap();
                    taken += 1;
                }
                Ok(None) => panic!("{key} ({kind}): a free key was found held"),
                Err(LockError::Backend { .. }) => {
                    assert!(!mutex_ok, "{key} ({kind}): refused where the mutex works");
                    refused.push(format!("{key} ({kind})"));
                }
                Err(other) => panic!("{key} ({kind}): {other:?}"),
            }
        }
    }
    // Held leases of every kind, then purged: only fencing counters stay.
    let _held = [
        locker.acquire_permit("jobs:a*", 3).await.unwrap(),
        locker.acquire_read("jobs:{b}").await.unwrap(),
        locker.acquire_write("jobs:[c]").await.unwrap(),
    ];
    assert_eq!(locker.purge("jobs:").await.unwrap(), 3);
    let left: Vec<String> = keys_on(&servers)
        .await
        .into_iter()
        .filter(|key| !key.ends_with(":fence"))
        .collect();
    println!(
        "S-cluster: {taken} leases on hostile keys each in one slot; refused like the mutex: {refused:?}; left after release and purge (besides fencing counters): {left:?}"
    );
    assert!(left.is_empty(), "{left:?}");
    assert!(taken >= 30, "only {taken} leases taken");
}

/// Nothing stays in Redis: after release only fencing counters are left, and once the ttl has
/// passed (released, expired, or a writer's claim left behind) not even those: DBSIZE 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_left_once_holders_are_gone() {
    let Some((server, lock)) = one_server().await else {
        return;
    };
    let servers = [server];
    let ttl = Duration::from_millis(300);
    let locker = single(&lock, ttl);
    for i in 0..50 {
        let key = format!("released:{i}");
        let permits: Vec<_> = futures_all(&locker, &key, permit(3), 3).await;
        for guard in permits {
            guard.release().await.unwrap();
        }
        let mut writer = locker.acquire_write(&format!("rw:{i}")).await.unwrap();
        writer.downgrade().await.unwrap();
        let reader = locker.acquire_read(&format!("rw:{i}")).await.unwrap();
        writer.release().await.unwrap();
        reader.release().await.unwrap();
    }
    let after_release: Vec<String> = keys_on(&servers)
        .await
        .into_iter()
        .filter(|key| !key.ends_with(":fence"))
        .collect();
    assert!(
        after_release.is_empty(),
        "left after release: {after_release:?}"
    );
    // Leases left to expire, and a writer's claim left behind.
    for i in 0..50 {
        std::mem::forget(
            locker
                .acquire_permit(&format!("leaked:{i}"), 2)
                .await
                .unwrap(),
        );
        std::mem::forget(
            locker
                .acquire_read(&format!("leaked-rw:{i}"))
                .await
                .unwrap(),
        );
    }
    // A writer waits behind a leaked reader: its claim is stored, and expires too.
    let waiting = locker_with_claims(&lock, ttl);
    let writer = tokio::spawn(async move { waiting.acquire_write("leaked-rw:0").await });
    // Its first attempt stores the claim (within 50 ms on a quiet machine).
    let mut marker = String::new();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        marker = lock_tests::server::get_bulk(servers[0].port(), "lock:{leaked-rw:0}:owner")
            .unwrap_or_default();
        if marker.starts_with("#rw:") {
            break;
        }
    }
    let claim_ttl = pttl(&servers[0], "lock:{leaked-rw:0}:owner");
    assert!(marker.starts_with("#rw:"), "no claim stored: {marker:?}");
    assert!(
        claim_ttl > 0 && claim_ttl <= 301,
        "the claim's marker has PTTL {claim_ttl}"
    );
    let error = writer
        .await
        .unwrap()
        .expect_err("the reader is still there");
    assert!(matches!(error, LockError::Timeout { .. }), "{error:?}");
    tokio::time::sleep(ttl * 2 + Duration::from_millis(100)).await;
    let left = keys_on(&servers).await;
    let size = dbsize(&servers);
    println!(
        "S-leftovers: {} keys besides fencing counters after release; after {:?}: {} keys (DBSIZE {size}); a claim was stored with PTTL {claim_ttl} ms",
        after_release.len(),
        ttl * 2 + Duration::from_millis(100),
        left.len()
    );
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(size, 0);
}

/// Takes `n` leases of `kind` on `key` one after the other, each a single attempt.
async fn futures_all(
    locker: &Locker,
    key: &str,
    kind: LeaseKind,
    n: usize,
) -> Vec<lock_core::LockGuard> {
    let mut taken = Vec::new();
    for _ in 0..n {
        taken.push(
            locker
                .try_acquire_kind(key, kind)
                .await
                .unwrap()
                .expect("a free place"),
        );
    }
    taken
}

/// A locker whose writers wait briefly (and so leave a claim while they do).
fn locker_with_claims(lock: &IncLock, ttl: Duration) -> Locker {
    locker(
        lock.clone(),
        ttl,
        RetryPolicy::forever()
            .with_retry_delay(Duration::from_millis(20))
            .with_deadline(Duration::from_millis(100)),
    )
}

/// A semaphore backend that is wrong on purpose: it asks the store for one permit more than
/// the caller did (as a script that admitted `count <= N` would), for the checker's negative
/// control.
#[derive(Debug)]
struct OnePermitTooMany(IncLock);

#[async_trait]
impl Lock for OnePermitTooMany {
    fn name(&self) -> &'static str {
        "one-permit-too-many"
    }

    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }

    fn try_acquire<'a>(
        &'a self,
        request: &'a LockRequest,
    ) -> lock_core::raw::Answer<'a, lock_core::Result<Option<Box<dyn Handle>>>> {
        lock_core::raw::Answer::later(async move {
            let kind = match request.kind() {
                LeaseKind::Permit { permits } => permit(permits.get() + 1),
                other => other,
            };
            self.0.try_acquire(&request.clone().with_kind(kind)).await
        })
    }

    fn abandon<'a>(
        &'a self,
        request: &'a LockRequest,
    ) -> lock_core::raw::Answer<'a, lock_core::Result<bool>> {
        lock_core::raw::Answer::later(async move {
            let kind = match request.kind() {
                LeaseKind::Permit { permits } => permit(permits.get() + 1),
                other => other,
            };
            self.0.abandon(&request.clone().with_kind(kind)).await
        })
    }

    async fn wait_for_release(&self, keys: &[Key], max_wait: Duration) -> lock_core::Result<()> {
        self.0.wait_for_release(keys, max_wait).await
    }
}

/// Tasks contend for a semaphore of `PERMITS`; some give up at random moments (a timeout that
/// cancels the attempt, or a guard dropped without release). Each holder counts itself in an
/// atomic while it holds (from after its acquisition returned to before it releases, a part of
/// the time the store holds its permit): the most seen at once is returned.
async fn most_holders_at_once(lock: Arc<dyn Lock>, key: &'static str, seed: u64) -> (usize, usize) {
    const PERMITS: u32 = 3;
    const TASKS: u64 = 10;
    const ROUNDS: usize = 30;
    let locker = locker(
        lock,
        Duration::from_secs(30),
        RetryPolicy::forever()
            .with_retry_delay(Duration::from_millis(2))
            .with_deadline(Duration::from_secs(20)),
    );
    let active = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let cancelled = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let (locker, active, most, cancelled) = (
            locker.clone(),
            Arc::clone(&active),
            Arc::clone(&most),
            Arc::clone(&cancelled),
        );
        tasks.spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed ^ task);
            for _ in 0..ROUNDS {
                let give_up = Duration::from_micros(rng.random_range(200..20_000));
                let attempt = tokio::time::timeout(give_up, locker.acquire_permit(key, PERMITS));
                let Ok(result) = attempt.await else {
                    cancelled.fetch_add(1, Ordering::SeqCst);
                    continue;
                };
                let guard = result.unwrap();
                let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_micros(rng.random_range(100..3_000))).await;
                active.fetch_sub(1, Ordering::SeqCst);
                if rng.random_bool(0.3) {
                    drop(guard); // released in the background
                } else {
                    guard.release().await.unwrap();
                }
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
    }
    (
        most.load(Ordering::SeqCst),
        cancelled.load(Ordering::SeqCst),
    )
}

/// The over-admission checker: never more than N holders of a semaphore of N under contention
/// with random cancellations; the same checker catches a backend that admits one too many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_semaphore_never_admits_more_than_its_permits() {
    let Some((server, lock)) = one_server().await else {
        return;
    };
    let seed: u64 = std::env::var("SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(rand::random);
    let (most, cancelled) = most_holders_at_once(Arc::new(lock.clone()), "pool", seed).await;
    println!(
        "S-over-admission (seed {seed}): at most {most} holders of 3 at once, {cancelled} attempts cancelled"
    );
    assert!(
        most <= 3,
        "{most} holders of a semaphore of 3 (seed {seed})"
    );
    assert_eq!(
        most, 3,
        "contention never filled the semaphore (seed {seed})"
    );
    // Negative control: the checker sees a semaphore that admits 4.
    let (broken, _) = most_holders_at_once(
        Arc::new(OnePermitTooMany(lock.clone())),
        "broken-pool",
        seed,
    )
    .await;
    println!("S-over-admission negative control: a broken semaphore admitted {broken} of 3");
    assert!(
        broken > 3,
        "the checker did not catch a semaphore admitting 4"
    );
    // Cancelled attempts and dropped guards leave nothing: the semaphore fills again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fresh = single(&lock, Duration::from_secs(5));
    let again = futures_all(&fresh, "pool", permit(3), 3).await;
    for guard in again {
        guard.release().await.unwrap();
    }
    let left: Vec<String> = keys_on(std::slice::from_ref(&server))
        .await
        .into_iter()
        .filter(|key| !key.ends_with(":fence"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A replayed attempt (the same script sent twice with one token, as a client resending after
/// a reconnect would) finds its own entry: it takes no second place, for a permit or a writer,
/// and answers a fencing token all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_attempt_takes_no_second_place() {
    let Some((server, lock)) = one_server().await else {
        return;
    };
    let script = redis::Script::new(include_str!("../../lock-inc/src/lua/shared_acquire.lua"));
    let mut con = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut run = async |key: &str, token: &str, mode: &str, extra: &str| -> i64 {
        let counter = format!("lock:{{{key}}}");
        script
            .key(&counter)
            .key(format!("{counter}:owner"))
            .key(format!("{counter}:fence"))
            .arg(token)
            .arg(10_000)
            .arg(mode)
            .arg(extra)
            .invoke_async(&mut con)
            .await
            .unwrap()
    };
    let first = run("replayed", "aa", "p", "2").await;
    let replayed = run("replayed", "aa", "p", "2").await;
    let other = run("replayed", "bb", "p", "2").await;
    let third = run("replayed", "cc", "p", "2").await;
    let writer = run("replayed-rw", "dd", "w", "0").await;
    let writer_again = run("replayed-rw", "dd", "w", "0").await;
    let reader = run("replayed-rw", "ee", "r", "0").await;
    println!(
        "S-replay: permit {first} replayed -> {replayed}, another {other}, a third {third}; writer {writer} replayed -> {writer_again}, a reader {reader}"
    );
    assert!(
        first > 0 && replayed > 0,
        "the replay must find its own win"
    );
    assert!(other > 0, "the second permit of two");
    assert_eq!(third, 0, "the replay took a second place");
    assert!(writer > 0 && writer_again > 0);
    assert_eq!(reader, 0, "a reader beside the replayed writer");
    let holders = server.command("ZCARD lock:{replayed}", PROBE).unwrap();
    assert_eq!(holders, ":2");
    let locker = single(&lock, Duration::from_secs(5));
    assert!(
        locker
            .try_acquire_kind("replayed", permit(2))
            .await
            .unwrap()
            .is_none()
    );
}

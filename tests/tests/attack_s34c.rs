//! adv34c: attacks on the "granted but too late" path (session 33: an attempt the store granted
//! whose answer came back after the lease's validity is released in the background and fails
//! with a backend error ending in "raise the ttl"), on real redis-server processes on
//! 127.0.0.1, each reached through a [`LatencyProxy`] that adds latency around the ttl or
//! stalls a request past it.
//!
//! - inc (one server) and redis (Redlock on one node) behind a slow proxy, Redlock over three
//!   nodes with two slow ones: every kind (mutex plain and fair, fenced, permit, read, write,
//!   multi-key), single tries and waits with a deadline: the error names the ttl, never "held"
//!   on a free key; a wait returns by its deadline; nothing of ours is left but inc's counter.
//! - A drift allowance that leaves a sliver of validity (drift_factor 0.9): the quorum answers
//!   too late while the keys would live on for most of the ttl; `stop` right after leaves
//!   nothing (the background release was waited for).
//! - A request stalled past its ttl, then let through (inc, redis): the key would live a ttl
//!   after the grant; `stop` right after the failed attempt finds it gone.
//! - A slow client (latency flipping around its ttl) and a fast one on the same key: no guard
//!   is handed out expired, no two holders' validities overlap, fencing tokens rise in
//!   acquisition order.
//! - A fair waiter whose grant comes back too late: the waiter behind it is served at once
//!   (not after the slow waiter's reservation expires or its deadline), the line empties.
//! - Counted retries of late grants make exactly `retries + 1` attempts; a retry sent right
//!   after a late grant is not refused by it; a waiting writer whose grants come late leaves
//!   no claim when it gives up; `stop` during a stalled late attempt takes it back first;
//!   single tries swept across the validity boundary hand out no expired guard; inc's permits
//!   and read/write leases behave as its mutex.
//! - Broke: on one node (`redis`) the plain and multi-key mutex, permits and read/write leases
//!   said "the quorum for `k` answered too late" (fixed: `Shared::too_late` names the node).
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use lock_core::{LeaseKind, LockError, LockOptions, Locker, RetryPolicy};
use lock_inc::{IncConfig, IncLock};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::backed::start_servers;
use lock_tests::nodes::leftovers;
use lock_tests::proxy::LatencyProxy;
use lock_tests::server::{RedisServer, redis_or_skip};
use tokio::time::{Instant, sleep};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A server and a proxy in front of it.
struct Node {
    proxy: LatencyProxy,
    server: RedisServer,
}

async fn nodes(count: usize) -> Vec<Node> {
    let mut out = Vec::new();
    for server in start_servers(count) {
        let proxy = LatencyProxy::start(server.port()).await.unwrap();
        out.push(Node { proxy, server });
    }
    out
}

fn proxied(nodes: &[Node]) -> Vec<String> {
    nodes.iter().map(|node| node.proxy.url()).collect()
}

fn direct(nodes: &[Node]) -> Vec<String> {
    nodes.iter().map(|node| node.server.url()).collect()
}

fn options(ttl: Duration, retry: RetryPolicy) -> LockOptions {
    LockOptions::default().with_ttl(ttl).with_retry(retry)
}

fn single(ttl: Duration) -> LockOptions {
    options(ttl, RetryPolicy::none())
}

/// Retries every 5 ms until `deadline`.
fn waiting(ttl: Duration, deadline: Duration) -> LockOptions {
    options(
        ttl,
        RetryPolicy::forever()
            .with_retry_delay(ms(5))
            .with_retry_jitter(ms(1))
            .with_deadline(deadline),
    )
}

async fn inc(url: &str, fair: bool) -> Locker {
    Locker::new(
        IncLock::connect(IncConfig {
            command_timeout: 3_000,
            ..IncConfig::new(url.to_owned()).with_fair(fair)
        })
        .await
        .unwrap(),
    )
}

fn redlock(urls: &[String], fair: bool, fencing: bool) -> Locker {
    redlock_with(RedlockConfig::new(urls.to_vec()), fair, fencing)
}

fn redlock_with(config: RedlockConfig, fair: bool, fencing: bool) -> Locker {
    Locker::new(
        Redlock::new(
            config
                .with_fair(fair)
                .with_fencing(fencing)
                .with_node_timeout(Duration::from_secs(1)),
        )
        .unwrap(),
    )
}

/// Whether a key name is one of inc's fencing counters (`lock:{k}`, kept without expiry by
/// design: tokens survive expiry and purge).
fn inc_counter(name: &str) -> bool {
    name.starts_with("lock:{") && name.ends_with('}')
}

/// Whether a key left on a server is bounded as it should be: inc's counter (kept by design),
/// or a fence key that expires within 10 s.
fn allowed((name, pttl): &(String, i64)) -> bool {
    inc_counter(name) || (name.ends_with(":fence") && *pttl > 0 && *pttl <= 10_000)
}

/// What is left on the servers right now but what [`allowed`] lets stay.
/// The proxies of `nodes` let through at once again, then what is left of ours on their
/// servers: now (`within` `None`), or once nothing is, within `within`.
async fn left_after_heal(nodes: &[Node], within: Option<Duration>) -> Vec<(String, i64)> {
    for node in nodes {
        node.proxy.set_delay(Duration::ZERO);
    }
    let servers: Vec<&RedisServer> = nodes.iter().map(|node| &node.server).collect();
    match within {
        Some(within) => left_within(&servers, within).await,
        None => left_now(&servers),
    }
}

fn left_now(servers: &[&RedisServer]) -> Vec<(String, i64)> {
    servers
        .iter()
        .flat_map(|server| leftovers(server))
        .filter(|key| !allowed(key))
        .collect()
}

/// What is left on the servers after up to `within` (polled), but what [`allowed`] lets stay.
async fn left_within(servers: &[&RedisServer], within: Duration) -> Vec<(String, i64)> {
    let until = Instant::now() + within;
    loop {
        let left = left_now(servers);
        if left.is_empty() || Instant::now() >= until {
            return left;
        }
        sleep(ms(20)).await;
    }
}

/// The largest number stored in a fence key of `key` on `server` (0 if none).
fn fence_values(server: &RedisServer, key: &str) -> u64 {
    let mut connection = redis::Client::open(server.url())
        .unwrap()
        .get_connection_with_timeout(ms(500))
        .unwrap();
    let names: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query(&mut connection).unwrap();
    names
        .into_iter()
        .filter(|name| {
            name.ends_with(b":fence") && name.windows(key.len()).any(|part| part == key.as_bytes())
        })
        .filter_map(|name| {
            let value: Option<String> = redis::cmd("GET").arg(&name).query(&mut connection).ok()?;
            value?.parse().ok()
        })
        .max()
        .unwrap_or(0)
}

/// The members of `key`'s fair line on `server` (Redlock's names), with their scores.
fn line_of(server: &RedisServer, key: &str) -> Vec<(String, f64)> {
    let mut connection = redis::Client::open(server.url())
        .unwrap()
        .get_connection_with_timeout(ms(500))
        .unwrap();
    redis::cmd("ZRANGE")
        .arg([key.as_bytes(), b"\xff:queue"].concat())
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query(&mut connection)
        .unwrap()
}

/// Warms every connection up (redlock connects lazily): one cycle on a key of its own.
async fn warm(locker: &Locker) {
    let guard = locker
        .acquire_with("warm-up", &single(ms(300)))
        .await
        .unwrap();
    guard.release().await.unwrap();
}

fn says_raise_the_ttl(outcome: &Result<lock_core::LockGuard, LockError>) -> bool {
    matches!(outcome, Err(LockError::Backend { message, .. }) if message.contains("raise the ttl"))
}

fn kinds() -> Vec<(&'static str, LeaseKind)> {
    vec![
        ("mutex", LeaseKind::Exclusive),
        (
            "permit",
            LeaseKind::Permit {
                permits: NonZeroU32::new(3).unwrap(),
            },
        ),
        ("read", LeaseKind::Read),
        ("write", LeaseKind::Write),
    ]
}

/// inc on one server 6 ms away each way, ttl 5 ms (every grant comes back after its validity):
/// a single try and a wait with a deadline both fail with the backend error naming the ttl
/// (before session 33 a single try said the free key was "locked by another holder"), plain
/// and fair; the wait returns by its deadline (plus one round trip); once stopped, nothing is
/// left on the server within half a second but bounded fence keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_late_grants_name_the_ttl_and_leave_only_the_counter() {
    if redis_or_skip("s34c inc late").is_none() {
        return;
    }
    let nodes = nodes(1).await;
    for fair in [false, true] {
        let key = format!("inc-late-{fair}");
        let slow = inc(&nodes[0].proxy.url(), fair).await;
        nodes[0].proxy.set_delay(ms(6));
        let once = slow.acquire_with(&key, &single(ms(5))).await;
        assert!(
            says_raise_the_ttl(&once),
            "fair {fair}, single try: {once:?}"
        );
        let started = Instant::now();
        let deadline = ms(150);
        let waited = slow.acquire_with(&key, &waiting(ms(5), deadline)).await;
        let took = started.elapsed();
        assert!(says_raise_the_ttl(&waited), "fair {fair}, wait: {waited:?}");
        assert!(
            took <= deadline + ms(60),
            "fair {fair}: the wait returned {took:?} after it started, its deadline {deadline:?}"
        );
        slow.stop().await.unwrap();
        nodes[0].proxy.set_delay(Duration::ZERO);
        let left = left_within(&[&nodes[0].server], ms(500)).await;
        assert!(left.is_empty(), "fair {fair}: left on the server: {left:?}");
    }
}

/// redis (Redlock on one node 6 ms away each way) and Redlock over three nodes (two of them 6
/// ms away), ttl 10 ms (validity 7.9 ms: every grant comes back too late): every kind, fair and
/// plain, with and without fencing, and a multi-key mutex: a single try and a wait with a
/// deadline fail naming the ttl, never "held"; the wait keeps its deadline; once stopped,
/// nothing is left on any node within a second (fence counters expire too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_late_grants_name_the_ttl_and_leave_nothing() {
    if redis_or_skip("s34c redlock late").is_none() {
        return;
    }
    for count in [1usize, 3] {
        let nodes = nodes(count).await;
        let urls = proxied(&nodes);
        for fair in [true, false] {
            for fencing in [false, true] {
                let locker = redlock(&urls, fair, fencing);
                warm(&locker).await;
                for node in nodes.iter().take(2) {
                    node.proxy.set_delay(ms(6));
                }
                let case = format!("{count} node(s), fair {fair}, fencing {fencing}");
                for (name, kind) in kinds() {
                    let key = format!("rl-{name}-{fair}-{fencing}");
                    let once = locker.acquire_kind(&key, kind, &single(ms(10))).await;
                    assert!(
                        says_raise_the_ttl(&once),
                        "{case}, {name}, single: {once:?}"
                    );
                    let started = Instant::now();
                    let deadline = ms(120);
                    let waited = locker
                        .acquire_kind(&key, kind, &waiting(ms(10), deadline))
                        .await;
                    let took = started.elapsed();
                    assert!(
                        says_raise_the_ttl(&waited),
                        "{case}, {name}, wait: {waited:?}"
                    );
                    assert!(
                        took <= deadline + ms(60),
                        "{case}, {name}: the wait took {took:?}, deadline {deadline:?}"
                    );
                }
                let many = locker
                    .clone()
                    .with_options(single(ms(10)))
                    .unwrap()
                    .acquire_many(&["rl-many-a", "rl-many-b"])
                    .await;
                assert!(says_raise_the_ttl(&many), "{case}, multi-key: {many:?}");
                locker.stop().await.unwrap();
                let left = left_after_heal(&nodes, Some(Duration::from_secs(1))).await;
                assert!(left.is_empty(), "{case}: left: {left:?}");
            }
        }
    }
}

/// A drift allowance that leaves a sliver of validity (drift_factor 0.9 of 300 ms + 2 ms: 28
/// ms) and nodes 20 ms away each way: every quorum answers too late, while the keys it set live
/// on for most of the ttl. The error names the ttl; the keys are taken back at once, so that
/// right after `stop` (no waiting) no lock key, line entry or claim is left: only fence
/// counters, whose expiry is bounded. One node and three, fair and plain, fenced and not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drift_sliver_late_grant_is_taken_back_before_stop_returns() {
    if redis_or_skip("s34c drift sliver").is_none() {
        return;
    }
    for count in [1usize, 3] {
        let nodes = nodes(count).await;
        let urls = proxied(&nodes);
        for fair in [true, false] {
            for fencing in [false, true] {
                let case = format!("{count} node(s), fair {fair}, fencing {fencing}");
                let locker = redlock_with(
                    RedlockConfig::new(urls.clone())
                        .with_drift_factor(0.9)
                        .with_node_timeout(Duration::from_secs(1)),
                    fair,
                    fencing,
                );
                warm(&locker).await;
                for node in &nodes {
                    node.proxy.set_delay(ms(20));
                }
                let key = format!("sliver-{fair}-{fencing}");
                for (name, kind) in kinds() {
                    let once = locker.acquire_kind(&key, kind, &single(ms(300))).await;
                    assert!(says_raise_the_ttl(&once), "{case}, {name}: {once:?}");
                    let key = format!("{key}-{name}");
                    let once = locker.acquire_kind(&key, kind, &single(ms(300))).await;
                    assert!(says_raise_the_ttl(&once), "{case}, {name}: {once:?}");
                }
                locker.stop().await.unwrap();
                let left = left_after_heal(&nodes, None).await;
                assert!(left.is_empty(), "{case}: left right after stop: {left:?}");
            }
        }
    }
}

/// A request stalled past its ttl (500 ms) then let through at once: the store grants a lock
/// that lives a whole ttl from then, the answer comes back after the validity. The attempt
/// fails naming the ttl, and `stop` called right after waits for the background release:
/// nothing is left on the server when it returns (but fence keys that expire), and the next
/// holder's fencing token is above the one the late grant drew. inc plain and fair, redis
/// (one node, node timeout 2 s) plain and fair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_right_after_a_stalled_late_grant_leaves_nothing() {
    if redis_or_skip("s34c stalled").is_none() {
        return;
    }
    for backend in ["inc", "redis"] {
        for fair in [false, true] {
            let case = format!("{backend}, fair {fair}");
            let nodes = nodes(1).await;
            let locker = if backend == "inc" {
                inc(&nodes[0].proxy.url(), fair).await
            } else {
                redlock_with(
                    RedlockConfig::new(proxied(&nodes)).with_node_timeout(Duration::from_secs(2)),
                    fair,
                    true,
                )
            };
            warm(&locker).await;
            nodes[0].proxy.stall_existing(0);
            let attempt = {
                let locker = locker.clone();
                tokio::spawn(async move { locker.acquire_with("stalled", &single(ms(500))).await })
            };
            sleep(ms(650)).await;
            nodes[0].proxy.release_stall();
            let outcome = attempt.await.unwrap();
            assert!(says_raise_the_ttl(&outcome), "{case}: {outcome:?}");
            let stopped = Instant::now();
            locker.stop().await.unwrap();
            assert!(
                stopped.elapsed() < lock_core::CLEANUP_WAIT + ms(500),
                "{case}: stop took {:?}",
                stopped.elapsed()
            );
            let left = left_now(&[&nodes[0].server]);
            assert!(left.is_empty(), "{case}: left right after stop: {left:?}");
            // The late grant drew a fencing token; the next holder's is larger.
            let drawn = fence_values(&nodes[0].server, "stalled");
            let fresh = if backend == "inc" {
                inc(&nodes[0].server.url(), fair).await
            } else {
                redlock(&direct(&nodes), fair, true)
            };
            let guard = fresh
                .acquire_with("stalled", &single(Duration::from_secs(2)))
                .await
                .unwrap();
            let token = guard.fencing_token().unwrap();
            assert!(
                drawn > 0 && token > drawn,
                "{case}: token {token} after a late grant drew {drawn}"
            );
            guard.release().await.unwrap();
            fresh.stop().await.unwrap();
        }
    }
}

/// One acquisition that held the lock: when it was handed out, its validity, its token.
#[derive(Debug, Clone, Copy)]
struct Held {
    client: usize,
    from: Instant,
    until: Instant,
    /// When it stopped holding: its release was sent, or its validity ended.
    end: Instant,
    fence: Option<u64>,
}

/// A slow client (latency flipping between 1 and 9 ms each way, ttl 12 ms: some grants come
/// back in time, some too late) and a fast one (direct, ttl 12 ms) take the same key in a loop
/// for a second: no guard is handed out already expired, no two holders' validities overlap,
/// and fencing tokens rise with the order in which the holders held. inc, redis (one node)
/// and Redlock over three nodes (the third reached through the flipping proxy only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_and_a_fast_client_never_hold_together() {
    if redis_or_skip("s34c two holders").is_none() {
        return;
    }
    for backend in ["inc", "redis", "redlock"] {
        let count = if backend == "redlock" { 3 } else { 1 };
        let nodes = Arc::new(nodes(count).await);
        let (slow, fast) = match backend {
            "inc" => (
                inc(&nodes[0].proxy.url(), false).await,
                inc(&nodes[0].server.url(), false).await,
            ),
            "redis" => (
                redlock(&proxied(&nodes), true, true),
                redlock(&direct(&nodes), true, true),
            ),
            _ => {
                // The slow client reaches two nodes through their proxies.
                let mut slow_urls = proxied(&nodes);
                slow_urls[2] = nodes[2].server.url();
                (
                    redlock(&slow_urls, true, true),
                    redlock(&direct(&nodes), true, true),
                )
            }
        };
        warm(&slow).await;
        warm(&fast).await;
        let history = Arc::new(Mutex::new(Vec::<Held>::new()));
        let late = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let end = Instant::now() + Duration::from_secs(1);
        let flipper = {
            let nodes = Arc::clone(&nodes);
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < end {
                    n += 1;
                    let delay = ms(1 + (n * 7) % 9);
                    for node in nodes.iter() {
                        node.proxy.set_delay(delay);
                    }
                    sleep(ms(3)).await;
                }
            })
        };
        let mut tasks = Vec::new();
        for (client, locker) in [slow.clone(), fast.clone()].into_iter().enumerate() {
            let (history, late) = (Arc::clone(&history), Arc::clone(&late));
            tasks.push(tokio::spawn(async move {
                while Instant::now() < end {
                    // The slow client tries once at a time (a late grant surfaces as such).
                    let options = if client == 0 {
                        single(ms(12))
                    } else {
                        waiting(ms(12), ms(200))
                    };
                    match locker.acquire_with("both", &options).await {
                        Ok(guard) => {
                            let from = Instant::now();
                            let until = guard.valid_until();
                            let fence = guard.fencing_token();
                            sleep(ms(1)).await;
                            let released = Instant::now();
                            let _ = guard.release().await;
                            history.lock().unwrap().push(Held {
                                client,
                                from,
                                until,
                                end: released.min(until),
                                fence,
                            });
                        }
                        Err(LockError::Backend { message, .. })
                            if message.contains("raise the ttl") =>
                        {
                            late.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(
                            LockError::Timeout { .. }
                            | LockError::Locked { .. }
                            | LockError::QuorumNotReached { .. },
                        ) => {
                            if client == 0 {
                                sleep(ms(2)).await;
                            }
                        }
                        Err(error) => panic!("{backend}, client {client}: {error}"),
                    }
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        flipper.await.unwrap();
        slow.stop().await.unwrap();
        fast.stop().await.unwrap();
        let mut held = history.lock().unwrap().clone();
        held.sort_by_key(|held| held.from);
        for h in &held {
            assert!(h.until > h.from, "{backend}: a guard born expired: {h:?}");
        }
        for pair in held.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            assert!(
                b.from >= a.end,
                "{backend}: two holders at once: {a:?} then {b:?}"
            );
            if let (Some(x), Some(y)) = (a.fence, b.fence) {
                assert!(
                    y > x,
                    "{backend}: fencing token went backwards: {a:?} then {b:?}"
                );
            }
        }
        let slow_held = held.iter().filter(|h| h.client == 0).count();
        eprintln!(
            "{backend}: {} holds ({slow_held} by the slow client), {} late grants",
            held.len(),
            late.load(std::sync::atomic::Ordering::Relaxed)
        );
        let left = left_after_heal(&nodes, Some(Duration::from_secs(1))).await;
        assert!(left.is_empty(), "{backend}: left: {left:?}");
    }
}

/// A fair line on redis (one node) and Redlock (three nodes): a holder, then a slow waiter
/// (16 ms away each way, ttl 400 ms with drift_factor 0.93: 26 ms of validity, so every grant
/// comes back too late, while its place in line outlives its polls), then a fast waiter. When
/// the holder releases, the turn passes to the slow waiter, whose grant is too late and is
/// released: the fast waiter must be served within 200 ms, not left behind a reservation for
/// the slow waiter's whole entry (400 ms) or its deadline. The slow waiter's wait ends by its
/// deadline, and once every client stopped no line, entry or reservation is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_head_passes_the_turn_on_at_once() {
    if redis_or_skip("s34c late head").is_none() {
        return;
    }
    for count in [1usize, 3] {
        for fencing in [false, true] {
            let case = format!("{count} node(s), fencing {fencing}");
            let nodes = nodes(count).await;
            let slow = redlock_with(
                RedlockConfig::new(proxied(&nodes))
                    .with_drift_factor(0.93)
                    .with_node_timeout(Duration::from_secs(1)),
                true,
                fencing,
            );
            let fast = redlock(&direct(&nodes), true, fencing);
            let holder = redlock(&direct(&nodes), true, fencing);
            warm(&slow).await;
            warm(&fast).await;
            warm(&holder).await;
            for node in &nodes {
                node.proxy.set_delay(ms(16));
            }
            let held = holder
                .acquire_with("line", &single(Duration::from_secs(5)))
                .await
                .unwrap();
            let slow_wait = {
                let slow = slow.clone();
                tokio::spawn(async move {
                    let started = Instant::now();
                    let outcome = slow
                        .acquire_with("line", &waiting(ms(400), ms(1_800)))
                        .await;
                    (outcome.map(|guard| guard.valid_until()), started.elapsed())
                })
            };
            // Subscribing for turns takes the slow waiter a few round trips before it lines up.
            sleep(ms(400)).await;
            assert_eq!(
                line_of(&nodes[0].server, "line").len(),
                1,
                "{case}: the slow waiter is in line"
            );
            let fast_wait = {
                let fast = fast.clone();
                tokio::spawn(async move {
                    let guard = fast
                        .acquire_with("line", &waiting(Duration::from_secs(2), ms(3_000)))
                        .await;
                    let at = Instant::now();
                    if let Ok(guard) = guard.as_ref() {
                        assert!(guard.valid_until() > at);
                    }
                    sleep(ms(50)).await;
                    if let Ok(guard) = guard {
                        guard.release().await.unwrap();
                    }
                    at
                })
            };
            sleep(ms(150)).await;
            assert_eq!(
                line_of(&nodes[0].server, "line").len(),
                2,
                "{case}: both waiters are in line"
            );
            let released = Instant::now();
            held.release().await.unwrap();
            let served = fast_wait.await.unwrap();
            let (slow_outcome, slow_took) = slow_wait.await.unwrap();
            eprintln!(
                "{case}: fast served {:?} after the release; slow: {slow_outcome:?} after {slow_took:?}",
                served - released
            );
            assert!(
                served - released < ms(200),
                "{case}: the fast waiter was served {:?} after the release",
                served - released
            );
            assert!(
                slow_took < ms(1_800) + ms(150),
                "{case}: slow waited {slow_took:?}"
            );
            for locker in [&slow, &fast, &holder] {
                locker.stop().await.unwrap();
            }
            let left = left_after_heal(&nodes, Some(Duration::from_secs(1))).await;
            assert!(left.is_empty(), "{case}: left: {left:?}");
        }
    }
}

/// Counted retries whose every attempt is granted too late: the loop makes exactly its
/// `retries + 1` attempts (counted on the server: one `SET` per attempt of a plain one-node
/// Redlock, one `INCR`-family script run per inc attempt), no more (a late grant is not
/// retried at once behind the policy's back) and no fewer, then returns the error naming the
/// ttl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counted_retries_of_late_grants_make_every_attempt_once() {
    if redis_or_skip("s34c counted").is_none() {
        return;
    }
    for backend in ["redis", "inc"] {
        let nodes = nodes(1).await;
        let (locker, ttl, command) = if backend == "inc" {
            (inc(&nodes[0].proxy.url(), false).await, ms(5), "evalsha")
        } else {
            (redlock(&proxied(&nodes), false, false), ms(10), "set")
        };
        warm(&locker).await;
        nodes[0].proxy.set_delay(ms(6));
        let before = nodes[0].server.calls(command).unwrap();
        let outcome = locker
            .acquire_with("counted", &options(ttl, RetryPolicy::doubling(ms(2), 3)))
            .await;
        assert!(says_raise_the_ttl(&outcome), "{backend}: {outcome:?}");
        // Let the background releases land.
        sleep(ms(200)).await;
        let calls = nodes[0].server.calls(command).unwrap() - before;
        eprintln!("{backend}: {calls} {command} calls");
        let attempts = if backend == "inc" { calls / 2 } else { calls };
        assert_eq!(
            attempts, 4,
            "{backend}: {calls} {command} calls for 4 attempts"
        );
        locker.stop().await.unwrap();
    }
}

/// A writer that found a reader left a claim that keeps new readers out; the reader goes, and
/// every later attempt of the writer is granted too late (drift_factor 0.93 of 400 ms, nodes
/// 16 ms away each way) and released. When the writer gives up at its deadline, its claim is
/// taken back: a new reader is let in at once, not after the claim's ttl. Redis (one node) and
/// Redlock (three).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_whose_grants_come_late_leaves_no_claim_when_it_gives_up() {
    if redis_or_skip("s34c writer claim").is_none() {
        return;
    }
    for count in [1usize, 3] {
        let nodes = nodes(count).await;
        let writer = redlock_with(
            RedlockConfig::new(proxied(&nodes)).with_drift_factor(0.93),
            true,
            false,
        );
        let readers = redlock(&direct(&nodes), true, false);
        warm(&writer).await;
        warm(&readers).await;
        for node in &nodes {
            node.proxy.set_delay(ms(16));
        }
        let read = readers
            .acquire_kind("rw", LeaseKind::Read, &single(Duration::from_secs(5)))
            .await
            .unwrap();
        let writing = {
            let writer = writer.clone();
            tokio::spawn(async move {
                writer
                    .acquire_kind("rw", LeaseKind::Write, &waiting(ms(400), ms(700)))
                    .await
                    .map(|guard| guard.valid_until())
            })
        };
        sleep(ms(250)).await;
        let kept_out = readers
            .acquire_kind("rw", LeaseKind::Read, &single(Duration::from_secs(5)))
            .await;
        assert!(
            matches!(kept_out, Err(LockError::Locked { .. })),
            "{count} node(s): the waiting writer keeps new readers out: {kept_out:?}"
        );
        read.release().await.unwrap();
        let written = writing.await.unwrap();
        assert!(written.is_err(), "{count} node(s): {written:?}");
        let gave_up = Instant::now();
        let reader = readers
            .acquire_kind(
                "rw",
                LeaseKind::Read,
                &waiting(Duration::from_secs(5), ms(1_000)),
            )
            .await;
        let waited = gave_up.elapsed();
        eprintln!("{count} node(s): writer {written:?}; reader in after {waited:?}");
        assert!(reader.is_ok(), "{count} node(s): {reader:?}");
        assert!(
            waited < ms(150),
            "{count} node(s): a new reader waited {waited:?} after the writer gave up"
        );
        reader.unwrap().release().await.unwrap();
        writer.stop().await.unwrap();
        readers.stop().await.unwrap();
        let left = left_after_heal(&nodes, Some(Duration::from_secs(1))).await;
        assert!(left.is_empty(), "{count} node(s): left: {left:?}");
    }
}

/// A request stalled past its ttl (400 ms) then let through: the grant comes back too late and
/// is released in the background, and the policy retries at once (one retry, no delay). The
/// key is free but for that late grant of its own: the retry must win it (or fail naming the
/// ttl), never find it "held" because it overtook the release of its own late grant. inc
/// plain and fair, redis (one node) plain, fair, fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_right_after_a_late_grant_is_not_refused_by_it() {
    if redis_or_skip("s34c retry at once").is_none() {
        return;
    }
    let cases: [(&str, bool, bool); 6] = [
        ("inc", false, false),
        ("inc", true, false),
        ("redis", false, false),
        ("redis", true, false),
        ("redis", false, true),
        ("redis", true, true),
    ];
    for (backend, fair, fencing) in cases {
        let case = format!("{backend}, fair {fair}, fencing {fencing}");
        let nodes = nodes(1).await;
        let locker = if backend == "inc" {
            inc(&nodes[0].proxy.url(), fair).await
        } else {
            redlock_with(
                RedlockConfig::new(proxied(&nodes)).with_node_timeout(Duration::from_secs(2)),
                fair,
                fencing,
            )
        };
        warm(&locker).await;
        // A waiter's first attempt is its own; the stall holds whichever is on the wire.
        nodes[0].proxy.stall_existing(0);
        let retry = RetryPolicy::none()
            .with_retry_count(lock_core::RetryCount::Limited(1))
            .with_retry_delay(Duration::ZERO)
            .with_retry_jitter(Duration::ZERO);
        let attempt = {
            let locker = locker.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let outcome = locker
                    .acquire_with("again", &options(ms(400), retry))
                    .await
                    .map(|guard| guard.valid_until() > Instant::now());
                (outcome, started.elapsed())
            })
        };
        sleep(ms(550)).await;
        nodes[0].proxy.release_stall();
        let (outcome, took) = attempt.await.unwrap();
        // The first attempt was the one stalled (the check bites only then).
        assert!(took >= ms(500), "{case}: took {took:?}");
        eprintln!("{case}: {outcome:?}");
        assert!(
            matches!(outcome, Ok(true))
                || matches!(&outcome, Err(LockError::Backend { message, .. }) if message.contains("raise the ttl")),
            "{case}: {outcome:?}"
        );
        locker.stop().await.unwrap();
        let left = left_within(&[&nodes[0].server], ms(1_000)).await;
        assert!(left.is_empty(), "{case}: left: {left:?}");
    }
}

/// Single tries swept across the boundary (the proxy's delay each way from just under to just
/// over half the validity): whatever the jitter, a guard handed out is still valid when the
/// caller gets it (to within a millisecond: scheduling after the core's check is not a round
/// trip), and every other try fails naming the ttl (the key is free). inc (the core's
/// `born_valid` decides) and redis (Redlock's own check, then the core's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tries_across_the_boundary_never_hand_out_an_expired_guard() {
    if redis_or_skip("s34c boundary").is_none() {
        return;
    }
    for backend in ["inc", "redis"] {
        let nodes = nodes(1).await;
        let locker = if backend == "inc" {
            inc(&nodes[0].proxy.url(), false).await
        } else {
            redlock(&proxied(&nodes), false, false)
        };
        warm(&locker).await;
        let ttl = ms(20);
        let (mut won, mut late, mut expired) = (0, 0, Vec::new());
        for delay in 7..=11u64 {
            nodes[0].proxy.set_delay(ms(delay));
            for n in 0..30 {
                let key = format!("edge-{delay}-{n}");
                match locker.acquire_with(&key, &single(ttl)).await {
                    Ok(guard) => {
                        let now = Instant::now();
                        // The core checks the validity when the answer arrives; a task
                        // descheduled between that check and this line (2 cores under load:
                        // 24 µs seen) is no round trip. A millisecond past is one.
                        if guard.valid_until() + ms(1) <= now {
                            expired.push((delay, now - guard.valid_until()));
                        }
                        won += 1;
                        drop(guard);
                    }
                    Err(LockError::Backend { message, .. })
                        if message.contains("raise the ttl") =>
                    {
                        late += 1;
                    }
                    Err(error) => panic!("{backend}, delay {delay}: {error}"),
                }
            }
        }
        eprintln!(
            "{backend}: {won} won, {late} late, {} born expired",
            expired.len()
        );
        assert!(
            expired.is_empty(),
            "{backend}: guards born expired (delay, by): {expired:?}"
        );
        assert!(
            won > 0 && late > 0,
            "{backend}: the sweep crossed the boundary"
        );
        locker.stop().await.unwrap();
    }
}

/// `stop` called while an attempt is stalled on its way (the store will grant it after its
/// validity): `stop` lets the answer come (half of `CLEANUP_WAIT` at most), takes back what it
/// granted, and only then closes; right after it returns, no lock key, line entry or claim is
/// left, and the acquisition ends with `Stopped` (or the error naming the ttl). inc, redis
/// (one node) and Redlock (three, two of them stalled), single tries and waits, fair and
/// plain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_during_a_stalled_late_attempt_leaves_nothing() {
    if redis_or_skip("s34c stop during").is_none() {
        return;
    }
    for backend in ["inc", "redis", "redlock"] {
        for fair in [false, true] {
            for wait in [false, true] {
                let case = format!("{backend}, fair {fair}, wait {wait}");
                let count = if backend == "redlock" { 3 } else { 1 };
                let nodes = nodes(count).await;
                let locker = if backend == "inc" {
                    inc(&nodes[0].proxy.url(), fair).await
                } else {
                    redlock(&proxied(&nodes), fair, true)
                };
                warm(&locker).await;
                for node in nodes.iter().take(2) {
                    node.proxy.stall_existing(0);
                }
                let options = if wait {
                    waiting(ms(500), Duration::from_secs(5))
                } else {
                    single(ms(500))
                };
                let attempt = {
                    let locker = locker.clone();
                    tokio::spawn(async move { locker.acquire_with("stop-during", &options).await })
                };
                sleep(ms(300)).await;
                let stopping = {
                    let locker = locker.clone();
                    tokio::spawn(async move {
                        locker.stop().await.unwrap();
                        Instant::now()
                    })
                };
                sleep(ms(350)).await;
                for node in &nodes {
                    node.proxy.release_stall();
                }
                let stopped_at = stopping.await.unwrap();
                let left = left_now(&nodes.iter().map(|node| &node.server).collect::<Vec<_>>());
                let outcome = attempt.await.unwrap();
                eprintln!("{case}: {:?}", outcome.as_ref().map(|_| ()));
                assert!(
                    matches!(outcome, Err(LockError::Stopped)) || says_raise_the_ttl(&outcome),
                    "{case}: {outcome:?}"
                );
                assert!(left.is_empty(), "{case}: left right after stop: {left:?}");
                assert!(
                    stopped_at.elapsed() < ms(100),
                    "{case}: the attempt ended {:?} after stop returned",
                    stopped_at.elapsed()
                );
            }
        }
    }
}

/// `redis` is Redlock on one node: there is no quorum there, and its fair mutex's late grant
/// says "the node for `k` answered too late". Its plain mutex, multi-key mutex, permit, read
/// and write leases said "the quorum for `k` answered too late" (and, with a drift allowance
/// that takes the whole ttl, "the quorum granted `k` with no validity"): on one node every
/// such error names the node, over three nodes the quorum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_grant_on_one_node_names_the_node_not_a_quorum() {
    if redis_or_skip("s34c one node wording").is_none() {
        return;
    }
    for count in [1usize, 3] {
        let nodes = nodes(count).await;
        let (who, not) = if count == 1 {
            ("the node", "quorum")
        } else {
            ("the quorum", "the node")
        };
        for fair in [false, true] {
            // Late: 6 ms away each way against a 10 ms ttl; and a drift allowance that takes
            // the whole ttl (no delay needed).
            for drift in [0.01, 0.999] {
                let locker = redlock_with(
                    RedlockConfig::new(proxied(&nodes)).with_drift_factor(drift),
                    fair,
                    false,
                );
                if drift < 0.5 {
                    warm(&locker).await;
                    for node in &nodes {
                        node.proxy.set_delay(ms(6));
                    }
                }
                let case = format!("{count} node(s), fair {fair}, drift_factor {drift}");
                let mut errors = Vec::new();
                for (name, kind) in kinds() {
                    let key = format!("who-{name}");
                    errors.push((name, locker.acquire_kind(&key, kind, &single(ms(10))).await));
                }
                errors.push((
                    "multi-key",
                    locker
                        .clone()
                        .with_options(single(ms(10)))
                        .unwrap()
                        .acquire_many(&["who-a", "who-b"])
                        .await,
                ));
                for (name, outcome) in errors {
                    assert!(says_raise_the_ttl(&outcome), "{case}, {name}: {outcome:?}");
                    let message = outcome.unwrap_err().to_string();
                    assert!(
                        message.contains(who) && !message.contains(not),
                        "{case}, {name}: {message}"
                    );
                }
                locker.stop().await.unwrap();
                for node in &nodes {
                    node.proxy.set_delay(Duration::ZERO);
                }
            }
        }
    }
}

/// inc's permits and read/write leases, granted too late (one server 6 ms away each way, ttl 5
/// ms; and a request stalled past a 300 ms ttl, whose lease would live on): a single try and
/// a wait both fail naming the ttl, never "held" on a free key; the stalled one is taken back
/// before `stop` returns, and the next holder of the same kind is let in at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_late_leases_name_the_ttl_and_are_taken_back() {
    if redis_or_skip("s34c inc leases").is_none() {
        return;
    }
    for (name, kind) in kinds().into_iter().skip(1) {
        let nodes = nodes(1).await;
        let key = format!("inc-lease-{name}");
        let slow = inc(&nodes[0].proxy.url(), false).await;
        warm(&slow).await;
        nodes[0].proxy.set_delay(ms(6));
        let once = slow.acquire_kind(&key, kind, &single(ms(5))).await;
        assert!(says_raise_the_ttl(&once), "{name}, single: {once:?}");
        let waited = slow
            .acquire_kind(&key, kind, &waiting(ms(5), ms(100)))
            .await;
        assert!(says_raise_the_ttl(&waited), "{name}, wait: {waited:?}");
        nodes[0].proxy.set_delay(Duration::ZERO);
        nodes[0].proxy.stall_existing(0);
        let attempt = {
            let slow = slow.clone();
            let key = key.clone();
            tokio::spawn(async move { slow.acquire_kind(&key, kind, &single(ms(300))).await })
        };
        sleep(ms(400)).await;
        nodes[0].proxy.release_stall();
        let stalled = attempt.await.unwrap();
        assert!(says_raise_the_ttl(&stalled), "{name}, stalled: {stalled:?}");
        slow.stop().await.unwrap();
        let left = left_now(&[&nodes[0].server]);
        assert!(left.is_empty(), "{name}: left right after stop: {left:?}");
        // Nothing of the late lease keeps the next holder of its kind out.
        let fresh = inc(&nodes[0].server.url(), false).await;
        let next = fresh
            .acquire_kind(&key, kind, &single(Duration::from_secs(2)))
            .await;
        assert!(next.is_ok(), "{name}: the next holder: {next:?}");
        next.unwrap().release().await.unwrap();
        fresh.stop().await.unwrap();
    }
}

//! Attack on session 29's give-back (e3e13e5): a fair Redlock plain attempt that set the key
//! and found a waiting line gives the key back and retakes it in one script
//! (`lua/give_back.lua`) that acts only while the key still holds its token, passes the turn to
//! the first live waiter (pruning lapsed ones), and retakes the key only when the pass left it
//! free. The script is run directly against keys that are not ours (another token, a
//! reservation, no key, another type) and lines mixing lapsed and live waiters, on redis and
//! valkey; then through the client: slow nodes behind a proxy (one and three nodes, manager and
//! pool connections, scripts flushed so the give-back meets NOSCRIPT, a pool connection stalled
//! so that the release overtakes the give-back, a give-back dropped on its way), a single try
//! behind a lapsed head with a live waiter second, and waiters woken by the turn channel and by
//! `wake_on_release` after a give-back that no longer publishes a release. All held; each check
//! fails with the script broken (no token check, an unconditional retake, no wake-up), and the
//! slow-node and pool checks fail with node.rs as it was before e3e13e5.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use lock_core::raw::redis::{LINE_SCRIPT, RESERVED, TURN_CHANNEL};
use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_redlock::{ConnectionKind, Redlock, RedlockConfig};
use lock_tests::fair::{Store, Target, connect, lapsed_line, line_members, line_names, waiting};
use lock_tests::nodes::Nodes;
use lock_tests::proxy::LatencyProxy;
use lock_tests::server::{RedisServer, published_messages, redis_or_skip, valkey_server_binary};
use redis::aio::MultiplexedConnection;
use tokio::time::sleep;

/// `n` milliseconds.
fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Waits forever (30 s at most), polling every 10 s: a waiter that is not woken is seen.
fn slow_poll() -> RetryPolicy {
    waiting(ms(10_000)).with_max_delay(ms(10_000))
}

/// The give-back as lock-redlock builds it (node.rs `GIVE_BACK`).
fn give_back_script() -> redis::Script {
    redis::Script::new(
        &[
            LINE_SCRIPT,
            include_str!("../../lock-redlock/src/lua/line_pass.lua"),
            include_str!("../../lock-redlock/src/lua/give_back.lua"),
        ]
        .concat(),
    )
}

/// Runs the give-back of `key` for `token` with a ttl of `ttl` ms.
async fn give_back(c: &mut MultiplexedConnection, key: &str, token: &str, ttl: u64) -> i64 {
    let [line, index] = line_names(Store::Redis, key);
    give_back_script()
        .key(key)
        .key(line)
        .key(index)
        .arg(token)
        .arg(ttl)
        .arg(TURN_CHANNEL)
        .invoke_async(c)
        .await
        .unwrap()
}

/// The server's clock in ms.
async fn server_ms(c: &mut MultiplexedConnection) -> i64 {
    let time: Vec<i64> = redis::cmd("TIME").query_async(c).await.unwrap();
    time[0] * 1000 + time[1] / 1000
}

/// A line member: 32 hex digits of a client, then the waiter.
fn member(client: u32, waiter: &str) -> String {
    format!("{client:032x}{waiter}")
}

/// Puts `entries` (member, entry expiry relative to the server's clock in ms) in `key`'s line in
/// that order; both line keys expire 60 s from now.
async fn make_line(c: &mut MultiplexedConnection, key: &str, entries: &[(&str, i64)]) {
    let now = server_ms(c).await;
    let names = line_names(Store::Redis, key);
    for (place, (member, expiry)) in entries.iter().enumerate() {
        let () = redis::pipe()
            .cmd("ZADD")
            .arg(&names[0])
            .arg(now * 1000 + i64::try_from(place).unwrap())
            .arg(*member)
            .ignore()
            .cmd("ZADD")
            .arg(&names[1])
            .arg(now + expiry)
            .arg(*member)
            .ignore()
            .query_async(c)
            .await
            .unwrap();
    }
    for name in &names {
        let () = redis::cmd("PEXPIRE")
            .arg(name)
            .arg(60_000)
            .query_async(c)
            .await
            .unwrap();
    }
}

/// `key`'s value (nil as None; another type as its TYPE in angle brackets) and PTTL.
async fn key_state(c: &mut MultiplexedConnection, key: &str) -> (Option<String>, i64) {
    let kind: String = redis::cmd("TYPE").arg(key).query_async(c).await.unwrap();
    let value = match kind.as_str() {
        "none" => None,
        "string" => redis::cmd("GET").arg(key).query_async(c).await.unwrap(),
        other => Some(format!("<{other}>")),
    };
    let pttl: i64 = redis::cmd("PTTL").arg(key).query_async(c).await.unwrap();
    (value, pttl)
}

/// The line's members, and how many entries its expiry index holds.
async fn line_state(c: &mut MultiplexedConnection, key: &str) -> (Vec<String>, i64) {
    let members = line_members(c, key).await;
    let index: i64 = redis::cmd("ZCARD")
        .arg(&line_names(Store::Redis, key)[1])
        .query_async(c)
        .await
        .unwrap();
    (members, index)
}

/// The servers to run the script on: redis, and valkey when installed.
fn binaries() -> Vec<std::path::PathBuf> {
    let Some(redis) = redis_or_skip("give-back attack") else {
        return Vec::new();
    };
    let mut all = vec![redis];
    all.extend(valkey_server_binary());
    all
}

/// The give-back writes nothing where the key does not hold its token: another holder's key,
/// a reservation for a live waiter, a key gone (a release of ours landed first), a key of
/// another type. Each time with a line of lapsed entries only, which a give-back that acted
/// would prune and delete before retaking the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_give_back_touches_nothing_when_the_key_is_not_ours() {
    for binary in binaries() {
        let server = RedisServer::start(&binary, &[]).unwrap();
        let mut c = connect(&server.url()).await;
        let ghost = member(1, "ghost");
        let live = member(2, "live");
        let reserved = format!("{RESERVED}{live}");
        let cases: [(&str, Option<&str>); 4] = [
            ("other", Some("someone-else")),
            ("reserved", Some(reserved.as_str())),
            ("gone", None),
            ("hash", None),
        ];
        for (key, value) in cases {
            make_line(&mut c, key, &[(&ghost, -1_000)]).await;
            match value {
                Some(value) => {
                    let () = redis::cmd("SET")
                        .arg(key)
                        .arg(value)
                        .arg("PX")
                        .arg(30_000)
                        .query_async(&mut c)
                        .await
                        .unwrap();
                }
                None if key == "hash" => {
                    let () = redis::cmd("HSET")
                        .arg(key)
                        .arg("f")
                        .arg("v")
                        .query_async(&mut c)
                        .await
                        .unwrap();
                }
                None => {}
            }
            let before = key_state(&mut c, key).await;
            let line_before = line_state(&mut c, key).await;
            let answer = give_back(&mut c, key, "ours", 10_000).await;
            let after = key_state(&mut c, key).await;
            let line_after = line_state(&mut c, key).await;
            assert_eq!(answer, 0, "{binary:?} {key}: the give-back retook the key");
            assert_eq!(
                before.0, after.0,
                "{binary:?} {key}: the give-back changed a key not holding its token"
            );
            assert!(
                after.1 <= before.1 && after.1 + 100 >= before.1,
                "{binary:?} {key}: the key's ttl moved from {} to {}",
                before.1,
                after.1
            );
            assert_eq!(
                line_before, line_after,
                "{binary:?} {key}: the give-back worked a line without holding the key"
            );
        }
    }
}

/// The give-back passes the turn to the first live waiter: a lapsed head is pruned and the
/// live waiter behind it gets the reservation (for what its entry has left) and the message,
/// never the retake; a live head followed by a lapsed entry keeps its line as it is. A line of
/// lapsed entries only is deleted and the key retaken for the full ttl, with no message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_give_back_never_passes_a_live_waiter() {
    for binary in binaries() {
        let server = RedisServer::start(&binary, &[]).unwrap();
        let messages = published_messages(&server);
        let mut c = connect(&server.url()).await;
        let ghost = member(1, "ghost");
        let late = member(3, "late");
        let live = member(2, "live");
        let set_ours = |key: &'static str| {
            let mut command = redis::cmd("SET");
            command.arg(key).arg("ours").arg("PX").arg(10_000);
            command
        };
        let heads: [(&'static str, Vec<(&str, i64)>); 2] = [
            (
                "behind-lapsed",
                vec![(&ghost, -1_000), (&live, 5_000), (&late, -500)],
            ),
            ("live-head", vec![(&live, 5_000), (&ghost, -1_000)]),
        ];
        for (key, entries) in heads {
            make_line(&mut c, key, &entries).await;
            let () = set_ours(key).query_async(&mut c).await.unwrap();
            let before = messages.lock().unwrap().len();
            let answer = give_back(&mut c, key, "ours", 10_000).await;
            let (value, pttl) = key_state(&mut c, key).await;
            assert_eq!(
                answer, 0,
                "{binary:?} {key}: the give-back retook the key past a live waiter"
            );
            assert_eq!(
                value.as_deref(),
                Some(format!("{RESERVED}{live}").as_str()),
                "{binary:?} {key}: the key is not reserved for the live waiter"
            );
            assert!(
                (4_800..=5_000).contains(&pttl),
                "{binary:?} {key}: the reservation lives {pttl} ms, not what the entry has left"
            );
            let (members, index) = line_state(&mut c, key).await;
            if key == "behind-lapsed" {
                assert_eq!(
                    (members, index),
                    (vec![live.clone()], 1),
                    "{binary:?}: the lapsed entries were not pruned"
                );
            } else {
                assert_eq!(
                    members,
                    vec![live.clone(), ghost.clone()],
                    "{binary:?}: a live head's line was reordered"
                );
            }
            // The message, gathered by another connection.
            let deadline = Instant::now() + ms(1_000);
            let woken = loop {
                let found = messages.lock().unwrap()[before..]
                    .iter()
                    .find(|(channel, _)| channel.starts_with(TURN_CHANNEL))
                    .cloned();
                if found.is_some() || Instant::now() > deadline {
                    break found;
                }
                sleep(ms(10)).await;
            };
            let (channel, message) = woken.expect("the live waiter was not woken");
            assert_eq!(channel, format!("{TURN_CHANNEL}{}", &live[..32]));
            assert!(
                message.starts_with("live:"),
                "{binary:?} {key}: the message names {message}"
            );
        }
        // Lapsed entries only: pruned, the line deleted, the key ours again.
        let key = "lapsed-only";
        make_line(&mut c, key, &[(&ghost, -1_000), (&late, -1)]).await;
        let () = set_ours(key).query_async(&mut c).await.unwrap();
        sleep(ms(50)).await;
        let before = messages.lock().unwrap().len();
        assert_eq!(give_back(&mut c, key, "ours", 20_000).await, 1);
        let (value, pttl) = key_state(&mut c, key).await;
        assert_eq!(value.as_deref(), Some("ours"));
        assert!(pttl > 19_000, "{binary:?}: retaken for {pttl} ms");
        assert_eq!(line_state(&mut c, key).await, (Vec::new(), 0));
        let names = line_names(Store::Redis, key);
        let exists: i64 = redis::cmd("EXISTS")
            .arg(&names[0])
            .arg(&names[1])
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(exists, 0, "{binary:?}: the lapsed line's keys are left");
        sleep(ms(100)).await;
        assert_eq!(
            messages.lock().unwrap().len(),
            before,
            "{binary:?}: a give-back with nobody live in line published"
        );
    }
}

/// A fair Redlock client over `urls`.
fn fair_locker(urls: Vec<String>, pool: bool, ttl: Duration, retry: RetryPolicy) -> Locker {
    let mut config = RedlockConfig::new(urls)
        .with_fair(true)
        .with_node_timeout(ms(2_000));
    if pool {
        config = config.with_connection(ConnectionKind::Pool);
    }
    Locker::new(Redlock::new(config).unwrap())
        .with_options(LockOptions::default().with_ttl(ttl).with_retry(retry))
        .unwrap()
}

/// `SCRIPT FLUSH` on the server at `url`.
async fn flush_scripts(url: &str) {
    let mut c = connect(url).await;
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut c)
        .await
        .unwrap();
}

/// What is left of `key` and of its line on `servers`.
async fn leftovers(servers: &[RedisServer], key: &str) -> Vec<String> {
    let mut left = Vec::new();
    for (index, server) in servers.iter().enumerate() {
        let mut c = connect(&server.url()).await;
        let (value, pttl) = key_state(&mut c, key).await;
        if pttl != -2 {
            left.push(format!("node {index}: {key} = {value:?} for {pttl} ms"));
        }
        for name in line_names(Store::Redlock3, key) {
            let exists: i64 = redis::cmd("EXISTS")
                .arg(&name)
                .query_async(&mut c)
                .await
                .unwrap();
            if exists == 1 {
                left.push(format!(
                    "node {index}: {} is left",
                    String::from_utf8_lossy(&name)
                ));
            }
        }
    }
    left
}

/// One acquire and release of a key that has a line of lapsed entries on the last of `nodes`
/// nodes, that node behind a 50 ms proxy (scripts flushed everywhere first when `flush`, so
/// the give-back meets NOSCRIPT): nothing is left of the key or of the line afterwards.
async fn slow_node_case(binary: &Path, nodes: usize, pool: bool, flush: bool) {
    let servers: Vec<RedisServer> = (0..nodes)
        .map(|_| RedisServer::start(binary, &[]).unwrap())
        .collect();
    let proxy = LatencyProxy::start(servers[nodes - 1].port())
        .await
        .unwrap();
    let mut urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    urls[nodes - 1] = proxy.url();
    let locker = fair_locker(urls, pool, ms(10_000), RetryPolicy::none());
    locker
        .acquire("warm")
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    let case = format!("{binary:?}, {nodes} nodes, pool {pool}, flush {flush}");
    for round in 0..2 {
        let key = format!("k{round}");
        lapsed_line(&servers[nodes - 1].url(), &key).await;
        if flush {
            for server in &servers {
                flush_scripts(&server.url()).await;
            }
        }
        proxy.set_delay(ms(50));
        let guard = locker.acquire(&key).await.unwrap();
        guard.release().await.unwrap();
        // The slow node's exchange (a few 100 ms round trips), then any re-sends.
        sleep(ms(1_200)).await;
        proxy.set_delay(Duration::ZERO);
        let left = leftovers(&servers, &key).await;
        assert!(left.is_empty(), "{case}, round {round}: left {left:?}");
    }
    locker.stop().await.unwrap();
}

/// Three nodes, the slow one's give-back after NOSCRIPT (manager and pool), and without a
/// flush on a pool: the release sent once the fast nodes answered lands before the give-back
/// there, which then must write nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_with_a_slow_one_leave_nothing() {
    let Some(binary) = redis_or_skip("give-back attack") else {
        return;
    };
    slow_node_case(&binary, 3, false, true).await;
    slow_node_case(&binary, 3, true, false).await;
    slow_node_case(&binary, 3, true, true).await;
}

/// One slow node (the give-back decides the attempt) with its scripts flushed, manager and
/// pool, and three valkey nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slow_node_and_valkey_leave_nothing() {
    let Some(binary) = redis_or_skip("give-back attack") else {
        return;
    };
    slow_node_case(&binary, 1, false, true).await;
    slow_node_case(&binary, 1, true, true).await;
    if let Some(valkey) = valkey_server_binary() {
        slow_node_case(&valkey, 3, false, true).await;
    }
}

/// A pool on three nodes, the third with a lapsed line: its connections open at the attempt
/// stall right after the plain `SET` and `EXISTS` have passed (50 ms each way), so the
/// give-back (on the connection the `SET` used) is held while the release goes out on a new one
/// and deletes the `SET` first. Released after `hold`: within the round (the give-back answers) or past it
/// (the give-back's request is dropped, the node counted failed and sent the release again).
/// Either way nothing is left once the held give-back lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_s_release_that_overtakes_the_give_back_leaves_nothing() {
    let Some(_) = redis_or_skip("give-back attack") else {
        return;
    };
    for hold in [ms(700), ms(2_500)] {
        let nodes = Nodes::start().await;
        let (servers, proxy) = (&nodes.servers, &nodes.proxy);
        let urls = nodes.urls().to_vec();
        let locker = fair_locker(urls, true, ms(10_000), RetryPolicy::none());
        // One connection to the third node: the warm-up's release is sent once its `SET`
        // answered there (and within a second of the attempt: no check of an idle connection).
        let warm = locker.acquire("warm").await.unwrap();
        sleep(ms(50)).await;
        warm.release().await.unwrap();
        sleep(ms(50)).await;
        lapsed_line(&servers[2].url(), "k").await;
        let mut c = connect(&servers[2].url()).await;
        let () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut c)
            .await
            .unwrap();
        // Slow, so that the release (sent once the fast nodes answered) checks out a new
        // connection while the plain `SET` is out, and the give-back the one the `SET` used.
        proxy.set_delay(ms(50));
        proxy.stall_existing(2);
        let guard = locker.acquire("k").await.unwrap();
        guard.release().await.unwrap();
        sleep(hold).await;
        // The release went through (on a new connection) and deleted the plain `SET`; the
        // give-back is still held.
        assert_eq!(servers[2].calls("set").unwrap(), 1, "held {hold:?}");
        if hold < ms(1_500) {
            assert_eq!(servers[2].calls("evalsha").unwrap(), 1, "held {hold:?}");
        }
        assert_eq!(key_state(&mut c, "k").await, (None, -2), "held {hold:?}");
        proxy.release_stall();
        sleep(ms(1_000)).await;
        let left = leftovers(servers, "k").await;
        assert!(left.is_empty(), "held {hold:?}: left {left:?}");
        // The held give-back ran after the release.
        assert!(servers[2].calls("evalsha").unwrap() >= 2, "held {hold:?}");
        locker.stop().await.unwrap();
    }
}

/// Redlock (one and three nodes): a non-fair holder, a dead waiter whose entry lapses at the
/// head of the line, a live fair waiter second with a long retry delay. The holder's release
/// (a client without `fair`: no pass) leaves the key free with the line there; a fair single
/// try then takes the key in its plain `SET` and must give it to the live waiter: refused, the
/// key reserved for the waiter, which is woken and holds the lock long before its poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_try_behind_a_lapsed_head_gives_the_key_to_the_live_waiter_second() {
    for store in [Store::Redis, Store::Redlock3] {
        let Some(target) = Target::start(store, "give-back attack").await else {
            return;
        };
        let key = "second";
        let holder = target.locker(false, ms(40_000), RetryPolicy::none()).await;
        let held = holder.acquire(key).await.unwrap();
        target.dead_waiter(key, ms(400)).await;
        let waiter = target.locker(true, ms(40_000), slow_poll()).await;
        let waiting = tokio::spawn(async move {
            let guard = waiter.acquire(key).await.unwrap();
            let got = Instant::now();
            // Held long enough that the single try cannot take the key after this turn.
            sleep(ms(1_000)).await;
            guard.release().await.unwrap();
            got
        });
        // The live waiter is second on every node.
        for server in &target.servers {
            let mut c = connect(&server.url()).await;
            let deadline = Instant::now() + ms(3_000);
            while line_members(&mut c, key).await.len() < 2 {
                assert!(
                    Instant::now() < deadline,
                    "{store:?}: the waiter never lined up"
                );
                sleep(ms(10)).await;
            }
        }
        // The single try's client connected to every node.
        let single = target.locker(true, ms(40_000), RetryPolicy::none()).await;
        single
            .acquire("warm")
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
        sleep(ms(500)).await;
        held.release().await.unwrap();
        let tried = Instant::now();
        let taken = single.try_acquire(key).await.unwrap();
        assert!(
            taken.is_none(),
            "{store:?}: a single try took the key past a live waiter"
        );
        let got = tokio::time::timeout(ms(5_000), waiting)
            .await
            .expect("the live waiter was not woken")
            .unwrap();
        assert!(
            got.duration_since(tried) < ms(2_000),
            "{store:?}: the live waiter took {:?}",
            got.duration_since(tried)
        );
        let left = target
            .keys_left_within(ms(2_000), |name| name.starts_with(key))
            .await;
        assert!(left.is_empty(), "{store:?}: left {left:?}");
    }
}

/// One node, everyone with `wake_on_release`: a fair waiter in line and a client without
/// `fair` waiting on the release channel, both with long retry delays, the key freed by a
/// holder that announces nothing. A fair single try's give-back (which, unlike the release it
/// replaced, publishes no release) reserves the key for the fair waiter and wakes it; its
/// release then wakes the other. Neither waits for its poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_on_both_channels_are_woken_after_a_give_back() {
    let Some(binary) = redis_or_skip("give-back attack") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let client = |fair: bool, wake: bool, retry: RetryPolicy| {
        Locker::new(
            Redlock::new(
                RedlockConfig::new([server.url()])
                    .with_fair(fair)
                    .with_wake_on_release(wake)
                    .with_node_timeout(ms(2_000)),
            )
            .unwrap(),
        )
        .with_options(
            LockOptions::default()
                .with_ttl(ms(40_000))
                .with_retry(retry),
        )
        .unwrap()
    };
    let key = "both";
    let holder = client(false, false, RetryPolicy::none());
    let held = holder.acquire(key).await.unwrap();
    let fair_waiter = client(true, true, slow_poll());
    let fair_task = tokio::spawn(async move {
        let guard = fair_waiter.acquire(key).await.unwrap();
        let got = Instant::now();
        sleep(ms(500)).await;
        guard.release().await.unwrap();
        got
    });
    let mut c = connect(&server.url()).await;
    let deadline = Instant::now() + ms(3_000);
    while line_members(&mut c, key).await.is_empty() {
        assert!(Instant::now() < deadline, "the fair waiter never lined up");
        sleep(ms(10)).await;
    }
    let plain_waiter = client(false, true, slow_poll());
    let plain_task = tokio::spawn(async move {
        let guard = plain_waiter.acquire(key).await.unwrap();
        let got = Instant::now();
        guard.release().await.unwrap();
        got
    });
    // Both have tried and wait.
    sleep(ms(500)).await;
    let single = client(true, true, RetryPolicy::none());
    single
        .acquire("warm")
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    held.release().await.unwrap();
    let tried = Instant::now();
    assert!(
        single.try_acquire(key).await.unwrap().is_none(),
        "the single try passed the fair waiter"
    );
    let fair_got = tokio::time::timeout(ms(5_000), fair_task)
        .await
        .expect("the fair waiter was not woken")
        .unwrap();
    let plain_got = tokio::time::timeout(ms(5_000), plain_task)
        .await
        .expect("the waiter on the release channel was not woken")
        .unwrap();
    assert!(
        fair_got.duration_since(tried) < ms(2_000),
        "the fair waiter took {:?}",
        fair_got.duration_since(tried)
    );
    assert!(
        plain_got.duration_since(tried) < ms(3_500),
        "the waiter on the release channel took {:?}",
        plain_got.duration_since(tried)
    );
}

/// Three nodes, the third (with a lapsed line) behind a proxy that drops the give-back on its
/// way, with its connection, after the plain `SET` took the key there: the node fails the
/// attempt with our `SET` in place. Whether the attempt is won (the other two free) or refused
/// (the other two held by someone else), the release or the undo that follows must still reach
/// the third node and delete it, and nothing of the other holder's is touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_give_back_lost_on_its_way_leaves_nothing() {
    let Some(_) = redis_or_skip("give-back attack") else {
        return;
    };
    let sha = give_back_script().get_hash().to_owned();
    for won in [true, false] {
        let nodes = Nodes::start().await;
        let (servers, proxy) = (&nodes.servers, &nodes.proxy);
        let urls = nodes.urls().to_vec();
        let locker = fair_locker(urls, false, ms(10_000), RetryPolicy::none());
        locker
            .acquire("warm")
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
        lapsed_line(&servers[2].url(), "k").await;
        if !won {
            for server in &servers[..2] {
                let mut c = connect(&server.url()).await;
                let () = redis::cmd("SET")
                    .arg("k")
                    .arg("someone-else")
                    .arg("PX")
                    .arg(30_000)
                    .query_async(&mut c)
                    .await
                    .unwrap();
            }
        }
        proxy.drop_next(sha.clone().into_bytes());
        let attempt = locker.try_acquire("k").await.unwrap();
        assert!(
            proxy.dropped_within(ms(1_000)).await,
            "won {won}: no give-back was sent"
        );
        assert_eq!(attempt.is_some(), won);
        if let Some(guard) = attempt {
            guard.release().await.unwrap();
        }
        sleep(ms(1_500)).await;
        let mut c = connect(&servers[2].url()).await;
        assert_eq!(
            key_state(&mut c, "k").await,
            (None, -2),
            "won {won}: the slow node kept our key"
        );
        if !won {
            for server in &servers[..2] {
                let mut c = connect(&server.url()).await;
                assert_eq!(
                    key_state(&mut c, "k").await.0.as_deref(),
                    Some("someone-else")
                );
            }
        }
        locker.stop().await.unwrap();
    }
}

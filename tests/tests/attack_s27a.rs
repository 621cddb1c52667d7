//! Attack s27a: the Redlock mutex release written straight into one `EVALSHA` (`release_for`,
//! `evalsha`, `arg_concat`, `eval_on`), the fair first attempt's pipeline (`SET NX` + `EXISTS
//! <key>\xff:queue-expiry`, its give-back boxed), and `is_reservation` reading only stored
//! tokens: the keys and arguments each script gets (read back from the server's `SLOWLOG`),
//! `SCRIPT FLUSH` before every shape of release on one node and on one of three, restarts,
//! error answers (`WRONGTYPE`, `OOM`, a script's error), a cancelled release, pools of one
//! connection, keys with binary, glob and hash-tag characters, and forged reservation tokens.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use lock_core::raw::{KeySet, Lock, LockRequest};
use lock_core::{Key, LockError, LockOptions, Locker, RetryPolicy, Token};
use lock_redlock::{ConnectionKind, Redlock, RedlockConfig};
use lock_tests::server::{RedisServer, redis_or_skip};
use redis::Value;
use redis::aio::MultiplexedConnection;
use tokio::time::{Instant, sleep};

const QUEUE: &[u8] = b"\xff:queue";
const QUEUE_EXPIRY: &[u8] = b"\xff:queue-expiry";
/// A key with glob, hash-tag, escape and non-ASCII characters.
const ODD: &str = "a*[b]?{t}\\x\u{e9}:";

fn ms(value: u64) -> Duration {
    Duration::from_millis(value)
}

fn config(urls: &[String], fair: bool, wake: bool, kind: ConnectionKind) -> RedlockConfig {
    let mut config = RedlockConfig::new(urls.iter().cloned())
        .with_fair(fair)
        .with_wake_on_release(wake)
        .with_connection(kind)
        .with_node_timeout(ms(500));
    config.pool_size = 1;
    config
}

fn locker(urls: &[String], fair: bool, wake: bool, kind: ConnectionKind, ttl: Duration) -> Locker {
    Locker::new(Redlock::new(config(urls, fair, wake, kind)).expect("config"))
        .with_options(
            LockOptions::default()
                .with_ttl(ttl)
                .with_retry(RetryPolicy::none()),
        )
        .expect("options")
}

async fn connect(server: &RedisServer) -> MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn dbsize(c: &mut MultiplexedConnection) -> i64 {
    redis::cmd("DBSIZE").query_async(c).await.unwrap()
}

async fn exists(c: &mut MultiplexedConnection, key: &[u8]) -> bool {
    let n: i64 = redis::cmd("EXISTS").arg(key).query_async(c).await.unwrap();
    n == 1
}

async fn get(c: &mut MultiplexedConnection, key: &[u8]) -> Option<Vec<u8>> {
    redis::cmd("GET").arg(key).query_async(c).await.unwrap()
}

async fn flush_scripts(c: &mut MultiplexedConnection) {
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(c)
        .await
        .unwrap();
}

/// Waits until `key` is gone from the node (at most `within`); whether it is.
async fn gone_within(c: &mut MultiplexedConnection, key: &[u8], within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if !exists(c, key).await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(ms(10)).await;
    }
}

/// redis-server, and valkey-server when it is installed.
fn servers_to_try() -> Vec<std::path::PathBuf> {
    let mut binaries: Vec<std::path::PathBuf> = redis_or_skip("attack_s27a").into_iter().collect();
    binaries.extend(lock_tests::server::valkey_server_binary());
    binaries
}

fn shapes() -> Vec<(bool, bool, ConnectionKind)> {
    let mut shapes = Vec::new();
    for fair in [false, true] {
        for wake in [false, true] {
            for kind in [ConnectionKind::Manager, ConnectionKind::Pool] {
                shapes.push((fair, wake, kind));
            }
        }
    }
    shapes
}

/// One `SLOWLOG` entry: its arguments and the client's address.
struct Logged {
    args: Vec<Vec<u8>>,
    client: Vec<u8>,
}

async fn slowlog(c: &mut MultiplexedConnection) -> Vec<Logged> {
    let entries: Value = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(1000)
        .query_async(c)
        .await
        .unwrap();
    let Value::Array(entries) = entries else {
        panic!("SLOWLOG GET answered {entries:?}")
    };
    let bytes = |value: &Value| match value {
        Value::BulkString(b) => b.clone(),
        Value::SimpleString(s) => s.clone().into_bytes(),
        other => panic!("not a string: {other:?}"),
    };
    let mut logged: Vec<Logged> = entries
        .iter()
        .map(|entry| {
            let Value::Array(fields) = entry else {
                panic!("{entry:?}")
            };
            let Value::Array(args) = &fields[3] else {
                panic!("{entry:?}")
            };
            Logged {
                args: args.iter().map(bytes).collect(),
                client: bytes(&fields[4]),
            }
        })
        .collect();
    // Newest first in SLOWLOG: oldest first here.
    logged.reverse();
    logged
}

async fn slowlog_reset(c: &mut MultiplexedConnection) {
    let _: () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query_async(c)
        .await
        .unwrap();
}

/// The `EVALSHA`s of a release after `SCRIPT FLUSH`, read from the server's `SLOWLOG` (every
/// command logged): two of them (NOSCRIPT, then again after `SCRIPT LOAD`), from the same
/// connection as the load, with exactly the keys count, keys and arguments of each script
/// (`release.lua`, `release_notify.lua`, `release_fair.lua`), keys with odd characters; the
/// key is gone after it. Every shape (fair or not, wake-ups or not, manager or pool of one),
/// single keys and (not fair) several.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_release_shape_sends_its_scripts_keys_and_arguments_in_order() {
    for binary in servers_to_try() {
        let server = RedisServer::start(&binary, &["--slowlog-log-slower-than", "0"]).unwrap();
        let mut c = connect(&server).await;
        let urls = [server.url()];
        for (fair, wake, kind) in shapes() {
            let shape = format!("fair {fair}, wake {wake}, {kind:?}");
            let locker = locker(&urls, fair, wake, kind, ms(10_000));
            let key = format!("{ODD}{fair}{wake}{kind:?}");
            let guard = locker.acquire(&key).await.unwrap();
            let token = guard.token().expose().as_bytes().to_vec();
            flush_scripts(&mut c).await;
            slowlog_reset(&mut c).await;
            guard.release().await.unwrap();
            assert!(!exists(&mut c, key.as_bytes()).await, "{shape}: key left");
            let logged = slowlog(&mut c).await;
            let evals: Vec<&Logged> = logged
                .iter()
                .filter(|entry| entry.args[0].eq_ignore_ascii_case(b"EVALSHA"))
                .collect();
            let loads: Vec<&Logged> = logged
                .iter()
                .filter(|entry| entry.args[0].eq_ignore_ascii_case(b"SCRIPT"))
                .collect();
            assert_eq!(evals.len(), 2, "{shape}: {:?}", dump(&logged));
            assert_eq!(loads.len(), 1, "{shape}: {:?}", dump(&logged));
            assert_eq!(evals[0].args, evals[1].args, "{shape}: the re-send differs");
            assert!(
                evals[0].client == loads[0].client && evals[1].client == loads[0].client,
                "{shape}: not on one connection: {:?}",
                dump(&logged)
            );
            let args = &evals[1].args;
            let k = key.as_bytes().to_vec();
            let mut want: Vec<Vec<u8>> = if fair {
                vec![
                    b"3".to_vec(),
                    k.clone(),
                    [&k[..], QUEUE].concat(),
                    [&k[..], QUEUE_EXPIRY].concat(),
                    token.clone(),
                    Vec::new(),
                    b"lock-turn:".to_vec(),
                ]
            } else {
                vec![b"1".to_vec(), k.clone(), token.clone()]
            };
            if wake {
                want.push(b"lock-released:".to_vec());
            }
            assert_eq!(
                &args[2..],
                &want[..],
                "{shape}: {:?}",
                dump(std::slice::from_ref(evals[1]))
            );
            // The hash is the script's: loaded by this very text.
            assert_eq!(args[1].len(), 40, "{shape}");

            if !fair {
                // Several keys (`acquire_many`), a prefix of one another and hash-tagged.
                let keys: Vec<String> = (0..5)
                    .map(|i| format!("{{m}}{ODD}{i}{wake}{kind:?}"))
                    .collect();
                let guard = locker
                    .acquire_many(&keys.iter().map(String::as_str).collect::<Vec<_>>())
                    .await
                    .unwrap();
                let token = guard.token().expose().as_bytes().to_vec();
                flush_scripts(&mut c).await;
                slowlog_reset(&mut c).await;
                guard.release().await.unwrap();
                for key in &keys {
                    assert!(!exists(&mut c, key.as_bytes()).await, "{shape}: {key} left");
                }
                let logged = slowlog(&mut c).await;
                let eval = logged
                    .iter()
                    .rfind(|entry| entry.args[0].eq_ignore_ascii_case(b"EVALSHA"))
                    .expect("an EVALSHA");
                let mut want: Vec<Vec<u8>> = vec![b"5".to_vec()];
                want.extend(keys.iter().map(|key| key.as_bytes().to_vec()));
                want.push(token);
                if wake {
                    want.push(b"lock-released:".to_vec());
                }
                assert_eq!(&eval.args[2..], &want[..], "{shape}: many");
            }
        }
        assert_eq!(dbsize(&mut c).await, 0, "something left");
    }
}

fn dump(logged: &[Logged]) -> Vec<String> {
    logged
        .iter()
        .map(|entry| {
            entry
                .args
                .iter()
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

async fn now_ms(c: &mut MultiplexedConnection) -> u64 {
    let (s, us): (u64, u64) = redis::cmd("TIME").query_async(c).await.unwrap();
    s * 1000 + us / 1000
}

/// A fair release after `SCRIPT FLUSH` with a line made by hand (odd key, a namespace-free
/// locker): the key is reserved for the head of its own line (the script found KEYS[2],
/// KEYS[3] and the turn channel where it reads them), a bystander line of a key that is a
/// prefix of it is left alone. And a fair first attempt on a free key with a line gives the
/// key back to that line's head (and counts as refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fair_release_and_a_first_attempts_give_back_pass_the_turn_to_their_own_lines_head() {
    let Some(binary) = redis_or_skip("attack_s27a") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let mut c = connect(&server).await;
    let urls = [server.url()];
    for kind in [ConnectionKind::Manager, ConnectionKind::Pool] {
        for wake in [false, true] {
            let key = format!("{ODD}{wake}{kind:?}");
            let prefix = &key[..key.len() - 2];
            let k = key.as_bytes();
            let locker = locker(&urls, true, wake, kind, ms(10_000));
            let guard = locker.acquire(&key).await.unwrap();
            let head = format!("{}7", "a".repeat(32));
            let other = format!("{}9", "b".repeat(32));
            let now = now_ms(&mut c).await;
            for (line_of, member) in [(k, &head), (prefix.as_bytes(), &other)] {
                let _: () = redis::cmd("ZADD")
                    .arg([line_of, QUEUE].concat())
                    .arg(1)
                    .arg(member)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                let _: () = redis::cmd("ZADD")
                    .arg([line_of, QUEUE_EXPIRY].concat())
                    .arg(now + 60_000)
                    .arg(member)
                    .query_async(&mut c)
                    .await
                    .unwrap();
            }
            flush_scripts(&mut c).await;
            guard.release().await.unwrap();
            let owner = get(&mut c, k).await;
            assert_eq!(
                owner.as_deref(),
                Some(format!("lock-turn-reserved:{head}").as_bytes()),
                "{kind:?} wake {wake}: not reserved for its head"
            );
            assert!(
                !exists(&mut c, prefix.as_bytes()).await,
                "{kind:?}: prefix taken"
            );
            // The head gives it up (gone), leaving the line empty: then a first attempt on the
            // free key with the bystander's line... is on another key; this key's line is
            // made again, with the key free: the first attempt gives it back.
            let _: () = redis::cmd("DEL").arg(k).query_async(&mut c).await.unwrap();
            flush_scripts(&mut c).await;
            let taken = locker.try_acquire(&key).await.unwrap();
            assert!(taken.is_none(), "{kind:?} wake {wake}: passed a live line");
            let owner = get(&mut c, k).await;
            assert_eq!(
                owner.as_deref(),
                Some(format!("lock-turn-reserved:{head}").as_bytes()),
                "{kind:?} wake {wake}: given back, but not to the head"
            );
            let _: () = redis::cmd("FLUSHALL").query_async(&mut c).await.unwrap();
        }
    }
}

/// Three fresh servers, their URLs and a raw connection to each.
async fn three_nodes(
    binary: &std::path::Path,
) -> (
    Vec<RedisServer>,
    Vec<String>,
    Vec<redis::aio::MultiplexedConnection>,
) {
    let servers: Vec<RedisServer> = (0..3)
        .map(|_| RedisServer::start(binary, &[]).unwrap())
        .collect();
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let mut conns = Vec::new();
    for server in &servers {
        conns.push(connect(server).await);
    }
    (servers, urls, conns)
}

/// `SCRIPT FLUSH` on one node of three (then on another) before every shape of release, with
/// odd keys and several keys: the release succeeds and no node keeps a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noscript_on_one_node_among_three_still_releases_everywhere() {
    let Some(binary) = redis_or_skip("attack_s27a") else {
        return;
    };
    let (_servers, urls, mut conns) = three_nodes(&binary).await;
    for (round, (fair, wake, kind)) in shapes().into_iter().enumerate() {
        let shape = format!("fair {fair}, wake {wake}, {kind:?}");
        let locker = locker(&urls, fair, wake, kind, ms(10_000));
        let key = format!("{ODD}{round}");
        let keys: Vec<String> = (0..3).map(|i| format!("{{h}}{ODD}{round}:{i}")).collect();
        let one = locker.acquire(&key).await.unwrap();
        let many = locker
            .acquire_many(&keys.iter().map(String::as_str).collect::<Vec<_>>())
            .await
            .unwrap();
        flush_scripts(&mut conns[round % 3]).await;
        one.release()
            .await
            .unwrap_or_else(|e| panic!("{shape}: {e}"));
        flush_scripts(&mut conns[(round + 1) % 3]).await;
        many.release()
            .await
            .unwrap_or_else(|e| panic!("{shape}: {e}"));
        for (n, c) in conns.iter_mut().enumerate() {
            for key in keys.iter().chain([&key]) {
                assert!(
                    gone_within(c, key.as_bytes(), ms(2_000)).await,
                    "{shape}: {key} left on node {n}"
                );
            }
            assert_eq!(dbsize(c).await, 0, "{shape}: node {n}");
        }
    }
}

/// A pool of one connection per node, eight tasks locking and releasing while another
/// client flushes the scripts every few milliseconds (a flush may land between a `SCRIPT
/// LOAD` and the `EVALSHA` re-sent after it: that release may fail, its follow-up must still
/// delete): nothing hangs, and nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_under_a_storm_of_script_flushes_on_a_pool_of_one_leave_nothing() {
    let Some(binary) = redis_or_skip("attack_s27a") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let urls = [server.url()];
    let mut c = connect(&server).await;
    for fair in [false, true] {
        let locker = Arc::new(locker(&urls, fair, true, ConnectionKind::Pool, ms(3_000)));
        let mut flusher_conn = connect(&server).await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flusher = {
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    flush_scripts(&mut flusher_conn).await;
                    sleep(ms(2)).await;
                }
            })
        };
        let mut tasks = Vec::new();
        for task in 0..8 {
            let locker = Arc::clone(&locker);
            tasks.push(tokio::spawn(async move {
                let mut failed = 0;
                for i in 0..15 {
                    let key = format!("{ODD}{task}:{}", i % 3);
                    if let Ok(Some(guard)) = locker.try_acquire(&key).await
                        && guard.release().await.is_err()
                    {
                        failed += 1;
                    }
                }
                failed
            }));
        }
        let mut failed = 0;
        for task in tasks {
            failed += tokio::time::timeout(ms(15_000), task)
                .await
                .expect("a task hung")
                .unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        flusher.await.unwrap();
        let deadline = Instant::now() + ms(2_500);
        while dbsize(&mut c).await != 0 && Instant::now() < deadline {
            sleep(ms(20)).await;
        }
        let left: Vec<Vec<u8>> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(
            left.is_empty(),
            "fair {fair}: left {:?} ({failed} releases failed)",
            left.iter()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect::<Vec<_>>()
        );
    }
}

/// Error answers other than NOSCRIPT are returned, not retried for ever: a line key of
/// another type (`WRONGTYPE` inside the fair release and the first attempt's give-back), and
/// `OOM` under `maxmemory` (a release still deletes: `DEL` is allowed; an acquisition is
/// refused with the error). Nothing of ours is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrongtype_and_oom_answers_are_returned_and_leave_nothing_of_ours() {
    for binary in servers_to_try() {
        let server = RedisServer::start(&binary, &[]).unwrap();
        let urls = [server.url()];
        let mut c = connect(&server).await;
        for kind in [ConnectionKind::Manager, ConnectionKind::Pool] {
            let locker = locker(&urls, true, false, kind, ms(2_000));
            let key = format!("{ODD}{kind:?}");
            let k = key.as_bytes();
            // The line's expiry key is a string: the first attempt's EXISTS finds it, and its
            // give-back's script fails on it (after the DEL of our key).
            let _: () = redis::cmd("SET")
                .arg([k, QUEUE_EXPIRY].concat())
                .arg("x")
                .query_async(&mut c)
                .await
                .unwrap();
            let started = Instant::now();
            let answer = tokio::time::timeout(ms(5_000), locker.try_acquire(&key))
                .await
                .expect("the first attempt hung");
            assert!(
                !matches!(answer, Ok(Some(_))),
                "{kind:?}: taken past a line key"
            );
            assert!(
                started.elapsed() < ms(2_000),
                "{kind:?}: {:?}",
                started.elapsed()
            );
            assert!(
                gone_within(&mut c, k, ms(3_000)).await,
                "{kind:?}: our key was left: {:?}",
                get(&mut c, k).await
            );
            let _: () = redis::cmd("FLUSHALL").query_async(&mut c).await.unwrap();

            // Held, then the line's queue is made a string with a live expiry entry: the fair
            // release's script fails past its DEL; the release answers in time and the key goes.
            let guard = locker.acquire(&key).await.unwrap();
            let now = now_ms(&mut c).await;
            let _: () = redis::cmd("SET")
                .arg([k, QUEUE].concat())
                .arg("x")
                .query_async(&mut c)
                .await
                .unwrap();
            let _: () = redis::cmd("ZADD")
                .arg([k, QUEUE_EXPIRY].concat())
                .arg(now + 60_000)
                .arg("m")
                .query_async(&mut c)
                .await
                .unwrap();
            flush_scripts(&mut c).await;
            let started = Instant::now();
            let released = tokio::time::timeout(ms(5_000), guard.release())
                .await
                .expect("release hung");
            assert!(started.elapsed() < ms(2_000), "{kind:?}: {released:?}");
            assert!(
                !exists(&mut c, k).await,
                "{kind:?}: key left ({released:?})"
            );
            let _: () = redis::cmd("FLUSHALL").query_async(&mut c).await.unwrap();

            // OOM: held, then the node is over its memory limit.
            for fair in [false, true] {
                let locker = self::locker(&urls, fair, true, kind, ms(5_000));
                let guard = locker.acquire(&key).await.unwrap();
                let _: () = redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("maxmemory")
                    .arg(1)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                flush_scripts(&mut c).await;
                guard
                    .release()
                    .await
                    .unwrap_or_else(|e| panic!("{kind:?} fair {fair}: release under OOM: {e}"));
                assert!(!exists(&mut c, k).await, "{kind:?} fair {fair}: key left");
                let started = Instant::now();
                let refused = tokio::time::timeout(ms(5_000), locker.try_acquire(&key))
                    .await
                    .expect("hung under OOM");
                assert!(
                    !matches!(refused, Ok(Some(_))),
                    "{kind:?} fair {fair}: taken under OOM"
                );
                assert!(started.elapsed() < ms(2_000));
                let _: () = redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("maxmemory")
                    .arg(0)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                assert_eq!(dbsize(&mut c).await, 0, "{kind:?} fair {fair}: left");
            }
        }
    }
}

/// A node restarted while the lock is held (its data kept by an append-only file, its
/// scripts and connections lost): the release's first send there fails on the broken
/// connection, its follow-up re-sends, and the key goes. Three nodes (one restarted) and one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_after_a_restart_that_kept_the_data_leaves_nothing() {
    let Some(binary) = redis_or_skip("attack_s27a") else {
        return;
    };
    let persistent = ["--appendonly", "yes", "--appendfsync", "always"];
    let mut servers: Vec<RedisServer> = (0..3)
        .map(|_| RedisServer::start(&binary, &persistent).unwrap())
        .collect();
    for nodes in [3usize, 1] {
        for (fair, wake, kind) in shapes() {
            let shape = format!("{nodes} nodes, fair {fair}, wake {wake}, {kind:?}");
            let urls: Vec<String> = servers[..nodes].iter().map(RedisServer::url).collect();
            let locker = locker(&urls, fair, wake, kind, ms(8_000));
            let key = format!("{ODD}{fair}{wake}{kind:?}");
            let guard = locker.acquire(&key).await.unwrap();
            // The acquisition returns once a quorum answered: the first node's `SET` may still
            // be on its way (seen in CI: "not persisted"). The lock is held there first.
            let mut c = connect(&servers[0]).await;
            let landed_by = Instant::now() + ms(2_000);
            while !exists(&mut c, key.as_bytes()).await && Instant::now() < landed_by {
                tokio::time::sleep(ms(10)).await;
            }
            drop(c);
            servers[0].restart().unwrap();
            let mut c = connect(&servers[0]).await;
            assert!(
                exists(&mut c, key.as_bytes()).await,
                "{shape}: not persisted"
            );
            let answer = tokio::time::timeout(ms(5_000), guard.release())
                .await
                .expect("release hung");
            if nodes == 3 {
                assert!(answer.is_ok(), "{shape}: {answer:?}");
            }
            for server in &servers[..nodes] {
                let mut c = connect(server).await;
                assert!(
                    gone_within(&mut c, key.as_bytes(), ms(3_000)).await,
                    "{shape}: key left on {} ({answer:?})",
                    server.port()
                );
                assert_eq!(dbsize(&mut c).await, 0, "{shape}");
            }
        }
    }
}

/// A release cancelled after its first poll (its `EVALSHA` answered NOSCRIPT, the load under
/// way) and a guard dropped after a flush: each is seen through in the background.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_cancelled_mid_flight_after_a_flush_is_seen_through() {
    let Some(binary) = redis_or_skip("attack_s27a") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let urls = [server.url()];
    let mut c = connect(&server).await;
    for (fair, wake, kind) in shapes() {
        let shape = format!("fair {fair}, wake {wake}, {kind:?}");
        let locker = locker(&urls, fair, wake, kind, ms(10_000));
        for cut_after in [Duration::ZERO, ms(1)] {
            let key = format!("{ODD}{fair}{wake}{kind:?}");
            let guard = locker.acquire(&key).await.unwrap();
            flush_scripts(&mut c).await;
            let _ = tokio::time::timeout(cut_after, guard.release()).await;
            assert!(
                gone_within(&mut c, key.as_bytes(), ms(2_000)).await,
                "{shape}: cut after {cut_after:?}: key left"
            );
            let guard = locker.acquire(&key).await.unwrap();
            flush_scripts(&mut c).await;
            drop(guard);
            assert!(
                gone_within(&mut c, key.as_bytes(), ms(2_000)).await,
                "{shape}: dropped: key left"
            );
        }
        assert_eq!(dbsize(&mut c).await, 0, "{shape}");
    }
}

fn request(key: &str, token: Token, ttl: Duration) -> LockRequest {
    LockRequest::new(KeySet::one(Key::new(key).unwrap()), token, ttl).unwrap()
}

/// Stored tokens in a reservation's form (read back from the store, made with
/// `Token::from_stored` through the raw API) are refused by `try_acquire` and left alone by
/// `abandon`, whatever follows the prefix (nothing, hex, upper case, binary-looking text,
/// 32 lower-case hex digits after it); tokens that only look like one (upper-case prefix, a
/// leading space) are ordinary tokens. Fair and not, manager and pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_reservation_tokens_are_refused_and_never_abandoned() {
    let Some(binary) = redis_or_skip("attack_s27a") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let urls = [server.url()];
    let mut c = connect(&server).await;
    let reservations = [
        "lock-turn-reserved:".to_owned(),
        format!("lock-turn-reserved:{}", "a".repeat(32)),
        format!("lock-turn-reserved:{}1", "a".repeat(32)),
        "lock-turn-reserved:ABCDEF\u{e9}\u{0}*?[".to_owned(),
        format!("lock-turn-reserved:{}", "lock-turn-reserved:".repeat(50)),
    ];
    let ordinary = [
        "LOCK-TURN-RESERVED:abc".to_owned(),
        " lock-turn-reserved:abc".to_owned(),
        "lock-turn-reserved".to_owned(),
        "A".repeat(32),
    ];
    for (fair, _, kind) in shapes().into_iter().filter(|(_, wake, _)| !wake) {
        let raw = Redlock::new(config(&urls, fair, false, kind)).unwrap();
        for (n, value) in reservations.iter().enumerate() {
            let shape = format!("fair {fair}, {kind:?}, reservation {n}");
            let key = format!("{ODD}r{n}");
            let token = Token::from_stored(value.clone()).unwrap();
            let refused = raw
                .try_acquire(&request(&key, token.clone(), ms(5_000)))
                .await;
            assert!(
                matches!(refused, Err(LockError::InvalidInput { .. })),
                "{shape}: {:?}",
                refused.map(|h| h.is_some())
            );
            assert!(!exists(&mut c, key.as_bytes()).await, "{shape}: stored");
            // Such a value on the key (a real reservation): an abandon with it leaves it.
            let _: () = redis::cmd("SET")
                .arg(&key)
                .arg(value)
                .arg("PX")
                .arg(5_000)
                .query_async(&mut c)
                .await
                .unwrap();
            let abandoned = raw.abandon(&request(&key, token, ms(5_000))).await.unwrap();
            assert!(!abandoned, "{shape}: abandoned");
            assert_eq!(
                get(&mut c, key.as_bytes()).await.as_deref(),
                Some(value.as_bytes()),
                "{shape}: the reservation was deleted"
            );
            let _: () = redis::cmd("DEL")
                .arg(&key)
                .query_async(&mut c)
                .await
                .unwrap();
        }
        for (n, value) in ordinary.iter().enumerate() {
            let shape = format!("fair {fair}, {kind:?}, ordinary {n}");
            let key = format!("{ODD}o{n}");
            let token = Token::from_stored(value.clone()).unwrap();
            let mut handle = raw
                .try_acquire(&request(&key, token.clone(), ms(5_000)))
                .await
                .unwrap_or_else(|e| panic!("{shape}: {e}"))
                .unwrap_or_else(|| panic!("{shape}: refused"));
            assert_eq!(
                get(&mut c, key.as_bytes()).await.as_deref(),
                Some(value.as_bytes()),
                "{shape}"
            );
            flush_scripts(&mut c).await;
            handle.release().await.unwrap();
            assert!(!exists(&mut c, key.as_bytes()).await, "{shape}: left");
        }
    }
    assert_eq!(dbsize(&mut c).await, 0);
}

/// Keys at the length limit (1024 bytes, multi-byte characters, with a namespace), 500 keys
/// in one lock, over RESP2 and RESP3: after `SCRIPT FLUSH`, every shape's release deletes
/// every key, and nothing else is left (a fair line's keys included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_keys_many_keys_and_resp3_releases_after_a_flush_leave_nothing() {
    let Some(binary) = redis_or_skip("attack_s27a") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let mut c = connect(&server).await;
    for url in [server.url(), format!("{}?protocol=resp3", server.url())] {
        for (fair, wake, kind) in shapes() {
            let shape = format!("{url} fair {fair}, wake {wake}, {kind:?}");
            let locker = locker(std::slice::from_ref(&url), fair, wake, kind, ms(10_000))
                .with_namespace(Some("{ns}*"))
                .unwrap();
            // 1024 bytes with the namespace's prefix and its separator.
            let long: String = format!("{}{}", "\u{e9}".repeat(505), "*?[{x}]");
            let long = &long[..];
            let guard = match locker.acquire(long).await {
                Ok(guard) => guard,
                // Too long once namespaced: a shorter one.
                Err(LockError::InvalidInput { .. }) => locker.acquire(&long[..1000]).await.unwrap(),
                Err(error) => panic!("{shape}: {error}"),
            };
            flush_scripts(&mut c).await;
            guard
                .release()
                .await
                .unwrap_or_else(|e| panic!("{shape}: {e}"));
            assert_eq!(dbsize(&mut c).await, 0, "{shape}: long key left");

            let keys: Vec<String> = (0..500).map(|i| format!("{ODD}{i}")).collect();
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            let guard = locker.acquire_many(&keys).await.unwrap();
            assert_eq!(dbsize(&mut c).await, 500, "{shape}");
            flush_scripts(&mut c).await;
            guard
                .release()
                .await
                .unwrap_or_else(|e| panic!("{shape}: {e}"));
            assert_eq!(dbsize(&mut c).await, 0, "{shape}: keys left");
        }
    }
}

/// Three nodes, a live line on each (made by hand) and the key free: a fair first attempt
/// (one node's scripts flushed, so its give-back reloads) is refused, and every node reserves
/// the key for the head of its line; the keys of a line on a prefix key are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fair_first_attempt_on_three_nodes_never_passes_a_live_line() {
    let Some(binary) = redis_or_skip("attack_s27a") else {
        return;
    };
    let (_servers, urls, mut conns) = three_nodes(&binary).await;
    let head = format!("{}5", "c".repeat(32));
    for (round, (_, wake, kind)) in shapes().into_iter().filter(|s| s.0).enumerate() {
        let shape = format!("wake {wake}, {kind:?}");
        let key = format!("{ODD}{round}");
        let k = key.as_bytes();
        for c in &mut conns {
            let now = now_ms(c).await;
            let _: () = redis::cmd("ZADD")
                .arg([k, QUEUE].concat())
                .arg(1)
                .arg(&head)
                .query_async(c)
                .await
                .unwrap();
            let _: () = redis::cmd("ZADD")
                .arg([k, QUEUE_EXPIRY].concat())
                .arg(now + 60_000)
                .arg(&head)
                .query_async(c)
                .await
                .unwrap();
        }
        flush_scripts(&mut conns[round % 3]).await;
        let locker = locker(&urls, true, wake, kind, ms(10_000));
        let taken = locker.try_acquire(&key).await.unwrap();
        assert!(taken.is_none(), "{shape}: passed a live line");
        for (n, c) in conns.iter_mut().enumerate() {
            assert_eq!(
                get(c, k).await.as_deref(),
                Some(format!("lock-turn-reserved:{head}").as_bytes()),
                "{shape}: node {n} not reserved for the head"
            );
            let _: () = redis::cmd("FLUSHALL").query_async(c).await.unwrap();
        }
    }
}

//! Attack on 3e2b3c8 (a Redlock node's connection is one multiplexed connection kept by the
//! crate, `lock-redlock/src/node.rs`, `Managed`, instead of redis-rs's `ConnectionManager`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_redlock::{ConnectionKind, FENCE_SUFFIX, Redlock, RedlockConfig};
use lock_tests::server::{RedisServer, client_list, is_pubsub, redis_or_skip};
use rand::Rng;
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(10);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn locker_at(urls: &[String], kind: ConnectionKind, node_timeout: Duration) -> Locker {
    let config = RedlockConfig::new(urls.to_vec())
        .with_connection(kind)
        .with_node_timeout(node_timeout);
    Locker::new(Redlock::new(config).expect("a valid config"))
        .with_options(
            LockOptions::default()
                .with_ttl(TTL)
                .with_retry(RetryPolicy::none()),
        )
        .expect("valid options")
}

/// Kills every normal connection but the asking one; how many.
fn kill_all(server: &RedisServer) -> u64 {
    let mut asking = redis::Client::open(server.url())
        .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(2)))
        .expect("a connection for CLIENT KILL");
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query(&mut asking)
        .expect("CLIENT KILL")
}

async fn normal_connections(server: &RedisServer) -> usize {
    client_list(server.port())
        .await
        .iter()
        .filter(|line| !is_pubsub(line))
        .count()
}

/// One try on `key`, released when won: Ok(true) won, Ok(false) held, Err failed.
async fn one_try(locker: &Locker, key: &str) -> Result<bool, String> {
    match locker.try_acquire(key).await {
        Ok(Some(guard)) => {
            guard.release().await.map_err(|e| e.to_string())?;
            Ok(true)
        }
        Ok(None) => Ok(false),
        Err(error) => Err(error.to_string()),
    }
}

/// Keys on `server` that are not fencing counters.
fn lock_keys(server: &RedisServer) -> Vec<String> {
    let mut connection = redis::Client::open(server.url())
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap();
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query(&mut connection).unwrap();
    keys.into_iter()
        .filter(|key| !key.ends_with(FENCE_SUFFIX))
        .map(|key| String::from_utf8_lossy(&key).into_owned())
        .collect()
}

/// Runs `command` (split on spaces) on `server` on a connection of its own.
fn run(server: &RedisServer, command: &str) -> redis::Value {
    let mut connection = redis::Client::open(server.url())
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap();
    let mut words = command.split(' ');
    let mut cmd = redis::cmd(words.next().unwrap());
    for word in words {
        cmd.arg(word);
    }
    cmd.query(&mut connection).unwrap()
}

/// The ids of the normal (non pub/sub) connections open on `server`.
async fn connection_ids(server: &RedisServer) -> Vec<String> {
    client_list(server.port())
        .await
        .iter()
        .filter(|line| !is_pubsub(line))
        .filter_map(|line| {
            line.split(' ')
                .find_map(|field| field.strip_prefix("id="))
                .map(str::to_owned)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// A connection the server closed while nobody used it (an idle `timeout`, `CLIENT KILL`, a
// restart between two bursts of work).

/// Over RESP3 redis-rs reports the close of a connection to whoever listens for its pushes:
/// `ConnectionManager` (3e2b3c8^) did, and opened another at once, so that the next request
/// found a sound connection. `Managed` does not listen: the next try, 300 ms after the close,
/// met the dead connection and failed ("broken pipe"): a single-node lock's try lost for
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_a_connection_closed_while_idle_does_not_fail_the_next_try() {
    let Some(binary) = redis_or_skip("resp3 idle close") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("redis-server");
    let url = format!("{}?protocol=resp3", server.url());
    let locker = locker_at(&[url], ConnectionKind::Manager, ms(500));
    for round in 0..3 {
        assert_eq!(one_try(&locker, "idle").await, Ok(true), "round {round}");
        assert_eq!(kill_all(&server), 1, "round {round}: our one connection");
        tokio::time::sleep(ms(300)).await;
        assert_eq!(
            one_try(&locker, "idle").await,
            Ok(true),
            "round {round}: the try after the connection was closed while idle"
        );
    }
    assert_eq!(normal_connections(&server).await, 1);
}

/// The same over RESP2 (the default), where redis-rs reports the close to nobody: a connection
/// killed while idle, and one closed by the server's idle `timeout` between two tries 2.5 s
/// apart. Broken on 3e2b3c8 and on its parent alike: the next try met the dead connection and
/// failed (a server with an idle timeout failed every try after a pause longer than it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp2_a_connection_closed_while_idle_does_not_fail_the_next_try() {
    let Some(binary) = redis_or_skip("resp2 idle close") else {
        return;
    };
    let server = RedisServer::start(&binary, &["--timeout", "1"]).expect("redis-server");
    let locker = locker_at(&[server.url()], ConnectionKind::Manager, ms(500));
    for round in 0..3 {
        assert_eq!(one_try(&locker, "idle").await, Ok(true), "round {round}");
        assert_eq!(kill_all(&server), 1, "round {round}: our one connection");
        tokio::time::sleep(ms(300)).await;
        assert_eq!(
            one_try(&locker, "idle").await,
            Ok(true),
            "round {round}: the try after the connection was killed while idle"
        );
    }
    // The server closes a connection idle for more than a second (checked in its cron).
    let closed = Instant::now() + Duration::from_secs(5);
    while normal_connections(&server).await > 0 {
        assert!(
            Instant::now() < closed,
            "the server never closed the idle connection"
        );
        tokio::time::sleep(ms(100)).await;
    }
    tokio::time::sleep(ms(100)).await;
    let before = server.accepted();
    assert_eq!(
        one_try(&locker, "idle").await,
        Ok(true),
        "the try after the server's idle timeout closed the connection"
    );
    // One connection opened for it (less the one that asked).
    assert_eq!(server.accepted() - before - 1, 1);
}

// ---------------------------------------------------------------------------------------------
// Errors of the server's on a sound connection.

/// A server's error answer (a script's `WRONGTYPE`, `NOSCRIPT` after `SCRIPT FLUSH`, `OOM`)
/// comes on a sound connection: none of them may cost it (the connection keeps its id, none is
/// opened).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_error_answers_keep_the_connection() {
    let Some(binary) = redis_or_skip("server errors") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("redis-server");
    let locker = locker_at(&[server.url()], ConnectionKind::Manager, ms(500));
    assert_eq!(one_try(&locker, "warm").await, Ok(true));
    let ids = connection_ids(&server).await;
    assert_eq!(ids.len(), 1);
    for round in 0..5 {
        // WRONGTYPE inside the release script: the key became a hash under the holder.
        let guard = locker.try_acquire("typed").await.unwrap().unwrap();
        run(&server, "DEL typed");
        run(&server, "HSET typed f v");
        let released = guard.release().await;
        assert!(released.is_err(), "round {round}: {released:?}");
        run(&server, "DEL typed");
        // NOSCRIPT: the scripts flushed under a holder, loaded again.
        let guard = locker.try_acquire("flushed").await.unwrap().unwrap();
        run(&server, "SCRIPT FLUSH");
        guard.release().await.expect("released after SCRIPT FLUSH");
        // OOM: a write refused.
        run(&server, "CONFIG SET maxmemory 1");
        let refused = locker.try_acquire("oom").await;
        assert!(refused.is_err(), "round {round}: {refused:?}");
        run(&server, "CONFIG SET maxmemory 0");
        assert_eq!(one_try(&locker, "oom").await, Ok(true), "round {round}");
    }
    assert_eq!(
        connection_ids(&server).await,
        ids,
        "the connection was let go"
    );
}

// ---------------------------------------------------------------------------------------------
// A server paused (SIGSTOP) under traffic, then resumed.

/// Tries while the server is frozen fail within their node timeout; once it is thawed the
/// same connection serves at once (it never broke), and what the frozen tries set is undone
/// behind them on that connection: no key of ours is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_keeps_its_connection_and_no_key_is_left() {
    let Some(binary) = redis_or_skip("paused server") else {
        return;
    };
    let servers: Vec<RedisServer> = (0..3)
        .map(|_| RedisServer::start(&binary, &[]).expect("redis-server"))
        .collect();
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let locker = locker_at(&urls, ConnectionKind::Manager, ms(100));
    assert_eq!(one_try(&locker, "warm").await, Ok(true));
    let ids: Vec<Vec<String>> = ids_of(&servers).await;
    servers[0].pause().unwrap();
    servers[1].pause().unwrap();
    let started = Instant::now();
    let mut tries = Vec::new();
    for n in 0..16 {
        let locker = locker.clone();
        tries.push(tokio::spawn(async move {
            let began = Instant::now();
            let outcome = one_try(&locker, &format!("frozen-{n}")).await;
            (outcome, began.elapsed())
        }));
    }
    for task in tries {
        let (outcome, took) = task.await.unwrap();
        assert!(outcome.is_err(), "{outcome:?}");
        assert!(
            took < ms(1_500),
            "a try took {took:?} while two nodes were frozen"
        );
    }
    tokio::time::sleep(ms(800).saturating_sub(started.elapsed())).await;
    servers[0].resume().unwrap();
    servers[1].resume().unwrap();
    assert_eq!(one_try(&locker, "thawed").await, Ok(true));
    let mut left: Vec<Vec<String>> = servers.iter().map(lock_keys).collect();
    let until = Instant::now() + Duration::from_secs(3);
    while left.iter().any(|keys| !keys.is_empty()) && Instant::now() < until {
        tokio::time::sleep(ms(100)).await;
        left = servers.iter().map(lock_keys).collect();
    }
    assert!(left.iter().all(Vec::is_empty), "left: {left:?}");
    assert_eq!(ids_of(&servers).await, ids, "a connection was replaced");
}

async fn ids_of(servers: &[RedisServer]) -> Vec<Vec<String>> {
    let mut ids = Vec::new();
    for server in servers {
        ids.push(connection_ids(server).await);
    }
    ids
}

// ---------------------------------------------------------------------------------------------
// A node that accepts connections and never answers on them, then is reached again.

/// A listener in front of `target`: while `dark`, the connections it accepts are held open and
/// never carry a byte, for good; once light, the connections it accepts from then on pass.
struct Dark {
    port: u16,
    dark: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Dark {
    async fn start(target: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let dark = Arc::new(AtomicBool::new(true));
        let accepted = Arc::new(AtomicU64::new(0));
        let (is_dark, count) = (Arc::clone(&dark), Arc::clone(&accepted));
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut client, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                if is_dark.load(Ordering::SeqCst) {
                    held.push(client);
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Self {
            port,
            dark,
            accepted,
            task,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for Dark {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// While the node is dark every try ends within its node timeout, and the attempts to connect
/// are not one per try (they wait for the attempt under way); once it is light the node is
/// reached again within the connect timeout (500 ms) of the last attempt, however the tries
/// were cut short while it was dark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_dark_at_connect_time_is_reached_within_the_connect_timeout_once_light() {
    let Some(binary) = redis_or_skip("dark node") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("redis-server");
    let dark = Dark::start(server.port()).await;
    let locker = locker_at(&[dark.url()], ConnectionKind::Manager, ms(50));
    let mut rng = rand::rng();
    let dark_until = Instant::now() + ms(1_200);
    let mut tries = 0;
    while Instant::now() < dark_until {
        tries += 1;
        let began = Instant::now();
        // Some cut shorter still by the caller.
        let cut = ms(rng.random_range(1..80));
        let outcome = tokio::time::timeout(cut, one_try(&locker, "dark")).await;
        assert!(
            !matches!(outcome, Ok(Ok(_))),
            "won on a dark node: {outcome:?}"
        );
        assert!(
            began.elapsed() < ms(200),
            "a try took {:?}",
            began.elapsed()
        );
        tokio::time::sleep(ms(rng.random_range(0..30))).await;
    }
    let attempts = dark.accepted.load(Ordering::SeqCst);
    // One attempt per 500 ms of connect timeout, give or take one.
    assert!(
        attempts <= 4,
        "{attempts} connection attempts for {tries} tries on a dark node"
    );
    dark.dark.store(false, Ordering::SeqCst);
    let light = Instant::now();
    loop {
        match one_try(&locker, "dark").await {
            Ok(true) => break,
            Ok(false) => panic!("nobody holds the key"),
            Err(_) => {
                assert!(
                    light.elapsed() < ms(800),
                    "still unreachable {:?} after the node came back",
                    light.elapsed()
                );
                tokio::time::sleep(ms(20)).await;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Many tasks on a multi-thread runtime while every connection is killed again and again.

/// 8 tasks take two fenced keys (3 nodes) in turn while a killer closes every connection of
/// the nodes every 40 ms (as fast as it goes): never two holders at once, fencing values strictly increase, nothing
/// of ours is left once all are released, each node ends with one connection, and the
/// connections opened stay about one per kill (not one per request).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hammering_while_connections_are_killed_keeps_exclusion_and_opens_one_per_kill() {
    let Some(binary) = redis_or_skip("hammer") else {
        return;
    };
    let servers: Vec<Arc<RedisServer>> = (0..3)
        .map(|_| Arc::new(RedisServer::start(&binary, &[]).expect("redis-server")))
        .collect();
    let urls: Vec<String> = servers.iter().map(|server| server.url()).collect();
    let config = RedlockConfig::new(urls)
        .with_fencing(true)
        .with_node_timeout(ms(200));
    let locker = Locker::new(Redlock::new(config).unwrap())
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(20))
                .with_retry(
                    RetryPolicy::forever()
                        .with_retry_delay(ms(2))
                        .with_retry_jitter(ms(3)),
                ),
        )
        .unwrap();
    assert_eq!(one_try(&locker, "a").await, Ok(true));
    let before: Vec<u64> = servers.iter().map(|server| server.accepted()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    // Per node: connections killed, and the killer's own (one per kill).
    let kills: Arc<[[AtomicU64; 2]; 3]> = Arc::new(Default::default());
    let killer = {
        let (servers, stop, kills) = (servers.clone(), Arc::clone(&stop), Arc::clone(&kills));
        tokio::task::spawn_blocking(move || {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(ms(40));
                for (server, [killed, asked]) in servers.iter().zip(kills.iter()) {
                    killed.fetch_add(kill_all(server), Ordering::SeqCst);
                    asked.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };
    let busy: Arc<[AtomicBool; 2]> = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
    let fences: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let (overlaps, stale, won) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut workers = Vec::new();
    for n in 0..8 {
        let (locker, stop, busy, fences, overlaps, stale, won) = (
            locker.clone(),
            Arc::clone(&stop),
            Arc::clone(&busy),
            Arc::clone(&fences),
            Arc::clone(&overlaps),
            Arc::clone(&stale),
            Arc::clone(&won),
        );
        workers.push(tokio::spawn(async move {
            let mut round = 0usize;
            while !stop.load(Ordering::SeqCst) {
                round += 1;
                let which = (n + round) % 2;
                let key = ["a", "b"][which];
                let Ok(Ok(guard)) = tokio::time::timeout(ms(500), locker.acquire(key)).await else {
                    continue;
                };
                if busy[which].swap(true, Ordering::SeqCst) {
                    overlaps.fetch_add(1, Ordering::SeqCst);
                }
                let fence = guard.fencing_token().expect("fenced");
                if fences[which].fetch_max(fence, Ordering::SeqCst) >= fence {
                    stale.fetch_add(1, Ordering::SeqCst);
                }
                tokio::time::sleep(ms(1)).await;
                busy[which].store(false, Ordering::SeqCst);
                won.fetch_add(1, Ordering::SeqCst);
                if let Err(error) = guard.release().await {
                    println!("release failed: {error}");
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.unwrap();
    }
    killer.await.unwrap();
    let won = won.load(Ordering::SeqCst);
    let killed: Vec<u64> = kills
        .iter()
        .map(|[killed, _]| killed.load(Ordering::SeqCst))
        .collect();
    println!("won {won}, killed {killed:?} connections");
    assert!(won > 20, "only {won} wins");
    assert_eq!(overlaps.load(Ordering::SeqCst), 0, "two holders at once");
    assert_eq!(
        stale.load(Ordering::SeqCst),
        0,
        "a fencing value not above the last"
    );
    let after: Vec<u64> = servers.iter().map(|server| server.accepted()).collect();
    for (node, (before, after)) in before.iter().zip(&after).enumerate() {
        // Ours: less the killer's connections and the one that asked now. One per connection
        // of ours killed (a reconnection per request would cost hundreds).
        let [killed, asked] = &kills[node];
        let (killed, asked) = (killed.load(Ordering::SeqCst), asked.load(Ordering::SeqCst));
        let opened = after - before - asked - 1;
        assert!(
            opened <= killed + 3,
            "node {node}: {opened} connections opened, {killed} killed"
        );
    }
    for key in ["a", "b"] {
        wins_again(&locker, key).await;
    }
    for server in &servers {
        assert_eq!(normal_connections(server).await, 1);
    }
}

/// A single try on `key` wins within five (the first may meet a connection killed a moment
/// ago, or a key whose failed release is still being sent again).
async fn wins_again(locker: &Locker, key: &str) {
    let mut outcomes = Vec::new();
    for _ in 0..5 {
        let outcome = one_try(locker, key).await;
        if outcome == Ok(true) {
            return;
        }
        outcomes.push(outcome);
        tokio::time::sleep(ms(200)).await;
    }
    panic!("{key} never won again: {outcomes:?}");
}

// ---------------------------------------------------------------------------------------------
// Cancellation at any point, while connections are killed (openings under way all along).

/// Six tasks take fenced keys on three nodes, each attempt cut short by a timeout of 0–4 ms
/// (an attempt dropped while its node's connection opens, while it is sent, while it is
/// answered), half of the guards dropped without a release, while a killer closes every
/// connection every 30 ms. Afterwards: no key of ours is left (the ttl is 20 s: only the
/// clean-ups can have removed them), a fresh try wins on every key, one connection per node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attempts_cut_short_during_openings_leave_nothing_and_the_locker_works() {
    let Some(binary) = redis_or_skip("cancel during openings") else {
        return;
    };
    let servers: Vec<Arc<RedisServer>> = (0..3)
        .map(|_| Arc::new(RedisServer::start(&binary, &[]).expect("redis-server")))
        .collect();
    let urls: Vec<String> = servers.iter().map(|server| server.url()).collect();
    let config = RedlockConfig::new(urls)
        .with_fencing(true)
        .with_node_timeout(ms(300));
    let locker = Locker::new(Redlock::new(config).unwrap())
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(20))
                .with_retry(
                    RetryPolicy::forever()
                        .with_retry_delay(ms(1))
                        .with_retry_jitter(ms(2)),
                ),
        )
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let killer = {
        let (servers, stop) = (servers.clone(), Arc::clone(&stop));
        tokio::task::spawn_blocking(move || {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(ms(30));
                for server in &servers {
                    kill_all(server);
                }
            }
        })
    };
    let (cut, won) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for n in 0..6u64 {
        let (locker, stop, cut, won) = (
            locker.clone(),
            Arc::clone(&stop),
            Arc::clone(&cut),
            Arc::clone(&won),
        );
        workers.push(tokio::spawn(async move {
            let mut round = n;
            while !stop.load(Ordering::SeqCst) {
                round += 1;
                let (limit, release) = {
                    let mut rng = rand::rng();
                    (
                        Duration::from_micros(rng.random_range(0..=4_000)),
                        rng.random_bool(0.5),
                    )
                };
                let key = ["c0", "c1", "c2"][usize::try_from(round % 3).unwrap()];
                match tokio::time::timeout(limit, locker.acquire(key)).await {
                    Err(_) => {
                        cut.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Ok(guard)) => {
                        won.fetch_add(1, Ordering::SeqCst);
                        if release {
                            let _ = guard.release().await;
                        } else {
                            drop(guard);
                        }
                    }
                    Ok(Err(_)) => {}
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.unwrap();
    }
    killer.await.unwrap();
    println!(
        "cut short {}, won {}",
        cut.load(Ordering::SeqCst),
        won.load(Ordering::SeqCst)
    );
    assert!(cut.load(Ordering::SeqCst) > 100 && won.load(Ordering::SeqCst) > 20);
    let mut left: Vec<Vec<String>> = servers.iter().map(|server| lock_keys(server)).collect();
    let until = Instant::now() + Duration::from_secs(5);
    while left.iter().any(|keys| !keys.is_empty()) && Instant::now() < until {
        tokio::time::sleep(ms(100)).await;
        left = servers.iter().map(|server| lock_keys(server)).collect();
    }
    assert!(left.iter().all(Vec::is_empty), "left: {left:?}");
    for key in ["c0", "c1", "c2"] {
        wins_again(&locker, key).await;
    }
    for server in &servers {
        assert_eq!(normal_connections(server).await, 1);
    }
}

// ---------------------------------------------------------------------------------------------
// A watchdog's extends while the connections are killed between them.

/// A kept-alive guard (ttl 900 ms: an extend every 300 ms) on three nodes, every connection
/// of every node killed every 450 ms for 3 s (extend rounds in turn meet freshly killed
/// connections), with either connection kind: the lock is never reported lost, and nothing is
/// left once it is released.
async fn watchdog_through_kills(kind: ConnectionKind) {
    let Some(binary) = redis_or_skip("watchdog through kills") else {
        return;
    };
    let servers: Vec<RedisServer> = (0..3)
        .map(|_| RedisServer::start(&binary, &[]).expect("redis-server"))
        .collect();
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let config = RedlockConfig::new(urls)
        .with_connection(kind)
        .with_node_timeout(ms(100));
    let locker = Locker::new(Redlock::new(config).unwrap())
        .with_options(LockOptions::default().with_ttl(ms(900)))
        .unwrap();
    let mut guard = locker.acquire("watched").await.unwrap();
    let lost = guard.keep_alive().unwrap();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        tokio::time::sleep(ms(450)).await;
        for server in &servers {
            kill_all(server);
        }
        assert!(
            !lost.is_lost(),
            "{kind:?}: lost after its connections were killed"
        );
    }
    assert!(guard.is_valid());
    // A release right after a kill may fail on a node (and be sent again in the background):
    // nothing may be left once the clean-up is through.
    let _ = guard.release().await;
    let mut left: Vec<Vec<String>> = servers.iter().map(lock_keys).collect();
    let until = Instant::now() + Duration::from_secs(3);
    while left.iter().any(|keys| !keys.is_empty()) && Instant::now() < until {
        tokio::time::sleep(ms(100)).await;
        left = servers.iter().map(lock_keys).collect();
    }
    assert!(left.iter().all(Vec::is_empty), "left: {left:?}");
    assert!(!lost.is_lost());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_watchdog_keeps_the_lock_through_kills() {
    watchdog_through_kills(ConnectionKind::Manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_watchdog_keeps_the_lock_through_kills() {
    watchdog_through_kills(ConnectionKind::Pool).await;
}

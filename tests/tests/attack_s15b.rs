//! Session 15b attacks on Redlock's `closed` flag (`FairLine::close`, `Wakeups::close`): an
//! attempt still under way when its client stops subscribes nowhere after the shutdown. Here,
//! on real servers (one node and three, the last behind a proxy that delays what it carries so
//! that subscriptions are slow when the stop lands), a client stops while many of its waiters
//! retry forever, and is kept alive (not dropped): every waiter ends, no pub/sub connection and
//! no channel is left on any server within 1.5 s, and nothing is left in the store once the
//! holder released. And a client never stopped still hears its turns and wake-ups after its
//! pub/sub connections are killed: the flag must not keep it from subscribing again.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::{LockError, LockGuard, LockOptions, Locker, RetryPolicy};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::nodes::Nodes;
use lock_tests::server::RedisServer;
use tokio::time::Instant;

/// How the waiting client is set up.
#[derive(Clone, Copy, Debug)]
struct Mode {
    /// Fair waiting (turns on `lock-turn:<instance>`).
    fair: bool,
    /// Wake-ups on release (`lock-released:<key>`).
    wake: bool,
}

const MODES: [Mode; 3] = [
    Mode {
        fair: true,
        wake: false,
    },
    Mode {
        fair: false,
        wake: true,
    },
    Mode {
        fair: true,
        wake: true,
    },
];

fn client(urls: &[String], mode: Mode, ttl: Duration, retry: RetryPolicy) -> Locker {
    let lock = Redlock::new(
        RedlockConfig::new(urls.iter().cloned())
            .with_fair(mode.fair)
            .with_wake_on_release(mode.wake)
            .with_node_timeout(Duration::from_millis(500)),
    )
    .expect("redlock");
    Locker::new(lock)
        .with_options(LockOptions::default().with_ttl(ttl).with_retry(retry))
        .expect("options")
}

/// Retry forever every `ms`, no jitter.
fn fixed(ms: u64) -> RetryPolicy {
    RetryPolicy::forever()
        .with_retry_delay(Duration::from_millis(ms))
        .with_retry_jitter(Duration::ZERO)
        .with_backoff_factor(1.0)
}

fn query(server: &RedisServer, args: &[&str]) -> redis::Value {
    let mut connection = redis::Client::open(server.url())
        .unwrap()
        .get_connection_with_timeout(Duration::from_millis(500))
        .unwrap();
    let mut command = redis::cmd(args[0]);
    for arg in &args[1..] {
        command.arg(*arg);
    }
    command.query(&mut connection).unwrap()
}

/// Per server: the pub/sub connections (`CLIENT LIST TYPE pubsub`) and the channels with a
/// subscriber (`PUBSUB CHANNELS`).
fn pubsub_state(servers: &[&RedisServer]) -> Vec<(usize, Vec<String>)> {
    servers
        .iter()
        .map(|server| {
            let list: String =
                redis::from_redis_value(query(server, &["CLIENT", "LIST", "TYPE", "pubsub"]))
                    .unwrap();
            let connections = list.lines().filter(|line| !line.trim().is_empty()).count();
            let channels: Vec<String> =
                redis::from_redis_value(query(server, &["PUBSUB", "CHANNELS"])).unwrap();
            (connections, channels)
        })
        .collect()
}

fn all_clear(state: &[(usize, Vec<String>)]) -> bool {
    state
        .iter()
        .all(|(n, channels)| *n == 0 && channels.is_empty())
}

/// Waits up to `within` for no pub/sub connection and no channel on `servers`.
async fn pubsub_left(servers: &[&RedisServer], within: Duration) -> Vec<(usize, Vec<String>)> {
    let until = Instant::now() + within;
    loop {
        let state = pubsub_state(servers);
        if all_clear(&state) || Instant::now() >= until {
            return state;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn keys(servers: &[&RedisServer]) -> Vec<Vec<String>> {
    servers
        .iter()
        .map(|server| {
            let names: Vec<Vec<u8>> =
                redis::from_redis_value(query(server, &["KEYS", "*"])).unwrap();
            names
                .iter()
                .map(|name| String::from_utf8_lossy(name).into_owned())
                .collect()
        })
        .collect()
}

/// Waits up to `within` for every server of `servers` to hold no key.
async fn keys_left(servers: &[&RedisServer], within: Duration) -> Vec<Vec<String>> {
    let until = Instant::now() + within;
    loop {
        let left = keys(servers);
        if left.iter().all(Vec::is_empty) || Instant::now() >= until {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn kill_pubsub(servers: &[&RedisServer]) {
    for server in servers {
        let _ = server.command("CLIENT KILL TYPE pubsub", Duration::from_millis(500));
    }
}

/// The nodes of a run: one (the server behind the proxy) or all three.
fn pick(nodes: &Nodes, three: bool) -> (Vec<String>, Vec<&RedisServer>) {
    if three {
        (nodes.urls().to_vec(), nodes.servers.iter().collect())
    } else {
        (vec![nodes.proxy.url()], vec![&nodes.servers[2]])
    }
}

/// One run: a holder takes `KEYS` keys; a client of `mode` sends `waiters` waiters after them
/// (retrying every 10 ms, forever); `warm` later the proxy starts delaying every chunk by
/// `delay`, the pub/sub connections are killed when `kill`, and `stop_after` later the client
/// stops (kept alive). Checks that every waiter ends within 5 s of the stop, that no pub/sub
/// connection nor channel is left within 1.5 s, and, the holder having released, that no key
/// is left once the waiters' ttl passed. Returns a description of what went wrong, if anything.
#[allow(clippy::too_many_arguments)]
async fn stop_racing_waiters(
    nodes: &Nodes,
    three: bool,
    mode: Mode,
    waiters: usize,
    warm: Duration,
    delay: Duration,
    kill: bool,
    stop_after: Duration,
) -> Option<String> {
    const KEYS: usize = 3;
    let (urls, servers) = pick(nodes, three);
    nodes.proxy.set_delay(Duration::ZERO);
    let holder = client(&urls, mode, Duration::from_secs(10), RetryPolicy::none());
    let mut guards: Vec<LockGuard> = Vec::new();
    for k in 0..KEYS {
        guards.push(holder.acquire(&format!("race{k}")).await.unwrap());
    }
    let victim = client(&urls, mode, Duration::from_secs(2), fixed(10));
    let mut tasks = Vec::new();
    for w in 0..waiters {
        let victim = victim.clone();
        let key = format!("race{}", w % KEYS);
        tasks.push(tokio::spawn(
            async move { victim.acquire(&key).await.map(drop) },
        ));
    }
    tokio::time::sleep(warm).await;
    nodes.proxy.set_delay(delay);
    if kill {
        kill_pubsub(&servers);
    }
    tokio::time::sleep(stop_after).await;
    let stopped = tokio::time::timeout(Duration::from_secs(10), victim.stop()).await;
    let mut problems = Vec::new();
    if stopped.is_err() {
        problems.push("stop did not return within 10 s".to_owned());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut ends = Vec::new();
    for task in tasks {
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(Ok(()))) => ends.push("acquired".to_owned()),
            Ok(Ok(Err(LockError::Stopped))) => {}
            Ok(Ok(Err(error))) => ends.push(format!("{error}")),
            Ok(Err(join)) => problems.push(format!("a waiter panicked: {join}")),
            Err(_) => problems.push("a waiter still waits 5 s after the stop".to_owned()),
        }
    }
    if ends.iter().any(|end| end == "acquired") {
        problems.push(format!("a waiter acquired a held key: {ends:?}"));
    }
    nodes.proxy.set_delay(Duration::ZERO);
    let left = pubsub_left(&servers, Duration::from_millis(1500)).await;
    if !all_clear(&left) {
        problems.push(format!(
            "1.5 s after the stop, the client still alive, pub/sub left (connections, channels) \
             per server: {left:?}"
        ));
    }
    for guard in guards {
        let _ = guard.release().await;
    }
    holder.stop().await.unwrap();
    let stored = keys_left(&servers, Duration::from_secs(4)).await;
    if !stored.iter().all(Vec::is_empty) {
        problems.push(format!(
            "4 s after the releases (waiters' ttl 2 s), keys left per server: {stored:?}"
        ));
    }
    drop(victim);
    if problems.is_empty() {
        None
    } else {
        Some(format!(
            "three {three}, {mode:?}, waiters {waiters}, warm {warm:?}, delay {delay:?}, kill \
             {kill}, stop after {stop_after:?}: {problems:?} (other ends: {ends:?})"
        ))
    }
}

/// Runs the grid of `stop_racing_waiters` on one node or three, and fails with every run that
/// went wrong.
async fn stop_racing_waiters_grid(three: bool, kill: bool) {
    let nodes = Nodes::start().await;
    let mut failures = Vec::new();
    for mode in MODES {
        // Warm (subscriptions made, then killed or not) and cold (the first subscriptions
        // still on their way through the slow proxy when the stop lands).
        for (warm, stop_after) in [
            (300u64, 0u64),
            (300, 20),
            (300, 90),
            (300, 200),
            (0, 0),
            (0, 40),
            (0, 120),
        ] {
            if let Some(failure) = stop_racing_waiters(
                &nodes,
                three,
                mode,
                12,
                Duration::from_millis(warm),
                Duration::from_millis(60),
                kill,
                Duration::from_millis(stop_after),
            )
            .await
            {
                failures.push(failure);
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Promised (`Lock::shutdown`, "an attempt still under way subscribes nowhere after it"): a
/// client stopped while a dozen of its waiters retry every 10 ms on one node (behind a proxy
/// adding 60 ms a chunk) leaves no pub/sub connection nor channel, although it is kept alive,
/// every waiter ends, and nothing is left in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_racing_waiters_one_node() {
    stop_racing_waiters_grid(false, false).await;
}

/// As above, on three nodes (the third behind the slow proxy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_racing_waiters_three_nodes() {
    stop_racing_waiters_grid(true, false).await;
}

/// As above, on one node, the pub/sub connections killed just before the stop (so that the
/// turn readers re-subscribe and the wake-up subscriptions are made again while it lands).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_racing_resubscribing_waiters_one_node() {
    stop_racing_waiters_grid(false, true).await;
}

/// As above, on three nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_racing_resubscribing_waiters_three_nodes() {
    stop_racing_waiters_grid(true, true).await;
}

/// A guard of the stopped client held across its stop, while six of its waiters wait for a key
/// another client holds (their subscriptions killed just before, through the slow proxy):
/// releasing the guard afterwards opens no pub/sub connection, every waiter ends, and once
/// the key's ttl passed and the other client released, nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_held_across_stop_leaves_nothing() {
    let nodes = Nodes::start().await;
    for three in [false, true] {
        for mode in MODES {
            let (urls, servers) = pick(&nodes, three);
            nodes.proxy.set_delay(Duration::ZERO);
            let holder = client(&urls, mode, Duration::from_secs(10), RetryPolicy::none());
            let other = holder.acquire("other").await.unwrap();
            let victim = client(&urls, mode, Duration::from_millis(1500), fixed(10));
            let guard = victim.acquire("held").await.unwrap();
            let mut tasks = Vec::new();
            for _ in 0..6 {
                let victim = victim.clone();
                tasks.push(tokio::spawn(async move {
                    victim.acquire("other").await.map(drop)
                }));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            nodes.proxy.set_delay(Duration::from_millis(60));
            kill_pubsub(&servers);
            victim.stop().await.unwrap();
            for task in tasks {
                let end = tokio::time::timeout(Duration::from_secs(5), task)
                    .await
                    .expect("a waiter ended")
                    .unwrap();
                assert!(
                    end.is_err(),
                    "{three} {mode:?}: a waiter acquired a held key"
                );
            }
            let _ = guard.release().await;
            nodes.proxy.set_delay(Duration::ZERO);
            other.release().await.unwrap();
            holder.stop().await.unwrap();
            let left = pubsub_left(&servers, Duration::from_millis(1500)).await;
            assert!(
                all_clear(&left),
                "three {three}, {mode:?}: pub/sub left 1.5 s after stop: {left:?}"
            );
            let stored = keys_left(&servers, Duration::from_secs(4)).await;
            assert!(
                stored.iter().all(Vec::is_empty),
                "three {three}, {mode:?}: keys left: {stored:?}"
            );
            drop(victim);
        }
    }
}

/// Normal life: a client never stopped whose pub/sub connections were killed (between its
/// waits: while it waited for nothing, three times) subscribes again, for its turn and for
/// wake-ups, the `closed` flag notwithstanding: at its next wait its channel is subscribed on
/// every node, and it takes the key within 600 ms of its release although its retry delay
/// (its fallback poll) is 5 s. (A kill *during* a wait may spend the retry loop's two early
/// wakes and leave the waiter deaf for its whole delay, by design: not checked here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_not_stopped_hears_after_its_pubsub_is_killed() {
    let nodes = Nodes::start().await;
    let mut failures = Vec::new();
    for three in [false, true] {
        for mode in MODES {
            let (urls, servers) = pick(&nodes, three);
            nodes.proxy.set_delay(Duration::ZERO);
            let ttl = Duration::from_secs(10);
            let holder = client(&urls, mode, ttl, RetryPolicy::none());
            let waiter = client(&urls, mode, ttl, fixed(5000));
            for round in 0..3 {
                let guard = holder.acquire("heard").await.unwrap();
                let task = {
                    let waiter = waiter.clone();
                    tokio::spawn(async move {
                        let guard = waiter.acquire("heard").await?;
                        let at = Instant::now();
                        guard.release().await?;
                        Ok::<_, LockError>(at)
                    })
                };
                tokio::time::sleep(Duration::from_millis(400)).await;
                let state = pubsub_state(&servers);
                if state
                    .iter()
                    .any(|(n, channels)| *n == 0 || channels.is_empty())
                {
                    failures.push(format!(
                        "three {three}, {mode:?}, round {round}: waiting, not subscribed on \
                         every node: {state:?}"
                    ));
                }
                let released = Instant::now();
                guard.release().await.unwrap();
                match tokio::time::timeout(Duration::from_secs(8), task).await {
                    Ok(Ok(Ok(at))) => {
                        let took = at.saturating_duration_since(released);
                        // Wake-ups without lines over three nodes: each node announces the
                        // release, and a waiter woken by the first node before a quorum let go
                        // may spend its early wakes and sleep out its delay (seen under load:
                        // 5.0 s in round 0, no kill yet; a known limit of the unfair mode,
                        // not of the flag). Only the subscription is checked there.
                        let bound = if three && !mode.fair {
                            Duration::from_millis(5600)
                        } else {
                            Duration::from_millis(600)
                        };
                        if took > bound {
                            failures.push(format!(
                                "three {three}, {mode:?}, round {round}: took the key {took:?} \
                                 after its release (pub/sub while it waited: {state:?})"
                            ));
                        }
                    }
                    other => failures.push(format!(
                        "three {three}, {mode:?}, round {round}: the waiter ended as {other:?}"
                    )),
                }
                // Killed between waits; the readers (turns) subscribe again by themselves, the
                // next wait subscribes (wake-ups).
                kill_pubsub(&servers);
                tokio::time::sleep(Duration::from_millis(1200)).await;
            }
            holder.stop().await.unwrap();
            waiter.stop().await.unwrap();
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Two clients over one backend (`Locker::from_arc` of the same `Arc<dyn Lock>`), as a process
/// that builds its store once: the first stops, which shuts the backend down under the second,
/// whose waiters are not stopped and keep retrying every 5 ms; their attempts that took the
/// nodes before the shutdown listen for their turn only after it (the proxy's 60 ms a chunk
/// keeps them on their way). Nothing may subscribe after the shutdown: both clients are kept
/// alive, and within 1.5 s no pub/sub connection nor channel is left on any server; every
/// waiter ends (`Stopped`: the backend is closed) within 5 s.
async fn a_shared_backend_stopped_under_running_waiters(three: bool) {
    let nodes = Nodes::start().await;
    let mut failures = Vec::new();
    for mode in MODES {
        for stop_after in [0u64, 10, 60, 250] {
            let (urls, servers) = pick(&nodes, three);
            nodes.proxy.set_delay(Duration::ZERO);
            let holder = client(&urls, mode, Duration::from_secs(10), RetryPolicy::none());
            // A key of its own per run: a release reserves the key for the head of its line,
            // which may be a waiter of the backend shut down (its place never taken back).
            let key = format!("shared-{}-{}-{stop_after}", mode.fair, mode.wake);
            let guard = holder.acquire(&key).await.unwrap();
            let backend: std::sync::Arc<dyn lock_core::raw::Lock> = std::sync::Arc::new(
                Redlock::new(
                    RedlockConfig::new(urls.iter().cloned())
                        .with_fair(mode.fair)
                        .with_wake_on_release(mode.wake)
                        .with_node_timeout(Duration::from_millis(500)),
                )
                .unwrap(),
            );
            let options = LockOptions::default()
                .with_ttl(Duration::from_secs(2))
                .with_retry(fixed(5));
            let first = Locker::from_arc(backend.clone())
                .with_options(options.clone())
                .unwrap();
            let second = Locker::from_arc(backend.clone())
                .with_options(options)
                .unwrap();
            let mut tasks = Vec::new();
            for _ in 0..8 {
                let (second, key) = (second.clone(), key.clone());
                tasks.push(tokio::spawn(
                    async move { second.acquire(&key).await.map(drop) },
                ));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            nodes.proxy.set_delay(Duration::from_millis(60));
            kill_pubsub(&servers);
            tokio::time::sleep(Duration::from_millis(stop_after)).await;
            first.stop().await.unwrap();
            let mut ends = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(5);
            for task in tasks {
                match tokio::time::timeout_at(deadline, task).await {
                    Ok(Ok(end)) => ends.push(end.map_err(|e| e.to_string())),
                    Ok(Err(join)) => failures.push(format!("a waiter panicked: {join}")),
                    Err(_) => failures.push(format!(
                        "three {three}, {mode:?}, stop after {stop_after}: a waiter still waits \
                         5 s after the shutdown"
                    )),
                }
            }
            nodes.proxy.set_delay(Duration::ZERO);
            let left = pubsub_left(&servers, Duration::from_millis(1500)).await;
            if !all_clear(&left) {
                failures.push(format!(
                    "three {three}, {mode:?}, stop after {stop_after} ms: 1.5 s after the \
                     shutdown, both clients alive, pub/sub left (connections, channels) per \
                     server: {left:?} (waiters ended: {ends:?})"
                ));
            }
            guard.release().await.unwrap();
            holder.stop().await.unwrap();
            let _ = second.stop().await;
            let stored = keys_left(&servers, Duration::from_secs(4)).await;
            if !stored.iter().all(Vec::is_empty) {
                failures.push(format!(
                    "three {three}, {mode:?}, stop after {stop_after} ms: keys left: {stored:?}"
                ));
            }
            drop((first, second, backend));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_backend_stopped_under_running_waiters_one_node() {
    a_shared_backend_stopped_under_running_waiters(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_backend_stopped_under_running_waiters_three_nodes() {
    a_shared_backend_stopped_under_running_waiters(true).await;
}

/// The window the flag closes, on wake-ups: a backend shared by two clients is shut down (the
/// first client stops) while the second's waiters, one per key on 16 keys, are making their
/// wake-up subscriptions again (their pub/sub connection was just killed, which woke them all)
/// through a proxy that delays each chunk, so that they queue on the node's subscription, and
/// those queued behind the shutdown's `close` would open a new pub/sub connection, which
/// nothing closes while the clients live. Both are kept alive: within 1.5 s no pub/sub
/// connection nor channel may be left.
async fn a_shutdown_behind_queued_wake_subscriptions(three: bool) {
    const KEYS: usize = 16;
    let nodes = Nodes::start().await;
    let mode = Mode {
        fair: false,
        wake: true,
    };
    let mut failures = Vec::new();
    let mut run = 0;
    for delay in [15u64, 30, 45] {
        for stop_after in (0u64..=240).step_by(if three { 15 } else { 30 }) {
            run += 1;
            let (urls, servers) = pick(&nodes, three);
            nodes.proxy.set_delay(Duration::ZERO);
            let holder = client(&urls, mode, Duration::from_secs(10), RetryPolicy::none());
            let mut guards = Vec::new();
            for k in 0..KEYS {
                guards.push(holder.acquire(&format!("q{run}-{k}")).await.unwrap());
            }
            let backend: std::sync::Arc<dyn lock_core::raw::Lock> = std::sync::Arc::new(
                Redlock::new(
                    RedlockConfig::new(urls.iter().cloned())
                        .with_fair(false)
                        .with_wake_on_release(true)
                        .with_node_timeout(Duration::from_millis(500)),
                )
                .unwrap(),
            );
            let options = LockOptions::default()
                .with_ttl(Duration::from_secs(2))
                .with_retry(fixed(60));
            let first = Locker::from_arc(backend.clone())
                .with_options(options.clone())
                .unwrap();
            let second = Locker::from_arc(backend.clone())
                .with_options(options)
                .unwrap();
            let mut tasks = Vec::new();
            for k in 0..KEYS {
                let (second, key) = (second.clone(), format!("q{run}-{k}"));
                tasks.push(tokio::spawn(
                    async move { second.acquire(&key).await.map(drop) },
                ));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            nodes.proxy.set_delay(Duration::from_millis(delay));
            kill_pubsub(&servers);
            tokio::time::sleep(Duration::from_millis(stop_after)).await;
            first.stop().await.unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            for task in tasks {
                if tokio::time::timeout_at(deadline, task).await.is_err() {
                    failures.push(format!(
                        "three {three}, delay {delay}, stop after {stop_after}: a waiter still \
                         waits 5 s after the shutdown"
                    ));
                }
            }
            nodes.proxy.set_delay(Duration::ZERO);
            let left = pubsub_left(&servers, Duration::from_millis(1500)).await;
            if !all_clear(&left) {
                failures.push(format!(
                    "three {three}, delay {delay} ms, stop after {stop_after} ms: 1.5 s after \
                     the shutdown, both clients alive, pub/sub left (connections, channels) \
                     per server: {left:?}"
                ));
            }
            for guard in guards {
                guard.release().await.unwrap();
            }
            holder.stop().await.unwrap();
            drop((first, second, backend));
            // The next run starts clean, whatever this one left.
            kill_pubsub(&servers);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_behind_queued_wake_subscriptions_one_node() {
    a_shutdown_behind_queued_wake_subscriptions(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_behind_queued_wake_subscriptions_three_nodes() {
    a_shutdown_behind_queued_wake_subscriptions(true).await;
}

/// The window the flag closes, on fair turns: a backend shared by two clients is shut down (the
/// first client stops) while the second's fair waiters arrive one every 8 ms, their first
/// turn subscriptions still on their way through a proxy that delays each chunk: an arrival
/// whose attempt took the nodes before the shutdown listens after `close` went past a node's
/// slot, and would open a new pub/sub connection there, which nothing closes while the
/// clients live. Both are kept alive: within 1.5 s no pub/sub connection nor channel may be
/// left.
async fn a_shutdown_during_first_turn_subscriptions(three: bool) {
    const WAITERS: usize = 30;
    let nodes = Nodes::start().await;
    let mode = Mode {
        fair: true,
        wake: false,
    };
    let mut failures = Vec::new();
    let mut run = 0;
    for delay in [15u64, 45] {
        for stop_after in (0u64..=240).step_by(30) {
            run += 1;
            let key = format!("f{run}");
            let (urls, servers) = pick(&nodes, three);
            nodes.proxy.set_delay(Duration::ZERO);
            let holder = client(&urls, mode, Duration::from_secs(10), RetryPolicy::none());
            let guard = holder.acquire(&key).await.unwrap();
            let backend: std::sync::Arc<dyn lock_core::raw::Lock> = std::sync::Arc::new(
                Redlock::new(
                    RedlockConfig::new(urls.iter().cloned())
                        .with_fair(true)
                        .with_wake_on_release(false)
                        .with_node_timeout(Duration::from_millis(500)),
                )
                .unwrap(),
            );
            let options = LockOptions::default()
                .with_ttl(Duration::from_secs(2))
                .with_retry(fixed(10));
            let first = Locker::from_arc(backend.clone())
                .with_options(options.clone())
                .unwrap();
            let second = Locker::from_arc(backend.clone())
                .with_options(options)
                .unwrap();
            nodes.proxy.set_delay(Duration::from_millis(delay));
            let arrivals = {
                let (second, key) = (second.clone(), key.clone());
                tokio::spawn(async move {
                    let mut tasks = Vec::new();
                    for _ in 0..WAITERS {
                        let (second, key) = (second.clone(), key.clone());
                        tasks.push(tokio::spawn(
                            async move { second.acquire(&key).await.map(drop) },
                        ));
                        tokio::time::sleep(Duration::from_millis(8)).await;
                    }
                    tasks
                })
            };
            tokio::time::sleep(Duration::from_millis(stop_after)).await;
            first.stop().await.unwrap();
            let tasks = arrivals.await.unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            for task in tasks {
                if tokio::time::timeout_at(deadline, task).await.is_err() {
                    failures.push(format!(
                        "three {three}, delay {delay}, stop after {stop_after}: a waiter still \
                         waits 5 s after the shutdown"
                    ));
                }
            }
            nodes.proxy.set_delay(Duration::ZERO);
            let left = pubsub_left(&servers, Duration::from_millis(1500)).await;
            if !all_clear(&left) {
                failures.push(format!(
                    "three {three}, delay {delay} ms, stop after {stop_after} ms: 1.5 s after \
                     the shutdown, both clients alive, pub/sub left (connections, channels) \
                     per server: {left:?}"
                ));
            }
            guard.release().await.unwrap();
            holder.stop().await.unwrap();
            drop((first, second, backend));
            kill_pubsub(&servers);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_during_first_turn_subscriptions_one_node() {
    a_shutdown_during_first_turn_subscriptions(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_during_first_turn_subscriptions_three_nodes() {
    a_shutdown_during_first_turn_subscriptions(true).await;
}

/// The same window on inc (one server behind the delaying proxy), whose subscriber
/// (`lock-inc/src/wake.rs`, `Listener`) got no `closed` flag: a backend shared by two clients
/// is shut down while the second's waiters, one per key on 16 keys, make their first wake-up
/// subscription (or turn subscription, fair) through the proxy. Both clients are kept alive:
/// within 1.5 s no pub/sub connection nor channel may be left.
async fn a_shutdown_behind_queued_subscriptions_inc(shared: bool) {
    use lock_inc::{IncConfig, IncLock};
    const KEYS: usize = 16;
    let mut failures = Vec::new();
    let mut run = 0;
    for fair in [false, true] {
        // Servers of its own: what a failed run leaves may outlive its clients.
        let nodes = Nodes::start().await;
        let servers = vec![&nodes.servers[2]];
        let config = |fair: bool| IncConfig {
            command_timeout: 2_000,
            ..IncConfig::new(nodes.proxy.url())
                .with_fair(fair)
                .with_wake_on_release(true)
        };
        'runs: for delay in [15u64, 45] {
            for stop_after in (0u64..=240).step_by(40) {
                run += 1;
                nodes.proxy.set_delay(Duration::ZERO);
                let holder = Locker::new(IncLock::connect(config(fair)).await.unwrap())
                    .with_options(LockOptions::default().with_ttl(Duration::from_secs(10)))
                    .unwrap();
                let mut guards = Vec::new();
                for k in 0..KEYS {
                    guards.push(holder.acquire(&format!("i{run}-{k}")).await.unwrap());
                }
                let backend: std::sync::Arc<dyn lock_core::raw::Lock> =
                    std::sync::Arc::new(IncLock::connect(config(fair)).await.unwrap());
                let options = LockOptions::default()
                    .with_ttl(Duration::from_secs(2))
                    .with_retry(fixed(60));
                let first = Locker::from_arc(backend.clone())
                    .with_options(options.clone())
                    .unwrap();
                let second = Locker::from_arc(backend.clone())
                    .with_options(options)
                    .unwrap();
                nodes.proxy.set_delay(Duration::from_millis(delay));
                let mut tasks = Vec::new();
                for k in 0..KEYS {
                    let (second, key) = (second.clone(), format!("i{run}-{k}"));
                    tasks.push(tokio::spawn(
                        async move { second.acquire(&key).await.map(drop) },
                    ));
                }
                tokio::time::sleep(Duration::from_millis(stop_after)).await;
                // Shared: the other client over the same backend stops; else the waiters' own.
                let _ = if shared { first.stop() } else { second.stop() }.await;
                let deadline = Instant::now() + Duration::from_secs(5);
                for task in tasks {
                    if tokio::time::timeout_at(deadline, task).await.is_err() {
                        failures.push(format!(
                            "fair {fair}, delay {delay}, stop after {stop_after}: a waiter \
                             still waits 5 s after the shutdown"
                        ));
                    }
                }
                nodes.proxy.set_delay(Duration::ZERO);
                let left = pubsub_left(&servers, Duration::from_millis(1500)).await;
                for guard in guards {
                    let _ = guard.release().await;
                }
                let _ = holder.stop().await;
                if !all_clear(&left) {
                    drop((first, second, backend, holder));
                    let dropped = pubsub_left(&servers, Duration::from_millis(1500)).await;
                    failures.push(format!(
                        "shared {shared}, fair {fair}, delay {delay} ms, stop after {stop_after} ms: 1.5 s after \
                         the shutdown, both clients alive, pub/sub left (connections, \
                         channels): {left:?}; 1.5 s after both were dropped too: {dropped:?}"
                    ));
                    // What is left may outlive the clients: the next runs would count it.
                    break 'runs;
                }
                drop((first, second, backend));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_behind_queued_subscriptions_inc_shared_backend() {
    a_shutdown_behind_queued_subscriptions_inc(true).await;
}

/// As above, the waiters' own client stopping (no second client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_behind_queued_subscriptions_inc() {
    a_shutdown_behind_queued_subscriptions_inc(false).await;
}

//! adv23a: hostile tests of d5feb46, Redlock's `shutdown` waiting (for `CLEANUP_WAIT` at most)
//! on `raw::Settling` for a release's answers still coming from the slower nodes and the first
//! round of every follow-up sent at once. The promise: a process that releases (or drops a
//! guard, or has an attempt cancelled) and then calls `stop()` leaves nothing of its locks on
//! any reachable node, and `stop()` never takes longer than `CLEANUP_WAIT` for the core's
//! clean-ups plus `CLEANUP_WAIT` for the backend.
//!
//! "Exits" below is the real thing: the client runs on a runtime of its own that is dropped as
//! soon as `stop()` returns (its tasks and its sockets go with it, as with a process that
//! exits), while the servers and the proxy in front of node 2 live on. Each test prints its
//! figures on one line.
//!
//! Broken (fixed beside these tests): the take-back that a pool queues behind an abandoned
//! acquisition was a plain `EVALSHA`, lost with its client when the node had lost its scripts;
//! and `shutdown` waited for a pub/sub slot that an acquisition parked mid-subscribe held, for
//! as long as the future lived (for good if never dropped), past `stop`'s bound. Known
//! limitation (ignored test): the later rounds of a release to a node that failed are not
//! waited for, even when the failure was the client's own pool being full.

use std::future::Future;
use std::time::Duration;

use lock_core::{CLEANUP_WAIT, LockError, LockOptions, Locker, RetryPolicy};
use lock_redlock::{ConnectionKind, Redlock, RedlockConfig};
use lock_tests::nodes::{Nodes, PROBE, leftovers};
use lock_tests::proxy::LatencyProxy;
use lock_tests::server::{RedisServer, redis_or_skip};
use tokio::time::Instant;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// What the documentation bounds `stop` by: the core's clean-ups, then the backend's.
const STOP_BOUND: Duration = Duration::from_secs(2 * CLEANUP_WAIT.as_secs());

/// Runs `scenario` as a process of its own: on its own runtime, dropped (every task and
/// connection of the client with it) as soon as `scenario` returns.
fn as_a_process<T>(scenario: impl Future<Output = T>) -> T {
    tokio::task::block_in_place(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("client runtime");
        let out = runtime.block_on(scenario);
        runtime.shutdown_timeout(ms(100));
        out
    })
}

fn options(ttl: Duration) -> LockOptions {
    LockOptions::default().with_ttl(ttl).with_retry(
        RetryPolicy::forever()
            .with_retry_delay(ms(20))
            .with_retry_jitter(ms(5))
            .with_deadline(Duration::from_secs(15)),
    )
}

fn redlock(
    urls: impl IntoIterator<Item = String>,
    configure: impl FnOnce(RedlockConfig) -> RedlockConfig,
) -> Redlock {
    Redlock::new(configure(RedlockConfig::new(urls))).expect("client")
}

fn locker(lock: &Redlock, ttl: Duration) -> Locker {
    Locker::new(lock.clone())
        .with_options(options(ttl))
        .expect("options")
}

/// The lock keys (fence counters aside: they outlive locks by design) on each server.
fn lock_keys(servers: &[RedisServer]) -> Vec<Vec<(String, i64)>> {
    servers
        .iter()
        .map(|server| {
            leftovers(server)
                .into_iter()
                .filter(|(key, _)| !key.ends_with(":fence"))
                .collect()
        })
        .collect()
}

/// Waits up to `within` for every server to hold no lock key (what is still on its way lands
/// meanwhile); what is left then.
async fn left_after(servers: &[RedisServer], within: Duration) -> Vec<Vec<(String, i64)>> {
    let since = Instant::now();
    loop {
        let left = lock_keys(servers);
        if left.iter().all(Vec::is_empty) || since.elapsed() >= within {
            return left;
        }
        tokio::time::sleep(ms(50)).await;
    }
}

fn no_keys(left: &[Vec<(String, i64)>]) -> bool {
    left.iter().all(Vec::is_empty)
}

/// Three servers, each behind a proxy of its own (every node can be slowed).
struct AllProxied {
    servers: Vec<RedisServer>,
    proxies: Vec<LatencyProxy>,
}

impl AllProxied {
    async fn start() -> Self {
        let servers = lock_tests::backed::start_servers(3);
        let mut proxies = Vec::new();
        for server in &servers {
            proxies.push(LatencyProxy::start(server.port()).await.expect("proxy"));
        }
        Self { servers, proxies }
    }

    fn urls(&self) -> Vec<String> {
        self.proxies.iter().map(LatencyProxy::url).collect()
    }

    fn set_delay(&self, delay: Duration) {
        for proxy in &self.proxies {
            proxy.set_delay(delay);
        }
    }
}

/// The connection kinds and fencing settings every "exits" scenario runs under.
const VARIANTS: [(ConnectionKind, bool); 4] = [
    (ConnectionKind::Manager, false),
    (ConnectionKind::Pool, false),
    (ConnectionKind::Manager, true),
    (ConnectionKind::Pool, true),
];

fn configure(
    kind: ConnectionKind,
    fencing: bool,
    node_timeout: Duration,
) -> impl FnOnce(RedlockConfig) -> RedlockConfig {
    move |config| {
        config
            .with_connection(kind)
            .with_fencing(fencing)
            .with_node_timeout(node_timeout)
    }
}

// ---------------------------------------------------------------------------------------------
// Nothing left after a process exits right after `stop()`.
// ---------------------------------------------------------------------------------------------

/// Node 2 answers 300 ms late each way: the release answers once nodes 0 and 1 did; `stop` must
/// let it reach node 2 (and node 2's late acquisition hear it) before the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_then_stop_then_exit_leaves_nothing_on_a_slow_node() {
    let Some(_binary) = redis_or_skip("release, stop, exit") else {
        return;
    };
    for (kind, fencing) in VARIANTS {
        let nodes = Nodes::start().await;
        nodes.proxy.set_delay(ms(300));
        let stopped_in = as_a_process(async {
            let lock = redlock(nodes.urls(), configure(kind, fencing, ms(3_000)));
            let locker = locker(&lock, Duration::from_secs(20));
            let guard = locker.acquire("k").await.expect("acquire");
            guard.release().await.expect("release");
            let since = Instant::now();
            locker.stop().await.expect("stop");
            since.elapsed()
        });
        let left = left_after(&nodes.servers, ms(2_000)).await;
        println!(
            "release/stop/exit {kind:?} fencing={fencing}: stop {stopped_in:?}, left {left:?}"
        );
        assert!(no_keys(&left), "{kind:?} fencing={fencing}: left {left:?}");
        assert!(stopped_in < STOP_BOUND, "stop took {stopped_in:?}");
    }
}

/// As above, the guard dropped instead (its release sent from a task) and `stop` called at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_guard_then_stop_then_exit_leaves_nothing_on_a_slow_node() {
    let Some(_binary) = redis_or_skip("drop, stop, exit") else {
        return;
    };
    for (kind, fencing) in VARIANTS {
        let nodes = Nodes::start().await;
        nodes.proxy.set_delay(ms(300));
        let stopped_in = as_a_process(async {
            let lock = redlock(nodes.urls(), configure(kind, fencing, ms(3_000)));
            let locker = locker(&lock, Duration::from_secs(20));
            let guard = locker.acquire("k").await.expect("acquire");
            drop(guard);
            let since = Instant::now();
            locker.stop().await.expect("stop");
            since.elapsed()
        });
        let left = left_after(&nodes.servers, ms(2_000)).await;
        println!("drop/stop/exit {kind:?} fencing={fencing}: stop {stopped_in:?}, left {left:?}");
        assert!(no_keys(&left), "{kind:?} fencing={fencing}: left {left:?}");
        assert!(stopped_in < STOP_BOUND, "stop took {stopped_in:?}");
    }
}

/// Every node 250 ms late each way: the acquisition is cancelled while its requests are on the
/// wire on all three nodes, then `stop`, then exit. The take-back must reach every node after
/// the acquisition did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_acquisition_then_stop_then_exit_leaves_nothing() {
    let Some(_binary) = redis_or_skip("cancel, stop, exit") else {
        return;
    };
    for (kind, fencing) in VARIANTS {
        let nodes = AllProxied::start().await;
        nodes.set_delay(ms(250));
        let (cancelled, stopped_in) = as_a_process(async {
            let lock = redlock(nodes.urls(), configure(kind, fencing, ms(3_000)));
            let locker = locker(&lock, Duration::from_secs(20));
            // Warm the connections first (the cancel must hit requests on the wire, not a
            // connection being made).
            let warm = locker.inspect("warm").await.expect("inspect");
            assert_eq!(warm.len(), 3);
            let cancelled = tokio::time::timeout(ms(150), locker.acquire("k"))
                .await
                .is_err();
            let since = Instant::now();
            locker.stop().await.expect("stop");
            (cancelled, since.elapsed())
        });
        assert!(cancelled, "the acquisition answered within 150 ms");
        let left = left_after(&nodes.servers, ms(2_500)).await;
        println!("cancel/stop/exit {kind:?} fencing={fencing}: stop {stopped_in:?}, left {left:?}");
        assert!(no_keys(&left), "{kind:?} fencing={fencing}: left {left:?}");
        assert!(stopped_in < STOP_BOUND, "stop took {stopped_in:?}");
    }
}

/// Forty locks released at once (half by `release`, half dropped) with node 2 slow, `stop`
/// right after, then exit. `pool_size` is the pool's size per node (`None`: one multiplexed
/// connection). Node 2's connection and script cache are warm: on a cold one, behind the
/// proxy (16 KB per delay, about 80 KB/s at 200 ms), forty `EVALSHA`s met `NOSCRIPT` and their
/// forty `SCRIPT LOAD`s (the whole source each) took longer than `CLEANUP_WAIT`; `stop` then
/// closed after 5 s, as documented, and 25 keys stayed on node 2 for their ttl.
async fn many_releases_then_stop_then_exit(
    pool_size: Option<usize>,
) -> (Duration, Vec<Vec<(String, i64)>>) {
    let nodes = Nodes::start().await;
    nodes.proxy.set_delay(ms(100));
    let stopped_in = as_a_process(async {
        let lock = redlock(nodes.urls(), |config| {
            let mut config = config.with_node_timeout(ms(3_000));
            if let Some(size) = pool_size {
                config = config.with_connection(ConnectionKind::Pool);
                config.pool_size = size;
            }
            config
        });
        let locker = locker(&lock, Duration::from_secs(20));
        let warm = locker.acquire("warm").await.expect("warm");
        tokio::time::sleep(ms(500)).await;
        warm.release().await.expect("warm release");
        tokio::time::sleep(ms(500)).await;
        let mut guards = Vec::new();
        for i in 0..40 {
            guards.push(locker.acquire(&format!("k{i}")).await.expect("acquire"));
        }
        let mut releases = Vec::new();
        for (i, guard) in guards.into_iter().enumerate() {
            if i % 2 == 0 {
                releases.push(tokio::spawn(guard.release()));
            } else {
                drop(guard);
            }
        }
        for released in releases {
            released.await.expect("task").expect("release");
        }
        let since = Instant::now();
        locker.stop().await.expect("stop");
        since.elapsed()
    });
    (stopped_in, left_after(&nodes.servers, ms(2_500)).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_releases_in_flight_then_stop_then_exit_leave_nothing() {
    let Some(_binary) = redis_or_skip("many releases") else {
        return;
    };
    for pool_size in [None, Some(64)] {
        let (stopped_in, left) = many_releases_then_stop_then_exit(pool_size).await;
        println!(
            "40 releases/stop/exit, pool {pool_size:?}: stop {stopped_in:?}, left {:?}",
            left.iter().map(Vec::len).collect::<Vec<_>>()
        );
        assert!(no_keys(&left), "pool {pool_size:?}: left {left:?}");
        assert!(stopped_in < STOP_BOUND, "stop took {stopped_in:?}");
    }
}

/// The same with the default pool of 4 connections per node: node 2's 200 ms round trips
/// leave the releases waiting for a slot, and some fail on the pool's wait
/// ("Timeout occurred while waiting for a slot") without having been sent. Their re-sends are
/// follow-up rounds after a pause, which `shutdown` does not wait for (documented: "later
/// re-sends to nodes that failed are still not waited for"): `stop` returns after about
/// 1.7 s, far inside its `CLEANUP_WAIT`, and closes the connections before those rounds, and
/// 2 to 5 of the 40 keys stay on node 2, a reachable node, for their whole ttl (without `stop`
/// the follow-ups clean them within 3 s). 3 runs of 3 in a row here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "known limitation (CHANGELOG, d5feb46): shutdown does not wait for the later rounds of a release to a node that failed, even a pool's own wait for a slot"]
async fn many_releases_on_a_saturated_pool_then_stop_leave_nothing() {
    let Some(_binary) = redis_or_skip("saturated pool") else {
        return;
    };
    let (stopped_in, left) = many_releases_then_stop_then_exit(Some(4)).await;
    println!("40 releases/stop/exit, pool of 4: stop {stopped_in:?}, left {left:?}");
    assert!(no_keys(&left), "left {left:?}");
}

/// Node 2 lost its scripts (`SCRIPT FLUSH`) and answers 100 ms late each way: the release's
/// `EVALSHA` there meets `NOSCRIPT` after the majority answered; its reload must go out before
/// the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_meeting_noscript_on_a_slow_node_then_stop_then_exit_leaves_nothing() {
    let Some(_binary) = redis_or_skip("noscript") else {
        return;
    };
    for (kind, fencing) in VARIANTS {
        let nodes = Nodes::start().await;
        nodes.proxy.set_delay(ms(100));
        let stopped_in = as_a_process(async {
            let lock = redlock(nodes.urls(), configure(kind, fencing, ms(3_000)));
            let locker = locker(&lock, Duration::from_secs(20));
            // The scripts are loaded everywhere by a first cycle, then node 2 loses them.
            locker
                .acquire("k")
                .await
                .expect("warm")
                .release()
                .await
                .expect("warm release");
            tokio::time::sleep(ms(400)).await;
            let guard = locker.acquire("k").await.expect("acquire");
            tokio::time::sleep(ms(400)).await;
            assert_eq!(
                nodes.servers[2]
                    .command("SCRIPT FLUSH", PROBE)
                    .expect("flush"),
                "+OK"
            );
            guard.release().await.expect("release");
            let since = Instant::now();
            locker.stop().await.expect("stop");
            since.elapsed()
        });
        let left = left_after(&nodes.servers, ms(2_000)).await;
        println!(
            "noscript release/stop/exit {kind:?} fencing={fencing}: stop {stopped_in:?}, left {left:?}"
        );
        assert!(no_keys(&left), "{kind:?} fencing={fencing}: left {left:?}");
    }
}

/// The pattern of `redlock_promises::stop_after_a_release_lets_it_reach_a_node_that_took_the_key_late`
/// (a pool's connection to node 2 holds the acquisition; the release overtakes it there), with
/// the process exiting as soon as `stop` returns, node 2's scripts flushed first (the re-send
/// must carry its script), and fencing on or off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_overtaking_a_held_acquisition_then_stop_then_exit_leaves_nothing() {
    let Some(_binary) = redis_or_skip("overtaken") else {
        return;
    };
    for fencing in [false, true] {
        for flush in [false, true] {
            let nodes = Nodes::start().await;
            let stopped_in = as_a_process(async {
                let lock = redlock(
                    nodes.urls(),
                    configure(ConnectionKind::Pool, fencing, ms(1_000)),
                );
                let locker = locker(&lock, Duration::from_secs(20));
                let warm = locker.acquire("k").await.expect("warm");
                tokio::time::sleep(ms(200)).await;
                warm.release().await.expect("release");
                tokio::time::sleep(ms(200)).await;
                if flush {
                    nodes.servers[2]
                        .command("SCRIPT FLUSH", PROBE)
                        .expect("flush");
                }
                nodes.proxy.stall_existing(0);
                let guard = locker.acquire("k").await.expect("nodes 0 and 1");
                guard.release().await.expect("release");
                let since = Instant::now();
                let (stopped, ()) = tokio::join!(locker.stop(), async {
                    tokio::time::sleep(ms(200)).await;
                    nodes.proxy.release_stall();
                });
                stopped.expect("stop");
                since.elapsed()
            });
            let left = left_after(&nodes.servers, ms(2_000)).await;
            println!(
                "overtaken release/stop/exit fencing={fencing} flush={flush}: stop {stopped_in:?}, left {left:?}"
            );
            assert!(
                no_keys(&left),
                "fencing={fencing} flush={flush}: left {left:?}"
            );
        }
    }
}

/// A fair waiter (in the key's line on every node, node 2 slow) whose client stops, then
/// exits: no place in line of it is left on any node, and the holder (another process) still
/// releases cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fair_waiter_stopped_then_exit_leaves_no_place_in_line() {
    let Some(_binary) = redis_or_skip("fair stop") else {
        return;
    };
    for kind in [ConnectionKind::Manager, ConnectionKind::Pool] {
        let nodes = Nodes::start().await;
        nodes.proxy.set_delay(ms(150));
        let holder_lock = redlock(nodes.urls(), |config| {
            config
                .with_fair(true)
                .with_connection(kind)
                .with_node_timeout(ms(3_000))
        });
        let holder = locker(&holder_lock, Duration::from_secs(20));
        let held = holder.acquire("k").await.expect("holder");
        tokio::time::sleep(ms(600)).await;
        println!(
            "fair {kind:?}: after the holder's acquisition: {:?}",
            lock_keys(&nodes.servers)
        );
        let (waited, stopped_in) = as_a_process(async {
            let lock = redlock(nodes.urls(), |config| {
                config
                    .with_fair(true)
                    .with_connection(kind)
                    .with_node_timeout(ms(3_000))
            });
            let waiter = locker(&lock, Duration::from_secs(20));
            let (waited, stopped_in) = tokio::join!(waiter.acquire("k"), async {
                tokio::time::sleep(ms(800)).await;
                let since = Instant::now();
                waiter.stop().await.expect("stop");
                since.elapsed()
            });
            (waited.map(|_| ()), stopped_in)
        });
        assert!(
            matches!(waited, Err(LockError::Stopped)),
            "the waiter ended with {waited:?}"
        );
        // Only the holder's key may be left; no line of the waiter's.
        tokio::time::sleep(ms(500)).await;
        let left = lock_keys(&nodes.servers);
        println!("fair waiter stop/exit {kind:?}: stop {stopped_in:?}, left {left:?}");
        for (node, keys) in left.iter().enumerate() {
            assert!(
                keys.iter().all(|(key, _)| key == "k"),
                "{kind:?}: node {node} keeps {keys:?}"
            );
        }
        held.release().await.expect("holder's release");
        let left = left_after(&nodes.servers, ms(2_000)).await;
        assert!(
            no_keys(&left),
            "{kind:?}: after the holder's release: {left:?}"
        );
        holder.stop().await.expect("holder stop");
    }
}

// ---------------------------------------------------------------------------------------------
// How long `stop` takes when a node does not answer.
// ---------------------------------------------------------------------------------------------

/// Node 2 black-holed (its requests accepted, never answered). With a long node timeout the
/// release's answer from node 2 never comes: the backend waits `CLEANUP_WAIT` for it, no
/// more. With the derived node timeout (at most 500 ms) `stop` waits that long only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_with_a_black_holed_node_is_bounded() {
    let Some(_binary) = redis_or_skip("black hole") else {
        return;
    };
    for (long_timeout, kind) in [
        (true, ConnectionKind::Manager),
        (true, ConnectionKind::Pool),
        (false, ConnectionKind::Manager),
    ] {
        let nodes = Nodes::start().await;
        let lock = redlock(nodes.urls(), |config| {
            let config = config.with_connection(kind);
            if long_timeout {
                config.with_node_timeout(Duration::from_secs(20))
            } else {
                config
            }
        });
        let locker = locker(&lock, Duration::from_secs(20));
        locker.inspect("warm").await.expect("warm");
        nodes.proxy.black_hole();
        let guard = locker.acquire("k").await.expect("nodes 0 and 1");
        guard.release().await.expect("release on nodes 0 and 1");
        let since = Instant::now();
        locker.stop().await.expect("stop");
        let took = since.elapsed();
        println!("black hole, long timeout={long_timeout}, {kind:?}: stop {took:?}");
        assert!(took < STOP_BOUND, "stop took {took:?}");
        if long_timeout {
            assert!(
                took >= CLEANUP_WAIT - ms(200),
                "stop returned in {took:?}: did it wait for the release at all?"
            );
        } else {
            assert!(
                took < ms(1_500),
                "stop took {took:?} with a 500 ms node timeout"
            );
        }
        // A later call returns at once.
        let since = Instant::now();
        locker.stop().await.expect("second stop");
        assert!(since.elapsed() < ms(200));
        nodes.proxy.set_delay(Duration::ZERO);
    }
}

/// Node 2 cut (connections closed, new ones refused): its answers fail at once, so `stop`
/// does not wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_with_a_cut_node_is_quick() {
    let Some(_binary) = redis_or_skip("cut") else {
        return;
    };
    for kind in [ConnectionKind::Manager, ConnectionKind::Pool] {
        let nodes = Nodes::start().await;
        let lock = redlock(nodes.urls(), |config| {
            config
                .with_connection(kind)
                .with_node_timeout(Duration::from_secs(20))
        });
        let locker = locker(&lock, Duration::from_secs(20));
        locker.inspect("warm").await.expect("warm");
        nodes.proxy.cut();
        let guard = locker.acquire("k").await.expect("nodes 0 and 1");
        guard.release().await.expect("release on nodes 0 and 1");
        let since = Instant::now();
        locker.stop().await.expect("stop");
        let took = since.elapsed();
        println!("cut node, {kind:?}: stop {took:?}");
        assert!(took < ms(2_000), "stop took {took:?}");
    }
}

/// Everything at once while node 2 is black-holed under a 20 s node timeout: a fair, fenced
/// pool client with a dropped guard, a released guard, an acquisition cancelled on the wire and
/// a waiter behind another process's lock. The core's clean-ups (the cancelled attempt's
/// take-back waits on node 2) and the backend's settling both run to their limit: `stop` takes
/// about `2 × CLEANUP_WAIT`, not more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_with_everything_pending_on_a_black_holed_node_stays_within_two_cleanup_waits() {
    let Some(_binary) = redis_or_skip("worst case") else {
        return;
    };
    let nodes = Nodes::start().await;
    let make = || {
        redlock(nodes.urls(), |config| {
            config
                .with_connection(ConnectionKind::Pool)
                .with_fair(true)
                .with_fencing(true)
                .with_node_timeout(Duration::from_secs(20))
        })
    };
    let other = locker(&make(), Duration::from_secs(20));
    let lock = make();
    let locker = locker(&lock, Duration::from_secs(20));
    let held_elsewhere = other.acquire("busy").await.expect("other process");
    // Taken while node 2 answers: a fair client's first attempt subscribes on every node, for
    // up to the node timeout (see the next test for a stop during that).
    let dropped = locker.acquire("a").await.expect("a");
    let released = locker.acquire("b").await.expect("b");
    tokio::time::sleep(ms(200)).await;
    nodes.proxy.black_hole();
    drop(dropped);
    released.release().await.expect("release b");
    // Cancelled while node 2 has not answered (nodes 0 and 1 answer at once, so the attempt
    // is decided by them: cancel it before that by stalling nothing else; it is taken back).
    let cancelled = tokio::time::timeout(Duration::ZERO, locker.acquire("c")).await;
    let waiter = {
        let locker = locker.clone();
        tokio::spawn(async move { locker.acquire("busy").await.map(|_| ()) })
    };
    tokio::time::sleep(ms(300)).await;
    let since = Instant::now();
    let stopped = locker.stop().await;
    let took = since.elapsed();
    let waited = waiter.await.expect("waiter task");
    println!(
        "everything pending, black-holed node: stop {took:?} ({stopped:?}); cancelled {}; waiter {waited:?}",
        cancelled.is_err()
    );
    stopped.expect("stop");
    assert!(matches!(waited, Err(LockError::Stopped)), "{waited:?}");
    assert!(
        took < STOP_BOUND + ms(1_000),
        "stop took {took:?}, past 2 x CLEANUP_WAIT"
    );
    nodes.proxy.set_delay(Duration::ZERO);
    held_elsewhere.release().await.expect("other release");
    other.stop().await.expect("other stop");
}

// ---------------------------------------------------------------------------------------------
// Several callers, cancelled callers, and calls made while `stop` waits.
// ---------------------------------------------------------------------------------------------

/// Node 2 black-holed under a 20 s node timeout, so the backend's wait runs its full
/// `CLEANUP_WAIT`: two clones call `stop` together (both return when the job is done, neither
/// hangs); meanwhile every new call of the client fails with `Stopped`, and a guard taken
/// before still answers (typed) without a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_stops_and_calls_during_the_wait_behave() {
    let Some(_binary) = redis_or_skip("concurrent stops") else {
        return;
    };
    let nodes = Nodes::start().await;
    let lock = redlock(nodes.urls(), |config| {
        config.with_node_timeout(Duration::from_secs(20))
    });
    let locker = locker(&lock, Duration::from_secs(20));
    let clone = locker.clone();
    locker.inspect("warm").await.expect("warm");
    let mut kept = locker.acquire("kept").await.expect("kept");
    nodes.proxy.black_hole();
    locker
        .acquire("k")
        .await
        .expect("k")
        .release()
        .await
        .expect("release");
    let since = Instant::now();
    let first = async {
        locker.stop().await.expect("first stop");
        since.elapsed()
    };
    let second = async {
        tokio::time::sleep(ms(100)).await;
        clone.stop().await.expect("second stop");
        since.elapsed()
    };
    let during = async {
        tokio::time::sleep(ms(500)).await;
        let acquired = clone.acquire("new").await.map(|_| ());
        let tried = clone.try_acquire("new").await.map(|_| ());
        let inspected = clone.inspect("new").await.map(|_| ());
        let extended = kept.extend(Duration::from_secs(20)).await;
        (acquired, tried, inspected, extended)
    };
    let (first, second, (acquired, tried, inspected, extended)) =
        tokio::join!(first, second, during);
    println!(
        "two stops: {first:?} and {second:?}; during the wait: acquire {acquired:?}, try {tried:?}, inspect {inspected:?}, extend {extended:?}"
    );
    assert!(first < STOP_BOUND && second < STOP_BOUND);
    assert!(
        second + ms(300) >= first,
        "the second returned before the job was done"
    );
    assert!(matches!(acquired, Err(LockError::Stopped)));
    assert!(matches!(tried, Err(LockError::Stopped)));
    assert!(matches!(inspected, Err(LockError::Stopped)));
    // Either outcome is typed; what matters is no panic, no hang.
    let _ = extended;
    let released = kept.release().await;
    assert!(matches!(released, Err(LockError::Stopped)), "{released:?}");
    nodes.proxy.set_delay(Duration::ZERO);
}

/// `stop` cancelled while the backend waits (node 2 black-holed, 20 s node timeout): the
/// backend stays usable by the next `stop` (no half-closed state that hangs), which does the
/// job within `2 × CLEANUP_WAIT` of its own start; a caller that was waiting on the cancelled
/// one takes over and returns too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_stop_hands_the_job_on_and_hangs_nothing() {
    let Some(_binary) = redis_or_skip("cancelled stop") else {
        return;
    };
    let nodes = Nodes::start().await;
    let lock = redlock(nodes.urls(), |config| {
        config.with_node_timeout(Duration::from_secs(20))
    });
    let locker = locker(&lock, Duration::from_secs(20));
    let clone = locker.clone();
    locker.inspect("warm").await.expect("warm");
    nodes.proxy.black_hole();
    locker
        .acquire("k")
        .await
        .expect("k")
        .release()
        .await
        .expect("release");
    let since = Instant::now();
    let (cancelled, waiting) =
        tokio::join!(tokio::time::timeout(ms(1_000), locker.stop()), async {
            tokio::time::sleep(ms(100)).await;
            let result = clone.stop().await;
            (result, since.elapsed())
        });
    assert!(cancelled.is_err(), "the first stop ended within 1 s");
    let (result, waited) = waiting;
    println!("cancelled stop: the waiting caller returned after {waited:?} ({result:?})");
    result.expect("the waiting caller's stop");
    assert!(waited < ms(1_000) + STOP_BOUND, "took {waited:?}");
    // Done: later calls return at once, and the backend is closed.
    let since = Instant::now();
    locker.stop().await.expect("third stop");
    assert!(since.elapsed() < ms(200));
    assert!(matches!(locker.acquire("x").await, Err(LockError::Stopped)));
    nodes.proxy.set_delay(Duration::ZERO);
}

/// A fair, fenced client's first attempt subscribes on every node before it goes out, each
/// bounded by the node timeout (20 s here): node 2 black-holed, the waiter is stuck there
/// (even on a free key) when `stop` comes. `stop` must not wait for the subscription (its slot
/// is what `shutdown` closes), and the waiter ends with `Stopped`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_while_a_fair_waiter_subscribes_to_a_black_holed_node_is_bounded() {
    let Some(_binary) = redis_or_skip("fair subscribe") else {
        return;
    };
    let nodes = Nodes::start().await;
    let lock = redlock(nodes.urls(), |config| {
        config
            .with_fair(true)
            .with_fencing(true)
            .with_node_timeout(Duration::from_secs(20))
    });
    let locker = locker(&lock, Duration::from_secs(20));
    locker.inspect("warm").await.expect("warm");
    nodes.proxy.black_hole();
    let waiter = {
        let locker = locker.clone();
        tokio::spawn(async move { locker.acquire("k").await.map(|_| ()) })
    };
    tokio::time::sleep(ms(500)).await;
    let since = Instant::now();
    let stopped = locker.stop().await;
    let took = since.elapsed();
    let waited = tokio::time::timeout(ms(2_000), waiter).await;
    println!(
        "fair waiter subscribing to a black hole: stop {took:?} ({stopped:?}), waiter {waited:?}"
    );
    stopped.expect("stop");
    assert!(took < STOP_BOUND, "stop took {took:?}");
    let waited = waited.expect("the waiter ended").expect("task");
    assert!(matches!(waited, Err(LockError::Stopped)), "{waited:?}");
    nodes.proxy.set_delay(Duration::ZERO);
}

// ---------------------------------------------------------------------------------------------
// The take-back queued behind an acquisition abandoned on a pool's connection.
// ---------------------------------------------------------------------------------------------

/// A pool's connection to node 2 holds the acquisition (stalled) past the node timeout: the
/// request is abandoned and its compare-and-delete queued behind it on that same connection
/// (`UndoOnDrop`), while the release and its re-send reach node 2 on other connections first
/// and find nothing. `stop`, then the process exits; node 2 loses its scripts (`SCRIPT
/// FLUSH`, as any other client of the server may send); then the held acquisition lands, and
/// the take-back behind it must still delete it: a take-back that is the last thing a process
/// sends must carry its script (as every follow-up does), or node 2 answers `NOSCRIPT` to a
/// client that is gone and keeps the key for its whole ttl. `flush = false` is the control.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn take_back_queued_behind_a_held_acquisition_survives_the_exit_and_a_script_flush() {
    let Some(_binary) = redis_or_skip("undo on drop") else {
        return;
    };
    for flush in [false, true] {
        let nodes = Nodes::start().await;
        let stopped_in = as_a_process(async {
            let lock = redlock(
                nodes.urls(),
                configure(ConnectionKind::Pool, false, ms(300)),
            );
            let locker = locker(&lock, Duration::from_secs(20));
            let warm = locker.acquire("k").await.expect("warm");
            tokio::time::sleep(ms(200)).await;
            warm.release().await.expect("release");
            tokio::time::sleep(ms(200)).await;
            nodes.proxy.stall_existing(0);
            let guard = locker.acquire("k").await.expect("nodes 0 and 1");
            guard.release().await.expect("release on nodes 0 and 1");
            let since = Instant::now();
            locker.stop().await.expect("stop");
            since.elapsed()
        });
        if flush {
            nodes.servers[2]
                .command("SCRIPT FLUSH", PROBE)
                .expect("flush");
        }
        let sets = nodes.servers[2].calls("set").expect("calls");
        nodes.proxy.release_stall();
        // The held acquisition lands (node 2's second `SET`), then what follows it.
        let landed = Instant::now();
        while nodes.servers[2].calls("set").expect("calls") <= sets {
            assert!(
                landed.elapsed() < ms(3_000),
                "the held acquisition never landed"
            );
            tokio::time::sleep(ms(20)).await;
        }
        let left = left_after(&nodes.servers, ms(1_500)).await;
        println!(
            "undo behind a held acquisition, flush={flush}: stop {stopped_in:?}, left {left:?}"
        );
        assert!(
            no_keys(&left),
            "flush={flush}: the acquisition that landed after the exit stays: {left:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// inc and memory: `Locker::stop`'s own count was moved to `raw::Settling`.
// ---------------------------------------------------------------------------------------------

async fn inc_locker(url: &str) -> Locker {
    let lock = lock_inc::IncLock::connect(lock_inc::IncConfig::new(url))
        .await
        .expect("inc");
    Locker::new(lock)
        .with_options(options(Duration::from_secs(20)))
        .expect("options")
}

/// inc: a dropped guard and an acquisition cancelled on the wire, then `stop` from two clones
/// at once, then exit: nothing left, both callers return, later calls `Stopped`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_drop_and_cancel_then_concurrent_stops_then_exit_leave_nothing() {
    let Some(binary) = redis_or_skip("inc stop") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("server");
    let (first, second, cancelled) = as_a_process(async {
        let locker = inc_locker(&server.url()).await;
        let clone = locker.clone();
        drop(locker.acquire("dropped").await.expect("dropped"));
        // Held by another process: the acquisition waits, and is cancelled while it does.
        let other = inc_locker(&server.url()).await;
        let held = other.acquire("cancelled").await.expect("other");
        let cancelled = tokio::time::timeout(ms(150), locker.acquire("cancelled"))
            .await
            .is_err();
        held.release().await.expect("other release");
        other.stop().await.expect("other stop");
        let since = Instant::now();
        let (first, second) = tokio::join!(
            async {
                locker.stop().await.expect("first stop");
                since.elapsed()
            },
            async {
                clone.stop().await.expect("second stop");
                since.elapsed()
            }
        );
        assert!(matches!(clone.acquire("x").await, Err(LockError::Stopped)));
        (first, second, cancelled)
    });
    let left = left_after(std::slice::from_ref(&server), ms(1_000)).await;
    println!(
        "inc drop+cancel/stop x2/exit: stops {first:?} {second:?}, cancelled {cancelled}, left {left:?}"
    );
    assert!(no_keys(&left), "{left:?}");
    assert!(first < ms(2_000) && second < ms(2_000));
}

/// inc with its server frozen (SIGSTOP) and a dropped guard's release stuck on it: `stop`
/// gives the release `CLEANUP_WAIT`, then closes; it must not wait on the frozen server past
/// `2 × CLEANUP_WAIT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_stop_with_a_frozen_server_is_bounded() {
    let Some(binary) = redis_or_skip("inc frozen") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("server");
    let locker = inc_locker(&server.url()).await;
    let guard = locker.acquire("k").await.expect("k");
    server.pause().expect("SIGSTOP");
    drop(guard);
    let since = Instant::now();
    let stopped = tokio::time::timeout(STOP_BOUND + ms(5_000), locker.stop()).await;
    let took = since.elapsed();
    server.resume().expect("SIGCONT");
    println!("inc, frozen server: stop {took:?} ({stopped:?})");
    assert!(stopped.is_ok(), "stop still running after {took:?}");
    assert!(took < STOP_BOUND + ms(1_000), "stop took {took:?}");
}

/// memory: `stop` after a dropped guard and with a guard still held returns at once, twice
/// (clones at once); the held guard keeps working, as documented for a store in this process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stop_is_immediate_and_leaves_held_guards_working() {
    let locker = Locker::new(lock_memory::MemoryLock::new())
        .with_options(options(Duration::from_secs(20)))
        .expect("options");
    let clone = locker.clone();
    let mut held = locker.acquire("held").await.expect("held");
    drop(locker.acquire("dropped").await.expect("dropped"));
    let since = Instant::now();
    let (first, second) = tokio::join!(locker.stop(), clone.stop());
    let took = since.elapsed();
    first.expect("first stop");
    second.expect("second stop");
    println!("memory: two stops in {took:?}");
    assert!(took < ms(500), "{took:?}");
    assert!(matches!(clone.acquire("x").await, Err(LockError::Stopped)));
    held.extend(Duration::from_secs(20))
        .await
        .expect("extend after stop");
    held.release().await.expect("release after stop");
}

/// An acquisition polled once, then parked (kept, not polled: a `select!` branch left
/// pending, a future stored for later) while it subscribes on a slow or black-holed node holds
/// that node's subscription slot: a fair, fenced client's first attempt subscribes for its
/// turns, and a waiter of a client with wake-ups subscribes to the release channel. `stop`
/// must still return within its bound: before the fix it waited in `shutdown` for the slot,
/// that is until the parked future was dropped (12 s here, for good if never).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_with_a_parked_fair_acquisition_mid_subscribe_is_bounded() {
    if redis_or_skip("parked fair acquisition").is_some() {
        // The default configuration (fair, no fencing): a waiter whose first attempt was
        // refused subscribes for its turns on the black-holed node.
        parked_acquisition_then_stop(None, false, true, 300).await;
        // Fair and fenced: the first attempt itself subscribes first, here on a slow node.
        parked_acquisition_then_stop(Some(true), true, false, 50).await;
    }
}

/// As above, without fairness: a waiter of a client with wake-ups on release (the default
/// over several nodes) parked while it subscribes to the release channel on a black-holed
/// node (after its attempt, which waits up to the node timeout there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_with_a_parked_waiter_mid_subscribe_is_bounded() {
    if redis_or_skip("parked waiter").is_some() {
        parked_acquisition_then_stop(Some(false), false, true, 4_500).await;
    }
}

/// `fair`: as configured (`None`: the default, fair); `black_hole`: node 2 black-holed rather
/// than slow; `park`: how long the acquisition runs before it is parked.
async fn parked_acquisition_then_stop(
    fair: Option<bool>,
    fencing: bool,
    black_hole: bool,
    park: u64,
) {
    // The waiter's attempt takes up to this on the black-holed node; its subscription there,
    // as long again.
    let node_timeout = if park > 1_000 { 3_000 } else { 1_000 };
    {
        let nodes = Nodes::start().await;
        let lock = redlock(nodes.urls(), |config| {
            let config = config
                .with_fencing(fencing)
                .with_node_timeout(ms(node_timeout));
            match fair {
                Some(fair) => config.with_fair(fair),
                None => config,
            }
        });
        let locker = locker(&lock, Duration::from_secs(20));
        locker.inspect("warm").await.expect("warm");
        // The key is held by another process: the acquisition waits.
        let other = self::locker(
            &redlock(nodes.urls(), |config| config),
            Duration::from_secs(20),
        );
        let held = other.acquire("k").await.expect("held elsewhere");
        if black_hole {
            nodes.proxy.black_hole();
        } else {
            nodes.proxy.set_delay(ms(300));
        }
        let mut parked = Box::pin(locker.acquire("k"));
        assert!(
            tokio::time::timeout(ms(park), &mut parked).await.is_err(),
            "the acquisition ended at once"
        );
        let since = Instant::now();
        let stopped = tokio::time::timeout(STOP_BOUND + ms(2_000), locker.stop()).await;
        let took = since.elapsed();
        println!(
            "parked acquisition mid-subscribe, fair={fair:?} fencing={fencing}: stop {took:?} ({stopped:?})"
        );
        nodes.proxy.set_delay(Duration::ZERO);
        drop(parked);
        held.release().await.expect("other release");
        assert!(
            stopped.is_ok(),
            "fair={fair:?}: stop still waiting after {took:?}"
        );
        assert!(
            took < STOP_BOUND + ms(1_000),
            "fair={fair:?}: stop took {took:?}"
        );
        // Nothing subscribed after the stop: the parked subscription, dropped, left none.
        assert!(matches!(locker.acquire("k").await, Err(LockError::Stopped)));
    }
}

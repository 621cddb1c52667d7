//! inv18a: a fair waiter that won over a quorum stays in the line of the node that refused it
//! when its release to that node is lost: the release's follow-up is sent without the waiter's
//! member.
//!
//! Three fair Redlock nodes with fencing (every single-key attempt goes through the lines, as in
//! the fault explorer), node 0 behind a [`LatencyProxy`]. Another process holds `k` on node 0
//! alone (the squatter), so the client's round is refused there — which puts its waiter in node
//! 0's line, first — and wins on nodes 1 and 2. The squatter leaves. The client releases: the
//! proxy drops that release on its way to node 0 (with its connection, as a cut, a restart or a
//! request dropped before it was written would lose it), the quorum of nodes 1 and 2 answers,
//! and the release's follow-up asks node 0 again: on main with the token alone
//! (`Shared::release_until_answered`: no member), so the waiter, gone, stays first in node 0's
//! line for its entry's lease (the ttl). Every other client is refused on node 0 meanwhile (the
//! line's head is someone else), and the next release there reserves `k` for the gone waiter
//! (`lock-turn-reserved:<member>`, pttl up to the ttl): the explorer's "stray lock" (seeds
//! 18248, 18162) in its shape. The negative control loses no release: node 0 ends clean.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::fair::{connect, line_members, release_fair_source};
use lock_tests::proxy::LatencyProxy;
use lock_tests::server::{RedisServer, redis_or_skip};
use redis::aio::MultiplexedConnection;

const TTL: Duration = Duration::from_secs(20);
const NODE_TIMEOUT: Duration = Duration::from_millis(200);
/// What another process stores on the key.
const SQUATTER: &str = "squatter";

/// What, in a request towards a node, marks a fair mutex's release of `key`:
/// `EVALSHA <release_fair sha> 3 <key>` in RESP.
fn release_fair_marker(key: &str) -> Vec<u8> {
    let sha = redis::Script::new(&release_fair_source())
        .get_hash()
        .to_owned();
    format!("{sha}\r\n$1\r\n3\r\n${}\r\n{key}\r\n", key.len()).into_bytes()
}

async fn get(connection: &mut MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query_async(connection)
        .await
        .unwrap()
}

async fn pttl(connection: &mut MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query_async(connection)
        .await
        .unwrap()
}

/// Three Redlock nodes without lines, node 0 behind a [`LatencyProxy`], a 50 ms node timeout
/// and single tries (with `fencing` or not): the servers, the proxy and the client.
async fn three_nodes_first_behind_a_proxy(
    binary: &std::path::Path,
    fencing: bool,
) -> (Vec<RedisServer>, LatencyProxy, Locker) {
    let servers: Vec<RedisServer> = (0..3)
        .map(|_| RedisServer::start(binary, &[]).unwrap())
        .collect();
    let proxy = LatencyProxy::start(servers[0].port()).await.unwrap();
    let urls = vec![proxy.url(), servers[1].url(), servers[2].url()];
    let lock = Redlock::new(
        RedlockConfig::new(urls)
            .with_fair(false)
            .with_fencing(fencing)
            .with_node_timeout(Duration::from_millis(50)),
    )
    .unwrap();
    let locker = Locker::new(lock)
        .with_options(
            LockOptions::default()
                .with_ttl(TTL)
                .with_retry(RetryPolicy::none()),
        )
        .unwrap();
    (servers, proxy, locker)
}

/// The fencing counter of `key` on a node.
async fn fence_counter(connection: &mut MultiplexedConnection, key: &str) -> Option<u64> {
    redis::cmd("GET")
        .arg([key.as_bytes(), lock_redlock::FENCE_SUFFIX].concat())
        .query_async(connection)
        .await
        .unwrap()
}

/// What node 0 holds of `k` at the end: the line after the winner's release (and its
/// follow-ups), then `k`'s value and pttl after another client took and released it.
#[derive(Debug)]
struct Left {
    member: String,
    line_after_release: Vec<String>,
    value: Option<String>,
    pttl: i64,
}

/// The schedule above; `lose_release`: the proxy drops the winner's release to node 0.
async fn winner_release_lost(test: &str, lose_release: bool) -> Option<Left> {
    let binary = redis_or_skip(test)?;
    let servers: Vec<RedisServer> = (0..3)
        .map(|_| RedisServer::start(&binary, &[]).unwrap())
        .collect();
    let proxy = LatencyProxy::start(servers[0].port()).await.unwrap();
    let mut urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    urls[0] = proxy.url();
    let mut node0 = connect(&servers[0].url()).await;
    let locker = |urls: Vec<String>| {
        let config = RedlockConfig::new(urls)
            .with_node_timeout(NODE_TIMEOUT)
            .with_fencing(true);
        let retry = RetryPolicy::forever()
            .with_retry_delay(Duration::from_millis(50))
            .with_deadline(Duration::from_secs(5));
        Locker::new(Redlock::new(config).unwrap())
            .with_local_queue(false)
            .with_options(LockOptions::default().with_ttl(TTL).with_retry(retry))
            .unwrap()
    };
    let (winner, other) = (locker(urls.clone()), locker(urls));

    // The squatter holds `k` on node 0 alone: the winner's round is refused there (its waiter
    // lines up, first) and wins on nodes 1 and 2.
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg(SQUATTER)
        .arg("PX")
        .arg(u64::try_from(TTL.as_millis()).unwrap())
        .query_async(&mut node0)
        .await
        .unwrap();
    let guard = winner.acquire("k").await.unwrap();
    let mut lined = Vec::new();
    for _ in 0..100 {
        lined = line_members(&mut node0, "k").await;
        if !lined.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        lined.len(),
        1,
        "the winner's waiter is not in node 0's line"
    );
    let member = lined[0].clone();
    let _: i64 = redis::cmd("DEL")
        .arg("k")
        .query_async(&mut node0)
        .await
        .unwrap();

    if lose_release {
        proxy.drop_next(release_fair_marker("k"));
    }
    guard.release().await.unwrap();
    if lose_release {
        assert!(
            proxy.dropped_within(Duration::from_secs(2)).await,
            "the release never went to node 0"
        );
    }
    // The follow-up asks node 0 again after a node timeout (and again after two): far within.
    tokio::time::sleep(NODE_TIMEOUT * 10).await;
    let line_after_release = line_members(&mut node0, "k").await;

    // Another client takes `k` (nodes 1 and 2: node 0 refuses it while someone heads its line)
    // and releases it: node 0 passes the turn to its line's head.
    let guard = other.acquire("k").await.unwrap();
    guard.release().await.unwrap();
    tokio::time::sleep(NODE_TIMEOUT * 2).await;
    let value = get(&mut node0, "k").await;
    let pttl = pttl(&mut node0, "k").await;
    for locker in [winner, other] {
        locker.stop().await.unwrap();
    }
    Some(Left {
        member,
        line_after_release,
        value,
        pttl,
    })
}

/// Fails on main: the release lost on node 0 is re-sent without the waiter's member, which
/// stays first in node 0's line; the other client's release then reserves `k` there for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_release_of_a_fair_winner_is_resent_with_its_member() {
    let Some(left) = winner_release_lost(
        "a_lost_release_of_a_fair_winner_is_resent_with_its_member",
        true,
    )
    .await
    else {
        return;
    };
    assert!(
        left.line_after_release.is_empty() && left.value.is_none(),
        "node 0 kept the gone winner {} in line ({:?}) and then held `k` = {:?} (pttl {} ms of \
         {TTL:?}) after every client released",
        left.member,
        left.line_after_release,
        left.value,
        left.pttl
    );
}

/// Negative control (held): no release lost, node 0 ends clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_a_fair_winner_released_everywhere_leaves_every_line() {
    let Some(left) = winner_release_lost(
        "control_a_fair_winner_released_everywhere_leaves_every_line",
        false,
    )
    .await
    else {
        return;
    };
    assert!(
        left.line_after_release.is_empty() && left.value.is_none(),
        "{left:?}"
    );
}

/// The follow-up's other half (inv18a, seed 30435): a release re-sent to a node that lost its
/// scripts (a restart, `SCRIPT FLUSH`) and answers later than the node timeout. A plain
/// `EVALSHA` is refused there with NOSCRIPT, after its sender gave up, so the `SCRIPT LOAD`
/// that would follow is never sent; every re-send of the follow-up meets the same fate and the
/// key stays on that node for its ttl. Each re-send now carries its script. Without lines
/// (`fair: false`), where the first release and its re-sends are plain compare-and-delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_resent_to_a_slow_node_that_lost_its_scripts_runs_there() {
    let Some(binary) = redis_or_skip("s18a release after SCRIPT FLUSH") else {
        return;
    };
    let (servers, proxy, locker) = three_nodes_first_behind_a_proxy(&binary, false).await;
    let mut node0 = connect(&servers[0].url()).await;
    let guard = locker.acquire("k").await.unwrap();
    // The acquisition returns once a quorum answered: node 0, behind the proxy, may take its
    // `SET` a moment later.
    let reached_by = tokio::time::Instant::now() + Duration::from_secs(1);
    while get(&mut node0, "k").await.is_none() {
        assert!(
            tokio::time::Instant::now() < reached_by,
            "the lock never reached node 0"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Node 0 loses its scripts and answers 150 ms late from now on.
    let flushed = servers[0]
        .command("SCRIPT FLUSH", Duration::from_secs(2))
        .unwrap();
    assert_eq!(flushed, "+OK");
    proxy.set_delay(Duration::from_millis(150));
    guard.release().await.unwrap();
    // The follow-up asks again, within a few node timeouts; each try runs 150 ms later.
    let mut left = pttl(&mut node0, "k").await;
    for _ in 0..40 {
        if left == -2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = pttl(&mut node0, "k").await;
    }
    println!("s18a: node 0's `k` after the release: pttl {left} ms (-2: gone)");
    assert_eq!(
        left, -2,
        "the release never ran on the node that lost its scripts: `k` stays for the ttl"
    );
}

/// The same on inc (one server): a release that times out is asked again in the background
/// (`release_later`); on a server that lost its scripts and answers later than the command
/// timeout, `EVALSHA` with reload never gets to reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_a_release_resent_to_a_slow_server_that_lost_its_scripts_runs_there() {
    let Some(binary) = redis_or_skip("s18a inc release after SCRIPT FLUSH") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let proxy = LatencyProxy::start(server.port()).await.unwrap();
    let lock = lock_inc::IncLock::connect(lock_inc::IncConfig {
        command_timeout: 50,
        ..lock_inc::IncConfig::new(proxy.url())
    })
    .await
    .unwrap();
    let locker = Locker::new(lock)
        .with_options(
            LockOptions::default()
                .with_ttl(TTL)
                .with_retry(RetryPolicy::none()),
        )
        .unwrap();
    let mut direct = connect(&server.url()).await;
    let guard = locker.acquire("k").await.unwrap();
    // The lock's counter and owner (its fencing counter outlives it by design).
    let held = async |direct: &mut MultiplexedConnection| -> Vec<String> {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*{k}*")
            .query_async(direct)
            .await
            .unwrap();
        keys.into_iter()
            .filter(|key| !key.ends_with(":fence"))
            .collect()
    };
    let before = held(&mut direct).await;
    assert!(!before.is_empty(), "the lock is in the server");
    let flushed = server
        .command("SCRIPT FLUSH", Duration::from_secs(2))
        .unwrap();
    assert_eq!(flushed, "+OK");
    proxy.set_delay(Duration::from_millis(150));
    let released = guard.release().await;
    println!("s18a inc: the release answered {released:?}");
    let mut left = before;
    for _ in 0..60 {
        left = held(&mut direct).await;
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("s18a inc: the lock's keys left after the release: {left:?}");
    assert!(
        left.is_empty(),
        "the release never ran on the server that lost its scripts: the lock stays for the ttl"
    );
}

/// The fence raise's follow-up, the same way: with fencing, a node that lost its scripts and
/// answers later than the node timeout misses the raise round, and its follow-up re-sent it as
/// a plain `EVALSHA`, refused there with NOSCRIPT after its sender gave up, every round: the
/// node's counter was never raised (the quorum that was raised keeps the order, but one node
/// fewer stands behind it). Each re-send now carries its script, and the counter is raised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_raise_resent_to_a_slow_node_that_lost_its_scripts_runs_there() {
    let Some(binary) = redis_or_skip("s18a fence raise after SCRIPT FLUSH") else {
        return;
    };
    let (servers, proxy, locker) = three_nodes_first_behind_a_proxy(&binary, true).await;
    // Node 0 has lost its scripts and answers 150 ms late: it misses both rounds.
    let flushed = servers[0]
        .command("SCRIPT FLUSH", Duration::from_secs(2))
        .unwrap();
    assert_eq!(flushed, "+OK");
    proxy.set_delay(Duration::from_millis(150));
    let guard = locker.acquire("k").await.unwrap();
    let fence = guard.fencing_token().expect("fencing is on");
    let mut node0 = connect(&servers[0].url()).await;
    let mut raised = fence_counter(&mut node0, "k").await;
    for _ in 0..40 {
        if raised.is_some_and(|raised| raised >= fence) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        raised = fence_counter(&mut node0, "k").await;
    }
    println!("s18a: fence {fence}, node 0's counter {raised:?}");
    assert!(
        raised.is_some_and(|raised| raised >= fence),
        "the raise never ran on the node that lost its scripts: its counter is {raised:?}, the fence {fence}"
    );
    drop(guard);
}

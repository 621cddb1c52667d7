//! The sibling of attack_s17a on the abandon path: a fair waiter over three nodes gives up
//! (its acquisition is cancelled) while the attempt of a round it lost is still on its way to
//! a node whose script cache is empty (restarted empty, or `SCRIPT FLUSH`). The take-back, a
//! self-contained script, lands first and takes the waiter out of that node's line; the
//! attempt, re-sent after NOSCRIPT, lands after it and puts the waiter back, with an entry
//! lease of the ttl. Once the holder there leaves, the key would be reserved for a waiter that
//! is gone, refused to everyone on that node for up to the ttl. The round's late answers are
//! in after the take-back: a node that refused a waiter that has stopped waiting hears it
//! leave again.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::raw::redis::TURN_CHANNEL;
use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::fair::{connect, line_members};
use lock_tests::proxy::LatencyProxy;
use lock_tests::server::{RedisServer, redis_or_skip};

const TTL: Duration = Duration::from_secs(20);
const NODE_TIMEOUT: Duration = Duration::from_millis(500);
/// Each way, on the third node: its NOSCRIPT exchange (five hops) stays within the node timeout.
const DELAY: Duration = Duration::from_millis(50);

/// Each node's line of `k` once a waiter that gave up mid-round had every follow-up's time.
async fn lines_after_giving_up(flush_scripts: bool) -> Option<Vec<Vec<String>>> {
    let binary = redis_or_skip("s17c a cancelled fair waiter's late attempt")?;
    let servers: Vec<RedisServer> = (0..3)
        .map(|_| RedisServer::start(&binary, &[]).unwrap())
        .collect();
    let proxy = LatencyProxy::start(servers[2].port()).await.unwrap();
    let urls = vec![servers[0].url(), servers[1].url(), proxy.url()];
    let mut direct = Vec::new();
    for server in &servers {
        direct.push(connect(&server.url()).await);
    }
    let config = RedlockConfig::new(urls).with_node_timeout(NODE_TIMEOUT);
    // Woken by a turn's message, not by its own polling.
    let retry = RetryPolicy::forever().with_retry_delay(Duration::from_secs(5));
    let locker = Locker::new(Redlock::new(config).unwrap())
        .with_local_queue(false)
        .with_options(LockOptions::default().with_ttl(TTL).with_retry(retry))
        .unwrap();
    // The client's connections are made and its release script is known everywhere.
    locker
        .acquire("warm")
        .await
        .unwrap()
        .release()
        .await
        .unwrap();

    // Another process holds `k` on every node; the client waits in each node's line.
    for connection in &mut direct {
        let _: () = redis::cmd("SET")
            .arg("k")
            .arg("squatter")
            .arg("PX")
            .arg(u64::try_from(TTL.as_millis()).unwrap())
            .query_async(connection)
            .await
            .unwrap();
    }
    let acquiring = locker.clone();
    let waiter = tokio::spawn(async move { acquiring.acquire("k").await.map(|_| ()) });
    for (index, connection) in direct.iter_mut().enumerate() {
        let mut lined = Vec::new();
        for _ in 0..200 {
            lined = line_members(connection, "k").await;
            if !lined.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(lined.len(), 1, "the waiter is not in node {index}'s line");
    }
    let member = line_members(&mut direct[0], "k").await.remove(0);

    // Node 2 is slow and has lost its scripts (the take-back carries its own).
    if flush_scripts {
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut direct[2])
            .await
            .unwrap();
    }
    proxy.set_delay(DELAY);

    // A turn message wakes the waiter: nodes 0 and 1 refuse it at once (the squatter is still
    // there), node 2's answer is a few hops away; the waiter gives up meanwhile.
    let (instance, id) = member.split_at(32);
    let _: i64 = redis::cmd("PUBLISH")
        .arg(format!("{TURN_CHANNEL}{instance}"))
        .arg(id)
        .query_async(&mut direct[0])
        .await
        .unwrap();
    tokio::time::sleep(DELAY / 2).await;
    waiter.abort();
    assert!(waiter.await.is_err(), "the waiter was not cancelled");

    // Every hop of node 2, and the follow-ups (the explorer's allowance: six node timeouts and
    // 700 ms).
    tokio::time::sleep(NODE_TIMEOUT * 6 + Duration::from_millis(700)).await;
    let mut lines = Vec::new();
    for connection in &mut direct {
        lines.push(line_members(connection, "k").await);
    }
    let _ = locker.stop().await;
    println!("s17c (flush {flush_scripts}): waiter {member}; lines after it gave up: {lines:?}");
    Some(lines)
}

/// Fails without the fix: node 2 has the waiter that gave up back in its line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fair_waiter_that_gave_up_is_not_put_back_in_line_by_its_late_attempt() {
    let Some(lines) = lines_after_giving_up(true).await else {
        return;
    };
    assert!(
        lines.iter().all(Vec::is_empty),
        "the waiter gave up, yet a node's line still holds it (per node: {lines:?}): its \
         attempt, re-sent after NOSCRIPT, landed after its take-back"
    );
}

/// The control: with node 2's scripts kept, its attempt lands before the take-back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_without_noscript_a_waiter_that_gave_up_leaves_every_line() {
    let Some(lines) = lines_after_giving_up(false).await else {
        return;
    };
    assert!(lines.iter().all(Vec::is_empty), "control: lines {lines:?}");
}

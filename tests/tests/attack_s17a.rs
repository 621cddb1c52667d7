//! inv17a: the explorer's stray lock of seed 90339 (Redlock over three nodes, 20 s ttl, a node
//! restarted empty), made deterministic.
//!
//! A fair waiter wins on two fast nodes while the third, whose script cache is empty (restarted
//! empty, or `SCRIPT FLUSH`), is still in EVALSHA / NOSCRIPT / SCRIPT LOAD / EVALSHA. The holder
//! releases at once: on the third node the release (its script known there) is written before
//! the acquisition's retried EVALSHA, finds nothing and takes the waiter out of a line it is not
//! in. The retried script then lands while another holds the key there, and puts the waiter
//! back in that node's line (entry lease = the ttl). The release's follow-up sends the release
//! again only to nodes that took the key late or did not answer: a late refusal of a mutex is
//! left alone, so the entry stays. When the other holder releases, the key is reserved for the
//! waiter that is gone (`lock-turn-reserved:<member>`), for the rest of its entry's lease: a key
//! nobody holds, refused to everyone on that node for up to the ttl.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::fair::{connect, line_members, release_as_fair_client, release_fair_source};
use lock_tests::proxy::LatencyProxy;
use lock_tests::server::{RedisServer, redis_or_skip};

const TTL: Duration = Duration::from_secs(20);
const NODE_TIMEOUT: Duration = Duration::from_millis(500);
/// Each way, on the third node: its NOSCRIPT exchange (five hops) stays within the node timeout.
const DELAY: Duration = Duration::from_millis(50);
/// What another process stores on the key.
const SQUATTER: &str = "squatter";

/// What node 2 holds of `k` once a fair waiter that won on nodes 0 and 1 released at once and
/// every follow-up had its time, and then the squatter left node 2: `(value, pttl, line)`.
async fn left_on_the_slow_node(flush_scripts: bool) -> Option<(Option<String>, i64, Vec<String>)> {
    let binary = redis_or_skip("s17a a late fair attempt re-joins the line")?;
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
    // Woken by the turn's message, not by its own polling (which could reload the script).
    let retry = RetryPolicy::forever()
        .with_retry_delay(Duration::from_secs(5))
        .with_deadline(Duration::from_secs(15));
    let locker = Locker::new(Redlock::new(config).unwrap())
        .with_local_queue(false)
        .with_options(LockOptions::default().with_ttl(TTL).with_retry(retry))
        .unwrap();

    // The release script, known to every node (and its source is lock-redlock's).
    locker
        .acquire("warm")
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    let sha = redis::Script::new(&release_fair_source())
        .get_hash()
        .to_owned();
    let known: Vec<bool> = redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(&sha)
        .query_async(&mut direct[0])
        .await
        .unwrap();
    assert_eq!(
        known,
        [true],
        "the release script's source differs from lock-redlock's"
    );

    // Another process holds `k` on every node; the client waits in each node's line.
    for connection in &mut direct {
        let _: () = redis::cmd("SET")
            .arg("k")
            .arg(SQUATTER)
            .arg("PX")
            .arg(u64::try_from(TTL.as_millis()).unwrap())
            .query_async(connection)
            .await
            .unwrap();
    }
    let waiter = tokio::spawn(async move {
        let guard = locker.acquire("k").await.unwrap();
        guard.release().await.unwrap();
        locker
    });
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

    // Node 2 is slow and has lost its acquisition script (as after an empty restart), not its
    // release script.
    if flush_scripts {
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut direct[2])
            .await
            .unwrap();
        let loaded: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(release_fair_source())
            .query_async(&mut direct[2])
            .await
            .unwrap();
        assert_eq!(loaded, sha);
    }
    proxy.set_delay(DELAY);

    // The squatter leaves nodes 1 and 0, and stays on node 2 a while longer: on node 1 without
    // a word, then on node 0 as a fair client would (the turn passes to the waiter, who is
    // woken), so that the waiter's next attempt finds the key free on both.
    let deleted: i64 = redis::cmd("DEL")
        .arg("k")
        .query_async(&mut direct[1])
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    assert_eq!(
        release_as_fair_client(&mut direct[0], "k", SQUATTER).await,
        1
    );
    let locker = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter was not served")
        .unwrap();
    // Every hop of node 2, and the release's follow-up (the explorer's allowance: six node
    // timeouts and 700 ms).
    tokio::time::sleep(NODE_TIMEOUT * 6 + Duration::from_millis(700)).await;
    let line_before = line_members(&mut direct[2], "k").await;
    assert_eq!(
        release_as_fair_client(&mut direct[2], "k", SQUATTER).await,
        1
    );
    let value: Option<String> = redis::cmd("GET")
        .arg("k")
        .query_async(&mut direct[2])
        .await
        .unwrap();
    let pttl: i64 = redis::cmd("PTTL")
        .arg("k")
        .query_async(&mut direct[2])
        .await
        .unwrap();
    let _ = locker.stop().await;
    println!(
        "s17a (flush {flush_scripts}): waiter {member}; node 2's line after the release and its \
         follow-up: {line_before:?}; `k` after the squatter left: {value:?} (pttl {pttl})"
    );
    Some((value, pttl, line_before))
}

/// Fails on main: node 2 keeps the waiter that already won and released in its line, and
/// reserves the key for it once the other holder leaves, for most of the ttl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_fair_waiter_is_not_put_back_in_line_by_its_late_attempt() {
    let Some((value, pttl, line)) = left_on_the_slow_node(true).await else {
        return;
    };
    assert!(
        value.is_none() && line.is_empty(),
        "node 2: the waiter's acquisition returned and its lock was released, yet its late \
         attempt (NOSCRIPT, reloaded, retried after the release) put it back in the line \
         ({line:?}), and `k` is now {value:?} for {pttl} ms of the {TTL:?} ttl, though nobody \
         holds or waits for it"
    );
}

/// The control: the same schedule with node 2's scripts kept (its attempt answers before the
/// release arrives) leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_without_noscript_the_waiter_leaves_every_line() {
    let Some((value, pttl, line)) = left_on_the_slow_node(false).await else {
        return;
    };
    assert!(
        value.is_none() && line.is_empty(),
        "control: node 2 holds `k` = {value:?} (pttl {pttl}), line {line:?}"
    );
}

//! Attacks on the wake registry's reconnect path (423bf33: `WakeRegistry::wake_all` keeps the
//! channels after a lost connection and marks them to be subscribed again), over three Redlock
//! nodes with wake-ups on (their default, 5ed6751). Every client is its own backend instance.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::fair::waiting;
use lock_tests::nodes::Nodes;

/// A client of its own on `urls` with the configuration's defaults (wake-ups on: 3 nodes).
fn client(urls: &[String], retry: RetryPolicy) -> Locker {
    let config = RedlockConfig::new(urls.to_vec()).with_node_timeout(Duration::from_millis(300));
    Locker::from_arc(Arc::new(Redlock::new(config).expect("redlock")))
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(10))
                .with_retry(retry),
        )
        .expect("options")
}

/// How long after the holder's release a waiter (retry delay 5 s: only a wake-up ends its
/// wait sooner) won `key`, when the pub/sub connections of the nodes in `kill` were killed
/// while it waited.
async fn woken_after_loss(
    nodes: &Nodes,
    waiter: &Locker,
    key: &'static str,
    kill: &[usize],
) -> Duration {
    let urls = nodes.urls().to_vec();
    let holder = client(&urls, RetryPolicy::none());
    let guard = holder.acquire(key).await.unwrap();
    let task = {
        let waiter = waiter.clone();
        tokio::spawn(async move {
            let guard = waiter.acquire(key).await.unwrap();
            let won = tokio::time::Instant::now();
            guard.release().await.unwrap();
            won
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    for &node in kill {
        nodes.servers[node]
            .command("CLIENT KILL TYPE pubsub", Duration::from_millis(500))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // The waiter is woken by the loss, asks again, finds the key held and waits anew.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let released = tokio::time::Instant::now();
    guard.release().await.unwrap();
    let won = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("won")
        .unwrap();
    holder.stop().await.unwrap();
    won - released
}

/// Held: after its pub/sub connection to one node is lost (killed), round after round on the
/// same key (whose registry entry `wake_all` now keeps), a waiter subscribes again and is
/// woken by the next release within a fraction of its 5 s delay. Held on the base main in
/// 4 runs of 5 (one run, under a load average of 30, won 5.0 s after the release in its first
/// round: the release was not heard); 3 of 3 with the fix of 7af4871 (a lost connection while
/// others are up wakes nobody). Negative control of the pair: with the core's early-wake
/// guard lifted (`early_wakes >= 100`) the test below passes on main.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_still_wakes_after_repeated_losses_of_one_node() {
    let nodes = Nodes::start().await;
    let waiter = client(&nodes.urls(), waiting(Duration::from_secs(5)));
    let mut took = Vec::new();
    for _ in 0..4 {
        took.push(woken_after_loss(&nodes, &waiter, "one-node", &[0]).await);
    }
    waiter.stop().await.unwrap();
    assert!(
        took.iter().all(|took| *took < Duration::from_secs(1)),
        "from release to win: {took:?}"
    );
}

/// Promised (`lock-redlock` `wake.rs`: waiters "retry as soon as a message arrives"; 423bf33:
/// after a lost connection "the next waiter of every channel subscribe[s] again"): a waiter
/// whose pub/sub connections were lost (here: two nodes' connections killed 150 ms apart, as
/// a flapping network does) subscribes again and is woken by the next release, within a
/// fraction of its 5 s delay — as it is after one loss (the test above).
///
/// Broken on main: each node's reader calls `wake_all` when it finds its connection gone, and
/// every such wake-up is an "early wake" for the core's retry loop; after two in a row that
/// were followed by an attempt that still found the key held, the loop sleeps its whole next
/// delay without listening (`early_wakes >= 2`, a guard against backends that never wait).
/// The release that comes during that sleep is announced and delivered, but nobody listens:
/// the waiter wins 4.5 s after it (the rest of its delay), every round. (Seen flaky with
/// all three nodes killed at once: 2 of 4 rounds took 4.5 s.) Within the documented bound ("a
/// missed message costs one retry delay at most"), but no message was missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_still_wakes_after_two_nodes_lost_their_connections() {
    let nodes = Nodes::start().await;
    let waiter = client(&nodes.urls(), waiting(Duration::from_secs(5)));
    let mut took = Vec::new();
    for _ in 0..2 {
        took.push(woken_after_loss(&nodes, &waiter, "two-nodes", &[0, 1]).await);
    }
    waiter.stop().await.unwrap();
    assert!(
        took.iter().all(|took| *took < Duration::from_secs(1)),
        "from release to win: {took:?}"
    );
}

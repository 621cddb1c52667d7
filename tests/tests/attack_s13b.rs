//! Attacks on the wake registry's reconnect path (423bf33: `WakeRegistry::wake_all` keeps the
//! channels after a lost connection and marks them to be subscribed again), over three Redlock
//! nodes with wake-ups on (their default, 5ed6751) and `fair` off; and the same faults on the
//! fair line's subscriptions (`fair`, the default since a6c832c). Every client is its own
//! backend instance.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::fair::waiting;
use lock_tests::nodes::Nodes;

/// A client of its own on `urls` with the configuration's defaults (wake-ups on: 3 nodes), and
/// `fair` off: waiters woken by every release.
fn client(urls: &[String], retry: RetryPolicy) -> Locker {
    client_with(urls, retry, false)
}

/// As [`client`], `fair` as given.
fn client_with(urls: &[String], retry: RetryPolicy, fair: bool) -> Locker {
    let config = RedlockConfig::new(urls.to_vec())
        .with_node_timeout(Duration::from_millis(300))
        .with_fair(fair);
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
    let holder = client_with(&urls, RetryPolicy::none(), waiter.capabilities().fair);
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

/// The same two losses on a fair waiter's subscriptions (the turn channel, subscribed on every
/// node): a connection lost while another is up wakes nobody (each node announces the turn),
/// so the waiter keeps listening and is woken by the release's turn. Before (a6c832c) each
/// loss woke every waiter, the two early wakes made the retry loop sleep a whole delay deaf to
/// turns, and the waiter won 4.35 s after the release, every round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fair_waiter_still_wakes_after_two_nodes_lost_their_connections() {
    let nodes = Nodes::start().await;
    let waiter = client_with(&nodes.urls(), waiting(Duration::from_secs(5)), true);
    let mut took = Vec::new();
    for _ in 0..2 {
        took.push(woken_after_loss(&nodes, &waiter, "two-nodes-fair", &[0, 1]).await);
    }
    waiter.stop().await.unwrap();
    assert!(
        took.iter().all(|took| *took < Duration::from_secs(1)),
        "from release to win: {took:?}"
    );
}

/// A fair waiter whose turn one node keeps for it (its attempt took that node, where the
/// holder's key was missing, and the others refused it: `line_keep.lua`) is woken only by the
/// other nodes' turns. When those nodes' pub/sub connections are lost while it waits, they are
/// subscribed again at once in the background, so the release's turns still reach it within
/// a fraction of its 5 s delay. Before, the lost connections were remade only by the waiter's
/// next attempt, and it slept its delay out (seen flaky in
/// `a_fair_waiter_still_wakes_after_two_nodes_lost_their_connections`, 3.9 s, when the
/// previous round's release reached the third node after the next holder's `SET NX`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fair_waiter_whose_turn_one_node_keeps_hears_the_others_after_losing_them() {
    let nodes = Nodes::start().await;
    let urls = nodes.urls().to_vec();
    let waiter = client_with(&urls, waiting(Duration::from_secs(5)), true);
    let holder = client_with(&urls, RetryPolicy::none(), true);
    let guard = holder.acquire("kept").await.unwrap();
    // The holder's key is missing on the third node (held on a quorum all the same), once the
    // acquisition's request to it, which may still be in flight, has landed.
    tokio::time::sleep(Duration::from_millis(100)).await;
    nodes.servers[2]
        .command("DEL kept", Duration::from_millis(500))
        .unwrap();
    let task = tokio::spawn(async move {
        let guard = waiter.acquire("kept").await.unwrap();
        let won = tokio::time::Instant::now();
        guard.release().await.unwrap();
        waiter.stop().await.unwrap();
        won
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kept = nodes.get(2, b"kept").unwrap_or_default();
    assert!(
        kept.starts_with(b"lock-turn-reserved:"),
        "the third node keeps the waiter's turn: {:?}",
        String::from_utf8_lossy(&kept)
    );
    for node in [0, 1] {
        nodes.servers[node]
            .command("CLIENT KILL TYPE pubsub", Duration::from_millis(500))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let released = tokio::time::Instant::now();
    guard.release().await.unwrap();
    let won = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("won")
        .unwrap();
    holder.stop().await.unwrap();
    let took = won - released;
    assert!(
        took < Duration::from_secs(1),
        "from release to win: {took:?}"
    );
}

/// A waiter (`fair` off) whose pub/sub connections to the two nodes holding the key are lost
/// while it waits: the holder's key is missing on the third node (a quorum holds it all the
/// same), so its release is announced on the two lost nodes only. They are connected and
/// subscribed again at once in the background, and the release still reaches the waiter within
/// a fraction of its 5 s delay.
///
/// Broken before: a loss while another connection was up only had the *next* waiters
/// subscribe again, on the assumption that the one still up hears every release; the waiter
/// slept out its delay (seen flaky under load in
/// `a_waiter_still_wakes_after_two_nodes_lost_their_connections`, 3.9 s, when the waiter's
/// first attempt took the third node before the holder's `SET` reached it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_hears_a_release_announced_only_on_the_nodes_it_lost() {
    let nodes = Nodes::start().await;
    let urls = nodes.urls().to_vec();
    let waiter = client(&urls, waiting(Duration::from_secs(5)));
    let holder = client(&urls, RetryPolicy::none());
    let guard = holder.acquire("missing-on-third").await.unwrap();
    // Once the acquisition's request to the third node, which may still be in flight, landed.
    tokio::time::sleep(Duration::from_millis(100)).await;
    nodes.servers[2]
        .command("DEL missing-on-third", Duration::from_millis(500))
        .unwrap();
    // The third node is free: the waiter's attempts take it and give it back, so a key that
    // stays there would be the waiter's (it is not: checked below).
    let task = tokio::spawn(async move {
        let guard = waiter.acquire("missing-on-third").await.unwrap();
        let won = tokio::time::Instant::now();
        guard.release().await.unwrap();
        waiter.stop().await.unwrap();
        won
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    for node in [0, 1] {
        nodes.servers[node]
            .command("CLIENT KILL TYPE pubsub", Duration::from_millis(500))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        nodes.get(2, b"missing-on-third"),
        None,
        "the third node is free while the waiter waits"
    );
    let released = tokio::time::Instant::now();
    guard.release().await.unwrap();
    let won = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("won")
        .unwrap();
    holder.stop().await.unwrap();
    let took = won - released;
    assert!(
        took < Duration::from_secs(1),
        "from release to win: {took:?}"
    );
}

//! Session 15's checks: what a client leaves open on the server when it is dropped without
//! `stop`, on each Redis store (one node, three Redlock nodes, inc on one server and on a
//! Cluster). Dropping a value frees what it holds: a dropped client's connections (commands and
//! pub/sub alike) are closed within a moment, as `stop` closes them.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::RetryPolicy;
use lock_tests::fair::{Store, Target, waiting};
use lock_tests::server::connections;
use tokio::time::Instant;

/// The connections every server of `target` has open, but for the ones that ask.
async fn connections_of(target: &Target) -> usize {
    let mut open = 0;
    for server in &target.servers {
        open += connections(server.port()).await;
    }
    open
}

/// Drops a client that held a key and waited for one (so that every connection it opens by
/// default, pub/sub included, was opened), then checks that the servers are back to the
/// connections they had before it, within two seconds.
async fn a_dropped_client_closes_its_connections(store: Store) {
    let Some(target) = Target::start(store, "attack_s15").await else {
        return;
    };
    let before = connections_of(&target).await;
    let ttl = Duration::from_secs(10);
    // Fair (inc's opt-in) so that the waiter opens its pub/sub connection too.
    let fair = true;
    let holder = target.locker(fair, ttl, RetryPolicy::none()).await;
    let waiter = target
        .locker(fair, ttl, waiting(Duration::from_millis(20)))
        .await;
    let guard = holder.acquire("dropped").await.unwrap();
    let task = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.acquire("dropped").await.unwrap().release().await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    guard.release().await.unwrap();
    task.await.unwrap().unwrap();
    let during = connections_of(&target).await;
    assert!(
        during > before,
        "the clients opened no connection ({before} before, {during} with them): the check \
         below would prove nothing"
    );
    drop((holder, waiter));
    let until = Instant::now() + Duration::from_secs(2);
    let mut after = connections_of(&target).await;
    while after > before && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = connections_of(&target).await;
    }
    assert_eq!(
        after, before,
        "{store:?}: {after} connections 2 s after the clients were dropped, {before} before \
         them ({during} while they ran)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_client_closes_its_connections_redis() {
    a_dropped_client_closes_its_connections(Store::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_client_closes_its_connections_redlock_three_nodes() {
    a_dropped_client_closes_its_connections(Store::Redlock3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_client_closes_its_connections_inc() {
    a_dropped_client_closes_its_connections(Store::Inc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_client_closes_its_connections_inc_cluster() {
    a_dropped_client_closes_its_connections(Store::IncCluster).await;
}

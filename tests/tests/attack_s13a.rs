//! Attacks on the courtesy (9e52d96, `Locker::with_courtesy`, on by default) and on pub/sub
//! wake-ups on by default over several Redlock nodes (5ed6751). Every client is its own backend
//! instance (a process of its own, as far as the servers can tell).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::fair::waiting;
use lock_tests::nodes::Nodes;
use lock_tests::server::client_list;

/// The connections open on each server (`CLIENT LIST`, the asking one left out; a pub/sub
/// connection whose channels were all unsubscribed is no longer of type `pubsub`).
async fn clients(ports: &[u16]) -> Vec<Vec<String>> {
    let mut all = Vec::new();
    for port in ports {
        all.push(client_list(*port).await);
    }
    all
}

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

/// A waiter on `key` woken by the holder's release; returns the waiter (dropped by the caller).
async fn waited_once(urls: &[String], key: &'static str) -> Locker {
    let holder = client(urls, RetryPolicy::none());
    let waiter = client(urls, waiting(Duration::from_secs(2)));
    let guard = holder.acquire(key).await.unwrap();
    let task = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.acquire(key).await.unwrap().release().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    guard.release().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("woken")
        .unwrap()
        .unwrap();
    holder.stop().await.unwrap();
    waiter
}

/// Promised (5f891cc/attack_s12b, `Wakeups`'s `Drop`: "Dropped without `close` (a client
/// dropped without `shutdown`), the pub/sub connections close too"): a Redlock client over
/// three nodes — wake-ups on by default now — dropped without `stop` leaves no pub/sub
/// connection on the servers, whatever one node does.
///
/// Broken on main: when the last waiter of a channel leaves, a task spawned for the linger
/// (`LINGER`, 2 s) holds an `Arc` of the client's `Wakeups` and then sends `UNSUBSCRIBE` to
/// each node in turn, with no timeout. One node black-holed (accepts bytes, answers nothing)
/// and that task never ends: the `Wakeups` is never dropped, so the readers of the *healthy*
/// nodes are never aborted and their pub/sub connections stay open for good after the client
/// was dropped. The control (no black hole) leaves nothing after the linger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_client_leaves_no_pub_sub_connection_with_a_node_black_holed() {
    let nodes = Nodes::start().await;
    let urls = nodes.urls().to_vec();
    let healthy = [nodes.servers[0].port(), nodes.servers[1].port()];

    // Control: the linger ends, the dropped client's connections close.
    let waiter = waited_once(&urls, "control").await;
    drop(waiter);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let left = clients(&healthy).await;
    assert!(
        left.iter().all(Vec::is_empty),
        "control: connections after the drop: {left:?}"
    );

    // The third node black-holed after the wait: the linger's UNSUBSCRIBE to it never returns.
    let waiter = waited_once(&urls, "black-holed").await;
    nodes.proxy.black_hole();
    drop(waiter);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let left = clients(&healthy).await;
    nodes.proxy.set_delay(Duration::ZERO);
    assert!(
        left.iter().all(Vec::is_empty),
        "connections on the healthy nodes 6 s after the client was dropped: {left:?}"
    );
}

/// How long `cycles` RAII cycles (`acquire`, then drop the guard) of one task of a client alone
/// on three nodes take, with the default policy's shape (200 ms delay, no jitter).
async fn raii_cycles(urls: &[String], courtesy: bool, cycles: usize) -> Duration {
    let locker = client(
        urls,
        RetryPolicy::default().with_retry_jitter(Duration::ZERO),
    )
    .with_courtesy(courtesy);
    let started = tokio::time::Instant::now();
    for _ in 0..cycles {
        let _guard = locker.acquire("raii").await.unwrap();
    }
    let took = started.elapsed();
    locker.stop().await.unwrap();
    took
}

/// Promised (9e52d96, README: the courtesy is paid by "a client that won a key after finding
/// it held"; "uncontended cycles never pay it"): a client alone on three nodes (wake-ups on by
/// default), one task, one acquisition after another with its guard dropped at the end of its
/// scope, sleeps no courtesy delay.
///
/// Broken on main: the dropped guard releases on a spawned task; the next acquisition often
/// finds the key still held by that very release, is woken by it and wins "after contention",
/// so the following acquisition sleeps one delay (200 ms) before asking for a key nobody else
/// wants. The control (courtesy off) runs the same cycles without those sleeps. See
/// `lock-core/tests/attack_s13a.rs` for the deterministic version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_client_dropping_its_guards_pays_no_courtesy_on_three_nodes() {
    let nodes = Nodes::start().await;
    let urls = nodes.urls().to_vec();
    let control = raii_cycles(&urls, false, 20).await;
    let by_default = raii_cycles(&urls, true, 20).await;
    println!("20 RAII cycles: courtesy off {control:?}, by default {by_default:?}");
    assert!(
        by_default < control + Duration::from_millis(400),
        "a lone client's RAII cycles took {by_default:?} (control: {control:?})"
    );
}

/// The `lock-released:` channels subscribed on the server at `url` now.
fn release_channels(url: &str) -> Vec<String> {
    let mut connection = redis::Client::open(url).unwrap().get_connection().unwrap();
    redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg("lock-released:*")
        .query(&mut connection)
        .unwrap()
}

/// Ten waiters of one client, each on a key of its own, woken by the holder's releases; then,
/// if `kill`, the third node's pub/sub connections are killed while the subscriptions linger.
/// The release channels subscribed on the first node 4 s later.
async fn lingering_after(nodes: &Nodes, kill: bool) -> Vec<String> {
    let urls = nodes.urls().to_vec();
    let holder = client(&urls, RetryPolicy::none());
    let waiter = client(&urls, waiting(Duration::from_secs(2)));
    let keys: Vec<String> = (0..10).map(|i| format!("many-{kill}-{i}")).collect();
    let mut guards = Vec::new();
    for key in &keys {
        guards.push(holder.acquire(key).await.unwrap());
    }
    let tasks: Vec<_> = keys
        .iter()
        .map(|key| {
            let (waiter, key) = (waiter.clone(), key.clone());
            tokio::spawn(async move { waiter.acquire(&key).await.unwrap().release().await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for guard in guards {
        guard.release().await.unwrap();
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("woken")
            .unwrap()
            .unwrap();
    }
    // Every wait is over; the subscriptions linger (2 s) before they are retired.
    if kill {
        nodes.servers[2]
            .command("CLIENT KILL TYPE pubsub", Duration::from_millis(500))
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let left = release_channels(&nodes.servers[0].url());
    holder.stop().await.unwrap();
    waiter.stop().await.unwrap();
    left
}

/// Promised (`WakeRegistry`: "when its last waiter leaves, the subscription lingers a little
/// (`LINGER`)" and is then retired; wake-ups on by default over several nodes, 5ed6751):
/// a channel nobody waits on any more is unsubscribed on every node after the linger, also
/// when one node's pub/sub connection was lost (a node restarted, a connection killed) —
/// otherwise subscriptions grow with every key ever waited on.
///
/// Broken on main: a lost connection makes the registry forget every channel (`wake_all`
/// drains it); the lingering retirements then find no entry and never `UNSUBSCRIBE`, so the
/// channels of every key waited on lately stay subscribed on the *healthy* nodes for the
/// client's lifetime (10 of 10 here), and every later release of those keys is delivered to
/// it. The control (no connection lost) leaves none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_leaves_no_subscription_behind_on_the_other_nodes() {
    let nodes = Nodes::start().await;
    let control = lingering_after(&nodes, false).await;
    assert!(control.is_empty(), "control: {control:?}");
    let left = lingering_after(&nodes, true).await;
    assert!(
        left.is_empty(),
        "still subscribed on a healthy node after the linger: {} channels {left:?}",
        left.len()
    );
}

/// Cycles (acquire, release) that `tasks` tasks of one client alone on three nodes complete
/// in 2 s on one key, with the default policy's shape (200 ms delay, no jitter).
async fn lone_client_throughput(urls: &[String], courtesy: bool, tasks: usize) -> usize {
    let locker = client(
        urls,
        RetryPolicy::default().with_retry_jitter(Duration::ZERO),
    )
    .with_courtesy(courtesy);
    let key = if courtesy { "tasks-on" } else { "tasks-off" };
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    let workers: Vec<_> = (0..tasks)
        .map(|_| {
            let locker = locker.clone();
            tokio::spawn(async move {
                let mut cycles = 0;
                while tokio::time::Instant::now() < until {
                    if let Ok(guard) = locker.acquire(key).await {
                        guard.release().await.unwrap();
                        cycles += 1;
                    }
                }
                cycles
            })
        })
        .collect();
    let mut total = 0;
    for worker in workers {
        total += worker.await.unwrap();
    }
    locker.stop().await.unwrap();
    total
}

/// Promised (9e52d96: a courtesy "to other processes"; README: the courtesy keeps "the waits
/// of other processes short"; `with_courtesy`: off, "a client that releases and asks again
/// keeps winning, which is the most throughput and the longest tail of waits elsewhere"):
/// a client alone on the store, whose tasks contend only with each other, keeps its
/// throughput: there is no elsewhere to be courteous to.
///
/// Broken on main: with the default policy's shape (counted retries: its tasks do not line up
/// in the in-process queue), every task that won after finding the key held by a sibling task
/// sleeps a whole delay (200 ms) before its next acquisition; with four tasks and short
/// sections, all of them are soon asleep at once and the key idles. The control (courtesy
/// off) runs several times more cycles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_client_with_several_tasks_keeps_its_throughput() {
    let nodes = Nodes::start().await;
    let urls = nodes.urls().to_vec();
    let control = lone_client_throughput(&urls, false, 4).await;
    let by_default = lone_client_throughput(&urls, true, 4).await;
    println!("cycles in 2 s, 4 tasks: courtesy off {control}, by default {by_default}");
    assert!(
        by_default * 2 >= control,
        "a lone client's 4 tasks ran {by_default} cycles in 2 s (control: {control})"
    );
}

/// Held (5ed6751: wake-ups on by default with several nodes): a client that waited, then
/// `stop`ped but kept alive (a client held in a long-lived structure), leaves no connection on
/// the nodes — its pub/sub connections close with `stop`, not only when it is dropped, and a
/// subscription's linger after `stop` opens nothing again. Checked by a negative control:
/// with `Wakeups::close` left out of the backend's `shutdown`, both pub/sub connections stayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_client_kept_alive_leaves_no_connection() {
    let nodes = Nodes::start().await;
    let urls = nodes.urls().to_vec();
    let waiter = waited_once(&urls, "stopped").await;
    waiter.stop().await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await; // past the linger
    let healthy = [nodes.servers[0].port(), nodes.servers[1].port()];
    let left = clients(&healthy).await;
    assert!(
        left.iter().all(Vec::is_empty),
        "connections of a stopped client: {left:?}"
    );
    drop(waiter);
}

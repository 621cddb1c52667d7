//! One pub/sub connection per Redlock node for the whole client: the channel of its fair
//! turns (`lock-turn:<client>`) and the release channels of its other waiters (semaphores,
//! read-write locks, multi-key locks, `fair` off) share it, with one reader that connects
//! again after a loss, every second while anyone waits, and wakes the waiters of what it
//! subscribes again after an outage. Three nodes, the second and third behind `Gate`s.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_tests::fair::waiting;
use lock_tests::pubsub::{
    Gated, foreign, kill_pubsub, pubsub_clients, redlock_client, settle, wait_for, won_after,
};

/// A fair client (the default) with wake-ups on releases too, a ttl of 10 s.
fn fair_client(urls: &[String], retry: RetryPolicy) -> Locker {
    redlock_client(urls, retry, true, true)
}

/// Promised (a fair waiter is woken by the turn message of any node that passes it the turn):
/// a fair waiter whose pub/sub connections to two nodes were lost while those nodes could not
/// be reached for a second hears its turn from them once they are back, without waiting for
/// its fallback poll (2.5 s here: a quarter of the ttl). The first node holds the key for
/// someone else, so only the other two pass the turn.
///
/// Broken before: the turns' reader tried once to connect again within a second, then gave
/// up, and the waiter's next attempt (at its poll) subscribed again: 0.9–1 s from release to
/// win (its poll), against a few ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fair_waiter_hears_its_turn_from_nodes_back_after_an_outage() {
    let nodes = Gated::start().await;
    let direct = nodes.direct();
    foreign(&direct[0], "turn");
    let holder = fair_client(&direct, RetryPolicy::none());
    let guard = holder.acquire("turn").await.unwrap();
    let waiter = fair_client(&nodes.urls(), waiting(Duration::from_secs(5)));
    let task = wait_for(&waiter, "turn");
    // Lined up and listening on every node.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for gate in &nodes.gates {
        gate.set_down(true);
    }
    kill_pubsub(&direct[1]);
    kill_pubsub(&direct[2]);
    tokio::time::sleep(Duration::from_millis(800)).await;
    for gate in &nodes.gates {
        gate.set_down(false);
    }
    // The reader's next try (a second after its failed one) is due meanwhile.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let released = tokio::time::Instant::now();
    guard.release().await.unwrap();
    let took = won_after(task, released).await;
    waiter.stop().await.unwrap();
    holder.stop().await.unwrap();
    assert!(
        took < Duration::from_millis(500),
        "from release to win: {took:?}"
    );
}

/// Promised (one pub/sub connection per node for the whole client): a fair client whose
/// waiters wait for a mutex's turn and for a semaphore's release at once keeps one pub/sub
/// connection to each node, and none once stopped.
///
/// Broken before: the turns and the releases had a connection each (two per node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turns_and_releases_share_one_connection_per_node() {
    let nodes = Gated::start().await;
    let direct = nodes.direct();
    let holder = fair_client(&direct, RetryPolicy::none());
    let mutex = holder.acquire("mutex").await.unwrap();
    let permit = holder.acquire_permit("permits", 1).await.unwrap();
    let waiter = fair_client(&direct, waiting(Duration::from_secs(5)));
    let waits = [("mutex", None), ("permits", Some(1))].map(|(key, permits)| {
        let waiter = waiter.clone();
        tokio::spawn(async move {
            let guard = match permits {
                None => waiter.acquire(key).await,
                Some(permits) => waiter.acquire_permit(key, permits).await,
            };
            guard.unwrap().release().await.unwrap();
        })
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    for url in &direct {
        assert_eq!(
            settle(1, || pubsub_clients(url)).await,
            1,
            "pub/sub connections to {url} while a turn and a release are awaited"
        );
    }
    mutex.release().await.unwrap();
    permit.release().await.unwrap();
    for wait in waits {
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .expect("both waiters won")
            .unwrap();
    }
    waiter.stop().await.unwrap();
    holder.stop().await.unwrap();
    for url in &direct {
        assert_eq!(
            settle(0, || pubsub_clients(url)).await,
            0,
            "after stop: {url}"
        );
    }
}

/// Promised (one pub/sub connection for the whole client, as Redlock): an inc client with
/// `fair` and `wake_on_release` whose waiters wait for a mutex's turn and a semaphore's release
/// at once keeps one pub/sub connection, and none once stopped; both waiters still win.
///
/// Broken before: the turns and the releases had a subscriber connection each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_turns_and_releases_share_one_connection() {
    let servers = lock_tests::backed::start_servers(1);
    let url = servers[0].url();
    let client = || async {
        let lock = lock_inc::IncLock::connect(
            lock_inc::IncConfig::new(url.clone())
                .with_fair(true)
                .with_wake_on_release(true),
        )
        .await
        .expect("inc connects");
        Locker::new(lock)
            .with_options(
                LockOptions::default()
                    .with_ttl(Duration::from_secs(10))
                    .with_retry(waiting(Duration::from_secs(5))),
            )
            .expect("options")
    };
    let holder = client().await;
    let mutex = holder.acquire("mutex").await.unwrap();
    let permit = holder.acquire_permit("permits", 1).await.unwrap();
    let waiter = client().await;
    let waits = [("mutex", None), ("permits", Some(1))].map(|(key, permits)| {
        let waiter = waiter.clone();
        tokio::spawn(async move {
            let guard = match permits {
                None => waiter.acquire(key).await,
                Some(permits) => waiter.acquire_permit(key, permits).await,
            };
            guard.unwrap().release().await.unwrap();
            tokio::time::Instant::now()
        })
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        settle(1, || pubsub_clients(&url)).await,
        1,
        "pub/sub connections while a turn and a release are awaited"
    );
    let released = tokio::time::Instant::now();
    mutex.release().await.unwrap();
    permit.release().await.unwrap();
    for wait in waits {
        let won = tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .expect("both waiters won")
            .unwrap();
        assert!(
            won - released < Duration::from_secs(1),
            "woken {:?} after the release",
            won - released
        );
    }
    waiter.stop().await.unwrap();
    holder.stop().await.unwrap();
    assert_eq!(settle(0, || pubsub_clients(&url)).await, 0, "after stop");
}

/// Promised (`fair`: a node that does not answer is left alone for 5 s, so that it does not
/// hold every attempt for the node timeout), also when the node's connection was made by a
/// release waiter and carries no turn channel yet: the node then stops answering (its
/// connection stays open), and the fair waiters' hand-offs do not each wait for their
/// `SUBSCRIBE` there.
///
/// Broken before the fix: the turn channel's `SUBSCRIBE` on a connection already up set no
/// cooldown when it went unanswered, and every hand-off waited the 300 ms node timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_answering_on_a_release_connection_does_not_slow_fair_hand_offs() {
    let nodes = lock_tests::nodes::Nodes::start().await;
    let urls = nodes.urls();
    let holder = fair_client(&urls, RetryPolicy::none());
    let waiter = fair_client(&urls, waiting(Duration::from_secs(2)));
    // The waiter's client connects to every node for a semaphore's release first.
    let permit = holder.acquire_permit("permits", 1).await.unwrap();
    let wait = {
        let waiter = waiter.clone();
        tokio::spawn(async move {
            let guard = waiter.acquire_permit("permits", 1).await.unwrap();
            guard.release().await.unwrap();
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    permit.release().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .expect("the permit's waiter won")
        .unwrap();
    nodes.proxy.black_hole();
    let mut hand_offs = Vec::new();
    for _ in 0..4 {
        let guard = holder.acquire("k").await.unwrap();
        let task = wait_for(&waiter, "k");
        tokio::time::sleep(Duration::from_millis(700)).await;
        let released = tokio::time::Instant::now();
        guard.release().await.unwrap();
        hand_offs.push(won_after(task, released).await);
    }
    println!("hand-offs with a node that stopped answering: {hand_offs:?}");
    // One may retry the node once its cooldown is over on a slow run; the others must not.
    let mut sorted = hand_offs.clone();
    sorted.sort();
    assert!(
        sorted[sorted.len() - 2] < Duration::from_millis(250),
        "hand-offs waited for the node: {hand_offs:?}"
    );
}

/// Promised (a channel the server refuses is a lost message for its waiters, not for the
/// others): a fair client whose user may subscribe its turn channel but no release channel
/// still hears its turns while one of its waiters waits for a semaphore's release on the
/// same connection.
///
/// Broken before the fix: the connection subscribed every channel in one `SUBSCRIBE`, which
/// the server refuses as a whole when it refuses one channel: the turn channel was never
/// subscribed, and the fair waiter won at its fallback poll (about 2.5 s after the release).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_release_channel_does_not_take_the_turn_channel_with_it() {
    let servers = lock_tests::backed::start_servers(1);
    let command = "ACL SETUSER app on >app-secret ~* &lock-turn:* +@all";
    assert_eq!(
        servers[0]
            .command(command, lock_tests::pubsub::PROBE)
            .expect("ACL SETUSER"),
        "+OK"
    );
    let full = [servers[0].url()];
    let app = [format!(
        "redis://app:app-secret@127.0.0.1:{}/",
        servers[0].port()
    )];
    let holder = redlock_client(&full, RetryPolicy::none(), true, true);
    let mutex = holder.acquire("mutex").await.unwrap();
    let permit = holder.acquire_permit("permits", 1).await.unwrap();
    let waiter = redlock_client(&app, waiting(Duration::from_secs(5)), true, true);
    let permit_wait = {
        let waiter = waiter.clone();
        tokio::spawn(async move {
            let guard = waiter.acquire_permit("permits", 1).await.unwrap();
            guard.release().await.unwrap();
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let task = wait_for(&waiter, "mutex");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let released = tokio::time::Instant::now();
    mutex.release().await.unwrap();
    let took = won_after(task, released).await;
    permit.release().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), permit_wait)
        .await
        .expect("the permit's waiter won (by its retry delay)")
        .unwrap();
    waiter.stop().await.unwrap();
    holder.stop().await.unwrap();
    assert!(
        took < Duration::from_millis(500),
        "from release to win: {took:?}"
    );
}

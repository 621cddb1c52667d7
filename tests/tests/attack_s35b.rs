//! Attacks on the Redlock wake-up reader's reconnect (f5ffb71: a lost pub/sub connection is
//! connected and subscribed again at once in the background, `RECONNECT_WITHIN` = 1 s, and a
//! waiter that finds a reader still reconnecting replaces it), over three Redlock nodes with
//! wake-ups on and `fair` off. Every client is its own backend instance.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use lock_core::raw::Lock as _;
use lock_core::{Key, RetryPolicy};
use lock_tests::backed::start_servers;
use lock_tests::fair::waiting;
use lock_tests::nodes::Nodes;
use lock_tests::proxy::LatencyProxy;
use lock_tests::pubsub::{
    acl_servers, channels, fair_off_client as client, foreign, kill_pubsub, other_clients,
    pubsub_clients,
};
use lock_tests::server::RedisServer;

/// Three servers, the second and third reached through proxies (to slow down what their
/// connections carry, new ones included).
struct Slowable {
    servers: Vec<RedisServer>,
    proxies: [LatencyProxy; 2],
}

impl Slowable {
    async fn start() -> Self {
        let servers = start_servers(3);
        let proxies = [
            LatencyProxy::start(servers[1].port()).await.unwrap(),
            LatencyProxy::start(servers[2].port()).await.unwrap(),
        ];
        Self { servers, proxies }
    }

    fn urls(&self) -> Vec<String> {
        vec![
            self.servers[0].url(),
            self.proxies[0].url(),
            self.proxies[1].url(),
        ]
    }

    fn set_delay(&self, delay: Duration) {
        for proxy in &self.proxies {
            proxy.set_delay(delay);
        }
    }
}

/// A holder holds `key` on the second and third nodes only (the first keeps a value of
/// someone else's: only those two announce the release); a waiter (retry delay 5 s: only a
/// wake-up ends its wait sooner) waits on it. Then both nodes' pub/sub connections are killed
/// while the proxies carry every chunk 150 ms late (a reconnect takes some 600 ms), and, with
/// `another_waiter`, another waiter of the same client (on another key, held by someone else)
/// begins to wait 100 ms later, while the reconnects are still under way, and stops waiting
/// after the duration given. How long after the release (made once the proxies are fast
/// again) the first waiter won the key, and the channels subscribed on each node just before.
async fn won_after_slow_reconnect(
    another_waiter: Option<Duration>,
) -> (Duration, Vec<Vec<String>>) {
    let nodes = Slowable::start().await;
    let urls = nodes.urls();
    foreign(&urls[0], "slow-a");
    for server in &nodes.servers {
        foreign(&server.url(), "slow-b");
    }
    let holder = client(&urls, RetryPolicy::none(), Duration::from_millis(300));
    let guard = holder.acquire("slow-a").await.unwrap();
    let waiter = client(
        &urls,
        waiting(Duration::from_secs(5)),
        Duration::from_millis(1500),
    );
    let task = {
        let waiter = waiter.clone();
        tokio::spawn(async move {
            let guard = waiter.acquire("slow-a").await.unwrap();
            let won = tokio::time::Instant::now();
            guard.release().await.unwrap();
            won
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    nodes.set_delay(Duration::from_millis(150));
    kill_pubsub(&nodes.servers[1].url());
    kill_pubsub(&nodes.servers[2].url());
    let other = another_waiter.map(|waits| {
        let backend = Arc::clone(waiter.backend());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let key = Key::new("slow-b").unwrap();
            let wait = backend.wait_for_release(std::slice::from_ref(&key), Duration::from_secs(5));
            tokio::time::timeout(waits, wait).await
        })
    });
    tokio::time::sleep(Duration::from_millis(1200)).await;
    nodes.set_delay(Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let subscribed: Vec<Vec<String>> = nodes
        .servers
        .iter()
        .map(|server| channels(&server.url()))
        .collect();
    let released = tokio::time::Instant::now();
    guard.release().await.unwrap();
    let won = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("won")
        .unwrap();
    if let Some(other) = other {
        other.abort();
    }
    waiter.stop().await.unwrap();
    holder.stop().await.unwrap();
    (won - released, subscribed)
}

/// Held (the control of the test below): a waiter whose nodes' pub/sub connections are lost
/// hears the release there once the reader has connected and subscribed again, though that
/// takes some 600 ms (a slow link), and wins within a fraction of its 5 s delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reconnect_still_subscribes_the_waiting_channel() {
    let (took, subscribed) = won_after_slow_reconnect(None).await;
    assert!(
        took < Duration::from_secs(1),
        "from release to win: {took:?}; subscribed before it: {subscribed:?}"
    );
}

/// Promised (f5ffb71: after a loss the connection "subscribes every channel that has
/// waiters"; `wake.rs`: waiters "retry as soon as a message arrives"): a waiter whose nodes'
/// pub/sub connections were lost hears the next release there, whatever other waiters of the
/// client do meanwhile.
///
/// Broken on main: a waiter of another channel that begins to wait while the reader is still
/// reconnecting replaces it (`subscribe` aborts a reader that is not `alive`) by a connection
/// that subscribes its own channel only. The channels the reconnect was about to subscribe
/// are subscribed nowhere on those nodes, and their current waiters hear no release there
/// until their next wait: here the waiter won 3.1 s after the release (the rest of its 5 s
/// delay). On a fast link the window is the reconnect's round trips; under steady traffic
/// waiters keep coming. Fixed: a connection made anew subscribes every channel that has
/// waiters (`WakeRegistry::channels`), as the reconnect does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_arriving_during_a_reconnect_leaves_the_others_subscribed() {
    let (took, subscribed) = won_after_slow_reconnect(Some(Duration::from_secs(5))).await;
    assert!(
        took < Duration::from_secs(1),
        "from release to win: {took:?}; subscribed before it: {subscribed:?}"
    );
}

/// Promised (as above): a waiter whose nodes' pub/sub connections were lost hears the next
/// release there, though another waiter of the client begins to wait while the reconnects are
/// under way and stops 200 ms later (its wait cancelled, woken by another node, or its delay
/// over: before its own connection is made).
///
/// Broken before the fix: the other waiter's subscription aborted the reader still
/// reconnecting before connecting itself, then was dropped with its wait in mid-connect,
/// leaving no connection at all on those nodes: the first waiter won 3.1 s after the release
/// (the rest of its 5 s delay). (Seen as a flake of the test above, 2 runs of 25 under load:
/// there the other waiter's wait on a key nobody held ended after its ttl probe.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_leaving_during_a_reconnect_does_not_undo_it() {
    let (took, subscribed) = won_after_slow_reconnect(Some(Duration::from_millis(200))).await;
    assert!(
        took < Duration::from_secs(1),
        "from release to win: {took:?}; subscribed before it: {subscribed:?}"
    );
}

/// Held: a node whose pub/sub connections are killed 20 times in a row (100 ms apart) while a
/// waiter waits keeps one pub/sub connection of the client (no reader left behind, none
/// doubled); the waiter still wins within a fraction of its delay, the release announced
/// only by the flapping node and one other whose connection was killed too; after `stop` no
/// pub/sub connection is left on any node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_node_leaves_one_connection_and_none_after_stop() {
    let nodes = Nodes::start().await;
    let urls = nodes.urls().to_vec();
    let direct: Vec<String> = nodes.servers.iter().map(RedisServer::url).collect();
    foreign(&direct[2], "flap");
    let holder = client(&urls, RetryPolicy::none(), Duration::from_millis(300));
    let guard = holder.acquire("flap").await.unwrap();
    let waiter = client(
        &urls,
        waiting(Duration::from_secs(5)),
        Duration::from_millis(300),
    );
    let task = {
        let waiter = waiter.clone();
        tokio::spawn(async move {
            let guard = waiter.acquire("flap").await.unwrap();
            let won = tokio::time::Instant::now();
            guard.release().await.unwrap();
            won
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    for round in 0..20 {
        kill_pubsub(&direct[round % 2]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during: Vec<usize> = direct.iter().map(|url| pubsub_clients(url)).collect();
    assert_eq!(
        during,
        [1, 1, 1],
        "pub/sub connections per node while waiting"
    );
    let released = tokio::time::Instant::now();
    guard.release().await.unwrap();
    let won = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("won")
        .unwrap();
    assert!(
        won - released < Duration::from_secs(1),
        "from release to win: {:?}",
        won - released
    );
    waiter.stop().await.unwrap();
    holder.stop().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after: Vec<usize> = direct.iter().map(|url| pubsub_clients(url)).collect();
    assert_eq!(after, [0, 0, 0], "pub/sub connections per node after stop");
}

/// Held: a node that goes down while a waiter waits (the reconnect fails: the reader stops)
/// and comes back: at most one pub/sub connection of the client per node while the waiter
/// goes on waiting (1 s delay here), none after `stop`. (The node that came back is not
/// subscribed again while the channel stays subscribed on another node: `wait` subscribes
/// "when any node is", the next waiter only of a channel no node subscribed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_and_back_gets_one_connection_and_none_after_stop() {
    let mut nodes = Nodes::start().await;
    let urls = nodes.urls().to_vec();
    let direct: Vec<String> = nodes.servers.iter().map(RedisServer::url).collect();
    let waiter = client(
        &urls,
        waiting(Duration::from_secs(1)),
        Duration::from_millis(300),
    );
    let holder = client(&urls, RetryPolicy::none(), Duration::from_millis(300));
    let guard = holder.acquire("down").await.unwrap();
    let task = {
        let waiter = waiter.clone();
        tokio::spawn(async move {
            let guard = waiter.acquire("down").await.unwrap();
            let won = tokio::time::Instant::now();
            guard.release().await.unwrap();
            won
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    nodes.servers[0].kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nodes.servers[0].restart().unwrap();
    // A few of the waiter's waits (1 s each) pass.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let during: Vec<usize> = direct.iter().map(|url| pubsub_clients(url)).collect();
    assert!(
        during.iter().all(|&count| count <= 1),
        "pub/sub connections per node while waiting: {during:?}"
    );
    // Released where the holder still has it (under load its set on the proxied node may
    // have timed out, leaving the key on two nodes, one of which restarted: `NotHeld`).
    let _ = guard.release().await;
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("won")
        .unwrap();
    waiter.stop().await.unwrap();
    holder.stop().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after: Vec<usize> = direct.iter().map(|url| pubsub_clients(url)).collect();
    assert_eq!(after, [0, 0, 0], "pub/sub connections per node after stop");
}

/// The third node's pub/sub connection is killed while its proxy black-holes everything: the
/// reader's reconnect hangs (its `CLIENT SETINFO` is never answered). How long ending the
/// waiter's client took (`stop`, or a drop without it), and the clients left on each server
/// 1.5 s after the proxy forwards again (a connection that survived the end would complete
/// then), the holder stopped too.
async fn end_while_reconnecting_to_a_black_hole(stop: bool) -> (Duration, Vec<usize>) {
    let nodes = Nodes::start().await;
    let urls = nodes.urls().to_vec();
    let direct: Vec<String> = nodes.servers.iter().map(RedisServer::url).collect();
    let holder = client(&urls, RetryPolicy::none(), Duration::from_millis(300));
    let guard = holder.acquire("hole").await.unwrap();
    let waiter = client(
        &urls,
        waiting(Duration::from_secs(5)),
        Duration::from_millis(300),
    );
    let task = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.acquire("hole").await.map(drop) })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    nodes.proxy.black_hole();
    kill_pubsub(&direct[2]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let began = tokio::time::Instant::now();
    if stop {
        waiter.stop().await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    } else {
        task.abort();
        let _ = task.await;
        drop(waiter);
    }
    let took = began.elapsed();
    nodes.proxy.set_delay(Duration::ZERO);
    drop(guard);
    holder.stop().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let left = direct.iter().map(|url| other_clients(url)).collect();
    (took, left)
}

/// Held: `stop` while a reader reconnects to a black-holed node returns at once (the reader is
/// aborted, not waited for), and leaves no connection behind once the node answers again
/// (none made after the close).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_while_reconnecting_to_a_black_hole_is_quick_and_leaves_nothing() {
    let (took, left) = end_while_reconnecting_to_a_black_hole(true).await;
    assert!(took < Duration::from_millis(700), "stop took {took:?}");
    assert_eq!(left, [0, 0, 0], "clients left per server");
}

/// Held: a client dropped without `stop` while a reader reconnects to a black-holed node
/// leaves no connection behind either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_dropped_while_reconnecting_to_a_black_hole_leaves_nothing() {
    let (_, left) = end_while_reconnecting_to_a_black_hole(false).await;
    assert_eq!(left, [0, 0, 0], "clients left per server");
}

/// Held: channels subscribed again by reconnects (every node's connection killed twice while
/// the waiter waited, once 50 ms before it won) are retired after their linger like the
/// others: a few seconds after `LINGER`, no node has a channel subscribed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_subscribed_by_reconnects_are_retired_after_the_linger() {
    let nodes = Nodes::start().await;
    let urls = nodes.urls().to_vec();
    let direct: Vec<String> = nodes.servers.iter().map(RedisServer::url).collect();
    let holder = client(&urls, RetryPolicy::none(), Duration::from_millis(300));
    let waiter = client(
        &urls,
        waiting(Duration::from_secs(5)),
        Duration::from_millis(300),
    );
    for key in ["linger-a", "linger-b"] {
        let guard = holder.acquire(key).await.unwrap();
        let task = {
            let waiter = waiter.clone();
            tokio::spawn(async move { waiter.acquire(key).await.unwrap().release().await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        for url in &direct {
            kill_pubsub(url);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        guard.release().await.unwrap();
        for url in &direct {
            kill_pubsub(url);
        }
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("won")
            .unwrap()
            .unwrap();
    }
    tokio::time::sleep(lock_core::raw::wake::LINGER + Duration::from_millis(1500)).await;
    let left: Vec<Vec<String>> = direct.iter().map(|url| channels(url)).collect();
    waiter.stop().await.unwrap();
    holder.stop().await.unwrap();
    assert!(
        left.iter().all(Vec::is_empty),
        "channels subscribed after the linger: {left:?}"
    );
}

/// Held: on nodes that need a user and password (ACL user `app`, the default user off), a
/// reader connects again with them after a loss: the release announced only on the nodes
/// whose connections were killed still reaches the waiter at once, and each node keeps one
/// pub/sub connection of the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_reconnects_to_acl_nodes() {
    let password = "adv35b-not-shown";
    let (_servers, urls) = acl_servers(password);
    foreign(&urls[2], "pw");
    let holder = client(&urls, RetryPolicy::none(), Duration::from_millis(300));
    let guard = holder.acquire("pw").await.unwrap();
    let waiter = client(
        &urls,
        waiting(Duration::from_secs(5)),
        Duration::from_millis(300),
    );
    let task = {
        let waiter = waiter.clone();
        tokio::spawn(async move {
            let guard = waiter.acquire("pw").await.unwrap();
            let won = tokio::time::Instant::now();
            guard.release().await.unwrap();
            won
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    kill_pubsub(&urls[0]);
    kill_pubsub(&urls[1]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during: Vec<usize> = urls.iter().map(|url| pubsub_clients(url)).collect();
    let released = tokio::time::Instant::now();
    guard.release().await.unwrap();
    let won = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("won")
        .unwrap();
    waiter.stop().await.unwrap();
    holder.stop().await.unwrap();
    assert_eq!(
        during,
        [1, 1, 1],
        "pub/sub connections per node while waiting"
    );
    assert!(
        won - released < Duration::from_secs(1),
        "from release to win: {:?}",
        won - released
    );
}

/// Promised (f5ffb71: the reader "subscribes every channel that has waiters" again within
/// `RECONNECT_WITHIN`, 1 s): a waiter among many of one client (30 channels waited on) whose
/// nodes' pub/sub connections are lost on a link of 40 ms round trips hears the next release
/// there, within a fraction of its 5 s delay.
///
/// Broken on main: the reconnect sends one `SUBSCRIBE` per channel and waits for each answer,
/// 30 round trips and the connect's: 1.24 s, past `RECONNECT_WITHIN`. The reconnect gives up,
/// no channel is subscribed on those nodes, and the waiter won 2.9 s after the release (the
/// rest of its delay). On loopback that takes thousands of channels; on a link of a few ms,
/// a few hundred. (This also made the test above flaky under load: a reconnect of two
/// channels at 300 ms round trips took 0.9 s and sometimes more than 1 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_of_many_channels_on_a_slow_link_subscribes_them_all() {
    let nodes = Slowable::start().await;
    let urls = nodes.urls();
    foreign(&urls[0], "many-0");
    let holder = client(&urls, RetryPolicy::none(), Duration::from_millis(300));
    let guard = holder.acquire("many-0").await.unwrap();
    let waiter = client(
        &urls,
        waiting(Duration::from_secs(5)),
        Duration::from_millis(1500),
    );
    // 29 other channels waited on by the same client (keys held by someone else), for longer
    // than the test.
    for n in 1..30 {
        for server in &nodes.servers {
            foreign(&server.url(), &format!("many-{n}"));
        }
    }
    let others: Vec<_> = (1..30)
        .map(|n| {
            let backend = Arc::clone(waiter.backend());
            tokio::spawn(async move {
                let key = Key::new(format!("many-{n}")).unwrap();
                backend
                    .wait_for_release(std::slice::from_ref(&key), Duration::from_secs(30))
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let task = {
        let waiter = waiter.clone();
        tokio::spawn(async move {
            let guard = waiter.acquire("many-0").await.unwrap();
            let won = tokio::time::Instant::now();
            guard.release().await.unwrap();
            won
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    nodes.set_delay(Duration::from_millis(20));
    kill_pubsub(&nodes.servers[1].url());
    kill_pubsub(&nodes.servers[2].url());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nodes.set_delay(Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let subscribed: Vec<usize> = nodes
        .servers
        .iter()
        .map(|server| channels(&server.url()).len())
        .collect();
    let released = tokio::time::Instant::now();
    guard.release().await.unwrap();
    let won = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("won")
        .unwrap();
    for other in others {
        other.abort();
    }
    waiter.stop().await.unwrap();
    holder.stop().await.unwrap();
    assert!(
        won - released < Duration::from_secs(1),
        "from release to win: {:?}; channels subscribed per node before it: {subscribed:?}",
        won - released
    );
}

/// Held on the base (f5ffb71), where a subscription replacing a reader still reconnecting
/// aborted it first: `stop` while another waiter's subscription holds a node's slot across its
/// connect (slow link: `close` leaves the slot to it after 100 ms) and that node's reader
/// reconnects leaves no pub/sub connection on the node, once both have finished; nothing
/// connects after the close. (Broken by 4b61fa8, which leaves the reader in the slot until the
/// new connection is made: the reader reconnected after the close and kept its connection
/// while the client lived.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_while_a_subscription_holds_the_slot_and_the_reader_reconnects() {
    let nodes = Slowable::start().await;
    let urls = nodes.urls();
    for server in &nodes.servers {
        foreign(&server.url(), "closing-a");
        foreign(&server.url(), "closing-b");
    }
    let waiter = client(
        &urls,
        waiting(Duration::from_secs(5)),
        Duration::from_millis(1500),
    );
    let backend = Arc::clone(waiter.backend());
    let wait = |key: &'static str, after: Duration| {
        let backend = Arc::clone(&backend);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let key = Key::new(key).unwrap();
            backend
                .wait_for_release(std::slice::from_ref(&key), Duration::from_secs(5))
                .await
        })
    };
    let first = wait("closing-a", Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(400)).await;
    nodes.set_delay(Duration::from_millis(150));
    kill_pubsub(&nodes.servers[2].url());
    let second = wait("closing-b", Duration::from_millis(50));
    tokio::time::sleep(Duration::from_millis(150)).await;
    waiter.stop().await.unwrap();
    // The reconnect and the second waiter's connect are done by now.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nodes.set_delay(Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let left: Vec<usize> = nodes
        .servers
        .iter()
        .map(|server| pubsub_clients(&server.url()))
        .collect();
    first.abort();
    second.abort();
    drop(backend);
    assert_eq!(left, [0, 0, 0], "pub/sub connections per node after stop");
}

/// Promised (`wake.rs`: waiters "retry as soon as a message arrives"; R39): a node that could
/// not be reached when its pub/sub connection was lost (here both proxied nodes are cut for
/// 1.5 s, new connections refused) is subscribed again once it is back, while the waiter still
/// waits: the reader tries again every second while waiters are left, and the release there
/// reaches the waiter within a fraction of its 5 s delay.
///
/// Broken before: the reader gave up after one failed reconnect, and the waiter's own
/// subscriptions had no reason to try those nodes again (its channel was subscribed on the
/// first node, which holds someone else's value and announces nothing): the waiter won only at
/// its next attempt, 5 s after it began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_after_a_failed_reconnect_is_subscribed_again() {
    let nodes = Slowable::start().await;
    let urls = nodes.urls();
    foreign(&urls[0], "back");
    // The holder reaches the servers directly: the cut is the waiter's alone.
    let direct: Vec<String> = nodes.servers.iter().map(RedisServer::url).collect();
    let holder = client(&direct, RetryPolicy::none(), Duration::from_millis(300));
    let guard = holder.acquire("back").await.unwrap();
    let waiter = client(
        &urls,
        waiting(Duration::from_secs(5)),
        Duration::from_millis(300),
    );
    let task = {
        let waiter = waiter.clone();
        tokio::spawn(async move {
            let guard = waiter.acquire("back").await.unwrap();
            let won = tokio::time::Instant::now();
            guard.release().await.unwrap();
            won
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    for proxy in &nodes.proxies {
        proxy.cut();
    }
    kill_pubsub(&nodes.servers[1].url());
    kill_pubsub(&nodes.servers[2].url());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nodes.set_delay(Duration::ZERO);
    // The reader's next try, within a second.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let subscribed: Vec<Vec<String>> = nodes
        .servers
        .iter()
        .map(|server| channels(&server.url()))
        .collect();
    let released = tokio::time::Instant::now();
    guard.release().await.unwrap();
    let won = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("won")
        .unwrap();
    waiter.stop().await.unwrap();
    holder.stop().await.unwrap();
    let took = won - released;
    assert!(
        took < Duration::from_secs(1),
        "from release to win: {took:?}; subscribed before it: {subscribed:?}"
    );
}

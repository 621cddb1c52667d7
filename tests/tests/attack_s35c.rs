//! Attacks on the Redlock wake-up reader's reconnect retries (1af1c26: a reader whose node
//! cannot be reached tries again every `RECONNECT_PAUSE` = 1 s while waiters are left and the
//! client is not closed), over three Redlock nodes with wake-ups on and `fair` off. A `Gate`
//! stands between a client and a node: it counts every connection it accepts and, while
//! down, closes each at once (the node cannot be reached; connections already open go on).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use lock_core::raw::Lock as _;
use lock_core::{Key, Locker, RetryPolicy};
use lock_tests::fair::waiting;
use lock_tests::pubsub::{
    Gated, acl_servers, fair_off_client as client, foreign, kill_pubsub, probe, pubsub_clients,
};

/// Promised (1af1c26: the reader tries again "while waiters are left"): once the only waiter
/// of a client left (its wait cancelled), the reader of a node that cannot be reached stops
/// trying: no connection reaches the node from 2 s after the waiter left on. While the waiter
/// waited, about one try a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_stops_retrying_once_its_waiters_left() {
    let nodes = Gated::start().await;
    let holder = client(
        &nodes.direct(),
        RetryPolicy::none(),
        Duration::from_millis(300),
    );
    let guard = holder.acquire("left").await.unwrap();
    let waiter = client(
        &nodes.urls(),
        waiting(Duration::from_secs(5)),
        Duration::from_millis(300),
    );
    let task = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.acquire("left").await.map(drop) })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before = nodes.gates[1].accepted();
    nodes.third_down();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let while_waiting = nodes.gates[1].accepted() - before;
    task.abort();
    let _ = task.await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let before = nodes.gates[1].accepted();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let after = nodes.gates[1].accepted() - before;
    waiter.stop().await.unwrap();
    drop(guard);
    holder.stop().await.unwrap();
    assert!(
        (2..=5).contains(&while_waiting),
        "connections tried in 3 s while the waiter waited: {while_waiting}"
    );
    assert_eq!(after, 0, "connections tried in 3 s after the waiter left");
}

/// Promised (`Lock::shutdown`: the client's pub/sub connections are closed, and nothing is
/// left running): `stop` while a reader pauses between its tries (its node cannot be reached)
/// returns at once, and no connection reaches the node afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_while_a_reader_pauses_is_quick_and_ends_its_tries() {
    let nodes = Gated::start().await;
    let holder = client(
        &nodes.direct(),
        RetryPolicy::none(),
        Duration::from_millis(300),
    );
    let guard = holder.acquire("pause").await.unwrap();
    let waiter = client(
        &nodes.urls(),
        waiting(Duration::from_secs(5)),
        Duration::from_millis(300),
    );
    let task = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.acquire("pause").await.map(drop) })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    nodes.third_down();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let began = tokio::time::Instant::now();
    waiter.stop().await.unwrap();
    let took = began.elapsed();
    let before = nodes.gates[1].accepted();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let after = nodes.gates[1].accepted() - before;
    task.abort();
    drop(guard);
    holder.stop().await.unwrap();
    assert!(took < Duration::from_millis(700), "stop took {took:?}");
    assert_eq!(after, 0, "connections tried in 3 s after stop");
}

/// Promised (1af1c26: one reader per node per client, trying again every second): 20 clients,
/// each waiting on 5 keys, whose third node cannot be reached for 5 s, try about one
/// connection per client per second there (at most 7 per client in those 5 s), not one per
/// key or per wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_for_all_clients_gets_about_one_try_per_client_per_second() {
    const CLIENTS: usize = 20;
    let nodes = Gated::start().await;
    for n in 0..5 {
        for url in nodes.direct() {
            foreign(&url, &format!("storm-{n}"));
        }
    }
    let clients: Vec<Locker> = (0..CLIENTS)
        .map(|_| {
            client(
                &nodes.urls(),
                waiting(Duration::from_secs(5)),
                Duration::from_millis(300),
            )
        })
        .collect();
    let mut waits = Vec::new();
    for waiter in &clients {
        for n in 0..5 {
            let backend = Arc::clone(waiter.backend());
            waits.push(tokio::spawn(async move {
                let key = Key::new(format!("storm-{n}")).unwrap();
                backend
                    .wait_for_release(std::slice::from_ref(&key), Duration::from_secs(30))
                    .await
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let before = nodes.gates[1].accepted();
    nodes.third_down();
    tokio::time::sleep(Duration::from_millis(5000)).await;
    let tried = nodes.gates[1].accepted() - before;
    for wait in waits {
        wait.abort();
    }
    for waiter in clients {
        waiter.stop().await.unwrap();
    }
    assert!(
        (CLIENTS * 3..=CLIENTS * 7).contains(&tried),
        "connections tried in 5 s by {CLIENTS} clients: {tried}"
    );
}

/// Promised (`wake.rs`: waiters "retry as soon as a message arrives"; 1af1c26: a node back
/// after a failed reconnect is subscribed again while the waiter waits): a release announced
/// only by the nodes that could not be reached for a while (the holder holds the key on the
/// second and third only), made 200 ms after they came back, reaches the waiter within a
/// fraction of its 5 s delay.
///
/// Broken on 1af1c26: the reader's tries are 1 s apart, and one made while the nodes could
/// not be reached is followed by the next only after the release; the announcement reached
/// nobody and the waiter won at its next attempt, 3.0 s after the release. Fixed: a reader
/// that connects again after a failed try wakes the waiters of the channels it subscribes
/// (they retry at once; once per outage, so a flapping connection spends no early wake-up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_just_after_the_nodes_came_back_wakes_the_waiter() {
    let nodes = Gated::start().await;
    let direct = nodes.direct();
    foreign(&direct[0], "back");
    let holder = client(&direct, RetryPolicy::none(), Duration::from_millis(300));
    let guard = holder.acquire("back").await.unwrap();
    let waiter = client(
        &nodes.urls(),
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
    for gate in &nodes.gates {
        gate.set_down(true);
    }
    kill_pubsub(&direct[1]);
    kill_pubsub(&direct[2]);
    tokio::time::sleep(Duration::from_millis(1400)).await;
    for gate in &nodes.gates {
        gate.set_down(false);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
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
        "from release to win: {took:?}"
    );
}

/// Every event's fields, as text: a `tracing` subscriber at TRACE for the whole process.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<String>>);

impl tracing::field::Visit for Captured {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let mut text = self.0.lock().unwrap();
        text.push_str(&format!(" {}={value:?}", field.name()));
    }
}

impl tracing::Subscriber for Captured {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        span.record(&mut self.clone());
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        values.record(&mut self.clone());
    }
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        event.record(&mut self.clone());
        self.0.lock().unwrap().push('\n');
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Promised (README: secrets in node URLs are never shown): on nodes that need a user and
/// password (ACL user `app`), one of which changes the password while a waiter waits (its
/// connections there are killed: the reader's tries and the waiters' own subscriptions are
/// refused with `WRONGPASS`, every second), nothing traced, at TRACE, shows the password;
/// and the refusals are traced (the capture works).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refusing_the_password_shows_it_nowhere() {
    let captured = Captured::default();
    tracing::subscriber::set_global_default(captured.clone()).unwrap();
    let password = "adv35c-never-shown";
    let (_servers, urls) = acl_servers(password);
    for url in &urls {
        for key in ["pw-a", "pw-b"] {
            foreign(url, key);
        }
    }
    let waiter = client(
        &urls,
        waiting(Duration::from_millis(300)),
        Duration::from_millis(300),
    );
    let first = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.acquire("pw-a").await.map(drop) })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut admin = probe(&urls[2]);
    for command in [
        "ACL SETUSER app resetpass >another-password",
        "CLIENT KILL TYPE pubsub",
        "CLIENT KILL TYPE normal SKIPME yes",
    ] {
        let words: Vec<&str> = command.split(' ').collect();
        let _: redis::Value = redis::cmd(words[0])
            .arg(&words[1..])
            .query(&mut admin)
            .unwrap();
    }
    let second = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.acquire("pw-b").await.map(drop) })
    };
    tokio::time::sleep(Duration::from_millis(3000)).await;
    first.abort();
    second.abort();
    waiter.stop().await.unwrap();
    let text = captured.0.lock().unwrap().clone();
    assert!(
        !text.contains(password),
        "the password is traced:\n{}",
        text.lines()
            .filter(|line| line.contains(password))
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        text.to_ascii_lowercase().contains("wrongpass")
            || text.to_ascii_lowercase().contains("auth"),
        "no refusal traced:\n{}",
        text.lines().take(20).collect::<Vec<_>>().join("\n")
    );
}

/// Promised (1af1c26: a node that cannot be reached is tried again every `RECONNECT_PAUSE`;
/// the brief's "about one connection per client per second"): a node whose connections are
/// closed 50 ms after they are made (a flapping node, or a proxy in front of one) gets about
/// one pub/sub connection a second from a client whose waiter waits, not one every 50 ms.
///
/// Broken on 1af1c26 (and since f5ffb71): the reader connects again at once after every loss,
/// and only a failed try pauses; a connection made and subscribed, then closed 50 ms later,
/// is made again at once: 58 connections in 3 s from one client (20 a second; with many
/// clients, a storm on the node). Fixed: a connection the reader made again itself and lost
/// within `RECONNECT_PAUSE` is made again only once that pause has passed since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_closing_every_connection_soon_gets_about_one_try_per_second() {
    let nodes = Gated::start().await;
    for url in nodes.direct() {
        foreign(&url, "short");
    }
    let waiter = client(
        &nodes.urls(),
        waiting(Duration::from_secs(5)),
        Duration::from_millis(300),
    );
    let backend = Arc::clone(waiter.backend());
    let wait = tokio::spawn(async move {
        let key = Key::new("short").unwrap();
        backend
            .wait_for_release(std::slice::from_ref(&key), Duration::from_secs(30))
            .await
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    nodes.gates[1].set_lifetime(Duration::from_millis(50));
    let before = nodes.gates[1].accepted();
    kill_pubsub(&nodes.servers[2].url());
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let tried = nodes.gates[1].accepted() - before;
    wait.abort();
    waiter.stop().await.unwrap();
    assert!(tried <= 6, "connections made in 3 s: {tried}");
}

/// Promised (one pub/sub connection per node per client): while the third node's reader
/// pauses between tries, waiters of new channels arrive every 100 ms for 2.5 s (their own
/// subscriptions connect to the node and replace the pausing reader, some while the reader's
/// own try is under way); the node comes back in the middle. Afterwards the client has one
/// pub/sub connection on each node, and none after `stop`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_arriving_while_a_reader_pauses_leave_one_connection() {
    let nodes = Gated::start().await;
    let direct = nodes.direct();
    for n in 0..30 {
        for url in &direct {
            foreign(url, &format!("pausing-{n}"));
        }
    }
    let waiter = client(
        &nodes.urls(),
        waiting(Duration::from_secs(5)),
        Duration::from_millis(300),
    );
    let wait = |n: usize| {
        let backend = Arc::clone(waiter.backend());
        tokio::spawn(async move {
            let key = Key::new(format!("pausing-{n}")).unwrap();
            backend
                .wait_for_release(std::slice::from_ref(&key), Duration::from_secs(30))
                .await
        })
    };
    let mut waits = vec![wait(0)];
    tokio::time::sleep(Duration::from_millis(400)).await;
    nodes.third_down();
    for n in 1..26 {
        if n == 12 {
            nodes.gates[1].set_down(false);
        }
        waits.push(wait(n));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let during: Vec<usize> = direct.iter().map(|url| pubsub_clients(url)).collect();
    for wait in waits {
        wait.abort();
    }
    waiter.stop().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after: Vec<usize> = direct.iter().map(|url| pubsub_clients(url)).collect();
    assert_eq!(
        during,
        [1, 1, 1],
        "pub/sub connections per node while waiting"
    );
    assert_eq!(after, [0, 0, 0], "pub/sub connections per node after stop");
}

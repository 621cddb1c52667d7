//! inc over RESP3: `?protocol=resp3` in the URL makes every connection of the client speak it
//! (its command connection and, with `fair` on, its subscriber), as redis-rs reads the same URL
//! for Redlock; without it, or with `resp2`, they speak RESP2 (the control). The conformance
//! suite runs over RESP3 in `lock-inc/tests/conformance.rs` (`resp3_*`).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::{Holding, LockOptions, Locker, RetryPolicy};
use lock_inc::{IncConfig, IncLock};
use lock_tests::server::{RedisServer, redis_or_skip};

/// The protocol (`resp=` of `CLIENT LIST`) of every connection but the one asking.
fn protocols(server: &RedisServer) -> Vec<String> {
    let mut connection = redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut connection)
        .unwrap();
    list.lines()
        .filter(|line| !line.contains("cmd=client|list"))
        .filter_map(|line| {
            line.split(' ')
                .find_map(|field| field.strip_prefix("resp="))
                .map(str::to_owned)
        })
        .collect()
}

/// A fair client of its own (as another process would have) on `url`.
async fn fair_locker(url: &str) -> Locker {
    let lock = IncLock::connect(IncConfig::new(url).with_fair(true))
        .await
        .unwrap();
    Locker::new(lock)
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(10))
                .with_retry(RetryPolicy::forever()),
        )
        .unwrap()
}

/// Takes a lock with one fair client, lines a second one up behind it (so that its subscriber
/// connects), and returns the protocols the server sees then; the turn passes over it.
async fn protocols_of(query: &str) -> Vec<String> {
    let binary = redis_or_skip("inc_resp3").unwrap();
    let server = RedisServer::start(&binary, &[]).unwrap();
    let url = format!("{}{query}", server.url());
    let (holder, waiter) = (fair_locker(&url).await, fair_locker(&url).await);
    let held = holder.acquire("resp3").await.unwrap();
    let waiting = tokio::spawn({
        let waiter = waiter.clone();
        async move {
            waiter
                .acquire("resp3")
                .await
                .map(|guard| guard.fencing_token())
        }
    });
    // Two command connections and the waiter's subscriber.
    let started = tokio::time::Instant::now();
    while protocols(&server).len() < 3 && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = protocols(&server);
    // `INFO` answers a verbatim string over RESP3: the server is named all the same.
    let states = holder.inspect("resp3").await.unwrap();
    assert!(
        states[0]
            .server
            .as_deref()
            .is_some_and(|name| name.starts_with("redis ")),
        "{query}: {states:?}"
    );
    assert!(
        matches!(states[0].holding, Holding::Held { .. }),
        "{states:?}"
    );
    let first = held.fencing_token();
    held.release().await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiter's turn came")
        .unwrap()
        .unwrap();
    assert!(second > first, "fences {first:?} then {second:?}");
    holder.stop().await.unwrap();
    waiter.stop().await.unwrap();
    seen
}

#[tokio::test]
async fn protocol_resp3_makes_every_connection_speak_resp3() {
    let seen = protocols_of("?protocol=resp3").await;
    assert!(
        seen.len() >= 3,
        "two command connections and a subscriber: {seen:?}"
    );
    assert!(seen.iter().all(|resp| resp == "3"), "{seen:?}");
}

#[tokio::test]
async fn without_protocol_or_with_resp2_every_connection_speaks_resp2() {
    for query in ["", "?protocol=resp2"] {
        let seen = protocols_of(query).await;
        assert!(seen.len() >= 3, "{query}: {seen:?}");
        assert!(seen.iter().all(|resp| resp == "2"), "{query}: {seen:?}");
    }
}

#[tokio::test]
async fn an_unknown_protocol_is_refused_before_connecting() {
    let error = IncLock::connect(IncConfig::new(
        "redis://u:s3cret@127.0.0.1:1/?protocol=resp4",
    ))
    .await
    .err()
    .unwrap();
    let shown = error.to_string();
    assert!(shown.contains("protocol"), "{shown}");
    assert!(!shown.contains("s3cret"), "{shown}");
}

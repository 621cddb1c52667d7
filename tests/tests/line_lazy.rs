//! A release that passes the turn prunes its line only when the head it found has lapsed, and
//! leaves the line keys' expiry as the joins set it (session 27): the turn still goes to the
//! first live waiter, and the line's keys never expire before a live entry.

use std::time::Duration;

use lock_core::RetryPolicy;
use lock_tests::inc_kit::{counter_key, inc_locker, line_key, ms, owner_key};
use lock_tests::server::{RedisServer, redis_or_skip};
use redis::aio::MultiplexedConnection;

fn expiry_key(key: &str) -> String {
    format!("{}-expiry", line_key(key))
}

async fn connect(server: &RedisServer) -> MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

async fn now_ms(c: &mut MultiplexedConnection) -> i64 {
    let (s, us): (i64, i64) = redis::cmd("TIME").query_async(c).await.expect("TIME");
    s * 1000 + us / 1000
}

/// A member of a line: a client's instance (32 hex digits) followed by a waiter id.
fn member(n: u32) -> String {
    format!("{:032x}{:032x}", 0xabc0 + n, n)
}

/// Puts `entries` (member, expiry in ms) in `key`'s line in this order, and makes both keys
/// expire with the latest entry, as a join does.
async fn craft_line(c: &mut MultiplexedConnection, key: &str, entries: &[(String, i64)]) {
    for (place, (member, expiry)) in entries.iter().enumerate() {
        let _: () = redis::cmd("ZADD")
            .arg(line_key(key))
            .arg(place as i64 + 1)
            .arg(member)
            .query_async(c)
            .await
            .expect("ZADD");
        let _: () = redis::cmd("ZADD")
            .arg(expiry_key(key))
            .arg(*expiry)
            .arg(member)
            .query_async(c)
            .await
            .expect("ZADD");
    }
    let latest = entries.iter().map(|(_, e)| *e).max().expect("entries");
    for line in [line_key(key), expiry_key(key)] {
        let _: () = redis::cmd("PEXPIREAT")
            .arg(line)
            .arg(latest)
            .query_async(c)
            .await
            .expect("PEXPIREAT");
    }
}

async fn pexpiretime(c: &mut MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PEXPIRETIME")
        .arg(key)
        .query_async(c)
        .await
        .expect("PEXPIRETIME")
}

/// The line's keys expire no earlier than any entry still in it (or are gone with it).
async fn keys_outlive_entries(c: &mut MultiplexedConnection, key: &str, what: &str) {
    let entries: Vec<(String, i64)> = redis::cmd("ZRANGE")
        .arg(expiry_key(key))
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(c)
        .await
        .expect("ZRANGE");
    let Some(latest) = entries.iter().map(|(_, e)| *e).max() else {
        return;
    };
    for line in [line_key(key), expiry_key(key)] {
        let expires = pexpiretime(c, &line).await;
        assert!(
            expires == -1 || expires >= latest,
            "{what}: {line} expires at {expires}, before its entry expiring at {latest}"
        );
    }
}

/// A lapsed entry heads the line, a live one follows, another lapsed one is last: the release
/// prunes (the head found had lapsed) and gives the lock to the live one. With a live head and a
/// lapsed entry behind it, the live head gets it too. Either way the line's keys outlive every
/// entry left.
#[tokio::test]
async fn a_release_passes_the_turn_to_the_first_live_waiter() {
    let Some(binary) = redis_or_skip("line_lazy") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("redis-server");
    let locker = inc_locker(&server.url(), true, ms(30_000), RetryPolicy::none()).await;
    let mut c = connect(&server).await;
    for (case, lapsed_head) in [("lapsed head", true), ("live head", false)] {
        let key = format!("lazy-{case}");
        let holder = locker.acquire(&key).await.expect("acquire");
        let now = now_ms(&mut c).await;
        let live = member(2);
        let mut entries = vec![(live.clone(), now + 20_000), (member(3), now - 500)];
        if lapsed_head {
            entries.insert(0, (member(1), now - 1_000));
        }
        craft_line(&mut c, &key, &entries).await;
        holder.release().await.expect("release");
        let owner: Option<String> = redis::cmd("GET")
            .arg(owner_key(&key))
            .query_async(&mut c)
            .await
            .expect("GET");
        assert_eq!(
            owner.as_deref(),
            Some(format!("lock-turn-reserved:{live}").as_str()),
            "{case}: the lock did not go to the first live waiter"
        );
        let counter: Option<String> = redis::cmd("GET")
            .arg(counter_key(&key))
            .query_async(&mut c)
            .await
            .expect("GET");
        assert_eq!(
            counter.as_deref(),
            Some("1"),
            "{case}: the lock is not held"
        );
        if lapsed_head {
            let head: Option<f64> = redis::cmd("ZSCORE")
                .arg(line_key(&key))
                .arg(member(1))
                .query_async(&mut c)
                .await
                .expect("ZSCORE");
            assert_eq!(head, None, "{case}: the lapsed head was kept");
        }
        keys_outlive_entries(&mut c, &key, case).await;
    }
}

/// Real waiters on one client each, the latest to join leaving first (its entry is the line's
/// latest): after every release and every departure, the line's keys outlive every entry left,
/// and nothing is left once all are done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_line_keys_never_expire_before_a_live_entry() {
    let Some(binary) = redis_or_skip("line_lazy") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("redis-server");
    let key = "lazy-real";
    let mut c = connect(&server).await;
    let mut lockers = Vec::new();
    for _ in 0..4 {
        lockers.push(
            inc_locker(
                &server.url(),
                true,
                ms(10_000),
                RetryPolicy::forever().with_deadline(Duration::from_secs(10)),
            )
            .await,
        );
    }
    let holder = lockers[0].acquire(key).await.expect("holder");
    let mut waiters = Vec::new();
    for (n, locker) in lockers.iter().enumerate().skip(1) {
        let locker = locker.clone();
        waiters.push(tokio::spawn(async move {
            let guard = locker.acquire(key).await.expect("waiter");
            tokio::time::sleep(ms(20)).await;
            guard.release().await.expect("waiter release");
            n
        }));
        // In line in this order, each joining after the one before.
        tokio::time::sleep(ms(50)).await;
    }
    keys_outlive_entries(&mut c, key, "three in line").await;
    holder.release().await.expect("release");
    for (n, waiter) in waiters.into_iter().enumerate() {
        let done = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("served")
            .expect("task");
        assert_eq!(done, n + 1, "served out of order");
        keys_outlive_entries(&mut c, key, &format!("after waiter {done}")).await;
    }
    tokio::time::sleep(ms(100)).await;
    let left: Vec<String> = redis::cmd("KEYS")
        .arg("lock:*")
        .query_async(&mut c)
        .await
        .expect("KEYS");
    let left: Vec<String> = left
        .into_iter()
        .filter(|k| !k.ends_with(":fence"))
        .collect();
    assert!(left.is_empty(), "left once all were done: {left:?}");
}

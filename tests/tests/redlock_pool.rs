//! The `pool` connection kind on a real redis-server: a checkout costs no round trip, and a
//! connection that failed is never handed out again (see `lock-redlock/src/pool.rs`).

use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_redlock::{ConnectionKind, Redlock, RedlockConfig};
use lock_tests::server::{RedisServer, redis_or_skip};

const TTL: Duration = Duration::from_secs(10);

fn pooled(server: &RedisServer, retry: RetryPolicy) -> Locker {
    let config = RedlockConfig::new([server.url()])
        .with_connection(ConnectionKind::Pool)
        .with_node_timeout(Duration::from_millis(300));
    Locker::new(Redlock::new(config).expect("a valid config"))
        .with_options(LockOptions::default().with_ttl(TTL).with_retry(retry))
        .expect("valid options")
}

async fn cycles(locker: &Locker, count: usize) {
    for _ in 0..count {
        locker
            .acquire("pooled")
            .await
            .expect("a free key")
            .release()
            .await
            .expect("released");
    }
}

/// Single tries until one wins (at most `limit`): how many failed before it.
async fn failures_before_a_win(locker: &Locker, limit: usize) -> usize {
    for failed in 0..limit {
        match locker.try_acquire("pooled").await {
            Ok(Some(guard)) => {
                guard.release().await.expect("released");
                return failed;
            }
            Ok(None) => panic!("the key is free: nobody else asks for it"),
            Err(_) => {}
        }
    }
    panic!("no single try won in {limit}: a broken connection keeps being handed out");
}

#[tokio::test]
async fn a_pooled_cycle_costs_no_check_round_trip() {
    let Some(binary) = redis_or_skip("pool without pings") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("redis-server");
    let locker = pooled(&server, RetryPolicy::forever());
    cycles(&locker, 20).await;
    let before = server.calls("ping").expect("INFO");
    cycles(&locker, 100).await;
    let pings = server.calls("ping").expect("INFO") - before;
    // deadpool-redis alone checks every checkout with `UNWATCH` + `PING`: 200 here.
    println!("pool: {pings} PING for 100 cycles");
    assert_eq!(
        pings, 0,
        "a connection used lately goes out without a check"
    );
}

#[tokio::test]
async fn a_killed_pooled_connection_is_not_handed_out_again() {
    let Some(binary) = redis_or_skip("pool after a killed connection") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("redis-server");
    let locker = pooled(&server, RetryPolicy::none());
    // Sequential cycles use one pooled connection.
    cycles(&locker, 20).await;
    let killed = server
        .command("CLIENT KILL TYPE normal", Duration::from_secs(2))
        .expect("CLIENT KILL");
    println!("killed: {killed}");
    // Used a moment ago, the connection goes out unchecked: its request may fail, once; the
    // connection then leaves the pool and the next try gets a new one.
    let failed = failures_before_a_win(&locker, 5).await;
    println!("pool: {failed} failed single tries after the kill");
    assert!(
        failed <= 1,
        "{failed} tries failed: a dead connection was reused"
    );
    cycles(&locker, 20).await;
}

#[tokio::test]
async fn an_idle_pooled_connection_is_checked_before_use() {
    let Some(binary) = redis_or_skip("pool after idling") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("redis-server");
    let locker = pooled(&server, RetryPolicy::none());
    cycles(&locker, 20).await;
    server
        .command("CLIENT KILL TYPE normal", Duration::from_secs(2))
        .expect("CLIENT KILL");
    // Idle for longer than the pool trusts a connection unchecked: the check finds it dead
    // and the pool makes a new one, so the first try already wins.
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let failed = failures_before_a_win(&locker, 5).await;
    assert_eq!(failed, 0, "an idle connection went out without its check");
}

#[tokio::test]
async fn a_pooled_request_cut_short_leaves_the_pool() {
    let Some(binary) = redis_or_skip("pool after a timed-out request") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("redis-server");
    let locker = pooled(&server, RetryPolicy::none());
    cycles(&locker, 20).await;
    // A paused server: the try times out (its request is dropped unanswered).
    server.pause().expect("SIGSTOP");
    let stalled = locker.try_acquire("pooled").await;
    server.resume().expect("SIGCONT");
    assert!(
        stalled.is_err(),
        "a paused server cannot grant: {stalled:?}"
    );
    // The stalled connection's late answers do not come back to the next request: it left the
    // pool, and the next tries win at once.
    let failed = failures_before_a_win(&locker, 3).await;
    assert_eq!(failed, 0, "the next try failed after a timed-out one");
    cycles(&locker, 20).await;
    let clients = server
        .command("INFO clients", Duration::from_secs(2))
        .expect("INFO");
    println!("after: {clients}");
}

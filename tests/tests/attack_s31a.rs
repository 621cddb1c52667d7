//! Attack on 3e2b3c8 (a Redlock node's connection is one multiplexed connection kept by the
//! crate, `lock-redlock/src/node.rs`, `Managed`, instead of redis-rs's `ConnectionManager`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_redlock::{ConnectionKind, Redlock, RedlockConfig};
use lock_tests::server::{RedisServer, client_list, is_pubsub, redis_or_skip};
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(10);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn locker_at(urls: &[String], kind: ConnectionKind, node_timeout: Duration) -> Locker {
    let config = RedlockConfig::new(urls.to_vec())
        .with_connection(kind)
        .with_node_timeout(node_timeout);
    Locker::new(Redlock::new(config).expect("a valid config"))
        .with_options(
            LockOptions::default()
                .with_ttl(TTL)
                .with_retry(RetryPolicy::none()),
        )
        .expect("valid options")
}

/// How many connections the server has accepted so far (the asking one included).
fn accepted(server: &RedisServer) -> u64 {
    let mut asking = redis::Client::open(server.url())
        .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(2)))
        .expect("a connection for INFO");
    let stats: String = redis::cmd("INFO")
        .arg("stats")
        .query(&mut asking)
        .expect("INFO stats");
    stats
        .lines()
        .find_map(|line| line.strip_prefix("total_connections_received:"))
        .and_then(|count| count.trim().parse().ok())
        .expect("total_connections_received")
}

/// Kills every normal connection but the asking one; how many.
fn kill_all(server: &RedisServer) -> u64 {
    let mut asking = redis::Client::open(server.url())
        .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(2)))
        .expect("a connection for CLIENT KILL");
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query(&mut asking)
        .expect("CLIENT KILL")
}

async fn normal_connections(server: &RedisServer) -> usize {
    client_list(server.port())
        .await
        .iter()
        .filter(|line| !is_pubsub(line))
        .count()
}

/// One try on `key`, released when won: Ok(true) won, Ok(false) held, Err failed.
async fn one_try(locker: &Locker, key: &str) -> Result<bool, String> {
    match locker.try_acquire(key).await {
        Ok(Some(guard)) => {
            guard.release().await.map_err(|e| e.to_string())?;
            Ok(true)
        }
        Ok(None) => Ok(false),
        Err(error) => Err(error.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// A connection the server closed while nobody used it (an idle `timeout`, `CLIENT KILL`, a
// restart between two bursts of work).

/// Over RESP3 redis-rs reports the close of a connection to whoever listens for its pushes:
/// `ConnectionManager` (3e2b3c8^) did, and opened another at once, so that the next request
/// found a sound connection. `Managed` does not listen: the next try, 300 ms after the close,
/// met the dead connection and failed ("broken pipe"): a single-node lock's try lost for
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_a_connection_closed_while_idle_does_not_fail_the_next_try() {
    let Some(binary) = redis_or_skip("resp3 idle close") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("redis-server");
    let url = format!("{}?protocol=resp3", server.url());
    let locker = locker_at(&[url], ConnectionKind::Manager, ms(500));
    for round in 0..3 {
        assert_eq!(one_try(&locker, "idle").await, Ok(true), "round {round}");
        assert_eq!(kill_all(&server), 1, "round {round}: our one connection");
        tokio::time::sleep(ms(300)).await;
        assert_eq!(
            one_try(&locker, "idle").await,
            Ok(true),
            "round {round}: the try after the connection was closed while idle"
        );
    }
    assert_eq!(normal_connections(&server).await, 1);
}

/// The same over RESP2 (the default), where redis-rs reports the close to nobody: a connection
/// killed while idle, and one closed by the server's idle `timeout` between two tries 2.5 s
/// apart. Broken on 3e2b3c8 and on its parent alike: the next try met the dead connection and
/// failed (a server with an idle timeout failed every try after a pause longer than it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp2_a_connection_closed_while_idle_does_not_fail_the_next_try() {
    let Some(binary) = redis_or_skip("resp2 idle close") else {
        return;
    };
    let server = RedisServer::start(&binary, &["--timeout", "1"]).expect("redis-server");
    let locker = locker_at(&[server.url()], ConnectionKind::Manager, ms(500));
    for round in 0..3 {
        assert_eq!(one_try(&locker, "idle").await, Ok(true), "round {round}");
        assert_eq!(kill_all(&server), 1, "round {round}: our one connection");
        tokio::time::sleep(ms(300)).await;
        assert_eq!(
            one_try(&locker, "idle").await,
            Ok(true),
            "round {round}: the try after the connection was killed while idle"
        );
    }
    // The server closes a connection idle for more than a second (checked in its cron).
    let closed = Instant::now() + Duration::from_secs(5);
    while normal_connections(&server).await > 0 {
        assert!(
            Instant::now() < closed,
            "the server never closed the idle connection"
        );
        tokio::time::sleep(ms(100)).await;
    }
    tokio::time::sleep(ms(100)).await;
    let before = accepted(&server);
    assert_eq!(
        one_try(&locker, "idle").await,
        Ok(true),
        "the try after the server's idle timeout closed the connection"
    );
    // One connection opened for it (less the one that asked).
    assert_eq!(accepted(&server) - before - 1, 1);
}

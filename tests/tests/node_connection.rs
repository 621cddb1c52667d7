//! A Redlock node's one connection (`connection = "manager"`, the default; see
//! `lock-redlock/src/node.rs`, `Managed`) on a real redis-server: opened once however many
//! requests arrive at the same time, and opened anew, once, after it broke.

use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::server::{RedisServer, client_list, is_pubsub, redis_or_skip};

const TTL: Duration = Duration::from_secs(10);

fn locker(server: &RedisServer) -> Locker {
    let config = RedlockConfig::new([server.url()]).with_node_timeout(Duration::from_millis(500));
    Locker::new(Redlock::new(config).expect("a valid config"))
        .with_options(
            LockOptions::default()
                .with_ttl(TTL)
                .with_retry(RetryPolicy::none()),
        )
        .expect("valid options")
}

/// The server's connections other than pub/sub ones (and the one that asks).
async fn connections(server: &RedisServer) -> Vec<String> {
    client_list(server.port())
        .await
        .into_iter()
        .filter(|line| !is_pubsub(line))
        .collect()
}

/// `count` single tries at once on distinct keys: how many won (each released).
async fn tries_at_once(locker: &Locker, round: usize, count: usize) -> usize {
    let tries = (0..count).map(|n| {
        let locker = locker.clone();
        tokio::spawn(async move {
            match locker.try_acquire(&format!("conn-{round}-{n}")).await {
                Ok(Some(guard)) => {
                    guard.release().await.expect("released");
                    true
                }
                Ok(None) => panic!("a key nobody else asks for was held"),
                Err(_) => false,
            }
        })
    });
    let mut won = 0;
    for try_ in tries.collect::<Vec<_>>() {
        won += usize::from(try_.await.expect("the task ran"));
    }
    won
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_arriving_together_share_one_connection_attempt() {
    let Some(binary) = redis_or_skip("one connection per node") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("redis-server");
    let locker = locker(&server);
    // 64 first requests at once on a node never asked before: all wait for the one attempt.
    let before = server.accepted();
    let won = tries_at_once(&locker, 0, 64).await;
    assert_eq!(won, 64, "every try on a free key wins");
    // Less the connection that asked after.
    let opened = server.accepted() - before - 1;
    assert_eq!(
        opened, 1,
        "connections opened for 64 requests arriving together"
    );
    assert_eq!(connections(&server).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_killed_by_the_server_is_replaced_once() {
    let Some(binary) = redis_or_skip("a killed connection replaced") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("redis-server");
    let locker = locker(&server);
    assert_eq!(tries_at_once(&locker, 0, 8).await, 8);
    for round in 1..=5 {
        let open = connections(&server).await;
        assert_eq!(open.len(), 1, "round {round}: {open:#?}");
        let id = open[0]
            .split(' ')
            .find_map(|field| field.strip_prefix("id="))
            .expect("an id in CLIENT LIST");
        let killed = server
            .command(&format!("CLIENT KILL ID {id}"), Duration::from_secs(2))
            .expect("CLIENT KILL");
        assert!(killed.contains('1'), "killed: {killed}");
        // The requests that meet the broken connection fail; the next ones open another.
        let before = server.accepted();
        let mut won = 0;
        for attempt in 0..20 {
            won = tries_at_once(&locker, round * 100 + attempt, 8).await;
            if won == 8 {
                break;
            }
        }
        assert_eq!(won, 8, "round {round}: the node never came back");
        let opened = server.accepted() - before - 1;
        assert_eq!(
            opened, 1,
            "round {round}: connections opened after the kill"
        );
        let open = connections(&server).await;
        assert_eq!(
            open.len(),
            1,
            "round {round}: one connection after the kill, not one per request: {open:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_is_reached_again() {
    let Some(binary) = redis_or_skip("a restarted node reached again") else {
        return;
    };
    let mut server = RedisServer::start(&binary, &[]).expect("redis-server");
    let locker = locker(&server);
    assert_eq!(tries_at_once(&locker, 0, 4).await, 4);
    server.restart().expect("the server came back");
    let mut failed = 0;
    loop {
        match locker.try_acquire("after-restart").await {
            Ok(Some(guard)) => {
                guard.release().await.expect("released");
                break;
            }
            Ok(None) => panic!("the restarted server is empty"),
            Err(_) => {
                failed += 1;
                assert!(failed < 20, "the restarted node was never reached again");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert_eq!(connections(&server).await.len(), 1);
}

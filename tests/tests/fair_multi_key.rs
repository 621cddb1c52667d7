//! A multi-key lock on a fair node (`redis`, Redlock on one node, `fair` by default): its
//! release frees its keys and passes each freed key's turn to the head of that key's line in
//! one call — an uncontended multi-key cycle costs what it does without lines, and single-key
//! waiters behind it are served at once, not at their next poll.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::fair::waiting;
use lock_tests::server::{RedisServer, redis_or_skip};
use tokio::time::Instant;

/// A client of its own (a process, as far as the server can tell) on `server`, `fair` unset.
fn client(server: &RedisServer, retry: RetryPolicy) -> Locker {
    let config = RedlockConfig::new([server.url()]).with_node_timeout(Duration::from_millis(500));
    Locker::from_arc(Arc::new(Redlock::new(config).expect("redlock")))
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(10))
                .with_retry(retry),
        )
        .expect("options")
}

/// Uncontended, the release of a three-key lock is one script call, as a single key's is
/// (before, one more call per key followed it, to pass turns nobody waited for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncontended_multi_key_release_on_a_fair_node_is_one_call() {
    let Some(binary) = redis_or_skip("fair_multi_key") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("server");
    let locker = client(&server, RetryPolicy::none());
    assert!(locker.capabilities().fair, "`redis` is fair by default");
    // Warm up: the scripts are loaded once.
    locker
        .acquire_many(&["a", "b", "c"])
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    let guard = locker.acquire_many(&["a", "b", "c"]).await.unwrap();
    let before = server.calls("evalsha").unwrap();
    guard.release().await.unwrap();
    let calls = server.calls("evalsha").unwrap() - before;
    assert_eq!(calls, 1, "script calls made by one multi-key release");
    locker.stop().await.unwrap();
}

/// Two single-key waiters, one behind each key of a multi-key holder, with a 2 s retry delay:
/// the holder's release reserves each key for its waiter and wakes it, so both hold their key
/// within a fraction of their delay, and nothing is left in the store afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_key_release_passes_the_turn_of_every_key_it_frees() {
    let Some(binary) = redis_or_skip("fair_multi_key") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("server");
    let holder = client(&server, RetryPolicy::none());
    let guard = holder.acquire_many(&["m-a", "m-b"]).await.unwrap();
    let waiters: Vec<_> = ["m-a", "m-b"]
        .into_iter()
        .map(|key| {
            let waiter = client(&server, waiting(Duration::from_secs(2)));
            tokio::spawn(async move {
                let guard = waiter.acquire(key).await.unwrap();
                let got = Instant::now();
                guard.release().await.unwrap();
                waiter.stop().await.unwrap();
                got
            })
        })
        .collect();
    // Both waiters made their first attempts, lined up, and sleep out their 2 s by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let released = Instant::now();
    guard.release().await.unwrap();
    for waiter in waiters {
        let got = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .unwrap()
            .unwrap();
        let after = got - released;
        assert!(
            after < Duration::from_millis(800),
            "served {after:?} after the release"
        );
    }
    holder.stop().await.unwrap();
    assert_eq!(
        server
            .command("DBSIZE", Duration::from_millis(500))
            .unwrap(),
        ":0"
    );
}

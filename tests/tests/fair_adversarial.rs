//! Adversarial cases of fair waiting (`fair`) on real servers: a client stopped with waiters in
//! line, keys with hash-tag and glob characters on a Cluster, mixed fair and plain clients.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use lock_core::RetryPolicy;
use lock_tests::fair::{Store, Target, waiting};
use lock_tests::server::{RedisServer, redis_or_skip};

/// A client stopped while one of its waiters is in line takes it out of the line: the waiter of
/// another process behind it is not kept waiting for the stopped waiter's entry to expire.
async fn stopped_client_leaves_the_line(store: Store) {
    let Some(target) = Target::start(store, "fair waiting").await else {
        return;
    };
    let key = "stopped";
    let ttl = Duration::from_secs(20);
    let holder = target.locker(true, ttl, RetryPolicy::none()).await;
    let guard = holder.acquire(key).await.unwrap();
    let stopping = Arc::new(
        target
            .locker(true, ttl, waiting(Duration::from_millis(100)))
            .await,
    );
    let first = {
        let stopping = Arc::clone(&stopping);
        tokio::spawn(async move { stopping.acquire(key).await.map(|_| ()) })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !target.line_keys("").await.is_empty(),
        "the waiter is in line"
    );
    stopping.stop().await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(5), first).await;
    println!("{store:?}: the stopped client's waiter ended with {outcome:?}");
    guard.release().await.unwrap();
    // Another process's waiter gets the free lock at once, not after the stopped waiter's
    // entry expires (the ttl, 20 s).
    let other = target
        .locker(true, ttl, waiting(Duration::from_millis(100)))
        .await;
    let got = tokio::time::timeout(Duration::from_secs(3), other.acquire(key)).await;
    println!(
        "{store:?}: line keys after stop: {:?}",
        target.line_keys("").await
    );
    assert!(
        matches!(got, Ok(Ok(_))),
        "a stopped client's waiter kept another process's waiter out of a free lock"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_clients_waiter_leaves_the_line_redis() {
    stopped_client_leaves_the_line(Store::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_clients_waiter_leaves_the_line_inc() {
    stopped_client_leaves_the_line(Store::Inc).await;
}

/// Keys with hash-tag and glob characters wait fairly on a Cluster (one slot for the lock and
/// its line), and nothing of theirs stays. (A key whose first character is `}` leaves the hash
/// tag empty and is refused on a Cluster for every kind: see lock-inc's README.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_keys_wait_fairly_on_a_cluster() {
    let Some(target) = Target::start(Store::IncCluster, "fair waiting").await else {
        return;
    };
    let ttl = Duration::from_secs(5);
    for key in ["{", "{}", "a}b{c", "*?[a-z]", "{x}y", "x}", "{{}}"] {
        let holder = target.locker(true, ttl, RetryPolicy::none()).await;
        let guard = holder
            .acquire(key)
            .await
            .unwrap_or_else(|e| panic!("{key:?}: {e}"));
        let waiter = target
            .locker(true, ttl, waiting(Duration::from_millis(50)))
            .await;
        let waiting = tokio::spawn(async move { waiter.acquire(key).await.map(|g| (g, waiter)) });
        tokio::time::sleep(Duration::from_millis(200)).await;
        guard.release().await.unwrap();
        let (guard, _waiter) = tokio::time::timeout(Duration::from_secs(3), waiting)
            .await
            .unwrap_or_else(|_| panic!("{key:?}: the waiter was not served"))
            .unwrap()
            .unwrap_or_else(|e| panic!("{key:?}: {e}"));
        guard.release().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(target.line_keys("").await.is_empty());
}

/// A waiter cancelled while the server is paused cannot leave the line at once: the clean-up
/// asked again once the server answers takes it out of the line too, so a waiter of another
/// process is not kept from a free lock until the cancelled waiter's entry expires (its ttl).
async fn cancelled_during_a_pause_leaves_the_line(store: Store) {
    let Some(target) = Target::start(store, "fair waiting").await else {
        return;
    };
    let key = "paused-cancel";
    let ttl = Duration::from_secs(30);
    let holder = target.locker(true, ttl, RetryPolicy::none()).await;
    let guard = holder.acquire(key).await.unwrap();
    let cancelled = target
        .locker(true, ttl, waiting(Duration::from_millis(100)))
        .await;
    let task = tokio::spawn(async move { cancelled.acquire(key).await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !target.line_keys("").await.is_empty(),
        "the waiter is in line"
    );
    target.servers[0].pause().unwrap();
    task.abort();
    // The clean-up's command times out while the server is paused.
    tokio::time::sleep(Duration::from_secs(3)).await;
    target.servers[0].resume().unwrap();
    guard.release().await.unwrap();
    let other = target
        .locker(true, ttl, waiting(Duration::from_millis(100)))
        .await;
    let got = tokio::time::timeout(Duration::from_secs(8), other.acquire(key)).await;
    println!(
        "{store:?}: line keys after the pause: {:?}",
        target.line_keys("").await
    );
    assert!(
        matches!(got, Ok(Ok(_))),
        "a waiter cancelled during a pause kept another process's waiter out of a free lock: {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_cancelled_during_a_pause_leaves_the_line_redis() {
    cancelled_during_a_pause_leaves_the_line(Store::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_cancelled_during_a_pause_leaves_the_line_inc() {
    cancelled_during_a_pause_leaves_the_line(Store::Inc).await;
}

/// As above, with the clean-up's first try lost for good: the server is paused, then killed and
/// restarted from its append-only file (the line survives, the clean-up's command does not).
async fn cancelled_across_a_restart_leaves_the_line(store: Store) {
    let Some(binary) = redis_or_skip("fair waiting") else {
        return;
    };
    let server = RedisServer::start(&binary, &["--appendonly", "yes", "--appendfsync", "always"])
        .expect("server");
    let url = server.url();
    let mut target = Target {
        store,
        servers: vec![server],
        url,
    };
    let key = "restart-cancel";
    let ttl = Duration::from_secs(30);
    // The holder expires by itself soon after the restart (its release may find the
    // connection broken); the cancelled waiter's entry would last 30 s.
    let holder = target
        .locker(true, Duration::from_secs(4), RetryPolicy::none())
        .await;
    let guard = holder.acquire(key).await.unwrap();
    let cancelled = target
        .locker(true, ttl, waiting(Duration::from_millis(100)))
        .await;
    let task = tokio::spawn(async move { cancelled.acquire(key).await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !target.line_keys("").await.is_empty(),
        "the waiter is in line"
    );
    target.servers[0].pause().unwrap();
    task.abort();
    // Long enough for the clean-up's first try to time out, short enough for its follow-up
    // (three rounds) to reach the restarted server.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    target.servers[0].restart().unwrap();
    // The line survived the restart: seen there, or already taken out by the clean-up's
    // follow-up, which on a busy machine may reach the restarted server before this look
    // (seen: the line gone at once). The follow-up is a script; the server replays its
    // append-only file as the scripts' effects, so a script counted there ran since the
    // restart.
    let in_line = target.line_keys("").await;
    let scripts: u64 = ["eval", "evalsha"]
        .iter()
        .map(|command| target.servers[0].calls(command).unwrap())
        .sum();
    assert!(
        !in_line.is_empty() || scripts > 0,
        "the line did not survive the restart (no script ran there since)"
    );
    let _ = guard.release().await;
    let other = target
        .locker(true, ttl, waiting(Duration::from_millis(100)))
        .await;
    let got = tokio::time::timeout(Duration::from_secs(15), other.acquire(key)).await;
    println!(
        "{store:?}: line keys after the restart: {:?}",
        target.line_keys("").await
    );
    assert!(
        matches!(got, Ok(Ok(_))),
        "a waiter cancelled during an outage kept another process's waiter out of a free lock: {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_cancelled_across_a_restart_leaves_the_line_redis() {
    cancelled_across_a_restart_leaves_the_line(Store::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_cancelled_across_a_restart_leaves_the_line_inc() {
    cancelled_across_a_restart_leaves_the_line(Store::Inc).await;
}

//! adv18c: attacks on the release follow-ups of attack_s18a (Redlock re-sends always carry
//! `SCRIPT LOAD` + `EVALSHA` in one pipeline write; inc's follow-up sends `EVAL`).
//!
//! - Redlock, every held kind (multi-key mutex, semaphore permit, read, write) whose release
//!   reaches a slow node that lost its scripts: the self-contained re-send runs there and the
//!   node ends as clean as one that released normally (held).
//! - Redlock, a multi-key release re-sent after another client took one of its keys on that
//!   node: the other's key stays, ours goes, and the follow-up stops (held).
//! - Redlock, an ACL user allowed `EVALSHA` but not `SCRIPT`: the re-send's `SCRIPT LOAD` is
//!   refused (NOPERM), which fails the whole pipeline although its `EVALSHA` ran and deleted
//!   the key; the follow-up counts the node as unanswered and sends the release twice more.
//! - inc, an ACL user allowed `EVALSHA` and `SCRIPT` but not `EVAL`: the follow-up's `EVAL` is
//!   refused every time and the lock stays for its ttl (it worked before, with
//!   `EVALSHA`-with-reload).
//! - inc on a Redis Cluster, fair: a release that the slot's primary (paused, scripts flushed)
//!   never answers is re-sent by `EVAL` to the right node with its line keys (held).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::{LockError, LockGuard, LockOptions, Locker, RetryPolicy};
use lock_inc::{IncConfig, IncLock};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::fair::connect;
use lock_tests::proxy::LatencyProxy;
use lock_tests::server::{RedisServer, cluster_url, redis_or_skip, start_cluster};
use redis::aio::MultiplexedConnection;

const TTL: Duration = Duration::from_secs(20);
const PROBE: Duration = Duration::from_secs(2);
/// The password of the ACL users below: never in an error.
const ACL_PASSWORD: &str = "s18c-acl-secret";

/// Every key on a node but the fencing counters (which outlive locks by design).
async fn lock_keys(connection: &mut MultiplexedConnection) -> Vec<Vec<u8>> {
    let mut keys: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg("*")
        .query_async(connection)
        .await
        .unwrap();
    keys.retain(|key| !key.ends_with(b":fence"));
    keys.sort();
    keys
}

/// The error counts of a server (`INFO errorstats`), e.g. `errorstat_NOPERM:count=2`.
async fn error_stats(connection: &mut MultiplexedConnection) -> Vec<String> {
    let info: String = redis::cmd("INFO")
        .arg("errorstats")
        .query_async(connection)
        .await
        .unwrap();
    info.lines()
        .filter(|line| line.starts_with("errorstat"))
        .map(str::to_owned)
        .collect()
}

/// Waits until `key` is on a node: a quorum may decide before the slow node answers, and a
/// drop marker armed meanwhile would catch the acquisition instead of the release.
async fn until_present(connection: &mut MultiplexedConnection, key: &str) {
    for _ in 0..200 {
        let exists: i64 = redis::cmd("EXISTS")
            .arg(key)
            .query_async(connection)
            .await
            .unwrap();
        if exists == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("`{key}` never reached the node");
}

fn shown(keys: &[Vec<u8>]) -> Vec<String> {
    keys.iter()
        .map(|key| key.escape_ascii().to_string())
        .collect()
}

fn redlock_locker(urls: Vec<String>, node_timeout: Duration, fair: bool) -> Locker {
    let config = RedlockConfig::new(urls)
        .with_fair(fair)
        .with_node_timeout(node_timeout);
    Locker::new(Redlock::new(config).unwrap())
        .with_local_queue(false)
        .with_options(
            LockOptions::default()
                .with_ttl(TTL)
                .with_retry(RetryPolicy::none()),
        )
        .unwrap()
}

/// What a Redlock lock holds, for the tests over every kind.
#[derive(Clone, Copy, Debug)]
enum Kind {
    MultiKey,
    Permit,
    Read,
    Write,
}

async fn take(locker: &Locker, kind: Kind) -> LockGuard {
    match kind {
        Kind::MultiKey => locker.acquire_many(&["k1", "k2", "k3"]).await,
        Kind::Permit => locker.acquire_permit("k", 3).await,
        Kind::Read => locker.acquire_read("k").await,
        Kind::Write => locker.acquire_write("k").await,
    }
    .unwrap()
}

/// Three nodes, node 0 behind a proxy; `kind` taken, node 0's scripts flushed and its answers
/// 150 ms late (node timeout 50 ms), then released. Node 0's keys after the follow-up, and
/// node 1's (which released at once), for comparison.
async fn kind_released_on_slow_flushed_node(
    test: &str,
    kind: Kind,
) -> Option<(Vec<Vec<u8>>, Vec<Vec<u8>>)> {
    let binary = redis_or_skip(test)?;
    let servers: Vec<RedisServer> = (0..3)
        .map(|_| RedisServer::start(&binary, &[]).unwrap())
        .collect();
    let proxy = LatencyProxy::start(servers[0].port()).await.unwrap();
    let urls = vec![proxy.url(), servers[1].url(), servers[2].url()];
    let locker = redlock_locker(urls, Duration::from_millis(50), false);
    let (mut node0, mut node1) = (
        connect(&servers[0].url()).await,
        connect(&servers[1].url()).await,
    );
    let guard = take(&locker, kind).await;
    // The quorum may decide before node 0 answers.
    for _ in 0..100 {
        if !lock_keys(&mut node0).await.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !lock_keys(&mut node0).await.is_empty(),
        "{kind:?} reached node 0"
    );
    let flushed = servers[0].command("SCRIPT FLUSH", PROBE).unwrap();
    assert_eq!(flushed, "+OK");
    proxy.set_delay(Duration::from_millis(150));
    guard.release().await.unwrap();
    let mut left = lock_keys(&mut node0).await;
    for _ in 0..40 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = lock_keys(&mut node0).await;
    }
    let normal = lock_keys(&mut node1).await;
    proxy.set_delay(Duration::ZERO);
    locker.stop().await.unwrap();
    Some((left, normal))
}

async fn assert_kind_leaves_nothing(test: &str, kind: Kind) {
    let Some((left, normal)) = kind_released_on_slow_flushed_node(test, kind).await else {
        return;
    };
    println!(
        "s18c {kind:?}: node 0 (slow, flushed) keeps {:?}, node 1 keeps {:?}",
        shown(&left),
        shown(&normal)
    );
    assert_eq!(
        left, normal,
        "{kind:?}: the node that lost its scripts kept the lock's keys"
    );
    assert!(normal.is_empty(), "{kind:?}: a normal release left keys");
}

/// Held: a multi-key mutex's re-send (`SCRIPT LOAD` + `EVALSHA`) runs on the slow node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_multi_key_release_resent_to_a_slow_flushed_node_leaves_nothing() {
    assert_kind_leaves_nothing("s18c multi-key", Kind::MultiKey).await;
}

/// Held: a semaphore permit's re-send runs on the slow node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_permit_release_resent_to_a_slow_flushed_node_leaves_nothing() {
    assert_kind_leaves_nothing("s18c permit", Kind::Permit).await;
}

/// Held: a read lease's re-send runs on the slow node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_read_release_resent_to_a_slow_flushed_node_leaves_nothing() {
    assert_kind_leaves_nothing("s18c read", Kind::Read).await;
}

/// Held: a write lease's re-send (with its claim) runs on the slow node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_write_release_resent_to_a_slow_flushed_node_leaves_nothing() {
    assert_kind_leaves_nothing("s18c write", Kind::Write).await;
}

/// Held: a multi-key release lost on node 0 is re-sent after another client took one of its
/// keys there (ours expired there, say): the re-send deletes only what still holds our token,
/// and, its count short of the lock's keys, is not asked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_multi_key_resend_after_another_took_a_key_keeps_it() {
    let Some(binary) = redis_or_skip("s18c multi-key resend after takeover") else {
        return;
    };
    let servers: Vec<RedisServer> = (0..3)
        .map(|_| RedisServer::start(&binary, &[]).unwrap())
        .collect();
    let proxy = LatencyProxy::start(servers[0].port()).await.unwrap();
    let urls = vec![proxy.url(), servers[1].url(), servers[2].url()];
    // A node timeout of 500 ms, not 200: on a loaded machine an answer of nodes 1 and 2 (the
    // release's quorum) or of the re-send came later than 200 ms now and then (the release
    // failed, or the follow-up sent a second round: both seen locally under build load).
    let locker = redlock_locker(urls, Duration::from_millis(500), false);
    let mut node0 = connect(&servers[0].url()).await;
    let guard = locker.acquire_many(&["k1", "k2"]).await.unwrap();
    until_present(&mut node0, "k2").await;
    let token = guard.token().expose().to_string();
    // Another client holds `k1` on node 0 now.
    let _: () = redis::cmd("SET")
        .arg("k1")
        .arg("another-client")
        .query_async(&mut node0)
        .await
        .unwrap();
    proxy.drop_next(token.clone().into_bytes());
    let before = servers[0].calls("evalsha").unwrap();
    guard.release().await.unwrap();
    assert!(
        proxy.dropped_within(Duration::from_secs(2)).await,
        "the release never went to node 0"
    );
    // Rounds after 500, 1500 and 3500 ms at most: a second round would have gone by 2.5 s.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let sent = servers[0].calls("evalsha").unwrap() - before;
    let k1: Option<String> = redis::cmd("GET")
        .arg("k1")
        .query_async(&mut node0)
        .await
        .unwrap();
    let k2: Option<String> = redis::cmd("GET")
        .arg("k2")
        .query_async(&mut node0)
        .await
        .unwrap();
    println!("s18c takeover: node 0 k1 = {k1:?}, k2 = {k2:?}, releases run there {sent}");
    assert_eq!(
        k1.as_deref(),
        Some("another-client"),
        "another's key deleted"
    );
    assert_eq!(k2, None, "our key stayed on node 0");
    assert_eq!(sent, 1, "the follow-up did not stop after its answer");
    locker.stop().await.unwrap();
}

/// `k` taken by a client that has not yet connected to its nodes, trying again for a while: on
/// a busy machine a first connection (with its `AUTH`) can take longer than the 200 ms node
/// timeout, and the test's single-try policy would fail the whole test on it (seen once in CI:
/// `QuorumNotReached` with "broken pipe" from one node). The tests here are about the release;
/// after a failure, the failed attempt's clean-up is given its follow-up rounds (at most
/// 200 + 600 + 1400 ms, each up to 200 ms) before the next try, so that none of its releases
/// is counted among the test's.
async fn first_acquisition(locker: &Locker) -> LockGuard {
    let mut tries = 0;
    loop {
        match locker.acquire("k").await {
            Ok(guard) => return guard,
            Err(error) if tries < 4 => {
                tries += 1;
                println!("s18c: a first acquisition failed ({error}); trying again");
                tokio::time::sleep(Duration::from_millis(3_500)).await;
            }
            Err(error) => panic!("no acquisition in 5 tries: {error}"),
        }
    }
}

/// Three nodes with an ACL user `app` (`+@all` and then `rule`), node 0 behind a proxy. The
/// administrator (the default user) loads the scripts: one lock taken and released. As `app`,
/// `k` is taken and its release dropped on its way to node 0 (with its connection). Node 0's
/// `k` after the follow-up, and how many releases ran there.
async fn redlock_release_lost_as_acl_user(test: &str, rule: &str) -> Option<(Option<String>, u64)> {
    let binary = redis_or_skip(test)?;
    let servers: Vec<RedisServer> = (0..3)
        .map(|_| RedisServer::start(&binary, &[]).unwrap())
        .collect();
    for server in &servers {
        let created = server
            .command(
                &format!("ACL SETUSER app on >{ACL_PASSWORD} ~* &* +@all {rule}"),
                PROBE,
            )
            .unwrap();
        assert_eq!(created, "+OK");
    }
    let proxy = LatencyProxy::start(servers[0].port()).await.unwrap();
    let node_timeout = Duration::from_millis(200);
    let admin = redlock_locker(
        vec![proxy.url(), servers[1].url(), servers[2].url()],
        node_timeout,
        false,
    );
    first_acquisition(&admin).await.release().await.unwrap();
    admin.stop().await.unwrap();
    let as_app = |port: u16| format!("redis://app:{ACL_PASSWORD}@127.0.0.1:{port}/");
    let app = redlock_locker(
        vec![
            as_app(proxy.port()),
            as_app(servers[1].port()),
            as_app(servers[2].port()),
        ],
        node_timeout,
        false,
    );
    let mut node0 = connect(&servers[0].url()).await;
    let guard = first_acquisition(&app).await;
    until_present(&mut node0, "k").await;
    proxy.drop_next(guard.token().expose().to_string().into_bytes());
    let before = servers[0].calls("evalsha").unwrap();
    guard.release().await.unwrap();
    assert!(
        proxy.dropped_within(Duration::from_secs(2)).await,
        "the release never went to node 0"
    );
    // Rounds after 200, 600 and 1400 ms at most (each up to 200 ms), with room for a busy
    // machine.
    tokio::time::sleep(Duration::from_millis(4_000)).await;
    let sent = servers[0].calls("evalsha").unwrap() - before;
    let left: Option<String> = redis::cmd("GET")
        .arg("k")
        .query_async(&mut node0)
        .await
        .unwrap();
    let errors = error_stats(&mut node0).await;
    println!(
        "s18c redlock ACL `{rule}`: node 0 `k` = {left:?}, releases run there: {sent}; {:?}",
        errors
    );
    app.stop().await.unwrap();
    Some((left, sent))
}

/// Fails on main: an ACL user allowed `EVALSHA` (scripts loaded by an administrator) but not
/// `SCRIPT`. The release lost on node 0 is re-sent as `SCRIPT LOAD` + `EVALSHA` in one
/// pipeline: the node refuses the load (NOPERM) and runs the `EVALSHA`, which deletes the key,
/// but the pipeline's answer is the load's error, so the follow-up counts node 0 as unanswered
/// and sends the release again in each of its rounds (3 in all instead of 1). Every other
/// clean-up (a failed attempt's undo on every node, at once) goes the same way for such a user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_acl_user_without_script_follow_up_stops_once_its_release_ran() {
    let Some((left, sent)) =
        redlock_release_lost_as_acl_user("s18c redlock ACL without SCRIPT", "-script").await
    else {
        return;
    };
    assert_eq!(left, None, "the re-sent release never ran on node 0");
    assert_eq!(
        sent, 1,
        "the follow-up re-sent a release that had run ({sent} runs): the pipeline's answer was \
         the refused SCRIPT LOAD"
    );
}

/// Negative control (held): the same user allowed every command: one re-send, which runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_redlock_acl_user_with_script_follow_up_runs_once() {
    let Some((left, sent)) = redlock_release_lost_as_acl_user("s18c redlock ACL control", "").await
    else {
        return;
    };
    assert_eq!((left, sent), (None, 1));
}

/// The inc lock's keys (counter, owner, line) on a server, fencing counter aside.
async fn inc_keys(connection: &mut MultiplexedConnection, key: &str) -> Vec<String> {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{{{key}}}*"))
        .query_async(connection)
        .await
        .unwrap();
    let mut keys: Vec<String> = keys
        .into_iter()
        .filter(|key| !key.ends_with(":fence"))
        .collect();
    keys.sort();
    keys
}

/// One inc server with an ACL user `app` (`+@all` and then `rule`) behind a proxy: `k` taken
/// as `app`, its release dropped on its way (with its connection). The release's error and
/// the lock's keys left once the follow-up (`release_later`) has had its rounds.
async fn inc_release_lost_as_acl_user(test: &str, rule: &str) -> Option<(LockError, Vec<String>)> {
    let binary = redis_or_skip(test)?;
    let server = RedisServer::start(&binary, &[]).unwrap();
    let created = server
        .command(
            &format!("ACL SETUSER app on >{ACL_PASSWORD} ~* &* +@all {rule}"),
            PROBE,
        )
        .unwrap();
    assert_eq!(created, "+OK");
    let proxy = LatencyProxy::start(server.port()).await.unwrap();
    let lock = IncLock::connect(IncConfig {
        command_timeout: 200,
        ..IncConfig::new(format!(
            "redis://app:{ACL_PASSWORD}@127.0.0.1:{}/",
            proxy.port()
        ))
    })
    .await
    .unwrap();
    let locker = Locker::new(lock)
        .with_options(
            LockOptions::default()
                .with_ttl(TTL)
                .with_retry(RetryPolicy::none()),
        )
        .unwrap();
    let mut direct = connect(&server.url()).await;
    let guard = locker.acquire("k").await.unwrap();
    assert!(!inc_keys(&mut direct, "k").await.is_empty());
    proxy.drop_next(guard.token().expose().to_string().into_bytes());
    let released = guard.release().await;
    assert!(
        proxy.dropped_within(Duration::from_secs(2)).await,
        "the release never went to the server"
    );
    let error = released.expect_err("the release was dropped on its way");
    // Rounds after 200, 600 and 1400 ms at most.
    let mut left = inc_keys(&mut direct, "k").await;
    for _ in 0..50 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = inc_keys(&mut direct, "k").await;
    }
    let errors = error_stats(&mut direct).await;
    println!(
        "s18c inc ACL `{rule}`: release answered {error}; keys left {left:?}; {:?}",
        errors
    );
    locker.stop().await.unwrap();
    Some((error, left))
}

/// Fails on main: an ACL user allowed `EVALSHA` and `SCRIPT` but not `EVAL` (a common way to
/// allow only vetted scripts). A release lost on its way (dropped with its connection) is asked
/// again by `release_later`, now with `EVAL`: refused (NOPERM) in every round, so the lock
/// stays for its ttl. Before s18a the follow-up's `EVALSHA` ran. The error names no password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_acl_user_without_eval_failed_release_runs_on_follow_up() {
    let Some((error, left)) =
        inc_release_lost_as_acl_user("s18c inc ACL without EVAL", "-eval").await
    else {
        return;
    };
    assert!(
        !error.to_string().contains(ACL_PASSWORD),
        "the error shows the password: {error}"
    );
    assert!(
        left.is_empty(),
        "the follow-up's EVAL was refused in every round: the lock stays for its ttl ({left:?})"
    );
}

/// Negative control (held): the same user allowed every command: the follow-up runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_inc_acl_user_with_eval_failed_release_runs_on_follow_up() {
    let Some((error, left)) = inc_release_lost_as_acl_user("s18c inc ACL control", "").await else {
        return;
    };
    assert!(!error.to_string().contains(ACL_PASSWORD), "{error}");
    assert!(left.is_empty(), "{left:?}");
}

/// Held: inc, fair, on a Redis Cluster. A holds `k`, B waits in its line. The slot's primary
/// loses its scripts and is paused (SIGSTOP) while A releases: the release times out (its
/// `EVALSHA` meets NOSCRIPT once the node is back, and nobody reloads). The follow-up's `EVAL`
/// with the counter, owner and line keys (one slot) goes to that primary: A's keys go and the
/// turn passes to B well within the ttl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_cluster_fair_release_follow_up_reaches_the_slot_owner() {
    let Some(binary) = redis_or_skip("s18c inc cluster follow-up") else {
        return;
    };
    let servers = start_cluster(&binary, 3).expect("cluster");
    let url = cluster_url(&servers);
    let connect_inc = || async {
        let mut config = IncConfig::new(url.clone()).with_fair(true);
        config.command_timeout = 300;
        IncLock::connect(config).await.unwrap()
    };
    let options = LockOptions::default().with_ttl(TTL).with_retry(
        RetryPolicy::forever()
            .with_retry_delay(Duration::from_millis(100))
            .with_deadline(Duration::from_secs(15)),
    );
    let a = Locker::new(connect_inc().await)
        .with_local_queue(false)
        .with_options(options.clone())
        .unwrap();
    let b = Locker::new(connect_inc().await)
        .with_local_queue(false)
        .with_options(options)
        .unwrap();
    let held = a.acquire("k").await.unwrap();
    let owner = servers
        .iter()
        .position(|server| server.command("EXISTS lock:{k}", PROBE).unwrap() == ":1")
        .expect("one primary holds `lock:{k}`");
    let mut direct = connect(&servers[owner].url()).await;
    let waiter = tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let guard = b.acquire("k").await;
        (guard.map(|guard| (guard, started.elapsed())), b)
    });
    let mut lined = Vec::new();
    for _ in 0..100 {
        lined = inc_keys(&mut direct, "k").await;
        if lined.iter().any(|key| key.ends_with(":queue")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("s18c cluster: node {owner} holds {lined:?}");
    assert!(
        lined.iter().any(|key| key.ends_with(":queue")),
        "B never lined up"
    );
    assert_eq!(
        servers[owner].command("SCRIPT FLUSH", PROBE).unwrap(),
        "+OK"
    );
    servers[owner].pause().unwrap();
    let released = held.release().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    servers[owner].resume().unwrap();
    println!("s18c cluster: A's release answered {released:?}");
    assert!(
        matches!(released, Err(LockError::Backend { .. })),
        "the paused primary answered"
    );
    let (got, b) = waiter.await.unwrap();
    let (guard, waited) = got.expect("B gets `k` after A's release ran");
    println!("s18c cluster: B got `k` after {waited:?}");
    assert!(
        waited < Duration::from_secs(8),
        "B waited {waited:?}: A's keys stayed"
    );
    guard.release().await.unwrap();
    let mut left = inc_keys(&mut direct, "k").await;
    for _ in 0..40 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = inc_keys(&mut direct, "k").await;
    }
    assert!(left.is_empty(), "keys left on the slot's primary: {left:?}");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

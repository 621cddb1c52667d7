//! Adversarial review s11: Redlock's late take-backs on a pool (a request that answers after
//! the attempt that sent it has been decided) and fair waiting on Redis, against real servers.
//! Each test prints its figures on one line.

use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_redlock::{ConnectionKind, Redlock, RedlockConfig};
use lock_tests::nodes::{Nodes, leftovers};
use lock_tests::proxy::LatencyProxy;
use lock_tests::server::{RedisServer, redis_or_skip};

fn locker(lock: &Redlock, ttl: Duration) -> Locker {
    Locker::new(lock.clone())
        .with_options(
            LockOptions::default().with_ttl(ttl).with_retry(
                RetryPolicy::forever()
                    .with_retry_delay(Duration::from_millis(5))
                    .with_retry_jitter(Duration::from_millis(5))
                    .with_deadline(Duration::from_secs(10)),
            ),
        )
        .expect("valid options")
}

/// Promised (4ce6579, `undo_attempt`): a writer's claim left by a request that answered after
/// the decision of its round is taken back, so that once everything is released nothing of ours
/// stays in Redis (a claim keeps readers out of its node for its whole ttl).
///
/// Broken for the attempt that *wins*: a writer wins on nodes 0 and 1 while its request to node
/// 2 is held on the connection of that node's pool (a proxy stalls it); node 2 has a reader of
/// its own (another client's, on that node alone). The writer releases (its release to node 2
/// goes on another connection of the pool and finds nothing), then the held request lands, is
/// refused by the reader and leaves the writer's claim (value: the released writer's token).
/// The winner's follow-up after its in-flight requests answered re-sends the release to the
/// nodes that answered yes or failed, not to one that answered no: the claim stays on node 2
/// for the writer's ttl (20 s), after the writer released and the reader left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_winning_writers_late_refusal_leaves_no_claim_after_its_release() {
    let Some(_binary) = redis_or_skip("winner's late claim") else {
        return;
    };
    let nodes = Nodes::start().await;
    let lock = Redlock::new(
        RedlockConfig::new(nodes.urls())
            .with_node_timeout(Duration::from_millis(5_000))
            .with_connection(ConnectionKind::Pool),
    )
    .expect("client");
    let locker = locker(&lock, Duration::from_secs(20));
    for _ in 0..2 {
        locker
            .acquire_write("rw")
            .await
            .expect("warm")
            .release()
            .await
            .expect("release");
    }
    // Another client's reader, on node 2 only.
    let other = Redlock::new(RedlockConfig::new([nodes.servers[2].url()])).expect("other client");
    let other = Locker::new(other)
        .with_options(LockOptions::default().with_ttl(Duration::from_secs(30)))
        .expect("options");
    let reader = other.acquire_read("rw").await.expect("reader on node 2");
    // What the pool's connection to node 2 carries from now on is held: the writer's script.
    nodes.proxy.stall_existing(0);
    let writer = locker
        .acquire_write("rw")
        .await
        .expect("the writer wins on 0 and 1");
    let token = writer.token().expose().to_string();
    writer.release().await.expect("release");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The held request lands now, refused by the reader on node 2.
    nodes.proxy.release_stall();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    reader.release().await.expect("release the reader");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let left: Vec<Vec<(String, i64)>> = nodes.leftovers();
    let claim = nodes.get(2, b"rw\xff:claim");
    let ours = claim.as_deref() == Some(token.as_bytes());
    println!(
        "winner's late claim: keys (name, pttl) left per node = {left:?}; the claim on node 2 is the released writer's: {ours}"
    );
    assert!(
        left.iter().all(Vec::is_empty),
        "something of the released writer outlived it: {left:?}"
    );
}

/// Promised: a waiting writer's claim is taken back when the writer stops waiting, and once
/// everything is released nothing of ours stays in Redis (a claim keeps readers out of its node
/// for its whole ttl).
///
/// Broken across attempts: each attempt has a fresh token, and the claim a refused attempt
/// leaves holds that attempt's token. A writer waits out a reader on three nodes (its attempts
/// leave claims on all three); node 2 then becomes unreachable, the reader leaves, and the
/// writer wins on nodes 0 and 1 (its winning script deletes the claim there). Node 2 comes
/// back; the reader's and the writer's releases reach it — but the writer's release is
/// token-checked against the winning attempt's token, and the claim there is an earlier
/// attempt's: it stays for the ttl (20 s) after everything was released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_attempts_claim_outlives_the_writer_that_won_elsewhere() {
    let Some(_binary) = redis_or_skip("earlier attempt's claim") else {
        return;
    };
    let nodes = Nodes::start().await;
    let lock = Redlock::new(
        RedlockConfig::new(nodes.urls()).with_node_timeout(Duration::from_millis(200)),
    )
    .expect("client");
    let locker = Locker::new(lock.clone())
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(20))
                .with_retry(
                    RetryPolicy::forever()
                        .with_retry_delay(Duration::from_millis(50))
                        .with_retry_jitter(Duration::ZERO)
                        .with_deadline(Duration::from_secs(15)),
                ),
        )
        .expect("options");
    let reader = locker.acquire_read("rw").await.expect("reader");
    let writer = tokio::spawn({
        let locker = locker.clone();
        async move { locker.acquire_write("rw").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let claimed = nodes.get(2, b"rw\xff:claim").is_some();
    nodes.proxy.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    reader.release().await.expect("the reader leaves (2 of 3)");
    let writer = writer
        .await
        .expect("writer task")
        .expect("the writer wins on 0 and 1");
    writer.release().await.expect("release (2 of 3)");
    nodes.proxy.set_delay(Duration::ZERO);
    // The releases' follow-ups reach node 2 again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let left: Vec<Vec<(String, i64)>> = nodes.leftovers();
    println!(
        "earlier attempt's claim: claim on node 2 before the cut: {claimed}; keys (name, pttl) left per node after every release = {left:?}"
    );
    assert!(
        left.iter().all(Vec::is_empty),
        "a claim of the writer outlived it: {left:?}"
    );
}

/// Held: a fair waiter (`redis`, Redlock on one node with `fair: true`) on a pool, cancelled
/// while its poll is held on the pool's connection, leaves its line for good: the take-back sent
/// on another connection overtakes the poll, which then lands and would put the waiter back in
/// line (behind a live holder), and the undo sent behind it on the same connection takes it out
/// again. Otherwise, once the holder leaves, the turn would go to the cancelled waiter and
/// another process's waiter would wait for that entry's expiry (the ttl, 10 s).
/// Checked by a negative control: with the undo on the same connection (`UndoOnDrop`) switched
/// off, the other waiter timed out and the line stayed (4 runs of 4; with it, 7 of 7 passed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fair_waiter_cancelled_mid_poll_on_a_pool_leaves_its_line() {
    let Some(binary) = redis_or_skip("fair waiter cancelled mid-poll") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("server");
    let proxy = LatencyProxy::start(server.port()).await.expect("proxy");
    let ttl = Duration::from_secs(10);
    let fair = |url: String, kind: ConnectionKind| {
        let lock = Redlock::new(
            RedlockConfig::new([url])
                .with_fair(true)
                .with_node_timeout(Duration::from_millis(2_000))
                .with_connection(kind),
        )
        .expect("client");
        Locker::new(lock)
            .with_options(
                LockOptions::default().with_ttl(ttl).with_retry(
                    RetryPolicy::forever()
                        .with_retry_delay(Duration::from_millis(50))
                        .with_retry_jitter(Duration::ZERO)
                        .with_deadline(Duration::from_secs(20)),
                ),
            )
            .expect("options")
    };
    let holder = fair(server.url(), ConnectionKind::Manager);
    let waiter = fair(proxy.url(), ConnectionKind::Pool);
    let other = fair(server.url(), ConnectionKind::Manager);
    // Warm: two connections in the waiter's pool (the take-back then has one besides the
    // poll's), the scripts loaded.
    for _ in 0..2 {
        let (a, b) = tokio::join!(waiter.acquire("k"), waiter.acquire("warm"));
        a.expect("warm").release().await.expect("release");
        b.expect("warm").release().await.expect("release");
    }
    let held = holder.acquire("k").await.expect("holder");
    let cancelled = tokio::spawn({
        let waiter = waiter.clone();
        async move { waiter.acquire("k").await.map(|_| ()) }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let in_line = leftovers(&server).len();
    // Its next poll (every 200 ms at most) is held on the pool's connection.

    // (A pooled connection used lately goes out unchecked: the script is held.)
    proxy.stall_existing(0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    cancelled.abort();
    let _ = cancelled.await;
    // The take-back, on another connection (an idle one, held too, times out and leaves the
    // pool; a new one is made), has run by now; then the poll lands.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    proxy.release_stall();
    tokio::time::sleep(Duration::from_millis(300)).await;
    held.release().await.expect("release the holder");
    let got = tokio::time::timeout(Duration::from_secs(2), other.acquire("k")).await;
    let left = leftovers(&server);
    println!(
        "fair waiter cancelled mid-poll: keys while in line {in_line}; the other waiter got the free lock: {}; keys now {left:?}",
        matches!(got, Ok(Ok(_)))
    );
    assert!(
        matches!(got, Ok(Ok(_))),
        "a cancelled waiter's entry kept another process's waiter out of a free lock: {left:?}"
    );
}

/// As [`an_earlier_attempts_claim_outlives_the_writer_that_won_elsewhere`], for a writer that
/// gives up: its deadline passes while node 2 is unreachable, and the core takes back the claim
/// of its last attempt (which did not reach node 2); an earlier attempt's claim on node 2 stayed
/// for the ttl (20 s) after the reader left too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_attempts_claim_outlives_the_writer_that_gave_up() {
    let Some(_binary) = redis_or_skip("earlier attempt's claim, given up") else {
        return;
    };
    let nodes = Nodes::start().await;
    let lock = Redlock::new(
        RedlockConfig::new(nodes.urls()).with_node_timeout(Duration::from_millis(200)),
    )
    .expect("client");
    let locker = Locker::new(lock.clone())
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(20))
                .with_retry(
                    RetryPolicy::forever()
                        .with_retry_delay(Duration::from_millis(50))
                        .with_retry_jitter(Duration::ZERO)
                        .with_deadline(Duration::from_millis(800)),
                ),
        )
        .expect("options");
    let reader = locker.acquire_read("rw").await.expect("reader");
    let writer = tokio::spawn({
        let locker = locker.clone();
        async move { locker.acquire_write("rw").await.map(|_| ()) }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    nodes.proxy.cut();
    let gave_up = writer.await.expect("writer task");
    assert!(gave_up.is_err(), "the writer got in past a reader");
    nodes.proxy.set_delay(Duration::ZERO);
    reader.release().await.expect("the reader leaves");
    // The clean-ups' follow-ups reach node 2 again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let left: Vec<Vec<(String, i64)>> = nodes.leftovers();
    println!("earlier attempt's claim, given up: keys (name, pttl) left per node = {left:?}");
    assert!(
        left.iter().all(Vec::is_empty),
        "a claim of the writer outlived it: {left:?}"
    );
}

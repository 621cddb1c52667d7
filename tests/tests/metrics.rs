//! What only a backend knows, counted: releases that a stopped server missed are sent again
//! in the background, and each message sent again counts once in `lock_resends_total`, as
//! many as the server receives. The lock that could not be released is counted down anyway.
//!
//! One recorder for the process (the follow-ups run on tokio's worker threads, where a local
//! recorder is not seen), so the tests run one at a time (`one_at_a_time`): two of them count
//! under the same label (CI saw one test's re-sends in the other's figures).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::{LockError, LockOptions, Locker, RetryPolicy};
use lock_inc::{IncConfig, IncLock};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::backed::ServerBacked;
use lock_tests::server::{RedisServer, redis_or_skip};

#[path = "support/recorded.rs"]
mod recorded;
use recorded::{figures, one_at_a_time};

fn figure(name: &str) -> f64 {
    figures().get(name).copied().unwrap_or_default()
}

/// Redlock on one node that stops before the release: the caller's release fails, and the
/// background asks the node three more times (the bound of `a_release_is_sent_again_at_most_three_times`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_counts_each_release_sent_again() {
    let _alone = one_at_a_time().await;
    if redis_or_skip("redlock resends").is_none() {
        return;
    }
    figures(); // the recorder, before the backend records anything
    let mut backed = ServerBacked::start(1, |urls| {
        Redlock::new(RedlockConfig::new(urls).with_node_timeout(Duration::from_millis(50)))
    });
    let locker = Locker::new(backed.lock().clone())
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(10))
                .with_retry(RetryPolicy::none()),
        )
        .unwrap();
    let held = locker.acquire("resent").await.unwrap();
    assert_eq!(figure("lock_held{backend=redlock}"), 1.0);
    // The counter is the process's: a test that ran before left its own re-sends in it.
    let label = "lock_resends_total{backend=redlock,operation=release}";
    let counted_before = figure(label);
    let before = backed.servers()[0].calls("evalsha").unwrap();
    backed.servers()[0].pause().unwrap();
    let released = held.release().await;
    assert!(released.is_err(), "nobody answered: {released:?}");
    assert_eq!(figure("lock_held{backend=redlock}"), 0.0);
    // Pauses of 50, 100 and 200 ms between tries of up to 50 ms each: all sent by 0.6 s.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    backed.servers()[0].resume().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = backed.servers()[0].calls("evalsha").unwrap() - before;
    let resent = figure(label) - counted_before;
    println!(
        "redlock: the stopped node received the release {received} times, {resent} counted as sent again"
    );
    assert_eq!(received, 4, "one release and three follow-ups");
    assert_eq!(resent, 3.0);
    assert_eq!(figure("lock_held{backend=redlock}"), 0.0);
    assert_eq!(
        figure("lock_lost_total{backend=redlock,found_by=release}"),
        0.0
    );
}

/// Redlock on three healthy nodes, uncontended: the quorum decides each acquisition while the
/// third node's request is often still out, and the release, sent at once on the same
/// connection, lands behind it there and deletes the key. Nothing is left to send again: a
/// release that deleted the keys on a node that took them late proves it came after the
/// acquisition. (Before, every such node heard the release a second time, script and all:
/// a `SCRIPT LOAD` and an `EVALSHA` on about one cycle in three.) A release that finds
/// nothing there is still sent again (`attack_release_leftovers.rs::redlock_a_release_does_not_overtake_its_acquisition_on_a_slow_node`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_sends_nothing_again_after_releases_that_landed_behind_their_acquisition() {
    let _alone = one_at_a_time().await;
    if redis_or_skip("redlock no needless resends").is_none() {
        return;
    }
    figures();
    for fair in [false, true] {
        // A node timeout far above any stall of a loaded machine: an answer that missed it is
        // the one legitimate reason for a re-send here.
        let mut backed = ServerBacked::start(3, |urls| {
            Redlock::new(
                RedlockConfig::new(urls)
                    .with_fair(fair)
                    .with_node_timeout(Duration::from_secs(5)),
            )
        });
        let locker = Locker::new(backed.lock().clone())
            .with_options(
                LockOptions::default()
                    .with_ttl(Duration::from_secs(10))
                    .with_retry(RetryPolicy::forever()),
            )
            .unwrap();
        let cycles = |count: usize| {
            let locker = locker.clone();
            async move {
                for _ in 0..count {
                    let guard = locker.acquire("resend-free").await.unwrap();
                    guard.release().await.unwrap();
                }
            }
        };
        // The scripts loaded on every node.
        cycles(10).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let label = "lock_resends_total{backend=redlock,operation=release}";
        let resent_before = figure(label);
        let loads_before: Vec<u64> = backed
            .servers()
            .iter()
            .map(|server| server.calls("script|load").unwrap())
            .collect();
        cycles(300).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let resent = figure(label) - resent_before;
        let loads: Vec<u64> = backed
            .servers()
            .iter()
            .zip(&loads_before)
            .map(|(server, before)| server.calls("script|load").unwrap() - before)
            .collect();
        println!("fair {fair}: {resent} releases sent again, scripts loaded {loads:?}");
        // 154 re-sends (about one cycle in two) and 35–70 loads per node before. CI, two test
        // binaries at once on two cores, saw 13 re-sends once (with the derived 500 ms node
        // timeout; twice in 20 runs of the suite): a node that answers late, or a release
        // written after the next acquisition on a starved runtime, is rightly sent again. One
        // cycle in ten at most still tells the fix from its absence.
        assert!(resent <= 30.0, "fair {fair}: {resent} re-sends");
        assert!(
            loads.iter().all(|&loads| loads <= 3),
            "fair {fair}: {loads:?}"
        );
        for server in backed.servers() {
            assert_eq!(
                server.command("DBSIZE", Duration::from_secs(2)).unwrap(),
                ":0"
            );
        }
        locker.stop().await.unwrap();
    }
}

/// The INCR lock: the same, through its own re-sends (`release_later`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_counts_each_release_sent_again() {
    let _alone = one_at_a_time().await;
    let Some(binary) = redis_or_skip("inc resends") else {
        return;
    };
    figures();
    let server = RedisServer::start(&binary, &[]).unwrap();
    let lock = IncLock::connect(IncConfig {
        command_timeout: 100,
        ..IncConfig::new(server.url())
    })
    .await
    .unwrap();
    let locker = Locker::new(lock)
        .with_options(LockOptions::default().with_ttl(Duration::from_secs(5)))
        .unwrap();
    let held = locker.acquire("resent").await.unwrap();
    assert_eq!(figure("lock_held{backend=inc}"), 1.0);
    // The caller's release is `EVALSHA`, its follow-ups `EVAL` (the whole script).
    let scripts_run =
        |server: &RedisServer| server.calls("evalsha").unwrap() + server.calls("eval").unwrap();
    let counted_before = figure("lock_resends_total{backend=inc,operation=release}");
    let before = scripts_run(&server);
    server.pause().unwrap();
    let released = held.release().await;
    assert!(
        matches!(released, Err(LockError::Backend { .. })),
        "{released:?}"
    );
    assert_eq!(figure("lock_held{backend=inc}"), 0.0);
    // Pauses of 100, 200 and 400 ms between tries of up to 100 ms each: all sent by 1.2 s.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    server.resume().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = scripts_run(&server) - before;
    let resent = figure("lock_resends_total{backend=inc,operation=release}") - counted_before;
    println!(
        "inc: the stopped server received the release {received} times, {resent} counted as sent again"
    );
    assert_eq!(received, 4, "one release and three follow-ups");
    assert_eq!(resent, 3.0);
    assert_eq!(figure("lock_held{backend=inc}"), 0.0);
}

/// Redlock on three nodes, two of them stopped: the attempt fails, and the clean-up of what it
/// may have left on the stopped nodes goes out in the background. Its first round is the first
/// release those nodes are sent (nothing was sent to them before, so nothing was missed): only
/// the two follow-ups after it are sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_counts_the_background_cleanup_of_a_failed_attempt() {
    let _alone = one_at_a_time().await;
    if redis_or_skip("redlock cleanup resends").is_none() {
        return;
    }
    figures();
    let label = "lock_resends_total{backend=redlock,operation=release}";
    // `fair` off: the attempt is a plain `SET`, and a failed one leaves no place in line to take
    // back, so every script a stopped node receives is the clean-up's (with `fair` on, the
    // attempt and the take-back are scripts too, which this count cannot tell apart: CI saw
    // [4, 3] received for 4 counted).
    let mut backed = ServerBacked::start(3, |urls| {
        Redlock::new(
            RedlockConfig::new(urls)
                .with_node_timeout(Duration::from_millis(50))
                .with_fair(false),
        )
    });
    let locker = Locker::new(backed.lock().clone())
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(10))
                .with_retry(RetryPolicy::none()),
        )
        .unwrap();
    // Connected to every node before any is stopped.
    locker
        .acquire("warm")
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    // That release returned once a quorum answered: the third node's may land later (its first
    // `EVALSHA` refused with NOSCRIPT, then `SCRIPT LOAD` + `EVALSHA`), and would count as a
    // clean-up below (CI saw [4, 3] received for 4 counted; MONITOR showed the warm-up's
    // script landing late). Waited for until every node has run one and the counts stay put.
    let scripts = |backed: &mut ServerBacked<Redlock>| -> Vec<u64> {
        backed
            .servers()
            .iter()
            .map(|server| server.calls("evalsha").unwrap_or(0))
            .collect()
    };
    let landed_by = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut seen = scripts(&mut backed);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = scripts(&mut backed);
        let settled = now == seen && now.iter().all(|calls| *calls > 0);
        seen = now;
        if settled || tokio::time::Instant::now() >= landed_by {
            break;
        }
    }
    let counted_before = figure(label);
    let before: Vec<u64> = backed.servers()[1..]
        .iter()
        .map(|server| server.calls("evalsha").unwrap_or(0))
        .collect();
    for server in &backed.servers()[1..] {
        server.pause().unwrap();
    }
    let failed = locker.acquire("cleaned").await;
    assert!(failed.is_err(), "one node of three: {failed:?}");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for server in &backed.servers()[1..] {
        server.resume().unwrap();
    }
    // A follow-up counted as it is sent may still be on its way: wait until what the nodes
    // received settles (every message beyond a node's first is a counted re-send), 3 s at most.
    let mut received: Vec<u64>;
    let mut resent;
    let settle_by = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        received = backed.servers()[1..]
            .iter()
            .zip(&before)
            .map(|(server, before)| server.calls("evalsha").unwrap() - before)
            .collect();
        resent = figure(label) - counted_before;
        let sent_again: u64 = received.iter().map(|count| count.saturating_sub(1)).sum();
        if resent == sent_again as f64 || tokio::time::Instant::now() >= settle_by {
            break;
        }
    }
    println!("redlock cleanup: the stopped nodes received {received:?} releases, {resent} counted");
    // How many follow-ups fit before the nodes answer depends on timing, and a message given up
    // by its sender before it was written is counted yet never received (CI saw 5 counted for
    // [3, 3] received). What must hold: every message a node received beyond its first (the
    // clean-up itself) was counted, and nothing was counted that the nodes did not receive
    // more of than the clean-up's first round. How the first round is counted is shown
    // exactly by lock-core's `raw::follow_up` tests.
    let sent_again: u64 = received.iter().map(|count| count.saturating_sub(1)).sum();
    let total: u64 = received.iter().sum();
    assert!(
        received.iter().all(|count| *count >= 2),
        "the clean-up and at least one follow-up reach each node: {received:?}"
    );
    assert!(
        sent_again as f64 <= resent && resent <= total as f64,
        "counted {resent} re-sends, the nodes received {received:?}"
    );
}

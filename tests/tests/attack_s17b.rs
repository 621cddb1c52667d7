//! adv17b: the siblings of attack_s17a — a late attempt of a fair waiter that is gone re-joins a
//! node's line through other paths than a release's follow-up.
//!
//! A fair waiter stands in every node's line behind another process (the squatter) that holds
//! `k` with a 20 s ttl (retry delay 5 s: it asks when the test wakes it, publishing a turn on
//! its channel). One node sits behind a [`LatencyProxy`]; a fault there keeps one of the
//! waiter's attempts in flight after the round that sent it was decided by the other nodes (or,
//! on one node, during the attempt). The acquisition then ends (its future dropped, or its
//! deadline): the core's take-back (`Lock::abandon`, the release with the waiter's member) goes
//! to every node. Or the waiter is served by a later round and releases (with its member).
//! Where that release lands before the late attempt, the attempt puts the gone waiter back in
//! that node's line (entry lease = the ttl) and, once the squatter leaves, the key is reserved
//! for it (`lock-turn-reserved:<member>`): refused to everyone on that node for up to the ttl,
//! though nobody holds or waits for it.
//!
//! The six tests marked so failed before commit 80110c6 (5 of 5 runs): a lost round's
//! background undo now sends the waiter's leave to every node that refused it late once the
//! waiter has stopped waiting. The others held already (one node and inc keep the order on
//! their one connection; a winning round's follow-up, c0d9650, covers its own late attempts).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::raw::redis::TURN_CHANNEL;
use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_inc::{IncConfig, IncLock};
use lock_redlock::{ConnectionKind, Redlock, RedlockConfig};
use lock_tests::fair::{connect, line_key, release_as_fair_client, release_fair_source};
use lock_tests::proxy::LatencyProxy;
use lock_tests::server::{RedisServer, redis_or_skip};
use redis::aio::MultiplexedConnection;

const TTL: Duration = Duration::from_secs(20);
const NODE_TIMEOUT: Duration = Duration::from_millis(500);
/// What another process stores on the key.
const SQUATTER: &str = "squatter";

fn line_expiry(key: &str) -> Vec<u8> {
    [key.as_bytes(), b"\xff:queue-expiry"].concat()
}

async fn zrange(connection: &mut MultiplexedConnection, name: &[u8]) -> Vec<String> {
    redis::cmd("ZRANGE")
        .arg(name)
        .arg(0)
        .arg(-1)
        .query_async(connection)
        .await
        .unwrap()
}

async fn expiry_of(connection: &mut MultiplexedConnection, name: &[u8], member: &str) -> i64 {
    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg(name)
        .arg(member)
        .query_async(connection)
        .await
        .unwrap();
    #[allow(clippy::cast_possible_truncation)]
    score.map_or(-1, |score| score as i64)
}

/// Wakes the waiter `member` as a turn passing to it would (its client's channel, naming it):
/// its next attempt goes out at once.
async fn wake(connection: &mut MultiplexedConnection, member: &str) {
    let (instance, waiter) = member.split_at(32);
    let _: i64 = redis::cmd("PUBLISH")
        .arg(format!("{TURN_CHANNEL}{instance}"))
        .arg(waiter)
        .query_async(connection)
        .await
        .unwrap();
}

/// Waits until `member`'s entry in the line whose expiry set is `name` is renewed: an attempt of
/// the waiter just ran on that node (and went out to every node at the same moment).
async fn next_attempt(
    connection: &mut MultiplexedConnection,
    name: &[u8],
    member: &str,
    before: i64,
) {
    for _ in 0..1_000 {
        if expiry_of(connection, name, member).await != before {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("the waiter made no attempt within a second");
}

async fn noscript_refusals(connection: &mut MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("errorstats")
        .query_async(connection)
        .await
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("errorstat_NOSCRIPT:count="))
        .map_or(0, |count| count.trim().parse().unwrap())
}

/// Waits until the node refuses an EVALSHA with NOSCRIPT.
async fn next_noscript(connection: &mut MultiplexedConnection, before: u64) {
    for _ in 0..1_000 {
        if noscript_refusals(connection).await != before {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("no NOSCRIPT within a second");
}

/// The fault on the proxied node.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Its scripts flushed (an empty restart), `delay` each way: an attempt's EVALSHA, NOSCRIPT,
    /// SCRIPT LOAD and EVALSHA again take six hops.
    Noscript(Duration),
    /// Only `delay` each way (the control: every request keeps its order on the connection).
    Slow(Duration),
    /// The connections open now hold what they carry, once `pass` more requests went through,
    /// until `hold` after the acquisition ended; new connections (of a pool) pass at once. A
    /// pooled connection's checkout is a recycle round trip (`UNWATCH` + `PING`), the first
    /// request on it: with `pass` 0 the checkout waits, with 1 the attempt itself is held.
    Stall { pass: u64, hold: Duration },
}

/// How the acquisition ends.
#[derive(Clone, Copy, Debug)]
enum End {
    /// Its future is dropped this long after the attempt went out.
    Dropped(Duration),
    /// It reaches its policy's deadline (`DEADLINE`) this long after the attempt went out.
    Deadline(Duration),
    /// This long after the attempt went out, the squatter leaves nodes 0 and 1 (on node 0 as a
    /// fair client, which passes the turn to the waiter and wakes it): the waiter's next round
    /// wins there, and it releases at once.
    Served(Duration),
    /// attack_s17a's schedule: no lost round; right after the fault, the squatter leaves nodes 0
    /// and 1 (node 2 keeps the release script, as there): the woken waiter's round wins on them
    /// while its attempt on node 2 is still out, and it releases at once.
    ServedAtOnce,
}

/// The retry policy's deadline of [`End::Deadline`].
const DEADLINE: Duration = Duration::from_millis(2_000);

/// What the proxied node holds of `k` once the abandoned waiter's every follow-up had its time,
/// and then the squatter left it: `(line, value, pttl)`.
#[derive(Debug)]
struct Left {
    member: String,
    line: Vec<String>,
    value: Option<String>,
    pttl: i64,
}

impl Left {
    fn clean(&self) -> bool {
        self.line.is_empty() && self.value.is_none()
    }
}

/// `nodes` Redlock nodes (the last behind a proxy), a fair waiter in every line behind the
/// squatter; `fault` on the last node; the waiter's next attempt goes out, and `abandon_after`
/// later its acquisition is dropped (the core abandons it: the release with its member).
async fn abandoned_waiter(
    test: &str,
    nodes: usize,
    connection: ConnectionKind,
    fault: Fault,
    end: End,
) -> Option<Left> {
    let binary = redis_or_skip(test)?;
    let servers: Vec<RedisServer> = (0..nodes)
        .map(|_| RedisServer::start(&binary, &[]).unwrap())
        .collect();
    let last = nodes - 1;
    let proxy = LatencyProxy::start(servers[last].port()).await.unwrap();
    let mut urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    urls[last] = proxy.url();
    let mut direct = Vec::new();
    for server in &servers {
        direct.push(connect(&server.url()).await);
    }
    let config = RedlockConfig::new(urls)
        .with_node_timeout(NODE_TIMEOUT)
        .with_connection(connection);
    let deadline = match end {
        End::Dropped(_) | End::Served(_) | End::ServedAtOnce => Duration::from_secs(15),
        End::Deadline(_) => DEADLINE,
    };
    let retry = RetryPolicy::forever()
        .with_retry_delay(Duration::from_secs(5))
        .with_deadline(deadline);
    let locker = Locker::new(Redlock::new(config).unwrap())
        .with_local_queue(false)
        .with_options(LockOptions::default().with_ttl(TTL).with_retry(retry))
        .unwrap();

    // The squatter holds `k` on every node; the client waits in each node's line.
    for connection in &mut direct {
        let _: () = redis::cmd("SET")
            .arg("k")
            .arg(SQUATTER)
            .arg("PX")
            .arg(u64::try_from(TTL.as_millis()).unwrap())
            .query_async(connection)
            .await
            .unwrap();
    }
    let waiting = locker.clone();
    let started = tokio::time::Instant::now();
    let waiter = tokio::spawn(async move {
        match waiting.acquire("k").await {
            Ok(guard) => {
                guard.release().await.unwrap();
                None
            }
            Err(error) => Some(error),
        }
    });
    for (index, connection) in direct.iter_mut().enumerate() {
        let mut lined = Vec::new();
        for _ in 0..200 {
            lined = zrange(connection, &line_key("k")).await;
            if !lined.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(lined.len(), 1, "the waiter is not in node {index}'s line");
    }
    let member = zrange(&mut direct[0], &line_key("k")).await.remove(0);

    match fault {
        Fault::Noscript(delay) => {
            let _: () = redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query_async(&mut direct[last])
                .await
                .unwrap();
            if let End::ServedAtOnce = end {
                let _: String = redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(release_fair_source())
                    .query_async(&mut direct[last])
                    .await
                    .unwrap();
            }
            proxy.set_delay(delay);
        }
        Fault::Slow(delay) => proxy.set_delay(delay),
        Fault::Stall { pass, .. } => proxy.stall_existing(pass),
    }
    // The waiter's next attempt (its poll), seen on node 0 the moment it went out to every
    // node. With one node, on the proxied node itself, a delay after it went out: its NOSCRIPT
    // refusal, or its renewal of the waiter's entry; a stalled attempt is not seen there, and
    // one goes out within a poll (200 ms).
    if let End::ServedAtOnce = end {
        let deleted: i64 = redis::cmd("DEL")
            .arg("k")
            .query_async(&mut direct[1])
            .await
            .unwrap();
        assert_eq!(deleted, 1);
        assert_eq!(
            release_as_fair_client(&mut direct[0], "k", SQUATTER).await,
            1
        );
    }
    if let End::Deadline(before) = end {
        tokio::time::sleep_until(started + DEADLINE - before).await;
    }
    let expiry_before = match end {
        End::ServedAtOnce => 0,
        _ => expiry_of(&mut direct[0], &line_expiry("k"), &member).await,
    };
    let noscript_before = noscript_refusals(&mut direct[0]).await;
    if !matches!(end, End::ServedAtOnce) {
        wake(&mut direct[0], &member).await;
    }
    match (nodes, fault) {
        _ if matches!(end, End::ServedAtOnce) => {}
        (1, Fault::Noscript(_)) => next_noscript(&mut direct[0], noscript_before).await,
        (1, Fault::Stall { .. }) => tokio::time::sleep(Duration::from_millis(50)).await,
        _ => next_attempt(&mut direct[0], &line_expiry("k"), &member, expiry_before).await,
    }
    match end {
        End::Dropped(after) => {
            tokio::time::sleep(after).await;
            waiter.abort();
            let aborted = waiter.await.unwrap_err();
            assert!(aborted.is_cancelled(), "{aborted}");
        }
        End::Deadline(_) => {
            let error = waiter.await.unwrap().expect("the waiter was served");
            println!(
                "{test}: the acquisition ended with {error} after {:?}",
                started.elapsed()
            );
        }
        End::ServedAtOnce => {
            let served = tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("the waiter was not served")
                .unwrap();
            assert!(served.is_none(), "the waiter was not served: {served:?}");
        }
        End::Served(after) => {
            tokio::time::sleep(after).await;
            let deleted: i64 = redis::cmd("DEL")
                .arg("k")
                .query_async(&mut direct[1])
                .await
                .unwrap();
            assert_eq!(deleted, 1);
            assert_eq!(
                release_as_fair_client(&mut direct[0], "k", SQUATTER).await,
                1
            );
            let served = tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("the waiter was not served")
                .unwrap();
            assert!(served.is_none(), "the waiter was not served: {served:?}");
            println!(
                "{test}: served and released {:?} after the start",
                started.elapsed()
            );
        }
    }
    if let Fault::Stall { hold, .. } = fault {
        tokio::time::sleep(hold).await;
        proxy.release_stall();
    }
    // Every hop of the proxied node, and every follow-up (the explorer's allowance: six node
    // timeouts and 700 ms).
    tokio::time::sleep(NODE_TIMEOUT * 6 + Duration::from_millis(700)).await;
    let line_before = zrange(&mut direct[last], &line_key("k")).await;
    assert_eq!(
        release_as_fair_client(&mut direct[last], "k", SQUATTER).await,
        1
    );
    let value: Option<String> = redis::cmd("GET")
        .arg("k")
        .query_async(&mut direct[last])
        .await
        .unwrap();
    let pttl: i64 = redis::cmd("PTTL")
        .arg("k")
        .query_async(&mut direct[last])
        .await
        .unwrap();
    let _ = locker.stop().await;
    let left = Left {
        member,
        line: line_before,
        value,
        pttl,
    };
    println!("{test} ({nodes} node(s), {fault:?}, {end:?}): {left:?}");
    Some(left)
}

fn verdict(what: &str, left: &Left) {
    assert!(
        left.clean(),
        "{what}: the waiter {} is gone (its acquisition abandoned and taken back by the core, or \
         served and released), yet its late attempt put it back in the proxied node's line ({:?}), and once the \
         squatter left, `k` is {:?} for {} ms of the {TTL:?} ttl, though nobody holds or waits \
         for it",
        left.member,
        left.line,
        left.value,
        left.pttl,
    );
}

// ---------------------------------------------------------------------------------------------
// (a) three nodes, the acquisition abandoned while a lost round's attempt is still in flight.
// ---------------------------------------------------------------------------------------------

/// Failed before 80110c6. Node 2 restarted empty (NOSCRIPT) and is slow (80 ms each way: its
/// attempt's six hops take 480 ms, within the node timeout); nodes 0 and 1 refuse the waiter at
/// once, so the round is decided and the attempt on node 2 goes on in `undo_attempt`'s background.
/// The acquisition is dropped 40 ms later: the abandon's release (SCRIPT LOAD + EVALSHA in one
/// write) reaches node 2 before the attempt's retried EVALSHA, which puts the waiter back in line;
/// its late "no" is not sent the release again (`undo_late` is `Held::Mutex`, which `claims()`
/// not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_an_abandoned_waiter_is_not_put_back_in_line_by_a_late_refusal() {
    let Some(left) = abandoned_waiter(
        "s17b (a) abandoned, late refusal",
        3,
        ConnectionKind::Manager,
        Fault::Noscript(Duration::from_millis(80)),
        End::Dropped(Duration::from_millis(40)),
    )
    .await
    else {
        return;
    };
    verdict("three nodes, a late refusal after the abandon", &left);
}

/// Failed before 80110c6. As above, 100 ms each way: node 2's attempt takes 600 ms and times out
/// (the round's deadline drops it at 500 ms, after its retried EVALSHA was written at 400 ms): its
/// answer never comes, but it lands. `undo_attempt` sends a failed node the release again, but
/// without the waiter's member, so the waiter stays in that node's line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_an_abandoned_waiter_is_not_put_back_in_line_by_a_timed_out_attempt() {
    let Some(left) = abandoned_waiter(
        "s17b (a) abandoned, attempt timed out",
        3,
        ConnectionKind::Manager,
        Fault::Noscript(Duration::from_millis(100)),
        End::Dropped(Duration::from_millis(40)),
    )
    .await
    else {
        return;
    };
    verdict("three nodes, a timed-out attempt after the abandon", &left);
}

/// Failed before 80110c6. As the late refusal above, the acquisition ending at its policy's
/// deadline (60 ms after the attempt went out) rather than dropped: the core's give-up takes the
/// waiter back the same way, and the late attempt re-joins node 2's line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_a_waiter_past_its_deadline_is_not_put_back_in_line_by_a_late_refusal() {
    let Some(left) = abandoned_waiter(
        "s17b (a) deadline, late refusal",
        3,
        ConnectionKind::Manager,
        Fault::Noscript(Duration::from_millis(80)),
        End::Deadline(Duration::from_millis(60)),
    )
    .await
    else {
        return;
    };
    verdict("three nodes, a late refusal after the deadline", &left);
}

/// The control of all three: node 2 slow (80 ms each way) but with its scripts: its attempt keeps
/// its place on the connection, ahead of the abandon's release, which takes the waiter out last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_three_nodes_a_slow_node_without_noscript_leaves_nothing() {
    let Some(left) = abandoned_waiter(
        "s17b (a) control",
        3,
        ConnectionKind::Manager,
        Fault::Slow(Duration::from_millis(80)),
        End::Dropped(Duration::from_millis(40)),
    )
    .await
    else {
        return;
    };
    verdict("control (no NOSCRIPT)", &left);
}

// ---------------------------------------------------------------------------------------------
// (c) a pool: the take-back and the attempt on different connections.
// ---------------------------------------------------------------------------------------------

/// Failed before 80110c6. `connection: pool`, three nodes, node 2's open connections stalled (no
/// NOSCRIPT, no delay): the waiter's attempt there waits on its pooled connection's checkout
/// (deadpool's recycle, `UNWATCH` + `PING`, held), the round is decided by nodes 0 and 1; the
/// acquisition is dropped 40 ms later and the abandon's release reaches node 2 at once on
/// another connection of the pool. 100 ms later the stall ends, the checkout completes, the
/// attempt is sent and answers "no" well within the node timeout (nothing undoes it: the pool's
/// undo-on-drop is for an attempt dropped unanswered): the waiter is back in line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_an_abandoned_waiter_is_not_put_back_in_line_by_an_attempt_on_another_connection() {
    let Some(left) = abandoned_waiter(
        "s17b (c) pool, stalled connection",
        3,
        ConnectionKind::Pool,
        Fault::Stall {
            pass: 0,
            hold: Duration::from_millis(100),
        },
        End::Dropped(Duration::from_millis(40)),
    )
    .await
    else {
        return;
    };
    verdict("pool, the attempt overtaken on another connection", &left);
}

/// Failed before 80110c6. As above, the attempt itself held on its pooled connection (used
/// lately, it goes out without a recycle round trip): the acquisition is dropped, the abandon's release
/// reaches node 2 on another connection, and the attempt, delivered 100 ms later, answers within
/// the node timeout, so the pool's undo-on-drop (armed only while the answer is awaited) has long
/// been disarmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_an_abandoned_waiter_is_not_put_back_in_line_by_a_held_attempt() {
    let Some(left) = abandoned_waiter(
        "s17b (c) pool, attempt held",
        3,
        ConnectionKind::Pool,
        Fault::Stall {
            pass: 0,
            hold: Duration::from_millis(100),
        },
        End::Dropped(Duration::from_millis(40)),
    )
    .await
    else {
        return;
    };
    verdict(
        "pool, a held attempt overtaken on another connection",
        &left,
    );
}

/// The control of the pool case: the same stall held past the node timeout (600 ms). The
/// round's deadline drops the attempt on node 2 unanswered, and the pool's undo-on-drop sends
/// the release with the member behind it on its own connection: nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_pool_an_attempt_stalled_past_the_node_timeout_is_undone_on_its_connection() {
    let Some(left) = abandoned_waiter(
        "s17b (c) pool control",
        3,
        ConnectionKind::Pool,
        Fault::Stall {
            pass: 0,
            hold: Duration::from_millis(600),
        },
        End::Dropped(Duration::from_millis(40)),
    )
    .await
    else {
        return;
    };
    verdict("pool control, stalled past the node timeout", &left);
}

/// Failed before 80110c6. A sibling the brief did not list: `connection: pool`, three nodes, node
/// 2's open connections stalled. The waiter's round N is refused by nodes 0 and 1 at once (its
/// attempt on node 2 held on its pooled connection, in `undo_attempt`'s background); the squatter
/// then leaves nodes 0 and 1, and round N + 1 wins there, its attempt on node 2 (a new connection)
/// answering at once, so nothing of it is left in flight for the release's follow-up (the s17a
/// fix). The waiter releases (with its member, on node 2 too); the stall ends and round N's attempt
/// lands and answers "no" in time: the waiter, served and gone, is back in node 2's line, and
/// nothing sends the release again (round N's late refusal is `Held::Mutex`'s, which `claims()`
/// not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_a_lost_rounds_late_attempt_does_not_put_a_served_waiter_back_in_line() {
    let Some(left) = abandoned_waiter(
        "s17b pool, served after a lost round",
        3,
        ConnectionKind::Pool,
        Fault::Stall {
            pass: 0,
            hold: Duration::from_millis(50),
        },
        End::Served(Duration::from_millis(40)),
    )
    .await
    else {
        return;
    };
    verdict(
        "pool, a lost round's attempt after the waiter was served",
        &left,
    );
}

/// Held (by the s17a fix, in passing). The same with one multiplexed connection and NOSCRIPT
/// (80 ms each way): round N + 1's attempt on node 2 queues behind round N's on the connection,
/// so it is still in flight when the waiter releases, and the release's follow-up sends the
/// release (with the member) again after its late answer: behind round N's retried EVALSHA too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_a_lost_rounds_late_attempt_is_swept_by_the_winning_rounds_follow_up() {
    let Some(left) = abandoned_waiter(
        "s17b manager, served after a lost round",
        3,
        ConnectionKind::Manager,
        Fault::Noscript(Duration::from_millis(80)),
        End::Served(Duration::from_millis(40)),
    )
    .await
    else {
        return;
    };
    verdict(
        "manager, a lost round's attempt after the waiter was served",
        &left,
    );
}

/// Held (part 1: the s17a fix, its attempt timed out). attack_s17a's schedule with 100 ms each
/// way on node 2: the winning round's attempt there (NOSCRIPT, six hops: 600 ms) times out at
/// 500 ms, its retried EVALSHA written at 400 ms and landing after the release. Its answer never
/// comes, but the release's follow-up re-sends to a failed node, now with the member, on the
/// same connection behind the landed attempt. Negative control: fails with lock-redlock/src/lib.rs
/// of 1230448 (before the fix, a failed node heard the release again without the member).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_a_served_waiters_timed_out_attempt_is_swept_by_the_follow_up() {
    let Some(left) = abandoned_waiter(
        "s17b part 1, s17a with a timed-out attempt",
        3,
        ConnectionKind::Manager,
        Fault::Noscript(Duration::from_millis(100)),
        End::ServedAtOnce,
    )
    .await
    else {
        return;
    };
    verdict("s17a's schedule, the attempt timed out", &left);
}

// ---------------------------------------------------------------------------------------------
// (b) one node (`redis`): the attempt is the acquisition's own future.
// ---------------------------------------------------------------------------------------------

/// Held. One node, NOSCRIPT, 80 ms each way: the acquisition is dropped during its attempt's
/// NOSCRIPT exchange (the EVALSHA came back refused at 160 ms; dropped at ~120 ms counting from
/// the attempt's landing as seen on the node), so the retried EVALSHA is never sent; the
/// abandon's release lands after everything written before it. (Could fail: if the retry were
/// sent from a task of its own, as the three-node rounds' pending requests are.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_an_attempt_dropped_during_noscript_is_not_resent() {
    let Some(left) = abandoned_waiter(
        "s17b (b) one node, NOSCRIPT",
        1,
        ConnectionKind::Manager,
        Fault::Noscript(Duration::from_millis(80)),
        End::Dropped(Duration::from_millis(40)),
    )
    .await
    else {
        return;
    };
    verdict("one node, dropped during NOSCRIPT", &left);
}

/// Held. One node, NOSCRIPT, 100 ms each way: the attempt times out (its retried EVALSHA was
/// written at 400 ms and lands at 500 ms); the acquisition is dropped after the timeout, and
/// the abandon's release (the same connection) lands behind the attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_a_timed_out_attempt_lands_before_the_take_back() {
    let Some(left) = abandoned_waiter(
        "s17b (b) one node, timed out",
        1,
        ConnectionKind::Manager,
        Fault::Noscript(Duration::from_millis(100)),
        End::Dropped(Duration::from_millis(550)),
    )
    .await
    else {
        return;
    };
    verdict("one node, timed out", &left);
}

// ---------------------------------------------------------------------------------------------
// (d) inc, `fair` on, one server.
// ---------------------------------------------------------------------------------------------

/// Held. inc with `fair`, one server behind the proxy (NOSCRIPT, 80 ms each way), the squatter
/// another inc client holding `k` directly. The waiter's attempt (fred's `evalsha_with_reload`,
/// the acquisition's own future) is dropped during its NOSCRIPT exchange: its retry is never
/// sent, and the abandon's release keeps its place behind what was written on the one
/// connection. Could fail: if the retried EVALSHA went out after the abandon, the line (which
/// holds everyone out while its head's entry lives) would keep the gone waiter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_an_attempt_dropped_during_noscript_is_not_resent() {
    let Some(binary) = redis_or_skip("s17b (d) inc") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let proxy = LatencyProxy::start(server.port()).await.unwrap();
    let mut direct = connect(&server.url()).await;
    let client = |url: String| async move {
        let lock = IncLock::connect(IncConfig::new(url).with_fair(true))
            .await
            .unwrap();
        Locker::new(lock)
            .with_local_queue(false)
            .with_options(
                LockOptions::default().with_ttl(TTL).with_retry(
                    RetryPolicy::forever()
                        .with_retry_delay(Duration::from_secs(5))
                        .with_deadline(Duration::from_secs(15)),
                ),
            )
            .unwrap()
    };
    let squatter = client(server.url()).await;
    let held = squatter.acquire("k").await.unwrap();
    let locker = client(proxy.url()).await;
    let waiting = locker.clone();
    let waiter = tokio::spawn(async move {
        let guard = waiting.acquire("k").await;
        panic!("the waiter was served: {:?}", guard.map(|_| ()));
    });
    let (line, expiry) = (
        b"lock:{k}:queue".to_vec(),
        b"lock:{k}:queue-expiry".to_vec(),
    );
    let mut lined = Vec::new();
    for _ in 0..200 {
        lined = zrange(&mut direct, &line).await;
        if !lined.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(lined.len(), 1, "the waiter is not in line");
    let member = lined.remove(0);
    assert!(expiry_of(&mut direct, &expiry, &member).await > 0);

    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut direct)
        .await
        .unwrap();
    proxy.set_delay(Duration::from_millis(80));
    let noscript_before = noscript_refusals(&mut direct).await;
    wake(&mut direct, &member).await;
    next_noscript(&mut direct, noscript_before).await;
    tokio::time::sleep(Duration::from_millis(40)).await;
    waiter.abort();
    assert!(waiter.await.unwrap_err().is_cancelled());
    tokio::time::sleep(NODE_TIMEOUT * 6 + Duration::from_millis(700)).await;
    let line_before = zrange(&mut direct, &line).await;
    held.release().await.unwrap();
    let line_after = zrange(&mut direct, &line).await;
    let _ = locker.stop().await;
    let _ = squatter.stop().await;
    println!(
        "s17b (d) inc: waiter {member}; line after the abandon {line_before:?}, after the \
         squatter's release {line_after:?}"
    );
    assert!(
        line_before.is_empty() && line_after.is_empty(),
        "inc: the abandoned waiter {member} is back in line ({line_before:?}, then \
         {line_after:?}): it holds everyone out while its entry lives (up to the ttl)"
    );
}

//! Redlock's semaphores and read-write locks under faults, on real redis-servers that each test
//! starts, kills, pauses and restarts: a holder that dies frees its permit at its ttl, a node
//! paused or restarted, a minority or a majority of three nodes down, nothing left in Redis once
//! every lease is released or expired, and an over-admission checker under contention with
//! random cancellations (with its negative control: a client that lies about the size).

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lock_core::{
    Capabilities, Key, KeyState, LeaseKind, LockError, LockOptions, Locker, Result, RetryPolicy,
    raw::{Handle, Lock, LockRequest, async_trait},
};
use lock_redlock::{ConnectionKind, Redlock, RedlockConfig};
use lock_tests::backed::ServerBacked;
use lock_tests::server::{RedisServer, redis_or_skip};
use tokio::time::Instant;

const NODE_TIMEOUT: Duration = Duration::from_millis(300);
const PROBE: Duration = Duration::from_millis(500);

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

fn cluster(nodes: usize, fencing: bool) -> Option<ServerBacked<Redlock>> {
    redis_or_skip("redlock semaphore fault test")?;
    Some(ServerBacked::start(nodes, |urls| {
        Redlock::new(config(urls, fencing))
    }))
}

fn config(urls: Vec<String>, fencing: bool) -> RedlockConfig {
    RedlockConfig::new(urls)
        .with_node_timeout(NODE_TIMEOUT)
        .with_fencing(fencing)
}

/// Another client process, as far as Redis can tell: its own backend and connections.
fn other_client(backed: &mut ServerBacked<Redlock>, fencing: bool) -> Redlock {
    let urls = backed.servers().iter().map(RedisServer::url).collect();
    Redlock::new(config(urls, fencing)).unwrap()
}

fn locker(lock: impl Lock, ttl: Duration, retry: RetryPolicy) -> Locker {
    Locker::new(lock)
        .with_options(LockOptions::default().with_ttl(ttl).with_retry(retry))
        .unwrap()
}

fn quick_retry(deadline: Duration) -> RetryPolicy {
    RetryPolicy::forever()
        .with_retry_delay(ms(5))
        .with_retry_jitter(ms(5))
        .with_deadline(deadline)
}

fn permit(permits: u32) -> LeaseKind {
    LeaseKind::permit(permits).unwrap()
}

/// `DBSIZE` of every node.
fn db_sizes(backed: &mut ServerBacked<Redlock>) -> Vec<String> {
    backed
        .servers()
        .iter()
        .map(|server| server.command("DBSIZE", PROBE).unwrap())
        .collect()
}

/// Polls until every node is empty or `within` has passed; returns what the nodes hold then.
async fn empty_within(backed: &mut ServerBacked<Redlock>, within: Duration) -> Vec<String> {
    sizes_within(backed, within, |size| size == ":0").await
}

/// Polls until every node's `DBSIZE` answer is `settled` or `within` has passed; returns what
/// the nodes hold then. (A release returns once a quorum answered: on a loaded machine the
/// last node's may land a moment later.)
async fn sizes_within(
    backed: &mut ServerBacked<Redlock>,
    within: Duration,
    settled: impl Fn(&str) -> bool,
) -> Vec<String> {
    let started = Instant::now();
    loop {
        let sizes = db_sizes(backed);
        if sizes.iter().all(|size| settled(size)) || started.elapsed() > within {
            return sizes;
        }
        tokio::time::sleep(ms(20)).await;
    }
}

/// A permit holder that dies (its guard leaked, its connections closed) keeps its permit until
/// its ttl and not a moment past it (plus a scheduling margin): then the next client gets in.
async fn killed_holder_frees_its_permit_at_its_ttl(nodes: usize) {
    let Some(mut backed) = cluster(nodes, false) else {
        return;
    };
    let ttl = ms(800);
    let dying = locker(other_client(&mut backed, false), ttl, RetryPolicy::none());
    let guard = dying.acquire_permit("pool", 1).await.unwrap();
    let taken_at = Instant::now();
    // The holder dies: no release, no drop, its connections closed.
    std::mem::forget(guard);
    dying.stop().await.unwrap();
    let survivor = locker(backed.lock().clone(), ms(5_000), RetryPolicy::none());
    assert!(
        survivor
            .try_acquire_kind("pool", permit(1))
            .await
            .unwrap()
            .is_none(),
        "the dead holder's permit was handed out before its ttl"
    );
    let patient = locker(backed.lock().clone(), ms(5_000), quick_retry(ms(5_000)));
    let next = patient.acquire_permit("pool", 1).await.unwrap();
    let freed_after = taken_at.elapsed();
    println!("a dead holder's permit ({nodes} node(s), ttl {ttl:?}) freed after {freed_after:?}");
    assert!(
        freed_after >= ttl - ms(50),
        "freed after {freed_after:?}, before the ttl of {ttl:?}"
    );
    assert!(
        freed_after < ttl + ms(1_000),
        "still taken {freed_after:?} after a ttl of {ttl:?}"
    );
    next.release().await.unwrap();
    assert_eq!(empty_within(&mut backed, ms(500)).await, vec![":0"; nodes]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_permit_holder_frees_its_permit_at_its_ttl_one_node() {
    killed_holder_frees_its_permit_at_its_ttl(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_permit_holder_frees_its_permit_at_its_ttl_three_nodes() {
    killed_holder_frees_its_permit_at_its_ttl(3).await;
}

/// One node (the single-Redis semaphore) paused: attempts fail with a typed error (never a
/// permit), and after SIGCONT the holders are still counted: a full semaphore stays full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_refuses_with_a_typed_error_and_keeps_its_holders() {
    let Some(mut backed) = cluster(1, false) else {
        return;
    };
    let client = locker(backed.lock().clone(), ms(10_000), RetryPolicy::none());
    let a = client.acquire_permit("paused", 2).await.unwrap();
    let b = client.acquire_permit("paused", 2).await.unwrap();
    let reader = client.acquire_read("paused-rw").await.unwrap();
    backed.servers()[0].pause().unwrap();
    // Attempts sent to the paused node land when it resumes; their clean-up may have given up
    // by then, so they are short: what they leave expires with them.
    let ttl = ms(600);
    let waiting = locker(backed.lock().clone(), ttl, RetryPolicy::none());
    for kind in [permit(2), LeaseKind::Read, LeaseKind::Write] {
        let key = if kind == permit(2) {
            "paused"
        } else {
            "paused-rw"
        };
        let error = waiting
            .acquire_kind(
                key,
                kind,
                &LockOptions::default()
                    .with_ttl(ttl)
                    .with_retry(quick_retry(ms(700))),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                error,
                LockError::QuorumNotReached { .. } | LockError::Timeout { .. }
            ),
            "{kind} while the node is paused: {error:?}"
        );
    }
    backed.servers()[0].resume().unwrap();
    // Give the cancelled attempts' clean-ups their time on the resumed node.
    tokio::time::sleep(ms(300)).await;
    assert!(
        client
            .try_acquire_kind("paused", permit(2))
            .await
            .unwrap()
            .is_none(),
        "a third permit after the pause"
    );
    assert!(
        client
            .try_acquire_kind("paused-rw", LeaseKind::Write)
            .await
            .unwrap()
            .is_none(),
        "a writer beside the reader after the pause"
    );
    a.release().await.unwrap();
    let c = client.acquire_permit("paused", 2).await.unwrap();
    for guard in [b, c, reader] {
        guard.release().await.unwrap();
    }
    assert_eq!(empty_within(&mut backed, ttl + ms(1_000)).await, vec![":0"]);
}

/// One node restarted empty (no persistence) forgets its holders: that is the single-Redis
/// hazard, as for a mutex. Clients reconnect by themselves and the semaphore works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_serves_permits_again_without_user_action() {
    let Some(mut backed) = cluster(1, false) else {
        return;
    };
    let client = locker(backed.lock().clone(), ms(5_000), quick_retry(ms(5_000)));
    let before = client.acquire_permit("restart", 1).await.unwrap();
    backed.servers()[0].restart().unwrap();
    let after = client.acquire_permit("restart", 1).await.unwrap();
    assert!(
        client
            .try_acquire_kind("restart", permit(1))
            .await
            .unwrap()
            .is_none(),
        "a second permit of a semaphore of 1 after the restart"
    );
    let error = before.release().await.unwrap_err();
    assert!(matches!(error, LockError::NotHeld { .. }), "{error:?}");
    after.release().await.unwrap();
    let writer = client.acquire_write("restart-rw").await.unwrap();
    writer.release().await.unwrap();
    assert_eq!(empty_within(&mut backed, ms(500)).await, vec![":0"]);
}

/// Three nodes, one killed (then restarted empty): a minority down changes nothing. Permits are
/// still handed out up to the size and never past it, read-write locks still exclude.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_down_still_serves_and_never_over_admits() {
    for fencing in [false, true] {
        let Some(mut backed) = cluster(3, fencing) else {
            return;
        };
        let client = locker(backed.lock().clone(), ms(10_000), RetryPolicy::none());
        // The test's premise: the first permit is on every node before one is killed. A round
        // returns on a quorum, and a node whose first request timed out (its connection and
        // script load are slow on a loaded machine: seen once in CI) never gets the permit;
        // killed and restarted empty, the node that has it would then leave one permit on a
        // single node, and three permits of 2 are a quorum each: the restart-without-delay
        // hazard Redlock documents, not what this test is about. So the first permit is taken
        // again until every node holds it.
        let mut first = client.acquire_permit("minority", 2).await.unwrap();
        for _ in 0..5 {
            let sizes = sizes_within(&mut backed, ms(1_000), |size| size != ":0").await;
            if sizes.iter().all(|size| size != ":0") {
                break;
            }
            first.release().await.unwrap();
            first = client.acquire_permit("minority", 2).await.unwrap();
        }
        backed.servers()[2].kill();
        let second = client.acquire_permit("minority", 2).await.unwrap();
        // Never a third permit (on a loaded machine a slow node may make it a quorum error).
        let third = client.try_acquire_kind("minority", permit(2)).await;
        assert!(
            matches!(third, Ok(None) | Err(LockError::QuorumNotReached { .. })),
            "a third permit of 2 with one node down (fencing {fencing}): {third:?}"
        );
        if fencing {
            assert_ne!(first.fencing_token(), second.fencing_token());
        }
        // The killed node comes back empty: the holders still hold a majority, so the
        // semaphore stays full.
        backed.servers()[2].restart().unwrap();
        let third = client.try_acquire_kind("minority", permit(2)).await;
        assert!(
            matches!(third, Ok(None) | Err(LockError::QuorumNotReached { .. })),
            "a third permit of 2 after a minority restarted empty (fencing {fencing}): {third:?}"
        );
        let reader = client.acquire_read("minority-rw").await.unwrap();
        assert!(
            client
                .try_acquire_kind("minority-rw", LeaseKind::Write)
                .await
                .unwrap()
                .is_none(),
            "a writer beside a reader"
        );
        for guard in [first, second, reader] {
            guard.release().await.unwrap();
        }
        let writer = client.acquire_write("minority-rw").await.unwrap();
        writer.release().await.unwrap();
    }
}

/// Three nodes, two paused: every kind fails with a typed error within its deadline, nothing is
/// admitted, and once the nodes are back no attempt has left anything behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_majority_down_is_a_typed_error_and_never_admits() {
    let Some(mut backed) = cluster(3, false) else {
        return;
    };
    let ttl = ms(600);
    let holder = locker(backed.lock().clone(), ms(10_000), RetryPolicy::none());
    let held = holder.acquire_permit("majority", 1).await.unwrap();
    backed.servers()[1].pause().unwrap();
    backed.servers()[2].pause().unwrap();
    let single = locker(backed.lock().clone(), ttl, RetryPolicy::none());
    let waiting = locker(backed.lock().clone(), ttl, quick_retry(ms(800)));
    for (key, kind) in [
        ("majority", permit(1)),
        ("majority-free", permit(3)),
        ("majority-rw", LeaseKind::Read),
        ("majority-rw", LeaseKind::Write),
    ] {
        match single.try_acquire_kind(key, kind).await {
            Err(LockError::QuorumNotReached { got, needed, .. }) => {
                assert!(got < needed, "{kind}: {got} of {needed}");
            }
            // The live node answered that the key is held (the only permit is taken, or a
            // cancelled attempt's lease is still being taken back there): not an admission.
            // A key never used before must be the quorum error.
            Ok(None) if key != "majority-free" => {}
            other => panic!("{kind} with 2 of 3 nodes paused, one try: {other:?}"),
        }
        let started = Instant::now();
        let error = waiting
            .acquire_kind(
                key,
                kind,
                &LockOptions::default()
                    .with_ttl(ttl)
                    .with_retry(quick_retry(ms(800))),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                error,
                LockError::QuorumNotReached { .. } | LockError::Timeout { .. }
            ),
            "{kind} with 2 of 3 nodes paused: {error:?}"
        );
        assert!(
            started.elapsed() < ms(800) + NODE_TIMEOUT * 3,
            "{kind} gave up after {:?}",
            started.elapsed()
        );
    }
    backed.servers()[1].resume().unwrap();
    backed.servers()[2].resume().unwrap();
    // The paused majority still counts the holder: no second permit of 1.
    assert!(
        holder
            .try_acquire_kind("majority", permit(1))
            .await
            .unwrap()
            .is_none(),
        "a second permit of 1 after the majority came back"
    );
    held.release().await.unwrap();
    // Whatever the failed attempts left (a slot won on the live node, a claim) is undone or
    // expires with their ttl.
    let sizes = empty_within(&mut backed, ttl + ms(1_500)).await;
    assert_eq!(
        sizes,
        vec![":0"; 3],
        "left behind after a majority was down"
    );
}

/// Nothing of ours stays in Redis: after permits, readers, writers, a downgrade and a writer's
/// claim taken back are released, every node is empty within a second (without fencing: the
/// last node's release may land after the quorum's answer), or once the
/// fencing counters' own expiry passed (the latest value plus the ttl); leases that are never
/// released leave nothing once their ttl passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_left_in_redis_once_released_or_expired() {
    for (nodes, fencing) in [(1, false), (3, false), (1, true), (3, true)] {
        let Some(mut backed) = cluster(nodes, fencing) else {
            return;
        };
        let ttl = ms(400);
        let client = locker(backed.lock().clone(), ttl, RetryPolicy::none());
        let mut guards = Vec::new();
        for _ in 0..3 {
            guards.push(client.acquire_permit("sem", 3).await.unwrap());
        }
        guards.push(client.acquire_read("rw").await.unwrap());
        guards.push(client.acquire_read("rw").await.unwrap());
        // A writer that waits leaves a claim, taken back when it gives up.
        let error = locker(backed.lock().clone(), ttl, quick_retry(ms(60)))
            .acquire_write("rw")
            .await
            .unwrap_err();
        assert!(matches!(error, LockError::Timeout { .. }), "{error:?}");
        for guard in guards.drain(..) {
            guard.release().await.unwrap();
        }
        let mut writer = client.acquire_write("rw").await.unwrap();
        writer.downgrade().await.unwrap();
        writer.release().await.unwrap();
        let sizes = if fencing {
            // Only the fencing counters may stay, and no longer than their own expiry.
            let left =
                sizes_within(&mut backed, ms(1_000), |size| size == ":0" || size == ":2").await;
            assert!(
                left.iter().all(|size| size == ":0" || size == ":2"),
                "{nodes} node(s), fenced: {left:?} (expected at most the 2 counters)"
            );
            empty_within(&mut backed, ttl + ms(1_000)).await
        } else {
            empty_within(&mut backed, ms(1_000)).await
        };
        assert_eq!(
            sizes,
            vec![":0"; nodes],
            "{nodes} node(s), fencing {fencing}: left after every release"
        );
        // Leases never released: gone with their ttl.
        let leaked = [
            client.acquire_permit("sem", 3).await.unwrap(),
            client.acquire_read("rw").await.unwrap(),
            client.acquire_write("other-rw").await.unwrap(),
        ];
        for guard in leaked {
            std::mem::forget(guard);
        }
        let sizes = empty_within(&mut backed, ttl + ms(1_000)).await;
        assert_eq!(
            sizes,
            vec![":0"; nodes],
            "{nodes} node(s), fencing {fencing}: left after the ttl"
        );
    }
}

/// A client that asks for twice the permits the others use, but tells nobody: its requests
/// reach Redis as a semaphore of `2 × permits`. The negative control of the checker below.
#[derive(Debug)]
struct Oversized(Redlock);

#[async_trait]
impl Lock for Oversized {
    fn name(&self) -> &'static str {
        "oversized"
    }

    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }

    fn try_acquire<'a>(
        &'a self,
        request: &'a LockRequest,
    ) -> lock_core::raw::Answer<'a, Result<Option<Box<dyn Handle>>>> {
        lock_core::raw::Answer::later(async move {
            let request = match request.kind() {
                LeaseKind::Permit { permits } => request
                    .clone()
                    .with_kind(LeaseKind::permit(permits.get() * 2)?),
                _ => request.clone(),
            };
            self.0.try_acquire(&request).await
        })
    }

    fn abandon<'a>(&'a self, request: &'a LockRequest) -> lock_core::raw::Answer<'a, Result<bool>> {
        lock_core::raw::Answer::later(async move { self.0.abandon(request).await })
    }

    async fn inspect(&self, key: &Key) -> Result<Vec<KeyState>> {
        self.0.inspect(key).await
    }
}

/// The most holders of a semaphore of `permits` seen at once by tasks of two clients that take
/// permits with random cancellations (an acquisition dropped at a random moment, a holder
/// dropped mid-section) for `rounds` rounds each.
async fn most_holders_at_once(clients: [Locker; 2], permits: u32, rounds: usize) -> usize {
    let active = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..8u64 {
        let client = clients[task as usize % 2].clone();
        let (active, most) = (Arc::clone(&active), Arc::clone(&most));
        tasks.spawn(async move {
            // A small generator per task: the cancellations differ from task to task.
            let mut state =
                0x9e37_79b9_7f4a_7c15u64 ^ (task + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            let mut next = move |below: u64| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state % below
            };
            for _ in 0..rounds {
                let patience = ms(5 + next(60));
                let Ok(Ok(guard)) =
                    tokio::time::timeout(patience, client.acquire_permit("checked", permits)).await
                else {
                    continue;
                };
                let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(ms(next(12))).await;
                active.fetch_sub(1, Ordering::SeqCst);
                if next(4) == 0 {
                    drop(guard); // released in the background
                } else {
                    let _ = guard.release().await;
                }
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
    }
    most.load(Ordering::SeqCst)
}

/// The over-admission checker on 1 and 3 nodes (with and without fencing, manager and pool):
/// eight tasks of two clients on a semaphore of 2, with random cancellations, never see more
/// than 2 holders. Its negative control: when one client asks for 4 permits, the same checker
/// sees more than 2 (so it can fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permits_are_never_over_admitted_under_contention_and_cancellation() {
    const PERMITS: u32 = 2;
    for (nodes, fencing, connection) in [
        (1, false, ConnectionKind::Manager),
        (3, false, ConnectionKind::Manager),
        (3, true, ConnectionKind::Pool),
    ] {
        let Some(mut backed) = cluster(nodes, fencing) else {
            return;
        };
        let urls: Vec<String> = backed.servers().iter().map(RedisServer::url).collect();
        let client = || {
            let config = config(urls.clone(), fencing).with_connection(connection);
            locker(
                Redlock::new(config).unwrap(),
                ms(2_000),
                quick_retry(ms(10_000)),
            )
        };
        let most = most_holders_at_once([client(), client()], PERMITS, 25).await;
        println!("{nodes} node(s), fencing {fencing}, {connection:?}: at most {most} of {PERMITS}");
        assert!(
            most <= PERMITS as usize,
            "{most} holders of a semaphore of {PERMITS}"
        );
        assert_eq!(most, PERMITS as usize, "the semaphore never filled up");
        let sizes = empty_within(&mut backed, ms(2_000) + ms(1_500)).await;
        assert_eq!(sizes, vec![":0"; nodes], "left after the contention");

        // Negative control: an oversized client beside an honest one is refused with
        // KindMismatch while the honest one holds; alone on the key, it over-admits, and the
        // checker sees it.
        let oversized = || {
            let config = config(urls.clone(), fencing).with_connection(connection);
            locker(
                Oversized(Redlock::new(config).unwrap()),
                ms(2_000),
                quick_retry(ms(10_000)),
            )
        };
        // Slower setups (two rounds per fenced attempt) may need a few runs to overlap.
        let mut most = 0;
        for _ in 0..5 {
            most = most_holders_at_once([oversized(), oversized()], PERMITS, 25).await;
            if most > PERMITS as usize {
                break;
            }
        }
        println!("negative control ({nodes} node(s)): at most {most} of {PERMITS}");
        assert!(
            most > PERMITS as usize,
            "the checker did not see an oversized semaphore over-admit ({most})"
        );
        let honest = client();
        let held = honest.acquire_permit("mixed", PERMITS).await.unwrap();
        match oversized().try_acquire_kind("mixed", permit(PERMITS)).await {
            Err(LockError::KindMismatch { found, .. }) => {
                assert!(found.contains(&PERMITS.to_string()), "{found}");
            }
            other => panic!("a semaphore of {PERMITS} asked as one of 4: {other:?}"),
        }
        held.release().await.unwrap();
    }
}

/// A lease alone on its key is one string (taking and releasing it costs what a mutex costs);
/// a second holder turns it into the set of holders without touching the first one's expiry,
/// and every operation of the first holder works in both forms: extend, downgrade, release. A
/// mutex asked on a key a lease holds alone is told what the key is, not left waiting.
#[tokio::test]
async fn a_lease_alone_is_one_string_and_a_second_holder_keeps_the_first_ones_expiry() {
    let Some(mut backed) = cluster(1, false) else {
        return;
    };
    let first = locker(backed.lock().clone(), ms(3_000), RetryPolicy::none());
    let second = locker(
        other_client(&mut backed, false),
        ms(60_000),
        RetryPolicy::none(),
    );
    let url = backed.servers()[0].url();
    let mut connection = redis::Client::open(url).unwrap().get_connection().unwrap();
    let mut ask = |command: &str, key: &str| -> redis::Value {
        redis::cmd(command).arg(key).query(&mut connection).unwrap()
    };
    let status = |value: redis::Value| match value {
        redis::Value::SimpleString(text) => text,
        other => format!("{other:?}"),
    };
    let number = |value: redis::Value| match value {
        redis::Value::Int(number) => number,
        other => panic!("not a number: {other:?}"),
    };

    let mut writer = first.acquire_write("solo").await.unwrap();
    assert_eq!(status(ask("TYPE", "solo")), "string", "a writer alone");
    let refused = second.try_acquire("solo").await;
    assert!(
        matches!(refused, Err(LockError::KindMismatch { ref found, .. }) if found == "a read-write lock"),
        "a mutex on a lease alone: {refused:?}"
    );
    writer.extend(ms(4_000)).await.unwrap();
    assert!(number(ask("PTTL", "solo")) > 3_000, "extended alone");
    writer.downgrade().await.unwrap();
    assert_eq!(writer.kind(), LeaseKind::Read);
    assert_eq!(status(ask("TYPE", "solo")), "string", "downgraded in place");
    // A second reader: the set of holders; the key lives as long as its latest holder.
    let other = second.acquire_read("solo").await.unwrap();
    assert_eq!(status(ask("TYPE", "solo")), "zset");
    assert!(number(ask("PTTL", "solo")) > 50_000);
    assert_eq!(
        number(ask("ZCARD", "solo")),
        3,
        "the marker and two readers"
    );
    writer.extend(ms(4_000)).await.unwrap();
    writer.release().await.unwrap();
    assert_eq!(
        number(ask("ZCARD", "solo")),
        2,
        "the marker and the second reader"
    );
    other.release().await.unwrap();
    assert_eq!(number(ask("EXISTS", "solo")), 0, "nothing left");

    // Permits: alone, then two; the first holder's expiry (kept through the change of form)
    // ends its permit, not the key.
    let kept = first.acquire_permit("sem", 2).await.unwrap();
    assert_eq!(status(ask("TYPE", "sem")), "string");
    let wider = second.acquire_permit("sem", 3).await;
    assert!(
        matches!(wider, Err(LockError::KindMismatch { ref found, .. }) if found == "a semaphore of 2 permit(s)"),
        "another size on a permit alone: {wider:?}"
    );
    let also = second.acquire_permit("sem", 2).await.unwrap();
    assert_eq!(status(ask("TYPE", "sem")), "zset");
    assert!(
        second
            .try_acquire_kind("sem", permit(2))
            .await
            .unwrap()
            .is_none(),
        "two permits of two are taken"
    );
    std::mem::forget(kept); // its holder dies
    tokio::time::sleep(ms(3_200)).await;
    let third = second.acquire_permit("sem", 2).await.unwrap();
    also.release().await.unwrap();
    third.release().await.unwrap();
    assert_eq!(number(ask("EXISTS", "sem")), 0, "nothing left");
}

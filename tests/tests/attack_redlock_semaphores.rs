//! Adversarial checks of Redlock's semaphores and read-write locks on real redis-servers: what
//! `inspect` says of a key kept only by a waiting writer's claim, expiries left on every key
//! after a downgrade, calls after `stop`, and a waiting writer's claim that lands after its
//! clean-up.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::{
    Holding, Key, LeaseKind, LockError, LockOptions, Locker, RetryPolicy, Token,
    raw::{KeySet, Lock, LockRequest},
};
use lock_redlock::{ConnectionKind, Redlock, RedlockConfig};
use lock_tests::backed::ServerBacked;
use lock_tests::proxy::LatencyProxy;
use lock_tests::server::{RedisServer, redis_or_skip};

const PROBE: Duration = Duration::from_millis(500);

fn cluster(nodes: usize) -> Option<ServerBacked<Redlock>> {
    redis_or_skip("attack redlock semaphores")?;
    Some(ServerBacked::start(nodes, |urls| {
        Redlock::new(RedlockConfig::new(urls).with_node_timeout(Duration::from_millis(300)))
    }))
}

fn single(lock: &Redlock, ttl: Duration) -> Locker {
    Locker::new(lock.clone())
        .with_options(
            LockOptions::default()
                .with_ttl(ttl)
                .with_retry(RetryPolicy::none()),
        )
        .unwrap()
}

/// Waits (2 s at most) until every node holds `key`: an acquisition returns once a quorum has
/// answered, and what it sent the others may still be on its way.
async fn on_every_node(backed: &mut ServerBacked<Redlock>, key: &[u8]) {
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    let urls: Vec<String> = backed.servers().iter().map(RedisServer::url).collect();
    for url in urls {
        let mut connection = redis::Client::open(url).unwrap().get_connection().unwrap();
        while !redis::cmd("EXISTS")
            .arg(key)
            .query::<bool>(&mut connection)
            .unwrap()
        {
            assert!(
                tokio::time::Instant::now() < until,
                "never reached every node"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A key whose holders all left while a writer waits is kept by the writer's claim alone: no
/// reader can take it, so `inspect` must not call it free on any node.
async fn inspect_of_a_claim_only_key(nodes: usize) {
    let Some(mut backed) = cluster(nodes) else {
        return;
    };
    let lock = backed.lock().clone();
    let ttl = Duration::from_secs(10);
    let reader = single(&lock, ttl).acquire_read("doc").await.unwrap();
    // The reader on every node first, so that every node refuses the writer and keeps its
    // claim (a node the reader had not reached yet would admit the writer, and the failed
    // attempt would then take it back there: the test raced with the third node).
    on_every_node(&mut backed, b"doc").await;
    let key = Key::new("doc").unwrap();
    let writer = LockRequest::new(KeySet::one(key.clone()), Token::generate().unwrap(), ttl)
        .unwrap()
        .with_kind(LeaseKind::Write)
        .with_will_wait(true);
    assert!(lock.try_acquire(&writer).await.unwrap().is_none());
    on_every_node(&mut backed, b"doc\xff:claim").await;
    reader.release().await.unwrap();
    let refused = single(&lock, ttl)
        .try_acquire_kind("doc", LeaseKind::Read)
        .await
        .unwrap();
    assert!(refused.is_none(), "the claim should keep the reader out");
    // Held where the claim stands. A node whose refusal came after the round was decided
    // (late, on a loaded machine) has its claim taken back at once by the attempt's clean-up:
    // it is free there, truly, and the claims on a majority still keep every reader out. So a
    // majority of nodes, never fewer, must say held (a loaded run here saw one in three free).
    let states = lock.inspect(&key).await.unwrap();
    let held = states
        .iter()
        .filter(|state| matches!(state.holding, Holding::Held { ttl: Some(_) }))
        .count();
    assert!(
        held > nodes / 2,
        "inspect says {:?} while no reader can take the key",
        states
            .iter()
            .map(|state| (&state.node, &state.holding))
            .collect::<Vec<_>>()
    );
    assert!(lock.abandon(&writer).await.unwrap(), "claim taken back");
    let states = lock.inspect(&key).await.unwrap();
    for state in &states {
        assert!(
            matches!(state.holding, Holding::Free),
            "after the claim was taken back inspect says {:?}",
            state.holding
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_calls_a_claim_only_key_held_one_node() {
    inspect_of_a_claim_only_key(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_calls_a_claim_only_key_held_three_nodes() {
    inspect_of_a_claim_only_key(3).await;
}

/// After a downgrade (and after each further step) every key on every node has an expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downgrade_leaves_every_key_with_an_expiry() {
    let Some(mut backed) = cluster(3) else {
        return;
    };
    let lock = backed.lock().clone();
    let ttl = Duration::from_secs(10);
    let mut writer = single(&lock, ttl).acquire_write("doc").await.unwrap();
    writer.downgrade().await.unwrap();
    let other = single(&lock, ttl).acquire_read("doc").await.unwrap();
    // Beyond the quorum, requests may still be on their way: the key on every node first.
    on_every_node(&mut backed, b"doc").await;
    for server in backed.servers() {
        let pttl = server.command("PTTL doc", PROBE).unwrap();
        assert!(
            !pttl.starts_with(":-"),
            "after a downgrade the set has PTTL {pttl}"
        );
    }
    other.release().await.unwrap();
    writer.release().await.unwrap();
    // A release that overtook a late acquisition on a node is sent again once it has answered.
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    for server in backed.servers() {
        while server.command("DBSIZE", PROBE).unwrap() != ":0" {
            assert!(
                tokio::time::Instant::now() < until,
                "left on a node: DBSIZE {}",
                server.command("DBSIZE", PROBE).unwrap()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Every call on a guard after `stop` fails with `Stopped`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_after_stop_fail_with_stopped() {
    let Some(mut backed) = cluster(3) else {
        return;
    };
    let lock = Redlock::new(
        RedlockConfig::new(
            backed
                .servers()
                .iter()
                .map(RedisServer::url)
                .collect::<Vec<_>>(),
        )
        .with_node_timeout(Duration::from_millis(300)),
    )
    .unwrap();
    let locker = single(&lock, Duration::from_secs(10));
    let mut writer = locker.acquire_write("doc").await.unwrap();
    let mut permit = locker.acquire_permit("pool", 2).await.unwrap();
    locker.stop().await.unwrap();
    let downgraded = writer.downgrade().await;
    assert!(
        matches!(downgraded, Err(LockError::Stopped)),
        "downgrade after stop: {downgraded:?}"
    );
    let extended = permit.extend(Duration::from_secs(5)).await;
    assert!(
        matches!(extended, Err(LockError::Stopped)),
        "extend after stop: {extended:?}"
    );
    let released = permit.release().await;
    assert!(
        matches!(released, Err(LockError::Stopped)),
        "release after stop: {released:?}"
    );
}

/// With a pool, a waiting writer's attempt that timed out stays in flight on its connection and
/// leaves its claim when it lands, after every clean-up sent on other connections: the claim
/// must not outlive them, or readers stay out for its whole ttl with no writer waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_claim_of_a_writer_that_gave_up_is_taken_back() {
    let Some(binary) = redis_or_skip("attack redlock semaphores: late claim") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let proxy = LatencyProxy::start(server.port()).await.unwrap();
    let lock = Redlock::new(
        RedlockConfig::new([proxy.url()])
            .with_node_timeout(Duration::from_millis(200))
            .with_connection(ConnectionKind::Pool),
    )
    .unwrap();
    let ttl = Duration::from_secs(30);
    let reader = single(&lock, ttl).acquire_read("doc").await.unwrap();
    let key = Key::new("doc").unwrap();
    let writer = LockRequest::new(KeySet::one(key), Token::generate().unwrap(), ttl)
        .unwrap()
        .with_kind(LeaseKind::Write)
        .with_will_wait(true);
    // A pooled connection used lately goes out unchecked: the writer's script is held.
    proxy.stall_existing(0);
    let outcome = lock.try_acquire(&writer).await;
    assert!(outcome.is_err(), "the stalled node answered: {outcome:?}");
    // What the core does for an attempt whose outcome is unknown.
    let _ = lock.abandon(&writer).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.release_stall();
    tokio::time::sleep(Duration::from_millis(500)).await;
    reader.release().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let admitted = single(&lock, ttl)
        .try_acquire_kind("doc", LeaseKind::Read)
        .await
        .unwrap();
    let left = server.command("DBSIZE", PROBE).unwrap();
    assert!(
        admitted.is_some(),
        "a reader is kept out by the claim of a writer that gave up (DBSIZE {left}, ttl {} s)",
        ttl.as_secs()
    );
    admitted.unwrap().release().await.unwrap();
}

/// A writer that wins on a majority while a minority node refuses it (a leftover reader there)
/// leaves its claim on that node in the winning round; its release must take it back, or once
/// another node is down that claim alone keeps every reader out for the claim's ttl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_winning_writers_claim_on_a_refusing_node_goes_with_its_release() {
    let Some(mut backed) = cluster(3) else {
        return;
    };
    let lock = backed.lock().clone();
    let ttl = Duration::from_secs(30);
    let third = Redlock::new(
        RedlockConfig::new([backed.servers()[2].url()])
            .with_node_timeout(Duration::from_millis(300)),
    )
    .unwrap();
    // A reader's leftover on the third node only.
    let leftover = single(&third, Duration::from_millis(800))
        .acquire_read("doc")
        .await
        .unwrap();
    // A writer that would wait: it wins on the first two nodes, the third refuses it.
    let waiting = Locker::new(lock.clone())
        .with_options(
            LockOptions::default().with_ttl(ttl).with_retry(
                RetryPolicy::forever()
                    .with_retry_delay(Duration::from_millis(5))
                    .with_deadline(Duration::from_secs(5)),
            ),
        )
        .unwrap();
    let writer = waiting.acquire_write("doc").await.unwrap();
    writer.release().await.unwrap();
    std::mem::forget(leftover);
    // The leftover expires; then the first node goes down.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    backed.servers()[0].kill();
    let admitted = single(&lock, ttl)
        .try_acquire_kind("doc", LeaseKind::Read)
        .await;
    let left = backed.servers()[2].command("DBSIZE", PROBE).unwrap();
    assert!(
        matches!(admitted, Ok(Some(_))),
        "nothing is held, yet a reader gets {admitted:?} (third node DBSIZE {left}, claim ttl {} s)",
        ttl.as_secs()
    );
}

fn fenced_cluster(nodes: usize) -> Option<ServerBacked<Redlock>> {
    redis_or_skip("attack redlock semaphores: fencing")?;
    Some(ServerBacked::start(nodes, |urls| {
        Redlock::new(
            RedlockConfig::new(urls)
                .with_node_timeout(Duration::from_millis(300))
                .with_fencing(true),
        )
    }))
}

/// Concurrent permits of one semaphore over three fenced nodes, each client its own process as
/// far as Redis can tell: no two acquisitions ever share a fencing token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fenced_permits_never_share_a_token() {
    let Some(mut backed) = fenced_cluster(3) else {
        return;
    };
    let urls: Vec<String> = backed.servers().iter().map(RedisServer::url).collect();
    // Every node's counter starts at one value ahead of the clocks (as after values raised
    // from a node whose clock runs ahead): each node then draws counter + 1, counter + 2, ...,
    // so that draws on different nodes coincide and only the raise keeps fences apart.
    for url in &urls {
        let mut connection = redis::Client::open(url.as_str())
            .unwrap()
            .get_connection()
            .unwrap();
        let _: () = redis::cmd("SET")
            .arg(b"pool\xff:fence".as_slice())
            .arg(1_u64 << 52)
            .arg("PX")
            .arg(60_000)
            .query(&mut connection)
            .unwrap();
    }
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let lock = Redlock::new(
            RedlockConfig::new(urls.clone())
                .with_node_timeout(Duration::from_millis(300))
                .with_fencing(true),
        )
        .unwrap();
        let locker = Locker::new(lock)
            .with_options(
                LockOptions::default()
                    .with_ttl(Duration::from_secs(5))
                    .with_retry(
                        RetryPolicy::forever()
                            .with_retry_delay(Duration::from_millis(2))
                            .with_deadline(Duration::from_secs(10)),
                    ),
            )
            .unwrap();
        tasks.push(tokio::spawn(async move {
            let mut fences = Vec::new();
            for _ in 0..25 {
                let guard = locker.acquire_permit("pool", 3).await.unwrap();
                fences.push(guard.fencing_token().unwrap());
                guard.release().await.unwrap();
            }
            fences
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        let fences = task.await.unwrap();
        assert!(
            fences.windows(2).all(|pair| pair[0] < pair[1]),
            "one client's fences went down: {fences:?}"
        );
        all.extend(fences);
    }
    let count = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), count, "two permits shared a fencing token");
}

/// One key used in turn as a semaphore, a mutex, a read-write lock (writer, then readers) over
/// three fenced nodes: every fencing token is above every earlier one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fences_increase_across_kinds_on_one_key() {
    let Some(backed) = fenced_cluster(3) else {
        return;
    };
    let locker = single(backed.lock(), Duration::from_secs(5));
    let mut fences = Vec::new();
    for _ in 0..3 {
        let permit = locker.acquire_permit("k", 2).await.unwrap();
        fences.push(permit.fencing_token().unwrap());
        let second = locker.acquire_permit("k", 2).await.unwrap();
        fences.push(second.fencing_token().unwrap());
        permit.release().await.unwrap();
        second.release().await.unwrap();
        let mutex = locker.acquire("k").await.unwrap();
        fences.push(mutex.fencing_token().unwrap());
        mutex.release().await.unwrap();
        let mut writer = locker.acquire_write("k").await.unwrap();
        fences.push(writer.fencing_token().unwrap());
        writer.downgrade().await.unwrap();
        let reader = locker.acquire_read("k").await.unwrap();
        fences.push(reader.fencing_token().unwrap());
        reader.release().await.unwrap();
        writer.release().await.unwrap();
    }
    assert!(
        fences.windows(2).all(|pair| pair[0] < pair[1]),
        "fences did not increase across kinds: {fences:?}"
    );
}

/// A downgrade that reaches one node of three (the others paused, its script queued to them)
/// marks the writer lost; once the nodes are back and the writer released, nothing of it stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downgrade_on_a_minority_is_lost_and_leaves_nothing() {
    let Some(mut backed) = cluster(3) else {
        return;
    };
    let lock = backed.lock().clone();
    let mut writer = single(&lock, Duration::from_secs(10))
        .acquire_write("doc")
        .await
        .unwrap();
    backed.servers()[1].pause().unwrap();
    backed.servers()[2].pause().unwrap();
    let downgraded = writer.downgrade().await;
    assert!(
        downgraded.is_err(),
        "a downgrade on one node of three: {downgraded:?}"
    );
    // While in doubt, neither a reader nor a writer gets in on the one live node.
    let reader = single(&lock, Duration::from_secs(10))
        .try_acquire_kind("doc", LeaseKind::Read)
        .await;
    assert!(
        !matches!(reader, Ok(Some(_))),
        "a reader got in: {reader:?}"
    );
    backed.servers()[1].resume().unwrap();
    backed.servers()[2].resume().unwrap();
    let _ = writer.release().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for server in backed.servers() {
        assert_eq!(
            server.command("DBSIZE", PROBE).unwrap(),
            ":0",
            "a lost downgrade left something on a node"
        );
    }
    let next = single(&lock, Duration::from_secs(10))
        .try_acquire_kind("doc", LeaseKind::Write)
        .await
        .unwrap();
    assert!(
        next.is_some(),
        "a writer is kept out after the lost writer released"
    );
}

/// Over three nodes, a key held as one kind of lock is never admitted as another kind, nor as
/// a semaphore of another size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinds_and_sizes_never_mix_on_one_key_over_three_nodes() {
    let Some(backed) = cluster(3) else {
        return;
    };
    let locker = single(backed.lock(), Duration::from_secs(10));
    let kinds = [
        LeaseKind::Exclusive,
        LeaseKind::permit(2).unwrap(),
        LeaseKind::permit(3).unwrap(),
        LeaseKind::Read,
        LeaseKind::Write,
    ];
    for held in kinds {
        let guard = locker.try_acquire_kind("k", held).await.unwrap().unwrap();
        for asked in kinds {
            let compatible = held == asked
                && (held == LeaseKind::Read || matches!(held, LeaseKind::Permit { .. }));
            let outcome = locker.try_acquire_kind("k", asked).await;
            match outcome {
                Ok(Some(other)) => {
                    assert!(compatible, "{asked} admitted on a key held as {held}");
                    other.release().await.unwrap();
                }
                Ok(None) => assert!(
                    !compatible || held == asked,
                    "{asked} refused on a key held as {held}"
                ),
                Err(LockError::KindMismatch { .. }) => {
                    assert!(!compatible, "{asked} called a mismatch beside {held}");
                }
                Err(error) => panic!("{asked} beside {held}: {error}"),
            }
        }
        guard.release().await.unwrap();
    }
}

/// User keys that look like a key's companions (its claim, its fencing counter; `ÿ` is U+00FF,
/// two bytes in UTF-8, never the byte 0xFF) are keys of their own: locking them neither frees
/// nor takes the companion, on one node and on three fenced nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_look_like_companions_are_keys_of_their_own() {
    for nodes in [1, 3] {
        let Some(backed) = fenced_cluster(nodes) else {
            return;
        };
        let lock = backed.lock().clone();
        let ttl = Duration::from_secs(10);
        let locker = single(&lock, ttl);
        let reader = locker.acquire_read("doc").await.unwrap();
        let writer = LockRequest::new(
            KeySet::one(Key::new("doc").unwrap()),
            Token::generate().unwrap(),
            ttl,
        )
        .unwrap()
        .with_kind(LeaseKind::Write)
        .with_will_wait(true);
        assert!(lock.try_acquire(&writer).await.unwrap().is_none());
        let mut others = Vec::new();
        for name in [
            "doc\u{ff}:claim",
            "doc:claim",
            "doc\u{ff}:fence",
            "doc:fence",
        ] {
            let guard = locker.try_acquire(name).await.unwrap();
            assert!(guard.is_some(), "`{name}` is held on {nodes} node(s)");
            others.push(guard.unwrap());
            let reader = locker.try_acquire_kind(name, LeaseKind::Read).await;
            assert!(
                matches!(reader, Err(LockError::KindMismatch { .. })),
                "a reader of `{name}` got {reader:?}"
            );
        }
        let late = locker
            .try_acquire_kind("doc", LeaseKind::Read)
            .await
            .unwrap();
        assert!(late.is_none(), "the claim of `doc` went on {nodes} node(s)");
        for guard in others {
            guard.release().await.unwrap();
        }
        assert!(lock.abandon(&writer).await.unwrap());
        reader.release().await.unwrap();
    }
}

/// Readers, writers and downgrades of tasks of two clients over three nodes, with random
/// cancellations (an acquisition dropped at a random moment, a guard dropped instead of
/// released) and one node paused for a while in the middle: a writer is never seen beside
/// another holder. Returns the most readers seen at once and whether a violation was seen.
async fn rw_exclusion_under_cancellation(
    backed: &mut ServerBacked<Redlock>,
    clients: [Locker; 2],
) -> (usize, bool) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let readers = Arc::new(AtomicUsize::new(0));
    let writers = Arc::new(AtomicUsize::new(0));
    let most_readers = Arc::new(AtomicUsize::new(0));
    let violated = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..8u64 {
        let client = clients[task as usize % 2].clone();
        let (readers, writers, most_readers, violated) = (
            Arc::clone(&readers),
            Arc::clone(&writers),
            Arc::clone(&most_readers),
            Arc::clone(&violated),
        );
        tasks.spawn(async move {
            let mut state = 0x2545_f491_4f6c_dd1du64 ^ (task + 7).wrapping_mul(0x9e37_79b9);
            let mut next = move |below: u64| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state % below
            };
            for _ in 0..30 {
                let patience = Duration::from_millis(5 + next(80));
                let write = next(2) == 0;
                if write {
                    let Ok(Ok(mut guard)) =
                        tokio::time::timeout(patience, client.acquire_write("rw")).await
                    else {
                        continue;
                    };
                    let now = writers.fetch_add(1, Ordering::SeqCst) + 1;
                    if now > 1 || readers.load(Ordering::SeqCst) > 0 {
                        violated.store(true, Ordering::SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(next(8))).await;
                    if next(3) == 0 {
                        writers.fetch_sub(1, Ordering::SeqCst);
                        if guard.downgrade().await.is_ok() {
                            readers.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(next(8))).await;
                            readers.fetch_sub(1, Ordering::SeqCst);
                        }
                    } else {
                        writers.fetch_sub(1, Ordering::SeqCst);
                    }
                    if next(4) == 0 {
                        drop(guard);
                    } else {
                        let _ = guard.release().await;
                    }
                } else {
                    let Ok(Ok(guard)) =
                        tokio::time::timeout(patience, client.acquire_read("rw")).await
                    else {
                        continue;
                    };
                    let now = readers.fetch_add(1, Ordering::SeqCst) + 1;
                    most_readers.fetch_max(now, Ordering::SeqCst);
                    if writers.load(Ordering::SeqCst) > 0 {
                        violated.store(true, Ordering::SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(next(8))).await;
                    readers.fetch_sub(1, Ordering::SeqCst);
                    if next(4) == 0 {
                        drop(guard);
                    } else {
                        let _ = guard.release().await;
                    }
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    backed.servers()[1].pause().unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    backed.servers()[1].resume().unwrap();
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
    }
    (
        most_readers.load(Ordering::SeqCst),
        violated.load(Ordering::SeqCst),
    )
}

/// The read-write checker over three nodes, manager and pool (negative control, by hand: a
/// script that admits a writer beside one holder is caught).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_are_alone_under_cancellation_and_a_paused_node() {
    for connection in [ConnectionKind::Manager, ConnectionKind::Pool] {
        let Some(mut backed) = cluster(3) else {
            return;
        };
        let urls: Vec<String> = backed.servers().iter().map(RedisServer::url).collect();
        let client = || {
            Locker::new(
                Redlock::new(
                    RedlockConfig::new(urls.clone())
                        .with_node_timeout(Duration::from_millis(300))
                        .with_connection(connection),
                )
                .unwrap(),
            )
            .with_options(
                LockOptions::default()
                    .with_ttl(Duration::from_secs(3))
                    .with_retry(
                        RetryPolicy::forever()
                            .with_retry_delay(Duration::from_millis(3))
                            .with_retry_jitter(Duration::from_millis(3))
                            .with_deadline(Duration::from_secs(10)),
                    ),
            )
            .unwrap()
        };
        let (most, violated) =
            rw_exclusion_under_cancellation(&mut backed, [client(), client()]).await;
        println!("{connection:?}: at most {most} readers at once, violation {violated}");
        assert!(
            !violated,
            "a writer was seen beside another holder ({connection:?})"
        );
    }
}

//! Adversarial checks of a Redlock lease stored alone on its key (one string: marker, zero
//! byte, tag, token) on real redis-servers: the change to the set of holders in the very
//! millisecond the lone holder ends, a value of another application that looks like a lease
//! alone (a binary string beginning with the byte 0xFF and holding a zero byte), and a
//! read-write lock over three fenced nodes holding both forms at once.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lock_core::{LeaseKind, LockError, LockOptions, Locker, RetryPolicy};
use lock_redlock::{ConnectionKind, Redlock, RedlockConfig};
use lock_tests::backed::ServerBacked;
use lock_tests::proxy::LatencyProxy;
use lock_tests::server::{RedisServer, redis_or_skip};
use rand::Rng;

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

fn config(urls: Vec<String>) -> RedlockConfig {
    RedlockConfig::new(urls).with_node_timeout(ms(1_000))
}

fn cluster(nodes: usize) -> Option<ServerBacked<Redlock>> {
    redis_or_skip("attack redlock lease alone")?;
    Some(ServerBacked::start(nodes, |urls| {
        Redlock::new(config(urls))
    }))
}

/// One attempt per acquisition, with `ttl`.
fn single(lock: Redlock, ttl: Duration) -> Locker {
    Locker::new(lock)
        .with_options(
            LockOptions::default()
                .with_ttl(ttl)
                .with_retry(RetryPolicy::none()),
        )
        .unwrap()
}

fn connect(url: &str) -> redis::Connection {
    redis::Client::open(url).unwrap().get_connection().unwrap()
}

/// Keeps the server busy (one script) until its clock reaches the millisecond in which
/// `KEYS[1]` expires: a request queued meanwhile runs in that very millisecond, when `PTTL`
/// answers 0 and the key still exists.
const UNTIL_ITS_LAST_MILLISECOND: &str = "
local expires = redis.call('pexpiretime', KEYS[1])
repeat
  local now = redis.call('time')
  local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
until ms >= expires
return expires";

/// A second reader (writer, permit) that comes in the very millisecond the lone first one ends
/// (its string still exists, `PTTL` 0) takes the lease. Old: the change to the set form wrote
/// the first holder with a score of now and made the set expire at once (`PEXPIREAT` in the
/// past), the script answered nil, and the node counted as failed: `QuorumNotReached` on one
/// healthy node. Five rounds: the server may run a request a millisecond late, and the old code
/// passed then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_holder_in_the_lone_holders_last_millisecond_is_granted() {
    let Some(mut backed) = cluster(1) else {
        return;
    };
    let url = backed.servers()[0].url();
    let first = single(backed.lock().clone(), ms(1_500));
    let second = single(Redlock::new(config(vec![url.clone()])).unwrap(), ms(60_000));
    let mut probe = connect(&url);
    // The second client's connection and the script are ready before the server is blocked.
    let warm = second.try_acquire_kind("warm", LeaseKind::Read).await;
    warm.unwrap().unwrap().release().await.unwrap();
    for (round, kind) in [
        LeaseKind::Read,
        LeaseKind::Write,
        LeaseKind::permit(2).unwrap(),
        LeaseKind::Read,
        LeaseKind::Read,
    ]
    .into_iter()
    .enumerate()
    {
        let key = format!("edge{round}");
        let holder = first.try_acquire_kind(&key, kind).await.unwrap().unwrap();
        std::mem::forget(holder); // its holder dies: the lease ends at its ttl
        let kind_of: String = redis::cmd("TYPE").arg(&key).query(&mut probe).unwrap();
        assert_eq!(kind_of, "string", "a lease alone");
        let expires: u64 = redis::cmd("PEXPIRETIME")
            .arg(&key)
            .query(&mut probe)
            .unwrap();
        let now = u64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap();
        tokio::time::sleep(ms(expires.saturating_sub(now + 200))).await;
        let (blocker_url, blocker_key) = (url.clone(), key.clone());
        let blocker = tokio::task::spawn_blocking(move || {
            let _: u64 = redis::cmd("EVAL")
                .arg(UNTIL_ITS_LAST_MILLISECOND)
                .arg(1)
                .arg(&blocker_key)
                .query(&mut connect(&blocker_url))
                .unwrap();
        });
        tokio::time::sleep(ms(60)).await;
        let taken = second.try_acquire_kind(&key, kind).await;
        blocker.await.unwrap();
        match taken {
            Ok(Some(guard)) => guard.release().await.unwrap(),
            other => panic!("round {round}: {kind} at the lone holder's end: {other:?}"),
        }
        let left: u64 = redis::cmd("EXISTS").arg(&key).query(&mut probe).unwrap();
        assert_eq!(left, 0, "round {round}: nothing left");
    }
}

/// A binary value of another application (here a JPEG header: 0xFF, then zero bytes) with an
/// expiry is not a lease alone: a lease asked on its key is refused naming a Redis string, and
/// the value is left as it was. Old: the acquisition turned it into a sorted set (the value was
/// lost) and named the key a Redis zset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_binary_string_beginning_with_0xff_is_never_rewritten() {
    let Some(mut backed) = cluster(1) else {
        return;
    };
    let url = backed.servers()[0].url();
    let locker = single(backed.lock().clone(), ms(10_000));
    let mut probe = connect(&url);
    let jpeg: &[u8] = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01";
    for (key, kind) in [
        ("img-r", LeaseKind::Read),
        ("img-w", LeaseKind::Write),
        ("img-p", LeaseKind::permit(3).unwrap()),
        ("img-x", LeaseKind::Exclusive),
    ] {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(jpeg)
            .arg("PX")
            .arg(60_000)
            .query(&mut probe)
            .unwrap();
        let refused = locker.try_acquire_kind(key, kind).await;
        assert!(
            matches!(&refused, Err(LockError::InvalidInput { reason, .. }) if reason.contains("Redis string")),
            "{kind} on a foreign binary string: {refused:?}"
        );
        let kind_of: String = redis::cmd("TYPE").arg(key).query(&mut probe).unwrap();
        assert_eq!(kind_of, "string", "{kind}: the foreign value's type");
        let value: Vec<u8> = redis::cmd("GET").arg(key).query(&mut probe).unwrap();
        assert_eq!(value, jpeg, "{kind}: the foreign value");
        let pttl: i64 = redis::cmd("PTTL").arg(key).query(&mut probe).unwrap();
        assert!(pttl > 50_000, "{kind}: the foreign value's expiry: {pttl}");
    }
}

/// A read-write lock over three fenced nodes whose key is a lease alone on some nodes and a set
/// of holders on another (a reader of a client of that node alone joined there): the acquisition,
/// the raise round, extend, downgrade and release work on both forms, a mutex on the key is told
/// what it is, and nothing is left once every holder has gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_over_three_nodes_with_both_forms_works_and_leaves_nothing() {
    let Some(_) = redis_or_skip("attack redlock lease alone") else {
        return;
    };
    let mut backed = ServerBacked::start(3, |urls| Redlock::new(config(urls).with_fencing(true)));
    let urls: Vec<String> = backed.servers().iter().map(|server| server.url()).collect();
    let three = single(backed.lock().clone(), ms(10_000));
    let first_node = Locker::new(Redlock::new(config(vec![urls[0].clone()])).unwrap())
        .with_options(
            LockOptions::default().with_ttl(ms(10_000)).with_retry(
                RetryPolicy::forever()
                    .with_retry_delay(ms(10))
                    .with_deadline(ms(3_000)),
            ),
        )
        .unwrap();
    let mut probes: Vec<redis::Connection> = urls.iter().map(|url| connect(url)).collect();

    // A writer alone everywhere, downgraded, then a reader on the first node only: both forms.
    let mut writer = three.acquire_write("doc").await.unwrap();
    assert!(writer.fencing_token().is_some());
    settled(&mut probes, b"doc", ["string", "string", "string"]).await;
    writer.downgrade().await.unwrap();
    // (The downgrade may still be on its way to the first node: a quorum answered.)
    let local = first_node.acquire_read("doc").await.unwrap();
    settled(&mut probes, b"doc", ["zset", "string", "string"]).await;
    // A fenced reader over the three nodes: the set on one, a lone lease (converted) on the
    // others; the raise round reads both.
    let reader = three.acquire_read("doc").await.unwrap();
    let (writer_fence, reader_fence) = (
        writer.fencing_token().unwrap(),
        reader.fencing_token().unwrap(),
    );
    assert!(
        reader_fence > writer_fence,
        "{reader_fence} after {writer_fence}"
    );
    let mutex = three.try_acquire("doc").await;
    assert!(
        matches!(&mutex, Err(LockError::KindMismatch { found, .. }) if found == "a read-write lock"),
        "a mutex on the key: {mutex:?}"
    );
    writer.extend(ms(20_000)).await.unwrap();
    writer.release().await.unwrap();
    reader.release().await.unwrap();
    settled(&mut probes, b"doc", ["zset", "none", "none"]).await;
    local.release().await.unwrap();
    settled(&mut probes, b"doc", ["none", "none", "none"]).await;

    // A reader alone on every node and a writer refused: nothing but the fencing counter left.
    let reader = three.acquire_read("doc").await.unwrap();
    let refused = three
        .try_acquire_kind("doc", LeaseKind::Write)
        .await
        .unwrap();
    assert!(refused.is_none());
    reader.release().await.unwrap();
    settled(&mut probes, b"doc", ["none", "none", "none"]).await;
    settled(&mut probes, b"doc\xff:claim", ["none", "none", "none"]).await;
}

/// Waits (up to 3 s: requests beyond the quorum may still be on their way) until `key` has the
/// types `expected` on the nodes, and fails if it never does.
async fn settled(probes: &mut [redis::Connection], key: &[u8], expected: [&str; 3]) {
    let started = std::time::Instant::now();
    loop {
        let types: Vec<String> = probes
            .iter_mut()
            .map(|probe| redis::cmd("TYPE").arg(key).query(probe).unwrap())
            .collect();
        if types == expected {
            return;
        }
        assert!(
            started.elapsed() < ms(3_000),
            "`{}` is {types:?}, not {expected:?}",
            String::from_utf8_lossy(key)
        );
        tokio::time::sleep(ms(20)).await;
    }
}

/// The calls of `command` the server counted so far that did not fail (`INFO commandstats`:
/// a script's first call on a server fails with `NOSCRIPT`, and is sent again once loaded).
fn calls(connection: &mut redis::Connection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(connection)
        .unwrap();
    let prefix = format!("cmdstat_{command}:");
    let Some(stats) = info
        .lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
    else {
        return 0;
    };
    let field = |name: &str| -> u64 {
        stats
            .split(',')
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
            .map_or(0, |value| value.parse().unwrap())
    };
    field("calls") - field("failed_calls")
}

/// A reader that finds the key free takes it with a plain `SET ... NX` (no script), but a
/// writer's claim standing on the free key still keeps it out, as the acquisition script
/// does: the reader is refused and gives the key back at once. The claim is the one a waiting
/// writer leaves (a string under `<key>` + 0xFF + `:claim`), set here by hand so that the
/// moment is exact. Negative control: without the claim check in `NodeParts::take_alone`,
/// the reader is granted ("a reader entered past a waiting writer's claim").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_on_a_free_key_still_yields_to_a_writers_claim() {
    let Some(mut backed) = cluster(1) else {
        return;
    };
    let url = backed.servers()[0].url();
    let mut probe = connect(&url);
    let reader = single(backed.lock().clone(), ms(10_000));
    let claim = b"claimed\xff:claim".to_vec();
    let _: () = redis::cmd("SET")
        .arg(&claim)
        .arg("a-writers-token")
        .arg("PX")
        .arg(60_000)
        .query(&mut probe)
        .unwrap();
    let refused = reader.try_acquire_kind("claimed", LeaseKind::Read).await;
    assert!(
        matches!(refused, Ok(None)),
        "a reader entered past a waiting writer's claim: {refused:?}"
    );
    let exists: i64 = redis::cmd("EXISTS")
        .arg("claimed")
        .query(&mut probe)
        .unwrap();
    assert_eq!(exists, 0, "the refused reader left its lease behind");
    // The writer whose claim it is gets in; readers follow once it is gone.
    let _: () = redis::cmd("DEL").arg(&claim).query(&mut probe).unwrap();
    let again = reader.try_acquire_kind("claimed", LeaseKind::Read).await;
    again
        .unwrap()
        .expect("free and unclaimed")
        .release()
        .await
        .unwrap();
}

/// What a permit or read-lock cycle on a free key costs the server: a `SET` and the release
/// script — no acquisition script, which costs the server several times a `SET` — and, on a
/// key another holder keeps, the acquisition script at once (not a `SET` that fails first):
/// the client remembers the key was taken until the script finds it free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_on_a_free_key_takes_it_without_a_script() {
    let Some(mut backed) = cluster(1) else {
        return;
    };
    let url = backed.servers()[0].url();
    let mut probe = connect(&url);
    let ours = single(backed.lock().clone(), ms(10_000));
    let other = single(Redlock::new(config(vec![url.clone()])).unwrap(), ms(10_000));
    for kind in [LeaseKind::permit(3).unwrap(), LeaseKind::Read] {
        let key = format!("cheap-{kind}");
        // Warm: the release script is loaded.
        let warm = ours.try_acquire_kind(&key, kind).await.unwrap().unwrap();
        warm.release().await.unwrap();
        let (sets, scripts) = (calls(&mut probe, "set"), calls(&mut probe, "evalsha"));
        for _ in 0..5 {
            let lease = ours.try_acquire_kind(&key, kind).await.unwrap().unwrap();
            lease.release().await.unwrap();
        }
        assert_eq!(
            (
                calls(&mut probe, "set") - sets,
                calls(&mut probe, "evalsha") - scripts
            ),
            (5, 5),
            "{kind}: five cycles on a free key should cost five SETs and five release scripts"
        );
        // Another holder keeps the key: the first lease finds it taken with its SET, the next
        // ones go to the script at once, and the script finding it free again brings the SET
        // back.
        let kept = other.try_acquire_kind(&key, kind).await.unwrap().unwrap();
        let (sets, scripts) = (calls(&mut probe, "set"), calls(&mut probe, "evalsha"));
        for _ in 0..3 {
            let lease = ours.try_acquire_kind(&key, kind).await.unwrap().unwrap();
            lease.release().await.unwrap();
        }
        assert_eq!(
            (
                calls(&mut probe, "set") - sets,
                calls(&mut probe, "evalsha") - scripts
            ),
            (1, 6),
            "{kind}: beside another holder, one failed SET, then scripts only"
        );
        kept.release().await.unwrap();
        let lease = ours.try_acquire_kind(&key, kind).await.unwrap().unwrap();
        lease.release().await.unwrap();
        let (sets, scripts) = (calls(&mut probe, "set"), calls(&mut probe, "evalsha"));
        let lease = ours.try_acquire_kind(&key, kind).await.unwrap().unwrap();
        lease.release().await.unwrap();
        assert_eq!(
            (
                calls(&mut probe, "set") - sets,
                calls(&mut probe, "evalsha") - scripts
            ),
            (1, 1),
            "{kind}: once the script found the key free, the SET comes back"
        );
    }
}

/// An extend and a downgrade decided by two of three nodes still reach the third, also when
/// the third must load the script first: it forgot its scripts (`SCRIPT FLUSH`, as after a
/// restart) and is paused while the round runs, so that its `NOSCRIPT` comes after the round
/// was decided. Old: the round's requests still in flight were dropped with it, the script was
/// never loaded nor sent again, and the third node kept the writer's entry (no reader of that
/// node could enter until it expired) and the old expiry ("node 0 still holds `w`").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extend_and_a_downgrade_reach_a_node_that_answers_late_with_noscript() {
    let Some(mut backed) = cluster(3) else {
        return;
    };
    let url = backed.servers()[0].url();
    let mut probe = connect(&url);
    let three = single(backed.lock().clone(), ms(5_000));
    let mut writer = three.acquire_write("late").await.unwrap();
    for step in ["extend", "downgrade"] {
        let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut probe).unwrap();
        backed.servers()[0].pause().unwrap();
        let done = match step {
            "extend" => writer.extend(ms(60_000)).await,
            _ => writer.downgrade().await,
        };
        backed.servers()[0].resume().unwrap();
        done.unwrap();
        let started = std::time::Instant::now();
        loop {
            let value: Vec<u8> = redis::cmd("GET").arg("late").query(&mut probe).unwrap();
            let pttl: i64 = redis::cmd("PTTL").arg("late").query(&mut probe).unwrap();
            let tag = value
                .iter()
                .position(|byte| *byte == 0)
                .and_then(|at| value.get(at + 1).copied());
            let reached = match step {
                "extend" => pttl > 10_000,
                _ => tag == Some(b'r'),
            };
            if reached {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "the {step} never reached node 0: it still holds `{}` with {pttl} ms left",
                tag.map(char::from).unwrap_or('?')
            );
            tokio::time::sleep(ms(20)).await;
        }
    }
    writer.release().await.unwrap();
}

/// A reader refused on a free key by a writer's claim (it took the key with its `SET` and
/// gave it back) goes to the acquisition script on its next attempts, which refuses it without
/// writing the key: it does not take the key again and again while the writer waits. Old: the
/// refusal left the client's hint clear, so every attempt of that reader took the key for a
/// round trip and a release script (20 attempts, 20 `SET`s): a waiting writer whose try came
/// then was refused on a key free but for that reader (one reader client retrying in a loop
/// delayed a waiting writer retrying every 20 ms by 80 to 260 ms, 260 to 790 `SET`s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_refused_by_a_claim_does_not_take_the_key_again() {
    let Some(mut backed) = cluster(1) else {
        return;
    };
    let url = backed.servers()[0].url();
    let mut probe = connect(&url);
    let reader = single(backed.lock().clone(), ms(10_000));
    // Warm: the scripts are loaded, and the key was found free.
    let warm = reader.try_acquire_kind("waited", LeaseKind::Read).await;
    warm.unwrap().unwrap().release().await.unwrap();
    let claim = b"waited\xff:claim".to_vec();
    let _: () = redis::cmd("SET")
        .arg(&claim)
        .arg("a-writers-token")
        .arg("PX")
        .arg(60_000)
        .query(&mut probe)
        .unwrap();
    let sets = calls(&mut probe, "set");
    for attempt in 0..20 {
        let refused = reader.try_acquire_kind("waited", LeaseKind::Read).await;
        assert!(
            matches!(refused, Ok(None)),
            "attempt {attempt}: a reader entered past a waiting writer's claim: {refused:?}"
        );
    }
    // The hand-made claim above was one `SET` too.
    let taken = calls(&mut probe, "set") - sets;
    assert!(
        taken <= 1,
        "a refused reader took the key {taken} times in 20 attempts past a writer's claim"
    );
    let exists: i64 = redis::cmd("EXISTS")
        .arg("waited")
        .query(&mut probe)
        .unwrap();
    assert_eq!(exists, 0, "a refused reader left its lease behind");
    // The claim gone and the key free, the script takes the key again (answer 2) and the
    // next reader goes back to the plain `SET`.
    let _: () = redis::cmd("DEL").arg(&claim).query(&mut probe).unwrap();
    for _ in 0..2 {
        let lease = reader.try_acquire_kind("waited", LeaseKind::Read).await;
        lease
            .unwrap()
            .expect("free and unclaimed")
            .release()
            .await
            .unwrap();
    }
    let (sets, scripts) = (calls(&mut probe, "set"), calls(&mut probe, "evalsha"));
    let lease = reader.try_acquire_kind("waited", LeaseKind::Read).await;
    lease
        .unwrap()
        .expect("free and unclaimed")
        .release()
        .await
        .unwrap();
    assert_eq!(
        (
            calls(&mut probe, "set") - sets,
            calls(&mut probe, "evalsha") - scripts
        ),
        (1, 1),
        "the plain SET is back (and the release script)"
    );
}

/// Two extends in a row whose requests to a node both come late (the node forgot its scripts
/// and is paused while both rounds run, decided by the two others): the node ends with the
/// later extend's expiry, never the earlier's. Old: both late requests ran on after `NOSCRIPT`
/// in whatever order their script reloads went out, and the earlier extend (3 s) often landed
/// after the later one (60 s): the node held the lock for 3 s where the holder had extended it
/// to 60 s (4 of 10 rounds for a mutex, 8 of 10 for a write lock), so that the lock no longer
/// survived the loss of one more node. Now a new extend drops the requests of the one before
/// it that have not been written yet (the new one supersedes them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_extend_never_lands_after_a_later_one() {
    let Some(mut backed) = cluster(3) else {
        return;
    };
    let mut probes: Vec<redis::Connection> = backed
        .servers()
        .iter()
        .map(|server| connect(&server.url()))
        .collect();
    let mut probe = connect(&backed.servers()[0].url());
    let three = single(backed.lock().clone(), ms(5_000));
    for round in 0..8 {
        let key = format!("twice{round}");
        let mut guard = if round % 2 == 0 {
            three.acquire(&key).await.unwrap()
        } else {
            three.acquire_write(&key).await.unwrap()
        };
        // The acquisition may still be on its way to a node (reloading its script there).
        settled(&mut probes, key.as_bytes(), ["string", "string", "string"]).await;
        let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut probe).unwrap();
        backed.servers()[0].pause().unwrap();
        let first = guard.extend(ms(3_000)).await;
        let second = guard.extend(ms(60_000)).await;
        backed.servers()[0].resume().unwrap();
        first.unwrap();
        second.unwrap();
        // Late requests run on at most until their round's deadline (the node timeout, 1 s).
        tokio::time::sleep(ms(1_200)).await;
        let pttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut probe).unwrap();
        assert!(
            pttl > 10_000,
            "round {round}: node 0 keeps the earlier extend's expiry ({pttl} ms left), not the later one's"
        );
        guard.release().await.unwrap();
    }
}

/// Every key on `url` (claims included).
fn all_keys(url: &str) -> Vec<String> {
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg("*")
        .query(&mut connect(url))
        .unwrap();
    keys.into_iter()
        .map(|key| String::from_utf8_lossy(&key).into_owned())
        .collect()
}

/// Readers and writers of one key over three nodes, and permits of a semaphore on one node
/// (leases alone taken with a plain `SET`, a reader's pipelined with the claim check), each
/// acquisition dropped at a random point by a tiny timeout, behind nodes 0, 2 and 4 ms away;
/// then nothing of theirs is left on any node (no lease, no claim: the ttl is long, so only the
/// clean-ups can have removed them), and the keys are free for a fresh single attempt.
async fn lease_cancel_storm(connection: ConnectionKind) {
    let ttl = ms(20_000);
    let servers = lock_tests::backed::start_servers(3);
    let mut proxies = Vec::new();
    for (server, delay) in servers.iter().zip([0, 2, 4]) {
        let proxy = LatencyProxy::start(server.port()).await.unwrap();
        proxy.set_delay(ms(delay));
        proxies.push(proxy);
    }
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let build = |urls: Vec<String>| {
        Redlock::new(
            RedlockConfig::new(urls)
                .with_wake_on_release(true)
                .with_connection(connection)
                .with_node_timeout(ms(300)),
        )
        .unwrap()
    };
    let options = LockOptions::default().with_ttl(ttl).with_retry(
        RetryPolicy::forever()
            .with_retry_delay(ms(2))
            .with_retry_jitter(ms(2)),
    );
    let options = Arc::new(options);
    let three = Locker::new(build(proxies.iter().map(LatencyProxy::url).collect()));
    let one = Locker::new(build(vec![proxies[2].url()]));
    // Warm: connected, scripts loaded.
    for (locker, key, kind) in [
        (&three, "rw", LeaseKind::Write),
        (&three, "rw", LeaseKind::Read),
        (&one, "sem", LeaseKind::permit(2).unwrap()),
    ] {
        let guard = locker.acquire_kind(key, kind, &options).await.unwrap();
        guard.release().await.unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (cancelled, won) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    let kinds = [
        (LeaseKind::Read, "rw", true),
        (LeaseKind::Read, "rw", true),
        (LeaseKind::Read, "rw", true),
        (LeaseKind::Write, "rw", true),
        (LeaseKind::permit(2).unwrap(), "sem", false),
        (LeaseKind::permit(2).unwrap(), "sem", false),
        (LeaseKind::permit(2).unwrap(), "sem", false),
    ];
    for (kind, key, over_three) in kinds {
        let locker = if over_three {
            three.clone()
        } else {
            one.clone()
        };
        let (options, stop, cancelled, won) = (
            Arc::clone(&options),
            Arc::clone(&stop),
            Arc::clone(&cancelled),
            Arc::clone(&won),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let cut = Duration::from_micros(rand::rng().random_range(0..60_000));
                match tokio::time::timeout(cut, locker.acquire_kind(key, kind, &options)).await {
                    Ok(Ok(guard)) => {
                        won.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(ms(1)).await;
                        guard.release().await.unwrap();
                    }
                    Ok(Err(error)) => panic!("{kind}: {error}"),
                    Err(_) => {
                        cancelled.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(ms(1_500)).await;
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.unwrap();
    }
    let (cancelled, won) = (cancelled.load(Ordering::SeqCst), won.load(Ordering::SeqCst));
    println!("lease cancel storm ({connection:?}): {cancelled} cancelled, {won} won");
    assert!(cancelled > 0 && won > 0, "{cancelled} cancelled, {won} won");
    // Clean-ups run in the background (the ttl is 20 s: nothing expires meanwhile).
    let started = std::time::Instant::now();
    loop {
        let left: Vec<Vec<String>> = urls.iter().map(|url| all_keys(url)).collect();
        if left.iter().all(Vec::is_empty) {
            break;
        }
        assert!(
            started.elapsed() < ms(5_000),
            "left after the storm ({connection:?}): {left:?}"
        );
        tokio::time::sleep(ms(50)).await;
    }
    let single = |locker: &Locker| {
        locker
            .clone()
            .with_options(
                LockOptions::default()
                    .with_ttl(ttl)
                    .with_retry(RetryPolicy::none()),
            )
            .unwrap()
    };
    let writer = single(&three)
        .try_acquire_kind("rw", LeaseKind::Write)
        .await;
    writer
        .unwrap()
        .expect("rw is free")
        .release()
        .await
        .unwrap();
    let permit = single(&one)
        .try_acquire_kind("sem", LeaseKind::permit(2).unwrap())
        .await;
    permit
        .unwrap()
        .expect("sem is free")
        .release()
        .await
        .unwrap();
    drop(servers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_leases_on_free_keys_leave_nothing_manager() {
    if redis_or_skip("lease cancel storm").is_none() {
        return;
    }
    lease_cancel_storm(ConnectionKind::Manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_leases_on_free_keys_leave_nothing_pooled() {
    if redis_or_skip("lease cancel storm").is_none() {
        return;
    }
    lease_cancel_storm(ConnectionKind::Pool).await;
}

/// Two keys that share a bit of the client's hint (`hint-a` and `hint-b9`: the same FNV-1a hash
/// modulo 64): a lease on one, found taken, sends leases on the other to the script, and the
/// script finding the other free brings the plain `SET` back for both. Whatever path each
/// attempt takes, the outcomes are the script's: a semaphore of another size is reported as
/// such on a held key and on a key taken a moment ago with a `SET`, a reader yields to a
/// writer's claim, and nothing is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_sharing_a_hint_bit_get_the_scripts_outcomes() {
    let Some(mut backed) = cluster(1) else {
        return;
    };
    let url = backed.servers()[0].url();
    let mut probe = connect(&url);
    let ours = single(backed.lock().clone(), ms(10_000));
    let other = single(Redlock::new(config(vec![url.clone()])).unwrap(), ms(10_000));
    let (two, three) = (LeaseKind::permit(2).unwrap(), LeaseKind::permit(3).unwrap());
    let mismatch = |outcome: &lock_core::Result<Option<lock_core::LockGuard>>, permits: &str| matches!(outcome, Err(LockError::KindMismatch { found, .. }) if found == &format!("a semaphore of {permits} permit(s)"));
    let held_a = other
        .try_acquire_kind("hint-a", two)
        .await
        .unwrap()
        .unwrap();
    // Ours finds hint-a taken (its SET fails): its bit is set.
    let refused = ours.try_acquire_kind("hint-a", three).await;
    assert!(mismatch(&refused, "2"), "hint-a, 3 permits: {refused:?}");
    // hint-b9 shares the bit: the script takes it, and clears the bit.
    let scripts = calls(&mut probe, "evalsha");
    let held_b = ours
        .try_acquire_kind("hint-b9", three)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        calls(&mut probe, "evalsha") - scripts,
        1,
        "hint-b9 went to the script"
    );
    // hint-a again, now with a plain SET first: still told what it is.
    let refused = ours.try_acquire_kind("hint-a", three).await;
    assert!(mismatch(&refused, "2"), "hint-a again: {refused:?}");
    let refused = other.try_acquire_kind("hint-b9", two).await;
    assert!(mismatch(&refused, "3"), "hint-b9, 2 permits: {refused:?}");
    // A second permit of the right size joins either way.
    let second_a = ours.try_acquire_kind("hint-a", two).await.unwrap().unwrap();
    let second_b = other
        .try_acquire_kind("hint-b9", three)
        .await
        .unwrap()
        .unwrap();
    for guard in [held_a, held_b, second_a, second_b] {
        guard.release().await.unwrap();
    }
    // A writer's claim on the free hint-b9 keeps readers out by either path.
    let claim = b"hint-b9\xff:claim".to_vec();
    let _: () = redis::cmd("SET")
        .arg(&claim)
        .arg("a-writers-token")
        .arg("PX")
        .arg(60_000)
        .query(&mut probe)
        .unwrap();
    for _ in 0..3 {
        let refused = ours.try_acquire_kind("hint-b9", LeaseKind::Read).await;
        assert!(
            matches!(refused, Ok(None)),
            "a reader past the claim: {refused:?}"
        );
        let reader = ours.try_acquire_kind("hint-a", LeaseKind::Read).await;
        reader
            .unwrap()
            .expect("hint-a is free")
            .release()
            .await
            .unwrap();
    }
    let _: () = redis::cmd("DEL").arg(&claim).query(&mut probe).unwrap();
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query(&mut probe).unwrap();
    assert!(keys.is_empty(), "left: {keys:?}");
}

/// Requests of an extend or a downgrade that come late to a node (it forgot its scripts and is
/// paused while the rounds run) and the release sent after them: whatever order their script
/// reloads go out in, the node ends with nothing (a late extend or downgrade never revives nor
/// re-extends a released lease); and a late downgrade followed by a late extend leaves the
/// node a reader with the extend's expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_extends_and_downgrades_never_outlive_a_release() {
    let Some(mut backed) = cluster(3) else {
        return;
    };
    let mut probes: Vec<redis::Connection> = backed
        .servers()
        .iter()
        .map(|server| connect(&server.url()))
        .collect();
    let mut probe = connect(&backed.servers()[0].url());
    let three = single(backed.lock().clone(), ms(5_000));
    for round in 0..6 {
        let key = format!("gone{round}");
        let mut guard = three.acquire_write(&key).await.unwrap();
        settled(&mut probes, key.as_bytes(), ["string", "string", "string"]).await;
        let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut probe).unwrap();
        backed.servers()[0].pause().unwrap();
        let step = match round % 3 {
            0 => guard.extend(ms(60_000)).await,
            1 => guard.downgrade().await,
            _ => {
                let downgraded = guard.downgrade().await;
                downgraded.and(guard.extend(ms(60_000)).await)
            }
        };
        step.unwrap();
        let released = if round % 3 == 2 {
            None
        } else {
            Some(guard.release().await)
        };
        backed.servers()[0].resume().unwrap();
        // Late requests run on at most until their round's deadline (the node timeout, 1 s).
        tokio::time::sleep(ms(1_200)).await;
        let value: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query(&mut probe).unwrap();
        let pttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut probe).unwrap();
        match released {
            Some(released) => {
                released.unwrap();
                assert_eq!(
                    value, None,
                    "round {round}: node 0 kept the released lease ({pttl} ms)"
                );
            }
            None => {
                let value = value.expect("node 0 holds the lease");
                let tag = value
                    .iter()
                    .position(|byte| *byte == 0)
                    .and_then(|at| value.get(at + 1).copied());
                assert_eq!(tag, Some(b'r'), "round {round}: node 0 holds no reader");
                assert!(pttl > 10_000, "round {round}: node 0 has {pttl} ms left");
                let guard = three.acquire_read(&key).await;
                guard.unwrap().release().await.unwrap();
            }
        }
    }
}

//! Adversarial review of the INCR backend's semaphores and read-write locks on real servers:
//! each case is a break found by attacking the scripts, kept as a regression test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::{
    Holding, Key, LeaseKind, LockError, LockOptions, Locker, RetryPolicy, Token,
    raw::{KeySet, Lock, LockRequest},
};
use lock_inc::{IncConfig, IncLock};
use lock_tests::server::{RedisServer, redis_or_skip};

const PROBE: Duration = Duration::from_millis(500);

async fn connect(url: String, command_timeout: u64) -> IncLock {
    IncLock::connect(IncConfig {
        command_timeout,
        ..IncConfig::new(url)
    })
    .await
    .expect("connect")
}

fn single(lock: &IncLock, ttl: Duration) -> Locker {
    Locker::new(lock.clone())
        .with_options(
            LockOptions::default()
                .with_ttl(ttl)
                .with_retry(RetryPolicy::none()),
        )
        .unwrap()
}

/// The members of a holder set (kind letter + token).
async fn members(server: &RedisServer, key: &str) -> Vec<String> {
    let mut con = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("ZRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query_async(&mut con)
        .await
        .unwrap()
}

fn pttl(server: &RedisServer, key: &str) -> i64 {
    let reply = server.command(&format!("PTTL {key}"), PROBE).unwrap();
    reply.trim_start_matches(':').parse().unwrap()
}

/// A writer that downgrades and then dies (never releases): its read lease must expire like
/// any other. `downgrade.lua` removed the `w` entry first, which emptied the set (Redis deletes
/// an empty sorted set, and its expiry with it) and re-created it with the `r` entry and no
/// expiry: the key stayed forever, and a mutex on the key (whose script does not prune
/// holders) found it held forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downgraded_writer_that_dies_leaves_nothing_behind() {
    let Some(binary) = redis_or_skip("attack inc semaphores: downgrade") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("server");
    let lock = connect(server.url(), 2_000).await;
    let ttl = Duration::from_millis(400);
    let locker = single(&lock, ttl);
    let mut writer = locker.acquire_write("doc").await.expect("write lock");
    writer.downgrade().await.expect("downgrade");
    let set_ttl = pttl(&server, "lock:{doc}");
    assert!(
        set_ttl > 0 && set_ttl <= 401,
        "after a downgrade the holder set has PTTL {set_ttl} (ttl 400 ms)"
    );
    // The holder dies: no release.
    std::mem::forget(writer);
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    // Nobody else touched the key: its own expiry must have removed it.
    assert_eq!(
        pttl(&server, "lock:{doc}"),
        -2,
        "the holder set outlived its only (expired) holder"
    );
    let mutex = locker
        .try_acquire("doc")
        .await
        .expect("mutex attempt")
        .expect("a mutex on the key once its reader expired");
    mutex.release().await.unwrap();
}

/// A downgrade that timed out (the server stalled) but ran once the server resumed: the guard
/// still says "write", the server holds a read entry. Releasing the guard must free the key at
/// once: the release asked for the `w` entry only, answered "not held", and the `r` entry kept
/// every writer out for the whole ttl (with nothing to send again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_after_a_downgrade_that_timed_out_frees_the_key() {
    let Some(binary) = redis_or_skip("attack inc semaphores: downgrade timeout") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("server");
    let lock = connect(server.url(), 100).await;
    let locker = single(&lock, Duration::from_secs(10));
    // A downgrade ran once before: the server knows the script (else the stalled EVALSHA would
    // answer NOSCRIPT, and nobody would load it).
    let mut warm = locker.acquire_write("warm").await.expect("write lock");
    warm.downgrade().await.expect("downgrade");
    warm.release().await.expect("release");
    let mut writer = locker.acquire_write("doc").await.expect("write lock");
    server.pause().expect("SIGSTOP");
    let error = writer.downgrade().await.expect_err("no answer");
    assert!(matches!(error, LockError::Backend { .. }), "{error:?}");
    server.resume().expect("SIGCONT");
    // The stalled downgrade runs now; give it (and the reconnection) a moment.
    for _ in 0..100 {
        if members(&server, "lock:{doc}").await[0].starts_with('r') {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let kinds: Vec<char> = members(&server, "lock:{doc}")
        .await
        .iter()
        .filter_map(|member| member.chars().next())
        .collect();
    assert_eq!(
        kinds,
        ['r'],
        "the stalled downgrade did not run (holder kinds)"
    );
    let _ = writer.release().await;
    let other = connect(server.url(), 2_000).await;
    let again = single(&other, Duration::from_secs(10))
        .try_acquire_kind("doc", LeaseKind::Write)
        .await
        .expect("write attempt");
    assert!(
        again.is_some(),
        "the key is still held (holders {:?}) after its only holder released",
        members(&server, "lock:{doc}").await
    );
    again.unwrap().release().await.unwrap();
}

/// After `shutdown`, every call of the backend fails with `Stopped` (release, extend, and the
/// attempts do): a downgrade too, instead of a backend error from the closed client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downgrade_after_shutdown_fails_with_stopped() {
    let Some(binary) = redis_or_skip("attack inc semaphores: downgrade after stop") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("server");
    let lock = connect(server.url(), 2_000).await;
    let locker = single(&lock, Duration::from_secs(10));
    let mut writer = locker.acquire_write("doc").await.expect("write lock");
    lock.shutdown().await.expect("shutdown");
    let error = writer.downgrade().await.expect_err("stopped");
    assert!(matches!(error, LockError::Stopped), "{error:?}");
}

/// A waiting writer's claim outlives the readers it waits for (its marker stays, the holder
/// set is gone): no reader and no mutex can take the key, so `inspect` (and `lockrun status`)
/// must not call it free. It looked at the holder set only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_calls_a_key_kept_by_a_claim_held() {
    let Some(binary) = redis_or_skip("attack inc semaphores: inspect a claim") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("server");
    let lock = connect(server.url(), 2_000).await;
    let ttl = Duration::from_secs(10);
    let reader = single(&lock, ttl)
        .acquire_read("doc")
        .await
        .expect("reader");
    // One writer's attempt that will wait: it finds the reader and leaves its claim.
    let key = Key::new("doc").unwrap();
    let writer = LockRequest::new(KeySet::one(key.clone()), Token::generate().unwrap(), ttl)
        .unwrap()
        .with_kind(LeaseKind::Write)
        .with_will_wait(true);
    assert!(lock.try_acquire(&writer).await.unwrap().is_none());
    reader.release().await.expect("release");
    let refused = single(&lock, ttl)
        .try_acquire_kind("doc", LeaseKind::Read)
        .await
        .expect("read attempt");
    assert!(refused.is_none(), "the claim should keep the reader out");
    assert!(
        single(&lock, ttl)
            .try_acquire("doc")
            .await
            .unwrap()
            .is_none(),
        "the claim should keep a mutex out"
    );
    let states = lock.inspect(&key).await.expect("inspect");
    assert!(
        matches!(states[0].holding, Holding::Held { .. }),
        "inspect says {:?} while no reader nor mutex can take the key",
        states[0].holding
    );
    lock.abandon(&writer).await.expect("claim taken back");
    let states = lock.inspect(&key).await.expect("inspect");
    assert!(
        matches!(states[0].holding, Holding::Free),
        "inspect says {:?} once the claim was taken back",
        states[0].holding
    );
}

/// A token read back from a store (`Token::from_stored`) need not be hex: a waiting writer's
/// claim under such a token must keep new readers out, and be taken back by that token, like
/// any other. The claim's pattern in the scripts (`%x+`) matched only hex tokens: the claim was
/// ignored (readers streamed past the writer) and could not be taken back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_under_a_stored_token_keeps_readers_out() {
    let Some(binary) = redis_or_skip("attack inc semaphores: stored token") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("server");
    let lock = connect(server.url(), 2_000).await;
    let ttl = Duration::from_secs(10);
    let reader = single(&lock, ttl)
        .acquire_read("doc")
        .await
        .expect("reader");
    let key = Key::new("doc").unwrap();
    let token = Token::from_stored("job:42/writer").unwrap();
    let writer = LockRequest::new(KeySet::one(key.clone()), token, ttl)
        .unwrap()
        .with_kind(LeaseKind::Write)
        .with_will_wait(true);
    assert!(lock.try_acquire(&writer).await.unwrap().is_none());
    let late = single(&lock, ttl)
        .try_acquire_kind("doc", LeaseKind::Read)
        .await
        .expect("read attempt");
    assert!(
        late.is_none(),
        "a new reader got past a waiting writer's claim"
    );
    assert!(
        lock.abandon(&writer).await.expect("abandon"),
        "the claim was not taken back by its token"
    );
    let admitted = single(&lock, ttl)
        .try_acquire_kind("doc", LeaseKind::Read)
        .await
        .expect("read attempt");
    assert!(admitted.is_some(), "the claim outlived its take-back");
    admitted.unwrap().release().await.unwrap();
    reader.release().await.unwrap();
}

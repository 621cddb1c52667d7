//! Attacks on Redlock's fencing counters (`<key>\xff:fence`): the scripts keep the counter in a
//! Lua double, so past 2^53 "counter + 1" would round back to the counter and two holders would
//! draw the same token (found by an adversarial review: fixed by refusing, before any write,
//! counters and values at or past 2^53 with a typed error naming the cause); and what a counter
//! that is not a number does to acquisitions.
//! Each test prints its figures on one line.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_redlock::{FENCE_SUFFIX, Redlock, RedlockConfig};
use lock_tests::backed::ServerBacked;
use lock_tests::proxy::LatencyProxy;
use lock_tests::server::{RedisServer, redis_or_skip};

const PROBE: Duration = Duration::from_millis(500);

fn locker(lock: &Redlock, ttl: Duration) -> Locker {
    Locker::new(lock.clone())
        .with_options(
            LockOptions::default().with_ttl(ttl).with_retry(
                RetryPolicy::forever()
                    .with_retry_delay(Duration::from_millis(5))
                    .with_retry_jitter(Duration::from_millis(5))
                    .with_deadline(Duration::from_secs(3)),
            ),
        )
        .unwrap()
}

fn counter_name(key: &str) -> Vec<u8> {
    [key.as_bytes(), FENCE_SUFFIX].concat()
}

/// Writes `value` into `key`'s fencing counter on `server` with raw bytes.
fn write_counter(server: &RedisServer, key: &str, value: &str) {
    let mut connection = redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let () = redis::cmd("SET")
        .arg(counter_name(key))
        .arg(value)
        .query(&mut connection)
        .unwrap();
}

async fn fence_once(locker: &Locker, key: &str) -> u64 {
    let guard = locker.acquire(key).await.unwrap();
    let fence = guard.fencing_token().unwrap();
    guard.release().await.unwrap();
    fence
}

/// Every acquisition of `key`, three times: a token, or the error that refused it.
async fn three_tries(locker: &Locker, key: &str) -> Vec<Result<u64, String>> {
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        outcomes.push(match locker.acquire(key).await {
            Ok(guard) => {
                let fence = guard.fencing_token().unwrap();
                guard.release().await.unwrap();
                Ok(fence)
            }
            Err(error) => Err(error.to_string()),
        });
    }
    outcomes
}

/// Tokens that were handed out strictly increase; every refusal names the 2^53 bound.
fn assert_increasing_or_refused(outcomes: &[Result<u64, String>], earlier: Option<u64>) {
    let mut last = earlier;
    for outcome in outcomes {
        match outcome {
            Ok(fence) => {
                assert!(
                    last.is_none_or(|last| *fence > last),
                    "a token not above the one before: {outcomes:?} (earlier {earlier:?})"
                );
                last = Some(*fence);
            }
            Err(error) => assert!(error.contains("2^53"), "an unexpected error: {error}"),
        }
    }
}

/// A counter at 2^55 (a value one node's clock reaches in the year ~3111, or that anyone with
/// write access can set): every later acquisition would draw the same token, since in the
/// script `tonumber(counter) + 1` is a double and rounds back to the counter. It is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fences_past_two_to_the_53_are_refused_not_repeated() {
    if redis_or_skip("fence precision").is_none() {
        return;
    }
    let mut backed = ServerBacked::start(1, |urls| {
        Redlock::new(RedlockConfig::new(urls).with_fencing(true))
    });
    write_counter(&backed.servers()[0], "k", "36028797018963968");
    let locker = locker(backed.lock(), Duration::from_secs(5));
    let outcomes = three_tries(&locker, "k").await;
    println!("fence precision: counter 2^55, outcomes {outcomes:?}");
    assert!(outcomes.iter().all(Result::is_err), "{outcomes:?}");
    assert_increasing_or_refused(&outcomes, None);
    let left = backed.servers()[0].command("PTTL k", PROBE).unwrap();
    assert_eq!(left, ":-2", "a refused acquisition left its lock key");
}

/// The same through the clock only: node 0's wall clock runs ~1200 years ahead (its TIME in µs
/// is past 2^55). Its draws are refused; holders whose quorum is nodes 1 and 2 draw ordinary
/// tokens, and no token is ever handed out twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_clock_far_ahead_cannot_make_two_holders_share_a_fence() {
    let Some(binary) = redis_or_skip("fence precision, clock ahead") else {
        return;
    };
    let shim = lock_tests::clock::WallJump::build().unwrap();
    // 2^55 µs is ~1141.7 years after 1970; 1200 years ahead of today is past it.
    shim.jump(Duration::from_secs(1200 * 365 * 24 * 3600), false)
        .unwrap();
    let mut servers = vec![shim.start_server(&binary).unwrap()];
    servers.extend(lock_tests::backed::start_servers(2));
    let mut proxies = Vec::new();
    for server in &servers {
        proxies.push(LatencyProxy::start(server.port()).await.unwrap());
    }
    let lock = Redlock::new(
        RedlockConfig::new(proxies.iter().map(LatencyProxy::url))
            .with_node_timeout(Duration::from_millis(200))
            .with_fencing(true),
    )
    .unwrap();
    let _backed = ServerBacked::new(lock.clone(), servers);
    let locker = locker(&lock, Duration::from_secs(5));
    // With node 0 in the quorum (node 2 cut): refused.
    proxies[2].cut();
    let with_fast_node = three_tries(&locker, "k").await;
    proxies[2].set_delay(Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Without node 0: ordinary tokens.
    proxies[0].cut();
    let without = three_tries(&locker, "k").await;
    println!("fence precision, clock ahead: with node 0 {with_fast_node:?}, without {without:?}");
    assert!(
        with_fast_node.iter().all(Result::is_err),
        "{with_fast_node:?}"
    );
    assert!(without.iter().all(Result::is_ok), "{without:?}");
    assert_increasing_or_refused(&without, None);
}

/// A counter that is not a number (or of another type) must not leave the lock key behind and
/// must come back as a typed error, not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_of_another_type_leaves_nothing_and_fails_typed() {
    if redis_or_skip("foreign counter").is_none() {
        return;
    }
    let mut backed = ServerBacked::start(1, |urls| {
        Redlock::new(RedlockConfig::new(urls).with_fencing(true))
    });
    {
        let mut connection = redis::Client::open(backed.servers()[0].url())
            .unwrap()
            .get_connection()
            .unwrap();
        let _: i64 = redis::cmd("HSET")
            .arg(counter_name("h"))
            .arg("f")
            .arg("v")
            .query(&mut connection)
            .unwrap();
    }
    write_counter(&backed.servers()[0], "huge", "1e300");
    let locker = Locker::new(backed.lock().clone())
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(30))
                .with_retry(RetryPolicy::none()),
        )
        .unwrap();
    let hash = locker.acquire("h").await.map(|guard| guard.fencing_token());
    let huge = locker
        .acquire("huge")
        .await
        .map(|guard| guard.fencing_token());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let server = &backed.servers()[0];
    let left_h = server.command("PTTL h", PROBE).unwrap();
    let left_huge = server.command("PTTL huge", PROBE).unwrap();
    println!(
        "foreign counter: hash counter -> {hash:?}, PTTL h {left_h}; 1e300 counter -> {huge:?}, PTTL huge {left_huge}"
    );
    assert_eq!(left_h, ":-2", "the lock key stayed behind a failed script");
    assert_eq!(
        left_huge, ":-2",
        "the lock key stayed behind a failed script"
    );
}

/// Odd keys on fenced Redlock: the longest key (its counter name is 7 bytes longer), the same
/// under a namespace (refused, typed), and keys that spell the suffix with a UTF-8 `ÿ` (U+00FF,
/// bytes C3 BF, not the byte FF): all are ordinary keys with their own increasing tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_keys_are_ordinary_keys_or_typed_errors() {
    if redis_or_skip("odd keys").is_none() {
        return;
    }
    let backed = ServerBacked::start(1, |urls| {
        Redlock::new(RedlockConfig::new(urls).with_fencing(true))
    });
    let locker = locker(backed.lock(), Duration::from_secs(5));
    let longest = "é".repeat(512);
    let (a, b) = (
        fence_once(&locker, &longest).await,
        fence_once(&locker, &longest).await,
    );
    let namespaced = locker
        .clone()
        .with_namespace(Some("ns"))
        .unwrap()
        .acquire(&longest)
        .await
        .map(|_| ());
    let held = locker.acquire("xÿ:fence").await.unwrap();
    let x = locker
        .try_acquire("x")
        .await
        .unwrap()
        .map(|guard| guard.fencing_token());
    let y = fence_once(&locker, "xÿ:fenceÿ:fence").await;
    drop(held);
    println!(
        "odd keys: 1024-byte key fences {a} then {b}; namespaced: {namespaced:?}; x while xÿ:fence held: {x:?}; {y}"
    );
    assert!(a < b, "{a} then {b}");
    assert!(
        matches!(namespaced, Err(lock_core::LockError::InvalidInput { .. })),
        "{namespaced:?}"
    );
    assert!(matches!(x, Some(Some(_))), "{x:?}");
}

//! What tests of inc's fair lines share: its keys (default prefix), reads of them on a test's
//! own server, and clients of their own (as separate processes would have).

use std::sync::Arc;
use std::time::Duration;

use lock_core::raw::Lock;
use lock_core::{LockGuard, LockOptions, Locker, RetryPolicy};
use lock_inc::{IncConfig, IncLock};
use redis::aio::MultiplexedConnection;
use tokio::time::sleep;

use crate::fair::Target;

/// `n` milliseconds.
pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// True when `guard` holds the lock a release gave it as it passed the turn (its token is the
/// reservation's value, `lock-turn-reserved:<member>`).
pub fn granted(guard: &LockGuard) -> bool {
    guard
        .token()
        .expose()
        .starts_with(lock_core::raw::redis::RESERVED)
}

/// inc's counter key for `key` (default prefix).
pub fn counter_key(key: &str) -> String {
    format!("lock:{{{key}}}")
}

/// inc's owner key for `key`.
pub fn owner_key(key: &str) -> String {
    format!("lock:{{{key}}}:owner")
}

/// The waiters of `key`'s line, by arrival.
pub fn line_key(key: &str) -> String {
    format!("lock:{{{key}}}:queue")
}

/// `GET key`.
///
/// # Panics
/// When the test's server does not answer.
pub async fn get(connection: &mut MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query_async(connection)
        .await
        .expect("the test's own server answers")
}

/// `PTTL key`.
///
/// # Panics
/// When the test's server does not answer.
pub async fn pttl(connection: &mut MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query_async(connection)
        .await
        .expect("the test's own server answers")
}

/// The members of `key`'s line, in order.
///
/// # Panics
/// When the test's server does not answer.
pub async fn line(connection: &mut MultiplexedConnection, key: &str) -> Vec<String> {
    redis::cmd("ZRANGE")
        .arg(line_key(key))
        .arg(0)
        .arg(-1)
        .query_async(connection)
        .await
        .expect("the test's own server answers")
}

/// Waits until `key`'s line holds `count` waiters.
///
/// # Panics
/// When it does not within 4 s or more.
pub async fn until_in_line(connection: &mut MultiplexedConnection, key: &str, count: usize) {
    for _ in 0..2_000 {
        if line(connection, key).await.len() >= count {
            return;
        }
        sleep(ms(2)).await;
    }
    panic!("nobody lined up for {key}");
}

/// Waits up to `within` until nothing of `key` but its fencing counter is left on the target;
/// what is left then.
pub async fn nothing_left(target: &Target, key: &str, within: Duration) -> Vec<String> {
    let tagged = format!("{{{key}}}");
    target
        .keys_left_within(within, |name| {
            name.contains(&tagged) && !name.ends_with(":fence")
        })
        .await
}

/// A small deterministic generator (xorshift; no shared state between workers).
pub fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// An inc client of its own on `url` (2 s command timeout).
///
/// # Panics
/// When it cannot connect.
pub async fn inc_locker(url: &str, fair: bool, ttl: Duration, retry: RetryPolicy) -> Locker {
    Locker::from_arc(inc_backend(url, fair).await)
        .with_options(LockOptions::default().with_ttl(ttl).with_retry(retry))
        .expect("valid options")
}

/// The backend of [`inc_locker`], for the raw API.
///
/// # Panics
/// When it cannot connect.
pub async fn inc_backend(url: &str, fair: bool) -> Arc<dyn Lock> {
    Arc::new(
        IncLock::connect(IncConfig {
            command_timeout: 2_000,
            ..IncConfig::new(url.to_owned()).with_fair(fair)
        })
        .await
        .expect("the test's own server answers"),
    )
}

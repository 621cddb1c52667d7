//! An extend whose answer comes back after the ttl it asked for was spent: the store did set the
//! new expiry, but the holder cannot tell how much of it is left (possibly none), so the extend
//! is not reported a success. Every backend that answers over a network gets the same answer
//! from the guard: an error naming the spent ttl, the guard's validity over and its lost signal
//! fired. The control: the same extend on a link fast enough succeeds.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::{LockError, LockGuard, LockOptions, Locker, RetryPolicy};
use lock_inc::{IncConfig, IncLock};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::proxy::LatencyProxy;
use lock_tests::server::{RedisServer, redis_or_skip};

/// Each direction: an answer comes ~2 × this after its request.
const DELAY: Duration = Duration::from_millis(150);
/// Shorter than one round trip through the proxy.
const SHORT: Duration = Duration::from_millis(200);

#[derive(Clone, Copy, Debug)]
enum Backend {
    Inc,
    Redlock,
}

/// A held, kept-alive guard on `k` through a proxy that delays by `delay` once it is held, and
/// its lost signal.
async fn held_through_a_slow_link(
    backend: Backend,
    delay: Duration,
) -> Option<(
    RedisServer,
    LatencyProxy,
    Locker,
    LockGuard,
    lock_core::LostSignal,
)> {
    let binary = redis_or_skip("late extend")?;
    let server = RedisServer::start(&binary, &[]).unwrap();
    let proxy = LatencyProxy::start(server.port()).await.unwrap();
    let locker = match backend {
        Backend::Inc => Locker::new(
            IncLock::connect(IncConfig {
                command_timeout: 5_000,
                ..IncConfig::new(proxy.url())
            })
            .await
            .unwrap(),
        ),
        Backend::Redlock => Locker::new(
            Redlock::new(
                RedlockConfig::new([proxy.url()]).with_node_timeout(Duration::from_secs(5)),
            )
            .unwrap(),
        ),
    }
    .with_options(
        LockOptions::default()
            .with_ttl(Duration::from_secs(30))
            .with_retry(RetryPolicy::none()),
    )
    .unwrap();
    let mut guard = locker.acquire("k").await.unwrap();
    // A watchdog that will not act for ~20 s: it only carries the lost signal here.
    let lost = guard.keep_alive().unwrap();
    proxy.set_delay(delay);
    Some((server, proxy, locker, guard, lost))
}

async fn an_extend_answered_after_its_ttl_is_not_a_success(backend: Backend) {
    let Some((server, proxy, _locker, mut guard, lost)) =
        held_through_a_slow_link(backend, DELAY).await
    else {
        return;
    };
    let error = guard.extend(SHORT).await.expect_err("answered too late");
    assert!(
        matches!(&error, LockError::Backend { message, .. } if message.contains("raise the ttl")),
        "{backend:?}: {error:?}"
    );
    assert!(!guard.is_valid(), "{backend:?}: the guard still says valid");
    assert!(lost.is_lost(), "{backend:?}: the lost signal did not fire");
    // The key is still ours in the store (for the short ttl): a release removes it.
    proxy.set_delay(Duration::ZERO);
    let _ = guard.release().await;
    let left = server.command("DBSIZE", Duration::from_secs(1)).unwrap();
    assert!(
        left == ":0" || backend_keeps_a_fence(backend),
        "{backend:?}: {left} keys left after the release"
    );
}

/// inc keeps the fencing counter; Redlock (fencing off) keeps nothing.
fn backend_keeps_a_fence(backend: Backend) -> bool {
    matches!(backend, Backend::Inc)
}

async fn the_same_extend_on_a_fast_link_succeeds(backend: Backend) {
    let Some((_server, _proxy, _locker, mut guard, lost)) =
        held_through_a_slow_link(backend, Duration::ZERO).await
    else {
        return;
    };
    guard.extend(Duration::from_secs(2)).await.unwrap();
    assert!(guard.is_valid() && !lost.is_lost(), "{backend:?}");
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_an_extend_answered_after_its_ttl_is_not_a_success() {
    an_extend_answered_after_its_ttl_is_not_a_success(Backend::Inc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_an_extend_answered_after_its_ttl_is_not_a_success() {
    an_extend_answered_after_its_ttl_is_not_a_success(Backend::Redlock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_the_same_extend_on_a_fast_link_succeeds() {
    the_same_extend_on_a_fast_link_succeeds(Backend::Inc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_the_same_extend_on_a_fast_link_succeeds() {
    the_same_extend_on_a_fast_link_succeeds(Backend::Redlock).await;
}

//! Redlock over several nodes wakes its waiters over pub/sub by default (`wake_on_release`
//! unset is on with several nodes): a waiter whose retry delay is long is woken by the
//! release, and a Redis user without pub/sub rights still releases every kind of lease (the
//! message is lost, not the release). Every client is its own backend instance, as a process
//! of its own would be.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::fair::waiting;
use lock_tests::server::{RedisServer, redis_or_skip};
use tokio::time::Instant;

const PROBE: Duration = Duration::from_millis(500);

/// Three fresh servers, each with the ACL `commands` run first.
fn servers(binary: &std::path::Path, commands: &[&str]) -> Vec<RedisServer> {
    (0..3)
        .map(|_| {
            let server = RedisServer::start(binary, &[]).expect("server");
            for command in commands {
                assert_eq!(server.command(command, PROBE).unwrap(), "+OK", "{command}");
            }
            server
        })
        .collect()
}

/// A client of its own on `urls`, configured by `configure`.
fn client(
    urls: &[String],
    retry: RetryPolicy,
    configure: impl FnOnce(RedlockConfig) -> RedlockConfig,
) -> Locker {
    let config =
        configure(RedlockConfig::new(urls.to_vec()).with_node_timeout(Duration::from_millis(500)));
    Locker::from_arc(Arc::new(Redlock::new(config).expect("redlock")))
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(10))
                .with_retry(retry),
        )
        .expect("options")
}

/// How long after the holder's release a waiter with a 2 s retry delay holds the key.
async fn wait_after_release(
    urls: &[String],
    configure: impl Fn(RedlockConfig) -> RedlockConfig,
) -> Duration {
    let holder = client(urls, RetryPolicy::none(), &configure);
    let waiter = client(urls, waiting(Duration::from_secs(2)), &configure);
    let guard = holder.acquire("woken").await.unwrap();
    let task = tokio::spawn(async move {
        let guard = waiter.acquire("woken").await.unwrap();
        let got = Instant::now();
        guard.release().await.unwrap();
        waiter.stop().await.unwrap();
        got
    });
    // The waiter made its first attempt and sleeps out its 2 s by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let released = Instant::now();
    guard.release().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
    holder.stop().await.unwrap();
    got - released
}

/// The default wakes the waiter within a fraction of its delay (by its turn in the fair line),
/// and so do the default wake-ups with `fair` off; the control (both turned off) sleeps the
/// delay out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_nodes_wake_a_waiter_on_release_by_default() {
    let Some(binary) = redis_or_skip("wake_defaults") else {
        return;
    };
    let servers = servers(&binary, &[]);
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let woken = wait_after_release(&urls, |config| config).await;
    assert!(woken < Duration::from_millis(800), "default: {woken:?}");
    let woken = wait_after_release(&urls, |config| config.with_fair(false)).await;
    assert!(woken < Duration::from_millis(800), "fair off: {woken:?}");
    let polled = wait_after_release(&urls, |config| {
        config.with_fair(false).with_wake_on_release(false)
    })
    .await;
    assert!(polled >= Duration::from_millis(1200), "control: {polled:?}");
}

/// A user without pub/sub channels (Redis 7's default for a new ACL user) takes and releases
/// a mutex, a multi-key lock, a semaphore permit and a read lock under contention on several
/// nodes with the default wake-ups, without an error: the release scripts' `PUBLISH` may be
/// refused, the release is not. (Before the publishes were `pcall`ed, every release here
/// failed with NOPERM.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_channels_releases_everything_on_several_nodes() {
    let Some(binary) = redis_or_skip("wake_defaults") else {
        return;
    };
    let servers = servers(
        &binary,
        &[
            "ACL SETUSER app on >app-pw ~* resetchannels +@all",
            "ACL SETUSER default off",
        ],
    );
    let urls: Vec<String> = servers
        .iter()
        .map(|server| format!("redis://app:app-pw@127.0.0.1:{}/", server.port()))
        .collect();
    let holder = client(&urls, RetryPolicy::none(), |config| config);
    let waiter = client(&urls, waiting(Duration::from_millis(50)), |config| config);
    for kind in ["mutex", "many", "permit", "read-write"] {
        let guard = match kind {
            "mutex" => holder.acquire("acl").await,
            "many" => holder.acquire_many(&["acl-a", "acl-b"]).await,
            "permit" => holder.acquire_permit("acl-sem", 1).await,
            _ => holder.acquire_write("acl-rw").await,
        }
        .unwrap_or_else(|error| panic!("{kind}: holder's acquire: {error}"));
        let waiter = waiter.clone();
        let task = tokio::spawn(async move {
            let guard = match kind {
                "mutex" => waiter.acquire("acl").await,
                "many" => waiter.acquire("acl-b").await,
                "permit" => waiter.acquire_permit("acl-sem", 1).await,
                _ => waiter.acquire_read("acl-rw").await,
            }?;
            guard.release().await
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        guard
            .release()
            .await
            .unwrap_or_else(|error| panic!("{kind}: holder's release: {error}"));
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap_or_else(|_| panic!("{kind}: the waiter never got it"))
            .unwrap()
            .unwrap_or_else(|error| panic!("{kind}: waiter: {error}"));
    }
    holder.stop().await.unwrap();
    waiter.stop().await.unwrap();
}

/// inc with `wake_on_release`, as the same user without channels: its release scripts'
/// `PUBLISH` may be refused too, and a mutex, a permit and a read-write lock (with a downgrade,
/// which announces too) are still taken and released under contention without an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inc_user_without_channels_releases_with_wake_ups_on() {
    let Some(binary) = redis_or_skip("wake_defaults") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("server");
    for command in [
        "ACL SETUSER app on >app-pw ~* resetchannels +@all",
        "ACL SETUSER default off",
    ] {
        assert_eq!(server.command(command, PROBE).unwrap(), "+OK", "{command}");
    }
    let url = format!("redis://app:app-pw@127.0.0.1:{}/", server.port());
    let inc = |retry: RetryPolicy| {
        let url = url.clone();
        async move {
            let config = lock_inc::IncConfig::new(url).with_wake_on_release(true);
            let lock = lock_inc::IncLock::connect(config).await.expect("inc");
            Locker::new(lock)
                .with_options(
                    LockOptions::default()
                        .with_ttl(Duration::from_secs(10))
                        .with_retry(retry),
                )
                .expect("options")
        }
    };
    let holder = inc(RetryPolicy::none()).await;
    let waiter = inc(waiting(Duration::from_millis(50))).await;
    for kind in ["mutex", "permit", "downgrade"] {
        let guard = match kind {
            "mutex" => holder.acquire("acl").await,
            "permit" => holder.acquire_permit("acl-sem", 1).await,
            _ => holder.acquire_write("acl-rw").await,
        }
        .unwrap_or_else(|error| panic!("{kind}: holder's acquire: {error}"));
        let waiter = waiter.clone();
        let task = tokio::spawn(async move {
            let guard = match kind {
                "mutex" => waiter.acquire("acl").await,
                "permit" => waiter.acquire_permit("acl-sem", 1).await,
                _ => waiter.acquire_read("acl-rw").await,
            }?;
            guard.release().await
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut guard = guard;
        if kind == "downgrade" {
            guard
                .downgrade()
                .await
                .unwrap_or_else(|error| panic!("holder's downgrade: {error}"));
        }
        guard
            .release()
            .await
            .unwrap_or_else(|error| panic!("{kind}: holder's release: {error}"));
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap_or_else(|_| panic!("{kind}: the waiter never got it"))
            .unwrap()
            .unwrap_or_else(|error| panic!("{kind}: waiter: {error}"));
    }
    holder.stop().await.unwrap();
    waiter.stop().await.unwrap();
}

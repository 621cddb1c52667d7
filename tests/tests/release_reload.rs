//! A Redlock mutex's release is sent as one `EVALSHA` written straight into its command (not
//! through redis-rs's `ScriptInvocation`): these tests hold that it still loads its script when
//! the server has lost it (`SCRIPT FLUSH`, a restart), for every shape of the release (fair or
//! not, with release wake-ups or not, manager or pool), and still deletes nothing but its own
//! key.

use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_redlock::{ConnectionKind, Redlock, RedlockConfig};
use lock_tests::server::{RedisServer, get_bulk, redis_or_skip};

const TIMEOUT: Duration = Duration::from_secs(5);

fn locker(server: &RedisServer, fair: bool, wake: bool, kind: ConnectionKind) -> Locker {
    let config = RedlockConfig::new([server.url()])
        .with_fair(fair)
        .with_wake_on_release(wake)
        .with_connection(kind);
    Locker::new(Redlock::new(config).expect("config"))
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(30))
                .with_retry(RetryPolicy::forever().with_deadline(TIMEOUT)),
        )
        .expect("options")
}

/// Every shape of a mutex release, each after the server's scripts were flushed while the lock
/// was held: the release succeeds, the key is gone, and a lock held by another token on another
/// key is untouched.
#[tokio::test]
async fn a_release_after_the_scripts_were_flushed_loads_them_and_deletes_the_key() {
    let Some(binary) = redis_or_skip("release_reload") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("redis-server");
    let bystander = locker(&server, false, false, ConnectionKind::Manager);
    let kept = bystander.acquire("bystander").await.expect("bystander");
    for fair in [true, false] {
        for wake in [true, false] {
            for kind in [ConnectionKind::Manager, ConnectionKind::Pool] {
                let shape = format!("fair {fair}, wake-ups {wake}, {kind:?}");
                let locker = locker(&server, fair, wake, kind);
                // Loaded once, as a long-lived client would have.
                locker
                    .acquire("reload")
                    .await
                    .expect("first")
                    .release()
                    .await
                    .expect("first release");
                let guard = locker.acquire("reload").await.expect("acquire");
                let flushed = server.command("SCRIPT FLUSH", TIMEOUT).expect("flush");
                assert!(
                    flushed.contains("OK"),
                    "{shape}: SCRIPT FLUSH answered {flushed:?}"
                );
                guard
                    .release()
                    .await
                    .unwrap_or_else(|error| panic!("{shape}: release after the flush: {error}"));
                assert_eq!(
                    get_bulk(server.port(), "reload"),
                    None,
                    "{shape}: the key stayed after the release"
                );
                // Taken again at once: nothing of the released lock is left in the way.
                let again = tokio::time::timeout(TIMEOUT, locker.try_acquire("reload"))
                    .await
                    .expect("answered")
                    .expect("try_acquire");
                assert!(again.is_some(), "{shape}: the key was not free again");
                again.expect("held").release().await.expect("release");
            }
        }
    }
    assert!(
        get_bulk(server.port(), "bystander").is_some(),
        "another lock's key was deleted"
    );
    kept.release().await.expect("bystander release");
}

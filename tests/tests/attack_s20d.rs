//! adv20d: hostile tests of cc013b9 (with a pool, Redlock's extends and downgrades go on each
//! node's one ordered connection, a lazily connected redis-rs `ConnectionManager`), over real
//! redis-server processes on 127.0.0.1.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_redlock::{ConnectionKind, Redlock, RedlockConfig};
use lock_tests::server::{RedisServer, redis_or_skip};
use tokio::time::sleep;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const PROBE: Duration = Duration::from_secs(2);

fn redlock_locker(
    urls: &[String],
    ttl: Duration,
    config: impl Fn(RedlockConfig) -> RedlockConfig,
) -> Locker {
    Locker::new(Redlock::new(config(RedlockConfig::new(urls.iter().cloned()))).unwrap())
        .with_options(
            LockOptions::default()
                .with_ttl(ttl)
                .with_retry(RetryPolicy::none()),
        )
        .unwrap()
}

/// An authenticated admin connection that stays open (the harness's inline commands send no
/// password).
fn admin(port: u16, password: &str) -> redis::Connection {
    redis::Client::open(format!("redis://:{password}@127.0.0.1:{port}/"))
        .unwrap()
        .get_connection_with_timeout(PROBE)
        .unwrap()
}

fn config_set(admin: &mut redis::Connection, name: &str, value: &str) {
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(name)
        .arg(value)
        .query(admin)
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// A connection attempt refused once (not an I/O error) and the ordered connection
// ---------------------------------------------------------------------------------------------

/// One node with a password. The holder's first extends open the node's ordered connection
/// (with the manager: reopen its one connection, killed) while the server's password is
/// another for a moment (a rotation, an ACL user off for a moment: `AUTH` refused, not an I/O
/// error). Then the password is the URL's again. Returns the holder's
/// extends after that (one per 200 ms for 2 s), whether a fresh acquisition on the same
/// locker worked meanwhile, and every error text seen.
async fn extends_after_a_refused_connect(
    kind: ConnectionKind,
) -> Option<(Vec<bool>, bool, String)> {
    let binary = redis_or_skip("adv20d: ordered connection refused once")?;
    let server = RedisServer::start(&binary, &[]).unwrap();
    let set = server
        .command("CONFIG SET requirepass s3cr3t-pw", PROBE)
        .unwrap();
    assert_eq!(set, "+OK");
    let mut admin = admin(server.port(), "s3cr3t-pw");
    let url = format!("redis://:s3cr3t-pw@127.0.0.1:{}/", server.port());
    let locker = redlock_locker(&[url], Duration::from_secs(30), |config| {
        config.with_node_timeout(ms(500)).with_connection(kind)
    });
    let mut guard = locker.acquire("k").await.unwrap();
    let mut errors = String::new();
    config_set(&mut admin, "requirepass", "rotated-pw");
    if kind == ConnectionKind::Manager {
        // The manager's one connection must reconnect: kill it (the admin's is spared).
        let _: redis::Value = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .arg("SKIPME")
            .arg("yes")
            .query(&mut admin)
            .unwrap();
        sleep(ms(100)).await;
    }
    // Twice: the manager's first one meets its dead connection, and its reconnection the
    // changed password.
    for _ in 0..2 {
        let refused = guard.extend(Duration::from_secs(30)).await;
        errors.push_str(&format!("{refused:?}\n"));
        sleep(ms(200)).await;
    }
    config_set(&mut admin, "requirepass", "s3cr3t-pw");
    sleep(ms(300)).await;
    let mut extends = Vec::new();
    for _ in 0..10 {
        let extended = guard.extend(Duration::from_secs(30)).await;
        if let Err(error) = &extended {
            errors.push_str(&format!("{error} {error:?}\n"));
        }
        extends.push(extended.is_ok());
        sleep(ms(200)).await;
    }
    let other = locker.try_acquire("other").await;
    if let Err(error) = &other {
        errors.push_str(&format!("{error} {error:?}\n"));
    }
    let acquired = matches!(other, Ok(Some(_)));
    if let Ok(Some(other)) = other {
        let _ = other.release().await;
    }
    let _ = guard.release().await;
    let _ = locker.stop().await;
    Some((extends, acquired, errors))
}

/// With a pool, the node's ordered connection tried to connect while the server refused
/// its password for a moment; redis-rs's `ConnectionManager` keeps a failed connection attempt
/// that is not an I/O error (here "Password authentication failed") as its connection and
/// never tries again: every later extend and downgrade on that node fails, for the life of
/// the locker, while the pool's acquisitions on the same node work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_pool_extends_work_again_once_the_password_is_accepted_again() {
    let Some((extends, acquired, errors)) =
        extends_after_a_refused_connect(ConnectionKind::Pool).await
    else {
        return;
    };
    assert!(acquired, "the pool's acquisition failed too: {errors}");
    assert!(
        extends.iter().skip(1).all(|&ok| ok),
        "extends after the password was accepted again: {extends:?}\n{errors}"
    );
    assert!(!errors.contains("s3cr3t"), "the password leaked: {errors}");
}

/// The same with the manager (not new in cc013b9): its one connection carries everything, so
/// the node is lost for acquisitions too, for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_manager_works_again_once_the_password_is_accepted_again() {
    let Some((extends, acquired, errors)) =
        extends_after_a_refused_connect(ConnectionKind::Manager).await
    else {
        return;
    };
    assert!(
        extends.iter().skip(1).all(|&ok| ok) && acquired,
        "extends after the password was accepted again: {extends:?}, acquired: {acquired}\n{errors}"
    );
    assert!(!errors.contains("s3cr3t"), "the password leaked: {errors}");
}

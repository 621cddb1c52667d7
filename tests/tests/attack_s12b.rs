//! Attacks on `fair` as the default on `redis` (Redlock on one node, b20c4d0: `fair` unset is
//! on with one node), its cheap first attempt (`SET NX` + `EXISTS` of the line in one plain
//! pipeline, bdc759b) and inc's cheaper fair path (374c9ba). Every client is its own backend
//! instance (a process of its own, as far as the server can tell).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::fair::{Store, Target, waiting};
use lock_tests::server::{RedisServer, redis_or_skip};
use tokio::time::Instant;

const PROBE: Duration = Duration::from_millis(500);

/// A client over a Redlock instance of its own on `url`, configured by `config` (the
/// configuration's defaults otherwise: `fair` unset).
fn client_on(
    url: &str,
    ttl: Duration,
    retry: RetryPolicy,
    config: impl FnOnce(RedlockConfig) -> RedlockConfig,
) -> Locker {
    let config = config(
        RedlockConfig::new([url.to_owned()]).with_node_timeout(Duration::from_millis(500)),
    );
    Locker::from_arc(Arc::new(Redlock::new(config).expect("redlock")))
        .with_options(LockOptions::default().with_ttl(ttl).with_retry(retry))
        .expect("options")
}

/// One contended hand-over as the ACL user of `url`: A holds, B waits, A releases, B gets it.
/// The errors seen, in order (empty when every step worked).
async fn contended_cycle(url: &str, fair: Option<bool>) -> Vec<String> {
    let configure = |config: RedlockConfig| match fair {
        Some(fair) => config.with_fair(fair),
        None => config,
    };
    let ttl = Duration::from_secs(10);
    let a = client_on(url, ttl, RetryPolicy::none(), configure);
    let b = client_on(url, ttl, waiting(Duration::from_millis(50)), configure);
    let mut errors = Vec::new();
    let guard = match a.acquire("acl-fair").await {
        Ok(guard) => guard,
        Err(error) => return vec![format!("A's acquire: {error}")],
    };
    let waiter = tokio::spawn(async move {
        let outcome = b.acquire("acl-fair").await;
        let outcome = match outcome {
            Ok(guard) => guard.release().await.map_err(|e| format!("B's release: {e}")),
            Err(error) => Err(format!("B's acquire: {error}")),
        };
        b.stop().await.unwrap();
        outcome
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    if let Err(error) = guard.release().await {
        errors.push(format!("A's release: {error}"));
    }
    match tokio::time::timeout(Duration::from_secs(20), waiter).await {
        Ok(Ok(Err(error))) => errors.push(error),
        Ok(Ok(Ok(()))) => {}
        other => errors.push(format!("B: {other:?}")),
    }
    a.stop().await.unwrap();
    errors
}

/// Promised (b20c4d0, CHANGELOG "`redis` waits fairly by default"): turning fair waiting on
/// by default changes how waiters wait, not whether locking works: an application whose Redis
/// user may run every command on every key keeps locking as before.
///
/// Broken on main: Redis 7 gives a new ACL user no pub/sub channels (`acl-pubsub-default
/// resetchannels`, written out here). Without `fair` such a user locks and unlocks under
/// contention without a single error (checked first, as the control). With the new default
/// the release of a contended lock runs `PUBLISH lock-turn:<client>` inside the release script
/// (line_pass.lua), which the server refuses (NOPERM): the holder's release reports an error
/// (the key was in fact released and reserved for the waiter, whose wake-up never went out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_without_channels_locks_under_contention_by_default() {
    let Some(binary) = redis_or_skip("attack_s12b") else {
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
    let plain = contended_cycle(&url, Some(false)).await;
    assert!(plain.is_empty(), "control, without fair: {plain:?}");
    let default = contended_cycle(&url, None).await;
    assert!(
        default.is_empty(),
        "the same user, the same cycle, with fair by default: {default:?}"
    );
}

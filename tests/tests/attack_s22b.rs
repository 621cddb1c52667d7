//! adv22b: attacks on 4f7ef69 (a release that deleted the keys on a node that took them late
//! is not re-sent there): can "the release deleted our keys here" be true on a node while a
//! later write of our token still lands there? Real redis-server processes on loopback.
//!
//! - Broke (fixed): a fair waiter's plain round and its fair round share one token; the
//!   release may delete the plain round's late `SET` on a slow scriptless node, the fair
//!   attempt landing after it, not re-sent: the key stays for its ttl.
//! - Held: non-fair mutex, multi-key mutex, permit slot, read, write lock on a slow
//!   scriptless node (a permit fails it when late takers are never re-sent: not vacuous).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::fair::lapsed_line;
use lock_tests::proxy::LatencyProxy;
use lock_tests::server::{RedisServer, redis_or_skip};

const PROBE: Duration = Duration::from_secs(2);

fn waiting(ttl: Duration) -> LockOptions {
    LockOptions::default()
        .with_ttl(ttl)
        .with_retry(RetryPolicy::forever())
}

/// What each node still holds (`KEYS *`), with the key's PTTL.
fn leftovers(servers: &[RedisServer]) -> Vec<String> {
    servers
        .iter()
        .enumerate()
        .filter_map(|(index, server)| {
            let keys = server.command("KEYS *", PROBE).unwrap();
            let size = server.command("DBSIZE", PROBE).unwrap();
            (size != ":0").then(|| format!("node {index}: {size} keys: {keys}"))
        })
        .collect()
}

/// Fair Redlock (the default over several nodes) on three nodes, the third behind a 100 ms
/// proxy; its acquisition script flushed there (`SCRIPT FLUSH`, a restart), the release script
/// loaded since (another client released there). A waiter's plain first round (`SET NX`) is
/// refused by the two fast nodes (each has a line, of one expired entry) and the waiter's fair
/// round, with the SAME token, wins on them at once. On the slow node the plain `SET` lands
/// first (our token), then the fair attempt's `EVALSHA` (NOSCRIPT), then the release, sent at
/// once: it deletes the key the plain `SET` wrote (deleted == wanted), and only then does the
/// fair attempt, reloaded, take the key: late yes. Since 4f7ef69 that node is not sent the
/// release again, and the plain round's undo went out before the fair attempt's retry landed:
/// our key stays there for its whole ttl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fair_release_that_deleted_the_plain_rounds_write_is_still_resent_after_a_late_fair_take() {
    let Some(binary) = redis_or_skip("adv22b fair plain then fair") else {
        return;
    };
    let servers: Vec<RedisServer> = (0..3)
        .map(|_| RedisServer::start(&binary, &[]).unwrap())
        .collect();
    let proxy = LatencyProxy::start(servers[2].port()).await.unwrap();
    let urls = vec![servers[0].url(), servers[1].url(), proxy.url()];
    let lock = Redlock::new(
        RedlockConfig::new(urls)
            .with_fair(true)
            .with_node_timeout(Duration::from_secs(2)),
    )
    .unwrap();
    let locker = Locker::new(lock)
        .with_options(waiting(Duration::from_secs(10)))
        .unwrap();
    // Warm up: connections, subscriptions for turns, scripts, the same way as below.
    lapsed_line(&servers[0].url(), "k").await;
    lapsed_line(&servers[1].url(), "k").await;
    locker.acquire("k").await.unwrap().release().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        leftovers(&servers),
        Vec::<String>::new(),
        "after the warm-up"
    );
    // The slow node loses its scripts; another (single-node fair) client releases there.
    servers[2].command("SCRIPT FLUSH", PROBE).unwrap();
    {
        let side = Locker::new(
            Redlock::new(RedlockConfig::new([servers[2].url()]).with_fair(true)).unwrap(),
        )
        .with_options(waiting(Duration::from_secs(10)))
        .unwrap();
        side.acquire("side").await.unwrap().release().await.unwrap();
        side.stop().await.unwrap();
    }
    lapsed_line(&servers[0].url(), "k").await;
    lapsed_line(&servers[1].url(), "k").await;
    proxy.set_delay(Duration::from_millis(100));
    let guard = locker.acquire("k").await.unwrap();
    guard.release().await.unwrap();
    // The slow node's whole exchange is about six 100 ms hops; then its re-sends.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let left = leftovers(&servers);
    let pttl = servers[2].command("PTTL k", PROBE).unwrap()
        + " "
        + &servers[2].command("GET k", PROBE).unwrap();
    assert!(
        left.is_empty(),
        "after the release (ttl 10 s): {left:?}; PTTL k on node 2: {pttl}"
    );
    locker.stop().await.unwrap();
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Mutex,
    Many,
    Permit,
    Read,
    Write,
}

async fn take(locker: &Locker, kind: Kind) -> lock_core::Result<lock_core::LockGuard> {
    match kind {
        Kind::Mutex => locker.acquire("k").await,
        Kind::Many => locker.acquire_many(&["k", "l"]).await,
        Kind::Permit => locker.acquire_permit("k", 2).await,
        Kind::Read => locker.acquire_read("k").await,
        Kind::Write => locker.acquire_write("k").await,
    }
}

/// Held: every other kind (a non-fair mutex, a multi-key mutex, a permit slot, a read and a
/// write lock) on three nodes, the third slow (60 ms each way) and scriptless (`SCRIPT
/// FLUSH` after a warm-up): the release, sent at once, lands there while the acquisition is
/// still in EVALSHA / NOSCRIPT / LOAD / EVALSHA (or answers behind it); whatever each release
/// answered, nothing of ours is left on any node once the exchanges are over, and a second
/// client takes the same lease at once. Each attempt writes its token once per node here, so
/// "the release deleted it" proves it landed behind the acquisition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_leaves_nothing_on_a_slow_scriptless_node() {
    let Some(binary) = redis_or_skip("adv22b every kind slow scriptless") else {
        return;
    };
    for kind in [
        Kind::Mutex,
        Kind::Many,
        Kind::Permit,
        Kind::Read,
        Kind::Write,
    ] {
        let servers: Vec<RedisServer> = (0..3)
            .map(|_| RedisServer::start(&binary, &[]).unwrap())
            .collect();
        let proxy = LatencyProxy::start(servers[2].port()).await.unwrap();
        let urls = vec![servers[0].url(), servers[1].url(), proxy.url()];
        let config = || {
            RedlockConfig::new(urls.clone())
                .with_fair(false)
                .with_node_timeout(Duration::from_secs(2))
        };
        let locker = Locker::new(Redlock::new(config()).unwrap())
            .with_options(waiting(Duration::from_secs(10)))
            .unwrap();
        take(&locker, kind).await.unwrap().release().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            leftovers(&servers),
            Vec::<String>::new(),
            "{kind:?} warm-up"
        );
        servers[2].command("SCRIPT FLUSH", PROBE).unwrap();
        proxy.set_delay(Duration::from_millis(60));
        for _ in 0..2 {
            take(&locker, kind).await.unwrap().release().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(leftovers(&servers), Vec::<String>::new(), "{kind:?}");
        let other = Locker::new(Redlock::new(config()).unwrap())
            .with_options(
                LockOptions::default()
                    .with_ttl(Duration::from_secs(10))
                    .with_retry(RetryPolicy::none()),
            )
            .unwrap();
        let guard = match kind {
            Kind::Mutex => other.try_acquire("k").await.unwrap(),
            Kind::Many => other.acquire_many(&["k", "l"]).await.ok(),
            // A writer: held out by any permit, reader or writer left behind.
            _ => other
                .try_acquire_kind("k", lock_core::LeaseKind::Write)
                .await
                .unwrap(),
        };
        assert!(
            guard.is_some(),
            "{kind:?}: a second client cannot take the key"
        );
        if let Some(guard) = guard {
            guard.release().await.unwrap();
        }
        locker.stop().await.unwrap();
        other.stop().await.unwrap();
    }
}

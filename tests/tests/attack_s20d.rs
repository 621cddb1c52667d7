//! adv20d: hostile tests of cc013b9 (with a pool, Redlock's extends and downgrades go on each
//! node's one ordered connection, a lazily connected redis-rs `ConnectionManager`), over real
//! redis-server processes on 127.0.0.1.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_redlock::{ConnectionKind, Redlock, RedlockConfig};
use lock_tests::proxy::LatencyProxy;
use lock_tests::server::{RedisServer, client_list, redis_or_skip, settle_connections};
use tokio::time::{Instant, sleep, timeout};

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
    query: &str,
) -> Option<(Vec<bool>, bool, String)> {
    let binary = redis_or_skip("adv20d: ordered connection refused once")?;
    let server = RedisServer::start(&binary, &[]).unwrap();
    let set = server
        .command("CONFIG SET requirepass s3cr3t-pw", PROBE)
        .unwrap();
    assert_eq!(set, "+OK");
    let mut admin = admin(server.port(), "s3cr3t-pw");
    let url = format!("redis://:s3cr3t-pw@127.0.0.1:{}/{query}", server.port());
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
        extends_after_a_refused_connect(ConnectionKind::Pool, "").await
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
        extends_after_a_refused_connect(ConnectionKind::Manager, "").await
    else {
        return;
    };
    assert!(
        extends.iter().skip(1).all(|&ok| ok) && acquired,
        "extends after the password was accepted again: {extends:?}, acquired: {acquired}\n{errors}"
    );
    assert!(!errors.contains("s3cr3t"), "the password leaked: {errors}");
}

/// The same over RESP3 (`?protocol=resp3`): the password goes with `HELLO`, whose refusal
/// redis-rs answers as the server's `WRONGPASS` error, not as an authentication failure;
/// the manager kept it as its connection for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_resp3_manager_and_pool_work_again_once_the_password_is_accepted_again() {
    for kind in [ConnectionKind::Manager, ConnectionKind::Pool] {
        let Some((extends, acquired, errors)) =
            extends_after_a_refused_connect(kind, "?protocol=resp3").await
        else {
            return;
        };
        assert!(
            errors.contains("WRONGPASS"),
            "{kind:?}: the refusal was not met over RESP3: {errors}"
        );
        assert!(
            extends.iter().skip(1).all(|&ok| ok) && acquired,
            "{kind:?}: extends after the password was accepted again: {extends:?}, acquired: \
             {acquired}\n{errors}"
        );
        assert!(!errors.contains("s3cr3t"), "the password leaked: {errors}");
    }
}

// ---------------------------------------------------------------------------------------------
// How many connections, and none after `stop`
// ---------------------------------------------------------------------------------------------

fn pooled(pool_size: usize) -> impl Fn(RedlockConfig) -> RedlockConfig {
    move |config| {
        let mut config = config
            .with_node_timeout(ms(1_000))
            .with_connection(ConnectionKind::Pool);
        config.pool_size = pool_size;
        config
    }
}

/// A pool of 2 per node: four clones of the locker, sixteen holders at once that extend,
/// downgrade and release, open at most 2 + 1 connections on the node (the negative control:
/// at least 2, the ordered one among them); `stop` with a guard still kept alive closes them
/// all. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_pool_opens_its_size_plus_one_ordered_connection_and_stop_closes_all() {
    let Some(binary) = redis_or_skip("adv20d: connection count") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let locker = redlock_locker(&[server.url()], Duration::from_secs(10), pooled(2));
    let clones: Vec<Locker> = (0..4).map(|_| locker.clone()).collect();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let locker = clones[i % 4].clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..3 {
                let key = format!("k{i}-{round}");
                let mut guard = if i % 2 == 0 {
                    locker.acquire(&key).await.unwrap()
                } else {
                    locker.acquire_write(&key).await.unwrap()
                };
                guard.extend(Duration::from_secs(10)).await.unwrap();
                if i % 2 == 1 {
                    guard.downgrade().await.unwrap();
                }
                guard.extend(Duration::from_secs(10)).await.unwrap();
                guard.release().await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut kept = locker.acquire("kept").await.unwrap();
    let lost = kept.keep_alive().unwrap();
    let open = client_list(server.port()).await;
    assert!(
        (2..=3).contains(&open.len()),
        "a pool of 2 and one ordered connection: {open:#?}"
    );
    locker.stop().await.unwrap();
    let left = settle_connections(server.port(), 0, Duration::from_secs(3)).await;
    assert_eq!(
        left,
        0,
        "left open after stop: {:#?}",
        client_list(server.port()).await
    );
    drop(lost);
    drop(kept);
    drop(clones);
}

// ---------------------------------------------------------------------------------------------
// A stalled ordered connection: exclusion, bounded waits, recovery
// ---------------------------------------------------------------------------------------------

async fn three_behind_proxies() -> Option<(Vec<RedisServer>, Vec<LatencyProxy>, Vec<String>)> {
    let binary = redis_or_skip("adv20d: three nodes")?;
    let servers: Vec<RedisServer> = (0..3)
        .map(|_| RedisServer::start(&binary, &[]).unwrap())
        .collect();
    let mut proxies = Vec::new();
    for server in &servers {
        proxies.push(LatencyProxy::start(server.port()).await.unwrap());
    }
    let urls = proxies.iter().map(LatencyProxy::url).collect();
    Some((servers, proxies, urls))
}

fn dbsize(server: &RedisServer) -> u64 {
    let answer = server.command("DBSIZE", PROBE).unwrap();
    answer.trim_start_matches(':').trim().parse().unwrap()
}

/// Every server's key count once all are empty, or when `limit` is over (the release's
/// answers from the nodes past its quorum, and its follow-up, may take a moment on a busy
/// machine).
async fn sizes_within(servers: &[RedisServer], limit: Duration) -> Vec<u64> {
    let deadline = Instant::now() + limit;
    loop {
        let sizes: Vec<u64> = servers.iter().map(dbsize).collect();
        if sizes.iter().all(|&size| size == 0) || Instant::now() >= deadline {
            return sizes;
        }
        sleep(ms(50)).await;
    }
}

/// Two of three nodes' connections stall (the ordered ones and the pool's then open) under a
/// kept-alive guard of ttl 2 s: its extends cannot reach a quorum. Another client polls the
/// key: it never gets it while the guard says valid, and the guard reports the lock lost. Meanwhile the stalled locker still acquires other keys on new pooled
/// connections, each call bounded. Once the stall ends, the stale extends land (token-checked:
/// the new holder's key keeps its 20 s), and the locker's extends work again. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_pool_stalled_ordered_connections_report_the_lock_lost_and_never_double_hold() {
    let Some((servers, proxies, urls)) = three_behind_proxies().await else {
        return;
    };
    let locker = redlock_locker(&urls, Duration::from_secs(2), |config| {
        config
            .with_node_timeout(ms(300))
            .with_connection(ConnectionKind::Pool)
    });
    let other = redlock_locker(&urls, Duration::from_secs(20), |config| {
        config.with_node_timeout(ms(300))
    });
    let mut guard = locker.acquire("k").await.unwrap();
    guard.extend(Duration::from_secs(2)).await.unwrap();
    proxies[1].stall_existing(0);
    proxies[2].stall_existing(0);
    let lost = guard.keep_alive().unwrap();
    // The stalled locker's acquisitions of other keys: each bounded, and they work again
    // once the pool's stalled connections left it.
    let mut side = None;
    for _ in 0..5 {
        let started = Instant::now();
        let attempt = timeout(Duration::from_secs(3), locker.try_acquire("side")).await;
        assert!(started.elapsed() < Duration::from_secs(2), "{attempt:?}");
        if let Ok(Ok(Some(got))) = attempt {
            side = Some(got);
            break;
        }
    }
    let side = side.expect("the pool never acquired again");
    let mut taken = None;
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        if let Some(got) = other.try_acquire("k").await.unwrap() {
            assert!(
                !guard.is_valid(),
                "a second holder while the first guard says valid for {:?} more",
                guard.remaining()
            );
            taken = Some(got);
            break;
        }
        sleep(ms(50)).await;
    }
    // The loss is reported (when, see the test below).
    let fired = timeout(Duration::from_secs(3), lost.lost()).await;
    assert!(fired.is_ok(), "the first guard's loss was never reported");
    let taken = taken.expect("the other client never got the key");
    proxies[1].release_stall();
    proxies[2].release_stall();
    sleep(ms(500)).await;
    for server in &servers[1..] {
        let left = server.command("PTTL k", PROBE).unwrap();
        let left: i64 = left.trim_start_matches(':').parse().unwrap();
        assert!(left > 15_000, "the new holder's key was cut to {left} ms");
    }
    // Extends go through again.
    let mut fresh = locker.acquire("fresh").await.unwrap();
    fresh.extend(Duration::from_secs(2)).await.unwrap();
    fresh.release().await.unwrap();
    let _ = side.release().await;
    taken.release().await.unwrap();
    drop(guard);
    sleep(ms(2_300)).await;
    for server in &servers {
        assert_eq!(dbsize(server), 0, "left behind");
    }
}

/// A writer's downgrade meets two stalled nodes (ordered connection) and fails; the holder
/// releases (pool, new connections); the stalled downgrade lands after that, and a new holder
/// takes the lock in between. Nothing of the first holder's survives, the new writer's key
/// is whole, and after its release nothing is left. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_pool_a_stalled_downgrade_landing_after_the_release_and_a_new_writer_changes_nothing()
 {
    let Some((servers, proxies, urls)) = three_behind_proxies().await else {
        return;
    };
    let locker = redlock_locker(&urls, Duration::from_secs(10), |config| {
        config
            .with_node_timeout(ms(300))
            .with_connection(ConnectionKind::Pool)
    });
    let other = redlock_locker(&urls, Duration::from_secs(10), |config| {
        config.with_node_timeout(ms(300))
    });
    let mut guard = locker.acquire_write("rw").await.unwrap();
    guard.extend(Duration::from_secs(10)).await.unwrap();
    proxies[1].stall_existing(0);
    proxies[2].stall_existing(0);
    let downgraded = guard.downgrade().await;
    assert!(downgraded.is_err(), "{downgraded:?}");
    let _ = guard.release().await;
    // The release may have met a stalled pooled connection: the key is free once a majority
    // freed it or it expired; the new writer takes it on fresh connections.
    let started = Instant::now();
    let writer = loop {
        if let Some(writer) = other
            .try_acquire_kind("rw", lock_core::LeaseKind::Write)
            .await
            .unwrap()
        {
            break writer;
        }
        assert!(
            started.elapsed() < Duration::from_secs(12),
            "never free again"
        );
        sleep(ms(50)).await;
    };
    proxies[1].release_stall();
    proxies[2].release_stall();
    sleep(ms(500)).await;
    // No reader can join: the new writer's lease is a write lease still, on a majority.
    let reader = other
        .try_acquire_kind("rw", lock_core::LeaseKind::Read)
        .await
        .unwrap();
    assert!(reader.is_none(), "a reader joined the new writer");
    assert!(writer.is_valid());
    writer.release().await.unwrap();
    assert_eq!(
        sizes_within(&servers, ms(3_000)).await,
        [0, 0, 0],
        "left behind"
    );
}

/// The documented use of the lost signal: the critical section stops when it fires. A
/// kept-alive guard of ttl 3 s on three nodes, two of them stalled (node timeout 500 ms):
/// the watchdog's extends fail, and its retry is still out when the validity ends (sent
/// 200 ms before, answered "no quorum" 300 ms after). The signal fired only when that round
/// ended, ~300 ms after the validity had lapsed, while another client already held the lock
/// (its keys expired on the two stalled nodes ~30 ms after the lapse).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_lost_signal_fires_when_the_validity_lapses_not_when_a_late_extend_round_ends() {
    let Some((_servers, proxies, urls)) = three_behind_proxies().await else {
        return;
    };
    let locker = redlock_locker(&urls, Duration::from_secs(3), |config| {
        config
            .with_node_timeout(ms(500))
            .with_connection(ConnectionKind::Pool)
    });
    let other = redlock_locker(&urls, Duration::from_secs(20), |config| {
        config.with_node_timeout(ms(300))
    });
    let mut guard = locker.acquire("k").await.unwrap();
    guard.extend(Duration::from_secs(3)).await.unwrap();
    proxies[1].stall_existing(0);
    proxies[2].stall_existing(0);
    let lost = guard.keep_alive().unwrap();
    let valid_until = guard.valid_until();
    let fired = timeout(Duration::from_secs(5), lost.lost()).await;
    let late = Instant::now().saturating_duration_since(valid_until);
    assert!(fired.is_ok(), "never reported lost");
    // The other client's view when the signal fired.
    let taken = other.try_acquire("k").await.unwrap();
    let other_holds = taken.is_some();
    if let Some(taken) = taken {
        let _ = taken.release().await;
    }
    proxies[1].release_stall();
    proxies[2].release_stall();
    assert!(
        late < ms(100),
        "the lost signal fired {late:?} after the validity had lapsed (another client held the lock by then: {other_holds})"
    );
}

/// A multi-key lock and a permit: their extends to 3 s meet two stalled nodes and fail; the
/// holders release (pool); another client takes the keys for 20 s; the stale extends land
/// after that (token-checked: the new holders' keys keep their 20 s). Nothing is left after
/// the releases. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_pool_stale_multi_key_and_permit_extends_leave_a_new_holders_keys_alone() {
    let Some((servers, proxies, urls)) = three_behind_proxies().await else {
        return;
    };
    let locker = redlock_locker(&urls, Duration::from_secs(10), |config| {
        config
            .with_node_timeout(ms(300))
            .with_connection(ConnectionKind::Pool)
    });
    let other = redlock_locker(&urls, Duration::from_secs(20), |config| {
        config.with_node_timeout(ms(300))
    });
    let mut many = locker.acquire_many(&["a", "b"]).await.unwrap();
    let mut permit = locker.acquire_permit("sem", 1).await.unwrap();
    many.extend(Duration::from_secs(10)).await.unwrap();
    permit.extend(Duration::from_secs(10)).await.unwrap();
    proxies[1].stall_existing(0);
    proxies[2].stall_existing(0);
    assert!(many.extend(Duration::from_secs(3)).await.is_err());
    assert!(permit.extend(Duration::from_secs(3)).await.is_err());
    let _ = many.release().await;
    let _ = permit.release().await;
    let started = Instant::now();
    let (taken_many, taken_permit) = loop {
        match (
            other.acquire_many(&["a", "b"]).await,
            other.acquire_permit("sem", 1).await,
        ) {
            (Ok(a), Ok(b)) => break (a, b),
            (a, b) => {
                if let Ok(a) = a {
                    let _ = a.release().await;
                }
                if let Ok(b) = b {
                    let _ = b.release().await;
                }
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(12),
            "never free again"
        );
        sleep(ms(100)).await;
    };
    proxies[1].release_stall();
    proxies[2].release_stall();
    sleep(ms(500)).await;
    // Each key: whole (over 15 s) on a quorum, and nowhere cut short (a node the new holder
    // did not win may have no key).
    for key in ["a", "b", "sem"] {
        let left: Vec<i64> = servers
            .iter()
            .map(|server| {
                let left = server.command(&format!("PTTL {key}"), PROBE).unwrap();
                left.trim_start_matches(':').parse().unwrap()
            })
            .collect();
        assert!(
            left.iter().filter(|&&left| left > 15_000).count() >= 2
                && left.iter().all(|&left| left == -2 || left > 15_000),
            "the new holder's {key} was cut: {left:?}"
        );
    }
    taken_many.release().await.unwrap();
    taken_permit.release().await.unwrap();
    assert_eq!(
        sizes_within(&servers, ms(3_000)).await,
        [0, 0, 0],
        "left behind"
    );
}

/// One node; a kept-alive guard of ttl 1.5 s while every client connection of the node is
/// killed four times, 400 ms apart (the ordered connection and the pool's): the watchdog's
/// extends go through on the ordered connection's reconnections, the lock is never reported
/// lost, and its release leaves nothing. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_pool_watchdog_keeps_the_lock_through_kills_of_the_ordered_connection() {
    let Some(binary) = redis_or_skip("adv20d: client kill") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let locker = redlock_locker(&[server.url()], ms(1_500), |config| {
        config
            .with_node_timeout(ms(300))
            .with_connection(ConnectionKind::Pool)
    });
    let mut guard = locker.acquire("k").await.unwrap();
    guard.extend(ms(1_500)).await.unwrap();
    let lost = guard.keep_alive().unwrap();
    for _ in 0..4 {
        sleep(ms(400)).await;
        let killed = server.command("CLIENT KILL TYPE normal", PROBE).unwrap();
        assert!(killed.starts_with(':'), "{killed}");
    }
    sleep(ms(1_000)).await;
    assert!(!lost.is_lost(), "lost after its connection was killed");
    assert!(guard.is_valid());
    guard.release().await.unwrap();
    assert_eq!(dbsize(&server), 0, "left behind");
}

/// As `extends_after_a_refused_connect`, for a refused `SELECT` (the URL's database, an ACL
/// user denied `SELECT` for a moment): one node, all of the user's connections killed while
/// it is denied, two extends then, and ten more once it is allowed again.
async fn extends_after_a_refused_select(kind: ConnectionKind) -> Option<(Vec<bool>, String)> {
    let binary = redis_or_skip("adv20d: refused select")?;
    let server = RedisServer::start(&binary, &[]).unwrap();
    let set = server
        .command("ACL SETUSER u on >u-pw ~* &* +@all", PROBE)
        .unwrap();
    assert_eq!(set, "+OK");
    let url = format!("redis://u:u-pw@127.0.0.1:{}/1", server.port());
    let locker = redlock_locker(&[url], Duration::from_secs(30), |config| {
        config.with_node_timeout(ms(500)).with_connection(kind)
    });
    let mut guard = locker.acquire("k").await.unwrap();
    guard.extend(Duration::from_secs(30)).await.unwrap();
    let mut errors = String::new();
    assert_eq!(
        server.command("ACL SETUSER u -select", PROBE).unwrap(),
        "+OK"
    );
    let killed = server.command("CLIENT KILL USER u", PROBE).unwrap();
    assert!(killed.starts_with(':'), "{killed}");
    sleep(ms(100)).await;
    for _ in 0..2 {
        let refused = guard.extend(Duration::from_secs(30)).await;
        errors.push_str(&format!("{refused:?}\n"));
        sleep(ms(200)).await;
    }
    assert_eq!(
        server.command("ACL SETUSER u +select", PROBE).unwrap(),
        "+OK"
    );
    sleep(ms(300)).await;
    let mut extends = Vec::new();
    for _ in 0..10 {
        let extended = guard.extend(Duration::from_secs(30)).await;
        if let Err(error) = &extended {
            errors.push_str(&format!("{error}\n"));
        }
        extends.push(extended.is_ok());
        sleep(ms(200)).await;
    }
    let _ = guard.release().await;
    Some((extends, errors))
}

/// With a pool: the ordered connection's `SELECT` refused for a moment ("Redis server refused
/// to switch database", not an I/O error, kept by the `ConnectionManager` for good, as a
/// refused `AUTH` is): every later extend on the node failed, also after d275f51 (which made
/// the manager anew after a refused `AUTH` only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_pool_extends_work_again_once_select_is_allowed_again() {
    let Some((extends, errors)) = extends_after_a_refused_select(ConnectionKind::Pool).await else {
        return;
    };
    assert!(extends.iter().all(|&ok| ok), "{extends:?}\n{errors}");
}

/// The same with the manager (not new in cc013b9).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_manager_works_again_once_select_is_allowed_again() {
    let Some((extends, errors)) = extends_after_a_refused_select(ConnectionKind::Manager).await
    else {
        return;
    };
    assert!(extends.iter().all(|&ok| ok), "{extends:?}\n{errors}");
}

//! adv20a: hostile tests of 55fe5ee (an extend answered after its ttl was spent fails with
//! "raise the ttl" and reports the lock lost; Redlock leaves that judgement to the guard), over
//! Redis (inc, Redlock on one and three nodes) and the in-process store.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::{LeaseKind, LockError, LockOptions, Locker, LostSignal, RetryPolicy};
use lock_inc::{IncConfig, IncLock};
use lock_memory::MemoryLock;
use lock_redlock::{ConnectionKind, Redlock, RedlockConfig};
use lock_tests::proxy::LatencyProxy;
use lock_tests::server::{RedisServer, redis_or_skip};
use tokio::time::{Instant, sleep, sleep_until};

#[path = "support/recorded.rs"]
mod recorded;
use recorded::{figures, one_at_a_time};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const PROBE: Duration = Duration::from_secs(2);

fn figure(name: &str) -> f64 {
    figures().get(name).copied().unwrap_or_default()
}

async fn inc_locker(url: String, ttl: Duration) -> Locker {
    Locker::new(
        IncLock::connect(IncConfig {
            command_timeout: 10_000,
            ..IncConfig::new(url)
        })
        .await
        .unwrap(),
    )
    .with_options(
        LockOptions::default()
            .with_ttl(ttl)
            .with_retry(RetryPolicy::none()),
    )
    .unwrap()
}

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

fn pttl(server: &RedisServer, key: &str) -> i64 {
    let answer = server.command(&format!("PTTL {key}"), PROBE).unwrap();
    answer.trim_start_matches(':').trim().parse().unwrap()
}

// ---------------------------------------------------------------------------------------------
// The watchdog's late extend, and a hand extend queued behind it
// ---------------------------------------------------------------------------------------------

/// What a kept-alive guard went through when its watchdog's extend was answered too late.
struct Raced {
    /// The holder's extend, sent while the watchdog's was in flight, if it sent one.
    result: Option<Result<(), LockError>>,
    /// Whether the guard said valid right after that extend.
    valid: bool,
    /// Whether its lost signal had fired by then.
    lost: bool,
    /// How long after the watchdog's answer came back the lost signal fired (`None`: not
    /// within a second).
    lost_after: Option<Duration>,
}

/// A kept-alive guard of ttl 1.5 s (the watchdog extends 500 ms before expiry, at `t_w`) on a
/// link whose delays are set per request: the watchdog's request reaches the store after
/// 350 ms (before the key expires there), its answer comes 1.3 s later, at `t_w + 1650`
/// (after its 1.5 s ttl was spent, 150 ms late), and the store's key then has ~200 ms left.
/// With `hand`, the holder calls `extend` at `t_w + 250 ms`, while the lease is still valid:
/// the call waits for the watchdog's.
async fn late_watchdog_extend(locker: &Locker, proxy: &LatencyProxy, hand: bool) -> Raced {
    let mut guard = locker.acquire("k").await.unwrap();
    // The store loads the extend script now, on the fast link: every later extend is one
    // round trip (EVALSHA).
    guard.extend(ms(1_500)).await.unwrap();
    let lost = guard.keep_alive().unwrap();
    let t_w = guard.valid_until() - ms(500);
    sleep_until(t_w - ms(150)).await;
    proxy.set_delay(ms(350));
    let answered = t_w + ms(1_650);
    let links = async {
        // The watchdog's request was read (delayed 350 ms); its answer is read at t_w + 350.
        sleep_until(t_w + ms(175)).await;
        proxy.set_delay(ms(1_300));
        // Its answer was read (delayed 1.3 s): the holder's request, at t_w + 1650, goes at once.
        sleep_until(t_w + ms(1_000)).await;
        proxy.set_delay(Duration::ZERO);
    };
    let watch_lost = async {
        let fired = tokio::time::timeout_at(answered + Duration::from_secs(1), lost.lost()).await;
        fired
            .is_ok()
            .then(|| Instant::now().saturating_duration_since(answered))
    };
    let holder = async {
        if !hand {
            return (None, true, false);
        }
        sleep_until(t_w + ms(250)).await;
        assert!(guard.is_valid(), "the scenario's timing slipped");
        let result = guard.extend(Duration::from_secs(5)).await;
        (Some(result), guard.is_valid(), lost.is_lost())
    };
    let ((result, valid, was_lost), (), lost_after) = tokio::join!(holder, links, watch_lost);
    proxy.set_delay(Duration::ZERO);
    let _ = guard.release().await;
    Raced {
        result,
        valid,
        lost: was_lost,
        lost_after,
    }
}

/// inc's handle extends whatever the lease's validity says. The guard checks the validity
/// before it waits for the handle, which the watchdog holds through its late extend; that
/// extend spends the validity and reports the lock lost (the watchdog ends). The holder's
/// extend then must not revive it: an Ok with the lost signal fired leaves a guard that says
/// valid, whose watchdog is gone, and whose holder's critical section was told to stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_a_hand_extend_queued_behind_a_late_watchdog_extend_does_not_revive_the_lost_lock() {
    let _alone = one_at_a_time().await;
    let Some(binary) = redis_or_skip("adv20a: inc hand extend behind a late watchdog") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let proxy = LatencyProxy::start(server.port()).await.unwrap();
    let locker = inc_locker(proxy.url(), ms(1_500)).await;
    let raced = late_watchdog_extend(&locker, &proxy, true).await;
    let result = raced.result.unwrap();
    assert!(
        raced.lost_after.is_some(),
        "the watchdog's late extend was not reported lost"
    );
    assert!(
        result.is_err() && !raced.valid,
        "a lock reported lost (lost signal fired: {}) was revived by an extend by hand: {result:?}, the guard says valid: {}",
        raced.lost,
        raced.valid
    );
}

/// The same over Redlock (one node), whose handle refuses to extend a lapsed lease: held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_a_hand_extend_queued_behind_a_late_watchdog_extend_does_not_revive_the_lost_lock()
{
    let _alone = one_at_a_time().await;
    let Some(binary) = redis_or_skip("adv20a: redlock hand extend behind a late watchdog") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let proxy = LatencyProxy::start(server.port()).await.unwrap();
    let locker = redlock_locker(&[proxy.url()], ms(1_500), |config| {
        config.with_node_timeout(Duration::from_secs(5))
    });
    let raced = late_watchdog_extend(&locker, &proxy, true).await;
    let result = raced.result.unwrap();
    assert!(
        raced.lost_after.is_some(),
        "the watchdog's late extend was not reported lost"
    );
    assert!(
        matches!(result, Err(LockError::NotHeld { .. })) && !raced.valid && raced.lost,
        "{result:?}, valid {}, lost {}",
        raced.valid,
        raced.lost
    );
}

/// The watchdog's own extend answered too late is what the guard's is: a failed extend
/// (`lock_extend_failures_total`, "by hand or by the watchdog"), and the lock lost, at once and
/// counted once. Before, the watchdog logged it as extended and counted no failure; the loss
/// itself was found at once (the validity it set had passed), so that part held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_a_watchdog_extend_answered_late_counts_as_a_failed_extend_and_is_lost_at_once() {
    let _alone = one_at_a_time().await;
    let Some(binary) = redis_or_skip("adv20a: inc late watchdog extend") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let proxy = LatencyProxy::start(server.port()).await.unwrap();
    let locker = inc_locker(proxy.url(), ms(1_500)).await;
    let failures = "lock_extend_failures_total{backend=inc,reason=error}";
    let lost = "lock_lost_total{backend=inc,found_by=watchdog}";
    let (failed_before, lost_before) = (figure(failures), figure(lost));
    let raced = late_watchdog_extend(&locker, &proxy, false).await;
    let lost_after = raced
        .lost_after
        .expect("the late extend was not reported lost");
    assert!(
        lost_after < ms(300),
        "reported lost {lost_after:?} after the answer came"
    );
    assert_eq!(figure(lost) - lost_before, 1.0, "counted lost once");
    assert_eq!(
        figure(failures) - failed_before,
        1.0,
        "the watchdog's extend answered after its ttl was spent is not counted as failed"
    );
}

// ---------------------------------------------------------------------------------------------
// The late extend by hand: what it leaves
// ---------------------------------------------------------------------------------------------

/// Each direction: an answer comes ~2 × this after its request.
const DELAY: Duration = Duration::from_millis(150);
/// Shorter than one round trip through the proxy.
const SHORT: Duration = Duration::from_millis(200);

/// A guard of `kind` on `k` (30 s, not kept alive), whose extend to `SHORT` through a link of
/// `DELAY` each way is answered too late.
async fn late_hand_extend(
    locker: &Locker,
    proxy: &LatencyProxy,
    kind: LeaseKind,
) -> (lock_core::LockGuard, LockError) {
    let mut guard = match kind {
        LeaseKind::Read => {
            let mut writer = locker.acquire_write("k").await.unwrap();
            writer.downgrade().await.unwrap();
            writer
        }
        kind => locker
            .acquire_kind("k", kind, locker.options())
            .await
            .unwrap(),
    };
    // Loads the extend script on the fast link.
    guard.extend(Duration::from_secs(30)).await.unwrap();
    proxy.set_delay(DELAY);
    let error = guard.extend(SHORT).await.expect_err("answered too late");
    proxy.set_delay(Duration::ZERO);
    (guard, error)
}

/// A late extend by hand reports the lock lost (its lost signal fires, its validity ends), so
/// it is counted as `lock_held` and `lock_lost_total` count every lock found lost: down at
/// once, lost by `extend`. Before, it was counted a failure only, the lock held until its
/// release, and over Redlock (whose release of the still-stored key answers Ok) never lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_a_late_extend_by_hand_counts_the_lock_lost_and_no_longer_held() {
    let _alone = one_at_a_time().await;
    let Some(binary) = redis_or_skip("adv20a: late extend metrics") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let proxy = LatencyProxy::start(server.port()).await.unwrap();
    let locker = redlock_locker(&[proxy.url()], Duration::from_secs(30), |config| {
        config.with_node_timeout(Duration::from_secs(5))
    });
    let held = "lock_held{backend=redlock}";
    let lost = "lock_lost_total{backend=redlock,found_by=extend}";
    let (held_before, lost_before) = (figure(held), figure(lost));
    let (guard, error) = late_hand_extend(&locker, &proxy, LeaseKind::Exclusive).await;
    assert!(error.to_string().contains("raise the ttl"), "{error}");
    let (held_now, lost_now) = (figure(held) - held_before, figure(lost) - lost_before);
    let released = guard.release().await;
    assert!(released.is_ok(), "{released:?}");
    let (held_end, lost_end) = (figure(held) - held_before, figure(lost) - lost_before);
    assert_eq!((held_end, lost_end.min(1.0)), (0.0, lost_end.min(1.0)));
    assert!(
        held_now == 0.0 && lost_now == 1.0 && lost_end == 1.0,
        "after an extend that reported the lock lost: lock_held {held_now:+}, lock_lost_total{{found_by=extend}} {lost_now:+}; after its release: {held_end:+}, {lost_end:+}"
    );
}

/// Every kind Redlock holds (a mutex, a permit, a read lock, one downgraded from a write lock)
/// gets the same answer to a late extend: the error, the validity over; a later extend and a
/// downgrade refuse; the release takes the key (token-checked) so that nothing of it stays.
/// Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_every_kind_refuses_after_a_late_extend_and_its_release_leaves_nothing() {
    let _alone = one_at_a_time().await;
    let Some(binary) = redis_or_skip("adv20a: kinds") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let proxy = LatencyProxy::start(server.port()).await.unwrap();
    let locker = redlock_locker(&[proxy.url()], Duration::from_secs(30), |config| {
        config.with_node_timeout(Duration::from_secs(5))
    });
    for kind in [
        LeaseKind::Exclusive,
        LeaseKind::permit(3).unwrap(),
        LeaseKind::Read,
        LeaseKind::Write,
    ] {
        let (mut guard, error) = late_hand_extend(&locker, &proxy, kind).await;
        assert!(
            matches!(&error, LockError::Backend { message, .. } if message.contains("raise the ttl")),
            "{kind:?}: {error:?}"
        );
        assert!(!guard.is_valid(), "{kind:?}");
        let again = guard.extend(Duration::from_secs(5)).await;
        assert!(
            matches!(again, Err(LockError::NotHeld { .. })),
            "{kind:?}: {again:?}"
        );
        if kind == LeaseKind::Write {
            let downgraded = guard.downgrade().await;
            assert!(downgraded.is_err(), "{kind:?}: {downgraded:?}");
        }
        let _ = guard.release().await;
        let left = server.command("DBSIZE", PROBE).unwrap();
        assert_eq!(left, ":0", "{kind:?}: keys left after the release");
    }
}

/// inc after a late extend: the release removes the key, the next holder (a waiter of the same
/// locker, in this process's queue) gets the lock once it is released and a fencing token above
/// the lost one's. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_after_a_late_extend_the_next_holder_comes_promptly_with_a_higher_fence() {
    let _alone = one_at_a_time().await;
    let Some(binary) = redis_or_skip("adv20a: inc next holder") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let proxy = LatencyProxy::start(server.port()).await.unwrap();
    let locker = inc_locker(proxy.url(), Duration::from_secs(30))
        .await
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(30))
                .with_retry(
                    RetryPolicy::forever()
                        .with_retry_delay(ms(20))
                        .with_retry_jitter(Duration::ZERO)
                        .with_max_delay(ms(20))
                        .with_deadline(Duration::from_secs(10)),
                ),
        )
        .unwrap();
    let (guard, error) = late_hand_extend(&locker, &proxy, LeaseKind::Exclusive).await;
    assert!(error.to_string().contains("raise the ttl"), "{error}");
    let fence = guard.fencing_token().unwrap();
    let waiter = {
        let locker = locker.clone();
        tokio::spawn(async move { locker.acquire("k").await })
    };
    sleep(ms(50)).await;
    let released_at = Instant::now();
    let _ = guard.release().await;
    let next = waiter.await.unwrap().unwrap();
    let waited = released_at.elapsed();
    assert!(
        waited < ms(500),
        "the next holder came {waited:?} after the release"
    );
    assert!(next.fencing_token().unwrap() > fence, "fencing order");
    next.release().await.unwrap();
    assert!(
        !server.command("KEYS *", PROBE).unwrap().contains("owner"),
        "an owner key stays"
    );
}

/// No password in the late extend's error (Display and Debug), for inc and Redlock, with the
/// URL's password sent through the proxy. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_extend_error_names_no_password() {
    let _alone = one_at_a_time().await;
    let Some(binary) = redis_or_skip("adv20a: secrets") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    // After the harness's first PING, which sends no password.
    let set = server
        .command("CONFIG SET requirepass s3cr3t-pw", PROBE)
        .unwrap();
    assert_eq!(set, "+OK");
    let proxy = LatencyProxy::start(server.port()).await.unwrap();
    let url = format!("redis://:s3cr3t-pw@127.0.0.1:{}/", proxy.port());
    let inc = inc_locker(url.clone(), Duration::from_secs(30)).await;
    let redlock = redlock_locker(&[url], Duration::from_secs(30), |config| {
        config.with_node_timeout(Duration::from_secs(5))
    });
    for locker in [inc, redlock] {
        let (guard, error) = late_hand_extend(&locker, &proxy, LeaseKind::Exclusive).await;
        let shown = format!("{error} {error:?}");
        assert!(shown.contains("raise the ttl"), "{shown}");
        assert!(!shown.contains("s3cr3t"), "the password leaked: {shown}");
        let _ = guard.release().await;
    }
}

// ---------------------------------------------------------------------------------------------
// The in-process store on a paused clock: its extend answers in the call
// ---------------------------------------------------------------------------------------------

fn paused<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
        .block_on(future)
}

/// Extends sent up to the last millisecond of the validity, to ttls down to 1 ms, by hand and
/// while a watchdog runs, never fail: the store answers in the call, no time passes. The
/// negative control: one sent at the very end of the validity is refused. Held.
#[test]
fn memory_extends_never_fail_spuriously_on_a_paused_clock() {
    paused(async {
        let lock = MemoryLock::new();
        let locker = Locker::new(lock.clone())
            .with_options(
                LockOptions::default()
                    .with_ttl(ms(5))
                    .with_retry(RetryPolicy::none()),
            )
            .unwrap();
        let mut guard = locker.acquire("k").await.unwrap();
        let ttls = [1, 2, 3, 5, 7, 30];
        for round in 0..300 {
            let ttl = ms(ttls[round % ttls.len()]);
            sleep(guard.remaining().saturating_sub(ms(1))).await;
            guard
                .extend(ttl)
                .await
                .unwrap_or_else(|error| panic!("round {round}, ttl {ttl:?}: {error:?}"));
            assert!(guard.is_valid());
        }
        let lost: LostSignal = guard.keep_alive().unwrap();
        for round in 0..300 {
            let ttl = ms(ttls[round % ttls.len()]);
            sleep(guard.remaining().saturating_sub(ms(1)).min(ms(2))).await;
            guard.extend(ttl).await.unwrap_or_else(|error| {
                panic!("kept alive, round {round}, ttl {ttl:?}: {error:?}")
            });
        }
        assert!(!lost.is_lost());
        guard.release().await.unwrap();
        // The negative control.
        let mut guard = locker.acquire("k").await.unwrap();
        sleep(guard.remaining()).await;
        let refused = guard.extend(ms(5)).await;
        assert!(
            matches!(refused, Err(LockError::NotHeld { .. })),
            "{refused:?}"
        );
    });
}

// ---------------------------------------------------------------------------------------------
// Redlock on three nodes: an earlier extend's request lands after a later one's
// ---------------------------------------------------------------------------------------------

/// Three nodes behind proxies. An extend to 3 s finds two nodes stalled (its requests are
/// written, held by the link) and fails; the holder extends to 20 s: Ok, valid for ~20 s. The
/// stalled 3 s requests then land. The nodes' keys (as seen 300 ms later), and whether another
/// client took the lock while the holder's validity ran.
async fn earlier_extend_lands_late(kind: ConnectionKind) -> Option<(Vec<i64>, bool)> {
    let binary = redis_or_skip("adv20a: redlock late extend request")?;
    let servers: Vec<RedisServer> = (0..3)
        .map(|_| RedisServer::start(&binary, &[]).unwrap())
        .collect();
    let mut proxies = Vec::new();
    for server in &servers {
        proxies.push(LatencyProxy::start(server.port()).await.unwrap());
    }
    let urls: Vec<String> = proxies.iter().map(LatencyProxy::url).collect();
    let locker = redlock_locker(&urls, Duration::from_secs(20), |config| {
        config.with_node_timeout(ms(300)).with_connection(kind)
    });
    let mut guard = locker.acquire("k").await.unwrap();
    // Every connection an extend may use is open before the stall (with a pool, the node's
    // one connection for extends opens on first use).
    guard.extend(Duration::from_secs(20)).await.unwrap();
    proxies[1].stall_existing(0);
    proxies[2].stall_existing(0);
    let first = guard.extend(Duration::from_secs(3)).await;
    assert!(first.is_err(), "two stalled nodes said yes: {first:?}");
    // The pool's stalled connections left it: its next requests go on new ones. The manager's
    // one connection carries them behind the stalled ones (this extend then fails too).
    let second = guard.extend(Duration::from_secs(20)).await;
    proxies[1].release_stall();
    proxies[2].release_stall();
    if second.is_err() {
        // Try once more now that the link is clear.
        guard.extend(Duration::from_secs(20)).await.unwrap();
    }
    let relied_on = guard.valid_until();
    sleep(ms(300)).await;
    let left: Vec<i64> = servers.iter().map(|server| pttl(server, "k")).collect();
    let other = redlock_locker(&urls, Duration::from_secs(20), |config| {
        config.with_node_timeout(ms(300))
    });
    sleep(Duration::from_millis(3_200)).await;
    let taken = other.try_acquire("k").await.unwrap();
    let both = taken.is_some() && Instant::now() < relied_on && guard.is_valid();
    if let Some(taken) = taken {
        let _ = taken.release().await;
    }
    let _ = guard.release().await;
    Some((left, both))
}

/// With a pool of connections per node, the 3 s requests of the failed extend landed after
/// the 20 s ones, sent on new pooled connections, and cut a majority's keys to 3 s: another
/// client took the lock 17 s before the holder's validity ended. Extends now go on the node's
/// one ordered connection, as with the manager.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_pool_an_extend_ok_is_not_cut_short_by_an_earlier_extend_landing_late() {
    let _alone = one_at_a_time().await;
    let Some((left, both)) = earlier_extend_lands_late(ConnectionKind::Pool).await else {
        return;
    };
    assert!(
        !both,
        "after an extend to 20 s answered Ok, the nodes keep the key {left:?} ms (300 ms later), and another client took it while the holder's guard was valid"
    );
    assert!(left.iter().all(|&left| left > 15_000), "{left:?}");
}

/// The control: one connection per node carries the later extend behind the earlier one.
/// Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_manager_an_extend_ok_is_not_cut_short_by_an_earlier_extend_landing_late() {
    let _alone = one_at_a_time().await;
    let Some((left, both)) = earlier_extend_lands_late(ConnectionKind::Manager).await else {
        return;
    };
    assert!(!both, "{left:?}");
    assert!(left.iter().all(|&left| left > 15_000), "{left:?}");
}

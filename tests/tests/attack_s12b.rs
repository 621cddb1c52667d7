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
    let config =
        config(RedlockConfig::new([url.to_owned()]).with_node_timeout(Duration::from_millis(500)));
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
            Ok(guard) => guard
                .release()
                .await
                .map_err(|e| format!("B's release: {e}")),
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

/// Promised (`wake_on_release`, README: waiters "retry at once instead of sleeping out their
/// retry delay"; b20c4d0 only turns `fair` on by default): a one-node Redlock configured with
/// `wake_on_release` (and nothing about `fair`, as every such configuration written before
/// b20c4d0) wakes a waiter for `a` when the holder of a multi-key lock on `a` and `b` releases.
///
/// Broken on main: with `fair` now on by default, the single-key waiter waits for its turn
/// message (`wait_for_turn`, not the release channel), but a multi-key release is not lined up
/// (`release_notify.lua`: no hand-over, no turn message). The waiter sleeps out its fallback
/// poll (its retry delay, 2 s here) after the release. The control: the same with
/// `fair: false` is woken within milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_on_release_wakes_a_waiter_when_a_multi_key_holder_releases_by_default() {
    let Some(target) = Target::start(Store::Redis, "attack_s12b").await else {
        return;
    };
    let mut waits = Vec::new();
    for fair in [Some(false), None] {
        let configure = |config: RedlockConfig| {
            let config = config.with_wake_on_release(true);
            match fair {
                Some(fair) => config.with_fair(fair),
                None => config,
            }
        };
        let ttl = Duration::from_secs(10);
        let holder = client_on(&target.url, ttl, RetryPolicy::none(), configure);
        let waiter = client_on(&target.url, ttl, waiting(Duration::from_secs(2)), configure);
        let guard = holder.acquire_many(&["multi-a", "multi-b"]).await.unwrap();
        let task = tokio::spawn(async move {
            let guard = waiter.acquire("multi-a").await.unwrap();
            let got = Instant::now();
            guard.release().await.unwrap();
            waiter.stop().await.unwrap();
            got
        });
        // The waiter made its first attempts and sleeps (2 s) by now.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let released = Instant::now();
        guard.release().await.unwrap();
        let got = task.await.unwrap();
        holder.stop().await.unwrap();
        waits.push((fair, got - released));
    }
    println!("waits after the release: {waits:?}");
    assert!(
        waits[0].1 < Duration::from_millis(500),
        "control, fair off: {waits:?}"
    );
    assert!(
        waits[1].1 < Duration::from_millis(500),
        "wake_on_release, fair by default: the waiter slept out its retry delay: {waits:?}"
    );
}

/// Promised (the locker's `RetryPolicy`: a waiter nobody wakes tries again after its retry
/// delay; README, fair waiting: "each is woken exactly when its turn comes"): on a one-node
/// `redis` with the defaults, a waiter for `a` behind the holder of a multi-key lock on `a` and
/// `b` gets `a` soon after that holder releases: woken, or at its next retry (10 ms here).
///
/// Broken on main: with `fair` on by default the waiter is in `a`'s line and waits for its
/// turn, whose fallback poll is at least 200 ms; a multi-key release is not lined up (the plain
/// compare-and-delete: no hand-over, no turn message), so the waiter sleeps out the 200 ms.
/// The control: the same with `fair: false` retries every 10 ms and gets the key at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_behind_a_multi_key_holder_gets_the_key_soon_after_its_release_by_default() {
    let Some(target) = Target::start(Store::Redis, "attack_s12b").await else {
        return;
    };
    let mut waits = Vec::new();
    for fair in [Some(false), None] {
        let configure = |config: RedlockConfig| match fair {
            Some(fair) => config.with_fair(fair),
            None => config,
        };
        let ttl = Duration::from_secs(10);
        let holder = client_on(&target.url, ttl, RetryPolicy::none(), configure);
        let waiter = client_on(
            &target.url,
            ttl,
            waiting(Duration::from_millis(10)),
            configure,
        );
        let mut worst = Duration::ZERO;
        for round in 0..5 {
            let keys = [format!("poll-a-{round}"), format!("poll-b-{round}")];
            let guard = holder
                .acquire_many(&[keys[0].as_str(), keys[1].as_str()])
                .await
                .unwrap();
            let (waiter, key) = (waiter.clone(), keys[0].clone());
            let task = tokio::spawn(async move {
                let guard = waiter.acquire(&key).await.unwrap();
                let got = Instant::now();
                guard.release().await.unwrap();
                got
            });
            // Just after the waiter's poll at 200 ms (its first attempts went out at once).
            tokio::time::sleep(Duration::from_millis(215 + 5 * round)).await;
            let released = Instant::now();
            guard.release().await.unwrap();
            worst = worst.max(task.await.unwrap() - released);
        }
        waiter.stop().await.unwrap();
        holder.stop().await.unwrap();
        waits.push((fair, worst));
    }
    println!("worst waits after the release: {waits:?}");
    assert!(
        waits[0].1 < Duration::from_millis(100),
        "control, fair off: {waits:?}"
    );
    assert!(
        waits[1].1 < Duration::from_millis(100),
        "fair by default: the waiter slept out its 200 ms fallback poll: {waits:?}"
    );
}

/// inc's release leaves the key free and wakes the head of the line, so a newcomer can arrive
/// at a free key with a live line; since 374c9ba its first attempt asks as a single try (no
/// line) and lines up only when refused. Promised (README, fair waiting): first come, first
/// served; "a free key with waiters in line is refused (and its head woken)". Every round, the
/// head (in line before the release) is served before the newcomer that arrives right after
/// it, and no line is left.
///
/// Held on main (single server and Cluster). Checked that it can fail: with the wrapper of
/// inc's `ACQUIRE_FAIR` made to skip the gate for a single try whatever the line
/// (`ARGV[3] == ''` alone), the newcomer took the key first (round 0, both stores).
async fn a_newcomer_at_a_free_key_with_a_line_waits_behind_it(store: Store) {
    let Some(target) = Target::start(store, "attack_s12b").await else {
        return;
    };
    let ttl = Duration::from_secs(10);
    let holder = target.locker(true, ttl, RetryPolicy::none()).await;
    let head = target
        .locker(true, ttl, waiting(Duration::from_secs(2)))
        .await;
    let newcomer = target
        .locker(true, ttl, waiting(Duration::from_secs(2)))
        .await;
    for round in 0..8 {
        let key = format!("inc-free-{round}");
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let guard = holder.acquire(&key).await.unwrap();
        let spawn = |locker: &Locker, name: &'static str| {
            let (locker, key, order) = (locker.clone(), key.clone(), Arc::clone(&order));
            tokio::spawn(async move {
                let guard = locker.acquire(&key).await.unwrap();
                order.lock().unwrap().push(name);
                tokio::time::sleep(Duration::from_millis(5)).await;
                guard.release().await.unwrap();
            })
        };
        let first = spawn(&head, "head");
        tokio::time::sleep(Duration::from_millis(100)).await;
        guard.release().await.unwrap();
        let second = spawn(&newcomer, "newcomer");
        tokio::time::timeout(Duration::from_secs(10), first)
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), second)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            *order.lock().unwrap(),
            ["head", "newcomer"],
            "round {round}"
        );
    }
    for locker in [holder, head, newcomer] {
        locker.stop().await.unwrap();
    }
    assert!(target.line_keys("").await.is_empty(), "a line was left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_a_newcomer_at_a_free_key_with_a_line_waits_behind_it() {
    a_newcomer_at_a_free_key_with_a_line_waits_behind_it(Store::Inc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_cluster_a_newcomer_at_a_free_key_with_a_line_waits_behind_it() {
    a_newcomer_at_a_free_key_with_a_line_waits_behind_it(Store::IncCluster).await;
}

/// The channels of `lock-turn:` clients subscribed on the target's server now.
async fn turn_channels(target: &Target) -> Vec<String> {
    let mut connection = redis::Client::open(target.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg("lock-turn:*")
        .query_async(&mut connection)
        .await
        .unwrap()
}

/// Promised (b20c4d0, CHANGELOG: fair by default costs "a pub/sub connection per client on its
/// first wait"; dropping a value frees what it holds, as the client's other connections are):
/// a `redis` client dropped without `stop` (short-lived clients, a client per request or per
/// test) leaves no connection behind on the server.
///
/// Broken on main: the pub/sub connection a fair client opens on its first wait is read by a
/// spawned task that only `shutdown` aborts: dropped, the client's turn channel stays
/// subscribed on the server for good (one connection and one task per client ever dropped).
/// Without `fair` (the control, as every such client before b20c4d0) nothing is subscribed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_client_leaves_no_pub_sub_connection_by_default() {
    let Some(target) = Target::start(Store::Redis, "attack_s12b").await else {
        return;
    };
    let ttl = Duration::from_secs(10);
    for fair in [Some(false), None] {
        let configure = |config: RedlockConfig| match fair {
            Some(fair) => config.with_fair(fair),
            None => config,
        };
        let holder = client_on(&target.url, ttl, RetryPolicy::none(), configure);
        let waiter = client_on(
            &target.url,
            ttl,
            waiting(Duration::from_millis(50)),
            configure,
        );
        let guard = holder.acquire("dropped").await.unwrap();
        let task = {
            let waiter = waiter.clone();
            tokio::spawn(async move { waiter.acquire("dropped").await.unwrap().release().await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        guard.release().await.unwrap();
        task.await.unwrap().unwrap();
        // Both clients dropped without `stop`.
        drop((holder, waiter));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let channels = turn_channels(&target).await;
        assert!(
            channels.is_empty(),
            "fair {fair:?}: subscribed after the client was dropped: {channels:?}"
        );
    }
}

/// Scripts the server ran so far (`EVAL` and `EVALSHA`) and the microseconds they took.
fn scripts_run(target: &Target) -> (u64, u64) {
    let mut connection = redis::Client::open(target.url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut connection)
        .unwrap();
    let field = |line: &str, name: &str| -> u64 {
        line.split([':', ','])
            .find_map(|part| part.strip_prefix(name))
            .and_then(|value| value.parse().ok())
            .unwrap_or_default()
    };
    stats
        .lines()
        .filter(|line| line.starts_with("cmdstat_eval:") || line.starts_with("cmdstat_evalsha:"))
        .fold((0, 0), |(calls, usec), line| {
            (calls + field(line, "calls="), usec + field(line, "usec="))
        })
}

/// Promised (b20c4d0/bdc759b, CHANGELOG: "Fair waiting no longer costs uncontended cycles";
/// README: on `redis` "an acquisition's first attempt is the plain `SET NX` ... so an
/// uncontended cycle costs about what it does without it"): an uncontended `try_acquire` and
/// release on `redis` with the defaults runs no more scripts than without `fair`.
///
/// Broken on main: a single try skips the plain first attempt and always runs the line's
/// acquisition script (`acquire_fair.lua`, with `lease_common.lua`, the line's helpers and
/// `line_pass.lua` defined on every call): two scripts per uncontended cycle instead of one
/// (the release); the server's script time per cycle was 3.4 times the control's in one run
/// (4204 µs against 1245 µs for 200 cycles).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncontended_try_acquire_runs_no_acquisition_script_by_default() {
    let Some(target) = Target::start(Store::Redis, "attack_s12b").await else {
        return;
    };
    let cycles = 200;
    let mut runs = Vec::new();
    for fair in [Some(false), None] {
        let configure = |config: RedlockConfig| match fair {
            Some(fair) => config.with_fair(fair),
            None => config,
        };
        let locker = client_on(
            &target.url,
            Duration::from_secs(10),
            RetryPolicy::none(),
            configure,
        );
        let before = scripts_run(&target);
        for cycle in 0..cycles {
            let guard = locker
                .try_acquire(&format!("try-{cycle}"))
                .await
                .unwrap()
                .expect("free");
            guard.release().await.unwrap();
        }
        let after = scripts_run(&target);
        locker.stop().await.unwrap();
        runs.push((fair, after.0 - before.0, after.1 - before.1));
    }
    println!("(fair, scripts, script µs) for {cycles} cycles: {runs:?}");
    // One script per cycle (the release), and at most a first EVALSHA refused (NOSCRIPT).
    assert!(
        (cycles..=cycles + 2).contains(&runs[0].1),
        "control: {runs:?}"
    );
    assert!(
        runs[1].1 <= runs[0].1 + 2,
        "fair by default runs more scripts per uncontended try: {runs:?}"
    );
}

/// As [`a_dropped_client_leaves_no_pub_sub_connection_by_default`], for inc with `fair` on
/// (opt-in there): a client dropped without `stop` after a fair wait leaves its turn channel
/// subscribed on the server no longer than a moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_inc_client_leaves_no_pub_sub_connection() {
    let Some(target) = Target::start(Store::Inc, "attack_s12b").await else {
        return;
    };
    let ttl = Duration::from_secs(10);
    let holder = target.locker(true, ttl, RetryPolicy::none()).await;
    let waiter = target
        .locker(true, ttl, waiting(Duration::from_millis(50)))
        .await;
    let guard = holder.acquire("dropped-inc").await.unwrap();
    let task = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.acquire("dropped-inc").await.unwrap().release().await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !turn_channels(&target).await.is_empty(),
        "the waiter never subscribed: the check below would prove nothing"
    );
    guard.release().await.unwrap();
    task.await.unwrap().unwrap();
    drop((holder, waiter));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let channels = turn_channels(&target).await;
    assert!(
        channels.is_empty(),
        "subscribed after the inc client was dropped: {channels:?}"
    );
}

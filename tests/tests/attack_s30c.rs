//! Attack on fbe6e8c (a waiter far back in a fair line answers its fallback polls itself,
//! refused, for twice its place's worth of its own round trips, a quarter ttl at most): the
//! place a waiter is told shrinks without any hand-off when the entries ahead of it lapse (a
//! process with waiters in line dies), and when the last of them lapses the key is free with
//! nobody to announce it. The fallback poll is what found the key free before (200 ms); a
//! waiter that skips it sits out the rest of its deferral on a free key.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use lock_core::raw::{KeySet, LockRequest};
use lock_core::{Key, LockError, Locker, RetryPolicy, Token};
use lock_tests::fair::{Store, Target, client_at};
use lock_tests::proxy::LatencyProxy;
use tokio::time::Instant;

/// `n` milliseconds.
fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The live waiter's ttl: its deferral is capped at a quarter of it (5 s).
const TTL: Duration = Duration::from_secs(20);

/// How long the holder's lock and the dead waiters' entries live.
const LAPSE: Duration = Duration::from_millis(1_500);

/// A fair client of `store` at `url` (through a proxy or not), with `TTL`, polling every
/// 50 ms, giving up after `deadline`.
async fn client(store: Store, url: String, deadline: Duration) -> Locker {
    client_at(store, url, TTL, ms(50), deadline).await
}

/// `waiter` waits on `warm` behind another client, which releases once it is in line: the
/// release hands it the turn by a message, as to a client that waited before (whose wake-ups
/// are known to reach it).
async fn warm_up(target: &Target, waiter: &Locker) {
    let holder = target.locker(true, TTL, RetryPolicy::none()).await;
    let guard = holder.acquire("warm").await.unwrap();
    let task = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.acquire("warm").await.unwrap().release().await })
    };
    in_line(target, "warm", 1).await;
    guard.release().await.unwrap();
    task.await.unwrap().unwrap();
    holder.stop().await.unwrap();
}

/// Once `count` waiters are in `key`'s line (3 s at most).
async fn in_line(target: &Target, key: &str, count: usize) {
    let mut connection = lock_tests::fair::connect(&target.servers[0].url()).await;
    let [line, _] = lock_tests::fair::line_names(target.store, key);
    let deadline = Instant::now() + ms(3_000);
    loop {
        let now: usize = redis::cmd("ZCARD")
            .arg(&line)
            .query_async(&mut connection)
            .await
            .unwrap();
        if now == count {
            return;
        }
        assert!(Instant::now() < deadline, "{now} in line");
        tokio::time::sleep(ms(10)).await;
    }
}

/// Another process takes `key` for `lapse` and dies holding it (no release, nothing
/// announced when it expires).
async fn dead_holder(target: &Target, key: &str, lapse: Duration) {
    let holder = target.backend(true).await;
    let request = LockRequest::new(
        KeySet::one(Key::new(key).unwrap()),
        Token::generate().unwrap(),
        lapse,
    )
    .unwrap();
    assert!(holder.try_acquire(&request).await.unwrap().is_some());
    holder.shutdown().await.unwrap();
}

/// `key` held by a process that dies, and `dead` waiters of processes that die lined up behind
/// it: the key and every entry lapse about `lapse` from now (returned: when the last lapses).
async fn crashed_line(target: &Target, key: &str, dead: usize, lapse: Duration) -> Instant {
    dead_holder(target, key, lapse).await;
    for _ in 0..dead {
        target.dead_waiter(key, lapse).await;
    }
    Instant::now() + lapse
}

/// How long after `lapsed` `waiter` got `key` (its acquisition began before), and that it got it.
async fn got_after(
    waiter: tokio::task::JoinHandle<Result<Instant, LockError>>,
    lapsed: Instant,
) -> Duration {
    let got = waiter.await.unwrap().expect("the waiter gets the free key");
    got.saturating_duration_since(lapsed)
}

/// Spawns `locker`'s acquisition of `key`: when it got it (released at once).
fn acquire(
    locker: &Locker,
    key: &'static str,
) -> tokio::task::JoinHandle<Result<Instant, LockError>> {
    let locker = locker.clone();
    tokio::spawn(async move {
        let guard = locker.acquire(key).await?;
        let got = Instant::now();
        guard.release().await.unwrap();
        Ok(got)
    })
}

/// Nothing of ours left once the clients stopped (inc's fencing counter lives out its expiry).
async fn nothing_left(target: &Target, lockers: &[&Locker]) {
    for locker in lockers {
        locker.stop().await.unwrap();
    }
    let left = target
        .keys_left_within(ms(2_000), |name| !name.ends_with(":fence"))
        .await;
    assert!(left.is_empty(), "left in Redis: {left:?}");
}

/// A waiter behind a 25 ms link (each way) joins a line of 30 waiters of processes that died,
/// behind a holder that died too: it is told place 30, and defers its polls for 2 × 30 of its
/// round trips (capped at 5 s). When the holder and the entries lapse (1.5 s), the key is free
/// and the waiter is the whole line, but nothing tells it: it should find the key by its next
/// fallback poll (200 ms, plus a round trip), as on the parent commit (a441e89: 0.1–0.3 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_back_waiter_finds_the_key_free_once_the_dead_ahead_of_it_lapse() {
    let mut failures = Vec::new();
    for store in [Store::Redis, Store::Inc] {
        let Some(target) = Target::start(store, "attack_s30c").await else {
            return;
        };
        let proxy = LatencyProxy::start(target.servers[0].port()).await.unwrap();
        proxy.set_delay(ms(25));
        let waiter = client(store, proxy.url(), ms(15_000)).await;
        warm_up(&target, &waiter).await;
        let lapsed = crashed_line(&target, "k", 30, LAPSE).await;
        let got = acquire(&waiter, "k");
        let late = got_after(got, lapsed).await;
        println!("{store:?}: the key was free {late:?} before the waiter took it");
        if late >= ms(800) {
            failures.push(format!("{store:?}: the waiter sat {late:?} on a free key"));
        }
        nothing_left(&target, &[&waiter]).await;
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// As above, with a deadline: the waiter's last attempt, at its deadline (3 s, 1.5 s after
/// the key became free for it), is answered locally too, and it gives up (`Timeout`) on a key
/// that was free for it for half its wait. On the parent commit it takes the key at 1.5–1.8 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_back_waiter_does_not_give_up_on_a_key_free_for_it() {
    let mut failures = Vec::new();
    for store in [Store::Redis, Store::Inc] {
        let Some(target) = Target::start(store, "attack_s30c").await else {
            return;
        };
        let proxy = LatencyProxy::start(target.servers[0].port()).await.unwrap();
        proxy.set_delay(ms(25));
        let waiter = client(store, proxy.url(), ms(3_000)).await;
        warm_up(&target, &waiter).await;
        let _lapsed = crashed_line(&target, "k", 30, LAPSE).await;
        let asked = Instant::now();
        let outcome = waiter.acquire("k").await;
        let waited = asked.elapsed();
        let key_now = target.keys().await;
        match outcome {
            Ok(guard) => guard.release().await.unwrap(),
            Err(error) => failures.push(format!(
                "{store:?}: gave up after {waited:?} ({error}) on a key free for it since {LAPSE:?} \
                 (keys now: {:?})",
                key_now
                    .iter()
                    .map(|name| String::from_utf8_lossy(name).into_owned())
                    .collect::<Vec<_>>()
            )),
        }
        nothing_left(&target, &[&waiter]).await;
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// On loopback (no slow link): a waiter behind 10 dead waiters polls every 200 ms (its place's
/// round trips are soon over at loopback speed) until the server stalls 1 s (`DEBUG SLEEP`, as
/// a slow command or a fork can) while one of its polls is in flight: the one round trip it
/// measured is the stall, and it defers its polls for 2 × 10 × 0.8–1 s (capped at 5 s). The
/// holder and the entries ahead lapse 2 s after they joined; the waiter should find the key
/// free by its next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_attempt_met_a_server_stall_still_polls_a_free_key() {
    let mut failures = Vec::new();
    for store in [Store::Redis, Store::Inc] {
        let Some(target) = Target::start(store, "attack_s30c").await else {
            return;
        };
        let waiter = client(store, target.url.clone(), ms(15_000)).await;
        warm_up(&target, &waiter).await;
        let mut connection = lock_tests::fair::connect(&target.servers[0].url()).await;
        let lapsed = crashed_line(&target, "k", 10, ms(2_000)).await;
        let got = acquire(&waiter, "k");
        // The waiter polls every 200 ms (its place is soon passed at loopback speed): one of
        // its polls meets the stall.
        tokio::time::sleep(ms(250)).await;
        let stall = tokio::spawn(async move {
            // The client's own response timeout may end the wait first; the server sleeps on.
            let _: redis::RedisResult<()> = redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg("1")
                .query_async(&mut connection)
                .await;
        });
        let late = got_after(got, lapsed).await;
        stall.await.unwrap();
        println!("{store:?}: the key was free {late:?} before the waiter took it");
        if late >= ms(600) {
            failures.push(format!("{store:?}: the waiter sat {late:?} on a free key"));
        }
        nothing_left(&target, &[&waiter]).await;
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// No waiter dies here, and no entry lapses: 20 waiters (live clients, each a process of its
/// own) line up behind a holder that dies, and give up after 1 s (their take-backs leave the
/// line, and announce nothing while the key is held); a waiter behind a 50 ms link (each way)
/// that joined behind them, told place 20, defers its polls for 2 × 20 of its round trips
/// (capped at 5 s). It is first from 1 s on without knowing; the holder's lock lapses at 2 s,
/// unannounced: the waiter should find the key free by its next poll, as on the parent commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_back_waiter_finds_the_key_of_a_dead_holder_once_those_ahead_gave_up() {
    let mut failures = Vec::new();
    for store in [Store::Redis, Store::Inc] {
        let Some(target) = Target::start(store, "attack_s30c").await else {
            return;
        };
        let proxy = LatencyProxy::start(target.servers[0].port()).await.unwrap();
        proxy.set_delay(ms(50));
        let waiter = client(store, proxy.url(), ms(15_000)).await;
        warm_up(&target, &waiter).await;
        let lapse = ms(2_000);
        dead_holder(&target, "k", lapse).await;
        let lapsed = Instant::now() + lapse;
        let mut ahead = Vec::new();
        for _ in 0..20 {
            let locker = target
                .locker(
                    true,
                    TTL,
                    RetryPolicy::forever()
                        .with_retry_delay(ms(50))
                        .with_deadline(ms(1_000)),
                )
                .await;
            let task = {
                let locker = locker.clone();
                tokio::spawn(async move { locker.acquire("k").await.map(|_| ()) })
            };
            ahead.push((locker, task));
        }
        // Every one of them in line before the waiter.
        in_line(&target, "k", 20).await;
        let got = acquire(&waiter, "k");
        for (_, task) in &mut ahead {
            let outcome = task.await.unwrap();
            assert!(
                matches!(outcome, Err(LockError::Timeout { .. })),
                "{store:?}: {outcome:?}"
            );
        }
        let late = got_after(got, lapsed).await;
        println!("{store:?}: the key was free {late:?} before the waiter took it");
        if late >= ms(800) {
            failures.push(format!("{store:?}: the waiter sat {late:?} on a free key"));
        }
        let mut lockers: Vec<&Locker> = ahead.iter().map(|(locker, _)| locker).collect();
        lockers.push(&waiter);
        nothing_left(&target, &lockers).await;
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A fair client of `store` as the ACL user `app` of `port` (through a proxy or not).
async fn app_client(store: Store, port: u16) -> Locker {
    client(
        store,
        format!("redis://app:app-pw@127.0.0.1:{port}/"),
        ms(15_000),
    )
    .await
}

/// Every wake-up lost: the ACL user has no pub/sub channels (Redis 7's default for a new user),
/// so no waiter can subscribe, and every turn is found by a poll. 12 waiters on loopback line
/// up behind a holder, then a waiter behind a 100 ms link (each way): told place 12, it defers
/// its polls for 2 × 12 of its round trips (about 5 s, the cap), while the 12 ahead, each
/// finding its turn by its own 200 ms poll, are through in about 1–2 s. The key is then reserved
/// for it and sits there until it asks: its turn should cost a poll and a round trip (as on the
/// parent commit, 0.2–0.5 s), not the rest of a deferral that no wake-up can end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_cannot_be_woken_still_polls_for_its_turn() {
    let mut failures = Vec::new();
    for store in [Store::Redis, Store::Inc] {
        let Some(target) = Target::start(store, "attack_s30c").await else {
            return;
        };
        let command = "ACL SETUSER app on >app-pw ~* resetchannels +@all";
        assert_eq!(
            target.servers[0].command(command, ms(2_000)).unwrap(),
            "+OK"
        );
        let port = target.servers[0].port();
        let proxy = LatencyProxy::start(port).await.unwrap();
        proxy.set_delay(ms(100));
        let waiter = app_client(store, proxy.port()).await;
        waiter
            .acquire("warm")
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
        let holder = app_client(store, port).await;
        let guard = holder.acquire("k").await.unwrap();
        let mut ahead = Vec::new();
        for _ in 0..12 {
            let locker = app_client(store, port).await;
            let task = {
                let locker = locker.clone();
                tokio::spawn(async move {
                    let guard = locker.acquire("k").await.unwrap();
                    guard.release().await.unwrap();
                    Instant::now()
                })
            };
            ahead.push((locker, task));
        }
        in_line(&target, "k", 12).await;
        let got = acquire(&waiter, "k");
        // The waiter's attempt is answered (its place told) before the line moves.
        tokio::time::sleep(ms(600)).await;
        guard.release().await.unwrap();
        let mut last_ahead = None;
        for (_, task) in &mut ahead {
            let released = task.await.unwrap();
            last_ahead = Some(last_ahead.map_or(released, |at: Instant| at.max(released)));
        }
        let late = got_after(got, last_ahead.unwrap()).await;
        println!("{store:?}: the waiter's turn came {late:?} before it took it");
        if late >= ms(1_000) {
            failures.push(format!(
                "{store:?}: the key sat reserved for the waiter {late:?}"
            ));
        }
        let mut lockers: Vec<&Locker> = ahead.iter().map(|(locker, _)| locker).collect();
        lockers.push(&waiter);
        lockers.push(&holder);
        nothing_left(&target, &lockers).await;
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

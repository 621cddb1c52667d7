//! Attack on session 30's one-node fair shortcuts (99d0b38): a refused waiter's line attempt
//! says whether the key held a lock's value or nothing (`plain`), and then no key type is
//! asked; and a waiter's first attempt on a key its client lately lined up on goes through the
//! line at once (`FairLine::expects_line`), without the plain `SET NX` + give-back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use lock_core::{LeaseKind, LockError, LockOptions, Locker, RetryPolicy};
use lock_redlock::{ConnectionKind, Redlock, RedlockConfig};
use lock_tests::fair::{Store, Target, connect, waiting};
use lock_tests::proxy::LatencyProxy;
use tokio::time::Instant;

/// `n` milliseconds.
fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const TTL: Duration = Duration::from_secs(10);

/// Waits forever (15 s at most), asking every 8 s unless woken: a waiter nobody tells when its
/// turn comes is seen.
fn slow_poll() -> RetryPolicy {
    RetryPolicy::forever()
        .with_retry_delay(ms(8_000))
        .with_max_delay(ms(8_000))
        .with_retry_jitter(Duration::ZERO)
        .with_deadline(ms(15_000))
}

/// Options of one acquisition that gives up after `deadline`.
fn giving_up_after(deadline: Duration) -> LockOptions {
    LockOptions::default().with_ttl(TTL).with_retry(
        RetryPolicy::forever()
            .with_retry_delay(ms(50))
            .with_deadline(deadline),
    )
}

/// Lines a waiter of `client` up on `key` (held by someone else), and lets it give up: the
/// client now expects a line on `key` for a second.
async fn line_up_and_give_up(client: &Locker, key: &str) {
    let outcome = client.acquire_with(key, &giving_up_after(ms(100))).await;
    assert!(
        matches!(outcome, Err(LockError::Timeout { .. })),
        "the waiter that lines up: {outcome:?}"
    );
}

/// Waits (3 s at most) until `key` is gone: a waiter that gave up leaves the line in the
/// background, and a release that came first reserved the key for it until that take-back
/// lands.
async fn until_free(raw: &mut redis::aio::MultiplexedConnection, key: &str) {
    let free_by = Instant::now() + ms(3_000);
    loop {
        let there: i64 = redis::cmd("EXISTS")
            .arg(key)
            .query_async(raw)
            .await
            .unwrap();
        if there == 0 {
            return;
        }
        assert!(Instant::now() < free_by, "{key}: never free");
        tokio::time::sleep(ms(10)).await;
    }
}

/// A key left free by a client without `fair` (or a holder that expired) while a dead
/// waiter heads its line: a fair waiter's plain first attempt reserves it for that head (the
/// give-back), and the waiter, first behind the reservation, is told when it lapses. The
/// waiter whose client expects a line goes through the line at once: the key stays free, the
/// dead head is only woken, the waiter is second in line behind nobody that holds anything,
/// and nothing tells it when the dead head lapses: it sleeps on until its next attempt (here
/// the renewal of its place, half its ttl after its first attempt; its 8 s retry delay with a
/// longer ttl).
///
/// Broken by 99d0b38 (passes on 267a901, taken 2 ms after the head lapsed): taken 3.1 s after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_expecting_a_line_behind_a_dead_head_on_a_free_key_is_told_when_it_lapses() {
    let Some(target) = Target::start(Store::Redis, "attack_s30a").await else {
        return;
    };
    let plain = target.locker(false, TTL, waiting(ms(100))).await;
    let fair = target.locker(true, TTL, slow_poll()).await;
    let held = plain.acquire("k").await.unwrap();
    target.dead_waiter("k", ms(2_000)).await;
    let head_lapses = Instant::now() + ms(2_000);
    line_up_and_give_up(&fair, "k").await;
    // A release without `fair`: the key is free, the dead waiter heads the line.
    held.release().await.unwrap();
    let guard = fair.acquire("k").await.unwrap();
    let late = Instant::now().saturating_duration_since(head_lapses);
    println!("taken {late:?} after the dead head lapsed");
    assert!(
        late < ms(1_500),
        "the waiter was taken {late:?} after the dead head lapsed"
    );
    guard.release().await.unwrap();
    fair.stop().await.unwrap();
    plain.stop().await.unwrap();
    let left = target.keys_left_within(ms(3_000), |_| true).await;
    assert!(left.is_empty(), "left in Redis: {left:?}");
}

/// A fair client on one node over `url`, with `connection`, fencing or not, waiting up to
/// `deadline` and polling every 100 ms besides its wake-ups.
fn fair_client(url: &str, connection: ConnectionKind, fencing: bool, deadline: Duration) -> Locker {
    Locker::new(
        Redlock::new(
            RedlockConfig::new([url.to_owned()])
                .with_fair(true)
                .with_fencing(fencing)
                .with_connection(connection)
                .with_node_timeout(ms(500)),
        )
        .unwrap(),
    )
    .with_options(
        LockOptions::default().with_ttl(TTL).with_retry(
            RetryPolicy::forever()
                .with_retry_delay(ms(100))
                .with_deadline(deadline),
        ),
    )
    .unwrap()
}

/// What a key may hold that is not a mutex's: written by another application, or a lease of
/// ours held by `other` (which holds it until the guard is dropped).
enum Foreign {
    Raw(&'static str, redis::Cmd),
    Lease(&'static str, LeaseKind),
}

fn foreign_values(key: &str) -> Vec<Foreign> {
    vec![
        Foreign::Raw("a set", redis::cmd("SADD").arg(key).arg("x").clone()),
        Foreign::Raw(
            "a zset",
            redis::cmd("ZADD").arg(key).arg(1).arg("x").clone(),
        ),
        Foreign::Raw(
            "a stream",
            redis::cmd("XADD")
                .arg(key)
                .arg("*")
                .arg("f")
                .arg("v")
                .clone(),
        ),
        Foreign::Raw("a list", redis::cmd("LPUSH").arg(key).arg("x").clone()),
        Foreign::Raw(
            "one byte 0xFF",
            redis::cmd("SET").arg(key).arg(b"\xFF").clone(),
        ),
        Foreign::Raw(
            "a lease alone's look",
            redis::cmd("SET").arg(key).arg(b"\xFFsem:2\x00pabc").clone(),
        ),
        Foreign::Lease("a permit of 1", LeaseKind::permit(1).unwrap()),
        Foreign::Lease("a permit of 3", LeaseKind::permit(3).unwrap()),
        Foreign::Lease("a read lock", LeaseKind::Read),
        Foreign::Lease("a write lock", LeaseKind::Write),
    ]
}

/// A mutex waiter meets a key of another type, or a lease of ours: whether its client expects
/// a line there (its first attempt goes through the line, which reads the key) or not (a plain
/// `SET NX`, then the line), with fencing or not, over a manager or a pool, it gets the typed
/// error at once (`InvalidInput` for another type, `KindMismatch` for a lease), and leaves
/// nothing in line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_every_foreign_value_is_a_typed_error_at_once_through_the_line_or_not() {
    let Some(target) = Target::start(Store::Redis, "attack_s30a").await else {
        return;
    };
    let mut raw = connect(&target.url).await;
    let other = target.locker(true, TTL, waiting(ms(100))).await;
    for (fencing, connection) in [
        (false, ConnectionKind::Manager),
        (true, ConnectionKind::Manager),
        (false, ConnectionKind::Pool),
    ] {
        let waiter = fair_client(&target.url, connection, fencing, ms(3_000));
        for expects_line in [true, false] {
            for n in 0..foreign_values("probe").len() {
                let key = format!("f{fencing}{connection:?}{expects_line}{n}");
                if expects_line {
                    let held = other.acquire(&key).await.unwrap();
                    line_up_and_give_up(&waiter, &key).await;
                    held.release().await.unwrap();
                    until_free(&mut raw, &key).await;
                }
                let (what, lease) = match foreign_values(&key).swap_remove(n) {
                    Foreign::Raw(what, write) => {
                        let _: redis::Value = write.query_async(&mut raw).await.unwrap();
                        (what, None)
                    }
                    Foreign::Lease(what, kind) => {
                        let options = LockOptions::default().with_ttl(TTL);
                        (
                            what,
                            Some(other.acquire_kind(&key, kind, &options).await.unwrap()),
                        )
                    }
                };
                let started = Instant::now();
                let outcome = waiter.acquire(&key).await;
                let took = started.elapsed();
                let case = format!(
                    "{what} (fencing {fencing}, {connection:?}, expecting a line {expects_line})"
                );
                match (&lease, &outcome) {
                    (
                        None,
                        Err(LockError::InvalidInput { .. } | LockError::KindMismatch { .. }),
                    )
                    | (Some(_), Err(LockError::KindMismatch { .. })) => {}
                    _ => panic!("{case}: {outcome:?} after {took:?}"),
                }
                assert!(took < ms(1_000), "{case}: the error took {took:?}");
                assert!(
                    target.line_keys(&key).await.is_empty(),
                    "{case}: the refused waiter stayed in line: {:?}",
                    target.line_keys(&key).await
                );
                if let Some(lease) = lease {
                    lease.release().await.unwrap();
                }
                let _: i64 = redis::cmd("DEL")
                    .arg(&key)
                    .query_async(&mut raw)
                    .await
                    .unwrap();
            }
        }
        waiter.stop().await.unwrap();
    }
    other.stop().await.unwrap();
    let left = target.keys_left_within(ms(3_000), |_| true).await;
    assert!(left.is_empty(), "left in Redis: {left:?}");
}

/// Values a mutex's key may hold that are no lease and no other type (an empty string, a
/// binary value not beginning with 0xFF, a reservation for a waiter nobody knows): the waiter
/// waits for them to go, as for any holder, and takes the key then — with its client expecting
/// a line or not — and no key type was asked (the refused attempt read the value).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_plain_values_are_waited_out_without_asking_a_type() {
    let Some(target) = Target::start(Store::Redis, "attack_s30a").await else {
        return;
    };
    let mut raw = connect(&target.url).await;
    let other = target.locker(true, TTL, waiting(ms(100))).await;
    let waiter = fair_client(&target.url, ConnectionKind::Manager, false, ms(3_000));
    let values: [(&str, &[u8]); 3] = [
        ("an empty string", b""),
        ("binary", b"\x00\x01\xFE\xFF"),
        (
            "a stranger's reservation",
            b"lock-turn-reserved:00000000000000000000000000000001x",
        ),
    ];
    for expects_line in [true, false] {
        for (n, (what, value)) in values.iter().enumerate() {
            let key = format!("p{expects_line}{n}");
            if expects_line {
                let held = other.acquire(&key).await.unwrap();
                line_up_and_give_up(&waiter, &key).await;
                held.release().await.unwrap();
                until_free(&mut raw, &key).await;
            }
            let () = redis::cmd("SET")
                .arg(&key)
                .arg(*value)
                .arg("PX")
                .arg(400)
                .query_async(&mut raw)
                .await
                .unwrap();
            let started = Instant::now();
            let outcome = waiter.acquire(&key).await;
            let took = started.elapsed();
            println!(
                "{what} (expecting a line {expects_line}): {:?} after {took:?}",
                outcome.is_ok()
            );
            let guard = outcome.unwrap_or_else(|error| panic!("{what}: {error:?}"));
            assert!(
                took >= ms(300) && took < ms(1_500),
                "{what}: taken after {took:?}"
            );
            guard.release().await.unwrap();
        }
    }
    assert_eq!(
        target.servers[0].calls("type").unwrap(),
        0,
        "a key type was asked"
    );
    waiter.stop().await.unwrap();
    other.stop().await.unwrap();
    let left = target.keys_left_within(ms(3_000), |_| true).await;
    assert!(left.is_empty(), "left in Redis: {left:?}");
}

/// Waiters of clients that expect a line (their first attempts go through it) and of clients
/// that do not (a plain `SET NX` first) take the key in the order they came, one at a time;
/// single tries of a fair client, and of one without `fair`, never join the line nor pass it,
/// and nothing is left in Redis at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_mixed_waiters_are_served_in_order_and_single_tries_never_queue() {
    let Some(target) = Target::start(Store::Redis, "attack_s30a").await else {
        return;
    };
    // Without the in-process queue: every waiter of a client asks the store.
    let hinted = target
        .locker(true, TTL, waiting(ms(100)))
        .await
        .with_local_queue(false);
    let fresh = target
        .locker(true, TTL, waiting(ms(100)))
        .await
        .with_local_queue(false);
    let holder = target.locker(true, TTL, waiting(ms(100))).await;
    let plain = target.locker(false, TTL, waiting(ms(100))).await;
    let mut raw = connect(&target.url).await;
    for round in 0..3 {
        let key = format!("q{round}");
        let held = holder.acquire(&key).await.unwrap();
        line_up_and_give_up(&hinted, &key).await;
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let inside = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for n in 0..6 {
            let client = if (n + round) % 2 == 0 {
                &hinted
            } else {
                &fresh
            }
            .clone();
            let (task_key, task_order, inside) = (key.clone(), order.clone(), inside.clone());
            tasks.push(tokio::spawn(async move {
                let guard = client.acquire(&task_key).await.unwrap();
                assert!(
                    !inside.swap(true, std::sync::atomic::Ordering::SeqCst),
                    "two holders at once"
                );
                task_order.lock().unwrap().push(n);
                tokio::time::sleep(ms(20)).await;
                inside.store(false, std::sync::atomic::Ordering::SeqCst);
                guard.release().await.unwrap();
            }));
            // Each in line before the next comes.
            let deadline = Instant::now() + ms(2_000);
            loop {
                let members: Vec<String> = lock_tests::fair::line_members(&mut raw, &key).await;
                if members.len() == n + 1 || Instant::now() > deadline {
                    assert_eq!(members.len(), n + 1, "waiter {n} not in line: {members:?}");
                    break;
                }
                tokio::time::sleep(ms(5)).await;
            }
            // Single tries: refused, and nobody more in line.
            assert!(hinted.try_acquire(&key).await.unwrap().is_none());
            assert!(fresh.try_acquire(&key).await.unwrap().is_none());
            assert!(plain.try_acquire(&key).await.unwrap().is_none());
            let members = lock_tests::fair::line_members(&mut raw, &key).await;
            assert_eq!(
                members.len(),
                n + 1,
                "a single try joined the line: {members:?}"
            );
        }
        held.release().await.unwrap();
        // While the turns pass, single tries still never pass the line.
        for _ in 0..20 {
            for client in [&hinted, &fresh] {
                if let Some(guard) = client.try_acquire(&key).await.unwrap() {
                    let members = lock_tests::fair::line_members(&mut raw, &key).await;
                    assert!(members.is_empty(), "a single try passed {members:?}");
                    guard.release().await.unwrap();
                }
            }
            tokio::time::sleep(ms(5)).await;
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            (0..6).collect::<Vec<_>>(),
            "round {round}"
        );
    }
    for client in [&hinted, &fresh, &holder, &plain] {
        client.stop().await.unwrap();
    }
    let left = target.keys_left_within(ms(3_000), |_| true).await;
    assert!(left.is_empty(), "left in Redis: {left:?}");
}

/// A waiter whose client expects a line, its first attempt (through the line, over a slow link)
/// cancelled at every point of its way — before the subscription, before the script, while
/// the script's answer travels back — over a manager and a pool: nothing of it stays in line,
/// and a waiter of another client behind it takes the key as soon as the holder lets go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_a_first_attempt_through_the_line_cancelled_anywhere_leaves_no_one_in_line() {
    let Some(target) = Target::start(Store::Redis, "attack_s30a").await else {
        return;
    };
    let proxy = LatencyProxy::start(target.servers[0].port()).await.unwrap();
    let holder = target.locker(true, TTL, waiting(ms(100))).await;
    let next = target.locker(true, TTL, slow_poll()).await;
    let mut raw = connect(&target.url).await;
    for connection in [ConnectionKind::Manager, ConnectionKind::Pool] {
        let cancelled = fair_client(&proxy.url(), connection, false, ms(5_000));
        for cancel_at in (0..=360).step_by(40) {
            let key = format!("c{connection:?}{cancel_at}");
            let held = holder.acquire(&key).await.unwrap();
            line_up_and_give_up(&cancelled, &key).await;
            proxy.set_delay(ms(60));
            let attempt = {
                let (cancelled, key) = (cancelled.clone(), key.clone());
                tokio::spawn(async move { cancelled.acquire(&key).await })
            };
            tokio::time::sleep(ms(cancel_at)).await;
            attempt.abort();
            let outcome = attempt.await;
            proxy.set_delay(Duration::ZERO);
            assert!(outcome.is_err(), "cancel at {cancel_at} ms: {outcome:?}");
            // Its clean-up runs in the background: the line empties.
            let deadline = Instant::now() + ms(3_000);
            loop {
                let members = lock_tests::fair::line_members(&mut raw, &key).await;
                if members.is_empty() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{connection:?}, cancel at {cancel_at} ms: left in line {members:?}"
                );
                tokio::time::sleep(ms(10)).await;
            }
            let waiting_next = {
                let (next, key) = (next.clone(), key.clone());
                tokio::spawn(async move { next.acquire(&key).await })
            };
            tokio::time::sleep(ms(50)).await;
            let released = Instant::now();
            held.release().await.unwrap();
            let guard = waiting_next.await.unwrap().unwrap();
            let took = released.elapsed();
            assert!(
                took < ms(1_000),
                "{connection:?}, cancel at {cancel_at} ms: the next waiter took {took:?}"
            );
            guard.release().await.unwrap();
        }
        cancelled.stop().await.unwrap();
    }
    holder.stop().await.unwrap();
    next.stop().await.unwrap();
    let left = target.keys_left_within(ms(3_000), |_| true).await;
    assert!(left.is_empty(), "left in Redis: {left:?}");
}

/// A client that expects a line on a key meets: a line of lapsed entries only on the free key
/// (taken at once, the line's keys gone), the scripts flushed (its line attempt loads them:
/// it lines up and is served), a server restarted empty (taken at once), and the same key
/// name in another namespace (its own key, free: taken at once, no line made).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_a_client_expecting_a_line_meets_lapsed_lines_flushed_scripts_restarts_and_namespaces()
{
    let Some(mut target) = Target::start(Store::Redis, "attack_s30a").await else {
        return;
    };
    let backend = target.backend(true).await;
    let options = LockOptions::default()
        .with_ttl(TTL)
        .with_retry(waiting(ms(100)));
    let hinted = Locker::from_arc(backend.clone())
        .with_options(options.clone())
        .unwrap();
    let holder = target.locker(true, TTL, waiting(ms(100))).await;
    let mut raw = connect(&target.url).await;

    // A lapsed line on a free key.
    let held = holder.acquire("k").await.unwrap();
    line_up_and_give_up(&hinted, "k").await;
    held.release().await.unwrap();
    until_free(&mut raw, "k").await;
    lock_tests::fair::lapsed_line(&target.url, "k").await;
    let started = Instant::now();
    hinted.acquire("k").await.unwrap().release().await.unwrap();
    assert!(started.elapsed() < ms(300), "took {:?}", started.elapsed());
    assert!(target.line_keys("k").await.is_empty());

    // Scripts flushed while the client expects a line.
    let held = holder.acquire("k").await.unwrap();
    line_up_and_give_up(&hinted, "k").await;
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut raw)
        .await
        .unwrap();
    let waiter = {
        let hinted = hinted.clone();
        tokio::spawn(async move { hinted.acquire("k").await })
    };
    let deadline = Instant::now() + ms(2_000);
    while lock_tests::fair::line_members(&mut raw, "k")
        .await
        .is_empty()
    {
        assert!(Instant::now() < deadline, "the waiter never lined up");
        tokio::time::sleep(ms(10)).await;
    }
    let released = Instant::now();
    held.release().await.unwrap();
    waiter.await.unwrap().unwrap().release().await.unwrap();
    assert!(
        released.elapsed() < ms(500),
        "took {:?}",
        released.elapsed()
    );

    // Another namespace: the same name is another key.
    let held = holder.acquire("k").await.unwrap();
    line_up_and_give_up(&hinted, "k").await;
    let spaced = Locker::from_arc(backend.clone())
        .with_options(options.clone())
        .unwrap()
        .with_namespace(Some("ns"))
        .unwrap();
    let started = Instant::now();
    let guard = spaced.acquire("k").await.unwrap();
    assert!(started.elapsed() < ms(300), "took {:?}", started.elapsed());
    assert!(target.line_keys("ns").await.is_empty());
    guard.release().await.unwrap();
    held.release().await.unwrap();

    // A restart: the key and its line are gone, the client still expects one.
    let held = holder.acquire("k").await.unwrap();
    line_up_and_give_up(&hinted, "k").await;
    drop(raw);
    target.servers[0].restart().unwrap();
    let started = Instant::now();
    let guard = hinted.acquire("k").await.unwrap();
    assert!(
        started.elapsed() < ms(3_000),
        "took {:?}",
        started.elapsed()
    );
    guard.release().await.unwrap();
    // Lost in the restart: its release finds nothing of it.
    let _ = held.release().await;
    for client in [&hinted, &holder, &spaced] {
        client.stop().await.unwrap();
    }
    let left = target.keys_left_within(ms(3_000), |_| true).await;
    assert!(left.is_empty(), "left in Redis: {left:?}");
}

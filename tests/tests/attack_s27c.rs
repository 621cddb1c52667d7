//! Attack on session 27's lazy line (81f2a88): a release that passes the turn prunes the line
//! only when the head it found lapsed, and no longer settles the line keys' expiry when a head
//! remains. Hammers with waiters of different ttls on one key, dead joiners (entries that are
//! never renewed and never leave), cancelled waiters, single tries, script flushes and the
//! eviction of one of the two line keys, on inc and on Redlock over three nodes (line_keep);
//! a watcher reads every line atomically (MULTI) every few ms and checks that both keys expire
//! no earlier than any live entry, that they always carry an expiry, and how long the line gets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use lock_core::LockError;
use lock_core::raw::redis::LINE_SCRIPT;
use lock_tests::fair::{Store, Target, waiting};
use lock_tests::inc_kit::{ms, next};
use lock_tests::server::RedisServer;
use redis::Value;
use redis::aio::MultiplexedConnection;
use tokio::time::{Instant, sleep};

/// One atomic read of a line: TIME, the expiry index with scores, both keys' PEXPIRETIME, ZCARD.
type LineRead = (Vec<i64>, Vec<(String, i64)>, i64, i64, i64);

#[derive(Default)]
struct Watch {
    /// Reads where a key of a line expired before a live entry of it (or was missing).
    early: AtomicU64,
    /// Reads where a key of a line carried no expiry.
    no_ttl: AtomicU64,
    /// The longest line seen (ZCARD of the arrival set).
    longest: AtomicU64,
    /// The most lapsed entries seen in one line at once.
    most_lapsed: AtomicU64,
    reads: AtomicU64,
    first_violation: std::sync::Mutex<Option<String>>,
}

#[derive(Default)]
struct Tally {
    sections: AtomicU64,
    overlaps: AtomicU64,
    errors: AtomicU64,
}

/// Whether the watcher tolerates a missing key of a pair (chaos deletes one on purpose).
#[derive(Clone, Copy, PartialEq)]
enum Chaos {
    None,
    FlushAndEvict,
    /// `DEBUG RELOAD` (a restart keeping the data and the keys' expiries) and pauses of the
    /// first server longer than the shortest leases (entries lapse while it is stopped).
    ReloadAndPause,
}

async fn watch_once(c: &mut MultiplexedConnection, watch: &Watch, chaos: Chaos) {
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg("*queue*")
        .query_async(c)
        .await
        .unwrap_or_default();
    let mut lines: Vec<Vec<u8>> = keys
        .iter()
        .filter(|k| k.ends_with(b":queue"))
        .cloned()
        .collect();
    for k in &keys {
        if k.ends_with(b":queue-expiry") {
            let line = k[..k.len() - b"-expiry".len()].to_vec();
            if !lines.contains(&line) {
                lines.push(line);
            }
        }
    }
    for line in lines {
        let expiry = [line.as_slice(), b"-expiry"].concat();
        let answer: redis::RedisResult<LineRead> = redis::pipe()
            .atomic()
            .cmd("TIME")
            .cmd("ZRANGE")
            .arg(&expiry)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .cmd("PEXPIRETIME")
            .arg(&line)
            .cmd("PEXPIRETIME")
            .arg(&expiry)
            .cmd("ZCARD")
            .arg(&line)
            .query_async(c)
            .await;
        let Ok((time, entries, line_at, expiry_at, card)) = answer else {
            continue;
        };
        watch.reads.fetch_add(1, Ordering::Relaxed);
        let now = time[0] * 1000 + time[1] / 1000;
        watch.longest.fetch_max(card as u64, Ordering::Relaxed);
        let lapsed = entries.iter().filter(|(_, e)| *e <= now).count();
        watch
            .most_lapsed
            .fetch_max(lapsed as u64, Ordering::Relaxed);
        let latest = entries.iter().map(|(_, e)| *e).max();
        let name = String::from_utf8_lossy(&line).into_owned();
        for (which, at) in [("line", line_at), ("expiry", expiry_at)] {
            if at == -1 {
                watch.no_ttl.fetch_add(1, Ordering::Relaxed);
                let mut first = watch.first_violation.lock().unwrap();
                first.get_or_insert(format!("{name} {which}: no expiry"));
            }
            if let Some(latest) = latest
                && latest > now
                && at != -1
                && at < latest
                && !(chaos == Chaos::FlushAndEvict && at == -2)
            {
                watch.early.fetch_add(1, Ordering::Relaxed);
                let mut first = watch.first_violation.lock().unwrap();
                first.get_or_insert(format!(
                    "{name} {which}: expires at {at}, live entry until {latest} (now {now}, {entries:?})"
                ));
            }
        }
    }
}

/// A waiter that joins and never comes back (its process died right after the join): the join
/// as the scripts make it (prune, join, settle), on `node`, for `lease` ms.
async fn dead_join(c: &mut MultiplexedConnection, line: &[u8], n: u64, lease: u64) {
    let script = format!(
        "{LINE_SCRIPT}\nlocal now, now_us = line_clock()\nline_prune(now)\n\
         line_join(ARGV[1], now, now_us, tonumber(ARGV[2]))\nreturn 1"
    );
    let member = format!("{:032x}{:032x}", 0xdead_0000_u64 + n, n);
    let expiry = [line, b"-expiry"].concat();
    let _: redis::RedisResult<Value> = redis::cmd("EVAL")
        .arg(script)
        .arg(2)
        .arg(line)
        .arg(expiry)
        .arg(member)
        .arg(lease)
        .query_async(c)
        .await;
}

fn line_name(store: Store, key: &str) -> Vec<u8> {
    match store {
        Store::Inc | Store::IncCluster => format!("lock:{{{key}}}:queue").into_bytes(),
        Store::Redis | Store::Redlock3 => lock_tests::fair::line_key(key),
    }
}

/// `clients` clients with ttls of 40 ms to 1.2 s on one key, each `rounds` rounds of: a waiter
/// given up after a few ms, a single try, or a full acquisition with a short section; a
/// chaos task that adds dead joiners to the line (on the first node), and with `chaos`,
/// flushes scripts and deletes one of the two line keys now and then.
async fn hammer(
    target: &Target,
    key: &str,
    clients: usize,
    rounds: usize,
    chaos: Chaos,
) -> (Arc<Tally>, Arc<Watch>) {
    let tally = Arc::new(Tally::default());
    let watch = Arc::new(Watch::default());
    let stop = Arc::new(AtomicBool::new(false));
    let inside = Arc::new(AtomicBool::new(false));
    let mut background = Vec::new();
    for server in &target.servers {
        let (watch, stop, url) = (Arc::clone(&watch), Arc::clone(&stop), server.url());
        background.push(tokio::spawn(async move {
            let mut c = lock_tests::fair::connect(&url).await;
            while !stop.load(Ordering::SeqCst) {
                watch_once(&mut c, &watch, chaos).await;
                sleep(ms(2)).await;
            }
        }));
    }
    {
        let urls: Vec<String> = target.servers.iter().map(RedisServer::url).collect();
        let pid = target.servers[0].pid().expect("pid");
        let (stop, line) = (Arc::clone(&stop), line_name(target.store, key));
        background.push(tokio::spawn(async move {
            let mut cs = Vec::new();
            for url in &urls {
                cs.push(lock_tests::fair::connect(url).await);
            }
            let mut seed = 0x27c0_dead_u64;
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let lease = 10 + next(&mut seed) % 40;
                dead_join(&mut cs[0], &line, n, lease).await;
                if chaos == Chaos::ReloadAndPause {
                    let pick = (next(&mut seed) % cs.len() as u64) as usize;
                    match n % 6 {
                        0 => {
                            let _: redis::RedisResult<Value> = redis::cmd("DEBUG")
                                .arg("RELOAD")
                                .query_async(&mut cs[pick])
                                .await;
                        }
                        3 => {
                            let signal = |s: &str| {
                                std::process::Command::new("kill")
                                    .arg(s)
                                    .arg(pid.to_string())
                                    .status()
                                    .expect("kill")
                            };
                            signal("-STOP");
                            sleep(ms(60 + next(&mut seed) % 60)).await;
                            signal("-CONT");
                        }
                        _ => {}
                    }
                }
                if chaos == Chaos::FlushAndEvict {
                    let which = next(&mut seed) % 6;
                    let pick = (next(&mut seed) % cs.len() as u64) as usize;
                    let c = &mut cs[pick];
                    let victim = match which {
                        0 => Some(line.clone()),
                        1 => Some([line.as_slice(), b"-expiry"].concat()),
                        _ => None,
                    };
                    if let Some(victim) = victim {
                        let _: redis::RedisResult<Value> =
                            redis::cmd("DEL").arg(victim).query_async(c).await;
                    }
                    if which == 2 {
                        let _: redis::RedisResult<Value> =
                            redis::cmd("SCRIPT").arg("FLUSH").query_async(c).await;
                    }
                }
                sleep(ms(15 + next(&mut seed) % 20)).await;
            }
        }));
    }
    let ttls = [40u64, 150, 400, 1_200];
    let mut tasks = Vec::new();
    for client in 0..clients {
        let ttl = ms(ttls[client % ttls.len()]);
        let locker = target.locker(true, ttl, waiting(ms(10))).await;
        let (tally, inside) = (Arc::clone(&tally), Arc::clone(&inside));
        let key = key.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut seed = 0x27c0_5eed ^ (client as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            for _ in 0..rounds {
                let action = next(&mut seed) % 10;
                let guard = match action {
                    0..=2 => {
                        let wait = Duration::from_micros(next(&mut seed) % 8_000);
                        match tokio::time::timeout(wait, locker.acquire(&key)).await {
                            Err(_) => continue,
                            Ok(result) => result,
                        }
                    }
                    3 => match locker.try_acquire(&key).await {
                        Ok(Some(guard)) => Ok(guard),
                        Ok(None) => continue,
                        Err(e) => Err(e),
                    },
                    _ => locker.acquire(&key).await,
                };
                let guard = match guard {
                    Ok(guard) => guard,
                    Err(LockError::Timeout { .. }) => continue,
                    Err(e) => {
                        if chaos != Chaos::FlushAndEvict {
                            eprintln!("acquire: {e}");
                            tally.errors.fetch_add(1, Ordering::Relaxed);
                        }
                        continue;
                    }
                };
                if inside.swap(true, Ordering::SeqCst) {
                    tally.overlaps.fetch_add(1, Ordering::Relaxed);
                }
                tally.sections.fetch_add(1, Ordering::Relaxed);
                sleep(Duration::from_micros(next(&mut seed) % 1_500)).await;
                inside.store(false, Ordering::SeqCst);
                let _ = guard.release().await;
            }
            locker
        }));
    }
    let mut lockers = Vec::new();
    for task in tasks {
        lockers.push(task.await.unwrap());
    }
    stop.store(true, Ordering::SeqCst);
    for task in background {
        task.await.unwrap();
    }
    drop(lockers);
    (tally, watch)
}

async fn left_of(target: &Target, key: &str, within: Duration) -> Vec<String> {
    target
        .keys_left_within(within, |name| {
            name.contains(key) && !name.ends_with(":fence")
        })
        .await
}

fn report(what: &str, tally: &Tally, watch: &Watch, chaos: Chaos) {
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    eprintln!(
        "{what}: sections {}, errors {}, reads {}, longest line {}, most lapsed {}, early {}, no ttl {}; first: {:?}",
        get(&tally.sections),
        get(&tally.errors),
        get(&watch.reads),
        get(&watch.longest),
        get(&watch.most_lapsed),
        get(&watch.early),
        get(&watch.no_ttl),
        watch.first_violation.lock().unwrap()
    );
    assert_eq!(get(&tally.overlaps), 0, "{what}: overlapping sections");
    assert!(get(&tally.sections) > 0, "{what}: no section");
    assert!(get(&watch.reads) > 0, "{what}: the watcher read nothing");
    assert_eq!(get(&watch.no_ttl), 0, "{what}: a line key without expiry");
    if chaos != Chaos::FlushAndEvict {
        assert_eq!(get(&tally.errors), 0, "{what}: errors");
        assert_eq!(
            get(&watch.early),
            0,
            "{what}: a line key expires before a live entry"
        );
    }
    // Lapsed entries are pruned by every join: with a dead joiner every 15-35 ms of at most
    // 50 ms and the clients' waiters, they never pile up.
    assert!(
        get(&watch.most_lapsed) <= 16,
        "{what}: lapsed entries pile up"
    );
    assert!(get(&watch.longest) <= 32, "{what}: the line grows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_mixed_ttls_dead_joiners_keep_the_line_keys_over_every_live_entry() {
    let Some(target) = Target::start(Store::Inc, "attack_s27c").await else {
        return;
    };
    let (tally, watch) = hammer(&target, "s27c-inc", 8, 60, Chaos::None).await;
    report("inc", &tally, &watch, Chaos::None);
    let left = left_of(&target, "s27c-inc", ms(3_000)).await;
    assert!(left.is_empty(), "left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock3_mixed_ttls_dead_joiners_keep_the_line_keys_over_every_live_entry() {
    let Some(target) = Target::start(Store::Redlock3, "attack_s27c").await else {
        return;
    };
    let (tally, watch) = hammer(&target, "s27c-redlock3", 5, 40, Chaos::None).await;
    report("redlock3", &tally, &watch, Chaos::None);
    let left = left_of(&target, "s27c-redlock3", ms(3_000)).await;
    assert!(left.is_empty(), "left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_one_node_mixed_ttls_dead_joiners_keep_the_line_keys_over_every_live_entry() {
    let Some(target) = Target::start(Store::Redis, "attack_s27c").await else {
        return;
    };
    let (tally, watch) = hammer(&target, "s27c-redis", 8, 60, Chaos::None).await;
    report("redis", &tally, &watch, Chaos::None);
    let left = left_of(&target, "s27c-redis", ms(3_000)).await;
    assert!(left.is_empty(), "left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_line_key_evictions_and_script_flushes_leave_nothing() {
    let Some(target) = Target::start(Store::Inc, "attack_s27c").await else {
        return;
    };
    let (tally, watch) = hammer(&target, "s27c-evict", 8, 60, Chaos::FlushAndEvict).await;
    report("inc evict", &tally, &watch, Chaos::FlushAndEvict);
    let left = left_of(&target, "s27c-evict", ms(3_000)).await;
    assert!(left.is_empty(), "left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock3_line_key_evictions_and_script_flushes_leave_nothing() {
    let Some(target) = Target::start(Store::Redlock3, "attack_s27c").await else {
        return;
    };
    let (tally, watch) = hammer(&target, "s27c-evict3", 5, 40, Chaos::FlushAndEvict).await;
    report("redlock3 evict", &tally, &watch, Chaos::FlushAndEvict);
    let left = left_of(&target, "s27c-evict3", ms(3_000)).await;
    assert!(left.is_empty(), "left: {left:?}");
}

/// Three waiters of different ttls (300 ms, 2 s, 800 ms) join in turn behind a holder and give
/// up in every order (the latest joiner first, the longest ttl first, ...): the line's keys never
/// expire before a live entry, and the last one out deletes them at once (the holder still
/// holds, so no release passes the turn in between).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_of_different_ttls_leaving_in_every_order_leave_the_line_sound() {
    let Some(target) = Target::start(Store::Inc, "attack_s27c").await else {
        return;
    };
    let ttls = [300u64, 2_000, 800];
    let orders = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];
    let mut c = lock_tests::fair::connect(&target.url).await;
    let watch = Watch::default();
    for (case, order) in orders.iter().enumerate() {
        let key = format!("s27c-order-{case}");
        let holder = target
            .locker(true, ms(10_000), lock_core::RetryPolicy::none())
            .await
            .acquire(&key)
            .await
            .expect("holder");
        let mut waiters = Vec::new();
        for (n, ttl) in ttls.iter().enumerate() {
            // Waiter `n` leaves at 250 + 100 * (its rank in `order`) ms from the start.
            let rank = order.iter().position(|&w| w == n).unwrap() as u64;
            let deadline = 250 + 100 * rank - 40 * n as u64;
            let locker = target
                .locker(
                    true,
                    ms(*ttl),
                    lock_core::RetryPolicy::forever()
                        .with_retry_delay(ms(20))
                        .with_retry_jitter(Duration::ZERO)
                        .with_deadline(ms(deadline)),
                )
                .await;
            let key = key.clone();
            waiters.push(tokio::spawn(async move {
                let result = locker.acquire(&key).await;
                (result.is_err(), locker)
            }));
            sleep(ms(40)).await;
        }
        let until = Instant::now() + ms(700);
        while Instant::now() < until {
            watch_once(&mut c, &watch, Chaos::None).await;
            sleep(ms(3)).await;
        }
        let mut lockers = Vec::new();
        for waiter in waiters {
            let (gave_up, locker) = waiter.await.unwrap();
            assert!(gave_up, "case {order:?}: a waiter got the held lock");
            lockers.push(locker);
        }
        let line_keys = target.line_keys(&key).await;
        assert!(
            line_keys.is_empty(),
            "case {order:?}: the last one out left {line_keys:?}"
        );
        holder.release().await.expect("release");
        let left = left_of(&target, &key, ms(500)).await;
        assert!(left.is_empty(), "case {order:?}: left {left:?}");
        drop(lockers);
    }
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    eprintln!(
        "orders: reads {}, early {}, no ttl {}, first {:?}",
        get(&watch.reads),
        get(&watch.early),
        get(&watch.no_ttl),
        watch.first_violation.lock().unwrap()
    );
    assert!(get(&watch.reads) > 0);
    assert_eq!(
        get(&watch.early),
        0,
        "a line key expired before a live entry"
    );
    assert_eq!(get(&watch.no_ttl), 0, "a line key without expiry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_reloads_and_pauses_keep_the_line_keys_over_every_live_entry() {
    let Some(target) = Target::start(Store::Inc, "attack_s27c").await else {
        return;
    };
    let (tally, watch) = hammer(&target, "s27c-reload", 8, 50, Chaos::ReloadAndPause).await;
    report("inc reload", &tally, &watch, Chaos::ReloadAndPause);
    let left = left_of(&target, "s27c-reload", ms(3_000)).await;
    assert!(left.is_empty(), "left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock3_reloads_and_pauses_keep_the_line_keys_over_every_live_entry() {
    let Some(target) = Target::start(Store::Redlock3, "attack_s27c").await else {
        return;
    };
    let (tally, watch) = hammer(&target, "s27c-reload3", 5, 30, Chaos::ReloadAndPause).await;
    report("redlock3 reload", &tally, &watch, Chaos::ReloadAndPause);
    let left = left_of(&target, "s27c-reload3", ms(3_000)).await;
    assert!(left.is_empty(), "left: {left:?}");
}

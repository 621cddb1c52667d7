//! Fair waiting across processes (issue: waiters served in order, woken by push): 16 and 64
//! contending clients on one key (each its own backend instance with its own connections, as
//! separate processes would be), 1 ms and 0 ms sections, on one redis-server. For ours with
//! `fair`, ours as by default, rslock at its defaults and at equal retry settings, and inc with
//! and without `fair`: sections per second (against the in-process lock with as many tasks
//! and the same sections, in the same run), p50/p99/max wait (against rslock, and p99 against
//! the ideal first-come-first-served bound: waiters × (section + one round trip)), and the
//! server's commands per section (`INFO stats`, the scripts' own calls included). A token ring
//! through the same server (each client `BLPOP`s its own list and `LPUSH`es the next one's: one
//! command and one wake-up per hand-off, no lock at all) is the floor any hand-off through
//! Redis meets on this machine, measured beside the bound. The 0 ms sections are measured again
//! over a network (a link of 1 ms each way in front of the server, [`crate::link::SlowLink`]),
//! where a hand-off costs round trips rather than the two vCPUs' time, the bound counting the
//! round trip through that link.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_inc::{IncConfig, IncLock};
use lock_memory::MemoryLock;
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::server::{RedisServer, redis_server_binary};
use rslock::LockManager;

use crate::limit::{BenchResult, median};
use crate::link::SlowLink;
use crate::{Figure, Handoff, figure, handoff_with};

const TTL: Duration = Duration::from_secs(10);

/// Ours at the equal setting: 5 ms delay + up to 5 ms jitter (7.5 ms on average); rslock's
/// delay is uniform in 0..15 ms, the same mean.
fn tuned() -> RetryPolicy {
    RetryPolicy::forever()
        .with_retry_delay(Duration::from_millis(5))
        .with_retry_jitter(Duration::from_millis(5))
}

pub(crate) async fn benchmarks(duration: Duration, only: Option<&str>) -> BenchResult<Vec<Figure>> {
    let binary = redis_server_binary()
        .ok_or("redis-server not found: run `cargo xtask it` first, which installs it")?;
    let server = RedisServer::start(&binary, &["--maxclients", "10000"])?;
    let url = server.url();
    let redlock = only.is_none_or(|only| only != "inc");
    let inc = only.is_none_or(|only| only != "redlock");
    let mut figures = Vec::new();
    if redlock {
        let fair = redlock_locker(&url, true, RetryPolicy::forever())?;
        let plain = redlock_locker(&url, false, RetryPolicy::forever())?;
        figures.extend(uncontended("redis", 1, &fair, &plain).await?);
        // Redlock over three nodes (fair by default there too), the first node this one.
        let others: Vec<RedisServer> = (0..2)
            .map(|_| RedisServer::start(&binary, &[]))
            .collect::<Result<_, _>>()?;
        let urls: Vec<String> = std::iter::once(url.clone())
            .chain(others.iter().map(RedisServer::url))
            .collect();
        let fair = redlock_locker_on(&urls, true, RetryPolicy::forever())?;
        let plain = redlock_locker_on(&urls, false, RetryPolicy::forever())?;
        figures.extend(uncontended("redlock", 3, &fair, &plain).await?);
    }
    if inc {
        let fair = inc_locker(&url, true, RetryPolicy::forever()).await?;
        let plain = inc_locker(&url, false, RetryPolicy::forever()).await?;
        figures.extend(uncontended("inc", 1, &fair, &plain).await?);
    }
    if only == Some("fair-uncontended") {
        return Ok(figures);
    }
    let mut run = 0usize;
    for waiters in [16usize, 64] {
        for held in [Duration::from_millis(1), Duration::ZERO] {
            let setting = Setting {
                scenario: format!(
                    "fair handoff, {waiters} clients (as processes), {} ms sections",
                    held.as_millis()
                ),
                waiters,
                held,
                duration,
                memory: Some(memory_reference(waiters, held, duration).await?),
                url: url.clone(),
                all: true,
            };
            figures.extend(contended(&server, &setting, redlock, inc, &mut run).await?);
        }
    }
    // The same hand-offs over a network: a link of 1 ms each way in front of the server, where
    // a round trip, not the machine's CPUs, is what a hand-off costs (on loopback every
    // hand-off is mostly the server's and the clients' CPU time, shared by both on two vCPUs).
    // Ours at its defaults, rslock at its defaults and at equal settings, and the token ring.
    let link = SlowLink::start(server.port(), Duration::from_millis(1))?;
    for waiters in [16usize, 64] {
        let setting = Setting {
            scenario: format!(
                "fair handoff over a 1 ms link, {waiters} clients (as processes), 0 ms sections"
            ),
            waiters,
            held: Duration::ZERO,
            duration: duration * 2,
            memory: None,
            url: link.url(),
            all: false,
        };
        figures.extend(contended(&server, &setting, redlock, inc, &mut run).await?);
    }
    Ok(figures)
}

/// One contended setting: its clients, where they connect, and what it is compared with.
struct Setting {
    scenario: String,
    waiters: usize,
    held: Duration,
    duration: Duration,
    /// The in-process lock's sections per second with as many tasks and the same sections.
    memory: Option<f64>,
    /// Where the clients connect: the server, or a link in front of it.
    url: String,
    /// Every contender (ours with `fair` off too, and at equal settings); else ours at its
    /// defaults, rslock and the token ring.
    all: bool,
}

/// Runs every contender of `setting` one after the other on keys of their own (`run` numbers
/// them) and reports sections per second, p50/p99/max wait (p99 against rslock and against
/// the ideal first-come-first-served bound) and the server's commands per section.
async fn contended(
    server: &RedisServer,
    setting: &Setting,
    redlock: bool,
    inc: bool,
    run: &mut usize,
) -> BenchResult<Vec<Figure>> {
    let Setting {
        scenario,
        waiters,
        held,
        duration,
        memory,
        url,
        all,
    } = setting;
    let (waiters, held, duration, all) = (*waiters, *held, *duration, *all);
    let rtt = round_trip(url).await?;
    // The ideal first-come-first-served bound: every waiter ahead of you holds the key for one
    // section, and each hand-off costs one round trip. A section is what it takes here,
    // measured in process: tokio's timer makes a 1 ms sleep last longer.
    let nominal_ms = waiters as f64 * (held.as_secs_f64() + rtt.as_secs_f64()) * 1e3;
    let section = memory.map_or(held.as_secs_f64(), |memory| 1.0 / memory);
    let ideal_ms = waiters as f64 * (section + rtt.as_secs_f64()) * 1e3;
    let mut results: Vec<(String, Handoff, f64)> = Vec::new();
    let mut measure = |name: &str, result: (Handoff, f64)| {
        results.push((name.to_owned(), result.0, result.1));
    };
    if redlock {
        for (name, fair, policy) in [
            ("redis (fair), defaults", true, RetryPolicy::forever()),
            ("redis (fair off), defaults", false, RetryPolicy::forever()),
            ("redis (fair), tuned", true, tuned()),
            ("redis (fair off), tuned", false, tuned()),
        ] {
            if !all && name != "redis (fair), defaults" {
                continue;
            }
            *run += 1;
            let key = format!("fair-bench-{run}");
            let lockers = (0..waiters)
                .map(|_| redlock_locker(url, fair, policy.clone()))
                .collect::<BenchResult<Vec<_>>>()?;
            measure(name, ours(server, lockers, &key, held, duration).await?);
        }
        for (name, delay) in [
            ("rslock, defaults", None),
            ("rslock, tuned (0..15 ms)", Some(Duration::from_millis(15))),
        ] {
            *run += 1;
            let key = format!("fair-bench-{run}");
            measure(
                name,
                rslock_run(server, url, waiters, delay, &key, held, duration).await?,
            );
        }
    }
    if inc {
        for (name, fair, policy) in [
            ("inc (fair), defaults", true, RetryPolicy::forever()),
            ("inc (fair off), defaults", false, RetryPolicy::forever()),
            ("inc (fair), tuned", true, tuned()),
        ] {
            if !all && name != "inc (fair), defaults" {
                continue;
            }
            *run += 1;
            let key = format!("fair-bench-{run}");
            let mut lockers = Vec::new();
            for _ in 0..waiters {
                lockers.push(inc_locker(url, fair, policy.clone()).await?);
            }
            measure(name, ours(server, lockers, &key, held, duration).await?);
        }
    }
    *run += 1;
    measure(
        "token ring (BLPOP/LPUSH, no lock)",
        token_ring(server, url, waiters, held, duration, *run).await?,
    );
    let rslock_at = |tuned: bool| {
        results
            .iter()
            .find(|(name, ..)| name.starts_with("rslock") && name.contains("tuned") == tuned)
            .map(|(_, result, _)| result.p99_wait_ms)
    };
    let (rslock_defaults, rslock_tuned) = (rslock_at(false), rslock_at(true));
    let mut figures = Vec::new();
    for (name, result, commands) in &results {
        let mut rate = figure(
            name,
            scenario,
            result.sections_per_second,
            "sections/s",
            memory.map(|memory| ("memory (in-process), same tasks", memory)),
        );
        rate.nodes = Some(1);
        figures.push(rate);
        let mut p99 = figure(
            name,
            &format!("{scenario}: p99 wait"),
            result.p99_wait_ms,
            "ms",
            None,
        );
        p99.nodes = Some(1);
        // Against the ideal bound: > 1 means above it (the goal is within 2×).
        p99.reference = Some(format!(
            "ideal FCFS bound {ideal_ms:.1} ms (nominal {nominal_ms:.1} ms)"
        ));
        p99.ratio_to_reference = Some(result.p99_wait_ms / ideal_ms);
        if !name.starts_with("rslock") && !name.starts_with("token ring") {
            let theirs = if name.contains("tuned") {
                rslock_tuned
            } else {
                rslock_defaults
            };
            p99.ratio_to_rslock = theirs
                .map(|theirs| theirs / result.p99_wait_ms)
                .filter(|ratio| ratio.is_finite());
        }
        figures.push(p99);
        for (label, value, unit) in [
            ("p50 wait", result.p50_wait_ms, "ms"),
            ("max wait", result.max_wait_ms, "ms"),
            ("server commands per section", *commands, "commands"),
        ] {
            let mut extra = figure(name, &format!("{scenario}: {label}"), value, unit, None);
            extra.nodes = Some(1);
            figures.push(extra);
        }
    }
    if let Some(memory) = memory {
        let mut reference = figure(
            "memory (in-process), same tasks",
            scenario,
            *memory,
            "sections/s",
            None,
        );
        reference.nodes = Some(1);
        figures.push(reference);
    }
    Ok(figures)
}

/// What `fair` costs uncontended: acquire + release cycles of a fair client and a plain one
/// (both waiting as the references do: forever), in chunks of 50 whose order turns every round.
async fn uncontended(
    backend: &str,
    nodes: u32,
    fair: &Locker,
    plain: &Locker,
) -> BenchResult<Vec<Figure>> {
    const ROUNDS: u32 = 40;
    const CHUNK: u32 = 50;
    for _ in 0..CHUNK {
        fair.acquire("fair-uncontended-1").await?.release().await?;
        plain.acquire("fair-uncontended-0").await?.release().await?;
    }
    let mut times = [Duration::ZERO; 2];
    for round in 0..ROUNDS {
        for turn in 0..2 {
            let which = (round as usize + turn) % 2;
            let (locker, key) = if which == 1 {
                (fair, "fair-uncontended-1")
            } else {
                (plain, "fair-uncontended-0")
            };
            let started = Instant::now();
            for _ in 0..CHUNK {
                locker.acquire(key).await?.release().await?;
            }
            times[which] += started.elapsed();
        }
    }
    let cycles = ROUNDS * CHUNK;
    let plain_rate = crate::rate(cycles, times[0]);
    let fair_rate = crate::rate(cycles, times[1]);
    let scenario = "uncontended acquire+release";
    let mut fair_figure = figure(
        &format!("{backend} (fair)"),
        scenario,
        fair_rate,
        "ops/s",
        Some((&format!("{backend} (fair off)"), plain_rate)),
    );
    fair_figure.nodes = Some(nodes);
    let mut plain_figure = figure(
        &format!("{backend} (fair off)"),
        scenario,
        plain_rate,
        "ops/s",
        None,
    );
    plain_figure.nodes = Some(nodes);
    Ok(vec![fair_figure, plain_figure])
}

fn redlock_locker(url: &str, fair: bool, policy: RetryPolicy) -> BenchResult<Locker> {
    redlock_locker_on(&[url.to_owned()], fair, policy)
}

fn redlock_locker_on(urls: &[String], fair: bool, policy: RetryPolicy) -> BenchResult<Locker> {
    let config = RedlockConfig::new(urls.iter().cloned()).with_fair(fair);
    Ok(Locker::new(Redlock::new(config)?)
        .with_options(LockOptions::default().with_ttl(TTL).with_retry(policy))?)
}

async fn inc_locker(url: &str, fair: bool, policy: RetryPolicy) -> BenchResult<Locker> {
    let lock = IncLock::connect(IncConfig::new(url.to_owned()).with_fair(fair)).await?;
    Ok(Locker::new(lock).with_options(LockOptions::default().with_ttl(TTL).with_retry(policy))?)
}

/// The server's count of commands processed so far.
fn commands(server: &RedisServer) -> BenchResult<u64> {
    let mut connection = redis::Client::open(server.url())?.get_connection()?;
    let stats: String = redis::cmd("INFO").arg("stats").query(&mut connection)?;
    Ok(stats
        .lines()
        .find_map(|line| line.strip_prefix("total_commands_processed:"))
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or(0))
}

/// One client per contender, each taking `key` and holding it for `held` in turn; the
/// hand-off figures and the server's commands per section.
async fn ours(
    server: &RedisServer,
    lockers: Vec<Locker>,
    key: &str,
    held: Duration,
    duration: Duration,
) -> BenchResult<(Handoff, f64)> {
    // Connections and subscriptions first: what is measured is the hand-off.
    for locker in &lockers {
        locker.acquire(key).await?.release().await?;
    }
    let lockers = Arc::new(lockers);
    let key: Arc<str> = Arc::from(key);
    let before = commands(server)?;
    let result = handoff_with(lockers.len(), held, duration, {
        let lockers = Arc::clone(&lockers);
        move |contender| {
            let (locker, key) = (lockers[contender].clone(), Arc::clone(&key));
            async move {
                let guard = loop {
                    if let Ok(guard) = locker.acquire(&key).await {
                        break guard;
                    }
                };
                if !held.is_zero() {
                    tokio::time::sleep(held).await;
                }
                let _ = guard.release().await;
            }
        }
    })
    .await;
    let spent = commands(server)?.saturating_sub(before + 1);
    for locker in lockers.iter() {
        let _ = locker.stop().await;
    }
    let per_section = spent as f64 / result.sections.max(1) as f64;
    Ok((result, per_section))
}

async fn rslock_run(
    server: &RedisServer,
    url: &str,
    waiters: usize,
    delay: Option<Duration>,
    key: &str,
    held: Duration,
    duration: Duration,
) -> BenchResult<(Handoff, f64)> {
    let managers: Vec<LockManager> = (0..waiters)
        .map(|_| {
            let mut manager = LockManager::new(vec![url.to_owned()]);
            // At an equal setting rslock retries until it wins, as ours does (with its count
            // of 3 the loop below would re-ask at once after every third attempt).
            if let Some(delay) = delay {
                manager.set_retry(u32::MAX, delay);
            }
            manager
        })
        .collect();
    for manager in &managers {
        if let Ok(lock) = manager.acquire_no_guard(key, TTL).await {
            manager.unlock(&lock).await;
        }
    }
    let managers = Arc::new(managers);
    let key: Arc<str> = Arc::from(key);
    let before = commands(server)?;
    let result = handoff_with(waiters, held, duration, move |contender| {
        let (manager, key) = (managers[contender].clone(), Arc::clone(&key));
        async move {
            // rslock gives up after its retry count: ask again until it holds the lock.
            let lock = loop {
                if let Ok(lock) = manager.acquire_no_guard(key.as_bytes(), TTL).await {
                    break lock;
                }
            };
            if !held.is_zero() {
                tokio::time::sleep(held).await;
            }
            manager.unlock(&lock).await;
        }
    })
    .await;
    let spent = commands(server)?.saturating_sub(before + 1);
    let per_section = spent as f64 / result.sections.max(1) as f64;
    Ok((result, per_section))
}

/// The floor of a hand-off through the server: `waiters` clients (a connection each) pass one
/// token around a ring of lists, each `BLPOP`ing its own and, after its section, `LPUSH`ing the
/// next one's; no lock, no script, one command and one wake-up per hand-off. Its waits are
/// measured as ours are (from asking to the end of the hand-over that follows the section).
async fn token_ring(
    server: &RedisServer,
    url: &str,
    waiters: usize,
    held: Duration,
    duration: Duration,
    run: usize,
) -> BenchResult<(Handoff, f64)> {
    let client = redis::Client::open(url)?;
    let mut connections = Vec::new();
    for _ in 0..waiters {
        connections.push(client.get_multiplexed_async_connection().await?);
    }
    let lists: Arc<Vec<String>> = Arc::new(
        (0..waiters)
            .map(|index| format!("token-ring-{run}-{index}"))
            .collect(),
    );
    let mut first = connections[0].clone();
    let _: i64 = redis::cmd("LPUSH")
        .arg(&lists[0])
        .arg("token")
        .query_async(&mut first)
        .await?;
    let connections = Arc::new(connections);
    let before = commands(server)?;
    // Past the run's end each client stops after passing the token on: every one waiting
    // gets it once more, and none is left waiting.
    let result = handoff_with(waiters, held, duration, {
        let (connections, lists) = (Arc::clone(&connections), Arc::clone(&lists));
        move |contender| {
            let mut connection = connections[contender].clone();
            let (mine, next) = (
                lists[contender].clone(),
                lists[(contender + 1) % lists.len()].clone(),
            );
            async move {
                let waited: redis::RedisResult<Option<(String, String)>> = redis::cmd("BLPOP")
                    .arg(&mine)
                    .arg(duration.as_secs_f64() + 1.0)
                    .query_async(&mut connection)
                    .await;
                if !matches!(waited, Ok(Some(_))) {
                    return;
                }
                if !held.is_zero() {
                    tokio::time::sleep(held).await;
                }
                let _: redis::RedisResult<i64> = redis::cmd("LPUSH")
                    .arg(&next)
                    .arg("token")
                    .query_async(&mut connection)
                    .await;
            }
        }
    })
    .await;
    let spent = commands(server)?.saturating_sub(before + 1);
    let _: redis::RedisResult<i64> = redis::cmd("DEL")
        .arg(lists.as_slice())
        .query_async(&mut first)
        .await;
    let per_section = spent as f64 / result.sections.max(1) as f64;
    Ok((result, per_section))
}

/// The in-process lock with as many tasks and the same sections: sections per second.
async fn memory_reference(tasks: usize, held: Duration, duration: Duration) -> BenchResult<f64> {
    let locker = Locker::new(MemoryLock::new()).with_options(
        LockOptions::default()
            .with_ttl(TTL)
            .with_retry(RetryPolicy::forever()),
    )?;
    let result = handoff_with(tasks, held, duration, move |_| {
        let locker = locker.clone();
        async move {
            if let Ok(guard) = locker.acquire("fair-memory").await {
                if !held.is_zero() {
                    tokio::time::sleep(held).await;
                }
                let _ = guard.release().await;
            }
        }
    })
    .await;
    Ok(result.sections_per_second)
}

/// The median `PING` round trip to the server.
async fn round_trip(url: &str) -> BenchResult<Duration> {
    let client = redis::Client::open(url)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let mut times = Vec::new();
    for _ in 0..200 {
        let started = Instant::now();
        let _: String = redis::cmd("PING").query_async(&mut connection).await?;
        times.push(started.elapsed().as_secs_f64());
    }
    Ok(Duration::from_secs_f64(median(&mut times)))
}

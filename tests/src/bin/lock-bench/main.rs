//! `cargo xtask bench`: lock throughput measured side by side with reference implementations in
//! the same run, reported as ratios (the machines are shared and noisy, so absolute numbers mean
//! little).
//!
//! In-memory: our `MemoryLock` behind `Locker` against `lockable::LockPool` and a
//! `tokio::sync::Mutex` per key in a map, uncontended and in contended handoff.
//!
//! Redlock on 1, 3 and 5 local redis-servers, and the INCR lock: uncontended acquire+release
//! cycles against the round-trip floor of the first server, measured by a minimal blocking
//! client in chunks alternating with ours and rslock's (`floor.rs`), itself checked against
//! `redis-benchmark -c 1` (the single-client rates of the exact acquire command and release
//! script: 1 / (1/r_acquire + 1/r_release)); 64 tasks against `redis-benchmark -c 64`; and
//! contended hand-off.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_memory::MemoryLock;
use lockable::LockPool;
use serde::Serialize;

/// One measured figure, as written to `target/bench/report.json`.
mod fair;
mod floor;
mod inc;
mod limit;
mod link;
mod memory_floor;
mod plot;
mod redlock;

#[derive(Debug, Serialize)]
pub(crate) struct Figure {
    pub(crate) backend: String,
    pub(crate) nodes: Option<u32>,
    pub(crate) scenario: String,
    pub(crate) value: f64,
    unit: String,
    /// The physical limit measured in the same run, where one applies.
    limit: Option<f64>,
    ratio_to_limit: Option<f64>,
    /// Ours against rslock in the same run (> 1: we are better), where it applies.
    ratio_to_rslock: Option<f64>,
    pub(crate) reference: Option<String>,
    pub(crate) ratio_to_reference: Option<f64>,
}

#[derive(Clone, Copy, Debug)]
struct Profile {
    uncontended_ops: u32,
    rounds: u32,
    handoff_time: Duration,
    redis_cycles: u32,
    redis_rounds: usize,
}

pub(crate) const CONTENDERS: usize = 8;
pub(crate) const CRITICAL_SECTION: Duration = Duration::from_millis(1);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let quick = std::env::args().any(|arg| arg == "--quick");
    let profile = if quick {
        Profile {
            uncontended_ops: 50_000,
            rounds: 3,
            handoff_time: Duration::from_millis(500),
            redis_cycles: 500,
            redis_rounds: 5,
        }
    } else {
        Profile {
            uncontended_ops: 200_000,
            rounds: 5,
            handoff_time: Duration::from_secs(2),
            redis_cycles: 1_000,
            redis_rounds: 9,
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let only = std::env::args().skip_while(|arg| arg != "--only").nth(1);
    let mut figures = Vec::new();
    if only.as_deref().is_none_or(|only| only == "memory") {
        figures.extend(runtime.block_on(memory_benchmarks(profile))?);
    }
    if only.as_deref().is_none_or(|only| only == "redlock") {
        let single = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        figures.extend(single.block_on(redlock::benchmarks(
            profile.redis_cycles,
            profile.redis_rounds,
            profile.handoff_time,
        ))?);
    }
    if only.as_deref() == Some("redlock-1") {
        // One node, uncontended only: the mutex, permit and read-lock cycles side by side.
        let single = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        figures.extend(single.block_on(redlock::one_node_uncontended(
            profile.redis_cycles,
            profile.redis_rounds,
        ))?);
    }
    if only.as_deref() == Some("cycles") {
        // One client's cycles alone, for callgrind (see `redlock::cycles_of`); no report.
        let mut args = std::env::args().skip_while(|arg| arg != "cycles").skip(1);
        let client = args.next().ok_or("--only cycles <client> <cycles>")?;
        let cycles: u32 = args
            .next()
            .ok_or("--only cycles <client> <cycles>")?
            .parse()?;
        let single = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        single.block_on(redlock::cycles_of(&client, cycles))?;
        return Ok(());
    }
    if only.as_deref() == Some("redlock-contended") {
        // Contention alone, on 3 nodes: ours (polling and woken) against rslock.
        let single = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        figures.extend(single.block_on(redlock::contended_on(3, profile.handoff_time))?);
    }
    if only
        .as_deref()
        .is_none_or(|only| matches!(only, "redlock" | "inc" | "fair" | "fair-uncontended"))
    {
        let single = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        figures.extend(single.block_on(fair::benchmarks(profile.handoff_time, only.as_deref()))?);
    }
    if only.as_deref().is_none_or(|only| only == "inc") {
        let single = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        figures.extend(single.block_on(inc::benchmarks(
            profile.redis_cycles,
            profile.redis_rounds,
            profile.handoff_time,
        ))?);
    }
    print_table(&figures);
    let path = write_report(&figures)?;
    println!("\nreport: {}", path.display());
    if let Some(dir) = path.parent() {
        for plot in plot::write(dir, &figures)? {
            println!("plot: {}", plot.display());
        }
    }
    Ok(())
}

/// A `tokio::sync::Mutex` per key in a map: the baseline everybody writes by hand.
#[derive(Default)]
struct MutexMap(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl MutexMap {
    async fn lock(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let mutex = {
            let mut map = self
                .0
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            Arc::clone(map.entry(key.to_owned()).or_default())
        };
        mutex.lock_owned().await
    }
}

/// Our lock as the references are used: wait as long as it takes, no deadline.
fn our_locker() -> Result<Locker, lock_core::LockError> {
    Locker::new(MemoryLock::new()).with_options(
        LockOptions::default()
            .with_ttl(Duration::from_secs(30))
            .with_retry(RetryPolicy::forever()),
    )
}

async fn memory_benchmarks(profile: Profile) -> Result<Vec<Figure>, lock_core::LockError> {
    let locker = our_locker()?;
    let pool = LockPool::<String>::new();
    let map = MutexMap::default();
    let mandatory = memory_floor::MandatoryWork::default();

    // Uncontended: best of several interleaved rounds, so a noisy neighbour hurts all alike.
    let (mut ours, mut lockable, mut mutex_map, mut floor) = (0f64, 0f64, 0f64, 0f64);
    for _ in 0..profile.rounds {
        let started = Instant::now();
        for _ in 0..profile.uncontended_ops {
            locker.acquire("bench-key").await?.release().await?;
        }
        ours = ours.max(rate(profile.uncontended_ops, started.elapsed()));

        let started = Instant::now();
        for _ in 0..profile.uncontended_ops {
            drop(pool.async_lock("bench-key".to_owned()).await);
        }
        lockable = lockable.max(rate(profile.uncontended_ops, started.elapsed()));

        let started = Instant::now();
        for _ in 0..profile.uncontended_ops {
            drop(map.lock("bench-key").await);
        }
        mutex_map = mutex_map.max(rate(profile.uncontended_ops, started.elapsed()));

        let started = Instant::now();
        for _ in 0..profile.uncontended_ops {
            if !mandatory.cycle("bench-key")? {
                return Err(lock_core::LockError::NotHeld {
                    key: "bench-key".to_owned(),
                });
            }
        }
        floor = floor.max(rate(profile.uncontended_ops, started.elapsed()));
    }

    let mut figures = Vec::new();
    let scenario = "uncontended acquire+release";
    figures.push(figure(
        "memory (ours)",
        scenario,
        ours,
        "ops/s",
        Some(("lockable", lockable)),
    ));
    figures.push(figure(
        "lockable LockPool",
        scenario,
        lockable,
        "ops/s",
        None,
    ));
    figures.push(figure(
        "tokio Mutex map",
        scenario,
        mutex_map,
        "ops/s",
        Some(("lockable", lockable)),
    ));
    figures.push(figure(
        "memory floor (ttl + token + dashmap alone, no lock logic)",
        scenario,
        floor,
        "ops/s",
        Some(("lockable", lockable)),
    ));

    // 64 tasks on distinct keys, on the 2-thread runtime.
    let per_task = profile.uncontended_ops / 64;
    let ours = parallel_rate(&locker, 64, per_task).await?;
    let pool = Arc::new(pool);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..64u32 {
        let pool = Arc::clone(&pool);
        tasks.spawn(async move {
            let key = format!("parallel-{task}");
            for _ in 0..per_task {
                drop(pool.async_lock(key.clone()).await);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let theirs = rate(64 * per_task, started.elapsed());
    let scenario = "64 tasks on distinct keys, acquire+release";
    figures.push(figure(
        "memory (ours)",
        scenario,
        ours,
        "ops/s",
        Some(("lockable", theirs)),
    ));
    figures.push(figure("lockable LockPool", scenario, theirs, "ops/s", None));

    // Contended handoff: 8 tasks on one key, each holding it for 1 ms.
    let ours = locker_handoff(locker.clone(), profile.handoff_time).await;
    let theirs = handoff(profile.handoff_time, {
        move |_| {
            let pool = Arc::clone(&pool);
            async move {
                let guard = pool.async_lock("handoff".to_owned()).await;
                tokio::time::sleep(CRITICAL_SECTION).await;
                drop(guard);
            }
        }
    })
    .await;
    let map = Arc::new(map);
    let baseline = handoff(profile.handoff_time, {
        move |_| {
            let map = Arc::clone(&map);
            async move {
                let guard = map.lock("handoff").await;
                tokio::time::sleep(CRITICAL_SECTION).await;
                drop(guard);
            }
        }
    })
    .await;
    let scenario = "contended handoff, 8 tasks, 1 ms sections";
    for (backend, result, reference) in [
        ("memory (ours)", &ours, Some(&theirs)),
        ("lockable LockPool", &theirs, None),
        ("tokio Mutex map", &baseline, Some(&theirs)),
    ] {
        figures.push(figure(
            backend,
            scenario,
            result.sections_per_second,
            "sections/s",
            reference.map(|r| ("lockable", r.sections_per_second)),
        ));
        for (label, value, theirs) in [
            (
                "p50 wait",
                result.p50_wait_ms,
                reference.map(|r| r.p50_wait_ms),
            ),
            (
                "p99 wait",
                result.p99_wait_ms,
                reference.map(|r| r.p99_wait_ms),
            ),
        ] {
            let mut wait = figure(backend, &format!("{scenario}: {label}"), value, "ms", None);
            // For waits, lower is better: the ratio is theirs / ours, so > 1 means we are faster.
            if let Some(theirs) = theirs {
                wait.reference = Some("lockable".to_owned());
                wait.ratio_to_reference = (value > 0.0).then(|| theirs / value);
            }
            figures.push(wait);
        }
    }
    Ok(figures)
}

/// Contended hand-off through one of our lockers: each section takes the lock, holds it 1 ms.
pub(crate) async fn locker_handoff(locker: Locker, duration: Duration) -> Handoff {
    clients_handoff(vec![locker], duration).await
}

/// Contended hand-off where contender `i` uses `lockers[i % lockers.len()]`: one locker shared
/// by all (tasks of one process), or one per contender (as separate processes would).
pub(crate) async fn clients_handoff(lockers: Vec<Locker>, duration: Duration) -> Handoff {
    let lockers = Arc::new(lockers);
    handoff(duration, move |contender| {
        let locker = lockers[contender % lockers.len()].clone();
        async move {
            // Our waits retry forever (or for 30 s when tuned): ask again if one gives up, so
            // that every counted section held the lock.
            let guard = loop {
                if let Ok(guard) = locker.acquire("handoff").await {
                    break guard;
                }
            };
            tokio::time::sleep(CRITICAL_SECTION).await;
            let _ = guard.release().await;
        }
    })
    .await
}

/// The three figures of a hand-off run (sections/s, p50 and p99 wait), with ratios to
/// rslock's run when there is one.
pub(crate) fn handoff_figures(
    name: &str,
    nodes: u32,
    scenario: &str,
    result: &Handoff,
    rslock: Option<&Handoff>,
) -> Vec<Figure> {
    [
        (
            "",
            result.sections_per_second,
            "sections/s",
            rslock.map(|o| o.sections_per_second),
            true,
        ),
        (
            ": p50 wait",
            result.p50_wait_ms,
            "ms",
            rslock.map(|o| o.p50_wait_ms),
            false,
        ),
        (
            ": p99 wait",
            result.p99_wait_ms,
            "ms",
            rslock.map(|o| o.p99_wait_ms),
            false,
        ),
    ]
    .into_iter()
    .map(|(label, value, unit, theirs_value, higher_is_better)| {
        let mut fig = figure(name, &format!("{scenario}{label}"), value, unit, None);
        fig.nodes = Some(nodes);
        fig.ratio_to_rslock = theirs_value.and_then(|theirs| {
            let ratio = if higher_is_better {
                value / theirs
            } else {
                theirs / value
            };
            ratio.is_finite().then_some(ratio)
        });
        fig
    })
    .collect()
}

pub(crate) struct Handoff {
    pub(crate) sections_per_second: f64,
    pub(crate) p50_wait_ms: f64,
    pub(crate) p99_wait_ms: f64,
    pub(crate) max_wait_ms: f64,
    /// How many sections ran.
    pub(crate) sections: u64,
}

/// Runs `CONTENDERS` tasks that each repeatedly wait for the lock and hold it for 1 ms;
/// `section` gets the contender's number.
pub(crate) async fn handoff<F, Fut>(duration: Duration, section: F) -> Handoff
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    handoff_with(CONTENDERS, CRITICAL_SECTION, duration, section).await
}

/// Runs `contenders` tasks that each repeatedly run `section` (wait for the lock, hold it for
/// `held`, release it); the wait is the section's time minus `held`.
pub(crate) async fn handoff_with<F, Fut>(
    contenders: usize,
    held: Duration,
    duration: Duration,
    section: F,
) -> Handoff
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let started = Instant::now();
    let mut tasks = Vec::new();
    for contender in 0..contenders {
        let section = section.clone();
        tasks.push(tokio::spawn(async move {
            let mut waits = Vec::new();
            while started.elapsed() < duration {
                let asked = Instant::now();
                section(contender).await;
                // The wait is the whole section minus its work.
                waits.push(asked.elapsed().saturating_sub(held));
            }
            waits
        }));
    }
    let mut waits = Vec::new();
    for task in tasks {
        waits.extend(task.await.unwrap_or_default());
    }
    let elapsed = started.elapsed();
    waits.sort();
    Handoff {
        sections_per_second: rate(u32::try_from(waits.len()).unwrap_or(u32::MAX), elapsed),
        p50_wait_ms: percentile_ms(&waits, 0.50),
        p99_wait_ms: percentile_ms(&waits, 0.99),
        max_wait_ms: percentile_ms(&waits, 1.0),
        sections: waits.len() as u64,
    }
}

fn percentile_ms(sorted: &[Duration], quantile: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() - 1) as f64 * quantile).round() as usize;
    sorted[index.min(sorted.len() - 1)].as_secs_f64() * 1e3
}

/// Acquire + release cycles per second of `tasks` tasks, each on a key of its own for
/// `per_task` cycles, pipelined over the locker's shared connections.
pub(crate) async fn parallel_rate(
    locker: &Locker,
    tasks: u32,
    per_task: u32,
) -> Result<f64, lock_core::LockError> {
    let started = Instant::now();
    let mut running = tokio::task::JoinSet::new();
    for task in 0..tasks {
        let locker = locker.clone();
        running.spawn(async move {
            let key = format!("parallel-{task}");
            for _ in 0..per_task {
                locker.acquire(&key).await?.release().await?;
            }
            Ok::<(), lock_core::LockError>(())
        });
    }
    while let Some(result) = running.join_next().await {
        result.map_err(|e| lock_core::LockError::backend("bench", e.to_string()))??;
    }
    Ok(rate(tasks * per_task, started.elapsed()))
}

pub(crate) fn rate(operations: u32, elapsed: Duration) -> f64 {
    f64::from(operations) / elapsed.as_secs_f64().max(f64::EPSILON)
}

pub(crate) fn figure(
    backend: &str,
    scenario: &str,
    value: f64,
    unit: &str,
    reference: Option<(&str, f64)>,
) -> Figure {
    Figure {
        backend: backend.to_owned(),
        nodes: None,
        scenario: scenario.to_owned(),
        value,
        unit: unit.to_owned(),
        limit: None,
        ratio_to_limit: None,
        ratio_to_rslock: None,
        reference: reference.map(|(name, _)| name.to_owned()),
        ratio_to_reference: reference
            .and_then(|(_, theirs)| (theirs > 0.0).then(|| value / theirs)),
    }
}

fn print_table(figures: &[Figure]) {
    println!(
        "| backend | nodes | scenario | value | unit | ratio to limit | ratio to rslock (> 1 = better) | ratio to reference |"
    );
    println!("|---|---:|---|---:|---|---:|---:|---:|");
    for figure in figures {
        let reference = match (&figure.reference, figure.ratio_to_reference) {
            (Some(reference), Some(ratio)) => format!("{ratio:.2}× {reference}"),
            _ => "—".to_owned(),
        };
        let limit = match (figure.limit, figure.ratio_to_limit) {
            (Some(limit), Some(ratio)) => format!("{ratio:.3} of {limit:.0}"),
            _ => "—".to_owned(),
        };
        let nodes = figure.nodes.map_or("—".to_owned(), |n| n.to_string());
        let rslock = figure
            .ratio_to_rslock
            .map_or("—".to_owned(), |r| format!("{r:.2}×"));
        println!(
            "| {} | {nodes} | {} | {:.1} | {} | {limit} | {rslock} | {reference} |",
            figure.backend, figure.scenario, figure.value, figure.unit
        );
    }
}

fn write_report(figures: &[Figure]) -> std::io::Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("report.json");
    let json = serde_json::to_string_pretty(figures).map_err(std::io::Error::other)?;
    std::fs::write(&path, json)?;
    Ok(path)
}

//! Redlock on local redis-servers, as ratios to the limit measured on the same server.

use std::time::{Duration, Instant};

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_redlock::{ConnectionKind, Redlock, RedlockConfig};
use lock_tests::server::{RedisServer, redis_server_binary};

use crate::limit::{BenchResult, cycle_limit, median};
use crate::{Figure, figure, locker_handoff, rate};

pub(crate) async fn benchmarks(cycles: u32, rounds: usize) -> BenchResult<Vec<Figure>> {
    let binary = redis_server_binary()
        .ok_or("redis-server not found: run `cargo xtask it` first, which installs it")?;
    let mut figures = Vec::new();
    for nodes in [1u32, 3, 5] {
        let servers: Vec<RedisServer> = (0..nodes)
            .map(|_| RedisServer::start(&binary, &[]))
            .collect::<Result<_, _>>()?;
        let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();

        // Interleaved rounds, medians: the machine is shared, so neighbours hit both sides alike.
        let mut limits = Vec::new();
        let mut manager = Vec::new();
        let mut pool = Vec::new();
        let lockers = [
            (
                locker(&urls, ConnectionKind::Manager, RetryPolicy::forever())?,
                &mut manager,
            ),
            (
                locker(&urls, ConnectionKind::Pool, RetryPolicy::forever())?,
                &mut pool,
            ),
        ];
        let mut lockers = lockers;
        for (locker, _) in &lockers {
            // Warm up the connections and script caches.
            for _ in 0..50 {
                locker.acquire("bench-key").await?.release().await?;
            }
        }
        for _ in 0..rounds {
            limits.push(redlock_limit(&servers[0], cycles)?);
            for (locker, results) in &mut lockers {
                let started = Instant::now();
                for _ in 0..cycles {
                    locker.acquire("bench-key").await?.release().await?;
                }
                results.push(rate(cycles, started.elapsed()));
            }
        }
        let limit = median(&mut limits.clone());
        for (kind, results) in [("manager", &mut manager), ("pool", &mut pool)] {
            // Each round's figure against the limit measured just before it, then the median:
            // load from neighbours changes from second to second.
            let mut ratios: Vec<f64> = results
                .iter()
                .zip(&limits)
                .map(|(ours, limit)| ours / limit)
                .collect();
            let ratio = median(&mut ratios);
            let value = median(results);
            let mut uncontended = figure(
                &format!("redlock ({kind})"),
                "uncontended acquire+release, sequential",
                value,
                "cycles/s",
                None,
            );
            uncontended.nodes = Some(nodes);
            uncontended.limit = Some(limit);
            uncontended.ratio_to_limit = Some(ratio);
            figures.push(uncontended);
        }

        let tuned = RetryPolicy::forever()
            .with_retry_delay(Duration::from_millis(5))
            .with_retry_jitter(Duration::from_millis(5))
            .with_deadline(Duration::from_secs(30));
        let locker = locker(&urls, ConnectionKind::Manager, tuned)?;
        let result = locker_handoff(locker, Duration::from_secs(2)).await;
        let scenario = "contended handoff, 8 tasks, 1 ms sections, 5 ms delay + 5 ms jitter";
        for (scenario, value, unit) in [
            (
                scenario.to_owned(),
                result.sections_per_second,
                "sections/s",
            ),
            (format!("{scenario}: p50 wait"), result.p50_wait_ms, "ms"),
            (format!("{scenario}: p99 wait"), result.p99_wait_ms, "ms"),
        ] {
            let mut contended = figure("redlock (manager)", &scenario, value, unit, None);
            contended.nodes = Some(nodes);
            figures.push(contended);
        }
    }
    Ok(figures)
}

fn locker(urls: &[String], kind: ConnectionKind, retry: RetryPolicy) -> BenchResult<Locker> {
    let config = RedlockConfig::new(urls.iter().cloned()).with_connection(kind);
    let locker = Locker::new(Redlock::new(config)?).with_options(
        LockOptions::default()
            .with_ttl(Duration::from_secs(10))
            .with_retry(retry),
    )?;
    Ok(locker)
}

/// The cycle limit for Redlock's exact commands: `SET NX PX`, then the release script.
fn redlock_limit(server: &RedisServer, requests: u32) -> BenchResult<f64> {
    let release = include_str!("../../../../lock-redlock/src/lua/release.lua");
    cycle_limit(
        server,
        requests,
        &[],
        &["SET", "bench-limit", "token", "NX", "PX", "10000"],
        (release, &["1", "bench-limit", "token"]),
    )
}

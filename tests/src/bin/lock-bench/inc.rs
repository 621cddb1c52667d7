//! The INCR lock on a local redis-server, as a ratio to the server's single-client limit.

use std::time::{Duration, Instant};

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_inc::{IncConfig, IncLock};
use lock_tests::server::{RedisServer, redis_server_binary};

use crate::limit::{BenchResult, cycle_limit, median};
use crate::{Figure, figure, rate};

pub(crate) async fn benchmarks(cycles: u32, rounds: usize) -> BenchResult<Vec<Figure>> {
    let binary = redis_server_binary()
        .ok_or("redis-server not found: run `cargo xtask it` first, which installs it")?;
    let server = RedisServer::start(&binary, &[])?;
    let lock = IncLock::connect(IncConfig::new(server.url())).await?;
    let locker = Locker::new(lock).with_options(
        LockOptions::default()
            .with_ttl(Duration::from_secs(10))
            .with_retry(RetryPolicy::none()),
    )?;
    for _ in 0..50 {
        locker.acquire("bench-key").await?.release().await?;
    }
    let (mut limits, mut ours) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        limits.push(inc_limit(&server, cycles)?);
        let started = Instant::now();
        for _ in 0..cycles {
            locker.acquire("bench-key").await?.release().await?;
        }
        ours.push(rate(cycles, started.elapsed()));
    }
    let mut ratios: Vec<f64> = ours
        .iter()
        .zip(&limits)
        .map(|(ours, limit)| ours / limit)
        .collect();
    let mut uncontended = figure(
        "inc",
        "uncontended acquire+release, sequential",
        median(&mut ours),
        "cycles/s",
        None,
    );
    uncontended.nodes = Some(1);
    uncontended.limit = Some(median(&mut limits));
    uncontended.ratio_to_limit = Some(median(&mut ratios));
    Ok(vec![uncontended])
}

/// The limit for the INCR lock's exact scripts, on fresh random keys as real acquisitions are.
fn inc_limit(server: &RedisServer, requests: u32) -> BenchResult<f64> {
    let acquire = include_str!("../../../../lock-inc/src/lua/acquire.lua");
    let release = include_str!("../../../../lock-inc/src/lua/release.lua");
    let keys = [
        "lock:{b__rand_int__}",
        "lock:{b__rand_int__}:owner",
        "lock:{b__rand_int__}:fence",
    ];
    cycle_limit(
        server,
        requests,
        &["-r", "100000000"],
        &[
            "EVALSHA",
            acquire,
            "3",
            keys[0],
            keys[1],
            keys[2],
            "0123456789abcdef0123456789abcdef",
            "10000",
        ],
        (
            release,
            &["2", keys[0], keys[1], "0123456789abcdef0123456789abcdef"],
        ),
    )
}

//! The INCR lock on a local redis-server, as a ratio to the server's single-client round-trip
//! floor, measured alternately in the same run.

use std::time::{Duration, Instant};

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_inc::{IncConfig, IncLock};
use lock_tests::server::{RedisServer, redis_server_binary};

use crate::floor::{MinimalClient, Word};
use crate::limit::{BenchResult, CHUNK, References, against_limit, cycle_limit};
use crate::{CONTENDERS, Figure, clients_handoff, handoff_figures, parallel_rate};

pub(crate) async fn benchmarks(
    cycles: u32,
    rounds: usize,
    handoff_time: Duration,
) -> BenchResult<Vec<Figure>> {
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
        locker
            .acquire_permit("bench-permit", PERMITS)
            .await?
            .release()
            .await?;
        locker.acquire_read("bench-read").await?.release().await?;
    }
    let acquire = concat!(
        include_str!("../../../../lock-inc/src/lua/fence.lua"),
        include_str!("../../../../lock-inc/src/lua/acquire.lua")
    );
    let release = include_str!("../../../../lock-inc/src/lua/release.lua");
    let token = "0123456789abcdef0123456789abcdef";
    let floor = MinimalClient::connect(
        server.port(),
        &[
            Word::Script(acquire),
            Word::Plain("3"),
            Word::Plain("lock:{bench-floor}"),
            Word::Plain("lock:{bench-floor}:owner"),
            Word::Plain("lock:{bench-floor}:fence"),
            Word::Plain(token),
            Word::Plain("10000"),
        ],
        &[
            Word::Script(release),
            Word::Plain("2"),
            Word::Plain("lock:{bench-floor}"),
            Word::Plain("lock:{bench-floor}:owner"),
            Word::Plain(token),
        ],
    )?;
    let mut references = References::new(floor, cycles, rounds);
    let alone = FredAlone::connect(&server).await?;
    for _ in 0..50 {
        alone.cycle(token).await?;
    }
    // Mutex, fred alone, permit and read-lock cycles, in the same run.
    let mut times = [Duration::ZERO; 4];
    for chunk in 0..references.chunks() {
        references.before_chunk(chunk, |requests| inc_limit(&server, requests, &[]))?;
        // Each takes its turn coming first after the floor's chunk.
        for turn in 0..4u32 {
            let which = ((chunk + turn) % 4) as usize;
            let started = Instant::now();
            for _ in 0..CHUNK {
                match which {
                    0 => locker.acquire("bench-key").await?.release().await?,
                    1 => alone.cycle(token).await?,
                    2 => {
                        locker
                            .acquire_permit("bench-permit", PERMITS)
                            .await?
                            .release()
                            .await?;
                    }
                    _ => locker.acquire_read("bench-read").await?.release().await?,
                }
            }
            times[which] += started.elapsed();
        }
    }
    let [ours_time, alone_time, permit_time, read_time] = times;
    let mut figures = vec![
        references.floor_figure(1),
        references.figure("inc", 1, ours_time),
        references.figure("fred alone (same scripts, no lock logic)", 1, alone_time),
        against_mutex(
            references.figure("inc permit (semaphore of 4)", 1, permit_time),
            ours_time,
            permit_time,
        ),
        against_mutex(
            references.figure("inc read lock", 1, read_time),
            ours_time,
            read_time,
        ),
        parallel(&server, &locker, cycles).await?,
    ];
    figures.extend(contended(&server, handoff_time).await?);
    Ok(figures)
}

/// The size of the benchmarked semaphore.
const PERMITS: u32 = 4;

/// `figure` (a permit or read-lock cycle) against the mutex cycle of the same run: the ratio is
/// the mutex's time over this one's (1 / 1.1 ≈ 0.91 means a cycle 1.1× as long as the mutex's).
fn against_mutex(mut figure: Figure, mutex_time: Duration, time: Duration) -> Figure {
    figure.reference = Some("inc mutex cycle".to_owned());
    figure.ratio_to_reference = Some(mutex_time.as_secs_f64() / time.as_secs_f64());
    figure
}

/// What the client library costs by itself: our two scripts by `evalsha_with_reload` on a fred
/// client with the same command timeout and no resend, without tokens, handles or guards. Ours
/// against it is what our own code adds.
struct FredAlone {
    client: fred::clients::Client,
    acquire: fred::types::scripts::Script,
    release: fred::types::scripts::Script,
}

impl FredAlone {
    async fn connect(server: &RedisServer) -> BenchResult<Self> {
        use fred::prelude::ClientLike;
        let mut builder =
            fred::types::Builder::from_config(fred::prelude::Config::from_url(&server.url())?);
        builder
            .with_performance_config(|performance| {
                performance.default_command_timeout = Duration::from_secs(2);
            })
            .with_connection_config(|connection| connection.max_command_attempts = 1);
        let client = builder.build()?;
        client.init().await?;
        Ok(Self {
            client,
            acquire: fred::types::scripts::Script::from_lua(concat!(
                include_str!("../../../../lock-inc/src/lua/fence.lua"),
                include_str!("../../../../lock-inc/src/lua/acquire.lua")
            )),
            release: fred::types::scripts::Script::from_lua(include_str!(
                "../../../../lock-inc/src/lua/release.lua"
            )),
        })
    }

    async fn cycle(&self, token: &str) -> BenchResult<()> {
        let keys = ["lock:{bench-alone}", "lock:{bench-alone}:owner"];
        let fence: i64 = self
            .acquire
            .evalsha_with_reload(
                &self.client,
                vec![keys[0], keys[1], "lock:{bench-alone}:fence"],
                vec![token, "10000"],
            )
            .await?;
        let released: i64 = self
            .release
            .evalsha_with_reload(&self.client, keys.to_vec(), vec![token])
            .await?;
        if fence <= 0 || released != 1 {
            return Err("fred alone: the lock was not free".into());
        }
        Ok(())
    }
}

/// 64 tasks on distinct keys over the one connection, against `redis-benchmark -c 64` with the
/// same scripts.
async fn parallel(server: &RedisServer, locker: &Locker, cycles: u32) -> BenchResult<Figure> {
    const TASKS: u32 = 64;
    let per_task = (cycles / 8).max(10);
    let ours = parallel_rate(locker, TASKS, per_task).await?;
    let limit = inc_limit(server, TASKS * per_task, &["-c", "64"])?;
    Ok(against_limit(
        "inc",
        1,
        "64 tasks on distinct keys, acquire+release",
        ours,
        limit,
    ))
}

/// 8 contenders on one key, 1 ms sections, retrying (the lock itself fails fast) at the default
/// and a tuned policy, sharing one client or with a client each, with and without wake-ups.
async fn contended(server: &RedisServer, duration: Duration) -> BenchResult<Vec<Figure>> {
    let tuned = RetryPolicy::forever()
        .with_retry_delay(Duration::from_millis(5))
        .with_retry_jitter(Duration::from_millis(5))
        .with_deadline(Duration::from_secs(30));
    let mut figures = Vec::new();
    for (setting, policy) in [
        ("defaults", RetryPolicy::forever()),
        ("tuned: 5 ms delay + 5 ms jitter", tuned),
    ] {
        for clients in [1, CONTENDERS] {
            let scenario = if clients == 1 {
                format!("contended handoff, 8 tasks, 1 ms sections, {setting}")
            } else {
                format!("contended handoff, 8 clients (as processes), 1 ms sections, {setting}")
            };
            for (name, wake) in [("inc", false), ("inc (wake-ups)", true)] {
                let mut lockers = Vec::new();
                for _ in 0..clients {
                    let lock =
                        IncLock::connect(IncConfig::new(server.url()).with_wake_on_release(wake))
                            .await?;
                    lockers.push(
                        Locker::new(lock).with_options(
                            LockOptions::default()
                                .with_ttl(Duration::from_secs(10))
                                .with_retry(policy.clone()),
                        )?,
                    );
                }
                let result = clients_handoff(lockers, duration).await;
                figures.extend(handoff_figures(name, 1, &scenario, &result, None));
            }
        }
    }
    Ok(figures)
}

/// The limit for the INCR lock's exact scripts, on fresh random keys as real acquisitions are.
fn inc_limit(server: &RedisServer, requests: u32, extra: &[&str]) -> BenchResult<f64> {
    let acquire = concat!(
        include_str!("../../../../lock-inc/src/lua/fence.lua"),
        include_str!("../../../../lock-inc/src/lua/acquire.lua")
    );
    let release = include_str!("../../../../lock-inc/src/lua/release.lua");
    let keys = [
        "lock:{b__rand_int__}",
        "lock:{b__rand_int__}:owner",
        "lock:{b__rand_int__}:fence",
    ];
    let mut options = vec!["-r", "100000000"];
    options.extend_from_slice(extra);
    cycle_limit(
        server,
        requests,
        &options,
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

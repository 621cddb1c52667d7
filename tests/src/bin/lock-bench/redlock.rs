//! Redlock on local redis-servers, side by side with rslock (the most used Rust Redlock crate):
//! ratios to the limit measured on the same server, and to rslock, in the same run.

use std::time::{Duration, Instant};

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_redlock::{ConnectionKind, Redlock, RedlockConfig};
use lock_tests::server::{RedisServer, redis_server_binary};
use rslock::LockManager;
use tokio::net::TcpListener;

use crate::floor::{MinimalClient, Word};
use crate::limit::{BenchResult, CHUNK, References, against_limit, cycle_limit, median};
use crate::{
    CONTENDERS, CRITICAL_SECTION, Figure, clients_handoff, figure, handoff, handoff_figures,
    parallel_rate,
};

const TTL: Duration = Duration::from_secs(10);
/// A permit of a semaphore of 4 taken and released: one script each way on one node.
const PERMIT_CYCLE: &str = "redlock (manager) permit of 4";
/// A read lock taken and released.
const READ_CYCLE: &str = "redlock (manager) read lock";
/// The mutex cycle with `fair` off: the same two commands as redis-rs alone.
const NOT_FAIR: &str = "redlock (manager, fair off)";

pub(crate) async fn benchmarks(
    cycles: u32,
    rounds: usize,
    handoff_time: Duration,
) -> BenchResult<Vec<Figure>> {
    let binary = redis_server_binary()
        .ok_or("redis-server not found: run `cargo xtask it` first, which installs it")?;
    let mut figures = Vec::new();
    for nodes in [1u32, 3, 5] {
        let servers: Vec<RedisServer> = (0..nodes)
            .map(|_| RedisServer::start(&binary, &[]))
            .collect::<Result<_, _>>()?;
        let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
        figures.extend(uncontended(&servers[0], &urls, nodes, cycles, rounds).await?);
        figures.push(parallel(&servers[0], &urls, nodes, cycles).await?);
        figures.extend(contended(&urls, nodes, handoff_time).await?);
    }
    figures.extend(black_holed(&binary).await?);
    Ok(figures)
}

/// [`uncontended`] alone, on one node (`--only redlock-1`).
pub(crate) async fn one_node_uncontended(cycles: u32, rounds: usize) -> BenchResult<Vec<Figure>> {
    let binary = redis_server_binary()
        .ok_or("redis-server not found: run `cargo xtask it` first, which installs it")?;
    let server = RedisServer::start(&binary, &[])?;
    uncontended(&server, &[server.url()], 1, cycles, rounds).await
}

/// `cycles` uncontended cycles of one client on one fresh node, after 50 to warm up, and
/// nothing else (`--only cycles <client> <cycles>`): run under `valgrind --tool=callgrind`
/// twice with different counts, the difference of the totals over that of the counts is the
/// client's instructions per cycle (deterministic where timings are not). Clients: `ours`
/// (the default, fair, with the bench's forever policy), `ours-default-policy`, `not-fair`,
/// `rslock`, `alone` (redis-rs alone, the plain pair), `alone-fair` (the default's commands).
pub(crate) async fn cycles_of(client: &str, cycles: u32) -> BenchResult<Vec<Figure>> {
    let binary = redis_server_binary()
        .ok_or("redis-server not found: run `cargo xtask it` first, which installs it")?;
    let server = RedisServer::start(&binary, &[])?;
    let urls = [server.url()];
    enum Client {
        Ours(Locker),
        Rslock(LockManager),
        Alone(RedisAlone),
        AloneFair(RedisAloneFair),
    }
    let mut client = match client {
        "ours" => Client::Ours(locker(
            &urls,
            ConnectionKind::Manager,
            RetryPolicy::forever(),
        )?),
        "ours-default-policy" => Client::Ours(locker(
            &urls,
            ConnectionKind::Manager,
            RetryPolicy::default(),
        )?),
        "not-fair" => Client::Ours(locker_with(
            &urls,
            ConnectionKind::Manager,
            RetryPolicy::forever(),
            |config| config.with_fair(false),
        )?),
        "rslock" => Client::Rslock(LockManager::new(urls.to_vec())),
        "alone" => Client::Alone(RedisAlone::connect(&server).await?),
        "alone-fair" => Client::AloneFair(RedisAloneFair::connect(&server).await?),
        other => return Err(format!("unknown client `{other}`").into()),
    };
    for cycle in 0..50 + cycles {
        if cycle == 50 {
            println!("warmed up; {cycles} cycles");
        }
        match &mut client {
            Client::Ours(locker) => locker.acquire("bench-key").await?.release().await?,
            Client::Rslock(manager) => rslock_cycle(manager).await?,
            Client::Alone(alone) => alone.cycle().await?,
            Client::AloneFair(alone) => alone.cycle().await?,
        }
    }
    Ok(Vec::new())
}

/// [`contended`] alone, on `nodes` fresh servers (`--only redlock-contended`).
pub(crate) async fn contended_on(nodes: u32, handoff_time: Duration) -> BenchResult<Vec<Figure>> {
    let binary = redis_server_binary()
        .ok_or("redis-server not found: run `cargo xtask it` first, which installs it")?;
    let servers: Vec<RedisServer> = (0..nodes)
        .map(|_| RedisServer::start(&binary, &[]))
        .collect::<Result<_, _>>()?;
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    contended(&urls, nodes, handoff_time).await
}

/// Sequential acquire + release cycles: ours (both connection kinds), rslock and, on one node,
/// redis-rs alone sending the same two commands, in short chunks alternating with the minimal
/// client's round-trip floor on the first server; `redis-benchmark -c 1` windows between them
/// give the limit.
async fn uncontended(
    limit_server: &RedisServer,
    urls: &[String],
    nodes: u32,
    cycles: u32,
    rounds: usize,
) -> BenchResult<Vec<Figure>> {
    let manager = locker(urls, ConnectionKind::Manager, RetryPolicy::forever())?;
    let pool = locker(urls, ConnectionKind::Pool, RetryPolicy::forever())?;
    // On one node, the default (fair) sends an `EXISTS` of the line with its `SET` and releases
    // with the fair script; without `fair` it sends exactly redis-rs alone's two commands.
    let not_fair = locker_with(
        urls,
        ConnectionKind::Manager,
        RetryPolicy::forever(),
        |config| config.with_fair(false),
    )?;
    let rslock = LockManager::new(urls.to_vec());
    let mut alone = RedisAlone::connect(limit_server).await?;
    let mut alone_fair = RedisAloneFair::connect(limit_server).await?;
    for _ in 0..50 {
        manager.acquire("bench-key").await?.release().await?;
        pool.acquire("bench-key").await?.release().await?;
        rslock_cycle(&rslock).await?;
        alone.cycle().await?;
        if nodes == 1 {
            alone_fair.cycle().await?;
            not_fair.acquire("bench-key").await?.release().await?;
            manager
                .acquire_permit("bench-sem", 4)
                .await?
                .release()
                .await?;
            manager.acquire_read("bench-rw").await?.release().await?;
        }
    }
    // redis-rs alone is a one-server reference; on one node, a semaphore permit's and a read
    // lock's cycles run beside the mutex's (clients 4 and 5), the mutex without `fair`
    // (client 6), and redis-rs alone sending the default's commands (client 7).
    let clients = if nodes == 1 { 8 } else { 3 };
    let release = include_str!("../../../../lock-redlock/src/lua/release.lua");
    let floor = MinimalClient::connect(
        limit_server.port(),
        &["SET", "bench-floor", "token", "NX", "PX", "10000"].map(Word::Plain),
        &[
            Word::Script(release),
            Word::Plain("1"),
            Word::Plain("bench-floor"),
            Word::Plain("token"),
        ],
    )?;
    let mut references = References::new(floor, cycles, rounds);
    let mut times = [Duration::ZERO; 8];
    for chunk in 0..references.chunks() {
        references.before_chunk(chunk, |requests| redlock_limit(limit_server, requests))?;
        // The order turns with every chunk, so that no client always runs right after the
        // floor's blocking chunk.
        let mut order: Vec<usize> = (0..clients).collect();
        rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut rand::rng());
        for client in order {
            let started = Instant::now();
            for _ in 0..CHUNK {
                match client {
                    0 => manager.acquire("bench-key").await?.release().await?,
                    1 => pool.acquire("bench-key").await?.release().await?,
                    2 => rslock_cycle(&rslock).await?,
                    3 => alone.cycle().await?,
                    4 => {
                        manager
                            .acquire_permit("bench-sem", 4)
                            .await?
                            .release()
                            .await?
                    }
                    5 => manager.acquire_read("bench-rw").await?.release().await?,
                    6 => not_fair.acquire("bench-key").await?.release().await?,
                    _ => alone_fair.cycle().await?,
                }
            }
            times[client] += started.elapsed();
        }
    }
    let rslock_rate = references.rate(times[2]);
    let mut figures = vec![references.floor_figure(nodes)];
    let named = [
        ("redlock (manager)", times[0]),
        ("redlock (pool)", times[1]),
        ("rslock", times[2]),
        (REDIS_ALONE, times[3]),
        (PERMIT_CYCLE, times[4]),
        (READ_CYCLE, times[5]),
        (NOT_FAIR, times[6]),
        (REDIS_ALONE_FAIR, times[7]),
    ];
    for (name, time) in named.into_iter().take(clients) {
        let mut uncontended = references.figure(name, nodes, time);
        if name == PERMIT_CYCLE || name == READ_CYCLE {
            // Against the mutex cycle of the same run (> 1: faster than the mutex).
            uncontended.reference = Some("redlock (manager) mutex cycle".to_owned());
            uncontended.ratio_to_reference = Some(times[0].as_secs_f64() / time.as_secs_f64());
        } else if name.starts_with("redlock") {
            uncontended.ratio_to_rslock = Some(uncontended.value / rslock_rate);
            if nodes == 1 {
                // Against redis-rs alone sending the same commands: the default's (`SET` with
                // the line's `EXISTS`, the fair release script) for the default (manager and
                // pool), the plain pair for the cycle without `fair`.
                let (reference, time_alone) = if name == NOT_FAIR {
                    (REDIS_ALONE, times[3])
                } else {
                    (REDIS_ALONE_FAIR, times[7])
                };
                uncontended.reference = Some(reference.to_owned());
                uncontended.ratio_to_reference =
                    Some(time_alone.as_secs_f64() / time.as_secs_f64());
            }
        }
        figures.push(uncontended);
    }
    Ok(figures)
}

/// 64 tasks on distinct keys, pipelined over the shared connections, against
/// `redis-benchmark -c 64` with the same commands.
async fn parallel(
    limit_server: &RedisServer,
    urls: &[String],
    nodes: u32,
    cycles: u32,
) -> BenchResult<Figure> {
    const TASKS: u32 = 64;
    let locker = &locker(urls, ConnectionKind::Manager, RetryPolicy::forever())?;
    let per_task = (cycles / 8).max(10);
    let ours = parallel_rate(locker, TASKS, per_task).await?;
    let release = include_str!("../../../../lock-redlock/src/lua/release.lua");
    let limit = cycle_limit(
        limit_server,
        TASKS * per_task,
        &["-c", "64", "-r", "100000000"],
        &[
            "SET",
            "bench-par-__rand_int__",
            "token",
            "NX",
            "PX",
            "10000",
        ],
        (release, &["1", "bench-par-__rand_int__", "token"]),
    )?;
    Ok(against_limit(
        "redlock (manager)",
        nodes,
        "64 tasks on distinct keys, acquire+release",
        ours,
        limit,
    ))
}

/// 8 contenders on one key, 1 ms sections: at each library's defaults and at an equal tuned
/// setting (ours 5 ms delay + up to 5 ms jitter, 7.5 ms on average; rslock's delay is uniform
/// in 0..15 ms, the same mean); once as tasks sharing one client (one process), once with a client each (as
/// separate processes would, where only the store can hand the lock over).
async fn contended(urls: &[String], nodes: u32, duration: Duration) -> BenchResult<Vec<Figure>> {
    let tuned = RetryPolicy::forever()
        .with_retry_delay(Duration::from_millis(5))
        .with_retry_jitter(Duration::from_millis(5))
        .with_deadline(Duration::from_secs(30));
    let mut figures = Vec::new();
    for (setting, ours_policy, rslock_delay) in [
        ("defaults", RetryPolicy::forever(), None),
        (
            "tuned: 5 ms delay + 5 ms jitter",
            tuned,
            Some(Duration::from_millis(15)),
        ),
        (
            "rslock's: 0 ms delay + 15 ms jitter",
            RetryPolicy::forever()
                .with_retry_delay(Duration::ZERO)
                .with_retry_jitter(Duration::from_millis(15))
                .with_deadline(Duration::from_secs(30)),
            Some(Duration::from_millis(15)),
        ),
    ] {
        for clients in [1, CONTENDERS] {
            let managers: Vec<LockManager> = (0..clients)
                .map(|_| {
                    let mut manager = LockManager::new(urls.to_vec());
                    // At an equal setting rslock retries until it wins, as ours does: with
                    // its count of 3 the loop below would re-ask at once after every third
                    // attempt, an extra attempt our policy does not make.
                    if let Some(delay) = rslock_delay {
                        manager.set_retry(u32::MAX, delay);
                    }
                    manager
                })
                .collect();
            let managers = std::sync::Arc::new(managers);
            let theirs = handoff(duration, move |contender| {
                let manager = managers[contender % managers.len()].clone();
                async move {
                    // rslock gives up after its retry count: ask again until it holds the lock,
                    // so that its waits, like ours, last until the lock is really held.
                    let lock = loop {
                        if let Ok(lock) = manager.acquire_no_guard("handoff", TTL).await {
                            break lock;
                        }
                    };
                    tokio::time::sleep(CRITICAL_SECTION).await;
                    manager.unlock(&lock).await;
                }
            })
            .await;
            let lockers = |fair: bool, wake: bool| -> BenchResult<Vec<Locker>> {
                (0..clients)
                    .map(|_| {
                        let config = RedlockConfig::new(urls.iter().cloned())
                            .with_fair(fair)
                            .with_wake_on_release(wake);
                        Ok(Locker::new(Redlock::new(config)?).with_options(
                            LockOptions::default()
                                .with_ttl(TTL)
                                .with_retry(ours_policy.clone()),
                        )?)
                    })
                    .collect()
            };
            // The default (fair: lines on every node, the head woken alone), and without
            // lines, woken by every release or polling.
            let fair = clients_handoff(lockers(true, true)?, duration).await;
            let polled = clients_handoff(lockers(false, false)?, duration).await;
            let woken = clients_handoff(lockers(false, true)?, duration).await;
            let scenario = if clients == 1 {
                format!("contended handoff, 8 tasks, 1 ms sections, {setting}")
            } else {
                format!("contended handoff, 8 clients (as processes), 1 ms sections, {setting}")
            };
            for (name, result, other) in [
                ("redlock (manager, fair)", &fair, Some(&theirs)),
                ("redlock (manager, fair off)", &polled, Some(&theirs)),
                (
                    "redlock (manager, fair off, wake-ups)",
                    &woken,
                    Some(&theirs),
                ),
                ("rslock", &theirs, None),
            ] {
                figures.extend(handoff_figures(name, nodes, &scenario, result, other));
            }
        }
    }
    Ok(figures)
}

/// Three nodes of which one accepts TCP connections and never answers: per-cycle latency for
/// us (healthy and black-holed) and rslock (black-holed).
async fn black_holed(binary: &std::path::Path) -> BenchResult<Vec<Figure>> {
    let servers: Vec<RedisServer> = (0..2)
        .map(|_| RedisServer::start(binary, &[]))
        .collect::<Result<_, _>>()?;
    let hole = TcpListener::bind("127.0.0.1:0").await?;
    let hole_url = format!("redis://{}/", hole.local_addr()?);
    let hole_task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hole.accept().await {
            held.push(socket); // accepted, never read, never answered
        }
    });
    let healthy_urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let third = RedisServer::start(binary, &[])?;
    let mut healthy = healthy_urls.clone();
    healthy.push(third.url());
    let mut holed = healthy_urls;
    holed.push(hole_url);

    let cycles = 20;
    let measure = |latencies: Vec<Duration>| {
        let mut ms: Vec<f64> = latencies.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        median(&mut ms)
    };
    let ours_healthy = measure(
        our_cycles(
            &locker(&healthy, ConnectionKind::Manager, RetryPolicy::forever())?,
            cycles,
        )
        .await?,
    );
    let ours_holed = measure(
        our_cycles(
            &locker(&holed, ConnectionKind::Manager, RetryPolicy::forever())?,
            cycles,
        )
        .await?,
    );
    let rslock = LockManager::new(holed);
    let mut theirs = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        rslock_cycle(&rslock).await?;
        theirs.push(started.elapsed());
    }
    let theirs_holed = measure(theirs);
    hole_task.abort();
    let scenario = "acquire+release cycle latency p50, 1 of 3 nodes black-holed";
    let mut figures = Vec::new();
    let mut ours = figure("redlock (manager)", scenario, ours_holed, "ms", None);
    ours.nodes = Some(3);
    ours.ratio_to_rslock = Some(theirs_holed / ours_holed);
    // Against our own healthy figure: the target is within 2× of it.
    ours.reference = Some("ours, healthy".to_owned());
    ours.ratio_to_reference = Some(ours_holed / ours_healthy);
    figures.push(ours);
    let mut healthy_figure = figure(
        "redlock (manager)",
        "acquire+release cycle latency p50, 3 healthy nodes",
        ours_healthy,
        "ms",
        None,
    );
    healthy_figure.nodes = Some(3);
    figures.push(healthy_figure);
    let mut rslock_figure = figure("rslock", scenario, theirs_holed, "ms", None);
    rslock_figure.nodes = Some(3);
    figures.push(rslock_figure);
    Ok(figures)
}

async fn our_cycles(locker: &Locker, cycles: usize) -> BenchResult<Vec<Duration>> {
    let mut latencies = Vec::new();
    for _ in 0..cycles {
        let started = Instant::now();
        locker.acquire("bench-key").await?.release().await?;
        latencies.push(started.elapsed());
    }
    Ok(latencies)
}

const REDIS_ALONE: &str = "redis-rs alone (same commands, no lock logic)";

/// What the client library costs by itself: our acquire command and release script over one
/// redis-rs multiplexed connection (the one `ConnectionManager` wraps), without tokens,
/// rounds, validity or guards. Ours against it is what our own code adds.
struct RedisAlone {
    connection: redis::aio::MultiplexedConnection,
    release: redis::Script,
}

impl RedisAlone {
    async fn connect(server: &RedisServer) -> BenchResult<Self> {
        let client = redis::Client::open(server.url())?;
        Ok(Self {
            connection: client.get_multiplexed_async_connection().await?,
            release: redis::Script::new(include_str!(
                "../../../../lock-redlock/src/lua/release.lua"
            )),
        })
    }

    async fn cycle(&mut self) -> BenchResult<()> {
        const TOKEN: &str = "0123456789abcdef0123456789abcdef";
        let set: Option<String> = redis::cmd("SET")
            .arg("bench-alone")
            .arg(TOKEN)
            .arg("NX")
            .arg("PX")
            .arg(TTL.as_millis() as u64)
            .query_async(&mut self.connection)
            .await?;
        let deleted: i64 = self
            .release
            .key("bench-alone")
            .arg(TOKEN)
            .invoke_async(&mut self.connection)
            .await?;
        if set.is_none() || deleted != 1 {
            return Err("redis-rs alone: the key was not free".into());
        }
        Ok(())
    }
}

const REDIS_ALONE_FAIR: &str = "redis-rs alone (the fair default's commands, no lock logic)";

/// What the client library costs by itself sending what the default (`fair`) cycle sends on one
/// node: `SET NX PX` with an `EXISTS` of the key's line in one pipeline, and the fair release
/// script (the same source, keys and arguments as `lock-redlock`'s release of a lock taken
/// without waiting), over one redis-rs multiplexed connection.
struct RedisAloneFair {
    connection: redis::aio::MultiplexedConnection,
    release: redis::Script,
}

impl RedisAloneFair {
    const KEY: &'static [u8] = b"bench-alone-fair";

    async fn connect(server: &RedisServer) -> BenchResult<Self> {
        let client = redis::Client::open(server.url())?;
        let source = [
            include_str!("../../../../lock-redlock/src/lua/release_fair.lua"),
            lock_core::raw::redis::LINE_SCRIPT,
            include_str!("../../../../lock-redlock/src/lua/line_pass.lua"),
            include_str!("../../../../lock-redlock/src/lua/release_fair_pass.lua"),
        ]
        .concat();
        Ok(Self {
            connection: client.get_multiplexed_async_connection().await?,
            release: redis::Script::new(&source),
        })
    }

    async fn cycle(&mut self) -> BenchResult<()> {
        const TOKEN: &str = "0123456789abcdef0123456789abcdef";
        let line = |suffix: &[u8]| [Self::KEY, suffix].concat();
        let (set, lined): (Option<String>, i64) = redis::pipe()
            .cmd("SET")
            .arg(Self::KEY)
            .arg(TOKEN)
            .arg("NX")
            .arg("PX")
            .arg(TTL.as_millis() as u64)
            .cmd("EXISTS")
            .arg(line(b"\xff:queue-expiry"))
            .query_async(&mut self.connection)
            .await?;
        let deleted: i64 = self
            .release
            .key(Self::KEY)
            .key(line(b"\xff:queue"))
            .key(line(b"\xff:queue-expiry"))
            .arg(TOKEN)
            .arg("")
            .arg(lock_core::raw::redis::TURN_CHANNEL)
            .invoke_async(&mut self.connection)
            .await?;
        if set.is_none() || lined != 0 || deleted != 1 {
            return Err("redis-rs alone (fair): the key was not free".into());
        }
        Ok(())
    }
}

async fn rslock_cycle(manager: &LockManager) -> BenchResult<()> {
    let lock = manager
        .lock("bench-key", TTL)
        .await
        .map_err(|e| format!("rslock: {e:?}"))?;
    manager.unlock(&lock).await;
    Ok(())
}

fn locker(urls: &[String], kind: ConnectionKind, retry: RetryPolicy) -> BenchResult<Locker> {
    locker_with(urls, kind, retry, |config| config)
}

fn locker_with(
    urls: &[String],
    kind: ConnectionKind,
    retry: RetryPolicy,
    configure: impl FnOnce(RedlockConfig) -> RedlockConfig,
) -> BenchResult<Locker> {
    let config = configure(RedlockConfig::new(urls.iter().cloned()).with_connection(kind));
    let locker = Locker::new(Redlock::new(config)?)
        .with_options(LockOptions::default().with_ttl(TTL).with_retry(retry))?;
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

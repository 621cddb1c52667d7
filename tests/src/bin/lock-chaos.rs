//! `cargo xtask chaos [--seconds N] [--seed S]`: 16 worker processes contend for one Redlock
//! key on 5 nodes while a seeded schedule kills, pauses and restarts minority nodes and adds
//! latency; then one line of safety figures. Workers use fencing tokens and write to a fenced
//! resource, so stale writes are counted too. Reproducible: the same seed gives the same faults.
//!
//! Restarts wait longer than the workers' ttl (5 s), as the Redlock specification requires of
//! nodes that lose their data: an immediate restart can let a second holder in (a documented
//! hazard, not a bug this run would be allowed to show).

use std::time::{Duration, Instant};

use lock_tests::proxy::LatencyProxy;
use lock_tests::server::{RedisServer, redis_server_binary};
use lock_tests::workers;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const NODES: usize = 5;
const PROCESSES: usize = 16;
const WORKER_TTL: Duration = Duration::from_secs(5);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| args.iter().skip_while(|a| *a != flag).nth(1).cloned();
    let seconds: u64 = value("--seconds").map_or(Ok(60), |v| v.parse())?;
    let seed: u64 = value("--seed").map_or(Ok(1), |v| v.parse())?;
    let binary =
        redis_server_binary().ok_or("redis-server not found: run `cargo xtask it` first")?;
    let worker = std::env::current_exe()?.with_file_name("lock-worker");
    if !worker.is_file() {
        return Err(format!(
            "{} not found: build the lock-tests binaries first",
            worker.display()
        )
        .into());
    }

    let mut nodes: Vec<RedisServer> = (0..NODES)
        .map(|_| RedisServer::start(&binary, &[]))
        .collect::<Result<_, _>>()?;
    let mut proxies = Vec::new();
    for node in &nodes {
        proxies.push(LatencyProxy::start(node.port()).await?);
    }
    let checker = RedisServer::start(&binary, &[])?;
    println!("chaos: {PROCESSES} processes, {NODES} nodes, {seconds} s, seed {seed}");

    let started = Instant::now();
    let urls: Vec<String> = proxies.iter().map(LatencyProxy::url).collect();
    let children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            workers::spawn_worker(
                &worker,
                &["--fencing"],
                &checker,
                (1, 1_000_000),
                &urls,
                Some(seconds),
            )
        })
        .collect::<Result<_, _>>()?;

    // The fault schedule: at most two of five nodes are ever faulty at once.
    let mut rng = StdRng::seed_from_u64(seed);
    let mut faults = 0;
    while started.elapsed() + Duration::from_secs(2) < Duration::from_secs(seconds) {
        let victims = rng.random_range(1..=2usize);
        let mut chosen: Vec<usize> = (0..NODES).collect();
        for i in 0..victims {
            let j = rng.random_range(i..NODES);
            chosen.swap(i, j);
        }
        let chosen = &chosen[..victims];
        let hold = Duration::from_millis(rng.random_range(300..1500));
        match rng.random_range(0..3) {
            0 => {
                for &index in chosen {
                    nodes[index].pause()?;
                }
                tokio::time::sleep(hold).await;
                for &index in chosen {
                    nodes[index].resume()?;
                }
            }
            1 => {
                let delay = Duration::from_millis(rng.random_range(5..80));
                for &index in chosen {
                    proxies[index].set_delay(delay);
                }
                tokio::time::sleep(hold).await;
                for &index in chosen {
                    proxies[index].set_delay(Duration::ZERO);
                }
            }
            _ => {
                // Kill, and restart empty only after the longest ttl has passed.
                for &index in chosen {
                    nodes[index].kill();
                }
                tokio::time::sleep(WORKER_TTL + Duration::from_millis(500)).await;
                for &index in chosen {
                    nodes[index].restart()?;
                }
            }
        }
        faults += 1;
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..600))).await;
    }

    let totals = workers::collect(children, &checker)?;
    println!("{totals}");
    println!(
        "faults injected {faults}, failed acquisitions {}, in {:?}",
        totals.errors,
        started.elapsed()
    );
    if totals.overlaps > 0 || totals.lost_updates > 0 || totals.stale_writes > 0 {
        return Err("safety violated".into());
    }
    if totals.fenced_writes != totals.sections {
        return Err("every critical section should have written with a fencing token".into());
    }
    Ok(())
}

//! `cargo xtask explore [--seconds N] [--seed S] [--schedules K] [--lanes L]`: seeded
//! adversarial schedules against real redis-servers (see `lock_tests::explore`), then one line:
//! `schedules N, violations V`, after one line per violation naming the seed that replays it
//! (`--seed <it> --schedules 1`).

use std::time::{Duration, Instant};

use lock_tests::explore::{Lane, Options, run_schedule};
use lock_tests::server::redis_server_binary;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| args.iter().skip_while(|a| *a != flag).nth(1).cloned();
    let seconds: u64 = value("--seconds").map_or(Ok(60), |v| v.parse())?;
    let seed: u64 = value("--seed").map_or(Ok(1), |v| v.parse())?;
    let limit: Option<u64> = value("--schedules").map(|v| v.parse()).transpose()?;
    let lanes: u64 = value("--lanes").map_or(Ok(3), |v| v.parse())?;
    let verbose = args.iter().any(|a| a == "--verbose");
    let options = Options {
        ignore_assumptions: args.iter().any(|a| a == "--ignore-assumptions"),
    };
    let binary =
        redis_server_binary().ok_or("redis-server not found: run `cargo xtask it` first")?;
    let budget = Duration::from_secs(seconds);
    let started = Instant::now();
    let mut runs = Vec::new();
    for lane_index in 0..lanes.max(1) {
        let binary = binary.clone();
        runs.push(tokio::spawn(async move {
            let mut lane = Lane::start(&binary).await?;
            let mut outcomes = Vec::new();
            let mut schedule = lane_index;
            while started.elapsed() < budget && limit.is_none_or(|limit| schedule < limit) {
                let outcome = run_schedule(&mut lane, seed + schedule, options).await?;
                if verbose {
                    println!("{}", outcome.summary);
                }
                for violation in &outcome.violations {
                    println!("violation, seed {}: {violation}", outcome.seed);
                    println!("  schedule: {}", outcome.summary);
                }
                outcomes.push(outcome);
                schedule += lanes;
            }
            Ok::<_, std::io::Error>(outcomes)
        }));
    }
    let mut schedules = 0;
    let mut violations = 0;
    for run in runs {
        for outcome in run.await?? {
            schedules += 1;
            violations += outcome.violations.len();
        }
    }
    println!(
        "schedules {schedules}, violations {violations} (in {:?})",
        started.elapsed()
    );
    if violations > 0 {
        return Err(format!(
            "{violations} violations: replay each with --seed <seed> --schedules 1"
        )
        .into());
    }
    Ok(())
}

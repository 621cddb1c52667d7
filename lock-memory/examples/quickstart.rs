//! Several tasks contend for one key on the in-memory backend; each prints when it held the
//! lock, with its token's fingerprint and fencing token, and the run checks that no two
//! critical sections overlapped.
//!
//! ```text
//! cargo run --example quickstart
//! ```

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use lock_core::{LockError, LockOptions, Locker, RetryPolicy};
use lock_memory::MemoryLock;
use tokio::sync::Mutex;
use tokio::time::Instant;

const WORKERS: usize = 6;
const SECTIONS_PER_WORKER: usize = 3;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> lock_core::Result<bool> {
    let locker = Locker::new(MemoryLock::new())
        .with_namespace(Some("quickstart"))?
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(5))
                .with_retry(RetryPolicy::forever().with_deadline(Duration::from_secs(10))),
        )?;
    let started = Instant::now();
    let intervals = Arc::new(Mutex::new(Vec::new()));

    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        let (locker, intervals) = (locker.clone(), Arc::clone(&intervals));
        workers.push(tokio::spawn(async move {
            for _ in 0..SECTIONS_PER_WORKER {
                let guard = locker.acquire("shared-report").await?;
                let entered = started.elapsed();
                // The critical section: pretend to do some work.
                tokio::time::sleep(Duration::from_millis(5)).await;
                let left = started.elapsed();
                println!(
                    "worker {worker} held {} from {:>6.1} ms to {:>6.1} ms  token {}…  fencing token {}",
                    guard.key(),
                    entered.as_secs_f64() * 1e3,
                    left.as_secs_f64() * 1e3,
                    guard.token().fingerprint(),
                    guard.fencing_token().unwrap_or_default(),
                );
                intervals.lock().await.push((entered, left));
                guard.release().await?;
            }
            Ok::<_, LockError>(())
        }));
    }
    for worker in workers {
        match worker.await {
            Ok(result) => result?,
            Err(join_error) => {
                return Err(LockError::backend("quickstart", join_error.to_string()));
            }
        }
    }

    let mut intervals = intervals.lock().await.clone();
    intervals.sort();
    let overlaps = intervals
        .windows(2)
        .filter(|pair| pair[1].0 < pair[0].1)
        .count();
    println!(
        "{} critical sections by {WORKERS} workers, overlaps {overlaps}",
        intervals.len()
    );
    Ok(overlaps == 0)
}

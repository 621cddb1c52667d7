//! A contending worker for cross-process tests: `lock-worker <checker-url> <tasks> <sections> <node-url>...`.
//!
//! Each task repeatedly takes the Redlock lock on one key and, inside the critical section,
//! increments an "inside" counter on a separate checker server (anything but 1 is an overlap)
//! and does a non-atomic read-sleep-write on a shared counter (a lost update means two holders).
//! Prints `sections N overlaps M max_acquire_ms X errors E`. With `LOCK_WORKER_SECONDS=S` the
//! tasks stop after S seconds (sections is then an upper bound) and failed acquisitions are
//! counted instead of ending the run; otherwise the first failure ends it with an error.

use std::time::Duration;

use lock_core::{LockOptions, RetryPolicy};
use lock_redlock::{Redlock, RedlockConfig};
use redis::AsyncCommands;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [checker_url, tasks, sections, node_urls @ ..] = args.as_slice() else {
        return Err("usage: lock-worker <checker-url> <tasks> <sections> <node-url>...".into());
    };
    let (tasks, sections): (usize, usize) = (tasks.parse()?, sections.parse()?);
    let config =
        RedlockConfig::new(node_urls.iter().cloned()).with_node_timeout(Duration::from_millis(200));
    let locker = Redlock::locker(config)?.with_options(
        LockOptions::default()
            .with_ttl(Duration::from_secs(5))
            .with_retry(
                RetryPolicy::forever()
                    .with_retry_delay(Duration::from_millis(1))
                    .with_retry_jitter(Duration::from_millis(4))
                    .with_deadline(Duration::from_secs(120)),
            ),
    )?;
    let checker = redis::Client::open(checker_url.as_str())?;
    let run_for = std::env::var("LOCK_WORKER_SECONDS")
        .ok()
        .and_then(|seconds| seconds.parse::<u64>().ok())
        .map(Duration::from_secs);
    let started = std::time::Instant::now();
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (locker, checker) = (locker.clone(), checker.clone());
        handles.push(tokio::spawn(async move {
            let mut con = checker.get_multiplexed_async_connection().await?;
            let (mut done, mut overlaps, mut errors) = (0u64, 0u64, 0u64);
            let mut max_acquire = Duration::ZERO;
            for _ in 0..sections {
                if run_for.is_some_and(|run_for| started.elapsed() >= run_for) {
                    break;
                }
                let asked = std::time::Instant::now();
                let guard = match locker.acquire("cross-process").await {
                    Ok(guard) => guard,
                    Err(error) if run_for.is_some() => {
                        eprintln!("lock-worker: {error}");
                        errors += 1;
                        continue;
                    }
                    Err(error) => return Err(error.into()),
                };
                max_acquire = max_acquire.max(asked.elapsed());
                let inside: i64 = con.incr("inside", 1).await?;
                if inside != 1 {
                    overlaps += 1;
                }
                let seen: i64 = con.get::<_, Option<i64>>("counter").await?.unwrap_or(0);
                tokio::time::sleep(Duration::from_micros(200)).await;
                let _: () = con.set("counter", seen + 1).await?;
                let _: i64 = con.decr("inside", 1).await?;
                done += 1;
                // A release that fails (a node just died) leaves the lock to its ttl: not an error.
                let _ = guard.release().await;
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((done, overlaps, max_acquire, errors))
        }));
    }
    let (mut done, mut overlaps, mut max_acquire, mut errors) = (0, 0, Duration::ZERO, 0);
    for handle in handles {
        let (task_done, task_overlaps, task_max, task_errors) =
            handle.await?.map_err(|e| e.to_string())?;
        done += task_done;
        overlaps += task_overlaps;
        max_acquire = max_acquire.max(task_max);
        errors += task_errors;
    }
    println!(
        "sections {done} overlaps {overlaps} max_acquire_ms {} errors {errors}",
        max_acquire.as_millis()
    );
    Ok(())
}

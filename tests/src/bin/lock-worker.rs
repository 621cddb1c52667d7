//! A contending worker for cross-process tests:
//! `lock-worker [--backend redlock|inc] [--fencing] <checker-url> <tasks> <sections> <node-url>...`.
//!
//! Each task repeatedly takes the lock on one key and, inside the critical section, increments
//! an "inside" counter on a separate checker server (anything but 1 is an overlap), does a
//! non-atomic read-sleep-write on a shared counter (a lost update means two holders) and, when
//! the lock hands out fencing tokens (`inc`, or Redlock with `--fencing`), writes to a fenced
//! resource on the checker that counts writes whose token is not above every earlier one.
//! Prints `sections N overlaps M max_acquire_ms X errors E fenced_writes F stale_writes S`.
//! With `LOCK_WORKER_SECONDS=S` the tasks stop after S seconds (sections is then an upper
//! bound) and failed acquisitions are counted instead of ending the run; otherwise the first
//! failure ends it with an error.

use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_inc::{IncConfig, IncLock};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::workers::FENCED_WRITE;
use redis::AsyncCommands;

const USAGE: &str = "usage: lock-worker [--backend redlock|inc] [--fencing] <checker-url> <tasks> <sections> <node-url>...";

async fn locker(backend: &str, fencing: bool, urls: &[String]) -> Result<Locker, String> {
    let options = LockOptions::default()
        .with_ttl(Duration::from_secs(5))
        .with_retry(
            RetryPolicy::forever()
                .with_retry_delay(Duration::from_millis(1))
                .with_retry_jitter(Duration::from_millis(4))
                .with_deadline(Duration::from_secs(120)),
        );
    let locker = match (backend, urls) {
        ("redlock", _) => Redlock::locker(
            RedlockConfig::new(urls.iter().cloned())
                .with_node_timeout(Duration::from_millis(200))
                .with_fencing(fencing),
        ),
        ("inc", [url]) => IncLock::connect(IncConfig::new(url.clone()))
            .await
            .map(Locker::new),
        ("inc", _) => return Err("inc takes exactly one node URL".to_owned()),
        (other, _) => return Err(format!("unknown backend `{other}`; {USAGE}")),
    };
    locker
        .and_then(|locker| locker.with_options(options))
        .map_err(|e| e.to_string())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut backend = "redlock".to_owned();
    let mut fencing = false;
    loop {
        match args.first().map(String::as_str) {
            Some("--backend") if args.len() > 1 => {
                backend = args.remove(1);
                args.remove(0);
            }
            Some("--fencing") => {
                fencing = true;
                args.remove(0);
            }
            _ => break,
        }
    }
    let [checker_url, tasks, sections, node_urls @ ..] = args.as_slice() else {
        return Err(USAGE.into());
    };
    let (tasks, sections): (usize, usize) = (tasks.parse()?, sections.parse()?);
    let locker = locker(&backend, fencing, node_urls).await?;
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
            let mut tally = [0u64; 5]; // sections, overlaps, errors, fenced, stale
            let mut max_acquire = Duration::ZERO;
            for _ in 0..sections {
                if run_for.is_some_and(|run_for| started.elapsed() >= run_for) {
                    break;
                }
                let asked = std::time::Instant::now();
                let guard = match locker.acquire("cross-process").await {
                    Ok(guard) => guard,
                    Err(error) if run_for.is_some() => {
                        // A few examples are enough (and keep a piped stderr from filling up).
                        if tally[2] < 3 {
                            eprintln!("lock-worker: {error}");
                        }
                        tally[2] += 1;
                        continue;
                    }
                    Err(error) => return Err(error.into()),
                };
                max_acquire = max_acquire.max(asked.elapsed());
                let inside: i64 = con.incr("inside", 1).await?;
                if inside != 1 {
                    tally[1] += 1;
                }
                let seen: i64 = con.get::<_, Option<i64>>("counter").await?.unwrap_or(0);
                tokio::time::sleep(Duration::from_micros(200)).await;
                let _: () = con.set("counter", seen + 1).await?;
                if let Some(fence) = guard.fencing_token() {
                    let accepted: i64 = redis::Script::new(FENCED_WRITE)
                        .key("fence:highest")
                        .key("fence:stale")
                        .arg(fence)
                        .invoke_async(&mut con)
                        .await?;
                    tally[3] += 1;
                    tally[4] += u64::from(accepted == 0);
                }
                let _: i64 = con.decr("inside", 1).await?;
                tally[0] += 1;
                // A release that fails (a node just died) leaves the lock to its ttl: not an error.
                let _ = guard.release().await;
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((tally, max_acquire))
        }));
    }
    let (mut total, mut max_acquire) = ([0u64; 5], Duration::ZERO);
    for handle in handles {
        let (tally, task_max) = handle.await?.map_err(|e| e.to_string())?;
        for (sum, value) in total.iter_mut().zip(tally) {
            *sum += value;
        }
        max_acquire = max_acquire.max(task_max);
    }
    let [done, overlaps, errors, fenced, stale] = total;
    println!(
        "sections {done} overlaps {overlaps} max_acquire_ms {} errors {errors} fenced_writes {fenced} stale_writes {stale}",
        max_acquire.as_millis()
    );
    Ok(())
}

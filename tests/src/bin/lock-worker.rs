//! A contending worker for cross-process tests: `lock-worker <checker-url> <tasks> <sections> <node-url>...`.
//!
//! Each task repeatedly takes the Redlock lock on one key and, inside the critical section,
//! increments an "inside" counter on a separate checker server (anything but 1 is an overlap)
//! and does a non-atomic read-sleep-write on a shared counter (a lost update means two holders).
//! Prints `sections N overlaps M` and exits non-zero on a failure to lock.

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
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (locker, checker) = (locker.clone(), checker.clone());
        handles.push(tokio::spawn(async move {
            let mut con = checker.get_multiplexed_async_connection().await?;
            let mut overlaps = 0u64;
            for _ in 0..sections {
                let guard = locker.acquire("cross-process").await?;
                let inside: i64 = con.incr("inside", 1).await?;
                if inside != 1 {
                    overlaps += 1;
                }
                let seen: i64 = con.get::<_, Option<i64>>("counter").await?.unwrap_or(0);
                tokio::time::sleep(Duration::from_micros(200)).await;
                let _: () = con.set("counter", seen + 1).await?;
                let _: i64 = con.decr("inside", 1).await?;
                guard.release().await?;
            }
            Ok::<u64, Box<dyn std::error::Error + Send + Sync>>(overlaps)
        }));
    }
    let mut overlaps = 0;
    for handle in handles {
        overlaps += handle.await?.map_err(|e| e.to_string())?;
    }
    println!("sections {} overlaps {overlaps}", tasks * sections);
    Ok(())
}

//! Helper for the client wall-clock test: `lock-clock <node-url>...`, meant to run under
//! libfaketime with a timestamp file the test rewrites.
//!
//! Takes a Redlock lock (ttl 5 s), prints `before remaining_ms R wall_ms W`, waits for a line on
//! standard input (the test jumps this process's wall clock meanwhile), then prints
//! `after remaining_ms R elapsed_ms E wall_ms W valid V extended X released Y`: `elapsed_ms` is
//! measured on the monotonic clock, `wall_ms` on the (faked) wall clock.

use std::io::BufRead;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lock_core::{LockOptions, RetryPolicy};
use lock_redlock::{Redlock, RedlockConfig};

fn wall_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let urls: Vec<String> = std::env::args().skip(1).collect();
    if urls.is_empty() {
        return Err("usage: lock-clock <node-url>...".into());
    }
    let locker = Redlock::locker(RedlockConfig::new(urls))?.with_options(
        LockOptions::default()
            .with_ttl(Duration::from_secs(5))
            .with_retry(RetryPolicy::none()),
    )?;
    let mut guard = locker.acquire("wall-clock").await?;
    let started = Instant::now();
    println!(
        "before remaining_ms {} wall_ms {}",
        guard.remaining().as_millis(),
        wall_ms()
    );
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let remaining = guard.remaining();
    let elapsed = started.elapsed();
    let valid = guard.is_valid();
    let extended = guard.extend(Duration::from_secs(5)).await.is_ok();
    let released = guard.release().await.is_ok();
    println!(
        "after remaining_ms {} elapsed_ms {} wall_ms {} valid {valid} extended {extended} released {released}",
        remaining.as_millis(),
        elapsed.as_millis(),
        wall_ms()
    );
    Ok(())
}

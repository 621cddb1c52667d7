//! Lock metrics as Prometheus text: installs the Prometheus exporter's recorder (no HTTP
//! listener: the application serves `handle.render()` on its own endpoint), takes a few locks
//! on the in-memory backend, one of them contended until it times out, and prints what a
//! scrape would return. The metrics are described in `lock_core::metrics`.
//!
//! ```text
//! cargo run -p lock-facade --example prometheus --features metrics
//! ```

use std::process::ExitCode;
use std::time::Duration;

use lock_facade::memory::MemoryLock;
use lock_facade::metrics::{ACQUIRE_ATTEMPTS, ACQUIRE_WAIT_SECONDS};
use lock_facade::{LockOptions, Locker, RetryCount, RetryPolicy};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

fn main() -> ExitCode {
    match scrape() {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Installs the recorder (once per process), takes the locks and renders the text.
pub(crate) fn scrape() -> Result<String, Box<dyn std::error::Error>> {
    let prometheus = PrometheusBuilder::new()
        // Without buckets a histogram is rendered as a summary.
        .set_buckets_for_metric(
            Matcher::Full(ACQUIRE_WAIT_SECONDS.to_owned()),
            &[0.001, 0.01, 0.1, 1.0, 10.0],
        )?
        .set_buckets_for_metric(
            Matcher::Full(ACQUIRE_ATTEMPTS.to_owned()),
            &[1.0, 2.0, 5.0, 10.0, 100.0],
        )?
        .install_recorder()?;
    lock_facade::metrics::describe();
    tokio::runtime::Builder::new_multi_thread()
        .enable_time()
        .build()?
        .block_on(take_a_few_locks())?;
    Ok(prometheus.render())
}

async fn take_a_few_locks() -> lock_facade::Result<()> {
    let locker = Locker::new(MemoryLock::new())
        .with_namespace(Some("example"))?
        .with_options(LockOptions::default().with_ttl(Duration::from_secs(5)))?;
    let report = locker.acquire("report").await?;
    // Held: two retries 10 ms apart, then `timeout` (memory lines waiters up: this one asks
    // first and at the end of its policy, woken by its turn otherwise).
    let impatient = LockOptions::default().with_retry(
        RetryPolicy::default()
            .with_retry_count(RetryCount::Limited(2))
            .with_retry_delay(Duration::from_millis(10))
            .with_retry_jitter(Duration::ZERO),
    );
    let contended = locker.acquire_with("report", &impatient).await;
    assert!(contended.is_err(), "the key was held");
    let mut invoice = locker.acquire("invoice").await?;
    invoice.keep_alive()?;
    report.release().await?;
    invoice.release().await?;
    // Dropped, not released: counted down all the same.
    drop(locker.acquire("audit").await?);
    Ok(())
}

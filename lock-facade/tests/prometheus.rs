//! The `prometheus` example runs and renders the lock metrics as Prometheus text, with the
//! figures of what it did.
#![allow(clippy::unwrap_used)]

#[path = "../examples/prometheus.rs"]
#[allow(dead_code)] // its `main`
mod example;

#[test]
fn the_prometheus_example_renders_the_lock_metrics() {
    let text = example::scrape().unwrap();
    println!("{text}");
    for line in [
        "# TYPE lock_acquire_wait_seconds histogram",
        "# HELP lock_acquire_wait_seconds How long each lock acquisition call took, by outcome.",
        // Three acquisitions (report, invoice, audit) at once; one timed out after 2 attempts
        // (a waiter in memory's line lets the short delays pass, woken by its turn, and makes
        // the first attempt and the last its policy allows).
        "lock_acquire_wait_seconds_count{backend=\"memory\",outcome=\"acquired\"} 3",
        "lock_acquire_wait_seconds_count{backend=\"memory\",outcome=\"timeout\"} 1",
        "lock_acquire_attempts_bucket{backend=\"memory\",outcome=\"acquired\",le=\"1\"} 3",
        "lock_acquire_attempts_bucket{backend=\"memory\",outcome=\"timeout\",le=\"1\"} 0",
        "lock_acquire_attempts_bucket{backend=\"memory\",outcome=\"timeout\",le=\"2\"} 1",
        "lock_acquire_attempts_sum{backend=\"memory\",outcome=\"timeout\"} 2",
        "# TYPE lock_held gauge",
        "lock_held{backend=\"memory\"} 0",
    ] {
        assert!(
            text.lines().any(|rendered| rendered == line),
            "missing line `{line}` in:\n{text}"
        );
    }
    assert!(!text.contains("example:"), "a key leaked into the labels");
}

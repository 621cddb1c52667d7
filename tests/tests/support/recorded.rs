//! The metrics a test binary recorded: one debugging recorder per process, its figures summed
//! over snapshots. Shared by the test files that read metrics (`#[path]`-included).

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

/// The process's recorder and every counter and gauge it saw, summed over snapshots (the
/// debugging recorder resets them at each one), by `name{label=value,...}` with the labels
/// sorted.
pub(crate) fn figures() -> BTreeMap<String, f64> {
    static RECORDED: OnceLock<(Snapshotter, Mutex<BTreeMap<String, f64>>)> = OnceLock::new();
    let (snapshotter, figures) = RECORDED.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("the only recorder of this test binary");
        (snapshotter, Mutex::default())
    });
    let mut figures = figures
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let mut labels: Vec<String> = key
            .key()
            .labels()
            .map(|label| format!("{}={}", label.key(), label.value()))
            .collect();
        labels.sort();
        let name = format!("{}{{{}}}", key.key().name(), labels.join(","));
        #[allow(clippy::cast_precision_loss)]
        let value = match value {
            DebugValue::Counter(value) => value as f64,
            DebugValue::Gauge(value) => value.0,
            DebugValue::Histogram(values) => values.len() as f64,
        };
        *figures.entry(name).or_default() += value;
    }
    figures.clone()
}

/// Held for the whole of a test whose figures must be its own: the metrics are the process's,
/// and a test beside it would move the same gauges.
#[allow(dead_code)]
pub(crate) async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    ALONE.lock().await
}

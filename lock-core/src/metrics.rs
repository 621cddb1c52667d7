//! What locks report to a metrics recorder.
//!
#![doc = include_str!("metrics.md")]
//!
//! Backends record only what the core cannot see, their background re-sends, through
//! [`FollowUp`](crate::raw::FollowUp) (which calls [`resent`]); everything else is recorded
//! once, by [`Locker`](crate::Locker), [`LockGuard`](crate::LockGuard) and the watchdog.

use crate::error::{LockError, Result};

/// Histogram, seconds: how long each acquisition call took. Labels `backend`, `outcome`.
pub const ACQUIRE_WAIT_SECONDS: &str = "lock_acquire_wait_seconds";
/// Histogram: attempts each acquisition call made. Labels `backend`, `outcome`.
pub const ACQUIRE_ATTEMPTS: &str = "lock_acquire_attempts";
/// Gauge: locks held by guards of this process. Label `backend`.
pub const HELD: &str = "lock_held";
/// Counter: extends tried that failed. Labels `backend`, `reason`.
pub const EXTEND_FAILURES: &str = "lock_extend_failures_total";
/// Counter: held locks found lost. Labels `backend`, `found_by`.
pub const LOST: &str = "lock_lost_total";
/// Counter: messages sent again in the background to a node that missed them. Labels
/// `backend`, `operation`.
pub const RESENDS: &str = "lock_resends_total";

/// The `operation` label of [`RESENDS`] for releases, clean-ups and undos.
pub const OPERATION_RELEASE: &str = "release";
/// The `operation` label of [`RESENDS`] for Redlock's fencing counter raises.
pub const OPERATION_FENCE_RAISE: &str = "fence_raise";

/// Gives the installed recorder the unit and help text of every metric above (a Prometheus
/// exporter prints them as `# HELP` lines). Call it once after installing the recorder; a
/// no-op without the `metrics` feature.
pub fn describe() {
    #[cfg(feature = "metrics")]
    {
        use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
        describe_histogram!(
            ACQUIRE_WAIT_SECONDS,
            Unit::Seconds,
            "How long each lock acquisition call took, by outcome."
        );
        describe_histogram!(
            ACQUIRE_ATTEMPTS,
            Unit::Count,
            "Attempts each lock acquisition call made, by outcome."
        );
        describe_gauge!(HELD, Unit::Count, "Locks held by guards of this process.");
        describe_counter!(
            EXTEND_FAILURES,
            Unit::Count,
            "Lock extends tried that failed, by reason."
        );
        describe_counter!(
            LOST,
            Unit::Count,
            "Held locks found lost, by what found it."
        );
        describe_counter!(
            RESENDS,
            Unit::Count,
            "Messages a backend sent again in the background to a node that missed them."
        );
    }
}

/// Counts `messages` sent again by `backend` (its [`Lock::name`](crate::raw::Lock::name)) to nodes
/// that missed an `operation` ([`OPERATION_RELEASE`] or [`OPERATION_FENCE_RAISE`]): for backend
/// authors. A no-op without the `metrics` feature.
pub fn resent(backend: &'static str, operation: &'static str, messages: u64) {
    #[cfg(feature = "metrics")]
    ::metrics::counter!(RESENDS, "backend" => backend, "operation" => operation)
        .increment(messages);
    #[cfg(not(feature = "metrics"))]
    let _ = (backend, operation, messages);
}

/// The `reason` label of a failed extend; `None` for one the backend does not support.
fn extend_failure_reason(error: &LockError) -> Option<&'static str> {
    match error {
        LockError::Unsupported { .. } => None,
        LockError::NotHeld { .. } => Some("not_held"),
        LockError::Stopped => Some("stopped"),
        _ => Some("error"),
    }
}

/// Counts a failed extend of a lock of `backend`.
pub(crate) fn extend_failed(backend: &'static str, error: &LockError) {
    let Some(reason) = extend_failure_reason(error) else {
        return;
    };
    #[cfg(feature = "metrics")]
    ::metrics::counter!(EXTEND_FAILURES, "backend" => backend, "reason" => reason).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (backend, reason);
}

/// One acquisition call: its attempts, and on its end (or its drop) its wait and outcome.
pub(crate) struct Acquisition {
    #[cfg(feature = "metrics")]
    recorded: Option<recorded::Acquisition>,
}

impl Acquisition {
    /// Starts timing an acquisition on `backend`.
    #[inline]
    pub(crate) fn start(backend: &'static str) -> Self {
        #[cfg(not(feature = "metrics"))]
        let _ = backend;
        Self {
            #[cfg(feature = "metrics")]
            recorded: Some(recorded::Acquisition::start(backend)),
        }
    }

    /// Counts one attempt.
    pub(crate) fn attempt(&mut self) {
        #[cfg(feature = "metrics")]
        if let Some(recorded) = &mut self.recorded {
            recorded.attempts += 1;
        }
    }

    /// Records the wait and attempts under the outcome of `result`.
    pub(crate) fn finish<T>(mut self, result: &Result<T>) {
        #[cfg(feature = "metrics")]
        if let Some(recorded) = self.recorded.take() {
            recorded.record(match result {
                Ok(_) => "acquired",
                Err(LockError::Locked { .. }) => "locked",
                Err(LockError::Timeout { .. }) => "timeout",
                Err(_) => "error",
            });
        }
        #[cfg(not(feature = "metrics"))]
        let _ = (&mut self, result);
    }
}

#[cfg(feature = "metrics")]
impl Drop for Acquisition {
    fn drop(&mut self) {
        // Not finished: the future was dropped while it waited.
        if let Some(recorded) = self.recorded.take() {
            recorded.record("cancelled");
        }
    }
}

/// The `held` gauge's share of one guard: counted up when made, down exactly once (the first of
/// a release, a loss found, or the drop of the last owner that can end it).
pub(crate) struct Held {
    #[cfg(feature = "metrics")]
    state: Option<std::sync::Arc<recorded::Held>>,
}

impl Held {
    /// Counts one more lock held by `backend`.
    pub(crate) fn start(backend: &'static str) -> Self {
        #[cfg(not(feature = "metrics"))]
        let _ = backend;
        Self {
            #[cfg(feature = "metrics")]
            state: Some(std::sync::Arc::new(recorded::Held::start(backend))),
        }
    }

    /// Moves the share out (to a task that releases the lock), leaving one that counts nothing.
    #[inline]
    pub(crate) fn take(&mut self) -> Self {
        Self {
            #[cfg(feature = "metrics")]
            state: self.state.take(),
        }
    }

    /// A handle for the watchdog: it can report the lock lost, never end it otherwise.
    pub(crate) fn watch(&self) -> HeldWatch {
        HeldWatch {
            #[cfg(feature = "metrics")]
            state: self.state.clone(),
        }
    }

    /// The lock was released with `result`: a `NotHeld` means it had been lost.
    #[inline]
    pub(crate) fn released(self, result: &Result<()>) {
        #[cfg(feature = "metrics")]
        if let (Some(state), Err(LockError::NotHeld { .. })) = (&self.state, result) {
            state.lost("release");
        }
        #[cfg(not(feature = "metrics"))]
        let _ = result;
        // Otherwise the drop ends the share.
    }

    /// An extend by hand failed with `error`: counted, and a `NotHeld`, or an answer that came
    /// back after the ttl was spent (`late`), means the lock is lost.
    pub(crate) fn extend_failed(&self, backend: &'static str, error: &LockError, late: bool) {
        extend_failed(backend, error);
        #[cfg(feature = "metrics")]
        if let Some(state) = &self.state
            && (late || matches!(error, LockError::NotHeld { .. }))
        {
            state.lost("extend");
        }
        #[cfg(not(feature = "metrics"))]
        let _ = late;
    }
}

#[cfg(feature = "metrics")]
impl Drop for Held {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            state.end();
        }
    }
}

/// What the watchdog may do with a guard's share of the `held` gauge.
pub(crate) struct HeldWatch {
    #[cfg(feature = "metrics")]
    state: Option<std::sync::Arc<recorded::Held>>,
}

impl HeldWatch {
    /// The watchdog found the lock lost.
    pub(crate) fn lost(&self) {
        #[cfg(feature = "metrics")]
        if let Some(state) = &self.state {
            state.lost("watchdog");
        }
    }
}

#[cfg(feature = "metrics")]
mod recorded {
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::time::Instant;

    use super::{ACQUIRE_ATTEMPTS, ACQUIRE_WAIT_SECONDS, HELD, LOST};

    pub(super) struct Acquisition {
        backend: &'static str,
        started: Instant,
        pub(super) attempts: u32,
    }

    impl Acquisition {
        pub(super) fn start(backend: &'static str) -> Self {
            Self {
                backend,
                started: Instant::now(),
                attempts: 0,
            }
        }

        pub(super) fn record(self, outcome: &'static str) {
            let backend = self.backend;
            ::metrics::histogram!(ACQUIRE_WAIT_SECONDS, "backend" => backend, "outcome" => outcome)
                .record(self.started.elapsed().as_secs_f64());
            ::metrics::histogram!(ACQUIRE_ATTEMPTS, "backend" => backend, "outcome" => outcome)
                .record(f64::from(self.attempts));
        }
    }

    pub(super) struct Held {
        backend: &'static str,
        /// The handle the lock was counted up on: it is counted down on the same one, whatever
        /// recorder is current where that happens.
        gauge: ::metrics::Gauge,
        ended: AtomicBool,
    }

    impl Held {
        pub(super) fn start(backend: &'static str) -> Self {
            let gauge = ::metrics::gauge!(HELD, "backend" => backend);
            gauge.increment(1.0);
            Self {
                backend,
                gauge,
                ended: AtomicBool::new(false),
            }
        }

        /// Counts the lock down, once; true for the call that did.
        pub(super) fn end(&self) -> bool {
            if self.ended.swap(true, Ordering::AcqRel) {
                return false;
            }
            self.gauge.decrement(1.0);
            true
        }

        /// Counts the lock down and lost, unless it was already counted down.
        pub(super) fn lost(&self, found_by: &'static str) {
            if self.end() {
                ::metrics::counter!(LOST, "backend" => self.backend, "found_by" => found_by)
                    .increment(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's "Metrics" section carries the same table as these docs, and the table
    /// names every metric.
    #[test]
    fn the_readme_and_the_module_docs_share_one_table() {
        let docs = include_str!("metrics.md");
        let readme = include_str!("../README.md");
        let table: String = docs
            .lines()
            .filter(|line| line.starts_with('|'))
            .map(|line| format!("{line}\n"))
            .collect();
        assert!(table.lines().count() > 2, "no table in metrics.md");
        assert!(
            readme.contains(&table),
            "README.md's Metrics table differs from src/metrics.md"
        );
        for name in [
            ACQUIRE_WAIT_SECONDS,
            ACQUIRE_ATTEMPTS,
            HELD,
            EXTEND_FAILURES,
            LOST,
            RESENDS,
        ] {
            assert!(
                table.contains(&format!("| `{name}` |")),
                "{name} is not in the table"
            );
        }
    }

    #[test]
    fn an_unsupported_extend_is_not_a_failure() {
        let unsupported = LockError::Unsupported {
            backend: "x",
            capability: "extend",
        };
        assert_eq!(extend_failure_reason(&unsupported), None);
        assert_eq!(
            extend_failure_reason(&LockError::NotHeld { key: "k".into() }),
            Some("not_held")
        );
        assert_eq!(extend_failure_reason(&LockError::Stopped), Some("stopped"));
        assert_eq!(
            extend_failure_reason(&LockError::backend("x", "down")),
            Some("error")
        );
    }
}

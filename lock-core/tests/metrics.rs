//! The metrics of `lock_core::metrics`, exactly: each scenario runs on a paused current-thread
//! runtime under a recorder of its own (`metrics::with_local_recorder`, so tests running side
//! by side do not see each other's figures), and every figure recorded is compared, labels
//! included. Above all, the `lock_held` gauge comes back to exactly 0 whatever ends a lock.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use lock_core::{
    Capabilities, Handle, Key, Lock, LockError, LockOptions, LockRequest, Locker, Result,
    RetryCount, RetryPolicy, Token, async_trait,
};
use lock_memory::MemoryLock;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

const MS: Duration = Duration::from_millis(1);

/// Everything recorded so far, by metric and labels (`name{label=value,...}`, labels sorted).
///
/// The debugging recorder hands out what changed since its last snapshot (counters and gauges
/// are reset, histograms drained), so the figures are summed over snapshots: a gauge moved
/// only by increments and decrements adds up to its value.
#[derive(Default)]
struct Figures {
    counters: BTreeMap<String, u64>,
    gauges: BTreeMap<String, f64>,
    histograms: BTreeMap<String, Vec<f64>>,
}

struct Recorded {
    snapshotter: Snapshotter,
    figures: std::cell::RefCell<Figures>,
}

impl Recorded {
    fn take(&self) -> std::cell::RefMut<'_, Figures> {
        let mut figures = self.figures.borrow_mut();
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            let mut labels: Vec<String> = key
                .key()
                .labels()
                .map(|label| format!("{}={}", label.key(), label.value()))
                .collect();
            labels.sort();
            let name = format!("{}{{{}}}", key.key().name(), labels.join(","));
            match value {
                DebugValue::Counter(value) => *figures.counters.entry(name).or_default() += value,
                DebugValue::Gauge(value) => *figures.gauges.entry(name).or_default() += value.0,
                DebugValue::Histogram(values) => figures
                    .histograms
                    .entry(name)
                    .or_default()
                    .extend(values.into_iter().map(|value| value.0)),
            }
        }
        figures
    }

    /// The `lock_held` gauge of `backend` now.
    fn held(&self, backend: &str) -> f64 {
        self.take()
            .gauges
            .get(&format!("lock_held{{backend={backend}}}"))
            .copied()
            .unwrap_or_default()
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        self.take().counters.clone()
    }

    fn histograms(&self) -> BTreeMap<String, Vec<f64>> {
        self.take().histograms.clone()
    }
}

/// Runs `scenario` on a paused current-thread runtime (so spawned releases and the watchdog
/// record under the same recorder), then drops the runtime, and returns what was recorded.
/// The scenario gets the recorder to look at figures on the way.
fn run<F, Fut>(scenario: F) -> Recorded
where
    F: FnOnce(&'static Recorded) -> Fut,
    Fut: Future<Output = ()>,
{
    let recorder = DebuggingRecorder::new();
    let recorded: &'static Recorded = Box::leak(Box::new(Recorded {
        snapshotter: recorder.snapshotter(),
        figures: std::cell::RefCell::default(),
    }));
    metrics::with_local_recorder(&recorder, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(scenario(recorded));
        drop(runtime);
    });
    Recorded {
        snapshotter: recorded.snapshotter.clone(),
        figures: std::cell::RefCell::new(std::mem::take(&mut *recorded.take())),
    }
}

fn options(ttl: Duration) -> LockOptions {
    LockOptions::default().with_ttl(ttl)
}

/// A constant 100 ms between attempts, no jitter, no deadline.
fn every_100ms() -> RetryPolicy {
    RetryPolicy::forever()
        .with_retry_delay(100 * MS)
        .with_retry_jitter(Duration::ZERO)
        .with_backoff_factor(1.0)
}

fn memory_locker() -> Locker {
    Locker::new(MemoryLock::new())
        .with_options(options(Duration::from_secs(1)))
        .unwrap()
}

fn counters(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

fn histograms(pairs: &[(&str, &[f64])]) -> BTreeMap<String, Vec<f64>> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
        .collect()
}

/// The scripted sequence: two uncontended acquisitions and one contended that times out, an
/// extend that fails after expiry, a lock lost under `keep_alive`, releases and a dropped guard.
#[test]
fn a_scripted_sequence_records_exact_figures() {
    let recorded = run(|recorded| async move {
        let locker = memory_locker();
        let first = locker.acquire("a").await.unwrap();
        // Contended: 3 attempts (at 0, 100 and 200 ms), then the 2 retries are spent.
        let contended = locker
            .acquire_with(
                "a",
                &options(Duration::from_secs(1))
                    .with_retry(every_100ms().with_retry_count(RetryCount::Limited(2))),
            )
            .await;
        assert!(
            matches!(contended, Err(LockError::Timeout { attempts: 3, .. })),
            "{contended:?}"
        );
        let mut short = locker.acquire_with("b", &options(100 * MS)).await.unwrap();
        assert_eq!(recorded.held("memory"), 2.0);
        tokio::time::sleep(200 * MS).await;
        // Past its validity: refused, counted failed and lost, and the gauge goes down now.
        let extended = short.extend(Duration::from_secs(1)).await;
        assert!(
            matches!(extended, Err(LockError::NotHeld { .. })),
            "{extended:?}"
        );
        assert_eq!(recorded.held("memory"), 1.0);
        // Its release finds it not held: not counted lost twice.
        let released = short.release().await;
        assert!(
            matches!(released, Err(LockError::NotHeld { .. })),
            "{released:?}"
        );

        // Lost under keep_alive: purged, so the watchdog's extend (at 200 of 300 ms) fails.
        let mut watched = locker
            .acquire_with("lost", &options(300 * MS))
            .await
            .unwrap();
        let lost = watched.keep_alive().unwrap();
        assert_eq!(locker.purge("lost").await.unwrap(), 1);
        lost.lost().await;
        assert_eq!(recorded.held("memory"), 1.0);
        let released = watched.release().await;
        assert!(
            matches!(released, Err(LockError::NotHeld { .. })),
            "{released:?}"
        );

        drop(first);
        assert_eq!(recorded.held("memory"), 0.0);
    });
    assert_eq!(recorded.held("memory"), 0.0);
    assert_eq!(
        recorded.counters(),
        counters(&[
            (
                "lock_extend_failures_total{backend=memory,reason=not_held}",
                2
            ),
            ("lock_lost_total{backend=memory,found_by=extend}", 1),
            ("lock_lost_total{backend=memory,found_by=watchdog}", 1),
        ])
    );
    assert_eq!(
        recorded.histograms(),
        histograms(&[
            (
                "lock_acquire_attempts{backend=memory,outcome=acquired}",
                &[1.0, 1.0, 1.0]
            ),
            (
                "lock_acquire_attempts{backend=memory,outcome=timeout}",
                &[3.0]
            ),
            (
                "lock_acquire_wait_seconds{backend=memory,outcome=acquired}",
                &[0.0, 0.0, 0.0]
            ),
            (
                "lock_acquire_wait_seconds{backend=memory,outcome=timeout}",
                &[0.2]
            ),
        ])
    );
}

/// `try_acquire` on a held key is `locked`; an expired guard's release is `lost` by release;
/// `with_lock` counts its lock up and down.
#[test]
fn single_attempts_expired_releases_and_with_lock() {
    let recorded = run(|_| async move {
        let locker = memory_locker();
        let holder = locker.acquire_with("k", &options(100 * MS)).await.unwrap();
        assert!(locker.try_acquire("k").await.unwrap().is_none());
        tokio::time::sleep(150 * MS).await;
        let released = holder.release().await;
        assert!(
            matches!(released, Err(LockError::NotHeld { .. })),
            "{released:?}"
        );
        let value = locker.with_lock("w", |_| async { 7 }).await.unwrap();
        assert_eq!(value, 7);
    });
    assert_eq!(recorded.held("memory"), 0.0);
    assert_eq!(
        recorded.counters(),
        counters(&[("lock_lost_total{backend=memory,found_by=release}", 1)])
    );
    assert_eq!(
        recorded.histograms(),
        histograms(&[
            (
                "lock_acquire_attempts{backend=memory,outcome=acquired}",
                &[1.0, 1.0]
            ),
            (
                "lock_acquire_attempts{backend=memory,outcome=locked}",
                &[1.0]
            ),
            (
                "lock_acquire_wait_seconds{backend=memory,outcome=acquired}",
                &[0.0, 0.0]
            ),
            (
                "lock_acquire_wait_seconds{backend=memory,outcome=locked}",
                &[0.0]
            ),
        ])
    );
}

/// An acquisition dropped while it waits is recorded once, as `cancelled`, with the attempts
/// made and the time waited; it leaves the gauge alone.
#[test]
fn a_cancelled_acquisition_is_recorded_once() {
    let recorded = run(|recorded| async move {
        let locker = memory_locker();
        let holder = locker.acquire("a").await.unwrap();
        let forever = options(Duration::from_secs(1)).with_retry(every_100ms());
        let waiting = locker.acquire_with("a", &forever);
        // Attempts at 0, 100 and 200 ms; dropped at 250 ms.
        assert!(tokio::time::timeout(250 * MS, waiting).await.is_err());
        assert_eq!(recorded.held("memory"), 1.0);
        holder.release().await.unwrap();
    });
    assert_eq!(recorded.held("memory"), 0.0);
    assert_eq!(recorded.counters(), BTreeMap::new());
    assert_eq!(
        recorded.histograms(),
        histograms(&[
            (
                "lock_acquire_attempts{backend=memory,outcome=acquired}",
                &[1.0]
            ),
            (
                "lock_acquire_attempts{backend=memory,outcome=cancelled}",
                &[3.0]
            ),
            (
                "lock_acquire_wait_seconds{backend=memory,outcome=acquired}",
                &[0.0]
            ),
            (
                "lock_acquire_wait_seconds{backend=memory,outcome=cancelled}",
                &[0.25]
            ),
        ])
    );
}

/// Guards dropped in every way: plain and kept alive, inside the runtime, outside any runtime,
/// and with a spawned release that the runtime drops before it runs.
#[test]
fn every_dropped_guard_counts_down_once() {
    let recorded = run(|recorded| async move {
        let locker = memory_locker();
        // Inside the runtime: a plain guard and a kept-alive one both release at once on a
        // store that answers without awaiting.
        drop(locker.acquire("plain").await.unwrap());
        let mut watched = locker.acquire("watched").await.unwrap();
        watched.keep_alive().unwrap();
        drop(watched);
        assert_eq!(
            recorded.held("memory"),
            0.0,
            "a kept-alive memory guard is released at once on drop"
        );
        tokio::time::sleep(MS).await;
        assert_eq!(recorded.held("memory"), 0.0, "and counted down once");
        // Lost under the watchdog, then dropped.
        let mut lost = locker
            .acquire_with("lost", &options(300 * MS))
            .await
            .unwrap();
        let signal = lost.keep_alive().unwrap();
        locker.purge("lost").await.unwrap();
        signal.lost().await;
        drop(lost);
        tokio::time::sleep(MS).await;
        assert_eq!(recorded.held("memory"), 0.0);
        // Dropped with a release spawned that never runs (a store that answers only by
        // awaiting): the runtime ends right after.
        let awaiting = Locker::new(Flaky::new(Extends::Fails));
        let mut last = awaiting.acquire("last").await.unwrap();
        last.keep_alive().unwrap();
        drop(last);
        assert_eq!(recorded.held("flaky"), 1.0);
    });
    assert_eq!(recorded.held("memory"), 0.0);
    assert_eq!(
        recorded.held("flaky"),
        0.0,
        "the dropped task counted it down"
    );
    assert_eq!(
        recorded.counters(),
        counters(&[
            (
                "lock_extend_failures_total{backend=memory,reason=not_held}",
                1
            ),
            ("lock_lost_total{backend=memory,found_by=watchdog}", 1),
        ])
    );

    // Outside any runtime.
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let recorded = Recorded {
        snapshotter,
        figures: std::cell::RefCell::default(),
    };
    metrics::with_local_recorder(&recorder, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let (plain, watched) = runtime.block_on(async {
            let locker = memory_locker();
            let plain = locker.acquire("plain").await.unwrap();
            let mut watched = locker.acquire("watched").await.unwrap();
            watched.keep_alive().unwrap();
            (plain, watched)
        });
        assert_eq!(recorded.held("memory"), 2.0);
        drop(runtime);
        drop(plain);
        drop(watched);
    });
    assert_eq!(recorded.held("memory"), 0.0);
    assert_eq!(recorded.counters(), BTreeMap::new());
}

/// A release that fails (an I/O error, not `NotHeld`) counts the lock down, not lost, whether
/// explicit or on drop; an extend that fails with an I/O error is counted as `error`. The
/// label is the backend's `Lock::name`.
#[test]
fn failed_releases_and_extends_count_down_without_a_loss() {
    let recorded = run(|recorded| async move {
        let locker = Locker::new(Flaky::new(Extends::Fails));
        let mut first = locker.acquire("a").await.unwrap();
        let extended = first.extend(Duration::from_secs(1)).await;
        assert!(
            matches!(extended, Err(LockError::Backend { .. })),
            "{extended:?}"
        );
        let released = first.release().await;
        assert!(
            matches!(released, Err(LockError::Backend { .. })),
            "{released:?}"
        );
        drop(locker.acquire("b").await.unwrap());
        assert_eq!(
            recorded.held("flaky"),
            1.0,
            "before the spawned release ran"
        );
        tokio::time::sleep(MS).await;
    });
    assert_eq!(recorded.held("flaky"), 0.0);
    assert_eq!(
        recorded.counters(),
        counters(&[("lock_extend_failures_total{backend=flaky,reason=error}", 1)])
    );
    assert_eq!(
        recorded.histograms(),
        histograms(&[
            (
                "lock_acquire_attempts{backend=flaky,outcome=acquired}",
                &[1.0, 1.0]
            ),
            (
                "lock_acquire_wait_seconds{backend=flaky,outcome=acquired}",
                &[0.0, 0.0]
            ),
        ])
    );
}

/// A backend that cannot extend: the watchdog tries once, then reports the loss when the
/// validity lapses; the unsupported extend is not a failure, the loss is counted once.
#[test]
fn a_lock_that_cannot_be_extended_is_lost_when_its_validity_lapses() {
    let recorded = run(|recorded| async move {
        let locker = Locker::new(Flaky::new(Extends::Unsupported))
            .with_options(options(300 * MS))
            .unwrap();
        let mut guard = locker.acquire("a").await.unwrap();
        let lost = guard.keep_alive().unwrap();
        lost.lost().await;
        assert_eq!(recorded.held("flaky"), 0.0);
        drop(guard);
        tokio::time::sleep(MS).await;
    });
    assert_eq!(recorded.held("flaky"), 0.0);
    assert_eq!(
        recorded.counters(),
        counters(&[("lock_lost_total{backend=flaky,found_by=watchdog}", 1)])
    );
}

/// An acquisition cancelled while its attempt is in flight (the store never answers): recorded
/// as `cancelled` after one attempt; nothing was held.
#[test]
fn an_acquisition_cancelled_during_its_attempt_is_recorded_once() {
    let recorded = run(|_| async move {
        let locker = Locker::new(Flaky::new(Extends::Fails).stalled());
        let waiting = locker.acquire("a");
        assert!(tokio::time::timeout(100 * MS, waiting).await.is_err());
        locker.stop().await.unwrap();
    });
    assert_eq!(recorded.held("flaky"), 0.0);
    assert_eq!(
        recorded.histograms(),
        histograms(&[
            (
                "lock_acquire_attempts{backend=flaky,outcome=cancelled}",
                &[1.0]
            ),
            (
                "lock_acquire_wait_seconds{backend=flaky,outcome=cancelled}",
                &[0.1]
            ),
        ])
    );
}

/// What the extends of [`Flaky`] do.
#[derive(Clone, Copy, Debug)]
enum Extends {
    /// Fail with an I/O error.
    Fails,
    /// Are not supported.
    Unsupported,
}

/// Memory whose releases fail with an I/O error, answering only by awaiting; a stalled one
/// never answers an attempt.
#[derive(Debug)]
struct Flaky {
    lock: MemoryLock,
    extends: Extends,
    stalled: bool,
}

impl Flaky {
    fn new(extends: Extends) -> Self {
        Self {
            lock: MemoryLock::new(),
            extends,
            stalled: false,
        }
    }

    fn stalled(self) -> Self {
        Self {
            stalled: true,
            ..self
        }
    }
}

#[derive(Debug)]
struct FlakyHandle(Box<dyn Handle>, Extends);

#[async_trait]
impl Lock for Flaky {
    fn name(&self) -> &'static str {
        "flaky"
    }

    fn capabilities(&self) -> Capabilities {
        match self.extends {
            Extends::Fails => Capabilities::NONE.with_extend(),
            Extends::Unsupported => Capabilities::NONE,
        }
    }

    async fn try_acquire(&self, request: &LockRequest) -> Result<Option<Box<dyn Handle>>> {
        if self.stalled {
            std::future::pending::<()>().await;
        }
        let extends = self.extends;
        Ok(self
            .lock
            .try_acquire(request)
            .await?
            .map(|handle| Box::new(FlakyHandle(handle, extends)) as Box<dyn Handle>))
    }

    async fn abandon(&self, request: &LockRequest) -> Result<bool> {
        self.lock.abandon(request).await
    }
}

#[async_trait]
impl Handle for FlakyHandle {
    fn keys(&self) -> &[Key] {
        self.0.keys()
    }

    fn token(&self) -> &Token {
        self.0.token()
    }

    fn valid_until(&self) -> tokio::time::Instant {
        self.0.valid_until()
    }

    async fn extend(&mut self, _ttl: Duration) -> Result<()> {
        match self.1 {
            Extends::Fails => Err(LockError::backend("flaky", "extend not answered")),
            Extends::Unsupported => Err(LockError::Unsupported {
                backend: "flaky",
                capability: "extend",
            }),
        }
    }

    async fn release(&mut self) -> Result<()> {
        Err(LockError::backend("flaky", "release not answered"))
    }
}

/// Every acquisition call is recorded, bad input included: a call refused before any attempt
/// (an empty key, a repeated key, bad options, zero permits, a kind the backend does not serve,
/// a stopped client) is an `error` with 0 attempts, whichever entry it came through.
#[test]
fn acquisitions_refused_for_bad_input_are_recorded_as_errors() {
    let recorded = run(|_| async move {
        let locker = memory_locker();
        let bad_options = options(Duration::ZERO);
        let refused = [
            locker.acquire("").await.err(),
            locker.acquire_with("k", &bad_options).await.err(),
            locker.acquire_permit("k", 0).await.err(),
            locker.acquire_many(&["a", "a"]).await.err(),
            locker.try_acquire("").await.err(),
            locker.with_lock("", |_| async {}).await.err(),
            Locker::new(Flaky::new(Extends::Fails))
                .acquire_read("k")
                .await
                .err(),
        ];
        for error in refused {
            assert!(
                matches!(
                    error,
                    Some(LockError::InvalidInput { .. } | LockError::Unsupported { .. })
                ),
                "{error:?}"
            );
        }
    });
    assert_eq!(
        recorded.histograms(),
        histograms(&[
            (
                "lock_acquire_attempts{backend=flaky,outcome=error}",
                &[0.0]
            ),
            (
                "lock_acquire_attempts{backend=memory,outcome=error}",
                &[0.0; 6]
            ),
            (
                "lock_acquire_wait_seconds{backend=flaky,outcome=error}",
                &[0.0]
            ),
            (
                "lock_acquire_wait_seconds{backend=memory,outcome=error}",
                &[0.0; 6]
            ),
        ])
    );
}

/// A single attempt bounded by a deadline that the store does not answer in time gave up
/// because the deadline ran out: `timeout`, not `locked` (nobody was found holding the key).
#[test]
fn a_single_attempt_cut_short_by_the_deadline_is_a_timeout() {
    let recorded = run(|_| async move {
        let locker = Locker::new(Flaky::new(Extends::Fails).stalled());
        let once = options(Duration::from_secs(1))
            .with_retry(RetryPolicy::none().with_deadline(50 * MS));
        let result = locker.acquire_with("a", &once).await;
        assert!(
            matches!(result, Err(LockError::Timeout { attempts: 1, .. })),
            "{result:?}"
        );
        locker.stop().await.unwrap();
    });
    assert_eq!(
        recorded.histograms(),
        histograms(&[
            (
                "lock_acquire_attempts{backend=flaky,outcome=timeout}",
                &[1.0]
            ),
            (
                "lock_acquire_wait_seconds{backend=flaky,outcome=timeout}",
                &[0.05]
            ),
        ])
    );
}

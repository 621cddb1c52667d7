//! The metrics of `lock_core::metrics`, exactly: each scenario runs on a paused current-thread
//! runtime under a recorder of its own (`metrics::with_local_recorder`, so tests running side
//! by side do not see each other's figures), and every figure recorded is compared, labels
//! included. Above all, the `lock_held` gauge comes back to exactly 0 whatever ends a lock.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use lock_core::{
    Capabilities, Lease, LockError, LockOptions, Locker, Result, RetryCount, RetryPolicy,
    raw::{Handle, Lock, LockRequest, async_trait},
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
        // Contended: memory lines waiters up (`Capabilities::fair`): the waiter is woken by its
        // turn, so it lets the short delays pass without asking and makes the first attempt
        // and the last its policy allows (at 0 and 200 ms), then the 2 retries are spent.
        let contended = locker
            .acquire_with(
                "a",
                &options(Duration::from_secs(1))
                    .with_retry(every_100ms().with_retry_count(RetryCount::Limited(2))),
            )
            .await;
        assert!(
            matches!(contended, Err(LockError::Timeout { attempts: 2, .. })),
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
                &[2.0]
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
        // A waiter in memory's line asks at 0 ms, then at its poll (200 ms: woken by its turn
        // otherwise); dropped at 250 ms.
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
                &[2.0]
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
    distributed: bool,
    /// How long a won attempt takes to come back.
    late: Duration,
}

impl Flaky {
    fn new(extends: Extends) -> Self {
        Self {
            lock: MemoryLock::new(),
            extends,
            stalled: false,
            distributed: false,
            late: Duration::ZERO,
        }
    }

    /// Says it is distributed: the client lines its waits up in the in-process queue.
    fn distributed(self) -> Self {
        Self {
            distributed: true,
            ..self
        }
    }

    /// Won attempts come back after `late`.
    fn late(self, late: Duration) -> Self {
        Self { late, ..self }
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
        let capabilities = match self.extends {
            Extends::Fails => Capabilities::NONE.with_extend(),
            Extends::Unsupported => Capabilities::NONE,
        };
        if self.distributed {
            capabilities.with_distributed()
        } else {
            capabilities
        }
    }

    fn try_acquire<'a>(
        &'a self,
        request: &'a LockRequest,
    ) -> lock_core::raw::Answer<'a, Result<Option<Box<dyn Handle>>>> {
        lock_core::raw::Answer::later(async move {
            if self.stalled {
                std::future::pending::<()>().await;
            }
            let extends = self.extends;
            let won = self.lock.try_acquire(request).await?;
            if won.is_some() {
                tokio::time::sleep(self.late).await;
            }
            Ok(won.map(|handle| Box::new(FlakyHandle(handle, extends)) as Box<dyn Handle>))
        })
    }

    fn abandon<'a>(&'a self, request: &'a LockRequest) -> lock_core::raw::Answer<'a, Result<bool>> {
        lock_core::raw::Answer::later(async move { self.lock.abandon(request).await })
    }
}

#[async_trait]
impl Handle for FlakyHandle {
    fn lease(&self) -> &Lease {
        self.0.lease()
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

    fn release(&mut self) -> lock_core::raw::Answer<'_, Result<()>> {
        lock_core::raw::Answer::later(async move {
            Err(LockError::backend("flaky", "release not answered"))
        })
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
            ("lock_acquire_attempts{backend=flaky,outcome=error}", &[0.0]),
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
        let once =
            options(Duration::from_secs(1)).with_retry(RetryPolicy::none().with_deadline(50 * MS));
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

/// Waits in the in-process queue: one cancelled there and one that runs out of time there both
/// made 0 attempts; the holder's failed release still counts it down.
#[test]
fn waits_in_the_in_process_queue_are_recorded_with_no_attempt() {
    let recorded = run(|recorded| async move {
        let locker = Locker::new(Flaky::new(Extends::Fails).distributed())
            .with_options(options(Duration::from_secs(1)).with_retry(every_100ms()))
            .unwrap();
        let holder = locker.acquire("q").await.unwrap();
        assert!(
            tokio::time::timeout(50 * MS, locker.acquire("q"))
                .await
                .is_err()
        );
        let bounded =
            options(Duration::from_secs(1)).with_retry(every_100ms().with_deadline(30 * MS));
        let timed_out = locker.acquire_with("q", &bounded).await;
        assert!(
            matches!(timed_out, Err(LockError::Timeout { attempts: 0, .. })),
            "{timed_out:?}"
        );
        assert_eq!(recorded.held("flaky"), 1.0);
        assert!(holder.release().await.is_err());
    });
    assert_eq!(recorded.held("flaky"), 0.0);
    assert_eq!(
        recorded.histograms(),
        histograms(&[
            (
                "lock_acquire_attempts{backend=flaky,outcome=acquired}",
                &[1.0]
            ),
            (
                "lock_acquire_attempts{backend=flaky,outcome=cancelled}",
                &[0.0]
            ),
            (
                "lock_acquire_attempts{backend=flaky,outcome=timeout}",
                &[0.0]
            ),
            (
                "lock_acquire_wait_seconds{backend=flaky,outcome=acquired}",
                &[0.0]
            ),
            (
                "lock_acquire_wait_seconds{backend=flaky,outcome=cancelled}",
                &[0.05]
            ),
            (
                "lock_acquire_wait_seconds{backend=flaky,outcome=timeout}",
                &[0.03]
            ),
        ])
    );
}

/// A waiting writer renews its claim every half ttl: each renewal is an attempt, counted in
/// the histogram as in the `Timeout` error. A key in use as another kind is an `error` after
/// its one attempt.
#[test]
fn a_writers_claim_renewals_are_counted_as_attempts_and_kind_mismatches_are_errors() {
    let recorded = run(|recorded| async move {
        let locker = memory_locker();
        let reader = locker.acquire_read("rw").await.unwrap();
        // Claim at 0 ms, renewed at 50, 100, ... 450 ms; the policy's one retry at 500 ms.
        let writer = options(100 * MS).with_retry(
            every_100ms()
                .with_retry_delay(500 * MS)
                .with_retry_count(RetryCount::Limited(1)),
        );
        let result = locker
            .acquire_kind("rw", lock_core::LeaseKind::Write, &writer)
            .await;
        assert!(
            matches!(result, Err(LockError::Timeout { attempts: 11, .. })),
            "{result:?}"
        );
        let permit = locker.acquire_permit("s", 2).await.unwrap();
        let mismatch = locker.acquire_permit("s", 3).await;
        assert!(
            matches!(mismatch, Err(LockError::KindMismatch { .. })),
            "{mismatch:?}"
        );
        assert_eq!(recorded.held("memory"), 2.0);
        reader.release().await.unwrap();
        drop(permit);
    });
    assert_eq!(recorded.held("memory"), 0.0);
    assert_eq!(
        recorded.histograms(),
        histograms(&[
            (
                "lock_acquire_attempts{backend=memory,outcome=acquired}",
                &[1.0, 1.0]
            ),
            (
                "lock_acquire_attempts{backend=memory,outcome=error}",
                &[1.0]
            ),
            (
                "lock_acquire_attempts{backend=memory,outcome=timeout}",
                &[11.0]
            ),
            (
                "lock_acquire_wait_seconds{backend=memory,outcome=acquired}",
                &[0.0, 0.0]
            ),
            (
                "lock_acquire_wait_seconds{backend=memory,outcome=error}",
                &[0.0]
            ),
            (
                "lock_acquire_wait_seconds{backend=memory,outcome=timeout}",
                &[0.5]
            ),
        ])
    );
}

/// Guards of every kind, downgraded, kept alive, released or dropped; a panic in a critical
/// section; a client stopped under a held lock: each lock counted down once, no loss.
#[test]
fn downgrades_panics_and_stops_count_down_once() {
    let recorded = run(|recorded| async move {
        let locker = memory_locker();
        let mut write = locker.acquire_write("w").await.unwrap();
        write.keep_alive().unwrap();
        write.downgrade().await.unwrap();
        let other_reader = locker.acquire_read("w").await.unwrap();
        let mut plain = locker.acquire_write("x").await.unwrap();
        plain.downgrade().await.unwrap();
        assert_eq!(recorded.held("memory"), 3.0);
        write.release().await.unwrap();
        drop(other_reader);
        drop(plain);
        assert_eq!(recorded.held("memory"), 0.0);
        for (store, kind) in [
            (
                Locker::new(MemoryLock::new()),
                lock_core::LeaseKind::permit(2).unwrap(),
            ),
            (
                Locker::new(Flaky::new(Extends::Fails)),
                lock_core::LeaseKind::Exclusive,
            ),
        ] {
            let panicked = tokio::spawn(async move {
                store
                    .with_lease("p", kind, |_| async {
                        panic!("the critical section failed")
                    })
                    .await
            })
            .await;
            assert!(panicked.unwrap_err().is_panic());
        }
        tokio::time::sleep(MS).await;
        let flaky = Locker::new(Flaky::new(Extends::Fails));
        let mut held = flaky.acquire("s").await.unwrap();
        held.keep_alive().unwrap();
        flaky.stop().await.unwrap();
        assert_eq!(recorded.held("flaky"), 1.0);
        drop(held);
        tokio::time::sleep(MS).await;
    });
    assert_eq!(recorded.held("memory"), 0.0);
    assert_eq!(recorded.held("flaky"), 0.0);
    assert_eq!(recorded.counters(), BTreeMap::new());
}

/// A lock whose validity passed before its attempt came back is released and never counted as
/// held; the attempt counts, and a single one is an `error` (the ttl is too short for it).
#[test]
fn a_lock_born_expired_is_never_counted_held() {
    let recorded = run(|recorded| async move {
        let locker = Locker::new(Flaky::new(Extends::Fails).late(150 * MS))
            .with_options(options(100 * MS))
            .unwrap();
        assert!(matches!(
            locker.try_acquire("late").await,
            Err(LockError::Backend { .. })
        ));
        assert_eq!(recorded.held("flaky"), 0.0);
    });
    assert_eq!(recorded.held("flaky"), 0.0);
    assert_eq!(
        recorded.histograms(),
        histograms(&[
            ("lock_acquire_attempts{backend=flaky,outcome=error}", &[1.0]),
            (
                "lock_acquire_wait_seconds{backend=flaky,outcome=error}",
                &[0.15]
            ),
        ])
    );
}

/// Memory under another name, so that a test on a multi-thread runtime can read its figures
/// from the global recorder, apart from every other test's.
#[derive(Debug)]
struct Named(MemoryLock);

#[async_trait]
impl Lock for Named {
    fn name(&self) -> &'static str {
        "threads"
    }

    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }

    fn try_acquire<'a>(
        &'a self,
        request: &'a LockRequest,
    ) -> lock_core::raw::Answer<'a, Result<Option<Box<dyn Handle>>>> {
        self.0.try_acquire(request)
    }

    fn abandon<'a>(&'a self, request: &'a LockRequest) -> lock_core::raw::Answer<'a, Result<bool>> {
        self.0.abandon(request)
    }

    async fn purge(&self, prefix: &str) -> Result<u64> {
        self.0.purge(prefix).await
    }
}

/// On worker threads, guards kept alive with short ttls race their watchdogs: released while
/// the watchdog extends, dropped while it extends, lost (purged) then released, lost by
/// lapsing. The gauge comes back to 0, and no lock is counted lost twice.
#[test]
fn guards_racing_their_watchdogs_on_worker_threads_count_down_once() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::set_global_recorder(recorder).unwrap();
    let recorded = Recorded {
        snapshotter,
        figures: std::cell::RefCell::default(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_time()
        .build()
        .unwrap();
    const GUARDS: u32 = 400;
    runtime.block_on(async {
        let locker = Locker::new(Named(MemoryLock::new()))
            // A lock born expired on a loaded machine (3 ms is short) is simply taken again.
            .with_options(options(3 * MS).with_retry(every_100ms().with_retry_delay(MS)))
            .unwrap();
        let tasks: Vec<_> = (0..GUARDS)
            .map(|i| {
                let locker = locker.clone();
                tokio::spawn(async move {
                    let key = format!("k{i}");
                    let mut guard = locker.acquire(&key).await.unwrap();
                    let lost = guard.keep_alive().unwrap();
                    let pause = Duration::from_micros(u64::from(i % 7) * 700);
                    match i % 4 {
                        0 => {
                            tokio::time::sleep(pause).await;
                            let _ = guard.release().await;
                        }
                        1 => {
                            tokio::time::sleep(pause).await;
                            drop(guard);
                        }
                        2 => {
                            locker.purge(&key).await.unwrap();
                            tokio::time::sleep(pause).await;
                            let _ = guard.release().await;
                        }
                        _ => {
                            locker.purge(&key).await.unwrap();
                            lost.lost().await;
                            drop(guard);
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
    drop(runtime);
    assert_eq!(recorded.held("threads"), 0.0);
    let lost: u64 = recorded
        .counters()
        .iter()
        .filter(|(name, _)| name.starts_with("lock_lost_total{backend=threads"))
        .map(|(_, count)| count)
        .sum();
    // Every purged lock (half of them) is found lost once; the others only if the watchdog was
    // late on a loaded machine.
    assert!(
        (u64::from(GUARDS / 2)..=u64::from(GUARDS)).contains(&lost),
        "{lost} lost"
    );
}

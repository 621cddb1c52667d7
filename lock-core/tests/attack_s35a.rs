//! Session 35 attack on the retry loop's early-wake spacing (`early_spacing` in locker.rs):
//! after the third early wake-up in a row, the attempt after a wake-up waits 1 ms, 2 ms, 4 ms,
//! … first (capped at the end of the current delay), and the count starts again only when a
//! wait lasts to its end. Scripted backends delegate to a `MemoryLock` and script their waits.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lock_core::{
    Capabilities, Key, LeaseKind, LockError, LockOptions, Locker, Result, RetryCount, RetryPolicy,
    raw::{Acquired, Answer, Lock, LockRequest, async_trait},
};
use lock_memory::MemoryLock;
use tokio::time::Instant;

/// How a [`Scripted`] backend's waits end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Waits {
    /// At the next instant of `announcements` (from `start`), or at `max_wait`; never "for the
    /// turn" (`Ok(false)`, as a fair backend's wait ended by the expiry of the holder it is
    /// first in line behind).
    Announced,
    /// At once, `Ok(())` / `Ok(false)`.
    AtOnce,
    /// At once, woken for the turn (`Ok(true)`), in vain.
    TurnAtOnce,
    /// At once, with an error.
    ErrAtOnce,
}

/// A `MemoryLock` (fair unless `fair` is false) whose waits follow `waits`.
#[derive(Debug)]
struct Scripted {
    store: MemoryLock,
    fair: bool,
    waits: Waits,
    start: Instant,
    announcements: Vec<Duration>,
    attempts: Arc<AtomicU64>,
}

impl Scripted {
    fn new(store: &MemoryLock, fair: bool, waits: Waits) -> Self {
        Self {
            store: store.clone(),
            fair,
            waits,
            start: Instant::now(),
            announcements: Vec::new(),
            attempts: Arc::default(),
        }
    }

    async fn wait(&self, max_wait: Duration) -> Result<bool> {
        match self.waits {
            Waits::Announced => {
                let now = Instant::now();
                let next = self
                    .announcements
                    .iter()
                    .map(|at| self.start + *at)
                    .find(|at| *at > now);
                let until = next.map_or(now + max_wait, |at| at.min(now + max_wait));
                tokio::time::sleep_until(until).await;
                Ok(false)
            }
            Waits::AtOnce => Ok(false),
            Waits::TurnAtOnce => Ok(true),
            Waits::ErrAtOnce => Err(LockError::Backend {
                backend: "scripted",
                message: "notification channel broken".into(),
                source: None,
            }),
        }
    }
}

#[async_trait]
impl Lock for Scripted {
    fn name(&self) -> &'static str {
        "scripted"
    }
    fn capabilities(&self) -> Capabilities {
        if self.fair {
            self.store.capabilities()
        } else {
            Capabilities::NONE
                .with_wake_on_release()
                .with_multi_key()
                .with_read_write()
        }
    }
    fn try_acquire<'a>(&'a self, request: &'a LockRequest) -> Answer<'a, Acquired> {
        // On a paused clock a loop that never sleeps never reaches its deadline: fail instead.
        let made = self.attempts.fetch_add(1, Ordering::SeqCst);
        assert!(made < 100_000, "the retry loop spins: {made} attempts");
        self.store.try_acquire(request)
    }
    fn abandon<'a>(&'a self, request: &'a LockRequest) -> Answer<'a, Result<bool>> {
        self.store.abandon(request)
    }
    async fn wait_for_release(&self, _keys: &[Key], max_wait: Duration) -> Result<()> {
        self.wait(max_wait).await.map(|_| ())
    }
    async fn wait_for_turn(&self, _request: &LockRequest, max_wait: Duration) -> Result<bool> {
        self.wait(max_wait).await
    }
}

fn forever(delay: Duration) -> RetryPolicy {
    RetryPolicy::forever()
        .with_retry_delay(delay)
        .with_max_delay(delay.max(Duration::from_secs(5)))
        .with_retry_jitter(Duration::ZERO)
}

fn waiter(backend: Scripted, retry: RetryPolicy) -> Locker {
    Locker::new(backend)
        .with_local_queue(false)
        .with_courtesy(false)
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(30))
                .with_retry(retry),
        )
        .unwrap()
}

/// The commit's own scenario on a real clock, a current-thread runtime and jitter on (the
/// delay 5 s plus up to 1 s): three wake-ups in vain at 100, 101 and 102 ms, then the release at
/// 150 ms, announced: the waiter wins within milliseconds of it, not a delay later.
#[tokio::test]
async fn a_release_after_three_wake_ups_in_vain_is_heard_real_clock_with_jitter() {
    let store = MemoryLock::new();
    let holder = Locker::new(store.clone());
    let guard = holder.acquire("k").await.unwrap();
    let mut backend = Scripted::new(&store, false, Waits::Announced);
    let start = backend.start;
    backend.announcements = [100, 101, 102, 150].map(Duration::from_millis).to_vec();
    let retry = forever(Duration::from_secs(5)).with_retry_jitter(Duration::from_secs(1));
    let waiter = waiter(backend, retry);
    let release = tokio::spawn(async move {
        tokio::time::sleep_until(start + Duration::from_millis(148)).await;
        guard.release().await.unwrap();
    });
    let won = waiter.acquire("k").await.unwrap();
    let took = start.elapsed();
    release.await.unwrap();
    won.release().await.unwrap();
    assert!(
        took < Duration::from_millis(250),
        "released at 148 ms, announced at 150 ms: won at {took:?}"
    );
}

/// `Lock::wait_for_turn`: a fair backend returns `Ok(false)` early "when the holder it found
/// expires if it is first in line" — a wake-up the attempt after it must see (the commit's own
/// promise: "the wake-up has been heard: whatever it announced, the attempt after the spacing
/// sees"). After six wake-ups in vain (100–116 ms; the last attempt at 124 ms, so the wait
/// runs to 174 ms), the holder's lease ends at 170 ms and the wait returns then; the 16 ms
/// spacing is capped at the wait's end (174 ms), and the loop took the capped spacing for a
/// wait that ran to its end: a fair waiter that polled lately skips that attempt, and won only
/// at its next poll, 200 ms after its last attempt (324 ms) — the wake-up missed. (Held
/// before session 35, `0a507bf`: its deaf sleep after two early wake-ups swallowed the later
/// ones in vain, and the wait ended by the expiry was the first early one after it.)
#[tokio::test(start_paused = true)]
async fn a_fair_waiter_woken_by_the_holders_expiry_asks_after_a_capped_spacing() {
    let store = MemoryLock::new();
    let holder = Locker::new(store.clone())
        .with_options(LockOptions::default().with_ttl(Duration::from_millis(170)))
        .unwrap();
    let start = Instant::now();
    let _expiring = holder.acquire("k").await.unwrap();
    let mut backend = Scripted::new(&store, true, Waits::Announced);
    backend.start = start;
    backend.announcements = [100, 101, 102, 104, 108, 116, 170]
        .map(Duration::from_millis)
        .to_vec();
    let attempts = Arc::clone(&backend.attempts);
    let waiter = waiter(backend, forever(Duration::from_millis(50)));
    let won = waiter.acquire("k").await.unwrap();
    let took = start.elapsed();
    won.release().await.unwrap();
    assert!(
        took < Duration::from_millis(200),
        "the holder expired at 170 ms (the wait returned then); the waiter won at {took:?} \
         ({} attempts)",
        attempts.load(Ordering::SeqCst)
    );
}

/// Bounded waits: an acquisition with a deadline returns by it (`Timeout`), whatever the
/// backend's waits do — at once, or woken for the turn at once forever — on a paused clock,
/// and the attempts stay at most about one a delay once the spacing reached it.
#[tokio::test(start_paused = true)]
async fn the_deadline_holds_against_waits_in_vain_paused_clock() {
    for (fair, waits) in [
        (false, Waits::AtOnce),
        (true, Waits::AtOnce),
        (true, Waits::TurnAtOnce),
    ] {
        let store = MemoryLock::new();
        let _held = Locker::new(store.clone()).acquire("k").await.unwrap();
        let backend = Scripted::new(&store, fair, waits);
        let attempts = Arc::clone(&backend.attempts);
        let retry = forever(Duration::from_millis(50)).with_deadline(Duration::from_secs(2));
        let waiter = waiter(backend, retry);
        let start = Instant::now();
        let error = waiter.acquire("k").await.unwrap_err();
        let took = start.elapsed();
        let made = attempts.load(Ordering::SeqCst);
        println!("fair {fair}, {waits:?}: {error} after {took:?}, {made} attempts");
        assert!(
            matches!(error, LockError::Timeout { .. }),
            "{fair} {waits:?}: {error:?}"
        );
        assert!(
            took <= Duration::from_millis(2_001),
            "{fair} {waits:?}: gave up {took:?} after the start (deadline 2 s)"
        );
        assert!(
            (8..=60).contains(&made),
            "{fair} {waits:?}: {made} attempts in 2 s at a 50 ms delay"
        );
    }
}

/// The same on a real clock and a current-thread runtime (as `#[tokio::test]` runs): the
/// deadline (300 ms) holds within a few ms, with jitter on, and the attempts stay few.
#[tokio::test]
async fn the_deadline_holds_against_waits_in_vain_real_clock() {
    for (fair, waits) in [(false, Waits::AtOnce), (true, Waits::TurnAtOnce)] {
        let store = MemoryLock::new();
        let _held = Locker::new(store.clone()).acquire("k").await.unwrap();
        let backend = Scripted::new(&store, fair, waits);
        let attempts = Arc::clone(&backend.attempts);
        let retry = forever(Duration::from_millis(40))
            .with_retry_jitter(Duration::from_millis(20))
            .with_deadline(Duration::from_millis(300));
        let waiter = waiter(backend, retry);
        let start = std::time::Instant::now();
        let error = waiter.acquire("k").await.unwrap_err();
        let took = start.elapsed();
        let made = attempts.load(Ordering::SeqCst);
        println!("fair {fair}, {waits:?}: {error} after {took:?}, {made} attempts");
        assert!(matches!(error, LockError::Timeout { .. }), "{error:?}");
        assert!(
            took < Duration::from_millis(380),
            "{fair} {waits:?}: gave up {took:?} after the start (deadline 300 ms)"
        );
        assert!(
            (5..=40).contains(&made),
            "{fair} {waits:?}: {made} attempts"
        );
    }
}

/// A wait that fails at once ends the acquisition with that error at once: no loop at all.
#[tokio::test(start_paused = true)]
async fn a_wait_that_fails_at_once_ends_the_acquisition() {
    for fair in [false, true] {
        let store = MemoryLock::new();
        let _held = Locker::new(store.clone()).acquire("k").await.unwrap();
        let backend = Scripted::new(&store, fair, Waits::ErrAtOnce);
        let attempts = Arc::clone(&backend.attempts);
        let waiter = waiter(backend, forever(Duration::from_millis(50)));
        let error = waiter.acquire("k").await.unwrap_err();
        assert!(matches!(error, LockError::Backend { .. }), "{error:?}");
        assert_eq!(attempts.load(Ordering::SeqCst), 1, "fair {fair}");
        // It left no place in line: a single try gets the key once the holder is gone.
        drop(_held);
        let other = Locker::new(store.clone());
        assert!(
            other.try_acquire("k").await.unwrap().is_some(),
            "fair {fair}"
        );
    }
}

/// `Locker::stop` ends a waiter promptly with `Stopped`, also in a spacing sleep: at a 5 s
/// delay the spacing reaches 512 ms–1 s after about a second of waits returning at once (real
/// clock, current-thread runtime).
#[tokio::test]
async fn stop_ends_a_waiter_in_its_spacing_sleep_at_once() {
    for (fair, waits) in [(false, Waits::AtOnce), (true, Waits::TurnAtOnce)] {
        let store = MemoryLock::new();
        let _held = Locker::new(store.clone()).acquire("k").await.unwrap();
        let backend = Scripted::new(&store, fair, waits);
        let attempts = Arc::clone(&backend.attempts);
        let waiter = waiter(backend, forever(Duration::from_secs(5)));
        let task = tokio::spawn({
            let waiter = waiter.clone();
            async move { waiter.acquire("k").await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        let made = attempts.load(Ordering::SeqCst);
        let stopped_at = std::time::Instant::now();
        waiter.stop().await.unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the waiter did not end within 1 s of stop")
            .unwrap();
        let took = stopped_at.elapsed();
        assert!(
            matches!(outcome, Err(LockError::Stopped)),
            "{fair} {waits:?}: {outcome:?}"
        );
        assert!(
            took < Duration::from_millis(100),
            "{fair} {waits:?}: ended {took:?} after stop"
        );
        // Spacing by then: 1 + 2 + … + 512 ms ≈ 1 s after 12 quick attempts.
        assert!(
            (8..=16).contains(&made),
            "{fair} {waits:?}: {made} attempts in 1.2 s"
        );
    }
}

/// Very many early wake-ups in a row: at a 1 h delay and a 24 h deadline (the limits
/// `RetryPolicy::validate` allows) a wait returning at once makes the spacing double past
/// 2^31 ms (`checked_shl` with 32 and more doublings, `Instant + 49 days`): no panic, no
/// spin, about one attempt an hour, and `Timeout` at the deadline.
#[tokio::test(start_paused = true)]
async fn doublings_past_thirty_two_neither_panic_nor_spin() {
    for (fair, waits) in [(false, Waits::AtOnce), (true, Waits::TurnAtOnce)] {
        let store = MemoryLock::new();
        let _held = Locker::new(store.clone())
            .with_options(LockOptions::default().with_ttl(Duration::from_secs(24 * 3_600)))
            .unwrap()
            .acquire("k")
            .await
            .unwrap();
        let backend = Scripted::new(&store, fair, waits);
        let attempts = Arc::clone(&backend.attempts);
        let hour = Duration::from_secs(3_600);
        let retry = forever(hour)
            .with_max_delay(hour)
            .with_deadline(Duration::from_secs(24 * 3_600));
        let waiter = Locker::new(backend)
            .with_local_queue(false)
            .with_courtesy(false)
            .with_options(
                LockOptions::default()
                    .with_ttl(Duration::from_secs(24 * 3_600))
                    .with_retry(retry),
            )
            .unwrap();
        let start = Instant::now();
        let error = waiter.acquire("k").await.unwrap_err();
        let took = start.elapsed();
        let made = attempts.load(Ordering::SeqCst);
        println!("fair {fair} {waits:?}: {error} after {took:?}, {made} attempts");
        assert!(matches!(error, LockError::Timeout { .. }), "{error:?}");
        assert!(took <= Duration::from_secs(24 * 3_600 + 1), "{took:?}");
        // 22 doublings reach an hour; then one attempt an hour for about 23 h.
        assert!(
            (40..=120).contains(&made),
            "{fair} {waits:?}: {made} attempts"
        );
    }
}

/// `RetryCount::Limited(n)`: "at most this many retries (so n + 1 attempts in all)". Early
/// wake-ups in vain spend retries (each is followed by an attempt): exactly 11 attempts for 10
/// retries, never more, whatever the waits do. (How long the 10 retries last is printed: the
/// early wake-ups cut the policy's 2 s short.)
#[tokio::test(start_paused = true)]
async fn counted_retries_make_exactly_their_attempts_under_wake_ups_in_vain() {
    for (fair, waits) in [
        (false, Waits::AtOnce),
        (true, Waits::AtOnce),
        (true, Waits::TurnAtOnce),
    ] {
        let store = MemoryLock::new();
        let _held = Locker::new(store.clone()).acquire("k").await.unwrap();
        let backend = Scripted::new(&store, fair, waits);
        let attempts = Arc::clone(&backend.attempts);
        let retry = forever(Duration::from_millis(200)).with_retry_count(RetryCount::Limited(10));
        let waiter = waiter(backend, retry);
        let start = Instant::now();
        let error = waiter.acquire("k").await.unwrap_err();
        let took = start.elapsed();
        let made = attempts.load(Ordering::SeqCst);
        println!("fair {fair} {waits:?}: {error} after {took:?}, {made} attempts");
        assert!(
            matches!(error, LockError::Timeout { attempts: 11, .. }),
            "{fair} {waits:?}: {error:?}"
        );
        assert_eq!(made, 11, "{fair} {waits:?}");
    }
}

/// Cancel safety: an acquisition dropped during a spacing sleep leaves nothing behind — no
/// place in the fair line (a single try takes the key once the holder let go: a free key with
/// waiters in line is refused), no writer's claim (a new reader enters while the first still
/// reads), no lock on multi-key waits.
#[tokio::test(start_paused = true)]
async fn an_acquisition_dropped_in_its_spacing_sleep_leaves_nothing() {
    // A fair mutex waiter.
    for waits in [Waits::AtOnce, Waits::TurnAtOnce] {
        let store = MemoryLock::new();
        let holder = Locker::new(store.clone()).acquire("k").await.unwrap();
        let backend = Scripted::new(&store, true, waits);
        let attempts = Arc::clone(&backend.attempts);
        let waiter = waiter(backend, forever(Duration::from_secs(5)));
        // At 1 s the spacing sleeps are 1 + 2 + … + 512 ms: it is in the one of 1 024 ms.
        let outcome = tokio::time::timeout(Duration::from_secs(1), waiter.acquire("k")).await;
        assert!(outcome.is_err(), "{waits:?}: the key stays held");
        let made = attempts.load(Ordering::SeqCst);
        assert!((10..=14).contains(&made), "{waits:?}: {made} attempts");
        holder.release().await.unwrap();
        let other = Locker::new(store.clone());
        assert!(
            other.try_acquire("k").await.unwrap().is_some(),
            "{waits:?}: the dropped waiter left its place in line"
        );
    }
    // A writer waiting behind a reader.
    let store = MemoryLock::new();
    let reader = Locker::new(store.clone());
    let _first = reader
        .try_acquire_kind("k", LeaseKind::Read)
        .await
        .unwrap()
        .unwrap();
    let backend = Scripted::new(&store, false, Waits::AtOnce);
    let writer = waiter(backend, forever(Duration::from_secs(5)));
    let outcome = tokio::time::timeout(Duration::from_secs(1), writer.acquire_write("k")).await;
    assert!(outcome.is_err(), "the reader stays");
    assert!(
        reader
            .try_acquire_kind("k", LeaseKind::Read)
            .await
            .unwrap()
            .is_some(),
        "the dropped writer left its claim"
    );
    // A multi-key waiter.
    let store = MemoryLock::new();
    let holder = Locker::new(store.clone()).acquire("b").await.unwrap();
    let backend = Scripted::new(&store, false, Waits::AtOnce);
    let many = waiter(backend, forever(Duration::from_secs(5)));
    let outcome =
        tokio::time::timeout(Duration::from_secs(1), many.acquire_many(&["a", "b"])).await;
    assert!(outcome.is_err(), "b stays held");
    holder.release().await.unwrap();
    let other = Locker::new(store.clone());
    assert!(
        other.try_acquire("a").await.unwrap().is_some(),
        "a left held"
    );
    assert!(
        other.try_acquire("b").await.unwrap().is_some(),
        "b left held"
    );
}

/// Contention: a hot key is released and taken by another waiter every 20 ms (each release
/// wakes this waiter in vain, as a broadcast wake-up does), from 100 ms to 2 s; then the last
/// holder lets go at 2 005 ms, announced at 2 010 ms, and nobody else wants the key. The
/// RetryPolicy docs: "Backends that push wake-ups cut each wait short when the key is
/// released"; the commit: the loop "keeps listening".
///
/// Not fixed (a trade-off of the spacing's design, see `early_spacing`): the count of early
/// wake-ups in a row starts again only when a wait lasts to its end, so a waiter woken in
/// vain a dozen times (lost races) has its attempts a whole delay apart, deaf to the release
/// that would let it in: won at 2.27 s (1 s delay). Before session 35 (`0a507bf`): 2.16 s,
/// every third wait a deaf sleep of the whole delay. Telling lost races from a broken
/// backend's wake-ups needs a rule (how quick a wake-up counts as spinning) the docs do not
/// give yet.
#[ignore = "not fixed: after a dozen early wake-ups in vain the attempts are a whole delay apart (won 2.27 s, released 2.005 s)"]
#[tokio::test(start_paused = true)]
async fn a_waiter_that_lost_many_races_still_hears_the_release() {
    let store = MemoryLock::new();
    let holder = Locker::new(store.clone());
    let start = Instant::now();
    let guard = holder.acquire("k").await.unwrap();
    let mut backend = Scripted::new(&store, false, Waits::Announced);
    backend.start = start;
    backend.announcements = (0..96)
        .map(|i| Duration::from_millis(100 + 20 * i))
        .chain([Duration::from_millis(2_010)])
        .collect();
    let attempts = Arc::clone(&backend.attempts);
    let waiter = waiter(backend, forever(Duration::from_secs(1)));
    let release = tokio::spawn(async move {
        tokio::time::sleep_until(start + Duration::from_millis(2_005)).await;
        guard.release().await.unwrap();
    });
    let won = waiter.acquire("k").await.unwrap();
    let took = start.elapsed();
    release.await.unwrap();
    won.release().await.unwrap();
    assert!(
        took < Duration::from_millis(2_100),
        "released at 2 005 ms, announced at 2 010 ms; won at {took:?} ({} attempts)",
        attempts.load(Ordering::SeqCst)
    );
}

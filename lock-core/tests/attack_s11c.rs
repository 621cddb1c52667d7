//! Attacks on `Locker::stop`'s hold on an attempt on the wire and its own cancellation
//! (session 11, adv11c): a hostile backend (slow to answer) and a hostile caller (cancelling
//! `stop`).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lock_core::{CLEANUP_WAIT, LockError, LockOptions, Locker, RetryPolicy};
use lock_memory::MemoryLock;

mod support;
use support::{Late, free, settle};

/// Promise (`Locker::stop`): "An attempt on the wire counts among the clean-ups: its answer
/// is let come [...], whatever it took is taken back by token before the backend closes, and
/// its acquisition ends with `Stopped`" — "so that a process that stops its client and exits
/// right after [...] leaves no lock behind"; and `stop` returns in bounded time.
///
/// The attempt's answer comes later than [`CLEANUP_WAIT`] (a slow node within the backend's
/// own timeouts: Redlock's `node_timeout` may be set up to 60 s): `stop` gives up waiting after
/// `CLEANUP_WAIT` and closes the backend, the answer comes after, and the take-back by token
/// is sent to the closed backend and fails. On main the key stays held for its whole ttl
/// (before 4dfda19 `stop` ended the wait for the answer at once and the take-back ran while
/// the backend still ran).
#[tokio::test(start_paused = true)]
async fn stop_takes_back_an_attempt_answering_after_the_cleanup_wait() {
    let memory = Arc::new(MemoryLock::new());
    let locker =
        Locker::new(Late::new(&memory).answering_after(CLEANUP_WAIT + Duration::from_secs(1)))
            .with_options(
                LockOptions::default()
                    .with_ttl(Duration::from_secs(60))
                    .with_retry(RetryPolicy::none()),
            )
            .unwrap();
    let acquisition = tokio::spawn({
        let locker = locker.clone();
        async move { locker.acquire("k").await }
    });
    settle().await;
    let started = tokio::time::Instant::now();
    locker.stop().await.unwrap();
    let stop_took = started.elapsed();
    assert!(
        stop_took <= CLEANUP_WAIT + Duration::from_millis(10),
        "{stop_took:?}"
    );
    let outcome = acquisition.await.unwrap();
    let handed_out = outcome.is_ok();
    drop(outcome);
    settle().await;
    let free = free(&memory, "k").await;
    assert!(
        free && !handed_out,
        "after stop (returned after {stop_took:?}): a guard handed out: {handed_out}; the key \
         left held in the store: {}",
        !free
    );
}

/// Promise (`Locker::stop`): "A further call (of this client or a clone) returns once the
/// first has finished", the releases of guards dropped before are given time to finish, and
/// the backend's connections are freed; cancelling `stop` itself is safe.
///
/// The first `stop` is cancelled while it waits for the release of a guard dropped before (a
/// `timeout` around it, say a shutdown path with a short budget), and the program calls
/// `stop` again to finish the job. On main the cancelled call marks the stop finished, so the
/// second call returns at once: it neither waits for the release nor closes the backend (its
/// `shutdown` is never called), and a process that exits when it returns leaves the lock.
#[tokio::test(start_paused = true)]
async fn a_stop_after_a_cancelled_stop_finishes_the_job() {
    let memory = Arc::new(MemoryLock::new());
    let store = Late::new(&memory).releases_taking(Duration::from_millis(50));
    let shut = Arc::clone(&store.shut);
    let locker = Locker::new(store)
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(10))
                .with_retry(RetryPolicy::none()),
        )
        .unwrap();
    let guard = locker.acquire("k").await.unwrap();
    drop(guard);
    let cancelled = tokio::time::timeout(Duration::from_millis(1), locker.stop()).await;
    assert!(cancelled.is_err(), "the first stop was not cut short");
    let started = tokio::time::Instant::now();
    locker.stop().await.unwrap();
    let second_took = started.elapsed();
    let free = free(&memory, "k").await;
    let closed = shut.load(Ordering::SeqCst);
    assert!(
        free && closed,
        "the stop after a cancelled one returned after {second_took:?}: the dropped guard's \
         lock freed: {free}; the backend closed: {closed}"
    );
}

/// Held: a backend whose attempt never answers (no timeouts of its own) does not hold `stop`
/// beyond [`CLEANUP_WAIT`], and a call made after `stop` fails with `Stopped`.
///
/// Negative control (on main's locker.rs, whose attempt does not listen for `stop`): with
/// `settled`'s limit removed (`all_done.await`) `stop` never returns and the test's own
/// timeout fires.
#[tokio::test(start_paused = true)]
async fn stop_returns_in_bounded_time_when_an_answer_never_comes() {
    let memory = Arc::new(MemoryLock::new());
    let locker = Locker::new(Late::new(&memory).answering_after(Duration::MAX / 4))
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(10))
                .with_retry(RetryPolicy::none()),
        )
        .unwrap();
    let _acquisition = tokio::spawn({
        let locker = locker.clone();
        async move { locker.acquire("k").await }
    });
    settle().await;
    let started = tokio::time::Instant::now();
    let stopped = tokio::time::timeout(CLEANUP_WAIT * 3, locker.stop()).await;
    assert!(
        matches!(stopped, Ok(Ok(()))),
        "stop did not return within {:?}: {stopped:?}",
        started.elapsed()
    );
    assert!(started.elapsed() <= CLEANUP_WAIT + Duration::from_millis(10));
    assert!(matches!(
        locker.try_acquire("other").await,
        Err(LockError::Stopped)
    ));
}

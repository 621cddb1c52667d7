//! Attacks on the acquisition path and the lease (session 11, adv11a): promises of the
//! one-path `Acquire` future, the guard and the in-process queue, tried as a hostile user.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lock_core::{
    Capabilities, Key, LockError, LockOptions, Locker, Result, RetryPolicy,
    raw::{Answer, Handle, Lock, LockRequest, async_trait},
};
use lock_memory::MemoryLock;

mod support;
use support::{Late, Store, free, settle};

/// Promise (lock-core README, CHANGELOG, README "No guard is born expired"): no guard is
/// handed out with its validity already over.
///
/// A multi-key lock on the memory store with the shortest ttl (1 ms) over many keys: the store
/// takes the keys one by one and gives the lease the first key's expiry, so when taking them
/// all lasts longer than the ttl, the answer (decided in the call, so not checked by
/// `born_valid`) carries a validity that has already passed. On main the guard comes back
/// with `is_valid() == false` and `remaining() == 0`.
#[tokio::test]
async fn a_multi_key_guard_is_not_born_expired() {
    let locker = Locker::new(MemoryLock::new())
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_millis(1))
                .with_retry(RetryPolicy::none()),
        )
        .unwrap();
    let names: Vec<String> = (0..20_000).map(|i| format!("many:{i}")).collect();
    let keys: Vec<&str> = names.iter().map(String::as_str).collect();
    let started = std::time::Instant::now();
    let result = locker.acquire_many(&keys).await;
    let took = started.elapsed();
    assert!(
        took > Duration::from_millis(2),
        "the attempt took {took:?}: too fast to show anything, add keys"
    );
    match result {
        // The honest outcomes: a failed attempt that says why (as `born_valid` does: "raise
        // the ttl", never "held": nobody else holds these keys), or a guard still valid.
        Err(LockError::Backend { message, .. }) if message.ends_with("raise the ttl") => {}
        Ok(guard) => {
            let valid_until = guard.valid_until();
            let handed_out_at = tokio::time::Instant::now();
            assert!(
                valid_until > handed_out_at,
                "a guard born expired: valid until {:?} before it was handed out (the attempt took {took:?})",
                handed_out_at - valid_until
            );
        }
        Err(error) => panic!("unexpected error {error:?}"),
    }
}

/// Promise (`Locker::stop`): "Acquisitions waiting to retry end with `LockError::Stopped`",
/// and after `stop` every call of the client fails with `Stopped`.
///
/// A task waiting in this process's queue (a distributed store, retrying forever, no
/// deadline) behind a kept-alive holder: `stop` does not reach it. On main it keeps waiting
/// (the queue's wait does not listen for `stop`) and, once the holder lets go, goes on to ask
/// the stopped store and is handed a guard.
#[tokio::test(start_paused = true)]
async fn stop_ends_a_wait_in_the_in_process_queue() {
    let store = Store::new();
    let attempts = Arc::clone(&store.attempts);
    let locker = Locker::new(store)
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(3))
                .with_retry(RetryPolicy::forever().with_retry_delay(Duration::from_millis(50))),
        )
        .unwrap();
    let mut holder = locker.acquire("k").await.unwrap();
    let lost = holder.keep_alive().unwrap();
    let waiter = tokio::spawn({
        let locker = locker.clone();
        async move { locker.acquire("k").await }
    });
    settle().await;
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        1,
        "the waiter lines up in this process"
    );
    locker.stop().await.unwrap();
    let stopped_at = tokio::time::Instant::now();
    let mut waiter = waiter;
    let ended = tokio::time::timeout(Duration::from_secs(10), &mut waiter).await;
    let still_waiting = ended.is_err();
    let outcome = match ended {
        Ok(joined) => joined.unwrap(),
        Err(_) => {
            // Still waiting 10 s after stop, its holder kept alive all along: let the holder
            // go and see what the waiter gets.
            drop(holder);
            waiter.await.unwrap()
        }
    };
    let outcome = outcome.map(|guard| (guard.key().to_string(), guard.is_valid()));
    assert!(
        !still_waiting && matches!(outcome, Err(LockError::Stopped)),
        "a waiter in the in-process queue, its client stopped: still waiting 10 s later: \
         {still_waiting}; once the holder let go, after {:?}: {outcome:?} ({} store attempts)",
        stopped_at.elapsed(),
        attempts.load(Ordering::SeqCst)
    );
    drop(lost);
}

/// The memory lock answering after `polls` polls (an `Answer::later` that does its work only
/// once polled that often), in process or seen as distributed.
#[derive(Debug)]
struct Slow {
    memory: Arc<MemoryLock>,
    polls: usize,
    distributed: bool,
}

async fn yields(polls: usize) {
    for _ in 0..polls {
        tokio::task::yield_now().await;
    }
}

#[async_trait]
impl Lock for Slow {
    fn name(&self) -> &'static str {
        "slow"
    }
    fn capabilities(&self) -> Capabilities {
        let capabilities = self.memory.capabilities();
        if self.distributed {
            capabilities.with_distributed()
        } else {
            capabilities
        }
    }
    fn try_acquire<'a>(
        &'a self,
        request: &'a LockRequest,
    ) -> Answer<'a, Result<Option<Box<dyn Handle>>>> {
        Answer::later(async move {
            yields(self.polls).await;
            self.memory.try_acquire(request).await
        })
    }
    fn abandon<'a>(&'a self, request: &'a LockRequest) -> Answer<'a, Result<bool>> {
        Answer::later(async move {
            yields(self.polls).await;
            self.memory.abandon(request).await
        })
    }
    async fn wait_for_release(&self, keys: &[Key], max_wait: Duration) -> Result<()> {
        self.memory.wait_for_release(keys, max_wait).await
    }

    async fn wait_for_turn(&self, request: &LockRequest, max_wait: Duration) -> Result<bool> {
        self.memory.wait_for_turn(request, max_wait).await
    }
}

/// Held: dropping an acquisition after any number of polls (1 to 40, with 3 ms of paused
/// time between them, so that retries happen) leaves nothing behind, for a store that
/// answers after two polls, in process or distributed (then through this process's queue):
/// a mutex waiting behind a holder leaves the key free once the holder lets go and no place
/// in line (a task with a deadline gets it at once), and a writer waiting behind a reader
/// leaves no claim (a new reader enters while the first still reads).
///
/// Negative control: with `Claim`'s drop made a no-op (locker.rs) the writer's case fails
/// (a reader is kept out after the writer's future was dropped).
#[tokio::test(start_paused = true)]
async fn an_acquisition_dropped_at_any_poll_leaves_nothing() {
    use lock_core::LeaseKind;
    for distributed in [false, true] {
        for kind in [LeaseKind::Exclusive, LeaseKind::Write] {
            for drop_after in 1..=40 {
                let memory = Arc::new(MemoryLock::new());
                let locker = Locker::new(Slow {
                    memory: Arc::clone(&memory),
                    polls: 2,
                    distributed,
                });
                let options = LockOptions::default()
                    .with_ttl(Duration::from_secs(10))
                    .with_retry(RetryPolicy::forever().with_retry_delay(Duration::from_millis(10)));
                let holder_kind = if kind == LeaseKind::Write {
                    LeaseKind::Read
                } else {
                    LeaseKind::Exclusive
                };
                let holder = locker
                    .acquire_kind("k", holder_kind, &options)
                    .await
                    .unwrap();
                let case =
                    format!("distributed {distributed}, {kind}, dropped after {drop_after} polls");
                {
                    let mut acquisition = Box::pin(locker.acquire_kind("k", kind, &options));
                    for _ in 0..drop_after {
                        let polled = std::future::poll_fn(|cx| {
                            std::task::Poll::Ready(acquisition.as_mut().poll(cx))
                        })
                        .await;
                        assert!(polled.is_pending(), "{case}: finished while held");
                        tokio::time::sleep(Duration::from_millis(3)).await;
                    }
                }
                settle().await;
                if kind == LeaseKind::Write {
                    let reader = locker
                        .acquire_kind(
                            "k",
                            LeaseKind::Read,
                            &options.clone().with_retry(RetryPolicy::none()),
                        )
                        .await;
                    assert!(reader.is_ok(), "{case}: a new reader kept out: {reader:?}");
                    reader.unwrap().release().await.unwrap();
                }
                holder.release().await.unwrap();
                settle().await;
                let next = locker
                    .acquire_kind(
                        "k",
                        kind,
                        &options.clone().with_retry(
                            RetryPolicy::forever().with_deadline(Duration::from_millis(5)),
                        ),
                    )
                    .await;
                assert!(next.is_ok(), "{case}: the key is not free: {next:?}");
                next.unwrap().release().await.unwrap();
            }
        }
    }
}

/// Promise (`Locker::stop`): the clean-ups of attempts, and the releases sent from a task, are
/// given time to finish before the backend closes, "so that a process that stops its client
/// and exits right after [...] leaves no lock behind".
///
/// An attempt whose answer came back after its validity (`born_valid`) is released from a
/// task; `stop` right after the acquisition gave up does not wait for that release. On main
/// the backend closes first, the release fails, and the lock stays in the store until its
/// expiry (here 400 ms past the validity, the store's drift).
#[tokio::test(start_paused = true)]
async fn stop_waits_for_the_release_of_a_lock_born_expired() {
    let memory = Arc::new(MemoryLock::new());
    let locker = Locker::new(
        Late::new(&memory)
            .answering_after(Duration::from_millis(600))
            .drifting(Duration::from_millis(500)),
    )
    .with_options(
        LockOptions::default()
            .with_ttl(Duration::from_secs(1))
            .with_retry(RetryPolicy::none()),
    )
    .unwrap();
    let outcome = locker.acquire("k").await;
    // Nobody else held the key: the answer was late, and the error says so (it said "held").
    assert!(
        matches!(&outcome, Err(LockError::Backend { message, .. }) if message.contains("raise the ttl")),
        "an answer past its validity is a failure that names the ttl: {outcome:?}"
    );
    locker.stop().await.unwrap();
    settle().await;
    assert!(
        free(&memory, "k").await,
        "the lock born expired was left in the store after stop (its release not waited for)"
    );
}

/// Promise (`Locker::stop`): the releases of guards dropped before are given time to finish
/// before the backend closes, "so that a process that stops its client and exits right after
/// [...] leaves no lock behind".
///
/// Two parts of a program stop the same client (a clone each, say a signal handler and the
/// main path): on main the second `stop` returns at once, while the first still waits for the
/// release of a guard dropped before, and a process that exits when it returns leaves that
/// lock in the store.
#[tokio::test(start_paused = true)]
async fn a_second_stop_waits_like_the_first() {
    let memory = Arc::new(MemoryLock::new());
    let locker = Locker::new(Late::new(&memory).releases_taking(Duration::from_millis(50)))
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(10))
                .with_retry(RetryPolicy::none()),
        )
        .unwrap();
    let guard = locker.acquire("k").await.unwrap();
    drop(guard);
    let first = tokio::spawn({
        let locker = locker.clone();
        async move { locker.stop().await }
    });
    tokio::task::yield_now().await;
    let second_started = tokio::time::Instant::now();
    locker.stop().await.unwrap();
    let second_took = second_started.elapsed();
    let free = free(&memory, "k").await;
    first.await.unwrap().unwrap();
    assert!(
        free,
        "the second stop returned after {second_took:?} with the dropped guard's lock still in the store"
    );
}

/// Held: a deadline of 1 ns on a distributed store that takes the key in its answer's first
/// poll and answers 100 ms later: the acquisition gives up on time (`Timeout`, within tokio's
/// timer resolution of 1 ms, long before the answer), and the key its cut-short attempt took is free
/// again once the clean-up ran, before its ttl.
///
/// Negative control: with `PendingAttempt`'s drop made a no-op (locker.rs) the key stays held.
#[tokio::test(start_paused = true)]
async fn a_one_nanosecond_deadline_gives_up_on_time_and_leaves_nothing() {
    let memory = Arc::new(MemoryLock::new());
    let locker = Locker::new(Late::new(&memory).answering_after(Duration::from_millis(100)))
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(10))
                .with_retry(RetryPolicy::forever().with_deadline(Duration::from_nanos(1))),
        )
        .unwrap();
    let started = tokio::time::Instant::now();
    let outcome = locker.acquire("k").await;
    assert!(
        matches!(outcome, Err(LockError::Timeout { .. })),
        "{outcome:?}"
    );
    assert!(
        started.elapsed() <= Duration::from_millis(1),
        "{:?}",
        started.elapsed()
    );
    settle().await;
    assert!(
        free(&memory, "k").await,
        "the cut-short attempt's key is still held"
    );
}

/// Promise (`Locker::stop`): what the client's acquisitions have in the store is cleaned up
/// before the backend closes, "so that a process that stops its client and exits right after
/// [...] leaves no lock behind"; after `stop`, calls of the client fail with `Stopped`.
///
/// An acquisition whose attempt is on the wire when `stop` is called (a distributed store
/// that takes the key and answers 100 ms later): on main `stop` returns at once and closes
/// the backend, then the attempt comes back and the stopped client hands out a guard whose
/// lock it can no longer release (the store is closed): the lock stays for its whole ttl.
#[tokio::test(start_paused = true)]
async fn stop_cleans_up_an_attempt_on_the_wire() {
    let memory = Arc::new(MemoryLock::new());
    let locker = Locker::new(Late::new(&memory).answering_after(Duration::from_millis(100)))
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(10))
                .with_retry(RetryPolicy::none()),
        )
        .unwrap();
    let acquisition = tokio::spawn({
        let locker = locker.clone();
        async move { locker.acquire("k").await }
    });
    settle().await;
    locker.stop().await.unwrap();
    let outcome = acquisition.await.unwrap();
    let handed_out = outcome.is_ok();
    drop(outcome);
    settle().await;
    let free = free(&memory, "k").await;
    assert!(
        free && !handed_out,
        "after stop: a guard handed out: {handed_out}; the key left held in the store: {}",
        !free
    );
}

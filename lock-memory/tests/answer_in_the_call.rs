//! What the core does with a backend's answer that needs awaiting ([`Answer::later`]) on the
//! first attempt of an acquisition: a distributed store is asked once per attempt; a store in
//! this process that answers later has its first answer dropped unpolled and is asked again
//! with the same request (see [`Lock::try_acquire`]), so it does everything in its future,
//! nothing in the call. Wrappers around the memory backend show both sides.
#![allow(clippy::unwrap_used)]

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use lock_core::raw::{Acquired, Answer, Capabilities, Lock, LockRequest, async_trait};
use lock_core::{LockError, LockOptions, Locker, Result, RetryPolicy, Token};
use lock_memory::MemoryLock;

/// Answers later; does its work in the future (as the contract asks), counting calls, polls
/// and the tokens it was called with.
#[derive(Debug, Default)]
struct Lazy {
    inner: MemoryLock,
    eager: bool,
    distributed: bool,
    calls: AtomicU32,
    polls: AtomicU32,
    tokens: Mutex<Vec<Token>>,
}

#[async_trait]
impl Lock for Lazy {
    fn name(&self) -> &'static str {
        "lazy"
    }
    fn capabilities(&self) -> Capabilities {
        if self.distributed {
            Capabilities::NONE.with_distributed()
        } else {
            Capabilities::NONE
        }
    }
    fn try_acquire<'a>(&'a self, request: &'a LockRequest) -> Answer<'a, Acquired> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.tokens
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(request.token().clone());
        if self.eager {
            // Takes the key in the call, which the contract forbids for an answer given later.
            let inner = self.inner.try_acquire(request);
            return Answer::later(async move {
                self.polls.fetch_add(1, Ordering::SeqCst);
                inner.await
            });
        }
        Answer::later(async move {
            self.polls.fetch_add(1, Ordering::SeqCst);
            self.inner.try_acquire(request).await
        })
    }
    fn abandon<'a>(&'a self, request: &'a LockRequest) -> Answer<'a, Result<bool>> {
        Answer::later(async move { self.inner.abandon(request).await })
    }
}

fn options() -> LockOptions {
    LockOptions::default()
        .with_ttl(Duration::from_secs(30))
        .with_retry(RetryPolicy::doubling(Duration::from_millis(10), 5))
}

/// A store shared between processes answers after I/O: the first attempt is made by the
/// waiting path, which awaits its answer, so the store is asked once per attempt. Counted
/// retries keep the in-process queue out of it.
#[tokio::test(start_paused = true)]
async fn a_distributed_backend_is_asked_once_per_attempt() {
    for eager in [false, true] {
        let lock = std::sync::Arc::new(Lazy {
            eager,
            distributed: true,
            ..Lazy::default()
        });
        let locker = Locker::from_arc(lock.clone());
        let guard = locker.acquire_with("k", &options()).await.unwrap();
        assert_eq!(
            lock.calls.load(Ordering::SeqCst),
            1,
            "asked once (eager: {eager})"
        );
        assert_eq!(lock.polls.load(Ordering::SeqCst), 1, "awaited once");
        guard.release().await.unwrap();
        let single = locker.try_acquire("k").await.unwrap();
        assert!(single.is_some());
        assert_eq!(
            lock.calls.load(Ordering::SeqCst),
            2,
            "a single attempt asks once"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_later_first_answer_is_dropped_unpolled_and_asked_again_with_the_same_request() {
    let lock = std::sync::Arc::new(Lazy::default());
    let locker = Locker::from_arc(lock.clone());
    let guard = locker.acquire_with("k", &options()).await.unwrap();
    assert_eq!(lock.calls.load(Ordering::SeqCst), 2, "called twice");
    assert_eq!(lock.polls.load(Ordering::SeqCst), 1, "awaited once");
    let tokens = lock.tokens.lock().unwrap().clone();
    assert!(tokens[0] == tokens[1], "the same request");
    guard.release().await.unwrap();
}

/// A backend that takes the key in the call and answers later breaks the contract: the first
/// answer is dropped, the key stays taken by its token, and the second call finds it held.
/// This is why [`Lock::try_acquire`] says so.
#[tokio::test(start_paused = true)]
async fn a_backend_that_takes_the_key_in_the_call_finds_its_own_lock() {
    let lock = std::sync::Arc::new(Lazy {
        eager: true,
        ..Lazy::default()
    });
    let locker = Locker::from_arc(lock.clone());
    let result = locker.acquire_with("k", &options()).await;
    assert!(
        matches!(result, Err(LockError::Timeout { .. })),
        "{result:?}"
    );
}

/// Polls `future` once.
fn poll_once<F: std::future::Future>(future: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    future.poll(&mut context)
}

#[tokio::test(start_paused = true)]
async fn a_writer_cancelled_after_its_first_poll_or_timed_out_takes_its_claim_back() {
    let locker = Locker::new(MemoryLock::new())
        .with_options(
            LockOptions::default().with_retry(RetryPolicy::doubling(Duration::from_millis(10), 5)),
        )
        .unwrap();
    let reader = locker.acquire_read("rw").await.unwrap();
    {
        let writer = locker.acquire_write("rw");
        tokio::pin!(writer);
        assert!(poll_once(writer.as_mut()).is_pending());
        // The claim keeps new readers out while the writer waits.
        assert!(
            locker
                .try_acquire_kind("rw", lock_core::LeaseKind::Read)
                .await
                .unwrap()
                .is_none()
        );
    }
    let second = locker
        .try_acquire_kind("rw", lock_core::LeaseKind::Read)
        .await
        .unwrap();
    assert!(
        second.is_some(),
        "the cancelled writer's claim is gone at once"
    );
    drop(second);
    // Deadline 0.
    let options = LockOptions::default().with_retry(
        RetryPolicy::doubling(Duration::from_millis(10), 5).with_deadline(Duration::from_nanos(1)),
    );
    let result = locker
        .acquire_kind("rw", lock_core::LeaseKind::Write, &options)
        .await;
    assert!(
        matches!(result, Err(LockError::Timeout { .. })),
        "{result:?}"
    );
    let third = locker
        .try_acquire_kind("rw", lock_core::LeaseKind::Read)
        .await
        .unwrap();
    assert!(
        third.is_some(),
        "the timed-out writer's claim is gone at once"
    );
    drop(reader);
}

/// The conformance case that checks it, with its negative control: the wrapper that takes the
/// key in the call fails it; the one that does everything in its future passes.
#[tokio::test]
async fn the_conformance_case_catches_a_backend_that_acts_in_the_call() {
    use lock_core::conformance::{Outcome, run};
    const CASE: &str = "an_answer_dropped_unpolled_does_nothing";
    let lazy = std::sync::Arc::new(Lazy::default());
    assert_eq!(run(CASE, lazy).await, Outcome::Passed);
    let eager = std::sync::Arc::new(Lazy {
        eager: true,
        ..Lazy::default()
    });
    let failed = tokio::spawn(run(CASE, eager)).await;
    assert!(
        failed.is_err_and(|error| error.is_panic()),
        "the eager wrapper must fail"
    );
}

/// A distributed store whose handles answer later, counting how often the core asks them to
/// release.
#[derive(Debug, Default)]
struct Remote {
    inner: MemoryLock,
    releases: std::sync::Arc<AtomicU32>,
}

#[derive(Debug)]
struct RemoteHandle {
    inner: Box<dyn lock_core::raw::Handle>,
    releases: std::sync::Arc<AtomicU32>,
}

#[async_trait]
impl lock_core::raw::Handle for RemoteHandle {
    fn lease(&self) -> &lock_core::Lease {
        self.inner.lease()
    }
    async fn extend(&mut self, ttl: Duration) -> Result<()> {
        self.inner.extend(ttl).await
    }
    fn release(&mut self) -> Answer<'_, Result<()>> {
        self.releases.fetch_add(1, Ordering::SeqCst);
        Answer::later(async move { self.inner.release().await })
    }
}

#[async_trait]
impl Lock for Remote {
    fn name(&self) -> &'static str {
        "remote"
    }
    fn capabilities(&self) -> Capabilities {
        MemoryLock::new().capabilities().with_distributed()
    }
    fn try_acquire<'a>(&'a self, request: &'a LockRequest) -> Answer<'a, Acquired> {
        Answer::later(async move {
            let handle = self.inner.try_acquire(request).await?;
            Ok(handle.map(|inner| {
                Box::new(RemoteHandle {
                    inner,
                    releases: std::sync::Arc::clone(&self.releases),
                }) as Box<dyn lock_core::raw::Handle>
            }))
        })
    }
    fn abandon<'a>(&'a self, request: &'a LockRequest) -> Answer<'a, Result<bool>> {
        Answer::later(async move { self.inner.abandon(request).await })
    }
}

/// A guard of a distributed store asks its handle to release once, whether it is released by
/// hand, kept alive and then released, or dropped (the release then runs on a task): no answer
/// is built only to be dropped.
#[tokio::test(start_paused = true)]
async fn a_distributed_guard_asks_its_handle_to_release_once() {
    let lock = std::sync::Arc::new(Remote::default());
    let locker = Locker::from_arc(lock.clone())
        .with_options(options())
        .unwrap();
    let count = || lock.releases.load(Ordering::SeqCst);
    locker.acquire("k").await.unwrap().release().await.unwrap();
    assert_eq!(count(), 1, "released by hand");
    let mut kept = locker.acquire("k").await.unwrap();
    let _lost = kept.keep_alive().unwrap();
    kept.release().await.unwrap();
    assert_eq!(count(), 2, "kept alive, then released by hand");
    drop(locker.acquire("k").await.unwrap());
    locker.stop().await.unwrap();
    assert_eq!(count(), 3, "dropped: released on a task");
    assert!(
        lock.inner
            .try_acquire(
                &LockRequest::new(
                    lock_core::raw::KeySet::one(lock_core::Key::new("k").unwrap()),
                    Token::generate().unwrap(),
                    Duration::from_secs(1),
                )
                .unwrap()
            )
            .await
            .unwrap()
            .is_some(),
        "the key is free"
    );
}

/// A kept-alive guard of a distributed store dropped outside any runtime is released once, on
/// its watchdog's runtime, and `stop` waits for that release; so is one dropped inside a runtime.
#[test]
fn a_kept_alive_distributed_guard_dropped_anywhere_is_released_once_and_stop_waits() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let lock = std::sync::Arc::new(Remote::default());
    let locker = Locker::from_arc(lock.clone())
        .with_options(options())
        .unwrap();
    let count = || lock.releases.load(Ordering::SeqCst);
    let free = |lock: &Remote| {
        runtime.block_on(async {
            lock.inner
                .try_acquire(
                    &LockRequest::new(
                        lock_core::raw::KeySet::one(lock_core::Key::new("k").unwrap()),
                        Token::generate().unwrap(),
                        Duration::from_secs(1),
                    )
                    .unwrap(),
                )
                .await
                .unwrap()
                .map(|mut handle| async move { handle.release().await })
        })
    };
    // Dropped inside a runtime.
    runtime.block_on(async {
        let mut kept = locker.acquire("k").await.unwrap();
        let _lost = kept.keep_alive().unwrap();
        drop(kept);
        locker.stop().await.unwrap();
    });
    assert_eq!(count(), 1, "dropped in a runtime: released once");
    let taken = free(&lock).expect("the key is free after a drop in a runtime");
    runtime.block_on(taken).unwrap();
    // Dropped outside any runtime.
    let locker = Locker::from_arc(lock.clone())
        .with_options(options())
        .unwrap();
    let kept = runtime.block_on(async {
        let mut kept = locker.acquire("k").await.unwrap();
        let _lost = kept.keep_alive().unwrap();
        kept
    });
    drop(kept);
    runtime.block_on(locker.stop()).unwrap();
    assert_eq!(count(), 2, "dropped outside a runtime: released once");
    assert!(
        free(&lock).is_some(),
        "the key is free after a drop outside a runtime"
    );
}

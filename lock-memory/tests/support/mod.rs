//! Helpers shared by lock-memory's test files (`mod support;`). Each test file is a crate of its
//! own and uses some of them only, hence `dead_code` allowed.
#![allow(dead_code, clippy::unwrap_used)]

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use lock_core::raw::Lock;
use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_memory::MemoryLock;

/// `n` milliseconds.
pub(crate) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Waits as long as it takes, asking again every `delay` exactly (no jitter, no growth).
pub(crate) fn every(delay: Duration) -> RetryPolicy {
    RetryPolicy::forever()
        .with_retry_delay(delay)
        .with_retry_jitter(Duration::ZERO)
        .with_max_delay(delay)
}

/// A client of `lock` (a store or a wrapper of one) with leases of `ttl` and `retry`.
pub(crate) fn client(lock: impl Lock, ttl: Duration, retry: RetryPolicy) -> Locker {
    Locker::new(lock)
        .with_options(LockOptions::default().with_ttl(ttl).with_retry(retry))
        .unwrap()
}

/// A client of the store `lock` (another handle on the same table).
pub(crate) fn locker(lock: &MemoryLock, ttl: Duration, retry: RetryPolicy) -> Locker {
    client(lock.clone(), ttl, retry)
}

/// Polls `future` once, with a waker that does nothing.
pub(crate) fn poll_once<F: Future + ?Sized>(future: Pin<&mut F>) -> Poll<F::Output> {
    future.poll(&mut Context::from_waker(std::task::Waker::noop()))
}

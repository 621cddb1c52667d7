//! Attack on "the retry loop never runs without awaiting its backoff": a retry delay of zero
//! (accepted by `RetryPolicy::validate`) with a backend whose attempt and wait answer at once.
//! The early-wake counter only counts waits that ended before `wake_at`; with a zero delay
//! `wake_at` is `now`, no wait ever counts as early, and the loop never reaches its plain sleep.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lock_core::{
    Capabilities, Handle, Key, Lock, LockOptions, LockRequest, Locker, Result, RetryPolicy, Token,
    async_trait,
};

/// Runs `future` on a runtime of its own thread; `None` when it has not returned within `limit`
/// (a future that never yields cannot be cancelled by tokio's own timeout).
fn returns_within<T: Send + 'static>(
    limit: Duration,
    future: impl std::future::Future<Output = T> + Send + 'static,
) -> Option<T> {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let _ = done.send(runtime.block_on(future));
    });
    finished.recv_timeout(limit).ok()
}

/// Always held; its wait returns at once (as `retry_never_spins`'s `NeverFree`).
#[derive(Debug, Default)]
struct NeverFree {
    attempts: Arc<AtomicU64>,
}

#[async_trait]
impl Lock for NeverFree {
    fn name(&self) -> &'static str {
        "never-free"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE.with_wake_on_release()
    }
    async fn try_acquire(&self, _request: &LockRequest) -> Result<Option<Box<dyn Handle>>> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        Ok(None)
    }
    async fn abandon(&self, _keys: &[Key], _token: &Token) -> Result<bool> {
        Ok(false)
    }
    async fn wait_for_release(&self, _keys: &[Key], _max_wait: Duration) -> Result<()> {
        Ok(())
    }
}

#[test]
fn a_zero_retry_delay_cannot_make_the_loop_spin() {
    let attempts = Arc::new(AtomicU64::new(0));
    let backend = NeverFree {
        attempts: Arc::clone(&attempts),
    };
    let retry = RetryPolicy::forever()
        .with_retry_delay(Duration::ZERO)
        .with_retry_jitter(Duration::ZERO);
    assert!(retry.validate().is_ok(), "a zero delay is accepted");
    let outcome = returns_within(Duration::from_secs(5), async move {
        let locker = Locker::new(backend)
            .with_local_queue(false)
            .with_options(LockOptions::default().with_retry(retry))
            .unwrap();
        tokio::time::timeout(Duration::from_millis(200), locker.acquire("k"))
            .await
            .is_err()
    });
    let made = attempts.load(Ordering::SeqCst);
    println!(
        "zero retry delay: timeout(200 ms) returned: {}, attempts after 5 s: {made}",
        outcome.is_some()
    );
    assert!(
        outcome.is_some(),
        "a 200 ms timeout could not cancel acquire within 5 s ({made} attempts): the retry loop spins without yielding"
    );
}

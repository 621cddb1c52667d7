//! Work in the background that a client lets finish, for a bounded time, before it closes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// A count of pieces of background work that a client lets finish before it closes: each
/// piece holds an [`InProgress`] while it runs, and [`Settling::settled`] waits, for a bounded
/// time, until none is left.
///
/// [`Locker::stop`](crate::Locker::stop) counts the clean-ups of interrupted attempts and the
/// releases of dropped guards this way. A backend counts what its own operations leave
/// running after they have answered and that must not be cut off by its
/// [`Lock::shutdown`](crate::raw::Lock::shutdown): Redlock's release, for one, answers once a
/// majority of nodes did, and in the background waits for the others and sends the release
/// again to a node that took the key after the release reached it.
///
/// ```
/// use std::time::Duration;
/// use lock_core::raw::Settling;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let settling = Settling::default();
/// let work = settling.enter();
/// tokio::spawn(async move {
///     tokio::time::sleep(Duration::from_millis(100)).await;
///     drop(work);
/// });
/// assert!(settling.settled(Duration::from_secs(1)).await);
/// assert_eq!(settling.running(), 0);
/// // A piece of work that never ends is waited for no longer than the limit.
/// let _forever = settling.enter();
/// assert!(!settling.settled(Duration::from_millis(10)).await);
/// # }
/// ```
#[derive(Clone, Debug, Default)]
pub struct Settling(Arc<Count>);

#[derive(Debug, Default)]
struct Count {
    running: AtomicUsize,
    settled: Notify,
}

/// One piece of work counted by a [`Settling`], until it is dropped (however the work ends).
#[derive(Debug)]
#[must_use = "the work counts as running until this is dropped"]
pub struct InProgress(Arc<Count>);

impl Settling {
    /// Counts one more piece of work, until the returned [`InProgress`] is dropped.
    pub fn enter(&self) -> InProgress {
        self.0.running.fetch_add(1, Ordering::SeqCst);
        InProgress(Arc::clone(&self.0))
    }

    /// How many pieces of work are running now.
    pub fn running(&self) -> usize {
        self.0.running.load(Ordering::SeqCst)
    }

    /// Waits until no piece of work runs (true), or `limit` has passed (false).
    pub async fn settled(&self, limit: Duration) -> bool {
        let all_done = async {
            loop {
                let notified = self.0.settled.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.running() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, all_done).await.is_ok()
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.settled.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_every_piece_and_no_longer_than_the_limit() {
        let settling = Settling::default();
        assert!(settling.settled(Duration::ZERO).await, "nothing runs");
        let first = settling.enter();
        let second = settling.enter();
        let start = tokio::time::Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(first);
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(second);
        });
        assert!(settling.settled(Duration::from_secs(1)).await);
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(200),
            "both waited for"
        );
        let _stuck = settling.enter();
        let start = tokio::time::Instant::now();
        assert!(!settling.settled(Duration::from_millis(300)).await);
        assert_eq!(start.elapsed(), Duration::from_millis(300));
    }
}

//! Keeping a lock alive in the background, and telling its holder when it is lost.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use tokio::time::Instant;

use crate::error::LockError;
use crate::local::Validity;
use crate::lock::Handle;
use crate::metrics::{self, HeldWatch};

/// What the watchdog publishes about its lock.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Status {
    pub(crate) valid_until: Instant,
    pub(crate) lost: bool,
    /// Set by the guard, while it holds the handle, when it releases the lock: a watchdog
    /// that was already past its sleep when it was stopped (running on another worker thread,
    /// it only stops at its next await) must not extend the released lock and report it lost.
    pub(crate) ended: bool,
}

/// Marks the lock released by its guard; called with the handle's mutex held. Receivers are not
/// woken: nothing they wait for changed.
pub(crate) fn end(status: &watch::Sender<Status>) {
    status.send_if_modified(|status| {
        status.ended = true;
        false
    });
}

/// Fires when a lock is lost: an extension failed, or the local validity lapsed.
///
/// Cheap to clone; hand it to the critical section and stop work when it fires, e.g. with
/// `tokio::select!` on [`LostSignal::lost`].
#[derive(Clone, Debug)]
pub struct LostSignal {
    status: watch::Receiver<Status>,
}

impl LostSignal {
    pub(crate) fn new(status: watch::Receiver<Status>) -> Self {
        Self { status }
    }

    /// True once the lock is lost.
    pub fn is_lost(&self) -> bool {
        self.status.borrow().lost
    }

    /// Resolves when the lock is lost; never, if it is released first.
    pub async fn lost(&self) {
        let mut status = self.status.clone();
        if status.wait_for(|status| status.lost).await.is_err() {
            // The watchdog ended without losing the lock (it was released): nothing to report.
            std::future::pending::<()>().await;
        }
    }
}

/// Extends `handle` by `ttl` whenever a third of the ttl is left, until it is stopped or the lock
/// is lost. Failed extensions are retried while the lock is still valid; a lock that is not held
/// any more, or whose validity lapses, is reported lost and the task ends. For a backend that
/// cannot extend, the loss is reported when the validity lapses. Each extension also moves
/// `queue_validity`, the end of the holder's places in this process's queue. Failed extends and
/// the loss are counted for `backend` on the guard's share of the `lock_held` gauge (`held`).
pub(crate) async fn keep_alive(
    handle: Arc<Mutex<Box<dyn Handle>>>,
    ttl: Duration,
    status: Arc<watch::Sender<Status>>,
    queue_validity: Option<Arc<Validity>>,
    (backend, held): (&'static str, HeldWatch),
) {
    let lead = ttl / 3;
    let retry_every = (ttl / 10).max(Duration::from_millis(1));
    let mut can_extend = true;
    let mut planned_for = status.borrow().valid_until;
    let mut next_try = planned_for.checked_sub(lead).unwrap_or_else(Instant::now);
    // The holder may extend by hand (even to a shorter ttl): the plan follows every change.
    let mut changes = status.subscribe();
    loop {
        let valid_until = changes.borrow_and_update().valid_until;
        if valid_until != planned_for {
            planned_for = valid_until;
            next_try = valid_until.checked_sub(lead).unwrap_or_else(Instant::now);
        }
        let wake_at = if can_extend {
            next_try.min(valid_until)
        } else {
            valid_until
        };
        tokio::select! {
            () = tokio::time::sleep_until(wake_at) => {}
            changed = changes.changed() => {
                if changed.is_ok() {
                    continue;
                }
            }
        }
        // The holder may have extended it meanwhile.
        let Status {
            valid_until, ended, ..
        } = *status.borrow();
        if ended {
            return;
        }
        if Instant::now() >= valid_until {
            tracing::warn!("lock validity lapsed; reporting it lost");
            held.lost();
            status.send_modify(|status| status.lost = true);
            return;
        }
        if !can_extend {
            continue;
        }
        let mut handle = handle.lock().await;
        if status.borrow().ended {
            return;
        }
        let extended = handle.extend(ttl).await;
        if let Err(error) = &extended {
            metrics::extend_failed(backend, error);
        }
        match extended {
            Ok(()) => {
                let valid_until = handle.valid_until();
                status.send_modify(|status| status.valid_until = valid_until);
                planned_for = valid_until;
                if let Some(queue_validity) = &queue_validity {
                    queue_validity.set(valid_until);
                }
                next_try = valid_until.checked_sub(lead).unwrap_or_else(Instant::now);
                tracing::debug!(
                    ttl_ms = ttl.as_millis() as u64,
                    "watchdog extended the lock"
                );
            }
            Err(error @ (LockError::NotHeld { .. } | LockError::Stopped)) => {
                tracing::warn!(%error, "watchdog found the lock lost");
                held.lost();
                status.send_modify(|status| status.lost = true);
                return;
            }
            Err(LockError::Unsupported { .. }) => can_extend = false,
            Err(error) => {
                tracing::warn!(%error, "watchdog could not extend the lock; retrying while it is valid");
                next_try = Instant::now() + retry_every;
            }
        }
    }
}

//! Keeping a lock alive in the background, and telling its holder when it is lost.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use tokio::time::Instant;

use crate::error::LockError;
use crate::lease::Live;
use crate::lock::Handle;
use crate::metrics::{self, HeldWatch};
use crate::raw::validate;

/// The resolution of tokio's timer.
const TIMER_TICK: Duration = Duration::from_millis(1);

/// How late tokio's timer may fire a wake-up: it rounds the deadline up to the next whole
/// millisecond of its wheel, then parks for that many whole milliseconds counted from its
/// current tick (rounded down), that is from up to a millisecond before the moment it parks. A
/// wake-up planned inside a millisecond (where every lock taken on a real clock is) may so fire
/// up to two ticks after its deadline.
const TIMER_SLACK: Duration = Duration::from_millis(2);

/// Marks the lease released by its guard; called with the handle's mutex held. Receivers are
/// not woken: nothing they wait for changed.
pub(crate) fn end(live: &watch::Sender<Live>) {
    live.send_if_modified(|live| {
        live.ended = true;
        false
    });
}

/// Marks the lease lost, waking the [`LostSignal`]s and the waiters of this process; its
/// validity ends now (the store said it is not ours, or the validity had passed already), so
/// that `is_valid` and `remaining` agree with the signal.
pub(crate) fn lose(live: &watch::Sender<Live>) {
    live.send_modify(|live| {
        live.lost = true;
        live.valid_until = live.valid_until.min(Instant::now());
    });
}

/// Ends the lease's validity at `until` if it would end later: an extend whose answer did not
/// come may still be taken by the store, with a ttl that ends the lock sooner. Receivers are
/// woken (the watchdog plans from the new validity).
pub(crate) fn cap(live: &watch::Sender<Live>, until: Instant) {
    live.send_if_modified(|live| {
        if live.lost || live.valid_until <= until {
            return false;
        }
        live.valid_until = until;
        true
    });
}

/// Fires when a lock is lost: an extension failed, or the local validity lapsed.
///
/// Cheap to clone; hand it to the critical section and stop work when it fires, e.g. with
/// `tokio::select!` on [`LostSignal::lost`].
#[derive(Clone, Debug)]
pub struct LostSignal {
    status: watch::Receiver<Live>,
    /// The watchdog's task: a lapse it cannot report (its runtime shut down) is told by the
    /// signal itself.
    watchdog: tokio::task::AbortHandle,
}

/// How soon [`LostSignal::lost`] first looks again, after the validity's end, whether the
/// watchdog's task is gone (its runtime shut down); it then looks at growing intervals, up to
/// [`GONE_CHECK_MAX`].
const GONE_CHECK: Duration = Duration::from_millis(10);

/// The longest interval between two looks of [`LostSignal::lost`] at the watchdog's task.
const GONE_CHECK_MAX: Duration = Duration::from_secs(1);

impl LostSignal {
    pub(crate) fn new(status: watch::Receiver<Live>, watchdog: tokio::task::AbortHandle) -> Self {
        Self { status, watchdog }
    }

    /// True once the lock is found lost (by the watchdog, an extend or a release). A lapse
    /// nobody reported (the watchdog's runtime shut down) is told by [`LostSignal::lost`] and
    /// the guard's `is_valid`.
    pub fn is_lost(&self) -> bool {
        self.status.borrow().lost
    }

    /// Resolves when the lock is lost; never, if it is released first.
    ///
    /// Also when the validity lapsed unextended and no watchdog is left to report it: a guard
    /// kept alive on a runtime that was shut down (the guard held on elsewhere) is extended by
    /// nothing and reported by nothing, and the lock lapses all the same; it resolves then (the
    /// watchdog's task gone is looked at from the lapse on, 10 ms to 1 s apart). While the
    /// watchdog's task exists, the watchdog alone reports the loss (an extend in flight may yet
    /// move the validity, and the loss is counted once): a watchdog on a runtime that nothing
    /// runs any more reports nothing, and neither does this. So it is awaited on a runtime with
    /// timers, as every wait of a [`Locker`](crate::Locker) is.
    pub async fn lost(&self) {
        let mut status = self.status.clone();
        // Every sender gone: the handle was dropped without a release, and nothing moves the
        // lease any more.
        let mut closed = false;
        let mut gone_check = GONE_CHECK;
        loop {
            let (lost, ended, valid_until) = {
                let live = status.borrow_and_update();
                (live.lost, live.ended, live.valid_until)
            };
            if lost {
                return;
            }
            if ended {
                // Released first: nothing to report.
                std::future::pending::<()>().await;
            }
            let now = Instant::now();
            if now >= valid_until && self.watchdog.is_finished() {
                return;
            }
            let look_at = if now < valid_until {
                valid_until
            } else {
                let at = now + gone_check;
                gone_check = (gone_check * 2).min(GONE_CHECK_MAX);
                at
            };
            if closed {
                tokio::time::sleep_until(look_at).await;
                continue;
            }
            tokio::select! {
                changed = status.changed() => closed = changed.is_err(),
                () = tokio::time::sleep_until(look_at) => {}
            }
        }
    }
}

/// Extends `handle` by `ttl` whenever a third of the ttl is left, until it is stopped or the lock
/// is lost. Failed extensions are retried while the lock is still valid; a lock that is not held
/// any more, or whose validity lapses, is reported lost and the task ends. For a backend that
/// cannot extend, the loss is reported when the validity lapses. `live` is the lease's shared
/// cell (see [`Lease`](crate::Lease)): the handle moves it on every extend, this task's or the
/// holder's, so the guard and the waiters of this process follow without being told. Failed
/// extends and the loss are counted for `backend` on the guard's share of the `lock_held` gauge
/// (`held`).
pub(crate) async fn keep_alive(
    handle: Arc<Mutex<Box<dyn Handle>>>,
    ttl: Duration,
    live: watch::Sender<Live>,
    (backend, held): (&'static str, HeldWatch),
) {
    // A third of the ttl, and at least how late tokio's timer may fire (two ticks) where the
    // ttl leaves room for it: a plan less than that before expiry (a 2 ms ttl's 0.67 ms, a
    // 5 ms ttl's 1.67 ms) may fire at the expiry itself. Below 4 ms, half the ttl: such a lock
    // is kept alive only when its plans fall early enough in their millisecond.
    let lead = (ttl / 3).max(TIMER_SLACK.min(ttl / 2));
    let retry_every = (ttl / 10).max(TIMER_TICK);
    let mut can_extend = true;
    let mut planned_for = live.borrow().valid_until;
    let mut next_try = planned_for.checked_sub(lead).unwrap_or_else(Instant::now);
    // The holder may extend by hand (even to a shorter ttl): the plan follows every change.
    let mut changes = live.subscribe();
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
        let Live {
            valid_until, ended, ..
        } = *live.borrow();
        if ended {
            return;
        }
        if Instant::now() >= valid_until {
            return report_lost(&held, &live, &"the lock's validity lapsed");
        }
        if !can_extend {
            continue;
        }
        let mut handle = handle.lock().await;
        let Live {
            valid_until, ended, ..
        } = *live.borrow();
        if ended {
            return;
        }
        // The holder held the handle (an extend or a downgrade by hand) until the validity had
        // lapsed: the lease is lost, as it would have been found had this task not waited, and
        // is not extended (a store whose expiry runs later than the local validity would
        // revive it, unlike an extend by hand, which refuses).
        if Instant::now() >= valid_until {
            return report_lost(
                &held,
                &live,
                &"the lock's validity lapsed while its holder held the handle",
            );
        }
        // The holder extended by hand since this round was planned (at the very moment this
        // task woke, or while it waited for the handle): plan from that validity rather than
        // extend by this task's ttl, which may be shorter and would cut the holder's short.
        if valid_until != planned_for {
            continue;
        }
        // The validity may lapse while the extend is out (a round may wait for a slow node
        // past it): the loss is reported then, not when the round ends, since the critical
        // section stops on the signal and another client may take the lock from that moment.
        // The extend is given up, a failed one.
        let extended = tokio::select! {
            biased;
            extended = handle.extend(ttl) => extended,
            () = tokio::time::sleep_until(valid_until) => {
                let error = LockError::backend(
                    backend,
                    format!(
                        "the validity lapsed before the store answered the watchdog's extend by {} ms",
                        validate::ttl_millis(ttl)
                    ),
                );
                metrics::extend_failed(backend, &error);
                return report_lost(&held, &live, &error);
            }
        };
        if let Err(error) = &extended {
            metrics::extend_failed(backend, error);
        }
        match extended {
            // The store took the new expiry, but its answer came back after the ttl was spent:
            // how much of it is left is unknown (possibly none). As for an extend by hand, a
            // failed extend and a lost lock, not one extended.
            Ok(()) if Instant::now() >= live.borrow().valid_until => {
                let error = LockError::backend(
                    backend,
                    format!(
                        "the store answered the watchdog's extend after its ttl of {} ms was spent; raise the ttl",
                        validate::ttl_millis(ttl)
                    ),
                );
                metrics::extend_failed(backend, &error);
                return report_lost(&held, &live, &error);
            }
            Ok(()) => {
                // The handle moved the lease's validity; the next round plans from it, and no
                // sooner than a retry would: an extend that left less than the lead (a clock
                // that jumped, a backend that took most of the ttl off) is not sent again in
                // a busy loop, and the lease is reported lost when it lapses.
                let valid_until = live.borrow().valid_until;
                planned_for = valid_until;
                next_try = valid_until
                    .checked_sub(lead)
                    .unwrap_or_else(Instant::now)
                    .max(Instant::now() + retry_every);
                tracing::debug!(
                    ttl_ms = ttl.as_millis() as u64,
                    "watchdog extended the lock"
                );
            }
            Err(error @ (LockError::NotHeld { .. } | LockError::Stopped)) => {
                return report_lost(&held, &live, &error);
            }
            Err(LockError::Unsupported { .. }) => can_extend = false,
            Err(error) => {
                tracing::warn!(%error, "watchdog could not extend the lock; retrying while it is valid");
                next_try = Instant::now() + retry_every;
            }
        }
    }
}

/// The watchdog's end when the lease is lost (`why`): logged, counted on the guard's share of
/// the gauge, and the lost signal fired.
fn report_lost(held: &HeldWatch, live: &watch::Sender<Live>, why: &dyn std::fmt::Display) {
    tracing::warn!(%why, "the watchdog reports the lock lost");
    held.lost();
    lose(live);
}

//! The guard users hold while they own a lock.

use std::fmt;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::Instrument;

use crate::error::{LockError, Result};
use crate::key::Key;
use crate::lease::Lease;
use crate::local::{self, Places, Ticket};
use crate::lock::{Handle, LeaseKind};
use crate::locker::{Cleanups, OwnLease};
use crate::metrics::Held;
use crate::raw::validate;
use crate::token::Token;
use crate::watchdog::{self, LostSignal};

/// A held lock. Call [`LockGuard::release`] when done; dropping the guard releases in the
/// background instead.
///
/// [`LockGuard::keep_alive`] hands the lock to a watchdog that extends it before it expires and
/// returns a [`LostSignal`] that fires if it is lost anyway.
///
/// # Drop
/// Dropping never blocks: a lock in this process is released at once (a kept-alive one too,
/// unless its watchdog is extending it on another worker thread at that very moment: then its
/// release is spawned), any other release is spawned on the current tokio runtime, or, for a
/// kept-alive guard dropped outside any runtime, on the runtime its watchdog runs on. A guard
/// that was never kept alive and is dropped outside a runtime cannot send anything to a
/// store: its lock stays until its ttl expires and a warning is logged.
/// An explicit `release().await` is the main path, since it reports whether the lock was still
/// held.
pub struct LockGuard {
    state: State,
    ttl: Duration,
    backend: &'static str,
    /// Places in this process's queue for the keys, left once the store released them or the
    /// lease lapsed, whichever comes first.
    tickets: Option<Tickets>,
    /// This lock's share of the `lock_held` gauge (see [`crate::metrics`]).
    held: Held,
    /// The clean-ups its locker's `stop` waits for: a release spawned on drop counts among them.
    /// Set for the guards of a store shared between processes (`Capabilities::distributed`)
    /// alone, whose answers need I/O: the others are released in the call when they can be.
    cleanups: Option<Arc<Cleanups>>,
    /// Marks the key as held by this client until the store let go of it (a guard of a store
    /// shared between processes): an attempt of its locker that finds the key held meanwhile
    /// met no other process, and owes no courtesy (see `Locker::with_courtesy`).
    own: Option<OwnLease>,
}

/// Queue places, given up on release; waiters behind them give them up for the holder once
/// its lease lapses (they read the lease itself, moved by every extend), so that a holder that
/// neither releases nor extends cannot block its neighbours past its ttl.
struct Tickets {
    places: Arc<Places>,
}

impl Tickets {
    fn give_up(self) {
        local::give_up(&self.places);
    }
}

enum State {
    /// The backend's handle, owned by the guard.
    Held(Box<dyn Handle>),
    /// The handle, shared with a watchdog task that keeps it alive (boxed: the rarer state
    /// should not make every guard larger to move).
    Watched(Box<Watched>),
    /// Given away on release or drop.
    Released,
}

struct Watched {
    handle: Arc<Mutex<Box<dyn Handle>>>,
    /// The handle's lease, read while the watchdog may hold the handle: a clone whose validity
    /// and kind are the cell the handle moves (keys, token and fencing token never change).
    lease: Lease,
    task: tokio::task::JoinHandle<()>,
    /// The runtime the watchdog runs on: a guard dropped outside any runtime releases there.
    runtime: tokio::runtime::Handle,
}

impl LockGuard {
    /// Wraps a handle that a backend returned for a lock of `ttl`. Only the
    /// [`Locker`](crate::Locker) makes guards: what a guard keeps beside the handle (its share
    /// of `lock_held`, its place in the in-process queue, the clean-ups of a writer's claim) is
    /// the core's bookkeeping.
    ///
    /// # Errors
    /// [`LockError::Backend`] if the handle's lease names no key (a backend bug).
    #[inline]
    pub(crate) fn new(
        handle: Box<dyn Handle>,
        backend: &'static str,
        ttl: Duration,
    ) -> Result<Self> {
        if handle.lease().keys().is_empty() {
            return Err(LockError::backend(
                backend,
                "the backend returned a lock handle without keys",
            ));
        }
        Ok(Self {
            state: State::Held(handle),
            ttl,
            backend,
            tickets: None,
            held: Held::start(backend),
            cleanups: None,
            own: None,
        })
    }

    /// Counts a release spawned on drop among the clean-ups that [`Locker::stop`] waits for,
    /// and, for a client that keeps the courtesy (`courteous`), marks its keys as held here
    /// until the store let go of it or it lapsed.
    ///
    /// [`Locker::stop`]: crate::Locker::stop
    pub(crate) fn with_cleanups(mut self, cleanups: &Arc<Cleanups>, courteous: bool) -> Self {
        if courteous {
            self.own = Some(cleanups.own_lease(self.lease()));
        }
        self.cleanups = Some(Arc::clone(cleanups));
        self
    }

    /// What is held: a mutex, a semaphore permit, a read or a write lock.
    pub fn kind(&self) -> LeaseKind {
        self.lease().kind()
    }

    /// Keeps this process's queue places until the lock is released or its lease lapses.
    pub(crate) fn with_tickets(mut self, tickets: Vec<Ticket>) -> Self {
        if tickets.is_empty() {
            return self;
        }
        let live = self.lease().live();
        let places = Arc::new(std::sync::Mutex::new(tickets));
        for ticket in places.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            ticket.keep_until(live, Arc::downgrade(&places));
        }
        self.tickets = Some(Tickets { places });
        self
    }

    /// The lease held: keys, kind, token, validity and fencing token, the same whether the
    /// lock is kept alive or not (its validity follows every extend, the watchdog's too).
    #[inline]
    pub fn lease(&self) -> &Lease {
        match &self.state {
            State::Held(handle) => handle.lease(),
            State::Watched(watched) => &watched.lease,
            // Never observed from outside: a guard is released by value or on drop.
            State::Released => Lease::released(),
        }
    }

    /// The (first) key held, namespaced as stored.
    #[inline]
    pub fn key(&self) -> &Key {
        self.lease().key()
    }

    /// Every key held (several for a multi-key lock).
    pub fn keys(&self) -> &[Key] {
        self.lease().keys()
    }

    /// The random token that proves ownership (hidden by `Debug`).
    pub fn token(&self) -> &Token {
        self.lease().token()
    }

    /// The local instant until which the lock is safe to rely on.
    pub fn valid_until(&self) -> Instant {
        self.lease().valid_until()
    }

    /// How long the lock is still safe to rely on; zero once that time has passed.
    pub fn remaining(&self) -> Duration {
        self.lease().remaining()
    }

    /// True while the local validity has not passed (the store may still have lost the lock).
    pub fn is_valid(&self) -> bool {
        self.lease().is_valid()
    }

    /// The fencing token of this acquisition, for backends that offer one.
    pub fn fencing_token(&self) -> Option<u64> {
        self.lease().fencing_token()
    }

    /// The name of the backend that holds the lock.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Keeps the lock alive until it is released or dropped: a background task extends it by
    /// its ttl whenever a third of the ttl is left. The returned signal fires when an extension
    /// finds the lock lost or the local validity lapses (for a backend that cannot extend, when
    /// the ttl runs out). Calling it again returns the same signal.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] outside a tokio runtime.
    pub fn keep_alive(&mut self) -> Result<LostSignal> {
        if let State::Watched(watched) = &self.state {
            return Ok(LostSignal::new(
                watched.lease.live().subscribe(),
                watched.task.abort_handle(),
            ));
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| LockError::invalid("runtime", "keep_alive needs a tokio runtime"))?;
        let State::Held(handle) = std::mem::replace(&mut self.state, State::Released) else {
            return Err(LockError::NotHeld { key: String::new() });
        };
        // Shared from here on: the handle moves the one cell this clone, the watchdog and the
        // waiters of this process read.
        let live = handle.lease().live().clone();
        let lease = handle.lease().clone();
        let handle = Arc::new(Mutex::new(handle));
        let span =
            tracing::debug_span!("lock.watchdog", backend = self.backend, key = %lease.key());
        let status = live.subscribe();
        let task = runtime.spawn(
            watchdog::keep_alive(
                Arc::clone(&handle),
                self.ttl,
                live,
                (self.backend, self.held.watch()),
            )
            .instrument(span),
        );
        let signal = LostSignal::new(status, task.abort_handle());
        self.state = State::Watched(Box::new(Watched {
            handle,
            lease,
            task,
            runtime,
        }));
        Ok(signal)
    }

    /// Sets the lock's expiry to now + `ttl`.
    ///
    /// # Errors
    /// - [`LockError::InvalidInput`] for a ttl out of bounds (before any I/O);
    /// - [`LockError::NotHeld`] if the local validity has passed or the store no longer holds
    ///   our token: an expired lock is never revived;
    /// - [`LockError::Unsupported`] if the backend cannot extend; [`LockError::Backend`] on I/O.
    ///
    /// A failed extend leaves the lock as it was: it is not released. But one whose answer did
    /// not come (a timeout, a quorum not reached, the future dropped on the wire) may still be
    /// taken by the store: so the validity ends, from the moment an extend is sent, no later
    /// than that extend's would (less a drift margin of 2 ms and 1 %): a shorter ttl shortens it
    /// whatever the outcome, a longer one changes nothing until it succeeds. One that finds it
    /// not held by the store ([`LockError::NotHeld`]) ends its validity at once and fires the
    /// [`LostSignal`] of a kept-alive guard: the lock is lost. So does one whose answer came
    /// back after `ttl` had passed ([`LockError::Backend`], "raise the ttl"; a backend may judge
    /// against `ttl` less its clock-drift margin, as Redlock does): the store took the new
    /// expiry, but none of it may be left. A kept-alive guard whose watchdog reported the loss
    /// while the extend was on its way answers [`LockError::NotHeld`]: a reported loss is never
    /// undone.
    pub async fn extend(&mut self, ttl: Duration) -> Result<()> {
        validate::ttl("ttl", ttl)?;
        let span = tracing::debug_span!("lock.extend", backend = self.backend, key = %self.key(), ttl_ms = validate::ttl_millis(ttl));
        // Set when the answer came back after the ttl was spent: the lock is then lost too.
        let mut late = false;
        let result = async {
            if !self.is_valid() {
                tracing::debug!("local validity passed; refusing to extend");
                return Err(LockError::NotHeld {
                    key: self.key().to_string(),
                });
            }
            // The handle moves its lease's validity, which the watchdog and the waiters of this
            // process read.
            let sent = Instant::now();
            let result = match &mut self.state {
                State::Held(handle) => {
                    shorten_first(handle.lease(), ttl);
                    handle.extend(ttl).await
                }
                State::Watched(watched) => {
                    let mut handle = watched.handle.lock().await;
                    // The watchdog held the handle (its extend, answered too late or finding
                    // the lock lost) until the validity had passed: an expired lock is never
                    // revived, whatever a backend's handle would do.
                    if watched.lease.is_valid() {
                        shorten_first(&watched.lease, ttl);
                        handle.extend(ttl).await
                    } else {
                        tracing::debug!(
                            "local validity passed while the watchdog held the lock; refusing to extend"
                        );
                        Err(LockError::NotHeld {
                            key: watched.lease.key().to_string(),
                        })
                    }
                }
                State::Released => Err(LockError::NotHeld { key: String::new() }),
            };
            // The store set the new expiry, but its answer came back after the ttl asked for
            // had passed: how much of it is left is unknown (possibly none), so the lock is
            // treated as lost, as `Locker` treats a win whose answer came back that late.
            let result = match result {
                // The watchdog reported the loss while this extend was on its way, before the
                // ttl asked for had passed (the earlier validity lapsed as it waited): a loss,
                // once reported, is never undone (the lease kept its ended validity).
                Ok(()) if !self.is_valid()
                    && self.lease().live_lost()
                    && Instant::now() < sent + ttl =>
                {
                    Err(LockError::NotHeld {
                        key: self.key().to_string(),
                    })
                }
                Ok(()) if !self.is_valid() => {
                    let error = LockError::backend(
                        self.backend,
                        format!(
                            "the store answered the extend of `{}` after its ttl of {} ms was spent; raise the ttl",
                            self.key(),
                            validate::ttl_millis(ttl)
                        ),
                    );
                    tracing::warn!(%error, "extend answered too late; the lock is lost");
                    late = true;
                    watchdog::lose(self.lease().live());
                    return Err(error);
                }
                other => other,
            };
            match &result {
                Ok(()) => {
                    self.ttl = ttl;
                    tracing::debug!("extended");
                }
                // The store said the lock is not ours: it is lost, whatever the validity said.
                // Its validity ends now and the lost signal fires, as when the watchdog finds
                // it lost, so that `is_valid` tells the truth and this process's waiters go on.
                Err(error @ LockError::NotHeld { .. }) => {
                    tracing::warn!(%error, "extend found the lock lost");
                    watchdog::lose(self.lease().live());
                }
                Err(error) => tracing::warn!(%error, "extend failed"),
            }
            result
        }
        .instrument(span)
        .await;
        if let Err(error) = &result {
            self.held.extend_failed(self.backend, error, late);
        }
        result
    }

    /// Turns this write lock into a read lock on the same key, with no moment in between where
    /// a writer could enter; other readers may then join. The expiry, the fencing token and a
    /// running [`keep_alive`](LockGuard::keep_alive) stay as they were. There is no upgrade:
    /// release the read lock and take the write lock instead.
    ///
    /// # Errors
    /// - [`LockError::InvalidInput`] naming `kind` unless this guard holds a write lock;
    /// - [`LockError::NotHeld`] if the local validity has passed or the store no longer holds
    ///   our token; [`LockError::Backend`] (or [`LockError::QuorumNotReached`]) on I/O: the
    ///   store may have downgraded it all the same (an answer lost on its way), so the lease is
    ///   in doubt and its validity ends at once (the guard still names a write lock; release it).
    ///   So does a downgrade whose future is dropped while it is under way.
    pub async fn downgrade(&mut self) -> Result<()> {
        let kind = self.kind();
        if kind != LeaseKind::Write {
            return Err(LockError::invalid(
                "kind",
                format!("only a write lock can be downgraded; this guard holds {kind}"),
            ));
        }
        let span =
            tracing::debug_span!("lock.downgrade", backend = self.backend, key = %self.key());
        async {
            if !self.is_valid() {
                return Err(LockError::NotHeld {
                    key: self.key().to_string(),
                });
            }
            // Dropped on the wire (a timeout around it), the downgrade may still run: readers
            // would then get in beside a guard that calls its write lock valid. The lease is
            // in doubt, and its validity ends, as when the downgrade fails without an answer
            // (old: it stayed valid: `tests/tests/attack_s31b.rs`).
            let mut in_doubt = InDoubt(Some(self.lease().live().clone()));
            let result = match &mut self.state {
                State::Held(handle) => handle.downgrade().await,
                State::Watched(watched) => watched.handle.lock().await.downgrade().await,
                State::Released => Err(LockError::NotHeld { key: String::new() }),
            };
            if !matches!(
                result,
                Err(LockError::Backend { .. } | LockError::QuorumNotReached { .. })
            ) {
                in_doubt.0 = None;
            }
            drop(in_doubt);
            let result = result.map_err(|error| match error {
                LockError::Unsupported { capability, .. } => LockError::Unsupported {
                    backend: self.backend,
                    capability,
                },
                other => other,
            });
            match &result {
                Ok(()) => {
                    // Readers do not line up in this process's queue: let the next task go.
                    if let Some(tickets) = self.tickets.take() {
                        tickets.give_up();
                    }
                    tracing::debug!("downgraded to a read lock");
                }
                Err(error) => tracing::warn!(%error, "downgrade failed"),
            }
            result
        }
        .instrument(span)
        .await
    }

    /// Releases the lock and reports whether it was still ours.
    ///
    /// A lock in this process (a store that decides in the call, such as the in-memory
    /// backend) is released in this call and its answer is ready when first polled; a store
    /// shared between processes is asked when the returned future is first polled, as an
    /// `async fn` would.
    ///
    /// Dropping the future does not keep the lock: dropped before its first poll, the guard
    /// inside it releases as a dropped guard does (in the background); dropped while the
    /// release is under way, the release goes on in the background, among the clean-ups that
    /// [`Locker::stop`](crate::Locker::stop) waits for. Polling it again after it answered
    /// panics.
    ///
    /// # Errors
    /// [`LockError::NotHeld`] if it had expired or been taken over (nothing of the other holder's
    /// is touched); [`LockError::Backend`] on I/O.
    pub fn release(mut self) -> impl Future<Output = Result<()>> + Send + 'static {
        // A lock in this process is released here when the store decides in the call (the
        // answer of a kept-alive one whose watchdog is extending it right now on another worker
        // thread needs awaiting: that answer is dropped unpolled, free of effects, see
        // `Answer`, and asked again by the future).
        let span = tracing::debug_span!("lock.release", backend = self.backend, key = %self.key());
        if self.cleanups.is_none() {
            let _entered = span.enter();
            // Taken out, so that the guard's drop has nothing left to do once it is let go
            // (a kept-alive one's watchdog stopped); put back otherwise.
            let mut state = std::mem::replace(&mut self.state, State::Released);
            if let Some(result) = state.release_now() {
                let tickets = self.tickets.take();
                let held = self.held.take();
                return match released(result, tickets, held) {
                    Ok(()) => Release::Released,
                    Err(error) => Release::Failed(Some(error)),
                };
            }
            self.state = state;
        }
        self.release_in_flight(span)
    }

    /// The release of [`LockGuard::release`] whose answer needs awaiting (out of line: the
    /// in-process path above stays small).
    ///
    /// The guard stays whole until the future is first polled: a store shared between
    /// processes is asked then, and a future dropped before that leaves the guard to its drop,
    /// which releases in the background (and which `stop` waits for). Until the release ends,
    /// the guard's bookkeeping (its clean-ups, its keys marked as held here) lives on in the
    /// future.
    #[inline(never)]
    fn release_in_flight(self, span: tracing::Span) -> Release {
        let cleanups = self.cleanups.clone();
        Release::Later(InFlight {
            future: Some(Box::pin(self.release_later(span))),
            polled: false,
            cleanups,
        })
    }

    /// The release of [`LockGuard::release`] whose answer is awaited, in its `span`.
    async fn release_later(mut self, span: tracing::Span) -> Result<()> {
        let state = std::mem::replace(&mut self.state, State::Released);
        let tickets = self.tickets.take();
        let held = self.held.take();
        let result = async move { released(state.release().await, tickets, held) }
            .instrument(span)
            .await;
        // The keys stay marked as this client's until the store let go of them.
        drop(self);
        result
    }
}

/// The future of [`LockGuard::release`]: its answer, when the store decided in the call, or
/// the release under way.
enum Release {
    /// Released in the call.
    Released,
    /// Failed in the call (`None` once the error was handed out).
    Failed(Option<LockError>),
    /// Under way: the store answers after I/O.
    Later(InFlight),
    /// The answer was handed out.
    Finished,
}

/// A release whose answer is awaited; dropped before it answered, it goes on in the background.
struct InFlight {
    /// `None` once it answered.
    future: Option<std::pin::Pin<Box<dyn Future<Output = Result<()>> + Send>>>,
    /// Whether it was polled: before that, the guard inside it releases on its own drop.
    polled: bool,
    /// Those of the guard's locker: `stop` waits for a release finished in the background.
    cleanups: Option<Arc<Cleanups>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let Some(future) = self.future.take() else {
            return;
        };
        if !self.polled {
            return;
        }
        // Under way (the store may have been asked, the watchdog stopped): the release is
        // seen through, as a dropped guard's would be. Outside a runtime it is given up, and
        // the lock lapses with its ttl.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // Counted before the task runs, so that a `stop` right after this drop waits.
        let running = self.cleanups.as_ref().map(|cleanups| cleanups.start());
        runtime.spawn(async move {
            let _running = running;
            let _ = future.await;
        });
    }
}

impl Future for Release {
    type Output = Result<()>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<()>> {
        let this = self.get_mut();
        match this {
            Self::Released => {
                *this = Self::Finished;
                std::task::Poll::Ready(Ok(()))
            }
            Self::Failed(error) => {
                let error = error.take();
                *this = Self::Finished;
                std::task::Poll::Ready(Err(error.expect("a release polled after it finished")))
            }
            Self::Later(in_flight) => {
                in_flight.polled = true;
                let future = in_flight
                    .future
                    .as_mut()
                    .expect("a release polled after it finished");
                let result = std::task::ready!(future.as_mut().poll(cx));
                in_flight.future = None;
                *this = Self::Finished;
                std::task::Poll::Ready(result)
            }
            Self::Finished => panic!("a release polled after it finished"),
        }
    }
}

/// Lets the next task of this process go once the store has let go, and says how it went.
#[inline]
fn released(result: Result<()>, tickets: Option<Tickets>, held: Held) -> Result<()> {
    if let Some(tickets) = tickets {
        tickets.give_up();
    }
    held.released(&result);
    match &result {
        Ok(()) => tracing::debug!("released"),
        Err(error) => tracing::warn!(%error, "release failed"),
    }
    result
}

/// A downgrade under way: if it is dropped (or fails without an answer) while armed, the
/// store may still downgrade the lease, so its validity ends (see [`LockGuard::downgrade`]).
struct InDoubt(Option<tokio::sync::watch::Sender<crate::lease::Live>>);

impl Drop for InDoubt {
    fn drop(&mut self) {
        if let Some(live) = self.0.take() {
            watchdog::cap(&live, Instant::now());
        }
    }
}

/// Before an extend by `ttl` is sent: the store may take it even if its answer never comes
/// back (a timeout, a quorum not reached, the future dropped on the wire), and a ttl shorter
/// than the validity left would then end the lock before that validity. So the validity first
/// ends no later than a successful extend's would (less a drift margin of 2 ms and 1 %, as
/// Redlock's); a successful extend then sets it, a longer ttl changes nothing (old: a failed or
/// cancelled shorter extend left the validity whole, and another client took the key under a
/// guard that counted seconds of it: `tests/tests/attack_s31b.rs`).
fn shorten_first(lease: &Lease, ttl: Duration) {
    let margin = ttl / 100 + Duration::from_millis(2);
    watchdog::cap(lease.live(), Instant::now() + ttl.saturating_sub(margin));
}

impl State {
    /// Releases at once if the backend's answer is decided in the call (see
    /// [`Answer::ready`](crate::raw::Answer::ready)); `None` leaves the state as it was.
    ///
    /// A kept-alive handle is shared with its watchdog, which holds it only while it extends
    /// (an in-process extend does not await): when the watchdog is not extending it right now
    /// (on another worker thread), it is released here too, and the watchdog is stopped before
    /// the handle is let go, so it cannot extend (and report lost) a released lock.
    #[inline]
    fn release_now(&mut self) -> Option<Result<()>> {
        match self {
            Self::Held(handle) => handle.release().into_ready(),
            Self::Watched(watched) => {
                let mut handle = watched.handle.try_lock().ok()?;
                let result = handle.release().into_ready()?;
                watchdog::end(watched.lease.live());
                watched.task.abort();
                drop(handle);
                Some(result)
            }
            Self::Released => None,
        }
    }

    /// Releases the lock this state holds, stopping its watchdog first.
    async fn release(self) -> Result<()> {
        match self {
            Self::Held(mut handle) => handle.release().await,
            Self::Watched(watched) => {
                watched.task.abort();
                let mut handle = watched.handle.lock().await;
                watchdog::end(watched.lease.live());
                handle.release().await
            }
            Self::Released => Ok(()),
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let mut state = std::mem::replace(&mut self.state, State::Released);
        if matches!(state, State::Released) {
            return;
        }
        let backend = self.backend;
        let tickets = self.tickets.take();
        // Counted down when the release ends, or when whatever holds it is dropped.
        let held = self.held.take();
        // A store shared between processes (a guard with clean-ups) answers after I/O: its
        // release goes to a task at once, without an answer built only to be dropped.
        let in_process = self.cleanups.is_none();
        if in_process && let Some(result) = state.release_now() {
            if let Some(tickets) = tickets {
                tickets.give_up();
            }
            held.released(&result);
            match result {
                Ok(()) => tracing::debug!(backend, "released on drop"),
                Err(error) => tracing::debug!(backend, %error, "release on drop failed"),
            }
            return;
        }
        let key = match &state {
            State::Held(handle) => handle.lease().key().to_string(),
            State::Watched(watched) => watched.lease.key().to_string(),
            State::Released => String::new(),
        };
        // Outside a runtime, a kept-alive guard still knows its watchdog's.
        let runtime = tokio::runtime::Handle::try_current()
            .ok()
            .or_else(|| match &state {
                State::Watched(watched) => Some(watched.runtime.clone()),
                State::Held(_) | State::Released => None,
            });
        match runtime {
            Some(runtime) => {
                // Counted before the task runs, so that a `stop` right after this drop waits.
                let running = self.cleanups.take().map(|cleanups| cleanups.start());
                // The key stays marked as this client's until the store let go of it.
                let own = self.own.take();
                runtime.spawn(async move {
                    let _running = running;
                    let released = state.release().await;
                    drop(own);
                    // The next task of this process goes once the store has let go.
                    if let Some(tickets) = tickets {
                        tickets.give_up();
                    }
                    held.released(&released);
                    match released {
                        Ok(()) => tracing::debug!(backend, key, "released on drop"),
                        Err(error) => {
                            tracing::debug!(backend, key, %error, "release on drop failed")
                        }
                    }
                });
            }
            None => {
                // The key stays this client's until the lease lapses.
                if let Some(own) = self.own.take() {
                    own.until_lapsed();
                }
                tracing::warn!(
                    backend,
                    key,
                    "lock guard dropped outside a tokio runtime; the lock stays until its ttl expires"
                );
            }
        }
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("backend", &self.backend)
            .field("kind", &self.kind())
            .field("keys", &self.keys())
            .field("token", self.token())
            .field("fencing_token", &self.fencing_token())
            .field("remaining", &self.remaining())
            .field("watched", &matches!(self.state, State::Watched(_)))
            .finish()
    }
}

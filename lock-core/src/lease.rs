//! [`Lease`]: what one acquisition holds, in one place for the backend's handle, the guard, the
//! watchdog, the in-process queue and a `with_lock` section.

use std::fmt;
use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::key::{Key, KeySet};
use crate::lock::{LeaseKind, LockRequest};
use crate::token::Token;

/// One held lease: its keys, kind, token, validity and fencing token.
///
/// A backend's [`Handle`](crate::raw::Handle) builds it from the request it granted and keeps
/// it up to date: an extend moves its validity ([`Lease::set_valid_until`]), a downgrade its
/// kind ([`Lease::set_downgraded`]). Users read it from
/// [`LockGuard::lease`](crate::LockGuard::lease) and from the [`LeaseInfo`](crate::LeaseInfo)
/// of a `with_lock` section.
///
/// Once the core watches a lease (it is kept alive, or tasks of this process wait behind it),
/// the lease's validity and kind live in one cell that the handle, the guard, the watchdog, the
/// waiters of this process and every clone of the lease share: whichever path moves them (an
/// extend by hand or by the watchdog, a downgrade, a failed operation that ends the validity),
/// they all read the new value. Before that, a clone is a snapshot. Keys, token and fencing
/// token never change.
#[derive(Clone)]
pub struct Lease {
    keys: KeySet,
    token: Token,
    fencing_token: Option<u64>,
    kind: LeaseKind,
    valid_until: Instant,
    /// The cell shared once the core watches the lease: read instead of `kind` and
    /// `valid_until`, which every write still updates.
    live: OnceLock<watch::Sender<Live>>,
}

/// What changes while a lease is held, as the core shares it (see [`Lease`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Live {
    pub(crate) valid_until: Instant,
    pub(crate) kind: LeaseKind,
    /// Set by the watchdog when it finds the lease lost (or its validity lapsed).
    pub(crate) lost: bool,
    /// Set by the guard, while it holds the handle, when it releases the lease: a watchdog
    /// that was already past its sleep when it was stopped (running on another worker thread,
    /// it only stops at its next await) must not extend the released lease and report it lost.
    pub(crate) ended: bool,
}

impl Live {
    /// Until when the holder keeps its places in this process's queue: its validity, or now
    /// once it is known lost.
    pub(crate) fn lapses_at(&self) -> Instant {
        if self.lost {
            Instant::now().min(self.valid_until)
        } else {
            self.valid_until
        }
    }
}

impl Lease {
    /// The lease that `request` asked for, granted and valid until `valid_until` (a local
    /// instant, with clock drift and the time spent acquiring already taken off): its keys,
    /// kind and token are the request's.
    #[inline]
    pub fn new(request: &LockRequest, valid_until: Instant) -> Self {
        Self::from_parts(
            request.key_set().clone(),
            request.kind(),
            request.token().clone(),
            valid_until,
        )
    }

    /// A lease from its parts, for a backend that took the request's keys and token apart
    /// already (they are the request's, as with [`Lease::new`]).
    pub fn from_parts(keys: KeySet, kind: LeaseKind, token: Token, valid_until: Instant) -> Self {
        Self {
            keys,
            token,
            fencing_token: None,
            kind,
            valid_until,
            live: OnceLock::new(),
        }
    }

    /// Adds the fencing token drawn for this acquisition (backends with
    /// [`Capabilities::fencing`](crate::Capabilities::fencing)).
    #[must_use]
    #[inline]
    pub fn with_fencing_token(mut self, fencing_token: u64) -> Self {
        self.fencing_token = Some(fencing_token);
        self
    }

    /// The keys held, namespaced as stored (at least one).
    #[inline]
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// The keys as a cheaply cloned set.
    pub fn key_set(&self) -> &KeySet {
        &self.keys
    }

    /// The first key held, which names the lease in messages.
    #[inline]
    pub fn key(&self) -> &Key {
        self.keys.primary()
    }

    /// The random token that proves ownership (hidden by `Debug`).
    #[inline]
    pub fn token(&self) -> &Token {
        &self.token
    }

    /// What is held: a mutex, a semaphore permit, a read or a write lock (a read lock after a
    /// downgrade).
    pub fn kind(&self) -> LeaseKind {
        match self.live.get() {
            Some(live) => live.borrow().kind,
            None => self.kind,
        }
    }

    /// The local instant until which the lease is safe to rely on (a monotonic clock, with
    /// clock drift and the time spent acquiring already taken off); moved by every extend.
    #[inline]
    pub fn valid_until(&self) -> Instant {
        match self.live.get() {
            Some(live) => live.borrow().valid_until,
            None => self.valid_until,
        }
    }

    /// How long the lease is still safe to rely on; zero once that time has passed.
    pub fn remaining(&self) -> Duration {
        self.valid_until().saturating_duration_since(Instant::now())
    }

    /// True while the local validity has not passed (the store may still have lost the lease).
    pub fn is_valid(&self) -> bool {
        Instant::now() < self.valid_until()
    }

    /// A number that strictly increases with every acquisition of the same key, for backends
    /// with [`Capabilities::fencing`](crate::Capabilities::fencing); pass it to the protected
    /// resource so it can refuse stale writers.
    pub fn fencing_token(&self) -> Option<u64> {
        self.fencing_token
    }

    /// Moves the validity: for a backend's handle, after an extend succeeded (or when an
    /// operation leaves the lease in doubt, to end it at once). Everything that shares the
    /// lease (see [`Lease`]) sees the new value.
    ///
    /// A lease found lost (its loss reported by the watchdog or an extend) keeps its ended
    /// validity: a loss, once reported, is never undone, even by an extend that was on its
    /// way when it was reported.
    pub fn set_valid_until(&mut self, valid_until: Instant) {
        if let Some(live) = self.live.get() {
            let moved = live.send_if_modified(|live| {
                if live.lost {
                    return false;
                }
                live.valid_until = valid_until;
                true
            });
            if !moved {
                return;
            }
        }
        self.valid_until = valid_until;
    }

    /// Records that a write lock became a read lock: for a backend's handle, after a
    /// downgrade succeeded.
    pub fn set_downgraded(&mut self) {
        self.kind = LeaseKind::Read;
        if let Some(live) = self.live.get() {
            live.send_modify(|live| live.kind = LeaseKind::Read);
        }
    }

    /// The shared cell, made from the lease's current state the first time it is asked for.
    /// Whether the core reported this lease lost (never once it is not shared).
    pub(crate) fn live_lost(&self) -> bool {
        self.live.get().is_some_and(|live| live.borrow().lost)
    }

    pub(crate) fn live(&self) -> &watch::Sender<Live> {
        self.live.get_or_init(|| {
            watch::Sender::new(Live {
                valid_until: self.valid_until,
                kind: self.kind,
                lost: false,
                ended: false,
            })
        })
    }

    /// The stand-in a released guard shows (never seen from outside: a guard is released by
    /// value or on drop).
    pub(crate) fn released() -> &'static Self {
        static RELEASED: LazyLock<Lease> = LazyLock::new(|| Lease {
            keys: KeySet::one(Key::released()),
            token: Token::released().clone(),
            fencing_token: None,
            kind: LeaseKind::Exclusive,
            valid_until: Instant::now(),
            live: OnceLock::new(),
        });
        &RELEASED
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("keys", &self.keys)
            .field("kind", &self.kind())
            .field("token", &self.token)
            .field("fencing_token", &self.fencing_token)
            .field("remaining", &self.remaining())
            .finish()
    }
}

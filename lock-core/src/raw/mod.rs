//! The kit for backend authors, as OpenDAL's `raw`: the contract a backend implements
//! ([`Lock`], [`Handle`], one attempt's [`LockRequest`], its [`Capabilities`]) and what every
//! backend shares — the validation rules ([`validate`]), URL redaction ([`redact_url`]), the
//! waiters of push wake-ups ([`wake`]), the background [`FollowUp`] of operations that must
//! reach every node, the count of background work a client lets finish before it closes
//! ([`Settling`]), and the pure plumbing of backends on Redis-compatible servers
//! ([`redis`]).
//!
//! Users of locks need none of it: they hold a [`Locker`](crate::Locker), which takes any
//! backend, and the items at the crate's root. The conformance suite for backends is
//! `lock_core::conformance` (cargo feature `conformance`).

mod follow_up;
pub mod redis;
mod settling;
pub mod validate;
pub mod wake;

/// Re-exported so that backends implement [`Lock`] and [`Handle`] with the same macro.
pub use async_trait::async_trait;
pub use follow_up::{FOLLOW_UP_ROUNDS, FollowUp};
pub use settling::{InProgress, Settling};

pub use crate::key::KeySet;
pub use crate::lock::{Acquired, Answer, Capabilities, Handle, Lock, LockRequest};
pub use crate::url::redact_url;

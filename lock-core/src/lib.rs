#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod error;
mod guard;
mod key;
mod local;
mod lock;
mod locker;
pub mod metrics;
mod options;
pub mod raw;
mod retry;
mod token;
mod url;
pub mod validate;
pub mod wake;
mod watchdog;

#[cfg(feature = "conformance")]
pub mod conformance;

/// Re-exported so that custom backends implement [`Lock`] and [`Handle`] with the same macro.
pub use async_trait::async_trait;
pub use error::{LockError, Result};
pub use guard::LockGuard;
pub use key::{Key, KeySet, MAX_KEY_LEN, NAMESPACE_SEPARATOR, Namespace, key_for};
pub use lock::{Capabilities, Handle, Holding, KeyState, LeaseKind, Lock, LockRequest};
pub use locker::{CLEANUP_WAIT, LeaseInfo, Locker};
pub use options::LockOptions;
pub use retry::{Backoff, RetryCount, RetryPolicy};
pub use token::{TOKEN_BYTES, Token, TokenText};
pub use url::{SecretUrl, redact_url};
pub use watchdog::LostSignal;

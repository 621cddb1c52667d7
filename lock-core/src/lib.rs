#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod courtesy;
mod error;
mod guard;
mod key;
mod lease;
mod local;
mod lock;
mod locker;
pub mod metrics;
mod options;
pub mod raw;
mod retry;
mod token;
mod url;
mod watchdog;

#[cfg(feature = "conformance")]
pub mod conformance;

// What users of locks hold. Backend authors find the contract and its helpers in `raw`.
pub use error::{LockError, Result};
pub use guard::LockGuard;
pub use key::{Key, MAX_KEY_LEN, NAMESPACE_SEPARATOR, Namespace, key_for};
pub use lease::Lease;
/// Also in [`raw`]: users read it from [`Locker::capabilities`].
pub use lock::Capabilities;
pub use lock::{Holding, KeyState, LeaseKind};
pub use locker::{CLEANUP_WAIT, LeaseInfo, Locker};
pub use options::LockOptions;
pub use retry::{Backoff, RetryCount, RetryOptions, RetryPolicy};
pub use token::{TOKEN_BYTES, Token, TokenText};
pub use url::SecretUrl;
pub use watchdog::LostSignal;

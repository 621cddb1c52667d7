//! The one error type every backend maps its failures into.

use std::error::Error as StdError;
use std::time::Duration;

/// Shorthand for results whose error is [`LockError`].
pub type Result<T, E = LockError> = std::result::Result<T, E>;

/// Everything that can go wrong when taking, extending or releasing a lock.
///
/// Messages are lower-case, carry no trailing period and never contain a password or a lock token;
/// each one says what the caller can do about it.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// An argument or a configuration field was rejected before any I/O took place, or a key
    /// turned out to hold something other than a lock (a Redis list, say) in the store.
    #[error("invalid {field}: {reason}")]
    InvalidInput {
        /// The field or argument at fault, e.g. `ttl` or `retry.retry_jitter`.
        field: String,
        /// Why it was rejected and what is accepted instead.
        reason: String,
    },

    /// A backend name that no build of this project knows.
    #[error("unknown lock backend `{name}`; known backends: {known}")]
    UnknownBackend {
        /// The name that was asked for.
        name: String,
        /// The known names, comma separated.
        known: String,
    },

    /// A known backend that this build left out.
    #[error("lock backend `{name}` is not compiled in; enable the cargo feature `{feature}`")]
    BackendNotCompiled {
        /// The backend that was asked for.
        name: String,
        /// The cargo feature that compiles it in.
        feature: String,
    },

    /// The resource is held by someone else and the retry policy allowed a single attempt.
    #[error("resource `{key}` is locked by another holder; retry later or allow retries")]
    Locked {
        /// The (namespaced) key that was held.
        key: String,
    },

    /// The retry policy gave up: its attempts or its deadline ran out while the key stayed held.
    #[error(
        "timed out acquiring `{key}` after {attempts} attempt(s) in {waited:?}; raise retry_count or deadline"
    )]
    Timeout {
        /// The (namespaced) key that was wanted.
        key: String,
        /// How many attempts were made.
        attempts: u32,
        /// How long the caller waited (from the start when a deadline was set, otherwise from
        /// the first attempt that found the key held).
        waited: Duration,
    },

    /// The lock expired or was taken over by another holder; this handle can no longer act on it.
    #[error("lock on `{key}` is not held any more (it expired or another holder took it)")]
    NotHeld {
        /// The (namespaced) key.
        key: String,
    },

    /// A distributed backend could not win (or keep) a majority of its nodes.
    #[error(
        "quorum not reached for `{key}`: {got} of {needed} needed nodes agreed; check that most nodes are reachable ({failures})"
    )]
    QuorumNotReached {
        /// The (namespaced) key.
        key: String,
        /// Nodes that agreed.
        got: usize,
        /// Nodes needed for a majority.
        needed: usize,
        /// What went wrong on the nodes that failed, without secrets.
        failures: String,
    },

    /// The backend cannot do what was asked (see [`Capabilities`](crate::Capabilities)).
    #[error("the {backend} backend does not support {capability}")]
    Unsupported {
        /// The backend's name.
        backend: &'static str,
        /// What was asked of it.
        capability: &'static str,
    },

    /// The backend failed to talk to its store (connection refused, timed out, protocol error…).
    #[error("{backend} backend error: {message}")]
    Backend {
        /// The backend's name.
        backend: &'static str,
        /// What failed, already stripped of secrets.
        message: String,
        /// The driver's error, if it is safe to keep (it must not print secrets).
        #[source]
        source: Option<Box<dyn StdError + Send + Sync>>,
    },

    /// The key is in use as another kind of lock (a mutex, a semaphore of another size, a
    /// read-write lock): every client must use a key as the same kind.
    #[error(
        "`{key}` is in use as {found}, not as {asked}; every client must use a key as the same kind of lock"
    )]
    KindMismatch {
        /// The (namespaced) key.
        key: String,
        /// What the store holds the key as, e.g. `a semaphore of 3 permit(s)`.
        found: String,
        /// What this call asked for.
        asked: String,
    },

    /// The client was stopped; every later call fails with this error.
    #[error("the lock client was stopped; create a new one")]
    Stopped,
}

impl LockError {
    /// Builds an [`LockError::InvalidInput`] for `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidInput {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Builds a [`LockError::Backend`] from a message alone.
    pub fn backend(backend: &'static str, message: impl Into<String>) -> Self {
        Self::Backend {
            backend,
            message: message.into(),
            source: None,
        }
    }

    /// True for errors that say the lock is held by someone else (as opposed to failures).
    pub fn is_contention(&self) -> bool {
        matches!(self, Self::Locked { .. } | Self::Timeout { .. })
    }

    /// Prefixes the field of an [`LockError::InvalidInput`] with `parent.`, so nested
    /// configuration errors name their full path; other errors pass through unchanged.
    pub fn within(self, parent: &str) -> Self {
        match self {
            Self::InvalidInput { field, reason } => Self::InvalidInput {
                field: format!("{parent}.{field}"),
                reason,
            },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_lower_case_without_trailing_period() {
        let errors = [
            LockError::invalid("ttl", "must be at least 1 ms"),
            LockError::Locked { key: "k".into() },
            LockError::Timeout {
                key: "k".into(),
                attempts: 3,
                waited: Duration::from_millis(5),
            },
            LockError::NotHeld { key: "k".into() },
            LockError::QuorumNotReached {
                key: "k".into(),
                got: 1,
                needed: 2,
                failures: "n1: timed out".into(),
            },
            LockError::Stopped,
        ];
        for error in errors {
            let message = error.to_string();
            assert!(
                message.chars().next().is_some_and(|c| c.is_lowercase()),
                "{message}"
            );
            assert!(!message.ends_with('.'), "{message}");
        }
    }

    #[test]
    fn within_prefixes_invalid_input_fields() {
        let error = LockError::invalid("retry_jitter", "negative").within("retry");
        assert!(
            matches!(error, LockError::InvalidInput { ref field, .. } if field == "retry.retry_jitter")
        );
        assert!(matches!(LockError::Stopped.within("x"), LockError::Stopped));
    }
}

//! The guard users hold while they own a lock.

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;
use tracing::Instrument;

use crate::error::{LockError, Result};
use crate::key::Key;
use crate::lock::Handle;
use crate::token::Token;
use crate::validate;

/// A held lock. Call [`LockGuard::release`] when done; dropping the guard releases in the
/// background instead.
///
/// # Drop
/// Dropping never blocks: the release is spawned on the current tokio runtime. Outside a
/// runtime nothing can be sent, so the lock stays until its ttl expires and a warning is logged.
/// An explicit `release().await` is the main path, since it reports whether the lock was still
/// held.
pub struct LockGuard {
    handle: Option<Box<dyn Handle>>,
    keys: Vec<Key>,
    token: Token,
    valid_until: Instant,
    fencing_token: Option<u64>,
    backend: &'static str,
}

impl LockGuard {
    /// Wraps a handle that a backend returned.
    pub fn new(handle: Box<dyn Handle>, backend: &'static str) -> Self {
        Self {
            keys: handle.keys().to_vec(),
            token: handle.token().clone(),
            valid_until: handle.valid_until(),
            fencing_token: handle.fencing_token(),
            handle: Some(handle),
            backend,
        }
    }

    /// The (first) key held, namespaced as stored.
    pub fn key(&self) -> &Key {
        // A guard always holds at least one key: requests with none are refused.
        &self.keys[0]
    }

    /// Every key held (several for a multi-key lock).
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// The random token that proves ownership (hidden by `Debug`).
    pub fn token(&self) -> &Token {
        &self.token
    }

    /// The local instant until which the lock is safe to rely on.
    pub fn valid_until(&self) -> Instant {
        self.valid_until
    }

    /// How long the lock is still safe to rely on; zero once that time has passed.
    pub fn remaining(&self) -> Duration {
        self.valid_until.saturating_duration_since(Instant::now())
    }

    /// True while the local validity has not passed (the store may still have lost the lock).
    pub fn is_valid(&self) -> bool {
        Instant::now() < self.valid_until
    }

    /// The fencing token of this acquisition, for backends that offer one.
    pub fn fencing_token(&self) -> Option<u64> {
        self.fencing_token
    }

    /// The name of the backend that holds the lock.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Sets the lock's expiry to now + `ttl`.
    ///
    /// # Errors
    /// - [`LockError::InvalidInput`] for a ttl out of bounds (before any I/O);
    /// - [`LockError::NotHeld`] if the local validity has passed or the store no longer holds
    ///   our token: an expired lock is never revived;
    /// - [`LockError::Unsupported`] if the backend cannot extend; [`LockError::Backend`] on I/O.
    ///
    /// A failed extend leaves the lock as it was: it is not released.
    pub async fn extend(&mut self, ttl: Duration) -> Result<()> {
        validate::ttl("ttl", ttl)?;
        let span = tracing::debug_span!("lock.extend", backend = self.backend, key = %self.key(), ttl_ms = validate::ttl_millis(ttl));
        async {
            if !self.is_valid() {
                tracing::debug!("local validity passed; refusing to extend");
                return Err(LockError::NotHeld {
                    key: self.key().to_string(),
                });
            }
            let Some(handle) = self.handle.as_mut() else {
                return Err(LockError::NotHeld {
                    key: self.key().to_string(),
                });
            };
            match handle.extend(ttl).await {
                Ok(()) => {
                    self.valid_until = handle.valid_until();
                    tracing::debug!("extended");
                    Ok(())
                }
                Err(error) => {
                    tracing::warn!(%error, "extend failed");
                    Err(error)
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Releases the lock and reports whether it was still ours.
    ///
    /// # Errors
    /// [`LockError::NotHeld`] if it had expired or been taken over (nothing of the other holder's
    /// is touched); [`LockError::Backend`] on I/O.
    pub async fn release(mut self) -> Result<()> {
        let Some(mut handle) = self.handle.take() else {
            return Ok(());
        };
        let span = tracing::debug_span!("lock.release", backend = self.backend, key = %self.key());
        async move {
            let result = handle.release().await;
            match &result {
                Ok(()) => tracing::debug!("released"),
                Err(error) => tracing::warn!(%error, "release failed"),
            }
            result
        }
        .instrument(span)
        .await
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let Some(mut handle) = self.handle.take() else {
            return;
        };
        let key = self.key().to_string();
        let backend = self.backend;
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    match handle.release().await {
                        Ok(()) => tracing::debug!(backend, key, "released on drop"),
                        Err(error) => tracing::debug!(backend, key, %error, "release on drop failed"),
                    }
                });
            }
            Err(_) => tracing::warn!(
                backend,
                key,
                "lock guard dropped outside a tokio runtime; the lock stays until its ttl expires"
            ),
        }
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("backend", &self.backend)
            .field("keys", &self.keys)
            .field("token", &self.token)
            .field("fencing_token", &self.fencing_token)
            .field("remaining", &self.remaining())
            .finish()
    }
}

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
    /// The backend's handle; [`Released`] once the guard gave it away (on release or drop).
    handle: Box<dyn Handle>,
    backend: &'static str,
}

impl LockGuard {
    /// Wraps a handle that a backend returned.
    ///
    /// # Errors
    /// [`LockError::Backend`] if the handle names no key (a backend bug).
    pub fn new(handle: Box<dyn Handle>, backend: &'static str) -> Result<Self> {
        if handle.keys().is_empty() {
            return Err(LockError::backend(
                backend,
                "the backend returned a lock handle without keys",
            ));
        }
        Ok(Self { handle, backend })
    }

    /// The (first) key held, namespaced as stored.
    pub fn key(&self) -> &Key {
        // `new` refused handles without keys, and `Released` is never observed from outside.
        &self.handle.keys()[0]
    }

    /// Every key held (several for a multi-key lock).
    pub fn keys(&self) -> &[Key] {
        self.handle.keys()
    }

    /// The random token that proves ownership (hidden by `Debug`).
    pub fn token(&self) -> &Token {
        self.handle.token()
    }

    /// The local instant until which the lock is safe to rely on.
    pub fn valid_until(&self) -> Instant {
        self.handle.valid_until()
    }

    /// How long the lock is still safe to rely on; zero once that time has passed.
    pub fn remaining(&self) -> Duration {
        self.valid_until().saturating_duration_since(Instant::now())
    }

    /// True while the local validity has not passed (the store may still have lost the lock).
    pub fn is_valid(&self) -> bool {
        Instant::now() < self.valid_until()
    }

    /// The fencing token of this acquisition, for backends that offer one.
    pub fn fencing_token(&self) -> Option<u64> {
        self.handle.fencing_token()
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
            match self.handle.extend(ttl).await {
                Ok(()) => {
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
        let mut handle = self.take_handle();
        let span =
            tracing::debug_span!("lock.release", backend = self.backend, key = %handle.keys()[0]);
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

impl LockGuard {
    /// Takes the handle out, leaving [`Released`] (a zero-sized box: no allocation).
    fn take_handle(&mut self) -> Box<dyn Handle> {
        std::mem::replace(&mut self.handle, Box::new(Released))
    }
}

/// What a guard holds after giving its handle away.
#[derive(Debug)]
struct Released;

#[async_trait::async_trait]
impl Handle for Released {
    fn keys(&self) -> &[Key] {
        &[]
    }

    fn token(&self) -> &Token {
        Token::released()
    }

    fn valid_until(&self) -> Instant {
        Instant::now()
    }

    async fn extend(&mut self, _ttl: Duration) -> Result<()> {
        Err(LockError::NotHeld { key: String::new() })
    }

    async fn release(&mut self) -> Result<()> {
        Ok(())
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let mut handle = self.take_handle();
        if handle.keys().is_empty() {
            return; // already released
        }
        let key = handle.keys()[0].to_string();
        let backend = self.backend;
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    match handle.release().await {
                        Ok(()) => tracing::debug!(backend, key, "released on drop"),
                        Err(error) => {
                            tracing::debug!(backend, key, %error, "release on drop failed")
                        }
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
            .field("keys", &self.keys())
            .field("token", self.token())
            .field("fencing_token", &self.fencing_token())
            .field("remaining", &self.remaining())
            .finish()
    }
}

//! Per-lock options: how long a lock lives and how hard to try for it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{LockError, Result};
use crate::raw::validate;
use crate::retry::RetryPolicy;

/// How long a lock lives and how to retry for it.
///
/// # Default
/// - `ttl`: 10 s
/// - `retry`: [`RetryPolicy::default`]
///
/// In configuration files `ttl` is whole milliseconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "LockOptionsConfig", into = "LockOptionsConfig")]
pub struct LockOptions {
    ttl: Duration,
    retry: RetryPolicy,
}

impl Default for LockOptions {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(10),
            retry: RetryPolicy::default(),
        }
    }
}

impl LockOptions {
    /// Sets the lifetime of each lock (its lease): it expires by itself after `ttl` unless extended.
    #[must_use]
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets the retry policy.
    #[must_use]
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The lifetime of each lock.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The retry policy.
    pub fn retry(&self) -> &RetryPolicy {
        &self.retry
    }

    /// Checks the ttl and the retry policy.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming `ttl` or `retry.<field>`.
    pub fn validate(&self) -> Result<()> {
        validate::ttl("ttl", self.ttl)?;
        self.retry.validate().map_err(|e| e.within("retry"))
    }
}

#[derive(Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct LockOptionsConfig {
    ttl: i64,
    retry: RetryPolicy,
}

impl Default for LockOptionsConfig {
    fn default() -> Self {
        LockOptions::default().into()
    }
}

impl From<LockOptions> for LockOptionsConfig {
    fn from(options: LockOptions) -> Self {
        Self {
            ttl: validate::to_millis(options.ttl),
            retry: options.retry,
        }
    }
}

impl TryFrom<LockOptionsConfig> for LockOptions {
    type Error = LockError;

    fn try_from(config: LockOptionsConfig) -> Result<Self> {
        let options = Self {
            ttl: validate::millis("ttl", config.ttl, validate::MAX_TTL)?,
            retry: config.retry,
        };
        options.validate()?;
        Ok(options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_and_absurd_ttls_are_rejected_by_name() {
        for ttl in [Duration::ZERO, Duration::from_secs(365 * 24 * 3600)] {
            let error = LockOptions::default()
                .with_ttl(ttl)
                .validate()
                .expect_err("bad ttl");
            assert!(matches!(error, LockError::InvalidInput { ref field, .. } if field == "ttl"));
        }
    }

    #[test]
    fn nested_retry_errors_name_their_path() {
        let error = LockOptions::default()
            .with_retry(RetryPolicy::default().with_backoff_factor(0.0))
            .validate()
            .expect_err("bad factor");
        assert!(
            matches!(error, LockError::InvalidInput { ref field, .. } if field == "retry.backoff_factor")
        );
    }

    #[test]
    fn parses_from_json_and_toml() {
        let from_json: LockOptions =
            serde_json::from_str(r#"{"ttl": 500, "retry": {"retry_count": 2}}"#).expect("json");
        assert_eq!(from_json.ttl(), Duration::from_millis(500));
        let from_toml: LockOptions =
            toml::from_str("ttl = 500\n[retry]\nretry_count = 2\n").expect("toml");
        assert_eq!(from_json, from_toml);
        assert!(serde_json::from_str::<LockOptions>(r#"{"ttl": 0}"#).is_err());
        assert!(serde_json::from_str::<LockOptions>(r#"{"ttl": -10}"#).is_err());
    }
}

//! Configuration of the INCR backend, as serde data with validation.

use std::fmt;

use lock_core::{LockError, Result, redact_url};
use serde::{Deserialize, Serialize};

/// Configuration of an [`IncLock`](crate::IncLock).
///
/// Durations are whole milliseconds.
///
/// # Default
/// - `url`: `redis://127.0.0.1:6379/0` (user, password and database go in the URL)
/// - `prefix`: `lock:` (as in lock-inc)
/// - `command_timeout`: 500 ms (fred's own default is to wait forever)
/// - `connect_timeout`: 1000 ms
/// - `wake_on_release`: off
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IncConfig {
    /// `redis://[user:password@]host:port[/db]`, or for a Redis Cluster
    /// `redis-cluster://[user:password@]host:port?node=host:port&node=…`.
    pub url: String,
    /// Put before every lock key (and matched by purge).
    pub prefix: String,
    /// How long one command may take, in ms.
    #[serde(alias = "commandTimeout")]
    pub command_timeout: u64,
    /// How long connecting may take, in ms.
    #[serde(alias = "connectTimeout")]
    pub connect_timeout: u64,
    /// A PEM file of the CA that signed the server's TLS certificate, for `rediss://` servers
    /// that the system's roots do not cover.
    #[serde(alias = "tlsCaFile", skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Announce releases over pub/sub (`lock-released:<lock key>`) and let waiters subscribe,
    /// so that they retry at once instead of sleeping out their retry delay (a missed message
    /// costs one delay at most). Costs one more connection for waiters.
    #[serde(alias = "wakeOnRelease")]
    pub wake_on_release: bool,
}

impl Default for IncConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379/0".to_owned(),
            prefix: "lock:".to_owned(),
            command_timeout: 500,
            connect_timeout: 1_000,
            tls_ca_file: None,
            wake_on_release: false,
        }
    }
}

impl IncConfig {
    /// A configuration for `url`, with defaults for the rest.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }

    /// Turns pub/sub wake-ups of waiters on or off.
    #[must_use]
    pub fn with_wake_on_release(mut self, wake_on_release: bool) -> Self {
        self.wake_on_release = wake_on_release;
        self
    }

    /// Checks every field and names the first that is wrong (the URL without its password).
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming the field.
    pub fn validate(&self) -> Result<()> {
        // fred accepts URLs of other schemes as if they were Redis; refuse them here.
        let tls = self.url.starts_with("rediss://") || self.url.starts_with("rediss-cluster://");
        if !tls && !self.url.starts_with("redis://") && !self.url.starts_with("redis-cluster://") {
            return Err(LockError::invalid(
                "url",
                format!(
                    "{} is not a redis://, rediss:// or redis-cluster:// URL",
                    redact_url(&self.url)
                ),
            ));
        }
        if (tls || self.tls_ca_file.is_some()) && !cfg!(feature = "tls") {
            return Err(LockError::invalid(
                "url",
                format!(
                    "{}: TLS needs the `tls` cargo feature of lock-inc",
                    redact_url(&self.url)
                ),
            ));
        }
        if self.prefix.len() > 256 {
            return Err(LockError::invalid("prefix", "is longer than 256 bytes"));
        }
        for (field, ms) in [
            ("command_timeout", self.command_timeout),
            ("connect_timeout", self.connect_timeout),
        ] {
            if ms == 0 || ms > 60_000 {
                return Err(LockError::invalid(
                    field,
                    format!("{ms} ms is outside 1..=60000 ms"),
                ));
            }
        }
        Ok(())
    }

    /// The server as shown in messages: its URL without password.
    pub(crate) fn label(&self) -> String {
        redact_url(&self.url)
    }
}

impl fmt::Debug for IncConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IncConfig")
            .field("url", &self.label())
            .field("prefix", &self.prefix)
            .field("command_timeout", &self.command_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("wake_on_release", &self.wake_on_release)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn bad_fields_are_named_and_passwords_hidden() {
        for (config, field) in [
            (IncConfig::new("http://u:s3cret@h/"), "url"),
            (
                IncConfig {
                    command_timeout: 0,
                    ..IncConfig::default()
                },
                "command_timeout",
            ),
            (
                IncConfig {
                    connect_timeout: 600_000,
                    ..IncConfig::default()
                },
                "connect_timeout",
            ),
        ] {
            match config.validate() {
                Err(LockError::InvalidInput { field: got, reason }) => {
                    assert_eq!(got, field);
                    assert!(!reason.contains("s3cret"), "{reason}");
                }
                other => panic!("expected invalid {field}, got {other:?}"),
            }
        }
        let config = IncConfig::new("redis://u:s3cret@127.0.0.1:1/2");
        assert!(!format!("{config:?}").contains("s3cret"));
        config.validate().unwrap();
    }

    #[test]
    fn parses_from_json() {
        let config: IncConfig = serde_json::from_str(
            r#"{"url": "redis://127.0.0.1:7000/1", "prefix": "jobs:", "commandTimeout": 50}"#,
        )
        .unwrap();
        assert_eq!(config.prefix, "jobs:");
        assert_eq!(config.command_timeout, 50);
    }
}

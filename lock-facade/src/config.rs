//! The facade's configuration: one shape for every backend, read from code, JSON, TOML, a file
//! or an environment variable, and merged.

use std::fmt;
use std::path::Path;

use lock_core::{LockError, Result, redact_url};
use serde::{Deserialize, Serialize};

/// The environment variable [`LockConfig::from_env`] reads: a file path, or inline JSON or TOML.
pub const CONFIG_ENV: &str = "LOCK_CONFIG";

/// How deep `lock_config` may nest.
const MAX_NESTING: usize = 4;

/// Everything [`create`](crate::create) needs, as in the original facade: a backend `type`, a
/// `namespace`, and a `lock_config` that may hold more of the same (an object, a JSON or TOML
/// string, or a file path), merged under the fields set here.
///
/// Every field is optional so that sources can be layered; durations are milliseconds, and the
/// seeds' camelCase names are accepted.
///
/// # Default
/// - `type`: `memory`
/// - `namespace`: none (keys are used as given)
/// - `ttl`: 10 000 ms; retries: [`RetryPolicy::default`](lock_core::RetryPolicy::default), or a
///   single attempt for the fail-fast `inc` backend
/// - backend options: those of `RedlockConfig` and `IncConfig`
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockConfig {
    /// The backend: `memory` (alias `inMemory`), `redis` (Redlock on one node), `redlock`, `inc`.
    #[serde(
        rename = "type",
        alias = "backend",
        skip_serializing_if = "Option::is_none"
    )]
    pub backend: Option<String>,
    /// Prefixes every key as `namespace:key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The Redis nodes: `redis://` or `rediss://` URLs (one for `redis` and `inc`).
    #[serde(alias = "nodes", skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
    /// Lock lifetime in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<i64>,
    /// Retries after the first attempt; -1 retries forever.
    #[serde(
        alias = "retryCount",
        alias = "retry",
        skip_serializing_if = "Option::is_none"
    )]
    pub retry_count: Option<i64>,
    /// Pause between attempts, in ms.
    #[serde(
        alias = "retryDelay",
        alias = "delay",
        skip_serializing_if = "Option::is_none"
    )]
    pub retry_delay: Option<i64>,
    /// Largest random addition to each pause, in ms.
    #[serde(alias = "retryJitter", skip_serializing_if = "Option::is_none")]
    pub retry_jitter: Option<i64>,
    /// Longest an acquisition may take in all, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline: Option<i64>,
    /// Redlock: expected clock drift as a fraction of the ttl.
    #[serde(alias = "driftFactor", skip_serializing_if = "Option::is_none")]
    pub drift_factor: Option<f64>,
    /// Redlock: how long to wait for one node, in ms.
    #[serde(alias = "nodeTimeout", skip_serializing_if = "Option::is_none")]
    pub node_timeout: Option<u64>,
    /// Redlock: hand out fencing tokens (a second round trip per acquisition).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fencing: Option<bool>,
    /// Redlock and inc: wake waiters over pub/sub when a lock is released.
    #[serde(alias = "wakeOnRelease", skip_serializing_if = "Option::is_none")]
    pub wake_on_release: Option<bool>,
    /// inc: the key prefix (default `lock:`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// inc: how long one command may take, in ms.
    #[serde(alias = "commandTimeout", skip_serializing_if = "Option::is_none")]
    pub command_timeout: Option<u64>,
    /// More configuration, merged under this one: an object, a JSON or TOML string, or a path.
    #[serde(alias = "lockConfig", skip_serializing_if = "Option::is_none")]
    pub lock_config: Option<ConfigSource>,
}

/// Where more configuration comes from.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ConfigSource {
    /// Inline, as an object.
    Inline(Box<LockConfig>),
    /// A JSON or TOML document, or the path of a `.json` or `.toml` file.
    Text(String),
}

impl LockConfig {
    /// A configuration for the named backend.
    pub fn backend(name: impl Into<String>) -> Self {
        Self {
            backend: Some(name.into()),
            ..Self::default()
        }
    }

    /// Parses a JSON document.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming the source and what is wrong (field, line).
    pub fn from_json(json: &str) -> Result<Self> {
        serde_json::from_str(json).map_err(|e| LockError::invalid("config (JSON)", e.to_string()))
    }

    /// Parses a TOML document.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming the source and what is wrong.
    pub fn from_toml(toml: &str) -> Result<Self> {
        toml::from_str(toml)
            .map_err(|e| LockError::invalid("config (TOML)", e.message().to_owned()))
    }

    /// Reads a `.json` or `.toml` file.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming the file when it cannot be read or parsed.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let field = format!("config file {}", path.display());
        let text =
            std::fs::read_to_string(path).map_err(|e| LockError::invalid(&field, e.to_string()))?;
        let parsed = match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => Self::from_toml(&text),
            _ => Self::from_json(&text),
        };
        parsed.map_err(|e| match e {
            LockError::InvalidInput { reason, .. } => LockError::invalid(&field, reason),
            other => other,
        })
    }

    /// Parses text that is inline JSON (starts with `{`), inline TOML (has a `=`), or a path.
    ///
    /// # Errors
    /// As the parser or file reader it picks.
    pub fn from_text(text: &str) -> Result<Self> {
        let trimmed = text.trim();
        if trimmed.starts_with('{') {
            Self::from_json(trimmed)
        } else if trimmed.contains('=') && !Path::new(trimmed).exists() {
            Self::from_toml(trimmed)
        } else {
            Self::from_file(trimmed)
        }
    }

    /// Reads [`CONFIG_ENV`] (`LOCK_CONFIG`): a path, or inline JSON or TOML. Unset means an empty
    /// configuration.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming `LOCK_CONFIG` and what is wrong.
    pub fn from_env() -> Result<Self> {
        match std::env::var(CONFIG_ENV) {
            Ok(text) => Self::from_text(&text).map_err(|e| match e {
                LockError::InvalidInput { field, reason } => {
                    LockError::invalid(format!("{CONFIG_ENV} ({field})"), reason)
                }
                other => other,
            }),
            Err(std::env::VarError::NotPresent) => Ok(Self::default()),
            Err(e) => Err(LockError::invalid(CONFIG_ENV, e.to_string())),
        }
    }

    /// This configuration with `lower` under it: fields set here win, unset ones come from
    /// `lower`.
    #[must_use]
    pub fn merged_over(self, lower: Self) -> Self {
        Self {
            backend: self.backend.or(lower.backend),
            namespace: self.namespace.or(lower.namespace),
            urls: self.urls.or(lower.urls),
            ttl: self.ttl.or(lower.ttl),
            retry_count: self.retry_count.or(lower.retry_count),
            retry_delay: self.retry_delay.or(lower.retry_delay),
            retry_jitter: self.retry_jitter.or(lower.retry_jitter),
            deadline: self.deadline.or(lower.deadline),
            drift_factor: self.drift_factor.or(lower.drift_factor),
            node_timeout: self.node_timeout.or(lower.node_timeout),
            fencing: self.fencing.or(lower.fencing),
            wake_on_release: self.wake_on_release.or(lower.wake_on_release),
            prefix: self.prefix.or(lower.prefix),
            command_timeout: self.command_timeout.or(lower.command_timeout),
            lock_config: None,
        }
    }

    /// Expands `lock_config` (recursively) and merges it under this configuration.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] when a nested source cannot be read, or nests too deeply.
    pub fn resolve(mut self) -> Result<Self> {
        for _ in 0..MAX_NESTING {
            let Some(source) = self.lock_config.take() else {
                return Ok(self);
            };
            let lower = match source {
                ConfigSource::Inline(config) => *config,
                ConfigSource::Text(text) => {
                    Self::from_text(&text).map_err(|e| e.within("lock_config"))?
                }
            };
            let nested = lower.lock_config.clone();
            self = self.merged_over(lower);
            self.lock_config = nested;
        }
        Err(LockError::invalid(
            "lock_config",
            format!("nests more than {MAX_NESTING} levels deep"),
        ))
    }
}

impl fmt::Debug for LockConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Option<Vec<String>> = self
            .urls
            .as_ref()
            .map(|urls| urls.iter().map(|u| redact_url(u)).collect());
        f.debug_struct("LockConfig")
            .field("type", &self.backend)
            .field("namespace", &self.namespace)
            .field("urls", &urls)
            .field("ttl", &self.ttl)
            .field("retry_count", &self.retry_count)
            .field("retry_delay", &self.retry_delay)
            .field("retry_jitter", &self.retry_jitter)
            .field("deadline", &self.deadline)
            .field("drift_factor", &self.drift_factor)
            .field("node_timeout", &self.node_timeout)
            .field("fencing", &self.fencing)
            .field("wake_on_release", &self.wake_on_release)
            .field("prefix", &self.prefix)
            .field("command_timeout", &self.command_timeout)
            .field("lock_config", &self.lock_config.as_ref().map(|_| "…"))
            .finish()
    }
}

impl fmt::Debug for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Inline(config) => fmt::Debug::fmt(config, f),
            // The text may be a document with URLs in it.
            Self::Text(_) => f.write_str("ConfigSource::Text(…)"),
        }
    }
}

//! The facade's configuration: one shape for every backend, read from code, JSON, TOML, a file
//! or an environment variable, and merged.

use std::fmt;
use std::path::Path;

use lock_core::{LockError, Result, SecretUrl, raw::redact_url};
use serde::de::{Deserializer, Visitor};
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
/// No password reaches a message: `urls` are [`SecretUrl`]s (shown without password, never
/// quoted by a deserialization error), and the parsers below also hide, in every message they
/// return, each string of the document that carries a URL's user info, wherever it stands
/// (`lock-facade/tests/secrets.rs` checks this for any password).
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
    #[serde(
        alias = "nodes",
        default,
        deserialize_with = "optional_urls",
        skip_serializing_if = "Option::is_none"
    )]
    pub urls: Option<Vec<SecretUrl>>,
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
    /// `redis` (one node) and inc: serve waiters across processes first come, first served,
    /// each woken alone when its turn comes (see the backends' `fair`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fair: Option<bool>,
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
    /// [`LockError::InvalidInput`] naming the source and what is wrong (field, line), with every
    /// secret-bearing string of the document hidden.
    pub fn from_json(json: &str) -> Result<Self> {
        let invalid = |reason: String| LockError::invalid("config (JSON)", reason);
        // Plain JSON first: a syntax error is reported as such (serde_json never quotes the
        // document in one), and the strings found are hidden from the typed parse's message,
        // which quotes a value or a field name it rejects.
        let document: serde_json::Value =
            serde_json::from_str(json).map_err(|e| invalid(e.to_string()))?;
        let secrets = Secrets::of_json(&document);
        serde_json::from_str(json).map_err(|e| invalid(secrets.scrub(e.to_string())))
    }

    /// Parses a TOML document.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming the source and what is wrong, with every
    /// secret-bearing string of the document hidden (toml's own `Display` of an error would
    /// also print the document's line: only its message is used).
    pub fn from_toml(toml: &str) -> Result<Self> {
        let invalid = |reason: &str| LockError::invalid("config (TOML)", reason);
        let document: toml::Table = toml::from_str(toml).map_err(|e| invalid(e.message()))?;
        let secrets = Secrets::of_toml(&document);
        toml::from_str(toml).map_err(|e| invalid(&secrets.scrub(e.message().to_owned())))
    }

    /// Reads a `.json` or `.toml` file.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming the file when it cannot be read or parsed.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        // `from_text` takes any text for a path, a URL too.
        let field = format!("config file {}", shown(&path.display().to_string()));
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
            // Not the value: it may hold a password.
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(LockError::invalid(CONFIG_ENV, "is not valid UTF-8"))
            }
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
            fair: self.fair.or(lower.fair),
            prefix: self.prefix.or(lower.prefix),
            command_timeout: self.command_timeout.or(lower.command_timeout),
            // A nested source of the lower layer must not vanish in the merge (`resolve` expands
            // it under both); callers that merge two documents resolve the lower one first.
            lock_config: self.lock_config.or(lower.lock_config),
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
        f.debug_struct("LockConfig")
            .field("type", &self.backend)
            .field("namespace", &self.namespace)
            .field("urls", &self.urls)
            .field("ttl", &self.ttl)
            .field("retry_count", &self.retry_count)
            .field("retry_delay", &self.retry_delay)
            .field("retry_jitter", &self.retry_jitter)
            .field("deadline", &self.deadline)
            .field("drift_factor", &self.drift_factor)
            .field("node_timeout", &self.node_timeout)
            .field("fencing", &self.fencing)
            .field("wake_on_release", &self.wake_on_release)
            .field("fair", &self.fair)
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

/// `urls`, absent, null or a list, through [`SecretUrl::deserialize_list`].
fn optional_urls<'de, D>(deserializer: D) -> Result<Option<Vec<SecretUrl>>, D::Error>
where
    D: Deserializer<'de>,
{
    struct OptionalUrls;

    impl<'de> Visitor<'de> for OptionalUrls {
        type Value = Option<Vec<SecretUrl>>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of URL strings")
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(
            self,
            deserializer: D,
        ) -> Result<Self::Value, D::Error> {
            SecretUrl::deserialize_list(deserializer).map(Some)
        }
    }

    deserializer.deserialize_option(OptionalUrls)
}

/// `text` as it may be shown: without its password when it looks like a URL with one.
pub(crate) fn shown(text: &str) -> String {
    if text.contains('@') || text.contains("://") {
        redact_url(text)
    } else {
        text.to_owned()
    }
}

/// The strings of a parsed document that carry a secret, in every form a parser's message may
/// quote them (as written, and escaped as `Debug` and JSON escape them), each with what to show
/// instead. serde quotes whole values (`invalid type: string "…"`) and whole field names
/// (``unknown field `…` ``), so whole strings are what is hidden.
#[derive(Default)]
struct Secrets(Vec<(String, String)>);

impl Secrets {
    fn of_json(document: &serde_json::Value) -> Self {
        let mut secrets = Self::default();
        let mut pending = vec![document];
        while let Some(value) = pending.pop() {
            match value {
                serde_json::Value::String(text) => secrets.add(text),
                serde_json::Value::Array(items) => pending.extend(items),
                serde_json::Value::Object(fields) => {
                    for (name, value) in fields {
                        secrets.add(name);
                        pending.push(value);
                    }
                }
                _ => {}
            }
        }
        secrets.longest_first()
    }

    fn of_toml(document: &toml::Table) -> Self {
        let mut secrets = Self::default();
        let mut pending: Vec<&toml::Value> = Vec::new();
        for (name, value) in document {
            secrets.add(name);
            pending.push(value);
        }
        while let Some(value) = pending.pop() {
            match value {
                toml::Value::String(text) => secrets.add(text),
                toml::Value::Array(items) => pending.extend(items),
                toml::Value::Table(fields) => {
                    for (name, value) in fields {
                        secrets.add(name);
                        pending.push(value);
                    }
                }
                _ => {}
            }
        }
        secrets.longest_first()
    }

    /// Notes `text` if showing it would show a secret.
    fn add(&mut self, text: &str) {
        let hidden = shown(text);
        if hidden == text {
            return;
        }
        let debug = format!("{text:?}");
        let json = serde_json::Value::from(text).to_string();
        for form in [text, unquoted(&debug), unquoted(&json)] {
            self.0.push((form.to_owned(), hidden.clone()));
        }
    }

    /// Longer forms first, so that no shorter one is replaced inside a longer one.
    fn longest_first(mut self) -> Self {
        self.0
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        self.0.dedup();
        self
    }

    fn scrub(&self, message: String) -> String {
        self.0.iter().fold(message, |message, (form, hidden)| {
            message.replace(form, hidden)
        })
    }
}

/// `text` without the quotes around it.
fn unquoted(text: &str) -> &str {
    text.strip_prefix('"')
        .and_then(|text| text.strip_suffix('"'))
        .unwrap_or(text)
}

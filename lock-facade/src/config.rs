//! The facade's configuration: the part every backend shares (type, namespace, ttl, retries)
//! and the selected backend's options as a document, read from code, JSON, TOML, a file or an
//! environment variable, and merged key by key.

use std::fmt;
use std::io::Read;
use std::path::Path;

use lock_core::{LockError, Result, RetryOptions};
use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The environment variable [`LockConfig::from_env`] reads: a file path, or inline JSON or TOML.
pub const CONFIG_ENV: &str = "LOCK_CONFIG";

/// How deep `lock_config` may nest.
pub(crate) const MAX_NESTING: usize = 4;

/// The most bytes a configuration file may have (1 MiB): a path such as `/dev/zero`, or a
/// huge file, is refused once this much is read, instead of being read into memory without end.
pub(crate) const MAX_FILE_BYTES: u64 = 1 << 20;

/// The fields every backend shares (as [`LockConfig`] names them; the seeds' camelCase names
/// are accepted too): any other field is an option of the selected backend.
pub const COMMON_FIELDS: &[&str] = &[
    "type",
    "namespace",
    "ttl",
    "retry_count",
    "retry_delay",
    "retry_jitter",
    "deadline",
    "lock_config",
];

/// A backend's options as a document: field names to values, read into the backend's own
/// configuration type (`MemoryConfig`, `RedlockConfig`, `IncConfig`) by
/// [`create`](crate::create).
pub type BackendOptions = serde_json::Map<String, Value>;

/// Everything [`create`](crate::create) needs, as in the original facade: a backend `type`, a
/// `namespace`, a `ttl`, the retry options, the backend's own options, and a `lock_config`
/// that may hold more of the same (an object, a JSON or TOML string, or a file path), merged
/// under the fields set here.
///
/// Every field is optional so that sources can be layered; durations are milliseconds, and the
/// seeds' camelCase names are accepted. The common fields are [`COMMON_FIELDS`]; every other
/// field is kept in [`options`](Self::options) and read, in `create`, into the selected
/// backend's configuration type, which refuses a field it does not have, naming those it has
/// (a document that names its `type` is also checked as it is parsed).
///
/// No password reaches a message: `Debug` shows the options' strings as URLs without password,
/// and the parsers below and `create` hide, in every message they return, each string of the
/// document that carries a URL's user info, wherever it stands
/// (`lock-facade/tests/secrets.rs` checks this for any password).
///
/// # Default
/// - `type`: `memory`
/// - `namespace`: none (keys are used as given)
/// - `ttl`: 10 000 ms; retries: [`RetryPolicy::default`](lock_core::RetryPolicy::default), or a
///   single attempt for the fail-fast `inc` backend
/// - backend options: the defaults of the backend's configuration type
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
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
    /// Lock lifetime in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<i64>,
    /// `retry_count`, `retry_delay`, `retry_jitter` and `deadline`, for the locker's retry
    /// policy whatever the backend.
    #[serde(flatten)]
    pub retry: RetryOptions,
    /// More configuration, merged under this one: an object, a JSON or TOML string, or a path.
    #[serde(alias = "lockConfig", skip_serializing_if = "Option::is_none")]
    pub lock_config: Option<ConfigSource>,
    /// The selected backend's options (every field that is not a common one); `null` is unset.
    /// A document's non-finite number (TOML's `nan`, `inf`) or repeated field is refused (a
    /// JSON value cannot hold the one, and would keep only the last of the other).
    #[serde(flatten, deserialize_with = "options")]
    pub options: BackendOptions,
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

/// A backend's configuration type, as [`LockConfig::with_backend`] and
/// [`create`](crate::create) read and write it.
pub trait BackendConfig: Serialize + DeserializeOwned {
    /// The backend's name (its crate's `NAME`).
    const NAME: &'static str;
}

#[cfg(feature = "memory")]
impl BackendConfig for lock_memory::MemoryConfig {
    const NAME: &'static str = lock_memory::NAME;
}

#[cfg(feature = "redlock")]
impl BackendConfig for lock_redlock::RedlockConfig {
    const NAME: &'static str = lock_redlock::NAME;
}

#[cfg(feature = "inc")]
impl BackendConfig for lock_inc::IncConfig {
    const NAME: &'static str = lock_inc::NAME;
}

impl LockConfig {
    /// A configuration for the named backend.
    pub fn backend(name: impl Into<String>) -> Self {
        Self {
            backend: Some(name.into()),
            ..Self::default()
        }
    }

    /// This configuration with every option of `config` set (serialized into
    /// [`options`](Self::options), all fields included), and its backend selected unless the
    /// type already names it (`redis` stays `redis` with a `RedlockConfig`).
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming `<backend> options` when `config` does not survive
    /// the trip through a document: a non-finite number (JSON writes it as `null`, which would
    /// read as unset).
    pub fn with_backend<C: BackendConfig>(mut self, config: &C) -> Result<Self> {
        let invalid = |reason: String| LockError::invalid(format!("{} options", C::NAME), reason);
        let document = serde_json::to_value(config).map_err(|e| invalid(e.to_string()))?;
        C::deserialize(&document)
            .map_err(|e| invalid(Secrets::of_json(&document).scrub(e.to_string())))?;
        let Value::Object(options) = document else {
            return Err(invalid("is not a document of fields".to_owned()));
        };
        let names_it = self
            .backend
            .as_deref()
            .and_then(crate::feature_of)
            .is_some_and(|feature| feature == C::NAME);
        if !names_it {
            self.backend = Some(C::NAME.to_owned());
        }
        for (name, value) in options {
            self.set_option(name, value);
        }
        Ok(self)
    }

    /// This configuration with the backend option `name` set to `value`, replacing it under any
    /// of its names (`nodeTimeout` replaces `node_timeout`, `nodes` replaces `urls`); `null`
    /// unsets it (note that [`Value`] turns a non-finite `f64` into `null`: use
    /// [`with_backend`](Self::with_backend) for a typed configuration, which refuses one).
    #[must_use]
    pub fn with_option(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.set_option(name.into(), value.into());
        self
    }

    /// Sets the option `name`, removing it under its other names first (old: `with_option` and
    /// `with_backend` added a second name, so that a `null` left the option set, and a value
    /// made the backend refuse a `duplicate field`).
    fn set_option(&mut self, name: String, value: Value) {
        self.options.retain(|other, _| !same_option(other, &name));
        self.options.insert(name, value);
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
        let document: Value = serde_json::from_str(json).map_err(|e| invalid(e.to_string()))?;
        let secrets = Secrets::of_json(&document);
        let config: Self = serde_json::from_str(json).map_err(|e| {
            let blamed = document.as_object().and_then(blame_json);
            invalid(secrets.scrub(named(blamed, e.to_string())))
        })?;
        config.checked().map_err(invalid)
    }

    /// Parses a TOML document.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming the source and what is wrong, with every
    /// secret-bearing string of the document hidden (toml's own `Display` of an error would
    /// also print the document's line: only its message is used).
    pub fn from_toml(toml: &str) -> Result<Self> {
        let invalid = |reason: String| LockError::invalid("config (TOML)", reason);
        let document: toml::Table =
            toml::from_str(toml).map_err(|e| invalid(e.message().to_owned()))?;
        let secrets = Secrets::of_toml(&document);
        let config: Self = toml::from_str(toml).map_err(|e| {
            let blamed = blame_toml(&document);
            invalid(secrets.scrub(named(blamed, e.message().to_owned())))
        })?;
        config.checked().map_err(invalid)
    }

    /// Reads a `.json` or `.toml` file of at most 1 MiB (1048576 bytes). A nested `lock_config`
    /// in it that is a relative path names a file next to this one, as an include does (one not
    /// found there, a file from the working directory).
    ///
    /// At most one byte over the limit is read: a larger file, or a device without end such
    /// as `/dev/zero`, is refused at once. A FIFO is not bounded in time: opening it waits for a
    /// writer, and reading it until the writer closes it or passes the limit.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming the file when it cannot be read or parsed, or is
    /// larger than 1 MiB (none of its content is shown).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        // `from_text` takes any text for a path, a URL too.
        let field = format!("config file {}", shown(&path.display().to_string()));
        let text = read_bounded(path).map_err(|reason| LockError::invalid(&field, reason))?;
        let parsed = match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => Self::from_toml(&text),
            _ => Self::from_json(&text),
        };
        let mut config = parsed.map_err(|e| match e {
            LockError::InvalidInput { reason, .. } => LockError::invalid(&field, reason),
            other => other,
        })?;
        if let Some(dir) = path.parent() {
            config.anchor_nested_paths(dir);
        }
        Ok(config)
    }

    /// Makes the relative paths of nested `lock_config`s read from a file in `dir` name the
    /// files next to it, as an include does: a relative path that names a file in `dir` is
    /// joined to `dir`; one that does not keeps naming a file from the working directory.
    /// An inline document given as a string is parsed here (as `from_text` would), so that the
    /// paths it nests are anchored too (old: they named files from the working directory); one
    /// that does not parse is left for `resolve` to report.
    fn anchor_nested_paths(&mut self, dir: &Path) {
        let mut next = self.lock_config.as_mut();
        while let Some(source) = next {
            if let ConfigSource::Text(text) = source {
                let trimmed = text.trim();
                let relative = Path::new(trimmed);
                if !trimmed.starts_with('{') && relative.is_relative() {
                    let beside = dir.join(relative);
                    if beside.is_file() {
                        *text = beside.display().to_string();
                    }
                }
                let trimmed = text.trim();
                let inline = trimmed.starts_with('{')
                    || (trimmed.contains('=') && !Path::new(trimmed).exists());
                if inline && let Ok(config) = Self::from_text(trimmed) {
                    *source = ConfigSource::Inline(Box::new(config));
                }
            }
            next = match source {
                ConfigSource::Inline(config) => config.lock_config.as_mut(),
                ConfigSource::Text(_) => None,
            };
        }
    }

    /// Parses text that is inline JSON (starts with `{`), inline TOML (has a `=`), or a path
    /// (read by [`LockConfig::from_file`]: at most 1 MiB).
    ///
    /// # Errors
    /// As the parser or file reader it picks; [`LockError::InvalidInput`] saying what the text
    /// may be when it is empty, or neither inline nor the path of a file.
    pub fn from_text(text: &str) -> Result<Self> {
        const FORMS: &str = "inline JSON (starting with `{`), inline TOML (with a `=`), or the path \
                             of a .json or .toml file";
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(LockError::invalid(
                "config",
                format!("is empty; give {FORMS}"),
            ));
        }
        let is_file = Path::new(trimmed).exists();
        // A missing file whose name holds a `=` (`conf=prod.json`) is named as missing, not
        // parsed as TOML.
        let names_a_file = [".json", ".toml"]
            .iter()
            .any(|extension| trimmed.ends_with(extension))
            && !trimmed.contains(['\n', '"', '\''])
            && !trimmed.contains(" = ");
        if trimmed.starts_with('{') {
            Self::from_json(trimmed)
        } else if trimmed.contains('=') && !is_file && !names_a_file {
            Self::from_toml(trimmed)
        } else if !is_file {
            Err(LockError::invalid(
                format!("config file {}", shown(trimmed)),
                format!("no such file; a configuration is {FORMS}"),
            ))
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
    /// `lower`; the backend options merge key by key (a key set to `null` here is unset, and
    /// the seeds' camelCase spelling of a key is the same key: `nodeTimeout` here hides
    /// `node_timeout` there).
    #[must_use]
    pub fn merged_over(self, lower: Self) -> Self {
        let mut options = lower.options;
        for (name, value) in self.options {
            if value.is_null() {
                continue;
            }
            options.retain(|other, _| !same_option(other, &name));
            options.insert(name, value);
        }
        Self {
            backend: self.backend.or(lower.backend),
            namespace: self.namespace.or(lower.namespace),
            ttl: self.ttl.or(lower.ttl),
            retry: self.retry.merged_over(lower.retry),
            // A nested source of the lower layer must not vanish in the merge (`resolve` expands
            // it under both); callers that merge two documents resolve the lower one first.
            lock_config: self.lock_config.or(lower.lock_config),
            options,
        }
    }

    /// Expands `lock_config` (recursively) and merges it under this configuration.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] when a nested source cannot be read, or nests too deeply.
    pub fn resolve(mut self) -> Result<Self> {
        let mut depth = 0;
        while let Some(source) = self.lock_config.take() {
            // `MAX_NESTING` levels are expanded; one more is refused (old: the last allowed level
            // was refused too, as the check came after the expansions whatever they left).
            if depth == MAX_NESTING {
                return Err(LockError::invalid(
                    "lock_config",
                    format!("nests more than {MAX_NESTING} levels deep"),
                ));
            }
            depth += 1;
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
        Ok(self)
    }

    /// The options read into the configuration type of the backend this configuration names,
    /// if it names one that is compiled in: a parsed document that names its type is checked
    /// at once.
    fn checked(self) -> std::result::Result<Self, String> {
        match self.backend.as_deref().and_then(crate::feature_of) {
            #[cfg(feature = "memory")]
            Some(lock_memory::NAME) => {
                read_options::<lock_memory::MemoryConfig>(&self.options)?;
            }
            #[cfg(feature = "redlock")]
            Some(lock_redlock::NAME) => {
                read_options::<lock_redlock::RedlockConfig>(&self.options)?;
            }
            #[cfg(feature = "inc")]
            Some(lock_inc::NAME) => {
                read_options::<lock_inc::IncConfig>(&self.options)?;
            }
            _ => {}
        }
        Ok(self)
    }
}

/// The backend options of a document, refusing what [`Value`] would silently change: a
/// non-finite number (which it turns into `null`, that is unset) and a repeated field (of which
/// it keeps the last).
fn options<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<BackendOptions, D::Error> {
    deserializer.deserialize_map(OptionsVisitor)
}

struct OptionsVisitor;

impl<'de> Visitor<'de> for OptionsVisitor {
    type Value = BackendOptions;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("backend options")
    }

    fn visit_map<A: MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<BackendOptions, A::Error> {
        let mut options = BackendOptions::new();
        while let Some(name) = map.next_key::<String>()? {
            let Finite(value) = map.next_value()?;
            if options.contains_key(&name) {
                return Err(de::Error::custom(format_args!("duplicate field `{name}`")));
            }
            options.insert(name, value);
        }
        Ok(options)
    }
}

/// A [`Value`] whose every number is finite.
struct Finite(Value);

impl<'de> Deserialize<'de> for Finite {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_any(FiniteVisitor)
    }
}

struct FiniteVisitor;

impl<'de> Visitor<'de> for FiniteVisitor {
    type Value = Finite;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a value")
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> std::result::Result<Finite, E> {
        Ok(Finite(value.into()))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> std::result::Result<Finite, E> {
        Ok(Finite(value.into()))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> std::result::Result<Finite, E> {
        Ok(Finite(value.into()))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> std::result::Result<Finite, E> {
        serde_json::Number::from_f64(value)
            .map(|number| Finite(Value::Number(number)))
            .ok_or_else(|| E::invalid_value(de::Unexpected::Float(value), &"a finite number"))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> std::result::Result<Finite, E> {
        Ok(Finite(value.into()))
    }

    fn visit_string<E: de::Error>(self, value: String) -> std::result::Result<Finite, E> {
        Ok(Finite(value.into()))
    }

    fn visit_none<E: de::Error>(self) -> std::result::Result<Finite, E> {
        Ok(Finite(Value::Null))
    }

    fn visit_unit<E: de::Error>(self) -> std::result::Result<Finite, E> {
        Ok(Finite(Value::Null))
    }

    fn visit_some<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> std::result::Result<Finite, D::Error> {
        Finite::deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Finite, A::Error> {
        let mut items = Vec::new();
        while let Some(Finite(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Finite(Value::Array(items)))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> std::result::Result<Finite, A::Error> {
        OptionsVisitor
            .visit_map(map)
            .map(|fields| Finite(Value::Object(fields)))
    }
}

/// Whether two option names are the same option: equal but for case and `_` (`node_timeout`,
/// `nodeTimeout`), or both names of the Redis nodes (`urls`, `nodes`, `url`).
fn same_option(a: &str, b: &str) -> bool {
    const NODES: &[&str] = &["urls", "nodes", "url"];
    let folded = |name: &str| name.replace('_', "").to_ascii_lowercase();
    folded(a) == folded(b) || (NODES.contains(&a) && NODES.contains(&b))
}

/// `options` read into the backend configuration `T`, or why not (no secret quoted; an
/// unknown field's message also lists the [`COMMON_FIELDS`]).
fn read_options<T: DeserializeOwned>(options: &BackendOptions) -> std::result::Result<T, String> {
    let document = Value::Object(
        options
            .iter()
            .filter(|(_, value)| !value.is_null())
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect(),
    );
    T::deserialize(&document).map_err(|error| {
        let mut reason = error.to_string();
        // serde's message names an unknown or repeated field, not one of the wrong type or value.
        if !reason.starts_with("unknown field") && !reason.starts_with("duplicate field") {
            let blamed = options.iter().find(|(name, value)| {
                let alone =
                    Value::Object([((*name).clone(), (*value).clone())].into_iter().collect());
                !value.is_null() && T::deserialize(&alone).is_err()
            });
            reason = named(blamed.map(|(name, _)| (name.clone(), None)), reason);
        }
        let mut reason = Secrets::of_json(&document).scrub(reason);
        if reason.starts_with("unknown field") {
            reason.push_str(&format!(
                "; or one of the fields every backend shares: `{}`",
                COMMON_FIELDS.join("`, `")
            ));
        }
        reason
    })
}

/// The names `lock_config` goes by, for [`blame_json`] and [`blame_toml`] to look inside it.
const NESTED: &[&str] = &["lock_config", "lockConfig"];

/// The field of a document that [`LockConfig`] refuses on its own (as a path through nested
/// `lock_config` objects), with the message of the innermost refusal when it is nested (serde's
/// untagged `ConfigSource` only says that no variant matched); `None` when no field is refused
/// alone (a repeated field).
fn blame_json(fields: &serde_json::Map<String, Value>) -> Option<(String, Option<String>)> {
    fields.iter().find_map(|(name, value)| {
        let alone = Value::Object([(name.clone(), value.clone())].into_iter().collect());
        serde_json::from_value::<LockConfig>(alone).err()?;
        let inner = match value {
            Value::Object(inner) if NESTED.contains(&name.as_str()) => blame_json(inner),
            _ => None,
        };
        Some(match inner {
            Some((path, reason)) => {
                let reason = reason.or_else(|| {
                    serde_json::from_value::<LockConfig>(value.clone())
                        .err()
                        .map(|e| e.to_string())
                });
                (format!("{name}.{path}"), reason)
            }
            None => (name.clone(), None),
        })
    })
}

/// [`blame_json`] for a TOML document.
fn blame_toml(fields: &toml::Table) -> Option<(String, Option<String>)> {
    fields.iter().find_map(|(name, value)| {
        let alone: toml::Table = [(name.clone(), value.clone())].into_iter().collect();
        toml::Value::Table(alone).try_into::<LockConfig>().err()?;
        let inner = match value {
            toml::Value::Table(inner) if NESTED.contains(&name.as_str()) => blame_toml(inner),
            _ => None,
        };
        Some(match inner {
            Some((path, reason)) => {
                let reason = reason.or_else(|| {
                    value
                        .clone()
                        .try_into::<LockConfig>()
                        .err()
                        .map(|e| e.message().to_owned())
                });
                (format!("{name}.{path}"), reason)
            }
            None => (name.clone(), None),
        })
    })
}

/// `reason` naming the field to blame (old: serde's message for a value of the wrong type or
/// out of range named no field, and toml's no line either), with the innermost message when
/// there is one.
fn named(blamed: Option<(String, Option<String>)>, reason: String) -> String {
    match blamed {
        Some((path, inner)) => format!("field `{path}`: {}", inner.unwrap_or(reason)),
        None => reason,
    }
}

/// `options` read into the configuration type of the backend `name` (for `create`).
///
/// # Errors
/// [`LockError::InvalidInput`] naming `<name> options`, no secret quoted.
pub(crate) fn backend_config<T: DeserializeOwned>(
    name: &str,
    options: &BackendOptions,
) -> Result<T> {
    read_options(options).map_err(|reason| LockError::invalid(format!("{name} options"), reason))
}

impl fmt::Debug for LockConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockConfig")
            // A URL put in the type or the namespace by mistake is shown without its password.
            .field("type", &self.backend.as_deref().map(shown))
            .field("namespace", &self.namespace.as_deref().map(shown))
            .field("ttl", &self.ttl)
            .field("retry", &self.retry)
            .field("options", &Redacted(&Value::Object(self.options.clone())))
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

/// A document shown with every string (and field name) as [`shown`] shows it.
struct Redacted<'a>(&'a Value);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Value::String(text) => fmt::Debug::fmt(&shown(text), f),
            Value::Array(items) => f.debug_list().entries(items.iter().map(Redacted)).finish(),
            Value::Object(fields) => f
                .debug_map()
                .entries(
                    fields
                        .iter()
                        .map(|(name, value)| (shown(name), Redacted(value))),
                )
                .finish(),
            other => fmt::Debug::fmt(other, f),
        }
    }
}

/// The text of the file at `path`, read up to one byte over [`MAX_FILE_BYTES`]: a larger file
/// is refused without reading on. The error is the reason alone (never the content).
fn read_bounded(path: &Path) -> std::result::Result<String, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "is larger than {MAX_FILE_BYTES} bytes (1 MiB), the most a configuration file may have"
        ));
    }
    // As `read_to_string` said it.
    String::from_utf8(bytes).map_err(|_| "stream did not contain valid UTF-8".to_owned())
}

/// `text` as it may be shown: without its password when it looks like a URL with one.
pub(crate) fn shown(text: &str) -> String {
    lock_core::raw::redis::shown_text(text)
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

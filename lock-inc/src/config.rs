//! Configuration of the INCR backend, as serde data with validation.

use lock_core::raw::redis::{UrlRules, shown_path, shown_text};
use lock_core::{LockError, Result, SecretUrl, raw::validate};

use serde::de::{Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// The URLs the INCR backend takes: one server or a Redis Cluster, TLS with the `tls` feature.
const URL_RULES: UrlRules = UrlRules {
    crate_name: "lock-inc",
    cluster: true,
    tls: cfg!(feature = "tls"),
};

/// Configuration of an [`IncLock`](crate::IncLock).
///
/// Durations are whole milliseconds.
///
/// The URL is a [`SecretUrl`]: `Debug`, validation and connection errors and logs show it
/// without password, and a deserialization error never quotes it. toml's own `Display` and
/// `Debug` of its error print the document's line, URL included: show its `message()` instead,
/// or parse through the facade's `LockConfig::from_toml`, which does. Any other string of the
/// wrong type (`"connect_timeout": "…"`) is quoted by serde's message, as for every type: the
/// facade's parsers hide every string of the document that looks like a URL with user info.
///
/// # Default
/// - `url`: `redis://127.0.0.1:6379/0` (user, password and database go in the URL)
/// - `prefix`: `lock:` (as in lock-inc)
/// - `command_timeout`: 500 ms (fred's own default is to wait forever)
/// - `connect_timeout`: 1000 ms
/// - `wake_on_release`: off
/// - `fair`: off
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IncConfig {
    /// `redis://[user:password@]host:port[/db]`, or for a Redis Cluster
    /// `redis-cluster://[user:password@]host:port?node=host:port&node=…`; `?protocol=resp3`
    /// (or `3`) speaks RESP3 (`HELLO 3`), `resp2` (or `2`, the default) RESP2, as redis-rs reads
    /// the same URL for Redlock. A `/`, `?` or `#` in
    /// the user name or password is written `%2F`, `%3F`, `%23`. Also read as `urls` or `nodes`
    /// (the names the facade's Redis backends share), as a URL or a list of exactly one.
    #[serde(alias = "urls", alias = "nodes", deserialize_with = "one_url")]
    pub url: SecretUrl,
    /// Put before every lock key (and matched by purge); a Redis or Valkey URL with a password
    /// in it is refused (`validate::name`).
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
    /// Serve waiters across processes first come, first served: a waiter that finds the key
    /// held joins a line beside it (`<prefix>{K}:queue`, and `<prefix>{K}:queue-expiry` for
    /// the entries' expiries, in the lock's hash slot), a release passes the turn to the head
    /// of the line and wakes that waiter alone over pub/sub, and a single try never passes a
    /// waiting line. Every client of a key must agree on it. Mutexes only (semaphores and
    /// read-write locks are not lined up); it matters with a retry policy that waits (the
    /// default is a single try). Costs one more connection for waiters.
    pub fair: bool,
}

impl std::fmt::Debug for IncConfig {
    /// Every field, the URL without password, and the prefix and the CA file's path as a URL
    /// would be shown (a password put there by mistake stays hidden).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            url,
            prefix,
            command_timeout,
            connect_timeout,
            tls_ca_file,
            wake_on_release,
            fair,
        } = self;
        f.debug_struct("IncConfig")
            .field("url", url)
            .field("prefix", &shown_text(prefix))
            .field("command_timeout", command_timeout)
            .field("connect_timeout", connect_timeout)
            .field("tls_ca_file", &tls_ca_file.as_deref().map(shown_path))
            .field("wake_on_release", wake_on_release)
            .field("fair", fair)
            .finish()
    }
}

impl Default for IncConfig {
    fn default() -> Self {
        Self {
            url: SecretUrl::new("redis://127.0.0.1:6379/0"),
            prefix: "lock:".to_owned(),
            command_timeout: 500,
            connect_timeout: 1_000,
            tls_ca_file: None,
            wake_on_release: false,
            fair: false,
        }
    }
}

impl IncConfig {
    /// A configuration for `url`, with defaults for the rest.
    pub fn new(url: impl Into<SecretUrl>) -> Self {
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

    /// Turns fair waiting across processes on or off (see [`IncConfig::fair`]).
    #[must_use]
    pub fn with_fair(mut self, fair: bool) -> Self {
        self.fair = fair;
        self
    }

    /// Checks every field and names the first that is wrong (the URL without its password).
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming the field.
    pub fn validate(&self) -> Result<()> {
        // fred accepts URLs of other schemes as if they were Redis (and Valkey's schemes name
        // the same protocol; fred takes both).
        URL_RULES.check(&self.url, self.tls_ca_file.as_deref())?;
        self.resp3()?;
        if self.prefix.len() > 256 {
            return Err(LockError::invalid("prefix", "is longer than 256 bytes"));
        }
        validate::name("prefix", &self.prefix)?;
        validate::timeout("command_timeout", self.command_timeout)?;
        validate::timeout("connect_timeout", self.connect_timeout)?;
        Ok(())
    }

    /// Whether the URL asks for RESP3 (`protocol=resp3` or `3` in its query; `resp2` or `2` is
    /// the default), which fred itself does not read from a URL.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming `url` for any other value, or `protocol` given twice.
    pub(crate) fn resp3(&self) -> Result<bool> {
        // The query as redis-rs and fred read it (both through the `url` crate): before the
        // fragment, names and values form-decoded (`%70rotocol` is `protocol`). A URL it cannot
        // parse has no protocol here; connecting names what is wrong with it.
        let Ok(parsed) = url::Url::parse(self.url.expose()) else {
            return Ok(false);
        };
        let mut asked = parsed
            .query_pairs()
            .filter(|(name, _)| name == "protocol")
            .map(|(_, value)| value.into_owned());
        let resp3 = match asked.next().as_deref() {
            None | Some("2" | "resp2") => false,
            Some("3" | "resp3") => true,
            Some(other) => {
                return Err(LockError::invalid(
                    "url",
                    format!(
                        "{}: protocol `{}` is not one of resp2, 2, resp3, 3",
                        self.label(),
                        shown_text(other)
                    ),
                ));
            }
        };
        if asked.next().is_some() {
            return Err(LockError::invalid(
                "url",
                format!("{}: protocol is given more than once", self.label()),
            ));
        }
        Ok(resp3)
    }

    /// The server as shown in messages: its URL without password.
    pub(crate) fn label(&self) -> String {
        self.url.to_string()
    }
}

/// A URL, or a list of exactly one; neither message quotes a URL.
fn one_url<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SecretUrl, D::Error> {
    struct OneUrl;

    impl<'de> Visitor<'de> for OneUrl {
        type Value = SecretUrl;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a URL string, or a list of one")
        }

        fn visit_str<E: serde::de::Error>(self, url: &str) -> Result<SecretUrl, E> {
            Ok(SecretUrl::new(url))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SecretUrl, A::Error> {
            let mut urls = Vec::new();
            while let Some(url) = seq.next_element::<SecretUrl>()? {
                urls.push(url);
            }
            match <[SecretUrl; 1]>::try_from(urls) {
                Ok([url]) => Ok(url),
                Err(urls) => Err(serde::de::Error::custom(format!(
                    "the {} backend takes exactly one node, got {}",
                    crate::NAME,
                    urls.len()
                ))),
            }
        }
    }

    // `deserialize_any`: serde_json answers `deserialize_string` with an error it writes
    // itself, which may quote what it found.
    deserializer.deserialize_any(OneUrl)
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
            // A connection URL put in the prefix: every stored key would carry the password
            // (old: taken; `MONITOR` showed `EVALSHA … "redis://:s3cret@h/{k}"`).
            (
                IncConfig {
                    prefix: "redis://:s3cret@h/".to_owned(),
                    ..IncConfig::default()
                },
                "prefix",
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
    fn the_protocol_is_read_from_the_url_and_a_bad_one_refused() {
        for (url, resp3) in [
            ("redis://127.0.0.1:1/0", false),
            ("redis://127.0.0.1:1/0?protocol=resp2", false),
            ("redis://127.0.0.1:1/0?protocol=2", false),
            ("redis://u:s3cret@127.0.0.1:1/0?protocol=resp3", true),
            ("redis://127.0.0.1:1?protocol=3", true),
            (
                "redis-cluster://127.0.0.1:1?node=127.0.0.1:2&protocol=resp3",
                true,
            ),
            ("redis://127.0.0.1:1/0?protocolx=resp3", false),
            // Read as redis-rs reads them: decoded, and never from the fragment.
            ("redis://127.0.0.1:1/0?%70rotocol=resp3", true),
            ("redis://127.0.0.1:1/0?protocol=%72esp3", true),
            ("redis://127.0.0.1:1/0?protocol=%33", true),
            ("redis://127.0.0.1:1/0#x?protocol=resp3", false),
            ("redis://127.0.0.1:1/0?protocol=resp3#protocol=resp2", true),
        ] {
            let config = IncConfig::new(url);
            config.validate().unwrap();
            assert_eq!(config.resp3().unwrap(), resp3, "{url}");
        }
        for url in [
            "redis://u:s3cret@127.0.0.1:1/0?protocol=resp4",
            "redis://u:s3cret@127.0.0.1:1/0?protocol=",
            "redis://u:s3cret@127.0.0.1:1/0?protocol",
            "redis://u:s3cret@127.0.0.1:1/0?protocol=resp3&protocol=resp2",
            "redis://u:s3cret@127.0.0.1:1/0?protocol=resp3+",
            "redis://u:s3cret@127.0.0.1:1/0?protocol=%FF",
            "redis://u:s3cret@127.0.0.1:1/0?protocol=resp3&%70rotocol=resp3",
        ] {
            match IncConfig::new(url).validate() {
                Err(LockError::InvalidInput { field, reason }) => {
                    assert_eq!(field, "url");
                    assert!(reason.contains("protocol"), "{reason}");
                    assert!(!reason.contains("s3cret"), "{reason}");
                }
                other => panic!("expected an invalid url for {url}, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_raw_delimiter_in_the_password_is_refused_without_showing_it() {
        for url in [
            "redis://app:s3/cr3t@127.0.0.1:7003/",
            "redis-cluster://app:s3?cr3t@127.0.0.1:7003",
            "redis://app:s3#cr3t@127.0.0.1:7003/",
            "app:s3cr3t@127.0.0.1:7003/",
        ] {
            let config = IncConfig::new(url);
            let error = config.validate().unwrap_err();
            assert!(!error.to_string().contains("cr3t"), "{error}");
            assert!(!format!("{config:?}").contains("cr3t"), "{config:?}");
        }
        IncConfig::new("redis://app:s3@cr%2F3t@127.0.0.1:7003/")
            .validate()
            .unwrap();
        for json in [
            r#"{"url": ["redis://app:s3cr3t@127.0.0.1:7003/", "redis://app:s3cr3t@h:1/"]}"#,
            r#"{"urls": []}"#,
            r#"{"url": {"host": "redis://app:s3cr3t@127.0.0.1:7003/"}}"#,
            r#"{"url": [7]}"#,
        ] {
            let error = serde_json::from_str::<IncConfig>(json).unwrap_err();
            assert!(!error.to_string().contains("s3cr3t"), "{error}");
        }
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

    #[test]
    fn the_url_is_also_a_list_of_one_under_the_facades_names() {
        for json in [
            r#"{"urls": ["redis://127.0.0.1:7000/1"], "connectTimeout": 30, "tlsCaFile": "ca.pem"}"#,
            r#"{"nodes": ["redis://127.0.0.1:7000/1"], "connect_timeout": 30, "tls_ca_file": "ca.pem"}"#,
            r#"{"url": "redis://127.0.0.1:7000/1", "connect_timeout": 30, "tls_ca_file": "ca.pem"}"#,
        ] {
            let config: IncConfig = serde_json::from_str(json).unwrap();
            assert_eq!(config.url.expose(), "redis://127.0.0.1:7000/1");
            assert_eq!(config.connect_timeout, 30);
            assert_eq!(config.tls_ca_file.as_deref(), Some("ca.pem".as_ref()));
        }
        let error = serde_json::from_str::<IncConfig>(
            r#"{"urls": ["redis://127.0.0.1:1/", "redis://127.0.0.1:2/"]}"#,
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("takes exactly one node, got 2"),
            "{error}"
        );
        let error = serde_json::from_str::<IncConfig>(r#"{"drift_factor": 0.1}"#).unwrap_err();
        assert!(
            error.to_string().contains("unknown field `drift_factor`")
                && error.to_string().contains("command_timeout"),
            "{error}"
        );
    }
}

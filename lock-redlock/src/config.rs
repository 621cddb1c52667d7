//! Configuration of the Redlock backend, as serde data with validation.

use std::time::Duration;

use lock_core::raw::redis::{self as redis_kit, UrlRules};
use lock_core::{LockError, Result, SecretUrl, raw::validate};
use serde::{Deserialize, Serialize};

/// How each node's connection is kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionKind {
    /// One redis-rs multiplexed connection per node, opened at its first request and opened
    /// anew by the request after it broke or after its opening failed (requests arriving
    /// meanwhile wait for the one attempt): the faster of the two in our benchmark.
    #[default]
    Manager,
    /// A deadpool pool of multiplexed connections per node, made by deadpool-redis: a
    /// broken connection only affects itself. A checkout costs no round trip unless the
    /// connection was idle for a second (it is then checked with `PING` first); one whose
    /// request failed on the connection, or was cut short, leaves the pool.
    Pool,
}

/// Configuration of a [`Redlock`](crate::Redlock).
///
/// Durations are whole milliseconds; node-redlock's camelCase names are accepted as aliases.
///
/// The URLs are [`SecretUrl`]s: `Debug`, validation errors and logs show them without password,
/// and a deserialization error never quotes one. One node may be given as a single string, and
/// as `url` (`"url": "redis://…"`, as inc takes it). toml's own `Display` and `Debug` of its error
/// print the document's line, URL included: show its `message()` instead, or parse through the
/// facade's `LockConfig::from_toml`, which does. Any other string of the
/// wrong type (`"pool_size": "…"`) is quoted by serde's message, as for every type: the
/// facade's parsers hide every string of the document that looks like a URL with user info.
///
/// # Default
/// - `urls`: none (at least one is required; each node once: the same address and database
///   twice is refused)
/// - `drift_factor`: 0.01 (node-redlock's default)
/// - `node_timeout`: derived per call as 5 % of the ttl, between 20 ms and 500 ms
/// - `connect_timeout`: 500 ms
/// - `connection`: `manager`
/// - `pool_size`: 4 connections per node (with `connection = "pool"`)
/// - `wake_on_release`: off with one node, on with several (unset: see
///   [`RedlockConfig::wake_on_release`])
/// - `fencing`: off
/// - `fair`: on (unset: see [`RedlockConfig::fair`])
///
/// Retries are not the backend's business: they belong to the locker's
/// [`RetryPolicy`](lock_core::RetryPolicy) (the facade reads `retry_count`, `retry_delay`,
/// `retry_jitter` and `deadline` into it, whatever the backend).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedlockConfig {
    /// `redis://[user:password@]host:port[/db]` URLs of independent Redis masters; `rediss://`
    /// for TLS. A `/`, `?` or `#` in the user name or password is written `%2F`, `%3F`, `%23`.
    #[serde(
        alias = "nodes",
        alias = "url",
        deserialize_with = "SecretUrl::deserialize_list"
    )]
    pub urls: Vec<SecretUrl>,
    /// Expected clock drift between client and servers, as a fraction of the ttl, in [0, 1).
    #[serde(alias = "driftFactor")]
    pub drift_factor: f64,
    /// How long to wait for one node's answer, in ms; unset to derive it from the ttl.
    #[serde(alias = "nodeTimeout", skip_serializing_if = "Option::is_none")]
    pub node_timeout: Option<u64>,
    /// How long to wait for a connection to a node, in ms.
    #[serde(alias = "connectTimeout")]
    pub connect_timeout: u64,
    /// How each node's connection is kept.
    pub connection: ConnectionKind,
    /// Connections per node with [`ConnectionKind::Pool`], plus one more opened by the first
    /// extend or downgrade: a holder's changes of its expiry go on that one connection, in
    /// order (a request of an extend that timed out on a pooled connection could otherwise
    /// land after a later extend and cut its expiry short).
    #[serde(alias = "poolSize")]
    pub pool_size: usize,
    /// A PEM file of the CA that signed the nodes' TLS certificates, for `rediss://` nodes whose
    /// certificates the system's roots do not cover (needs `connection = "manager"`).
    #[serde(alias = "tlsCaFile", skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Announce releases over pub/sub and let waiters subscribe, so that they retry at once
    /// instead of sleeping out their retry delay (a missed message costs one delay at most).
    /// A user without pub/sub rights still releases (the message is lost, not the release).
    /// Waits shorter than 5 ms are slept out without subscribing.
    ///
    /// Unset (`None`, the default), it is on with several nodes, where the waiters a fair line
    /// does not serve (multi-key locks, semaphores, read-write locks; every waiter with `fair`
    /// off) would otherwise poll, and off with one node, as it has always been there (see
    /// [`RedlockConfig::wakes_on_release`]). Fair waiters are woken by their turn either way.
    #[serde(alias = "wakeOnRelease", skip_serializing_if = "Option::is_none")]
    pub wake_on_release: Option<bool>,
    /// Hand out fencing tokens: every acquisition also advances a counter beside the key on
    /// each node it wins (`<key>:fence`, to at least the node's clock in µs) and raises the
    /// counter on a quorum to the highest value it saw, a second round trip. Tokens then
    /// increase strictly per key.
    pub fencing: bool,
    /// Serve waiters across processes first come, first served: a waiter that finds the key
    /// held joins a line beside it on every node (`<key>` + byte 0xFF + `:queue`, and
    /// `:queue-expiry` for the entries' expiries), a release reserves the key for the head of
    /// the line and wakes that waiter alone over pub/sub, and a single try never passes a
    /// waiting line. With several nodes a waiter joins every node's line at the place its
    /// client chose (its clock when it first lined up), so that every node puts the same waiter
    /// first; the quorum alone still decides who holds the lock. Every client of a key must
    /// agree on it. Mutexes on one key only: multi-key locks, semaphores and read-write locks
    /// are not lined up.
    ///
    /// Unset (`None`, the default), it is on: an uncontended cycle costs what it does without
    /// it (the first attempt is the plain `SET NX`, with an `EXISTS` of the line in the same
    /// round trip); see [`RedlockConfig::is_fair`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fair: Option<bool>,
}

impl std::fmt::Debug for RedlockConfig {
    /// Every field, the URLs without password and the CA file's path as a URL would be shown
    /// (a password put there by mistake stays hidden).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            urls,
            drift_factor,
            node_timeout,
            connect_timeout,
            connection,
            pool_size,
            tls_ca_file,
            wake_on_release,
            fencing,
            fair,
        } = self;
        f.debug_struct("RedlockConfig")
            .field("urls", urls)
            .field("drift_factor", drift_factor)
            .field("node_timeout", node_timeout)
            .field("connect_timeout", connect_timeout)
            .field("connection", connection)
            .field("pool_size", pool_size)
            .field(
                "tls_ca_file",
                &tls_ca_file.as_deref().map(redis_kit::shown_path),
            )
            .field("wake_on_release", wake_on_release)
            .field("fencing", fencing)
            .field("fair", fair)
            .finish()
    }
}

/// The smallest and largest derived node timeouts.
const DERIVED_TIMEOUT: (Duration, Duration) =
    (Duration::from_millis(20), Duration::from_millis(500));

impl Default for RedlockConfig {
    fn default() -> Self {
        Self {
            urls: Vec::new(),
            drift_factor: 0.01,
            node_timeout: None,
            connect_timeout: 500,
            connection: ConnectionKind::Manager,
            pool_size: 4,
            tls_ca_file: None,
            wake_on_release: None,
            fencing: false,
            fair: None,
        }
    }
}

impl RedlockConfig {
    /// A configuration for these node URLs, with defaults for the rest.
    pub fn new<I, S>(urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<SecretUrl>,
    {
        Self {
            urls: urls.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Sets a fixed per-node timeout.
    #[must_use]
    pub fn with_node_timeout(mut self, timeout: Duration) -> Self {
        self.node_timeout = Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// Sets how each node's connection is kept.
    #[must_use]
    pub fn with_connection(mut self, connection: ConnectionKind) -> Self {
        self.connection = connection;
        self
    }

    /// Turns pub/sub wake-ups of waiters on or off.
    #[must_use]
    pub fn with_wake_on_release(mut self, wake_on_release: bool) -> Self {
        self.wake_on_release = Some(wake_on_release);
        self
    }

    /// Whether releases wake waiters over pub/sub: as set, or, unset, when there are several
    /// nodes.
    pub fn wakes_on_release(&self) -> bool {
        self.wake_on_release.unwrap_or(self.urls.len() > 1)
    }

    /// Turns fair waiting across processes on or off (see [`RedlockConfig::fair`]).
    #[must_use]
    pub fn with_fair(mut self, fair: bool) -> Self {
        self.fair = Some(fair);
        self
    }

    /// Whether waiters line up (`fair`): as set, or, unset, yes.
    pub fn is_fair(&self) -> bool {
        self.fair.unwrap_or(true)
    }

    /// Turns fencing tokens on or off.
    #[must_use]
    pub fn with_fencing(mut self, fencing: bool) -> Self {
        self.fencing = fencing;
        self
    }

    /// Sets the clock drift factor.
    #[must_use]
    pub fn with_drift_factor(mut self, drift_factor: f64) -> Self {
        self.drift_factor = drift_factor;
        self
    }

    /// Checks every field and names the first that is wrong (URLs are shown without password).
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.urls.is_empty() {
            return Err(LockError::invalid(
                "urls",
                "name at least one redis:// node",
            ));
        }
        // Each node once: the same server (address and database) named twice would count its
        // vote twice toward the quorum, and its failure twice against it.
        let mut nodes: Vec<(String, i64)> = Vec::with_capacity(self.urls.len());
        for (index, url) in self.urls.iter().enumerate() {
            let node = NodeUrl::parse(url).map_err(|e| e.within(&format!("urls[{index}]")))?;
            if let Some(first) = nodes.iter().position(|seen| *seen == node.identity) {
                return Err(LockError::invalid(
                    format!("urls[{index}]"),
                    format!(
                        "{url} names the same node as urls[{first}] ({}, database {}): \
                         Redlock's nodes must be independent servers",
                        node.label, node.identity.1
                    ),
                ));
            }
            nodes.push(node.identity);
        }
        URL_RULES.check_ca_file(self.tls_ca_file.as_deref())?;
        validate::fraction("drift_factor", self.drift_factor)?;
        if let Some(timeout) = self.node_timeout {
            validate::timeout("node_timeout", timeout)?;
        }
        validate::timeout("connect_timeout", self.connect_timeout)?;
        if self.tls_ca_file.is_some() && self.connection == ConnectionKind::Pool {
            return Err(LockError::invalid(
                "tls_ca_file",
                "a custom CA needs connection = \"manager\"",
            ));
        }
        if self.pool_size == 0 || self.pool_size > 1024 {
            return Err(LockError::invalid(
                "pool_size",
                format!("{} is outside 1..=1024", self.pool_size),
            ));
        }
        Ok(())
    }

    /// Checks that this configuration names exactly one node, as the facade's
    /// [`SINGLE_NODE_NAME`](crate::SINGLE_NODE_NAME) (`redis`) backend requires.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming `urls`.
    pub fn require_single_node(&self) -> Result<()> {
        if self.urls.len() == 1 {
            return Ok(());
        }
        Err(LockError::invalid(
            "urls",
            format!(
                "the {} backend takes exactly one node, got {}; use {} for several",
                crate::SINGLE_NODE_NAME,
                self.urls.len(),
                crate::NAME
            ),
        ))
    }

    /// The per-node timeout for an operation on a lock of this ttl.
    pub(crate) fn node_timeout_for(&self, ttl: Duration) -> Duration {
        match self.node_timeout {
            Some(ms) => Duration::from_millis(ms),
            None => ttl
                .mul_f64(0.05)
                .clamp(DERIVED_TIMEOUT.0, DERIVED_TIMEOUT.1),
        }
    }
}

/// The node URLs Redlock takes: independent masters (no cluster), TLS with the `tls` feature.
const URL_RULES: UrlRules = UrlRules {
    crate_name: "lock-redlock",
    cluster: false,
    tls: cfg!(feature = "tls"),
};

/// A checked node URL and the label it is shown as (`host:port`, never the password).
#[derive(Clone)]
pub(crate) struct NodeUrl {
    pub(crate) url: String,
    pub(crate) label: String,
    /// The server's address as redis-rs reads it, and the database: what makes two URLs the
    /// same node.
    pub(crate) identity: (String, i64),
}

impl NodeUrl {
    /// Checks the scheme, the user info ([`URL_RULES`]) and the host, then lets redis-rs parse
    /// the rest; every message shows the URL without its password.
    pub(crate) fn parse(url: &SecretUrl) -> Result<Self> {
        // Valkey's schemes name the same protocol; redis-rs takes both.
        URL_RULES.check(url, None)?;
        let host_port = url.host();
        if host_port.is_empty() {
            return Err(LockError::invalid("url", format!("{url} names no host")));
        }
        let info = match redis::Client::open(url.expose()) {
            Ok(client) => client.get_connection_info().clone(),
            Err(error) => return Err(LockError::invalid("url", format!("{url}: {error}"))),
        };
        Ok(Self {
            url: url.expose().to_owned(),
            label: host_port.to_owned(),
            identity: (info.addr().to_string(), info.redis_settings().db()),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn defaults_validate_once_urls_are_set() {
        assert!(RedlockConfig::default().validate().is_err());
        RedlockConfig::new(["redis://127.0.0.1:6379/"])
            .validate()
            .unwrap();
    }

    #[test]
    fn a_node_named_twice_is_refused() {
        for urls in [
            ["redis://127.0.0.1:7003/", "redis://127.0.0.1:7003/"],
            ["redis://:secret@127.0.0.1:7003/", "redis://127.0.0.1:7003"],
            [
                "redis://127.0.0.1:7003/2",
                "redis://127.0.0.1:7003/2?protocol=resp3",
            ],
        ] {
            let error = RedlockConfig::new([urls[0], "redis://127.0.0.1:7004/", urls[1]])
                .validate()
                .unwrap_err();
            let message = error.to_string();
            assert!(
                message.contains("urls[2]") && message.contains("same node as urls[0]"),
                "{message}"
            );
            assert!(!message.contains("secret"), "{message}");
        }
        // Another database of the same server, or another port, is another node.
        RedlockConfig::new(["redis://127.0.0.1:7003/0", "redis://127.0.0.1:7003/1"])
            .validate()
            .unwrap();
        RedlockConfig::new(["redis://127.0.0.1:7003", "redis://127.0.0.1:7004"])
            .validate()
            .unwrap();
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (RedlockConfig::new(["http://127.0.0.1/"]), "urls[0].url"),
            (RedlockConfig::new(["redis://[::1"]), "urls[0].url"),
            (RedlockConfig::new(["redis://"]), "urls[0].url"),
            (
                RedlockConfig::new(["redis://h:1/"]).with_drift_factor(1.0),
                "drift_factor",
            ),
            (
                RedlockConfig::new(["redis://h:1/"]).with_drift_factor(-0.1),
                "drift_factor",
            ),
            (
                RedlockConfig::new(["redis://h:1/"]).with_node_timeout(Duration::ZERO),
                "node_timeout",
            ),
        ];
        for (config, field) in cases {
            match config.validate() {
                Err(LockError::InvalidInput { field: got, .. }) => {
                    assert_eq!(got, field, "{config:?}")
                }
                other => panic!("expected invalid {field}, got {other:?}"),
            }
        }
    }

    #[test]
    fn passwords_never_show() {
        let url = SecretUrl::new("redis://locker:s3cret@127.0.0.1:7003/2");
        assert_eq!(url.to_string(), "redis://locker:***@127.0.0.1:7003/2");
        let config = RedlockConfig::new([url.clone(), "http://u:s3cret@h/".into()]);
        assert!(!format!("{config:?}").contains("s3cret"));
        let error = config.validate().unwrap_err();
        assert!(!error.to_string().contains("s3cret"), "{error}");
        assert_eq!(NodeUrl::parse(&url).unwrap().label, "127.0.0.1:7003");
    }

    #[test]
    fn a_raw_delimiter_in_the_password_is_refused_without_showing_it() {
        for url in [
            "redis://app:s3/cr3t@127.0.0.1:7003/",
            "redis://app:s3?cr3t@127.0.0.1:7003/",
            "redis://app:s3#cr3t@127.0.0.1:7003/",
            "redis://app:s3cr3t@127.0.0.1:99999/",
            "app:s3cr3t@127.0.0.1:7003/",
            "redis ://app:s3cr3t@127.0.0.1:7003/",
        ] {
            let config = RedlockConfig::new([url]);
            let error = config.validate().unwrap_err();
            assert!(!error.to_string().contains("cr3t"), "{error}");
            assert!(!format!("{config:?}").contains("cr3t"), "{config:?}");
        }
        // `@` and percent-escapes are fine; the label is the host after the last `@`.
        let url = SecretUrl::new("redis://app:s3@cr%2F3t@127.0.0.1:7003/");
        assert_eq!(NodeUrl::parse(&url).unwrap().label, "127.0.0.1:7003");
    }

    #[test]
    fn one_node_may_be_a_single_url_under_any_of_its_names() {
        for json in [
            r#"{"urls": "redis://app:s3cr3t@127.0.0.1:7003/"}"#,
            r#"{"url": "redis://app:s3cr3t@127.0.0.1:7003/"}"#,
            r#"{"nodes": "redis://app:s3cr3t@127.0.0.1:7003/"}"#,
            r#"{"url": ["redis://app:s3cr3t@127.0.0.1:7003/"]}"#,
        ] {
            let config = serde_json::from_str::<RedlockConfig>(json).unwrap();
            assert_eq!(config.urls.len(), 1, "{json}");
            assert_eq!(
                config.urls[0].expose(),
                "redis://app:s3cr3t@127.0.0.1:7003/"
            );
            assert!(!format!("{config:?}").contains("s3cr3t"), "{config:?}");
        }
        // Two names for the one field: refused, naming the field, never quoting a value.
        let json = r#"{"url": "redis://app:s3cr3t@h:1/", "urls": ["redis://app:s3cr3t@h:2/"]}"#;
        let error = serde_json::from_str::<RedlockConfig>(json).unwrap_err();
        assert!(!error.to_string().contains("s3cr3t"), "{error}");
        assert!(error.to_string().contains("duplicate field"), "{error}");
        // Anything else where the URLs belong is described, not quoted.
        let json = r#"{"urls": [["redis://app:s3cr3t@h:1/"]]}"#;
        let error = serde_json::from_str::<RedlockConfig>(json).unwrap_err();
        assert!(!error.to_string().contains("s3cr3t"), "{error}");
    }

    #[test]
    fn fair_is_on_by_default_with_any_number_of_nodes() {
        let one = RedlockConfig::new(["redis://127.0.0.1:1/"]);
        assert!(one.fair.is_none() && one.is_fair());
        assert!(!one.clone().with_fair(false).is_fair());
        let three = RedlockConfig::new([
            "redis://127.0.0.1:1/",
            "redis://127.0.0.1:2/",
            "redis://127.0.0.1:3/",
        ]);
        assert!(three.fair.is_none() && three.is_fair());
        three.validate().unwrap();
        three.clone().with_fair(true).validate().unwrap();
        assert!(!three.with_fair(false).is_fair());
        // Unset, it is not written out; set, it is read back as set.
        let json = serde_json::to_string(&one).unwrap();
        assert!(!json.contains("fair"), "{json}");
        let off: RedlockConfig =
            serde_json::from_str(r#"{"urls": ["redis://127.0.0.1:1/"], "fair": false}"#).unwrap();
        assert_eq!(off.fair, Some(false));
        assert!(!off.is_fair());
    }

    #[test]
    fn wake_ups_are_on_by_default_with_several_nodes_and_off_with_one() {
        let one = RedlockConfig::new(["redis://127.0.0.1:1/"]);
        assert!(one.wake_on_release.is_none() && !one.wakes_on_release());
        assert!(one.clone().with_wake_on_release(true).wakes_on_release());
        let three = RedlockConfig::new([
            "redis://127.0.0.1:1/",
            "redis://127.0.0.1:2/",
            "redis://127.0.0.1:3/",
        ]);
        assert!(three.wakes_on_release());
        assert!(!three.clone().with_wake_on_release(false).wakes_on_release());
        let json = serde_json::to_string(&three).unwrap();
        assert!(!json.contains("wake_on_release"), "{json}");
        let off: RedlockConfig = serde_json::from_str(
            r#"{"urls": ["redis://127.0.0.1:1/", "redis://127.0.0.1:2/"], "wakeOnRelease": false}"#,
        )
        .unwrap();
        assert_eq!(off.wake_on_release, Some(false));
        assert!(!off.wakes_on_release());
    }

    #[test]
    fn every_option_parses_from_json_under_its_seed_name() {
        let config: RedlockConfig = serde_json::from_str(
            r#"{"nodes": ["redis://127.0.0.1:1/"], "driftFactor": 0.02, "nodeTimeout": 70,
                "connectTimeout": 300, "connection": "pool", "poolSize": 2, "wakeOnRelease": true,
                "fencing": true, "fair": true}"#,
        )
        .unwrap();
        config.validate().unwrap();
        assert!((config.drift_factor - 0.02).abs() < f64::EPSILON);
        assert_eq!(config.node_timeout, Some(70));
        assert_eq!(config.connect_timeout, 300);
        assert_eq!(config.connection, ConnectionKind::Pool);
        assert_eq!(config.pool_size, 2);
        assert!(config.wakes_on_release() && config.fencing && config.fair == Some(true));
        config.require_single_node().unwrap();
    }

    #[test]
    fn retry_options_are_not_the_backends() {
        // They belong to the locker's retry policy: refused here, naming the valid fields.
        for field in ["retryCount", "retry_delay", "retryJitter"] {
            let json = format!(r#"{{"urls": ["redis://127.0.0.1:1/"], "{field}": 1}}"#);
            let error = serde_json::from_str::<RedlockConfig>(&json)
                .unwrap_err()
                .to_string();
            assert!(
                error.contains(&format!("unknown field `{field}`")),
                "{error}"
            );
            assert!(
                error.contains("drift_factor") && error.contains("tls_ca_file"),
                "{error}"
            );
        }
    }

    #[test]
    fn the_single_node_name_takes_one_node() {
        let two = RedlockConfig::new(["redis://h:1/", "redis://h:2/"]);
        match two.require_single_node() {
            Err(LockError::InvalidInput { field, reason }) => {
                assert_eq!(field, "urls");
                assert!(reason.contains("exactly one node, got 2"), "{reason}");
            }
            other => panic!("expected invalid urls, got {other:?}"),
        }
        assert!(RedlockConfig::default().require_single_node().is_err());
    }

    #[test]
    fn derived_node_timeout_is_bounded() {
        let config = RedlockConfig::new(["redis://h:1/"]);
        assert_eq!(
            config.node_timeout_for(Duration::from_secs(1)),
            Duration::from_millis(50)
        );
        assert_eq!(
            config.node_timeout_for(Duration::from_millis(100)),
            Duration::from_millis(20)
        );
        assert_eq!(
            config.node_timeout_for(Duration::from_secs(3600)),
            Duration::from_millis(500)
        );
    }
}

//! The stores fair waiting (`fair`) runs on, for its tests: `redis` (Redlock on one node),
//! Redlock over three nodes, inc on one server and inc on a Redis Cluster of three primaries,
//! each with servers of its own and a new backend instance per client (a process of its own, as
//! far as the store can tell).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use lock_core::raw::{KeySet, Lock, LockRequest};
use lock_core::{Key, LockOptions, Locker, RetryPolicy, Token};
use lock_inc::{IncConfig, IncLock};
use lock_redlock::{Redlock, RedlockConfig};

use crate::server::{RedisServer, cluster_url, redis_or_skip, start_cluster};

/// Which store a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    /// Redlock on one node (the facade's `redis`).
    Redis,
    /// Redlock over three independent nodes (the facade's `redlock`).
    Redlock3,
    /// inc on one server.
    Inc,
    /// inc on a Redis Cluster of three primaries.
    IncCluster,
}

/// Running servers of one [`Store`] and the URL its clients connect to.
#[derive(Debug)]
pub struct Target {
    /// The store.
    pub store: Store,
    /// Its servers (one, three Redlock nodes, or the Cluster's three primaries); single servers
    /// and Redlock's nodes accept `DEBUG`.
    pub servers: Vec<RedisServer>,
    /// The URL clients connect to.
    pub url: String,
}

impl Target {
    /// Starts the servers of `store`; `None` (the test is skipped, naming `test`) when no
    /// redis-server is installed and the run does not require one.
    ///
    /// # Panics
    /// When the servers cannot be started.
    pub async fn start(store: Store, test: &str) -> Option<Self> {
        let binary = redis_or_skip(test)?;
        let (servers, url) = if store == Store::IncCluster {
            let servers = start_cluster(&binary, 3).expect("cluster");
            let url = cluster_url(&servers);
            (servers, url)
        } else {
            let count = if store == Store::Redlock3 { 3 } else { 1 };
            let servers: Vec<RedisServer> = (0..count)
                .map(|_| {
                    RedisServer::start(&binary, &["--enable-debug-command", "yes"]).expect("server")
                })
                .collect();
            let url = servers[0].url();
            (servers, url)
        };
        Some(Self {
            store,
            servers,
            url,
        })
    }

    /// A new backend instance: a process of its own, as far as the store can tell.
    ///
    /// # Panics
    /// When the backend cannot be built or connect.
    pub async fn backend(&self, fair: bool) -> Arc<dyn Lock> {
        match self.store {
            Store::Redis | Store::Redlock3 => Arc::new(
                Redlock::new(
                    RedlockConfig::new(self.servers.iter().map(RedisServer::url))
                        .with_fair(fair)
                        .with_node_timeout(Duration::from_millis(500)),
                )
                .expect("redlock"),
            ),
            Store::Inc | Store::IncCluster => Arc::new(
                IncLock::connect(IncConfig {
                    command_timeout: 2_000,
                    ..IncConfig::new(self.url.clone()).with_fair(fair)
                })
                .await
                .expect("inc"),
            ),
        }
    }

    /// A client over a new backend instance with `ttl` and `retry`.
    ///
    /// # Panics
    /// As [`Target::backend`].
    pub async fn locker(&self, fair: bool, ttl: Duration, retry: RetryPolicy) -> Locker {
        Locker::from_arc(self.backend(fair).await)
            .with_options(LockOptions::default().with_ttl(ttl).with_retry(retry))
            .expect("options")
    }

    /// One waiting attempt on `key` by a new client that then dies without a word (no
    /// take-back): its entry stays in line until it expires, `entry` from now.
    ///
    /// # Panics
    /// When the attempt fails or is granted (the key must be held).
    pub async fn dead_waiter(&self, key: &str, entry: Duration) {
        let dead = self.backend(true).await;
        let request = LockRequest::new(
            KeySet::one(Key::new(key).expect("a valid key")),
            Token::generate().expect("a token"),
            entry,
        )
        .expect("a valid request")
        .with_will_wait(true)
        .with_waiter(Token::generate().expect("a token"));
        assert!(
            dead.try_acquire(&request)
                .await
                .expect("the attempt")
                .is_none()
        );
        dead.shutdown().await.expect("shutdown");
    }

    /// Every key on the servers.
    pub async fn keys(&self) -> BTreeSet<Vec<u8>> {
        let mut all = BTreeSet::new();
        for server in &self.servers {
            let Ok(client) = redis::Client::open(server.url()) else {
                continue;
            };
            let Ok(mut connection) = client.get_multiplexed_async_connection().await else {
                continue;
            };
            let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
                .arg("*")
                .query_async(&mut connection)
                .await
                .unwrap_or_default();
            all.extend(keys);
        }
        all
    }

    /// The keys on the servers that `keep` selects (shown lossily as text), once none is left
    /// or `within` has passed (checked every 20 ms): what is left of a line that lapsed takes
    /// up to a quarter of its lease to go.
    pub async fn keys_left_within(
        &self,
        within: Duration,
        keep: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left: Vec<String> = self
                .keys()
                .await
                .into_iter()
                .map(|name| String::from_utf8_lossy(&name).into_owned())
                .filter(|name| keep(name))
                .collect();
            if left.is_empty() || tokio::time::Instant::now() >= deadline {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The keys of waiting lines that exist now whose name holds `key` (`""` for every line),
    /// shown lossily as text.
    pub async fn line_keys(&self, key: &str) -> Vec<String> {
        self.keys()
            .await
            .into_iter()
            .map(|name| String::from_utf8_lossy(&name).into_owned())
            .filter(|name| name.contains(key) && name.contains(":queue"))
            .collect()
    }
}

/// Retries forever every `delay` without jitter, for 30 s at most.
pub fn waiting(delay: Duration) -> RetryPolicy {
    RetryPolicy::forever()
        .with_retry_delay(delay)
        .with_retry_jitter(Duration::ZERO)
        .with_deadline(Duration::from_secs(30))
}

/// A fair Redlock mutex's release script as lock-redlock builds it (`node.rs`:
/// `RELEASE_FAIR_SOURCE`), for tests that release as another fair client would, or check
/// which scripts a node knows.
pub fn release_fair_source() -> String {
    [
        include_str!("../../lock-redlock/src/lua/release_fair.lua"),
        lock_core::raw::redis::LINE_SCRIPT,
        include_str!("../../lock-redlock/src/lua/line_pass.lua"),
        include_str!("../../lock-redlock/src/lua/release_fair_pass.lua"),
    ]
    .concat()
}

/// The names of `key`'s waiting line and of its expiry index on `store`'s servers (inc with the
/// default prefix `lock:`).
pub fn line_names(store: Store, key: &str) -> [Vec<u8>; 2] {
    match store {
        Store::Inc | Store::IncCluster => [
            format!("lock:{{{key}}}:queue").into_bytes(),
            format!("lock:{{{key}}}:queue-expiry").into_bytes(),
        ],
        Store::Redis | Store::Redlock3 => [
            [key.as_bytes(), b"\xff:queue"].concat(),
            [key.as_bytes(), b"\xff:queue-expiry"].concat(),
        ],
    }
}

/// The name of `key`'s waiting line on a Redlock node (`<key>` + 0xFF + `:queue`).
pub fn line_key(key: &str) -> Vec<u8> {
    [key.as_bytes(), b"\xff:queue"].concat()
}

/// A direct connection to a node, past any proxy.
///
/// # Panics
/// When the node cannot be reached (a test's own server).
pub async fn connect(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("a test server's URL")
        .get_multiplexed_async_connection()
        .await
        .expect("the test's own server answers")
}

/// Puts a line of one lapsed entry (a waiter that died long ago) on `key` on the Redlock node at
/// `url`, its two keys kept 30 s: a plain attempt there sees a line and gives the key back,
/// which prunes the entry and deletes the line.
///
/// # Panics
/// When the node cannot be reached (a test's own server).
pub async fn lapsed_line(url: &str, key: &str) {
    let mut connection = connect(url).await;
    for name in &line_names(Store::Redlock3, key) {
        let () = redis::pipe()
            .cmd("ZADD")
            .arg(name)
            .arg(1)
            .arg("00000000000000000000000000000009ghost")
            .ignore()
            .cmd("PEXPIRE")
            .arg(name)
            .arg(30_000)
            .ignore()
            .query_async(&mut connection)
            .await
            .expect("the test's own server answers");
    }
}

/// The members of `key`'s waiting line on a node, in order.
///
/// # Panics
/// When the node does not answer.
pub async fn line_members(
    connection: &mut redis::aio::MultiplexedConnection,
    key: &str,
) -> Vec<String> {
    redis::cmd("ZRANGE")
        .arg(line_key(key))
        .arg(0)
        .arg(-1)
        .query_async(connection)
        .await
        .expect("the test's own server answers")
}

/// Another process's release of `key` (holding `value`) on one node, as a fair Redlock
/// client's: compare-and-delete, and the turn passes to the head of the key's line (the key
/// reserved for it, and woken). The number of keys deleted.
///
/// # Panics
/// When the node does not answer.
pub async fn release_as_fair_client(
    connection: &mut redis::aio::MultiplexedConnection,
    key: &str,
    value: &str,
) -> i64 {
    redis::Script::new(&release_fair_source())
        .key(key)
        .key(line_key(key))
        .key([key.as_bytes(), b"\xff:queue-expiry"].concat())
        .arg(value)
        .arg("")
        .arg(lock_core::raw::redis::TURN_CHANNEL)
        .invoke_async(connection)
        .await
        .expect("the test's own server answers")
}

/// A fair client of `store` (`Redis` or inc on one server) at `url` — the store's own URL or a
/// proxy's — with `ttl`, retrying every `delay` (no jitter) and giving up after `deadline`:
/// Redlock with a 2 s node timeout, inc with a 5 s command timeout, so that a slow link or a
/// stalled server is waited for rather than counted as a failure.
///
/// # Panics
/// When the backend cannot be made or inc cannot connect.
pub async fn client_at(
    store: Store,
    url: String,
    ttl: Duration,
    delay: Duration,
    deadline: Duration,
) -> Locker {
    let options = LockOptions::default().with_ttl(ttl).with_retry(
        RetryPolicy::forever()
            .with_retry_delay(delay)
            .with_retry_jitter(Duration::ZERO)
            .with_deadline(deadline),
    );
    let locker = match store {
        Store::Redis => Locker::new(
            Redlock::new(
                RedlockConfig::new(vec![url])
                    .with_fair(true)
                    .with_node_timeout(Duration::from_secs(2)),
            )
            .expect("a valid config"),
        ),
        _ => Locker::new(
            IncLock::connect(IncConfig {
                command_timeout: 5_000,
                ..IncConfig::new(url).with_fair(true)
            })
            .await
            .expect("inc connects"),
        ),
    };
    locker.with_options(options).expect("valid options")
}

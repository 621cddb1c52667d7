//! Three fresh `redis-server`s as Redlock's nodes, the third reached through a
//! [`LatencyProxy`] (to stall, delay or cut what goes to it), and probes of what a key left on
//! the servers, each sent past the proxy on a connection of its own.

use std::time::Duration;

use crate::backed::start_servers;
use crate::proxy::LatencyProxy;
use crate::server::RedisServer;

/// How long a probe waits for a server (to connect, and for each answer).
pub const PROBE: Duration = Duration::from_millis(500);

/// Three fresh servers, the third behind a proxy; all stop when this is dropped.
#[derive(Debug)]
pub struct Nodes {
    /// The proxy in front of the third server (`servers[2]`); stops before the servers do.
    pub proxy: LatencyProxy,
    /// The servers, in the nodes' order (reached directly, past the proxy).
    pub servers: Vec<RedisServer>,
}

impl Nodes {
    /// Starts three servers and a proxy in front of the third.
    ///
    /// # Panics
    /// When `redis-server` is missing or does not start, or the proxy cannot bind a port.
    pub async fn start() -> Self {
        let servers = start_servers(3);
        let proxy = LatencyProxy::start(servers[2].port()).await.expect("proxy");
        Self { proxy, servers }
    }

    /// The nodes' URLs for a client: the first two servers' own, the third's proxy's.
    pub fn urls(&self) -> [String; 3] {
        [
            self.servers[0].url(),
            self.servers[1].url(),
            self.proxy.url(),
        ]
    }

    /// `GET key` on node `node`'s server (see [`get`]).
    ///
    /// # Panics
    /// When `node` is not 0, 1 or 2, or as [`get`].
    pub fn get(&self, node: usize, key: &[u8]) -> Option<Vec<u8>> {
        get(&self.servers[node].url(), key)
    }

    /// Whether `key` (no spaces) exists, on each node's server in order (`EXISTS`).
    ///
    /// # Panics
    /// When a server does not answer within [`PROBE`].
    pub fn exists(&self, key: &str) -> Vec<bool> {
        self.servers
            .iter()
            .map(|server| {
                server
                    .command(&format!("EXISTS {key}"), PROBE)
                    .expect("EXISTS")
                    == ":1"
            })
            .collect()
    }

    /// Every key on each node's server, in order (see [`leftovers`]).
    ///
    /// # Panics
    /// As [`leftovers`].
    pub fn leftovers(&self) -> Vec<Vec<(String, i64)>> {
        self.servers.iter().map(leftovers).collect()
    }
}

/// `GET key` on the server at `url`: its value, or `None` when the key is absent.
///
/// # Panics
/// When the server cannot be reached within [`PROBE`] or the command fails.
pub fn get(url: &str, key: &[u8]) -> Option<Vec<u8>> {
    let mut connection = redis::Client::open(url)
        .expect("client")
        .get_connection_with_timeout(PROBE)
        .expect("connection");
    redis::cmd("GET")
        .arg(key)
        .query(&mut connection)
        .expect("GET")
}

/// Every key on `server` with its PTTL (-1: no expiry), names shown lossily.
///
/// # Panics
/// When the server cannot be reached within [`PROBE`] or a command fails.
pub fn leftovers(server: &RedisServer) -> Vec<(String, i64)> {
    let mut connection = redis::Client::open(server.url())
        .expect("client")
        .get_connection_with_timeout(PROBE)
        .expect("connection");
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg("*")
        .query(&mut connection)
        .expect("KEYS");
    keys.into_iter()
        .map(|key| {
            let pttl: i64 = redis::cmd("PTTL")
                .arg(&key)
                .query(&mut connection)
                .expect("PTTL");
            (String::from_utf8_lossy(&key).into_owned(), pttl)
        })
        .collect()
}

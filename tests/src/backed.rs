//! A backend together with the `redis-server` processes it talks to, so that a test's servers
//! live exactly as long as its lock (and are killed when it is dropped).

use std::fmt;
use std::time::Duration;

use lock_core::{
    Capabilities, Key, KeyState, Result,
    raw::{Handle, Lock, LockRequest, async_trait},
};

use crate::server::{RedisServer, redis_server_binary};

/// A lock backend plus the servers it uses.
pub struct ServerBacked<L> {
    lock: L,
    servers: Vec<RedisServer>,
}

impl<L> ServerBacked<L> {
    /// Starts `count` fresh servers and builds the backend from their URLs.
    ///
    /// # Panics
    /// When `redis-server` is missing or does not start (run `cargo xtask it`, which installs
    /// it), or when `build` fails.
    pub fn start(count: usize, build: impl FnOnce(Vec<String>) -> Result<L>) -> Self {
        let servers = start_servers(count);
        let lock = build(servers.iter().map(RedisServer::url).collect()).expect("backend builds");
        Self { lock, servers }
    }

    /// Pairs a backend with the servers it talks to (for backends built asynchronously).
    pub fn new(lock: L, servers: Vec<RedisServer>) -> Self {
        Self { lock, servers }
    }

    /// The servers, to pause, kill or inspect them.
    pub fn servers(&mut self) -> &mut [RedisServer] {
        &mut self.servers
    }

    /// The backend.
    pub fn lock(&self) -> &L {
        &self.lock
    }
}

impl<L: fmt::Debug> fmt::Debug for ServerBacked<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerBacked")
            .field("lock", &self.lock)
            .field("servers", &self.servers)
            .finish()
    }
}

/// Starts `count` fresh servers.
///
/// # Panics
/// When `redis-server` is missing or does not start (run `cargo xtask it`, which installs it).
pub fn start_servers(count: usize) -> Vec<RedisServer> {
    let binary = redis_server_binary().expect(
        "redis-server not found: run `cargo xtask it`, which installs it, or set REDIS_SERVER",
    );
    (0..count)
        .map(|_| RedisServer::start(&binary, &[]).expect("redis-server starts"))
        .collect()
}

#[async_trait]
impl<L: Lock> Lock for ServerBacked<L> {
    fn name(&self) -> &'static str {
        self.lock.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.lock.capabilities()
    }

    fn try_acquire<'a>(
        &'a self,
        request: &'a LockRequest,
    ) -> lock_core::raw::Answer<'a, Result<Option<Box<dyn Handle>>>> {
        lock_core::raw::Answer::later(async move { self.lock.try_acquire(request).await })
    }

    fn abandon<'a>(&'a self, request: &'a LockRequest) -> lock_core::raw::Answer<'a, Result<bool>> {
        lock_core::raw::Answer::later(async move { self.lock.abandon(request).await })
    }

    async fn wait_for_release(&self, keys: &[Key], max_wait: Duration) -> Result<()> {
        self.lock.wait_for_release(keys, max_wait).await
    }

    async fn purge(&self, prefix: &str) -> Result<u64> {
        self.lock.purge(prefix).await
    }

    async fn inspect(&self, key: &Key) -> Result<Vec<KeyState>> {
        self.lock.inspect(key).await
    }

    async fn shutdown(&self) -> Result<()> {
        self.lock.shutdown().await
    }
}

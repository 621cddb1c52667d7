//! One Redis node: its connection and the three lock operations on it.

use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use deadpool_redis::{Pool, Runtime};
use lock_core::{Key, LockError, Result, Token, validate};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncConnectionConfig, Client, RedisResult, Script, Value};

use crate::config::{ConnectionKind, NodeUrl, RedlockConfig};

static ACQUIRE_MANY: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/acquire_many.lua")));
static ACQUIRE_FENCED: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/acquire_fenced.lua")));
static RAISE_FENCE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/raise_fence.lua")));
static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/release.lua")));
static RELEASE_NOTIFY: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/release_notify.lua")));
static EXTEND: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/extend.lua")));

/// A node of the quorum; cheap to clone (one shared allocation), since every round hands a
/// clone to each of its requests.
#[derive(Clone)]
pub(crate) struct Node(Arc<NodeParts>);

/// What a [`Node`] shares between its clones.
pub(crate) struct NodeParts {
    label: String,
    connection: Connection,
    /// For the pub/sub connection of wake-ups, opened on first use.
    client: Client,
    /// The channel prefix releases are announced on, when wake-ups are on.
    release_channel: Option<&'static str>,
}

/// Releases are announced on this prefix followed by the key.
pub(crate) const RELEASE_CHANNEL: &str = "lock-released:";

#[derive(Clone)]
enum Connection {
    Manager(ConnectionManager),
    Pool(Pool),
}

impl Node {
    /// Prepares the node's connection without connecting: a node that is down at start-up
    /// counts as a failed vote until it comes back.
    pub(crate) fn new(url: &NodeUrl, config: &RedlockConfig) -> Result<Self> {
        NodeParts::new(url, config).map(|parts| Self(Arc::new(parts)))
    }
}

impl Deref for Node {
    type Target = NodeParts;

    fn deref(&self) -> &NodeParts {
        &self.0
    }
}

impl NodeParts {
    fn new(url: &NodeUrl, config: &RedlockConfig) -> Result<Self> {
        let invalid =
            |error: &dyn fmt::Display| LockError::invalid("url", format!("{}: {error}", url.label));
        let connect_timeout = Duration::from_millis(config.connect_timeout);
        // Every call on these connections is bounded by our own timer (one per round, see
        // `round::run`, or around the call): redis-rs's own timer on each request would only
        // add a second one.
        let response_timeout = None;
        let client = client(url, config)?;
        let connection = match config.connection {
            ConnectionKind::Manager => {
                let client = client.clone();
                let manager_config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(response_timeout)
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(10))
                    .set_max_delay(Duration::from_millis(200));
                Connection::Manager(
                    ConnectionManager::new_lazy_with_config(client, manager_config)
                        .map_err(|e| invalid(&e))?,
                )
            }
            ConnectionKind::Pool => {
                let connection_config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(response_timeout);
                let manager =
                    deadpool_redis::Manager::new_with_config(url.url.as_str(), connection_config)
                        .map_err(|e| invalid(&e))?;
                let pool = Pool::builder(manager)
                    .max_size(config.pool_size)
                    .runtime(Runtime::Tokio1)
                    .wait_timeout(Some(connect_timeout))
                    .create_timeout(Some(connect_timeout))
                    .recycle_timeout(Some(connect_timeout))
                    .build()
                    .map_err(|e| invalid(&e))?;
                Connection::Pool(pool)
            }
        };
        Ok(Self {
            label: url.label.clone(),
            connection,
            client,
            release_channel: config.wake_on_release.then_some(RELEASE_CHANNEL),
        })
    }

    /// The client, to open a pub/sub connection.
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// `host:port`, for messages.
    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    /// `SET key token NX PX ttl` (one key, interoperable with every Redlock client), or the
    /// all-or-nothing script for several keys; with fencing counters (one per key), the script
    /// that also draws a fencing value from them. `Some(value)` (0 without fencing) when the
    /// node granted every key.
    ///
    /// With a pool, a request abandoned before its answer (the round's deadline passed, or the
    /// attempt was cancelled) is followed by a compare-and-delete on the same connection, so
    /// that it reaches the node after the request it undoes: a clean-up sent on another
    /// connection of the pool could overtake a late `SET` and leave it behind.
    pub(crate) async fn acquire(
        &self,
        keys: &[Key],
        token: &Token,
        ttl: Duration,
        fences: Option<&[Vec<u8>]>,
    ) -> RedisResult<Option<u64>> {
        let ttl_ms = validate::ttl_millis(ttl);
        let mut invocation;
        let request = if let Some(fences) = fences {
            invocation = ACQUIRE_FENCED.prepare_invoke();
            for key in keys {
                invocation.key(key.as_str());
            }
            for fence in fences {
                invocation.key(fence.as_slice());
            }
            invocation.arg(&*token.expose()).arg(ttl_ms);
            Request::Script(&invocation, Reply::Counter)
        } else if let [key] = keys {
            let mut command = redis::cmd("SET");
            command
                .arg(key.as_str())
                .arg(&*token.expose())
                .arg("NX")
                .arg("PX")
                .arg(ttl_ms);
            return match &self.connection {
                Connection::Manager(manager) => {
                    let reply: Value = command.query_async(&mut manager.clone()).await?;
                    Ok(matches!(reply, Value::Okay).then_some(0))
                }
                Connection::Pool(pool) => {
                    Box::pin(self.acquire_pooled(pool, Request::Set(&command), keys, token)).await
                }
            };
        } else {
            invocation = ACQUIRE_MANY.prepare_invoke();
            for key in keys {
                invocation.key(key.as_str());
            }
            invocation.arg(&*token.expose()).arg(ttl_ms);
            Request::Script(&invocation, Reply::Granted)
        };
        match &self.connection {
            Connection::Manager(manager) => request.send(&mut manager.clone()).await,
            Connection::Pool(pool) => {
                Box::pin(self.acquire_pooled(pool, request, keys, token)).await
            }
        }
    }

    /// An acquisition on a pooled connection, undone on that same connection if abandoned.
    async fn acquire_pooled(
        &self,
        pool: &Pool,
        request: Request<'_>,
        keys: &[Key],
        token: &Token,
    ) -> RedisResult<Option<u64>> {
        let mut connection = checkout(pool).await?;
        let mut undo = UndoOnDrop {
            connection: Some((*connection).clone()),
            keys: keys.to_vec(),
            token: token.clone(),
            notify: self.release_channel,
        };
        let answer = request.send(&mut *connection).await;
        // Answered (whatever the answer): the request is no longer in flight.
        undo.connection = None;
        answer
    }

    /// Raises the fencing counters `fences` (one per key of `keys`) to at least `value`, kept
    /// until the node's clock passes it plus `ttl`; true when every key still holds `token`
    /// here.
    pub(crate) async fn raise_fence(
        &self,
        keys: &[Key],
        fences: &[Vec<u8>],
        token: &Token,
        value: u64,
        ttl: Duration,
    ) -> RedisResult<bool> {
        let mut invocation = RAISE_FENCE.prepare_invoke();
        for key in keys {
            invocation.key(key.as_str());
        }
        for fence in fences {
            invocation.key(fence.as_slice());
        }
        invocation
            .arg(&*token.expose())
            .arg(value)
            .arg(validate::ttl_millis(ttl));
        let held: i64 = self.invoke(&invocation).await?;
        Ok(held == 1)
    }

    /// Compare-and-delete as one write of `SCRIPT LOAD` + `EVALSHA`: for clean-ups that may be
    /// the last thing a process sends (a cancelled acquisition before exit), so that a node
    /// that restarted or was stalled runs it from what it received, without a NOSCRIPT round
    /// trip that nobody would be left to answer.
    pub(crate) async fn release_self_contained(
        &self,
        keys: &[Key],
        token: &Token,
    ) -> RedisResult<usize> {
        let (script, source) = if self.release_channel.is_some() {
            (&RELEASE_NOTIFY, include_str!("lua/release_notify.lua"))
        } else {
            (&RELEASE, include_str!("lua/release.lua"))
        };
        let mut pipeline = redis::pipe();
        pipeline.cmd("SCRIPT").arg("LOAD").arg(source).ignore();
        let release = pipeline
            .cmd("EVALSHA")
            .arg(script.get_hash())
            .arg(keys.len());
        for key in keys {
            release.arg(key.as_str());
        }
        release.arg(&*token.expose());
        if let Some(channel) = self.release_channel {
            release.arg(channel);
        }
        let (deleted,): (i64,) = match &self.connection {
            Connection::Manager(manager) => pipeline.query_async(&mut manager.clone()).await?,
            Connection::Pool(pool) => {
                Box::pin(async { pipeline.query_async(&mut checkout(pool).await?).await }).await?
            }
        };
        Ok(usize::try_from(deleted).unwrap_or_default())
    }

    /// Compare-and-delete on every key; returns how many keys were ours and are now gone.
    pub(crate) async fn release(&self, keys: &[Key], token: &Token) -> RedisResult<usize> {
        let script = if self.release_channel.is_some() {
            &RELEASE_NOTIFY
        } else {
            &RELEASE
        };
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key.as_str());
        }
        invocation.arg(&*token.expose());
        if let Some(channel) = self.release_channel {
            invocation.arg(channel);
        }
        let deleted: i64 = self.invoke(&invocation).await?;
        Ok(usize::try_from(deleted).unwrap_or_default())
    }

    /// Compare-and-pexpire on every key, all or nothing. True when extended.
    pub(crate) async fn extend(
        &self,
        keys: &[Key],
        token: &Token,
        ttl: Duration,
    ) -> RedisResult<bool> {
        let mut invocation = EXTEND.prepare_invoke();
        for key in keys {
            invocation.key(key.as_str());
        }
        invocation
            .arg(&*token.expose())
            .arg(validate::ttl_millis(ttl));
        let extended: i64 = self.invoke(&invocation).await?;
        Ok(extended == 1)
    }

    /// The Redis type of each key here: `string` for a lock, `none` when absent.
    pub(crate) async fn types(&self, keys: &[Key]) -> RedisResult<Vec<String>> {
        let mut pipeline = redis::pipe();
        for key in keys {
            pipeline.cmd("TYPE").arg(key.as_str());
        }
        match &self.connection {
            Connection::Manager(manager) => pipeline.query_async(&mut manager.clone()).await,
            Connection::Pool(pool) => {
                Box::pin(async { pipeline.query_async(&mut checkout(pool).await?).await }).await
            }
        }
    }

    /// `INFO server`: which server runs here, and its version.
    pub(crate) async fn info_server(&self) -> RedisResult<String> {
        let mut command = redis::cmd("INFO");
        command.arg("server");
        self.query(&command).await
    }

    /// `PTTL key`: -2 when absent, -1 when it has no expiry, else the ms left.
    pub(crate) async fn pttl(&self, key: &Key) -> RedisResult<i64> {
        let mut command = redis::cmd("PTTL");
        command.arg(key.as_str());
        self.query(&command).await
    }

    // The pool's branches are boxed: a pool checkout is a future of several kilobytes, which
    // would otherwise sit inline in every request's future and be copied whenever one is
    // boxed, pool or not.
    async fn query<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> RedisResult<T> {
        match &self.connection {
            Connection::Manager(manager) => command.query_async(&mut manager.clone()).await,
            Connection::Pool(pool) => {
                Box::pin(async { command.query_async(&mut checkout(pool).await?).await }).await
            }
        }
    }

    /// Runs a script by EVALSHA, loading it on NOSCRIPT (after a restart or SCRIPT FLUSH).
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> RedisResult<T> {
        match &self.connection {
            Connection::Manager(manager) => invoke_on(invocation, &mut manager.clone()).await,
            Connection::Pool(pool) => {
                Box::pin(async { invoke_on(invocation, &mut checkout(pool).await?).await }).await
            }
        }
    }
}

/// One acquisition request and how to read its answer.
enum Request<'a> {
    Set(&'a redis::Cmd),
    Script(&'a redis::ScriptInvocation<'a>, Reply),
}

/// What an acquisition script answers.
#[derive(Clone, Copy)]
enum Reply {
    /// 1 when granted.
    Granted,
    /// The fencing value drawn (>= 1) when granted, 0 otherwise.
    Counter,
}

impl Request<'_> {
    async fn send<C: ConnectionLike + Send>(&self, connection: &mut C) -> RedisResult<Option<u64>> {
        match self {
            Self::Set(command) => {
                let reply: Value = command.query_async(connection).await?;
                Ok(matches!(reply, Value::Okay).then_some(0))
            }
            Self::Script(invocation, Reply::Granted) => {
                let granted: i64 = invocation.invoke_async(connection).await?;
                Ok((granted == 1).then_some(0))
            }
            Self::Script(invocation, Reply::Counter) => {
                let counter: i64 = invocation.invoke_async(connection).await?;
                Ok(u64::try_from(counter).ok().filter(|counter| *counter > 0))
            }
        }
    }
}

/// Sends compare-and-delete for `keys` on `connection` when dropped while still armed: the
/// acquisition it follows was abandoned before its answer came.
struct UndoOnDrop {
    connection: Option<redis::aio::MultiplexedConnection>,
    keys: Vec<Key>,
    token: Token,
    notify: Option<&'static str>,
}

impl Drop for UndoOnDrop {
    fn drop(&mut self) {
        let Some(mut connection) = self.connection.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (keys, token, notify) = (
            std::mem::take(&mut self.keys),
            self.token.clone(),
            self.notify,
        );
        runtime.spawn(async move {
            let script = if notify.is_some() {
                &RELEASE_NOTIFY
            } else {
                &RELEASE
            };
            let mut invocation = script.prepare_invoke();
            for key in &keys {
                invocation.key(key.as_str());
            }
            invocation.arg(&*token.expose());
            if let Some(channel) = notify {
                invocation.arg(channel);
            }
            // Queued behind the abandoned request on the same connection; bounded in case
            // the node never answers again.
            let undo = invocation.invoke_async::<i64>(&mut connection);
            if tokio::time::timeout(validate::MAX_TTL, undo).await.is_err() {
                tracing::debug!("clean-up of an abandoned acquisition never answered");
            }
        });
    }
}

/// A client for `url`; with the `tls` feature, trusting `tls_ca_file` when one is set.
fn client(url: &NodeUrl, config: &RedlockConfig) -> Result<Client> {
    let invalid =
        |error: &dyn fmt::Display| LockError::invalid("url", format!("{}: {error}", url.label));
    #[cfg(feature = "tls")]
    {
        // rustls needs a process-wide crypto provider; another crate may have installed one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        if let Some(path) = &config.tls_ca_file {
            let root_cert = std::fs::read(path).map_err(|e| {
                LockError::invalid(
                    "tls_ca_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let certificates = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            };
            return Client::build_with_tls(url.url.as_str(), certificates).map_err(|e| invalid(&e));
        }
    }
    #[cfg(not(feature = "tls"))]
    if config.tls_ca_file.is_some() {
        return Err(LockError::invalid(
            "tls_ca_file",
            "needs the `tls` cargo feature of lock-redlock",
        ));
    }
    Client::open(url.url.as_str()).map_err(|e| invalid(&e))
}

async fn invoke_on<T, C>(
    invocation: &redis::ScriptInvocation<'_>,
    connection: &mut C,
) -> RedisResult<T>
where
    T: redis::FromRedisValue,
    C: ConnectionLike + Send,
{
    invocation.invoke_async(connection).await
}

async fn checkout(pool: &Pool) -> RedisResult<deadpool_redis::Connection> {
    pool.get().await.map_err(|error| {
        redis::RedisError::from((redis::ErrorKind::Io, "connection pool", error.to_string()))
    })
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

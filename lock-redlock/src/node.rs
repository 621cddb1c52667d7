//! One Redis node: its connection and the three lock operations on it.

use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, PoisonError};
use std::time::Duration;

use deadpool_redis::Runtime;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use lock_core::raw::redis::{LINE_SCRIPT, TURN_CHANNEL};
use lock_core::{Key, LockError, Result, Token, raw::validate};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{
    AsyncConnectionConfig, Client, Cmd, RedisError, RedisFuture, RedisResult, Script, Value,
};

use crate::config::{ConnectionKind, NodeUrl, RedlockConfig};
use crate::pool::{Pool, PoolManager, Pooled};

static ACQUIRE_MANY: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/acquire_many.lua")));
static ACQUIRE_FENCED: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/acquire_fenced.lua")));
const RAISE_FENCE_SOURCE: &str = include_str!("lua/raise_fence.lua");
static RAISE_FENCE: LazyLock<Script> = LazyLock::new(|| Script::new(RAISE_FENCE_SOURCE));
static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/release.lua")));
static RELEASE_NOTIFY: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/release_notify.lua")));
static EXTEND: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/extend.lua")));

/// A script of semaphores and read-write locks: its own file after the helpers they share —
/// and for the acquisition and the release, their path for a lease alone on its key first,
/// before the helpers, whose definitions would cost that path most of its time.
macro_rules! lease_script {
    ($file:literal) => {
        concat!(
            include_str!("lua/lease_alone.lua"),
            include_str!("lua/lease_common.lua"),
            include_str!(concat!("lua/", $file))
        )
    };
    ($alone:literal, $file:literal) => {
        concat!(
            include_str!(concat!("lua/", $alone)),
            include_str!("lua/lease_alone.lua"),
            include_str!("lua/lease_common.lua"),
            include_str!(concat!("lua/", $file))
        )
    };
}

const LEASE_RELEASE_SOURCE: &str = lease_script!("lease_release_alone.lua", "lease_release.lua");
const SLOT_RELEASE_SOURCE: &str = lease_script!("slot_release.lua");
static LEASE_RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(LEASE_RELEASE_SOURCE));
static SLOT_RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(SLOT_RELEASE_SOURCE));
/// The scripts that take, extend, downgrade and fence leases (see `lease.rs`).
pub(crate) static LEASE_ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(lease_script!(
        "lease_acquire_alone.lua",
        "lease_acquire.lua"
    ))
});
static LEASE_EXTEND: LazyLock<Script> =
    LazyLock::new(|| Script::new(lease_script!("lease_extend.lua")));
static LEASE_DOWNGRADE: LazyLock<Script> =
    LazyLock::new(|| Script::new(lease_script!("lease_downgrade.lua")));
const LEASE_RAISE_SOURCE: &str = lease_script!("lease_raise.lua");
pub(crate) static LEASE_RAISE: LazyLock<Script> = LazyLock::new(|| Script::new(LEASE_RAISE_SOURCE));
pub(crate) static SLOT_ACQUIRE: LazyLock<Script> =
    LazyLock::new(|| Script::new(lease_script!("slot_acquire.lua")));
static SLOT_EXTEND: LazyLock<Script> =
    LazyLock::new(|| Script::new(lease_script!("slot_extend.lua")));
static DESCRIBE: LazyLock<Script> =
    LazyLock::new(|| Script::new(lease_script!("lease_describe.lua")));

/// A fair lock's scripts: the waiting line's helpers (`lock_core::raw::redis::LINE_SCRIPT`)
/// and the hand-over by reservation (`lua/line_pass.lua`) before each.
static ACQUIRE_FAIR_SOURCE: LazyLock<String> = LazyLock::new(|| {
    [
        include_str!("lua/lease_common.lua"),
        LINE_SCRIPT,
        include_str!("lua/line_pass.lua"),
        include_str!("lua/acquire_fair.lua"),
    ]
    .concat()
});
static RELEASE_FAIR_SOURCE: LazyLock<String> = LazyLock::new(|| {
    [
        include_str!("lua/release_fair.lua"),
        LINE_SCRIPT,
        include_str!("lua/line_pass.lua"),
        include_str!("lua/release_fair_pass.lua"),
    ]
    .concat()
});
static ACQUIRE_FAIR: LazyLock<Script> = LazyLock::new(|| Script::new(&ACQUIRE_FAIR_SOURCE));
/// A fair attempt over several nodes that took a key here but not a quorum gives it back as
/// its waiter's reservation (`lua/line_keep.lua`).
static LINE_KEEP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        &[
            LINE_SCRIPT,
            include_str!("lua/line_pass.lua"),
            include_str!("lua/line_keep.lua"),
        ]
        .concat(),
    )
});
static RELEASE_FAIR: LazyLock<Script> = LazyLock::new(|| Script::new(&RELEASE_FAIR_SOURCE));

/// A fair waiter's plain first attempt that took a key past a line gives it back, and takes it
/// again when nobody live is in line (`lua/give_back.lua`).
static GIVE_BACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        &[
            LINE_SCRIPT,
            include_str!("lua/line_pass.lua"),
            include_str!("lua/give_back.lua"),
        ]
        .concat(),
    )
});

/// The answer to a fair attempt on one node (see [`NodeParts::acquire_fair_anchored`]).
pub(crate) struct FairAnswer {
    /// The fencing value (1 without fencing) when taken, else the line's answer: 0, or
    /// -(1 + ms) for the head of the line behind a holder with ms left.
    pub(crate) value: i64,
    /// The expiry of the refused waiter's entry in line (the node's clock, in ms).
    pub(crate) expiry: Option<u64>,
    /// Refused with the key holding a lock's value or nothing, as the waiter read it.
    pub(crate) plain: bool,
    /// The refused waiter's place behind the holder (1: second), when the line said.
    pub(crate) place: Option<u64>,
}

/// A multi-key lock's release on a fair node: the keys it frees pass their turns to the heads
/// of their lines in the same call (the line's helpers defined only when a freed key has one).
static RELEASE_MANY_FAIR_SOURCE: LazyLock<String> = LazyLock::new(|| {
    [
        include_str!("lua/release_many_fair.lua"),
        LINE_SCRIPT,
        include_str!("lua/line_pass.lua"),
        include_str!("lua/release_many_fair_pass.lua"),
    ]
    .concat()
});
static RELEASE_MANY_FAIR: LazyLock<Script> =
    LazyLock::new(|| Script::new(&RELEASE_MANY_FAIR_SOURCE));

/// Appended to a fair lock's key to name its waiting line (waiters by arrival) and the expiries
/// of the line's entries (0xFF: no user key can have these names, see `FENCE_SUFFIX`).
pub(crate) const QUEUE_SUFFIX: &[u8] = b"\xff:queue";
/// See [`QUEUE_SUFFIX`].
pub(crate) const QUEUE_EXPIRY_SUFFIX: &[u8] = b"\xff:queue-expiry";

/// Appended to a read-write lock's key to name the claim of the writer waiting for it (0xFF: no
/// user key can have this name, see `FENCE_SUFFIX`).
pub(crate) const CLAIM_SUFFIX: &[u8] = b"\xff:claim";

/// What a token holds on a node, which says how to release it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Held {
    /// A mutex on every key: a string holding the token.
    Mutex,
    /// A lease in a set of holders, under one of `tags` (`p` permit, `r` reader, `w` writer);
    /// with `claim`, also a waiting writer's claim.
    Set { tags: &'static str, claim: bool },
    /// A permit slot in a hash of slots; `None`: every slot the token holds there.
    Slot(Option<u32>),
}

impl Held {
    /// Whether undoing this takes back a waiting writer's claim.
    pub(crate) fn claims(self) -> bool {
        matches!(self, Self::Set { claim: true, .. })
    }
}

/// A script call, owned, so that it can outlive the request that built it.
pub(crate) struct Call {
    script: &'static LazyLock<Script>,
    source: &'static str,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl Call {
    /// A lease script's call, run by `EVALSHA` with reload (its source is not kept).
    fn lease(script: &'static LazyLock<Script>, keys: &[Vec<u8>], args: &[Vec<u8>]) -> Self {
        Self {
            script,
            source: "",
            keys: keys.to_vec(),
            args: args.to_vec(),
        }
    }

    /// `SCRIPT LOAD` + `EVALSHA` of this call, as one write (see
    /// [`NodeParts::self_contained`]); each answer on its own, the script's last.
    fn self_contained(&self) -> redis::Pipeline {
        let mut pipeline = redis::pipe();
        // Each answer on its own: the load's may be refused (a user without `SCRIPT`, whose
        // scripts an administrator loaded) while the script runs, and a refused load must not
        // make a script that ran look unanswered (it would be sent again, round after round).
        pipeline.ignore_errors();
        pipeline.cmd("SCRIPT").arg("LOAD").arg(self.source);
        let script: &Script = self.script;
        let run = pipeline
            .cmd("EVALSHA")
            .arg(script.get_hash())
            .arg(self.keys.len());
        for key in &self.keys {
            run.arg(key.as_slice());
        }
        for arg in &self.args {
            run.arg(arg.as_slice());
        }
        pipeline
    }

    fn invocation(&self) -> redis::ScriptInvocation<'static> {
        let script: &'static Script = self.script;
        let mut invocation = script.prepare_invoke();
        for key in &self.keys {
            invocation.key(key.as_slice());
        }
        for arg in &self.args {
            invocation.arg(arg.as_slice());
        }
        invocation
    }
}

/// A node of the quorum; cheap to clone (one shared allocation), since every round hands a
/// clone to each of its requests.
#[derive(Clone)]
pub(crate) struct Node(Arc<NodeParts>);

/// What a [`Node`] shares between its clones.
pub(crate) struct NodeParts {
    label: String,
    connection: Connection,
    /// With a pool, the node's one connection for a holder's changes of its expiry (extend,
    /// downgrade), opened on first use: they keep their order there, as on the manager's one
    /// connection. On pooled connections a request of an extend that timed out may still be on
    /// its way and land after a later extend sent on another connection, cutting the key's
    /// expiry short under a holder that relies on the later one.
    ordered: Option<Managed>,
    /// For the pub/sub connection of wake-ups, opened on first use.
    client: Client,
    /// The channel prefix releases are announced on, when wake-ups are on.
    release_channel: Option<&'static str>,
    /// Mutexes on one key go through their waiting line (`fair`).
    fair: bool,
    /// Which keys were last found taken when a lease tried them alone (see
    /// [`NodeParts::take_alone`]): one bit per group of keys, by a hash of the key.
    busy: AtomicU64,
}

/// A lease alone on a free key, as [`NodeParts::take_alone`] sets it: the key, the value
/// `lease_acquire_alone.lua` would write (marker, zero byte, tag, token) and the ttl; for a
/// reader, the claim a waiting writer leaves, which keeps it out.
pub(crate) struct Alone {
    pub(crate) key: Vec<u8>,
    pub(crate) value: Vec<u8>,
    pub(crate) ttl_ms: u64,
    pub(crate) claim: Option<Vec<u8>>,
}

/// What [`NodeParts::take_alone`] found.
pub(crate) enum TakenAlone {
    /// The key was free and is now ours.
    Taken,
    /// The key was free, but a writer waits for it: refused (and given back).
    Claimed,
    /// The key is taken (or was lately): the acquisition script decides.
    Busy,
}

#[derive(Clone)]
enum Connection {
    Manager(Managed),
    Pool(Pool),
}

/// A node's one multiplexed connection (redis-rs [`MultiplexedConnection`]), opened at the
/// first request and opened anew by the request after it broke (an I/O error, the server
/// closed it) or after its opening failed, whatever the failure: a connection attempt the
/// server refused (`AUTH`, `HELLO`, `SELECT`: a password rotated, an ACL user switched off for a
/// moment) is tried again at the next request rather than kept as the node's answer for good.
/// Requests meanwhile wait for the one attempt under way. A request takes a clone of the
/// connection (two reference counts) and sends on it directly: no shared future to poll, no
/// second boxed future per request. A connection the server closed while idle is let go as
/// soon as redis-rs says so (RESP3), or by the request it refuses before writing anything,
/// which then goes on a connection opened anew (RESP2; see [`Managed::send`]). Cheap to clone
/// (one shared allocation).
#[derive(Clone)]
struct Managed(Arc<ManagedParts>);

struct ManagedParts {
    client: Client,
    config: AsyncConnectionConfig,
    slot: std::sync::RwLock<Slot>,
    /// Numbers the connections (and attempts), so that a failure is held against the
    /// connection it happened on, not one opened since.
    opened: AtomicU64,
}

/// The connection as the next request finds it.
enum Slot {
    /// None yet, or the last one broke or could not be opened.
    Empty,
    /// An attempt under way, which the requests that find it await together.
    Opening(
        u64,
        Shared<BoxFuture<'static, RedisResult<MultiplexedConnection>>>,
    ),
    /// Open.
    Open(u64, MultiplexedConnection),
}

impl Managed {
    fn new_lazy(client: Client, config: AsyncConnectionConfig) -> Self {
        Self(Arc::new(ManagedParts {
            client,
            config,
            slot: std::sync::RwLock::new(Slot::Empty),
            opened: AtomicU64::new(0),
        }))
    }

    /// The open connection (opened now if there is none) and its number.
    async fn connection(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        let (number, opening) = loop {
            match &*self.0.slot.read().unwrap_or_else(PoisonError::into_inner) {
                Slot::Open(number, connection) => return Ok((*number, connection.clone())),
                Slot::Opening(number, opening) => break (*number, opening.clone()),
                Slot::Empty => {}
            }
            self.open();
        };
        let opened = opening.await;
        let mut slot = self.0.slot.write().unwrap_or_else(PoisonError::into_inner);
        if matches!(&*slot, Slot::Opening(current, _) if *current == number) {
            *slot = match &opened {
                Ok(connection) => Slot::Open(number, connection.clone()),
                Err(_) => Slot::Empty,
            };
        }
        opened.map(|connection| (number, connection))
    }

    /// Starts an attempt to open the connection, unless one is open or under way.
    #[cold]
    fn open(&self) {
        let mut slot = self.0.slot.write().unwrap_or_else(PoisonError::into_inner);
        if matches!(&*slot, Slot::Empty) {
            let number = self.0.opened.fetch_add(1, Ordering::Relaxed);
            let client = self.0.client.clone();
            let mut config = self.0.config.clone();
            if client
                .get_connection_info()
                .redis_settings()
                .protocol()
                .supports_resp3()
            {
                // Over RESP3 redis-rs tells the connection's listener when the connection
                // closed (the server closed it, or it broke): let go of it at once, so that the
                // next request opens another instead of meeting the dead one (a connection
                // closed while idle: an idle `timeout`, `CLIENT KILL`, a restart), as redis-rs's
                // `ConnectionManager` did. Over RESP2 nobody is told.
                let parts = Arc::downgrade(&self.0);
                config = config.set_push_sender(move |push: redis::PushInfo| {
                    if push.kind == redis::PushKind::Disconnection
                        && let Some(parts) = parts.upgrade()
                    {
                        Managed(parts).closed(number);
                    }
                    Ok::<(), redis::aio::SendError>(())
                });
            }
            let opening = async move {
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
            };
            *slot = Slot::Opening(number, opening.boxed().shared());
        }
    }

    /// After `error` on the connection `number`: a broken connection is let go, so that the
    /// next request opens another.
    fn after(&self, number: u64, error: &RedisError) {
        if !broken(error) {
            return;
        }
        let mut slot = self.0.slot.write().unwrap_or_else(PoisonError::into_inner);
        if matches!(&*slot, Slot::Open(current, _) if *current == number) {
            *slot = Slot::Empty;
        }
    }

    /// The connection `number` closed (see [`Managed::open`]): let go of it, whether it is
    /// open or still the result of its attempt that nobody has taken yet (only an opened
    /// connection reports its close).
    fn closed(&self, number: u64) {
        let mut slot = self.0.slot.write().unwrap_or_else(PoisonError::into_inner);
        if matches!(&*slot, Slot::Open(current, _) | Slot::Opening(current, _) if *current == number)
        {
            *slot = Slot::Empty;
        }
    }

    /// Sends what `send` makes of the open connection. A connection that has ended (the
    /// server closed it while nobody used it: an idle `timeout`, `CLIENT KILL`, a restart,
    /// which over RESP2 nothing tells) refuses the request at its first poll, before anything
    /// is written: it then goes once more, on a connection opened anew, instead of failing.
    async fn send<T, Sending>(
        &self,
        send: impl Fn(MultiplexedConnection) -> Sending,
    ) -> RedisResult<T>
    where
        Sending: Future<Output = RedisResult<T>>,
    {
        let (mut number, connection) = self.connection().await?;
        let mut sending = std::pin::pin!(send(connection));
        let answer = match futures::poll!(sending.as_mut()) {
            std::task::Poll::Ready(Err(error)) if broken(&error) => {
                self.after(number, &error);
                let connection;
                (number, connection) = self.connection().await?;
                send(connection).await
            }
            std::task::Poll::Ready(answer) => answer,
            std::task::Poll::Pending => sending.await,
        };
        if let Err(error) = &answer {
            self.after(number, error);
        }
        answer
    }
}

/// Whether `error` says the connection itself broke (not a server's error answer).
fn broken(error: &RedisError) -> bool {
    error.is_unrecoverable_error() || error.is_io_error() || error.is_connection_dropped()
}

impl ConnectionLike for Managed {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(
            self.send(
                move |mut connection| async move { connection.send_packed_command(cmd).await },
            ),
        )
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(self.send(move |mut connection| async move {
            connection
                .send_packed_commands(pipeline, offset, count)
                .await
        }))
    }

    fn get_db(&self) -> i64 {
        self.0.client.get_connection_info().redis_settings().db()
    }
}

impl Node {
    /// Prepares the node's connection without connecting: a node that is down at start-up
    /// counts as a failed vote until it comes back.
    pub(crate) fn new(url: &NodeUrl, config: &RedlockConfig) -> Result<Self> {
        NodeParts::new(url, config).map(|parts| Self(Arc::new(parts)))
    }
}

impl Node {
    /// True when `other` is this very node (a clone of it), not only one with the same URL.
    pub(crate) fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
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
        let ordered_connection = || {
            let connection_config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                .set_response_timeout(response_timeout);
            Managed::new_lazy(client.clone(), connection_config)
        };
        let (connection, ordered) = match config.connection {
            ConnectionKind::Manager => (Connection::Manager(ordered_connection()), None),
            ConnectionKind::Pool => {
                let connection_config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(response_timeout);
                let manager =
                    deadpool_redis::Manager::new_with_config(url.url.as_str(), connection_config)
                        .map_err(|e| invalid(&e))?;
                let pool = Pool::builder(PoolManager::new(manager))
                    .max_size(config.pool_size)
                    .runtime(Runtime::Tokio1)
                    .wait_timeout(Some(connect_timeout))
                    .create_timeout(Some(connect_timeout))
                    .recycle_timeout(Some(connect_timeout))
                    .build()
                    .map_err(|e| invalid(&e))?;
                (Connection::Pool(pool), Some(ordered_connection()))
            }
        };
        Ok(Self {
            label: url.label.clone(),
            connection,
            ordered,
            client,
            release_channel: config
                .wakes_on_release()
                .then_some(lock_core::raw::redis::RELEASE_CHANNEL),
            fair: config.is_fair(),
            busy: AtomicU64::new(0),
        })
    }

    /// The bit of [`NodeParts::busy`] that stands for `key`.
    fn busy_bit(key: &[u8]) -> u64 {
        let hash = key.iter().fold(0x811c_9dc5_u32, |hash, byte| {
            (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193)
        });
        1 << (hash % 64)
    }

    /// Notes what the acquisition script found: `alone` when it took a free key for a lease
    /// alone (its answer 2), so that the next lease on that key tries [`NodeParts::take_alone`]
    /// first again.
    pub(crate) fn note_script_answer(&self, key: &[u8], alone: bool) {
        let bit = Self::busy_bit(key);
        if alone {
            self.busy.fetch_and(!bit, Ordering::Relaxed);
        } else {
            self.busy.fetch_or(bit, Ordering::Relaxed);
        }
    }

    /// Takes a lease alone on a free key without a script (a script costs the server several
    /// times a `SET`): `SET key value NX PX ttl`, for a reader followed in the same write by
    /// the check for a writer's claim, the same outcome as the acquisition script's first path
    /// (`lua/lease_acquire_alone.lua`). A key found taken is remembered, and its next leases
    /// go to the script at once (which answers 2 once it finds the key free again), so that a
    /// semaphore with holders does not pay a round trip more per permit.
    ///
    /// A reader that took the key while a writer's claim stood gives it back at once (the
    /// script would have refused it; the claim appears only while the key is held, so this is
    /// rare), and its next leases on the key go to the script, as for a key found taken.
    pub(crate) async fn take_alone(
        &self,
        alone: &Alone,
        undo: impl Fn() -> Call,
    ) -> RedisResult<TakenAlone> {
        if self.busy.load(Ordering::Relaxed) & Self::busy_bit(&alone.key) != 0 {
            return Ok(TakenAlone::Busy);
        }
        let mut set = redis::cmd("SET");
        set.arg(alone.key.as_slice())
            .arg(alone.value.as_slice())
            .arg("NX")
            .arg("PX")
            .arg(alone.ttl_ms);
        let (taken, claimed) = match &alone.claim {
            None => {
                let reply = match &self.connection {
                    Connection::Manager(manager) => set.query_async(&mut manager.clone()).await?,
                    Connection::Pool(pool) => {
                        Box::pin(self.acquire_pooled(pool, Request::Set(&set), undo())).await?
                    }
                };
                (matches!(reply, Value::Okay), false)
            }
            Some(claim) => {
                // One write, not a transaction: `SET ... NX` alone keeps writers out; the claim
                // only says whether a writer waited for the key before this reader took it
                // (a claim left after the `SET` is one more reason to give the key back).
                let mut pipeline = redis::pipe();
                pipeline
                    .add_command(set)
                    .cmd("EXISTS")
                    .arg(claim.as_slice());
                let request = Request::Pipeline(&pipeline);
                let reply = match &self.connection {
                    Connection::Manager(manager) => request.send(&mut manager.clone()).await?,
                    Connection::Pool(pool) => {
                        Box::pin(self.acquire_pooled(pool, request, undo())).await?
                    }
                };
                let (set, claimed): (Value, i64) = redis::FromRedisValue::from_redis_value(reply)?;
                (matches!(set, Value::Okay), claimed == 1)
            }
        };
        if !taken {
            self.busy
                .fetch_or(Self::busy_bit(&alone.key), Ordering::Relaxed);
            return Ok(TakenAlone::Busy);
        }
        if claimed {
            // Its next attempts go to the script, which refuses them without writing the key:
            // taking it again on every attempt would keep the waiting writer out whenever its
            // try came while this reader held the key (the script clears the hint once it
            // finds the key free and unclaimed).
            self.busy
                .fetch_or(Self::busy_bit(&alone.key), Ordering::Relaxed);
            let _: i64 = self.invoke(&undo().invocation()).await?;
            return Ok(TakenAlone::Claimed);
        }
        Ok(TakenAlone::Taken)
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
        let (request, reply) = if let Some(fences) = fences {
            invocation = ACQUIRE_FENCED.prepare_invoke();
            for key in keys {
                invocation.key(key.as_bytes());
            }
            for fence in fences {
                invocation.key(fence.as_slice());
            }
            invocation.arg(token.expose().as_bytes()).arg(ttl_ms);
            (Request::Script(&invocation), Reply::Counter)
        } else if let [key] = keys
            && self.fair
        {
            return self.acquire_fair_plain(key, token, ttl_ms).await;
        } else if let [key] = keys {
            let mut command = redis::cmd("SET");
            command
                .arg(key.as_bytes())
                .arg(token.expose().as_bytes())
                .arg("NX")
                .arg("PX")
                .arg(ttl_ms);
            return match &self.connection {
                Connection::Manager(manager) => {
                    let reply: Value = command.query_async(&mut manager.clone()).await?;
                    Ok(matches!(reply, Value::Okay).then_some(0))
                }
                Connection::Pool(pool) => {
                    let undo = self.release_call(keys, token, Held::Mutex);
                    let reply = Box::pin(self.acquire_pooled(pool, Request::Set(&command), undo));
                    Ok(matches!(reply.await?, Value::Okay).then_some(0))
                }
            };
        } else {
            invocation = ACQUIRE_MANY.prepare_invoke();
            for key in keys {
                invocation.key(key.as_bytes());
            }
            invocation.arg(token.expose().as_bytes()).arg(ttl_ms);
            (Request::Script(&invocation), Reply::Granted)
        };
        let answer = match &self.connection {
            Connection::Manager(manager) => request.send(&mut manager.clone()).await?,
            Connection::Pool(pool) => {
                let undo = self.release_call(keys, token, Held::Mutex);
                Box::pin(self.acquire_pooled(pool, request, undo)).await?
            }
        };
        let number: i64 = redis::FromRedisValue::from_redis_value(answer)?;
        Ok(match reply {
            Reply::Granted => (number == 1).then_some(0),
            Reply::Counter => u64::try_from(number).ok().filter(|counter| *counter > 0),
        })
    }

    /// The plain first attempt of a fair waiter on `key`: `SET NX` and, in the same round
    /// trip, whether the key has a waiting line. A key left free with waiters in line (a
    /// reservation that lapsed with a dead head, a release by a client without `fair`, a holder
    /// that expired) is not taken past them: the attempt gives it back at once (the release
    /// reserves it for the head of the line and wakes it) and counts as refused, so that the
    /// waiter lines up behind them — unless the line held only lapsed entries (its keys outlive
    /// the latest by up to a quarter of its lease): the give-back then deleted it, and takes the
    /// key again in the same script.
    async fn acquire_fair_plain(
        &self,
        key: &Key,
        token: &Token,
        ttl_ms: u64,
    ) -> RedisResult<Option<u64>> {
        let (set, line) = self.set_unless_lined(key, token, ttl_ms).await?;
        if !set {
            return Ok(None);
        }
        if line == 0 {
            return Ok(Some(0));
        }
        // Boxed: the rare path, kept out of every first attempt's future.
        Box::pin(self.give_back_and_try_again(key, token, ttl_ms)).await
    }

    /// `SET NX` of `key` for `token` and, in the same round trip, whether the key has a waiting
    /// line: whether the key was set, and 1 when a line is there.
    async fn set_unless_lined(
        &self,
        key: &Key,
        token: &Token,
        ttl_ms: u64,
    ) -> RedisResult<(bool, i64)> {
        let key_bytes = key.as_bytes();
        // Not a transaction: a line that appears between the two was made by a waiter this
        // attempt holds out (a spurious give-back at worst), and one that is gone by the
        // `EXISTS` has no waiter left to pass.
        let mut exists = redis::cmd("EXISTS");
        arg_concat(&mut exists, &[key_bytes, QUEUE_EXPIRY_SUFFIX]);
        let mut pipeline = redis::Pipeline::with_capacity(2);
        pipeline
            .cmd("SET")
            .arg(key_bytes)
            .arg(token.expose().as_bytes())
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .add_command(exists);
        let reply: Value = match &self.connection {
            Connection::Manager(manager) => pipeline.query_async(&mut manager.clone()).await?,
            Connection::Pool(pool) => {
                let undo = self.release_call(std::slice::from_ref(key), token, Held::Mutex);
                Box::pin(self.acquire_pooled(pool, Request::Pipeline(&pipeline), undo)).await?
            }
        };
        let (set, line): (Value, i64) = redis::FromRedisValue::from_redis_value(reply)?;
        Ok((matches!(set, Value::Okay), line))
    }

    /// Gives `key` back (see [`NodeParts::acquire_fair_plain`]) and takes it again when the
    /// give-back left it free (a line of lapsed entries only), in one script
    /// (`lua/give_back.lua`) that does either only while the plain `SET` is still there: a
    /// release of this token that deleted it meanwhile is not followed by a write of ours.
    async fn give_back_and_try_again(
        &self,
        key: &Key,
        token: &Token,
        ttl_ms: u64,
    ) -> RedisResult<Option<u64>> {
        let key_bytes = key.as_bytes();
        let mut command = evalsha(&GIVE_BACK, 3);
        command.arg(key_bytes);
        arg_concat(&mut command, &[key_bytes, QUEUE_SUFFIX]);
        arg_concat(&mut command, &[key_bytes, QUEUE_EXPIRY_SUFFIX]);
        command
            .arg(token.expose().as_bytes())
            .arg(ttl_ms)
            .arg(TURN_CHANNEL);
        let taken: i64 = self.eval(&GIVE_BACK, &command).await?;
        Ok((taken == 1).then_some(0))
    }

    /// One attempt at a fair lock on `key` (see `lua/acquire_fair.lua`): for the waiter
    /// `member` (empty for a single try) at the `place` in line its client chose (several
    /// nodes; `None`: the server's clock), with the fencing counter `fence` when fencing is on.
    /// The script's answer: the fence (1 without fencing) when taken, 0 when refused, -(1 + ms)
    /// when refused and first in line behind a holder with ms left.
    pub(crate) async fn acquire_fair(
        &self,
        key: &Key,
        token: &Token,
        ttl: Duration,
        fence: Option<&[u8]>,
        member: &[u8],
        place: Option<u64>,
    ) -> RedisResult<i64> {
        let answer = self
            .acquire_fair_call(key, token, ttl, fence, member, place, None)
            .await?;
        Ok(redis::FromRedisValue::from_redis_value(answer)?)
    }

    /// As [`NodeParts::acquire_fair`] with the server's clock ordering the line. A refused
    /// waiter's answer also says the expiry (the node's clock, in ms) its entry was given as it
    /// (re)joined the line — a grant naming it may be held as it is (see `lua/line_pass.lua`) —
    /// and whether the key held a lock's value or nothing (`plain`): a refusal that is not
    /// plain may be a key of another type or a lease, which the caller looks at; and its place
    /// behind the holder, from `tell_place_from` on (see `TurnRegistry::tell_place_from`).
    pub(crate) async fn acquire_fair_anchored(
        &self,
        key: &Key,
        token: &Token,
        ttl: Duration,
        fence: Option<&[u8]>,
        member: &[u8],
        tell_place_from: u64,
    ) -> RedisResult<FairAnswer> {
        let answer = self
            .acquire_fair_call(key, token, ttl, fence, member, None, Some(tell_place_from))
            .await?;
        Ok(match answer {
            Value::Array(_) => {
                let (value, expiry, plain, place): (i64, i64, i64, i64) =
                    redis::FromRedisValue::from_redis_value(answer)?;
                FairAnswer {
                    value,
                    expiry: u64::try_from(expiry).ok(),
                    plain: plain == 1,
                    place: u64::try_from(place).ok(),
                }
            }
            answer => FairAnswer {
                value: redis::FromRedisValue::from_redis_value(answer)?,
                expiry: None,
                plain: false,
                place: None,
            },
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn acquire_fair_call(
        &self,
        key: &Key,
        token: &Token,
        ttl: Duration,
        fence: Option<&[u8]>,
        member: &[u8],
        place: Option<u64>,
        anchored: Option<u64>,
    ) -> RedisResult<Value> {
        let key_bytes = key.as_bytes();
        let mut keys = vec![key_bytes.to_vec()];
        keys.extend(fence.map(<[u8]>::to_vec));
        keys.extend(line_keys(key_bytes).into_iter().skip(1));
        let mut args = vec![
            token.expose().as_bytes().to_vec(),
            validate::ttl_millis(ttl).to_string().into_bytes(),
            member.to_vec(),
            TURN_CHANNEL.as_bytes().to_vec(),
            place
                .map(|place| place.to_string())
                .unwrap_or_default()
                .into_bytes(),
        ];
        if let Some(tell_place_from) = anchored {
            args.push(b"1".to_vec());
            args.push(tell_place_from.to_string().into_bytes());
        }
        self.acquire_lease(&ACQUIRE_FAIR, &keys, &args, || {
            self.release_call_for(std::slice::from_ref(key), token, Held::Mutex, member)
        })
        .await
    }

    /// Gives back `key`, taken here by `token` for the fair waiter `member` in an attempt that
    /// missed the quorum, as that waiter's reservation, the waiter back in line at `place` (see
    /// `lua/line_keep.lua`). True when the key was the token's.
    pub(crate) async fn keep_turn(
        &self,
        key: &Key,
        token: &Token,
        ttl: Duration,
        member: &[u8],
        place: u64,
    ) -> RedisResult<bool> {
        let mut invocation = LINE_KEEP.prepare_invoke();
        for line_key in line_keys(key.as_bytes()) {
            invocation.key(line_key);
        }
        invocation
            .arg(token.expose().as_bytes())
            .arg(member)
            .arg(place)
            .arg(validate::ttl_millis(ttl))
            .arg(TURN_CHANNEL);
        let kept: i64 = self.invoke(&invocation).await?;
        Ok(kept == 1)
    }

    /// Runs one of the lease scripts that take something (`LEASE_ACQUIRE`, `SLOT_ACQUIRE`)
    /// with `keys` and `args`; with a pool, undone by `undo` on the same connection if
    /// abandoned before its answer (see [`NodeParts::acquire`]). The raw answer.
    pub(crate) async fn acquire_lease(
        &self,
        script: &'static LazyLock<Script>,
        keys: &[Vec<u8>],
        args: &[Vec<u8>],
        undo: impl FnOnce() -> Call,
    ) -> RedisResult<Value> {
        let call = Call {
            script,
            source: "",
            keys: keys.to_vec(),
            args: args.to_vec(),
        };
        let invocation = call.invocation();
        let request = Request::Script(&invocation);
        match &self.connection {
            Connection::Manager(manager) => request.send(&mut manager.clone()).await,
            Connection::Pool(pool) => Box::pin(self.acquire_pooled(pool, request, undo())).await,
        }
    }

    /// Runs a lease script that changes nothing but what the token holds (extend, downgrade,
    /// fence raise); its integer answer.
    pub(crate) async fn run_lease(
        &self,
        script: &'static LazyLock<Script>,
        keys: &[Vec<u8>],
        args: &[Vec<u8>],
    ) -> RedisResult<i64> {
        self.invoke(&Call::lease(script, keys, args).invocation())
            .await
    }

    /// A fenced lease's raise (`lua/lease_raise.lua`) re-sent by its follow-up, as one write
    /// of `SCRIPT LOAD` + `EVALSHA` (see [`NodeParts::self_contained`]).
    pub(crate) async fn raise_lease_self_contained(
        &self,
        keys: &[Vec<u8>],
        args: &[Vec<u8>],
    ) -> RedisResult<i64> {
        let call = Call {
            script: &LEASE_RAISE,
            source: LEASE_RAISE_SOURCE,
            keys: keys.to_vec(),
            args: args.to_vec(),
        };
        Ok(redis::FromRedisValue::from_redis_value(
            self.self_contained(&call).await?,
        )?)
    }

    /// What each of `keys` holds here: `""` when absent, `a mutex`, a kind of lease as the
    /// client names it (`a semaphore of 2 permit(s)`), or `foreign <type>` for a Redis value
    /// that is not a lock.
    pub(crate) async fn describe(&self, keys: &[Key]) -> RedisResult<Vec<String>> {
        // `TYPE` and a string's first byte first, one plain round trip: only a key of another
        // type, or a string beginning with 0xFF (a lease alone on its key, which a mutex's
        // value never begins with), needs the script (which a node that restarted would first
        // have to load).
        let mut pipeline = redis::pipe();
        pipeline.ignore_errors();
        for key in keys {
            pipeline.cmd("TYPE").arg(key.as_bytes());
            pipeline.cmd("GETRANGE").arg(key.as_bytes()).arg(0).arg(0);
        }
        let answers: Vec<RedisResult<Value>> = match &self.connection {
            Connection::Manager(manager) => pipeline.query_async(&mut manager.clone()).await?,
            Connection::Pool(pool) => {
                Box::pin(async {
                    pipeline
                        .query_async(&mut Pooled::checkout(pool).await?)
                        .await
                })
                .await?
            }
        };
        let plain: Option<Vec<String>> = answers
            .chunks(2)
            .map(|answer| match answer {
                [Ok(Value::SimpleString(kind)), _] if kind == "none" => Some(String::new()),
                [Ok(Value::SimpleString(kind)), Ok(Value::BulkString(first))]
                    if kind == "string" && first.first() != Some(&0xFF) =>
                {
                    Some("a mutex".to_owned())
                }
                _ => None,
            })
            .collect();
        if let Some(plain) = plain {
            return Ok(plain);
        }
        let mut invocation = DESCRIBE.prepare_invoke();
        for key in keys {
            invocation.key(key.as_bytes());
        }
        self.invoke(&invocation).await
    }

    /// The compare-and-delete of what `token` holds on `keys` as `held`.
    pub(crate) fn release_call(&self, keys: &[Key], token: &Token, held: Held) -> Call {
        self.release_call_for(keys, token, held, &[])
    }

    /// As [`NodeParts::release_call`], also taking the waiter `member` (empty for none) out of
    /// a fair lock's line.
    pub(crate) fn release_call_for(
        &self,
        keys: &[Key],
        token: &Token,
        held: Held,
        member: &[u8],
    ) -> Call {
        let token = token.expose().as_bytes().to_vec();
        let channel = self
            .release_channel
            .map(|channel| channel.as_bytes().to_vec());
        match held {
            Held::Mutex if self.fair && keys.len() == 1 => {
                let key = keys[0].as_bytes();
                Call {
                    script: &RELEASE_FAIR,
                    source: &RELEASE_FAIR_SOURCE,
                    keys: line_keys(key),
                    args: [token, member.to_vec(), TURN_CHANNEL.as_bytes().to_vec()]
                        .into_iter()
                        .chain(channel)
                        .collect(),
                }
            }
            // A multi-key lock is not lined up, but its keys may have lines (single-key
            // waiters behind it): each key it frees passes the turn to its line's head, in the
            // same call.
            Held::Mutex if self.fair => Call {
                script: &RELEASE_MANY_FAIR,
                source: &RELEASE_MANY_FAIR_SOURCE,
                keys: keys
                    .iter()
                    .flat_map(|key| line_keys(key.as_bytes()))
                    .collect(),
                args: [token, TURN_CHANNEL.as_bytes().to_vec()]
                    .into_iter()
                    .chain(channel)
                    .collect(),
            },
            Held::Mutex => {
                let (script, source) = if self.release_channel.is_some() {
                    (&RELEASE_NOTIFY, include_str!("lua/release_notify.lua"))
                } else {
                    (&RELEASE, include_str!("lua/release.lua"))
                };
                Call {
                    script,
                    source,
                    keys: keys.iter().map(|key| key.as_bytes().to_vec()).collect(),
                    args: [token].into_iter().chain(channel).collect(),
                }
            }
            Held::Set { tags, claim } => {
                let key = keys.first().map_or(&[][..], |key| key.as_bytes());
                Call {
                    script: &LEASE_RELEASE,
                    source: LEASE_RELEASE_SOURCE,
                    keys: vec![key.to_vec(), [key, CLAIM_SUFFIX].concat()],
                    args: [
                        token,
                        tags.as_bytes().to_vec(),
                        if claim { b"1".to_vec() } else { b"0".to_vec() },
                    ]
                    .into_iter()
                    .chain(channel)
                    .collect(),
                }
            }
            Held::Slot(slot) => {
                let key = keys.first().map_or(&[][..], |key| key.as_bytes());
                Call {
                    script: &SLOT_RELEASE,
                    source: SLOT_RELEASE_SOURCE,
                    keys: vec![key.to_vec()],
                    args: [
                        token,
                        slot.map(|slot| slot.to_string())
                            .unwrap_or_default()
                            .into_bytes(),
                    ]
                    .into_iter()
                    .chain(channel)
                    .collect(),
                }
            }
        }
    }

    /// An acquisition on a pooled connection, undone on that same connection if abandoned.
    async fn acquire_pooled(
        &self,
        pool: &Pool,
        request: Request<'_>,
        undo: Call,
    ) -> RedisResult<Value> {
        let mut connection = Pooled::checkout(pool).await?;
        let mut undo = UndoOnDrop {
            connection: connection.shared(),
            call: Some(undo),
        };
        let answer = request.send(&mut connection).await;
        // Answered (whatever the answer): the request is no longer in flight.
        undo.connection = None;
        answer
    }

    /// Raises the fencing counters `fences` (one per key of `keys`) to at least `value`, kept
    /// until the node's clock passes it plus `ttl`; true when every key still holds `token`
    /// here. `resent`: a follow-up's send, which carries its script (see
    /// [`NodeParts::self_contained`]).
    pub(crate) async fn raise_fence(
        &self,
        keys: &[Key],
        fences: &[Vec<u8>],
        token: &Token,
        value: u64,
        ttl: Duration,
        resent: bool,
    ) -> RedisResult<bool> {
        let call = Call {
            script: &RAISE_FENCE,
            source: RAISE_FENCE_SOURCE,
            keys: keys
                .iter()
                .map(|key| key.as_bytes().to_vec())
                .chain(fences.iter().cloned())
                .collect(),
            args: vec![
                token.expose().as_bytes().to_vec(),
                value.to_string().into_bytes(),
                validate::ttl_millis(ttl).to_string().into_bytes(),
            ],
        };
        let held: i64 = if resent {
            redis::FromRedisValue::from_redis_value(self.self_contained(&call).await?)?
        } else {
            self.invoke(&call.invocation()).await?
        };
        Ok(held == 1)
    }

    /// Compare-and-delete as one write of `SCRIPT LOAD` + `EVALSHA` (see
    /// [`NodeParts::self_contained`]): for clean-ups that may be the last thing a process
    /// sends (a cancelled acquisition before exit), and for every re-send of a follow-up.
    pub(crate) async fn release_self_contained(
        &self,
        keys: &[Key],
        token: &Token,
        held: Held,
        member: &[u8],
    ) -> RedisResult<usize> {
        let call = self.release_call_for(keys, token, held, member);
        let deleted: i64 =
            redis::FromRedisValue::from_redis_value(self.self_contained(&call).await?)?;
        Ok(usize::try_from(deleted).unwrap_or_default())
    }

    /// Runs `call` as one write of `SCRIPT LOAD` + `EVALSHA`, so that a node that lost its
    /// scripts (a restart, `SCRIPT FLUSH`) runs it from what it received: a plain `EVALSHA`
    /// answered NOSCRIPT later than its sender waits never gets the load that would follow,
    /// and a follow-up re-sending it would meet the same fate every round. The script's answer.
    async fn self_contained(&self, call: &Call) -> RedisResult<Value> {
        let pipeline = call.self_contained();
        let send = || async {
            match &self.connection {
                Connection::Manager(manager) => pipeline.query_async(&mut manager.clone()).await,
                Connection::Pool(pool) => {
                    Box::pin(async {
                        pipeline
                            .query_async(&mut Pooled::checkout(pool).await?)
                            .await
                    })
                    .await
                }
            }
        };
        // A connection lost earlier (the node was down, or restarted) answers the first
        // request after it with its error, and only then connects again: a node back before a
        // follow-up's round would miss that round too (the last one for good). Sent once more
        // on the new connection (within the round's timeout): every call here is idempotent
        // (compare-and-delete, a counter raised to at least a value).
        let answers: Vec<RedisResult<Value>> = match send().await {
            Err(error) if error.is_io_error() || error.is_unrecoverable_error() => send().await?,
            answers => answers?,
        };
        // The script's answer is the last.
        answers.into_iter().next_back().unwrap_or_else(|| {
            Err(redis::RedisError::from((
                redis::ErrorKind::Parse,
                "a script without an answer",
            )))
        })
    }

    /// Compare-and-delete of what `token` holds on `keys` as `held`, also taking the waiter
    /// `member` (empty for none) out of a fair mutex's line, and giving up a reservation of the
    /// key for it; returns how many keys were ours and are now free.
    pub(crate) async fn release_for(
        &self,
        keys: &[Key],
        token: &Token,
        held: Held,
        member: &[u8],
    ) -> RedisResult<usize> {
        let deleted: i64 = match held {
            // The common case, its command made at once (the same script, keys and arguments
            // as `release_call`'s, written straight into one `EVALSHA`).
            Held::Mutex if !self.fair => {
                let script: &Script = match self.release_channel {
                    Some(_) => &RELEASE_NOTIFY,
                    None => &RELEASE,
                };
                let mut command = evalsha(script, keys.len());
                for key in keys {
                    command.arg(key.as_bytes());
                }
                command.arg(token.expose().as_bytes());
                if let Some(channel) = self.release_channel {
                    command.arg(channel);
                }
                self.eval(script, &command).await?
            }
            // A fair mutex's release (`release_call_for`'s), made at once.
            Held::Mutex if keys.len() == 1 => {
                let key = keys[0].as_bytes();
                let mut command = evalsha(&RELEASE_FAIR, 3);
                command.arg(key);
                arg_concat(&mut command, &[key, QUEUE_SUFFIX]);
                arg_concat(&mut command, &[key, QUEUE_EXPIRY_SUFFIX]);
                command
                    .arg(token.expose().as_bytes())
                    .arg(member)
                    .arg(TURN_CHANNEL);
                if let Some(channel) = self.release_channel {
                    command.arg(channel);
                }
                self.eval(&RELEASE_FAIR, &command).await?
            }
            _ => {
                self.invoke(&self.release_call(keys, token, held).invocation())
                    .await?
            }
        };
        Ok(usize::try_from(deleted).unwrap_or_default())
    }

    /// Compare-and-pexpire of what `token` holds on `keys` as `held`, all or nothing. True
    /// when extended.
    pub(crate) async fn extend(
        &self,
        keys: &[Key],
        token: &Token,
        held: Held,
        ttl: Duration,
    ) -> RedisResult<bool> {
        let ttl_ms = validate::ttl_millis(ttl).to_string().into_bytes();
        let token = token.expose().as_bytes().to_vec();
        let key = || {
            keys.first()
                .map_or(Vec::new(), |key| key.as_bytes().to_vec())
        };
        let extended: i64 = match held {
            Held::Mutex => {
                let mut invocation = EXTEND.prepare_invoke();
                for key in keys {
                    invocation.key(key.as_bytes());
                }
                invocation.arg(token).arg(ttl_ms);
                self.invoke_in_order(&invocation).await?
            }
            Held::Set { tags, .. } => {
                let call = Call::lease(
                    &LEASE_EXTEND,
                    &[key()],
                    &[token, tags.as_bytes().to_vec(), ttl_ms],
                );
                self.invoke_in_order(&call.invocation()).await?
            }
            Held::Slot(slot) => {
                let slot = slot.map(|slot| slot.to_string()).unwrap_or_default();
                let call = Call::lease(&SLOT_EXTEND, &[key()], &[token, slot.into_bytes(), ttl_ms]);
                self.invoke_in_order(&call.invocation()).await?
            }
        };
        Ok(extended == 1)
    }

    /// Turns `token`'s write lease on the key into a read lease; true when it now reads.
    pub(crate) async fn downgrade(&self, keys: &[Key], token: &Token) -> RedisResult<bool> {
        let key = keys
            .first()
            .map_or(Vec::new(), |key| key.as_bytes().to_vec());
        let call = Call::lease(
            &LEASE_DOWNGRADE,
            &[key],
            &[token.expose().as_bytes().to_vec()],
        );
        let downgraded: i64 = self.invoke_in_order(&call.invocation()).await?;
        Ok(downgraded == 1)
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
        command.arg(key.as_bytes());
        self.query(&command).await
    }

    /// As `pttl`, for `inspect`: the key's, or, when it is absent, its writer's claim's.
    pub(crate) async fn held_pttl(&self, key: &Key) -> RedisResult<i64> {
        let mut command = redis::cmd("PTTL");
        command.arg(key.as_bytes());
        let pttl = self.query(&command).await?;
        if pttl != -2 {
            return Ok(pttl);
        }
        // A key whose holders all left while a writer waits is kept by the writer's claim
        // alone: no reader can take it, so it is held (until the claim expires).
        let mut command = redis::cmd("PTTL");
        command.arg([key.as_bytes(), CLAIM_SUFFIX].concat());
        self.query(&command).await
    }

    // The pool's branches are boxed: a pool checkout is a future of several kilobytes, which
    // would otherwise sit inline in every request's future and be copied whenever one is
    // boxed, pool or not.
    async fn query<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> RedisResult<T> {
        match &self.connection {
            Connection::Manager(manager) => command.query_async(&mut manager.clone()).await,
            Connection::Pool(pool) => {
                Box::pin(async {
                    command
                        .query_async(&mut Pooled::checkout(pool).await?)
                        .await
                })
                .await
            }
        }
    }

    /// Runs `invocation` where a holder's changes of its expiry keep their order (see
    /// [`NodeParts::ordered`]): on the one ordered connection with a pool, else as
    /// [`NodeParts::invoke`].
    async fn invoke_in_order<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> RedisResult<T> {
        match &self.ordered {
            Some(manager) => invoke_on(invocation, &mut manager.clone()).await,
            None => self.invoke(invocation).await,
        }
    }

    /// Runs `command`, an [`evalsha`] of `script` (see [`eval_on`]).
    async fn eval<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        command: &Cmd,
    ) -> RedisResult<T> {
        match &self.connection {
            Connection::Manager(manager) => eval_on(script, command, &mut manager.clone()).await,
            Connection::Pool(pool) => {
                Box::pin(async {
                    eval_on(script, command, &mut Pooled::checkout(pool).await?).await
                })
                .await
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
                Box::pin(async { invoke_on(invocation, &mut Pooled::checkout(pool).await?).await })
                    .await
            }
        }
    }
}

/// `EVALSHA` of `script` over `keys` keys, its keys and arguments to be added in order: one
/// buffer, where a [`redis::ScriptInvocation`] keeps a vector per key and argument and copies
/// them into its command again on every call. Sent by [`NodeParts::eval`].
fn evalsha(script: &Script, keys: usize) -> Cmd {
    let mut command = Cmd::with_capacity(10, 256);
    command.arg("EVALSHA").arg(script.get_hash()).arg(keys);
    command
}

/// Adds the concatenation of `parts` to `command` as one argument, without building it first.
fn arg_concat(command: &mut Cmd, parts: &[&[u8]]) {
    let mut argument = redis::RedisWrite::writer_for_next_arg(command);
    for part in parts {
        // Writing into the command's own buffer cannot fail.
        let _ = std::io::Write::write_all(&mut argument, part);
    }
}

/// Sends `command`, an [`evalsha`] of `script`, loading the script first if the server
/// answers `NOSCRIPT` (after a restart or `SCRIPT FLUSH`), as
/// [`redis::ScriptInvocation::invoke_async`] does.
async fn eval_on<T, C>(script: &Script, command: &Cmd, connection: &mut C) -> RedisResult<T>
where
    T: redis::FromRedisValue,
    C: ConnectionLike + Send,
{
    match command.query_async(connection).await {
        Err(error)
            if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
        {
            script.prepare_invoke().load_async(connection).await?;
            command.query_async(connection).await
        }
        answer => answer,
    }
}

/// A fair lock's key and its line's two keys.
fn line_keys(key: &[u8]) -> Vec<Vec<u8>> {
    vec![
        key.to_vec(),
        [key, QUEUE_SUFFIX].concat(),
        [key, QUEUE_EXPIRY_SUFFIX].concat(),
    ]
}

/// One acquisition request and how to read its answer.
enum Request<'a> {
    Set(&'a redis::Cmd),
    Pipeline(&'a redis::Pipeline),
    Script(&'a redis::ScriptInvocation<'a>),
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
    async fn send<C: ConnectionLike + Send>(&self, connection: &mut C) -> RedisResult<Value> {
        match self {
            Self::Set(command) => command.query_async(connection).await,
            Self::Pipeline(pipeline) => pipeline.query_async(connection).await,
            Self::Script(invocation) => invocation.invoke_async(connection).await,
        }
    }
}

/// Sends its release call on `connection` when dropped while still armed: the acquisition it
/// follows was abandoned before its answer came.
struct UndoOnDrop {
    connection: Option<redis::aio::MultiplexedConnection>,
    call: Option<Call>,
}

impl Drop for UndoOnDrop {
    fn drop(&mut self) {
        let (Some(mut connection), Some(call)) = (self.connection.take(), self.call.take()) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            // Queued behind the abandoned request on the same connection; bounded in case
            // the node never answers again. It carries its script: it may be the last thing
            // this process sends (a `stop` and an exit before the held request lands), and a
            // node that lost its scripts would answer `NOSCRIPT` to nobody and keep the key.
            let undo = async {
                if call.source.is_empty() {
                    call.invocation()
                        .invoke_async::<Value>(&mut connection)
                        .await
                        .map(drop)
                } else {
                    call.self_contained()
                        .query_async::<Vec<RedisResult<Value>>>(&mut connection)
                        .await
                        .map(drop)
                }
            };
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
            // Bounded (a device such as /dev/zero is refused, not read until memory runs
            // out); the path is shown as a URL would be: a password put there by mistake stays
            // hidden.
            let root_cert = lock_core::raw::redis::read_ca_file(path)?;
            let certificates = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            };
            return Client::build_with_tls(url.url.as_str(), certificates).map_err(|e| invalid(&e));
        }
    }
    // Without the `tls` feature, `RedlockConfig::validate` refused a CA file.
    #[cfg(not(feature = "tls"))]
    let _ = config;
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

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

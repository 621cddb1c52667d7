//! The `pool` connection kind: a deadpool pool of redis-rs multiplexed connections per node,
//! made by deadpool-redis's manager, without a round trip per checkout.
//!
//! deadpool-redis checks every connection it hands out again with `UNWATCH` + `PING`: one
//! more round trip per request, which doubled a lock cycle's time. Here a connection that
//! answered lately goes back out as it is, and one idle for [`RECHECK_AFTER`] or longer is
//! checked by deadpool-redis as before (a server restart or an idle timeout while nobody used
//! it). A connection whose request failed on the connection (not a server's error answer), or
//! whose request was dropped before its answer (a timeout, a cancellation: its state is
//! unknown), leaves the pool instead of going back, so the next checkout gets a sound or a new
//! one; and every connection handed out before that failure is checked once before its next
//! use (a restart or a kill takes them all: one failed request, not one per connection).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use deadpool::managed::{self, Metrics, Object, RecycleResult};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, Value};

/// How long a connection may have been idle and still go out without a check.
pub(crate) const RECHECK_AFTER: Duration = Duration::from_secs(1);

/// deadpool-redis's manager, whose check runs only on connections idle for [`RECHECK_AFTER`]
/// or handed out before another connection of the node failed.
pub(crate) struct PoolManager {
    inner: deadpool_redis::Manager,
    /// When a connection last left the pool unsound: the others, handed out before, are
    /// checked once (a restart or a kill takes them all).
    unsound_at: Mutex<Option<Instant>>,
}

impl PoolManager {
    pub(crate) fn new(inner: deadpool_redis::Manager) -> Self {
        Self {
            inner,
            unsound_at: Mutex::new(None),
        }
    }
}

impl managed::Manager for PoolManager {
    type Type = MultiplexedConnection;
    type Error = RedisError;

    async fn create(&self) -> Result<MultiplexedConnection, RedisError> {
        managed::Manager::create(&self.inner).await
    }

    async fn recycle(
        &self,
        connection: &mut MultiplexedConnection,
        metrics: &Metrics,
    ) -> RecycleResult<RedisError> {
        // `last_used` is the time since the connection was last handed out (or made).
        let handed_out = metrics.recycled.unwrap_or(metrics.created);
        let unsound_at = *self
            .unsound_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let suspect = unsound_at.is_some_and(|at| at >= handed_out);
        if metrics.last_used() < RECHECK_AFTER && !suspect {
            return Ok(());
        }
        managed::Manager::recycle(&self.inner, connection, metrics).await
    }
}

/// A node's pool.
pub(crate) type Pool = managed::Pool<PoolManager>;

/// A connection checked out of a [`Pool`]: it goes back when dropped, unless its latest
/// request failed on the connection or did not finish.
pub(crate) struct Pooled {
    object: Option<Object<PoolManager>>,
    sound: bool,
}

impl Pooled {
    /// Checks a connection out of `pool`.
    pub(crate) async fn checkout(pool: &Pool) -> RedisResult<Self> {
        let object = pool.get().await.map_err(|error| {
            RedisError::from((ErrorKind::Io, "connection pool", error.to_string()))
        })?;
        Ok(Self {
            object: Some(object),
            sound: true,
        })
    }

    /// A handle on the same connection (requests sent through it queue behind this one's).
    pub(crate) fn shared(&self) -> Option<MultiplexedConnection> {
        self.object.as_deref().cloned()
    }
}

/// Runs `request` on a pooled connection, which stays `sound` if the request finishes without
/// a failure of the connection itself (it is not, from the first poll until then).
async fn guarded<T>(
    sound: &mut bool,
    request: impl Future<Output = RedisResult<T>>,
) -> RedisResult<T> {
    *sound = false;
    let answer = request.await;
    *sound = match &answer {
        Ok(_) => true,
        Err(error) => !broken(error),
    };
    answer
}

/// The error of a request on a connection already given back (never: the connection is
/// present until the drop).
fn gone() -> RedisError {
    RedisError::from((
        ErrorKind::Io,
        "connection pool",
        "the connection was given back".to_owned(),
    ))
}

/// Whether `error` says the connection itself failed (not the server's answer, whatever its
/// code: `OOM`, `BUSY` and the like come as `Extension` errors on a sound connection).
fn broken(error: &RedisError) -> bool {
    matches!(error.kind(), ErrorKind::Io | ErrorKind::Parse) || error.is_unrecoverable_error()
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if !self.sound
            && let Some(object) = self.object.take()
        {
            if let Some(pool) = Object::pool(&object) {
                *pool
                    .manager()
                    .unsound_at
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
            }
            // Out of the pool for good: dropped here (its driver ends with its last clone).
            drop(Object::take(object));
        }
    }
}

impl ConnectionLike for Pooled {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let Self { object, sound } = self;
        match object.as_deref_mut() {
            Some(connection) => Box::pin(guarded(sound, connection.req_packed_command(cmd))),
            None => Box::pin(async { Err(gone()) }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let Self { object, sound } = self;
        match object.as_deref_mut() {
            Some(connection) => Box::pin(guarded(
                sound,
                connection.req_packed_commands(pipeline, offset, count),
            )),
            None => Box::pin(async { Err(gone()) }),
        }
    }

    fn get_db(&self) -> i64 {
        self.object.as_deref().map_or(0, ConnectionLike::get_db)
    }
}

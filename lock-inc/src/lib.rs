#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod config;
mod fair;
mod wake;

use std::collections::BTreeSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

pub use config::IncConfig;
use fred::prelude::{ClientLike, Config, KeysInterface, LuaInterface, ReconnectPolicy};
use fred::types::scripts::Script;
use lock_core::{
    Capabilities, Key, KeyState, Lease, LeaseKind, LockError, Result, Token, metrics,
    raw::{FollowUp, Handle, KeySet, Lock, LockRequest, async_trait, redis as redis_kit, validate},
};
use tokio::time::Instant;

/// The backend's name in messages and configuration.
pub const NAME: &str = "inc";

static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        [
            include_str!("lua/fence.lua"),
            include_str!("lua/acquire.lua"),
        ]
        .concat(),
    )
});
static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(include_str!("lua/release.lua")));
static EXTEND: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(include_str!("lua/extend.lua")));
static PURGE: LazyLock<Script> = LazyLock::new(|| Script::from_lua(include_str!("lua/purge.lua")));
static SHARED_ACQUIRE: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(include_str!("lua/shared_acquire.lua")));
static SHARED_RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(include_str!("lua/shared_release.lua")));
static SHARED_EXTEND: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(include_str!("lua/shared_extend.lua")));
static DOWNGRADE: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(include_str!("lua/downgrade.lua")));

/// A fair mutex's scripts: the waiting line's helpers (`lock_core::raw::redis::LINE_SCRIPT`)
/// in each, defined only when someone is in line (or a waiter asks or leaves): defining them is
/// most of a short script's cost. The acquisition is the plain one behind the line's gate, which
/// lets it pass at once when the line is empty and the caller is a single try or the key is free
/// (the same test as the gate's first). A waiter the lock was given to (`lua/line_grant.lua`)
/// takes it over; a refused waiter gets its entry's expiry along, and its place behind the
/// holder when the line says (1: second; only from `ARGV[5]` on, the line gate's `tell_from`),
/// as `{gate, expiry[, place]}`.
static ACQUIRE_FAIR: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        [
            include_str!("lua/fence.lua"),
            "if not (redis.call('exists', KEYS[#KEYS]) == 0 and (ARGV[3] == '' or redis.call('exists', KEYS[1]) == 0)) then\n",
            lock_core::raw::redis::LINE_SCRIPT,
            include_str!("lua/line_grant.lua"),
            "local held_by = redis.pcall('get', KEYS[2])\n",
            "local taken = line_take_grant(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[3], ARGV[2], held_by)\n",
            "if taken then\n  return taken\nend\n",
            // `gated`: the test above is the gate's first, and `line_take_grant` wrote nothing.
            "local gate, expiry, rank = line_gate(KEYS[1], KEYS[2], ARGV[1], ARGV[3], tonumber(ARGV[2]), ARGV[4], nil, true, held_by, tonumber(ARGV[5]))\n",
            "if gate then\n  if expiry then\n    return {gate, expiry, rank}\n  end\n  return gate\nend\n",
            "end\n",
            include_str!("lua/acquire.lua"),
        ]
        .concat(),
    )
});
static RELEASE_FAIR: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        [
            include_str!("lua/release_fair.lua"),
            lock_core::raw::redis::LINE_SCRIPT,
            include_str!("lua/fence.lua"),
            include_str!("lua/line_grant.lua"),
            include_str!("lua/release_fair_pass.lua"),
        ]
        .concat(),
    )
});

/// Keys asked per `SCAN` page by [`Lock::purge`]; the locks of a page are removed by one
/// script on a single server.
const PURGE_BATCH: u32 = 1000;

/// The optimistic INCR lock of lock-inc: `INCR` on the lock key; 1 means you hold it, more
/// means "resource locked" at once.
///
/// Beyond the original: the expiry is set atomically with the `INCR` (one Lua script), release
/// and extend act only for the holder (a random token is stored beside the counter), every
/// acquisition returns a strictly increasing fencing token per key, and a replayed acquisition
/// (a client resending after a reconnect) finds its own token and cannot make a second holder.
///
/// It also serves semaphores and read-write locks ([`LeaseKind::Permit`], [`LeaseKind::Read`],
/// [`LeaseKind::Write`]) on the same keys: see the crate's README.
#[derive(Clone)]
pub struct IncLock {
    shared: Arc<Shared>,
}

struct Shared {
    client: fred::clients::Client,
    prefix: String,
    config: IncConfig,
    /// The subscriber connection that carries the release channels and the turn channel,
    /// when `wake_on_release` or `fair` is on.
    listener: Option<Arc<wake::Listener>>,
    /// The waiters for releases, when `wake_on_release` is on.
    wakeups: Option<wake::Wakeups>,
    /// The waiters of fair lines, when `fair` is on.
    fair: Option<fair::FairLine>,
    /// Set by `shutdown`: every later call, guards' included, fails with
    /// [`LockError::Stopped`] before touching the closed client (whose errors would otherwise be
    /// backend errors, or a wait for the command timeout).
    stopped: AtomicBool,
    /// fred's connection task, ended when the client is dropped without `stop` (see
    /// `Drop for Shared`).
    connection: std::sync::Mutex<Option<fred::types::ConnectHandle>>,
    /// The runtime the client was made on, which drives that task: a client dropped off it (on
    /// another thread, or inside a short-lived runtime) still closes its connection there.
    runtime: Option<tokio::runtime::Handle>,
}

/// The three Redis keys of one lock, in one hash slot (a `{…}` hash tag around the user's key).
///
/// A mutex keeps its `INCR` counter in `counter` and its holder's token in `owner`; a semaphore
/// or a read-write lock keeps its holders in `counter` (a sorted set scored by expiry) and its
/// kind in `owner` (`#p:<size>`, `#rw`, or `#rw:<token>:<expiry>` with a writer's claim).
struct LockKeys {
    counter: String,
    owner: String,
    fence: String,
}

/// The letter that tells the holders of a semaphore or read-write lock apart in the holder
/// set (`None` for a mutex, which has no holder set).
fn kind_letter(kind: LeaseKind) -> Option<&'static str> {
    match kind {
        LeaseKind::Permit { .. } => Some("p"),
        LeaseKind::Read => Some("r"),
        LeaseKind::Write => Some("w"),
        _ => None,
    }
}

/// What a key is in use as, from the marker the shared acquisition script answers with.
fn describe_marker(marker: &str) -> String {
    if let Some(permits) = marker
        .strip_prefix("#p:")
        .and_then(|size| size.parse::<u32>().ok())
        .and_then(|size| LeaseKind::permit(size).ok())
    {
        return permits.to_string();
    }
    if marker.starts_with("#rw") {
        return "a read-write lock".to_owned();
    }
    LeaseKind::Exclusive.to_string()
}

/// A client dropped without `stop` (the last handle of it gone: the lock, its guards and any
/// release still being sent again) closes its connection as `stop` does: fred's connection task
/// would otherwise keep it open, and its Cluster connections, for as long as the process runs.
impl Drop for Shared {
    fn drop(&mut self) {
        let connection = self
            .connection
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if self.stopped.load(Ordering::SeqCst) {
            return;
        }
        match &self.runtime {
            Some(runtime) => {
                runtime.spawn(wake::quit(self.client.clone(), connection));
            }
            None => {
                if let Some(connection) = connection {
                    connection.abort();
                }
            }
        }
    }
}

impl Shared {
    /// Built by concatenation: `format!` costs more here than the rest of the client's own work
    /// on a command.
    fn keys(&self, key: &Key) -> LockKeys {
        let counter = [self.prefix.as_str(), "{", key.as_str(), "}"].concat();
        LockKeys {
            owner: [counter.as_str(), ":owner"].concat(),
            fence: [counter.as_str(), ":fence"].concat(),
            counter,
        }
    }

    /// [`LockError::Stopped`] once `shutdown` was called.
    fn running(&self) -> Result<()> {
        if self.stopped.load(Ordering::SeqCst) {
            return Err(LockError::Stopped);
        }
        Ok(())
    }

    /// A fair lock's waiting line and the expiries of its entries, in the lock's hash slot.
    fn line_keys(&self, key: &Key) -> [String; 2] {
        let counter = self.keys(key).counter;
        [
            [counter.as_str(), ":queue"].concat(),
            [counter.as_str(), ":queue-expiry"].concat(),
        ]
    }

    fn backend_error(&self, what: &str, error: &fred::error::Error) -> LockError {
        LockError::backend(
            NAME,
            format!(
                "{what} on {}: {}",
                self.config.label(),
                redis_kit::shown_error(error)
            ),
        )
    }
}

impl IncLock {
    /// Connects to the server named by `config`.
    ///
    /// Commands time out after `command_timeout` (fred's default is never), a command in flight
    /// when a connection drops is not resent (fred resends it 3 times by default, which could
    /// replay an `INCR`), and the client reconnects by itself with exponential backoff.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming a bad field (the URL is shown without password);
    /// [`LockError::Backend`] when the server cannot be reached.
    pub async fn connect(config: IncConfig) -> Result<Self> {
        config.validate()?;
        let mut fred_config = Config::from_url(config.url.expose()).map_err(|e| {
            LockError::invalid("url", format!("{}: {}", config.label(), e.details()))
        })?;
        if config.resp3()? {
            fred_config.version = fred::types::RespVersion::RESP3;
        }
        #[cfg(feature = "tls")]
        if let Some(path) = &config.tls_ca_file {
            fred_config.tls = Some(tls_with_ca(path)?.into());
        }
        let command_timeout = Duration::from_millis(config.command_timeout);
        let connect_timeout = Duration::from_millis(config.connect_timeout);
        let mut builder = fred::types::Builder::from_config(fred_config);
        builder
            .with_performance_config(|performance| {
                performance.default_command_timeout = command_timeout
            })
            .with_connection_config(|connection| {
                connection.connection_timeout = connect_timeout;
                connection.internal_command_timeout =
                    command_timeout.max(Duration::from_millis(100));
                connection.max_command_attempts = 1;
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 10, 1_000, 2));
        let invalid = |e: fred::error::Error| {
            LockError::invalid("url", format!("{}: {}", config.label(), e.details()))
        };
        let client = builder.build().map_err(invalid)?;
        // 32 hex digits naming a fair client in the lines it waits in, and its turn channel.
        let instance = if config.fair {
            Some(Token::generate()?.expose().to_string())
        } else {
            None
        };
        // One subscriber connection for releases and turns, connected by the first waiter.
        let listener = if config.wake_on_release || config.fair {
            Some(Arc::new(wake::Listener::new(
                builder.build_subscriber_client().map_err(invalid)?,
                wake::Waiters::new(instance.as_deref()),
            )))
        } else {
            None
        };
        let wakeups = listener
            .as_ref()
            .filter(|_| config.wake_on_release)
            .map(|listener| wake::Wakeups::new(Arc::clone(listener)));
        let fair = instance
            .zip(listener.as_ref())
            .map(|(instance, listener)| fair::FairLine::new(instance, Arc::clone(listener)));
        let shared = Shared {
            client,
            prefix: config.prefix.clone(),
            config,
            listener,
            wakeups,
            fair,
            stopped: AtomicBool::new(false),
            connection: std::sync::Mutex::new(None),
            runtime: tokio::runtime::Handle::try_current().ok(),
        };
        let connection = shared
            .client
            .init()
            .await
            .map_err(|e| shared.backend_error("connect", &e))?;
        *shared
            .connection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(connection);
        Ok(Self {
            shared: Arc::new(shared),
        })
    }

    /// The configuration this backend was built from.
    pub fn config(&self) -> &IncConfig {
        &self.shared.config
    }
}

#[async_trait]
impl Lock for IncLock {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        let capabilities = Capabilities::NONE
            .with_extend()
            .with_fail_fast()
            .with_purge()
            .with_distributed()
            .with_fencing()
            .with_semaphore()
            .with_read_write();
        let capabilities = if self.shared.wakeups.is_some() {
            capabilities.with_wake_on_release()
        } else {
            capabilities
        };
        if self.shared.fair.is_some() {
            capabilities.with_fair()
        } else {
            capabilities
        }
    }

    async fn wait_for_turn(&self, request: &LockRequest, max_wait: Duration) -> Result<bool> {
        match (&self.shared.fair, request.waiter()) {
            (Some(fair), Some(waiter)) => {
                self.shared.running()?;
                Ok(fair.wait(waiter, max_wait).await)
            }
            _ => self
                .wait_for_release(request.keys(), max_wait)
                .await
                .map(|()| false),
        }
    }

    async fn wait_for_release(&self, keys: &[Key], max_wait: Duration) -> Result<()> {
        let shared = &self.shared;
        shared.running()?;
        match (&shared.wakeups, keys.first()) {
            (Some(wakeups), Some(key)) => {
                let counter = shared.keys(key).counter;
                wakeups.wait(&shared.client, &counter, max_wait).await;
            }
            _ => tokio::time::sleep(max_wait).await,
        }
        Ok(())
    }

    fn try_acquire<'a>(
        &'a self,
        request: &'a LockRequest,
    ) -> lock_core::raw::Answer<'a, Result<Option<Box<dyn Handle>>>> {
        lock_core::raw::Answer::later(async move {
            redis_kit::refuse_reservation(request.token())?;
            if let Some(letter) = kind_letter(request.kind()) {
                return acquire_shared(&self.shared, request, letter).await;
            }
            let shared = &self.shared;
            shared.running()?;
            let key = request.primary_key().clone();
            let keys = shared.keys(&key);
            let start = Instant::now();
            let ttl_ms = validate::ttl_millis(request.ttl());
            let fence: i64 = if let Some(fair) = &shared.fair {
                if let Some(handle) = claim_grant(shared, fair, request) {
                    return Ok(Some(handle));
                }
                // A waiter far back in line, not woken since its latest attempt, cannot be
                // first yet: its fallback poll is answered here, refused, as the server would
                // (see `FairLine::behind`).
                if let Some(waiter) = request.waiter()
                    && request.after_wait()
                    && fair.still_behind(waiter)
                {
                    tracing::trace!(key = %key, "far back in line; not asking yet");
                    return Ok(None);
                }
                let [line, line_expiry] = shared.line_keys(&key);
                let ask = |member: String| {
                    ACQUIRE_FAIR.evalsha_with_reload::<fred::types::Value, _, _>(
                        &shared.client,
                        vec![
                            keys.counter.as_str(),
                            keys.owner.as_str(),
                            keys.fence.as_str(),
                            line.as_str(),
                            line_expiry.as_str(),
                        ],
                        vec![
                            request.token().expose().to_string(),
                            ttl_ms.to_string(),
                            member,
                            fair::TURN_CHANNEL.to_owned(),
                            fair.tell_place_from(request.ttl()).to_string(),
                        ],
                    )
                };
                // A waiter's first attempt, until this client has subscribed for turns, asks
                // as a single try (no line to join, nothing to listen for, no subscription to
                // make: as cheap as it gets when nobody waits, and it passes no live line);
                // refused, it lines up at once. Once subscribed (a client that waited before),
                // the first attempt asks in line: the same script when nobody waits, and one
                // round trip less under contention. Later attempts ask in line.
                let mut answer = 0;
                if request.waiter().is_some() && !request.after_wait() && !fair.subscribed() {
                    let value = ask(String::new())
                        .await
                        .map_err(|e| shared.backend_error("acquire", &e))?;
                    answer = gate_answer(value)
                        .map_err(|e| shared.backend_error("acquire", &e))?
                        .0;
                }
                if answer <= 0 {
                    let member = match request.waiter() {
                        Some(waiter) => {
                            let timeout = Duration::from_millis(shared.config.command_timeout);
                            fair.listen(waiter, timeout).await;
                            fair.member(waiter)
                        }
                        None => String::new(),
                    };
                    let sent = Instant::now();
                    let value = ask(member)
                        .await
                        .map_err(|e| shared.backend_error("acquire", &e))?;
                    let (expiry, place);
                    (answer, expiry, place) =
                        gate_answer(value).map_err(|e| shared.backend_error("acquire", &e))?;
                    // The expiry the attempt gave the waiter's place: a grant naming it is one
                    // this waiter may hold (see `claim_grant`).
                    if let (Some(waiter), Some(expiry)) = (request.waiter(), expiry) {
                        fair.anchor(waiter, &key, sent, expiry);
                    }
                    if let Some(waiter) = request.waiter() {
                        fair.behind(waiter, place, sent.elapsed(), request.ttl());
                    }
                }
                if let Some(waiter) = request.waiter() {
                    match u64::try_from(-answer - 1) {
                        Ok(left) => fair.first_in_line(waiter, Duration::from_millis(left)),
                        Err(_) if answer > 0 => fair.forget(waiter),
                        Err(_) => {}
                    }
                }
                answer
            } else {
                ACQUIRE
                    .evalsha_with_reload(
                        &shared.client,
                        vec![
                            keys.counter.as_str(),
                            keys.owner.as_str(),
                            keys.fence.as_str(),
                        ],
                        vec![request.token().expose().to_string(), ttl_ms.to_string()],
                    )
                    .await
                    .map_err(|e| shared.backend_error("acquire", &e))?
            };
            if fence <= 0 {
                return Ok(None);
            }
            Ok(Some(Box::new(IncHandle {
                shared: Arc::clone(shared),
                lease: Lease::from_parts(
                    KeySet::one(key),
                    LeaseKind::Exclusive,
                    request.token().clone(),
                    start + request.ttl(),
                )
                .with_fencing_token(u64::try_from(fence).unwrap_or_default()),
                line_member: String::new(),
                written_until: start + request.ttl(),
            })))
        })
    }

    fn abandon<'a>(&'a self, request: &'a LockRequest) -> lock_core::raw::Answer<'a, Result<bool>> {
        // Marked in the call, before anything is sent: the waiter holds no lock given to it
        // from now on (see `claim_grant`).
        if let (Some(fair), Some(waiter)) = (&self.shared.fair, request.waiter()) {
            fair.taken_back(waiter, request.ttl());
        }
        lock_core::raw::Answer::later(async move {
            // No attempt can have stored such a token (see `try_acquire`): the lock given to a
            // fair line's head, read back from the store, is left alone.
            if redis_kit::is_reservation(request.token()) {
                return Ok(false);
            }
            self.shared.running()?;
            let token = request.token();
            let mut removed = false;
            // A waiter of a fair line leaves it (and the turn passes on if the lock is free).
            let member = match (&self.shared.fair, request.waiter()) {
                (Some(fair), Some(waiter)) => {
                    fair.forget(waiter);
                    fair.member(waiter)
                }
                _ => String::new(),
            };
            for key in request.keys() {
                match release_as(
                    &self.shared,
                    key,
                    token,
                    request.kind(),
                    &member,
                    ScriptSend::Cached,
                )
                .await
                {
                    Ok(released) => removed |= released != Released::Nothing,
                    Err(error) => {
                        let expires_by = Instant::now() + request.ttl();
                        release_later(
                            Arc::clone(&self.shared),
                            key.clone(),
                            token.clone(),
                            request.kind(),
                            expires_by,
                            member,
                        );
                        return Err(error);
                    }
                }
            }
            Ok(removed)
        })
    }

    async fn inspect(&self, key: &Key) -> Result<Vec<KeyState>> {
        let shared = &self.shared;
        shared.running()?;
        let keys = shared.keys(key);
        let mut pttl: i64 = shared
            .client
            .pttl(keys.counter)
            .await
            .map_err(|e| shared.backend_error("pttl", &e))?;
        if pttl == -2 {
            // No holder, but a waiting writer's claim (in the marker) may still keep readers
            // and mutexes out: the key is not free until it goes. (A mutex's owner key expires
            // with its counter, so this only ever finds a claim.)
            pttl = shared
                .client
                .pttl(keys.owner)
                .await
                .map_err(|e| shared.backend_error("pttl", &e))?;
        }
        let holding = redis_kit::holding_from_pttl(pttl);
        // Which server and version: a status display's help, never a reason to fail.
        let server = shared
            .client
            .info::<String>(Some(fred::types::InfoKind::Server))
            .await
            .ok()
            .and_then(|info| redis_kit::server_from_info(&info));
        Ok(vec![KeyState {
            node: shared.config.label(),
            server,
            holding,
        }])
    }

    async fn purge(&self, prefix: &str) -> Result<u64> {
        let shared = &self.shared;
        shared.running()?;
        // Both the configured prefix and the caller's are literal text, not glob patterns.
        let pattern = [
            escape_glob(&shared.prefix).as_str(),
            "{",
            escape_glob(prefix).as_str(),
            "*",
        ]
        .concat();
        if shared.client.is_clustered() {
            return purge_cluster(shared, prefix, &pattern).await;
        }
        let mut cursor = "0".to_owned();
        let mut purged = 0u64;
        loop {
            let (next, found): (String, Vec<fred::types::Key>) = shared
                .client
                .scan_page(cursor.as_str(), pattern.as_str(), Some(PURGE_BATCH), None)
                .await
                .map_err(|e| shared.backend_error("scan", &e))?;
            let locks = purged_locks(&shared.prefix, prefix, &found);
            if !locks.is_empty() {
                let keys: Vec<String> = locks
                    .iter()
                    .flat_map(|key| {
                        let keys = shared.keys(key);
                        [keys.counter, keys.owner]
                    })
                    .collect();
                let removed: u64 = PURGE
                    .evalsha_with_reload(&shared.client, keys, Vec::<String>::new())
                    .await
                    .map_err(|e| shared.backend_error("purge", &e))?;
                purged += removed;
            }
            if next == "0" {
                return Ok(purged);
            }
            cursor = next;
        }
    }

    /// Closes the connection; later calls, those of guards included, fail with
    /// [`LockError::Stopped`], and releases still being sent again in the background stop.
    async fn shutdown(&self) -> Result<()> {
        self.shared.stopped.store(true, Ordering::SeqCst);
        if let Some(listener) = &self.shared.listener {
            listener.close().await;
        }
        self.shared
            .client
            .quit()
            .await
            .map_err(|e| self.shared.backend_error("quit", &e))
    }
}

/// A rustls client configuration that trusts the CA certificates in the PEM file at `path`.
#[cfg(feature = "tls")]
fn tls_with_ca(path: &std::path::Path) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    // The path is shown as a URL would be: a password put there by mistake stays hidden.
    let invalid = |reason: String| {
        LockError::invalid(
            "tls_ca_file",
            format!("{}: {reason}", lock_core::raw::redis::shown_path(path)),
        )
    };
    let mut roots = rustls::RootCertStore::empty();
    // Bounded (a device such as /dev/zero is refused, not read until memory runs out).
    let pem = lock_core::raw::redis::read_ca_file(path)?;
    for certificate in CertificateDer::pem_slice_iter(&pem) {
        roots
            .add(certificate.map_err(|e| invalid(e.to_string()))?)
            .map_err(|e| invalid(e.to_string()))?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The locks a purge of `purge_prefix` takes, among the keys `SCAN` `found` under the
/// configured `prefix`: those whose counter `<prefix>{K}` or owner key `<prefix>{K}:owner` was
/// found, and whose key `K` starts with `purge_prefix` and is one this library accepts
/// (non-empty UTF-8, at most [`lock_core::MAX_KEY_LEN`] bytes). Fencing counters, and keys of
/// any other shape that merely share the prefix, name no lock here: purge leaves them alone.
fn purged_locks(prefix: &str, purge_prefix: &str, found: &[fred::types::Key]) -> BTreeSet<Key> {
    found
        .iter()
        .filter_map(|key| purged_lock(prefix, purge_prefix, key.as_bytes()))
        .collect()
}

/// The lock `K` whose counter or owner key `key` is, when a purge of `purge_prefix` takes it
/// (see [`purged_locks`]).
fn purged_lock(prefix: &str, purge_prefix: &str, key: &[u8]) -> Option<Key> {
    let rest = key.strip_prefix(prefix.as_bytes())?.strip_prefix(b"{")?;
    // Disjoint shapes: a counter ends with `}`, an owner key with `}:owner`, a fencing counter
    // with `}:fence`.
    let user_key = match rest.strip_suffix(b"}") {
        Some(user_key) => user_key,
        None => rest.strip_suffix(b"}:owner")?,
    };
    let user_key = std::str::from_utf8(user_key).ok()?;
    if !user_key.starts_with(purge_prefix) {
        return None;
    }
    Key::new(user_key).ok()
}

/// Purge on a Redis Cluster: `SCAN` on every primary, and each lock's two keys removed
/// together (keys of different locks live in different slots).
async fn purge_cluster(shared: &Shared, purge_prefix: &str, pattern: &str) -> Result<u64> {
    use fred::types::scan::Scanner;
    use futures::TryStreamExt;

    let mut pages = std::pin::pin!(shared.client.scan_cluster(
        pattern.to_owned(),
        Some(PURGE_BATCH),
        None
    ));
    let mut purged = 0u64;
    while let Some(mut page) = pages
        .try_next()
        .await
        .map_err(|e| shared.backend_error("scan", &e))?
    {
        let found = page.take_results().unwrap_or_default();
        let purges = purged_locks(&shared.prefix, purge_prefix, &found)
            .into_iter()
            .map(|key| shared.keys(&key))
            // Keys whose hash tag is empty land in different slots: we cannot have taken
            // such a lock on a cluster, and a script cannot touch both.
            .filter(|keys| {
                fred::types::Key::from(keys.counter.as_str()).cluster_hash()
                    == fred::types::Key::from(keys.owner.as_str()).cluster_hash()
            })
            .map(|keys| {
                PURGE.evalsha_with_reload::<u64, _, _>(
                    &shared.client,
                    vec![keys.counter, keys.owner],
                    Vec::<String>::new(),
                )
            });
        let removed = futures::future::try_join_all(purges)
            .await
            .map_err(|e| shared.backend_error("purge", &e))?;
        purged += removed.iter().sum::<u64>();
        // Dropping the page asks for the next one.
    }
    Ok(purged)
}

/// `prefix` with the glob characters of `SCAN MATCH` escaped, so it matches only itself.
fn escape_glob(prefix: &str) -> String {
    let mut escaped = String::with_capacity(prefix.len());
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// What a release found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Released {
    /// A live lease of ours, now gone.
    Live,
    /// Our lease, found expired (and its leftover entry removed), or our claim taken back.
    Lapsed,
    /// Nothing of ours.
    Nothing,
}

/// Whether the server answered `error` (not a connection that failed or a timeout).
fn server_refused(error: &fred::error::Error) -> bool {
    use fred::error::ErrorKind;
    !matches!(
        error.kind(),
        ErrorKind::IO | ErrorKind::Timeout | ErrorKind::Canceled | ErrorKind::Backpressure
    )
}

/// How a script goes to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ScriptSend {
    /// `EVALSHA`, loading the script on NOSCRIPT: one more round trip after a restart or a
    /// `SCRIPT FLUSH`, which a caller that gave up (a timeout) never makes.
    Cached,
    /// `EVAL` with the whole script: runs wherever and whenever it lands. For the follow-ups
    /// of a release that failed, which a slow server that lost its scripts would otherwise
    /// refuse every time.
    Whole,
}

/// Releases `token`'s lease of `kind` on `key` (or takes back its claim, for a writer), also
/// taking the waiter `member` (empty for none) out of a fair lock's line.
async fn release_as(
    shared: &Shared,
    key: &Key,
    token: &Token,
    kind: LeaseKind,
    member: &str,
    send: ScriptSend,
) -> Result<Released> {
    let keys = shared.keys(key);
    let channel = shared
        .wakeups
        .is_some()
        .then(|| redis_kit::release_channel(&keys.counter));
    let token = token.expose();
    let line_keys: [String; 2];
    let mut call_keys = vec![keys.counter.as_str(), keys.owner.as_str()];
    let (script, mut args) = match kind_letter(kind) {
        None if shared.fair.is_some() => {
            line_keys = shared.line_keys(key);
            call_keys.push(keys.fence.as_str());
            call_keys.extend(line_keys.iter().map(String::as_str));
            (
                &RELEASE_FAIR,
                vec![token.as_str(), member, fair::TURN_CHANNEL],
            )
        }
        None => (&RELEASE, vec![token.as_str()]),
        Some(letter) => (&SHARED_RELEASE, vec![token.as_str(), letter]),
    };
    args.extend(channel.as_deref());
    let released: i64 = match (send, script.lua()) {
        (ScriptSend::Whole, Some(source)) => {
            let whole = shared
                .client
                .eval(source.clone(), call_keys.clone(), args.clone())
                .await;
            match whole {
                // Refused by the server (a user without `EVAL`, say): as a first send.
                Err(error) if server_refused(&error) => {
                    script
                        .evalsha_with_reload(&shared.client, call_keys, args)
                        .await
                }
                answer => answer,
            }
        }
        _ => {
            script
                .evalsha_with_reload(&shared.client, call_keys, args)
                .await
        }
    }
    .map_err(|e| shared.backend_error("release", &e))?;
    Ok(match released {
        1 => Released::Live,
        0 => Released::Nothing,
        _ => Released::Lapsed,
    })
}

/// One attempt at a permit, a read or a write lock (`letter` tells which): the holder set,
/// pruned of expired holders by the server's clock, admits or not in one script.
async fn acquire_shared(
    shared: &Arc<Shared>,
    request: &LockRequest,
    letter: &'static str,
) -> Result<Option<Box<dyn Handle>>> {
    let key = request.primary_key().clone();
    let keys = shared.keys(&key);
    let start = Instant::now();
    let kind = request.kind();
    let extra = match kind {
        LeaseKind::Permit { permits } => permits.to_string(),
        _ => u8::from(request.will_wait()).to_string(),
    };
    let answer: fred::types::Value = SHARED_ACQUIRE
        .evalsha_with_reload(
            &shared.client,
            vec![
                keys.counter.as_str(),
                keys.owner.as_str(),
                keys.fence.as_str(),
            ],
            vec![
                request.token().expose().to_string(),
                validate::ttl_millis(request.ttl()).to_string(),
                letter.to_owned(),
                extra,
            ],
        )
        .await
        .map_err(|e| shared.backend_error("acquire", &e))?;
    let fence = match answer {
        fred::types::Value::Integer(fence) => fence,
        other => {
            let marker = other.as_string().unwrap_or_default();
            return Err(LockError::KindMismatch {
                key: key.to_string(),
                found: describe_marker(&marker),
                asked: kind.to_string(),
            });
        }
    };
    if fence <= 0 {
        return Ok(None);
    }
    Ok(Some(Box::new(IncHandle {
        shared: Arc::clone(shared),
        lease: Lease::from_parts(
            KeySet::one(key),
            kind,
            request.token().clone(),
            start + request.ttl(),
        )
        .with_fencing_token(u64::try_from(fence).unwrap_or_default()),
        line_member: String::new(),
        written_until: start + request.ttl(),
    })))
}

/// What a fair attempt answered: the fencing token when taken, else the gate's answer (0, or
/// -(1 + ms) for the head of the line behind a holder with ms left), with the expiry the attempt
/// gave the waiter's place in line when it renewed one (`{gate, expiry}`).
fn gate_answer(
    value: fred::types::Value,
) -> std::result::Result<(i64, Option<u64>, Option<u64>), fred::error::Error> {
    use fred::types::Value;
    let unexpected = || {
        fred::error::Error::new(
            fred::error::ErrorKind::Parse,
            "unexpected answer to a fair acquisition",
        )
    };
    let number = |value: &i64| u64::try_from(*value).map_err(|_| unexpected());
    match value {
        Value::Integer(answer) => Ok((answer, None, None)),
        Value::Array(parts) => match parts.as_slice() {
            [Value::Integer(answer), Value::Integer(expiry)] => {
                Ok((*answer, Some(number(expiry)?), None))
            }
            [
                Value::Integer(answer),
                Value::Integer(expiry),
                Value::Integer(place),
            ] => Ok((*answer, Some(number(expiry)?), Some(number(place)?))),
            _ => Err(unexpected()),
        },
        _ => Err(unexpected()),
    }
}

/// The lock a fair waiter holds without asking, when the server gave it the lock as it passed
/// the turn (`lua/line_grant.lua`): its latest attempt renewed its place in line to lapse at the
/// expiry the grant names, so the lock, taken for it until then, lives at least a ttl past that
/// attempt's send time, from which its validity counts; the grant names its fencing token. The
/// owner's value (`RESERVED` and the member) is the token, and the release takes the waiter out
/// of the line. Not after a take-back of one of the waiter's attempts (it gives the lock up,
/// maybe after the grant), and not with less than half a ttl left: then the waiter asks, and its
/// attempt takes the lock over.
fn claim_grant(
    shared: &Arc<Shared>,
    fair: &fair::FairLine,
    request: &LockRequest,
) -> Option<Box<dyn Handle>> {
    let waiter = request.waiter()?;
    if !request.after_wait() {
        return None;
    }
    let granted = fair.granted(waiter, request.primary_key())?;
    let fence = granted.fence?;
    let ttl = request.ttl();
    // The entry's expiry was the server's clock floored to the ms, plus the ttl: up to a ms
    // before a ttl past the attempt's arrival.
    let valid_until = granted.sent + ttl.saturating_sub(GRANT_MARGIN);
    if valid_until.saturating_duration_since(Instant::now()) < ttl / 2 {
        return None;
    }
    let member = fair.member(waiter);
    let token = Token::from_stored([redis_kit::RESERVED, member.as_str()].concat()).ok()?;
    fair.forget(waiter);
    tracing::debug!(key = %request.primary_key(), "the turn came with the lock");
    Some(Box::new(IncHandle {
        shared: Arc::clone(shared),
        lease: Lease::from_parts(
            request.key_set().clone(),
            LeaseKind::Exclusive,
            token,
            valid_until,
        )
        .with_fencing_token(fence),
        line_member: member,
        written_until: valid_until,
    }))
}

/// Taken off a granted lock's validity (see `claim_grant`): the server's clock is floored to
/// the ms in the entry's expiry, and a ms more for the clocks' rates.
const GRANT_MARGIN: Duration = Duration::from_millis(2);

impl fmt::Debug for IncLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IncLock")
            .field("config", &self.shared.config)
            .finish()
    }
}

/// A lock held through the INCR backend.
struct IncHandle {
    shared: Arc<Shared>,
    /// One key, the token, validity, fencing token and what is held: a mutex, a permit, a read
    /// or a write lock (a read lock after a downgrade).
    lease: Lease,
    /// The fair line's member this lock was given to as it passed the turn (`claim_grant`),
    /// which its release takes out of the line; empty for any other lock.
    line_member: String,
    /// Until when the key may live on the server, by the writes sent so far (the acquisition,
    /// each extend from the moment it is sent): a failed release is asked again until then. Not
    /// the validity, which may end long before the key does (a downgrade in doubt ends it at
    /// once): the release lost after it was never sent again, and the key stayed for its ttl
    /// (`tests/tests/attack_s32b.rs`).
    written_until: Instant,
}

#[async_trait]
impl Handle for IncHandle {
    fn lease(&self) -> &Lease {
        &self.lease
    }

    async fn extend(&mut self, ttl: Duration) -> Result<()> {
        let shared = &self.shared;
        shared.running()?;
        let keys = shared.keys(self.lease.key());
        let start = Instant::now();
        // From here the server may take the new expiry, whatever becomes of this extend.
        self.written_until = self.written_until.max(start + ttl);
        let token = self.lease.token().expose().to_string();
        let ttl_ms = validate::ttl_millis(ttl).to_string();
        let extended: i64 = match kind_letter(self.lease.kind()) {
            None => {
                EXTEND
                    .evalsha_with_reload(
                        &shared.client,
                        vec![keys.counter.as_str(), keys.owner.as_str()],
                        vec![token, ttl_ms],
                    )
                    .await
            }
            Some(letter) => {
                SHARED_EXTEND
                    .evalsha_with_reload(
                        &shared.client,
                        vec![keys.counter.as_str(), keys.owner.as_str()],
                        vec![token, letter.to_owned(), ttl_ms],
                    )
                    .await
            }
        }
        .map_err(|e| shared.backend_error("extend", &e))?;
        if extended != 1 {
            return Err(LockError::NotHeld {
                key: self.lease.key().to_string(),
            });
        }
        self.lease.set_valid_until(start + ttl);
        Ok(())
    }

    fn release(&mut self) -> lock_core::raw::Answer<'_, Result<()>> {
        lock_core::raw::Answer::later(async move {
            self.shared.running()?;
            let still_valid = self.lease.is_valid();
            let lease = &self.lease;
            let released = release_as(
                &self.shared,
                lease.key(),
                lease.token(),
                lease.kind(),
                &self.line_member,
                ScriptSend::Cached,
            )
            .await;
            match released {
                Ok(Released::Live) if still_valid => Ok(()),
                Ok(_) => Err(LockError::NotHeld {
                    key: self.lease.key().to_string(),
                }),
                Err(error) => {
                    self.release_later();
                    Err(error)
                }
            }
        })
    }

    async fn downgrade(&mut self) -> Result<()> {
        let shared = &self.shared;
        shared.running()?;
        let keys = shared.keys(self.lease.key());
        let channel = shared
            .wakeups
            .is_some()
            .then(|| redis_kit::release_channel(&keys.counter));
        let token = self.lease.token().expose();
        let mut args = vec![token.as_str()];
        args.extend(channel.as_deref());
        let downgraded: i64 = match DOWNGRADE
            .evalsha_with_reload(&shared.client, vec![keys.counter.as_str()], args)
            .await
        {
            Ok(downgraded) => downgraded,
            Err(error) => {
                // In doubt: the script may still run (its answer lost, the server stalled), and
                // then readers get in beside a guard that says "write". The lease ends here, for
                // the guard, its watchdog and the waiters alike, as Redlock's does (old: it
                // stayed valid: `attack_s31b.rs`).
                self.lease.set_valid_until(Instant::now());
                return Err(shared.backend_error("downgrade", &error));
            }
        };
        if downgraded != 1 {
            return Err(LockError::NotHeld {
                key: self.lease.key().to_string(),
            });
        }
        self.lease.set_downgraded();
        Ok(())
    }
}

impl IncHandle {
    /// After a release that failed, asks again in the background (see [`release_later`]).
    fn release_later(&self) {
        release_later(
            Arc::clone(&self.shared),
            self.lease.key().clone(),
            self.lease.token().clone(),
            self.lease.kind(),
            self.written_until,
            self.line_member.clone(),
        );
    }
}

/// Asks again, in the background, for a release that failed, as a [`FollowUp`]: after pauses
/// doubling from the command timeout on, until it is answered or the key would have expired
/// anyway (`expires_by`). Token-checked, so asking twice is harmless. A fair waiter's
/// `member` (empty for none) leaves its line with it.
fn release_later(
    shared: Arc<Shared>,
    key: Key,
    token: Token,
    kind: LeaseKind,
    expires_by: Instant,
    member: String,
) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let timeout = Duration::from_millis(shared.config.command_timeout);
        let follow_up = FollowUp::new(NAME, metrics::OPERATION_RELEASE, timeout, expires_by);
        let running = || shared.running().is_ok();
        follow_up
            .run(vec![key], running, |keys: Vec<Key>| {
                let (shared, token, member) = (&shared, &token, &member);
                async move {
                    let Some(key) = keys.first() else {
                        return keys;
                    };
                    match release_as(shared, key, token, kind, member, ScriptSend::Whole).await {
                        Ok(_) => Vec::new(),
                        Err(error) => {
                            tracing::debug!(%key, error = %redis_kit::shown_error(&error), "release not answered; asking again");
                            keys
                        }
                    }
                }
            })
            .await;
    });
}

impl fmt::Debug for IncHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IncHandle")
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(escape_glob("jobs:"), "jobs:");
        assert_eq!(escape_glob("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }

    #[test]
    fn purge_takes_only_counters_and_owners_of_locks_under_the_prefix() {
        let lock = |prefix: &str, purge_prefix: &str, key: &[u8]| {
            purged_lock(prefix, purge_prefix, key).map(|key| key.as_str().to_owned())
        };
        let some = |key: &str| Some(key.to_owned());
        assert_eq!(lock("lock:", "", b"lock:{x}"), some("x"));
        assert_eq!(lock("lock:", "", b"lock:{x}:owner"), some("x"));
        assert_eq!(lock("lock:", "", b"lock:{x}:fence"), None);
        // The counter of the lock `x}:owner`, and the owner key of the lock `x}:fence`.
        assert_eq!(lock("lock:", "", b"lock:{x}:owner}"), some("x}:owner"));
        assert_eq!(
            lock("lock:", "", b"lock:{x}:fence}:owner"),
            some("x}:fence")
        );
        // Shapes that are no lock's key.
        for key in [
            &b"lock:{x"[..],
            b"lock:{x}tail",
            b"lock:{x}:own",
            b"lock:{x}:ownerz",
            b"lock:{}",
            b"lock:{}:owner",
            b"lock:{\xff}",
            b"lock:x}",
            b"lock:",
            b"other:{x}",
        ] {
            assert_eq!(lock("lock:", "", key), None, "{}", key.escape_ascii());
        }
        // The lock's key, not the Redis key, starts with the purge prefix.
        assert_eq!(lock("lock:", "x}", b"lock:{x}"), None);
        assert_eq!(lock("lock:", "x}:", b"lock:{x}:owner"), None);
        assert_eq!(lock("lock:", "x}", b"lock:{x}}"), some("x}"));
        // The configured prefix is matched byte for byte.
        assert_eq!(lock("[app]:", "", b"a:{x}"), None);
        assert_eq!(lock("[app]:", "", b"[app]:{x}"), some("x"));
        assert_eq!(lock("", "", b"{x}"), some("x"));
        let long = format!("lock:{{{}}}", "k".repeat(lock_core::MAX_KEY_LEN + 1));
        assert_eq!(lock("lock:", "", long.as_bytes()), None);
        // Both keys of one lock name it once.
        let found = [
            fred::types::Key::from("lock:{x}"),
            fred::types::Key::from("lock:{x}:owner"),
            fred::types::Key::from("lock:{x}:fence"),
        ];
        assert_eq!(purged_locks("lock:", "", &found).len(), 1);
    }
}

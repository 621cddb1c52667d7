//! Runs a case against the backend and the reference model side by side.
//!
//! The model knows, for every lock a step handed out: its stored keys (what the store calls
//! them, so keys that collide in the store collide here), which of them a purge or an
//! observation took away, when it surely still holds and when it is surely gone (see
//! [`ModelLock::status`]), and whether a watchdog keeps it alive. Each step computes the
//! outcomes the model allows, compares, and updates the model from what actually happened when
//! more than one outcome was allowed.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use lock_core::{
    Capabilities, Holding, LeaseKind, LockError, LockGuard, LockOptions, Locker, LostSignal,
    MAX_KEY_LEN, RetryPolicy,
};
use tokio::time::Instant;

use super::case::{Case, ClientSpec, LeaseOp, Op, Text, Ttl, advance_by};
use super::{
    AfterStop, ClientSetup, KEY_POOL, MAX_NAMESPACE_LEN, MAX_PREFIX_LEN, NAMESPACE_POOL, Naming,
    PREFIX_POOL, Refusal, Target, Timing,
};

/// How long a background release (a dropped guard) may take on real servers.
const SETTLE: Duration = Duration::from_secs(1);

/// After the latest moment a store can have set an expiry, how long until the key is surely
/// gone on real servers (expiry has millisecond resolution; clocks are read on both sides).
const LATE: Duration = Duration::from_millis(15);

/// The most keys one probe asks about.
const MAX_PROBES: usize = 12;

/// The default inc prefix, used when a drawn one is refused.
const DEFAULT_PREFIX: &str = "lock:";

/// Before its ttl has passed, how early a lock may stop counting as held on real servers: the
/// validity Redlock hands out is the ttl less 1 % and 2 ms, and both clocks are read once.
fn early(ttl: Duration) -> Duration {
    ttl / 50 + Duration::from_millis(5)
}

/// What a step returned, as the model compares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// `Locked`, or `Ok(None)` from `try_acquire`.
    Held,
    NotHeld,
    Invalid,
    Stopped,
    Unsupported,
    /// `KindMismatch`: the key is in use as another kind of lock.
    Mismatch,
    /// Any other error (backend, quorum, timeout).
    Failed,
}

fn outcome_of(error: &LockError) -> Outcome {
    match error {
        LockError::Locked { .. } => Outcome::Held,
        LockError::NotHeld { .. } => Outcome::NotHeld,
        LockError::InvalidInput { .. } => Outcome::Invalid,
        LockError::Stopped => Outcome::Stopped,
        LockError::Unsupported { .. } => Outcome::Unsupported,
        LockError::KindMismatch { .. } => Outcome::Mismatch,
        _ => Outcome::Failed,
    }
}

/// Whether a lock holds, as far as the model can tell at a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Status {
    Dead,
    Unknown,
    Live,
}

/// What a watchdog does for the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeepMode {
    /// It keeps a lock that was held: held while no loss is reported.
    Saving,
    /// It may or may not keep the lock (it was about to expire, or lost a key to a purge, or its
    /// client was stopped): unknown until a loss is reported.
    Gamble,
    /// It cannot change anything the model says (the lock was already gone).
    Idle,
}

struct Keep {
    lost: LostSignal,
    /// The ttl the watchdog extends by.
    ttl: Duration,
    mode: KeepMode,
    /// The latest local validity the watchdog can have set so far.
    valid_hi: Instant,
    /// The loss must be reported by then.
    lost_by: Option<Instant>,
}

/// One lock the backend handed out.
struct ModelLock {
    client: usize,
    /// Stored keys: what the store calls the keys (namespace and, for inc, prefix included).
    ids: Vec<String>,
    /// Namespaced keys, as the guard reports them.
    keys: Vec<String>,
    /// The keys as the client named them (before its namespace).
    raw: Vec<String>,
    /// Per key: taken away by a purge (or, once a purge took some, found free).
    taken: Vec<bool>,
    /// Per key: the store may still keep an entry for this lock (bounds purge's count).
    entry: Vec<bool>,
    /// Released, dropped (in process), taken over, or found expired.
    dead: bool,
    /// Surely held while a step ends before this.
    live_until: Option<Instant>,
    /// Surely gone once a step starts at or after this.
    dead_from: Option<Instant>,
    ttl: Duration,
    /// The guard's local validity is known to have passed.
    guard_invalid: bool,
    keep: Option<Keep>,
    /// `keep_alive` was called on its guard.
    watched: bool,
    fence: Option<u64>,
    /// What it holds: a mutex, a permit, a read or a write lock (a downgrade turns the last
    /// into a read lock).
    kind: LeaseKind,
}

/// What a kind of lease is among the kinds a key can be used as: a mutex, a semaphore of one
/// size, or a read-write lock. A key is used as one family at a time.
fn family(kind: LeaseKind) -> (u8, u32) {
    match kind {
        LeaseKind::Permit { permits } => (1, permits.get()),
        LeaseKind::Read | LeaseKind::Write => (2, 0),
        _ => (0, 0),
    }
}

/// Whether a holder of `held` keeps a new lease of `asked` (of the same family) out.
fn excludes(held: LeaseKind, asked: LeaseKind) -> bool {
    !(held == LeaseKind::Read && asked == LeaseKind::Read)
}

impl ModelLock {
    /// Whether the lock holds (all keys alike) for a step from `start` to `end`.
    fn status(&self, start: Instant, end: Instant) -> Status {
        if self.dead {
            return Status::Dead;
        }
        if let Some(keep) = &self.keep {
            match keep.mode {
                KeepMode::Saving => return Status::Live,
                KeepMode::Gamble => return Status::Unknown,
                KeepMode::Idle => {}
            }
        }
        if self.live_until.is_some_and(|until| end < until) {
            Status::Live
        } else if self.dead_from.is_some_and(|from| start >= from) {
            Status::Dead
        } else {
            Status::Unknown
        }
    }

    fn status_of(&self, id: usize, start: Instant, end: Instant) -> Status {
        if self.taken[id] {
            Status::Dead
        } else {
            self.status(start, end)
        }
    }

    fn any_taken(&self) -> bool {
        self.taken.iter().any(|taken| *taken)
    }

    fn kill(&mut self) {
        self.dead = true;
        self.keep = None;
    }

    /// The store was seen without this lock on `ids`. Its keys share one expiry (even after a
    /// purge took some of them: a failed extend puts back what it moved, see the test
    /// `a_failed_extend_leaves_every_key_as_it_was`), so seen free on a key no purge took, it
    /// has expired; keys a purge took that are seen free are marked so.
    fn found_free(&mut self, ids: &[String]) {
        let expired = self
            .ids
            .iter()
            .zip(&self.taken)
            .any(|(id, taken)| !taken && ids.contains(id));
        if expired {
            self.kill();
            return;
        }
        for (i, id) in self.ids.iter().enumerate() {
            if ids.contains(id) {
                self.taken[i] = true;
            }
        }
    }
}

struct Client {
    locker: Locker,
    /// The default ttl of its calls.
    ttl: Ttl,
    namespace: Option<String>,
    prefix: String,
    caps: Capabilities,
    stopped: bool,
}

/// A guard the case still holds, and the model lock it stands for.
struct Slot {
    guard: LockGuard,
    lock: usize,
}

struct Run<'a, T> {
    target: &'a T,
    timing: Timing,
    naming: Naming,
    clients: Vec<Client>,
    slots: Vec<Slot>,
    locks: Vec<ModelLock>,
    fences: HashMap<String, u64>,
    transcript: String,
    tally: &'a mut Tally,
}

/// The text of a key, or the reason it must be refused.
fn namespaced(namespace: Option<&str>, key: &str) -> Option<String> {
    if key.is_empty() {
        return None;
    }
    let full = match namespace {
        Some(namespace) => format!("{namespace}:{key}"),
        None => key.to_owned(),
    };
    (full.len() <= MAX_KEY_LEN).then_some(full)
}

/// The longest key that fits under `namespace`.
fn key_limit(namespace: Option<&str>) -> usize {
    MAX_KEY_LEN - namespace.map_or(0, |namespace| namespace.len() + 1)
}

/// A short, readable rendering of a possibly very long text.
fn show(text: &str) -> String {
    if text.len() <= 40 {
        return format!("{text:?}");
    }
    let head: String = text.chars().take(12).collect();
    format!("{head:?}…({} bytes)", text.len())
}

fn show_all(texts: &[String]) -> String {
    let shown: Vec<String> = texts.iter().map(|text| show(text)).collect();
    format!("[{}]", shown.join(", "))
}

fn describe<T>(result: &Result<T, LockError>, ok: impl FnOnce(&T) -> String) -> String {
    match result {
        Ok(value) => ok(value),
        Err(error) => format!("Err({error})"),
    }
}

/// How often each kind of step ended each way, over the cases of a run.
pub(super) type Tally = std::collections::BTreeMap<String, u64>;

pub(super) async fn run_case<T: Target>(
    target: &T,
    case: &Case,
    step_timeout: Duration,
    tally: &mut Tally,
) -> Result<(), String> {
    let mut run = Run {
        target,
        timing: target.timing(),
        naming: target.naming(),
        clients: Vec::new(),
        slots: Vec::new(),
        locks: Vec::new(),
        fences: HashMap::new(),
        transcript: String::new(),
        tally,
    };
    if let Err(why) = run.connect(&case.clients).await {
        return Err(run.failed(why));
    }
    for (index, op) in case.ops.iter().enumerate() {
        let _ = write!(run.transcript, "  #{index:<2} ");
        let timing = run.timing;
        let step = run.step(op);
        let result = match timing {
            Timing::Exact => step.await,
            Timing::Real => match tokio::time::timeout(step_timeout, step).await {
                Ok(result) => result,
                Err(_) => Err(format!("the step did not finish within {step_timeout:?}")),
            },
        };
        // Compare the whole store with the model: after every step in process, after time
        // passed and at the end on real servers.
        let last = index + 1 == case.ops.len();
        let probe = timing == Timing::Exact || last || matches!(op, Op::Advance { .. });
        let result = match result {
            Ok(()) if probe => run.probe().await,
            other => other,
        };
        if let Err(why) = result {
            return Err(run.failed(why));
        }
    }
    Ok(())
}

impl<T: Target> Run<'_, T> {
    fn failed(&self, why: String) -> String {
        let mut text = String::from("clients:\n");
        for (index, client) in self.clients.iter().enumerate() {
            let _ = writeln!(
                text,
                "  c{index}: namespace {}, prefix {}{}",
                client.namespace.as_deref().map_or("none".to_owned(), show),
                show(&client.prefix),
                if client.stopped { ", stopped" } else { "" }
            );
        }
        text.push_str("steps:\n");
        text.push_str(&self.transcript);
        let _ = writeln!(text, "\n  ✗ {why}");
        text.push_str("model:\n");
        let now = Instant::now();
        for (index, lock) in self.locks.iter().enumerate() {
            let _ = writeln!(
                text,
                "  lock#{index} of c{} ({}) on {} (stored {}): {:?}{}{}, fence {:?}",
                lock.client,
                lock.kind,
                show_all(&lock.keys),
                show_all(&lock.ids),
                lock.status(now, now),
                if lock.any_taken() {
                    format!(", taken {:?}", lock.taken)
                } else {
                    String::new()
                },
                lock.keep
                    .as_ref()
                    .map_or(String::new(), |keep| format!(", kept ({:?})", keep.mode)),
                lock.fence
            );
        }
        text
    }

    fn log(&mut self, line: impl AsRef<str>) {
        self.transcript.push_str(line.as_ref());
        self.transcript.push('\n');
    }

    /// Counts a step: `kind` (e.g. `release`) and how it ended.
    fn count(&mut self, kind: &str, ended: impl std::fmt::Debug) {
        *self.tally.entry(format!("{kind}: {ended:?}")).or_default() += 1;
    }

    /// Builds the clients, checking that bad namespaces and prefixes are refused.
    async fn connect(&mut self, specs: &[ClientSpec]) -> Result<(), String> {
        for (index, spec) in specs.iter().enumerate() {
            let mut prefix = spec.prefix.resolve(PREFIX_POOL, MAX_PREFIX_LEN);
            let prefix_valid = prefix.len() <= MAX_PREFIX_LEN;
            let mut setup = ClientSetup {
                prefix: prefix.clone(),
                fencing: spec.fencing,
            };
            let backend = match self.target.backend(&setup).await {
                Ok(backend) => backend,
                Err(LockError::InvalidInput { .. })
                    if !prefix_valid && self.naming == Naming::HashTagged =>
                {
                    self.log(format!(
                        "c{index}: prefix {} refused as expected; using {DEFAULT_PREFIX:?}",
                        show(&prefix)
                    ));
                    prefix = DEFAULT_PREFIX.to_owned();
                    setup.prefix = prefix.clone();
                    self.target
                        .backend(&setup)
                        .await
                        .map_err(|error| format!("c{index}: backend: {error}"))?
                }
                Err(error) => return Err(format!("c{index}: backend: {error}")),
            };
            if !prefix_valid && self.naming == Naming::HashTagged && prefix != DEFAULT_PREFIX {
                return Err(format!(
                    "c{index}: the prefix {} ({} bytes) was accepted",
                    show(&prefix),
                    prefix.len()
                ));
            }
            let options = LockOptions::default()
                .with_ttl(spec.ttl.duration(self.timing))
                .with_retry(RetryPolicy::none());
            let locker = Locker::from_arc(backend)
                .with_options(options)
                .map_err(|error| format!("c{index}: options: {error}"))?;
            let namespace = spec
                .namespace
                .as_ref()
                .map(|text| text.resolve(NAMESPACE_POOL, MAX_NAMESPACE_LEN));
            let valid = namespace
                .as_ref()
                .is_none_or(|ns| !ns.is_empty() && ns.len() <= MAX_NAMESPACE_LEN);
            let shown = namespace.as_deref().map_or("none".to_owned(), show);
            let (locker, namespace) = match locker.clone().with_namespace(namespace.as_deref()) {
                Ok(locker) if valid => (locker, namespace),
                Err(LockError::InvalidInput { .. }) if !valid => {
                    self.log(format!(
                        "c{index}: namespace {shown} refused as expected; using none"
                    ));
                    (locker, None)
                }
                Ok(_) => return Err(format!("c{index}: the namespace {shown} was accepted")),
                Err(error) => {
                    return Err(format!(
                        "c{index}: the namespace {shown} was refused: {error}"
                    ));
                }
            };
            let caps = locker.capabilities();
            self.clients.push(Client {
                locker,
                ttl: spec.ttl,
                namespace,
                prefix,
                caps,
                stopped: false,
            });
        }
        Ok(())
    }

    /// What the store calls the namespaced key `key` of `client`.
    fn stored(&self, client: usize, key: &str) -> String {
        match self.naming {
            Naming::Plain => key.to_owned(),
            Naming::HashTagged => [self.clients[client].prefix.as_str(), "{", key, "}"].concat(),
        }
    }

    /// Whether a purge by `client` of the (namespaced) `prefix` covers the stored key `id`.
    fn purge_covers(&self, client: usize, prefix: &str, id: &str) -> bool {
        match self.naming {
            Naming::Plain => id.starts_with(prefix),
            Naming::HashTagged => id
                .strip_prefix(self.clients[client].prefix.as_str())
                .and_then(|rest| rest.strip_prefix('{'))
                .and_then(|rest| rest.strip_suffix('}'))
                .is_some_and(|key| key.starts_with(prefix)),
        }
    }

    fn key_text(&self, client: usize, key: &Text) -> String {
        let namespace = self.clients[client].namespace.as_deref();
        key.resolve(KEY_POOL, key_limit(namespace))
    }

    fn margin_late(&self) -> Duration {
        match self.timing {
            Timing::Exact => Duration::from_millis(1),
            Timing::Real => LATE,
        }
    }

    /// How long after its lock's latest possible validity a watchdog may take to report the
    /// loss: on real servers it may be in the middle of an extension that waits out the
    /// targets' node or command timeout (at most 2 s).
    fn loss_slack(&self) -> Duration {
        match self.timing {
            Timing::Exact => Duration::from_millis(2),
            Timing::Real => Duration::from_secs(2) + LATE,
        }
    }

    /// The index of the guard a step names, if the case holds any.
    fn slot(&self, guard: usize) -> Option<usize> {
        (!self.slots.is_empty()).then(|| guard % self.slots.len())
    }

    /// Reads the watchdogs' loss reports.
    fn watch(&mut self, now: Instant) -> Result<(), String> {
        let timing = self.timing;
        let late = self.margin_late();
        for (index, lock) in self.locks.iter_mut().enumerate() {
            let held = !lock.dead && !lock.any_taken();
            let Some(keep) = &mut lock.keep else { continue };
            if keep.mode == KeepMode::Idle {
                continue;
            }
            keep.valid_hi = keep.valid_hi.max(now + keep.ttl);
            if keep.lost.is_lost() {
                if keep.mode == KeepMode::Saving && held {
                    if timing == Timing::Exact {
                        return Err(format!(
                            "the watchdog of lock#{index} reported it lost, but nothing took it"
                        ));
                    }
                    println!(
                        "note: the watchdog of lock#{index} lost it on a real server (late extension?)"
                    );
                }
                let dead_from = keep.valid_hi + late;
                keep.mode = KeepMode::Idle;
                lock.live_until = None;
                lock.dead_from = Some(dead_from);
            } else if let Some(by) = keep.lost_by
                && now > by
            {
                return Err(format!(
                    "the watchdog of lock#{index} has not reported its loss (due by {:?} ago)",
                    now - by
                ));
            }
        }
        Ok(())
    }

    /// Whether every lock of `holders` that the model has as held is held only through its
    /// watchdog, on real servers, and the watchdog reports it lost within twice its ttl: a
    /// watchdog delayed past the expiry (a busy machine) loses the lock, and must say so. Such
    /// locks then count as expired.
    async fn late_watchdog(&mut self, holders: &[(usize, Status)]) -> bool {
        if self.timing != Timing::Real {
            return false;
        }
        for (index, status) in holders {
            if *status != Status::Live {
                continue;
            }
            let Some(keep) = &self.locks[*index].keep else {
                return false;
            };
            if keep.mode != KeepMode::Saving {
                return false;
            }
            let (lost, wait) = (keep.lost.clone(), keep.ttl * 2 + Duration::from_millis(100));
            if tokio::time::timeout(wait, lost.lost()).await.is_err() {
                return false;
            }
            println!("note: the watchdog of lock#{index} was late, and reported the loss");
            self.locks[*index].kill();
        }
        true
    }

    /// A lock whose watchdog can no longer keep it (a key was taken, or its client stopped).
    fn doom_keep(&mut self, lock: usize, now: Instant) {
        let slack = self.loss_slack();
        if let Some(keep) = &mut self.locks[lock].keep
            && keep.mode != KeepMode::Idle
        {
            keep.valid_hi = keep.valid_hi.max(now + keep.ttl);
            keep.mode = KeepMode::Gamble;
            keep.lost_by = Some(keep.valid_hi + slack);
        }
    }

    /// The watchdog of `lock` stops (its guard was released or dropped): the lock keeps the
    /// latest expiry the watchdog may have set.
    fn end_keep(&mut self, lock: usize, now: Instant) {
        let late = self.margin_late();
        let lock = &mut self.locks[lock];
        if let Some(keep) = lock.keep.take()
            && keep.mode != KeepMode::Idle
        {
            lock.live_until = None;
            lock.dead_from = Some(keep.valid_hi.max(now + keep.ttl) + late);
        }
    }

    async fn step(&mut self, op: &Op) -> Result<(), String> {
        let now = Instant::now();
        self.watch(now)?;
        match op {
            Op::Acquire { client, key, ttl } => {
                let key = self.key_text(*client, key);
                self.acquire(*client, vec![key], Call::One(*ttl)).await
            }
            Op::TryAcquire { client, key } => {
                let key = self.key_text(*client, key);
                self.acquire(*client, vec![key], Call::Try).await
            }
            Op::AcquireMany { client, keys } => {
                let keys = keys.iter().map(|key| self.key_text(*client, key)).collect();
                self.acquire(*client, keys, Call::Many).await
            }
            Op::Extend { guard, ttl } => self.extend(*guard, *ttl).await,
            Op::Release { guard } => self.release(*guard).await,
            Op::Drop { guard } => {
                self.drop_guard(*guard);
                Ok(())
            }
            Op::KeepAlive { guard } => self.keep_alive(*guard),
            Op::Purge { client, prefix } => self.purge(*client, prefix).await,
            Op::Inspect { client, key } => self.inspect(*client, key).await,
            Op::Stop { client } => self.stop(*client).await,
            Op::Lease {
                client,
                key,
                kind,
                attempt_once,
            } => {
                let key = self.key_text(*client, key);
                self.acquire_lease(*client, key, *kind, *attempt_once).await
            }
            Op::Downgrade { guard } => self.downgrade(*guard).await,
            Op::Advance { step } => {
                let by = advance_by(*step, self.timing);
                self.log(format!("advance {by:?}"));
                tokio::time::sleep(by).await;
                self.watch(Instant::now())
            }
        }
    }

    /// The locks that may hold any of `ids` for a step from `start` to `end`, each with its
    /// strongest status over those keys.
    fn holders(&self, ids: &[String], start: Instant, end: Instant) -> Vec<(usize, Status)> {
        let mut found = Vec::new();
        for (index, lock) in self.locks.iter().enumerate() {
            let status = lock
                .ids
                .iter()
                .enumerate()
                .filter(|(_, id)| ids.contains(id))
                .map(|(i, _)| lock.status_of(i, start, end))
                .max();
            if let Some(status) = status
                && status != Status::Dead
            {
                found.push((index, status));
            }
        }
        found
    }

    async fn acquire(&mut self, client: usize, raw: Vec<String>, call: Call) -> Result<(), String> {
        let timing = self.timing;
        let c = &self.clients[client];
        let namespace = c.namespace.clone();
        let keys: Vec<Option<String>> = raw
            .iter()
            .map(|key| namespaced(namespace.as_deref(), key))
            .collect();
        let valid_keys: Vec<String> = keys.iter().flatten().cloned().collect();
        let repeated = valid_keys.iter().collect::<BTreeSet<_>>().len() < valid_keys.len();
        let ttl = match call {
            Call::One(Some(ttl)) => ttl,
            _ => c.ttl,
        };
        let invalid = keys.iter().any(Option::is_none)
            || raw.is_empty()
            || repeated
            || matches!(call, Call::One(Some(ttl)) if !ttl.is_valid());
        let label = match call {
            Call::One(None) => format!("c{client}.acquire({})", show(&raw[0])),
            Call::One(Some(ttl)) => format!(
                "c{client}.acquire_with({}, ttl {:?})",
                show(&raw[0]),
                ttl.duration(timing)
            ),
            Call::Try => format!("c{client}.try_acquire({})", show(&raw[0])),
            Call::Many => format!("c{client}.acquire_many({})", show_all(&raw)),
        };
        let ttl = ttl.duration(timing);
        let start = Instant::now();
        let result: Result<Option<LockGuard>, LockError> = match call {
            Call::One(None) => c.locker.acquire(&raw[0]).await.map(Some),
            Call::One(Some(t)) => {
                let options = LockOptions::default()
                    .with_ttl(t.duration(timing))
                    .with_retry(RetryPolicy::none());
                c.locker.acquire_with(&raw[0], &options).await.map(Some)
            }
            Call::Try => match c.locker.try_acquire(&raw[0]).await {
                Ok(None) => Err(LockError::Locked { key: String::new() }),
                Ok(Some(guard)) => Ok(Some(guard)),
                Err(LockError::Locked { key }) => Err(LockError::backend(
                    "model",
                    format!("try_acquire returned Locked for `{key}` instead of Ok(None)"),
                )),
                Err(error) => Err(error),
            },
            Call::Many => {
                let refs: Vec<&str> = raw.iter().map(String::as_str).collect();
                c.locker.acquire_many(&refs).await.map(Some)
            }
        };
        let end = Instant::now();
        let shown = match (&result, call) {
            (Err(LockError::Locked { .. }), Call::Try) => "Ok(None)".to_owned(),
            _ => describe(&result, |guard| match guard {
                Some(guard) => format!("Ok(fence {:?})", guard.fencing_token()),
                None => "Ok(None)".to_owned(),
            }),
        };
        self.log(format!("{label} -> {shown}"));
        let got = match &result {
            Ok(_) => Outcome::Ok,
            Err(error) => outcome_of(error),
        };
        let kind = match call {
            Call::One(None) => "acquire",
            Call::One(Some(_)) => "acquire_with",
            Call::Try => "try_acquire",
            Call::Many if valid_keys.len() > 1 => "acquire_many (several keys)",
            Call::Many => "acquire_many",
        };
        self.count(kind, got);
        let c = &self.clients[client];
        // Refusals before any I/O.
        let stopped = c.stopped;
        let unsupported = valid_keys.len() > 1 && !c.caps.multi_key;
        if invalid || stopped {
            let mut allowed = Vec::new();
            if invalid {
                allowed.push(Outcome::Invalid);
            }
            if stopped {
                allowed.push(Outcome::Stopped);
            }
            return expect(got, &allowed, &result_error(&result));
        }
        if unsupported {
            return expect(got, &[Outcome::Unsupported], &result_error(&result));
        }
        let ids: Vec<String> = valid_keys
            .iter()
            .map(|key| self.stored(client, key))
            .collect();
        if self.target.cluster()
            && self.naming == Naming::HashTagged
            && ids.iter().any(|id| empty_hash_tag(id))
        {
            return expect(got, &[Outcome::Failed], &result_error(&result));
        }
        let holders = self.holders(&ids, start, end);
        let live = holders.iter().find(|(_, status)| *status == Status::Live);
        // (For one key: several are taken in an order, and another key may be found held
        // first.)
        if let Some((holder, _)) = live
            && self.locks[*holder].kind != LeaseKind::Exclusive
            && ids.len() == 1
        {
            let held = self.locks[*holder].kind;
            self.count(&format!("a mutex asked, {held} live"), got);
            refused_as(
                self.target.other_kind_refusal(LeaseKind::Exclusive),
                got,
                &result_error(&result),
            )?;
        }
        let unknown = holders.iter().any(|(_, status)| *status == Status::Unknown);
        // On real servers an attempt that took most of its ttl may hand out no lock.
        let slow = timing == Timing::Real && (end - start) + early(ttl) >= ttl;
        match result {
            Ok(Some(guard)) => {
                if let Some((holder, _)) = live
                    && !self.late_watchdog(&holders).await
                {
                    return Err(format!(
                        "acquired {} while lock#{holder} holds it",
                        show_all(&valid_keys)
                    ));
                }
                for (holder, _) in &holders {
                    // It had expired: found free.
                    self.locks[*holder].found_free(&ids);
                }
                self.won(
                    client,
                    guard,
                    LeaseKind::Exclusive,
                    (raw, valid_keys, ids),
                    ttl,
                    start,
                    end,
                )
            }
            Err(LockError::Locked { key }) => {
                if live.is_none() && !unknown && !slow {
                    return Err(format!(
                        "{} found held, but the model has it free",
                        show_all(&valid_keys)
                    ));
                }
                if matches!(call, Call::One(_) | Call::Many) && key != valid_keys[0] {
                    return Err(format!(
                        "Locked names {}, not the first key {}",
                        show(&key),
                        show(&valid_keys[0])
                    ));
                }
                Ok(())
            }
            // A key in use as another kind: refused as held or as a mismatch (see `LeaseKind`),
            // only while a lease of another kind may hold it.
            Err(LockError::KindMismatch { .. }) => {
                let other = holders
                    .iter()
                    .any(|(holder, _)| self.locks[*holder].kind != LeaseKind::Exclusive);
                if other {
                    Ok(())
                } else {
                    Err(format!(
                        "{} refused as used as another kind, but the model has no other kind there",
                        show_all(&valid_keys)
                    ))
                }
            }
            Err(error) if slow && outcome_of(&error) == Outcome::Failed => {
                println!("note: a slow attempt ({:?}) failed: {error}", end - start);
                Ok(())
            }
            Err(error) => Err(format!("unexpected error: {error}")),
            Ok(None) => Err("no guard and no error".to_owned()),
        }
    }

    /// A guard handed out for `kind` on `names` (the keys as named, namespaced and stored).
    #[allow(clippy::too_many_arguments)]
    fn won(
        &mut self,
        client: usize,
        guard: LockGuard,
        kind: LeaseKind,
        names: (Vec<String>, Vec<String>, Vec<String>),
        ttl: Duration,
        start: Instant,
        end: Instant,
    ) -> Result<(), String> {
        let (raw, keys, ids) = names;
        let got: Vec<&str> = guard.keys().iter().map(|key| key.as_str()).collect();
        if got != keys.iter().map(String::as_str).collect::<Vec<_>>() {
            return Err(format!("the guard holds {got:?}, not {}", show_all(&keys)));
        }
        if guard.kind() != kind {
            return Err(format!("the guard holds {}, not {kind}", guard.kind()));
        }
        let fence = guard.fencing_token();
        let fencing = self.clients[client].caps.fencing;
        if fence.is_some() != fencing {
            return Err(format!(
                "fencing capability {fencing} but the guard's fencing token is {fence:?}"
            ));
        }
        if let Some(fence) = fence {
            for id in &ids {
                if let Some(last) = self.fences.get(id)
                    && fence <= *last
                {
                    return Err(format!(
                        "fencing token {fence} for {} is not above the previous holder's {last}",
                        show(id)
                    ));
                }
                self.fences.insert(id.clone(), fence);
            }
        }
        let (live_until, dead_from) = match self.timing {
            Timing::Exact => {
                if guard.valid_until() != start + ttl {
                    return Err(format!(
                        "the guard is valid for {:?}, not its ttl {ttl:?}",
                        guard.valid_until() - start
                    ));
                }
                (start + ttl, start + ttl)
            }
            Timing::Real => (start + ttl - early(ttl), end + ttl + LATE),
        };
        // Earlier locks on these keys no longer have an entry there, but for shared holders
        // (permits, readers) that may still hold beside this lease.
        for lock in &mut self.locks {
            let beside = kind != LeaseKind::Exclusive && lock.status(start, end) != Status::Dead;
            for (i, id) in lock.ids.iter().enumerate() {
                if ids.contains(id) && (lock.taken[i] || !beside) {
                    lock.entry[i] = false;
                }
            }
        }
        let count = ids.len();
        self.locks.push(ModelLock {
            client,
            ids,
            keys,
            raw,
            taken: vec![false; count],
            entry: vec![true; count],
            dead: false,
            live_until: Some(live_until),
            dead_from: Some(dead_from),
            ttl,
            guard_invalid: false,
            keep: None,
            watched: false,
            fence,
            kind,
        });
        self.slots.push(Slot {
            guard,
            lock: self.locks.len() - 1,
        });
        Ok(())
    }

    /// Whether the guard of `lock` can no longer reach its store (its client was stopped).
    fn guard_stopped(&self, lock: usize) -> bool {
        self.clients[self.locks[lock].client].stopped
            && self.target.guards_after_stop() != AfterStop::Work
    }

    async fn extend(&mut self, guard: usize, ttl: Ttl) -> Result<(), String> {
        let Some(index) = self.slot(guard) else {
            self.log("extend: no guard held");
            return Ok(());
        };
        let duration = ttl.duration(self.timing);
        let lock = self.slots[index].lock;
        let start = Instant::now();
        let result = self.slots[index].guard.extend(duration).await;
        let end = Instant::now();
        self.log(format!(
            "lock#{lock}.extend({duration:?}) -> {}",
            describe(&result, |()| "Ok".to_owned())
        ));
        let got = result.as_ref().err().map_or(Outcome::Ok, outcome_of);
        self.count("extend", got);
        let error = result.as_ref().err().map(ToString::to_string);
        if !ttl.is_valid() {
            return expect(got, &[Outcome::Invalid], &error);
        }
        let status = self.locks[lock].status(start, end);
        self.count("extend of a lock the model has", status);
        if self.locks[lock].any_taken() && !self.locks[lock].taken.iter().all(|t| *t) {
            self.count("extend of a partly purged lock", status);
        }
        if self.guard_stopped(lock) {
            // The local validity is checked first: a lapsed lock, or one an earlier extend found
            // lost (which ends its validity), is refused as not held.
            let stopped = Outcome::Stopped;
            let allowed = if status == Status::Live && !self.locks[lock].guard_invalid {
                vec![stopped]
            } else {
                vec![stopped, Outcome::NotHeld]
            };
            return expect(got, &allowed, &error);
        }
        let model = &self.locks[lock];
        let allowed: &[Outcome] = if model.guard_invalid || model.any_taken() {
            &[Outcome::NotHeld]
        } else {
            match status {
                Status::Live => &[Outcome::Ok],
                Status::Dead => &[Outcome::NotHeld],
                Status::Unknown => &[Outcome::Ok, Outcome::NotHeld],
            }
        };
        expect(got, allowed, &error)?;
        let timing = self.timing;
        let model = &mut self.locks[lock];
        match got {
            Outcome::Ok => {
                model.ttl = duration;
                match timing {
                    Timing::Exact => {
                        model.live_until = Some(start + duration);
                        model.dead_from = Some(start + duration);
                    }
                    Timing::Real => {
                        model.live_until = Some(start + duration - early(duration));
                        model.dead_from = Some(end + duration + LATE);
                    }
                }
                if let Some(keep) = &mut model.keep {
                    // The watchdog re-plans from this validity, even a shorter one (the test
                    // `a_shorter_extend_of_a_kept_alive_guard_keeps_it_alive`): a lock it saves
                    // stays saved.
                    keep.valid_hi = keep.valid_hi.max(end + duration);
                }
            }
            // A failed extend leaves every key as it was, even of a partly purged lock (the
            // test `a_failed_extend_leaves_every_key_as_it_was`).
            _ => model.guard_invalid = true,
        }
        Ok(())
    }

    async fn release(&mut self, guard: usize) -> Result<(), String> {
        let Some(index) = self.slot(guard) else {
            self.log("release: no guard held");
            return Ok(());
        };
        let slot = self.slots.remove(index);
        let lock = slot.lock;
        let start = Instant::now();
        let result = slot.guard.release().await;
        let end = Instant::now();
        self.log(format!(
            "lock#{lock}.release() -> {}",
            describe(&result, |()| "Ok".to_owned())
        ));
        let got = result.as_ref().err().map_or(Outcome::Ok, outcome_of);
        self.count("release", got);
        let error = result.as_ref().err().map(ToString::to_string);
        let status = self.locks[lock].status(start, end);
        self.count("release of a lock the model has", status);
        if self.guard_stopped(lock) {
            // Nothing reaches the store: the lock stays until it expires.
            self.end_keep(lock, end);
            return expect(got, &[Outcome::Stopped], &error);
        }
        let model = &self.locks[lock];
        let allowed: &[Outcome] = if model.any_taken() {
            &[Outcome::NotHeld]
        } else {
            match status {
                Status::Live => &[Outcome::Ok],
                Status::Dead => &[Outcome::NotHeld],
                Status::Unknown => &[Outcome::Ok, Outcome::NotHeld],
            }
        };
        expect(got, allowed, &error)?;
        let model = &mut self.locks[lock];
        model.kill();
        model.entry.iter_mut().for_each(|entry| *entry = false);
        Ok(())
    }

    fn drop_guard(&mut self, guard: usize) {
        let Some(index) = self.slot(guard) else {
            self.log("drop: no guard held");
            return;
        };
        let slot = self.slots.remove(index);
        let lock = slot.lock;
        drop(slot.guard);
        let end = Instant::now();
        self.log(format!("drop lock#{lock}'s guard"));
        self.count("drop", Outcome::Ok);
        if self.guard_stopped(lock) {
            self.end_keep(lock, end);
            return;
        }
        match self.timing {
            // A backend that cannot release without awaiting: the release is spawned, and
            // done once the case yields.
            Timing::Exact if !self.target.drop_releases_at_once() => {
                let model = &mut self.locks[lock];
                model.keep = None;
                model.live_until = None;
                model.dead_from = Some(end + Duration::from_millis(1));
            }
            // In process, a dropped guard releases at once, kept alive or not (the test
            // `a_dropped_kept_alive_guard_frees_its_key_at_once`).
            Timing::Exact => {
                let model = &mut self.locks[lock];
                model.kill();
                model.entry.iter_mut().for_each(|entry| *entry = false);
            }
            // Released in the background: gone within the settle time.
            Timing::Real => {
                // The watchdog's extensions count until then.
                self.end_keep(lock, end);
                let model = &mut self.locks[lock];
                model.keep = None;
                model.live_until = None;
                let settled = end + SETTLE;
                model.dead_from = Some(model.dead_from.map_or(settled, |from| from.min(settled)));
            }
        }
    }

    fn keep_alive(&mut self, guard: usize) -> Result<(), String> {
        let Some(index) = self.slot(guard) else {
            self.log("keep_alive: no guard held");
            return Ok(());
        };
        let lock = self.slots[index].lock;
        let start = Instant::now();
        let result = self.slots[index].guard.keep_alive();
        self.log(format!(
            "lock#{lock}.keep_alive() -> {}",
            describe(&result, |_| "Ok(signal)".to_owned())
        ));
        let lost = result.map_err(|error| format!("keep_alive failed: {error}"))?;
        self.count("keep_alive", Outcome::Ok);
        let stopped = self.guard_stopped(lock);
        let slack = self.loss_slack();
        let model = &mut self.locks[lock];
        if model.watched {
            return Ok(());
        }
        model.watched = true;
        let status = model.status(start, start);
        let mode = match status {
            _ if stopped => KeepMode::Idle,
            Status::Live if !model.any_taken() => KeepMode::Saving,
            Status::Live | Status::Unknown => KeepMode::Gamble,
            Status::Dead => KeepMode::Idle,
        };
        let valid_hi = start + model.ttl;
        let valid_hi = model.dead_from.map_or(valid_hi, |from| from.max(valid_hi));
        let lost_by = (mode == KeepMode::Gamble && model.any_taken()).then_some(valid_hi + slack);
        model.keep = Some(Keep {
            lost,
            ttl: model.ttl,
            mode,
            valid_hi,
            lost_by,
        });
        Ok(())
    }

    async fn purge(&mut self, client: usize, prefix: &Text) -> Result<(), String> {
        let raw = self.key_text(client, prefix);
        let c = &self.clients[client];
        let (stopped, can_purge) = (c.stopped, c.caps.purge);
        let full = match &c.namespace {
            Some(namespace) => format!("{namespace}:{raw}"),
            None => raw.clone(),
        };
        let start = Instant::now();
        let result = c.locker.purge(&raw).await;
        let end = Instant::now();
        self.log(format!(
            "c{client}.purge({}) -> {}",
            show(&raw),
            describe(&result, |count| format!("Ok({count})"))
        ));
        let got = result.as_ref().err().map_or(Outcome::Ok, outcome_of);
        self.count("purge", got);
        let error = result.as_ref().err().map(ToString::to_string);
        if stopped {
            return expect(got, &[Outcome::Stopped], &error);
        }
        if !can_purge {
            return expect(got, &[Outcome::Unsupported], &error);
        }
        expect(got, &[Outcome::Ok], &error)?;
        let count = result.unwrap_or_default();
        if count > 0 {
            self.count("purge", "removed some");
        }
        // Bounds: every stored key purge covers that a lock surely holds, and at most every one
        // that may still have an entry (an expired lock may leave one behind).
        let mut surely = BTreeSet::new();
        let mut maybe = BTreeSet::new();
        let mut hit = Vec::new();
        for (index, lock) in self.locks.iter().enumerate() {
            for (i, id) in lock.ids.iter().enumerate() {
                if !self.purge_covers(client, &full, id) {
                    continue;
                }
                hit.push((index, i));
                if lock.entry[i] {
                    maybe.insert(id.clone());
                }
                if lock.status_of(i, start, end) == Status::Live {
                    surely.insert(id.clone());
                }
            }
        }
        let (low, high) = (surely.len() as u64, maybe.len() as u64);
        if count < low || count > high {
            return Err(format!(
                "purge({}) removed {count} lock(s); the model expects {low}..={high} ({})",
                show(&full),
                show_all(&maybe.into_iter().collect::<Vec<_>>())
            ));
        }
        for (lock, _) in &hit {
            let model = &self.locks[*lock];
            let hits = hit.iter().filter(|(l, _)| l == lock).count();
            if model.ids.len() > 1 && model.status(start, end) == Status::Live {
                let partly = hits < model.ids.len();
                self.count(
                    "purge of a held multi-key lock",
                    if partly { "partly" } else { "whole" },
                );
            }
        }
        for (lock, i) in hit {
            let model = &mut self.locks[lock];
            model.taken[i] = true;
            model.entry[i] = false;
            self.doom_keep(lock, end);
        }
        Ok(())
    }

    async fn inspect(&mut self, client: usize, key: &Text) -> Result<(), String> {
        let raw = self.key_text(client, key);
        let verdict = self.inspect_key(client, &raw).await;
        let shown = match &verdict {
            Ok(summary) | Err((summary, _)) => summary.clone(),
        };
        self.log(format!("c{client}.inspect({}) -> {shown}", show(&raw)));
        verdict.map(|_| ()).map_err(|(_, why)| why)
    }

    /// Asks `client` about `raw` and compares: a summary of the answer, and why it is wrong.
    async fn inspect_key(&mut self, client: usize, raw: &str) -> Result<String, (String, String)> {
        let c = &self.clients[client];
        let stopped = c.stopped;
        let namespaced_key = namespaced(c.namespace.as_deref(), raw);
        let start = Instant::now();
        let result = c.locker.inspect(raw).await;
        let end = Instant::now();
        let count = |states: &Vec<lock_core::KeyState>| {
            let held = states
                .iter()
                .filter(|state| matches!(state.holding, Holding::Held { .. }))
                .count();
            let free = states
                .iter()
                .filter(|state| state.holding == Holding::Free)
                .count();
            (held, free)
        };
        let summary = describe(&result, |states| {
            let (held, free) = count(states);
            format!("Ok(held on {held}, free on {free} of {})", states.len())
        });
        let got = result.as_ref().err().map_or(Outcome::Ok, outcome_of);
        self.count("inspect", got);
        let error = result.as_ref().err().map(ToString::to_string);
        let fail = |why: String| (summary.clone(), why);
        let Some(key) = namespaced_key else {
            let allowed: &[Outcome] = if stopped {
                &[Outcome::Invalid, Outcome::Stopped]
            } else {
                &[Outcome::Invalid]
            };
            return expect(got, allowed, &error)
                .map(|()| summary.clone())
                .map_err(fail);
        };
        if stopped {
            return expect(got, &[Outcome::Stopped], &error)
                .map(|()| summary.clone())
                .map_err(fail);
        }
        expect(got, &[Outcome::Ok], &error).map_err(fail)?;
        let states = result.unwrap_or_default();
        let quorum = states.len() / 2 + 1;
        let (held, free) = count(&states);
        let id = self.stored(client, &key);
        let holders = self.holders(std::slice::from_ref(&id), start, end);
        let live = holders.iter().find(|(_, status)| *status == Status::Live);
        self.count("inspect", if held >= quorum { "held" } else { "free" });
        if held >= quorum {
            if holders.is_empty() {
                return Err(fail(format!(
                    "{} is held, but the model has it free",
                    show(&key)
                )));
            }
            Ok("held".to_owned())
        } else if free >= quorum {
            if let Some((holder, _)) = live
                && !self.late_watchdog(&holders).await
            {
                return Err(fail(format!(
                    "{} is free, but lock#{holder} holds it",
                    show(&key)
                )));
            }
            for (holder, _) in holders {
                self.locks[holder].found_free(std::slice::from_ref(&id));
            }
            Ok("free".to_owned())
        } else {
            Err(fail(format!(
                "no majority: held on {held}, free on {free} of {} node(s)",
                states.len()
            )))
        }
    }

    /// Asks the store about every key the model's locks name (through a running client that
    /// names it the same way) and compares each answer with the model.
    async fn probe(&mut self) -> Result<(), String> {
        let mut seen = BTreeSet::new();
        let mut asks = Vec::new();
        for lock in &self.locks {
            let owner = &self.clients[lock.client];
            let same_names = |other: &Client| {
                other.namespace == owner.namespace
                    && (self.naming == Naming::Plain || other.prefix == owner.prefix)
            };
            for (id, raw) in lock.ids.iter().zip(&lock.raw) {
                if asks.len() >= MAX_PROBES || !seen.insert(id.clone()) {
                    continue;
                }
                if let Some(client) = self
                    .clients
                    .iter()
                    .position(|client| !client.stopped && same_names(client))
                {
                    asks.push((client, raw.clone()));
                }
            }
        }
        if asks.is_empty() {
            return Ok(());
        }
        let mut line = String::from("      probe:");
        let mut failed = None;
        for (client, raw) in asks {
            match self.inspect_key(client, &raw).await {
                Ok(verdict) => {
                    let _ = write!(line, " {}={verdict}", show(&raw));
                }
                Err((summary, why)) => {
                    let _ = write!(line, " c{client}.inspect({}) -> {summary}", show(&raw));
                    failed = Some(why);
                    break;
                }
            }
        }
        self.log(line);
        failed.map_or(Ok(()), Err)
    }

    async fn stop(&mut self, client: usize) -> Result<(), String> {
        let result = self.clients[client].locker.stop().await;
        let end = Instant::now();
        self.log(format!(
            "c{client}.stop() -> {}",
            describe(&result, |()| "Ok".to_owned())
        ));
        result.map_err(|error| format!("stop failed: {error}"))?;
        self.count("stop", Outcome::Ok);
        self.clients[client].stopped = true;
        if self.target.guards_after_stop() != AfterStop::Work {
            let held: Vec<usize> = self.slots.iter().map(|slot| slot.lock).collect();
            for lock in held {
                if self.locks[lock].client == client {
                    self.doom_keep(lock, end);
                }
            }
        }
        Ok(())
    }
}

/// Whether Redis Cluster hashes `key` whole: its first `{` is directly followed by `}`.
fn empty_hash_tag(key: &str) -> bool {
    key.find('{')
        .is_some_and(|open| key[open + 1..].starts_with('}'))
}

/// Which acquisition call a step makes.
#[derive(Clone, Copy)]
enum Call {
    /// `acquire`, or `acquire_with` a ttl.
    One(Option<Ttl>),
    Try,
    Many,
}

fn result_error<T>(result: &Result<T, LockError>) -> Option<String> {
    result.as_ref().err().map(ToString::to_string)
}

/// Checks how a key surely held as another kind was refused (an acquisition's other outcomes
/// are the caller's to judge).
fn refused_as(refusal: Refusal, got: Outcome, error: &Option<String>) -> Result<(), String> {
    match (refusal, got) {
        (Refusal::Mismatch, Outcome::Held) => expect(got, &[Outcome::Mismatch], error),
        (Refusal::Held, Outcome::Mismatch) => expect(got, &[Outcome::Held], error),
        _ => Ok(()),
    }
}

fn expect(got: Outcome, allowed: &[Outcome], error: &Option<String>) -> Result<(), String> {
    if allowed.contains(&got) {
        return Ok(());
    }
    Err(format!(
        "got {got:?}{}, the model allows {allowed:?}",
        error
            .as_ref()
            .map_or(String::new(), |error| format!(" ({error})"))
    ))
}

/// Leases: semaphore permits, read and write locks, and downgrades.
impl<T: Target> Run<'_, T> {
    /// `acquire_permit`, `acquire_read`, `acquire_write` (one attempt: the clients retry
    /// never), or `try_acquire_kind` when `attempt_once`.
    ///
    /// The rules: a semaphore of N permits admits at most N live holders, a read-write lock
    /// many readers or one writer; a key held as another kind (a mutex, a semaphore of another
    /// size, a read-write lock) is refused, as held or with `KindMismatch` (both are allowed:
    /// `LeaseKind`'s documented promise), and `KindMismatch` only while a lease of another kind
    /// may hold the key (every backend refuses another kind only while it has a live holder).
    async fn acquire_lease(
        &mut self,
        client: usize,
        raw: String,
        op: LeaseOp,
        attempt_once: bool,
    ) -> Result<(), String> {
        let timing = self.timing;
        let c = &self.clients[client];
        let key = namespaced(c.namespace.as_deref(), &raw);
        let kind = match op {
            LeaseOp::Permit(permits) => LeaseKind::permit(permits).ok(),
            LeaseOp::Read => Some(LeaseKind::Read),
            LeaseOp::Write => Some(LeaseKind::Write),
        };
        // Past `MAX_PERMITS`, a kind built by hand (which `LeaseKind::permit` refuses): the
        // call must refuse it.
        let try_kind = match op {
            LeaseOp::Permit(permits) => {
                std::num::NonZeroU32::new(permits).map(|permits| LeaseKind::Permit { permits })
            }
            _ => kind,
        };
        let label = match (op, attempt_once) {
            (LeaseOp::Permit(permits), false) => {
                format!("c{client}.acquire_permit({}, {permits})", show(&raw))
            }
            (LeaseOp::Read, false) => format!("c{client}.acquire_read({})", show(&raw)),
            (LeaseOp::Write, false) => format!("c{client}.acquire_write({})", show(&raw)),
            (op, true) => format!("c{client}.try_acquire_kind({}, {op:?})", show(&raw)),
        };
        let ttl = c.ttl.duration(timing);
        let start = Instant::now();
        let result: Result<LockGuard, LockError> = match (op, attempt_once) {
            (LeaseOp::Permit(permits), false) => c.locker.acquire_permit(&raw, permits).await,
            (LeaseOp::Read, false) => c.locker.acquire_read(&raw).await,
            (LeaseOp::Write, false) => c.locker.acquire_write(&raw).await,
            (_, true) => match try_kind {
                // No `LeaseKind` has no permits.
                None => Err(LockError::invalid("permits", "no LeaseKind has 0 permits")),
                Some(kind) => match c.locker.try_acquire_kind(&raw, kind).await {
                    Ok(Some(guard)) => Ok(guard),
                    Ok(None) => Err(LockError::Locked { key: String::new() }),
                    Err(LockError::Locked { key }) => Err(LockError::backend(
                        "model",
                        format!("try_acquire_kind returned Locked for `{key}` instead of Ok(None)"),
                    )),
                    Err(error) => Err(error),
                },
            },
        };
        let end = Instant::now();
        let shown = match (&result, attempt_once) {
            (Err(LockError::Locked { .. }), true) => "Ok(None)".to_owned(),
            _ => describe(&result, |guard| {
                format!("Ok(fence {:?})", guard.fencing_token())
            }),
        };
        self.log(format!("{label} -> {shown}"));
        let got = result.as_ref().err().map_or(Outcome::Ok, outcome_of);
        let counted = match op {
            LeaseOp::Permit(_) => "permit",
            LeaseOp::Read => "read",
            LeaseOp::Write => "write",
        };
        self.count(counted, got);
        let error = result_error(&result);
        let c = &self.clients[client];
        let stopped = c.stopped;
        let (Some(kind), Some(key)) = (kind, key) else {
            let mut allowed = vec![Outcome::Invalid];
            if stopped {
                allowed.push(Outcome::Stopped);
            }
            return expect(got, &allowed, &error);
        };
        if stopped {
            return expect(got, &[Outcome::Stopped], &error);
        }
        if c.caps.serves(kind).is_err() {
            return expect(got, &[Outcome::Unsupported], &error);
        }
        let id = self.stored(client, &key);
        if self.target.cluster() && self.naming == Naming::HashTagged && empty_hash_tag(&id) {
            return expect(got, &[Outcome::Failed], &error);
        }
        let ids = vec![id];
        let holders = self.holders(&ids, start, end);
        // The holders that keep this lease out: another kind, or the same family and
        // exclusive (for a semaphore, each holder takes a permit).
        let mut other = Vec::new();
        let mut blocking = Vec::new();
        for (holder, status) in &holders {
            let held = self.locks[*holder].kind;
            if family(held) != family(kind) {
                other.push((*holder, *status));
            } else if excludes(held, kind) {
                blocking.push((*holder, *status));
            }
        }
        let live = |list: &[(usize, Status)]| {
            list.iter()
                .filter(|(_, status)| *status == Status::Live)
                .count()
        };
        let (must_block, may_block) = match kind {
            LeaseKind::Permit { permits } => {
                let permits = permits.get() as usize;
                (live(&blocking) >= permits, blocking.len() >= permits)
            }
            _ => (live(&blocking) > 0, !blocking.is_empty()),
        };
        if let Some((holder, _)) = other.iter().find(|(_, status)| *status == Status::Live) {
            let held = self.locks[*holder].kind;
            self.count(&format!("{kind} asked, {held} live"), got);
            refused_as(self.target.other_kind_refusal(kind), got, &error)?;
        }
        let must_refuse = live(&other) > 0 || must_block;
        let slow = timing == Timing::Real && (end - start) + early(ttl) >= ttl;
        let may_refuse = !other.is_empty() || may_block || slow;
        match result {
            Ok(guard) => {
                if must_refuse {
                    // Only the holders that surely keep it out may have been lost by a late
                    // watchdog.
                    let mut keeping: Vec<(usize, Status)> = other.clone();
                    if must_block {
                        keeping.extend(blocking.iter().copied());
                    }
                    if !self.late_watchdog(&keeping).await {
                        return Err(format!(
                            "acquired {kind} on {} while the model has it held ({})",
                            show(&key),
                            holders
                                .iter()
                                .map(|(holder, status)| format!(
                                    "lock#{holder}: {} {status:?}",
                                    self.locks[*holder].kind
                                ))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ));
                    }
                }
                // Those that would keep it out had expired; for a semaphore, only when one more
                // of them would have filled it (otherwise the model cannot tell which had).
                let full = match kind {
                    LeaseKind::Permit { permits } => live(&blocking) + 1 >= permits.get() as usize,
                    _ => true,
                };
                let gone: Vec<usize> = other
                    .iter()
                    .chain(if full { &blocking[..] } else { &[][..] })
                    .filter(|(_, status)| *status != Status::Live)
                    .map(|(holder, _)| *holder)
                    .collect();
                for holder in gone {
                    self.locks[holder].found_free(&ids);
                }
                self.won(
                    client,
                    guard,
                    kind,
                    (vec![raw], vec![key], ids),
                    ttl,
                    start,
                    end,
                )
            }
            Err(LockError::Locked { key: named }) => {
                if !may_refuse {
                    return Err(format!(
                        "{kind} on {} found held, but the model admits it",
                        show(&key)
                    ));
                }
                if !attempt_once && named != key {
                    return Err(format!("Locked names {}, not {}", show(&named), show(&key)));
                }
                Ok(())
            }
            Err(LockError::KindMismatch { .. }) => {
                if other.is_empty() {
                    return Err(format!(
                        "{kind} on {} refused as used as another kind, but the model has no other kind there",
                        show(&key)
                    ));
                }
                Ok(())
            }
            Err(error) if slow && outcome_of(&error) == Outcome::Failed => {
                println!("note: a slow attempt ({:?}) failed: {error}", end - start);
                Ok(())
            }
            Err(error) => Err(format!("unexpected error: {error}")),
        }
    }

    /// `guard.downgrade()`: a write lock becomes a read lock (other readers may then enter),
    /// with its expiry and fencing token; any other guard is refused as invalid input; a
    /// lapsed or lost lock is `NotHeld`, as for extend.
    async fn downgrade(&mut self, guard: usize) -> Result<(), String> {
        // Names a write lock's guard when the case holds any (otherwise any guard: refused).
        let writers: Vec<usize> = (0..self.slots.len())
            .filter(|slot| self.locks[self.slots[*slot].lock].kind == LeaseKind::Write)
            .collect();
        let index = if writers.is_empty() {
            self.slot(guard)
        } else {
            Some(writers[guard % writers.len()])
        };
        let Some(index) = index else {
            self.log("downgrade: no guard held");
            return Ok(());
        };
        let lock = self.slots[index].lock;
        let fence = self.slots[index].guard.fencing_token();
        let start = Instant::now();
        let result = self.slots[index].guard.downgrade().await;
        let end = Instant::now();
        self.log(format!(
            "lock#{lock}.downgrade() -> {}",
            describe(&result, |()| "Ok".to_owned())
        ));
        let got = result.as_ref().err().map_or(Outcome::Ok, outcome_of);
        self.count("downgrade", got);
        let error = result_error(&result);
        let guard = &self.slots[index].guard;
        if guard.fencing_token() != fence {
            return Err(format!(
                "the downgrade changed the fencing token from {fence:?} to {:?}",
                guard.fencing_token()
            ));
        }
        let model = &self.locks[lock];
        if model.kind != LeaseKind::Write {
            return expect(got, &[Outcome::Invalid], &error);
        }
        let status = model.status(start, end);
        self.count("downgrade of a write lock the model has", status);
        let model = &self.locks[lock];
        if self.guard_stopped(lock) {
            let allowed = if status == Status::Live && !self.locks[lock].guard_invalid {
                vec![Outcome::Stopped]
            } else {
                vec![Outcome::Stopped, Outcome::NotHeld]
            };
            return expect(got, &allowed, &error);
        }
        let allowed: &[Outcome] = if model.guard_invalid || model.any_taken() {
            &[Outcome::NotHeld]
        } else {
            match status {
                Status::Live => &[Outcome::Ok],
                Status::Dead => &[Outcome::NotHeld],
                Status::Unknown => &[Outcome::Ok, Outcome::NotHeld],
            }
        };
        expect(got, allowed, &error)?;
        let guard_kind = self.slots[index].guard.kind();
        let model = &mut self.locks[lock];
        if got == Outcome::Ok {
            if guard_kind != LeaseKind::Read {
                return Err(format!("a downgraded guard holds {guard_kind}"));
            }
            model.kind = LeaseKind::Read;
        } else {
            if guard_kind != LeaseKind::Write {
                return Err(format!(
                    "a failed downgrade left the guard holding {guard_kind}"
                ));
            }
            model.guard_invalid = true;
        }
        Ok(())
    }
}

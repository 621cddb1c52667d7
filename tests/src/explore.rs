//! The fault explorer: seeded adversarial schedules of concurrent clients against real
//! redis-servers, checked for broken promises.
//!
//! A schedule is drawn from its seed alone: the backend (Redlock on 3 nodes or 1, either with
//! fencing or without: on 1 node, fair waiters then hold the keys released to them; on 3, a
//! waiter's first attempt is then the fair Redlock's plain round, below; or inc, fair
//! or not: fair, the head of a line holds the lock and fence a release gives it), the
//! ttl, a few clients (each with its own backend instance and connections, as separate
//! processes would have) taking single- and multi-key locks, holding them briefly, extending,
//! keeping them alive with the watchdog, pausing past their validity, releasing or dropping
//! them; and, meanwhile, faults on the nodes: connections cut, delayed or black-holed (late
//! delivery), nodes paused (SIGSTOP), wall clocks jumped either way (the walljump shim), and
//! empty restarts, immediate or delayed past the ttl.
//!
//! Redlock on 3 nodes without fencing (`Redlock3Unfenced`, fair as by default: 40 % of the
//! 3-node schedules, drawn from a seeded generator of its own, so that every other seed's
//! schedule stays as it was; long-ttl ones as often as with fencing) is where the fair Redlock's
//! plain first round runs over several nodes. With fencing every attempt goes through the line's
//! script; without it a waiter's first attempt is `SET NX` with an `EXISTS` of the key's line,
//! a key it took past a line is given back (and taken again in the same script when the line
//! held only lapsed entries: `lua/give_back.lua`), and its release is re-sent by the rules for a
//! round that wrote nothing before. Half of these schedules' faults are **ghost lines**: for a
//! while one node is slow (each way by at most a quarter of the node timeout, so that its
//! answer, give-back included, usually still counts) and every key's line there (with
//! `everywhere`, on every node) holds only a lapsed entry, as a waiter that died leaves it (the
//! line's keys outlive the entry by up to a quarter of its lease, here the ttl), made again
//! every few ms wherever an attempt or a release has pruned it. A plain attempt that takes a key
//! there meets the give-back, while its client, having won on the two fast nodes, may already
//! be releasing. (Before e3e13e5 the give-back and the retake were two round trips, and a
//! release landing between them left the retaken key for its whole ttl: with that node.rs these
//! schedules report it as a stray lock, e.g. seed 103 (about 4 replays in 5), first found 74 s
//! into `--seed 1`, 164 s into `--seed 1000`.)
//!
//! Checkers, each applied only where the documented assumptions hold for that schedule:
//! - **mutual exclusion** on every key: hold intervals `[acquired, min(released, valid_until))`
//!   never overlap (assumed unless a node restarted empty at once or a clock jumped forward);
//! - **fencing order** on every key: a holder that called after another had acquired got a
//!   larger token (with fencing only; assumed unless a clock stepped back, or, with several
//!   nodes, a node restarted empty while their clocks disagreed);
//! - **liveness**: once faults heal, a fresh client takes every key within ttl + slack;
//! - **nothing left**: after the ttl (and the counters' clock lag) has passed, every node is empty
//!   (a ghost line's keys expire a quarter of the ttl after it was last made);
//! - **no stray lock** (schedules with a long ttl, which expiry cannot hide): once every client
//!   has released or given up and the faults have healed, no node holds a lock key after a
//!   settle time far below the ttl (lines are not lock keys). Releases and clean-ups that a
//!   node failed are sent again a bounded number of times, so these schedules leave out the
//!   faults that can outlast every try (a cut connection, a node down for a ttl); their targeted
//!   fault is a squatter: another process holds a key on two of the three nodes for a while,
//!   so attempts on it win the third and must undo that win, and the third node's proxy drops
//!   the first compare-and-delete of that key it carries (the undo fails once, as a node that
//!   stalls or restarts right then would make it); without fencing on three nodes, ghost lines
//!   (above) too.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::clock::WallJump;
use crate::proxy::LatencyProxy;
use crate::server::RedisServer;

/// The keys every schedule contends for.
const KEYS: [&str; 3] = ["a", "b", "c"];

/// The lock ttl of the schedules that check for stray locks: far above the settle time, so that
/// a lock left behind is still there when looked for.
const LONG_TTL: Duration = Duration::from_secs(20);

/// After every client has finished and the faults have healed, how long clean-ups have to reach
/// the nodes, beyond six node timeouts (three tries of at most a node timeout each, after
/// pauses of one and two node timeouts).
const STRAY_SETTLE: Duration = Duration::from_millis(700);

/// The value a squatter stores (no client's token is 4 bytes long).
const SQUATTER: &str = "squatter";

/// What, in a request towards a node, marks Redlock's release of the single key `key`: the
/// explorer's Redlock waits fairly (the default), so a mutex is released by the fair script,
/// `EVALSHA <sha> 3 <key>` in RESP (the key and its line's two keys). (Matching the plain
/// compare-and-delete, as before, dropped nothing: the squat's lost release never happened.)
fn release_marker(key: &str) -> Vec<u8> {
    let sha = redis::Script::new(&crate::fair::release_fair_source())
        .get_hash()
        .to_owned();
    format!("{sha}\r\n$1\r\n3\r\n${}\r\n{key}\r\n", key.len()).into_bytes()
}

/// Three servers, each under a clock shim of its own, behind proxies: one lane of the explorer,
/// reused by its schedules (flushed in between).
pub struct Lane {
    servers: Vec<RedisServer>,
    shims: Vec<WallJump>,
    proxies: Vec<LatencyProxy>,
}

impl fmt::Debug for Lane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lane")
            .field("servers", &self.servers)
            .finish_non_exhaustive()
    }
}

impl Lane {
    /// Starts three servers with `binary`, each under its own walljump shim, and their proxies.
    ///
    /// # Errors
    /// When the shim cannot be built or a server does not start.
    pub async fn start(binary: &std::path::Path) -> std::io::Result<Self> {
        let mut servers = Vec::new();
        let mut shims = Vec::new();
        let mut proxies = Vec::new();
        for _ in 0..3 {
            let shim = WallJump::build()?;
            let server = shim.start_server(binary)?;
            proxies.push(LatencyProxy::start(server.port()).await?);
            servers.push(server);
            shims.push(shim);
        }
        Ok(Self {
            servers,
            shims,
            proxies,
        })
    }

    /// Back to a clean slate: clocks in step, proxies open, servers running and empty.
    ///
    /// Nothing the previous schedule's clients sent can land afterwards: their connections are
    /// closed first, through the proxies (which discard what they still held: a stall, a delay)
    /// and on the servers (which discard what they had not read yet), and only then are the
    /// servers flushed. (A request of a long-ttl schedule let through by a stall released here,
    /// or read late by a loaded server, once landed after the flush: a 20 s lock key in the
    /// next schedule's leftovers.)
    fn reset(&mut self) -> std::io::Result<()> {
        for index in 0..3 {
            self.shims[index].jump(Duration::ZERO, false)?;
            self.proxies[index].cut();
            self.proxies[index].release_stall();
            let _ = self.servers[index].resume();
            if self.servers[index].pid().is_none() {
                self.servers[index].restart()?;
            }
            for kind in ["normal", "pubsub"] {
                let killed = self.servers[index]
                    .command(&format!("CLIENT KILL TYPE {kind}"), Duration::from_secs(2))?;
                if !killed.starts_with(':') {
                    return Err(std::io::Error::other(format!(
                        "CLIENT KILL answered {killed}"
                    )));
                }
            }
            let reply = self.servers[index].command("FLUSHALL", Duration::from_secs(2))?;
            if reply != "+OK" {
                return Err(std::io::Error::other(format!("FLUSHALL answered {reply}")));
            }
            self.proxies[index].set_delay(Duration::ZERO);
        }
        Ok(())
    }
}

/// Which backend a schedule runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    /// Redlock over the lane's three nodes, with fencing.
    Redlock3,
    /// Redlock over the lane's three nodes without fencing, fair (the default): a waiter's first
    /// attempt is the plain round (`SET NX` and whether a line is there), which gives back a key
    /// taken past a line; its faults include ghost lines.
    Redlock3Unfenced,
    /// Redlock over one node (the `redis` backend), with fencing.
    Redlock1,
    /// Redlock over one node without fencing: the head of its fair line holds the key a
    /// release gives it, without asking (the grant).
    Redlock1Granted,
    /// inc on one node.
    Inc,
    /// inc on one node, fair: the head of the line holds the lock (and the fencing token) a
    /// release gives it, without asking (the grant).
    IncFair,
}

impl Backend {
    fn nodes(self) -> usize {
        match self {
            Self::Redlock3 | Self::Redlock3Unfenced => 3,
            Self::Redlock1 | Self::Redlock1Granted | Self::Inc | Self::IncFair => 1,
        }
    }

    /// Whether holders get fencing tokens (inc always draws one).
    fn fenced(self) -> bool {
        !matches!(self, Self::Redlock3Unfenced | Self::Redlock1Granted)
    }
}

/// One fault on one node.
#[derive(Clone, Copy, Debug)]
enum Fault {
    Cut(Duration),
    Delay(Duration, Duration),
    BlackHole(Duration),
    Pause(Duration),
    Jump {
        by: Duration,
        backwards: bool,
    },
    RestartAtOnce,
    RestartAfterTtl,
    /// Another process holds `KEYS[key]` on the two other nodes for `hold`, and this node drops
    /// the first compare-and-delete of that key it is sent meanwhile.
    Squat {
        key: usize,
        hold: Duration,
    },
    /// For `hold`, this node is `delay` late each way and every key's line on it (on every
    /// node when `everywhere`) holds only a lapsed entry, made again whenever it is gone.
    Ghost {
        delay: Duration,
        hold: Duration,
        everywhere: bool,
    },
}

/// What a schedule did that the promises do not cover.
#[derive(Debug, Default)]
struct Assumptions {
    restarted_at_once: bool,
    clock_forward: bool,
    clock_backward: bool,
    restarted: bool,
    /// Each node's wall-clock offset in ms (the shim sets offsets, not steps): a fencing counter
    /// raised from the fastest clock stays on the slowest node until that node's clock passes
    /// it, so the spread of the offsets bounds how long counters may outlive the ttl.
    offsets_ms: [i64; 3],
    /// The highest and lowest offsets any node had (0 to begin with).
    highest_ms: i64,
    lowest_ms: i64,
    /// Compare-and-deletes a squat fault dropped (for the summary).
    dropped_releases: usize,
    /// Ghost lines written (for the summary): each after the first on a node was pruned by an
    /// attempt or a release meanwhile.
    ghost_lines: usize,
    /// How many nodes the backend has: one node's clock never disagrees with another's.
    nodes: usize,
}

impl Assumptions {
    /// The widest the nodes' clocks were ever apart in this schedule.
    fn clock_spread(&self) -> Duration {
        Duration::from_millis(u64::try_from(self.highest_ms - self.lowest_ms).unwrap_or(0))
    }

    fn set_offset(&mut self, node: usize, ms: i64) {
        self.offsets_ms[node] = ms;
        self.highest_ms = self.highest_ms.max(ms);
        self.lowest_ms = self.lowest_ms.min(ms);
    }

    /// Steps `node`'s clock by `by` (back or forward) from its current offset, noting the
    /// step's direction; the node's new offset in ms.
    fn step(&mut self, node: usize, by: Duration, backwards: bool) -> i64 {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX / 4);
        let offset = self.offsets_ms[node].saturating_add(if backwards { -ms } else { ms });
        match offset.cmp(&self.offsets_ms[node]) {
            std::cmp::Ordering::Less => self.clock_backward = true,
            std::cmp::Ordering::Greater => self.clock_forward = true,
            std::cmp::Ordering::Equal => {}
        }
        self.set_offset(node, offset);
        offset
    }

    fn exclusion_holds(&self) -> bool {
        !self.restarted_at_once && !self.clock_forward
    }

    /// Fencing order holds unless a clock stepped back, or a node restarted empty (its counter
    /// redrawn from its clock) while the nodes' clocks disagreed. On one node, forward steps
    /// alone keep every draw above the last: its clock never disagrees with another's.
    fn fencing_holds(&self) -> bool {
        let clocks_disagree = self.nodes > 1 && self.highest_ms != self.lowest_ms;
        !(self.clock_backward || self.restarted && clocks_disagree)
    }
}

/// One acquisition, as its holder saw it.
#[derive(Clone, Debug)]
struct Held {
    client: usize,
    keys: Vec<String>,
    fence: Option<u64>,
    called: Instant,
    acquired: Instant,
    /// The validity the lock was granted with: the key was taken, and its token drawn and
    /// stored, before then.
    granted_until: Instant,
    /// `min(released, valid_until)`: the end of the time the holder may rely on the lock.
    until: Instant,
}

/// The outcome of one schedule.
#[derive(Debug)]
pub struct Outcome {
    /// The seed that replays it.
    pub seed: u64,
    /// One line per broken promise.
    pub violations: Vec<String>,
    /// A one-line account of what the schedule did.
    pub summary: String,
}

/// Knobs for negative controls: parts of the checks can be pointed at a broken backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Check every promise even where its assumptions do not hold (to see the checkers fire).
    pub ignore_assumptions: bool,
}

/// Runs the schedule of `seed` on `lane`.
///
/// # Errors
/// When the lane's servers cannot be reset (not a finding: the harness failed).
pub async fn run_schedule(
    lane: &mut Lane,
    seed: u64,
    options: Options,
) -> std::io::Result<Outcome> {
    lane.reset()?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut backend = match rng.random_range(0..10) {
        0..=5 => Backend::Redlock3,
        6 | 7 => Backend::Redlock1,
        _ => Backend::Inc,
    };
    // Half the one-node schedules run without fencing, where waiters hold the keys given to
    // them (drawn apart, so that the other draws of a seed stay as they were).
    if backend == Backend::Redlock1 && StdRng::seed_from_u64(seed ^ 0x6a47_7ed1).random_bool(0.5) {
        backend = Backend::Redlock1Granted;
    }
    // Some three-node schedules run without fencing, where a waiter's first attempt is the
    // plain round (drawn apart too).
    if backend == Backend::Redlock3 && StdRng::seed_from_u64(seed ^ 0x91a1_7e5d).random_bool(0.4) {
        backend = Backend::Redlock3Unfenced;
    }
    // Half the inc schedules wait fairly, where the head holds the lock given to it.
    if backend == Backend::Inc && StdRng::seed_from_u64(seed ^ 0x1ec_fa1e).random_bool(0.5) {
        backend = Backend::IncFair;
    }
    // How long clients hold and wait; it is also the lock ttl, except in the schedules that
    // check for stray locks (drawn apart, so that the other schedules of a seed stay as they were).
    let pace = Duration::from_millis([150, 250, 400][rng.random_range(0..3)]);
    let long = backend.nodes() == 3 && StdRng::seed_from_u64(seed ^ 0x57a7_10c5).random_bool(0.4);
    let ttl = if long { LONG_TTL } else { pace };
    let clients = rng.random_range(2..=4usize);
    let run_for = Duration::from_millis(rng.random_range(600..1200));
    let node_timeout = Duration::from_millis(rng.random_range(20..60));
    // Some schedules start with one node's wall clock ahead of the others (skew, not a step).
    let mut assumptions = Assumptions {
        nodes: backend.nodes(),
        ..Assumptions::default()
    };
    let mut faults = Vec::new();
    if backend.nodes() == 3 && rng.random_bool(0.4) {
        let node = rng.random_range(0..3);
        let ahead = Duration::from_millis(rng.random_range(500..3000));
        lane.shims[node].jump(ahead, false)?;
        assumptions.set_offset(node, i64::try_from(ahead.as_millis()).unwrap_or(0));
        faults.push(format!("Skew({ahead:?})@{node}"));
    }
    let urls: Vec<String> = lane.proxies[..backend.nodes()]
        .iter()
        .map(LatencyProxy::url)
        .collect();

    let mut lockers = Vec::new();
    for _ in 0..clients {
        lockers.push(build(backend, &urls, ttl, pace, node_timeout).await?);
    }
    let history = Arc::new(Mutex::new(Vec::<Held>::new()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (client, locker) in lockers.iter().enumerate() {
        let (locker, history) = (locker.clone(), Arc::clone(&history));
        let client_seed = rng.random::<u64>();
        tasks.push(tokio::spawn(async move {
            let timing = Timing { ttl, pace, run_for };
            run_client(client, locker, backend, timing, client_seed, history).await;
        }));
    }

    // The faults, one at a time, on nodes of this backend.
    while started.elapsed() < run_for {
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..200))).await;
        if started.elapsed() >= run_for {
            break;
        }
        let node = rng.random_range(0..backend.nodes());
        let hold = Duration::from_millis(rng.random_range(20..300));
        // Without fencing on three nodes, half the faults are ghost lines on a slow node.
        let fault = if backend == Backend::Redlock3Unfenced && rng.random_bool(0.5) {
            let most = u64::try_from(node_timeout.as_millis() / 4)
                .unwrap_or(1)
                .max(1);
            Fault::Ghost {
                delay: Duration::from_millis(rng.random_range(1..=most)),
                hold,
                everywhere: rng.random_bool(0.3),
            }
        } else {
            match rng.random_range(0..14) {
                0..=2 => Fault::Cut(hold),
                3 | 4 => Fault::Delay(Duration::from_millis(rng.random_range(5..60)), hold),
                5 | 6 => Fault::BlackHole(hold),
                7 | 8 => Fault::Pause(hold),
                9 | 10 => Fault::Jump {
                    by: Duration::from_millis(rng.random_range(50..800)),
                    backwards: rng.random_bool(0.5),
                },
                11 => Fault::RestartAtOnce,
                _ => Fault::RestartAfterTtl,
            }
        };
        // With a long ttl, no fault that can outlast every try of a clean-up: the squatter
        // instead of a cut or a node down for the ttl.
        let fault = match fault {
            Fault::Cut(_) | Fault::RestartAfterTtl if long => Fault::Squat {
                key: rng.random_range(0..KEYS.len()),
                hold: Duration::from_millis(rng.random_range(100..400)),
            },
            fault => fault,
        };
        faults.push(format!("{fault:?}@{node}"));
        inject(lane, node, fault, ttl, &mut assumptions).await?;
    }
    for task in tasks {
        let _ = task.await;
    }
    // Heal: proxies open, nodes running (clock offsets stay: they are not faults to heal).
    for index in 0..3 {
        lane.proxies[index].set_delay(Duration::ZERO);
        lane.proxies[index].release_stall();
        let _ = lane.servers[index].resume();
    }

    let held = std::mem::take(&mut *history.lock().unwrap_or_else(PoisonError::into_inner));
    let mut violations = Vec::new();
    let check_all = options.ignore_assumptions;
    if check_all || assumptions.exclusion_holds() {
        violations.extend(overlaps(&held));
    }
    if check_all || backend.fenced() && assumptions.fencing_holds() {
        violations.extend(fence_inversions(&held));
    }

    // No stray lock: every client has released or given up, and nothing is faulty any more.
    if long {
        tokio::time::sleep(node_timeout * 6 + STRAY_SETTLE).await;
        for index in 0..backend.nodes() {
            violations.extend(strays(lane.servers[index].port(), index, ttl));
        }
    }

    // Liveness: a fresh client takes every key within the ttl and some slack.
    let probe = build(backend, &urls, ttl, pace, node_timeout).await?;
    for key in KEYS {
        let limit = ttl * 2 + node_timeout * 4 + Duration::from_millis(300);
        let began = Instant::now();
        match tokio::time::timeout(limit, probe.acquire(key)).await {
            Ok(Ok(guard)) => {
                let _ = guard.release().await;
            }
            Ok(Err(error)) => violations.push(format!(
                "liveness: `{key}` not taken after the faults healed: {error}"
            )),
            Err(_) => violations.push(format!(
                "liveness: `{key}` not taken within {limit:?} after the faults healed (waited {:?})",
                began.elapsed()
            )),
        }
    }
    for locker in lockers.iter().chain([&probe]) {
        let _ = locker.stop().await;
    }
    drop(lockers);

    // Nothing left once the ttl and the counters' clock lag have passed (not waited for with a
    // long ttl: the stray locks were looked for instead, and the next schedule flushes).
    if !long {
        tokio::time::sleep(ttl + assumptions.clock_spread() + Duration::from_millis(300)).await;
    }
    for index in (0..backend.nodes()).filter(|_| !long) {
        let size = lane.servers[index].command("DBSIZE", Duration::from_secs(2))?;
        if size != ":0" {
            violations.push(format!(
                "leftovers: node {index} holds {} keys after the ttl and the clocks' spread: {}",
                size.trim_start_matches(':'),
                describe_keys(lane.servers[index].port())
            ));
        }
    }
    let summary = format!(
        "seed {seed}: {backend:?}, ttl {ttl:?}{}, {clients} clients, {} acquisitions, faults [{}]{}{}",
        if long {
            format!(" (pace {pace:?})")
        } else {
            String::new()
        },
        held.len(),
        faults.join(", "),
        if assumptions.dropped_releases > 0 {
            format!(", {} release(s) dropped", assumptions.dropped_releases)
        } else {
            String::new()
        },
        if assumptions.ghost_lines > 0 {
            format!(", {} ghost line(s) written", assumptions.ghost_lines)
        } else {
            String::new()
        }
    );
    Ok(Outcome {
        seed,
        violations,
        summary,
    })
}

async fn build(
    backend: Backend,
    urls: &[String],
    ttl: Duration,
    pace: Duration,
    node_timeout: Duration,
) -> std::io::Result<Locker> {
    let retry = RetryPolicy::forever()
        .with_retry_delay(Duration::from_millis(10))
        .with_retry_jitter(Duration::from_millis(10))
        .with_deadline(pace * 3);
    let options = LockOptions::default().with_ttl(ttl).with_retry(retry);
    let to_io = |error: lock_core::LockError| std::io::Error::other(error.to_string());
    let locker = match backend {
        Backend::Redlock3
        | Backend::Redlock3Unfenced
        | Backend::Redlock1
        | Backend::Redlock1Granted => Locker::new(
            lock_redlock::Redlock::new(
                lock_redlock::RedlockConfig::new(urls.iter().cloned())
                    .with_node_timeout(node_timeout)
                    .with_fencing(backend.fenced()),
            )
            .map_err(to_io)?,
        ),
        Backend::Inc | Backend::IncFair => {
            let mut config =
                lock_inc::IncConfig::new(urls[0].clone()).with_fair(backend == Backend::IncFair);
            config.command_timeout = u64::try_from(node_timeout.as_millis()).unwrap_or(50);
            // Setting a client up is not what a schedule tests: a connection that times out on
            // a loaded machine (the command timeout is the schedule's short node timeout) is
            // made again, a few times, before the run gives up.
            let mut tries = 1;
            loop {
                match lock_inc::IncLock::connect(config.clone()).await {
                    Ok(lock) => break Locker::new(lock),
                    Err(_) if tries < 5 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(error) => return Err(to_io(error)),
                }
            }
        }
    };
    // Each client is a process of its own: no in-process queue between them.
    locker
        .with_local_queue(false)
        .with_options(options)
        .map_err(to_io)
}

/// A client's times: the lock ttl, how long it holds and waits (the ttl unless that is long),
/// and how long it keeps taking locks.
#[derive(Clone, Copy)]
struct Timing {
    ttl: Duration,
    pace: Duration,
    run_for: Duration,
}

async fn run_client(
    client: usize,
    locker: Locker,
    backend: Backend,
    timing: Timing,
    seed: u64,
    history: Arc<Mutex<Vec<Held>>>,
) {
    let Timing { ttl, pace, run_for } = timing;
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    while started.elapsed() < run_for {
        let multi = !matches!(backend, Backend::Inc | Backend::IncFair) && rng.random_bool(0.4);
        let mut keys: Vec<&str> = if multi {
            let first = rng.random_range(0..KEYS.len());
            let second = (first + rng.random_range(1..KEYS.len())) % KEYS.len();
            vec![KEYS[first], KEYS[second]]
        } else {
            vec![KEYS[rng.random_range(0..KEYS.len())]]
        };
        keys.sort_unstable();
        let called = Instant::now();
        let Ok(mut guard) = locker.acquire_many(&keys).await else {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..20))).await;
            continue;
        };
        let acquired = Instant::now();
        let granted_until = guard.valid_until();
        let fence = guard.fencing_token();
        let style = rng.random_range(0..10);
        match style {
            // Hold briefly.
            0..=4 => tokio::time::sleep(pace.mul_f64(rng.random_range(0.0..0.3))).await,
            // Hold, extend, hold on.
            5 => {
                tokio::time::sleep(pace / 2).await;
                let _ = guard.extend(ttl).await;
                tokio::time::sleep(pace / 2).await;
            }
            // The watchdog keeps it alive for two ttls.
            6 if guard.keep_alive().is_ok() => tokio::time::sleep(pace * 2).await,
            // A holder paused past its validity (a stop-the-world pause; with a long ttl, a
            // long hold).
            7 => tokio::time::sleep(pace.mul_f64(1.5)).await,
            // Cancelled right away: the guard is dropped below.
            _ => {}
        }
        let until = guard.valid_until().min(Instant::now());
        history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Held {
                client,
                keys: keys.iter().map(|key| (*key).to_owned()).collect(),
                fence,
                called,
                acquired,
                granted_until,
                until,
            });
        if style >= 8 {
            drop(guard);
        } else {
            let _ = guard.release().await;
        }
    }
}

async fn inject(
    lane: &mut Lane,
    node: usize,
    fault: Fault,
    ttl: Duration,
    assumptions: &mut Assumptions,
) -> std::io::Result<()> {
    match fault {
        Fault::Cut(hold) => {
            lane.proxies[node].cut();
            tokio::time::sleep(hold).await;
            lane.proxies[node].set_delay(Duration::ZERO);
        }
        Fault::Delay(delay, hold) => {
            lane.proxies[node].set_delay(delay);
            tokio::time::sleep(hold).await;
            lane.proxies[node].set_delay(Duration::ZERO);
        }
        Fault::BlackHole(hold) => {
            lane.proxies[node].black_hole();
            tokio::time::sleep(hold).await;
            lane.proxies[node].set_delay(Duration::ZERO);
        }
        Fault::Pause(hold) => {
            lane.servers[node].pause()?;
            tokio::time::sleep(hold).await;
            lane.servers[node].resume()?;
        }
        Fault::Jump { by, backwards } => {
            // A step from where the node's clock is now: the shim takes an offset, so the
            // step is added to the node's current one (set as given, a second jump "back"
            // by less than the first would step the clock forward, unchecked).
            let offset = assumptions.step(node, by, backwards);
            let magnitude = Duration::from_millis(offset.unsigned_abs());
            lane.shims[node].jump(magnitude, offset < 0)?;
        }
        Fault::RestartAtOnce => {
            lane.servers[node].restart()?;
            assumptions.restarted_at_once = true;
            assumptions.restarted = true;
        }
        Fault::RestartAfterTtl => {
            lane.servers[node].kill();
            tokio::time::sleep(ttl + Duration::from_millis(50)).await;
            lane.servers[node].restart()?;
            assumptions.restarted = true;
        }
        Fault::Squat { key, hold } => {
            let key = KEYS[key];
            let others: Vec<usize> = (0..3).filter(|other| *other != node).collect();
            let set = format!("SET {key} {SQUATTER} NX PX {}", hold.as_millis());
            let mut squatted = 0;
            for other in &others {
                if lane.servers[*other].command(&set, Duration::from_secs(2))? == "+OK" {
                    squatted += 1;
                }
            }
            // Only a squatter on both others makes every attempt on the key undo a win here.
            if squatted == others.len() {
                lane.proxies[node].drop_next(release_marker(key));
            }
            tokio::time::sleep(hold).await;
            if squatted == others.len() && !lane.proxies[node].disarm() {
                assumptions.dropped_releases += 1;
            }
            for other in others {
                unsquat(lane.servers[other].port(), key);
            }
        }
        Fault::Ghost {
            delay,
            hold,
            everywhere,
        } => {
            let ports: Vec<u16> = (0..3)
                .filter(|other| everywhere || *other == node)
                .map(|other| lane.servers[other].port())
                .collect();
            lane.proxies[node].set_delay(delay);
            assumptions.ghost_lines += haunt(&ports, ttl, hold).await;
            lane.proxies[node].set_delay(Duration::ZERO);
        }
    }
    Ok(())
}

/// What a waiter that died leaves of a key's line once its entry lapsed, on the servers at
/// `ports` for every key, kept there for `hold` (made again, every few ms, wherever it is
/// gone); how many were written. Only where the key has no line (one with live waiters is
/// theirs); its keys expire a quarter of the lease (`ttl`) on, as long as they may outlive the
/// entry.
async fn haunt(ports: &[u16], ttl: Duration, hold: Duration) -> usize {
    const GHOST: &str = "if redis.call('exists', KEYS[1]) == 1 or redis.call('exists', KEYS[2]) == 1 then \
        return 0 end \
        redis.call('zadd', KEYS[1], 1, ARGV[1]) redis.call('zadd', KEYS[2], 1, ARGV[1]) \
        redis.call('pexpire', KEYS[1], ARGV[2]) redis.call('pexpire', KEYS[2], ARGV[2]) \
        return 1";
    let script = redis::Script::new(GHOST);
    let lines = KEYS.map(|key| crate::fair::line_names(crate::fair::Store::Redlock3, key));
    let linger = (ttl / 4).max(Duration::from_millis(1)).as_millis();
    let mut connections = Vec::new();
    for port in ports {
        let connection = match redis::Client::open(format!("redis://127.0.0.1:{port}/")) {
            Ok(client) => client.get_multiplexed_async_connection().await,
            Err(error) => Err(error),
        };
        match connection {
            Ok(connection) => connections.push(connection),
            Err(error) => println!("note: no ghost line on port {port}: {error}"),
        }
    }
    let until = Instant::now() + hold;
    let mut written = 0;
    while Instant::now() < until {
        for connection in &mut connections {
            for [line, index] in &lines {
                let wrote: redis::RedisResult<i64> = script
                    .key(line)
                    .key(index)
                    .arg("00000000000000000000000000000000ghost")
                    .arg(u64::try_from(linger).unwrap_or(u64::MAX))
                    .invoke_async(connection)
                    .await;
                written += usize::from(matches!(wrote, Ok(1)));
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    written
}

/// Removes the squatter from `key` on the server at `port`, if it is still there (a clock
/// stepped back could otherwise bring an expired one back).
fn unsquat(port: u16, key: &str) {
    let removed = (|| -> redis::RedisResult<i64> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
        let mut connection = client.get_connection_with_timeout(Duration::from_secs(2))?;
        redis::Script::new(
            "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0",
        )
        .key(key)
        .arg(SQUATTER)
        .invoke(&mut connection)
    })();
    if let Err(error) = removed {
        println!("note: the squatter of `{key}` on port {port} could not be removed: {error}");
    }
}

/// The lock keys a node still holds (a squatter's aside): after every client has released or
/// given up and the faults have healed, each is a lock left behind.
fn strays(port: u16, node: usize, ttl: Duration) -> Vec<String> {
    let found = (|| -> redis::RedisResult<Vec<String>> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
        let mut connection = client.get_connection_with_timeout(Duration::from_secs(2))?;
        let mut found = Vec::new();
        for key in KEYS {
            let value: Option<Vec<u8>> = redis::cmd("GET").arg(key).query(&mut connection)?;
            let pttl: i64 = redis::cmd("PTTL").arg(key).query(&mut connection)?;
            match value {
                Some(value) if value != SQUATTER.as_bytes() => found.push(format!(
                    "stray lock: node {node} still holds `{key}` (pttl {pttl} ms of {ttl:?}) after \
                     every client released or gave up and the faults healed"
                )),
                _ => {}
            }
        }
        Ok(found)
    })();
    found.unwrap_or_else(|error| vec![format!("stray lock: node {node} cannot be read: {error}")])
}

/// The keys on a node with their ttl left, for a report (binary-safe names, shown escaped).
fn describe_keys(port: u16) -> String {
    let described = (|| -> redis::RedisResult<String> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
        let mut connection = client.get_connection_with_timeout(Duration::from_secs(2))?;
        let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query(&mut connection)?;
        let mut parts = Vec::new();
        for key in keys.iter().take(10) {
            let pttl: i64 = redis::cmd("PTTL").arg(key).query(&mut connection)?;
            parts.push(format!(
                "{} (pttl {pttl})",
                String::from_utf8_lossy(key).escape_debug()
            ));
        }
        Ok(parts.join(", "))
    })();
    described.unwrap_or_else(|error| format!("(cannot list: {error})"))
}

/// Pairs of holders of a common key whose reliable hold intervals overlap.
fn overlaps(held: &[Held]) -> Vec<String> {
    let mut found = Vec::new();
    for key in KEYS {
        let mut intervals: Vec<&Held> = held
            .iter()
            .filter(|h| h.keys.iter().any(|k| k == key) && h.until > h.acquired)
            .collect();
        intervals.sort_by_key(|h| h.acquired);
        for pair in intervals.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            if b.acquired < a.until {
                found.push(format!(
                    "mutual exclusion: `{key}` held by client {} and client {} at once ({:?} overlap)",
                    a.client,
                    b.client,
                    a.until - b.acquired
                ));
            }
        }
    }
    found
}

/// Pairs where a holder called after another had acquired a common key (or after the validity
/// the other was granted had ended: its token was drawn before that), yet drew a token that is
/// not larger.
fn fence_inversions(held: &[Held]) -> Vec<String> {
    let mut found = Vec::new();
    for key in KEYS {
        let on_key: Vec<&Held> = held
            .iter()
            .filter(|h| h.keys.iter().any(|k| k == key))
            .collect();
        for a in &on_key {
            for b in &on_key {
                let (Some(fa), Some(fb)) = (a.fence, b.fence) else {
                    continue;
                };
                if (b.called > a.acquired || b.called >= a.granted_until) && fb <= fa {
                    found.push(format!(
                        "fencing: on `{key}`, {:?} drew {fb} after {:?} had drawn {fa}",
                        b.keys, a.keys
                    ));
                }
            }
        }
    }
    let unique: BTreeSet<String> = found.into_iter().collect();
    unique.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(base: Instant, client: usize, key: &str, fence: u64, at: [u64; 3]) -> Held {
        let ms = |n: u64| base + Duration::from_millis(n);
        Held {
            client,
            keys: vec![key.to_owned()],
            fence: Some(fence),
            called: ms(at[0]),
            acquired: ms(at[1]),
            granted_until: ms(at[2]),
            until: ms(at[2]),
        }
    }

    /// Seed 16277 found this: the shim sets an offset, and two jumps "back" (689 ms, then
    /// 92 ms) set as given stepped the clock forward by 597 ms while the checker assumed no
    /// forward step, and reported the early expiry that followed as a broken promise.
    #[test]
    fn jumps_step_from_the_current_offset() {
        let mut assumptions = Assumptions::default();
        assert_eq!(assumptions.step(0, Duration::from_millis(689), true), -689);
        assert_eq!(assumptions.step(0, Duration::from_millis(92), true), -781);
        assert!(assumptions.clock_backward && !assumptions.clock_forward);
        assert!(assumptions.exclusion_holds());
        // Forward from below zero is a forward step, even to a negative offset.
        assert_eq!(assumptions.step(0, Duration::from_millis(100), false), -681);
        assert!(assumptions.clock_forward && !assumptions.exclusion_holds());
        assert_eq!(assumptions.clock_spread(), Duration::from_millis(781));
        // Another node's clock is its own.
        assert_eq!(assumptions.step(1, Duration::from_millis(50), true), -50);
    }

    /// A forward step then an empty restart leaves fencing checked on one node (every draw
    /// comes from a clock that never went back), not on several (a counter redrawn from one
    /// node's clock may fall below what a faster node drew).
    #[test]
    fn one_node_keeps_fencing_checked_after_a_forward_step_and_a_restart() {
        for (nodes, checked) in [(1, true), (3, false)] {
            let mut assumptions = Assumptions {
                nodes,
                ..Assumptions::default()
            };
            assumptions.step(0, Duration::from_millis(300), false);
            assumptions.restarted = true;
            assert_eq!(assumptions.fencing_holds(), checked, "{nodes} node(s)");
            assumptions.step(0, Duration::from_millis(100), true);
            assert!(!assumptions.fencing_holds(), "a step back, {nodes} node(s)");
        }
    }

    #[test]
    fn the_checkers_fire_on_broken_histories() {
        let t = Instant::now();
        let good = [held(t, 0, "a", 1, [0, 1, 5]), held(t, 1, "a", 2, [2, 6, 9])];
        assert!(overlaps(&good).is_empty());
        assert!(fence_inversions(&good).is_empty());
        let overlapping = [held(t, 0, "a", 1, [0, 1, 5]), held(t, 1, "a", 2, [2, 4, 9])];
        assert_eq!(overlaps(&overlapping).len(), 1);
        let backwards = [held(t, 0, "a", 5, [0, 1, 5]), held(t, 1, "a", 2, [2, 6, 9])];
        assert_eq!(fence_inversions(&backwards).len(), 1);
        // A holder preempted before it returned: its validity ended before the other called.
        let preempted = [held(t, 0, "a", 5, [0, 9, 3]), held(t, 1, "a", 2, [4, 6, 9])];
        assert_eq!(fence_inversions(&preempted).len(), 1);
    }
}

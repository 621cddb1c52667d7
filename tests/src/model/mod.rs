//! Model-based tests of the public API: a property-based state machine drives `Locker` and
//! `LockGuard` over a real backend and compares every outcome with a small reference model.
//!
//! A [`Case`] is a few clients (each a `Locker` with its own namespace and, for inc, prefix)
//! sharing one store, then a sequence of steps: acquire, try_acquire, acquire_many, extend,
//! release, dropping a guard, keep_alive, purge, inspect, stop, and the passage of time. The
//! model (in `exec.rs`) says which outcomes each step may have and checks fencing tokens: per stored
//! key, strictly increasing across acquisitions in the model's order. On a failure proptest
//! shrinks the case to a minimal sequence, printed with the outcome of every step.
//!
//! With [`ModelConfig::with_leases`] the steps also take leases on the same keys: semaphore
//! permits (`acquire_permit`, of 1 to 3 permits, and refused sizes), read and write locks, each
//! also as a single `try_acquire_kind`, and `downgrade`. A semaphore of N admits at most N live
//! holders, a read-write lock many readers or one writer; a key surely held as another kind is
//! refused (held or `KindMismatch`, as the target says: [`Target::other_kind_refusal`]), and
//! `KindMismatch` only while a holder of another kind may be live; extend, release, drop and
//! `keep_alive` of a lease follow the mutex's rules; a downgrade turns a live write lock into a
//! read lock (readers then enter; the fencing token stays), and is `NotHeld` once it lapsed or
//! was lost. Fencing tokens increase per key across every kind of acquisition.
//!
//! Time is modeled per [`Timing`]: on tokio's paused clock exactly (a lock is held while the
//! clock reads before its expiry), on real servers as a window: a lock is surely held until its
//! ttl (less a drift margin) after its acquisition started, surely gone once its ttl (plus a
//! margin) has passed after the acquisition returned, and in between either answer is accepted
//! — and the answer decides the model's state from then on.

mod case;
mod exec;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use case::{
    CLIENTS, Case, ClientSpec, KEY_POOL, LeaseOp, MAX_NAMESPACE_LEN, MAX_PREFIX_LEN,
    NAMESPACE_POOL, Op, PREFIX_POOL, REAL_STEP, Text, Ttl, advance_by, case,
};
use lock_core::raw::Lock;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};

/// How time passes for a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timing {
    /// tokio's paused clock: steps take no time and expiry is modeled exactly.
    Exact,
    /// Real servers and the real clock: outcomes near an expiry are not compared.
    Real,
}

/// How a store names a lock, which decides what collides and what purge matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    /// The namespaced key itself (memory, Redlock).
    Plain,
    /// `<prefix>{<namespaced key>}` (inc).
    HashTagged,
}

/// What a guard's `extend` and `release` do once its client was stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterStop {
    /// They work as before: an in-process backend has nothing to close.
    Work,
    /// They fail with `LockError::Stopped` at once (Redlock, and inc: the test
    /// `inc_guard_calls_after_stop_fail_at_once_with_stopped`); the lock stays until its ttl.
    Stopped,
}

/// How a backend refuses a key held as another kind (see [`Target::other_kind_refusal`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `LockError::KindMismatch`.
    Mismatch,
    /// `LockError::Locked` (`Ok(None)` from a single try).
    Held,
    /// Either of them.
    Either,
}

/// What a client's backend is built from.
#[derive(Clone, Debug)]
pub struct ClientSetup {
    /// The inc prefix (other backends ignore it).
    pub prefix: String,
    /// Redlock's fencing option (other backends ignore it).
    pub fencing: bool,
}

/// A backend under test: how to build it, and what the model must know about it.
pub trait Target {
    /// A name for messages.
    fn label(&self) -> String;

    /// How time passes.
    fn timing(&self) -> Timing;

    /// How the store names locks.
    fn naming(&self) -> Naming;

    /// What a guard's calls do after its client was stopped.
    fn guards_after_stop(&self) -> AfterStop;

    /// Whether a dropped guard frees its keys before the drop returns ([`Timing::Exact`]):
    /// true for a backend whose handles release in the call (`Answer::ready` from `Handle::release`);
    /// otherwise the release is spawned, and done once the case next yields.
    fn drop_releases_at_once(&self) -> bool {
        false
    }

    /// Whether the store is a Redis Cluster, where a key of the inc backend whose hash tag is
    /// empty (its first `{` directly followed by `}`) cannot be locked: its three keys hash to
    /// different slots, and acquiring fails with a backend error (a documented limitation).
    fn cluster(&self) -> bool {
        false
    }

    /// How the backend refuses a lease of kind `asked` on a key another kind (a mutex, a
    /// semaphore of another size, a read-write lock) surely holds: with `KindMismatch`
    /// ([`Refusal::Mismatch`]), as held ([`Refusal::Held`]), or either way
    /// ([`Refusal::Either`]: all that `LeaseKind` promises, and the default).
    fn other_kind_refusal(&self, asked: lock_core::LeaseKind) -> Refusal {
        let _ = asked;
        Refusal::Either
    }

    /// A fresh runtime for one case (paused for [`Timing::Exact`]).
    ///
    /// # Errors
    /// When the runtime cannot be built.
    fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime>;

    /// Empties the store before a case.
    ///
    /// # Errors
    /// When a server cannot be emptied.
    fn reset(&self) -> Result<(), String>;

    /// A new backend value for one client, on the store shared by the case's clients; called
    /// inside the case's runtime.
    fn backend(
        &self,
        setup: &ClientSetup,
    ) -> impl Future<Output = lock_core::Result<Arc<dyn Lock>>>;
}

/// How many cases of how many steps, and the seed.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// Cases that must pass.
    pub cases: u32,
    /// The most steps in a case.
    pub max_steps: usize,
    /// A fixed seed; otherwise `MODEL_SEED` from the environment, or a random one (printed).
    pub seed: Option<u64>,
    /// How long shrinking a failure may take.
    pub shrink_time: Duration,
    /// How long one step may take before it counts as hung ([`Timing::Real`] only).
    pub step_timeout: Duration,
    /// Whether the backend can purge: purges are drawn often only then.
    pub can_purge: bool,
    /// Whether the backend has multi-key locks: `acquire_many` of several keys is drawn often
    /// only then.
    pub multi_key: bool,
    /// Whether lease steps (permits, read and write locks, downgrades) are drawn too; without,
    /// cases are drawn exactly as before leases were modeled.
    pub leases: bool,
}

impl ModelConfig {
    /// `cases` cases of up to `max_steps` steps, a random seed, 60 s of shrinking, steps of 10 s
    /// at most.
    pub fn new(cases: u32, max_steps: usize) -> Self {
        Self {
            cases,
            max_steps,
            seed: None,
            shrink_time: Duration::from_secs(60),
            step_timeout: Duration::from_secs(10),
            can_purge: true,
            multi_key: true,
            leases: false,
        }
    }

    /// Draws lease steps too: semaphore permits, read and write locks (once or as a single
    /// attempt), and downgrades, on the same crowded keys as the mutexes.
    #[must_use]
    pub fn with_leases(mut self) -> Self {
        self.leases = true;
        self
    }

    /// For a backend without multi-key locks: `acquire_many` is rare (it checks the refusal,
    /// and the single-key call).
    #[must_use]
    pub fn without_multi_key(mut self) -> Self {
        self.multi_key = false;
        self
    }

    /// For a backend without purge: purge steps are rare (they only check the refusal).
    #[must_use]
    pub fn without_purge(mut self) -> Self {
        self.can_purge = false;
        self
    }

    /// Like [`ModelConfig::new`], with `MODEL_CASES` from the environment (if set) for the
    /// number of cases: a longer soak of the same test.
    pub fn from_env(cases: u32, max_steps: usize) -> Self {
        let cases = std::env::var("MODEL_CASES")
            .ok()
            .and_then(|cases| cases.parse().ok())
            .unwrap_or(cases);
        Self::new(cases, max_steps)
    }

    /// Runs with `seed`.
    #[must_use]
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }
}

/// What a passing run did.
#[derive(Clone, Debug)]
pub struct Report {
    /// The seed, to run the same cases again (`MODEL_SEED`).
    pub seed: u64,
    /// Cases run.
    pub cases: u32,
    /// Wall time.
    pub elapsed: Duration,
    /// How often each kind of step ended each way (`release: NotHeld`…), over every case run.
    pub tally: std::collections::BTreeMap<String, u64>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} cases passed in {:.1?} (seed {}); steps by outcome:",
            self.cases, self.elapsed, self.seed
        )?;
        for (what, count) in &self.tally {
            writeln!(f, "  {what}: {count}")?;
        }
        Ok(())
    }
}

/// A failing run: the minimal case proptest shrank it to, and what went wrong.
#[derive(Clone)]
pub struct Failure {
    /// The seed that found it.
    pub seed: u64,
    /// The minimal failing case.
    pub minimal: Case,
    /// The failing step's message and the transcript of every step before it.
    pub reason: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "the model found a difference (MODEL_SEED={}); minimal case of {} step(s):",
            self.seed,
            self.minimal.ops.len()
        )?;
        writeln!(f, "{}", self.reason)
    }
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Runs `config.cases` random cases against `target`; on a difference, shrinks it to a
/// minimal case and returns it.
///
/// # Errors
/// The minimal failing case, with the transcript of its steps.
pub fn check<T: Target>(target: &T, config: &ModelConfig) -> Result<Report, Box<Failure>> {
    let seed = config
        .seed
        .or_else(|| std::env::var("MODEL_SEED").ok()?.parse().ok())
        .unwrap_or_else(rand::random);
    println!(
        "model {}: seed {seed} (MODEL_SEED={seed} repeats it), {} cases of up to {} steps",
        target.label(),
        config.cases,
        config.max_steps
    );
    let proptest_config = Config {
        cases: config.cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        max_shrink_time: u32::try_from(config.shrink_time.as_millis()).unwrap_or(u32::MAX),
        max_shrink_iters: 10_000,
        max_local_rejects: 0,
        max_global_rejects: 0,
        verbose: 0,
        ..Config::default()
    };
    let started = std::time::Instant::now();
    let mut runner = TestRunner::new(proptest_config);
    let tally = std::cell::RefCell::new(exec::Tally::new());
    let result = runner.run(
        &case(
            config.max_steps,
            config.can_purge,
            config.multi_key,
            config.leases,
        ),
        |case| run_one(target, &case, config, &mut tally.borrow_mut()).map_err(TestCaseError::fail),
    );
    match result {
        Ok(()) => Ok(Report {
            seed,
            cases: config.cases,
            elapsed: started.elapsed(),
            tally: tally.into_inner(),
        }),
        Err(TestError::Fail(reason, minimal)) => Err(Box::new(Failure {
            seed,
            minimal,
            reason: reason.to_string(),
        })),
        Err(TestError::Abort(reason)) => Err(Box::new(Failure {
            seed,
            minimal: Case {
                clients: Vec::new(),
                ops: Vec::new(),
            },
            reason: format!("proptest aborted: {reason}"),
        })),
    }
}

/// Runs one given case (a minimal sequence written down, say) against `target`.
///
/// # Errors
/// The transcript up to the failing step, and why it failed.
pub fn replay<T: Target>(target: &T, case: &Case) -> Result<(), String> {
    let config = ModelConfig::new(1, case.ops.len());
    run_one(target, case, &config, &mut exec::Tally::new())
}

/// Runs one case on a fresh runtime and an emptied store, counting its steps' outcomes.
fn run_one<T: Target>(
    target: &T,
    case: &Case,
    config: &ModelConfig,
    tally: &mut exec::Tally,
) -> Result<(), String> {
    target.reset()?;
    let runtime = target
        .runtime()
        .map_err(|error| format!("cannot build a runtime: {error}"))?;
    runtime.block_on(exec::run_case(target, case, config.step_timeout, tally))
}

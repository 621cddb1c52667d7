//! What one generated case is — the clients and the steps — and the strategies that draw them.
//!
//! Keys, namespaces and prefixes are drawn towards the corners users reach: names that look like
//! the library's own bookkeeping (`x:fence`, `x}:owner`, `{x}`, `lock-released:x`), the glob
//! characters of `SCAN MATCH` (`* ? [ ] \`) and Redis Cluster hash-tag braces anywhere, unicode,
//! the empty string, and lengths exactly at and one byte past each limit. Steps name guards by
//! an index taken modulo the guards still held, so any subsequence of a case is a case: that is
//! what lets proptest shrink a failure to a minimal sequence.

use std::fmt;
use std::time::Duration;

use lock_core::MAX_KEY_LEN;
use proptest::collection::vec;
use proptest::prelude::*;

use super::Timing;

/// How many clients (each a `Locker` over its own backend value) share the store in a case.
pub const CLIENTS: usize = 2;

/// Keys that look like the library's own bookkeeping, glob patterns, hash tags or odd text; the
/// first six are drawn most often.
pub const KEY_POOL: &[&str] = &[
    "x",
    "y",
    "x:y",
    ":",
    "x:fence",
    "x}:owner",
    "x}:fence",
    "{x}",
    "x}",
    "}x",
    "{",
    "}",
    "{}",
    "}{",
    "lock-released:x",
    "lock:{x}",
    "lock:x",
    "*",
    "?",
    "[",
    "]",
    "\\",
    "x*",
    "x?",
    "[a-z]",
    "[^x]",
    "a\\*",
    "\\x",
    "é",
    "🔒",
    "clé🔒",
    " ",
    "\u{0}",
];

/// Namespaces of the same kinds.
pub const NAMESPACE_POOL: &[&str] = &[
    "app", "x", "{x}", "x}", "}", "{", "*", "a[b]", "\\", "lock", "lock:", "é🔒", "a:b", "x:fence",
];

/// Prefixes of the inc backend: its default, none, glob characters and hash-tag braces.
pub const PREFIX_POOL: &[&str] = &[
    "lock:", "", "l*:", "l?ck:", "[l]ock:", "lo\\ck:", "{p}", "p{", "a{}", "}", "lock:{x}", "é🔒:",
    "{", "lock",
];

/// The longest inc prefix accepted, in bytes.
pub const MAX_PREFIX_LEN: usize = 256;

/// The longest namespace accepted, in bytes.
pub const MAX_NAMESPACE_LEN: usize = MAX_KEY_LEN / 2 - 1;

/// The characters of short drawn keys: collisions are frequent on purpose.
const KEY_TEXT: &str = "[xy:{}*?\\[\\]\\\\é🔒]{1,3}";

/// Text for a key, namespace, prefix or purge prefix.
#[derive(Clone, PartialEq, Eq)]
pub enum Text {
    /// An entry of the kind's pool.
    Pool(usize),
    /// Short text drawn from a small alphabet of troublemakers.
    Drawn(String),
    /// The empty string.
    Empty,
    /// Exactly the longest accepted (given the client's namespace, for keys), or one byte more,
    /// made of `unit` (`k`, `é` or `🔒`) and padded with `k`.
    Longest {
        /// Index into `["k", "é", "🔒"]`.
        unit: usize,
        /// One byte past the limit.
        over: bool,
    },
}

const UNITS: [&str; 3] = ["k", "é", "🔒"];

impl Text {
    /// The text, with `pool` for [`Text::Pool`] and `limit` bytes for [`Text::Longest`].
    pub fn resolve(&self, pool: &[&str], limit: usize) -> String {
        match self {
            Self::Pool(index) => pool[index % pool.len()].to_owned(),
            Self::Drawn(text) => text.clone(),
            Self::Empty => String::new(),
            Self::Longest { unit, over } => {
                let unit = UNITS[unit % UNITS.len()];
                let len = limit + usize::from(*over);
                let mut text = unit.repeat(len / unit.len());
                while text.len() < len {
                    text.push('k');
                }
                text
            }
        }
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pool(index) => write!(f, "Pool({index})"),
            Self::Drawn(text) => write!(f, "{text:?}"),
            Self::Empty => f.write_str("Empty"),
            Self::Longest { unit, over } => write!(
                f,
                "Longest({:?}{})",
                UNITS[unit % UNITS.len()],
                if *over { ", +1 byte" } else { "" }
            ),
        }
    }
}

/// A lifetime, resolved per [`Timing`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ttl {
    /// Expires within a case: 100 ms on the paused clock, 150 ms on real servers.
    Short,
    /// Outlives any case: 10 s.
    Long,
    /// Zero: refused before any I/O.
    Zero,
    /// Past the 24 h limit: refused before any I/O.
    TooLong,
}

impl Ttl {
    /// The duration for `timing`.
    pub fn duration(self, timing: Timing) -> Duration {
        match (self, timing) {
            (Self::Short, Timing::Exact) => Duration::from_millis(100),
            (Self::Short, Timing::Real) => Duration::from_millis(150),
            (Self::Long, _) => Duration::from_secs(10),
            (Self::Zero, _) => Duration::ZERO,
            (Self::TooLong, _) => lock_core::raw::validate::MAX_TTL + Duration::from_millis(1),
        }
    }

    /// Whether `lock_core` accepts it.
    pub fn is_valid(self) -> bool {
        matches!(self, Self::Short | Self::Long)
    }
}

/// The steps of time on the paused clock: with the short ttl of 100 ms they land before, on
/// and after the boundary, and on the watchdog's extension times (a third of the ttl left).
const EXACT_STEPS_MS: [u64; 11] = [1, 33, 50, 66, 67, 99, 100, 101, 150, 250, 10_001];

/// The one step of real time: twice the short ttl, so an expiry it crosses is decided.
pub const REAL_STEP: Duration = Duration::from_millis(300);

/// How far one [`Op::Advance`] moves time.
pub fn advance_by(step: usize, timing: Timing) -> Duration {
    match timing {
        Timing::Exact => Duration::from_millis(EXACT_STEPS_MS[step % EXACT_STEPS_MS.len()]),
        Timing::Real => REAL_STEP,
    }
}

/// One client of the case.
#[derive(Clone, Debug)]
pub struct ClientSpec {
    /// `with_namespace`; an invalid one must be refused, and the client then has none.
    pub namespace: Option<Text>,
    /// The inc backend's prefix (ignored elsewhere); an invalid one must be refused, and the
    /// client then has the default `lock:`.
    pub prefix: Text,
    /// Redlock's fencing option (ignored elsewhere).
    pub fencing: bool,
    /// The client's default ttl (`acquire`, `try_acquire`, `acquire_many`).
    pub ttl: Ttl,
}

/// One step.
#[derive(Clone, Debug)]
pub enum Op {
    /// `acquire(key)`, or `acquire_with(key, ttl)` when `ttl` is set; single attempt.
    Acquire {
        /// Which client.
        client: usize,
        /// The key.
        key: Text,
        /// A ttl for this call only.
        ttl: Option<Ttl>,
    },
    /// `try_acquire(key)`.
    TryAcquire {
        /// Which client.
        client: usize,
        /// The key.
        key: Text,
    },
    /// `acquire_many(keys)`.
    AcquireMany {
        /// Which client.
        client: usize,
        /// The keys, repeats and all.
        keys: Vec<Text>,
    },
    /// `guard.extend(ttl)`.
    Extend {
        /// Which guard (modulo those held).
        guard: usize,
        /// The new ttl.
        ttl: Ttl,
    },
    /// `guard.release()`.
    Release {
        /// Which guard (modulo those held).
        guard: usize,
    },
    /// Dropping the guard.
    Drop {
        /// Which guard (modulo those held).
        guard: usize,
    },
    /// `guard.keep_alive()`.
    KeepAlive {
        /// Which guard (modulo those held).
        guard: usize,
    },
    /// `purge(prefix)`.
    Purge {
        /// Which client.
        client: usize,
        /// The prefix (namespaced by the client).
        prefix: Text,
    },
    /// `inspect(key)`.
    Inspect {
        /// Which client.
        client: usize,
        /// The key.
        key: Text,
    },
    /// `stop()`.
    Stop {
        /// Which client.
        client: usize,
    },
    /// A lease: `acquire_permit(key, permits)`, `acquire_read(key)` or `acquire_write(key)`,
    /// or `try_acquire_kind(key, kind)` when `attempt_once` (drawn only with
    /// [`ModelConfig::with_leases`](super::ModelConfig::with_leases)).
    Lease {
        /// Which client.
        client: usize,
        /// The key.
        key: Text,
        /// The kind of lease.
        kind: LeaseOp,
        /// `try_acquire_kind` rather than the `acquire_*` call.
        attempt_once: bool,
    },
    /// `guard.downgrade()` (drawn only with leases), of a write lock's guard (modulo those
    /// held) if the case holds any, else of any guard.
    Downgrade {
        /// Which guard (modulo those held).
        guard: usize,
    },
    /// Time passes (see [`advance_by`]).
    Advance {
        /// Index into the steps of the paused clock.
        step: usize,
    },
}

/// The kind of a lease step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseOp {
    /// A permit of a semaphore of this many permits (0 and more than `MAX_PERMITS` are
    /// refused).
    Permit(u32),
    /// The read side of a read-write lock.
    Read,
    /// The write side of a read-write lock.
    Write,
}

/// A whole case: the clients, then the steps.
#[derive(Clone, Debug)]
pub struct Case {
    /// The clients, [`CLIENTS`] of them.
    pub clients: Vec<ClientSpec>,
    /// The steps, in order.
    pub ops: Vec<Op>,
}

fn text(pool_len: usize) -> impl Strategy<Value = Text> {
    prop_oneof![
        12 => (0..pool_len).prop_map(Text::Pool),
        4 => KEY_TEXT.prop_map(Text::Drawn),
        1 => Just(Text::Empty),
        1 => (0..UNITS.len(), any::<bool>()).prop_map(|(unit, over)| Text::Longest { unit, over }),
    ]
}

/// How many names at the head of [`KEY_POOL`] most keys are drawn from.
const CROWDED: usize = 6;

/// Keys: mostly from the first [`CROWDED`] names of the pool (plain names, the namespace
/// separator, and look-alikes of the library's own bookkeeping keys), so that steps meet on the
/// same keys (and repeat keys within one call) often.
fn crowded_key() -> impl Strategy<Value = Text> {
    prop_oneof![
        3 => (0..CROWDED).prop_map(Text::Pool),
        2 => text(KEY_POOL.len()),
    ]
}

/// Purge prefixes: the crowded keys (and so the prefixes of their neighbours), everything,
/// or any text.
fn purge_prefix() -> impl Strategy<Value = Text> {
    prop_oneof![
        3 => (0..CROWDED).prop_map(Text::Pool),
        1 => Just(Text::Empty),
        2 => text(KEY_POOL.len()),
    ]
}

fn ttl() -> impl Strategy<Value = Ttl> {
    prop_oneof![
        8 => Just(Ttl::Short),
        4 => Just(Ttl::Long),
        1 => Just(Ttl::Zero),
        1 => Just(Ttl::TooLong),
    ]
}

fn client() -> impl Strategy<Value = ClientSpec> {
    let namespace = prop_oneof![
        2 => Just(None),
        3 => text(NAMESPACE_POOL.len()).prop_map(Some),
    ];
    let prefix = prop_oneof![
        2 => Just(Text::Pool(0)),
        3 => text(PREFIX_POOL.len()),
    ];
    let default_ttl = prop_oneof![Just(Ttl::Short), Just(Ttl::Long)];
    (namespace, prefix, any::<bool>(), default_ttl).prop_map(|(namespace, prefix, fencing, ttl)| {
        ClientSpec {
            namespace,
            prefix,
            fencing,
            ttl,
        }
    })
}

fn op(purge_weight: u32, many_weight: u32) -> impl Strategy<Value = Op> {
    let client = 0..CLIENTS;
    let guard = 0..8usize;
    prop_oneof![
        10 => (client.clone(), crowded_key(), proptest::option::of(ttl()))
            .prop_map(|(client, key, ttl)| Op::Acquire { client, key, ttl }),
        6 => (client.clone(), crowded_key())
            .prop_map(|(client, key)| Op::TryAcquire { client, key }),
        many_weight => (client.clone(), vec(crowded_key(), 0..=3))
            .prop_map(|(client, keys)| Op::AcquireMany { client, keys }),
        6 => (guard.clone(), ttl()).prop_map(|(guard, ttl)| Op::Extend { guard, ttl }),
        6 => guard.clone().prop_map(|guard| Op::Release { guard }),
        3 => guard.clone().prop_map(|guard| Op::Drop { guard }),
        3 => guard.prop_map(|guard| Op::KeepAlive { guard }),
        purge_weight => (client.clone(), purge_prefix())
            .prop_map(|(client, prefix)| Op::Purge { client, prefix }),
        6 => (client.clone(), crowded_key())
            .prop_map(|(client, key)| Op::Inspect { client, key }),
        1 => client.prop_map(|client| Op::Stop { client }),
        8 => (0..EXACT_STEPS_MS.len()).prop_map(|step| Op::Advance { step }),
    ]
}

fn lease_kind() -> impl Strategy<Value = LeaseOp> {
    prop_oneof![
        6 => Just(LeaseOp::Permit(1)),
        5 => Just(LeaseOp::Permit(2)),
        2 => Just(LeaseOp::Permit(3)),
        1 => Just(LeaseOp::Permit(0)),
        1 => Just(LeaseOp::Permit(lock_core::raw::validate::MAX_PERMITS + 1)),
        8 => Just(LeaseOp::Read),
        6 => Just(LeaseOp::Write),
    ]
}

/// The steps of a case with leases: the mutex steps (as often as in a case without), lease
/// acquisitions about as often again, and downgrades.
fn op_with_leases(purge_weight: u32, many_weight: u32) -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => op(purge_weight, many_weight),
        5 => (0..CLIENTS, crowded_key(), lease_kind(), any::<bool>()).prop_map(
            |(client, key, kind, attempt_once)| Op::Lease {
                client,
                key,
                kind,
                attempt_once,
            }
        ),
        2 => (0..8usize).prop_map(|guard| Op::Downgrade { guard }),
    ]
}

/// Cases of [`CLIENTS`] clients and up to `max_steps` steps; purges and multi-key locks are
/// drawn often only where the backend `can_purge` and has `multi_key` locks (elsewhere they
/// mostly check the refusal). With `leases`, lease steps are drawn too (see
/// [`Op::Lease`]); without, the steps are drawn exactly as before leases were modeled.
pub fn case(
    max_steps: usize,
    can_purge: bool,
    multi_key: bool,
    leases: bool,
) -> BoxedStrategy<Case> {
    let purge_weight = if can_purge { 6 } else { 1 };
    let many_weight = if multi_key { 10 } else { 2 };
    let ops = if leases {
        vec(op_with_leases(purge_weight, many_weight), 1..=max_steps).boxed()
    } else {
        vec(op(purge_weight, many_weight), 1..=max_steps).boxed()
    };
    (vec(client(), CLIENTS), ops)
        .prop_map(|(clients, ops)| Case { clients, ops })
        .boxed()
}

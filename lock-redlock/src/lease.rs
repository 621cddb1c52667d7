//! Semaphores and read-write locks: what the scripts of `lua/lease_*.lua` and `lua/slot_*.lua`
//! store on each node, and the rounds that take, fence and describe them. How they are stored
//! and why they are sound is in the crate docs (README, "Semaphores and read-write locks").

use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lock_core::{
    Key, LeaseKind, LockError, Result, Token,
    raw::{Handle, KeySet, LockRequest, validate},
};
use redis::{RedisResult, Value};
use tokio::time::Instant;

use crate::node::{
    Alone, CLAIM_SUFFIX, Held, LEASE_ACQUIRE, LEASE_RAISE, Node, SLOT_ACQUIRE, TakenAlone,
};
use crate::round::{self, Tally};
use crate::{FENCE_SUFFIX, NAME, RedlockHandle, Shared};

/// The most permits a semaphore over several nodes may have: an attempt tries every slot in
/// turn (one quorum round each) before it reports the semaphore full.
pub const MAX_SLOT_PERMITS: u32 = 64;

/// How many raise rounds a fenced lease over several nodes makes before it counts as held.
const RAISE_TRIES: usize = 3;

/// Fencing values stay below 2^53 (the scripts' numbers are doubles).
const MAX_FENCE: u64 = 1 << 53;

/// What an acquisition of `kind` may leave on a node under its token, as its clean-up
/// (`Lock::abandon`) must remove it: a writer's claim too, and any slot of a semaphore.
pub(crate) fn held_by(kind: LeaseKind, nodes: usize) -> Held {
    match kind {
        LeaseKind::Permit { .. } if nodes > 1 => Held::Slot(None),
        LeaseKind::Permit { .. } => Held::Set {
            tags: "p",
            claim: false,
        },
        LeaseKind::Read => Held::Set {
            tags: "r",
            claim: false,
        },
        LeaseKind::Write => Held::Set {
            tags: "w",
            claim: true,
        },
        _ => Held::Mutex,
    }
}

/// The error for a key that a node holds as `found` (as `describe` in `lease_common.lua`
/// names it) when `kind` was asked for; `Ok` when nothing stands in the way.
pub(crate) fn refuse(key: &Key, found: &str, kind: LeaseKind, node: &Node) -> Result<()> {
    if found.is_empty() || (found == "a mutex" && kind == LeaseKind::Exclusive) {
        return Ok(());
    }
    if let Some(redis_type) = found.strip_prefix("foreign ") {
        return Err(LockError::invalid(
            "key",
            format!(
                "`{key}` holds a Redis {redis_type} on {}, not a lock: use another key or a namespace",
                node.label()
            ),
        ));
    }
    Err(LockError::KindMismatch {
        key: key.to_string(),
        found: found.to_owned(),
        asked: kind.to_string(),
    })
}

/// Where one attempt takes its lease.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// In the set of holders, under `tag`, with the kind's `marker`.
    Set { tag: &'static str },
    /// A permit slot of a semaphore over several nodes.
    Slot { slot: u32, permits: u32 },
}

impl Target {
    /// What a won lease holds, for its release: a writer may have been downgraded on some
    /// nodes only, so a read-write lease is released under both tags; a writer's release also
    /// takes back the claim it left on the nodes that refused it in the round it won.
    fn held(self) -> Held {
        match self {
            Self::Set { tag: "p" } => Held::Set {
                tags: "p",
                claim: false,
            },
            Self::Set { tag } => Held::Set {
                tags: "rw",
                claim: tag == "w",
            },
            Self::Slot { slot, .. } => Held::Slot(Some(slot)),
        }
    }
}

/// One attempt at a lease of `request.kind()` (never [`LeaseKind::Exclusive`]).
pub(crate) async fn try_acquire(
    shared: &Arc<Shared>,
    request: &LockRequest,
) -> Result<Option<Box<dyn Handle>>> {
    let kind = request.kind();
    if request.keys().len() != 1 {
        return Err(LockError::invalid("keys", format!("{kind} takes one key")));
    }
    let nodes = shared.nodes()?;
    let target = match kind {
        LeaseKind::Permit { permits } if nodes.len() > 1 => {
            let permits = permits.get();
            if permits > MAX_SLOT_PERMITS {
                return Err(LockError::Unsupported {
                    backend: NAME,
                    capability: "semaphores of more than 64 permits over several nodes",
                });
            }
            // Every slot in a random order, one quorum round each, until one is won: holders
            // spread over the slots instead of all fighting for the first free one.
            for slot in shuffled(permits) {
                let target = Target::Slot { slot, permits };
                if let Some(handle) = attempt(shared, &nodes, request, target).await? {
                    return Ok(Some(handle));
                }
            }
            return Ok(None);
        }
        LeaseKind::Permit { .. } => Target::Set { tag: "p" },
        LeaseKind::Read => Target::Set { tag: "r" },
        LeaseKind::Write => Target::Set { tag: "w" },
        _ => {
            return Err(LockError::Unsupported {
                backend: NAME,
                capability: "this kind of lease",
            });
        }
    };
    attempt(shared, &nodes, request, target).await
}

/// Per key, the claims this process's waiting writers left on nodes that their later attempts
/// did not overwrite or delete (they did not reach them): each attempt has a fresh token, so
/// the core's take-back of the last attempt's claim would leave the earlier ones for their
/// ttl. Each is recorded with the acquisition it belongs to
/// ([`LockRequest::acquisition`]), so that one writer's take-back leaves another's claims.
#[derive(Default)]
pub(crate) struct Claims(Mutex<std::collections::HashMap<Key, Vec<Left>>>);

/// One claim a waiting writer's attempt left on a node.
pub(crate) struct Left {
    node: usize,
    token: Token,
    acquisition: u64,
    /// When it lapses in the store by itself (its attempt's ttl): no use keeping it after.
    expires: Instant,
}

/// The record is swept of lapsed claims whenever it reaches a power of two keys from here,
/// so keys that no writer of this process comes back to do not pile up.
const SWEEP_FROM: usize = 256;

impl Claims {
    /// Takes the claims `acquisition`'s attempts left on `key` under a token other than
    /// `but`, by token: the other acquisitions' claims stay recorded.
    pub(crate) fn take(
        &self,
        key: &Key,
        acquisition: u64,
        but: Option<&Token>,
    ) -> Vec<(Token, Vec<usize>)> {
        let mut claims = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(record) = claims.get_mut(key) else {
            return Vec::new();
        };
        let now = Instant::now();
        let mut grouped: Vec<(Token, Vec<usize>)> = Vec::new();
        record.retain(|left| {
            if left.expires <= now {
                return false;
            }
            if left.acquisition != acquisition {
                return true;
            }
            if but != Some(&left.token) {
                match grouped.iter_mut().find(|(token, _)| *token == left.token) {
                    Some((_, nodes)) => nodes.push(left.node),
                    None => grouped.push((left.token.clone(), vec![left.node])),
                }
            }
            false
        });
        if record.is_empty() {
            claims.remove(key);
        }
        grouped
    }
}

/// Records what a waiting writer's attempt (`request`) left: its claim on the nodes that
/// refused it in time or in the grace of `undo_attempt` (`votes`; a node that granted it has no
/// claim any more), while an earlier attempt's claim of the same acquisition stays recorded on
/// the nodes this one did not reach (failed, or still in flight: a later refusal of this one is
/// taken back by `undo_attempt`). The core takes back the last attempt's claim when the writer
/// stops waiting; the earlier ones are taken back with it (see [`Shared::take_back_claims`]),
/// or when the writer wins.
pub(crate) fn note_claims(shared: &Shared, request: &LockRequest, token: &Token, votes: &[&Tally]) {
    let (key, acquisition) = (request.primary_key(), request.acquisition());
    let mut claims = shared
        .claims
        .0
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let now = Instant::now();
    let answered = |node: &usize| {
        votes
            .iter()
            .any(|tally| tally.yes.contains(node) || tally.no_at.contains(node))
    };
    let record = claims.entry(key.clone()).or_default();
    record.retain(|left| {
        left.expires > now && (left.acquisition != acquisition || !answered(&left.node))
    });
    let expires = now + request.ttl();
    for tally in votes {
        record.extend(tally.no_at.iter().map(|node| Left {
            node: *node,
            token: token.clone(),
            acquisition,
            expires,
        }));
    }
    if record.is_empty() {
        claims.remove(key);
    }
    if claims.len() >= SWEEP_FROM && claims.len().is_power_of_two() {
        claims.retain(|_, record| {
            record.retain(|left| left.expires > now);
            !record.is_empty()
        });
    }
}

/// `0..n` in a random order.
fn shuffled(n: u32) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n).collect();
    // Randomness from the standard library's per-process hasher keys (no dependency needed:
    // this spreads load, it protects nothing).
    let mut state = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        | 1;
    for i in (1..order.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let j = (state % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// One quorum round of the acquisition script for `target`, then, with fencing over several
/// nodes, the raise round; undone on every node when it does not yield a lease.
async fn attempt(
    shared: &Arc<Shared>,
    nodes: &Arc<[Node]>,
    request: &LockRequest,
    target: Target,
) -> Result<Option<Box<dyn Handle>>> {
    let (keys, token, ttl) = (
        request.key_set().clone(),
        request.token().clone(),
        request.ttl(),
    );
    let key = keys.primary().as_str().as_bytes().to_vec();
    let counter = shared
        .config
        .fencing
        .then(|| [key.as_slice(), FENCE_SUFFIX].concat());
    let token_text = token.expose().as_bytes().to_vec();
    let ttl_ms = validate::ttl_millis(ttl).to_string().into_bytes();
    let mut alone = None;
    let (script, mut script_keys, args) = match target {
        Target::Set { tag } => {
            // The marker begins with the byte 0xFF, which no token or tag begins with.
            let (marker, permits) = match request.kind() {
                LeaseKind::Permit { permits } => {
                    let permits = permits.get().to_string();
                    (
                        [b"\xffsem:".as_slice(), permits.as_bytes()].concat(),
                        permits,
                    )
                }
                _ => (b"\xffrw".to_vec(), String::new()),
            };
            let claim = [key.as_slice(), CLAIM_SUFFIX].concat();
            // A permit or a reader on a free key is one string (see `lua/lease_alone.lua`),
            // which a plain `SET` can write when no fencing counter has to move.
            if counter.is_none() && tag != "w" {
                alone = Some(Arc::new(Alone {
                    key: key.clone(),
                    value: [&marker[..], b"\0", tag.as_bytes(), &token_text].concat(),
                    ttl_ms: validate::ttl_millis(ttl),
                    claim: (tag == "r").then(|| claim.clone()),
                }));
            }
            let will_wait = if request.will_wait() { "1" } else { "0" };
            (
                &LEASE_ACQUIRE,
                vec![key.clone(), claim],
                vec![
                    token_text,
                    ttl_ms,
                    tag.as_bytes().to_vec(),
                    marker,
                    permits.into_bytes(),
                    will_wait.as_bytes().to_vec(),
                ],
            )
        }
        Target::Slot { slot, permits } => (
            &SLOT_ACQUIRE,
            vec![key.clone()],
            vec![
                token_text,
                ttl_ms,
                slot.to_string().into_bytes(),
                permits.to_string().into_bytes(),
            ],
        ),
    };
    script_keys.extend(counter.clone());
    let script_keys: Arc<[Vec<u8>]> = script_keys.into();
    let args: Arc<[Vec<u8>]> = args.into();
    let found: Arc<Mutex<Found>> = Arc::default();
    // What a failed attempt undoes: a refused writer's claim stays when the attempt reports
    // the key held (the core takes it back when the writer stops waiting), and goes with the
    // rest when it reports an error (the core then takes nothing back).
    let undone = |outcome_is_error: bool| match target {
        Target::Set { tag } => Held::Set {
            tags: tag,
            claim: outcome_is_error && tag == "w",
        },
        Target::Slot { slot, .. } => Held::Slot(Some(slot)),
    };
    // What a request still in flight when it is given up on undoes behind it (on its own
    // connection, so after it has run): a waiting writer's claim too, since its outcome there
    // is unknown and a clean-up sent on another connection may have overtaken it (a claim is
    // only a hint: the writer's next attempt leaves it again).
    let held = match target {
        Target::Set { tag } => Held::Set {
            tags: tag,
            claim: tag == "w",
        },
        Target::Slot { slot, .. } => Held::Slot(Some(slot)),
    };
    let start = Instant::now();
    let writer_claims = matches!(target, Target::Set { tag: "w" }) && request.will_wait();
    let (tally, pending) = round::run(nodes, shared.quorum, shared.node_timeout(ttl), |node| {
        let (script_keys, args, found, alone) = (
            Arc::clone(&script_keys),
            Arc::clone(&args),
            Arc::clone(&found),
            alone.clone(),
        );
        let (keys, token) = (keys.clone(), token.clone());
        async move {
            let undo = || node.release_call(&keys, &token, held);
            if let Some(alone) = &alone {
                match node.take_alone(alone, undo).await? {
                    TakenAlone::Taken => return Ok(Some(1)),
                    TakenAlone::Claimed => return Ok(None),
                    TakenAlone::Busy => {}
                }
            }
            let answer = node
                .acquire_lease(script, &script_keys, &args, undo)
                .await?;
            if let Some(alone) = &alone {
                node.note_script_answer(&alone.key, matches!(answer, Value::Int(2)));
            }
            read_answer(answer, &node, &found)
        }
    })
    .await;
    // A win returns from here; every other way ends below, undoing the attempt.
    let outcome = 'decided: {
        if tally.yes.len() >= shared.quorum
            && let Some(valid_until) = shared.valid_until(start, ttl)
        {
            let fence = match &counter {
                None => Ok(None),
                // One node draws every value itself, one after another: each is new.
                Some(_) if nodes.len() == 1 => Ok(Some(tally.highest)),
                Some(counter) => {
                    raise(shared, nodes, &keys, &token, target, counter, &tally, ttl).await
                }
            };
            match fence {
                Ok(fence) if counter.is_none() || fence.is_some() => {
                    if Instant::now() < valid_until {
                        // As for a mutex: requests still in flight run on, and the release is
                        // sent again to their nodes once they have answered (it may overtake them).
                        let in_flight =
                            (!pending.is_empty()).then(|| tokio::spawn(pending.finish()));
                        if writer_claims {
                            // The earlier attempts' claims on nodes this one did not reach.
                            note_claims(shared, request, &token, &[&tally]);
                            shared.take_back_claims(
                                keys.primary(),
                                request.acquisition(),
                                Some(&token),
                                ttl,
                            );
                        }
                        return Ok(Some(Box::new(RedlockHandle {
                            shared: Arc::clone(shared),
                            lease: crate::lease(keys, request.kind(), token, valid_until, fence),
                            held: target.held(),
                            ttl,
                            in_flight,
                            written_before: false,
                            extending: None,
                            line_member: None,
                            written_until: valid_until + shared.drift(ttl),
                        })));
                    }
                }
                // Gone once the validity was spent: expired while the raise was on its way, the
                // ttl too short for two rounds (said below), not the lease taken by another.
                Ok(None) if Instant::now() >= valid_until => {}
                outcome => break 'decided outcome.map(|_| None),
            }
        }
        failed_outcome(shared, request, &tally, &found)
    };
    let undo = undone(outcome.is_err());
    let late = shared
        .undo_attempt(
            &tally,
            pending,
            &keys,
            &token,
            (undo, held),
            ttl,
            start.elapsed(),
            None,
        )
        .await;
    if writer_claims {
        note_claims(shared, request, &token, &[&tally, &late]);
    }
    outcome
}

/// What an attempt that won no lease reports: held, another kind of lock, or a failure.
fn failed_outcome(
    shared: &Shared,
    request: &LockRequest,
    tally: &Tally,
    found: &Mutex<Found>,
) -> Result<Option<Box<dyn Handle>>> {
    let (primary, ttl) = (request.primary_key(), request.ttl());
    if tally.yes.len() >= shared.quorum {
        return Err(shared.too_late("the quorum", primary.as_ref(), ttl));
    }
    let found = std::mem::take(
        &mut *found
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    // Another kind of lock on enough nodes to decide the round alone: a node whose leftover of
    // another kind outlives its holder's release for a while does not make a client that
    // agrees with the live holders fail.
    if let Some((what, node)) = &found.what
        && found.votes > shared.node_count - shared.quorum
    {
        refuse(primary, what, request.kind(), node)?;
    }
    if tally.no > 0 {
        return Ok(None);
    }
    tracing::warn!(key = %primary, failures = tally.failures(), "quorum not reached");
    Err(LockError::QuorumNotReached {
        key: primary.to_string(),
        got: tally.yes.len(),
        needed: shared.quorum,
        failures: tally.failures(),
    })
}

/// The nodes that hold the key as another kind of lock, and what one of them holds.
#[derive(Default)]
struct Found {
    votes: usize,
    what: Option<(String, Node)>,
}

/// An acquisition script's answer as a vote: the fencing value (1 without fencing) when
/// granted, no when refused; a description of another kind of lock is kept in `found`.
fn read_answer(answer: Value, node: &Node, found: &Mutex<Found>) -> RedisResult<Option<u64>> {
    match answer {
        Value::BulkString(text) => {
            let text = String::from_utf8_lossy(&text).into_owned();
            let mut found = found
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            found.votes += 1;
            found.what = Some((text, node.clone()));
            Ok(None)
        }
        other => {
            let number: i64 = redis::FromRedisValue::from_redis_value(other)?;
            Ok(u64::try_from(number).ok().filter(|number| *number > 0))
        }
    }
}

/// The second round of a fenced lease over several nodes: raises the key's counter to the
/// highest value drawn, on a quorum that still holds the lease and for which the value is new
/// (see `lease_raise.lua`: two shared holders can never both raise one value on a quorum, so
/// fences are distinct, and a later lease's quorum meets this one, so they increase).
#[allow(clippy::too_many_arguments)]
async fn raise(
    shared: &Arc<Shared>,
    nodes: &[Node],
    keys: &KeySet,
    token: &Token,
    target: Target,
    counter: &[u8],
    tally: &Tally,
    ttl: Duration,
) -> Result<Option<u64>> {
    let value = tally.highest;
    let drawn: Arc<[(Node, u64)]> = tally
        .yes
        .iter()
        .zip(&tally.drawn)
        .filter_map(|(index, drawn)| Some((nodes.get(*index)?.clone(), *drawn)))
        .collect();
    let key = keys.primary().as_str().as_bytes().to_vec();
    let script_keys: Arc<[Vec<u8>]> = vec![key, counter.to_vec()].into();
    let (tags, slot) = match target {
        Target::Set { tag } => (tag, String::new()),
        Target::Slot { slot, .. } => ("", slot.to_string()),
    };
    let mut value = value;
    // Concurrent shared leases may each find their value taken on some node; each try raises
    // past the highest counter the refusing nodes reported. Bounded: then it counts as held.
    for _ in 0..RAISE_TRIES {
        let args = [
            token.expose().as_bytes().to_vec(),
            value.to_string().into_bytes(),
            tags.as_bytes().to_vec(),
            slot.clone().into_bytes(),
            validate::ttl_millis(ttl).to_string().into_bytes(),
        ];
        let past = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let args_on = |node: &Node| {
            let drawn_here = drawn
                .iter()
                .find(|(other, _)| other.same(node))
                .map_or(0, |(_, drawn)| *drawn);
            let mut args = args.to_vec();
            args.push(drawn_here.to_string().into_bytes());
            args
        };
        let timeout = shared.node_timeout(ttl);
        let (raised, late) = round::run(nodes, shared.quorum, timeout, |node| {
            let (script_keys, past, args) =
                (Arc::clone(&script_keys), Arc::clone(&past), args_on(&node));
            async move {
                let answer = node.run_lease(&LEASE_RAISE, &script_keys, &args).await?;
                if answer < 0 {
                    past.fetch_max(answer.unsigned_abs(), std::sync::atomic::Ordering::SeqCst);
                }
                Ok((answer == 1).then_some(0))
            }
        })
        .await;
        if raised.yes.len() >= shared.quorum {
            // As for a mutex: the nodes that missed this round are asked again, in the
            // background, until they answered (the counter is raised whatever they answer).
            // Each node's arguments by its index, not beside a clone of the node: the
            // follow-up outlives `stop`, which must close every node's connection.
            let args: Vec<Vec<Vec<u8>>> = nodes.iter().map(args_on).collect();
            let (script_keys, on) = (Arc::clone(&script_keys), Arc::clone(shared));
            shared.raise_later(late, &raised, keys, timeout, move |node| {
                let args = on
                    .nodes()
                    .ok()
                    .and_then(|nodes| nodes.iter().position(|other| other.same(&node)))
                    .and_then(|index| args.get(index).cloned())
                    .unwrap_or_default();
                let script_keys = Arc::clone(&script_keys);
                async move {
                    node.raise_lease_self_contained(&script_keys, &args)
                        .await
                        .map(|_| Some(0))
                }
            });
            return Ok(Some(value));
        }
        let past = past.load(std::sync::atomic::Ordering::SeqCst);
        if raised.no > 0 && past >= value && past + 1 < MAX_FENCE {
            value = past + 1;
            continue;
        }
        // Lost meanwhile from a node that had granted the lease: as if held. A node whose
        // attempt had not answered may not hold it yet (its request still waiting for its
        // connection or its script, behind which the raise went out): its "no" says nothing
        // of a holder, and the quorum was not reached (as for a mutex, `Shared::raise_fence`).
        if raised.no_at.iter().any(|node| tally.yes.contains(node)) {
            return Ok(None);
        }
        return Err(LockError::QuorumNotReached {
            key: keys.primary().to_string(),
            got: raised.yes.len(),
            needed: shared.quorum,
            failures: raised.failures(),
        });
    }
    Ok(None)
}

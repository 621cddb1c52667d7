#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod config;
mod fair;
mod lease;
mod node;
mod pool;
mod pubsub;
mod round;
mod wake;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use config::{ConnectionKind, RedlockConfig};
pub use lease::MAX_SLOT_PERMITS;
use lock_core::{
    Capabilities, Holding, Key, KeyState, Lease, LeaseKind, LockError, LockOptions, Locker, Result,
    Token, metrics,
    raw::{
        FollowUp, Handle, InProgress, KeySet, Lock, LockRequest, Settling, async_trait,
        redis as redis_kit, validate,
    },
};
use tokio::time::Instant;

use crate::config::NodeUrl;
use crate::node::{Held, Node};
use crate::round::{Pending, Tally};

/// Waits shorter than this are slept out: a waiter subscribes to release announcements only
/// for longer ones (see `wait_for_release`).
const WAKE_MIN_WAIT: Duration = Duration::from_millis(5);

/// The backend's name in messages and configuration.
pub const NAME: &str = "redlock";

/// The facade's name for this backend on exactly one node, the plain single-Redis lock
/// (see [`RedlockConfig::require_single_node`]).
pub const SINGLE_NODE_NAME: &str = "redis";

/// Appended to a lock's key to name its fencing counter on every node. It begins with the byte
/// 0xFF, which never occurs in UTF-8: every user key is UTF-8, so no user key can ever name a
/// counter, and no counter can ever stand in a user's way.
pub const FENCE_SUFFIX: &[u8] = b"\xff:fence";

/// Added to the drift allowance of every lock, as in the Redlock specification.
const DRIFT_FLOOR: Duration = Duration::from_millis(2);

/// A follow-up whose first round goes out at once: the clean-up of a failed attempt, which is
/// the first release the nodes that answered late or not at all are sent (not counted as
/// re-sent), and sends again the undo that the nodes in `sent_before` failed (counted).
///
/// `shutdown` lets its first round finish (see [`Shared::settling`]): the clean-up, or the
/// release sent again to a node that took the key after the release reached it, may be what
/// takes the last of this client's keys off a node.
struct AtOnce {
    sent_before: Vec<usize>,
    first_round: InProgress,
}

impl AtOnce {
    /// Counted by `shared`'s [`Shared::settling`] from now (before the follow-up is spawned)
    /// until its first round has answered.
    fn new(shared: &Shared, sent_before: Vec<usize>) -> Self {
        Self {
            sent_before,
            first_round: shared.settling.enter(),
        }
    }
}

/// The Redlock algorithm over N independent Redis masters (N = 1 is the plain single-Redis lock).
///
/// One attempt sends `SET key token NX PX ttl` to every node at once and is decided as soon as
/// a majority for or against exists, so a dead or stalled node costs nothing once the others
/// have answered. A win counts only with a quorum (N/2 + 1) and a positive validity
/// (ttl − elapsed − ttl × drift_factor − 2 ms); otherwise every node is cleaned up by token,
/// including those that answered late or not at all.
#[derive(Clone)]
pub struct Redlock {
    shared: Arc<Shared>,
}

struct Shared {
    /// The nodes' connections; taken out (and so closed) by `shutdown`.
    nodes: std::sync::RwLock<Option<Arc<[Node]>>>,
    node_count: usize,
    quorum: usize,
    config: RedlockConfig,
    /// The pub/sub connections (one per node, made by the first waiter) that carry the
    /// release channels and the turn channel.
    pubsub: Arc<pubsub::PubSub>,
    /// The waiters for releases, when `wake_on_release` is on.
    wakeups: Option<Arc<wake::Wakeups>>,
    /// The waiters of fair lines, when `fair` is on.
    fair: Option<Arc<fair::FairLine>>,
    /// Per key, the claims this process's waiting writers left on nodes that their later
    /// attempts did not reach (each attempt has a fresh token): see [`lease::note_claims`].
    claims: lease::Claims,
    /// What `shutdown` lets finish, for [`SETTLE_WAIT`] at most, before it closes the
    /// connections: the answers a release did not wait for, and the first round of each
    /// follow-up sent at once ([`AtOnce`]). Later rounds, for nodes that failed, are not waited
    /// for: those keys expire with their ttl.
    settling: Settling,
}

/// How long `shutdown` waits for [`Shared::settling`].
const SETTLE_WAIT: Duration = lock_core::CLEANUP_WAIT;

impl Redlock {
    /// Validates `config` and prepares one connection per node. Nothing is connected yet: a node
    /// that is down counts as a failed vote until it comes back.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming the bad field (URLs are shown without password), or
    /// when called outside a tokio runtime.
    pub fn new(config: RedlockConfig) -> Result<Self> {
        config.validate()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(LockError::invalid(
                "runtime",
                "create the Redlock backend inside a tokio runtime",
            ));
        }
        let nodes = config
            .urls
            .iter()
            .enumerate()
            .map(|(index, url)| {
                let url = NodeUrl::parse(url)?;
                Node::new(&url, &config).map_err(|e| e.within(&format!("urls[{index}]")))
            })
            .collect::<Result<Vec<_>>>()?;
        let (node_count, quorum) = (nodes.len(), nodes.len() / 2 + 1);
        // 32 hex digits naming a fair client in the lines it waits in, and its turn channel.
        let instance = if config.is_fair() {
            Some(Token::generate()?.expose().to_string())
        } else {
            None
        };
        let pubsub = Arc::new(pubsub::PubSub::new(node_count, instance.as_deref()));
        Ok(Self {
            shared: Arc::new(Shared {
                nodes: std::sync::RwLock::new(Some(Arc::from(nodes))),
                node_count,
                quorum,
                wakeups: config
                    .wakes_on_release()
                    .then(|| Arc::new(wake::Wakeups::new(Arc::clone(&pubsub)))),
                fair: instance
                    .map(|instance| Arc::new(fair::FairLine::new(instance, Arc::clone(&pubsub)))),
                pubsub,
                claims: lease::Claims::default(),
                settling: Settling::default(),
                config,
            }),
        })
    }

    /// A [`Locker`] over a new backend, with the default [`LockOptions`] (set others with
    /// [`Locker::with_options`]).
    ///
    /// # Errors
    /// As [`Redlock::new`].
    pub fn locker(config: RedlockConfig) -> Result<Locker> {
        Locker::new(Self::new(config)?).with_options(LockOptions::default())
    }

    /// How many nodes must agree: N/2 + 1.
    pub fn quorum(&self) -> usize {
        self.shared.quorum
    }

    /// How many nodes there are.
    pub fn node_count(&self) -> usize {
        self.shared.node_count
    }

    /// The configuration this backend was built from.
    pub fn config(&self) -> &RedlockConfig {
        &self.shared.config
    }
}

impl Shared {
    /// The nodes, or [`LockError::Stopped`] after `shutdown`.
    fn nodes(&self) -> Result<Arc<[Node]>> {
        let nodes = self
            .nodes
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        nodes.clone().ok_or(LockError::Stopped)
    }

    fn node_timeout(&self, ttl: Duration) -> Duration {
        self.config.node_timeout_for(ttl)
    }

    /// The local instant until which a lock obtained by a round that started at `start` is
    /// safe, if the round left any validity at all.
    fn valid_until(&self, start: Instant, ttl: Duration) -> Option<Instant> {
        let valid_until = start + ttl.checked_sub(self.drift(ttl))?;
        (valid_until > Instant::now()).then_some(valid_until)
    }

    /// How far the nodes' clocks may run apart from ours over `ttl`.
    fn drift(&self, ttl: Duration) -> Duration {
        ttl.mul_f64(self.config.drift_factor) + DRIFT_FLOOR
    }

    /// The error of an attempt that `who` (the node, the quorum) granted for `key` with no
    /// validity left: the ttl less the clock-drift allowance was spent before the answer came,
    /// or the allowance alone takes the whole ttl.
    pub(crate) fn too_late(&self, who: &str, key: &str, ttl: Duration) -> LockError {
        // One node (`redis`) has no quorum to speak of.
        let who = if self.node_count == 1 {
            "the node"
        } else {
            who
        };
        let drift = self.drift(ttl);
        let message = if drift >= ttl {
            format!(
                "{who} granted `{key}` with no validity: the clock-drift allowance alone ({} ms: drift_factor {} × the ttl + {} ms) takes the whole ttl of {} ms; raise the ttl or lower drift_factor",
                drift.as_millis(),
                self.config.drift_factor,
                DRIFT_FLOOR.as_millis(),
                ttl.as_millis()
            )
        } else {
            format!(
                "{who} for `{key}` answered too late: the ttl of {} ms less the clock-drift allowance of {} ms was spent; raise the ttl",
                ttl.as_millis(),
                drift.as_millis()
            )
        };
        LockError::backend(NAME, message)
    }

    /// Sends compare-and-delete to the nodes at `indices` until each has answered it, as a
    /// [`FollowUp`] (every round after a pause from `timeout` on, or the first at once if
    /// `at_once`) that stops once the keys are gone by themselves (`expires_by`).
    /// Token-checked, so asking twice is harmless. See [`AtOnce`] for what counts as re-sent.
    #[allow(clippy::too_many_arguments)]
    async fn release_until_answered(
        self: Arc<Self>,
        indices: Vec<usize>,
        keys: KeySet,
        token: Token,
        held: Held,
        timeout: Duration,
        expires_by: Instant,
        at_once: Option<AtOnce>,
    ) {
        self.release_as_until_answered(
            indices,
            keys,
            token,
            held,
            timeout,
            expires_by,
            at_once,
            Arc::from(&[][..]),
        )
        .await;
    }

    /// As [`Self::release_until_answered`], also taking the fair waiter `member` (empty for
    /// none) out of the key's line.
    #[allow(clippy::too_many_arguments)]
    async fn release_as_until_answered(
        self: Arc<Self>,
        indices: Vec<usize>,
        keys: KeySet,
        token: Token,
        held: Held,
        timeout: Duration,
        expires_by: Instant,
        at_once: Option<AtOnce>,
        member: Arc<[u8]>,
    ) {
        let wanted = released_when(&keys, held);
        let mut follow_up = FollowUp::new(NAME, metrics::OPERATION_RELEASE, timeout, expires_by);
        let mut first_round = None;
        if let Some(AtOnce {
            sent_before,
            first_round: counted,
        }) = at_once
        {
            // The first round, at once: a first send to the others.
            let resent = indices
                .iter()
                .filter(|index| sent_before.contains(index))
                .count();
            follow_up = follow_up.at_once(resent);
            first_round = Some(counted);
        }
        self.until_answered(follow_up, indices, &keys, timeout, first_round, |node| {
            let (keys, token, member) = (keys.clone(), token.clone(), Arc::clone(&member));
            // Each send carries its script (`SCRIPT LOAD` + `EVALSHA` in one write): a node
            // that lost its scripts (a restart, `SCRIPT FLUSH`) and answers later than the
            // node timeout would otherwise refuse every re-send with NOSCRIPT, the load that
            // follows it never sent, and keep the keys for their ttl.
            async move {
                let deleted = node
                    .release_self_contained(&keys, &token, held, &member)
                    .await;
                deleted.map(|deleted| (deleted == wanted).then_some(0))
            }
        })
        .await;
    }

    /// Sends `op` to the nodes at `indices` until each has answered it (any answer), in the
    /// rounds of `follow_up`, each node under `timeout`. The one follow-up of every operation
    /// that must reach every node (releases, clean-ups, fence raises). `first_round` is
    /// dropped once the first round has answered (or when none is sent).
    async fn until_answered<F, Fut>(
        &self,
        follow_up: FollowUp,
        indices: Vec<usize>,
        keys: &KeySet,
        timeout: Duration,
        mut first_round: Option<InProgress>,
        op: F,
    ) where
        F: Fn(Node) -> Fut,
        Fut: Future<Output = redis::RedisResult<Option<u64>>> + Send + 'static,
    {
        let running = || self.nodes().is_ok();
        follow_up
            .run(indices, running, |indices: Vec<usize>| {
                let op = &op;
                let counted = first_round.take();
                async move {
                    let _counted = counted;
                    // Empty once the lock was stopped.
                    let targets = self.subset(indices.iter().copied());
                    if targets.is_empty() {
                        return Vec::new();
                    }
                    let (tally, rest) = round::run(&targets, targets.len(), timeout, op).await;
                    let late = rest.finish().await;
                    let indices: Vec<usize> = tally
                        .failed_with(&late)
                        .into_iter()
                        .filter_map(|target| indices.get(target).copied())
                        .collect();
                    if !indices.is_empty() {
                        tracing::debug!(
                            key = %keys.primary(),
                            nodes = indices.len(),
                            failures = %tally.failures(),
                            "not answered; asking again"
                        );
                    }
                    indices
                }
            })
            .await;
    }

    /// Fails when a node stores one of `keys` as something other than a mutex: another kind of
    /// lock ([`LockError::KindMismatch`]) or a Redis value that is not a lock.
    async fn refuse_foreign_types(
        &self,
        nodes: &[Node],
        keys: &KeySet,
        kind: LeaseKind,
        ttl: Duration,
    ) -> Result<()> {
        let timeout = self.node_timeout(ttl);
        let asks = nodes.iter().map(|node| async move {
            (
                node,
                tokio::time::timeout(timeout, node.describe(keys)).await,
            )
        });
        for (node, answer) in futures::future::join_all(asks).await {
            let Ok(Ok(found)) = answer else { continue };
            for (key, found) in keys.iter().zip(found) {
                lease::refuse(key, &found, kind, node)?;
            }
        }
        Ok(())
    }

    /// The fencing counters beside `keys` (one per key), when fencing is on.
    fn fence_keys(&self, keys: &[Key]) -> Option<Arc<[Vec<u8>]>> {
        self.config.fencing.then(|| {
            keys.iter()
                .map(|key| [key.as_bytes(), FENCE_SUFFIX].concat())
                .collect()
        })
    }

    /// The second round of a fenced acquisition: raises every key's counter on every node to
    /// the fence this acquisition drew, and needs a quorum of nodes that still hold our token.
    /// `Some(fence)` when raised on a quorum, `None` when our keys vanished from nodes that had
    /// granted them (`won`, the attempt's yes votes). Nodes that failed or did not answer are
    /// asked again in the background.
    ///
    /// Why it makes fences increase on every key: a later holder's quorum meets this quorum on
    /// at least one node, whose counters were raised while our keys sat there, so the later
    /// holder's draw there (made after our keys left) counts past our fence — unless that node
    /// lost its data meanwhile, and then only its clock counts (see the crate docs).
    async fn raise_fence(
        self: &Arc<Self>,
        nodes: &[Node],
        keys: &KeySet,
        token: &Token,
        fences: &Arc<[Vec<u8>]>,
        (fence, won): (u64, &[usize]),
        ttl: Duration,
    ) -> Result<Option<u64>> {
        let timeout = self.node_timeout(ttl);
        let (raised, rest) = round::run(nodes, self.quorum, timeout, |node| {
            self.raise_on(node, keys, token, fences, fence, ttl, false)
        })
        .await;
        // The slower nodes' counters are raised too, off the caller's path, and those that
        // failed are asked again: a node that missed the raise and later meets a quorum of
        // nodes that lost their data would otherwise hand out a smaller token.
        let (shared, raised_keys, token, fences) = (
            Arc::clone(self),
            keys.clone(),
            token.clone(),
            Arc::clone(fences),
        );
        self.raise_later(rest, &raised, keys, timeout, move |node| {
            shared.raise_on(node, &raised_keys, &token, &fences, fence, ttl, true)
        });
        if raised.yes.len() >= self.quorum {
            return Ok(Some(fence));
        }
        // Our keys vanished meanwhile from nodes that had granted them: as if the lock had
        // been held. A node whose attempt had not answered may not hold them yet (its request
        // still waiting for its connection or its script, behind which the raise went out):
        // its "not ours" says nothing of a holder, and the quorum was not reached.
        if raised.no_at.iter().any(|node| won.contains(node)) {
            return Ok(None);
        }
        Err(LockError::QuorumNotReached {
            key: keys.primary().to_string(),
            got: raised.yes.len(),
            needed: self.quorum,
            failures: raised.failures(),
        })
    }

    /// The end of a fence raise round (a mutex's or a lease's): the requests still out run on,
    /// off the caller's path, and the nodes that failed, in the round or after it, are sent
    /// `op` again until each answered (`op` re-sends carry their script). A node that missed
    /// the raise and later meets a quorum of nodes that lost their data would otherwise hand
    /// out a smaller token.
    fn raise_later<F, Fut>(
        self: &Arc<Self>,
        rest: Pending,
        raised: &Tally,
        keys: &KeySet,
        timeout: Duration,
        op: F,
    ) where
        F: Fn(Node) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = redis::RedisResult<Option<u64>>> + Send + 'static,
    {
        let failed: Vec<usize> = raised.failed.iter().map(|(index, _)| *index).collect();
        if rest.is_empty() && failed.is_empty() {
            return;
        }
        let (shared, keys) = (Arc::clone(self), keys.clone());
        tokio::spawn(async move {
            let late = rest.finish().await;
            let failed = failed
                .into_iter()
                .chain(late.failed.into_iter().map(|(index, _)| index))
                .collect();
            let expires_by = Instant::now() + validate::MAX_TTL;
            let raise = FollowUp::new(NAME, metrics::OPERATION_FENCE_RAISE, timeout, expires_by);
            shared
                .until_answered(raise, failed, &keys, timeout, None, op)
                .await;
        });
    }

    /// One node's raise of the fencing counters; yes when it still holds every key.
    /// `resent`: the follow-up's, which carries its script (a node that lost its scripts and
    /// answers late would otherwise never run it).
    #[allow(clippy::too_many_arguments)]
    fn raise_on(
        &self,
        node: Node,
        keys: &KeySet,
        token: &Token,
        fences: &Arc<[Vec<u8>]>,
        fence: u64,
        ttl: Duration,
        resent: bool,
    ) -> impl Future<Output = redis::RedisResult<Option<u64>>> + Send + use<> {
        let (keys, token, fences) = (keys.clone(), token.clone(), Arc::clone(fences));
        async move {
            node.raise_fence(&keys, &fences, &token, fence, ttl, resent)
                .await
                .map(|held| held.then_some(0))
        }
    }

    fn subset(&self, indices: impl IntoIterator<Item = usize>) -> Vec<Node> {
        let Ok(nodes) = self.nodes() else {
            return Vec::new();
        };
        indices
            .into_iter()
            .filter_map(|index| nodes.get(index).cloned())
            .collect()
    }

    /// Takes back, in the background, the claims this process's writers left on `key` under a
    /// token other than `but` (earlier attempts', on nodes their later attempts did not reach),
    /// token-checked: a claim is only a hint, so one of a writer still waiting here costs it
    /// no more than its next attempt leaves again.
    fn take_back_claims(
        self: &Arc<Self>,
        key: &Key,
        acquisition: u64,
        but: Option<&Token>,
        ttl: Duration,
    ) {
        for (token, nodes) in self.claims.take(key, acquisition, but) {
            let timeout = self.node_timeout(ttl);
            let expires_by = Instant::now() + ttl + self.drift(ttl);
            tokio::spawn(Arc::clone(self).release_until_answered(
                nodes,
                KeySet::one(key.clone()),
                token,
                Held::Set {
                    tags: "w",
                    claim: true,
                },
                timeout,
                expires_by,
                Some(AtOnce::new(self, Vec::new())),
            ));
        }
    }

    /// Compare-and-delete on `nodes`; a vote is yes when every key was ours. `member`, when
    /// given, leaves the fair line of the key on every node too (a waiter that won over several
    /// nodes may still stand in the line of one that refused it).
    async fn release_on(
        &self,
        nodes: &[Node],
        keys: &KeySet,
        token: &Token,
        held: Held,
        timeout: Duration,
        member: Option<&Arc<[u8]>>,
    ) -> (Tally, Pending) {
        let quorum = self.quorum.min(nodes.len().max(1));
        let wanted = released_when(keys, held);
        round::run(nodes, quorum, timeout, |node| {
            let (keys, token, member) = (keys.clone(), token.clone(), member.cloned());
            async move {
                node.release_for(&keys, &token, held, member.as_deref().unwrap_or_default())
                    .await
                    .map(|deleted| (deleted == wanted).then_some(0))
            }
        })
        .await
    }

    /// The end of a mutex round that won a quorum with validity left (until `valid_until`),
    /// the same for every round: with fencing, the fences raised on a quorum (a second round);
    /// then the lock, if validity is still left. Fences not raised: the attempt is undone (with
    /// the fair waiter `line`'s place, see [`Shared::undo_attempt`]) and its answer settles it.
    /// The validity spent by the raise (our keys found gone after it, too): the caller undoes
    /// it, as a round won too late.
    #[allow(clippy::too_many_arguments)]
    async fn hand_out(
        self: &Arc<Self>,
        nodes: &[Node],
        tally: &Tally,
        pending: Pending,
        (keys, kind, token): (KeySet, LeaseKind, &Token),
        ttl: Duration,
        (start, valid_until): (Instant, Instant),
        fences: Option<&Arc<[Vec<u8>]>>,
        line: Option<(&Token, &Arc<[u8]>)>,
        written_before: bool,
    ) -> HandedOut {
        let fence = match fences {
            None => Ok(None),
            Some(fences) => {
                let fence = (tally.highest, tally.yes.as_slice());
                Box::pin(self.raise_fence(nodes, &keys, token, fences, fence, ttl)).await
            }
        };
        match fence {
            // Without fencing, or raised on a quorum: ours, if the second round left time.
            Ok(fence) if fences.is_none() || fence.is_some() => {
                if Instant::now() >= valid_until {
                    return HandedOut::Spent(pending);
                }
                // Requests still in flight can only add our own token to more nodes, which
                // keeps the lock safe through more node failures: let them run (dropped, one
                // not yet sent, e.g. on a connection still being made, would never be).
                // Release goes to every node anyway, and once more to these when they have
                // answered: a release sent before may overtake the request on its node (a
                // script reloaded after NOSCRIPT, a connection being made) and find nothing,
                // and the key would then stay for the ttl.
                let in_flight = (!pending.is_empty()).then(|| tokio::spawn(pending.finish()));
                HandedOut::Settled(Ok(Some(Box::new(RedlockHandle {
                    shared: Arc::clone(self),
                    lease: lease(keys, kind, token.clone(), valid_until, fence),
                    held: Held::Mutex,
                    ttl,
                    in_flight,
                    written_before,
                    extending: None,
                    line_member: line
                        .map(|(_, member)| member)
                        .filter(|member| !member.is_empty())
                        .cloned(),
                    written_until: valid_until + self.drift(ttl),
                }))))
            }
            // Our keys gone from the nodes once the validity was spent: they expired while the
            // raise was on its way (nobody else need hold the key): the ttl was too short for
            // two rounds, which the caller says, not "held".
            Ok(None) if Instant::now() >= valid_until => HandedOut::Spent(pending),
            outcome => {
                Box::pin(self.undo_attempt(
                    tally,
                    pending,
                    &keys,
                    token,
                    (Held::Mutex, Held::Mutex),
                    ttl,
                    start.elapsed(),
                    line,
                ))
                .await;
                HandedOut::Settled(outcome.map(|_| None))
            }
        }
    }

    /// After a failed attempt: frees what it won at once, and cleans every other node in the
    /// background once their (possibly late) answers are in.
    ///
    /// Nodes still answering get a short grace (twice the time the round took, at most the node
    /// timeout), so that the next attempt does not trip over this one's leftovers on healthy
    /// nodes, while a stalled node still costs nothing. `held` is what the answered nodes
    /// undo, `undo_late` what the requests still in flight undo when they answer (a writer's
    /// claim too). `waiter`, a fair waiter and its member, leaves the line of every node that
    /// refused it late if it has stopped waiting by then (see below). Answers the votes that
    /// came in during the grace.
    #[allow(clippy::too_many_arguments)]
    async fn undo_attempt(
        self: &Arc<Self>,
        tally: &Tally,
        mut pending: Pending,
        keys: &KeySet,
        token: &Token,
        (held, undo_late): (Held, Held),
        ttl: Duration,
        round_took: Duration,
        waiter: Option<(&Token, &Arc<[u8]>)>,
    ) -> Tally {
        let timeout = self.node_timeout(ttl);
        let grace = (round_took * 2 + Duration::from_millis(1)).min(timeout);
        let late = pending.collect_until(Instant::now() + grace).await;
        let won: Vec<usize> = tally.yes.iter().chain(&late.yes).copied().collect();
        let mut failed = tally.failed_with(&late);
        // The nodes whose undo failed: the clean-up sends it to them again.
        let mut undo_failed = Vec::new();
        if !won.is_empty() {
            let (undone, rest) = self
                .release_on(
                    &self.subset(won.iter().copied()),
                    keys,
                    token,
                    held,
                    timeout,
                    None,
                )
                .await;
            let undone_late = rest.finish().await;
            // A node that won and then failed the undo still holds our key: ask it again.
            undo_failed.extend(
                undone
                    .failed_with(&undone_late)
                    .into_iter()
                    .filter_map(|target| won.get(target).copied()),
            );
            failed.extend(&undo_failed);
        }
        if failed.is_empty() && pending.is_empty() {
            return late;
        }
        let (shared, keys, token) = (Arc::clone(self), keys.clone(), token.clone());
        let waiter = waiter.map(|(waiter, member)| (waiter.clone(), Arc::clone(member)));
        let expires_by = Instant::now() + ttl + self.drift(ttl);
        let first_round = self.settling.enter();
        tokio::spawn(async move {
            let late = pending.finish().await;
            // A fair waiter that has stopped waiting by now (it gave up, or won a later round)
            // and was refused late by a node was put (back) in that node's line after its
            // take-back or release had taken it out (an attempt re-sent after NOSCRIPT, a slow
            // node, a pool's other connection): it leaves again, or the key would be reserved
            // there for a waiter that is gone, for the rest of its entry's lease (the ttl). One
            // still waiting keeps its place.
            let gone = waiter.filter(|(waiter, _)| {
                shared
                    .fair
                    .as_ref()
                    .is_some_and(|fair| !fair.waiting(waiter))
            });
            // A node that answered no after the attempt returned may have kept a writer's claim
            // that the caller's take-back, sent meanwhile on another
            // connection of a pool, overtook: it is undone too (token-checked; a writer still
            // waiting leaves its claim again with its next attempt).
            let late_no = late
                .no_at
                .into_iter()
                .filter(|_| undo_late.claims() || gone.is_some());
            let targets = failed
                .into_iter()
                .chain(late.yes)
                .chain(late.failed.into_iter().map(|(i, _)| i))
                .chain(late_no)
                .collect();
            shared
                .release_as_until_answered(
                    targets,
                    keys,
                    token,
                    undo_late,
                    timeout,
                    expires_by,
                    Some(AtOnce {
                        sent_before: undo_failed,
                        first_round,
                    }),
                    gone.map_or_else(|| Arc::from(&[][..]), |(_, member)| member),
                )
                .await;
        });
        late
    }
}

#[async_trait]
impl Lock for Redlock {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        let mut capabilities = Capabilities::NONE
            .with_extend()
            .with_distributed()
            .with_multi_key()
            .with_semaphore()
            .with_read_write();
        if self.shared.wakeups.is_some() {
            capabilities = capabilities.with_wake_on_release();
        }
        if self.shared.config.fencing {
            capabilities = capabilities.with_fencing();
        }
        if self.shared.fair.is_some() {
            capabilities = capabilities.with_fair();
        }
        capabilities
    }

    async fn wait_for_turn(&self, request: &LockRequest, max_wait: Duration) -> Result<bool> {
        match (&self.shared.fair, request.waiter()) {
            (Some(fair), Some(waiter)) => {
                self.shared.nodes()?;
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
        match (&shared.wakeups, keys.first()) {
            // A short wait gains little from a wake-up, and a release wakes every waiting
            // process at once: with short delays and many processes the attempts of the woken
            // cost more than the wake-ups save (16 processes on 3 nodes with 1–5 ms delays: 57 s
            // against 20 s polling, `sixteen_processes_never_overlap_and_fences_never_go_back`).
            (Some(_), Some(_)) if max_wait < WAKE_MIN_WAIT => tokio::time::sleep(max_wait).await,
            (Some(wakeups), Some(key)) => {
                let nodes = shared.nodes()?;
                let timeout = shared.node_timeout(max_wait.max(Duration::from_millis(1)));
                wakeups
                    .wait(&nodes, key.as_str(), shared.quorum, max_wait, timeout)
                    .await;
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
            let shared = &self.shared;
            // The other paths, and the rarer steps of this one, are boxed: the future of an
            // uncontended mutex stays small to build and to box.
            if request.kind() != LeaseKind::Exclusive {
                return Box::pin(lease::try_acquire(shared, request)).await;
            }
            lock_core::raw::redis::refuse_reservation(request.token())?;
            // A fair waiter's first attempt is a plain one, as cheap as without `fair`: a line
            // keeps the key reserved for its head (see `lua/line_pass.lua`), and the attempt
            // gives back a key it took while a line was waiting (a reservation that lapsed, a
            // release by a client without `fair`: see `NodeParts::acquire_fair_plain`), so only
            // a free key with nobody in line is taken; refused, the waiter lines up at once
            // (below). A single try is the same plain attempt, refused as it is (a key it gave
            // back is reserved for the head of the line, which is woken): it never passes a
            // line. Its later attempts, and every attempt with fencing (the script draws the
            // fence in the same round trip), go through the line; so does, on one node, a
            // waiter's first attempt on a key this client's waiters lately lined up on (which
            // a plain attempt would find lined, and be refused: one round trip for nothing).
            let fair = shared.fair.as_ref().filter(|_| request.keys().len() == 1);
            if let Some(fair) = fair
                && (request.after_wait()
                    || shared.config.fencing
                    || (shared.node_count == 1
                        && request.waiter().is_some()
                        && fair.expects_line(request.primary_key())))
            {
                return Box::pin(try_acquire_fair(shared, fair, request)).await;
            }
            // Over several nodes a waiter's place in every line is its client's clock when it
            // arrived: read now, before the plain round (which may wait for a slow node), and
            // kept if this round is refused (a win keeps nothing: no map to clean).
            let arrived = fair
                .filter(|_| shared.node_count > 1)
                .and(request.waiter())
                .map(|_| fair::now_micros());
            let (keys, token, ttl) = (
                request.key_set().clone(),
                request.token().clone(),
                request.ttl(),
            );
            let nodes = shared.nodes()?;
            let fences = shared.fence_keys(&keys);
            let start = Instant::now();
            let (tally, mut pending) =
                round::run(&nodes, shared.quorum, shared.node_timeout(ttl), |node| {
                    let (keys, token, fences) = (keys.clone(), token.clone(), fences.clone());
                    async move { node.acquire(&keys, &token, ttl, fences.as_deref()).await }
                })
                .await;
            tally.trace(start, false);
            if tally.yes.len() >= shared.quorum
                && let Some(valid_until) = shared.valid_until(start, ttl)
            {
                let won = (keys.clone(), request.kind(), &token);
                match shared
                    .hand_out(
                        &nodes,
                        &tally,
                        pending,
                        won,
                        ttl,
                        (start, valid_until),
                        fences.as_ref(),
                        None,
                        false,
                    )
                    .await
                {
                    HandedOut::Settled(settled) => return settled,
                    HandedOut::Spent(left) => pending = left,
                }
            }
            Box::pin(shared.undo_attempt(
                &tally,
                pending,
                &keys,
                &token,
                (Held::Mutex, Held::Mutex),
                ttl,
                start.elapsed(),
                None,
            ))
            .await;
            let key = request.primary_key().to_string();
            if tally.yes.len() >= shared.quorum {
                return Err(shared.too_late("the quorum", &key, ttl));
            }
            if tally.no > 0 {
                // A fair waiter refused lines up (the line's attempt looks at the key's type).
                if let Some(fair) = fair
                    && let Some(waiter) = request.waiter()
                {
                    if let Some(arrived) = arrived {
                        fair.place_at(waiter, arrived);
                    }
                    return Box::pin(try_acquire_fair(shared, fair, request)).await;
                }
                // `SET NX` on a key of another type (a list, a hash) is refused as if the key were
                // held, forever: look once per acquisition, on its first refusal.
                if !request.after_wait() {
                    shared
                        .refuse_foreign_types(&nodes, &keys, LeaseKind::Exclusive, ttl)
                        .await?;
                }
                return Ok(None);
            }
            tracing::warn!(key, failures = tally.failures(), "quorum not reached");
            Err(LockError::QuorumNotReached {
                key,
                got: tally.yes.len(),
                needed: shared.quorum,
                failures: tally.failures(),
            })
        })
    }

    async fn inspect(&self, key: &Key) -> Result<Vec<KeyState>> {
        let timeout = self.shared.node_timeout(lock_core::raw::validate::MAX_TTL);
        let nodes = self.shared.nodes()?;
        let asks = nodes.iter().map(|node| async move {
            let server = match tokio::time::timeout(timeout, node.info_server()).await {
                Ok(Ok(info)) => redis_kit::server_from_info(&info),
                _ => None,
            };
            let holding = match tokio::time::timeout(timeout, node.held_pttl(key)).await {
                Ok(Ok(pttl)) => redis_kit::holding_from_pttl(pttl),
                Ok(Err(error)) => Holding::Unknown(redis_kit::shown_error(&error)),
                Err(_) => Holding::Unknown(format!("no answer within {} ms", timeout.as_millis())),
            };
            KeyState {
                node: node.label().to_owned(),
                server,
                holding,
            }
        });
        Ok(futures::future::join_all(asks).await)
    }

    /// Closes every node's connection; later calls fail with [`LockError::Stopped`]. First,
    /// for [`lock_core::CLEANUP_WAIT`] at most, lets what operations left running come to an
    /// end: a release that answered once a majority did is let reach the other nodes, and sent
    /// again to one that took the key after it, before the connections close.
    async fn shutdown(&self) -> Result<()> {
        if !self.shared.settling.settled(SETTLE_WAIT).await {
            tracing::warn!(
                running = self.shared.settling.running(),
                "closing before every release reached every node; what is left expires with its ttl"
            );
        }
        self.shared
            .nodes
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        self.shared.pubsub.close().await;
        Ok(())
    }

    fn abandon<'a>(&'a self, request: &'a LockRequest) -> lock_core::raw::Answer<'a, Result<bool>> {
        // Marked in the call, before anything is sent: the waiter holds no key given to it
        // from now on (see `claim_grant`).
        if let (Some(fair), Some(waiter)) = (&self.shared.fair, request.waiter()) {
            fair.taken_back(waiter, request.ttl());
        }
        lock_core::raw::Answer::later(async move {
            // No attempt can have stored such a token (see `try_acquire`): a fair line's
            // reservation, read back from the store, is left alone.
            if lock_core::raw::redis::is_reservation(request.token()) {
                return Ok(false);
            }
            let shared = &self.shared;
            let (keys, token) = (request.key_set().clone(), request.token());
            let timeout = shared.node_timeout(lock_core::raw::validate::MAX_TTL);
            // The clean-up of a cancelled attempt may be the last thing this process sends: each
            // node gets the script with the call (see `release_self_contained`).
            let held = lease::held_by(request.kind(), shared.node_count);
            let wanted = released_when(&keys, held);
            // A waiter of a fair line leaves it (and the turn passes on if the lock is free).
            let member: Arc<[u8]> = match (&shared.fair, request.waiter()) {
                (Some(fair), Some(waiter)) => {
                    fair.forget(waiter);
                    fair.member(waiter).into()
                }
                _ => Arc::from(&[][..]),
            };
            // Only a writer that waited, or meant to, can have left claims under earlier
            // attempts' tokens: a fail-fast writer giving up must not take back the claims of
            // this process's writers still waiting on the key (each holds readers out).
            if held.claims() && (request.will_wait() || request.after_wait()) {
                shared.take_back_claims(
                    request.primary_key(),
                    request.acquisition(),
                    Some(token),
                    request.ttl(),
                );
            }
            let (mut tally, rest) = round::run(&shared.nodes()?, shared.quorum, timeout, |node| {
                let (keys, token, member) = (keys.clone(), token.clone(), Arc::clone(&member));
                async move {
                    node.release_self_contained(&keys, &token, held, &member)
                        .await
                        .map(|deleted| (deleted == wanted).then_some(0))
                }
            })
            .await;
            let late = rest.finish().await;
            let failed = tally.failed_with(&late);
            tally.yes.extend(late.yes);
            if !failed.is_empty() {
                let expires_by = Instant::now() + request.ttl();
                tokio::spawn(Arc::clone(shared).release_as_until_answered(
                    failed,
                    keys,
                    token.clone(),
                    held,
                    timeout,
                    expires_by,
                    None,
                    member,
                ));
            }
            Ok(!tally.yes.is_empty())
        })
    }
}

/// One attempt at a fair mutex on one key, through the key's waiting line: see
/// `lua/acquire_fair.lua` (several nodes: [`try_acquire_fair_quorum`]).
async fn try_acquire_fair(
    shared: &Arc<Shared>,
    fair: &fair::FairLine,
    request: &LockRequest,
) -> Result<Option<Box<dyn Handle>>> {
    let (key, token, ttl) = (request.primary_key(), request.token(), request.ttl());
    let nodes = shared.nodes()?;
    if nodes.len() > 1 {
        return Box::pin(try_acquire_fair_quorum(shared, fair, request, &nodes)).await;
    }
    let Some(node) = nodes.first() else {
        return Err(LockError::Stopped);
    };
    let timeout = shared.node_timeout(ttl);
    if let Some(handle) = claim_grant(shared, fair, request) {
        return Ok(Some(handle));
    }
    // A waiter far back in line, not woken since its latest attempt, cannot be first yet: its
    // fallback poll is answered here, refused, as the store would (see `FairLine::behind`).
    if let Some(waiter) = request.waiter()
        && request.after_wait()
        && fair.still_behind(waiter)
    {
        tracing::trace!(key = %key, "far back in line; not asking yet");
        return Ok(None);
    }
    let member = match request.waiter() {
        Some(waiter) => {
            fair.listen(waiter, &nodes, timeout).await;
            fair.member(waiter)
        }
        None => Vec::new(),
    };
    let fence = shared
        .config
        .fencing
        .then(|| [key.as_bytes(), FENCE_SUFFIX].concat());
    let start = Instant::now();
    let answer = tokio::time::timeout(
        timeout,
        node.acquire_fair_anchored(
            key,
            token,
            ttl,
            fence.as_deref(),
            &member,
            fair.tell_place_from(ttl),
        ),
    )
    .await;
    let (value, plain) = match answer {
        Ok(Ok(answer)) => {
            if let (Some(waiter), Some(expiry)) = (request.waiter(), answer.expiry) {
                fair.anchor(waiter, key, start, expiry);
            }
            if let Some(waiter) = request.waiter() {
                fair.behind(waiter, answer.place, start.elapsed(), ttl);
            }
            (answer.value, answer.plain)
        }
        Ok(Err(error)) => {
            return Err(LockError::backend(
                NAME,
                format!(
                    "acquire on {}: {}",
                    node.label(),
                    redis_kit::shown_error(&error)
                ),
            ));
        }
        // The outcome is unknown: the core takes the attempt back by token (and the waiter out
        // of the line).
        Err(_) => {
            return Err(LockError::backend(
                NAME,
                format!(
                    "acquire on {}: no answer within {} ms",
                    node.label(),
                    timeout.as_millis()
                ),
            ));
        }
    };
    if value <= 0 {
        if let Some(waiter) = request.waiter() {
            fair.saw_line(key, true);
            if let Ok(left) = u64::try_from(-value - 1) {
                fair.first_in_line(waiter, Duration::from_millis(left));
            }
        }
        // A key of another type (or a lease) would refuse every attempt: looked at once per
        // acquisition, on its first refusal, unless the attempt read the key and found a lock's
        // value or nothing there (`plain`: a waiter's attempt, in the same round trip).
        if !request.after_wait()
            && !plain
            && let Err(error) = shared
                .refuse_foreign_types(&nodes, request.key_set(), LeaseKind::Exclusive, ttl)
                .await
        {
            // The acquisition ends here, with no claim for the core to take back: the waiter
            // the refused attempt put in line leaves it now.
            if let Some(waiter) = request.waiter() {
                fair.forget(waiter);
                let left = tokio::time::timeout(
                    timeout,
                    node.release_self_contained(request.keys(), token, Held::Mutex, &member),
                )
                .await;
                if !matches!(left, Ok(Ok(_))) {
                    tracing::debug!(key = %key, "a waiter refused for a foreign type could not leave the line; its entry expires with its ttl");
                }
            }
            return Err(error);
        }
        return Ok(None);
    }
    if let Some(waiter) = request.waiter() {
        fair.forget(waiter);
        if !request.after_wait() {
            fair.saw_line(key, false);
        }
    }
    let Some(valid_until) = shared.valid_until(start, ttl) else {
        let expires_by = Instant::now() + ttl;
        tokio::spawn(Arc::clone(shared).release_until_answered(
            vec![0],
            request.key_set().clone(),
            token.clone(),
            Held::Mutex,
            timeout,
            expires_by,
            Some(AtOnce::new(shared, Vec::new())),
        ));
        return Err(shared.too_late("the node", key.as_ref(), ttl));
    };
    // With one node, the value drawn there is the fence: no raise round is needed.
    let fence = shared
        .config
        .fencing
        .then(|| u64::try_from(value).unwrap_or_default());
    Ok(Some(Box::new(RedlockHandle {
        shared: Arc::clone(shared),
        lease: lease(
            request.key_set().clone(),
            request.kind(),
            token.clone(),
            valid_until,
            fence,
        ),
        held: Held::Mutex,
        ttl,
        in_flight: None,
        written_before: false,
        extending: None,
        line_member: None,
        written_until: valid_until + shared.drift(ttl),
    })))
}

/// The lock a fair waiter on one node holds without asking, when the node gave it the key as it
/// passed the turn: its latest attempt renewed its place in line to lapse at the expiry the
/// grant names (see `lua/line_pass.lua`), so the key, reserved for it until then, lives at least
/// a ttl past that attempt's send time, from which its validity counts. The reservation is the
/// lock: its value is the token, and the release takes the waiter out of the line. Not with
/// fencing (the fence is drawn by an attempt), not after a take-back of one of the waiter's
/// attempts (it gives the reservation up, maybe after the grant), and not with less than half
/// a ttl left: then the waiter asks, as without a grant, and the attempt takes its turn.
fn claim_grant(
    shared: &Arc<Shared>,
    fair: &fair::FairLine,
    request: &LockRequest,
) -> Option<Box<dyn Handle>> {
    let waiter = request.waiter()?;
    if !request.after_wait() || shared.config.fencing {
        return None;
    }
    let sent = fair.granted(waiter, request.primary_key())?;
    let ttl = request.ttl();
    // The entry's expiry was the node's clock floored to the ms, plus the ttl: up to a ms
    // before a ttl past the renewal, which the drift floor alone would have to absorb.
    let valid_until = shared.valid_until(sent, ttl.saturating_sub(GRANT_MARGIN))?;
    if valid_until.saturating_duration_since(Instant::now()) < ttl / 2 {
        return None;
    }
    let member = fair.member(waiter);
    let token = Token::from_stored(
        String::from_utf8([lock_core::raw::redis::RESERVED.as_bytes(), &member].concat()).ok()?,
    )
    .ok()?;
    fair.forget(waiter);
    tracing::debug!(key = %request.primary_key(), "the turn came with the key");
    Some(Box::new(RedlockHandle {
        shared: Arc::clone(shared),
        lease: lease(
            request.key_set().clone(),
            LeaseKind::Exclusive,
            token,
            valid_until,
            None,
        ),
        held: Held::Mutex,
        ttl,
        in_flight: None,
        written_before: false,
        extending: None,
        line_member: Some(member.into()),
        written_until: valid_until + shared.drift(ttl),
    }))
}

/// Taken off a granted lock's validity besides the drift (see `claim_grant`).
const GRANT_MARGIN: Duration = Duration::from_millis(1);

/// One attempt at a fair mutex on one key over several nodes: the same attempt as on one node
/// (`lua/acquire_fair.lua`) on every node at once, the waiter joining each node's line at the
/// place its client chose ([`fair::FairLine::place`]), so that every node puts the same waiter
/// first and a release reserves the key on all of them for it. A quorum wins, as any Redlock
/// round (the lines order waiters; the quorum alone keeps the lock exclusive).
///
/// Missing the quorum, the keys this attempt took stay reserved for its waiter where it is
/// still first in line (`lua/line_keep.lua`: it waits for the other nodes' turns, not woken for
/// the same one again) if the nodes that answered could make a quorum, and are released
/// otherwise (a waiter cut off from a quorum must not sit on the turns it can reach); a waiter first in line behind holders
/// retries by itself when the longest-lived of them expires, if no turn comes first.
async fn try_acquire_fair_quorum(
    shared: &Arc<Shared>,
    fair: &fair::FairLine,
    request: &LockRequest,
    nodes: &Arc<[Node]>,
) -> Result<Option<Box<dyn Handle>>> {
    let (key, token, ttl) = (request.primary_key(), request.token(), request.ttl());
    let keys = request.key_set().clone();
    let timeout = shared.node_timeout(ttl);
    let (member, place): (Arc<[u8]>, Option<u64>) = match request.waiter() {
        Some(waiter) => {
            // The place first: subscribing may wait for a slow node, and a waiter's place is
            // when it arrived, not when its subscriptions were made.
            let place = fair.place(waiter);
            fair.listen(waiter, nodes, timeout).await;
            (fair.member(waiter).into(), Some(place))
        }
        None => (Arc::from(&[][..]), None),
    };
    // What a round this waiter does not win leaves behind if it stops waiting before the
    // round's late answers are in (see `Shared::undo_attempt`).
    let line_waiter = request.waiter().map(|waiter| (waiter, &member));
    // Refused by the plain round (`Lock::try_acquire`), which sent this same token to every
    // node: its `SET` may still land on a slow node, before this round's request there.
    let written_before = !(request.after_wait() || shared.config.fencing);
    let fences = shared.fence_keys(std::slice::from_ref(key));
    // The holders' time left, from the nodes where this waiter is first in line behind one.
    let behind: Arc<std::sync::Mutex<Vec<u64>>> = Arc::default();
    let start = Instant::now();
    let (mut tally, pending) = round::run(nodes, shared.quorum, timeout, |node| {
        let (key, token, member, fences, behind) = (
            key.clone(),
            token.clone(),
            Arc::clone(&member),
            fences.clone(),
            Arc::clone(&behind),
        );
        async move {
            let fence = fences.as_deref().and_then(<[Vec<u8>]>::first);
            let value = node
                .acquire_fair(&key, &token, ttl, fence.map(Vec::as_slice), &member, place)
                .await?;
            if value > 0 {
                return Ok(Some(u64::try_from(value).unwrap_or_default()));
            }
            if let Ok(left) = u64::try_from(-value - 1) {
                behind
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(left);
            }
            Ok(None)
        }
    })
    .await;
    tally.trace(start, true);
    let won = tally.yes.len() >= shared.quorum;
    let mut pending = pending;
    if won && let Some(valid_until) = shared.valid_until(start, ttl) {
        let won = (keys.clone(), request.kind(), token);
        match shared
            .hand_out(
                nodes,
                &tally,
                pending,
                won,
                ttl,
                (start, valid_until),
                fences.as_ref(),
                line_waiter,
                written_before,
            )
            .await
        {
            HandedOut::Settled(settled) => {
                if let (Ok(Some(_)), Some(waiter)) = (&settled, request.waiter()) {
                    fair.forget(waiter);
                }
                return settled;
            }
            HandedOut::Spent(left) => pending = left,
        }
    }
    // Not won: the turns this waiter took stay its own (see above); the rest is undone.
    let round_took = start.elapsed();
    if place.is_some() && !won {
        // The answers still coming are awaited as the undo would (twice the round at most): a
        // node that took the key but answered after the refusals decided the round keeps the
        // turn as well as one that answered first. (They cannot make a quorum: the round was
        // decided against it.)
        let grace = (round_took * 2 + Duration::from_millis(1)).min(timeout);
        let late = pending.collect_until(Instant::now() + grace).await;
        tally.yes.extend(late.yes);
        tally.drawn.extend(late.drawn);
        tally.no += late.no;
        tally.no_at.extend(late.no_at);
        tally.failed.extend(late.failed);
    }
    let got = tally.yes.len();
    // Only where the nodes that answered could still make a quorum: the turns of those that
    // refused may come. Without them (the others failed: down, or cut off from this client) a
    // kept turn could never be used, and would hold every other waiter out of that node for as
    // long as this one keeps trying: it is released and passes on.
    if let Some(place) = place
        && !won
        && !tally.yes.is_empty()
        && tally.yes.len() + tally.no >= shared.quorum
    {
        let took = std::mem::take(&mut tally.yes);
        tally.drawn.clear();
        let keeps = took.iter().map(|index| {
            let node = &nodes[*index];
            let member = &member;
            async move {
                let kept =
                    tokio::time::timeout(timeout, node.keep_turn(key, token, ttl, member, place))
                        .await;
                (*index, matches!(kept, Ok(Ok(_))))
            }
        });
        for (index, kept) in futures::future::join_all(keeps).await {
            if !kept {
                // Unknown: released as any attempt's leftover would be.
                tally.yes.push(index);
            }
        }
    }
    Box::pin(shared.undo_attempt(
        &tally,
        pending,
        &keys,
        token,
        (Held::Mutex, Held::Mutex),
        ttl,
        round_took,
        line_waiter,
    ))
    .await;
    if won {
        return Err(shared.too_late("the quorum", key.as_ref(), ttl));
    }
    if tally.no == 0 {
        // Still waiting (the core retries): its place in every line is kept.
        tracing::warn!(key = %key, failures = tally.failures(), "quorum not reached");
        return Err(LockError::QuorumNotReached {
            key: key.to_string(),
            got,
            needed: shared.quorum,
            failures: tally.failures(),
        });
    }
    if let Some(waiter) = request.waiter() {
        let longest = behind
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .copied()
            .max();
        if let Some(left) = longest {
            fair.first_in_line(waiter, Duration::from_millis(left));
        }
    }
    if !request.after_wait()
        && let Err(error) = shared
            .refuse_foreign_types(nodes, &keys, LeaseKind::Exclusive, ttl)
            .await
    {
        // The acquisition ends here, with no claim for the core to take back: the waiter
        // leaves every line the refused attempt put it in.
        if let Some(waiter) = request.waiter() {
            fair.forget(waiter);
            tokio::spawn(Arc::clone(shared).release_as_until_answered(
                (0..nodes.len()).collect(),
                keys,
                token.clone(),
                Held::Mutex,
                timeout,
                Instant::now() + ttl,
                Some(AtOnce::new(shared, Vec::new())),
                member,
            ));
        }
        return Err(error);
    }
    Ok(None)
}

/// How many keys a release that succeeded reports: every key of a mutex, one lease.
fn released_when(keys: &KeySet, held: Held) -> usize {
    match held {
        Held::Mutex => keys.len(),
        Held::Set { .. } | Held::Slot(_) => 1,
    }
}

impl fmt::Debug for Redlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redlock")
            .field("nodes", &self.shared.nodes())
            .field("quorum", &self.shared.quorum)
            .field("config", &self.shared.config)
            .finish()
    }
}

/// A lock held on a quorum of nodes: a mutex, or a lease (a permit, a read or a write lock).
struct RedlockHandle {
    shared: Arc<Shared>,
    /// Keys, token, validity and the fencing token (when fencing is on).
    lease: Lease,
    /// What is held, which says how to extend and release it.
    held: Held,
    ttl: Duration,
    /// The acquisition's requests to the nodes that had not answered when the quorum decided.
    in_flight: Option<tokio::task::JoinHandle<Tally>>,
    /// The token was sent to the nodes by an earlier round of the same attempt (a fair
    /// waiter's plain round): a release that deleted the keys on a node may have deleted that
    /// round's late write, not this acquisition's, which can still land behind it there.
    written_before: bool,
    /// The last extend's requests to the nodes that had not answered when its quorum decided:
    /// the next extend drops those not yet written, which would otherwise reach their node
    /// after it (a request waiting for its script to be loaded after `NOSCRIPT`) and set the
    /// earlier extend's expiry again there.
    extending: Option<tokio::task::JoinHandle<Tally>>,
    /// The fair waiter that won this lock over several nodes: the release takes it out of every
    /// node's line (one that refused it may still have it, even reserve the key for it).
    line_member: Option<Arc<[u8]>>,
    /// Until when the keys may live on a node, by the writes sent so far (the acquisition, each
    /// extend from the moment it is sent): the release's follow-ups run until then. Not the
    /// validity, which may end long before the keys do (a downgrade in doubt ends it at once):
    /// a release that overtook the acquisition on a slow node would then never be sent again,
    /// and the key would stay there for its ttl (`tests/tests/attack_s32b.rs`).
    written_until: Instant,
}

/// What a won round comes to (see [`Shared::hand_out`]).
enum HandedOut {
    /// Settled: the lock, or the answer of an attempt undone because its fences were not
    /// raised.
    Settled(Result<Option<Box<dyn Handle>>>),
    /// The fence raise spent the validity: the in-flight requests, for the caller's undo.
    Spent(Pending),
}

/// The lease a granted request holds.
fn lease(
    keys: KeySet,
    kind: LeaseKind,
    token: Token,
    valid_until: Instant,
    fence: Option<u64>,
) -> Lease {
    let lease = Lease::from_parts(keys, kind, token, valid_until);
    match fence {
        Some(fence) => lease.with_fencing_token(fence),
        None => lease,
    }
}

impl RedlockHandle {
    fn key(&self) -> String {
        self.lease.key().to_string()
    }

    /// The error for a round that did not reach a quorum: lost if a majority said so.
    fn lost_or_unreachable(&self, tally: &Tally) -> LockError {
        let shared = &self.shared;
        if tally.no > shared.node_count - shared.quorum {
            LockError::NotHeld { key: self.key() }
        } else {
            tracing::warn!(
                key = self.key(),
                failures = tally.failures(),
                "quorum not reached"
            );
            LockError::QuorumNotReached {
                key: self.key(),
                got: tally.yes.len(),
                needed: shared.quorum,
                failures: tally.failures(),
            }
        }
    }
}

#[async_trait]
impl Handle for RedlockHandle {
    fn lease(&self) -> &Lease {
        &self.lease
    }

    async fn extend(&mut self, ttl: Duration) -> Result<()> {
        if !self.lease.is_valid() {
            return Err(LockError::NotHeld { key: self.key() });
        }
        let shared = Arc::clone(&self.shared);
        let nodes = shared.nodes()?;
        if let Some(late) = self.extending.take() {
            // Superseded by this extend. Once the task is gone, a request of it is either
            // written already (this extend's follows it on that connection) or never will be.
            late.abort();
            let _ = late.await;
        }
        let start = Instant::now();
        // From here the nodes may take the new expiry, whatever becomes of this extend (counted
        // as the acquisition's is: a node's clock may run slow by the drift).
        self.written_until = self.written_until.max(start + ttl + shared.drift(ttl));
        let (tally, in_flight) =
            round::run(&nodes, shared.quorum, shared.node_timeout(ttl), |node| {
                let (keys, token, held) = (
                    self.lease.key_set().clone(),
                    self.lease.token().clone(),
                    self.held,
                );
                async move {
                    node.extend(&keys, &token, held, ttl)
                        .await
                        .map(|extended| extended.then_some(0))
                }
            })
            .await;
        self.extending = in_flight.run_on();
        if tally.yes.len() >= shared.quorum {
            // The quorum took the new expiry. A round that spent the ttl leaves a validity in
            // the past, which the guard reports as an extend answered too late.
            self.lease
                .set_valid_until(start + ttl.saturating_sub(shared.drift(ttl)));
            self.ttl = ttl;
            return Ok(());
        }
        // A failed extend leaves the lock as it was: it is neither released nor revived.
        Err(self.lost_or_unreachable(&tally))
    }

    fn release(&mut self) -> lock_core::raw::Answer<'_, Result<()>> {
        lock_core::raw::Answer::later(async move {
            let shared = Arc::clone(&self.shared);
            let timeout = shared.node_timeout(self.ttl);
            let nodes = shared.nodes()?;
            // Acquisition requests still out when this release was sent may land after it.
            let in_flight = self.in_flight.take().filter(|task| !task.is_finished());
            let (tally, pending) = shared
                .release_on(
                    &nodes,
                    self.lease.key_set(),
                    self.lease.token(),
                    self.held,
                    timeout,
                    self.line_member.as_ref(),
                )
                .await;
            // The nodes where this release deleted the keys: it landed behind the acquisition
            // there, which needs no re-send. Those that answer after the quorum are told by the
            // task that waits for them (below), when there is one.
            let mut released: Vec<usize> = tally.yes.iter().copied().collect();
            let (tell_released, released_late) = if in_flight.is_some() && !pending.is_empty() {
                let (tell, told) = tokio::sync::oneshot::channel::<Vec<usize>>();
                (Some(tell), Some(told))
            } else {
                (None, None)
            };
            if let Some(in_flight) = in_flight {
                let expires_by = self.written_until;
                let (shared, keys, token, held) = (
                    Arc::clone(&shared),
                    self.lease.key_set().clone(),
                    self.lease.token().clone(),
                    self.held,
                );
                let member = self.line_member.clone();
                let written_before = self.written_before;
                let first_round = shared.settling.enter();
                tokio::spawn(async move {
                    let Ok(late) = in_flight.await else { return };
                    if let Some(released_late) = released_late {
                        released.extend(released_late.await.unwrap_or_default());
                    }
                    // A node that took the key late, or whose answer never came (it may still
                    // land behind this), hears the release again; so does one that refused a
                    // waiting writer late, which left the writer's claim there after the
                    // release had found nothing (token-checked: the claim is this lease's),
                    // and one that refused a fair waiter late: the attempt put the waiter back
                    // in that node's line after the release had taken it out (an attempt
                    // re-sent after NOSCRIPT lands behind a release sent meanwhile), and the
                    // key would be reserved for it, gone, for the rest of its entry's lease.
                    let late_no = late
                        .no_at
                        .into_iter()
                        .filter(|_| held.claims() || member.is_some());
                    // A node that took the key late and whose release then deleted it heard
                    // the release after the acquisition: nothing of ours is left there. Unless
                    // an earlier round of the attempt wrote the same token there: the release
                    // may have deleted that write, and this acquisition landed after it (its
                    // script reloaded after NOSCRIPT, a pool's other connection).
                    let targets: Vec<usize> = late
                        .yes
                        .into_iter()
                        .filter(|index| written_before || !released.contains(index))
                        .chain(late.failed.into_iter().map(|(index, _)| index))
                        .chain(late_no)
                        .collect();
                    // Each of them was sent the release already: this is a re-send (with the
                    // waiter, which leaves the line again).
                    let sent_before = targets.clone();
                    shared
                        .release_as_until_answered(
                            targets,
                            keys,
                            token,
                            held,
                            timeout,
                            expires_by,
                            Some(AtOnce {
                                sent_before,
                                first_round,
                            }),
                            member.unwrap_or_else(|| Arc::from(&[][..])),
                        )
                        .await;
                });
            }
            let failed: Vec<usize> = tally.failed.iter().map(|(index, _)| *index).collect();
            if !pending.is_empty() || !failed.is_empty() {
                // Every node must hear the release, not only the majority that decided it: the
                // slower ones are awaited and those that failed are asked again, off the caller's
                // path, until the keys would be gone by themselves.
                let expires_by = self.written_until;
                let (shared, keys, token, held) = (
                    Arc::clone(&shared),
                    self.lease.key_set().clone(),
                    self.lease.token().clone(),
                    self.held,
                );
                // With the waiter that won, as the first send: a node that refused it may
                // still have it in line, and a lost release would leave it there.
                let member = self
                    .line_member
                    .clone()
                    .unwrap_or_else(|| Arc::from(&[][..]));
                // The answers still coming are let come before `shutdown` closes the
                // connections (a request not yet written, its script reloaded after NOSCRIPT,
                // would be lost); the re-sends to the nodes that failed are not waited for.
                let answers = shared.settling.enter();
                tokio::spawn(async move {
                    let late = pending.finish().await;
                    if let Some(tell) = tell_released {
                        let _ = tell.send(late.yes.iter().copied().collect());
                    }
                    drop(answers);
                    let failed = failed
                        .into_iter()
                        .chain(late.failed.into_iter().map(|(index, _)| index))
                        .collect();
                    shared
                        .release_as_until_answered(
                            failed, keys, token, held, timeout, expires_by, None, member,
                        )
                        .await;
                });
            }
            if tally.yes.len() >= shared.quorum {
                return Ok(());
            }
            Err(self.lost_or_unreachable(&tally))
        })
    }

    /// Turns every node's write entry into a read entry with the same expiry. A round that
    /// does not reach a quorum leaves the lock in doubt (some nodes may admit readers already),
    /// so the handle then counts as lost: its validity ends at once.
    async fn downgrade(&mut self) -> Result<()> {
        if !matches!(self.held, Held::Set { tags: "rw", .. }) {
            return Err(LockError::Unsupported {
                backend: NAME,
                capability: "downgrade of anything but a write lock",
            });
        }
        if !self.lease.is_valid() {
            return Err(LockError::NotHeld { key: self.key() });
        }
        let shared = Arc::clone(&self.shared);
        let nodes = shared.nodes()?;
        let (tally, in_flight) = round::run(
            &nodes,
            shared.quorum,
            shared.node_timeout(self.ttl),
            |node| {
                let (keys, token) = (self.lease.key_set().clone(), self.lease.token().clone());
                async move {
                    node.downgrade(&keys, &token)
                        .await
                        .map(|downgraded| downgraded.then_some(0))
                }
            },
        )
        .await;
        // Never superseded: an extend after it keeps whatever tag each node holds, and this
        // keeps the expiry an extend set.
        drop(in_flight.run_on());
        if tally.yes.len() >= shared.quorum {
            self.lease.set_downgraded();
            return Ok(());
        }
        // In doubt: the lease ends here, for the guard, its watchdog and the waiters alike.
        self.lease.set_valid_until(Instant::now());
        Err(self.lost_or_unreachable(&tally))
    }
}

impl fmt::Debug for RedlockHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedlockHandle")
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

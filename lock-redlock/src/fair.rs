//! Fair waiting across processes (`fair`): waiters line up in a sorted set beside the key on
//! each node (see `lock_core::raw::redis::LINE_SCRIPT`), and the head of the line is woken
//! alone, by a message naming it on the channel of its client (`lock-turn:<instance>`), which
//! every fair client subscribes to on every node, on its first wait. With one node the line is
//! ordered by the server's clock; with several, by a place each waiter chooses once (its
//! client's clock when it first lines up, in µs), so that every node orders the same waiters
//! alike and a release reserves the key on all of them for the same waiter. A lost message
//! costs the waiter its fallback poll at most (the longer of its retry delay and 200 ms, a
//! quarter of the ttl at most: see the core's retry loop). The turn channel shares the client's
//! one pub/sub connection per node with the release channels (see `pubsub.rs`, which also says
//! what a lost connection does).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lock_core::Token;
use lock_core::raw::redis::line_member;
use lock_core::raw::wake::{PruneSchedule, TurnRegistry};

use crate::node::Node;
use crate::pubsub::{Channel, PubSub};

/// The waiters of one fair client and its subscription.
pub(crate) struct FairLine {
    /// 32 hex digits naming this client in the members of every line it waits in.
    instance: String,
    turns: TurnRegistry,
    /// The client's pub/sub connections, which carry the turn channel.
    pubsub: Arc<PubSub>,
    /// The place in line each waiter chose (several nodes only), in µs since the Unix epoch,
    /// and when it was last asked for (same clock): a waiter still waiting asks at every
    /// attempt, and only places nobody asked for lately are pruned.
    places: Mutex<HashMap<String, (u64, u64)>>,
    /// When `places` is pruned next (once it has doubled: its places may all be live).
    places_pruned: PruneSchedule,
    /// The keys on which a waiter of this client was lately refused and lined up (one node),
    /// with when: a waiter's first attempt on such a key goes through the line at once rather
    /// than trying a plain `SET NX` first, which a lined key refuses (see
    /// [`FairLine::expects_line`]). `lined_any` is false while the map is empty, so that an
    /// uncontended attempt reads one atomic.
    lined: Mutex<HashMap<String, tokio::time::Instant>>,
    lined_any: AtomicBool,
}

/// How long a key a waiter lined up on is expected to have a line still (see
/// [`FairLine::expects_line`]).
const LINED_FOR: Duration = Duration::from_secs(1);

/// The most keys [`FairLine::expects_line`] remembers: past it, the stale ones are dropped, and
/// all of them when none is.
const LINED_AT_MOST: usize = 1024;

/// Places nobody asked for this long are dropped once more than `TURN_PRUNE_ABOVE` waiters
/// have one, and twice what the previous prune left (an acquisition that ended without
/// `forget`); a waiter still waiting asks at every attempt, however long ago it arrived.
const PLACE_IDLE: Duration = lock_core::raw::wake::TURN_IDLE;

impl FairLine {
    /// The fair waiters of the client named `instance` (32 hex digits), whose turn channel
    /// `pubsub` carries.
    pub(crate) fn new(instance: String, pubsub: Arc<PubSub>) -> Self {
        Self {
            instance,
            turns: pubsub.turns().cloned().unwrap_or_default(),
            pubsub,
            places: Mutex::new(HashMap::new()),
            places_pruned: PruneSchedule::default(),
            lined: Mutex::new(HashMap::new()),
            lined_any: AtomicBool::new(false),
        }
    }

    /// Whether a waiter of this client lined up on `key` within [`LINED_FOR`] and none took it
    /// at its first attempt since: a hint (a wrong one costs a round trip, never a lock) that
    /// the key still has a line, so that a waiter's first attempt goes through it at once.
    pub(crate) fn expects_line(&self, key: &lock_core::Key) -> bool {
        if !self.lined_any.load(Ordering::Relaxed) {
            return false;
        }
        self.lined
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key.as_str())
            .is_some_and(|at| at.elapsed() < LINED_FOR)
    }

    /// A waiter of this client was refused on `key` and lined up (`true`), or took it at its
    /// first attempt (`false`): see [`FairLine::expects_line`].
    pub(crate) fn saw_line(&self, key: &lock_core::Key, lined: bool) {
        if !lined && !self.lined_any.load(Ordering::Relaxed) {
            return;
        }
        let mut keys = self.lined.lock().unwrap_or_else(PoisonError::into_inner);
        if lined {
            if keys.len() >= LINED_AT_MOST && !keys.contains_key(key.as_str()) {
                keys.retain(|_, at| at.elapsed() < LINED_FOR);
                if keys.len() >= LINED_AT_MOST {
                    keys.clear();
                }
            }
            keys.insert(key.as_str().to_owned(), tokio::time::Instant::now());
        } else {
            keys.remove(key.as_str());
        }
        self.lined_any.store(!keys.is_empty(), Ordering::Relaxed);
    }

    /// `waiter`'s place in every node's line: chosen on its first call (this client's clock,
    /// in µs since the Unix epoch), the same on every later one, so that a waiter that left a
    /// node's line (it took a turn there but not a quorum) joins it again where it stood.
    /// Clocks of clients that disagree reorder their waiters, never the nodes' agreement.
    pub(crate) fn place(&self, waiter: &Token) -> u64 {
        self.place_at(waiter, now_micros())
    }

    /// As [`FairLine::place`], the place chosen on the first call being `now` (when the waiter
    /// arrived: its first attempt).
    pub(crate) fn place_at(&self, waiter: &Token, now: u64) -> u64 {
        let mut places = self.places.lock().unwrap_or_else(PoisonError::into_inner);
        let key = waiter.expose();
        if let Some((place, asked)) = places.get_mut(&*key) {
            *asked = (*asked).max(now);
            return *place;
        }
        if self.places_pruned.due(places.len()) {
            let idle = u64::try_from(PLACE_IDLE.as_micros()).unwrap_or(u64::MAX);
            places.retain(|_, (_, asked)| now.saturating_sub(*asked) < idle);
            self.places_pruned.pruned(places.len());
        }
        places.insert(key.to_string(), (now, now));
        now
    }

    /// The member of a line that stands for `waiter` of this client.
    pub(crate) fn member(&self, waiter: &Token) -> Vec<u8> {
        line_member(&self.instance, &waiter.expose()).into_bytes()
    }

    /// Listens for `waiter`'s turn before its attempt goes out, subscribing this client's
    /// channel first on every node where it is not (all at once, each bounded by `timeout`; a
    /// node whose subscription went unanswered lately is left alone for a while: see
    /// `pubsub.rs`).
    pub(crate) async fn listen(&self, waiter: &Token, nodes: &[Node], timeout: Duration) {
        self.turns.listen(&waiter.expose());
        if let [node] = nodes {
            self.pubsub.subscribe(0, node, Channel::Turn, timeout).await;
        } else {
            futures::future::join_all(
                nodes.iter().enumerate().map(|(index, node)| {
                    self.pubsub.subscribe(index, node, Channel::Turn, timeout)
                }),
            )
            .await;
        }
    }

    /// `waiter`'s attempt, answered `round_trip` after it was sent, left it `place` behind the
    /// holder when the store told it (see `TurnRegistry::behind`; `ttl`: its place in line's
    /// lease). The round trip is recorded either way (see `TurnRegistry::tell_place_from`).
    pub(crate) fn behind(
        &self,
        waiter: &Token,
        place: Option<u64>,
        round_trip: Duration,
        ttl: Duration,
    ) {
        let at_most = lock_core::raw::wake::behind_at_most(ttl);
        self.turns
            .attempt_answered(&waiter.expose(), place, round_trip, at_most);
    }

    /// The first place behind the head worth the store telling this client's waiters asking
    /// with `ttl` (see `TurnRegistry::tell_place_from`).
    pub(crate) fn tell_place_from(&self, ttl: Duration) -> u64 {
        self.turns
            .tell_place_from(lock_core::raw::wake::behind_at_most(ttl))
    }

    /// Whether `waiter` is still too far back in line to be first, and was not woken since its
    /// latest attempt (see `TurnRegistry::still_behind`).
    pub(crate) fn still_behind(&self, waiter: &Token) -> bool {
        self.turns.still_behind(&waiter.expose())
    }

    /// `waiter` is first in line behind a holder with `left` to live.
    pub(crate) fn first_in_line(&self, waiter: &Token, left: Duration) {
        self.turns.first_in_line(&waiter.expose(), left);
    }

    /// Whether `waiter` (of a lock over several nodes: it has a place) is still waiting: its
    /// acquisition has not ended yet.
    pub(crate) fn waiting(&self, waiter: &Token) -> bool {
        self.places
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&*waiter.expose())
    }

    /// Records that `waiter`'s attempt on `key` sent at `sent` renewed its place in line to
    /// lapse at `expiry` (the node's clock, in ms; see `TurnRegistry::anchor`).
    pub(crate) fn anchor(
        &self,
        waiter: &Token,
        key: &lock_core::Key,
        sent: tokio::time::Instant,
        expiry: u64,
    ) {
        self.turns
            .anchor(&waiter.expose(), key.as_str(), sent, expiry);
    }

    /// When the attempt was sent after which the node gave `waiter` the key as it passed the
    /// turn (see `lua/line_pass.lua`), if it did since that attempt, the waiter's attempts were
    /// on `key` alone, and no attempt of the waiter has been taken back: a take-back gives up
    /// the waiter's reservation, and may land after the grant.
    pub(crate) fn granted(
        &self,
        waiter: &Token,
        key: &lock_core::Key,
    ) -> Option<tokio::time::Instant> {
        self.turns
            .granted(&waiter.expose(), key.as_str())
            .map(|granted| granted.sent)
    }

    /// An attempt of `waiter` (with a ttl of `ttl`) is being taken back: from now on the waiter
    /// never holds a key given to it without asking (the take-back, and its re-sends until the
    /// ttl has passed, give up whatever is reserved for the waiter).
    pub(crate) fn taken_back(&self, waiter: &Token, ttl: Duration) {
        self.turns.taken_back(&waiter.expose(), ttl);
    }

    /// `waiter`'s acquisition ended.
    pub(crate) fn forget(&self, waiter: &Token) {
        let key = waiter.expose();
        self.turns.forget(&key);
        self.places
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&*key);
    }

    /// Waits for `waiter`'s turn, the expiry of the holder it is first in line behind, or
    /// `max_wait`.
    pub(crate) async fn wait(&self, waiter: &Token, max_wait: Duration) -> bool {
        self.turns.wait(&waiter.expose(), max_wait).await
    }
}

/// This client's clock, in µs since the Unix epoch (a waiter's place in line).
pub(crate) fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn key(name: &str) -> lock_core::Key {
        lock_core::Key::new(name).unwrap()
    }

    fn line(nodes: usize) -> FairLine {
        FairLine::new("me".to_owned(), Arc::new(PubSub::new(nodes, Some("me"))))
    }

    /// The hint that sends a waiter's first attempt through the line: set by a waiter that
    /// lined up, cleared by one that took the key at its first attempt, gone after
    /// `LINED_FOR`, and bounded (a client lining up on ever new keys keeps at most
    /// `LINED_AT_MOST` of them).
    #[tokio::test(start_paused = true)]
    async fn a_key_is_expected_lined_from_a_refusal_until_a_first_attempt_wins_or_it_ages() {
        let fair = line(1);
        assert!(!fair.expects_line(&key("a")));
        fair.saw_line(&key("a"), false);
        assert!(!fair.lined_any.load(Ordering::Relaxed));
        fair.saw_line(&key("a"), true);
        assert!(fair.expects_line(&key("a")));
        assert!(!fair.expects_line(&key("b")));
        fair.saw_line(&key("a"), false);
        assert!(!fair.expects_line(&key("a")));
        assert!(!fair.lined_any.load(Ordering::Relaxed));
        fair.saw_line(&key("a"), true);
        tokio::time::advance(LINED_FOR).await;
        assert!(!fair.expects_line(&key("a")));
        for n in 0..3 * LINED_AT_MOST {
            fair.saw_line(&key(&format!("k{n}")), true);
            assert!(fair.lined.lock().unwrap().len() <= LINED_AT_MOST);
        }
        assert!(fair.expects_line(&key(&format!("k{}", 3 * LINED_AT_MOST - 1))));
    }

    /// Promised (`FairLine::place`: "chosen on its first call, the same on every later one,
    /// so that a waiter that left a node's line [...] joins it again where it stood"; the
    /// pruning is meant for "an acquisition that ended without `forget`"): a waiter still
    /// waiting keeps its place however long it has waited.
    ///
    /// Broken before the fix: places were pruned by their age (the arrival), not by their last use.
    /// Once more than `TURN_PRUNE_ABOVE` (1024) waiters of the client have a place, the
    /// arrival of another drops every place older than `PLACE_IDLE` (10 min), also that of a
    /// waiter still in line (behind a long holder, its attempts asking for its place every
    /// retry): its next attempt gets a new place, `now`, and on every node whose line it had
    /// left (a turn taken without a quorum, a node restarted empty) it joins behind everyone
    /// who arrived in the last 10 minutes, while the other nodes keep its old place: the nodes
    /// no longer order the waiters alike.
    #[test]
    fn a_waiter_still_waiting_keeps_its_place_when_places_are_pruned() {
        let line = line(3);
        let old = Token::generate().unwrap();
        let t0: u64 = 1_000_000_000_000_000;
        let minute: u64 = 60_000_000;
        assert_eq!(line.place_at(&old, t0), t0);
        // The old waiter keeps asking (each of its attempts), minute after minute.
        for m in 1..=11 {
            assert_eq!(line.place_at(&old, t0 + m * minute), t0);
        }
        // Meanwhile this client's other waiters, on other keys, arrive (all still waiting).
        let now = t0 + 11 * minute;
        for i in 0..=lock_core::raw::wake::TURN_PRUNE_ABOVE as u64 {
            line.place_at(&Token::generate().unwrap(), now + i);
        }
        let later = now + 2 * minute;
        assert_eq!(
            line.place_at(&old, later),
            t0,
            "the waiter, still waiting, got a new place at the back of the line"
        );
    }

    /// Held (before and after the fix): a place nobody asked for in `PLACE_IDLE` (an
    /// acquisition that ended without `forget`) is dropped once the map is over its bound.
    #[test]
    fn places_nobody_asks_for_are_pruned() {
        let line = line(3);
        let t0: u64 = 1_000_000_000_000_000;
        let minute: u64 = 60_000_000;
        let gone = Token::generate().unwrap();
        line.place_at(&gone, t0);
        let now = t0 + 11 * minute;
        for i in 0..=lock_core::raw::wake::TURN_PRUNE_ABOVE as u64 {
            line.place_at(&Token::generate().unwrap(), now + i);
        }
        let places = line.places.lock().unwrap();
        assert!(
            !places.contains_key(&*gone.expose()),
            "an abandoned place was kept"
        );
        assert!(
            places.len() <= lock_core::raw::wake::TURN_PRUNE_ABOVE + 1,
            "{}",
            places.len()
        );
    }
}

//! Fair waiting across processes (`fair`): waiters line up in a sorted set in the lock's hash
//! slot (see `lock_core::raw::redis::LINE_SCRIPT`), and the head of the line is woken alone, by a message naming it
//! on the channel of its client (`lock-turn:<instance>`), which every fair client subscribes to
//! once, on its first wait, through the client's one subscriber connection, shared with the
//! release channels (fred's `SubscriberClient`; each channel is subscribed again after a
//! reconnect, see `Listener::resubscriber`). A lost message costs the waiter its fallback poll
//! at most (the longer of its retry delay and 200 ms, a quarter of the
//! ttl at most: see the core's retry loop); a reconnect or a reader that fell behind wakes
//! every waiter of this client.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fred::prelude::PubsubInterface;
use lock_core::Key;
use lock_core::Token;
use lock_core::raw::wake::{Granted, TurnRegistry};

use crate::wake::Listener;

pub(crate) use lock_core::raw::redis::TURN_CHANNEL;

/// The waiters of one fair client.
pub(crate) struct FairLine {
    /// 32 hex digits naming this client in the members of every line it waits in.
    instance: String,
    turns: TurnRegistry,
    /// The client's subscriber connection, which carries the turn channel.
    listener: Arc<Listener>,
    /// Whether the turn channel was subscribed (fred subscribes it again after a reconnect).
    subscribed: AtomicBool,
}

impl FairLine {
    /// The fair waiters of the client named `instance` (32 hex digits), whose turn channel
    /// `listener` carries.
    pub(crate) fn new(instance: String, listener: Arc<Listener>) -> Self {
        Self {
            instance,
            turns: listener.waiters.turns().cloned().unwrap_or_default(),
            listener,
            subscribed: AtomicBool::new(false),
        }
    }

    /// The member of a line that stands for `waiter` of this client.
    pub(crate) fn member(&self, waiter: &Token) -> String {
        lock_core::raw::redis::line_member(&self.instance, &waiter.expose())
    }

    /// Listens for `waiter`'s turn before its attempt goes out, subscribing this client's
    /// channel first if it is not (bounded by `timeout`; without it, the retry delay is the
    /// fallback).
    pub(crate) async fn listen(&self, waiter: &Token, timeout: Duration) {
        self.turns.listen(&waiter.expose());
        match tokio::time::timeout(timeout, self.connect()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::debug!(error = %lock_core::raw::redis::shown_error(&error), "cannot subscribe for turns; falling back to the retry delay");
            }
            Err(_) => {
                tracing::debug!("subscribing for turns timed out; falling back to the retry delay");
            }
        }
    }

    /// Whether this client's channel is subscribed already: a waiter's first attempt may then
    /// line up at once (listening costs nothing more).
    pub(crate) fn subscribed(&self) -> bool {
        self.subscribed.load(Ordering::SeqCst) && self.listener.started()
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

    /// Records that `waiter`'s attempt on `key` sent at `sent` renewed its place in line to
    /// lapse at `expiry` (the server's clock, in ms; see [`TurnRegistry::anchor`]).
    pub(crate) fn anchor(
        &self,
        waiter: &Token,
        key: &Key,
        sent: tokio::time::Instant,
        expiry: u64,
    ) {
        self.turns
            .anchor(&waiter.expose(), key.as_str(), sent, expiry);
    }

    /// The grant the server sent `waiter` as it passed the turn (see `lua/line_grant.lua`), if
    /// it names the place `waiter`'s latest attempt was given, its attempts were on `key`
    /// alone, and no attempt of the waiter has been taken back ([`TurnRegistry::granted`]).
    pub(crate) fn granted(&self, waiter: &Token, key: &Key) -> Option<Granted> {
        self.turns.granted(&waiter.expose(), key.as_str())
    }

    /// An attempt of `waiter` (with a ttl of `ttl`) is being taken back: from now on the waiter
    /// never holds a lock given to it without asking.
    pub(crate) fn taken_back(&self, waiter: &Token, ttl: Duration) {
        self.turns.taken_back(&waiter.expose(), ttl);
    }

    /// `waiter`'s acquisition ended.
    pub(crate) fn forget(&self, waiter: &Token) {
        self.turns.forget(&waiter.expose());
    }

    /// Waits for `waiter`'s turn, the expiry of the holder it is first in line behind, or
    /// `max_wait`.
    pub(crate) async fn wait(&self, waiter: &Token, max_wait: Duration) -> bool {
        self.turns.wait(&waiter.expose(), max_wait).await
    }

    /// Connects the subscriber and starts its reader, once, and subscribes this client's
    /// channel, once.
    async fn connect(&self) -> std::result::Result<(), fred::error::Error> {
        self.listener.start().await?;
        if !self.subscribed.load(Ordering::SeqCst) {
            let channel = format!("{TURN_CHANNEL}{}", self.instance);
            self.listener.subscriber.subscribe(channel).await?;
            self.subscribed.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
}

//! Fair waiting across processes (`fair`): waiters line up in a sorted set in the lock's hash
//! slot (see `lock_core::raw::redis::LINE_SCRIPT`), and the head of the line is woken alone, by a message naming it
//! on the channel of its client (`lock-turn:<instance>`), which every fair client subscribes to
//! once, on its first wait, through a subscriber connection of its own (fred's
//! `SubscriberClient`, which subscribes again after a reconnect). A lost message costs the
//! waiter its fallback poll at most (the longer of its retry delay and 200 ms, a quarter of the
//! ttl at most: see the core's retry loop); a reconnect or a reader that fell behind wakes
//! every waiter of this client.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use fred::clients::SubscriberClient;
use lock_core::raw::wake::{Granted, TURN_PRUNE_ABOVE, TurnRegistry};
use lock_core::{Key, Result, Token};

use crate::wake::Listener;

pub(crate) use lock_core::raw::redis::TURN_CHANNEL;

/// The waiters of one fair client and its subscription.
pub(crate) struct FairLine {
    /// 32 hex digits naming this client in the members of every line it waits in.
    instance: String,
    turns: TurnRegistry,
    listener: Listener,
    /// The key each waiter's attempts renewed its place on (see [`FairLine::anchor`]), `None`
    /// once they named two keys: a grant names the waiter and an expiry, not the key.
    anchored_on: Mutex<HashMap<String, Option<Key>>>,
}

/// Waiters whose key [`FairLine::anchored_on`] keeps, above which it is cleared (their grants
/// are then asked for, not held).
const ANCHORED_PRUNE_ABOVE: usize = 4 * TURN_PRUNE_ABOVE;

impl FairLine {
    pub(crate) fn new(subscriber: SubscriberClient) -> Result<Self> {
        Ok(Self {
            instance: Token::generate()?.expose().to_string(),
            turns: TurnRegistry::default(),
            listener: Listener::new(subscriber),
            anchored_on: Mutex::new(HashMap::new()),
        })
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
                tracing::debug!(%error, "cannot subscribe for turns; falling back to the retry delay");
            }
            Err(_) => {
                tracing::debug!("subscribing for turns timed out; falling back to the retry delay");
            }
        }
    }

    /// `waiter` is first in line behind a holder with `left` to live.
    pub(crate) fn first_in_line(&self, waiter: &Token, left: Duration) {
        self.turns.first_in_line(&waiter.expose(), left);
    }

    /// Records that `waiter`'s attempt on `key` sent at `sent` renewed its place in line to
    /// lapse at `expiry` (the server's clock, in ms). A waiter id is one acquisition's, of one
    /// key; one whose attempts named two keys (a caller of the raw API reusing an id) holds no
    /// grant from then on: the grant of one key could name the expiry its place on the other
    /// got.
    pub(crate) fn anchor(
        &self,
        waiter: &Token,
        key: &Key,
        sent: tokio::time::Instant,
        expiry: u64,
    ) {
        let waiter = waiter.expose();
        {
            let mut anchored = self
                .anchored_on
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if anchored.len() > ANCHORED_PRUNE_ABOVE && !anchored.contains_key(&*waiter) {
                anchored.clear();
            }
            anchored
                .entry(waiter.to_string())
                .and_modify(|on| {
                    if on.as_ref() != Some(key) {
                        *on = None;
                    }
                })
                .or_insert_with(|| Some(key.clone()));
        }
        self.turns.anchor(&waiter, sent, expiry);
    }

    /// The grant the server sent `waiter` as it passed the turn (see `lua/line_grant.lua`), if
    /// it names the place `waiter`'s latest attempt was given, that attempt and every earlier
    /// one it renewed its place with were on `key`, and no attempt of the waiter has been taken
    /// back. A grant that is not held is taken all the same (the waiter asks).
    pub(crate) fn granted(&self, waiter: &Token, key: &Key) -> Option<Granted> {
        let waiter = waiter.expose();
        let granted = self.turns.granted(&waiter)?;
        let on_key = self
            .anchored_on
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&*waiter)
            .is_some_and(|on| on.as_ref() == Some(key));
        on_key.then_some(granted)
    }

    /// An attempt of `waiter` (with a ttl of `ttl`) is being taken back: from now on the waiter
    /// never holds a lock given to it without asking.
    pub(crate) fn taken_back(&self, waiter: &Token, ttl: Duration) {
        self.turns.taken_back(&waiter.expose(), ttl);
    }

    /// `waiter`'s acquisition ended.
    pub(crate) fn forget(&self, waiter: &Token) {
        let waiter = waiter.expose();
        self.anchored_on
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&*waiter);
        self.turns.forget(&waiter);
    }

    /// Waits for `waiter`'s turn, the expiry of the holder it is first in line behind, or
    /// `max_wait`.
    pub(crate) async fn wait(&self, waiter: &Token, max_wait: Duration) -> bool {
        self.turns.wait(&waiter.expose(), max_wait).await
    }

    /// Closes the subscriber connection (on shutdown).
    pub(crate) async fn close(&self) {
        self.listener.close().await;
    }

    /// Connects the subscriber, subscribes this client's channel and starts its reader, once.
    async fn connect(&self) -> std::result::Result<(), fred::error::Error> {
        let channel = format!("{TURN_CHANNEL}{}", self.instance);
        self.listener.start(Some(channel), self.turns.clone()).await
    }
}

//! An outside crate's backend runs the whole conformance suite with one macro call.
//!
//! `ToyLock` is a complete backend in a few dozen lines: a map behind a mutex, with ttl and
//! token-checked release. It has no optional capability, so the cases that need one are listed
//! as ignored, with the capability they need.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lock_core::{
    Capabilities, Key, Lease, LockError, Result, Token,
    raw::{Acquired, Answer, Handle, Lock, LockRequest, async_trait},
};
use tokio::time::Instant;

type Table = Arc<Mutex<HashMap<Key, (Token, Instant)>>>;

#[derive(Debug, Default)]
struct ToyLock(Table);

#[derive(Debug)]
struct ToyHandle(Table, Lease);

fn remove_if_ours(table: &Table, key: &Key, token: &Token) -> Option<Instant> {
    let mut table = table
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let expires = table
        .get(key)
        .filter(|(held, _)| held == token)
        .map(|(_, expires)| *expires)?;
    table.remove(key);
    Some(expires)
}

#[async_trait]
impl Lock for ToyLock {
    fn name(&self) -> &'static str {
        "toy"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE
    }
    // A store in this process decides in the call: its answers are ready, with no future to
    // box (a store that needs I/O answers `Answer::later(async move { .. })`).
    fn try_acquire<'a>(&'a self, request: &'a LockRequest) -> Answer<'a, Acquired> {
        let (now, key) = (Instant::now(), request.primary_key().clone());
        let mut table = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if table.get(&key).is_some_and(|(_, expires)| *expires > now) {
            return Answer::ready(Ok(None));
        }
        let expires = now + request.ttl();
        table.insert(key.clone(), (request.token().clone(), expires));
        Answer::ready(Ok(Some(Box::new(ToyHandle(
            self.0.clone(),
            Lease::new(request, expires),
        )))))
    }
    fn abandon<'a>(&'a self, request: &'a LockRequest) -> Answer<'a, Result<bool>> {
        Answer::ready(Ok(request
            .keys()
            .iter()
            .any(|key| remove_if_ours(&self.0, key, request.token()).is_some())))
    }
}

#[async_trait]
impl Handle for ToyHandle {
    fn lease(&self) -> &Lease {
        &self.1
    }
    async fn extend(&mut self, _ttl: Duration) -> Result<()> {
        Err(LockError::Unsupported {
            backend: "toy",
            capability: "extend",
        })
    }
    fn release(&mut self) -> Answer<'_, Result<()>> {
        Answer::ready(
            match remove_if_ours(&self.0, self.1.key(), self.1.token()) {
                Some(expires) if expires > Instant::now() => Ok(()),
                _ => Err(LockError::NotHeld {
                    key: self.1.key().to_string(),
                }),
            },
        )
    }
}

lock_core::conformance_tests!(async { ToyLock::default() });

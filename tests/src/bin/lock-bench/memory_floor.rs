//! The in-memory floor: the work that any lock with a ttl and a random token must do for one
//! uncontended acquire+release on a dashmap, and nothing else (no retry policy, namespaces,
//! guard, spans, waiters or fencing). Measured beside `lockable` in the same rounds, it shows
//! how fast our in-memory lock could at best be on this machine.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use lock_core::{Key, LockError, Token};
use tokio::time::Instant;

/// A ttl long enough never to lapse during a cycle.
const TTL: Duration = Duration::from_secs(30);

/// The table of held keys, as `MemoryLock` keeps it.
#[derive(Default)]
pub(crate) struct MandatoryWork {
    slots: Arc<DashMap<Key, Holder, foldhash::fast::RandomState>>,
}

struct Holder {
    token: Token,
    expires_at: Instant,
}

/// What the holder keeps, boxed as a backend's handle is.
struct Receipt {
    _table: Arc<DashMap<Key, Holder, foldhash::fast::RandomState>>,
    key: Key,
    token: Token,
}

impl MandatoryWork {
    /// Validates `key`, draws a 128-bit token, reads the clock, inserts the holder, boxes the
    /// receipt; then reads the clock again and removes the entry if the token still matches.
    /// Returns whether the lock was still valid when released.
    ///
    /// # Errors
    /// A bad key or no entropy.
    pub(crate) fn cycle(&self, key: &str) -> Result<bool, LockError> {
        let key = Key::new(key)?;
        let token = Token::generate()?;
        let expires_at = Instant::now() + TTL;
        match self.slots.entry(key.clone()) {
            Entry::Occupied(_) => return Ok(false),
            Entry::Vacant(free) => {
                free.insert(Holder {
                    token: token.clone(),
                    expires_at,
                });
            }
        }
        let receipt = black_box(Box::new(Receipt {
            _table: Arc::clone(&self.slots),
            key,
            token,
        }));
        let now = Instant::now();
        Ok(self
            .slots
            .remove_if(&receipt.key, |_, holder| holder.token == receipt.token)
            .is_some_and(|(_, holder)| holder.expires_at > now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cycle_takes_and_frees_the_key() {
        let work = MandatoryWork::default();
        assert!(work.cycle("k").expect("a valid key"));
        assert!(work.slots.is_empty());
        assert!(work.cycle("").is_err());
    }
}

//! The in-memory floor: the work that any lock with a ttl and a random token must do for one
//! uncontended acquire+release on a dashmap, and nothing else (no retry policy, namespaces,
//! guard, spans, waiters or fencing), with the cheapest 128-bit CSPRNG draw there is (two words
//! from `rand`'s thread-local ChaCha12, not even hex-encoded). Measured beside `lockable` in the
//! same rounds, it bounds how fast any such lock, ours included, can be on this machine.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use lock_core::{Key, LockError};
use rand::RngCore;
use tokio::time::Instant;

/// A ttl long enough never to lapse during a cycle.
const TTL: Duration = Duration::from_secs(30);

/// The table of held keys, as `MemoryLock` keeps it.
#[derive(Default)]
pub(crate) struct MandatoryWork {
    slots: Arc<DashMap<Key, Holder, foldhash::fast::RandomState>>,
}

/// A 128-bit random token, as raw words.
type Token = [u64; 2];

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
    /// Validates `key`, draws 128 random bits, reads the clock, inserts the holder, boxes the
    /// receipt; then reads the clock again and removes the entry if the token still matches.
    /// Returns whether the lock was still valid when released.
    ///
    /// # Errors
    /// A bad key.
    pub(crate) fn cycle(&self, key: &str) -> Result<bool, LockError> {
        let key = Key::new(key)?;
        let mut random = rand::rng();
        let token = [random.next_u64(), random.next_u64()];
        let expires_at = Instant::now() + TTL;
        match self.slots.entry(key.clone()) {
            Entry::Occupied(_) => return Ok(false),
            Entry::Vacant(free) => {
                free.insert(Holder { token, expires_at });
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

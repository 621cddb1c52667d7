//! The model-based test of the public API on the in-process backend, on tokio's paused clock
//! (expiry modeled to the millisecond), and its negative controls: backends with one flaw each,
//! which the same state machine must catch with a shrunk sequence of a few steps.
#![allow(clippy::unwrap_used)]

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use lock_core::{
    Capabilities, Key, KeyState, Lease, Result,
    raw::{Handle, Lock, LockRequest, async_trait},
};
use lock_memory::MemoryLock;
use lock_tests::model::{self, AfterStop, ClientSetup, ModelConfig, Naming, Target, Timing};
use tokio::time::Instant;

/// How a [`Broken`] backend misbehaves.
#[derive(Clone, Copy, Debug)]
enum Flaw {
    /// Release deletes the key whoever holds it (no token check).
    ReleaseIgnoresToken,
    /// Locks never expire in the store (the guard still reports the ttl it asked for).
    NeverExpires,
    /// Every acquisition hands out the same fencing token.
    FenceRepeats,
}

/// The in-process backend, on a fresh lock table per case.
struct Memory {
    lock: RefCell<MemoryLock>,
    flaw: Option<Flaw>,
}

impl Memory {
    fn new(flaw: Option<Flaw>) -> Self {
        Self {
            lock: RefCell::new(MemoryLock::new()),
            flaw,
        }
    }
}

impl Target for Memory {
    fn label(&self) -> String {
        match self.flaw {
            None => "memory".to_owned(),
            Some(flaw) => format!("memory with the flaw {flaw:?}"),
        }
    }

    fn timing(&self) -> Timing {
        Timing::Exact
    }

    fn naming(&self) -> Naming {
        Naming::Plain
    }

    fn guards_after_stop(&self) -> AfterStop {
        AfterStop::Work
    }

    fn drop_releases_at_once(&self) -> bool {
        // The flawed wrappers release by awaiting, so their drops are spawned.
        self.flaw.is_none()
    }

    fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
    }

    fn reset(&self) -> std::result::Result<(), String> {
        *self.lock.borrow_mut() = MemoryLock::new();
        Ok(())
    }

    async fn backend(&self, _setup: &ClientSetup) -> Result<Arc<dyn Lock>> {
        let memory = self.lock.borrow().clone();
        Ok(match self.flaw {
            None => Arc::new(memory),
            Some(flaw) => Arc::new(Broken { memory, flaw }),
        })
    }
}

#[test]
fn the_memory_backend_follows_the_model() {
    let report = model::check(&Memory::new(None), &ModelConfig::from_env(1_000, 24))
        .unwrap_or_else(|failure| panic!("{failure}"));
    println!("model memory: {report}");
}

/// Runs the model against a flawed backend with a fixed seed: it must fail, with a minimal
/// sequence of a few steps whose failing step says `expected`.
fn caught(flaw: Flaw, expected: &str) {
    let config = ModelConfig::new(500, 24).with_seed(0x5eed);
    let failure = match model::check(&Memory::new(Some(flaw)), &config) {
        Ok(report) => panic!(
            "the model passed {} cases on a backend whose {flaw:?}",
            report.cases
        ),
        Err(failure) => *failure,
    };
    println!("{flaw:?} caught:\n{failure}");
    assert!(
        failure.minimal.ops.len() <= 4,
        "the failure was not shrunk to a few steps: {failure}"
    );
    assert!(
        failure.reason.contains(expected),
        "the failure is not the flaw's ({expected:?}): {failure}"
    );
}

#[test]
fn a_release_without_token_check_is_caught() {
    // Releasing an expired lock must say it was not held any more.
    caught(
        Flaw::ReleaseIgnoresToken,
        "got Ok, the model allows [NotHeld]",
    );
}

#[test]
fn a_store_that_never_expires_is_caught() {
    caught(Flaw::NeverExpires, "is held, but the model has it free");
}

#[test]
fn repeated_fencing_tokens_are_caught() {
    caught(Flaw::FenceRepeats, "is not above the previous holder's");
}

/// The memory backend with one flaw.
#[derive(Debug)]
struct Broken {
    memory: MemoryLock,
    flaw: Flaw,
}

#[derive(Debug)]
struct BrokenHandle {
    inner: Box<dyn Handle>,
    memory: MemoryLock,
    flaw: Flaw,
    /// The lease the guard sees: the ttl asked for, and a repeated fence for `FenceRepeats`.
    lease: Lease,
}

#[async_trait]
impl Lock for Broken {
    fn name(&self) -> &'static str {
        "broken"
    }

    fn capabilities(&self) -> Capabilities {
        self.memory.capabilities()
    }

    fn try_acquire<'a>(
        &'a self,
        request: &'a LockRequest,
    ) -> lock_core::raw::Answer<'a, Result<Option<Box<dyn Handle>>>> {
        lock_core::raw::Answer::later(async move {
            let start = Instant::now();
            let asked = match self.flaw {
                Flaw::NeverExpires => LockRequest::new(
                    request.key_set().clone(),
                    request.token().clone(),
                    Duration::from_secs(3600),
                )?,
                _ => request.clone(),
            };
            let Some(inner) = self.memory.try_acquire(&asked).await? else {
                return Ok(None);
            };
            let mut lease = Lease::new(request, start + request.ttl());
            let fence = match self.flaw {
                Flaw::FenceRepeats => Some(7),
                _ => inner.lease().fencing_token(),
            };
            if let Some(fence) = fence {
                lease = lease.with_fencing_token(fence);
            }
            Ok(Some(Box::new(BrokenHandle {
                inner,
                memory: self.memory.clone(),
                flaw: self.flaw,
                lease,
            }) as Box<dyn Handle>))
        })
    }

    fn abandon<'a>(&'a self, request: &'a LockRequest) -> lock_core::raw::Answer<'a, Result<bool>> {
        lock_core::raw::Answer::later(async move { self.memory.abandon(request).await })
    }

    async fn purge(&self, prefix: &str) -> Result<u64> {
        self.memory.purge(prefix).await
    }

    async fn inspect(&self, key: &Key) -> Result<Vec<KeyState>> {
        self.memory.inspect(key).await
    }
}

#[async_trait]
impl Handle for BrokenHandle {
    fn lease(&self) -> &Lease {
        &self.lease
    }

    async fn extend(&mut self, ttl: Duration) -> Result<()> {
        self.inner.extend(ttl).await?;
        self.lease.set_valid_until(Instant::now() + ttl);
        Ok(())
    }

    fn release(&mut self) -> lock_core::raw::Answer<'_, Result<()>> {
        lock_core::raw::Answer::later(async move {
            match self.flaw {
                // A plain delete of the exact keys, whoever holds them.
                Flaw::ReleaseIgnoresToken => {
                    for key in self.lease.keys() {
                        self.memory.purge(key.as_str()).await?;
                    }
                    Ok(())
                }
                _ => self.inner.release().await,
            }
        })
    }
}

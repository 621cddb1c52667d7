//! The model-based test of the lease primitives — semaphore permits, read and write locks,
//! downgrades — beside mutexes on the same crowded keys (see `lock_tests::model`), on the
//! in-process backend on tokio's paused clock, and its negative controls: backends with one
//! flaw each must fail it. The Redis backends run the same steps in `model_redlock.rs` and
//! `model_inc.rs` (`*_leases_*`).
#![allow(clippy::unwrap_used)]

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use lock_core::{
    Capabilities, Key, KeyState, Lease, LeaseKind, Result,
    raw::{Answer, Handle, Lock, LockRequest, async_trait},
};
use lock_memory::MemoryLock;
use lock_tests::model::{
    self, AfterStop, ClientSetup, ModelConfig, Naming, Refusal, Target, Timing,
};

/// The in-process backend, on a fresh lock table per case, on the paused clock; with a flaw,
/// a negative control.
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
            None => "memory (leases)".to_owned(),
            Some(flaw) => format!("memory (leases) with the flaw {flaw:?}"),
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

    fn other_kind_refusal(&self, _asked: LeaseKind) -> Refusal {
        // Every kind's path checks the other kinds' live holders first.
        Refusal::Mismatch
    }

    fn drop_releases_at_once(&self) -> bool {
        // The flawed wrapper releases by awaiting, so its drops are spawned.
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
fn memory_leases_follow_the_model() {
    let target = Memory::new(None);
    let report = model::check(&target, &ModelConfig::from_env(1_000, 24).with_leases())
        .unwrap_or_else(|failure| panic!("{failure}"));
    println!("model memory leases: {report}");
}

fn caught(flaw: Flaw, expected: &[&str]) {
    let config = ModelConfig::new(1_000, 24).with_seed(0x1ea5e).with_leases();
    let failure = match model::check(&Memory::new(Some(flaw)), &config) {
        Ok(report) => panic!(
            "the model passed {} cases on a backend whose {flaw:?}",
            report.cases
        ),
        Err(failure) => *failure,
    };
    println!("{flaw:?} caught:\n{failure}");
    assert!(
        failure.minimal.ops.len() <= 6,
        "the failure was not shrunk to a few steps: {failure}"
    );
    assert!(
        expected
            .iter()
            .any(|expected| failure.reason.contains(expected)),
        "the failure is not the flaw's ({expected:?}): {failure}"
    );
}

#[test]
fn a_semaphore_that_admits_twice_its_permits_is_caught() {
    caught(Flaw::DoublePermits, &["while the model has it held"]);
}

#[test]
fn a_writer_that_shares_with_readers_is_caught() {
    caught(Flaw::WriteAsRead, &["while the model has it held"]);
}

#[test]
fn a_downgrade_that_does_nothing_is_caught() {
    caught(
        Flaw::DowngradeKeepsWriter,
        &["found held, but the model admits it"],
    );
}

/// How a [`Broken`] backend misbehaves (the guard still sees the lease asked for).
#[derive(Clone, Copy, Debug)]
enum Flaw {
    /// A permit is taken from a semaphore of twice the size asked for.
    DoublePermits,
    /// A write lock is taken as a read lock.
    WriteAsRead,
    /// A downgrade answers as one, and leaves the write lock in the store.
    DowngradeKeepsWriter,
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
    flaw: Flaw,
    /// The lease the guard sees: the one asked for.
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
    ) -> Answer<'a, Result<Option<Box<dyn Handle>>>> {
        Answer::later(async move {
            let asked = match (self.flaw, request.kind()) {
                (Flaw::DoublePermits, LeaseKind::Permit { permits }) => request
                    .clone()
                    .with_kind(LeaseKind::permit(permits.get() * 2)?),
                (Flaw::WriteAsRead, LeaseKind::Write) => request.clone().with_kind(LeaseKind::Read),
                _ => request.clone(),
            };
            let Some(inner) = self.memory.try_acquire(&asked).await? else {
                return Ok(None);
            };
            let mut lease = Lease::new(request, inner.lease().valid_until());
            if let Some(fence) = inner.lease().fencing_token() {
                lease = lease.with_fencing_token(fence);
            }
            Ok(Some(Box::new(BrokenHandle {
                inner,
                flaw: self.flaw,
                lease,
            }) as Box<dyn Handle>))
        })
    }

    fn abandon<'a>(&'a self, request: &'a LockRequest) -> Answer<'a, Result<bool>> {
        Answer::later(async move { self.memory.abandon(request).await })
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
        self.lease.set_valid_until(self.inner.lease().valid_until());
        Ok(())
    }

    fn release(&mut self) -> Answer<'_, Result<()>> {
        Answer::later(async move { self.inner.release().await })
    }

    async fn downgrade(&mut self) -> Result<()> {
        let now = tokio::time::Instant::now();
        let left = self
            .inner
            .lease()
            .valid_until()
            .saturating_duration_since(now);
        match self.flaw {
            // Checks that it still holds (an extend to the same expiry), and stays a writer.
            Flaw::DowngradeKeepsWriter if self.inner.lease().kind() == LeaseKind::Write => {
                if left.is_zero() {
                    return Err(lock_core::LockError::NotHeld {
                        key: self.lease.key().to_string(),
                    });
                }
                self.inner.extend(left).await?;
            }
            _ if self.inner.lease().kind() == LeaseKind::Write => self.inner.downgrade().await?,
            // A write lock taken as a read lock (`WriteAsRead`) is one already.
            _ if left.is_zero() => {
                return Err(lock_core::LockError::NotHeld {
                    key: self.lease.key().to_string(),
                });
            }
            _ => {}
        }
        self.lease.set_downgraded();
        Ok(())
    }
}

//! The conformance suite catches broken backends: each one here must make a named case fail.

use std::sync::Arc;
use std::time::Duration;

use lock_core::{
    Capabilities, Lease, Result, conformance,
    raw::{Handle, Lock, LockRequest, async_trait},
};
use lock_memory::MemoryLock;
use tokio::time::Instant;

/// How a [`Broken`] backend misbehaves.
#[derive(Clone, Copy, Debug)]
enum Flaw {
    /// Release deletes the key whoever holds it (a plain `DEL`, no token check).
    ReleaseWithoutTokenCheck,
    /// Every attempt succeeds, held or not.
    NoMutualExclusion,
}

#[derive(Debug)]
struct Broken {
    inner: MemoryLock,
    flaw: Flaw,
}

#[derive(Debug)]
struct BrokenHandle {
    inner: Option<Box<dyn Handle>>,
    memory: MemoryLock,
    /// The inner lease, or (when the inner backend refused) one that claims ten seconds.
    lease: Lease,
}

#[async_trait]
impl Lock for Broken {
    fn name(&self) -> &'static str {
        "broken"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE
    }
    fn try_acquire<'a>(
        &'a self,
        request: &'a LockRequest,
    ) -> lock_core::raw::Answer<'a, Result<Option<Box<dyn Handle>>>> {
        lock_core::raw::Answer::later(async move {
            let inner = self.inner.try_acquire(request).await?;
            if inner.is_none() && !matches!(self.flaw, Flaw::NoMutualExclusion) {
                return Ok(None);
            }
            let lease = inner.as_ref().map_or_else(
                || Lease::new(request, Instant::now() + Duration::from_secs(10)),
                |inner| inner.lease().clone(),
            );
            Ok(Some(Box::new(BrokenHandle {
                inner,
                memory: self.inner.clone(),
                lease,
            }) as Box<dyn Handle>))
        })
    }
    fn abandon<'a>(&'a self, request: &'a LockRequest) -> lock_core::raw::Answer<'a, Result<bool>> {
        lock_core::raw::Answer::later(async move { self.inner.abandon(request).await })
    }
}

#[async_trait]
impl Handle for BrokenHandle {
    fn lease(&self) -> &Lease {
        match &self.inner {
            Some(inner) => inner.lease(),
            None => &self.lease,
        }
    }
    async fn extend(&mut self, ttl: Duration) -> Result<()> {
        match self.inner.as_mut() {
            Some(inner) => inner.extend(ttl).await,
            None => Ok(()),
        }
    }
    fn release(&mut self) -> lock_core::raw::Answer<'_, Result<()>> {
        lock_core::raw::Answer::later(async move {
            // Both flaws end in an unconditional delete of the exact key.
            self.memory
                .purge(self.lease.key().as_str())
                .await
                .map(|_| ())
        })
    }
}

async fn case_fails(case: &'static str, flaw: Flaw) -> bool {
    let lock: Arc<dyn Lock> = Arc::new(Broken {
        inner: MemoryLock::new(),
        flaw,
    });
    let outcome = tokio::spawn(conformance::run(case, lock)).await;
    matches!(outcome, Err(error) if error.is_panic())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_without_token_check_is_caught() {
    assert!(
        case_fails(
            "expired_holder_cannot_release_or_extend",
            Flaw::ReleaseWithoutTokenCheck
        )
        .await,
        "a stale release that deletes the next holder's lock must fail the suite"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_mutual_exclusion_is_caught() {
    assert!(
        case_fails("mutual_exclusion", Flaw::NoMutualExclusion).await,
        "a backend that grants every attempt must fail the suite"
    );
    assert!(case_fails("try_acquire_on_held_key", Flaw::NoMutualExclusion).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correct_backend_passes_the_same_cases() {
    // The control: the same harness around the real backend does not fail.
    let lock: Arc<dyn Lock> = Arc::new(MemoryLock::new());
    for case in [
        "expired_holder_cannot_release_or_extend",
        "mutual_exclusion",
        "try_acquire_on_held_key",
    ] {
        let outcome = tokio::spawn(conformance::run(case, Arc::clone(&lock))).await;
        assert!(
            matches!(outcome, Ok(conformance::Outcome::Passed)),
            "{case} did not pass on the memory backend: {outcome:?}"
        );
    }
}

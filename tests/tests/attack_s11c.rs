//! Adversarial review s11 (adv11c): the per-key record of the claims this process's waiting
//! writers left (`lease::Claims`, `note_claims`, `take_back_claims`), against real servers.
//! Each test prints its figures on one line.

use std::time::Duration;

use lock_core::{LeaseKind, LockError, LockOptions, Locker, RetryPolicy};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::nodes::get;
use lock_tests::server::redis_or_skip;

fn locker(lock: &Redlock, ttl: Duration, retry: RetryPolicy) -> Locker {
    Locker::new(lock.clone())
        .with_options(LockOptions::default().with_ttl(ttl).with_retry(retry))
        .expect("valid options")
}

/// Promise (`Locker::acquire_write`, README "writers are not starved"; `take_back_claims`: a
/// claim of a writer still waiting here "costs it no more than its next attempt leaves
/// again"): a waiting writer's claim keeps new readers out until the writer wins or stops
/// waiting; only the writer that left a claim takes it back (token-checked).
///
/// A writer of this process waits behind another client's reader (its claim is on the node).
/// The same process makes a fail-fast write attempt on that key (`try_acquire_kind(.., Write)`,
/// say an opportunistic writer), which finds the reader and gives up: its abandon calls
/// `take_back_claims(key, but: its own token)`, which takes the whole per-key record — the
/// *waiting* writer's current claim included — and deletes it, token-checked with the
/// waiting writer's own token. On main the claim is gone while the writer still waits (its
/// next attempt is seconds away) and a new reader of the other client is let in. A stream of
/// such give-ups (every fail-fast or timed-out writer of the process) keeps letting a
/// stream of readers past the waiting writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fail_fast_writer_giving_up_does_not_take_back_a_waiting_writers_claim() {
    let Some(_binary) = redis_or_skip("a waiting writer's claim taken by another writer") else {
        return;
    };
    let servers = lock_tests::backed::start_servers(1);
    let url = servers[0].url();
    let lock = Redlock::new(RedlockConfig::new([url.clone()])).expect("client");
    // Attempts 4 s apart: the claim (20 s ttl) is renewed well before it expires.
    let waiting = locker(
        &lock,
        Duration::from_secs(20),
        RetryPolicy::forever()
            .with_retry_delay(Duration::from_secs(4))
            .with_retry_jitter(Duration::ZERO)
            .with_deadline(Duration::from_secs(15)),
    );
    let fail_fast = locker(&lock, Duration::from_secs(20), RetryPolicy::none());
    let other = Redlock::new(RedlockConfig::new([url.clone()])).expect("other client");
    let other = locker(&other, Duration::from_secs(20), RetryPolicy::none());

    let reader = other
        .acquire_read("rw")
        .await
        .expect("the other client's reader");
    let writer = tokio::spawn({
        let waiting = waiting.clone();
        async move { waiting.acquire_write("rw").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let claim_before = get(&url, b"rw\xff:claim");
    let refused_before = matches!(
        other.try_acquire_kind("rw", LeaseKind::Read).await,
        Ok(None) | Err(LockError::Locked { .. })
    );
    let attempt = fail_fast
        .try_acquire_kind("rw", LeaseKind::Write)
        .await
        .expect("fail-fast writer");
    assert!(attempt.is_none(), "the fail-fast writer found the reader");
    drop(attempt);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let claim_after = get(&url, b"rw\xff:claim");
    let new_reader = other
        .try_acquire_kind("rw", LeaseKind::Read)
        .await
        .expect("new reader");
    let let_in = new_reader.is_some();
    println!(
        "claim taken by another writer: claim before {:?}, new reader refused before: {refused_before}; \
         after the fail-fast writer gave up: claim {:?}, new reader let in: {let_in}",
        claim_before.as_deref().map(String::from_utf8_lossy),
        claim_after.as_deref().map(String::from_utf8_lossy),
    );
    if let Some(new_reader) = new_reader {
        new_reader.release().await.expect("release");
    }
    reader.release().await.expect("release the reader");
    let writer = writer.await.expect("writer task").expect("the writer wins");
    writer.release().await.expect("release");
    assert!(claim_before.is_some() && refused_before, "setup: no claim");
    assert!(
        claim_after == claim_before && !let_in,
        "the waiting writer's claim was taken back by another writer's give-up (claim after: \
         {:?}); a new reader let in past the waiting writer: {let_in}",
        claim_after.as_deref().map(String::from_utf8_lossy)
    );
}

/// Promise (as above): a waiting writer's claim keeps new readers out until the writer wins
/// or stops waiting; `take_back_claims` takes back "earlier attempts'" claims of the writer
/// that gives up.
///
/// Two writers of this process wait on the same key behind another client's reader: the
/// patient one (attempts 500 ms apart, long deadline) and an impatient one (deadline 1.2 s,
/// attempts 4 s apart). The patient one's attempts come after the impatient one's, so the
/// claim on the node is the patient writer's (its latest attempt's token). The impatient
/// writer gives up: its token-checked take-back of its own claim finds another token and
/// leaves it (as before 8c34dfe), but `take_back_claims(key, but: its own token)` takes the
/// whole per-key record — the patient writer's live claim included — and deletes it. On main
/// the claim is gone and a new reader is let in while the patient writer still waits (its
/// next attempt then finds one more reader to wait out: a stream of impatient writers keeps
/// letting a stream of readers past it). Not fixed: the record cannot tell one writer's
/// earlier attempts from another writer's (each attempt has a fresh token, and the request
/// carries no identity of its acquisition).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impatient_writer_giving_up_does_not_take_back_a_patient_writers_claim() {
    let Some(_binary) = redis_or_skip("a waiting writer's claim taken by another waiting writer")
    else {
        return;
    };
    let servers = lock_tests::backed::start_servers(1);
    let url = servers[0].url();
    let lock = Redlock::new(RedlockConfig::new([url.clone()])).expect("client");
    let patient = locker(
        &lock,
        Duration::from_secs(20),
        RetryPolicy::forever()
            .with_retry_delay(Duration::from_millis(500))
            .with_retry_jitter(Duration::ZERO)
            .with_deadline(Duration::from_secs(15)),
    );
    let impatient = locker(
        &lock,
        Duration::from_secs(20),
        RetryPolicy::forever()
            .with_retry_delay(Duration::from_secs(4))
            .with_retry_jitter(Duration::ZERO)
            .with_deadline(Duration::from_millis(1_200)),
    );
    let other = Redlock::new(RedlockConfig::new([url.clone()])).expect("other client");
    let other = locker(&other, Duration::from_secs(20), RetryPolicy::none());

    let reader = other
        .acquire_read("rw")
        .await
        .expect("the other client's reader");
    let gave_up = impatient.acquire_write("rw");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let writer = tokio::spawn({
        let patient = patient.clone();
        async move { patient.acquire_write("rw").await }
    });
    let gave_up = gave_up.await;
    assert!(
        matches!(gave_up, Err(LockError::Timeout { .. })),
        "the impatient writer gives up: {gave_up:?}"
    );
    let claim_at_give_up = get(&url, b"rw\xff:claim");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let claim_after = get(&url, b"rw\xff:claim");
    let new_reader = other
        .try_acquire_kind("rw", LeaseKind::Read)
        .await
        .expect("new reader");
    let let_in = new_reader.is_some();
    println!(
        "claim taken by another waiting writer: claim when the impatient one gave up {:?}; \
         100 ms later {:?}, new reader let in: {let_in}",
        claim_at_give_up.as_deref().map(String::from_utf8_lossy),
        claim_after.as_deref().map(String::from_utf8_lossy),
    );
    if let Some(new_reader) = new_reader {
        new_reader.release().await.expect("release");
    }
    reader.release().await.expect("release the reader");
    let writer = writer.await.expect("writer task").expect("the writer wins");
    writer.release().await.expect("release");
    assert!(
        claim_after.is_some() && !let_in,
        "the patient writer's claim was taken back by the impatient writer's give-up; a new \
         reader let in past the waiting writer: {let_in}"
    );
}

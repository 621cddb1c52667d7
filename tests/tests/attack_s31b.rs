//! Session 31b (adv31b): hostile tests of claims attacked less often than the fair lines: the
//! INCR backend's read-write locks, the memory backend, the facade's configuration.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use lock_core::{LeaseKind, LockError, LockOptions, Locker, RetryPolicy};
use lock_inc::{IncConfig, IncLock};
use lock_tests::server::{RedisServer, redis_or_skip};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

async fn inc(url: &str) -> IncLock {
    IncLock::connect(IncConfig::new(url.to_owned()))
        .await
        .expect("connect")
}

fn locker(lock: &IncLock, ttl: Duration, retry: RetryPolicy) -> Locker {
    Locker::new(lock.clone())
        .with_options(LockOptions::default().with_ttl(ttl).with_retry(retry))
        .expect("valid options")
}

/// Promise (lock-inc README, "Writers are not starved"): "A writer that will wait and finds
/// holders stores its claim ... new readers stay out until the writer gets in (which consumes
/// the claim), takes it back by token when it stops waiting (`abandon`), or the claim
/// expires"; `Locker::acquire_write`: "While it waits, new readers are kept out".
///
/// inc keeps one claim per key (in the marker): a second writer that waits overwrites the
/// first one's claim, and when it gives up it takes back its own, leaving the key unclaimed
/// while the first writer still waits (until its next attempt, here 4 s away). Redlock
/// documents this as a known limitation (`attack_s11d.rs`, ignored); the memory backend wakes
/// the first writer, which claims again at once
/// (`a_second_writer_giving_up_does_not_let_readers_past_the_first`); inc (wake-ups off, its
/// default) does neither and documents nothing: a new reader is let in past the waiting writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "known limitation (lock-inc README, now documented): one claim per key; a writer that overwrote another's claim and gave up leaves the key unclaimed until the other's next attempt"]
async fn inc_a_second_writer_giving_up_lets_readers_past_the_first() {
    let Some(binary) = redis_or_skip("inc: one claim per key") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let url = server.url();
    let patient_client = inc(&url).await;
    let patient = locker(
        &patient_client,
        Duration::from_secs(20),
        RetryPolicy::forever()
            .with_retry_delay(Duration::from_secs(4))
            .with_retry_jitter(Duration::ZERO)
            .with_deadline(Duration::from_secs(15)),
    );
    let impatient_client = inc(&url).await;
    let impatient = locker(
        &impatient_client,
        Duration::from_secs(20),
        RetryPolicy::forever()
            .with_retry_delay(ms(300))
            .with_retry_jitter(Duration::ZERO)
            .with_deadline(ms(800)),
    );
    let other_client = inc(&url).await;
    let other = locker(&other_client, Duration::from_secs(20), RetryPolicy::none());

    let reader = other.acquire_read("rw").await.expect("the first reader");
    let writer = tokio::spawn({
        let patient = patient.clone();
        async move { patient.acquire_write("rw").await }
    });
    tokio::time::sleep(ms(200)).await;
    // The patient writer's claim keeps new readers out.
    let before = other.try_acquire_kind("rw", LeaseKind::Read).await.unwrap();
    assert!(
        before.is_none(),
        "a reader got in past the patient writer's claim"
    );
    let gave_up = impatient.acquire_write("rw").await;
    assert!(
        matches!(gave_up, Err(LockError::Timeout { .. })),
        "the impatient writer gives up: {gave_up:?}"
    );
    tokio::time::sleep(ms(100)).await;
    let patient_waiting = !writer.is_finished();
    let new_reader = other.try_acquire_kind("rw", LeaseKind::Read).await.unwrap();
    let let_in = new_reader.is_some();
    if let Some(new_reader) = new_reader {
        new_reader.release().await.unwrap();
    }
    reader.release().await.unwrap();
    let won = writer
        .await
        .unwrap()
        .expect("the patient writer wins in the end");
    won.release().await.unwrap();
    assert!(patient_waiting, "the patient writer was still waiting");
    assert!(
        !let_in,
        "a new reader was let in while a writer waited: the second writer overwrote its claim \
         and took its own back when it gave up"
    );
}

/// Holds `kind` on `key` with a short ttl and lets it lapse unreleased while another client
/// asks without pause; returns by how long the first holder's validity outlasted the moment
/// the second one had been granted the key (None: it did not).
async fn overlap_after_lapse(
    first: &Locker,
    second: &Locker,
    key: &str,
    kind: LeaseKind,
) -> Option<Duration> {
    let held = first
        .try_acquire_kind(key, kind)
        .await
        .unwrap()
        .expect("the first holder");
    let next = loop {
        // (A Redlock attempt answered after its validity was spent is an error: ask again.)
        if let Ok(Some(guard)) = second.try_acquire_kind(key, kind).await {
            break guard;
        }
    };
    let granted = tokio::time::Instant::now();
    let overlap = held
        .valid_until()
        .checked_duration_since(granted)
        .filter(|overlap| !overlap.is_zero());
    std::mem::forget(held);
    next.release().await.unwrap();
    overlap
}

/// Promise (README, Guarantees): "Mutual exclusion while the work finishes within the lock's
/// validity"; `LockGuard::is_valid`: "True while the local validity has not passed". lock-inc
/// README: a holder set's "score = expiry in ms of the server's clock"; "an expired holder can
/// neither release nor extend".
///
/// inc's semaphores and read-write locks score an entry `now + ttl` with `now` the server's
/// clock in whole milliseconds (rounded down), and count it expired as soon as that score is
/// `<=` the clock: the entry lapses at `floor(t) + ttl`, up to a millisecond before `t + ttl`.
/// The holder's validity is `send time + ttl`, and a request on loopback reaches the server
/// well within that millisecond: the holder still counts itself valid for up to a millisecond
/// after the server let the next writer in. The mutex (`PEXPIRE`, which Redis expires only once
/// its clock is past the deadline) shows no overlap: the control.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_a_write_lock_is_still_valid_when_the_next_writer_gets_in() {
    let Some(binary) = redis_or_skip("inc: shared lease validity") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let url = server.url();
    let (a, b) = (inc(&url).await, inc(&url).await);
    let first = locker(&a, ms(15), RetryPolicy::none());
    let second = locker(&b, ms(15), RetryPolicy::none());
    let mut seen = Vec::new();
    for (round, kind) in [LeaseKind::Exclusive, LeaseKind::Write]
        .into_iter()
        .flat_map(|kind| (0..60).map(move |round| (round, kind)))
    {
        let key = format!("k{round}-{kind}");
        if let Some(overlap) = overlap_after_lapse(&first, &second, &key, kind).await {
            seen.push((kind, overlap));
        }
    }
    let mutex = seen
        .iter()
        .filter(|(kind, _)| *kind == LeaseKind::Exclusive)
        .count();
    let writes: Vec<Duration> = seen
        .iter()
        .filter(|(kind, _)| *kind == LeaseKind::Write)
        .map(|(_, overlap)| *overlap)
        .collect();
    println!(
        "overlaps: mutex {mutex}/60, write lock {}/60 {writes:?}",
        writes.len()
    );
    assert_eq!(mutex, 0, "the control: a mutex never overlaps");
    assert!(
        writes.is_empty(),
        "{} of 60 write locks were still valid when the next writer had been granted the key \
         (by up to {:?})",
        writes.len(),
        writes.iter().max()
    );
}

/// The same race on Redlock (one node and three): a lease's validity is its ttl less the drift
/// margin (2 ms and 1 %), so no holder of a write lock, a permit or a mutex is still valid when
/// the next one has been granted the key. Held on main.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_no_lease_is_still_valid_when_the_next_holder_gets_in() {
    let Some(_binary) = redis_or_skip("redlock: lease validity") else {
        return;
    };
    let servers = lock_tests::backed::start_servers(3);
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    for nodes in [&urls[..1], &urls[..]] {
        let client = |_: u8| {
            Locker::new(
                lock_redlock::Redlock::new(lock_redlock::RedlockConfig::new(nodes.to_vec()))
                    .unwrap(),
            )
            .with_options(
                LockOptions::default()
                    .with_ttl(ms(40))
                    .with_retry(RetryPolicy::none()),
            )
            .unwrap()
        };
        let (first, second) = (client(0), client(1));
        let mut overlaps = Vec::new();
        for kind in [
            LeaseKind::Exclusive,
            LeaseKind::Write,
            LeaseKind::permit(1).unwrap(),
        ] {
            for round in 0..30 {
                let key = format!("r{}-{round}-{kind}", nodes.len());
                if let Some(overlap) = overlap_after_lapse(&first, &second, &key, kind).await {
                    overlaps.push((kind, overlap));
                }
            }
        }
        assert!(overlaps.is_empty(), "{} node(s): {overlaps:?}", nodes.len());
        first.stop().await.unwrap();
        second.stop().await.unwrap();
    }
}

/// Promise (`LockGuard::downgrade`): "[`LockError::Backend`] on I/O (the lock is then still a
/// write lock)".
///
/// A downgrade whose answer is lost (the server stalls past the command timeout) may still run
/// once the server resumes (the lock-inc README says so, for the release:
/// `a_release_after_a_downgrade_that_timed_out_frees_the_key`). The guard then still says it
/// holds a valid write lock, while the store holds a read lock: a reader of another client is
/// let in beside the "writer", who was told its lock is still a write lock. (Its next extend
/// finds no write entry and reports the lock lost, which is the safe side; until then, and
/// without `keep_alive`, the writer writes beside readers.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_a_downgrade_that_failed_with_a_backend_error_may_have_let_readers_in() {
    let Some(binary) = redis_or_skip("inc: a downgrade answered too late") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let lock = IncLock::connect(IncConfig {
        command_timeout: 100,
        ..IncConfig::new(server.url())
    })
    .await
    .unwrap();
    let writers = locker(&lock, Duration::from_secs(10), RetryPolicy::none());
    // Loads the downgrade script (a stalled EVALSHA of an unknown script would answer NOSCRIPT).
    let mut warm = writers.acquire_write("warm").await.unwrap();
    warm.downgrade().await.unwrap();
    warm.release().await.unwrap();

    let mut writer = writers.acquire_write("doc").await.unwrap();
    server.pause().unwrap();
    let error = writer.downgrade().await.expect_err("no answer in time");
    server.resume().unwrap();
    assert!(matches!(error, LockError::Backend { .. }), "{error:?}");
    assert_eq!(writer.kind(), LeaseKind::Write);
    let other = inc(&server.url()).await;
    let readers = locker(&other, Duration::from_secs(10), RetryPolicy::none());
    let mut reader = None;
    for _ in 0..50 {
        reader = readers
            .try_acquire_kind("doc", LeaseKind::Read)
            .await
            .unwrap();
        if reader.is_some() {
            break;
        }
        tokio::time::sleep(ms(20)).await;
    }
    // A reader got in (the downgrade ran) while the guard still called its write lock valid.
    let ran = reader.is_some();
    let reader_in = ran && writer.is_valid();
    if let Some(reader) = reader {
        reader.release().await.unwrap();
    }
    let _ = writer.release().await;
    assert!(ran, "the stalled downgrade never ran: no reader got in");
    assert!(
        !reader_in,
        "a reader was let in while the writer's guard, whose downgrade failed with a backend \
         error, still held a valid write lock"
    );
}

/// Holds `key` with a 10 s ttl, asks to extend it to 400 ms while the server is stalled past
/// the client's timeout (the extend fails, its command still on the wire), lets the server go
/// on, then has `other` ask for the key every 20 ms: whether `other` got it (within 2 s: the
/// late extend landed), the validity the first guard still had left then, and the extend's
/// error.
async fn shorter_extend_lost(
    server: &RedisServer,
    holder: &Locker,
    other: &Locker,
) -> (bool, Option<Duration>, String) {
    let mut guard = holder.acquire("short").await.unwrap();
    server.pause().unwrap();
    let failed = guard.extend(ms(400)).await;
    server.resume().unwrap();
    let failed = format!("{failed:?}");
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        if let Ok(Some(next)) = other.try_acquire("short").await {
            let overlap = guard.is_valid().then(|| guard.remaining());
            next.release().await.unwrap();
            std::mem::forget(guard);
            return (true, overlap, failed);
        }
        tokio::time::sleep(ms(20)).await;
    }
    std::mem::forget(guard);
    (false, None, failed)
}

/// Promise (README, Guarantees): "**a failed extend changes nothing**"; `LockGuard::extend`:
/// "A failed extend leaves the lock as it was"; an extend to a shorter ttl is a documented use
/// ("also after an explicit extend to a shorter ttl"). Mutual exclusion while the work
/// finishes within the lock's validity.
///
/// An extend that fails because its answer did not come in time (a stalled server, a timeout)
/// may still run once the server goes on. Asked for a shorter ttl, it then ends the lock on the
/// server early, while the guard keeps its old validity (the failure "changed nothing"):
/// another client takes the key while the guard still counts seconds of validity. On inc and on
/// Redlock alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shorter_extend_that_failed_by_timeout_ends_the_lock_under_a_valid_guard() {
    let Some(binary) = redis_or_skip("a shorter extend answered too late") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let options = LockOptions::default()
        .with_ttl(Duration::from_secs(10))
        .with_retry(RetryPolicy::none());
    let inc_holder = IncLock::connect(IncConfig {
        command_timeout: 100,
        ..IncConfig::new(server.url())
    })
    .await
    .unwrap();
    let inc_holder = Locker::new(inc_holder)
        .with_options(options.clone())
        .unwrap();
    let inc_other = Locker::new(inc(&server.url()).await)
        .with_options(options.clone())
        .unwrap();
    // The extend script loaded before the stall (a stalled EVALSHA of an unknown script would
    // answer NOSCRIPT, and nobody would load it).
    let mut warm = inc_holder.acquire("warm").await.unwrap();
    warm.extend(Duration::from_secs(10)).await.unwrap();
    warm.release().await.unwrap();
    let inc_seen = shorter_extend_lost(&server, &inc_holder, &inc_other).await;

    let redlock = |timeout: u64| {
        let config =
            lock_redlock::RedlockConfig::new([server.url()]).with_node_timeout(ms(timeout));
        Locker::new(lock_redlock::Redlock::new(config).unwrap())
            .with_options(options.clone())
            .unwrap()
    };
    let (rl_holder, rl_other) = (redlock(100), redlock(500));
    // Connected and the scripts loaded before the stall.
    rl_holder
        .acquire("warm")
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    let mut warm = rl_holder.acquire("warm").await.unwrap();
    warm.extend(Duration::from_secs(10)).await.unwrap();
    warm.release().await.unwrap();
    let redlock_seen = shorter_extend_lost(&server, &rl_holder, &rl_other).await;
    println!("inc: {inc_seen:?}; redlock: {redlock_seen:?}");
    assert!(
        inc_seen.0 && redlock_seen.0,
        "the failed extend never landed (the scenario did not happen): {inc_seen:?}, {redlock_seen:?}"
    );
    assert!(
        inc_seen.1.is_none() && redlock_seen.1.is_none(),
        "another client held the key while the first guard, whose shorter extend failed, still \
         called itself valid: inc {inc_seen:?}, redlock {redlock_seen:?}"
    );
}

/// The same on Redlock (one node): a downgrade whose quorum did not answer in time runs on the
/// node once it goes on, and a reader of another client gets in; but Redlock ends the lease's
/// validity when a downgrade leaves it in doubt, so the guard no longer calls itself valid.
/// Held on main.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_a_downgrade_that_failed_without_an_answer_may_have_let_readers_in() {
    let Some(binary) = redis_or_skip("redlock: a downgrade answered too late") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let client = |timeout: u64| {
        let config =
            lock_redlock::RedlockConfig::new([server.url()]).with_node_timeout(ms(timeout));
        Locker::new(lock_redlock::Redlock::new(config).unwrap())
            .with_options(
                LockOptions::default()
                    .with_ttl(Duration::from_secs(10))
                    .with_retry(RetryPolicy::none()),
            )
            .unwrap()
    };
    let (writers, readers) = (client(100), client(500));
    let mut warm = writers.acquire_write("warm").await.unwrap();
    warm.downgrade().await.unwrap();
    warm.release().await.unwrap();

    let mut writer = writers.acquire_write("doc").await.unwrap();
    server.pause().unwrap();
    let error = writer.downgrade().await.expect_err("no answer in time");
    server.resume().unwrap();
    assert_eq!(writer.kind(), LeaseKind::Write, "{error:?}");
    let mut reader = None;
    for _ in 0..50 {
        reader = readers
            .try_acquire_kind("doc", LeaseKind::Read)
            .await
            .unwrap();
        if reader.is_some() {
            break;
        }
        tokio::time::sleep(ms(20)).await;
    }
    // A reader got in (the downgrade ran) while the guard still called its write lock valid.
    let ran = reader.is_some();
    let reader_in = ran && writer.is_valid();
    if let Some(reader) = reader {
        reader.release().await.unwrap();
    }
    let _ = writer.release().await;
    assert!(ran, "the stalled downgrade never ran: no reader got in");
    assert!(
        !reader_in,
        "a reader was let in while the writer's guard, whose downgrade failed ({error:?}), \
         still held a valid write lock"
    );
}

/// Promise (README, Guarantees, "Cancel safety"): dropping a future of the API at any point
/// leaves nothing behind that breaks the lock's promises; `LockGuard::extend`: a failed extend
/// leaves the lock as it was.
///
/// The same as a shorter extend that timed out, by cancellation: `tokio::time::timeout` around
/// `extend` to a shorter ttl drops the future while the command is on the wire; the store takes
/// it once it goes on and ends the lock early, while the guard keeps its old validity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shorter_extend_cancelled_on_the_wire_ends_the_lock_under_a_valid_guard() {
    let Some(binary) = redis_or_skip("a shorter extend cancelled on the wire") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let options = LockOptions::default()
        .with_ttl(Duration::from_secs(10))
        .with_retry(RetryPolicy::none());
    let mut seen = Vec::new();
    for backend in ["inc", "redlock"] {
        let client = || async {
            match backend {
                "inc" => Locker::new(inc(&server.url()).await),
                _ => Locker::new(
                    lock_redlock::Redlock::new(
                        lock_redlock::RedlockConfig::new([server.url()])
                            .with_node_timeout(ms(2_000)),
                    )
                    .unwrap(),
                ),
            }
            .with_options(options.clone())
            .unwrap()
        };
        let (holder, other) = (client().await, client().await);
        // Connected, and the extend script loaded, before the stall.
        let mut warm = holder.acquire("warm").await.unwrap();
        warm.extend(Duration::from_secs(10)).await.unwrap();
        warm.release().await.unwrap();
        let key = format!("cancelled-{backend}");
        let mut guard = holder.acquire(&key).await.unwrap();
        server.pause().unwrap();
        let cancelled = tokio::time::timeout(ms(50), guard.extend(ms(400))).await;
        server.resume().unwrap();
        assert!(
            cancelled.is_err(),
            "{backend}: the extend answered a stalled server: {cancelled:?}"
        );
        let started = tokio::time::Instant::now();
        let mut outcome = None;
        while started.elapsed() < Duration::from_secs(2) {
            if let Ok(Some(next)) = other.try_acquire(&key).await {
                outcome = Some(guard.is_valid().then(|| guard.remaining()));
                next.release().await.unwrap();
                break;
            }
            tokio::time::sleep(ms(20)).await;
        }
        std::mem::forget(guard);
        seen.push((backend, outcome));
    }
    println!("{seen:?}");
    assert!(
        seen.iter().all(|(_, outcome)| outcome.is_some()),
        "the cancelled extend never landed (the scenario did not happen): {seen:?}"
    );
    assert!(
        seen.iter().all(|(_, outcome)| *outcome == Some(None)),
        "another client held the key while the first guard, whose shorter extend was \
         cancelled on the wire, still called itself valid: {seen:?}"
    );
}

/// Promise (README, Guarantees, "Cancel safety"); `LockGuard::downgrade`: a downgrade that
/// fails without an answer leaves the lease in doubt, and its validity ends (Redlock; inc since
/// this session).
///
/// Cancelled instead (`tokio::time::timeout` around it, the script on the wire), the downgrade
/// runs once the server goes on, and a reader of another client gets in, while the guard still
/// calls its write lock valid: nothing ended the validity, on inc and on Redlock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downgrade_cancelled_on_the_wire_lets_readers_in_beside_a_valid_writer() {
    let Some(binary) = redis_or_skip("a downgrade cancelled on the wire") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let options = LockOptions::default()
        .with_ttl(Duration::from_secs(10))
        .with_retry(RetryPolicy::none());
    let mut seen = Vec::new();
    for backend in ["inc", "redlock"] {
        let client = || async {
            match backend {
                "inc" => Locker::new(inc(&server.url()).await),
                _ => Locker::new(
                    lock_redlock::Redlock::new(
                        lock_redlock::RedlockConfig::new([server.url()])
                            .with_node_timeout(ms(2_000)),
                    )
                    .unwrap(),
                ),
            }
            .with_options(options.clone())
            .unwrap()
        };
        let (writers, readers) = (client().await, client().await);
        let mut warm = writers.acquire_write("warm").await.unwrap();
        warm.downgrade().await.unwrap();
        warm.release().await.unwrap();
        let key = format!("doc-{backend}");
        let mut writer = writers.acquire_write(&key).await.unwrap();
        server.pause().unwrap();
        let cancelled = tokio::time::timeout(ms(50), writer.downgrade()).await;
        server.resume().unwrap();
        assert!(cancelled.is_err(), "{backend}: answered: {cancelled:?}");
        let mut outcome = None;
        for _ in 0..50 {
            if let Some(reader) = readers
                .try_acquire_kind(&key, LeaseKind::Read)
                .await
                .unwrap()
            {
                outcome = Some(writer.kind() == LeaseKind::Write && writer.is_valid());
                reader.release().await.unwrap();
                break;
            }
            tokio::time::sleep(ms(20)).await;
        }
        let _ = writer.release().await;
        seen.push((backend, outcome));
    }
    println!("{seen:?}");
    assert!(
        seen.iter().all(|(_, outcome)| outcome.is_some()),
        "the cancelled downgrade never ran (the scenario did not happen): {seen:?}"
    );
    assert!(
        seen.iter().all(|(_, outcome)| *outcome == Some(false)),
        "a reader got in while the writer's guard, whose downgrade was cancelled on the wire, \
         still called its write lock valid: {seen:?}"
    );
}

//! A refused fair waiter is told its place in line (for the far-back deferral, see
//! `TurnRegistry::behind`) only from the place its client would defer for
//! (`TurnRegistry::tell_place_from`): closer to the head, a deferral would end before the
//! waiter's next poll, so the line's gate skips the look whether anything in line can lapse
//! first (`PTTL` + `ZRANGE`, two commands per refused far-back attempt). On loopback, with the
//! default 200 ms poll, no place is worth telling: the hand-offs cost two commands fewer. The
//! script keeps its answer for a caller that names no first place.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lock_core::RetryPolicy;
use lock_tests::fair::{Store, Target};
use lock_tests::script_diff::command_calls;
use tokio::time::Instant;

const CLIENTS: usize = 12;
const RUN: Duration = Duration::from_secs(2);

/// `CLIENTS` fair clients on loopback take 0 ms sections on one key for `RUN`: the server's
/// commands per section, by name.
async fn commands_per_section(store: Store) -> (BTreeMap<String, f64>, u64) {
    let target = Target::start(store, "line_tell_place").await.unwrap();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let locker = target
            .locker(true, Duration::from_secs(20), RetryPolicy::forever())
            .await;
        locker.acquire("k").await.unwrap().release().await.unwrap();
        clients.push(locker);
    }
    let mut asking = lock_tests::fair::connect(&target.url).await;
    // One round of contention first, so that every client has heard a message and measured a
    // round trip and a wait (as in any long run).
    let warm = |until: Duration| {
        let sections = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let tasks: Vec<_> = clients
            .iter()
            .map(|locker| {
                let (locker, sections) = (locker.clone(), sections.clone());
                tokio::spawn(async move {
                    while started.elapsed() < until {
                        let guard = locker.acquire("k").await.unwrap();
                        sections.fetch_add(1, Ordering::SeqCst);
                        guard.release().await.unwrap();
                    }
                })
            })
            .collect();
        (tasks, sections)
    };
    let (tasks, _) = warm(Duration::from_millis(500));
    for task in tasks {
        task.await.unwrap();
    }
    let before = command_calls(&mut asking).await;
    let (tasks, sections) = warm(RUN);
    for task in tasks {
        task.await.unwrap();
    }
    let after = command_calls(&mut asking).await;
    let sections = sections.load(Ordering::SeqCst);
    for locker in &clients {
        locker.stop().await.unwrap();
    }
    let per_section = after
        .iter()
        .map(|(name, calls)| {
            let made = calls - before.get(name).copied().unwrap_or(0);
            (name.clone(), made as f64 / sections as f64)
        })
        .filter(|(_, per)| *per > 0.0)
        .collect();
    (per_section, sections)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_loopback_no_far_back_place_is_looked_into() {
    if lock_tests::server::redis_or_skip("line_tell_place").is_none() {
        return;
    }
    for store in [Store::Redis, Store::Inc] {
        let (per_section, sections) = commands_per_section(store).await;
        println!("{store:?}: {sections} sections, per section {per_section:?}");
        assert!(sections >= 200, "{store:?}: only {sections} sections");
        // With every place told (`tell_place_from` answering 1): one `PTTL` and one more
        // `ZRANGE` per section (1.0 and 3.0), the releaser's next attempt being refused far back.
        let pttl = per_section.get("pttl").copied().unwrap_or(0.0);
        assert!(
            pttl < 0.1,
            "{store:?}: {pttl:.3} PTTL per section: far-back places looked into on loopback"
        );
        let zrange = per_section.get("zrange").copied().unwrap_or(0.0);
        assert!(zrange < 2.1, "{store:?}: {zrange:.3} ZRANGE per section");
    }
}

//! Waiters far back in a long fair line do not poll the store while their turn cannot have come
//! (`TurnRegistry::behind`): on a slow link, where a wait lasts longer than the 200 ms fallback
//! poll, the work per hand-off stays constant as the line grows — two script calls per
//! section (a release that passes the turn, and the releaser's next attempt, which lines up
//! again) — instead of growing with every waiter's polls. The turns still come by message, in
//! order, and a lost message still costs a bounded wait.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_inc::{IncConfig, IncLock};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::fair::{Store, Target};
use lock_tests::proxy::LatencyProxy;
use tokio::time::Instant;

const CLIENTS: usize = 16;
const RUN: Duration = Duration::from_secs(3);

async fn client(store: Store, url: String) -> Locker {
    let options = LockOptions::default()
        .with_ttl(Duration::from_secs(20))
        .with_retry(RetryPolicy::forever().with_deadline(Duration::from_secs(15)));
    let locker = match store {
        Store::Redis => {
            Locker::new(Redlock::new(RedlockConfig::new(vec![url]).with_fair(true)).unwrap())
        }
        _ => Locker::new(
            IncLock::connect(IncConfig {
                command_timeout: 5_000,
                ..IncConfig::new(url).with_fair(true)
            })
            .await
            .unwrap(),
        ),
    };
    locker.with_options(options).unwrap()
}

/// `CLIENTS` fair clients behind a link of `delay` each way take 0 ms sections on one key for
/// `RUN`: the script calls per section, the sections, and the longest wait.
async fn hand_offs(store: Store, delay: Duration) -> (f64, u64, Duration) {
    let target = Target::start(store, "line_far_back").await.unwrap();
    let proxy = LatencyProxy::start(target.servers[0].port()).await.unwrap();
    proxy.set_delay(delay);
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let locker = client(store, proxy.url()).await;
        // Connected and subscribed before the run: the first waits are as every later one.
        locker.acquire("k").await.unwrap().release().await.unwrap();
        clients.push(locker);
    }
    let before = target.servers[0].calls("evalsha").unwrap();
    let sections = Arc::new(AtomicU64::new(0));
    let longest = Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for locker in &clients {
        let (locker, sections, longest) = (locker.clone(), sections.clone(), longest.clone());
        tasks.push(tokio::spawn(async move {
            while started.elapsed() < RUN {
                let asked = Instant::now();
                let guard = locker.acquire("k").await.unwrap();
                let waited = asked.elapsed();
                sections.fetch_add(1, Ordering::SeqCst);
                guard.release().await.unwrap();
                let mut longest = longest.lock().unwrap();
                *longest = (*longest).max(waited);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let calls = target.servers[0].calls("evalsha").unwrap() - before;
    let sections = sections.load(Ordering::SeqCst);
    for locker in &clients {
        locker.stop().await.unwrap();
    }
    // Nothing of ours but inc's fencing counter, which lives out its own expiry.
    let left = target
        .keys_left_within(Duration::ZERO, |name| !name.ends_with(":fence"))
        .await;
    assert!(left.is_empty(), "left in Redis: {left:?}");
    let longest = *longest.lock().unwrap();
    (calls as f64 / sections as f64, sections, longest)
}

/// 16 waiters behind a 15 ms link (a wait: about 16 round trips of 30–35 ms, over 200 ms):
/// about two script calls per section, as on loopback, where every waiter's 200 ms fallback
/// poll made it about three (tried: `still_behind` answering false, 3.1 calls per section).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_line_on_a_slow_link_costs_the_same_calls_per_hand_off() {
    if lock_tests::server::redis_or_skip("line_far_back").is_none() {
        return;
    }
    for store in [Store::Redis, Store::Inc] {
        let (per_section, sections, longest) = hand_offs(store, Duration::from_millis(15)).await;
        println!(
            "{store:?}: {per_section:.2} script calls per section over {sections} sections, longest wait {longest:?}"
        );
        assert!(sections >= 30, "{store:?}: only {sections} sections");
        assert!(
            per_section < 2.6,
            "{store:?}: {per_section:.2} script calls per section: waiters far back polled"
        );
        // First come, first served over a link: a wait is about the line's length in round
        // trips (16 × 30–35 ms), never a lost turn's fallback.
        assert!(
            longest < Duration::from_millis(2_000),
            "{store:?}: a wait of {longest:?}"
        );
    }
}

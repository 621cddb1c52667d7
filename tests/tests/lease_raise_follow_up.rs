//! A fenced lease (a semaphore's permit, a read or a write lock) over several Redlock nodes
//! raises the fencing counter on a quorum after it won; a node that missed that round (slower
//! than the node timeout, or failed) is asked again in the background until it answered, as a
//! mutex's raise is: a node that kept a smaller counter and later meets a quorum of nodes that
//! lost their data would hand out a smaller token. The re-send carries its script, so that a
//! node that lost its scripts and answers late runs it too.
//!
//! The schedule: three nodes, node 0 behind a proxy 2 × 150 ms away (the node timeout is
//! 50 ms) and without its scripts (`SCRIPT FLUSH`): it misses the attempt and the raise. The
//! control: with fencing off, node 0 has no counter at all (nothing else writes it).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::{LockGuard, LockOptions, Locker, RetryPolicy};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::fair::connect;
use lock_tests::proxy::LatencyProxy;
use lock_tests::server::{RedisServer, redis_or_skip};

#[derive(Clone, Copy, Debug)]
enum Lease {
    Permit,
    Read,
    Write,
}

/// Node 0's fencing counter of `k` within ~3 s of a lease's win on the other two nodes, and
/// the lease's fencing token.
async fn node0_counter_after_a_win(
    lease: Lease,
    fencing: bool,
) -> Option<(Option<u64>, Option<u64>)> {
    let binary = redis_or_skip("lease raise follow-up")?;
    let servers: Vec<RedisServer> = (0..3)
        .map(|_| RedisServer::start(&binary, &[]).unwrap())
        .collect();
    let proxy = LatencyProxy::start(servers[0].port()).await.unwrap();
    let urls = vec![proxy.url(), servers[1].url(), servers[2].url()];
    let locker = Locker::new(
        Redlock::new(
            RedlockConfig::new(urls)
                .with_fair(false)
                .with_fencing(fencing)
                .with_node_timeout(Duration::from_millis(50)),
        )
        .unwrap(),
    )
    .with_options(
        LockOptions::default()
            .with_ttl(Duration::from_secs(20))
            .with_retry(RetryPolicy::none()),
    )
    .unwrap();
    let flushed = servers[0]
        .command("SCRIPT FLUSH", Duration::from_secs(2))
        .unwrap();
    assert_eq!(flushed, "+OK");
    proxy.set_delay(Duration::from_millis(150));
    let guard: LockGuard = match lease {
        Lease::Permit => locker.acquire_permit("k", 2).await.unwrap(),
        Lease::Read => locker.acquire_read("k").await.unwrap(),
        Lease::Write => locker.acquire_write("k").await.unwrap(),
    };
    let fence = guard.fencing_token();
    let mut node0 = connect(&servers[0].url()).await;
    let counter_key = [b"k".as_slice(), lock_redlock::FENCE_SUFFIX].concat();
    let mut counter: Option<u64> = None;
    for _ in 0..60 {
        counter = redis::cmd("GET")
            .arg(&counter_key)
            .query_async(&mut node0)
            .await
            .unwrap();
        if counter.is_some_and(|counter| fence.is_some_and(|fence| counter >= fence)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(guard);
    Some((counter, fence))
}

async fn a_lease_raise_reaches_a_node_that_missed_it(lease: Lease) {
    let Some((counter, fence)) = node0_counter_after_a_win(lease, true).await else {
        return;
    };
    let fence = fence.expect("fencing is on");
    println!("{lease:?}: fence {fence}, node 0's counter {counter:?}");
    assert!(
        counter.is_some_and(|counter| counter >= fence),
        "{lease:?}: the raise never reached the node that missed it: its counter is {counter:?}, the fence {fence}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permit_raise_reaches_a_node_that_missed_it() {
    a_lease_raise_reaches_a_node_that_missed_it(Lease::Permit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_lock_raise_reaches_a_node_that_missed_it() {
    a_lease_raise_reaches_a_node_that_missed_it(Lease::Read).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_lock_raise_reaches_a_node_that_missed_it() {
    a_lease_raise_reaches_a_node_that_missed_it(Lease::Write).await;
}

/// Control: without fencing nothing writes node 0's counter, so the check above reads only
/// what a raise wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_fencing_no_counter_is_written() {
    let Some((counter, fence)) = node0_counter_after_a_win(Lease::Permit, false).await else {
        return;
    };
    assert_eq!((counter, fence), (None, None));
}

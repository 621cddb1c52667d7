//! Attack on session 30's one-node fair shortcuts (99d0b38): a refused waiter's line attempt
//! says whether the key held a lock's value or nothing (`plain`), and then no key type is
//! asked; and a waiter's first attempt on a key its client lately lined up on goes through the
//! line at once (`FairLine::expects_line`), without the plain `SET NX` + give-back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use lock_core::{LockError, LockOptions, Locker, RetryPolicy};
use lock_tests::fair::{Store, Target, waiting};
use tokio::time::Instant;

/// `n` milliseconds.
fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const TTL: Duration = Duration::from_secs(10);

/// Waits forever (15 s at most), asking every 8 s unless woken: a waiter nobody tells when its
/// turn comes is seen.
fn slow_poll() -> RetryPolicy {
    RetryPolicy::forever()
        .with_retry_delay(ms(8_000))
        .with_max_delay(ms(8_000))
        .with_retry_jitter(Duration::ZERO)
        .with_deadline(ms(15_000))
}

/// Options of one acquisition that gives up after `deadline`.
fn giving_up_after(deadline: Duration) -> LockOptions {
    LockOptions::default().with_ttl(TTL).with_retry(
        RetryPolicy::forever()
            .with_retry_delay(ms(50))
            .with_deadline(deadline),
    )
}

/// Lines a waiter of `client` up on `key` (held by someone else), and lets it give up: the
/// client now expects a line on `key` for a second.
async fn line_up_and_give_up(client: &Locker, key: &str) {
    let outcome = client.acquire_with(key, &giving_up_after(ms(100))).await;
    assert!(
        matches!(outcome, Err(LockError::Timeout { .. })),
        "the waiter that lines up: {outcome:?}"
    );
}

/// A key left free by a client without `fair` (or a holder that expired) while a dead
/// waiter heads its line: a fair waiter's plain first attempt reserves it for that head (the
/// give-back), and the waiter, first behind the reservation, is told when it lapses. The
/// waiter whose client expects a line goes through the line at once: the key stays free, the
/// dead head is only woken, the waiter is second in line behind nobody that holds anything,
/// and nothing tells it when the dead head lapses: it sleeps on until its next attempt (here
/// the renewal of its place, half its ttl after its first attempt; its 8 s retry delay with a
/// longer ttl).
///
/// Broken by 99d0b38 (passes on 267a901, taken 2 ms after the head lapsed): taken 3.1 s after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_expecting_a_line_behind_a_dead_head_on_a_free_key_is_told_when_it_lapses() {
    let Some(target) = Target::start(Store::Redis, "attack_s30a").await else {
        return;
    };
    let plain = target.locker(false, TTL, waiting(ms(100))).await;
    let fair = target.locker(true, TTL, slow_poll()).await;
    let held = plain.acquire("k").await.unwrap();
    target.dead_waiter("k", ms(2_000)).await;
    let head_lapses = Instant::now() + ms(2_000);
    line_up_and_give_up(&fair, "k").await;
    // A release without `fair`: the key is free, the dead waiter heads the line.
    held.release().await.unwrap();
    let guard = fair.acquire("k").await.unwrap();
    let late = Instant::now().saturating_duration_since(head_lapses);
    println!("taken {late:?} after the dead head lapsed");
    assert!(
        late < ms(1_500),
        "the waiter was taken {late:?} after the dead head lapsed"
    );
    guard.release().await.unwrap();
    fair.stop().await.unwrap();
    plain.stop().await.unwrap();
    let left = target.keys_left_within(ms(3_000), |_| true).await;
    assert!(left.is_empty(), "left in Redis: {left:?}");
}

//! The head of a fair line on one node (`redis`) holds the key the release gives it: the release
//! reserves the key for the head and names the reservation's expiry in its message, and a head
//! whose latest attempt renewed its place to exactly that expiry holds the reservation as its
//! lock, without another round trip. With fencing (the control) the head asks, as before: the
//! fence is drawn by an attempt.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::{LockOptions, Locker};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::fair::{Store, Target, waiting};

/// A fair client of `target`'s node, with fencing on or off.
fn client(target: &Target, fencing: bool) -> Locker {
    let backend = Redlock::new(
        RedlockConfig::new([target.url.clone()])
            .with_fair(true)
            .with_fencing(fencing),
    )
    .unwrap();
    Locker::new(backend)
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(10))
                .with_retry(waiting(Duration::from_secs(5))),
        )
        .unwrap()
}

/// The server's count of script calls (`EVALSHA` and `EVAL`) so far.
async fn script_calls(connection: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(connection)
        .await
        .unwrap();
    info.lines()
        .filter(|line| line.starts_with("cmdstat_evalsha:") || line.starts_with("cmdstat_eval:"))
        .filter_map(|line| {
            let calls = line.split("calls=").nth(1)?;
            calls.split(',').next()?.parse::<u64>().ok()
        })
        .sum()
}

/// A holder and a waiter on one key: the waiter lines up, the holder releases; the waiter's
/// guard token, and the script calls the server saw from the release on until the waiter held
/// the key (the release's own included).
async fn hand_off(target: &Target, fencing: bool, key: &'static str) -> (String, u64) {
    let (holder, waiter) = (client(target, fencing), client(target, fencing));
    let guard = holder.acquire(key).await.unwrap();
    let (told, heard) = tokio::sync::oneshot::channel();
    let (go, gone) = tokio::sync::oneshot::channel::<()>();
    let waiting = tokio::spawn(async move {
        let mut guard = waiter.acquire(key).await.unwrap();
        told.send(guard.token().expose().to_string()).unwrap();
        gone.await.unwrap();
        // The lock it holds is a lock: extended and released by its token.
        guard.extend(Duration::from_secs(20)).await.unwrap();
        guard.release().await.unwrap();
        waiter.stop().await.unwrap();
    });
    // The waiter's first attempts (plain, then in line) and its wait: its long retry delay
    // leaves it nothing but the release's message to act on.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server = redis::Client::open(target.url.as_str()).unwrap();
    let mut connection = server.get_multiplexed_async_connection().await.unwrap();
    let before = script_calls(&mut connection).await;
    guard.release().await.unwrap();
    let token = tokio::time::timeout(Duration::from_secs(3), heard)
        .await
        .expect("the waiter was not served within 3 s of the release")
        .unwrap();
    let calls = script_calls(&mut connection).await - before;
    go.send(()).unwrap();
    waiting.await.unwrap();
    holder.stop().await.unwrap();
    // A fencing counter outlives the lock by design (it expires once the server's clock has
    // passed its value); nothing else may stay.
    let left: Vec<Vec<u8>> = target
        .keys()
        .await
        .into_iter()
        .filter(|stored| !stored.ends_with(b":fence"))
        .collect();
    assert!(left.is_empty(), "left in Redis: {left:?}");
    (token, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_head_of_a_one_node_line_holds_the_key_the_release_gives_it() {
    let Some(target) = Target::start(Store::Redis, "fair grant").await else {
        return;
    };
    // The first hand-off loads the scripts (a `NOSCRIPT` answer, then the load): counted from
    // the second on.
    hand_off(&target, false, "warm").await;
    let (token, calls) = hand_off(&target, false, "granted").await;
    println!("granted: token {token}, {calls} script calls from the release on");
    assert!(
        token.starts_with("lock-turn-reserved:"),
        "the head asked for the key instead of holding the reservation: token {token}"
    );
    assert_eq!(calls, 1, "only the release's script: {calls} script calls");

    // The control: with fencing the head asks (its attempt draws the fence).
    hand_off(&target, true, "warm-fenced").await;
    let (token, calls) = hand_off(&target, true, "granted-fenced").await;
    println!("fenced: token {token}, {calls} script calls from the release on");
    assert!(!token.starts_with("lock-turn-reserved:"), "{token}");
    assert_eq!(
        calls, 2,
        "the release's script and the head's attempt: {calls}"
    );
}

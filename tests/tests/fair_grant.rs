//! The head of a fair line on one node (`redis`) holds the key the release gives it: the release
//! reserves the key for the head and names the reservation's expiry in its message, and a head
//! whose latest attempt renewed its place to exactly that expiry holds the reservation as its
//! lock, without another round trip. With fencing (the control) the head asks, as before: the
//! fence is drawn by an attempt. The INCR lock (`inc`) does the same with its fence: the release
//! takes the lock for the head, draws its fencing token and names both in its message.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::{LockOptions, Locker};
use lock_inc::{IncConfig, IncLock};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::fair::{Store, Target, waiting};

/// Which fair client `client` makes.
#[derive(Clone, Copy)]
enum Kind {
    /// Redlock on the one node, fencing on or off.
    Redlock { fencing: bool },
    /// The INCR lock (always fenced).
    Inc,
}

/// A fair client of `target`'s node.
async fn client(target: &Target, kind: Kind) -> Locker {
    let locker = match kind {
        Kind::Redlock { fencing } => Locker::new(
            Redlock::new(
                RedlockConfig::new([target.url.clone()])
                    .with_fair(true)
                    .with_fencing(fencing),
            )
            .unwrap(),
        ),
        Kind::Inc => Locker::new(
            IncLock::connect(IncConfig::new(target.url.clone()).with_fair(true))
                .await
                .unwrap(),
        ),
    };
    locker
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

/// What a hand-off showed: the waiter's guard token, the script calls the server saw from the
/// release on until the waiter held the key (the release's own included), and the holder's and
/// the waiter's fencing tokens.
struct HandOff {
    token: String,
    calls: u64,
    fences: (Option<u64>, Option<u64>),
}

/// A holder and a waiter on one key: the waiter lines up, the holder releases.
async fn hand_off(target: &Target, kind: Kind, key: &'static str) -> HandOff {
    let (holder, waiter) = (client(target, kind).await, client(target, kind).await);
    let guard = holder.acquire(key).await.unwrap();
    let held_fence = guard.fencing_token();
    let (told, heard) = tokio::sync::oneshot::channel();
    let (go, gone) = tokio::sync::oneshot::channel::<()>();
    let waiting = tokio::spawn(async move {
        let mut guard = waiter.acquire(key).await.unwrap();
        told.send((guard.token().expose().to_string(), guard.fencing_token()))
            .unwrap();
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
    let (token, fence) = tokio::time::timeout(Duration::from_secs(3), heard)
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
    HandOff {
        token,
        calls,
        fences: (held_fence, fence),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_head_of_a_one_node_line_holds_the_key_the_release_gives_it() {
    let Some(target) = Target::start(Store::Redis, "fair grant").await else {
        return;
    };
    // The first hand-off loads the scripts (a `NOSCRIPT` answer, then the load): counted from
    // the second on.
    let plain = Kind::Redlock { fencing: false };
    hand_off(&target, plain, "warm").await;
    let HandOff { token, calls, .. } = hand_off(&target, plain, "granted").await;
    println!("granted: token {token}, {calls} script calls from the release on");
    assert!(
        token.starts_with("lock-turn-reserved:"),
        "the head asked for the key instead of holding the reservation: token {token}"
    );
    assert_eq!(calls, 1, "only the release's script: {calls} script calls");

    // The control: with fencing the head asks (its attempt draws the fence).
    let fenced = Kind::Redlock { fencing: true };
    hand_off(&target, fenced, "warm-fenced").await;
    let HandOff { token, calls, .. } = hand_off(&target, fenced, "granted-fenced").await;
    println!("fenced: token {token}, {calls} script calls from the release on");
    assert!(!token.starts_with("lock-turn-reserved:"), "{token}");
    assert_eq!(
        calls, 2,
        "the release's script and the head's attempt: {calls}"
    );
}

/// The INCR lock: the release takes the lock for the head, with a fencing token above the
/// holder's, and the head holds it (one script call: the release's). Before, the release woke
/// the head, which asked (two calls) and held its own token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_head_of_an_inc_line_holds_the_lock_and_the_fence_the_release_gives_it() {
    let Some(target) = Target::start(Store::Redis, "inc fair grant").await else {
        return;
    };
    hand_off(&target, Kind::Inc, "warm").await;
    let HandOff {
        token,
        calls,
        fences,
    } = hand_off(&target, Kind::Inc, "granted").await;
    println!("inc: token {token}, {calls} script calls, fences {fences:?}");
    assert!(
        token.starts_with("lock-turn-reserved:"),
        "the head asked for the lock instead of holding the one it was given: token {token}"
    );
    assert_eq!(calls, 1, "only the release's script: {calls} script calls");
    let (Some(held), Some(granted)) = fences else {
        panic!("no fencing token: {fences:?}");
    };
    assert!(granted > held, "fences went backwards: {fences:?}");
}

/// Raw API, Redlock on one node without fencing (adv26a's find on inc, where it broke
/// exclusion): one waiter id used on two keys (`LockRequest::with_waiter` is the caller's).
/// The reservation of key A, whose message names the expiry the waiter's attempt on A got,
/// must not make the waiter hold key B, which another client holds: the grant is held only on
/// the key the waiter's attempts renewed its place on (`TurnRegistry::anchor`/`granted`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_of_one_key_is_not_held_on_another_by_a_reused_waiter_id() {
    use lock_core::Token;
    use lock_core::raw::{KeySet, Lock, LockRequest};
    let Some(target) = Target::start(Store::Redis, "fair grant raw").await else {
        return;
    };
    let holder = client(&target, Kind::Redlock { fencing: false }).await;
    let (a, b) = ("raw-a", "raw-b");
    let held_a = holder.acquire(a).await.unwrap();
    let held_b = holder.acquire(b).await.unwrap();
    let raw = Redlock::new(RedlockConfig::new([target.url.clone()]).with_fencing(false)).unwrap();
    let waiter = Token::generate().unwrap();
    let attempt = |key: &str| {
        LockRequest::new(
            KeySet::one(lock_core::Key::new(key).unwrap()),
            Token::generate().unwrap(),
            Duration::from_secs(5),
        )
        .unwrap()
        .with_waiter(waiter.clone())
        .with_after_wait(true)
        .with_will_wait(true)
    };
    // The waiter asks for A and lines up there; A's release reserves A for it.
    assert!(raw.try_acquire(&attempt(a)).await.unwrap().is_none());
    tokio::time::sleep(Duration::from_millis(100)).await;
    held_a.release().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The same waiter's attempt on B, which the holder still holds.
    let on_b = raw.try_acquire(&attempt(b)).await.unwrap();
    assert!(
        on_b.is_none(),
        "the waiter holds B (token {:?}) while the holder's guard of B is live: {}",
        on_b.as_ref()
            .map(|h| h.lease().token().expose().to_string()),
        held_b.is_valid()
    );
    held_b.release().await.unwrap();
    holder.stop().await.unwrap();
    raw.shutdown().await.unwrap();
}

/// inc: a client that has waited before (its turn channel subscribed) lines a new waiter up with
/// its first attempt: one script call to join the line of a held key, where a client that never
/// waited (the control) first asks as a single try, then lines up: two calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inc_client_that_waited_before_lines_up_with_its_first_attempt() {
    let Some(target) = Target::start(Store::Redis, "inc first attempt").await else {
        return;
    };
    let holder = client(&target, Kind::Inc).await;
    let server = redis::Client::open(target.url.as_str()).unwrap();
    let mut connection = server.get_multiplexed_async_connection().await.unwrap();
    // The script calls a waiter of `waiter` makes to join the line of `key`, held by `holder`.
    async fn lining_up(
        holder: &Locker,
        waiter: &Locker,
        connection: &mut redis::aio::MultiplexedConnection,
        key: &'static str,
    ) -> u64 {
        let guard = holder.acquire(key).await.unwrap();
        let before = script_calls(connection).await;
        let waiter = waiter.clone();
        let waiting =
            tokio::spawn(async move { waiter.acquire(key).await.unwrap().release().await });
        let line = format!("lock:{{{key}}}:queue");
        let mut lined_up = false;
        for _ in 0..1_000 {
            let members: u64 = redis::cmd("ZCARD")
                .arg(&line)
                .query_async(connection)
                .await
                .unwrap();
            if members == 1 {
                lined_up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert!(lined_up, "the waiter never lined up on {key}");
        let calls = script_calls(connection).await - before;
        guard.release().await.unwrap();
        waiting.await.unwrap().unwrap();
        calls
    }
    let fresh = client(&target, Kind::Inc).await;
    // The scripts loaded first (a NOSCRIPT answer and a load are not what is counted).
    lining_up(&holder, &fresh, &mut connection, "warm").await;
    let control = client(&target, Kind::Inc).await;
    let never_waited = lining_up(&holder, &control, &mut connection, "control").await;
    let waited_before = lining_up(&holder, &fresh, &mut connection, "again").await;
    println!(
        "script calls to line up: {never_waited} (never waited), {waited_before} (waited before)"
    );
    assert_eq!(never_waited, 2, "the control: a single try, then the line");
    assert_eq!(
        waited_before, 1,
        "a client subscribed already lines up at once"
    );
    for locker in [holder, fresh, control] {
        locker.stop().await.unwrap();
    }
}

//! adv22a: hostile tests of inc's `?protocol=resp3` (7f589ac): the URL's query read by hand
//! (`IncConfig::resp3`) beside what redis-rs reads from the same URL for Redlock; RESP3 on a
//! cluster, on Valkey, for semaphores and read-write locks; the subscriber's pushes waking
//! waiters; the subscriber or every connection killed, the server restarted, the password
//! refused and accepted again over `HELLO 3`; mutual exclusion under contention. Real
//! redis-server (and valkey-server) processes on 127.0.0.1.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use lock_core::{Holding, LeaseKind, LockError, LockOptions, Locker, RetryPolicy};
use lock_inc::{IncConfig, IncLock};
use lock_tests::history::Intervals;
use lock_tests::server::{
    RedisServer, client_list, cluster_url, is_pubsub, redis_or_skip, start_cluster,
    valkey_server_binary,
};
use tokio::time::{Instant, sleep};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const PROBE: Duration = Duration::from_secs(2);

/// The bytes no error may carry: part of every password below.
const SECRET: &str = "s3cr3t";

/// The `resp=` of every connection of the server at `port` but the asking one.
async fn protocols(port: u16) -> Vec<String> {
    client_list(port)
        .await
        .iter()
        .filter_map(|line| {
            line.split(' ')
                .find_map(|field| field.strip_prefix("resp="))
                .map(str::to_owned)
        })
        .collect()
}

/// Retries forever every `delay` without jitter, for 15 s at most.
fn waiting(delay: Duration) -> RetryPolicy {
    RetryPolicy::forever()
        .with_retry_delay(delay)
        .with_retry_jitter(Duration::ZERO)
        .with_deadline(Duration::from_secs(15))
}

/// A client of its own (as another process would have) on `url`.
async fn locker(
    url: &str,
    configure: impl FnOnce(IncConfig) -> IncConfig,
    retry: RetryPolicy,
) -> Locker {
    let lock = IncLock::connect(configure(IncConfig::new(url)))
        .await
        .unwrap();
    Locker::new(lock)
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(10))
                .with_retry(retry),
        )
        .unwrap()
}

/// What redis-rs (Redlock's client) reads from `url`: `Some(true)` for RESP3, `None` when it
/// refuses the URL.
fn redis_rs_resp3(url: &str) -> Option<bool> {
    let client = redis::Client::open(url).ok()?;
    Some(client.get_connection_info().redis_settings().protocol() == redis::ProtocolVersion::RESP3)
}

/// What inc makes of `url`: `Err` with the error's text when it refuses it, else the protocols
/// its connections speak (a held lock, so that the command connection is up).
async fn inc_speaks(server: &RedisServer, url: &str) -> Result<Vec<String>, String> {
    let lock = match IncLock::connect(IncConfig::new(url)).await {
        Ok(lock) => lock,
        Err(error) => return Err(format!("{error} {error:?}")),
    };
    let locker = Locker::new(lock);
    let guard = locker.acquire("k").await.unwrap();
    let seen = protocols(server.port()).await;
    guard.release().await.unwrap();
    locker.stop().await.unwrap();
    Ok(seen)
}

fn server() -> Option<RedisServer> {
    Some(RedisServer::start(&redis_or_skip("adv22a")?, &[]).unwrap())
}

// ---------------------------------------------------------------------------------------------
// The URL's query, read by hand
// ---------------------------------------------------------------------------------------------

/// The controls: the plain spellings, read alike by inc and redis-rs. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_spellings_are_read_alike_by_inc_and_redis_rs() {
    let Some(server) = server() else { return };
    let base = server.url();
    for (query, resp3) in [
        ("", false),
        ("?", false),
        ("?&", false),
        ("?&&protocol=resp3&", true),
        ("?protocol=3", true),
        ("?protocol=resp2", false),
        ("?x=1&protocol=resp3&y", true),
    ] {
        let url = format!("{base}{query}");
        assert_eq!(redis_rs_resp3(&url), Some(resp3), "{url}");
        let seen = inc_speaks(&server, &url).await.unwrap();
        let want = if resp3 { "3" } else { "2" };
        assert!(
            !seen.is_empty() && seen.iter().all(|r| r == want),
            "{url}: {seen:?}"
        );
    }
}

/// Broke: `?%70rotocol=resp3` is `protocol=resp3` once percent-decoded, as redis-rs (and fred,
/// for `node=`) read a query: Redlock speaks RESP3 on this URL, but inc compares the raw name,
/// finds no `protocol`, and speaks RESP2 without a word — the silent ignoring 7f589ac meant
/// to end. Either speak RESP3 or refuse the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_percent_encoded_protocol_name_is_not_silently_ignored() {
    let Some(server) = server() else { return };
    let url = format!("{}?%70rotocol=resp3", server.url());
    assert_eq!(redis_rs_resp3(&url), Some(true), "redis-rs reads RESP3");
    match inc_speaks(&server, &url).await {
        Err(refused) => assert!(refused.contains("protocol"), "{refused}"),
        Ok(seen) => assert!(
            seen.iter().all(|r| r == "3"),
            "inc spoke {seen:?} where Redlock speaks RESP3 on {url}"
        ),
    }
}

/// `?protocol=%72esp3` (`resp3` percent-encoded): redis-rs reads RESP3; inc refused the URL
/// with a typed error naming it (on main: not the same reading, but not silent either), and
/// reads RESP3 since the fix. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_percent_encoded_protocol_value_is_refused_or_read_never_ignored() {
    let Some(server) = server() else { return };
    for query in ["?protocol=%72esp3", "?protocol=%33"] {
        let url = format!("{}{query}", server.url());
        assert_eq!(redis_rs_resp3(&url), Some(true), "{url}");
        match inc_speaks(&server, &url).await {
            Err(refused) => assert!(refused.contains("protocol"), "{refused}"),
            Ok(seen) => assert!(seen.iter().all(|r| r == "3"), "{url}: {seen:?}"),
        }
    }
}

/// Broke: a `?` in the URL's fragment is no query (redis-rs reads RESP2 from
/// `…/#x?protocol=resp3`, fred ignores the fragment), yet inc splits the whole URL at its
/// first `?` and speaks RESP3 there; and it refuses `…/#x?protocol=resp4`, which both
/// clients take. inc must read the query the way the clients do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_in_the_fragment_is_not_read_as_the_query() {
    let Some(server) = server() else { return };
    let url = format!("{}#x?protocol=resp3", server.url());
    assert_eq!(redis_rs_resp3(&url), Some(false), "redis-rs: no query");
    let seen = inc_speaks(&server, &url).await;
    assert!(
        seen.as_ref()
            .is_ok_and(|seen| seen.iter().all(|r| r == "2")),
        "{url}: {seen:?} where Redlock speaks RESP2"
    );
}

/// Upper case (`RESP3`), a trailing space (`+`), a repeat, non-UTF-8 escapes, and a value of
/// 100 000 bytes: refused with a typed error naming `url` (redis-rs refuses the first ones
/// too), never a panic, and no error, `Display` or `Debug`, nor the configuration's `Debug`,
/// carries the password. Held.
#[tokio::test]
async fn odd_protocol_values_are_refused_without_the_password() {
    let long = "r".repeat(100_000);
    for query in [
        "?protocol=RESP3".to_owned(),
        "?protocol=Resp2".to_owned(),
        "?protocol=resp3+".to_owned(),
        "?protocol=resp3%00".to_owned(),
        "?protocol=%FF%FE".to_owned(),
        "?protocol=resp3&protocol=resp3".to_owned(),
        "?protocol=resp3=".to_owned(),
        "?protocol==resp3".to_owned(),
        format!("?protocol={long}"),
        "?protocol=app:app-s3cr3t@h".to_owned(),
        "?protocol=redis://u:app-s3cr3t@h".to_owned(),
        "?password=app-s3cr3t&protocol=4".to_owned(),
    ] {
        for base in [
            "redis://app:app-s3cr3t@127.0.0.1:1/0",
            "redis-cluster://app:app-s3cr3t@127.0.0.1:1",
            "valkey://:app-s3cr3t@127.0.0.1:1/",
        ] {
            let url = format!("{base}{query}");
            let config = IncConfig::new(url.as_str());
            let debug = format!("{config:?}");
            assert!(!debug.contains(SECRET), "{debug}");
            match IncLock::connect(config).await {
                Err(LockError::InvalidInput { field, reason }) => {
                    assert_eq!(field, "url");
                    // An `@` in the query is read as the end of the user info, refused as such.
                    assert!(
                        reason.contains("protocol") || query.contains('@'),
                        "{reason}"
                    );
                    assert!(!reason.contains(SECRET), "{reason}");
                    // The value is shown twice (the URL, then the value): bounded all the same.
                    assert!(reason.len() < 250_000, "{}", reason.len());
                }
                other => panic!("{}: {other:?}", &url[..url.len().min(120)]),
            }
        }
    }
    // The control: the same URLs with a good protocol pass validation.
    IncConfig::new("redis://app:app-s3cr3t@127.0.0.1:1/0?protocol=resp3")
        .validate()
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Everything over RESP3: one server, a cluster, Valkey
// ---------------------------------------------------------------------------------------------

/// Mutexes with increasing fences, semaphores, read-write locks with a downgrade, `inspect`
/// and `purge`, through one client on `url`; `label` names the run.
async fn exercise(url: &str, label: &str) {
    let locker = locker(url, |config| config, RetryPolicy::none()).await;
    let other = locker_no_retry(url).await;
    // Fences increase, one holder at a time.
    let mut last = 0;
    for round in 0..10 {
        let key = format!("m{}", round % 3);
        let guard = locker.acquire(&key).await.unwrap();
        assert!(
            other.try_acquire(&key).await.unwrap().is_none(),
            "{label}: two holders"
        );
        let fence = guard.fencing_token().unwrap();
        assert!(fence > last, "{label}: fence {fence} after {last}");
        last = fence;
        guard.release().await.unwrap();
    }
    // A semaphore of 3 permits.
    let kind = LeaseKind::permit(3).unwrap();
    let mut permits = Vec::new();
    for _ in 0..3 {
        permits.push(
            other
                .try_acquire_kind("sem", kind)
                .await
                .unwrap()
                .expect(label),
        );
    }
    assert!(
        locker
            .try_acquire_kind("sem", kind)
            .await
            .unwrap()
            .is_none(),
        "{label}: 4th permit"
    );
    permits.pop().unwrap().release().await.unwrap();
    let fourth = locker
        .try_acquire_kind("sem", kind)
        .await
        .unwrap()
        .expect(label);
    // Readers together, never with a writer; a downgraded writer lets readers in.
    let read = locker
        .try_acquire_kind("rw", LeaseKind::Read)
        .await
        .unwrap()
        .expect(label);
    let read2 = other
        .try_acquire_kind("rw", LeaseKind::Read)
        .await
        .unwrap()
        .expect(label);
    assert!(
        other
            .try_acquire_kind("rw", LeaseKind::Write)
            .await
            .unwrap()
            .is_none(),
        "{label}"
    );
    read.release().await.unwrap();
    read2.release().await.unwrap();
    let mut write = other
        .try_acquire_kind("rw", LeaseKind::Write)
        .await
        .unwrap()
        .expect(label);
    assert!(
        locker
            .try_acquire_kind("rw", LeaseKind::Read)
            .await
            .unwrap()
            .is_none(),
        "{label}"
    );
    write.downgrade().await.unwrap();
    let read3 = locker
        .try_acquire_kind("rw", LeaseKind::Read)
        .await
        .unwrap()
        .expect(label);
    // inspect: held with a ttl, then free.
    let held = locker.acquire("inspected").await.unwrap();
    let states = locker.inspect("inspected").await.unwrap();
    assert!(
        states
            .iter()
            .all(|s| matches!(s.holding, Holding::Held { ttl: Some(_) }) && s.server.is_some()),
        "{label}: {states:?}"
    );
    held.release().await.unwrap();
    let states = locker.inspect("inspected").await.unwrap();
    assert!(
        states.iter().all(|s| s.holding == Holding::Free),
        "{label}: {states:?}"
    );
    // purge: the three keys under `p/` go, the others stay.
    let mut purged = Vec::new();
    for key in ["p/1", "p/2", "p/3"] {
        purged.push(locker.acquire(key).await.unwrap());
    }
    let kept = locker.acquire("q/1").await.unwrap();
    let removed = locker.purge("p/").await.unwrap();
    assert!(removed >= 3, "{label}: purge removed {removed}");
    for key in ["p/1", "p/2", "p/3"] {
        assert!(
            other.try_acquire(key).await.unwrap().is_some(),
            "{label}: {key} after purge"
        );
    }
    assert!(
        other.try_acquire("q/1").await.unwrap().is_none(),
        "{label}: purge took q/1"
    );
    kept.release().await.unwrap();
    drop(purged);
    drop((permits, fourth, write, read3));
    locker.stop().await.unwrap();
    other.stop().await.unwrap();
}

async fn locker_no_retry(url: &str) -> Locker {
    locker(url, |config| config, RetryPolicy::none()).await
}

/// One server over RESP3: every operation, and every connection says `resp=3`. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_every_operation_on_one_server() {
    let Some(server) = server() else { return };
    let url = format!("{}?protocol=resp3", server.url());
    exercise(&url, "redis resp3").await;
    let seen = protocols(server.port()).await;
    assert!(seen.iter().all(|r| r == "3"), "{seen:?}");
}

/// A Redis Cluster named `redis-cluster://…?node=…&protocol=resp3` (and with `protocol`
/// first): every node's connections say `resp=3`, and every operation works. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_every_operation_on_a_cluster() {
    let Some(binary) = redis_or_skip("adv22a") else {
        return;
    };
    let servers = start_cluster(&binary, 3).unwrap();
    let seeds = cluster_url(&servers);
    let (head, nodes) = seeds.split_once('?').unwrap();
    for url in [
        format!("{seeds}&protocol=resp3"),
        format!("{head}?protocol=resp3&{nodes}"),
    ] {
        let locker = locker_no_retry(&url).await;
        let guard = locker.acquire("probe").await.unwrap();
        for server in &servers {
            let seen = protocols(server.port()).await;
            assert!(
                !seen.is_empty() && seen.iter().all(|r| r == "3"),
                "{url}: node {} sees {seen:?}",
                server.port()
            );
        }
        guard.release().await.unwrap();
        locker.stop().await.unwrap();
    }
    exercise(&format!("{seeds}&protocol=resp3"), "cluster resp3").await;
}

/// Valkey over RESP3 (`valkey://…?protocol=resp3`), when valkey-server is installed. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_every_operation_on_valkey() {
    let Some(binary) = valkey_server_binary() else {
        println!("adv22a: valkey-server not found, skipped");
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let url = format!("valkey://127.0.0.1:{}/?protocol=resp3", server.port());
    let locker = locker_no_retry(&url).await;
    let states = locker.inspect("k").await.unwrap();
    assert!(
        states[0]
            .server
            .as_deref()
            .is_some_and(|s| s.starts_with("valkey ")),
        "{states:?}"
    );
    locker.stop().await.unwrap();
    exercise(&url, "valkey resp3").await;
    let seen = protocols(server.port()).await;
    assert!(seen.iter().all(|r| r == "3"), "{seen:?}");
}

// ---------------------------------------------------------------------------------------------
// Waking waiters by push over RESP3: promptly, and again after the subscriber is cut
// ---------------------------------------------------------------------------------------------

/// The retry delay of the waiters below: a handoff within [`PROMPT`] came by push.
const DELAY: Duration = Duration::from_secs(2);
const PROMPT: Duration = Duration::from_millis(300);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Wake {
    /// `wake_on_release`: the release channel.
    Release,
    /// `fair`: the waiter's turn.
    Fair,
    /// Neither (the negative control: the waiter polls every [`DELAY`]).
    Poll,
}

impl Wake {
    fn configure(self, config: IncConfig) -> IncConfig {
        match self {
            Self::Release => config.with_wake_on_release(true),
            Self::Fair => config.with_fair(true),
            Self::Poll => config,
        }
    }
}

/// How many subscriptions the subscriber connections of the server at `port` hold, over
/// `resp=` `protocol` (lines of other protocols count as none).
async fn subscriptions(port: u16, protocol: &str) -> usize {
    client_list(port)
        .await
        .iter()
        .filter(|line| is_pubsub(line) && line.contains(&format!(" resp={protocol}")))
        .filter_map(|line| {
            line.split(' ')
                .find_map(|field| field.strip_prefix("sub="))
                .and_then(|n| n.parse::<usize>().ok())
        })
        .sum()
}

async fn wait_for_subscription(port: u16, protocol: &str) {
    let started = Instant::now();
    while subscriptions(port, protocol).await == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no subscription over resp={protocol}: {:?}",
            client_list(port).await
        );
        sleep(ms(20)).await;
    }
}

/// A waiter of its own client waits for `key`, held by `holder`; once it is surely asleep
/// (subscribed, or 300 ms in for polling), `before_release` runs, then the holder releases:
/// the time from the release to the waiter's guard.
async fn handoff(
    holder: &Locker,
    waiter: &Locker,
    key: &str,
    port: u16,
    wake: Wake,
    protocol: &str,
    before_release: impl AsyncFnOnce(),
) -> Duration {
    let held = holder.acquire(key).await.unwrap();
    let waiting = tokio::spawn({
        let (waiter, key) = (waiter.clone(), key.to_owned());
        async move {
            let guard = waiter.acquire(&key).await.unwrap();
            (Instant::now(), guard)
        }
    });
    if wake != Wake::Poll {
        wait_for_subscription(port, protocol).await;
    }
    sleep(ms(300)).await;
    before_release().await;
    let released = Instant::now();
    held.release().await.unwrap();
    let (acquired, guard) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiter got the key within 5 s")
        .unwrap();
    guard.release().await.unwrap();
    acquired - released
}

async fn prompt_handoffs(wake: Wake, query: &str, protocol: &str) -> Vec<Duration> {
    let server = server().unwrap();
    let url = format!("{}{query}", server.url());
    let holder = locker(&url, |config| wake.configure(config), waiting(DELAY)).await;
    let waiter = locker(&url, |config| wake.configure(config), waiting(DELAY)).await;
    let mut took = Vec::new();
    // The same key thrice (subscribed and unsubscribed anew each time), then two others.
    for key in ["w", "w", "w", "x", "y"] {
        took.push(
            handoff(
                &holder,
                &waiter,
                key,
                server.port(),
                wake,
                protocol,
                async || {},
            )
            .await,
        );
    }
    let seen = protocols(server.port()).await;
    assert!(seen.iter().all(|r| r == protocol), "{query}: {seen:?}");
    holder.stop().await.unwrap();
    waiter.stop().await.unwrap();
    took
}

/// Over RESP3, a release wakes the other client's waiter by push within 300 ms (its retry
/// delay is 2 s), five times over, for `wake_on_release` and for `fair`; RESP2 the same.
/// Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_pushes_wake_waiters_promptly() {
    if redis_or_skip("adv22a").is_none() {
        return;
    }
    for wake in [Wake::Release, Wake::Fair] {
        for (query, protocol) in [("?protocol=resp3", "3"), ("", "2")] {
            let took = prompt_handoffs(wake, query, protocol).await;
            assert!(
                took.iter().all(|t| *t < PROMPT),
                "{wake:?} {query}: {took:?}"
            );
        }
    }
}

/// The negative control of the checker above: without wake-ups, the waiter sleeps out its
/// delay (more than a second here), so that a prompt handoff does show a push. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_a_polling_waiter_is_not_prompt() {
    if redis_or_skip("adv22a").is_none() {
        return;
    }
    let took = prompt_handoffs(Wake::Poll, "?protocol=resp3", "3").await;
    assert!(took.iter().all(|t| *t > Duration::from_secs(1)), "{took:?}");
}

/// What is cut while the waiter waits.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// `CLIENT KILL TYPE pubsub`: the subscriber alone.
    Subscriber,
    /// Every connection of the clients (normal and pubsub).
    Everything,
}

/// Over RESP3 (RESP2 the control), the waiter's subscriber (or every connection) killed while
/// it waits: once fred has connected and subscribed again (over RESP3 again), the release
/// still wakes it within 300 ms, and the holder's release goes through. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_pushes_wake_waiters_after_the_subscriber_is_cut() {
    let Some(server) = server() else { return };
    let port = server.port();
    for wake in [Wake::Release, Wake::Fair] {
        for cut in [Cut::Subscriber, Cut::Everything] {
            for (query, protocol) in [("?protocol=resp3", "3"), ("", "2")] {
                let url = format!("{}{query}", server.url());
                let holder = locker(&url, |config| wake.configure(config), waiting(DELAY)).await;
                let waiter = locker(&url, |config| wake.configure(config), waiting(DELAY)).await;
                let key = format!("cut-{wake:?}-{cut:?}-{protocol}");
                let took = handoff(&holder, &waiter, &key, port, wake, protocol, async || {
                    let mut admin = redis::Client::open(server.url())
                        .unwrap()
                        .get_connection_with_timeout(PROBE)
                        .unwrap();
                    let kinds: &[&str] = match cut {
                        Cut::Subscriber => &["pubsub"],
                        Cut::Everything => &["pubsub", "normal"],
                    };
                    for kind in kinds {
                        let _: redis::Value = redis::cmd("CLIENT")
                            .arg(&["KILL", "TYPE", kind, "SKIPME", "yes"][..])
                            .query(&mut admin)
                            .unwrap();
                    }
                    drop(admin);
                    // Connected and subscribed again, then asleep again.
                    sleep(ms(100)).await;
                    wait_for_subscription(port, protocol).await;
                    let started = Instant::now();
                    while protocols(port).await.len() < 3 {
                        assert!(started.elapsed() < Duration::from_secs(5), "no reconnect");
                        sleep(ms(20)).await;
                    }
                    sleep(ms(300)).await;
                })
                .await;
                assert!(took < PROMPT, "{wake:?} {cut:?} {query}: {took:?}");
                let seen = protocols(port).await;
                assert!(seen.iter().all(|r| r == protocol), "{query}: {seen:?}");
                holder.stop().await.unwrap();
                waiter.stop().await.unwrap();
            }
        }
    }
}

/// Over RESP3, the server restarted empty while a waiter waits for a held key: the waiter
/// gets the key within one delay of the restart, its fence above the holder's, and the
/// holder's release says `NotHeld` (not a backend error) once reconnected. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_server_restart_under_a_waiter() {
    let Some(mut server) = server() else { return };
    let port = server.port();
    for wake in [Wake::Release, Wake::Fair, Wake::Poll] {
        let url = format!("{}?protocol=resp3", server.url());
        let holder = locker(&url, |config| wake.configure(config), waiting(DELAY)).await;
        let waiter = locker(&url, |config| wake.configure(config), waiting(DELAY)).await;
        let held = holder.acquire("r").await.unwrap();
        let first = held.fencing_token().unwrap();
        let waiting = tokio::spawn({
            let waiter = waiter.clone();
            async move { waiter.acquire("r").await }
        });
        if wake != Wake::Poll {
            wait_for_subscription(port, "3").await;
        }
        sleep(ms(300)).await;
        server.restart().unwrap();
        let restarted = Instant::now();
        let guard = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the waiter got the key")
            .unwrap()
            .unwrap();
        assert!(
            restarted.elapsed() < DELAY + ms(1_000),
            "{wake:?}: {:?}",
            restarted.elapsed()
        );
        assert!(guard.fencing_token().unwrap() > first, "{wake:?}: fences");
        let released = held.release().await;
        assert!(
            matches!(released, Err(LockError::NotHeld { .. })),
            "{wake:?}: {released:?}"
        );
        guard.release().await.unwrap();
        let seen = protocols(port).await;
        assert!(seen.iter().all(|r| r == "3"), "{wake:?}: {seen:?}");
        holder.stop().await.unwrap();
        waiter.stop().await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// The password refused over `HELLO 3`, then accepted again
// ---------------------------------------------------------------------------------------------

/// A server with an `admin` ACL user for the test's own commands and its admin connection.
fn server_with_admin() -> Option<(RedisServer, redis::Connection)> {
    let server = server()?;
    let set = server
        .command("ACL SETUSER admin on >admin-pw ~* &* +@all", PROBE)
        .unwrap();
    assert_eq!(set, "+OK");
    let admin = redis::Client::open(format!(
        "redis://admin:admin-pw@127.0.0.1:{}/",
        server.port()
    ))
    .unwrap()
    .get_connection_with_timeout(PROBE)
    .unwrap();
    Some((server, admin))
}

fn admin_do(admin: &mut redis::Connection, words: &[&str]) {
    let mut command = redis::cmd(words[0]);
    for word in &words[1..] {
        command.arg(*word);
    }
    let _: redis::Value = command.query(admin).unwrap();
}

fn connections_received(admin: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("stats").query(admin).unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("total_connections_received:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// How the server refuses the client for a moment.
#[derive(Clone, Copy, Debug)]
enum Refusal {
    /// The URL's ACL user's password is another for a moment (`HELLO 3 AUTH` → `WRONGPASS`).
    UserPasswordRotated,
    /// The URL's ACL user is switched off.
    UserOff,
    /// No password in the URL; the default user gets one for a moment (`HELLO 3` →
    /// `NOAUTH HELLO must be called with the client already authenticated…`).
    PasswordRequired,
    /// No password in the URL; the default user is switched off.
    DefaultUserOff,
}

impl Refusal {
    fn url(self, server: &RedisServer, admin: &mut redis::Connection) -> String {
        match self {
            Self::UserPasswordRotated | Self::UserOff => {
                admin_do(
                    admin,
                    &[
                        "ACL",
                        "SETUSER",
                        "app",
                        "on",
                        ">app-s3cr3t",
                        "~*",
                        "&*",
                        "+@all",
                    ],
                );
                format!("redis://app:app-s3cr3t@127.0.0.1:{}/", server.port())
            }
            Self::PasswordRequired | Self::DefaultUserOff => server.url(),
        }
    }

    fn refuse(self, admin: &mut redis::Connection) {
        match self {
            Self::UserPasswordRotated => {
                admin_do(
                    admin,
                    &["ACL", "SETUSER", "app", "resetpass", ">rotated-s3cr3t"],
                );
            }
            Self::UserOff => admin_do(admin, &["ACL", "SETUSER", "app", "off"]),
            Self::PasswordRequired => {
                admin_do(admin, &["CONFIG", "SET", "requirepass", "other-s3cr3t"]);
            }
            Self::DefaultUserOff => admin_do(admin, &["ACL", "SETUSER", "default", "off"]),
        }
    }

    fn accept(self, admin: &mut redis::Connection) {
        match self {
            Self::UserPasswordRotated => {
                admin_do(
                    admin,
                    &["ACL", "SETUSER", "app", "resetpass", ">app-s3cr3t"],
                );
            }
            Self::UserOff => admin_do(admin, &["ACL", "SETUSER", "app", "on"]),
            Self::PasswordRequired => admin_do(admin, &["CONFIG", "SET", "requirepass", ""]),
            Self::DefaultUserOff => admin_do(admin, &["ACL", "SETUSER", "default", "on"]),
        }
    }
}

/// A held guard (and, with `wake`, a waiter of another client); the server refuses the
/// password and every client connection is killed; 3 s of extends fail; the password is
/// accepted again: the guard extends within 5 s, the same client acquires, the waiter is woken
/// by the release within 300 ms once its subscriber is back. fred's reconnects stay a few per
/// second and no error carries the password.
async fn through_a_refusal(refusal: Refusal, query: &str, protocol: &str, wake: Wake) {
    let (server, mut admin) = server_with_admin().unwrap();
    let port = server.port();
    let url = format!("{}{query}", refusal.url(&server, &mut admin));
    let holder = locker(&url, |config| wake.configure(config), waiting(DELAY)).await;
    let waiter = locker(&url, |config| wake.configure(config), waiting(DELAY)).await;
    let label = format!("{refusal:?} {query} {wake:?}");
    let mut guard = holder.acquire("k").await.unwrap();
    let waiting = tokio::spawn({
        let waiter = waiter.clone();
        async move {
            let result = waiter.acquire("k").await;
            (Instant::now(), result)
        }
    });
    if wake != Wake::Poll {
        wait_for_subscription(port, protocol).await;
    }
    refusal.refuse(&mut admin);
    admin_do(
        &mut admin,
        &["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"],
    );
    admin_do(
        &mut admin,
        &["CLIENT", "KILL", "TYPE", "pubsub", "SKIPME", "yes"],
    );
    let before = connections_received(&mut admin);
    let mut errors = String::new();
    for _ in 0..6 {
        if let Err(error) = guard.extend(Duration::from_secs(30)).await {
            errors.push_str(&format!("{error} {error:?}\n"));
        }
        sleep(ms(500)).await;
    }
    let during = connections_received(&mut admin) - before;
    assert!(
        !errors.is_empty(),
        "{label}: the refusal was never met (a vacuous run)"
    );
    assert!(
        (1..=40).contains(&during),
        "{label}: {during} connections in 3 s of refusal"
    );
    refusal.accept(&mut admin);
    let accepted = Instant::now();
    let mut extended = false;
    while accepted.elapsed() < Duration::from_secs(5) {
        match guard.extend(Duration::from_secs(30)).await {
            Ok(()) => {
                extended = true;
                break;
            }
            Err(error) => errors.push_str(&format!("{error} {error:?}\n")),
        }
        sleep(ms(100)).await;
    }
    let head: String = errors.lines().take(6).collect::<Vec<_>>().join("\n");
    assert!(
        extended,
        "{label}: no extend within 5 s of the password accepted again:\n{head}"
    );
    let other = holder.try_acquire("other").await;
    assert!(matches!(other, Ok(Some(_))), "{label}: {other:?}");
    drop(other);
    if wake != Wake::Poll {
        // The subscriber is back over the same protocol; the waiter sleeps again.
        wait_for_subscription(port, protocol).await;
        sleep(ms(DELAY.as_millis() as u64 + 300)).await;
    }
    if wake == Wake::Fair {
        // A fair waiter whose attempt failed leaves the line (both protocols; seen here) and
        // joins it again at its next attempt, up to one delay later: wait for that.
        let started = Instant::now();
        loop {
            let members: u64 = redis::cmd("ZCARD")
                .arg("lock:{k}:queue")
                .query(&mut admin)
                .unwrap();
            if members == 1 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{label}: never back in line"
            );
            sleep(ms(20)).await;
        }
        sleep(ms(100)).await;
    }
    let released = Instant::now();
    guard.release().await.unwrap();
    let (acquired, result) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiter got the key")
        .unwrap();
    let woken = result.unwrap();
    if wake != Wake::Poll {
        let took = acquired - released;
        assert!(
            took < PROMPT,
            "{label}: the waiter took {took:?} after the release"
        );
    }
    woken.release().await.unwrap();
    assert!(
        !errors.contains(SECRET),
        "{label}: a password in an error: {errors}"
    );
    let seen: Vec<String> = client_list(port)
        .await
        .into_iter()
        .filter(|line| !line.contains(" user=admin "))
        .collect();
    assert!(
        !seen.is_empty()
            && seen
                .iter()
                .all(|line| line.ends_with(&format!("resp={protocol}"))),
        "{label}: {seen:?}"
    );
    holder.stop().await.unwrap();
    waiter.stop().await.unwrap();
}

/// Over RESP3, the ACL user's password rotated for 3 s (`HELLO 3 AUTH` answered `WRONGPASS`),
/// every connection killed, then restored: works again, the release waiter woken by push. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_user_password_rotated_then_restored_works_again() {
    if redis_or_skip("adv22a").is_none() {
        return;
    }
    through_a_refusal(
        Refusal::UserPasswordRotated,
        "?protocol=resp3",
        "3",
        Wake::Release,
    )
    .await;
}

/// Over RESP3, the ACL user switched off, then on: works again, the fair waiter woken by push.
/// Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_user_off_then_on_works_again() {
    if redis_or_skip("adv22a").is_none() {
        return;
    }
    through_a_refusal(Refusal::UserOff, "?protocol=resp3", "3", Wake::Fair).await;
}

/// Over RESP3, a password required of the default user for a moment (`HELLO 3` without AUTH
/// answered `NOAUTH HELLO must be called…`): works again, the release waiter woken. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_password_required_for_a_moment_works_again() {
    if redis_or_skip("adv22a").is_none() {
        return;
    }
    through_a_refusal(
        Refusal::PasswordRequired,
        "?protocol=resp3",
        "3",
        Wake::Release,
    )
    .await;
}

/// Over RESP3, the default user switched off for a moment: works again, the fair waiter
/// woken. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_default_user_off_for_a_moment_works_again() {
    if redis_or_skip("adv22a").is_none() {
        return;
    }
    through_a_refusal(Refusal::DefaultUserOff, "?protocol=resp3", "3", Wake::Fair).await;
}

/// The RESP2 control of the four above (fred's `AUTH` instead of `HELLO 3 AUTH`; the others
/// over RESP2 are in `attack_s21a.rs`). Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_resp2_password_rotated_works_again() {
    if redis_or_skip("adv22a").is_none() {
        return;
    }
    through_a_refusal(Refusal::UserPasswordRotated, "", "2", Wake::Fair).await;
}

// ---------------------------------------------------------------------------------------------
// Mutual exclusion and owner-only release over RESP3
// ---------------------------------------------------------------------------------------------

/// Four clients of their own over RESP3, ten acquisitions each of one key, with wake-ups
/// (then fair): no two hold intervals overlap, every fence is new and fences grow in the order
/// the holds began. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_mutual_exclusion_under_contention() {
    let Some(server) = server() else { return };
    let url = format!("{}?protocol=resp3", server.url());
    for wake in [Wake::Release, Wake::Fair] {
        let intervals = Arc::new(Intervals::default());
        let fences = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut workers = Vec::new();
        for _ in 0..4 {
            let client = locker(&url, |config| wake.configure(config), waiting(ms(200))).await;
            let (intervals, fences) = (intervals.clone(), fences.clone());
            workers.push(tokio::spawn(async move {
                for _ in 0..10 {
                    let guard = client.acquire("contended").await.unwrap();
                    let acquired = Instant::now();
                    let fence = guard.fencing_token().unwrap();
                    sleep(ms(5)).await;
                    let released = Instant::now();
                    guard.release().await.unwrap();
                    intervals.record(acquired, released);
                    fences.lock().unwrap().push((acquired, fence));
                }
                client.stop().await.unwrap();
            }));
        }
        for worker in workers {
            worker.await.unwrap();
        }
        assert_eq!(intervals.len(), 40, "{wake:?}");
        assert_eq!(intervals.overlaps(), 0, "{wake:?}: two holders at once");
        let mut fences = fences.lock().unwrap().clone();
        fences.sort();
        assert!(
            fences.windows(2).all(|pair| pair[0].1 < pair[1].1),
            "{wake:?}: fences out of order {fences:?}"
        );
    }
    let seen = protocols(server.port()).await;
    assert!(seen.iter().all(|r| r == "3"), "{seen:?}");
}

/// Over RESP3, a guard whose lease ran out and whose key another client took: its extend and
/// its release say `NotHeld` and leave the other's lock in place (a third client cannot take
/// it); the same for a purged-then-retaken semaphore permit and read lock. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_only_the_owner_releases() {
    let Some(server) = server() else { return };
    let url = format!("{}?protocol=resp3", server.url());
    let short = |url: &str| {
        let url = url.to_owned();
        async move {
            Locker::new(IncLock::connect(IncConfig::new(url)).await.unwrap())
                .with_options(
                    LockOptions::default()
                        .with_ttl(ms(300))
                        .with_retry(RetryPolicy::none()),
                )
                .unwrap()
        }
    };
    let (a, b, c) = (short(&url).await, short(&url).await, short(&url).await);
    for kind in [
        LeaseKind::Exclusive,
        LeaseKind::permit(1).unwrap(),
        LeaseKind::Write,
    ] {
        let key = format!("owned-{kind}");
        let mut stale = a.try_acquire_kind(&key, kind).await.unwrap().unwrap();
        sleep(ms(450)).await;
        let taken = b
            .try_acquire_kind(&key, kind)
            .await
            .unwrap()
            .expect("expired");
        let extended = stale.extend(ms(300)).await;
        assert!(
            matches!(extended, Err(LockError::NotHeld { .. })),
            "{kind}: {extended:?}"
        );
        let released = stale.release().await;
        assert!(
            matches!(released, Err(LockError::NotHeld { .. })),
            "{kind}: {released:?}"
        );
        assert!(
            c.try_acquire_kind(&key, kind).await.unwrap().is_none(),
            "{kind}: freed by a stranger"
        );
        taken.release().await.unwrap();
        assert!(
            c.try_acquire_kind(&key, kind).await.unwrap().is_some(),
            "{kind}: control"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A server that does not know HELLO (Redis before 6, or a proxy)
// ---------------------------------------------------------------------------------------------

/// A fake server on 127.0.0.1 that answers every command `-ERR unknown command 'HELLO'` (as
/// Redis 5 does to `HELLO 3`): `IncLock::connect` over RESP3 fails within a few seconds
/// (no hang), as a backend error without the password. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_against_a_server_without_hello_fails_promptly_without_the_password() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let fake = tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buffer = [0; 4096];
                while let Ok(read) = socket.read(&mut buffer).await {
                    if read == 0 {
                        return;
                    }
                    let reply = b"-ERR unknown command 'HELLO', with args beginning with: \r\n";
                    if socket.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let url = format!("redis://app:app-s3cr3t@127.0.0.1:{port}/?protocol=resp3");
    let started = Instant::now();
    let connected = tokio::time::timeout(
        Duration::from_secs(15),
        IncLock::connect(IncConfig::new(url)),
    )
    .await
    .expect("connect returns");
    let Err(error) = connected else {
        panic!("a server that refuses HELLO was taken");
    };
    let shown = format!("{error} {error:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(error, LockError::Backend { .. }), "{shown}");
    assert!(!shown.contains(SECRET), "{shown}");
    fake.abort();
}

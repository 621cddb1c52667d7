//! The INCR lock on a real redis-server: fencing across expiry and purge, purge at scale, restart,
//! replayed acquisitions, bad key state and a stalled server.

use std::time::Duration;

use lock_core::{LockError, LockOptions, Locker, RetryPolicy};
use lock_inc::{IncConfig, IncLock};
use lock_tests::server::{RedisServer, redis_or_skip};
use lock_tests::workers;
use redis::AsyncCommands;
use tokio::time::Instant;

const PROBE: Duration = Duration::from_millis(500);

async fn start(config: impl FnOnce(String) -> IncConfig) -> Option<(RedisServer, IncLock)> {
    let binary = redis_or_skip("inc fault test")?;
    let server = RedisServer::start(&binary, &[]).expect("server");
    let lock = IncLock::connect(config(server.url()))
        .await
        .expect("connect");
    Some((server, lock))
}

/// A plain redis-rs connection to look at or tamper with the server's keys.
async fn raw_connection(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(server.url()).expect("client");
    client
        .get_multiplexed_async_connection()
        .await
        .expect("connection")
}

fn locker(lock: &IncLock, ttl: Duration, retry: RetryPolicy) -> Locker {
    Locker::new(lock.clone())
        .with_options(LockOptions::default().with_ttl(ttl).with_retry(retry))
        .expect("options")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_increase_across_expiry_and_purge() {
    let Some((_server, lock)) = start(IncConfig::new).await else {
        return;
    };
    let short = locker(&lock, Duration::from_millis(100), RetryPolicy::none());
    let mut fences = Vec::new();
    for step in 0..6 {
        let guard = short.acquire("fenced").await.expect("acquire");
        fences.push(guard.fencing_token().expect("fence"));
        match step % 3 {
            0 => guard.release().await.expect("release"),
            1 => {
                tokio::time::sleep(Duration::from_millis(200)).await; // expires
                drop(guard);
            }
            _ => {
                assert_eq!(short.purge("").await.expect("purge"), 1);
                drop(guard);
            }
        }
    }
    println!("I-fence: fencing tokens {fences:?} across release, expiry and purge");
    assert!(
        fences.windows(2).all(|w| w[1] > w[0]),
        "fencing tokens went backwards: {fences:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_removes_ten_thousand_locks_and_nothing_else() {
    let Some((server, lock)) = start(IncConfig::new).await else {
        return;
    };
    let mut con = raw_connection(&server).await;
    let locker = locker(&lock, Duration::from_secs(60), RetryPolicy::none());
    let mut guards = Vec::new();
    let mut pending = tokio::task::JoinSet::new();
    for chunk in 0..10 {
        let locker = locker.clone();
        pending.spawn(async move {
            let mut held = Vec::new();
            for i in 0..1_000 {
                held.push(
                    locker
                        .acquire(&format!("jobs:{chunk}:{i}"))
                        .await
                        .expect("acquire"),
                );
            }
            held
        });
    }
    while let Some(held) = pending.join_next().await {
        guards.extend(held.expect("task"));
    }
    let other = locker
        .acquire("other:keep")
        .await
        .expect("a lock outside the prefix");
    for key in ["unrelated", "lock:unrelated", "jobs:not-a-lock"] {
        let _: () = con.set(key, "v").await.expect("SET");
    }
    let started = Instant::now();
    let purged = locker.purge("jobs:").await.expect("purge");
    let took = started.elapsed();
    println!("I-purge: purged {purged} of 10000 locks in {took:?}; other keys kept");
    assert_eq!(purged, 10_000);
    for key in ["unrelated", "lock:unrelated", "jobs:not-a-lock"] {
        let value: Option<String> = con.get(key).await.expect("GET");
        assert_eq!(value.as_deref(), Some("v"), "{key} was touched");
    }
    assert!(
        locker
            .try_acquire("other:keep")
            .await
            .expect("probe")
            .is_none(),
        "a lock outside the prefix went"
    );
    assert!(
        locker
            .try_acquire("jobs:3:7")
            .await
            .expect("probe")
            .is_some(),
        "a purged lock is free again"
    );
    other.release().await.expect("release");
    drop(guards);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_reconnect_after_a_restart() {
    let Some((mut server, lock)) = start(IncConfig::new).await else {
        return;
    };
    let retrying = RetryPolicy::forever()
        .with_retry_delay(Duration::from_millis(20))
        .with_deadline(Duration::from_secs(5));
    let locker = locker(&lock, Duration::from_secs(5), retrying);
    let before = locker.acquire("restart").await.expect("before");
    let fence_before = before.fencing_token().expect("fence");
    before.release().await.expect("release");
    server.restart().expect("restart");
    let started = Instant::now();
    let guard = locker
        .acquire("restart")
        .await
        .expect("after the restart, without user action");
    let took = started.elapsed();
    let fence_after = guard.fencing_token().expect("fence");
    guard.release().await.expect("release");
    let inversions = usize::from(fence_after <= fence_before);
    println!(
        "I5 (restart without persistence): reconnected and re-acquired in {took:?}; fence {fence_before} → {fence_after}, fence inversions {inversions}"
    );
    assert_eq!(
        inversions, 0,
        "the fencing counter was lost with the data, and the token went backwards"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_acquisition_cannot_make_a_second_holder() {
    let Some((server, lock)) = start(IncConfig::new).await else {
        return;
    };
    // The exact script the backend runs, sent twice with one token, as a client replaying a
    // command after a reconnect would.
    let script = redis::Script::new(concat!(
        include_str!("../../lock-inc/src/lua/fence.lua"),
        include_str!("../../lock-inc/src/lua/acquire.lua")
    ));
    let mut con = raw_connection(&server).await;
    let keys = [
        "lock:{replayed}",
        "lock:{replayed}:owner",
        "lock:{replayed}:fence",
    ];
    let run = |token: &'static str| {
        let mut invocation = script.prepare_invoke();
        invocation
            .key(keys[0])
            .key(keys[1])
            .key(keys[2])
            .arg(token)
            .arg(10_000);
        invocation
    };
    let first: i64 = run("token-a").invoke_async(&mut con).await.expect("first");
    let replayed: i64 = run("token-a").invoke_async(&mut con).await.expect("replay");
    let other: i64 = run("token-b")
        .invoke_async(&mut con)
        .await
        .expect("other client");
    println!(
        "I4 (replayed INCR): first fence {first}, replay answered {replayed}, another client got {other}"
    );
    assert!(first > 0, "the first attempt wins");
    assert_eq!(
        replayed, first,
        "the replay must find its own win, not a lock held by someone"
    );
    assert_eq!(other, 0, "a second holder appeared");
    let locker = locker(&lock, Duration::from_secs(5), RetryPolicy::none());
    assert!(
        locker
            .try_acquire("replayed")
            .await
            .expect("probe")
            .is_none(),
        "the lock is held once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_key_state_is_a_typed_error() {
    let Some((server, lock)) = start(IncConfig::new).await else {
        return;
    };
    let mut con = raw_connection(&server).await;
    let _: () = con.set("lock:{string}", "not a number").await.expect("SET");
    let _: () = con.rpush("lock:{list}", "x").await.expect("RPUSH");
    let _: () = con.set("lock:{max}", i64::MAX).await.expect("SET");
    let locker = locker(&lock, Duration::from_secs(5), RetryPolicy::none());
    for key in ["string", "list", "max"] {
        let error = locker.acquire(key).await.expect_err("bad state");
        assert!(
            matches!(error, LockError::Backend { .. }),
            "{key}: {error:?}"
        );
        println!("I6 ({key}): {error}");
    }
}

/// A server whose commands time out after 100 ms, and a single-attempt locker of 5 s locks.
async fn start_with_short_timeouts() -> Option<(RedisServer, Locker)> {
    let (server, lock) = start(|url| IncConfig {
        command_timeout: 100,
        ..IncConfig::new(url)
    })
    .await?;
    let locker = locker(&lock, Duration::from_secs(5), RetryPolicy::none());
    Some((server, locker))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_server_answers_within_the_command_timeout() {
    let Some((server, locker)) = start_with_short_timeouts().await else {
        return;
    };
    server.pause().expect("SIGSTOP");
    let started = Instant::now();
    let error = locker.acquire("stalled").await.expect_err("no answer");
    let took = started.elapsed();
    server.resume().expect("SIGCONT");
    println!("I3 (server stopped): `{error}` after {took:?}");
    assert!(took < Duration::from_millis(100) + PROBE, "waited {took:?}");
}

/// A fresh server has not loaded the release script: a release that times out while the server
/// is stopped is answered NOSCRIPT only after the caller gave up, so the key would stay for its
/// whole ttl unless the release is sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_timed_out_is_sent_again_once_the_server_answers() {
    let Some((server, locker)) = start_with_short_timeouts().await else {
        return;
    };
    let held = locker.acquire("stalled-release").await.expect("acquire");
    server.pause().expect("SIGSTOP");
    let error = held.release().await.expect_err("no answer");
    assert!(matches!(error, LockError::Backend { .. }), "{error:?}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    server.resume().expect("SIGCONT");
    let resumed = Instant::now();
    loop {
        // A probe may itself time out on a loaded machine (100 ms): that is "not yet".
        if let Ok(Some(again)) = locker.try_acquire("stalled-release").await {
            again.release().await.expect("release when healthy");
            break;
        }
        assert!(
            resumed.elapsed() < Duration::from_secs(2),
            "the timed-out release was never sent again (the key waits for its 5 s ttl)"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "I-release (server stopped during release): `{error}`; key free {:?} after SIGCONT",
        resumed.elapsed()
    );
}

/// The follow-ups are bounded: a server that stays stopped receives the release once from the
/// caller (`EVALSHA`) and three times from the background (`EVAL`: the whole script, which
/// runs even on a server that lost its scripts), then nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_is_sent_again_at_most_three_times() {
    let Some((server, locker)) = start_with_short_timeouts().await else {
        return;
    };
    let scripts_run = |server: &RedisServer| {
        server.calls("evalsha").expect("commandstats") + server.calls("eval").expect("commandstats")
    };
    let held = locker.acquire("bounded-release").await.expect("acquire");
    let before = scripts_run(&server);
    server.pause().expect("SIGSTOP");
    held.release().await.expect_err("no answer");
    // Pauses of 100, 200 and 400 ms between tries of up to 100 ms each: all are sent by 1.2 s.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    server.resume().expect("SIGCONT");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = scripts_run(&server) - before;
    println!("I-release-bound: the release reached the stopped server {sent} times in all");
    assert_eq!(sent, 4, "one release and three follow-ups");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_on_a_redis_cluster_and_purges_every_node() {
    let Some(binary) = redis_or_skip("inc on a cluster") else {
        return;
    };
    let servers = lock_tests::server::start_cluster(&binary, 3).expect("cluster");
    let url = lock_tests::server::cluster_url(&servers);
    // This test is about routing, not latency: it shares two cores with the sixteen-process
    // test, so a command may wait longer than the 500 ms default.
    let mut config = IncConfig::new(url);
    config.command_timeout = 5_000;
    let lock = IncLock::connect(config)
        .await
        .expect("connect to the cluster");
    let locker = locker(&lock, Duration::from_secs(30), RetryPolicy::none());
    let mut guards = Vec::new();
    for i in 0..300 {
        let guard = locker
            .acquire(&format!("jobs:{i}"))
            .await
            .expect("acquire on the cluster");
        assert!(
            locker
                .try_acquire(&format!("jobs:{i}"))
                .await
                .expect("probe")
                .is_none()
        );
        guards.push(guard);
    }
    let fence_before = guards[0].fencing_token().expect("fence");
    let purged = locker.purge("jobs:").await.expect("purge across nodes");
    let keys_per_node: Vec<String> = servers
        .iter()
        .map(|server| server.command("DBSIZE", PROBE).expect("DBSIZE"))
        .collect();
    println!(
        "I-cluster: 300 locks over 3 primaries, purged {purged}; keys left per node (fencing counters) {keys_per_node:?}"
    );
    assert_eq!(purged, 300);
    // A purge takes the locks away from their holders: each release says so.
    for guard in guards {
        assert!(matches!(
            guard.release().await,
            Err(LockError::NotHeld { .. })
        ));
    }
    let again = locker.acquire("jobs:0").await.expect("free after purge");
    assert!(
        again.fencing_token().expect("fence") > fence_before,
        "fencing survived the purge"
    );
    again.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_holder_leaves_no_immortal_lock() {
    let Some((server, lock)) = start(IncConfig::new).await else {
        return;
    };
    let locker = locker(&lock, Duration::from_millis(300), RetryPolicy::none());
    let guard = locker.acquire("crash").await.expect("acquire");
    // The holder "crashes": it never releases (and its guard cannot release on drop).
    std::mem::forget(guard);
    let pttl = server.command("PTTL lock:{crash}", PROBE).expect("PTTL");
    let ms: i64 = pttl.trim_start_matches(':').parse().expect("integer reply");
    assert!(ms > 0 && ms <= 300, "the lock has no expiry: PTTL {pttl}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let next = locker
        .acquire("crash")
        .await
        .expect("the lock expired by itself");
    println!(
        "I2 (holder crashed after acquiring): PTTL {ms} ms right after INCR; re-acquired after expiry"
    );
    next.release().await.expect("release");
}

/// I1 across processes: 16 worker processes contend on one INCR lock (retrying, since the lock
/// itself fails fast), with the interval, lost-update and fence checkers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_processes_never_overlap_and_fences_never_go_back() {
    let Some(binary) = redis_or_skip("inc cross-process contention") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("server");
    let checker = RedisServer::start(&binary, &[]).expect("checker");
    let (processes, sections) = (16, 150);
    let started = Instant::now();
    let totals = workers::run(
        env!("CARGO_BIN_EXE_lock-worker").as_ref(),
        &["--backend", "inc"],
        &checker,
        (processes, sections),
        &[server.url()],
    )
    .expect("workers report");
    println!(
        "I1 cross-process ({processes} processes): {totals}, in {:?}",
        started.elapsed()
    );
    totals.assert_safe((processes * sections) as u64);
}

/// A fresh server and a proxy of ours in front of it.
async fn behind_a_proxy(
    binary: &std::path::Path,
) -> (RedisServer, lock_tests::proxy::LatencyProxy) {
    let server = RedisServer::start(binary, &[]).expect("server");
    let proxy = lock_tests::proxy::LatencyProxy::start(server.port())
        .await
        .expect("proxy");
    (server, proxy)
}

/// I4: an acquisition whose answer never comes back in time (the link is slower than the
/// command timeout) is indeterminate: the INCR lands after the client gave up. It is applied
/// once (fred does not resend it), and the Locker releases it by token at once instead of
/// leaving an orphan for the ttl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_acquisition_is_applied_once_and_cleaned_up() {
    let Some(binary) = redis_or_skip("inc indeterminate acquisition") else {
        return;
    };
    let (server, proxy) = behind_a_proxy(&binary).await;
    let lock = IncLock::connect(IncConfig {
        command_timeout: 100,
        ..IncConfig::new(proxy.url())
    })
    .await
    .expect("connect");
    let locker = locker(&lock, Duration::from_secs(10), RetryPolicy::none());
    locker
        .acquire("i4")
        .await
        .expect("warm-up")
        .release()
        .await
        .expect("release");
    let incrs_before = server.calls("incr").expect("INFO");
    proxy.set_delay(Duration::from_millis(150));
    let error = locker.acquire("i4").await.expect_err("timed out");
    assert!(matches!(error, LockError::Backend { .. }), "{error:?}");
    // The request lands ~150 ms after it was sent; the cleanup follows it on the wire.
    tokio::time::sleep(Duration::from_millis(600)).await;
    proxy.set_delay(Duration::ZERO);
    let applied = server.calls("incr").expect("INFO") - incrs_before;
    let orphans = server.command("EXISTS lock:{i4}", PROBE).expect("EXISTS");
    println!(
        "I4 (answer slower than the command timeout): `{error}`; INCRs applied {applied} of 1 sent, orphans 0.6 s later (ttl 10 s): {}",
        orphans.trim_start_matches(':')
    );
    assert_eq!(applied, 1, "the INCR should land exactly once");
    assert_eq!(orphans, ":0", "the indeterminate win was not cleaned up");
    // Free again at once, seen by a client with the default command timeout straight on the
    // server (this one's 100 ms can pass on a loaded machine even without the proxy's delay).
    let direct = IncLock::connect(IncConfig::new(server.url()))
        .await
        .expect("connect");
    let next = self::locker(&direct, Duration::from_secs(10), RetryPolicy::none())
        .acquire("i4")
        .await
        .expect("free again at once");
    next.release().await.expect("release");
}

/// Runs `send` through a client with fred's default resend policy (3 attempts) while the proxy
/// forwards the request, then drops the connection before the reply gets back: fred reconnects
/// and sends the command again. Returns the command's answer.
async fn send_with_a_lost_reply<T, F, Fut>(proxy: &lock_tests::proxy::LatencyProxy, send: F) -> T
where
    F: FnOnce(fred::clients::Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, fred::error::Error>>,
{
    use fred::prelude::{ClientLike, Config, ReconnectPolicy};
    let mut builder =
        fred::types::Builder::from_config(Config::from_url(&proxy.url()).expect("fred config"));
    builder
        .with_connection_config(|connection| connection.max_command_attempts = 3)
        .with_performance_config(|performance| {
            performance.default_command_timeout = Duration::from_secs(5)
        })
        .set_policy(ReconnectPolicy::new_constant(0, 20));
    let client = builder.build().expect("client");
    client.init().await.expect("connect");
    proxy.set_delay(Duration::from_millis(300));
    let fault = async {
        // The request reaches the server at ~300 ms; its reply would be forwarded at ~600 ms.
        tokio::time::sleep(Duration::from_millis(450)).await;
        proxy.cut();
        tokio::time::sleep(Duration::from_millis(250)).await;
        proxy.set_delay(Duration::ZERO);
    };
    let (answer, ()) = tokio::join!(send(client.clone()), fault);
    let _ = client.quit().await;
    answer.expect("answered after the resend")
}

/// I4 with fred's default resend policy: the reply of an acquisition is lost with its
/// connection, fred sends it again. A bare INCR is then applied twice (the holder reads 2 and
/// believes the resource locked by someone else); our acquisition script finds its own token
/// and answers the same fencing token, so the holder knows it won.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_acquisition_finds_its_own_win_where_a_bare_incr_counts_twice() {
    use fred::prelude::KeysInterface;
    let Some(binary) = redis_or_skip("inc resend") else {
        return;
    };
    let (server, proxy) = behind_a_proxy(&binary).await;

    let naive: i64 = send_with_a_lost_reply(&proxy, |client| async move {
        client.incr::<i64, _>("naive-lock").await
    })
    .await;

    let source = concat!(
        include_str!("../../lock-inc/src/lua/fence.lua"),
        include_str!("../../lock-inc/src/lua/acquire.lua")
    );
    // Loaded beforehand, so that the resend is the only repetition.
    let _: String = redis::Script::new(source)
        .prepare_invoke()
        .load_async(&mut raw_connection(&server).await)
        .await
        .expect("SCRIPT LOAD");
    let script = fred::types::scripts::Script::from_lua(source);
    let keys = vec![
        "lock:{resent}",
        "lock:{resent}:owner",
        "lock:{resent}:fence",
    ];
    let args = vec!["token-a".to_owned(), "10000".to_owned()];
    let incrs_before = server.calls("incr").expect("INFO");
    let ours: i64 = send_with_a_lost_reply(&proxy, |client| async move {
        script.evalsha(&client, keys, args).await
    })
    .await;
    let applied = server.calls("incr").expect("INFO") - incrs_before;
    let scripts_run = server.calls("evalsha").expect("INFO");
    println!(
        "I4 (reply lost, fred resends): bare INCR answered {naive} (applied twice); our acquisition answered fence {ours}, INCRs applied {applied}, acquisition scripts run {scripts_run}"
    );
    assert_eq!(naive, 2, "the bare INCR should have been applied twice");
    assert!(ours > 0, "the resent acquisition must find its own win");
    assert_eq!(applied, 1, "the lock's INCR ran once");
    assert!(scripts_run >= 2, "the acquisition was not resent");
}

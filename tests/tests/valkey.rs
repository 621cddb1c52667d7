//! Every backend against Valkey (`valkey-server`, installed by `cargo xtask it` from Debian's
//! bookworm-backports): the conformance suite, and a fault subset (a node killed, paused,
//! restarted). The nodes are named by `valkey://` URLs; `inspect` names the server and version.

use std::path::PathBuf;
use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_inc::{IncConfig, IncLock};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::backed::ServerBacked;
use lock_tests::server::{RedisServer, valkey_or_skip, valkey_server_binary};

/// `count` fresh Valkey servers (the test is skipped, or fails under `cargo xtask it`, without
/// the binary).
fn valkeys(count: usize) -> Vec<RedisServer> {
    let binary: PathBuf = valkey_server_binary().expect(
        "valkey-server not found: run `cargo xtask it`, which installs it, or set VALKEY_SERVER",
    );
    (0..count)
        .map(|_| RedisServer::start(&binary, &[]).expect("valkey-server starts"))
        .collect()
}

fn valkey_url(server: &RedisServer) -> String {
    format!("valkey://127.0.0.1:{}/", server.port())
}

fn redlock_on_valkey(nodes: usize, fencing: bool) -> ServerBacked<Redlock> {
    let servers = valkeys(nodes);
    let lock = Redlock::new(
        RedlockConfig::new(servers.iter().map(valkey_url))
            .with_node_timeout(Duration::from_millis(250))
            .with_fencing(fencing),
    )
    .expect("redlock on valkey");
    ServerBacked::new(lock, servers)
}

async fn inc_on_valkey() -> ServerBacked<IncLock> {
    let servers = valkeys(1);
    let lock = IncLock::connect(IncConfig {
        command_timeout: 2_000,
        ..IncConfig::new(valkey_url(&servers[0]))
    })
    .await
    .expect("inc on valkey");
    ServerBacked::new(lock, servers)
}

mod redlock_one_node {
    lock_core::conformance_tests!(
        async { crate::redlock_on_valkey(1, false) },
        capabilities: [extend, distributed, multi_key, semaphore, read_write, fair]
    );
}

mod redlock_three_nodes_fenced {
    lock_core::conformance_tests!(
        async { crate::redlock_on_valkey(3, true) },
        capabilities: [extend, distributed, multi_key, semaphore, read_write, wake_on_release, fencing, fair]
    );
}

mod inc {
    lock_core::conformance_tests!(
        crate::inc_on_valkey(),
        capabilities: [extend, fail_fast, purge, distributed, fencing, semaphore, read_write]
    );
}

fn locker(lock: impl lock_core::raw::Lock, single: bool) -> Locker {
    let retry = if single {
        RetryPolicy::none()
    } else {
        RetryPolicy::forever()
            .with_retry_delay(Duration::from_millis(10))
            .with_deadline(Duration::from_secs(5))
    };
    Locker::new(lock)
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(2))
                .with_retry(retry),
        )
        .expect("options")
}

/// Redlock over three Valkey nodes keeps granting with one node killed, one paused, or one
/// restarted empty (after the ttl, as the specification asks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_on_valkey_survives_a_minority_killed_paused_restarted() {
    if valkey_or_skip("valkey faults").is_none() {
        return;
    }
    let mut backed = redlock_on_valkey(3, true);
    let locker = locker(backed.lock().clone(), false);
    let mut fences = Vec::new();
    let take = |what: &'static str| {
        let locker = locker.clone();
        async move {
            let guard = locker
                .acquire("valkey-faults")
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let fence = guard.fencing_token().expect("fenced");
            guard
                .release()
                .await
                .unwrap_or_else(|e| panic!("{what}: release: {e}"));
            fence
        }
    };
    fences.push(take("healthy").await);
    backed.servers()[0].kill();
    fences.push(take("one node killed").await);
    backed.servers()[0].restart().expect("restart");
    backed.servers()[1].pause().expect("pause");
    fences.push(take("one node paused").await);
    backed.servers()[1].resume().expect("resume");
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    backed.servers()[2].restart().expect("restart");
    fences.push(take("one node restarted empty after the ttl").await);
    let states = locker.inspect("valkey-faults").await.expect("inspect");
    println!("valkey faults (Redlock, 3 nodes): fences {fences:?}; inspect {states:?}");
    assert!(
        fences.windows(2).all(|pair| pair[0] < pair[1]),
        "{fences:?}"
    );
    for state in &states {
        let server = state.server.as_deref().unwrap_or_default();
        assert!(server.starts_with("valkey 8."), "inspect names {server:?}");
    }
}

/// inc on one Valkey server: a paused server is a typed error within the command timeout, and
/// the client reconnects after a restart; inspect names the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_on_valkey_recovers_from_a_pause_and_a_restart() {
    if valkey_or_skip("valkey faults").is_none() {
        return;
    }
    let mut backed = inc_on_valkey().await;
    let locker = locker(backed.lock().clone(), true);
    locker
        .acquire("job")
        .await
        .expect("healthy")
        .release()
        .await
        .expect("release");
    backed.servers()[0].pause().expect("pause");
    let started = tokio::time::Instant::now();
    let paused = locker.acquire("job").await;
    let waited = started.elapsed();
    backed.servers()[0].resume().expect("resume");
    assert!(
        paused.is_err() && waited < Duration::from_secs(4),
        "{paused:?} after {waited:?}"
    );
    backed.servers()[0].restart().expect("restart");
    let mut again = None;
    for _ in 0..50 {
        if let Ok(guard) = locker.acquire("job").await {
            again = Some(guard);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let guard = again.expect("inc reconnected to the restarted valkey-server");
    let states = locker.inspect("job").await.expect("inspect");
    println!("valkey faults (inc): paused -> error after {waited:?}; inspect {states:?}");
    assert!(
        states[0]
            .server
            .as_deref()
            .is_some_and(|s| s.starts_with("valkey 8.")),
        "{states:?}"
    );
    guard.release().await.expect("release");
}

//! `lockrun` end to end, as separate processes against real redis-servers.
#![cfg(all(feature = "redlock", feature = "inc", feature = "cli"))]

use std::time::{Duration, Instant};

use lock_tests::server::{RedisServer, redis_or_skip};

mod support;
use support::{code, lockrun_with, redlock_config, urls};

#[test]
fn two_lockruns_on_one_key_run_one_after_the_other() {
    let Some(binary) = redis_or_skip("lockrun") else {
        return;
    };
    let servers: Vec<RedisServer> = (0..3)
        .map(|_| RedisServer::start(&binary, &[]).expect("server"))
        .collect();
    let config = redlock_config(&urls(&servers));
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("log");
    let script = format!(
        "echo start $$ >> {0}; sleep 0.3; echo end $$ >> {0}",
        log.display()
    );
    let children: Vec<_> = (0..3)
        .map(|_| {
            lockrun_with(&config, &["job", "--", "sh", "-c", &script])
                .spawn()
                .expect("lockrun")
        })
        .collect();
    for child in children {
        let output = child.wait_with_output().expect("lockrun ends");
        assert_eq!(code(&output), 0, "{output:?}");
    }
    let lines: Vec<String> = std::fs::read_to_string(&log)
        .expect("log")
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len(), 6, "{lines:?}");
    for pair in lines.chunks(2) {
        let pid = pair[0].strip_prefix("start ").expect("start line");
        assert_eq!(
            pair[1],
            format!("end {pid}"),
            "sections interleaved: {lines:?}"
        );
    }
}

#[test]
fn exit_codes_say_what_happened() {
    let Some(binary) = redis_or_skip("lockrun") else {
        return;
    };
    let servers = vec![RedisServer::start(&binary, &[]).expect("server")];
    let config = redlock_config(&urls(&servers));

    let own = lockrun_with(&config, &["k", "--", "sh", "-c", "exit 7"])
        .output()
        .expect("run");
    assert_eq!(code(&own), 7, "the command's own code");

    let mut holder = lockrun_with(&config, &["k", "--", "sleep", "2"])
        .spawn()
        .expect("holder");
    std::thread::sleep(Duration::from_millis(500));
    let busy = lockrun_with(&config, &["--no-wait", "k", "--", "true"])
        .output()
        .expect("run");
    assert_eq!(code(&busy), 75, "{busy:?}");
    let waited = lockrun_with(&config, &["--timeout", "300", "k", "--", "true"])
        .output()
        .expect("run");
    assert_eq!(code(&waited), 76, "{waited:?}");
    let status = lockrun_with(&config, &["status", "k"])
        .output()
        .expect("status");
    let shown = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(shown.contains("held"), "{shown}");
    holder.wait().expect("holder ends");

    let bad = lockrun_with(r#"{"type": "zookeeper"}"#, &["k", "--", "true"])
        .output()
        .expect("run");
    assert_eq!(code(&bad), 78, "{bad:?}");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("known backends"),
        "{bad:?}"
    );
    let missing = lockrun_with(&config, &["k", "--", "/nonexistent/command"])
        .output()
        .expect("run");
    assert_eq!(code(&missing), 127, "{missing:?}");
}

#[test]
fn a_lost_lock_kills_the_command() {
    let Some(binary) = redis_or_skip("lockrun") else {
        return;
    };
    let servers = vec![RedisServer::start(&binary, &[]).expect("server")];
    let config = redlock_config(&urls(&servers));
    let started = Instant::now();
    let child = lockrun_with(&config, &["--ttl", "600", "doomed", "--", "sleep", "30"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("lockrun");
    std::thread::sleep(Duration::from_millis(400));
    // Someone deletes the lock behind the holder's back.
    assert_eq!(
        servers[0]
            .command("DEL doomed", Duration::from_millis(500))
            .expect("DEL"),
        ":1"
    );
    let output = child.wait_with_output().expect("lockrun ends");
    assert_eq!(code(&output), 77, "{output:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the command was not killed promptly"
    );
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("lost"),
        "{output:?}"
    );
}

#[test]
fn purge_and_status_on_the_inc_backend() {
    let Some(binary) = redis_or_skip("lockrun") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("server");
    let config = serde_json::json!({"type": "inc", "urls": [server.url()]}).to_string();
    let mut holder = lockrun_with(&config, &["--ttl", "60000", "jobs:1", "--", "sleep", "1"])
        .spawn()
        .expect("holder");
    std::thread::sleep(Duration::from_millis(400));
    let status = lockrun_with(&config, &["status", "jobs:1"])
        .output()
        .expect("status");
    let shown = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(
        shown.contains("jobs:1 on ") && shown.contains("held"),
        "{shown}"
    );
    let purge = lockrun_with(&config, &["purge", "jobs:"])
        .output()
        .expect("purge");
    assert!(
        String::from_utf8_lossy(&purge.stdout).contains("purged 1"),
        "{purge:?}"
    );
    let _ = holder.wait();
}

#[test]
fn the_command_sees_the_key_and_an_increasing_fencing_token() {
    if redis_or_skip("lockrun").is_none() {
        return;
    }
    let servers = lock_tests::backed::start_servers(3);
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let configs = [
        serde_json::json!({"type": "inc", "urls": [urls[0]], "namespace": "jobs"}).to_string(),
        serde_json::json!({"type": "redlock", "urls": urls, "fencing": true, "namespace": "jobs"})
            .to_string(),
    ];
    for config in configs {
        let mut fences = Vec::new();
        for _ in 0..3 {
            let output = lockrun_with(
                &config,
                &[
                    "report",
                    "--",
                    "sh",
                    "-c",
                    "echo \"$LOCK_KEY $LOCK_FENCING_TOKEN\"",
                ],
            )
            .output()
            .expect("lockrun");
            assert_eq!(code(&output), 0, "{output:?}");
            let stdout = String::from_utf8_lossy(&output.stdout).to_string();
            let mut words = stdout.split_whitespace();
            assert_eq!(words.next(), Some("jobs:report"), "{stdout}");
            let fence: u64 = words
                .next()
                .and_then(|fence| fence.parse().ok())
                .unwrap_or_else(|| panic!("no fencing token in `{stdout}`"));
            fences.push(fence);
        }
        println!("lockrun: LOCK_FENCING_TOKEN over three runs {fences:?}");
        assert!(
            fences.windows(2).all(|pair| pair[1] > pair[0]),
            "{fences:?}"
        );
    }
}

/// Every backend option reaches the backend from `LOCK_CONFIG` (before, `connection`,
/// `pool_size`, `connect_timeout` and `tls_ca_file` were unknown fields of the facade: exit 78),
/// and an option the backend does not have is refused, naming those it has.
#[test]
fn backend_options_reach_the_backend_from_lock_config() {
    let Some(binary) = redis_or_skip("lockrun") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("server");
    let configs = [
        serde_json::json!({"type": "redis", "urls": [server.url()], "connection": "pool",
            "pool_size": 2, "connectTimeout": 300, "nodeTimeout": 200, "fencing": true}),
        serde_json::json!({"type": "inc", "url": server.url(), "connect_timeout": 300,
            "commandTimeout": 300, "prefix": "jobs:"}),
    ];
    for config in configs {
        let output = lockrun_with(&config.to_string(), &["--no-wait", "job", "--", "true"])
            .output()
            .expect("lockrun");
        assert_eq!(code(&output), 0, "{config}: {output:?}");
    }
    // A pool cannot use a custom CA: the option got there, and was checked.
    let config = serde_json::json!({"type": "redis", "urls": [server.url()],
        "connection": "pool", "tls_ca_file": "/nonexistent/ca.pem"});
    let output = lockrun_with(&config.to_string(), &["--no-wait", "job", "--", "true"])
        .output()
        .expect("lockrun");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(code(&output), 78, "{output:?}");
    assert!(stderr.contains("tls_ca_file"), "{stderr}");
    let config = serde_json::json!({"type": "redis", "urls": [server.url()], "prefix": "jobs:"});
    let output = lockrun_with(&config.to_string(), &["--no-wait", "job", "--", "true"])
        .output()
        .expect("lockrun");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(code(&output), 78, "{output:?}");
    assert!(
        stderr.contains("unknown field `prefix`") && stderr.contains("`pool_size`"),
        "{stderr}"
    );
}

/// `--wait` waits until the lock is free whatever the retry count: inc's default policy is a
/// single attempt and a configured count of 0 or 1 would end the wait while the lock is held.
#[test]
fn wait_waits_until_the_lock_is_free_on_every_backend() {
    let Some(binary) = redis_or_skip("lockrun") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("server");
    let configs = [
        serde_json::json!({"type": "inc", "urls": [server.url()]}),
        serde_json::json!({"type": "inc", "urls": [server.url()], "retryCount": 0}),
        serde_json::json!({"type": "redis", "url": server.url(), "retryCount": 1, "retryDelay": 10}),
    ];
    for (number, config) in configs.iter().enumerate() {
        let config = config.to_string();
        let key = format!("wait-{number}");
        let mut holder = lockrun_with(&config, &[&key, "--", "sleep", "1.5"])
            .spawn()
            .expect("holder");
        std::thread::sleep(Duration::from_millis(500));
        let started = Instant::now();
        let waited = lockrun_with(&config, &["--wait", &key, "--", "true"])
            .output()
            .expect("run");
        let took = started.elapsed();
        assert_eq!(code(&waited), 0, "{config}: {waited:?}");
        assert!(
            took >= Duration::from_millis(700),
            "{config}: ran after {took:?}, while the holder still held the lock"
        );
        holder.wait().expect("holder ends");
        // --timeout still bounds it.
        let mut holder_again = lockrun_with(&config, &[&key, "--", "sleep", "1.5"])
            .spawn()
            .expect("holder");
        std::thread::sleep(Duration::from_millis(500));
        let bounded = lockrun_with(&config, &["--wait", "--timeout", "200", &key, "--", "true"])
            .output()
            .expect("run");
        assert_eq!(code(&bounded), 76, "{config}: {bounded:?}");
        holder_again.wait().expect("holder ends");
    }
}

/// `--wait` refuses (69) a backend that no majority of nodes answers when it starts, and waits
/// as usual when a minority is down (a quorum can still be won).
#[test]
fn wait_with_a_minority_of_nodes_down_still_runs() {
    let Some(binary) = redis_or_skip("lockrun") else {
        return;
    };
    let servers: Vec<RedisServer> = (0..2)
        .map(|_| RedisServer::start(&binary, &[]).expect("server"))
        .collect();
    let down = lock_tests::server::free_port().expect("port");
    let mut urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    urls.push(format!("redis://127.0.0.1:{down}/"));
    let config = serde_json::json!({"type": "redlock", "urls": urls}).to_string();
    let ran = lockrun_with(&config, &["--wait", "minority", "--", "true"])
        .output()
        .expect("run");
    assert_eq!(code(&ran), 0, "{ran:?}");
    let two_down = serde_json::json!({"type": "redlock", "urls": [
        urls[0].clone(), format!("redis://127.0.0.1:{down}/"), format!("redis://127.0.0.1:{down}/1")
    ]})
    .to_string();
    let refused = lockrun_with(&two_down, &["--wait", "majority", "--", "true"])
        .output()
        .expect("run");
    assert_eq!(code(&refused), 69, "{refused:?}");
}

//! Attacks on `lockrun` against real redis-servers: a nested `lockConfig`, a signal while an
//! acquisition is in flight, and SIGTSTP (Ctrl-Z, `kill -TSTP`) to lockrun.
#![cfg(all(feature = "redlock", feature = "inc", feature = "cli"))]
#![allow(clippy::unwrap_used)]

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use lock_tests::server::{RedisServer, redis_or_skip};

mod support;
use support::{lockrun, lockrun_with, redlock_config, send};

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The README: "`lockConfig` (an object, a JSON/TOML string or a file) merged under the
/// explicit fields". lockrun merges its flags over the configuration with
/// `LockConfig::merged_over`, which drops the lower side's `lock_config`: a Redlock
/// configuration given through `lockConfig` is silently ignored, lockrun falls back to the
/// in-process memory backend and runs the command although the key is held in Redis.
#[test]
fn a_nested_lock_config_is_not_dropped() {
    let Some(binary) = redis_or_skip("attack_lockrun") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let inner = serde_json::json!({"type": "redlock", "urls": [server.url()]});
    let file = dir.path().join("inner.json");
    std::fs::write(&file, inner.to_string()).unwrap();
    assert_eq!(
        server
            .command("SET held someone-else PX 30000", Duration::from_millis(500))
            .unwrap(),
        "+OK"
    );
    for outer in [
        serde_json::json!({ "lockConfig": inner }),
        serde_json::json!({ "lockConfig": file.display().to_string() }),
    ] {
        let output = lockrun()
            .args(["--config", &outer.to_string(), "--no-wait", "held", "--"])
            .arg("true")
            .output()
            .unwrap();
        assert_eq!(
            output.status.code(),
            Some(75),
            "`held` is held in Redis, config {outer}: {output:?}"
        );
    }
}

/// The core promises that a dropped `acquire` leaves no lock behind: the attempt in flight is
/// undone by a cleanup task in the background. lockrun drops the acquisition on SIGTERM and
/// exits at once, so the runtime (and the cleanup) dies with it: a SET that was in flight
/// lands later and the key stays held by a token nobody has, for the whole ttl.
#[test]
fn a_signal_during_acquisition_leaves_no_lock_behind() {
    let Some(binary) = redis_or_skip("attack_lockrun") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let config = redlock_config(&[server.url()]);
    // Someone holds the key for a second: lockrun keeps retrying.
    let held_at = Instant::now();
    server
        .command("SET acq someone-else PX 1000", Duration::from_millis(500))
        .unwrap();
    let mut waiting = lockrun_with(&config, &["--ttl", "30000", "acq", "--", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // A stalled server: lockrun's next SET NX stays in flight.
    server.pause().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    send(waiting.id(), "TERM");
    let status = waiting.wait().unwrap();
    std::thread::sleep(Duration::from_millis(1200).saturating_sub(held_at.elapsed()));
    server.resume().unwrap();
    assert_eq!(status.code(), Some(143), "{status:?}");
    std::thread::sleep(Duration::from_millis(200));
    let after = lockrun_with(&config, &["--no-wait", "acq", "--", "true"])
        .output()
        .unwrap();
    let pttl = server
        .command("PTTL acq", Duration::from_millis(500))
        .unwrap();
    assert_eq!(
        after.status.code(),
        Some(0),
        "the interrupted lockrun left `acq` locked (PTTL {pttl}): {after:?}"
    );
}

/// SIGTSTP (Ctrl-Z, or `kill -TSTP`) is not handled: it stops lockrun, and only lockrun — the
/// command, in its own process group, runs on while nobody renews the lock. The lock expires, a
/// second holder gets in, and the first command's workers keep writing. After SIGCONT lockrun
/// even claims that the group "was stopped before the lock's validity ended".
#[test]
fn sigtstp_to_lockrun_stops_the_command_and_keeps_the_lock() {
    let Some(binary) = redis_or_skip("attack_lockrun") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let config = redlock_config(&[server.url()]);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let worker = format!(
        "while test -d '{dir}'; do echo worker >> '{log}'; sleep 0.01; done",
        dir = dir.path().display(),
        log = log.display()
    );
    let stderr = dir.path().join("stderr");
    // As a shell job: a process group of its own, whose parent is in another group of the
    // session, so that SIGTSTP is not discarded as for an orphaned group.
    let mut first = lockrun_with(
        &config,
        &["--ttl", "1500", "tstp", "--", "sh", "-c", &worker],
    )
    .process_group(0)
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&stderr).unwrap())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while lines(&log).len() < 10 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    send(first.id(), "TSTP");
    let enter = format!("echo ENTERED >> '{0}'", log.display());
    // lockrun stays up on SIGTSTP and stops the command's group instead, renewing the lock:
    // nobody else gets in while the command is stopped.
    std::thread::sleep(Duration::from_millis(2_500));
    let second = lockrun_with(&config, &["--no-wait", "tstp", "--", "sh", "-c", &enter])
        .output()
        .unwrap();
    let while_stopped = lines(&log).len();
    std::thread::sleep(Duration::from_millis(200));
    let still_stopped = lines(&log).len() == while_stopped;
    send(first.id(), "CONT");
    std::thread::sleep(Duration::from_millis(200));
    let all = lines(&log);
    let resumed = all.len() > while_stopped;
    std::fs::remove_dir_all(dir.path()).unwrap();
    let first_status = first.wait().unwrap();
    let stderr_text = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert_eq!(second.status.code(), Some(75), "{second:?}");
    assert!(
        !all.contains(&"ENTERED".to_owned()),
        "a second holder entered"
    );
    assert!(
        still_stopped,
        "the command ran on while lockrun was suspended"
    );
    assert!(resumed, "SIGCONT to lockrun did not continue the command");
    assert_eq!(
        first_status.code(),
        Some(0),
        "{first_status:?} {stderr_text}"
    );
}

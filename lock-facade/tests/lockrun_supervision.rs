//! `lockrun` as a supervisor, end to end against real redis-servers: the command's whole
//! process tree is dead before anyone else can hold the lock — when the lock is lost, when
//! its renewal fails, when lockrun is signalled or SIGKILLed, when the command leaves
//! processes behind — and the exit codes say what happened.
//!
//! The commands are shell trees: two background workers append `worker-A` / `worker-B` lines
//! to a log every 10 ms; a second holder appends `ENTERED` when it gets in. The check is on
//! the order of the lines in that append-only log: no worker line after `ENTERED`.
#![cfg(all(feature = "redlock", feature = "inc", feature = "cli"))]
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lock_tests::proxy::LatencyProxy;
use lock_tests::server::{RedisServer, get_bulk, redis_or_skip};

mod support;
use support::{LOCKRUN, code, redlock_config, send, urls};

/// lockrun started with SIGHUP, SIGINT and SIGQUIT at their default disposition, as from an
/// interactive shell, whatever this test process inherited: a test run as a background job of a
/// non-interactive shell (a CI script's `… &`) ignores SIGINT and SIGQUIT, and lockrun leaves a
/// signal ignored at its start ignored (`attack_s32a.rs::a_signal_ignored_when_lockrun_starts_stays_ignored`),
/// which would keep the signals these tests send from being forwarded. `env` (GNU coreutils)
/// execs lockrun: the child's id is lockrun's.
fn lockrun(config: &str, args: &[&str]) -> Command {
    let mut command = Command::new("env");
    command
        .arg("--default-signal=HUP,INT,QUIT")
        .arg(LOCKRUN)
        .env("LOCK_CONFIG", config)
        .args(args);
    command
}

fn inc_config(server: &RedisServer) -> String {
    serde_json::json!({"type": "inc", "urls": [server.url()], "retryCount": -1, "retryDelay": 5, "retryJitter": 5}).to_string()
}

/// A log in a temporary folder; the workers stop by themselves once the folder is gone, so
/// that a failing run leaves no process behind.
struct Log {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl Log {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "").unwrap();
        Self { dir, path }
    }

    /// A worker loop, as shell: appends `worker-NAME` every 10 ms while the folder exists.
    fn worker(&self, name: &str) -> String {
        format!(
            "while test -d '{dir}'; do echo worker-{name} >> '{log}'; sleep 0.01; done",
            dir = self.dir.path().display(),
            log = self.path.display()
        )
    }

    /// `sh -c 'worker & worker & wait'`, after `prelude` (a trap, say).
    fn tree(&self, prelude: &str) -> String {
        format!(
            "{prelude} ( {a} ) & ( {b} ) & wait",
            a = self.worker("A"),
            b = self.worker("B")
        )
    }

    /// The second holder's command: `ENTERED`, half a second inside, `LEFT`.
    fn enter(&self) -> String {
        format!(
            "echo ENTERED >> '{0}'; sleep 0.5; echo LEFT >> '{0}'",
            self.path.display()
        )
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn worker_lines(&self) -> usize {
        self.lines()
            .iter()
            .filter(|line| line.starts_with("worker-"))
            .count()
    }

    /// Waits until the workers have written `count` lines.
    fn wait_for_workers(&self, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.worker_lines() < count {
            assert!(Instant::now() < deadline, "the workers never wrote");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The central promise: once the second holder entered, no worker of the first wrote.
    fn assert_no_worker_after_entered(&self) {
        let lines = self.lines();
        let entered = lines
            .iter()
            .position(|line| line == "ENTERED")
            .unwrap_or_else(|| panic!("the second holder never entered: {lines:?}"));
        assert!(
            lines[..entered]
                .iter()
                .any(|line| line.starts_with("worker-")),
            "the workers never ran: {lines:?}"
        );
        let late: Vec<&String> = lines[entered..]
            .iter()
            .filter(|line| line.starts_with("worker-"))
            .collect();
        assert!(
            late.is_empty(),
            "{} line(s) from the first command's workers after the second holder entered, e.g. {:?}",
            late.len(),
            late.first()
        );
        assert!(lines.contains(&"LEFT".to_owned()), "{lines:?}");
    }

    /// No worker writes any more (checked over 300 ms).
    fn assert_workers_stopped(&self, when: &str) {
        let before = self.worker_lines();
        std::thread::sleep(Duration::from_millis(300));
        let after = self.worker_lines();
        assert_eq!(
            before,
            after,
            "the workers wrote {} more line(s) {when}",
            after - before
        );
    }
}

/// A lockrun under test whose stdout and stderr go to files, not pipes: processes it failed
/// to stop would hold a pipe open and hang the test instead of failing it.
struct Supervised {
    child: Child,
    stderr: PathBuf,
}

/// How a supervised lockrun ended.
#[derive(Debug)]
struct Finished {
    code: Option<i32>,
    stderr: String,
}

impl Log {
    fn spawn(&self, command: &mut Command) -> Supervised {
        let stderr = self.dir.path().join(format!("stderr-{}", next_number()));
        let child = command
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Supervised { child, stderr }
    }
}

/// A distinct number per call, for file names.
fn next_number() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Supervised {
    fn finish(mut self) -> Finished {
        let status = self.child.wait().unwrap();
        Finished {
            code: status.code(),
            stderr: std::fs::read_to_string(&self.stderr).unwrap_or_default(),
        }
    }
}

fn servers(binary: &Path, count: usize) -> Vec<RedisServer> {
    (0..count)
        .map(|_| RedisServer::start(binary, &[]).expect("server"))
        .collect()
}

/// Issue #16, first bullet: a lost lock kills the command's whole process group, not only
/// `sh`. On 3c64218 the workers wrote on after lockrun exited 77.
#[test]
fn a_lost_lock_kills_the_whole_process_group() {
    let Some(binary) = redis_or_skip("lockrun") else {
        return;
    };
    let servers = servers(&binary, 1);
    let config = redlock_config(&urls(&servers));
    let log = Log::new();
    let first = log.spawn(&mut lockrun(
        &config,
        &["--ttl", "1500", "tree", "--", "sh", "-c", &log.tree("")],
    ));
    log.wait_for_workers(10);
    // Someone deletes the lock behind the holder's back; the watchdog finds out when it next
    // extends the lock.
    assert_eq!(
        servers[0]
            .command("DEL tree", Duration::from_millis(500))
            .unwrap(),
        ":1"
    );
    let output = first.finish();
    assert_eq!(output.code, Some(77), "{output:?}");
    log.assert_workers_stopped("after lockrun exited 77");
    let second = lockrun(
        &config,
        &["--no-wait", "tree", "--", "sh", "-c", &log.enter()],
    )
    .output()
    .unwrap();
    assert_eq!(code(&second), 0, "{second:?}");
    log.assert_no_worker_after_entered();
}

/// The kill happens before the validity ends, not when the loss is noticed: the holder's
/// renewals are black-holed (a proxy in front of its only node), a second holder that talks
/// to the node directly waits and gets in as soon as the key expires on the server. The
/// workers ignore SIGTERM, so only the SIGKILL at validity − margin stops them.
#[test]
fn renewal_failing_kills_the_group_before_the_validity_ends() {
    let Some(binary) = redis_or_skip("lockrun") else {
        return;
    };
    let servers = servers(&binary, 1);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let proxy = runtime
        .block_on(LatencyProxy::start(servers[0].port()))
        .unwrap();
    let through_proxy = redlock_config(&[proxy.url()]);
    let direct = redlock_config(&urls(&servers));
    let log = Log::new();
    let first = log.spawn(&mut lockrun(
        &through_proxy,
        &[
            "--ttl",
            "3000",
            "tree",
            "--",
            "sh",
            "-c",
            &log.tree("trap '' TERM;"),
        ],
    ));
    log.wait_for_workers(10);
    proxy.black_hole();
    let second = log.spawn(&mut lockrun(
        &direct,
        &["tree", "--", "sh", "-c", &log.enter()],
    ));
    let first = first.finish();
    let second = second.finish();
    assert_eq!(first.code, Some(77), "{first:?}");
    assert_eq!(second.code, Some(0), "{second:?}");
    log.assert_no_worker_after_entered();
    assert!(first.stderr.contains("could not be renewed"), "{first:?}");
}

/// Issue #16, second bullet: SIGINT, SIGTERM, SIGHUP and SIGQUIT go to the command's group;
/// lockrun waits for it (SIGKILL after the default grace for workers that ignore it: `sh`
/// starts background jobs with SIGINT and SIGQUIT ignored), releases and exits 128 + N. On
/// 3c64218 lockrun died of the signal and the command ran on.
#[test]
fn signals_are_forwarded_to_the_group_and_the_lock_released() {
    let Some(binary) = redis_or_skip("lockrun") else {
        return;
    };
    let servers = servers(&binary, 1);
    let config = redlock_config(&urls(&servers));
    for (name, number) in [("HUP", 1), ("INT", 2), ("QUIT", 3), ("TERM", 15)] {
        let log = Log::new();
        let trap = format!(
            "trap 'echo trapped-{name} >> \"{}\"; exit 0' {name};",
            log.path.display()
        );
        // A ttl longer than the run: a free lock afterwards was released, not expired. The
        // default grace (ttl/8, 1 s) applies to the workers that ignore SIGINT and SIGQUIT.
        let first = log.spawn(&mut lockrun(
            &config,
            &["--ttl", "8000", "sig", "--", "sh", "-c", &log.tree(&trap)],
        ));
        log.wait_for_workers(10);
        send(first.child.id(), name);
        let output = first.finish();
        assert_eq!(output.code, Some(128 + number), "SIG{name}: {output:?}");
        assert!(
            log.lines().contains(&format!("trapped-{name}")),
            "SIG{name} did not reach the command: {:?}",
            log.lines()
        );
        log.assert_workers_stopped(&format!("after lockrun exited on SIG{name}"));
        let second = lockrun(
            &config,
            &["--no-wait", "sig", "--", "sh", "-c", &log.enter()],
        )
        .output()
        .unwrap();
        assert_eq!(
            code(&second),
            0,
            "SIG{name}: the lock was not released: {second:?}"
        );
        log.assert_no_worker_after_entered();
    }
}

/// A command that ignores SIGTERM gets SIGKILL when the grace runs out, not before.
#[test]
fn the_kill_grace_separates_sigterm_from_sigkill() {
    let Some(binary) = redis_or_skip("lockrun") else {
        return;
    };
    let servers = servers(&binary, 1);
    let config = redlock_config(&urls(&servers));
    let log = Log::new();
    let first = log.spawn(&mut lockrun(
        &config,
        &[
            "--ttl",
            "30000",
            "--kill-grace",
            "1s",
            "stubborn",
            "--",
            "sh",
            "-c",
            &log.tree("trap '' TERM;"),
        ],
    ));
    log.wait_for_workers(10);
    let signalled = Instant::now();
    send(first.child.id(), "TERM");
    let output = first.finish();
    let waited = signalled.elapsed();
    assert_eq!(output.code, Some(143), "{output:?}");
    assert!(
        waited >= Duration::from_secs(1),
        "SIGKILL came {waited:?} after SIGTERM, before the 1 s grace"
    );
    log.assert_workers_stopped("after lockrun exited");

    let too_long = lockrun(
        &config,
        &["--ttl", "1000", "--kill-grace", "1s", "k", "--", "true"],
    )
    .output()
    .unwrap();
    assert_eq!(code(&too_long), 78, "{too_long:?}");
    assert!(
        String::from_utf8_lossy(&too_long.stderr).contains("at most a fifth of the ttl"),
        "{too_long:?}"
    );
}

/// If lockrun itself is SIGKILLed, its reaper kills the command's group at once: the lock
/// (not released) expires and the next holder finds nothing of the first command running.
/// On 3c64218 the command ran on without the lock.
#[test]
fn a_sigkilled_lockrun_leaves_no_command_running() {
    let Some(binary) = redis_or_skip("lockrun") else {
        return;
    };
    let servers = servers(&binary, 1);
    let config = redlock_config(&urls(&servers));
    let log = Log::new();
    let mut first = lockrun(
        &config,
        &["--ttl", "1000", "orphan", "--", "sh", "-c", &log.tree("")],
    )
    .spawn()
    .unwrap();
    log.wait_for_workers(10);
    first.kill().unwrap();
    let status = first.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    let second = log
        .spawn(&mut lockrun(
            &config,
            &["orphan", "--", "sh", "-c", &log.enter()],
        ))
        .finish();
    assert_eq!(second.code, Some(0), "{second:?}");
    log.assert_no_worker_after_entered();
}

/// Processes the command leaves behind in its group are stopped before the lock is released.
/// On 3c64218 lockrun released the lock at once and the worker ran on.
#[test]
fn processes_left_behind_are_stopped_before_the_release() {
    let Some(binary) = redis_or_skip("lockrun") else {
        return;
    };
    let servers = servers(&binary, 1);
    let config = redlock_config(&urls(&servers));
    let log = Log::new();
    let script = format!("( {} ) & sleep 0.2; exit 3", log.worker("A"));
    let first = log
        .spawn(&mut lockrun(
            &config,
            &["--ttl", "2000", "leftover", "--", "sh", "-c", &script],
        ))
        .finish();
    assert_eq!(first.code, Some(3), "the command's own code: {first:?}");
    let second = lockrun(
        &config,
        &["--no-wait", "leftover", "--", "sh", "-c", &log.enter()],
    )
    .output()
    .unwrap();
    assert_eq!(code(&second), 0, "{second:?}");
    log.assert_no_worker_after_entered();
}

/// Issue #16, third bullet: the lock is purged 0.3 s into a 1 s command, another holder gets
/// in, the command exits 0 — lockrun must say 77 (the release's `NotHeld`), with and without
/// `--hold-at-least`. On 3c64218 it exited 0.
#[test]
fn a_lock_lost_unnoticed_until_the_release_still_exits_77() {
    let Some(binary) = redis_or_skip("lockrun") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let config = inc_config(&server);
    for extra in [&[][..], &["--hold-at-least", "5s"][..]] {
        let mut args = vec!["--ttl", "10000"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["jobs:1", "--", "sleep", "1"]);
        let log = Log::new();
        let first = log.spawn(&mut lockrun(&config, &args));
        std::thread::sleep(Duration::from_millis(300));
        let purge = lockrun(&config, &["purge", "jobs:"]).output().unwrap();
        assert!(
            String::from_utf8_lossy(&purge.stdout).contains("purged 1"),
            "{purge:?}"
        );
        let intruder = lockrun(&config, &["--no-wait", "jobs:1", "--", "true"])
            .output()
            .unwrap();
        assert_eq!(code(&intruder), 0, "another holder got in: {intruder:?}");
        let started = Instant::now();
        let output = first.finish();
        assert_eq!(output.code, Some(77), "{extra:?}: {output:?}");
        assert!(output.stderr.contains("was lost"), "{output:?}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{extra:?}: a lock lost during the command is not held on"
        );
    }
}

/// The exit codes of the table in `lockrun --help` that are not tested elsewhere: the
/// command's own code passed through exactly, 128 + N for a command killed by signal N, 69
/// for a backend that cannot be reached.
#[test]
fn exit_codes_pass_through_exactly() {
    let Some(binary) = redis_or_skip("lockrun") else {
        return;
    };
    let servers = servers(&binary, 1);
    let config = redlock_config(&urls(&servers));
    for (script, expected) in [
        ("exit 0", 0),
        ("exit 7", 7),
        ("exit 255", 255),
        ("kill -USR1 $$", 128 + 10),
        ("kill -KILL $$", 128 + 9),
    ] {
        let output = lockrun(&config, &["codes", "--", "sh", "-c", script])
            .output()
            .unwrap();
        assert_eq!(code(&output), expected, "`{script}`: {output:?}");
    }
    // Port 1 on loopback: nothing listens there.
    let nobody = vec!["redis://127.0.0.1:1/".to_owned()];
    let unreachable = lockrun(
        &redlock_config(&nobody),
        &["--no-wait", "codes", "--", "true"],
    )
    .output()
    .unwrap();
    assert_eq!(code(&unreachable), 69, "{unreachable:?}");
}

/// `--hold-at-least`: the lock stays held after a short command until the time is up (the
/// same job fired on another machine finds it held), then it is released and lockrun exits
/// with the command's code. `status --json` shows it held (never the token), then free.
#[test]
fn hold_at_least_keeps_the_lock_after_a_short_command() {
    let Some(binary) = redis_or_skip("lockrun") else {
        return;
    };
    let servers = servers(&binary, 3);
    let config = redlock_config(&urls(&servers));
    let log = Log::new();
    let started = Instant::now();
    let first = log.spawn(&mut lockrun(
        &config,
        &[
            "--ttl",
            "1000",
            "--hold-at-least",
            "2500ms",
            "cron",
            "--",
            "sh",
            "-c",
            "exit 4",
        ],
    ));
    std::thread::sleep(Duration::from_millis(1500));
    let again = lockrun(&config, &["--no-wait", "cron", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(code(&again), 75, "the job ran twice: {again:?}");
    let status = lockrun(&config, &["status", "--json", "cron"])
        .output()
        .unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(shown["key"], "cron", "{shown}");
    let nodes = shown["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{shown}");
    // Held on a majority (a minority node may have missed an extension: Redlock needs a
    // quorum, not every node), with at most the ttl left.
    let held: Vec<&serde_json::Value> = nodes
        .iter()
        .filter(|node| node["state"] == "held")
        .collect();
    assert!(held.len() >= 2, "{shown}");
    for node in held {
        let ttl = node["ttl_ms"].as_u64().unwrap();
        assert!(ttl > 0 && ttl <= 1000, "{shown}");
    }
    let token = servers
        .iter()
        .find_map(|server| get_bulk(server.port(), "cron"))
        .expect("the lock's value");
    assert!(
        !String::from_utf8_lossy(&status.stdout).contains(&token),
        "status shows the token"
    );
    let output = first.finish();
    assert_eq!(output.code, Some(4), "the command's own code: {output:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(2500),
        "lockrun let go after {:?}, before --hold-at-least",
        started.elapsed()
    );
    let status = lockrun(&config, &["status", "--json", "cron"])
        .output()
        .unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    // Released at the end (long before the ttl would matter): free on a majority at once; a
    // slower node hears the release off the caller's path, which may not be over when lockrun
    // has exited.
    let free: Vec<&serde_json::Value> = shown["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|node| node["state"] == "free")
        .collect();
    assert!(free.len() >= 2, "not released: {shown}");
    assert!(free.iter().all(|node| node["ttl_ms"].is_null()), "{shown}");
    let next = lockrun(&config, &["--no-wait", "cron", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(code(&next), 0, "not released: {next:?}");
}

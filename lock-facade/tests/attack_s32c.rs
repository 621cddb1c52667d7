//! Session 32c: a hostile user, network and clock against this session's lockrun changes.
#![cfg(all(feature = "redlock", feature = "inc", feature = "cli"))]
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lock_tests::server::{RedisServer, redis_or_skip};

mod support;
use support::{LOCKRUN, lockrun, send, shown, wait_for};

fn keys(server: &RedisServer) -> Vec<String> {
    let mut connection = redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query(&mut connection).unwrap();
    let mut keys: Vec<String> = keys
        .iter()
        .map(|key| String::from_utf8_lossy(key).into_owned())
        .collect();
    keys.sort();
    keys
}

/// A holder that says it started (a file), then runs `seconds` more.
fn holder(config: &str, key: &str, started: &Path, seconds: u32) -> Child {
    lockrun()
        .args(["--config", config, "--ttl", "10000", key, "--", "sh", "-c"])
        .arg(format!("touch '{}'; sleep {seconds}", started.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `--wait` on a fair line (Redlock's default), interrupted: lockrun exits 130 and leaves
/// neither its line entry nor a reservation behind — once the holder is done, a `--no-wait`
/// run gets the lock at once.
#[test]
fn an_interrupted_fair_wait_leaves_no_line_entry() {
    let Some(binary) = redis_or_skip("attack_s32c") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (backend, extra) in [
        ("redis", serde_json::json!({})),
        ("inc", serde_json::json!({"fair": true})),
    ] {
        let key = format!("wait-{backend}");
        let mut config = serde_json::json!({"type": backend, "urls": [server.url()]});
        if backend == "inc" {
            config = serde_json::json!({"type": backend, "url": server.url()});
        }
        for (name, value) in extra.as_object().unwrap() {
            config[name] = value.clone();
        }
        let config = config.to_string();
        let started = dir.path().join(format!("started-{backend}"));
        let mut held = holder(&config, &key, &started, 2);
        wait_for("the holder started", || started.exists());
        let before = keys(&server);
        let waiter = lockrun()
            .args([
                "--config", &config, "--wait", "--ttl", "10000", &key, "--", "true",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for("the waiter lined up", || keys(&server).len() > before.len());
        std::thread::sleep(Duration::from_millis(300));
        send(waiter.id(), "INT");
        let output = waiter.wait_with_output().unwrap();
        assert_eq!(
            output.status.code(),
            Some(130),
            "{backend}: {}",
            shown(&output)
        );
        let after = keys(&server);
        let status = held.wait().unwrap();
        assert_eq!(status.code(), Some(0), "{backend}: the holder");
        let output = lockrun()
            .args(["--config", &config, "--no-wait", &key, "--", "true"])
            .output()
            .unwrap();
        assert_eq!(
            output.status.code(),
            Some(0),
            "{backend}: keys while held {before:?}, after the waiter left {after:?}: {}",
            shown(&output)
        );
    }
}

/// A writer (`--exclusive --wait`) waiting behind a reader puts a claim that holds new readers
/// out. Interrupted, it exits 130 and takes its claim back: a new reader gets in at once while
/// the first one still reads.
#[test]
fn an_interrupted_writer_takes_its_claim_back() {
    let Some(binary) = redis_or_skip("attack_s32c") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for backend in ["redis", "inc"] {
        let key = format!("rw-{backend}");
        let config = if backend == "inc" {
            serde_json::json!({"type": backend, "url": server.url()})
        } else {
            serde_json::json!({"type": backend, "urls": [server.url()]})
        }
        .to_string();
        let started = dir.path().join(format!("reader-{backend}"));
        let mut reader = lockrun()
            .args([
                "--config", &config, "--ttl", "10000", "--shared", &key, "--", "sh", "-c",
            ])
            .arg(format!("touch '{}'; sleep 3", started.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for("the reader started", || started.exists());
        let writer = lockrun()
            .args([
                "--config",
                &config,
                "--wait",
                "--ttl",
                "10000",
                "--exclusive",
                &key,
                "--",
                "true",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A new reader is held out while the writer waits.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let output = lockrun()
                .args([
                    "--config",
                    &config,
                    "--no-wait",
                    "--shared",
                    &key,
                    "--",
                    "true",
                ])
                .output()
                .unwrap();
            if output.status.code() == Some(75) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{backend}: the writer's claim never held a reader out: {}",
                shown(&output)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        send(writer.id(), "INT");
        let output = writer.wait_with_output().unwrap();
        assert_eq!(
            output.status.code(),
            Some(130),
            "{backend}: {}",
            shown(&output)
        );
        let output = lockrun()
            .args([
                "--config",
                &config,
                "--no-wait",
                "--shared",
                &key,
                "--",
                "true",
            ])
            .output()
            .unwrap();
        let still_reading = reader.try_wait().unwrap().is_none();
        assert!(
            still_reading,
            "{backend}: the first reader ended too soon for this test"
        );
        assert_eq!(
            output.status.code(),
            Some(0),
            "{backend}: a reader after the writer gave up, keys {:?}: {}",
            keys(&server),
            shown(&output)
        );
        assert_eq!(reader.wait().unwrap().code(), Some(0));
    }
}

/// Drivers parse URLs as WHATWG does (the `url` crate): an ASCII tab, line feed or carriage
/// return anywhere in the text is removed before parsing, so `?pa<TAB>ssword=` is `password`
/// to them, as `?p%61ssword=` is. `redact_url` decoded the `%XX` escapes of a name but kept
/// those characters, found no `pass` in it and showed the value.
#[test]
fn a_password_parameter_split_by_a_tab_or_newline_is_hidden() {
    for url in [
        "redis://127.0.0.1:1/?pa\tssword=Qz7-s3cret",
        "redis://127.0.0.1:1/?db=0&pass\nword=Qz7-s3cret",
        "redis://u:pw@127.0.0.1:1/?sentinelP\r%61ssword=Qz7-s3cret",
    ] {
        let redacted = lock_facade::raw::redact_url(url);
        assert!(
            !redacted.contains("Qz7-s3cret"),
            "{url:?} shown as {redacted:?}"
        );
        let config = serde_json::json!({"type": "inc", "url": url}).to_string();
        for args in [&["status", "job"][..], &["--no-wait", "job", "--", "true"]] {
            let output = lockrun()
                .args(["--config", &config])
                .args(args)
                .output()
                .unwrap();
            let text = shown(&output);
            assert!(
                !text.contains("Qz7-s3cret"),
                "{args:?} with {url:?}: {text}"
            );
        }
    }
}

/// The signal ignore mask of a command under lockrun, started from `sh` with `trap '' NAME`.
fn ignored_under_lockrun(config: &str, name: &str) -> u64 {
    let output = Command::new("sh")
        .arg("-c")
        .arg(format!("trap '' {name}; exec \"$0\" \"$@\""))
        .arg(LOCKRUN)
        .args([
            "--config",
            config,
            &format!("mask-{name}"),
            "--",
            "cat",
            "/proc/self/status",
        ])
        .env_remove("LOCK_CONFIG")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", shown(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    let mask = text
        .lines()
        .find_map(|line| line.strip_prefix("SigIgn:"))
        .unwrap();
    u64::from_str_radix(mask.trim(), 16).unwrap()
}

/// The README: a signal ignored when lockrun starts "stays ignored, by lockrun and by the
/// command, as when the command runs directly". It holds for the signals lockrun handles
/// (HUP, INT, QUIT, TERM, TSTP) and those it leaves alone (USR1, ALRM, TTIN, TTOU, WINCH).
#[test]
fn signals_ignored_at_start_stay_ignored_for_the_command() {
    let Some(binary) = redis_or_skip("attack_s32c") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let config = serde_json::json!({"type": "redis", "urls": [server.url()]}).to_string();
    for (name, number) in [
        ("HUP", 1),
        ("INT", 2),
        ("QUIT", 3),
        ("USR1", 10),
        ("ALRM", 14),
        ("TERM", 15),
        ("TSTP", 20),
        ("TTIN", 21),
        ("TTOU", 22),
        ("WINCH", 28),
    ] {
        let mask = ignored_under_lockrun(&config, name);
        assert_ne!(
            mask & (1 << (number - 1)),
            0,
            "SIG{name} not ignored: {mask:x}"
        );
    }
}

/// A limitation: SIGPIPE ignored when lockrun starts is at its default in the command. Rust's
/// runtime ignores SIGPIPE before `main` (so the disposition lockrun inherited cannot be read
/// back) and `Command` resets it to the default in the child; a command that relies on an
/// inherited ignored SIGPIPE (to get EPIPE instead of dying) is killed under lockrun.
#[test]
#[ignore = "limitation: Rust's runtime hides and resets an inherited ignored SIGPIPE"]
fn sigpipe_ignored_at_start_stays_ignored_for_the_command() {
    let Some(binary) = redis_or_skip("attack_s32c") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let config = serde_json::json!({"type": "redis", "urls": [server.url()]}).to_string();
    let mask = ignored_under_lockrun(&config, "PIPE");
    assert_ne!(mask & (1 << 12), 0, "SIGPIPE not ignored: {mask:x}");
}

/// `lockrun --help`: 69 when "the backend failed (unreachable, protocol error)", and `--wait`
/// waits "until the lock is free". Since 942ac1c `--wait` sets an endless retry count, and the
/// core retries a failed attempt (an unreachable node) like a held lock: with the Redis server
/// down, `lockrun --wait` (no `--timeout`) never ends and says nothing — a cron job piles up
/// silent processes — where before, and without `--wait`, it exits 69 after the retries
/// (~2.5 s). An unreachable inc server is reported (69) at once: inc connects first.
#[test]
fn wait_on_an_unreachable_backend_is_a_backend_failure() {
    let down = lock_tests::server::free_port().unwrap();
    let config = serde_json::json!({
        "type": "redis", "urls": [format!("redis://127.0.0.1:{down}/")],
    })
    .to_string();
    for wait in [false, true] {
        let mut command = lockrun();
        command.args(["--config", &config]);
        if wait {
            command.arg("--wait");
        }
        let mut child = command
            .args(["job", "--", "true"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(8);
        while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let ended = child.try_wait().unwrap().is_some();
        if !ended {
            child.kill().unwrap();
        }
        let output = child.wait_with_output().unwrap();
        assert!(
            ended,
            "--wait={wait}: still retrying an unreachable node after 8 s"
        );
        assert_eq!(
            output.status.code(),
            Some(69),
            "--wait={wait}: {}",
            shown(&output)
        );
    }
}

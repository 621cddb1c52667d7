//! Session 32a: a hostile user, environment and clock against `lockrun` and `create(config)`.
#![cfg(all(feature = "redlock", feature = "inc", feature = "cli"))]
#![allow(clippy::unwrap_used)]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::process::Command;
use std::sync::{Arc, LazyLock, Mutex};

use lock_tests::server::{RedisServer, redis_or_skip};

mod support;
use support::{LOCKRUN, lockrun, send, shown, wait_for};

/// Arguments are bytes on Unix, not always UTF-8. lockrun read its arguments with
/// `std::env::args()` (to look for an ambiguous subcommand), which panics on one that is not
/// UTF-8 and quotes it whole in the panic message: exit 101 (no documented code), and a
/// `--config` whose password holds an odd byte was printed on stderr, password and all. A
/// command argument that is a non-UTF-8 file name (`rm $'\xff.log'`) made lockrun panic too,
/// instead of running the command.
#[test]
fn non_utf8_arguments_neither_panic_nor_show_a_password() {
    // A password with a byte that is not UTF-8: the configuration is refused, not shown.
    let mut config = br#"{"type": "redis", "urls": ["redis://app:Hunter2-s3cret"#.to_vec();
    config.extend_from_slice(b"\xff-tail@127.0.0.1:1/\"]}");
    let output = lockrun()
        .arg("--config")
        .arg(OsStr::from_bytes(&config))
        .args(["job", "--", "true"])
        .output()
        .unwrap();
    let text = shown(&output);
    assert!(
        !text.contains("Hunter2") && !text.contains("s3cret"),
        "the password is shown: {text}"
    );
    assert_eq!(output.status.code(), Some(78), "{text}");

    // A key that is not UTF-8: bad arguments.
    let output = lockrun()
        .args([
            "--config",
            r#"{"type": "redis", "urls": ["redis://127.0.0.1:1/"]}"#,
        ])
        .arg(OsStr::from_bytes(b"job\xfe"))
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(78), "{}", shown(&output));

    // A command argument that is not UTF-8 reaches the command byte for byte.
    let Some(binary) = redis_or_skip("attack_s32a") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let config = serde_json::json!({"type": "redis", "urls": [server.url()]}).to_string();
    let output = lockrun()
        .args(["--config", &config, "job", "--", "printf", "%s"])
        .arg(OsStr::from_bytes(b"file-\xff.log"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", shown(&output));
    assert_eq!(output.stdout, b"file-\xff.log");
}

/// The README: no password appears in `lockrun`'s output "whatever its characters", and
/// `redact_url` hides "query parameters whose name contains `pass`". Drivers read a query's
/// names percent-decoded (`url`'s `query_pairs`), so `?p%61ss=` names `pass` to them; the
/// redaction compared the name as written and showed the value: inc's status and its connect
/// error printed `?p%61ssword=<the password>`.
#[test]
fn a_percent_encoded_password_parameter_is_hidden() {
    for (url, secret) in [
        ("redis://127.0.0.1:1/?p%61ssword=Qz7-s3cret", "Qz7-s3cret"),
        ("redis://127.0.0.1:1/?db=0&%50ASS=Qz7-s3cret", "Qz7-s3cret"),
        (
            "redis://u:pw@127.0.0.1:1/?sentinel%50assword=Qz7-s3cret",
            "Qz7-s3cret",
        ),
    ] {
        let redacted = lock_facade::raw::redact_url(url);
        assert!(!redacted.contains(secret), "{url} shown as {redacted}");
        let config = serde_json::json!({"type": "inc", "url": url}).to_string();
        for args in [&["status", "job"][..], &["--no-wait", "job", "--", "true"]] {
            let output = lockrun()
                .args(["--config", &config])
                .args(args)
                .output()
                .unwrap();
            let text = shown(&output);
            assert!(!text.contains(secret), "{args:?} with {url}: {text}");
            assert_eq!(output.status.code(), Some(69), "{text}");
        }
    }
}

/// The README: `LOCK_FENCING_TOKEN` is set "where the backend hands out fencing tokens (inc, or
/// Redlock with `fencing`)" — the command's token, to pass to the resource. Under a backend
/// without tokens lockrun left the variable as it found it: a command run from a shell or job
/// that had one (a lockrun inside another, or a hostile environment) read a token that was not
/// its own and fenced the resource with it.
#[test]
fn no_fencing_token_is_inherited_from_the_environment() {
    let Some(binary) = redis_or_skip("attack_s32a") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let plain = serde_json::json!({"type": "redis", "urls": [server.url()]}).to_string();
    let output = lockrun()
        .env("LOCK_FENCING_TOKEN", "999999999")
        .args(["--config", &plain, "job", "--", "sh", "-c"])
        .arg("printf %s \"${LOCK_FENCING_TOKEN-unset}\"")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", shown(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "unset",
        "Redlock without fencing hands out no token"
    );
    // With tokens, the command's own one (inc's first token on a fresh key is not ours).
    let inc = serde_json::json!({"type": "inc", "url": server.url()}).to_string();
    let output = lockrun()
        .env("LOCK_FENCING_TOKEN", "999999999")
        .args(["--config", &inc, "job", "--", "sh", "-c"])
        .arg("printf %s \"${LOCK_FENCING_TOKEN-unset}\"")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", shown(&output));
    let token = String::from_utf8_lossy(&output.stdout);
    assert!(
        token != "999999999" && token.parse::<u64>().is_ok(),
        "{token}"
    );
}

/// The promise: no process of the command is alive once the lock's validity has ended, the
/// group getting SIGTERM when the kill grace plus a margin (ttl/8 + ttl/20) is left. lockrun
/// started the command whatever validity the guard had left: a guard handed out with less
/// than that (an acquisition answered late in its ttl; here a drift factor that leaves ~8 ms
/// of a 1 s ttl) started the command only to stop it at once — the command ran, if briefly,
/// past the point where it should already have been killed. Here the command does not exist:
/// lockrun tried to start it (127) instead of giving up on the lock first.
#[test]
fn a_lock_with_too_little_validity_left_starts_no_command() {
    let Some(binary) = redis_or_skip("attack_s32a") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let config = serde_json::json!({
        "type": "redis", "urls": [server.url()], "driftFactor": 0.99,
        "retryCount": -1, "retryDelay": 1, "retryJitter": 1,
    })
    .to_string();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let touch = format!("touch '{}'; sleep 5", marker.display());
    for (key, command) in [
        ("missing", &["/nonexistent/lockrun-s32a-job"][..]),
        ("touch", &["sh", "-c", touch.as_str()]),
    ] {
        let output = lockrun()
            .args([
                "--config",
                &config,
                "--ttl",
                "1000",
                "--timeout",
                "10000",
                key,
            ])
            .arg("--")
            .args(command)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(77), "{key}: {}", shown(&output));
        assert!(!marker.exists(), "the command ran");
        // Released: the next run finds the key free.
        assert_eq!(
            server
                .command(&format!("EXISTS {key}"), std::time::Duration::from_secs(1))
                .unwrap(),
            ":0"
        );
    }
}

/// The README: "No password appears in an error, a `Debug`, a log line or `lockrun`'s output".
/// A server that does not know the command carrying the password — `HELLO 3 AUTH user pass`
/// for a RESP3 URL on a server without `HELLO` (Redis 5, or one that renamed it), or `AUTH`
/// renamed away — answers `unknown command 'HELLO', with args beginning with: '3' 'AUTH'
/// 'user' 'pass'`: the password, echoed by the server, went into the backend's error as it
/// was, and out through `lockrun`'s stderr and `status`.
#[test]
fn a_password_echoed_by_the_server_is_not_shown() {
    let Some(binary) = redis_or_skip("attack_s32a") else {
        return;
    };
    let secret = "Qv7-echoed-s3cret";
    let no_hello = RedisServer::start(&binary, &["--rename-command", "HELLO", ""]).unwrap();
    let no_auth = RedisServer::start(&binary, &["--rename-command", "AUTH", ""]).unwrap();
    let resp3 = format!(
        "redis://default:{secret}@127.0.0.1:{}/?protocol=resp3",
        no_hello.port()
    );
    let resp2 = format!("redis://default:{secret}@127.0.0.1:{}/", no_auth.port());
    for url in [&resp3, &resp2] {
        for config in [
            serde_json::json!({"type": "redis", "urls": [url], "retryCount": 0}),
            serde_json::json!({"type": "inc", "url": url}),
        ] {
            for args in [&["status", "job"][..], &["--no-wait", "job", "--", "true"]] {
                let output = lockrun()
                    .args(["--config", &config.to_string()])
                    .args(args)
                    .output()
                    .unwrap();
                let text = shown(&output);
                assert!(!text.contains(secret), "{config} {args:?}: {text}");
            }
        }
    }
}

/// Every log line at TRACE, the drivers' own `log` records included, into one buffer.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

static LOGS: LazyLock<Logs> = LazyLock::new(|| {
    let logs = Logs::default();
    let sink = logs.clone();
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing_subscriber::filter::LevelFilter::TRACE)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .try_init();
    logs
});

/// `create` and a lock attempt in this process on servers that echo the password (as in
/// [`a_password_echoed_by_the_server_is_not_shown`]): what the errors and states show, and the
/// log lines written meanwhile.
fn echoed_in_process(secret: &str) -> (Vec<String>, Vec<String>) {
    let Some(binary) = redis_or_skip("attack_s32a") else {
        return (Vec::new(), Vec::new());
    };
    let mark = LOGS.0.lock().unwrap().len();
    let no_hello = RedisServer::start(&binary, &["--rename-command", "HELLO", ""]).unwrap();
    let no_auth = RedisServer::start(&binary, &["--rename-command", "AUTH", ""]).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut shown = Vec::new();
    for url in [
        format!(
            "redis://default:{secret}@127.0.0.1:{}/?protocol=resp3",
            no_hello.port()
        ),
        format!("redis://default:{secret}@127.0.0.1:{}/", no_auth.port()),
    ] {
        for config in [
            serde_json::json!({"type": "redis", "urls": [&url], "retryCount": 0, "wakeOnRelease": true}),
            serde_json::json!({"type": "redis", "urls": [&url], "retryCount": 0, "connection": "pool"}),
            serde_json::json!({"type": "inc", "url": &url, "wakeOnRelease": true, "fair": true}),
        ] {
            let config = lock_facade::LockConfig::from_json(&config.to_string()).unwrap();
            runtime.block_on(async {
                match lock_facade::create(config).await {
                    Ok(locker) => {
                        if let Err(error) = locker.acquire("job").await {
                            shown.push(format!("{error} {error:?}"));
                        }
                        if let Ok(states) = locker.inspect("job").await {
                            shown.push(format!("{states:?}"));
                        }
                        let _ = locker.stop().await;
                    }
                    Err(error) => shown.push(format!("{error} {error:?}")),
                }
            });
        }
    }
    drop(runtime);
    let logged = String::from_utf8_lossy(&LOGS.0.lock().unwrap()[mark..]).into_owned();
    (shown, logged.lines().map(str::to_owned).collect())
}

/// The same echo, through `create` and a lock attempt in this process, with every log record
/// captured at TRACE: no error, state or log line of this workspace's crates shows the
/// password (Redlock's `node failed` and `quorum not reached` lines quoted the echo before
/// e05f8a5). fred's own records are left to the next test.
#[test]
fn a_password_echoed_by_the_server_is_not_logged() {
    let secret = "Qv7-logged-s3cret";
    let (shown, logged) = echoed_in_process(secret);
    for text in &shown {
        assert!(!text.contains(secret), "{text}");
    }
    for line in logged.iter().filter(|line| !line.contains(" fred::")) {
        assert!(!line.contains(secret), "{line}");
    }
}

/// A limitation, not fixed here: fred (inc's client) logs the server's answer itself, at DEBUG
/// (`No on_error listener. The error was: …`) and TRACE (`Ending connection task with Err(…)`),
/// echoed password included. Only an application that turns on fred's debug logs sees it.
#[test]
#[ignore = "fred's own DEBUG and TRACE records quote the server's echo of HELLO/AUTH"]
fn fred_does_not_log_a_password_echoed_by_the_server() {
    let secret = "Qv7-fred-s3cret";
    let (_, logged) = echoed_in_process(secret);
    for line in &logged {
        assert!(!line.contains(secret), "{line}");
    }
}

/// `lockrun --help`: 69 when "the backend failed (unreachable, protocol error)". `status`
/// exited 69 on an unreachable inc server (it connects first) but 0 on Redlock whose every
/// node was unreachable, its lines all `unknown`: a monitoring script could not tell "free"
/// from "cannot tell". Some node answering is an answer (0); none is a backend failure.
#[test]
fn status_with_no_node_answering_is_a_backend_failure() {
    let Some(binary) = redis_or_skip("attack_s32a") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let down = lock_tests::server::free_port().unwrap();
    let down = format!("redis://127.0.0.1:{down}/");
    for (urls, expected) in [
        (vec![down.clone()], 69),
        (
            vec![down.clone(), down.replace("127.0.0.1", "127.0.0.2")],
            69,
        ),
        (vec![server.url(), down.clone()], 0),
    ] {
        let config = serde_json::json!({"type": "redlock", "urls": urls}).to_string();
        for json in [false, true] {
            let mut command = lockrun();
            command.args(["--config", &config, "status"]);
            if json {
                command.arg("--json");
            }
            let output = command.arg("job").output().unwrap();
            assert_eq!(
                output.status.code(),
                Some(expected),
                "{urls:?}: {}",
                shown(&output)
            );
            // The per-node report is printed all the same.
            assert!(
                String::from_utf8_lossy(&output.stdout).contains("job"),
                "{}",
                shown(&output)
            );
        }
    }
}

/// `nohup lockrun …` (or a non-interactive shell's `lockrun … &`, whose SIGINT and SIGQUIT
/// are ignored): a signal ignored when lockrun starts is ignored by the command too when it
/// is run directly — that is what the caller asked for. lockrun installed its handlers over
/// the ignored disposition and forwarded the signal: a hangup killed the `nohup`ed job (and
/// lockrun exited 129). A signal ignored at start now stays ignored, for lockrun and the
/// command; signals that were not ignored are still forwarded.
#[test]
fn a_signal_ignored_when_lockrun_starts_stays_ignored() {
    let Some(binary) = redis_or_skip("attack_s32a") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let config = serde_json::json!({"type": "redis", "urls": [server.url()]}).to_string();
    let dir = tempfile::tempdir().unwrap();
    for (name, number) in [("HUP", 1), ("INT", 2)] {
        let started = dir.path().join(format!("started-{name}"));
        let done = dir.path().join(format!("done-{name}"));
        // The job says it started, then finishes after a while unless a signal ends it.
        let job = format!(
            "touch '{}'; sleep 1; touch '{}'",
            started.display(),
            done.display()
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("trap '' {name}; exec \"$0\" \"$@\""))
            .arg(LOCKRUN)
            .args([
                "--config",
                &config,
                &format!("ignored-{name}"),
                "--",
                "sh",
                "-c",
                &job,
            ])
            .env_remove("LOCK_CONFIG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        wait_for("the job started", || started.exists());
        send(child.id(), name);
        let output = child.wait_with_output().unwrap();
        assert_eq!(
            output.status.code(),
            Some(0),
            "SIG{name} (signal {number}) was ignored when lockrun started: {}",
            shown(&output)
        );
        assert!(done.exists(), "SIG{name} ended the job");
    }
}

//! Attacks on `lockrun`'s command line that need no Redis: a key named like a subcommand, the
//! default memory backend across processes, and a broken stderr.
#![cfg(all(feature = "memory", feature = "cli"))]
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

// `lockrun()`: lockrun with no configuration at all, the memory backend.
mod support;
use support::lockrun;

/// An executable script that creates `marker` when it runs.
fn script(dir: &std::path::Path, marker: &std::path::Path) -> String {
    let path = dir.join("job.sh");
    std::fs::write(&path, format!("#!/bin/sh\ntouch '{}'\n", marker.display())).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

/// The same, after a flag that takes a value given as a separate word (`--permits 2`,
/// `--ttl 5000`): the value must not be taken for the key, or `status`/`purge` slips past the
/// check and the command silently never runs (or a purge runs instead).
#[test]
fn a_subcommand_after_a_flag_with_a_value_is_still_ambiguous() {
    for flags in [
        &["--permits", "2"][..],
        &["--ttl", "5000"],
        &["--timeout", "100"],
        &["--kill-grace", "1s"],
        &["--hold-at-least", "1s"],
        &["--config", "{}"],
    ] {
        for key in ["status", "purge"] {
            let dir = tempfile::tempdir().unwrap();
            let marker = dir.path().join("ran");
            let job = script(dir.path(), &marker);
            let mut args = flags.to_vec();
            args.extend([key, "--", job.as_str()]);
            let output = lockrun().args(&args).output().unwrap();
            assert_eq!(
                output.status.code(),
                Some(78),
                "`lockrun {}` was not refused as ambiguous: {output:?}",
                args.join(" ")
            );
            assert!(!marker.exists());
        }
    }
}

/// `lockrun KEY -- COMMAND` with KEY `status` (or `purge`) is taken as the subcommand: lockrun
/// prints the status of a key named after the command, exits 0 and never runs it — a cron job
/// that silently never runs.
#[test]
fn a_key_named_status_runs_the_command_or_fails() {
    for key in ["status", "purge"] {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let job = script(dir.path(), &marker);
        let output = lockrun().args([key, "--", &job]).output().unwrap();
        let ran = marker.exists();
        assert!(
            ran || !output.status.success(),
            "`lockrun {key} -- JOB` exited 0 without running JOB: {output:?}"
        );
    }
}

/// Without `--config` and `LOCK_CONFIG`, lockrun uses the in-process memory backend, which no
/// other lockrun process can see: two lockruns "hold" the same key at once and both run their
/// commands. It should refuse (78) or at least not let the second one in.
#[test]
fn the_default_memory_backend_does_not_let_a_second_lockrun_in() {
    let dir = tempfile::tempdir().unwrap();
    let started = dir.path().join("started");
    let second_ran = dir.path().join("second-ran");
    let mut first = lockrun()
        .args([
            "shared",
            "--",
            "sh",
            "-c",
            &format!("touch '{}'; sleep 2", started.display()),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !started.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let first_is_running = started.exists();
    let second = lockrun()
        .args([
            "--no-wait",
            "shared",
            "--",
            "touch",
            &second_ran.display().to_string(),
        ])
        .output()
        .unwrap();
    let first_status = first.wait().unwrap();
    // A first lockrun that refused the memory backend is a fix too; then the second refuses.
    if first_is_running {
        assert!(
            !second_ran.exists(),
            "a second lockrun ran its command while the first held `shared` (exit {:?}, first {first_status:?})",
            second.status.code()
        );
    } else {
        assert_eq!(first_status.code(), Some(78), "{first_status:?}");
    }
}

/// lockrun's messages go to stderr with `eprintln!`, which panics when stderr is a pipe with
/// no reader (`lockrun … 2>&1 | head -1`): the documented exit code is replaced by Rust's 101.
#[test]
fn a_broken_stderr_does_not_change_the_exit_code() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    // With no configuration lockrun refuses the in-process memory backend (78) and says why
    // on stderr: the message must not turn the code into a panic's 101.
    let status = lockrun()
        .args(["k", "--", "/nonexistent/command"])
        .stdout(Stdio::null())
        .stderr(Stdio::from(writer))
        .status()
        .unwrap();
    assert_eq!(
        status.code(),
        Some(78),
        "a refused configuration, with stderr a broken pipe: {status:?}"
    );
}

/// A flag only a run reads, given to `status` or `purge`, is refused (78) and named: `lockrun
/// --permits 2 status k` looked like a permit count's status and silently showed the mutex's
/// (old: exit 0, the flag ignored).
#[test]
fn a_run_only_flag_given_to_a_subcommand_is_refused() {
    for flags in [
        &["--permits", "2"][..],
        &["--shared"],
        &["--exclusive"],
        &["--no-wait"],
        &["--ttl", "5000"],
        &["--timeout", "100"],
        &["--hold-at-least", "1s"],
    ] {
        for subcommand in [&["status", "k"][..], &["purge", "jobs:"]] {
            let mut args = flags.to_vec();
            args.extend(subcommand);
            let output = lockrun().args(&args).output().unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(
                output.status.code(),
                Some(78),
                "`lockrun {}` was not refused: {output:?}",
                args.join(" ")
            );
            assert!(stderr.contains(flags[0]), "the flag is not named: {stderr}");
        }
    }
}

//! The workspace's test binaries, built once by cargo and then run a few at a time.
//!
//! Most of the suite waits (on ttls, retry delays, servers starting, faults lifting) rather
//! than computes, and `cargo test` runs one binary after another: on two cores, two binaries at
//! once take about half the time. Each binary runs from its package's folder, as `cargo test`
//! runs it, with its output kept apart and printed whole when it ends; every binary runs even
//! after one failed, and the step fails naming each that failed. One that runs past
//! [`BINARY_LIMIT`] is killed and counts as failed (a hang would otherwise last until CI's own
//! limit).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::run::{cargo, workspace_root};

/// How long one test binary may run before it is killed.
const BINARY_LIMIT: Duration = Duration::from_secs(15 * 60);

/// The binaries that took longest in earlier runs, slowest first: they start first, so that
/// the last to finish is a short one. Ordering only: a name missing here (or stale) costs time,
/// never a test.
const SLOW_FIRST: [&str; 12] = [
    "attack_s15b",
    "conformance",
    "attack_s21a",
    "attack_s15c",
    "conformance_cluster",
    "attack_s15a",
    "attack_s14b",
    "attack_s20b",
    "model_inc",
    "fair",
    "valkey",
    "model_redlock",
];

/// One test binary to run.
struct Binary {
    /// `package/target`, as printed.
    name: String,
    /// The target's name alone (what [`SLOW_FIRST`] lists).
    target: String,
    executable: PathBuf,
    /// The package's folder: the binary runs there, as under `cargo test`.
    package_dir: PathBuf,
    args: Vec<String>,
}

/// What cargo says of each artifact it built (`--message-format json`), the fields read here.
#[derive(Deserialize)]
struct Message {
    reason: String,
    #[serde(default)]
    executable: Option<PathBuf>,
    #[serde(default)]
    manifest_path: Option<PathBuf>,
    #[serde(default)]
    target: Option<Target>,
    #[serde(default)]
    profile: Option<Profile>,
}

#[derive(Deserialize)]
struct Target {
    name: String,
    kind: Vec<String>,
}

#[derive(Deserialize)]
struct Profile {
    test: bool,
}

/// Builds the test binaries `cargo test <selection>` would run and lists them, each with `args`.
fn build(
    selection: &[&str],
    args: &[&str],
    envs: &[(&str, OsString)],
) -> Result<Vec<Binary>, String> {
    let mut command = cargo();
    command
        .args([
            "test",
            "--no-run",
            "--message-format",
            "json-render-diagnostics",
        ])
        .args(selection)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (key, value) in envs {
        command.env(key, value);
    }
    let output = command
        .output()
        .map_err(|error| format!("cannot start cargo test --no-run: {error}"))?;
    if !output.status.success() {
        return Err(format!(
            "cargo test --no-run {} failed ({})",
            selection.join(" "),
            output.status
        ));
    }
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        // Anything cargo prints that is not an artifact (build script output, say) is skipped.
        let Ok(message) = serde_json::from_str::<Message>(line) else {
            continue;
        };
        let (Some(executable), Some(manifest), Some(target), Some(profile)) = (
            message.executable,
            message.manifest_path,
            message.target,
            message.profile,
        ) else {
            continue;
        };
        if message.reason != "compiler-artifact" || !profile.test {
            continue;
        }
        let package_dir = manifest
            .parent()
            .map_or_else(workspace_root, Path::to_path_buf);
        let package = package_dir
            .file_name()
            .map_or_else(String::new, |name| name.to_string_lossy().into_owned());
        let kind = target.kind.join(",");
        let shown = if kind == "test" {
            target.name.clone()
        } else {
            format!("{} ({kind})", target.name)
        };
        binaries.push(Binary {
            name: format!("{package}/{shown}"),
            target: target.name,
            executable,
            package_dir,
            args: args.iter().map(|&arg| arg.to_owned()).collect(),
        });
    }
    if binaries.is_empty() {
        return Err(format!(
            "cargo test --no-run {} listed no test binary",
            selection.join(" ")
        ));
    }
    Ok(binaries)
}

/// How one binary's run ended.
struct Outcome {
    name: String,
    passed: bool,
    elapsed: Duration,
}

/// Builds the workspace's tests (and `extra`, selections that a plain `cargo test` leaves out,
/// each with its own arguments for the harness), then runs every binary, `jobs` at a time, with
/// `envs` set.
pub(crate) fn run(
    extra: &[(&[&str], &[&str])],
    envs: &[(&str, OsString)],
    jobs: usize,
) -> Result<(), String> {
    let started = Instant::now();
    println!("\n== build the tests");
    let mut binaries = build(&["--workspace"], &[], envs)?;
    for (selection, args) in extra {
        let selection: Vec<&str> = std::iter::once("--workspace")
            .chain(selection.iter().copied())
            .collect();
        binaries.extend(build(&selection, args, envs)?);
    }
    println!(
        "== built {} test binaries in {:.1} s; running {jobs} at a time",
        binaries.len(),
        started.elapsed().as_secs_f64()
    );
    binaries.sort_by_key(|binary| {
        let rank = SLOW_FIRST
            .iter()
            .position(|slow| *slow == binary.target)
            .unwrap_or(SLOW_FIRST.len());
        (rank, binary.name.clone())
    });
    let logs = workspace_target().join("xtask-tests");
    std::fs::create_dir_all(&logs)
        .map_err(|error| format!("cannot create {}: {error}", logs.display()))?;
    let queue = Arc::new(Mutex::new(binaries.into_iter().collect::<VecDeque<_>>()));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let envs: Arc<Vec<(String, OsString)>> = Arc::new(
        envs.iter()
            .map(|(key, value)| ((*key).to_owned(), value.clone()))
            .collect(),
    );
    let workers: Vec<_> = (0..jobs.max(1))
        .map(|worker| {
            let (queue, outcomes, envs, logs) = (
                Arc::clone(&queue),
                Arc::clone(&outcomes),
                Arc::clone(&envs),
                logs.clone(),
            );
            std::thread::spawn(move || {
                loop {
                    let next = queue
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .pop_front();
                    let Some(binary) = next else { break };
                    let log = logs.join(format!("worker-{worker}.log"));
                    let outcome = run_one(&binary, &envs, &log, BINARY_LIMIT);
                    outcomes
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(outcome);
                }
            })
        })
        .collect();
    for worker in workers {
        worker
            .join()
            .map_err(|_| "a test runner thread panicked".to_owned())?;
    }
    let outcomes = std::mem::take(
        &mut *outcomes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let failed: Vec<&Outcome> = outcomes.iter().filter(|outcome| !outcome.passed).collect();
    let busy: Duration = outcomes.iter().map(|outcome| outcome.elapsed).sum();
    println!(
        "\n== {} test binaries ran in {:.1} s ({:.1} s of binaries' time)",
        outcomes.len(),
        started.elapsed().as_secs_f64(),
        busy.as_secs_f64()
    );
    if failed.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{} test binar{} failed: {}",
        failed.len(),
        if failed.len() == 1 { "y" } else { "ies" },
        failed
            .iter()
            .map(|outcome| outcome.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// Runs one binary with its output in `log`, killed after `limit`, then prints the output whole.
fn run_one(binary: &Binary, envs: &[(String, OsString)], log: &Path, limit: Duration) -> Outcome {
    let started = Instant::now();
    let outcome = |passed: bool, note: &str| {
        let elapsed = started.elapsed();
        let output = std::fs::read_to_string(log).unwrap_or_default();
        // One block per binary, as cargo prints it, so that parallel runs do not interleave.
        let verdict = if passed { "ok" } else { "FAILED" };
        print!(
            "\n     Running {} ({})\n{output}== {}: {verdict}{note} in {:.1} s\n",
            binary.name,
            binary.executable.display(),
            binary.name,
            elapsed.as_secs_f64()
        );
        Outcome {
            name: binary.name.clone(),
            passed,
            elapsed,
        }
    };
    let spawned = File::create(log)
        .and_then(|file| Ok((file.try_clone()?, file)))
        .and_then(|(stdout, stderr)| {
            let mut command = Command::new(&binary.executable);
            command
                .args(&binary.args)
                .current_dir(&binary.package_dir)
                .env("CARGO_MANIFEST_DIR", &binary.package_dir)
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr);
            for (key, value) in envs {
                command.env(key, value);
            }
            command.spawn()
        });
    let mut child = match spawned {
        Ok(child) => child,
        Err(error) => return outcome(false, &format!(" (cannot start it: {error})")),
    };
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return outcome(true, ""),
            Ok(Some(status)) => return outcome(false, &format!(" ({status})")),
            Ok(None) if started.elapsed() > limit => {
                // Its servers and workers first: orphaned, they would run on through the suite.
                kill_descendants(child.id());
                let _ = child.kill();
                let _ = child.wait();
                return outcome(
                    false,
                    &format!(" (killed after {:.1} s)", limit.as_secs_f64()),
                );
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(error) => return outcome(false, &format!(" (cannot wait for it: {error})")),
        }
    }
}

/// Kills every process below `pid` (read from `/proc`; nothing where there is none), the
/// deepest first.
fn kill_descendants(pid: u32) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    // (pid, parent) of every process: the parent is the field after the command's `)`.
    let parents: Vec<(u32, u32)> = entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let (_, after) = stat.rsplit_once(')')?;
            let parent = after.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, parent))
        })
        .collect();
    let mut below = vec![pid];
    let mut index = 0;
    while let Some(&parent) = below.get(index) {
        below.extend(
            parents
                .iter()
                .filter(|&&(_, of)| of == parent)
                .map(|&(child, _)| child),
        );
        index += 1;
    }
    for descendant in below.iter().skip(1).rev() {
        let _ = Command::new("kill")
            .args(["-KILL", &descendant.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// The target folder the tests were built in.
fn workspace_target() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binary(executable: &str, args: &[&str]) -> Binary {
        Binary {
            name: executable.to_owned(),
            target: executable.to_owned(),
            executable: PathBuf::from(executable),
            package_dir: std::env::temp_dir(),
            args: args.iter().map(|&arg| arg.to_owned()).collect(),
        }
    }

    fn log(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("xtask-suite-{}-{name}.log", std::process::id()))
    }

    #[test]
    fn a_binary_that_fails_fails_and_one_that_passes_passes() {
        let limit = Duration::from_secs(30);
        let envs = [("XTASK_SUITE_PROBE".to_owned(), OsString::from("seen"))];
        let failed = run_one(&binary("sh", &["-c", "exit 3"]), &envs, &log("fail"), limit);
        assert!(!failed.passed);
        let passed = run_one(
            &binary("sh", &["-c", r#"test "$XTASK_SUITE_PROBE" = seen && pwd"#]),
            &envs,
            &log("pass"),
            limit,
        );
        assert!(passed.passed, "the environment reaches the binary");
        let missing = run_one(
            &binary("/nonexistent/binary", &[]),
            &envs,
            &log("gone"),
            limit,
        );
        assert!(!missing.passed);
    }

    #[test]
    fn a_binary_past_its_limit_is_killed_as_failed_with_what_it_started() {
        let started = Instant::now();
        let marker = log("child-pid");
        // A shell that starts a long child (as a test binary starts servers) and waits.
        let script = format!("sleep 30 & echo $! > {}; wait", marker.display());
        let hung = run_one(
            &binary("sh", &["-c", &script]),
            &[],
            &log("hung"),
            Duration::from_millis(500),
        );
        assert!(!hung.passed);
        assert!(started.elapsed() < Duration::from_secs(10));
        let child = std::fs::read_to_string(&marker).unwrap_or_default();
        let child = child.trim();
        assert!(!child.is_empty(), "the shell started its child");
        // Killed (a zombie at most, until its new parent reaps it). A SIGKILL takes effect
        // when the child next runs: on a busy machine that can be a moment after the kill.
        let alive = || {
            std::fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|stat| {
                !stat
                    .rsplit_once(')')
                    .is_some_and(|(_, s)| s.trim_start().starts_with('Z'))
            })
        };
        let killed = Instant::now();
        while alive() && killed.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            !alive(),
            "the child {child} of the killed binary still runs"
        );
    }
}

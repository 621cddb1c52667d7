//! `lockrun`'s documentation, checked by running it: every flag and subcommand of
//! `lockrun --help` is used by a test, and every `lockrun` line of the READMEs runs as written
//! against real redis-servers.
#![cfg(all(feature = "redlock", feature = "inc", feature = "cli"))]
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lock_tests::server::{RedisServer, redis_or_skip};

mod support;
use support::{LOCKRUN, code};

/// The sources of the tests that run lockrun: a flag is tested when one of them passes it.
const TEST_SOURCES: [&str; 4] = [
    include_str!("lockrun.rs"),
    include_str!("lockrun_supervision.rs"),
    include_str!("lockrun_docs.rs"),
    include_str!("lockrun_kinds.rs"),
];

const READMES: [(&str, &str); 2] = [
    ("README.md", include_str!("../../README.md")),
    ("lock-facade/README.md", include_str!("../README.md")),
];

/// The URL the READMEs use for a local server; the test points it at its own.
const README_URL: &str = "redis://127.0.0.1:6379/";

/// The long flags and subcommands that `help` lists.
fn listed(help: &str) -> (Vec<String>, Vec<String>) {
    let mut flags = Vec::new();
    let mut subcommands = Vec::new();
    let mut in_commands = false;
    for line in help.lines() {
        if line.trim_end().ends_with(':') && !line.starts_with(' ') {
            in_commands = line.starts_with("Commands:");
            continue;
        }
        if in_commands {
            if let Some(name) = line.split_whitespace().next() {
                subcommands.push(name.to_owned());
            }
            continue;
        }
        // An option line: "  -h, --help", "      --ttl <MS>  …".
        let Some(option) = line.trim_start().strip_prefix('-') else {
            continue;
        };
        if let Some(flag) = option
            .split([' ', ','])
            .chain(line.split_whitespace())
            .find(|word| word.starts_with("--"))
        {
            flags.push(flag.trim_end_matches(',').to_owned());
        }
    }
    (flags, subcommands)
}

fn lockrun_help(args: &[&str]) -> String {
    let output = Command::new(LOCKRUN).args(args).output().unwrap();
    assert_eq!(code(&output), 0, "{output:?}");
    String::from_utf8(output.stdout).unwrap()
}

/// Every flag and subcommand in `lockrun --help` (and the subcommands' own help) is passed
/// to lockrun by some test, as a string literal of its own.
#[test]
fn every_flag_and_subcommand_in_help_is_tested() {
    let help = lockrun_help(&["--help"]);
    let (mut flags, subcommands) = listed(&help);
    assert!(
        subcommands == ["purge", "status"],
        "subcommands changed: {subcommands:?}; give each a test and update this list"
    );
    for subcommand in &subcommands {
        let (own, _) = listed(&lockrun_help(&[subcommand, "--help"]));
        flags.extend(own);
    }
    flags.sort();
    flags.dedup();
    println!("lockrun --help lists {flags:?} and subcommands {subcommands:?}");
    assert!(
        flags.len() >= 10,
        "too few flags found in --help: {flags:?}"
    );
    let version = Command::new(LOCKRUN).arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("lockrun {}", env!("CARGO_PKG_VERSION"))
    );
    let readme_lines: Vec<String> = readme_lines().into_iter().map(|(_, line)| line).collect();
    let untested: Vec<&String> = flags
        .iter()
        .chain(&subcommands)
        .filter(|name| {
            let literal = format!("\"{name}\"");
            let in_tests = TEST_SOURCES.iter().any(|source| source.contains(&literal));
            let in_readme = readme_lines
                .iter()
                .any(|line| line.split_whitespace().any(|word| word == name.as_str()));
            !in_tests && !in_readme
        })
        .collect();
    assert!(
        untested.is_empty(),
        "lockrun --help lists {untested:?}, which no test passes to lockrun"
    );
}

/// `--wait` waits for a held lock; `--config` takes a file as well as inline text.
#[test]
fn explicit_wait_and_a_configuration_file() {
    let Some(binary) = redis_or_skip("lockrun") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lock.toml");
    std::fs::write(
        &file,
        format!(
            "type = \"redlock\"\nurls = [\"{}\"]\nretryDelay = 5\n",
            server.url()
        ),
    )
    .unwrap();
    let config = file.to_str().unwrap();
    let log = dir.path().join("log");
    let holder = Command::new(LOCKRUN)
        .args(["--config", config, "w", "--", "sh", "-c"])
        .arg(format!(
            "echo first >> '{0}'; sleep 0.5; echo first-done >> '{0}'",
            log.display()
        ))
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let waiter = Command::new(LOCKRUN)
        .args(["--config", config, "--wait", "w", "--", "sh", "-c"])
        .arg(format!("echo second >> '{}'", log.display()))
        .output()
        .unwrap();
    assert_eq!(code(&waiter), 0, "{waiter:?}");
    assert_eq!(holder.wait_with_output().unwrap().status.code(), Some(0));
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "first\nfirst-done\nsecond\n",
        "--wait entered before the holder left"
    );
}

/// The `lockrun` command lines of the READMEs' `sh` blocks (`export LOCK_CONFIG=…` lines
/// included), comments removed, with the file they come from.
fn readme_lines() -> Vec<(&'static str, String)> {
    let mut lines = Vec::new();
    for (name, text) in READMES {
        let mut in_sh = false;
        for line in text.lines() {
            if line.starts_with("```") {
                in_sh = line == "```sh";
                continue;
            }
            if !in_sh {
                continue;
            }
            let command = line.split("  #").next().unwrap_or(line).trim();
            let runs_lockrun = command
                .split_whitespace()
                .find(|word| !word.contains('='))
                .is_some_and(|program| program == "lockrun");
            if runs_lockrun || command.starts_with("export LOCK_CONFIG=") {
                lines.push((name, command.to_owned()));
            }
        }
    }
    lines
}

/// A folder laid out as the READMEs assume: `lock.json` for the Redlock servers, and the
/// scripts they run, each appending its name and arguments to `ran.log`.
struct Site {
    dir: tempfile::TempDir,
    servers: Vec<RedisServer>,
    path: String,
}

impl Site {
    fn new(binary: &Path) -> Self {
        let servers: Vec<RedisServer> = (0..3)
            .map(|_| RedisServer::start(binary, &[]).unwrap())
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
        std::fs::write(
            dir.path().join("lock.json"),
            serde_json::json!({"type": "redlock", "urls": urls}).to_string(),
        )
        .unwrap();
        for script in ["make-report.sh", "migrate.sh", "job.sh"] {
            let path = dir.path().join(script);
            std::fs::write(
                &path,
                format!("#!/bin/sh\necho {script} \"$@\" >> ran.log\n"),
            )
            .unwrap();
            Command::new("chmod").arg("+x").arg(&path).status().unwrap();
        }
        let bin_dir = PathBuf::from(LOCKRUN).parent().unwrap().to_owned();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Self { dir, servers, path }
    }

    /// `sh -c` running `exports` then `line` (by `exec` when it starts with lockrun, so that
    /// the child is lockrun itself), in the site's folder.
    fn command(&self, exports: &[String], line: &str) -> Command {
        let line = line.replace(README_URL, &self.servers[0].url());
        let run = if line.starts_with("lockrun ") {
            format!("exec {line}")
        } else {
            line
        };
        let mut script = exports.join("\n");
        script.push('\n');
        script.push_str(&run);
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(script)
            .current_dir(self.dir.path())
            .env("PATH", &self.path)
            .env_remove("LOCK_CONFIG");
        command
    }

    fn ran(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("ran.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn status(&self, exports: &[String], key: &str) -> serde_json::Value {
        let output = self
            .command(exports, &format!("lockrun status --json {key}"))
            .output()
            .unwrap();
        assert_eq!(code(&output), 0, "{output:?}");
        serde_json::from_slice(&output.stdout).unwrap()
    }
}

fn states(status: &serde_json::Value) -> Vec<String> {
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|node| node["state"].as_str().unwrap().to_owned())
        .collect()
}

/// Every `lockrun` line of the READMEs, run as written, with what it must do.
#[test]
fn readme_command_lines_run_against_real_servers() {
    let Some(binary) = redis_or_skip("lockrun") else {
        return;
    };
    let site = Site::new(&binary);
    let lines = readme_lines();
    assert!(lines.len() >= 6, "{lines:?}");
    let mut exports = Vec::new();
    for (readme, line) in &lines {
        if line.starts_with("export ") {
            exports.push(line.clone());
            continue;
        }
        let context = format!("{readme}: `{line}`");
        match line.as_str() {
            "lockrun nightly-report -- ./make-report.sh --full" => {
                let output = site.command(&exports, line).output().unwrap();
                assert_eq!(code(&output), 0, "{context}: {output:?}");
                assert!(
                    site.ran().contains(&"make-report.sh --full".to_owned()),
                    "{context}"
                );
            }
            "lockrun --no-wait --hold-at-least 10m nightly-report -- ./make-report.sh" => {
                let before = site.ran().len();
                let mut first = site
                    .command(&exports, line)
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                let deadline = Instant::now() + Duration::from_secs(10);
                while site.ran().len() == before {
                    assert!(Instant::now() < deadline, "{context}: the report never ran");
                    std::thread::sleep(Duration::from_millis(20));
                }
                // The report is done; the lock stays held, so the same line elsewhere runs nothing.
                std::thread::sleep(Duration::from_millis(300));
                let held = states(&site.status(&exports, "nightly-report"))
                    .iter()
                    .filter(|s| *s == "held")
                    .count();
                assert!(held >= 2, "{context}: held on {held} node(s) of 3");
                let again = site.command(&exports, line).output().unwrap();
                assert_eq!(code(&again), 75, "{context}: ran twice: {again:?}");
                assert_eq!(site.ran().len(), before + 1, "{context}");
                // Stopping the hold early: SIGTERM releases the lock, exit 143.
                let kill = Command::new("kill")
                    .args(["-TERM", &first.id().to_string()])
                    .status()
                    .unwrap();
                assert!(kill.success());
                assert_eq!(first.wait().unwrap().code(), Some(143), "{context}");
                // Released, not left to expire: a majority is free at once (a slower node hears
                // the release off lockrun's path), so the next run gets in.
                let states = states(&site.status(&exports, "nightly-report"));
                assert!(
                    states.iter().filter(|state| *state == "free").count() >= 2,
                    "{context}: {states:?}"
                );
                let next = site
                    .command(&exports, "lockrun --no-wait nightly-report -- true")
                    .output()
                    .unwrap();
                assert_eq!(code(&next), 0, "{context}: not released: {next:?}");
            }
            "lockrun --ttl 30000 --kill-grace 5s migrate -- ./migrate.sh" => {
                let output = site.command(&exports, line).output().unwrap();
                assert_eq!(code(&output), 0, "{context}: {output:?}");
                assert!(site.ran().contains(&"migrate.sh".to_owned()), "{context}");
            }
            "lockrun --permits 3 thumbnails -- ./job.sh"
            | "lockrun --shared catalog -- ./job.sh" => {
                let before = site.ran().len();
                let output = site.command(&exports, line).output().unwrap();
                assert_eq!(code(&output), 0, "{context}: {output:?}");
                assert_eq!(site.ran().len(), before + 1, "{context}");
            }
            "lockrun --exclusive catalog -- ./migrate.sh" => {
                // A reader holds `catalog` for a moment: the writer waits for it, then runs.
                let reader = site
                    .command(
                        &exports,
                        "lockrun --shared catalog -- sh -c 'touch reader-in; sleep 0.5'",
                    )
                    .spawn()
                    .unwrap();
                let reader_in = site.dir.path().join("reader-in");
                let deadline = Instant::now() + Duration::from_secs(10);
                while !reader_in.exists() {
                    assert!(Instant::now() < deadline, "{context}: the reader never ran");
                    std::thread::sleep(Duration::from_millis(10));
                }
                let started = Instant::now();
                let output = site.command(&exports, line).output().unwrap();
                assert_eq!(code(&output), 0, "{context}: {output:?}");
                assert!(site.ran().contains(&"migrate.sh".to_owned()), "{context}");
                let mut reader = reader;
                assert_eq!(reader.wait().unwrap().code(), Some(0), "{context}");
                assert!(
                    started.elapsed() >= Duration::from_millis(300),
                    "{context}: the writer ran beside the reader"
                );
            }
            "lockrun status --json nightly-report" => {
                let output = site.command(&exports, line).output().unwrap();
                assert_eq!(code(&output), 0, "{context}: {output:?}");
                let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
                assert_eq!(status["key"], "nightly-report", "{context}");
                // Released by the earlier lines: free on a majority (a slower node may still be
                // hearing the last release).
                let free = states(&status).iter().filter(|s| *s == "free").count();
                assert!(free >= 2, "{context}: {status}");
            }
            r#"lockrun --config '{"type": "inc", "urls": ["redis://127.0.0.1:6379/"]}' purge jobs:"# =>
            {
                let output = site.command(&exports, line).output().unwrap();
                assert_eq!(code(&output), 0, "{context}: {output:?}");
                let stdout = String::from_utf8_lossy(&output.stdout);
                assert!(
                    stdout.contains("lock(s) under `jobs:`"),
                    "{context}: {stdout}"
                );
            }
            r#"LOCK_CONFIG='{"type": "inc", "urls": ["redis://127.0.0.1:6379/"]}' lockrun --no-wait job:42 -- ./job.sh"# =>
            {
                let output = site.command(&exports, line).output().unwrap();
                assert_eq!(code(&output), 0, "{context}: {output:?}");
                assert!(site.ran().contains(&"job.sh".to_owned()), "{context}");
            }
            other => panic!("{readme}: `{other}` has no scenario in this test: add one"),
        }
    }
}

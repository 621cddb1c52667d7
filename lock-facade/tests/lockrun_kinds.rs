//! `lockrun --permits N`, `--shared` and `--exclusive`, as separate processes against real
//! redis-servers: the same supervision as the mutex, under a semaphore or a read-write lock.
#![cfg(all(feature = "redlock", feature = "inc", feature = "cli"))]
#![allow(clippy::unwrap_used)]

use std::path::Path;

use lock_tests::server::{RedisServer, redis_or_skip};

mod support;
use support::{code, lockrun_with};

fn configs(server: &RedisServer) -> Vec<(&'static str, String)> {
    let retry = serde_json::json!({"retryCount": -1, "retryDelay": 5, "retryJitter": 5});
    let mut redlock = serde_json::json!({"type": "redlock", "urls": [server.url()]});
    let mut inc = serde_json::json!({"type": "inc", "urls": [server.url()]});
    for config in [&mut redlock, &mut inc] {
        for (field, value) in retry.as_object().unwrap() {
            config[field] = value.clone();
        }
    }
    vec![("redis", redlock.to_string()), ("inc", inc.to_string())]
}

/// A section that logs `start <tag> <pid>` and `end <tag> <pid>` around a sleep.
fn section(log: &Path, tag: &str) -> String {
    format!(
        "echo start {tag} $$ >> {0}; sleep 0.25; echo end {tag} $$ >> {0}",
        log.display()
    )
}

/// The most sections of each tag that were running at once, read from the log.
fn most_at_once(log: &Path) -> std::collections::HashMap<String, usize> {
    let mut running = std::collections::HashMap::<String, usize>::new();
    let mut most = std::collections::HashMap::new();
    let text = std::fs::read_to_string(log).unwrap();
    let mut writers_with_others = Vec::new();
    for line in text.lines() {
        let mut words = line.split(' ');
        let (edge, tag) = (words.next().unwrap(), words.next().unwrap().to_owned());
        let count = running.entry(tag.clone()).or_default();
        if edge == "start" {
            *count += 1;
            let now = *count;
            let best: &mut usize = most.entry(tag.clone()).or_default();
            *best = (*best).max(now);
            let total: usize = running.values().sum();
            if running.get("w").copied().unwrap_or(0) > 0 && total > 1 {
                writers_with_others.push(line.to_owned());
            }
        } else {
            *count -= 1;
        }
    }
    assert!(
        writers_with_others.is_empty(),
        "a writer ran beside another run: {writers_with_others:?}\n{text}"
    );
    most
}

#[test]
fn at_most_n_runs_hold_a_semaphore() {
    let Some(binary) = redis_or_skip("lockrun_kinds") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    for (backend, config) in configs(&server) {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let script = section(&log, "p");
        let runs: Vec<_> = (0..6)
            .map(|_| {
                lockrun_with(
                    &config,
                    &["--permits", "2", "pool", "--", "sh", "-c", &script],
                )
                .spawn()
                .unwrap()
            })
            .collect();
        for run in runs {
            let output = run.wait_with_output().unwrap();
            assert_eq!(code(&output), 0, "{backend}: {output:?}");
        }
        let most = most_at_once(&log);
        assert_eq!(
            most["p"], 2,
            "{backend}: the most runs at once under 2 permits"
        );
    }
}

#[test]
fn shared_runs_go_together_and_an_exclusive_run_alone() {
    let Some(binary) = redis_or_skip("lockrun_kinds") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    for (backend, config) in configs(&server) {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let (read, write) = (section(&log, "r"), section(&log, "w"));
        let mut runs = Vec::new();
        for round in 0..4 {
            let (flag, script) = if round == 2 {
                ("--exclusive", &write)
            } else {
                ("--shared", &read)
            };
            runs.push(
                lockrun_with(&config, &[flag, "data", "--", "sh", "-c", script])
                    .spawn()
                    .unwrap(),
            );
            if round == 1 {
                runs.push(
                    lockrun_with(&config, &["--shared", "data", "--", "sh", "-c", &read])
                        .spawn()
                        .unwrap(),
                );
            }
        }
        for run in runs {
            let output = run.wait_with_output().unwrap();
            assert_eq!(code(&output), 0, "{backend}: {output:?}");
        }
        let most = most_at_once(&log);
        assert!(
            most["r"] >= 2,
            "{backend}: readers never ran together: {most:?}"
        );
        assert_eq!(most["w"], 1, "{backend}");
    }
}

#[test]
fn bad_kinds_are_configuration_errors() {
    let Some(binary) = redis_or_skip("lockrun_kinds") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    for (backend, config) in configs(&server) {
        let zero = lockrun_with(&config, &["--permits", "0", "k", "--", "true"])
            .output()
            .unwrap();
        assert_eq!(code(&zero), 78, "{backend}: {zero:?}");
        assert!(
            String::from_utf8_lossy(&zero.stderr).contains("permits"),
            "{backend}: {zero:?}"
        );
        let both = lockrun_with(&config, &["--permits", "2", "--shared", "k", "--", "true"])
            .output()
            .unwrap();
        assert_eq!(code(&both), 78, "{backend}: {both:?}");

        let dir = tempfile::tempdir().unwrap();
        let ready = dir.path().join("ready");
        let hold = format!("touch {}; sleep 2", ready.display());
        let mut holder = lockrun_with(
            &config,
            &["--permits", "2", "sized", "--", "sh", "-c", &hold],
        )
        .spawn()
        .unwrap();
        while !ready.exists() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let mismatch = lockrun_with(&config, &["--permits", "3", "sized", "--", "true"])
            .output()
            .unwrap();
        assert_eq!(code(&mismatch), 78, "{backend}: {mismatch:?}");
        assert!(
            String::from_utf8_lossy(&mismatch.stderr).contains("2 permit"),
            "{backend}: {mismatch:?}"
        );
        assert_eq!(holder.wait().unwrap().code(), Some(0));
    }
}

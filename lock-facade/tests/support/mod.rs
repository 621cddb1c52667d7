//! Helpers shared by the test files that run `lockrun` (`mod support;`). Each test file is a
//! crate of its own and uses some of them only, hence `dead_code` allowed.
#![allow(dead_code, clippy::unwrap_used)]

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use lock_tests::server::RedisServer;

/// The `lockrun` binary cargo built for these tests.
pub(crate) const LOCKRUN: &str = env!("CARGO_BIN_EXE_lockrun");

/// lockrun with no configuration from the environment (`LOCK_CONFIG` removed): what it reads
/// is what the test gives it (`--config`, or the memory backend with none).
pub(crate) fn lockrun() -> Command {
    let mut command = Command::new(LOCKRUN);
    command.env_remove("LOCK_CONFIG");
    command
}

/// lockrun with `LOCK_CONFIG` set to `config`, and `args`.
pub(crate) fn lockrun_with(config: &str, args: &[&str]) -> Command {
    let mut command = Command::new(LOCKRUN);
    command.env("LOCK_CONFIG", config).args(args);
    command
}

/// The exit code, -1 for a death by a signal.
pub(crate) fn code(output: &Output) -> i32 {
    output.status.code().unwrap_or(-1)
}

/// What a run printed: its stdout, then its stderr.
pub(crate) fn shown(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The URLs of `servers`.
pub(crate) fn urls(servers: &[RedisServer]) -> Vec<String> {
    servers.iter().map(RedisServer::url).collect()
}

/// A Redlock configuration on `urls` that waits for the lock without end, in short steps.
pub(crate) fn redlock_config(urls: &[String]) -> String {
    serde_json::json!({"type": "redlock", "urls": urls, "retryCount": -1, "retryDelay": 5, "retryJitter": 5}).to_string()
}

/// Sends `signal` (a name: `INT`, `TERM`, …) to the process `pid` with `kill`.
pub(crate) fn send(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal}");
}

/// Waits up to 10 s, in steps of 10 ms, for `done`; panics naming `what` if it never is.
pub(crate) fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

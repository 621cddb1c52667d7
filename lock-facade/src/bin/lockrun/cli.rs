//! The command line: arguments, configuration, exit codes, `purge` and `status`.

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use lock_facade::{
    CONFIG_ENV, Holding, KeyState, LeaseKind, LockConfig, LockError, Locker, create,
};

use crate::supervise::{self, Timing};

/// The exit codes, besides the command's own.
pub(crate) mod exit {
    /// Held by someone else, with `--no-wait`.
    pub(crate) const LOCKED: u8 = 75;
    /// Gave up waiting: retries or `--timeout` ran out.
    pub(crate) const TIMED_OUT: u8 = 76;
    /// The lock was lost (or about to be) while the command ran; its group was killed.
    pub(crate) const LOST: u8 = 77;
    /// Bad configuration or arguments.
    pub(crate) const CONFIG: u8 = 78;
    /// The backend failed (unreachable, protocol error…).
    pub(crate) const BACKEND: u8 = 69;
    /// The command could not be started.
    pub(crate) const CANNOT_RUN: u8 = 127;
}

const EXIT_CODES: &str = "\
Exit codes (the first that applies):
  77      the lock was lost while the command ran, or its renewal failed until too little
          validity was left; the command's process group was killed before the validity
          ended. Also when the command exited 0, or the release found the lock gone; and
          when the lock came with no more validity than the kill grace and margin (the
          command is then not started)
  128+N   lockrun received signal N (HUP 129, INT 130, QUIT 131, TERM 143): it forwarded it
          to the command's process group, waited for the group (SIGKILL after --kill-grace)
          and released the lock
  N       the command's own exit code, passed through exactly
  128+N   the command died of signal N
  75      the lock is held by someone else (--no-wait)
  76      gave up waiting (retries or --timeout ran out)
  78      bad configuration or arguments
  69      the backend failed (unreachable, protocol error); for status, no node answered
  127     the command could not be started

The command runs in a process group of its own, with LOCK_KEY set to the lock's key and,
where the backend hands out fencing tokens (inc, or Redlock with \"fencing\": true),
LOCK_FENCING_TOKEN set to this holder's token: pass it to the resource so that it can refuse
older holders. If renewal keeps failing, the group gets SIGTERM when the lock's validity left
falls to the kill grace plus a margin of ttl/20, and SIGKILL when the grace runs out, so that
no process of the command is alive when the validity ends. When the command exits, processes
it left behind in its group get the same SIGTERM, grace, SIGKILL before the lock is released.

DURATION is a number with a unit: ms, s, m or h (500ms, 30s, 10m); a bare number is ms.

The configuration comes from --config (a file path, or inline JSON or TOML) or else from the
LOCK_CONFIG environment variable. A URL with a password belongs in a file (or LOCK_CONFIG):
inline in --config, it is in lockrun's command line, which every local user can read (ps).
Running a command needs a backend shared between processes
(redis, redlock, inc): the in-process memory backend, the default with neither, is refused
(78) since it would keep no other run out.

A key named like a subcommand (status, purge) cannot be followed by `-- COMMAND`: that is
refused (78) as ambiguous; give such a key a namespace or another name. The subcommands read
--config only: any other flag given to them is refused (78).";

#[derive(Debug, Parser)]
#[command(
    name = "lockrun",
    version,
    about = "Run a command while holding a lock; the command never outlives the lock",
    after_help = EXIT_CODES,
    subcommand_negates_reqs = true,
    disable_help_subcommand = true
)]
struct Cli {
    /// Configuration: a .json/.toml file, or inline JSON or TOML (default: $LOCK_CONFIG).
    #[arg(long, global = true, value_name = "FILE|JSON")]
    config: Option<String>,
    /// Fail at once (exit 75) if the lock is held, instead of waiting.
    #[arg(long, conflicts_with = "wait")]
    no_wait: bool,
    /// Wait until the lock is free (bounded by --timeout or the configuration's deadline),
    /// whatever retry count the configuration or the backend's default sets (inc's default is
    /// a single attempt). A backend that no majority of nodes answers when lockrun starts
    /// exits 69 at once; one that fails during the wait is waited for. Without --wait or
    /// --no-wait the configuration's retry policy decides.
    #[arg(long)]
    wait: bool,
    /// Lock lifetime in ms; the lock is extended while the command runs (a third of the ttl
    /// before it expires).
    #[arg(long, value_name = "MS")]
    ttl: Option<i64>,
    /// Longest wait for the lock, in ms (waits until it is free when unset and retries are
    /// unbounded).
    #[arg(long, value_name = "MS")]
    timeout: Option<i64>,
    /// Time between SIGTERM and SIGKILL to the command's process group, when the lock is about
    /// to be lost, a signal was forwarded or the command left processes behind [default:
    /// ttl/8; at most ttl/5]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    kill_grace: Option<Duration>,
    /// Keep the lock at least this long after the command started, even if it ends sooner (a
    /// job fired on several machines with skewed clocks runs once); lockrun stays until then.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    hold_at_least: Option<Duration>,
    /// Run under one of N permits of the semaphore KEY instead of a mutex: at most N runs at
    /// once. Every run on KEY must give the same N (another N is refused, 78).
    #[arg(long, value_name = "N", conflicts_with = "shared")]
    permits: Option<u32>,
    /// Run under the read (shared) side of the read-write lock KEY: runs with --shared go
    /// together, a run with --exclusive waits for them all and keeps new ones out meanwhile.
    #[arg(long, conflicts_with = "exclusive")]
    shared: bool,
    /// Run under the write (exclusive) side of the read-write lock KEY: alone, once every
    /// shared run has ended; while it waits, no new shared run starts.
    #[arg(long, conflicts_with = "permits")]
    exclusive: bool,
    /// The key to lock.
    #[arg(required = true)]
    key: Option<String>,
    /// The command and its arguments, after `--` (any bytes: a file name need not be UTF-8).
    #[arg(last = true, required = true)]
    command: Vec<OsString>,
    #[command(subcommand)]
    action: Option<Action>,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Remove every lock under PREFIX (backends that can purge, such as inc).
    Purge {
        /// The key prefix.
        prefix: String,
    },
    /// Show, per node, whether KEY is held and for how long (never the token).
    Status {
        /// One JSON object: {"key", "nodes": [{"node", "state": held|free|unknown,
        /// "ttl_ms", "error"}]}.
        #[arg(long)]
        json: bool,
        /// The key.
        key: String,
    },
}

/// Parses `500ms`, `30s`, `10m`, `1h`, or a bare number of milliseconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration such as 500ms, 30s, 10m or 1h"))?;
    let millis_per_unit: u64 = match unit.trim() {
        "" | "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{text}`: use ms, s, m or h"
            ));
        }
    };
    number
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("`{text}` is too long"))
}

/// What a subcommand or a run ends with: an exit code, or one with a message for stderr.
pub(crate) type Outcome = Result<u8, (u8, String)>;

pub(crate) fn main() -> ExitCode {
    // `args_os`: `std::env::args` panics on an argument that is not UTF-8, quoting it whole (a
    // `--config` password with an odd byte in it). Such a flag or key is refused by clap below,
    // without quoting it; a command argument is passed on as it is.
    let args = std::env::args_os()
        .skip(1)
        .map(|arg| arg.to_string_lossy().into_owned());
    if let Some(message) = ambiguous_subcommand(args) {
        say!("lockrun: {message}");
        return ExitCode::from(exit::CONFIG);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let code = if error.use_stderr() { exit::CONFIG } else { 0 };
            let _ = error.print();
            return ExitCode::from(code);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            say!("lockrun: cannot start the async runtime: {error}");
            return ExitCode::from(exit::BACKEND);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err((code, message)) => {
            say!("lockrun: {message}");
            ExitCode::from(code)
        }
    }
}

/// The flags given that only running a command reads (all but `--config`).
fn run_only_flags(cli: &Cli) -> Vec<&'static str> {
    [
        ("--no-wait", cli.no_wait),
        ("--wait", cli.wait),
        ("--ttl", cli.ttl.is_some()),
        ("--timeout", cli.timeout.is_some()),
        ("--kill-grace", cli.kill_grace.is_some()),
        ("--hold-at-least", cli.hold_at_least.is_some()),
        ("--permits", cli.permits.is_some()),
        ("--shared", cli.shared),
        ("--exclusive", cli.exclusive),
    ]
    .into_iter()
    .filter_map(|(flag, given)| given.then_some(flag))
    .collect()
}

async fn run(cli: Cli) -> Outcome {
    if let Some(action) = &cli.action {
        // A flag the subcommand would not read is a mistake to report, not to ignore.
        let ignored = run_only_flags(&cli);
        if !ignored.is_empty() {
            let name = match action {
                Action::Purge { .. } => "purge",
                Action::Status { .. } => "status",
            };
            return Err((
                exit::CONFIG,
                format!(
                    "{} appl{} to running a command (lockrun KEY -- COMMAND), not to `{name}`",
                    ignored.join(", "),
                    if ignored.len() == 1 { "ies" } else { "y" }
                ),
            ));
        }
    }
    let base = match &cli.config {
        Some(text) => LockConfig::from_text(text),
        None => LockConfig::from_env(),
    }
    // Its nested `lockConfig` is expanded before the flags are laid over it.
    .and_then(LockConfig::resolve)
    .map_err(config_error)?;
    let mut overrides = LockConfig {
        ttl: cli.ttl,
        ..LockConfig::default()
    };
    overrides.retry.deadline = cli.timeout;
    if cli.no_wait {
        overrides.retry.retry_count = Some(0);
    } else if cli.wait {
        // Asked for by name: a configured count, or a backend's single attempt, would end the
        // wait while the lock is still held.
        overrides.retry.retry_count = Some(-1);
    } else if base.retry.retry_count.is_none() && cli.timeout.is_some() {
        // A timeout bounds the wait; the retry count should not cut it shorter.
        overrides.retry.retry_count = Some(-1);
    }
    let locker = create(overrides.merged_over(base))
        .await
        .map_err(config_error)?;
    let outcome = match cli.action {
        Some(Action::Purge { prefix }) => purge(&locker, &prefix).await,
        Some(Action::Status { key, json }) => status(&locker, &key, json).await,
        // A lock in this process excludes nobody else: no other lockrun can see it.
        None if !locker.capabilities().distributed => Err((
            exit::CONFIG,
            format!(
                "the `{}` backend holds locks inside one process only, so it cannot keep other lockrun runs out: name a shared backend (redis, redlock, inc) with --config or {CONFIG_ENV}",
                locker.backend().name()
            ),
        )),
        None => match Timing::new(locker.options().ttl(), cli.kill_grace)
            .and_then(|timing| Ok((timing, lease_kind(&cli)?)))
        {
            Ok((timing, kind)) => {
                let key = cli.key.unwrap_or_default();
                if cli.wait {
                    reachable(&locker, &key).await?;
                }
                let run = supervise::Run {
                    key: &key,
                    kind,
                    command: &cli.command,
                    no_wait: cli.no_wait,
                    timing,
                    hold_at_least: cli.hold_at_least.unwrap_or_default(),
                };
                supervise::run_locked(&locker, run).await
            }
            Err(message) => Err((exit::CONFIG, message)),
        },
    };
    let _ = locker.stop().await;
    outcome
}

/// The kind of lease the flags ask for: a mutex unless `--permits`, `--shared` or
/// `--exclusive`.
fn lease_kind(cli: &Cli) -> Result<LeaseKind, String> {
    match (cli.permits, cli.shared, cli.exclusive) {
        (Some(permits), _, _) => LeaseKind::permit(permits).map_err(|error| error.to_string()),
        (None, true, _) => Ok(LeaseKind::Read),
        (None, false, true) => Ok(LeaseKind::Write),
        (None, false, false) => Ok(LeaseKind::Exclusive),
    }
}

/// True for a long flag of lockrun that takes its value as the next word (read from the
/// argument definitions, so a new flag cannot be forgotten here).
fn takes_value(flag: &str) -> bool {
    use clap::CommandFactory;
    let Some(long) = flag.strip_prefix("--") else {
        return false;
    };
    Cli::command()
        .get_arguments()
        .any(|arg| arg.get_long() == Some(long) && arg.get_action().takes_values())
}

/// `lockrun status -- CMD` or `lockrun purge -- CMD`: a subcommand, or a key of that name
/// followed by a command? Refused rather than guessed (a guess the wrong way would silently
/// skip a job).
fn ambiguous_subcommand(args: impl Iterator<Item = String>) -> Option<String> {
    let args: Vec<String> = args.collect();
    let mut rest = args.iter().map(String::as_str);
    while let Some(arg) = rest.next() {
        match arg {
            // A flag whose value is the next word (`--permits 2`): the value is not the key.
            flag if takes_value(flag) => {
                rest.next();
            }
            flag if flag.starts_with('-') => {}
            subcommand @ ("status" | "purge") => {
                let after: Vec<&str> = rest.collect();
                let command = after.iter().position(|arg| *arg == "--");
                return command
                    .filter(|at| after.len() > at + 1)
                    .map(|_| format!("`{subcommand}` is a subcommand, and `--` then names a command: ambiguous (to run a command under a lock named `{subcommand}`, use a namespace or another key)"));
            }
            _ => return None,
        }
    }
    None
}

fn config_error(error: LockError) -> (u8, String) {
    let code = match error {
        LockError::Backend { .. } => exit::BACKEND,
        _ => exit::CONFIG,
    };
    (
        code,
        format!("{error} (configuration from --config or {CONFIG_ENV})"),
    )
}

/// The exit code and message for a lock operation that failed.
pub(crate) fn lock_error(error: LockError) -> (u8, String) {
    let code = match &error {
        LockError::Locked { .. } => exit::LOCKED,
        LockError::Timeout { .. } => exit::TIMED_OUT,
        LockError::NotHeld { .. } => exit::LOST,
        LockError::InvalidInput { .. }
        | LockError::Unsupported { .. }
        | LockError::KindMismatch { .. } => exit::CONFIG,
        _ => exit::BACKEND,
    };
    (code, error.to_string())
}

async fn purge(locker: &Locker, prefix: &str) -> Outcome {
    let purged = locker.purge(prefix).await.map_err(lock_error)?;
    out!("purged {purged} lock(s) under `{prefix}`");
    Ok(0)
}

async fn status(locker: &Locker, key: &str, json: bool) -> Outcome {
    let states = locker.inspect(key).await.map_err(lock_error)?;
    let stored = locker.lock_ns(key).map_err(lock_error)?;
    // Some node answering is an answer; none is the backend failing (69), as an unreachable
    // inc server is, after the report is printed.
    let answered = if states
        .iter()
        .all(|state| matches!(state.holding, Holding::Unknown(_)))
    {
        Err((
            exit::BACKEND,
            format!("no node answered for `{stored}`: its state is unknown"),
        ))
    } else {
        Ok(0)
    };
    if json {
        let nodes: Vec<serde_json::Value> = states.iter().map(node_json).collect();
        out!(
            "{}",
            serde_json::json!({ "key": stored.as_str(), "nodes": nodes })
        );
        return answered;
    }
    for state in states {
        let holding = match state.holding {
            Holding::Free => "free".to_owned(),
            Holding::Held { ttl: Some(ttl) } => format!("held, {} ms left", ttl.as_millis()),
            Holding::Held { ttl: None } => "held, no expiry".to_owned(),
            Holding::Unknown(error) => format!("unknown ({error})"),
        };
        match &state.server {
            Some(server) => out!("{stored} on {} ({server}): {holding}", state.node),
            None => out!("{stored} on {}: {holding}", state.node),
        }
    }
    answered
}

/// `--wait` asks again after a failed attempt as after a held lock, for as long as the lock is
/// held: a backend that no majority of its nodes answers when lockrun starts (unreachable, a
/// wrong password) is a failure to report (69), not a wait to sit out in silence. One that
/// fails during the wait is waited for.
async fn reachable(locker: &Locker, key: &str) -> Result<(), (u8, String)> {
    let states = locker.inspect(key).await.map_err(lock_error)?;
    let mut unknown = states.iter().filter_map(|state| match &state.holding {
        Holding::Unknown(error) => Some(error),
        _ => None,
    });
    let first = unknown.next();
    let failed = usize::from(first.is_some()) + unknown.count();
    match first {
        Some(error) if failed * 2 >= states.len() => Err((
            exit::BACKEND,
            format!(
                "{failed} of {} node(s) did not answer for `{key}`, so --wait would wait in vain: {error}",
                states.len()
            ),
        )),
        _ => Ok(()),
    }
}

/// One node's state for `status --json`: what the text form says, as fields (never the token).
fn node_json(state: &KeyState) -> serde_json::Value {
    let mut node = node_holding_json(state);
    node["server"] = serde_json::json!(state.server);
    node
}

fn node_holding_json(state: &KeyState) -> serde_json::Value {
    match &state.holding {
        Holding::Free => serde_json::json!({ "node": state.node, "state": "free", "ttl_ms": null }),
        Holding::Held { ttl } => serde_json::json!({
            "node": state.node,
            "state": "held",
            "ttl_ms": ttl.map(|ttl| u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
        }),
        Holding::Unknown(error) => serde_json::json!({
            "node": state.node,
            "state": "unknown",
            "ttl_ms": null,
            "error": error,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_unit_or_are_milliseconds() {
        assert_eq!(parse_duration("250"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("3d").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
    }
}

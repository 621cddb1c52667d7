//! `lockrun`: run a command while holding a lock, like `flock(1)`, `etcdctl lock` or
//! `consul lock`, over any backend of the facade.
//!
//! ```text
//! lockrun [--config FILE|JSON] [--no-wait] [--ttl MS] [--timeout MS] KEY -- COMMAND [ARGS…]
//! lockrun [--config FILE|JSON] purge PREFIX
//! lockrun [--config FILE|JSON] status KEY
//! ```

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lock_facade::{CONFIG_ENV, Holding, LockConfig, LockError, Locker, create};

/// Set for the command: the (namespaced) key of the lock it runs under.
const KEY_ENV: &str = "LOCK_KEY";

/// Set for the command when the backend hands out fencing tokens (inc; Redlock with
/// `fencing`): strictly greater than that of any earlier holder of the key.
const FENCING_TOKEN_ENV: &str = "LOCK_FENCING_TOKEN";

/// The exit codes, besides the command's own.
mod exit {
    /// Held by someone else, with `--no-wait`.
    pub(super) const LOCKED: u8 = 75;
    /// Gave up waiting: retries or `--timeout` ran out.
    pub(super) const TIMED_OUT: u8 = 76;
    /// The lock was lost while the command ran; the command was terminated.
    pub(super) const LOST: u8 = 77;
    /// Bad configuration or arguments.
    pub(super) const CONFIG: u8 = 78;
    /// The backend failed (unreachable, protocol error…).
    pub(super) const BACKEND: u8 = 69;
    /// The command could not be started.
    pub(super) const CANNOT_RUN: u8 = 127;
}

const EXIT_CODES: &str = "\
Exit codes:
  the command's own    when it ran (128 + N if it was killed by signal N)
  75                   the lock is held by someone else (--no-wait)
  76                   gave up waiting (retries or --timeout ran out)
  77                   the lock was lost while the command ran; the command was killed
  78                   bad configuration or arguments
  69                   the backend failed (unreachable, protocol error)
  127                  the command could not be started

The command runs with LOCK_KEY set to the lock's key and, where the backend hands out
fencing tokens (inc, or Redlock with \"fencing\": true), LOCK_FENCING_TOKEN set to this
holder's token: pass it to the resource so that it can refuse older holders.

The configuration comes from --config (a file path, or inline JSON or TOML) or else from the
LOCK_CONFIG environment variable; with neither, the in-process memory backend is used.";

#[derive(Debug, Parser)]
#[command(
    name = "lockrun",
    version,
    about = "Run a command while holding a lock",
    after_help = EXIT_CODES,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    /// Configuration: a .json/.toml file, or inline JSON or TOML (default: $LOCK_CONFIG).
    #[arg(long, global = true, value_name = "FILE|JSON")]
    config: Option<String>,
    /// Fail at once (exit 75) if the lock is held, instead of waiting.
    #[arg(long, conflicts_with = "wait")]
    no_wait: bool,
    /// Wait for the lock per the retry policy (the default).
    #[arg(long)]
    wait: bool,
    /// Lock lifetime in ms; the lock is extended while the command runs.
    #[arg(long, value_name = "MS")]
    ttl: Option<i64>,
    /// Longest wait for the lock, in ms (waits until it is free when unset and retries are
    /// unbounded).
    #[arg(long, value_name = "MS")]
    timeout: Option<i64>,
    /// The key to lock.
    #[arg(required = true)]
    key: Option<String>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
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
        /// The key.
        key: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let code = if error.use_stderr() { exit::CONFIG } else { 0 };
            let _ = error.print();
            return ExitCode::from(code);
        }
    };
    match run(cli).await {
        Ok(code) => ExitCode::from(code),
        Err((code, message)) => {
            eprintln!("lockrun: {message}");
            ExitCode::from(code)
        }
    }
}

type Outcome = Result<u8, (u8, String)>;

async fn run(cli: Cli) -> Outcome {
    let base = match &cli.config {
        Some(text) => LockConfig::from_text(text),
        None => LockConfig::from_env(),
    }
    .map_err(config_error)?;
    let mut overrides = LockConfig {
        ttl: cli.ttl,
        deadline: cli.timeout,
        ..LockConfig::default()
    };
    if cli.no_wait {
        overrides.retry_count = Some(0);
    } else if base.retry_count.is_none() && cli.timeout.is_some() {
        // A timeout bounds the wait; the retry count should not cut it shorter.
        overrides.retry_count = Some(-1);
    }
    let locker = create(overrides.merged_over(base))
        .await
        .map_err(config_error)?;
    let outcome = match cli.action {
        Some(Action::Purge { prefix }) => purge(&locker, &prefix).await,
        Some(Action::Status { key }) => status(&locker, &key).await,
        None => {
            let key = cli.key.unwrap_or_default();
            run_locked(&locker, &key, &cli.command, cli.no_wait).await
        }
    };
    let _ = locker.stop().await;
    outcome
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

fn lock_error(error: LockError) -> (u8, String) {
    let code = match &error {
        LockError::Locked { .. } => exit::LOCKED,
        LockError::Timeout { .. } => exit::TIMED_OUT,
        LockError::NotHeld { .. } => exit::LOST,
        LockError::InvalidInput { .. } | LockError::Unsupported { .. } => exit::CONFIG,
        _ => exit::BACKEND,
    };
    (code, error.to_string())
}

async fn run_locked(locker: &Locker, key: &str, command: &[String], no_wait: bool) -> Outcome {
    let Some((program, args)) = command.split_first() else {
        return Err((exit::CONFIG, "no command given after --".to_owned()));
    };
    let mut guard = if no_wait {
        locker
            .try_acquire(key)
            .await
            .map_err(lock_error)?
            .ok_or_else(|| (exit::LOCKED, format!("`{key}` is held by someone else")))?
    } else {
        locker.acquire(key).await.map_err(lock_error)?
    };
    let lost = guard.keep_alive().map_err(lock_error)?;
    let mut command = tokio::process::Command::new(program);
    command.args(args).env(KEY_ENV, guard.key().as_str());
    if let Some(fence) = guard.fencing_token() {
        // Pass it to the resource, so that it can refuse writers holding an older one.
        command.env(FENCING_TOKEN_ENV, fence.to_string());
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            let _ = guard.release().await;
            return Err((exit::CANNOT_RUN, format!("cannot run `{program}`: {error}")));
        }
    };
    tokio::select! {
        status = child.wait() => {
            let status = status.map_err(|e| (exit::BACKEND, format!("waiting for `{program}`: {e}")))?;
            let lost_meanwhile = lost.is_lost();
            let _ = guard.release().await;
            if lost_meanwhile {
                return Err((exit::LOST, format!("the lock on `{key}` was lost while `{program}` ran")));
            }
            Ok(exit_code(status))
        }
        () = lost.lost() => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            drop(guard);
            Err((exit::LOST, format!("the lock on `{key}` was lost; `{program}` was terminated")))
        }
    }
}

fn exit_code(status: std::process::ExitStatus) -> u8 {
    if let Some(code) = status.code() {
        return u8::try_from(code & 0xff).unwrap_or(1);
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return u8::try_from(128 + signal).unwrap_or(1);
        }
    }
    1
}

async fn purge(locker: &Locker, prefix: &str) -> Outcome {
    let purged = locker.purge(prefix).await.map_err(lock_error)?;
    println!("purged {purged} lock(s) under `{prefix}`");
    Ok(0)
}

async fn status(locker: &Locker, key: &str) -> Outcome {
    let states = locker.inspect(key).await.map_err(lock_error)?;
    let stored = locker.lock_ns(key).map_err(lock_error)?;
    for state in states {
        let holding = match state.holding {
            Holding::Free => "free".to_owned(),
            Holding::Held { ttl: Some(ttl) } => format!("held, {} ms left", ttl.as_millis()),
            Holding::Held { ttl: None } => "held, no expiry".to_owned(),
            Holding::Unknown(error) => format!("unknown ({error})"),
        };
        println!("{stored} on {}: {holding}", state.node);
    }
    Ok(0)
}

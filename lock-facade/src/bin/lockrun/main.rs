//! `lockrun`: run a command while holding a lock, like `flock(1)`, `etcdctl lock` or
//! `consul lock`, over any backend of the facade — and never let the command outlive the lock.
//!
//! ```text
//! lockrun [--config FILE|JSON] [--no-wait] [--ttl MS] [--timeout MS] [--kill-grace DURATION]
//!         [--hold-at-least DURATION] KEY -- COMMAND [ARGS…]
//! lockrun [--config FILE|JSON] purge PREFIX
//! lockrun [--config FILE|JSON] status [--json] KEY
//! ```
//!
//! The command runs as the leader of a process group of its own; `supervise` keeps it there
//! and `group` holds the process-group mechanics and the reaper that outlives a killed lockrun.

/// `eprintln!` that cannot panic: a closed or broken stderr (`2>&1 | head -1`) must not turn a
/// documented exit code into a panic's 101.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `println!` that cannot panic, for the same reason.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

#[cfg(unix)]
mod cli;
#[cfg(unix)]
mod group;
#[cfg(unix)]
mod supervise;

use std::process::ExitCode;

#[cfg(unix)]
fn main() -> ExitCode {
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new(group::REAPER_ARG)) {
        return group::reaper_main();
    }
    cli::main()
}

#[cfg(not(unix))]
fn main() -> ExitCode {
    say!("lockrun: needs a Unix system (it supervises the command's process group)");
    ExitCode::from(69)
}

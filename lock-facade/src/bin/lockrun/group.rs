//! The command's process group: started in a group of its own, signalled as a whole, reaped,
//! and watched by a reaper process that kills it if lockrun itself dies.

use std::io::{self, BufRead, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitCode, ExitStatus, Stdio};

use rustix::io::Errno;
use rustix::process::{Pid, Signal, WaitOptions};

/// The hidden first argument that turns lockrun into its own reaper (see [`Reaper`]).
pub(crate) const REAPER_ARG: &str = "--lockrun-internal-reaper";

/// What lockrun writes to the reaper when the group is gone and nothing is left to kill.
const STAND_DOWN: &str = "done";

/// The command, as the leader of a process group of its own: every process it starts stays in
/// that group unless it leaves it on purpose (`setsid`, `setpgid`).
#[derive(Debug)]
pub(crate) struct Group {
    /// The leader's pid, which is also the group's id.
    leader: Pid,
    /// The leader's exit status, once reaped.
    status: Option<ExitStatus>,
}

impl Group {
    /// Makes this process the reaper of its orphaned descendants (Linux), so that the
    /// command's background processes, orphaned when their parent exits, are reaped here and
    /// not left as zombies that still count as members of the group (a container's first
    /// process often reaps nothing).
    pub(crate) fn adopt_orphans() {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Err(error) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
            say!("lockrun: warning: cannot become the reaper of the command's orphans: {error}");
        }
    }

    /// Starts `command` as the leader of a new process group.
    pub(crate) fn spawn(command: &mut Command) -> io::Result<Self> {
        let child = command.process_group(0).spawn()?;
        // The child is reaped by `reap`, never by `Child::wait`: dropping a `Child` neither
        // waits nor kills.
        Ok(Self {
            leader: Pid::from_child(&child),
            status: None,
        })
    }

    /// The group's id.
    pub(crate) fn id(&self) -> Pid {
        self.leader
    }

    /// Sends `signal` to every process of the group; a group already gone is no error.
    pub(crate) fn signal(&self, signal: Signal) {
        match rustix::process::kill_process_group(self.leader, signal) {
            Ok(()) => {}
            Err(error) if error == Errno::SRCH => {}
            Err(error) => say!(
                "lockrun: warning: cannot send {signal:?} to process group {}: {error}",
                self.leader.as_raw_pid()
            ),
        }
    }

    /// Reaps every child that has ended (the leader, orphans handed to this process, the
    /// reaper) without blocking, and keeps the leader's status.
    pub(crate) fn reap(&mut self) {
        loop {
            // `wait`, not `waitpid(None)`: rustix maps `None` to 0, which means "our own group" only.
            match rustix::process::wait(WaitOptions::NOHANG) {
                Ok(Some((pid, status))) => {
                    if pid == self.leader {
                        self.status = Some(ExitStatus::from_raw(status.as_raw()));
                    }
                }
                // Nothing has ended (`None`), no children left (`ECHILD`), or a real error that
                // retrying cannot fix: the caller polls again.
                Ok(None) | Err(_) => return,
            }
        }
    }

    /// The leader's exit status, once it has ended.
    pub(crate) fn leader_status(&self) -> Option<ExitStatus> {
        self.status
    }

    /// True once no process is left in the group. Reaped zombies do not count; unreaped ones
    /// do, which is why this process adopts orphans (see [`Group::adopt_orphans`]).
    pub(crate) fn is_empty(&self) -> bool {
        matches!(
            rustix::process::test_kill_process_group(self.leader),
            Err(error) if error == Errno::SRCH
        )
    }
}

/// A small process (lockrun itself, started again with [`REAPER_ARG`]) that kills the
/// command's group at once if lockrun dies without saying goodbye, even by SIGKILL.
///
/// It reads a pipe whose write end only lockrun holds (close-on-exec, so neither the command
/// nor the reaper inherits it): first the group's id, then `done` once the group is gone. End
/// of file without `done` means lockrun died: the reaper sends SIGKILL to the group. It runs in
/// a process group of its own, so that signals sent to lockrun's group (a terminal's Ctrl-C)
/// or to the command's group do not reach it.
#[derive(Debug)]
pub(crate) struct Reaper {
    pipe: Option<io::PipeWriter>,
}

impl Reaper {
    /// Starts the reaper.
    pub(crate) fn start() -> io::Result<Self> {
        let (reader, writer) = io::pipe()?;
        Command::new(own_executable()?)
            .arg(REAPER_ARG)
            .stdin(Stdio::from(reader))
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()?;
        Ok(Self { pipe: Some(writer) })
    }

    /// Tells the reaper which group to kill should lockrun die.
    pub(crate) fn watch(&mut self, group: Pid) -> io::Result<()> {
        match &mut self.pipe {
            Some(pipe) => writeln!(pipe, "{}", group.as_raw_pid()),
            None => Ok(()),
        }
    }

    /// Lets the reaper go without killing anything: the group is gone.
    pub(crate) fn stand_down(&mut self) {
        if let Some(mut pipe) = self.pipe.take() {
            // A reaper that is already gone cannot kill anything either.
            let _ = writeln!(pipe, "{STAND_DOWN}");
        }
    }
}

/// The path that starts this very program again, even if its file was replaced meanwhile.
fn own_executable() -> io::Result<std::path::PathBuf> {
    if cfg!(any(target_os = "linux", target_os = "android")) {
        Ok("/proc/self/exe".into())
    } else {
        std::env::current_exe()
    }
}

/// The reaper's whole life (see [`Reaper`]).
pub(crate) fn reaper_main() -> ExitCode {
    let mut input = io::stdin().lock();
    let mut first = String::new();
    if input.read_line(&mut first).is_err() {
        return ExitCode::SUCCESS;
    }
    let Some(group) = first
        .trim()
        .parse::<i32>()
        .ok()
        .and_then(Pid::from_raw)
        .filter(|pid| pid.as_raw_pid() > 1)
    else {
        // lockrun ended before it started the command: nothing to kill.
        return ExitCode::SUCCESS;
    };
    let mut rest = String::new();
    // Returns at end of file: lockrun closed the pipe, or died.
    let _ = input.read_to_string(&mut rest);
    if rest.lines().any(|line| line.trim() == STAND_DOWN) {
        return ExitCode::SUCCESS;
    }
    match rustix::process::kill_process_group(group, Signal::KILL) {
        Ok(()) => say!(
            "lockrun: lockrun ended while its command ran; killed the command's process group {}",
            group.as_raw_pid()
        ),
        Err(error) if error == Errno::SRCH => {}
        Err(error) => say!(
            "lockrun: lockrun ended while its command ran; cannot kill process group {}: {error}",
            group.as_raw_pid()
        ),
    }
    ExitCode::SUCCESS
}

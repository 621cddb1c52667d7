//! Running the command under the lock: no process of its group may be alive once the lock's
//! validity ends, whatever happens to the lock, to lockrun or to the command.

use std::ffi::OsString;
use std::process::{Command, ExitStatus};
use std::time::Duration;

use lock_facade::{LeaseKind, LockError, LockGuard, Locker, LostSignal};
use rustix::process::Signal;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;

use crate::cli::{Outcome, exit, lock_error};
use crate::group::{Group, Reaper};

/// Set for the command: the (namespaced) key of the lock it runs under.
const KEY_ENV: &str = "LOCK_KEY";

/// Set for the command when the backend hands out fencing tokens (inc; Redlock with
/// `fencing`): strictly greater than that of any earlier holder of the key.
const FENCING_TOKEN_ENV: &str = "LOCK_FENCING_TOKEN";

/// How often the group is looked at while it is being stopped: its members that are not
/// children of lockrun do not announce their end.
const POLL: Duration = Duration::from_millis(5);

/// How long processes that survived SIGKILL (stuck in the kernel, or not ours to kill) are
/// waited for before lockrun gives up on them and leaves the lock to expire instead of
/// releasing it.
const SURVIVOR_WAIT: Duration = Duration::from_secs(2);

/// When lockrun stops the command, all derived from the lock's ttl.
///
/// The watchdog extends the lock when a third of the ttl is left. If that keeps failing, the
/// group gets SIGTERM when `grace + margin` of validity is left and SIGKILL when `margin` is
/// left: the margin covers the kill taking effect and timers firing late.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timing {
    ttl: Duration,
    /// SIGTERM to SIGKILL.
    grace: Duration,
    /// SIGKILL to the end of the validity.
    margin: Duration,
}

impl Timing {
    /// The timing for a lock of `ttl`, with `--kill-grace` if given (default ttl/8).
    ///
    /// # Errors
    /// A grace over ttl/5: SIGTERM would come before the watchdog (at a third of the ttl left)
    /// had a fair chance to extend the lock, killing healthy commands.
    pub(crate) fn new(ttl: Duration, grace: Option<Duration>) -> Result<Self, String> {
        let most = ttl / 5;
        let grace = grace.unwrap_or(ttl / 8);
        if grace > most {
            return Err(format!(
                "--kill-grace {} ms is too long for a ttl of {} ms: at most a fifth of the ttl \
                 ({} ms), so that the lock is renewed before the command is stopped; raise --ttl",
                grace.as_millis(),
                ttl.as_millis(),
                most.as_millis()
            ));
        }
        Ok(Self {
            ttl,
            grace,
            margin: ttl / 20,
        })
    }
}

/// One run: what to lock, what to run and how.
#[derive(Debug)]
pub(crate) struct Run<'a> {
    pub(crate) key: &'a str,
    /// A mutex, a semaphore permit, or a side of a read-write lock.
    pub(crate) kind: LeaseKind,
    pub(crate) command: &'a [OsString],
    pub(crate) no_wait: bool,
    pub(crate) timing: Timing,
    pub(crate) hold_at_least: Duration,
}

/// The signals lockrun forwards to the command's group before it exits with 128 + N; `None`
/// for one that was ignored when lockrun started (see [`IgnoredAtStart`]).
struct Forwarded {
    hangup: Option<tokio::signal::unix::Signal>,
    interrupt: Option<tokio::signal::unix::Signal>,
    quit: Option<tokio::signal::unix::Signal>,
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Forwarded {
    /// Handles the four signals from now on (their default action would kill lockrun alone),
    /// but for those `ignored` when lockrun started: they stay ignored.
    fn install(ignored: IgnoredAtStart) -> std::io::Result<Self> {
        let handle = |number: Signal| -> std::io::Result<_> {
            if ignored.contains(number) {
                return Ok(None);
            }
            signal(SignalKind::from_raw(number.as_raw())).map(Some)
        };
        Ok(Self {
            hangup: handle(Signal::HUP)?,
            interrupt: handle(Signal::INT)?,
            quit: handle(Signal::QUIT)?,
            terminate: handle(Signal::TERM)?,
        })
    }

    /// The next signal received (cancel safe).
    async fn recv(&mut self) -> Signal {
        tokio::select! {
            () = next(&mut self.hangup) => Signal::HUP,
            () = next(&mut self.interrupt) => Signal::INT,
            () = next(&mut self.quit) => Signal::QUIT,
            () = next(&mut self.terminate) => Signal::TERM,
        }
    }
}

/// The next delivery of a handled signal; never, for one not handled (cancel safe).
async fn next(signal: &mut Option<tokio::signal::unix::Signal>) {
    if let Some(signal) = signal
        && signal.recv().await.is_some()
    {
        return;
    }
    std::future::pending().await
}

/// The signals whose disposition was "ignore" (`SIG_IGN`) when lockrun started: `nohup`'s
/// SIGHUP, a non-interactive shell's background job's SIGINT and SIGQUIT. Run directly, the
/// command would ignore them (an ignored signal stays ignored across `exec`); under lockrun
/// too: lockrun handles none of them (as a POSIX shell, which may not trap a signal ignored on
/// entry), so that the command inherits the ignored disposition. Read before any handler is
/// installed, from `/proc/self/status` (Linux); none elsewhere.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct IgnoredAtStart(u64);

impl IgnoredAtStart {
    pub(crate) fn read() -> Self {
        let mask = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|line| line.strip_prefix("SigIgn:"))
                    .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            });
        Self(mask.unwrap_or(0))
    }

    fn contains(self, signal: Signal) -> bool {
        u32::try_from(signal.as_raw() - 1)
            .ok()
            .and_then(|bit| 1u64.checked_shl(bit))
            .is_some_and(|bit| self.0 & bit != 0)
    }
}

/// Forwards SIGTSTP and SIGCONT received by lockrun to the command's group, for as long as the
/// returned task lives (it is aborted when dropped); SIGTSTP only if it was not ignored when
/// lockrun started.
fn forward_stops(group: rustix::process::Pid, ignored: IgnoredAtStart) -> Option<AbortOnDrop> {
    let mut stop = if ignored.contains(Signal::TSTP) {
        None
    } else {
        Some(signal(SignalKind::from_raw(Signal::TSTP.as_raw())).ok()?)
    };
    let mut cont = signal(SignalKind::from_raw(Signal::CONT.as_raw())).ok()?;
    let task = tokio::spawn(async move {
        loop {
            let forward = tokio::select! {
                () = next(&mut stop) => Signal::TSTP,
                Some(()) = cont.recv() => Signal::CONT,
                else => return,
            };
            let _ = rustix::process::kill_process_group(group, forward);
        }
    });
    Some(AbortOnDrop(task))
}

/// A background task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The exit code for a signal number: 128 + N.
fn signal_code(signal: i32) -> u8 {
    u8::try_from(128 + signal).unwrap_or(u8::MAX)
}

/// Takes the lock, runs the command in its own process group under it and returns the exit
/// code of the table in `lockrun --help`.
pub(crate) async fn run_locked(locker: &Locker, run: Run<'_>) -> Outcome {
    let Some((program_os, args)) = run.command.split_first() else {
        return Err((exit::CONFIG, "no command given after --".to_owned()));
    };
    // For messages only: the command runs with its bytes as given.
    let program = program_os.to_string_lossy();
    // Installed before the wait for the lock, so that a signal then ends the wait cleanly.
    let ignored = IgnoredAtStart::read();
    let mut forwarded = Forwarded::install(ignored)
        .map_err(|e| (exit::BACKEND, format!("cannot handle signals: {e}")))?;
    let mut child_ended = signal(SignalKind::child())
        .map_err(|e| (exit::BACKEND, format!("cannot watch SIGCHLD: {e}")))?;
    let key = run.key;
    let acquire = async {
        if run.no_wait {
            locker
                .try_acquire_kind(key, run.kind)
                .await
                .map_err(lock_error)?
                .ok_or_else(|| (exit::LOCKED, format!("`{key}` is held by someone else")))
        } else {
            locker
                .acquire_kind(key, run.kind, locker.options())
                .await
                .map_err(lock_error)
        }
    };
    // Dropping an acquisition midway leaves no lock behind (the core's cancel safety).
    let mut guard = tokio::select! {
        guard = acquire => guard?,
        received = forwarded.recv() => {
            return Err((
                signal_code(received.as_raw()),
                format!("signal {} while waiting for `{key}`", received.as_raw()),
            ));
        }
    };
    let lost = guard.keep_alive().map_err(lock_error)?;

    Group::adopt_orphans();
    let mut reaper = match Reaper::start() {
        Ok(reaper) => reaper,
        Err(error) => {
            let _ = guard.release().await;
            return Err((
                exit::CANNOT_RUN,
                format!(
                    "cannot start lockrun's reaper (which kills the command should lockrun die): {error}"
                ),
            ));
        }
    };
    let mut command = Command::new(program_os);
    command.args(args).env(KEY_ENV, guard.key().as_str());
    match guard.fencing_token() {
        // Pass it to the resource, so that it can refuse writers holding an older one.
        Some(fence) => command.env(FENCING_TOKEN_ENV, fence.to_string()),
        // Never one inherited from lockrun's environment (an outer lockrun's): not this lock's.
        None => command.env_remove(FENCING_TOKEN_ENV),
    };
    // The group would get SIGTERM at once with no more than the kill grace and margin of
    // validity left (SIGKILL at once below the margin): such a lock (an acquisition answered
    // late in its ttl) is given up before the command starts, never after.
    let left = guard.remaining();
    if left <= run.timing.grace + run.timing.margin {
        reaper.stand_down();
        let _ = guard.release().await;
        let had = validity_left(left);
        return Err((
            exit::LOST,
            format!(
                "the lock on `{key}` had {had}, less than lockrun needs to stop `{program}` before it ends ({:.1?}: the kill grace and a margin); not started (raise the ttl)",
                run.timing.grace + run.timing.margin
            ),
        ));
    }
    let started = Instant::now();
    let mut group = match Group::spawn(&mut command) {
        Ok(group) => group,
        Err(error) => {
            reaper.stand_down();
            let _ = guard.release().await;
            return Err((exit::CANNOT_RUN, format!("cannot run `{program}`: {error}")));
        }
    };
    if let Err(error) = reaper.watch(group.id()) {
        say!(
            "lockrun: warning: the reaper is gone ({error}); a SIGKILL of lockrun would leave the command running"
        );
    }

    // Ctrl-Z (SIGTSTP) would stop lockrun alone, and with it the renewals, while the command
    // in its own group ran on past the lock. lockrun stays up and stops the command instead;
    // SIGCONT to lockrun continues it. (SIGSTOP cannot be caught: see the README.)
    let _stops = forward_stops(group.id(), ignored);
    let mut supervisor = Supervisor {
        group: &mut group,
        guard: &guard,
        lost: &lost,
        timing: run.timing,
        stop: None,
        at_risk: false,
        lost_seen: false,
        received: None,
    };
    let ended = supervisor
        .until_group_gone(&mut forwarded, &mut child_ended)
        .await;
    let (at_risk, mut received) = (supervisor.at_risk, supervisor.received);
    if ended == Ended::Survivors {
        // Not released: the lock expires by itself, after whatever could not be killed.
        reaper.stand_down();
        std::mem::forget(guard);
        return Err((
            exit::LOST,
            format!(
                "processes of `{program}` (group {}) survived SIGKILL; the lock on `{key}` is left to expire",
                group.id().as_raw_pid()
            ),
        ));
    }
    reaper.stand_down();
    let status = group.leader_status();

    let mut lost_while_running = at_risk || lost.is_lost();
    // With --hold-at-least, keep the lock until then; first make sure it was still ours when
    // the command ended, so that a loss then is told apart from a loss during the hold.
    let hold_until = started + run.hold_at_least;
    let mut held_on = false;
    if !lost_while_running && received.is_none() && Instant::now() < hold_until {
        match guard.extend(run.timing.ttl).await {
            Err(LockError::NotHeld { .. }) => lost_while_running = true,
            // Answered after its ttl was spent: the guard reports the lock lost.
            Err(_) if lost.is_lost() => lost_while_running = true,
            Err(error) => {
                say!("lockrun: warning: cannot check the lock after the command: {error}")
            }
            Ok(()) => {}
        }
        if !lost_while_running {
            held_on = true;
            tokio::select! {
                () = tokio::time::sleep_until(hold_until) => {}
                () = lost.lost() => say!("lockrun: warning: the lock on `{key}` was lost during --hold-at-least, after `{program}` ended"),
                signal = forwarded.recv() => received = Some(signal),
            }
        }
    }
    match guard.release().await {
        Ok(()) => {}
        Err(LockError::NotHeld { .. }) if !held_on => lost_while_running = true,
        Err(LockError::NotHeld { .. }) => say!(
            "lockrun: warning: the lock on `{key}` was lost during --hold-at-least, after `{program}` ended"
        ),
        Err(error) => {
            say!("lockrun: warning: release failed ({error}); the lock expires by itself")
        }
    }

    if lost_while_running {
        let what = if at_risk && !lost.is_lost() {
            "could not be renewed in time"
        } else {
            "was lost"
        };
        return Err((
            exit::LOST,
            format!(
                "the lock on `{key}` {what} while `{program}` ran; its process group was stopped before the lock's validity ended"
            ),
        ));
    }
    if let Some(signal) = received {
        return Err((
            signal_code(signal.as_raw()),
            format!(
                "signal {} forwarded to `{program}`; lock released",
                signal.as_raw()
            ),
        ));
    }
    Ok(status.map_or(1, exit_code))
}

/// How the supervision of the group ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// No process of the group is left.
    Gone,
    /// Some survived SIGKILL for [`SURVIVOR_WAIT`].
    Survivors,
}

/// The group is being stopped: SIGTERM (or a forwarded signal) was sent, SIGKILL falls due.
#[derive(Debug)]
struct Stop {
    kill_at: Instant,
    killed_at: Option<Instant>,
}

struct Supervisor<'a> {
    group: &'a mut Group,
    guard: &'a LockGuard,
    lost: &'a LostSignal,
    timing: Timing,
    stop: Option<Stop>,
    /// Renewal kept failing until `grace + margin` of validity was left.
    at_risk: bool,
    /// The watchdog reported the lock lost.
    lost_seen: bool,
    /// The first signal forwarded.
    received: Option<Signal>,
}

impl Supervisor<'_> {
    /// Watches the group until none of its processes is left, stopping it when the lock is
    /// lost or about to be, when lockrun is signalled, or when the leader left others behind.
    async fn until_group_gone(
        &mut self,
        forwarded: &mut Forwarded,
        child_ended: &mut tokio::signal::unix::Signal,
    ) -> Ended {
        loop {
            self.group.reap();
            let leader_done = self.group.leader_status().is_some();
            if leader_done && self.group.is_empty() {
                return Ended::Gone;
            }
            let now = Instant::now();
            if leader_done && self.stop.is_none() {
                // Processes left behind may not outlive the lock either.
                self.terminate(now + self.timing.grace);
            }
            // SIGTERM when grace + margin of validity is left: the watchdog has been failing
            // since a third of the ttl was left.
            let valid_until = self.guard.valid_until();
            let term_at = valid_until
                .checked_sub(self.timing.grace + self.timing.margin)
                .unwrap_or(now);
            if !self.at_risk && now >= term_at {
                self.at_risk = true;
                say!(
                    "lockrun: the lock could not be renewed and has {}: stopping the command's process group",
                    validity_left(valid_until.saturating_duration_since(now))
                );
                let kill_at = valid_until.checked_sub(self.timing.margin).unwrap_or(now);
                self.terminate(kill_at);
            }
            if let Some(stop) = &mut self.stop {
                match stop.killed_at {
                    None if now >= stop.kill_at => {
                        self.group.signal(Signal::KILL);
                        stop.killed_at = Some(now);
                    }
                    Some(killed_at) if now >= killed_at + SURVIVOR_WAIT => {
                        return Ended::Survivors;
                    }
                    Some(_) => self.group.signal(Signal::KILL),
                    None => {}
                }
            }
            let mut wake = if self.at_risk {
                now + self.timing.ttl
            } else {
                term_at
            };
            if leader_done || self.stop.is_some() {
                wake = wake.min(now + POLL);
            }
            if let Some(Stop {
                kill_at,
                killed_at: None,
            }) = self.stop
            {
                wake = wake.min(kill_at);
            }
            tokio::select! {
                _ = child_ended.recv() => {}
                () = tokio::time::sleep_until(wake) => {}
                () = self.lost.lost(), if !self.lost_seen => {
                    // Gone already: someone else may hold it now. No grace.
                    self.lost_seen = true;
                    say!("lockrun: the lock was lost: killing the command's process group");
                    self.group.signal(Signal::KILL);
                    let now = Instant::now();
                    self.stop = Some(Stop { kill_at: now, killed_at: Some(now) });
                }
                signal = forwarded.recv() => {
                    self.group.signal(signal);
                    self.group.signal(Signal::CONT);
                    self.received.get_or_insert(signal);
                    let kill_at = Instant::now() + self.timing.grace;
                    if self.stop.is_none() {
                        self.stop = Some(Stop { kill_at, killed_at: None });
                    }
                }
            }
        }
    }

    /// SIGTERM to the group (and SIGCONT, for stopped members), SIGKILL due at `kill_at`.
    fn terminate(&mut self, kill_at: Instant) {
        if matches!(
            self.stop,
            Some(Stop {
                killed_at: Some(_),
                ..
            })
        ) {
            return;
        }
        self.group.signal(Signal::TERM);
        self.group.signal(Signal::CONT);
        match &mut self.stop {
            Some(stop) => stop.kill_at = stop.kill_at.min(kill_at),
            None => {
                self.stop = Some(Stop {
                    kill_at,
                    killed_at: None,
                });
            }
        }
    }
}

/// The command's exit status as lockrun's exit code: its own code, or 128 + N for signal N.
fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        return u8::try_from(code & 0xff).unwrap_or(1);
    }
    status
        .signal()
        .map_or(1, |signal| u8::try_from(128 + signal).unwrap_or(u8::MAX))
}

/// `left` of a lock's validity in words, below a millisecond too (a tiny ttl): never "0 ms".
fn validity_left(left: Duration) -> String {
    if left.is_zero() {
        "no validity left".to_owned()
    } else {
        format!("{left:.1?} of validity left")
    }
}

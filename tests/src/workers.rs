//! Cross-process contention: runs `lock-worker` processes against one key and adds up what
//! they report, with the checker server's shared counter for lost updates.

use std::fmt;
use std::io;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::server::{RedisServer, get_bulk};

/// The fenced resource on the checker server: `KEYS[1]` holds the highest fencing token seen,
/// `KEYS[2]` counts stale writes; `ARGV[1]` is the writer's token. A write whose token is not
/// above every earlier one is stale (a fencing resource would refuse it): counted, answered 0.
pub const FENCED_WRITE: &str = r"
local highest = tonumber(redis.call('get', KEYS[1]) or '0')
if tonumber(ARGV[1]) <= highest then
  redis.call('incr', KEYS[2])
  return 0
end
redis.call('set', KEYS[1], ARGV[1])
return 1
";

/// What a set of workers reported, summed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Critical sections completed.
    pub sections: u64,
    /// Sections that found another holder inside.
    pub overlaps: u64,
    /// Lost updates of the shared counter (sections minus the counter's value).
    pub lost_updates: u64,
    /// Writes to the fenced resource (0 when the lock hands out no fencing tokens).
    pub fenced_writes: u64,
    /// Fenced writes whose token was not above every earlier one.
    pub stale_writes: u64,
    /// Failed acquisitions (only counted in timed runs).
    pub errors: u64,
    /// The longest acquisition, in ms.
    pub max_acquire_ms: u64,
}

/// Starts one worker process: `args` go before the checker URL (`--backend inc`,
/// `--fencing`), `seconds` bounds a timed run.
///
/// # Errors
/// When the process cannot start.
pub fn spawn_worker(
    worker: &Path,
    args: &[&str],
    checker: &RedisServer,
    (tasks, sections): (usize, usize),
    node_urls: &[String],
    seconds: Option<u64>,
) -> io::Result<Child> {
    let mut command = Command::new(worker);
    if let Some(seconds) = seconds {
        command.env("LOCK_WORKER_SECONDS", seconds.to_string());
    }
    command
        .args(args)
        .arg(checker.url())
        .arg(tasks.to_string())
        .arg(sections.to_string())
        .args(node_urls)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
}

/// Waits for every worker and adds up their reports.
///
/// # Errors
/// When a worker fails or prints no report; the message carries its output.
pub fn collect(children: Vec<Child>, checker: &RedisServer) -> Result<Totals, String> {
    let mut totals = Totals::default();
    for child in children {
        let output = child.wait_with_output().map_err(|e| e.to_string())?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            return Err(format!(
                "a worker failed: {stdout}{}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let field = |name: &str| -> Result<u64, String> {
            stdout
                .split_whitespace()
                .skip_while(|word| *word != name)
                .nth(1)
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("no `{name}` in the worker's report: {stdout}"))
        };
        totals.sections += field("sections")?;
        totals.overlaps += field("overlaps")?;
        totals.errors += field("errors")?;
        totals.fenced_writes += field("fenced_writes")?;
        totals.stale_writes += field("stale_writes")?;
        totals.max_acquire_ms = totals.max_acquire_ms.max(field("max_acquire_ms")?);
    }
    let counter: u64 = get_bulk(checker.port(), "counter")
        .and_then(|value| value.parse().ok())
        .unwrap_or(0);
    totals.lost_updates = totals.sections.saturating_sub(counter);
    Ok(totals)
}

/// Runs `processes` workers of one task and `sections` critical sections each (no time bound)
/// and adds up their reports.
///
/// # Errors
/// When a worker cannot start, fails, or prints no report.
pub fn run(
    worker: &Path,
    args: &[&str],
    checker: &RedisServer,
    (processes, sections): (usize, usize),
    node_urls: &[String],
) -> Result<Totals, String> {
    let children = (0..processes)
        .map(|_| spawn_worker(worker, args, checker, (1, sections), node_urls, None))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|e| format!("cannot start a worker: {e}"))?;
    collect(children, checker)
}

impl Totals {
    /// Asserts that `expected` sections ran, all fenced, with no overlap, lost update or stale
    /// write.
    ///
    /// # Panics
    /// On any of those.
    pub fn assert_safe(&self, expected: u64) {
        assert_eq!(self.sections, expected, "sections that ran");
        assert_eq!(self.fenced_writes, self.sections, "every section is fenced");
        assert_eq!(self.overlaps, 0, "two holders overlapped");
        assert_eq!(self.lost_updates, 0, "updates were lost");
        assert_eq!(self.stale_writes, 0, "a fencing token went backwards");
    }
}

impl fmt::Display for Totals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "critical sections {}, overlaps {}, lost updates {}, stale writes accepted {} (of {} fenced writes), max acquire latency {} ms",
            self.sections,
            self.overlaps,
            self.lost_updates,
            self.stale_writes,
            self.fenced_writes,
            self.max_acquire_ms
        )
    }
}

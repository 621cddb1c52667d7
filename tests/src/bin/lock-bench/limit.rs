//! The physical limit of one server for one client, from `redis-benchmark -c 1` (the limit the
//! issues define), and the helpers that put the in-process blocking floor (`floor.rs`) beside
//! it. Sequential figures take `redis-benchmark` windows spread over the whole measurement
//! (one per round, between the alternating chunks), since a single window beside it drifted
//! by ±20 % on a shared host.

use std::process::Command;
use std::time::Duration;

use lock_tests::server::RedisServer;

use crate::floor::MinimalClient;
use crate::{Figure, figure, rate};

pub(crate) type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Cycles per chunk when a client under test alternates with the minimal client.
pub(crate) const CHUNK: u32 = 50;

/// The two references of a sequential measurement on one server, taken between the chunks
/// of the clients under test so that all see the host at the same moments: the blocking floor
/// (a chunk before every chunk of theirs) and the limit the issues define, from one
/// `redis-benchmark -c 1` window at the start of each round.
pub(crate) struct References {
    floor: MinimalClient,
    floor_time: Duration,
    /// Cycles, and the seconds they take at the windows' rates, over every window so far.
    limit_cycles: f64,
    limit_seconds: f64,
    cycles: u32,
    chunks: u32,
    chunks_per_round: u32,
}

impl References {
    /// References for `rounds` rounds of `cycles` cycles, in chunks of [`CHUNK`].
    pub(crate) fn new(floor: MinimalClient, cycles: u32, rounds: usize) -> Self {
        let rounds = u32::try_from(rounds).unwrap_or(u32::MAX).max(1);
        let chunks = (cycles.saturating_mul(rounds) / CHUNK).max(10);
        Self {
            floor,
            floor_time: Duration::ZERO,
            limit_cycles: 0.0,
            limit_seconds: 0.0,
            cycles,
            chunks,
            chunks_per_round: chunks.div_ceil(rounds).max(1),
        }
    }

    /// How many chunks each client runs.
    pub(crate) fn chunks(&self) -> u32 {
        self.chunks
    }

    /// Runs before chunk `chunk` of the clients under test: at the start of a round a limit
    /// window (`limit` measures the cycle limit over the requests it is given), then the
    /// floor's chunk.
    pub(crate) fn before_chunk(
        &mut self,
        chunk: u32,
        limit: impl FnOnce(u32) -> BenchResult<f64>,
    ) -> BenchResult<()> {
        if chunk.is_multiple_of(self.chunks_per_round) {
            let window = limit(self.cycles)?;
            self.limit_cycles += f64::from(self.cycles);
            self.limit_seconds += f64::from(self.cycles) / window;
        }
        self.floor_time += self.floor.time_cycles(CHUNK)?;
        Ok(())
    }

    /// Cycles/s of a client that spent `time` on all its chunks.
    pub(crate) fn rate(&self, time: Duration) -> f64 {
        rate(self.chunks * CHUNK, time)
    }

    fn limit(&self) -> f64 {
        self.limit_cycles / self.limit_seconds
    }

    /// A client's row: its rate against the limit, with the floor as the reference.
    pub(crate) fn figure(&self, backend: &str, nodes: u32, time: Duration) -> Figure {
        let value = self.rate(time);
        let mut row = against_limit(backend, nodes, SEQUENTIAL, value, self.limit());
        row.reference = Some("blocking floor".to_owned());
        row.ratio_to_reference = Some(value / self.rate(self.floor_time));
        row
    }

    /// The row that puts the floor itself against the limit.
    pub(crate) fn floor_figure(&self, nodes: u32) -> Figure {
        against_limit(
            "round-trip floor (minimal client)",
            nodes,
            SEQUENTIAL,
            self.rate(self.floor_time),
            self.limit(),
        )
    }
}

/// The scenario of sequential cycles, measured against the round-trip floor.
pub(crate) const SEQUENTIAL: &str = "uncontended acquire+release, sequential";

/// A rate in cycles/s on `nodes` nodes, with the limit it is measured against.
pub(crate) fn against_limit(
    backend: &str,
    nodes: u32,
    scenario: &str,
    value: f64,
    limit: f64,
) -> Figure {
    let mut row = figure(backend, scenario, value, "cycles/s", None);
    row.nodes = Some(nodes);
    row.limit = Some(limit);
    row.ratio_to_limit = Some(value / limit);
    row
}

pub(crate) fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or_default()
}

/// The single-client cycle limit of `server`: 1 / (1/r_acquire + 1/r_release), each rate from
/// `redis-benchmark -c 1` running the exact command. The acquire is a plain command, or a
/// script (loaded first) with its arguments when `acquire` starts with `EVALSHA` (the digest is
/// filled in); the release is always a script. `extra` goes before the command (e.g. `-r N`).
pub(crate) fn cycle_limit(
    server: &RedisServer,
    requests: u32,
    extra: &[&str],
    acquire: &[&str],
    release: (&str, &[&str]),
) -> BenchResult<f64> {
    let acquire = match acquire.split_first() {
        Some((&"EVALSHA", rest)) => {
            let (script, args) = rest.split_first().ok_or("EVALSHA needs a script")?;
            let mut command = vec!["EVALSHA".to_owned(), script_sha(server, script)?];
            command.extend(args.iter().map(|arg| (*arg).to_owned()));
            command
        }
        _ => acquire.iter().map(|arg| (*arg).to_owned()).collect(),
    };
    let mut release_command = vec!["EVALSHA".to_owned(), script_sha(server, release.0)?];
    release_command.extend(release.1.iter().map(|arg| (*arg).to_owned()));
    let acquire = redis_benchmark(server, requests, extra, &acquire)?;
    let release = redis_benchmark(server, requests, extra, &release_command)?;
    Ok(1.0 / (1.0 / acquire + 1.0 / release))
}

/// Loads a script with `redis-cli` and returns its digest.
fn script_sha(server: &RedisServer, script: &str) -> BenchResult<String> {
    let output = Command::new("redis-cli")
        .args(["-p", &server.port().to_string(), "SCRIPT", "LOAD", script])
        .output()?;
    let sha = String::from_utf8(output.stdout)?.trim().to_owned();
    if sha.len() != 40 {
        return Err(format!("SCRIPT LOAD answered `{sha}`").into());
    }
    Ok(sha)
}

/// Requests per second of one command from `redis-benchmark` with a single client.
fn redis_benchmark(
    server: &RedisServer,
    requests: u32,
    extra: &[&str],
    command: &[String],
) -> BenchResult<f64> {
    let output = Command::new("redis-benchmark")
        .args([
            "-p",
            &server.port().to_string(),
            "-c",
            "1",
            "-n",
            &requests.to_string(),
            "--csv",
        ])
        .args(extra)
        .args(command)
        .output()?;
    let stdout = String::from_utf8(output.stdout)?;
    let line = stdout
        .lines()
        .nth(1)
        .ok_or_else(|| format!("redis-benchmark printed nothing: {stdout}"))?;
    let rps = line
        .split("\",\"")
        .nth(1)
        .ok_or("unexpected redis-benchmark output")?;
    Ok(rps.trim_matches('"').parse()?)
}

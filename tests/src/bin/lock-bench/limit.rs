//! The physical limit of one server for one client, from `redis-benchmark -c 1` (the limit the
//! issues define), and the helpers that put the in-process blocking floor (`floor.rs`) beside
//! it. Sequential figures take `redis-benchmark` windows spread over the whole measurement
//! (one per round, between the alternating chunks), since a single window beside it drifted
//! by ±20 % on a shared host.

use std::process::Command;

use lock_tests::server::RedisServer;

use crate::{Figure, figure};

pub(crate) type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Cycles per chunk when a client under test alternates with the minimal client.
pub(crate) const CHUNK: u32 = 50;

/// How many alternating chunks cover `rounds` rounds of `cycles`.
pub(crate) fn chunks(cycles: u32, rounds: usize) -> u32 {
    let rounds = u32::try_from(rounds).unwrap_or(u32::MAX);
    (cycles.saturating_mul(rounds) / CHUNK).max(10)
}

/// Whether `chunk` of `chunks` starts one of `rounds` rounds: where a `redis-benchmark` window
/// of the limit goes between the chunks, so that the limit is sampled across the whole
/// measurement rather than once beside it.
pub(crate) fn starts_round(chunk: u32, chunks: u32, rounds: usize) -> bool {
    let rounds = u32::try_from(rounds).unwrap_or(u32::MAX).max(1);
    chunk.is_multiple_of(chunks.div_ceil(rounds).max(1))
}

/// The single-client cycle limit from `redis-benchmark -c 1` windows spread over a
/// measurement: total cycles over the total time the windows' rates imply.
#[derive(Default)]
pub(crate) struct SpreadLimit {
    cycles: f64,
    seconds: f64,
}

impl SpreadLimit {
    /// Adds a window of `cycles` cycles measured at `limit` cycles/s.
    pub(crate) fn add(&mut self, cycles: u32, limit: f64) {
        self.cycles += f64::from(cycles);
        self.seconds += f64::from(cycles) / limit;
    }

    /// Cycles/s over every window.
    pub(crate) fn rate(&self) -> f64 {
        self.cycles / self.seconds
    }
}

/// A client's rate against the limit the issues define (`redis-benchmark -c 1`, spread over
/// the run), with the stricter in-process blocking floor as the reference.
pub(crate) fn against_limit_and_floor(
    backend: &str,
    nodes: u32,
    value: f64,
    limit: f64,
    floor: f64,
) -> Figure {
    let mut row = against_limit(backend, nodes, SEQUENTIAL, value, limit);
    row.reference = Some("blocking floor".to_owned());
    row.ratio_to_reference = Some(value / floor);
    row
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

/// The row that checks the in-process floor against `redis-benchmark -c 1` on the same server.
pub(crate) fn floor_figure(nodes: u32, floor: f64, benchmark_limit: f64) -> Figure {
    against_limit(
        "round-trip floor (minimal client)",
        nodes,
        SEQUENTIAL,
        floor,
        benchmark_limit,
    )
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

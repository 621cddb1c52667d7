//! Project automation, run as `cargo xtask <verb>` from any folder of the workspace.
//!
//! - `it`: the whole test suite, as CI runs it: formatting, the docs checks, clippy, and every test against real
//!   `redis-server` processes (installed first if missing).
//! - `test`: every test as `it` runs them (test binaries two at a time, `XTASK_TEST_JOBS` to
//!   change that), without the other checks.
//! - `docs`: the README's crates and features table against the manifests, the tests named in
//!   `tests/RELIABILITY.md`, no reference outside the repository, and `cargo doc` without
//!   warnings (also run by `it`).
//! - `bench [--quick] [--only memory|redlock|inc]`: the benchmarks, with figures as ratios to references measured in the
//!   same run.
//! - `chaos [--seconds N] [--seed S]`: 16 processes contending on Redlock over 5 nodes while
//!   minority nodes are killed, paused and slowed down; prints the safety figures.
//! - `explore [--seconds N] [--seed S] [--schedules K] [--lanes L]`: seeded adversarial
//!   schedules of clients and faults against real servers, checked for broken promises;
//!   prints `schedules N, violations V` and the seed of each violation.

mod bench;
mod chaos;
mod docs;
mod explore;
mod it;
mod packaged;
mod redis;
mod run;
mod suite;

use std::process::ExitCode;

const USAGE: &str = "usage: cargo xtask <it | test | docs | packaged-tests | bench [--quick] [--only memory|redlock|inc] | chaos [--seconds N] [--seed S] | explore [--seconds N] [--seed S] [--schedules K] [--lanes L]>";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("it") => it::run(&args[1..]),
        Some("test") => it::test(&args[1..]),
        Some("docs") => docs::run(&args[1..]),
        Some("packaged-tests") => packaged::run(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        Some("chaos") => chaos::run(&args[1..]),
        Some("explore") => explore::run(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(USAGE.to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

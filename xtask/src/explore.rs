//! `cargo xtask explore [--seconds N] [--seed S] [--schedules K] [--lanes L]`: the fault
//! explorer (seeded adversarial schedules against real redis-servers), release build.

use crate::redis::ensure_redis_server;
use crate::run::{cargo, step, workspace_root};

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let mut rest = args.iter();
    let mut forwarded = Vec::new();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--seconds" | "--seed" | "--schedules" | "--lanes" => {
                let value = rest.next().ok_or(format!("{arg} needs a number"))?;
                value
                    .parse::<u64>()
                    .map_err(|_| format!("{arg} needs a number, got `{value}`"))?;
                forwarded.extend([arg.clone(), value.clone()]);
            }
            "--verbose" => forwarded.push(arg.clone()),
            other => {
                return Err(format!(
                    "unknown explore option `{other}`; try --seconds N --seed S --schedules K --lanes L --verbose"
                ));
            }
        }
    }
    if !forwarded.iter().any(|arg| arg == "--seconds") {
        forwarded.extend(["--seconds".to_owned(), "600".to_owned()]);
    }
    run_explorer(&forwarded, true)
}

/// Builds and runs the explorer with `args`.
pub(crate) fn run_explorer(args: &[String], release: bool) -> Result<(), String> {
    let redis_server = ensure_redis_server()?;
    let mut build = cargo();
    build.args([
        "build",
        "--quiet",
        "-p",
        "lock-tests",
        "--bin",
        "lock-explore",
    ]);
    if release {
        build.arg("--release");
    }
    step("build lock-explore", &mut build)?;
    let profile = if release { "release" } else { "debug" };
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), Into::into);
    step(
        "lock-explore",
        std::process::Command::new(target.join(profile).join("lock-explore"))
            .args(args)
            .env("REDIS_SERVER", redis_server),
    )
}

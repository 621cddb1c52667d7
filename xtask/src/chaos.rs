//! `cargo xtask chaos [--seconds N] [--seed S]`: the seeded fault run, in release mode.

use crate::redis::ensure_redis_server;
use crate::run::{cargo, step, workspace_root};

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let mut rest = args.iter();
    let mut forwarded = Vec::new();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--seconds" | "--seed" => {
                let value = rest.next().ok_or(format!("{arg} needs a number"))?;
                value
                    .parse::<u64>()
                    .map_err(|_| format!("{arg} needs a number, got `{value}`"))?;
                forwarded.extend([arg.clone(), value.clone()]);
            }
            other => {
                return Err(format!(
                    "unknown chaos option `{other}`; try --seconds N --seed S"
                ));
            }
        }
    }
    if !forwarded.iter().any(|arg| arg == "--seconds") {
        forwarded.extend(["--seconds".to_owned(), "300".to_owned()]);
    }
    run_chaos(&forwarded, true)
}

/// Builds the worker and chaos binaries and runs the chaos driver with `args`.
pub(crate) fn run_chaos(args: &[String], release: bool) -> Result<(), String> {
    let redis_server = ensure_redis_server()?;
    let mut build = cargo();
    build.args(["build", "--quiet", "-p", "lock-tests", "--bins"]);
    if release {
        build.arg("--release");
    }
    step("build lock-chaos and lock-worker", &mut build)?;
    let profile = if release { "release" } else { "debug" };
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), Into::into);
    let binary = target.join(profile).join("lock-chaos");
    step(
        "lock-chaos",
        std::process::Command::new(binary)
            .args(args)
            .env("REDIS_SERVER", redis_server),
    )
}

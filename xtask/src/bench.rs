//! `cargo xtask bench`: builds and runs the benchmark binary in release mode.

use crate::redis::ensure_redis_server;
use crate::run::{cargo, step};

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--quick" => {}
            "--only" => match rest.next().map(String::as_str) {
                Some(
                    "memory" | "redlock" | "redlock-1" | "redlock-contended" | "inc" | "fair"
                    | "fair-uncontended",
                ) => {}
                other => {
                    return Err(format!(
                        "--only takes memory, redlock, redlock-1, redlock-contended, inc, fair or fair-uncontended, got {other:?}"
                    ));
                }
            },
            other => {
                return Err(format!(
                    "unknown bench option `{other}`; try --quick or --only memory|redlock|redlock-1|redlock-contended|inc|fair|fair-uncontended"
                ));
            }
        }
    }
    let redis_server = ensure_redis_server()?;
    step(
        "lock-bench",
        cargo()
            .args([
                "run",
                "--release",
                "--quiet",
                "-p",
                "lock-tests",
                "--bin",
                "lock-bench",
                "--",
            ])
            .args(args)
            .env("REDIS_SERVER", &redis_server),
    )
}

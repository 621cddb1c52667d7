//! `cargo xtask bench`: builds and runs the benchmark binary in release mode.

use crate::run::{cargo, step};

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    for arg in args {
        if arg != "--quick" {
            return Err(format!("unknown bench option `{arg}`; try --quick"));
        }
    }
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
            .args(args),
    )
}

//! Running commands from the workspace root, with their name and duration printed.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

/// The workspace root, whatever folder `cargo xtask` was started from.
pub(crate) fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map_or(manifest_dir.clone(), PathBuf::from)
}

/// `cargo`, as the one that started xtask.
pub(crate) fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.current_dir(workspace_root());
    command
}

/// Runs `command` as a named step; fails with the step's name if it does not succeed.
pub(crate) fn step(name: &str, command: &mut Command) -> Result<(), String> {
    println!("\n== {name}");
    let started = Instant::now();
    let status = command
        .status()
        .map_err(|e| format!("{name}: cannot start {:?}: {e}", command.get_program()))?;
    let elapsed = started.elapsed().as_secs_f64();
    if status.success() {
        println!("== {name}: ok in {elapsed:.1} s");
        Ok(())
    } else {
        Err(format!("{name} failed ({status}) after {elapsed:.1} s"))
    }
}

//! `cargo xtask packaged-tests`: the tests of a published package build from the package alone.
//!
//! Packaging drops a path-only dev-dependency, such as lock-memory's on itself with its
//! `testing` feature, so a test that needs it must say so (`required-features`) or the
//! package's `cargo test` does not compile. This builds the tests of such a package, extracted
//! from its `.crate`, against the workspace's crates standing in for crates.io.

use std::path::PathBuf;
use std::process::Command;

use crate::run::{cargo, step, workspace_root};

/// The packages whose manifests have a path-only dev-dependency that packaging drops.
const PACKAGES: [&str; 1] = ["lock-memory"];

/// The workspace crates those packages depend on, patched in from their paths.
const PATCHED: [&str; 1] = ["lock-core"];

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    if let Some(unknown) = args.first() {
        return Err(format!(
            "`packaged-tests` takes no arguments, got `{unknown}`"
        ));
    }
    let root = workspace_root();
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let version = env!("CARGO_PKG_VERSION");
    for package in PACKAGES {
        let mut packaging = cargo();
        packaging.args(["package", "--allow-dirty", "--no-verify", "-p", package]);
        for patched in PATCHED {
            packaging.args(["-p", patched]);
        }
        step(&format!("cargo package -p {package}"), &mut packaging)?;
        let unpacked = target.join("packaged-tests");
        let _ = std::fs::remove_dir_all(&unpacked);
        std::fs::create_dir_all(&unpacked).map_err(|e| format!("{}: {e}", unpacked.display()))?;
        let archive = target
            .join("package")
            .join(format!("{package}-{version}.crate"));
        step(
            &format!("unpack {package}"),
            Command::new("tar")
                .arg("xzf")
                .arg(&archive)
                .arg("-C")
                .arg(&unpacked),
        )?;
        let dir = unpacked.join(format!("{package}-{version}"));
        let manifest = dir.join("Cargo.toml");
        let mut text = std::fs::read_to_string(&manifest)
            .map_err(|e| format!("{}: {e}", manifest.display()))?;
        text.push_str("\n[workspace]\n\n[patch.crates-io]\n");
        for patched in PATCHED {
            let path = root.join(patched);
            text.push_str(&format!(
                "{patched} = {{ path = {:?} }}\n",
                path.display().to_string()
            ));
        }
        std::fs::write(&manifest, text).map_err(|e| format!("{}: {e}", manifest.display()))?;
        std::fs::copy(root.join("Cargo.lock"), dir.join("Cargo.lock"))
            .map_err(|e| format!("Cargo.lock: {e}"))?;
        step(
            &format!("the tests of the packaged {package} build"),
            cargo()
                .current_dir(&dir)
                .env("CARGO_TARGET_DIR", &target)
                .args(["test", "--tests", "--no-run"]),
        )?;
    }
    Ok(())
}

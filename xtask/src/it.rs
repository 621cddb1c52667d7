//! `cargo xtask it`: the single test entry point, locally and in CI.

use crate::redis::{ensure_fault_tools, ensure_redis_server, ensure_valkey_server};
use crate::run::{cargo, step};

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    if let Some(unknown) = args.first() {
        return Err(format!("`it` takes no arguments, got `{unknown}`"));
    }
    let redis_server = ensure_redis_server()?;
    println!("== using {}", redis_server.display());
    let valkey_server = ensure_valkey_server()?;
    println!("== using {}", valkey_server.display());
    let fault_tools = ensure_fault_tools();

    step(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    // The README's crates and features, the tests the reliability matrix names, and rustdoc.
    crate::docs::check_all()?;
    step(
        "cargo clippy -D warnings",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    // `--all-targets` leaves out test targets that a plain `cargo test` skips (`test = false`).
    step(
        "cargo clippy --test conformance_cluster",
        cargo().args([
            "clippy",
            "--workspace",
            "--test",
            "conformance_cluster",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    // The facade's features, each alone and all together, build and pass clippy; the backends
    // alone build the core without `metrics`, `full,metrics` with it (and the prometheus example).
    for feature in [
        "memory",
        "redlock",
        "inc",
        "full",
        "full,metrics",
        "full,cli",
    ] {
        step(
            &format!("lock-facade --features {feature}"),
            cargo().args([
                "clippy",
                "-p",
                "lock-facade",
                "--all-targets",
                "--no-default-features",
                "--features",
                feature,
                "--",
                "-D",
                "warnings",
            ]),
        )?;
    }
    // Every library crate packages and builds from its package alone, as crates.io would
    // (the workspace's crates stand in for each other before they are published).
    forget_packaged_sources()?;
    step(
        "cargo publish --dry-run (every library crate)",
        cargo().args([
            "publish",
            "--workspace",
            "--dry-run",
            "--allow-dirty",
            "--exclude",
            "xtask",
            "--exclude",
            "lock-tests",
        ]),
    )?;
    // The tests of a package whose path-only dev-dependency packaging drops build from it alone.
    crate::packaged::run(&[])?;
    // Every test, with real redis-servers: a missing server fails instead of skipping.
    step(
        "cargo test --workspace",
        cargo()
            .args(["test", "--workspace"])
            .env("REDIS_SERVER", &redis_server)
            .env("VALKEY_SERVER", &valkey_server)
            .env("LOCK_TESTS_REQUIRE_VALKEY", "1")
            .env("LOCK_TESTS_REQUIRE_REDIS", "1")
            .env(
                "LOCK_TESTS_REQUIRE_FAULT_TOOLS",
                if fault_tools { "1" } else { "0" },
            ),
    )?;
    // The conformance suite on Redis Clusters, left out of a plain `cargo test`: each case
    // waits about 2 s for its fresh cluster to turn writable and uses little CPU, so many run at
    // once (the same feature resolution as above: only this target is built).
    step(
        "cargo test --workspace --test conformance_cluster",
        cargo()
            .args(["test", "--workspace", "--test", "conformance_cluster", "--"])
            .args(["--test-threads", "8"])
            .env("REDIS_SERVER", &redis_server)
            .env("LOCK_TESTS_REQUIRE_REDIS", "1"),
    )?;
    // A short seeded chaos run on top (the full one is `cargo xtask chaos`).
    crate::chaos::run_chaos(
        &[
            "--seconds".to_owned(),
            "20".to_owned(),
            "--seed".to_owned(),
            "1".to_owned(),
        ],
        false,
    )?;
    // A bounded run of the fault explorer (the long one is `cargo xtask explore`); a seed per
    // commit would make CI flaky, so it is fixed: the same schedules every time.
    crate::explore::run_explorer(
        &[
            "--seconds".to_owned(),
            "60".to_owned(),
            "--seed".to_owned(),
            "1".to_owned(),
        ],
        false,
    )?;
    println!("\n== all checks passed");
    Ok(())
}

/// The library crates `cargo publish --workspace --dry-run` packages.
const LIBRARY_CRATES: [&str; 5] = [
    "lock-core",
    "lock-memory",
    "lock-redlock",
    "lock-inc",
    "lock-facade",
];

/// Removes cargo's extracted copies of our own crates from the temporary local registry that
/// `cargo publish --workspace` verifies against. Cargo names that registry after its path and
/// never extracts a crate again once a copy is there, so a dry run from a checkout at a path
/// used before would build the dependents against the crates of that earlier run.
/// Crates from crates.io are left alone.
fn forget_packaged_sources() -> Result<(), String> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|home| std::path::Path::new(&home).join(".cargo"))
        });
    let Some(sources) = cargo_home.map(|home| home.join("registry").join("src")) else {
        return Ok(());
    };
    let Ok(registries) = std::fs::read_dir(&sources) else {
        return Ok(());
    };
    let version = env!("CARGO_PKG_VERSION");
    for registry in registries.flatten() {
        // Local registries are named `-<hash>`; crates.io's is `index.crates.io-<hash>`.
        if !registry.file_name().to_string_lossy().starts_with('-') {
            continue;
        }
        for name in LIBRARY_CRATES {
            let copy = registry.path().join(format!("{name}-{version}"));
            if copy.exists() {
                std::fs::remove_dir_all(&copy)
                    .map_err(|error| format!("cannot remove {}: {error}", copy.display()))?;
            }
        }
    }
    Ok(())
}

//! R9: network partitions made with nftables inside a network namespace the test creates. The
//! scenario runs in the `lock-partition` helper inside the namespace (see its docs); this test
//! sets the namespace up, removes it afterwards and checks the figures the helper prints.
//!
//! Skips with a printed reason where the kernel or the user may not create namespaces, or
//! where `nft` is missing (unless `cargo xtask it` installed it and asks for it).

use std::process::Command;

use lock_tests::server::redis_or_skip;

/// A network namespace, deleted on drop.
struct Namespace(String);

impl Namespace {
    fn create() -> Result<Self, String> {
        let name = format!("lock-r9-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let namespace = Self(name);
        ip(&[
            "netns",
            "exec",
            &namespace.0,
            "ip",
            "link",
            "set",
            "lo",
            "up",
        ])?;
        Ok(namespace)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn nft_available() -> bool {
    Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success())
}

#[test]
fn r9_partitions_keep_safety_and_ghost_writes_expire() {
    let Some(binary) = redis_or_skip("partition test") else {
        return;
    };
    if !nft_available() {
        assert!(
            !std::env::var("LOCK_TESTS_REQUIRE_FAULT_TOOLS").is_ok_and(|v| v == "1"),
            "nft not found (apt-get install nftables)"
        );
        println!("R9: skipped, nft not found (apt-get install nftables)");
        return;
    }
    let namespace = match Namespace::create() {
        Ok(namespace) => namespace,
        Err(reason) => {
            println!("R9: skipped, cannot create a network namespace here: {reason}");
            return;
        }
    };
    let output = Command::new("ip")
        .args(["netns", "exec", &namespace.0])
        .arg(env!("CARGO_BIN_EXE_lock-partition"))
        .arg(&binary)
        .output()
        .expect("ip netns exec runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "lock-partition failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let field = |name: &str| -> String {
        stdout
            .split_whitespace()
            .skip_while(|word| *word != name)
            .nth(1)
            .unwrap_or_else(|| panic!("no {name} in `{stdout}`"))
            .to_owned()
    };
    let number = |name: &str| -> f64 { field(name).parse().expect("a number") };
    println!("R9 (nft drop in a netns): {}", stdout.trim());
    assert!(
        number("minority_max_ms") < 200.0,
        "a cut-off minority node slowed acquisitions down"
    );
    assert_eq!(field("error"), "quorum-1-of-2", "two nodes cut off");
    assert!(
        number("failed_in_ms") < 1_500.0 + 700.0,
        "the quorum error came after the deadline"
    );
    assert_eq!(number("believed_holders"), 0.0);
    assert!(
        number("late_sets_executed") > 0.0,
        "the dropped SETs never reached the cut-off nodes: no ghost write was tested"
    );
    assert_eq!(number("ghosts_left_after_ttl"), 0.0);
    assert!(
        number("reacquire_ms") < 1_000.0 + 2_000.0,
        "the lock did not come back within the ttl after healing"
    );
}

//! A nested `lockConfig` that is a relative path, in a configuration file: it names the file
//! next to the one that nests it, as an include does, whatever the working directory (before,
//! it named a file from the working directory: `lockrun --config /etc/app/lock.json` with
//! `{"lockConfig": "base.json"}` failed with "no such file" unless run from `/etc/app`).
#![cfg(all(feature = "memory", feature = "cli"))]
#![allow(clippy::unwrap_used)]

use std::path::Path;

use lock_facade::LockConfig;

mod support;
use support::{code, lockrun, shown};

/// `dir/outer.json` nesting `dir/inner.json` (by the relative path `nested`), which sets the
/// namespace `from-inner`.
fn nested_files(dir: &Path, nested: &str) -> std::path::PathBuf {
    let outer = dir.join("outer.json");
    std::fs::write(
        &outer,
        serde_json::json!({ "ttl": 7000, "lockConfig": nested }).to_string(),
    )
    .unwrap();
    let inner = dir.join(nested);
    std::fs::create_dir_all(inner.parent().unwrap()).unwrap();
    std::fs::write(
        inner,
        serde_json::json!({ "type": "memory", "namespace": "from-inner" }).to_string(),
    )
    .unwrap();
    outer
}

#[test]
fn a_relative_nested_path_names_the_file_next_to_the_one_that_nests_it() {
    let dir = tempfile::tempdir().unwrap();
    // Two levels: outer.json → conf/inner.json, whose own nested path is relative to conf/.
    let outer = nested_files(dir.path(), "conf/inner.json");
    std::fs::write(
        dir.path().join("conf/inner.json"),
        serde_json::json!({ "namespace": "from-inner", "lockConfig": "base.toml" }).to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("conf/base.toml"),
        "type = \"memory\"\nretryCount = 4\n",
    )
    .unwrap();
    // The working directory (the package's, under cargo test) holds none of these files.
    assert!(!Path::new("conf/inner.json").exists());
    let config = LockConfig::from_file(&outer).unwrap().resolve().unwrap();
    assert_eq!(config.namespace.as_deref(), Some("from-inner"));
    assert_eq!(config.backend.as_deref(), Some("memory"));
    assert_eq!(config.ttl, Some(7000));
    assert_eq!(config.retry.retry_count, Some(4));
}

#[test]
fn lockrun_reads_a_nested_file_next_to_its_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let outer = nested_files(dir.path(), "inner.json");
    let output = lockrun()
        .current_dir(std::env::temp_dir())
        .args(["--config", outer.to_str().unwrap(), "status", "k"])
        .output()
        .unwrap();
    assert_eq!(code(&output), 0, "{}", shown(&output));
    assert!(
        shown(&output).contains("from-inner:k on "),
        "the nested file's namespace was not read: {}",
        shown(&output)
    );
}

/// A relative nested path that names no file next to the nesting one still names a file from
/// the working directory (as before).
#[test]
fn a_nested_path_not_found_next_to_the_file_is_read_from_the_working_directory() {
    let here = tempfile::Builder::new()
        .suffix(".json")
        .tempfile_in(".")
        .unwrap();
    std::fs::write(
        here.path(),
        serde_json::json!({ "namespace": "from-cwd" }).to_string(),
    )
    .unwrap();
    let name = here.path().file_name().unwrap().to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let outer = dir.path().join("outer.json");
    std::fs::write(
        &outer,
        serde_json::json!({ "lockConfig": name }).to_string(),
    )
    .unwrap();
    let config = LockConfig::from_file(&outer).unwrap().resolve().unwrap();
    assert_eq!(config.namespace.as_deref(), Some("from-cwd"));
}

/// A missing configuration file whose name holds a `=` is named as missing (old: parsed as
/// inline TOML, "string values must be quoted"); inline TOML stays inline.
#[test]
fn a_missing_file_with_an_equals_sign_in_its_name_is_named_missing() {
    let error = LockConfig::from_text("conf=prod.json")
        .unwrap_err()
        .to_string();
    assert!(error.contains("no such file"), "{error}");
    let error = LockConfig::from_json(r#"{"lockConfig": "conf=prod.toml"}"#)
        .unwrap()
        .resolve()
        .unwrap_err()
        .to_string();
    assert!(error.contains("no such file"), "{error}");
    let inline = LockConfig::from_text("type = \"memory\"\nnamespace = \"a.json\"").unwrap();
    assert_eq!(inline.namespace.as_deref(), Some("a.json"));
    let inline = LockConfig::from_text("namespace='x.toml'").unwrap();
    assert_eq!(inline.namespace.as_deref(), Some("x.toml"));
}

//! Session 34b attacks on the namespace that carries a password (refused since f4a1e64,
//! 1b5ef16) and on relative nested `lockConfig` paths in a file (next to it since ca1aeb4).
#![cfg(all(feature = "memory", feature = "cli"))]
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use lock_facade::{LockConfig, LockError, Locker, Namespace};

mod support;
use support::{code, lockrun, shown};

const SECRET: &str = "s3cretPW";

/// `lockrun` with `--config config` and `args`, from the system's temporary directory.
fn run(config: &str, args: &[&str]) -> Output {
    lockrun()
        .current_dir(std::env::temp_dir())
        .args(["--config", config])
        .args(args)
        .output()
        .unwrap()
}

/// Asserts that nothing `lockrun` printed for `namespace` (as JSON and as TOML, by `status`,
/// `status --json` and `purge`) holds the password, and that the run was refused.
fn refused_without_password(namespace: &str) {
    let json = serde_json::json!({ "namespace": namespace }).to_string();
    let toml = format!("namespace = {}", toml_string(namespace));
    for config in [&json, &toml] {
        for args in [
            &["status", "k"][..],
            &["status", "--json", "k"],
            &["purge", "p"],
            &["--no-wait", "k", "--", "true"],
        ] {
            let output = run(config, args);
            let text = shown(&output);
            assert!(
                !text.contains(SECRET),
                "{namespace:?} {args:?}: the password is shown: {text}"
            );
            assert_eq!(code(&output), 78, "{namespace:?} {args:?}: {text}");
        }
    }
}

/// `text` as a TOML basic string.
fn toml_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The message and `Debug` of `Namespace::new(namespace)`'s error, and the `Debug` of a
/// configuration holding it, must not hold the password.
fn no_password_in_code_paths(namespace: &str) {
    let error = Namespace::new(namespace).unwrap_err();
    assert!(matches!(error, LockError::InvalidInput { .. }), "{error:?}");
    for text in [error.to_string(), format!("{error:?}")] {
        assert!(!text.contains(SECRET), "{namespace:?}: {text}");
    }
    let config = LockConfig {
        namespace: Some(namespace.to_owned()),
        ..LockConfig::default()
    };
    let debug = format!("{config:?}");
    assert!(!debug.contains(SECRET), "{namespace:?}: Debug {debug}");
}

// ---------------------------------------------------------------------------------------------
// Namespaces.

/// A namespace that holds a URL with a password after an earlier `@` (an owner's address, or
/// a first URL with a user name): refused, but the refusal quoted the namespace through
/// `redact_url`, which read the user info up to the LAST `@` and so hid only the first part:
/// `` `***@acme redis://h:s3cretPW` is a URL with a password ``. `Debug` of the configuration
/// showed it the same way.
#[test]
fn a_refused_namespace_is_quoted_without_a_password_after_an_earlier_at() {
    for namespace in [
        format!("ops@acme redis://h:{SECRET}"),
        format!("redis://app@h1 redis://h2:{SECRET}"),
        format!("a@b:redis://h:{SECRET}/0"),
    ] {
        no_password_in_code_paths(&namespace);
        refused_without_password(&namespace);
    }
}

/// A URL whose `://` holds an ASCII tab or newline: drivers parse URLs as WHATWG does, which
/// drops tabs and newlines anywhere first, so `redis:/<TAB>/:pw@h` is `redis://:pw@h` with the
/// password `pw` (node's `new URL` agrees). `carries_secret` looked for a literal `://` and let
/// it through: `lockrun status k` printed `redis:/\t/:s3cretPW@h:k`.
#[test]
fn a_namespace_url_with_a_tab_or_newline_in_its_separator_is_refused() {
    for namespace in [
        format!("redis:/\t/:{SECRET}@h"),
        format!("redis:\n//:{SECRET}@h"),
        format!("rediss:/\r/app:{SECRET}@h:6380"),
        format!("redis:/\t/h:6379/?password={SECRET}"),
    ] {
        no_password_in_code_paths(&namespace);
        refused_without_password(&namespace);
    }
}

/// Forms that held: percent-encoded passwords, upper case, a username only, passwords with
/// `@`, `/`, `:` in them, query passwords in other spellings, leading whitespace, unicode
/// before the scheme: refused everywhere (JSON, TOML, status, status --json, purge, a command)
/// with the password never shown.
#[test]
fn held_namespace_forms_are_refused_without_the_password() {
    for namespace in [
        format!("redis://:{SECRET}%40x@h"),
        format!("REDIS://:{SECRET}@H"),
        format!("redis://app:{SECRET}@h:6379/0"),
        format!("redis://app:p@ss/{SECRET}@h"),
        format!("valkey://h/?sentinelPassword={SECRET}"),
        format!("redis+unix:///tmp/s.sock?P%41SS={SECRET}"),
        format!("billing:redis://{SECRET}@h"),
        format!("redis://h:{SECRET}"),
        format!("ns\u{0}redis://:{SECRET}@h"),
    ] {
        no_password_in_code_paths(&namespace);
        refused_without_password(&namespace);
    }
}

/// A namespace with a non-ASCII character right before a `scheme://` (`é-https://…`,
/// `→redis://…`, a no-break space): `carries_secret` sliced the text one byte after the start
/// of that character, inside it, and panicked: `lockrun status k` died with exit 101 and
/// "start byte index 1 is not a char boundary", for a namespace with no secret too. One
/// without a password is taken; one with a password is refused without it.
#[test]
fn a_non_ascii_character_before_a_scheme_is_no_panic() {
    for namespace in [
        "é-https://example.com/orders",
        "→https://example.com/orders",
    ] {
        let result = std::panic::catch_unwind(|| Namespace::new(namespace).is_ok());
        assert!(matches!(result, Ok(true)), "{namespace:?}: {result:?}");
        let output = run(
            &serde_json::json!({ "namespace": namespace }).to_string(),
            &["status", "k"],
        );
        assert_eq!(code(&output), 0, "{namespace:?}: {}", shown(&output));
    }
    for namespace in [
        format!("\u{a0}redis://:{SECRET}@h"),
        format!("é-redis://:{SECRET}@h"),
        format!("→redis://app:{SECRET}@h"),
    ] {
        let result = std::panic::catch_unwind(|| Namespace::new(namespace.as_str()).is_err());
        assert!(matches!(result, Ok(true)), "{namespace:?}: {result:?}");
        no_password_in_code_paths(&namespace);
        refused_without_password(&namespace);
    }
}

/// `Locker::with_namespace` and `Locker::key_for` with another namespace refuse such a
/// namespace too, without the password in the error.
#[test]
fn locker_namespace_entry_points_refuse_a_url_with_a_password() {
    let locker = Locker::new(lock_facade::memory::MemoryLock::new());
    let namespace = format!("redis://:{SECRET}@h");
    let error = locker.key_for(Some(&namespace), "k").unwrap_err();
    assert!(!format!("{error} {error:?}").contains(SECRET), "{error:?}");
    let error = locker.with_namespace(Some(&namespace)).unwrap_err();
    assert!(!format!("{error} {error:?}").contains(SECRET), "{error:?}");
}

// ---------------------------------------------------------------------------------------------
// Nested relative paths.

/// Writes `path` (parents made) with `json`.
fn write(path: &Path, json: serde_json::Value) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, json.to_string()).unwrap();
}

/// A file that nests itself by a relative path (`self.json`, `./self.json`, or
/// `sub/../self.json`, which grows by one step each level) is refused by the nesting limit,
/// at once, naming `lock_config`.
#[test]
fn a_file_nesting_itself_by_a_relative_path_is_refused_quickly() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    for nested in ["self.json", "./self.json", "sub/../self.json"] {
        let file = dir.path().join("self.json");
        write(
            &file,
            serde_json::json!({ "namespace": "loop", "lockConfig": nested }),
        );
        let start = Instant::now();
        let error = LockConfig::from_file(&file).unwrap().resolve().unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5), "{nested}");
        assert!(error.to_string().contains("nests more than"), "{error}");
        let output = run(file.to_str().unwrap(), &["status", "k"]);
        assert_eq!(code(&output), 78, "{}", shown(&output));
        assert!(
            shown(&output).contains("nests more than"),
            "{}",
            shown(&output)
        );
    }
}

/// A chain of four files in four directories, each naming the next by a path relative to its
/// own directory (`..`, a space, a `=` in the names), read from a working directory that
/// holds same-named decoys: each level's file is the one next to its nesting file.
#[test]
fn a_chain_across_directories_reads_the_files_next_to_each_other() {
    let root = tempfile::tempdir().unwrap();
    let a = root.path().join("a dir/one.json");
    write(
        &a,
        serde_json::json!({ "ttl": 1111, "lockConfig": "../b=dir/two.json" }),
    );
    write(
        &root.path().join("b=dir/two.json"),
        serde_json::json!({ "retryCount": 3, "lockConfig": "../c/three x.json" }),
    );
    write(
        &root.path().join("c/three x.json"),
        serde_json::json!({ "lockConfig": { "lockConfig": "four.json" } }),
    );
    write(
        &root.path().join("c/four.json"),
        serde_json::json!({ "namespace": "from-four" }),
    );
    // Decoys in the working directory, under the same relative names.
    let cwd = tempfile::tempdir().unwrap();
    write(
        &cwd.path().join("four.json"),
        serde_json::json!({ "namespace": "decoy" }),
    );
    let output = lockrun()
        .current_dir(cwd.path())
        .args(["--config", a.to_str().unwrap(), "status", "k"])
        .output()
        .unwrap();
    assert_eq!(code(&output), 0, "{}", shown(&output));
    assert!(
        shown(&output).contains("from-four:k on "),
        "{}",
        shown(&output)
    );
}

/// Through a symlinked configuration file, a relative nested path names the file next to the
/// link (the path as given, as a C `#include` does), and `LOCK_CONFIG` naming a file anchors
/// as `--config` does.
#[test]
fn a_symlinked_file_and_lock_config_anchor_next_to_the_path_given() {
    let root = tempfile::tempdir().unwrap();
    let real = root.path().join("real/lock.json");
    write(&real, serde_json::json!({ "lockConfig": "base.json" }));
    write(
        &root.path().join("real/base.json"),
        serde_json::json!({ "namespace": "beside-target" }),
    );
    write(
        &root.path().join("etc/base.json"),
        serde_json::json!({ "namespace": "beside-link" }),
    );
    let link = root.path().join("etc/lock.json");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let config = LockConfig::from_file(&link).unwrap().resolve().unwrap();
    assert_eq!(config.namespace.as_deref(), Some("beside-link"));
    let output = lockrun()
        .current_dir(std::env::temp_dir())
        .env("LOCK_CONFIG", &real)
        .args(["status", "k"])
        .output()
        .unwrap();
    assert!(
        shown(&output).contains("beside-target:k on "),
        "{}",
        shown(&output)
    );
}

/// Inline TOML nested in a file (a string with a `=`) is still read as TOML, not as a path,
/// and an inline JSON string is read as JSON.
#[test]
fn inline_documents_nested_in_a_file_are_not_paths() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("outer.json");
    write(
        &file,
        serde_json::json!({ "lockConfig": "namespace = \"inline-toml\"" }),
    );
    let config = LockConfig::from_file(&file).unwrap().resolve().unwrap();
    assert_eq!(config.namespace.as_deref(), Some("inline-toml"));
    write(
        &file,
        serde_json::json!({ "lockConfig": " {\"namespace\": \"inline-json\"}" }),
    );
    let config = LockConfig::from_file(&file).unwrap().resolve().unwrap();
    assert_eq!(config.namespace.as_deref(), Some("inline-json"));
}

/// A configuration file in a directory whose name is not UTF-8 nesting `inner.json` next to
/// it: the anchored path was stored with `Path::display` (U+FFFD for the odd byte), so it
/// named no file, and the read failed with "no such file" (before ca1aeb4, run from that
/// directory, it read the file). Only `LockConfig::from_file` with such a path meets it
/// (`--config` and `LOCK_CONFIG` are UTF-8).
#[test]
#[ignore = "unfixed: ConfigSource::Text holds a String, which cannot name a file in a non-UTF-8 directory (it needs a path variant, an API change)"]
fn a_nested_path_next_to_a_file_in_a_non_utf8_directory_is_read() {
    use std::os::unix::ffi::OsStrExt;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join(std::ffi::OsStr::from_bytes(b"caf\xe9"));
    let outer = dir.join("outer.json");
    write(&outer, serde_json::json!({ "lockConfig": "inner.json" }));
    write(
        &dir.join("inner.json"),
        serde_json::json!({ "namespace": "from-inner" }),
    );
    let config = LockConfig::from_file(&outer).and_then(LockConfig::resolve);
    assert_eq!(
        config.as_ref().ok().and_then(|c| c.namespace.as_deref()),
        Some("from-inner"),
        "{config:?}"
    );
}

/// An inline document given as a string (JSON, or TOML) nested in a file, which itself nests a
/// relative path: that path names the file next to the nesting file, as it does when the same
/// document is nested as an object (old: the object form read `d/inner.json`, the string forms
/// read `inner.json` from the working directory, here a decoy).
#[test]
fn a_relative_path_in_an_inline_string_nested_in_a_file_names_the_file_next_to_it() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("d/inner.json"),
        serde_json::json!({ "namespace": "beside" }),
    );
    let cwd = tempfile::tempdir().unwrap();
    write(
        &cwd.path().join("inner.json"),
        serde_json::json!({ "namespace": "cwd-decoy" }),
    );
    let json = dir.path().join("d/a.json");
    write(
        &json,
        serde_json::json!({ "lockConfig": "{\"lockConfig\": \"inner.json\"}" }),
    );
    let toml = dir.path().join("d/c.toml");
    std::fs::write(&toml, "lockConfig = \"lockConfig = \\\"inner.json\\\"\"\n").unwrap();
    let object = dir.path().join("d/o.json");
    write(
        &object,
        serde_json::json!({ "lockConfig": { "lockConfig": "inner.json" } }),
    );
    for file in [&object, &json, &toml] {
        let output = lockrun()
            .current_dir(cwd.path())
            .args(["--config", file.to_str().unwrap(), "status", "k"])
            .output()
            .unwrap();
        assert!(
            shown(&output).contains("beside:k on "),
            "{}: {}",
            file.display(),
            shown(&output)
        );
    }
}

//! Session 33a: configuration files without end — `/dev/zero`, a huge file — as `LOCK_CONFIG`,
//! `--config` or a nested `lockConfig`. `LockConfig::from_file` read them with
//! `std::fs::read_to_string`, without bound: lockrun filled memory before it failed.
#![cfg(all(feature = "redlock", feature = "cli"))]
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use lock_facade::{LockConfig, LockError};

mod support;
use support::{LOCKRUN, shown};

/// The documented bound of a configuration file: 1 MiB.
const LIMIT: usize = 1 << 20;

/// What every refusal says.
const SAYS_THE_LIMIT: &str = "1048576 bytes";

/// The address space lockrun is given (KiB for `ulimit -v`): far more than it needs, little
/// enough that an unbounded read fails within a second instead of filling the machine.
const ADDRESS_SPACE_KIB: u64 = 2 << 20;

/// lockrun under `ulimit -v`, killed if it runs on past a deadline: a read without bound must
/// not take the test machine's memory (it did on 09d3b89).
fn guarded_lockrun(env_config: Option<&str>, args: &[&str]) -> (Output, Duration) {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!("ulimit -v {ADDRESS_SPACE_KIB} && exec \"$@\""))
        .arg("sh")
        .arg(LOCKRUN)
        .args(args)
        .env_remove("LOCK_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(config) = env_config {
        command.env("LOCK_CONFIG", config);
    }
    let started = Instant::now();
    let mut child = command.spawn().unwrap();
    let deadline = started + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = child.wait_with_output().unwrap();
    (output, started.elapsed())
}

/// A refusal of `file` for its size: exit 78, at once, naming the file and the limit.
fn assert_refused(what: &str, (output, took): &(Output, Duration), file: &str) {
    let shown = shown(output);
    assert_eq!(output.status.code(), Some(78), "{what}: {output:?}");
    assert!(
        *took < Duration::from_secs(5),
        "{what}: took {took:?}: {shown}"
    );
    assert!(
        shown.contains(file),
        "{what}: the file is not named: {shown}"
    );
    assert!(
        shown.contains(SAYS_THE_LIMIT),
        "{what}: the limit is not said: {shown}"
    );
}

/// A Redis node that refuses connections: a configuration read in full fails on it, exit 69.
const NOBODY: &str = "redis://127.0.0.1:1/";

/// A JSON document of exactly `size` bytes naming [`NOBODY`] and `namespace`, padded with
/// spaces.
fn padded(namespace: &str, size: usize) -> Vec<u8> {
    let mut document =
        format!(r#"{{"type": "redis", "urls": ["{NOBODY}"], "namespace": "{namespace}""#)
            .into_bytes();
    document.resize(size - 1, b' ');
    document.push(b'}');
    document
}

/// `/dev/zero` never ends: every way of naming it as a configuration is refused at once, with
/// the typed error, not after the memory is full.
#[test]
fn dev_zero_as_a_configuration_is_refused_at_once() {
    let zero = "/dev/zero";
    let nested = r#"{"lockConfig": "/dev/zero"}"#;
    for (what, env, flag) in [
        ("LOCK_CONFIG", Some(zero), None),
        ("--config", None, Some(zero)),
        ("nested lockConfig in --config", None, Some(nested)),
        ("nested lockConfig in LOCK_CONFIG", Some(nested), None),
    ] {
        let mut args = flag.map_or_else(Vec::new, |config| vec!["--config", config]);
        args.extend(["--no-wait", "s33a", "--", "true"]);
        assert_refused(what, &guarded_lockrun(env, &args), "config file /dev/zero");
    }
}

/// A file one byte over the limit, a sparse file of 8 GiB, and a file over the limit that
/// starts with a password: refused for their size, nothing of them shown, the command not run.
#[test]
fn a_file_over_the_limit_is_refused_without_showing_it() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let job = format!("touch '{}'", marker.display());
    let over = dir.path().join("over.json");
    std::fs::write(&over, padded("s33a", LIMIT + 1)).unwrap();
    let sparse = dir.path().join("sparse.json");
    std::fs::File::create(&sparse)
        .unwrap()
        .set_len(8 << 30)
        .unwrap();
    let secret = dir.path().join("secret.toml");
    let mut file = std::fs::File::create(&secret).unwrap();
    file.write_all(b"type = \"redis\"\nurls = [\"redis://app:Hunter2-s3cret@127.0.0.1:1/\"]\n")
        .unwrap();
    file.write_all(&vec![b'#'; LIMIT]).unwrap();
    drop(file);
    for path in [&over, &sparse, &secret] {
        let path = path.display().to_string();
        let outcome = guarded_lockrun(Some(&path), &["--no-wait", "s33a", "--", "sh", "-c", &job]);
        assert_refused(&path, &outcome, &path);
        assert!(!shown(&outcome.0).contains("Hunter2"), "{outcome:?}");
        assert!(!marker.exists(), "{path}: the command ran");
        let outcome = guarded_lockrun(
            None,
            &[
                "--config",
                &path,
                "--no-wait",
                "s33a",
                "--",
                "sh",
                "-c",
                &job,
            ],
        );
        assert_refused(&path, &outcome, &path);
        assert!(!marker.exists(), "{path}: the command ran");
    }
}

/// A file of exactly the limit is read (the bound is not 0, nor off by one), as JSON and as
/// TOML, by the library and by lockrun; one byte more is the typed error naming the file.
#[test]
fn a_file_of_exactly_the_limit_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("limit.json");
    std::fs::write(&json, padded("s33a-json", LIMIT)).unwrap();
    let toml = dir.path().join("limit.toml");
    let mut text = format!("type = \"redis\"\nurls = [\"{NOBODY}\"]\nnamespace = \"s33a-toml\"\n")
        .into_bytes();
    text.resize(LIMIT, b'\n');
    std::fs::write(&toml, text).unwrap();
    for (path, namespace) in [(&json, "s33a-json"), (&toml, "s33a-toml")] {
        assert_eq!(std::fs::metadata(path).unwrap().len(), LIMIT as u64);
        let config = LockConfig::from_file(path).unwrap();
        assert_eq!(config.namespace.as_deref(), Some(namespace));
        let config = LockConfig::from_text(&path.display().to_string()).unwrap();
        assert_eq!(config.namespace.as_deref(), Some(namespace));
        let (output, _) = guarded_lockrun(
            Some(&path.display().to_string()),
            &["--no-wait", "s33a", "--", "true"],
        );
        // Read in full: on to the backend, which is not there.
        assert_eq!(output.status.code(), Some(69), "{output:?}");
        // One byte more.
        std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .unwrap()
            .write_all(b"\n")
            .unwrap();
        let error = LockConfig::from_file(path).unwrap_err();
        let LockError::InvalidInput { field, reason } = &error else {
            panic!("{path:?}: {error:?}");
        };
        assert!(field.contains(&path.display().to_string()), "{error}");
        assert!(reason.contains(SAYS_THE_LIMIT), "{error}");
    }
}

/// An empty file and a normal one are read as before.
#[test]
fn small_files_are_read_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let normal = dir.path().join("lock.json");
    std::fs::write(&normal, r#"{"namespace": "s33a", "ttl": 5000}"#).unwrap();
    let config = LockConfig::from_file(&normal).unwrap();
    assert_eq!(config.namespace.as_deref(), Some("s33a"));
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    assert_eq!(
        LockConfig::from_file(&empty).unwrap().namespace.as_deref(),
        None
    );
    let not_utf8 = dir.path().join("bytes.json");
    std::fs::write(&not_utf8, b"{\"namespace\": \"\xff\"}").unwrap();
    let error = LockConfig::from_file(&not_utf8).unwrap_err().to_string();
    assert!(error.contains("valid UTF-8"), "{error}");
    assert!(Path::new(&not_utf8).exists());
}

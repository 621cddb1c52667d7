//! No password reaches an error, a `Debug`, a `Display`, a captured log line or `lockrun`'s
//! output, whatever its bytes, through every configuration path: code, JSON, TOML, files,
//! nested `lockConfig`, `LOCK_CONFIG`; Redlock, inc, the facade's `create` and `create_from_env`,
//! and the `lockrun` binary with `--config` and with `LOCK_CONFIG`.
//!
//! Every configuration fails in one of the ways a user's can: `urls` of the wrong type, an
//! unknown field, a bad scheme, a server that is not there, a malformed URL, the URL as the
//! value of a backend option of the wrong type, of another backend's option, or of the TLS CA
//! file's path; and against a
//! real `redis-server` whose user has the generated password, a successful connect followed by
//! a wrong password.
#![cfg(all(feature = "redlock", feature = "inc", feature = "cli"))]
#![allow(clippy::unwrap_used)]

use std::fmt::Debug;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, LazyLock, Mutex};

use lock_facade::inc::{IncConfig, IncLock};
use lock_facade::redlock::{Redlock, RedlockConfig};
use lock_facade::{LockConfig, Locker, RetryOptions, RetryPolicy, create, create_from_env};
use lock_tests::server::{RedisServer, free_port, redis_or_skip};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

mod support;

// ---------------------------------------------------------------------------------------------
// What is shown, and what must not be in it.

/// Everything a case printed, with where it came from.
#[derive(Default)]
struct Shown(Vec<(String, String)>);

impl Shown {
    fn add(&mut self, what: impl Into<String>, text: impl Into<String>) {
        self.0.push((what.into(), text.into()));
    }

    /// An error's `Display` and `Debug`.
    fn error<E: std::fmt::Display + Debug>(&mut self, what: &str, error: &E) {
        self.add(format!("{what} (Display)"), error.to_string());
        self.add(format!("{what} (Debug)"), format!("{error:?}"));
    }

    fn debug<T: Debug>(&mut self, what: &str, value: &T) {
        self.add(format!("{what} (Debug)"), format!("{value:?}"));
    }

    /// A process's exit status, stdout and stderr.
    fn output(&mut self, what: &str, output: &Output) {
        self.add(
            what,
            format!(
                "{}\nstdout: {}\nstderr: {}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        );
    }

    /// Fails the case if any shown text holds any form of a password.
    fn check(&self, secrets: &[&str]) -> Result<(), TestCaseError> {
        for secret in secrets {
            for form in forms(secret) {
                for (what, text) in &self.0 {
                    prop_assert!(
                        !text.contains(&form),
                        "{what} shows the password {secret:?} (as {form:?}):\n{text}"
                    );
                }
            }
        }
        Ok(())
    }
}

/// The password as written, percent-decoded, percent-encoded, and escaped as `Debug` and JSON
/// quote it.
fn forms(password: &str) -> Vec<String> {
    let mut forms = vec![
        password.to_owned(),
        percent_decoded(password),
        percent_encoded(password),
        format!("{password:?}").trim_matches('"').to_owned(),
        serde_json::to_string(password)
            .unwrap()
            .trim_matches('"')
            .to_owned(),
    ];
    forms.sort();
    forms.dedup();
    forms
}

/// Every byte but the unreserved ones as `%XX`.
fn percent_encoded(text: &str) -> String {
    text.bytes()
        .map(|byte| {
            if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
                char::from(byte).to_string()
            } else {
                format!("%{byte:02X}")
            }
        })
        .collect()
}

fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|pair| std::str::from_utf8(pair).ok())
            .and_then(|pair| u8::from_str_radix(pair, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Generated credentials.

/// Pieces of user names and passwords: letters and digits, URL delimiters, percent-escapes
/// (valid and not), quotes, backslashes, spaces and a non-ASCII letter.
fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-zA-Z0-9]",
        3 => prop::sample::select(vec![
            "/", "?", "#", "@", ":", "%", "%2F", "%40", "%3A", "%25", "%zz", "%", " ", "\"", "'",
            "\\", "=", "&", "+", "[", "]", "$", "!", "~", ";", ",", "é",
        ])
        .prop_map(str::to_owned),
    ]
}

fn secret_text(pieces: std::ops::Range<usize>) -> impl Strategy<Value = String> {
    prop::collection::vec(piece(), pieces).prop_map(|pieces| pieces.concat())
}

/// Text around which a password could be found by chance: the rest of a case's URLs and
/// documents.
const PUBLIC: &str = "redis://@127.0.0.1:65535/ http://@127.0.0.1:99999/ redis ://@/";

/// A password long and odd enough that finding it in a message means it leaked: each of its
/// forms has at least 6 characters and none is part of the user name or of the public text.
fn distinctive(user: &str, password: &str) -> bool {
    forms(password).iter().all(|form| {
        form.chars().count() >= 6
            && !PUBLIC.contains(form.as_str())
            && forms(user).iter().all(|user| !user.contains(form.as_str()))
    })
}

#[derive(Clone, Debug)]
struct Credentials {
    user: String,
    password: String,
}

impl Credentials {
    /// `user:password` as written, or percent-encoded.
    fn userinfo(&self, encoded: bool) -> String {
        if encoded {
            format!(
                "{}:{}",
                percent_encoded(&self.user),
                percent_encoded(&self.password)
            )
        } else {
            format!("{}:{}", self.user, self.password)
        }
    }
}

fn credentials(user_pieces: std::ops::Range<usize>) -> impl Strategy<Value = Credentials> {
    (secret_text(user_pieces), secret_text(6..14))
        .prop_filter("a distinctive password", |(user, password)| {
            distinctive(user, password)
        })
        .prop_map(|(user, password)| Credentials { user, password })
}

/// How a configuration fails.
#[derive(Clone, Copy, Debug)]
enum Failure {
    /// `urls` is a list of lists (a list of two for inc's `url`).
    WrongType,
    /// The URL sits under a field that does not exist.
    UnknownField,
    /// The URL sits under an unknown field named after the URL itself (facade only: serde
    /// quotes unknown field names).
    UrlAsFieldName,
    /// `http://`.
    BadScheme,
    /// A well-formed URL of a port where nothing listens.
    Unreachable,
    /// No scheme.
    NoScheme,
    /// A space in the scheme.
    Space,
    /// A port out of range.
    BadPort,
    /// No host.
    NoHost,
    /// The URL (reachable in form, nothing listening) is also the value of a numeric backend
    /// option, `connect_timeout`.
    OptionOfWrongType,
    /// The URL is also the value of another backend's option (`prefix` for Redlock,
    /// `drift_factor` for inc) and, for inc, of its own `prefix`.
    OtherBackendsOption,
    /// The URL is also the path of the TLS CA file.
    CaFile,
}

fn failure() -> impl Strategy<Value = Failure> {
    prop::sample::select(vec![
        Failure::WrongType,
        Failure::UnknownField,
        Failure::UrlAsFieldName,
        Failure::BadScheme,
        Failure::Unreachable,
        Failure::NoScheme,
        Failure::Space,
        Failure::BadPort,
        Failure::NoHost,
        Failure::OptionOfWrongType,
        Failure::OtherBackendsOption,
        Failure::CaFile,
    ])
}

fn url_for(failure: Failure, userinfo: &str, port: u16) -> String {
    match failure {
        Failure::BadScheme => format!("http://{userinfo}@127.0.0.1:{port}/"),
        Failure::NoScheme => format!("{userinfo}@127.0.0.1:{port}/"),
        Failure::Space => format!("redis ://{userinfo}@127.0.0.1:{port}/"),
        Failure::BadPort => format!("redis://{userinfo}@127.0.0.1:99999/"),
        Failure::NoHost => format!("redis://{userinfo}@/"),
        _ => format!("redis://{userinfo}@127.0.0.1:{port}/"),
    }
}

/// A facade document naming `backend`, with `url` placed as `failure` says.
fn facade_document(backend: &str, failure: Failure, url: &str) -> serde_json::Value {
    let mut document = serde_json::json!({"type": backend, "retryCount": 0, "ttl": 5000});
    let object = document.as_object_mut().unwrap();
    match failure {
        Failure::WrongType => object.insert("urls".into(), serde_json::json!([[url]])),
        Failure::UnknownField => object.insert("uri".into(), url.into()),
        Failure::UrlAsFieldName => object.insert(url.into(), serde_json::json!([url])),
        _ => object.insert("urls".into(), serde_json::json!([url])),
    };
    let inc = backend == "inc";
    for (option, value) in backend_options(failure, inc, url) {
        object.insert(option.into(), value);
    }
    document
}

/// The backend options a failure sets beside the URL.
fn backend_options(
    failure: Failure,
    inc: bool,
    url: &str,
) -> Vec<(&'static str, serde_json::Value)> {
    match failure {
        Failure::OptionOfWrongType => vec![("connect_timeout", url.into())],
        Failure::OtherBackendsOption if inc => {
            vec![("drift_factor", url.into()), ("prefix", url.into())]
        }
        Failure::OtherBackendsOption => vec![("prefix", url.into())],
        Failure::CaFile => vec![("tls_ca_file", url.into())],
        _ => Vec::new(),
    }
}

/// A `RedlockConfig` document.
fn redlock_document(failure: Failure, url: &str) -> serde_json::Value {
    let mut document = match failure {
        Failure::WrongType => serde_json::json!({"urls": [[url]]}),
        Failure::UnknownField => serde_json::json!({"uri": [url]}),
        _ => serde_json::json!({"urls": [url]}),
    };
    for (option, value) in backend_options(failure, false, url) {
        document[option] = value;
    }
    document
}

/// An `IncConfig` document.
fn inc_document(failure: Failure, url: &str) -> serde_json::Value {
    let mut document = match failure {
        Failure::WrongType => serde_json::json!({"url": [url, url]}),
        Failure::UnknownField => serde_json::json!({"uri": [url]}),
        _ => serde_json::json!({"url": url}),
    };
    for (option, value) in backend_options(failure, true, url) {
        document[option] = value;
    }
    document
}

fn toml_text(document: &serde_json::Value) -> String {
    toml::to_string(document).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Captured logs: every `tracing` event, and every `log` record of the drivers (fred logs through
// `log`), at TRACE, into one buffer.

static LOGS: LazyLock<Arc<Mutex<Vec<u8>>>> = LazyLock::new(|| {
    let logs = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&logs);
    // `try_init` also routes `log` records into tracing.
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing_subscriber::filter::LevelFilter::TRACE)
        .with_ansi(false)
        .with_writer(move || LogSink(Arc::clone(&sink)))
        .try_init();
    logs
});

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl Write for LogSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where the captured logs stand now.
fn log_mark() -> usize {
    LOGS.lock().unwrap().len()
}

/// What was logged since `mark` (by this case, and by others running at the same time).
fn logs_since(mark: usize) -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap()[mark..]).into_owned()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// The paths.

/// Shows what a locker shows, and what one attempt on it shows; `Ok` if the attempt won.
async fn attempt(shown: &mut Shown, what: &str, locker: &Locker) -> bool {
    shown.debug(what, locker);
    let won = match locker.try_acquire("secret-test").await {
        Ok(Some(guard)) => {
            shown.debug(&format!("{what}: guard"), &guard);
            let released = guard.release().await;
            shown.debug(&format!("{what}: release"), &released);
            true
        }
        Ok(None) => false,
        Err(error) => {
            shown.error(&format!("{what}: try_acquire"), &error);
            false
        }
    };
    let _ = locker.stop().await;
    won
}

/// A Redlock backend from `config`: shows the config, the error or the locker and one attempt.
/// `Ok(true)` when an attempt won, `Ok(false)` when something failed.
async fn redlock_path(shown: &mut Shown, what: &str, config: RedlockConfig) -> bool {
    shown.debug(&format!("{what}: config"), &config);
    if let Err(error) = config.validate() {
        shown.error(&format!("{what}: validate"), &error);
    }
    match Redlock::new(config) {
        Ok(redlock) => {
            let locker = Locker::new(redlock)
                .with_options(lock_facade::LockOptions::default().with_retry(RetryPolicy::none()))
                .unwrap();
            attempt(shown, what, &locker).await
        }
        Err(error) => {
            shown.error(&format!("{what}: Redlock::new"), &error);
            false
        }
    }
}

async fn inc_path(shown: &mut Shown, what: &str, config: IncConfig) -> bool {
    shown.debug(&format!("{what}: config"), &config);
    if let Err(error) = config.validate() {
        shown.error(&format!("{what}: validate"), &error);
    }
    match IncLock::connect(config).await {
        Ok(inc) => attempt(shown, what, &Locker::new(inc)).await,
        Err(error) => {
            shown.error(&format!("{what}: IncLock::connect"), &error);
            false
        }
    }
}

async fn facade_path(
    shown: &mut Shown,
    what: &str,
    parsed: lock_facade::Result<LockConfig>,
) -> bool {
    let config = match parsed {
        Ok(config) => config,
        Err(error) => {
            shown.error(&format!("{what}: parse"), &error);
            return false;
        }
    };
    shown.debug(&format!("{what}: config"), &config);
    match create(config).await {
        Ok(locker) => attempt(shown, what, &locker).await,
        Err(error) => {
            shown.error(&format!("{what}: create"), &error);
            false
        }
    }
}

fn lockrun(config: Option<&str>, env: Option<&str>) -> Output {
    let mut command = support::lockrun();
    if let Some(config) = config {
        command.args(["--config", config]);
    }
    if let Some(env) = env {
        command.env("LOCK_CONFIG", env);
    }
    command
        .args(["--no-wait", "secret-test", "--", "true"])
        .output()
        .unwrap()
}

/// Runs [`create_from_env_probe`] in a child process with `LOCK_CONFIG` set (the variable
/// cannot be set in this process without `unsafe`).
fn create_from_env_in_child(lock_config: &str) -> Output {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "create_from_env_probe",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("LOCK_CONFIG", lock_config)
        .env(PROBE_ENV, "1")
        .output()
        .unwrap()
}

const PROBE_ENV: &str = "LOCK_SECRETS_PROBE";
const PROBE_RAN: &str = "create_from_env probe ran";

#[test]
#[ignore = "run by the property tests in a child process, with LOCK_CONFIG set"]
fn create_from_env_probe() {
    if std::env::var_os(PROBE_ENV).is_none() {
        return;
    }
    let mark = log_mark();
    let mut shown = Shown::default();
    let won = runtime().block_on(async {
        let explicit = LockConfig {
            retry: RetryOptions {
                retry_count: Some(0),
                ..RetryOptions::default()
            },
            ..LockConfig::default()
        };
        match create_from_env(explicit).await {
            Ok(locker) => attempt(&mut shown, "create_from_env", &locker).await,
            Err(error) => {
                shown.error("create_from_env", &error);
                false
            }
        }
    });
    for (what, text) in &shown.0 {
        println!("{what}: {text}");
    }
    println!("logs:\n{}", logs_since(mark));
    println!("{PROBE_RAN}: won = {won}");
}

/// Every path over one failing URL; each must fail.
async fn every_path(
    shown: &mut Shown,
    dir: &Path,
    backend: &str,
    failure: Failure,
    url: &str,
) -> Result<(), TestCaseError> {
    let mut wins = Vec::new();
    let code_paths_apply = !matches!(
        failure,
        Failure::WrongType
            | Failure::UnknownField
            | Failure::UrlAsFieldName
            | Failure::OptionOfWrongType
            | Failure::OtherBackendsOption
    );
    let ca_file: Option<std::path::PathBuf> =
        matches!(failure, Failure::CaFile).then(|| url.into());

    // Redlock and inc, from code and through serde.
    if code_paths_apply {
        let config = RedlockConfig {
            tls_ca_file: ca_file.clone(),
            ..RedlockConfig::new([url])
        };
        wins.push(redlock_path(shown, "redlock from code", config).await);
        let config = IncConfig {
            tls_ca_file: ca_file.clone(),
            ..IncConfig::new(url)
        };
        wins.push(inc_path(shown, "inc from code", config).await);
    }
    // serde's own message quotes a string found where a number belongs, whatever the type
    // (the backends' docs say so): only the facade's parsers hide it, so the backends' types
    // are not parsed directly here when the URL is also a number's value.
    if !matches!(
        failure,
        Failure::UrlAsFieldName | Failure::OptionOfWrongType
    ) {
        let document = redlock_document(failure, url);
        match serde_json::from_str::<RedlockConfig>(&document.to_string()) {
            Ok(config) => wins.push(redlock_path(shown, "redlock from JSON", config).await),
            Err(error) => shown.error("redlock from JSON", &error),
        }
        // toml's own `Display` and `Debug` quote the document's line (see `RedlockConfig`'s
        // docs); its message is what a program shows.
        match toml::from_str::<RedlockConfig>(&toml_text(&document)) {
            Ok(config) => wins.push(redlock_path(shown, "redlock from TOML", config).await),
            Err(error) => shown.add("redlock from TOML", error.message()),
        }
        let document = inc_document(failure, url);
        match serde_json::from_str::<IncConfig>(&document.to_string()) {
            Ok(config) => wins.push(inc_path(shown, "inc from JSON", config).await),
            Err(error) => shown.error("inc from JSON", &error),
        }
        match toml::from_str::<IncConfig>(&toml_text(&document)) {
            Ok(config) => wins.push(inc_path(shown, "inc from TOML", config).await),
            Err(error) => shown.add("inc from TOML", error.message()),
        }
    }

    // The facade: code, JSON, TOML, files, nested lockConfig, text.
    let document = facade_document(backend, failure, url);
    let json = document.to_string();
    let toml = toml_text(&document);
    let json_file = dir.join("lock.json");
    let toml_file = dir.join("lock.toml");
    std::fs::write(&json_file, &json).unwrap();
    std::fs::write(&toml_file, &toml).unwrap();
    if code_paths_apply {
        let mut config = LockConfig::backend(backend).with_option("urls", vec![url]);
        config.retry.retry_count = Some(0);
        if let Some(path) = &ca_file {
            config = config.with_option("tls_ca_file", path.to_string_lossy().into_owned());
        }
        wins.push(facade_path(shown, "facade from code", Ok(config)).await);
        let mut typed = if backend == "inc" {
            LockConfig::backend(backend).with_backend(&IncConfig {
                tls_ca_file: ca_file.clone(),
                ..IncConfig::new(url)
            })
        } else {
            LockConfig::backend(backend).with_backend(&RedlockConfig {
                tls_ca_file: ca_file.clone(),
                ..RedlockConfig::new([url])
            })
        }
        .unwrap();
        typed.retry.retry_count = Some(0);
        wins.push(facade_path(shown, "facade from typed code", Ok(typed)).await);
    }
    let nested = serde_json::json!({"lockConfig": json}).to_string();
    for (what, parsed) in [
        ("facade from JSON", LockConfig::from_json(&json)),
        ("facade from TOML", LockConfig::from_toml(&toml)),
        ("facade from a JSON file", LockConfig::from_file(&json_file)),
        ("facade from a TOML file", LockConfig::from_file(&toml_file)),
        ("facade from text", LockConfig::from_text(&json)),
        (
            "facade from nested lockConfig",
            LockConfig::from_json(&nested).and_then(LockConfig::resolve),
        ),
    ] {
        wins.push(facade_path(shown, what, parsed).await);
    }

    // create_from_env and lockrun, as processes.
    let toml_path = toml_file.display().to_string();
    for (what, lock_config) in [("JSON", &json), ("a TOML file", &toml_path)] {
        let output = create_from_env_in_child(lock_config);
        let stdout = String::from_utf8_lossy(&output.stdout);
        prop_assert!(
            stdout.contains(PROBE_RAN),
            "the probe did not run: {output:?}"
        );
        wins.push(!stdout.contains(&format!("{PROBE_RAN}: won = false")));
        shown.output(
            &format!("create_from_env with LOCK_CONFIG as {what}"),
            &output,
        );
    }
    for (what, config, env) in [
        ("lockrun --config JSON", Some(json.as_str()), None),
        (
            "lockrun --config a TOML file",
            Some(toml_path.as_str()),
            None,
        ),
        (
            "lockrun with LOCK_CONFIG as JSON",
            None,
            Some(json.as_str()),
        ),
        (
            "lockrun with LOCK_CONFIG as a JSON file",
            None,
            Some(&*json_file.to_string_lossy()),
        ),
    ] {
        let output = lockrun(config, env);
        wins.push(output.status.success());
        shown.output(what, &output);
    }
    prop_assert!(
        wins.iter().all(|won| !won),
        "a configuration meant to fail ({failure:?}) worked somewhere"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Failing configurations, written as is or percent-encoded, through every path.
    #[test]
    fn no_failing_configuration_shows_its_password(
        credentials in credentials(0..6),
        encoded in any::<bool>(),
        failure in failure(),
        backend in prop::sample::select(vec!["redis", "redlock", "inc"]),
    ) {
        let runtime = runtime();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port().unwrap();
        let url = url_for(failure, &credentials.userinfo(encoded), port);
        let mark = log_mark();
        let mut shown = Shown::default();
        runtime.block_on(every_path(&mut shown, dir.path(), backend, failure, &url))?;
        drop(runtime);
        shown.add("captured logs", logs_since(mark));
        shown.check(&[&credentials.password])?;
    }
}

// ---------------------------------------------------------------------------------------------
// A real server whose user has the generated password.

/// A server that requires a password, with a connection to set up each case's user.
struct Guarded {
    server: RedisServer,
    admin: redis::Connection,
}

impl Guarded {
    fn start(binary: &Path) -> Self {
        let server = RedisServer::start(binary, &[]).unwrap();
        let mut admin = redis::Client::open(server.url())
            .unwrap()
            .get_connection()
            .unwrap();
        // The harness waits for an unauthenticated PING, so the password is set once it runs;
        // this connection stays authenticated as the default user.
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("requirepass")
            .arg("the-default-users-password")
            .query::<()>(&mut admin)
            .unwrap();
        Self { server, admin }
    }

    /// Creates (or resets) `user` with `password` and every permission.
    fn set_user(&mut self, user: &str, password: &str) {
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg(user)
            .arg("reset")
            .arg("on")
            .arg(format!(">{password}"))
            .arg("~*")
            .arg("&*")
            .arg("+@all")
            .query::<()>(&mut self.admin)
            .unwrap();
    }

    fn url(&self, credentials: &Credentials) -> String {
        format!(
            "redis://{}@127.0.0.1:{}/",
            credentials.userinfo(true),
            self.server.port()
        )
    }
}

/// Every path over a live URL; `Ok` with what won (all must win or all must fail).
async fn every_live_path(
    shown: &mut Shown,
    backend: &str,
    url: &str,
) -> Result<Vec<(String, bool)>, TestCaseError> {
    let mut outcomes = Vec::new();
    let config = RedlockConfig::new([url]);
    outcomes.push((
        "redlock".to_owned(),
        redlock_path(shown, "redlock from code", config).await,
    ));
    outcomes.push((
        "inc".to_owned(),
        inc_path(shown, "inc from code", IncConfig::new(url)).await,
    ));
    let json = serde_json::json!({"type": backend, "urls": [url], "retryCount": 0}).to_string();
    outcomes.push((
        format!("facade {backend}"),
        facade_path(shown, "facade from JSON", LockConfig::from_json(&json)).await,
    ));
    let output = create_from_env_in_child(&json);
    let stdout = String::from_utf8_lossy(&output.stdout);
    prop_assert!(
        stdout.contains(PROBE_RAN),
        "the probe did not run: {output:?}"
    );
    outcomes.push((
        "create_from_env".to_owned(),
        stdout.contains(&format!("{PROBE_RAN}: won = true")),
    ));
    shown.output("create_from_env", &output);
    for (what, config, env) in [
        ("lockrun --config JSON", Some(json.as_str()), None),
        ("lockrun with LOCK_CONFIG", None, Some(json.as_str())),
    ] {
        let output = lockrun(config, env);
        outcomes.push((what.to_owned(), output.status.success()));
        shown.output(what, &output);
    }
    Ok(outcomes)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 16,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// The right password connects on every path, a wrong one fails on every path, and neither
    /// shows up anywhere.
    #[test]
    fn a_live_server_never_sees_its_password_shown(
        credentials in credentials(1..6).prop_filter(
            "ACL user names have no spaces",
            |credentials| !credentials.user.contains(' ')
        ),
        wrong in secret_text(6..14),
        backend in prop::sample::select(vec!["redis", "redlock", "inc"]),
    ) {
        prop_assume!(wrong != credentials.password && distinctive(&credentials.user, &wrong));
        let Some(binary) = redis_or_skip("secrets") else {
            return Ok(());
        };
        let mut guarded = Guarded::start(&binary);
        guarded.set_user(&credentials.user, &credentials.password);
        let runtime = runtime();
        let mark = log_mark();
        let mut shown = Shown::default();

        let right = guarded.url(&credentials);
        let outcomes = runtime.block_on(every_live_path(&mut shown, backend, &right))?;
        for (what, won) in &outcomes {
            prop_assert!(*won, "{what} could not use the right password: {}", shown.0.iter()
                .map(|(what, text)| format!("{what}: {text}")).collect::<Vec<_>>().join("\n"));
        }

        let wrong_credentials = Credentials { user: credentials.user.clone(), password: wrong.clone() };
        let url = guarded.url(&wrong_credentials);
        let outcomes = runtime.block_on(every_live_path(&mut shown, backend, &url))?;
        for (what, won) in &outcomes {
            prop_assert!(!*won, "{what} worked with a wrong password");
        }
        drop(runtime);
        shown.add("captured logs", logs_since(mark));
        shown.check(&[&credentials.password, &wrong])?;
    }
}

// ---------------------------------------------------------------------------------------------
// A URL put in a common field by mistake.

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// A URL given as the `type` (or its alias `backend`) or the `namespace` is hidden in the
    /// configuration's `Debug` and in every error, from code, JSON and TOML (old: `Debug` showed
    /// both as given), and in what `lockrun` prints, `status` included (old: a namespace that
    /// is a URL with a password was taken, and `status` printed the key with the password).
    #[test]
    fn a_url_in_a_common_field_is_not_shown(
        credentials in credentials(0..6),
        encoded in any::<bool>(),
        field in prop::sample::select(vec!["type", "backend", "namespace"]),
    ) {
        let url = format!("redis://{}@127.0.0.1:1/", credentials.userinfo(encoded));
        let document = serde_json::json!({ field: url });
        let mut shown = Shown::default();
        let code = if field == "namespace" {
            LockConfig { namespace: Some(url.clone()), ..LockConfig::default() }
        } else {
            LockConfig::backend(url.clone())
        };
        let parsed = [
            ("code", Ok(code)),
            ("JSON", LockConfig::from_json(&document.to_string())),
            ("TOML", LockConfig::from_toml(&toml_text(&document))),
        ];
        let runtime = runtime();
        for (what, config) in parsed {
            match config {
                Ok(config) => {
                    shown.debug(&format!("{what} config"), &config);
                    if let Err(error) = runtime.block_on(create(config)) {
                        shown.error(&format!("{what} create"), &error);
                    }
                }
                Err(error) => shown.error(what, &error),
            }
        }
        let document = document.to_string();
        for args in [&["status", "secret-test"][..], &["--no-wait", "secret-test", "--", "true"]] {
            let output = support::lockrun().env("LOCK_CONFIG", &document).args(args).output().unwrap();
            shown.output(&format!("lockrun {args:?}"), &output);
            let output = support::lockrun().args(["--config", &document]).args(args).output().unwrap();
            shown.output(&format!("lockrun --config {args:?}"), &output);
        }
        shown.check(&[&credentials.password])?;
    }
}

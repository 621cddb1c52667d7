//! A real `redis-server` process per test, on a free loopback port, killed and reaped on drop.
//!
//! The binary is `$REDIS_SERVER` or `redis-server` from `PATH`. When it is missing, tests call
//! [`redis_or_skip`]: it prints why and skips, unless `LOCK_TESTS_REQUIRE_REDIS=1` (set by
//! `cargo xtask it`) makes a missing server a failure.

use std::collections::BTreeSet;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Environment variable naming the `redis-server` binary.
pub const REDIS_SERVER_ENV: &str = "REDIS_SERVER";

/// Environment variable that turns a missing `redis-server` into a test failure.
pub const REQUIRE_REDIS_ENV: &str = "LOCK_TESTS_REQUIRE_REDIS";

/// How long a server may take to answer its first PING.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The `redis-server` binary, if one can be found.
pub fn redis_server_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(REDIS_SERVER_ENV) {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("redis-server"))
        .find(|candidate| candidate.is_file())
}

/// The `redis-server` binary, or `None` after printing why the calling test is skipped.
///
/// # Panics
/// When the binary is missing and `LOCK_TESTS_REQUIRE_REDIS=1`.
pub fn redis_or_skip(test: &str) -> Option<PathBuf> {
    let found = redis_server_binary();
    if found.is_none() {
        let required = std::env::var(REQUIRE_REDIS_ENV).is_ok_and(|v| v == "1");
        assert!(
            !required,
            "redis-server not found (set {REDIS_SERVER_ENV} or install it: apt-get install redis-server)"
        );
        println!(
            "{test}: skipped, redis-server not found; run `cargo xtask it` to install and require it"
        );
    }
    found
}

/// Environment variable naming the `valkey-server` binary for the Valkey runs.
pub const VALKEY_SERVER_ENV: &str = "VALKEY_SERVER";

/// Environment variable that turns a missing `valkey-server` into a test failure.
pub const REQUIRE_VALKEY_ENV: &str = "LOCK_TESTS_REQUIRE_VALKEY";

/// The `valkey-server` binary, if one can be found (`$VALKEY_SERVER`, else `PATH`).
pub fn valkey_server_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(VALKEY_SERVER_ENV) {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("valkey-server"))
        .find(|candidate| candidate.is_file())
}

/// The `valkey-server` binary, or `None` after printing why the calling test is skipped.
///
/// # Panics
/// When the binary is missing and `LOCK_TESTS_REQUIRE_VALKEY=1`.
pub fn valkey_or_skip(test: &str) -> Option<PathBuf> {
    let found = valkey_server_binary();
    if found.is_none() {
        let required = std::env::var(REQUIRE_VALKEY_ENV).is_ok_and(|v| v == "1");
        assert!(
            !required,
            "valkey-server not found (set {VALKEY_SERVER_ENV} or run `cargo xtask it`, which installs it from bookworm-backports)"
        );
        println!("{test}: skipped, valkey-server not found; run `cargo xtask it` to install it");
    }
    found
}

/// A private `redis-server` (or `valkey-server`, which takes the same arguments) with no
/// persistence, on 127.0.0.1 and a port of its own.
pub struct RedisServer {
    binary: PathBuf,
    child: Option<Child>,
    port: u16,
    extra_args: Vec<String>,
    env: Vec<(String, String)>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts a server with the given binary and extra arguments and waits until it answers PING.
    ///
    /// # Errors
    /// When the process cannot start or never answers; the message carries the log's tail.
    pub fn start(binary: &Path, extra_args: &[&str]) -> io::Result<Self> {
        Self::start_with_env(binary, extra_args, &[])
    }

    /// Like [`RedisServer::start`], with extra environment variables for the process (and its
    /// restarts), such as an `LD_PRELOAD` clock shim.
    ///
    /// # Errors
    /// When the process cannot start or never answers; the message carries the log's tail.
    pub fn start_with_env(
        binary: &Path,
        extra_args: &[&str],
        env: &[(String, String)],
    ) -> io::Result<Self> {
        Self::start_at(binary, free_port()?, extra_args, env)
    }

    /// Like [`RedisServer::start`], trying `port` first: when another process holds it, the
    /// server goes to a free port instead (it never shares one).
    ///
    /// # Errors
    /// When the process cannot start or never answers; the message carries the log's tail.
    pub fn start_on_port(binary: &Path, port: u16, extra_args: &[&str]) -> io::Result<Self> {
        Self::start_at(binary, port, extra_args, &[])
    }

    fn start_at(
        binary: &Path,
        port: u16,
        extra_args: &[&str],
        env: &[(String, String)],
    ) -> io::Result<Self> {
        let mut server = Self {
            binary: binary.to_path_buf(),
            child: None,
            port,
            extra_args: extra_args.iter().map(|arg| (*arg).to_owned()).collect(),
            env: env.to_vec(),
            dir: tempfile::tempdir()?,
        };
        // A port free a moment ago may have been taken since (by another process, or by a
        // server of a test running beside this one): try another.
        let mut tries = 0;
        loop {
            match server.spawn() {
                Err(error) if error.kind() == io::ErrorKind::AddrInUse && tries < 10 => {
                    tries += 1;
                    server.port = free_port()?;
                }
                outcome => return outcome.map(|()| server),
            }
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Sends one command (inline protocol) and returns the raw reply's first line.
    ///
    /// # Errors
    /// When the server does not answer within `timeout`.
    pub fn command(&self, command: &str, timeout: Duration) -> io::Result<String> {
        send_inline(self.port, command, timeout)
    }

    /// How many times the server has run `command` (lower case; commands run by scripts
    /// included), from `INFO commandstats`.
    ///
    /// # Errors
    /// When the server cannot be asked.
    pub fn calls(&self, command: &str) -> redis::RedisResult<u64> {
        let mut connection = redis::Client::open(self.url())?.get_connection()?;
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut connection)?;
        Ok(stats
            .lines()
            .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|rest| rest.split(',').next())
            .and_then(|calls| calls.parse().ok())
            .unwrap_or(0))
    }

    /// How many connections the server has accepted so far (`INFO stats`
    /// `total_connections_received`), the one that asks included.
    ///
    /// # Panics
    /// When the server cannot be asked.
    pub fn accepted(&self) -> u64 {
        let mut asking = redis::Client::open(self.url())
            .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(2)))
            .expect("a connection for INFO");
        let stats: String = redis::cmd("INFO")
            .arg("stats")
            .query(&mut asking)
            .expect("INFO stats");
        stats
            .lines()
            .find_map(|line| line.strip_prefix("total_connections_received:"))
            .and_then(|count| count.trim().parse().ok())
            .expect("total_connections_received in INFO stats")
    }

    /// Kills the process (SIGKILL) and reaps it; its data is gone (no persistence).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the process with SIGSTOP: connections stay open but nothing answers.
    ///
    /// # Errors
    /// When the signal cannot be sent.
    pub fn pause(&self) -> io::Result<()> {
        self.signal("-STOP")
    }

    /// Thaws a paused process with SIGCONT.
    ///
    /// # Errors
    /// When the signal cannot be sent.
    pub fn resume(&self) -> io::Result<()> {
        self.signal("-CONT")
    }

    /// Kills the process and starts a fresh, empty one on the same port.
    ///
    /// # Errors
    /// When the new process does not come up.
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        self.spawn()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn signal(&self, signal: &str) -> io::Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| io::Error::other("server is not running"))?;
        let status = Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "kill {signal} {pid} failed: {status}"
            )))
        }
    }

    fn spawn(&mut self) -> io::Result<()> {
        let port = self.port.to_string();
        let mut command = Command::new(&self.binary);
        command
            .args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--daemonize", "no", "--protected-mode", "yes"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .args(&self.extra_args)
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot start {}: {e}", self.binary.display()),
            )
        })?;
        let started = Instant::now();
        loop {
            if send_inline(self.port, "PING", Duration::from_millis(200))
                .is_ok_and(|reply| reply == "+PONG")
            {
                // The answer may come from another server that holds the port: ours only if
                // it reports our process id.
                if process_id(self.port) == Some(child.id()) {
                    self.child = Some(child);
                    return Ok(());
                }
                if child.try_wait()?.is_some() || started.elapsed() > STARTUP_TIMEOUT {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("port {} is served by another process", self.port),
                    ));
                }
            }
            if let Some(status) = child.try_wait()? {
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    let _ = pipe.read_to_string(&mut stderr);
                }
                let error = self.startup_error(&format!("exited with {status}; stderr: {stderr}"));
                if error.to_string().contains("Address already in use") {
                    return Err(io::Error::new(io::ErrorKind::AddrInUse, error.to_string()));
                }
                return Err(error);
            }
            if started.elapsed() > STARTUP_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(self.startup_error(&format!("no PONG within {STARTUP_TIMEOUT:?}")));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn startup_error(&self, what: &str) -> io::Error {
        let log = self.log();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        io::Error::other(format!(
            "redis-server on port {} {what}\n--- log tail ---\n{}",
            self.port,
            tail.join("\n")
        ))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // A paused process ignores SIGTERM but not SIGKILL; resuming first is harmless.
        let _ = self.resume();
        self.kill();
    }
}

impl fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisServer")
            .field("port", &self.port)
            .field("pid", &self.pid())
            .finish()
    }
}

/// The `redis-cluster://` URL of a cluster started by [`start_cluster`]: the first node, and
/// the others as `node=` seeds.
pub fn cluster_url(servers: &[RedisServer]) -> String {
    let Some((first, others)) = servers.split_first() else {
        return "redis-cluster://127.0.0.1:1".to_owned();
    };
    let seeds: Vec<String> = others
        .iter()
        .map(|server| format!("node=127.0.0.1:{}", server.port()))
        .collect();
    format!(
        "redis-cluster://127.0.0.1:{}?{}",
        first.port(),
        seeds.join("&")
    )
}

/// Starts `count` servers (at least 3) and joins them into a Redis Cluster of primaries,
/// waiting until every node reports `cluster_state:ok`.
///
/// # Errors
/// When a server does not start, `redis-cli --cluster create` fails, or the cluster does not
/// settle within 20 s.
pub fn start_cluster(binary: &Path, count: usize) -> io::Result<Vec<RedisServer>> {
    let args = [
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        "2000",
    ];
    let servers: Vec<RedisServer> = (0..count)
        .map(|_| RedisServer::start(binary, &args))
        .collect::<io::Result<_>>()?;
    let cli = binary.with_file_name("redis-cli");
    let output = Command::new(if cli.is_file() {
        cli
    } else {
        PathBuf::from("redis-cli")
    })
    .args(["--cluster", "create"])
    .args(
        servers
            .iter()
            .map(|server| format!("127.0.0.1:{}", server.port())),
    )
    .args(["--cluster-replicas", "0", "--cluster-yes"])
    .stdin(Stdio::null())
    .output()?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    let started = Instant::now();
    while !servers.iter().all(|server| {
        server
            .command("CLUSTER INFO", Duration::from_millis(500))
            .is_ok_and(|reply| reply.starts_with('$'))
            && cluster_ok(server.port())
    }) {
        if started.elapsed() > Duration::from_secs(20) {
            return Err(io::Error::other(
                "the cluster did not reach cluster_state:ok in 20 s",
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(servers)
}

fn cluster_ok(port: u16) -> bool {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"CLUSTER INFO\r\n").is_err() {
        return false;
    }
    let mut reply = vec![0; 4096];
    let read = stream.read(&mut reply).unwrap_or(0);
    String::from_utf8_lossy(&reply[..read]).contains("cluster_state:ok")
}

/// `GET key` on the server at `port`, with a raw connection: the value, or `None` when the key
/// is absent or the server does not answer within a second.
pub fn get_bulk(port: u16, key: &str) -> Option<String> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    let command = format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len());
    stream.write_all(command.as_bytes()).ok()?;
    let mut reader = BufReader::new(stream);
    let mut header = String::new();
    reader.read_line(&mut header).ok()?;
    let length: usize = header.trim_end().strip_prefix('$')?.parse().ok()?;
    let mut body = vec![0; length + 2];
    reader.read_exact(&mut body).ok()?;
    body.truncate(length);
    String::from_utf8(body).ok()
}

/// A port that was free a moment ago on 127.0.0.1.
///
/// # Errors
/// When no port can be bound.
pub fn free_port() -> io::Result<u16> {
    // Never the same port twice in one test process: servers of tests running side by side
    // would otherwise race for it.
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = listener.local_addr()?.port();
        if HANDED_OUT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(port)
        {
            return Ok(port);
        }
    }
}

/// The process id the server on `port` reports, if it answers `INFO server`.
fn process_id(port: u16) -> Option<u32> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).ok()?;
    let mut connection = client
        .get_connection_with_timeout(Duration::from_millis(500))
        .ok()?;
    connection
        .set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query(&mut connection)
        .ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
}

fn send_inline(port: u16, command: &str, timeout: Duration) -> io::Result<String> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&address, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(format!("{command}\r\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(line.trim_end().to_owned())
}

/// The connections open on the server at `port` (`CLIENT LIST`, a line per connection), the
/// one that asks left out. The asking connection is a blocking one, closed when this returns
/// (an async one closes when its task next runs, and could count in the next call).
///
/// # Panics
/// When the server cannot be asked.
#[allow(clippy::unused_async)]
pub async fn client_list(port: u16) -> Vec<String> {
    let mut connection = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .expect("a client for CLIENT LIST")
        .get_connection_with_timeout(Duration::from_secs(2))
        .expect("a connection for CLIENT LIST");
    let (id, list): (u64, String) = redis::pipe()
        .cmd("CLIENT")
        .arg("ID")
        .cmd("CLIENT")
        .arg("LIST")
        .query(&mut connection)
        .expect("CLIENT LIST");
    let asking = format!("id={id} ");
    list.lines()
        .filter(|line| !line.trim().is_empty() && !line.starts_with(&asking))
        .map(str::to_owned)
        .collect()
}

/// How many connections the server at `port` has open, the one that asks left out.
///
/// # Panics
/// When the server cannot be asked.
pub async fn connections(port: u16) -> usize {
    client_list(port).await.len()
}

/// The connections of the server at `port` once they are down to `want` or `within` has
/// passed (polled every 50 ms).
///
/// # Panics
/// When the server cannot be asked.
pub async fn settle_connections(port: u16, want: usize, within: Duration) -> usize {
    settle_connections_where(port, want, within, |_| true).await
}

/// As [`settle_connections`], counting only the connections whose `CLIENT LIST` line `counts`
/// (e.g. [`is_pubsub`] left out: a fair client keeps one subscriber per node for its life).
///
/// # Panics
/// When the server cannot be asked.
pub async fn settle_connections_where(
    port: u16,
    want: usize,
    within: Duration,
    counts: impl Fn(&str) -> bool,
) -> usize {
    let count = async || {
        client_list(port)
            .await
            .iter()
            .filter(|line| counts(line))
            .count()
    };
    let until = Instant::now() + within;
    let mut now = count().await;
    while now > want && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
        now = count().await;
    }
    now
}

/// Whether a `CLIENT LIST` line is a pub/sub connection's (flag `P`).
pub fn is_pubsub(line: &str) -> bool {
    line.split(' ')
        .find_map(|field| field.strip_prefix("flags="))
        .is_some_and(|flags| flags.contains('P'))
}

/// Every message published on `server` from now on, as (channel, message), gathered by a
/// thread of its own (a blocking pattern subscriber on every channel), in the order the server
/// sent them.
///
/// # Panics
/// When the server cannot be reached (a test's own server).
pub fn published_messages(server: &RedisServer) -> std::sync::Arc<Mutex<Vec<(String, String)>>> {
    let messages = std::sync::Arc::new(Mutex::new(Vec::new()));
    let client = redis::Client::open(server.url()).expect("a test server's URL");
    let mut connection = client
        .get_connection()
        .expect("the test's own server answers");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let sink = std::sync::Arc::clone(&messages);
    std::thread::spawn(move || {
        let mut pubsub = connection.as_pubsub();
        pubsub.psubscribe("*").expect("PSUBSCRIBE");
        let _ = ready_tx.send(());
        while let Ok(message) = pubsub.get_message() {
            let channel = message.get_channel_name().to_owned();
            let payload: String = message.get_payload().unwrap_or_default();
            sink.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((channel, payload));
        }
    });
    ready_rx.recv().expect("the subscriber thread starts");
    messages
}

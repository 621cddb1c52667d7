//! Probes of a server's pub/sub state, and a Redlock client with push wake-ups (`fair` off),
//! for the attacks on the wake-up readers (`attack_s35b`, `attack_s35c`), and a `Gate` that
//! makes a node unreachable on demand.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_redlock::{Redlock, RedlockConfig};

use crate::backed::start_servers;
use crate::server::RedisServer;

/// How long a probe waits for a server.
pub const PROBE: Duration = Duration::from_secs(1);

/// A Redlock client of its own on `urls`, `fair` off (waiters woken by every release), a ttl
/// of 10 s, the node timeout as given.
///
/// # Panics
/// On a configuration Redlock refuses.
pub fn fair_off_client(urls: &[String], retry: RetryPolicy, node_timeout: Duration) -> Locker {
    client_of(
        RedlockConfig::new(urls.to_vec())
            .with_node_timeout(node_timeout)
            .with_fair(false),
        retry,
    )
}

/// A client of `config` with a ttl of 10 s and `retry`.
fn client_of(config: RedlockConfig, retry: RetryPolicy) -> Locker {
    Locker::from_arc(Arc::new(Redlock::new(config).expect("redlock")))
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(10))
                .with_retry(retry),
        )
        .expect("options")
}

/// A Redlock client of its own on `urls` with `fair` and `wake_on_release` as given, a 300 ms
/// node timeout and a ttl of 10 s.
///
/// # Panics
/// On a configuration Redlock refuses.
pub fn redlock_client(urls: &[String], retry: RetryPolicy, fair: bool, wake: bool) -> Locker {
    client_of(
        RedlockConfig::new(urls.to_vec())
            .with_node_timeout(Duration::from_millis(300))
            .with_fair(fair)
            .with_wake_on_release(wake),
        retry,
    )
}

/// Waits up to 5 s until `count` reports `want`; its last answer.
pub async fn settle(want: usize, count: impl Fn() -> usize) -> usize {
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = count();
        if now == want || tokio::time::Instant::now() >= until {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A waiter on the mutex `key` of `waiter`, which releases at once: when it won.
///
/// # Panics
/// In the task, when the acquisition or the release fails.
pub fn wait_for(
    waiter: &Locker,
    key: &'static str,
) -> tokio::task::JoinHandle<tokio::time::Instant> {
    let waiter = waiter.clone();
    tokio::spawn(async move {
        let guard = waiter.acquire(key).await.expect("the waiter wins");
        let won = tokio::time::Instant::now();
        guard.release().await.expect("the winner releases");
        won
    })
}

/// How long after `released` the waiter `task` (of [`wait_for`]) won, waiting 10 s at most.
///
/// # Panics
/// When it did not win within 10 s, or its task failed.
pub async fn won_after(
    task: tokio::task::JoinHandle<tokio::time::Instant>,
    released: tokio::time::Instant,
) -> Duration {
    let won = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("won within 10 s")
        .expect("the waiter's task");
    won.saturating_duration_since(released)
}

/// A connection for probes to the server at `url` (which may carry a password).
///
/// # Panics
/// When the server cannot be reached within [`PROBE`].
pub fn probe(url: &str) -> redis::Connection {
    redis::Client::open(url)
        .expect("probe url")
        .get_connection_with_timeout(PROBE)
        .expect("probe connection")
}

/// The pub/sub clients connected to the server at `url` (`CLIENT LIST TYPE pubsub`).
///
/// # Panics
/// When the server does not answer.
pub fn pubsub_clients(url: &str) -> usize {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut probe(url))
        .expect("CLIENT LIST");
    list.lines().filter(|line| !line.trim().is_empty()).count()
}

/// Every client connected to the server at `url` but the probe itself (`CLIENT LIST`).
///
/// # Panics
/// When the server does not answer.
pub fn other_clients(url: &str) -> usize {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut probe(url))
        .expect("CLIENT LIST");
    list.lines()
        .filter(|line| !line.trim().is_empty())
        .count()
        .saturating_sub(1)
}

/// The channels subscribed on the server at `url` (`PUBSUB CHANNELS *`).
///
/// # Panics
/// When the server does not answer.
pub fn channels(url: &str) -> Vec<String> {
    redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg("*")
        .query(&mut probe(url))
        .expect("PUBSUB CHANNELS")
}

/// Kills every pub/sub connection of the server at `url`.
///
/// # Panics
/// When the server does not answer.
pub fn kill_pubsub(url: &str) {
    let _: redis::Value = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut probe(url))
        .expect("CLIENT KILL");
}

/// Sets `key` to a value of nobody's on the server at `url` for a minute: no client takes the
/// key there, and none announces its release there.
///
/// # Panics
/// When the server does not answer.
pub fn foreign(url: &str, key: &str) {
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg("someone-else")
        .arg("PX")
        .arg(60_000)
        .query(&mut probe(url))
        .expect("SET");
}

/// Three servers whose only user is `app` with `password` (the default user off), and the URLs
/// that reach them as `app`.
///
/// # Panics
/// When a server cannot be started or refuses the ACL commands.
pub fn acl_servers(password: &str) -> (Vec<RedisServer>, Vec<String>) {
    let servers = start_servers(3);
    for server in &servers {
        for command in [
            format!("ACL SETUSER app on >{password} ~* &* +@all"),
            "ACL SETUSER default off".to_owned(),
        ] {
            assert_eq!(server.command(&command, PROBE).expect("ACL SETUSER"), "+OK");
        }
    }
    let urls = servers
        .iter()
        .map(|server| format!("redis://app:{password}@127.0.0.1:{}/", server.port()))
        .collect();
    (servers, urls)
}

/// A forwarder to a server's port that counts the connections it accepts and, while down,
/// closes new ones at once.
#[derive(Debug)]
pub struct Gate {
    port: u16,
    down: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    /// When not zero: how long a forwarded connection lives (ms) before the gate closes it.
    lifetime_ms: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    /// A gate in front of the server listening on `target` (up).
    ///
    /// # Panics
    /// When no local port can be bound.
    pub async fn start(target: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a local port");
        let port = listener.local_addr().expect("its address").port();
        let down = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let lifetime_ms = Arc::new(AtomicUsize::new(0));
        let (is_down, count, lives) = (
            Arc::clone(&down),
            Arc::clone(&accepted),
            Arc::clone(&lifetime_ms),
        );
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                if is_down.load(Ordering::SeqCst) {
                    continue;
                }
                let lifetime = lives.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    let forward = tokio::io::copy_bidirectional(&mut client, &mut server);
                    if lifetime == 0 {
                        let _ = forward.await;
                    } else {
                        let lifetime =
                            Duration::from_millis(u64::try_from(lifetime).unwrap_or(u64::MAX));
                        let _ = tokio::time::timeout(lifetime, forward).await;
                    }
                });
            }
        });
        Self {
            port,
            down,
            accepted,
            lifetime_ms,
            task,
        }
    }

    /// The gate's URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// While down, new connections are closed at once (those open go on).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Connections accepted from now on are closed `lifetime` after they were made.
    pub fn set_lifetime(&self, lifetime: Duration) {
        let ms = usize::try_from(lifetime.as_millis()).unwrap_or(usize::MAX);
        self.lifetime_ms.store(ms, Ordering::SeqCst);
    }

    /// How many connections the gate accepted.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Three servers; the waiters reach the second and third through gates.
#[derive(Debug)]
pub struct Gated {
    /// The servers.
    pub servers: Vec<RedisServer>,
    /// In front of the second and third server.
    pub gates: [Gate; 2],
}

impl Gated {
    /// Three servers, the second and third behind gates.
    pub async fn start() -> Self {
        let servers = start_servers(3);
        let gates = [
            Gate::start(servers[1].port()).await,
            Gate::start(servers[2].port()).await,
        ];
        Self { servers, gates }
    }

    /// The URLs through the gates.
    pub fn urls(&self) -> Vec<String> {
        vec![
            self.servers[0].url(),
            self.gates[0].url(),
            self.gates[1].url(),
        ]
    }

    /// The servers' own URLs.
    pub fn direct(&self) -> Vec<String> {
        self.servers.iter().map(|server| server.url()).collect()
    }

    /// The third node cannot be reached any more by the waiters, and their pub/sub
    /// connections there are lost.
    pub fn third_down(&self) {
        self.gates[1].set_down(true);
        kill_pubsub(&self.servers[2].url());
    }
}

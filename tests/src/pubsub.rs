//! Probes of a server's pub/sub state, and a Redlock client with push wake-ups (`fair` off),
//! for the attacks on the wake-up readers (`attack_s35b`, `attack_s35c`).

use std::sync::Arc;
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
    let config = RedlockConfig::new(urls.to_vec())
        .with_node_timeout(node_timeout)
        .with_fair(false);
    Locker::from_arc(Arc::new(Redlock::new(config).expect("redlock")))
        .with_options(
            LockOptions::default()
                .with_ttl(Duration::from_secs(10))
                .with_retry(retry),
        )
        .expect("options")
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

//! R9 helper: `lock-partition <redis-server>`, run by the partition test inside a network
//! namespace of its own (`ip netns exec …`), where it may change nftables rules freely.
//!
//! Starts three redis-servers on the namespace's loopback and a Redlock client, then:
//! 1. drops the packets to one node (`nft … tcp dport P drop`): acquisitions still succeed;
//! 2. drops the packets to two nodes: acquisition fails with a quorum error within its
//!    deadline, while the dropped SETs and releases sit in TCP's retransmission queue;
//! 3. heals the partition: TCP delivers the old requests late (ghost writes), then checks that
//!    no ghost key outlives its ttl, that nobody believes it holds the lock, and that a new
//!    acquirer gets in.
//!
//! Prints one line of `name value` figures; the test asserts on them.

use std::process::Command;
use std::time::{Duration, Instant};

use lock_core::{LockError, LockOptions, Locker, RetryPolicy};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::server::{RedisServer, get_bulk};

const TABLE: &str = "lockpartition";
const TTL: Duration = Duration::from_millis(1_000);
const DEADLINE: Duration = Duration::from_millis(1_500);

fn nft(args: &str) -> Result<(), String> {
    let output = Command::new("nft")
        .args(args.split_whitespace())
        .output()
        .map_err(|e| format!("cannot run nft: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft {args}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Drops every packet sent to the given ports (new and established connections alike).
fn partition(ports: &[u16]) -> Result<(), String> {
    nft(&format!("flush chain inet {TABLE} input"))?;
    for port in ports {
        nft(&format!(
            "add rule inet {TABLE} input tcp dport {port} drop"
        ))?;
    }
    Ok(())
}

fn heal() -> Result<(), String> {
    nft(&format!("flush chain inet {TABLE} input"))
}

fn locker(urls: &[String], retry: RetryPolicy) -> Result<Locker, LockError> {
    Redlock::locker(
        RedlockConfig::new(urls.iter().cloned()).with_node_timeout(Duration::from_millis(50)),
    )?
    .with_options(LockOptions::default().with_ttl(TTL).with_retry(retry))
}

/// How many of the servers hold `key` right now.
fn copies(servers: &[RedisServer], key: &str) -> usize {
    servers
        .iter()
        .filter(|server| get_bulk(server.port(), key).is_some())
        .count()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let binary = std::env::args()
        .nth(1)
        .ok_or("usage: lock-partition <redis-server>")?;
    let servers: Vec<RedisServer> = (0..3)
        .map(|_| RedisServer::start(binary.as_ref(), &[]))
        .collect::<Result<_, _>>()?;
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    nft(&format!("add table inet {TABLE}"))?;
    nft(&format!(
        "add chain inet {TABLE} input {{ type filter hook input priority 0 ; policy accept ; }}"
    ))?;
    let retry = RetryPolicy::forever()
        .with_retry_delay(Duration::from_millis(50))
        .with_deadline(DEADLINE);
    let client = locker(&urls, retry.clone())?;
    let next = locker(&urls, retry)?;
    // Connect to every node before the partitions.
    client.acquire("warm-up").await?.release().await?;

    // 1. One node of three cut off: a majority still answers at once.
    partition(&[servers[2].port()])?;
    let mut minority = Vec::new();
    for _ in 0..10 {
        let started = Instant::now();
        let guard = client.acquire("minority").await?;
        minority.push(started.elapsed());
        guard.release().await?;
    }
    minority.sort();

    // 2. Two of three cut off: a quorum error within the deadline.
    let sets_before = servers[1].calls("set")?;
    partition(&[servers[1].port(), servers[2].port()])?;
    let started = Instant::now();
    let outcome = client.acquire("majority").await;
    let failed_in = started.elapsed();
    let (believed, error) = match outcome {
        Ok(guard) => {
            std::mem::forget(guard);
            (1, "none".to_owned())
        }
        Err(LockError::QuorumNotReached { got, needed, .. }) => {
            (0, format!("quorum-{got}-of-{needed}"))
        }
        Err(other) => (0, format!("{:?}", other.to_string())),
    };

    // 3. Heal: the dropped requests arrive late. Watch for ghosts, then for what outlives the ttl.
    heal()?;
    let key = client.lock_ns("majority")?.to_string();
    let healed = Instant::now();
    let mut ghosts_seen = 0;
    while healed.elapsed() < Duration::from_millis(3_000) {
        ghosts_seen = ghosts_seen.max(copies(&servers, &key));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    let reacquired = next.acquire("majority").await?;
    let reacquire_ms = started.elapsed().as_millis();
    reacquired.release().await?;
    // Retransmissions back off exponentially: give the last one time to land, then one ttl.
    tokio::time::sleep(TTL + Duration::from_millis(2_000)).await;
    let ghosts_left = copies(&servers, &key);
    // SETs of the failed acquisition that the cut-off node executed after the heal (the next
    // holder's own acquisition adds one more).
    let late_sets = servers[1].calls("set")?.saturating_sub(sets_before + 1);
    nft(&format!("delete table inet {TABLE}"))?;

    println!(
        "minority_p50_ms {:.1} minority_max_ms {:.1} error {error} failed_in_ms {} believed_holders {believed} late_sets_executed {late_sets} ghosts_seen_after_heal {ghosts_seen} reacquire_ms {reacquire_ms} ghosts_left_after_ttl {ghosts_left}",
        minority[minority.len() / 2].as_secs_f64() * 1e3,
        minority[minority.len() - 1].as_secs_f64() * 1e3,
        failed_in.as_millis(),
    );
    Ok(())
}

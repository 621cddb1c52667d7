//! Adversarial checks of a Redlock lease stored alone on its key (one string: marker, zero
//! byte, tag, token) on real redis-servers: a value of another application that looks like a
//! lease alone (a binary string beginning with the byte 0xFF and holding a zero byte).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::{LeaseKind, LockError, LockOptions, Locker, RetryPolicy};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::backed::ServerBacked;
use lock_tests::server::redis_or_skip;

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

fn config(urls: Vec<String>) -> RedlockConfig {
    RedlockConfig::new(urls).with_node_timeout(ms(1_000))
}

fn cluster(nodes: usize) -> Option<ServerBacked<Redlock>> {
    redis_or_skip("attack redlock lease alone")?;
    Some(ServerBacked::start(nodes, |urls| {
        Redlock::new(config(urls))
    }))
}

/// One attempt per acquisition, with `ttl`.
fn single(lock: Redlock, ttl: Duration) -> Locker {
    Locker::new(lock)
        .with_options(
            LockOptions::default()
                .with_ttl(ttl)
                .with_retry(RetryPolicy::none()),
        )
        .unwrap()
}

fn connect(url: &str) -> redis::Connection {
    redis::Client::open(url).unwrap().get_connection().unwrap()
}

/// A binary value of another application (here a JPEG header: 0xFF, then zero bytes) with an
/// expiry is not a lease alone: a lease asked on its key is refused naming a Redis string, and
/// the value is left as it was. Old: the acquisition turned it into a sorted set (the value was
/// lost) and named the key a Redis zset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_binary_string_beginning_with_0xff_is_never_rewritten() {
    let Some(mut backed) = cluster(1) else {
        return;
    };
    let url = backed.servers()[0].url();
    let locker = single(backed.lock().clone(), ms(10_000));
    let mut probe = connect(&url);
    let jpeg: &[u8] = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01";
    for (key, kind) in [
        ("img-r", LeaseKind::Read),
        ("img-w", LeaseKind::Write),
        ("img-p", LeaseKind::permit(3).unwrap()),
        ("img-x", LeaseKind::Exclusive),
    ] {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(jpeg)
            .arg("PX")
            .arg(60_000)
            .query(&mut probe)
            .unwrap();
        let refused = locker.try_acquire_kind(key, kind).await;
        assert!(
            matches!(&refused, Err(LockError::InvalidInput { reason, .. }) if reason.contains("Redis string")),
            "{kind} on a foreign binary string: {refused:?}"
        );
        let kind_of: String = redis::cmd("TYPE").arg(key).query(&mut probe).unwrap();
        assert_eq!(kind_of, "string", "{kind}: the foreign value's type");
        let value: Vec<u8> = redis::cmd("GET").arg(key).query(&mut probe).unwrap();
        assert_eq!(value, jpeg, "{kind}: the foreign value");
        let pttl: i64 = redis::cmd("PTTL").arg(key).query(&mut probe).unwrap();
        assert!(pttl > 50_000, "{kind}: the foreign value's expiry: {pttl}");
    }
}

//! `rediss://` against redis-servers started with TLS by the test, for both Redis backends.

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_inc::{IncConfig, IncLock};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::server::redis_or_skip;
use lock_tests::tls::TlsServer;

fn single_attempt(lock: impl lock_core::raw::Lock) -> Locker {
    Locker::new(lock)
        .with_options(LockOptions::default().with_retry(RetryPolicy::none()))
        .expect("options")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_over_rediss_works_with_the_right_ca_and_fails_without_it() {
    let Some(binary) = redis_or_skip("tls") else {
        return;
    };
    let tls = TlsServer::start(&binary).expect("TLS server");
    let mut trusted = RedlockConfig::new([tls.url("rediss")]);
    trusted.tls_ca_file = Some(tls.ca_file.clone());
    let locker = single_attempt(Redlock::new(trusted).expect("backend"));
    locker
        .acquire("tls-key")
        .await
        .expect("acquire over TLS")
        .release()
        .await
        .expect("release over TLS");

    let untrusted =
        single_attempt(Redlock::new(RedlockConfig::new([tls.url("rediss")])).expect("backend"));
    let error = untrusted.acquire("tls-key").await.expect_err("unknown CA");
    println!("TLS (redlock): rediss:// with the test CA works; without it: `{error}`");

    let plain =
        single_attempt(Redlock::new(RedlockConfig::new([tls.url("redis")])).expect("backend"));
    plain
        .acquire("tls-key")
        .await
        .expect_err("plaintext to a TLS port");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_over_rediss_works_with_the_right_ca() {
    let Some(binary) = redis_or_skip("tls") else {
        return;
    };
    let tls = TlsServer::start(&binary).expect("TLS server");
    let config = IncConfig {
        tls_ca_file: Some(tls.ca_file.clone()),
        ..IncConfig::new(tls.url("rediss"))
    };
    let locker = single_attempt(IncLock::connect(config).await.expect("connect over TLS"));
    let guard = locker.acquire("tls-key").await.expect("acquire over TLS");
    assert!(guard.fencing_token().is_some());
    guard.release().await.expect("release over TLS");
    let untrusted = IncConfig {
        connect_timeout: 1_000,
        ..IncConfig::new(tls.url("rediss"))
    };
    let error = IncLock::connect(untrusted).await.expect_err("unknown CA");
    println!("TLS (inc): rediss:// with the test CA works; without it: `{error}`");
}

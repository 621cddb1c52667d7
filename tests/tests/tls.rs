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

/// A CA file that never ends (`/dev/zero`; a huge file alike) is refused at once with a typed
/// error naming the field and the limit: before, Redlock read it whole (`std::fs::read`) and
/// inc line by line (a PEM reader looking for a line break), until memory ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_file_that_never_ends_is_refused_at_once() {
    let mut redlock = RedlockConfig::new(["rediss://127.0.0.1:1"]);
    redlock.tls_ca_file = Some("/dev/zero".into());
    let inc = IncConfig {
        tls_ca_file: Some("/dev/zero".into()),
        ..IncConfig::new("rediss://127.0.0.1:1")
    };
    let started = std::time::Instant::now();
    let errors = [
        Redlock::new(redlock)
            .map(|_| ())
            .expect_err("a CA file that never ends"),
        tokio::time::timeout(std::time::Duration::from_secs(5), IncLock::connect(inc))
            .await
            .expect("inc's connect ended")
            .map(|_| ())
            .expect_err("a CA file that never ends"),
    ];
    for error in errors {
        assert!(
            matches!(&error, lock_core::LockError::InvalidInput { field, .. } if field.ends_with("tls_ca_file")),
            "{error:?}"
        );
        assert!(error.to_string().contains("1 MiB"), "{error}");
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

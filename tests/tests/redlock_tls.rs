//! `rediss://` against a redis-server started with TLS by the test (a CA and a leaf certificate
//! with an IP SAN for 127.0.0.1, generated with openssl at test time).

use std::path::Path;
use std::process::Command;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::server::{RedisServer, free_port, redis_or_skip};

fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl is needed to make test certificates (apt-get install openssl)");
    assert!(status.success(), "openssl {args:?} failed");
}

fn make_certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=lock-tests-ca",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .expect("ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ],
    );
}

fn locker(config: RedlockConfig) -> Locker {
    Locker::new(Redlock::new(config).expect("backend"))
        .with_options(LockOptions::default().with_retry(RetryPolicy::none()))
        .expect("options")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_works_with_the_right_ca_and_fails_without_it() {
    let Some(binary) = redis_or_skip("tls") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    make_certificates(dir.path());
    let tls_port = free_port().expect("port").to_string();
    let file = |name: &str| dir.path().join(name).display().to_string();
    let (cert, key, ca) = (file("server.crt"), file("server.key"), file("ca.crt"));
    let _server = RedisServer::start(
        &binary,
        &[
            "--tls-port",
            &tls_port,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
        ],
    )
    .expect("redis-server with TLS");
    let url = format!("rediss://127.0.0.1:{tls_port}/");

    let mut trusted = RedlockConfig::new([url.clone()]);
    trusted.tls_ca_file = Some(dir.path().join("ca.crt"));
    let guard = locker(trusted)
        .acquire("tls-key")
        .await
        .expect("acquire over TLS");
    guard.release().await.expect("release over TLS");

    let error = locker(RedlockConfig::new([url]))
        .acquire("tls-key")
        .await
        .expect_err("unknown CA");
    println!("TLS: rediss:// with the test CA works; without it: `{error}`");

    let plain = format!("redis://127.0.0.1:{tls_port}/");
    locker(RedlockConfig::new([plain]))
        .acquire("tls-key")
        .await
        .expect_err("plaintext to a TLS port");
}

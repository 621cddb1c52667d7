//! The redis-server harness itself: starts, answers, pauses, restarts empty, and is reaped.

use std::time::Duration;

use lock_tests::server::{RedisServer, redis_or_skip};

const TIMEOUT: Duration = Duration::from_millis(300);

#[test]
fn server_lifecycle() {
    let Some(binary) = redis_or_skip("server_lifecycle") else {
        return;
    };
    let mut server = RedisServer::start(&binary, &[]).expect("redis-server starts");
    assert_eq!(server.command("PING", TIMEOUT).expect("answers"), "+PONG");
    assert!(server.url().starts_with("redis://127.0.0.1:"));

    assert_eq!(
        server.command("SET harness-key v", TIMEOUT).expect("set"),
        "+OK"
    );
    server.pause().expect("SIGSTOP");
    assert!(
        server.command("PING", TIMEOUT).is_err(),
        "a paused server must not answer"
    );
    server.resume().expect("SIGCONT");
    assert_eq!(
        server.command("PING", TIMEOUT).expect("answers again"),
        "+PONG"
    );

    server.restart().expect("restarts on the same port");
    assert_eq!(
        server.command("GET harness-key", TIMEOUT).expect("get"),
        "$-1",
        "no persistence"
    );

    let pid = server.pid().expect("running");
    let port = server.port();
    drop(server);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} not reaped"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port {port} still answers after drop"
    );
}

#[test]
fn startup_failure_reports_the_log_tail() {
    let Some(binary) = redis_or_skip("startup_failure_reports_the_log_tail") else {
        return;
    };
    let error = RedisServer::start(&binary, &["--no-such-option", "1"]).expect_err("bad option");
    let message = error.to_string();
    assert!(message.contains("no-such-option"), "{message}");
}

/// A server started on a port another server holds does not take the other's answers for its
/// own: it moves to a free port and is a process of its own (old harness: it took the other's
/// `PONG`, and two tests running side by side shared one server — CI saw a metrics test count
/// the releases of the test beside it).
#[test]
fn a_taken_port_is_never_shared() {
    let Some(binary) = redis_or_skip("a_taken_port_is_never_shared") else {
        return;
    };
    let first = RedisServer::start(&binary, &[]).expect("redis-server starts");
    let second = RedisServer::start_on_port(&binary, first.port(), &[]).expect("starts elsewhere");
    assert_ne!(second.port(), first.port(), "two servers on one port");
    assert_ne!(second.pid(), first.pid());
    assert_eq!(
        second.command("SET only-second v", TIMEOUT).expect("set"),
        "+OK"
    );
    assert_eq!(
        first.command("GET only-second", TIMEOUT).expect("get"),
        "$-1",
        "the servers share their data"
    );
}

//! adv21a: hostile tests of what changed since 661cd8d — a Redlock node's redis-rs
//! `ConnectionManager` made anew when the server refuses a connection attempt (now also
//! RESP3's `WRONGPASS`), the watchdog's one `report_lost`, and the fault proxy that cuts what
//! it reads into RESP commands. Real redis-server processes on 127.0.0.1 where a server is
//! needed; the in-process store on tokio's paused clock for the watchdog.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_inc::{IncConfig, IncLock};
use lock_redlock::{ConnectionKind, Redlock, RedlockConfig};
use lock_tests::server::{RedisServer, redis_or_skip};
use tokio::time::{Instant, sleep};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const PROBE: Duration = Duration::from_secs(2);

/// The bytes no error may carry: part of every password below.
const SECRET: &str = "s3cr3t";

// ---------------------------------------------------------------------------------------------
// A server that refuses the connection attempt, and then accepts it again (Redlock)
// ---------------------------------------------------------------------------------------------

fn redlock_locker(url: String, ttl: Duration, kind: ConnectionKind) -> Locker {
    Locker::new(
        Redlock::new(
            RedlockConfig::new([url])
                .with_node_timeout(ms(500))
                .with_connection(kind),
        )
        .unwrap(),
    )
    .with_options(
        LockOptions::default()
            .with_ttl(ttl)
            .with_retry(RetryPolicy::none()),
    )
    .unwrap()
}

/// A server with an `admin` ACL user for the test's own commands (the default user may be
/// switched off) and its admin connection.
fn server_with_admin() -> Option<(RedisServer, redis::Connection)> {
    server_with_admin_on(&redis_or_skip("adv21a")?)
}

fn server_with_admin_on(binary: &std::path::Path) -> Option<(RedisServer, redis::Connection)> {
    let server = RedisServer::start(binary, &[]).unwrap();
    let set = server
        .command("ACL SETUSER admin on >admin-pw ~* &* +@all", PROBE)
        .unwrap();
    assert_eq!(set, "+OK");
    let admin = redis::Client::open(format!(
        "redis://admin:admin-pw@127.0.0.1:{}/",
        server.port()
    ))
    .unwrap()
    .get_connection_with_timeout(PROBE)
    .unwrap();
    Some((server, admin))
}

fn admin_do(admin: &mut redis::Connection, words: &[&str]) {
    let mut command = redis::cmd(words[0]);
    for word in &words[1..] {
        command.arg(*word);
    }
    let _: redis::Value = command.query(admin).unwrap();
}

/// Closes every client connection but the admin's: the locker must connect again.
fn kill_clients(admin: &mut redis::Connection) {
    admin_do(
        admin,
        &["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"],
    );
}

/// How many connections the server accepted so far (`INFO stats`).
fn connections_received(admin: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("stats").query(admin).unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("total_connections_received:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// How a server refuses a connection attempt for a moment, and accepts it again.
#[derive(Clone, Copy, Debug)]
enum Refusal {
    /// The URL's ACL user is switched off (`WRONGPASS ... user is disabled` / AUTH refused).
    UserOff,
    /// The URL's ACL user's password is another for a moment.
    UserPasswordRotated,
    /// The URL names database 1, and its ACL user may not `SELECT` for a moment.
    SelectDenied,
    /// No user or password in the URL; the default user is switched off (over RESP3
    /// `HELLO 3` is answered `NOAUTH`; over RESP2 no AUTH is sent, commands answer `NOAUTH`).
    DefaultUserOff,
    /// No user or password in the URL; the default user gets a password for a moment
    /// (`requirepass` set, then cleared).
    PasswordRequired,
}

impl Refusal {
    /// Sets the server up and returns the URL (without the query) the locker uses.
    fn prepare(self, server: &RedisServer, admin: &mut redis::Connection) -> String {
        match self {
            Self::UserOff | Self::UserPasswordRotated => {
                admin_do(
                    admin,
                    &[
                        "ACL",
                        "SETUSER",
                        "app",
                        "on",
                        ">app-s3cr3t",
                        "~*",
                        "&*",
                        "+@all",
                    ],
                );
                format!("redis://app:app-s3cr3t@127.0.0.1:{}/", server.port())
            }
            Self::SelectDenied => {
                admin_do(
                    admin,
                    &[
                        "ACL",
                        "SETUSER",
                        "app",
                        "on",
                        ">app-s3cr3t",
                        "~*",
                        "&*",
                        "+@all",
                    ],
                );
                format!("redis://app:app-s3cr3t@127.0.0.1:{}/1", server.port())
            }
            Self::DefaultUserOff | Self::PasswordRequired => server.url(),
        }
    }

    fn refuse(self, admin: &mut redis::Connection) {
        match self {
            Self::UserOff => admin_do(admin, &["ACL", "SETUSER", "app", "off"]),
            Self::UserPasswordRotated => admin_do(
                admin,
                &["ACL", "SETUSER", "app", "resetpass", ">rotated-s3cr3t"],
            ),
            Self::SelectDenied => admin_do(admin, &["ACL", "SETUSER", "app", "-select"]),
            Self::DefaultUserOff => admin_do(admin, &["ACL", "SETUSER", "default", "off"]),
            Self::PasswordRequired => {
                admin_do(admin, &["CONFIG", "SET", "requirepass", "other-s3cr3t"]);
            }
        }
    }

    fn accept(self, admin: &mut redis::Connection) {
        match self {
            Self::UserOff => admin_do(admin, &["ACL", "SETUSER", "app", "on"]),
            Self::UserPasswordRotated => admin_do(
                admin,
                &["ACL", "SETUSER", "app", "resetpass", ">app-s3cr3t"],
            ),
            Self::SelectDenied => admin_do(admin, &["ACL", "SETUSER", "app", "+select"]),
            Self::DefaultUserOff => admin_do(admin, &["ACL", "SETUSER", "default", "on"]),
            Self::PasswordRequired => admin_do(admin, &["CONFIG", "SET", "requirepass", ""]),
        }
    }
}

/// What a locker did after a refusal ended.
#[derive(Debug)]
struct AfterRefusal {
    /// The held guard's extends after the refusal ended (one per 200 ms for 2 s).
    extends: Vec<bool>,
    /// A fresh acquisition on the same locker, after them.
    acquired: bool,
    /// Every error seen, `Display` and `Debug`.
    errors: String,
}

impl AfterRefusal {
    fn works_again(&self) -> bool {
        self.extends.iter().skip(1).all(|&ok| ok) && self.acquired
    }
}

/// A guard held on one node; the server refuses the connection attempts for a moment (the
/// locker's connections killed so that it must connect again, and tries twice meanwhile); then
/// the server accepts them again.
async fn redlock_after_refusal(
    binary: &std::path::Path,
    refusal: Refusal,
    kind: ConnectionKind,
    query: &str,
) -> Option<AfterRefusal> {
    let (server, mut admin) = server_with_admin_on(binary)?;
    let url = format!("{}{query}", refusal.prepare(&server, &mut admin));
    let locker = redlock_locker(url, Duration::from_secs(30), kind);
    let mut guard = locker.acquire("k").await.unwrap();
    let mut errors = String::new();
    refusal.refuse(&mut admin);
    kill_clients(&mut admin);
    sleep(ms(100)).await;
    for _ in 0..2 {
        if let Err(error) = guard.extend(Duration::from_secs(30)).await {
            errors.push_str(&format!("{error} {error:?}\n"));
        }
        if let Err(error) = locker.try_acquire("refused").await {
            errors.push_str(&format!("{error} {error:?}\n"));
        }
        sleep(ms(200)).await;
    }
    refusal.accept(&mut admin);
    sleep(ms(300)).await;
    let mut extends = Vec::new();
    for _ in 0..10 {
        let extended = guard.extend(Duration::from_secs(30)).await;
        if let Err(error) = &extended {
            errors.push_str(&format!("{error} {error:?}\n"));
        }
        extends.push(extended.is_ok());
        sleep(ms(200)).await;
    }
    let other = locker.try_acquire("other").await;
    if let Err(error) = &other {
        errors.push_str(&format!("{error} {error:?}\n"));
    }
    let acquired = matches!(other, Ok(Some(_)));
    if let Ok(Some(other)) = other {
        let _ = other.release().await;
    }
    let _ = guard.release().await;
    let _ = locker.stop().await;
    Some(AfterRefusal {
        extends,
        acquired,
        errors,
    })
}

/// Runs the refusal for every kind, then fails naming each kind whose node did not work
/// again (with its first error).
async fn assert_works_again(refusal: Refusal, kinds: &[ConnectionKind], query: &str) {
    if let Some(binary) = redis_or_skip("adv21a") {
        assert_works_again_on(&binary, refusal, kinds, query).await;
    }
}

async fn assert_works_again_on(
    binary: &std::path::Path,
    refusal: Refusal,
    kinds: &[ConnectionKind],
    query: &str,
) {
    let mut broken = Vec::new();
    for &kind in kinds {
        let Some(after) = redlock_after_refusal(binary, refusal, kind, query).await else {
            return;
        };
        assert!(
            !after.errors.is_empty(),
            "{refusal:?} {kind:?} {query}: the refusal was never met (a vacuous run)"
        );
        assert!(
            !after.errors.contains(SECRET),
            "{refusal:?} {kind:?} {query}: a password in an error: {}",
            after.errors
        );
        if !after.works_again() {
            let last = after.errors.lines().last().unwrap_or_default().to_owned();
            broken.push(format!(
                "{kind:?}: extends {:?}, acquired {}, last error: {last}",
                after.extends, after.acquired
            ));
        }
    }
    assert!(
        broken.is_empty(),
        "{refusal:?} {query}: the node did not work again once the server accepted it:\n{}",
        broken.join("\n")
    );
}

const BOTH: [ConnectionKind; 2] = [ConnectionKind::Manager, ConnectionKind::Pool];

/// The URL's ACL user switched off for a moment, over RESP2: held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_resp2_acl_user_off_then_on_works_again() {
    assert_works_again(Refusal::UserOff, &BOTH, "").await;
}

/// The same over RESP3 (`HELLO 3 AUTH` answered `WRONGPASS ... user is disabled`): held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_resp3_acl_user_off_then_on_works_again() {
    assert_works_again(Refusal::UserOff, &BOTH, "?protocol=resp3").await;
}

/// The URL's ACL user's password rotated for a moment, RESP2 and RESP3: held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_acl_user_password_rotated_then_restored_works_again() {
    assert_works_again(Refusal::UserPasswordRotated, &BOTH, "").await;
    assert_works_again(Refusal::UserPasswordRotated, &BOTH, "?protocol=resp3").await;
}

/// The URL's database refused (`SELECT` denied to its ACL user) for a moment, RESP2 and
/// RESP3: held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_select_denied_for_a_moment_works_again() {
    assert_works_again(Refusal::SelectDenied, &BOTH, "").await;
    assert_works_again(Refusal::SelectDenied, &BOTH, "?protocol=resp3").await;
}

/// No password in the URL, the default user off for a moment, over RESP2 (the connection is
/// made, its commands answer `NOAUTH` until the user is on again): held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_resp2_default_user_off_then_on_works_again() {
    assert_works_again(Refusal::DefaultUserOff, &BOTH, "").await;
}

/// No password in the URL, a password required for a moment, over RESP2: held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_resp2_password_required_for_a_moment_works_again() {
    assert_works_again(Refusal::PasswordRequired, &BOTH, "").await;
}

/// Broke on main: no password in the URL, over RESP3: the default user off for a moment. redis-rs sends
/// `HELLO 3` (no AUTH), which the server answers `NOAUTH HELLO must be called with the client
/// already authenticated ...`: a refusal of the connection attempt that is neither
/// `AuthenticationFailed` nor `WRONGPASS`, so the manager keeps it as its connection for good
/// and the node is lost for the locker's life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_resp3_default_user_off_then_on_works_again() {
    assert_works_again(Refusal::DefaultUserOff, &BOTH, "?protocol=resp3").await;
}

/// Broke on main: the same with a password required for a moment (`requirepass` set, then
/// cleared).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_resp3_password_required_for_a_moment_works_again() {
    assert_works_again(Refusal::PasswordRequired, &BOTH, "?protocol=resp3").await;
}

/// The same on Valkey (its `HELLO` refusal has the same wording): held after the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_resp3_on_valkey_password_required_for_a_moment_works_again() {
    let Some(binary) = lock_tests::server::valkey_or_skip("adv21a: valkey") else {
        return;
    };
    assert_works_again_on(&binary, Refusal::PasswordRequired, &BOTH, "?protocol=resp3").await;
}

// ---------------------------------------------------------------------------------------------
// No reconnect storm: NOPERM, and a server that refuses the password for good
// ---------------------------------------------------------------------------------------------

/// The first lines of `errors`.
fn head(errors: &str) -> String {
    errors.lines().take(3).collect::<Vec<_>>().join("\n")
}

/// The locker's requests for `rounds` rounds (an extend of `guard` and an acquisition of
/// another key, 50 ms apart): the connections the server accepted meanwhile, and the errors.
async fn requests_for(
    locker: &Locker,
    guard: &mut lock_core::LockGuard,
    admin: &mut redis::Connection,
    rounds: usize,
) -> (u64, String) {
    let before = connections_received(admin);
    let mut errors = String::new();
    for _ in 0..rounds {
        if let Err(error) = guard.extend(Duration::from_secs(30)).await {
            errors.push_str(&format!("{error} {error:?}\n"));
        }
        match locker.try_acquire("other").await {
            Err(error) => errors.push_str(&format!("{error} {error:?}\n")),
            Ok(Some(other)) => drop(other.release().await),
            Ok(None) => {}
        }
        sleep(ms(50)).await;
    }
    (connections_received(admin) - before, errors)
}

/// An ACL user that may not run scripts or writes for a while: every request answers
/// `NOPERM`, which is not a refused connection: no connection is made anew for it (manager
/// and pool, RESP2 and RESP3), and once the permission is back the same locker works. The
/// negative control: the same number of requests while the user's password is another
/// (`AUTH`/`HELLO` refused) does make connections, one or more per request, and no more than
/// a few per request. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_noperm_makes_no_connection_anew_and_wrongpass_only_one_per_request() {
    for query in ["", "?protocol=resp3"] {
        for kind in BOTH {
            let Some((server, mut admin)) = server_with_admin() else {
                return;
            };
            let url = format!("{}{query}", Refusal::UserOff.prepare(&server, &mut admin));
            let locker = redlock_locker(url, Duration::from_secs(30), kind);
            let mut guard = locker.acquire("k").await.unwrap();
            // Opens the pool's ordered connection too.
            guard.extend(Duration::from_secs(30)).await.unwrap();
            admin_do(
                &mut admin,
                &["ACL", "SETUSER", "app", "-@scripting", "-@write"],
            );
            let (made, errors) = requests_for(&locker, &mut guard, &mut admin, 20).await;
            assert!(
                errors.to_lowercase().contains("noperm") && errors.lines().count() >= 40,
                "{kind:?} {query}: not every request was refused NOPERM:\n{}",
                head(&errors)
            );
            assert!(
                made <= 1,
                "{kind:?} {query}: {made} connections made for 40 requests answered NOPERM"
            );
            admin_do(&mut admin, &["ACL", "SETUSER", "app", "+@all"]);
            let (_, errors) = requests_for(&locker, &mut guard, &mut admin, 3).await;
            assert!(
                errors.is_empty(),
                "{kind:?} {query}: not working again: {}",
                head(&errors)
            );
            // The control: refused passwords, after the locker's connections were closed.
            Refusal::UserPasswordRotated.refuse(&mut admin);
            kill_clients(&mut admin);
            sleep(ms(100)).await;
            let (made, errors) = requests_for(&locker, &mut guard, &mut admin, 20).await;
            assert!(
                errors.contains("WRONGPASS") || errors.contains("authentication failed"),
                "{kind:?} {query}: {}",
                head(&errors)
            );
            assert!(!errors.contains(SECRET), "a password in an error: {errors}");
            // An extend costs a connection and its one retry; a failed acquisition also its
            // clean-up, sent again in the background: ~2 and ~6 (pool ~4) on this machine.
            assert!(
                (15..=10 * 40).contains(&made),
                "{kind:?} {query}: {made} connections for 40 requests refused their password"
            );
            let _ = locker.stop().await;
        }
    }
}

/// A kept-alive guard (ttl 3 s) whose server refuses the locker's password for good (an ACL
/// user's password rotated, its connections killed): over 4 s the watchdog's extends fail and
/// the guard is reported lost, each try costing a connection or two, never a storm; once the
/// loss is reported and nothing is asked, no connection at all for 2 s (no reconnect loop in
/// the background); then the password is the URL's again and the same locker acquires and
/// extends. Manager and pool, RESP2 and RESP3. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_resp2_wrongpass_for_good_is_no_reconnect_storm_and_the_locker_recovers() {
    refused_for_good(Refusal::UserPasswordRotated, "").await;
}

/// The same over RESP3. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_resp3_wrongpass_for_good_is_no_reconnect_storm_and_the_locker_recovers() {
    refused_for_good(Refusal::UserPasswordRotated, "?protocol=resp3").await;
}

/// The same over RESP3 with no password in the URL and the default user off (`HELLO`
/// refused `NOAUTH`; since the fix each refused request makes the manager anew): no storm
/// either, and the locker works again once the user is on. Held (after the fix).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_resp3_hello_noauth_for_good_is_no_reconnect_storm_and_the_locker_recovers() {
    refused_for_good(Refusal::DefaultUserOff, "?protocol=resp3").await;
}

async fn refused_for_good(refusal: Refusal, query: &str) {
    for kind in BOTH {
        let Some((server, mut admin)) = server_with_admin() else {
            return;
        };
        let url = format!("{}{query}", refusal.prepare(&server, &mut admin));
        let locker = redlock_locker(url, Duration::from_secs(3), kind);
        let mut guard = locker.acquire("k").await.unwrap();
        guard.extend(Duration::from_secs(3)).await.unwrap();
        let lost = guard.keep_alive().unwrap();
        refusal.refuse(&mut admin);
        kill_clients(&mut admin);
        let before = connections_received(&mut admin);
        tokio::time::timeout(Duration::from_secs(5), lost.lost())
            .await
            .unwrap_or_else(|_| {
                panic!("{refusal:?} {kind:?} {query}: the loss was never reported")
            });
        let during = connections_received(&mut admin) - before;
        // The watchdog retries every 300 ms while the 3 s validity lasts: ~10 tries.
        assert!(
            during <= 60,
            "{refusal:?} {kind:?} {query}: {during} connections while the watchdog tried to extend"
        );
        sleep(ms(200)).await;
        let before = connections_received(&mut admin);
        sleep(Duration::from_secs(2)).await;
        let idle = connections_received(&mut admin) - before;
        assert!(
            idle <= 1,
            "{refusal:?} {kind:?} {query}: {idle} connections in 2 s while nothing was asked"
        );
        let released = guard.release().await;
        assert!(
            released.is_err(),
            "{refusal:?} {kind:?} {query}: {released:?}"
        );
        let text = format!("{} {:?}", released.as_ref().unwrap_err(), released);
        assert!(!text.contains(SECRET), "a password in an error: {text}");
        refusal.accept(&mut admin);
        let mut again = None;
        for _ in 0..20 {
            if let Ok(Some(got)) = locker.try_acquire("k2").await {
                again = Some(got);
                break;
            }
            sleep(ms(100)).await;
        }
        let mut again =
            again.unwrap_or_else(|| panic!("{refusal:?} {kind:?} {query}: never acquired again"));
        // The connection is new: on a loaded machine one extend may miss its node timeout (seen
        // once in CI), which leaves the lock as it was; recovered means it extends within 2 s.
        let mut extended = again.extend(Duration::from_secs(3)).await;
        for _ in 0..20 {
            if extended.is_ok() {
                break;
            }
            sleep(ms(100)).await;
            extended = again.extend(Duration::from_secs(3)).await;
        }
        extended.unwrap_or_else(|error| {
            panic!("{refusal:?} {kind:?} {query}: never extended: {error}")
        });
        again.release().await.unwrap();
        let _ = locker.stop().await;
    }
}

// ---------------------------------------------------------------------------------------------
// The inc backend (fred): a refused password, its connection killed, then accepted again
// ---------------------------------------------------------------------------------------------

/// The inc backend through a password rotation (or its ACL user off): a held guard, the
/// client's connection killed while the server refuses its password, then the password is
/// accepted again: the same guard extends and the same locker acquires within 5 s (fred
/// reconnects by itself, backing off to 1 s at most). Over the refusal, fred's reconnects are
/// bounded (its backoff: a few per second, no storm), and no error carries the password.
/// RESP2 here; the same over RESP3 (`HELLO 3 AUTH`) is in `attack_s22a.rs`. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_works_again_within_seconds_once_the_password_is_accepted_again() {
    for refusal in [Refusal::UserPasswordRotated, Refusal::UserOff] {
        let Some((server, mut admin)) = server_with_admin() else {
            return;
        };
        let url = refusal.prepare(&server, &mut admin);
        let lock = IncLock::connect(IncConfig::new(url)).await.unwrap();
        let locker = Locker::new(lock)
            .with_options(
                LockOptions::default()
                    .with_ttl(Duration::from_secs(30))
                    .with_retry(RetryPolicy::none()),
            )
            .unwrap();
        let mut guard = locker.acquire("k").await.unwrap();
        refusal.refuse(&mut admin);
        kill_clients(&mut admin);
        let before = connections_received(&mut admin);
        let mut errors = String::new();
        for _ in 0..6 {
            if let Err(error) = guard.extend(Duration::from_secs(30)).await {
                errors.push_str(&format!("{error} {error:?}\n"));
            }
            sleep(ms(500)).await;
        }
        let during = connections_received(&mut admin) - before;
        assert!(
            !errors.is_empty(),
            "{refusal:?}: the refusal was never met (a vacuous run)"
        );
        assert!(
            (1..=30).contains(&during),
            "{refusal:?}: {during} reconnects in 3 s of refused passwords"
        );
        refusal.accept(&mut admin);
        let accepted = Instant::now();
        let mut extended = false;
        while accepted.elapsed() < Duration::from_secs(5) {
            match guard.extend(Duration::from_secs(30)).await {
                Ok(()) => {
                    extended = true;
                    break;
                }
                Err(error) => errors.push_str(&format!("{error} {error:?}\n")),
            }
            sleep(ms(100)).await;
        }
        assert!(
            extended,
            "{refusal:?}: no extend within 5 s of the password accepted again:\n{}",
            head(&errors)
        );
        let other = locker.try_acquire("other").await;
        assert!(matches!(other, Ok(Some(_))), "{refusal:?}: {other:?}");
        assert!(!errors.contains(SECRET), "a password in an error: {errors}");
        guard.release().await.unwrap();
        drop(other);
        let _ = locker.stop().await;
    }
}

/// `?protocol=resp3` on an inc URL: fred ignored the query, so the backend connected over
/// RESP2 all the same; since 7f589ac inc reads it and speaks RESP3 (`CLIENT LIST` says
/// `resp=3`; this test asserted `resp=2` and failed on main from then on, found by adv22a).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_speaks_the_protocol_the_url_says() {
    let Some((server, mut admin)) = server_with_admin() else {
        return;
    };
    let lock = IncLock::connect(IncConfig::new(format!("{}?protocol=resp3", server.url())))
        .await
        .unwrap();
    let locker = Locker::new(lock);
    let guard = locker.acquire("k").await.unwrap();
    let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut admin).unwrap();
    let others: Vec<&str> = list
        .lines()
        .filter(|line| !line.contains("user=admin"))
        .collect();
    assert!(!others.is_empty(), "{list}");
    assert!(others.iter().all(|line| line.contains("resp=3")), "{list}");
    guard.release().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// The watchdog's five ways of finding a lease lost (one `report_lost` since 4d32ff8)
// ---------------------------------------------------------------------------------------------

/// The sum of every figure named `metric` whose labels include `backend=<backend>`.
fn figure(metric: &str, backend: &str) -> f64 {
    let label = format!("backend={backend}");
    figures()
        .iter()
        .filter(|(name, _)| {
            name.starts_with(&format!("{metric}{{"))
                && name
                    .trim_start_matches(metric)
                    .trim_matches(|c| c == '{' || c == '}')
                    .split(',')
                    .any(|part| part == label)
        })
        .map(|(_, value)| value)
        .sum()
}

mod scripted {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use lock_core::{
        Capabilities, Key, KeyState, Lease, LockError, Result,
        raw::{Answer, Handle, Lock, LockRequest, async_trait},
    };
    use lock_memory::MemoryLock;
    use tokio::time::{Instant, sleep};

    /// The ttl the guards are taken and kept alive with.
    pub(crate) const TTL: Duration = Duration::from_millis(300);
    /// The ttl of an extend by hand.
    pub(crate) const BY_HAND: Duration = Duration::from_secs(10);

    /// How the store answers the watchdog's extends (its ttl is [`TTL`]).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Extends {
        /// Taken at once.
        Work,
        /// A backend error, every time: the validity lapses with no extend.
        Fail,
        /// Not supported: the watchdog only waits for the validity to lapse.
        Unsupported,
        /// The store says the token is not there.
        NotHeld,
        /// The backend was stopped.
        Stopped,
        /// Taken, but answered with no validity left (the answer came after the new expiry).
        Late,
        /// Never answered: the validity lapses while the extend is out.
        Hang,
        /// Taken at once; an extend by hand holds the handle for 250 ms and fails (the
        /// holder holds the handle past the validity).
        HolderHolds,
    }

    /// The in-process store, with its handles' extends as `extends` says.
    #[derive(Debug)]
    pub(crate) struct Scripted {
        pub(crate) name: &'static str,
        pub(crate) memory: MemoryLock,
        pub(crate) extends: Extends,
        /// Extends the watchdog sent.
        pub(crate) sent: Arc<AtomicU32>,
    }

    #[derive(Debug)]
    struct ScriptedHandle {
        inner: Box<dyn Handle>,
        lease: Lease,
        extends: Extends,
        sent: Arc<AtomicU32>,
    }

    #[async_trait]
    impl Lock for Scripted {
        fn name(&self) -> &'static str {
            self.name
        }

        fn capabilities(&self) -> Capabilities {
            self.memory.capabilities()
        }

        fn try_acquire<'a>(
            &'a self,
            request: &'a LockRequest,
        ) -> Answer<'a, Result<Option<Box<dyn Handle>>>> {
            Answer::later(async move {
                let start = Instant::now();
                let Some(inner) = self.memory.try_acquire(request).await? else {
                    return Ok(None);
                };
                Ok(Some(Box::new(ScriptedHandle {
                    inner,
                    lease: Lease::new(request, start + request.ttl()),
                    extends: self.extends,
                    sent: Arc::clone(&self.sent),
                }) as Box<dyn Handle>))
            })
        }

        fn abandon<'a>(&'a self, request: &'a LockRequest) -> Answer<'a, Result<bool>> {
            Answer::later(async move { self.memory.abandon(request).await })
        }

        async fn purge(&self, prefix: &str) -> Result<u64> {
            self.memory.purge(prefix).await
        }

        async fn inspect(&self, key: &Key) -> Result<Vec<KeyState>> {
            self.memory.inspect(key).await
        }
    }

    #[async_trait]
    impl Handle for ScriptedHandle {
        fn lease(&self) -> &Lease {
            &self.lease
        }

        async fn extend(&mut self, ttl: Duration) -> Result<()> {
            let sent = Instant::now();
            if ttl == BY_HAND {
                // The holder's: it holds the handle 250 ms, and fails.
                sleep(Duration::from_millis(250)).await;
                return Err(LockError::backend(
                    "scripted",
                    "the store cannot be reached",
                ));
            }
            self.sent.fetch_add(1, Ordering::SeqCst);
            match self.extends {
                Extends::Work | Extends::HolderHolds => {
                    self.inner.extend(ttl).await?;
                    self.lease.set_valid_until(sent + ttl);
                    Ok(())
                }
                Extends::Fail => Err(LockError::backend(
                    "scripted",
                    "the store cannot be reached",
                )),
                Extends::Unsupported => Err(LockError::Unsupported {
                    capability: "extend",
                    backend: "scripted",
                }),
                Extends::NotHeld => Err(LockError::NotHeld {
                    key: self.lease.key().to_string(),
                }),
                Extends::Stopped => Err(LockError::Stopped),
                Extends::Late => {
                    sleep(Duration::from_millis(20)).await;
                    self.lease.set_valid_until(Instant::now());
                    Ok(())
                }
                Extends::Hang => std::future::pending().await,
            }
        }

        fn release(&mut self) -> Answer<'_, Result<()>> {
            Answer::later(async move { self.inner.release().await })
        }
    }
}

use scripted::{Extends, Scripted};

/// What became of a kept-alive guard whose watchdog met `extends`.
#[derive(Debug)]
struct Watched {
    /// When (after the acquisition) the lost signal fired, if within 3 s.
    lost_after: Option<Duration>,
    /// Right when it fired: the guard's `is_valid` and `remaining`.
    valid_at_loss: bool,
    remaining_at_loss: Duration,
    /// Extends the watchdog sent up to the loss, and in the 3 s after it.
    sent_to_loss: u32,
    sent_after: u32,
    /// `lock_lost_total` of this backend at the loss, and after the release; `lock_held`
    /// after the release; `lock_extend_failures_total` at the end.
    lost_counted: f64,
    lost_counted_after_release: f64,
    held_after_release: f64,
    extend_failures: f64,
    /// The lost signal's `is_lost` after the release, and a second signal's.
    still_lost: bool,
}

/// A guard on `k` taken with ttl [`scripted::TTL`] and kept alive over a store whose extends
/// answer as `extends` says; an extend by hand at 150 ms for [`Extends::HolderHolds`].
async fn kept_alive_over(name: &'static str, extends: Extends) -> Watched {
    use std::sync::atomic::Ordering;
    // The recorder is installed before anything is counted.
    let _ = figures();
    let sent = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let locker = Locker::from_arc(Arc::new(Scripted {
        name,
        memory: lock_memory::MemoryLock::new(),
        extends,
        sent: Arc::clone(&sent),
    }) as Arc<dyn lock_core::raw::Lock>)
    .with_options(
        LockOptions::default()
            .with_ttl(scripted::TTL)
            .with_retry(RetryPolicy::none()),
    )
    .unwrap();
    let taken = Instant::now();
    let mut guard = locker.acquire("k").await.unwrap();
    let lost = guard.keep_alive().unwrap();
    let second = guard.keep_alive().unwrap();
    let by_hand = extends == Extends::HolderHolds;
    let fired = async {
        if by_hand {
            sleep_until_after(taken, ms(150)).await;
            let extended = guard.extend(scripted::BY_HAND).await;
            assert!(extended.is_err(), "{extended:?}");
        }
        tokio::time::timeout(Duration::from_secs(3), lost.lost()).await
    }
    .await;
    let lost_after = fired.ok().map(|()| taken.elapsed());
    let valid_at_loss = guard.is_valid();
    let remaining_at_loss = guard.remaining();
    let sent_to_loss = sent.load(Ordering::SeqCst);
    let lost_counted = figure("lock_lost_total", name);
    sleep(Duration::from_secs(3)).await;
    let sent_after = sent.load(Ordering::SeqCst) - sent_to_loss;
    let _ = guard.release().await;
    Watched {
        lost_after,
        valid_at_loss,
        remaining_at_loss,
        sent_to_loss,
        sent_after,
        lost_counted,
        lost_counted_after_release: figure("lock_lost_total", name),
        held_after_release: figure("lock_held", name),
        extend_failures: figure("lock_extend_failures_total", name),
        still_lost: lost.is_lost() && second.is_lost(),
    }
}

async fn sleep_until_after(start: Instant, after: Duration) {
    tokio::time::sleep_until(start + after).await;
}

/// The promises of a loss the watchdog found: the signal fires within the validity (or once
/// the holder gives the handle back), the lease ends (`is_valid` false, nothing remaining) at
/// that moment, `lock_lost_total` counts it once (and the release after it does not count it
/// again), the guard no longer counts as held, the watchdog sends nothing after it, and the
/// signal stays fired.
fn assert_lost_once(name: &str, watched: &Watched, by: Duration, extend_failures: f64) {
    let lost_after = watched
        .lost_after
        .unwrap_or_else(|| panic!("{name}: the loss was never reported: {watched:#?}"));
    assert!(lost_after <= by, "{name}: reported late: {watched:#?}");
    assert!(
        !watched.valid_at_loss && watched.remaining_at_loss.is_zero(),
        "{name}: the lease did not end with the loss: {watched:#?}"
    );
    assert!(
        watched.lost_counted == 1.0 && watched.lost_counted_after_release == 1.0,
        "{name}: lock_lost_total is not 1: {watched:#?}"
    );
    assert!(
        watched.held_after_release == 0.0,
        "{name}: lock_held: {watched:#?}"
    );
    assert_eq!(
        watched.sent_after, 0,
        "{name}: the watchdog went on after the loss: {watched:#?}"
    );
    assert!(watched.still_lost, "{name}: {watched:#?}");
    assert!(
        watched.extend_failures == extend_failures,
        "{name}: lock_extend_failures_total, {extend_failures} expected: {watched:#?}"
    );
}

/// Every extend fails: the validity (300 ms) lapses with no extend. The watchdog tries from
/// 200 ms, every 30 ms: 4 failures (200, 230, 260, 290) before the lapse. Held.
#[tokio::test(start_paused = true)]
async fn watchdog_validity_lapse_with_failing_extends_is_reported_once() {
    let watched = kept_alive_over("adv21a-fail", Extends::Fail).await;
    assert!(watched.sent_to_loss >= 3, "{watched:#?}");
    let failures = f64::from(watched.sent_to_loss);
    assert_lost_once("fail", &watched, ms(301), failures);
}

/// The backend cannot extend: the watchdog waits for the lapse. Held.
#[tokio::test(start_paused = true)]
async fn watchdog_validity_lapse_when_extends_are_unsupported_is_reported_once() {
    let watched = kept_alive_over("adv21a-unsupported", Extends::Unsupported).await;
    assert_eq!(watched.sent_to_loss, 1, "{watched:#?}");
    assert_lost_once("unsupported", &watched, ms(301), 0.0);
}

/// An extend answered `NotHeld`, and one answered `Stopped`: lost at once (200 ms). Held.
#[tokio::test(start_paused = true)]
async fn watchdog_extend_answered_not_held_or_stopped_is_reported_once() {
    for (name, extends) in [
        ("adv21a-notheld", Extends::NotHeld),
        ("adv21a-stopped", Extends::Stopped),
    ] {
        let watched = kept_alive_over(name, extends).await;
        assert_eq!(watched.sent_to_loss, 1, "{name}: {watched:#?}");
        assert_lost_once(name, &watched, ms(201), 1.0);
    }
}

/// An extend taken but answered with no validity left. Held.
#[tokio::test(start_paused = true)]
async fn watchdog_extend_answered_after_its_ttl_is_reported_once() {
    let watched = kept_alive_over("adv21a-late", Extends::Late).await;
    assert_eq!(watched.sent_to_loss, 1, "{watched:#?}");
    assert_lost_once("late", &watched, ms(221), 1.0);
}

/// An extend never answered: the loss is reported when the validity lapses (300 ms), not when
/// the extend would end. Held.
#[tokio::test(start_paused = true)]
async fn watchdog_validity_lapsing_while_an_extend_is_out_is_reported_once() {
    let watched = kept_alive_over("adv21a-hang", Extends::Hang).await;
    assert_eq!(watched.sent_to_loss, 1, "{watched:#?}");
    assert_lost_once("hang", &watched, ms(301), 1.0);
}

/// The holder holds the handle (an extend by hand, 150 ms to 400 ms) past the validity
/// (300 ms): the watchdog, waiting for the handle, reports the loss when it gets it (400 ms)
/// and does not extend. The failed extend by hand counts as one failure. Held.
#[tokio::test(start_paused = true)]
async fn watchdog_holder_holding_the_handle_past_the_validity_is_reported_once() {
    let watched = kept_alive_over("adv21a-holder", Extends::HolderHolds).await;
    assert_eq!(watched.sent_to_loss, 0, "{watched:#?}");
    assert_lost_once("holder", &watched, ms(401), 1.0);
    assert_eq!(
        figure("lock_lost_total", "adv21a-holder"),
        1.0,
        "{:#?}",
        figures()
    );
}

/// The negative control: extends that work keep the guard alive for 3 s and more, with no
/// loss counted (the checks above are not vacuous).
#[tokio::test(start_paused = true)]
async fn watchdog_control_extends_that_work_lose_nothing() {
    let watched = kept_alive_over("adv21a-work", Extends::Work).await;
    assert_eq!(watched.lost_after, None, "{watched:#?}");
    assert!(watched.sent_to_loss >= 10, "{watched:#?}");
    assert_eq!(watched.lost_counted_after_release, 0.0, "{watched:#?}");
    assert_eq!(watched.held_after_release, 0.0, "{watched:#?}");
}

// ---------------------------------------------------------------------------------------------
// The fault proxy (175cf13): whole commands, counted, stalled and dropped one by one
// ---------------------------------------------------------------------------------------------

use lock_tests::proxy::LatencyProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "support/recorded.rs"]
mod recorded;
use recorded::figures;

async fn proxied() -> Option<(RedisServer, LatencyProxy)> {
    let binary = redis_or_skip("adv21a: proxy")?;
    let server = RedisServer::start(&binary, &[]).unwrap();
    let proxy = LatencyProxy::start(server.port()).await.unwrap();
    Some((server, proxy))
}

/// A value of `len` bytes, every byte value and `\r\n*$` among them.
fn value(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| match i % 7 {
            0 => b'\r',
            1 => b'\n',
            2 => b'*',
            3 => b'$',
            _ => (i as u8).wrapping_mul(31).wrapping_add(seed),
        })
        .collect()
}

/// redis-rs over RESP2 and RESP3 through the proxy: values of 1 B to 1 MiB (split over many
/// of the proxy's 16 KiB reads), each set and read back unchanged, and pipelines of 300
/// commands with large values among them, every answer in its place. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_carries_large_values_and_pipelines_unchanged_over_resp2_and_resp3() {
    let Some((_server, proxy)) = proxied().await else {
        return;
    };
    for query in ["", "?protocol=resp3"] {
        let client = redis::Client::open(format!("{}{query}", proxy.url())).unwrap();
        let mut connection = tokio::time::timeout(
            Duration::from_secs(5),
            client.get_multiplexed_async_connection(),
        )
        .await
        .unwrap()
        .unwrap();
        for (i, len) in [1, 16 * 1024 - 1, 16 * 1024, 16 * 1024 + 1, 100_000, 1 << 20]
            .into_iter()
            .enumerate()
        {
            let sent = value(len, i as u8);
            let key = format!("v{i}{query}");
            let (back,): (Vec<u8>,) = tokio::time::timeout(
                Duration::from_secs(5),
                redis::pipe()
                    .cmd("SET")
                    .arg(&key)
                    .arg(&sent)
                    .ignore()
                    .cmd("GET")
                    .arg(&key)
                    .query_async(&mut connection),
            )
            .await
            .unwrap()
            .unwrap();
            assert!(
                back == sent,
                "{query}: a value of {len} B came back changed"
            );
        }
        let mut pipe = redis::pipe();
        for i in 0..300u32 {
            if i % 50 == 7 {
                pipe.cmd("SET")
                    .arg(format!("p{i}"))
                    .arg(value(40_000, i as u8))
                    .ignore();
                pipe.cmd("STRLEN").arg(format!("p{i}"));
            } else {
                pipe.cmd("INCRBY").arg(format!("n{query}")).arg(i);
            }
        }
        let answers: Vec<i64> =
            tokio::time::timeout(Duration::from_secs(10), pipe.query_async(&mut connection))
                .await
                .unwrap()
                .unwrap();
        let mut total = 0i64;
        let expected: Vec<i64> = (0..300i64)
            .map(|i| {
                if i % 50 == 7 {
                    40_000
                } else {
                    total += i;
                    total
                }
            })
            .collect();
        assert_eq!(answers, expected, "{query}");
    }
}

/// fred (the inc backend's client) through the proxy, over RESP2 and RESP3 (fred's
/// `version`): a 200 KiB value and 200 commands sent at once without waiting, every answer
/// right. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_carries_fred_traffic_unchanged_over_resp2_and_resp3() {
    use fred::prelude::{ClientLike, Config, KeysInterface};
    use fred::types::RespVersion;
    let Some((_server, proxy)) = proxied().await else {
        return;
    };
    for version in [RespVersion::RESP2, RespVersion::RESP3] {
        let mut config = Config::from_url(&proxy.url()).unwrap();
        config.version = version.clone();
        let client = fred::prelude::Client::new(config, None, None, None);
        let _connection = client.init().await.unwrap();
        assert_eq!(client.protocol_version(), version);
        let sent = value(200_000, 9);
        let () = client
            .set("big", sent.as_slice(), None, None, false)
            .await
            .unwrap();
        let back: Vec<u8> = client.get("big").await.unwrap();
        assert!(back == sent, "{version:?}: the value came back changed");
        let () = client.del("n").await.unwrap();
        // Increments of 1..=200: every answer differs, in whatever order the server runs them
        // (an increment of 0 answered the same as the one before it).
        let answers = futures_join_all((1..=200i64).map(|i| {
            let client = client.clone();
            async move { client.incr_by::<i64, _>("n", i).await.unwrap() }
        }))
        .await;
        assert_eq!(answers.iter().max().copied(), Some((1..=200).sum::<i64>()));
        let mut sorted = answers.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(
            sorted.len(),
            200,
            "{version:?}: two answers alike: {answers:?}"
        );
        client.quit().await.unwrap();
    }
}

async fn futures_join_all<
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
>(
    futures: impl Iterator<Item = F>,
) -> Vec<T> {
    let tasks: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}

/// Reads from `stream` until `want` bytes came, or 1 s passed with nothing new.
async fn read_some(stream: &mut tokio::net::TcpStream, want: usize) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buffer = [0u8; 4096];
    while got.len() < want {
        match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buffer[..n]),
        }
    }
    got
}

/// A raw client that writes a pipeline one byte at a time (each its own read for the
/// proxy), then an inline command and bytes that are no command: the server answers each as
/// it would directly. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_passes_commands_written_byte_by_byte_and_bytes_that_are_no_commands() {
    let Some((_server, proxy)) = proxied().await else {
        return;
    };
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port()))
        .await
        .unwrap();
    stream.set_nodelay(true).unwrap();
    let pipeline =
        b"*3\r\n$3\r\nSET\r\n$2\r\nk\n\r\n$4\r\n*1\r\n\r\n*2\r\n$3\r\nGET\r\n$2\r\nk\n\r\n";
    for byte in pipeline {
        stream.write_all(&[*byte]).await.unwrap();
        tokio::time::sleep(ms(2)).await;
    }
    let want = b"+OK\r\n$4\r\n*1\r\n\r\n";
    assert_eq!(read_some(&mut stream, want.len()).await, want);
    stream.write_all(b"PING\r\n").await.unwrap();
    assert_eq!(read_some(&mut stream, 7).await, b"+PONG\r\n");
    // An array header that is not a number: the server's protocol error, not a hang.
    stream.write_all(b"*x\r\n").await.unwrap();
    let answer = read_some(&mut stream, 10).await;
    assert!(
        answer.starts_with(b"-ERR Protocol error"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

/// `stall_existing(2)` before a pipeline of five commands written at once: exactly the first
/// two are answered until the stall is released, then the other three, in order;
/// `drop_next` on a pipeline drops the marked command and what follows with the connection,
/// and what came before reaches the server. Held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_stalls_and_drops_single_commands_of_a_pipeline() {
    let Some((server, proxy)) = proxied().await else {
        return;
    };
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port()))
        .await
        .unwrap();
    // Connected (the proxy numbered the connection) before the stall.
    stream.write_all(b"*1\r\n$4\r\nPING\r\n").await.unwrap();
    assert_eq!(read_some(&mut stream, 7).await, b"+PONG\r\n");
    proxy.stall_existing(2);
    let incr = b"*2\r\n$4\r\nINCR\r\n$1\r\nn\r\n";
    stream.write_all(&incr.repeat(5)).await.unwrap();
    let first = read_some(&mut stream, 9).await;
    assert_eq!(first, b":1\r\n:2\r\n", "before the release");
    proxy.release_stall();
    let rest = read_some(&mut stream, 12).await;
    assert_eq!(rest, b":3\r\n:4\r\n:5\r\n", "after the release");

    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port()))
        .await
        .unwrap();
    proxy.drop_next(b"marked".to_vec());
    stream
        .write_all(
            b"*3\r\n$3\r\nSET\r\n$6\r\nbefore\r\n$1\r\n1\r\n\
              *3\r\n$3\r\nSET\r\n$6\r\nmarked\r\n$1\r\n1\r\n\
              *3\r\n$3\r\nSET\r\n$5\r\nafter\r\n$1\r\n1\r\n",
        )
        .await
        .unwrap();
    assert!(proxy.dropped_within(Duration::from_secs(2)).await);
    let answer = read_some(&mut stream, 100).await;
    assert!(answer.len() <= 5, "{}", String::from_utf8_lossy(&answer));
    sleep(ms(200)).await;
    assert_eq!(
        lock_tests::server::get_bulk(server.port(), "before").as_deref(),
        Some("1")
    );
    assert_eq!(lock_tests::server::get_bulk(server.port(), "marked"), None);
    assert_eq!(lock_tests::server::get_bulk(server.port(), "after"), None);
}

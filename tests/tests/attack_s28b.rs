//! Attack s28b: f4953c9 — a fair Redlock waiter's attempt (acquire_fair.lua) reads its key once,
//! the read shared by `line_take_turn` and `line_gate` (and, since 707e259, the gate's questions
//! whether the key exists). Checked against the same script asking the server at each of those
//! decisions instead (rebuilt from today's by undoing exactly those edits) on generated states,
//! with and without fencing, on redis and valkey: same reply, keys, values, ttls and messages,
//! and the same server commands but for at most one GET and two EXISTS fewer. And by hammers of real fair clients (one
//! node and three, fencing on and off): waiting attempts, cancelled ones, single tries, replays
//! of a holder's attempt; no two sections overlap, fences rise, nothing is left.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lock_core::raw::redis::{LINE_SCRIPT, RESERVED, TURN_CHANNEL};
use lock_core::{LockError, LockOptions, Locker};
use lock_redlock::{ConnectionKind, Redlock, RedlockConfig};
use lock_tests::fair::{Store, Target, waiting};
use lock_tests::inc_kit::{ms, next};
use lock_tests::script_diff::{State, alike, invoke, prepare, query};
use lock_tests::server::{RedisServer, published_messages, redis_or_skip, valkey_server_binary};
use redis::Value;
use redis::aio::MultiplexedConnection;
use tokio::time::sleep;

const LEASE_COMMON: &str = include_str!("../../lock-redlock/src/lua/lease_common.lua");
const LINE_PASS: &str = include_str!("../../lock-redlock/src/lua/line_pass.lua");
const ACQUIRE_FAIR: &str = include_str!("../../lock-redlock/src/lua/acquire_fair.lua");

/// `text` with `from` replaced by `to`, which must occur exactly once.
fn undo(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "not once: {from}");
    text.replacen(from, to, 1)
}

/// The fair attempt as lock-redlock's node.rs builds it (`ACQUIRE_FAIR_SOURCE`), or (`before`)
/// with every decision the attempt takes from its one read of the key asking the server
/// instead: `line_take_turn` reads the key itself (as before f4953c9), and the line's gate asks
/// whether the key exists (as before 707e259).
fn acquire_fair(before: bool) -> String {
    if !before {
        return [LEASE_COMMON, LINE_SCRIPT, LINE_PASS, ACQUIRE_FAIR].concat();
    }
    let line = undo(
        LINE_SCRIPT,
        "    if lock == owner and held_by ~= nil then\n",
        "    if false then\n",
    );
    let pass = undo(
        LINE_PASS,
        "local function line_take_turn(lock, member, held_by)\n  if member == '' or held_by ~= RESERVED .. member then",
        "local function line_take_turn(lock, member)\n  if member == '' or redis.pcall('get', lock) ~= RESERVED .. member then",
    );
    [LEASE_COMMON, &line, &pass, ACQUIRE_FAIR].concat()
}

// ---- Differential runs: one generated state, the old script on the copy {a}, the new on {b}

const T1: &str = "0123456789abcdef0123456789abcdef";
const T2: &str = "fedcba9876543210fedcba9876543210";

/// A member of a line: 32 hex digits of an instance, then a waiter id.
fn member(n: u64) -> String {
    format!("{:032x}w{n}", n % 3)
}

/// Runs `script` on the copy `tag` from `state` (see `lock_tests::script_diff`).
async fn run(
    c: &mut MultiplexedConnection,
    messages: &Mutex<Vec<(String, String)>>,
    script: &redis::Script,
    (state, keys, args): (&State, &[&str], &[String]),
    tag: &str,
) -> (String, BTreeMap<String, u64>) {
    let clock = prepare(c, messages, state, tag).await;
    invoke(c, messages, script, (keys, args), tag, clock).await
}

/// A generated state of a fair Redlock key on one node and the attempt's ARGV: the key free,
/// held by the caller's token (a replay) or another, reserved for the caller or another
/// member (or for nobody: the bare prefix), a hash or a zset, a value without a ttl; a fencing
/// counter absent, low, at 2^53 or junk; a line of live, lapsed and index-less entries.
fn generate(seed: &mut u64, fenced: bool) -> (State, Vec<String>) {
    let mut pick = |items: &[&str]| items[(next(seed) % items.len() as u64) as usize].to_owned();
    let token = pick(&[T1, T1, T1, T2]);
    let m: Vec<String> = (0..4).map(member).collect();
    let caller = pick(&["", &m[0], &m[1], &m[2], &m[3]]);
    let other = format!("{RESERVED}{}", pick(&[&m[0], &m[1], &m[2], &m[3]]));
    let mine = format!("SET key{{k}} {RESERVED}{caller} PX 5000");
    let held = format!(
        "|||SET key{{k}} {T1} PX 5000|SET key{{k}} {T2} PX 5000|SET key{{k}} {T2}|{mine}|{mine}|\
         SET key{{k}} {other} PX 5000|HSET key{{k}} f v|ZADD key{{k}} 1 m|SET key{{k}} {T1} PX 150"
    );
    let held = pick(&held.split('|').collect::<Vec<_>>());
    let fence =
        "||SET key{k}:fence 100 PX 9000|SET key{k}:fence 9007199254740990|SET key{k}:fence junk";
    let fence = pick(&fence.split('|').collect::<Vec<_>>());
    let mut state: State = vec![held, if fenced { fence } else { String::new() }];
    state.retain(|command| !command.is_empty());
    let mut latest = 0i64;
    let count = next(seed) % 4;
    for place in 0..count {
        let who = [member(next(seed) % 4), caller.clone()]
            [usize::from(next(seed).is_multiple_of(3))]
        .clone();
        let left = [4_000 + place as i64 * 500, -3_000][usize::from(next(seed).is_multiple_of(4))];
        let score = 1_000_000 + place * 1_000;
        state.push(format!("ZADD key{{k}}:queue {score} {who}"));
        if !next(seed).is_multiple_of(8) {
            state.push(format!("ZADD key{{k}}:queue-expiry @{left} {who}"));
        }
        latest = latest.max(left);
    }
    if count > 0 && latest > 0 {
        state.push(format!("PEXPIRE key{{k}}:queue {}", latest + 100));
        state.push(format!("PEXPIRE key{{k}}:queue-expiry {}", latest + 100));
    }
    let mut pick = |items: &str| {
        let items: Vec<&str> = items.split('|').collect();
        items[(next(seed) % items.len() as u64) as usize].to_owned()
    };
    let ttl = pick("3000|3000|3000|3000|700");
    let place = pick("|||999999|1000000|1001500|5000000");
    let prefix = "turn:{k}:".to_owned();
    (state, vec![token, ttl, caller, prefix, place, pick("1|")])
}

/// Every generated state, on redis and valkey: the same as the attempt that asks the server at
/// every decision, and only GETs and EXISTS saved.
async fn differential(fenced: bool, new_source: &str, trials: u64) -> Vec<String> {
    let mut binaries: Vec<_> = redis_or_skip("attack_s28b").into_iter().collect();
    binaries.extend(valkey_server_binary());
    let keys: Vec<&str> = ("key{k} key{k}:fence key{k}:queue key{k}:queue-expiry".split(' '))
        .filter(|key| fenced || !key.ends_with(":fence"))
        .collect();
    let old = redis::Script::new(&acquire_fair(true));
    let new = redis::Script::new(new_source);
    let mut differ = Vec::new();
    for binary in binaries {
        let name = binary.display();
        let server = RedisServer::start(&binary, &[]).unwrap();
        let mut c = lock_tests::fair::connect(&server.url()).await;
        let messages = published_messages(&server);
        let mut seed = 0x28b0_0001_u64 + u64::from(fenced);
        let (mut saved, mut asked_less) = (0u64, 0u64);
        for trial in 0..trials {
            let (state, args) = generate(&mut seed, fenced);
            let what = (&state, keys.as_slice(), args.as_slice());
            // A trial that differs runs again, three times in all: the copies run apart, and
            // on a busy machine their ttls may drift further apart than `alike` allows; a
            // difference of the scripts stays.
            for tries in 1..=3 {
                let (before, before_calls) = run(&mut c, &messages, &old, what, "{a}").await;
                let (now, now_calls) = run(&mut c, &messages, &new, what, "{b}").await;
                // The same commands, or one GET and up to two EXISTS fewer.
                let mut expected = before_calls.clone();
                let mut fewer = [false; 2];
                for (index, (command, most)) in [("get", 1), ("exists", 2)].into_iter().enumerate()
                {
                    let now = now_calls.get(command).copied().unwrap_or(0);
                    let before = expected.get(command).copied().unwrap_or(0);
                    if now < before && before - now <= most {
                        if now == 0 {
                            expected.remove(command);
                        } else {
                            expected.insert(command.to_owned(), now);
                        }
                        fewer[index] = true;
                    }
                }
                let same = alike(&before, &now) && expected == now_calls;
                if same || tries == 3 {
                    saved += u64::from(fewer[0]);
                    asked_less += u64::from(fewer[1]);
                }
                if same {
                    break;
                }
                if tries == 3 {
                    differ.push(format!(
                        "{name} trial {trial}: state {state:#?}, args {args:?}\nbefore:\n{before}\
                         {before_calls:?}\nnow:\n{now}{now_calls:?}"
                    ));
                }
            }
        }
        eprintln!(
            "{name}: {saved} of {trials} attempts made one GET fewer, {asked_less} fewer EXISTS"
        );
        assert!(saved > trials / 10, "{name}: hardly any GET saved: {saved}");
        assert!(
            asked_less > trials / 10,
            "{name}: hardly any EXISTS saved: {asked_less}"
        );
    }
    differ
}

/// The differential on every generated state finds nothing.
async fn same(fenced: bool) {
    let differ = differential(fenced, &acquire_fair(false), 400).await;
    let n = differ.len();
    assert!(n == 0, "{n} differ; first: {}", differ[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_fair_attempt_does_what_f4953c9_parent_did() {
    same(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_fenced_fair_attempt_does_what_f4953c9_parent_did() {
    same(true).await;
}

/// The differential sees a change: a waiter whose read of the key went unchecked by
/// `line_take_turn` (it takes any reserved key), or read with `redis.call` (a hash at the key
/// makes the script fail), or a gate that takes a key of another type for a free one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_differential_sees_a_changed_script() {
    let any_reservation = "string.sub(tostring(held_by), 1, #RESERVED) ~= RESERVED then";
    for (from, to) in [
        ("held_by ~= RESERVED .. member then", any_reservation),
        ("redis.pcall('get', KEYS[1])", "redis.call('get', KEYS[1])"),
        (
            "      return held_by ~= false\n",
            "      return type(held_by) == 'string'\n",
        ),
    ] {
        let broken = undo(&acquire_fair(false), from, to);
        let differ = differential(false, &broken, 150).await;
        eprintln!("{to}: {} differ", differ.len());
        assert!(!differ.is_empty(), "unseen: {to}");
    }
}

// ---- Hammers: real fair Redlock clients on one key

/// What happened (sections, cancelled attempts, replays) and what went wrong (overlapping
/// sections, fences out of order, errors).
#[derive(Default)]
struct Tally(Mutex<BTreeMap<&'static str, u64>>, Mutex<Vec<String>>);

/// A replay of the holder's attempt (its own token in the key) by the node's fair script, as
/// a waiter (`member`) or a single try, on each node the key holds the token: answers 0 and
/// changes nothing.
async fn replay(urls: &[String], key: &str, token: &str, member: &str, fenced: bool) {
    let script = redis::Script::new(&acquire_fair(false));
    for url in urls {
        let mut c = lock_tests::fair::connect(url).await;
        let mut invocation = script.prepare_invoke();
        invocation.key(key);
        if fenced {
            invocation.key([key.as_bytes(), b"\xff:fence"].concat());
        }
        invocation.key(lock_tests::fair::line_key(key));
        invocation.key([key.as_bytes(), b"\xff:queue-expiry"].concat());
        for arg in [token, "5000", member, TURN_CHANNEL, "", "1"] {
            invocation.arg(arg);
        }
        let before: Option<String> = query(&mut c, &["GET", key]).await;
        if before.as_deref() == Some(token) {
            let answer: Value = invocation.invoke_async(&mut c).await.unwrap();
            let after: Option<String> = query(&mut c, &["GET", key]).await;
            assert_eq!(answer, Value::Int(0), "a replay was answered {answer:?}");
            assert_eq!(after, before, "a replay changed the key");
        }
    }
}

/// Six fair clients (pooled and managed connections) on `key`, 40 rounds each: waiting
/// attempts, some cancelled after 0-4 ms, single tries, and replays of the holder's attempt.
async fn hammer(store: Store, fenced: bool, key: &str) {
    let Some(target) = Target::start(store, "attack_s28b").await else {
        return;
    };
    let urls: Vec<String> = target.servers.iter().map(RedisServer::url).collect();
    let tally = Arc::new(Tally::default());
    let inside = Arc::new(AtomicBool::new(false));
    let last_fence = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for client in 0..6u64 {
        let kind = [ConnectionKind::Pool, ConnectionKind::Manager][client as usize % 2];
        let config = RedlockConfig::new(urls.iter().cloned())
            .with_fair(true)
            .with_fencing(fenced)
            .with_connection(kind)
            .with_node_timeout(ms(500));
        let options = LockOptions::default().with_ttl(ms(2_000));
        let locker = Locker::new(Redlock::new(config).unwrap())
            .with_options(options.with_retry(waiting(ms(20))))
            .unwrap();
        let (tally, inside, last_fence) = (tally.clone(), inside.clone(), last_fence.clone());
        let (key, urls) = (key.to_owned(), urls.clone());
        tasks.push(tokio::spawn(async move {
            let mut seed = 0x5eed_28b0 ^ (client + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let wrong = |what: String| tally.1.lock().unwrap().push(what);
            let count = |what| *tally.0.lock().unwrap().entry(what).or_default() += 1;
            for _ in 0..40 {
                let guard = match next(&mut seed) % 10 {
                    0..=2 => {
                        let wait = Duration::from_micros(next(&mut seed) % 4_000);
                        let Ok(result) = tokio::time::timeout(wait, locker.acquire(&key)).await
                        else {
                            count("cancelled");
                            continue;
                        };
                        result
                    }
                    3..=4 => match locker.try_acquire(&key).await {
                        Ok(None) => continue,
                        other => other.map(Option::unwrap),
                    },
                    _ => locker.acquire(&key).await,
                };
                let guard = match guard {
                    Ok(guard) => guard,
                    Err(LockError::Timeout { .. }) => continue,
                    Err(e) => {
                        wrong(format!("acquire: {e}"));
                        continue;
                    }
                };
                if inside.swap(true, Ordering::SeqCst) {
                    wrong("overlapping sections".to_owned());
                }
                if let Some(fence) = guard.fencing_token() {
                    let last = last_fence.swap(fence, Ordering::SeqCst);
                    if last >= fence {
                        wrong(format!("fence {fence} after {last}"));
                    }
                }
                count("sections");
                if next(&mut seed).is_multiple_of(3) {
                    let who = [member(next(&mut seed) % 4), String::new()];
                    let who = &who[(next(&mut seed) % 2) as usize];
                    replay(&urls, &key, &guard.token().expose(), who, fenced).await;
                    count("replays");
                }
                if next(&mut seed).is_multiple_of(3) {
                    sleep(Duration::from_micros(next(&mut seed) % 2_000)).await;
                }
                if !guard.is_valid() {
                    wrong("a section's lease lapsed".to_owned());
                }
                inside.store(false, Ordering::SeqCst);
                if let Err(e) = guard.release().await {
                    wrong(format!("release: {e}"));
                }
            }
            locker
        }));
    }
    let mut lockers = Vec::new();
    for task in tasks {
        lockers.push(task.await.unwrap());
    }
    drop(lockers);
    let counts = tally.0.lock().unwrap().clone();
    eprintln!("{store:?} fenced {fenced}: {counts:?}");
    let wrong = tally.1.lock().unwrap().clone();
    assert!(wrong.is_empty(), "{store:?} fenced {fenced}: {wrong:?}");
    assert!(counts["sections"] > 50 && counts["replays"] > 0 && counts["cancelled"] > 0);
    let ours = |name: &str| name.contains(key) && !name.ends_with(":fence");
    let left = target.keys_left_within(ms(3_000), ours).await;
    assert!(left.is_empty(), "left: {left:?}");
    // The script the clients ran is the one the differential checked.
    let script = redis::Script::new(&acquire_fair(false));
    let sha = script.get_hash();
    for url in &urls {
        let mut c = lock_tests::fair::connect(url).await;
        let known: Vec<bool> = query(&mut c, &["SCRIPT", "EXISTS", sha]).await;
        assert_eq!(known, [true], "{url}: the clients ran another script");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_one_node_fair_hammer_with_cancellations_tries_and_replays() {
    hammer(Store::Redis, false, "s28b-one").await;
    hammer(Store::Redis, true, "s28b-one-fenced").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_three_nodes_fair_hammer_with_cancellations_tries_and_replays() {
    hammer(Store::Redlock3, false, "s28b-three").await;
    hammer(Store::Redlock3, true, "s28b-three-fenced").await;
}

/// Negative control: the differential, trying a differing trial three times, still finds a
/// change of the line's keys' expiry (a quarter of the lease made a half: hundreds of ms,
/// every time), and a change of the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_the_differential_finds_a_changed_script() {
    let longer = [LEASE_COMMON, LINE_SCRIPT, LINE_PASS, ACQUIRE_FAIR]
        .concat()
        .replace("math.ceil(lease / 4)", "math.ceil(lease / 2)");
    assert!(!differential(false, &longer, 60).await.is_empty());
}

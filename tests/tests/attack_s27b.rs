//! Attack s27b: cc70651's fewer commands per fair hand-off — a release that was the holder's
//! leaves the line without the owner's second GET and hands over without `EXISTS lock` (inc and
//! Redlock), inc's grant draws its fence with the clock `line_give` read, and inc's fair attempt
//! skips the gate's repeated first test. Checked against the scripts of cc70651^ (rebuilt from
//! today's by undoing exactly that commit's edits) on generated states (redis and valkey: same
//! answer, keys, ttls and messages), and by hammers of real clients (inc, inc on a cluster,
//! Redlock on one node and on three: tiny ttls, cancelled waiters, single tries, holders that
//! die, script flushes, killed pub/sub connections), grants' fences across server clock jumps
//! and restarts, and releases that come after the lease lapsed and was taken by another.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use lock_core::raw::redis::{LINE_SCRIPT, RESERVED};
use lock_core::{LockError, RetryPolicy};
use lock_tests::fair::{Store, Target};
use lock_tests::inc_kit::{granted, inc_locker, ms, next};
use lock_tests::server::{RedisServer, published_messages, redis_or_skip};
use redis::Value;
use redis::aio::MultiplexedConnection;
use tokio::time::{Instant, sleep};

// ---------------------------------------------------------------------------------------------
// The scripts, as cc70651 builds them and as cc70651^ did
// ---------------------------------------------------------------------------------------------

const INC_FENCE: &str = include_str!("../../lock-inc/src/lua/fence.lua");
const INC_ACQUIRE: &str = include_str!("../../lock-inc/src/lua/acquire.lua");
const INC_GRANT: &str = include_str!("../../lock-inc/src/lua/line_grant.lua");
const INC_RELEASE_FAIR: &str = include_str!("../../lock-inc/src/lua/release_fair.lua");
const INC_RELEASE_FAIR_PASS: &str = include_str!("../../lock-inc/src/lua/release_fair_pass.lua");
const RL_RELEASE_FAIR: &str = include_str!("../../lock-redlock/src/lua/release_fair.lua");
const RL_RELEASE_FAIR_PASS: &str = include_str!("../../lock-redlock/src/lua/release_fair_pass.lua");
const RL_LINE_PASS: &str = include_str!("../../lock-redlock/src/lua/line_pass.lua");

/// `text` with `from` replaced by `to`, which must occur exactly once.
fn undo(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "not once in the script: {from}"
    );
    text.replacen(from, to, 1)
}

/// line.lua of cc70651^: no `gated`, no `free`.
fn line_before() -> String {
    let line = undo(
        LINE_SCRIPT,
        "if not gated and (member == '' or not held())",
        "if (member == '' or not held())",
    );
    undo(
        &line,
        "if free or redis.call('exists', lock) == 0 then",
        "if redis.call('exists', lock) == 0 then",
    )
}

fn inc_acquire_fair(before: bool) -> String {
    let (line, grant, gate) = if before {
        (
            line_before(),
            undo(
                INC_GRANT,
                "fence_next(stored, now_us)",
                "fence_next(stored)",
            ),
            "local gate, expiry = line_gate(KEYS[1], KEYS[2], ARGV[1], ARGV[3], tonumber(ARGV[2]), ARGV[4])\n",
        )
    } else {
        (
            LINE_SCRIPT.to_owned(),
            INC_GRANT.to_owned(),
            "local gate, expiry = line_gate(KEYS[1], KEYS[2], ARGV[1], ARGV[3], tonumber(ARGV[2]), ARGV[4], nil, true)\n",
        )
    };
    [
        INC_FENCE,
        "if not (redis.call('exists', KEYS[#KEYS]) == 0 and (ARGV[3] == '' or redis.call('exists', KEYS[1]) == 0)) then\n",
        &line,
        &grant,
        "local taken = line_take_grant(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[3], ARGV[2])\n",
        "if taken then\n  return taken\nend\n",
        gate,
        "if gate then\n  if expiry then\n    return {gate, expiry}\n  end\n  return gate\nend\n",
        "end\n",
        INC_ACQUIRE,
    ]
    .concat()
}

fn inc_release_fair(before: bool) -> String {
    if before {
        [
            INC_RELEASE_FAIR,
            &line_before(),
            INC_FENCE,
            &undo(
                INC_GRANT,
                "fence_next(stored, now_us)",
                "fence_next(stored)",
            ),
            "line_give_back(KEYS[2], ARGV[2], KEYS[1], KEYS[2])\n",
            "line_grant(KEYS[1], KEYS[2], KEYS[3], ARGV[3])\n",
            "return released\n",
        ]
        .concat()
    } else {
        [
            INC_RELEASE_FAIR,
            LINE_SCRIPT,
            INC_FENCE,
            INC_GRANT,
            INC_RELEASE_FAIR_PASS,
        ]
        .concat()
    }
}

fn redlock_release_fair(before: bool) -> String {
    if before {
        [
            RL_RELEASE_FAIR,
            &line_before(),
            &undo(RL_LINE_PASS, "  end, free)\n", "  end)\n"),
            "line_pass_from(KEYS[1], ARGV[2], ARGV[3])\n",
            "return deleted\n",
        ]
        .concat()
    } else {
        [
            RL_RELEASE_FAIR,
            LINE_SCRIPT,
            RL_LINE_PASS,
            RL_RELEASE_FAIR_PASS,
        ]
        .concat()
    }
}

// ---------------------------------------------------------------------------------------------
// Differential runs: one generated state, the old script on one copy, the new on another
// ---------------------------------------------------------------------------------------------

const SENTINEL: &str = "zz-sentinel";

async fn connect(server: &RedisServer) -> MultiplexedConnection {
    lock_tests::fair::connect(&server.url()).await
}

async fn now(c: &mut MultiplexedConnection) -> (u64, u64) {
    let t: Vec<u64> = redis::cmd("TIME").query_async(c).await.unwrap();
    (t[0] * 1_000 + t[1] / 1_000, t[0] * 1_000_000 + t[1])
}

/// A member of a line: 32 hex digits of an instance, then a waiter id.
fn member(n: u64) -> String {
    format!("{:032x}w{n}", n % 3)
}

/// What one run shows: the reply, every key of the copy (type, value, rough ttl), the messages
/// published on the copy's channels. Clock readings (µs and ms of this run) become `U` and `M`.
#[derive(Debug)]
#[allow(dead_code)] // read through `Debug` (see `alike`)
struct Seen {
    reply: String,
    keys: BTreeMap<String, String>,
    published: Vec<String>,
}

/// Text and numbers of `text`, in order.
fn tokens(text: &str) -> Vec<Result<u64, String>> {
    let mut out = Vec::new();
    let mut digits = String::new();
    let mut other = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            if !other.is_empty() {
                out.push(Err(std::mem::take(&mut other)));
            }
            digits.push(c);
        } else {
            if !digits.is_empty() {
                out.push(
                    digits
                        .parse::<u64>()
                        .map_err(|_| std::mem::take(&mut digits).clone()),
                );
                digits.clear();
            }
            other.push(c);
        }
    }
    if !digits.is_empty() {
        out.push(digits.parse::<u64>().map_err(|_| digits.clone()));
    }
    if !other.is_empty() {
        out.push(Err(other));
    }
    out
}

/// Two runs alike: the same text, numbers equal but for durations in ms (100 to 10^6, ttls and
/// the gate's -(1 + ms)), which may differ by 50 ms (the copies run a few ms apart).
fn alike(old: &Seen, new: &Seen) -> bool {
    let (a, b) = (tokens(&format!("{old:?}")), tokens(&format!("{new:?}")));
    a.len() == b.len()
        && a.iter().zip(&b).all(|pair| match pair {
            (Ok(x), Ok(y)) => {
                x == y
                    || ((100..1_000_000).contains(x)
                        && (100..1_000_000).contains(y)
                        && x.abs_diff(*y) <= 50)
            }
            (x, y) => x == y,
        })
}

/// Replaces every run of digits that is a clock reading of this run (µs within 100 s of
/// `us`, ms within 100 s of `ms`) by `U` or `M`; other numbers are kept.
fn normalize(text: &str, (ms_now, us_now): (u64, u64)) -> String {
    let mut out = String::new();
    let mut digits = String::new();
    let flush = |digits: &mut String, out: &mut String| {
        if digits.is_empty() {
            return;
        }
        let value: Option<u64> = digits.parse().ok();
        match value {
            Some(v) if v.abs_diff(us_now) < 100_000_000 => out.push('U'),
            Some(v) if v.abs_diff(ms_now) < 100_000 => out.push('M'),
            _ => out.push_str(digits),
        }
        digits.clear();
    };
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
        } else {
            flush(&mut digits, &mut out);
            out.push(c);
        }
    }
    flush(&mut digits, &mut out);
    out
}

fn show(value: &Value) -> String {
    match value {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::Int(i) => i.to_string(),
        Value::Nil => "nil".to_owned(),
        Value::Okay => "OK".to_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Array(items) => {
            format!("[{}]", items.iter().map(show).collect::<Vec<_>>().join(","))
        }
        other => format!("{other:?}"),
    }
}

/// Every key whose name contains `tag`, with `tag` written `{k}` in names and values.
async fn snapshot(c: &mut MultiplexedConnection, tag: &str) -> BTreeMap<String, String> {
    let names: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg(format!("*{tag}*"))
        .query_async(c)
        .await
        .unwrap();
    let mut keys = BTreeMap::new();
    for name in names {
        let kind: String = redis::cmd("TYPE").arg(&name).query_async(c).await.unwrap();
        let value: Value = match kind.as_str() {
            "string" => redis::cmd("GET").arg(&name).query_async(c).await.unwrap(),
            "zset" => redis::cmd("ZRANGE")
                .arg(&name)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query_async(c)
                .await
                .unwrap(),
            _ => Value::Nil,
        };
        let pttl: i64 = redis::cmd("PTTL").arg(&name).query_async(c).await.unwrap();
        // A fencing counter's ttl (years for a counter far above the clock) is compared by
        // kind only; others within 50 ms (see `alike`).
        let ttl = if pttl > 100_000_000 {
            "long".to_owned()
        } else {
            pttl.to_string()
        };
        keys.insert(
            String::from_utf8_lossy(&name).replace(tag, "{k}"),
            format!("{kind} {} ttl {ttl}", show(&value).replace(tag, "{k}")),
        );
    }
    keys
}

/// The state a trial starts from, written for the copy `tag`.
struct State {
    /// Commands, with `{k}` standing for the copy's tag and `@` for the server's ms clock.
    commands: Vec<Vec<String>>,
}

impl State {
    async fn write(&self, c: &mut MultiplexedConnection, tag: &str, ms_now: u64) {
        for command in &self.commands {
            let mut cmd = redis::cmd(&command[0]);
            for arg in &command[1..] {
                let arg = arg.replace("{k}", tag);
                let arg = if let Some(offset) = arg.strip_prefix('@') {
                    let offset: i64 = offset.parse().unwrap();
                    (ms_now as i64 + offset).to_string()
                } else {
                    arg
                };
                cmd.arg(arg);
            }
            let _: Value = cmd.query_async(c).await.unwrap();
        }
    }
}

fn pick<'a, T>(seed: &mut u64, items: &'a [T]) -> &'a T {
    &items[(next(seed) % items.len() as u64) as usize]
}

/// A line of up to three of four waiters (arrival order random), entries live or lapsed, an
/// entry's expiry sometimes gone; `line` and `expiry` are the two keys' names.
fn generate_line(seed: &mut u64, line: &str, expiry: &str, commands: &mut Vec<Vec<String>>) {
    let count = next(seed) % 4;
    let mut latest = 0i64;
    for place in 0..count {
        let who = member(next(seed) % 4);
        let lapsed = next(seed).is_multiple_of(4);
        let left: i64 = if lapsed {
            -3_000
        } else {
            4_000 + place as i64 * 500
        };
        commands.push(vec![
            "ZADD".into(),
            line.into(),
            (1_000_000 + place * 1_000).to_string(),
            who.clone(),
        ]);
        if !next(seed).is_multiple_of(8) {
            commands.push(vec!["ZADD".into(), expiry.into(), format!("@{left}"), who]);
        }
        latest = latest.max(left);
    }
    if count > 0 && latest > 0 {
        for key in [line, expiry] {
            commands.push(vec![
                "PEXPIRE".into(),
                key.into(),
                (latest + 100).to_string(),
            ]);
        }
    }
}

/// Runs `script` on both copies (old on `{a}`, new on `{b}`) from the same state; what each
/// showed.
#[allow(clippy::too_many_arguments)]
async fn both(
    c: &mut MultiplexedConnection,
    messages: &Arc<std::sync::Mutex<Vec<(String, String)>>>,
    old: &redis::Script,
    new: &redis::Script,
    state: &State,
    keys: &[&str],
    args: &[String],
) -> (Seen, Seen) {
    let mut seen = Vec::new();
    for (tag, script) in [("{a}", old), ("{b}", new)] {
        let _: () = redis::cmd("FLUSHALL").query_async(c).await.unwrap();
        messages.lock().unwrap().clear();
        let clock = now(c).await;
        state.write(c, tag, clock.0).await;
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key.replace("{k}", tag).into_bytes());
        }
        for arg in args {
            invocation.arg(arg.replace("{k}", tag));
        }
        let reply: redis::RedisResult<Value> = invocation.invoke_async(c).await;
        let reply = match reply {
            Ok(v) => show(&v),
            Err(e) => format!("error {e}"),
        };
        let keys = snapshot(c, tag).await;
        // A sentinel after the script: the subscriber gets messages in order, so every one the
        // script published is in once the sentinel is.
        let _: i64 = redis::cmd("PUBLISH")
            .arg(SENTINEL)
            .arg("end")
            .query_async(c)
            .await
            .unwrap();
        let deadline = Instant::now() + ms(2_000);
        while !messages
            .lock()
            .unwrap()
            .iter()
            .any(|(ch, _)| ch == SENTINEL)
        {
            assert!(Instant::now() < deadline, "the sentinel never came");
            sleep(Duration::from_micros(200)).await;
        }
        messages.lock().unwrap().retain(|(ch, _)| ch != SENTINEL);
        let published: Vec<String> = messages
            .lock()
            .unwrap()
            .iter()
            .map(|(channel, message)| format!("{} {}", channel.replace(tag, "{k}"), message))
            .collect();
        let mut keys_n = BTreeMap::new();
        for (k, v) in keys {
            keys_n.insert(k, normalize(&v, clock));
        }
        seen.push(Seen {
            reply: normalize(&reply, clock),
            keys: keys_n,
            published: published.iter().map(|m| normalize(m, clock)).collect(),
        });
    }
    let new = seen.pop().unwrap();
    let old = seen.pop().unwrap();
    (old, new)
}

/// Generated states per script and server.
const TRIALS: u64 = 500;

/// redis-server, and valkey-server when it is installed.
fn servers_to_try() -> Vec<std::path::PathBuf> {
    let mut binaries: Vec<std::path::PathBuf> = redis_or_skip("attack_s27b").into_iter().collect();
    binaries.extend(lock_tests::server::valkey_server_binary());
    binaries
}

const T1: &str = "0123456789abcdef0123456789abcdef";
const T2: &str = "fedcba9876543210fedcba9876543210";

fn reserved(n: u64) -> String {
    format!("{RESERVED}{}", member(n))
}

/// inc's five keys of the copy `{k}`.
const INC_KEYS: [&str; 5] = [
    "lock:{k}",
    "lock:{k}:owner",
    "lock:{k}:fence",
    "lock:{k}:queue",
    "lock:{k}:queue-expiry",
];

/// A generated state of an inc fair mutex (some of them no state a client leaves: a counter
/// without an owner, a semaphore's set, fencing counters that cannot draw).
fn inc_state(seed: &mut u64) -> State {
    let mut commands: Vec<Vec<String>> = Vec::new();
    let v = |items: &[&str]| {
        items
            .iter()
            .map(|s| (*s).to_owned())
            .collect::<Vec<String>>()
    };
    match next(seed) % 8 {
        0..=2 => {}
        3..=6 => commands.push(v(&["SET", "lock:{k}", "1", "PX", "5000"])),
        _ => commands.push(v(&["ZADD", "lock:{k}", "@5000", "pX"])),
    }
    let owner = match next(seed) % 9 {
        0..=1 => None,
        2..=3 => Some(T1.to_owned()),
        4 => Some(T2.to_owned()),
        5..=7 => Some(reserved(next(seed) % 4)),
        _ => Some("#p:3".to_owned()),
    };
    if let Some(owner) = owner {
        commands.push(vec![
            "SET".into(),
            "lock:{k}:owner".into(),
            owner,
            "PX".into(),
            "5000".into(),
        ]);
    }
    let fence = *pick(
        seed,
        &[
            None,
            Some("100"),
            Some("100"),
            Some("9000000000000000"),
            Some("9007199254740990"),
            Some("junk"),
        ],
    );
    if let Some(fence) = fence {
        commands.push(v(&["SET", "lock:{k}:fence", fence, "PX", "9000"]));
    }
    generate_line(
        seed,
        "lock:{k}:queue",
        "lock:{k}:queue-expiry",
        &mut commands,
    );
    State { commands }
}

fn token_arg(seed: &mut u64) -> String {
    match next(seed) % 4 {
        0 => T1.to_owned(),
        1 => T2.to_owned(),
        _ => reserved(next(seed) % 4),
    }
}

fn member_arg(seed: &mut u64) -> String {
    match next(seed) % 5 {
        0 => String::new(),
        n => member(n - 1),
    }
}

fn differences(
    kind: &str,
    trial: u64,
    state: &State,
    args: &[String],
    old: &Seen,
    new: &Seen,
) -> String {
    format!(
        "{kind} trial {trial}: state {:?}, args {args:?}\nbefore: {old:#?}\nnow: {new:#?}",
        state.commands
    )
}

/// Runs the scripts before (`old`) and after (`new`) on `TRIALS` states and arguments that
/// `generate` draws from the seed, on every server to try; fails listing the trials whose runs
/// were not alike.
async fn differential(
    kind: &str,
    (old, new): (String, String),
    keys: &[&str],
    mut seed: u64,
    mut generate: impl FnMut(&mut u64) -> (State, Vec<String>),
) {
    let (old, new) = (redis::Script::new(&old), redis::Script::new(&new));
    for binary in servers_to_try() {
        let server = RedisServer::start(&binary, &[]).unwrap();
        let mut c = connect(&server).await;
        let messages = published_messages(&server);
        let mut differ = Vec::new();
        for trial in 0..TRIALS {
            let (state, args) = generate(&mut seed);
            // A trial that differs runs again, three times in all: the copies run apart, and on
            // a busy machine their ttls may drift further apart than `alike` allows (61 ms in
            // one run); a difference of the scripts stays.
            for tries in 1..=3 {
                let (before, now) = both(&mut c, &messages, &old, &new, &state, keys, &args).await;
                if alike(&before, &now) {
                    break;
                }
                if tries == 3 {
                    differ.push(differences(kind, trial, &state, &args, &before, &now));
                }
            }
        }
        assert!(
            differ.is_empty(),
            "{}: {} differ; first: {}",
            binary.display(),
            differ.len(),
            differ[0]
        );
    }
}

/// inc's fair release (ARGV: token, waiter, channel prefix, [wake channel]) does on every
/// generated state what cc70651^'s did: same answer, same keys, values and ttls (clock readings
/// aside), same messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_fair_release_does_what_the_scripts_before_did() {
    let scripts = (inc_release_fair(true), inc_release_fair(false));
    differential("inc release", scripts, &INC_KEYS, 0x27b0_0001, |seed| {
        let state = inc_state(seed);
        let mut args = vec![token_arg(seed), member_arg(seed), "turn:{k}:".to_owned()];
        if next(seed).is_multiple_of(3) {
            args.push("wake:{k}".to_owned());
        }
        (state, args)
    })
    .await;
}

/// inc's fair attempt (ARGV: token, ttl, waiter, channel prefix) does on every generated state
/// what cc70651^'s did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_fair_attempt_does_what_the_scripts_before_did() {
    let scripts = (inc_acquire_fair(true), inc_acquire_fair(false));
    differential("inc attempt", scripts, &INC_KEYS, 0x27b0_0002, |seed| {
        let state = inc_state(seed);
        let token = match next(seed) % 3 {
            0 => "aaaabbbbccccddddaaaabbbbccccdddd".to_owned(),
            _ => token_arg(seed),
        };
        let args = vec![
            token,
            "3000".to_owned(),
            member_arg(seed),
            "turn:{k}:".to_owned(),
        ];
        (state, args)
    })
    .await;
}

/// Redlock's fair release on one node (KEYS: key, line, line expiry; ARGV: token, waiter,
/// channel prefix, [wake prefix]) does on every generated state what cc70651^'s did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_fair_release_does_what_the_scripts_before_did() {
    let scripts = (redlock_release_fair(true), redlock_release_fair(false));
    let keys = ["key{k}", "key{k}:queue", "key{k}:queue-expiry"];
    differential("redlock release", scripts, &keys, 0x27b0_0003, |seed| {
        let mut commands: Vec<Vec<String>> = Vec::new();
        let value = match next(seed) % 9 {
            0..=1 => None,
            2..=3 => Some(T1.to_owned()),
            4 => Some(T2.to_owned()),
            5..=7 => Some(reserved(next(seed) % 4)),
            _ => {
                commands.push(vec!["HSET".into(), "key{k}".into(), "f".into(), "v".into()]);
                None
            }
        };
        if let Some(value) = value {
            commands.push(vec![
                "SET".into(),
                "key{k}".into(),
                value,
                "PX".into(),
                "5000".into(),
            ]);
        }
        generate_line(seed, "key{k}:queue", "key{k}:queue-expiry", &mut commands);
        let state = State { commands };
        let mut args = vec![token_arg(seed), member_arg(seed), "turn:{k}:".to_owned()];
        if next(seed).is_multiple_of(3) {
            args.push("wake:{k}:".to_owned());
        }
        (state, args)
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Hammers: real clients on one key
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Tally {
    sections: AtomicU64,
    overlaps: AtomicU64,
    fence_out_of_order: AtomicU64,
    grants: AtomicU64,
    /// Every fence handed out (tiny ttls: leases lapse inside sections, so only uniqueness is
    /// checked there).
    fences: std::sync::Mutex<Vec<u64>>,
    /// Leases may lapse inside a section: overlaps and order are not checked.
    tiny: AtomicBool,
    cancelled: AtomicU64,
    died: AtomicU64,
    errors: AtomicU64,
}

/// `clients` fair clients (backends of their own) on `key`, `rounds` each: waiting attempts
/// (some cancelled after 0-3 ms), single tries, holders that die holding (the lock lapses after
/// `ttl`). With `chaos`, scripts are flushed and pub/sub connections killed meanwhile. Sections
/// must never overlap, fences must rise in the order the sections begin, and nothing but the
/// fencing counter is left once all stop.
async fn hammer(
    target: &Target,
    key: &str,
    clients: usize,
    rounds: usize,
    ttl: Duration,
    chaos: bool,
) -> Arc<Tally> {
    let tally = Arc::new(Tally::default());
    tally.tiny.store(ttl < ms(100), Ordering::SeqCst);
    let inside = Arc::new(AtomicBool::new(false));
    let last_fence = Arc::new(std::sync::Mutex::new(0u64));
    let stop = Arc::new(AtomicBool::new(false));
    let chaos_task = chaos.then(|| {
        let urls: Vec<String> = target.servers.iter().map(RedisServer::url).collect();
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut connections = Vec::new();
            for url in &urls {
                connections.push(lock_tests::fair::connect(url).await);
            }
            let mut turn = 0u64;
            while !stop.load(Ordering::SeqCst) {
                for c in &mut connections {
                    let _: redis::RedisResult<Value> =
                        redis::cmd("SCRIPT").arg("FLUSH").query_async(c).await;
                    if turn.is_multiple_of(3) {
                        let _: redis::RedisResult<Value> = redis::cmd("CLIENT")
                            .arg("KILL")
                            .arg("TYPE")
                            .arg("pubsub")
                            .query_async(c)
                            .await;
                    }
                }
                turn += 1;
                sleep(ms(15)).await;
            }
        })
    });
    let mut tasks = Vec::new();
    for client in 0..clients {
        let locker = target
            .locker(true, ttl, lock_tests::fair::waiting(ms(20)))
            .await;
        let (tally, inside, last_fence) = (
            Arc::clone(&tally),
            Arc::clone(&inside),
            Arc::clone(&last_fence),
        );
        let key = key.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut seed = 0x5eed_27b0 ^ (client as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            for _ in 0..rounds {
                let action = next(&mut seed) % 10;
                let guard = match action {
                    0..=1 => {
                        let wait = Duration::from_micros(next(&mut seed) % 3_000);
                        match tokio::time::timeout(wait, locker.acquire(&key)).await {
                            Err(_) => {
                                tally.cancelled.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            Ok(result) => result,
                        }
                    }
                    2 => match locker.try_acquire(&key).await {
                        Ok(Some(guard)) => Ok(guard),
                        Ok(None) => continue,
                        Err(e) => Err(e),
                    },
                    _ => locker.acquire(&key).await,
                };
                let guard = match guard {
                    Ok(guard) => guard,
                    Err(LockError::Timeout { .. }) => continue,
                    Err(e) => {
                        // A killed pub/sub connection or a flushed script costs a retry, not
                        // an error; anything else is counted.
                        eprintln!("acquire: {e}");
                        tally.errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                if let Some(fence) = guard.fencing_token() {
                    tally.fences.lock().unwrap().push(fence);
                }
                if inside.swap(true, Ordering::SeqCst) {
                    tally.overlaps.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(fence) = guard.fencing_token() {
                    let mut last = last_fence.lock().unwrap();
                    if fence <= *last {
                        tally.fence_out_of_order.fetch_add(1, Ordering::Relaxed);
                    }
                    *last = fence;
                }
                if granted(&guard) {
                    tally.grants.fetch_add(1, Ordering::Relaxed);
                }
                tally.sections.fetch_add(1, Ordering::Relaxed);
                if next(&mut seed).is_multiple_of(4) {
                    sleep(Duration::from_micros(next(&mut seed) % 2_000)).await;
                }
                if next(&mut seed).is_multiple_of(25) {
                    // Dies holding: the lock lapses after its ttl.
                    tally.died.fetch_add(1, Ordering::Relaxed);
                    // Out of the section first: the next holder comes only once the lease lapsed.
                    inside.store(false, Ordering::SeqCst);
                    std::mem::forget(guard);
                    continue;
                }
                inside.store(false, Ordering::SeqCst);
                if let Err(e) = guard.release().await {
                    eprintln!("release: {e}");
                }
            }
            locker
        }));
    }
    let mut lockers = Vec::new();
    for task in tasks {
        lockers.push(task.await.unwrap());
    }
    stop.store(true, Ordering::SeqCst);
    if let Some(task) = chaos_task {
        task.await.unwrap();
    }
    drop(lockers);
    tally
}

/// What of `key` is left on the target, the fencing counter aside, once `within` has passed
/// (or sooner when nothing is).
async fn left_of(target: &Target, key: &str, within: Duration) -> Vec<String> {
    target
        .keys_left_within(within, |name| {
            name.contains(key) && !name.ends_with(":fence")
        })
        .await
}

fn check(tally: &Tally, what: &str) {
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    eprintln!(
        "{what}: sections {}, grants {}, cancelled {}, died {}, errors {}",
        get(&tally.sections),
        get(&tally.grants),
        get(&tally.cancelled),
        get(&tally.died),
        get(&tally.errors)
    );
    assert_eq!(get(&tally.overlaps), 0, "{what}: overlapping sections");
    assert_eq!(
        get(&tally.fence_out_of_order),
        0,
        "{what}: fences out of order"
    );
    assert!(get(&tally.sections) > 0, "{what}: no section");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_fair_hammer_with_dying_holders_cancelled_waiters_and_single_tries() {
    let Some(target) = Target::start(Store::Inc, "attack_s27b").await else {
        return;
    };
    let tally = hammer(&target, "hammer-inc", 8, 60, ms(250), false).await;
    check(&tally, "inc");
    assert!(
        tally.grants.load(Ordering::Relaxed) > 0,
        "no grant held as it is"
    );
    let left = left_of(&target, "hammer-inc", ms(3_000)).await;
    assert!(left.is_empty(), "left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_fair_hammer_under_script_flushes_and_killed_subscriptions() {
    let Some(target) = Target::start(Store::Inc, "attack_s27b").await else {
        return;
    };
    let tally = hammer(&target, "hammer-inc-chaos", 6, 50, ms(250), true).await;
    check(&tally, "inc chaos");
    let left = left_of(&target, "hammer-inc-chaos", ms(3_000)).await;
    assert!(left.is_empty(), "left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_cluster_fair_hammer_with_chaos() {
    let Some(target) = Target::start(Store::IncCluster, "attack_s27b").await else {
        return;
    };
    let tally = hammer(&target, "hammer-cluster", 6, 40, ms(250), true).await;
    check(&tally, "inc cluster");
    let left = left_of(&target, "hammer-cluster", ms(3_000)).await;
    assert!(left.is_empty(), "left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_one_node_fair_hammer_with_chaos() {
    let Some(target) = Target::start(Store::Redis, "attack_s27b").await else {
        return;
    };
    let tally = hammer(&target, "hammer-redlock", 6, 50, ms(250), true).await;
    check(&tally, "redlock one node");
    let left = left_of(&target, "hammer-redlock", ms(3_000)).await;
    assert!(left.is_empty(), "left: {left:?}");
}

// ---------------------------------------------------------------------------------------------
// Fences of grants (drawn with the clock line_give read) across clock jumps and restarts
// ---------------------------------------------------------------------------------------------

/// What happens to the server while a holder holds and a waiter waits.
#[derive(Clone, Copy, Debug)]
enum Upset {
    Nothing,
    /// The server's wall clock is set to real time plus (or minus) this many ms.
    Clock(i64),
    /// Saved (`SAVE`), killed and started again on its snapshot.
    RestartKeepingData,
    /// Everything gone (a restart without persistence, the clock unchanged and never behind a
    /// token already drawn: the fence's documented floor).
    DataLost,
}

/// A holder and a fair waiter on one inc key, round after round, with the server's clock
/// jumping forwards and back and the server restarting with and without its data between the
/// holder's acquisition and its release (which grants the lock to the waiter, its fence drawn
/// with the clock the hand-over read). Every fence, the holders' and the waiters' in the order
/// they held, rises.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_grant_fences_rise_across_clock_jumps_and_restarts() {
    let Some(binary) = redis_or_skip("attack_s27b") else {
        return;
    };
    let shim = lock_tests::clock::WallJump::build().unwrap();
    let mut server = shim.start_server(&binary).unwrap();
    let url = server.url();
    let key = "grant-clock";
    let ttl = ms(1_000);
    let holder = inc_locker(&url, true, ttl, lock_tests::fair::waiting(ms(20))).await;
    let waiter = Arc::new(inc_locker(&url, true, ttl, lock_tests::fair::waiting(ms(20))).await);
    let upsets = [
        Upset::Nothing,
        Upset::Clock(300),
        Upset::Clock(-3_600_000),
        Upset::Nothing,
        Upset::Clock(-7_200_000),
        Upset::RestartKeepingData,
        Upset::Clock(0),
        Upset::Clock(3_600_000),
        Upset::Nothing,
        Upset::DataLost,
        Upset::Clock(3_600_500),
        Upset::RestartKeepingData,
    ];
    let mut fences = Vec::new();
    let mut grants = 0;
    for (round, upset) in upsets.iter().enumerate() {
        let held = holder.acquire(key).await.unwrap();
        fences.push((round, "holder", held.fencing_token().unwrap()));
        let waiting = {
            let waiter = Arc::clone(&waiter);
            tokio::spawn(async move { waiter.acquire(key).await })
        };
        let mut c = lock_tests::fair::connect(&url).await;
        lock_tests::inc_kit::until_in_line(&mut c, key, 1).await;
        match *upset {
            Upset::Nothing => {}
            Upset::Clock(offset) => shim.jump(ms(offset.unsigned_abs()), offset < 0).unwrap(),
            Upset::RestartKeepingData => {
                let _: () = redis::cmd("SAVE").query_async(&mut c).await.unwrap();
                server.restart().unwrap();
            }
            Upset::DataLost => {
                let _: () = redis::cmd("FLUSHALL").query_async(&mut c).await.unwrap();
            }
        }
        let _ = held.release().await;
        let got = tokio::time::timeout(ms(5_000), waiting)
            .await
            .expect("the waiter never got the lock")
            .unwrap()
            .unwrap();
        if granted(&got) {
            grants += 1;
        }
        fences.push((round, "waiter", got.fencing_token().unwrap()));
        let _ = got.release().await;
    }
    eprintln!("grants {grants}, fences {fences:?}");
    assert!(grants > 0, "no hand-over was a grant");
    for pair in fences.windows(2) {
        assert!(
            pair[1].2 > pair[0].2,
            "fence fell: {:?} then {:?} (all: {fences:?})",
            pair[0],
            pair[1]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A release whose lease lapsed and was taken by another (`released == 0` / `deleted == 0`)
// ---------------------------------------------------------------------------------------------

/// A holds `key` with a short ttl and lets it lapse while W waits; W gets the lock; A's late
/// release (not the holder's any more: the compare-and-delete deletes nothing) must leave W's
/// lock and the line alone, and W's own release then hands the lock to X, behind it.
async fn late_release_leaves_the_next_holder_alone(store: Store, key: &str) {
    let Some(target) = Target::start(store, "attack_s27b").await else {
        return;
    };
    let short = target.locker(true, ms(150), RetryPolicy::none()).await;
    let w_locker = Arc::new(
        target
            .locker(true, ms(5_000), lock_tests::fair::waiting(ms(10)))
            .await,
    );
    let x_locker = Arc::new(
        target
            .locker(true, ms(5_000), lock_tests::fair::waiting(ms(10)))
            .await,
    );
    for round in 0..5 {
        let a = short.acquire(key).await.unwrap();
        let w = {
            let locker = Arc::clone(&w_locker);
            let key = key.to_owned();
            tokio::spawn(async move { locker.acquire(&key).await })
        };
        let w = tokio::time::timeout(ms(3_000), w)
            .await
            .expect("W never got the lapsed lock")
            .unwrap()
            .unwrap();
        let x = {
            let locker = Arc::clone(&x_locker);
            let key = key.to_owned();
            tokio::spawn(async move { locker.acquire(&key).await })
        };
        sleep(ms(30)).await;
        // A's release comes late: its lease lapsed and W holds.
        let late = a.release().await;
        assert!(
            late.is_err(),
            "round {round}: a lapsed lease's release reported success"
        );
        assert!(
            !x.is_finished(),
            "round {round}: X got the lock while W held it"
        );
        sleep(ms(50)).await;
        assert!(
            !x.is_finished(),
            "round {round}: X got the lock while W held it"
        );
        assert!(w.is_valid());
        let w_fence = w.fencing_token();
        w.release().await.unwrap();
        let x = tokio::time::timeout(ms(3_000), x)
            .await
            .expect("X never got the lock")
            .unwrap()
            .unwrap();
        if let (Some(before), Some(after)) = (w_fence, x.fencing_token()) {
            assert!(after > before, "round {round}: {after} after {before}");
        }
        x.release().await.unwrap();
    }
    let left = left_of(&target, key, ms(2_000)).await;
    assert!(left.is_empty(), "left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_a_late_release_leaves_the_next_holder_alone() {
    late_release_leaves_the_next_holder_alone(Store::Inc, "late-inc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_a_late_release_leaves_the_next_holder_alone() {
    late_release_leaves_the_next_holder_alone(Store::Redis, "late-redlock").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_three_nodes_fair_hammer() {
    let Some(target) = Target::start(Store::Redlock3, "attack_s27b").await else {
        return;
    };
    let tally = hammer(&target, "hammer-redlock3", 5, 40, ms(300), false).await;
    check(&tally, "redlock three nodes");
    let left = left_of(&target, "hammer-redlock3", ms(3_000)).await;
    assert!(left.is_empty(), "left: {left:?}");
}

/// Tiny ttls (30 ms: leases lapse inside sections, grants lapse before their waiter sees them):
/// no fence is handed out twice, and nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_ttl_hammers_hand_out_no_fence_twice_and_leave_nothing() {
    for store in [Store::Inc, Store::Redis] {
        let Some(target) = Target::start(store, "attack_s27b").await else {
            return;
        };
        let tally = hammer(&target, "hammer-tiny", 6, 60, ms(30), false).await;
        check(&tally, &format!("{store:?} tiny"));
        let left = left_of(&target, "hammer-tiny", ms(2_000)).await;
        assert!(left.is_empty(), "{store:?}: left: {left:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// The commands saved
// ---------------------------------------------------------------------------------------------

/// Calls per command name since the last `CONFIG RESETSTAT` (scripts' own calls included).
async fn command_calls(c: &mut MultiplexedConnection) -> BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(c)
        .await
        .unwrap();
    info.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("cmdstat_")?;
            let (name, stats) = rest.split_once(':')?;
            let calls = stats
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// The server commands `script` makes from `state` (the script's own and its EVAL), per name.
async fn commands_of(
    c: &mut MultiplexedConnection,
    script: &redis::Script,
    state: &State,
    keys: &[&str],
    args: &[&str],
) -> BTreeMap<String, u64> {
    let _: () = redis::cmd("FLUSHALL").query_async(c).await.unwrap();
    let clock = now(c).await;
    state.write(c, "{a}", clock.0).await;
    let _: () = script
        .prepare_invoke()
        .load_async(c)
        .await
        .map(|_: String| ())
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(c)
        .await
        .unwrap();
    let mut invocation = script.prepare_invoke();
    for key in keys {
        invocation.key(key.replace("{k}", "{a}"));
    }
    for arg in args {
        invocation.arg(*arg);
    }
    let _: Value = invocation.invoke_async(c).await.unwrap();
    let mut calls = command_calls(c).await;
    calls.remove("info");
    calls.remove("config|resetstat");
    calls
}

fn total(calls: &BTreeMap<String, u64>) -> u64 {
    calls.values().sum()
}

/// What the commit claims it saves, counted by the server: a holder's release with a waiter in
/// line skips the owner's GET (when a waiter leaves with it), the lock's EXISTS, and, on inc,
/// the grant's second TIME; inc's fair attempt behind a holder skips the gate's repeated
/// EXISTS tests. Nothing else changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_over_makes_the_commands_it_claims_fewer() {
    let Some(binary) = redis_or_skip("attack_s27b") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let mut c = connect(&server).await;
    let line = |key: &str| {
        vec![
            vec![
                "ZADD".to_owned(),
                format!("{key}:queue"),
                "1000000".to_owned(),
                member(1),
            ],
            vec![
                "ZADD".to_owned(),
                format!("{key}:queue-expiry"),
                "@4000".to_owned(),
                member(1),
            ],
        ]
    };
    let mut inc = vec![
        vec![
            "SET".to_owned(),
            "lock:{k}".to_owned(),
            "1".to_owned(),
            "PX".to_owned(),
            "5000".to_owned(),
        ],
        vec![
            "SET".to_owned(),
            "lock:{k}:owner".to_owned(),
            T1.to_owned(),
            "PX".to_owned(),
            "5000".to_owned(),
        ],
        vec![
            "SET".to_owned(),
            "lock:{k}:fence".to_owned(),
            "100".to_owned(),
        ],
    ];
    inc.extend(line("lock:{k}"));
    let inc = State {
        commands: inc
            .into_iter()
            .map(|c| c.into_iter().map(|a| a.replace("{k}", "{a}")).collect())
            .collect(),
    };
    let (m2, prefix) = (member(2), "turn:");
    for (leaving, saved) in [
        ("", vec![("exists", 1), ("time", 1)]),
        (m2.as_str(), vec![("get", 1), ("exists", 1), ("time", 1)]),
    ] {
        let args = [T1, leaving, prefix];
        let before = commands_of(
            &mut c,
            &redis::Script::new(&inc_release_fair(true)),
            &inc,
            &INC_KEYS,
            &args,
        )
        .await;
        let after = commands_of(
            &mut c,
            &redis::Script::new(&inc_release_fair(false)),
            &inc,
            &INC_KEYS,
            &args,
        )
        .await;
        assert_saved("inc release", &before, &after, &saved);
        eprintln!(
            "inc release (waiter {leaving:?}): {} -> {} commands",
            total(&before),
            total(&after)
        );
    }
    // inc's attempt of a waiter behind the holder (it joins the line).
    let args = [
        "aaaabbbbccccddddaaaabbbbccccdddd",
        "3000",
        m2.as_str(),
        prefix,
    ];
    let before = commands_of(
        &mut c,
        &redis::Script::new(&inc_acquire_fair(true)),
        &inc,
        &INC_KEYS,
        &args,
    )
    .await;
    let after = commands_of(
        &mut c,
        &redis::Script::new(&inc_acquire_fair(false)),
        &inc,
        &INC_KEYS,
        &args,
    )
    .await;
    assert_saved("inc attempt", &before, &after, &[("exists", 1)]);
    eprintln!(
        "inc attempt: {} -> {} commands",
        total(&before),
        total(&after)
    );
    // Redlock on one node.
    let mut redlock = vec![vec![
        "SET".to_owned(),
        "key{a}".to_owned(),
        T1.to_owned(),
        "PX".to_owned(),
        "5000".to_owned(),
    ]];
    redlock.extend(line("key{a}"));
    let redlock = State { commands: redlock };
    let keys = ["key{k}", "key{k}:queue", "key{k}:queue-expiry"];
    for (leaving, saved) in [
        ("", vec![("exists", 1)]),
        (m2.as_str(), vec![("get", 1), ("exists", 1)]),
    ] {
        let args = [T1, leaving, prefix];
        let before = commands_of(
            &mut c,
            &redis::Script::new(&redlock_release_fair(true)),
            &redlock,
            &keys,
            &args,
        )
        .await;
        let after = commands_of(
            &mut c,
            &redis::Script::new(&redlock_release_fair(false)),
            &redlock,
            &keys,
            &args,
        )
        .await;
        assert_saved("redlock release", &before, &after, &saved);
        eprintln!(
            "redlock release (waiter {leaving:?}): {} -> {} commands",
            total(&before),
            total(&after)
        );
    }
}

fn assert_saved(
    what: &str,
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    saved: &[(&str, u64)],
) {
    let mut expected = before.clone();
    for (name, count) in saved {
        let calls = expected
            .get_mut(*name)
            .unwrap_or_else(|| panic!("{what}: no {name} before"));
        *calls -= count;
        if *calls == 0 {
            expected.remove(*name);
        }
    }
    assert_eq!(after, &expected, "{what}: before {before:?}");
}

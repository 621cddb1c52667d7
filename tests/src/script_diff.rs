//! Differential runs of two versions of a script on one server, for tests that check a script
//! change against the script before it: a generated state is written twice (the key names
//! tagged `{a}` and `{b}`, so both copies hash alike), each version runs on its copy, and what
//! each left — the reply, every key of its copy with its type, value and ttl, the messages
//! published, the server's commands — is compared, clock readings and ms-durations aside.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use redis::Value;
use redis::aio::MultiplexedConnection;
use tokio::time::Instant;

/// A generated state: commands (words split by spaces) with `{k}` for the copy's tag and `@n`
/// for the server's clock + n ms.
pub type State = Vec<String>;

/// The server's clock when a copy's state was written: (ms, µs).
pub type Clock = (u64, u64);

/// One command (its words), answered as `T`.
///
/// # Panics
/// When the command fails.
pub async fn query<T: redis::FromRedisValue>(c: &mut MultiplexedConnection, args: &[&str]) -> T {
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query_async(c).await.expect("a test server's command")
}

/// `text` in runs of digits and of other characters.
pub fn split(text: &str) -> Vec<String> {
    let mut parts: Vec<String> = Vec::new();
    for c in text.chars() {
        match parts.last_mut() {
            Some(last) if last.ends_with(|d: char| d.is_ascii_digit()) == c.is_ascii_digit() => {
                last.push(c);
            }
            _ => parts.push(c.to_string()),
        }
    }
    parts
}

/// `text` with each number that is a clock reading of this run (µs or ms within 100 s of
/// `clock`) written `U` or `M`.
pub fn normalize(text: &str, (ms_now, us_now): Clock) -> String {
    split(text)
        .into_iter()
        .map(|part| match part.parse::<u64>() {
            Ok(v) if v.abs_diff(us_now) < 100_000_000 => "U".to_owned(),
            Ok(v) if v.abs_diff(ms_now) < 100_000 => "M".to_owned(),
            _ => part,
        })
        .collect()
}

/// Two runs alike: the same text, numbers equal but for durations in ms (100 to 10^6: ttls,
/// a gate's -(1 + ms)), which may differ by 50 (the copies run a few ms apart).
pub fn alike(old: &str, new: &str) -> bool {
    let (a, b) = (split(old), split(new));
    let near = |x: &String, y: &String| match (x.parse::<u64>(), y.parse::<u64>()) {
        (Ok(x), Ok(y)) => {
            [x, y].iter().all(|v| (100..1_000_000).contains(v)) && x.abs_diff(y) <= 50
        }
        _ => false,
    };
    a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x == y || near(x, y))
}

/// Calls per command since the last `CONFIG RESETSTAT`, scripts' own included (the EVALSHA,
/// CONFIG and INFO aside).
pub async fn command_calls(c: &mut MultiplexedConnection) -> BTreeMap<String, u64> {
    let info: String = query(c, &["INFO", "commandstats"]).await;
    info.lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats.strip_prefix("calls=")?.split(',').next()?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .filter(|(name, _)| !["evalsha", "info", "config|resetstat"].contains(&name.as_str()))
        .collect()
}

/// Empties the server and the messages seen, and writes `state` as the copy `tag`; the
/// command counts start afresh after it. Returns the server's clock the state was written at.
pub async fn prepare(
    c: &mut MultiplexedConnection,
    messages: &Mutex<Vec<(String, String)>>,
    state: &State,
    tag: &str,
) -> Clock {
    let _: () = query(c, &["FLUSHALL"]).await;
    messages
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clear();
    let t: Vec<u64> = query(c, &["TIME"]).await;
    let clock = (t[0] * 1_000 + t[1] / 1_000, t[0] * 1_000_000 + t[1]);
    for command in state {
        let words: Vec<String> = (command.split(' '))
            .map(|w| match w.strip_prefix('@') {
                Some(n) => (i64::try_from(clock.0).unwrap_or(i64::MAX)
                    + n.parse::<i64>().expect("a clock offset"))
                .to_string(),
                None => w.replace("{k}", tag),
            })
            .collect();
        let _: Value = query(c, &words.iter().map(String::as_str).collect::<Vec<_>>()).await;
    }
    let _: () = query(c, &["CONFIG", "RESETSTAT"]).await;
    clock
}

/// Runs `script` with `keys` and `args` (`{k}` written as `tag`) on the copy `prepare` wrote:
/// what it showed (reply, every key of the copy with type, value and ttl, the messages; the tag
/// written `{k}`, clock readings normalized), and the server's commands it made.
///
/// # Panics
/// When the test server does not answer, or the messages never come.
pub async fn invoke(
    c: &mut MultiplexedConnection,
    messages: &Mutex<Vec<(String, String)>>,
    script: &redis::Script,
    (keys, args): (&[&str], &[String]),
    tag: &str,
    clock: Clock,
) -> (String, BTreeMap<String, u64>) {
    let mut invocation = script.prepare_invoke();
    for key in keys {
        invocation.key(key.replace("{k}", tag));
    }
    for arg in args {
        invocation.arg(arg.replace("{k}", tag));
    }
    let mut seen = match invocation.invoke_async::<Value>(c).await {
        Ok(v) => format!("reply {v:?}\n"),
        Err(e) => format!("error {e}\n"),
    };
    let calls = command_calls(c).await;
    let mut names: Vec<String> = query(c, &["KEYS", &format!("*{tag}*")]).await;
    names.sort();
    for name in names {
        let kind: String = query(c, &["TYPE", &name]).await;
        let value: Vec<String> = match kind.as_str() {
            "string" => Vec::from_iter(query::<Option<String>>(c, &["GET", &name]).await),
            "zset" => query(c, &["ZRANGE", &name, "0", "-1", "WITHSCORES"]).await,
            "hash" => query(c, &["HGETALL", &name]).await,
            _ => Vec::new(),
        };
        // A fencing counter far above the clock lives for years: compared by kind.
        let ttl = match query::<i64>(c, &["PTTL", &name]).await {
            pttl if pttl > 100_000_000 => "long".to_owned(),
            pttl => pttl.to_string(),
        };
        seen += &format!("{name}: {kind} {value:?} ttl {ttl}\n");
    }
    // The subscriber gets messages in order: all the script's are in once the sentinel is.
    let _: i64 = query(c, &["PUBLISH", "zz-sentinel", "end"]).await;
    let deadline = Instant::now() + Duration::from_secs(2);
    let seen_messages = || {
        messages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    };
    while !seen_messages()
        .iter()
        .any(|(channel, _)| channel == "zz-sentinel")
    {
        assert!(Instant::now() < deadline, "the sentinel never came");
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    for (channel, message) in seen_messages() {
        seen += &format!("published {channel} {message}\n");
    }
    (normalize(&seen.replace(tag, "{k}"), clock), calls)
}

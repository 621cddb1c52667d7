//! Attack on session 28's line slack (18f4ba3): a join sets the line keys' expiry only when they
//! would expire before its entry (PEXPIRETIME), to a quarter lease past it, and at every join on
//! a server without PEXPIRETIME; inc stores fences with one SET PXAT; a fair Redlock first
//! attempt that finds a line gives the key back and tries once more. Mixed leases (a short join
//! after a long one), servers without PEXPIRETIME, valkey 8, wall-clock jumps of the server,
//! hand-deleted and persisted line keys, single tries racing a live waiter, fences with the
//! shortest and longest ttls. A checker reads each line atomically (MULTI: TIME, the expiry
//! index, both keys' PTTL) after every step and requires both keys to carry an expiry no earlier
//! than any live entry and no later than a quarter of the longest lease after it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lock_core::RetryPolicy;
use lock_core::raw::redis::LINE_SCRIPT;
use lock_tests::clock::WallJump;
use lock_tests::fair::{Store, Target, connect, line_names, waiting};
use lock_tests::server::{RedisServer, redis_or_skip, valkey_or_skip};
use redis::aio::MultiplexedConnection;
use tokio::time::sleep;

/// `n` milliseconds.
fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A server without PEXPIRETIME (as Redis before 7).
fn old_server(binary: &std::path::Path) -> RedisServer {
    RedisServer::start(binary, &["--rename-command", "PEXPIRETIME", ""]).unwrap()
}

/// One target of `store` on the given single server.
fn target_on(store: Store, server: RedisServer) -> Target {
    let url = server.url();
    Target {
        store,
        servers: vec![server],
        url,
    }
}

/// One atomic read of a line (TIME, the expiry index with scores, both keys' PTTL), checked:
/// both keys carry an expiry, none expires before a live entry, and none later than `bound` ms
/// from now. A description of what broke, or None.
async fn check_line(
    c: &mut MultiplexedConnection,
    names: &[Vec<u8>; 2],
    bound: i64,
) -> Option<String> {
    type Read = (Vec<i64>, Vec<(String, i64)>, i64, i64, Vec<i64>);
    let (time, entries, line_left, index_left, time_after): Read = redis::pipe()
        .atomic()
        .cmd("TIME")
        .cmd("ZRANGE")
        .arg(&names[1])
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .cmd("PTTL")
        .arg(&names[0])
        .cmd("PTTL")
        .arg(&names[1])
        .cmd("TIME")
        .query_async(c)
        .await
        .unwrap();
    let now = time[0] * 1000 + time[1] / 1000;
    // The server's clock moved this much while it read (a server descheduled between the
    // commands of the transaction: 4 ms once under load): the `PTTL`s may count from as late.
    let skew = 2 + (time_after[0] * 1000 + time_after[1] / 1000 - now);
    let latest = entries.iter().map(|(_, at)| *at).max();
    for (which, left) in [("line", line_left), ("expiry index", index_left)] {
        if left == -1 {
            return Some(format!(
                "the {which} key has no expiry (entries {entries:?})"
            ));
        }
        if let Some(latest) = latest.filter(|latest| *latest > now + 2) {
            // -2: gone under a live entry; else it expires (past the read's skew) before it.
            if left == -2 || now + left + skew < latest {
                return Some(format!(
                    "the {which} key expires in {left} ms, a live entry in {} ms (now {now}, entries {entries:?})",
                    latest - now
                ));
            }
        }
        if left > bound {
            return Some(format!(
                "the {which} key expires in {left} ms, past {bound} ms"
            ));
        }
    }
    None
}

/// The line's helpers as the scripts call them, by name (KEYS: lock, line, expiry index).
fn line_ops() -> redis::Script {
    redis::Script::new(&format!(
        "{LINE_SCRIPT}\nlocal now, now_us = line_clock()\nlocal op = ARGV[1]\n\
         if op == 'join' then line_prune(now) return line_join(ARGV[2], now, now_us, tonumber(ARGV[3]))\n\
         elseif op == 'take' then line_prune(now) line_leave(ARGV[2]) line_settle()\n\
         elseif op == 'leave' then line_leave(ARGV[2])\n\
         elseif op == 'give' then line_give(KEYS[1], 'x', function() return nil end, true) end\n\
         return 0"
    ))
}

async fn op(c: &mut MultiplexedConnection, names: &[Vec<u8>; 2], args: &[String]) {
    let script = line_ops();
    let mut invocation = script.key("lock-s28a");
    invocation.key(&names[0]).key(&names[1]);
    for arg in args {
        invocation.arg(arg);
    }
    let _: redis::Value = invocation.invoke_async(c).await.unwrap();
}

/// xorshift64: a fixed sequence per seed.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

const LEASES: [u64; 6] = [3, 40, 250, 1_500, 20_000, 86_400_000];

/// `steps` random steps on one line (joins and renewals with leases of 3 ms to a day, leaves
/// with and without settle, releases that pass the turn, short sleeps, and with `clock` jumps of
/// the server's wall clock), checked after each; the first thing that broke.
async fn random_line(
    url: &str,
    seed: u64,
    steps: usize,
    clock: Option<&WallJump>,
) -> Option<String> {
    let mut c = connect(url).await;
    let names = [
        b"s28a\xff:queue".to_vec(),
        b"s28a\xff:queue-expiry".to_vec(),
    ];
    let _: () = redis::cmd("DEL")
        .arg(&names[0])
        .arg(&names[1])
        .query_async(&mut c)
        .await
        .unwrap();
    let mut state = seed;
    let mut back = 0i64;
    let bound = |back: i64| back + (LEASES[5] + LEASES[5] / 4) as i64 + 5;
    for step in 0..steps {
        let member = format!("{:064x}", next(&mut state) % 6);
        // The first two steps join: for a day, then for 3 ms (a short join after a long one).
        let choice = if step < 2 { 0 } else { next(&mut state) % 10 };
        let what = match choice {
            0..=4 => {
                let lease = match step {
                    0 => LEASES[5],
                    1 => LEASES[0],
                    _ => LEASES[(next(&mut state) % 6) as usize],
                };
                op(&mut c, &names, &["join".into(), member, lease.to_string()]).await;
                format!("join {lease}")
            }
            5 => {
                op(&mut c, &names, &["take".into(), member]).await;
                "take".into()
            }
            6 => {
                op(&mut c, &names, &["leave".into(), member]).await;
                "leave".into()
            }
            7 => {
                op(&mut c, &names, &["give".into()]).await;
                "give".into()
            }
            _ => {
                let pause = next(&mut state) % 30;
                if let Some(shim) = clock
                    && pause.is_multiple_of(3)
                {
                    // A jump back an hour, or forward by a few ms.
                    let backwards = pause.is_multiple_of(2);
                    if backwards {
                        back += 3_600_000;
                    } else {
                        back -= (pause * 10) as i64;
                    }
                    shim.jump(ms(back.unsigned_abs()), back > 0).unwrap();
                }
                sleep(ms(pause)).await;
                format!("pause {pause}")
            }
        };
        if let Some(broken) = check_line(&mut c, &names, bound(back.max(0))).await {
            return Some(format!("step {step} ({what}): {broken}"));
        }
    }
    None
}

/// A server without PEXPIRETIME: a 200 ms waiter joins behind a 10 s one (a holder's key); both
/// line keys must outlive the 10 s entry.
/// Waits up to `within` for `flag` to be set; panics with `what` when it is not.
async fn until_set(flag: &AtomicBool, within: Duration, what: &str) {
    tokio::time::timeout(within, async {
        while !flag.load(Ordering::SeqCst) {
            sleep(ms(10)).await;
        }
    })
    .await
    .expect(what);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pexpiretime_a_short_join_keeps_the_keys_over_a_longer_entry() {
    let Some(binary) = redis_or_skip("attack s28a") else {
        return;
    };
    let mut broken = Vec::new();
    for store in [Store::Redis, Store::Inc] {
        let target = target_on(store, old_server(&binary));
        let key = "mixed";
        let names = line_names(store, key);
        let holder = target.locker(true, ms(10_000), RetryPolicy::none()).await;
        let guard = holder.acquire(key).await.unwrap();
        target.dead_waiter(key, ms(10_000)).await;
        target.dead_waiter(key, ms(200)).await;
        let mut c = connect(&target.url).await;
        if let Some(what) = check_line(&mut c, &names, 12_600).await {
            broken.push(format!("{store:?}: {what}"));
        }
        guard.release().await.unwrap();
        holder.stop().await.unwrap();
    }
    assert!(broken.is_empty(), "{broken:#?}");
}

/// The same on the line's own helpers, random steps: without PEXPIRETIME.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pexpiretime_random_steps_keep_the_keys_over_every_live_entry() {
    let Some(binary) = redis_or_skip("attack s28a") else {
        return;
    };
    let server = old_server(&binary);
    for seed in [7, 1_234_567, 0x5eed_5eed] {
        let broken = random_line(&server.url(), seed, 150, None).await;
        assert!(broken.is_none(), "seed {seed}: {}", broken.unwrap());
    }
}

/// What the early expiry costs: a live waiter (10 s ttl, first in line, polling every 3 s) and a
/// 200 ms waiter that dies behind it; the holder releases after the short entry lapsed. A single
/// try must not pass the live waiter (its entry has 9 s left) — on a server without PEXPIRETIME.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pexpiretime_a_single_try_never_passes_a_live_long_waiter() {
    let Some(binary) = redis_or_skip("attack s28a") else {
        return;
    };
    let mut passed = Vec::new();
    for store in [Store::Redis, Store::Inc] {
        let target = target_on(store, old_server(&binary));
        if let Some(what) = single_try_behind_mixed_line(&target).await {
            passed.push(format!("{store:?}: {what}"));
        }
    }
    assert!(passed.is_empty(), "{passed:#?}");
}

/// The scenario of the test above on `target`: what went wrong, or None. The live waiter holds
/// the key once it gets it, until the end.
async fn single_try_behind_mixed_line(target: &Target) -> Option<String> {
    let key = "passed";
    let holder = target.locker(true, ms(10_000), RetryPolicy::none()).await;
    let guard = holder.acquire(key).await.unwrap();
    let long = target.locker(true, ms(10_000), waiting(ms(3_000))).await;
    let got = Arc::new(AtomicBool::new(false));
    let done = Arc::new(tokio::sync::Notify::new());
    let waiter = {
        let (got, done) = (Arc::clone(&got), Arc::clone(&done));
        tokio::spawn(async move {
            let guard = long.acquire(key).await.unwrap();
            got.store(true, Ordering::SeqCst);
            done.notified().await;
            guard.release().await.unwrap();
            long.stop().await.unwrap();
        })
    };
    sleep(ms(200)).await;
    assert_eq!(
        target.line_keys(key).await.len(),
        2,
        "the live waiter is in line"
    );
    target.dead_waiter(key, ms(200)).await;
    sleep(ms(500)).await;
    guard.release().await.unwrap();
    let single = target.locker(true, ms(1_000), RetryPolicy::none()).await;
    let taken = single.try_acquire(key).await.unwrap();
    let what = taken.as_ref().map(|_| {
        format!(
            "a single try took the key past a live waiter (entry 9 s left; it holds the key: {})",
            got.load(Ordering::SeqCst)
        )
    });
    if let Some(guard) = taken {
        guard.release().await.unwrap();
    }
    // The waiter gets the key (at once, or at its next poll 3 s on).
    until_set(&got, ms(3_500), "the live waiter gets the key").await;
    done.notify_one();
    waiter.await.unwrap();
    holder.stop().await.unwrap();
    single.stop().await.unwrap();
    what
}

/// With PEXPIRETIME (Redis 7.0, valkey 8): random steps keep both keys over every live entry,
/// and the single try of the scenario above is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_pexpiretime_random_steps_and_single_tries_hold() {
    let Some(binary) = redis_or_skip("attack s28a") else {
        return;
    };
    let mut servers = vec![RedisServer::start(&binary, &[]).unwrap()];
    if let Some(valkey) = valkey_or_skip("attack s28a") {
        servers.push(RedisServer::start(&valkey, &[]).unwrap());
    }
    for server in &servers {
        for seed in [7, 1_234_567, 0x5eed_5eed] {
            let broken = random_line(&server.url(), seed, 150, None).await;
            assert!(
                broken.is_none(),
                "{}: seed {seed}: {}",
                server.url(),
                broken.unwrap()
            );
        }
    }
    drop(servers);
    for store in [Store::Redis, Store::Inc] {
        let target = target_on(store, RedisServer::start(&binary, &[]).unwrap());
        let what = single_try_behind_mixed_line(&target).await;
        assert!(what.is_none(), "{store:?}: {}", what.unwrap());
    }
}

/// A server whose wall clock jumps back an hour and forward by a few ms between the steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_jumps_keep_the_keys_over_every_live_entry() {
    let Some(binary) = redis_or_skip("attack s28a") else {
        return;
    };
    let shim = WallJump::build().expect("the walljump shim builds");
    let server = shim.start_server(&binary).unwrap();
    for seed in [99, 4_242] {
        let broken = random_line(&server.url(), seed, 120, Some(&shim)).await;
        shim.jump(Duration::ZERO, false).unwrap();
        assert!(broken.is_none(), "seed {seed}: {}", broken.unwrap());
    }
}

/// A fair Redlock key left free (its holder's key deleted, as when it expires, or released by a
/// client without `fair`) with a lapsed dead waiter at the head of its line and a live waiter
/// behind: eight concurrent single tries (each gives the key back and tries once more) are all
/// refused, nobody holds twice, and the live waiter gets the key.
async fn single_tries_race_a_live_waiter(store: Store) {
    let Some(target) = Target::start(store, "attack s28a").await else {
        return;
    };
    for round in 0..3 {
        let key = format!("race{round}");
        let holder = target.locker(true, ms(10_000), RetryPolicy::none()).await;
        // Its key is deleted below, as if it expired: its guard is released at the end.
        let guard = holder.acquire(&key).await.unwrap();
        target.dead_waiter(&key, ms(300)).await;
        let live = target.locker(true, ms(5_000), waiting(ms(3_000))).await;
        let got = Arc::new(AtomicBool::new(false));
        let done = Arc::new(tokio::sync::Notify::new());
        let waiter = {
            let (key, got, done) = (key.clone(), Arc::clone(&got), Arc::clone(&done));
            tokio::spawn(async move {
                let guard = live.acquire(&key).await.unwrap();
                got.store(true, Ordering::SeqCst);
                // Held until every single try has answered: one that wins passed it or holds
                // beside it.
                done.notified().await;
                guard.release().await.unwrap();
                live.stop().await.unwrap();
            })
        };
        sleep(ms(400)).await;
        for server in &target.servers {
            let mut c = connect(&server.url()).await;
            let _: () = redis::cmd("DEL")
                .arg(&key)
                .query_async(&mut c)
                .await
                .unwrap();
        }
        let mut tries = Vec::new();
        for _ in 0..8 {
            let single = target.locker(true, ms(1_000), RetryPolicy::none()).await;
            let key = key.clone();
            tries.push(tokio::spawn(async move {
                let taken = single.try_acquire(&key).await.unwrap();
                let won = taken.is_some();
                if let Some(guard) = taken {
                    let _ = guard.release().await;
                }
                single.stop().await.unwrap();
                won
            }));
        }
        let mut won = 0;
        for task in tries {
            won += u32::from(task.await.unwrap());
        }
        until_set(
            &got,
            ms(2_500),
            "the live waiter gets the key, woken by a give-back",
        )
        .await;
        done.notify_one();
        waiter.await.unwrap();
        // Released only now: a fair release of a free key passes the turn too.
        let _ = guard.release().await;
        assert_eq!(
            won, 0,
            "{store:?} round {round}: {won} single tries passed a live waiter"
        );
        holder.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_single_tries_never_pass_a_live_waiter_behind_a_lapsed_head() {
    single_tries_race_a_live_waiter(Store::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock3_single_tries_never_pass_a_live_waiter_behind_a_lapsed_head() {
    single_tries_race_a_live_waiter(Store::Redlock3).await;
}

/// One line key gone under a live 20 s entry (deleted, as `maxmemory` with volatile-lru evicts
/// one: both carry a ttl) or its index persisted: the next join, of 50 ms, leaves both keys with
/// an expiry past every live entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_or_persisted_line_key_is_set_again_by_the_next_join() {
    let Some(binary) = redis_or_skip("attack s28a") else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).unwrap();
    let mut c = connect(&server.url()).await;
    let names = [
        b"s28a\xff:queue".to_vec(),
        b"s28a\xff:queue-expiry".to_vec(),
    ];
    let member = |n: u64| format!("{n:064x}");
    for (how, which) in [("DEL", 1), ("PERSIST", 1), ("DEL", 0)] {
        let _: () = redis::cmd("DEL")
            .arg(&names[0])
            .arg(&names[1])
            .query_async(&mut c)
            .await
            .unwrap();
        op(&mut c, &names, &["join".into(), member(1), "20000".into()]).await;
        op(&mut c, &names, &["join".into(), member(2), "400".into()]).await;
        let _: () = redis::cmd(how)
            .arg(&names[which])
            .query_async(&mut c)
            .await
            .unwrap();
        op(&mut c, &names, &["join".into(), member(3), "50".into()]).await;
        let broken = check_line(&mut c, &names, 25_005).await;
        assert!(
            broken.is_none(),
            "{how} of key {which}: {}",
            broken.unwrap()
        );
    }
}

/// inc's fences (SET PXAT): strictly increasing over acquisitions of 5 ms and 24 h ttls and
/// fair hand-overs, the counter expiring exactly 1 ms past the token's ms plus the ttl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_fences_stored_with_pxat_increase_and_expire_as_before() {
    let Some(target) = Target::start(Store::Inc, "attack s28a").await else {
        return;
    };
    let mut c = connect(&target.url).await;
    let fence_key = "lock:{fenced}:fence";
    let mut last = 0;
    for round in 0..6u64 {
        let ttl = if round % 2 == 0 { 86_400_000 } else { 5 };
        let locker = target.locker(true, ms(ttl), RetryPolicy::none()).await;
        let guard = locker.acquire("fenced").await.unwrap();
        let token = guard.fencing_token().unwrap();
        let at: i64 = redis::cmd("PEXPIRETIME")
            .arg(fence_key)
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(token > last, "token {token} after {last}");
        assert_eq!(
            at,
            (token / 1000 + 1 + ttl) as i64,
            "the counter's expiry (ttl {ttl})"
        );
        last = token;
        // A fair waiter behind a 24 h holder is handed the lock (line_grant) with a token of its own.
        let waiter = target.locker(true, ms(2_000), waiting(ms(20))).await;
        let handed = tokio::spawn(async move {
            let guard = waiter.acquire("fenced").await.unwrap();
            let token = guard.fencing_token().unwrap();
            guard.release().await.unwrap();
            waiter.stop().await.unwrap();
            token
        });
        sleep(ms(if ttl == 5 { 0 } else { 100 })).await;
        let _ = guard.release().await;
        let token = handed.await.unwrap();
        assert!(token > last, "handed token {token} after {last}");
        last = token;
        locker.stop().await.unwrap();
    }
}

//! adv16a: the fault explorer's clock jumps (`explore.rs`, `Fault::Jump`) move a node's clock
//! through the walljump shim's offset file, and the explorer's assumptions learn of each step
//! from `Assumptions::step`. The shim rewrites that file in place (`std::fs::write`: truncate,
//! then write), and the server reads it on every clock reading: a reading between the two sees
//! an empty file, that is offset 0, and the node's clock steps to real time and back without
//! anything knowing. On a node whose clock is ahead (the explorer's `Skew`, or a cumulative
//! forward offset), a lock set at such a reading gets an expiry that is the whole offset short:
//! an early expiry (a second holder) in a schedule the explorer checks for mutual exclusion
//! (it saw no forward step), and a fencing value drawn from a clock that stepped back.

use std::time::{Duration, Instant};

use lock_tests::clock::WallJump;
use lock_tests::server::redis_or_skip;

/// The node's clock offset: ahead by 3 s, as a skewed node in the explorer (500..3000 ms).
const AHEAD: Duration = Duration::from_secs(3);

/// Each lock's ttl: long, so that only the expiry's absolute time matters.
const TTL_MS: i64 = 60_000;

/// Keys set per pipeline (the server reads its clock once per event-loop turn).
const BATCH: usize = 200;

/// Rewrites the node's offset with the value it already has (every jump of the explorer
/// rewrites the file) while locks are set, and counts the locks whose expiry came out short by
/// the offset. With `rewrite` false, the same load without rewrites (the negative control).
fn short_expiries(rewrite: bool, for_at_most: Duration) -> Option<(usize, usize, usize)> {
    let binary = redis_or_skip("attack_s16a")?;
    let shim = WallJump::build().expect("the walljump shim builds (needs a C compiler)");
    shim.jump(AHEAD, false).expect("offset set");
    let server = shim
        .start_server(&binary)
        .expect("redis-server under walljump");
    let client =
        redis::Client::open(format!("redis://127.0.0.1:{}/", server.port())).expect("client");
    let mut connection = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .expect("connection");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (mut short, mut set, mut rewrites) = (0, 0, 0);
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut n = 0;
            while rewrite && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                shim.jump(AHEAD, false).expect("offset rewritten");
                n += 1;
            }
            n
        });
        let began = Instant::now();
        let mut round = 0usize;
        while short == 0 && began.elapsed() < for_at_most {
            let mut pipe = redis::pipe();
            for i in 0..BATCH {
                pipe.cmd("SET")
                    .arg(format!("lock-{round}-{i}"))
                    .arg("token")
                    .arg("PX")
                    .arg(TTL_MS)
                    .ignore();
            }
            pipe.query::<()>(&mut connection).expect("SETs");
            // Read back with the offset settled (the writer only ever writes AHEAD; a PTTL read
            // while the file is empty would show a longer ttl, never a shorter one).
            let mut pipe = redis::pipe();
            for i in 0..BATCH {
                pipe.cmd("PTTL").arg(format!("lock-{round}-{i}"));
            }
            let pttls: Vec<i64> = pipe.query(&mut connection).expect("PTTLs");
            set += BATCH;
            // Short by (nearly) the whole offset: the SET read a clock without it.
            short += pttls.iter().filter(|pttl| **pttl < TTL_MS - 2_000).count();
            redis::cmd("FLUSHALL")
                .query::<()>(&mut connection)
                .expect("FLUSHALL");
            round += 1;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        rewrites = writer.join().expect("writer");
    });
    Some((short, set, rewrites))
}

/// Fails on main: a rewrite of a node's offset (what every explorer jump does) that leaves its
/// value as it was still lets locks be set with an expiry 3 s short, because the server read the
/// half-written offset file as "no offset". The explorer's assumptions see no forward step, so
/// the early expiry that follows counts as a broken mutual exclusion; and the fencing value
/// drawn at such a reading comes from a clock 3 s behind.
#[test]
fn rewriting_a_node_clock_offset_never_steps_its_clock() {
    let Some((short, set, rewrites)) = short_expiries(true, Duration::from_secs(20)) else {
        return;
    };
    println!(
        "offset rewritten {rewrites} times, {set} locks set, {short} with an expiry 3 s short"
    );
    assert_eq!(
        short, 0,
        "{short} of {set} locks set on a node 3 s ahead got an expiry 3 s short while its offset \
         file was rewritten with the same value ({rewrites} rewrites): the server read the \
         truncated file as offset 0, a clock step the explorer's assumptions never saw"
    );
}

/// The negative control: the same load with the offset left alone sets no lock short.
#[test]
fn without_rewrites_no_lock_is_set_short() {
    let Some((short, set, _)) = short_expiries(false, Duration::from_secs(2)) else {
        return;
    };
    println!("{set} locks set, {short} with an expiry 3 s short");
    assert_eq!(
        short, 0,
        "{short} of {set} locks set short without any rewrite"
    );
}

//! Fencing tokens follow the order of acquisitions on every key, even when holders are
//! preempted in the middle of an acquisition (24 threads on this machine's cores, ttls of a few
//! milliseconds: preemptions longer than a ttl happen all the time).
//!
//! The checker is sound: tokens are drawn at the moment a key is taken, and a lock's validity
//! starts no earlier than that moment. So if holder A's token is larger than holder B's, A took
//! the key after B did, which was after B's call began, and A's validity must end after B's call
//! began. A pair with A's token larger and A's validity over before B even called proves that
//! the token order disagrees with the order in which the key was taken.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_memory::MemoryLock;
use tokio::time::Instant;

struct Acquired {
    key: usize,
    fence: u64,
    called: Instant,
    valid_until: Instant,
}

/// Pairs (A, B) on one key where A's fence is larger yet A's validity ended before B called.
fn inversions(mut log: Vec<Acquired>) -> usize {
    let mut by_key: HashMap<usize, Vec<Acquired>> = HashMap::new();
    for entry in log.drain(..) {
        by_key.entry(entry.key).or_default().push(entry);
    }
    let mut found = 0;
    for (_, mut entries) in by_key {
        entries.sort_by_key(|entry| std::cmp::Reverse(entry.fence));
        // Walking down from the highest fence: the earliest validity end among larger fences.
        let mut earliest_end: Option<Instant> = None;
        for entry in entries {
            if earliest_end.is_some_and(|end| end <= entry.called) {
                found += 1;
            }
            earliest_end =
                Some(earliest_end.map_or(entry.valid_until, |e| e.min(entry.valid_until)));
        }
    }
    found
}

#[test]
fn fences_follow_the_order_in_which_keys_are_taken() {
    const THREADS: usize = 24;
    const KEYS: usize = 64;
    let run_for = Duration::from_secs(4);
    let lock = MemoryLock::new();
    let started = std::time::Instant::now();
    let workers: Vec<_> = (0..THREADS)
        .map(|thread| {
            let lock = lock.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let mut log = Vec::new();
                    let mut turn = thread;
                    while started.elapsed() < run_for {
                        turn = turn.wrapping_mul(31).wrapping_add(7);
                        let ttl = Duration::from_millis(1 + (turn % 5) as u64);
                        let locker = Locker::new(lock.clone())
                            .with_options(
                                LockOptions::default()
                                    .with_ttl(ttl)
                                    .with_retry(RetryPolicy::none()),
                            )
                            .unwrap();
                        let key = turn % KEYS;
                        let called = Instant::now();
                        if let Ok(Some(guard)) = locker.try_acquire(&format!("k{key}")).await {
                            log.push(Acquired {
                                key,
                                fence: guard.fencing_token().unwrap(),
                                called,
                                valid_until: guard.valid_until(),
                            });
                            // Some holders release, the others let the lock expire.
                            if turn % 3 == 0 {
                                let _ = guard.release().await;
                            } else {
                                std::mem::forget(guard);
                            }
                        }
                    }
                    log
                })
            })
        })
        .collect();
    let log: Vec<Acquired> = workers
        .into_iter()
        .flat_map(|worker| worker.join().unwrap())
        .collect();
    let acquisitions = log.len();
    let found = inversions(log);
    println!("fence order: {acquisitions} acquisitions, {found} proven inversions");
    assert!(acquisitions > 1000, "only {acquisitions} acquisitions");
    assert_eq!(found, 0, "fencing tokens went backwards on a key");
}

#[test]
fn the_checker_finds_an_inversion() {
    let t = Instant::now();
    let ms = |n: u64| t + Duration::from_millis(n);
    let log = vec![
        // A took the key first and drew its fence late: larger, though its validity ended at 5.
        Acquired {
            key: 1,
            fence: 9,
            called: ms(0),
            valid_until: ms(5),
        },
        // B called at 6, after A's validity, and drew a smaller fence.
        Acquired {
            key: 1,
            fence: 8,
            called: ms(6),
            valid_until: ms(11),
        },
        // Another key is independent.
        Acquired {
            key: 2,
            fence: 10,
            called: ms(0),
            valid_until: ms(1),
        },
    ];
    assert_eq!(inversions(log), 1);
    let fine = vec![
        Acquired {
            key: 1,
            fence: 1,
            called: ms(0),
            valid_until: ms(5),
        },
        Acquired {
            key: 1,
            fence: 2,
            called: ms(6),
            valid_until: ms(11),
        },
    ];
    assert_eq!(inversions(fine), 0);
}

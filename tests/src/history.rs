//! History checkers for lock safety, reusable by every scenario. All workers share one
//! monotonic clock (`tokio::time::Instant`), so the interval checker is exact for a
//! single-process history.
//!
//! - [`Intervals`]: overlapping `[acquired, released)` hold intervals;
//! - [`RacyCounter`]: a non-atomic read, yield, write counter guarded by the lock, whose lost
//!   updates expose two holders;
//! - [`FencedResource`]: keeps the highest fencing token seen and counts the writes that came
//!   with a lower one (a stale holder writing after a newer one).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Hold intervals, recorded by the holders themselves.
#[derive(Debug, Default)]
pub struct Intervals(Mutex<Vec<(Instant, Instant)>>);

impl Intervals {
    /// Records that a holder held the lock from `acquired` until `released`.
    pub fn record(&self, acquired: Instant, released: Instant) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((acquired, released));
    }

    /// How many intervals were recorded.
    pub fn len(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many intervals began before an earlier-starting one had ended.
    pub fn overlaps(&self) -> usize {
        let mut intervals = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        intervals.sort();
        let mut latest_end: Option<Instant> = None;
        let mut overlaps = 0;
        for (start, end) in intervals {
            if latest_end.is_some_and(|latest| start < latest) {
                overlaps += 1;
            }
            latest_end = Some(latest_end.map_or(end, |latest| latest.max(end)));
        }
        overlaps
    }
}

/// A counter updated by a non-atomic read, pause, write: correct only under mutual exclusion.
#[derive(Debug, Default)]
pub struct RacyCounter(AtomicU64);

impl RacyCounter {
    /// Reads, yields for `pause`, then writes the value read plus one.
    pub async fn increment(&self, pause: Duration) {
        let seen = self.0.load(Ordering::SeqCst);
        tokio::task::yield_now().await;
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        self.0.store(seen + 1, Ordering::SeqCst);
    }

    /// How many of `expected` increments were lost.
    pub fn lost_updates(&self, expected: u64) -> u64 {
        expected.saturating_sub(self.0.load(Ordering::SeqCst))
    }
}

/// A resource that remembers the highest fencing token it has seen.
#[derive(Debug, Default)]
pub struct FencedResource {
    highest: AtomicU64,
    stale: AtomicU64,
    writes: AtomicU64,
}

impl FencedResource {
    /// A write carrying `fence`: accepted unless a higher fence was seen before, in which case
    /// it is counted as stale (and a fencing resource would refuse it).
    pub fn write(&self, fence: u64) -> bool {
        self.writes.fetch_add(1, Ordering::SeqCst);
        let previous = self.highest.fetch_max(fence, Ordering::SeqCst);
        if fence < previous {
            self.stale.fetch_add(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Writes that came with a fence lower than one already seen.
    pub fn stale_writes(&self) -> u64 {
        self.stale.load(Ordering::SeqCst)
    }

    /// Writes seen in all.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_count_overlaps() {
        let base = Instant::now();
        let at = |ms: u64| base + Duration::from_millis(ms);
        let log = Intervals::default();
        log.record(at(0), at(10));
        log.record(at(10), at(20));
        assert_eq!(log.overlaps(), 0, "touching intervals do not overlap");
        log.record(at(15), at(30));
        log.record(at(1), at(2));
        assert_eq!(log.overlaps(), 2);
    }

    #[test]
    fn fences_going_backwards_are_stale() {
        let resource = FencedResource::default();
        assert!(resource.write(1));
        assert!(resource.write(3));
        assert!(!resource.write(2));
        assert_eq!((resource.stale_writes(), resource.writes()), (1, 3));
    }
}

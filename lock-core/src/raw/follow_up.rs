//! The one background follow-up of operations that must reach every node of a store.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::metrics;

/// How many rounds a [`FollowUp`] sends at most: a node that stalled, or restarted and lost its
/// scripts (its first answer, an error, reaches nobody once the caller gave up), hears the
/// message again after a pause, and a node that never answers is given up on after this many.
pub const FOLLOW_UP_ROUNDS: u32 = 3;

/// Asks the nodes that missed an operation again until each has answered it: up to
/// [`FOLLOW_UP_ROUNDS`] rounds, after pauses that double from a first one, never one that
/// would start past `expires_by` (when the keys are gone by themselves), and none once the
/// backend was stopped.
///
/// This is the only place a backend sleeps or retries: releases, clean-ups of failed or
/// abandoned attempts and fence raises that a node failed or did not answer. Each message sent
/// again counts once in [`metrics::RESENDS`] under the backend's name and the operation; a
/// round [`at_once`](FollowUp::at_once) may be a first send to some of its nodes, which do not
/// count. Token-checked operations make asking twice harmless.
///
/// The backend spawns [`FollowUp::run`] (it never runs on a caller's path) and says, through
/// the closure, how one round is sent: the closure gets what is still unanswered (nodes, or
/// keys) and returns what is still unanswered after the round.
///
/// ```
/// use std::time::Duration;
/// use lock_core::raw::FollowUp;
/// use tokio::time::Instant;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let expires_by = Instant::now() + Duration::from_secs(30);
/// let follow_up = FollowUp::new("mine", "release", Duration::from_millis(50), expires_by);
/// let mut sent = 0;
/// // Node 2 answers the second time it is asked.
/// follow_up
///     .run(vec![2_usize], || true, |nodes: Vec<usize>| {
///         sent += 1;
///         let answered = sent == 2;
///         async move { if answered { Vec::new() } else { nodes } }
///     })
///     .await;
/// assert_eq!(sent, 2);
/// # }
/// ```
#[derive(Clone, Copy, Debug)]
pub struct FollowUp {
    backend: &'static str,
    operation: &'static str,
    pause: Duration,
    expires_by: Instant,
    /// Set when the first round goes out at once: how many of its messages are re-sends.
    at_once: Option<usize>,
}

impl FollowUp {
    /// A follow-up of `operation` ([`metrics::OPERATION_RELEASE`],
    /// [`metrics::OPERATION_FENCE_RAISE`]) by `backend` (its [`Lock::name`](crate::raw::Lock::name)),
    /// whose first round goes out after `pause` (the backend's command or node timeout), and
    /// whose last starts before `expires_by`.
    pub fn new(
        backend: &'static str,
        operation: &'static str,
        pause: Duration,
        expires_by: Instant,
    ) -> Self {
        Self {
            backend,
            operation,
            pause,
            expires_by,
            at_once: None,
        }
    }

    /// The first round goes out at once instead of after a pause; `resent` of its messages are
    /// sent again (those nodes were sent the operation before), the others for the first time.
    #[must_use]
    pub fn at_once(mut self, resent: usize) -> Self {
        self.at_once = Some(resent);
        self
    }

    /// The pause before each round, in order (at most [`FOLLOW_UP_ROUNDS`]).
    pub fn pauses(&self) -> impl Iterator<Item = Duration> + use<> {
        let first = self.at_once.map(|_| Duration::ZERO);
        let doubling = (0..FOLLOW_UP_ROUNDS).map({
            let pause = self.pause;
            move |round| pause.saturating_mul(1 << round)
        });
        first
            .into_iter()
            .chain(doubling)
            .take(FOLLOW_UP_ROUNDS as usize)
    }

    /// Sends the rounds: while `unanswered` is not empty and the next round starts before the
    /// keys expire, waits out its pause, stops if `running` says the backend was stopped,
    /// counts the round's re-sends, and lets `round` send it and return what is still
    /// unanswered.
    pub async fn run<T, R, F, Fut>(self, mut unanswered: Vec<T>, running: R, mut round: F)
    where
        R: Fn() -> bool,
        F: FnMut(Vec<T>) -> Fut,
        Fut: Future<Output = Vec<T>>,
    {
        let mut first = self.at_once;
        for pause in self.pauses() {
            if unanswered.is_empty() || Instant::now() + pause >= self.expires_by {
                return;
            }
            tokio::time::sleep(pause).await;
            if !running() {
                return;
            }
            let resent = first.take().unwrap_or(unanswered.len());
            if resent > 0 {
                metrics::resent(self.backend, self.operation, resent as u64);
            }
            unanswered = round(unanswered).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    const PAUSE: Duration = Duration::from_millis(100);

    /// Runs `follow_up` over nodes `0..nodes` that answer once asked `answers_at` times
    /// (never when `None`); returns when each round started, relative to the start, and which
    /// nodes it asked.
    async fn rounds(
        follow_up: FollowUp,
        nodes: usize,
        answers_at: Option<usize>,
        running: impl Fn() -> bool,
    ) -> Vec<(Duration, Vec<usize>)> {
        let start = Instant::now();
        let log = RefCell::new(Vec::new());
        follow_up
            .run((0..nodes).collect(), running, |asked: Vec<usize>| {
                log.borrow_mut().push((start.elapsed(), asked.clone()));
                let asked_times = log.borrow().len();
                async move {
                    if answers_at == Some(asked_times) {
                        Vec::new()
                    } else {
                        asked
                    }
                }
            })
            .await;
        log.into_inner()
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    #[tokio::test(start_paused = true)]
    async fn three_rounds_after_doubling_pauses_then_gives_up() {
        let follow_up = FollowUp::new("test", metrics::OPERATION_RELEASE, PAUSE, far());
        let log = rounds(follow_up, 2, None, || true).await;
        let starts: Vec<Duration> = log.iter().map(|(at, _)| *at).collect();
        assert_eq!(starts, [PAUSE, PAUSE * 3, PAUSE * 7]);
        assert!(log.iter().all(|(_, asked)| asked == &[0, 1]));
    }

    #[tokio::test(start_paused = true)]
    async fn at_once_sends_the_first_round_without_a_pause() {
        let follow_up = FollowUp::new("test", metrics::OPERATION_RELEASE, PAUSE, far()).at_once(0);
        let starts: Vec<Duration> = rounds(follow_up, 1, None, || true)
            .await
            .iter()
            .map(|(at, _)| *at)
            .collect();
        assert_eq!(starts, [Duration::ZERO, PAUSE, PAUSE * 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn stops_once_answered() {
        let follow_up = FollowUp::new("test", metrics::OPERATION_RELEASE, PAUSE, far());
        assert_eq!(rounds(follow_up, 3, Some(2), || true).await.len(), 2);
        assert!(rounds(follow_up, 0, None, || true).await.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn no_round_starts_past_the_expiry() {
        // The second round would start at 300 ms, the expiry is at 250 ms.
        let expires_by = Instant::now() + PAUSE * 5 / 2;
        let follow_up = FollowUp::new("test", metrics::OPERATION_RELEASE, PAUSE, expires_by);
        assert_eq!(rounds(follow_up, 1, None, || true).await.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopped_backend_is_not_asked() {
        let follow_up = FollowUp::new("test", metrics::OPERATION_RELEASE, PAUSE, far());
        assert!(rounds(follow_up, 1, None, || false).await.is_empty());
    }

    #[test]
    fn pauses_double() {
        let follow_up = FollowUp::new("test", metrics::OPERATION_RELEASE, PAUSE, far());
        assert_eq!(
            follow_up.pauses().collect::<Vec<_>>(),
            [PAUSE, PAUSE * 2, PAUSE * 4]
        );
    }

    #[cfg(feature = "metrics")]
    #[tokio::test(start_paused = true)]
    async fn each_message_sent_again_counts_once() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};

        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let counted = || {
            snapshotter
                .snapshot()
                .into_vec()
                .into_iter()
                .filter(|(key, ..)| key.key().name() == metrics::RESENDS)
                .map(|(.., value)| match value {
                    DebugValue::Counter(count) => count,
                    _ => 0,
                })
                .sum::<u64>()
        };
        let _guard = ::metrics::set_default_local_recorder(&recorder);
        // Three nodes that never answer: 3 rounds of 3 messages; the first at once, with one
        // node asked before.
        let follow_up = FollowUp::new("test", metrics::OPERATION_RELEASE, PAUSE, far()).at_once(1);
        rounds(follow_up, 3, None, || true).await;
        assert_eq!(counted(), 1 + 3 + 3);
        // Stopped: nothing sent, nothing counted.
        let follow_up = FollowUp::new("test", metrics::OPERATION_RELEASE, PAUSE, far());
        rounds(follow_up, 3, None, || false).await;
        assert_eq!(counted(), 0);
    }
}

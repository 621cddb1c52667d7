//! One round of a quorum operation: the same request to every node at once, each bounded by
//! the node timeout, decided as soon as a majority for or against exists.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use redis::RedisResult;

use crate::node::Node;

/// One node's answer.
#[derive(Debug)]
pub(crate) enum Vote {
    /// The node did what was asked, answering a number (a fencing counter) or 0.
    Yes(u64),
    /// The node answered, and refused (held by someone else, or not ours any more).
    No,
    /// The node failed or did not answer in time; the request may still have been applied.
    Failed(String),
}

type VoteFuture = Pin<Box<dyn Future<Output = (usize, Vote)> + Send>>;

/// The votes counted so far.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(crate) yes: Vec<usize>,
    /// The highest number among the yes votes.
    pub(crate) highest: u64,
    pub(crate) no: usize,
    pub(crate) failed: Vec<(usize, String)>,
}

impl Tally {
    fn count(&mut self, index: usize, vote: Vote) {
        match vote {
            Vote::Yes(number) => {
                self.yes.push(index);
                self.highest = self.highest.max(number);
            }
            Vote::No => self.no += 1,
            Vote::Failed(error) => self.failed.push((index, error)),
        }
    }

    /// True once `quorum` nodes agreed, or so many refused or failed that they cannot.
    fn decided(&self, nodes: usize, quorum: usize) -> bool {
        self.yes.len() >= quorum || self.no + self.failed.len() > nodes - quorum
    }

    /// A short account of the failures, for error messages.
    pub(crate) fn failures(&self) -> String {
        let failures: Vec<&str> = self
            .failed
            .iter()
            .map(|(_, error)| error.as_str())
            .collect();
        failures.join("; ")
    }
}

/// The requests still in flight when the round was decided.
pub(crate) struct Pending(FuturesUnordered<VoteFuture>);

impl Pending {
    /// Waits for every remaining answer (each is bounded by its node timeout).
    pub(crate) async fn finish(mut self) -> Tally {
        let mut tally = Tally::default();
        while let Some((index, vote)) = self.0.next().await {
            tally.count(index, vote);
        }
        tally
    }

    /// Counts the answers that arrive before `deadline`; later ones stay pending.
    pub(crate) async fn collect_until(&mut self, deadline: tokio::time::Instant) -> Tally {
        let mut tally = Tally::default();
        while !self.0.is_empty() {
            match tokio::time::timeout_at(deadline, self.0.next()).await {
                Ok(Some((index, vote))) => tally.count(index, vote),
                Ok(None) | Err(_) => break,
            }
        }
        tally
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Sends `op` to every node at once and returns as soon as the outcome is decided. `op` answers
/// `Some(number)` for yes (0 unless it reads a counter) and `None` for no.
pub(crate) async fn run<F, Fut>(
    nodes: &[Node],
    quorum: usize,
    timeout: Duration,
    op: F,
) -> (Tally, Pending)
where
    F: Fn(Node) -> Fut,
    Fut: Future<Output = RedisResult<Option<u64>>> + Send + 'static,
{
    let mut pending = FuturesUnordered::new();
    for (index, node) in nodes.iter().enumerate() {
        let label = node.label().to_owned();
        let request = op(node.clone());
        pending.push(Box::pin(async move {
            let vote = match tokio::time::timeout(timeout, request).await {
                Ok(Ok(Some(number))) => Vote::Yes(number),
                Ok(Ok(None)) => Vote::No,
                Ok(Err(error)) => Vote::Failed(format!("{label}: {error}")),
                Err(_) => Vote::Failed(format!(
                    "{label}: no answer within {} ms",
                    timeout.as_millis()
                )),
            };
            (index, vote)
        }) as VoteFuture);
    }
    let mut tally = Tally::default();
    while !tally.decided(nodes.len(), quorum) {
        let Some((index, vote)) = pending.next().await else {
            break;
        };
        if let Vote::Failed(error) = &vote {
            tracing::debug!(%error, "node failed");
        }
        tally.count(index, vote);
    }
    (tally, Pending(pending))
}

//! One round of a quorum operation: the same request to every node at once, each bounded by
//! the node timeout, decided as soon as a majority for or against exists.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use redis::RedisResult;
use smallvec::SmallVec;
use tokio::time::Sleep;

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

/// Nodes of a round, inline up to the usual five (a round allocates nothing for its votes).
pub(crate) type Nodes<T> = SmallVec<[T; 5]>;

/// The votes counted so far.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(crate) yes: Nodes<usize>,
    /// The number each yes vote answered, in the order of `yes`.
    pub(crate) drawn: Nodes<u64>,
    /// The highest number among the yes votes.
    pub(crate) highest: u64,
    pub(crate) no: usize,
    /// The nodes that voted no, in the order they answered.
    pub(crate) no_at: Nodes<usize>,
    pub(crate) failed: Vec<(usize, String)>,
}

impl Tally {
    /// Traces how an acquisition round that began at `started` went (`fair`: a fair waiter's).
    pub(crate) fn trace(&self, started: tokio::time::Instant, fair: bool) {
        tracing::debug!(
            yes = self.yes.len(),
            no = self.no,
            failed = self.failed.len(),
            elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            fair,
            "redlock acquire round"
        );
    }

    fn count(&mut self, index: usize, vote: Vote) {
        match vote {
            Vote::Yes(number) => {
                self.yes.push(index);
                self.drawn.push(number);
                self.highest = self.highest.max(number);
            }
            Vote::No => {
                self.no += 1;
                self.no_at.push(index);
            }
            Vote::Failed(error) => self.failed.push((index, error)),
        }
    }

    /// True once `quorum` nodes agreed, or so many refused or failed that they cannot.
    fn decided(&self, nodes: usize, quorum: usize) -> bool {
        self.yes.len() >= quorum || self.no + self.failed.len() > nodes.saturating_sub(quorum)
    }

    /// The nodes that failed, in this tally and in `late` (the answers counted after it).
    pub(crate) fn failed_with(&self, late: &Tally) -> Vec<usize> {
        self.failed
            .iter()
            .chain(&late.failed)
            .map(|(index, _)| *index)
            .collect()
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

/// The requests still in flight when the round was decided, if any.
pub(crate) struct Pending(Option<InFlight>);

/// Requests in flight under the round's one deadline (every request started at once with the
/// same node timeout, so one timer bounds them all).
struct InFlight {
    votes: FuturesUnordered<VoteFuture>,
    nodes: Vec<Node>,
    answered: Vec<bool>,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
    /// Nodes found unanswered at the deadline, to be reported as failed.
    timed_out: Vec<usize>,
}

impl Pending {
    /// The next answer, or a node's failure to answer by the deadline; `None` when every node
    /// is accounted for.
    async fn next(&mut self) -> Option<(usize, Vote)> {
        self.0.as_mut()?.next().await
    }

    /// Waits for every remaining answer (bounded by the round's deadline).
    pub(crate) async fn finish(mut self) -> Tally {
        let mut tally = Tally::default();
        while let Some((index, vote)) = self.next().await {
            tally.count(index, vote);
        }
        tally
    }

    /// Counts the answers that arrive before `deadline`; later ones stay pending.
    pub(crate) async fn collect_until(&mut self, deadline: tokio::time::Instant) -> Tally {
        let mut tally = Tally::default();
        while !self.is_empty() {
            match tokio::time::timeout_at(deadline, self.next()).await {
                Ok(Some((index, vote))) => tally.count(index, vote),
                Ok(None) | Err(_) => break,
            }
        }
        tally
    }

    /// Lets the requests still in flight run to their answer (bounded by the round's
    /// deadline) in the background: dropped, a request not yet written — one waiting for its
    /// script to be loaded after `NOSCRIPT`, or for its connection — would never reach its
    /// node, which would keep the lease as it was (an extend or a downgrade only on the nodes
    /// that decided the round). The task, if any, to drop the requests not yet written when a
    /// later round supersedes them.
    pub(crate) fn run_on(self) -> Option<tokio::task::JoinHandle<Tally>> {
        (!self.is_empty()).then(|| tokio::spawn(self.finish()))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0
            .as_ref()
            .is_none_or(|flight| flight.votes.is_empty() && flight.timed_out.is_empty())
    }
}

impl InFlight {
    async fn next(&mut self) -> Option<(usize, Vote)> {
        if let Some(index) = self.timed_out.pop() {
            return Some((index, self.no_answer(index)));
        }
        if self.votes.is_empty() {
            return None;
        }
        tokio::select! {
            biased;
            vote = self.votes.next() => {
                let (index, vote) = vote?;
                self.answered[index] = true;
                Some((index, vote))
            }
            () = &mut self.deadline => {
                // The requests still out are dropped: those nodes failed this round.
                self.votes = FuturesUnordered::new();
                self.timed_out = (0..self.nodes.len()).filter(|i| !self.answered[*i]).collect();
                let index = self.timed_out.pop()?;
                Some((index, self.no_answer(index)))
            }
        }
    }

    fn no_answer(&self, index: usize) -> Vote {
        no_answer(&self.nodes[index], self.timeout)
    }
}

fn no_answer(node: &Node, timeout: Duration) -> Vote {
    Vote::Failed(format!(
        "{}: no answer within {} ms",
        node.label(),
        timeout.as_millis()
    ))
}

fn vote(node: &Node, answer: RedisResult<Option<u64>>) -> Vote {
    match answer {
        Ok(Some(number)) => Vote::Yes(number),
        Ok(None) => Vote::No,
        Err(error) => Vote::Failed(format!(
            "{}: {}",
            node.label(),
            lock_core::raw::redis::shown_error(&error)
        )),
    }
}

/// Sends `op` to every node at once and returns as soon as the outcome is decided. `op` answers
/// `Some(number)` for yes (0 unless it reads a counter) and `None` for no. Each node has
/// `timeout` to answer.
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
    let mut tally = Tally::default();
    // No node to ask (a client stopped meanwhile: its nodes are gone): nothing to count.
    if nodes.is_empty() {
        return (tally, Pending(None));
    }
    if let [node] = nodes {
        // One node decides alone: await it directly, without the machinery (and allocations)
        // of a round that may end before every answer is in.
        let vote = match tokio::time::timeout(timeout, op(node.clone())).await {
            Ok(answer) => vote(node, answer),
            Err(_) => no_answer(node, timeout),
        };
        if let Vote::Failed(error) = &vote {
            tracing::debug!(%error, "node failed");
        }
        tally.count(0, vote);
        return (tally, Pending(None));
    }
    let deadline = Box::pin(tokio::time::sleep(timeout));
    let votes = FuturesUnordered::new();
    for (index, node) in nodes.iter().enumerate() {
        let request = op(node.clone());
        let node = node.clone();
        votes.push(Box::pin(async move { (index, vote(&node, request.await)) }) as VoteFuture);
    }
    let mut pending = Pending(Some(InFlight {
        votes,
        nodes: nodes.to_vec(),
        answered: vec![false; nodes.len()],
        timeout,
        deadline,
        timed_out: Vec::new(),
    }));
    while !tally.decided(nodes.len(), quorum) {
        let Some((index, vote)) = pending.next().await else {
            break;
        };
        if let Vote::Failed(error) = &vote {
            tracing::debug!(%error, "node failed");
        }
        tally.count(index, vote);
    }
    (tally, pending)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Broken before: a round over no nodes (an attempt's undo after its client stopped, whose
    /// nodes are then gone) computed `nodes - quorum` = 0 - 1 and panicked in debug builds.
    #[tokio::test]
    async fn a_round_over_no_nodes_counts_nothing() {
        let (tally, pending) = run(&[], 1, Duration::from_millis(10), |_node| async {
            Ok::<_, redis::RedisError>(Some(0))
        })
        .await;
        assert!(tally.yes.is_empty() && tally.no == 0 && tally.failed.is_empty());
        assert!(pending.is_empty());
        assert!(!Tally::default().decided(0, 1));
    }
}

//! The model-based test of the public API on real redis-servers, through the Redlock backend:
//! one node (the plain single-Redis lock, `redis`) and three nodes (`redlock`). Time is real:
//! short locks live 150 ms and time moves in steps of 300 ms, so every expiry the model relies on
//! is decided (see `lock_tests::model`).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use lock_core::{LeaseKind, Result, raw::Lock};
use lock_redlock::{Redlock, RedlockConfig};
use lock_tests::model::{
    self, AfterStop, ClientSetup, ModelConfig, Naming, Refusal, Target, Timing,
};
use lock_tests::server::{RedisServer, redis_or_skip};

/// Redlock over `servers`, emptied before each case; each client gets its own backend value
/// (so stopping one client closes only its connections). `fencing` forces fencing on every
/// client (otherwise each client draws it).
struct Nodes {
    label: &'static str,
    servers: Vec<RedisServer>,
    fencing: bool,
}

impl Target for Nodes {
    fn label(&self) -> String {
        format!(
            "{} ({} node(s){})",
            self.label,
            self.servers.len(),
            if self.fencing { ", fencing" } else { "" }
        )
    }

    fn timing(&self) -> Timing {
        Timing::Real
    }

    fn naming(&self) -> Naming {
        Naming::Plain
    }

    fn guards_after_stop(&self) -> AfterStop {
        AfterStop::Stopped
    }

    fn other_kind_refusal(&self, _asked: LeaseKind) -> Refusal {
        // The README: every script looks at the key's type and marker first ("A key is one
        // kind of lock"). Over several nodes a key may be held differently on a node that
        // missed a round, so only one node is held to it.
        if self.servers.len() == 1 {
            Refusal::Mismatch
        } else {
            Refusal::Either
        }
    }

    fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }

    fn reset(&self) -> std::result::Result<(), String> {
        for server in &self.servers {
            match server.command("FLUSHALL", Duration::from_secs(5)) {
                Ok(reply) if reply == "+OK" => {}
                other => return Err(format!("FLUSHALL on port {}: {other:?}", server.port())),
            }
        }
        Ok(())
    }

    async fn backend(&self, setup: &ClientSetup) -> Result<Arc<dyn Lock>> {
        // Node timeouts far above any answer on loopback: a slow machine must not turn into
        // failed votes (the model is about semantics, not latency).
        let config = RedlockConfig::new(self.servers.iter().map(RedisServer::url))
            .with_node_timeout(Duration::from_secs(2))
            .with_fencing(self.fencing || setup.fencing);
        Ok(Arc::new(Redlock::new(config)?))
    }
}

/// The model over `nodes` fresh servers; with `leases`, lease steps too.
fn run(label: &'static str, nodes: usize, fencing: bool, leases: bool) {
    let Some(binary) = redis_or_skip(label) else {
        return;
    };
    let servers = (0..nodes)
        .map(|_| RedisServer::start(&binary, &[]).expect("redis-server starts"))
        .collect();
    let target = Nodes {
        label,
        servers,
        fencing,
    };
    let mut config = ModelConfig::from_env(64, 12).without_purge();
    if leases {
        config = config.with_leases();
    }
    let report = model::check(&target, &config).unwrap_or_else(|failure| panic!("{failure}"));
    println!("model {}: {report}", target.label());
}

#[test]
fn redis_with_one_node_follows_the_model() {
    run("redis", 1, false, false);
}

#[test]
fn redlock_with_three_nodes_follows_the_model() {
    run("redlock", 3, false, false);
}

/// Semaphores, read-write locks and downgrades beside mutexes (see `lock_tests::model`).
#[test]
fn redis_leases_with_one_node_follow_the_model() {
    run("redis leases", 1, false, true);
}

#[test]
fn redlock_leases_with_three_fenced_nodes_follow_the_model() {
    run("redlock leases", 3, true, true);
}

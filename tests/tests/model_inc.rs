//! The model-based test of the public API on real redis-servers, through the inc backend: one
//! server, and a Redis Cluster of three primaries. Each client has its own prefix, drawn with
//! glob characters and hash-tag braces, so the model also checks what the store's key names
//! make collide and what purge matches. Time is real (see `lock_tests::model`).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use lock_core::{LeaseKind, Result, raw::Lock};
use lock_inc::{IncConfig, IncLock};
use lock_tests::model::{
    self, AfterStop, ClientSetup, ModelConfig, Naming, Refusal, Target, Timing,
};
use lock_tests::server::{RedisServer, cluster_url, redis_or_skip, start_cluster};

/// inc over a server or a cluster, emptied before each case; each client connects on its own.
struct Inc {
    label: &'static str,
    url: String,
    servers: Vec<RedisServer>,
}

impl Target for Inc {
    fn label(&self) -> String {
        self.label.to_owned()
    }

    fn timing(&self) -> Timing {
        Timing::Real
    }

    fn naming(&self) -> Naming {
        Naming::HashTagged
    }

    fn guards_after_stop(&self) -> AfterStop {
        AfterStop::Stopped
    }

    fn cluster(&self) -> bool {
        self.url.starts_with("redis-cluster://")
    }

    fn other_kind_refusal(&self, asked: LeaseKind) -> Refusal {
        // The README: a mutex asked on a semaphore or read-write lock finds it held; a lease
        // asked on another kind is `KindMismatch`.
        if asked == LeaseKind::Exclusive {
            Refusal::Held
        } else {
            Refusal::Mismatch
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
        let mut config = IncConfig::new(self.url.clone());
        config.prefix = setup.prefix.clone();
        // Far above any answer on loopback (the model is about semantics, not latency).
        config.command_timeout = 1_000;
        Ok(Arc::new(IncLock::connect(config).await?))
    }
}

/// The model on `target`; with `leases`, lease steps too.
fn run(target: &Inc, leases: bool) {
    let mut config = ModelConfig::from_env(64, 12).without_multi_key();
    if leases {
        config = config.with_leases();
    }
    let report = model::check(target, &config).unwrap_or_else(|failure| panic!("{failure}"));
    println!("model {}: {report}", target.label);
}

fn on_one_server(label: &'static str, leases: bool) {
    let Some(binary) = redis_or_skip(label) else {
        return;
    };
    let server = RedisServer::start(&binary, &[]).expect("redis-server starts");
    let target = Inc {
        label,
        url: server.url(),
        servers: vec![server],
    };
    run(&target, leases);
}

fn on_a_cluster(label: &'static str, leases: bool) {
    let Some(binary) = redis_or_skip(label) else {
        return;
    };
    let servers = start_cluster(&binary, 3).expect("cluster");
    let url = cluster_url(&servers);
    let target = Inc {
        label,
        url,
        servers,
    };
    run(&target, leases);
}

#[test]
fn inc_on_one_server_follows_the_model() {
    on_one_server("inc", false);
}

#[test]
fn inc_on_a_cluster_follows_the_model() {
    on_a_cluster("inc (cluster of 3)", false);
}

/// Semaphores, read-write locks and downgrades beside mutexes (see `lock_tests::model`).
#[test]
fn inc_leases_on_one_server_follow_the_model() {
    on_one_server("inc leases", true);
}

#[test]
fn inc_leases_on_a_cluster_follow_the_model() {
    on_a_cluster("inc leases (cluster of 3)", true);
}

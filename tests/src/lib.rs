//! Workspace-level test support: real `redis-server` processes for the Redis backends' tests,
//! and the helpers shared by cross-backend and fault tests.
//!
//! Everything here talks to 127.0.0.1 only.
#![forbid(unsafe_code)]

pub mod backed;
pub mod clock;
pub mod explore;
pub mod fair;
pub mod history;
pub mod inc_kit;
pub mod model;
pub mod nodes;
pub mod proxy;
pub mod pubsub;
pub mod script_diff;
pub mod server;
pub mod tls;
pub mod workers;

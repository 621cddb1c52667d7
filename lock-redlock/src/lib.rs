//! The Redlock backend: a lock over a quorum of N independent Redis nodes.
//!
//! This crate is a placeholder in the workspace layout: the algorithm lands with the
//! lock-redlock issue. Until then it exposes only its name.
#![forbid(unsafe_code)]

/// The backend's name in messages and configuration.
pub const NAME: &str = "redlock";

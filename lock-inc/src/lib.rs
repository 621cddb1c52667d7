//! The INCR optimistic lock: `INCR` on the lock key, 1 means held, more means "resource locked".
//!
//! This crate is a placeholder in the workspace layout: the backend lands with the lock-inc
//! issue. Until then it exposes only its name.
#![forbid(unsafe_code)]

/// The backend's name in messages and configuration.
pub const NAME: &str = "inc";

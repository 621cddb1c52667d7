#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

#[doc(inline)]
pub use lock_core::*;

/// The in-process backend (feature `memory`).
#[cfg(feature = "memory")]
#[doc(inline)]
pub use lock_memory as memory;

//! The kit for backend authors, as OpenDAL's `raw`: what a backend implements and the helpers
//! every backend shares. Users of locks need none of it: they hold a [`Locker`](crate::Locker)
//! and the items at the crate's root.

mod follow_up;
pub mod redis;

pub use follow_up::{FOLLOW_UP_ROUNDS, FollowUp};

//! The conformance suite: every behaviour a lock backend must have, as plain async functions.
//!
//! Any backend, ours or a user's, runs the whole suite with a dev-dependency on `lock-core`
//! (feature `conformance`), `tokio` (features `macros`, `rt-multi-thread`) and one macro call:
//!
//! ```ignore
//! lock_core::conformance_tests!(async { my_backend::MyLock::new() });
//! ```
//!
//! The macro expands to one `#[tokio::test]` per case, then runs every case a second time
//! through `Arc<dyn Lock>` (module `through_dyn`). The expression is evaluated once per test;
//! it may be an `async` block (e.g. to connect to a server).
//!
//! Each case runs under a fresh random namespace, so cases can share one store, and picks itself
//! by capability: a case whose capability the backend lacks prints why and returns. Cases fail
//! by panicking, as tests do. Timings use ttls of a few hundred milliseconds and real time, so
//! that networked backends run the same cases.

mod cases;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use cases::*;

use crate::Lock;

/// How long one case may run before it counts as hung.
pub const CASE_TIMEOUT: Duration = Duration::from_secs(120);

/// A boxed case future.
pub type CaseFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One conformance case.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    /// The case's name, equal to its function's.
    pub name: &'static str,
    /// The capability it needs, if any (see [`Capabilities`](crate::Capabilities)).
    pub requires: Option<&'static str>,
    /// Runs it against a backend.
    pub run: fn(Arc<dyn Lock>) -> CaseFuture,
}

macro_rules! registry {
    ($($name:ident => $requires:expr),* $(,)?) => {
        /// Every case, in the order the macro runs them.
        pub const CASES: &[Case] = &[
            $(Case { name: stringify!($name), requires: $requires, run: |lock| Box::pin(cases::$name(lock)) },)*
        ];
    };
}

registry! {
    acquire_release => None,
    mutual_exclusion => None,
    ttl_expiry_lets_next_holder_in => None,
    extend_prolongs => Some("extend"),
    expired_holder_cannot_release_or_extend => None,
    try_acquire_on_held_key => None,
    retry_exhaustion_times_out_within_deadline => None,
    single_attempt_returns_locked_at_once => None,
    namespace_isolation => None,
    guard_drop_releases => None,
    cancelled_acquire_leaves_nothing => None,
    token_uniqueness => None,
    bad_input_rejected => None,
    unicode_and_hostile_keys => None,
    with_lock_runs_and_releases => None,
    multi_key_all_or_nothing => Some("multi_key"),
    fencing_tokens_increase => Some("fencing"),
    waiters_wake_on_release => Some("wake_on_release"),
    watchdog_keeps_the_lock_alive => Some("extend"),
    lost_signal_fires_when_the_lock_is_taken_away => None,
    immediate_and_awaited_answers_agree => None,
}

/// Runs the case called `name` against `lock`, bounded by [`CASE_TIMEOUT`].
///
/// # Panics
/// When the case fails, hangs, or no case has that name.
pub async fn run(name: &str, lock: Arc<dyn Lock>) {
    let Some(case) = CASES.iter().find(|case| case.name == name) else {
        panic!("no conformance case named `{name}`");
    };
    if tokio::time::timeout(CASE_TIMEOUT, (case.run)(lock))
        .await
        .is_err()
    {
        panic!("conformance case `{name}` hung for {CASE_TIMEOUT:?}");
    }
}

/// Expands to one test per conformance case against the backend built by `$factory`, then the
/// same cases through `Arc<dyn Lock>` in a module `through_dyn`.
///
/// `$factory` is an expression whose value is a future resolving to the backend (write
/// `async { MyLock::new() }`); it is evaluated once per test.
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::__conformance_tests_with!(
            $factory;
            acquire_release,
            mutual_exclusion,
            ttl_expiry_lets_next_holder_in,
            extend_prolongs,
            expired_holder_cannot_release_or_extend,
            try_acquire_on_held_key,
            retry_exhaustion_times_out_within_deadline,
            single_attempt_returns_locked_at_once,
            namespace_isolation,
            guard_drop_releases,
            cancelled_acquire_leaves_nothing,
            token_uniqueness,
            bad_input_rejected,
            unicode_and_hostile_keys,
            with_lock_runs_and_releases,
            multi_key_all_or_nothing,
            fencing_tokens_increase,
            waiters_wake_on_release,
            watchdog_keeps_the_lock_alive,
            lost_signal_fires_when_the_lock_is_taken_away,
            immediate_and_awaited_answers_agree,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_tests_with {
    ($factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let lock: ::std::sync::Arc<dyn $crate::Lock> = ::std::sync::Arc::new($factory.await);
                $crate::conformance::run(stringify!($case), lock).await;
            }
        )*

        #[test]
        fn conformance_macro_covers_every_case() {
            let listed: &[&str] = &[$(stringify!($case)),*];
            let registered: ::std::vec::Vec<&str> =
                $crate::conformance::CASES.iter().map(|case| case.name).collect();
            assert_eq!(listed, registered.as_slice());
        }

        /// The same cases, with the backend behind one more `Arc<dyn Lock>`.
        mod through_dyn {
            #[allow(unused_imports)]
            use super::*;

            $(
                #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let inner: ::std::sync::Arc<dyn $crate::Lock> = ::std::sync::Arc::new($factory.await);
                    let lock: ::std::sync::Arc<dyn $crate::Lock> = ::std::sync::Arc::new(inner);
                    $crate::conformance::run(stringify!($case), lock).await;
                }
            )*
        }
    };
}

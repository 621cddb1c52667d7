//! The conformance suite: every behaviour a lock backend must have, as plain async functions.
//!
//! Any backend, ours or a user's, runs the whole suite with a dev-dependency on `lock-core`
//! (feature `conformance`), `tokio` (features `macros`, `rt-multi-thread`) and one macro call
//! that names the backend and the capabilities it reports:
//!
//! ```
//! # mod my_backend { pub use lock_memory::MemoryLock as MyLock; }
//! lock_core::conformance_tests!(
//!     async { my_backend::MyLock::new() },
//!     capabilities: [extend, multi_key, fencing, wake_on_release, purge],
//! );
//! # // A doctest has no test harness, so the tests above are compiled but not run: run one of
//! # // their cases through `run` instead, on the same backend.
//! # fn main() {
//! #     let runtime = tokio::runtime::Runtime::new().unwrap();
//! #     let lock = std::sync::Arc::new(my_backend::MyLock::new());
//! #     let outcome = runtime.block_on(lock_core::conformance::run("acquire_release", lock));
//! #     assert_eq!(outcome, lock_core::conformance::Outcome::Passed);
//! # }
//! ```
//!
//! A backend with no optional capability ([`Capabilities::NONE`](crate::Capabilities::NONE)) may
//! leave the list out: `conformance_tests!(async { MyLock::new() })`.
//!
//! # What the macro expands to
//! - One `#[tokio::test]` per case of [`CASES`], named after the case, then every case a second
//!   time through one more `Arc<dyn Lock>` (module `through_dyn`). The expression is evaluated
//!   once per test; it may be an `async` block (e.g. to connect to a server).
//! - A case that does not apply to the declared capabilities is still a test, marked
//!   ``#[ignore = "needs `fencing`"]`` (or ``"only for backends without `multi_key`"``), so
//!   `cargo test` lists it as ignored, with the reason, and counts it apart from the cases that
//!   passed. `cargo test -- --include-ignored` runs it anyway, and it fails, saying which
//!   capability the backend lacks.
//! - One more test, `conformance_capabilities_are_declared`, fails unless the backend's
//!   [`Lock::capabilities`] are exactly the declared list, so the list cannot silently go stale
//!   (a capability the backend gains without declaring it would leave its cases ignored).
//!
//! Capabilities are a property of a backend *instance* (a Redlock with or without
//! `wake_on_release`), known only at run time, while libtest decides what is ignored when the
//! tests are compiled. Hence the declaration, checked against the instance at run time, rather
//! than a case that finds out at run time, prints a note and passes.
//!
//! # Selecting cases without the macro
//! [`run`] runs one case by name and selects by capability itself: a case that does not apply to
//! `lock.capabilities()` is not run and returns [`Outcome::Skipped`] with the reason.
//!
//! # The registry
//! Each case is listed once, in `__conformance_cases!` in this module: its name (equal to its
//! function's, in `cases.rs`), the capabilities it `needs`, and those it is only meant for
//! backends `without` (cases about how a backend refuses what it cannot do). [`CASES`] and the
//! macro's tests are both made from that list. A new case (semaphores, read-write locks) is one
//! line there and one function; every backend picks it up, ignored where it does not apply.
//!
//! Each case runs under a fresh random namespace, so cases can share one store. Cases fail by
//! panicking, as tests do. Timings use ttls of a few hundred milliseconds and real time, so that
//! networked backends run the same cases.

mod cases;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use cases::*;

use crate::{Capabilities, raw::Lock};

/// How long one case may run before it counts as hung.
pub const CASE_TIMEOUT: Duration = Duration::from_secs(120);

/// A boxed case future.
pub type CaseFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One flag of [`Capabilities`], by name, as a case requires it.
#[derive(Clone, Copy)]
pub struct Flag {
    /// The field's name in [`Capabilities`].
    pub name: &'static str,
    /// Reads the flag.
    pub is_set: fn(&Capabilities) -> bool,
}

impl fmt::Debug for Flag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// One conformance case.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    /// The case's name, equal to its function's.
    pub name: &'static str,
    /// Capabilities the backend must have for the case to apply.
    pub needs: &'static [Flag],
    /// Capabilities the backend must not have: the case checks how a backend refuses what it
    /// cannot do.
    pub without: &'static [Flag],
    /// Runs it against a backend.
    pub run: fn(Arc<dyn Lock>) -> CaseFuture,
}

impl Case {
    /// Why the case does not apply to a backend with `capabilities`, or `None` when it does.
    pub fn unmet(&self, capabilities: &Capabilities) -> Option<Unmet> {
        if let Some(flag) = self.needs.iter().find(|flag| !(flag.is_set)(capabilities)) {
            return Some(Unmet::Needs(flag.name));
        }
        self.without
            .iter()
            .find(|flag| (flag.is_set)(capabilities))
            .map(|flag| Unmet::OnlyWithout(flag.name))
    }
}

/// Why a case does not apply to a backend; its `Display` is the reason the macro gives libtest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unmet {
    /// The backend lacks this capability, which the case needs.
    Needs(&'static str),
    /// The backend has this capability; the case is for backends without it.
    OnlyWithout(&'static str),
}

impl fmt::Display for Unmet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Needs(flag) => write!(f, "needs `{flag}`"),
            Self::OnlyWithout(flag) => write!(f, "only for backends without `{flag}`"),
        }
    }
}

/// What [`run`] did with a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Outcome {
    /// The case ran and passed (a failing case panics).
    Passed,
    /// The case does not apply to the backend's capabilities and was not run.
    Skipped(Unmet),
}

/// The registry: every case, once. Read it as [`CASES`]; the macros expand from it.
///
/// Each line is `name => needs [flags], without [flags]`. It hands the list to the macro named
/// first, after the tokens that follow the `;`.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_cases {
    ($($callback:tt)::+ ; $($args:tt)*) => {
        $($callback)::+! {
            $($args)*;
            acquire_release => needs [], without [],
            mutual_exclusion => needs [], without [],
            ttl_expiry_lets_next_holder_in => needs [], without [],
            extend_prolongs => needs [extend], without [],
            expired_holder_cannot_release_or_extend => needs [], without [],
            try_acquire_on_held_key => needs [], without [],
            retry_exhaustion_times_out_within_deadline => needs [], without [],
            single_attempt_returns_locked_at_once => needs [], without [],
            namespace_isolation => needs [], without [],
            guard_drop_releases => needs [], without [],
            cancelled_acquire_leaves_nothing => needs [], without [],
            token_uniqueness => needs [], without [],
            bad_input_rejected => needs [], without [],
            unicode_and_hostile_keys => needs [], without [],
            with_lock_runs_and_releases => needs [], without [],
            multi_key_all_or_nothing => needs [multi_key], without [],
            multi_key_refused_without_the_capability => needs [], without [multi_key],
            fencing_tokens_increase => needs [fencing], without [],
            waiters_wake_on_release => needs [wake_on_release], without [],
            watchdog_keeps_the_lock_alive => needs [extend], without [],
            lost_signal_fires_when_the_lock_is_taken_away => needs [], without [],
            immediate_and_awaited_answers_agree => needs [], without [],
            an_answer_dropped_unpolled_does_nothing => needs [], without [],
            semaphore_admits_at_most_its_permits => needs [semaphore], without [],
            permits_are_leases => needs [semaphore], without [],
            expired_permit_is_powerless => needs [semaphore], without [],
            cancelled_permit_waits_leave_nothing => needs [semaphore], without [],
            a_key_is_one_kind_of_lock => needs [semaphore], without [],
            semaphore_refused_without_the_capability => needs [], without [semaphore],
            readers_share_and_writers_exclude => needs [read_write], without [],
            read_write_exclusion_under_contention => needs [read_write], without [],
            waiting_writer_is_not_starved => needs [read_write], without [],
            a_writer_that_stops_waiting_lets_readers_in => needs [read_write], without [],
            downgrade_keeps_the_lock_and_lets_readers_in => needs [read_write], without [],
            expired_reader_is_powerless => needs [read_write], without [],
            read_write_refused_without_the_capability => needs [], without [read_write],
        }
    };
}

macro_rules! cases_const {
    (; $($name:ident => needs [$($need:ident),*], without [$($without:ident),*],)*) => {
        /// Every case, in the order the macro runs them.
        pub const CASES: &[Case] = &[
            $(Case {
                name: stringify!($name),
                needs: &[$(Flag { name: stringify!($need), is_set: |c| c.$need }),*],
                without: &[$(Flag { name: stringify!($without), is_set: |c| c.$without }),*],
                run: |lock| Box::pin(cases::$name(lock)),
            },)*
        ];

        // Every capability a case selects by must be known to `__conformance_flag!`, which
        // gives libtest its reason as a literal: checked here, when lock-core compiles.
        $($(crate::__conformance_flag!($need [] { check });)*)*
        $($(crate::__conformance_flag!($without [] { check });)*)*
    };
}

crate::__conformance_cases!(cases_const;);

/// Runs the case called `name` against `lock` if it applies to `lock.capabilities()`, bounded by
/// [`CASE_TIMEOUT`].
///
/// # Panics
/// When the case fails, hangs, or no case has that name.
pub async fn run(name: &str, lock: Arc<dyn Lock>) -> Outcome {
    let Some(case) = CASES.iter().find(|case| case.name == name) else {
        panic!("no conformance case named `{name}`");
    };
    if let Some(unmet) = case.unmet(&lock.capabilities()) {
        return Outcome::Skipped(unmet);
    }
    if tokio::time::timeout(CASE_TIMEOUT, (case.run)(lock))
        .await
        .is_err()
    {
        panic!("conformance case `{name}` hung for {CASE_TIMEOUT:?}");
    }
    Outcome::Passed
}

/// The body of one test of [`conformance_tests!`](crate::conformance_tests): runs the case,
/// which must apply (libtest already left out those that do not apply to the declaration).
#[doc(hidden)]
pub async fn __test(name: &str, lock: Arc<dyn Lock>) {
    let backend = lock.name();
    if let Outcome::Skipped(unmet) = run(name, lock).await {
        panic!(
            "conformance case `{name}` cannot run on the {backend} backend: it {unmet} \
             (check the capabilities given to `conformance_tests!`)"
        );
    }
}

/// The test `conformance_capabilities_are_declared`: the backend reports exactly the declared
/// capabilities.
#[doc(hidden)]
pub fn __check_declared(lock: &dyn Lock, declared: &Capabilities) {
    let reported = lock.capabilities();
    assert!(
        &reported == declared,
        "the {} backend reports {reported:?}, but `conformance_tests!` declares {declared:?}: \
         list exactly the flags it reports, as in `conformance_tests!(<backend>, capabilities: \
         [extend, fencing])`",
        lock.name()
    );
}

/// Expands to one test per conformance case against the backend built by `$factory`, then the
/// same cases through `Arc<dyn Lock>` in a module `through_dyn` (see the [module
/// docs](crate::conformance)).
///
/// `$factory` is an expression whose value is a future resolving to the backend (write
/// `async { MyLock::new() }`); it is evaluated once per test. `capabilities: [..]` lists the
/// [`Capabilities`](crate::Capabilities) flags the backend reports (none when left out); cases
/// that do not apply to them are ignored, with the reason.
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr, capabilities: [$($flag:ident),* $(,)?] $(,)?) => {
        $crate::__conformance_cases!($crate::__conformance_tests_with; ($factory) [$($flag)*]);
    };
    ($factory:expr $(,)?) => {
        $crate::conformance_tests!($factory, capabilities: []);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_tests_with {
    (
        ($factory:expr) $declared:tt;
        $($case:ident => needs [$($need:ident),*], without [$($without:ident),*],)*
    ) => {
        $(
            $crate::__conformance_case! {
                { needs [$($need)*] without [$($without)*] declared $declared }
                async fn $case() {
                    let lock: ::std::sync::Arc<dyn $crate::raw::Lock> = ::std::sync::Arc::new($factory.await);
                    $crate::conformance::__test(stringify!($case), lock).await;
                }
            }
        )*

        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn conformance_capabilities_are_declared() {
            let lock = $factory.await;
            let declared = $crate::__conformance_declared!($declared);
            $crate::conformance::__check_declared(&lock, &declared);
        }

        /// The same cases, with the backend behind one more `Arc<dyn Lock>`.
        mod through_dyn {
            #[allow(unused_imports)]
            use super::*;

            $(
                $crate::__conformance_case! {
                    { needs [$($need)*] without [$($without)*] declared $declared }
                    async fn $case() {
                        let inner: ::std::sync::Arc<dyn $crate::raw::Lock> = ::std::sync::Arc::new($factory.await);
                        let lock: ::std::sync::Arc<dyn $crate::raw::Lock> = ::std::sync::Arc::new(inner);
                        $crate::conformance::__test(stringify!($case), lock).await;
                    }
                }
            )*
        }
    };
}

/// The declared flags as a [`Capabilities`](crate::Capabilities) value (an unknown flag is a
/// compile error: no such field).
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_declared {
    ([$($flag:ident)*]) => {{
        #[allow(unused_mut)]
        let mut declared = $crate::Capabilities::NONE;
        $(declared.$flag = true;)*
        declared
    }};
}

/// One test of one case: plain when every requirement is met by the declared flags, otherwise
/// marked ignored with the first unmet requirement as the reason.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_case {
    ({ needs [] without [] declared $declared:tt } $($test:tt)*) => {
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $($test)*
    };
    ({ needs [$need:ident $($needs:ident)*] without $without:tt declared [$($declared:ident)*] } $($test:tt)*) => {
        $crate::__conformance_flag!($need [$($declared)*] {
            needs { needs [$($needs)*] without $without declared [$($declared)*] } $($test)*
        });
    };
    ({ needs [] without [$flag:ident $($without:ident)*] declared [$($declared:ident)*] } $($test:tt)*) => {
        $crate::__conformance_flag!($flag [$($declared)*] {
            without { needs [] without [$($without)*] declared [$($declared)*] } $($test)*
        });
    };
}

/// Whether a flag is among the declared ones, handed on with the reasons libtest shows (they must
/// be literals, hence one pair of rules per flag that selects a case; the registry checks that
/// each such flag has them).
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_flag {
    (extend [extend $($rest:ident)*] $then:tt) => { $crate::__conformance_then!($then present "needs `extend`" "only for backends without `extend`"); };
    (extend [] $then:tt) => { $crate::__conformance_then!($then absent "needs `extend`" "only for backends without `extend`"); };
    (multi_key [multi_key $($rest:ident)*] $then:tt) => { $crate::__conformance_then!($then present "needs `multi_key`" "only for backends without `multi_key`"); };
    (multi_key [] $then:tt) => { $crate::__conformance_then!($then absent "needs `multi_key`" "only for backends without `multi_key`"); };
    (fencing [fencing $($rest:ident)*] $then:tt) => { $crate::__conformance_then!($then present "needs `fencing`" "only for backends without `fencing`"); };
    (fencing [] $then:tt) => { $crate::__conformance_then!($then absent "needs `fencing`" "only for backends without `fencing`"); };
    (wake_on_release [wake_on_release $($rest:ident)*] $then:tt) => { $crate::__conformance_then!($then present "needs `wake_on_release`" "only for backends without `wake_on_release`"); };
    (wake_on_release [] $then:tt) => { $crate::__conformance_then!($then absent "needs `wake_on_release`" "only for backends without `wake_on_release`"); };
    (semaphore [semaphore $($rest:ident)*] $then:tt) => { $crate::__conformance_then!($then present "needs `semaphore`" "only for backends without `semaphore`"); };
    (semaphore [] $then:tt) => { $crate::__conformance_then!($then absent "needs `semaphore`" "only for backends without `semaphore`"); };
    (read_write [read_write $($rest:ident)*] $then:tt) => { $crate::__conformance_then!($then present "needs `read_write`" "only for backends without `read_write`"); };
    (read_write [] $then:tt) => { $crate::__conformance_then!($then absent "needs `read_write`" "only for backends without `read_write`"); };
    ($flag:ident [$other:ident $($rest:ident)*] $then:tt) => { $crate::__conformance_flag!($flag [$($rest)*] $then); };
    ($flag:ident [] $then:tt) => {
        ::core::compile_error!(::core::concat!(
            "conformance: no rules for the capability `", ::core::stringify!($flag),
            "` in `__conformance_flag!`: add a `present` and an `absent` rule for it"
        ));
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_then {
    ({ check } $presence:ident $needs:literal $without:literal) => {};
    ({ needs $rest:tt $($test:tt)* } present $needs:literal $without:literal) => {
        $crate::__conformance_case! { $rest $($test)* }
    };
    ({ needs $rest:tt $($test:tt)* } absent $needs:literal $without:literal) => {
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        #[ignore = $needs]
        $($test)*
    };
    ({ without $rest:tt $($test:tt)* } present $needs:literal $without:literal) => {
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        #[ignore = $without]
        $($test)*
    };
    ({ without $rest:tt $($test:tt)* } absent $needs:literal $without:literal) => {
        $crate::__conformance_case! { $rest $($test)* }
    };
}

#[cfg(test)]
mod tests {
    use async_trait::async_trait;

    use super::*;
    use crate::{
        Result,
        raw::{Acquired, Answer, LockRequest},
    };

    /// A backend that reports capabilities and takes nothing: enough to select cases by.
    #[derive(Debug)]
    struct Reports(Capabilities);

    #[async_trait]
    impl Lock for Reports {
        fn name(&self) -> &'static str {
            "reports"
        }
        fn capabilities(&self) -> Capabilities {
            self.0
        }
        fn try_acquire<'a>(&'a self, _request: &'a LockRequest) -> Answer<'a, Acquired> {
            Answer::ready(Ok(None))
        }
        fn abandon<'a>(&'a self, _request: &'a LockRequest) -> Answer<'a, Result<bool>> {
            Answer::ready(Ok(false))
        }
    }

    #[tokio::test]
    async fn run_leaves_out_a_case_the_backend_cannot_run() {
        let lock: Arc<dyn Lock> = Arc::new(Reports(Capabilities::NONE.with_multi_key()));
        assert_eq!(
            run("fencing_tokens_increase", Arc::clone(&lock)).await,
            Outcome::Skipped(Unmet::Needs("fencing"))
        );
        assert_eq!(
            run("multi_key_refused_without_the_capability", lock).await,
            Outcome::Skipped(Unmet::OnlyWithout("multi_key"))
        );
    }

    #[test]
    fn the_declaration_must_be_exactly_what_the_backend_reports() {
        let reports = Reports(Capabilities::NONE.with_extend().with_fencing());
        let declared = crate::__conformance_declared!([extend fencing]);
        __check_declared(&reports, &declared);
        for wrong in [
            crate::__conformance_declared!([]),
            crate::__conformance_declared!([extend]),
            crate::__conformance_declared!([extend fencing multi_key]),
        ] {
            let outcome = std::panic::catch_unwind(|| __check_declared(&reports, &wrong));
            let message = outcome
                .expect_err("a wrong declaration must fail")
                .downcast::<String>()
                .map(|message| *message)
                .unwrap_or_default();
            assert!(
                message.contains("but `conformance_tests!` declares"),
                "{message}"
            );
        }
    }

    #[test]
    fn case_names_are_unique() {
        let mut names: Vec<&str> = CASES.iter().map(|case| case.name).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "a case is listed twice");
    }

    #[test]
    fn a_case_applies_by_capability() {
        let case = |name: &str| {
            *CASES
                .iter()
                .find(|case| case.name == name)
                .unwrap_or_else(|| panic!("no case {name}"))
        };
        let none = Capabilities::NONE;
        let multi = Capabilities::NONE.with_multi_key().with_extend();
        assert_eq!(
            case("multi_key_all_or_nothing").unmet(&none),
            Some(Unmet::Needs("multi_key"))
        );
        assert_eq!(case("multi_key_all_or_nothing").unmet(&multi), None);
        assert_eq!(
            case("multi_key_refused_without_the_capability").unmet(&multi),
            Some(Unmet::OnlyWithout("multi_key"))
        );
        assert_eq!(
            case("multi_key_refused_without_the_capability").unmet(&none),
            None
        );
        assert_eq!(case("acquire_release").unmet(&none), None);
        assert_eq!(
            Unmet::Needs("fencing").to_string(),
            "needs `fencing`",
            "the reason `run` gives must read as the macro's"
        );
    }
}

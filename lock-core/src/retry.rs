//! The retry policy: how often, how long and how far apart acquisition attempts are made.

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{LockError, Result};
use crate::raw::validate;

/// The longest single pause between two attempts that a policy may ask for.
const MAX_DELAY_LIMIT: Duration = Duration::from_secs(60 * 60);

/// How many times to retry after the first attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryCount {
    /// At most this many retries (so `n + 1` attempts in all); `0` means a single attempt.
    Limited(u32),
    /// Retry until the lock is won or the deadline passes: the seeds' `retryCount = -1`.
    Forever,
}

impl RetryCount {
    /// Reads the seeds' `retryCount`: retries after the first attempt, `-1` for forever.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming `retry_count` for any other negative number.
    pub fn from_seed(count: i64) -> Result<Self> {
        match count {
            -1 => Ok(Self::Forever),
            n => u32::try_from(n).map(Self::Limited).map_err(|_| {
                LockError::invalid(
                    "retry_count",
                    format!("{n} is not a retry count; use 0 or more, or -1 for forever"),
                )
            }),
        }
    }
}

/// A retry policy is data: build it once, share it, and ask it for delays.
///
/// The wait before retry `n` (1-based) is `retry_delay × backoff_factor^(n-1)`, capped at
/// `max_delay`, plus a uniform random jitter in `[0, retry_jitter]`; the whole acquisition stops at
/// `deadline` if one is set. Backends that push wake-ups (the in-memory lock) cut each wait short
/// when the key is released. Every early wake-up is followed by an attempt (and counts as a
/// retry); from the third in a row that found the key still held, that attempt waits 1 ms,
/// 2 ms, 4 ms, … first, at most to the end of the current delay, until a wait lasts to its end:
/// a waiter that keeps losing races may then be one delay late for a release
/// (`lock-core/tests/attack_s35a.rs`), never more.
///
/// # Default
/// - `retry_count`: 10 retries (node-redlock's default)
/// - `retry_delay`: 200 ms
/// - `retry_jitter`: 100 ms
/// - `backoff_factor`: 1.0 (constant delay, as in the seeds)
/// - `max_delay`: 5 s
/// - `deadline`: none
///
/// In configuration files durations are whole milliseconds, and the seeds' camelCase names
/// (`retryCount`, `retryDelay`, `retryJitter`) are accepted as aliases.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RetryPolicyConfig", into = "RetryPolicyConfig")]
pub struct RetryPolicy {
    retry_count: RetryCount,
    retry_delay: Duration,
    retry_jitter: Duration,
    backoff_factor: f64,
    max_delay: Duration,
    deadline: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            retry_count: RetryCount::Limited(10),
            retry_delay: Duration::from_millis(200),
            retry_jitter: Duration::from_millis(100),
            backoff_factor: 1.0,
            max_delay: Duration::from_secs(5),
            deadline: None,
        }
    }
}

impl RetryPolicy {
    /// One attempt and no retry: the fail-fast policy of the INCR lock.
    pub fn none() -> Self {
        Self::default().with_retry_count(RetryCount::Limited(0))
    }

    /// Retry until the lock is won (bound it with [`RetryPolicy::with_deadline`]).
    pub fn forever() -> Self {
        Self::default().with_retry_count(RetryCount::Forever)
    }

    /// `retries` retries, the first after `delay` and each pause twice the one before, with no
    /// jitter and no deadline: for follow-ups that must not press a struggling server.
    pub fn doubling(delay: Duration, retries: u32) -> Self {
        Self {
            retry_count: RetryCount::Limited(retries),
            retry_delay: delay,
            retry_jitter: Duration::ZERO,
            backoff_factor: 2.0,
            max_delay: MAX_DELAY_LIMIT,
            deadline: None,
        }
    }

    /// Sets how many retries follow the first attempt.
    #[must_use]
    pub fn with_retry_count(mut self, retry_count: RetryCount) -> Self {
        self.retry_count = retry_count;
        self
    }

    /// Sets the base pause between attempts.
    #[must_use]
    pub fn with_retry_delay(mut self, retry_delay: Duration) -> Self {
        self.retry_delay = retry_delay;
        self
    }

    /// Sets the largest random pause added to each delay (spreads contending clients apart).
    #[must_use]
    pub fn with_retry_jitter(mut self, retry_jitter: Duration) -> Self {
        self.retry_jitter = retry_jitter;
        self
    }

    /// Sets the exponential backoff factor (`1.0` keeps the delay constant).
    #[must_use]
    pub fn with_backoff_factor(mut self, backoff_factor: f64) -> Self {
        self.backoff_factor = backoff_factor;
        self
    }

    /// Sets the cap on the delay that backoff can grow to (jitter comes on top).
    #[must_use]
    pub fn with_max_delay(mut self, max_delay: Duration) -> Self {
        self.max_delay = max_delay;
        self
    }

    /// Sets the longest an acquisition may take in all, attempts and pauses included.
    #[must_use]
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Removes the overall deadline.
    #[must_use]
    pub fn without_deadline(mut self) -> Self {
        self.deadline = None;
        self
    }

    /// How many retries follow the first attempt.
    pub fn retry_count(&self) -> RetryCount {
        self.retry_count
    }

    /// The base pause between attempts.
    pub fn retry_delay(&self) -> Duration {
        self.retry_delay
    }

    /// The largest random pause added to each delay.
    pub fn retry_jitter(&self) -> Duration {
        self.retry_jitter
    }

    /// The exponential backoff factor.
    pub fn backoff_factor(&self) -> f64 {
        self.backoff_factor
    }

    /// The cap on the backoff delay.
    pub fn max_delay(&self) -> Duration {
        self.max_delay
    }

    /// The longest an acquisition may take in all, if bounded.
    pub fn deadline(&self) -> Option<Duration> {
        self.deadline
    }

    /// True when the policy allows only one attempt.
    pub fn is_single_attempt(&self) -> bool {
        self.retry_count == RetryCount::Limited(0)
    }

    /// Checks every field and names the first that is out of range.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming the field (`retry_delay`, `backoff_factor`, …).
    pub fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("retry_delay", self.retry_delay),
            ("retry_jitter", self.retry_jitter),
            ("max_delay", self.max_delay),
        ] {
            if value > MAX_DELAY_LIMIT {
                return Err(LockError::invalid(
                    field,
                    format!("{value:?} is more than the 1 h limit"),
                ));
            }
        }
        if !(1.0..=16.0).contains(&self.backoff_factor) {
            return Err(LockError::invalid(
                "backoff_factor",
                format!(
                    "{} is outside [1, 16]; use 1 for a constant delay",
                    self.backoff_factor
                ),
            ));
        }
        if self.max_delay < self.retry_delay {
            return Err(LockError::invalid(
                "max_delay",
                format!(
                    "{:?} is below retry_delay ({:?}); the cap must not be lower than the base delay",
                    self.max_delay, self.retry_delay
                ),
            ));
        }
        if let Some(deadline) = self.deadline
            && (deadline.is_zero() || deadline > validate::MAX_TTL)
        {
            return Err(LockError::invalid(
                "deadline",
                format!("{deadline:?} is outside (0, 24 h]; leave it unset for no deadline"),
            ));
        }
        Ok(())
    }

    /// Applies the seeds' flat retry options over this policy: `retryCount` (-1 = forever),
    /// `retryDelay` and `retryJitter` in milliseconds; `None` keeps the current value. A delay
    /// above `max_delay` raises the cap with it.
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming `retry_count`, `retry_delay` or `retry_jitter`.
    pub fn with_seed_options(
        mut self,
        retry_count: Option<i64>,
        retry_delay: Option<i64>,
        retry_jitter: Option<i64>,
    ) -> Result<Self> {
        if let Some(count) = retry_count {
            self.retry_count = RetryCount::from_seed(count)?;
        }
        if let Some(delay) = retry_delay {
            self.retry_delay = validate::millis("retry_delay", delay, MAX_DELAY_LIMIT)?;
            self.max_delay = self.max_delay.max(self.retry_delay);
        }
        if let Some(jitter) = retry_jitter {
            self.retry_jitter = validate::millis("retry_jitter", jitter, MAX_DELAY_LIMIT)?;
        }
        self.validate()?;
        Ok(self)
    }

    /// The per-acquisition state: which attempt comes next and how long to wait before it.
    pub fn backoff(&self) -> Backoff<'_> {
        Backoff {
            policy: self,
            retries: 0,
        }
    }
}

/// The seeds' flat retry options, as a configuration document writes them beside its other
/// fields: `retry_count` (-1 = forever), `retry_delay`, `retry_jitter` and `deadline`, in
/// milliseconds, each optional (unset keeps the policy's value), with the seeds' camelCase names
/// as aliases. The facade reads them once, here, whatever the backend.
///
/// # Default
/// Every field unset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryOptions {
    /// Retries after the first attempt; -1 retries forever.
    #[serde(
        alias = "retryCount",
        alias = "retry",
        skip_serializing_if = "Option::is_none"
    )]
    pub retry_count: Option<i64>,
    /// Pause between attempts, in ms.
    #[serde(
        alias = "retryDelay",
        alias = "delay",
        skip_serializing_if = "Option::is_none"
    )]
    pub retry_delay: Option<i64>,
    /// Largest random addition to each pause, in ms.
    #[serde(alias = "retryJitter", skip_serializing_if = "Option::is_none")]
    pub retry_jitter: Option<i64>,
    /// Longest an acquisition may take in all, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline: Option<i64>,
}

impl RetryOptions {
    /// These options with `lower` under them: fields set here win, unset ones come from `lower`.
    #[must_use]
    pub fn merged_over(self, lower: Self) -> Self {
        Self {
            retry_count: self.retry_count.or(lower.retry_count),
            retry_delay: self.retry_delay.or(lower.retry_delay),
            retry_jitter: self.retry_jitter.or(lower.retry_jitter),
            deadline: self.deadline.or(lower.deadline),
        }
    }

    /// `policy` with the options that are set applied over it
    /// ([`RetryPolicy::with_seed_options`], then the deadline).
    ///
    /// # Errors
    /// [`LockError::InvalidInput`] naming `retry_count`, `retry_delay`, `retry_jitter` or
    /// `deadline`.
    pub fn apply_to(&self, policy: RetryPolicy) -> Result<RetryPolicy> {
        let policy =
            policy.with_seed_options(self.retry_count, self.retry_delay, self.retry_jitter)?;
        match self.deadline {
            Some(deadline) => Ok(policy.with_deadline(validate::millis(
                "deadline",
                deadline,
                validate::MAX_TTL,
            )?)),
            None => Ok(policy),
        }
    }
}

/// Per-acquisition retry state, separate from the shared [`RetryPolicy`].
///
/// Iterating yields the pause before each retry; it ends when the retry count is used up.
#[derive(Debug)]
pub struct Backoff<'a> {
    policy: &'a RetryPolicy,
    retries: u32,
}

impl Backoff<'_> {
    /// Retries handed out so far.
    pub fn retries(&self) -> u32 {
        self.retries
    }
}

impl Iterator for Backoff<'_> {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        if let RetryCount::Limited(limit) = self.policy.retry_count
            && self.retries >= limit
        {
            return None;
        }
        let exponent = i32::try_from(self.retries).unwrap_or(i32::MAX);
        self.retries = self.retries.saturating_add(1);
        let grown =
            self.policy.retry_delay.as_secs_f64() * self.policy.backoff_factor.powi(exponent);
        let capped = if grown.is_finite() {
            Duration::from_secs_f64(grown.min(self.policy.max_delay.as_secs_f64()))
        } else {
            self.policy.max_delay
        };
        let jitter = self.policy.retry_jitter;
        let jitter = if jitter.is_zero() {
            Duration::ZERO
        } else {
            rand::rng().random_range(Duration::ZERO..=jitter)
        };
        Some(capped + jitter)
    }
}

/// The shape of a retry policy in configuration files: milliseconds, `-1` for forever.
#[derive(Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RetryPolicyConfig {
    #[serde(alias = "retryCount", alias = "retry")]
    retry_count: i64,
    #[serde(alias = "retryDelay", alias = "delay")]
    retry_delay: i64,
    #[serde(alias = "retryJitter", alias = "jitter")]
    retry_jitter: i64,
    #[serde(alias = "backoffFactor")]
    backoff_factor: f64,
    #[serde(alias = "maxDelay")]
    max_delay: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    deadline: Option<i64>,
}

impl Default for RetryPolicyConfig {
    fn default() -> Self {
        RetryPolicy::default().into()
    }
}

impl From<RetryPolicy> for RetryPolicyConfig {
    fn from(policy: RetryPolicy) -> Self {
        Self {
            retry_count: match policy.retry_count {
                RetryCount::Limited(n) => i64::from(n),
                RetryCount::Forever => -1,
            },
            retry_delay: validate::to_millis(policy.retry_delay),
            retry_jitter: validate::to_millis(policy.retry_jitter),
            backoff_factor: policy.backoff_factor,
            max_delay: validate::to_millis(policy.max_delay),
            deadline: policy.deadline.map(validate::to_millis),
        }
    }
}

impl TryFrom<RetryPolicyConfig> for RetryPolicy {
    type Error = LockError;

    fn try_from(config: RetryPolicyConfig) -> Result<Self> {
        let policy = Self {
            retry_count: RetryCount::from_seed(config.retry_count)?,
            retry_delay: validate::millis("retry_delay", config.retry_delay, MAX_DELAY_LIMIT)?,
            retry_jitter: validate::millis("retry_jitter", config.retry_jitter, MAX_DELAY_LIMIT)?,
            backoff_factor: config.backoff_factor,
            max_delay: validate::millis("max_delay", config.max_delay, MAX_DELAY_LIMIT)?,
            deadline: config
                .deadline
                .map(|d| validate::millis("deadline", d, validate::MAX_TTL))
                .transpose()?,
        };
        policy.validate()?;
        Ok(policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn doubling_pauses_double_without_jitter() {
        let policy = RetryPolicy::doubling(Duration::from_millis(100), 3);
        policy.validate().expect("a valid policy");
        let pauses: Vec<Duration> = policy.backoff().collect();
        assert_eq!(pauses, [100, 200, 400].map(Duration::from_millis));
    }

    #[test]
    fn default_is_valid_and_limited() {
        let policy = RetryPolicy::default();
        policy.validate().expect("default policy is valid");
        assert_eq!(policy.backoff().count(), 10);
        assert_eq!(RetryPolicy::none().backoff().count(), 0);
        assert!(RetryPolicy::none().is_single_attempt());
    }

    #[test]
    fn backoff_grows_to_the_cap_and_jitter_stays_in_range() {
        let policy = RetryPolicy::default()
            .with_retry_delay(ms(10))
            .with_retry_jitter(Duration::ZERO)
            .with_backoff_factor(2.0)
            .with_max_delay(ms(50));
        let delays: Vec<_> = policy.backoff().take(5).collect();
        assert_eq!(delays, [ms(10), ms(20), ms(40), ms(50), ms(50)]);

        let jittered = policy.with_retry_jitter(ms(5)).with_backoff_factor(1.0);
        for delay in jittered.backoff() {
            assert!((ms(10)..=ms(15)).contains(&delay), "{delay:?}");
        }
    }

    #[test]
    fn forever_never_runs_out() {
        assert_eq!(RetryPolicy::forever().backoff().take(1000).count(), 1000);
    }

    #[test]
    fn validation_names_the_field() {
        let cases = [
            (
                RetryPolicy::default().with_backoff_factor(0.5),
                "backoff_factor",
            ),
            (
                RetryPolicy::default().with_backoff_factor(f64::NAN),
                "backoff_factor",
            ),
            (RetryPolicy::default().with_max_delay(ms(1)), "max_delay"),
            (
                RetryPolicy::default().with_deadline(Duration::ZERO),
                "deadline",
            ),
            (
                RetryPolicy::default().with_retry_jitter(Duration::from_secs(7200)),
                "retry_jitter",
            ),
        ];
        for (policy, expected) in cases {
            match policy.validate() {
                Err(LockError::InvalidInput { field, .. }) => assert_eq!(field, expected),
                other => panic!("expected invalid {expected}, got {other:?}"),
            }
        }
    }

    #[test]
    fn serde_uses_milliseconds_and_seed_names() {
        let policy: RetryPolicy = serde_json::from_str(
            r#"{"retryCount": -1, "retryDelay": 50, "retryJitter": 10, "deadline": 2000}"#,
        )
        .expect("seed-style config parses");
        assert_eq!(policy.retry_count(), RetryCount::Forever);
        assert_eq!(policy.retry_delay(), ms(50));
        assert_eq!(policy.retry_jitter(), ms(10));
        assert_eq!(policy.deadline(), Some(ms(2000)));

        let json = serde_json::to_string(&policy).expect("serializes");
        let back: RetryPolicy = serde_json::from_str(&json).expect("round trips");
        assert_eq!(back, policy);
    }

    #[test]
    fn serde_rejects_bad_values_naming_the_field() {
        for (json, field) in [
            (r#"{"retry_jitter": -5}"#, "retry_jitter"),
            (r#"{"retry_count": -2}"#, "retry_count"),
            (r#"{"retry_delay": -1}"#, "retry_delay"),
            (r#"{"deadline": -1}"#, "deadline"),
        ] {
            let error = serde_json::from_str::<RetryPolicy>(json).expect_err(json);
            assert!(error.to_string().contains(field), "{json}: {error}");
        }
        assert!(serde_json::from_str::<RetryPolicy>(r#"{"retry_dealy": 5}"#).is_err());
    }

    #[test]
    fn retry_options_take_the_seeds_names_and_apply_over_a_policy() {
        let options: RetryOptions = serde_json::from_str(
            r#"{"retryCount": -1, "retryDelay": 50, "retryJitter": 5, "deadline": 900}"#,
        )
        .expect("parses");
        let lower = RetryOptions {
            retry_count: Some(3),
            retry_jitter: Some(1),
            ..RetryOptions::default()
        };
        let merged = RetryOptions {
            retry_jitter: None,
            ..options
        }
        .merged_over(lower);
        assert_eq!(merged.retry_count, Some(-1));
        assert_eq!(merged.retry_jitter, Some(1));
        let policy = options.apply_to(RetryPolicy::default()).expect("valid");
        assert_eq!(policy.retry_count(), RetryCount::Forever);
        assert_eq!(policy.retry_delay(), ms(50));
        assert_eq!(policy.retry_jitter(), ms(5));
        assert_eq!(policy.deadline(), Some(ms(900)));
        assert_eq!(
            RetryOptions::default()
                .apply_to(RetryPolicy::none())
                .expect("valid"),
            RetryPolicy::none()
        );
        for (options, field) in [
            (r#"{"retry_count": -2}"#, "retry_count"),
            (r#"{"retry_jitter": -1}"#, "retry_jitter"),
            (r#"{"deadline": -1}"#, "deadline"),
        ] {
            let options: RetryOptions = serde_json::from_str(options).expect("parses");
            match options.apply_to(RetryPolicy::default()) {
                Err(LockError::InvalidInput { field: got, .. }) => assert_eq!(got, field),
                other => panic!("expected invalid {field}, got {other:?}"),
            }
        }
    }
}

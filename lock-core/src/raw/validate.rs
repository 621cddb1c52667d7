//! Shared validation rules, so that every backend rejects the same bad input with the same words.

use std::time::Duration;

use crate::error::{LockError, Result};

/// Checks that `text`, a name that every stored key will carry (a namespace, a key prefix), holds
/// no Redis or Valkey URL with a password: a connection URL put in the wrong field would be
/// stored in every key in the clear and shown in every message naming one.
///
/// # Errors
/// [`LockError::InvalidInput`] naming `field`, with the URL shown without its password.
pub fn name(field: &str, text: &str) -> Result<()> {
    if crate::url::carries_secret(text) {
        return Err(LockError::invalid(
            field,
            format!(
                "`{}` is a URL with a password, which every key would carry in the clear; a \
                 connection URL belongs in `url`/`urls`",
                crate::url::redact_text(text)
            ),
        ));
    }
    Ok(())
}

/// The shortest ttl accepted: Redis counts lock lifetimes in whole milliseconds.
pub const MIN_TTL: Duration = Duration::from_millis(1);

/// The longest ttl accepted: a day. Longer leases are almost always a unit mistake (seconds
/// given as milliseconds) and leave a crashed holder's lock in place for too long.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Checks that a lock lifetime lies within [`MIN_TTL`, `MAX_TTL`].
///
/// # Errors
/// [`LockError::InvalidInput`] naming `field`.
pub fn ttl(field: &str, ttl: Duration) -> Result<()> {
    if ttl < MIN_TTL {
        return Err(LockError::invalid(
            field,
            format!("{ttl:?} is too short; a lock needs at least 1 ms (zero would delete it)"),
        ));
    }
    if ttl > MAX_TTL {
        return Err(LockError::invalid(
            field,
            format!("{ttl:?} is longer than the 24 h limit; extend the lock instead"),
        ));
    }
    Ok(())
}

/// The most permits a semaphore may have. Beyond this a semaphore no longer limits anything
/// worth limiting, and a number this large is almost always a mistake (a negative number cast).
pub const MAX_PERMITS: u32 = 1_000_000;

/// Checks the number of permits of a semaphore: at least 1, at most [`MAX_PERMITS`].
///
/// # Errors
/// [`LockError::InvalidInput`] naming `field`.
pub fn permits(field: &str, permits: u32) -> Result<std::num::NonZeroU32> {
    match std::num::NonZeroU32::new(permits) {
        Some(permits) if permits.get() <= MAX_PERMITS => Ok(permits),
        Some(_) => Err(LockError::invalid(
            field,
            format!("{permits} is more than the limit of {MAX_PERMITS} permits"),
        )),
        None => Err(LockError::invalid(
            field,
            "0 permits would admit nobody; a semaphore needs at least 1",
        )),
    }
}

/// A ttl as whole milliseconds, rounded up so that a lock never lives shorter than asked.
///
/// Call it on a ttl that passed [`ttl`]; larger values saturate instead of overflowing.
pub fn ttl_millis(ttl: Duration) -> u64 {
    let millis = ttl.as_millis() + u128::from(!ttl.subsec_nanos().is_multiple_of(1_000_000));
    u64::try_from(millis).unwrap_or(u64::MAX)
}

/// Checks that a factor lies in `[0, 1)`, as a clock drift factor must.
///
/// # Errors
/// [`LockError::InvalidInput`] naming `field`.
pub fn fraction(field: &str, value: f64) -> Result<()> {
    if !(0.0..1.0).contains(&value) {
        return Err(LockError::invalid(
            field,
            format!("{value} is outside [0, 1)"),
        ));
    }
    Ok(())
}

/// Turns milliseconds read from a configuration file into a duration, refusing negative values
/// and anything above `max`.
///
/// # Errors
/// [`LockError::InvalidInput`] naming `field`.
pub fn millis(field: &str, value: i64, max: Duration) -> Result<Duration> {
    let Ok(value) = u64::try_from(value) else {
        return Err(LockError::invalid(field, format!("{value} ms is negative")));
    };
    let duration = Duration::from_millis(value);
    if duration > max {
        return Err(LockError::invalid(
            field,
            format!(
                "{value} ms is more than the limit of {} ms",
                max.as_millis()
            ),
        ));
    }
    Ok(duration)
}

/// The longest command, node or connect timeout a backend's configuration accepts.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// Checks a timeout read from a configuration, in milliseconds: at least 1, at most
/// [`MAX_TIMEOUT`].
///
/// # Errors
/// [`LockError::InvalidInput`] naming `field`.
pub fn timeout(field: &str, ms: u64) -> Result<Duration> {
    let timeout = Duration::from_millis(ms);
    if ms == 0 || timeout > MAX_TIMEOUT {
        return Err(LockError::invalid(
            field,
            format!("{ms} ms is outside 1..={} ms", MAX_TIMEOUT.as_millis()),
        ));
    }
    Ok(timeout)
}

/// Milliseconds of a duration for a configuration file; saturates instead of wrapping.
pub(crate) fn to_millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_bounds() {
        assert!(ttl("ttl", Duration::ZERO).is_err());
        assert!(ttl("ttl", Duration::from_micros(999)).is_err());
        assert!(ttl("ttl", MIN_TTL).is_ok());
        assert!(ttl("ttl", MAX_TTL).is_ok());
        let error = ttl("ttl", MAX_TTL + Duration::from_millis(1)).expect_err("too long");
        assert!(error.to_string().starts_with("invalid ttl:"), "{error}");
    }

    #[test]
    fn ttl_millis_rounds_up() {
        assert_eq!(ttl_millis(Duration::from_millis(5)), 5);
        assert_eq!(ttl_millis(Duration::from_micros(5_001)), 6);
        assert_eq!(ttl_millis(Duration::MAX), u64::MAX);
    }

    #[test]
    fn fraction_bounds() {
        assert!(fraction("drift_factor", 0.0).is_ok());
        assert!(fraction("drift_factor", 0.01).is_ok());
        assert!(fraction("drift_factor", 1.0).is_err());
        assert!(fraction("drift_factor", -0.1).is_err());
        assert!(fraction("drift_factor", f64::NAN).is_err());
    }

    #[test]
    fn timeout_bounds() {
        assert!(timeout("connect_timeout", 0).is_err());
        assert_eq!(
            timeout("connect_timeout", 1).ok(),
            Some(Duration::from_millis(1))
        );
        assert_eq!(timeout("connect_timeout", 60_000).ok(), Some(MAX_TIMEOUT));
        let error = timeout("connect_timeout", 60_001).expect_err("too long");
        assert_eq!(
            error.to_string(),
            "invalid connect_timeout: 60001 ms is outside 1..=60000 ms"
        );
    }

    #[test]
    fn millis_rejects_negative_and_huge() {
        assert!(millis("retry_jitter", -1, MAX_TTL).is_err());
        assert_eq!(
            millis("retry_jitter", 7, MAX_TTL).ok(),
            Some(Duration::from_millis(7))
        );
        assert!(millis("retry_jitter", i64::MAX, MAX_TTL).is_err());
    }
}

//! Property tests over keys, ttls and configurations: no panic, no hang, and every rejection is
//! a typed error that names the field.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lock_core::{Key, LockError, LockOptions, Locker, RetryPolicy, raw::validate};
use lock_memory::MemoryLock;
use proptest::prelude::*;

fn field_of(error: &LockError) -> Option<&str> {
    match error {
        LockError::InvalidInput { field, .. } => Some(field.as_str()),
        _ => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn keys_are_accepted_exactly_when_non_empty_and_short(key in ".{0,40}|.{1000,1100}") {
        match Key::new(&key) {
            Ok(valid) => {
                prop_assert!(!key.is_empty() && key.len() <= lock_core::MAX_KEY_LEN);
                prop_assert_eq!(valid.as_str(), key.as_str());
            }
            Err(error) => {
                prop_assert!(key.is_empty() || key.len() > lock_core::MAX_KEY_LEN);
                prop_assert_eq!(field_of(&error), Some("key"));
            }
        }
    }

    #[test]
    fn ttls_are_checked_without_panicking(nanos in any::<u64>()) {
        let ttl = Duration::from_nanos(nanos);
        match validate::ttl("ttl", ttl) {
            Ok(()) => prop_assert!(ttl >= validate::MIN_TTL && ttl <= validate::MAX_TTL),
            Err(error) => prop_assert_eq!(field_of(&error), Some("ttl")),
        }
        let _ = validate::ttl_millis(ttl);
    }

    #[test]
    fn retry_configs_parse_or_name_the_field(
        count in any::<i64>(), delay in any::<i64>(), jitter in any::<i64>(), factor in any::<f64>(), deadline in any::<i64>(),
    ) {
        let json = format!(
            r#"{{"retry_count": {count}, "retry_delay": {delay}, "retry_jitter": {jitter}, "backoff_factor": {factor:?}, "deadline": {deadline}}}"#
        );
        if let Err(error) = serde_json::from_str::<RetryPolicy>(&json) {
            let message = error.to_string();
            let named = ["retry_count", "retry_delay", "retry_jitter", "backoff_factor", "max_delay", "deadline"]
                .iter()
                .any(|field| message.contains(field));
            // Non-finite floats are not JSON at all; serde names the position instead.
            prop_assert!(named || !factor.is_finite(), "{}", message);
        }
    }

    #[test]
    fn acquisitions_with_arbitrary_keys_and_ttls_never_panic(key in ".{0,64}", ttl_ms in 0u64..200_000_000) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let options = LockOptions::default()
                .with_ttl(Duration::from_millis(ttl_ms))
                .with_retry(RetryPolicy::none());
            let locker = Locker::new(MemoryLock::new());
            match locker.acquire_with(&key, &options).await {
                Ok(guard) => {
                    prop_assert!(!key.is_empty());
                    guard.release().await.unwrap();
                }
                Err(error) => {
                    let field = field_of(&error);
                    prop_assert!(field == Some("key") || field == Some("ttl"), "{:?}", error);
                }
            }
            Ok(())
        })?;
    }
}

#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod config;

use std::sync::Arc;

pub use config::{CONFIG_ENV, ConfigSource, LockConfig};
use lock_core::raw::{Lock, validate};
/// The core's user surface (`Locker`, `LockGuard`, options, the retry policy, errors…) and its
/// `raw` kit for backend authors, under the same names as in `lock_core`.
#[doc(inline)]
pub use lock_core::*;
/// The INCR backend (feature `inc`).
#[cfg(feature = "inc")]
#[doc(inline)]
pub use lock_inc as inc;
/// The in-process backend (feature `memory`).
#[cfg(feature = "memory")]
#[doc(inline)]
pub use lock_memory as memory;
/// The Redlock backend (feature `redlock`).
#[cfg(feature = "redlock")]
#[doc(inline)]
pub use lock_redlock as redlock;

/// Every backend name `create` knows, with the cargo feature that compiles it in.
pub const BACKENDS: &[(&str, &str)] = &[
    ("memory", "memory"),
    ("inMemory", "memory"),
    ("redis", "redlock"),
    ("redlock", "redlock"),
    ("inc", "inc"),
];

/// Builds a [`Locker`] over the backend that `config` names, after expanding its `lock_config`.
///
/// With no `type`, the backend is `memory`. A namespace, ttl and retry options in `config` become
/// the locker's; the backend's own options (nodes, drift factor, prefix…) configure the backend.
///
/// # Errors
/// - [`LockError::UnknownBackend`] listing the known names;
/// - [`LockError::BackendNotCompiled`] naming the cargo feature to enable;
/// - [`LockError::InvalidInput`] naming the bad field (URLs without passwords);
/// - [`LockError::Backend`] when the `inc` backend cannot reach its server.
pub async fn create(config: LockConfig) -> Result<Locker> {
    let config = config.resolve()?;
    let name = config.backend.as_deref().unwrap_or("memory");
    let Some((_, feature)) = BACKENDS.iter().find(|(known, _)| *known == name) else {
        let known: Vec<&str> = BACKENDS.iter().map(|(known, _)| *known).collect();
        return Err(LockError::UnknownBackend {
            // A URL given as the type by mistake is shown without its password.
            name: config::shown(name),
            known: known.join(", "),
        });
    };
    let lock = match *feature {
        "memory" => memory_backend(&config)?,
        "redlock" => redlock_backend(&config, name == "redis")?,
        _ => inc_backend(&config).await?,
    };
    let locker = Locker::from_arc(lock).with_namespace(config.namespace.as_deref())?;
    let mut options = locker.options().clone();
    if let Some(ttl) = config.ttl {
        options = options.with_ttl(validate::millis("ttl", ttl, validate::MAX_TTL)?);
    }
    let mut retry = options.retry().clone().with_seed_options(
        config.retry_count,
        config.retry_delay,
        config.retry_jitter,
    )?;
    if let Some(deadline) = config.deadline {
        retry = retry.with_deadline(validate::millis("deadline", deadline, validate::MAX_TTL)?);
    }
    locker.with_options(options.with_retry(retry))
}

/// [`create`] from [`LockConfig::from_env`] (`LOCK_CONFIG`) merged under `explicit`: a deployment
/// switches backend (memory in tests, redlock in production) without code changes.
///
/// # Errors
/// As [`create`], and when `LOCK_CONFIG` cannot be read.
pub async fn create_from_env(explicit: LockConfig) -> Result<Locker> {
    create(explicit.merged_over(LockConfig::from_env()?.resolve()?)).await
}

#[cfg(not(all(feature = "memory", feature = "redlock", feature = "inc")))]
fn not_compiled(name: &str, feature: &str) -> LockError {
    LockError::BackendNotCompiled {
        name: name.to_owned(),
        feature: feature.to_owned(),
    }
}

#[cfg(feature = "memory")]
fn memory_backend(config: &LockConfig) -> Result<Arc<dyn Lock>> {
    if config.urls.is_some() {
        return Err(LockError::invalid(
            "urls",
            "the memory backend takes no nodes",
        ));
    }
    Ok(Arc::new(lock_memory::MemoryLock::new()))
}

#[cfg(not(feature = "memory"))]
fn memory_backend(_config: &LockConfig) -> Result<Arc<dyn Lock>> {
    Err(not_compiled("memory", "memory"))
}

#[cfg(feature = "redlock")]
fn redlock_backend(config: &LockConfig, single: bool) -> Result<Arc<dyn Lock>> {
    let urls = config.urls.clone().unwrap_or_default();
    if single && urls.len() != 1 {
        return Err(LockError::invalid(
            "urls",
            format!(
                "the redis backend takes exactly one node, got {}; use redlock for several",
                urls.len()
            ),
        ));
    }
    let mut redlock = lock_redlock::RedlockConfig::new(urls);
    if let Some(drift_factor) = config.drift_factor {
        redlock = redlock.with_drift_factor(drift_factor);
    }
    if let Some(node_timeout) = config.node_timeout {
        redlock = redlock.with_node_timeout(std::time::Duration::from_millis(node_timeout));
    }
    if let Some(fencing) = config.fencing {
        redlock = redlock.with_fencing(fencing);
    }
    if let Some(wake_on_release) = config.wake_on_release {
        redlock = redlock.with_wake_on_release(wake_on_release);
    }
    if let Some(fair) = config.fair {
        redlock = redlock.with_fair(fair);
    }
    Ok(Arc::new(lock_redlock::Redlock::new(redlock)?))
}

#[cfg(not(feature = "redlock"))]
fn redlock_backend(_config: &LockConfig, single: bool) -> Result<Arc<dyn Lock>> {
    Err(not_compiled(
        if single { "redis" } else { "redlock" },
        "redlock",
    ))
}

#[cfg(feature = "inc")]
async fn inc_backend(config: &LockConfig) -> Result<Arc<dyn Lock>> {
    let urls = config.urls.clone().unwrap_or_default();
    let [url] = urls.as_slice() else {
        return Err(LockError::invalid(
            "urls",
            format!("the inc backend takes exactly one node, got {}", urls.len()),
        ));
    };
    let mut inc = lock_inc::IncConfig::new(url.clone());
    if let Some(prefix) = &config.prefix {
        inc.prefix.clone_from(prefix);
    }
    if let Some(command_timeout) = config.command_timeout {
        inc.command_timeout = command_timeout;
    }
    if let Some(wake_on_release) = config.wake_on_release {
        inc.wake_on_release = wake_on_release;
    }
    if let Some(fair) = config.fair {
        inc.fair = fair;
    }
    Ok(Arc::new(lock_inc::IncLock::connect(inc).await?))
}

#[cfg(not(feature = "inc"))]
async fn inc_backend(_config: &LockConfig) -> Result<Arc<dyn Lock>> {
    Err(not_compiled("inc", "inc"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn unknown_backends_list_the_known_ones() {
        match create(LockConfig::backend("zookeeper")).await {
            Err(LockError::UnknownBackend { name, known }) => {
                assert_eq!(name, "zookeeper");
                assert!(
                    known.contains("memory") && known.contains("redlock") && known.contains("inc")
                );
            }
            other => panic!("expected an unknown backend, got {other:?}"),
        }
    }

    #[cfg(not(feature = "inc"))]
    #[tokio::test]
    async fn a_backend_left_out_names_its_feature() {
        match create(LockConfig::backend("inc")).await {
            Err(LockError::BackendNotCompiled { name, feature }) => {
                assert_eq!((name.as_str(), feature.as_str()), ("inc", "inc"))
            }
            other => panic!("expected a missing feature, got {other:?}"),
        }
    }

    #[cfg(feature = "memory")]
    #[tokio::test]
    async fn memory_by_default_with_namespace_and_seed_retry_options() {
        let config = LockConfig::from_json(
            r#"{"namespace": "app", "ttl": 500, "retryCount": -1, "retryDelay": 5}"#,
        )
        .unwrap();
        let locker = create(config).await.unwrap();
        assert_eq!(locker.backend().name(), "memory");
        assert_eq!(locker.lock_ns("job").unwrap().as_str(), "app:job");
        assert_eq!(
            locker.options().ttl(),
            std::time::Duration::from_millis(500)
        );
        assert_eq!(locker.options().retry().retry_count(), RetryCount::Forever);
        let guard = locker.acquire("job").await.unwrap();
        assert_eq!(guard.key().as_str(), "app:job");
        guard.release().await.unwrap();
        locker.stop().await.unwrap();
        assert!(matches!(
            locker.acquire("job").await,
            Err(LockError::Stopped)
        ));
    }

    #[cfg(feature = "memory")]
    #[tokio::test]
    async fn lock_config_nests_from_objects_strings_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lock.toml");
        std::fs::write(
            &file,
            "type = \"inMemory\"\nnamespace = \"from-file\"\nttl = 700\n",
        )
        .unwrap();
        let config = LockConfig {
            namespace: Some("explicit".into()),
            lock_config: Some(ConfigSource::Text(file.display().to_string())),
            ..LockConfig::default()
        };
        let resolved = config.resolve().unwrap();
        assert_eq!(resolved.backend.as_deref(), Some("inMemory"));
        assert_eq!(
            resolved.namespace.as_deref(),
            Some("explicit"),
            "explicit fields win"
        );
        assert_eq!(resolved.ttl, Some(700));

        let inline =
            LockConfig::from_json(r#"{"lockConfig": "{\"type\": \"memory\", \"ttl\": 900}"}"#)
                .unwrap();
        assert_eq!(inline.resolve().unwrap().ttl, Some(900));
    }

    #[cfg(feature = "redlock")]
    #[tokio::test]
    async fn fair_reaches_the_backend_from_json_and_toml() {
        // Redlock connects lazily: nothing listens on port 1, and nothing needs to.
        let json = LockConfig::from_json(
            r#"{"type": "redis", "urls": ["redis://127.0.0.1:1/"], "fair": true}"#,
        )
        .unwrap();
        let toml = LockConfig::from_toml(
            "type = \"redis\"\nurls = [\"redis://127.0.0.1:1/\"]\nfair = true\n",
        )
        .unwrap();
        for config in [json, toml] {
            let locker = create(config).await.unwrap();
            assert!(locker.capabilities().fair);
        }
        let plain = LockConfig::from_json(r#"{"type": "redis", "urls": ["redis://127.0.0.1:1/"]}"#)
            .unwrap();
        assert!(!create(plain).await.unwrap().capabilities().fair);
        // Lines on several nodes could each put a different waiter first: refused, by name.
        let several = LockConfig::from_json(
            r#"{"type": "redlock", "urls": ["redis://127.0.0.1:1/", "redis://127.0.0.1:2/", "redis://127.0.0.1:3/"], "fair": true}"#,
        )
        .unwrap();
        let error = create(several).await.unwrap_err();
        assert!(
            matches!(error, LockError::InvalidInput { ref field, .. } if field == "fair"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn errors_name_the_field_and_the_source() {
        let error = LockConfig::from_json(r#"{"ttl": "soon"}"#).unwrap_err();
        assert!(error.to_string().contains("config (JSON)"), "{error}");
        let error = LockConfig::from_file("/nonexistent/lock.json").unwrap_err();
        assert!(
            error.to_string().contains("/nonexistent/lock.json"),
            "{error}"
        );
        let error = LockConfig::from_json(r#"{"tpye": "memory"}"#).unwrap_err();
        assert!(error.to_string().contains("tpye"), "{error}");
        let bad_retry = LockConfig {
            retry_jitter: Some(-1),
            ..LockConfig::default()
        };
        if cfg!(feature = "memory") {
            let error = create(bad_retry).await.unwrap_err();
            assert!(
                matches!(error, LockError::InvalidInput { ref field, .. } if field == "retry_jitter"),
                "{error}"
            );
        }
        let config = LockConfig::from_json(
            r#"{"type": "redlock", "urls": ["redis://u:s3cret@127.0.0.1:1/"]}"#,
        )
        .unwrap();
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[tokio::test]
    async fn a_url_in_the_wrong_place_is_shown_without_its_password() {
        let url = "redis://u:s3/cr\"3t@127.0.0.1:1/";
        let json = |document: serde_json::Value| LockConfig::from_json(&document.to_string());
        let toml = |document: serde_json::Value| {
            LockConfig::from_toml(&toml::to_string(&document).unwrap())
        };
        // Whether the message quotes the value (hidden) or only describes it.
        let documents = [
            (serde_json::json!({"urls": url}), false),
            (serde_json::json!({"ttl": url}), true),
            (serde_json::json!({(url): 1}), true),
            (
                serde_json::json!({"lockConfig": serde_json::json!({"ttl": url}).to_string()}),
                true,
            ),
        ];
        for (document, quoted) in documents {
            let errors = [
                json(document.clone()).and_then(LockConfig::resolve),
                toml(document.clone()).and_then(LockConfig::resolve),
            ];
            for error in errors {
                let error = error.unwrap_err();
                assert!(!format!("{error} {error:?}").contains("3t"), "{error}");
                assert_eq!(error.to_string().contains("u:***@"), quoted, "{error}");
            }
        }
        // Text that is neither JSON nor TOML is taken for a path.
        let error = LockConfig::from_text("redis://u:s3cr3t@127.0.0.1:1/").unwrap_err();
        assert!(!error.to_string().contains("s3cr3t"), "{error}");
        let error = create(LockConfig::backend("redis://u:s3cr3t@h/"))
            .await
            .unwrap_err();
        assert!(matches!(error, LockError::UnknownBackend { .. }), "{error}");
        assert!(!error.to_string().contains("s3cr3t"), "{error}");
        // `null` is no nodes, as before.
        assert_eq!(
            LockConfig::from_json(r#"{"urls": null}"#).unwrap().urls,
            None
        );
    }
}

/// The workspace README's Rust examples, run as doctests of this crate (so that they cannot go
/// stale); only compiled for doctests, so the published package does not need the file.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct WorkspaceReadme;

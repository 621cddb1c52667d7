#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod config;

use std::sync::Arc;

pub use config::{
    BackendConfig, BackendOptions, COMMON_FIELDS, CONFIG_ENV, ConfigSource, LockConfig,
};
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

/// Every backend name `create` knows, with the cargo feature that compiles it in (the feature
/// is named as the backend crate's `NAME`).
pub const BACKENDS: &[(&str, &str)] = &[
    ("memory", "memory"),
    ("inMemory", "memory"),
    ("redis", "redlock"),
    ("redlock", "redlock"),
    ("inc", "inc"),
];

/// The feature (and backend crate `NAME`) of a backend name `create` knows.
fn feature_of(name: &str) -> Option<&'static str> {
    BACKENDS
        .iter()
        .find(|(known, _)| *known == name)
        .map(|(_, feature)| *feature)
}

/// Builds a [`Locker`] over the backend that `config` names, after expanding its `lock_config`.
///
/// With no `type`, the backend is `memory`. The namespace, ttl and retry options in `config`
/// become the locker's; the backend options are read into the backend's own configuration type
/// (`MemoryConfig`, `RedlockConfig`, `IncConfig`), which that backend is built from.
///
/// # Errors
/// - [`LockError::UnknownBackend`] listing the known names;
/// - [`LockError::BackendNotCompiled`] naming the cargo feature to enable;
/// - [`LockError::InvalidInput`] naming the bad field (URLs without passwords), or
///   `<type> options` for an option the backend does not have (listing those it has) or of the
///   wrong type;
/// - [`LockError::Backend`] when the `inc` backend cannot reach its server.
pub async fn create(config: LockConfig) -> Result<Locker> {
    let config = config.resolve()?;
    let name = config.backend.as_deref().unwrap_or("memory");
    let Some(feature) = feature_of(name) else {
        let known: Vec<&str> = BACKENDS.iter().map(|(known, _)| *known).collect();
        return Err(LockError::UnknownBackend {
            // A URL given as the type by mistake is shown without its password.
            name: config::shown(name),
            known: known.join(", "),
        });
    };
    let lock = match feature {
        "memory" => memory_backend(name, &config.options)?,
        "redlock" => redlock_backend(name, &config.options)?,
        _ => inc_backend(name, &config.options).await?,
    };
    let locker = Locker::from_arc(lock).with_namespace(config.namespace.as_deref())?;
    let mut options = locker.options().clone();
    if let Some(ttl) = config.ttl {
        options = options.with_ttl(validate::millis("ttl", ttl, validate::MAX_TTL)?);
    }
    let retry = config.retry.apply_to(options.retry().clone())?;
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
fn memory_backend(name: &str, options: &BackendOptions) -> Result<Arc<dyn Lock>> {
    let config = config::backend_config(name, options)?;
    Ok(Arc::new(lock_memory::MemoryLock::from_config(config)))
}

#[cfg(not(feature = "memory"))]
fn memory_backend(name: &str, _options: &BackendOptions) -> Result<Arc<dyn Lock>> {
    Err(not_compiled(name, "memory"))
}

#[cfg(feature = "redlock")]
fn redlock_backend(name: &str, options: &BackendOptions) -> Result<Arc<dyn Lock>> {
    let config: lock_redlock::RedlockConfig = config::backend_config(name, options)?;
    if name == lock_redlock::SINGLE_NODE_NAME {
        config.require_single_node()?;
    }
    Ok(Arc::new(lock_redlock::Redlock::new(config)?))
}

#[cfg(not(feature = "redlock"))]
fn redlock_backend(name: &str, _options: &BackendOptions) -> Result<Arc<dyn Lock>> {
    Err(not_compiled(name, "redlock"))
}

#[cfg(feature = "inc")]
async fn inc_backend(name: &str, options: &BackendOptions) -> Result<Arc<dyn Lock>> {
    let config = config::backend_config(name, options)?;
    Ok(Arc::new(lock_inc::IncLock::connect(config).await?))
}

#[cfg(not(feature = "inc"))]
async fn inc_backend(name: &str, _options: &BackendOptions) -> Result<Arc<dyn Lock>> {
    Err(not_compiled(name, "inc"))
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
        // On by default, with one node or several; off when asked.
        let default =
            LockConfig::from_json(r#"{"type": "redis", "urls": ["redis://127.0.0.1:1/"]}"#)
                .unwrap();
        assert!(create(default).await.unwrap().capabilities().fair);
        let plain = LockConfig::from_json(
            r#"{"type": "redis", "urls": ["redis://127.0.0.1:1/"], "fair": false}"#,
        )
        .unwrap();
        assert!(!create(plain).await.unwrap().capabilities().fair);
        let several = LockConfig::from_json(
            r#"{"type": "redlock", "urls": ["redis://127.0.0.1:1/", "redis://127.0.0.1:2/"]}"#,
        )
        .unwrap();
        assert!(create(several).await.unwrap().capabilities().fair);
        let several = LockConfig::from_json(
            r#"{"type": "redlock", "urls": ["redis://127.0.0.1:1/", "redis://127.0.0.1:2/", "redis://127.0.0.1:3/"], "fair": false}"#,
        )
        .unwrap();
        assert!(!create(several).await.unwrap().capabilities().fair);
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
        // A document that names its type is checked as it is parsed; one that does not, when
        // its backend is known (here the default, memory).
        if cfg!(feature = "memory") {
            let error = LockConfig::from_json(r#"{"type": "memory", "tpye": 1}"#).unwrap_err();
            assert!(error.to_string().contains("tpye"), "{error}");
            assert!(error.to_string().contains("config (JSON)"), "{error}");
            let config = LockConfig::from_json(r#"{"tpye": "memory"}"#).unwrap();
            let error = create(config).await.unwrap_err();
            assert!(
                matches!(error, LockError::InvalidInput { ref field, ref reason }
                    if field == "memory options" && reason.contains("unknown field `tpye`")
                        && reason.contains("`namespace`")),
                "{error}"
            );
        }
        let bad_retry = LockConfig {
            retry: RetryOptions {
                retry_jitter: Some(-1),
                ..RetryOptions::default()
            },
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
            r#"{"type": "redlock", "urls": ["redis://u:s3cret@127.0.0.1:1/"], "tls_ca_file": "redis://u:s3cret@h/"}"#,
        )
        .unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("redis://u:***@127.0.0.1:1/"), "{debug}");
    }

    /// The common fields are taken by the common part, every other field by the options.
    #[test]
    fn the_common_fields_are_the_common_part() {
        let document = serde_json::json!({
            "type": "memory", "namespace": "n", "ttl": 1, "retry_count": 1, "retryDelay": 2,
            "retryJitter": 3, "deadline": 4, "lock_config": "{}", "prefix": "p",
        });
        let config = LockConfig::from_json(&document.to_string()).unwrap_or_default();
        let parsed: LockConfig = serde_json::from_value(document).unwrap();
        assert_eq!(
            parsed.options.keys().collect::<Vec<_>>(),
            ["prefix"],
            "{parsed:?}"
        );
        assert_eq!(parsed.retry.retry_jitter, Some(3));
        assert_eq!(parsed.retry.deadline, Some(4));
        for field in COMMON_FIELDS {
            let document = serde_json::json!({ *field: serde_json::Value::Null });
            let parsed: LockConfig = serde_json::from_value(document).unwrap();
            assert!(parsed.options.is_empty(), "{field} is not a common field");
        }
        // Not parsed with `from_json`: memory has no `prefix`.
        assert_eq!(config, LockConfig::default());
    }

    #[cfg(feature = "redlock")]
    #[tokio::test]
    async fn every_redlock_option_is_reachable_from_json_toml_and_files() {
        // Old: `connection`, `pool_size`, `connect_timeout` and `tls_ca_file` were unknown
        // fields of the facade. Redlock connects lazily: nothing listens on port 1.
        let json = r#"{"type": "redlock", "urls": ["redis://127.0.0.1:1/"], "connection": "pool",
            "pool_size": 2, "connectTimeout": 300, "nodeTimeout": 70, "driftFactor": 0.02,
            "fencing": true, "wakeOnRelease": true}"#;
        let toml = "type = \"redlock\"\nurls = [\"redis://127.0.0.1:1/\"]\nconnection = \"pool\"\n\
                    poolSize = 2\nconnect_timeout = 300\nnode_timeout = 70\ndrift_factor = 0.02\n\
                    fencing = true\nwake_on_release = true\n";
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lock.toml");
        std::fs::write(&file, toml).unwrap();
        let nested = serde_json::json!({"lockConfig": json}).to_string();
        for config in [
            LockConfig::from_json(json).unwrap(),
            LockConfig::from_toml(toml).unwrap(),
            LockConfig::from_text(&file.display().to_string()).unwrap(),
            LockConfig::from_text(&nested).unwrap(),
        ] {
            let locker = create(config).await.unwrap();
            let backend = format!("{:?}", locker.backend());
            for shown in [
                "connection: Pool",
                "pool_size: 2",
                "connect_timeout: 300",
                "node_timeout: Some(70)",
                "drift_factor: 0.02",
                "fencing: true",
                "wake_on_release: Some(true)",
            ] {
                assert!(backend.contains(shown), "{shown} in {backend}");
            }
        }
        // A CA file reaches the backend: read (feature `tls`) or refused without the feature.
        let config = LockConfig::from_json(
            r#"{"type": "redis", "urls": ["redis://127.0.0.1:1/"], "tls_ca_file": "/nonexistent/ca.pem"}"#,
        )
        .unwrap();
        let error = create(config).await.unwrap_err();
        assert!(
            matches!(error, LockError::InvalidInput { ref field, .. } if field.ends_with("tls_ca_file")),
            "{error}"
        );
    }

    #[cfg(feature = "inc")]
    #[tokio::test]
    async fn every_inc_option_is_reachable() {
        // Each refused by the backend's own validation, before any connection: so it got there.
        for (option, value, field) in [
            ("connect_timeout", serde_json::json!(0), "connect_timeout"),
            ("commandTimeout", serde_json::json!(0), "command_timeout"),
            ("prefix", serde_json::json!("p".repeat(300)), "prefix"),
            (
                "tlsCaFile",
                serde_json::json!("/nonexistent/ca.pem"),
                "tls_ca_file",
            ),
        ] {
            let config = LockConfig::backend("inc")
                .with_option("url", "redis://127.0.0.1:1/")
                .with_option(option, value);
            let error = create(config).await.unwrap_err();
            assert!(
                matches!(error, LockError::InvalidInput { field: ref got, .. } if got == field),
                "{option}: {error}"
            );
        }
    }

    #[tokio::test]
    async fn an_unknown_option_is_refused_naming_the_backends_fields() {
        let mut cases = Vec::new();
        if cfg!(feature = "memory") {
            cases.push(("memory", "urls", "there are no fields"));
        }
        if cfg!(feature = "redlock") {
            // A field of another backend is refused the same way.
            cases.push(("redlock", "prefix", "`drift_factor`"));
            cases.push(("redis", "retry_policy", "`pool_size`"));
        }
        if cfg!(feature = "inc") {
            cases.push(("inc", "drift_factor", "`command_timeout`"));
        }
        for (backend, field, valid) in cases {
            let document = serde_json::json!({"urls": ["redis://127.0.0.1:1/"], (field): 1});
            let parsed = LockConfig::from_json(&document.to_string()).unwrap();
            let errors = [
                create(parsed.clone().merged_over(LockConfig::backend(backend)))
                    .await
                    .unwrap_err(),
                LockConfig::from_json(
                    &serde_json::json!({"type": backend, (field): 1}).to_string(),
                )
                .unwrap_err(),
            ];
            for error in errors {
                let message = error.to_string();
                assert!(
                    message.contains(&format!("unknown field `{field}`")),
                    "{message}"
                );
                assert!(message.contains(valid), "{backend}: {message}");
                assert!(message.contains("`retry_count`"), "{message}");
            }
        }
    }

    #[cfg(feature = "redlock")]
    #[tokio::test]
    async fn backend_options_merge_key_by_key_across_layers() {
        let lower = LockConfig::from_toml(
            "type = \"redlock\"\nurls = [\"redis://127.0.0.1:1/\"]\nnode_timeout = 70\npoolSize = 3\nfencing = true\n",
        )
        .unwrap();
        let upper = LockConfig::from_json(
            r#"{"nodeTimeout": 90, "connection": "pool", "fencing": null, "nodes": ["redis://127.0.0.1:2/"]}"#,
        )
        .unwrap();
        let merged = upper.clone().merged_over(lower.clone());
        let mut names: Vec<&str> = merged.options.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["connection", "fencing", "nodeTimeout", "nodes", "poolSize"]
        );
        let locker = create(merged).await.unwrap();
        let backend = format!("{:?}", locker.backend());
        for shown in [
            "node_timeout: Some(90)",
            "pool_size: 3",
            "connection: Pool",
            "fencing: true",
            "127.0.0.1:2",
        ] {
            assert!(backend.contains(shown), "{shown} in {backend}");
        }
        // The same through a nested lockConfig, and under a typed configuration from code that
        // keeps the `redis` name.
        let nested = LockConfig {
            lock_config: Some(ConfigSource::Inline(Box::new(lower))),
            ..upper
        };
        let resolved = nested.resolve().unwrap();
        assert_eq!(resolved.options["nodeTimeout"], 90);
        assert_eq!(resolved.options["poolSize"], 3);
        let code = LockConfig::backend("redis")
            .with_backend(
                &lock_redlock::RedlockConfig::new(["redis://127.0.0.1:3/"])
                    .with_connection(lock_redlock::ConnectionKind::Pool),
            )
            .unwrap();
        assert_eq!(code.backend.as_deref(), Some("redis"));
        let locker = create(code.merged_over(resolved)).await.unwrap();
        let backend = format!("{:?}", locker.backend());
        assert!(
            backend.contains("127.0.0.1:3") && !backend.contains("127.0.0.1:2"),
            "{backend}"
        );
        assert!(
            backend.contains("pool_size: 4"),
            "code set every field: {backend}"
        );
        assert_eq!(
            LockConfig::default()
                .with_backend(&lock_redlock::RedlockConfig::default())
                .unwrap()
                .backend
                .as_deref(),
            Some("redlock")
        );
        // A number JSON cannot hold would read as unset: refused, not replaced by the default.
        let nan =
            lock_redlock::RedlockConfig::new(["redis://127.0.0.1:1/"]).with_drift_factor(f64::NAN);
        let error = LockConfig::default().with_backend(&nan).unwrap_err();
        assert!(
            matches!(error, LockError::InvalidInput { ref field, .. } if field == "redlock options"),
            "{error}"
        );
    }

    /// What a document would lose as a JSON value is refused: a non-finite number (old: read as
    /// unset, so Redlock ran with the default drift factor) and a repeated field (old: the last
    /// one won).
    #[tokio::test]
    async fn a_document_loses_nothing_silently() {
        for (toml, shown) in [
            ("drift_factor = nan\n", "NaN"),
            ("driftFactor = -inf\n", "inf"),
        ] {
            let toml = format!("type = \"redis\"\nurls = [\"redis://127.0.0.1:1/\"]\n{toml}");
            let error = LockConfig::from_toml(&toml).unwrap_err();
            assert!(
                error.to_string().contains("expected a finite number"),
                "{error}"
            );
            assert!(error.to_string().contains(shown), "{error}");
        }
        let error = LockConfig::from_json(r#"{"prefix": "a", "prefix": "b"}"#).unwrap_err();
        assert!(
            error.to_string().contains("duplicate field `prefix`"),
            "{error}"
        );
        let error = LockConfig::from_json(r#"{"x": {"y": [1.5, "z"], "y": 2}}"#).unwrap_err();
        assert!(error.to_string().contains("duplicate field `y`"), "{error}");
        // Inside an inline `lockConfig` too (serde's untagged enum hides why).
        assert!(LockConfig::from_json(r#"{"lockConfig": {"x": 1, "x": 2}}"#).is_err());
    }

    /// Exactly as many nested `lockConfig` levels as allowed resolve; one more is refused (old:
    /// the last allowed level was refused too).
    #[test]
    fn lock_config_nests_as_deep_as_allowed_and_no_deeper() {
        let nested = |levels: usize| {
            let mut document = serde_json::json!({"namespace": "deepest"});
            for _ in 0..levels {
                document = serde_json::json!({ "lockConfig": document });
            }
            LockConfig::from_json(&document.to_string()).and_then(LockConfig::resolve)
        };
        for levels in 0..=config::MAX_NESTING {
            let resolved = nested(levels).unwrap();
            assert_eq!(resolved.namespace.as_deref(), Some("deepest"), "{levels}");
        }
        let error = nested(config::MAX_NESTING + 1).unwrap_err();
        assert!(
            matches!(error, LockError::InvalidInput { ref field, .. } if field == "lock_config"),
            "{error}"
        );
    }

    /// `with_option` and `with_backend` replace an option under any of its names (old: they
    /// added the second name, so that `null` left the option set, and a value made the backend
    /// refuse a `duplicate field` it was never given twice).
    #[cfg(feature = "redlock")]
    #[tokio::test]
    async fn with_option_and_with_backend_replace_an_option_under_any_name() {
        let parsed = LockConfig::from_json(
            r#"{"type": "redis", "nodes": ["redis://127.0.0.1:1/"], "node_timeout": 70}"#,
        )
        .unwrap();
        let backend = |locker: Locker| format!("{:?}", locker.backend());
        let unset = parsed
            .clone()
            .with_option("nodeTimeout", serde_json::Value::Null);
        let shown = backend(create(unset).await.unwrap());
        assert!(shown.contains("node_timeout: None"), "{shown}");
        let replaced = parsed.clone().with_option("nodeTimeout", 90);
        let shown = backend(create(replaced).await.unwrap());
        assert!(shown.contains("node_timeout: Some(90)"), "{shown}");
        let replaced = parsed.clone().with_option("urls", ["redis://127.0.0.1:2/"]);
        let shown = backend(create(replaced).await.unwrap());
        assert!(
            shown.contains("127.0.0.1:2") && !shown.contains("127.0.0.1:1"),
            "{shown}"
        );
        let typed = parsed
            .with_backend(&lock_redlock::RedlockConfig::new(["redis://127.0.0.1:3/"]))
            .unwrap();
        let shown = backend(create(typed).await.unwrap());
        assert!(
            shown.contains("127.0.0.1:3") && !shown.contains("127.0.0.1:1"),
            "{shown}"
        );
    }

    /// A value of the wrong type or out of its type's range is refused naming its field, in
    /// JSON and TOML, at the top, inside an inline `lockConfig` and among the backend's options
    /// (old: serde's message named none, and toml's message no line either).
    #[tokio::test]
    async fn a_bad_value_names_its_field() {
        let mut cases = vec![
            (serde_json::json!({"ttl": 1.5}), "ttl"),
            (
                serde_json::json!({"namespace": "n", "retryDelay": "soon"}),
                "retryDelay",
            ),
            (serde_json::json!({"deadline": -1.0}), "deadline"),
            (
                serde_json::json!({"lockConfig": {"namespace": "n", "retry_count": "x"}}),
                "lockConfig.retry_count",
            ),
            (
                serde_json::json!({"lock_config": {"lockConfig": {"ttl": [1]}}}),
                "lock_config.lockConfig.ttl",
            ),
        ];
        if cfg!(feature = "redlock") {
            cases.extend([
                (
                    serde_json::json!({"type": "redlock", "urls": ["redis://127.0.0.1:1/"], "nodeTimeout": -1}),
                    "nodeTimeout",
                ),
                (
                    serde_json::json!({"type": "redis", "fencing": "yes", "urls": ["redis://127.0.0.1:1/"]}),
                    "fencing",
                ),
            ]);
        }
        for (document, field) in cases {
            let json = LockConfig::from_json(&document.to_string()).unwrap_err();
            let toml = LockConfig::from_toml(&toml::to_string(&document).unwrap()).unwrap_err();
            for error in [json, toml] {
                assert!(
                    error.to_string().contains(&format!("field `{field}`: ")),
                    "{document}: {error}"
                );
            }
        }
        if cfg!(feature = "redlock") {
            // A document without its type is read into the backend's type by `create`.
            let config =
                LockConfig::from_json(r#"{"urls": ["redis://127.0.0.1:1/"], "pool_size": 1.5}"#)
                    .unwrap();
            let error = create(config.merged_over(LockConfig::backend("redlock")))
                .await
                .unwrap_err();
            assert!(
                matches!(error, LockError::InvalidInput { ref field, ref reason }
                    if field == "redlock options" && reason.starts_with("field `pool_size`: ")),
                "{error}"
            );
        }
        // TOML's non-finite numbers, as a common field and as a backend option.
        let error = LockConfig::from_toml(
            "ttl = nan
",
        )
        .unwrap_err();
        assert!(error.to_string().contains("field `ttl`: "), "{error}");
        if cfg!(feature = "redlock") {
            let error =
                LockConfig::from_toml("type = \"redis\"\ndrift_factor = inf\n").unwrap_err();
            assert!(
                error.to_string().contains("field `drift_factor`: "),
                "{error}"
            );
        }
    }

    /// `Debug` shows a URL put in the type or the namespace by mistake without its password
    /// (old: both were shown as given).
    #[test]
    fn debug_hides_a_password_in_the_type_and_the_namespace() {
        let config = LockConfig {
            namespace: Some("redis://u:s3cr3t@h/".into()),
            ..LockConfig::backend("rediss://u:s3cr3t@h/")
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("rediss://u:***@h/"), "{shown}");
    }

    /// Parses `document` as JSON and as TOML, resolves it and creates a locker from it: the
    /// errors of each.
    async fn failures_of(document: &serde_json::Value) -> Vec<LockError> {
        let json = LockConfig::from_json(&document.to_string());
        let toml = LockConfig::from_toml(&toml::to_string(document).unwrap());
        let mut errors = Vec::new();
        for parsed in [json, toml] {
            match parsed.and_then(LockConfig::resolve) {
                Ok(config) => errors.push(create(config).await.unwrap_err()),
                Err(error) => errors.push(error),
            }
        }
        errors
    }

    #[tokio::test]
    async fn a_url_in_the_wrong_place_is_shown_without_its_password() {
        let url = "redis://u:s3/cr\"3t@127.0.0.1:1/";
        // Whether the message quotes the value (hidden) or only describes it.
        let mut documents = vec![
            (serde_json::json!({"ttl": url}), true),
            (serde_json::json!({(url): 1}), true),
            (serde_json::json!({"type": "memory", (url): 1}), true),
            (
                serde_json::json!({"lockConfig": serde_json::json!({"ttl": url}).to_string()}),
                true,
            ),
            (serde_json::json!({"namespace": [url]}), false),
        ];
        if cfg!(feature = "memory") {
            documents.push((serde_json::json!({"urls": url}), false));
        }
        if cfg!(feature = "redlock") {
            documents.extend([
                // One URL is a list of one: its own check shows it, without the password.
                (serde_json::json!({"type": "redlock", "urls": url}), true),
                (serde_json::json!({"type": "redlock", "urls": [[url]]}), false),
                (
                    serde_json::json!({"type": "redis", "urls": [url], "pool_size": url}),
                    true,
                ),
                (
                    serde_json::json!({"lockConfig": {"type": "redlock", "urls": [url], "prefix": url}}),
                    false,
                ),
                (
                    serde_json::json!({"type": "redlock", "urls": [url], "connection": url}),
                    true,
                ),
            ]);
        }
        if cfg!(feature = "inc") {
            documents.extend([
                (
                    serde_json::json!({"type": "inc", "urls": [url], "command_timeout": url}),
                    true,
                ),
                (
                    serde_json::json!({"type": "inc", "urls": [url, url]}),
                    false,
                ),
                (
                    serde_json::json!({"type": "inc", "url": {(url): url}}),
                    false,
                ),
            ]);
        }
        for (document, quoted) in documents {
            for error in failures_of(&document).await {
                assert!(!format!("{error} {error:?}").contains("3t"), "{error}");
                assert_eq!(
                    error.to_string().contains("u:***@"),
                    quoted,
                    "{document}: {error}"
                );
            }
        }
        // Text that is neither JSON nor TOML is taken for a path; one that names no file says
        // what a configuration may be (a JSON list, a typo), and so does an empty one.
        let error = LockConfig::from_text("redis://u:s3cr3t@127.0.0.1:1/").unwrap_err();
        assert!(!error.to_string().contains("s3cr3t"), "{error}");
        for text in ["[]", "redis://u:s3cr3t@127.0.0.1:1/", "lock.jsn"] {
            let error = LockConfig::from_text(text).unwrap_err().to_string();
            assert!(
                error.contains("no such file; a configuration is inline JSON"),
                "{error}"
            );
            assert!(!error.contains("s3cr3t"), "{error}");
        }
        for text in ["", "  \n"] {
            let error = LockConfig::from_text(text).unwrap_err().to_string();
            assert!(
                error.contains("config: is empty; give inline JSON"),
                "{error}"
            );
        }
        let error = create(LockConfig::backend("redis://u:s3cr3t@h/"))
            .await
            .unwrap_err();
        assert!(matches!(error, LockError::UnknownBackend { .. }), "{error}");
        assert!(!error.to_string().contains("s3cr3t"), "{error}");
        // `null` is unset, as before.
        let config = LockConfig::from_json(r#"{"urls": null}"#).unwrap();
        if cfg!(feature = "memory") {
            create(config).await.unwrap();
        }
    }
}

/// The workspace README's Rust examples, run as doctests of this crate (so that they cannot go
/// stale); only compiled for doctests, so the published package does not need the file.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct WorkspaceReadme;

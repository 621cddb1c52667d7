//! `create(config)` over every backend, on real redis-servers where they need one.

use lock_facade::{LockConfig, LockError, create};
use lock_tests::server::{RedisServer, redis_or_skip};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_by_name_from_json() {
    let Some(binary) = redis_or_skip("facade") else {
        return;
    };
    let servers: Vec<RedisServer> = (0..3)
        .map(|_| RedisServer::start(&binary, &[]).expect("server"))
        .collect();
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let configs = [
        serde_json::json!({"type": "inMemory", "namespace": "svc"}),
        serde_json::json!({"type": "redis", "namespace": "svc", "urls": [urls[0]], "retryCount": 3}),
        serde_json::json!({"type": "redlock", "namespace": "svc", "urls": urls, "driftFactor": 0.02}),
        serde_json::json!({"type": "inc", "namespace": "svc", "urls": [urls[1]], "prefix": "jobs:"}),
        // Every backend option is reachable from a document (before, `connection`,
        // `pool_size` and `connect_timeout` were unknown fields).
        serde_json::json!({"type": "redlock", "namespace": "svc", "nodes": urls,
            "connection": "pool", "poolSize": 2, "connect_timeout": 300, "node_timeout": 200,
            "fencing": true, "wake_on_release": true}),
        serde_json::json!({"type": "inc", "namespace": "svc", "url": urls[2],
            "connectTimeout": 300, "command_timeout": 300, "prefix": "jobs2:",
            "wakeOnRelease": true, "fair": true}),
        // One node as inc takes it, `url` and a single string (before, `url` was an unknown
        // field of `redis` and a string where `urls` belongs was refused).
        serde_json::json!({"type": "redis", "namespace": "svc", "url": urls[1]}),
        serde_json::json!({"type": "redis", "namespace": "svc", "urls": urls[2]}),
    ];
    for config in configs {
        let name = config["type"].as_str().expect("type").to_owned();
        let locker = create(LockConfig::from_json(&config.to_string()).expect("parses"))
            .await
            .expect(&name);
        let guard = locker.acquire("report").await.expect(&name);
        assert_eq!(guard.key().as_str(), "svc:report", "{name}");
        assert!(
            locker.try_acquire("report").await.expect(&name).is_none(),
            "{name}: not exclusive"
        );
        guard.release().await.expect(&name);
        locker.stop().await.expect(&name);
        assert!(
            matches!(locker.acquire("report").await, Err(LockError::Stopped)),
            "{name}"
        );
    }

    let error = create(
        LockConfig::from_json(&serde_json::json!({"type": "redis", "urls": urls}).to_string())
            .expect("parses"),
    )
    .await
    .expect_err("redis takes one node");
    assert!(
        matches!(error, LockError::InvalidInput { ref field, .. } if field == "urls"),
        "{error}"
    );
    let error = create(
        LockConfig::from_json(r#"{"type": "redlock", "urls": ["http://u:s3cret@h/"]}"#)
            .expect("parses"),
    )
    .await
    .expect_err("bad URL");
    assert!(!error.to_string().contains("s3cret"), "{error}");
}

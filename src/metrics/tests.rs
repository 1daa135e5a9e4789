use super::*;

fn status() -> DaemonStatus {
    let usage = |owner: serde_json::Value| {
        serde_json::json!({
            "dir": "/var/cache/reservoir", "capacity": 1000, "used": 600, "data_bytes": 500,
            "index_bytes": 50, "metadata_bytes": 50, "files": 7, "complete_files": 5,
            "admitted": 9, "rejected": 2, "evicted_files": 3, "evicted_bytes": 300,
            "verify_failures": 1, "owner": owner,
            "damage": { "missing_files": 2, "store_failures": 5 },
        })
    };
    let owner = serde_json::json!({
        "name": "vol-1", "tag": "t", "quota": 800, "used": 400, "data_bytes": 380, "files": 4,
        "complete_files": 3, "admitted": 6, "rejected": 1, "evicted_files": 2, "evicted_bytes": 200,
    });
    let recovery = serde_json::json!({
        "kept": true, "recoveries": 2, "last_recovery_ms": 1_700_000_000_500u64,
    });
    let lost = serde_json::json!([{
        "volume_id": "vol-0", "target_path": "/var/lib/kubelet/staging/vol-0",
        "reason": "the mount at /var/lib/kubelet/staging/vol-0 is gone", "at_ms": 1,
    }]);
    serde_json::from_value(serde_json::json!({
        "pid": 42,
        "socket": "/run/reservoir/daemon.sock",
        "cache": usage(serde_json::Value::Null),
        "owners": [],
        "keeper_pid": 7,
        "volumes": [{
            "volume_id": "vol-1",
            "target_path": "/var/lib/kubelet/staging/vol-1",
            "requested_source": "nfs://filer/data",
            "cache_size": 800,
            "read_write": false,
            "recovery": recovery,
            "source": "nfs://filer/data\"x",
            "online": true,
            "metadata_ttl": "60s",
            "nodes_known": 10,
            "opens": 12,
            "passthrough_opens": 4,
            "bytes_from_cache": 1234,
            "bytes_from_source": 99,
            "bytes_fetched": 2048,
            "bytes_preloaded": 4096,
            "passthrough_bytes": 8192,
            "hit_ratio": 0.75,
            "source_errors": 3,
            "cache": usage(owner),
            "preload": {
                "paths": ["train"], "scanning": false, "done": true, "files_total": 5,
                "bytes_total": 50, "files_loaded": 3, "bytes_loaded": 30, "files_cached": 1,
                "bytes_cached": 10, "files_failed": 1, "failures": [], "elapsed_ms": 7,
            },
        }],
    }))
    .map(|mut status: DaemonStatus| {
        status.lost = serde_json::from_value(lost).unwrap();
        status
    })
    .unwrap()
}

/// Checks the exposition's shape: every sample belongs to the family declared last (a
/// histogram's `_bucket`, `_sum`, `_count` to their histogram), no family is declared twice,
/// and every value parses.
fn check_format(text: &str) {
    let mut current: Option<(String, String)> = None;
    let mut seen = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(seen.insert(name.to_string()), "{name} declared twice");
            current = Some((name.to_string(), kind.to_string()));
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        value.parse::<f64>().unwrap_or_else(|_| panic!("{line}"));
        let name = series.split('{').next().unwrap();
        let (family, kind) = current.as_ref().unwrap_or_else(|| panic!("{line}"));
        let base = if kind == "histogram" {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name)
        } else {
            name
        };
        assert_eq!(base, family, "{line}");
    }
}

#[test]
fn a_daemon_status_as_prometheus_text() {
    let histogram = HistogramSnapshot {
        cumulative: [0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2],
        count: 3,
        sum_seconds: 40.5,
    };
    let text = render(
        Ok(&status()),
        &[("nfs://filer/data".into(), vec![(Op::Read, histogram)])],
    );
    check_format(&text);
    let labels = r#"{volume="vol-1",source="nfs://filer/data\"x"}"#;
    for expected in [
        "reservoir_up 1".to_string(),
        "reservoir_cache_capacity_bytes 1000".into(),
        "reservoir_cache_checksum_failures_total 1".into(),
        "reservoir_cache_store_failures_total 5".into(),
        r#"reservoir_cache_damage_repaired{kind="missing_file"} 2"#.into(),
        r#"reservoir_cache_damage_repaired{kind="wrong_length"} 0"#.into(),
        "reservoir_volumes 1".into(),
        format!("reservoir_volume_cache_read_bytes_total{labels} 1234"),
        format!("reservoir_volume_passthrough_bytes_total{labels} 8192"),
        format!("reservoir_volume_source_read_bytes_total{labels} 99"),
        format!("reservoir_volume_hit_ratio{labels} 0.75"),
        format!("reservoir_volume_cache_used_bytes{labels} 400"),
        format!("reservoir_volume_cache_quota_bytes{labels} 800"),
        format!("reservoir_volume_cache_admitted_files_total{labels} 6"),
        format!("reservoir_volume_cache_evicted_files_total{labels} 2"),
        format!("reservoir_volume_source_errors_total{labels} 3"),
        format!("reservoir_volume_preload_done{labels} 1"),
        format!("reservoir_volume_recoveries_total{labels} 2"),
        format!("reservoir_volume_last_recovery_timestamp_seconds{labels} 1700000000.5"),
        format!("reservoir_volume_kept{labels} 1"),
        "reservoir_keeper_up 1".into(),
        "reservoir_lost_volumes 1".into(),
        r#"reservoir_volume_preload_files{volume="vol-1",source="nfs://filer/data\"x",state="failed"} 1"#.into(),
        r#"reservoir_volume_preload_bytes{volume="vol-1",source="nfs://filer/data\"x",state="loaded"} 30"#.into(),
        r#"reservoir_source_request_duration_seconds_bucket{source="nfs://filer/data",op="read",le="0.0005"} 1"#.into(),
        r#"reservoir_source_request_duration_seconds_bucket{source="nfs://filer/data",op="read",le="+Inf"} 3"#.into(),
        r#"reservoir_source_request_duration_seconds_sum{source="nfs://filer/data",op="read"} 40.5"#.into(),
        r#"reservoir_source_request_duration_seconds_count{source="nfs://filer/data",op="read"} 3"#.into(),
    ] {
        assert!(
            text.lines().any(|l| l == expected),
            "missing {expected}\n{text}"
        );
    }
}

#[test]
fn a_daemon_that_does_not_answer() {
    let text = render(Err("connection refused"), &[]);
    check_format(&text);
    assert!(text.lines().any(|l| l == "reservoir_up 0"), "{text}");
    assert!(!text.contains("reservoir_volume_info{"), "{text}");
}

#[tokio::test]
async fn timed_sources_record_their_requests() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a"), b"hello").unwrap();
    let opened = crate::source::open(
        &dir.path().to_str().unwrap().parse().unwrap(),
        &crate::source::SourceOptions::default(),
    )
    .await
    .unwrap();
    let (root, _) = opened.root().await.unwrap();
    let (file, _) = opened.lookup(&root, b"a").await.unwrap();
    assert_eq!(opened.read(&file, 0, 5).await.unwrap(), b"hello");
    let id = opened.id().to_string();
    let ours = source::snapshot()
        .into_iter()
        .find(|(source, _)| *source == id)
        .expect("the opened source is registered");
    let count = |op: Op| {
        ours.1
            .iter()
            .find(|(o, _)| *o == op)
            .map_or(0, |(_, h)| h.count)
    };
    assert_eq!(count(Op::Root), 1);
    assert_eq!(count(Op::Lookup), 1);
    assert_eq!(count(Op::Read), 1);
    drop(opened);
    assert!(
        !source::snapshot().iter().any(|(source, _)| *source == id),
        "a dropped source leaves the registry"
    );
}

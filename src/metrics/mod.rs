//! Prometheus metrics of the node's cache daemon, and the small HTTP server behind them and
//! behind the probe endpoints.
//!
//! `reservoir daemon --metrics-address ADDR` serves:
//! - `/metrics`: the node's cache, each volume's traffic, cache use and preload progress, and
//!   the latency of every request to a source (histograms), in the Prometheus text format;
//! - `/ready`: 200 once the daemon answers on its control socket (it can mount volumes).
//!
//! The numbers are those `reservoir status` shows: the endpoint asks the daemon over its own
//! control socket, so a scrape sees exactly what an operator sees, and the daemon's code has
//! no metrics of its own to keep in step. Only the source latencies are recorded here, by the
//! [`source::Timed`] wrapper every opened source gets. `docs/kubernetes.md` lists every metric.

pub mod http;
pub mod source;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::control::{DaemonStatus, DaemonVolume};
use crate::daemon::{Client, Timeouts};
use http::{Handler, Reply};
use source::{BUCKETS, HistogramSnapshot, Op};

/// The content type of the Prometheus text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How long a scrape or a readiness check waits for the daemon's status.
const STATUS_WAIT: Duration = Duration::from_secs(5);

/// Starts the daemon's metrics and readiness endpoint on `address` in a thread of its own
/// (with its own small runtime, so a daemon that is busy or stuck cannot stall a scrape, and a
/// scrape cannot take the daemon's threads). `socket` is the daemon's control socket. Fails
/// when the address cannot be bound.
pub fn start_daemon_endpoint(address: SocketAddr, socket: PathBuf) -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind(address)
        .map_err(|e| std::io::Error::new(e.kind(), format!("--metrics-address {address}: {e}")))?;
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("reservoir-metrics".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => listener,
                    Err(e) => {
                        tracing::error!(error = %e, "metrics endpoint cannot serve");
                        return;
                    }
                };
                tracing::info!(%address, "metrics on /metrics, readiness on /ready");
                http::serve(listener, daemon_handler(socket), std::future::pending()).await;
            })
        })?;
    Ok(())
}

/// Answers `/metrics` and `/ready` for the daemon at `socket`.
pub fn daemon_handler(socket: PathBuf) -> Handler {
    let client = Client::new(socket).with_timeouts(Timeouts {
        connect: STATUS_WAIT,
        status: STATUS_WAIT,
        ..Timeouts::default()
    });
    Arc::new(move |path| {
        let client = client.clone();
        Box::pin(async move {
            match path.as_str() {
                "/metrics" => {
                    let status = client.status().await.map_err(|e| e.to_string());
                    Reply {
                        status: 200,
                        content_type: PROMETHEUS_TEXT,
                        body: render(status.as_ref().map_err(String::as_str), &source::snapshot()),
                    }
                }
                "/ready" => match client.status().await {
                    Ok(_) => Reply::text(200, "ready: the daemon answers on its control socket\n"),
                    Err(e) => Reply::text(503, format!("not ready: {e}\n")),
                },
                _ => Reply::not_found(&["/metrics", "/ready"]),
            }
        })
    })
}

/// The text exposition of a daemon's status (or of why it could not be had) and of the
/// source latencies.
pub fn render(
    status: Result<&DaemonStatus, &str>,
    sources: &[(String, Vec<(Op, HistogramSnapshot)>)],
) -> String {
    let mut out = Exposition::default();
    out.family(
        "reservoir_up",
        "gauge",
        "1 when the daemon answered this scrape on its control socket, else 0.",
    );
    out.sample("reservoir_up", &[], f64::from(u8::from(status.is_ok())));
    if let Ok(status) = status {
        node_cache(&mut out, status);
        volumes(&mut out, &status.volumes);
    }
    source_latencies(&mut out, sources);
    out.text
}

fn node_cache(out: &mut Exposition, status: &DaemonStatus) {
    let c = &status.cache;
    let gauges: [(&str, &str, u64); 5] = [
        (
            "reservoir_cache_capacity_bytes",
            "The node cache's size (--cache-size).",
            c.capacity,
        ),
        (
            "reservoir_cache_used_bytes",
            "Bytes of the node cache in use, all volumes together (index and metadata included).",
            c.used,
        ),
        ("reservoir_cache_files", "Files in the node cache.", c.files),
        (
            "reservoir_cache_complete_files",
            "Files in the node cache with every block present (served by passthrough).",
            c.complete_files,
        ),
        (
            "reservoir_volumes",
            "Volumes the daemon serves.",
            status.volumes.len() as u64,
        ),
    ];
    for (name, help, value) in gauges {
        out.family(name, "gauge", help);
        out.sample(name, &[], value as f64);
    }
    out.family(
        "reservoir_keeper_up",
        "gauge",
        "1 when the descriptor keeper answers the daemon (volumes survive a daemon restart), \
         else 0.",
    );
    out.sample(
        "reservoir_keeper_up",
        &[],
        f64::from(u8::from(status.keeper_pid.is_some())),
    );
    out.family(
        "reservoir_lost_volumes",
        "gauge",
        "Volumes a previous daemon served that this one could not take over (their readers got \
         errors; `reservoir status` says why). Alert on any.",
    );
    out.sample("reservoir_lost_volumes", &[], status.lost.len() as f64);
    let counters: [(&str, &str, u64); 7] = [
        (
            "reservoir_cache_admitted_files_total",
            "Files the admission policy let into the node cache.",
            c.admitted,
        ),
        (
            "reservoir_cache_rejected_files_total",
            "Files the admission policy kept out of the node cache (served from the source).",
            c.rejected,
        ),
        (
            "reservoir_cache_evicted_files_total",
            "Files evicted from the node cache.",
            c.evicted_files,
        ),
        (
            "reservoir_cache_evicted_bytes_total",
            "Bytes evicted from the node cache.",
            c.evicted_bytes,
        ),
        (
            "reservoir_cache_checksum_failures_total",
            "Cached blocks whose checksum did not match (dropped and fetched again).",
            c.verify_failures,
        ),
        (
            "reservoir_cache_store_failures_total",
            "Fetched blocks the cache disk did not take (full or failing); their reads were \
             answered from the source.",
            c.damage.store_failures,
        ),
        (
            "reservoir_cache_journal_bytes_dropped_total",
            "Bytes cut off the cache's journals after a torn or corrupt record (a few after a \
             crash are normal).",
            c.damage.journal_bytes_dropped,
        ),
    ];
    for (name, help, value) in counters {
        out.family(name, "counter", help);
        out.sample(name, &[], value as f64);
    }
    let d = &c.damage;
    out.family(
        "reservoir_cache_damage_repaired",
        "gauge",
        "Damage the cache found in its directory at start, by kind; all of it was dropped and \
         is fetched again from the source.",
    );
    for (kind, count) in [
        ("unknown_file", d.unknown_files_removed),
        ("missing_file", d.missing_files),
        ("wrong_length", d.resized_files),
        ("block_past_end", d.blocks_dropped),
        ("other_format", d.set_aside),
        ("evicted_for_space", d.evicted_for_space),
    ] {
        out.sample(
            "reservoir_cache_damage_repaired",
            &[("kind", kind.to_string())],
            count as f64,
        );
    }
}

/// A per-volume series: its name, type, help, and the value of a volume (`None`: no sample).
type VolumeSeries = (
    &'static str,
    &'static str,
    &'static str,
    fn(&DaemonVolume) -> Option<f64>,
);

fn owner_value(v: &DaemonVolume, pick: fn(&crate::cache::OwnerUsage) -> u64) -> Option<f64> {
    let owner = v.volume.cache.as_ref()?.owner.as_ref()?;
    Some(pick(owner) as f64)
}

const VOLUME_SERIES: &[VolumeSeries] = &[
    (
        "reservoir_volume_cache_read_bytes_total",
        "counter",
        "Bytes the daemon served to readers from the cache.",
        |v| Some(v.volume.bytes_from_cache as f64),
    ),
    (
        "reservoir_volume_passthrough_opens_total",
        "counter",
        "Opens of fully cached files handed to the kernel (FUSE passthrough).",
        |v| Some(v.volume.passthrough_opens as f64),
    ),
    (
        "reservoir_volume_passthrough_bytes_total",
        "counter",
        "Sizes of the files opened by passthrough: an upper bound of the bytes the kernel read \
         from the cache without the daemon.",
        |v| Some(v.volume.passthrough_bytes as f64),
    ),
    (
        "reservoir_volume_source_read_bytes_total",
        "counter",
        "Bytes served to readers straight from the source (not cached, or not yet).",
        |v| Some(v.volume.bytes_from_source as f64),
    ),
    (
        "reservoir_volume_fetched_bytes_total",
        "counter",
        "Bytes fetched from the source for readers.",
        |v| Some(v.volume.bytes_fetched as f64),
    ),
    (
        "reservoir_volume_preloaded_bytes_total",
        "counter",
        "Bytes fetched from the source by preloads.",
        |v| Some(v.volume.bytes_preloaded as f64),
    ),
    (
        "reservoir_volume_opens_total",
        "counter",
        "Files opened.",
        |v| Some(v.volume.opens as f64),
    ),
    (
        "reservoir_volume_hit_ratio",
        "gauge",
        "1 - bytes fetched for readers / bytes readers got (passthrough counted at file size); \
         absent before the first read.",
        |v| v.volume.hit_ratio,
    ),
    (
        "reservoir_volume_source_up",
        "gauge",
        "1 while the source answers, 0 while it is unreachable (cached files are still served).",
        |v| Some(f64::from(u8::from(v.volume.online))),
    ),
    (
        "reservoir_volume_source_errors_total",
        "counter",
        "Requests to the source that failed.",
        |v| Some(v.volume.source_errors as f64),
    ),
    (
        "reservoir_volume_cache_used_bytes",
        "gauge",
        "Bytes of the node cache this volume's files take.",
        |v| owner_value(v, |o| o.used),
    ),
    (
        "reservoir_volume_cache_quota_bytes",
        "gauge",
        "The volume's cacheSize; absent when only the node cache bounds it.",
        |v| v.cache_size.map(|q| q as f64),
    ),
    (
        "reservoir_volume_cache_files",
        "gauge",
        "Cached files of this volume.",
        |v| owner_value(v, |o| o.files),
    ),
    (
        "reservoir_volume_cache_admitted_files_total",
        "counter",
        "Files of this volume admitted into the cache.",
        |v| owner_value(v, |o| o.admitted),
    ),
    (
        "reservoir_volume_cache_rejected_files_total",
        "counter",
        "Files of this volume the admission policy kept out of the cache.",
        |v| owner_value(v, |o| o.rejected),
    ),
    (
        "reservoir_volume_cache_evicted_files_total",
        "counter",
        "Files of this volume evicted from the cache.",
        |v| owner_value(v, |o| o.evicted_files),
    ),
    (
        "reservoir_volume_cache_evicted_bytes_total",
        "counter",
        "Bytes of this volume evicted from the cache.",
        |v| owner_value(v, |o| o.evicted_bytes),
    ),
    (
        "reservoir_volume_recoveries_total",
        "counter",
        "Times a restarted daemon took the volume's FUSE connection over from the previous one \
         (its readers waited, nothing failed).",
        |v| Some(v.recovery.recoveries as f64),
    ),
    (
        "reservoir_volume_last_recovery_timestamp_seconds",
        "gauge",
        "When a daemon last took the volume over (Unix time); absent before the first takeover.",
        |v| v.recovery.last_recovery_ms.map(|ms| ms as f64 / 1000.0),
    ),
    (
        "reservoir_volume_kept",
        "gauge",
        "1 when the descriptor keeper holds the volume's connection, so that it survives a \
         daemon restart; 0 when a daemon restart would end it.",
        |v| Some(f64::from(u8::from(v.recovery.kept))),
    ),
    (
        "reservoir_volume_preload_done",
        "gauge",
        "1 when the volume's preload has finished (see the failed files), 0 while it runs; \
         absent without a preload.",
        |v| {
            v.volume
                .preload
                .as_ref()
                .map(|p| f64::from(u8::from(p.done)))
        },
    ),
];

fn volumes(out: &mut Exposition, volumes: &[DaemonVolume]) {
    let labels = |v: &DaemonVolume| {
        vec![
            ("volume", v.volume_id.clone()),
            ("source", v.volume.source.clone()),
        ]
    };
    out.family(
        "reservoir_volume_info",
        "gauge",
        "One per volume the daemon serves, with where it is mounted.",
    );
    for v in volumes {
        let mut l = labels(v);
        l.push(("target", v.target_path.display().to_string()));
        l.push(("read_write", v.read_write.to_string()));
        out.sample("reservoir_volume_info", &l, 1.0);
    }
    for &(name, kind, help, value) in VOLUME_SERIES {
        out.family(name, kind, help);
        for v in volumes {
            if let Some(x) = value(v) {
                out.sample(name, &labels(v), x);
            }
        }
    }
    out.family(
        "reservoir_volume_preload_files",
        "gauge",
        "Files of the volume's preload by state: total (grows while scanning), loaded, \
         already cached, failed.",
    );
    for v in volumes {
        let Some(p) = &v.volume.preload else { continue };
        for (state, value) in [
            ("total", p.files_total),
            ("loaded", p.files_loaded),
            ("cached", p.files_cached),
            ("failed", p.files_failed),
        ] {
            let mut l = labels(v);
            l.push(("state", state.to_string()));
            out.sample("reservoir_volume_preload_files", &l, value as f64);
        }
    }
    out.family(
        "reservoir_volume_preload_bytes",
        "gauge",
        "Bytes of the volume's preload by state: total, loaded, already cached.",
    );
    for v in volumes {
        let Some(p) = &v.volume.preload else { continue };
        for (state, value) in [
            ("total", p.bytes_total),
            ("loaded", p.bytes_loaded),
            ("cached", p.bytes_cached),
        ] {
            let mut l = labels(v);
            l.push(("state", state.to_string()));
            out.sample("reservoir_volume_preload_bytes", &l, value as f64);
        }
    }
}

fn source_latencies(out: &mut Exposition, sources: &[(String, Vec<(Op, HistogramSnapshot)>)]) {
    const NAME: &str = "reservoir_source_request_duration_seconds";
    out.family(
        NAME,
        "histogram",
        "Time each request to a volume's source took, by source and operation.",
    );
    for (source, ops) in sources {
        for (op, h) in ops {
            let base = vec![("source", source.clone()), ("op", op.label().to_string())];
            for (bound, count) in BUCKETS.iter().zip(h.cumulative) {
                let mut l = base.clone();
                l.push(("le", format_float(*bound)));
                line(&mut out.text, &format!("{NAME}_bucket"), &l, count as f64);
            }
            let mut l = base.clone();
            l.push(("le", "+Inf".to_string()));
            line(&mut out.text, &format!("{NAME}_bucket"), &l, h.count as f64);
            line(&mut out.text, &format!("{NAME}_sum"), &base, h.sum_seconds);
            line(
                &mut out.text,
                &format!("{NAME}_count"),
                &base,
                h.count as f64,
            );
        }
    }
}

/// The exposition being written.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, String)], value: f64) {
        line(&mut self.text, name, labels, value);
    }
}

fn line(out: &mut String, name: &str, labels: &[(&str, String)], value: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (key, value)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{key}=\"{}\"", escape(value));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {}", format_float(value));
}

/// Label values escape backslash, double quote and newline.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn format_float(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

#[cfg(test)]
mod tests;

//! The gRPC face of reservoir: the Container Storage Interface (CSI v1.12).
//!
//! - [`proto`]: the code generated from `proto/csi.proto` (messages, server traits, clients).
//! - [`params`]: the one parser of volume parameters (StorageClass, PV and inline volumes).
//! - [`capability`]: which volume capabilities a volume supports.
//! - [`identity`], [`controller`], [`node`]: the services ([`mounts`]: the node's mount table).
//! - [`state`]: the controller's durable volume records.
//! - [`registration`]: kubelet plugin registration, so no registrar sidecar is needed.
//! - [`server`]: serving services on a unix socket, and the `reservoir controller`, `node` and
//!   `csi` commands.
//!
//! `docs/csi.md` describes the behaviour and every parameter.

pub mod capability;
pub mod claims;
pub mod controller;
pub mod health;
pub mod identity;
pub mod locality;
pub mod mounts;
pub mod node;
pub mod params;
pub mod registration;
pub mod server;
pub mod source_pods;
pub mod state;

#[cfg(test)]
mod allowed_sources_tests;

/// Code generated from `proto/csi.proto` by `build.rs`.
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    rustdoc::invalid_html_tags,
    rustdoc::bare_urls
)]
pub mod proto {
    tonic::include_proto!("csi.v1");
}

use std::future::Future;
use std::time::Instant;

use tonic::{Response, Status};
use tracing::{Instrument, Level};

/// The driver name used when `--driver-name` is not given.
pub const DEFAULT_DRIVER_NAME: &str = "reservoir.csi.dev";

/// The longest volume id this driver issues (the CSI size limit for ids).
pub const MAX_VOLUME_ID_LEN: usize = 128;

/// Checks a driver name the way the CSI specification requires: at most 63 characters,
/// alphanumerics, `-` and `.`, beginning and ending with an alphanumeric.
pub fn validate_driver_name(name: &str) -> Result<(), String> {
    let ends_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    let valid = name.len() <= 63
        && ends_ok(name.chars().next())
        && ends_ok(name.chars().last())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "driver name {name:?} is invalid: at most 63 characters, letters, digits, '-' and \
             '.', beginning and ending with a letter or digit (e.g. {DEFAULT_DRIVER_NAME})"
        ))
    }
}

/// The volume id for a CreateVolume name: a readable prefix of the name (lower-case letters,
/// digits and `-`, at most 64 bytes) and the 128-bit xxh3 hash of the whole name in hex, e.g.
/// `pvc-3f1c...-1e0f...`. Stable across restarts and versions; at most 97 bytes; safe as a
/// file name.
pub fn volume_id_for(name: &str) -> String {
    let mut prefix = String::new();
    for c in name.chars() {
        if prefix.len() >= 64 {
            break;
        }
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            prefix.push(c);
        } else if !prefix.is_empty() && !prefix.ends_with('-') {
            prefix.push('-');
        }
    }
    let prefix = prefix.trim_end_matches('-');
    let prefix = if prefix.is_empty() { "vol" } else { prefix };
    let hash = xxhash_rust::xxh3::xxh3_128(name.as_bytes());
    format!("{prefix}-{hash:032x}")
}

/// Whether `id` could have been issued by [`volume_id_for`]: ids that fail this are not ours
/// (and are never used as file names).
pub fn is_own_volume_id(id: &str) -> bool {
    let Some((prefix, hash)) = id.rsplit_once('-') else {
        return false;
    };
    id.len() <= MAX_VOLUME_ID_LEN
        && hash.len() == 32
        && hash
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        && !prefix.is_empty()
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Runs one RPC inside a tracing span named after the method, with the volume id, and logs
/// its outcome: successes at `level`, errors at warn (client mistakes at info).
pub(crate) async fn traced<T, F>(
    method: &'static str,
    volume_id: &str,
    level: Level,
    call: F,
) -> Result<Response<T>, Status>
where
    F: Future<Output = Result<T, Status>>,
{
    let span = tracing::info_span!("csi", method, volume_id = %volume_id);
    async move {
        let started = Instant::now();
        let result = call.await;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match &result {
            Ok(_) if level == Level::DEBUG => tracing::debug!(elapsed_ms, "ok"),
            Ok(_) => tracing::info!(elapsed_ms, "ok"),
            Err(status) => {
                let code = format!("{:?}", status.code());
                let message = status.message();
                match status.code() {
                    tonic::Code::InvalidArgument
                    | tonic::Code::NotFound
                    | tonic::Code::AlreadyExists
                    | tonic::Code::Aborted
                    | tonic::Code::Unimplemented => {
                        tracing::info!(elapsed_ms, code, message, "refused")
                    }
                    _ => tracing::warn!(elapsed_ms, code, message, "failed"),
                }
            }
        }
        result.map(Response::new)
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_ids() {
        let name = "pvc-5f0e2d3c-1a2b-4c5d-8e9f-0123456789ab";
        let id = volume_id_for(name);
        assert_eq!(id, volume_id_for(name));
        assert!(id.starts_with(name), "{id}");
        assert!(is_own_volume_id(&id), "{id}");
        assert_ne!(id, volume_id_for("pvc-other"));
        for name in [
            "",
            "Ünïcödé ✓",
            "../../etc/passwd",
            &"x".repeat(10_000),
            "-",
        ] {
            let id = volume_id_for(name);
            assert!(id.len() <= MAX_VOLUME_ID_LEN, "{id}");
            assert!(is_own_volume_id(&id), "{id}");
            assert!(!id.contains('/') && !id.starts_with('.'), "{id}");
        }
        for foreign in [
            "",
            "abc",
            "../x-0123",
            "a/b-00000000000000000000000000000000",
        ] {
            assert!(!is_own_volume_id(foreign), "{foreign}");
        }
    }

    #[test]
    fn driver_names() {
        assert!(validate_driver_name(DEFAULT_DRIVER_NAME).is_ok());
        for bad in ["", "-a", "a-", "a_b", &"a".repeat(64), "a b"] {
            assert!(validate_driver_name(bad).is_err(), "{bad}");
        }
    }
}

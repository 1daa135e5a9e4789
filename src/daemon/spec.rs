//! Checking a mount request and turning it into what the daemon mounts: the volume's root (the
//! source with its sub-path joined), its quota, normalised paths.

use std::path::{Component, Path, PathBuf};

use crate::cache::Quota;
use crate::control::MountRequest;
use crate::source::SourceSpec;
use crate::units::{Size, Ttl};

/// Longest volume id accepted (CSI allows 128 bytes; some COs more).
const MAX_VOLUME_ID: usize = 1024;
/// Most preload paths in one request.
const MAX_PRELOAD_PATHS: usize = 1024;

/// A request the daemon cannot accept; the message names the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct BadRequest {
    pub field: &'static str,
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> BadRequest {
    BadRequest {
        field,
        message: message.into(),
    }
}

/// A checked mount request.
#[derive(Debug)]
pub struct VolumeSpec {
    /// The request with its paths normalised: what a repeated request is compared with.
    pub request: MountRequest,
    /// The volume's root: the source with `sub_path` joined.
    pub root: SourceSpec,
    pub quota: Option<Quota>,
    /// Preload paths relative to the root (`""` for all of it).
    pub preload: Vec<String>,
}

impl VolumeSpec {
    pub fn new(mut request: MountRequest) -> Result<VolumeSpec, BadRequest> {
        let id = &request.volume_id;
        if id.is_empty() || id.len() > MAX_VOLUME_ID || id.chars().any(char::is_control) {
            return Err(bad(
                "volume_id",
                format!("{id:?} must be 1 to {MAX_VOLUME_ID} printable characters"),
            ));
        }
        request.target_path = target_path(&request.target_path)?;
        let source: SourceSpec = request
            .source
            .parse()
            .map_err(|e: crate::source::SpecError| bad("source", e.to_string()))?;
        if let SourceSpec::Nfs(url) = &source {
            // Percent-escapes are decoded after the URL's own '..' check.
            if url.path.split('/').any(|part| part == "..") {
                return Err(bad(
                    "source",
                    format!("{:?}: the path must not contain '..'", request.source),
                ));
            }
        }
        request.sub_path = match request.sub_path.as_deref() {
            None => None,
            Some(sub) => relative_path(sub).map_err(|why| bad("sub_path", why))?,
        };
        let root = source.join(request.sub_path.as_deref());
        if !(0.0 < request.low_watermark
            && request.low_watermark < request.high_watermark
            && request.high_watermark <= 1.0)
        {
            return Err(bad(
                "high_watermark/low_watermark",
                format!(
                    "must satisfy 0 < low ({}) < high ({}) <= 1",
                    request.low_watermark, request.high_watermark
                ),
            ));
        }
        if request.read_write && request.metadata_ttl == Ttl::Forever {
            return Err(bad(
                "metadata_ttl",
                "a read-write volume cannot have metadata_ttl forever, which declares the dataset immutable; give a finite TTL (e.g. 60s)",
            ));
        }
        let quota = request.cache_size.map(|bytes| Quota {
            bytes,
            high_watermark: request.high_watermark,
            low_watermark: request.low_watermark,
        });
        if request.preload.len() > MAX_PRELOAD_PATHS {
            return Err(bad("preload", format!("at most {MAX_PRELOAD_PATHS} paths")));
        }
        let preload = volume_paths(&request.preload).map_err(|e| bad("preload", e.message))?;
        request.preload = preload.iter().map(|p| format!("/{p}")).collect();
        Ok(VolumeSpec {
            request,
            root,
            quota,
            preload,
        })
    }

    /// The parameters in which `other` differs from this volume's, named for an error.
    pub fn differences(&self, other: &VolumeSpec) -> Vec<String> {
        let (a, b) = (&self.request, &other.request);
        let mut out = Vec::new();
        let mut differ = |name: &str, mine: String, theirs: String| {
            if mine != theirs {
                out.push(format!("{name}: mounted {mine}, asked {theirs}"));
            }
        };
        differ("source", self.root.id(), other.root.id());
        let size = |s: Option<u64>| s.map_or("none".into(), |b| Size(b).to_string());
        differ("cache_size", size(a.cache_size), size(b.cache_size));
        differ(
            "high_watermark",
            a.high_watermark.to_string(),
            b.high_watermark.to_string(),
        );
        differ(
            "low_watermark",
            a.low_watermark.to_string(),
            b.low_watermark.to_string(),
        );
        differ(
            "metadata_ttl",
            a.metadata_ttl.to_string(),
            b.metadata_ttl.to_string(),
        );
        differ(
            "read_write",
            a.read_write.to_string(),
            b.read_write.to_string(),
        );
        differ("preload", a.preload.join(","), b.preload.join(","));
        out
    }
}

/// A target path as the daemon records it: absolute, without `.`/`..`, its parent resolved.
pub fn target_path(path: &Path) -> Result<PathBuf, BadRequest> {
    if !path.is_absolute() {
        return Err(bad(
            "target_path",
            format!("{} is not an absolute path", path.display()),
        ));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(bad(
            "target_path",
            format!("{} must not contain '..'", path.display()),
        ));
    }
    if path.parent().is_none() {
        return Err(bad("target_path", "cannot mount on /"));
    }
    Ok(crate::control::normalize(path))
}

/// A path inside a volume: relative, normalised (`a/b`), `None` for the root itself.
fn relative_path(text: &str) -> Result<Option<String>, String> {
    let mut parts = Vec::new();
    for part in text.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(format!("{text:?} must not contain '..'")),
            part if part.contains('\0') => return Err(format!("{text:?} contains a NUL byte")),
            part => parts.push(part),
        }
    }
    Ok((!parts.is_empty()).then(|| parts.join("/")))
}

/// Paths inside a volume, normalised to `a/b` (`""` for the whole volume), duplicates dropped.
pub fn volume_paths(paths: &[String]) -> Result<Vec<String>, BadRequest> {
    let mut out: Vec<String> = Vec::new();
    for path in paths {
        let normal = relative_path(path)
            .map_err(|why| bad("paths", why))?
            .unwrap_or_default();
        if !out.contains(&normal) {
            out.push(normal);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(source: &str) -> MountRequest {
        serde_json::from_value(serde_json::json!({
            "volume_id": "v1",
            "target_path": "/tmp/reservoir-spec-test/target",
            "source": source,
        }))
        .unwrap()
    }

    #[test]
    fn sub_paths_are_joined_into_the_source() {
        let mut r = request("/data");
        r.sub_path = Some("/train//images/".into());
        let spec = VolumeSpec::new(r).unwrap();
        assert_eq!(spec.root, SourceSpec::Local("/data/train/images".into()));
        assert_eq!(spec.request.sub_path.as_deref(), Some("train/images"));

        let mut r = request("nfs://server/export?nfsport=2049");
        r.sub_path = Some("a/b".into());
        let spec = VolumeSpec::new(r).unwrap();
        assert_eq!(spec.root.id(), "nfs://server/export/a/b?nfsport=2049");

        let mut r = request("nfs://server/");
        r.sub_path = Some("a".into());
        assert_eq!(VolumeSpec::new(r).unwrap().root.id(), "nfs://server/a");

        let mut r = request("/data");
        r.sub_path = Some("/".into());
        let spec = VolumeSpec::new(r).unwrap();
        assert_eq!(
            (spec.root.id().as_str(), spec.request.sub_path),
            ("/data", None)
        );
    }

    #[test]
    fn bad_requests_name_the_field() {
        let cases: Vec<(MountRequest, &str)> = vec![
            (
                MountRequest {
                    sub_path: Some("a/../../etc".into()),
                    ..request("/data")
                },
                "sub_path",
            ),
            (request("s3://bucket"), "source"),
            (request("nfs://h/a/%2E%2E/b"), "source"),
            (
                MountRequest {
                    target_path: "relative".into(),
                    ..request("/data")
                },
                "target_path",
            ),
            (
                MountRequest {
                    target_path: "/mnt/../etc".into(),
                    ..request("/data")
                },
                "target_path",
            ),
            (
                MountRequest {
                    volume_id: String::new(),
                    ..request("/data")
                },
                "volume_id",
            ),
            (
                MountRequest {
                    high_watermark: 0.5,
                    low_watermark: 0.7,
                    ..request("/data")
                },
                "high_watermark/low_watermark",
            ),
            (
                MountRequest {
                    read_write: true,
                    metadata_ttl: Ttl::Forever,
                    ..request("/data")
                },
                "metadata_ttl",
            ),
            (
                MountRequest {
                    preload: vec!["ok".into(), "../no".into()],
                    ..request("/data")
                },
                "preload",
            ),
        ];
        for (request, field) in cases {
            let err = VolumeSpec::new(request.clone()).expect_err(&format!("{request:?}"));
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn requests_parse_from_json_with_quantities_and_refuse_unknown_fields() {
        let request: crate::control::ControlRequest = serde_json::from_str(
            r#"{"op":"mount","volume_id":"v","target_path":"/t","source":"/d","cache_size":"10Gi","metadata_ttl":"forever","preload":["a","/b/"]}"#,
        )
        .unwrap();
        let crate::control::ControlRequest::Mount(request) = request else {
            panic!("not a mount request");
        };
        assert_eq!(request.cache_size, Some(10 << 30));
        assert_eq!(request.metadata_ttl, Ttl::Forever);
        let spec = VolumeSpec::new(request).unwrap();
        assert_eq!(spec.preload, ["a", "b"]);
        assert_eq!(spec.request.preload, ["/a", "/b"]);

        let request: crate::control::ControlRequest = serde_json::from_str(
            r#"{"op":"mount","volume_id":"v","target_path":"/t","source":"/d","cache_size":1048576}"#,
        )
        .unwrap();
        assert!(
            matches!(request, crate::control::ControlRequest::Mount(r) if r.cache_size == Some(1 << 20))
        );

        for bad in [
            r#"{"op":"mount","volume_id":"v","target_path":"/t","source":"/d","cacheSize":"1Gi"}"#,
            r#"{"op":"mount","volume_id":"v","target_path":"/t","source":"/d","cache_size":"lots"}"#,
            r#"{"op":"mount","volume_id":"v","target_path":"/t","source":"/d","metadata_ttl":"soon"}"#,
            r#"{"op":"mount","target_path":"/t","source":"/d"}"#,
            r#"{"op":"format_disk"}"#,
        ] {
            assert!(
                serde_json::from_str::<crate::control::ControlRequest>(bad).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn differences_are_named() {
        let a = VolumeSpec::new(request("/data")).unwrap();
        let b = VolumeSpec::new(MountRequest {
            cache_size: Some(1 << 30),
            ..request("/data")
        })
        .unwrap();
        assert!(a.differences(&a).is_empty());
        let diff = a.differences(&b);
        assert_eq!(diff, ["cache_size: mounted none, asked 1Gi"]);
    }
}

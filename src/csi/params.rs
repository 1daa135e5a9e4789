//! Volume parameters: the one parser of the keys a user writes in a StorageClass (`parameters`),
//! a PersistentVolume (`csi.volumeAttributes`) or an inline pod volume (`volumeAttributes`).
//!
//! The controller parses StorageClass parameters with [`VolumeParams::parse`] and stores
//! [`VolumeParams::to_volume_context`] as the volume's `volume_context`; the node parses that
//! map again with the same function, so it mounts exactly what the controller validated
//! (defaults included: they are written out, so a later change of a default does not change
//! existing volumes). Static and inline volumes reach the node without the controller and are
//! parsed there for the first time.
//!
//! Every error names the key, quotes the value and says what is expected. The parser never
//! panics, whatever the input (see the property test at the end).

use std::collections::{BTreeMap, HashMap};

use crate::source::{NfsUrl, SourceSpec, SpecError};
use crate::units::{Size, Ttl};

/// The dataset: `nfs://HOST[:PORT]/EXPORT[/PATH][?nfsport=N&mountport=N]`, an absolute
/// directory (`/PATH`, `local:///PATH`) or a claim (`pvc://NAMESPACE/CLAIM[/PATH]`). Required.
pub const SOURCE: &str = "source";
/// A relative directory inside the source that becomes the volume's root.
pub const SUB_PATH: &str = "subPath";
/// The most the volume's cached bytes may occupy on a node.
pub const CACHE_SIZE: &str = "cacheSize";
/// Fraction of `cacheSize` at which eviction starts.
pub const HIGH_WATERMARK: &str = "highWatermark";
/// Fraction of `cacheSize` at which eviction stops.
pub const LOW_WATERMARK: &str = "lowWatermark";
/// How long names, attributes and listings are trusted.
pub const METADATA_TTL: &str = "metadataTTL";
/// Comma-separated paths inside the volume to load into the cache when it is staged.
pub const PRELOAD: &str = "preload";
/// `"true"`: the volume is never written through.
pub const READ_ONLY: &str = "readOnly";

/// Every key this driver understands, in the order they are documented.
pub const KNOWN_KEYS: [&str; 8] = [
    SOURCE,
    SUB_PATH,
    CACHE_SIZE,
    HIGH_WATERMARK,
    LOW_WATERMARK,
    METADATA_TTL,
    PRELOAD,
    READ_ONLY,
];

/// Keys under this prefix are set by Kubernetes (the external-provisioner with
/// `--extra-create-metadata`, kubelet for pod info and inline volumes): accepted and ignored,
/// except the PVC/PV names that `subPath` may use.
pub const KUBERNETES_PREFIX: &str = "csi.storage.k8s.io/";
/// Set by the external-provisioner on every volume it creates; accepted and ignored.
pub const PROVISIONER_IDENTITY: &str = "storage.kubernetes.io/csiProvisionerIdentity";
/// The claim's name (external-provisioner `--extra-create-metadata`).
pub const PVC_NAME: &str = "csi.storage.k8s.io/pvc/name";
/// The claim's namespace (external-provisioner `--extra-create-metadata`).
pub const PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";
/// The PersistentVolume's name (external-provisioner `--extra-create-metadata`).
pub const PV_NAME: &str = "csi.storage.k8s.io/pv/name";
/// `"true"` in the `volume_context` of an inline (ephemeral) volume, set by kubelet.
pub const EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";

/// The namespace of the pod an inline volume belongs to, set by kubelet when the CSIDriver has
/// `podInfoOnMount: true`.
pub const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
/// The uid of that pod (with `podInfoOnMount`).
pub const POD_UID: &str = "csi.storage.k8s.io/pod.uid";

/// The scheme of claim sources.
pub const CLAIM_SCHEME: &str = "pvc://";

/// The variables `subPath` and `source` may use, and the keys they are read from.
pub const SUB_PATH_VARIABLES: [(&str, &str); 3] = [
    ("pvc.metadata.namespace", PVC_NAMESPACE),
    ("pvc.metadata.name", PVC_NAME),
    ("pv.metadata.name", PV_NAME),
];

pub const DEFAULT_HIGH_WATERMARK: f64 = 0.95;
pub const DEFAULT_LOW_WATERMARK: f64 = 0.85;
pub const DEFAULT_METADATA_TTL: Ttl = Ttl::Finite(std::time::Duration::from_secs(60));
/// The smallest `cacheSize` accepted: below this a cache holds too few blocks to be useful.
pub const MIN_CACHE_SIZE: Size = Size(64 << 20);

/// Longest value accepted for any key (volume contexts are stored by the CO; keep them small).
const MAX_VALUE_LEN: usize = 4096;
/// Most entries in `preload`.
const MAX_PRELOAD_PATHS: usize = 256;

/// A PersistentVolumeClaim whose volume is the dataset: `pvc://NAMESPACE/CLAIM[/PATH]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimSource {
    pub namespace: String,
    pub name: String,
    /// A normalised relative directory inside the claim's volume (as `subPath`).
    pub path: Option<String>,
}

impl std::fmt::Display for ClaimSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{CLAIM_SCHEME}{}/{}", self.namespace, self.name)?;
        match &self.path {
            Some(path) => write!(f, "/{path}"),
            None => Ok(()),
        }
    }
}

/// Where a volume's data lives: a source the daemon reads directly, or a claim the node
/// resolves to one (see `src/csi/claims.rs`).
#[derive(Clone, Debug, PartialEq)]
pub enum VolumeSource {
    Direct(SourceSpec),
    Claim(ClaimSource),
}

impl std::fmt::Display for VolumeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VolumeSource::Direct(spec) => f.write_str(&render_source(spec)),
            VolumeSource::Claim(claim) => write!(f, "{claim}"),
        }
    }
}

/// Validated volume parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumeParams {
    /// The dataset, normalised.
    pub source: VolumeSource,
    /// A normalised relative path inside the source (no `.`, `..` or empty components, no
    /// leading or trailing `/`), with `${...}` variables already expanded.
    pub sub_path: Option<String>,
    /// The most this volume's cached bytes may occupy on a node; `None`: only the node-wide
    /// cache size bounds it.
    pub cache_size: Option<Size>,
    pub high_watermark: f64,
    pub low_watermark: f64,
    pub metadata_ttl: Ttl,
    /// Paths inside the volume, normalised to `/a/b` form (`/` is the whole volume), without
    /// duplicates, in the order given.
    pub preload: Vec<String>,
    pub read_only: bool,
}

/// A parameter that cannot be accepted. The display names the key and the value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error("parameter {key:?} = {}: {expected}", quote(value))]
    Invalid {
        key: String,
        value: String,
        expected: String,
    },
    #[error("parameter {key:?} is required: {expected}")]
    Missing { key: String, expected: String },
    #[error(
        "unknown parameter {}{hint}; known parameters: {known}",
        quote(key),
        hint = suggestion(key),
        known = KNOWN_KEYS.join(", ")
    )]
    Unknown { key: String },
}

impl ParamError {
    /// The key the error is about.
    pub fn key(&self) -> &str {
        match self {
            ParamError::Invalid { key, .. }
            | ParamError::Missing { key, .. }
            | ParamError::Unknown { key } => key,
        }
    }

    fn invalid(key: &str, value: &str, expected: impl Into<String>) -> ParamError {
        ParamError::Invalid {
            key: key.to_string(),
            value: value.to_string(),
            expected: expected.into(),
        }
    }
}

/// True for keys that Kubernetes sets and this driver accepts without interpreting them.
pub fn is_reserved_key(key: &str) -> bool {
    key.starts_with(KUBERNETES_PREFIX) || key == PROVISIONER_IDENTITY
}

impl VolumeParams {
    /// Parses and validates a parameter map. Keys are case-sensitive; reserved keys (see
    /// [`is_reserved_key`]) are accepted; any other unknown key is an error. When several
    /// parameters are wrong, the first in key order is reported, so errors are reproducible.
    pub fn parse<I, K, V>(parameters: I) -> Result<VolumeParams, ParamError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let all: BTreeMap<String, String> = parameters
            .into_iter()
            .map(|(k, v)| (k.as_ref().to_string(), v.as_ref().to_string()))
            .collect();
        let mut ours: BTreeMap<&str, &str> = BTreeMap::new();
        for (key, value) in &all {
            if is_reserved_key(key) {
                continue;
            }
            let Some(known) = KNOWN_KEYS.iter().find(|k| **k == key.as_str()) else {
                return Err(ParamError::Unknown { key: key.clone() });
            };
            if value.len() > MAX_VALUE_LEN {
                return Err(ParamError::invalid(
                    key,
                    value,
                    format!("longer than {MAX_VALUE_LEN} bytes"),
                ));
            }
            ours.insert(known, value);
        }

        let source = match ours.get(SOURCE) {
            Some(value) => parse_volume_source(value, &all)?,
            None => {
                return Err(ParamError::Missing {
                    key: SOURCE.to_string(),
                    expected: "nfs://HOST/EXPORT[/PATH], pvc://NAMESPACE/CLAIM[/PATH] or an \
                               absolute directory such as /data"
                        .to_string(),
                });
            }
        };
        let sub_path = match ours.get(SUB_PATH) {
            Some(value) => parse_sub_path(value, &all)?,
            None => None,
        };
        let cache_size = match ours.get(CACHE_SIZE) {
            Some(value) => Some(parse_cache_size(value)?),
            None => None,
        };
        let high_watermark = match ours.get(HIGH_WATERMARK) {
            Some(value) => parse_fraction(HIGH_WATERMARK, value)?,
            None => DEFAULT_HIGH_WATERMARK,
        };
        let low_watermark = match ours.get(LOW_WATERMARK) {
            Some(value) => parse_fraction(LOW_WATERMARK, value)?,
            None => DEFAULT_LOW_WATERMARK,
        };
        if low_watermark >= high_watermark {
            // Name the key the user wrote; if both were written, the low one.
            let (key, value) = match ours.get(LOW_WATERMARK) {
                Some(low) => (LOW_WATERMARK, *low),
                None => (
                    HIGH_WATERMARK,
                    ours.get(HIGH_WATERMARK).copied().unwrap_or(""),
                ),
            };
            return Err(ParamError::invalid(
                key,
                value,
                format!(
                    "{LOW_WATERMARK} ({low_watermark}) must be below {HIGH_WATERMARK} \
                     ({high_watermark}): 0 < {LOW_WATERMARK} < {HIGH_WATERMARK} <= 1"
                ),
            ));
        }
        let metadata_ttl = match ours.get(METADATA_TTL) {
            Some(value) => value.parse::<Ttl>().map_err(|_| {
                ParamError::invalid(
                    METADATA_TTL,
                    value,
                    "a duration (30s, 5m, 1h, 500ms) or forever",
                )
            })?,
            None => DEFAULT_METADATA_TTL,
        };
        let preload = match ours.get(PRELOAD) {
            Some(value) => parse_preload(value)?,
            None => Vec::new(),
        };
        let read_only = match ours.get(READ_ONLY) {
            Some(&"true") => true,
            Some(&"false") => false,
            Some(value) => {
                return Err(ParamError::invalid(
                    READ_ONLY,
                    value,
                    "\"true\" or \"false\"",
                ));
            }
            None => false,
        };
        Ok(VolumeParams {
            source,
            sub_path,
            cache_size,
            high_watermark,
            low_watermark,
            metadata_ttl,
            preload,
            read_only,
        })
    }

    /// The canonical parameter map: every known key with its value as validated (defaults
    /// written out; `subPath`, `cacheSize` and `preload` only when set). Parsing it again
    /// yields `self`.
    pub fn to_volume_context(&self) -> HashMap<String, String> {
        let mut map = HashMap::new();
        map.insert(SOURCE.to_string(), self.source.to_string());
        if let Some(sub_path) = &self.sub_path {
            map.insert(SUB_PATH.to_string(), sub_path.clone());
        }
        if let Some(size) = self.cache_size {
            map.insert(CACHE_SIZE.to_string(), size.to_string());
        }
        map.insert(HIGH_WATERMARK.to_string(), self.high_watermark.to_string());
        map.insert(LOW_WATERMARK.to_string(), self.low_watermark.to_string());
        map.insert(METADATA_TTL.to_string(), self.metadata_ttl.to_string());
        if !self.preload.is_empty() {
            map.insert(PRELOAD.to_string(), self.preload.join(","));
        }
        map.insert(READ_ONLY.to_string(), self.read_only.to_string());
        map
    }

    /// The volume's root: the source with `subPath` appended. This is what a node mounts, and
    /// what the controller checks. `None` for a claim: resolve it first ([`Self::resolved`]).
    pub fn root(&self) -> Option<SourceSpec> {
        match &self.source {
            VolumeSource::Direct(spec) => Some(spec.join(self.sub_path.as_deref())),
            VolumeSource::Claim(_) => None,
        }
    }

    /// These parameters with the claim replaced by the source its volume resolved to
    /// (`base`, the claim's root): the claim's path is joined, `subPath` stays as it is.
    pub fn resolved(&self, base: &SourceSpec) -> VolumeParams {
        let source = match &self.source {
            VolumeSource::Claim(claim) => base.join(claim.path.as_deref()),
            VolumeSource::Direct(_) => base.clone(),
        };
        VolumeParams {
            source: VolumeSource::Direct(source),
            ..self.clone()
        }
    }
}

/// A `source` value: `${...}` variables expanded, then a claim or a direct source.
fn parse_volume_source(
    value: &str,
    all: &BTreeMap<String, String>,
) -> Result<VolumeSource, ParamError> {
    let expanded;
    let value = if value.contains("${") {
        expanded =
            expand_variables(value, all).map_err(|why| ParamError::invalid(SOURCE, value, why))?;
        expanded.as_str()
    } else {
        value
    };
    match value.strip_prefix(CLAIM_SCHEME) {
        Some(rest) => parse_claim(rest)
            .map(VolumeSource::Claim)
            .map_err(|why| ParamError::invalid(SOURCE, value, why)),
        None => parse_source(value).map(VolumeSource::Direct),
    }
}

/// `NAMESPACE/CLAIM[/PATH]`, with Kubernetes' own rules for the names.
fn parse_claim(rest: &str) -> Result<ClaimSource, String> {
    let expected = "pvc://NAMESPACE/CLAIM[/PATH]";
    let mut parts = rest.splitn(3, '/');
    let namespace = parts.next().unwrap_or_default();
    let name = parts.next().unwrap_or_default();
    if namespace.is_empty() || name.is_empty() {
        return Err(format!("expected {expected}"));
    }
    if !is_dns_label(namespace) {
        return Err(format!(
            "namespace {namespace:?} is not a valid namespace name (lower-case letters, digits \
             and '-', at most 63) in {expected}"
        ));
    }
    if !is_dns_subdomain(name) {
        return Err(format!(
            "claim {name:?} is not a valid claim name (lower-case letters, digits, '-' and '.', \
             at most 253) in {expected}"
        ));
    }
    let path = match parts.next() {
        Some(path) => {
            let normalized = normalize_relative(path).map_err(|why| format!("PATH: {why}"))?;
            (!normalized.is_empty()).then_some(normalized)
        }
        None => None,
    };
    Ok(ClaimSource {
        namespace: namespace.to_string(),
        name: name.to_string(),
        path,
    })
}

/// An RFC 1123 label, as Kubernetes requires of namespace names.
fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// An RFC 1123 subdomain, as Kubernetes requires of claim names.
fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns_label)
}

fn parse_source(value: &str) -> Result<SourceSpec, ParamError> {
    let spec = value.parse::<SourceSpec>().map_err(|e| {
        let expected = match e {
            SpecError::UnknownScheme(_, scheme) => format!(
                "unknown scheme {scheme:?}; expected nfs://HOST/EXPORT[/PATH] or an absolute \
                 directory such as /data"
            ),
            SpecError::Malformed(_, why) => why,
        };
        ParamError::invalid(SOURCE, value, expected)
    })?;
    // Percent-escapes are decoded after the URL's '..' check: look again at what they became.
    if let SourceSpec::Nfs(url) = &spec
        && url.path.split('/').any(|part| part == "." || part == "..")
    {
        return Err(ParamError::invalid(
            SOURCE,
            value,
            "the path must not contain '.' or '..', escaped or not",
        ));
    }
    Ok(spec)
}

/// Renders a source so that parsing the text gives the same [`SourceSpec`]: NFS path
/// components that contain `%` or `?` are escaped, and a directory whose path contains
/// `://` is written as `local://PATH`.
pub fn render_source(source: &SourceSpec) -> String {
    match source {
        SourceSpec::Local(path) => {
            let text = path.to_string_lossy();
            if text.contains("://") {
                format!("local://{text}")
            } else {
                text.into_owned()
            }
        }
        SourceSpec::Nfs(url) => render_nfs(url),
    }
}

fn render_nfs(url: &NfsUrl) -> String {
    let mut out = String::from("nfs://");
    if url.host.contains(':') {
        out.push('[');
        out.push_str(&url.host);
        out.push(']');
    } else {
        out.push_str(&url.host);
    }
    if url.path == "/" {
        out.push('/');
    }
    for part in url.path.split('/').filter(|p| !p.is_empty()) {
        out.push('/');
        for c in part.chars() {
            match c {
                '%' => out.push_str("%25"),
                '?' => out.push_str("%3F"),
                c => out.push(c),
            }
        }
    }
    let mut query = Vec::new();
    if let Some(port) = url.nfs_port {
        query.push(format!("nfsport={port}"));
    }
    if let Some(port) = url.mount_port {
        query.push(format!("mountport={port}"));
    }
    if !query.is_empty() {
        out.push('?');
        out.push_str(&query.join("&"));
    }
    out
}

fn parse_sub_path(
    value: &str,
    all: &BTreeMap<String, String>,
) -> Result<Option<String>, ParamError> {
    let fail = |why: String| ParamError::invalid(SUB_PATH, value, why);
    if value.starts_with('/') {
        return Err(fail(
            "a relative path inside the source (no leading '/')".to_string(),
        ));
    }
    let expanded = expand_variables(value, all).map_err(fail)?;
    let normalized = normalize_relative(&expanded).map_err(fail)?;
    Ok((!normalized.is_empty()).then_some(normalized))
}

/// Replaces `${name}` with the values of the known variables, in one pass.
fn expand_variables(value: &str, all: &BTreeMap<String, String>) -> Result<String, String> {
    let known = || {
        SUB_PATH_VARIABLES
            .iter()
            .map(|(name, _)| format!("${{{name}}}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(format!("unterminated '${{' (variables: {})", known()));
        };
        let name = &after[..end];
        let Some((_, key)) = SUB_PATH_VARIABLES.iter().find(|(n, _)| *n == name) else {
            return Err(format!(
                "unknown variable ${{{name}}} (variables: {})",
                known()
            ));
        };
        let Some(substitute) = all.get(*key) else {
            return Err(format!(
                "${{{name}}} needs the {key} parameter, which this request does not carry \
                 (dynamic provisioning with the external-provisioner's --extra-create-metadata \
                 sets it; static and inline volumes have no claim to name)"
            ));
        };
        let safe = !substitute.is_empty()
            && substitute != "."
            && substitute != ".."
            && !substitute.contains(['/', '\0', '$', '{', '}']);
        if !safe {
            return Err(format!(
                "${{{name}}} expands to {}, which is not a single path component",
                quote(substitute)
            ));
        }
        out.push_str(substitute);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `a//b/./c/` -> `a/b/c`; refuses `..` and NUL.
fn normalize_relative(path: &str) -> Result<String, String> {
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err("'..' is not allowed: the path must stay inside".to_string()),
            part if part.contains('\0') => return Err("contains a NUL byte".to_string()),
            part if part.len() > 255 => {
                return Err("a path component is longer than 255 bytes".to_string());
            }
            part => parts.push(part),
        }
    }
    Ok(parts.join("/"))
}

fn parse_cache_size(value: &str) -> Result<Size, ParamError> {
    let size = value.parse::<Size>().map_err(|_| {
        ParamError::invalid(
            CACHE_SIZE,
            value,
            "a size such as 50Gi, 512Mi or 1G (Kubernetes quantity)",
        )
    })?;
    if size < MIN_CACHE_SIZE {
        return Err(ParamError::invalid(
            CACHE_SIZE,
            value,
            format!("at least {MIN_CACHE_SIZE}"),
        ));
    }
    Ok(size)
}

fn parse_fraction(key: &str, value: &str) -> Result<f64, ParamError> {
    let expected = "a fraction of cacheSize: 0 < lowWatermark < highWatermark <= 1 (e.g. 0.9)";
    let looks_decimal = !value.is_empty()
        && value.len() <= 32
        && value.chars().all(|c| c.is_ascii_digit() || c == '.');
    let fraction = looks_decimal
        .then(|| value.parse::<f64>().ok())
        .flatten()
        .ok_or_else(|| ParamError::invalid(key, value, expected))?;
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(ParamError::invalid(key, value, expected));
    }
    Ok(fraction)
}

fn parse_preload(value: &str) -> Result<Vec<String>, ParamError> {
    let mut paths: Vec<String> = Vec::new();
    for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let normalized = normalize_relative(item).map_err(|why| {
            ParamError::invalid(PRELOAD, value, format!("path {}: {why}", quote(item)))
        })?;
        if normalized.ends_with(char::is_whitespace) {
            return Err(ParamError::invalid(
                PRELOAD,
                value,
                format!("path {}: ends with white space", quote(item)),
            ));
        }
        let path = format!("/{normalized}");
        if !paths.contains(&path) {
            paths.push(path);
        }
        if paths.len() > MAX_PRELOAD_PATHS {
            return Err(ParamError::invalid(
                PRELOAD,
                value,
                format!("at most {MAX_PRELOAD_PATHS} paths"),
            ));
        }
    }
    Ok(paths)
}

/// The value as a quoted, escaped string, shortened if it is long.
fn quote(value: &str) -> String {
    const LIMIT: usize = 200;
    if value.len() <= LIMIT {
        return format!("{value:?}");
    }
    let mut end = LIMIT;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}... ({} bytes)", &value[..end], value.len())
}

/// ` (did you mean "cacheSize"?)` for a key that differs from a known one only in case or
/// separators.
fn suggestion(key: &str) -> String {
    let simplify = |s: &str| -> String {
        s.chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .map(|c| c.to_ascii_lowercase())
            .collect()
    };
    let wanted = simplify(key);
    KNOWN_KEYS
        .iter()
        .find(|k| simplify(k) == wanted)
        .map(|k| format!(" (did you mean {k:?}?)"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<VolumeParams, ParamError> {
        VolumeParams::parse(pairs.iter().copied())
    }

    fn err(pairs: &[(&str, &str)]) -> ParamError {
        parse(pairs).expect_err("should be refused")
    }

    #[test]
    fn defaults() {
        let p = parse(&[("source", "nfs://server/export/data")]).unwrap();
        assert_eq!(p.source.to_string(), "nfs://server/export/data");
        assert_eq!(p.sub_path, None);
        assert_eq!(p.cache_size, None);
        assert_eq!(p.high_watermark, 0.95);
        assert_eq!(p.low_watermark, 0.85);
        assert_eq!(p.metadata_ttl, DEFAULT_METADATA_TTL);
        assert!(p.preload.is_empty());
        assert!(!p.read_only);
    }

    #[test]
    fn every_key() {
        let p = parse(&[
            ("source", "/data//sets/"),
            ("subPath", "./imagenet//train/"),
            ("cacheSize", "100Gi"),
            ("highWatermark", "0.9"),
            ("lowWatermark", "0.5"),
            ("metadataTTL", "forever"),
            ("preload", " train/a , /val,train/a,  "),
            ("readOnly", "true"),
        ])
        .unwrap();
        assert_eq!(
            p.source,
            VolumeSource::Direct(SourceSpec::Local("/data/sets".into()))
        );
        assert_eq!(p.sub_path.as_deref(), Some("imagenet/train"));
        assert_eq!(p.cache_size, Some(Size(100 << 30)));
        assert_eq!((p.high_watermark, p.low_watermark), (0.9, 0.5));
        assert_eq!(p.metadata_ttl, Ttl::Forever);
        assert_eq!(p.preload, vec!["/train/a", "/val"]);
        assert!(p.read_only);
        assert_eq!(
            p.root(),
            Some(SourceSpec::Local("/data/sets/imagenet/train".into()))
        );
    }

    #[test]
    fn claim_sources() {
        let p = parse(&[("source", "pvc://ml/imagenet//train/./"), ("subPath", "v2")]).unwrap();
        let claim = ClaimSource {
            namespace: "ml".into(),
            name: "imagenet".into(),
            path: Some("train".into()),
        };
        assert_eq!(p.source, VolumeSource::Claim(claim));
        assert_eq!(p.root(), None, "a claim has no root until it is resolved");
        assert_eq!(p.to_volume_context()["source"], "pvc://ml/imagenet/train");
        assert_eq!(VolumeParams::parse(&p.to_volume_context()).unwrap(), p);
        // Resolved: the claim's path, then subPath, inside the claim's root.
        let base: SourceSpec = "nfs://filer/exports/pv-1".parse().unwrap();
        let resolved = p.resolved(&base);
        assert_eq!(
            resolved.root().unwrap().to_string(),
            "nfs://filer/exports/pv-1/train/v2"
        );
        assert_eq!(resolved.sub_path.as_deref(), Some("v2"));

        let bare = parse(&[("source", "pvc://ml/imagenet")]).unwrap();
        assert_eq!(
            bare.resolved(&base).root().unwrap().to_string(),
            "nfs://filer/exports/pv-1"
        );

        // One StorageClass for every team's own claim.
        let p = parse(&[
            (
                "source",
                "pvc://${pvc.metadata.namespace}/${pvc.metadata.name}-src",
            ),
            (PVC_NAME, "data"),
            (PVC_NAMESPACE, "team-a"),
        ])
        .unwrap();
        assert_eq!(p.source.to_string(), "pvc://team-a/data-src");
        let e = err(&[("source", "pvc://${pvc.metadata.namespace}/x")]);
        assert!(
            e.to_string().contains("csi.storage.k8s.io/pvc/namespace"),
            "{e}"
        );

        for (bad, why) in [
            ("pvc://ml", "pvc://NAMESPACE/CLAIM"),
            ("pvc:///claim", "pvc://NAMESPACE/CLAIM"),
            ("pvc://ML/claim", "namespace \"ML\""),
            ("pvc://ml/Claim", "claim \"Claim\""),
            ("pvc://ml/a_b", "claim"),
            ("pvc://-ml/claim", "namespace"),
            ("pvc://ml/claim/../other", "'..'"),
            ("pvc://ml/claim/a/../../x", "'..'"),
        ] {
            let e = err(&[("source", bad)]);
            assert_eq!(e.key(), "source");
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn canonical_context_round_trips() {
        let p = parse(&[
            ("source", "nfs://[::1]:2050/exp/a%25b?mountport=7"),
            (
                "subPath",
                "x/${pvc.metadata.namespace}/${pvc.metadata.name}",
            ),
            ("cacheSize", "1.5Gi"),
            ("metadataTTL", "90s"),
            ("preload", "/"),
            (PVC_NAME, "claim"),
            (PVC_NAMESPACE, "team"),
        ])
        .unwrap();
        assert_eq!(p.sub_path.as_deref(), Some("x/team/claim"));
        let context = p.to_volume_context();
        assert!(context.keys().all(|k| KNOWN_KEYS.contains(&k.as_str())));
        assert_eq!(context["cacheSize"], "1536Mi");
        assert_eq!(VolumeParams::parse(&context).unwrap(), p);
        let q = parse(&[("source", "local:///a://b")]).unwrap();
        assert_eq!(VolumeParams::parse(&q.to_volume_context()).unwrap(), q);
    }

    #[test]
    fn sub_path_variables() {
        let base = [
            ("source", "/d"),
            (PVC_NAME, "data-0"),
            (PVC_NAMESPACE, "ml"),
            (PV_NAME, "pvc-123"),
        ];
        let with = |sub: &str| {
            let mut pairs = base.to_vec();
            pairs.push(("subPath", sub));
            parse(&pairs)
        };
        assert_eq!(
            with("${pvc.metadata.namespace}/${pvc.metadata.name}-${pv.metadata.name}")
                .unwrap()
                .sub_path
                .as_deref(),
            Some("ml/data-0-pvc-123")
        );
        for bad in [
            "${pvc.metadata.uid}",
            "${pvc.metadata.name",
            "../x",
            "a/../../b",
            "/abs",
            "a\0b",
        ] {
            let e = with(bad).expect_err(bad);
            assert_eq!(e.key(), "subPath", "{bad}: {e}");
            assert!(e.to_string().contains("subPath"), "{e}");
        }
        assert!(
            with("${pvc.metadata.uid}")
                .unwrap_err()
                .to_string()
                .contains("unknown variable ${pvc.metadata.uid}")
        );
        // Without the provisioner's metadata the variables cannot be expanded.
        let e = err(&[("source", "/d"), ("subPath", "${pvc.metadata.name}")]);
        assert!(e.to_string().contains(PVC_NAME), "{e}");
        // A substituted value cannot walk out.
        let e = err(&[
            ("source", "/d"),
            ("subPath", "${pvc.metadata.name}"),
            (PVC_NAME, ".."),
        ]);
        assert_eq!(e.key(), "subPath");
        assert_eq!(
            with(".").unwrap().sub_path,
            None,
            "'.' is the source itself"
        );
    }

    #[test]
    fn each_bad_value_is_named() {
        for (key, value, expected) in [
            ("source", "s3://bucket/x", "unknown scheme"),
            ("source", "relative/dir", "absolute"),
            ("source", "nfs://host", "export path"),
            ("cacheSize", "lots", "a size"),
            ("cacheSize", "1Mi", "at least 64Mi"),
            ("highWatermark", "1.5", "0 < lowWatermark"),
            ("highWatermark", "-0.5", "fraction"),
            ("highWatermark", "NaN", "fraction"),
            ("lowWatermark", "0", "fraction"),
            ("lowWatermark", "0.97", "must be below highWatermark"),
            ("metadataTTL", "5 minutes", "a duration"),
            ("preload", "a,../b", "'..'"),
            ("readOnly", "yes", "\"true\" or \"false\""),
        ] {
            let mut pairs = vec![("source", "/data")];
            pairs.retain(|(k, _)| *k != key);
            pairs.push((key, value));
            let e = parse(&pairs).expect_err(value);
            let text = e.to_string();
            assert_eq!(e.key(), key, "{text}");
            assert!(text.contains(&format!("{key:?}")), "{text}");
            assert!(text.contains(&format!("{value:?}")), "{text}");
            assert!(text.contains(expected), "{key}={value}: {text}");
        }
        let e = err(&[("source", "/d"), ("highWatermark", "0.8")]);
        assert_eq!(e.key(), "highWatermark", "{e}");
    }

    #[test]
    fn missing_unknown_and_reserved_keys() {
        let e = err(&[]);
        assert_eq!(e.key(), "source");
        assert!(e.to_string().contains("required"));
        let e = err(&[("source", "/d"), ("cachesize", "1Gi")]);
        let text = e.to_string();
        assert!(text.contains("unknown parameter \"cachesize\""), "{text}");
        assert!(text.contains("did you mean \"cacheSize\""), "{text}");
        assert!(text.contains("source, subPath, cacheSize"), "{text}");
        let p = parse(&[
            ("source", "/d"),
            (PVC_NAME, "x"),
            (PVC_NAMESPACE, "y"),
            (PV_NAME, "z"),
            (EPHEMERAL, "true"),
            ("csi.storage.k8s.io/pod.name", "p"),
            ("csi.storage.k8s.io/serviceAccount.tokens", "{}"),
            (PROVISIONER_IDENTITY, "1234-reservoir"),
        ])
        .unwrap();
        assert_eq!(
            p.source,
            VolumeSource::Direct(SourceSpec::Local("/d".into()))
        );
        // The first problem in key order is reported.
        let e = err(&[("zzz", "1"), ("aaa", "2"), ("source", "/d")]);
        assert_eq!(e.key(), "aaa");
    }

    #[test]
    fn long_values_are_shortened_in_messages() {
        let long = "x".repeat(5000);
        let e = err(&[("source", "/d"), ("metadataTTL", &long)]);
        assert!(e.to_string().len() < 600, "{}", e.to_string().len());
    }

    /// A tiny deterministic generator, so the property test needs no extra crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn string(&mut self) -> String {
            const PIECES: [&str; 24] = [
                "/",
                "..",
                ".",
                ",",
                "${",
                "}",
                "pvc.metadata.name",
                "nfs://",
                "local://",
                "?",
                "%",
                "%2E",
                "&nfsport=",
                "=",
                ":",
                "[",
                "]",
                "Gi",
                "0.",
                "9",
                "é",
                "\0",
                " ",
                "forever",
            ];
            let mut s = String::new();
            for _ in 0..self.below(12) {
                if self.below(3) == 0 {
                    let c = char::from_u32(self.below(0x3000) as u32).unwrap_or('x');
                    s.push(c);
                } else {
                    s.push_str(PIECES[self.below(PIECES.len())]);
                }
            }
            s
        }
    }

    #[test]
    fn never_panics_and_accepted_input_round_trips() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let mut accepted = 0;
        for _ in 0..20_000 {
            let mut pairs: Vec<(String, String)> = Vec::new();
            for _ in 0..rng.below(6) {
                let key = if rng.below(4) == 0 {
                    rng.string()
                } else {
                    let keys = [
                        SOURCE,
                        SUB_PATH,
                        CACHE_SIZE,
                        HIGH_WATERMARK,
                        LOW_WATERMARK,
                        METADATA_TTL,
                        PRELOAD,
                        READ_ONLY,
                        PVC_NAME,
                        PVC_NAMESPACE,
                        PV_NAME,
                    ];
                    keys[rng.below(keys.len())].to_string()
                };
                pairs.push((key, rng.string()));
            }
            if rng.below(2) == 0 {
                let sources = [
                    "/data",
                    "nfs://h/e",
                    "nfs://[::1]:1/a?mountport=2",
                    "pvc://ns/claim",
                ];
                let mut source = sources[rng.below(sources.len())].to_string();
                source.push_str(&rng.string());
                pairs.push((SOURCE.to_string(), source));
            }
            match VolumeParams::parse(pairs.iter().map(|(k, v)| (k, v))) {
                Ok(params) => {
                    accepted += 1;
                    let again = VolumeParams::parse(&params.to_volume_context());
                    assert_eq!(again.as_ref(), Ok(&params), "{pairs:?}");
                }
                Err(e) => {
                    let text = e.to_string();
                    if e.key().len() < 100 {
                        assert!(text.contains(&format!("{:?}", e.key())), "{text}");
                    }
                }
            }
        }
        assert!(
            accepted > 100,
            "the generator should produce valid input too"
        );
    }
}

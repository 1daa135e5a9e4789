//! Parsing of source strings: `nfs://HOST[:PORT]/PATH[?nfsport=N&mountport=N]`, `local:///PATH`
//! or a plain absolute `/PATH`.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

/// What a user may write as a source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    Nfs(NfsUrl),
    /// An absolute, lexically normalised directory path.
    Local(PathBuf),
}

/// An NFSv3 location, libnfs style. The export is the longest prefix of `path` that the server
/// exports; the rest of `path` is a directory inside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NfsUrl {
    /// A host name, an IPv4 address, or an IPv6 address without brackets.
    pub host: String,
    /// NFS port; `None` asks the server's portmapper.
    pub nfs_port: Option<u16>,
    /// MOUNT port; `None` asks the server's portmapper.
    pub mount_port: Option<u16>,
    /// Absolute path on the server, normalised (no `.`/`..`/empty components, no trailing `/`).
    pub path: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error(
        "source {0:?}: unknown scheme {1:?} (expected nfs://HOST/PATH, local:///PATH or an absolute path)"
    )]
    UnknownScheme(String, String),
    #[error("source {0:?}: {1}")]
    Malformed(String, String),
}

impl SourceSpec {
    /// The source with a relative directory joined: a directory inside a directory source, or
    /// a longer path on the NFS server (the export is still found by prefix).
    pub fn join(&self, sub_path: Option<&str>) -> SourceSpec {
        let Some(sub) = sub_path else {
            return self.clone();
        };
        match self {
            SourceSpec::Local(path) => SourceSpec::Local(path.join(sub)),
            SourceSpec::Nfs(url) => {
                let mut url = url.clone();
                if !url.path.ends_with('/') {
                    url.path.push('/');
                }
                url.path.push_str(sub);
                SourceSpec::Nfs(url)
            }
        }
    }

    /// The identity of the dataset, used to key cached data and metadata. It does not need the
    /// source to be reachable, so a mount can start offline from what the cache knows.
    pub fn id(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceSpec::Local(path) => write!(f, "{}", path.display()),
            SourceSpec::Nfs(url) => write!(f, "{url}"),
        }
    }
}

impl fmt::Display for NfsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "nfs://[{}]{}", self.host, self.path)?;
        } else {
            write!(f, "nfs://{}{}", self.host, self.path)?;
        }
        match (self.nfs_port, self.mount_port) {
            (Some(n), Some(m)) => write!(f, "?nfsport={n}&mountport={m}"),
            (Some(n), None) => write!(f, "?nfsport={n}"),
            (None, Some(m)) => write!(f, "?mountport={m}"),
            (None, None) => Ok(()),
        }
    }
}

impl FromStr for SourceSpec {
    type Err = SpecError;

    fn from_str(input: &str) -> Result<Self, SpecError> {
        let malformed = |why: &str| SpecError::Malformed(input.to_string(), why.to_string());
        if input.is_empty() {
            return Err(malformed("empty source"));
        }
        if let Some(rest) = input.strip_prefix("nfs://") {
            return parse_nfs(rest)
                .map(SourceSpec::Nfs)
                .map_err(|why| malformed(&why));
        }
        if let Some(rest) = input.strip_prefix("local://") {
            if !rest.starts_with('/') {
                return Err(malformed(
                    "local:// must be followed by an absolute path (local:///data)",
                ));
            }
            return normalize_local(rest)
                .map(SourceSpec::Local)
                .map_err(|why| malformed(&why));
        }
        if let Some((scheme, _)) = input.split_once("://") {
            return Err(SpecError::UnknownScheme(
                input.to_string(),
                scheme.to_string(),
            ));
        }
        if input.starts_with('/') {
            return normalize_local(input)
                .map(SourceSpec::Local)
                .map_err(|why| malformed(&why));
        }
        Err(malformed(
            "a directory source must be an absolute path; remote sources start with nfs://",
        ))
    }
}

fn normalize_local(path: &str) -> Result<PathBuf, String> {
    if path.contains('\0') {
        return Err("path contains a NUL byte".into());
    }
    let mut out = PathBuf::from("/");
    for component in Path::new(path).components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => out.push(part),
            Component::ParentDir => return Err("path must not contain '..'".into()),
            Component::Prefix(_) => return Err("unsupported path prefix".into()),
        }
    }
    Ok(out)
}

fn parse_nfs(rest: &str) -> Result<NfsUrl, String> {
    let (location, query) = match rest.split_once('?') {
        Some((location, query)) => (location, Some(query)),
        None => (rest, None),
    };
    let (authority, path) = match location.find('/') {
        Some(slash) => location.split_at(slash),
        None => return Err("missing export path after the host (nfs://HOST/PATH)".into()),
    };
    let (host, port) = parse_authority(authority)?;
    let path = normalize_nfs_path(path)?;

    let mut url = NfsUrl {
        host,
        nfs_port: port,
        mount_port: None,
        path,
    };
    for pair in query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("query parameter {pair:?} has no value"))?;
        let port = parse_port(value).map_err(|why| format!("{key}: {why}"))?;
        match key {
            "nfsport" => url.nfs_port = Some(port),
            "mountport" => url.mount_port = Some(port),
            other => {
                return Err(format!(
                    "unknown query parameter {other:?} (known: nfsport, mountport)"
                ));
            }
        }
    }
    Ok(url)
}

fn parse_authority(authority: &str) -> Result<(String, Option<u16>), String> {
    if authority.is_empty() {
        return Err("missing host".into());
    }
    if authority.contains('@') {
        return Err("user information in the URL is not supported".into());
    }
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| "unterminated IPv6 address (missing ']')".to_string())?;
        host.parse::<std::net::Ipv6Addr>()
            .map_err(|_| format!("{host:?} is not an IPv6 address"))?;
        let port = match after {
            "" => None,
            _ => Some(parse_port(
                after.strip_prefix(':').ok_or("junk after ']'")?,
            )?),
        };
        return Ok((host.to_string(), port));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (host, Some(parse_port(port)?)),
        None => (authority, None),
    };
    let valid = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_');
    if !valid {
        return Err(format!("{host:?} is not a valid host name"));
    }
    Ok((host.to_string(), port))
}

fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(format!("{text:?} is not a port number (1-65535)")),
    }
}

fn normalize_nfs_path(path: &str) -> Result<String, String> {
    let mut out = String::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err("path must not contain '..'".into()),
            part if part.contains('\0') => return Err("path contains a NUL byte".into()),
            part => {
                // `%2e%2e` is `..` all the same: it would walk out of the allowed prefix on
                // the server (`tests::dot_segments_cannot_be_spelled_with_escapes`).
                let decoded = percent_decode(part)?;
                if decoded == "." || decoded == ".." {
                    return Err(format!("{part:?} is '.' or '..' in percent-escapes"));
                }
                out.push('/');
                out.push_str(&decoded);
            }
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

fn percent_decode(part: &str) -> Result<String, String> {
    if !part.contains('%') {
        return Ok(part.to_string());
    }
    let bytes = part.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {part:?}"))?;
            if hex == b'/' || hex == 0 {
                return Err(format!("escaped '/' or NUL in {part:?}"));
            }
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{part:?} does not decode to UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nfs(s: &str) -> NfsUrl {
        match s.parse::<SourceSpec>() {
            Ok(SourceSpec::Nfs(url)) => url,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn nfs_urls() {
        let url = nfs("nfs://10.0.0.5/exports/data/");
        assert_eq!(url.host, "10.0.0.5");
        assert_eq!(url.path, "/exports/data");
        assert_eq!((url.nfs_port, url.mount_port), (None, None));

        let url = nfs("nfs://server:2049//a/./b?mountport=20048");
        assert_eq!(url.host, "server");
        assert_eq!(url.path, "/a/b");
        assert_eq!((url.nfs_port, url.mount_port), (Some(2049), Some(20048)));

        let url = nfs("nfs://[::1]:2050/x?nfsport=2051");
        assert_eq!(url.host, "::1");
        assert_eq!(url.nfs_port, Some(2051));
        assert_eq!(url.to_string(), "nfs://[::1]/x?nfsport=2051");

        assert_eq!(nfs("nfs://h/").path, "/");
        assert_eq!(nfs("nfs://h/a%20b").path, "/a b");
    }

    #[test]
    fn identity_is_normalised() {
        let a: SourceSpec = "nfs://h//x/y/?nfsport=1&mountport=2".parse().unwrap();
        let b: SourceSpec = "nfs://h/x/y?mountport=2&nfsport=1".parse().unwrap();
        assert_eq!(a.id(), b.id());
        let c: SourceSpec = "local:///data//set/".parse().unwrap();
        let d: SourceSpec = "/data/./set".parse().unwrap();
        assert_eq!(c.id(), d.id());
        assert_eq!(c, SourceSpec::Local(PathBuf::from("/data/set")));
    }

    #[test]
    fn dot_segments_cannot_be_spelled_with_escapes() {
        for bad in [
            "nfs://h/exports/ds/%2e%2e/other",
            "nfs://h/exports/ds/%2E%2e",
            "nfs://h/exports/ds/.%2e/x",
            "nfs://h/exports/%2e",
        ] {
            assert!(bad.parse::<SourceSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_sources_are_refused_with_a_reason() {
        for bad in [
            "",
            "s3://bucket/x",
            "nfs://",
            "nfs://host",
            "nfs:///path",
            "nfs://host:0/x",
            "nfs://host:99999/x",
            "nfs://host/x?nfsport=abc",
            "nfs://host/x?color=red",
            "nfs://host/../etc",
            "nfs://us er/x",
            "nfs://[::1/x",
            "nfs://a@b/x",
            "relative/path",
            "local://relative",
            "/data/../etc",
            "nfs://h/a%2Fb",
        ] {
            let err = bad.parse::<SourceSpec>().expect_err(bad);
            assert!(!err.to_string().is_empty());
        }
        assert!(matches!(
            "s3://bucket/x".parse::<SourceSpec>(),
            Err(SpecError::UnknownScheme(_, scheme)) if scheme == "s3"
        ));
    }
}

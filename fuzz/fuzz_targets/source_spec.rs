//! Source URLs (`nfs://`, `local://`, directories; percent-escapes, IPv6 hosts, ports) and the
//! sizes and durations users write.
//!
//! Properties besides "no panic":
//! - a parsed source, rendered as the driver renders it, parses to the same source, and its
//!   path has no `.`, `..` or empty component;
//! - a size or a TTL, printed, parses to the same value.
#![no_main]

use std::path::Component;
use std::str::FromStr;

use libfuzzer_sys::fuzz_target;
use reservoir::csi::params::render_source;
use reservoir::source::SourceSpec;
use reservoir::units::{Size, Ttl, parse_duration};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = SourceSpec::from_str(text) {
        match &spec {
            SourceSpec::Local(path) => {
                assert!(path.is_absolute(), "{path:?}");
                assert!(
                    path.components()
                        .all(|c| matches!(c, Component::RootDir | Component::Normal(_))),
                    "{path:?}"
                );
            }
            SourceSpec::Nfs(url) => {
                assert!(url.path.starts_with('/'), "{url:?}");
                assert!(
                    !url.path.split('/').skip(1).any(|p| p == "." || p == ".."),
                    "{url:?}"
                );
                assert!(!url.host.is_empty(), "{url:?}");
            }
        }
        let rendered = render_source(&spec);
        assert_eq!(
            SourceSpec::from_str(&rendered).as_ref(),
            Ok(&spec),
            "{text:?} rendered as {rendered:?}"
        );
        let _ = spec.id();
    }
    if let Ok(size) = Size::from_str(text) {
        assert_eq!(Size::from_str(&size.to_string()), Ok(size), "{text:?}");
    }
    if let Ok(ttl) = Ttl::from_str(text) {
        assert_eq!(Ttl::from_str(&ttl.to_string()), Ok(ttl), "{text:?}");
    }
    let _ = parse_duration(text);
});

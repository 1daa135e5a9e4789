//! Property tests of `--allowed-sources`: whatever the spelling of an inline volume's source
//! (host case, `//`, `/./`, trailing slashes, percent-escapes), it is allowed exactly when its
//! canonical form is under an allowed prefix, and no spelling of `..` gets past one.

use proptest::prelude::*;

use super::node::AllowedSources;
use crate::source::SourceSpec;

const PARTS: [&str; 4] = ["data", "Data", "set", "x"];

/// One spelling of a path: random `//`, `/./`, escapes of letters, a trailing slash.
fn spell(parts: &[usize], noise: &[u8]) -> String {
    let mut out = String::new();
    for (i, &p) in parts.iter().enumerate() {
        let n = noise.get(i).copied().unwrap_or(0);
        out.push('/');
        if n & 1 != 0 {
            out.push('/');
        }
        if n & 2 != 0 {
            out.push_str("./");
        }
        let part = PARTS[p];
        if n & 4 != 0 {
            out.push_str(&format!("%{:02X}", part.as_bytes()[0]));
            out.push_str(&part[1..]);
        } else {
            out.push_str(part);
        }
    }
    if noise.last().is_some_and(|n| n & 8 != 0) {
        out.push('/');
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

fn canonical(parts: &[usize]) -> String {
    parts.iter().map(|&p| format!("/{}", PARTS[p])).collect()
}

fn host_case(host: &str, mask: u8) -> String {
    host.chars()
        .enumerate()
        .map(|(i, c)| {
            if mask >> (i % 8) & 1 != 0 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn nfs_sources_are_allowed_by_their_canonical_form(
        prefix in prop::collection::vec(0..PARTS.len(), 0..3),
        path in prop::collection::vec(0..PARTS.len(), 0..4),
        noise in prop::collection::vec(any::<u8>(), 5),
        case in any::<u8>(),
        other_host in any::<bool>(),
    ) {
        let root = if prefix.is_empty() { "/".to_string() } else { canonical(&prefix) };
        let allowed = AllowedSources::parse(&format!("nfs://filer{root}")).unwrap();
        let host = if other_host { "filer2" } else { "filer" };
        let spelled = format!("nfs://{}{}", host_case(host, case), spell(&path, &noise));
        let spec: SourceSpec = spelled.parse().unwrap();
        let expected = !other_host && path.starts_with(&prefix);
        prop_assert_eq!(allowed.permits(&spec), expected, "{}", spelled);
    }

    #[test]
    fn local_sources_are_allowed_by_their_canonical_form(
        prefix in prop::collection::vec(0..PARTS.len(), 1..3),
        path in prop::collection::vec(0..PARTS.len(), 0..4),
        noise in prop::collection::vec(any::<u8>(), 5),
    ) {
        let allowed = AllowedSources::parse(&canonical(&prefix)).unwrap();
        // Directory paths are not URLs: no escapes.
        let noise: Vec<u8> = noise.iter().map(|n| n & !4).collect();
        let spelled = spell(&path, &noise);
        let spec: SourceSpec = spelled.parse().unwrap();
        prop_assert_eq!(allowed.permits(&spec), path.starts_with(&prefix), "{}", spelled);
    }

    #[test]
    fn no_spelling_of_dot_dot_gets_past_a_prefix(
        inside in prop::collection::vec(0..PARTS.len(), 0..3),
        dots in prop::sample::select(vec!["..", "%2e%2e", "%2E%2E", ".%2e", "%2e.", "%2e"]),
        after in prop::collection::vec(0..PARTS.len(), 0..3),
    ) {
        let allowed = AllowedSources::parse("nfs://filer/data").unwrap();
        let spelled = format!("nfs://filer/data{}/{dots}{}", canonical(&inside), canonical(&after));
        let parsed = spelled.parse::<SourceSpec>();
        prop_assert!(parsed.as_ref().map_or(true, |spec| !allowed.permits(spec) || !spec.to_string().contains("/..")),
            "{} parsed as {:?}", spelled, parsed);
        prop_assert!(parsed.is_err(), "{} parsed as {:?}", spelled, parsed);
    }
}

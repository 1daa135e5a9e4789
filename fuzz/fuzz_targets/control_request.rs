//! A control-socket request line, decoded as the mount's and the daemon's sockets decode it
//! (`control::decode_request`), then checked as the daemon checks it: a mount request through
//! `VolumeSpec::new`, a preload's paths through `volume_paths`, an unmount's target through
//! `normalize_target`.
//!
//! Properties besides "no panic": an accepted mount has an absolute target without `..`, a
//! root and preload paths without `..`; the request, encoded again, decodes to the same.
#![no_main]

use std::path::Component;

use libfuzzer_sys::fuzz_target;
use reservoir::control::{ControlRequest, decode_request};
use reservoir::daemon::{VolumeSpec, normalize_target, volume_paths};
use reservoir::source::SourceSpec;

fn no_dot_dot(path: &str) -> bool {
    !path.split('/').any(|p| p == "..")
}

fuzz_target!(|data: &[u8]| {
    let Ok(request) = decode_request(data) else {
        return;
    };
    // What the client side sends for it is read back the same.
    let line = serde_json::to_vec(&request).expect("a request encodes");
    let again = decode_request(&line).expect("an encoded request decodes");
    assert_eq!(format!("{again:?}"), format!("{request:?}"));
    match request {
        ControlRequest::Status => {}
        ControlRequest::Warm { paths, .. } => {
            if let Ok(paths) = volume_paths(&paths) {
                assert!(paths.iter().all(|p| no_dot_dot(p) && !p.starts_with('/')));
            }
        }
        ControlRequest::Mount(mount) => {
            if let Ok(spec) = VolumeSpec::new(mount) {
                let target = &spec.request.target_path;
                assert!(target.is_absolute());
                assert!(!target.components().any(|c| c == Component::ParentDir));
                match &spec.root {
                    SourceSpec::Local(path) => {
                        assert!(!path.components().any(|c| c == Component::ParentDir))
                    }
                    SourceSpec::Nfs(url) => assert!(no_dot_dot(&url.path), "{url:?}"),
                }
                assert!(spec.preload.iter().all(|p| no_dot_dot(p)));
            }
        }
        ControlRequest::Unmount { target_path } => {
            if let Ok(target) = normalize_target(&target_path) {
                assert!(!target.components().any(|c| c == Component::ParentDir));
            }
        }
    }
});

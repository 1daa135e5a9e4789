//! CSI requests through the services' own checks, up to where a mount or a daemon call would
//! happen: CreateVolume and ValidateVolumeCapabilities (controller), NodeStageVolume and
//! NodePublishVolume (node), and `--allowed-sources` for inline volumes.
//!
//! Properties besides "no panic":
//! - a staged or published path is absolute and has no `..`; a sub-path has no `..`;
//! - what the node asks the daemon to mount, the daemon's own check accepts (except a volume
//!   id too long or unprintable for it, which it refuses with that reason);
//! - a created volume's recorded context parses back to the same parameters, and validating
//!   the capabilities and parameters it was created with confirms them.
#![no_main]

use std::collections::HashMap;
use std::path::Component;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use reservoir::csi::capability;
use reservoir::csi::controller::{plan_create, validate_against};
use reservoir::csi::node::{AllowedSources, plan_publish, plan_stage};
use reservoir::csi::params::{KNOWN_KEYS, VolumeParams};
use reservoir::csi::proto::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use reservoir::csi::proto::{
    CapacityRange, CreateVolumeRequest, NodePublishVolumeRequest, NodeStageVolumeRequest,
    ValidateVolumeCapabilitiesRequest, VolumeCapability,
};
use reservoir::daemon::VolumeSpec;
use reservoir::units::Ttl;

/// Keys beyond the driver's own that requests carry.
const OTHER_KEYS: [&str; 5] = [
    "csi.storage.k8s.io/ephemeral",
    "csi.storage.k8s.io/pvc/name",
    "csi.storage.k8s.io/pvc/namespace",
    "csi.storage.k8s.io/pv/name",
    "storage.kubernetes.io/csiProvisionerIdentity",
];

/// Values that get past the first checks, for the fuzzer to start from.
const SAMPLE_VALUES: [&str; 16] = [
    "nfs://filer/data",
    "nfs://[fe80::1]:2049/export/a?nfsport=2049&mountport=20048",
    "/srv/data",
    "local:///srv/data",
    "100Gi",
    "64Mi",
    "0.9",
    "0.8",
    "60s",
    "forever",
    "true",
    "false",
    "${pvc.metadata.namespace}/${pvc.metadata.name}",
    "a/../b",
    "/models,/data/x",
    "%2e%2e",
];

const SAMPLE_PATHS: [&str; 6] = [
    "/var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/pv/mount",
    "/var/lib/kubelet/plugins/kubernetes.io/csi/reservoir/x/globalmount",
    "/a/../b",
    "relative/path",
    "/",
    "//a/./b/",
];

#[derive(Arbitrary, Debug)]
enum Text {
    Raw(String),
    Sample(u8),
}

impl Text {
    fn value(&self) -> String {
        match self {
            Text::Raw(s) => s.clone(),
            Text::Sample(i) => SAMPLE_VALUES[*i as usize % SAMPLE_VALUES.len()].to_string(),
        }
    }

    fn path(&self) -> String {
        match self {
            Text::Raw(s) => s.clone(),
            Text::Sample(i) => SAMPLE_PATHS[*i as usize % SAMPLE_PATHS.len()].to_string(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Key {
    Known(u8),
    Other(u8),
    Raw(String),
}

impl Key {
    fn name(&self) -> String {
        match self {
            Key::Known(i) => KNOWN_KEYS[*i as usize % KNOWN_KEYS.len()].to_string(),
            Key::Other(i) => OTHER_KEYS[*i as usize % OTHER_KEYS.len()].to_string(),
            Key::Raw(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Capability {
    access: u8,
    fs_type: Text,
    mount_flags: Vec<String>,
    mode: Option<i32>,
}

impl Capability {
    fn build(&self) -> VolumeCapability {
        let access_type = match self.access % 3 {
            0 => Some(AccessType::Mount(MountVolume {
                fs_type: match &self.fs_type {
                    Text::Sample(i) => capability::FS_TYPES[*i as usize % 4].to_string(),
                    raw => raw.value(),
                },
                mount_flags: self.mount_flags.clone(),
                volume_mount_group: String::new(),
            })),
            1 => Some(AccessType::Block(BlockVolume {})),
            _ => None,
        };
        VolumeCapability {
            access_type,
            access_mode: self.mode.map(|mode| AccessMode { mode: mode % 9 }),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    call: u8,
    name: String,
    volume_id: Text,
    target: Text,
    staging: Text,
    parameters: Vec<(Key, Text)>,
    capabilities: Vec<Capability>,
    readonly: bool,
    capacity: Option<(i64, i64)>,
    allowed: Text,
}

fn map(pairs: &[(Key, Text)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.name(), v.value())).collect()
}

fn check_path(path: &std::path::Path) {
    assert!(path.is_absolute(), "{path:?}");
    assert!(
        !path.components().any(|c| c == Component::ParentDir),
        "{path:?}"
    );
}

fn check_params(params: &VolumeParams) {
    if let Some(sub) = &params.sub_path {
        assert!(
            !sub.split('/')
                .any(|p| p == ".." || p == "." || p.is_empty()),
            "{sub:?}"
        );
    }
    // What the controller hands the CO comes back to the node: it must parse to the same.
    let again = VolumeParams::parse(params.to_volume_context()).expect("a rendered context parses");
    assert_eq!(&again, params);
}

/// The daemon accepts what the node validated, but for volume ids it bounds itself.
fn check_daemon_accepts(request: reservoir::control::MountRequest) {
    if let Err(e) = VolumeSpec::new(request) {
        assert_eq!(
            e.field, "volume_id",
            "the daemon refused a planned mount: {e}"
        );
    }
}

fuzz_target!(|input: Input| {
    let parameters = map(&input.parameters);
    let capabilities: Vec<VolumeCapability> = input
        .capabilities
        .iter()
        .take(4)
        .map(Capability::build)
        .collect();
    match input.call % 3 {
        0 => {
            let request = CreateVolumeRequest {
                name: input.name.clone(),
                capacity_range: input
                    .capacity
                    .map(|(required_bytes, limit_bytes)| CapacityRange {
                        required_bytes,
                        limit_bytes,
                    }),
                volume_capabilities: capabilities.clone(),
                parameters: parameters.clone(),
                ..Default::default()
            };
            let Ok(plan) = plan_create(&request) else {
                return;
            };
            check_params(&plan.params);
            assert_eq!(
                VolumeParams::parse(&plan.context).as_ref(),
                Ok(&plan.params),
                "the recorded context parses to the volume's parameters"
            );
            let record = plan.record(&request, 0);
            let validate = ValidateVolumeCapabilitiesRequest {
                volume_id: record.volume_id.clone(),
                volume_capabilities: capabilities,
                parameters,
                ..Default::default()
            };
            let answer = validate_against(&record, validate).expect("a created volume validates");
            assert!(
                answer.confirmed.is_some(),
                "what created the volume is refused: {}",
                answer.message
            );
        }
        1 => {
            let request = NodeStageVolumeRequest {
                volume_id: input.volume_id.value(),
                staging_target_path: input.staging.path(),
                volume_capability: capabilities.first().cloned(),
                volume_context: parameters,
                ..Default::default()
            };
            let Ok(plan) = plan_stage(&request) else {
                return;
            };
            check_path(&plan.staging);
            check_params(&plan.params);
            if plan.read_write {
                assert_ne!(plan.params.metadata_ttl, Ttl::Forever);
            }
            if let Some(request) = plan.mount_request() {
                check_daemon_accepts(request);
            }
        }
        _ => {
            let request = NodePublishVolumeRequest {
                volume_id: input.volume_id.value(),
                staging_target_path: input.staging.path(),
                target_path: input.target.path(),
                volume_capability: capabilities.first().cloned(),
                readonly: input.readonly,
                volume_context: parameters,
                ..Default::default()
            };
            let Ok(plan) = plan_publish(&request) else {
                return;
            };
            check_path(&plan.target);
            if let Some(staging) = &plan.staging {
                check_path(staging);
            }
            check_params(&plan.params);
            if !capability::writes(plan.mode) || input.readonly {
                assert!(plan.read_only);
            }
            if let Ok(allowed) = AllowedSources::parse(&input.allowed.value()) {
                // A claim has no root until the API server resolves it.
                if let Some(root) = plan.params.root() {
                    let _ = allowed.permits(&root);
                }
                let _ = allowed.describe();
            }
        }
    }
});

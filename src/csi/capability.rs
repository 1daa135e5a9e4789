//! Which volume capabilities a reservoir volume supports: shared by the controller
//! (CreateVolume, ValidateVolumeCapabilities) and the node (NodeStage/NodePublish).

use super::params::{READ_ONLY, VolumeParams};
use super::proto::VolumeCapability;
use super::proto::volume_capability::AccessType;
use super::proto::volume_capability::access_mode::Mode;

/// File system types a CO may name for a reservoir volume (empty is the usual case).
pub const FS_TYPES: [&str; 4] = ["", "fuse", "fuse.reservoir", "reservoir"];

/// True for the access modes that let a node write.
pub fn writes(mode: Mode) -> bool {
    matches!(
        mode,
        Mode::SingleNodeWriter
            | Mode::MultiNodeSingleWriter
            | Mode::MultiNodeMultiWriter
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter
    )
}

/// Checks one capability against a volume's parameters. Returns the access mode, or why the
/// capability cannot be honoured (a sentence that names the offending field).
///
/// Supported: the mount access type (any mount flags; file system type empty or FUSE) with
/// every access mode. Reads are served through the cache; the writer modes are accepted for
/// volumes whose `readOnly` parameter is not `"true"`.
pub fn check(capability: &VolumeCapability, params: &VolumeParams) -> Result<Mode, String> {
    match &capability.access_type {
        None => {
            return Err(
                "volume capability has no access_type (reservoir volumes are mounted: use mount)"
                    .to_string(),
            );
        }
        Some(AccessType::Block(_)) => {
            return Err(
                "block access is not supported: reservoir volumes are file systems \
                 (use volumeMode: Filesystem)"
                    .to_string(),
            );
        }
        Some(AccessType::Mount(mount)) => {
            if !FS_TYPES.contains(&mount.fs_type.as_str()) {
                return Err(format!(
                    "fs_type {:?} is not supported: reservoir volumes are FUSE file systems \
                     (leave fsType empty)",
                    mount.fs_type
                ));
            }
        }
    }
    let Some(access) = &capability.access_mode else {
        return Err("volume capability has no access_mode".to_string());
    };
    let mode = match Mode::try_from(access.mode) {
        Ok(Mode::Unknown) => return Err("access mode UNKNOWN is not an access mode".to_string()),
        Ok(mode) => mode,
        Err(_) => return Err(format!("unknown access mode {}", access.mode)),
    };
    if writes(mode) && params.read_only {
        return Err(format!(
            "access mode {} writes, but the volume's {READ_ONLY} parameter is \"true\" \
             (use a reader-only mode such as ReadOnlyMany, or set {READ_ONLY} to \"false\")",
            mode.as_str_name()
        ));
    }
    Ok(mode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csi::proto::volume_capability::{AccessMode, BlockVolume, MountVolume};

    fn mount(fs_type: &str, mode: Mode) -> VolumeCapability {
        VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: fs_type.to_string(),
                ..Default::default()
            })),
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn modes_and_types() {
        let rw = VolumeParams::parse([("source", "/d")]).unwrap();
        let ro = VolumeParams::parse([("source", "/d"), ("readOnly", "true")]).unwrap();
        for mode in [
            Mode::SingleNodeWriter,
            Mode::SingleNodeReaderOnly,
            Mode::MultiNodeReaderOnly,
            Mode::MultiNodeSingleWriter,
            Mode::MultiNodeMultiWriter,
            Mode::SingleNodeSingleWriter,
            Mode::SingleNodeMultiWriter,
        ] {
            assert_eq!(check(&mount("", mode), &rw), Ok(mode));
            assert_eq!(check(&mount("", mode), &ro).is_ok(), !writes(mode));
        }
        assert!(check(&mount("ext4", Mode::SingleNodeWriter), &rw).is_err());
        assert!(check(&mount("", Mode::Unknown), &rw).is_err());
        let block = VolumeCapability {
            access_type: Some(AccessType::Block(BlockVolume {})),
            access_mode: Some(AccessMode {
                mode: Mode::MultiNodeReaderOnly as i32,
            }),
        };
        assert!(check(&block, &rw).unwrap_err().contains("block"));
        let mut odd = mount("", Mode::SingleNodeWriter);
        odd.access_mode = Some(AccessMode { mode: 99 });
        assert!(check(&odd, &rw).unwrap_err().contains("99"));
    }
}

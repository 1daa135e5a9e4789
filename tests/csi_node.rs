//! The CSI Node service driven over its unix socket exactly as kubelet drives it, with the
//! real binary, the real cache daemon (started by the node service) and real FUSE mounts.
//!
//! - A conformance suite, rule by rule of the CSI specification (v1.12), against
//!   `reservoir csi` with directory sources: required fields, idempotency, NotFound and
//!   AlreadyExists, the full lifecycle with SINGLE_NODE_WRITER and MULTI_NODE_READER_ONLY,
//!   target path creation and removal, ro/nosuid/nodev in /proc/self/mountinfo.
//! - A kubelet-like end-to-end run against `reservoir node` and `reservoir controller` with an
//!   NFS source (nfs-ganesha in its own network namespace): two pods, an inline volume, a
//!   restart of the node plugin while pods read, a killed daemon.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::csi::{
    Plugin, assert_code, daemon_pid, mount_entry, mounts_under, process_alive, stop_process,
    unix_channel,
};
use common::data::write_random_file;
use common::ganesha::Ganesha;
use common::mount::{as_nobody, signal};
use reservoir::csi::proto::controller_client::ControllerClient;
use reservoir::csi::proto::node_service_capability::rpc::Type as NodeRpc;
use reservoir::csi::proto::plugin_capability::service::Type as ServiceType;
use reservoir::csi::proto::volume_capability::access_mode::Mode;
use reservoir::csi::proto::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use reservoir::csi::proto::*;
use tonic::transport::Channel;
use tonic::{Code, Status};

const EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";

fn capability(mode: Mode) -> Option<VolumeCapability> {
    Some(VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    })
}

fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A dataset directory with a few files, readable by everybody.
fn dataset(plugin: &Plugin, name: &str) -> PathBuf {
    let dir = plugin.path(name);
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("hello.txt"), b"hello from the dataset\n").unwrap();
    write_random_file(&dir.join("sub/blob.bin"), 300_000, 7);
    for d in [&dir, &dir.join("sub")] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

fn stage_request(
    id: &str,
    staging: &Path,
    mode: Mode,
    context: &HashMap<String, String>,
) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: id.to_string(),
        staging_target_path: staging.display().to_string(),
        volume_capability: capability(mode),
        volume_context: context.clone(),
        ..Default::default()
    }
}

fn publish_request(
    id: &str,
    staging: &Path,
    target: &Path,
    mode: Mode,
    readonly: bool,
    context: &HashMap<String, String>,
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: id.to_string(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: capability(mode),
        readonly,
        volume_context: context.clone(),
        ..Default::default()
    }
}

fn unpublish_request(id: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: id.to_string(),
        target_path: target.display().to_string(),
    }
}

fn unstage_request(id: &str, staging: &Path) -> NodeUnstageVolumeRequest {
    NodeUnstageVolumeRequest {
        volume_id: id.to_string(),
        staging_target_path: staging.display().to_string(),
    }
}

fn stats_request(id: &str, path: &Path) -> NodeGetVolumeStatsRequest {
    NodeGetVolumeStatsRequest {
        volume_id: id.to_string(),
        volume_path: path.display().to_string(),
        ..Default::default()
    }
}

/// Per-mount options of the mount at `path` (panics if nothing is mounted there).
#[track_caller]
fn options(path: &Path) -> BTreeSet<String> {
    let (options, _, fs_type) =
        mount_entry(path).unwrap_or_else(|| panic!("{} is not mounted", path.display()));
    assert_eq!(fs_type, "fuse.reservoir", "{}", path.display());
    options.split(',').map(String::from).collect()
}

#[track_caller]
fn assert_flags(path: &Path, read_only: bool) {
    let options = options(path);
    assert!(
        options.contains("nosuid") && options.contains("nodev"),
        "{}: {options:?}",
        path.display()
    );
    assert_eq!(
        options.contains("ro"),
        read_only,
        "{}: {options:?}",
        path.display()
    );
    assert_eq!(
        options.contains("rw"),
        !read_only,
        "{}: {options:?}",
        path.display()
    );
}

fn device(path: &Path) -> String {
    mount_entry(path).map(|(_, dev, _)| dev).unwrap_or_default()
}

async fn create(
    controller: &mut ControllerClient<Channel>,
    name: &str,
    mode: Mode,
    parameters: &[(&str, &str)],
) -> Result<Volume, Status> {
    controller
        .create_volume(CreateVolumeRequest {
            name: name.to_string(),
            volume_capabilities: vec![capability(mode).unwrap()],
            parameters: map(parameters),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().volume.expect("a volume"))
}

#[tokio::test]
async fn identity_info_and_capabilities() {
    let plugin = Plugin::csi(&[]);
    let mut identity = plugin.identity_client().await;
    let info = identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "reservoir.csi.dev");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let caps = identity
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let services: Vec<i32> = caps
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(plugin_capability::Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    assert_eq!(services, vec![ServiceType::ControllerService as i32]);
    assert_eq!(
        identity
            .probe(ProbeRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready,
        Some(true)
    );

    let mut node = plugin.node_client().await;
    for _ in 0..2 {
        let caps = node
            .node_get_capabilities(NodeGetCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner()
            .capabilities;
        let rpcs: BTreeSet<i32> = caps
            .iter()
            .filter_map(|c| {
                let Some(node_service_capability::Type::Rpc(rpc)) = &c.r#type else {
                    return None;
                };
                Some(rpc.r#type)
            })
            .collect();
        assert_eq!(
            rpcs,
            BTreeSet::from([
                NodeRpc::StageUnstageVolume as i32,
                NodeRpc::GetVolumeStats as i32,
                NodeRpc::VolumeCondition as i32
            ])
        );
        let info = node
            .node_get_info(NodeGetInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.node_id, "node-1");
        assert_eq!(
            info.accessible_topology.unwrap().segments,
            map(&[("topology.reservoir.csi.dev/node", "node-1")])
        );
    }
    assert_code(
        node.node_expand_volume(NodeExpandVolumeRequest {
            volume_id: "v".into(),
            volume_path: "/x".into(),
            ..Default::default()
        })
        .await,
        Code::Unimplemented,
        &[],
    );
    // The node service started the cache daemon on its socket.
    assert!(daemon_pid(&plugin.daemon_socket).is_some());
}

#[tokio::test]
async fn every_node_call_requires_its_fields() {
    let plugin = Plugin::csi(&[]);
    let data = dataset(&plugin, "data");
    let context = map(&[("source", data.to_str().unwrap())]);
    let staging = plugin.path("staging");
    let target = plugin.path("target");
    std::fs::create_dir(&staging).unwrap();
    let mut node = plugin.node_client().await;
    let mode = Mode::SingleNodeWriter;

    // NodeStageVolume: volume_id, staging_target_path, volume_capability; a valid context.
    let full = stage_request("vol-1", &staging, mode, &context);
    for (field, request) in [
        (
            "volume_id",
            NodeStageVolumeRequest {
                volume_id: String::new(),
                ..full.clone()
            },
        ),
        (
            "staging_target_path",
            NodeStageVolumeRequest {
                staging_target_path: String::new(),
                ..full.clone()
            },
        ),
        (
            "volume_capability",
            NodeStageVolumeRequest {
                volume_capability: None,
                ..full.clone()
            },
        ),
        (
            "staging_target_path",
            NodeStageVolumeRequest {
                staging_target_path: "relative/dir".into(),
                ..full.clone()
            },
        ),
        (
            "source",
            NodeStageVolumeRequest {
                volume_context: HashMap::new(),
                ..full.clone()
            },
        ),
        (
            "cachesize",
            NodeStageVolumeRequest {
                volume_context: map(&[("source", data.to_str().unwrap()), ("cachesize", "1Gi")]),
                ..full.clone()
            },
        ),
        (
            "block",
            NodeStageVolumeRequest {
                volume_capability: Some(VolumeCapability {
                    access_type: Some(AccessType::Block(BlockVolume {})),
                    access_mode: Some(AccessMode { mode: mode as i32 }),
                }),
                ..full.clone()
            },
        ),
        (
            "readOnly",
            NodeStageVolumeRequest {
                volume_context: map(&[("source", data.to_str().unwrap()), ("readOnly", "true")]),
                ..full.clone()
            },
        ),
    ] {
        assert_code(
            node.node_stage_volume(request).await,
            Code::InvalidArgument,
            &[field],
        );
    }

    // NodePublishVolume: volume_id, target_path, volume_capability.
    let full = publish_request("vol-1", &staging, &target, mode, false, &context);
    for (field, request) in [
        (
            "volume_id",
            NodePublishVolumeRequest {
                volume_id: String::new(),
                ..full.clone()
            },
        ),
        (
            "target_path",
            NodePublishVolumeRequest {
                target_path: String::new(),
                ..full.clone()
            },
        ),
        (
            "volume_capability",
            NodePublishVolumeRequest {
                volume_capability: None,
                ..full.clone()
            },
        ),
        (
            "target_path",
            NodePublishVolumeRequest {
                target_path: "/a/../etc".into(),
                ..full.clone()
            },
        ),
    ] {
        assert_code(
            node.node_publish_volume(request).await,
            Code::InvalidArgument,
            &[field],
        );
    }
    assert!(!target.exists(), "a refused publish creates nothing");

    // NodeUnpublishVolume, NodeUnstageVolume, NodeGetVolumeStats.
    assert_code(
        node.node_unpublish_volume(unpublish_request("", &target))
            .await,
        Code::InvalidArgument,
        &["volume_id"],
    );
    assert_code(
        node.node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: "v".into(),
            target_path: String::new(),
        })
        .await,
        Code::InvalidArgument,
        &["target_path"],
    );
    assert_code(
        node.node_unstage_volume(unstage_request("", &staging))
            .await,
        Code::InvalidArgument,
        &["volume_id"],
    );
    assert_code(
        node.node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: "v".into(),
            staging_target_path: String::new(),
        })
        .await,
        Code::InvalidArgument,
        &["staging_target_path"],
    );
    assert_code(
        node.node_get_volume_stats(stats_request("", &target)).await,
        Code::InvalidArgument,
        &["volume_id"],
    );
    assert_code(
        node.node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "v".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        &["volume_path"],
    );
    assert!(mounts_under(plugin.dir.path()).is_empty());
}

/// Create → Stage → Publish → GetVolumeStats → Unpublish → Unstage → Delete, every call
/// repeated, with the checks the specification asks for at each step.
async fn lifecycle(mode: Mode) {
    let plugin = Plugin::csi(&[]);
    let data = dataset(&plugin, "data");
    let writer = mode == Mode::SingleNodeWriter;
    let mut controller = plugin.controller_client().await;
    let mut node = plugin.node_client().await;
    let parameters = [("source", data.to_str().unwrap()), ("cacheSize", "64Mi")];
    let volume = create(&mut controller, "pvc-life", mode, &parameters)
        .await
        .unwrap();
    let again = create(&mut controller, "pvc-life", mode, &parameters)
        .await
        .unwrap();
    assert_eq!(volume.volume_id, again.volume_id);
    let id = volume.volume_id.clone();
    let context = volume.volume_context.clone();

    // kubelet creates the staging directory and the target's parent.
    let staging = plugin.path("plugins/globalmount");
    std::fs::create_dir_all(&staging).unwrap();
    let pods = plugin.path("pods");
    std::fs::create_dir_all(pods.join("a")).unwrap();
    std::fs::create_dir_all(pods.join("b")).unwrap();
    let target = pods.join("a/mount");
    let target_ro = pods.join("b/mount");

    // Stage, twice; the same volume at another staging path is incompatible.
    for _ in 0..2 {
        node.node_stage_volume(stage_request(&id, &staging, mode, &context))
            .await
            .unwrap();
    }
    assert_eq!(options(&staging).contains("ro"), !writer);
    let other_staging = plugin.path("plugins/other");
    std::fs::create_dir_all(&other_staging).unwrap();
    assert_code(
        node.node_stage_volume(stage_request(&id, &other_staging, mode, &context))
            .await,
        Code::AlreadyExists,
        &[&id],
    );
    // The same staging path with other parameters is incompatible too.
    let mut changed = context.clone();
    changed.insert("metadataTTL".into(), "5m".into());
    assert_code(
        node.node_stage_volume(stage_request(&id, &staging, mode, &changed))
            .await,
        Code::AlreadyExists,
        &["metadata_ttl"],
    );

    // Publish, twice: the target is created, flags hold.
    assert!(!target.exists());
    for _ in 0..2 {
        node.node_publish_volume(publish_request(
            &id, &staging, &target, mode, false, &context,
        ))
        .await
        .unwrap();
    }
    assert_flags(&target, !writer);
    assert_eq!(
        device(&target),
        device(&staging),
        "a bind of the staged session"
    );
    assert_eq!(
        std::fs::read(target.join("hello.txt")).unwrap(),
        b"hello from the dataset\n"
    );
    assert_eq!(
        std::fs::read(target.join("sub/blob.bin")).unwrap(),
        std::fs::read(data.join("sub/blob.bin")).unwrap()
    );
    let write = std::fs::write(target.join("written.txt"), b"by the pod");
    if writer {
        write.unwrap();
        assert_eq!(
            std::fs::read(data.join("written.txt")).unwrap(),
            b"by the pod"
        );
    } else {
        assert_eq!(write.unwrap_err().raw_os_error(), Some(libc::EROFS));
    }
    // A repeat with another readonly flag is incompatible.
    if writer {
        assert_code(
            node.node_publish_volume(publish_request(
                &id, &staging, &target, mode, true, &context,
            ))
            .await,
            Code::AlreadyExists,
            &["already published"],
        );
    }
    // A second pod, read-only.
    for _ in 0..2 {
        node.node_publish_volume(publish_request(
            &id, &staging, &target_ro, mode, true, &context,
        ))
        .await
        .unwrap();
    }
    assert_flags(&target_ro, true);
    assert_eq!(
        std::fs::write(target_ro.join("no.txt"), b"x")
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EROFS)
    );
    assert_eq!(
        std::fs::read(target_ro.join("hello.txt")).unwrap(),
        b"hello from the dataset\n"
    );

    // Stats at the target and at the staging path; NotFound elsewhere or for another id.
    for path in [&target, &target_ro, &staging] {
        let stats = node
            .node_get_volume_stats(stats_request(&id, path))
            .await
            .unwrap()
            .into_inner();
        let condition = stats.volume_condition.unwrap();
        assert!(!condition.abnormal, "{condition:?}");
        let bytes = stats
            .usage
            .iter()
            .find(|u| u.unit == volume_usage::Unit::Bytes as i32)
            .unwrap();
        assert_eq!(bytes.total, 64 << 20, "{bytes:?}");
        assert!(
            bytes.used > 0 && bytes.available > 0 && bytes.used <= bytes.total,
            "{bytes:?}"
        );
        let inodes = stats
            .usage
            .iter()
            .find(|u| u.unit == volume_usage::Unit::Inodes as i32)
            .unwrap();
        assert!(inodes.used >= 2, "{inodes:?}");
    }
    assert_code(
        node.node_get_volume_stats(stats_request(&id, &pods)).await,
        Code::NotFound,
        &["not published or staged"],
    );
    assert_code(
        node.node_get_volume_stats(stats_request("other-volume", &target))
            .await,
        Code::NotFound,
        &["other-volume"],
    );
    // While the volume is published: a relative path, or one that climbs out of the target
    // with `..`, names no place the volume is mounted (the CSI spec's NOT_FOUND, as
    // csi-sanity checks with "some/path").
    let climbing = format!("{}/../target", target.display());
    for path in ["some/path", "target", climbing.as_str()] {
        assert_code(
            node.node_get_volume_stats(stats_request(&id, Path::new(path)))
                .await,
            Code::NotFound,
            &[&id, "not published or staged", path],
        );
    }

    // Unstage while published is refused; nothing changes.
    assert_code(
        node.node_unstage_volume(unstage_request(&id, &staging))
            .await,
        Code::FailedPrecondition,
        &["still published"],
    );
    assert!(target.join("hello.txt").exists());

    // Unpublish, twice each: the targets are unmounted and removed.
    for path in [&target, &target_ro] {
        for _ in 0..2 {
            node.node_unpublish_volume(unpublish_request(&id, path))
                .await
                .unwrap();
        }
        assert!(mount_entry(path).is_none());
        assert!(!path.exists(), "{} is removed", path.display());
        assert_code(
            node.node_get_volume_stats(stats_request(&id, path)).await,
            Code::NotFound,
            &[],
        );
    }
    // Unstage, twice: the daemon's session ends; the staging directory stays (kubelet's).
    for _ in 0..2 {
        node.node_unstage_volume(unstage_request(&id, &staging))
            .await
            .unwrap();
    }
    assert!(mount_entry(&staging).is_none());
    assert!(staging.is_dir());
    for _ in 0..2 {
        controller
            .delete_volume(DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert!(data.join("hello.txt").exists(), "the source is left alone");
    assert!(
        mounts_under(plugin.dir.path()).is_empty(),
        "{:?}",
        mounts_under(plugin.dir.path())
    );
}

#[tokio::test]
async fn lifecycle_single_node_writer() {
    lifecycle(Mode::SingleNodeWriter).await;
}

#[tokio::test]
async fn lifecycle_multi_node_reader_only() {
    lifecycle(Mode::MultiNodeReaderOnly).await;
}

#[tokio::test]
async fn not_found_already_exists_and_nothing_there() {
    let plugin = Plugin::csi(&["--allowed-sources", "/nonexistent/allowed"]);
    let data = dataset(&plugin, "data");
    let mut node = plugin.node_client().await;
    let mode = Mode::MultiNodeReaderOnly;
    let staging = plugin.path("staging");
    std::fs::create_dir(&staging).unwrap();
    let target = plugin.path("target");

    // Unpublish and unstage of what is not there succeed.
    node.node_unpublish_volume(unpublish_request("ghost", &target))
        .await
        .unwrap();
    node.node_unstage_volume(unstage_request("ghost", &staging))
        .await
        .unwrap();
    // Stats of a path where nothing is mounted, that does not exist, or is relative.
    for path in [
        staging.as_path(),
        plugin.path("missing").as_path(),
        Path::new("some/path"),
    ] {
        assert_code(
            node.node_get_volume_stats(stats_request("ghost", path))
                .await,
            Code::NotFound,
            &["ghost"],
        );
    }
    // A directory source that does not exist on the node: NotFound at stage.
    let missing = map(&[("source", plugin.path("no-such-dir").to_str().unwrap())]);
    assert_code(
        node.node_stage_volume(stage_request("vol-missing", &staging, mode, &missing))
            .await,
        Code::NotFound,
        &["no-such-dir"],
    );
    let file = map(&[("source", data.join("hello.txt").to_str().unwrap())]);
    assert_code(
        node.node_stage_volume(stage_request("vol-file", &staging, mode, &file))
            .await,
        Code::FailedPrecondition,
        &["not a directory"],
    );
    // Publish of a volume that was never staged.
    let context = map(&[("source", data.to_str().unwrap())]);
    assert_code(
        node.node_publish_volume(publish_request(
            "vol-1", &staging, &target, mode, true, &context,
        ))
        .await,
        Code::FailedPrecondition,
        &["not staged"],
    );
    assert!(!target.exists());

    // Stage; a second volume on the same staging path is refused.
    node.node_stage_volume(stage_request("vol-1", &staging, mode, &context))
        .await
        .unwrap();
    assert_code(
        node.node_stage_volume(stage_request("vol-2", &staging, mode, &context))
            .await,
        Code::AlreadyExists,
        &["vol-1"],
    );
    // Publishing a read-only staged volume writable: refused.
    assert_code(
        node.node_publish_volume(publish_request(
            "vol-1",
            &staging,
            &target,
            Mode::SingleNodeWriter,
            false,
            &context,
        ))
        .await,
        Code::FailedPrecondition,
        &["read-only"],
    );
    // A target that is a mount point of something else.
    std::fs::create_dir(&target).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(&target)
        .status()
        .unwrap();
    assert!(status.success());
    assert_code(
        node.node_publish_volume(publish_request(
            "vol-1", &staging, &target, mode, true, &context,
        ))
        .await,
        Code::AlreadyExists,
        &["tmpfs"],
    );
    // Unpublish unmounts whatever is at the target and removes it.
    node.node_unpublish_volume(unpublish_request("vol-1", &target))
        .await
        .unwrap();
    assert!(!target.exists());
    // Publishing at a path under the staged volume's own staging path's sibling works; stats
    // with the wrong volume id at the staging path are NotFound.
    assert_code(
        node.node_get_volume_stats(stats_request("vol-2", &staging))
            .await,
        Code::NotFound,
        &["vol-1"],
    );
    // Inline volumes: the source must be under --allowed-sources.
    let inline = NodePublishVolumeRequest {
        volume_id: "csi-inline".into(),
        target_path: target.display().to_string(),
        volume_capability: capability(Mode::SingleNodeWriter),
        volume_context: map(&[("source", data.to_str().unwrap()), (EPHEMERAL, "true")]),
        ..Default::default()
    };
    assert_code(
        node.node_publish_volume(inline).await,
        Code::PermissionDenied,
        &["--allowed-sources", "/nonexistent/allowed"],
    );
    assert!(!target.exists());
    node.node_unstage_volume(unstage_request("vol-1", &staging))
        .await
        .unwrap();
    assert!(
        mounts_under(plugin.dir.path()).is_empty(),
        "{:?}",
        mounts_under(plugin.dir.path())
    );
}

/// Reads `path` as the unprivileged user `nobody`, as a pod would.
#[track_caller]
fn read_as_nobody(path: &Path) -> Vec<u8> {
    let out = as_nobody("cat", &[path.as_os_str()]);
    assert!(
        out.status.success(),
        "cat {} as nobody: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// kubelet's paths for a pod's volume.
fn pod_target(plugin: &Plugin, pod: &str) -> PathBuf {
    let dir = plugin.path(&format!(
        "kubelet/pods/{pod}/volumes/kubernetes.io~csi/data"
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let mut path = plugin.path("kubelet");
    while path != dir {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let next = dir
            .strip_prefix(&path)
            .unwrap()
            .components()
            .next()
            .unwrap();
        path = path.join(next);
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir.join("mount")
}

#[tokio::test]
async fn kubelet_end_to_end_with_nfs() {
    // The dataset, exported by ganesha: a tree the pods read, and a part for inline volumes.
    let export_dir = tempfile::Builder::new()
        .prefix("rsv-csi-export-")
        .tempdir()
        .unwrap();
    let export = export_dir.path();
    let files: Vec<(String, usize)> = vec![
        ("ds/a.bin".into(), 2_000_000),
        ("ds/b.bin".into(), 700_000),
        ("ds/dir/c.txt".into(), 12_345),
        ("ds/dir/d.bin".into(), 1_500_000),
        ("inline/e.bin".into(), 400_000),
        ("private/secret.txt".into(), 100),
    ];
    for (i, (name, size)) in files.iter().enumerate() {
        let path = export.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        write_random_file(&path, *size, i as u64);
    }
    for dir in ["", "ds", "ds/dir", "inline", "private"] {
        std::fs::set_permissions(export.join(dir), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let server = Ganesha::start(export);
    let export_path = server.exports()[0].clone();
    let url = |sub: &str| server.url_with_ports(export_path.join(sub));
    let allowed = server.url(export_path.join("inline"));
    let allowed = allowed.split('?').next().unwrap().to_string();

    // The node plugin (which starts the cache daemon) and the cluster's controller.
    let mut plugin = Plugin::node(&["--allowed-sources", &allowed]);
    let controller = Plugin::controller(&[]);
    let mut ctl = controller.controller_client().await;
    let daemon = plugin.remember_daemon().expect("the node started a daemon");
    // `reservoir node` serves Identity and Node only.
    let caps = plugin
        .identity_client()
        .await
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(caps.capabilities.is_empty(), "{caps:?}");
    assert_code(
        plugin
            .controller_client()
            .await
            .create_volume(CreateVolumeRequest::default())
            .await,
        Code::Unimplemented,
        &[],
    );

    // A bad StorageClass parameter is refused by name before any volume exists.
    assert_code(
        create(
            &mut ctl,
            "pvc-bad",
            Mode::MultiNodeReaderOnly,
            &[("source", &url("ds")), ("cacheSize", "lots")],
        )
        .await,
        Code::InvalidArgument,
        &["cacheSize", "lots"],
    );
    let volume = create(
        &mut ctl,
        "pvc-dataset",
        Mode::MultiNodeReaderOnly,
        &[
            ("source", &url("")),
            ("subPath", "ds"),
            ("cacheSize", "128Mi"),
            ("readOnly", "true"),
        ],
    )
    .await
    .unwrap();
    let id = volume.volume_id.clone();
    let context = volume.volume_context.clone();

    // The node refuses a PV whose attributes carry a bad key, naming it.
    let mut node = plugin.node_client().await;
    let staging =
        plugin.path("kubelet/plugins/kubernetes.io/csi/reservoir.csi.dev/vol/globalmount");
    std::fs::create_dir_all(&staging).unwrap();
    let mut bad = context.clone();
    bad.insert("metadataTtl".into(), "5m".into());
    assert_code(
        node.node_stage_volume(stage_request(
            &id,
            &staging,
            Mode::MultiNodeReaderOnly,
            &bad,
        ))
        .await,
        Code::InvalidArgument,
        &["metadataTtl"],
    );

    // Two pods on the node publish the volume: one FUSE session, one cache.
    node.node_stage_volume(stage_request(
        &id,
        &staging,
        Mode::MultiNodeReaderOnly,
        &context,
    ))
    .await
    .unwrap();
    let pod1 = pod_target(&plugin, "pod-1");
    let pod2 = pod_target(&plugin, "pod-2");
    for target in [&pod1, &pod2] {
        node.node_publish_volume(publish_request(
            &id,
            &staging,
            target,
            Mode::MultiNodeReaderOnly,
            true,
            &context,
        ))
        .await
        .unwrap();
        assert_flags(target, true);
        assert_eq!(device(target), device(&staging));
    }
    let ds_files: Vec<&(String, usize)> =
        files.iter().filter(|(n, _)| n.starts_with("ds/")).collect();
    for target in [&pod1, &pod2] {
        for (name, _) in &ds_files {
            let inside = name.strip_prefix("ds/").unwrap();
            assert_eq!(
                read_as_nobody(&target.join(inside)),
                std::fs::read(export.join(name)).unwrap(),
                "{name}"
            );
        }
    }
    let status = reservoir::daemon::Client::new(&plugin.daemon_socket)
        .status()
        .await
        .unwrap();
    assert_eq!(status.volumes.len(), 1, "one session for both pods");
    let owner = status.volumes[0]
        .volume
        .cache
        .as_ref()
        .unwrap()
        .owner
        .clone()
        .unwrap();
    assert_eq!(owner.files, ds_files.len() as u64, "each file cached once");
    let total: u64 = ds_files.iter().map(|(_, s)| *s as u64).sum();
    assert!(
        status.volumes[0].volume.bytes_fetched <= total + (ds_files.len() as u64) * (1 << 20),
        "the second pod's reads came from the cache: {:?}",
        status.volumes[0].volume
    );

    // The node plugin restarts while pod 1 keeps reading: no read fails, mounts stay.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stop, reads, pod1) = (stop.clone(), reads.clone(), pod1.clone());
        let expected = std::fs::read(export.join("ds/dir/c.txt")).unwrap();
        std::thread::spawn(move || -> Result<(), String> {
            while !stop.load(Ordering::Relaxed) {
                let got = std::fs::read(pod1.join("dir/c.txt")).map_err(|e| e.to_string())?;
                if got != expected {
                    return Err("different bytes".into());
                }
                reads.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        })
    };
    drop(node);
    let exit = plugin.stop();
    assert!(exit.success(), "{exit}:\n{}", plugin.log_text());
    let before = reads.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(200));
    plugin.spawn();
    let mut node = plugin.node_client().await;
    while reads.load(Ordering::Relaxed) < before + 20 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    reader
        .join()
        .unwrap()
        .expect("pod 1 read through the restart");
    assert_eq!(
        plugin.remember_daemon(),
        Some(daemon),
        "the daemon was not restarted"
    );
    let stats = node
        .node_get_volume_stats(stats_request(&id, &pod2))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !stats.volume_condition.as_ref().unwrap().abnormal,
        "{stats:?}"
    );

    // An inline volume from an allowed source; one outside the allowed prefixes is refused.
    let inline_target = pod_target(&plugin, "pod-3");
    let inline = |source: &str| NodePublishVolumeRequest {
        volume_id: "csi-0123456789abcdef".into(),
        target_path: inline_target.display().to_string(),
        volume_capability: capability(Mode::SingleNodeWriter),
        readonly: true,
        volume_context: map(&[
            ("source", source),
            ("metadataTTL", "forever"),
            (EPHEMERAL, "true"),
            ("csi.storage.k8s.io/pod.name", "pod-3"),
            ("csi.storage.k8s.io/pod.namespace", "default"),
        ]),
        ..Default::default()
    };
    assert_code(
        node.node_publish_volume(inline(&url("private"))).await,
        Code::PermissionDenied,
        &["--allowed-sources", "private"],
    );
    for _ in 0..2 {
        node.node_publish_volume(inline(&url("inline")))
            .await
            .unwrap();
    }
    assert_flags(&inline_target, true);
    assert_eq!(
        read_as_nobody(&inline_target.join("e.bin")),
        std::fs::read(export.join("inline/e.bin")).unwrap()
    );
    let stats = node
        .node_get_volume_stats(stats_request("csi-0123456789abcdef", &inline_target))
        .await
        .unwrap()
        .into_inner();
    assert!(!stats.volume_condition.unwrap().abnormal);
    for _ in 0..2 {
        node.node_unpublish_volume(unpublish_request("csi-0123456789abcdef", &inline_target))
            .await
            .unwrap();
    }
    assert!(!inline_target.exists());
    let status = reservoir::daemon::Client::new(&plugin.daemon_socket)
        .status()
        .await
        .unwrap();
    assert_eq!(status.volumes.len(), 1, "the inline volume's session ended");

    // The daemon dies: the condition turns abnormal, with a message.
    signal(daemon, libc::SIGKILL);
    while process_alive(daemon) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = node
        .node_get_volume_stats(stats_request(&id, &pod1))
        .await
        .unwrap()
        .into_inner();
    let condition = stats.volume_condition.unwrap();
    assert!(
        condition.abnormal && condition.message.contains("daemon"),
        "{condition:?}"
    );

    // A later publish starts a new daemon, which takes the volume over from the dead one (the
    // keeper held its connection): pod 1 is served again, and the new pod too.
    let pod4 = pod_target(&plugin, "pod-4");
    node.node_publish_volume(publish_request(
        &id,
        &staging,
        &pod4,
        Mode::MultiNodeReaderOnly,
        true,
        &context,
    ))
    .await
    .unwrap();
    let new_daemon = daemon_pid(&plugin.daemon_socket).expect("a new daemon");
    assert_ne!(new_daemon, daemon);
    plugin.remember_daemon();
    let stats = node
        .node_get_volume_stats(stats_request(&id, &pod1))
        .await
        .unwrap()
        .into_inner();
    let condition = stats.volume_condition.unwrap();
    assert!(
        !condition.abnormal && condition.message.contains("taken over"),
        "{condition:?}"
    );
    assert_eq!(
        read_as_nobody(&pod1.join("b.bin")),
        std::fs::read(export.join("ds/b.bin")).unwrap()
    );
    assert_eq!(
        read_as_nobody(&pod4.join("b.bin")),
        std::fs::read(export.join("ds/b.bin")).unwrap()
    );
    let stats = node
        .node_get_volume_stats(stats_request(&id, &pod4))
        .await
        .unwrap()
        .into_inner();
    assert!(!stats.volume_condition.unwrap().abnormal);

    // The daemon dies again; a repeated stage (as kubelet does for a new pod) starts a third
    // daemon, which takes the volume over again.
    signal(new_daemon, libc::SIGKILL);
    while process_alive(new_daemon) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.node_stage_volume(stage_request(
        &id,
        &staging,
        Mode::MultiNodeReaderOnly,
        &context,
    ))
    .await
    .unwrap();
    let third_daemon = plugin.remember_daemon().expect("a third daemon");
    assert_ne!(third_daemon, new_daemon);
    let stats = node
        .node_get_volume_stats(stats_request(&id, &staging))
        .await
        .unwrap()
        .into_inner();
    assert!(!stats.volume_condition.unwrap().abnormal);
    let pod5 = pod_target(&plugin, "pod-5");
    node.node_publish_volume(publish_request(
        &id,
        &staging,
        &pod5,
        Mode::MultiNodeReaderOnly,
        true,
        &context,
    ))
    .await
    .unwrap();
    assert_eq!(
        read_as_nobody(&pod5.join("dir/c.txt")),
        std::fs::read(export.join("ds/dir/c.txt")).unwrap()
    );

    // kubelet tears everything down: pods, then the staged volume, then the claim.
    for target in [&pod1, &pod2, &pod4, &pod5] {
        node.node_unpublish_volume(unpublish_request(&id, target))
            .await
            .unwrap();
        assert!(!target.exists());
    }
    node.node_unstage_volume(unstage_request(&id, &staging))
        .await
        .unwrap();
    ctl.delete_volume(DeleteVolumeRequest {
        volume_id: id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    drop(node);
    assert!(plugin.stop().success());
    common::csi::stop_process(third_daemon);
    assert!(
        mounts_under(plugin.dir.path()).is_empty(),
        "{:?}",
        mounts_under(plugin.dir.path())
    );
    let everything = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !everything.contains(plugin.dir.path().to_str().unwrap()),
        "no mount left"
    );
}

/// An HTTP GET on 127.0.0.1:`port`: the status line and the body.
fn http_get(port: u16, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// `reservoir node --kubelet-registration-dir` answers kubelet's registration calls as kubelet
/// makes them; `/ready` waits for kubelet's verdict and for the daemon, `/healthz` looks at the
/// node process only; CSI Probe reports the daemon; the registration socket goes on SIGTERM.
#[tokio::test]
async fn kubelet_registration_readiness_and_liveness() {
    use reservoir::csi::registration::proto::registration_client::RegistrationClient;
    use reservoir::csi::registration::proto::{InfoRequest, RegistrationStatus};
    let registry = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut plugin = Plugin::node(&[
        "--kubelet-registration-dir",
        registry.path().to_str().unwrap(),
        "--health-address",
        &format!("127.0.0.1:{port}"),
    ]);
    let socket = registry.path().join("reservoir.csi.dev-reg.sock");
    for _ in 0..100 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut kubelet = RegistrationClient::new(unix_channel(&socket).await);
    let info = kubelet.get_info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.r#type, "CSIPlugin");
    assert_eq!(info.name, "reservoir.csi.dev");
    assert_eq!(Path::new(&info.endpoint), plugin.socket);
    assert_eq!(info.supported_versions, ["1.12.0"]);

    assert_eq!(http_get(port, "/healthz").0, "HTTP/1.1 200 OK");
    let (status, body) = http_get(port, "/ready");
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
    assert!(body.contains("kubelet has not registered"), "{body}");
    kubelet
        .notify_registration_status(RegistrationStatus {
            plugin_registered: false,
            error: "version mismatch".into(),
        })
        .await
        .unwrap();
    let (status, body) = http_get(port, "/ready");
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
    assert!(body.contains("version mismatch"), "{body}");
    kubelet
        .notify_registration_status(RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(http_get(port, "/ready").0, "HTTP/1.1 200 OK");

    // Without a daemon: not ready, Probe says so, and liveness does not care.
    let mut identity = plugin.identity_client().await;
    let probe = identity.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));
    let daemon = daemon_pid(&plugin.daemon_socket).expect("the daemon the node started");
    stop_process(daemon);
    let probe = identity.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(false));
    let (status, body) = http_get(port, "/ready");
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
    assert!(body.contains("daemon does not answer"), "{body}");
    assert_eq!(http_get(port, "/healthz").0, "HTTP/1.1 200 OK");

    plugin.stop();
    assert!(
        !socket.exists(),
        "the registration socket is removed on SIGTERM"
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

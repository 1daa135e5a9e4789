//! `reservoir controller` driven over its unix socket exactly as the external-provisioner and
//! kubelet would: each test starts the real binary on its own socket and state directory,
//! talks gRPC with the generated clients, and stops it. The NFS test uses nfs-ganesha in its
//! own network namespace (root, see `common::ganesha`).

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::csi::{Plugin, assert_code};
use common::ganesha::Ganesha;
use common::mount::bin;
use reservoir::csi::proto::controller_client::ControllerClient;
use reservoir::csi::proto::controller_service_capability::rpc::Type as RpcType;
use reservoir::csi::proto::identity_client::IdentityClient;
use reservoir::csi::proto::node_client::NodeClient;
use reservoir::csi::proto::plugin_capability::service::Type as ServiceType;
use reservoir::csi::proto::volume_capability::access_mode::Mode;
use reservoir::csi::proto::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use reservoir::csi::proto::*;
use tonic::transport::Channel;
use tonic::{Code, Status};

const PVC_NAME: &str = "csi.storage.k8s.io/pvc/name";
const PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";
const PV_NAME: &str = "csi.storage.k8s.io/pv/name";

/// `reservoir controller` on `socket` with `state`, run to its end (a second instance).
fn second_controller(socket: &Path, state: &Path) -> Output {
    Command::new(bin())
        .arg("controller")
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .arg("--state-dir")
        .arg(state)
        .stdin(Stdio::null())
        .output()
        .expect("run a second controller")
}

fn mount(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn request(name: &str, parameters: &[(&str, &str)]) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.to_string(),
        volume_capabilities: vec![mount(Mode::MultiNodeReaderOnly)],
        parameters: parameters
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

fn capacity(required: i64, limit: i64) -> Option<CapacityRange> {
    Some(CapacityRange {
        required_bytes: required,
        limit_bytes: limit,
    })
}

async fn create(
    client: &mut ControllerClient<Channel>,
    request: CreateVolumeRequest,
) -> Result<Volume, Status> {
    client
        .create_volume(request)
        .await
        .map(|r| r.into_inner().volume.expect("a volume"))
}

/// A directory source with one file, standing in for a dataset.
fn dataset() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("train")).unwrap();
    std::fs::write(dir.path().join("train/a.bin"), b"training data").unwrap();
    let source = dir.path().to_str().unwrap().to_string();
    (dir, source)
}

#[tokio::test]
async fn identity_and_capabilities() {
    let ctl = Plugin::controller(&["--driver-name", "datasets.example.com"]);
    let mut identity = IdentityClient::new(ctl.channel().await);
    let info = identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "datasets.example.com");
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

    let probe = identity.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));

    let mut controller = ctl.controller_client().await;
    let caps = controller
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let rpcs: BTreeSet<i32> = caps
        .iter()
        .filter_map(|c| {
            let Some(controller_service_capability::Type::Rpc(rpc)) = &c.r#type else {
                return None;
            };
            Some(rpc.r#type)
        })
        .collect();
    assert_eq!(
        rpcs,
        BTreeSet::from([
            RpcType::CreateDeleteVolume as i32,
            RpcType::ListVolumes as i32
        ])
    );

    // What is not advertised is not implemented, and the node service is not served here.
    assert_code(
        controller.get_capacity(GetCapacityRequest::default()).await,
        Code::Unimplemented,
        &["GetCapacity"],
    );
    assert_code(
        controller
            .controller_publish_volume(ControllerPublishVolumeRequest::default())
            .await,
        Code::Unimplemented,
        &[],
    );
    assert_code(
        controller
            .create_snapshot(CreateSnapshotRequest::default())
            .await,
        Code::Unimplemented,
        &[],
    );
    let mut node = NodeClient::new(ctl.channel().await);
    assert_code(
        node.node_get_info(NodeGetInfoRequest {}).await,
        Code::Unimplemented,
        &[],
    );
}

#[tokio::test]
async fn a_bad_driver_name_or_endpoint_stops_the_command() {
    for args in [
        vec!["--driver-name", "not_a_domain"],
        vec!["--endpoint", "tcp://127.0.0.1:9999"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_reservoir"))
            .arg("controller")
            .args(&args)
            .args(["--state-dir", "/nonexistent/never-created"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(args[1]), "{args:?}: {err}");
    }
    assert!(!Path::new("/nonexistent/never-created").exists());
}

#[tokio::test]
async fn create_volume_requires_its_fields() {
    let ctl = Plugin::controller(&[]);
    let mut client = ctl.controller_client().await;
    let (_data, source) = dataset();
    let ok = request("pvc-1", &[("source", &source)]);

    let mut r = ok.clone();
    r.name.clear();
    assert_code(
        create(&mut client, r).await,
        Code::InvalidArgument,
        &["name"],
    );
    let mut r = ok.clone();
    r.name = "x".repeat(129);
    assert_code(
        create(&mut client, r).await,
        Code::InvalidArgument,
        &["name"],
    );
    let mut r = ok.clone();
    r.volume_capabilities.clear();
    assert_code(
        create(&mut client, r).await,
        Code::InvalidArgument,
        &["volume_capabilities"],
    );
    assert_code(
        create(&mut client, request("pvc-1", &[])).await,
        Code::InvalidArgument,
        &["\"source\"", "required"],
    );
    let mut r = ok.clone();
    r.volume_capabilities = vec![VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }];
    assert_code(
        create(&mut client, r).await,
        Code::InvalidArgument,
        &["block"],
    );
    let mut r = ok.clone();
    r.volume_capabilities[0].access_mode = None;
    assert_code(
        create(&mut client, r).await,
        Code::InvalidArgument,
        &["access_mode"],
    );
    let mut r = ok.clone();
    r.volume_capabilities[0].access_type = Some(AccessType::Mount(MountVolume {
        fs_type: "ext4".to_string(),
        ..Default::default()
    }));
    assert_code(
        create(&mut client, r).await,
        Code::InvalidArgument,
        &["ext4"],
    );
    let mut r = request("pvc-1", &[("source", &source), ("readOnly", "true")]);
    r.volume_capabilities.push(mount(Mode::SingleNodeWriter));
    assert_code(
        create(&mut client, r).await,
        Code::InvalidArgument,
        &["readOnly", "SINGLE_NODE_WRITER"],
    );
    let mut r = ok.clone();
    r.capacity_range = capacity(-1, 0);
    assert_code(
        create(&mut client, r).await,
        Code::InvalidArgument,
        &["required_bytes"],
    );
    let mut r = ok.clone();
    r.capacity_range = capacity(2 << 30, 1 << 30);
    assert_code(
        create(&mut client, r).await,
        Code::InvalidArgument,
        &["limit_bytes"],
    );
    let mut r = ok.clone();
    r.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: "snap".to_string(),
            },
        )),
    });
    assert_code(
        create(&mut client, r).await,
        Code::InvalidArgument,
        &["volume_content_source"],
    );
    // Nothing was recorded by the refused calls.
    let listed = client
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty());

    // Every access mode is accepted (writer modes on a read-write volume), and recorded.
    let mut r = ok.clone();
    r.volume_capabilities = [
        Mode::SingleNodeWriter,
        Mode::SingleNodeReaderOnly,
        Mode::MultiNodeReaderOnly,
        Mode::MultiNodeSingleWriter,
        Mode::MultiNodeMultiWriter,
        Mode::SingleNodeSingleWriter,
        Mode::SingleNodeMultiWriter,
    ]
    .into_iter()
    .map(mount)
    .collect();
    let volume = create(&mut client, r).await.unwrap();
    let record = std::fs::read_to_string(
        ctl.path("state")
            .join("volumes")
            .join(format!("{}.json", volume.volume_id)),
    )
    .unwrap();
    assert!(record.contains("MULTI_NODE_MULTI_WRITER"), "{record}");
}

#[tokio::test]
async fn each_bad_parameter_is_named() {
    let ctl = Plugin::controller(&[]);
    let mut client = ctl.controller_client().await;
    let (_data, source) = dataset();
    for (key, value, expected) in [
        ("source", "s3://bucket/data", "unknown scheme"),
        ("source", "datasets/relative", "absolute"),
        ("source", "nfs://server", "export path"),
        ("subPath", "../escape", "'..'"),
        ("subPath", "/absolute", "relative"),
        ("subPath", "${pvc.metadata.uid}", "unknown variable"),
        ("cacheSize", "lots", "a size"),
        ("cacheSize", "1Mi", "at least 64Mi"),
        ("highWatermark", "1.2", "0 < lowWatermark"),
        ("lowWatermark", "0.99", "must be below highWatermark"),
        ("lowWatermark", "zero", "fraction"),
        ("metadataTTL", "a while", "a duration"),
        ("preload", "train,../../etc", "'..'"),
        ("readOnly", "maybe", "\"true\" or \"false\""),
    ] {
        let mut params = vec![("source", source.as_str())];
        params.retain(|(k, _)| *k != key);
        params.push((key, value));
        let status = create(&mut client, request("pvc-bad", &params))
            .await
            .expect_err(value);
        assert_eq!(status.code(), Code::InvalidArgument, "{key}={value}");
        let message = status.message();
        assert!(message.contains(&format!("{key:?}")), "{message}");
        assert!(message.contains(&format!("{value:?}")), "{message}");
        assert!(message.contains(expected), "{key}={value}: {message}");
    }
}

#[tokio::test]
async fn unknown_keys_are_refused_and_reserved_keys_accepted() {
    let ctl = Plugin::controller(&[]);
    let mut client = ctl.controller_client().await;
    let (_data, source) = dataset();
    assert_code(
        create(
            &mut client,
            request("pvc-u", &[("source", &source), ("cachesize", "1Gi")]),
        )
        .await,
        Code::InvalidArgument,
        &[
            "unknown parameter \"cachesize\"",
            "did you mean \"cacheSize\"",
            "source, subPath, cacheSize, highWatermark, lowWatermark, metadataTTL, preload, readOnly",
        ],
    );
    assert_code(
        create(
            &mut client,
            request("pvc-u", &[("source", &source), ("color", "blue")]),
        )
        .await,
        Code::InvalidArgument,
        &["\"color\""],
    );
    let volume = create(
        &mut client,
        request(
            "pvc-u",
            &[
                ("source", &source),
                (PVC_NAME, "claim"),
                (PVC_NAMESPACE, "team"),
                (PV_NAME, "pvc-u"),
                ("csi.storage.k8s.io/fstype", ""),
                (
                    "storage.kubernetes.io/csiProvisionerIdentity",
                    "1700000000-reservoir",
                ),
            ],
        ),
    )
    .await
    .unwrap();
    // Reserved keys are not passed on: the context holds the canonical parameters only.
    assert!(
        volume.volume_context.keys().all(|k| !k.contains('/')),
        "{:?}",
        volume.volume_context
    );
    assert_eq!(volume.volume_context["source"], source);
    assert_eq!(volume.volume_context["metadataTTL"], "1m");
    assert_eq!(volume.volume_context["readOnly"], "false");
}

#[tokio::test]
async fn sub_path_is_expanded_from_the_claim() {
    let ctl = Plugin::controller(&[]);
    let mut client = ctl.controller_client().await;
    let (_data, source) = dataset();
    let volume = create(
        &mut client,
        request(
            "pvc-s",
            &[
                ("source", &source),
                (
                    "subPath",
                    "users/${pvc.metadata.namespace}/${pvc.metadata.name}/${pv.metadata.name}",
                ),
                (PVC_NAME, "data-0"),
                (PVC_NAMESPACE, "ml"),
                (PV_NAME, "pvc-s"),
            ],
        ),
    )
    .await
    .unwrap();
    assert_eq!(volume.volume_context["subPath"], "users/ml/data-0/pvc-s");

    // Without the provisioner's --extra-create-metadata keys there is nothing to expand.
    assert_code(
        create(
            &mut client,
            request(
                "pvc-s2",
                &[("source", &source), ("subPath", "${pvc.metadata.name}")],
            ),
        )
        .await,
        Code::InvalidArgument,
        &["\"subPath\"", PVC_NAME],
    );
    // A claim name cannot make the path walk out.
    assert_code(
        create(
            &mut client,
            request(
                "pvc-s3",
                &[
                    ("source", &source),
                    ("subPath", "${pvc.metadata.name}"),
                    (PVC_NAME, ".."),
                ],
            ),
        )
        .await,
        Code::InvalidArgument,
        &["\"subPath\""],
    );
}

#[tokio::test]
async fn create_is_idempotent_by_name() {
    let ctl = Plugin::controller(&[]);
    let mut client = ctl.controller_client().await;
    let (_data, source) = dataset();
    let mut first = request(
        "pvc-idem",
        &[
            ("source", &source),
            ("cacheSize", "50Gi"),
            ("preload", "train"),
        ],
    );
    first.capacity_range = capacity(10 << 30, 0);
    let a = create(&mut client, first.clone()).await.unwrap();
    assert_eq!(a.capacity_bytes, 10 << 30);
    assert!(a.volume_id.starts_with("pvc-idem-"), "{}", a.volume_id);
    let b = create(&mut client, first.clone()).await.unwrap();
    assert_eq!(a, b, "the same request gives the same volume");

    // The same values written differently are the same parameters.
    let mut same = request(
        "pvc-idem",
        &[
            ("source", &format!("{source}/")),
            ("cacheSize", "53687091200"),
            ("preload", "/train/"),
            ("metadataTTL", "60s"),
        ],
    );
    same.capacity_range = capacity(1 << 30, 20 << 30);
    assert_eq!(create(&mut client, same).await.unwrap(), a);

    let mut other = first.clone();
    other
        .parameters
        .insert("cacheSize".to_string(), "100Gi".to_string());
    assert_code(
        create(&mut client, other).await,
        Code::AlreadyExists,
        &["pvc-idem", "cacheSize"],
    );
    let mut bigger = first.clone();
    bigger.capacity_range = capacity(20 << 30, 0);
    assert_code(
        create(&mut client, bigger).await,
        Code::AlreadyExists,
        &["capacity"],
    );
    let mut smaller = first.clone();
    smaller.capacity_range = capacity(0, 5 << 30);
    assert_code(
        create(&mut client, smaller).await,
        Code::AlreadyExists,
        &["capacity"],
    );

    // Ids are bounded, whatever the name.
    let long = create(
        &mut client,
        request(&"n".repeat(128), &[("source", &source)]),
    )
    .await
    .unwrap();
    assert!(long.volume_id.len() <= 128, "{}", long.volume_id);
    let odd = create(&mut client, request("Über Daten ✓", &[("source", &source)]))
        .await
        .unwrap();
    assert!(odd.volume_id.len() <= 128, "{}", odd.volume_id);
    assert_ne!(odd.volume_id, long.volume_id);
}

#[tokio::test]
async fn delete_is_idempotent_and_leaves_the_source_alone() {
    let ctl = Plugin::controller(&[]);
    let mut client = ctl.controller_client().await;
    let (data, source) = dataset();
    let volume = create(&mut client, request("pvc-del", &[("source", &source)]))
        .await
        .unwrap();
    let delete = |id: &str| DeleteVolumeRequest {
        volume_id: id.to_string(),
        secrets: HashMap::new(),
    };
    client
        .delete_volume(delete(&volume.volume_id))
        .await
        .unwrap();
    client
        .delete_volume(delete(&volume.volume_id))
        .await
        .unwrap();
    client
        .delete_volume(delete("never-issued-0123"))
        .await
        .unwrap();
    client
        .delete_volume(delete("../../etc/passwd"))
        .await
        .unwrap();
    assert_code(
        client.delete_volume(delete("")).await,
        Code::InvalidArgument,
        &["volume_id"],
    );
    assert_eq!(
        std::fs::read(data.path().join("train/a.bin")).unwrap(),
        b"training data"
    );
    let listed = client
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty());
    assert_code(
        client
            .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                volume_id: volume.volume_id.clone(),
                volume_capabilities: vec![mount(Mode::MultiNodeReaderOnly)],
                ..Default::default()
            })
            .await,
        Code::NotFound,
        &[],
    );
    // The name can be used again.
    let again = create(&mut client, request("pvc-del", &[("source", &source)]))
        .await
        .unwrap();
    assert_eq!(again.volume_id, volume.volume_id);
}

#[tokio::test]
async fn validate_volume_capabilities() {
    let ctl = Plugin::controller(&[]);
    let mut client = ctl.controller_client().await;
    let (_data, source) = dataset();
    let ro = create(
        &mut client,
        request("pvc-ro", &[("source", &source), ("readOnly", "true")]),
    )
    .await
    .unwrap();
    let validate = |id: &str, caps: Vec<VolumeCapability>| ValidateVolumeCapabilitiesRequest {
        volume_id: id.to_string(),
        volume_capabilities: caps,
        ..Default::default()
    };
    let response = client
        .validate_volume_capabilities(validate(
            &ro.volume_id,
            vec![
                mount(Mode::MultiNodeReaderOnly),
                mount(Mode::SingleNodeReaderOnly),
            ],
        ))
        .await
        .unwrap()
        .into_inner();
    let confirmed = response.confirmed.expect("confirmed");
    assert_eq!(confirmed.volume_capabilities.len(), 2);

    let refused = client
        .validate_volume_capabilities(validate(
            &ro.volume_id,
            vec![
                mount(Mode::MultiNodeReaderOnly),
                mount(Mode::MultiNodeMultiWriter),
            ],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(refused.confirmed.is_none());
    assert!(refused.message.contains("readOnly"), "{}", refused.message);

    let block = VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode {
            mode: Mode::MultiNodeReaderOnly as i32,
        }),
    };
    let refused = client
        .validate_volume_capabilities(validate(&ro.volume_id, vec![block]))
        .await
        .unwrap()
        .into_inner();
    assert!(refused.confirmed.is_none());
    assert!(refused.message.contains("block"), "{}", refused.message);

    // The volume's own context is confirmed; another one is not.
    let mut with_context = validate(&ro.volume_id, vec![mount(Mode::MultiNodeReaderOnly)]);
    with_context.volume_context = ro.volume_context.clone();
    let response = client
        .validate_volume_capabilities(with_context.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(response.confirmed.is_some(), "{}", response.message);
    with_context
        .volume_context
        .insert("metadataTTL".to_string(), "5m".to_string());
    let response = client
        .validate_volume_capabilities(with_context)
        .await
        .unwrap()
        .into_inner();
    assert!(response.confirmed.is_none());
    assert!(
        response.message.contains("metadataTTL"),
        "{}",
        response.message
    );

    assert_code(
        client
            .validate_volume_capabilities(validate(
                "pvc-nope-00000000000000000000000000000000",
                vec![mount(Mode::MultiNodeReaderOnly)],
            ))
            .await,
        Code::NotFound,
        &[],
    );
    assert_code(
        client
            .validate_volume_capabilities(validate("", vec![mount(Mode::MultiNodeReaderOnly)]))
            .await,
        Code::InvalidArgument,
        &["volume_id"],
    );
    assert_code(
        client
            .validate_volume_capabilities(validate(&ro.volume_id, vec![]))
            .await,
        Code::InvalidArgument,
        &["volume_capabilities"],
    );
}

#[tokio::test]
async fn list_volumes_pages() {
    let ctl = Plugin::controller(&[]);
    let mut client = ctl.controller_client().await;
    let (_data, source) = dataset();
    let mut created = BTreeSet::new();
    for n in 0..5 {
        let v = create(
            &mut client,
            request(&format!("pvc-list-{n}"), &[("source", &source)]),
        )
        .await
        .unwrap();
        created.insert(v.volume_id);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_volumes(ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 2);
        pages += 1;
        seen.extend(
            page.entries
                .into_iter()
                .map(|e| e.volume.unwrap().volume_id),
        );
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.iter().cloned().collect::<BTreeSet<_>>(), created);
    assert_eq!(seen.len(), 5, "no volume twice");

    let all = client
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.entries.len(), 5);
    assert!(all.next_token.is_empty());

    assert_code(
        client
            .list_volumes(ListVolumesRequest {
                max_entries: 2,
                starting_token: "invalid-token".to_string(),
            })
            .await,
        Code::Aborted,
        &["starting_token"],
    );
    assert_code(
        client
            .list_volumes(ListVolumesRequest {
                max_entries: -1,
                starting_token: String::new(),
            })
            .await,
        Code::InvalidArgument,
        &["max_entries"],
    );
}

// Multi-threaded: the client's connection tasks keep running while the test thread waits for
// the controller to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_survive_a_restart_and_the_socket_is_owned() {
    let mut ctl = Plugin::controller(&[]);
    let (_data, source) = dataset();
    let first = {
        let mut client = ctl.controller_client().await;
        create(&mut client, request("pvc-keep", &[("source", &source)]))
            .await
            .unwrap()
    };

    // A second controller may not take over a socket that is being served, nor the state.
    let other_state = ctl.path("other-state");
    let out = second_controller(&ctl.socket, &other_state);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = second_controller(&ctl.path("other.sock"), &ctl.path("state"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // SIGTERM removes the socket.
    let status = ctl.stop();
    assert!(status.success(), "{status}:\n{}", ctl.log_text());
    assert!(!ctl.socket.exists(), "socket removed on SIGTERM");
    ctl.spawn();

    let mut client = ctl.controller_client().await;
    let listed = client
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 1);
    assert_eq!(listed.entries[0].volume.as_ref(), Some(&first));
    let again = create(&mut client, request("pvc-keep", &[("source", &source)]))
        .await
        .unwrap();
    assert_eq!(again, first);
    let mut changed = request("pvc-keep", &[("source", &source), ("readOnly", "true")]);
    changed.volume_capabilities = vec![mount(Mode::SingleNodeReaderOnly)];
    assert_code(
        create(&mut client, changed).await,
        Code::AlreadyExists,
        &["readOnly"],
    );

    // A crash leaves the socket file behind: the next start replaces it.
    drop(client);
    ctl.kill();
    assert!(ctl.socket.exists());
    ctl.spawn();
    let mut client = ctl.controller_client().await;
    assert_eq!(
        create(&mut client, request("pvc-keep", &[("source", &source)]))
            .await
            .unwrap(),
        first
    );
    drop(client);
    let status = ctl.stop();
    assert!(status.success(), "{status}:\n{}", ctl.log_text());
    ctl.spawn();
    assert!(
        ctl.log_text().contains("controller serving"),
        "{}",
        ctl.log_text()
    );
}

#[tokio::test]
async fn nfs_sources_are_checked_before_a_volume_exists() {
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("export");
    std::fs::create_dir_all(export.join("datasets/imagenet/train")).unwrap();
    std::fs::write(export.join("datasets/imagenet/train/x.bin"), b"bytes").unwrap();
    std::fs::write(export.join("datasets/not-a-dir"), b"file").unwrap();
    let mut server = Ganesha::start(&export);
    let root = server.exports()[0].clone();
    let ctl = Plugin::controller(&["--source-check-timeout", "3s"]);
    let mut client = ctl.controller_client().await;

    let good = server.url(root.join("datasets"));
    let volume = create(
        &mut client,
        request(
            "pvc-nfs",
            &[
                ("source", &good),
                ("subPath", "imagenet"),
                ("metadataTTL", "forever"),
            ],
        ),
    )
    .await
    .unwrap();
    assert_eq!(volume.volume_context["source"], good);
    assert_eq!(volume.volume_context["subPath"], "imagenet");
    // Explicit ports work without the portmapper as well.
    create(
        &mut client,
        request(
            "pvc-nfs-ports",
            &[("source", &server.url_with_ports(&root))],
        ),
    )
    .await
    .unwrap();

    for (name, source, sub_path) in [
        (
            "pvc-missing-path",
            server.url(root.join("datasets/nope")),
            None,
        ),
        ("pvc-missing-sub", good.clone(), Some("imagenet/val")),
        ("pvc-no-export", server.url("/not/exported/anywhere"), None),
    ] {
        let mut params = vec![("source", source.as_str())];
        if let Some(sub) = sub_path {
            params.push(("subPath", sub));
        }
        let status = create(&mut client, request(name, &params))
            .await
            .expect_err(name);
        assert!(
            matches!(status.code(), Code::NotFound | Code::FailedPrecondition),
            "{name}: {status:?}"
        );
        assert!(
            status.message().contains("source"),
            "{name}: {}",
            status.message()
        );
        assert_eq!(
            status.message().matches("nfs://").count(),
            1,
            "the source is named once: {}",
            status.message()
        );
        eprintln!("{name}: {:?}: {}", status.code(), status.message());
    }
    let status = create(
        &mut client,
        request(
            "pvc-file",
            &[("source", &server.url(root.join("datasets/not-a-dir")))],
        ),
    )
    .await
    .expect_err("a file is not a volume");
    assert!(
        matches!(status.code(), Code::NotFound | Code::FailedPrecondition),
        "{status:?}"
    );
    assert!(status.message().contains("not a directory"), "{status:?}");

    // Nothing of the refused volumes was recorded; the good one is.
    let listed = client
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 2);

    // Deleting never touches the export.
    client
        .delete_volume(DeleteVolumeRequest {
            volume_id: volume.volume_id.clone(),
            secrets: HashMap::new(),
        })
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(export.join("datasets/imagenet/train/x.bin")).unwrap(),
        b"bytes"
    );

    // A stopped server: UNAVAILABLE, quickly, so the provisioner retries.
    server.stop();
    let started = Instant::now();
    let status = create(&mut client, request("pvc-down", &[("source", &good)]))
        .await
        .expect_err("server is down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    eprintln!("server down: {}", status.message());
    assert!(status.message().contains("source"), "{}", status.message());
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    // An existing volume is still answered from the record (no source check).
    create(
        &mut client,
        request(
            "pvc-nfs-ports",
            &[("source", &server.url_with_ports(&root))],
        ),
    )
    .await
    .unwrap();
}

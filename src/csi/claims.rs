//! `pvc://NAMESPACE/CLAIM[/PATH]` sources: from a claim to the source the daemon reads.
//!
//! A claim is resolved through the Kubernetes API (the `kube` client, with the pod's service
//! account in a cluster, or the kubeconfig `KUBECONFIG` names): the claim, the PersistentVolume
//! it is bound to, and what that volume is. A volume backed by NFS (an in-tree `nfs` volume, or
//! a volume of the NFS CSI driver `nfs.csi.k8s.io`, whose attributes name the server and share)
//! is read with reservoir's own NFSv3 client: no kernel mount on the node. Any other volume
//! that kubelet mounts into pods' directories (local volumes, CSI volumes, in-tree network file
//! systems) is brought onto the node by a source pod (`source_pods.rs`), as a pod would mount
//! it. A claim still waiting for its first consumer is bound by that source pod.
//!
//! [`resolve_bound`] decides from the objects alone (tested without a cluster); [`Claims`] is
//! the thin adapter that fetches them.

use std::time::Duration;

use k8s_openapi::api::core::v1::{NodeSelector, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::Api;
use tokio::sync::OnceCell;

use super::params::ClaimSource;
use crate::source::{NfsUrl, SourceSpec};

/// The driver name of the NFS CSI driver (kubernetes-csi/csi-driver-nfs).
pub const NFS_CSI_DRIVER: &str = "nfs.csi.k8s.io";

/// The longest one API request may take before the call is answered UNAVAILABLE (retried).
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a claim cannot be used. Every message names the claim.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("claim {claim}: no such PersistentVolumeClaim")]
    NotFound { claim: String },
    #[error(
        "claim {claim}: not bound to a volume (phase {phase}); a claim must be Bound, or wait \
         for its first consumer (a StorageClass with volumeBindingMode WaitForFirstConsumer), \
         before reservoir can read it"
    )]
    NotBound { claim: String, phase: String },
    #[error("claim {claim}: its PersistentVolume {volume} {why}")]
    BadVolume {
        claim: String,
        volume: String,
        why: String,
    },
    #[error(
        "claim {claim}: its PersistentVolume {volume} {kind}, which reservoir cannot read: {why}"
    )]
    Unsupported {
        claim: String,
        volume: String,
        kind: String,
        why: String,
    },
    #[error(
        "claim {claim}: an inline volume may only name a claim of its own pod's namespace \
         ({pod_namespace})"
    )]
    OtherNamespace {
        claim: String,
        pod_namespace: String,
    },
    #[error("claim {claim}: {why}")]
    PodUnknown { claim: String, why: String },
    #[error(
        "claim {claim}: the Kubernetes API refused the driver ({message}); the driver needs \
         the roles of deploy/kubernetes/rbac.yaml, and for claims read through a source pod \
         the ClusterRole reservoir-source-pods bound in the claim's namespace \
         (docs/kubernetes.md, \"Claims as sources\")"
    )]
    Forbidden { claim: String, message: String },
    #[error("claim {claim}: the Kubernetes API did not answer: {message}")]
    Unavailable { claim: String, message: String },
}

impl ClaimError {
    /// The gRPC code of the refusal.
    pub fn code(&self) -> tonic::Code {
        match self {
            ClaimError::NotFound { .. } => tonic::Code::NotFound,
            ClaimError::NotBound { .. }
            | ClaimError::BadVolume { .. }
            | ClaimError::Unsupported { .. }
            | ClaimError::Forbidden { .. } => tonic::Code::FailedPrecondition,
            ClaimError::OtherNamespace { .. } | ClaimError::PodUnknown { .. } => {
                tonic::Code::PermissionDenied
            }
            ClaimError::Unavailable { .. } => tonic::Code::Unavailable,
        }
    }
}

impl From<ClaimError> for tonic::Status {
    fn from(e: ClaimError) -> tonic::Status {
        tonic::Status::new(e.code(), e.to_string())
    }
}

/// How a claim's data reaches the daemon.
#[derive(Clone, Debug, PartialEq)]
pub enum Backing {
    /// The claim's root as an NFS share reservoir's own client reads (the claim's PATH not yet
    /// joined): no mount on the node.
    Nfs(SourceSpec),
    /// Kubelet mounts the volume for a source pod on the node; the daemon reads that mount.
    SourcePod,
}

/// What a claim resolved to.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    pub backing: Backing,
    /// The PersistentVolume's name; `None` for a claim waiting for its first consumer.
    pub volume: Option<String>,
    /// What the volume is, for the status: `in-tree nfs`, `a local volume`, ...
    pub kind: String,
    /// The nodes the volume can be used on (a local volume's node), if it says.
    pub node_affinity: Option<NodeSelector>,
    /// The claim may be mounted on one node at a time (ReadWriteOnce or ReadWriteOncePod).
    pub single_node: bool,
}

impl Resolved {
    /// One line for the status and the logs: which claim, which volume, how it is read.
    pub fn describe(&self, claim: &ClaimSource) -> String {
        let volume = match &self.volume {
            Some(volume) => format!("PersistentVolume {volume}"),
            None => "a volume bound at first use".to_string(),
        };
        match &self.backing {
            Backing::Nfs(_) => format!(
                "{claim} -> {volume} ({}): reservoir's NFSv3 client, no mount on the node",
                self.kind
            ),
            Backing::SourcePod => {
                format!("{claim} -> {volume} ({}): mounted by kubelet", self.kind)
            }
        }
    }
}

/// The claim's volume, from the claim, its PersistentVolume (`None`: not found) and whether
/// its StorageClass waits for a first consumer to bind it.
pub fn resolve_bound(
    source: &ClaimSource,
    claim: &PersistentVolumeClaim,
    volume: Option<&PersistentVolume>,
    waits_for_consumer: bool,
) -> Result<Resolved, ClaimError> {
    let name = format!("{}/{}", source.namespace, source.name);
    let phase = claim
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Pending".to_string());
    let single_node = claim
        .spec
        .as_ref()
        .and_then(|s| s.access_modes.as_ref())
        .is_some_and(|modes| {
            !modes.is_empty()
                && modes
                    .iter()
                    .all(|m| m == "ReadWriteOnce" || m == "ReadWriteOncePod")
        });
    let bound_to = claim.spec.as_ref().and_then(|s| s.volume_name.clone());
    if phase == "Pending" && bound_to.is_none() && waits_for_consumer {
        let class = claim
            .spec
            .as_ref()
            .and_then(|s| s.storage_class_name.clone())
            .unwrap_or_default();
        return Ok(Resolved {
            backing: Backing::SourcePod,
            volume: None,
            kind: format!("StorageClass {class}, waiting for its first consumer"),
            node_affinity: None,
            single_node,
        });
    }
    let Some(volume_name) = bound_to.filter(|_| phase == "Bound") else {
        return Err(ClaimError::NotBound { claim: name, phase });
    };
    let bad = |why: String| ClaimError::BadVolume {
        claim: name.clone(),
        volume: volume_name.clone(),
        why,
    };
    let Some(volume) = volume else {
        return Err(bad("does not exist".to_string()));
    };
    let spec = volume
        .spec
        .as_ref()
        .ok_or_else(|| bad("has no spec".to_string()))?;
    // The binding goes both ways: a claim naming a volume bound to another claim is no claim
    // on its data.
    let back = spec.claim_ref.as_ref();
    let bound_back = back.is_some_and(|r| {
        r.namespace.as_deref() == Some(source.namespace.as_str())
            && r.name.as_deref() == Some(source.name.as_str())
            && (r.uid.is_none() || r.uid == claim.metadata.uid)
    });
    if !bound_back {
        return Err(bad("is not bound to this claim".to_string()));
    }
    let resolved = |backing: Backing, kind: String| Resolved {
        backing,
        volume: Some(volume_name.clone()),
        kind,
        node_affinity: spec.node_affinity.as_ref().and_then(|a| a.required.clone()),
        single_node,
    };
    let unsupported = |kind: &str, why: &str| ClaimError::Unsupported {
        claim: name.clone(),
        volume: volume_name.clone(),
        kind: kind.to_string(),
        why: why.to_string(),
    };
    if spec.volume_mode.as_deref() == Some("Block") {
        return Err(unsupported(
            "is a raw block volume (volumeMode Block)",
            "it holds no file system to read; use a Filesystem volume",
        ));
    }
    if let Some(nfs) = &spec.nfs {
        let url = nfs_url(&nfs.server, &nfs.path).map_err(bad)?;
        return Ok(resolved(
            Backing::Nfs(SourceSpec::Nfs(url)),
            "in-tree nfs".to_string(),
        ));
    }
    if let Some(csi) = &spec.csi
        && csi.driver == NFS_CSI_DRIVER
    {
        let attributes = csi.volume_attributes.clone().unwrap_or_default();
        let attribute = |key: &str| {
            attributes.get(key).cloned().ok_or_else(|| {
                bad(format!(
                    "({NFS_CSI_DRIVER}) has no volume attribute {key:?}"
                ))
            })
        };
        let server = attribute("server")?;
        let mut path = attribute("share")?;
        if let Some(subdir) = attributes.get("subdir").filter(|s| !s.is_empty()) {
            path = format!("{}/{subdir}", path.trim_end_matches('/'));
        }
        let url = nfs_url(&server, &path).map_err(bad)?;
        return Ok(resolved(
            Backing::Nfs(SourceSpec::Nfs(url)),
            NFS_CSI_DRIVER.to_string(),
        ));
    }
    if spec.host_path.is_some() {
        return Err(unsupported(
            "is a hostPath volume",
            "it is a directory on some node that kubelet hands to containers as it is, never \
             mounting it where the driver can see it; use a local PersistentVolume (which \
             kubelet mounts) or name the directory itself as the source",
        ));
    }
    if let Some(csi) = &spec.csi {
        if csi.driver == super::DEFAULT_DRIVER_NAME {
            return Err(unsupported(
                "is a reservoir volume",
                "a cache in front of a cache reads everything twice; name its source instead",
            ));
        }
        return Ok(resolved(
            Backing::SourcePod,
            format!("a CSI volume of the driver {}", csi.driver),
        ));
    }
    Ok(resolved(Backing::SourcePod, volume_kind(spec).to_string()))
}

/// Why reservoir's NFSv3 client cannot read a claim's NFS share that kubelet could mount
/// (`None`: another failure, reported as it is). The server speaks NFSv4 only, or the path is
/// no NFSv3 export (an NFSv4 pseudo path): the claim is then read through a source pod.
pub fn nfs_v3_refusal(error: &crate::source::SourceError) -> Option<String> {
    use crate::source::SourceError;
    match error {
        SourceError::NotOffered { message, .. } => Some(message.clone()),
        SourceError::Invalid(message) if message.contains("no export of") => {
            Some(format!("{message} (an NFSv4 pseudo path?)"))
        }
        _ => None,
    }
}

/// The server and path of an NFS volume as an NFS URL: the path absolute, without `.`, `..` or
/// empty components.
fn nfs_url(server: &str, path: &str) -> Result<NfsUrl, String> {
    let host = server
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(server);
    let host_ok = host.parse::<std::net::IpAddr>().is_ok()
        || (!host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')));
    if !host_ok {
        return Err(format!("names the NFS server {server:?}, not a host"));
    }
    if !path.starts_with('/') {
        return Err(format!("names the NFS path {path:?}, not an absolute path"));
    }
    let mut normalized = String::new();
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part == ".." || part.contains('\0') {
            return Err(format!(
                "names the NFS path {path:?}, which leaves its export"
            ));
        }
        normalized.push('/');
        normalized.push_str(part);
    }
    if normalized.is_empty() {
        normalized.push('/');
    }
    Ok(NfsUrl {
        host: host.to_string(),
        nfs_port: None,
        mount_port: None,
        path: normalized,
    })
}

/// The volume source a PersistentVolume uses, for messages.
fn volume_kind(spec: &k8s_openapi::api::core::v1::PersistentVolumeSpec) -> &'static str {
    match spec {
        s if s.host_path.is_some() => "a hostPath volume",
        s if s.local.is_some() => "a local volume",
        s if s.cephfs.is_some() => "a CephFS volume",
        s if s.rbd.is_some() => "an RBD volume",
        s if s.iscsi.is_some() => "an iSCSI volume",
        s if s.fc.is_some() => "a Fibre Channel volume",
        s if s.glusterfs.is_some() => "a GlusterFS volume",
        s if s.azure_file.is_some() => "an Azure File volume",
        s if s.aws_elastic_block_store.is_some() => "an AWS EBS volume",
        s if s.gce_persistent_disk.is_some() => "a GCE persistent disk",
        s if s.nfs.is_some() => "an in-tree nfs volume",
        _ => "a volume",
    }
}

/// The namespace of the pod an inline volume belongs to, as kubelet gave it (`podInfoOnMount`).
///
/// Kubelet writes the pod's namespace and uid over any the pod author put in the volume's
/// attributes, but only when the CSIDriver has `podInfoOnMount: true`. So the uid in the
/// attributes must be the one in the target path (which kubelet chooses:
/// `.../pods/<uid>/volumes/...`): a pod author cannot know their pod's uid when writing its
/// spec, which cannot change afterwards, so attributes that pass this check came from kubelet.
pub fn inline_pod_namespace(
    claim: &ClaimSource,
    pod_namespace: Option<&str>,
    pod_uid: Option<&str>,
    target_path: &std::path::Path,
) -> Result<String, ClaimError> {
    let name = format!("{}/{}", claim.namespace, claim.name);
    let unknown = |why: &str| ClaimError::PodUnknown {
        claim: name.clone(),
        why: format!(
            "{why}: an inline volume names a claim only with the CSIDriver's podInfoOnMount \
             set to true (deploy/kubernetes/csidriver.yaml), so that kubelet tells the node \
             which namespace the pod is in"
        ),
    };
    let (Some(namespace), Some(uid)) = (pod_namespace, pod_uid) else {
        return Err(unknown("kubelet did not say which pod the volume is for"));
    };
    let path_uid = target_path
        .components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .windows(3)
        .find(|w| w[0] == "pods" && w[2] == "volumes")
        .map(|w| w[1].to_string());
    if path_uid.as_deref() != Some(uid) {
        return Err(unknown(
            "the pod uid in the volume's attributes is not the one in its target path",
        ));
    }
    if namespace != claim.namespace {
        return Err(ClaimError::OtherNamespace {
            claim: name,
            pod_namespace: namespace.to_string(),
        });
    }
    Ok(namespace.to_string())
}

/// Resolves claims through the Kubernetes API. The client is made at the first claim, so that
/// a driver that is never given one never needs API access.
#[derive(Default)]
pub struct Claims {
    client: OnceCell<kube::Client>,
}

impl Claims {
    /// The API client, made at the first call.
    pub async fn client(&self, claim: &str) -> Result<kube::Client, ClaimError> {
        self.client
            .get_or_try_init(|| async {
                kube::Client::try_default()
                    .await
                    .map_err(|e| ClaimError::Unavailable {
                        claim: claim.to_string(),
                        message: format!(
                            "no Kubernetes client (in-pod service account or KUBECONFIG): {e}"
                        ),
                    })
            })
            .await
            .cloned()
    }

    /// The claim's volume, and how it is read.
    pub async fn resolve(&self, source: &ClaimSource) -> Result<Resolved, ClaimError> {
        let name = format!("{}/{}", source.namespace, source.name);
        let client = self.client(&name).await?;
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &source.namespace);
        let claim =
            api_call(&name, claims.get_opt(&source.name))
                .await?
                .ok_or(ClaimError::NotFound {
                    claim: name.clone(),
                })?;
        let spec = claim.spec.as_ref();
        let bound_to = spec.and_then(|s| s.volume_name.clone());
        let volume = match &bound_to {
            Some(volume) => {
                let volumes: Api<PersistentVolume> = Api::all(client.clone());
                api_call(&name, volumes.get_opt(volume)).await?
            }
            None => None,
        };
        let class = spec
            .and_then(|s| s.storage_class_name.clone())
            .filter(|c| !c.is_empty());
        let waits_for_consumer = match (&bound_to, class) {
            (None, Some(class)) => {
                let classes: Api<StorageClass> = Api::all(client);
                api_call(&name, classes.get_opt(&class))
                    .await?
                    .and_then(|c| c.volume_binding_mode)
                    .is_some_and(|mode| mode == "WaitForFirstConsumer")
            }
            _ => false,
        };
        resolve_bound(source, &claim, volume.as_ref(), waits_for_consumer)
    }
}

/// One API call within [`API_TIMEOUT`], its failure named after `claim`.
pub async fn api_call<T>(
    claim: &str,
    call: impl Future<Output = kube::Result<T>>,
) -> Result<T, ClaimError> {
    match tokio::time::timeout(API_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(kube::Error::Api(status))) if status.code == 401 || status.code == 403 => {
            Err(ClaimError::Forbidden {
                claim: claim.to_string(),
                message: status.message.clone(),
            })
        }
        Ok(Err(e)) => Err(ClaimError::Unavailable {
            claim: claim.to_string(),
            message: e.to_string(),
        }),
        Err(_) => Err(ClaimError::Unavailable {
            claim: claim.to_string(),
            message: format!("no answer within {API_TIMEOUT:?}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        CSIPersistentVolumeSource, HostPathVolumeSource, LocalVolumeSource, NFSVolumeSource,
        NodeSelectorRequirement, NodeSelectorTerm, ObjectReference, PersistentVolumeClaimSpec,
        PersistentVolumeClaimStatus, PersistentVolumeSpec, VolumeNodeAffinity,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn source() -> ClaimSource {
        ClaimSource {
            namespace: "ml".into(),
            name: "data".into(),
            path: None,
        }
    }

    fn claim(phase: &str, volume: Option<&str>) -> PersistentVolumeClaim {
        PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some("data".into()),
                namespace: Some("ml".into()),
                uid: Some("uid-1".into()),
                ..Default::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                volume_name: volume.map(str::to_string),
                ..Default::default()
            }),
            status: Some(PersistentVolumeClaimStatus {
                phase: Some(phase.into()),
                ..Default::default()
            }),
        }
    }

    fn volume(spec: PersistentVolumeSpec) -> PersistentVolume {
        PersistentVolume {
            metadata: ObjectMeta {
                name: Some("pv-1".into()),
                ..Default::default()
            },
            spec: Some(PersistentVolumeSpec {
                claim_ref: Some(ObjectReference {
                    namespace: Some("ml".into()),
                    name: Some("data".into()),
                    uid: Some("uid-1".into()),
                    ..Default::default()
                }),
                ..spec
            }),
            status: None,
        }
    }

    fn nfs(server: &str, path: &str) -> PersistentVolume {
        volume(PersistentVolumeSpec {
            nfs: Some(NFSVolumeSource {
                server: server.into(),
                path: path.into(),
                read_only: None,
            }),
            ..Default::default()
        })
    }

    fn csi(driver: &str, attributes: &[(&str, &str)]) -> PersistentVolume {
        volume(PersistentVolumeSpec {
            csi: Some(CSIPersistentVolumeSource {
                driver: driver.into(),
                volume_handle: "h".into(),
                volume_attributes: Some(
                    attributes
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    #[test]
    fn nfs_volumes_become_nfs_sources() {
        let bound = claim("Bound", Some("pv-1"));
        let r = resolve_bound(
            &source(),
            &bound,
            Some(&nfs("filer", "/exports//a/./b/")),
            false,
        )
        .unwrap();
        assert_eq!(share(&r), "nfs://filer/exports/a/b");
        assert_eq!(r.kind, "in-tree nfs");
        assert_eq!(r.volume.as_deref(), Some("pv-1"));
        assert!(
            r.describe(&source())
                .contains("pvc://ml/data -> PersistentVolume pv-1")
        );

        let v6 = resolve_bound(&source(), &bound, Some(&nfs("fd00::1", "/")), false).unwrap();
        assert_eq!(share(&v6), "nfs://[fd00::1]/");

        let attributes = [
            ("server", "10.0.0.5"),
            ("share", "/srv/nfs/"),
            ("subdir", "pvc-9"),
        ];
        let r = resolve_bound(
            &source(),
            &bound,
            Some(&csi(NFS_CSI_DRIVER, &attributes)),
            false,
        )
        .unwrap();
        assert_eq!(share(&r), "nfs://10.0.0.5/srv/nfs/pvc-9");
        assert_eq!(r.kind, NFS_CSI_DRIVER);
        let r = resolve_bound(
            &source(),
            &bound,
            Some(&csi(NFS_CSI_DRIVER, &[("server", "s"), ("share", "/x")])),
            false,
        )
        .unwrap();
        assert_eq!(share(&r), "nfs://s/x");
    }

    #[test]
    fn unusable_claims_are_refused_with_the_claim_named() {
        let check = |e: ClaimError, code: tonic::Code, text: &str| {
            assert_eq!(e.code(), code, "{e}");
            let message = e.to_string();
            assert!(message.contains("claim ml/data"), "{message}");
            assert!(message.contains(text), "{message}");
        };
        let good = nfs("filer", "/x");
        for pending in [claim("Pending", None), claim("Pending", Some("pv-1"))] {
            let e = resolve_bound(&source(), &pending, Some(&good), false).unwrap_err();
            check(e, tonic::Code::FailedPrecondition, "phase Pending");
        }
        let lost = resolve_bound(&source(), &claim("Lost", Some("pv-1")), None, true).unwrap_err();
        check(lost, tonic::Code::FailedPrecondition, "phase Lost");

        let bound = claim("Bound", Some("pv-1"));
        let gone = resolve_bound(&source(), &bound, None, false).unwrap_err();
        check(gone, tonic::Code::FailedPrecondition, "pv-1 does not exist");

        let mut elsewhere = good.clone();
        elsewhere
            .spec
            .as_mut()
            .unwrap()
            .claim_ref
            .as_mut()
            .unwrap()
            .namespace = Some("other".into());
        let e = resolve_bound(&source(), &bound, Some(&elsewhere), false).unwrap_err();
        check(
            e,
            tonic::Code::FailedPrecondition,
            "not bound to this claim",
        );

        let host_path = volume(PersistentVolumeSpec {
            host_path: Some(HostPathVolumeSource {
                path: "/srv".into(),
                type_: None,
            }),
            ..Default::default()
        });
        let e = resolve_bound(&source(), &bound, Some(&host_path), false).unwrap_err();
        check(e, tonic::Code::FailedPrecondition, "is a hostPath volume");
        let e = resolve_bound(
            &source(),
            &bound,
            Some(&csi("reservoir.csi.dev", &[])),
            false,
        )
        .unwrap_err();
        check(
            e,
            tonic::Code::FailedPrecondition,
            "a cache in front of a cache",
        );
        let mut block = nfs("filer", "/x");
        block.spec.as_mut().unwrap().volume_mode = Some("Block".into());
        let e = resolve_bound(&source(), &bound, Some(&block), false).unwrap_err();
        check(e, tonic::Code::FailedPrecondition, "volumeMode Block");
        let e = resolve_bound(
            &source(),
            &bound,
            Some(&csi(NFS_CSI_DRIVER, &[("server", "s")])),
            false,
        )
        .unwrap_err();
        check(e, tonic::Code::FailedPrecondition, "\"share\"");
        for (server, path) in [("filer", "relative"), ("filer", "/a/../.."), ("a b", "/x")] {
            let e = resolve_bound(&source(), &bound, Some(&nfs(server, path)), false).unwrap_err();
            check(e, tonic::Code::FailedPrecondition, "names the NFS");
        }
    }

    fn share(resolved: &Resolved) -> String {
        match &resolved.backing {
            Backing::Nfs(share) => share.to_string(),
            Backing::SourcePod => panic!("{resolved:?} is read through a source pod"),
        }
    }

    #[test]
    fn other_volumes_are_read_through_source_pods() {
        let bound = claim("Bound", Some("pv-1"));
        let mut local = volume(PersistentVolumeSpec {
            local: Some(LocalVolumeSource {
                path: "/mnt/disks/a".into(),
                fs_type: None,
            }),
            node_affinity: Some(VolumeNodeAffinity {
                required: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: "kubernetes.io/hostname".into(),
                            operator: "In".into(),
                            values: Some(vec!["node-a".into()]),
                        }]),
                        match_fields: None,
                    }],
                }),
            }),
            ..Default::default()
        });
        let r = resolve_bound(&source(), &bound, Some(&local), false).unwrap();
        assert_eq!(r.backing, Backing::SourcePod);
        assert_eq!(r.kind, "a local volume");
        assert!(r.node_affinity.is_some());
        assert!(!r.single_node);
        assert_eq!(
            r.describe(&source()),
            "pvc://ml/data -> PersistentVolume pv-1 (a local volume): mounted by kubelet"
        );
        local.spec.as_mut().unwrap().node_affinity = None;
        let mut rwo = bound.clone();
        rwo.spec.as_mut().unwrap().access_modes = Some(vec!["ReadWriteOnce".into()]);
        let r = resolve_bound(&source(), &rwo, Some(&local), false).unwrap();
        assert!(r.single_node && r.node_affinity.is_none());

        let r =
            resolve_bound(&source(), &bound, Some(&csi("ebs.csi.aws.com", &[])), false).unwrap();
        assert_eq!(r.backing, Backing::SourcePod);
        assert!(r.kind.contains("ebs.csi.aws.com"), "{r:?}");

        // Pending: bound by the source pod if its class waits for a first consumer, refused
        // otherwise.
        let mut pending = claim("Pending", None);
        pending.spec.as_mut().unwrap().storage_class_name = Some("local-wffc".into());
        let r = resolve_bound(&source(), &pending, None, true).unwrap();
        assert_eq!(
            (r.backing.clone(), r.volume.clone()),
            (Backing::SourcePod, None)
        );
        assert!(
            r.describe(&source()).contains("StorageClass local-wffc"),
            "{r:?}"
        );
        let e = resolve_bound(&source(), &pending, None, false).unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    }

    #[test]
    fn inline_volumes_name_claims_of_their_own_namespace_only() {
        let target = std::path::Path::new(
            "/var/lib/kubelet/pods/0f3c-uid/volumes/kubernetes.io~csi/data/mount",
        );
        let claim = source();
        assert_eq!(
            inline_pod_namespace(&claim, Some("ml"), Some("0f3c-uid"), target).unwrap(),
            "ml"
        );
        let e = inline_pod_namespace(&claim, Some("team-b"), Some("0f3c-uid"), target).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.to_string().contains("own pod's namespace (team-b)"),
            "{e}"
        );
        // No pod information (podInfoOnMount off), or attributes the pod author wrote.
        for (namespace, uid) in [
            (None, None),
            (Some("ml"), None),
            (Some("ml"), Some("guess")),
        ] {
            let e = inline_pod_namespace(&claim, namespace, uid, target).unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied);
            assert!(e.to_string().contains("podInfoOnMount"), "{e}");
        }
    }
}

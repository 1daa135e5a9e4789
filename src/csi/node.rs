//! The Node service: gives pods the volumes of this node.
//!
//! - NodeStageVolume asks the node's cache daemon to mount the volume at the staging path: one
//!   FUSE session per volume, shared by every pod of the node that uses it.
//! - NodePublishVolume bind-mounts the staged volume into the pod's target path (created if
//!   missing), remounted `nosuid,nodev` and, for reader access modes or `readonly`, `ro`; the
//!   flags are checked in /proc/self/mountinfo before the call succeeds.
//! - Inline ephemeral volumes (`csi.storage.k8s.io/ephemeral=true`, or a publish without a
//!   staging path) are mounted by the daemon at the target path directly and released at
//!   unpublish. Their sources must match `--allowed-sources`.
//! - NodeUnpublishVolume unmounts and removes the target; NodeUnstageVolume asks the daemon to
//!   unmount once no publish is left.
//!
//! The node holds no state of its own: the mount table and the daemon's status are the truth,
//! so `reservoir node` can restart at any time without touching a mount. [`NodePlugin`] holds the
//! logic (callable without gRPC); [`NodeService`] is the thin gRPC adapter.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tonic::{Request, Response, Status};
use tracing::Level;

use super::capability;
use super::claims::{Backing, ClaimError, Claims, Resolved, inline_pod_namespace, nfs_v3_refusal};
use super::locality::Locality;
use super::mounts::{self, MountEntry};
use super::params::{
    CLAIM_SCHEME, ClaimSource, EPHEMERAL, METADATA_TTL, POD_NAMESPACE, POD_UID, VolumeParams,
    VolumeSource, render_source,
};
use super::proto::node_server::Node as NodeRpc;
use super::proto::node_service_capability::Rpc;
use super::proto::node_service_capability::rpc::Type as RpcType;
use super::proto::volume_usage::Unit;
use super::proto::*;
use super::source_pods::{Hold, RECONCILE_EVERY, SourcePodError, SourcePodOptions, SourcePods};
use super::traced;
use crate::control::{DaemonStatus, DaemonVolume, MountRequest, RefusalKind};
use crate::daemon::{Client, ClientError, SpawnOptions, ensure_running};
use crate::fs::meta::now_ms;
use crate::source::SourceSpec;
use crate::units::Ttl;

/// The topology key NodeGetInfo reports, with the node id as its value.
pub const TOPOLOGY_KEY: &str = "topology.reservoir.csi.dev/node";

/// The setting that lists the sources inline volumes may use (named in refusals).
pub const ALLOWED_SOURCES_FLAG: &str = "--allowed-sources";

/// A refusal of a node call; each variant is one gRPC status code, the text says why.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<NodeError> for Status {
    fn from(error: NodeError) -> Status {
        match error {
            NodeError::InvalidArgument(m) => Status::invalid_argument(m),
            NodeError::NotFound(m) => Status::not_found(m),
            NodeError::AlreadyExists(m) => Status::already_exists(m),
            NodeError::FailedPrecondition(m) => Status::failed_precondition(m),
            NodeError::PermissionDenied(m) => Status::permission_denied(m),
            NodeError::Aborted(m) => Status::aborted(m),
            NodeError::Unavailable(m) => Status::unavailable(m),
            NodeError::Internal(m) => Status::internal(m),
        }
    }
}

/// The sources inline volumes may name: prefixes, matched by path component (`/data` admits
/// `/data/x`, not `/data2`), and `pvc://` (claims of the pod's own namespace) or
/// `pvc://NAMESPACE` (claims, for pods of that namespace only). Empty: no inline volumes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AllowedSources {
    sources: Vec<SourceSpec>,
    /// Namespaces whose pods may name their own claims; `None` admits every namespace.
    claim_namespaces: Vec<Option<String>>,
}

impl AllowedSources {
    /// Parses a comma-separated list of sources (`nfs://HOST/PATH`, `/PATH`, `pvc://`,
    /// `pvc://NAMESPACE`); empty entries are ignored.
    pub fn parse(list: &str) -> Result<AllowedSources, String> {
        let mut out = AllowedSources::default();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if let Some(rest) = item.strip_prefix(CLAIM_SCHEME) {
                let namespace = rest.trim_end_matches('/');
                if namespace.contains('/') {
                    return Err(format!(
                        "{ALLOWED_SOURCES_FLAG}: {item:?}: claims are allowed by namespace \
                         (pvc:// or pvc://NAMESPACE), never one by one"
                    ));
                }
                out.claim_namespaces
                    .push((!namespace.is_empty()).then(|| namespace.to_string()));
                continue;
            }
            let spec: SourceSpec = item
                .parse()
                .map_err(|e: crate::source::SpecError| format!("{ALLOWED_SOURCES_FLAG}: {e}"))?;
            out.sources.push(spec);
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.sources.is_empty() && self.claim_namespaces.is_empty()
    }

    /// Whether `root` (a volume's root, sub-path joined; a directory already resolved) lies
    /// under one of the prefixes. NFS: same host, same explicit ports if the prefix has any,
    /// and the path under the prefix's.
    pub fn permits(&self, root: &SourceSpec) -> bool {
        self.sources.iter().any(|allowed| match (allowed, root) {
            (SourceSpec::Local(prefix), SourceSpec::Local(path)) => path.starts_with(prefix),
            (SourceSpec::Nfs(prefix), SourceSpec::Nfs(url)) => {
                prefix.host.eq_ignore_ascii_case(&url.host)
                    && prefix.nfs_port.is_none_or(|p| url.nfs_port == Some(p))
                    && prefix.mount_port.is_none_or(|p| url.mount_port == Some(p))
                    && Path::new(&url.path).starts_with(&prefix.path)
            }
            _ => false,
        })
    }

    /// Whether pods of `namespace` may name claims (of that namespace: checked apart).
    pub fn permits_claims_of(&self, namespace: &str) -> bool {
        self.claim_namespaces
            .iter()
            .any(|allowed| allowed.as_deref().is_none_or(|n| n == namespace))
    }

    /// The prefixes as the user wrote them (for messages).
    pub fn describe(&self) -> String {
        if self.is_empty() {
            return "none".to_string();
        }
        self.sources
            .iter()
            .map(render_source)
            .chain(
                self.claim_namespaces
                    .iter()
                    .map(|n| format!("{CLAIM_SCHEME}{}", n.as_deref().unwrap_or_default())),
            )
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Settings of the node service.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// This node's name (NodeGetInfo).
    pub node_id: String,
    /// The cache daemon's control socket.
    pub daemon_socket: PathBuf,
    /// How to start a daemon when none answers; `None`: never start one (in Kubernetes the
    /// daemon has its own container).
    pub spawn: Option<SpawnOptions>,
    pub allowed_sources: AllowedSources,
    /// Source pods, for claims kubelet must mount.
    pub source_pods: SourcePodOptions,
    /// Label this node with what it has cached of each volume (`locality.rs`); needs the
    /// Kubernetes API. `driver_name` finds the volumes' PersistentVolumes.
    pub locality_labels: bool,
    pub driver_name: String,
}

/// The node service's logic, callable without gRPC.
#[derive(Clone)]
pub struct NodePlugin {
    options: Arc<NodeOptions>,
    /// Paths (staging or target) with a call in progress.
    busy: Arc<Mutex<HashSet<PathBuf>>>,
    /// `pvc://` sources: resolved through the Kubernetes API.
    claims: Arc<Claims>,
    source_pods: Arc<SourcePods>,
    locality: Option<Arc<Locality>>,
}

/// Marks a path as having a call in progress until dropped.
struct Busy {
    set: Arc<Mutex<HashSet<PathBuf>>>,
    path: PathBuf,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.path);
    }
}

fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, NodeError> {
    if value.is_empty() {
        Err(NodeError::InvalidArgument(format!("{field} is required")))
    } else {
        Ok(value)
    }
}

/// A path the CO gave: absolute, no `..`, normalised like the daemon records it.
fn path_field(value: &str, field: &str) -> Result<PathBuf, NodeError> {
    let path = Path::new(required(value, field)?);
    crate::daemon::normalize_target(path)
        .map_err(|e| NodeError::InvalidArgument(format!("{field}: {}", e.message)))
}

fn params_of(
    context: &std::collections::HashMap<String, String>,
) -> Result<VolumeParams, NodeError> {
    VolumeParams::parse(context)
        .map_err(|e| NodeError::InvalidArgument(format!("volume_context (volume attributes): {e}")))
}

fn daemon_error(error: ClientError) -> NodeError {
    match error {
        ClientError::Refused(refusal) => match refusal.kind {
            RefusalKind::Conflict => NodeError::AlreadyExists(refusal.message),
            RefusalKind::Invalid => NodeError::InvalidArgument(refusal.message),
            RefusalKind::Unavailable => NodeError::Unavailable(refusal.message),
            RefusalKind::NotFound | RefusalKind::Other => {
                NodeError::FailedPrecondition(refusal.message)
            }
        },
        ClientError::Spawn { .. } => NodeError::Unavailable(error.to_string()),
        e => NodeError::Unavailable(e.to_string()),
    }
}

/// Runs a synchronous file-system or mount operation off the async threads.
async fn blocking<T, F>(work: F) -> Result<T, NodeError>
where
    F: FnOnce() -> Result<T, NodeError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| NodeError::Internal(format!("a mount operation failed: {e}")))?
}

fn mount_table() -> Result<Vec<MountEntry>, NodeError> {
    mounts::all().map_err(|e| NodeError::Internal(format!("cannot read the mount table: {e}")))
}

fn mount_at(table: &[MountEntry], path: &Path) -> Option<MountEntry> {
    table.iter().rev().find(|m| m.mount_point == path).cloned()
}

/// What the daemon is asked to mount for these parameters.
fn mount_request(
    volume_id: &str,
    target: &Path,
    params: &Direct,
    read_write: bool,
) -> MountRequest {
    let Direct { params, origin, .. } = params;
    MountRequest {
        volume_id: volume_id.to_string(),
        target_path: target.to_path_buf(),
        source: params.source.to_string(),
        origin: origin.clone(),
        sub_path: params.sub_path.clone(),
        cache_size: params.cache_size.map(|s| s.0),
        high_watermark: params.high_watermark,
        low_watermark: params.low_watermark,
        metadata_ttl: params.metadata_ttl,
        read_write,
        preload: params.preload.clone(),
    }
}

/// The pod an inline volume is for, as kubelet said (`podInfoOnMount`).
struct PodInfo {
    namespace: Option<String>,
    uid: Option<String>,
}

/// Volume parameters whose source the daemon reads directly: a claim resolved.
struct Direct {
    params: VolumeParams,
    /// The volume's root (source and sub-path).
    root: SourceSpec,
    /// The claim it was resolved from, and how it is read (for the status).
    origin: Option<String>,
    /// Keeps the source pods' reconciler off the volume until it is mounted.
    _hold: Option<Hold>,
}

fn source_pod_error(e: SourcePodError) -> NodeError {
    coded(e.code(), e.to_string())
}

/// How long the node waits for a claim's NFS server while checking that NFSv3 reads it.
const NFS_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why reservoir's NFSv3 client cannot read these parameters' NFS share although kubelet could
/// mount it (NFSv4 only), or `None`: it can, or fails otherwise (the daemon's mount reports
/// that as before).
async fn nfs_v3_refused(params: &VolumeParams) -> Option<String> {
    let root = params.root()?;
    let options = crate::source::SourceOptions {
        timeout: NFS_PROBE_TIMEOUT,
        connections: 1,
    };
    match tokio::time::timeout(NFS_PROBE_TIMEOUT * 2, crate::source::open(&root, &options)).await {
        Ok(Err(e)) => nfs_v3_refusal(&e),
        _ => None,
    }
}

/// The volume's root inside a claim mounted at `mount`, its symbolic links resolved: whoever
/// can write to the claim could otherwise plant a link (at the claim's PATH or `subPath`) that
/// leads the daemon out of the claim, into the node's files.
async fn inside_claim(
    mut params: VolumeParams,
    mount: &Path,
    claim: &ClaimSource,
) -> Result<VolumeParams, NodeError> {
    let Some(SourceSpec::Local(root)) = params.root() else {
        return Err(NodeError::Internal(
            "a source pod's claim did not resolve to a directory".to_string(),
        ));
    };
    let mount = mount.to_path_buf();
    let claim = format!("claim {}/{}", claim.namespace, claim.name);
    let resolved = blocking(move || {
        let resolved = std::fs::canonicalize(&root).map_err(|e| {
            NodeError::NotFound(format!(
                "{claim}: {} in the claim's volume: {e}",
                root.strip_prefix(&mount).unwrap_or(&root).display()
            ))
        })?;
        if !resolved.starts_with(&mount) {
            return Err(NodeError::PermissionDenied(format!(
                "{claim}: {} leads out of the claim's volume (a symbolic link)",
                root.strip_prefix(&mount).unwrap_or(&root).display()
            )));
        }
        Ok(resolved)
    })
    .await?;
    params.source = VolumeSource::Direct(SourceSpec::Local(resolved));
    params.sub_path = None;
    Ok(params)
}

fn claim_error(e: ClaimError) -> NodeError {
    coded(e.code(), e.to_string())
}

/// A refusal with the code a claim's or source pod's error chose.
fn coded(code: tonic::Code, message: String) -> NodeError {
    match code {
        tonic::Code::NotFound => NodeError::NotFound(message),
        tonic::Code::PermissionDenied => NodeError::PermissionDenied(message),
        tonic::Code::Unavailable => NodeError::Unavailable(message),
        tonic::Code::Internal => NodeError::Internal(message),
        _ => NodeError::FailedPrecondition(message),
    }
}

/// A directory source lives on the node: check it here (the controller cannot).
fn check_directory(root: &SourceSpec) -> Result<(), NodeError> {
    let SourceSpec::Local(path) = root else {
        return Ok(());
    };
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(NodeError::FailedPrecondition(format!(
            "source {}: not a directory",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(NodeError::NotFound(format!(
            "source {}: no such directory on node",
            path.display()
        ))),
        Err(e) => Err(NodeError::FailedPrecondition(format!(
            "source {}: {e}",
            path.display()
        ))),
    }
}

/// The capability's access mode, checked against the volume (InvalidArgument otherwise).
fn access_mode(
    capability: Option<&VolumeCapability>,
    params: &VolumeParams,
) -> Result<volume_capability::access_mode::Mode, NodeError> {
    let capability = capability
        .ok_or_else(|| NodeError::InvalidArgument("volume_capability is required".to_string()))?;
    capability::check(capability, params).map_err(NodeError::InvalidArgument)
}

/// A writable mount needs a finite metadata TTL (`forever` declares the dataset immutable).
fn check_writable(params: &VolumeParams, read_write: bool) -> Result<(), NodeError> {
    if read_write && params.metadata_ttl == Ttl::Forever {
        return Err(NodeError::InvalidArgument(format!(
            "parameter {METADATA_TTL:?} = \"forever\" declares the dataset immutable, but the \
             access mode writes: use a reader-only access mode (ReadOnlyMany) or a finite TTL"
        )));
    }
    Ok(())
}

/// A NodeStageVolume request, checked: what the daemon is asked to mount, and where.
#[derive(Debug)]
pub struct StagePlan {
    pub volume_id: String,
    /// Absolute, normalised, without `..`.
    pub staging: PathBuf,
    pub params: VolumeParams,
    pub read_write: bool,
}

impl StagePlan {
    /// The daemon's request for this stage; `None` for a claim, which only the API server can
    /// resolve to a source.
    pub fn mount_request(&self) -> Option<MountRequest> {
        let direct = Direct {
            root: self.params.root()?,
            params: self.params.clone(),
            origin: None,
            _hold: None,
        };
        Some(mount_request(
            &self.volume_id,
            &self.staging,
            &direct,
            self.read_write,
        ))
    }
}

/// Checks a NodeStageVolume request without touching the node (no mount table, no daemon, no
/// file system): every refusal a request can earn by its contents alone.
pub fn plan_stage(request: &NodeStageVolumeRequest) -> Result<StagePlan, NodeError> {
    let volume_id = required(&request.volume_id, "volume_id")?.to_string();
    let staging = path_field(&request.staging_target_path, "staging_target_path")?;
    let params = params_of(&request.volume_context)?;
    let mode = access_mode(request.volume_capability.as_ref(), &params)?;
    let read_write = capability::writes(mode) && !params.read_only;
    check_writable(&params, read_write)?;
    Ok(StagePlan {
        volume_id,
        staging,
        params,
        read_write,
    })
}

/// A NodePublishVolume request, checked.
#[derive(Debug)]
pub struct PublishPlan {
    pub volume_id: String,
    /// Absolute, normalised, without `..`.
    pub target: PathBuf,
    pub params: VolumeParams,
    pub mode: volume_capability::access_mode::Mode,
    pub read_only: bool,
    /// The staged volume to bind; `None` for an inline (ephemeral) volume.
    pub staging: Option<PathBuf>,
}

/// Checks a NodePublishVolume request without touching the node, like [`plan_stage`]. An
/// inline volume's source is checked against `--allowed-sources` later, once a directory
/// source is resolved on the node.
pub fn plan_publish(request: &NodePublishVolumeRequest) -> Result<PublishPlan, NodeError> {
    let volume_id = required(&request.volume_id, "volume_id")?.to_string();
    let target = path_field(&request.target_path, "target_path")?;
    let ephemeral = request
        .volume_context
        .get(EPHEMERAL)
        .is_some_and(|v| v == "true")
        || request.staging_target_path.is_empty();
    let params = params_of(&request.volume_context)?;
    let mode = access_mode(request.volume_capability.as_ref(), &params)?;
    let read_only = request.readonly || !capability::writes(mode) || params.read_only;
    let staging = if ephemeral {
        None
    } else {
        Some(path_field(
            &request.staging_target_path,
            "staging_target_path",
        )?)
    };
    Ok(PublishPlan {
        volume_id,
        target,
        params,
        mode,
        read_only,
        staging,
    })
}

impl NodePlugin {
    pub fn new(options: NodeOptions) -> NodePlugin {
        let claims = Arc::new(Claims::default());
        let locality = options.locality_labels.then(|| {
            Arc::new(Locality::new(
                options.node_id.clone(),
                options.driver_name.clone(),
                options.source_pods.dir.with_file_name("locality.json"),
            ))
        });
        NodePlugin {
            locality,
            source_pods: Arc::new(SourcePods::new(options.source_pods.clone(), claims.clone())),
            options: Arc::new(options),
            busy: Arc::new(Mutex::new(HashSet::new())),
            claims,
        }
    }

    pub fn options(&self) -> &NodeOptions {
        &self.options
    }

    /// Keeps the source pods in step with the volumes the daemon serves, and the node's
    /// locality labels with its cache, every [`RECONCILE_EVERY`], until `stopping` says so. Does nothing while the daemon does not
    /// answer (it cannot say which volumes it serves).
    pub async fn reconcile_source_pods(&self, mut stopping: tokio::sync::watch::Receiver<bool>) {
        loop {
            if let Ok(status) = self.daemon_status().await {
                let served = status.volumes.iter().map(|v| v.volume_id.clone()).collect();
                self.source_pods.reconcile(&served).await;
                if let Some(locality) = &self.locality
                    && let Err(e) = locality.refresh(&self.claims, &status).await
                {
                    tracing::warn!(error = %e, "cannot update the node's locality labels");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(RECONCILE_EVERY) => {}
                _ = stopping.wait_for(|stop| *stop) => return,
            }
        }
    }

    fn begin(&self, path: &Path) -> Result<Busy, NodeError> {
        let mut set = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !set.insert(path.to_path_buf()) {
            return Err(NodeError::Aborted(format!(
                "another call on {} is in progress",
                path.display()
            )));
        }
        Ok(Busy {
            set: self.busy.clone(),
            path: path.to_path_buf(),
        })
    }

    /// A client of the daemon, starting one if none answers (and starting is allowed).
    pub async fn daemon(&self) -> Result<Client, NodeError> {
        let socket = &self.options.daemon_socket;
        match &self.options.spawn {
            Some(spawn) => ensure_running(socket, spawn).await.map_err(daemon_error),
            None => {
                let client = Client::new(socket);
                client.status().await.map_err(|e| {
                    NodeError::Unavailable(format!(
                        "{e} (this node does not start a daemon itself: check the daemon container)"
                    ))
                })?;
                Ok(client)
            }
        }
    }

    /// The parameters with a claim resolved to the source its volume is read from: its NFS
    /// share, or the mount of a source pod made for `volume_id` on this node.
    async fn direct(
        &self,
        params: VolumeParams,
        volume_id: &str,
        read_write: bool,
    ) -> Result<Direct, NodeError> {
        let hold = matches!(params.source, VolumeSource::Claim(_))
            .then(|| self.source_pods.hold(volume_id));
        let (params, origin) = match params.source.clone() {
            VolumeSource::Direct(_) => (params, None),
            VolumeSource::Claim(claim) => {
                let (params, origin) = self
                    .through_claim(params, &claim, volume_id, read_write)
                    .await?;
                (params, Some(origin))
            }
        };
        let root = params
            .root()
            .ok_or_else(|| NodeError::Internal("a claim source was left unresolved".to_string()))?;
        Ok(Direct {
            params,
            root,
            origin,
            _hold: hold,
        })
    }

    /// The parameters with the claim resolved to its NFS share, or to a source pod's mount
    /// when it is no NFS share or one NFSv3 cannot read; and the volume's origin.
    async fn through_claim(
        &self,
        params: VolumeParams,
        claim: &ClaimSource,
        volume_id: &str,
        read_write: bool,
    ) -> Result<(VolumeParams, String), NodeError> {
        let resolved = self.claims.resolve(claim).await.map_err(claim_error)?;
        let why = match &resolved.backing {
            Backing::SourcePod => None,
            Backing::Nfs(share) => {
                let through_nfs = params.resolved(share);
                let Some(why) = nfs_v3_refused(&through_nfs).await else {
                    let origin = resolved.describe(claim);
                    tracing::info!(%origin, "claim resolved");
                    return Ok((through_nfs, origin));
                };
                tracing::info!(%why, claim = %claim, "NFSv3 cannot read the claim's share: through a source pod");
                Some(format!("reservoir's NFSv3 client cannot read it: {why}"))
            }
        };
        self.through_source_pod(params, claim, resolved, volume_id, read_write, why)
            .await
    }

    /// The parameters with the claim resolved to a source pod's mount on this node, and the
    /// volume's origin (with `why` the claim's NFS share was not read directly).
    async fn through_source_pod(
        &self,
        params: VolumeParams,
        claim: &ClaimSource,
        resolved: Resolved,
        volume_id: &str,
        read_write: bool,
        why: Option<String>,
    ) -> Result<(VolumeParams, String), NodeError> {
        let (mount, pod) = self
            .source_pods
            .ensure(volume_id, claim, &resolved, read_write)
            .await
            .map_err(source_pod_error)?;
        // A claim waiting for its first consumer is bound by now: name its volume.
        let resolved = match resolved.volume {
            Some(_) => resolved,
            None => self.claims.resolve(claim).await.unwrap_or(resolved),
        };
        let mut origin = format!("{} for {pod}", resolved.describe(claim));
        if let Some(why) = why {
            origin = format!("{origin} ({why})");
        }
        tracing::info!(%origin, "claim resolved");
        let params = params.resolved(&SourceSpec::Local(mount.clone()));
        match inside_claim(params, &mount, claim).await {
            Ok(params) => Ok((params, origin)),
            Err(e) => {
                // A path that is not in the claim stays so: the pod goes until the next try,
                // unless the daemon serves the volume already (a stage again).
                let served = self
                    .daemon_status()
                    .await
                    .is_ok_and(|s| s.volumes.iter().any(|v| v.volume_id == volume_id));
                if !served && let Err(release) = self.source_pods.release(volume_id).await {
                    tracing::warn!(error = %release, "cannot release a source pod");
                }
                Err(e)
            }
        }
    }

    /// An inline volume's direct source, checked against the allowed prefixes. A directory is
    /// resolved first, so that a symbolic link cannot lead outside them; the resolved
    /// directory is what gets mounted.
    async fn direct_inline(&self, mut params: VolumeParams) -> Result<Direct, NodeError> {
        let root = match params.root() {
            Some(SourceSpec::Local(path)) => {
                let resolved = blocking(move || {
                    std::fs::canonicalize(&path)
                        .map_err(|e| NodeError::NotFound(format!("source {}: {e}", path.display())))
                })
                .await?;
                params.source = VolumeSource::Direct(SourceSpec::Local(resolved.clone()));
                params.sub_path = None;
                SourceSpec::Local(resolved)
            }
            Some(nfs) => nfs,
            None => {
                return Err(NodeError::Internal(
                    "a claim source reached the direct path".to_string(),
                ));
            }
        };
        if !self.options.allowed_sources.permits(&root) {
            return Err(NodeError::PermissionDenied(format!(
                "source {} is not allowed for inline volumes on this node: it is under none of \
                 the prefixes of {ALLOWED_SOURCES_FLAG} ({})",
                render_source(&root),
                self.options.allowed_sources.describe()
            )));
        }
        Ok(Direct {
            params,
            root,
            origin: None,
            _hold: None,
        })
    }

    /// The daemon's status, without starting one.
    async fn daemon_status(&self) -> Result<DaemonStatus, ClientError> {
        Client::new(&self.options.daemon_socket).status().await
    }

    pub async fn stage(&self, request: NodeStageVolumeRequest) -> Result<(), NodeError> {
        let StagePlan {
            volume_id,
            staging,
            params,
            read_write,
        } = plan_stage(&request)?;
        let _busy = self.begin(&staging)?;
        let direct = self.direct(params, &volume_id, read_write).await?;
        let root = direct.root.clone();
        blocking(move || check_directory(&root)).await?;
        let client = self.daemon().await?;
        let status = client.status().await.map_err(daemon_error)?;
        clear_dead_mount(&status, &staging).await?;
        if let Some(other) = status
            .volumes
            .iter()
            .find(|v| v.volume_id == volume_id && v.target_path != staging)
        {
            return Err(NodeError::AlreadyExists(format!(
                "volume {volume_id} is already staged at {} on this node",
                other.target_path.display()
            )));
        }
        let mounted = client
            .mount(&mount_request(&volume_id, &staging, &direct, read_write))
            .await
            .map_err(daemon_error)?;
        tracing::info!(
            staging = %staging.display(),
            read_write,
            already = mounted.already_mounted,
            "staged"
        );
        Ok(())
    }

    pub async fn unstage(&self, request: NodeUnstageVolumeRequest) -> Result<(), NodeError> {
        required(&request.volume_id, "volume_id")?;
        let staging = path_field(&request.staging_target_path, "staging_target_path")?;
        let _busy = self.begin(&staging)?;
        let staging_for_check = staging.clone();
        let staged = blocking(move || {
            let table = mount_table()?;
            let Some(entry) = mount_at(&table, &staging_for_check).filter(|m| m.is_reservoir())
            else {
                return Ok(None);
            };
            let published: Vec<String> = table
                .iter()
                .filter(|m| m.dev == entry.dev && m.mount_point != staging_for_check)
                .map(|m| m.mount_point.display().to_string())
                .collect();
            if !published.is_empty() {
                return Err(NodeError::FailedPrecondition(format!(
                    "the volume is still published at {}: unpublish it first",
                    published.join(", ")
                )));
            }
            Ok(Some(entry))
        })
        .await?;
        match Client::new(&self.options.daemon_socket)
            .unmount(&staging)
            .await
        {
            Ok(_) => {}
            Err(ClientError::Refused(refusal)) => {
                return Err(NodeError::Internal(refusal.message));
            }
            Err(e) => {
                // No daemon: whatever it left at the staging path is dead; detach it.
                tracing::warn!(error = %e, "the daemon does not answer; detaching the staging mount");
            }
        }
        if staged.is_some() {
            let path = staging.clone();
            blocking(move || {
                if mounts::at(&path)
                    .ok()
                    .flatten()
                    .is_some_and(|m| m.is_reservoir())
                {
                    mounts::detach(&path).map_err(|e| {
                        NodeError::Internal(format!("cannot unmount {}: {e}", path.display()))
                    })?;
                }
                Ok(())
            })
            .await?;
        }
        // The daemon no longer reads the volume: its source pod, if it has one, can go.
        self.source_pods
            .release(&request.volume_id)
            .await
            .map_err(source_pod_error)?;
        Ok(())
    }

    pub async fn publish(&self, request: NodePublishVolumeRequest) -> Result<(), NodeError> {
        let PublishPlan {
            volume_id,
            target,
            params,
            mode,
            read_only,
            staging,
        } = plan_publish(&request)?;
        let Some(staging) = staging else {
            let pod = PodInfo {
                namespace: request.volume_context.get(POD_NAMESPACE).cloned(),
                uid: request.volume_context.get(POD_UID).cloned(),
            };
            return self
                .publish_inline(volume_id, target, params, read_only, pod)
                .await;
        };
        let _busy = self.begin(&target)?;
        let client = self.daemon().await?;
        let status = client.status().await.map_err(daemon_error)?;
        match served_at(&status, &staging) {
            Some(v) if v.volume_id != volume_id => {
                return Err(NodeError::FailedPrecondition(format!(
                    "{} holds volume {}, not {volume_id}",
                    staging.display(),
                    v.volume_id
                )));
            }
            Some(_) => {}
            None => {
                // A reservoir mount the daemon does not serve was left by a daemon that
                // stopped: stage the volume again (the daemon clears the dead mount).
                let path = staging.clone();
                let dead = blocking(move || Ok(mount_at(&mount_table()?, &path))).await?;
                if !dead.is_some_and(|m| m.is_reservoir()) {
                    return Err(NodeError::FailedPrecondition(format!(
                        "volume {volume_id} is not staged at {}: call NodeStageVolume first",
                        staging.display()
                    )));
                }
                let read_write = capability::writes(mode) && !params.read_only;
                check_writable(&params, read_write)?;
                tracing::warn!(staging = %staging.display(), "the daemon lost the staged volume; staging it again");
                // Staging again is a stage: exclusive with other stages of this path, and
                // decided on a fresh status (another publish may have done it meanwhile).
                let _staging_busy = self.begin(&staging)?;
                let status = client.status().await.map_err(daemon_error)?;
                if served_at(&status, &staging).is_none() {
                    clear_dead_mount(&status, &staging).await?;
                    let direct = self.direct(params, &volume_id, read_write).await?;
                    client
                        .mount(&mount_request(&volume_id, &staging, &direct, read_write))
                        .await
                        .map_err(daemon_error)?;
                }
            }
        }
        // The file systems the daemon serves now: a reservoir mount of any other is dead.
        let live: Vec<PathBuf> = client
            .status()
            .await
            .map_err(daemon_error)?
            .volumes
            .into_iter()
            .map(|v| v.target_path)
            .collect();
        let (staging2, target2) = (staging.clone(), target.clone());
        blocking(move || bind_into(&staging2, &target2, read_only, &live)).await?;
        tracing::info!(target = %target.display(), read_only, "published");
        Ok(())
    }

    async fn publish_inline(
        &self,
        volume_id: String,
        target: PathBuf,
        params: VolumeParams,
        read_only: bool,
        pod: PodInfo,
    ) -> Result<(), NodeError> {
        if self.options.allowed_sources.is_empty() {
            return Err(NodeError::PermissionDenied(format!(
                "inline volumes are disabled on this node: {ALLOWED_SOURCES_FLAG} lists no \
                 sources (the node's administrator decides which sources pods may name)"
            )));
        }
        let _busy = self.begin(&target)?;
        let direct = match &params.source {
            VolumeSource::Claim(claim) => {
                // A pod author may name a claim of their own pod's namespace (they could mount
                // it themselves), and only where the administrator allows claims at all.
                let namespace = inline_pod_namespace(
                    claim,
                    pod.namespace.as_deref(),
                    pod.uid.as_deref(),
                    &target,
                )
                .map_err(claim_error)?;
                if !self.options.allowed_sources.permits_claims_of(&namespace) {
                    return Err(NodeError::PermissionDenied(format!(
                        "source {claim} is not allowed for inline volumes on this node: \
                         {ALLOWED_SOURCES_FLAG} ({}) admits no claims of namespace {namespace} \
                         (add pvc:// or pvc://{namespace})",
                        self.options.allowed_sources.describe()
                    )));
                }
                self.direct(params, &volume_id, !read_only).await?
            }
            VolumeSource::Direct(_) => self.direct_inline(params).await?,
        };
        let root = direct.root.clone();
        blocking(move || check_directory(&root)).await?;
        let read_write = !read_only;
        check_writable(&direct.params, read_write)?;
        let client = self.daemon().await?;
        let status = client.status().await.map_err(daemon_error)?;
        clear_dead_mount(&status, &target).await?;
        client
            .mount(&mount_request(&volume_id, &target, &direct, read_write))
            .await
            .map_err(daemon_error)?;
        let path = target.clone();
        blocking(move || {
            let entry = mounts::at(&path)
                .map_err(|e| NodeError::Internal(format!("cannot read the mount table: {e}")))?
                .ok_or_else(|| {
                    NodeError::Internal(format!("{} is not mounted after all", path.display()))
                })?;
            check_flags(&entry, read_only)
        })
        .await?;
        tracing::info!(target = %target.display(), read_only, "published inline volume");
        Ok(())
    }

    pub async fn unpublish(&self, request: NodeUnpublishVolumeRequest) -> Result<(), NodeError> {
        required(&request.volume_id, "volume_id")?;
        let target = path_field(&request.target_path, "target_path")?;
        let _busy = self.begin(&target)?;
        // An inline volume is the daemon's own mount: the daemon ends its session, then its
        // source pod (if it has one) can go.
        if let Ok(status) = self.daemon_status().await
            && served_at(&status, &target).is_some()
        {
            Client::new(&self.options.daemon_socket)
                .unmount(&target)
                .await
                .map_err(|e| NodeError::Internal(e.to_string()))?;
            self.source_pods
                .release(&request.volume_id)
                .await
                .map_err(source_pod_error)?;
        }
        blocking(move || {
            // Mounts may be stacked: unmount until nothing is left (bounded).
            for _ in 0..16 {
                let Some(entry) = mount_at(&mount_table()?, &target) else {
                    break;
                };
                // umount(2) does not ask the file system anything, so neither a dead nor a
                // hung FUSE session blocks it; a busy mount is detached.
                tracing::debug!(target = %target.display(), fs_type = %entry.fs_type, "unmounting");
                match mounts::unmount(&target) {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        return Err(NodeError::Internal(format!(
                            "cannot unmount {}: {e}",
                            target.display()
                        )));
                    }
                }
            }
            match std::fs::remove_dir(&target) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(NodeError::Internal(format!(
                    "cannot remove the target {}: {e}",
                    target.display()
                ))),
            }
        })
        .await
    }

    pub async fn volume_stats(
        &self,
        request: NodeGetVolumeStatsRequest,
    ) -> Result<NodeGetVolumeStatsResponse, NodeError> {
        let volume_id = required(&request.volume_id, "volume_id")?.to_string();
        let raw_path = required(&request.volume_path, "volume_path")?;
        // No volume is ever published or staged at a relative path (or one with `..`): the
        // spec's answer for "the volume does not exist on the volume_path" is NOT_FOUND.
        let path = path_field(raw_path, "volume_path").map_err(|_| {
            NodeError::NotFound(format!(
                "volume {volume_id} is not published or staged at {raw_path:?} (volume_path \
                 must be the absolute path of a target or staging path)"
            ))
        })?;
        let lookup = path.clone();
        let table = blocking(mount_table).await?;
        let Some(entry) = mount_at(&table, &lookup).filter(|m| m.is_reservoir()) else {
            return Err(NodeError::NotFound(format!(
                "volume {volume_id} is not published or staged at {}",
                path.display()
            )));
        };
        let abnormal = |message: String| NodeGetVolumeStatsResponse {
            usage: Vec::new(),
            volume_condition: Some(VolumeCondition {
                abnormal: true,
                message,
            }),
        };
        let status = match self.daemon_status().await {
            Ok(status) => status,
            Err(e) => {
                return Ok(abnormal(format!(
                    "the node's cache daemon does not answer ({e}): reads of this volume wait \
                     until a daemon runs again and takes the volume over"
                )));
            }
        };
        // The daemon's volume whose mount is this one (the same file system).
        let served = status.volumes.iter().find(|v| {
            v.target_path == path
                || mount_at(&table, &v.target_path).is_some_and(|m| m.dev == entry.dev)
        });
        let Some(volume) = served else {
            let lost = status
                .lost
                .iter()
                .find(|l| l.target_path == path || l.volume_id == volume_id);
            return Ok(abnormal(match lost {
                Some(lost) => format!(
                    "a restarted cache daemon could not take this volume over ({}): reads fail \
                     until the pod is started again",
                    lost.reason
                ),
                None => "the node's cache daemon does not serve this mount (a daemon restart \
                         ended its connection): reads fail until the pod is started again"
                    .to_string(),
            }));
        };
        if volume.volume_id != volume_id {
            return Err(NodeError::NotFound(format!(
                "{} holds volume {}, not {volume_id}",
                path.display(),
                volume.volume_id
            )));
        }
        let recovery = &volume.recovery;
        let condition = if volume.volume.online {
            VolumeCondition {
                abnormal: false,
                message: match recovery.recoveries {
                    0 => "ok".to_string(),
                    n => format!(
                        "ok; taken over by a restarted cache daemon {n} time(s), the last {} s ago",
                        recovery
                            .last_recovery_ms
                            .map_or(0, |at| now_ms().saturating_sub(at) / 1000)
                    ),
                },
            }
        } else {
            VolumeCondition {
                abnormal: true,
                message: format!(
                    "source {} is unreachable: cached files are still served, others fail \
                     until it answers again",
                    volume.volume.source
                ),
            }
        };
        Ok(NodeGetVolumeStatsResponse {
            usage: usage(&status, volume),
            volume_condition: Some(condition),
        })
    }

    pub fn info(&self) -> NodeGetInfoResponse {
        NodeGetInfoResponse {
            node_id: self.options.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(Topology {
                segments: [(TOPOLOGY_KEY.to_string(), self.options.node_id.clone())].into(),
            }),
        }
    }

    pub fn capabilities() -> NodeGetCapabilitiesResponse {
        let rpc = |t: RpcType| NodeServiceCapability {
            r#type: Some(node_service_capability::Type::Rpc(Rpc { r#type: t as i32 })),
        };
        NodeGetCapabilitiesResponse {
            capabilities: vec![
                rpc(RpcType::StageUnstageVolume),
                rpc(RpcType::GetVolumeStats),
                rpc(RpcType::VolumeCondition),
            ],
        }
    }
}

/// Detaches a reservoir mount at `path` that the daemon does not serve: left by a daemon that
/// stopped. (The kernel may still answer `stat` for such a mount from its attribute cache, so
/// the daemon's own check for dead mounts cannot be relied on.)
async fn clear_dead_mount(status: &DaemonStatus, path: &Path) -> Result<(), NodeError> {
    if served_at(status, path).is_some() || status.pending.iter().any(|p| p.target_path == path) {
        return Ok(());
    }
    let path = path.to_path_buf();
    blocking(move || {
        if mount_at(&mount_table()?, &path).is_some_and(|m| m.is_reservoir()) {
            tracing::warn!(path = %path.display(), "detaching a mount left by a daemon that stopped");
            mounts::detach(&path).map_err(|e| {
                NodeError::Internal(format!("cannot detach {}: {e}", path.display()))
            })?;
        }
        Ok(())
    })
    .await
}

/// The daemon's volume mounted at `path`.
fn served_at<'a>(status: &'a DaemonStatus, path: &Path) -> Option<&'a DaemonVolume> {
    status.volumes.iter().find(|v| v.target_path == path)
}

/// The cache the volume occupies: bytes against its quota (or the node's cache), and its
/// cached files as inodes.
fn usage(status: &DaemonStatus, volume: &DaemonVolume) -> Vec<VolumeUsage> {
    let owner = volume.volume.cache.as_ref().and_then(|c| c.owner.as_ref());
    let used = owner.map_or(0, |o| o.used);
    let files = owner.map_or(0, |o| o.files);
    let node_free = status.cache.capacity.saturating_sub(status.cache.used);
    let total = owner
        .and_then(|o| o.quota)
        .or(volume.cache_size)
        .unwrap_or(status.cache.capacity);
    let available = total.saturating_sub(used).min(node_free);
    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    vec![
        VolumeUsage {
            available: clamp(available),
            total: clamp(total),
            used: clamp(used),
            unit: Unit::Bytes as i32,
        },
        VolumeUsage {
            available: 0,
            total: 0,
            used: clamp(files),
            unit: Unit::Inodes as i32,
        },
    ]
}

/// Checks that a pod's mount has the flags it must have.
fn check_flags(entry: &MountEntry, read_only: bool) -> Result<(), NodeError> {
    let mut missing = Vec::new();
    if read_only && !entry.read_only() {
        missing.push("ro");
    }
    for flag in ["nosuid", "nodev"] {
        if !entry.has_option(flag) {
            missing.push(flag);
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(NodeError::Internal(format!(
            "{} is mounted without {} ({})",
            entry.mount_point.display(),
            missing.join(", "),
            entry.options.join(",")
        )))
    }
}

/// Bind-mounts the staged volume into `target`, or confirms that it is there already.
/// `live`: the mount points the daemon serves (a reservoir mount of another file system at the
/// target was left by a daemon that stopped, and is replaced).
fn bind_into(
    staging: &Path,
    target: &Path,
    read_only: bool,
    live: &[PathBuf],
) -> Result<(), NodeError> {
    let table = mount_table()?;
    let live_devs: HashSet<&str> = live
        .iter()
        .filter_map(|p| table.iter().rev().find(|m| m.mount_point == *p))
        .map(|m| m.dev.as_str())
        .collect();
    let Some(staged) = mount_at(&table, staging).filter(|m| m.is_reservoir()) else {
        return Err(NodeError::FailedPrecondition(format!(
            "nothing is staged at {}",
            staging.display()
        )));
    };
    if staged.read_only() && !read_only {
        return Err(NodeError::FailedPrecondition(format!(
            "the volume is staged read-only at {} (staged with a reader access mode or \
             readOnly): it cannot be published writable",
            staging.display()
        )));
    }
    if let Some(existing) = mount_at(&table, target) {
        if existing.dev == staged.dev {
            if existing.read_only() == read_only {
                return check_flags(&existing, read_only);
            }
            return Err(NodeError::AlreadyExists(format!(
                "the volume is already published at {} {}",
                target.display(),
                if existing.read_only() {
                    "read-only"
                } else {
                    "writable"
                }
            )));
        }
        let dead = existing.is_reservoir() && !live_devs.contains(existing.dev.as_str());
        if !dead {
            return Err(NodeError::AlreadyExists(format!(
                "{} is already a mount point of something else ({} from {})",
                target.display(),
                existing.fs_type,
                existing.source
            )));
        }
        // Left by a daemon that stopped: replace it.
        tracing::warn!(target = %target.display(), "replacing a dead mount");
        mounts::detach(target)
            .map_err(|e| NodeError::Internal(format!("cannot detach {}: {e}", target.display())))?;
    }
    match std::fs::metadata(target) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(NodeError::FailedPrecondition(format!(
                "target {} exists and is not a directory",
                target.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(target).map_err(|e| {
                NodeError::Internal(format!("cannot create {}: {e}", target.display()))
            })?;
        }
        Err(e) => {
            return Err(NodeError::Internal(format!("{}: {e}", target.display())));
        }
    }
    mounts::bind(staging, target, read_only).map_err(|e| {
        NodeError::Internal(format!(
            "cannot bind-mount {} at {}: {e}",
            staging.display(),
            target.display()
        ))
    })?;
    let entry = mounts::at(target)
        .map_err(|e| NodeError::Internal(format!("cannot read the mount table: {e}")))?
        .ok_or_else(|| NodeError::Internal(format!("{} is not mounted", target.display())))?;
    if let Err(e) = check_flags(&entry, read_only) {
        let _ = mounts::detach(target);
        return Err(e);
    }
    Ok(())
}

/// The gRPC adapter of [`NodePlugin`].
#[derive(Clone)]
pub struct NodeService {
    node: NodePlugin,
}

impl NodeService {
    pub fn new(node: NodePlugin) -> NodeService {
        NodeService { node }
    }
}

#[tonic::async_trait]
impl NodeRpc for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let request = request.into_inner();
        let id = request.volume_id.clone();
        traced("NodeStageVolume", &id, Level::INFO, async {
            self.node.stage(request).await?;
            Ok(NodeStageVolumeResponse {})
        })
        .await
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let request = request.into_inner();
        let id = request.volume_id.clone();
        traced("NodeUnstageVolume", &id, Level::INFO, async {
            self.node.unstage(request).await?;
            Ok(NodeUnstageVolumeResponse {})
        })
        .await
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let request = request.into_inner();
        let id = request.volume_id.clone();
        traced("NodePublishVolume", &id, Level::INFO, async {
            self.node.publish(request).await?;
            Ok(NodePublishVolumeResponse {})
        })
        .await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let request = request.into_inner();
        let id = request.volume_id.clone();
        traced("NodeUnpublishVolume", &id, Level::INFO, async {
            self.node.unpublish(request).await?;
            Ok(NodeUnpublishVolumeResponse {})
        })
        .await
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let request = request.into_inner();
        let id = request.volume_id.clone();
        traced("NodeGetVolumeStats", &id, Level::DEBUG, async {
            Ok(self.node.volume_stats(request).await?)
        })
        .await
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let id = request.into_inner().volume_id;
        traced("NodeExpandVolume", &id, Level::INFO, async {
            Err(Status::unimplemented(
                "NodeExpandVolume: reservoir volumes are views of a dataset; nothing to expand",
            ))
        })
        .await
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        traced("NodeGetCapabilities", "", Level::DEBUG, async {
            Ok(NodePlugin::capabilities())
        })
        .await
    }

    async fn node_get_info(
        &self,
        _request: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        traced("NodeGetInfo", "", Level::DEBUG, async {
            Ok(self.node.info())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_sources_match_by_component() {
        let allowed = AllowedSources::parse("/data, nfs://filer/exports/ds,,").unwrap();
        let src = |s: &str| s.parse::<SourceSpec>().unwrap();
        assert!(allowed.permits(&src("/data")));
        assert!(allowed.permits(&src("/data/a/b")));
        assert!(!allowed.permits(&src("/data2")));
        assert!(!allowed.permits(&src("/")));
        assert!(allowed.permits(&src("nfs://filer/exports/ds")));
        assert!(allowed.permits(&src("nfs://FILER/exports/ds/x?nfsport=2049")));
        assert!(!allowed.permits(&src("nfs://filer/exports/dsx")));
        assert!(!allowed.permits(&src("nfs://other/exports/ds")));
        let ported = AllowedSources::parse("nfs://filer:2049/exports").unwrap();
        assert!(!ported.permits(&src("nfs://filer/exports/x")));
        assert!(AllowedSources::parse("").unwrap().is_empty());
        assert!(AllowedSources::parse("relative/dir").is_err());
        assert_eq!(AllowedSources::default().describe(), "none");
    }

    #[test]
    fn claims_are_allowed_by_namespace_only() {
        let none = AllowedSources::parse("/data").unwrap();
        assert!(!none.permits_claims_of("ml"));
        let any = AllowedSources::parse("/data,pvc://").unwrap();
        assert!(any.permits_claims_of("ml") && any.permits_claims_of("team-b"));
        // A claim never passes as a directory or NFS prefix, nor the other way round.
        assert!(!any.permits(&"/other".parse().unwrap()));
        assert_eq!(any.describe(), "/data,pvc://");
        let one = AllowedSources::parse("pvc://ml/").unwrap();
        assert!(!one.is_empty());
        assert!(one.permits_claims_of("ml") && !one.permits_claims_of("team-b"));
        let e = AllowedSources::parse("pvc://ml/claim").unwrap_err();
        assert!(e.contains("by namespace"), "{e}");
    }

    #[test]
    fn mount_flags_are_checked() {
        let entry = |options: &str| MountEntry {
            mount_id: 1,
            dev: "0:50".into(),
            mount_point: "/t".into(),
            options: options.split(',').map(String::from).collect(),
            fs_type: mounts::FS_TYPE.into(),
            source: "x".into(),
            super_options: vec!["rw".into()],
        };
        assert!(check_flags(&entry("ro,nosuid,nodev"), true).is_ok());
        assert!(check_flags(&entry("rw,nosuid,nodev"), false).is_ok());
        assert!(check_flags(&entry("rw,nosuid,nodev"), true).is_err());
        assert!(check_flags(&entry("ro,nodev"), true).is_err());
    }

    #[tokio::test]
    async fn required_fields_are_refused_before_anything_runs() {
        let node = NodePlugin::new(NodeOptions {
            node_id: "n".into(),
            daemon_socket: "/nonexistent/daemon.sock".into(),
            spawn: None,
            allowed_sources: AllowedSources::default(),
            source_pods: SourcePodOptions {
                node: "n".into(),
                image: "pause".into(),
                dir: "/nonexistent/sources".into(),
                kubelet_dir: "/nonexistent/kubelet".into(),
            },
            locality_labels: false,
            driver_name: "reservoir.csi.dev".into(),
        });
        let err = node
            .stage(NodeStageVolumeRequest::default())
            .await
            .unwrap_err();
        assert!(matches!(err, NodeError::InvalidArgument(m) if m.contains("volume_id")));
        let err = node
            .publish(NodePublishVolumeRequest {
                volume_id: "v".into(),
                target_path: "relative".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(err, NodeError::InvalidArgument(m) if m.contains("target_path")));
        let err = node
            .volume_stats(NodeGetVolumeStatsRequest {
                volume_id: "v".into(),
                volume_path: "/nonexistent/path".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(err, NodeError::NotFound(_)));
    }
}

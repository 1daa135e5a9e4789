//! Source pods: how a claim that reservoir's own NFS client cannot read reaches the daemon.
//!
//! A pod can mount only claims of its own namespace, and only kubelet knows how to mount every
//! kind of volume (local volumes, CSI drivers, in-tree network file systems). So for such a
//! claim the node service creates a small pod in the claim's namespace, pinned to this node,
//! that mounts the claim (read-only unless the reservoir volume is read-write) and does nothing
//! else. Once kubelet has mounted it, the node service bind-mounts that mount into its own
//! directory (`--source-pods-dir`), which the daemon reads as a directory source. The bind is
//! what the daemon holds open, so kubelet can always tear the pod down, and a pod deleted
//! behind the driver's back is simply created again while the volume goes on reading.
//!
//! A source pod lives exactly as long as a volume on this node needs it: it is made at
//! NodeStageVolume (or an inline volume's NodePublishVolume) and deleted at the matching
//! unstage or unpublish. Each one has a record in the directory, written before the pod is
//! created; [`SourcePods::reconcile`] (every [`RECONCILE_EVERY`]) deletes the pods and binds of
//! records no volume uses any more (after a crash, or a stage that never completed), and
//! creates again the pods of those still in use.
//!
//! The decisions (the pod's spec, whether this node may use the volume, which mount is the
//! pod's) are plain functions tested without a cluster; [`SourcePods`] is the adapter.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Node, NodeSelector, NodeSelectorRequirement, Pod};
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use serde::{Deserialize, Serialize};

use super::claims::{ClaimError, Claims, Resolved, api_call};
use super::mounts::{self, MountEntry};
use super::params::ClaimSource;

/// The label every source pod carries (value [`ROLE_SOURCE`]): the driver deletes no pod
/// without it.
pub const ROLE_LABEL: &str = "reservoir.csi.dev/role";
pub const ROLE_SOURCE: &str = "source";
/// Annotations naming the volume and claim a source pod is for (for people and `kubectl`).
pub const VOLUME_ANNOTATION: &str = "reservoir.csi.dev/volume-id";
pub const CLAIM_ANNOTATION: &str = "reservoir.csi.dev/claim";
/// The default image of source pods (`--source-pod-image`).
pub const DEFAULT_IMAGE: &str = "registry.k8s.io/pause:3.10";
/// The mount path of the claim inside the source pod's container.
const MOUNT_PATH: &str = "/source";

/// How long NodeStageVolume waits for a source pod to run before answering UNAVAILABLE
/// (kubelet retries; the pod is kept).
const RUNNING_WAIT: Duration = Duration::from_secs(60);
/// How often the pods are checked against the volumes that need them.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(10);
/// A record that no volume uses is left alone this long after it was written: its stage may
/// still be on its way (or kubelet about to retry one that failed).
const UNUSED_GRACE: Duration = Duration::from_secs(120);

/// Why a claim could not be brought onto this node. Every message names the claim.
#[derive(Debug, thiserror::Error)]
pub enum SourcePodError {
    #[error(transparent)]
    Claim(#[from] ClaimError),
    #[error("claim {claim}: cannot be used on node {node}: {why}")]
    Elsewhere {
        claim: String,
        node: String,
        why: String,
    },
    #[error("claim {claim}: source pod {pod} cannot run on this node: {why}")]
    Unschedulable {
        claim: String,
        pod: String,
        why: String,
    },
    #[error(
        "claim {claim}: source pod {pod} is not running yet ({why}); kubelet retries, and \
         `kubectl describe pod` says more"
    )]
    NotRunning {
        claim: String,
        pod: String,
        why: String,
    },
    #[error("claim {claim}: {why}")]
    Node { claim: String, why: String },
}

impl SourcePodError {
    pub fn code(&self) -> tonic::Code {
        match self {
            SourcePodError::Claim(e) => e.code(),
            SourcePodError::Elsewhere { .. } | SourcePodError::Unschedulable { .. } => {
                tonic::Code::FailedPrecondition
            }
            SourcePodError::NotRunning { .. } => tonic::Code::Unavailable,
            SourcePodError::Node { .. } => tonic::Code::Internal,
        }
    }
}

/// Settings of source pods.
#[derive(Clone, Debug)]
pub struct SourcePodOptions {
    /// This node's name.
    pub node: String,
    /// The image of the pods' one container, which only waits (a pause image).
    pub image: String,
    /// Where the records and binds live (under kubelet's directory, so that the daemon's
    /// container sees the binds).
    pub dir: PathBuf,
    /// Kubelet's root directory, where it mounts pods' volumes.
    pub kubelet_dir: PathBuf,
}

/// What the node remembers of a source pod, written before the pod is created.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub volume_id: String,
    pub namespace: String,
    pub claim: String,
    pub pod: String,
    pub read_only: bool,
    /// Seconds since the epoch.
    pub created: u64,
}

/// The name of the source pod of `volume_id` on `node`: stable, so that a retried stage finds
/// the pod an earlier one made.
pub fn pod_name(node: &str, volume_id: &str) -> String {
    let hash = xxhash_rust::xxh3::xxh3_64(format!("{node}\0{volume_id}").as_bytes());
    format!("reservoir-source-{hash:016x}")
}

/// The source pod's spec: pinned to the node, tolerating its taints, the claim its only
/// volume, and nothing else it could use (no service account token, no privileges, no
/// writable root, a few MiB of memory), so that it passes the `restricted` Pod Security
/// level and most quota and LimitRange rules.
pub fn manifest(options: &SourcePodOptions, record: &Record) -> Pod {
    let pod = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": record.pod,
            "namespace": record.namespace,
            "labels": {
                "app.kubernetes.io/managed-by": "reservoir",
                ROLE_LABEL: ROLE_SOURCE,
            },
            "annotations": {
                VOLUME_ANNOTATION: record.volume_id,
                CLAIM_ANNOTATION: format!("{}/{}", record.namespace, record.claim),
            },
        },
        "spec": {
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchFields": [{
                    "key": "metadata.name", "operator": "In", "values": [options.node],
                }]}],
            }}},
            "tolerations": [{"operator": "Exists"}],
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "terminationGracePeriodSeconds": 1,
            "restartPolicy": "Always",
            "securityContext": {
                "runAsNonRoot": true,
                "runAsUser": 65535,
                "runAsGroup": 65535,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [{
                "name": "source",
                "image": options.image,
                "imagePullPolicy": "IfNotPresent",
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "readOnlyRootFilesystem": true,
                    "capabilities": {"drop": ["ALL"]},
                },
                "resources": {
                    "requests": {"cpu": "1m", "memory": "4Mi"},
                    "limits": {"cpu": "10m", "memory": "16Mi"},
                },
                "volumeMounts": [{
                    "name": "source", "mountPath": MOUNT_PATH, "readOnly": record.read_only,
                }],
            }],
            "volumes": [{
                "name": "source",
                "persistentVolumeClaim": {"claimName": record.claim, "readOnly": record.read_only},
            }],
        },
    });
    serde_json::from_value(pod).unwrap_or_else(|e| panic!("the source pod's spec is a Pod: {e}"))
}

/// Whether `node` satisfies `selector` (a PersistentVolume's required node affinity): any term,
/// each of whose requirements holds. An empty term matches no node.
pub fn node_matches(selector: &NodeSelector, node: &Node) -> bool {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let name = node.metadata.name.clone().unwrap_or_default();
    selector.node_selector_terms.iter().any(|term| {
        let expressions = term.match_expressions.as_deref().unwrap_or_default();
        let fields = term.match_fields.as_deref().unwrap_or_default();
        (!expressions.is_empty() || !fields.is_empty())
            && expressions
                .iter()
                .all(|r| requirement_holds(r, labels.get(&r.key).map(String::as_str)))
            && fields.iter().all(|r| {
                let value = (r.key == "metadata.name").then_some(name.as_str());
                requirement_holds(r, value)
            })
    })
}

fn requirement_holds(requirement: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = requirement.values.as_deref().unwrap_or_default();
    let number = |v: &str| v.parse::<i64>().ok();
    let compare = |above: bool| match (
        value.and_then(number),
        values.first().and_then(|v| number(v)),
    ) {
        (Some(v), Some(limit)) if values.len() == 1 => {
            if above {
                v > limit
            } else {
                v < limit
            }
        }
        _ => false,
    };
    match requirement.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| values.iter().all(|x| x != v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" => compare(true),
        "Lt" => compare(false),
        _ => false,
    }
}

/// A node selector as one line, for messages.
pub fn describe_selector(selector: &NodeSelector) -> String {
    let requirement = |r: &NodeSelectorRequirement| {
        let values = r.values.as_deref().unwrap_or_default();
        if values.is_empty() {
            format!("{} {}", r.key, r.operator)
        } else {
            format!("{} {} [{}]", r.key, r.operator, values.join(", "))
        }
    };
    selector
        .node_selector_terms
        .iter()
        .map(|term| {
            term.match_expressions
                .iter()
                .chain(term.match_fields.iter())
                .flatten()
                .map(requirement)
                .collect::<Vec<_>>()
                .join(" and ")
        })
        .collect::<Vec<_>>()
        .join(" or ")
}

/// A pod on another node that uses `claim` (`(namespace/pod, node)`), if any: a claim that only
/// one node may mount at a time cannot come here too.
pub fn used_elsewhere(pods: &[Pod], claim: &str, node: &str) -> Option<(String, String)> {
    pods.iter().find_map(|pod| {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            return None;
        }
        let spec = pod.spec.as_ref()?;
        let on = spec.node_name.as_deref().filter(|n| *n != node)?;
        let uses = spec.volumes.iter().flatten().any(|v| {
            v.persistent_volume_claim
                .as_ref()
                .is_some_and(|c| c.claim_name == claim)
        });
        uses.then(|| {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let namespace = pod.metadata.namespace.clone().unwrap_or_default();
            (format!("{namespace}/{name}"), on.to_string())
        })
    })
}

/// Where kubelet mounted the volume of the pod `uid`: the mount under
/// `KUBELET/pods/UID/volumes/` (a source pod has one volume, the claim).
pub fn kubelet_mount(entries: &[MountEntry], kubelet_dir: &Path, uid: &str) -> Option<PathBuf> {
    let volumes = kubelet_dir.join("pods").join(uid).join("volumes");
    entries
        .iter()
        .rev()
        .map(|m| &m.mount_point)
        .find(|p| p.starts_with(&volumes) && *p != &volumes)
        .cloned()
}

/// Where a pod stands, for waiting on it.
#[derive(Debug, PartialEq)]
pub enum PodState {
    Running,
    /// The scheduler cannot place it on this node (its message).
    Unschedulable(String),
    /// It ended (its message).
    Failed(String),
    /// Still being set up (the latest reason known).
    Waiting(String),
}

pub fn pod_state(pod: &Pod) -> PodState {
    let Some(status) = &pod.status else {
        return PodState::Waiting("no status yet".to_string());
    };
    let conditions = status.conditions.as_deref().unwrap_or_default();
    if let Some(c) = conditions
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        && c.reason.as_deref() == Some("Unschedulable")
    {
        return PodState::Unschedulable(c.message.clone().unwrap_or_default());
    }
    let waiting = status
        .container_statuses
        .iter()
        .flatten()
        .find_map(|c| c.state.as_ref()?.waiting.as_ref())
        .map(|w| {
            format!(
                "{}: {}",
                w.reason.as_deref().unwrap_or("waiting"),
                w.message.as_deref().unwrap_or_default()
            )
        });
    match status.phase.as_deref() {
        Some("Running") => PodState::Running,
        Some(phase @ ("Failed" | "Succeeded")) => PodState::Failed(format!(
            "phase {phase}: {}",
            status.message.as_deref().unwrap_or_default()
        )),
        phase => PodState::Waiting(waiting.unwrap_or_else(|| {
            conditions
                .iter()
                .find(|c| c.status == "False")
                .map(|c| {
                    format!(
                        "{} {}",
                        c.type_,
                        c.message
                            .as_deref()
                            .or(c.reason.as_deref())
                            .unwrap_or("False")
                    )
                })
                .unwrap_or_else(|| format!("phase {}", phase.unwrap_or("unknown")))
        })),
    }
}

/// [`api_call`], with an API answer of status `code` (404, 409) as `None`.
async fn api_call_unless<T>(
    claim: &str,
    code: u16,
    call: impl Future<Output = kube::Result<T>>,
) -> Result<Option<T>, ClaimError> {
    api_call(claim, async {
        match call.await {
            Err(kube::Error::Api(status)) if status.code == code => Ok(None),
            other => other.map(Some),
        }
    })
    .await
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn is_ours(pod: &Pod) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ROLE_LABEL))
        .is_some_and(|v| v == ROLE_SOURCE)
}

/// The node's source pods: made, found, released, and kept in step with the volumes.
pub struct SourcePods {
    options: SourcePodOptions,
    claims: Arc<Claims>,
    /// Volumes whose source is being brought up now, with the number of holds on each: the
    /// reconciler leaves them alone.
    in_progress: Mutex<HashMap<String, usize>>,
}

/// Keeps the reconciler off a volume's source until dropped: held from before its pod is made
/// until the daemon serves the volume (or the stage fails).
pub struct Hold {
    pods: Arc<SourcePods>,
    volume_id: String,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut held = self
            .pods
            .in_progress
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(count) = held.get_mut(&self.volume_id) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.volume_id);
            }
        }
    }
}

impl SourcePods {
    pub fn new(options: SourcePodOptions, claims: Arc<Claims>) -> SourcePods {
        SourcePods {
            options,
            claims,
            in_progress: Mutex::new(HashMap::new()),
        }
    }

    fn record_path(&self, pod: &str) -> PathBuf {
        self.options.dir.join(format!("{pod}.json"))
    }

    fn mount_point(&self, pod: &str) -> PathBuf {
        self.options.dir.join(pod)
    }

    fn host_error(&self, claim: &str, what: &str, e: impl std::fmt::Display) -> SourcePodError {
        SourcePodError::Node {
            claim: claim.to_string(),
            why: format!("{what} in {}: {e}", self.options.dir.display()),
        }
    }

    /// Keeps the reconciler off `volume_id`'s source while the hold lives.
    pub fn hold(self: &Arc<Self>, volume_id: &str) -> Hold {
        *self
            .in_progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(volume_id.to_string())
            .or_default() += 1;
        Hold {
            pods: self.clone(),
            volume_id: volume_id.to_string(),
        }
    }

    /// Brings the claim's volume onto this node for `volume_id` and returns the directory the
    /// daemon reads and the pod's name. Safe to call again (a retried stage): it finds what an
    /// earlier call made. Call it under a [`Hold`] kept until the daemon serves the volume.
    #[tracing::instrument(skip_all, fields(volume_id, claim = %claim))]
    pub async fn ensure(
        &self,
        volume_id: &str,
        claim: &ClaimSource,
        resolved: &Resolved,
        read_write: bool,
    ) -> Result<(PathBuf, String), SourcePodError> {
        let name = format!("{}/{}", claim.namespace, claim.name);
        let client = self.claims.client(&name).await?;
        let node = &self.options.node;
        // What can be known before any pod starts.
        if let Some(selector) = &resolved.node_affinity {
            let nodes: Api<Node> = Api::all(client.clone());
            let this = api_call(&name, nodes.get(node)).await?;
            if !node_matches(selector, &this) {
                return Err(SourcePodError::Elsewhere {
                    claim: name,
                    node: node.clone(),
                    why: format!(
                        "its PersistentVolume {} may only be used on nodes matching {}",
                        resolved.volume.as_deref().unwrap_or_default(),
                        describe_selector(selector)
                    ),
                });
            }
        }
        let pods: Api<Pod> = Api::namespaced(client, &claim.namespace);
        if resolved.single_node {
            let list = api_call(&name, pods.list(&ListParams::default())).await?;
            if let Some((pod, other)) = used_elsewhere(&list.items, &claim.name, node) {
                return Err(SourcePodError::Elsewhere {
                    claim: name,
                    node: node.clone(),
                    why: format!(
                        "it is ReadWriteOnce (one node at a time) and pod {pod} uses it on node \
                         {other}"
                    ),
                });
            }
        }
        let record = Record {
            volume_id: volume_id.to_string(),
            namespace: claim.namespace.clone(),
            claim: claim.name.clone(),
            pod: pod_name(node, volume_id),
            read_only: !read_write,
            created: now(),
        };
        let described = format!("source pod {}/{}", record.namespace, record.pod);
        let mount_point = self.mount_point(&record.pod);
        if !self.record_path(&record.pod).exists() {
            self.write_record(&record).await?;
        }
        let bound = {
            let point = mount_point.clone();
            tokio::task::spawn_blocking(move || mounts::at(&point))
                .await
                .map_err(|e| self.host_error(&name, "the mount table", e))?
                .map_err(|e| self.host_error(&name, "the mount table", e))?
        };
        if bound.is_some() {
            return Ok((mount_point, described));
        }
        let pod = self.running_pod(&pods, &record, &name).await?;
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let kubelet_dir = self.options.kubelet_dir.clone();
        let (point, claim_name) = (mount_point.clone(), name.clone());
        let read_only = record.read_only;
        tokio::task::spawn_blocking(move || {
            let entries = mounts::all().map_err(|e| format!("cannot read the mount table: {e}"))?;
            let volume = kubelet_mount(&entries, &kubelet_dir, &uid).ok_or_else(|| {
                format!(
                    "kubelet mounted nothing under {}/pods/{uid}/volumes: the claim's volume \
                     is not one kubelet mounts (a hostPath volume?)",
                    kubelet_dir.display()
                )
            })?;
            std::fs::create_dir_all(&point)
                .map_err(|e| format!("cannot create {}: {e}", point.display()))?;
            mounts::bind(&volume, &point, read_only).map_err(|e| {
                format!(
                    "cannot bind {} at {}: {e}",
                    volume.display(),
                    point.display()
                )
            })?;
            tracing::info!(from = %volume.display(), at = %point.display(), "source bound");
            Ok(())
        })
        .await
        .map_err(|e| self.host_error(&claim_name, "binding the source", e))?
        .map_err(|why| SourcePodError::Node {
            claim: claim_name,
            why,
        })?;
        Ok((mount_point, described))
    }

    async fn write_record(&self, record: &Record) -> Result<(), SourcePodError> {
        let claim = format!("{}/{}", record.namespace, record.claim);
        let text = serde_json::to_vec_pretty(record)
            .map_err(|e| self.host_error(&claim, "cannot encode a record", e))?;
        let (dir, path) = (self.options.dir.clone(), self.record_path(&record.pod));
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)?;
            let partial = path.with_extension("json.partial");
            std::fs::write(&partial, text)?;
            std::fs::rename(&partial, &path)
        })
        .await
        .map_err(|e| self.host_error(&claim, "cannot write a record", e))?
        .map_err(|e| self.host_error(&claim, "cannot write a record", e))
    }

    /// The record's pod, created if missing, once it runs (or why it does not).
    async fn running_pod(
        &self,
        pods: &Api<Pod>,
        record: &Record,
        claim: &str,
    ) -> Result<Pod, SourcePodError> {
        let described = format!("{}/{}", record.namespace, record.pod);
        let deadline = tokio::time::Instant::now() + RUNNING_WAIT;
        let mut last = "not created yet".to_string();
        while tokio::time::Instant::now() < deadline {
            match api_call(claim, pods.get_opt(&record.pod)).await? {
                None => {
                    let pod = manifest(&self.options, record);
                    // 409: made meanwhile (by the reconciler); it is looked at next round.
                    let created =
                        api_call_unless(claim, 409, pods.create(&PostParams::default(), &pod))
                            .await?;
                    if created.is_some() {
                        tracing::info!(pod = %described, "source pod created");
                    }
                }
                Some(pod) if !is_ours(&pod) => {
                    return Err(SourcePodError::Node {
                        claim: claim.to_string(),
                        why: format!(
                            "a pod named {described} that reservoir did not make (no label \
                             {ROLE_LABEL}={ROLE_SOURCE}) is in the way"
                        ),
                    });
                }
                Some(pod) if pod.metadata.deletion_timestamp.is_some() => {
                    last = "the previous source pod is still being deleted".to_string();
                }
                Some(pod) => match pod_state(&pod) {
                    PodState::Running => return Ok(pod),
                    PodState::Unschedulable(why) => {
                        self.release_record(record).await;
                        return Err(SourcePodError::Unschedulable {
                            claim: claim.to_string(),
                            pod: described,
                            why,
                        });
                    }
                    PodState::Failed(why) => {
                        tracing::warn!(pod = %described, %why, "source pod ended: replacing it");
                        self.delete_pod(pods, &record.pod, claim).await?;
                        last = why;
                    }
                    PodState::Waiting(why) => last = why,
                },
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(SourcePodError::NotRunning {
            claim: claim.to_string(),
            pod: described,
            why: last,
        })
    }

    async fn delete_pod(
        &self,
        pods: &Api<Pod>,
        pod: &str,
        claim: &str,
    ) -> Result<(), SourcePodError> {
        match api_call(claim, pods.get_opt(pod)).await? {
            Some(found) if is_ours(&found) => {
                let precondition = DeleteParams {
                    preconditions: found.metadata.uid.map(|uid| kube::api::Preconditions {
                        uid: Some(uid),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                // 404: gone already; 409: a pod of the same name made since (not this one).
                api_call_unless(claim, 404, pods.delete(pod, &precondition)).await?;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn read_record(path: &Path) -> Option<Record> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// Every record in the directory.
    fn records(dir: &Path) -> Vec<Record> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .filter_map(|p| Self::read_record(&p))
            .collect()
    }

    /// Ends `volume_id`'s source, if it has one: the bind, then the pod, then the record. Call
    /// it once the daemon no longer reads the volume.
    #[tracing::instrument(skip(self))]
    pub async fn release(&self, volume_id: &str) -> Result<(), SourcePodError> {
        let pod = pod_name(&self.options.node, volume_id);
        let Some(record) = Self::read_record(&self.record_path(&pod)) else {
            return Ok(());
        };
        self.release_record(&record).await;
        if self.record_path(&pod).exists() {
            return Err(SourcePodError::Node {
                claim: format!("{}/{}", record.namespace, record.claim),
                why: format!(
                    "source pod {}/{pod} could not be removed (see the log)",
                    record.namespace
                ),
            });
        }
        Ok(())
    }

    /// Removes the record's bind and pod, then the record; what fails is logged and the record
    /// kept, so that the reconciler tries again.
    async fn release_record(&self, record: &Record) {
        let claim = format!("{}/{}", record.namespace, record.claim);
        let point = self.mount_point(&record.pod);
        let unbound = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            for _ in 0..16 {
                if !mounts::unmount(&point)? {
                    break;
                }
            }
            match std::fs::remove_dir(&point) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        })
        .await;
        if let Err(e) = unbound
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
        {
            tracing::warn!(pod = %record.pod, error = %e, "cannot remove a source's bind");
            return;
        }
        let deleted = match self.claims.client(&claim).await {
            Ok(client) => {
                let pods: Api<Pod> = Api::namespaced(client, &record.namespace);
                self.delete_pod(&pods, &record.pod, &claim).await
            }
            Err(e) => Err(e.into()),
        };
        if let Err(e) = deleted {
            tracing::warn!(pod = %record.pod, error = %e, "cannot delete a source pod");
            return;
        }
        if let Err(e) = std::fs::remove_file(self.record_path(&record.pod)) {
            tracing::warn!(pod = %record.pod, error = %e, "cannot remove a source pod's record");
            return;
        }
        tracing::info!(pod = %record.pod, namespace = %record.namespace, "source pod released");
    }

    /// Brings the records in step with `served`, the volumes the daemon serves: the source of
    /// a volume no longer served is released (after [`UNUSED_GRACE`]); the pod of one still
    /// served is created again if it went away.
    pub async fn reconcile(&self, served: &HashSet<String>) {
        let dir = self.options.dir.clone();
        let records = tokio::task::spawn_blocking(move || Self::records(&dir))
            .await
            .unwrap_or_default();
        for record in records {
            if self
                .in_progress
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&record.volume_id)
            {
                continue;
            }
            let claim = format!("{}/{}", record.namespace, record.claim);
            if !served.contains(&record.volume_id) {
                if now().saturating_sub(record.created) >= UNUSED_GRACE.as_secs() {
                    tracing::info!(pod = %record.pod, volume_id = %record.volume_id, "no volume uses this source any more");
                    self.release_record(&record).await;
                }
                continue;
            }
            let Ok(client) = self.claims.client(&claim).await else {
                continue;
            };
            let pods: Api<Pod> = Api::namespaced(client, &record.namespace);
            match api_call(&claim, pods.get_opt(&record.pod)).await {
                Ok(None) => {}
                // An ended pod of ours goes, and is made again below.
                Ok(Some(pod))
                    if is_ours(&pod)
                        && pod.metadata.deletion_timestamp.is_none()
                        && matches!(pod_state(&pod), PodState::Failed(_)) =>
                {
                    if let Err(e) = self.delete_pod(&pods, &record.pod, &claim).await {
                        tracing::warn!(pod = %record.pod, error = %e, "cannot delete an ended source pod");
                        continue;
                    }
                }
                Ok(Some(_)) => continue,
                Err(e) => {
                    tracing::warn!(pod = %record.pod, error = %e, "cannot check a source pod");
                    continue;
                }
            }
            tracing::warn!(pod = %record.pod, namespace = %record.namespace, "a source pod in use went away: creating it again");
            let pod = manifest(&self.options, &record);
            if let Err(e) = api_call(&claim, pods.create(&PostParams::default(), &pod)).await {
                tracing::warn!(pod = %record.pod, error = %e, "cannot create a source pod again");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn options() -> SourcePodOptions {
        SourcePodOptions {
            node: "node-a".into(),
            image: "pause:1".into(),
            dir: "/var/lib/kubelet/plugins/reservoir.csi.dev/sources".into(),
            kubelet_dir: "/var/lib/kubelet".into(),
        }
    }

    fn record(read_only: bool) -> Record {
        Record {
            volume_id: "vol-1".into(),
            namespace: "ml".into(),
            claim: "data".into(),
            pod: pod_name("node-a", "vol-1"),
            read_only,
            created: 1,
        }
    }

    #[test]
    fn pod_names_are_stable_per_node_and_volume() {
        let name = pod_name("node-a", "vol-1");
        assert_eq!(name, pod_name("node-a", "vol-1"));
        assert_ne!(name, pod_name("node-b", "vol-1"));
        assert_ne!(name, pod_name("node-a", "vol-2"));
        assert!(
            name.len() <= 63 && name.starts_with("reservoir-source-"),
            "{name}"
        );
    }

    #[test]
    fn the_pod_mounts_the_claim_on_this_node_with_nothing_else() {
        let pod = manifest(&options(), &record(true));
        let labels = pod.metadata.labels.clone().unwrap();
        assert_eq!(labels[ROLE_LABEL], ROLE_SOURCE);
        assert!(is_ours(&pod));
        assert_eq!(
            pod.metadata.annotations.as_ref().unwrap()[CLAIM_ANNOTATION],
            "ml/data"
        );
        let spec = pod.spec.unwrap();
        let pinned = spec.affinity.unwrap().node_affinity.unwrap();
        let selector = pinned
            .required_during_scheduling_ignored_during_execution
            .unwrap();
        let node = |name: &str| Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(node_matches(&selector, &node("node-a")));
        assert!(!node_matches(&selector, &node("node-b")));
        assert_eq!(spec.automount_service_account_token, Some(false));
        let volumes = spec.volumes.unwrap();
        assert_eq!(volumes.len(), 1, "the claim is the pod's only volume");
        let claim = volumes[0].persistent_volume_claim.clone().unwrap();
        assert_eq!(
            (claim.claim_name.as_str(), claim.read_only),
            ("data", Some(true))
        );
        let container = &spec.containers[0];
        assert_eq!(container.image.as_deref(), Some("pause:1"));
        let security = container.security_context.clone().unwrap();
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(
            security.capabilities.unwrap().drop,
            Some(vec!["ALL".to_string()])
        );
        assert_eq!(spec.security_context.unwrap().run_as_non_root, Some(true));
        assert_eq!(
            container.volume_mounts.as_ref().unwrap()[0].read_only,
            Some(true)
        );

        let writable = manifest(&options(), &record(false)).spec.unwrap();
        let claim = writable.volumes.unwrap()[0].persistent_volume_claim.clone();
        assert_eq!(claim.unwrap().read_only, Some(false));
    }

    fn requirement(key: &str, operator: &str, values: &[&str]) -> NodeSelectorRequirement {
        NodeSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn node_affinity_is_matched_as_kubernetes_does() {
        use k8s_openapi::api::core::v1::NodeSelectorTerm;
        let node = Node {
            metadata: ObjectMeta {
                name: Some("node-a".into()),
                labels: Some(
                    [("kubernetes.io/hostname", "node-a"), ("disks", "3")]
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        let term = |expressions: Vec<NodeSelectorRequirement>| NodeSelectorTerm {
            match_expressions: Some(expressions),
            match_fields: None,
        };
        let selector = |terms: Vec<NodeSelectorTerm>| NodeSelector {
            node_selector_terms: terms,
        };
        let host = |v: &str| requirement("kubernetes.io/hostname", "In", &[v]);
        assert!(node_matches(
            &selector(vec![term(vec![host("node-a")])]),
            &node
        ));
        assert!(!node_matches(
            &selector(vec![term(vec![host("node-b")])]),
            &node
        ));
        // Terms are alternatives; requirements within one all hold.
        assert!(node_matches(
            &selector(vec![term(vec![host("node-b")]), term(vec![host("node-a")])]),
            &node
        ));
        assert!(!node_matches(
            &selector(vec![term(vec![
                host("node-a"),
                requirement("zone", "Exists", &[])
            ])]),
            &node
        ));
        for (operator, values, holds) in [
            ("Gt", vec!["2"], true),
            ("Gt", vec!["3"], false),
            ("Lt", vec!["4"], true),
            ("NotIn", vec!["3"], false),
            ("Exists", vec![], true),
            ("DoesNotExist", vec![], false),
            ("Gt", vec!["x"], false),
        ] {
            let s = selector(vec![term(vec![requirement("disks", operator, &values)])]);
            assert_eq!(
                node_matches(&s, &node),
                holds,
                "disks {operator} {values:?}"
            );
        }
        // An empty term, or no term, matches no node.
        assert!(!node_matches(&selector(vec![term(vec![])]), &node));
        assert!(!node_matches(&selector(vec![]), &node));
        assert_eq!(
            describe_selector(&selector(vec![term(vec![host("node-b")])])),
            "kubernetes.io/hostname In [node-b]"
        );
    }

    fn user(name: &str, node: Option<&str>, claim: &str, phase: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ml"},
            "spec": {
                "nodeName": node,
                "containers": [{"name": "c"}],
                "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": claim}}],
            },
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    #[test]
    fn a_single_node_claim_in_use_on_another_node_is_found() {
        let pods = [
            user("here", Some("node-a"), "data", "Running"),
            user("unscheduled", None, "data", "Pending"),
            user("done", Some("node-b"), "data", "Succeeded"),
            user("other-claim", Some("node-b"), "logs", "Running"),
        ];
        assert_eq!(used_elsewhere(&pods, "data", "node-a"), None);
        let mut pods = pods.to_vec();
        pods.push(user("there", Some("node-b"), "data", "Running"));
        assert_eq!(
            used_elsewhere(&pods, "data", "node-a"),
            Some(("ml/there".to_string(), "node-b".to_string()))
        );
    }

    #[test]
    fn the_pods_mount_is_found_under_kubelets_directory() {
        let table = mounts::parse(
            "\
30 1 8:1 / /var/lib/kubelet rw shared:1 - ext4 /dev/sda1 rw
31 30 0:40 / /var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~projected/token rw - tmpfs tmpfs rw
40 30 8:2 /disks/a /var/lib/kubelet/pods/uid-2/volumes/kubernetes.io~local-volume/pv-1 rw shared:5 - ext4 /dev/sdb rw
41 30 0:50 / /var/lib/kubelet/pods/uid-3/volumes/kubernetes.io~csi/pv-2/mount rw - nfs4 s:/x rw
",
        );
        let kubelet = Path::new("/var/lib/kubelet");
        assert_eq!(
            kubelet_mount(&table, kubelet, "uid-2"),
            Some(PathBuf::from(
                "/var/lib/kubelet/pods/uid-2/volumes/kubernetes.io~local-volume/pv-1"
            ))
        );
        assert_eq!(
            kubelet_mount(&table, kubelet, "uid-3"),
            Some(PathBuf::from(
                "/var/lib/kubelet/pods/uid-3/volumes/kubernetes.io~csi/pv-2/mount"
            ))
        );
        assert_eq!(kubelet_mount(&table, kubelet, "uid-4"), None);
        assert_eq!(kubelet_mount(&table, kubelet, "uid"), None);
    }

    #[test]
    fn pod_states_are_read_from_status() {
        let pod = |status: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({"metadata": {}, "status": status})).unwrap()
        };
        assert_eq!(
            pod_state(&pod(serde_json::json!({"phase": "Running"}))),
            PodState::Running
        );
        let unschedulable = pod(serde_json::json!({"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/1 nodes are available: 1 node(s) had volume node affinity conflict.",
        }]}));
        assert!(
            matches!(pod_state(&unschedulable), PodState::Unschedulable(m) if m.contains("affinity conflict"))
        );
        let waiting = pod(
            serde_json::json!({"phase": "Pending", "containerStatuses": [{
                "name": "source", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ContainerCreating"}},
            }]}),
        );
        assert!(
            matches!(pod_state(&waiting), PodState::Waiting(m) if m.starts_with("ContainerCreating"))
        );
        assert!(matches!(
            pod_state(&pod(serde_json::json!({"phase": "Failed"}))),
            PodState::Failed(_)
        ));
    }
}

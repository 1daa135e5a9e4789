//! The Controller service: turns StorageClass parameters into volumes.
//!
//! A reservoir volume is a view of a dataset, so "creating" one allocates nothing: it validates
//! the parameters and the capabilities, checks what the controller can reach (an NFS server
//! and the export path; a directory source is checked by the node that mounts it), and records
//! the volume under `--state-dir`. Deleting forgets the record and never touches the source.
//! Error codes follow the CSI specification's tables; every refusal says why and names the
//! parameter or field.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::{Request, Response, Status};
use tracing::Level;

use super::capability;
use super::claims::{Backing, Claims, nfs_v3_refusal};
use super::params::{ParamError, VolumeParams, VolumeSource};
use super::proto::controller_server::Controller;
use super::proto::controller_service_capability::Rpc;
use super::proto::controller_service_capability::rpc::Type as CapabilityType;
use super::proto::list_volumes_response;
use super::proto::validate_volume_capabilities_response::Confirmed;
use super::proto::*;
use super::state::{RECORD_VERSION, StateStore, VolumeRecord};
use super::{is_own_volume_id, traced, volume_id_for};
use crate::source::{self, SourceError, SourceOptions, SourceSpec};

/// Longest CreateVolume name accepted (the CSI specification's general size limit).
pub const MAX_NAME_LEN: usize = 128;

#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// The longest CreateVolume waits for an NFS server while checking a source. Keep it well
    /// below the external-provisioner's `--timeout` (10 s by default).
    pub source_check_timeout: Duration,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        ControllerOptions {
            source_check_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Clone)]
pub struct ControllerService {
    store: Arc<StateStore>,
    options: ControllerOptions,
    busy: Arc<Mutex<HashSet<String>>>,
    /// `pvc://` sources: resolved through the Kubernetes API.
    claims: Arc<Claims>,
}

/// Marks a volume id as having an operation in progress until dropped.
struct Busy {
    set: Arc<Mutex<HashSet<String>>>,
    id: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

impl ControllerService {
    pub fn new(store: Arc<StateStore>, options: ControllerOptions) -> Self {
        ControllerService {
            store,
            options,
            busy: Arc::new(Mutex::new(HashSet::new())),
            claims: Arc::new(Claims::default()),
        }
    }

    /// One operation per volume at a time: a concurrent call for the same volume gets ABORTED,
    /// as the specification recommends, and the CO retries it.
    fn begin(&self, volume_id: &str) -> Result<Busy, Status> {
        let mut set = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        if !set.insert(volume_id.to_string()) {
            return Err(Status::aborted(format!(
                "an operation on volume {volume_id} is already in progress"
            )));
        }
        Ok(Busy {
            set: self.busy.clone(),
            id: volume_id.to_string(),
        })
    }

    async fn create_volume(&self, request: CreateVolumeRequest) -> Result<Volume, Status> {
        let plan = plan_create(&request)?;
        let (name, volume_id) = (&request.name, &plan.volume_id);
        let _busy = self.begin(volume_id)?;

        if let Some(existing) = self.store.get(volume_id) {
            if existing.name != *name {
                return Err(Status::already_exists(format!(
                    "volume id {volume_id} is taken by volume {:?}",
                    existing.name
                )));
            }
            match VolumeParams::parse(&existing.parameters) {
                Ok(recorded) if recorded == plan.params => {}
                Ok(recorded) => {
                    let recorded = recorded.to_volume_context().into_iter().collect();
                    return Err(Status::already_exists(format!(
                        "volume {name:?} already exists with other parameters ({})",
                        differences(&recorded, &plan.context)
                    )));
                }
                Err(e) => {
                    return Err(Status::already_exists(format!(
                        "volume {name:?} already exists with parameters this version refuses \
                         ({e}); delete it or use another name"
                    )));
                }
            }
            if !plan.capacity.admits(existing.capacity_bytes) {
                return Err(Status::already_exists(format!(
                    "volume {name:?} already exists with capacity {} bytes, outside the \
                     requested range ({})",
                    existing.capacity_bytes, plan.capacity
                )));
            }
            return Ok(volume_of(&existing));
        }

        self.check_source(&plan.params).await?;
        let created_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let record = plan.record(&request, created_at);
        self.store
            .put(record.clone())
            .await
            .map_err(|e| Status::internal(format!("cannot record the volume: {e}")))?;
        Ok(volume_of(&record))
    }

    /// Opens an NFS source (the export and the path inside it, subPath included) within the
    /// check timeout. Directory sources live on the nodes and are checked there. A claim is
    /// resolved first (it exists, is bound or waits for its first consumer, its volume is one
    /// reservoir reads), and the NFS share it resolves to is checked like any: before any pod
    /// starts. A claim that source pods bring onto the nodes is checked there, as is one whose
    /// share only NFSv4 serves (read through a source pod).
    async fn check_source(&self, params: &VolumeParams) -> Result<(), Status> {
        let claim = matches!(params.source, VolumeSource::Claim(_));
        let root = match &params.source {
            VolumeSource::Claim(claim) => match self.claims.resolve(claim).await?.backing {
                Backing::Nfs(share) => params.resolved(&share).root(),
                Backing::SourcePod => return Ok(()),
            },
            VolumeSource::Direct(_) => params.root(),
        };
        let Some(root) = root else {
            return Err(Status::internal("a claim source was left unresolved"));
        };
        let SourceSpec::Nfs(url) = &root else {
            return Ok(());
        };
        let limit = self.options.source_check_timeout;
        let options = SourceOptions {
            timeout: limit,
            connections: 1,
        };
        match tokio::time::timeout(limit, source::open(&root, &options)).await {
            Ok(Ok(_source)) => Ok(()),
            // A claim's share that only NFSv4 serves is read through a source pod.
            Ok(Err(e)) if claim && nfs_v3_refusal(&e).is_some() => Ok(()),
            Ok(Err(e)) => Err(source_status(&root, e)),
            Err(_) => Err(Status::unavailable(format!(
                "source {}: the NFS server {} did not answer within {limit:?}",
                super::params::render_source(&root),
                url.host
            ))),
        }
    }

    async fn delete_volume(&self, request: DeleteVolumeRequest) -> Result<(), Status> {
        let id = &request.volume_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        if !is_own_volume_id(id) {
            // Not an id this driver issues: there is nothing to delete.
            return Ok(());
        }
        let _busy = self.begin(id)?;
        self.store
            .remove(id)
            .await
            .map_err(|e| Status::internal(format!("cannot forget volume {id}: {e}")))?;
        Ok(())
    }

    async fn validate(
        &self,
        request: ValidateVolumeCapabilitiesRequest,
    ) -> Result<ValidateVolumeCapabilitiesResponse, Status> {
        let id = &request.volume_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        if request.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument(
                "volume_capabilities is required (at least one capability)",
            ));
        }
        let record = is_own_volume_id(id)
            .then(|| self.store.get(id))
            .flatten()
            .ok_or_else(|| Status::not_found(format!("volume {id} does not exist")))?;
        validate_against(&record, request)
    }

    fn list(&self, request: ListVolumesRequest) -> Result<ListVolumesResponse, Status> {
        let limit = match request.max_entries {
            n if n < 0 => {
                return Err(Status::invalid_argument(format!(
                    "max_entries must not be negative (got {n})"
                )));
            }
            0 => None,
            n => Some(n as usize),
        };
        let start = if request.starting_token.is_empty() {
            String::new()
        } else {
            decode_token(&request.starting_token).ok_or_else(|| {
                Status::aborted(format!(
                    "starting_token {:?} was not issued by this controller; list again from \
                     the start",
                    request.starting_token
                ))
            })?
        };
        let (records, next) = self.store.page(&start, limit);
        Ok(ListVolumesResponse {
            entries: records
                .iter()
                .map(|r| list_volumes_response::Entry {
                    volume: Some(volume_of(r)),
                    status: None,
                })
                .collect(),
            next_token: next.map(|id| encode_token(&id)).unwrap_or_default(),
        })
    }
}

fn unimplemented(method: &str) -> Status {
    Status::unimplemented(format!(
        "{method} is not implemented by reservoir (see ControllerGetCapabilities)"
    ))
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let request = request.into_inner();
        let id = if request.name.is_empty() {
            String::new()
        } else {
            volume_id_for(&request.name)
        };
        traced("CreateVolume", &id, Level::INFO, async {
            let volume = self.create_volume(request).await?;
            Ok(CreateVolumeResponse {
                volume: Some(volume),
            })
        })
        .await
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let request = request.into_inner();
        let id = request.volume_id.clone();
        traced("DeleteVolume", &id, Level::INFO, async {
            self.delete_volume(request).await?;
            Ok(DeleteVolumeResponse {})
        })
        .await
    }

    async fn controller_publish_volume(
        &self,
        request: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        let id = request.into_inner().volume_id;
        traced("ControllerPublishVolume", &id, Level::INFO, async {
            Err(unimplemented("ControllerPublishVolume"))
        })
        .await
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        let id = request.into_inner().volume_id;
        traced("ControllerUnpublishVolume", &id, Level::INFO, async {
            Err(unimplemented("ControllerUnpublishVolume"))
        })
        .await
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let request = request.into_inner();
        let id = request.volume_id.clone();
        traced("ValidateVolumeCapabilities", &id, Level::INFO, async {
            self.validate(request).await
        })
        .await
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        traced("ListVolumes", "", Level::DEBUG, async {
            self.list(request.into_inner())
        })
        .await
    }

    async fn get_capacity(
        &self,
        _request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        traced("GetCapacity", "", Level::INFO, async {
            Err(unimplemented("GetCapacity"))
        })
        .await
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        traced("ControllerGetCapabilities", "", Level::DEBUG, async {
            let capabilities = [
                CapabilityType::CreateDeleteVolume,
                CapabilityType::ListVolumes,
            ]
            .into_iter()
            .map(|t| ControllerServiceCapability {
                r#type: Some(controller_service_capability::Type::Rpc(Rpc {
                    r#type: t as i32,
                })),
            })
            .collect();
            Ok(ControllerGetCapabilitiesResponse { capabilities })
        })
        .await
    }

    async fn create_snapshot(
        &self,
        request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let id = request.into_inner().source_volume_id;
        traced("CreateSnapshot", &id, Level::INFO, async {
            Err(unimplemented("CreateSnapshot"))
        })
        .await
    }

    async fn delete_snapshot(
        &self,
        _request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        traced("DeleteSnapshot", "", Level::INFO, async {
            Err(unimplemented("DeleteSnapshot"))
        })
        .await
    }

    async fn list_snapshots(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let id = request.into_inner().source_volume_id;
        traced("ListSnapshots", &id, Level::INFO, async {
            Err(unimplemented("ListSnapshots"))
        })
        .await
    }

    async fn get_snapshot(
        &self,
        _request: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        traced("GetSnapshot", "", Level::INFO, async {
            Err(unimplemented("GetSnapshot"))
        })
        .await
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let id = request.into_inner().volume_id;
        traced("ControllerExpandVolume", &id, Level::INFO, async {
            Err(unimplemented("ControllerExpandVolume"))
        })
        .await
    }

    async fn controller_get_volume(
        &self,
        request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let id = request.into_inner().volume_id;
        traced("ControllerGetVolume", &id, Level::INFO, async {
            Err(unimplemented("ControllerGetVolume"))
        })
        .await
    }

    async fn controller_modify_volume(
        &self,
        request: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        let id = request.into_inner().volume_id;
        traced("ControllerModifyVolume", &id, Level::INFO, async {
            Err(unimplemented("ControllerModifyVolume"))
        })
        .await
    }
}

/// ValidateVolumeCapabilities for the volume `record`: confirmed, or refused with why.
pub fn validate_against(
    record: &VolumeRecord,
    request: ValidateVolumeCapabilitiesRequest,
) -> Result<ValidateVolumeCapabilitiesResponse, Status> {
    let id = &record.volume_id;
    let params = VolumeParams::parse(&record.volume_context).map_err(|e| {
        Status::internal(format!(
            "volume {id}: its recorded parameters are invalid: {e}"
        ))
    })?;
    let refuse = |message: String| ValidateVolumeCapabilitiesResponse {
        confirmed: None,
        message,
    };
    if !request.volume_context.is_empty() {
        let given: BTreeMap<String, String> = request.volume_context.clone().into_iter().collect();
        if given != record.volume_context {
            return Ok(refuse(format!(
                "volume_context does not match volume {id} ({})",
                differences(&record.volume_context, &given)
            )));
        }
    }
    if !request.parameters.is_empty() {
        match VolumeParams::parse(&request.parameters) {
            Ok(p) if p == params => {}
            Ok(p) => {
                let given = p.to_volume_context().into_iter().collect();
                return Ok(refuse(format!(
                    "parameters do not match volume {id} ({})",
                    differences(&record.volume_context, &given)
                )));
            }
            Err(e) => return Ok(refuse(e.to_string())),
        }
    }
    if !request.mutable_parameters.is_empty() {
        return Ok(refuse(
            "mutable_parameters are not supported (no MODIFY_VOLUME capability)".to_string(),
        ));
    }
    for cap in &request.volume_capabilities {
        if let Err(why) = capability::check(cap, &params) {
            return Ok(refuse(why));
        }
    }
    Ok(ValidateVolumeCapabilitiesResponse {
        confirmed: Some(Confirmed {
            volume_context: request.volume_context,
            volume_capabilities: request.volume_capabilities,
            parameters: request.parameters,
            mutable_parameters: Default::default(),
        }),
        message: String::new(),
    })
}

/// A CreateVolume request, checked: the volume it names, before the state store or the source
/// is consulted.
#[derive(Debug)]
pub struct CreatePlan {
    pub params: VolumeParams,
    /// The access modes asked for (CSI names), each once.
    pub modes: Vec<String>,
    capacity: Capacity,
    /// The canonical parameters handed to the CO.
    pub context: BTreeMap<String, String>,
    pub volume_id: String,
}

impl CreatePlan {
    /// What the controller records for the volume `request` creates.
    pub fn record(self, request: &CreateVolumeRequest, created_at: u64) -> VolumeRecord {
        VolumeRecord {
            version: RECORD_VERSION,
            volume_id: self.volume_id,
            name: request.name.clone(),
            capacity_bytes: self.capacity.reported(),
            parameters: request.parameters.clone().into_iter().collect(),
            volume_context: self.context,
            access_modes: self.modes,
            created_at,
        }
    }
}

/// Checks a CreateVolume request by its contents alone: every refusal it can earn without the
/// state store or the source.
pub fn plan_create(request: &CreateVolumeRequest) -> Result<CreatePlan, Status> {
    check_name(&request.name)?;
    if request.volume_capabilities.is_empty() {
        return Err(Status::invalid_argument(
            "volume_capabilities is required (at least one capability)",
        ));
    }
    let params = VolumeParams::parse(&request.parameters).map_err(param_status)?;
    let mut modes = Vec::new();
    for cap in &request.volume_capabilities {
        let mode = capability::check(cap, &params).map_err(Status::invalid_argument)?;
        let mode = mode.as_str_name().to_string();
        if !modes.contains(&mode) {
            modes.push(mode);
        }
    }
    let capacity = requested_capacity(request.capacity_range.as_ref())?;
    if request.volume_content_source.is_some() {
        return Err(Status::invalid_argument(
            "volume_content_source is not supported: reservoir volumes are views of a source, \
             not copies (no snapshots or clones)",
        ));
    }
    if !request.mutable_parameters.is_empty() {
        return Err(Status::invalid_argument(
            "mutable_parameters are not supported (no MODIFY_VOLUME capability)",
        ));
    }
    let context = params.to_volume_context().into_iter().collect();
    Ok(CreatePlan {
        params,
        modes,
        capacity,
        context,
        volume_id: volume_id_for(&request.name),
    })
}

fn check_name(name: &str) -> Result<(), Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument("name is required"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Status::invalid_argument(format!(
            "name is {} bytes long; at most {MAX_NAME_LEN} are allowed",
            name.len()
        )));
    }
    // Control characters other than tab, line feed and carriage return are banned.
    if let Some(c) = name
        .chars()
        .find(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
    {
        return Err(Status::invalid_argument(format!(
            "name {name:?} contains the control character U+{:04X}",
            c as u32
        )));
    }
    Ok(())
}

fn param_status(e: ParamError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// Maps a failure to open a source to the code the specification suggests: unreachable is
/// UNAVAILABLE (the CO retries), a missing export or path is NOT_FOUND, anything else about the
/// source (not a directory, refused mount) is FAILED_PRECONDITION.
fn source_status(root: &SourceSpec, e: SourceError) -> Status {
    let shown = super::params::render_source(root);
    match e {
        SourceError::Unavailable { message, .. } => Status::unavailable(format!(
            "source {shown}: cannot reach the NFS server: {message}"
        )),
        SourceError::Timeout { op, after, .. } => Status::unavailable(format!(
            "source {shown}: the NFS server did not answer ({op}) within {after:?}"
        )),
        SourceError::Invalid(message) => {
            // The source names itself at the start of its messages; say it once.
            let own_name = format!("{root}: ");
            let detail = message.strip_prefix(&own_name).unwrap_or(&message);
            let text = format!("source {shown}: {detail}");
            if detail.contains("does not exist") || detail.contains("no export") {
                Status::not_found(text)
            } else {
                Status::failed_precondition(text)
            }
        }
        e @ SourceError::Status { errno, .. } if errno == libc::ENOENT => {
            Status::not_found(format!("source {shown}: {e}"))
        }
        e => Status::failed_precondition(format!("source {shown}: {e}")),
    }
}

/// A validated capacity range (zero: not given).
#[derive(Clone, Copy, Debug)]
struct Capacity {
    required: i64,
    limit: i64,
}

impl Capacity {
    /// What the volume reports: the required size, else the limit, else 0 (unknown).
    fn reported(self) -> i64 {
        if self.required > 0 {
            self.required
        } else {
            self.limit
        }
    }

    /// Whether a volume of `bytes` satisfies this range.
    fn admits(self, bytes: i64) -> bool {
        (self.required == 0 || bytes >= self.required) && (self.limit == 0 || bytes <= self.limit)
    }
}

impl std::fmt::Display for Capacity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "required_bytes {}, limit_bytes {}",
            self.required, self.limit
        )
    }
}

fn requested_capacity(range: Option<&CapacityRange>) -> Result<Capacity, Status> {
    let Some(range) = range else {
        return Ok(Capacity {
            required: 0,
            limit: 0,
        });
    };
    for (field, value) in [
        ("required_bytes", range.required_bytes),
        ("limit_bytes", range.limit_bytes),
    ] {
        if value < 0 {
            return Err(Status::invalid_argument(format!(
                "capacity_range.{field} must not be negative (got {value})"
            )));
        }
    }
    if range.limit_bytes > 0 && range.required_bytes > range.limit_bytes {
        return Err(Status::invalid_argument(format!(
            "capacity_range.limit_bytes ({}) is below required_bytes ({})",
            range.limit_bytes, range.required_bytes
        )));
    }
    Ok(Capacity {
        required: range.required_bytes,
        limit: range.limit_bytes,
    })
}

fn volume_of(record: &VolumeRecord) -> Volume {
    Volume {
        capacity_bytes: record.capacity_bytes,
        volume_id: record.volume_id.clone(),
        volume_context: record.volume_context.clone().into_iter().collect(),
        content_source: None,
        accessible_topology: Vec::new(),
    }
}

/// `cacheSize: "100Gi" there, "50Gi" here; ...` for the keys whose values differ.
fn differences(existing: &BTreeMap<String, String>, given: &BTreeMap<String, String>) -> String {
    let keys: std::collections::BTreeSet<&String> = existing.keys().chain(given.keys()).collect();
    let show = |v: Option<&String>| v.map_or("unset".to_string(), |v| format!("{v:?}"));
    keys.into_iter()
        .filter(|k| existing.get(*k) != given.get(*k))
        .map(|k| {
            format!(
                "{k}: {} there, {} here",
                show(existing.get(k)),
                show(given.get(k))
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// ListVolumes tokens: the id of the first volume of the next page, with a check value so
/// that a token this controller did not issue is recognised. A token stays valid when its
/// volume is deleted meanwhile (listing resumes at the next id).
fn encode_token(volume_id: &str) -> String {
    format!("{volume_id}@{:08x}", token_check(volume_id))
}

fn decode_token(token: &str) -> Option<String> {
    let (id, check) = token.rsplit_once('@')?;
    (check.len() == 8 && u32::from_str_radix(check, 16).ok()? == token_check(id))
        .then(|| id.to_string())
}

fn token_check(volume_id: &str) -> u32 {
    let mut bytes = b"reservoir ListVolumes token\0".to_vec();
    bytes.extend_from_slice(volume_id.as_bytes());
    xxhash_rust::xxh3::xxh3_64(&bytes) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        let token = encode_token("pvc-a-00");
        assert_eq!(decode_token(&token).as_deref(), Some("pvc-a-00"));
        for bad in ["", "invalid-token", "pvc-a-00", "pvc-a-00@00000000", "@"] {
            assert_eq!(decode_token(bad), None, "{bad}");
        }
    }

    #[test]
    fn capacity_ranges() {
        let range = |required, limit| {
            requested_capacity(Some(&CapacityRange {
                required_bytes: required,
                limit_bytes: limit,
            }))
        };
        assert!(range(-1, 0).is_err());
        assert!(range(0, -1).is_err());
        assert!(range(10, 5).is_err());
        let c = range(10, 20).unwrap();
        assert_eq!(c.reported(), 10);
        assert!(c.admits(10) && c.admits(20) && !c.admits(9) && !c.admits(21));
        assert_eq!(range(0, 20).unwrap().reported(), 20);
        assert!(requested_capacity(None).unwrap().admits(0));
    }

    #[test]
    fn names() {
        assert!(check_name("pvc-1").is_ok());
        assert!(check_name("with space\tand tab").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a\u{1}b").is_err());
        assert!(check_name("a\u{85}b").is_err());
        assert!(check_name(&"x".repeat(129)).is_err());
    }
}

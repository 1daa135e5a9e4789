//! A STAND-IN for the external-provisioner sidecar (registry.k8s.io/sig-storage/csi-provisioner,
//! run with `--extra-create-metadata`), whose image cannot be had on these machines. It is not
//! a reimplementation of that sidecar: it does what the sidecar does for our StorageClasses,
//! the same way, so that dynamic provisioning is tested through our real controller in its real
//! pod:
//! - it watches claims (polling the API every half second) whose StorageClass names our driver
//!   as provisioner and that are not bound;
//! - calls CreateVolume on the controller's socket with the claim's size and access modes, the
//!   StorageClass parameters, and the `csi.storage.k8s.io/pvc/name`, `pvc/namespace` and
//!   `pv/name` keys, under the name `pvc-<claim uid>`;
//! - creates the PersistentVolume (driver, volume handle, the returned volume context as
//!   attributes, a claimRef to the claim, the class's reclaim policy), which the real
//!   controller-manager then binds;
//! - when CreateVolume fails, records a `ProvisioningFailed` warning event on the claim with
//!   the driver's error (once per message), and goes on with the other claims;
//! - on release of a PersistentVolume it provisioned with the Delete policy, calls
//!   DeleteVolume and deletes the PersistentVolume.
//!
//! The controller's socket is in its pod's emptyDir, which kubelet keeps at
//! `/var/lib/kubelet/pods/<uid>/volumes/kubernetes.io~empty-dir/socket-dir/` on the node.

#![allow(dead_code)]

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use reservoir::csi::proto::controller_client::ControllerClient;
use reservoir::csi::proto::volume_capability::access_mode::Mode;
use reservoir::csi::proto::volume_capability::{AccessMode, AccessType, MountVolume};
use reservoir::csi::proto::{
    CapacityRange, CreateVolumeRequest, DeleteVolumeRequest, VolumeCapability,
};
use serde_json::{Value, json};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use super::k8s::Kubectl;

const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
const POLL: Duration = Duration::from_millis(500);

pub struct StandInProvisioner {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// What it did, one line per action (for the test's diagnostics and assertions).
    pub journal: Arc<Mutex<Vec<String>>>,
}

impl StandInProvisioner {
    pub fn start(api: Kubectl, driver: &str) -> StandInProvisioner {
        let stop = Arc::new(AtomicBool::new(false));
        let journal = Arc::new(Mutex::new(Vec::new()));
        let worker = Worker {
            api,
            driver: driver.to_string(),
            journal: journal.clone(),
        };
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                while !flag.load(Ordering::Relaxed) {
                    if let Err(e) = worker.pass().await {
                        worker.note(format!("pass failed: {e}"));
                    }
                    tokio::time::sleep(POLL).await;
                }
            });
        });
        StandInProvisioner {
            stop,
            thread: Some(thread),
            journal,
        }
    }

    pub fn journal(&self) -> Vec<String> {
        self.journal.lock().unwrap().clone()
    }
}

impl Drop for StandInProvisioner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if std::thread::panicking() {
            eprintln!("stand-in provisioner:\n{}", self.journal().join("\n"));
        }
    }
}

struct Worker {
    api: Kubectl,
    driver: String,
    journal: Arc<Mutex<Vec<String>>>,
}

fn items(list: Option<Value>) -> Vec<Value> {
    list.and_then(|l| l["items"].as_array().cloned())
        .unwrap_or_default()
}

fn text(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_string()
}

/// Kubernetes access modes as the external-provisioner maps them to CSI.
fn csi_mode(mode: &str) -> Mode {
    match mode {
        "ReadWriteOnce" => Mode::SingleNodeWriter,
        "ReadOnlyMany" => Mode::MultiNodeReaderOnly,
        "ReadWriteMany" => Mode::MultiNodeMultiWriter,
        _ => Mode::Unknown,
    }
}

impl Worker {
    fn note(&self, line: String) {
        self.journal.lock().unwrap().push(line);
    }

    /// The controller's socket, in its pod's emptyDir on this node.
    fn socket(&self) -> Option<PathBuf> {
        let pods = items(self.api.json(&[
            "-n",
            "reservoir",
            "get",
            "pods",
            "-l",
            "app=reservoir-controller",
        ]));
        pods.iter()
            .filter(|p| p["status"]["phase"] == "Running")
            .filter_map(|p| p["metadata"]["uid"].as_str())
            .map(|uid| {
                PathBuf::from(format!(
                    "/var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~empty-dir/socket-dir/csi.sock"
                ))
            })
            .find(|path| path.exists())
    }

    async fn client(&self) -> Result<ControllerClient<Channel>, String> {
        let path = self
            .socket()
            .ok_or("the controller's socket is not there yet")?;
        let shown = path.display().to_string();
        // The socket's path is longer than a unix socket address may be (108 bytes): connect
        // through a descriptor of its directory instead.
        let dir = std::fs::File::open(path.parent().unwrap())
            .map_err(|e| format!("open {}: {e}", shown))?;
        let name = path.file_name().unwrap().to_owned();
        let channel =
            Endpoint::try_from("http://[::]:50051")
                .map_err(|e| e.to_string())?
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let short =
                        PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(&name);
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(short).await?))
                    }
                }))
                .await
                .map_err(|e| format!("connect to {shown}: {e:?}"))?;
        Ok(ControllerClient::new(channel))
    }

    async fn pass(&self) -> Result<(), String> {
        let classes: HashMap<String, Value> = items(self.api.json(&["get", "storageclass"]))
            .into_iter()
            .filter(|c| c["provisioner"] == self.driver.as_str())
            .map(|c| (text(&c["metadata"]["name"]), c))
            .collect();
        let claims: Vec<Value> = items(self.api.json(&["get", "pvc", "-A"]))
            .into_iter()
            .filter(|c| {
                c["status"]["phase"] == "Pending"
                    && c["spec"]["volumeName"].as_str().is_none_or(str::is_empty)
                    && classes.contains_key(&text(&c["spec"]["storageClassName"]))
            })
            .collect();
        let volumes = items(self.api.json(&["get", "pv"]));
        let released: Vec<&Value> = volumes
            .iter()
            .filter(|v| {
                v["metadata"]["annotations"][PROVISIONED_BY] == self.driver.as_str()
                    && v["status"]["phase"] == "Released"
                    && v["spec"]["persistentVolumeReclaimPolicy"] == "Delete"
            })
            .collect();
        if claims.is_empty() && released.is_empty() {
            return Ok(());
        }
        let mut client = self.client().await?;
        for claim in claims {
            let pv_name = format!("pvc-{}", text(&claim["metadata"]["uid"]));
            if volumes
                .iter()
                .any(|v| v["metadata"]["name"] == pv_name.as_str())
            {
                continue;
            }
            let class = &classes[&text(&claim["spec"]["storageClassName"])];
            if let Err(e) = self.provision(&mut client, &claim, class, &pv_name).await {
                self.provisioning_failed(&claim, &e);
            }
        }
        for volume in released {
            let name = text(&volume["metadata"]["name"]);
            let id = text(&volume["spec"]["csi"]["volumeHandle"]);
            client
                .delete_volume(DeleteVolumeRequest {
                    volume_id: id.clone(),
                    secrets: Default::default(),
                })
                .await
                .map_err(|e| format!("DeleteVolume {id}: {e}"))?;
            self.api.ok(&["delete", "pv", &name, "--wait=false"]);
            self.note(format!("deleted volume {id} and PersistentVolume {name}"));
        }
        Ok(())
    }

    /// A claim that could not be provisioned: a warning event on it, as the sidecar records.
    fn provisioning_failed(&self, claim: &Value, error: &str) {
        let line = format!("provisioning failed: {error}");
        if self.journal.lock().unwrap().contains(&line) {
            return;
        }
        self.note(line);
        let event = json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "generateName": "standin-provisioner-",
                "namespace": claim["metadata"]["namespace"],
            },
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": claim["metadata"]["namespace"],
                "name": claim["metadata"]["name"],
                "uid": claim["metadata"]["uid"],
            },
            "reason": "ProvisioningFailed",
            "message": error,
            "type": "Warning",
            "source": { "component": "standin-provisioner" },
        });
        self.api
            .run(&["create", "-f", "-"], Some(&event.to_string()));
    }

    async fn provision(
        &self,
        client: &mut ControllerClient<Channel>,
        claim: &Value,
        class: &Value,
        pv_name: &str,
    ) -> Result<(), String> {
        let namespace = text(&claim["metadata"]["namespace"]);
        let claim_name = text(&claim["metadata"]["name"]);
        let request = text(&claim["spec"]["resources"]["requests"]["storage"]);
        let bytes: reservoir::units::Size = request
            .parse()
            .map_err(|e| format!("claim {namespace}/{claim_name}: storage {request:?}: {e}"))?;
        let modes: Vec<String> = claim["spec"]["accessModes"]
            .as_array()
            .map(|a| a.iter().map(text).collect())
            .unwrap_or_default();
        let mut parameters: HashMap<String, String> = class["parameters"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), text(v))).collect())
            .unwrap_or_default();
        // --extra-create-metadata
        parameters.insert("csi.storage.k8s.io/pvc/name".into(), claim_name.clone());
        parameters.insert("csi.storage.k8s.io/pvc/namespace".into(), namespace.clone());
        parameters.insert("csi.storage.k8s.io/pv/name".into(), pv_name.to_string());
        let response = client
            .create_volume(CreateVolumeRequest {
                name: pv_name.to_string(),
                capacity_range: Some(CapacityRange {
                    required_bytes: bytes.0 as i64,
                    limit_bytes: 0,
                }),
                volume_capabilities: modes
                    .iter()
                    .map(|m| VolumeCapability {
                        access_type: Some(AccessType::Mount(MountVolume::default())),
                        access_mode: Some(AccessMode {
                            mode: csi_mode(m) as i32,
                        }),
                    })
                    .collect(),
                parameters,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                // As the sidecar words it: the gRPC code by name, then the driver's message.
                format!(
                    "CreateVolume for {namespace}/{claim_name}: rpc error: code = {:?} desc = {}",
                    e.code(),
                    e.message()
                )
            })?
            .into_inner();
        let volume = response.volume.ok_or("CreateVolume returned no volume")?;
        let capacity = if volume.capacity_bytes > 0 {
            volume.capacity_bytes.to_string()
        } else {
            request.clone()
        };
        let pv = json!({
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {
                "name": pv_name,
                "annotations": { PROVISIONED_BY: self.driver },
            },
            "spec": {
                "capacity": { "storage": capacity },
                "accessModes": modes,
                "persistentVolumeReclaimPolicy":
                    class["reclaimPolicy"].as_str().unwrap_or("Delete"),
                "storageClassName": class["metadata"]["name"],
                "volumeMode": "Filesystem",
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": namespace,
                    "name": claim_name,
                    "uid": claim["metadata"]["uid"],
                },
                "csi": {
                    "driver": self.driver,
                    "volumeHandle": volume.volume_id,
                    "volumeAttributes": volume.volume_context,
                },
            },
        });
        self.api.apply(&pv.to_string());
        self.note(format!(
            "provisioned {} for {namespace}/{claim_name} as {pv_name}",
            volume.volume_id
        ));
        Ok(())
    }
}

//! reservoir in a real Kubernetes: a single-node cluster (v1.20.2 with the kubelet
//! `:authority` backport, see tests/common/k8s.rs), the image `make image` builds, and the
//! shipped manifests (deploy/kubernetes) applied through the overlay in e2e/overlay, which lists
//! its edits at its top. Datasets are served by a real nfs-ganesha in its own network namespace;
//! the node plugin runs on the node's network, so its daemon reaches the server like any node
//! would. Dynamic provisioning goes through a STAND-IN for the external-provisioner sidecar
//! (tests/common/standin_provisioner.rs), whose image cannot be had here.
//!
//! Each scenario asserts what a user sees: a pod's output, its events, the mounts on the node,
//! `reservoir status` and the metrics endpoint. The node plugin's containers are killed, its
//! DaemonSet rolled and the keeper replaced while pods read: no read may fail.
//!
//! Run with `make e2e` (root; it builds Kubernetes once per machine and the image, then runs
//! this test with RESERVOIR_K8S_BIN and RESERVOIR_IMAGE_ARCHIVE set).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::data::{sha256_file, write_random_file, write_small_tree};
use common::ganesha::Ganesha;
use common::k8s::{
    API_SERVICE_IP, BUSYBOX_IMAGE, Cluster, NODE_IP, NODE_NAME, PAUSE_IMAGE, wait_for,
};
use common::standin_provisioner::StandInProvisioner;

const DRIVER: &str = "reservoir.csi.dev";
const NS: &str = "e2e";
const POD_WAIT: Duration = Duration::from_secs(120);

/// The datasets: `data` (the main one, also the inline volumes' allowed prefix), `shared`
/// (read only by the shared-volume scenario, so its first epoch surely comes from the source),
/// `other` (outside --allowed-sources) and `claimed` (only read through a claim's NFS volume).
struct Datasets {
    dir: tempfile::TempDir,
}

impl Datasets {
    fn create() -> Datasets {
        let dir = tempfile::Builder::new()
            .prefix("rsv-e2e-")
            .tempdir()
            .unwrap();
        let root = dir.path().join("export");
        for (name, seed) in [("data", 1), ("shared", 2), ("other", 3), ("claimed", 4)] {
            let d = root.join(name);
            fs::create_dir_all(d.join("nested/deeper")).unwrap();
            write_random_file(&d.join("big.bin"), 6 << 20, seed);
            write_random_file(&d.join("nested/a.bin"), 300 << 10, seed + 10);
            write_random_file(&d.join("nested/deeper/b.bin"), 1 << 20, seed + 20);
            write_small_tree(&d.join("small"), 40, 1, 8192, seed + 30);
        }
        // Pods run as other users: everything readable, directories searchable.
        run_sh(&format!("chmod -R a+rX {}", dir.path().display()));
        Datasets { dir }
    }

    fn export(&self) -> PathBuf {
        self.dir.path().join("export")
    }

    /// `sha256  ./relative/path` for every file, as busybox `sha256sum` prints them.
    fn checksums(&self, name: &str) -> BTreeMap<String, String> {
        let root = self.export().join(name);
        let mut out = BTreeMap::new();
        let mut pending = vec![root.clone()];
        while let Some(dir) = pending.pop() {
            for entry in fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    pending.push(path);
                } else {
                    let rel = format!("./{}", path.strip_prefix(&root).unwrap().display());
                    out.insert(rel, sha256_file(&path));
                }
            }
        }
        out
    }
}

fn run_sh(script: &str) -> String {
    common::k8s::run("sh", &["-c", script])
}

/// The `sha256  path` lines of a pod's output.
fn parse_checksums(log: &str) -> BTreeMap<String, String> {
    log.lines()
        .filter_map(|l| {
            let (hash, path) = l.split_once("  ")?;
            (hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| (path.to_string(), hash.to_string()))
        })
        .collect()
}

/// A busybox pod that runs `script` once, with `volume` (the body of a `volumes:` entry) at
/// /data, read-only unless `writable_mount`.
fn pod(name: &str, volume: &str, script: &str, security: &str, writable_mount: bool) -> String {
    // A YAML single-quoted string: quotes are doubled.
    let script = script.replace('\'', "''");
    let read_only = !writable_mount;
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {NS}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  securityContext: {security}
  containers:
    - name: main
      image: {BUSYBOX_IMAGE}
      command: ["sh", "-c", '{script}']
      volumeMounts:
        - name: data
          mountPath: /data
          readOnly: {read_only}
  volumes:
    - name: data
{volume}
"#
    )
}

/// A static, read-only reservoir PersistentVolume `volume` (its handle the same) reading
/// `source`, with `extra` attribute lines (`key: value`, each on its own line), and the claim
/// `claim` of the test's namespace bound to it.
fn static_reservoir_volume(volume: &str, claim: &str, source: &str, extra: &[&str]) -> String {
    let extra: String = extra.iter().map(|line| format!("      {line}\n")).collect();
    format!(
        r#"apiVersion: v1
kind: PersistentVolume
metadata:
  name: {volume}
spec:
  capacity:
    storage: 1Gi
  accessModes: [ReadOnlyMany]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  csi:
    driver: {DRIVER}
    volumeHandle: {volume}
    volumeAttributes:
      source: "{source}"
      readOnly: "true"
{extra}---
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {claim}
  namespace: {NS}
spec:
  accessModes: [ReadOnlyMany]
  storageClassName: ""
  volumeName: {volume}
  resources:
    requests:
      storage: 1Gi
"#
    )
}

/// An in-tree `nfs` PersistentVolume `volume` of `server:path` (which kubelet mounts only for
/// a pod that uses it), and the claim `claim` of the test's namespace bound to it.
fn nfs_volume(volume: &str, claim: &str, server: &str, path: &Path) -> String {
    let path = path.display();
    format!(
        r#"apiVersion: v1
kind: PersistentVolume
metadata:
  name: {volume}
spec:
  capacity:
    storage: 1Gi
  accessModes: [ReadOnlyMany]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  nfs:
    server: "{server}"
    path: "{path}"
    readOnly: true
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {claim}
  namespace: {NS}
spec:
  accessModes: [ReadOnlyMany]
  storageClassName: ""
  volumeName: {volume}
  resources:
    requests:
      storage: 1Gi
"#
    )
}

fn claim_volume(claim: &str) -> String {
    format!("      persistentVolumeClaim:\n        claimName: {claim}\n        readOnly: true")
}

/// A claim the pod asks to write to (the volume itself must refuse).
fn writable_claim_volume(claim: &str) -> String {
    format!("      persistentVolumeClaim:\n        claimName: {claim}\n        readOnly: false")
}

/// An inline volume naming `claim` (a `pvc://` source), read-only.
fn inline_claim(claim: &str) -> String {
    format!(
        "      csi:\n        driver: {DRIVER}\n        readOnly: true\n        \
         volumeAttributes:\n          source: \"{claim}\""
    )
}

fn inline_volume(source: &str) -> String {
    format!(
        "      csi:\n        driver: {DRIVER}\n        readOnly: true\n        volumeAttributes:\n          \
         source: \"{source}\"\n          metadataTTL: forever"
    )
}

const READ_ALL: &str = "cd /data && find . -type f | sort | xargs sha256sum && echo READ-DONE";

/// Dropped in field order: the stand-in first, then the cluster (its pods release their
/// volumes while the NFS server still answers), then the server and the datasets.
struct E2e {
    provisioner: Option<StandInProvisioner>,
    cluster: Cluster,
    ganesha: Ganesha,
    datasets: Datasets,
}

impl E2e {
    fn nfs(&self, name: &str) -> String {
        self.ganesha.url(self.ganesha.exports()[0].join(name))
    }

    fn run_reader(&self, name: &str, volume: &str, security: &str) -> String {
        self.cluster
            .apply(&pod(name, volume, READ_ALL, security, false));
        let phase = self.cluster.wait_pod_done(NS, name, POD_WAIT);
        let log = self.cluster.container_log(NS, name, "main");
        assert_eq!(phase, "Succeeded", "pod {name}:\n{log}");
        log
    }

    /// Starts a pod that reads everything in `volume` and stays (so that the volume stays
    /// staged), and returns its log once it has read.
    fn read_and_stay(&self, name: &str, volume: &str) -> String {
        self.cluster.apply(&pod(
            name,
            volume,
            &format!("{READ_ALL}; sleep 3600"),
            "{}",
            false,
        ));
        wait_for(&format!("{name} has read its volume"), POD_WAIT, || {
            let log = self.cluster.container_log(NS, name, "main");
            log.contains("READ-DONE").then_some(log)
        })
    }

    fn assert_reads(&self, pod_name: &str, volume: &str, dataset: &str, security: &str) {
        let log = self.run_reader(pod_name, volume, security);
        let seen = parse_checksums(&log);
        let expected = self.datasets.checksums(dataset);
        assert_eq!(
            seen.len(),
            expected.len(),
            "pod {pod_name} saw {} files, the dataset has {}:\n{log}",
            seen.len(),
            expected.len()
        );
        assert_eq!(seen, expected, "pod {pod_name} read other bytes");
    }

    fn daemon_socket(&self) -> PathBuf {
        self.cluster.work.join("run/daemon.sock")
    }

    /// `reservoir status --json` of the node's daemon, through the shared host path.
    fn status(&self) -> serde_json::Value {
        self.try_status()
            .unwrap_or_else(|e| panic!("reservoir status: {e}"))
    }

    /// The status, or why the daemon did not give it (it may be restarting).
    fn try_status(&self) -> Result<serde_json::Value, String> {
        let output = std::process::Command::new(common::mount::bin())
            .args(["status", "--json", "--socket"])
            .arg(self.daemon_socket())
            .output()
            .map_err(|e| e.to_string())?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        serde_json::from_slice(&output.stdout).map_err(|e| e.to_string())
    }

    fn volume_status(&self, volume_id: &str) -> serde_json::Value {
        self.status()["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["volume_id"] == volume_id)
            .cloned()
            .unwrap_or_else(|| panic!("the daemon serves no volume {volume_id}"))
    }

    fn node_pod(&self) -> String {
        driver_pod(&self.cluster, "reservoir-node").expect("the node plugin's pod")
    }

    fn pod_uid(&self, pod: &str) -> String {
        self.cluster
            .kubectl_json(&["-n", NS, "get", "pod", pod])
            .and_then(|p| p["metadata"]["uid"].as_str().map(str::to_string))
            .unwrap()
    }
}

/// The driver's pods labelled `app=APP` (in the reservoir namespace), as the API lists them.
fn driver_pods(cluster: &Cluster, app: &str) -> Vec<serde_json::Value> {
    cluster
        .kubectl_json(&[
            "-n",
            "reservoir",
            "get",
            "pods",
            "-l",
            &format!("app={app}"),
        ])
        .and_then(|l| l["items"].as_array().cloned())
        .unwrap_or_default()
}

/// The name of the first of the driver's pods labelled `app=APP`.
fn driver_pod(cluster: &Cluster, app: &str) -> Option<String> {
    driver_pods(cluster, app)
        .first()?
        .pointer("/metadata/name")?
        .as_str()
        .map(str::to_string)
}

/// `(mount point, major:minor, fs type)` of every mount.
fn mounts() -> Vec<(String, String, String)> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            Some((
                fields[4].to_string(),
                fields[2].to_string(),
                fields.get(dash + 1)?.to_string(),
            ))
        })
        .collect()
}

fn scrape_metrics() -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect((NODE_IP, 9810)).expect("metrics port");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: node\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    answer.split_once("\r\n\r\n").unwrap().1.to_string()
}

fn metric(text: &str, name: &str, volume: &str) -> f64 {
    let prefix = format!("{name}{{volume=\"{volume}\",");
    text.lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} for volume {volume} in the metrics"))
}

fn step(name: &str, body: impl FnOnce()) {
    let started = Instant::now();
    eprintln!("e2e: {name} ...");
    body();
    eprintln!("e2e: {name}: ok ({:.1} s)", started.elapsed().as_secs_f64());
}

#[test]
#[ignore = "needs root, the Kubernetes build and the image: run `make e2e`"]
fn kubernetes_end_to_end() {
    let started = Instant::now();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin = PathBuf::from(
        std::env::var_os("RESERVOIR_K8S_BIN")
            .expect("RESERVOIR_K8S_BIN: the Kubernetes binaries (e2e/k8s/build.sh prints it)"),
    );
    let archive = PathBuf::from(
        std::env::var_os("RESERVOIR_IMAGE_ARCHIVE")
            .expect("RESERVOIR_IMAGE_ARCHIVE: the image archive (scripts/image.sh archive)"),
    );
    assert!(archive.is_file(), "{} is missing", archive.display());

    let datasets = Datasets::create();
    let ganesha = Ganesha::start_read_only(&datasets.export());
    let cluster = Cluster::start(&bin, &repo);
    eprintln!(
        "e2e: cluster ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let mut e2e = E2e {
        provisioner: None,
        cluster,
        ganesha,
        datasets,
    };

    step("install the driver with the shipped manifests", || {
        install(&e2e, &archive)
    });
    e2e.provisioner = Some(StandInProvisioner::start(e2e.cluster.api(), DRIVER));
    e2e.cluster.kubectl_ok(&["create", "namespace", NS]);

    step(
        "a pod reaches the API server through the kubernetes Service",
        || api_through_service(&e2e),
    );
    step(
        "StorageClass -> claim -> pod reads the dataset (NFS)",
        || dynamic(&e2e),
    );
    step("static PersistentVolume -> claim -> pod reads", || {
        static_volume(&e2e)
    });
    step(
        "pvc:// sources: an NFS claim read byte for byte with our client; missing, unbound and \
         other-namespace claims refused",
        || claims(&e2e),
    );
    step(
        "pvc:// through a source pod: a local claim waiting for its first consumer is bound, \
         read, its pod recreated when deleted, released at unstage; a local volume of another \
         node is refused",
        || source_pods(&e2e),
    );
    step(
        "locality: the node's label for a volume appears after a preload, stays after unstage, \
         follows evictions; the documented affinity is accepted",
        || locality(&e2e),
    );
    step(
        "an inline volume reads; one outside --allowed-sources is refused",
        || inline(&e2e),
    );
    step(
        "two pods share one FUSE session and one cache; metrics agree with status",
        || shared(&e2e),
    );
    step(
        "a non-root pod reads; a read-only volume refuses writes",
        || non_root_and_read_only(&e2e),
    );
    step("the node container restarts while a pod reads", || {
        node_restart(&e2e)
    });
    step(
        "the daemon container is killed (kill -9) while a pod reads: the pod never notices",
        || daemon_killed(&e2e),
    );
    step(
        "the node plugin's DaemonSet rolls (an upgrade) while a pod reads: the pod never notices",
        || daemon_set_rolled(&e2e),
    );
    step(
        "the keeper is replaced, then the daemon killed, while a pod reads: the pod never notices",
        || keeper_replaced(&e2e),
    );
    step(
        "pods deleted: volumes unpublished and unstaged, nothing left mounted",
        || pods_deleted(&e2e),
    );
    e2e.cluster.check_processes();
    eprintln!(
        "e2e: all scenarios passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Imports the image, applies deploy/kubernetes through e2e/overlay, and waits until kubelet
/// has registered the driver and both pods are ready.
fn install(e2e: &E2e, archive: &Path) {
    let cluster = &e2e.cluster;
    cluster.import_image(archive);
    let overlay = cluster.work.join("overlay");
    fs::create_dir_all(&overlay).unwrap();
    // kustomize (in kubectl 1.20) takes a base by relative path only.
    let depth = overlay.components().count() - 1;
    let base = format!(
        "{}{}",
        "../".repeat(depth),
        cluster
            .repo
            .join("deploy/kubernetes")
            .to_str()
            .unwrap()
            .trim_start_matches('/')
    );
    // Inline volumes may also name claims of their own pod's namespace.
    let allowed = format!("{},pvc://", e2e.nfs("data"));
    for name in [
        "kustomization.yaml",
        "node.yaml",
        "keeper.yaml",
        "controller.yaml",
    ] {
        let text = fs::read_to_string(cluster.repo.join("e2e/overlay").join(name))
            .unwrap()
            .replace("@WORK@", cluster.work.to_str().unwrap())
            .replace("@ALLOWED_SOURCES@", &allowed)
            .replace("@BASE@", &base);
        fs::write(overlay.join(name), text).unwrap();
    }
    cluster.kubectl_ok(&["apply", "-k", overlay.to_str().unwrap()]);
    let node = wait_for("the node plugin's pod exists", POD_WAIT, || {
        driver_pod(cluster, "reservoir-node")
    });
    // Ready means: the daemon answers and kubelet registered the driver (readiness probe).
    cluster.wait_pod_ready("reservoir", &node, POD_WAIT);
    let csinode = cluster
        .kubectl_json(&["get", "csinode", common::k8s::NODE_NAME])
        .unwrap();
    assert!(
        csinode["spec"]["drivers"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["name"] == DRIVER)),
        "kubelet did not register {DRIVER}: {csinode}"
    );
    let controller = wait_for("the controller's pod exists", POD_WAIT, || {
        driver_pod(cluster, "reservoir-controller")
    });
    cluster.wait_pod_ready("reservoir", &controller, POD_WAIT);
    let log = cluster.container_log("reservoir", &node, "node");
    assert!(log.contains("registered with kubelet"), "{log}");
}

fn api_through_service(e2e: &E2e) {
    let script = "echo host=$KUBERNETES_SERVICE_HOST; wget -q -O - --no-check-certificate \
                  https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/version";
    let yaml = format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: api-check
  namespace: {NS}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
    - name: main
      image: {BUSYBOX_IMAGE}
      command: ["sh", "-c", "{script}"]
"#
    );
    e2e.cluster.apply(&yaml);
    let phase = e2e.cluster.wait_pod_done(NS, "api-check", POD_WAIT);
    let log = e2e.cluster.container_log(NS, "api-check", "main");
    assert_eq!(phase, "Succeeded", "{log}");
    assert!(log.contains(&format!("host={API_SERVICE_IP}")), "{log}");
    assert!(log.contains("\"gitVersion\": \"v1.20.2\""), "{log}");
}

fn dynamic(e2e: &E2e) {
    let cluster = &e2e.cluster;
    cluster.apply(&format!(
        r#"apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: e2e-nfs
provisioner: {DRIVER}
parameters:
  source: "{}"
  subPath: data
  cacheSize: 256Mi
  metadataTTL: forever
  preload: nested
  readOnly: "true"
reclaimPolicy: Delete
volumeBindingMode: Immediate
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: dynamic
  namespace: {NS}
spec:
  accessModes: [ReadOnlyMany]
  storageClassName: e2e-nfs
  resources:
    requests:
      storage: 256Mi
"#,
        e2e.ganesha.url(e2e.ganesha.exports()[0].clone())
    ));
    let pv = wait_for("the claim is bound", Duration::from_secs(60), || {
        let claim = cluster.kubectl_json(&["-n", NS, "get", "pvc", "dynamic"])?;
        (claim["status"]["phase"] == "Bound")
            .then(|| claim["spec"]["volumeName"].as_str().map(str::to_string))
            .flatten()
    });
    let volume = cluster.kubectl_json(&["get", "pv", &pv]).unwrap();
    assert_eq!(volume["spec"]["csi"]["driver"], DRIVER);
    // The controller's canonical volume context: the sub-path joined, defaults written out.
    assert_eq!(volume["spec"]["csi"]["volumeAttributes"]["subPath"], "data");
    // The reader stays, so that the volume stays staged for the preload's check below.
    let log = e2e.read_and_stay("dynamic-reader", &claim_volume("dynamic"));
    assert_eq!(
        parse_checksums(&log),
        e2e.datasets.checksums("data"),
        "dynamic-reader read other bytes:\n{log}"
    );

    // The class's preload ran when the volume was staged; its progress is in the metrics.
    let id = volume["spec"]["csi"]["volumeHandle"]
        .as_str()
        .unwrap()
        .to_string();
    let preload = wait_for("the preload is done", Duration::from_secs(60), || {
        let status = e2e.volume_status(&id);
        (status["preload"]["done"] == true).then(|| status["preload"].clone())
    });
    let nested = e2e
        .datasets
        .checksums("data")
        .keys()
        .filter(|p| p.starts_with("./nested/"))
        .count();
    assert_eq!(preload["files_total"], nested as u64, "{preload}");
    assert_eq!(preload["files_failed"], 0, "{preload}");
    let text = scrape_metrics();
    assert_eq!(metric(&text, "reservoir_volume_preload_done", &id), 1.0);
    let total = format!(
        "reservoir_volume_preload_files{{volume=\"{id}\",source=\"{}\",state=\"total\"}} {nested}",
        e2e.volume_status(&id)["source"].as_str().unwrap()
    );
    assert!(
        text.lines().any(|l| l == total),
        "no {total} in the metrics"
    );
    cluster.kubectl_ok(&["-n", NS, "delete", "pod", "dynamic-reader", "--wait=false"]);
}

fn static_volume(e2e: &E2e) {
    e2e.cluster.apply(&static_reservoir_volume(
        "static-data",
        "static",
        &e2e.nfs("data"),
        &[],
    ));
    e2e.assert_reads("static-reader", &claim_volume("static"), "data", "{}");
}

/// Bytes the NFS server has read from its files so far (`rchar` of its process).
fn server_read_bytes(e2e: &E2e) -> u64 {
    let pid = e2e.ganesha.pid().expect("ganesha runs");
    fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("rchar of the NFS server")
}

/// Waits for a warning event on `name` whose text contains every one of `needles`.
fn wait_event(e2e: &E2e, namespace: &str, name: &str, needles: &[&str]) -> String {
    wait_for(
        &format!("an event on {namespace}/{name} with {needles:?}"),
        POD_WAIT,
        || {
            e2e.cluster
                .events(namespace, name)
                .into_iter()
                .find(|e| needles.iter().all(|n| e.contains(n)))
        },
    )
}

/// `pvc://` sources. A claim bound to an in-tree `nfs` PersistentVolume of the test's server
/// (which kubelet never mounts: no pod uses that claim directly) is read through a static
/// volume and an inline one, with reservoir's NFS client: the pods read every byte, the server
/// served them, and the status names the claim. Then the refusals a user can meet, each with
/// its code and the claim named: a claim that does not exist (at CreateVolume, before any pod,
/// and at mount), one that is not bound, and an inline volume naming a claim of another
/// namespace.
fn claims(e2e: &E2e) {
    let cluster = &e2e.cluster;
    let export = e2e.ganesha.exports()[0].join("claimed");
    cluster.kubectl_ok(&["create", "namespace", "e2e-other"]);
    cluster.apply(&format!(
        r#"{claimed}---
{via_claim}---
# Never bound: no such class, no provisioner.
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: unbound
  namespace: {NS}
spec:
  accessModes: [ReadOnlyMany]
  storageClassName: e2e-no-such-class
  resources:
    requests:
      storage: 1Gi
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: theirs
  namespace: e2e-other
spec:
  accessModes: [ReadOnlyMany]
  storageClassName: e2e-no-such-class
  resources:
    requests:
      storage: 1Gi
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: e2e-missing-claim
provisioner: {DRIVER}
parameters:
  source: "pvc://${{pvc.metadata.namespace}}/no-such-claim"
  readOnly: "true"
volumeBindingMode: Immediate
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: from-missing
  namespace: {NS}
spec:
  accessModes: [ReadOnlyMany]
  storageClassName: e2e-missing-claim
  resources:
    requests:
      storage: 1Gi
"#,
        claimed = nfs_volume(
            "e2e-claimed-nfs",
            "claimed",
            &e2e.ganesha.host().to_string(),
            &export
        ),
        via_claim = static_reservoir_volume(
            "via-claim",
            "via-claim",
            &format!("pvc://{NS}/claimed"),
            &[]
        ),
    ));
    // The refused pods first: kubelet's retries run while the good ones read.
    let refused = [
        (
            "claim-missing",
            format!("pvc://{NS}/no-such-claim"),
            "NotFound",
            "no such PersistentVolumeClaim",
        ),
        (
            "claim-unbound",
            format!("pvc://{NS}/unbound"),
            "FailedPrecondition",
            "not bound to a volume (phase Pending)",
        ),
        (
            "claim-theirs",
            "pvc://e2e-other/theirs".to_string(),
            "PermissionDenied",
            "own pod's namespace (e2e)",
        ),
    ];
    for (pod_name, source, _, _) in &refused {
        cluster.apply(&pod(pod_name, &inline_claim(source), READ_ALL, "{}", false));
    }
    wait_for(
        "the NFS-backed claim is bound",
        Duration::from_secs(60),
        || {
            let claim = cluster.kubectl_json(&["-n", NS, "get", "pvc", "claimed"])?;
            (claim["status"]["phase"] == "Bound").then_some(())
        },
    );

    let expected = e2e.datasets.checksums("claimed");
    let size: u64 = ["big.bin", "nested/a.bin", "nested/deeper/b.bin"]
        .iter()
        .map(|f| {
            fs::metadata(e2e.datasets.export().join("claimed").join(f))
                .unwrap()
                .len()
        })
        .sum();
    let served_before = server_read_bytes(e2e);
    // The reader stays, so that the volume stays staged for the status below.
    let log = e2e.read_and_stay("claim-reader", &claim_volume("via-claim"));
    assert_eq!(
        parse_checksums(&log),
        expected,
        "claim-reader read other bytes:\n{log}"
    );
    let served = server_read_bytes(e2e) - served_before;
    assert!(
        served >= size,
        "the NFS server read {served} B of its files for a dataset of more than {size} B"
    );
    let status = e2e.volume_status("via-claim");
    let origin = status["origin"].as_str().unwrap_or_default();
    assert!(
        origin.contains(&format!(
            "pvc://{NS}/claimed -> PersistentVolume e2e-claimed-nfs (in-tree nfs)"
        )),
        "{status}"
    );
    assert_eq!(
        status["source"].as_str().unwrap(),
        e2e.ganesha.url(&export),
        "read from the claim's NFS share: {status}"
    );
    let fetched = status["bytes_fetched"].as_u64().unwrap();
    assert!(fetched >= size, "{status}");
    eprintln!(
        "e2e:   through pvc://{NS}/claimed: the server read {served} B, the daemon fetched \
         {fetched} B ({} files)",
        expected.len()
    );
    // No kernel NFS mount: the claim's volume is never mounted on the node.
    assert!(
        mounts().iter().all(|(_, _, fs)| !fs.starts_with("nfs")),
        "{:?}",
        mounts()
    );

    // Inline: a claim of the pod's own namespace (podInfoOnMount says which), with a path
    // inside the claim's volume.
    let log = e2e.run_reader(
        "claim-inline-reader",
        &inline_claim(&format!("pvc://{NS}/claimed/nested")),
        "{}",
    );
    let nested: BTreeMap<String, String> = expected
        .iter()
        .filter_map(|(path, hash)| {
            Some((
                format!("./{}", path.strip_prefix("./nested/")?),
                hash.clone(),
            ))
        })
        .collect();
    assert!(!nested.is_empty());
    assert_eq!(parse_checksums(&log), nested, "claim-inline-reader:\n{log}");

    for (pod_name, _, code, text) in &refused {
        let event = wait_event(e2e, NS, pod_name, &["FailedMount", code, text]);
        eprintln!("e2e:   {pod_name}: {event}");
        assert_eq!(cluster.pod_phase(NS, pod_name).as_deref(), Some("Pending"));
    }
    // CreateVolume checked the claim before any pod asked for the volume.
    let event = wait_event(
        e2e,
        NS,
        "from-missing",
        &[
            "ProvisioningFailed",
            "NotFound",
            &format!("claim {NS}/no-such-claim"),
        ],
    );
    eprintln!("e2e:   from-missing: {event}");
    let names: Vec<&str> = refused.iter().map(|(p, _, _, _)| *p).collect();
    let mut args = vec!["-n", NS, "delete", "pod", "claim-reader", "--wait=false"];
    args.extend(names);
    cluster.kubectl_ok(&args);
    cluster.kubectl_ok(&["-n", NS, "delete", "pvc", "from-missing", "--wait=false"]);
}

/// Where the node plugin keeps source pods' records and binds (the default under kubelet's
/// directory).
const SOURCE_PODS_DIR: &str = "/var/lib/kubelet/plugins/reservoir.csi.dev/sources";

/// The source pods in the test's namespace, as the API lists them.
fn source_pods_listed(cluster: &Cluster) -> Vec<serde_json::Value> {
    cluster
        .kubectl_json(&[
            "-n",
            NS,
            "get",
            "pods",
            "-l",
            "reservoir.csi.dev/role=source",
        ])
        .and_then(|l| l["items"].as_array().cloned())
        .unwrap_or_default()
}

/// The source pods in the test's namespace: `(name, uid, phase, node)`.
fn source_pod_list(cluster: &Cluster) -> Vec<(String, String, String, String)> {
    source_pods_listed(cluster)
        .iter()
        .map(|p| {
            let text = |pointer: &str| {
                p.pointer(pointer)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string()
            };
            (
                text("/metadata/name"),
                text("/metadata/uid"),
                text("/status/phase"),
                text("/spec/nodeName"),
            )
        })
        .collect()
}

/// Claims kubelet must mount, read through a source pod. A local PersistentVolume of this
/// node, whose claim waits for its first consumer (a `kubernetes.io/no-provisioner` class with
/// WaitForFirstConsumer): the source pod binds it, and a pod of a reservoir volume naming
/// `pvc://e2e/local-data` reads it byte for byte. The source pod, deleted behind the driver's
/// back, is made again while the volume goes on serving (a file written after that is read).
/// Unstaging leaves no source pod, bind or record. A local volume pinned to another node is
/// refused with FAILED_PRECONDITION before any pod is made.
fn source_pods(e2e: &E2e) {
    let cluster = &e2e.cluster;
    let local = e2e.datasets.dir.path().join("local");
    fs::create_dir_all(local.join("nested")).unwrap();
    write_random_file(&local.join("big.bin"), 3 << 20, 41);
    write_random_file(&local.join("nested/a.bin"), 200 << 10, 42);
    write_small_tree(&local.join("small"), 20, 1, 8192, 43);
    // Planted by whoever writes to the claim: a way out of it, which the node must refuse.
    std::os::unix::fs::symlink("/etc", local.join("escape")).unwrap();
    run_sh(&format!("chmod -R a+rX {}", local.display()));
    let local_pv = |name: &str, class: &str, node: &str| {
        format!(
            r#"apiVersion: v1
kind: PersistentVolume
metadata:
  name: {name}
spec:
  capacity:
    storage: 1Gi
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: "{class}"
  local:
    path: "{path}"
  nodeAffinity:
    required:
      nodeSelectorTerms:
        - matchExpressions:
            - key: kubernetes.io/hostname
              operator: In
              values: ["{node}"]
"#,
            path = local.display()
        )
    };
    cluster.apply(&format!(
        r#"{here}---
{there}---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: e2e-local
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: local-data
  namespace: {NS}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: e2e-local
  resources:
    requests:
      storage: 1Gi
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: elsewhere
  namespace: {NS}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: ""
  volumeName: e2e-local-elsewhere
  resources:
    requests:
      storage: 1Gi
---
{via_local}---
apiVersion: v1
kind: PersistentVolume
metadata:
  name: e2e-hostpath
spec:
  capacity:
    storage: 1Gi
  accessModes: [ReadOnlyMany]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  hostPath:
    path: "{path}"
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: host-path
  namespace: {NS}
spec:
  accessModes: [ReadOnlyMany]
  storageClassName: ""
  volumeName: e2e-hostpath
  resources:
    requests:
      storage: 1Gi
---
# What a node plugin that crashed between making a source pod and using it leaves: a pod and
# its record, for a volume the daemon does not serve.
apiVersion: v1
kind: Pod
metadata:
  name: reservoir-source-leftover
  namespace: {NS}
  labels:
    reservoir.csi.dev/role: source
spec:
  nodeName: {NODE_NAME}
  terminationGracePeriodSeconds: 1
  containers:
    - name: source
      image: {PAUSE_IMAGE}
---
# The node plugin may make source pods in this namespace (and no other).
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: reservoir-source-pods
  namespace: {NS}
subjects:
  - kind: ServiceAccount
    name: reservoir-node
    namespace: reservoir
roleRef:
  kind: ClusterRole
  name: reservoir-source-pods
  apiGroup: rbac.authorization.k8s.io
"#,
        here = local_pv("e2e-local", "e2e-local", NODE_NAME),
        there = local_pv("e2e-local-elsewhere", "", "e2e-no-such-node"),
        path = local.display(),
        via_local = static_reservoir_volume(
            "via-local",
            "via-local",
            &format!("pvc://{NS}/local-data"),
            &["metadataTTL: 1s"]
        ),
    ));
    let leftover_record = Path::new(SOURCE_PODS_DIR).join("reservoir-source-leftover.json");
    fs::create_dir_all(SOURCE_PODS_DIR).unwrap();
    fs::write(
        &leftover_record,
        format!(
            r#"{{"volume_id": "e2e-crashed", "namespace": "{NS}", "claim": "local-data",
                "pod": "reservoir-source-leftover", "read_only": true, "created": 0}}"#
        ),
    )
    .unwrap();
    let phase = |claim: &str| {
        cluster
            .kubectl_json(&["-n", NS, "get", "pvc", claim])
            .and_then(|c| c["status"]["phase"].as_str().map(str::to_string))
    };
    assert_eq!(
        phase("local-data").as_deref(),
        Some("Pending"),
        "waits for a first consumer"
    );
    // Refused: the volume belongs to another node (before any pod is made); a hostPath volume;
    // a path that leads out of the claim.
    let refused = [
        (
            "local-elsewhere",
            format!("pvc://{NS}/elsewhere"),
            "FailedPrecondition",
            "kubernetes.io/hostname In [e2e-no-such-node]",
        ),
        (
            "local-hostpath",
            format!("pvc://{NS}/host-path"),
            "FailedPrecondition",
            "is a hostPath volume",
        ),
        (
            "local-escape",
            format!("pvc://{NS}/local-data/escape"),
            "PermissionDenied",
            "leads out of the claim's volume",
        ),
    ];
    for (name, source, _, _) in &refused {
        cluster.apply(&pod(name, &inline_claim(source), READ_ALL, "{}", false));
    }
    // An NFS claim that only NFSv4 serves: the node falls back to a source pod, whose NFS
    // mount kubelet cannot make on these machines (their kernels have no NFS client), so the
    // pod stays ContainerCreating and the stage answers UNAVAILABLE naming it.
    let v4_only = Ganesha::start_v4_only(&local);
    cluster.apply(&nfs_volume(
        "e2e-v4-only",
        "v4-only",
        &v4_only.host().to_string(),
        &local,
    ));
    cluster.apply(&pod(
        "v4-only",
        &inline_claim(&format!("pvc://{NS}/v4-only")),
        READ_ALL,
        "{}",
        false,
    ));

    let expected = {
        let mut out = BTreeMap::new();
        for path in run_sh(&format!("cd {} && find . -type f", local.display())).lines() {
            out.insert(path.to_string(), sha256_file(&local.join(path)));
        }
        out
    };
    let log = e2e.read_and_stay("local-reader", &claim_volume("via-local"));
    assert_eq!(parse_checksums(&log), expected, "local-reader:\n{log}");
    assert_eq!(
        phase("local-data").as_deref(),
        Some("Bound"),
        "the source pod bound the claim"
    );
    let pods = source_pod_list(cluster);
    let (source_pod, first_uid, pod_phase, node) = pods
        .iter()
        .find(|p| p.0 == reservoir::csi::source_pods::pod_name(NODE_NAME, "via-local"))
        .cloned()
        .unwrap_or_else(|| panic!("no source pod for via-local: {pods:?}"));
    assert_eq!(
        (pod_phase.as_str(), node.as_str()),
        ("Running", NODE_NAME),
        "{pods:?}"
    );
    let status = e2e.volume_status("via-local");
    let origin = status["origin"].as_str().unwrap_or_default();
    assert!(
        origin.contains(&format!("pvc://{NS}/local-data -> PersistentVolume e2e-local (a local volume): mounted by kubelet for source pod {NS}/{source_pod}")),
        "{status}"
    );
    let binds = || {
        mounts()
            .into_iter()
            .filter(|(point, _, _)| point.starts_with(SOURCE_PODS_DIR))
            .count()
    };
    assert_eq!(binds(), 1, "{:?}", mounts());
    eprintln!("e2e:   {origin}");

    // Deleted behind the driver's back: made again, and the volume goes on reading.
    cluster.kubectl_ok(&["-n", NS, "delete", "pod", &source_pod, "--wait=true"]);
    let started = Instant::now();
    wait_for(
        "the source pod is made again",
        Duration::from_secs(60),
        || {
            source_pod_list(cluster)
                .into_iter()
                .find(|(name, uid, phase, _)| {
                    name == &source_pod && uid != &first_uid && phase == "Running"
                })
        },
    );
    eprintln!(
        "e2e:   source pod deleted: running again after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    fs::write(
        local.join("after.txt"),
        "written after the source pod came back\n",
    )
    .unwrap();
    run_sh(&format!("chmod a+r {}", local.join("after.txt").display()));
    let log = e2e.run_reader("local-reader-2", &claim_volume("via-local"), "{}");
    assert!(log.contains("./after.txt"), "the new file was read:\n{log}");
    let mut expected_now = expected.clone();
    expected_now.insert(
        "./after.txt".to_string(),
        sha256_file(&local.join("after.txt")),
    );
    assert_eq!(
        parse_checksums(&log),
        expected_now,
        "local-reader-2:\n{log}"
    );

    for (name, source, code, text) in &refused {
        let claim = source
            .trim_start_matches("pvc://")
            .trim_end_matches("/escape");
        let event = wait_event(
            e2e,
            NS,
            name,
            &["FailedMount", code, &format!("claim {claim}"), text],
        );
        eprintln!("e2e:   {name}: {event}");
    }

    // Inline, with a path inside the claim: a source pod of its own.
    let log = e2e.run_reader(
        "local-inline",
        &inline_claim(&format!("pvc://{NS}/local-data/nested")),
        "{}",
    );
    assert!(log.contains("./a.bin"), "{log}");
    assert_eq!(
        parse_checksums(&log).len(),
        1,
        "local-inline read the claim's nested/ only:\n{log}"
    );

    // The crash's leftovers are gone; the refused claims got no pod.
    wait_for(
        "the leftover source pod and its record are removed",
        Duration::from_secs(30),
        || {
            let pods = source_pod_list(cluster);
            (!leftover_record.exists()
                && pods
                    .iter()
                    .all(|(name, ..)| name != "reservoir-source-leftover"))
            .then_some(())
        },
    );
    let claims: Vec<String> = source_pods_listed(cluster)
        .iter()
        .map(|p| p["metadata"]["annotations"]["reservoir.csi.dev/claim"].to_string())
        .collect();
    assert!(
        claims
            .iter()
            .all(|c| c == &format!("\"{NS}/local-data\"") || c == &format!("\"{NS}/v4-only\"")),
        "source pods only for local-data and v4-only (the refused claims got none): {claims:?}"
    );
    let event = wait_event(
        e2e,
        NS,
        "v4-only",
        &[
            "FailedMount",
            "Unavailable",
            &format!("claim {NS}/v4-only: source pod {NS}/reservoir-source-"),
            "is not running yet",
        ],
    );
    eprintln!("e2e:   v4-only: {event}");

    // Unstaged: no source pod, bind or record is left.
    cluster.kubectl_ok(&[
        "-n",
        NS,
        "delete",
        "pod",
        "local-reader",
        "local-reader-2",
        "local-inline",
        "local-elsewhere",
        "local-hostpath",
        "local-escape",
        "v4-only",
        "--wait=true",
    ]);
    // The v4-only claim's pod never ran, so no stage completed and no unstage comes: the
    // reconciler removes it once its record is 2 minutes old.
    wait_for(
        "the source pods are deleted",
        Duration::from_secs(150),
        || source_pod_list(cluster).is_empty().then_some(()),
    );
    drop(v4_only);
    assert_eq!(binds(), 0, "{:?}", mounts());
    let records: Vec<_> = fs::read_dir(SOURCE_PODS_DIR)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(records.is_empty(), "{records:?}");
}

/// The node's locality label of the volume whose PersistentVolume is `pv`.
fn locality_label(cluster: &Cluster, pv: &str) -> Option<String> {
    cluster
        .kubectl_json(&["get", "node", NODE_NAME])?
        .pointer("/metadata/labels")?
        .get(format!("cache.reservoir.csi.dev/{pv}"))?
        .as_str()
        .map(str::to_string)
}

/// Locality labels. A volume preloaded as a whole: the node's label for it reads 100, and
/// stays once the volume is unstaged (its data is still cached). Staged again with a cache
/// quota below its size, a new file evicts older ones: the label drops. A pod with the
/// preferred node affinity docs/kubernetes.md gives is accepted and scheduled.
fn locality(e2e: &E2e) {
    let cluster = &e2e.cluster;
    let dir = e2e.datasets.export().join("locality");
    fs::create_dir_all(&dir).unwrap();
    for (i, name) in ["a.bin", "b.bin", "c.bin", "d.bin"].iter().enumerate() {
        write_random_file(&dir.join(name), 24 << 20, 50 + i as u64);
    }
    run_sh(&format!("chmod -R a+rX {}", dir.display()));
    let volume = |extra: &str| {
        static_reservoir_volume("e2e-locality", "locality", &e2e.nfs("locality"), &[extra])
    };
    cluster.apply(&volume("preload: /"));
    cluster.apply(&pod(
        "locality-preload",
        &claim_volume("locality"),
        "sleep 3600",
        "{}",
        false,
    ));
    let started = Instant::now();
    wait_for(
        "the locality label reads 100",
        Duration::from_secs(120),
        || (locality_label(cluster, "e2e-locality")? == "100").then_some(()),
    );
    eprintln!(
        "e2e:   label cache.reservoir.csi.dev/e2e-locality=100 {:.1} s after the pod was made",
        started.elapsed().as_secs_f64()
    );
    cluster.kubectl_ok(&["-n", NS, "delete", "pod", "locality-preload", "--wait=true"]);
    wait_for("the volume is unstaged", Duration::from_secs(60), || {
        let status = e2e.status();
        let volumes = status["volumes"].as_array()?;
        volumes
            .iter()
            .all(|v| v["volume_id"] != "e2e-locality")
            .then_some(())
    });
    // A refresh round later the label is still there: the data still is.
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(
        locality_label(cluster, "e2e-locality").as_deref(),
        Some("100")
    );

    // The same volume with a quota below its size: a new file evicts older ones.
    cluster.kubectl_ok(&["-n", NS, "delete", "pvc", "locality", "--wait=true"]);
    cluster.kubectl_ok(&["delete", "pv", "e2e-locality", "--wait=true"]);
    write_random_file(&dir.join("e.bin"), 16 << 20, 60);
    run_sh(&format!("chmod a+r {}", dir.join("e.bin").display()));
    cluster.apply(&volume("cacheSize: 64Mi"));
    cluster.apply(&pod(
        "locality-evict",
        &claim_volume("locality"),
        // Opened often enough to outrank the preloaded files (each open counts).
        "for i in 1 2 3 4 5 6; do cat /data/e.bin > /dev/null; done; echo READ-DONE; sleep 3600",
        "{}",
        false,
    ));
    let value = wait_for("the locality label drops", Duration::from_secs(120), || {
        let value: u64 = locality_label(cluster, "e2e-locality")?.parse().ok()?;
        (value < 100).then_some(value)
    });
    assert!(
        (1..=70).contains(&value),
        "64 MiB of 96 MiB at most: {value}"
    );
    eprintln!("e2e:   after eviction: cache.reservoir.csi.dev/e2e-locality={value}");

    // The documented affinity (docs/kubernetes.md), accepted and scheduled.
    let docs = fs::read_to_string(cluster.repo.join("docs/kubernetes.md")).unwrap();
    let snippet = docs
        .split("```yaml\n# locality-affinity\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("docs/kubernetes.md has the locality affinity snippet");
    let affinity: String = snippet
        .replace("YOUR-VOLUME", "e2e-locality")
        .lines()
        .map(|l| format!("  {l}\n"))
        .collect();
    cluster.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: locality-preferring
  namespace: {NS}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
{affinity}  containers:
    - name: main
      image: {BUSYBOX_IMAGE}
      command: ["true"]
"#
    ));
    let phase = cluster.wait_pod_done(NS, "locality-preferring", POD_WAIT);
    assert_eq!(phase, "Succeeded");
    let spec = cluster
        .kubectl_json(&["-n", NS, "get", "pod", "locality-preferring"])
        .unwrap();
    let preferred = &spec["spec"]["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"];
    assert!(
        preferred
            .to_string()
            .contains("cache.reservoir.csi.dev/e2e-locality"),
        "{spec}"
    );
    cluster.kubectl_ok(&[
        "-n",
        NS,
        "delete",
        "pod",
        "locality-evict",
        "locality-preferring",
        "--wait=false",
    ]);
}

fn inline(e2e: &E2e) {
    e2e.assert_reads(
        "inline-reader",
        &inline_volume(&e2e.nfs("data")),
        "data",
        "{}",
    );

    let cluster = &e2e.cluster;
    cluster.apply(&pod(
        "inline-refused",
        &inline_volume(&e2e.nfs("other")),
        READ_ALL,
        "{}",
        false,
    ));
    let event = wait_for("the refused pod gets an event", POD_WAIT, || {
        cluster
            .events(NS, "inline-refused")
            .into_iter()
            .find(|e| e.starts_with("FailedMount") && e.contains("--allowed-sources"))
    });
    assert!(event.contains("PermissionDenied"), "{event}");
    assert_eq!(
        cluster.pod_phase(NS, "inline-refused").as_deref(),
        Some("Pending")
    );
    let uid = e2e.pod_uid("inline-refused");
    let left: Vec<_> = mounts()
        .into_iter()
        .filter(|(point, _, _)| point.contains(&uid))
        .collect();
    assert!(
        left.iter().all(|(_, _, fs)| fs != "fuse.reservoir"),
        "{left:?}"
    );
    eprintln!("e2e:   the refused pod's event: {event}");
    cluster.kubectl_ok(&["-n", NS, "delete", "pod", "inline-refused", "--wait=false"]);
}

fn shared(e2e: &E2e) {
    let cluster = &e2e.cluster;
    cluster.apply(&static_reservoir_volume(
        "shared-data",
        "shared",
        &e2e.nfs("shared"),
        &["metadataTTL: forever"],
    ));
    let expected = e2e.datasets.checksums("shared");
    // The first pod reads everything (from the source) and stays.
    e2e.read_and_stay("shared-a", &claim_volume("shared"));
    assert_eq!(
        parse_checksums(&cluster.container_log(NS, "shared-a", "main")),
        expected
    );
    let before = e2e.volume_status("shared-data");
    let fetched = before["bytes_fetched"].as_u64().unwrap();
    assert!(
        fetched > 0,
        "the first epoch came from the source: {before}"
    );

    // The second pod, while the first still has the volume: the same session, the cache.
    let log = e2e.run_reader("shared-b", &claim_volume("shared"), "{}");
    assert_eq!(parse_checksums(&log), expected, "shared-b read other bytes");
    let status = e2e.status();
    let sessions: Vec<_> = status["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["volume_id"] == "shared-data")
        .collect();
    assert_eq!(
        sessions.len(),
        1,
        "one FUSE session for the volume: {status}"
    );
    let staging = sessions[0]["target_path"].as_str().unwrap().to_string();
    let all = mounts();
    let staged: Vec<_> = all.iter().filter(|(p, _, _)| *p == staging).collect();
    assert_eq!(staged.len(), 1, "{staged:?}");
    assert_eq!(staged[0].2, "fuse.reservoir");
    let uid_a = e2e.pod_uid("shared-a");
    let target_a: Vec<_> = all
        .iter()
        .filter(|(p, _, _)| p.contains(&uid_a) && p.ends_with("/shared-data/mount"))
        .collect();
    assert_eq!(target_a.len(), 1, "{all:?}");
    assert_eq!(
        target_a[0].1, staged[0].1,
        "the pod's mount is the staged session"
    );

    let after = e2e.volume_status("shared-data");
    assert_eq!(
        after["bytes_fetched"].as_u64().unwrap(),
        fetched,
        "the second epoch fetched nothing from the source: {after}"
    );
    let served = |v: &serde_json::Value| {
        v["bytes_from_cache"].as_u64().unwrap() + v["passthrough_bytes"].as_u64().unwrap()
    };
    assert!(
        served(&after) > served(&before),
        "the second epoch was served from the cache: {before} -> {after}"
    );
    eprintln!(
        "e2e:   second epoch: {} B fetched (as before), cache {} B, passthrough {} B, hit ratio {}",
        after["bytes_fetched"],
        after["bytes_from_cache"],
        after["passthrough_bytes"],
        after["hit_ratio"]
    );

    // The metrics endpoint the manifests expose tells the same story as `reservoir status`.
    let text = scrape_metrics();
    let status = e2e.volume_status("shared-data");
    for (name, field) in [
        ("reservoir_volume_fetched_bytes_total", "bytes_fetched"),
        (
            "reservoir_volume_cache_read_bytes_total",
            "bytes_from_cache",
        ),
        (
            "reservoir_volume_passthrough_bytes_total",
            "passthrough_bytes",
        ),
        (
            "reservoir_volume_passthrough_opens_total",
            "passthrough_opens",
        ),
        (
            "reservoir_volume_source_read_bytes_total",
            "bytes_from_source",
        ),
        ("reservoir_volume_source_errors_total", "source_errors"),
        ("reservoir_volume_opens_total", "opens"),
    ] {
        assert_eq!(
            metric(&text, name, "shared-data"),
            status[field].as_u64().unwrap() as f64,
            "{name} against status {field}"
        );
    }
    assert_eq!(
        metric(&text, "reservoir_volume_hit_ratio", "shared-data"),
        status["hit_ratio"].as_f64().unwrap()
    );
    assert_eq!(
        metric(&text, "reservoir_volume_cache_used_bytes", "shared-data"),
        status["cache"]["owner"]["used"].as_u64().unwrap() as f64
    );
    assert!(
        text.lines().any(|l| l
            .starts_with("reservoir_source_request_duration_seconds_count{source=\"nfs://")
            && l.contains("op=\"read\"")),
        "source read latencies are exported"
    );
    cluster.kubectl_ok(&[
        "-n",
        NS,
        "delete",
        "pod",
        "shared-a",
        "shared-b",
        "--wait=false",
    ]);
}

fn non_root_and_read_only(e2e: &E2e) {
    let security = "{runAsUser: 1000, runAsGroup: 1000}";
    e2e.assert_reads("non-root-reader", &claim_volume("static"), "data", security);
    let log = e2e.cluster.container_log(NS, "non-root-reader", "main");
    assert!(!log.contains("Permission denied"), "{log}");

    let script = "id -u; touch /data/new-file; echo touch=$?; \
                  echo x > /data/big.bin; echo overwrite=$?";
    // The pod asks for a writable mount of a claim it does not mark read-only: the volume
    // (readOnly: "true", ReadOnlyMany) is what refuses.
    e2e.cluster.apply(&pod(
        "writer",
        &writable_claim_volume("static"),
        script,
        "{}",
        true,
    ));
    e2e.cluster.wait_pod_done(NS, "writer", POD_WAIT);
    let log = e2e.cluster.container_log(NS, "writer", "main");
    assert!(
        log.contains("touch=1") && log.contains("overwrite=1"),
        "{log}"
    );
    assert!(log.contains("Read-only file system"), "{log}");
    assert!(
        !e2e.datasets.export().join("data/new-file").exists(),
        "nothing reached the dataset"
    );
}

/// Starts a pod that reads the static volume's files over and over for `seconds`, comparing
/// every pass with the first, and keeps the first file open from start to end (read through
/// that same descriptor at the end); returns once the first pass is done.
fn start_steady_reader(e2e: &E2e, name: &str, seconds: u32) {
    let script = format!(
        "cd /data; find . -type f | sort | xargs sha256sum > /tmp/first || exit 1; \
         set -- $(head -1 /tmp/first); want=$1; exec 3< \"$2\"; \
         end=$(( $(date +%s) + {seconds} )); n=0; \
         while [ $(date +%s) -lt $end ]; do \
           n=$((n+1)); find . -type f | sort | xargs sha256sum > /tmp/now 2>&1; \
           if [ \"$(cat /tmp/first)\" = \"$(cat /tmp/now)\" ]; then echo pass-$n-ok; \
           else echo pass-$n-FAILED; cat /tmp/now; fi; \
         done; \
         set -- $(sha256sum <&3); \
         if [ \"$1\" = \"$want\" ]; then echo held-ok; else echo held-FAILED $1; fi; \
         echo READS-END"
    );
    let cluster = &e2e.cluster;
    cluster.apply(&pod(name, &claim_volume("static"), &script, "{}", false));
    wait_for("the steady reader is reading", POD_WAIT, || {
        cluster
            .container_log(NS, name, "main")
            .contains("pass-1-ok")
            .then_some(())
    });
}

/// Waits for a steady reader to end and checks that it never noticed `what`: every pass read
/// the same bytes, and so did the descriptor it kept open.
fn check_steady_reader(e2e: &E2e, name: &str, what: &str) {
    let cluster = &e2e.cluster;
    let phase = cluster.wait_pod_done(NS, name, POD_WAIT);
    let log = cluster.container_log(NS, name, "main");
    assert_eq!(phase, "Succeeded", "{log}");
    assert!(log.contains("READS-END"), "{log}");
    assert!(
        !log.contains("FAILED"),
        "a read failed across {what}:\n{log}"
    );
    assert!(log.contains("held-ok"), "{log}");
    let passes = log.lines().filter(|l| l.ends_with("-ok")).count() - 1;
    assert!(passes >= 3, "{log}");
    eprintln!("e2e:   {passes} passes and a held descriptor, all identical, across {what}");
    cluster.kubectl_ok(&["-n", NS, "delete", "pod", name, "--wait=false"]);
}

impl E2e {
    fn restarts(&self, pod: &str, container: &str) -> u64 {
        self.cluster
            .kubectl_json(&["-n", "reservoir", "get", "pod", pod])
            .and_then(|p| {
                p["status"]["containerStatuses"]
                    .as_array()?
                    .iter()
                    .find(|c| c["name"] == container)?["restartCount"]
                    .as_u64()
            })
            .unwrap()
    }

    fn kill_container(&self, pod: &str, container: &str) {
        let id = self
            .cluster
            .container_id("reservoir", pod, container)
            .unwrap_or_else(|| panic!("the {container} container's id"));
        common::k8s::run(
            "ctr",
            &[
                "--address",
                &self.cluster.containerd_socket(),
                "-n",
                "k8s.io",
                "tasks",
                "kill",
                "-s",
                "SIGKILL",
                &id,
            ],
        );
    }

    /// Recoveries of every volume the daemon serves, together; asserts on the way that the
    /// keeper holds every volume and that no volume was lost.
    fn recoveries_all_kept(&self) -> u64 {
        let status = self.status();
        assert!(status["keeper_pid"].is_u64(), "no keeper answers: {status}");
        assert!(
            status["lost"].as_array().is_none_or(|l| l.is_empty()),
            "volumes were lost: {status}"
        );
        let volumes = status["volumes"].as_array().unwrap();
        assert!(!volumes.is_empty(), "{status}");
        for v in volumes {
            assert_eq!(v["recovery"]["kept"], true, "not kept: {v}");
        }
        volumes
            .iter()
            .map(|v| v["recovery"]["recoveries"].as_u64().unwrap_or(0))
            .sum()
    }

    /// Waits until the daemon answers again with the keeper holding every volume, and returns
    /// the volumes' recoveries together.
    fn wait_all_kept(&self) -> u64 {
        wait_for("the daemon answers, every volume kept", POD_WAIT, || {
            let status = self.try_status().ok()?;
            (status["keeper_pid"].is_u64()
                && status["volumes"]
                    .as_array()?
                    .iter()
                    .all(|v| v["recovery"]["kept"] == true))
            .then_some(())
        });
        self.recoveries_all_kept()
    }

    /// kill -9 of the daemon container; returns, once kubelet restarted it and its daemon
    /// holds every volume again, the node pod and the volumes' recoveries together.
    fn kill_daemon_and_wait(&self) -> (String, u64) {
        let node = self.node_pod();
        let before = self.restarts(&node, "daemon");
        self.kill_container(&node, "daemon");
        wait_for("kubelet restarts the daemon container", POD_WAIT, || {
            (self.restarts(&node, "daemon") > before).then_some(())
        });
        (node, self.wait_all_kept())
    }

    /// The keeper's pod: its name and uid.
    fn keeper_pod(&self) -> (String, String) {
        self.keeper_pod_if_any().expect("the keeper's pod")
    }

    fn keeper_pod_if_any(&self) -> Option<(String, String)> {
        let pods = driver_pods(&self.cluster, "reservoir-keeper");
        let pod = pods.first()?;
        Some((
            pod["metadata"]["name"].as_str()?.to_string(),
            pod["metadata"]["uid"].as_str()?.to_string(),
        ))
    }
}

fn node_restart(e2e: &E2e) {
    start_steady_reader(e2e, "steady", 40);
    let node = e2e.node_pod();
    let (node_before, daemon_before) = (e2e.restarts(&node, "node"), e2e.restarts(&node, "daemon"));
    e2e.kill_container(&node, "node");
    wait_for("kubelet restarts the node container", POD_WAIT, || {
        (e2e.restarts(&node, "node") > node_before).then_some(())
    });
    e2e.cluster.wait_pod_ready("reservoir", &node, POD_WAIT);
    check_steady_reader(e2e, "steady", "the node container's restart");
    assert_eq!(
        e2e.restarts(&node, "daemon"),
        daemon_before,
        "the daemon was left alone"
    );
}

/// kill -9 of the daemon container (as an OOM kill or a crash would end it) while a pod reads.
fn daemon_killed(e2e: &E2e) {
    start_steady_reader(e2e, "steady-daemon", 30);
    let recoveries = e2e.wait_all_kept();
    let (node, after) = e2e.kill_daemon_and_wait();
    // Scraped while the reader still holds the volume (kubelet unstages it once the pod ends).
    let metrics = scrape_metrics();
    check_steady_reader(e2e, "steady-daemon", "a kill -9 of the daemon");
    assert!(
        after > recoveries,
        "no recovery counted ({recoveries} -> {after})"
    );
    let log = e2e.cluster.container_log("reservoir", &node, "daemon");
    assert!(log.contains("took the volume over"), "{log}");
    let counted: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("reservoir_volume_recoveries_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert_eq!(
        counted as u64, after,
        "recoveries in the metrics:\n{metrics}"
    );
    assert!(
        metrics.lines().any(|l| l == "reservoir_keeper_up 1"),
        "{metrics}"
    );
    assert!(
        metrics.lines().any(|l| l == "reservoir_lost_volumes 0"),
        "{metrics}"
    );
}

/// An upgrade as docs/operations.md describes it: the node plugin's DaemonSet rolls (here
/// with `kubectl rollout restart`, which changes the pod template as a new image does), so
/// its pod and both its containers are replaced while a pod reads. The keeper is left alone.
fn daemon_set_rolled(e2e: &E2e) {
    let keeper = e2e.keeper_pod();
    let old = e2e.node_pod();
    start_steady_reader(e2e, "steady-upgrade", 30);
    let recoveries = e2e.wait_all_kept();
    e2e.cluster.kubectl_ok(&[
        "-n",
        "reservoir",
        "rollout",
        "restart",
        "daemonset/reservoir-node",
    ]);
    let new = wait_for("a new node plugin pod", POD_WAIT, || {
        match driver_pods(&e2e.cluster, "reservoir-node").as_slice() {
            [only] if only["metadata"]["name"] != old.as_str() => {
                only["metadata"]["name"].as_str().map(str::to_string)
            }
            _ => None,
        }
    });
    e2e.cluster.wait_pod_ready("reservoir", &new, POD_WAIT);
    let after = e2e.wait_all_kept();
    check_steady_reader(e2e, "steady-upgrade", "the node plugin's rolling update");
    assert!(
        after > recoveries,
        "no recovery counted ({recoveries} -> {after})"
    );
    let log = e2e.cluster.container_log("reservoir", &new, "daemon");
    assert!(log.contains("took the volume over"), "{log}");
    assert_eq!(e2e.keeper_pod(), keeper, "the keeper was left alone");
}

/// The keeper's pod replaced (as an admin does to update it), and then the daemon killed: the
/// daemon gave every connection to the new keeper, so the kill is survived as before.
fn keeper_replaced(e2e: &E2e) {
    let (keeper, _) = e2e.keeper_pod();
    start_steady_reader(e2e, "steady-keeper", 30);
    let recoveries = e2e.wait_all_kept();
    e2e.cluster
        .kubectl_ok(&["-n", "reservoir", "delete", "pod", &keeper, "--wait=true"]);
    let (new_keeper, _) = wait_for("a new keeper pod runs", POD_WAIT, || {
        let (name, uid) = e2e.keeper_pod_if_any()?;
        (name != keeper && e2e.cluster.pod_phase("reservoir", &name).as_deref() == Some("Running"))
            .then_some((name, uid))
    });
    // Every connection is deposited with the new keeper: only now is a kill survivable.
    assert_eq!(
        e2e.wait_all_kept(),
        recoveries,
        "the keeper's restart is no recovery"
    );
    let (_, after) = e2e.kill_daemon_and_wait();
    check_steady_reader(
        e2e,
        "steady-keeper",
        "a new keeper, then a kill -9 of the daemon",
    );
    assert!(
        after > recoveries,
        "no recovery counted ({recoveries} -> {after})"
    );
    eprintln!("e2e:   keeper {keeper} replaced by {new_keeper}");
}

fn pods_deleted(e2e: &E2e) {
    let cluster = &e2e.cluster;
    let node = e2e.node_pod();
    cluster.kubectl_ok(&["-n", NS, "delete", "pods", "--all", "--wait=false"]);
    wait_for("every test pod is gone", Duration::from_secs(120), || {
        cluster
            .kubectl_json(&["-n", NS, "get", "pods"])
            .and_then(|l| l["items"].as_array().map(|a| a.is_empty()))
            .unwrap_or(false)
            .then_some(())
    });
    wait_for(
        "no fuse.reservoir mount is left",
        Duration::from_secs(60),
        || {
            mounts()
                .iter()
                .all(|(_, _, fs)| fs != "fuse.reservoir")
                .then_some(())
        },
    );
    let status = e2e.status();
    assert_eq!(status["volumes"].as_array().unwrap().len(), 0, "{status}");
    let log = cluster.container_log("reservoir", &node, "node");
    for call in ["NodeUnpublishVolume", "NodeUnstageVolume"] {
        assert!(log.contains(call), "kubelet never called {call}:\n{log}");
    }
    // The containers' footprints after every scenario (for the manifests' memory limits).
    for container in ["daemon", "node"] {
        let Some(pid) = cluster
            .container_id("reservoir", &node, container)
            .and_then(|id| cluster.container_pid(&id))
        else {
            continue;
        };
        let proc_status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        for line in proc_status.lines() {
            if line.starts_with("VmHWM") || line.starts_with("VmRSS") {
                eprintln!(
                    "e2e:   {container} container: {}",
                    line.split_whitespace().collect::<Vec<_>>().join(" ")
                );
            }
        }
    }
    // Released dynamic volumes: the stand-in deletes them as the external-provisioner would.
    cluster.kubectl_ok(&["-n", NS, "delete", "pvc", "--all", "--wait=false"]);
    let provisioner = e2e.provisioner.as_ref().unwrap();
    wait_for(
        "the dynamic volume is deleted",
        Duration::from_secs(60),
        || {
            provisioner
                .journal()
                .iter()
                .any(|l| l.starts_with("deleted volume"))
                .then_some(())
        },
    );
}

//! A real single-node Kubernetes for the end-to-end test: etcd, kube-apiserver (a static token),
//! kube-controller-manager, kube-scheduler, kube-proxy, containerd and kubelet, started as
//! processes of this test and stopped by their process ids.
//!
//! The Kubernetes binaries come from `e2e/k8s/build.sh` (v1.20.2 built from Debian's source
//! package with the kubelet `:authority` backport, cached per machine); etcd, containerd, runc,
//! the CNI plugins, busybox and catatonit from Debian. Images are made locally
//! (`scripts/oci-image.py`) and imported into this cluster's own containerd: nothing is pulled.
//!
//! What these machines need, and where it is done: runc cannot set `oom_score_adj`
//! (`restrict_oom_score_adj`, e2e/cluster/containerd.toml); `/` is a private mount, so
//! `/var/lib/kubelet` is bound onto itself and made rshared for Bidirectional propagation
//! (undone at the end); cgroup v1 without systemd (cgroupfs, e2e/cluster/kubelet.yaml); 1.20's
//! API server has no insecure port (a random token in a static token file).
//!
//! Everything lives under `/var/lib/reservoir-e2e/run-PID` and a bridge of its own, with
//! addresses from 100.64.213.0/24 (pods, the node) and 100.64.214.0/24 (services), in the
//! shared address space no real network on these machines uses. Dropping the [`Cluster`]
//! deletes what the tests created, stops every process it started (and the container shims of
//! its containerd), removes kube-proxy's and kubelet's iptables chains, unmounts everything
//! under kubelet's directory, and removes the directories, network namespaces and cgroups the
//! cluster created, also when the test panicked. One cluster per machine at a time (a lock).

#![allow(dead_code)]

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::csi::{process_alive, stop_process};

pub const NODE_NAME: &str = "reservoir-e2e";
pub const NODE_IP: &str = "100.64.213.1";
pub const POD_SUBNET: &str = "100.64.213.0/24";
pub const SERVICE_RANGE: &str = "100.64.214.0/24";
/// The `kubernetes` Service's address (the first of SERVICE_RANGE).
pub const API_SERVICE_IP: &str = "100.64.214.1";
const BRIDGE: &str = "rsve2e0";
const API_PORT: u16 = 16443;
const ETCD_CLIENT: &str = "http://127.0.0.1:23790";
const ETCD_PEER: &str = "http://127.0.0.1:23800";
const KUBELET_DIR: &str = "/var/lib/kubelet";
const LOCK_FILE: &str = "/run/lock/reservoir-e2e.lock";
pub const BUSYBOX_IMAGE: &str = "reservoir-e2e.local/busybox:1";
pub const PAUSE_IMAGE: &str = "reservoir-e2e.local/pause:1";

/// Paths that components create on first use outside the run's directory (kubelet's, the CNI
/// plugins' cache, containerd shims' sockets, the controller-manager's flex-volume probe):
/// removed at the end when they did not exist before.
const TRACES: &[&str] = &[
    KUBELET_DIR,
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/cni",
    "/run/containerd",
    "/usr/libexec/kubernetes",
];

/// The cgroup v1 hierarchies kubelet makes its `kubepods` tree in.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

pub struct Cluster {
    pub work: PathBuf,
    /// The Kubernetes binaries (kubelet, kube-apiserver, ..., kubectl).
    pub bin: PathBuf,
    pub repo: PathBuf,
    processes: Vec<(&'static str, Child)>,
    new_traces: Vec<PathBuf>,
    kubelet_bound: bool,
    bridge: bool,
    netns_before: BTreeSet<String>,
    iptables_before: Vec<(&'static str, &'static str, HashSet<String>)>,
    cgroups_before: bool,
    _lock: fs::File,
}

/// Runs a command, panicking with its output when it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Polls `check` every 250 ms until it gives a value; panics after `limit` naming `what`.
pub fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn template(repo: &Path, name: &str, values: &[(&str, &str)]) -> String {
    let path = repo.join("e2e/cluster").join(name);
    let mut text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for (key, value) in values {
        text = text.replace(key, value);
    }
    assert!(!text.contains("@"), "{name}: a placeholder is left: {text}");
    text
}

fn write(path: &Path, text: &str) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

fn mount_points() -> Vec<String> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .collect()
}

fn netns_names() -> BTreeSet<String> {
    fs::read_dir("/run/netns")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn chains(tool: &str, table: &str) -> HashSet<String> {
    Command::new(tool)
        .args(["-t", table, "-S"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.strip_prefix("-N ").map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

impl Cluster {
    /// Starts the cluster and waits until its node is Ready. `bin`: the Kubernetes binaries;
    /// `repo`: the repository (for e2e/cluster/ and scripts/oci-image.py).
    pub fn start(bin: &Path, repo: &Path) -> Cluster {
        // SAFETY: geteuid has no preconditions and cannot fail.
        assert_eq!(unsafe { libc::geteuid() }, 0, "the e2e cluster needs root");
        for binary in [
            "kubelet",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kube-proxy",
            "kubectl",
        ] {
            assert!(
                bin.join(binary).is_file(),
                "{} is missing: run e2e/k8s/build.sh (make e2e does)",
                bin.join(binary).display()
            );
        }
        fs::create_dir_all("/run/lock").unwrap();
        let lock = fs::File::create(LOCK_FILE).unwrap();
        // SAFETY: flock on a descriptor we own; blocks until another e2e run is done.
        assert_eq!(
            unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) },
            0,
            "lock {LOCK_FILE}"
        );
        let work = PathBuf::from(format!("/var/lib/reservoir-e2e/run-{}", std::process::id()));
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(&work).unwrap();
        let mut cluster = Cluster {
            work,
            bin: bin.to_path_buf(),
            repo: repo.to_path_buf(),
            processes: Vec::new(),
            new_traces: TRACES
                .iter()
                .map(PathBuf::from)
                .filter(|p| !p.exists())
                .collect(),
            kubelet_bound: false,
            bridge: false,
            netns_before: netns_names(),
            iptables_before: Vec::new(),
            cgroups_before: Path::new(CGROUP_ROOT).join("memory/kubepods").exists(),
            _lock: lock,
        };
        for tool in ["iptables", "ip6tables"] {
            for table in ["filter", "nat", "mangle"] {
                cluster
                    .iptables_before
                    .push((tool, table, chains(tool, table)));
            }
        }
        cluster.boot();
        cluster
    }

    fn path(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }

    fn spawn(&mut self, name: &'static str, program: &Path, args: &[String]) {
        let log = fs::File::create(self.path(&format!("logs/{name}.log"))).unwrap();
        let child = Command::new(program)
            .args(args)
            .current_dir(&self.work)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({}): {e}", program.display()));
        self.processes.push((name, child));
    }

    fn pki(&self) {
        let pki = self.path("pki");
        fs::create_dir_all(&pki).unwrap();
        let p = |name: &str| pki.join(name).to_str().unwrap().to_string();
        let openssl = |args: &[&str]| {
            run("openssl", args);
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &p("ca.key"),
            "-out",
            &p("ca.crt"),
            "-days",
            "2",
            "-subj",
            "/CN=reservoir-e2e-ca",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &p("apiserver.key"),
            "-out",
            &p("apiserver.csr"),
            "-subj",
            "/CN=kube-apiserver",
        ]);
        write(
            &pki.join("san.ext"),
            &format!(
                "subjectAltName=IP:{NODE_IP},IP:{API_SERVICE_IP},IP:127.0.0.1,DNS:kubernetes,\
                 DNS:kubernetes.default,DNS:kubernetes.default.svc,\
                 DNS:kubernetes.default.svc.cluster.local\n"
            ),
        );
        openssl(&[
            "x509",
            "-req",
            "-in",
            &p("apiserver.csr"),
            "-CA",
            &p("ca.crt"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-out",
            &p("apiserver.crt"),
            "-days",
            "2",
            "-extfile",
            &p("san.ext"),
        ]);
        openssl(&["genrsa", "-out", &p("sa.key"), "2048"]);
        openssl(&["rsa", "-in", &p("sa.key"), "-pubout", "-out", &p("sa.pub")]);
        let mut token = [0u8; 16];
        fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut token))
            .unwrap();
        let token: String = token.iter().map(|b| format!("{b:02x}")).collect();
        // Every component uses the one admin token: a test cluster, not a secure one.
        write(
            &pki.join("tokens.csv"),
            &format!("{token},admin,admin,system:masters\n"),
        );
        fs::set_permissions(pki.join("tokens.csv"), fs::Permissions::from_mode(0o600)).unwrap();
        write(
            &self.path("kubeconfig"),
            &format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    \
                 server: https://{NODE_IP}:{API_PORT}\n    certificate-authority: {}\n\
                 users:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: e2e\n  \
                 context: {{cluster: e2e, user: admin}}\ncurrent-context: e2e\n",
                p("ca.crt")
            ),
        );
    }

    fn boot(&mut self) {
        for dir in [
            "logs",
            "etcd",
            "cni/conf",
            "cni/ipam",
            "containerd",
            "kubelet-pki",
            "flex",
        ] {
            fs::create_dir_all(self.path(dir)).unwrap();
        }
        self.pki();
        let work = self.work.to_str().unwrap().to_string();
        run("ip", &["link", "add", BRIDGE, "type", "bridge"]);
        self.bridge = true;
        run(
            "ip",
            &["addr", "add", &format!("{NODE_IP}/24"), "dev", BRIDGE],
        );
        run("ip", &["link", "set", BRIDGE, "up"]);
        let values = [
            ("@WORK@", work.as_str()),
            ("@BRIDGE@", BRIDGE),
            ("@POD_SUBNET@", POD_SUBNET),
            ("@NODE_IP@", NODE_IP),
            ("@NODE_NAME@", NODE_NAME),
            ("@KUBELET_PORT@", "10250"),
        ];
        for (name, to) in [
            ("containerd.toml", "containerd.toml"),
            ("cni.conflist", "cni/conf/10-reservoir-e2e.conflist"),
            ("kubelet.yaml", "kubelet.yaml"),
            ("kube-proxy.yaml", "kube-proxy.yaml"),
        ] {
            write(&self.path(to), &template(&self.repo, name, &values));
        }

        let s = |x: &str| x.to_string();
        self.spawn(
            "etcd",
            Path::new("etcd"),
            &[
                s("--name=e2e"),
                format!("--data-dir={work}/etcd"),
                format!("--listen-client-urls={ETCD_CLIENT}"),
                format!("--advertise-client-urls={ETCD_CLIENT}"),
                format!("--listen-peer-urls={ETCD_PEER}"),
                format!("--initial-advertise-peer-urls={ETCD_PEER}"),
                format!("--initial-cluster=e2e={ETCD_PEER}"),
            ],
        );
        self.spawn(
            "containerd",
            Path::new("containerd"),
            &[format!("--config={work}/containerd.toml")],
        );
        let bin = self.bin.clone();
        self.spawn(
            "kube-apiserver",
            &bin.join("kube-apiserver"),
            &[
                format!("--etcd-servers={ETCD_CLIENT}"),
                format!("--bind-address={NODE_IP}"),
                format!("--advertise-address={NODE_IP}"),
                format!("--secure-port={API_PORT}"),
                s("--insecure-port=0"),
                s("--tls-cert-file=pki/apiserver.crt"),
                s("--tls-private-key-file=pki/apiserver.key"),
                s("--client-ca-file=pki/ca.crt"),
                s("--token-auth-file=pki/tokens.csv"),
                s("--authorization-mode=Node,RBAC"),
                s("--allow-privileged=true"),
                format!("--service-cluster-ip-range={SERVICE_RANGE}"),
                s("--service-account-key-file=pki/sa.pub"),
                s("--service-account-signing-key-file=pki/sa.key"),
                s("--service-account-issuer=https://kubernetes.default.svc.cluster.local"),
            ],
        );
        wait_for(
            "the API server answers /readyz",
            Duration::from_secs(90),
            || {
                self.kubectl(&["get", "--raw", "/readyz"])
                    .status
                    .success()
                    .then_some(())
            },
        );
        self.spawn(
            "kube-controller-manager",
            &bin.join("kube-controller-manager"),
            &[
                s("--kubeconfig=kubeconfig"),
                s("--service-account-private-key-file=pki/sa.key"),
                s("--root-ca-file=pki/ca.crt"),
                s("--leader-elect=false"),
                s("--port=0"),
                s("--secure-port=0"),
                format!("--cluster-cidr={POD_SUBNET}"),
                format!("--flex-volume-plugin-dir={work}/flex"),
            ],
        );
        self.spawn(
            "kube-scheduler",
            &bin.join("kube-scheduler"),
            &[
                s("--kubeconfig=kubeconfig"),
                s("--leader-elect=false"),
                s("--port=0"),
                s("--secure-port=0"),
            ],
        );
        // kubelet's directory must propagate mounts both ways (Bidirectional volumes).
        fs::create_dir_all(KUBELET_DIR).unwrap();
        run("mount", &["--bind", KUBELET_DIR, KUBELET_DIR]);
        self.kubelet_bound = true;
        run("mount", &["--make-rshared", KUBELET_DIR]);
        self.spawn(
            "kubelet",
            &bin.join("kubelet"),
            &[
                s("--config=kubelet.yaml"),
                s("--kubeconfig=kubeconfig"),
                s("--container-runtime=remote"),
                format!("--container-runtime-endpoint=unix://{work}/containerd/containerd.sock"),
                format!("--hostname-override={NODE_NAME}"),
                format!("--node-ip={NODE_IP}"),
                format!("--cert-dir={work}/kubelet-pki"),
                format!("--volume-plugin-dir={work}/flex"),
            ],
        );
        self.spawn(
            "kube-proxy",
            &bin.join("kube-proxy"),
            &[s("--config=kube-proxy.yaml")],
        );
        self.import_base_images();
        wait_for("the node is Ready", Duration::from_secs(120), || {
            let node = self.kubectl_json(&["get", "node", NODE_NAME])?;
            node["status"]["conditions"]
                .as_array()?
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
                .then_some(())
        });
        wait_for(
            "the default service account exists",
            Duration::from_secs(60),
            || {
                self.kubectl_json(&["-n", "default", "get", "serviceaccount", "default"])
                    .map(|_| ())
            },
        );
        self.check_processes();
    }

    /// Panics naming any cluster process that exited.
    pub fn check_processes(&mut self) {
        for (name, child) in &mut self.processes {
            if let Ok(Some(status)) = child.try_wait() {
                let log = fs::read_to_string(self.work.join(format!("logs/{name}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                panic!(
                    "{name} exited ({status}):\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
    }

    /// Images made here: a pause image from catatonit (the sandbox image) and busybox.
    fn import_base_images(&self) {
        let images = self.path("images");
        let pause = images.join("pause");
        fs::create_dir_all(&pause).unwrap();
        fs::copy("/usr/bin/catatonit", pause.join("catatonit")).expect("catatonit (Debian)");
        self.make_image(&pause, PAUSE_IMAGE, "/catatonit", &["-P"]);
        let busybox = images.join("busybox");
        fs::create_dir_all(busybox.join("bin")).unwrap();
        fs::create_dir_all(busybox.join("tmp")).unwrap();
        fs::set_permissions(busybox.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
        fs::copy("/bin/busybox", busybox.join("bin/busybox")).expect("busybox (busybox-static)");
        for applet in [
            "sh",
            "cat",
            "sleep",
            "sha256sum",
            "ls",
            "wget",
            "id",
            "touch",
            "echo",
            "find",
            "sort",
            "xargs",
            "stat",
            "head",
            "wc",
            "grep",
            "dd",
            "date",
            "test",
            "[",
            "true",
        ] {
            std::os::unix::fs::symlink("busybox", busybox.join("bin").join(applet)).unwrap();
        }
        self.make_image(&busybox, BUSYBOX_IMAGE, "/bin/sh", &[]);
    }

    fn make_image(&self, rootfs: &Path, reference: &str, entrypoint: &str, cmd: &[&str]) {
        let archive = rootfs.with_extension("oci.tar");
        let mut args = vec![
            self.repo
                .join("scripts/oci-image.py")
                .to_str()
                .unwrap()
                .to_string(),
            rootfs.to_str().unwrap().to_string(),
            archive.to_str().unwrap().to_string(),
            format!("--ref={reference}"),
            format!("--entrypoint={entrypoint}"),
        ];
        args.extend(cmd.iter().map(|c| format!("--cmd={c}")));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run("python3", &args);
        self.import_image(&archive);
    }

    /// Imports an OCI archive into this cluster's containerd (namespace k8s.io).
    pub fn import_image(&self, archive: &Path) {
        wait_for("containerd answers", Duration::from_secs(30), || {
            Command::new("ctr")
                .args(["--address", &self.containerd_socket(), "version"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|_| ())
        });
        run(
            "ctr",
            &[
                "--address",
                &self.containerd_socket(),
                "-n",
                "k8s.io",
                "images",
                "import",
                archive.to_str().unwrap(),
            ],
        );
    }

    pub fn containerd_socket(&self) -> String {
        format!("{}/containerd/containerd.sock", self.work.display())
    }

    /// A kubectl for this cluster that other threads may keep.
    pub fn api(&self) -> Kubectl {
        Kubectl {
            program: self.bin.join("kubectl"),
            kubeconfig: self.path("kubeconfig"),
        }
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.api().run(args, None)
    }

    /// kubectl that must succeed; its standard output.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        self.api().ok(args)
    }

    /// `kubectl get ... -o json`; `None` when kubectl fails (e.g. the object does not exist).
    pub fn kubectl_json(&self, args: &[&str]) -> Option<serde_json::Value> {
        self.api().json(args)
    }

    /// `kubectl apply -f -` of `yaml` (or JSON).
    pub fn apply(&self, yaml: &str) {
        self.api().apply(yaml)
    }

    /// A pod's phase, `None` while it does not exist.
    pub fn pod_phase(&self, namespace: &str, pod: &str) -> Option<String> {
        let pod = self.kubectl_json(&["-n", namespace, "get", "pod", pod])?;
        pod["status"]["phase"].as_str().map(str::to_string)
    }

    /// Waits until a pod has ended (Succeeded or Failed); returns the phase.
    pub fn wait_pod_done(&self, namespace: &str, pod: &str, limit: Duration) -> String {
        wait_for(&format!("pod {namespace}/{pod} ends"), limit, || {
            self.pod_phase(namespace, pod)
                .filter(|p| p == "Succeeded" || p == "Failed")
        })
    }

    /// Waits until every container of a pod is ready.
    pub fn wait_pod_ready(&self, namespace: &str, pod: &str, limit: Duration) {
        wait_for(&format!("pod {namespace}/{pod} is ready"), limit, || {
            let pod = self.kubectl_json(&["-n", namespace, "get", "pod", pod])?;
            pod["status"]["conditions"]
                .as_array()?
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
                .then_some(())
        })
    }

    /// The lines a container wrote (stdout and stderr), across its restarts, read from kubelet's
    /// log files (`kubectl logs` would need the API server to reach kubelet by the node's name).
    pub fn container_log(&self, namespace: &str, pod: &str, container: &str) -> String {
        let Some(uid) = self
            .kubectl_json(&["-n", namespace, "get", "pod", pod])
            .and_then(|p| p["metadata"]["uid"].as_str().map(str::to_string))
        else {
            return String::new();
        };
        let dir = PathBuf::from(format!("/var/log/pods/{namespace}_{pod}_{uid}/{container}"));
        let mut files: Vec<(u32, PathBuf)> = fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        let restart = name.strip_suffix(".log")?.parse().ok()?;
                        Some((restart, e.path()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        let mut out = String::new();
        for (_, file) in files {
            for line in fs::read_to_string(&file).unwrap_or_default().lines() {
                // CRI log lines: TIMESTAMP STREAM F|P TEXT (P: a partial line continues).
                let mut parts = line.splitn(4, ' ');
                let (Some(_), Some(_), Some(tag)) = (parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                out.push_str(parts.next().unwrap_or_default());
                if tag == "F" {
                    out.push('\n');
                }
            }
        }
        out
    }

    /// Events whose object is `name` in `namespace`, as "Reason: message" lines.
    pub fn events(&self, namespace: &str, name: &str) -> Vec<String> {
        self.kubectl_json(&["-n", namespace, "get", "events"])
            .and_then(|list| {
                Some(
                    list["items"]
                        .as_array()?
                        .iter()
                        .filter(|e| e["involvedObject"]["name"] == name)
                        .map(|e| {
                            format!(
                                "{}: {}",
                                e["reason"].as_str().unwrap_or_default(),
                                e["message"].as_str().unwrap_or_default()
                            )
                        })
                        .collect(),
                )
            })
            .unwrap_or_default()
    }

    /// A container's id in containerd (without the `containerd://` prefix).
    pub fn container_id(&self, namespace: &str, pod: &str, container: &str) -> Option<String> {
        let pod = self.kubectl_json(&["-n", namespace, "get", "pod", pod])?;
        pod["status"]["containerStatuses"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == container)?["containerID"]
            .as_str()?
            .strip_prefix("containerd://")
            .map(str::to_string)
    }

    /// The host pid of a container's main process (from containerd's task list).
    pub fn container_pid(&self, id: &str) -> Option<u32> {
        let output = Command::new("ctr")
            .args([
                "--address",
                &self.containerd_socket(),
                "-n",
                "k8s.io",
                "tasks",
                "ls",
            ])
            .output()
            .ok()?;
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .find_map(|line| {
                let mut fields = line.split_whitespace();
                (fields.next()? == id).then(|| fields.next()?.parse().ok())?
            })
    }

    /// What to print when a test fails: the cluster's view and the components' last words.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for args in [
            &["get", "pods", "-A", "-o", "wide"][..],
            &["get", "events", "-A"][..],
            &["get", "pv,pvc", "-A"][..],
        ] {
            let o = self.kubectl(args);
            out.push_str(&format!(
                "--- kubectl {}\n{}{}\n",
                args.join(" "),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        for (name, _) in &self.processes {
            let log =
                fs::read_to_string(self.work.join(format!("logs/{name}.log"))).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let from = lines.len().saturating_sub(15);
            out.push_str(&format!(
                "--- {name} (last lines)\n{}\n",
                lines[from..].join("\n")
            ));
        }
        out
    }

    fn stop(&mut self, name: &str) {
        if let Some(index) = self.processes.iter().position(|(n, _)| *n == name) {
            let (_, mut child) = self.processes.remove(index);
            if matches!(child.try_wait(), Ok(None)) {
                stop_process(child.id());
            }
            let _ = child.wait();
        }
    }

    /// Deletes what tests and the driver left in the API (so kubelet unmounts their volumes
    /// while the driver still runs), then stops everything.
    fn teardown(&mut self) {
        let started = Instant::now();
        let apiserver_up = self.processes.iter().any(|(n, _)| *n == "kube-apiserver");
        if apiserver_up {
            let namespaces: Vec<String> = self
                .kubectl_json(&["get", "namespaces"])
                .and_then(|l| {
                    Some(
                        l["items"]
                            .as_array()?
                            .iter()
                            .filter_map(|n| n["metadata"]["name"].as_str().map(str::to_string))
                            .filter(|n| !n.starts_with("kube-") && n != "default")
                            .collect(),
                    )
                })
                .unwrap_or_default();
            // Tests' namespaces first, the driver's last: kubelet needs the driver to unpublish.
            let (driver, tests): (Vec<String>, Vec<String>) =
                namespaces.into_iter().partition(|n| n == "reservoir");
            for group in [tests, driver] {
                for namespace in &group {
                    let _ = self.kubectl(&["delete", "namespace", namespace, "--wait=false"]);
                }
                let _ = self.kubectl(&["-n", "default", "delete", "pods", "--all", "--wait=false"]);
                let deadline = Instant::now() + Duration::from_secs(60);
                while Instant::now() < deadline
                    && group.iter().any(|n| {
                        self.kubectl_json(&["-n", n, "get", "pods"])
                            .and_then(|l| l["items"].as_array().map(|a| !a.is_empty()))
                            .unwrap_or(false)
                    })
                {
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
            let _ = self.kubectl(&["delete", "pv", "--all", "--wait=false"]);
        }
        eprintln!(
            "e2e: teardown: the API's objects deleted ({:.1} s)",
            started.elapsed().as_secs_f64()
        );
        for name in [
            "kube-proxy",
            "kube-scheduler",
            "kube-controller-manager",
            "kubelet",
        ] {
            self.stop(name);
        }
        // Containers kubelet did not get to stop, and the shims of this containerd.
        let socket = self.containerd_socket();
        if let Ok(output) = Command::new("ctr")
            .args(["--address", &socket, "-n", "k8s.io", "tasks", "ls", "-q"])
            .output()
        {
            for id in String::from_utf8_lossy(&output.stdout).lines() {
                let _ = Command::new("ctr")
                    .args([
                        "--address",
                        &socket,
                        "-n",
                        "k8s.io",
                        "tasks",
                        "kill",
                        "-s",
                        "SIGKILL",
                        id,
                    ])
                    .output();
            }
        }
        let shims = shims_of(&self.path("containerd/state"));
        self.stop("containerd");
        for pid in shims {
            stop_process(pid);
        }
        for name in ["kube-apiserver", "etcd"] {
            self.stop(name);
        }
        for (name, mut child) in std::mem::take(&mut self.processes) {
            eprintln!("e2e: stopping {name}");
            stop_process(child.id());
            let _ = child.wait();
        }
        // kube-proxy's rules, then any chain the components made that was not there before.
        let _ = Command::new(self.bin.join("kube-proxy"))
            .arg("--cleanup")
            .output();
        for (tool, table, before) in &self.iptables_before {
            remove_new_chains(tool, table, before);
        }
        // Mounts: everything under kubelet's directory and the run's (pods' volumes, FUSE
        // sessions of a daemon that did not get to unmount, container root file systems),
        // deepest first, then the bind of kubelet's directory itself.
        for root in [KUBELET_DIR.to_string(), self.work.display().to_string()] {
            let mut under: Vec<String> = mount_points()
                .into_iter()
                .filter(|m| m.starts_with(&format!("{root}/")))
                .collect();
            under.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for point in under {
                let _ = Command::new("umount").arg(&point).output();
                if mount_points().contains(&point) {
                    let _ = Command::new("umount").args(["-l", &point]).output();
                }
            }
        }
        if self.kubelet_bound {
            while mount_points().iter().any(|m| m == KUBELET_DIR) {
                if !Command::new("umount")
                    .arg(KUBELET_DIR)
                    .status()
                    .is_ok_and(|s| s.success())
                {
                    let _ = Command::new("umount").args(["-l", KUBELET_DIR]).status();
                    break;
                }
            }
        }
        for name in netns_names().difference(&self.netns_before) {
            if name.starts_with("cni-") {
                let _ = Command::new("ip").args(["netns", "delete", name]).output();
            }
        }
        if self.bridge {
            let _ = Command::new("ip").args(["link", "del", BRIDGE]).output();
        }
        if !self.cgroups_before {
            remove_kubepods_cgroups();
        }
        for trace in &self.new_traces {
            let _ = fs::remove_dir_all(trace);
        }
        let _ = fs::remove_dir_all(&self.work);
        let _ = fs::remove_dir("/var/lib/reservoir-e2e");
        eprintln!(
            "e2e: teardown: done ({:.1} s)",
            started.elapsed().as_secs_f64()
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
        self.teardown();
    }
}

/// kubectl (1.20, from the same build) with the cluster's admin credentials.
#[derive(Clone, Debug)]
pub struct Kubectl {
    program: PathBuf,
    kubeconfig: PathBuf,
}

impl Kubectl {
    pub fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut command = Command::new(&self.program);
        command
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("run kubectl");
        if let Some(text) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
        }
        child.wait_with_output().expect("kubectl output")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args, None);
        assert!(
            output.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> Option<serde_json::Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let output = self.run(&all, None);
        if !output.status.success() {
            return None;
        }
        serde_json::from_slice(&output.stdout).ok()
    }

    pub fn apply(&self, yaml: &str) {
        let output = self.run(&["apply", "-f", "-"], Some(yaml));
        assert!(
            output.status.success(),
            "kubectl apply: {}\n{yaml}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Container shims of the containerd whose state directory is `state` (they outlive
/// containerd), from the pid files it keeps per task: scanning every process's command line
/// could hang on an unrelated process stuck in the kernel.
fn shims_of(state: &Path) -> Vec<u32> {
    let tasks = state.join("io.containerd.runtime.v2.task/k8s.io");
    fs::read_dir(tasks)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|task| fs::read_to_string(task.path().join("shim.pid")).ok())
        .filter_map(|pid| pid.trim().parse().ok())
        .filter(|&pid| process_alive(pid))
        .collect()
}

/// Removes the chains of `table` that kube-proxy, kubelet (KUBE-*) or the bridge plugin's
/// masquerading (CNI-*) made and that were not there before, and every rule that jumps to them.
fn remove_new_chains(tool: &str, table: &str, before: &HashSet<String>) {
    let new: Vec<String> = chains(tool, table)
        .into_iter()
        .filter(|c| (c.starts_with("KUBE-") || c.starts_with("CNI-")) && !before.contains(c))
        .collect();
    if new.is_empty() {
        return;
    }
    let rules = Command::new(tool)
        .args(["-t", table, "-S"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for rule in rules.lines() {
        let Some(spec) = rule.strip_prefix("-A ") else {
            continue;
        };
        if new
            .iter()
            .any(|c| spec.ends_with(&format!("-j {c}")) || spec.contains(&format!("-j {c} ")))
        {
            // iptables -S quotes arguments with spaces; a shell splits them back.
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!("{tool} -t {table} -D {spec}"))
                .output();
        }
    }
    for chain in &new {
        let _ = Command::new(tool).args(["-t", table, "-F", chain]).output();
    }
    for chain in &new {
        let _ = Command::new(tool).args(["-t", table, "-X", chain]).output();
    }
}

fn remove_kubepods_cgroups() {
    for controller in fs::read_dir(CGROUP_ROOT).into_iter().flatten().flatten() {
        let root = controller.path().join("kubepods");
        if !root.is_dir() {
            continue;
        }
        let mut dirs = Vec::new();
        let mut stack = vec![root];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(entry.path());
                }
            }
            dirs.push(dir);
        }
        for dir in dirs.iter().rev() {
            let _ = fs::remove_dir(dir);
        }
    }
}

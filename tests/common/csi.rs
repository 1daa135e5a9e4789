//! Runs `reservoir csi` / `reservoir node` / `reservoir controller` as tests' CSI plugins and
//! talks to them the way kubelet and the sidecars do: gRPC over the unix socket.
//!
//! A [`Plugin`] owns a temporary directory (socket, state, cache, daemon socket, logs, staging
//! and target paths). Dropping it kills the plugin process, stops the cache daemon the node
//! service started (found through the daemon's socket) and detaches every mount under the
//! directory, also when the test panics.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use reservoir::csi::proto::controller_client::ControllerClient;
use reservoir::csi::proto::identity_client::IdentityClient;
use reservoir::csi::proto::node_client::NodeClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status};

use super::mount::{bin, clean_up_under, signal};

/// A running CSI process of the real binary, with its own directory.
pub struct Plugin {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub daemon_socket: PathBuf,
    /// `csi`, `node` or `controller` and its arguments (without the per-test paths).
    args: Vec<String>,
    /// Daemons seen through the daemon socket: stopped on drop.
    daemons: Vec<u32>,
}

impl Plugin {
    /// `reservoir csi` (all three services) with a daemon it starts itself.
    pub fn csi(extra: &[&str]) -> Plugin {
        Plugin::start("csi", extra)
    }

    /// `reservoir node` (Identity + Node) with a daemon it starts itself.
    pub fn node(extra: &[&str]) -> Plugin {
        Plugin::start("node", extra)
    }

    /// `reservoir controller` (Identity + Controller).
    pub fn controller(extra: &[&str]) -> Plugin {
        Plugin::start("controller", extra)
    }

    fn start(command: &str, extra: &[&str]) -> Plugin {
        let dir = tempfile::Builder::new()
            .prefix("rsv-csi-")
            .tempdir()
            .expect("temporary directory");
        // Pods run as other users: they must be able to reach target paths inside.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.path().join("csi.sock");
        let daemon_socket = dir.path().join("daemon.sock");
        let mut args: Vec<String> = vec![command.to_string()];
        if command != "controller" {
            args.extend(
                [
                    "--node-id",
                    "node-1",
                    "--daemon-socket",
                    daemon_socket.to_str().unwrap(),
                    "--cache-dir",
                    dir.path().join("cache").to_str().unwrap(),
                    "--cache-size",
                    "256Mi",
                    "--daemon-log",
                    dir.path().join("daemon.log").to_str().unwrap(),
                ]
                .map(String::from),
            );
        }
        if command != "node" {
            args.extend([
                "--state-dir".to_string(),
                dir.path().join("state").display().to_string(),
            ]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut plugin = Plugin {
            child: None,
            dir,
            socket,
            daemon_socket,
            args,
            daemons: Vec::new(),
        };
        plugin.spawn();
        plugin
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn log(&self) -> PathBuf {
        self.path("plugin.log")
    }

    pub fn log_text(&self) -> String {
        let plugin = std::fs::read_to_string(self.log()).unwrap_or_default();
        let daemon = std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default();
        format!("--- plugin ---\n{plugin}\n--- daemon ---\n{daemon}")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the process and waits until it serves (and its daemon answers, for nodes).
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .unwrap();
        let child = Command::new(bin())
            .args(&self.args[..1])
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket.display()))
            .args(&self.args[1..])
            .env("RUST_LOG", "info,reservoir=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start reservoir");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                break;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "reservoir exited during start ({status}):\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "did not listen:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.remember_daemon();
    }

    /// Records the pid of the daemon answering on the daemon socket (to stop it on drop).
    pub fn remember_daemon(&mut self) -> Option<u32> {
        let pid = daemon_pid(&self.daemon_socket)?;
        if !self.daemons.contains(&pid) {
            self.daemons.push(pid);
        }
        Some(pid)
    }

    /// SIGKILL, as a crash: the socket file stays behind.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("reservoir ignored SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub async fn channel(&self) -> Channel {
        unix_channel(&self.socket).await
    }

    pub async fn node_client(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel().await)
    }

    pub async fn identity_client(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel().await)
    }

    pub async fn controller_client(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel().await)
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.remember_daemon();
        for pid in std::mem::take(&mut self.daemons) {
            stop_process(pid);
        }
        clean_up_under(self.dir.path());
        if std::thread::panicking() {
            eprintln!("{}", self.log_text());
        }
    }
}

/// A gRPC channel over the unix socket at `path` (with a valid `:authority`, as kubelet 1.26+).
pub async fn unix_channel(path: &Path) -> Channel {
    let path = path.to_path_buf();
    Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .expect("connect to the plugin socket")
}

/// SIGTERM, a wait of up to 20 s, then SIGKILL.
pub fn stop_process(pid: u32) {
    signal(pid, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(20);
    while process_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if process_alive(pid) {
        signal(pid, libc::SIGKILL);
    }
}

/// Whether `pid` runs (a zombie counts as gone).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The pid of the daemon answering on `socket`, asked with a plain status request.
pub fn daemon_pid(socket: &Path) -> Option<u32> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    stream.write_all(b"{\"op\":\"status\"}\n").ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    let value: serde_json::Value = serde_json::from_str(&line).ok()?;
    value.get("pid")?.as_u64().map(|p| p as u32)
}

/// The mountinfo entries (mount point, per-mount options, major:minor, fs type) at `path`.
pub fn mount_entry(path: &Path) -> Option<(String, String, String)> {
    let wanted = path.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .rev()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            if fields.get(4) != Some(&wanted.as_str()) {
                return None;
            }
            let separator = fields.iter().position(|f| *f == "-")?;
            Some((
                fields[5].to_string(),
                fields[2].to_string(),
                fields.get(separator + 1)?.to_string(),
            ))
        })
}

/// Mount points at or under `root`.
pub fn mounts_under(root: &Path) -> Vec<String> {
    let prefix = root.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|p| *p == prefix || p.starts_with(&format!("{prefix}/")))
        .map(String::from)
        .collect()
}

/// Asserts that a call failed with `code` and a message that mentions every needle.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, needles: &[&str]) {
    match result {
        Ok(value) => panic!("expected {code:?}, got Ok({value:?})"),
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            for needle in needles {
                assert!(
                    status.message().contains(needle),
                    "{:?} does not mention {needle:?}",
                    status.message()
                );
            }
        }
    }
}

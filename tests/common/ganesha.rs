//! A real NFS server for tests: nfs-ganesha, each instance in its own network namespace.
//!
//! Every [`Ganesha`] gets a network namespace `rsvt-<pid>-<n>` joined to the host namespace by a
//! veth pair with a private /30 from 198.18.0.0/15 (the RFC 2544 benchmarking range): the server
//! listens on the namespace side (`host()`), the test connects from the host side. Inside the
//! namespace, rpcbind and ganesha run in a private mount namespace with their own tmpfs `/run` and
//! `/var/lib/nfs/ganesha`, so parallel servers never share a portmapper, a port or state, and a
//! test can stop, pause or restart its own server. Dropping the guard kills every process it
//! started and deletes the namespace (which removes the veth pair), also when the test panicked;
//! the first server of a test binary sweeps namespaces left behind by test processes that died.
//!
//! Needs root, `ip`, `unshare`, `rpcbind` and `ganesha.nfsd` (Debian: nfs-ganesha,
//! nfs-ganesha-vfs, rpcbind, iproute2).

#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once};
use std::thread::sleep;
use std::time::{Duration, Instant};

pub const NFS_PORT: u16 = 2049;
pub const MOUNT_PORT: u16 = 20048;
const PORTMAPPER_PORT: u16 = 111;

const NETNS_PREFIX: &str = "rsvt-";
/// 198.18.0.0/15 holds 32768 /30 networks.
const SUBNETS: u32 = 1 << 15;
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Serialises address allocation between parallel tests of other test binaries.
const LOCK_FILE: &str = "/tmp/reservoir-test-netns.lock";

static COUNTER: AtomicU32 = AtomicU32::new(0);
static ALLOCATION: Mutex<()> = Mutex::new(());
static SWEEP: Once = Once::new();

/// A running (or stopped) nfs-ganesha serving NFSv3 and v4 in its own network namespace.
pub struct Ganesha {
    netns: String,
    host_if: String,
    server: Ipv4Addr,
    exports: Vec<PathBuf>,
    /// Configuration, log, pid file and v4 recovery state.
    state: tempfile::TempDir,
    /// The shell that starts rpcbind and ganesha, waits for them and reaps them; leader of their
    /// process group.
    child: Option<Child>,
    paused: bool,
    /// Exports are `Access_Type = RO` (see [`Ganesha::start_read_only`]).
    read_only: bool,
    /// NFSv4 only, without a portmapper (see [`Ganesha::start_v4_only`]).
    v4_only: bool,
}

impl Ganesha {
    /// Starts a server exporting `export_dir` (read-write, no root squash, AUTH_SYS) under its
    /// own path, on NFS port 2049 and MOUNT port 20048, registered with its own portmapper.
    pub fn start(export_dir: &Path) -> Ganesha {
        Ganesha::start_exports(&[export_dir])
    }

    /// Starts a server exporting `export_dir` read-only (`Access_Type = RO`, no root squash).
    pub fn start_read_only(export_dir: &Path) -> Ganesha {
        Ganesha::start_with(&[export_dir], true)
    }

    /// Starts a server with several exports (which may be nested).
    pub fn start_exports(export_dirs: &[&Path]) -> Ganesha {
        Ganesha::start_with(export_dirs, false)
    }

    /// Starts a server that speaks NFSv4 only (`Protocols = 4`), with no portmapper: what an
    /// NFSv3 client finds on a v4-only filer.
    pub fn start_v4_only(export_dir: &Path) -> Ganesha {
        let mut server = Ganesha::prepare(&[export_dir], true);
        server.v4_only = true;
        server.write_config();
        server.spawn();
        server
    }

    fn start_with(export_dirs: &[&Path], read_only: bool) -> Ganesha {
        let mut server = Ganesha::prepare(export_dirs, read_only);
        server.write_config();
        server.spawn();
        server
    }

    /// The server's network and state directory, not yet configured or started.
    fn prepare(export_dirs: &[&Path], read_only: bool) -> Ganesha {
        preflight();
        SWEEP.call_once(sweep_leftovers);
        let exports: Vec<PathBuf> = export_dirs
            .iter()
            .map(|dir| {
                fs::canonicalize(dir)
                    .unwrap_or_else(|e| panic!("export directory {}: {e}", dir.display()))
            })
            .collect();
        let state = tempfile::Builder::new()
            .prefix("ganesha-")
            .tempdir()
            .expect("temporary directory for ganesha");
        fs::create_dir(state.path().join("recovery")).expect("recovery directory");

        let netns = format!(
            "{NETNS_PREFIX}{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut server = Ganesha {
            netns,
            host_if: String::new(),
            server: Ipv4Addr::UNSPECIFIED,
            exports,
            state,
            child: None,
            paused: false,
            read_only,
            v4_only: false,
        };
        server.create_network();
        server
    }

    /// The server's address, reachable from the host network namespace.
    pub fn host(&self) -> IpAddr {
        IpAddr::V4(self.server)
    }

    /// `nfs://HOST/PATH`: ports through the portmapper.
    pub fn url(&self, path: impl AsRef<Path>) -> String {
        format!("nfs://{}{}", self.server, url_path(path.as_ref()))
    }

    /// `nfs://HOST/PATH?nfsport=2049&mountport=20048`: no portmapper needed.
    pub fn url_with_ports(&self, path: impl AsRef<Path>) -> String {
        format!(
            "nfs://{}{}?nfsport={NFS_PORT}&mountport={MOUNT_PORT}",
            self.server,
            url_path(path.as_ref())
        )
    }

    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The exported directories (canonical paths, which are also the NFSv3 export paths).
    pub fn exports(&self) -> &[PathBuf] {
        &self.exports
    }

    /// The pid of `ganesha.nfsd`, when running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref()?;
        fs::read_to_string(self.state.path().join("ganesha.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The last lines of the server's log and output.
    pub fn log_tail(&self) -> String {
        let mut text = String::new();
        for name in ["ganesha.log", "output.log"] {
            let content = fs::read_to_string(self.state.path().join(name)).unwrap_or_default();
            let lines: Vec<&str> = content.lines().collect();
            let from = lines.len().saturating_sub(30);
            text.push_str(&format!(
                "--- {name} (last lines)\n{}\n",
                lines[from..].join("\n")
            ));
        }
        text
    }

    /// Stops the server (SIGTERM, then SIGKILL after a while) and its portmapper. The namespace
    /// and address stay: clients get "connection refused".
    pub fn stop(&mut self) {
        self.stop_within(STOP_TIMEOUT);
    }

    /// Starts the server again, on the same namespace and address.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Freezes ganesha (SIGSTOP) and waits until every thread is stopped: connections stay open
    /// at the TCP level, calls get no answer.
    pub fn pause(&mut self) {
        let pid = self.pid().expect("pause: ganesha is not running");
        signal_process(pid as libc::pid_t, libc::SIGSTOP);
        self.paused = true;
        // A stop signal is acted upon by the thread that dequeues it; until then, the other
        // threads keep serving. Wait until they are all stopped.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !all_threads_stopped(pid) {
            assert!(
                Instant::now() < deadline,
                "ganesha {pid} did not stop on SIGSTOP"
            );
            sleep(Duration::from_millis(2));
        }
    }

    pub fn resume(&mut self) {
        if let Some(pid) = self.pid() {
            signal_process(pid as libc::pid_t, libc::SIGCONT);
            self.paused = false;
        }
    }

    /// SIGTERM to the supervising shell, which passes it on to ganesha and rpcbind and reaps
    /// them. If that takes longer than `patience`, SIGKILL to ganesha and rpcbind (the shell still
    /// reaps them), then to the whole group.
    fn stop_within(&mut self, patience: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let shell = child.id() as libc::pid_t;
        if self.paused {
            signal_group(shell, libc::SIGCONT);
            self.paused = false;
        }
        signal_process(shell, libc::SIGTERM);
        if !wait_child(&mut child, patience) {
            for pid in namespace_pids(&self.netns) {
                if pid != shell {
                    signal_process(pid, libc::SIGKILL);
                }
            }
            if !wait_child(&mut child, Duration::from_secs(2)) {
                signal_group(shell, libc::SIGKILL);
                let _ = child.wait();
            }
        }
        self.kill_namespace_processes();
    }

    fn create_network(&mut self) {
        let _in_process = ALLOCATION.lock().unwrap_or_else(|e| e.into_inner());
        let _across_processes = FileLock::take(Path::new(LOCK_FILE));
        let in_use = run_output("ip", &["-br", "addr"]);
        let links = run_output("ip", &["-br", "link"]);
        let seed = std::process::id()
            .wrapping_mul(2_654_435_761)
            .wrapping_add(COUNTER.load(Ordering::Relaxed).wrapping_mul(40_503));
        let index = (0..SUBNETS)
            .map(|i| seed.wrapping_add(i) % SUBNETS)
            .find(|&i| {
                let (server, host) = subnet(i);
                !has_address(&in_use, server)
                    && !has_address(&in_use, host)
                    && !has_link(&links, &format!("rsvh{i}"))
            })
            .expect("no free /30 in 198.18.0.0/15");
        let (server, host) = subnet(index);
        let (host_if, server_if) = (format!("rsvh{index}"), format!("rsvs{index}"));
        self.server = server;

        run("ip", &["netns", "add", &self.netns]);
        // From here on, Drop deletes the namespace (and with it the veth pair).
        self.host_if = host_if.clone();
        let ns = self.netns.clone();
        run("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        run(
            "ip",
            &[
                "link", "add", &host_if, "type", "veth", "peer", "name", &server_if, "netns", &ns,
            ],
        );
        run(
            "ip",
            &["addr", "add", &format!("{host}/30"), "dev", &host_if],
        );
        run("ip", &["link", "set", &host_if, "up"]);
        run(
            "ip",
            &[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{server}/30"),
                "dev",
                &server_if,
            ],
        );
        run("ip", &["-n", &ns, "link", "set", &server_if, "up"]);
    }

    fn write_config(&self) {
        let state = self.state.path();
        let protocols = if self.v4_only { "4" } else { "3, 4" };
        let mut config = format!(
            "NFS_CORE_PARAM {{\n  Protocols = {protocols};\n  Bind_addr = {server};\n  \
             NFS_Port = {NFS_PORT};\n  MNT_Port = {MOUNT_PORT};\n  Enable_NLM = false;\n  \
             Enable_RQUOTA = false;\n}}\n\
             NFSV4 {{\n  Graceless = true;\n  RecoveryBackend = fs;\n  RecoveryRoot = \"{recovery}\";\n}}\n\
             NFS_KRB5 {{\n  Active_krb5 = false;\n}}\n\
             LOG {{\n  Default_Log_Level = EVENT;\n}}\n",
            server = self.server,
            recovery = state.join("recovery").display(),
        );
        // Attr_Expiration_Time = 0: files the tests change directly on the exported directory
        // must show their new attributes at once, as a kernel NFS server's would.
        for (n, export) in self.exports.iter().enumerate() {
            config.push_str(&format!(
                "EXPORT {{\n  Export_Id = {id};\n  Path = \"{path}\";\n  Pseudo = \"/export{id}\";\n  \
                 Protocols = {protocols};\n  Transports = TCP;\n  Access_Type = {access};\n  \
                 Squash = No_Root_Squash;\n  SecType = sys;\n  Attr_Expiration_Time = 0;\n  FSAL {{\n    Name = VFS;\n  }}\n}}\n",
                id = n + 1,
                path = export.display(),
                access = if self.read_only { "RO" } else { "RW" },
            ));
        }
        fs::write(state.join("ganesha.conf"), config).expect("write ganesha.conf");
    }

    fn spawn(&mut self) {
        let state = self.state.path();
        let log = state.join("ganesha.log");
        let _ = fs::remove_file(&log);
        let _ = fs::remove_file(state.join("ganesha.pid"));
        let script = format!(
            "set -e\n\
             mount -t tmpfs none /run\n\
             mkdir -p /run/rpcbind /var/lib/nfs/ganesha\n\
             mount -t tmpfs none /var/lib/nfs/ganesha\n\
             {rpcbind}\n\
             ganesha.nfsd -F -L '{log}' -f '{conf}' -p '{own_pid}' -N NIV_EVENT &\n\
             ganesha=$!\n\
             echo $ganesha > '{pid}'\n\
             trap 'kill -TERM $ganesha $rpcbind 2>/dev/null' TERM\n\
             wait $ganesha || true\n\
             kill -TERM $rpcbind 2>/dev/null || true\n\
             wait\n",
            log = log.display(),
            conf = state.join("ganesha.conf").display(),
            pid = state.join("ganesha.pid").display(),
            own_pid = state.join("ganesha.nfsd.pid").display(),
            rpcbind = if self.v4_only {
                "rpcbind="
            } else {
                "rpcbind -f &\n\
                 rpcbind=$!\n\
                 i=0; while [ ! -S /run/rpcbind.sock ] && [ $i -lt 250 ]; do sleep 0.02; i=$((i+1)); done"
            },
        );
        let output = fs::File::create(state.join("output.log")).expect("output log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .args([
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
            ])
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("output log"))
            .stderr(output)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start ganesha in {}: {e}", self.netns));
        self.child = Some(child);
        self.paused = false;
        self.wait_ready();
    }

    /// Waits until the portmapper, MOUNT and NFS all answer a NULL call and MOUNT and NFS are
    /// registered with the portmapper (ganesha registers after it starts listening).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let ip = IpAddr::V4(self.server);
        loop {
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                panic!(
                    "ganesha in {} exited during start-up ({status})\n{}",
                    self.netns,
                    self.log_tail()
                );
            }
            let failure = if self.v4_only {
                std::net::TcpStream::connect_timeout(
                    &std::net::SocketAddr::new(ip, NFS_PORT),
                    Duration::from_millis(200),
                )
                .err()
                .map(|e| e.to_string())
            } else {
                readiness(ip).err()
            };
            match failure {
                None => return,
                Some(why) if Instant::now() >= deadline => panic!(
                    "ganesha in {} did not answer within {READY_TIMEOUT:?}: {why}\n{}",
                    self.netns,
                    self.log_tail()
                ),
                Some(_) => sleep(Duration::from_millis(20)),
            }
        }
    }

    fn kill_namespace_processes(&self) {
        for _ in 0..100 {
            let pids = namespace_pids(&self.netns);
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                signal_process(pid, libc::SIGKILL);
            }
            sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Ganesha {
    fn drop(&mut self) {
        self.stop_within(Duration::from_secs(3));
        self.kill_namespace_processes();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .stderr(Stdio::null())
            .status();
        if !self.host_if.is_empty() {
            // Normally gone with the namespace; only if the namespace never got the peer.
            let _ = Command::new("ip")
                .args(["link", "del", &self.host_if])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The address pair of /30 number `index`: (server, host side).
fn subnet(index: u32) -> (Ipv4Addr, Ipv4Addr) {
    let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + index * 4;
    (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
}

fn url_path(path: &Path) -> String {
    let text = path.to_str().expect("export paths in tests are UTF-8");
    assert!(
        text.starts_with('/'),
        "an NFS path must be absolute: {text}"
    );
    text.to_string()
}

/// Whether `ip -br addr` output lists `ip` (with any prefix length).
fn has_address(listing: &str, ip: Ipv4Addr) -> bool {
    let prefix = format!("{ip}/");
    listing.split_whitespace().any(|w| w.starts_with(&prefix))
}

/// Whether `ip -br link` output lists interface `name` (shown as `name` or `name@peer`).
fn has_link(listing: &str, name: &str) -> bool {
    let peer = format!("{name}@");
    listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .any(|w| w == name || w.starts_with(&peer))
}

fn preflight() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        panic!("the ganesha test harness needs root (network namespaces, mounts)");
    }
    for (tool, package) in [
        ("ip", "iproute2"),
        ("unshare", "util-linux"),
        ("rpcbind", "rpcbind"),
        ("ganesha.nfsd", "nfs-ganesha and nfs-ganesha-vfs"),
    ] {
        let found = std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
            .unwrap_or(false)
            || ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                .iter()
                .any(|dir| Path::new(dir).join(tool).is_file());
        if !found {
            panic!("`{tool}` is missing: install {package} to run the NFS tests");
        }
    }
}

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    if !output.status.success() {
        panic!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
}

fn run_output(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn namespace_pids(netns: &str) -> Vec<libc::pid_t> {
    // `ip netns pids` reads every process's namespace link, which blocks on any process of the
    // machine stuck in the kernel (a hung FUSE request of another test): bounded.
    match Command::new("timeout")
        .args(["-s", "KILL", "10", "ip", "netns", "pids", netns])
        .stderr(Stdio::null())
        .output()
    {
        Ok(output) => String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .filter_map(|pid| pid.parse().ok())
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn signal_group(group: libc::pid_t, signal: libc::c_int) {
    // SAFETY: killpg only sends a signal; `group` is a process group this guard created.
    unsafe {
        libc::killpg(group, signal);
    }
}

fn signal_process(pid: libc::pid_t, signal: libc::c_int) {
    // SAFETY: kill only sends a signal.
    unsafe {
        libc::kill(pid, signal);
    }
}

fn process_alive(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let result = unsafe { libc::kill(pid, 0) };
    result == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Deletes namespaces `rsvt-<pid>-*` of test processes that are gone, and what runs in them.
fn sweep_leftovers() {
    let list = run_output("ip", &["netns", "list"]);
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(owner) = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if owner as u32 == std::process::id() || process_alive(owner) {
            continue;
        }
        for pid in namespace_pids(name) {
            signal_process(pid, libc::SIGKILL);
        }
        sleep(Duration::from_millis(50));
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
    }
}

/// An exclusive `flock` held until dropped.
struct FileLock(fs::File);

impl FileLock {
    fn take(path: &Path) -> FileLock {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // SAFETY: flock on a file descriptor we own; blocks until the lock is ours.
        let result = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(result, 0, "flock {}", path.display());
        FileLock(file)
    }
}

fn readiness(ip: IpAddr) -> Result<(), String> {
    const PORTMAPPER: (u32, u32) = (100_000, 2);
    const MOUNT: (u32, u32) = (100_005, 3);
    const NFS: (u32, u32) = (100_003, 3);
    for (port, (program, version)) in [
        (PORTMAPPER_PORT, PORTMAPPER),
        (MOUNT_PORT, MOUNT),
        (NFS_PORT, NFS),
    ] {
        rpc_call(SocketAddr::new(ip, port), program, version, 0, &[])
            .map_err(|e| format!("NULL to program {program} on port {port}: {e}"))?;
    }
    for (expected, (program, version)) in [(MOUNT_PORT, MOUNT), (NFS_PORT, NFS)] {
        const GETPORT: u32 = 3;
        const IPPROTO_TCP: u32 = 6;
        let (pm_program, pm_version) = PORTMAPPER;
        let reply = rpc_call(
            SocketAddr::new(ip, PORTMAPPER_PORT),
            pm_program,
            pm_version,
            GETPORT,
            &[program, version, IPPROTO_TCP, 0],
        )
        .map_err(|e| format!("GETPORT {program}: {e}"))?;
        let port = reply
            .get(..4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        if port != Some(u32::from(expected)) {
            return Err(format!(
                "program {program} is registered on port {port:?}, expected {expected}"
            ));
        }
    }
    Ok(())
}

/// One RPC call over TCP (RFC 5531 record marking, AUTH_NONE); returns the result body.
fn rpc_call(
    addr: SocketAddr,
    program: u32,
    version: u32,
    procedure: u32,
    args: &[u32],
) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind};
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let xid = std::process::id() ^ program ^ procedure.rotate_left(16) ^ 0x5eed_0000;
    let mut words = vec![xid, 0, 2, program, version, procedure, 0, 0, 0, 0];
    words.extend_from_slice(args);
    let mut message = Vec::with_capacity(4 + words.len() * 4);
    message.extend_from_slice(&(0x8000_0000u32 | (words.len() as u32 * 4)).to_be_bytes());
    for word in words {
        message.extend_from_slice(&word.to_be_bytes());
    }
    stream.write_all(&message)?;
    let mut header = [0u8; 4];
    stream.read_exact(&mut header)?;
    let length = (u32::from_be_bytes(header) & 0x7fff_ffff) as usize;
    if length > 65536 {
        return Err(Error::new(ErrorKind::InvalidData, "oversized reply"));
    }
    let mut reply = vec![0u8; length];
    stream.read_exact(&mut reply)?;
    let word = |i: usize| {
        reply
            .get(i * 4..i * 4 + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    // xid, REPLY, MSG_ACCEPTED, verifier (flavor, length, body), accept_stat, results.
    let verifier_words = word(4).map(|len| (len as usize).div_ceil(4)).unwrap_or(0);
    let status_at = 5 + verifier_words;
    let accepted = word(0) == Some(xid)
        && word(1) == Some(1)
        && word(2) == Some(0)
        && word(status_at) == Some(0);
    if accepted {
        Ok(reply[(status_at + 1) * 4..].to_vec())
    } else {
        Err(Error::new(ErrorKind::InvalidData, "call not accepted"))
    }
}

/// Waits up to `patience` for `child` to exit; true when it did (and was reaped).
fn wait_child(child: &mut Child, patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return true,
            Ok(None) if Instant::now() < deadline => sleep(Duration::from_millis(10)),
            Ok(None) => return false,
            Err(_) => return true,
        }
    }
}

/// Whether every thread of `pid` is in the stopped state (`T`), per /proc.
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|stat| {
                let after_name = stat.rfind(')')?;
                stat[after_name + 1..].trim_start().chars().next()
            })
            .is_some_and(|state| state == 'T' || state == 't')
    })
}

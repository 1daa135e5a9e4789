//! Runs the real `reservoir` binary as tests' mounts, and cleans up after them.
//!
//! A [`Mount`] stops its process (SIGTERM, then SIGKILL) and detaches the mount point when it
//! is dropped, also when the test panics. Each [`Dirs`] has its own mount point, cache
//! directory and control-socket directory, so tests run in parallel without meeting.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_reservoir")
}

/// The directories of one test: a mount point, a cache and a control-socket directory.
pub struct Dirs {
    pub root: tempfile::TempDir,
    pub mnt: PathBuf,
    pub cache: PathBuf,
    pub run: PathBuf,
}

impl Dirs {
    pub fn new() -> Dirs {
        let root = tempfile::Builder::new()
            .prefix("rsv-test-")
            .tempdir()
            .expect("create a temporary directory");
        let mnt = root.path().join("mnt");
        let cache = root.path().join("cache");
        let run = root.path().join("run");
        for dir in [&mnt, &run] {
            std::fs::create_dir(dir).expect("create test directory");
        }
        Dirs {
            root,
            mnt,
            cache,
            run,
        }
    }

    /// A path for the test's own use (source trees, logs).
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    /// `reservoir ARGS` with this test's control-socket directory.
    pub fn command(&self) -> Command {
        let mut command = Command::new(bin());
        command.env("RESERVOIR_RUN_DIR", &self.run);
        command.env("RUST_LOG", "info,reservoir=debug");
        command
    }

    /// `reservoir status --json` of the mount.
    pub fn status(&self) -> serde_json::Value {
        let output = self
            .command()
            .args(["status", "--json"])
            .arg(&self.mnt)
            .output()
            .expect("run reservoir status");
        assert!(
            output.status.success(),
            "reservoir status failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("status is JSON")
    }
}

/// Whether `path` is a mount point now.
pub fn is_mounted(path: &Path) -> bool {
    let wanted = path.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(wanted.as_str()))
}

/// Detaches every mount at or under `root`, deepest first (cleanup after a test).
pub fn unmount_all_under(root: &Path) {
    let prefix = root.to_string_lossy().replace(' ', "\\040");
    let mut points: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|point| *point == prefix || point.starts_with(&format!("{prefix}/")))
        .map(|point| point.replace("\\040", " "))
        .collect();
    points.sort_by_key(|point| std::cmp::Reverse(point.len()));
    for point in points {
        let _ = Command::new("umount").arg("-l").arg(&point).status();
    }
}

/// Stops every `reservoir keeper` whose socket lies under `root` (the keepers a test's
/// daemons started), then detaches every mount under `root`: with nobody holding their
/// connections any more, nothing of the test lingers.
pub fn clean_up_under(root: &Path) {
    stop_keepers_under(root);
    unmount_all_under(root);
}

/// SIGKILLs every `reservoir keeper` listening under `root`; a keeper keeps nothing but
/// descriptors, which die with it.
pub fn stop_keepers_under(root: &Path) {
    let root = root.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_keeper = args.get(1).is_some_and(|a| a == "keeper");
        if is_keeper && args.iter().any(|a| a.starts_with(&root)) {
            signal(pid, libc::SIGKILL);
        }
    }
}

/// A running `reservoir mount`.
pub struct Mount {
    child: Option<Child>,
    mountpoint: PathBuf,
    log: PathBuf,
}

impl Mount {
    /// Mounts `source` at the test's mount point with the test's cache directory plus `args`;
    /// panics with the process's log if it does not come up.
    pub fn start(dirs: &Dirs, source: &str, args: &[&str]) -> Mount {
        match Mount::try_start(dirs, source, args) {
            Ok(mount) => mount,
            Err(output) => panic!(
                "reservoir mount {source} failed ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ),
        }
    }

    /// Like [`Mount::start`], with extra environment variables for the process (test fault
    /// switches).
    pub fn start_with_env(
        dirs: &Dirs,
        source: &str,
        args: &[&str],
        env: &[(&str, &Path)],
    ) -> Mount {
        match Mount::try_start_with_env(dirs, source, args, env) {
            Ok(mount) => mount,
            Err(output) => panic!(
                "reservoir mount {source} failed ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ),
        }
    }

    /// Like [`Mount::start`], but returns the exited process's output when mounting fails.
    pub fn try_start(dirs: &Dirs, source: &str, args: &[&str]) -> Result<Mount, Output> {
        Mount::try_start_with_env(dirs, source, args, &[])
    }

    fn try_start_with_env(
        dirs: &Dirs,
        source: &str,
        args: &[&str],
        env: &[(&str, &Path)],
    ) -> Result<Mount, Output> {
        let log = dirs.path(&format!(
            "mount-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let log_file = std::fs::File::create(&log).expect("create mount log");
        let child = dirs
            .command()
            .arg("mount")
            .arg(source)
            .arg(&dirs.mnt)
            .arg("--cache-dir")
            .arg(&dirs.cache)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start reservoir mount");
        let mut mount = Mount {
            child: Some(child),
            mountpoint: dirs.mnt.clone(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if is_mounted(&mount.mountpoint) && mount.control_ready(dirs) {
                return Ok(mount);
            }
            let child = mount.child.as_mut().expect("child");
            if let Some(status) = child.try_wait().expect("wait for mount") {
                mount.child = None;
                return Err(Output {
                    status,
                    stdout: Vec::new(),
                    stderr: std::fs::read(&mount.log).unwrap_or_default(),
                });
            }
            assert!(
                Instant::now() < deadline,
                "mount did not come up in 30 s:\n{}",
                mount.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn control_ready(&self, dirs: &Dirs) -> bool {
        std::fs::read_dir(&dirs.run)
            .map(|mut entries| entries.next().is_some())
            .unwrap_or(false)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the mount with SIGTERM and waits for a clean exit; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        signal(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(status) = child.try_wait().ok().flatten() {
                break Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                break child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
        status.and_then(|s| s.code())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- log of the mount at {} ---\n{}",
                self.mountpoint.display(),
                self.log_text()
            );
        }
    }
}

pub fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) with a pid this test started; no memory is involved.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// Runs a command as the unprivileged user `nobody` and returns its output.
pub fn as_nobody(program: &str, args: &[&OsStrLike]) -> Output {
    let mut command = Command::new("setpriv");
    command.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
    command.arg(program);
    for arg in args {
        command.arg(arg);
    }
    command.output().expect("run setpriv")
}

pub type OsStrLike = std::ffi::OsStr;

/// Polls `done` every 100 ms; fails the test, naming `what`, after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

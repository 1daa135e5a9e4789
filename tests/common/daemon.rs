//! A `reservoir daemon` run by a test through its control socket, restarted and killed as a
//! container runtime would, and cleaned up after the test (also when it fails).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::mount::{Dirs, bin, clean_up_under, is_mounted, signal};

/// A running `reservoir daemon`. Dropping it stops it (SIGTERM, then SIGKILL) and detaches
/// anything still mounted under the test's directory, also when the test panics.
pub struct Daemon {
    child: Option<Child>,
    pub socket: PathBuf,
    pub log: PathBuf,
    root: PathBuf,
    /// The command line after `--cache-dir C --socket S`, for restarts.
    args: Vec<String>,
    cache: PathBuf,
    program: PathBuf,
    /// Extra environment of the next start.
    env: Vec<(String, String)>,
}

impl Daemon {
    pub fn start(dirs: &Dirs, args: &[&str]) -> Daemon {
        match Daemon::try_start(dirs, &dirs.cache, &dirs.run.join("daemon.sock"), args) {
            Ok(daemon) => daemon,
            Err(output) => panic!(
                "reservoir daemon failed ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ),
        }
    }

    /// Starts a daemon; returns the exited process's output if it does not come up.
    pub fn try_start(
        dirs: &Dirs,
        cache: &Path,
        socket: &Path,
        args: &[&str],
    ) -> Result<Daemon, Output> {
        let mut daemon = Daemon {
            child: None,
            socket: socket.to_path_buf(),
            log: PathBuf::new(),
            root: dirs.root.path().to_path_buf(),
            args: args.iter().map(|a| a.to_string()).collect(),
            cache: cache.to_path_buf(),
            program: PathBuf::from(bin()),
            env: Vec::new(),
        };
        daemon.spawn()?;
        Ok(daemon)
    }

    /// Starts the daemon process again, with the same command line (as a container would be);
    /// `program` replaces the binary (another build).
    pub fn restart_with(&mut self, program: &Path) {
        assert!(self.child.is_none(), "the daemon is still running");
        self.program = program.to_path_buf();
        if let Err(output) = self.spawn() {
            panic!(
                "reservoir daemon failed to restart ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }

    pub fn restart(&mut self) {
        let program = self.program.clone();
        self.restart_with(&program);
    }

    fn spawn(&mut self) -> Result<(), Output> {
        self.log = self.root.join(format!(
            "daemon-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let child = Command::new(&self.program)
            .arg("daemon")
            .arg("--cache-dir")
            .arg(&self.cache)
            .arg("--socket")
            .arg(&self.socket)
            .args(&self.args)
            .env("RUST_LOG", "info,reservoir=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&self.log).unwrap())
            .spawn()
            .expect("start reservoir daemon");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(Output {
                    status,
                    stdout: Vec::new(),
                    stderr: std::fs::read(&self.log).unwrap_or_default(),
                });
            }
            if UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not come up in 30 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The environment of the next start (`RESERVOIR_FAILPOINT`, for instance).
    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// Waits up to `limit` for the process to exit by itself; whether it did.
    pub fn wait_for_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let exited = match self.child.as_mut() {
                None => true,
                Some(child) => child.try_wait().ok().flatten().is_some(),
            };
            if exited {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL, and wait until the process is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends one request line and returns every answer line.
    pub fn send_line(&self, line: &str) -> Vec<Value> {
        let mut stream = UnixStream::connect(&self.socket).expect("connect to the daemon");
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        stream.write_all(line.as_bytes()).unwrap();
        stream.write_all(b"\n").unwrap();
        BufReader::new(stream)
            .lines()
            .map(|l| serde_json::from_str(&l.expect("read an answer")).expect("answer is JSON"))
            .collect()
    }

    /// One request, one answer.
    pub fn call(&self, request: Value) -> Value {
        let mut answers = self.send_line(&request.to_string());
        assert_eq!(answers.len(), 1, "{request} -> {answers:?}");
        answers.remove(0)
    }

    pub fn mount(&self, volume_id: &str, target: &Path, source: &str, extra: Value) -> Value {
        let mut request = json!({
            "op": "mount",
            "volume_id": volume_id,
            "target_path": target,
            "source": source,
        });
        for (key, value) in extra.as_object().unwrap() {
            request[key] = value.clone();
        }
        self.call(request)
    }

    pub fn mount_ok(&self, volume_id: &str, target: &Path, source: &str, extra: Value) {
        let answer = self.mount(volume_id, target, source, extra);
        assert_eq!(answer["kind"], "mounted", "{answer}\n{}", self.log_text());
        assert!(is_mounted(target));
    }

    /// `reservoir status --socket S --json`.
    pub fn status(&self) -> Value {
        let output = Command::new(bin())
            .args(["status", "--json", "--socket"])
            .arg(&self.socket)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("status is JSON")
    }

    pub fn volume(&self, id: &str) -> Value {
        let status = self.status();
        status["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["volume_id"] == id)
            .unwrap_or_else(|| panic!("volume {id} not in {status}"))
            .clone()
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        signal(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
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
        status.and_then(|s| s.code())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        clean_up_under(&self.root);
    }
}

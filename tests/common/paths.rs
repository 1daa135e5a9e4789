//! What the path properties of sources share (`tests/source_paths.rs` for directory sources,
//! `tests/nfs_source.rs` for NFS): a root full of traps beside an `outside` directory holding
//! a secret, a racer that swaps a directory of the root for a symlink to the outside, and the
//! checks that nothing of the outside was read or changed.

#![allow(dead_code)]

use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use proptest::prelude::*;
use reservoir::source::{Handle, Kind, Owner, SetAttr, Source};

pub const SECRET: &[u8] = b"SECRET-OUTSIDE-THE-ROOT";

/// Names an attacker would try, and ordinary ones that exist in the root.
pub const NAMES: [&[u8]; 16] = [
    b"..",
    b".",
    b"",
    b"/",
    b"d",
    b"f",
    b"up",
    b"abs",
    b"swap",
    b"new",
    b"../outside",
    b"d/../..",
    b"/etc/passwd",
    b"secret",
    b"a\0b",
    b"swap/secret",
];

/// Whether `bytes` carry the secret.
pub fn leaks(bytes: &[u8]) -> bool {
    bytes.windows(SECRET.len()).any(|w| w == SECRET)
}

/// `outside/` with the secret in `secret` and `d/f`; returns the inode numbers a source
/// must never show.
pub fn make_outside(outside: &Path) -> Vec<u64> {
    std::fs::create_dir_all(outside.join("d")).expect("mkdir");
    std::fs::write(outside.join("secret"), SECRET).expect("write");
    std::fs::write(outside.join("d/f"), SECRET).expect("write");
    ["", "secret", "d", "d/f"]
        .iter()
        .map(|p| std::fs::metadata(outside.join(p)).expect("stat").ino())
        .collect()
}

/// A fresh root of traps: `d/f`, `f`, `swap/`, and symlinks to the outside (`up` relative,
/// `abs` absolute, `d/secret` to the secret itself).
pub fn make_root(root: &Path, outside: &Path) {
    let _ = std::fs::remove_dir_all(root);
    std::fs::create_dir_all(root.join("d")).expect("mkdir");
    std::fs::create_dir_all(root.join("swap")).expect("mkdir");
    std::fs::write(root.join("f"), b"inside").expect("write");
    std::fs::write(root.join("d/f"), b"inside").expect("write");
    symlink("../outside", root.join("up")).expect("symlink");
    symlink(outside, root.join("abs")).expect("symlink");
    symlink(outside.join("secret"), root.join("d/secret")).expect("symlink");
}

/// Everything under `dir`: paths and file contents, to compare before and after.
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&path) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).expect("stat");
            if meta.is_dir() {
                pending.push(path.clone());
            }
            let bytes = meta.is_file().then(|| std::fs::read(&path).expect("read"));
            out.push((path, bytes));
        }
    }
    out.sort();
    out
}

/// Swaps `root/swap` between a directory and a symlink to the outside, as fast as it can,
/// until dropped. (It never writes through the name: a probe may have renamed a symlink onto
/// it.)
pub struct Swapper {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Swapper {
    pub fn start(root: &Path, outside: &Path) -> Swapper {
        let stop = Arc::new(AtomicBool::new(false));
        let (swap, outside, flag) = (root.join("swap"), outside.to_path_buf(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let _ = std::fs::remove_dir(&swap).or_else(|_| std::fs::remove_file(&swap));
                let _ = symlink(&outside, &swap);
                std::thread::yield_now();
                let _ = std::fs::remove_file(&swap);
                let _ = std::fs::create_dir(&swap);
                std::thread::yield_now();
            }
        });
        Swapper {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The number of cases: `RESERVOIR_MODEL_CASES`, else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("RESERVOIR_MODEL_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

/// One step of a property run, on the directory `H` names (how a test names directories is
/// its own: a forged path for directory sources, one of the handles seen so far for NFS).
#[derive(Clone, Debug)]
pub enum Probe<H> {
    /// Looks every name up (and reads what is a file).
    Lookup(H),
    ReadDir(H),
    Read(H),
    ReadLink(H),
    Create(H, usize),
    Mkdir(H, usize),
    /// Writes through the source, a writer handle and the passthrough file, where it has them.
    Write(H),
    /// Truncates to 0 with a mode change.
    Truncate(H),
    Rename(H, usize, usize),
    Remove(H, usize),
}

impl<H> Probe<H> {
    pub fn target(&self) -> &H {
        match self {
            Probe::Lookup(h)
            | Probe::ReadDir(h)
            | Probe::Read(h)
            | Probe::ReadLink(h)
            | Probe::Create(h, _)
            | Probe::Mkdir(h, _)
            | Probe::Write(h)
            | Probe::Truncate(h)
            | Probe::Rename(h, _, _)
            | Probe::Remove(h, _) => h,
        }
    }
}

pub fn probe_strategy<H: Clone + std::fmt::Debug>(
    target: impl Strategy<Value = H> + Clone,
) -> impl Strategy<Value = Probe<H>> {
    let name = 0..NAMES.len();
    prop_oneof![
        target.clone().prop_map(Probe::Lookup),
        target.clone().prop_map(Probe::ReadDir),
        target.clone().prop_map(Probe::Read),
        target.clone().prop_map(Probe::ReadLink),
        (target.clone(), name.clone()).prop_map(|(h, n)| Probe::Create(h, n)),
        (target.clone(), name.clone()).prop_map(|(h, n)| Probe::Mkdir(h, n)),
        target.clone().prop_map(Probe::Write),
        target.clone().prop_map(Probe::Truncate),
        (target.clone(), name.clone(), name.clone()).prop_map(|(h, a, b)| Probe::Rename(h, a, b)),
        (target, name).prop_map(|(h, n)| Probe::Remove(h, n)),
    ]
}

/// Runs `probe` on `dir` (the directory or file its target names); returns the handles it
/// found, or what reached the outside: a found or listed outside inode, a listed name a
/// directory cannot hold, or the secret's bytes.
pub async fn run_probe<H: std::fmt::Debug>(
    source: &dyn Source,
    dir: &Handle,
    probe: &Probe<H>,
    outside_inodes: &[u64],
) -> Result<Vec<Handle>, String> {
    let owner = Owner {
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
    };
    let clean = |bytes: &[u8]| {
        if leaks(bytes) {
            Err(format!("{probe:?} read the secret"))
        } else {
            Ok(())
        }
    };
    let mut found = Vec::new();
    match probe {
        Probe::Lookup(_) => {
            for name in NAMES {
                if let Ok((handle, attr)) = source.lookup(dir, name).await {
                    if outside_inodes.contains(&attr.fileid) {
                        return Err(format!("{probe:?}: {name:?} found the outside"));
                    }
                    if attr.kind == Kind::File
                        && let Ok(bytes) = source.read(&handle, 0, 4096).await
                    {
                        clean(&bytes)?;
                    }
                    found.push(handle);
                }
            }
        }
        Probe::ReadDir(_) => {
            for e in source.read_dir(dir).await.unwrap_or_default() {
                if outside_inodes.contains(&e.attr.fileid) {
                    return Err(format!("{probe:?} listed the outside: {e:?}"));
                }
                if [&b"."[..], b"..", b""].contains(&e.name.as_slice()) || e.name.contains(&b'/') {
                    return Err(format!("{probe:?} listed the name {:?}", e.name));
                }
                found.push(e.handle);
            }
        }
        Probe::Read(_) => {
            if let Ok(bytes) = source.read(dir, 0, 4096).await {
                clean(&bytes)?;
            }
        }
        Probe::ReadLink(_) => {
            // A symlink's target is shown as it is (that is its content), never followed.
            let _target = source.read_link(dir).await;
        }
        Probe::Create(_, n) => {
            if let Ok((created, _)) = source.create(dir, NAMES[*n], 0o644, owner, false).await {
                if let Ok(bytes) = source.read(&created, 0, 4096).await {
                    clean(&bytes)?;
                }
                let _written = source.write(&created, 0, b"pwned").await;
                found.push(created);
            }
        }
        Probe::Mkdir(_, n) => {
            if let Ok((made, _)) = source.mkdir(dir, NAMES[*n], 0o755, owner).await {
                found.push(made);
            }
        }
        Probe::Write(_) => {
            let _written = source.write(dir, 0, b"pwned").await;
            if let Ok(Some(writer)) = source.open_writer(dir).await {
                let _written = writer.write(0, b"pwned".to_vec()).await;
            }
            if let Some(Ok(fd)) = source.open_passthrough(dir) {
                let _written = nix::sys::uio::pwrite(&fd, b"pwned", 0);
            }
        }
        Probe::Truncate(_) => {
            let changes = SetAttr {
                size: Some(0),
                perm: Some(0o777),
                ..SetAttr::default()
            };
            let _changed = source.setattr(dir, &changes).await;
        }
        Probe::Rename(_, a, b) => {
            let _renamed = source.rename(dir, NAMES[*a], dir, NAMES[*b]).await;
        }
        Probe::Remove(_, n) => {
            let _removed = source.remove(dir, NAMES[*n]).await;
            let _removed = source.rmdir(dir, NAMES[*n]).await;
        }
    }
    Ok(found)
}

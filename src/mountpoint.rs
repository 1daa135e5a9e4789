//! Mount points: checking one before a session is mounted on it, reading the mount table,
//! raising a FUSE mount's readahead, unmounting. Shared by `reservoir mount` and the daemon.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Readahead the kernel does on the mount for files served by the daemon.
const READ_AHEAD_KB: u64 = 4096;

/// A directory that cannot take a mount, and why.
#[derive(Debug, thiserror::Error)]
#[error("mount point {}: {why}", path.display())]
pub struct MountPointError {
    pub path: PathBuf,
    pub why: String,
}

/// Checks that the mount point exists, is a directory and is not already a mount point.
pub fn check_mountpoint(path: &Path) -> Result<PathBuf, MountPointError> {
    let fail = |why: &str| MountPointError {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(fail("does not exist")),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(fail(
                "is a dead FUSE mount (transport endpoint is not connected); unmount it first (umount -l)",
            ));
        }
        Err(e) => return Err(fail(&e.to_string())),
    };
    if !meta.is_dir() {
        return Err(fail("is not a directory"));
    }
    let canonical = path.canonicalize().map_err(|e| fail(&e.to_string()))?;
    if let Some(existing) = mount_at(&canonical) {
        return Err(fail(&format!(
            "is already a mount point ({existing}); unmount it or choose another directory"
        )));
    }
    Ok(canonical)
}

/// The file system type and source of the mount at `path`, if `path` is a mount point.
pub fn mount_at(path: &Path) -> Option<String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let wanted = path.to_str()?;
    mountinfo.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let mount_point = unescape_mountinfo(fields.get(4)?);
        if mount_point != wanted {
            return None;
        }
        let separator = fields.iter().position(|f| *f == "-")?;
        let fs_type = fields.get(separator + 1)?;
        let source = fields.get(separator + 2)?;
        Some(format!("{fs_type} from {}", unescape_mountinfo(source)))
    })
}

pub fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&code, 8) {
                Ok(byte) => out.push(byte as char),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&code);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Unmounts a FUSE session's mount point. A busy one (a file open, a working directory inside)
/// is detached instead: the mount point is free at once, and the session keeps serving what is
/// open until the last close ends it.
pub fn unmount_or_detach(mountpoint: &Path) {
    if let Err(e) = nix::mount::umount2(mountpoint, nix::mount::MntFlags::empty()) {
        tracing::info!(mountpoint = %mountpoint.display(), error = %e, "unmount refused; detaching the mount");
        if let Err(e) = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(mountpoint = %mountpoint.display(), error = %e, "cannot detach the mount");
        }
    }
}

/// Raises the kernel's readahead on the mount (the FUSE default is 128 KiB), so that a
/// sequential cold read keeps several block fetches in flight.
pub fn set_read_ahead(mountpoint: &Path) {
    let Ok(meta) = std::fs::metadata(mountpoint) else {
        return;
    };
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, READ_AHEAD_KB.to_string()) {
        tracing::debug!(path, error = %e, "cannot raise readahead");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let err = check_mountpoint(&dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        let err = check_mountpoint(&file).unwrap_err();
        assert!(err.to_string().contains("is not a directory"), "{err}");
        assert!(check_mountpoint(dir.path()).is_ok());
        let err = check_mountpoint(Path::new("/proc")).unwrap_err();
        assert!(err.to_string().contains("already a mount point"), "{err}");
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo(r"/x\\y"), r"/x\\y");
    }
}

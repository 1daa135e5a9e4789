//! The node's view of the mount table (`/proc/self/mountinfo`) and the bind mounts the node
//! service makes. Everything here is synchronous and may block on the kernel: call it from a
//! blocking task.

use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

/// The file system type of every reservoir FUSE mount (and of bind mounts of one).
pub const FS_TYPE: &str = "fuse.reservoir";

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u64,
    /// `major:minor` of the file system: a bind mount shares it with what it binds.
    pub dev: String,
    pub mount_point: PathBuf,
    /// Per-mount options (`ro`/`rw`, `nosuid`, `nodev`, ...).
    pub options: Vec<String>,
    pub fs_type: String,
    pub source: String,
    /// Options of the file system itself.
    pub super_options: Vec<String>,
}

impl MountEntry {
    /// Whether this mount is read-only (its own flag, or its file system's).
    pub fn read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro") || self.super_options.iter().any(|o| o == "ro")
    }

    pub fn has_option(&self, option: &str) -> bool {
        self.options.iter().any(|o| o == option)
    }

    pub fn is_reservoir(&self) -> bool {
        self.fs_type == FS_TYPE
    }
}

/// Parses the text of a mountinfo file; lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let fields: Vec<&str> = line.split(' ').collect();
    let separator = fields.iter().position(|f| *f == "-")?;
    if separator < 6 {
        return None;
    }
    let list = |text: &str| text.split(',').map(str::to_string).collect::<Vec<_>>();
    Some(MountEntry {
        mount_id: fields.first()?.parse().ok()?,
        dev: (*fields.get(2)?).to_string(),
        mount_point: PathBuf::from(unescape(fields.get(4)?)),
        options: list(fields.get(5)?),
        fs_type: (*fields.get(separator + 1)?).to_string(),
        source: unescape(fields.get(separator + 2)?),
        super_options: list(fields.get(separator + 3).copied().unwrap_or_default()),
    })
}

/// Undoes the octal escapes (`\040` for a space) of mountinfo fields.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let code = &bytes[i + 1..i + 4];
            if code.iter().all(|b| (b'0'..=b'7').contains(b)) {
                let value = code
                    .iter()
                    .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every mount of this process's mount namespace.
pub fn all() -> io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// The topmost mount at exactly `path` (a normalised absolute path), if any.
pub fn at(path: &Path) -> io::Result<Option<MountEntry>> {
    Ok(all()?.into_iter().rev().find(|m| m.mount_point == path))
}

/// Bind-mounts `source` at `target` (an existing directory), then remounts the bind with
/// `nosuid`, `nodev`, `noatime` and, with `read_only`, `ro`: a bind mount takes no flags of
/// its own when it is made, only when it is remounted. On failure nothing stays mounted.
pub fn bind(source: &Path, target: &Path, read_only: bool) -> io::Result<()> {
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(io::Error::from)?;
    let mut flags = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | MsFlags::MS_NOATIME;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    if let Err(e) = nix::mount::mount(None::<&str>, target, None::<&str>, flags, None::<&str>) {
        let _ = nix::mount::umount2(target, MntFlags::MNT_DETACH);
        return Err(io::Error::from(e));
    }
    Ok(())
}

/// Unmounts `path`; a busy mount is detached (the kernel frees it when its last user leaves).
/// `Ok(false)` when nothing was mounted there.
pub fn unmount(path: &Path) -> io::Result<bool> {
    match nix::mount::umount2(path, MntFlags::empty()) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::EBUSY) => {
            tracing::info!(path = %path.display(), "busy: detaching the mount");
            nix::mount::umount2(path, MntFlags::MNT_DETACH)
                .map(|()| true)
                .map_err(io::Error::from)
        }
        Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(false),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// Detaches `path` at once (for dead FUSE mounts, whose unmount may not return).
pub fn detach(path: &Path) -> io::Result<()> {
    nix::mount::umount2(path, MntFlags::MNT_DETACH).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let text = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
301 29 0:77 / /tmp/a\\040b/staging rw,nosuid,nodev,noatime - fuse.reservoir nfs://10.0.0.1/x rw,user_id=0,group_id=0,default_permissions,allow_other
305 29 0:77 / /tmp/pods/1/mount ro,nosuid,nodev,noatime shared:3 master:1 - fuse.reservoir nfs://10.0.0.1/x rw,user_id=0
garbage
";
        let entries = parse(text);
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[1].mount_point, PathBuf::from("/tmp/a b/staging"));
        assert!(entries[1].is_reservoir());
        assert!(!entries[1].read_only());
        assert_eq!(entries[1].dev, entries[2].dev);
        assert!(entries[2].read_only());
        assert!(entries[2].has_option("nosuid") && entries[2].has_option("nodev"));
        assert_eq!(entries[2].source, "nfs://10.0.0.1/x");
        assert_eq!(entries[0].fs_type, "proc");
        assert_eq!(unescape("a\\134b\\"), "a\\b\\");
    }
}

//! The write half of the `Source` trait against both sources: a real nfs-ganesha (each test with
//! its own server in its own network namespace, see `common::ganesha`) and a directory. Every
//! change is checked on the source itself afterwards, with `std::fs` on the exported directory.
//! Needs root (network namespaces, tmpfs mounts, chown) and nfs-ganesha.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::ganesha::Ganesha;
use reservoir::source::local::LocalSource;
use reservoir::source::nfs::NfsSource;
use reservoir::source::{
    Handle, Kind, Landing, Owner, SetAttr, SetTime, Source, SourceError, SourceOptions, SourceSpec,
    SourceWrite, Timestamp,
};

/// The owner every new object is created for (not the daemon's root).
const NOBODY: Owner = Owner {
    uid: 65534,
    gid: 65534,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Local,
    Nfs,
}

/// A source over a directory, and that directory, to check what the source did.
struct Fixture {
    source: Box<dyn Source>,
    root: Handle,
    /// The exported (or source) directory.
    dir: PathBuf,
    /// The largest single WRITE (NFS only).
    write_size: Option<u32>,
    /// Dropped in this order: the source, the server, the tmpfs, the temporary directory.
    server: Option<Ganesha>,
    _tmpfs: Option<Tmpfs>,
    _temp: Option<tempfile::TempDir>,
}

fn options(timeout: Duration) -> SourceOptions {
    SourceOptions {
        timeout,
        connections: 4,
    }
}

impl Fixture {
    /// Creates `name` in the root, owned by nobody, and returns its handle.
    async fn new_file(&self, name: &[u8]) -> Handle {
        let (file, _) = self
            .source
            .create(&self.root, name, 0o644, NOBODY, true)
            .await
            .unwrap();
        file
    }

    /// A fresh, empty source directory (`export/` in a temporary directory, next to `outside/`).
    async fn new(backend: Backend) -> Fixture {
        let temp = tempfile::tempdir().expect("tempdir");
        let dir = temp.path().join("export");
        std::fs::create_dir(&dir).unwrap();
        std::fs::create_dir(temp.path().join("outside")).unwrap();
        let mut fixture =
            Fixture::on(backend, &dir, Serve::ReadWrite, Duration::from_secs(10)).await;
        fixture._temp = Some(temp);
        fixture
    }

    /// A source over `dir`, served read-write or read-only by a new ganesha for NFS.
    async fn on(backend: Backend, dir: &Path, serve: Serve, timeout: Duration) -> Fixture {
        let dir = std::fs::canonicalize(dir).unwrap();
        let (source, server, write_size): (Box<dyn Source>, _, _) = match backend {
            Backend::Local => {
                let source = LocalSource::open(&dir, &options(timeout))
                    .await
                    .unwrap_or_else(|e| panic!("open {}: {e}", dir.display()));
                (Box::new(source), None, None)
            }
            Backend::Nfs => {
                let server = match serve {
                    Serve::ReadWrite => Ganesha::start(&dir),
                    Serve::ReadOnly => Ganesha::start_read_only(&dir),
                };
                let url = server.url_with_ports(&dir);
                let Ok(SourceSpec::Nfs(spec)) = url.parse::<SourceSpec>() else {
                    panic!("{url} is not an NFS URL");
                };
                let source = NfsSource::connect(&spec, &options(timeout))
                    .await
                    .unwrap_or_else(|e| panic!("connect {url}: {e}"));
                let size = source.write_size();
                (Box::new(source), Some(server), Some(size))
            }
        };
        let (root, _) = source.root().await.unwrap();
        Fixture {
            source,
            root,
            dir,
            write_size,
            server,
            _tmpfs: None,
            _temp: None,
        }
    }

    fn at(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    async fn lookup(&self, rel: &str) -> Handle {
        let mut handle = self.root.clone();
        for name in rel.split('/') {
            handle = self
                .source
                .lookup(&handle, name.as_bytes())
                .await
                .unwrap_or_else(|e| panic!("lookup {rel}: {e}"))
                .0;
        }
        handle
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Serve {
    ReadWrite,
    ReadOnly,
}

fn errno(result: Result<impl std::fmt::Debug, SourceError>) -> i32 {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(e) => e.errno(),
    }
}

fn meta(path: &Path) -> std::fs::Metadata {
    std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn assert_owned_by_nobody(path: &Path) {
    let m = meta(path);
    assert_eq!(
        (m.uid(), m.gid()),
        (65534, 65534),
        "owner of {}",
        path.display()
    );
}

fn set_owner(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
}

/// Deterministic pseudo-random bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut data = vec![0u8; len];
    rng.fill(&mut data);
    data
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

// ---------------------------------------------------------------------------------------------
// A tmpfs mounted for one test, unmounted when dropped. Mount points are named after the test
// process, so that the first mount of a later run removes those of runs that were killed.

const TMPFS_PREFIX: &str = "rsv-writes-tmpfs-";
static TMPFS_SWEEP: Once = Once::new();

struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(options: &str) -> Tmpfs {
        TMPFS_SWEEP.call_once(sweep_tmpfs);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{TMPFS_PREFIX}{}-", std::process::id()))
            .tempdir()
            .unwrap();
        run(
            "mount",
            &["-t", "tmpfs", "-o", options, "tmpfs", path_str(dir.path())],
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn remount(&self, options: &str) {
        run(
            "mount",
            &["-o", &format!("remount,{options}"), path_str(self.path())],
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .args(["-l", path_str(self.dir.path())])
            .status();
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Unmounts the tmpfs mounts of test processes that are gone.
fn sweep_tmpfs() {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in mounts.lines() {
        let Some(point) = line.split(' ').nth(4) else {
            continue;
        };
        let Some(name) = Path::new(point).file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(TMPFS_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = Command::new("umount").args(["-l", point]).status();
        let _ = std::fs::remove_dir(point);
    }
}

// ---------------------------------------------------------------------------------------------
// The cases, each run against both sources.

macro_rules! both_sources {
    ($($case:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Backend::Local).await;
                }
            )*
        }
        mod nfs {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Backend::Nfs).await;
                }
            )*
        }
    };
}

both_sources!(
    create_write_and_commit,
    setattr_truncates_chmods_chowns_and_sets_times,
    directories_removal_rename_and_symlinks,
    nothing_outside_the_root_is_reachable,
    a_read_only_source_refuses_with_erofs,
    a_full_source_reports_enospc,
);

async fn create_write_and_commit(backend: Backend) {
    let f = Fixture::new(backend).await;
    let s = &*f.source;

    // Exclusive create: a new, empty file, owned by the caller, with exactly the mode asked for
    // (group-write survives the daemon's umask).
    let (file, attr) = s
        .create(&f.root, b"new.bin", 0o664, NOBODY, true)
        .await
        .unwrap();
    assert_eq!(
        (attr.kind, attr.size, attr.perm, attr.uid, attr.gid),
        (Kind::File, 0, 0o664, 65534, 65534)
    );
    let m = meta(&f.at("new.bin"));
    assert!(m.is_file());
    assert_eq!(m.mode() & 0o7777, 0o664);
    assert_owned_by_nobody(&f.at("new.bin"));
    assert_eq!(f.lookup("new.bin").await, file);

    // Exclusive create of an existing name: EEXIST, the file untouched.
    let other = Owner { uid: 1, gid: 1 };
    assert_eq!(
        errno(s.create(&f.root, b"new.bin", 0o600, other, true).await),
        libc::EEXIST
    );
    assert_eq!(meta(&f.at("new.bin")).mode() & 0o7777, 0o664);
    assert_owned_by_nobody(&f.at("new.bin"));

    // Non-exclusive create of an existing file opens it as it is: owner, mode and data kept.
    std::fs::write(f.at("existing"), b"keep me").unwrap();
    std::fs::set_permissions(f.at("existing"), PermissionsExt::from_mode(0o604)).unwrap();
    set_owner(&f.at("existing"), 1000, 1000);
    let (existing, attr) = s
        .create(&f.root, b"existing", 0o600, NOBODY, false)
        .await
        .unwrap();
    assert_eq!((attr.size, attr.perm, attr.uid), (7, 0o604, 1000));
    assert_eq!(existing, f.lookup("existing").await);
    let m = meta(&f.at("existing"));
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o604, 1000, 1000));
    assert_eq!(std::fs::read(f.at("existing")).unwrap(), b"keep me");

    // Non-exclusive create of a new name creates it; of a directory, EISDIR.
    let (_, attr) = s
        .create(&f.root, b"fresh", 0o600, NOBODY, false)
        .await
        .unwrap();
    assert_eq!((attr.perm, attr.uid, attr.gid), (0o600, 65534, 65534));
    assert_owned_by_nobody(&f.at("fresh"));
    std::fs::create_dir(f.at("a-dir")).unwrap();
    assert_eq!(
        errno(s.create(&f.root, b"a-dir", 0o600, NOBODY, false).await),
        libc::EISDIR
    );
    assert_eq!(
        errno(s.create(&f.root, b"a-dir", 0o600, NOBODY, true).await),
        libc::EEXIST
    );

    // Writes: at the start, over the middle, an append, then a sparse write past the end.
    let mut expected = Vec::new();
    for (offset, data) in [
        (0u64, &b"hello"[..]),
        (1, b"EL"),
        (5, b", world"),
        ((1 << 20) + 3, b"tail"),
    ] {
        let attr = s.write(&file, offset, data).await.unwrap();
        let end = offset as usize + data.len();
        if expected.len() < end {
            expected.resize(end, 0);
        }
        expected[offset as usize..end].copy_from_slice(data);
        // Both sources report the attributes after the write.
        let attr = attr.expect("attributes after the write");
        assert_eq!(
            attr.size,
            expected.len() as u64,
            "after a write at {offset}"
        );
        assert_eq!(std::fs::read(f.at("new.bin")).unwrap(), expected);
    }
    assert_eq!(&expected[..12], b"hELlo, world");
    assert!(expected[12..(1 << 20) + 3].iter().all(|&b| b == 0));
    s.commit(&file).await.unwrap();

    // A write larger than the largest WRITE (split into pieces sent concurrently), at an odd
    // offset, with an odd length.
    let piece = f.write_size.unwrap_or(1 << 20) as usize;
    let big = pattern(3 * piece + piece / 2 + 7, 1);
    let (big_file, _) = s
        .create(&f.root, b"big.bin", 0o644, NOBODY, true)
        .await
        .unwrap();
    let attr = s.write(&big_file, 7, &big).await.unwrap().unwrap();
    assert_eq!(attr.size, big.len() as u64 + 7);
    s.commit(&big_file).await.unwrap();
    let on_disk = std::fs::read(f.at("big.bin")).unwrap();
    assert_eq!(on_disk.len(), big.len() + 7);
    assert!(on_disk[..7].iter().all(|&b| b == 0));
    assert!(
        on_disk[7..] == big[..],
        "the big write differs on the source"
    );
    // The source reads back what was written.
    assert_eq!(
        s.read(&big_file, 7 + piece as u64 - 3, 10).await.unwrap(),
        big[piece - 3..piece + 7]
    );
    // An empty write changes nothing.
    s.write(&big_file, 0, b"").await.unwrap();
    assert_eq!(meta(&f.at("big.bin")).len(), big.len() as u64 + 7);

    // Writing to a directory fails.
    let dir = f.lookup("a-dir").await;
    assert!(s.write(&dir, 0, b"x").await.is_err());
}

async fn setattr_truncates_chmods_chowns_and_sets_times(backend: Backend) {
    let f = Fixture::new(backend).await;
    let s = &*f.source;
    std::fs::write(f.at("file"), b"0123456789").unwrap();
    std::fs::create_dir(f.at("dir")).unwrap();
    std::fs::write(f.at("target"), b"target").unwrap();
    std::fs::set_permissions(f.at("target"), PermissionsExt::from_mode(0o644)).unwrap();
    symlink("target", f.at("link")).unwrap();
    let file = f.lookup("file").await;

    // Truncate down, then extend with zeros.
    let attr = s
        .setattr(
            &file,
            &SetAttr {
                size: Some(4),
                ..SetAttr::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(attr.size, 4);
    assert_eq!(std::fs::read(f.at("file")).unwrap(), b"0123");
    let attr = s
        .setattr(
            &file,
            &SetAttr {
                size: Some(4096),
                ..SetAttr::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(attr.size, 4096);
    let data = std::fs::read(f.at("file")).unwrap();
    assert_eq!(data.len(), 4096);
    assert_eq!(&data[..4], b"0123");
    assert!(data[4..].iter().all(|&b| b == 0));

    // chmod, including set-id bits.
    for perm in [0o751, 0o4755, 0o2640, 0o600] {
        let attr = s
            .setattr(
                &file,
                &SetAttr {
                    perm: Some(perm),
                    ..SetAttr::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(attr.perm, perm);
        assert_eq!(meta(&f.at("file")).mode() & 0o7777, u32::from(perm));
    }

    // chown to another user and group, then the group alone.
    let attr = s
        .setattr(
            &file,
            &SetAttr {
                uid: Some(65534),
                gid: Some(65534),
                ..SetAttr::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((attr.uid, attr.gid), (65534, 65534));
    assert_owned_by_nobody(&f.at("file"));
    let attr = s
        .setattr(
            &file,
            &SetAttr {
                gid: Some(100),
                ..SetAttr::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((attr.uid, attr.gid), (65534, 100));
    let m = meta(&f.at("file"));
    assert_eq!((m.uid(), m.gid()), (65534, 100));

    // Times: given ones, to the nanosecond; then "now" for mtime alone.
    let atime = Timestamp {
        secs: 1_000_000_000,
        nanos: 5,
    };
    let mtime = Timestamp {
        secs: 1_234_567_890,
        nanos: 123_456_789,
    };
    let attr = s
        .setattr(
            &file,
            &SetAttr {
                atime: Some(SetTime::At(atime)),
                mtime: Some(SetTime::At(mtime)),
                ..SetAttr::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((attr.atime, attr.mtime), (atime, mtime));
    let m = meta(&f.at("file"));
    assert_eq!((m.atime(), m.atime_nsec()), (1_000_000_000, 5));
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_234_567_890, 123_456_789));
    let before = now_secs();
    let attr = s
        .setattr(
            &file,
            &SetAttr {
                mtime: Some(SetTime::Now),
                ..SetAttr::default()
            },
        )
        .await
        .unwrap();
    assert!(attr.mtime.secs >= before - 2 && attr.mtime.secs <= now_secs() + 2);
    assert_eq!(attr.atime, atime, "atime left alone");
    assert!((meta(&f.at("file")).mtime() - before).abs() <= 2);

    // Several changes at once: the size and the mode and the times are all applied.
    let attr = s
        .setattr(
            &file,
            &SetAttr {
                size: Some(1),
                perm: Some(0o640),
                mtime: Some(SetTime::At(mtime)),
                ..SetAttr::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((attr.size, attr.perm, attr.mtime), (1, 0o640, mtime));
    let m = meta(&f.at("file"));
    assert_eq!(
        (m.len(), m.mode() & 0o7777, m.mtime()),
        (1, 0o640, 1_234_567_890)
    );

    // A directory: chmod and chown; truncating it fails.
    let dir = f.lookup("dir").await;
    let attr = s
        .setattr(
            &dir,
            &SetAttr {
                perm: Some(0o1777),
                uid: Some(65534),
                gid: Some(65534),
                ..SetAttr::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (attr.kind, attr.perm, attr.uid),
        (Kind::Directory, 0o1777, 65534)
    );
    assert_eq!(meta(&f.at("dir")).mode() & 0o7777, 0o1777);
    assert_owned_by_nobody(&f.at("dir"));
    assert!(
        s.setattr(
            &dir,
            &SetAttr {
                size: Some(0),
                ..SetAttr::default()
            }
        )
        .await
        .is_err()
    );

    // A symlink is changed itself, never its target: chown applies to the link; chmod is
    // refused or ignored, but never reaches the target.
    let link = f.lookup("link").await;
    let attr = s
        .setattr(
            &link,
            &SetAttr {
                uid: Some(65534),
                gid: Some(65534),
                ..SetAttr::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((attr.kind, attr.uid), (Kind::Symlink, 65534));
    assert_owned_by_nobody(&f.at("link"));
    assert_eq!(meta(&f.at("target")).uid(), 0);
    let _ = s
        .setattr(
            &link,
            &SetAttr {
                perm: Some(0o600),
                ..SetAttr::default()
            },
        )
        .await;
    assert!(
        s.setattr(
            &link,
            &SetAttr {
                size: Some(0),
                ..SetAttr::default()
            }
        )
        .await
        .is_err()
    );
    let target = meta(&f.at("target"));
    assert_eq!((target.mode() & 0o7777, target.len()), (0o644, 6));
}

async fn directories_removal_rename_and_symlinks(backend: Backend) {
    let f = Fixture::new(backend).await;
    let s = &*f.source;

    // mkdir: owner and exact mode (setgid and group-write, which the umask would strip).
    let (d, attr) = s.mkdir(&f.root, b"d", 0o2775, NOBODY).await.unwrap();
    assert_eq!(
        (attr.kind, attr.perm, attr.uid, attr.gid),
        (Kind::Directory, 0o2775, 65534, 65534)
    );
    let m = meta(&f.at("d"));
    assert!(m.is_dir());
    assert_eq!(m.mode() & 0o7777, 0o2775);
    assert_owned_by_nobody(&f.at("d"));
    assert_eq!(
        errno(s.mkdir(&f.root, b"d", 0o755, NOBODY).await),
        libc::EEXIST
    );
    let (sub, _) = s.mkdir(&d, b"sub", 0o700, NOBODY).await.unwrap();
    assert!(meta(&f.at("d/sub")).is_dir());
    assert_eq!(sub, f.lookup("d/sub").await);

    // rmdir of a non-empty directory, remove of a file, of a missing name, of a directory.
    s.create(&d, b"f", 0o644, NOBODY, true).await.unwrap();
    assert_eq!(errno(s.rmdir(&f.root, b"d").await), libc::ENOTEMPTY);
    assert_eq!(errno(s.rmdir(&d, b"f").await), libc::ENOTDIR);
    let not_a_file = errno(s.remove(&d, b"sub").await);
    assert!(
        [libc::EISDIR, libc::EPERM].contains(&not_a_file),
        "remove of a directory: {not_a_file}"
    );
    assert!(meta(&f.at("d/sub")).is_dir());
    s.remove(&d, b"f").await.unwrap();
    assert!(!f.at("d/f").exists());
    assert_eq!(errno(s.remove(&d, b"f").await), libc::ENOENT);
    assert_eq!(errno(s.rmdir(&d, b"missing").await), libc::ENOENT);
    s.rmdir(&d, b"sub").await.unwrap();
    s.rmdir(&f.root, b"d").await.unwrap();
    assert!(!f.at("d").exists());

    // rename: plain, across directories, over an existing file, a directory, a missing name.
    std::fs::write(f.at("a"), b"content of a").unwrap();
    std::fs::create_dir_all(f.at("x/y")).unwrap();
    let x = f.lookup("x").await;
    let y = f.lookup("x/y").await;
    s.rename(&f.root, b"a", &f.root, b"b").await.unwrap();
    assert!(!f.at("a").exists());
    assert_eq!(std::fs::read(f.at("b")).unwrap(), b"content of a");
    s.rename(&f.root, b"b", &y, b"c").await.unwrap();
    assert!(!f.at("b").exists());
    assert_eq!(std::fs::read(f.at("x/y/c")).unwrap(), b"content of a");
    std::fs::write(f.at("x/old"), b"old").unwrap();
    s.rename(&y, b"c", &x, b"old").await.unwrap();
    assert!(!f.at("x/y/c").exists());
    assert_eq!(std::fs::read(f.at("x/old")).unwrap(), b"content of a");
    s.rename(&x, b"y", &f.root, b"y2").await.unwrap();
    assert!(meta(&f.at("y2")).is_dir());
    assert_eq!(
        errno(s.rename(&f.root, b"missing", &f.root, b"z").await),
        libc::ENOENT
    );
    // A file cannot replace a non-empty directory.
    std::fs::write(f.at("y2/keep"), b"").unwrap();
    assert!(s.rename(&x, b"old", &f.root, b"y2").await.is_err());
    assert!(f.at("y2/keep").exists());

    // symlink: the target is kept verbatim, never resolved; the link belongs to the caller.
    let target = b"../../outside/./weird//target-that-does-not-exist";
    let (link, attr) = s.symlink(&f.root, b"ln", target, NOBODY).await.unwrap();
    assert_eq!((attr.kind, attr.size), (Kind::Symlink, target.len() as u64));
    assert_eq!((attr.uid, attr.gid), (65534, 65534));
    assert_eq!(
        std::fs::read_link(f.at("ln"))
            .unwrap()
            .as_os_str()
            .as_encoded_bytes(),
        target
    );
    assert_owned_by_nobody(&f.at("ln"));
    assert_eq!(s.read_link(&link).await.unwrap(), target);
    assert_eq!(
        errno(s.symlink(&f.root, b"ln", b"other", NOBODY).await),
        libc::EEXIST
    );
    // A symlink is removed with remove, not followed.
    s.remove(&f.root, b"ln").await.unwrap();
    assert!(std::fs::symlink_metadata(f.at("ln")).is_err());
}

async fn nothing_outside_the_root_is_reachable(backend: Backend) {
    let f = Fixture::new(backend).await;
    let s = &*f.source;
    let outside = f.dir.parent().unwrap().join("outside");
    std::fs::write(outside.join("secret"), b"secret").unwrap();
    symlink(&outside, f.at("out")).unwrap();
    symlink(outside.join("secret"), f.at("secret-link")).unwrap();
    std::fs::write(f.at("file"), b"file").unwrap();

    // Names that are not a single component are refused before anything is asked.
    for bad in [&b".."[..], b".", b"", b"a/b", b"../outside/x", b"x\0y"] {
        let code = errno(s.create(&f.root, bad, 0o644, NOBODY, true).await);
        assert_eq!(code, libc::EINVAL, "create {bad:?}");
        assert_eq!(
            errno(s.mkdir(&f.root, bad, 0o755, NOBODY).await),
            libc::EINVAL
        );
        assert_eq!(
            errno(s.symlink(&f.root, bad, b"t", NOBODY).await),
            libc::EINVAL
        );
        assert_eq!(errno(s.remove(&f.root, bad).await), libc::EINVAL);
        assert_eq!(errno(s.rmdir(&f.root, bad).await), libc::EINVAL);
        assert_eq!(
            errno(s.rename(&f.root, b"file", &f.root, bad).await),
            libc::EINVAL
        );
        assert_eq!(
            errno(s.rename(&f.root, bad, &f.root, b"z").await),
            libc::EINVAL
        );
    }
    assert_eq!(
        errno(s.create(&f.root, &[b'n'; 256], 0o644, NOBODY, true).await),
        libc::ENAMETOOLONG
    );

    // A symlink to a directory outside is not a way out: nothing is created, removed, moved or
    // written there through it.
    let (out, attr) = s.lookup(&f.root, b"out").await.unwrap();
    assert_eq!(attr.kind, Kind::Symlink);
    assert!(s.create(&out, b"pwned", 0o644, NOBODY, true).await.is_err());
    assert!(
        s.create(&out, b"secret", 0o644, NOBODY, false)
            .await
            .is_err()
    );
    assert!(s.mkdir(&out, b"pwned-dir", 0o755, NOBODY).await.is_err());
    assert!(s.symlink(&out, b"pwned-link", b"x", NOBODY).await.is_err());
    assert!(s.remove(&out, b"secret").await.is_err());
    assert!(s.rename(&f.root, b"file", &out, b"moved").await.is_err());
    assert!(s.rename(&out, b"secret", &f.root, b"stolen").await.is_err());
    // Nor is a symlink to a file outside: writes, truncation and chmod do not reach it.
    let (secret_link, _) = s.lookup(&f.root, b"secret-link").await.unwrap();
    assert!(s.write(&secret_link, 0, b"PWNED").await.is_err());
    assert!(
        s.setattr(
            &secret_link,
            &SetAttr {
                size: Some(0),
                ..SetAttr::default()
            }
        )
        .await
        .is_err()
    );
    let _ = s
        .setattr(
            &secret_link,
            &SetAttr {
                perm: Some(0o777),
                ..SetAttr::default()
            },
        )
        .await;
    let mut names: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["secret"]);
    assert_eq!(std::fs::read(outside.join("secret")).unwrap(), b"secret");
    assert_ne!(meta(&outside.join("secret")).mode() & 0o777, 0o777);
    assert!(f.at("file").exists());

    if backend == Backend::Local {
        // Handles are paths for a directory source: crafted ones cannot climb out either.
        for crafted in [&b".."[..], b"../outside", b"out", b"/tmp", b"x/../.."] {
            let handle = Handle(crafted.to_vec().into_boxed_slice());
            assert!(
                s.create(&handle, b"pwned", 0o644, NOBODY, true)
                    .await
                    .is_err()
            );
            assert!(s.mkdir(&handle, b"pwned", 0o755, NOBODY).await.is_err());
            assert!(s.remove(&handle, b"secret").await.is_err());
        }
        let up = Handle(b"../outside/secret".to_vec().into_boxed_slice());
        assert!(s.write(&up, 0, b"PWNED").await.is_err());
        assert!(
            s.setattr(
                &up,
                &SetAttr {
                    perm: Some(0o777),
                    ..SetAttr::default()
                }
            )
            .await
            .is_err()
        );
        assert_eq!(std::fs::read(outside.join("secret")).unwrap(), b"secret");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
    }
}

async fn a_read_only_source_refuses_with_erofs(backend: Backend) {
    // A tmpfs populated read-write, then made read-only (local) or exported read-only (NFS).
    let tmpfs = Tmpfs::mount("size=4m,mode=0755");
    std::fs::write(tmpfs.path().join("file"), b"read only").unwrap();
    std::fs::create_dir(tmpfs.path().join("dir")).unwrap();
    if backend == Backend::Local {
        tmpfs.remount("ro");
    }
    let mut f = Fixture::on(
        backend,
        tmpfs.path(),
        Serve::ReadOnly,
        Duration::from_secs(10),
    )
    .await;
    let s = &*f.source;
    let file = f.lookup("file").await;
    let dir = f.lookup("dir").await;
    assert_eq!(errno(s.write(&file, 0, b"x").await), libc::EROFS);
    assert_eq!(
        errno(s.create(&f.root, b"new", 0o644, NOBODY, true).await),
        libc::EROFS
    );
    assert_eq!(
        errno(s.create(&f.root, b"new", 0o644, NOBODY, false).await),
        libc::EROFS
    );
    assert_eq!(
        errno(s.mkdir(&f.root, b"new", 0o755, NOBODY).await),
        libc::EROFS
    );
    assert_eq!(
        errno(s.symlink(&f.root, b"new", b"t", NOBODY).await),
        libc::EROFS
    );
    assert_eq!(errno(s.remove(&f.root, b"file").await), libc::EROFS);
    assert_eq!(errno(s.rmdir(&f.root, b"dir").await), libc::EROFS);
    assert_eq!(
        errno(s.rename(&f.root, b"file", &dir, b"moved").await),
        libc::EROFS
    );
    for changes in [
        SetAttr {
            size: Some(0),
            ..SetAttr::default()
        },
        SetAttr {
            perm: Some(0o600),
            ..SetAttr::default()
        },
        SetAttr {
            uid: Some(65534),
            ..SetAttr::default()
        },
        SetAttr {
            mtime: Some(SetTime::Now),
            ..SetAttr::default()
        },
    ] {
        assert_eq!(
            errno(s.setattr(&file, &changes).await),
            libc::EROFS,
            "{changes:?}"
        );
    }
    // Nothing changed on the source.
    assert_eq!(std::fs::read(f.at("file")).unwrap(), b"read only");
    assert_eq!(meta(&f.at("file")).mode() & 0o7777, 0o644);
    assert!(f.at("dir").is_dir());
    assert_eq!(std::fs::read_dir(&f.dir).unwrap().count(), 2);
    f._tmpfs = Some(tmpfs);
}

async fn a_full_source_reports_enospc(backend: Backend) {
    let tmpfs = Tmpfs::mount("size=4m,mode=0755");
    let mut f = Fixture::on(
        backend,
        tmpfs.path(),
        Serve::ReadWrite,
        Duration::from_secs(10),
    )
    .await;
    let s = &*f.source;
    let (file, _) = s
        .create(&f.root, b"filler", 0o644, NOBODY, true)
        .await
        .unwrap();
    let chunk = pattern(1 << 20, 2);
    let mut offset = 0u64;
    let failure = loop {
        match s.write(&file, offset, &chunk).await {
            Ok(_) => offset += chunk.len() as u64,
            Err(e) => break e,
        }
        assert!(offset <= 8 << 20, "8 MiB written to a 4 MiB tmpfs");
    };
    assert_eq!(failure.errno(), libc::ENOSPC, "{failure}");
    assert!(offset >= 2 << 20, "only {offset} bytes fitted");
    // What was written before is there; removing the file frees the space.
    assert!(meta(&f.at("filler")).len() >= offset);
    s.remove(&f.root, b"filler").await.unwrap();
    let (again, _) = s
        .create(&f.root, b"again", 0o644, NOBODY, true)
        .await
        .unwrap();
    s.write(&again, 0, &chunk).await.unwrap();
    s.commit(&again).await.unwrap();
    assert_eq!(std::fs::read(f.at("again")).unwrap(), chunk);
    f._tmpfs = Some(tmpfs);
}

// ---------------------------------------------------------------------------------------------
// NFS only.

/// A server that goes away makes the next write fail, never hang: at the timeout when it does
/// not answer (paused), at once when it refuses connections (stopped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nfs_a_server_gone_mid_way_fails_the_next_write() {
    let temp = tempfile::tempdir().unwrap();
    let timeout = Duration::from_secs(2);
    let mut f = Fixture::on(Backend::Nfs, temp.path(), Serve::ReadWrite, timeout).await;
    let file = f.new_file(b"f").await;
    f.source.write(&file, 0, b"before").await.unwrap();

    tokio::task::block_in_place(|| f.server.as_mut().unwrap().pause());
    let started = Instant::now();
    let err = f.source.write(&file, 6, b" paused").await.unwrap_err();
    assert!(matches!(err, SourceError::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() < timeout + Duration::from_secs(2));
    tokio::task::block_in_place(|| f.server.as_mut().unwrap().resume());
    f.source.write(&file, 6, b" resumed").await.unwrap();
    f.source.commit(&file).await.unwrap();

    tokio::task::block_in_place(|| f.server.as_mut().unwrap().stop());
    let started = Instant::now();
    let err = f.source.write(&file, 0, b"after").await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert_eq!(err.errno(), libc::EIO);
    assert!(started.elapsed() < timeout + Duration::from_secs(2));
    let started = Instant::now();
    assert!(f.source.commit(&file).await.unwrap_err().is_unavailable());
    assert!(
        f.source
            .create(&f.root, b"g", 0o644, NOBODY, true)
            .await
            .unwrap_err()
            .is_unavailable()
    );
    assert!(started.elapsed() < 2 * timeout);
    assert_eq!(
        std::fs::read(temp.path().join("f")).unwrap(),
        b"before resumed"
    );
}

/// `write_sent` returns once the WRITE is on the wire: a frozen server does not hold it up, and
/// its silence reaches the caller through the outcome (a timeout), not the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nfs_write_sent_returns_once_sent_and_the_outcome_lands_later() {
    let temp = tempfile::tempdir().unwrap();
    let timeout = Duration::from_secs(2);
    let mut f = Fixture::on(Backend::Nfs, temp.path(), Serve::ReadWrite, timeout).await;
    let file = f.new_file(b"f").await;
    match f.source.write_sent(&file, 0, b"landed".to_vec()).await {
        Ok(Landing::InFlight(outcome)) => {
            outcome.await.unwrap();
        }
        Ok(Landing::Landed(_)) => {}
        Err(e) => panic!("write_sent: {e}"),
    }
    assert_eq!(std::fs::read(temp.path().join("f")).unwrap(), b"landed");

    tokio::task::block_in_place(|| f.server.as_mut().unwrap().pause());
    let started = Instant::now();
    let sent = f.source.write_sent(&file, 6, b" lost".to_vec()).await;
    let took = started.elapsed();
    let Ok(Landing::InFlight(outcome)) = sent else {
        panic!("a WRITE to a frozen server was not answered once sent");
    };
    assert!(took < Duration::from_secs(1), "write_sent waited {took:?}");
    let err = outcome.await.unwrap_err();
    assert!(matches!(err, SourceError::Timeout { .. }), "{err:?}");
    tokio::task::block_in_place(|| f.server.as_mut().unwrap().resume());
    f.source.commit(&file).await.unwrap();
}

/// A server restart between the unstable writes and the COMMIT changes the write verifier: the
/// data may be lost, and commit says so (EIO) instead of claiming durability. Once reported, the
/// next writes and commit work normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nfs_commit_reports_a_server_restart_since_the_writes() {
    let temp = tempfile::tempdir().unwrap();
    let mut f = Fixture::on(
        Backend::Nfs,
        temp.path(),
        Serve::ReadWrite,
        Duration::from_secs(10),
    )
    .await;
    let file = f.new_file(b"f").await;
    let (other, _) = f
        .source
        .create(&f.root, b"other", 0o644, NOBODY, true)
        .await
        .unwrap();

    // Restart between the writes and the commit.
    f.source.write(&file, 0, b"unstable").await.unwrap();
    f.source.write(&other, 0, b"committed").await.unwrap();
    f.source.commit(&other).await.unwrap();
    restart_in_a_new_second(f.server.as_mut().unwrap());
    let err = f.source.commit(&file).await.unwrap_err();
    assert_eq!(err.errno(), libc::EIO, "{err}");
    assert!(err.to_string().contains("verifier"), "{err}");
    // `other` was committed before the restart: nothing to report.
    f.source.commit(&other).await.unwrap();
    // Reported once: new writes and their commit are fine.
    f.source.write(&file, 0, b"again").await.unwrap();
    f.source.commit(&file).await.unwrap();

    // Restart between two writes, then commit: the first write may be lost.
    f.source.write(&file, 0, b"first").await.unwrap();
    restart_in_a_new_second(f.server.as_mut().unwrap());
    f.source.write(&file, 5, b"second").await.unwrap();
    assert_eq!(f.source.commit(&file).await.unwrap_err().errno(), libc::EIO);
    f.source.commit(&file).await.unwrap();
}

/// Ganesha's write verifier is its start time in whole seconds, and it restarts in well under a
/// second here: a restart within the second of the previous start keeps the verifier.
fn restart_in_a_new_second(server: &mut Ganesha) {
    tokio::task::block_in_place(|| {
        std::thread::sleep(Duration::from_millis(1100));
        server.restart();
    });
}

// ---------------------------------------------------------------------------------------------
// Lost replies: a proxy in front of the server that, when armed, lets a call through and then
// closes the connection instead of passing the reply on. The source retries on a fresh
// connection and meets the effect of its first attempt.

/// Forwards the MOUNT and NFS services of a server from two loopback ports.
struct LossyProxy {
    mount_port: u16,
    nfs_port: u16,
    drop_next_reply: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: tokio::task::JoinSet<()>,
}

impl LossyProxy {
    async fn start(server: std::net::IpAddr) -> LossyProxy {
        use std::sync::Arc;
        use std::sync::atomic::AtomicBool;
        let drop_next_reply = Arc::new(AtomicBool::new(false));
        let mut tasks = tokio::task::JoinSet::new();
        let mut ports = Vec::new();
        for (upstream, lossy) in [
            (common::ganesha::MOUNT_PORT, false),
            (common::ganesha::NFS_PORT, true),
        ] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            ports.push(listener.local_addr().unwrap().port());
            let armed = drop_next_reply.clone();
            tasks.spawn(async move {
                let mut connections = tokio::task::JoinSet::new();
                while let Ok((client, _)) = listener.accept().await {
                    let armed = lossy.then(|| armed.clone());
                    connections.spawn(async move {
                        let Ok(upstream) = tokio::net::TcpStream::connect((server, upstream)).await
                        else {
                            return;
                        };
                        relay(client, upstream, armed).await;
                    });
                }
            });
        }
        LossyProxy {
            mount_port: ports[0],
            nfs_port: ports[1],
            drop_next_reply,
            tasks,
        }
    }

    fn url(&self, path: &Path) -> String {
        format!(
            "nfs://127.0.0.1{}?nfsport={}&mountport={}",
            path.display(),
            self.nfs_port,
            self.mount_port
        )
    }

    /// The next reply on any NFS connection is swallowed and its connection closed.
    fn lose_next_reply(&self) {
        self.drop_next_reply
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn armed(&self) -> bool {
        self.drop_next_reply
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

/// Copies calls to the server as they come, and replies back record by record (RFC 5531 record
/// marking), unless `armed` says to lose one.
async fn relay(
    client: tokio::net::TcpStream,
    upstream: tokio::net::TcpStream,
    armed: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let calls = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut upstream_write).await;
    });
    loop {
        let mut header = [0u8; 4];
        if upstream_read.read_exact(&mut header).await.is_err() {
            break;
        }
        let word = u32::from_be_bytes(header);
        let mut body = vec![0u8; (word & 0x7fff_ffff) as usize];
        if upstream_read.read_exact(&mut body).await.is_err() {
            break;
        }
        let last = word & 0x8000_0000 != 0;
        if last
            && armed
                .as_ref()
                .is_some_and(|a| a.swap(false, std::sync::atomic::Ordering::SeqCst))
        {
            break; // the reply is lost with the connection
        }
        if client_write.write_all(&header).await.is_err()
            || client_write.write_all(&body).await.is_err()
        {
            break;
        }
    }
    calls.abort();
    let _ = client_write.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nfs_a_lost_reply_to_a_non_idempotent_call_is_recognised_on_the_retry() {
    let temp = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(temp.path()).unwrap();
    let server = Ganesha::start(&dir);
    let proxy = LossyProxy::start(server.host()).await;
    let Ok(SourceSpec::Nfs(spec)) = proxy.url(&dir).parse::<SourceSpec>() else {
        panic!("bad URL");
    };
    // One connection: every call reuses it, so a lost reply is followed by a retry.
    let source = NfsSource::connect(
        &spec,
        &SourceOptions {
            timeout: Duration::from_secs(10),
            connections: 1,
        },
    )
    .await
    .unwrap();
    let s: &dyn Source = &source;
    let (root, _) = s.root().await.unwrap();

    // Each call is carried out by the server, its reply lost, and the retry answered with
    // EXIST or NOENT: the call still succeeds.
    proxy.lose_next_reply();
    let (file, attr) = s.create(&root, b"f", 0o640, NOBODY, true).await.unwrap();
    assert!(!proxy.armed(), "the reply was not lost");
    assert_eq!((attr.kind, attr.perm, attr.uid), (Kind::File, 0o640, 65534));
    assert_owned_by_nobody(&dir.join("f"));

    proxy.lose_next_reply();
    s.write(&file, 0, b"written once").await.unwrap();
    assert_eq!(std::fs::read(dir.join("f")).unwrap(), b"written once");

    proxy.lose_next_reply();
    let (_, attr) = s.mkdir(&root, b"d", 0o750, NOBODY).await.unwrap();
    assert_eq!(
        (attr.kind, attr.perm, attr.uid),
        (Kind::Directory, 0o750, 65534)
    );
    assert!(meta(&dir.join("d")).is_dir());

    proxy.lose_next_reply();
    let (_, attr) = s
        .symlink(&root, b"l", b"some/target", NOBODY)
        .await
        .unwrap();
    assert_eq!(attr.kind, Kind::Symlink);
    assert_eq!(
        std::fs::read_link(dir.join("l")).unwrap(),
        Path::new("some/target")
    );

    proxy.lose_next_reply();
    s.rename(&root, b"f", &root, b"g").await.unwrap();
    assert!(!dir.join("f").exists());
    assert_eq!(std::fs::read(dir.join("g")).unwrap(), b"written once");

    proxy.lose_next_reply();
    s.remove(&root, b"g").await.unwrap();
    assert!(!dir.join("g").exists());

    proxy.lose_next_reply();
    s.rmdir(&root, b"d").await.unwrap();
    assert!(!dir.join("d").exists());

    // A name that existed before, and is not what we would have made, is still EEXIST after a
    // lost reply; a symlink with another target too.
    std::fs::write(dir.join("theirs"), b"theirs").unwrap();
    set_owner(&dir.join("theirs"), 1000, 1000);
    proxy.lose_next_reply();
    assert_eq!(
        errno(s.create(&root, b"theirs", 0o640, NOBODY, true).await),
        libc::EEXIST
    );
    assert_eq!(meta(&dir.join("theirs")).uid(), 1000);
    proxy.lose_next_reply();
    assert_eq!(
        errno(s.symlink(&root, b"l", b"another/target", NOBODY).await),
        libc::EEXIST
    );
    // A missing name is still ENOENT when nothing was lost.
    assert_eq!(errno(s.remove(&root, b"never").await), libc::ENOENT);
    drop(source);
    drop(proxy);
    drop(server);
}

// ---------------------------------------------------------------------------------------------
// Benchmark: `cargo test --release --test source_writes -- --ignored --nocapture throughput`.

/// Sequential write throughput, side by side on this machine: NfsSource::write in 1 MiB pieces
/// (one at a time, then 4 in flight, then 16 MiB calls split over the pool) against libnfs'
/// `nfs-cp` of a local file to the same export; LocalSource::write against plain `write(2)`.
/// Each figure includes the commit (COMMIT / fsync) at the end, shown separately too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn throughput() {
    const SIZE: usize = 1 << 30;
    const PIECE: usize = 1 << 20;
    let temp = tempfile::tempdir().unwrap();
    let export = temp.path().join("export");
    std::fs::create_dir(&export).unwrap();
    let data = pattern(16 << 20, 3);
    let input = temp.path().join("input.bin");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&input).unwrap();
        for _ in 0..SIZE / data.len() {
            file.write_all(&data).unwrap();
        }
        file.sync_all().unwrap();
    }
    let mib_s = |elapsed: Duration| SIZE as f64 / (1 << 20) as f64 / elapsed.as_secs_f64();
    let report = |what: &str, written: Duration, total: Duration| {
        eprintln!(
            "{what:<58} {:>6.0} MiB/s   (writes {:>5.2} s, commit {:>5.2} s)",
            mib_s(total),
            written.as_secs_f64(),
            (total - written).as_secs_f64()
        );
    };
    let server = Ganesha::start(&export);
    let options = SourceOptions {
        timeout: Duration::from_secs(60),
        connections: 16,
    };
    let Ok(SourceSpec::Nfs(spec)) = server.url_with_ports(&export).parse::<SourceSpec>() else {
        panic!("bad URL");
    };
    let nfs = NfsSource::connect(&spec, &options).await.unwrap();
    let local = LocalSource::open(&export, &options).await.unwrap();
    let (root, _) = nfs.root().await.unwrap();
    eprintln!(
        "ganesha: wtmax {} KiB, WRITE pieces of {} KiB",
        nfs.wtmax() >> 10,
        nfs.write_size() >> 10
    );
    for round in 0..2 {
        eprintln!("--- round {round}");
        // Files are removed through the source: ganesha caches directory entries, and one
        // removed behind its back would still be there for a while.
        let cp = format!("cp-{round}.bin");
        sync_and_drop_caches();
        std::fs::read(&input).unwrap(); // nfs-cp reads a warm file, as the others write memory
        let started = Instant::now();
        let status = Command::new("nfs-cp")
            .arg(&input)
            .arg(format!("{}/{cp}", server.url(&export)))
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let elapsed = started.elapsed();
        report("nfs-cp local file -> export", elapsed, elapsed);
        assert_eq!(meta(&export.join(&cp)).len(), SIZE as u64);
        nfs.remove(&root, cp.as_bytes()).await.unwrap();

        for (what, depth, call) in [
            ("NfsSource::write, 1 MiB calls, 1 in flight", 1, PIECE),
            ("NfsSource::write, 1 MiB calls, 4 in flight", 4, PIECE),
            (
                "NfsSource::write, 16 MiB calls (split), 1 in flight",
                1,
                16 * PIECE,
            ),
        ] {
            let name = format!("nfs-{round}-{depth}-{call}.bin");
            let (file, _) = nfs
                .create(&root, name.as_bytes(), 0o644, NOBODY, true)
                .await
                .unwrap();
            sync_and_drop_caches();
            let (written, total) = write_sequentially(&nfs, &file, &data, SIZE, call, depth).await;
            report(what, written, total);
            assert_eq!(meta(&export.join(&name)).len(), SIZE as u64);
            nfs.remove(&root, name.as_bytes()).await.unwrap();
        }

        let (file, _) = local
            .create(&Handle(Box::default()), b"local.bin", 0o644, NOBODY, true)
            .await
            .unwrap();
        sync_and_drop_caches();
        let (written, total) = write_sequentially(&local, &file, &data, SIZE, PIECE, 1).await;
        report(
            "LocalSource::write, 1 MiB calls, 1 in flight",
            written,
            total,
        );
        std::fs::remove_file(export.join("local.bin")).unwrap();

        sync_and_drop_caches();
        let started = Instant::now();
        let direct = tokio::task::block_in_place(|| {
            use std::io::Write;
            let mut file = std::fs::File::create(export.join("direct.bin")).unwrap();
            for i in 0..SIZE / PIECE {
                let at = i * PIECE % data.len();
                file.write_all(&data[at..at + PIECE]).unwrap();
            }
            let written = started.elapsed();
            file.sync_all().unwrap();
            written
        });
        report(
            "write(2) 1 MiB + fsync, same directory",
            direct,
            started.elapsed(),
        );
        std::fs::remove_file(export.join("direct.bin")).unwrap();
    }
}

/// Writes `size` bytes (cycling through `data`) in calls of `call` bytes, `depth` in flight, then
/// commits; returns the time of the writes and the total.
async fn write_sequentially(
    source: &dyn Source,
    file: &Handle,
    data: &[u8],
    size: usize,
    call: usize,
    depth: usize,
) -> (Duration, Duration) {
    use futures_util::StreamExt;
    let started = Instant::now();
    let calls = futures_util::stream::iter((0..size / call).map(|i| {
        let at = i * call % data.len();
        source.write(file, (i * call) as u64, &data[at..at + call])
    }));
    let mut results = calls.buffer_unordered(depth);
    while let Some(result) = results.next().await {
        result.unwrap();
    }
    let written = started.elapsed();
    source.commit(file).await.unwrap();
    (written, started.elapsed())
}

fn sync_and_drop_caches() {
    run("sync", &[]);
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

//! Read-write volumes (`reservoir mount --read-write`) over both source kinds: every change
//! reaches the source, reads see the latest writes, and the cache never serves stale bytes.

mod common;

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt, symlink};
use std::path::Path;
use std::time::Duration;

use common::data::{describe_tree, sha256_file, write_random_file};
use common::ganesha::Ganesha;
use common::mount::{Dirs, Mount, wait_until};

const RW: [&str; 5] = [
    "--read-write",
    "--cache-size",
    "512Mi",
    "--metadata-ttl",
    "1s",
];

fn errno<T: std::fmt::Debug>(result: std::io::Result<T>) -> i32 {
    result
        .expect_err("expected an error")
        .raw_os_error()
        .unwrap_or(0)
}

/// Runs a shell command as `nobody` (uid/gid 65534).
fn sh_as_nobody(script: &str) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "sh",
            "-c",
            script,
        ])
        .output()
        .unwrap()
}

/// Every operation, checked on the source itself.
fn exercise(mnt: &Path, src: &Path) {
    // create, write at offsets, append, sparse write past the end
    let mut f = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(mnt.join("a"))
        .unwrap();
    f.write_all(b"hello world").unwrap();
    f.seek(SeekFrom::Start(6)).unwrap();
    f.write_all(b"WORLD").unwrap();
    f.seek(SeekFrom::End(0)).unwrap();
    f.write_all(b"!").unwrap();
    f.seek(SeekFrom::Start(100)).unwrap();
    f.write_all(b"sparse").unwrap();
    f.sync_all().unwrap();
    // Reads through the same handle see the writes.
    let mut back = Vec::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut back).unwrap();
    drop(f);
    let mut expected = b"hello WORLD!".to_vec();
    expected.resize(100, 0);
    expected.extend_from_slice(b"sparse");
    assert_eq!(back, expected);
    assert_eq!(
        fs::read(src.join("a")).unwrap(),
        expected,
        "source after writes"
    );
    assert_eq!(
        fs::read(mnt.join("a")).unwrap(),
        expected,
        "mount after writes"
    );

    // append mode
    let mut f = OpenOptions::new().append(true).open(mnt.join("a")).unwrap();
    f.write_all(b"+tail").unwrap();
    drop(f);
    expected.extend_from_slice(b"+tail");
    assert_eq!(fs::read(src.join("a")).unwrap(), expected);

    // exclusive create of an existing name
    assert_eq!(
        errno(
            OpenOptions::new()
                .create_new(true)
                .write(true)
                .open(mnt.join("a"))
        ),
        libc::EEXIST
    );

    // truncate down and up
    let f = OpenOptions::new().write(true).open(mnt.join("a")).unwrap();
    f.set_len(5).unwrap();
    drop(f);
    assert_eq!(fs::read(src.join("a")).unwrap(), b"hello");
    OpenOptions::new()
        .write(true)
        .open(mnt.join("a"))
        .unwrap()
        .set_len(8)
        .unwrap();
    assert_eq!(fs::read(src.join("a")).unwrap(), b"hello\0\0\0");
    assert_eq!(fs::read(mnt.join("a")).unwrap(), b"hello\0\0\0");
    // O_TRUNC
    fs::write(mnt.join("a"), b"rewritten").unwrap();
    assert_eq!(fs::read(src.join("a")).unwrap(), b"rewritten");

    // directories
    fs::create_dir(mnt.join("d")).unwrap();
    fs::create_dir(mnt.join("d/e")).unwrap();
    fs::write(mnt.join("d/e/f"), b"in a subdir").unwrap();
    assert!(src.join("d/e").is_dir());
    assert_eq!(errno(fs::remove_dir(mnt.join("d/e"))), libc::ENOTEMPTY);
    fs::remove_file(mnt.join("d/e/f")).unwrap();
    assert!(!src.join("d/e/f").exists());
    fs::remove_dir(mnt.join("d/e")).unwrap();
    assert!(!src.join("d/e").exists());
    assert_eq!(errno(fs::remove_file(mnt.join("missing"))), libc::ENOENT);

    // rename: plain, across directories, over an existing file, a directory with contents
    fs::rename(mnt.join("a"), mnt.join("b")).unwrap();
    assert!(!src.join("a").exists());
    assert_eq!(fs::read(src.join("b")).unwrap(), b"rewritten");
    fs::rename(mnt.join("b"), mnt.join("d/b")).unwrap();
    assert_eq!(fs::read(mnt.join("d/b")).unwrap(), b"rewritten");
    fs::write(mnt.join("c"), b"to be replaced").unwrap();
    fs::rename(mnt.join("d/b"), mnt.join("c")).unwrap();
    assert_eq!(fs::read(src.join("c")).unwrap(), b"rewritten");
    assert_eq!(fs::read(mnt.join("c")).unwrap(), b"rewritten");
    fs::create_dir_all(mnt.join("d/sub")).unwrap();
    fs::write(mnt.join("d/sub/deep"), b"deep").unwrap();
    fs::rename(mnt.join("d"), mnt.join("moved")).unwrap();
    assert_eq!(fs::read(mnt.join("moved/sub/deep")).unwrap(), b"deep");
    fs::write(mnt.join("moved/sub/deep"), b"deeper").unwrap();
    assert_eq!(fs::read(src.join("moved/sub/deep")).unwrap(), b"deeper");

    // symlink, kept verbatim
    symlink("../elsewhere/target", mnt.join("link")).unwrap();
    assert_eq!(
        fs::read_link(src.join("link")).unwrap(),
        Path::new("../elsewhere/target")
    );
    assert_eq!(
        fs::read_link(mnt.join("link")).unwrap(),
        Path::new("../elsewhere/target")
    );

    // chmod, chown, utimes
    fs::set_permissions(mnt.join("c"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(src.join("c")).unwrap().mode() & 0o7777, 0o640);
    std::os::unix::fs::chown(mnt.join("c"), Some(1234), Some(5678)).unwrap();
    let meta = fs::metadata(src.join("c")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1234, 5678));
    let when = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    fs::File::options()
        .write(true)
        .open(mnt.join("c"))
        .unwrap()
        .set_modified(when)
        .unwrap();
    assert_eq!(fs::metadata(src.join("c")).unwrap().mtime(), 1_000_000_000);
    assert_eq!(fs::metadata(mnt.join("c")).unwrap().mtime(), 1_000_000_000);

    // non-root: new objects belong to the caller; permissions hold
    fs::create_dir(mnt.join("shared")).unwrap();
    std::os::unix::fs::chown(mnt.join("shared"), Some(65534), Some(65534)).unwrap();
    let out = sh_as_nobody(&format!(
        "echo mine > {0}/shared/by-nobody && mkdir {0}/shared/dir-by-nobody",
        mnt.display()
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["by-nobody", "dir-by-nobody"] {
        let meta = fs::metadata(src.join("shared").join(name)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534), "{name}");
    }
    let out = sh_as_nobody(&format!("echo no > {}/not-yours", mnt.display()));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    assert!(!src.join("not-yours").exists());
    let out = sh_as_nobody(&format!("echo no >> {}/c", mnt.display()));
    assert!(!out.status.success(), "nobody appended to a 0640 root file");
}

fn check_matrix(dirs: &Dirs, source: &str, src: &Path) {
    {
        let _mount = Mount::start(dirs, source, &RW);
        exercise(&dirs.mnt, src);
    }
    // A fresh mount over the same cache directory shows exactly the source.
    let _mount = Mount::start(dirs, source, &RW);
    assert_eq!(describe_tree(&dirs.mnt), describe_tree(src));
}

#[test]
fn every_operation_reaches_a_directory_source() {
    let dirs = Dirs::new();
    let src = dirs.path("src");
    fs::create_dir(&src).unwrap();
    check_matrix(&dirs, src.to_str().unwrap(), &src);
}

#[test]
fn every_operation_reaches_an_nfs_source() {
    let dirs = Dirs::new();
    let src = dirs.path("export");
    fs::create_dir(&src).unwrap();
    let server = Ganesha::start(&src);
    let url = server.url_with_ports(&server.exports()[0]);
    check_matrix(&dirs, &url, &src);
}

fn overwrite_cases(dirs: &Dirs, source: &str, src: &Path) {
    write_random_file(&src.join("data"), 3 << 20, 7);
    let _mount = Mount::start(dirs, source, &RW);
    // Cache it completely (the second open is passthrough).
    assert_eq!(
        sha256_file(&dirs.mnt.join("data")),
        sha256_file(&src.join("data"))
    );
    assert_eq!(
        sha256_file(&dirs.mnt.join("data")),
        sha256_file(&src.join("data"))
    );

    // Through the mount: both the mount and the source show the new bytes at once.
    let mut f = OpenOptions::new()
        .write(true)
        .open(dirs.mnt.join("data"))
        .unwrap();
    f.seek(SeekFrom::Start(1 << 20)).unwrap();
    f.write_all(&[0xab; 4096]).unwrap();
    drop(f);
    let on_source = fs::read(src.join("data")).unwrap();
    assert_eq!(&on_source[1 << 20..(1 << 20) + 4096], &[0xab; 4096]);
    assert_eq!(fs::read(dirs.mnt.join("data")).unwrap(), on_source);
    assert_eq!(
        fs::read(dirs.mnt.join("data")).unwrap(),
        on_source,
        "second read (cached again)"
    );

    // Directly on the source: visible through the mount once the TTL has passed.
    let mut f = OpenOptions::new()
        .write(true)
        .open(src.join("data"))
        .unwrap();
    f.write_all(&[0xcd; 100]).unwrap();
    drop(f);
    std::thread::sleep(Duration::from_millis(1500));
    let now = fs::read(src.join("data")).unwrap();
    assert_eq!(
        &fs::read(dirs.mnt.join("data")).unwrap()[..100],
        &[0xcd; 100]
    );
    assert_eq!(fs::read(dirs.mnt.join("data")).unwrap(), now);
}

#[test]
fn overwrites_are_seen_through_the_mount_and_from_the_source() {
    let dirs = Dirs::new();
    let src = dirs.path("src");
    fs::create_dir(&src).unwrap();
    overwrite_cases(&dirs, src.to_str().unwrap(), &src);

    let dirs = Dirs::new();
    let src = dirs.path("export");
    fs::create_dir(&src).unwrap();
    let server = Ganesha::start(&src);
    overwrite_cases(&dirs, &server.url_with_ports(&server.exports()[0]), &src);
}

fn checkpoint(mnt: &Path) -> String {
    let tmp = mnt.join("ckpt/step-100.tmp");
    fs::create_dir_all(mnt.join("ckpt")).unwrap();
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .custom_flags(0)
        .open(&tmp)
        .unwrap();
    let mut rng = fastrand::Rng::with_seed(99);
    let mut chunk = vec![0u8; 4 << 20];
    for _ in 0..64 {
        rng.fill(&mut chunk);
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    fs::rename(&tmp, mnt.join("ckpt/step-100")).unwrap();
    sha256_file(&mnt.join("ckpt/step-100"))
}

#[test]
fn a_checkpoint_is_written_renamed_and_read_back() {
    let dirs = Dirs::new();
    let src = dirs.path("export");
    fs::create_dir(&src).unwrap();
    let server = Ganesha::start(&src);
    let _mount = Mount::start(&dirs, &server.url_with_ports(&server.exports()[0]), &RW);
    let digest = checkpoint(&dirs.mnt);
    assert_eq!(
        fs::metadata(src.join("ckpt/step-100")).unwrap().len(),
        256 << 20
    );
    assert_eq!(sha256_file(&src.join("ckpt/step-100")), digest);
    assert!(!src.join("ckpt/step-100.tmp").exists());
}

#[test]
fn a_writer_cannot_open_what_is_read_through_passthrough() {
    let dirs = Dirs::new();
    let src = dirs.path("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"0123456789").unwrap();
    let _mount = Mount::start(&dirs, src.to_str().unwrap(), &RW);
    assert_eq!(fs::read(dirs.mnt.join("f")).unwrap(), b"0123456789");
    // Cache writes follow the reads that fetched the bytes; passthrough needs them done.
    wait_until("f is cached", Duration::from_secs(10), || {
        dirs.status()["cache"]["complete_files"] == 1
    });
    let reader = fs::File::open(dirs.mnt.join("f")).unwrap();
    assert_eq!(
        errno(OpenOptions::new().write(true).open(dirs.mnt.join("f"))),
        libc::ETXTBSY
    );
    drop(reader);
    fs::write(dirs.mnt.join("f"), b"changed").unwrap();
    assert_eq!(fs::read(src.join("f")).unwrap(), b"changed");
}

#[test]
fn faults_reach_the_caller_and_leave_the_cache_honest() {
    // A full source.
    let dirs = Dirs::new();
    let src = dirs.path("small");
    fs::create_dir(&src).unwrap();
    assert!(
        std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
            .arg(&src)
            .status()
            .unwrap()
            .success()
    );
    let _unmount = Unmount(src.clone());
    {
        let _mount = Mount::start(&dirs, src.to_str().unwrap(), &RW);
        let mut f = fs::File::create(dirs.mnt.join("big")).unwrap();
        let result = (0..8).try_for_each(|_| f.write_all(&[1u8; 1 << 20]));
        assert_eq!(errno(result), libc::ENOSPC);
    }

    // A read-only export, and the server going away in the middle of writing.
    let dirs = Dirs::new();
    let export = dirs.path("export");
    fs::create_dir(&export).unwrap();
    fs::write(export.join("existing"), b"old").unwrap();
    let ro = Ganesha::start_read_only(&export);
    {
        let _mount = Mount::start(&dirs, &ro.url_with_ports(&ro.exports()[0]), &RW);
        assert_eq!(errno(fs::write(dirs.mnt.join("new"), b"x")), libc::EROFS);
        assert_eq!(
            errno(fs::write(dirs.mnt.join("existing"), b"x")),
            libc::EROFS
        );
        assert_eq!(fs::read(dirs.mnt.join("existing")).unwrap(), b"old");
    }
    drop(ro);

    let dirs = Dirs::new();
    let mut server = Ganesha::start(&export);
    let url = server.url_with_ports(&server.exports()[0]);
    let mut args = RW.to_vec();
    args.extend(["--source-timeout", "2s"]);
    {
        let _mount = Mount::start(&dirs, &url, &args);
        let mut f = fs::File::create(dirs.mnt.join("partial")).unwrap();
        f.write_all(&[7u8; 1 << 20]).unwrap();
        server.stop();
        let result = f.write_all(&[8u8; 1 << 20]).and_then(|()| f.sync_all());
        assert!(result.is_err(), "a write to a stopped server succeeded");
        drop(f);
        server.restart();
    }
    // Only what the source accepted is there, and a fresh mount shows exactly that.
    let on_source = fs::read(export.join("partial")).unwrap();
    assert!(
        on_source.iter().all(|&b| b == 7),
        "bytes the source never accepted appeared"
    );
    let _mount = Mount::start(&dirs, &url, &RW);
    assert_eq!(fs::read(dirs.mnt.join("partial")).unwrap(), on_source);
}

#[test]
fn read_write_and_an_immutable_dataset_are_refused_together() {
    let dirs = Dirs::new();
    let src = dirs.path("src");
    fs::create_dir(&src).unwrap();
    let err = Mount::try_start(
        &dirs,
        src.to_str().unwrap(),
        &["--read-write", "--metadata-ttl", "forever"],
    )
    .err()
    .expect("mounted");
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert!(
        stderr.contains("--read-write cannot be combined with --metadata-ttl forever"),
        "{stderr}"
    );
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// On NFS a write is answered once its WRITE is sent; a failure that comes after that is
/// returned by the file's next fsync (or write, or close), never lost.
#[test]
fn a_late_nfs_write_failure_is_reported_at_fsync() {
    let dirs = Dirs::new();
    let export = dirs.path("export");
    fs::create_dir(&export).unwrap();
    let mut server = Ganesha::start(&export);
    let url = server.url_with_ports(&server.exports()[0]);
    let mut args = RW.to_vec();
    args.extend(["--source-timeout", "2s"]);
    let _mount = Mount::start(&dirs, &url, &args);
    let mut f = fs::File::create(dirs.mnt.join("late")).unwrap();
    f.write_all(&[1u8; 1 << 20]).unwrap();
    f.sync_all().unwrap();

    // A frozen server keeps its connections open: a small WRITE fits in the socket buffers
    // and is sent, but is never answered.
    server.pause();
    let started = std::time::Instant::now();
    let written = f.write_all(&[2u8; 64 << 10]);
    let took = started.elapsed();
    let synced = f.sync_all();
    server.resume();
    assert!(
        written.is_ok(),
        "the write was not answered once sent: {written:?}"
    );
    assert!(
        took < Duration::from_secs(1),
        "the write waited for the server ({took:?})"
    );
    assert_eq!(errno(synced), libc::EIO);
    // Reported once: the file goes on working now that the server is back.
    f.write_all(&[3u8; 4096]).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let on_source = fs::read(export.join("late")).unwrap();
    assert_eq!(&on_source[..1 << 20], &[1u8; 1 << 20][..]);
}

/// Writes to the same bytes, one after the other, end with the last one's bytes even though
/// each is answered before it lands; every read and stat in between sees what was written.
fn pipelined_stream(mnt: &Path, src: &Path) {
    const MIB: usize = 1 << 20;
    let path = mnt.join("stream");
    let mut f = fs::File::create(&path).unwrap();
    let mut reader = fs::File::open(&path).unwrap();
    let mut rng = fastrand::Rng::with_seed(5);
    let mut chunk = vec![0u8; MIB];
    let mut back = vec![0u8; MIB];
    for i in 0..32 {
        rng.fill(&mut chunk);
        f.write_all(&chunk).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            ((i + 1) * MIB) as u64,
            "size went backwards during the stream"
        );
        reader.seek(SeekFrom::Start((i * MIB) as u64)).unwrap();
        reader.read_exact(&mut back).unwrap();
        assert!(back == chunk, "chunk {i} read back differs");
    }
    // Overlapping rewrites of the start: the last one wins, on the source too.
    for round in 0..24u8 {
        f.seek(SeekFrom::Start(u64::from(round % 3) * (MIB as u64 / 2)))
            .unwrap();
        f.write_all(&vec![round; MIB]).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let mut expected = vec![0u8; 2 * MIB];
    for round in 0..24u8 {
        let at = usize::from(round % 3) * MIB / 2;
        expected[at..at + MIB].fill(round);
    }
    let on_source = fs::read(src.join("stream")).unwrap();
    assert_eq!(on_source.len(), 32 * MIB);
    assert!(
        on_source[..2 * MIB] == expected[..],
        "an older write landed last"
    );
    let mut through = vec![0u8; 2 * MIB];
    reader.seek(SeekFrom::Start(0)).unwrap();
    reader.read_exact(&mut through).unwrap();
    assert!(through == expected, "the mount shows an older write");
}

#[test]
fn pipelined_nfs_writes_keep_order_sizes_and_reads() {
    let dirs = Dirs::new();
    let export = dirs.path("export");
    fs::create_dir(&export).unwrap();
    let server = Ganesha::start(&export);
    let _mount = Mount::start(&dirs, &server.url_with_ports(&server.exports()[0]), &RW);
    pipelined_stream(&dirs.mnt, &export);
}

/// A long NFS write is committed as it goes, not only at fsync: the final fsync then finds
/// little left to flush.
#[test]
fn a_long_nfs_write_is_committed_in_the_background() {
    let dirs = Dirs::new();
    let export = dirs.path("export");
    fs::create_dir(&export).unwrap();
    let server = Ganesha::start(&export);
    let _mount = Mount::start(&dirs, &server.url_with_ports(&server.exports()[0]), &RW);
    let commits = || {
        dirs.status()["background_commits"]
            .as_u64()
            .expect("background_commits")
    };
    let chunk = vec![7u8; 1 << 20];
    let mut f = fs::File::create(dirs.mnt.join("checkpoint")).unwrap();
    for _ in 0..160 {
        f.write_all(&chunk).unwrap();
    }
    wait_until("two background commits", Duration::from_secs(30), || {
        commits() >= 2
    });
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(
        fs::metadata(export.join("checkpoint")).unwrap().len(),
        160 << 20
    );
}

#[test]
fn directory_writes_keep_order_sizes_and_reads() {
    let dirs = Dirs::new();
    let src = dirs.path("src");
    fs::create_dir(&src).unwrap();
    let _mount = Mount::start(&dirs, src.to_str().unwrap(), &RW);
    pipelined_stream(&dirs.mnt, &src);
}

/// A writer keeps writing to its file when the file is renamed meanwhile, as with an open
/// file on a local file system, on both source kinds.
fn rename_while_writing(mnt: &Path, src: &Path) {
    let mut f = fs::File::create(mnt.join("before")).unwrap();
    f.write_all(b"first ").unwrap();
    fs::rename(mnt.join("before"), mnt.join("after")).unwrap();
    f.write_all(b"second").unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(fs::read(src.join("after")).unwrap(), b"first second");
    assert!(!src.join("before").exists());
}

#[test]
fn a_renamed_file_keeps_its_writer() {
    let dirs = Dirs::new();
    let src = dirs.path("src");
    fs::create_dir(&src).unwrap();
    {
        let _mount = Mount::start(&dirs, src.to_str().unwrap(), &RW);
        rename_while_writing(&dirs.mnt, &src);
    }
    let dirs = Dirs::new();
    let export = dirs.path("export");
    fs::create_dir(&export).unwrap();
    let server = Ganesha::start(&export);
    let _mount = Mount::start(&dirs, &server.url_with_ports(&server.exports()[0]), &RW);
    rename_while_writing(&dirs.mnt, &export);
}

//! `reservoir mount` over a directory source, through real FUSE mounts.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt, symlink};
use std::path::Path;

use common::data::{describe_tree, disk_usage, sha256_file, write_random_file, write_small_tree};
use common::mount::{Dirs, Mount, as_nobody, is_mounted, signal};

fn fetched(dirs: &Dirs) -> u64 {
    dirs.status()["bytes_fetched"]
        .as_u64()
        .expect("bytes_fetched")
}

#[test]
fn a_directory_is_served_byte_for_byte_to_root_and_to_other_users() {
    let dirs = Dirs::new();
    let src = dirs.path("src");
    std::fs::create_dir(&src).unwrap();
    write_random_file(&src.join("big.bin"), 256 << 20, 1);
    let small_bytes = write_small_tree(&src.join("small"), 10_000, 100, 8192, 2);
    std::fs::write(src.join("private"), b"root only").unwrap();
    std::fs::set_permissions(src.join("private"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(src.join("empty"), b"").unwrap();
    symlink("/", src.join("to-root")).unwrap();
    symlink("../../outside", src.join("small/up")).unwrap();

    let _mount = Mount::start(&dirs, src.to_str().unwrap(), &["--cache-size", "1Gi"]);
    let expected = describe_tree(&src);
    assert_eq!(
        describe_tree(&dirs.mnt),
        expected,
        "cold read through the mount"
    );
    let cold = fetched(&dirs);
    assert!(
        cold >= (256 << 20) + small_bytes,
        "fetched only {cold} bytes cold"
    );
    assert_eq!(
        describe_tree(&dirs.mnt),
        expected,
        "warm read through the mount"
    );
    assert_eq!(
        fetched(&dirs),
        cold,
        "a warm read must not touch the source"
    );
    let status = dirs.status();
    assert!(
        status["passthrough_opens"].as_u64().unwrap() > 10_000,
        "{status}"
    );

    // Symlinks are shown as symlinks; the daemon never follows them.
    let meta = std::fs::symlink_metadata(dirs.mnt.join("to-root")).unwrap();
    assert!(meta.file_type().is_symlink());
    assert_eq!(
        std::fs::read_link(dirs.mnt.join("small/up")).unwrap(),
        Path::new("../../outside")
    );

    // Other users read what the permissions allow, and nothing else.
    let out = as_nobody("sha256sum", &[dirs.mnt.join("big.bin").as_os_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let digest = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        digest.split_whitespace().next(),
        Some(sha256_file(&src.join("big.bin")).as_str())
    );
    let out = as_nobody("cat", &[dirs.mnt.join("private").as_os_str()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    let out = as_nobody("ls", &[dirs.mnt.join("small/d07/e1").as_os_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_write_gets_erofs_and_nothing_reaches_the_source() {
    let dirs = Dirs::new();
    let src = dirs.path("src");
    std::fs::create_dir_all(src.join("dir")).unwrap();
    std::fs::write(src.join("file"), b"original").unwrap();
    let before = describe_tree(&src);
    let _mount = Mount::start(&dirs, src.to_str().unwrap(), &["--cache-size", "64Mi"]);
    let mnt = &dirs.mnt;
    let erofs = |result: std::io::Result<()>, what: &str| {
        let err = result.expect_err(what);
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{what}: {err}");
    };
    erofs(std::fs::write(mnt.join("new"), b"x"), "create");
    erofs(
        std::fs::OpenOptions::new()
            .write(true)
            .open(mnt.join("file"))
            .map(drop),
        "open for writing",
    );
    erofs(
        std::fs::OpenOptions::new()
            .read(true)
            .truncate(true)
            .write(true)
            .custom_flags(0)
            .open(mnt.join("file"))
            .map(drop),
        "truncate",
    );
    erofs(std::fs::create_dir(mnt.join("newdir")), "mkdir");
    erofs(std::fs::remove_file(mnt.join("file")), "unlink");
    erofs(std::fs::remove_dir(mnt.join("dir")), "rmdir");
    erofs(
        std::fs::rename(mnt.join("file"), mnt.join("moved")),
        "rename",
    );
    erofs(symlink("x", mnt.join("link")), "symlink");
    erofs(
        std::fs::hard_link(mnt.join("file"), mnt.join("hard")),
        "link",
    );
    erofs(
        std::fs::set_permissions(mnt.join("file"), std::fs::Permissions::from_mode(0o777)),
        "chmod",
    );
    let mut content = String::new();
    std::fs::File::open(mnt.join("file"))
        .unwrap()
        .read_to_string(&mut content)
        .unwrap();
    assert_eq!(content, "original");
    assert_eq!(describe_tree(&src), before, "the source changed");
}

#[test]
fn a_corrupted_cache_block_is_refetched_and_never_served() {
    let dirs = Dirs::new();
    let src = dirs.path("src");
    std::fs::create_dir(&src).unwrap();
    write_random_file(&src.join("data"), 8 << 20, 3);
    let expected = sha256_file(&src.join("data"));
    let args = ["--cache-size", "256Mi", "--block-size", "1Mi"];
    {
        let _mount = Mount::start(&dirs, src.to_str().unwrap(), &args);
        assert_eq!(sha256_file(&dirs.mnt.join("data")), expected);
    }
    // Flip one byte in the middle of the cached copy.
    let cached = largest_file(&dirs.cache.join("data"));
    let mut bytes = std::fs::read(&cached).unwrap();
    bytes[(5 << 20) + 123] ^= 0x5a;
    std::fs::write(&cached, &bytes).unwrap();

    let _mount = Mount::start(&dirs, src.to_str().unwrap(), &args);
    assert_eq!(
        sha256_file(&dirs.mnt.join("data")),
        expected,
        "corrupt bytes were served"
    );
    let status = dirs.status();
    assert_eq!(
        status["cache"]["verify_failures"].as_u64(),
        Some(1),
        "{status}"
    );
    assert_eq!(
        status["bytes_fetched"].as_u64(),
        Some(1 << 20),
        "only the bad block is fetched again"
    );
}

fn largest_file(dir: &Path) -> std::path::PathBuf {
    let mut best = (0, None);
    for fan in std::fs::read_dir(dir).unwrap() {
        for entry in std::fs::read_dir(fan.unwrap().path()).unwrap() {
            let entry = entry.unwrap();
            let len = entry.metadata().unwrap().len();
            if len > best.0 {
                best = (len, Some(entry.path()));
            }
        }
    }
    best.1.expect("a cached file")
}

/// Reads a file through the mount and drops its pages from the kernel's page cache, so that
/// the next read reaches the daemon again.
fn read_uncached(path: &Path) -> usize {
    let mut file = std::fs::File::open(path).unwrap();
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).unwrap();
    // SAFETY: posix_fadvise on a descriptor we own; no memory is passed.
    unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            0,
            0,
            libc::POSIX_FADV_DONTNEED,
        );
    }
    buf.len()
}

#[test]
fn the_cache_size_holds_on_disk() {
    let dirs = Dirs::new();
    let src = dirs.path("src");
    std::fs::create_dir(&src).unwrap();
    for i in 0..120 {
        write_random_file(&src.join(format!("f{i:03}")), 1 << 20, 100 + i);
    }
    let capacity: u64 = 40 << 20;
    let _mount = Mount::start(
        &dirs,
        src.to_str().unwrap(),
        &["--cache-size", "40Mi", "--block-size", "256Ki"],
    );
    for round in 0..3 {
        for i in 0..120 {
            // Later files are read more often, so that they win places in the cache.
            for _ in 0..=(i / 30 + round) {
                assert_eq!(read_uncached(&dirs.mnt.join(format!("f{i:03}"))), 1 << 20);
            }
            let used = disk_usage(&dirs.cache);
            assert!(
                used <= capacity,
                "cache directory occupies {used} bytes > {capacity}"
            );
        }
    }
    let status = dirs.status();
    let cache = &status["cache"];
    assert!(cache["used"].as_u64().unwrap() <= capacity, "{status}");
    assert!(cache["evicted_files"].as_u64().unwrap() > 0, "{status}");
    assert!(cache["files"].as_u64().unwrap() >= 25, "{status}");
}

#[test]
fn shuffled_epochs_over_twice_the_cache_still_hit_half() {
    let dirs = Dirs::new();
    let src = dirs.path("src");
    std::fs::create_dir(&src).unwrap();
    let files = 1024;
    let size = 64 << 10;
    for i in 0..files {
        write_random_file(&src.join(format!("f{i:04}")), size, 1000 + i as u64);
    }
    // 64 MiB of data through a 32 MiB cache.
    let _mount = Mount::start(
        &dirs,
        src.to_str().unwrap(),
        &["--cache-size", "32Mi", "--block-size", "64Ki"],
    );
    let mut order: Vec<usize> = (0..files).collect();
    let mut rng = fastrand::Rng::with_seed(11);
    let mut fetched_after_first = 0;
    for epoch in 0..4 {
        rng.shuffle(&mut order);
        for &i in &order {
            assert_eq!(read_uncached(&dirs.mnt.join(format!("f{i:04}"))), size);
        }
        if epoch == 0 {
            fetched_after_first = fetched(&dirs);
        }
    }
    let read = 3 * files as u64 * size as u64;
    let fetched = fetched(&dirs) - fetched_after_first;
    let hit_ratio = 1.0 - fetched as f64 / read as f64;
    assert!(
        hit_ratio >= 0.40,
        "hit ratio over warm epochs {hit_ratio:.3}"
    );
}

#[test]
fn status_and_warm_report_exactly() {
    let dirs = Dirs::new();
    let src = dirs.path("src");
    std::fs::create_dir(&src).unwrap();
    let bytes = write_small_tree(&src.join("tree"), 500, 1000, 20_000, 5);
    write_random_file(&src.join("tree/big"), 5 << 20, 6);
    let bytes = bytes + (5 << 20);
    let _mount = Mount::start(&dirs, src.to_str().unwrap(), &["--cache-size", "256Mi"]);

    let run = |paths: &[&str]| {
        let mut command = dirs.command();
        command.args(["warm", "--json"]).arg(&dirs.mnt);
        for path in paths {
            command.arg(dirs.mnt.join(path));
        }
        command.output().unwrap()
    };
    let out = run(&["tree", "missing"]);
    assert!(!out.status.success(), "a failed path makes warm fail");
    let account: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(account["files_loaded"], 501);
    assert_eq!(account["bytes_loaded"], bytes);
    assert_eq!(account["files_failed"], 1);
    assert_eq!(account["failures"][0][0], "missing");

    let out = run(&["tree"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let account: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(account["files_cached"], 501);
    assert_eq!(account["bytes_cached"], bytes);
    assert_eq!(account["files_loaded"], 0);

    // Human output: the account and plain progress (stderr is not a terminal here).
    let out = dirs.command().arg("warm").arg(&dirs.mnt).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("already cached:  501 files"), "{text}");

    let out = dirs
        .command()
        .arg("status")
        .arg(&dirs.mnt)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for label in ["source", "cache", "hit ratio", "served", "preload"] {
        assert!(text.contains(label), "status lacks {label}:\n{text}");
    }
    let status = dirs.status();
    assert_eq!(status["bytes_preloaded"].as_u64(), Some(bytes));
    assert_eq!(status["preload"]["done"], true);

    // Reading after a preload takes nothing from the source.
    assert_eq!(
        sha256_file(&dirs.mnt.join("tree/big")),
        sha256_file(&src.join("tree/big"))
    );
    assert_eq!(dirs.status()["bytes_fetched"].as_u64(), Some(0));
    let _ = std::io::stdout().flush();
}

#[test]
fn sigterm_detaches_a_busy_mount_and_open_files_read_to_the_end() {
    let dirs = Dirs::new();
    let src = dirs.path("src");
    std::fs::create_dir(&src).unwrap();
    write_random_file(&src.join("data"), 4 << 20, 11);
    let expected = std::fs::read(src.join("data")).unwrap();
    let mut mount = Mount::start(&dirs, src.to_str().unwrap(), &["--cache-size", "64Mi"]);

    let mut open = std::fs::File::open(dirs.mnt.join("data")).unwrap();
    let mut head = vec![0u8; 1 << 20];
    open.read_exact(&mut head).unwrap();
    signal(mount.pid().expect("running"), libc::SIGTERM);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while is_mounted(&dirs.mnt) {
        assert!(
            std::time::Instant::now() < deadline,
            "a busy mount was not detached on SIGTERM:\n{}",
            mount.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Detached, yet the open file reads on to the end, with the right bytes.
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).unwrap();
    head.extend_from_slice(&rest);
    assert!(head == expected, "wrong bytes after the detach");
    drop(open);
    assert_eq!(mount.stop(), Some(0), "{}", mount.log_text());
}

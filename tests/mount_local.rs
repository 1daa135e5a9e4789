//! `reservoir mount` over a directory source, through real FUSE mounts.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt, symlink};
use std::path::Path;

use std::time::{Duration, Instant};

use common::data::{
    describe_tree, disk_usage, read_direct, sha256_bytes, sha256_file, write_random_file,
    write_small_tree,
};
use common::mount::{Dirs, Mount, as_nobody, is_mounted, signal, wait_until};

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

/// The cache's journals stop reaching the disk for the whole test (the journal's test switch,
/// compiled into debug builds only: see `reservoir::journal::fault`), after the mount has
/// started and while it fills: opens and daemon-served reads of cached files still answer at
/// once, and so do cold reads, whose fills append to the index it cannot write.
#[cfg(debug_assertions)]
#[test]
fn cached_reads_and_opens_answer_while_the_index_cannot_reach_the_disk() {
    let dirs = Dirs::new();
    let src = dirs.path("src");
    std::fs::create_dir(&src).unwrap();
    write_random_file(&src.join("cached.bin"), 4 << 20, 51);
    for i in 0..8 {
        write_random_file(&src.join(format!("cold{i}.bin")), 2 << 20, 60 + i);
    }
    let switch = dirs.path("stall-journal-writes");
    let mut mount = Mount::start_with_env(
        &dirs,
        src.to_str().unwrap(),
        &[
            "--cache-size",
            "256Mi",
            "--metadata-ttl",
            "forever",
            // Cached files are read by the daemon, not handed to the kernel.
            "--no-passthrough",
        ],
        &[(
            reservoir::journal::fault::STALL_SWITCH_ENV,
            switch.as_path(),
        )],
    );
    let cached = read_direct(&dirs.mnt.join("cached.bin")).unwrap();
    assert_eq!(cached, std::fs::read(src.join("cached.bin")).unwrap());
    wait_until(
        "the file is complete in the cache",
        Duration::from_secs(30),
        || dirs.status()["cache"]["complete_files"] == 1,
    );

    // Only the cache index stalls: its flush holds the index's file while blocks are stored.
    std::fs::write(&switch, b"index").unwrap();
    // A watchdog ends the stall after a minute, so that a mount that waits on it fails the
    // test (on the times below) instead of hanging it.
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let watchdog = {
        let switch = switch.clone();
        std::thread::spawn(move || {
            if finished.recv_timeout(Duration::from_secs(60)).is_err() {
                let _ = std::fs::remove_file(&switch);
            }
        })
    };
    // A first cold read gives the index records to write (an idle flush has no I/O to stall).
    assert!(
        read_direct(&dirs.mnt.join("cold0.bin")).unwrap()
            == std::fs::read(src.join("cold0.bin")).unwrap()
    );
    wait_until(
        "the index's flush waits for the disk",
        Duration::from_secs(30),
        || {
            mount.log_text().lines().any(|line| {
                line.contains("journal writes stalled by the test switch")
                    && line.contains("cache/index")
            })
        },
    );
    for i in 1..8 {
        // A cold fill: admitted and stored while the index cannot be written.
        let cold = dirs.mnt.join(format!("cold{i}.bin"));
        let started = Instant::now();
        assert_eq!(
            read_direct(&cold).unwrap(),
            std::fs::read(src.join(format!("cold{i}.bin"))).unwrap()
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a cold read took {:?} while the index could not be written",
            started.elapsed()
        );
        for _ in 0..5 {
            let started = Instant::now();
            assert!(read_direct(&dirs.mnt.join("cached.bin")).unwrap() == cached);
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "an open and cached read took {:?} while the index could not be written",
                started.elapsed()
            );
        }
    }
    // What statfs asks, answered meanwhile too.
    let started = Instant::now();
    nix::sys::statvfs::statvfs(&dirs.mnt).unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(switch.exists(), "the stall held for the whole test");
    std::fs::remove_file(&switch).unwrap();
    let _ = done.send(());
    watchdog.join().unwrap();
    assert_eq!(mount.stop(), Some(0), "{}", mount.log_text());
}

/// The mount is killed (SIGKILL: no flush, no unmount) in the middle of a cold fill. A new
/// mount over the same cache serves the file byte for byte, reusing the blocks the killed one
/// had stored and recorded, and verifying them first.
#[test]
fn a_restart_after_sigkill_during_a_cold_fill_serves_every_byte_exactly() {
    let dirs = Dirs::new();
    let src = dirs.path("src");
    std::fs::create_dir(&src).unwrap();
    let size = 128usize << 20;
    write_random_file(&src.join("data"), size, 71);
    let expected = sha256_file(&src.join("data"));
    let args = ["--cache-size", "512Mi", "--block-size", "1Mi"];
    let mut mount = Mount::start(&dirs, src.to_str().unwrap(), &args);

    // A slow reader: the cache fills at its pace (plus read-ahead).
    let path = dirs.mnt.join("data");
    let reader = std::thread::spawn(move || {
        let mut file = std::fs::File::open(path)?;
        let mut chunk = vec![0u8; 1 << 20];
        loop {
            if file.read(&mut chunk)? == 0 {
                return Ok::<_, std::io::Error>(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    wait_until("16 MiB are fetched", Duration::from_secs(60), || {
        fetched(&dirs) >= 16 << 20
    });
    // Past a flush of the index (every second), so that the restart has something to reuse.
    std::thread::sleep(Duration::from_millis(1500));
    let fetched_at_kill = fetched(&dirs);
    assert!(
        fetched_at_kill < size as u64,
        "the fill finished before the kill ({fetched_at_kill} bytes)"
    );
    signal(mount.pid().expect("running"), libc::SIGKILL);
    mount.stop();
    assert!(
        reader.join().unwrap().is_err(),
        "the reader of a killed mount read to the end"
    );

    let _mount = Mount::start(&dirs, src.to_str().unwrap(), &args);
    let served = std::fs::read(dirs.mnt.join("data")).unwrap();
    assert_eq!(served.len(), size);
    assert_eq!(
        sha256_bytes(&served),
        expected,
        "wrong bytes after the restart"
    );
    let status = dirs.status();
    let fetched_again = status["bytes_fetched"].as_u64().unwrap();
    assert!(
        fetched_again <= (size as u64) - (8 << 20),
        "the restart fetched {fetched_again} bytes: the killed mount's blocks were not reused"
    );
    assert_eq!(
        status["cache"]["verify_failures"].as_u64(),
        Some(0),
        "{status}"
    );
}

/// The kernel forgets the names it stops using (FORGET), and the daemon then keeps at most
/// `--metadata-nodes` of them: its node table stays bounded however many distinct names are
/// looked up. The kernel forgets only what it evicts, and a FUSE mount's unused entries stay
/// until memory runs short (a zero timeout does not delete them), so the test makes it evict:
/// every 10,000 names it drops the dentry and inode caches (other tests' mounts only lose
/// what they would lose under memory pressure). Each time, the daemon's table is back to the
/// limit; without FORGET it would hold every name. 100,000 names by default;
/// `RESERVOIR_FORGET_NAMES=1000000` runs the million (docs/architecture.md has the
/// figures).
#[test]
fn names_looked_up_once_leave_a_bounded_node_table() {
    const DIRS: usize = 4;
    let per_dir: usize = std::env::var("RESERVOIR_FORGET_NAMES")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .map_or(25_000, |n| n.div_ceil(DIRS));
    const EVICT_EVERY: usize = 10_000;
    const KEPT: u64 = 1_000;
    // The root and the open directory, referenced by the kernel.
    const SLACK: u64 = 8;
    let dirs = Dirs::new();
    let src = dirs.path("src");
    for d in 0..DIRS {
        let dir = src.join(format!("d{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..per_dir {
            std::fs::File::create(dir.join(format!("name-{i:06}"))).unwrap();
        }
    }
    let _mount = Mount::start(
        &dirs,
        src.to_str().unwrap(),
        &["--metadata-nodes", &KEPT.to_string()],
    );
    let daemon_rss_kib = || {
        let pid = dirs.status()["pid"].as_u64().unwrap();
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap()
    };
    let mut rss_kib = Vec::new();
    let node_counts = || {
        let status = dirs.status();
        (
            status["nodes_known"].as_u64().unwrap(),
            status["nodes_referenced"].as_u64().unwrap(),
        )
    };
    let started = Instant::now();
    let mut most_known_after_eviction = 0;
    let mut most_referenced = 0;
    let mut first = None;
    let mut highest_ino = 0;
    let mut looked_up: u64 = 0;
    for d in 0..DIRS {
        // Looked up from an open directory, so that only the names come and go.
        let dir = std::fs::File::open(dirs.mnt.join(format!("d{d}"))).unwrap();
        for i in 0..per_dir {
            let name = format!("name-{i:06}");
            let stat = nix::sys::stat::fstatat(
                &dir,
                name.as_str(),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .unwrap();
            highest_ino = highest_ino.max(stat.st_ino);
            first.get_or_insert((d, name, stat.st_ino));
            looked_up += 1;
            if looked_up.is_multiple_of(EVICT_EVERY as u64) {
                most_referenced = most_referenced.max(node_counts().1);
                std::fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
                wait_until(
                    "the kernel forgets the names",
                    Duration::from_secs(20),
                    || node_counts().1 <= SLACK,
                );
                most_known_after_eviction = most_known_after_eviction.max(node_counts().0);
                rss_kib.push(daemon_rss_kib());
            }
        }
    }
    let took = started.elapsed();
    assert!(
        highest_ino > looked_up,
        "{looked_up} names were given only {highest_ino} numbers"
    );
    // Between evictions the kernel held every name it had just looked up.
    assert!(
        most_referenced >= EVICT_EVERY as u64,
        "the kernel held only {most_referenced} names: the lookups were not counted"
    );
    assert!(
        most_known_after_eviction <= KEPT + SLACK,
        "the daemon knew {most_known_after_eviction} nodes once the kernel forgot (at most {KEPT} + {SLACK} expected) after {looked_up} names"
    );
    // The first name was forgotten and evicted long ago: looked up again, it is a new node
    // with a new number, never one given before.
    let (d, name, ino) = first.unwrap();
    let again = std::fs::symlink_metadata(dirs.mnt.join(format!("d{d}")).join(name)).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        again.ino() > highest_ino,
        "looked up again, the first name got {} (first {ino}, highest given {highest_ino})",
        again.ino()
    );
    eprintln!(
        "{looked_up} names looked up in {took:?}; at most {most_referenced} referenced, at most {most_known_after_eviction} nodes known once forgotten (limit {KEPT}); daemon RSS after each eviction (KiB): first {:?}, last {:?}, max {:?}",
        rss_kib.first(),
        rss_kib.last(),
        rss_kib.iter().max()
    );
}

/// Work spawned for a request logs inside the request's span (its id, operation, inode,
/// handle, offset and size), and a failed prefetch says which file, block and bytes, and why.
#[test]
fn a_failed_prefetch_is_logged_in_its_request_with_the_file_the_bytes_and_the_cause() {
    let dirs = Dirs::new();
    let src = dirs.path("src");
    std::fs::create_dir(&src).unwrap();
    write_random_file(&src.join("big.bin"), 24 << 20, 7);
    let mount = Mount::start(&dirs, src.to_str().unwrap(), &["--no-passthrough"]);
    let mut file = std::fs::File::open(dirs.mnt.join("big.bin")).unwrap();
    // Gone from the source once opened: every fetch of it fails from now on.
    std::fs::remove_file(src.join("big.bin")).unwrap();
    let mut buffer = vec![0; 4096];
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::Start(16 << 20)).unwrap();
    let _ = file.read(&mut buffer);
    let _ = file.read(&mut buffer);
    drop(file);
    wait_until(
        "a failed prefetch is logged",
        Duration::from_secs(10),
        || mount.log_text().contains("prefetch failed"),
    );
    let log = mount.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("prefetch failed") && l.contains("op=\"read\""))
        .unwrap_or_else(|| panic!("no prefetch failure inside a read's span:\n{log}"));
    for field in [
        "fuse{unique=",
        "ino=",
        "fh=",
        "offset=",
        "size=",
        "block=",
        "key=",
    ] {
        assert!(line.contains(field), "{field} missing from: {line}");
    }
    assert!(
        line.contains("No such file or directory"),
        "the cause is missing from: {line}"
    );
}

/// A directory bigger than `--metadata-nodes` is listed completely, with the right attributes,
/// every time, although its entries cannot all stay known: the kernel is given those evicted
/// meanwhile without attributes and looks them up.
#[test]
fn a_listing_bigger_than_the_metadata_limit_is_complete_every_time() {
    const FILES: usize = 3_000;
    let dirs = Dirs::new();
    let src = dirs.path("src");
    let dir = src.join("many");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..FILES {
        std::fs::write(dir.join(format!("f{i:05}")), vec![b'x'; i % 97]).unwrap();
    }
    let _mount = Mount::start(
        &dirs,
        src.to_str().unwrap(),
        &["--metadata-nodes", "500", "--metadata-ttl", "0s"],
    );
    for round in 0..3 {
        let mut seen = 0;
        for entry in std::fs::read_dir(dirs.mnt.join("many")).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            let i: usize = name[1..].parse().unwrap();
            let size = entry.metadata().unwrap().len();
            assert_eq!(size, (i % 97) as u64, "round {round}: size of {name}");
            seen += 1;
        }
        assert_eq!(seen, FILES, "round {round}: entries listed");
        if round == 1 {
            std::fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
        }
    }
    let known = dirs.status()["nodes_known"].as_u64().unwrap();
    let referenced = dirs.status()["nodes_referenced"].as_u64().unwrap();
    assert!(
        known <= 500 + referenced + 2,
        "{known} nodes known with {referenced} referenced"
    );
}

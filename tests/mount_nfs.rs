//! `reservoir mount` over a real NFS server (nfs-ganesha in its own network namespace).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::data::{describe_tree, read_direct, sha256_file, write_random_file, write_small_tree};
use common::ganesha::Ganesha;
use common::mount::{Dirs, Mount, as_nobody, wait_until};

fn read_error(path: &Path) -> Option<i32> {
    std::fs::read(path).err().and_then(|e| e.raw_os_error())
}

#[test]
fn an_export_is_served_byte_for_byte_through_the_portmapper() {
    let dirs = Dirs::new();
    let export = dirs.path("export");
    let data = export.join("datasets/imagenet-mini");
    std::fs::create_dir_all(&data).unwrap();
    write_random_file(&data.join("big.bin"), 256 << 20, 21);
    write_small_tree(&data.join("train"), 10_000, 100, 8192, 22);
    std::os::unix::fs::symlink("../../../etc", data.join("train/escape")).unwrap();
    std::fs::write(export.join("outside-the-volume"), b"not in the volume").unwrap();
    let server = Ganesha::start(&export);

    // The URL names a directory inside the export: the export is found by prefix.
    let url = server.url(server.exports()[0].join("datasets/imagenet-mini"));
    let _mount = Mount::start(
        &dirs,
        &url,
        &["--cache-size", "1Gi", "--metadata-ttl", "forever"],
    );
    let expected = describe_tree(&data);
    assert_eq!(describe_tree(&dirs.mnt), expected, "cold read over NFS");
    assert!(!dirs.mnt.join("outside-the-volume").exists());
    let fetched = dirs.status()["bytes_fetched"].as_u64().unwrap();
    assert_eq!(describe_tree(&dirs.mnt), expected, "warm read");
    assert_eq!(dirs.status()["bytes_fetched"].as_u64().unwrap(), fetched);

    let out = as_nobody("sha256sum", &[dirs.mnt.join("big.bin").as_os_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next(),
        Some(sha256_file(&data.join("big.bin")).as_str())
    );
    let meta = std::fs::symlink_metadata(dirs.mnt.join("train/escape")).unwrap();
    assert!(meta.file_type().is_symlink());
}

#[test]
fn a_restart_with_the_server_down_serves_the_cached_part_offline() {
    let dirs = Dirs::new();
    let export = dirs.path("export");
    std::fs::create_dir_all(export.join("a")).unwrap();
    write_random_file(&export.join("a/cached.bin"), 3 << 20, 31);
    write_random_file(&export.join("a/not-cached.bin"), 1 << 20, 32);
    let mut server = Ganesha::start(&export);
    let url = server.url_with_ports(&server.exports()[0]);
    let args = ["--cache-size", "128Mi", "--source-timeout", "3s"];
    {
        let _mount = Mount::start(&dirs, &url, &args);
        assert_eq!(
            sha256_file(&dirs.mnt.join("a/cached.bin")),
            sha256_file(&export.join("a/cached.bin"))
        );
        assert!(dirs.mnt.join("a/not-cached.bin").exists());
    }
    server.stop();

    let mount = Mount::start(&dirs, &url, &args);
    assert!(
        mount.log_text().contains("starting offline"),
        "{}",
        mount.log_text()
    );
    assert_eq!(dirs.status()["online"], false);
    assert_eq!(
        sha256_file(&dirs.mnt.join("a/cached.bin")),
        sha256_file(&export.join("a/cached.bin"))
    );
    let started = Instant::now();
    assert_eq!(
        read_error(&dirs.mnt.join("a/not-cached.bin")),
        Some(libc::EIO)
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "an uncached read hung"
    );
    assert_eq!(dirs.status()["bytes_fetched"].as_u64(), Some(0));

    server.restart();
    wait_until("the mount is back online", Duration::from_secs(60), || {
        dirs.status()["online"] == true
    });
    assert_eq!(
        sha256_file(&dirs.mnt.join("a/not-cached.bin")),
        sha256_file(&export.join("a/not-cached.bin"))
    );
}

/// A hung server must not take the threads that serve cached data. The mount has two FUSE
/// threads and no passthrough, every read is `O_DIRECT` (so it reaches the daemon, never the
/// page cache), and six cold readers wait on the hung server at once: if a cold read held its
/// FUSE thread until the source timeout, the cached reads behind them would wait too.
#[test]
fn a_hung_server_never_stalls_cached_reads_and_uncached_reads_time_out() {
    const COLD_READERS: usize = 6;
    const FUSE_THREADS: &str = "2";
    let dirs = Dirs::new();
    let export = dirs.path("export");
    std::fs::create_dir_all(&export).unwrap();
    write_random_file(&export.join("cached.bin"), 2 << 20, 41);
    for i in 0..COLD_READERS {
        write_random_file(&export.join(format!("cold{i}.bin")), 2 << 20, 42 + i as u64);
    }
    let mut server = Ganesha::start(&export);
    let url = server.url_with_ports(&server.exports()[0]);
    let _mount = Mount::start(
        &dirs,
        &url,
        &[
            "--cache-size",
            "128Mi",
            "--source-timeout",
            "3s",
            "--metadata-ttl",
            "forever",
            "--threads",
            FUSE_THREADS,
            "--no-passthrough",
        ],
    );
    let cached = read_direct(&dirs.mnt.join("cached.bin")).unwrap();
    assert!(cached == std::fs::read(export.join("cached.bin")).unwrap());
    wait_until(
        "the file is complete in the cache",
        Duration::from_secs(30),
        || dirs.status()["cache"]["complete_files"] == 1,
    );
    for i in 0..COLD_READERS {
        assert!(dirs.mnt.join(format!("cold{i}.bin")).exists());
    }

    server.pause();
    // Uncached reads wait for the source, at most about the source timeout (each may retry
    // once on a fresh connection), then fail with EIO.
    let readers: Vec<_> = (0..COLD_READERS)
        .map(|i| {
            let cold = dirs.mnt.join(format!("cold{i}.bin"));
            std::thread::spawn(move || {
                let started = Instant::now();
                let error = read_direct(&cold).err().and_then(|e| e.raw_os_error());
                (error, started.elapsed())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // Meanwhile, every open and read of the cached file is served at once.
    let mut rounds = 0;
    while readers.iter().any(|r| !r.is_finished()) && rounds < 20 {
        let started = Instant::now();
        assert!(
            read_direct(&dirs.mnt.join("cached.bin")).unwrap() == cached,
            "wrong cached bytes"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a cached read took {:?} behind reads waiting for the hung source",
            started.elapsed()
        );
        rounds += 1;
    }
    assert!(
        rounds >= 5,
        "only {rounds} cached reads while the cold ones waited"
    );
    for reader in readers {
        let (error, waited) = reader.join().unwrap();
        assert_eq!(error, Some(libc::EIO));
        assert!(
            waited < Duration::from_secs(15),
            "uncached read took {waited:?}"
        );
    }

    server.resume();
    wait_until("the source answers again", Duration::from_secs(30), || {
        read_direct(&dirs.mnt.join("cold0.bin")).is_ok()
    });
    assert_eq!(
        sha256_file(&dirs.mnt.join("cold1.bin")),
        sha256_file(&export.join("cold1.bin"))
    );
}

#[test]
fn the_status_follows_the_source_while_nobody_reads() {
    let dirs = Dirs::new();
    let export = dirs.path("export");
    std::fs::create_dir_all(&export).unwrap();
    std::fs::write(export.join("file"), b"data").unwrap();
    let mut server = Ganesha::start(&export);
    let url = server.url_with_ports(&server.exports()[0]);
    let _mount = Mount::start(&dirs, &url, &["--source-timeout", "2s"]);
    assert_eq!(dirs.status()["online"], true);

    // No reader touches the mount: the volume's own probe notices the hung server, then its
    // return (the probe runs every 10 s; each call gives up after the 2 s timeout).
    server.pause();
    wait_until(
        "the status shows the source offline",
        Duration::from_secs(40),
        || dirs.status()["online"] == false,
    );
    server.resume();
    wait_until(
        "the status shows the source back",
        Duration::from_secs(40),
        || dirs.status()["online"] == true,
    );
}

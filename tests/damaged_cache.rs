//! A cache directory damaged between two runs, or a cache disk that fills up, never serves a
//! wrong byte: the mount comes up, damaged parts are fetched again from the source (and only
//! those), and `reservoir status` counts what was found. Each case reads every file through a
//! real FUSE mount (with passthrough, which hands whole cache files to the kernel) and
//! compares it with the source.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::data::{read_direct, sha256_bytes, sha256_file, write_random_file};
use common::mount::{Dirs, Mount};

const MIB: u64 = 1 << 20;
const ARGS: &[&str] = &["--cache-size", "256Mi", "--block-size", "1Mi"];

/// The dataset: sizes differ, so that a cache file is known by its length.
const FILES: &[(&str, u64)] = &[
    ("a", 3 * MIB),
    ("b", 5 * MIB + 123),
    ("c", MIB),
    ("small", 10_000),
];

fn total_bytes() -> u64 {
    FILES.iter().map(|(_, size)| size).sum()
}

/// A source with [`FILES`], read once through a mount so that the cache holds all of it, then
/// unmounted cleanly.
fn cached_dataset(dirs: &Dirs) -> PathBuf {
    let src = dirs.path("src");
    std::fs::create_dir(&src).unwrap();
    for (seed, (name, size)) in FILES.iter().enumerate() {
        write_random_file(&src.join(name), *size as usize, seed as u64 + 1);
    }
    let _mount = Mount::start(dirs, src.to_str().unwrap(), ARGS);
    check_every_file(dirs, &src);
    src
}

/// Reads every file through the mount and compares it with the source, byte for byte.
fn check_every_file(dirs: &Dirs, src: &Path) {
    check_every_file_with(dirs, src, |path| std::fs::read(path))
}

fn check_every_file_with(
    dirs: &Dirs,
    src: &Path,
    read: impl Fn(&Path) -> std::io::Result<Vec<u8>>,
) {
    for (name, size) in FILES {
        let served = read(&dirs.mnt.join(name)).unwrap();
        assert_eq!(served.len() as u64, *size, "{name}: wrong length served");
        assert_eq!(
            sha256_bytes(&served),
            sha256_file(&src.join(name)),
            "{name}: wrong bytes served"
        );
    }
}

/// The cache's data file of the source file of `size` (cache files have their file's length).
fn data_file_of(dirs: &Dirs, size: u64) -> PathBuf {
    let mut found = Vec::new();
    for fan in std::fs::read_dir(dirs.cache.join("data")).unwrap() {
        for entry in std::fs::read_dir(fan.unwrap().path()).unwrap() {
            let entry = entry.unwrap();
            if entry.metadata().unwrap().len() == size {
                found.push(entry.path());
            }
        }
    }
    assert_eq!(found.len(), 1, "cache files of {size} bytes: {found:?}");
    found.remove(0)
}

/// Restarts over the damaged cache, checks every byte, and returns the status.
fn restart_and_check(dirs: &Dirs, src: &Path) -> serde_json::Value {
    restart_check_and_show(dirs, src).0
}

/// [`restart_and_check`], and the status as `reservoir status` shows it to people.
fn restart_check_and_show(dirs: &Dirs, src: &Path) -> (serde_json::Value, String) {
    let _mount = Mount::start(dirs, src.to_str().unwrap(), ARGS);
    check_every_file(dirs, src);
    // A second pass reads what the first stored: still right, and nothing fetched again.
    let fetched = dirs.status()["bytes_fetched"].as_u64().unwrap();
    check_every_file(dirs, src);
    let status = dirs.status();
    assert_eq!(
        status["bytes_fetched"].as_u64().unwrap(),
        fetched,
        "{status}"
    );
    let shown = dirs
        .command()
        .arg("status")
        .arg(&dirs.mnt)
        .output()
        .unwrap();
    (status, String::from_utf8_lossy(&shown.stdout).into_owned())
}

/// Flips the bits of `mask` in the byte at `offset` of `path`.
fn flip_bits(path: &Path, offset: u64, mask: u8) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    file.write_all_at(&[byte[0] ^ mask], offset).unwrap();
}

fn damage(status: &serde_json::Value, what: &str) -> u64 {
    status["cache"]["damage"][what].as_u64().unwrap_or(0)
}

#[test]
fn a_truncated_cache_file_is_refetched_from_where_it_was_cut() {
    let dirs = Dirs::new();
    let src = cached_dataset(&dirs);
    let b = data_file_of(&dirs, 5 * MIB + 123);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&b)
        .unwrap()
        .set_len(2 * MIB + MIB / 2)
        .unwrap();

    let (status, shown) = restart_check_and_show(&dirs, &src);
    assert!(
        shown.contains("cache damage   1 files of the wrong length, 4 blocks dropped"),
        "{shown}"
    );
    assert_eq!(damage(&status, "resized_files"), 1, "{status}");
    // Blocks 2 (cut in the middle), 3, 4 and the 123-byte tail.
    assert_eq!(damage(&status, "blocks_dropped"), 4, "{status}");
    assert_eq!(
        status["bytes_fetched"].as_u64(),
        Some(3 * MIB + 123),
        "only the lost blocks are fetched again: {status}"
    );
}

#[test]
fn a_grown_cache_file_serves_no_byte_past_the_end() {
    let dirs = Dirs::new();
    let src = cached_dataset(&dirs);
    let a = data_file_of(&dirs, 3 * MIB);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&a)
        .unwrap()
        .write_all_at(&vec![0xaa; MIB as usize], 3 * MIB)
        .unwrap();

    let status = restart_and_check(&dirs, &src);
    assert_eq!(damage(&status, "resized_files"), 1, "{status}");
    assert_eq!(damage(&status, "blocks_dropped"), 0, "{status}");
    assert_eq!(status["bytes_fetched"].as_u64(), Some(0), "{status}");
    assert!(
        status["passthrough_opens"].as_u64().unwrap() > 0,
        "the repaired file was not handed to the kernel: {status}"
    );
}

#[test]
fn flipped_bits_in_cached_data_are_refetched() {
    let dirs = Dirs::new();
    let src = cached_dataset(&dirs);
    for (size, offset) in [(3 * MIB, 10), (MIB, MIB - 1), (10_000, 5_000)] {
        flip_bits(&data_file_of(&dirs, size), offset, 0x10);
    }

    let status = restart_and_check(&dirs, &src);
    assert_eq!(status["cache"]["verify_failures"].as_u64(), Some(3));
    assert_eq!(
        status["bytes_fetched"].as_u64(),
        Some(MIB + MIB + 10_000),
        "only the three damaged blocks are fetched again: {status}"
    );
}

#[test]
fn a_damaged_index_forgets_files_and_never_misreads_them() {
    let dirs = Dirs::new();
    let src = cached_dataset(&dirs);
    let index = dirs.cache.join("index");
    let len = std::fs::metadata(&index).unwrap().len();
    assert!(len > 64, "index of {len} bytes");
    flip_bits(&index, len / 2, 0x01);

    let status = restart_and_check(&dirs, &src);
    assert!(damage(&status, "journal_bytes_dropped") > 0, "{status}");
    let forgotten = damage(&status, "unknown_files_removed");
    assert!(forgotten >= 1, "{status}");
    let fetched = status["bytes_fetched"].as_u64().unwrap();
    assert!(
        fetched > 0 && fetched < total_bytes(),
        "fetched {fetched} of {}: {status}",
        total_bytes()
    );
}

#[test]
fn a_damaged_metadata_journal_is_cut_and_the_tree_asked_again() {
    let dirs = Dirs::new();
    let src = cached_dataset(&dirs);
    let journals: Vec<PathBuf> = std::fs::read_dir(dirs.cache.join("meta"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(journals.len(), 1, "{journals:?}");
    let journal = &journals[0];
    let len = std::fs::metadata(journal).unwrap().len();
    flip_bits(journal, len / 3, 0x80);

    let status = restart_and_check(&dirs, &src);
    assert!(damage(&status, "journal_bytes_dropped") > 0, "{status}");
    assert_eq!(
        status["bytes_fetched"].as_u64(),
        Some(0),
        "the data was intact: {status}"
    );
}

#[test]
fn missing_cache_files_index_or_format_marker_are_refetched() {
    // A data file removed: that file is fetched again, the rest is served from the cache.
    let dirs = Dirs::new();
    let src = cached_dataset(&dirs);
    std::fs::remove_file(data_file_of(&dirs, 3 * MIB)).unwrap();
    let status = restart_and_check(&dirs, &src);
    assert_eq!(damage(&status, "missing_files"), 1, "{status}");
    assert_eq!(status["bytes_fetched"].as_u64(), Some(3 * MIB), "{status}");

    // The index removed: every data file is unknown, removed, and fetched again.
    let dirs = Dirs::new();
    let src = cached_dataset(&dirs);
    std::fs::remove_file(dirs.cache.join("index")).unwrap();
    let status = restart_and_check(&dirs, &src);
    assert_eq!(
        damage(&status, "unknown_files_removed"),
        FILES.len() as u64,
        "{status}"
    );
    assert_eq!(status["bytes_fetched"].as_u64(), Some(total_bytes()));

    // The format marker removed: the directory cannot be trusted; it is set aside.
    let dirs = Dirs::new();
    let src = cached_dataset(&dirs);
    std::fs::remove_file(dirs.cache.join("format")).unwrap();
    let status = restart_and_check(&dirs, &src);
    assert_eq!(damage(&status, "set_aside"), 1, "{status}");
    assert_eq!(status["bytes_fetched"].as_u64(), Some(total_bytes()));
}

/// A tmpfs of `size` mounted at the test's cache directory, unmounted when dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dirs: &Dirs, size: &str) -> SmallDisk {
        std::fs::create_dir_all(&dirs.cache).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dirs.cache)
            .status()
            .unwrap();
        assert!(
            mounted.success(),
            "mount a tmpfs at {}",
            dirs.cache.display()
        );
        SmallDisk(dirs.cache.clone())
    }

    /// Fills the file system until only about `leave` bytes are free.
    fn fill(&self, leave: u64) -> PathBuf {
        let ballast = self.0.join("ballast");
        let stat = nix::sys::statvfs::statvfs(&self.0).unwrap();
        let free = stat.blocks_available() as u64 * stat.fragment_size() as u64;
        let file = std::fs::File::create(&ballast).unwrap();
        let chunk = vec![0x55u8; MIB as usize];
        let mut written = 0;
        while written + leave < free {
            let n = (free - leave - written).min(MIB) as usize;
            if file.write_all_at(&chunk[..n], written).is_err() {
                break;
            }
            written += n as u64;
        }
        ballast
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_cache_on_a_full_disk_comes_up_and_gives_back_room() {
    let dirs = Dirs::new();
    let disk = SmallDisk::mount(&dirs, "40m");
    let src = cached_dataset(&dirs);
    disk.fill(0);

    // Before, a cache whose disk had less than 16 MiB free refused to start.
    let status = restart_and_check(&dirs, &src);
    assert_eq!(
        damage(&status, "evicted_for_space"),
        FILES.len() as u64,
        "all 9 MiB were given back, still short of 16 MiB free: {status}"
    );
}

#[test]
fn a_cache_gives_back_room_when_other_files_fill_its_disk() {
    let dirs = Dirs::new();
    let disk = SmallDisk::mount(&dirs, "40m");
    let src = cached_dataset(&dirs);
    let _mount = Mount::start(&dirs, src.to_str().unwrap(), ARGS);
    disk.fill(0);
    common::mount::wait_until(
        "the cache gives back room",
        std::time::Duration::from_secs(10),
        || damage(&dirs.status(), "evicted_for_space") > 0,
    );
    let stat = nix::sys::statvfs::statvfs(&dirs.cache).unwrap();
    let free = stat.blocks_available() as u64 * stat.fragment_size() as u64;
    assert!(
        free >= MIB,
        "{free} bytes free after the cache gave back room"
    );
    check_every_file(&dirs, &src);
}

#[test]
fn a_cache_disk_filling_up_while_serving_costs_no_read() {
    let dirs = Dirs::new();
    let disk = SmallDisk::mount(&dirs, "40m");
    let src = dirs.path("src");
    std::fs::create_dir(&src).unwrap();
    for (seed, (name, size)) in FILES.iter().enumerate() {
        write_random_file(&src.join(name), *size as usize, seed as u64 + 1);
    }
    let mount = Mount::start(&dirs, src.to_str().unwrap(), ARGS);
    let ballast = disk.fill(MIB / 2);
    // O_DIRECT: every read reaches the daemon, none is answered by the page cache.
    check_every_file_with(&dirs, &src, read_direct);
    let status = dirs.status();
    assert!(damage(&status, "store_failures") > 0, "{status}");

    // Room again: reads go on right, and the cache fills.
    std::fs::remove_file(ballast).unwrap();
    check_every_file_with(&dirs, &src, read_direct);
    check_every_file_with(&dirs, &src, read_direct);
    let status = dirs.status();
    assert!(
        status["cache"]["data_bytes"].as_u64().unwrap() > 0,
        "{status}"
    );
    drop(mount);
}

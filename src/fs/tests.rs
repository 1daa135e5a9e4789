use super::*;
use meta::ROOT;
use std::path::Path;

fn cache(dir: &Path) -> Arc<Cache> {
    Cache::open(crate::cache::CacheConfig {
        dir: dir.to_path_buf(),
        capacity: 256 << 20,
        high_watermark: 0.95,
        low_watermark: 0.85,
        block_size: 64 << 10,
    })
    .unwrap()
}

fn options() -> SourceOptions {
    SourceOptions {
        timeout: Duration::from_secs(5),
        connections: 4,
    }
}

async fn volume(source: &Path, cache: Option<Arc<Cache>>, ttl: Ttl) -> Arc<Volume> {
    let spec = SourceSpec::Local(source.to_path_buf());
    Volume::open(
        spec,
        options(),
        cache,
        VolumeConfig {
            metadata_ttl: ttl,
            read_write: false,
            idle_nodes: crate::fs::DEFAULT_IDLE_NODES,
        },
    )
    .await
    .unwrap()
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

async fn read_all(volume: &Arc<Volume>, file: &Arc<OpenFile>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut offset = 0u64;
    loop {
        let chunk = match volume.try_read(file, offset, 100_000) {
            Some(data) => data,
            None => volume.read(file, offset, 100_000).await.unwrap(),
        };
        if chunk.is_empty() {
            return out;
        }
        offset += chunk.len() as u64;
        out.extend_from_slice(&chunk);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_through_the_cache_and_serves_a_restart_without_the_source() {
    let source = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let data = pattern(1_000_000);
    std::fs::create_dir(source.path().join("d")).unwrap();
    std::fs::write(source.path().join("d/big"), &data).unwrap();
    std::fs::write(source.path().join("small"), b"hello").unwrap();

    {
        let volume = volume(source.path(), Some(cache(cache_dir.path())), Ttl::Forever).await;
        let d = volume.lookup(ROOT, b"d").await.unwrap();
        let big = volume.lookup(d.ino, b"big").await.unwrap();
        assert_eq!(big.attr.size, data.len() as u64);
        let file = volume.open_file(big.ino, false).await.unwrap();
        assert!(!file.passthrough_ready);
        assert_eq!(read_all(&volume, &file).await, data);
        // Readers get their blocks before they are written to the cache.
        tokio::task::block_in_place(|| volume.drain_stores());
        let file = volume.open_file(big.ino, false).await.unwrap();
        assert!(
            file.passthrough_ready,
            "a fully read file is complete in the cache"
        );
        let small = volume.lookup(ROOT, b"small").await.unwrap();
        let file = volume.open_file(small.ino, false).await.unwrap();
        assert_eq!(read_all(&volume, &file).await, b"hello");
        let listing = volume.list(ROOT).await.unwrap();
        assert_eq!(listing.len(), 2);
        let status = volume.status();
        assert_eq!(status.bytes_fetched, data.len() as u64 + 5);
        tokio::task::block_in_place(|| volume.finish());
    }

    // A remount over the same cache serves what it holds without reading the source again.
    let volume = volume(source.path(), Some(cache(cache_dir.path())), Ttl::Forever).await;
    let d = volume.lookup(ROOT, b"d").await.unwrap();
    let big = volume.lookup(d.ino, b"big").await.unwrap();
    let file = volume.open_file(big.ino, false).await.unwrap();
    assert_eq!(read_all(&volume, &file).await, data);
    assert_eq!(volume.status().bytes_fetched, 0);
    assert_eq!(volume.list(ROOT).await.unwrap().len(), 2);
    assert_eq!(
        volume.lookup(ROOT, b"missing").await.unwrap_err().errno(),
        libc::ENOENT
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_file_is_fetched_again_after_the_ttl() {
    let source = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let path = source.path().join("f");
    std::fs::write(&path, b"version one").unwrap();
    let ttl = Ttl::Finite(Duration::from_millis(300));
    let volume = volume(source.path(), Some(cache(cache_dir.path())), ttl).await;
    let f = volume.lookup(ROOT, b"f").await.unwrap();
    let file = volume.open_file(f.ino, false).await.unwrap();
    assert_eq!(read_all(&volume, &file).await, b"version one");

    // The same size: only the file's times tell the two versions apart (set an hour apart,
    // since two writes in quick succession may get the same coarse timestamp).
    std::fs::write(&path, b"version two").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(std::time::SystemTime::now() + Duration::from_secs(3600))
        .unwrap();
    // Within the TTL the known version is served.
    let file = volume.open_file(f.ino, false).await.unwrap();
    assert_eq!(read_all(&volume, &file).await, b"version one");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let f2 = volume.lookup(ROOT, b"f").await.unwrap();
    assert_eq!(f2.ino, f.ino);
    let file = volume.open_file(f.ino, false).await.unwrap();
    assert!(
        !file.keep_cache,
        "the kernel must drop pages of the old version"
    );
    assert_eq!(read_all(&volume, &file).await, b"version two");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preload_loads_everything_once_and_accounts_for_it() {
    let source = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let mut total = 0u64;
    for dir in 0..5 {
        let d = source.path().join(format!("d{dir}"));
        std::fs::create_dir(&d).unwrap();
        for file in 0..20 {
            let data = pattern(1000 * (file + 1) + dir);
            total += data.len() as u64;
            std::fs::write(d.join(format!("f{file}")), data).unwrap();
        }
    }
    std::os::unix::fs::symlink("/etc/passwd", source.path().join("link")).unwrap();
    let volume = volume(source.path(), Some(cache(cache_dir.path())), Ttl::Forever).await;
    let request = || warm::PreloadRequest {
        paths: vec!["/".into(), "missing".into()],
        parallel: 4,
    };
    let progress = wait(volume.start_warm(request())).await;
    assert_eq!((progress.files_total, progress.bytes_total), (100, total));
    assert_eq!((progress.files_loaded, progress.bytes_loaded), (100, total));
    assert_eq!(progress.files_cached, 0);
    assert_eq!(progress.files_failed, 1);
    assert_eq!(progress.failures[0].0, "missing");
    let again = wait(volume.start_warm(request())).await;
    assert_eq!((again.files_cached, again.bytes_cached), (100, total));
    assert_eq!(again.files_loaded, 0);
    assert_eq!(volume.status().bytes_preloaded, total);
}

async fn wait(tracker: Arc<warm::Tracker>) -> warm::Progress {
    for _ in 0..500 {
        let progress = tracker.snapshot();
        if progress.done {
            return progress;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("preload did not finish: {:?}", tracker.snapshot());
}

#[test]
fn the_store_queue_pushes_back_when_full_and_reports_when_it_empties() {
    let stores = Arc::new(PendingStores::default());
    for _ in 0..STORE_QUEUE {
        assert!(stores.enqueue());
    }
    assert!(
        !stores.enqueue(),
        "a full queue hands the store back to the fetcher"
    );
    assert!(!stores.wait_idle(Duration::from_millis(20)));
    let finisher = {
        let stores = stores.clone();
        std::thread::spawn(move || {
            for _ in 0..STORE_QUEUE {
                std::thread::sleep(Duration::from_millis(2));
                stores.done();
            }
        })
    };
    assert!(stores.wait_idle(Duration::from_secs(10)));
    finisher.join().unwrap();
    assert!(stores.enqueue(), "an emptied queue takes stores again");
}

#[test]
fn a_cache_failure_is_an_eio_logged_as_an_error_with_every_cause() {
    let e: FsError = crate::cache::CacheError::Io {
        dir: "/cache".into(),
        what: "storing block 3".into(),
        cause: std::io::Error::other("no space left on the cache disk"),
    }
    .into();
    assert_eq!(e.errno(), libc::EIO);
    assert_eq!(e.level(), tracing::Level::ERROR);
    let text = crate::error::Chain(&e).to_string();
    assert!(
        text.contains("storing block 3") && text.contains("no space left on the cache disk"),
        "{text}"
    );
    // An ordinary answer of the source keeps its errno and stays quiet.
    let e: FsError = SourceError::status("lookup", libc::ENOENT, "/data: no file x").into();
    assert_eq!(e.errno(), libc::ENOENT);
    assert_eq!(e.level(), tracing::Level::DEBUG);
    assert!(crate::error::Chain(&e).to_string().contains("no file x"));
}

/// What the volume keeps per inode (the version its page cache holds, its write state) goes
/// when the kernel forgets the inode; a node still referenced keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_inode_leaves_nothing_behind_in_the_volume() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("read"), pattern(1000)).unwrap();
    let volume = Volume::open(
        SourceSpec::Local(src.clone()),
        options(),
        Some(cache(&dir.path().join("cache"))),
        VolumeConfig {
            metadata_ttl: Ttl::Finite(Duration::from_secs(60)),
            read_write: true,
            idle_nodes: 0,
        },
    )
    .await
    .unwrap();
    let read = volume.lookup(ROOT, b"read").await.unwrap();
    // Two references: the kernel looked the name up twice.
    volume.lookup(ROOT, b"read").await.unwrap();
    let file = volume.open_file(read.ino, false).await.unwrap();
    assert_eq!(read_all(&volume, &file).await, pattern(1000));
    drop(file);
    let owner = crate::source::Owner { uid: 0, gid: 0 };
    let (written, writer) = volume
        .create(ROOT, b"written", 0o644, owner, false)
        .await
        .unwrap();
    volume.write(&writer, 0, b"abc".to_vec()).await.unwrap();
    volume.commit(&writer).await.unwrap();
    volume.release(&writer).await;
    drop(writer);
    let kept = |ino| {
        (
            volume
                .page_cache_versions
                .lock()
                .unwrap()
                .contains_key(&ino),
            volume.writes.lock().unwrap().contains_key(&ino),
        )
    };
    assert_eq!(kept(read.ino), (true, false));
    assert_eq!(kept(written.ino), (false, true));

    volume.forget(read.ino, 1);
    assert_eq!(kept(read.ino), (true, false), "still referenced once");
    assert!(volume.known_entry(read.ino).is_some());
    volume.forget(read.ino, 1);
    volume.forget(written.ino, 1);
    assert_eq!(kept(read.ino), (false, false));
    assert_eq!(kept(written.ino), (false, false));
    // With no room for unreferenced nodes, both are gone from the namespace too.
    assert!(volume.known_entry(read.ino).is_none());
    assert!(volume.known_entry(written.ino).is_none());
    assert_eq!(volume.status().nodes_referenced, 0);
}

/// Found by the reference model (`model_tests`): a directory source names files by path, and
/// an open file's reads (and a read-only handle's uncached reads) went to the path it was
/// opened at, so renaming a directory above it cut it off (`ENOENT`), or worse, read whatever
/// file took that path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_file_is_read_and_written_after_its_directory_is_renamed() {
    let source = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(source.path().join("d")).unwrap();
    std::fs::write(source.path().join("d/f"), pattern(200_000)).unwrap();
    let volume = read_write_volume(source.path(), Some(cache_dir.path())).await;
    let d = volume.lookup(ROOT, b"d").await.unwrap();
    let f = volume.lookup(d.ino, b"f").await.unwrap();
    let reader = volume.open_file(f.ino, false).await.unwrap();
    let writer = volume.open_file(f.ino, true).await.unwrap();

    volume.rename(ROOT, b"d", ROOT, b"e").await.unwrap();
    // Another file takes the old path: nobody may read it through the old handles.
    std::fs::create_dir(source.path().join("d")).unwrap();
    std::fs::write(source.path().join("d/f"), b"someone else's").unwrap();

    volume.write(&writer, 0, b"new".to_vec()).await.unwrap();
    volume.commit(&writer).await.unwrap();
    let mut expected = pattern(200_000);
    expected[..3].copy_from_slice(b"new");
    assert_eq!(read_all(&volume, &writer).await, expected);
    assert_eq!(read_all(&volume, &reader).await, expected);
    assert_eq!(std::fs::read(source.path().join("e/f")).unwrap(), expected);
    volume.release(&writer).await;
}

/// Found by a 2,000-case run of the reference model (seed 0x5eed0f0015): a writer opened its
/// source file at its first write, by the path the file had then, so after a rename put another
/// file at that path the write went to the other file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_after_its_file_is_renamed_over_lands_in_the_opened_file() {
    let source = tempfile::tempdir().unwrap();
    std::fs::write(source.path().join("a"), b"aaaa").unwrap();
    std::fs::write(source.path().join("b"), b"bbbb").unwrap();
    let volume = read_write_volume(source.path(), None).await;
    let a = volume.lookup(ROOT, b"a").await.unwrap();
    let writer = volume.open_file(a.ino, true).await.unwrap();

    volume.rename(ROOT, b"b", ROOT, b"a").await.unwrap();
    volume.write(&writer, 0, b"X".to_vec()).await.unwrap();
    volume.commit(&writer).await.unwrap();
    volume.release(&writer).await;

    assert_eq!(std::fs::read(source.path().join("a")).unwrap(), b"bbbb");
    assert!(!source.path().join("b").exists());
}

/// A writer that never wrote, closed after its file was removed, flushes without an error: its
/// flush goes to the file it opened, not to the path the file no longer has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_of_a_removed_file_flushes_cleanly() {
    let source = tempfile::tempdir().unwrap();
    std::fs::write(source.path().join("a"), b"aaaa").unwrap();
    let volume = read_write_volume(source.path(), None).await;
    let a = volume.lookup(ROOT, b"a").await.unwrap();
    let writer = volume.open_file(a.ino, true).await.unwrap();

    volume.remove(ROOT, b"a", false).await.unwrap();
    volume.commit(&writer).await.unwrap();
    volume.release(&writer).await;
    assert!(!source.path().join("a").exists());
}

/// A read-write volume over the directory `source`, metadata kept for good, with a cache in
/// `cache_dir` or none.
async fn read_write_volume(source: &Path, cache_dir: Option<&Path>) -> Arc<Volume> {
    Volume::open(
        SourceSpec::Local(source.to_path_buf()),
        options(),
        cache_dir.map(cache),
        VolumeConfig {
            metadata_ttl: Ttl::Forever,
            read_write: true,
            idle_nodes: crate::fs::DEFAULT_IDLE_NODES,
        },
    )
    .await
    .unwrap()
}

/// Found by the reference model: renaming a name the volume had not looked up onto a known one
/// gave the replaced file's inode number to the moved file (the kernel may still hold that
/// number for the replaced file, open or not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_over_a_known_name_does_not_hand_its_number_to_another_file() {
    let source = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    std::fs::write(source.path().join("a"), b"old a").unwrap();
    std::fs::write(source.path().join("c"), b"the new a").unwrap();
    let volume = read_write_volume(source.path(), Some(cache_dir.path())).await;
    let old = volume.lookup(ROOT, b"a").await.unwrap();
    volume.rename(ROOT, b"c", ROOT, b"a").await.unwrap();
    let new = volume.lookup(ROOT, b"a").await.unwrap();
    assert_ne!(new.ino, old.ino);
    assert_eq!(new.attr.size, 9);
}

/// Found by the reference model with a failing source: a rename whose follow-up lookup failed
/// forgot the new name but left the directory's listing complete, so the moved file was
/// answered `ENOENT` (for good with `--metadata-ttl forever`). The rename path now calls
/// `unknown_child`, checked here directly (the model replays the failing lookup).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_changed_unseen_is_asked_of_the_source_again_not_answered_absent() {
    let source = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    std::fs::write(source.path().join("a"), b"a").unwrap();
    let volume = volume(source.path(), Some(cache(cache_dir.path())), Ttl::Forever).await;
    assert_eq!(volume.list(ROOT).await.unwrap().len(), 1);
    std::fs::rename(source.path().join("a"), source.path().join("b")).unwrap();
    volume.meta.remove_child(ROOT, b"a");
    volume.meta.unknown_child(ROOT, b"b");
    let b = volume.lookup(ROOT, b"b").await.unwrap();
    assert_eq!(b.attr.size, 1);
}

/// Found by a long run of the reference model: a file replaced by a rename while open for
/// writing had its attributes journaled again when its writer closed, which brought it back
/// under the name at the next restart (with the moved file's number lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_replaced_while_open_does_not_come_back_after_a_restart() {
    let source = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    std::fs::write(source.path().join("b"), b"moved").unwrap();
    std::fs::write(source.path().join("c"), b"replaced file").unwrap();
    let config = VolumeConfig {
        metadata_ttl: Ttl::Finite(Duration::ZERO),
        read_write: true,
        idle_nodes: crate::fs::DEFAULT_IDLE_NODES,
    };
    let open = || async {
        Volume::open(
            SourceSpec::Local(source.path().to_path_buf()),
            options(),
            Some(cache(cache_dir.path())),
            config.clone(),
        )
        .await
        .unwrap()
    };
    let volume = open().await;
    let b = volume.lookup(ROOT, b"b").await.unwrap();
    let c = volume.lookup(ROOT, b"c").await.unwrap();
    let writer = volume.open_file(c.ino, true).await.unwrap();
    volume.rename(ROOT, b"b", ROOT, b"c").await.unwrap();
    volume.commit(&writer).await.unwrap();
    volume.release(&writer).await;
    drop(writer);
    tokio::task::block_in_place(|| volume.finish());
    drop(volume);

    let volume = open().await;
    let now = volume.lookup(ROOT, b"c").await.unwrap();
    assert_eq!(now.ino, b.ino, "the moved file keeps its number");
    assert_eq!(now.attr.size, 5);
}

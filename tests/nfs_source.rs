//! The NFSv3 source against a real nfs-ganesha, each test with its own server in its own network
//! namespace (see `common::ganesha`). Needs root and nfs-ganesha.

mod common;

use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::ganesha::Ganesha;
use reservoir::source::nfs::NfsSource;
use reservoir::source::{Attr, Kind, NfsUrl, Source, SourceError, SourceOptions, SourceSpec};

fn options(timeout: Duration, connections: usize) -> SourceOptions {
    SourceOptions {
        timeout,
        connections,
    }
}

fn nfs_url(text: &str) -> NfsUrl {
    match text.parse::<SourceSpec>() {
        Ok(SourceSpec::Nfs(url)) => url,
        other => panic!("{text}: {other:?}"),
    }
}

async fn connect(url: &str, options: &SourceOptions) -> NfsSource {
    match NfsSource::connect(&nfs_url(url), options).await {
        Ok(source) => source,
        Err(e) => panic!("connect {url}: {e}"),
    }
}

async fn connect_err(url: &str) -> SourceError {
    match NfsSource::connect(&nfs_url(url), &options(Duration::from_secs(10), 2)).await {
        Ok(_) => panic!("connect {url} should fail"),
        Err(e) => e,
    }
}

/// Deterministic pseudo-random bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut data = vec![0u8; len];
    rng.fill(&mut data);
    data
}

/// export/
///   a/b/c/deep.txt ("deep")
///   a/link -> b/c/deep.txt
///   empty (0 bytes)
///   small.txt ("hello, nfs\n", mode 0640)
struct Tree {
    _dir: tempfile::TempDir,
    export: PathBuf,
}

fn tree() -> Tree {
    let dir = tempfile::tempdir().expect("tempdir");
    let export = dir.path().join("export");
    std::fs::create_dir_all(export.join("a/b/c")).unwrap();
    std::fs::write(export.join("a/b/c/deep.txt"), b"deep").unwrap();
    symlink("b/c/deep.txt", export.join("a/link")).unwrap();
    std::fs::write(export.join("empty"), b"").unwrap();
    std::fs::write(export.join("small.txt"), b"hello, nfs\n").unwrap();
    std::fs::set_permissions(
        export.join("small.txt"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .unwrap();
    Tree { _dir: dir, export }
}

fn assert_unavailable(err: &SourceError, what: &str) {
    assert!(
        matches!(err, SourceError::Unavailable { .. }),
        "{what}: expected Unavailable, got {err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_through_the_portmapper_and_with_explicit_ports() {
    let tree = tree();
    let server = Ganesha::start(&tree.export);
    let opts = options(Duration::from_secs(10), 4);
    for url in [
        server.url(&tree.export),
        server.url_with_ports(&tree.export),
    ] {
        let source = connect(&url, &opts).await;
        let spec: SourceSpec = url.parse().unwrap();
        assert_eq!(source.id(), spec.id());
        assert_eq!(source.export(), tree.export.to_str().unwrap());
        assert!(source.rtmax() > 0);
        let (_, attr) = source.root().await.unwrap();
        assert_eq!(attr.kind, Kind::Directory);
        assert_eq!(attr.fileid, std::fs::metadata(&tree.export).unwrap().ino());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_export_is_the_longest_exported_prefix_and_the_rest_is_looked_up() {
    let tree = tree();
    let nested = tree.export.join("a/b");
    let server = Ganesha::start_exports(&[&tree.export, &nested]);
    let opts = options(Duration::from_secs(10), 2);

    // Deeper than the outer export only: walk a/ from it.
    let source = connect(&server.url(tree.export.join("a")), &opts).await;
    assert_eq!(source.export(), tree.export.to_str().unwrap());
    let (root, attr) = source.root().await.unwrap();
    assert_eq!(
        attr.fileid,
        std::fs::metadata(tree.export.join("a")).unwrap().ino()
    );
    let mut names: Vec<_> = source
        .read_dir(&root)
        .await
        .unwrap()
        .into_iter()
        .map(|e| String::from_utf8(e.name).unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["b", "link"]);

    // Inside the nested export: that one is mounted, c/ is walked.
    let source = connect(&server.url(nested.join("c")), &opts).await;
    assert_eq!(source.export(), nested.to_str().unwrap());
    let (root, attr) = source.root().await.unwrap();
    assert_eq!(
        attr.fileid,
        std::fs::metadata(nested.join("c")).unwrap().ino()
    );
    let (file, attr) = source.lookup(&root, b"deep.txt").await.unwrap();
    assert_eq!(attr.size, 4);
    assert_eq!(source.read(&file, 0, 100).await.unwrap(), b"deep");

    // Mistakes are refused with a message naming the server and the path.
    let host = server.host().to_string();
    let outside = tree.export.parent().unwrap().join("elsewhere");
    let err = connect_err(&server.url(&outside)).await;
    let text = err.to_string();
    assert!(matches!(err, SourceError::Invalid(_)), "{err:?}");
    assert!(
        text.contains(&format!(
            "no export of {host} contains {}",
            outside.display()
        )) && text.contains(tree.export.to_str().unwrap()),
        "{text}"
    );

    let err = connect_err(&server.url(tree.export.join("a/missing/x"))).await;
    assert!(matches!(err, SourceError::Invalid(_)), "{err:?}");
    assert!(
        err.to_string().contains(&format!(
            "'missing' does not exist in {} (export {})",
            tree.export.join("a").display(),
            tree.export.display()
        )),
        "{err}"
    );
    let err = connect_err(&server.url(tree.export.join("nothing"))).await;
    assert!(
        err.to_string().contains(&format!(
            "'nothing' does not exist in export {}",
            tree.export.display()
        )),
        "{err}"
    );
    let err = connect_err(&server.url(tree.export.join("small.txt"))).await;
    assert!(matches!(err, SourceError::Invalid(_)), "{err:?}");
    assert!(
        err.to_string().contains(&format!(
            "{} is not a directory",
            tree.export.join("small.txt").display()
        )),
        "{err}"
    );
    let err = connect_err(&server.url(tree.export.join("small.txt/x"))).await;
    assert!(err.to_string().contains("is not a directory"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_getattr_read_dir_and_read_link_on_a_tree() {
    let tree = tree();
    let server = Ganesha::start(&tree.export);
    let source = connect(
        &server.url(&tree.export),
        &options(Duration::from_secs(10), 4),
    )
    .await;
    let (root, _) = source.root().await.unwrap();

    let mut listing = source.read_dir(&root).await.unwrap();
    listing.sort_by(|a, b| a.name.cmp(&b.name));
    let summary: Vec<_> = listing
        .iter()
        .map(|e| {
            (
                String::from_utf8(e.name.clone()).unwrap(),
                e.attr.kind,
                e.attr.size,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("a".to_string(), Kind::Directory, summary[0].2),
            ("empty".to_string(), Kind::File, 0),
            ("small.txt".to_string(), Kind::File, 11),
        ]
    );

    // Attributes as the local file system has them.
    let small = &listing[2];
    let meta = std::fs::symlink_metadata(tree.export.join("small.txt")).unwrap();
    assert_eq!(small.attr.perm, 0o640);
    assert_eq!((small.attr.uid, small.attr.gid), (meta.uid(), meta.gid()));
    assert_eq!(small.attr.fileid, meta.ino());
    assert_eq!(small.attr.nlink, 1);
    assert_eq!(small.attr.mtime.secs, meta.mtime());
    assert_eq!(small.attr.mtime.nanos as i64, meta.mtime_nsec());
    assert_eq!(source.getattr(&small.handle).await.unwrap(), small.attr);
    assert_eq!(
        source.read(&small.handle, 0, 4096).await.unwrap(),
        b"hello, nfs\n"
    );
    assert_eq!(source.read(&small.handle, 7, 3).await.unwrap(), b"nfs");

    // A 0-byte file.
    let (empty, attr) = source.lookup(&root, b"empty").await.unwrap();
    assert_eq!(attr.size, 0);
    assert_eq!(source.read(&empty, 0, 4096).await.unwrap(), b"");

    // Nested directories, and a symlink that is reported, not followed.
    let (a, _) = source.lookup(&root, b"a").await.unwrap();
    let (link, attr) = source.lookup(&a, b"link").await.unwrap();
    assert_eq!(attr.kind, Kind::Symlink);
    assert_eq!(attr.size, "b/c/deep.txt".len() as u64);
    assert_eq!(source.read_link(&link).await.unwrap(), b"b/c/deep.txt");
    let (b, _) = source.lookup(&a, b"b").await.unwrap();
    let (c, attr) = source.lookup(&b, b"c").await.unwrap();
    assert_eq!(attr.kind, Kind::Directory);
    let in_c = source.read_dir(&c).await.unwrap();
    assert_eq!(in_c.len(), 1);
    assert_eq!(in_c[0].name, b"deep.txt");
    assert_eq!(source.read(&in_c[0].handle, 0, 10).await.unwrap(), b"deep");

    // Errors carry the errno a FUSE caller should see.
    let err = source.lookup(&root, b"missing").await.unwrap_err();
    assert_eq!(err.errno(), libc::ENOENT, "{err}");
    assert!(err.to_string().contains("missing"), "{err}");
    let err = source.lookup(&empty, b"x").await.unwrap_err();
    assert_eq!(err.errno(), libc::ENOTDIR, "{err}");
    let err = source.read_link(&empty).await.unwrap_err();
    assert!(!err.is_unavailable(), "{err}");
    let err = source.read_dir(&empty).await.unwrap_err();
    assert_eq!(err.errno(), libc::ENOTDIR, "{err}");
    let err = source.lookup(&root, b"..").await.unwrap_err();
    assert_eq!(err.errno(), libc::EINVAL, "{err}");
    let bogus = reservoir::source::Handle(vec![1, 2, 3].into_boxed_slice());
    let err = source.getattr(&bogus).await.unwrap_err();
    assert_eq!(err.errno(), libc::ESTALE, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_reads_are_split_over_the_pool_and_exact() {
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("export");
    std::fs::create_dir(&export).unwrap();
    let size = 9 * 1024 * 1024 + 12_345;
    let data = pattern(size, 7);
    std::fs::write(export.join("big.bin"), &data).unwrap();
    let server = Ganesha::start(&export);

    for connections in [1, 4, 16] {
        let source = connect(
            &server.url(&export),
            &options(Duration::from_secs(20), connections),
        )
        .await;
        let piece = source.read_size() as usize;
        assert!(piece < size, "the file must span several READs");
        let (root, _) = source.root().await.unwrap();
        let (file, attr) = source.lookup(&root, b"big.bin").await.unwrap();
        assert_eq!(attr.size, size as u64);

        // The whole file in one call (more than asked: fewer at EOF), twice to warm the server.
        let mut whole = Vec::new();
        let mut best = Duration::MAX;
        for _ in 0..3 {
            let started = Instant::now();
            whole = source.read(&file, 0, (size + 1000) as u32).await.unwrap();
            best = best.min(started.elapsed());
        }
        assert_eq!(whole.len(), size);
        assert!(whole == data, "content differs");
        eprintln!(
            "read {} MiB with {connections} connection(s), {} KiB READs: {:.0} MiB/s",
            size >> 20,
            piece >> 10,
            size as f64 / (1 << 20) as f64 / best.as_secs_f64()
        );

        // Ranges crossing piece boundaries, at odd offsets.
        for (offset, len) in [
            (piece - 1, 2),
            (piece - 100, piece + 200),
            (3 * piece + 17, 2 * piece + 1),
            (12_345, 3 * piece),
            (size - piece - 5, piece + 5),
        ] {
            let got = source.read(&file, offset as u64, len as u32).await.unwrap();
            assert_eq!(got.len(), len, "read {offset}+{len}");
            assert!(
                got == data[offset..offset + len],
                "read {offset}+{len} differs"
            );
        }

        // At and after the end of the file.
        let tail = source
            .read(&file, (size - 10) as u64, 3 * piece as u32)
            .await
            .unwrap();
        assert!(tail == data[size - 10..]);
        assert!(
            source
                .read(&file, size as u64, 100)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            source
                .read(&file, size as u64 + 5000, 3 * piece as u32)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(source.read(&file, 0, 0).await.unwrap().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_of_thousands_of_entries_is_listed_completely() {
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("export");
    let many = export.join("many");
    std::fs::create_dir_all(&many).unwrap();
    let count = 5_500;
    for i in 0..count {
        std::fs::write(
            many.join(format!("entry-with-a-fairly-long-name-{i:05}")),
            i.to_string(),
        )
        .unwrap();
    }
    std::fs::create_dir(many.join("subdir")).unwrap();
    let server = Ganesha::start(&export);
    let source = connect(&server.url(&many), &options(Duration::from_secs(20), 4)).await;
    let (root, _) = source.root().await.unwrap();

    let mut best = Duration::MAX;
    let mut listing = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        listing = source.read_dir(&root).await.unwrap();
        best = best.min(started.elapsed());
    }
    eprintln!("listed {} entries in {best:?}", listing.len());
    assert_eq!(listing.len(), count + 1);
    let mut names: Vec<_> = listing.iter().map(|e| e.name.clone()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), count + 1, "duplicate entries");
    for entry in &listing {
        if entry.name == b"subdir" {
            assert_eq!(entry.attr.kind, Kind::Directory);
            continue;
        }
        let name = std::str::from_utf8(&entry.name).unwrap();
        let i: usize = name.rsplit('-').next().unwrap().parse().unwrap();
        assert_eq!(entry.attr.kind, Kind::File);
        assert_eq!(entry.attr.size, i.to_string().len() as u64, "{name}");
    }
    // Handles from the listing work.
    let last = listing.iter().find(|e| e.name.ends_with(b"05499")).unwrap();
    assert_eq!(source.read(&last.handle, 0, 10).await.unwrap(), b"5499");
}

/// What tells a `pvc://` claim's share apart as one kubelet could mount but the NFSv3 client
/// cannot read (the node then reads the claim through a source pod): a server that speaks
/// NFSv4 only, and an NFSv4 pseudo path. A server that is down is no such share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_only_nfsv4_serves_are_told_apart_from_unreachable_ones() {
    use reservoir::csi::claims::nfs_v3_refusal;
    let tree = tree();
    let v4 = Ganesha::start_v4_only(&tree.export);
    let err = connect_err(&v4.url(&tree.export)).await;
    assert!(matches!(err, SourceError::NotOffered { .. }), "{err}");
    let why = nfs_v3_refusal(&err).expect("a v4-only server is told apart");
    assert!(why.contains("NFSv4 only"), "{why}");
    drop(v4);

    let mut v3 = Ganesha::start(&tree.export);
    // Ganesha's NFSv4 pseudo path of its first export (NFSv3 knows only the export's path).
    let pseudo = format!("nfs://{}/export1", v3.host());
    let err = connect_err(&pseudo).await;
    let why = nfs_v3_refusal(&err).unwrap_or_else(|| panic!("a pseudo path: {err}"));
    assert!(why.contains("pseudo path"), "{why}");

    v3.stop();
    let err = connect_err(&v3.url(&tree.export)).await;
    assert_eq!(nfs_v3_refusal(&err), None, "a stopped server: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_fails_fast_and_a_restarted_one_serves_the_same_handles() {
    let tree = tree();
    let mut server = Ganesha::start(&tree.export);
    let timeout = Duration::from_secs(10);
    let source = connect(&server.url(&tree.export), &options(timeout, 4)).await;
    let (root, _) = source.root().await.unwrap();
    let (small, attr) = source.lookup(&root, b"small.txt").await.unwrap();

    server.stop();
    for attempt in 0..3 {
        let started = Instant::now();
        let err = source.getattr(&small).await.unwrap_err();
        assert_unavailable(&err, &format!("getattr #{attempt}"));
        assert!(err.is_unavailable());
        assert_eq!(err.errno(), libc::EIO);
        let err = source.read(&small, 0, 100).await.unwrap_err();
        assert_unavailable(&err, "read");
        let err = source.read_dir(&root).await.unwrap_err();
        assert_unavailable(&err, "read_dir");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "failing took {:?}",
            started.elapsed()
        );
    }
    // Opening a source on a server that is down says so (the caller may start from its cache).
    for url in [
        server.url(&tree.export),
        server.url_with_ports(&tree.export),
    ] {
        let started = Instant::now();
        let err = connect_err(&url).await;
        assert_unavailable(&err, &format!("connect {url}"));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    // Reading moves atime; everything else stays.
    let same = |a: &Attr, b: &Attr| {
        (a.fileid, a.size, a.mtime, a.kind) == (b.fileid, b.size, b.mtime, b.kind)
    };
    server.restart();
    assert!(same(&source.getattr(&small).await.unwrap(), &attr));
    assert_eq!(source.read(&small, 0, 100).await.unwrap(), b"hello, nfs\n");
    assert_eq!(source.read_dir(&root).await.unwrap().len(), 3);

    // A restart while connections sit in the pool: the stale ones are replaced transparently.
    server.restart();
    for _ in 0..8 {
        assert!(same(&source.getattr(&small).await.unwrap(), &attr));
    }
    let (_, again) = source.lookup(&root, b"small.txt").await.unwrap();
    assert!(same(&again, &attr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_times_out_and_recovers_when_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("export");
    std::fs::create_dir(&export).unwrap();
    let data = pattern(4 * 1024 * 1024, 3);
    std::fs::write(export.join("file.bin"), &data).unwrap();
    let mut server = Ganesha::start(&export);
    let timeout = Duration::from_secs(2);
    let source = connect(&server.url(&export), &options(timeout, 4)).await;
    let (root, _) = source.root().await.unwrap();
    let (file, _) = source.lookup(&root, b"file.bin").await.unwrap();

    server.pause();
    let started = Instant::now();
    let err = source.getattr(&file).await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, SourceError::Timeout { .. }), "{err:?}");
    assert!(err.is_unavailable());
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(2),
        "took {took:?}"
    );

    // A read split over several connections is bounded by one timeout too.
    let started = Instant::now();
    let err = source.read(&file, 0, data.len() as u32).await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, SourceError::Timeout { .. }), "{err:?}");
    assert!(took < timeout + Duration::from_secs(2), "took {took:?}");

    // Opening a source on a frozen server times out as well.
    let started = Instant::now();
    let err = match NfsSource::connect(&nfs_url(&server.url(&export)), &options(timeout, 2)).await {
        Ok(_) => panic!("connect to a paused server succeeded"),
        Err(e) => e,
    };
    assert!(matches!(err, SourceError::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() < 3 * timeout + Duration::from_secs(1));

    server.resume();
    let got = source.read(&file, 0, data.len() as u32).await.unwrap();
    assert!(got == data);
    source.getattr(&file).await.unwrap();
}

/// Concurrent readers of one uncached block share one fetch, through the volume core over a
/// real source: the server is paused while they arrive, so every reader is waiting before the
/// first fetch can finish; with the sharing broken each would fetch the block itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_of_a_block_share_one_fetch() {
    use reservoir::cache::{Cache, CacheConfig};
    use reservoir::fs::{Volume, VolumeConfig};

    const READERS: usize = 8;
    const BLOCK: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("export");
    std::fs::create_dir(&export).unwrap();
    // Eight blocks: the last one is out of reach of the open's prefetch.
    let data = pattern(8 * BLOCK, 9);
    std::fs::write(export.join("file.bin"), &data).unwrap();
    let mut server = Ganesha::start(&export);
    let cache = Cache::open(CacheConfig {
        dir: dir.path().join("cache"),
        capacity: 256 << 20,
        high_watermark: 0.95,
        low_watermark: 0.85,
        block_size: BLOCK as u32,
    })
    .unwrap();
    let spec: SourceSpec = server.url(&export).parse().unwrap();
    let volume = Volume::open(
        spec,
        options(Duration::from_secs(30), 16),
        Some(cache),
        VolumeConfig {
            metadata_ttl: reservoir::units::Ttl::Forever,
            read_write: false,
            idle_nodes: reservoir::fs::DEFAULT_IDLE_NODES,
        },
    )
    .await
    .unwrap();
    let entry = volume.resolve(b"file.bin").await.unwrap();
    let file = volume.open_file(entry.ino, false).await.unwrap();
    assert!(file.lease.is_some(), "the file is admitted to the cache");
    // An open fetches the first blocks at once (for small files); let that finish.
    let deadline = Instant::now() + Duration::from_secs(30);
    while volume.status().bytes_fetched < 4 * BLOCK as u64 {
        assert!(
            Instant::now() < deadline,
            "the open's prefetch did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = volume.status().bytes_fetched;

    server.pause();
    // The last block: no read-ahead follows it.
    let offset = (7 * BLOCK) as u64;
    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            let (volume, file) = (volume.clone(), file.clone());
            tokio::spawn(async move { volume.read(&file, offset, BLOCK as u32).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.resume();
    for reader in readers {
        let got = reader.await.unwrap().unwrap();
        assert!(got == data[7 * BLOCK..], "a reader got wrong bytes");
    }
    assert_eq!(
        volume.status().bytes_fetched - before,
        BLOCK as u64,
        "{READERS} readers of one block fetched it more than once"
    );
    tokio::task::block_in_place(|| volume.finish());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_cleans_up_its_namespace() {
    let tree = tree();
    let server = Ganesha::start(&tree.export);
    let netns = server.netns().to_string();
    let pid = server.pid().unwrap();
    assert!(netns_exists(&netns));
    drop(server);
    assert!(!netns_exists(&netns), "{netns} left behind");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "ganesha {pid} left behind"
    );
}

fn netns_exists(name: &str) -> bool {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|line| line.split_whitespace().next() == Some(name))
}

/// Throughput on this machine, side by side with libnfs' `nfs-cat` on the same server:
/// `cargo test --release --test nfs_source -- --ignored --nocapture throughput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn throughput() {
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("export");
    std::fs::create_dir(&export).unwrap();
    let size = 256 << 20;
    std::fs::write(export.join("big.bin"), pattern(size, 11)).unwrap();
    let server = Ganesha::start(&export);
    let file_url = format!("{}/big.bin", server.url(&export));
    let mib = |elapsed: Duration| size as f64 / (1 << 20) as f64 / elapsed.as_secs_f64();
    for round in 0..2 {
        if std::process::Command::new("nfs-cat")
            .arg("--help")
            .output()
            .is_ok()
        {
            let started = Instant::now();
            let out = std::process::Command::new("sh")
                .args(["-c", &format!("nfs-cat '{file_url}' | wc -c")])
                .output()
                .unwrap();
            let elapsed = started.elapsed();
            let copied: usize = String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .unwrap_or(0);
            assert_eq!(copied, size);
            eprintln!("round {round}: nfs-cat: {:.0} MiB/s", mib(elapsed));
        }
        for (connections, chunk) in [(1, 1 << 20), (4, 8 << 20), (16, 8 << 20), (16, 32 << 20)] {
            let source = connect(
                &server.url(&export),
                &options(Duration::from_secs(30), connections),
            )
            .await;
            let (root, _) = source.root().await.unwrap();
            let (file, _) = source.lookup(&root, b"big.bin").await.unwrap();
            let started = Instant::now();
            let mut offset = 0u64;
            while offset < size as u64 {
                let got = source.read(&file, offset, chunk).await.unwrap();
                assert!(!got.is_empty());
                offset += got.len() as u64;
            }
            eprintln!(
                "round {round}: NfsSource, {connections} connection(s), {} MiB per read(): {:.0} MiB/s",
                chunk >> 20,
                mib(started.elapsed())
            );
        }
    }
}

/// The path property of issue 15 for NFS sources: a volume rooted at `export/root` never shows,
/// reads or changes `export/outside`, whatever names it is asked for (`..`, `.`, `/`, NUL,
/// multi-component names), whatever symlinks the tree holds (to `../outside`, to an absolute
/// path), and while the server's `root/swap` flips between a directory and a symlink to the
/// outside (`common::paths`, shared with `tests/source_paths.rs`). Handles come only from the
/// server's own answers, as in the file system: the kernel names files by inode number, never
/// by handle. `RESERVOIR_MODEL_CASES` sets the number of cases (32 by default; `make model`
/// runs more).
mod nfs_paths {
    use super::*;
    use common::paths::{
        Swapper, cases, make_outside, make_root, probe_strategy, run_probe, snapshot,
    };
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_name_symlink_or_race_reaches_outside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let export = dir.path().join("export");
        let (root, outside) = (export.join("root"), export.join("outside"));
        let mut outside_inodes = make_outside(&outside);
        outside_inodes.push(std::fs::metadata(&export).unwrap().ino());
        let before = snapshot(&outside);
        make_root(&root, &outside);
        let server = Ganesha::start(&export);
        let url = server.url(&root);
        let opts = options(Duration::from_secs(5), 2);

        let mut runner = TestRunner::new_with_rng(
            Config {
                cases: cases(32),
                failure_persistence: None,
                ..Config::default()
            },
            TestRng::from_seed(RngAlgorithm::ChaCha, &[0x15; 32]),
        );
        let result = tokio::task::block_in_place(|| {
            // A probe names one of the handles the server has given so far (the root first).
            let probes = prop::collection::vec(probe_strategy(0..64usize), 1..30);
            runner.run(&probes, |probes| {
                make_root(&root, &outside);
                let swapper = Swapper::start(&root, &outside);
                let outcome = tokio::runtime::Handle::current().block_on(async {
                    let source = NfsSource::connect(&nfs_url(&url), &opts)
                        .await
                        .map_err(|e| e.to_string())?;
                    let (root_handle, _) = source.root().await.map_err(|e| e.to_string())?;
                    let mut known = vec![root_handle];
                    for p in &probes {
                        let dir = known[p.target() % known.len()].clone();
                        known.extend(run_probe(&source, &dir, p, &outside_inodes).await?);
                    }
                    Ok::<(), String>(())
                });
                drop(swapper);
                outcome.map_err(TestCaseError::fail)?;
                prop_assert_eq!(snapshot(&outside), before.clone(), "the outside changed");
                Ok(())
            })
        });
        if let Err(e) = result {
            panic!("{e}\n{}", server.log_tail());
        }
    }
}

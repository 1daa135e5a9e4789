//! Benchmark of read-write volumes: a checkpoint-like sequential write of 1 GiB (4 MiB
//! `write()` calls, then `fsync`, then `close`) through `reservoir mount --read-write`, side by
//! side with the same write straight to the source: to the directory itself for a directory
//! source, and through our own NFS client (`NfsSource`, the same calls the mount makes) for an
//! NFS source. Rounds alternate between the two ways so that a noisy machine hurts both alike.
//!
//! Run it with `make bench-writes`
//! (`cargo test --release --test write_bench -- --ignored --nocapture`); it prints a Markdown
//! table for docs/benchmarks.md. Needs root, /dev/fuse and nfs-ganesha, like the other tests.

mod common;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use common::ganesha::Ganesha;
use common::mount::{Dirs, Mount};
use reservoir::source::nfs::NfsSource;
use reservoir::source::{Owner, Source, SourceOptions, SourceSpec, SourceWrite};

const SIZE: usize = 1 << 30;
const CHUNK: usize = 4 << 20;
const ROUNDS: usize = 3;
const MOUNT_ARGS: [&str; 3] = ["--read-write", "--cache-size", "4Gi"];

/// A chunk of incompressible-looking bytes, written over and over.
fn chunk() -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(7);
    (0..CHUNK).map(|_| rng.u8(..)).collect()
}

fn drop_caches() {
    let _ = std::process::Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// Writes SIZE bytes to a new file at `path` with `write(2)`, then fsync and close.
fn write_file(path: &Path, data: &[u8]) -> Duration {
    drop_caches();
    let started = Instant::now();
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .unwrap();
    for _ in 0..SIZE / CHUNK {
        file.write_all(data).unwrap();
    }
    file.sync_all().unwrap();
    drop(file);
    let elapsed = started.elapsed();
    assert_eq!(std::fs::metadata(path).unwrap().len(), SIZE as u64);
    std::fs::remove_file(path).unwrap();
    elapsed
}

/// Writes SIZE bytes to a new file through `NfsSource` (4 MiB calls, one at a time, as an
/// application's sequential writes), then COMMIT.
async fn write_nfs(source: &NfsSource, name: &str, data: &[u8]) -> Duration {
    drop_caches();
    let started = Instant::now();
    let (root, _) = source.root().await.unwrap();
    let owner = Owner { uid: 0, gid: 0 };
    let (file, _) = source
        .create(&root, name.as_bytes(), 0o644, owner, true)
        .await
        .unwrap();
    for i in 0..SIZE / CHUNK {
        source.write(&file, (i * CHUNK) as u64, data).await.unwrap();
    }
    source.commit(&file).await.unwrap();
    let elapsed = started.elapsed();
    source.remove(&root, name.as_bytes()).await.unwrap();
    elapsed
}

fn mib_s(elapsed: Duration) -> f64 {
    SIZE as f64 / (1 << 20) as f64 / elapsed.as_secs_f64()
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn row(what: &str, direct_label: &str, direct: Vec<Duration>, mounted: Vec<Duration>) -> String {
    let (direct, mounted) = (median(direct), median(mounted));
    format!(
        "| {what} | {direct_label} | {:.0} | {:.0} | {:.2} |",
        mib_s(direct),
        mib_s(mounted),
        mib_s(mounted) / mib_s(direct)
    )
}

#[test]
#[ignore = "benchmark"]
fn sequential_checkpoint_write() {
    let data = chunk();
    let mut rows = Vec::new();

    // A directory source.
    let dirs = Dirs::new();
    let src = dirs.path("src");
    std::fs::create_dir(&src).unwrap();
    let mount = Mount::start(&dirs, src.to_str().unwrap(), &MOUNT_ARGS);
    let (mut direct, mut mounted) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        direct.push(write_file(&src.join(format!("direct-{round}")), &data));
        mounted.push(write_file(
            &dirs.mnt.join(format!("mounted-{round}")),
            &data,
        ));
        eprintln!(
            "directory round {round}: direct {:.0} MiB/s, through the mount {:.0} MiB/s",
            mib_s(direct[round]),
            mib_s(mounted[round])
        );
    }
    drop(mount);
    rows.push(row(
        "directory source",
        "write(2) to the directory",
        direct,
        mounted,
    ));

    // An NFS source (ganesha in its own network namespace, over a veth pair).
    let dirs = Dirs::new();
    let export = dirs.path("export");
    std::fs::create_dir(&export).unwrap();
    let server = Ganesha::start(&export);
    let url = server.url_with_ports(&export);
    let mount = Mount::start(&dirs, &url, &MOUNT_ARGS);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let Ok(SourceSpec::Nfs(spec)) = url.parse::<SourceSpec>() else {
        panic!("bad NFS URL {url}");
    };
    let options = SourceOptions {
        timeout: Duration::from_secs(60),
        connections: 16,
    };
    let client = runtime
        .block_on(NfsSource::connect(&spec, &options))
        .unwrap();
    let (mut direct, mut mounted) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        direct.push(runtime.block_on(write_nfs(&client, &format!("direct-{round}"), &data)));
        mounted.push(write_file(
            &dirs.mnt.join(format!("mounted-{round}")),
            &data,
        ));
        eprintln!(
            "NFS round {round}: NfsSource {:.0} MiB/s, through the mount {:.0} MiB/s",
            mib_s(direct[round]),
            mib_s(mounted[round])
        );
    }
    drop(mount);
    drop(client);
    drop(server);
    rows.push(row(
        "NFS source (ganesha)",
        "`NfsSource` writes + COMMIT",
        direct,
        mounted,
    ));

    println!("\n| source | direct way | direct MiB/s | through the mount MiB/s | ratio |");
    println!("|---|---|---:|---:|---:|");
    for row in rows {
        println!("{row}");
    }
}

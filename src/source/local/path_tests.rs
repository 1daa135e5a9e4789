//! Path properties of a directory source: whatever names and handles it is given, whatever
//! symlinks the tree holds, and while someone swaps a directory for a symlink to the outside,
//! nothing outside the root is shown, read or written.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

use super::*;
use crate::source::Owner;

const SECRET: &[u8] = b"SECRET-OUTSIDE-THE-ROOT";

/// Names and handle pieces an attacker would try, and ordinary ones that exist.
const PIECES: [&[u8]; 16] = [
    b"..",
    b".",
    b"",
    b"/",
    b"d",
    b"f",
    b"up",
    b"abs",
    b"swap",
    b"new",
    b"../outside",
    b"d/../..",
    b"/etc/passwd",
    b"secret",
    b"a\0b",
    b"swap/secret",
];

#[derive(Clone, Debug)]
enum Probe {
    Lookup(Vec<usize>),
    ReadDir(Vec<usize>),
    Read(Vec<usize>),
    ReadLink(Vec<usize>),
    Create(Vec<usize>, usize),
    Mkdir(Vec<usize>, usize),
    Write(Vec<usize>),
    Truncate(Vec<usize>),
    Rename(Vec<usize>, usize, usize),
    Remove(Vec<usize>, usize),
}

fn handle_strategy() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(0..PIECES.len(), 0..4)
}

fn probe_strategy() -> impl Strategy<Value = Probe> {
    let name = 0..PIECES.len();
    prop_oneof![
        handle_strategy().prop_map(Probe::Lookup),
        handle_strategy().prop_map(Probe::ReadDir),
        handle_strategy().prop_map(Probe::Read),
        handle_strategy().prop_map(Probe::ReadLink),
        (handle_strategy(), name.clone()).prop_map(|(h, n)| Probe::Create(h, n)),
        (handle_strategy(), name.clone()).prop_map(|(h, n)| Probe::Mkdir(h, n)),
        handle_strategy().prop_map(Probe::Write),
        handle_strategy().prop_map(Probe::Truncate),
        (handle_strategy(), name.clone(), name.clone())
            .prop_map(|(h, a, b)| Probe::Rename(h, a, b)),
        (handle_strategy(), name).prop_map(|(h, n)| Probe::Remove(h, n)),
    ]
}

/// A handle made of pieces joined by `/` (so `..`, empty components and absolute paths occur).
fn handle(pieces: &[usize]) -> Handle {
    let joined: Vec<&[u8]> = pieces.iter().map(|&i| PIECES[i]).collect();
    Handle(joined.join(&b'/').into_boxed_slice())
}

/// Everything under `dir`: paths and file contents, to compare before and after.
fn snapshot(dir: &Path) -> Vec<(std::path::PathBuf, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&path) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).expect("stat");
            if meta.is_dir() {
                pending.push(path.clone());
                out.push((path, None));
            } else if meta.is_file() {
                out.push((path.clone(), Some(std::fs::read(&path).expect("read"))));
            } else {
                out.push((path, None));
            }
        }
    }
    out.sort();
    out
}

fn leaks(bytes: &[u8]) -> bool {
    bytes.windows(SECRET.len()).any(|w| w == SECRET)
}

async fn probe(
    source: &LocalSource,
    probe: &Probe,
    outside_inodes: &[u64],
) -> std::result::Result<(), String> {
    let owner = Owner {
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
    };
    match probe {
        Probe::Lookup(h) => {
            for name in PIECES {
                if let Ok((found, attr)) = source.lookup(&handle(h), name).await {
                    if attr.kind == Kind::File {
                        if let Ok(bytes) = source.read(&found, 0, 4096).await {
                            if leaks(&bytes) {
                                return Err(format!("{probe:?}: {name:?} read the secret"));
                            }
                        }
                    }
                }
            }
        }
        Probe::ReadDir(h) => {
            if let Ok(entries) = source.read_dir(&handle(h)).await {
                if let Some(e) = entries
                    .iter()
                    .find(|e| outside_inodes.contains(&e.attr.fileid))
                {
                    return Err(format!("{probe:?} listed the outside: {e:?}"));
                }
            }
        }
        Probe::Read(h) => {
            if let Ok(bytes) = source.read(&handle(h), 0, 4096).await {
                if leaks(&bytes) {
                    return Err(format!("{probe:?} read the secret"));
                }
            }
        }
        Probe::ReadLink(h) => {
            // A symlink's target is shown as it is (that is its content), never followed.
            let _target = source.read_link(&handle(h)).await;
        }
        Probe::Create(h, n) => {
            if let Ok((created, _)) = source
                .create(&handle(h), PIECES[*n], 0o644, owner, false)
                .await
            {
                if let Ok(bytes) = source.read(&created, 0, 4096).await {
                    if leaks(&bytes) {
                        return Err(format!("{probe:?} opened the secret"));
                    }
                }
                let _written = source.write(&created, 0, b"pwned").await;
            }
        }
        Probe::Mkdir(h, n) => {
            let _made = source.mkdir(&handle(h), PIECES[*n], 0o755, owner).await;
        }
        Probe::Write(h) => {
            let _written = source.write(&handle(h), 0, b"pwned").await;
            if let Ok(Some(writer)) = source.open_writer(&handle(h)).await {
                let _written = writer.write(0, b"pwned".to_vec()).await;
            }
            if let Some(Ok(fd)) = source.open_passthrough(&handle(h)) {
                let _written = nix::sys::uio::pwrite(&fd, b"pwned", 0);
            }
        }
        Probe::Truncate(h) => {
            let changes = SetAttr {
                size: Some(0),
                perm: Some(0o777),
                ..SetAttr::default()
            };
            let _changed = source.setattr(&handle(h), &changes).await;
        }
        Probe::Rename(h, a, b) => {
            let _renamed = source
                .rename(&handle(h), PIECES[*a], &handle(h), PIECES[*b])
                .await;
        }
        Probe::Remove(h, n) => {
            let _removed = source.remove(&handle(h), PIECES[*n]).await;
            let _removed = source.rmdir(&handle(h), PIECES[*n]).await;
        }
    }
    Ok(())
}

/// Builds a root full of traps next to an `outside` directory holding the secret.
fn trap(base: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let outside = base.join("outside");
    let root = base.join("root");
    std::fs::create_dir_all(outside.join("d")).expect("mkdir");
    std::fs::write(outside.join("secret"), SECRET).expect("write");
    std::fs::write(outside.join("d/f"), SECRET).expect("write");
    std::fs::create_dir_all(root.join("d")).expect("mkdir");
    std::fs::create_dir_all(root.join("swap")).expect("mkdir");
    std::fs::write(root.join("f"), b"inside").expect("write");
    std::fs::write(root.join("d/f"), b"inside").expect("write");
    symlink("../outside", root.join("up")).expect("symlink");
    symlink(&outside, root.join("abs")).expect("symlink");
    symlink(outside.join("secret"), root.join("d/secret")).expect("symlink");
    (root, outside)
}

/// Swaps `root/swap` between a directory and a symlink to the outside until told to stop.
/// (It never writes through the name: a probe may have renamed a symlink onto it.)
fn swapper(root: std::path::PathBuf, outside: std::path::PathBuf, stop: Arc<AtomicBool>) {
    let swap = root.join("swap");
    while !stop.load(Ordering::Relaxed) {
        let _ = std::fs::remove_dir(&swap).or_else(|_| std::fs::remove_file(&swap));
        let _ = symlink(&outside, &swap);
        std::thread::yield_now();
        let _ = std::fs::remove_file(&swap);
        let _ = std::fs::create_dir(&swap);
        std::thread::yield_now();
    }
}

#[test]
fn no_name_handle_symlink_or_race_reaches_outside_the_root() {
    let cases = std::env::var("RESERVOIR_MODEL_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(64);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &[0x15; 32]),
    );
    let result = runner.run(&prop::collection::vec(probe_strategy(), 1..30), |probes| {
        let base = tempfile::tempdir().expect("tempdir");
        let (root, outside) = trap(base.path());
        let before = snapshot(&outside);
        let outside_inodes: Vec<u64> = ["secret", "d", "d/f"]
            .iter()
            .map(|p| {
                std::os::unix::fs::MetadataExt::ino(
                    &std::fs::metadata(outside.join(p)).expect("stat"),
                )
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let racer = {
            let (root, outside, stop) = (root.clone(), outside.clone(), stop.clone());
            std::thread::spawn(move || swapper(root, outside, stop))
        };
        let outcome = runtime.block_on(async {
            let source = LocalSource::open(
                &root,
                &SourceOptions {
                    timeout: Duration::from_secs(5),
                    connections: 1,
                },
            )
            .await
            .map_err(|e| e.to_string())?;
            for p in &probes {
                probe(&source, p, &outside_inodes).await?;
            }
            Ok::<(), String>(())
        });
        stop.store(true, Ordering::Relaxed);
        racer.join().expect("the swapper ends");
        outcome.map_err(TestCaseError::fail)?;
        prop_assert_eq!(snapshot(&outside), before, "the outside changed");
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

//! Path properties of a directory source: whatever names and handles it is given, whatever
//! symlinks the tree holds, and while someone swaps a directory for a symlink to the outside,
//! nothing outside the root is shown, read or written. (`tests/nfs_source.rs` has the same
//! property for NFS sources.) `RESERVOIR_MODEL_CASES` sets the number of cases (64 by default;
//! `make model` runs more).

mod common;

use std::time::Duration;

use common::paths::{
    NAMES, Swapper, cases, make_outside, make_root, probe_strategy, run_probe, snapshot,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use reservoir::source::local::LocalSource;
use reservoir::source::{Handle, SourceOptions};

/// A handle of a directory source is a path: probes forge theirs from names joined by `/` (so
/// `..`, empty components and absolute paths occur).
fn forged() -> impl Strategy<Value = Vec<usize>> + Clone {
    prop::collection::vec(0..NAMES.len(), 0..4)
}

fn handle(pieces: &[usize]) -> Handle {
    let joined: Vec<&[u8]> = pieces.iter().map(|&i| NAMES[i]).collect();
    Handle(joined.join(&b'/').into_boxed_slice())
}

#[test]
fn no_name_handle_symlink_or_race_reaches_outside_the_root() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: cases(64),
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &[0x15; 32]),
    );
    let probes = prop::collection::vec(probe_strategy(forged()), 1..30);
    let result = runner.run(&probes, |probes| {
        let base = tempfile::tempdir().expect("tempdir");
        let (root, outside) = (base.path().join("root"), base.path().join("outside"));
        let outside_inodes = make_outside(&outside);
        make_root(&root, &outside);
        let before = snapshot(&outside);
        let swapper = Swapper::start(&root, &outside);
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
                run_probe(&source, &handle(p.target()), p, &outside_inodes).await?;
            }
            Ok::<(), String>(())
        });
        drop(swapper);
        outcome.map_err(TestCaseError::fail)?;
        prop_assert_eq!(snapshot(&outside), before, "the outside changed");
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

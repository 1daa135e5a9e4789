//! A precise load generator for benchmarks: walks a tree, stats or reads every file, reads a
//! single file sequentially, and prints one JSON line with what it did and how long it took.
//!
//! ```text
//! readtree stat PATH [--threads N]                 # readdir + lstat of every entry
//! readtree read PATH [--threads N] [--shuffle S]   # walk, then read every regular file fully
//! readtree read-file FILE                          # sequential read with a 1 MiB buffer
//! readtree read-random FILE [--count N] [--threads N] [--seed S]
//!                                                  # N reads of 1 MiB at random aligned offsets
//! ```
//!
//! Output: `{"files":F,"bytes":B,"seconds":S,...}`; for `stat`, `files` counts every entry
//! lstat'ed (directories too) and `bytes` sums the sizes of regular files. Any I/O error is reported on stderr and
//! makes the exit status non-zero (the JSON line is still printed, with `"errors"`).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Instant;

use clap::{Parser, Subcommand};

/// Size of the read buffer.
const BUFFER: usize = 1 << 20;
/// Errors printed in full; the rest are only counted.
const ERRORS_SHOWN: u64 = 10;

#[derive(Parser)]
#[command(
    name = "readtree",
    about = "Walks, stats and reads file trees for benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Walk the tree: readdir and lstat of every entry.
    Stat {
        path: PathBuf,
        /// Threads sharing the walk through a queue of directories.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
        threads: u32,
    },
    /// Walk the tree, then read every regular file fully.
    Read {
        path: PathBuf,
        /// Threads for the walk and for the reads.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
        threads: u32,
        /// Read the files in an order shuffled with this seed (default: walk order).
        #[arg(long)]
        shuffle: Option<u64>,
    },
    /// Read one file sequentially.
    ReadFile { file: PathBuf },
    /// Read 1 MiB blocks at random 1 MiB-aligned offsets of one file (the order is seeded;
    /// threads share one sequence of offsets, each with its own file descriptor).
    ReadRandom {
        file: PathBuf,
        /// Blocks to read in all.
        #[arg(long, default_value_t = 256)]
        count: u64,
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
        threads: u32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

/// Counters shared by the worker threads.
#[derive(Default)]
struct Tally {
    files: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
}

impl Tally {
    fn add(&self, files: u64, bytes: u64) {
        self.files.fetch_add(files, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn error(&self, path: &Path, what: &str, e: &std::io::Error) {
        let seen = self.errors.fetch_add(1, Ordering::Relaxed);
        if seen < ERRORS_SHOWN {
            eprintln!("readtree: {what} {}: {e}", path.display());
        } else if seen == ERRORS_SHOWN {
            eprintln!("readtree: more errors follow; only counting them");
        }
    }
}

/// A queue of directories to walk, shared by several threads. The walk is over when the queue
/// is empty and no thread is still listing a directory (which could add more).
struct DirQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

struct QueueState {
    dirs: VecDeque<PathBuf>,
    busy: usize,
}

impl DirQueue {
    fn new(root: PathBuf) -> Self {
        DirQueue {
            state: Mutex::new(QueueState {
                dirs: VecDeque::from([root]),
                busy: 0,
            }),
            ready: Condvar::new(),
        }
    }

    /// The next directory to list, or `None` once the walk is over.
    fn next(&self) -> Option<PathBuf> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(dir) = state.dirs.pop_front() {
                state.busy += 1;
                return Some(dir);
            }
            if state.busy == 0 {
                return None;
            }
            state = self
                .ready
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Ends the listing of one directory, queueing the subdirectories it contained.
    fn done(&self, subdirs: Vec<PathBuf>) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.busy -= 1;
        state.dirs.extend(subdirs);
        // Waiters either have new work or, if this was the last busy lister, learn it is over.
        self.ready.notify_all();
    }
}

/// What the walk does with each entry of a directory.
#[derive(Clone, Copy, PartialEq)]
enum Walk {
    /// lstat every entry; count them all, and the sizes of regular files.
    Stat,
    /// Only list: use the type readdir gives, collect the regular files.
    List,
}

/// Lists one directory. Returns its subdirectories and (for [`Walk::List`]) its regular files.
fn list_dir(dir: &Path, walk: Walk, tally: &Tally) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let (mut subdirs, mut files) = (Vec::new(), Vec::new());
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            tally.error(dir, "cannot list", &e);
            return (subdirs, files);
        }
    };
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                tally.error(dir, "cannot list", &e);
                break;
            }
        };
        let path = entry.path();
        match walk {
            Walk::Stat => match std::fs::symlink_metadata(&path) {
                Ok(meta) => {
                    let size = if meta.is_file() { meta.len() } else { 0 };
                    tally.add(1, size);
                    if meta.is_dir() {
                        subdirs.push(path);
                    }
                }
                Err(e) => tally.error(&path, "cannot lstat", &e),
            },
            Walk::List => match entry.file_type() {
                Ok(kind) if kind.is_dir() => subdirs.push(path),
                Ok(kind) if kind.is_file() => files.push(path),
                Ok(_) => {}
                Err(e) => tally.error(&path, "cannot get the type of", &e),
            },
        }
    }
    (subdirs, files)
}

/// Walks the tree under `root` with `threads` threads. Returns the regular files found
/// (only for [`Walk::List`]), in an order that depends on thread scheduling.
fn walk(root: &Path, threads: u32, walk: Walk, tally: &Tally) -> Vec<PathBuf> {
    let queue = DirQueue::new(root.to_path_buf());
    let found = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let mut mine = Vec::new();
                while let Some(dir) = queue.next() {
                    let (subdirs, files) = list_dir(&dir, walk, tally);
                    mine.extend(files);
                    queue.done(subdirs);
                }
                found
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .append(&mut mine);
            });
        }
    });
    found.into_inner().unwrap_or_else(PoisonError::into_inner)
}

/// Reads `path` to its end with `buffer`; returns the bytes read.
fn read_fully(path: &Path, buffer: &mut [u8]) -> std::io::Result<u64> {
    let mut file = File::open(path)?;
    let mut total = 0u64;
    loop {
        match file.read(buffer) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Reads every file of `files` with `threads` threads, each taking the next file in order.
fn read_all(files: &[PathBuf], threads: u32, tally: &Tally) {
    let next = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let mut buffer = vec![0u8; BUFFER];
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(path) = files.get(index) else {
                        break;
                    };
                    match read_fully(path, &mut buffer) {
                        Ok(bytes) => tally.add(1, bytes),
                        Err(e) => tally.error(path, "cannot read", &e),
                    }
                }
            });
        }
    });
}

/// Reads `count` blocks of [`BUFFER`] bytes at random aligned offsets of `path`, with
/// `threads` threads taking offsets from one seeded sequence.
fn read_random(path: &Path, count: u64, threads: u32, seed: u64, tally: &Tally) {
    use std::os::unix::fs::FileExt;
    let size = match std::fs::metadata(path) {
        Ok(meta) => meta.len(),
        Err(e) => return tally.error(path, "cannot stat", &e),
    };
    let blocks = size / BUFFER as u64;
    if blocks == 0 {
        let e = std::io::Error::new(ErrorKind::InvalidInput, "smaller than one block");
        return tally.error(path, "cannot read blocks of", &e);
    }
    let mut rng = SplitMix64(seed);
    let offsets: Vec<u64> = (0..count)
        .map(|_| rng.below(blocks) * BUFFER as u64)
        .collect();
    let next = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let file = match File::open(path) {
                    Ok(file) => file,
                    Err(e) => return tally.error(path, "cannot open", &e),
                };
                let mut buffer = vec![0u8; BUFFER];
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(&offset) = offsets.get(index) else {
                        break;
                    };
                    match file.read_exact_at(&mut buffer, offset) {
                        Ok(()) => tally.add(1, BUFFER as u64),
                        Err(e) => tally.error(path, "cannot read", &e),
                    }
                }
            });
        }
    });
}

/// SplitMix64: a small, well-mixed generator, enough for a reproducible shuffle.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..bound` (`bound` > 0), without modulo bias worth caring about here.
    fn below(&mut self, bound: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(bound)) >> 64) as u64
    }
}

/// Fisher-Yates shuffle, reproducible for a given seed.
fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut rng = SplitMix64(seed);
    for i in (1..items.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

/// One JSON line on stdout; the exit status says whether every operation succeeded.
fn report(tally: &Tally, seconds: f64, extra: &[(&str, f64)]) -> ExitCode {
    let errors = tally.errors.load(Ordering::Relaxed);
    let mut line = format!(
        "{{\"files\":{},\"bytes\":{},\"seconds\":{seconds:.6}",
        tally.files.load(Ordering::Relaxed),
        tally.bytes.load(Ordering::Relaxed),
    );
    for (name, value) in extra {
        line.push_str(&format!(",\"{name}\":{value:.6}"));
    }
    line.push_str(&format!(",\"errors\":{errors}}}"));
    println!("{line}");
    if errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Checks that `path` is a directory, so that a typo is an error rather than an empty walk.
fn require_dir(path: &Path) -> Result<(), ExitCode> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => {
            eprintln!("readtree: {} is not a directory", path.display());
            Err(ExitCode::from(2))
        }
        Err(e) => {
            eprintln!("readtree: {}: {e}", path.display());
            Err(ExitCode::from(2))
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let tally = Tally::default();
    match cli.command {
        Command::Stat { path, threads } => {
            if let Err(code) = require_dir(&path) {
                return code;
            }
            let started = Instant::now();
            walk(&path, threads, Walk::Stat, &tally);
            report(&tally, started.elapsed().as_secs_f64(), &[])
        }
        Command::Read {
            path,
            threads,
            shuffle: seed,
        } => {
            if let Err(code) = require_dir(&path) {
                return code;
            }
            let started = Instant::now();
            let mut files = walk(&path, threads, Walk::List, &tally);
            // The walk's order depends on scheduling: sort first, so that the order (shuffled
            // or not) is the same on every run and on every tree with the same names.
            files.sort_unstable();
            if let Some(seed) = seed {
                shuffle(&mut files, seed);
            }
            let walked = started.elapsed().as_secs_f64();
            let reading = Instant::now();
            read_all(&files, threads, &tally);
            let read = reading.elapsed().as_secs_f64();
            report(
                &tally,
                started.elapsed().as_secs_f64(),
                &[("walk_seconds", walked), ("read_seconds", read)],
            )
        }
        Command::ReadFile { file } => {
            let mut buffer = vec![0u8; BUFFER];
            let started = Instant::now();
            match read_fully(&file, &mut buffer) {
                Ok(bytes) => tally.add(1, bytes),
                Err(e) => tally.error(&file, "cannot read", &e),
            }
            report(&tally, started.elapsed().as_secs_f64(), &[])
        }
        Command::ReadRandom {
            file,
            count,
            threads,
            seed,
        } => {
            let started = Instant::now();
            read_random(&file, count, threads, seed, &tally);
            report(&tally, started.elapsed().as_secs_f64(), &[])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffles_are_reproducible_permutations() {
        let mut a: Vec<u32> = (0..1000).collect();
        let mut b = a.clone();
        shuffle(&mut a, 7);
        shuffle(&mut b, 7);
        assert_eq!(a, b);
        assert_ne!(a, (0..1000).collect::<Vec<_>>());
        a.sort_unstable();
        assert_eq!(a, (0..1000).collect::<Vec<_>>());
    }
}

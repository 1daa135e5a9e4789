//! A daemon crash or upgrade never breaks a pod: `kill -9` of the daemon under concurrent
//! readers, the daemon started again with the same command line, any number of times; planned
//! hand-overs (SIGTERM) to the same or another build and back; the keeper restarting. Readers
//! check every byte. The negative control runs the same readers without a keeper and must see
//! failures, so that the test can fail.
//!
//! `RECOVERY_KILLS` sets the number of kills (default 10; `make crash-stress` runs 50 and
//! prints the stall measurements). `RESERVOIR_PREVIOUS_BIN` names another build for the
//! upgrade and rollback test (default: this build).

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use common::daemon::Daemon;
use common::mount::{Dirs, is_mounted, stop_keepers_under};

const WARM_FILES: u32 = 8;
const WARM_SIZE: usize = 4 << 20;
const COLD_FILES: u32 = 3000;
const COLD_SIZE: usize = 48 << 10;
const NAMES: u32 = 20_000;
const NAME_SIZE: usize = 1024;
const DIRS: u32 = 40;
const FILES_PER_DIR: u32 = 16;
const READERS: usize = 8;

/// The bytes of file `id` from `offset`: 8-byte words `id << 32 | word index`, so that every
/// position of every file holds a different value and a misplaced byte cannot pass.
fn expected(id: u32, offset: u64, len: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(len + 16);
    let first = offset / 8;
    let skip = (offset % 8) as usize;
    let mut word = first;
    while bytes.len() < len + skip {
        bytes.extend_from_slice(&((u64::from(id) << 32) | word).to_le_bytes());
        word += 1;
    }
    bytes.drain(..skip);
    bytes.truncate(len);
    bytes
}

fn write_file(path: &Path, id: u32, size: usize) {
    std::fs::write(path, expected(id, 0, size)).unwrap();
}

/// The dataset: warm files (read once before the kills, so later opens pass through), cold
/// files (served by the daemon from the source when first read), names nobody has looked up,
/// and directories to list.
struct Dataset {
    src: PathBuf,
}

impl Dataset {
    fn create(dirs: &Dirs) -> Dataset {
        let src = dirs.path("src");
        for sub in ["warm", "cold", "names"] {
            std::fs::create_dir_all(src.join(sub)).unwrap();
        }
        for n in 0..WARM_FILES {
            write_file(&src.join(format!("warm/{n}")), n, WARM_SIZE);
        }
        for n in 0..COLD_FILES {
            write_file(&src.join(format!("cold/{n}")), 1000 + n, COLD_SIZE);
        }
        for n in 0..NAMES {
            write_file(&src.join(format!("names/{n}")), 100_000 + n, NAME_SIZE);
        }
        for d in 0..DIRS {
            let dir = src.join(format!("dirs/{d}"));
            std::fs::create_dir_all(&dir).unwrap();
            for f in 0..FILES_PER_DIR {
                std::fs::write(dir.join(format!("entry-{f}")), b"x").unwrap();
            }
        }
        Dataset { src }
    }
}

/// What the readers saw.
#[derive(Default)]
struct Tally {
    operations: AtomicU64,
    failures: AtomicU64,
    wrong: AtomicU64,
    /// The longest any one operation took, in microseconds.
    worst_stall_us: AtomicU64,
    first_errors: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_errors.lock().unwrap();
        if first.len() < 10 {
            first.push(what);
        }
    }

    fn check(&self, what: &str, got: &[u8], want: &[u8]) {
        if got != want {
            self.wrong.fetch_add(1, Ordering::Relaxed);
            let mut first = self.first_errors.lock().unwrap();
            if first.len() < 10 {
                first.push(format!("wrong bytes in {what}"));
            }
        }
    }
}

/// Eight readers doing what a training job does, until told to stop.
struct Readers {
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Readers {
    fn start(mnt: &Path) -> Readers {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let next_cold = Arc::new(AtomicUsize::new(0));
        let next_name = Arc::new(AtomicUsize::new(0));
        let threads = (0..READERS)
            .map(|reader| {
                let (mnt, stop, tally) = (mnt.to_path_buf(), stop.clone(), tally.clone());
                let (next_cold, next_name) = (next_cold.clone(), next_name.clone());
                std::thread::spawn(move || {
                    read_until_stopped(reader, &mnt, &stop, &tally, &next_cold, &next_name)
                })
            })
            .collect();
        Readers {
            stop,
            tally,
            threads,
        }
    }

    fn finish(self) -> Arc<Tally> {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().expect("a reader panicked");
        }
        self.tally
    }
}

fn read_until_stopped(
    reader: usize,
    mnt: &Path,
    stop: &AtomicBool,
    tally: &Tally,
    next_cold: &AtomicUsize,
    next_name: &AtomicUsize,
) {
    let mut rng = fastrand::Rng::with_seed(reader as u64);
    // A long-lived handle: half the readers on a warm file (passthrough), half on a cold one
    // (served by the daemon).
    let (kept_id, kept_path, kept_size) = if reader.is_multiple_of(2) {
        let n = reader as u32 % WARM_FILES;
        (n, mnt.join(format!("warm/{n}")), WARM_SIZE)
    } else {
        let n = COLD_FILES - 1 - reader as u32;
        (1000 + n, mnt.join(format!("cold/{n}")), COLD_SIZE)
    };
    let kept = match std::fs::File::open(&kept_path) {
        Ok(file) => Some(file),
        Err(e) => {
            tally.fail(format!("open {}: {e}", kept_path.display()));
            None
        }
    };
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        match rng.u32(0..5) {
            0 => {
                let n = rng.u32(0..WARM_FILES);
                let path = mnt.join(format!("warm/{n}"));
                match std::fs::read(&path) {
                    Ok(bytes) => tally.check(
                        &path.display().to_string(),
                        &bytes,
                        &expected(n, 0, WARM_SIZE),
                    ),
                    Err(e) => tally.fail(format!("read {}: {e}", path.display())),
                }
            }
            1 => {
                let n = (next_cold.fetch_add(1, Ordering::Relaxed) % COLD_FILES as usize) as u32;
                let path = mnt.join(format!("cold/{n}"));
                match std::fs::read(&path) {
                    Ok(bytes) => tally.check(
                        &path.display().to_string(),
                        &bytes,
                        &expected(1000 + n, 0, COLD_SIZE),
                    ),
                    Err(e) => tally.fail(format!("read {}: {e}", path.display())),
                }
            }
            2 => {
                if let Some(file) = &kept {
                    let len = rng.usize(1..kept_size.min(64 << 10));
                    let offset = rng.u64(0..(kept_size - len) as u64);
                    let mut buffer = vec![0u8; len];
                    match file.read_exact_at(&mut buffer, offset) {
                        Ok(()) => tally.check(
                            &format!("{} at {offset}", kept_path.display()),
                            &buffer,
                            &expected(kept_id, offset, len),
                        ),
                        Err(e) => tally.fail(format!("pread {}: {e}", kept_path.display())),
                    }
                }
            }
            3 => {
                let n = (next_name.fetch_add(1, Ordering::Relaxed) % NAMES as usize) as u32;
                let path = mnt.join(format!("names/{n}"));
                let read = std::fs::metadata(&path).and_then(|meta| {
                    let mut bytes = Vec::with_capacity(meta.len() as usize);
                    std::fs::File::open(&path)?.read_to_end(&mut bytes)?;
                    Ok(bytes)
                });
                match read {
                    Ok(bytes) => tally.check(
                        &path.display().to_string(),
                        &bytes,
                        &expected(100_000 + n, 0, NAME_SIZE),
                    ),
                    Err(e) => tally.fail(format!("lookup {}: {e}", path.display())),
                }
            }
            _ => {
                let d = rng.u32(0..DIRS);
                let path = mnt.join(format!("dirs/{d}"));
                match std::fs::read_dir(&path).and_then(|entries| {
                    entries
                        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                        .collect::<std::io::Result<BTreeSet<String>>>()
                }) {
                    Ok(names) => {
                        let want: BTreeSet<String> =
                            (0..FILES_PER_DIR).map(|f| format!("entry-{f}")).collect();
                        if names != want {
                            tally.wrong.fetch_add(1, Ordering::Relaxed);
                            tally.fail(format!("listing of {}: {names:?}", path.display()));
                        }
                    }
                    Err(e) => tally.fail(format!("list {}: {e}", path.display())),
                }
            }
        }
        tally.operations.fetch_add(1, Ordering::Relaxed);
        let took = started.elapsed().as_micros() as u64;
        tally.worst_stall_us.fetch_max(took, Ordering::Relaxed);
    }
}

/// Asks the file system something only the daemon can answer (statfs is never cached by the
/// kernel), again and again; measures, after each kill, how long until the first answer.
struct Probe {
    stop: Arc<AtomicBool>,
    killed_at: Arc<Mutex<Option<Instant>>>,
    answers_after_kill: Arc<Mutex<Vec<Duration>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Probe {
    fn start(mnt: &Path) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let killed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
        let answers: Arc<Mutex<Vec<Duration>>> = Arc::default();
        let thread = {
            let (mnt, stop, killed_at, answers) = (
                mnt.to_path_buf(),
                stop.clone(),
                killed_at.clone(),
                answers.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let asked = Instant::now();
                    let answered = nix::sys::statvfs::statvfs(&mnt).is_ok();
                    let mut killed = killed_at.lock().unwrap();
                    if let Some(at) = *killed
                        && answered
                        && asked > at
                    {
                        answers.lock().unwrap().push(Instant::now() - at);
                        *killed = None;
                    }
                    drop(killed);
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        Probe {
            stop,
            killed_at,
            answers_after_kill: answers,
            thread,
        }
    }

    fn killed_now(&self) {
        *self.killed_at.lock().unwrap() = Some(Instant::now());
    }

    fn finish(self) -> Vec<Duration> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        let mut answers = self.answers_after_kill.lock().unwrap().clone();
        answers.sort();
        answers
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index]
}

/// A daemon serving the dataset as volume `vol`, with the warm files read once and cached.
fn serve(dirs: &Dirs, dataset: &Dataset, args: &[&str]) -> (Daemon, PathBuf) {
    let mut all = vec!["--cache-size", "1Gi"];
    all.extend_from_slice(args);
    let daemon = Daemon::start(dirs, &all);
    let mnt = dirs.path("volume");
    daemon.mount_ok(
        "vol",
        &mnt,
        dataset.src.to_str().unwrap(),
        json!({"metadata_ttl": "forever"}),
    );
    for n in 0..WARM_FILES {
        std::fs::read(mnt.join(format!("warm/{n}"))).unwrap();
    }
    common::mount::wait_until("the warm files are cached", Duration::from_secs(30), || {
        daemon.volume("vol")["cache"]["complete_files"]
            .as_u64()
            .is_some_and(|n| n >= u64::from(WARM_FILES))
    });
    (daemon, mnt)
}

fn kills() -> usize {
    std::env::var("RECOVERY_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

fn report(tally: &Tally) -> String {
    format!(
        "{} operations, {} failed, {} wrong; worst stall {} ms; first problems: {:?}",
        tally.operations.load(Ordering::Relaxed),
        tally.failures.load(Ordering::Relaxed),
        tally.wrong.load(Ordering::Relaxed),
        tally.worst_stall_us.load(Ordering::Relaxed) / 1000,
        tally.first_errors.lock().unwrap()
    )
}

#[test]
fn kill_9_of_the_daemon_under_readers_fails_nothing() {
    let dirs = Dirs::new();
    let dataset = Dataset::create(&dirs);
    let (mut daemon, mnt) = serve(&dirs, &dataset, &[]);
    let readers = Readers::start(&mnt);
    let probe = Probe::start(&mnt);
    let mut rng = fastrand::Rng::with_seed(11);
    let rounds = kills();
    for round in 0..rounds {
        std::thread::sleep(Duration::from_millis(rng.u64(50..500)));
        daemon.kill();
        probe.killed_now();
        // A container runtime restarts it at once, with the same command line.
        daemon.restart();
        assert!(is_mounted(&mnt), "round {round}: the mount is gone");
    }
    std::thread::sleep(Duration::from_millis(300));
    let answers = probe.finish();
    let tally = readers.finish();
    let volume = daemon.volume("vol");
    eprintln!(
        "{rounds} kills: {}; first answer after a kill p50 {:?}, p99 {:?}, max {:?}",
        report(&tally),
        percentile(&answers, 0.5),
        percentile(&answers, 0.99),
        answers.last().copied().unwrap_or_default(),
    );
    assert_eq!(
        tally.failures.load(Ordering::Relaxed),
        0,
        "{}",
        report(&tally)
    );
    assert_eq!(tally.wrong.load(Ordering::Relaxed), 0, "{}", report(&tally));
    assert!(
        tally.operations.load(Ordering::Relaxed) > 100,
        "{}",
        report(&tally)
    );
    assert!(is_mounted(&mnt));
    assert_eq!(volume["recovery"]["recoveries"], rounds, "{volume}");
    assert_eq!(
        answers.len(),
        rounds,
        "every kill was followed by an answer"
    );
}

#[test]
fn without_the_keeper_a_kill_breaks_the_readers() {
    // The negative control: the same readers, no keeper. If this passed with no failures,
    // the test above could not fail.
    let dirs = Dirs::new();
    let dataset = Dataset::create(&dirs);
    let (mut daemon, mnt) = serve(&dirs, &dataset, &["--no-keeper"]);
    let readers = Readers::start(&mnt);
    std::thread::sleep(Duration::from_millis(300));
    daemon.kill();
    daemon.restart();
    std::thread::sleep(Duration::from_millis(500));
    let tally = readers.finish();
    assert!(
        tally.failures.load(Ordering::Relaxed) > 0,
        "{}",
        report(&tally)
    );
    let status = daemon.status();
    let lost = &status["lost"][0];
    assert_eq!(lost["volume_id"], "vol", "{status}");
    assert!(
        lost["reason"].as_str().unwrap().contains("no keeper"),
        "{status}"
    );
    assert!(!is_mounted(&mnt), "the dead mount is cleared");
}

#[test]
fn planned_hand_overs_to_another_build_and_back_fail_nothing() {
    let dirs = Dirs::new();
    let dataset = Dataset::create(&dirs);
    let current = PathBuf::from(common::mount::bin());
    let previous = std::env::var_os("RESERVOIR_PREVIOUS_BIN")
        .filter(|v| !v.is_empty())
        .map_or(current.clone(), PathBuf::from);
    let (mut daemon, mnt) = serve(&dirs, &dataset, &[]);
    let readers = Readers::start(&mnt);
    // Upgrade (current → previous stands for the old build being replaced) and rollback.
    for (step, program) in [(1, &previous), (2, &current), (3, &previous), (4, &current)] {
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(daemon.stop(), Some(0), "{}", daemon.log_text());
        assert!(is_mounted(&mnt), "step {step}: SIGTERM must not unmount");
        daemon.restart_with(program);
        assert_eq!(daemon.volume("vol")["recovery"]["recoveries"], step);
    }
    std::thread::sleep(Duration::from_millis(300));
    let tally = readers.finish();
    assert_eq!(
        tally.failures.load(Ordering::Relaxed),
        0,
        "{}",
        report(&tally)
    );
    assert_eq!(tally.wrong.load(Ordering::Relaxed), 0, "{}", report(&tally));
}

#[test]
fn a_keeper_restart_never_touches_a_volume() {
    let dirs = Dirs::new();
    let dataset = Dataset::create(&dirs);
    let (mut daemon, mnt) = serve(&dirs, &dataset, &[]);
    let readers = Readers::start(&mnt);
    let first_keeper = daemon.status()["keeper_pid"].as_u64().expect("a keeper");
    // The keeper dies; the daemon starts another and deposits every connection again.
    stop_keepers_under(dirs.root.path());
    common::mount::wait_until(
        "a new keeper holds the volume",
        Duration::from_secs(20),
        || {
            let status = daemon.status();
            status["keeper_pid"]
                .as_u64()
                .is_some_and(|pid| pid != first_keeper)
                && status["volumes"][0]["recovery"]["kept"] == true
        },
    );
    // Now the daemon dies too: the new keeper carries the volume over.
    daemon.kill();
    daemon.restart();
    std::thread::sleep(Duration::from_millis(300));
    let tally = readers.finish();
    assert_eq!(
        tally.failures.load(Ordering::Relaxed),
        0,
        "{}",
        report(&tally)
    );
    assert_eq!(tally.wrong.load(Ordering::Relaxed), 0, "{}", report(&tally));
    assert_eq!(daemon.volume("vol")["recovery"]["recoveries"], 1);
}

/// One change through the mount, made by an application process (`python3 -c act`, run in
/// the mount); `check` looks at the source afterwards. The test process itself never holds a
/// file of the mount: a process that does must not start the daemon, since exec closes the
/// inherited file, and the close of a written file waits for the daemon being started.
struct Change {
    point: &'static str,
    act: &'static str,
    check: fn(&Path),
}

fn changes() -> Vec<Change> {
    use std::os::unix::fs::PermissionsExt;
    vec![
        Change {
            point: "after-source:create",
            act: "import os\n\
                  f = os.open('created', os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)\n\
                  os.write(f, b'written after an exclusive create'); os.close(f)",
            check: |src| {
                assert_eq!(
                    std::fs::read(src.join("created")).unwrap(),
                    b"written after an exclusive create"
                )
            },
        },
        Change {
            point: "after-source:mkdir",
            act: "import os; os.mkdir('made')",
            check: |src| assert!(src.join("made").is_dir()),
        },
        Change {
            point: "after-source:symlink",
            act: "import os; os.symlink('pointed-at', 'link')",
            check: |src| {
                assert_eq!(
                    std::fs::read_link(src.join("link")).unwrap(),
                    Path::new("pointed-at")
                )
            },
        },
        Change {
            point: "after-source:unlink",
            act: "import os; os.unlink('victim')",
            check: |src| assert!(!src.join("victim").exists()),
        },
        Change {
            point: "after-source:rmdir",
            act: "import os; os.rmdir('empty')",
            check: |src| assert!(!src.join("empty").exists()),
        },
        Change {
            point: "after-source:rename",
            act: "import os; os.rename('old-name', 'new-name')",
            check: |src| {
                assert!(!src.join("old-name").exists());
                assert_eq!(std::fs::read(src.join("new-name")).unwrap(), b"moved");
            },
        },
        Change {
            point: "after-source:setattr",
            act: "import os\n\
                  f = os.open('long', os.O_WRONLY); os.ftruncate(f, 4); os.close(f)\n\
                  os.chmod('long', 0o600)",
            check: |src| {
                assert_eq!(std::fs::read(src.join("long")).unwrap(), b"0123");
                let mode = std::fs::metadata(src.join("long"))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600);
            },
        },
        Change {
            point: "after-source:write",
            act: "import os\n\
                  f = os.open('overwritten', os.O_WRONLY); os.pwrite(f, b'NEW', 2)\n\
                  os.fsync(f); os.close(f)",
            check: |src| assert_eq!(std::fs::read(src.join("overwritten")).unwrap(), b"abNEWfgh"),
        },
    ]
}

fn prepare_for_changes(src: &Path) {
    std::fs::write(src.join("victim"), b"to be removed").unwrap();
    std::fs::create_dir(src.join("empty")).unwrap();
    std::fs::write(src.join("old-name"), b"moved").unwrap();
    std::fs::write(src.join("long"), b"0123456789").unwrap();
    std::fs::write(src.join("overwritten"), b"abcdefgh").unwrap();
}

/// Every change with the daemon killed after the source made it and before the kernel got the
/// answer: the kernel resends the request to the next daemon, and the application gets what
/// it would have got without the crash.
fn resent_changes_answer_as_without_the_crash(source: &str, src: &Path, dirs: &Dirs, nfs: bool) {
    prepare_for_changes(src);
    let mut daemon = Daemon::start(dirs, &["--cache-size", "256Mi"]);
    let mnt = dirs.path("volume");
    daemon.mount_ok(
        "rw",
        &mnt,
        source,
        json!({"read_write": true, "metadata_ttl": "1s"}),
    );
    let mut recoveries = 0;
    for change in changes() {
        // A directory source's writers write to the source file themselves (passthrough): no
        // WRITE reaches the daemon, so there is nothing to resend.
        if change.point == "after-source:write" && !nfs {
            continue;
        }
        assert_eq!(daemon.stop(), Some(0), "{}", daemon.log_text());
        daemon.set_env(&[("RESERVOIR_FAILPOINT", change.point)]);
        daemon.restart();
        recoveries += 1;
        let acting = std::process::Command::new("python3")
            .args(["-c", change.act])
            .current_dir(&mnt)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run python3");
        assert!(
            daemon.wait_for_exit(Duration::from_secs(30)),
            "{}: the failpoint did not stop the daemon:\n{}",
            change.point,
            daemon.log_text()
        );
        daemon.set_env(&[]);
        daemon.restart();
        recoveries += 1;
        let outcome = acting.wait_with_output().unwrap();
        assert!(
            outcome.status.success(),
            "{}: the application saw {}\n{}",
            change.point,
            String::from_utf8_lossy(&outcome.stderr),
            daemon.log_text()
        );
        (change.check)(src);
        assert_eq!(daemon.volume("rw")["recovery"]["recoveries"], recoveries);
    }
}

#[test]
fn resent_changes_to_a_directory_source_answer_as_without_the_crash() {
    let dirs = Dirs::new();
    let src = dirs.path("src");
    std::fs::create_dir(&src).unwrap();
    resent_changes_answer_as_without_the_crash(src.to_str().unwrap(), &src, &dirs, false);
}

#[test]
fn resent_changes_to_an_nfs_source_answer_as_without_the_crash() {
    let dirs = Dirs::new();
    let export = dirs.path("export");
    std::fs::create_dir(&export).unwrap();
    let server = common::ganesha::Ganesha::start(&export);
    let url = server.url(&server.exports()[0]);
    resent_changes_answer_as_without_the_crash(&url, &export, &dirs, true);
}

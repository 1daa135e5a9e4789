//! `reservoir daemon`: the node's cache daemon, driven through its control socket with the
//! real binary and real FUSE mounts (directory sources and nfs-ganesha).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::daemon::Daemon;
use common::data::{describe_tree, disk_usage, write_random_file, write_small_tree};
use common::ganesha::Ganesha;
use common::mount::{Dirs, bin, clean_up_under, is_mounted, signal, wait_until};

fn error_of(answer: &Value) -> String {
    assert_eq!(answer["kind"], "error", "expected an error, got {answer}");
    answer["message"].as_str().unwrap().to_string()
}

fn owner_of(volume: &Value) -> &Value {
    &volume["cache"]["owner"]
}

#[test]
fn volumes_over_directories_and_nfs_share_one_cache_with_quotas() {
    let dirs = Dirs::new();
    // A: 48 MiB in 12 files, through a 24 MiB quota. B: a tree and a big file, warmed through
    // the CLI. C: an NFS export preloaded at mount.
    let src_a = dirs.path("src-a");
    std::fs::create_dir(&src_a).unwrap();
    for n in 0..12 {
        write_random_file(&src_a.join(format!("part-{n:02}.bin")), 4 << 20, 100 + n);
    }
    let src_b = dirs.path("src-b");
    std::fs::create_dir(&src_b).unwrap();
    write_random_file(&src_b.join("big.bin"), 32 << 20, 200);
    let b_small = write_small_tree(&src_b.join("small"), 2000, 100, 8192, 201);
    let export = dirs.path("export");
    let src_c = export.join("datasets/c");
    std::fs::create_dir_all(&src_c).unwrap();
    write_random_file(&src_c.join("big.bin"), 16 << 20, 300);
    write_small_tree(&src_c.join("train"), 500, 100, 8192, 301);
    let server = Ganesha::start(&export);
    let url_c = server.url(server.exports()[0].join("datasets/c"));

    let capacity: u64 = 128 << 20;
    let quota_a: u64 = 24 << 20;
    let daemon = Daemon::start(&dirs, &["--cache-size", "128Mi"]);
    let (mnt_a, mnt_b, mnt_c) = (dirs.path("a"), dirs.path("b"), dirs.path("c"));
    // Targets that do not exist yet are created (inline volumes' publish paths).
    daemon.mount_ok(
        "vol-a",
        &mnt_a,
        src_a.to_str().unwrap(),
        json!({"cache_size": "24Mi"}),
    );
    daemon.mount_ok(
        "vol-b",
        &mnt_b,
        src_b.to_str().unwrap(),
        json!({"cache_size": 64u64 << 20, "metadata_ttl": "forever"}),
    );
    daemon.mount_ok(
        "vol-c",
        &mnt_c,
        &url_c,
        json!({"preload": ["/"], "metadata_ttl": "forever"}),
    );

    // Idempotent: the same request again.
    let again = daemon.mount(
        "vol-a",
        &mnt_a,
        src_a.to_str().unwrap(),
        json!({"cache_size": "24Mi"}),
    );
    assert_eq!(again["kind"], "mounted", "{again}");
    assert_eq!(again["already_mounted"], true);
    // Conflicts are refused, naming what differs.
    let other = error_of(&daemon.mount(
        "vol-a",
        &mnt_a,
        src_a.to_str().unwrap(),
        json!({"cache_size": "32Mi"}),
    ));
    assert!(
        other.contains("already mounted at") && other.contains("with other parameters (cache_size"),
        "{other}"
    );
    let elsewhere = error_of(&daemon.mount(
        "vol-a",
        &dirs.path("elsewhere"),
        src_a.to_str().unwrap(),
        json!({"cache_size": "24Mi"}),
    ));
    assert!(elsewhere.contains("with other parameters"), "{elsewhere}");
    let taken = error_of(&daemon.mount("vol-z", &mnt_b, src_a.to_str().unwrap(), json!({})));
    assert!(taken.contains("already used by volume vol-b"), "{taken}");
    assert!(!dirs.path("elsewhere").exists() || !is_mounted(&dirs.path("elsewhere")));

    // Preload at mount: C is loaded without anyone reading it.
    wait_until("vol-c is preloaded", Duration::from_secs(120), || {
        daemon.volume("vol-c")["preload"]["done"] == true
    });
    let c = daemon.volume("vol-c");
    assert_eq!(c["preload"]["files_total"], 501, "{c}");
    assert_eq!(c["preload"]["files_failed"], 0, "{c}");
    assert_eq!(owner_of(&c)["files"], 501, "{c}");
    assert_eq!(describe_tree(&mnt_c), describe_tree(&src_c), "C over NFS");
    assert_eq!(
        daemon.volume("vol-c")["bytes_fetched"],
        0,
        "a preloaded volume reads nothing from the source"
    );

    // Warm B through the CLI.
    let output = Command::new(bin())
        .args(["warm", "--json", "--socket"])
        .arg(&daemon.socket)
        .args(["--volume", "vol-b"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let account: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(account["files_loaded"], 2001, "{account}");
    assert_eq!(
        account["bytes_loaded"].as_u64().unwrap(),
        (32 << 20) + b_small
    );

    // A (cold, from its directory) and B (warm) read at once, byte for byte.
    let expected_a = describe_tree(&src_a);
    let expected_b = describe_tree(&src_b);
    let started = Instant::now();
    let (seen_a, seen_b) = std::thread::scope(|scope| {
        let a = scope.spawn(|| {
            let t = Instant::now();
            (describe_tree(&mnt_a), t.elapsed())
        });
        let b = scope.spawn(|| {
            let t = Instant::now();
            (describe_tree(&mnt_b), t.elapsed())
        });
        (a.join().unwrap(), b.join().unwrap())
    });
    let both = started.elapsed();
    assert_eq!(seen_a.0, expected_a, "A through the daemon");
    assert_eq!(seen_b.0, expected_b, "B through the daemon");
    let mib = |bytes: u64, d: Duration| bytes as f64 / (1 << 20) as f64 / d.as_secs_f64();
    eprintln!(
        "concurrent read: A cold 48 MiB in {:?} ({:.0} MiB/s), B warm {} MiB + 2000 files in {:?} ({:.0} MiB/s), both in {both:?}",
        seen_a.1,
        mib(48 << 20, seen_a.1),
        32 + b_small / (1 << 20),
        seen_b.1,
        mib((32 << 20) + b_small, seen_b.1)
    );
    // B's second read touches nothing but the cache.
    assert_eq!(daemon.volume("vol-b")["bytes_fetched"], 0);
    assert_eq!(describe_tree(&mnt_a), expected_a, "A again");

    // Quotas: A stays within its own; B and C keep all their files; the node cap holds.
    let status = daemon.status();
    let a = daemon.volume("vol-a");
    let used_a = owner_of(&a)["used"].as_u64().unwrap();
    assert!(
        used_a <= (quota_a as f64 * 0.95) as u64,
        "vol-a holds {used_a} over its quota: {a}"
    );
    // Every file is read as often as the others: the files A cached stay, the rest are
    // served from the source (no churn inside its quota).
    assert!(owner_of(&a)["rejected"].as_u64().unwrap() > 0, "{a}");
    assert!(owner_of(&a)["files"].as_u64().unwrap() >= 4, "{a}");
    assert_eq!(owner_of(&a)["quota"], quota_a);
    let b = daemon.volume("vol-b");
    assert_eq!(owner_of(&b)["files"], 2001, "{b}");
    assert_eq!(owner_of(&b)["evicted_files"], 0, "{b}");
    assert_eq!(owner_of(&daemon.volume("vol-c"))["evicted_files"], 0);
    let used = status["cache"]["used"].as_u64().unwrap();
    assert!(used <= capacity, "node cache accounts {used}");
    let on_disk = disk_usage(&dirs.cache);
    assert!(on_disk <= capacity, "du of the cache: {on_disk}");
    eprintln!(
        "cache: du {} MiB of 128 MiB; vol-a {} MiB (quota 24 MiB), vol-b {} MiB, vol-c {} MiB",
        on_disk >> 20,
        used_a >> 20,
        owner_of(&b)["used"].as_u64().unwrap() >> 20,
        owner_of(&daemon.volume("vol-c"))["used"].as_u64().unwrap() >> 20
    );

    // The human status lists every volume.
    let output = Command::new(bin())
        .args(["status", "--socket"])
        .arg(&daemon.socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    for id in ["vol-a", "vol-b", "vol-c"] {
        assert!(text.contains(id), "{text}");
    }

    // Unmount, twice: the second is a no-op. A's files stay in the cache for the next reader.
    let target_a = mnt_a.to_str().unwrap();
    let gone = daemon.call(json!({"op": "unmount", "target_path": target_a}));
    assert_eq!(gone["kind"], "unmounted", "{gone}");
    assert_eq!(gone["was_mounted"], true);
    assert!(!is_mounted(&mnt_a));
    let again = daemon.call(json!({"op": "unmount", "target_path": target_a}));
    assert_eq!(again["was_mounted"], false, "{again}");
    let status = daemon.status();
    assert_eq!(status["volumes"].as_array().unwrap().len(), 2, "{status}");
    assert!(
        status["owners"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["name"].is_null() && o["files"].as_u64().unwrap() > 0),
        "A's files are kept, unowned: {status}"
    );

    // SIGTERM: the keeper holds every connection, so the daemon hands the volumes over
    // instead of unmounting them: they stay mounted, the socket is removed, exit 0. The next
    // daemon, started the same way, serves them again.
    let mut daemon = daemon;
    assert_eq!(daemon.stop(), Some(0), "{}", daemon.log_text());
    assert!(is_mounted(&mnt_b) && is_mounted(&mnt_c));
    assert!(!daemon.socket.exists());
    let successor = Daemon::start(&dirs, &["--cache-size", "128Mi"]);
    for id in ["vol-b", "vol-c"] {
        let volume = successor.volume(id);
        assert_eq!(volume["recovery"]["recoveries"], 1, "{volume}");
        assert_eq!(volume["recovery"]["kept"], true, "{volume}");
    }
    assert_eq!(
        describe_tree(&mnt_c),
        describe_tree(&src_c),
        "C after the hand-over"
    );
    assert_eq!(
        std::fs::read(mnt_b.join("big.bin")).unwrap(),
        std::fs::read(src_b.join("big.bin")).unwrap()
    );
}

#[test]
fn a_second_daemon_is_refused() {
    let dirs = Dirs::new();
    let daemon = Daemon::start(&dirs, &["--cache-size", "64Mi"]);
    let err = Daemon::try_start(
        &dirs,
        &dirs.cache,
        &dirs.run.join("other.sock"),
        &["--cache-size", "64Mi"],
    )
    .err()
    .expect("a second daemon on the same cache directory");
    let text = String::from_utf8_lossy(&err.stderr);
    assert!(
        text.contains("in use by another reservoir process"),
        "{text}"
    );
    // The socket answers already, so wait for the second daemon's exit rather than for it.
    let second = Command::new("timeout")
        .arg("30")
        .arg(bin())
        .arg("daemon")
        .arg("--cache-dir")
        .arg(dirs.path("other-cache"))
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["--cache-size", "64Mi"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        second.status.code(),
        Some(1),
        "a second daemon on the same socket"
    );
    let text = String::from_utf8_lossy(&second.stderr);
    assert!(text.contains("another running process"), "{text}");
    // The first one is untouched.
    assert_eq!(daemon.status()["volumes"], json!([]));
}

#[test]
fn bad_requests_are_answered_with_the_problem() {
    let dirs = Dirs::new();
    let src = dirs.path("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/file"), b"hello").unwrap();
    let daemon = Daemon::start(&dirs, &["--cache-size", "64Mi"]);
    let target = dirs.path("t");
    let source = src.to_str().unwrap();
    let line = |text: &str| {
        let answers = daemon.send_line(text);
        assert_eq!(answers.len(), 1, "{text}: {answers:?}");
        error_of(&answers[0])
    };
    assert!(line("not json").contains("bad request"));
    assert!(line(r#"{"op":"explode"}"#).contains("unknown variant"));
    let request = |extra: Value| {
        let mut r =
            json!({"op": "mount", "volume_id": "v", "target_path": target, "source": source});
        for (key, value) in extra.as_object().unwrap() {
            r[key] = value.clone();
        }
        error_of(&daemon.call(r))
    };
    assert!(request(json!({"cacheSize": "1Gi"})).contains("unknown field `cacheSize`"));
    assert!(request(json!({"cache_size": "lots"})).contains("not a size"));
    assert!(request(json!({"metadata_ttl": "soon"})).contains("not a duration"));
    assert!(request(json!({"sub_path": "../etc"})).starts_with("sub_path:"));
    assert!(request(json!({"source": "s3://bucket/x"})).starts_with("source:"));
    assert!(request(json!({"target_path": "relative/t"})).starts_with("target_path:"));
    assert!(request(json!({"cache_size": "1Mi"})).contains("too small"));
    assert!(
        request(json!({"read_write": true, "metadata_ttl": "forever"}))
            .starts_with("metadata_ttl:")
    );
    let missing = request(json!({"source": dirs.path("missing").to_str().unwrap()}));
    assert!(missing.contains("missing"), "{missing}");
    assert!(!is_mounted(&target));
    assert!(error_of(&daemon.call(json!({"op": "warm"}))).contains("volume_id"));
    assert!(
        error_of(&daemon.call(json!({"op": "warm", "volume_id": "nope"})))
            .contains("no volume \"nope\"")
    );
    // After all that, a good request works, with a sub-path.
    daemon.mount_ok("v", &target, source, json!({"sub_path": "sub"}));
    assert_eq!(std::fs::read(target.join("file")).unwrap(), b"hello");
    let warm = daemon.call(json!({"op": "warm", "volume_id": "v", "paths": ["../x"]}));
    assert!(error_of(&warm).contains("'..'"));
}

#[test]
fn the_library_client_starts_a_daemon_and_drives_it() {
    let dirs = Dirs::new();
    let src = dirs.path("src");
    std::fs::create_dir_all(src.join("data/deep")).unwrap();
    write_random_file(&src.join("data/deep/blob"), 3 << 20, 7);
    std::fs::write(src.join("outside"), b"not in the volume").unwrap();
    let socket = dirs.run.join("spawned.sock");
    let target = dirs.path("volume");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let spawn = reservoir::daemon::SpawnOptions {
        program: Some(PathBuf::from(bin())),
        args: [
            "daemon",
            "--cache-dir",
            dirs.cache.to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
            "--cache-size",
            "64Mi",
        ]
        .map(Into::into)
        .to_vec(),
        log: dirs.path("spawned.log"),
        wait: Duration::from_secs(30),
    };
    let client = runtime
        .block_on(reservoir::daemon::ensure_running(&socket, &spawn))
        .expect("a daemon answers");
    let pid = runtime.block_on(client.status()).unwrap().pid;
    // Stops the spawned daemon even if an assertion fails.
    struct Stop(u32, PathBuf);
    impl Drop for Stop {
        fn drop(&mut self) {
            signal(self.0, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            while Path::new(&format!("/proc/{}", self.0)).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            signal(self.0, libc::SIGKILL);
            clean_up_under(&self.1);
        }
    }
    let stop = Stop(pid, dirs.root.path().to_path_buf());
    // Already running: the same daemon answers.
    let again = runtime
        .block_on(reservoir::daemon::ensure_running(&socket, &spawn))
        .unwrap();
    assert_eq!(runtime.block_on(again.status()).unwrap().pid, pid);

    let request: reservoir::control::MountRequest = serde_json::from_value(json!({
        "volume_id": "lib-vol",
        "target_path": target,
        "source": format!("local://{}", src.display()),
        "sub_path": "data",
        "cache_size": "32Mi",
    }))
    .unwrap();
    let mounted = runtime.block_on(client.mount(&request)).unwrap();
    assert!(!mounted.already_mounted);
    assert!(
        runtime
            .block_on(client.mount(&request))
            .unwrap()
            .already_mounted
    );
    assert!(!target.join("outside").exists());
    let progress = runtime
        .block_on(client.warm("lib-vol", &["deep".to_string()], true))
        .unwrap();
    assert_eq!((progress.files_loaded, progress.files_failed), (1, 0));
    assert_eq!(
        std::fs::read(target.join("deep/blob")).unwrap(),
        std::fs::read(src.join("data/deep/blob")).unwrap()
    );
    let status = runtime.block_on(client.status()).unwrap();
    assert_eq!(status.volumes.len(), 1);
    let owner = status.volumes[0]
        .volume
        .cache
        .as_ref()
        .and_then(|c| c.owner.clone())
        .unwrap();
    assert_eq!((owner.files, owner.quota), (1, Some(32 << 20)));
    let refused = runtime
        .block_on(client.warm("other", &[], false))
        .unwrap_err();
    assert!(matches!(
        refused,
        reservoir::daemon::ClientError::Refused(_)
    ));

    // Unmounted from outside: the daemon notices and forgets the volume.
    assert!(
        Command::new("umount")
            .arg("-l")
            .arg(&target)
            .status()
            .unwrap()
            .success()
    );
    wait_until(
        "the daemon forgets the volume",
        Duration::from_secs(20),
        || {
            runtime
                .block_on(client.status())
                .unwrap()
                .volumes
                .is_empty()
        },
    );
    // And it can be mounted again.
    assert!(
        !runtime
            .block_on(client.mount(&request))
            .unwrap()
            .already_mounted
    );
    assert!(runtime.block_on(client.unmount(&target)).unwrap());
    assert!(!runtime.block_on(client.unmount(&target)).unwrap());
    assert!(!is_mounted(&target));

    drop(stop);
    wait_until(
        "the spawned daemon removes its socket",
        Duration::from_secs(10),
        || !socket.exists(),
    );
}

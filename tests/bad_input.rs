//! Bad input gets one clear line, a non-zero exit, and leaves nothing mounted.

mod common;

use std::process::Command;

use common::ganesha::Ganesha;
use common::mount::{Dirs, Mount, is_mounted};

/// Runs `reservoir mount` expecting failure; returns the error line.
fn mount_fails(dirs: &Dirs, source: &str, mountpoint: &std::path::Path, args: &[&str]) -> String {
    let output = dirs
        .command()
        .env_remove("RUST_LOG")
        .arg("mount")
        .arg(source)
        .arg(mountpoint)
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "mount of {source} succeeded");
    assert!(matches!(output.status.code(), Some(1 | 2)), "{stderr}");
    assert!(
        !is_mounted(mountpoint),
        "{} left mounted",
        mountpoint.display()
    );
    assert_eq!(
        std::fs::read_dir(&dirs.run).unwrap().count(),
        0,
        "a control socket was left"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got:\n{stderr}");
    assert!(lines[0].starts_with("reservoir: "), "{stderr}");
    lines[0].to_string()
}

fn cache_arg(dirs: &Dirs) -> [String; 2] {
    [
        "--cache-dir".into(),
        dirs.cache.to_string_lossy().into_owned(),
    ]
}

#[test]
fn bad_sources_and_settings_are_refused_clearly() {
    let dirs = Dirs::new();
    let src = dirs.path("src");
    std::fs::create_dir(&src).unwrap();
    let cache = cache_arg(&dirs);
    let cache: Vec<&str> = cache.iter().map(String::as_str).collect();
    let mnt = dirs.mnt.clone();

    let line = mount_fails(&dirs, "s3://bucket/data", &mnt, &cache);
    assert!(line.contains("unknown scheme \"s3\""), "{line}");
    let line = mount_fails(&dirs, "nfs://server", &mnt, &cache);
    assert!(line.contains("missing export path"), "{line}");
    let line = mount_fails(&dirs, "/does/not/exist", &mnt, &cache);
    assert!(line.contains("/does/not/exist does not exist"), "{line}");
    let file = dirs.path("file");
    std::fs::write(&file, b"x").unwrap();
    let line = mount_fails(&dirs, file.to_str().unwrap(), &mnt, &cache);
    assert!(line.contains("is not a directory"), "{line}");

    let src = src.to_str().unwrap();
    let with = |extra: &[&str]| {
        let mut args = cache.clone();
        args.extend_from_slice(extra);
        mount_fails(&dirs, src, &mnt, &args)
    };
    assert!(with(&["--cache-size", "12XB"]).contains("is not a size"));
    assert!(with(&["--metadata-ttl", "soon"]).contains("is not a duration"));
    assert!(with(&["--high-watermark", "0.5"]).contains("watermarks must satisfy"));
    assert!(with(&["--block-size", "1000"]).contains("block size"));
    assert!(with(&["--cache-size", "1Mi"]).contains("too small"));

    let line = mount_fails(&dirs, src, &dirs.path("missing"), &cache);
    assert!(line.contains("does not exist"), "{line}");
    let line = mount_fails(&dirs, src, &file, &cache);
    assert!(line.contains("is not a directory"), "{line}");
}

#[test]
fn unusable_cache_directories_are_refused() {
    let dirs = Dirs::new();
    let src = dirs.path("src");
    std::fs::create_dir(&src).unwrap();
    let src = src.to_str().unwrap();

    // Read-only.
    let ro = dirs.path("ro");
    std::fs::create_dir(&ro).unwrap();
    assert!(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,size=64m", "tmpfs"])
            .arg(&ro)
            .status()
            .unwrap()
            .success()
    );
    let _ro_guard = Unmount(ro.clone());
    let line = mount_fails(
        &dirs,
        src,
        &dirs.mnt,
        &["--cache-dir", ro.join("cache").to_str().unwrap()],
    );
    assert!(line.contains("Read-only file system"), "{line}");

    // Full.
    let full = dirs.path("full");
    std::fs::create_dir(&full).unwrap();
    assert!(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
            .arg(&full)
            .status()
            .unwrap()
            .success()
    );
    let _full_guard = Unmount(full.clone());
    let line = mount_fails(
        &dirs,
        src,
        &dirs.mnt,
        &["--cache-dir", full.to_str().unwrap()],
    );
    assert!(line.contains("bytes in all"), "{line}");

    // Owned by another process; and a mount point that is already mounted.
    let first = Mount::start(&dirs, src, &["--cache-size", "64Mi"]);
    let other_mnt = dirs.path("mnt2");
    std::fs::create_dir(&other_mnt).unwrap();
    let output = dirs
        .command()
        .env_remove("RUST_LOG")
        .args(["mount", src])
        .arg(&other_mnt)
        .arg("--cache-dir")
        .arg(&dirs.cache)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!(
            "in use by another reservoir process (pid {})",
            first.pid().unwrap()
        )),
        "{stderr}"
    );
    assert!(!is_mounted(&other_mnt));
    let output = dirs
        .command()
        .env_remove("RUST_LOG")
        .args(["mount", src])
        .arg(&dirs.mnt)
        .arg("--cache-dir")
        .arg(dirs.path("cache2"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("is already a mount point (fuse.reservoir from "),
        "{stderr}"
    );
}

#[test]
fn unreachable_servers_and_missing_exports_are_named() {
    let dirs = Dirs::new();
    let export = dirs.path("export");
    std::fs::create_dir_all(export.join("present")).unwrap();
    let mut server = Ganesha::start(&export);
    let exported = server.exports()[0].clone();
    let cache = cache_arg(&dirs);
    let cache: Vec<&str> = cache.iter().map(String::as_str).collect();
    let mut args = cache.clone();
    args.extend_from_slice(&["--source-timeout", "3s"]);

    let line = mount_fails(&dirs, &server.url("/not/exported"), &dirs.mnt, &args);
    assert!(line.contains("/not/exported"), "{line}");
    let line = mount_fails(
        &dirs,
        &server.url(exported.join("present/missing")),
        &dirs.mnt,
        &args,
    );
    assert!(line.contains("missing"), "{line}");

    server.stop();
    let line = mount_fails(&dirs, &server.url_with_ports(&exported), &dirs.mnt, &args);
    assert!(
        line.contains("cannot reach") || line.contains("no answer"),
        "{line}"
    );
}

#[test]
fn warm_and_status_need_a_running_mount() {
    let dirs = Dirs::new();
    for args in [vec!["status"], vec!["warm"]] {
        let output = dirs.command().args(&args).arg(&dirs.mnt).output().unwrap();
        assert_eq!(output.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("is not served by a running reservoir mount"),
            "{stderr}"
        );
    }
    let src = dirs.path("src");
    std::fs::create_dir(&src).unwrap();
    let _mount = Mount::start(&dirs, src.to_str().unwrap(), &["--no-cache"]);
    let output = dirs
        .command()
        .args(["warm"])
        .arg(&dirs.mnt)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no cache"));
    let output = dirs
        .command()
        .args(["warm"])
        .arg(&dirs.mnt)
        .arg("/elsewhere")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("is not inside the mount"));
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

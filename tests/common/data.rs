//! Deterministic test datasets and tree comparison.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use sha2::{Digest, Sha256};

/// Writes `size` pseudo-random bytes derived from `seed` to `path`.
pub fn write_random_file(path: &Path, size: usize, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len());
        rng.fill(&mut chunk[..n]);
        file.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    file.flush().unwrap();
}

/// Creates `files` small files spread over nested directories (`dNN/eN/fNNNNN`), sizes
/// between `min` and `max` bytes; returns the total size.
pub fn write_small_tree(root: &Path, files: usize, min: usize, max: usize, seed: u64) -> u64 {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut total = 0u64;
    let mut buf = vec![0u8; max];
    for i in 0..files {
        let dir = root.join(format!("d{:02}/e{}", i % 50, (i / 50) % 4));
        std::fs::create_dir_all(&dir).unwrap();
        let size = rng.usize(min..=max);
        rng.fill(&mut buf[..size]);
        std::fs::write(dir.join(format!("f{i:05}")), &buf[..size]).unwrap();
        total += size as u64;
    }
    total
}

/// Reads a whole file with `O_DIRECT`: through a FUSE mount every read reaches the daemon,
/// never the kernel's page cache.
pub fn read_direct(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    const CHUNK: usize = 1 << 20;
    const ALIGN: usize = 4096;
    let mut file = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let mut buffer = vec![0u8; CHUNK + ALIGN];
    let start = buffer.as_ptr().align_offset(ALIGN);
    let aligned = &mut buffer[start..start + CHUNK];
    let mut out = Vec::new();
    loop {
        let n = file.read(aligned)?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&aligned[..n]);
    }
}

pub fn sha256_bytes(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

pub fn sha256_file(path: &Path) -> String {
    let mut file =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    format!("{:x}", hasher.finalize())
}

/// What a tree looks like: for every path, its kind, mode, owner, size, mtime and content
/// digest (files) or target (symlinks).
pub fn describe_tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        {
            let entry = entry.unwrap();
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let common = format!(
                "mode={:o} uid={} gid={} mtime={}.{}",
                meta.permissions().mode(),
                meta.uid(),
                meta.gid(),
                meta.mtime(),
                meta.mtime_nsec()
            );
            let what = if meta.file_type().is_symlink() {
                format!("link -> {}", std::fs::read_link(&path).unwrap().display())
            } else if meta.is_dir() {
                pending.push(path.clone());
                "dir".to_string()
            } else {
                format!("file size={} sha256={}", meta.len(), sha256_file(&path))
            };
            out.insert(rel, format!("{what} {common}"));
        }
    }
    out
}

/// Bytes the directory occupies on disk, as `du` counts them.
pub fn disk_usage(path: &Path) -> u64 {
    let out = std::process::Command::new("du")
        .args(["-s", "-B1"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

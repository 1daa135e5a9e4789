//! What the fuzz targets and the seed generator share: the layout of a `cache_files` input, the
//! journals' frames, and a small cache written by the real code.

use std::path::Path;
use std::sync::Arc;

use reservoir::cache::policy::Priority;
use reservoir::cache::{Cache, CacheConfig, ContentKey};
use reservoir::fs::meta::{MetaRecord, MetaStore, ROOT};
use reservoir::source::{Attr, DirEntry, Handle, Kind, Timestamp};

/// The files a `cache_files` input replaces, by its first byte (modulo their number). A
/// journal's input is either the file's bytes as they are, or (the first byte's high bit set)
/// records given as `[u16 LE length][payload]...` that the target frames with valid checksums,
/// so that the records' decoding and replay are reached, not only the checksum check.
pub const CACHE_FILES: [&str; 6] = ["index", "format", "meta", "session", "handles", "intents"];
/// The high bit of the first byte: the rest is payloads to frame.
pub const FRAMED: u8 = 0x80;

/// The name of the metadata journal the fixture writes (a volume's is named after its source).
pub const META_JOURNAL: &str = "fixture-source";

/// A journal frame header: the payload's length (u32 LE) and its xxh3-64 (u64 LE).
const FRAME_HEADER: usize = 12;

/// Wraps `payload` in a journal frame.
pub fn frame(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// The payloads of a journal's valid frames (the seeds' inverse of [`frame`]).
pub fn payloads(mut journal: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while journal.len() >= FRAME_HEADER {
        let len = u32::from_le_bytes(journal[..4].try_into().unwrap()) as usize;
        let Some(payload) = journal.get(FRAME_HEADER..FRAME_HEADER + len) else {
            break;
        };
        out.push(payload);
        journal = &journal[FRAME_HEADER + len..];
    }
    out
}

/// `[u16 LE length][payload]...` into framed journal bytes (the target's side).
pub fn frame_all(mut records: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while records.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([records[0], records[1]]));
        let end = (2 + len).min(records.len());
        frame(&records[2..end], &mut out);
        records = &records[end..];
    }
    out
}

/// Payloads as `[u16 LE length][payload]...` (the seeds' side).
pub fn length_prefixed(payloads: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for payload in payloads {
        out.extend_from_slice(&(payload.len() as u16).to_le_bytes());
        out.extend_from_slice(payload);
    }
    out
}

/// The configuration of the fixture's cache: 4 KiB blocks, 64 MiB.
pub fn cache_config(dir: &Path) -> CacheConfig {
    CacheConfig {
        dir: dir.to_path_buf(),
        capacity: 64 << 20,
        high_watermark: 0.95,
        low_watermark: 0.85,
        block_size: 4096,
    }
}

/// Files the fixture caches: (key, size, blocks stored).
pub const CACHED: [(u128, u64, &[u32]); 3] = [
    (0x1111_2222_3333_4444_5555_6666_7777_8888, 10_000, &[0, 2]),
    (0x0123_4567_89ab_cdef_0123_4567_89ab_cdef, 4096, &[0]),
    (0xfeed_0000_0000_0000_0000_0000_0000_0001, 9000, &[]),
];

/// Writes a cache at `dir` through the real code: the files of [`CACHED`] admitted and some
/// of their blocks stored, and a metadata journal of a small tree; returns the cache, flushed.
pub fn build_cache(dir: &Path) -> Arc<Cache> {
    let cache = Cache::open(cache_config(dir)).expect("the fixture's cache opens");
    for (key, size, blocks) in CACHED {
        let lease = cache
            .lease(ContentKey(key), size, Priority::Preload)
            .expect("admitting")
            .expect("admitted");
        for &block in blocks {
            let start = u64::from(block) * 4096;
            let len = (size - start).min(4096) as usize;
            let data: Vec<u8> = (0..len).map(|i| (i as u8) ^ (block as u8)).collect();
            cache.store_block(&lease, block, &data).expect("storing");
        }
    }
    let (journal, records) = cache
        .open_journal::<MetaRecord>(META_JOURNAL)
        .expect("the metadata journal opens");
    let meta = MetaStore::persistent(journal, records, usize::MAX);
    let attr = |kind, size, fileid| Attr {
        kind,
        size,
        perm: 0o755,
        uid: 1000,
        gid: 1000,
        nlink: 1,
        rdev: 0,
        fileid,
        atime: Timestamp {
            secs: 1_700_000_000,
            nanos: 1,
        },
        mtime: Timestamp {
            secs: 1_700_000_000,
            nanos: 2,
        },
        ctime: Timestamp {
            secs: 1_700_000_000,
            nanos: 3,
        },
    };
    let handle = |bytes: &[u8]| Handle(bytes.to_vec().into_boxed_slice());
    meta.set_root(handle(b"root"), attr(Kind::Directory, 4096, 2));
    let dir = meta
        .upsert_child(
            ROOT,
            b"dir",
            handle(b"dir"),
            attr(Kind::Directory, 4096, 3),
            false,
        )
        .expect("a directory under the root");
    meta.set_listing(
        dir,
        vec![
            DirEntry {
                name: b"file".to_vec(),
                handle: handle(b"file"),
                attr: attr(Kind::File, 10_000, 4),
            },
            DirEntry {
                name: b"link".to_vec(),
                handle: handle(b"link"),
                attr: attr(Kind::Symlink, 4, 5),
            },
        ],
    );
    if let Some(link) = meta.child(dir, b"link") {
        meta.set_link(link, b"file");
    }
    meta.flush(true);
    cache.flush(true).expect("flushing the index");
    cache
}

//! Writes the seed corpora under `fuzz/corpus/` (run from the repository's root:
//! `cargo run --manifest-path fuzz/Cargo.toml --example make_seeds`). The on-disk formats come
//! from files the real code writes (a cache built by `reservoir_fuzz::build_cache`, the session
//! state fixtures of `tests/fixtures/state`); NFS replies are encoded by `nfs3_client`'s own
//! XDR encoder. Text seeds are written out here. Existing seeds are overwritten, others kept.

use std::path::{Path, PathBuf};

use nfs3_client::nfs3_types::nfs3::{
    Nfs3Option, Nfs3Result, READ3res, READ3resok, READDIRPLUS3res, READDIRPLUS3resok, cookieverf3,
    dirlistplus3, entryplus3, fattr3, filename3, ftype3, nfs_fh3, nfstime3, specdata3,
};
use nfs3_client::nfs3_types::xdr_codec::{List, Opaque, Pack};
use reservoir_fuzz::{CACHE_FILES, FRAMED, META_JOURNAL, build_cache, length_prefixed, payloads};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = PathBuf::from("fuzz/corpus").join(target);
    std::fs::create_dir_all(&dir).expect("the corpus directory");
    std::fs::write(dir.join(name), bytes).expect("writing a seed");
}

fn selector(file: &str) -> u8 {
    CACHE_FILES
        .iter()
        .position(|f| *f == file)
        .expect("a known file") as u8
}

fn cache_seeds() {
    let root = tempfile::tempdir().expect("a temporary directory");
    let cache = root.path().join("cache");
    drop(build_cache(&cache));
    let state = Path::new("tests/fixtures/state/format-1");
    let files: [(&str, PathBuf); 5] = [
        ("index", cache.join("index")),
        ("format", cache.join("format")),
        ("meta", cache.join("meta").join(META_JOURNAL)),
        ("handles", state.join("handles")),
        ("intents", state.join("intents")),
    ];
    for (file, path) in files {
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut raw = vec![selector(file)];
        raw.extend_from_slice(&bytes);
        write("cache_files", &format!("{file}-raw"), &raw);
        if file != "format" {
            let mut framed = vec![selector(file) | FRAMED];
            framed.extend_from_slice(&length_prefixed(&payloads(&bytes)));
            write("cache_files", &format!("{file}-records"), &framed);
        }
    }
    let session = std::fs::read(state.join("session.json")).expect("the session fixture");
    let mut raw = vec![selector("session")];
    raw.extend_from_slice(&session);
    write("cache_files", "session-raw", &raw);
}

fn attr(type_: ftype3, size: u64) -> fattr3 {
    let time = nfstime3 {
        seconds: 1_700_000_000,
        nseconds: 5,
    };
    fattr3 {
        type_,
        mode: 0o644,
        nlink: 1,
        uid: 0,
        gid: 0,
        size,
        used: size,
        rdev: specdata3 {
            specdata1: 0,
            specdata2: 0,
        },
        fsid: 1,
        fileid: 42,
        atime: time,
        mtime: time,
        ctime: time,
    }
}

fn entry(name: &[u8], cookie: u64, with_handle: bool, size: u64) -> entryplus3<'static> {
    entryplus3 {
        fileid: cookie,
        name: filename3::from(name.to_vec()),
        cookie,
        name_attributes: Nfs3Option::Some(attr(ftype3::NF3REG, size)),
        name_handle: if with_handle {
            Nfs3Option::Some(nfs_fh3 {
                data: Opaque::owned(name.to_vec()),
            })
        } else {
            Nfs3Option::None
        },
    }
}

fn page(entries: Vec<entryplus3<'static>>, eof: bool) -> Vec<u8> {
    let reply: READDIRPLUS3res<'static> = Nfs3Result::Ok(READDIRPLUS3resok {
        dir_attributes: Nfs3Option::Some(attr(ftype3::NF3DIR, 4096)),
        cookieverf: cookieverf3([7; 8]),
        reply: dirlistplus3 {
            entries: List(entries),
            eof,
        },
    });
    let mut out = Vec::new();
    reply.pack(&mut out).expect("encoding a page");
    out
}

fn read_reply(data: &[u8], eof: bool) -> Vec<u8> {
    let reply: READ3res<'static> = Nfs3Result::Ok(READ3resok {
        file_attributes: Nfs3Option::None,
        count: data.len() as u32,
        eof,
        data: Opaque::owned(data.to_vec()),
    });
    let mut out = Vec::new();
    reply.pack(&mut out).expect("encoding a read");
    out
}

fn nfs_seeds() {
    let mut listing = vec![0u8];
    listing.extend(page(
        vec![
            entry(b".", 1, true, 0),
            entry(b"..", 2, true, 0),
            entry(b"a", 3, true, 10),
            entry(b"b", 4, false, 20),
        ],
        true,
    ));
    write("nfs_replies", "listing-one-page", &listing);
    let mut hostile = vec![0u8];
    hostile.extend(page(
        vec![
            entry(b"", 1, true, 0),
            entry(b"x/y", 2, true, 0),
            entry(b"nul\0", 3, true, u64::MAX),
            entry(&[b'n'; 256], 4, true, 1),
        ],
        false,
    ));
    hostile.extend(page(Vec::new(), false));
    write("nfs_replies", "listing-hostile-names", &hostile);
    let mut two = vec![0u8];
    two.extend(page(vec![entry(b"first", 10, true, 1)], false));
    two.extend(page(vec![entry(b"second", 20, true, 2)], true));
    write("nfs_replies", "listing-two-pages", &two);

    let mut read = vec![1u8];
    read.extend_from_slice(&10u32.to_le_bytes());
    read.extend(read_reply(b"hello", false));
    read.extend(read_reply(b"world!!", true));
    write("nfs_replies", "read-short-then-eof", &read);
    let mut stuck = vec![1u8];
    stuck.extend_from_slice(&10u32.to_le_bytes());
    stuck.extend(read_reply(b"", false));
    write("nfs_replies", "read-no-progress", &stuck);

    let mut pieces = vec![2u8];
    pieces.extend_from_slice(&4u16.to_le_bytes());
    pieces.extend_from_slice(&10u16.to_le_bytes());
    pieces.extend_from_slice(&[4, 3, 2]);
    write("nfs_replies", "pieces-short-middle", &pieces);
}

fn text_seeds() {
    for (i, text) in [
        "nfs://filer.example.com/export/data",
        "nfs://[fd00::1]:2049/a%20b/c?nfsport=2049&mountport=20048",
        "nfs://FILER//data/./x/",
        "local:///srv/data",
        "/srv//data/",
        "50Gi",
        "1.5Ti",
        "90s",
        "1h30m",
        "forever",
    ]
    .iter()
    .enumerate()
    {
        write("source_spec", &format!("seed-{i}"), text.as_bytes());
    }
    for (i, line) in [
        r#"{"op":"status"}"#,
        r#"{"op":"warm","paths":["/a","b/c"],"parallel":4,"volume_id":"v1"}"#,
        r#"{"op":"unmount","target_path":"/var/lib/kubelet/x/mount"}"#,
        r#"{"op":"mount","volume_id":"pvc-1","target_path":"/mnt/x","source":"nfs://filer/data","sub_path":"ns/claim","cache_size":"10Gi","high_watermark":0.9,"low_watermark":0.8,"metadata_ttl":"60s","read_write":true,"preload":["/models"]}"#,
        r#"{"op":"mount","volume_id":"v","target_path":"/mnt/y","source":"/srv/data","metadata_ttl":"forever"}"#,
    ]
    .iter()
    .enumerate()
    {
        write("control_request", &format!("seed-{i}"), format!("{line}\n").as_bytes());
    }
}

fn main() {
    cache_seeds();
    nfs_seeds();
    text_seeds();
}

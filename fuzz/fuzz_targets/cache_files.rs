//! The files a cache directory and a daemon's session state hold, damaged any way, loaded
//! through the real loaders: the cache's `index` journal and `format` marker (`Cache::open`,
//! with data files the fixture's index knows), a volume's metadata journal
//! (`MetaStore::persistent`), and a session's `session.json`, `handles` and `intents`
//! (`SessionDir::read`, `Handles::logged`, `Intents::logged`).
//!
//! The first byte picks the file (`reservoir_fuzz::CACHE_FILES`); with its high bit set the
//! rest is journal records that get valid frames, so that decoding and replay are reached.
//!
//! Properties besides "no panic": whatever was loaded, loaded again after the loader rewrote
//! it, gives the same state (files, bytes and complete files of the cache; nodes of the
//! metadata; open handles; the session record).
#![no_main]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use reservoir::cache::Cache;
use reservoir::daemon::SessionDir;
use reservoir::fs::handles::Handles;
use reservoir::fs::intents::Intents;
use reservoir::fs::meta::{MetaRecord, MetaStore};
use reservoir::journal::Journal;
use reservoir_fuzz::{CACHE_FILES, FRAMED, META_JOURNAL, build_cache, cache_config, frame_all};

struct Fixture {
    _root: tempfile::TempDir,
    /// The working cache directory, reset to the template before each input.
    cache: PathBuf,
    /// Every file of the template cache (relative path, contents).
    template: BTreeMap<PathBuf, Vec<u8>>,
    session: SessionDir,
    session_dir: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        // On a tmpfs when there is one: the loaders sync what they rewrite, and a disk's
        // fsyncs would make each input take tens of milliseconds.
        let shm = Path::new("/dev/shm");
        let root = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .expect("a temporary directory");
        let cache = root.path().join("cache");
        drop(build_cache(&cache));
        let mut template = BTreeMap::new();
        collect(&cache, &cache, &mut template);
        template.remove(Path::new("lock"));
        let sessions = root.path().join("sessions");
        let session = SessionDir::for_volume(&sessions, "fuzz");
        session.create().expect("a session directory");
        let session_dir = sessions.join(session.name());
        Fixture {
            _root: root,
            cache,
            template,
            session,
            session_dir,
        }
    })
}

fn collect(base: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
    for entry in std::fs::read_dir(dir)
        .expect("listing the template")
        .flatten()
    {
        let path = entry.path();
        if path.is_dir() {
            collect(base, &path, out);
        } else {
            let relative = path
                .strip_prefix(base)
                .expect("under the base")
                .to_path_buf();
            out.insert(
                relative,
                std::fs::read(&path).expect("reading the template"),
            );
        }
    }
}

/// Puts the template's files back (a loader may have removed, rewritten or set them aside).
fn reset(fixture: &Fixture) {
    let parent = fixture.cache.parent().expect("a parent");
    for entry in std::fs::read_dir(parent).expect("listing").flatten() {
        if entry.file_name().to_string_lossy().contains(".set-aside-") {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    for (relative, contents) in &fixture.template {
        let path = fixture.cache.join(relative);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("a directory of the template");
        }
        std::fs::write(&path, contents).expect("writing the template");
    }
}

/// What a loaded cache holds, as far as a restart must keep it.
fn cache_state(cache: &Cache) -> (u64, u64, u64, u64) {
    let usage = cache.usage();
    (
        usage.files,
        usage.data_bytes,
        usage.complete_files,
        usage.used,
    )
}

fn load_cache(dir: &Path) {
    let Ok(cache) = Cache::open(cache_config(dir)) else {
        return;
    };
    let state = cache_state(&cache);
    assert!(
        state.2 <= state.0,
        "more complete files than files: {state:?}"
    );
    cache.flush(true).expect("flushing a loaded cache");
    drop(cache);
    let again = Cache::open(cache_config(dir)).expect("a cache just written opens again");
    assert_eq!(cache_state(&again), state, "a restart changed the cache");
}

fn load_meta(path: &Path) {
    let Ok((journal, records)) = Journal::<MetaRecord>::open(path) else {
        return;
    };
    let meta = MetaStore::persistent(journal, records, usize::MAX);
    let nodes = meta.len();
    meta.flush(true);
    drop(meta);
    let (journal, records) = Journal::<MetaRecord>::open(path).expect("the journal reopens");
    let again = MetaStore::persistent(journal, records, usize::MAX);
    assert_eq!(again.len(), nodes, "a restart changed the metadata");
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let fixture = fixture();
    let which = CACHE_FILES[usize::from(first & !FRAMED) % CACHE_FILES.len()];
    let framed;
    let contents = if first & FRAMED != 0 && which != "format" && which != "session" {
        framed = frame_all(rest);
        &framed[..]
    } else {
        rest
    };
    match which {
        "index" | "format" => {
            reset(fixture);
            std::fs::write(fixture.cache.join(which), contents).expect("writing the input");
            load_cache(&fixture.cache);
        }
        "meta" => {
            let dir = fixture.cache.join("meta");
            std::fs::create_dir_all(&dir).expect("the metadata directory");
            let path = dir.join(META_JOURNAL);
            std::fs::write(&path, contents).expect("writing the input");
            load_meta(&path);
        }
        "session" => {
            std::fs::write(fixture.session_dir.join("session.json"), contents)
                .expect("writing the input");
            if let Ok(record) = fixture.session.read() {
                fixture
                    .session
                    .write(&record)
                    .expect("writing the record back");
                assert_eq!(fixture.session.read().expect("reading it again"), record);
            }
        }
        "handles" => {
            let path = fixture.session_dir.join("handles");
            std::fs::write(&path, contents).expect("writing the input");
            if let Ok(handles) = Handles::logged(&path) {
                let open = handles.open_files();
                drop(handles);
                let again = Handles::logged(&path).expect("a rewritten log loads");
                assert_eq!(again.open_files(), open, "a restart changed the handles");
            }
        }
        _ => {
            let path = fixture.session_dir.join("intents");
            std::fs::write(&path, contents).expect("writing the input");
            let _ = Intents::logged(&path);
        }
    }
});

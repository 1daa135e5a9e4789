//! A broken or hostile NFS server's replies, at the layer where our client sees them: the bytes
//! are decoded by `nfs3_client`'s XDR decoder as it decodes a reply off the wire, then taken by
//! `source::nfs::replies` exactly as a listing (READDIRPLUS pages) or a read (READ replies)
//! takes them. The first byte picks: a listing, a read, or the joining of a parallel read.
//!
//! Properties besides "no panic":
//! - every name a listing keeps is one component (not empty, `.` or `..`, no `/` or NUL, at
//!   most 255 bytes); a complete entry has a handle; attributes are in range;
//! - a read never returns more than was asked, and ends (no reply loops it);
//! - a listing stops at the end, at an error, or after a bounded number of pages here.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use nfs3_client::nfs3_types::nfs3::{Nfs3Result, READ3res, READDIRPLUS3res};
use nfs3_client::nfs3_types::xdr_codec::Unpack;
use reservoir::source::nfs::replies::{
    Listed, NoProgress, ReadStep, join_pieces, listing_page, take_read,
};

/// Pages or READ replies one input may chain (a real listing goes on while the server says
/// there is more; here the input runs out first).
const MOST_REPLIES: usize = 64;

fn one_component(name: &[u8]) {
    assert!(
        !name.is_empty()
            && name != b"."
            && name != b".."
            && !name.contains(&b'/')
            && !name.contains(&0)
            && name.len() <= 255,
        "a listing kept the name {:?}",
        String::from_utf8_lossy(name)
    );
}

fn listing(bytes: &[u8]) {
    let mut input = Cursor::new(bytes);
    let mut cookie = 0u64;
    for _ in 0..MOST_REPLIES {
        let Ok((reply, _)) = READDIRPLUS3res::unpack(&mut input) else {
            return;
        };
        let Nfs3Result::Ok(ok) = reply else {
            return;
        };
        let Ok(page) = listing_page(ok, cookie) else {
            return;
        };
        for listed in &page.entries {
            match listed {
                Listed::Entry(entry) => {
                    one_component(&entry.name);
                    assert!(!entry.handle.as_bytes().is_empty());
                    assert!(entry.attr.perm <= 0o7777);
                    for time in [entry.attr.atime, entry.attr.mtime, entry.attr.ctime] {
                        assert!(time.nanos < 1_000_000_000);
                    }
                }
                Listed::LookUp(name) => one_component(name),
            }
        }
        if page.eof {
            return;
        }
        cookie = page.cookie;
    }
}

fn read(bytes: &[u8]) {
    let Some((count, replies)) = bytes.split_first_chunk::<4>() else {
        return;
    };
    // Reads are at most a block (64 MiB); keep the fuzzer's allocations small.
    let count = u32::from_le_bytes(*count) % (1 << 20);
    let mut input = Cursor::new(replies);
    let mut out = Vec::new();
    for _ in 0..MOST_REPLIES {
        if out.len() >= count as usize {
            break;
        }
        let want = count - out.len() as u32;
        let Ok((reply, _)) = READ3res::unpack(&mut input) else {
            return;
        };
        let Nfs3Result::Ok(ok) = reply else {
            return;
        };
        let before = out.len();
        match take_read(&mut out, want, ok) {
            Ok(ReadStep::Done) => break,
            Ok(ReadStep::More) => assert!(out.len() > before, "no progress and no end"),
            Err(NoProgress) => return,
        }
        assert!(out.len() <= count as usize, "read more than asked");
    }
    assert!(out.len() <= count as usize, "read more than asked");
}

fn pieces(bytes: &[u8]) {
    let Some((head, rest)) = bytes.split_first_chunk::<4>() else {
        return;
    };
    let piece = u32::from(u16::from_le_bytes([head[0], head[1]])).max(1);
    let len = u32::from(u16::from_le_bytes([head[2], head[3]]));
    // Each piece's length is one byte of the input (a server may return less than asked).
    let count = len.div_ceil(piece) as usize;
    let pieces: Vec<Vec<u8>> = rest
        .iter()
        .take(count)
        .enumerate()
        .map(|(i, &got)| {
            let asked = piece.min(len - i as u32 * piece) as usize;
            vec![0xa5; usize::from(got).min(asked)]
        })
        .collect();
    let complete = pieces.len() == count
        && pieces
            .iter()
            .enumerate()
            .all(|(i, p)| p.len() == piece.min(len - i as u32 * piece) as usize);
    let out = join_pieces(pieces, piece, len);
    assert!(out.len() <= len as usize);
    if complete {
        assert_eq!(out.len(), len as usize);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => listing(rest),
        1 => read(rest),
        _ => pieces(rest),
    }
});

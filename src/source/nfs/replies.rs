//! What the client takes from a server's READDIRPLUS and READ replies, apart from the calls
//! that fetch them: a broken or hostile server's answers meet these functions first, and they
//! are tested (and fuzzed, `fuzz/fuzz_targets/nfs_replies.rs`) without a server.

use nfs3_client::nfs3_types::nfs3::{Nfs3Option, READ3resok, READDIRPLUS3resok, cookieverf3};
use tracing::warn;

use super::convert::attr_from_fattr;
use crate::source::{DirEntry, Handle, check_name};

/// One entry of a listing page, as the client takes it.
#[derive(Debug)]
pub enum Listed {
    /// Name, handle and attributes, all given.
    Entry(DirEntry),
    /// A name whose handle or attributes the server left out: it is looked up.
    LookUp(Vec<u8>),
}

/// A READDIRPLUS page, taken.
#[derive(Debug)]
pub struct ListingPage {
    /// In the server's order, without `.`, `..` and names that are not one component.
    pub entries: Vec<Listed>,
    /// Where the next page starts: the last entry's cookie (the one sent if the page is empty).
    pub cookie: u64,
    pub verifier: cookieverf3,
    pub eof: bool,
    /// Entries the server sent, those skipped included.
    pub received: usize,
}

/// The server returned an empty page and no end of the listing: asking again would loop.
#[derive(Debug, PartialEq, Eq)]
pub struct EmptyPage;

/// Takes one READDIRPLUS page that followed a request at `cookie`.
pub fn listing_page(ok: READDIRPLUS3resok<'_>, cookie: u64) -> Result<ListingPage, EmptyPage> {
    let eof = ok.reply.eof;
    let page = ok.reply.entries.into_inner();
    if page.is_empty() && !eof {
        return Err(EmptyPage);
    }
    let mut taken = ListingPage {
        entries: Vec::with_capacity(page.len()),
        cookie,
        verifier: ok.cookieverf,
        eof,
        received: page.len(),
    };
    for entry in page {
        taken.cookie = entry.cookie;
        let name = entry.name.0.into_owned();
        if name == b"." || name == b".." {
            continue;
        }
        if check_name(&name).is_err() {
            warn!(name = %String::from_utf8_lossy(&name).escape_debug(), "skipping an entry with an invalid name");
            continue;
        }
        taken
            .entries
            .push(match (entry.name_handle, entry.name_attributes) {
                (Nfs3Option::Some(fh), Nfs3Option::Some(attr)) if !fh.data.is_empty() => {
                    Listed::Entry(DirEntry {
                        name,
                        handle: Handle(fh.data.into_owned().into_boxed_slice()),
                        attr: attr_from_fattr(&attr),
                    })
                }
                _ => Listed::LookUp(name),
            });
    }
    Ok(taken)
}

/// The most names one listing may hold: a server that never ends its listing (always a new
/// cookie, never the end) is stopped here instead of growing the list until memory runs out.
/// A directory of this many names is far past what a dataset's directory holds.
pub const MAX_LISTING_ENTRIES: usize = 10_000_000;

/// Why a listing is given up: the server does not lead it to an end.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Stalled {
    /// A page ended at a cookie an earlier page of this listing ended at: asking on would loop.
    #[error("a page ended at cookie {0} again")]
    RepeatedCookie(u64),
    #[error("more than {MAX_LISTING_ENTRIES} names and no end")]
    TooManyEntries,
}

/// What a listing has gone through so far, to tell a server that leads it nowhere.
#[derive(Default)]
pub struct ListingProgress {
    page_ends: std::collections::HashSet<u64>,
    entries: usize,
}

impl ListingProgress {
    /// Counts a page that is not the last, which ended at `cookie` after `entries` entries
    /// (skipped ones included: a server could send nothing but names it knows are skipped).
    pub fn next_page(&mut self, cookie: u64, entries: usize) -> Result<(), Stalled> {
        self.entries = self.entries.saturating_add(entries);
        if self.entries > MAX_LISTING_ENTRIES {
            return Err(Stalled::TooManyEntries);
        }
        if !self.page_ends.insert(cookie) {
            return Err(Stalled::RepeatedCookie(cookie));
        }
        Ok(())
    }
}

/// Where a range being read stands after one READ reply.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadStep {
    /// The range is read, or the file ends.
    Done,
    /// Read the rest.
    More,
}

/// The server returned no data and no end of file: asking again would loop.
#[derive(Debug, PartialEq, Eq)]
pub struct NoProgress;

/// Appends what a READ reply for `want` bytes brought to `out` (never more than `want`).
pub fn take_read(out: &mut Vec<u8>, want: u32, ok: READ3resok<'_>) -> Result<ReadStep, NoProgress> {
    let mut data = ok.data.0.into_owned();
    data.truncate(want as usize);
    let got = data.len();
    if out.is_empty() {
        *out = data; // the usual case, one READ: no copy
    } else {
        out.extend_from_slice(&data);
    }
    if ok.eof {
        Ok(ReadStep::Done)
    } else if got == 0 {
        Err(NoProgress)
    } else if got == want as usize {
        Ok(ReadStep::Done)
    } else {
        Ok(ReadStep::More)
    }
}

/// Joins the pieces of a read of `len` bytes issued as pieces of `piece` bytes (the last one
/// shorter): a short piece is the end of the file, and nothing after it is kept.
pub fn join_pieces(pieces: Vec<Vec<u8>>, piece: u32, len: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    let mut start = 0u32;
    for data in pieces {
        let expected = piece.min(len.saturating_sub(start));
        out.extend_from_slice(&data[..data.len().min(expected as usize)]);
        if (data.len() as u32) < expected {
            break; // end of file
        }
        start = start.saturating_add(expected);
    }
    out
}

#[cfg(test)]
mod tests {
    use nfs3_client::nfs3_types::nfs3::{
        dirlistplus3, entryplus3, fattr3, filename3, ftype3, nfs_fh3, nfstime3, specdata3,
    };
    use nfs3_client::nfs3_types::xdr_codec::{List, Opaque};

    #[test]
    fn a_listing_that_leads_nowhere_is_given_up() {
        let mut progress = ListingProgress::default();
        progress.next_page(10, 10).unwrap();
        progress.next_page(20, 10).unwrap();
        // Back to an earlier page, or a page that did not move: either would loop for ever.
        assert_eq!(progress.next_page(10, 10), Err(Stalled::RepeatedCookie(10)));
        let mut progress = ListingProgress::default();
        progress.next_page(0, 0).unwrap();
        assert_eq!(progress.next_page(0, 1), Err(Stalled::RepeatedCookie(0)));
        // Always a new cookie, never the end: stopped at the entry limit.
        let mut progress = ListingProgress::default();
        let page = 1000;
        for cookie in 1..=(MAX_LISTING_ENTRIES / page) as u64 {
            progress.next_page(cookie, page).unwrap();
        }
        assert_eq!(
            progress.next_page(u64::MAX, page),
            Err(Stalled::TooManyEntries)
        );
    }

    use super::*;

    fn attr(size: u64) -> fattr3 {
        let time = nfstime3 {
            seconds: 1,
            nseconds: 2_000_000_000,
        };
        fattr3 {
            type_: ftype3::NF3REG,
            mode: 0o100644,
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
            fileid: 9,
            atime: time,
            mtime: time,
            ctime: time,
        }
    }

    fn entry(name: &[u8], cookie: u64, handle: Option<&[u8]>) -> entryplus3<'static> {
        entryplus3 {
            fileid: cookie,
            name: filename3::from(name.to_vec()),
            cookie,
            name_attributes: Nfs3Option::Some(attr(cookie)),
            name_handle: match handle {
                Some(h) => Nfs3Option::Some(nfs_fh3 {
                    data: Opaque::owned(h.to_vec()),
                }),
                None => Nfs3Option::None,
            },
        }
    }

    fn page(entries: Vec<entryplus3<'static>>, eof: bool) -> READDIRPLUS3resok<'static> {
        READDIRPLUS3resok {
            dir_attributes: Nfs3Option::None,
            cookieverf: cookieverf3([3; 8]),
            reply: dirlistplus3 {
                entries: List(entries),
                eof,
            },
        }
    }

    #[test]
    fn a_listing_keeps_single_components_and_looks_up_what_the_server_left_out() {
        let taken = listing_page(
            page(
                vec![
                    entry(b".", 1, Some(b"h")),
                    entry(b"..", 2, Some(b"h")),
                    entry(b"", 3, Some(b"h")),
                    entry(b"a/b", 4, Some(b"h")),
                    entry(b"nul\0", 5, Some(b"h")),
                    entry(&[b'n'; 256], 6, Some(b"h")),
                    entry(b"kept", 7, Some(b"fh")),
                    entry(b"no-handle", 8, None),
                    entry(b"empty-handle", 9, Some(b"")),
                ],
                false,
            ),
            0,
        )
        .unwrap();
        assert_eq!(
            taken.cookie, 9,
            "the next page starts after the last entry, kept or not"
        );
        assert!(!taken.eof);
        assert_eq!(taken.verifier, cookieverf3([3; 8]));
        let names: Vec<(&[u8], bool)> = taken
            .entries
            .iter()
            .map(|l| match l {
                Listed::Entry(e) => (&e.name[..], true),
                Listed::LookUp(name) => (&name[..], false),
            })
            .collect();
        assert_eq!(
            names,
            [
                (&b"kept"[..], true),
                (&b"no-handle"[..], false),
                (&b"empty-handle"[..], false)
            ]
        );
        let Listed::Entry(kept) = &taken.entries[0] else {
            unreachable!()
        };
        assert_eq!(kept.handle.as_bytes(), b"fh");
        assert_eq!(kept.attr.perm, 0o644);
        assert_eq!(
            kept.attr.mtime.nanos, 999_999_999,
            "nanoseconds are clamped"
        );
    }

    #[test]
    fn an_empty_page_ends_a_listing_only_at_its_end() {
        assert_eq!(
            listing_page(page(Vec::new(), false), 5).unwrap_err(),
            EmptyPage
        );
        let last = listing_page(page(Vec::new(), true), 5).unwrap();
        assert!(last.eof && last.entries.is_empty());
        assert_eq!(last.cookie, 5);
    }

    fn read(data: &[u8], eof: bool) -> READ3resok<'static> {
        READ3resok {
            file_attributes: Nfs3Option::None,
            count: data.len() as u32,
            eof,
            data: Opaque::owned(data.to_vec()),
        }
    }

    #[test]
    fn a_read_takes_no_more_than_it_asked_and_stops_at_the_end_or_a_stall() {
        let mut out = Vec::new();
        assert_eq!(
            take_read(&mut out, 10, read(b"hello", false)),
            Ok(ReadStep::More)
        );
        assert_eq!(
            take_read(&mut out, 5, read(b"world, and more", false)),
            Ok(ReadStep::Done),
            "a server that sends more than asked is cut at what was asked"
        );
        assert_eq!(out, b"helloworld");
        let mut out = b"abc".to_vec();
        assert_eq!(take_read(&mut out, 7, read(b"", false)), Err(NoProgress));
        assert_eq!(
            take_read(&mut out, 7, read(b"de", true)),
            Ok(ReadStep::Done)
        );
        assert_eq!(out, b"abcde");
    }

    #[test]
    fn pieces_join_up_to_the_first_short_one() {
        let piece = |n: usize, b: u8| vec![b; n];
        assert_eq!(
            join_pieces(vec![piece(4, 1), piece(4, 2), piece(2, 3)], 4, 10),
            [1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
        );
        assert_eq!(
            join_pieces(vec![piece(4, 1), piece(3, 2), piece(2, 3)], 4, 10),
            [1, 1, 1, 1, 2, 2, 2],
            "a short piece is the end of the file"
        );
        assert_eq!(
            join_pieces(vec![piece(9, 1)], 4, 3),
            [1, 1, 1],
            "never more than asked"
        );
    }
}

//! Writes and commits: UNSTABLE WRITEs split into pieces sent concurrently over the pool, the
//! moment a write has been sent (for `write_sent`), and COMMIT checked against the write
//! verifiers of the unstable writes since the last one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use futures_util::future::{Either, select};
use futures_util::stream::FuturesUnordered;
use nfs3_client::nfs3_types::nfs3::{
    COMMIT3args, Nfs3Result, WRITE3args, nfs_fh3, stable_how, writeverf3,
};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{Instrument, debug, warn};

use super::convert::{Fh, fh_of, post_op};
use super::{NfsSource, Server};
use crate::source::{Attr, Handle, Landing, Result, SourceError, WriteOutcome};

/// What COMMIT has to check for one file: the write verifier its unstable writes were answered
/// with since the last commit.
#[derive(Clone, Copy, Debug)]
struct Unstable {
    /// The verifier of the latest unstable write.
    verf: writeverf3,
    /// Two unstable writes got different verifiers: the server restarted in between and may have
    /// lost the earlier data.
    lost: bool,
    /// Unstable writes recorded so far (tells a commit whether more came in meanwhile).
    writes: u64,
}

/// Files with unstable writes not yet committed, by file handle. An entry lives from a file's
/// first unstable write until a COMMIT covers it: files written and never committed stay (one
/// small entry each) until they are.
#[derive(Debug, Default)]
pub(super) struct UnstableWrites(HashMap<Box<[u8]>, Unstable>);

impl UnstableWrites {
    /// Records an unstable write answered with `verf`; true if the verifier changed since the
    /// previous one (the server restarted in between).
    fn note(&mut self, fh: &[u8], verf: writeverf3) -> bool {
        match self.0.get_mut(fh) {
            Some(entry) => {
                let changed = entry.verf != verf;
                if changed {
                    entry.lost = true;
                    entry.verf = verf;
                }
                entry.writes += 1;
                changed
            }
            None => {
                self.0.insert(
                    fh.into(),
                    Unstable {
                        verf,
                        lost: false,
                        writes: 1,
                    },
                );
                false
            }
        }
    }

    fn get(&self, fh: &[u8]) -> Option<Unstable> {
        self.0.get(fh).copied()
    }

    /// Settles a COMMIT answered with `verf` that started when the file's state was `before`;
    /// true if data written before it may have been lost.
    fn committed(&mut self, fh: &[u8], before: Option<Unstable>, verf: writeverf3) -> bool {
        let Some(before) = before else {
            // No unstable write of ours was pending when the commit started.
            return false;
        };
        if let Some(entry) = self.0.get_mut(fh) {
            if entry.writes == before.writes {
                self.0.remove(fh);
            } else {
                // Writes answered while the commit was in flight may not be covered by it: they
                // stay pending, checked against the verifier seen now.
                entry.lost = entry.verf != verf;
            }
        }
        before.lost || before.verf != verf
    }
}

tokio::task_local! {
    /// Set around the calls that carry one piece of a [`SourceWrite::write_sent`] write.
    static SENT: Arc<PieceSent>;
}

/// One piece of a write whose sending is awaited; fires once, even if the call is retried.
struct PieceSent {
    fired: AtomicBool,
    write: Arc<WriteSent>,
}

/// Tells the writer once every piece of its write has been sent.
struct WriteSent {
    pieces_left: AtomicUsize,
    tell: Mutex<Option<oneshot::Sender<()>>>,
}

impl PieceSent {
    fn fire(&self) {
        if self.fired.swap(true, Ordering::AcqRel) {
            return;
        }
        if self.write.pieces_left.fetch_sub(1, Ordering::AcqRel) == 1 {
            let tell = self
                .write
                .tell
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take();
            if let Some(tell) = tell {
                let _ = tell.send(());
            }
        }
    }
}

/// Marks the piece of a write that the current task carries as sent: called by the transport
/// when the client first reads the reply, which `nfs3_client` does only once the whole call
/// is written (pinned by a test below).
pub(super) fn note_sent() {
    let _ = SENT.try_with(|sent| sent.fire());
}

/// The most recent of two snapshots of one file's attributes (pieces of a write finish in any
/// order): the later change, then the larger size.
fn newest(a: Option<Attr>, b: Option<Attr>) -> Option<Attr> {
    match (a, b) {
        (Some(a), Some(b)) => {
            if (b.ctime, b.mtime, b.size) >= (a.ctime, a.mtime, a.size) {
                Some(b)
            } else {
                Some(a)
            }
        }
        (a, b) => a.or(b),
    }
}

impl Server {
    fn unstable(&self) -> std::sync::MutexGuard<'_, UnstableWrites> {
        self.unstable
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Remembers the verifier of an UNSTABLE write to `fh`.
    fn note_unstable(&self, fh: &[u8], verf: writeverf3) {
        if self.unstable().note(fh, verf) {
            warn!(file = %Fh(fh), "the write verifier changed between two unstable writes: the server restarted and may have lost data");
        }
    }

    /// Writes `data` at `offset` in as many UNSTABLE WRITEs as the server needs (it may write
    /// fewer bytes than asked). Returns the attributes after the last one, when reported.
    pub(super) async fn write_range(
        &self,
        fh: &nfs_fh3,
        offset: u64,
        data: &[u8],
        deadline: Instant,
    ) -> Result<Option<Attr>> {
        let mut done = 0usize;
        let mut attr = None;
        while done < data.len() {
            let at = offset + done as u64;
            let rest = &data[done..];
            let args = WRITE3args {
                file: fh.clone(),
                offset: at,
                count: rest.len() as u32,
                stable: stable_how::UNSTABLE,
                data: Opaque::borrowed(rest),
            };
            // WRITE at an offset is idempotent: the transport retry of `call` is safe.
            let reply = self
                .call("write", deadline, procedure!(write, args))
                .await?;
            let ok = match reply {
                Nfs3Result::Ok(ok) => ok,
                Nfs3Result::Err((status, _)) => {
                    return Err(self.status_error(
                        "write",
                        status,
                        format_args!("{} at {at}+{}", Fh(&fh.data), rest.len()),
                    ));
                }
            };
            let count = (ok.count as usize).min(rest.len());
            if count == 0 {
                return Err(SourceError::status(
                    "write",
                    libc::EIO,
                    format!(
                        "{}: {} at {at}: the server wrote nothing",
                        self.id,
                        Fh(&fh.data)
                    ),
                ));
            }
            if ok.committed == stable_how::UNSTABLE {
                self.note_unstable(&fh.data, ok.verf);
            }
            if count < rest.len() {
                debug!(at, asked = rest.len(), written = count, "short write");
            }
            attr = newest(attr, post_op(ok.file_wcc.after));
            done += count;
        }
        Ok(attr)
    }

    /// COMMIT of the whole file, checked against the verifiers of its unstable writes.
    pub(super) async fn commit_fh(&self, fh: &nfs_fh3, deadline: Instant) -> Result<()> {
        let before = self.unstable().get(&fh.data);
        let args = COMMIT3args {
            file: fh.clone(),
            offset: 0,
            count: 0,
        };
        let reply = self
            .call("commit", deadline, procedure!(commit, args))
            .await?;
        let verf = match reply {
            Nfs3Result::Ok(ok) => ok.verf,
            Nfs3Result::Err((status, _)) => {
                return Err(self.status_error("commit", status, format_args!("{}", Fh(&fh.data))));
            }
        };
        let lost = self.unstable().committed(&fh.data, before, verf);
        if lost {
            warn!(file = %Fh(&fh.data), "COMMIT: the server's write verifier changed since the unstable writes");
            return Err(SourceError::status(
                "commit",
                libc::EIO,
                format!(
                    "{}: {}: the server restarted since the last writes (write verifier changed): \
                     data written since the previous commit may be lost",
                    self.id,
                    Fh(&fh.data)
                ),
            ));
        }
        Ok(())
    }
}

/// The write half. Every call reaches the server before it returns; each is bounded by one
/// deadline (the source timeout) for all the RPCs it makes.
impl NfsSource {
    /// Refuses a write that would end beyond the largest offset.
    fn check_write(&self, file: &Handle, offset: u64, len: usize) -> Result<()> {
        if offset.checked_add(len as u64).is_none() {
            return Err(SourceError::status(
                "write",
                libc::EFBIG,
                format!(
                    "{}: {}: write beyond the largest offset",
                    self.server.id,
                    Fh(file.as_bytes())
                ),
            ));
        }
        Ok(())
    }

    pub(super) async fn write_impl(
        &self,
        file: &Handle,
        offset: u64,
        data: &[u8],
    ) -> Result<Option<Attr>> {
        if data.is_empty() {
            return Ok(None);
        }
        self.check_write(file, offset, data.len())?;
        let deadline = self.deadline();
        let fh = fh_of(file);
        let piece = self.write_size.max(1) as usize;
        // Pieces concurrently over the pool (one connection each), all within the one deadline.
        // On the first error the others are dropped, which drops their connections.
        let mut pieces: FuturesUnordered<_> = data
            .chunks(piece)
            .enumerate()
            .map(|(index, chunk)| {
                let at = offset + (index * piece) as u64;
                self.server.write_range(&fh, at, chunk, deadline)
            })
            .collect();
        let mut attr = None;
        while let Some(result) = pieces.next().await {
            attr = newest(attr, result?);
        }
        Ok(attr)
    }

    /// [`SourceWrite::write_sent`]: the pieces run in one future that owns the data; this returns
    /// it once every piece's WRITE has been written to its connection, or the outcome of a write
    /// that ended before that.
    pub(super) async fn write_sent_impl(
        &self,
        file: &Handle,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<Landing> {
        if data.is_empty() {
            return Ok(Landing::Landed(None));
        }
        self.check_write(file, offset, data.len())?;
        let deadline = self.deadline();
        let fh = fh_of(file);
        let piece = self.write_size.max(1) as usize;
        let (tell, sent) = oneshot::channel();
        let write = Arc::new(WriteSent {
            pieces_left: AtomicUsize::new(data.len().div_ceil(piece)),
            tell: Mutex::new(Some(tell)),
        });
        let server = self.server.clone();
        let mut writing: WriteOutcome = Box::pin(
            async move {
                let mut pieces: FuturesUnordered<_> = data
                    .chunks(piece)
                    .enumerate()
                    .map(|(index, chunk)| {
                        let at = offset + (index * piece) as u64;
                        let sent = Arc::new(PieceSent {
                            fired: AtomicBool::new(false),
                            write: write.clone(),
                        });
                        SENT.scope(sent, server.write_range(&fh, at, chunk, deadline))
                    })
                    .collect();
                drop(write);
                let mut attr = None;
                while let Some(result) = pieces.next().await {
                    attr = newest(attr, result?);
                }
                Ok(attr)
            }
            .instrument(tracing::Span::current()),
        );
        // Driven here until it is sent (no hand-over to another task on the way), then handed
        // to the caller to await the answer.
        match select(&mut writing, sent).await {
            Either::Left((result, _)) => result.map(Landing::Landed),
            Either::Right((Ok(()), _)) => Ok(Landing::InFlight(writing)),
            // Every piece ended (or the first failure dropped the rest) before all were sent.
            Either::Right((Err(_), _)) => writing.await.map(Landing::Landed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_reports_a_verifier_change_since_the_unstable_writes() {
        let (a, b) = (writeverf3([1; 8]), writeverf3([2; 8]));
        let fh = &b"file"[..];
        let mut pending = UnstableWrites::default();
        // Nothing written: nothing to report, whatever the verifier.
        let before = pending.get(fh);
        assert!(!pending.committed(fh, before, b));

        // Same verifier at the writes and at the commit: durable, and forgotten.
        assert!(!pending.note(fh, a));
        assert!(!pending.note(fh, a));
        let before = pending.get(fh);
        assert!(!pending.committed(fh, before, a));
        assert!(pending.get(fh).is_none());

        // The server restarted between the writes and the commit.
        pending.note(fh, a);
        let before = pending.get(fh);
        assert!(pending.committed(fh, before, b));
        assert!(pending.get(fh).is_none(), "reported once");

        // ...or between two writes, even if the commit then agrees with the last one.
        pending.note(fh, a);
        assert!(pending.note(fh, b));
        let before = pending.get(fh);
        assert!(pending.committed(fh, before, b));

        // A write answered while the commit was in flight stays pending: the next commit checks
        // it, and the loss of the earlier data is reported only once.
        pending.note(fh, a);
        let before = pending.get(fh);
        pending.note(fh, b);
        assert!(pending.committed(fh, before, b));
        let before = pending.get(fh);
        assert!(before.is_some_and(|u| !u.lost));
        assert!(!pending.committed(fh, before, b));
        assert!(pending.get(fh).is_none());
    }

    /// What a recording transport saw of one call.
    #[derive(Default)]
    struct Seen {
        written: Vec<u8>,
        writes: usize,
        /// Bytes written when the client first read.
        at_first_read: Option<usize>,
    }

    /// A stand-in for the TCP transport, for the one thing a server cannot observe: the order
    /// of the client's own writes and reads. It takes at most 64 KiB per write (so that a call
    /// takes many) and ends the call with an error at the first read.
    struct RecordingTransport(Arc<Mutex<Seen>>);

    impl nfs3_client::io::AsyncWrite for RecordingTransport {
        async fn async_write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = buf.len().min(64 << 10);
            let mut seen = self.0.lock().unwrap();
            seen.written.extend_from_slice(&buf[..n]);
            seen.writes += 1;
            Ok(n)
        }
    }

    impl nfs3_client::io::AsyncRead for RecordingTransport {
        async fn async_read(&mut self, _buf: &mut [u8]) -> std::io::Result<usize> {
            let mut seen = self.0.lock().unwrap();
            let written = seen.written.len();
            seen.at_first_read.get_or_insert(written);
            Err(std::io::ErrorKind::ConnectionReset.into())
        }
    }

    /// `write_sent` takes the first read of a reply as the moment the whole WRITE is on the
    /// wire ([`note_sent`]). `nfs3_client` does not document that it reads only after writing
    /// a whole call; this pins it: at the first read, one complete RPC record (the last
    /// fragment, its length as the record mark says) carrying all the data has been written.
    #[tokio::test]
    async fn the_client_reads_only_after_writing_a_whole_call() {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut client = nfs3_client::Nfs3Client::new(RecordingTransport(seen.clone()));
        let data = vec![0x5a; 1 << 20];
        let args = WRITE3args {
            file: nfs_fh3 {
                data: Opaque::owned(vec![7; 32]),
            },
            offset: 0,
            count: data.len() as u32,
            stable: stable_how::UNSTABLE,
            data: Opaque::borrowed(&data),
        };
        assert!(
            client.write(&args).await.is_err(),
            "the transport ends the call"
        );
        let seen = seen.lock().unwrap();
        assert!(seen.writes > 16, "the call took {} writes", seen.writes);
        assert_eq!(seen.at_first_read, Some(seen.written.len()));
        let mark = u32::from_be_bytes(seen.written[..4].try_into().unwrap());
        assert!(mark & 0x8000_0000 != 0, "one fragment, the last");
        assert_eq!((mark & 0x7fff_ffff) as usize, seen.written.len() - 4);
        assert!(
            seen.written.ends_with(&data),
            "the data is the end of the call"
        );
    }
}

//! One open file of /dev/fuse: where requests are read and replies written.
//!
//! A connection may have several: the one the mount was made with and clones of it
//! (`FUSE_DEV_IOC_CLONE`), each with its own queue of requests being processed. A reply must be
//! written to the open file its request was read from. The kernel ends the connection only when
//! the last of them is closed; any other one being closed fails the requests it was processing,
//! which is why every channel is also held by the descriptor keeper.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::abi::{self, BackingMap};

nix::ioctl_read!(ioc_clone, abi::ioctl::MAGIC, abi::ioctl::CLONE, u32);
nix::ioctl_write_ptr!(
    ioc_backing_open,
    abi::ioctl::MAGIC,
    abi::ioctl::BACKING_OPEN,
    BackingMap
);
nix::ioctl_write_ptr!(
    ioc_backing_close,
    abi::ioctl::MAGIC,
    abi::ioctl::BACKING_CLOSE,
    u32
);

/// Why reading a request stopped.
pub enum Received {
    /// A message of this many bytes is at the start of the buffer.
    Message(usize),
    /// Nothing this time (interrupted, or the request went away); read again.
    Again,
    /// The connection has ended (unmounted, or aborted).
    Ended,
}

pub struct Channel {
    fd: OwnedFd,
    /// Set when this process hands the connection over: replies it has not sent are left to
    /// the successor (the kernel resends their requests) instead of being failed on drop.
    handing_over: AtomicBool,
    /// Requests read from this channel and not answered yet.
    in_flight: AtomicUsize,
}

impl Channel {
    /// Opens /dev/fuse for a new connection.
    pub fn open() -> io::Result<Channel> {
        let fd = nix::fcntl::open(
            "/dev/fuse",
            nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        Ok(Channel::from_fd(fd))
    }

    /// A channel of an existing connection (received from the keeper).
    pub fn from_fd(fd: OwnedFd) -> Channel {
        Channel {
            fd,
            handing_over: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
        }
    }

    /// Another open file of this channel's connection, with its own processing queue, so that
    /// threads reading requests do not contend on one.
    pub fn clone_channel(&self) -> io::Result<Channel> {
        let clone = Channel::open()?;
        let mut master = self.fd.as_raw_fd() as u32;
        // SAFETY: the ioctl reads a u32 (the master's descriptor number) through a pointer to
        // a live local variable; `clone.fd` is an open /dev/fuse file.
        unsafe { ioc_clone(clone.fd.as_raw_fd(), &mut master) }?;
        Ok(clone)
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A duplicate of the descriptor, for the keeper.
    pub fn duplicate(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// Reads one request into `buffer`, which must hold the largest request (`max_write` plus
    /// headers).
    pub fn receive(&self, buffer: &mut [u8]) -> io::Result<Received> {
        match nix::unistd::read(&self.fd, buffer) {
            Ok(n) => Ok(Received::Message(n)),
            // ENOENT: the request was interrupted before it could be read.
            Err(nix::Error::EINTR | nix::Error::EAGAIN | nix::Error::ENOENT) => Ok(Received::Again),
            Err(nix::Error::ENODEV) => Ok(Received::Ended),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes one whole reply or notification.
    pub fn send(&self, parts: &[IoSlice<'_>]) -> io::Result<()> {
        match nix::sys::uio::writev(&self.fd, parts) {
            Ok(_) => Ok(()),
            // ENOENT: the request was interrupted and is gone; nobody waits for this reply.
            Err(nix::Error::ENOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Sends a notification: `code` with `body`.
    pub fn notify(&self, code: i32, body: &[&[u8]]) -> io::Result<()> {
        let len = abi::OUT_HEADER + body.iter().map(|b| b.len()).sum::<usize>();
        let header = abi::out_header(len, code, 0);
        let mut parts = vec![IoSlice::new(&header)];
        parts.extend(body.iter().map(|b| IoSlice::new(b)));
        self.send(&parts)
    }

    /// Asks the kernel to queue again every request that was read but not answered, on every
    /// channel of the connection. Only once the process that read them is gone, and before
    /// this process reads any: otherwise a request would be served twice.
    pub fn resend_unanswered(&self) -> io::Result<()> {
        self.notify(abi::notify::RESEND, &[])
    }

    /// Registers `file` as a passthrough backing file; the id belongs to the connection and
    /// stays valid until [`Channel::close_backing`], whichever process holds the channel.
    pub fn open_backing(&self, file: BorrowedFd<'_>) -> io::Result<u32> {
        let map = BackingMap {
            fd: file.as_raw_fd(),
            flags: 0,
            padding: 0,
        };
        // SAFETY: the ioctl reads a `fuse_backing_map` through a pointer to a live local value.
        let id = unsafe { ioc_backing_open(self.fd.as_raw_fd(), &map) }?;
        u32::try_from(id).map_err(|_| io::Error::other("the kernel returned a negative backing id"))
    }

    pub fn close_backing(&self, id: u32) -> io::Result<()> {
        // SAFETY: the ioctl reads a u32 through a pointer to a live local value.
        unsafe { ioc_backing_close(self.fd.as_raw_fd(), &id) }?;
        Ok(())
    }

    pub fn hand_over(&self) {
        self.handing_over.store(true, Ordering::SeqCst);
    }

    pub fn handing_over(&self) -> bool {
        self.handing_over.load(Ordering::Relaxed)
    }

    pub(super) fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
    }

    pub(super) fn request_ended(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    /// Requests being served.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

//! An exclusive lock on a directory's lock file (`flock`), holding the owner's pid so that a
//! refusal can name it. Both the cache directory and the controller's state directory have one.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// How long a held lock is retried before the refusal. A process that forks (to run a
/// command) lends its descriptors to the child until the child execs, so a lock just dropped
/// can stay held for that instant.
const RETRY_FOR: Duration = Duration::from_millis(500);
const RETRY_EVERY: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock; `holder` is what its lock file says ("pid N").
    #[error("held by {holder}")]
    Held { holder: String },
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        cause: std::io::Error,
    },
}

/// The lock, released when dropped.
pub struct LockFile {
    _lock: Flock<File>,
}

/// Takes the lock on `path` (created if absent, mode 0644) and writes this process's pid in it.
pub fn take(path: &Path) -> Result<LockFile, LockError> {
    let io = |what| move |cause| LockError::Io { what, cause };
    let mut file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)
        .map_err(io("open the lock file"))?;
    let mut waited = Duration::ZERO;
    let mut lock = loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => break lock,
            Err((back, Errno::EWOULDBLOCK)) if waited < RETRY_FOR => {
                file = back;
                std::thread::sleep(RETRY_EVERY);
                waited += RETRY_EVERY;
            }
            Err((mut back, Errno::EWOULDBLOCK)) => {
                let mut holder = String::new();
                let _ = back.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "pid unknown".to_string(),
                    pid => format!("pid {pid}"),
                };
                return Err(LockError::Held { holder });
            }
            Err((_, errno)) => return Err(io("lock")(errno.into())),
        }
    };
    let pid = std::process::id().to_string();
    lock.set_len(0)
        .and_then(|()| lock.rewind())
        .and_then(|()| lock.write_all(pid.as_bytes()))
        .map_err(io("write the lock file"))?;
    Ok(LockFile { _lock: lock })
}

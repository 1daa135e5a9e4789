//! Crash points for tests: a daemon started with `RESERVOIR_FAILPOINT=NAME` in its environment
//! kills itself with SIGKILL (as an OOM kill would) when it reaches the point called NAME. The
//! crash-recovery tests use them to stop the daemon between a change on the source and the
//! answer to the kernel, which random kills cannot hit reliably. Without the variable, a point
//! costs one comparison.

use std::sync::OnceLock;

static ARMED: OnceLock<Option<String>> = OnceLock::new();

/// Dies here if this point is armed.
pub fn hit(name: &str) {
    let armed = ARMED.get_or_init(|| std::env::var("RESERVOIR_FAILPOINT").ok());
    if armed.as_deref() == Some(name) {
        tracing::warn!(point = name, "failpoint reached: killing this process");
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
    }
}

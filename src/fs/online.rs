//! Whether the source answers: every call's outcome is observed, a volume that started
//! offline reconnects in the background, and the root is probed periodically so that status
//! shows a source gone away (or back) even while nobody reads.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Volume;
use crate::source::{self, Attr, Handle, Source, SourceError, SourceOptions, SourceSpec};

impl Volume {
    pub(super) fn source(&self) -> Result<Arc<dyn Source>, SourceError> {
        let source = self
            .source
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        source.ok_or_else(|| SourceError::Unavailable {
            source_name: self.source_id.clone(),
            message: "not connected (started offline; retrying)".into(),
            cause: None,
        })
    }

    /// Puts a wrapper around the volume's source (tests: [`crate::source::faulty`]).
    #[cfg(test)]
    pub(crate) fn wrap_source(&self, wrap: impl FnOnce(Arc<dyn Source>) -> Arc<dyn Source>) {
        let mut source = self.source.write().unwrap_or_else(|p| p.into_inner());
        if let Some(inner) = source.take() {
            *source = Some(wrap(inner));
        }
    }

    /// Notes the outcome of a source call, to report whether the source is reachable.
    pub(super) fn observe<T>(&self, result: &Result<T, SourceError>) {
        match result {
            Ok(_) => {
                if !self.online.swap(true, Ordering::Relaxed) {
                    tracing::info!(source = %self.source_id, "source reachable again; back online");
                }
            }
            Err(e) if e.is_unavailable() => {
                self.stats.source_errors.fetch_add(1, Ordering::Relaxed);
                if self.online.swap(false, Ordering::Relaxed) {
                    tracing::warn!(source = %self.source_id, error = %crate::error::Chain(&e), "source unreachable; serving what is cached");
                }
            }
            Err(_) => {}
        }
    }
}

/// Opens the source and reads its root.
pub(super) async fn connect(
    spec: &SourceSpec,
    options: &SourceOptions,
) -> Result<(Arc<dyn Source>, Handle, Attr), SourceError> {
    let source = source::open(spec, options).await?;
    let (handle, attr) = source.root().await?;
    Ok((source, handle, attr))
}

/// How often a volume asks its source for the root's attributes, so that its status (and the
/// CSI volume condition built on it) shows a source gone away, or back, even while nobody reads.
const SOURCE_PROBE_INTERVAL: Duration = Duration::from_secs(10);

/// Checks the source of a volume every [`SOURCE_PROBE_INTERVAL`] for as long as the volume lives.
pub(super) async fn probe_source(volume: std::sync::Weak<Volume>) {
    loop {
        tokio::time::sleep(SOURCE_PROBE_INTERVAL).await;
        let Some(strong) = volume.upgrade() else {
            return;
        };
        // Not connected yet: `reconnect` is at work.
        let (Ok(source), Some(root)) = (strong.source(), strong.meta.root_handle()) else {
            continue;
        };
        let result = source.getattr(&root).await;
        strong.observe(&result);
    }
}

/// Keeps trying to reach the source of a volume that started offline.
pub(super) async fn reconnect(volume: std::sync::Weak<Volume>) {
    let mut delay = Duration::from_secs(1);
    loop {
        tokio::time::sleep(delay).await;
        let Some(strong) = volume.upgrade() else {
            return;
        };
        match connect(&strong.spec, &strong.source_options).await {
            Ok((source, handle, attr)) => {
                strong.meta.set_root(handle, attr);
                *strong.source.write().unwrap_or_else(|p| p.into_inner()) = Some(source);
                strong.online.store(true, Ordering::Relaxed);
                tracing::info!(source = %strong.source_id, "source reachable again; back online");
                return;
            }
            Err(e) => {
                tracing::debug!(source = %strong.source_id, error = %crate::error::Chain(&e), "source still unreachable");
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

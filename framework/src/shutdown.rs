//! Graceful shutdown.
//!
//! A pipeline stops in one of two ways:
//!
//! * **Graceful** (first SIGINT/SIGTERM, or [`ShutdownHandle::shutdown`]): the worker stops
//!   taking new records, commits the open transaction, leaves the consumer group (so the
//!   partitions move to other instances at once instead of after a session timeout), runs the
//!   processor's `on_close` hook, and `run` returns `Ok` with the run's figures.
//! * **Forced** (a second signal, or [`ShutdownHandle::force`]): the open transaction is
//!   aborted and the worker returns [`Error::Interrupted`](crate::Error::Interrupted) without
//!   waiting for anything else. Nothing is lost: what was aborted is processed again by the
//!   next owner of its partitions.
//!
//! The worker checks for shutdown between polls, so a graceful stop takes at most one commit
//! interval plus one commit.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Asks a running pipeline to stop. Cheap to clone; every clone controls the same pipeline.
#[derive(Debug, Clone, Default)]
pub struct ShutdownHandle {
    inner: Arc<Flags>,
}

#[derive(Debug, Default)]
struct Flags {
    graceful: AtomicBool,
    forced: AtomicBool,
}

impl ShutdownHandle {
    /// A handle with no shutdown requested.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Finish: commit the open transaction, leave the group, return.
    pub fn shutdown(&self) {
        self.inner.graceful.store(true, Ordering::SeqCst);
    }

    /// Stop now: abort the open transaction and return.
    pub fn force(&self) {
        self.inner.graceful.store(true, Ordering::SeqCst);
        self.inner.forced.store(true, Ordering::SeqCst);
    }

    /// True once any shutdown was requested.
    #[must_use]
    pub fn is_shutdown_requested(&self) -> bool {
        self.inner.graceful.load(Ordering::SeqCst)
    }

    /// True once a forced shutdown was requested.
    #[must_use]
    pub fn is_forced(&self) -> bool {
        self.inner.forced.load(Ordering::SeqCst)
    }

    /// Waits for SIGINT or SIGTERM: the first requests a graceful shutdown, the second forces
    /// it. Returns after the second signal (or if signals cannot be watched).
    pub async fn shutdown_on_signals(self) {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            tracing::warn!("cannot watch SIGINT/SIGTERM; use the shutdown handle");
            return;
        };
        for nth in 0..2 {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            if nth == 0 {
                tracing::info!(
                    "signal received: committing the open transaction and stopping (a second signal aborts)"
                );
                self.shutdown();
            } else {
                tracing::warn!("second signal: aborting the open transaction and stopping now");
                self.force();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn force_implies_shutdown() {
        let h = ShutdownHandle::new();
        let clone = h.clone();
        assert!(!h.is_shutdown_requested());
        clone.force();
        assert!(h.is_shutdown_requested() && h.is_forced());
    }
}

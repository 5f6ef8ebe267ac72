//! Operating states: read-only maintenance, draining before a stop, and readiness.
//!
//! - **Read-only.** Set by `registry.read_only` at start-up, entered on `SIGUSR1` and left on
//!   `SIGUSR2`. Every client write (a `POST`, `PUT`, `PATCH` or `DELETE` under `/v2/` or
//!   `/stowage/v1/`) is refused at the HTTP edge with 503 `UNAVAILABLE`, and the server's own
//!   writes stop too: garbage collection and upload expiry skip their runs, and a Spack index
//!   that is out of date is served as last built rather than rebuilt. Pulls work throughout.
//!   That makes the catalog and the blob store safe to copy for a backup, or to migrate.
//!   Requests already past the check when the mode is entered finish normally.
//! - **Draining.** Entered on `SIGTERM`/`SIGINT`: `/readyz` answers 503 so that a load balancer
//!   stops sending new requests, while requests keep being served for
//!   `server.shutdown_delay_secs`; then the server stops accepting and finishes what is in
//!   flight.
//! - **Readiness** (`/readyz`): not draining, the catalog's writer takes a transaction, and
//!   the blob store answers. Probes are cheap and anonymous, so the answer is cached for
//!   [`READINESS_TTL`]: however many probes arrive, the catalog and storage are asked at most
//!   once per period.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::Registry;
use crate::error::{Error, Result};

/// How long a readiness answer is reused.
const READINESS_TTL: Duration = Duration::from_secs(1);

/// Longest a readiness check waits for the catalog or the store.
const READINESS_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct Maintenance {
    read_only: AtomicBool,
    draining: AtomicBool,
    /// The last readiness answer and when it was found; the lock also makes concurrent probes
    /// share one check.
    readiness: tokio::sync::Mutex<Option<(Instant, std::result::Result<(), String>)>>,
}

impl Registry {
    pub fn is_read_only(&self) -> bool {
        self.maintenance.read_only.load(Ordering::Relaxed)
    }

    /// Enters (`true`) or leaves read-only mode; returns whether it changed.
    pub fn set_read_only(&self, on: bool) -> bool {
        let was = self.maintenance.read_only.swap(on, Ordering::SeqCst);
        // Refused requests are audited once the catalog may be written again.
        self.catalog.pause_audit_refusals(on);
        if was != on {
            if on {
                tracing::warn!("read-only mode on: pulls work, every write is refused with 503 UNAVAILABLE");
            } else {
                tracing::warn!("read-only mode off: writes accepted again");
            }
        }
        was != on
    }

    /// `Err(Error::ReadOnly)` in read-only mode.
    pub fn check_writable(&self) -> Result<()> {
        if self.is_read_only() {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Marks the server as stopping: `/readyz` answers 503 from now on.
    pub fn start_draining(&self) {
        self.maintenance.draining.store(true, Ordering::SeqCst);
    }

    /// Whether the server can take traffic; `Err` says why not.
    pub async fn readiness(&self) -> std::result::Result<(), String> {
        if self.maintenance.draining.load(Ordering::SeqCst) {
            return Err("shutting down".to_owned());
        }
        let mut cached = self.maintenance.readiness.lock().await;
        if let Some((at, answer)) = cached.as_ref()
            && at.elapsed() < READINESS_TTL
        {
            return answer.clone();
        }
        let answer = self.check_readiness().await;
        if let Err(why) = &answer {
            tracing::warn!(reason = %why, "not ready");
        }
        *cached = Some((Instant::now(), answer.clone()));
        answer
    }

    async fn check_readiness(&self) -> std::result::Result<(), String> {
        // An empty write job: the writer thread is alive and can take the write lock.
        match tokio::time::timeout(READINESS_TIMEOUT, self.catalog.write(|_| Ok(()))).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("catalog not writable: {e}")),
            Err(_) => return Err("catalog not writable: the writer did not answer within 5 s".to_owned()),
        }
        match tokio::time::timeout(READINESS_TIMEOUT, self.store.probe()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("storage unreachable: {e}")),
            Err(_) => Err("storage unreachable: no answer within 5 s".to_owned()),
        }
    }
}

//! The limiter's shared layer: failures and blocks that every replica of a PostgreSQL catalog
//! sees, in the catalog's `login_throttle` table (migration 19; the SQL is
//! `catalog::login_throttle`). Used only with a PostgreSQL catalog (`Auth::open` decides); on
//! SQLite the limiter is the in-memory one alone.
//!
//! A row per key (the limiter's keys, fixed-size: a kind byte, the user name's 128-bit hash for
//! a pair, the address; never a user name as sent), with its failures, the end of its block and
//! its last failure, in unix milliseconds of the replicas' clocks (which must agree, as
//! `docs/postgres.md` requires anyway; a skew of `s` moves a block's end by `s` at the replicas
//! that read it).
//!
//! For a password attempt that the in-memory limiter admitted, in this order:
//! 1. **Before the password is checked**, one read of the attempt's two rows (a catalog
//!    reader, an indexed lookup). If either is blocked, the attempt is refused with 429 and
//!    `Retry-After` (the longer block's rest), no password is checked, and the blocks are
//!    adopted in memory, so that the next attempts at this replica are refused without a read.
//!    Refusals are not recorded: a block is never extended by attempts it refused (as in
//!    memory).
//! 2. **After a failure**, before the client is answered: one write job (so, on PostgreSQL,
//!    under the catalog's write lock, one replica at a time) adds a failure to each row (a row
//!    whose last failure is `forget_after` old and whose block is over starts again at 1),
//!    blocks a row whose count reaches its allowance by the limiter's own rule
//!    ([`super::Settings::block_after`]: `backoff`, doubling, up to `backoff_max`; never
//!    shortening a block), and deletes up to `catalog::login_throttle::PRUNE_PER_FAILURE`
//!    expired rows, oldest first. The blocks it reports are adopted in memory. The attempt
//!    keeps its place in flight until then, so one replica never runs a key's next check before
//!    its last failure is recorded.
//! 3. **After a success**, the pair's row is deleted (the address's stays), only when step 1
//!    found one: a client that signs in with every request (Spack) costs a read per request,
//!    never a write.
//!
//! What this guarantees: attempts that follow one another, at any replicas, get one allowance
//! and one doubling backoff between them, as on one replica. Attempts at different replicas at
//! the same moment can each pass step 1 before any of them reaches step 2, so the replicas may
//! together run up to one in-memory allowance each at once (and, once a key is blocked, one
//! attempt each when the block ends) before the shared count catches up; then every replica
//! refuses. The table holds about the keys that failed within one `forget_after` window:
//! failures add two rows at most and delete up to sixteen expired ones, and a failure costs an
//! argon2 verification first (`auth.max_concurrent_hashes`), which bounds how fast rows come.
//!
//! **When the catalog fails** (a read or a write returns an error), the attempt goes on as if
//! this layer had found nothing: the in-memory limiter alone decides, and the replica keeps
//! counting its own failures, so an attacker is throttled per replica as before, never not at
//! all; and nobody is locked out because the catalog is unreachable. Each failure is logged at
//! warning level (at most once per [`WARN_EVERY_SECS`], with the number since the last one).
//!
//! Read-only maintenance mode does not stop these writes: they are not client data, and
//! throttling matters during maintenance too (a PostgreSQL backup is a consistent snapshot
//! whatever is written meanwhile).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use super::{Attempt, Key, Settings, retry_secs};
use crate::catalog::Catalog;

/// Catalog failures are logged at most this often.
pub const WARN_EVERY_SECS: u64 = 10;

/// The shared layer of one replica's limiter.
pub(super) struct Shared {
    catalog: Catalog,
    /// Catalog failures since the last warning, and when that was (unix seconds).
    errors: AtomicU64,
    warned_at: AtomicU64,
}

/// What the shared rows say of an attempt.
pub(super) enum Verdict {
    /// Neither key is blocked; `pair_row`: the pair has a row (for a success to clear).
    Open { pair_row: bool },
    /// Refused for `retry_after` seconds; each key's block (in [`Attempt::keys`] order).
    Blocked {
        until: [Option<Instant>; 2],
        retry_after: u64,
    },
}

/// Now in unix milliseconds.
fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The instant a block ending at `until_ms` ends, if it has not ended at `now_ms` (`now`).
fn block_end(until_ms: i64, now_ms: i64, now: Instant) -> Option<Instant> {
    let left = until_ms.saturating_sub(now_ms);
    (left > 0).then(|| now + Duration::from_millis(u64::try_from(left).unwrap_or(0)))
}

impl Shared {
    pub(super) fn new(catalog: Catalog) -> Shared {
        Shared {
            catalog,
            errors: AtomicU64::new(0),
            warned_at: AtomicU64::new(0),
        }
    }

    /// Step 1: the attempt's rows. A catalog error finds nothing (and is logged).
    pub(super) async fn check(&self, attempt: &Attempt) -> Verdict {
        let keys = attempt.keys();
        let bytes = keys.map(Key::to_bytes);
        let rows = match self.catalog.login_throttle_rows(bytes.clone()).await {
            Ok(rows) => rows,
            Err(e) => {
                self.warn("reading", &e);
                return Verdict::Open { pair_row: false };
            }
        };
        let (now_ms, now) = (unix_ms(), Instant::now());
        let mut until = [None; 2];
        let mut longest = Duration::ZERO;
        for (i, key) in bytes.iter().enumerate() {
            let Some(row) = rows.iter().find(|r| r.key == *key) else {
                continue;
            };
            if let Some(end) = block_end(row.blocked_until_ms, now_ms, now) {
                longest = longest.max(end - now);
                until[i] = Some(end);
            }
        }
        if until.iter().any(Option::is_some) {
            return Verdict::Blocked {
                until,
                retry_after: retry_secs(longest),
            };
        }
        Verdict::Open {
            pair_row: rows.iter().any(|r| r.key == bytes[0]),
        }
    }

    /// Step 2: records a failure of the attempt's keys; returns their blocks (in
    /// [`Attempt::keys`] order), or `None` after a catalog error (logged).
    pub(super) async fn record_failure(&self, settings: &Settings, attempt: &Attempt) -> Option<[Option<Instant>; 2]> {
        let keys = attempt.keys();
        let frees = keys.map(|k| match k {
            Key::User(..) => settings.free,
            Key::Client(_) => settings.free.saturating_mul(3),
        });
        let forget_after_ms = i64::try_from(settings.forget_after.as_millis()).unwrap_or(i64::MAX);
        let rule = settings.clone();
        let recorded = self
            .catalog
            .record_login_failure(
                keys.map(Key::to_bytes).to_vec(),
                unix_ms(),
                forget_after_ms,
                move |i, failures| rule.block_after(failures, frees.get(i).copied().unwrap_or(1)),
            )
            .await;
        match recorded {
            Ok(recorded) => {
                let (now_ms, now) = (unix_ms(), Instant::now());
                let mut until = [None; 2];
                for (slot, r) in until.iter_mut().zip(&recorded) {
                    *slot = block_end(r.blocked_until_ms, now_ms, now);
                }
                Some(until)
            }
            Err(e) => {
                self.warn("recording a failure in", &e);
                None
            }
        }
    }

    /// Step 3: forgets a pair's failures (a catalog error is logged).
    pub(super) async fn clear(&self, pair: Key) {
        if let Err(e) = self.catalog.clear_login_failures(pair.to_bytes()).await {
            self.warn("clearing a success in", &e);
        }
    }

    /// Logs that the shared layer failed: at most once every [`WARN_EVERY_SECS`], with the
    /// number of failures since the last warning.
    fn warn(&self, doing: &'static str, error: &crate::error::Error) {
        self.errors.fetch_add(1, Relaxed);
        let now = u64::try_from(unix_ms() / 1000).unwrap_or(0);
        let last = self.warned_at.load(Relaxed);
        if now.saturating_sub(last) >= WARN_EVERY_SECS
            && self.warned_at.compare_exchange(last, now, Relaxed, Relaxed).is_ok()
        {
            let catalog_errors = self.errors.swap(0, Relaxed);
            tracing::warn!(
                %error,
                catalog_errors,
                "failed-login limiter: {doing} the catalog's shared state failed; this replica counts \
                 failed logins on its own until the catalog answers again"
            );
        }
    }
}

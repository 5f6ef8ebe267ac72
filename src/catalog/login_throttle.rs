//! The failed-login limiter's shared state (`login_throttle`, migration 19): the SQL of
//! `auth::limiter::shared`, which owns the rules and says when it is used (replicas of a
//! PostgreSQL catalog; never on SQLite).
//!
//! A row per limiter key (an opaque, fixed-size byte string the limiter makes; never a user
//! name as sent), with the key's failures, the end of its block and its last failure, in unix
//! milliseconds. Reads go to a reader; every change is a write job, so on PostgreSQL it runs
//! under the catalog's write lock, one replica at a time: a failure's read-increment-block is
//! one transaction, and two replicas recording failures of one key at once count both.

use super::Catalog;
use super::db::{self, params};
use crate::error::Result;

/// Rows deleted at most per recorded failure, oldest first: expired rows leave faster than
/// failures add new ones (two at most), and no write job is held long.
pub const PRUNE_PER_FAILURE: i64 = 16;

/// One key's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThrottleRow {
    pub key: Vec<u8>,
    pub failures: i64,
    /// 0: not blocked.
    pub blocked_until_ms: i64,
    pub last_failure_ms: i64,
}

/// A failure of one key, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// The key's failures, this one included.
    pub failures: i64,
    /// The end of its block (0: not blocked).
    pub blocked_until_ms: i64,
}

/// Adds one failure to a key's row, or starts it at 1 when there is none or it has expired
/// (its last failure at or before `?3`, its block over at `?2`); an expired block reads 0.
/// `?1` key, `?2` now, `?3` the expiry cutoff. Written without either dialect's own functions
/// (`tests/pg_schema.rs` runs this text on both engines).
pub const RECORD_FAILURE: &str = "INSERT INTO login_throttle (key, failures, blocked_until_ms, last_failure_ms)
     VALUES (?1, 1, 0, ?2)
     ON CONFLICT (key) DO UPDATE SET
        failures = CASE WHEN login_throttle.last_failure_ms <= ?3 AND login_throttle.blocked_until_ms <= ?2
                        THEN 1 ELSE login_throttle.failures + 1 END,
        blocked_until_ms = CASE WHEN login_throttle.blocked_until_ms <= ?2
                                THEN 0 ELSE login_throttle.blocked_until_ms END,
        last_failure_ms = CASE WHEN login_throttle.last_failure_ms > ?2
                               THEN login_throttle.last_failure_ms ELSE ?2 END
     RETURNING failures, blocked_until_ms";

/// Sets a key's block: `?1` key, `?2` its end.
pub const SET_BLOCK: &str = "UPDATE login_throttle SET blocked_until_ms = ?2 WHERE key = ?1";

/// Deletes a key's row: `?1` key.
pub const CLEAR: &str = "DELETE FROM login_throttle WHERE key = ?1";

/// Deletes up to `?3` expired rows (last failure at or before `?1`, block over at `?2`),
/// oldest first, through `login_throttle_by_last_failure`.
pub const PRUNE: &str = "DELETE FROM login_throttle WHERE key IN (
        SELECT key FROM login_throttle WHERE last_failure_ms <= ?1 AND blocked_until_ms <= ?2
         ORDER BY last_failure_ms LIMIT ?3)";

impl Catalog {
    /// The rows of `keys` that exist (expired ones too: the caller judges them).
    pub async fn login_throttle_rows(&self, keys: [Vec<u8>; 2]) -> Result<Vec<ThrottleRow>> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT key, failures, blocked_until_ms, last_failure_ms FROM login_throttle WHERE key IN (?1, ?2)",
            )?;
            let rows = stmt.query_map(params![keys[0], keys[1]], |r| {
                Ok(ThrottleRow {
                    key: r.get(0)?,
                    failures: r.get(1)?,
                    blocked_until_ms: r.get(2)?,
                    last_failure_ms: r.get(3)?,
                })
            })?;
            Ok(rows.collect::<db::Result<Vec<_>>>()?)
        })
        .await
    }

    /// Records a failure of each of `keys` at `now_ms`, in one transaction, and returns each
    /// key's count and block, in order. A row whose last failure is `forget_after_ms` old or
    /// more and whose block is over starts again at 1. `block(i, failures)` is how long the
    /// `i`-th key is blocked after its `failures`-th failure (`None`: not at all): its block
    /// ends then, unless it already ends later. Expired rows are deleted on the way
    /// ([`PRUNE_PER_FAILURE`] at most).
    pub async fn record_login_failure<F>(
        &self,
        keys: Vec<Vec<u8>>,
        now_ms: i64,
        forget_after_ms: i64,
        block: F,
    ) -> Result<Vec<Recorded>>
    where
        F: Fn(usize, u32) -> Option<std::time::Duration> + Send + 'static,
    {
        self.write(move |c| {
            let cutoff = now_ms.saturating_sub(forget_after_ms);
            c.prepare_cached(PRUNE)?
                .execute(params![cutoff, now_ms, PRUNE_PER_FAILURE])?;
            let mut out = Vec::with_capacity(keys.len());
            for (i, key) in keys.iter().enumerate() {
                let (failures, blocked_until_ms): (i64, i64) = c
                    .prepare_cached(RECORD_FAILURE)?
                    .query_row(params![key, now_ms, cutoff], |r| Ok((r.get(0)?, r.get(1)?)))?;
                let count = u32::try_from(failures).unwrap_or(u32::MAX);
                let mut recorded = Recorded {
                    failures,
                    blocked_until_ms,
                };
                if let Some(d) = block(i, count) {
                    let until = now_ms.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
                    if until > blocked_until_ms {
                        c.prepare_cached(SET_BLOCK)?.execute(params![key, until])?;
                        recorded.blocked_until_ms = until;
                    }
                }
                out.push(recorded);
            }
            Ok(out)
        })
        .await
    }

    /// Forgets a key's failures and block (a (user, address) pair whose password was right).
    pub async fn clear_login_failures(&self, key: Vec<u8>) -> Result<()> {
        self.write(move |c| {
            c.prepare_cached(CLEAR)?.execute(params![key])?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn catalog() -> (tempfile::TempDir, Catalog) {
        let tmp = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(&tmp.path().join("catalog.db")).unwrap();
        (tmp, catalog)
    }

    /// Blocked for 1 s from the second failure on, doubling (the limiter's rule, simplified).
    fn doubling(_: usize, failures: u32) -> Option<Duration> {
        (failures >= 2).then(|| Duration::from_secs(1 << (failures - 2).min(10)))
    }

    async fn rows(c: &Catalog, a: &[u8], b: &[u8]) -> Vec<ThrottleRow> {
        let mut rows = c.login_throttle_rows([a.to_vec(), b.to_vec()]).await.unwrap();
        rows.sort_by(|x, y| x.key.cmp(&y.key));
        rows
    }

    /// The statements are engine-neutral text; the engine they are for (PostgreSQL) runs them
    /// in `tests/pg_schema.rs` and over HTTP in `tests/auth_limits.rs`. Here: the counting.
    #[tokio::test]
    async fn failures_count_block_double_expire_and_clear() {
        let (_tmp, c) = catalog();
        let (pair, addr) = (b"pair".to_vec(), b"addr".to_vec());
        let keys = || vec![pair.clone(), addr.clone()];
        let t0 = 1_000_000;
        let first = c.record_login_failure(keys(), t0, 60_000, doubling).await.unwrap();
        assert_eq!(
            first,
            vec![
                Recorded {
                    failures: 1,
                    blocked_until_ms: 0
                };
                2
            ]
        );
        let second = c.record_login_failure(keys(), t0 + 10, 60_000, doubling).await.unwrap();
        assert_eq!(
            second[0],
            Recorded {
                failures: 2,
                blocked_until_ms: t0 + 10 + 1000
            }
        );
        let third = c.record_login_failure(keys(), t0 + 20, 60_000, doubling).await.unwrap();
        assert_eq!(
            third[0],
            Recorded {
                failures: 3,
                blocked_until_ms: t0 + 20 + 2000
            }
        );
        let got = rows(&c, &pair, &addr).await;
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].key, pair);
        assert_eq!((got[1].failures, got[1].last_failure_ms), (3, t0 + 20));

        // A clock behind never moves the last failure back nor shortens a block.
        let behind = c
            .record_login_failure(keys(), t0 + 5, 60_000, |_, _| None)
            .await
            .unwrap();
        assert_eq!(
            behind[0],
            Recorded {
                failures: 4,
                blocked_until_ms: t0 + 20 + 2000
            }
        );
        assert_eq!(rows(&c, &pair, &addr).await[1].last_failure_ms, t0 + 20);

        // A success clears the pair, not the address.
        c.clear_login_failures(pair.clone()).await.unwrap();
        let got = rows(&c, &pair, &addr).await;
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].key.as_slice(), got[0].failures), (&b"addr"[..], 4));

        // A window after the last failure and the block's end, the count starts again.
        let later = t0 + 20 + 60_000;
        let again = c.record_login_failure(keys(), later, 60_000, doubling).await.unwrap();
        assert_eq!(
            again,
            vec![
                Recorded {
                    failures: 1,
                    blocked_until_ms: 0
                };
                2
            ]
        );
    }

    #[tokio::test]
    async fn expired_rows_are_pruned_a_few_at_a_time() {
        let (_tmp, c) = catalog();
        let n = PRUNE_PER_FAILURE * 2 + 3;
        for i in 0..n {
            let key = format!("old-{i}").into_bytes();
            c.record_login_failure(vec![key], 1000 + i, 60_000, |_, _| None)
                .await
                .unwrap();
        }
        async fn count(c: &Catalog) -> Result<i64> {
            c.read(|c| Ok(c.query_row("SELECT count(*) FROM login_throttle", [], |r| r.get(0))?))
                .await
        }
        assert_eq!(count(&c).await.unwrap(), n);
        // A live block is never pruned, however old its last failure.
        let blocked = b"blocked".to_vec();
        c.record_login_failure(vec![blocked.clone()], 0, 60_000, |_, _| {
            Some(Duration::from_secs(1_000_000))
        })
        .await
        .unwrap();
        let now = 1000 + n + 60_000;
        for (round, left) in [
            (0, n + 1 - PRUNE_PER_FAILURE + 1),
            (1, n + 2 - 2 * PRUNE_PER_FAILURE + 1),
        ] {
            let key = format!("new-{round}").into_bytes();
            c.record_login_failure(vec![key], now, 60_000, |_, _| None)
                .await
                .unwrap();
            assert_eq!(count(&c).await.unwrap(), left, "after round {round}");
        }
        c.record_login_failure(vec![b"new-2".to_vec()], now, 60_000, |_, _| None)
            .await
            .unwrap();
        let left = rows(&c, &blocked, b"new-2").await;
        assert_eq!(left.len(), 2, "the blocked row stays");
        assert_eq!(count(&c).await.unwrap(), 4, "three new rows and the blocked one");
    }
}

//! The audit trail: one `audit_log` row per change to what the registry serves or who may use
//! it, and per policy-relevant refusal.
//!
//! Changes (manifest push and delete, tag and blob deletion, user and API token changes,
//! deletions by retention and garbage collection) are recorded by [`record`], called inside the
//! catalog write job that makes the change: the row commits with the change or not at all, so
//! the trail never claims a change that did not happen, nor misses one that did.
//!
//! Refusals (a denied push or delete, a refused immutable-tag change, a failed login) change
//! nothing, and a client can cause as many as it likes. They go through [`RefusalQueue`]: a
//! bounded in-memory queue ([`REFUSAL_QUEUE`] rows) that a thread of its own writes in batches
//! of up to [`REFUSAL_BATCH`] rows per write job, one job at a time, pausing after a full batch.
//! The writer therefore spends at most one short job at a time on refusals, however fast they
//! arrive; rows that find the queue full are dropped, counted, and the count logged at `warn`.
//! Closing the catalog writes what is queued. In read-only maintenance mode
//! ([`super::Catalog::pause_audit_refusals`]) refusals wait in the queue, unwritten, until the
//! mode ends or the catalog closes.
//!
//! Who acted travels as an [`Actor`]: the user name (or `anonymous`, or a system actor such as
//! `gc`, `retention`, `cli`), the API token id when one was used, the client address and the
//! request id. The HTTP layer builds it from what the authentication middleware resolved; the
//! services pass it down unchanged. A row never holds a secret: token names and ids, never
//! their secrets; user names, never passwords.
//!
//! Rows are read newest first, a page at a time, with the id of the last row as the cursor
//! ([`AuditQuery::before`]). Rows older than `audit.retention_days` are deleted in bounded
//! batches by a periodic task of the server ([`super::Catalog::prune_audit`]).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use super::db::{self, Connection, params};
use rusqlite::OpenFlags;
use serde::Serialize;

use super::{Catalog, Job, now, run_in_savepoint};
use crate::error::{Internal, Result};

/// Refusals held in memory waiting to be written; more are dropped (and counted).
pub const REFUSAL_QUEUE: usize = 10_000;
/// Refusal rows per write job.
pub const REFUSAL_BATCH: usize = 500;
/// Pause after writing a full batch, so that a flood of refusals takes at most one short job
/// of the writer's time per pause.
const REFUSAL_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);
/// Longest detail kept (serialised JSON); a larger one is replaced by a note saying so.
const MAX_DETAIL: usize = 2048;
/// Rows deleted per write job when old rows are pruned.
pub const PRUNE_BATCH: usize = 1000;
/// How often the server prunes old rows (the first time at start-up).
pub const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);
/// Most rows one query returns.
pub const MAX_PAGE: usize = 1000;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A manifest stored (by tag, moving the tag if it named another manifest, or by digest).
    ManifestPush,
    /// A manifest deleted by digest, with the tags that named it.
    ManifestDelete,
    TagDelete,
    /// A blob unlinked from a repository.
    BlobDelete,
    UserAdd,
    UserPasswd,
    /// A user's admin role given or taken.
    UserAdmin,
    UserRemove,
    TokenCreate,
    TokenRevoke,
    /// A tag deleted by a retention rule.
    RetentionDelete,
    /// An unneeded manifest removed by garbage collection.
    GcManifest,
    /// A cached manifest of a proxied repository evicted by garbage collection to keep its
    /// prefix under `max_size`, with the tags that named it.
    ProxyEvict,
    /// A push refused by the access policy.
    DeniedPush,
    /// A delete refused by the access policy.
    DeniedDelete,
    /// A move or delete of an immutable tag refused.
    DeniedImmutable,
    /// Wrong credentials, or an API token revoked or expired.
    LoginFailed,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::ManifestPush => "manifest.push",
            Action::ManifestDelete => "manifest.delete",
            Action::TagDelete => "tag.delete",
            Action::BlobDelete => "blob.delete",
            Action::UserAdd => "user.add",
            Action::UserPasswd => "user.passwd",
            Action::UserAdmin => "user.admin",
            Action::UserRemove => "user.remove",
            Action::TokenCreate => "token.create",
            Action::TokenRevoke => "token.revoke",
            Action::RetentionDelete => "retention.delete",
            Action::GcManifest => "gc.manifest",
            Action::ProxyEvict => "proxy.evict",
            Action::DeniedPush => "denied.push",
            Action::DeniedDelete => "denied.delete",
            Action::DeniedImmutable => "denied.immutable",
            Action::LoginFailed => "login.failed",
        }
    }
}

/// Who acted, from where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// A user name, `anonymous`, or a system actor.
    pub name: String,
    /// The API token used, if any.
    pub token: Option<i64>,
    /// The client's address.
    pub client: Option<String>,
    /// The request's id (`X-Request-Id`).
    pub request_id: Option<String>,
}

impl Actor {
    /// A system actor (`gc`, `retention`, `cli`): no token, no client.
    pub fn system(name: &str) -> Actor {
        Actor {
            name: name.to_owned(),
            token: None,
            client: None,
            request_id: None,
        }
    }

    /// The operator at the command line: actor `cli`, the Unix user in `client`.
    pub fn cli() -> Actor {
        // SAFETY: getuid cannot fail and touches no memory.
        let uid = unsafe { libc::getuid() };
        let who = std::env::var("USER").ok().filter(|u| !u.is_empty() && u.len() <= 64);
        Actor {
            client: Some(match who {
                Some(user) => format!("local:{user} (uid {uid})"),
                None => format!("local:uid {uid}"),
            }),
            ..Actor::system("cli")
        }
    }
}

/// One row's content, apart from who and when.
#[derive(Debug, Clone)]
pub struct Event {
    pub action: Action,
    pub repo: Option<String>,
    pub tag: Option<String>,
    pub digest: Option<String>,
    /// A small JSON object.
    pub detail: Option<serde_json::Value>,
}

impl Event {
    pub fn new(action: Action) -> Event {
        Event {
            action,
            repo: None,
            tag: None,
            digest: None,
            detail: None,
        }
    }

    pub fn repo(mut self, repo: impl Into<String>) -> Event {
        self.repo = Some(repo.into());
        self
    }

    pub fn tag(mut self, tag: Option<impl Into<String>>) -> Event {
        self.tag = tag.map(Into::into);
        self
    }

    pub fn digest(mut self, digest: impl Into<String>) -> Event {
        self.digest = Some(digest.into());
        self
    }

    pub fn detail(mut self, detail: serde_json::Value) -> Event {
        self.detail = Some(detail);
        self
    }
}

/// Writes one row, in the caller's transaction (see the module doc). The token's name is
/// copied from `api_tokens` in the same statement.
pub(super) fn record(c: &Connection, actor: &Actor, event: &Event, at: i64) -> db::Result<()> {
    let detail = event.detail.as_ref().map(|d| {
        let s = d.to_string();
        if s.len() > MAX_DETAIL {
            serde_json::json!({ "truncated": true }).to_string()
        } else {
            s
        }
    });
    c.prepare_cached(
        "INSERT INTO audit_log
            (at, action, repository, tag, digest, actor, token_id, token_name, client, request_id, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, (SELECT name FROM api_tokens WHERE id = ?7), ?8, ?9, ?10)",
    )?
    .execute(params![
        at,
        event.action.as_str(),
        event.repo,
        event.tag,
        event.digest,
        actor.name,
        actor.token,
        actor.client,
        actor.request_id,
        detail
    ])?;
    Ok(())
}

/// A refusal waiting to be written.
type Queued = (i64, Actor, Event);

/// The bounded queue of refusals and the thread that writes them (see the module doc).
pub(super) struct RefusalQueue {
    /// Unbounded as a channel (it allocates as rows arrive, where a `sync_channel` of
    /// [`REFUSAL_QUEUE`] slots held ~2 MiB from start-up); `queued` bounds it.
    tx: Mutex<Option<mpsc::Sender<Queued>>>,
    /// Rows sent and not yet taken by the writing thread: never above [`REFUSAL_QUEUE`].
    queued: Arc<AtomicUsize>,
    dropped: Arc<AtomicU64>,
    /// While set (and the queue is open), nothing is written.
    paused: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl RefusalQueue {
    /// Starts the writing thread, which submits its jobs to `jobs` (the writer's queue).
    pub(super) fn start(jobs: mpsc::Sender<Job>) -> std::io::Result<RefusalQueue> {
        let (tx, rx) = mpsc::channel::<Queued>();
        let queued = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        let paused = Arc::new(AtomicBool::new(false));
        let (taken, counter, hold) = (Arc::clone(&queued), Arc::clone(&dropped), Arc::clone(&paused));
        let thread = std::thread::Builder::new()
            .name("catalog-audit".into())
            .spawn(move || flush_loop(&rx, &taken, &jobs, &counter, &hold))?;
        Ok(RefusalQueue {
            tx: Mutex::new(Some(tx)),
            queued,
            dropped,
            paused,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues a refusal without waiting; drops it (counted) when the queue is full.
    fn push(&self, row: Queued) {
        // A place in the queue first; given back if the row cannot be sent.
        if self.queued.fetch_add(1, Ordering::SeqCst) >= REFUSAL_QUEUE {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let sent = match self.tx.lock() {
            Ok(tx) => match tx.as_ref() {
                Some(tx) => tx.send(row).is_ok(),
                None => false,
            },
            Err(_) => false,
        };
        if !sent {
            self.queued.fetch_sub(1, Ordering::SeqCst);
        }
        if !sent {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Writes what is queued and stops the thread. Blocking.
    pub(super) fn close(&self) {
        self.paused.store(false, Ordering::SeqCst);
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Some(handle) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = handle.join();
        }
    }
}

fn flush_loop(
    rx: &mpsc::Receiver<Queued>,
    queued: &AtomicUsize,
    jobs: &mpsc::Sender<Job>,
    dropped: &AtomicU64,
    paused: &AtomicBool,
) {
    while let Ok(first) = rx.recv() {
        while paused.load(Ordering::SeqCst) {
            std::thread::sleep(REFUSAL_PAUSE);
        }
        let mut batch = vec![first];
        while batch.len() < REFUSAL_BATCH {
            match rx.try_recv() {
                Ok(row) => batch.push(row),
                Err(_) => break,
            }
        }
        queued.fetch_sub(batch.len(), Ordering::SeqCst);
        let full = batch.len() == REFUSAL_BATCH;
        let rows = batch.len();
        if let Err(e) = write_batch(jobs, batch) {
            tracing::warn!(rows, error = %e, "audit: writing refusals failed; they are lost");
        }
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            tracing::warn!(
                dropped = lost,
                queue = REFUSAL_QUEUE,
                "audit: refusals arrived faster than they could be written; these were not recorded"
            );
        }
        if full {
            std::thread::sleep(REFUSAL_PAUSE);
        }
    }
}

/// Submits one write job for `batch` and waits for its commit.
fn write_batch(jobs: &mpsc::Sender<Job>, batch: Vec<Queued>) -> Result<()> {
    let (done_tx, done_rx) = mpsc::channel::<Result<()>>();
    let job: Job = Box::new(move |conn| {
        let result = match conn {
            Some(c) => run_in_savepoint(c, |c| {
                for (at, actor, event) in &batch {
                    record(c, actor, event, *at)?;
                }
                Ok(())
            }),
            None => Err(Internal::Other("catalog transaction could not start").into()),
        };
        Box::new(move |committed| {
            let _ = done_tx.send(match result {
                Ok(()) if !committed => Err(Internal::Other("catalog commit failed").into()),
                other => other,
            });
        })
    });
    super::submit(jobs, job)?;
    done_rx
        .recv()
        .map_err(|_| Internal::Other("catalog writer dropped a job"))?
}

/// Which rows to read.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub repo: Option<String>,
    /// The actor's name.
    pub user: Option<String>,
    /// Rows at or after this unix time.
    pub since: Option<i64>,
    /// Rows with an id below this one (the cursor: the last id of the previous page).
    pub before: Option<i64>,
    /// Rows per page (at most [`MAX_PAGE`]).
    pub limit: usize,
}

/// One row as read.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditRow {
    pub id: i64,
    /// RFC 3339, UTC.
    pub time: String,
    pub action: String,
    pub repository: Option<String>,
    pub tag: Option<String>,
    pub digest: Option<String>,
    pub actor: String,
    pub token_id: Option<i64>,
    pub token_name: Option<String>,
    pub client: Option<String>,
    pub request_id: Option<String>,
    pub detail: Option<serde_json::Value>,
}

/// A page of rows, newest first, and the cursor of the next page if there is one.
#[derive(Debug, Clone, Serialize)]
pub struct AuditPage {
    pub entries: Vec<AuditRow>,
    pub next_cursor: Option<i64>,
}

fn query(c: &Connection, q: &AuditQuery) -> db::Result<AuditPage> {
    let limit = q.limit.clamp(1, MAX_PAGE);
    let mut stmt = c.prepare_cached(
        "SELECT id, at, action, repository, tag, digest, actor, token_id, token_name, client, request_id, detail
           FROM audit_log
          WHERE (CAST(?1 AS TEXT) IS NULL OR repository = ?1) AND (CAST(?2 AS TEXT) IS NULL OR actor = ?2)
            AND (CAST(?3 AS BIGINT) IS NULL OR at >= ?3) AND (CAST(?4 AS BIGINT) IS NULL OR id < ?4)
          ORDER BY id DESC LIMIT ?5",
    )?;
    let mut entries = stmt
        .query_map(params![q.repo, q.user, q.since, q.before, limit as i64 + 1], |r| {
            let detail: Option<String> = r.get(11)?;
            Ok(AuditRow {
                id: r.get(0)?,
                time: format_time(r.get(1)?),
                action: r.get(2)?,
                repository: r.get(3)?,
                tag: r.get(4)?,
                digest: r.get(5)?,
                actor: r.get(6)?,
                token_id: r.get(7)?,
                token_name: r.get(8)?,
                client: r.get(9)?,
                request_id: r.get(10)?,
                detail: detail.and_then(|d| serde_json::from_str(&d).ok()),
            })
        })?
        .collect::<db::Result<Vec<_>>>()?;
    let next_cursor = if entries.len() > limit {
        entries.truncate(limit);
        entries.last().map(|r| r.id)
    } else {
        None
    };
    Ok(AuditPage { entries, next_cursor })
}

/// Reads a page of the catalog file at `path` without the catalog's threads and without
/// writing anything (no migration): for `stowage audit`, beside a running server or not.
/// Blocking.
pub fn read_file(path: &Path, q: &AuditQuery) -> std::result::Result<AuditPage, String> {
    if !path.exists() {
        return Err(format!("no catalog at {}", path.display()));
    }
    let c =
        rusqlite::Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
    c.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    let has_table: bool = c
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'audit_log')",
            [],
            |r| r.get(0),
        )
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    if !has_table {
        return Err("this catalog has no audit trail yet: run `stowage migrate` (or start the server) first".into());
    }
    query(&Connection::from(c), q).map_err(|e| format!("reading the audit trail: {e}"))
}

/// [`read_file`] for a PostgreSQL catalog (a read-only session of its own). Blocking.
pub fn read_postgres(settings: &super::postgres::Settings, q: &AuditQuery) -> std::result::Result<AuditPage, String> {
    let c = settings.open(true).map_err(|e| e.to_string())?;
    query(&c, q).map_err(|e| format!("reading the audit trail: {e}"))
}

impl Catalog {
    /// Queues a refusal for the audit trail (see the module doc); never waits.
    pub fn audit_refusal(&self, actor: &Actor, event: Event) {
        self.inner.refusals.push((now(), actor.clone(), event));
    }

    /// Holds refusals in memory instead of writing them (read-only maintenance mode), or
    /// writes them again.
    pub fn pause_audit_refusals(&self, paused: bool) {
        self.inner.refusals.paused.store(paused, Ordering::SeqCst);
    }

    /// A page of audit rows, newest first.
    pub async fn audit(&self, q: AuditQuery) -> Result<AuditPage> {
        self.read(move |c| Ok(query(c, &q)?)).await
    }

    /// Deletes the rows older than `retention_days` days ([`PRUNE_BATCH`] per write job, so the
    /// writer is never held long); returns how many. 0 days keeps everything.
    pub async fn prune_audit_older_than(&self, retention_days: u64) -> Result<u64> {
        if retention_days == 0 {
            return Ok(0);
        }
        let age = i64::try_from(retention_days.saturating_mul(86_400)).unwrap_or(i64::MAX);
        let before = now().saturating_sub(age);
        let mut total = 0;
        loop {
            let n = self.prune_audit(before, PRUNE_BATCH).await?;
            total += n;
            if n < PRUNE_BATCH as u64 {
                return Ok(total);
            }
        }
    }

    /// Deletes up to `limit` rows older than `before` (unix seconds); returns how many.
    pub async fn prune_audit(&self, before: i64, limit: usize) -> Result<u64> {
        self.write(move |c| {
            let n = c
                .prepare_cached(
                    "DELETE FROM audit_log WHERE id IN
                        (SELECT id FROM audit_log WHERE at < ?1 ORDER BY at LIMIT ?2)",
                )?
                .execute(params![before, limit as i64])?;
            Ok(n as u64)
        })
        .await
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01 (the inverse of [`days_from_civil`]).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// A unix time as RFC 3339 in UTC: `2026-11-30T12:00:00Z`.
pub fn format_time(t: i64) -> String {
    let (y, m, d) = civil_from_days(t.div_euclid(86_400));
    let s = t.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s % 3600 / 60,
        s % 60
    )
}

/// Parses an RFC 3339 time (`2026-11-30T12:00:00Z`, `…T12:00:00.5+01:00`; `t` and a space
/// are accepted for `T`) into unix seconds (fractions dropped).
pub fn parse_time(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let part = b.get(from..from + len)?;
        part.iter()
            .all(u8::is_ascii_digit)
            .then(|| std::str::from_utf8(part).ok()?.parse().ok())?
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d, h, mi, sec) = (
        num(0, 4)?,
        num(5, 2)?,
        num(8, 2)?,
        num(11, 2)?,
        num(14, 2)?,
        num(17, 2)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let ob = rest.as_bytes();
            if ob.len() != 6 || ob[3] != b':' {
                return None;
            }
            let sign = match ob[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let oh: i64 = rest.get(1..3)?.parse().ok()?;
            let om: i64 = rest.get(4..6)?.parse().ok()?;
            if oh > 23 || om > 59 {
                return None;
            }
            sign * (oh * 3600 + om * 60)
        }
    };
    Some(days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec - offset)
}

/// `--since`/`?since=`: an RFC 3339 time, or a period before `now` (`24h`, `7d`, `90m`, plain
/// seconds; see `config::Period`).
pub fn parse_since(s: &str, now: i64) -> std::result::Result<i64, String> {
    if let Some(t) = parse_time(s) {
        return Ok(t);
    }
    crate::config::Period::parse(s)
        .map(|p| now.saturating_sub(i64::try_from(p.secs()).unwrap_or(i64::MAX)))
        .map_err(|_| {
            format!("invalid time {s:?}: expected RFC 3339 (2026-11-30T12:00:00Z) or a period such as 24h or 7d")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(1_700_000_000), "2023-11-14T22:13:20Z");
        for t in [0, 1_700_000_000, 951_782_400, 4_102_444_800, -86_400] {
            assert_eq!(parse_time(&format_time(t)), Some(t), "{t}");
        }
        assert_eq!(parse_time("2023-11-14T23:13:20.25+01:00"), Some(1_700_000_000));
        assert_eq!(parse_time("2023-11-14 22:13:20z"), Some(1_700_000_000));
        for bad in [
            "",
            "2023-11-14",
            "2023-13-14T00:00:00Z",
            "2023-11-14T22:13:20",
            "2023-11-14T22:13:20+1:00",
        ] {
            assert_eq!(parse_time(bad), None, "{bad:?}");
        }
        assert_eq!(parse_since("24h", 100_000), Ok(100_000 - 86_400));
        assert!(parse_since("yesterday", 0).is_err());
    }

    /// A flood of refusals is bounded by the queue; the excess is dropped and counted, and what
    /// was queued while paused (read-only mode) is written when the catalog closes.
    #[tokio::test]
    async fn the_refusal_queue_is_bounded() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("catalog.db");
        let catalog = Catalog::open(&path).unwrap();
        catalog.pause_audit_refusals(true);
        let who = Actor::system("flood");
        let sent = REFUSAL_QUEUE + 500;
        for _ in 0..sent {
            catalog.audit_refusal(&who, Event::new(Action::LoginFailed));
        }
        // The writing thread holds at most one row out of the queue while paused.
        let dropped = catalog.inner.refusals.dropped.load(Ordering::SeqCst) as usize;
        assert!((499..=500).contains(&dropped), "dropped {dropped}");
        let written: i64 = catalog
            .read(|c| Ok(c.query_row("SELECT COUNT(*) FROM audit_log", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(written, 0, "nothing is written while paused");
        catalog.close();
        let c = rusqlite::Connection::open(&path).unwrap();
        let written: i64 = c.query_row("SELECT COUNT(*) FROM audit_log", [], |r| r.get(0)).unwrap();
        assert_eq!(written as usize, sent - dropped);
    }

    #[tokio::test]
    async fn rows_page_newest_first_and_refusals_are_written_on_close() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("catalog.db");
        let catalog = Catalog::open(&path).unwrap();
        let alice = Actor {
            name: "alice".into(),
            token: None,
            client: Some("127.0.0.1".into()),
            request_id: Some("r1".into()),
        };
        for i in 0..5 {
            let event = Event::new(Action::TagDelete).repo("a/b").tag(Some(format!("t{i}")));
            catalog
                .write(move |c| Ok(record(c, &Actor::system("gc"), &event, 1000 + i)?))
                .await
                .unwrap();
        }
        catalog.audit_refusal(&alice, Event::new(Action::DeniedPush).repo("a/b"));
        catalog.close();
        let all = read_file(
            &path,
            &AuditQuery {
                limit: 100,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(all.entries.len(), 6);
        assert_eq!(all.entries[0].action, "denied.push", "newest first");
        assert_eq!(all.entries[0].actor, "alice");
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let page = read_file(
                &path,
                &AuditQuery {
                    limit: 2,
                    before,
                    ..Default::default()
                },
            )
            .unwrap();
            seen.extend(page.entries.iter().map(|r| r.id));
            match page.next_cursor {
                Some(c) => before = Some(c),
                None => break,
            }
        }
        let all_ids: Vec<i64> = all.entries.iter().map(|r| r.id).collect();
        assert_eq!(seen, all_ids, "every row once, in order");
        let since = read_file(
            &path,
            &AuditQuery {
                since: Some(1003),
                user: Some("gc".into()),
                limit: 100,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(since.entries.len(), 2);
    }
}

//! The SQLite catalog: all SQL lives in this module and its children.
//!
//! Connections: one writer, owned by a dedicated thread, and [`READERS`] reader threads, each
//! owning one read-only connection, so no SQLite call ever runs on an async worker. The readers
//! are the catalog's own threads, not tokio's shared blocking pool: however many downloads,
//! hashes or password checks occupy that pool, tag listings and manifest GETs get a reader as
//! soon as one finishes its current query. Read jobs wait in one queue, taken first come first
//! served; a job that panics is answered with an internal error and its thread carries on with
//! a fresh connection.
//! The database runs in WAL mode with `synchronous=FULL`: a transaction acknowledged to a
//! client survives a crash of the process or the machine.
//!
//! Writes use group commit. Each [`Catalog::write`] job runs inside its own savepoint of a
//! shared transaction; the writer thread takes every job already queued (up to
//! [`MAX_BATCH`]), runs them, commits once, and only then answers each caller. A job that fails
//! rolls back to its savepoint without disturbing the others. Under concurrent pushes this turns
//! many fsyncs into one.
//!
//! Schema changes are the numbered files in `migrations/`, embedded in the binary and applied
//! at start-up; the applied version is SQLite's `user_version`.

pub mod auth;
mod gc;
mod queries;
mod spack;
mod uploads;

use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};

use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

pub use queries::{ManifestRecord, NewManifest, Referrer};
pub use spack::{ClosureNode, IndexSnapshot, IndexState, SpecDetail, SpecQuery, SpecSummary};
pub use uploads::{UploadCheckpoint, UploadRecord};

use crate::error::{Error, Internal, Result};

/// Most jobs committed together.
const MAX_BATCH: usize = 256;
/// Reader threads (each with its own read-only connection). Catalog reads are short indexed
/// queries; a few threads keep the cores busy while others wait on the disk, and three file
/// descriptors each (database, WAL, shared memory) stay small in the descriptor budget.
pub const READERS: usize = 8;

/// Embedded migrations, in order; the index + 1 is the schema version they bring.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/0001_init.sql"),
    include_str!("../../migrations/0002_spack.sql"),
    include_str!("../../migrations/0003_uploads.sql"),
    include_str!("../../migrations/0004_auth.sql"),
    include_str!("../../migrations/0005_credentials_epoch.sql"),
    include_str!("../../migrations/0006_gc.sql"),
];

type Finisher = Box<dyn FnOnce(bool) + Send>;
type Job = Box<dyn FnOnce(Option<&Connection>) -> Finisher + Send>;
/// A read job: runs on a reader thread's connection (`None` when it could not be opened).
type ReadJob = Box<dyn FnOnce(Option<&Connection>) + Send>;

/// Handle to the catalog; cheap to clone.
#[derive(Clone)]
pub struct Catalog {
    inner: Arc<Inner>,
}

struct Inner {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    /// The reader threads' queue; they stop when it is dropped with the last handle.
    reads: mpsc::Sender<ReadJob>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Catalog {
    /// Opens (creating if needed) the catalog at `path` and applies pending migrations.
    pub fn open(path: &Path) -> Result<Catalog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut conn = Connection::open(path)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA foreign_keys = ON;
             PRAGMA busy_timeout = 10000;",
        )?;
        migrate(&mut conn)?;
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("catalog-writer".into())
            .spawn(move || writer_loop(conn, rx))?;
        let reads = spawn_readers(path)?;
        Ok(Catalog {
            inner: Arc::new(Inner {
                jobs: Mutex::new(Some(tx)),
                reads,
                writer_thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// Runs `f` in the writer's transaction; resolves once its batch is durably committed.
    pub async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T>>();
        let job: Job = Box::new(move |conn| {
            let Some(conn) = conn else {
                return Box::new(move |_| {
                    let _ = tx.send(Err(Internal::Other("catalog transaction could not start").into()));
                });
            };
            let result = run_in_savepoint(conn, f);
            Box::new(move |committed| {
                let result = match result {
                    Ok(v) if committed => Ok(v),
                    Ok(_) => Err(Internal::Other("catalog commit failed").into()),
                    Err(e) => Err(e),
                };
                let _ = tx.send(result);
            })
        });
        {
            let guard = self
                .inner
                .jobs
                .lock()
                .map_err(|_| Internal::Other("catalog lock poisoned"))?;
            let sender = guard.as_ref().ok_or(Internal::Other("catalog is closed"))?;
            sender
                .send(job)
                .map_err(|_| Internal::Other("catalog writer stopped"))?;
        }
        rx.await
            .map_err(|_| Error::from(Internal::Other("catalog writer dropped a job")))?
    }

    /// Runs `f` on a read-only connection, on one of the catalog's reader threads.
    pub async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T>>();
        let job: ReadJob = Box::new(move |conn| {
            let result = match conn {
                Some(conn) => f(conn),
                None => Err(Internal::Other("catalog read connection could not be opened").into()),
            };
            let _ = tx.send(result);
        });
        self.inner
            .reads
            .send(job)
            .map_err(|_| Internal::Other("catalog readers stopped"))?;
        rx.await
            .map_err(|_| Error::from(Internal::Other("catalog reader dropped a job")))?
    }

    /// Stops the writer after the jobs already queued are committed.
    pub fn close(&self) {
        if let Ok(mut jobs) = self.inner.jobs.lock() {
            jobs.take();
        }
        if let Some(handle) = self.inner.writer_thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = handle.join();
        }
    }
}

/// Starts the [`READERS`] reader threads; returns their queue.
fn spawn_readers(path: &Path) -> Result<mpsc::Sender<ReadJob>> {
    let (tx, rx) = mpsc::channel::<ReadJob>();
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..READERS {
        let rx = Arc::clone(&rx);
        let path = path.to_owned();
        std::thread::Builder::new()
            .name(format!("catalog-reader-{i}"))
            .spawn(move || reader_loop(&path, &rx))?;
    }
    Ok(tx)
}

/// One reader thread: takes jobs until the queue closes. The connection is opened on first use
/// and again after a failure to open or a job that panicked.
fn reader_loop(path: &Path, jobs: &Mutex<mpsc::Receiver<ReadJob>>) {
    let mut conn: Option<Connection> = None;
    loop {
        let job = {
            let Ok(queue) = jobs.lock() else { return };
            match queue.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        if conn.is_none() {
            conn = open_reader(path)
                .inspect_err(|e| tracing::error!(error = %e, "catalog: cannot open a read connection"))
                .ok();
        }
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(conn.as_ref())));
        if ran.is_err() {
            tracing::error!("catalog: a read job panicked; its reader continues with a new connection");
            conn = None;
        }
    }
}

fn open_reader(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
    )?;
    conn.execute_batch("PRAGMA busy_timeout = 10000;")?;
    Ok(conn)
}

fn run_in_savepoint<T>(conn: &Connection, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
    conn.execute_batch("SAVEPOINT job")?;
    match f(conn) {
        Ok(v) => {
            conn.execute_batch("RELEASE job")?;
            Ok(v)
        }
        Err(e) => {
            if let Err(rb) = conn.execute_batch("ROLLBACK TO job; RELEASE job") {
                tracing::error!(error = %rb, "rolling back a failed catalog job failed");
            }
            Err(e)
        }
    }
}

fn writer_loop(conn: Connection, jobs: mpsc::Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let started = conn.execute_batch("BEGIN IMMEDIATE");
        if let Err(e) = &started {
            tracing::error!(error = %e, "catalog: cannot begin a write transaction");
        }
        let txn = started.is_ok().then_some(&conn);
        let mut finishers = vec![first(txn)];
        while finishers.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => finishers.push(job(txn)),
                Err(_) => break,
            }
        }
        let committed = txn.is_some()
            && match conn.execute_batch("COMMIT") {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(error = %e, batch = finishers.len(), "catalog: commit failed");
                    let _ = conn.execute_batch("ROLLBACK");
                    false
                }
            };
        for finish in finishers {
            finish(committed);
        }
    }
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let target = MIGRATIONS.len() as i64;
    if current > target {
        return Err(Internal::Other("catalog schema is newer than this stowage binary").into());
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = i as i64 + 1;
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version)?;
        tx.commit()?;
        tracing::info!(version, "catalog migrated");
    }
    Ok(())
}

/// Current unix time in seconds.
pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

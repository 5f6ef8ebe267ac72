//! The SQLite catalog: all SQL lives in this module and its children.
//!
//! Connections: one writer, owned by a dedicated thread, and [`READERS`] reader threads, each
//! owning one read-only connection, so no SQLite call ever runs on an async worker. The readers
//! are the catalog's own threads, not tokio's shared blocking pool: however many downloads,
//! hashes or password checks occupy that pool, tag listings and manifest GETs get a reader as
//! soon as one finishes its current query. Read jobs wait in one queue, taken first come first
//! served; a job that panics is answered with an internal error and its thread carries on with
//! a fresh connection. On PostgreSQL a connection learns that the server restarted or failed
//! over only when it is next used: a read ([`Catalog::read`], which may therefore run twice)
//! that fails on a connection found closed runs once more on a new one, and a write batch whose
//! `BEGIN` finds the writer's connection closed begins again on a new one. A read that streams
//! what it reads elsewhere ([`Catalog::read_once`]) and a batch that failed after `BEGIN` are
//! never repeated: their callers get the error (503 `UNAVAILABLE`).
//! The database runs in WAL mode with `synchronous=FULL`: a transaction acknowledged to a
//! client survives a crash of the process or the machine.
//!
//! Page cache: the writer's connection keeps up to [`WRITER_CACHE_KIB`] of pages (SQLite's
//! default is 2 MiB per connection, which the readers keep). A push touches a few dozen pages
//! at random places in the hash-keyed indexes (digests, tags, Spack DAG hashes); in a catalog of
//! a few GB (500,000 Spack specs: 3.4 GB) the default cache no longer holds even those indexes'
//! interior pages, and every push read its path back with `pread`. SQLite fills the cache only
//! as pages are touched, so a small catalog costs nothing and a large one at most that much
//! resident memory (the Spack benchmark: p50 push latency at 500,000 specs 3.6-3.9 ms against
//! 3.5-6.6 ms with the default, server peak RSS +21 MiB after 200 pushes).
//!
//! Writes use group commit. Each [`Catalog::write`] job runs inside its own savepoint of a
//! shared transaction; the writer thread takes every job already queued (up to
//! [`MAX_BATCH`]), runs them, commits once, and only then answers each caller. A job that fails
//! rolls back to its savepoint without disturbing the others. Under concurrent pushes this turns
//! many fsyncs into one.
//!
//! Supervision: the writer thread is the only way to change the catalog, so it must not die
//! silently. A job that panics is caught inside its savepoint: the savepoint is rolled back, the
//! panic is logged at error level, its caller gets an internal error, and the rest of the batch
//! commits as usual. Should the thread end abnormally nevertheless (a panic outside any job),
//! the error is logged and the process exits with status 70 (`EX_SOFTWARE`) rather than keep
//! serving with a catalog that refuses every write: a supervisor (systemd `Restart=on-failure`,
//! Kubernetes) restarts Stowage, and the restart recovers from the WAL like any crash. The
//! thread ending because the catalog was closed (every sender dropped) is the normal end.
//!
//! Checkpoints: SQLite would copy the WAL back into the database file inside the commit that
//! crosses its threshold, on the writer thread, holding every write queued behind it for as
//! long as that copy and its fsync take (a collection pass that touched pages all over the
//! file made that a quarter of a second). The writer's automatic checkpoints are therefore off,
//! and a thread of its own runs a passive checkpoint every [`CHECKPOINT_EVERY`]: passive
//! checkpoints never block the writer or the readers, and a commit no longer waits for one.
//! They run often so that each has few pages to copy and fsync: a large fsync of the database
//! file delays the WAL fsync of commits made meanwhile (see the GC benchmark in the README).
//! The thread stops when the catalog is closed; the last connection to close checkpoints the
//! rest, as SQLite always does.
//!
//! Prepared statements: every hot query is prepared once per connection (`prepare_cached`) and
//! must stay prepared. rusqlite clears a statement's bindings when it goes back to the cache,
//! and SQLite expires any statement whose plan *might* depend on a bound value when its
//! bindings are cleared: the planner marks a parameter so whenever it compares a column with it
//! outside the index it chose (every join does: `r.name = ?1` beside a `manifests` lookup), or
//! would use it for a `LIKE` prefix or STAT4 estimates. Such a statement was parsed and
//! planned again on every execution (18-23 µs, most of a manifest GET's CPU). Every connection
//! therefore runs with the query planner stability guarantee on ([`configure`]): a statement
//! keeps the plan it was prepared with whatever is bound to it, which is what the catalog's
//! queries are written for (they never rely on a value-dependent plan: no `LIKE` on bound
//! patterns, no `ANALYZE` statistics). Each connection adds up its statements' re-preparations
//! ([`take_reprepares`]) into `stowage_catalog_statement_reprepares_total`, which a test holds
//! at 0 under a push-and-pull workload.
//!
//! Schema changes are the numbered files in `migrations/`, embedded in the binary and applied
//! at start-up (or ahead of it by `stowage migrate`, [`migrate_file`]); the applied version is
//! SQLite's `user_version`. Every migration after version 17 gets its PostgreSQL counterpart,
//! `migrations/postgres/00NN_*.sql`, in the same commit (`tests/pg_schema.rs` checks that the
//! two schemas stay equivalent); `postgres` applies them to a PostgreSQL catalog, whose
//! version is the row of `stowage_schema` (`docs/postgres.md`).
//!
//! The audit trail (`audit`) is written by the write jobs that make each change; refusals reach
//! the writer through a bounded queue and a thread of their own, which [`Catalog::close`] drains
//! before it stops the writer.
//!
//! Files: the catalog holds password hashes and token records, so its files are owner-only.
//! The directory holding it is created 0700 when Stowage creates it (an existing one is left as
//! the operator set it); `catalog.db` is created 0600 before SQLite opens it, and SQLite gives
//! the `-wal` and `-shm` files it creates the database file's mode. A catalog file found
//! readable by group or others at start-up is changed to 0600, with a warning in the log.

pub mod audit;
pub mod auth;
pub(crate) mod db;
mod fsck;
mod gc;
pub mod locks;
pub mod login_throttle;
pub mod postgres;
pub use gc::{EvictCandidate, Eviction, ProxyPull};
mod queries;
mod retention;
mod spack;
mod stats;
mod ui;
mod uploads;

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use db::Connection;
use rusqlite::OpenFlags;
use tokio::sync::oneshot;

pub use fsck::{RepoFigures, RepoFiguresMismatch, RepoFiguresPage};
pub use queries::{Deletion, ManifestRecord, NewManifest, Referrer, RepositoryPage};
pub use retention::{KeepList, PULL_BATCH, RetentionDeleted, RetentionSnapshot, RetentionTag, TagRemoval};
pub use spack::{
    BuildMode, ClosureNode, Dependent, Dependents, Edge, INDEX_TRAILER, IndexBuild, IndexRun, IndexSnapshot,
    IndexState, RunSource, SpecDetail, SpecFacets, SpecQuery, SpecSummary,
};
pub use stats::CatalogStats;
pub use ui::{RepositorySummary, SummaryPage, TagRow};
pub use uploads::{UploadCheckpoint, UploadRecord};

use crate::error::{Error, Internal, Result};

/// Most jobs committed together.
const MAX_BATCH: usize = 256;
/// Reader threads (each with its own read-only connection). Catalog reads are short indexed
/// queries; a few threads keep the cores busy while others wait on the disk, and three file
/// descriptors each (database, WAL, shared memory) stay small in the descriptor budget.
pub const READERS: usize = 8;

/// How often the checkpoint thread copies the WAL into the database file.
pub const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Embedded migrations, in order; the index + 1 is the schema version they bring.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/0001_init.sql"),
    include_str!("../../migrations/0002_spack.sql"),
    include_str!("../../migrations/0003_uploads.sql"),
    include_str!("../../migrations/0004_auth.sql"),
    include_str!("../../migrations/0005_credentials_epoch.sql"),
    include_str!("../../migrations/0006_gc.sql"),
    include_str!("../../migrations/0007_upload_owner.sql"),
    include_str!("../../migrations/0008_gc_untagged.sql"),
    include_str!("../../migrations/0009_retention.sql"),
    include_str!("../../migrations/0010_audit.sql"),
    include_str!("../../migrations/0011_epochs.sql"),
    include_str!("../../migrations/0012_spack_search.sql"),
    include_str!("../../migrations/0013_repo_stats.sql"),
    include_str!("../../migrations/0014_manifest_platform.sql"),
    include_str!("../../migrations/0015_spack_fragments.sql"),
    include_str!("../../migrations/0016_spack_nodes_rowid.sql"),
    include_str!("../../migrations/0017_proxy_pulls.sql"),
    include_str!("../../migrations/0018_spack_index_composite.sql"),
    include_str!("../../migrations/0019_login_throttle.sql"),
];

type Finisher = Box<dyn FnOnce(bool) + Send>;
type Job = Box<dyn FnOnce(Option<&Connection>) -> Finisher + Send>;
/// A read job: runs on a reader thread's connection (`None` when it could not be opened).
/// `last`: whether this is its last chance; a job that is not may answer [`Ran::Again`] to be
/// run once more on a new connection.
type ReadJob = Box<dyn FnMut(Option<&Connection>, bool) -> Ran + Send>;

/// What a read job did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Ran {
    /// It answered its caller.
    Done,
    /// It found its connection closed and answered nothing: run it again on a new one.
    Again,
}
/// How a catalog thread opens (and after a failure, opens again) its connection.
type Opener = Arc<dyn Fn() -> Result<Connection> + Send + Sync>;

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
    /// Dropping it stops the checkpoint thread.
    checkpoints: Mutex<Option<mpsc::Sender<()>>>,
    /// PostgreSQL with the fs blob backend: the connection holding the single-node lock
    /// (`postgres::hold_single_node`), kept for the catalog's life.
    _single_node: Option<postgres::SingleNode>,
    /// PostgreSQL: the replica's database locks (`locks`); `None` on SQLite.
    locks: Option<locks::LockService>,
    /// Refusals waiting for the audit trail (see `audit`).
    refusals: audit::RefusalQueue,
    /// The newest generations seen (see [`Catalog::auth_epoch`], [`Catalog::content_epoch`]).
    epochs: Arc<Epochs>,
}

impl Catalog {
    /// Opens (creating if needed) the catalog at `path` and applies pending migrations.
    pub fn open(path: &Path) -> Result<Catalog> {
        Self::open_supervised(path, exit_after_writer_death)
    }

    /// [`Catalog::open`], with `on_writer_death` called (on the writer thread) if that thread
    /// ends abnormally.
    fn open_supervised(path: &Path, on_writer_death: fn(&str)) -> Result<Catalog> {
        prepare_files(path)?;
        let mut conn = rusqlite::Connection::open(path)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA foreign_keys = ON;
             PRAGMA busy_timeout = 10000;",
        )?;
        configure(&conn)?;
        conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
        migrate(&mut conn)?;
        // The checkpoint thread does this writer's checkpoints (see the module doc).
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        let conn = Connection::from(conn);
        let reader_path = path.to_owned();
        let checkpoint_path = path.to_owned();
        Self::start(
            conn,
            None,
            Arc::new(move || open_reader(&reader_path)),
            Arc::new(move || {
                let c = rusqlite::Connection::open(&checkpoint_path)?;
                c.busy_timeout(std::time::Duration::from_secs(1))?;
                Ok(Connection::from(c))
            }),
            None,
            None,
            on_writer_death,
        )
    }

    /// Opens the PostgreSQL catalog `settings` names, applying pending migrations first.
    /// `single_node`: the blobs are on the fs backend, so this process must be the catalog's
    /// only one (it holds `postgres::SINGLE_NODE_LOCK` until it exits). Blocking.
    pub fn open_postgres(
        settings: &postgres::Settings,
        single_node: bool,
    ) -> std::result::Result<Catalog, Box<dyn std::error::Error + Send + Sync>> {
        let held = if single_node {
            Some(postgres::hold_single_node(settings, exit_after_single_node_lost)?)
        } else {
            None
        };
        postgres::migrate(settings)?;
        let writer = settings.open(false)?;
        let (r, p, w) = (settings.clone(), settings.clone(), settings.clone());
        Self::start(
            writer,
            Some(Arc::new(move || w.open(false))),
            Arc::new(move || r.open(true)),
            Arc::new(move || p.open(true)),
            held,
            Some(locks::LockService::start(settings.clone())?),
            exit_after_writer_death,
        )
        .map_err(Into::into)
    }

    /// Starts the catalog's threads around an open, migrated writer connection.
    fn start(
        conn: Connection,
        reopen_writer: Option<Opener>,
        open_reader: Opener,
        open_poller: Opener,
        single_node: Option<postgres::SingleNode>,
        locks: Option<locks::LockService>,
        on_writer_death: fn(&str),
    ) -> Result<Catalog> {
        let epochs = Arc::new(Epochs::default());
        epochs.read(&conn)?;
        let (tx, rx) = mpsc::channel::<Job>();
        let writer_epochs = Arc::clone(&epochs);
        let thread = std::thread::Builder::new()
            .name("catalog-writer".into())
            .spawn(move || {
                let ran = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    writer_loop(conn, reopen_writer, rx, &writer_epochs)
                }));
                if let Err(payload) = ran {
                    on_writer_death(&panic_message(payload.as_ref()));
                }
            })?;
        let reads = spawn_readers(open_reader)?;
        let checkpoints = spawn_checkpointer(open_poller, Arc::clone(&epochs))?;
        let refusals = audit::RefusalQueue::start(tx.clone())?;
        Ok(Catalog {
            inner: Arc::new(Inner {
                epochs,
                refusals,
                jobs: Mutex::new(Some(tx)),
                reads,
                writer_thread: Mutex::new(Some(thread)),
                checkpoints: Mutex::new(Some(checkpoints)),
                _single_node: single_node,
                locks,
            }),
        })
    }

    /// Which database this catalog is on.
    pub async fn engine(&self) -> Result<db::Engine> {
        self.read(|c| Ok(c.engine())).await
    }

    /// The locks shared by every replica of a PostgreSQL catalog (`locks`); `None` on SQLite,
    /// whose one process needs none beyond its own.
    pub fn locks(&self) -> Option<&locks::LockService> {
        self.inner.locks.as_ref()
    }
}

/// Opens the catalog `config` names: SQLite under the data directory, or the PostgreSQL
/// database of `catalog.url`. `serving`: for `stowage serve`, which with the fs blob backend
/// must be the PostgreSQL catalog's only server (the CLI's commands, like `stowage user`, run
/// beside it as they do beside a SQLite one). Blocking.
pub fn open_configured(
    config: &crate::config::Config,
    serving: bool,
) -> std::result::Result<Catalog, Box<dyn std::error::Error + Send + Sync>> {
    match &config.catalog.url {
        None => Ok(Catalog::open(&config.catalog_path())?),
        Some(url) => {
            let settings = postgres::Settings::new(
                url,
                config.catalog.password()?.as_deref(),
                config.catalog.tls_ca_file.as_deref(),
            )?;
            let single_node = serving && config.storage.backend == crate::config::Backend::Fs;
            Catalog::open_postgres(&settings, single_node)
        }
    }
}

impl Catalog {
    /// The credentials generation: a number that every change of a user or an API token moves
    /// forward (triggers of migration 11, in the changing transaction, whichever process makes
    /// it). A change made through this catalog is seen here before its writer is answered; one
    /// made by another process within [`CHECKPOINT_EVERY`] (the checkpoint thread reads it).
    /// Caches of credentials tag what they keep with it and drop what is tagged older.
    pub fn auth_epoch(&self) -> u64 {
        self.inner.epochs.auth.load(Ordering::Acquire)
    }

    /// The content generation: like [`Catalog::auth_epoch`], for what a manifest lookup by tag
    /// or digest answers (every tag or manifest added, moved, changed or removed moves it).
    pub fn content_epoch(&self) -> u64 {
        self.inner.epochs.content.load(Ordering::Acquire)
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
                    let _ = tx.send(Err(
                        Internal::CatalogUnavailable("catalog transaction could not start").into()
                    ));
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
            submit(sender, job)?;
        }
        rx.await
            .map_err(|_| Error::from(Internal::Other("catalog writer dropped a job")))?
    }

    /// Runs `f` on a read-only connection, on one of the catalog's reader threads. If it fails
    /// because the connection turns out closed (PostgreSQL restarted or failed over since the
    /// connection was last used, which a connection only finds out by using it), `f` runs once
    /// more on a new connection: a read has no effect to repeat. A read that sends what it
    /// reads somewhere as it goes uses [`Catalog::read_once`].
    pub async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T>>();
        let mut tx = Some(tx);
        let job: ReadJob = Box::new(move |conn, last| {
            let result = match conn {
                Some(conn) => f(conn),
                None => Err(Internal::CatalogUnavailable("catalog read connection could not be opened").into()),
            };
            if !last && result.is_err() && conn.is_some_and(Connection::is_broken) {
                return Ran::Again;
            }
            if let Some(tx) = tx.take() {
                let _ = tx.send(result);
            }
            Ran::Done
        });
        self.submit_read(job, rx).await
    }

    /// [`Catalog::read`] for an `f` that must run at most once (it sends its rows on as it
    /// reads them): a closed connection fails it like any other error.
    pub async fn read_once<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T>>();
        let mut once = Some((f, tx));
        let job: ReadJob = Box::new(move |conn, _| {
            if let Some((f, tx)) = once.take() {
                let result = match conn {
                    Some(conn) => f(conn),
                    None => Err(Internal::CatalogUnavailable("catalog read connection could not be opened").into()),
                };
                let _ = tx.send(result);
            }
            Ran::Done
        });
        self.submit_read(job, rx).await
    }

    async fn submit_read<T>(&self, job: ReadJob, rx: oneshot::Receiver<Result<T>>) -> Result<T> {
        self.inner
            .reads
            .send(job)
            .map_err(|_| Internal::Other("catalog readers stopped"))?;
        rx.await
            .map_err(|_| Error::from(Internal::Other("catalog reader dropped a job")))?
    }

    /// Stops the writer after the jobs already queued (and the refusals waiting for the audit
    /// trail) are committed. Blocking.
    pub fn close(&self) {
        self.inner.refusals.close();
        if let Ok(mut checkpoints) = self.inner.checkpoints.lock() {
            checkpoints.take();
        }
        if let Ok(mut jobs) = self.inner.jobs.lock() {
            jobs.take();
        }
        if let Some(handle) = self.inner.writer_thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = handle.join();
        }
    }
}

/// Mode of the catalog's files.
const FILE_MODE: u32 = 0o600;
/// Mode of the directories Stowage creates for the catalog.
const DIR_MODE: u32 = 0o700;

/// Creates the catalog's directory (0700) and database file (0600) if missing, and takes group
/// and other access away from catalog files that have it.
fn prepare_files(path: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)?;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(path)?;
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        restrict(Path::new(&file))?;
    }
    Ok(())
}

/// Sets an existing file readable by group or others to [`FILE_MODE`], saying so.
fn restrict(file: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = match std::fs::metadata(file) {
        Ok(m) => m.permissions().mode() & 0o7777,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if mode & 0o077 != 0 {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(FILE_MODE))?;
        tracing::warn!(
            path = %file.display(),
            was = format!("{mode:o}"),
            "catalog file was readable by other users; changed its mode to 600"
        );
    }
    Ok(())
}

/// Starts the checkpoint thread; it runs until the returned sender is dropped. On PostgreSQL
/// it only reads the generations (changes other replicas made), on the same schedule.
fn spawn_checkpointer(open: Opener, epochs: Arc<Epochs>) -> Result<mpsc::Sender<()>> {
    let (tx, rx) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("catalog-checkpoint".into())
        .spawn(move || {
            let mut conn: Option<Connection> = None;
            while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(CHECKPOINT_EVERY) {
                if conn.as_ref().is_some_and(Connection::is_broken) {
                    conn = None;
                }
                if conn.is_none() {
                    conn = open()
                        .inspect_err(|e| tracing::error!(error = %e, "catalog: cannot open the checkpoint connection"))
                        .ok();
                }
                // Changes made by another process (the CLI, another replica), read first and
                // whatever the checkpoint does: a slow or failed checkpoint must not delay them.
                if let Some(c) = &conn
                    && let Err(e) = epochs.read(c)
                {
                    tracing::warn!(error = %e, "catalog: cannot read the cache generations");
                }
                if let Some(c) = conn.as_ref().and_then(Connection::sqlite)
                    && let Err(e) = c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                {
                    tracing::warn!(error = %e, "catalog: checkpoint failed; retrying");
                    conn = None;
                }
            }
        })?;
    Ok(tx)
}

/// Starts the [`READERS`] reader threads; returns their queue.
fn spawn_readers(open: Opener) -> Result<mpsc::Sender<ReadJob>> {
    let (tx, rx) = mpsc::channel::<ReadJob>();
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..READERS {
        let rx = Arc::clone(&rx);
        let open = Arc::clone(&open);
        std::thread::Builder::new()
            .name(format!("catalog-reader-{i}"))
            .spawn(move || reader_loop(&*open, &rx))?;
    }
    Ok(tx)
}

/// One reader thread: takes jobs until the queue closes. The connection is opened on first use
/// and again after a failure to open, a job that panicked, or a job that found it closed (that
/// job then runs once more, on the new connection).
fn reader_loop(open: &(dyn Fn() -> Result<Connection> + Send + Sync), jobs: &Mutex<mpsc::Receiver<ReadJob>>) {
    let mut conn: Option<Connection> = None;
    let mut since_sample = 0u32;
    loop {
        let mut job = {
            let Ok(queue) = jobs.lock() else { return };
            match queue.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        if conn.as_ref().is_some_and(Connection::is_broken) {
            conn = None;
        }
        if conn.is_none() {
            conn = open()
                .inspect_err(|e| tracing::error!(error = %e, "catalog: cannot open a read connection"))
                .ok();
        }
        let mut ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(conn.as_ref(), false)));
        if matches!(ran, Ok(Ran::Again)) {
            tracing::warn!("catalog: a reader's connection was closed; connecting again");
            conn = open()
                .inspect_err(|e| tracing::error!(error = %e, "catalog: cannot open a read connection"))
                .ok();
            ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(conn.as_ref(), true)));
        }
        if ran.is_err() {
            tracing::error!("catalog: a read job panicked; its reader continues with a new connection");
            conn = None;
        }
        since_sample += 1;
        if since_sample >= REPREPARE_SAMPLE_EVERY
            && let Some(c) = &conn
        {
            since_sample = 0;
            crate::metrics::get().catalog_reprepares.inc_by(take_reprepares(c));
        }
    }
}

fn open_reader(path: &Path) -> Result<Connection> {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
    )?;
    conn.execute_batch("PRAGMA busy_timeout = 10000;")?;
    configure(&conn)?;
    Ok(conn.into())
}

/// The writer connection's page cache, in KiB (see the module doc).
const WRITER_CACHE_KIB: i64 = 64 * 1024;

/// What every catalog connection gets, whatever it is for: the query planner stability
/// guarantee, so that a cached statement is never re-prepared because of what is bound to it
/// (see the module doc).
fn configure(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    Ok(())
}

/// Re-preparations of the statements `conn` holds since the last call (each statement's
/// counter is read and reset). Cheap: one pass over the connection's prepared statements.
fn take_reprepares(conn: &Connection) -> u64 {
    use rusqlite::ffi;
    let Some(conn) = conn.sqlite() else { return 0 };
    let mut total: u64 = 0;
    // SAFETY: `conn` is borrowed for the whole walk and used by this thread only, so no
    // statement is finalized or created meanwhile; `sqlite3_next_stmt` and
    // `sqlite3_stmt_status` read the connection's statement list and counters and nothing else.
    unsafe {
        let db = conn.handle();
        let mut stmt = ffi::sqlite3_next_stmt(db, std::ptr::null_mut());
        while !stmt.is_null() {
            let n = ffi::sqlite3_stmt_status(stmt, ffi::SQLITE_STMTSTATUS_REPREPARE, 1);
            total = total.saturating_add(u64::try_from(n).unwrap_or(0));
            stmt = ffi::sqlite3_next_stmt(db, stmt);
        }
    }
    total
}

/// The generations of migration 11, as last read from the catalog. They only move forward.
#[derive(Default)]
struct Epochs {
    auth: AtomicU64,
    content: AtomicU64,
}

impl Epochs {
    /// Reads both from the catalog through `conn`.
    fn read(&self, conn: &Connection) -> db::Result<()> {
        let (auth, content) = conn
            .prepare_cached(
                "SELECT (SELECT value FROM auth_epoch WHERE id = 1), (SELECT value FROM content_epoch WHERE id = 1)",
            )?
            .query_row([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
        self.auth.fetch_max(u64::try_from(auth).unwrap_or(0), Ordering::AcqRel);
        self.content
            .fetch_max(u64::try_from(content).unwrap_or(0), Ordering::AcqRel);
        Ok(())
    }
}

/// How many read jobs a reader runs between two [`take_reprepares`] walks.
const REPREPARE_SAMPLE_EVERY: u32 = 64;

/// Exit status when a server on the fs blob backend finds another process using its
/// PostgreSQL catalog: `EX_TEMPFAIL`.
const SINGLE_NODE_LOST_EXIT: i32 = 75;

/// What `serve` does when, after its single-node lock's session was lost, another process took
/// the lock (`postgres::hold_single_node`): it can no longer be the catalog's only server with
/// blobs on its own disk, so it says so and exits.
fn exit_after_single_node_lost(reason: &str) {
    exit_logged(
        SINGLE_NODE_LOST_EXIT,
        reason,
        "the single-node lock was taken by another process after this one lost its session; exiting",
    );
}

/// Exit status when the writer thread dies: `EX_SOFTWARE`.
const WRITER_DIED_EXIT: i32 = 70;

/// What a process does when its catalog writer dies: say so and exit, for a supervisor to
/// restart it (see the module doc).
fn exit_after_writer_death(reason: &str) {
    exit_logged(
        WRITER_DIED_EXIT,
        reason,
        "the catalog writer thread died; exiting so that a supervisor restarts stowage",
    );
}

/// Logs `what` and `reason` at error level, flushes the log and exits with `status`.
fn exit_logged(status: i32, reason: &str, what: &str) -> ! {
    tracing::error!(reason, exit_status = status, "{what}");
    crate::logging::flush();
    std::process::exit(status);
}

/// The message a panic was raised with, if it has one.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Runs one job in its own savepoint; a failed or panicking job is rolled back to it.
fn run_in_savepoint<T>(conn: &Connection, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
    conn.execute_batch("SAVEPOINT job")?;
    // The connection is consistent after a panic in `f`: the panic unwinds through Rust code
    // only (rusqlite does not unwind through SQLite), and the rollback below undoes the job.
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| f(conn))).unwrap_or_else(|payload| {
        let message = panic_message(payload.as_ref());
        tracing::error!(panic = %message, "a catalog write job panicked; its changes are rolled back");
        Err(Internal::Other("a catalog write job panicked").into())
    });
    // A job that caught a statement's error and went on reaches `RELEASE` with PostgreSQL's
    // transaction aborted: it is then rolled back like a failed job.
    let outcome = outcome.and_then(|v| conn.execute_batch("RELEASE job").map(|()| v).map_err(Error::from));
    match outcome {
        Ok(v) => Ok(v),
        Err(e) => {
            if let Err(rb) = conn.execute_batch("ROLLBACK TO job; RELEASE job") {
                tracing::error!(error = %rb, "rolling back a failed catalog job failed");
            }
            Err(e)
        }
    }
}

/// Queues a job for the writer, counted in `stowage_catalog_write_queue_depth` (the writer
/// uncounts each job it takes). Every job reaches the writer through here.
fn submit(sender: &mpsc::Sender<Job>, job: Job) -> Result<()> {
    // Counted before it is sent, so the writer never takes a job not yet counted.
    crate::metrics::get().catalog_queue.inc();
    if sender.send(job).is_err() {
        crate::metrics::get().catalog_queue.dec();
        return Err(Internal::Other("catalog writer stopped").into());
    }
    Ok(())
}

/// The statements that open a write transaction. On PostgreSQL the transaction takes the
/// catalog's write lock first (see `postgres`): writers on every replica run one at a time, as
/// SQLite's one writer does, and the triggers' row locks cannot deadlock.
fn begin_write(conn: &Connection) -> db::Result<()> {
    match conn.engine() {
        db::Engine::Sqlite => conn.execute_batch("BEGIN IMMEDIATE"),
        db::Engine::Postgres => {
            conn.execute_batch("BEGIN")?;
            let locked = conn.execute("SELECT pg_advisory_xact_lock(?1)", [postgres::WRITE_LOCK]);
            if locked.is_err() {
                // Else the transaction stays open and aborted, and every later BEGIN fails.
                let _ = conn.execute_batch("ROLLBACK");
            }
            locked.map(drop)
        }
    }
}

/// Commits the writer's transaction. PostgreSQL answers `COMMIT` in a transaction an error
/// aborted with a rollback, not an error: a statement run first tells the two apart.
fn commit_write(conn: &Connection) -> db::Result<()> {
    if conn.engine() == db::Engine::Postgres {
        conn.execute_batch("SELECT 1")?;
    }
    conn.execute_batch("COMMIT")
}

fn writer_loop(mut conn: Connection, reopen: Option<Opener>, jobs: mpsc::Receiver<Job>, epochs: &Epochs) {
    let metrics = crate::metrics::get();
    while let Ok(first) = jobs.recv() {
        metrics.catalog_queue.dec();
        if conn.is_broken()
            && let Some(open) = &reopen
        {
            match open() {
                Ok(c) => {
                    tracing::warn!("catalog: the writer's connection broke; connected again");
                    conn = c;
                }
                Err(e) => tracing::error!(error = %e, "catalog: cannot connect the writer again"),
            }
        }
        let mut started = begin_write(&conn);
        // A connection only finds out it was closed (a database restart, a failover) when it
        // is used: when BEGIN finds it so, nothing of the batch has run, so it begins again on
        // a new connection.
        if started.is_err()
            && conn.is_broken()
            && let Some(open) = &reopen
        {
            match open() {
                Ok(c) => {
                    tracing::warn!("catalog: the writer's connection was closed; connected again");
                    conn = c;
                    started = begin_write(&conn);
                }
                Err(e) => tracing::error!(error = %e, "catalog: cannot connect the writer again"),
            }
        }
        if let Err(e) = &started {
            tracing::error!(error = %e, "catalog: cannot begin a write transaction");
            // Whatever was left open (PostgreSQL refuses BEGIN inside an aborted transaction)
            // goes, so that the next batch can begin; with nothing open this fails harmlessly.
            let _ = conn.execute_batch("ROLLBACK");
        }
        let txn = started.is_ok().then_some(&conn);
        let mut finishers = vec![first(txn)];
        while finishers.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => {
                    metrics.catalog_queue.dec();
                    finishers.push(job(txn));
                }
                Err(_) => break,
            }
        }
        let commit_started = std::time::Instant::now();
        let committed = txn.is_some()
            && match commit_write(&conn) {
                Ok(()) => {
                    metrics.catalog_commit.observe(commit_started.elapsed().as_secs_f64());
                    true
                }
                Err(e) => {
                    metrics.catalog_commits_failed.inc();
                    tracing::error!(error = %e, batch = finishers.len(), "catalog: commit failed");
                    let _ = conn.execute_batch("ROLLBACK");
                    false
                }
            };
        // Before anyone is answered: a request that revoked a token returns only once no
        // cached credential from before the revocation is honoured any more.
        if committed && let Err(e) = epochs.read(&conn) {
            tracing::error!(error = %e, "catalog: cannot read the cache generations");
        }
        for finish in finishers {
            finish(committed);
        }
        metrics.catalog_reprepares.inc_by(take_reprepares(&conn));
    }
}

/// The line by which a migration asks to run with foreign keys off, followed by the tables whose
/// foreign keys are checked before it commits.
const FOREIGN_KEYS_OFF: &str = "-- stowage: foreign-keys-off";

/// Applies the migrations `conn`'s catalog lacks; returns the versions applied.
fn migrate(conn: &mut rusqlite::Connection) -> Result<Vec<i64>> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let target = MIGRATIONS.len() as i64;
    if current > target {
        return Err(Internal::Other("catalog schema is newer than this stowage binary").into());
    }
    let mut applied = Vec::new();
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = i as i64 + 1;
        // A migration that rebuilds a table others refer to runs with foreign keys off (they
        // cannot be switched inside a transaction) and must leave none broken.
        let fk_off: Option<Vec<&str>> = sql.lines().find_map(|l| {
            l.trim()
                .strip_prefix(FOREIGN_KEYS_OFF)
                .map(|tables| tables.split_whitespace().collect())
        });
        if fk_off.is_some() {
            conn.pragma_update(None, "foreign_keys", false)?;
        }
        let outcome = (|| -> Result<()> {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            // Only the tables it names: rows an older version left dangling elsewhere are not
            // this migration's to judge.
            for table in fk_off.iter().flatten() {
                let broken: i64 = tx.query_row("SELECT count(*) FROM pragma_foreign_key_check(?1)", [table], |r| {
                    r.get(0)
                })?;
                if broken > 0 {
                    return Err(Internal::Other("a migration left foreign keys broken").into());
                }
            }
            tx.pragma_update(None, "user_version", version)?;
            tx.commit()?;
            Ok(())
        })();
        if fk_off.is_some() {
            conn.pragma_update(None, "foreign_keys", true)?;
        }
        outcome?;
        tracing::info!(version, "catalog migrated");
        applied.push(version);
    }
    Ok(applied)
}

/// What `stowage migrate` did: the schema version found, and each migration applied (its
/// version and the first line of its file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    pub from: i64,
    pub applied: Vec<(i64, String)>,
}

/// Applies the pending migrations to the catalog at `path` (created if missing) and closes it,
/// without starting the catalog's threads. Blocking. The caller makes sure no server uses the
/// catalog meanwhile (`stowage migrate` holds the data directory's lock).
pub fn migrate_file(path: &Path) -> Result<Migrated> {
    prepare_files(path)?;
    let mut conn = rusqlite::Connection::open(path)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;
         PRAGMA busy_timeout = 10000;",
    )?;
    let from: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let applied = migrate(&mut conn)?
        .into_iter()
        .map(|v| {
            let sql = MIGRATIONS[(v - 1) as usize];
            let first = sql.lines().next().unwrap_or_default().trim_start_matches("--").trim();
            (v, first.to_owned())
        })
        .collect();
    Ok(Migrated { from, applied })
}

/// The schema version this binary brings the catalog to.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// Current unix time in seconds.
pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::db::OptionalExtension as _;

    use super::*;

    fn count(c: &Connection) -> Result<i64> {
        Ok(c.query_row("SELECT COUNT(*) FROM repositories", [], |r| r.get(0))?)
    }

    fn add_repo(name: &'static str) -> impl FnOnce(&Connection) -> Result<()> + Send + 'static {
        move |c| {
            c.execute("INSERT INTO repositories (name, created_at) VALUES (?1, 0)", [name])?;
            Ok(())
        }
    }

    /// The writer keeps a larger page cache than SQLite's default; readers keep the default.
    #[tokio::test]
    async fn the_writer_has_its_own_page_cache_size() {
        let tmp = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(&tmp.path().join("catalog.db")).unwrap();
        let writer: i64 = catalog
            .write(|c| Ok(c.query_row("PRAGMA cache_size", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(writer, -WRITER_CACHE_KIB);
        let reader: i64 = catalog
            .read(|c| Ok(c.query_row("PRAGMA cache_size", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(reader, -2000, "readers keep SQLite's default");
    }

    /// A panicking job is rolled back and answered with an error; the jobs queued with it (in
    /// its batch or the next) and later jobs commit, and the writer keeps going.
    #[tokio::test]
    async fn a_panicking_job_is_rolled_back_and_the_writer_carries_on() {
        let tmp = tempfile::tempdir().unwrap();
        let catalog = Catalog::open_supervised(&tmp.path().join("catalog.db"), |reason| {
            panic!("the writer must survive a panicking job, but died: {reason}")
        })
        .unwrap();
        let panicking = catalog.write(|c| -> Result<()> {
            add_repo("half/written")(c)?;
            panic!("a bug in a catalog job");
        });
        let (before, failed, after) = tokio::join!(
            catalog.write(add_repo("queued/before")),
            panicking,
            catalog.write(add_repo("queued/after")),
        );
        before.unwrap();
        after.unwrap();
        assert!(failed.is_err(), "the panicking job's caller gets an error");
        catalog.write(add_repo("later/write")).await.unwrap();
        assert_eq!(catalog.read(count).await.unwrap(), 3, "the panicking job left nothing");
        let half: Option<i64> = catalog
            .read(|c| {
                Ok(
                    c.query_row("SELECT id FROM repositories WHERE name = 'half/written'", [], |r| {
                        r.get(0)
                    })
                    .optional()?,
                )
            })
            .await
            .unwrap();
        assert_eq!(half, None);
        catalog.close();
    }

    static DEATHS: AtomicUsize = AtomicUsize::new(0);

    /// The writer thread ending abnormally (here a panic outside any job's guard) is reported
    /// to the supervisor hook, which in the server logs and exits non-zero.
    #[tokio::test]
    async fn the_writer_thread_dying_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let catalog = Catalog::open_supervised(&tmp.path().join("catalog.db"), |_| {
            DEATHS.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        catalog.write(add_repo("before/death")).await.unwrap();
        let fatal: Job = Box::new(|_| panic!("a bug in the writer loop itself"));
        catalog
            .inner
            .jobs
            .lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .send(fatal)
            .unwrap();
        let handle = catalog.inner.writer_thread.lock().unwrap().take().unwrap();
        handle.join().expect("the supervisor caught the panic");
        assert_eq!(DEATHS.load(Ordering::SeqCst), 1);
        assert!(catalog.write(add_repo("after/death")).await.is_err());
    }
}

//! One-off run modes beside `serve`: `stowage audit`, `stowage migrate`, `stowage gc`.
//!
//! - `stowage audit` prints the audit trail (`catalog::audit`), newest first. It opens the
//!   catalog file read-only, without migrating it or starting the catalog's threads, so it is
//!   safe beside a running server and never changes anything.
//! - `stowage migrate` applies the catalog migrations this binary brings and exits, printing
//!   each. It takes the data directory's lock (`server::DataDirLock`) and so refuses while a
//!   server runs: a running server has applied its own migrations at start-up and keeps using
//!   the schema it knows; changing the schema under it (when this binary is newer) could break
//!   its queries mid-flight. Run it as a separate step before starting the new version (a
//!   Kubernetes job or an `ExecStartPre`), or let `serve` migrate at start as it always does.
//! - `stowage gc` runs one collection pass with the server's own code (`registry::gc`):
//!   retention, unneeded manifests, blob links and blobs, orphans (always listed, whatever
//!   `gc.orphan_interval_secs` says), and superseded Spack index blobs past their grace. A real
//!   pass takes the data directory's lock and refuses while a server runs: the locks that keep
//!   the collector from deleting a blob an upload is publishing are in-process, so a second
//!   process could delete a blob a push has just linked. A running server collects by itself
//!   every `gc.interval_secs`. `--dry-run` needs no lock and changes nothing: it copies the
//!   catalog (`VACUUM INTO`, a consistent snapshot that readers and the live writer do not
//!   notice) to a private file in the data directory, runs the pass on the copy without deleting
//!   any object, prints what it would remove and deletes the copy. Every item is one line on
//!   stdout (see `registry::Removed`), in the order the pass meets them; a summary goes to
//!   stderr. With a PostgreSQL catalog those locks are database locks, so a real pass runs
//!   beside the running replicas as one more of them (under collection leadership, waiting for
//!   a replica's pass to end); `--dry-run`, which needs a copy of the catalog file, is SQLite's
//!   only.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::catalog::Catalog;
use crate::catalog::audit::{AuditQuery, AuditRow, MAX_PAGE, parse_since, read_file};
use crate::cli::{AuditArgs, GcArgs};
use crate::config::Config;
use crate::registry::{GcLeadership, GcOptions, GcReport, Registry, Removed};
use crate::server::DataDirLock;

type Outcome = Result<(), Box<dyn std::error::Error>>;

/// Runs blocking `f` off the async executor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, Box<dyn std::error::Error>> {
    Ok(crate::metrics::spawn_blocking(f).await??)
}

/// One row as a line of text: tab-separated time, action, actor, token, client, what (the
/// repository, `:tag`, `@digest`), request id, detail; `-` for what is absent.
fn row_line(r: &AuditRow) -> String {
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
    let token = match (&r.token_name, r.token_id) {
        (Some(name), Some(id)) => format!("{name} ({id})"),
        (None, Some(id)) => format!("({id})"),
        _ => "-".to_owned(),
    };
    let mut what = r.repository.clone().unwrap_or_default();
    if let Some(tag) = &r.tag {
        what.push(':');
        what.push_str(tag);
    }
    if let Some(digest) = &r.digest {
        what.push('@');
        what.push_str(digest);
    }
    if what.is_empty() {
        what.push('-');
    }
    let detail = r.detail.as_ref().map_or_else(|| "-".to_owned(), |d| d.to_string());
    format!(
        "{}\t{}\t{}\t{token}\t{}\t{what}\t{}\t{detail}",
        r.time,
        r.action,
        r.actor,
        dash(&r.client),
        dash(&r.request_id)
    )
}

/// `stowage audit`.
pub async fn audit(args: AuditArgs, config: &Config) -> Outcome {
    let since = args
        .since
        .as_deref()
        .map(|s| parse_since(s, crate::catalog::now()))
        .transpose()?;
    let path = config.catalog_path();
    let postgres = postgres_settings(config)?;
    let mut left = usize::try_from(args.limit).unwrap_or(usize::MAX);
    let mut before = None;
    let mut out = std::io::stdout().lock();
    while left > 0 {
        let q = AuditQuery {
            repo: args.repo.clone(),
            user: args.user.clone(),
            since,
            before,
            limit: left.min(MAX_PAGE),
        };
        let path = path.clone();
        let postgres = postgres.clone();
        let page = blocking(move || match &postgres {
            Some(settings) => crate::catalog::audit::read_postgres(settings, &q),
            None => read_file(&path, &q),
        })
        .await?;
        for row in &page.entries {
            if args.json {
                writeln!(out, "{}", serde_json::to_string(row)?)?;
            } else {
                writeln!(out, "{}", row_line(row))?;
            }
        }
        left = left.saturating_sub(page.entries.len());
        match page.next_cursor {
            Some(c) => before = Some(c),
            None => break,
        }
    }
    out.flush()?;
    Ok(())
}

/// Takes the data directory's lock for `what`, saying why it is needed when a server holds it.
async fn lock(
    config: &Config,
    what: &'static str,
    why: &'static str,
) -> Result<DataDirLock, Box<dyn std::error::Error>> {
    let dir = config.data_dir.clone();
    blocking(move || DataDirLock::acquire(&dir, what).map_err(|e| format!("{e}\n{why}"))).await
}

/// The PostgreSQL catalog's connection settings, when `catalog.url` names one.
fn postgres_settings(
    config: &Config,
) -> Result<Option<crate::catalog::postgres::Settings>, Box<dyn std::error::Error>> {
    let Some(url) = &config.catalog.url else {
        return Ok(None);
    };
    let password = config.catalog.password()?;
    Ok(Some(crate::catalog::postgres::Settings::new(
        url,
        password.as_deref(),
        config.catalog.tls_ca_file.as_deref(),
    )?))
}

/// `stowage migrate`.
pub async fn migrate(config: &Config) -> Outcome {
    if let Some(settings) = postgres_settings(config)? {
        // Replicas may be running: the migration lock, not the data directory's, keeps two
        // processes from migrating at once.
        let (from, applied) =
            blocking(move || crate::catalog::postgres::migrate(&settings).map_err(|e| e.to_string())).await?;
        for version in &applied {
            println!(
                "applied migration {version}: {}",
                crate::catalog::postgres::migration_title(*version)
            );
        }
        match applied.last() {
            Some(to) => eprintln!("catalog migrated from schema version {from} to {to}"),
            None => eprintln!("catalog already at schema version {from}: nothing to apply"),
        }
        return Ok(());
    }
    let _lock = lock(
        config,
        "migrate",
        "`stowage migrate` needs the server stopped: a running server must not have its schema changed \
         under it (it applies pending migrations itself when it starts)",
    )
    .await?;
    let path = config.catalog_path();
    let migrated = blocking(move || crate::catalog::migrate_file(&path).map_err(|e| e.to_string())).await?;
    for (version, what) in &migrated.applied {
        println!("applied migration {version}: {what}");
    }
    match migrated.applied.last() {
        Some((to, _)) => eprintln!("catalog migrated from schema version {} to {to}", migrated.from),
        None => eprintln!("catalog already at schema version {}: nothing to apply", migrated.from),
    }
    Ok(())
}

/// A private copy of the catalog, deleted (with its WAL and shared-memory files) when dropped.
struct CatalogCopy {
    path: PathBuf,
}

impl CatalogCopy {
    /// Snapshots the catalog at `live` into a new owner-only file in `dir`. Blocking.
    fn take(live: &Path, dir: &Path) -> Result<CatalogCopy, String> {
        use std::os::unix::fs::OpenOptionsExt as _;
        if !live.exists() {
            return Err(format!("no catalog at {}: nothing to collect", live.display()));
        }
        let path = dir.join(format!(".gc-dry-run-{}.db", std::process::id()));
        let copy = CatalogCopy { path };
        // The copy holds password hashes too: owner-only, like the catalog.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&copy.path)
            .map_err(|e| format!("creating {}: {e}", copy.path.display()))?;
        let conn = rusqlite::Connection::open_with_flags(live, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| format!("opening {}: {e}", live.display()))?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(|e| e.to_string())?;
        let target = copy.path.to_str().ok_or("the data directory's path is not UTF-8")?;
        conn.execute("VACUUM INTO ?1", [target])
            .map_err(|e| format!("copying the catalog to {}: {e}", copy.path.display()))?;
        Ok(copy)
    }
}

impl Drop for CatalogCopy {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut file = self.path.as_os_str().to_owned();
            file.push(suffix);
            let _ = std::fs::remove_file(&file);
        }
    }
}

/// How long `stowage gc` on PostgreSQL waits for a replica's pass to end before it gives up.
const GC_LEADER_WAIT: Duration = Duration::from_secs(120);

/// Takes garbage-collection leadership, waiting up to `wait` for a replica's pass to end.
async fn lead_gc_within(registry: &Registry, wait: Duration) -> Result<GcLeadership, Box<dyn std::error::Error>> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut told = false;
    loop {
        if let Some(leader) = registry.lead_gc().await? {
            return Ok(leader);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "a replica has been collecting garbage for over {} s; try again when its pass has ended",
                wait.as_secs()
            )
            .into());
        }
        if !told {
            eprintln!("gc: a replica is collecting garbage; waiting for its pass to end");
            told = true;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `stowage gc [--dry-run]`.
pub async fn gc(args: GcArgs, config: &Config) -> Outcome {
    let opts = GcOptions {
        grace: Duration::from_secs(config.gc.grace_secs),
        untagged_manifests: config.gc.untagged_manifests,
        orphan_interval: Duration::ZERO,
        dry_run: args.dry_run,
        // The server is stopped (or this is a private copy): nobody waits for the writer.
        write_pause: 0.0,
    };
    let index_grace = Duration::from_secs(config.gc.spack_index_grace_secs);
    let (registry, _lock, _copy, _leader) = if config.catalog.url.is_some() {
        if args.dry_run {
            return Err(
                "`stowage gc --dry-run` works on a SQLite catalog only (it collects on a private copy \
                        of the catalog file); with PostgreSQL, `stowage gc` runs a real pass beside the \
                        running replicas"
                    .into(),
            );
        }
        // With PostgreSQL every lock a pass needs is a database lock, so this process collects
        // beside running replicas as one of them would: under collection leadership, with each
        // blob deleted under its digest's lock (`registry::gc`, "Replicas").
        let catalog_config = config.clone();
        let catalog =
            blocking(move || crate::catalog::open_configured(&catalog_config, false).map_err(|e| e.to_string()))
                .await?;
        let store = crate::server::open_store(config).await?;
        let registry = Registry::new(catalog, store, crate::server::settings(config));
        let leader = lead_gc_within(&registry, GC_LEADER_WAIT).await?;
        (registry, None, None, Some(leader))
    } else if args.dry_run {
        let (live, dir) = (config.catalog_path(), config.data_dir.clone());
        let copy = blocking(move || CatalogCopy::take(&live, &dir)).await?;
        let path = copy.path.clone();
        let catalog = blocking(move || Catalog::open(&path).map_err(|e| e.to_string())).await?;
        let store = crate::server::open_store(config).await?;
        let registry = Registry::new(catalog, store, crate::server::settings(config));
        (registry, None, Some(copy), None)
    } else {
        let held = lock(
            config,
            "gc",
            "a real `stowage gc` pass needs the server stopped (its upload locks do not reach another \
             process); the running server already collects every gc.interval_secs, and \
             `stowage gc --dry-run` shows what a pass would remove, beside it",
        )
        .await?;
        (crate::server::open(config).await?, Some(held), None, None)
    };
    let mut out = std::io::stdout();
    let mut failed: Option<std::io::Error> = None;
    let outcome = registry
        .collect_listed(opts, index_grace, &mut |item: Removed| {
            if failed.is_none()
                && let Err(e) = writeln!(out, "{item}")
            {
                failed = Some(e);
            }
        })
        .await;
    let catalog = registry.catalog().clone();
    crate::metrics::spawn_blocking(move || catalog.close()).await?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    let report: GcReport = outcome?;
    let (verb, note) = if args.dry_run {
        ("would remove", "; nothing was deleted")
    } else {
        ("removed", "")
    };
    eprintln!(
        "gc: {verb} {} manifests, {} blob links, {} blobs ({} bytes), {} orphaned objects, evict {} cached manifests{note}",
        report.manifests, report.links, report.blobs, report.bytes, report.orphans, report.evicted
    );
    Ok(())
}

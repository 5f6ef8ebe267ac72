//! The PostgreSQL engine's own parts: connecting, the schema's migrations, and the database
//! locks that stand in for what one SQLite process got from being alone.
//!
//! Connections: each catalog thread (the writer, the readers, the generation poller) owns one
//! synchronous client, as it owns a SQLite connection on the other engine, so the catalog's
//! threading, group commit and job queues are the same on both (see the parent module). A
//! replica holds `READERS + 2` connections (`+ 1` on the fs blob backend, see
//! [`hold_single_node`]; `+ 1` for its locks once it takes one, see `catalog::locks`); a broken
//! one is opened again by its thread.
//!
//! TLS: with `sslmode=require` in `catalog.url`, every connection (catalog threads, locks,
//! migrations) is TLS and checks the server's certificate chain and host name, against
//! `catalog.tls_ca_file` or the system's trust store ([`Settings::new`]). Without it,
//! connections are plain TCP, as for a database on the same host or a private network.
//!
//! Locks, all PostgreSQL advisory locks in one key space ([`lock_key`]):
//! - **writes** ([`WRITE_LOCK`]): every write transaction takes it first
//!   (`pg_advisory_xact_lock`), so the catalog's writers, across every replica, run one at a
//!   time as they do on SQLite. The schema's triggers lock `content_epoch` and a repository's
//!   row in an order that depends on the write path (`docs/postgres.md`, "Lock order"); with
//!   one writer at a time they cannot deadlock. Each replica still commits its queued jobs
//!   together, so the lock is taken once per batch, not per request.
//! - **migrations** ([`MIGRATE_LOCK`], session-level): replicas starting together migrate once.
//! - **single node** ([`SINGLE_NODE_LOCK`], session-level, held for the process's life): the
//!   fs blob backend keeps blobs and upload sessions on one machine's disk, so only one replica
//!   may use a PostgreSQL catalog with it; a second one is refused with a clear error. The
//!   lock lives as long as its session, so it is checked every two seconds and taken again
//!   after the session is lost (a database restart or failover); a server that finds another
//!   process took it meanwhile exits ([`hold_single_node`]).
//! - **garbage-collection leadership** ([`GC_LEADER_LOCK`], session-level, for a pass) and the
//!   named locks of blobs and Spack index builds (keys hashed from their names, outside this
//!   prefix): taken through the replica's lock connection, `catalog::locks`.
//!
//! The schema version lives in `stowage_schema` (one row). The first PostgreSQL migration,
//! `migrations/postgres/0001_schema.sql`, is the SQLite catalog's version 17 in one file, so a
//! new database goes from 0 straight to 17, then follows the numbered files.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use postgres::config::SslMode;

use super::db::Connection;
use crate::error::{Internal, Result};

/// The PostgreSQL migrations: the schema version each brings, and its text.
const MIGRATIONS: &[(i64, &str)] = &[
    (17, include_str!("../../migrations/postgres/0001_schema.sql")),
    (
        18,
        include_str!("../../migrations/postgres/0018_spack_index_composite.sql"),
    ),
    (19, include_str!("../../migrations/postgres/0019_login_throttle.sql")),
];

/// The advisory lock key of Stowage's lock `n`: one 64-bit space shared by every database
/// user, so Stowage's keys carry a prefix ("STOW") that other applications are unlikely to use.
pub const fn lock_key(n: u32) -> i64 {
    (0x5354_4F57_i64 << 32) | n as i64
}

/// Taken first by every write transaction (see the module doc).
pub const WRITE_LOCK: i64 = lock_key(1);
/// Held while migrating.
pub const MIGRATE_LOCK: i64 = lock_key(2);
/// Held for life by the one replica of a catalog whose blobs are on the fs backend.
pub const SINGLE_NODE_LOCK: i64 = lock_key(3);
/// Held (session-level, through `catalog::locks`) by the replica running a garbage collection
/// pass: one replica collects at a time.
pub const GC_LEADER_LOCK: i64 = lock_key(4);

/// How long a connection attempt may take before it fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalives on every catalog connection, the same on both ends (see [`Settings::new`]).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;
/// How long sent data may stay unacknowledged before the connection counts as dead.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(60);

/// Where and how to connect: the URL (`postgres://user@host:port/db?…`, or the key=value
/// form), a password kept out of it, and with `sslmode=require` the TLS client that checks the
/// server's certificate.
#[derive(Clone)]
pub struct Settings {
    config: postgres::Config,
    /// `None`: plain TCP (`sslmode` `disable`, `prefer` or unset).
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password is never printed.
        f.debug_struct("Settings")
            .field("hosts", &self.config.get_hosts())
            .field("ports", &self.config.get_ports())
            .field("user", &self.config.get_user())
            .field("dbname", &self.config.get_dbname())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Settings {
    /// Parses `url`; `password`, when given, replaces any the URL holds. With
    /// `sslmode=require` every connection is TLS, and the server's certificate must chain to a
    /// certificate of `ca_file` (PEM), or of the system's trust store when it is `None`, and
    /// name the host connected to (what libpq calls `verify-full`). Other modes connect without
    /// TLS: Stowage never sends the password over a connection whose server it has not
    /// verified, and never silently falls back from TLS to plain TCP.
    pub fn new(url: &str, password: Option<&str>, ca_file: Option<&Path>) -> std::result::Result<Settings, String> {
        let mut config = parse_url(url)?;
        if let Some(p) = password {
            config.password(p);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("stowage");
        }
        // A dead server or a cut network is noticed by the kernel, not a hung query: within
        // about a minute whether the connection was idle, waiting for an answer (keepalive
        // probes: 30 s idle, then 3 unanswered 10 s apart) or sending (unacknowledged data
        // for 60 s). The server notices a dead replica as soon, rather than after the kernel's
        // two hours, so that the write lock or a session lock it held is not held that long.
        // A query that is merely slow is not cut: the server's kernel answers the probes.
        config
            .keepalives(true)
            .keepalives_idle(KEEPALIVE_IDLE)
            .keepalives_interval(KEEPALIVE_INTERVAL)
            .keepalives_retries(KEEPALIVE_RETRIES)
            .tcp_user_timeout(TCP_USER_TIMEOUT);
        let mut options = config.get_options().map(str::to_owned).unwrap_or_default();
        options.push_str(&format!(
            " -c tcp_keepalives_idle={} -c tcp_keepalives_interval={} -c tcp_keepalives_count={} \
             -c tcp_user_timeout={}",
            KEEPALIVE_IDLE.as_secs(),
            KEEPALIVE_INTERVAL.as_secs(),
            KEEPALIVE_RETRIES,
            TCP_USER_TIMEOUT.as_millis()
        ));
        config.options(options.trim_start());
        let tls = match config.get_ssl_mode() {
            SslMode::Require => Some(tls_connector(ca_file)?),
            _ if ca_file.is_some() => {
                return Err("catalog.tls_ca_file is set but catalog.url does not say sslmode=require".into());
            }
            _ => None,
        };
        Ok(Settings { config, tls })
    }

    /// A new connection. Errors say where it tried, never with the password.
    pub fn connect(&self) -> Result<postgres::Client> {
        let connected = match &self.tls {
            Some(tls) => self.config.connect(tls.clone()),
            None => self.config.connect(postgres::NoTls),
        };
        connected.map_err(|e| {
            let e = crate::catalog::db::Error::from(e);
            tracing::error!(error = %e, target = ?self, "catalog: cannot connect to PostgreSQL");
            e.into()
        })
    }

    /// A new catalog connection for a catalog thread; `read_only` for a reader.
    pub fn open(&self, read_only: bool) -> Result<Connection> {
        let mut client = self.connect()?;
        // Catalog times are unix seconds everywhere; nothing depends on the session's zone, but
        // a fixed one keeps any `timestamptz` text the same on every replica.
        client
            .batch_execute("SET TIME ZONE 'UTC'")
            .map_err(crate::catalog::db::Error::from)?;
        if read_only {
            client
                .batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
                .map_err(crate::catalog::db::Error::from)?;
        } else {
            // The writer plans every execution: a large Spack spec grows tables within one
            // transaction, past what a generic plan cached while they were small can serve
            // (docs/postgres.md, "Plans"). Readers keep the default, which caches plans for
            // their hot lookups.
            client
                .batch_execute("SET plan_cache_mode = force_custom_plan")
                .map_err(crate::catalog::db::Error::from)?;
        }
        Ok(Connection::from(client))
    }
}

/// Parses a connection URL, saying what to write instead of libpq's `sslmode` values that the
/// driver does not know (`verify-full` is what `require` does here).
pub fn parse_url(url: &str) -> std::result::Result<postgres::Config, String> {
    url.parse().map_err(|e: postgres::Error| {
        if ["verify-full", "verify-ca", "allow"]
            .iter()
            .any(|m| url.contains(&format!("sslmode={m}")))
        {
            return "catalog.url: sslmode may be disable, prefer or require; require checks the server's \
                    certificate and host name (libpq's verify-full), against catalog.tls_ca_file if set"
                .to_owned();
        }
        format!("catalog.url is not a PostgreSQL connection URL: {e}")
    })
}

/// The TLS client of `sslmode=require`: the server's certificate must chain to one of
/// `ca_file` (PEM), or of the system's trust store, and name the host.
fn tls_connector(ca_file: Option<&Path>) -> std::result::Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(file) => {
            let certs = CertificateDer::pem_file_iter(file)
                .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| format!("catalog.tls_ca_file {}: {e}", file.display()))?;
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("catalog.tls_ca_file {}: {e}", file.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("catalog.tls_ca_file {}: no certificate in it", file.display()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(format!(
                    "catalog.url says sslmode=require, but the system's trust store has no usable certificate \
                     ({} errors); set catalog.tls_ca_file",
                    found.errors.len()
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Applies the migrations the database lacks, under [`MIGRATE_LOCK`]; returns the version
/// found and the versions applied. Blocking.
pub fn migrate(settings: &Settings) -> Result<(i64, Vec<i64>)> {
    let mut client = settings.connect()?;
    let db = |e: postgres::Error| crate::error::Error::from(crate::catalog::db::Error::from(e));
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATE_LOCK])
        .map_err(db)?;
    let outcome = (|| -> Result<(i64, Vec<i64>)> {
        client
            .batch_execute(
                "SET client_min_messages = warning;
                 CREATE TABLE IF NOT EXISTS stowage_schema (
                     id      BIGINT PRIMARY KEY CHECK (id = 1),
                     version BIGINT NOT NULL
                 )",
            )
            .map_err(db)?;
        let from: i64 = client
            .query_opt("SELECT version FROM stowage_schema WHERE id = 1", &[])
            .map_err(db)?
            .map(|r| r.get(0))
            .unwrap_or(0);
        let newest = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
        if from > newest {
            return Err(Internal::Other("catalog schema is newer than this stowage binary").into());
        }
        if from == 0 {
            let tables: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() AND tablename = 'repositories'",
                    &[],
                )
                .map_err(db)?
                .get(0);
            if tables > 0 {
                return Err(Internal::Other(
                    "the PostgreSQL database holds catalog tables but no schema version: not a database stowage created",
                )
                .into());
            }
        }
        let mut applied = Vec::new();
        for &(version, sql) in MIGRATIONS.iter().filter(|m| m.0 > from) {
            let mut tx = client.transaction().map_err(db)?;
            // Replicas of the previous version may be writing: their transactions and this
            // one's DDL then take their locks one after the other, never in a cycle.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])
                .map_err(db)?;
            tx.batch_execute(sql).map_err(db)?;
            tx.execute(
                "INSERT INTO stowage_schema (id, version) VALUES (1, $1)
                 ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                &[&version],
            )
            .map_err(db)?;
            tx.commit().map_err(db)?;
            tracing::info!(version, "catalog migrated (PostgreSQL)");
            applied.push(version);
        }
        Ok((from, applied))
    })();
    // The session ends with the client, which releases the lock whatever happened.
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATE_LOCK]);
    outcome
}

/// The first line of the migration that brings `version`, for `stowage migrate`.
pub fn migration_title(version: i64) -> String {
    MIGRATIONS
        .iter()
        .find(|m| m.0 == version)
        .and_then(|m| m.1.lines().next())
        .unwrap_or_default()
        .trim_start_matches("--")
        .trim()
        .to_owned()
}

/// The schema version this binary brings a PostgreSQL catalog to.
pub fn schema_version() -> i64 {
    MIGRATIONS.last().map(|m| m.0).unwrap_or(0)
}

/// Holds [`SINGLE_NODE_LOCK`] until dropped: a thread owns the connection that took it (a
/// synchronous client must not be dropped on an async worker), checks it, and closes it when
/// the holder goes.
pub struct SingleNode {
    _stop: std::sync::mpsc::Sender<()>,
}

/// How often the single-node lock's connection is checked.
const SINGLE_NODE_CHECK_EVERY: Duration = Duration::from_secs(2);
/// How long that check may take before the connection counts as lost.
const SINGLE_NODE_CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// Between two attempts to take the lock again while the database cannot be reached.
const SINGLE_NODE_RETRY_EVERY: Duration = Duration::from_secs(1);

/// Takes [`SINGLE_NODE_LOCK`] on a connection of its own, and keeps it: the lock lasts as long
/// as that session, so a thread checks the session every [`SINGLE_NODE_CHECK_EVERY`]. When
/// the session is gone (PostgreSQL restarted, a failover, the connection cut or terminated),
/// the lock went with it, and the thread takes it again on a new connection, retrying while the
/// database cannot be reached (every catalog request fails meanwhile anyway). If another
/// process took it in between, this one is no longer the catalog's only server: `on_lost` is
/// called with the reason, and must stop the process (`serve` exits). A session of this
/// process's own that PostgreSQL has not yet seen die still holds the lock: it is recognised
/// by its backend's pid and start time and terminated, never waited out.
///
/// Refuses, with the reason, when another process holds the lock at the start. Blocking.
pub fn hold_single_node(settings: &Settings, on_lost: fn(&str)) -> std::result::Result<SingleNode, String> {
    let Some(held) = take_single_node(settings).map_err(|e| e.to_string())? else {
        return Err(SINGLE_NODE_REFUSED.into());
    };
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let settings = settings.clone();
    std::thread::Builder::new()
        .name("catalog-single-node".into())
        .spawn(move || keep_single_node(held, &settings, &stopped, on_lost))
        .map_err(|e| e.to_string())?;
    Ok(SingleNode { _stop: stop })
}

const SINGLE_NODE_REFUSED: &str = "another stowage process uses this PostgreSQL catalog with the fs blob \
    backend, which keeps blobs and uploads on one machine's disk: run one process only, or move the blobs \
    to S3 (storage.backend = \"s3\") to run several replicas";

/// The session holding the single-node lock, and how to tell it from a later one.
struct Held {
    client: postgres::Client,
    /// Its backend's pid and start time (pids are reused; the pair is not).
    backend: (i32, String),
}

/// Checks the session of `held` until `stopped` says the holder went; takes the lock again
/// when the session is lost (see [`hold_single_node`]).
fn keep_single_node(mut held: Held, settings: &Settings, stopped: &std::sync::mpsc::Receiver<()>, on_lost: fn(&str)) {
    use std::sync::mpsc::RecvTimeoutError;
    let wait = |d: Duration| matches!(stopped.recv_timeout(d), Err(RecvTimeoutError::Timeout));
    while wait(SINGLE_NODE_CHECK_EVERY) {
        let Err(e) = held.client.is_valid(SINGLE_NODE_CHECK_TIMEOUT) else {
            continue;
        };
        tracing::warn!(
            error = %crate::catalog::db::Error::from(e),
            "catalog: lost the session holding the single-node lock; taking the lock again"
        );
        let previous = held.backend.clone();
        let mut reported = false;
        loop {
            match take_single_node(settings) {
                Ok(Some(again)) => {
                    tracing::info!("catalog: the single-node lock is held again");
                    held = again;
                    break;
                }
                Ok(None) => match end_own_stale_session(settings, &previous) {
                    // Tried again after the pause below.
                    Ok(true) => {}
                    Ok(false) => {
                        on_lost(SINGLE_NODE_REFUSED);
                        return;
                    }
                    Err(e) if !reported => {
                        reported = true;
                        tracing::warn!(error = %e, "catalog: cannot see who holds the single-node lock; retrying");
                    }
                    Err(_) => {}
                },
                // `connect` has logged why.
                Err(_) => {}
            }
            if !wait(SINGLE_NODE_RETRY_EVERY) {
                return;
            }
        }
    }
}

/// Whether to try for the single-node lock again after another session was found holding it:
/// `true` when that session is `previous`, this process's own earlier one that PostgreSQL has
/// not yet seen die (it is terminated here), or when nobody holds the lock any more; `false`
/// when another process does.
fn end_own_stale_session(settings: &Settings, previous: &(i32, String)) -> Result<bool> {
    let mut client = settings.connect()?;
    let holder = client
        .query_opt(
            "SELECT l.pid, a.backend_start::text
               FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
              WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND ((l.classid::int8 << 32) | l.objid::int8) = $1",
            &[&SINGLE_NODE_LOCK],
        )
        .map_err(crate::catalog::db::Error::from)?;
    let Some(row) = holder else {
        // Released since the attempt: the next one takes it.
        return Ok(true);
    };
    let holder: (i32, Option<String>) = (row.get(0), row.get(1));
    if holder.0 != previous.0 || holder.1.as_deref() != Some(previous.1.as_str()) {
        return Ok(false);
    }
    tracing::warn!(
        pid = holder.0,
        "catalog: ending this process's earlier session, which still holds the single-node lock"
    );
    client
        .execute("SELECT pg_terminate_backend($1, 5000)", &[&holder.0])
        .map_err(crate::catalog::db::Error::from)?;
    Ok(true)
}

/// One attempt at the lock, on a new connection: `None` when another session holds it.
fn take_single_node(settings: &Settings) -> Result<Option<Held>> {
    let mut client = settings.connect()?;
    let row = client
        .query_one(
            "SELECT pg_try_advisory_lock($1), pg_backend_pid(),
                    (SELECT backend_start::text FROM pg_stat_activity WHERE pid = pg_backend_pid())",
            &[&SINGLE_NODE_LOCK],
        )
        .map_err(crate::catalog::db::Error::from)?;
    if !row.get::<_, bool>(0) {
        return Ok(None);
    }
    let backend = (row.get(1), row.get::<_, Option<String>>(2).unwrap_or_default());
    Ok(Some(Held { client, backend }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_connection_detects_a_dead_peer_within_a_minute_on_both_ends() {
        let settings = Settings::new(
            "postgres://stowage@db.example:5432/stowage?options=-c%20work_mem%3D8MB",
            None,
            None,
        )
        .expect("a valid URL");
        let c = &settings.config;
        assert!(c.get_keepalives());
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(30));
        assert_eq!(c.get_keepalives_interval(), Some(Duration::from_secs(10)));
        assert_eq!(c.get_keepalives_retries(), Some(3));
        assert_eq!(c.get_tcp_user_timeout(), Some(&Duration::from_secs(60)));
        // The server's side of the same sockets, after the URL's own options.
        assert_eq!(
            c.get_options(),
            Some(
                "-c work_mem=8MB -c tcp_keepalives_idle=30 -c tcp_keepalives_interval=10 -c tcp_keepalives_count=3 \
                 -c tcp_user_timeout=60000"
            )
        );
        assert_eq!(c.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
        assert_eq!(c.get_application_name(), Some("stowage"));
    }
}

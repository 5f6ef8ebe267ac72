//! The catalog database the tests run against.
//!
//! Every test runs against the catalog `STOWAGE_TEST_CATALOG` names: `sqlite` (the default:
//! `catalog.db` in the server's data directory) or `postgres`. For `postgres` the harness starts
//! one PostgreSQL server per test binary ([`super::postgres::shared`]) and gives each
//! `TestServer` a database of its own ([`Database`]), which its restarts and the `stowage` CLI
//! run on its data directory (`run_cli`, `TestServer::stowage_command`) use too. A missing
//! PostgreSQL is a test failure, never a skip.

use std::collections::BTreeMap;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::postgres::{ROLE, shared};

/// The catalog engine a test server uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Catalog {
    Sqlite,
    Postgres,
}

/// The catalog selected by `STOWAGE_TEST_CATALOG` (`sqlite` unless it says `postgres`).
pub fn catalog() -> Catalog {
    match std::env::var("STOWAGE_TEST_CATALOG").as_deref() {
        Ok("postgres") => Catalog::Postgres,
        Ok("sqlite") | Ok("") | Err(_) => Catalog::Sqlite,
        Ok(other) => panic!("STOWAGE_TEST_CATALOG must be sqlite or postgres, not {other:?}"),
    }
}

/// The catalog environment of each live server's data directory, for CLI runs that know only
/// the directory (`run_cli`).
static BY_DATA_DIR: Mutex<BTreeMap<PathBuf, Vec<(String, String)>>> = Mutex::new(BTreeMap::new());

/// The catalog environment (`STOWAGE_CATALOG__*`) of the server whose data directory is
/// `data_dir`: empty for a SQLite catalog, or a directory no live `TestServer` owns.
pub fn envs_for(data_dir: &Path) -> Vec<(String, String)> {
    BY_DATA_DIR
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(data_dir)
        .cloned()
        .unwrap_or_default()
}

/// How long the sessions of a stopped server may take to end.
const SESSIONS_END: Duration = Duration::from_secs(30);

/// A database of one `TestServer`'s own on the shared PostgreSQL server, owned by
/// [`ROLE`]; dropped (with any session still on it) when this is.
pub struct Database {
    name: String,
    data_dir: PathBuf,
    envs: Vec<(String, String)>,
}

impl Database {
    /// Creates a fresh database for the server whose data directory is `data_dir`; the role's
    /// password goes in a file of mode 0600 in `secrets` (which must outlive the database's
    /// use, and is best not a directory the test looks into).
    pub fn create(data_dir: &Path, secrets: &Path) -> Database {
        static N: AtomicUsize = AtomicUsize::new(0);
        let pg = shared();
        let name = format!("stowage_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let sql = format!("CREATE DATABASE {name} OWNER {ROLE}");
        pg.admin(|c| c.batch_execute(&sql))
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let password_file = write_password_file(secrets, &name);
        let envs = vec![
            (
                "STOWAGE_CATALOG__URL".to_string(),
                format!("postgres://{ROLE}@127.0.0.1:{}/{name}?sslmode=require", pg.port),
            ),
            (
                "STOWAGE_CATALOG__TLS_CA_FILE".to_string(),
                pg.ca_file.to_string_lossy().into_owned(),
            ),
            (
                "STOWAGE_CATALOG__PASSWORD_FILE".to_string(),
                password_file.to_string_lossy().into_owned(),
            ),
        ];
        BY_DATA_DIR
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(data_dir.to_owned(), envs.clone());
        Database {
            name,
            data_dir: data_dir.to_owned(),
            envs,
        }
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The environment that points another `stowage` process (a second replica) at this
    /// database, with the role's password in a file of its own (mode 0600) in `secrets`, so that
    /// the process does not depend on the first server's directory.
    pub fn envs_with_password_in(&self, secrets: &Path) -> Vec<(String, String)> {
        let password_file = write_password_file(secrets, &self.name);
        let mut envs = self.envs.clone();
        for (k, v) in &mut envs {
            if k == "STOWAGE_CATALOG__PASSWORD_FILE" {
                *v = password_file.to_string_lossy().into_owned();
            }
        }
        envs
    }

    /// The environment that points `stowage` at this database.
    pub fn envs(&self) -> &[(String, String)] {
        &self.envs
    }

    /// Ends every session still on the database and waits until they are gone: for after its
    /// server died, whose backends end only when they notice (the fs backend's single-node
    /// lock, held by one of them, would refuse the next server or CLI run until then).
    pub fn end_sessions(&self) {
        let name = self.name.clone();
        let deadline = Instant::now() + SESSIONS_END;
        loop {
            let left = shared()
                .admin(|c| {
                    c.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                         WHERE datname = $1 AND pid <> pg_backend_pid()",
                        &[&name],
                    )
                })
                .unwrap_or_else(|e| panic!("end the sessions on {name}: {e}"));
            if left == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sessions on {name} did not end within {SESSIONS_END:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Another server's use of a [`Database`] (a second replica): while it lives, CLI runs on that
/// server's data directory (`run_cli`) use the database too. Dropped before the database is.
pub struct Sharing {
    data_dir: PathBuf,
}

impl Database {
    /// Lets the server whose data directory is `data_dir` use this database too.
    pub fn share(&self, data_dir: &Path) -> Sharing {
        BY_DATA_DIR
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(data_dir.to_owned(), self.envs.clone());
        Sharing {
            data_dir: data_dir.to_owned(),
        }
    }
}

impl Drop for Sharing {
    fn drop(&mut self) {
        BY_DATA_DIR
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.data_dir);
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        BY_DATA_DIR
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.data_dir);
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(e) = shared().admin(|c| c.batch_execute(&sql)) {
            // Not worth a panic (which, during an unwinding one, would abort): the server and
            // its databases go when the test binary exits.
            eprintln!("{sql}: {e}");
        }
    }
}

/// Writes [`ROLE`]'s password to `<secrets>/<database>.password`, mode 0600; returns its path.
fn write_password_file(secrets: &Path, database: &str) -> PathBuf {
    use std::io::Write as _;
    let password_file = secrets.join(format!("{database}.password"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&password_file)
        .unwrap_or_else(|e| panic!("create {}: {e}", password_file.display()));
    writeln!(file, "{}", shared().password).expect("write the database password");
    password_file
}

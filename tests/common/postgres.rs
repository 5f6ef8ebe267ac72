//! A throwaway PostgreSQL server for the tests: Debian's `postgresql-15`, installed by
//! `scripts/test`; `$STOWAGE_TEST_PG_BIN` names another directory of server binaries.
//!
//! [`Postgres::start`] runs one on a Unix socket only, in a private temporary directory (the
//! schema test, `tests/pg_schema.rs`, owns one per test). [`Postgres::start_tcp`] also listens on
//! 127.0.0.1 with password (SCRAM) authentication for a login role over TLS only, the way
//! Stowage connects to a real server across a network: its certificate is signed by a
//! certificate authority of the test's own ([`Postgres::ca_file`]), and a connection without
//! TLS finds no `pg_hba.conf` entry. [`shared`] is the one such server of a test binary, started
//! on first use, that the `postgres` catalog of the integration tests (`super::catalog`) runs
//! on, so every test on that catalog runs over TLS with the certificate checked.
//!
//! Both have an ICU en-US default collation (so byte order must come from the columns'
//! `COLLATE "C"`), run in a time zone far from UTC (so that a local time shows), and skip
//! durability (`fsync`, `synchronous_commit`, `full_page_writes` off). A missing PostgreSQL is
//! a test failure, never a skip.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

/// A PostgreSQL server run as a child process of the test, listening on a Unix socket in its
/// private (0700) temporary directory (and, from [`Postgres::start_tcp`], on 127.0.0.1);
/// stopped and removed on drop.
///
/// The postmaster is `postgres` itself (not a `pg_ctl` daemon that detaches into its own
/// session), so it stays in the test's process group, is killed in [`Drop`] (which also runs on
/// an unwinding panic), and, should the thread that started it end or the test process die
/// without unwinding (SIGKILL, a CI timeout), gets SIGKILL from the kernel
/// (`PR_SET_PDEATHSIG`); its backends exit when they see the postmaster gone. Every wait is
/// bounded: start-up ([`STARTUP`]), connecting ([`CONNECT_TIMEOUT`]), and, on the socket-only
/// server, each statement (`statement_timeout`, `lock_timeout`).
pub struct Postgres {
    bin: PathBuf,
    /// Run the server's tools as the `postgres` user (initdb and postgres refuse root).
    user: Option<(u32, u32)>,
    server: Option<std::process::Child>,
    dir: Option<tempfile::TempDir>,
    /// The port: on 127.0.0.1 when `tcp`, and always the name of the socket file
    /// (`.s.PGSQL.<port>`).
    port: u16,
    tcp: bool,
}

/// The server certificate's file in the data directory, and its key's.
const SERVER_CERT: &str = "server.crt";
const SERVER_KEY: &str = "server.key";
/// The test certificate authority's certificate, in the server's directory.
const CA_CERT: &str = "ca.crt";

/// How long the server may take to accept connections.
pub const STARTUP: Duration = Duration::from_secs(60);
/// How long one connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The port of the socket-only server: it only names the socket file (`.s.PGSQL.<port>`).
const SOCKET_PORT: u16 = 5432;
/// Most connections the TCP server accepts: each Stowage server holds about a dozen (a writer,
/// eight readers, a generation poller, the fs backend's single-node lock, a migration or CLI
/// connection), and a test binary runs many servers at once.
const TCP_MAX_CONNECTIONS: u32 = 1000;
/// How many free ports [`Postgres::start_tcp`] tries when another process takes the one it
/// picked before the server binds it.
const PORT_ATTEMPTS: usize = 5;

/// The directory of the PostgreSQL server binaries (fails the test when they are missing).
pub fn pg_bin() -> PathBuf {
    let bin = std::env::var_os("STOWAGE_TEST_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"));
    assert!(
        bin.join("initdb").is_file() && bin.join("postgres").is_file(),
        "PostgreSQL server binaries not found in {} (scripts/test installs Debian's postgresql-15; \
         STOWAGE_TEST_PG_BIN names another directory)",
        bin.display()
    );
    bin
}

/// The `postgres` system user's uid (`-u`) or gid (`-g`).
pub fn id_of(flag: &str) -> u32 {
    let out = Command::new("id").args([flag, "postgres"]).output().unwrap();
    assert!(
        out.status.success(),
        "no `postgres` system user (Debian's postgresql package creates it)"
    );
    String::from_utf8(out.stdout).unwrap().trim().parse().unwrap()
}

/// Removes the directories of servers whose test was killed without unwinding (the server died
/// with it, see [`Postgres`], but its directory stayed): a `stowage-pg-*` directory older than
/// [`STALE`] whose postmaster (if it wrote its pid) is gone.
pub fn sweep_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with("stowage-pg-") {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > STALE));
        let pid: Option<i32> = std::fs::read_to_string(path.join("data/postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse().ok()));
        // SAFETY: signal 0 only checks that the process exists.
        let alive = pid.is_some_and(|pid| unsafe { libc::kill(pid, 0) } == 0);
        if old && !alive {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// How old a server directory must be before [`sweep_stale`] considers it (another test of the
/// same run may be starting its server in a directory that has no pid file yet).
const STALE: Duration = Duration::from_secs(600);

/// A free port on 127.0.0.1 (free when asked: the server binds it a moment later).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("find a free port")
        .port()
}

impl Postgres {
    /// A server on a Unix socket only, with per-statement time limits (`statement_timeout`
    /// 60 s, `lock_timeout` 10 s). Connect as the superuser with [`Postgres::client`].
    pub fn start() -> Postgres {
        let mut pg = Postgres::init(false);
        pg.launch(&[
            "-c",
            "listen_addresses=",
            "-c",
            "statement_timeout=60s",
            "-c",
            "lock_timeout=10s",
        ])
        .unwrap_or_else(|log| panic!("PostgreSQL exited:\n{log}"));
        pg
    }

    /// A server that also listens on 127.0.0.1 (a free port: [`Postgres::port`]), where `role`
    /// logs in with `password` (SCRAM-SHA-256), over TLS only, with a certificate for
    /// 127.0.0.1 that [`Postgres::ca_file`] checks (the Unix socket still trusts the superuser).
    /// `role` may create databases. No statement or lock time limit: Stowage's catalog writer
    /// waits on an advisory lock for as long as another writer holds it. Up to
    /// [`TCP_MAX_CONNECTIONS`] connections.
    pub fn start_tcp(role: &str, password: &str) -> Postgres {
        assert!(
            role.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') && !password.contains('\''),
            "role {role:?} or password not fit to be spliced into SQL"
        );
        let mut pg = Postgres::init(true);
        let ca = pg.serve_tls(&["127.0.0.1"]);
        let max_connections = format!("max_connections={TCP_MAX_CONNECTIONS}");
        let tls = [
            "-c",
            "ssl=on",
            "-c",
            &format!("ssl_cert_file={SERVER_CERT}"),
            "-c",
            &format!("ssl_key_file={SERVER_KEY}"),
        ];
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut settings = vec!["-c", "listen_addresses=127.0.0.1", "-c", &max_connections];
            settings.extend_from_slice(&tls);
            match pg.launch(&settings) {
                Ok(()) => break,
                // Someone took the port between `free_port` and the server binding it.
                Err(log) if attempt < PORT_ATTEMPTS && log.contains("could not bind") => {
                    pg.port = free_port();
                }
                Err(log) => panic!("PostgreSQL exited:\n{log}"),
            }
        }
        let mut admin = pg.client();
        admin
            .batch_execute(&format!("CREATE ROLE {role} LOGIN CREATEDB PASSWORD '{password}'"))
            .unwrap_or_else(|e| panic!("create role {role}: {e}"));
        // The role's way in, as Stowage takes it: TCP, and only with the password.
        let mut config = ::postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(pg.port)
            .user(role)
            .dbname("postgres")
            .connect_timeout(CONNECT_TIMEOUT);
        assert!(
            config.connect(tls_client(&ca)).is_err(),
            "{role} logs in over TCP without a password"
        );
        config.password(password);
        assert!(
            config.connect(::postgres::NoTls).is_err(),
            "{role} logs in over TCP without TLS"
        );
        config
            .connect(tls_client(&ca))
            .unwrap_or_else(|e| panic!("{role} cannot log in over TLS with its password: {e}"));
        pg
    }

    /// Gives the cluster a certificate for `names` signed by a new test certificate authority
    /// (whose certificate goes to [`Postgres::ca_file`]), and makes every TCP login need TLS.
    /// Returns the authority's certificate (PEM). Before [`Postgres::launch`].
    fn serve_tls(&self, names: &[&str]) -> String {
        let (ca, cert, key) = test_certificates(names);
        let data = PathBuf::from(self.data());
        std::fs::write(data.join(SERVER_CERT), cert).expect("write the server certificate");
        let key_path = data.join(SERVER_KEY);
        std::fs::write(&key_path, key).expect("write the server key");
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).expect("chmod the key");
        if let Some((uid, gid)) = self.user {
            for file in [SERVER_CERT, SERVER_KEY] {
                std::os::unix::fs::chown(data.join(file), Some(uid), Some(gid)).expect("chown");
            }
        }
        std::fs::write(self.ca_file(), &ca).expect("write the CA certificate");
        // initdb's `host` lines (TCP with or without TLS) become `hostssl` (TLS only).
        let hba = data.join("pg_hba.conf");
        let rules = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
        let rules: String = rules
            .lines()
            .map(|line| match line.strip_prefix("host ") {
                Some(rest) => format!("hostssl {rest}\n"),
                None => format!("{line}\n"),
            })
            .collect();
        assert!(rules.contains("hostssl "), "initdb wrote no host rule to make TLS-only");
        std::fs::write(&hba, rules).expect("write pg_hba.conf");
        ca
    }

    /// The certificate (PEM) of the authority that signed a TCP server's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir().join(CA_CERT)
    }

    /// A fresh cluster (initdb) in a new private directory; not started yet.
    fn init(tcp: bool) -> Postgres {
        let bin = pg_bin();
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let user = root.then(|| (id_of("-u"), id_of("-g")));
        // The `postgres` user must reach the directory: as root, under /tmp whatever TMPDIR says
        // (a root-only TMPDIR would stop it at the parent).
        let parent = if root {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        sweep_stale(&parent);
        let dir = tempfile::Builder::new()
            .prefix("stowage-pg-")
            .tempdir_in(parent)
            .unwrap();
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let port = if tcp { free_port() } else { SOCKET_PORT };
        // The longest the socket's name can be (`.s.PGSQL.65535`).
        let socket = dir.path().join(".s.PGSQL.65535");
        assert!(
            socket.as_os_str().len() < 100,
            "{} is too long for a Unix socket path (set a shorter TMPDIR)",
            socket.display()
        );
        let pg = Postgres {
            bin,
            user,
            server: None,
            dir: Some(dir),
            port,
            tcp,
        };
        let data = pg.data();
        // An ICU default collation in which 'a' sorts before 'B': the byte order the catalog
        // relies on must come from the columns' COLLATE "C", not from the database's locale.
        let host_auth = if tcp { "scram-sha-256" } else { "trust" };
        let out = pg
            .command("initdb")
            .args(["-D", &data, "-U", "postgres", "-E", "UTF8"])
            .args(["--auth-local=trust", &format!("--auth-host={host_auth}")])
            .args(["--locale=C.UTF-8", "--locale-provider=icu", "--icu-locale=en-US"])
            .args(["--no-sync", "--no-instructions"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        pg
    }

    /// Starts the postmaster with `settings` added to the common ones and waits until it accepts
    /// connections; `Err` with the server's log when it exits first.
    fn launch(&mut self, settings: &[&str]) -> Result<(), String> {
        let data = self.data();
        let log_path = self.dir().join("server.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let socket_dir = self.dir().to_str().unwrap().to_owned();
        let mut cmd = self.command("postgres");
        cmd.args(["-D", &data, "-p", &self.port.to_string(), "-k", &socket_dir])
            .args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ])
            // Far from UTC (+13:45), so that a time taken in local time shows.
            .args(["-c", "TimeZone=Pacific/Chatham"])
            .args(settings)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: prctl is async-signal-safe; the closure allocates nothing. It runs after the
        // child took the `postgres` uid (a credential change would clear the setting).
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self.server = Some(cmd.spawn().unwrap());

        // Ready once it accepts a connection on the socket; a server that exits fails at once.
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Some(status) = self.server.as_mut().unwrap().try_wait().unwrap() {
                self.server = None;
                return Err(format!(
                    "({status}) {}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                ));
            }
            if self.config().connect(::postgres::NoTls).is_ok() {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not accept connections within {STARTUP:?}:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's private directory (its socket, `data/`, `server.log`).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    fn data(&self) -> String {
        self.dir().join("data").to_str().unwrap().to_owned()
    }

    /// The port: on 127.0.0.1 for a [`Postgres::start_tcp`] server; the socket's name always.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether it listens on 127.0.0.1.
    pub fn tcp(&self) -> bool {
        self.tcp
    }

    /// A server tool, run as the `postgres` user when the test runs as root (std drops root's
    /// supplementary groups along with the uid).
    pub fn command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(tool));
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        cmd.current_dir(self.dir());
        cmd
    }

    /// The superuser's connection settings: on the Unix socket, to the `postgres` database.
    pub fn config(&self) -> ::postgres::Config {
        let mut config = ::postgres::Config::new();
        config
            .host_path(self.dir())
            .port(self.port)
            .user("postgres")
            .dbname("postgres")
            .connect_timeout(CONNECT_TIMEOUT);
        config
    }

    /// A superuser connection (not from inside an async runtime: the synchronous client runs
    /// one of its own).
    pub fn client(&self) -> ::postgres::Client {
        let mut client = self.config().connect(::postgres::NoTls).unwrap();
        // The check the ICU locale is there for: without COLLATE "C", 'a' < 'B'.
        let ordered: bool = client.query_one("SELECT 'a' < 'B'", &[]).unwrap().get(0);
        assert!(ordered, "the database's default collation is byte order");
        client
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            // SIGQUIT: immediate shutdown (the postmaster stops its backends, then exits);
            // SIGKILL if it has not within a few seconds.
            // SAFETY: kill has no memory preconditions; the pid is our own unreaped child.
            unsafe { libc::kill(server.id() as libc::pid_t, libc::SIGQUIT) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(server.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = server.kill();
            let _ = server.wait();
        }
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
    }
}

// ------------------------------------------------------------------------------------------
// The test binary's shared server.
// ------------------------------------------------------------------------------------------

/// The login role Stowage uses on the shared server.
pub const ROLE: &str = "stowage";

/// A new certificate authority and a server certificate it signed for `names` (host names or
/// IP addresses): the authority's certificate, the server's, and the server's key, all PEM.
pub fn test_certificates(names: &[&str]) -> (String, String, String) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Stowage test CA");
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().expect("CA key"))
        .expect("CA certificate");
    let key = rcgen::KeyPair::generate().expect("server key");
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let cert = rcgen::CertificateParams::new(names)
        .expect("server certificate parameters")
        .signed_by(&key, &*ca)
        .expect("server certificate");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// A TLS client for the driver that trusts only `ca_pem` and checks the host name.
pub fn tls_client(ca_pem: &str) -> tokio_postgres_rustls::MakeRustlsConnect {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("CA certificate");
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_postgres_rustls::MakeRustlsConnect::new(config)
}

/// The shared server, as its users need it.
pub struct Shared {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The certificate authority that signed its certificate (PEM file): what
    /// `catalog.tls_ca_file` names for it.
    pub ca_file: PathBuf,
    /// [`ROLE`]'s password.
    pub password: String,
    /// The superuser's connection settings (Unix socket, trusted).
    pub admin: ::postgres::Config,
}

impl Shared {
    /// Runs `f` on a superuser connection, on a thread of its own (so that async tests may
    /// call it: the synchronous client runs a runtime of its own); its error as text.
    pub fn admin<T: Send>(
        &self,
        f: impl FnOnce(&mut ::postgres::Client) -> Result<T, ::postgres::Error> + Send,
    ) -> Result<T, String> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let mut client = self
                        .admin
                        .connect(::postgres::NoTls)
                        .map_err(|e| format!("connect to the PostgreSQL test server: {e}"))?;
                    f(&mut client).map_err(|e| match e.as_db_error() {
                        Some(db) => format!("{}: {}", db.code().code(), db.message()),
                        None => e.to_string(),
                    })
                })
                .join()
                .unwrap_or_else(|_| Err("the PostgreSQL admin thread panicked".into()))
        })
    }
}

/// The server stopped (and its directory removed) when the test binary exits.
static GUARD: Mutex<Option<Postgres>> = Mutex::new(None);

extern "C" fn stop_shared() {
    // Never block an exiting process on a lock a panicking thread may hold.
    if let Ok(mut guard) = GUARD.try_lock() {
        guard.take();
    }
}

/// The PostgreSQL server shared by this test binary ([`Postgres::start_tcp`] for [`ROLE`]),
/// started on first use; panics (each time it is asked) when it could not start.
pub fn shared() -> &'static Shared {
    static SHARED: OnceLock<Result<Shared, String>> = OnceLock::new();
    match SHARED.get_or_init(start_shared) {
        Ok(shared) => shared,
        Err(why) => panic!("PostgreSQL test server: {why}"),
    }
}

/// Starts the shared server from a thread that lives as long as the test binary: the kernel
/// kills the postmaster when the thread that started it ends (`PR_SET_PDEATHSIG`), so not from
/// the test's own thread. Stopped at exit by an `atexit` handler (a static is never dropped).
fn start_shared() -> Result<Shared, String> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("postgres-test-server".into())
        .spawn(move || {
            let started = std::panic::catch_unwind(|| {
                let mut secret = [0u8; 16];
                use std::io::Read as _;
                std::fs::File::open("/dev/urandom")
                    .and_then(|mut f| f.read_exact(&mut secret))
                    .expect("read /dev/urandom");
                let password = hex::encode(secret);
                let pg = Postgres::start_tcp(ROLE, &password);
                let shared = Shared {
                    port: pg.port(),
                    ca_file: pg.ca_file(),
                    password,
                    admin: pg.config(),
                };
                (pg, shared)
            });
            match started {
                Ok((pg, shared)) => {
                    *GUARD.lock().unwrap_or_else(|e| e.into_inner()) = Some(pg);
                    // SAFETY: registers a plain `extern "C" fn()` with the C library; called
                    // once at exit.
                    unsafe { libc::atexit(stop_shared) };
                    let _ = tx.send(Ok(shared));
                }
                Err(panic) => {
                    let why = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "start-up panicked".into());
                    let _ = tx.send(Err(why));
                    return;
                }
            }
            // This thread is the postmaster's parent for PR_SET_PDEATHSIG: keep it for the
            // process's life.
            loop {
                std::thread::park();
            }
        })
        .map_err(|e| format!("spawn its thread: {e}"))?;
    rx.recv_timeout(STARTUP + Duration::from_secs(60))
        .map_err(|_| format!("did not start within {STARTUP:?}"))?
}

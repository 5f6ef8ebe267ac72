//! The catalog engines and replicas side by side (issue #17): one run drives the same workloads,
//! with the same client code, against Stowage on a SQLite catalog (one node) and on a
//! PostgreSQL catalog with one and with three replicas, every configuration's blobs in a fresh
//! bucket of the same moto S3 server, so that only the catalog engine and the replica count vary.
//!
//! Run with `cargo bench --bench replicas`. See `benches/README.md` for what it shows and what it
//! does not (on a 2-core machine three replicas share the cores with PostgreSQL, moto and the
//! load generator: this measures what the PostgreSQL engine and replication cost, not scaling).
//!
//! Configurations, one after the other (each one's servers stopped before the next starts):
//! 0. SQLite, blobs on local disk, one node: the default deployment, for reference;
//! 1. SQLite, blobs on S3, one node;
//! 2. PostgreSQL, blobs on S3, one replica;
//! 3. PostgreSQL, blobs on S3, three replicas: three `stowage serve` processes on one database
//!    and one bucket; client connection (or pushing worker) `i` keeps to replica `i % 3`.
//! 4. PostgreSQL over TLS (`sslmode=require`, the certificate checked against a CA of the
//!    benchmark's own), blobs on S3, one replica: what TLS to the database costs.
//!
//! Workloads against each: manifest GET by tag at 64 connections and at 1 connection, blob HEAD
//! at 64 connections (each 1 s warm-up, then `REPLBENCH_RATE_SECS` measured), and
//! `REPLBENCH_IMAGES` small-image pushes by 16 workers (a ~1 KiB config and a 4 KiB layer, each
//! `POST` + `PUT ?digest=`, then the manifest `PUT` under a tag of its own). Authentication is off
//! on every server. Each row reports the rate, the errors, and the CPU seconds of the Stowage
//! processes, of PostgreSQL (the postmaster and its backends) and of moto in the measured window.
//!
//! PostgreSQL 15 (Debian's `postgresql-15`, or the server binaries in `$STOWAGE_TEST_PG_BIN`) runs
//! as a child of the benchmark in a temporary directory, on 127.0.0.1 with a SCRAM password for
//! the `stowage` role, with the server's default durability (`fsync`, `synchronous_commit` and
//! `full_page_writes` on), as SQLite's catalog runs with `synchronous=FULL`. moto is
//! `$STOWAGE_TEST_PYTHON -m moto.server` (`scripts/test` installs it).
//!
//! Knobs (environment variables; the defaults are the benchmark):
//! - `REPLBENCH_RATE_SECS`    measured seconds of each request-rate workload (default 10)
//! - `REPLBENCH_IMAGES`       small images pushed per configuration (default 500)
//! - `REPLBENCH_STOWAGE_BIN`  run this `stowage` binary instead of building the release one
//! - `REPLBENCH_STOWAGE_LOG`  `RUST_LOG` for Stowage (default `error`)

#[path = "common/harness.rs"]
#[allow(dead_code)] // each benchmark uses part of it
mod harness;

use std::fmt::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use harness::*;
use reqwest::header::{ACCEPT, CONTENT_LENGTH, LINK};
use reqwest::{Client, StatusCode};

/// The login role the Stowage servers use on the benchmark's PostgreSQL server.
const PG_ROLE: &str = "stowage";
/// The environment variable that carries the role's password to each Stowage process
/// (`catalog.password_env`).
const PG_PASSWORD_ENV: &str = "REPLBENCH_PG_PASSWORD";
/// How long PostgreSQL may take to accept connections.
const PG_STARTUP: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Settings and configurations
// ---------------------------------------------------------------------------------------------

struct Settings {
    rate_secs: Duration,
    images: usize,
    stowage_log: String,
    /// Only the configurations whose label holds one of these (comma-separated,
    /// case-insensitive); every one when unset.
    only: Option<Vec<String>>,
}

impl Settings {
    fn from_env() -> Self {
        fn num(name: &str, default: u64) -> u64 {
            match std::env::var(name) {
                Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
                Err(_) => default,
            }
        }
        let images = num("REPLBENCH_IMAGES", 500) as usize;
        assert!(images > 0, "REPLBENCH_IMAGES must be at least 1");
        Settings {
            rate_secs: Duration::from_secs(num("REPLBENCH_RATE_SECS", 10)),
            images,
            stowage_log: std::env::var("REPLBENCH_STOWAGE_LOG").unwrap_or_else(|_| "error".into()),
            only: std::env::var("REPLBENCH_CONFIGS").ok().map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_lowercase())
                    .filter(|s| !s.is_empty())
                    .collect()
            }),
        }
    }

    fn runs(&self, config: &Config) -> bool {
        let label = config.label.to_lowercase();
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|o| label.contains(o.as_str())))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Engine {
    Sqlite,
    Postgres,
}

struct Config {
    label: &'static str,
    engine: Engine,
    /// Blobs in a fresh bucket of the moto server (else on each server's local disk).
    s3: bool,
    replicas: usize,
    /// PostgreSQL over TLS (`sslmode=require`, the certificate checked).
    tls: bool,
}

const CONFIGS: [Config; 5] = [
    Config {
        label: "SQLite, local disk, 1 node",
        engine: Engine::Sqlite,
        s3: false,
        replicas: 1,
        tls: false,
    },
    Config {
        label: "SQLite, S3, 1 node",
        engine: Engine::Sqlite,
        s3: true,
        replicas: 1,
        tls: false,
    },
    Config {
        label: "PostgreSQL, S3, 1 replica",
        engine: Engine::Postgres,
        s3: true,
        replicas: 1,
        tls: false,
    },
    Config {
        label: "PostgreSQL, S3, 3 replicas",
        engine: Engine::Postgres,
        s3: true,
        replicas: 3,
        tls: false,
    },
    Config {
        label: "PG over TLS, S3, 1 replica",
        engine: Engine::Postgres,
        s3: true,
        replicas: 1,
        tls: true,
    },
];

// ---------------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------------

/// A throwaway PostgreSQL server, a child of the benchmark: `initdb` in a private temporary
/// directory, then `postgres` listening on a Unix socket there (where the superuser is trusted)
/// and on 127.0.0.1 (where [`PG_ROLE`] logs in with a SCRAM password, with or without TLS: a
/// certificate for 127.0.0.1 signed by a certificate authority of the benchmark's own, in
/// `ca_file`). Stopped, and its directory removed, on drop.
struct Postgres {
    child: Option<Child>,
    dir: Option<tempfile::TempDir>,
    port: u16,
    password: String,
    ca_file: PathBuf,
}

/// Writes a server certificate for 127.0.0.1 and its key into the data directory `data`
/// (owned by the server's user), signed by a new certificate authority whose certificate goes
/// to `ca_file`.
fn tls_files(data: &Path, ca_file: &Path, user: Option<(u32, u32)>) {
    use std::os::unix::fs::PermissionsExt as _;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "replicas benchmark CA");
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().expect("CA key"))
        .expect("CA certificate");
    let key = rcgen::KeyPair::generate().expect("server key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("server certificate parameters")
        .signed_by(&key, &*ca)
        .expect("server certificate");
    std::fs::write(ca_file, ca.pem()).expect("write the CA certificate");
    std::fs::write(data.join("server.crt"), cert.pem()).expect("write the server certificate");
    let key_path = data.join("server.key");
    std::fs::write(&key_path, key.serialize_pem()).expect("write the server key");
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).expect("chmod the server key");
    if let Some((uid, gid)) = user {
        for file in ["server.crt", "server.key"] {
            std::os::unix::fs::chown(data.join(file), Some(uid), Some(gid)).expect("chown");
        }
    }
}

/// The directory of the PostgreSQL server binaries.
fn pg_bin() -> PathBuf {
    std::env::var_os("STOWAGE_TEST_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

impl Postgres {
    fn start() -> Postgres {
        let bin = pg_bin();
        // initdb and postgres refuse to run as root: as root, run them as the `postgres` user
        // (Debian's package makes it), in a directory under /tmp that it can reach.
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let user = root.then(|| (postgres_id("-u"), postgres_id("-g")));
        let parent = if root {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix("replbench-pg-")
            .tempdir_in(parent)
            .expect("create the PostgreSQL directory");
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown the PostgreSQL directory");
        }
        let command = |tool: &str| {
            let mut cmd = Command::new(bin.join(tool));
            if let Some((uid, gid)) = user {
                cmd.uid(uid).gid(gid);
            }
            cmd.current_dir(dir.path()).stdin(Stdio::null());
            cmd
        };
        let data = dir.path().join("data");
        let out = command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-E", "UTF8", "--locale=C.UTF-8"])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256", "--no-instructions"])
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", bin.join("initdb").display()));
        assert!(
            out.status.success(),
            "initdb failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let ca_file = dir.path().join("ca.crt");
        tls_files(&data, &ca_file, user);
        let port = free_port();
        let log_path = dir.path().join("server.log");
        let log = std::fs::File::create(&log_path).expect("create the PostgreSQL log");
        let mut cmd = command("postgres");
        cmd.arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .args([
                "-c",
                "ssl=on",
                "-c",
                "ssl_cert_file=server.crt",
                "-c",
                "ssl_key_file=server.key",
            ])
            .arg("-k")
            .arg(dir.path())
            .stdout(log.try_clone().expect("dup the PostgreSQL log"))
            .stderr(log);
        // Killed by the kernel should the benchmark die without unwinding (its backends follow
        // when they see the postmaster gone).
        // SAFETY: prctl is async-signal-safe and the closure allocates nothing; it runs after the
        // child took the `postgres` uid (a credential change would clear the setting).
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("run {}: {e}", bin.join("postgres").display()));
        let mut secret = [0u8; 16];
        std::io::Read::read_exact(
            &mut std::fs::File::open("/dev/urandom").expect("open /dev/urandom"),
            &mut secret,
        )
        .expect("read /dev/urandom");
        let mut pg = Postgres {
            child: Some(child),
            dir: Some(dir),
            port,
            password: hex::encode(secret),
            ca_file,
        };
        let deadline = Instant::now() + PG_STARTUP;
        let mut admin = loop {
            if let Ok(Some(status)) = pg.child.as_mut().expect("postmaster").try_wait() {
                panic!(
                    "PostgreSQL exited ({status}) before accepting connections:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            if let Ok(client) = pg.admin_config().connect(postgres::NoTls) {
                break client;
            }
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not accept connections within {PG_STARTUP:?}:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        admin
            .batch_execute(&format!("CREATE ROLE {PG_ROLE} LOGIN PASSWORD '{}'", pg.password))
            .expect("create the stowage role");
        pg
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().expect("PostgreSQL directory").path()
    }

    /// The superuser on the Unix socket (trusted).
    fn admin_config(&self) -> postgres::Config {
        let mut config = postgres::Config::new();
        config
            .host_path(self.dir())
            .port(self.port)
            .user("postgres")
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(10));
        config
    }

    /// A fresh database owned by [`PG_ROLE`]; the environment that points Stowage at it (the
    /// password in [`PG_PASSWORD_ENV`], named by `catalog.password_env`), over TLS if `tls`.
    fn create_database(&self, name: &str, tls: bool) -> Vec<(&'static str, String)> {
        let mut admin = self
            .admin_config()
            .connect(postgres::NoTls)
            .expect("connect to PostgreSQL");
        admin
            .batch_execute(&format!("CREATE DATABASE {name} OWNER {PG_ROLE}"))
            .unwrap_or_else(|e| panic!("create database {name}: {e}"));
        let mut url = format!("postgres://{PG_ROLE}@127.0.0.1:{}/{name}", self.port);
        let mut envs = vec![
            ("STOWAGE_CATALOG__PASSWORD_ENV", PG_PASSWORD_ENV.to_string()),
            (PG_PASSWORD_ENV, self.password.clone()),
        ];
        if tls {
            url.push_str("?sslmode=require");
            envs.push(("STOWAGE_CATALOG__TLS_CA_FILE", self.ca_file.display().to_string()));
        }
        envs.push(("STOWAGE_CATALOG__URL", url));
        envs
    }

    /// CPU time of the postmaster and its children (backends and background workers), live
    /// or exited.
    fn cpu(&self) -> Duration {
        self.child.as_ref().map_or(Duration::ZERO, |c| tree_cpu(c.id()))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGQUIT: immediate shutdown (the data is thrown away); SIGKILL if it lingers.
            // SAFETY: kill has no memory preconditions; the pid is our own unreaped child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGQUIT) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
    }
}

/// The `postgres` system user's uid (`-u`) or gid (`-g`).
fn postgres_id(flag: &str) -> u32 {
    let out = Command::new("id").args([flag, "postgres"]).output().expect("run id");
    assert!(
        out.status.success(),
        "no `postgres` system user (Debian's postgresql-15 package makes it)"
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a numeric id")
}

/// The fields after the command name of `/proc/<pid>/stat` (the name may hold spaces).
fn stat_fields(pid: &str) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    // Field 3 (the state) is a letter: keep its place with a 0.
    Some(rest.split_whitespace().map(|f| f.parse::<u64>().unwrap_or(0)).collect())
}

/// User + system CPU time of `pid`, of the children it waited for (cutime + cstime), and of its
/// live children, in ticks of 10 ms as [`proc_cpu`] reads them.
fn tree_cpu(pid: u32) -> Duration {
    let ticks = |f: &[u64], idx: &[usize]| idx.iter().filter_map(|&i| f.get(i)).sum::<u64>();
    let mut total = stat_fields(&pid.to_string()).map_or(0, |f| ticks(&f, &[11, 12, 13, 14]));
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if !name.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            if let Some(f) = stat_fields(&name)
                && f.get(1) == Some(&u64::from(pid))
            {
                total += ticks(&f, &[11, 12]);
            }
        }
    }
    Duration::from_millis(total * 10)
}

// ---------------------------------------------------------------------------------------------
// A configuration's servers
// ---------------------------------------------------------------------------------------------

/// The Stowage processes of one configuration, and the database and object store they use (for
/// the CPU marks).
struct Deployment<'a> {
    label: &'static str,
    replicas: Vec<Server>,
    pg: Option<&'a Postgres>,
    moto: Option<&'a S3Server>,
}

impl Observed for Deployment<'_> {
    fn label(&self) -> &str {
        self.label
    }

    fn server_cpu(&self) -> Duration {
        self.replicas.iter().map(Server::cpu).sum()
    }

    fn db_cpu(&self) -> Duration {
        self.pg.map_or(Duration::ZERO, Postgres::cpu)
    }

    fn store_cpu(&self) -> Duration {
        self.moto
            .map_or(Duration::ZERO, |m| proc_cpu(&format!("/proc/{}/stat", m.pid())))
    }
}

impl Deployment<'_> {
    /// The replica that connection (or worker) `i` keeps to.
    fn url(&self, i: usize) -> &str {
        &self.replicas[i % self.replicas.len()].url
    }

    fn urls(&self) -> Arc<Vec<String>> {
        Arc::new(self.replicas.iter().map(|s| s.url.clone()).collect())
    }
}

const REPLICA_LABELS: [&str; 3] = ["replica 1", "replica 2", "replica 3"];

/// Starts configuration `index`'s servers: a fresh database and a fresh bucket of its own.
fn deploy<'a>(
    bin: &Path,
    settings: &Settings,
    index: usize,
    config: &Config,
    pg: &'a Postgres,
    moto: &'a S3Server,
) -> Deployment<'a> {
    let mut envs = Vec::new();
    if config.engine == Engine::Postgres {
        envs.extend(pg.create_database(&format!("replbench_{index}"), config.tls));
    }
    if config.s3 {
        let bucket = format!("replbench-{index}");
        create_bucket(&moto.host, &bucket);
        envs.extend(s3_envs(&moto.host, &bucket));
    }
    // One after the other: the first creates the PostgreSQL schema (the others would wait on
    // its migration lock anyway).
    let replicas = REPLICA_LABELS[..config.replicas]
        .iter()
        .map(|&label| start_stowage_with(bin, &settings.stowage_log, label, &envs))
        .collect();
    Deployment {
        label: config.label,
        replicas,
        pg: (config.engine == Engine::Postgres).then_some(pg),
        moto: config.s3.then_some(moto),
    }
}

// ---------------------------------------------------------------------------------------------
// Workloads
// ---------------------------------------------------------------------------------------------

/// The workloads, in the order they run and are printed.
const WORKLOADS: [(&str, &str); 4] = [
    ("manifest GET by tag, 64 conns", "req/s"),
    ("manifest GET by tag, 1 conn", "req/s"),
    ("blob HEAD, 64 conns", "req/s"),
    ("small image pushes, 16 workers", "img/s"),
];

fn progress(d: &Deployment, what: &str, m: &Measured, unit: &str) {
    eprintln!(
        "[bench] {:<27} {what:<31} {:>9.1} {unit:<5} ({:.2} s; CPU s: stowage {:.2}, postgres {:.2}, \
         moto {:.2}, client {:.2}, other {:.2}{})",
        d.label,
        m.value,
        m.secs,
        m.server_cpu,
        m.db_cpu,
        m.store_cpu,
        m.client_cpu,
        m.other_cpu,
        if m.errors > 0 {
            format!(", {} ERRORS", m.errors)
        } else {
            String::new()
        }
    );
}

/// Pushes `small` through the first replica, then checks that every replica serves its manifest
/// byte for byte and its layer.
async fn prepare(c: &Client, d: &Deployment<'_>, small: &Image) {
    for s in &d.replicas {
        let resp = c.get(s.v2("")).send().await.expect("GET /v2/");
        assert_eq!(resp.status(), StatusCode::OK, "{} {}: GET /v2/", d.label, s.label);
    }
    push_image(c, d.url(0), "bench/small", small)
        .await
        .unwrap_or_else(|e| panic!("{}: push the small image: {e}", d.label));
    for s in &d.replicas {
        let resp = c
            .get(s.v2(&format!("bench/small/manifests/{}", small.tag)))
            .header(ACCEPT, MANIFEST_ACCEPT)
            .send()
            .await
            .expect("GET manifest");
        assert_eq!(resp.status(), StatusCode::OK, "{} {}: GET manifest", d.label, s.label);
        assert_eq!(
            resp.bytes().await.expect("manifest body"),
            small.manifest,
            "{} {}: manifest bytes",
            d.label,
            s.label
        );
        let resp = c
            .head(s.v2(&format!("bench/small/blobs/{}", small.layer.digest)))
            .send()
            .await
            .expect("HEAD blob");
        assert_eq!(resp.status(), StatusCode::OK, "{} {}: HEAD layer", d.label, s.label);
    }
}

/// Manifest GETs by tag on `conns` connections, connection `i` to replica `i % replicas`.
async fn w_manifest_get(d: &Deployment<'_>, img: &Image, secs: Duration, conns: usize) -> Measured {
    settle().await;
    let (c, urls, path, want) = (
        // A client of its own: no connection left idle by an earlier workload (the server may
        // close it, keep-alive expired, just as it is reused).
        client(),
        d.urls(),
        format!("bench/small/manifests/{}", img.tag),
        img.manifest.len(),
    );
    let m = request_rate_per_conn(d, secs, conns, move |i| {
        let (c, url) = (c.clone(), v2(&urls[i % urls.len()], &path));
        async move {
            let resp = c
                .get(&url)
                .header(ACCEPT, MANIFEST_ACCEPT)
                .send()
                .await
                .map_err(|e| describe(&e))?;
            let resp = expect_status(resp, StatusCode::OK, "GET manifest").await?;
            let body = resp.bytes().await?;
            if body.len() != want {
                return Err(format!("manifest body {} bytes, want {want}", body.len()).into());
            }
            Ok(())
        }
    })
    .await;
    progress(d, &format!("manifest GET, {conns} conns"), &m, "req/s");
    m
}

/// Blob HEADs of the small image's layer on `RATE_CONNS` connections, spread as above.
async fn w_blob_head(d: &Deployment<'_>, img: &Image, secs: Duration) -> Measured {
    settle().await;
    let (c, urls, path, size) = (
        client(),
        d.urls(),
        format!("bench/small/blobs/{}", img.layer.digest),
        img.layer.data.len().to_string(),
    );
    let m = request_rate_per_conn(d, secs, RATE_CONNS, move |i| {
        let (c, url, size) = (c.clone(), v2(&urls[i % urls.len()], &path), size.clone());
        async move {
            let resp = c.head(&url).send().await.map_err(|e| describe(&e))?;
            let resp = expect_status(resp, StatusCode::OK, "HEAD blob").await?;
            let len = resp.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok());
            if len != Some(size.as_str()) {
                return Err(format!("HEAD Content-Length {len:?}, want {size}").into());
            }
            Ok(())
        }
    })
    .await;
    progress(d, &format!("blob HEAD, {RATE_CONNS} conns"), &m, "req/s");
    m
}

/// `images` pushed to `bench/images` by `IMAGE_WORKERS` workers, worker `w` through replica
/// `w % replicas`; then every replica must list every pushed tag and serve the last image.
async fn w_image_pushes(d: &Deployment<'_>, images: &Arc<Vec<Image>>) -> Measured {
    settle().await;
    let c = &client();
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mark = CpuMark::now(d);
    let deadline = mark.at + IMAGE_DEADLINE;
    let mut tasks = Vec::new();
    for w in 0..IMAGE_WORKERS {
        let (c, images, next, done, errors) = (c.clone(), images.clone(), next.clone(), done.clone(), errors.clone());
        let base = d.url(w).to_string();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= images.len() || Instant::now() > deadline {
                    break;
                }
                match push_image(&c, &base, "bench/images", &images[i]).await {
                    Ok(()) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("[bench] image push failed: {}", describe(&*e));
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("push task panicked");
    }
    let n = done.load(Ordering::Relaxed);
    let mut m = mark.finish(d, n as f64, 1.0, errors.load(Ordering::Relaxed));
    if n < images.len() {
        eprintln!("[bench] {}: only {n} of {} images pushed", d.label, images.len());
    }
    // Not timed: what was acknowledged is there, seen from every replica.
    let last = &images[n.max(1) - 1];
    for s in &d.replicas {
        let problem = match tag_count(c, &s.url, "bench/images").await {
            Ok(tags) if tags == n => None,
            Ok(tags) => Some(format!("lists {tags} tags, {n} pushed")),
            Err(e) => Some(format!("tag list: {e}")),
        };
        let resp = c
            .get(s.v2(&format!("bench/images/manifests/{}", last.tag)))
            .header(ACCEPT, MANIFEST_ACCEPT)
            .send()
            .await;
        let problem = problem.or(match resp {
            Ok(r) if r.status() == StatusCode::OK || n == 0 => None,
            Ok(r) => Some(format!("manifest {} answers {}", last.tag, r.status())),
            Err(e) => Some(format!("GET manifest {}: {e}", last.tag)),
        });
        if let Some(p) = problem {
            eprintln!("[bench] {} {}: after the pushes: {p}", d.label, s.label);
            m.errors += 1;
        }
    }
    progress(d, &format!("small image pushes, {IMAGE_WORKERS} wk."), &m, "img/s");
    m
}

/// The number of tags `repo` lists on the server at `base`, following `Link` pages.
async fn tag_count(c: &Client, base: &str, repo: &str) -> Res<usize> {
    let mut url = v2(base, &format!("{repo}/tags/list"));
    let mut count = 0;
    // Bounded: far more pages than any run makes.
    for _ in 0..10_000 {
        let resp = c.get(&url).send().await?;
        let resp = expect_status(resp, StatusCode::OK, "GET tags/list").await?;
        let next = resp
            .headers()
            .get(LINK)
            .and_then(|v| v.to_str().ok())
            .and_then(|l| Some(l.split('<').nth(1)?.split('>').next()?.to_string()));
        let body: serde_json::Value = resp.json().await?;
        count += body["tags"].as_array().map_or(0, Vec::len);
        match next {
            Some(next) => url = format!("{base}{next}"),
            None => return Ok(count),
        }
    }
    Err("tags/list: too many pages".into())
}

async fn run(d: &Deployment<'_>, settings: &Settings, small: &Image, images: &Arc<Vec<Image>>) -> Vec<Measured> {
    prepare(&client(), d, small).await;
    let secs = settings.rate_secs;
    vec![
        w_manifest_get(d, small, secs, RATE_CONNS).await,
        w_manifest_get(d, small, secs, 1).await,
        w_blob_head(d, small, secs).await,
        w_image_pushes(d, images).await,
    ]
}

/// An error with its sources (reqwest's own message rarely says what went wrong).
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let _ = write!(out, ": {s}");
        source = s.source();
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn fmt_rate(m: &Measured) -> String {
    if m.value.is_nan() {
        "FAILED".into()
    } else {
        format!("{:.1}", m.value)
    }
}

/// Rates side by side: one row per workload, one column per configuration.
fn summary(results: &[(&Config, Vec<Measured>)]) -> String {
    let mut out = String::new();
    let _ = write!(out, "| {:<40} |", "workload");
    for (c, _) in results {
        let _ = write!(out, " {:>27} |", c.label);
    }
    let _ = write!(out, "\n|{:-<42}|", "");
    for _ in results {
        let _ = write!(out, "{:->29}|", "");
    }
    out.push('\n');
    for (w, (name, unit)) in WORKLOADS.iter().enumerate() {
        let _ = write!(out, "| {:<40} |", format!("{name} ({unit})"));
        for (_, ms) in results {
            let m = &ms[w];
            let cell = if m.errors > 0 {
                format!("{} ({} err)", fmt_rate(m), m.errors)
            } else {
                fmt_rate(m)
            };
            let _ = write!(out, " {cell:>27} |");
        }
        out.push('\n');
    }
    out
}

/// One row per workload and configuration: the rate, the errors and where the CPU went.
fn details(results: &[(&Config, Vec<Measured>)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| {:<40} | {:<27} | {:>9} | {:>6} | {:>10} | {:>12} | {:>8} | {:>13} | {:>8} | {:>7} |",
        "workload",
        "configuration",
        "rate",
        "errors",
        "Stowage s",
        "PostgreSQL s",
        "moto s",
        "Stow+PG us/op",
        "client %",
        "other %"
    );
    let _ = writeln!(
        out,
        "|{:-<42}|{:-<29}|{:->11}|{:->8}|{:->12}|{:->14}|{:->10}|{:->15}|{:->10}|{:->9}|",
        "", "", "", "", "", "", "", "", "", ""
    );
    for (w, (name, unit)) in WORKLOADS.iter().enumerate() {
        for (c, ms) in results {
            let m = &ms[w];
            let per_op = if m.ops > 0.0 {
                format!("{:.1}", (m.server_cpu + m.db_cpu) / m.ops * 1e6)
            } else {
                "n/a".into()
            };
            let pg = if c.engine == Engine::Postgres {
                format!("{:.2}", m.db_cpu)
            } else {
                "-".into()
            };
            let moto = if c.s3 {
                format!("{:.2}", m.store_cpu)
            } else {
                "-".into()
            };
            let _ = writeln!(
                out,
                "| {:<40} | {:<27} | {:>9} | {:>6} | {:>10.2} | {:>12} | {:>8} | {:>13} | {:>8.0} | {:>7.0} |",
                format!("{name} ({unit})"),
                c.label,
                fmt_rate(m),
                m.errors,
                m.server_cpu,
                pg,
                moto,
                per_op,
                m.client_cpu / m.secs * 100.0,
                m.other_cpu / m.secs * 100.0,
            );
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------------

fn main() -> ExitCode {
    let settings = Settings::from_env();
    let pg_bin = pg_bin();
    if !pg_bin.join("initdb").is_file() || !pg_bin.join("postgres").is_file() {
        eprintln!(
            "error: no PostgreSQL server binaries in {}. This benchmark runs Stowage on a PostgreSQL \
             catalog: install Debian's postgresql-15 (`scripts/test` does) or set STOWAGE_TEST_PG_BIN, \
             and run again.",
            pg_bin.display()
        );
        return ExitCode::from(2);
    }
    let bin = build_stowage("REPLBENCH_STOWAGE_BIN");
    let machine = machine_info();
    let stowage_version = command_version(&bin, &["--version"]);
    let pg_version = command_version(&pg_bin.join("postgres"), &["--version"]);
    let python = std::env::var("STOWAGE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let moto_version = command_version(
        Path::new(&python),
        &["-c", "import moto; print('moto', moto.__version__)"],
    );

    if !CONFIGS.iter().any(|c| settings.runs(c)) {
        eprintln!("error: REPLBENCH_CONFIGS matches no configuration's label");
        return ExitCode::from(2);
    }
    eprintln!("[bench] generating test data (not timed)");
    let small = Image::small(usize::MAX, "latest".into());
    let images: Arc<Vec<Image>> = Arc::new(
        (0..settings.images)
            .map(|i| Image::small(i, format!("img-{i:05}")))
            .collect(),
    );

    eprintln!("[bench] starting moto (S3) and PostgreSQL");
    let moto = start_moto_server();
    let pg = Postgres::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let started = Instant::now();
    let mut results = Vec::new();
    for (index, config) in CONFIGS.iter().enumerate() {
        if !settings.runs(config) {
            continue;
        }
        eprintln!("[bench] starting {}", config.label);
        let d = deploy(&bin, &settings, index, config, &pg, &moto);
        for s in &d.replicas {
            eprintln!("[bench]   {} at {} (pid {})", s.label, s.url, s.pid());
        }
        let outcome = rt.block_on(async {
            tokio::select! {
                r = run(&d, &settings, &small, &images) => Some(r),
                _ = tokio::signal::ctrl_c() => None,
            }
        });
        if outcome.as_ref().is_some_and(|ms| ms.iter().any(|m| m.errors > 0)) {
            for s in &d.replicas {
                eprintln!("[bench] {} {} log tail:\n{}", d.label, s.label, s.log_tail());
            }
        }
        // Stopped before the next configuration starts.
        drop(d);
        let Some(measured) = outcome else {
            eprintln!("[bench] interrupted; stopping the servers");
            return ExitCode::from(130);
        };
        results.push((config, measured));
    }
    drop(rt);
    drop(pg);
    drop(moto);

    println!();
    println!("Stowage's catalog engines and replicas, all traffic on 127.0.0.1 (client and servers share the machine)");
    println!("machine:    {machine}");
    println!("Stowage:    {stowage_version} (authentication off on every server)");
    println!(
        "PostgreSQL: {pg_version}, on 127.0.0.1, server defaults (fsync and synchronous_commit on); \
         SQLite: WAL, synchronous=FULL"
    );
    println!("S3:         {moto_version} on 127.0.0.1, one bucket per configuration");
    println!(
        "client:     reqwest 0.13 (HTTP/1.1), {RATE_CONNS} conns for rates ({}s + {}s warm-up), \
         {IMAGE_WORKERS} workers pushing {} images; with 3 replicas connection/worker i uses replica i % 3",
        settings.rate_secs.as_secs_f64(),
        RATE_WARMUP.as_secs_f64(),
        settings.images
    );
    println!();
    print!("{}", summary(&results));
    println!();
    print!("{}", details(&results));
    println!(
        "(CPU seconds in the measured window: Stowage = all its processes, PostgreSQL = the postmaster \
         and its backends, moto = the S3 server; client % and other % are of one core: other is \
         everything else on the machine)"
    );
    println!();
    let disturbed: Vec<String> = results
        .iter()
        .flat_map(|(c, ms)| {
            ms.iter()
                .zip(WORKLOADS)
                .filter(|(m, _)| m.other_cpu / m.secs > 0.5)
                .map(move |(_, (w, _))| format!("{w} on {}", c.label))
        })
        .collect();
    if !disturbed.is_empty() {
        println!(
            "WARNING: more than half a core was busy outside the servers and the client during: {}. \
             Something else ran on the machine: treat those rates with care and compare CPU per \
             operation instead.",
            disturbed.join("; ")
        );
    }
    let incomplete = results.iter().any(|(_, ms)| ms.iter().any(|m| m.errors > 0))
        || results.iter().any(|(_, ms)| ms[3].ops < settings.images as f64);
    println!(
        "total run {:.0} s (of which {:.0} s waiting for an idle machine)",
        started.elapsed().as_secs_f64(),
        QUIET_WAITED_MS.load(Ordering::Relaxed) as f64 / 1000.0
    );
    if incomplete {
        println!("ERRORS: some requests failed or some images were not pushed (see stderr)");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

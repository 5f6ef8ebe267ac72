//! Test harness: starts the real `stowage` binary on 127.0.0.1 with a fresh data directory and
//! talks to it over real HTTP, the way every client does.
//!
//! Each test owns its server: `TestServer::start()` picks a free port by asking the server to bind
//! `127.0.0.1:0`, then reads the `listening on http(s)://…` line the server prints on stdout once its
//! socket is bound. Dropping the `TestServer` kills the process and removes the data directory.
//!
//! `STOWAGE_TEST_BACKEND` (`fs` | `s3`, see `backend`) picks where the servers keep blobs, and
//! `STOWAGE_TEST_CATALOG` (`sqlite` | `postgres`, see `catalog`) their catalog: with
//! `postgres`, each `TestServer` gets a database of its own on the test binary's PostgreSQL
//! server, kept across its restarts and dropped with it.
#![allow(dead_code)]

pub mod backend;
pub mod catalog;
pub mod dockerd;
pub mod limits;
pub mod oci;
pub mod postgres;
pub mod replay;
pub mod rng;
pub mod spack;
pub mod sql;
pub mod tools;

#[allow(unused_imports)] // each test binary uses a different subset
pub use backend::{Backend, S3_PART_SIZE, backend};
#[allow(unused_imports)] // each test binary uses a different subset
pub use catalog::{Catalog, catalog};

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, mpsc};
use std::time::Duration;

/// SQL undoing migrations 19 (the failed-login limiter's shared state), 18 (composite blobs,
/// the Spack index layout), 17 (`manifests.proxy_pulled_at`), 16 (`spack_nodes` as a rowid
/// table: its index; the table keeps its shape, which the migration rebuilds anyway), 15 (Spack
/// index figures), 14 (image platforms) and 13 (repository figures), newest first, for tests
/// that roll a catalog back to an older schema: one copy, so that a new migration is undone
/// everywhere once it is added here.
pub const UNDO_MIGRATIONS_13_TO_19: &str = "DROP TABLE login_throttle;
             DROP TRIGGER spack_index_node_added; DROP TRIGGER spack_index_node_changed;
             DROP TABLE spack_index_dirty; DROP TABLE spack_index_layout; DROP TABLE blob_pieces;
             ALTER TABLE blobs DROP COLUMN composite;
             ALTER TABLE manifests DROP COLUMN proxy_pulled_at;
             DROP INDEX spack_nodes_by_repo;
             DROP TRIGGER spack_figures_node_added; DROP TRIGGER spack_figures_edge_added;
             DROP TRIGGER spack_figures_edge_removed; DROP TRIGGER spack_figures_closure_added;
             DROP TRIGGER spack_figures_closure_removed; DROP TRIGGER spack_figures_spec_added;
             DROP TRIGGER spack_figures_spec_removed;
             ALTER TABLE spack_nodes DROP COLUMN closure_refs; ALTER TABLE spack_nodes DROP COLUMN spec_refs;
             ALTER TABLE spack_nodes DROP COLUMN ref_count;
             ALTER TABLE spack_index DROP COLUMN specs; ALTER TABLE spack_index DROP COLUMN old_layout_specs;
             ALTER TABLE manifests DROP COLUMN platform;
             DROP TRIGGER repo_stats_tag_added; DROP TRIGGER repo_stats_tag_removed;
             DROP TRIGGER repo_stats_blob_linked; DROP TRIGGER repo_stats_blob_unlinked;
             DROP TRIGGER repo_stats_manifest_added; DROP TRIGGER repo_stats_manifest_removed;
             ALTER TABLE repositories DROP COLUMN tag_count;
             ALTER TABLE repositories DROP COLUMN blob_bytes;
             ALTER TABLE repositories DROP COLUMN manifest_bytes;";

/// A running `stowage serve` process.
pub struct TestServer {
    child: Child,
    /// Base URL, e.g. `http://127.0.0.1:41234` (no trailing slash).
    pub url: String,
    /// `127.0.0.1:41234`, the form `skopeo`/`oras` want.
    pub host: String,
    data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    envs: Vec<(String, String)>,
    /// The blob backend this server runs on (`STOWAGE_TEST_BACKEND`, see `backend`).
    pub backend: Backend,
    /// Its bucket on the S3 test server, with the S3 backend.
    pub bucket: Option<String>,
    /// The catalog this server runs on (`STOWAGE_TEST_CATALOG`, see `catalog`).
    pub catalog: Catalog,
    /// Its database on the PostgreSQL test server, with the PostgreSQL catalog: the same for
    /// every restart, shared with the servers started by `start_sharing`, dropped with the last
    /// of them.
    database: Option<Arc<catalog::Database>>,
    /// For a server started by `start_sharing`: its data directory's use of the database, so
    /// that `run_cli` on it reaches the database too.
    sharing: Option<catalog::Sharing>,
}

impl TestServer {
    /// Starts a server with default settings in a fresh temporary data directory.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra `STOWAGE_*` environment variables, e.g.
    /// `[("STOWAGE_REGISTRY__DELETE_ENABLED", "false")]`.
    pub fn start_with(envs: &[(&str, &str)]) -> Self {
        Self::start_on(backend(), envs)
    }

    /// Starts a server on the given backend, whatever `STOWAGE_TEST_BACKEND` says (for tests of
    /// one backend's own features).
    pub fn start_on(backend: Backend, envs: &[(&str, &str)]) -> Self {
        Self::start_on_backend_and_catalog(backend, catalog(), envs)
    }

    /// Starts a server on the given catalog engine, whatever `STOWAGE_TEST_CATALOG` says (for
    /// tests of one engine's own features: the SQLite catalog's files, its migration history).
    pub fn start_on_catalog(engine: Catalog, envs: &[(&str, &str)]) -> Self {
        Self::start_on_backend_and_catalog(backend(), engine, envs)
    }

    /// Starts a server on the given backend and catalog engine, whatever the environment says.
    pub fn start_on_backend_and_catalog(backend: Backend, engine: Catalog, envs: &[(&str, &str)]) -> Self {
        let tmp = tempfile::tempdir().expect("create temp dir");
        let data_dir = tmp.path().join("data");
        // The password file goes beside the data directory, not in it.
        let database =
            (engine == Catalog::Postgres).then(|| Arc::new(catalog::Database::create(&data_dir, tmp.path())));
        let bucket = (backend == Backend::S3).then(backend::new_bucket);
        let mut all = database.as_ref().map(|d| d.envs().to_vec()).unwrap_or_default();
        all.extend(bucket.as_deref().map(backend::s3_envs).unwrap_or_default());
        all.extend(envs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let envs = all;
        let (child, url) = spawn(&data_dir, &envs);
        let host = host_of(&url);
        TestServer {
            child,
            url,
            host,
            data_dir,
            _tmp: Some(tmp),
            envs,
            backend,
            bucket,
            catalog: engine,
            database,
            sharing: None,
        }
    }

    /// Starts another replica of `first`: a server on the same PostgreSQL database (its password
    /// in a file of the new server's own) and the same S3 bucket, with a data directory and a
    /// port of its own, and `envs` added. Nothing else of `first`'s environment is copied: pass
    /// the settings the replica should have too. Needs the PostgreSQL catalog (a SQLite catalog
    /// lives in one data directory); with blobs on local disk the second server refuses to start
    /// (the single-node lock, see docs/postgres.md), so replicas are an S3 matter. The token
    /// signing keys `first` generated are copied to the new data directory.
    ///
    /// The database goes with the last server on it. While several servers share it, `kill` and
    /// `crash_and_restart` end no sessions on it (the others' are live): a killed process's
    /// sessions end when PostgreSQL sees its sockets closed. `run_cli` and `stowage_command`
    /// work on any of them.
    pub fn start_sharing(first: &TestServer, envs: &[(&str, &str)]) -> Self {
        let database = first
            .database
            .clone()
            .expect("start_sharing needs a server on the PostgreSQL catalog");
        let tmp = tempfile::tempdir().expect("create temp dir");
        let data_dir = tmp.path().join("data");
        // Replicas must sign tokens with one key.
        copy_signing_keys(&first.data_dir, &data_dir);
        let sharing = Some(database.share(&data_dir));
        let mut all = database.envs_with_password_in(tmp.path());
        all.extend(first.bucket.as_deref().map(backend::s3_envs).unwrap_or_default());
        all.extend(envs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let envs = all;
        let (child, url) = spawn(&data_dir, &envs);
        let host = host_of(&url);
        TestServer {
            child,
            url,
            host,
            data_dir,
            _tmp: Some(tmp),
            envs,
            backend: first.backend,
            bucket: first.bucket.clone(),
            catalog: first.catalog,
            database: Some(database),
            sharing,
        }
    }

    /// The name of this server's database on the PostgreSQL test server, with the PostgreSQL
    /// catalog (another server's, for a replica that shares it).
    pub fn database(&self) -> Option<&str> {
        self.database.as_ref().map(|d| d.name())
    }

    /// A connection to this server's catalog, to run SQL on behind its back whichever engine it
    /// is (see `sql`): its SQLite `catalog.db`, or a session on its PostgreSQL database.
    pub fn catalog_sql(&self) -> sql::CatalogSql {
        match (self.catalog, self.database()) {
            (Catalog::Sqlite, _) => sql::CatalogSql::sqlite(&self.data_dir),
            (Catalog::Postgres, Some(database)) => sql::CatalogSql::postgres(database),
            (Catalog::Postgres, None) => unreachable!("a PostgreSQL catalog has its database"),
        }
    }

    /// After the process exited: waits until its sessions on the PostgreSQL catalog are gone
    /// (ending them), so that a restart or a CLI run does not find the fs backend's
    /// single-node lock still held by a backend that has not noticed its client died.
    /// Not while other servers share the database (`start_sharing`): their sessions are live.
    fn end_catalog_sessions(&self) {
        if let Some(database) = &self.database
            && Arc::strong_count(database) == 1
        {
            database.end_sessions();
        }
    }

    /// Starts a server whose descriptor limit (soft and hard) is `nofile`, on this and every
    /// restart.
    pub fn start_with_rlimit_nofile(envs: &[(&str, &str)], nofile: u64) -> Self {
        Self::start_with_nofile(envs, (nofile, nofile))
    }

    /// Whether the store holds an object for blob `digest` (`sha256:<hex>`).
    pub fn blob_object_exists(&self, digest: &str) -> bool {
        match &self.bucket {
            None => self.data_dir.join("storage").join(blob_key(digest)).exists(),
            // Listed rather than fetched: moto refuses unsigned GETs of existing objects.
            Some(bucket) => {
                let key = blob_key(digest);
                let (status, body) = backend::s3_request("GET", &format!("/{bucket}?list-type=2&prefix={key}"));
                assert_eq!(status, 200, "list {key}: {body}");
                body.contains(&format!("<Key>{key}</Key>"))
            }
        }
    }

    /// Puts an object at blob `digest`'s key behind the server's back (as a crash between
    /// publishing and linking would leave one); on local disk dated `age` in the past.
    pub fn plant_blob_object(&self, digest: &str, age: Duration) {
        match &self.bucket {
            None => {
                let path = self.data_dir.join("storage").join(blob_key(digest));
                std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
                let file = std::fs::File::create(&path).expect("create object");
                file.set_modified(std::time::SystemTime::now() - age)
                    .expect("set mtime");
            }
            Some(bucket) => {
                let (status, body) = backend::s3_request("PUT", &format!("/{bucket}/{}", blob_key(digest)));
                assert_eq!(status, 200, "plant {digest}: {body}");
            }
        }
    }

    /// Replaces blob `digest`'s object with `data` behind the server's back (a disk or a bucket
    /// corrupting it): the file under `blobs/` is rewritten, or the object overwritten through
    /// the S3 API.
    pub fn corrupt_blob_object(&self, digest: &str, data: &[u8]) {
        match &self.bucket {
            None => {
                let path = self.data_dir.join("storage").join(blob_key(digest));
                assert!(path.exists(), "no object for {digest}");
                std::fs::write(&path, data).expect("rewrite object");
            }
            Some(bucket) => backend::s3_write_object(bucket, &blob_key(digest), Some(data.to_vec())),
        }
    }

    /// Deletes blob `digest`'s object behind the server's back.
    pub fn remove_blob_object(&self, digest: &str) {
        match &self.bucket {
            None => std::fs::remove_file(self.data_dir.join("storage").join(blob_key(digest))).expect("remove object"),
            Some(bucket) => backend::s3_write_object(bucket, &blob_key(digest), None),
        }
    }

    /// The objects under `quarantine/` in the store, as keys relative to the store's root.
    pub fn quarantined_objects(&self) -> Vec<String> {
        match &self.bucket {
            None => {
                let root = self.data_dir.join("storage");
                let mut found = Vec::new();
                let mut dirs = vec![root.join("quarantine")];
                while let Some(dir) = dirs.pop() {
                    let Ok(entries) = std::fs::read_dir(&dir) else { continue };
                    for entry in entries {
                        let path = entry.expect("dir entry").path();
                        if path.is_dir() {
                            dirs.push(path);
                        } else {
                            let key = path.strip_prefix(&root).expect("under the root");
                            found.push(key.to_string_lossy().into_owned());
                        }
                    }
                }
                found
            }
            Some(bucket) => backend::bucket_keys(bucket, "quarantine/"),
        }
    }

    /// The value of environment variable `key` the server was started with.
    pub fn env(&self, key: &str) -> Option<&str> {
        self.envs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// A `stowage` command with `args` (e.g. `["fsck"]`) set up for this server's data
    /// directory, backend and catalog, as an operator runs one beside the server or after
    /// stopping it.
    pub fn stowage_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stowage"));
        cmd.args(args)
            .env("STOWAGE_DATA_DIR", &self.data_dir)
            .env("STOWAGE_AUTH__ENABLED", "false")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs `stowage fsck` with `extra` arguments on this server's data; returns the exit code,
    /// stdout and stderr.
    pub fn fsck(&self, extra: &[&str]) -> (i32, String, String) {
        let mut args = vec!["fsck"];
        args.extend_from_slice(extra);
        let out = self.stowage_command(&args).output().expect("run stowage fsck");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Kills the process with SIGKILL (as a crash does) and waits for it; `crash_and_restart`
    /// starts it again on the same data.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.end_catalog_sessions();
    }

    /// Whether any upload is staged right now: a staging file on local disk, or an object or
    /// multipart upload under `uploads/` in the bucket.
    pub fn has_staged_uploads(&self) -> bool {
        match &self.bucket {
            None => std::fs::read_dir(self.data_dir.join("storage/uploads"))
                .map(|mut d| d.next().is_some())
                .unwrap_or(false),
            Some(bucket) => backend::bucket_has_uploads(bucket),
        }
    }

    /// Like `crash_and_restart`, with `envs` added to the server's environment.
    pub fn crash_and_restart_with(&mut self, envs: &[(&str, &str)]) {
        self.envs
            .extend(envs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self.crash_and_restart();
    }

    /// The server process's id (to read its `/proc/<pid>/status`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's data directory (the SQLite catalog and the fs blob store live under it).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Kills the process (SIGKILL: no graceful shutdown, as in a crash) and starts a new one on the
    /// same data directory (and PostgreSQL database). The port changes; `url` and `host` are
    /// updated.
    pub fn crash_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.end_catalog_sessions();
        let (child, url) = spawn(&self.data_dir, &self.envs);
        self.child = child;
        self.host = host_of(&url);
        self.url = url;
    }

    /// Sends SIGTERM (graceful shutdown) and waits for the process to exit; returns its status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
        assert!(sent.success(), "kill -TERM {pid}");
        let status = self.child.wait().expect("wait for stowage");
        self.end_catalog_sessions();
        status
    }

    /// Sends SIGTERM without waiting for the exit.
    pub fn signal_terminate(&self) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
        assert!(sent.success(), "kill -TERM {pid}");
    }

    /// The process's exit status if it has exited, without waiting.
    pub fn try_exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("poll stowage")
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let status = self.child.wait().expect("wait for stowage");
        self.end_catalog_sessions();
        status
    }

    /// `{url}/v2/{path}`.
    pub fn v2(&self, path: &str) -> String {
        format!("{}/v2/{}", self.url, path.trim_start_matches('/'))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copies the token signing keys a server generated in `from` (a data directory) to `to`'s
/// key directory, modes kept private.
fn copy_signing_keys(from: &Path, to: &Path) {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let (src, dst) = (from.join("auth/keys"), to.join("auth/keys"));
    if !src.exists() {
        return;
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dst)
        .expect("create the key directory");
    for entry in std::fs::read_dir(&src).unwrap_or_else(|e| panic!("read {}: {e}", src.display())) {
        let path = entry.expect("key directory entry").path();
        let copy = dst.join(path.file_name().expect("file name"));
        std::fs::copy(&path, &copy).expect("copy a signing key");
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
    }
}

fn host_of(url: &str) -> String {
    url.split("://").nth(1).unwrap_or_default().to_owned()
}

/// Not a setting: tells `spawn` to start the server under this descriptor limit
/// (`soft:hard`).
const RLIMIT_NOFILE_ENV: &str = "TEST_RLIMIT_NOFILE";
/// Pseudo-environment variable: the server's standard error goes to this file (for tests that
/// read its log) instead of the test's own.
pub const STDERR_FILE_ENV: &str = "TEST_STDERR_FILE";

/// Starts the server; returns the process and its base URL (`http://…` or `https://…`).
fn spawn(data_dir: &Path, envs: &[(String, String)]) -> (Child, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stowage"));
    if let Some((_, n)) = envs.iter().find(|(k, _)| k == RLIMIT_NOFILE_ENV) {
        use std::os::unix::process::CommandExt;
        let (soft, hard) = n.split_once(':').expect("soft:hard");
        let soft: libc::rlim_t = soft.parse().expect("soft descriptor limit");
        let hard: libc::rlim_t = hard.parse().expect("hard descriptor limit");
        // SAFETY: setrlimit is async-signal-safe and touches only the child's own limits.
        unsafe {
            cmd.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.arg("serve")
        .env("STOWAGE_LISTEN", "127.0.0.1:0")
        .env("STOWAGE_DATA_DIR", data_dir)
        // The endpoint and client tests run in open mode; auth tests turn it back on.
        .env("STOWAGE_AUTH__ENABLED", "false")
        .env(
            "RUST_LOG",
            std::env::var("TEST_STOWAGE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some((_, path)) = envs.iter().find(|(k, _)| k == STDERR_FILE_ENV) {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("server log file");
        cmd.stderr(file);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn stowage");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !sent && let Some(rest) = line.split("listening on ").nth(1) {
                let url = rest.split_whitespace().next().unwrap_or_default().to_string();
                let _ = tx.send(url);
                sent = true;
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(url) => (child, url),
        Err(_) => {
            let _ = child.kill();
            panic!("stowage did not report its listening address within 60 s");
        }
    }
}

/// Runs `stowage <args>` (an admin command: `user add`, `token create`, …) on `data_dir`,
/// writing `stdin` to it; asserts it succeeded and returns its output. On the catalog of the
/// `TestServer` whose data directory it is (its PostgreSQL database, with that catalog).
pub fn run_cli(data_dir: &Path, args: &[&str], stdin: &str) -> std::process::Output {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args(args)
        .env("STOWAGE_DATA_DIR", data_dir)
        .env("RUST_LOG", "warn")
        .envs(catalog::envs_for(data_dir))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run stowage");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait for stowage");
    assert!(
        out.status.success(),
        "stowage {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// sha256 digest string (`sha256:<hex>`) of `data`.
pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// The object key of blob `digest`: `blobs/<algorithm>/<first two hex digits>/<hex>`.
fn blob_key(digest: &str) -> String {
    let (algorithm, hex) = digest.split_once(':').expect("algorithm:hex");
    format!("blobs/{algorithm}/{}/{hex}", &hex[..2])
}

/// An HTTP client that never follows redirects (tests assert on `Location` themselves).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("build reqwest client")
}

/// Uploads `data` as a blob with a single `POST ?digest=` and returns its digest.
pub async fn push_blob(server: &TestServer, repo: &str, data: &[u8]) -> String {
    let digest = sha256(data);
    let resp = client()
        .post(server.v2(&format!("{repo}/blobs/uploads/?digest={digest}")))
        .header("Content-Type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .expect("POST blob");
    assert_eq!(resp.status(), 201, "monolithic blob POST of {digest}");
    digest
}

/// `GET`s a blob: the status and the body.
pub async fn get_blob(server: &TestServer, repo: &str, digest: &str) -> (u16, Vec<u8>) {
    let resp = client()
        .get(server.v2(&format!("{repo}/blobs/{digest}")))
        .send()
        .await
        .expect("GET blob");
    let status = resp.status().as_u16();
    (status, resp.bytes().await.expect("body").to_vec())
}

/// Pushes a minimal OCI image (config + one layer + manifest) under `reference` and returns the
/// manifest's digest and bytes.
pub async fn push_image(server: &TestServer, repo: &str, reference: &str, layer: &[u8]) -> (String, Vec<u8>) {
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = push_blob(server, repo, config).await;
    let layer_digest = push_blob(server, repo, layer).await;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    });
    let body = serde_json::to_vec(&manifest).expect("serialise manifest");
    let resp = client()
        .put(server.v2(&format!("{repo}/manifests/{reference}")))
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .body(body.clone())
        .send()
        .await
        .expect("PUT manifest");
    assert_eq!(resp.status(), 201, "manifest PUT {repo}:{reference}");
    (sha256(&body), body)
}

/// The sum of the `series` samples at `server`'s `/metrics` whose labels include every one of
/// `labels` (each written `name="value"`); with no `labels`, a series without labels counts
/// too. 0 when there is none.
pub async fn metric(server: &TestServer, series: &str, labels: &[&str]) -> f64 {
    // A test server may serve TLS with a certificate of its own making.
    let text = reqwest::Client::builder()
        .tls_danger_accept_invalid_certs(true)
        .build()
        .expect("build reqwest client")
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|l| {
            l.strip_prefix(series)
                .is_some_and(|rest| rest.starts_with('{') || (labels.is_empty() && rest.starts_with(' ')))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `done` every 100 ms until it holds; fails after 60 s. The pause is between polls of a
/// condition, never a wait standing in for one.
pub async fn wait_until<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while !done().await {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "timed out waiting until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

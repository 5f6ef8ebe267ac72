//! What the registry benchmarks share (`benches/registry.rs`, `benches/replicas.rs`): Stowage
//! and moto processes on 127.0.0.1, the small test images and the client operations that push
//! them, the request-rate machinery with its CPU marks, and the machine description printed
//! with every table. Included with `#[path = "common/harness.rs"] mod harness;`.

use std::io::{BufRead, BufReader, Read as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::{Client, StatusCode, Url};
use sha2::Digest as _;

pub const MIB: usize = 1 << 20;
/// Request-rate workloads: concurrent connections.
pub const RATE_CONNS: usize = 64;
/// Request-rate workloads: unmeasured warm-up before the measured window.
pub const RATE_WARMUP: Duration = Duration::from_secs(1);
/// Small-image pushes: concurrent clients.
pub const IMAGE_WORKERS: usize = 16;
/// Small-image pushes: give up (and report what was done) after this long.
pub const IMAGE_DEADLINE: Duration = Duration::from_secs(120);
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

// ---------------------------------------------------------------------------------------------
// Server processes
// ---------------------------------------------------------------------------------------------

/// A registry process on 127.0.0.1. Dropping it (also while unwinding from a panic) kills the
/// process and removes its temporary data directory.
pub struct Server {
    pub label: &'static str,
    pub child: Child,
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub url: String,
    pub log: PathBuf,
    pub tmp: tempfile::TempDir,
    /// The client every workload uses against this server (with its credentials, if any).
    pub client: Client,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `{url}/v2/{path}`.
    pub fn v2(&self, path: &str) -> String {
        format!("{}/v2/{path}", self.url)
    }

    /// Peak resident set size (VmHWM) in KiB.
    pub fn vm_hwm_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// User + system CPU time of the process so far.
    pub fn cpu(&self) -> Duration {
        proc_cpu(&format!("/proc/{}/stat", self.pid()))
    }

    pub fn disk_usage(&self) -> u64 {
        dir_size(self.tmp.path())
    }

    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }
}

pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

pub fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

/// utime + stime from a `/proc/.../stat` file (clock ticks of 10 ms).
pub fn proc_cpu(stat_path: &str) -> Duration {
    let Ok(stat) = std::fs::read_to_string(stat_path) else {
        return Duration::ZERO;
    };
    // The command name (field 2) may contain spaces: count fields after its closing ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0 to find a free port")
        .port()
}

/// A moto S3 server on 127.0.0.1; killed when dropped.
pub struct S3Server {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub host: String,
}

impl S3Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A moto S3 server on 127.0.0.1 with one bucket, `bench`.
pub fn start_moto() -> S3Server {
    let server = start_moto_server();
    create_bucket(&server.host, "bench");
    server
}

/// A moto S3 server on 127.0.0.1 with no bucket yet (`$STOWAGE_TEST_PYTHON -m moto.server`).
pub fn start_moto_server() -> S3Server {
    let python = std::env::var("STOWAGE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let port = free_port();
    let child = Command::new(&python)
        .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("run {python} -m moto.server (pip install 'moto[server]'): {e}"));
    let mut server = S3Server {
        child,
        host: format!("127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("moto.server exited ({status}) before serving");
        }
        assert!(Instant::now() < deadline, "moto.server is not listening after 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

/// Creates `bucket` on the S3 server at `host` (`127.0.0.1:PORT`).
pub fn create_bucket(host: &str, bucket: &str) {
    let mut stream = TcpStream::connect(host).expect("connect to moto");
    let req = format!("PUT /{bucket} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    std::io::Write::write_all(&mut stream, req.as_bytes()).expect("create bucket");
    let mut resp = String::new();
    let _ = stream.read_to_string(&mut resp);
    assert!(
        resp.starts_with("HTTP/1.1 200"),
        "create bucket {bucket} on moto: {resp}"
    );
}

/// The environment that puts a Stowage server's blobs in `bucket` on the S3 server at `host`.
pub fn s3_envs(host: &str, bucket: &str) -> Vec<(&'static str, String)> {
    vec![
        ("STOWAGE_STORAGE__BACKEND", "s3".to_string()),
        ("STOWAGE_STORAGE__S3__BUCKET", bucket.to_string()),
        ("STOWAGE_STORAGE__S3__ENDPOINT", format!("http://{host}")),
        ("STOWAGE_STORAGE__S3__PATH_STYLE", "true".to_string()),
        ("AWS_ACCESS_KEY_ID", "bench".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "bench-secret".to_string()),
    ]
}

/// Starts `bin serve` on 127.0.0.1 (a free port) in a fresh temporary data directory, with
/// authentication off, `RUST_LOG=log_level` and `envs` (which may override any of that), and
/// waits for its `listening on http://…` line.
pub fn start_stowage_with(bin: &Path, log_level: &str, label: &'static str, envs: &[(&str, String)]) -> Server {
    let tmp = tempfile::Builder::new()
        .prefix("bench-stowage-")
        .tempdir()
        .expect("create temp dir");
    let data = tmp.path().join("data");
    let log = tmp.path().join("stowage.log");
    let log_file = std::fs::File::create(&log).expect("create log file");
    let mut cmd = Command::new(bin);
    // Stowage reads STOWAGE_* variables as settings: pass only the ones set here.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("STOWAGE_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .arg("serve")
        .env("STOWAGE_LISTEN", "127.0.0.1:0")
        .env("STOWAGE_DATA_DIR", &data)
        // Off, as Distribution runs in the registry benchmark (like with like); `envs` may turn
        // it on.
        .env("STOWAGE_AUTH__ENABLED", "false")
        .env("RUST_LOG", log_level)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    // Reads the `listening on http://…` line, then keeps draining stdout until the process ends.
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.split("listening on http://").nth(1)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or_default().to_string());
            }
        }
    });
    let mut server = Server {
        label,
        child,
        url: String::new(),
        log,
        tmp,
        client: client(),
    };
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(host) => server.url = format!("http://{host}"),
        Err(_) => {
            std::thread::sleep(Duration::from_millis(200));
            let status = match server.child.try_wait() {
                Ok(Some(s)) => format!("exited ({s})"),
                _ => "still running".to_string(),
            };
            panic!(
                "stowage did not print `stowage listening on http://…` on stdout within 60 s \
                 (process {status}); stderr tail:\n{}",
                server.log_tail()
            );
        }
    }
    server
}

/// Builds the release `stowage` binary (a no-op when it is fresh) and returns its path; or the
/// binary the environment variable `bin_var` names, when set.
pub fn build_stowage(bin_var: &str) -> PathBuf {
    if let Some(bin) = std::env::var_os(bin_var) {
        return PathBuf::from(bin);
    }
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("[bench] cargo build --release --bin stowage");
    let status = Command::new(&cargo)
        .args(["build", "--release", "--bin", "stowage"])
        .current_dir(manifest_dir)
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("run {cargo}: {e}"));
    assert!(
        status.success(),
        "`cargo build --release --bin stowage` failed ({status})"
    );
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir.join("target"));
    let bin = target_dir.join("release").join("stowage");
    assert!(bin.exists(), "{} missing after build", bin.display());
    bin
}

/// Runs `cmd args` and returns the first line of its output, giving up after 10 s.
pub fn command_version(cmd: &Path, args: &[&str]) -> String {
    let child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        return "unknown".into();
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return "unknown (timed out)".into();
            }
        }
    }
    let mut out = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if out.trim().is_empty()
        && let Some(mut s) = child.stderr.take()
    {
        let _ = s.read_to_string(&mut out);
    }
    out.lines().next().unwrap_or("unknown").trim().to_string()
}

pub fn machine_info() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "nproc {cpus}, CPU {model}, {:.1} GiB RAM, Linux {}, load average before run {}",
        mem_kib as f64 / (1024.0 * 1024.0),
        kernel.trim(),
        load.join(" ")
    )
}

// ---------------------------------------------------------------------------------------------
// Test data
// ---------------------------------------------------------------------------------------------

/// wyrand: a fast, deterministic PRNG (not for cryptography).
pub struct WyRand(u64);

impl WyRand {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) ^ t) as u64
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rem = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rem.copy_from_slice(&last[..rem.len()]);
    }
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

pub struct Blob {
    pub data: Bytes,
    pub digest: String,
}

impl Blob {
    pub fn random(size: usize, seed: u64) -> Blob {
        let mut data = vec![0u8; size];
        let mut rng = WyRand(seed);
        for piece in data.chunks_mut(MIB) {
            rng.fill(piece);
        }
        let digest = sha256(&data);
        Blob {
            data: data.into(),
            digest,
        }
    }

    pub fn from_vec(data: Vec<u8>) -> Blob {
        let digest = sha256(&data);
        Blob {
            data: data.into(),
            digest,
        }
    }
}

pub struct Image {
    pub tag: String,
    pub config: Blob,
    pub layer: Blob,
    pub manifest: Bytes,
}

impl Image {
    /// A small image whose config (~1 KiB), layer (4 KiB) and manifest are unique to `index`.
    pub fn small(index: usize, tag: String) -> Image {
        let padding = "x".repeat(900);
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["BENCH_INDEX={index}"],"Labels":{{"padding":"{padding}"}}}},"rootfs":{{"type":"layers","diff_ids":[]}}}}"#
        );
        let config = Blob::from_vec(config.into_bytes());
        let mut layer = vec![0u8; 4096];
        WyRand(0x5eed_0000 + index as u64).fill(&mut layer);
        let layer = Blob::from_vec(layer);
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config.digest,
                "size": config.data.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer.digest,
                "size": layer.data.len(),
            }],
        });
        let manifest = serde_json::to_vec(&manifest).expect("serialise manifest");
        Image {
            tag,
            config,
            layer,
            manifest: manifest.into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client operations (identical for every registry under test)
// ---------------------------------------------------------------------------------------------

pub fn client_builder() -> reqwest::ClientBuilder {
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .http1_only()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(RATE_CONNS * 2)
        .timeout(Duration::from_secs(300))
}

pub fn client() -> Client {
    client_builder().build().expect("build reqwest client")
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Res<T> = Result<T, BoxError>;

pub async fn expect_status(resp: reqwest::Response, want: StatusCode, what: &str) -> Res<reqwest::Response> {
    if resp.status() == want {
        return Ok(resp);
    }
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    Err(format!(
        "{what}: expected {want}, got {status}: {}",
        body.chars().take(500).collect::<String>()
    )
    .into())
}

/// The upload URL from a response's `Location` (absolute or relative), resolved against `base`.
pub fn location(base: &str, resp: &reqwest::Response) -> Res<String> {
    let loc = resp
        .headers()
        .get(LOCATION)
        .ok_or("response has no Location header")?
        .to_str()?;
    Ok(Url::parse(base)?.join(loc)?.to_string())
}

pub fn with_digest(url: &str, digest: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}digest={digest}")
}

/// POST /v2/<repo>/blobs/uploads/ -> upload URL.
pub async fn start_upload(c: &Client, base: &str, repo: &str) -> Res<String> {
    let resp = c
        .post(v2(base, &format!("{repo}/blobs/uploads/")))
        .header(CONTENT_LENGTH, 0)
        .send()
        .await?;
    let resp = expect_status(resp, StatusCode::ACCEPTED, "POST upload").await?;
    location(base, &resp)
}

/// `{base}/v2/{path}`.
pub fn v2(base: &str, path: &str) -> String {
    format!("{base}/v2/{path}")
}

/// POST, then PUT ?digest= with the whole blob as a streamed body.
/// POST + PUT ?digest= with the whole (small) body in the PUT.
pub async fn push_small_blob(c: &Client, base: &str, repo: &str, blob: &Blob) -> Res<()> {
    let url = start_upload(c, base, repo).await?;
    let resp = c
        .put(with_digest(&url, &blob.digest))
        .header(CONTENT_TYPE, "application/octet-stream")
        .body(blob.data.clone())
        .send()
        .await?;
    expect_status(resp, StatusCode::CREATED, "PUT ?digest= (small blob)").await?;
    Ok(())
}

pub async fn push_image(c: &Client, base: &str, repo: &str, img: &Image) -> Res<()> {
    push_small_blob(c, base, repo, &img.config).await?;
    push_small_blob(c, base, repo, &img.layer).await?;
    let resp = c
        .put(v2(base, &format!("{repo}/manifests/{}", img.tag)))
        .header(CONTENT_TYPE, OCI_MANIFEST)
        .body(img.manifest.clone())
        .send()
        .await?;
    expect_status(resp, StatusCode::CREATED, "PUT manifest").await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------------------------

/// One workload's outcome against one registry.
#[derive(Clone, Copy, Default)]
pub struct Measured {
    /// The figure of merit (MB/s, requests/s or images/s).
    pub value: f64,
    /// Seconds measured.
    pub secs: f64,
    /// Server CPU time (user + system) during the measured window.
    pub server_cpu: f64,
    /// CPU time of the database server the servers use (PostgreSQL: the postmaster and its
    /// backends) during the measured window; 0 without one.
    pub db_cpu: f64,
    /// CPU time of the object store's server the servers use (moto) during the measured window;
    /// 0 when not observed.
    pub store_cpu: f64,
    /// Benchmark client CPU time during the measured window.
    pub client_cpu: f64,
    /// CPU time used on the machine by anything else (other processes, interrupts) meanwhile.
    pub other_cpu: f64,
    /// Operations counted (bytes for throughput workloads).
    pub ops: f64,
    pub errors: u64,
}

/// What a workload runs against, as the CPU marks see it: one server, or several replicas with
/// the database and object store they share.
pub trait Observed {
    /// A name for progress lines.
    fn label(&self) -> &str;
    /// User + system CPU time of the server process(es) so far.
    fn server_cpu(&self) -> Duration;
    /// User + system CPU time of the database server so far (none by default).
    fn db_cpu(&self) -> Duration {
        Duration::ZERO
    }
    /// User + system CPU time of the object store's server so far (none by default).
    fn store_cpu(&self) -> Duration {
        Duration::ZERO
    }
}

impl Observed for Server {
    fn label(&self) -> &str {
        self.label
    }

    fn server_cpu(&self) -> Duration {
        self.cpu()
    }
}

pub fn self_cpu() -> Duration {
    proc_cpu("/proc/self/stat")
}

pub struct CpuMark {
    pub at: Instant,
    server: Duration,
    db: Duration,
    store: Duration,
    client: Duration,
    machine: Duration,
}

/// Busy CPU time of the whole machine (all cores) from `/proc/stat`, in ticks of 10 ms.
pub fn machine_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return Duration::ZERO;
    };
    // user nice system idle iowait irq softirq steal ...: everything but idle and iowait.
    let ticks: u64 = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

impl CpuMark {
    pub fn now(s: &(impl Observed + ?Sized)) -> CpuMark {
        CpuMark {
            at: Instant::now(),
            server: s.server_cpu(),
            db: s.db_cpu(),
            store: s.store_cpu(),
            client: self_cpu(),
            machine: machine_cpu(),
        }
    }

    /// A `Measured` for `ops` operations since this mark; `per_sec` = ops / seconds / `unit`.
    pub fn finish(&self, s: &(impl Observed + ?Sized), ops: f64, unit: f64, errors: u64) -> Measured {
        let secs = self.at.elapsed().as_secs_f64();
        let server_cpu = s.server_cpu().saturating_sub(self.server).as_secs_f64();
        let db_cpu = s.db_cpu().saturating_sub(self.db).as_secs_f64();
        let store_cpu = s.store_cpu().saturating_sub(self.store).as_secs_f64();
        let client_cpu = self_cpu().saturating_sub(self.client).as_secs_f64();
        let machine = machine_cpu().saturating_sub(self.machine).as_secs_f64();
        Measured {
            value: ops / secs / unit,
            secs,
            server_cpu,
            db_cpu,
            store_cpu,
            client_cpu,
            other_cpu: (machine - server_cpu - db_cpu - store_cpu - client_cpu).max(0.0),
            ops,
            errors,
        }
    }
}

/// Runs `RATE_CONNS` tasks that each loop `op` until the deadline; counts the operations that
/// complete in the measured window (after `RATE_WARMUP`).
pub async fn request_rate<F, Fut>(s: &(impl Observed + ?Sized), secs: Duration, op: F) -> Measured
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Res<()>> + Send,
{
    request_rate_with(s, secs, RATE_CONNS, op).await
}

/// [`request_rate`] with `conns` tasks (each on its own connection once warm).
pub async fn request_rate_with<F, Fut>(s: &(impl Observed + ?Sized), secs: Duration, conns: usize, op: F) -> Measured
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Res<()>> + Send,
{
    request_rate_per_conn(s, secs, conns, move |_| op()).await
}

/// [`request_rate_with`] whose `op` is told the index of the task (0..`conns`) that runs it, so
/// that each task may keep to one of several servers.
pub async fn request_rate_per_conn<F, Fut>(
    s: &(impl Observed + ?Sized),
    secs: Duration,
    conns: usize,
    op: F,
) -> Measured
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Res<()>> + Send,
{
    let op = Arc::new(op);
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let start = Instant::now();
    let measure_from = start + RATE_WARMUP;
    let end = measure_from + secs;
    let mut tasks = Vec::new();
    for conn in 0..conns {
        let (op, ok, errors, first_error) = (op.clone(), ok.clone(), errors.clone(), first_error.clone());
        tasks.push(tokio::spawn(async move {
            // Bounded in time (the deadline) and in count.
            for _ in 0..10_000_000u64 {
                if Instant::now() >= end {
                    break;
                }
                let result = op(conn).await;
                let now = Instant::now();
                match result {
                    Ok(()) if now >= measure_from && now < end => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(()) => {}
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.lock().unwrap().get_or_insert_with(|| e.to_string());
                        // Do not spin on a failing server.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let mark = CpuMark::now(s);
    tokio::time::sleep_until(end.into()).await;
    let mut m = mark.finish(s, 0.0, 1.0, 0);
    for t in tasks {
        t.await.expect("request task panicked");
    }
    m.ops = ok.load(Ordering::Relaxed) as f64;
    m.value = m.ops / m.secs;
    m.errors = errors.load(Ordering::Relaxed);
    if let Some(e) = first_error.lock().unwrap().take() {
        eprintln!("[bench] {}: {} errors, first: {e}", s.label(), m.errors);
    }
    m
}

/// Writes back dirty pages so one workload's writeback does not land in the next one's window.
pub fn sync_disks() {
    let _ = Command::new("sync").status();
}

/// Milliseconds spent so far waiting for the machine to go idle (bounded by `QUIET_TOTAL`).
pub static QUIET_WAITED_MS: AtomicU64 = AtomicU64::new(0);
/// Longest wait for an idle machine before one workload.
pub const QUIET_EACH: Duration = Duration::from_secs(20);
/// Longest total wait for an idle machine in one run.
pub const QUIET_TOTAL: Duration = Duration::from_secs(90);
/// "Idle": less than this share of one core busy over a 500 ms sample.
pub const QUIET_BUSY: f64 = 0.25;

/// Before a workload: flushes dirty pages, then waits (bounded) until nothing else keeps the
/// machine busy, so that a build or test running beside the benchmark does not land in a window.
pub async fn settle() {
    sync_disks();
    let start = Instant::now();
    let mut said = false;
    loop {
        let before = machine_cpu();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let busy = machine_cpu().saturating_sub(before).as_secs_f64() / 0.5;
        let waited = QUIET_WAITED_MS.load(Ordering::Relaxed) + start.elapsed().as_millis() as u64;
        if busy < QUIET_BUSY {
            break;
        }
        if start.elapsed() >= QUIET_EACH || waited >= QUIET_TOTAL.as_millis() as u64 {
            eprintln!("[bench] machine still busy ({:.0}% of a core); going on", busy * 100.0);
            break;
        }
        if !said {
            eprintln!(
                "[bench] waiting for the machine to go idle ({:.0}% of a core busy)",
                busy * 100.0
            );
            said = true;
        }
    }
    QUIET_WAITED_MS.fetch_add(start.elapsed().as_millis() as u64, Ordering::Relaxed);
}

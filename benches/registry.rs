//! Stowage vs. CNCF Distribution: one run starts both registries on 127.0.0.1 in fresh temporary
//! data directories and drives the same workloads, with the same client code, against each.
//!
//! Run with `cargo bench --bench registry`. See `benches/README.md` for what each workload does.
//! The server processes, test images, small-image pushes and request-rate machinery are in
//! `benches/common/harness.rs`, shared with `benches/replicas.rs`.
//!
//! Debug knobs (environment variables; the defaults are the real benchmark):
//! - `REGBENCH_BLOB_MIB`   size of the large blobs, MiB (default 1024)
//! - `REGBENCH_RATE_SECS`  measured seconds of each request-rate workload (default 10)
//! - `REGBENCH_IMAGES`     number of small images to push (default 1000)
//! - `REGBENCH_STOWAGE=distribution`  run a second Distribution in Stowage's place (to debug
//!   the client code while the server does not run yet)
//! - `REGBENCH_STOWAGE_LOG`        RUST_LOG for Stowage (default `error`)
//! - `REGBENCH_OVERHEAD=1`         instead of the comparison, measure what metrics and the
//!   access log cost on manifest GET (Stowage alone, in three configurations, interleaved)
//! - `REGBENCH_AUTH=0`             skip the third target, Stowage with authentication on (a real
//!   user; every request carries a Bearer token from the token flow, as docker and podman send)
//! - `REGBENCH_PARALLEL_UPLOADS`   concurrent uploads of the memory workload (default 32)
//! - `REGBENCH_PARALLEL_MIB`       size of each of them, MiB (default 256)
//! - `REGBENCH_UPLOAD_MEMORY_MIB`  Stowage's `storage.upload_memory` in MiB (default: Stowage's
//!   own default), to see what the upload memory budget costs in throughput
//! - `REGBENCH_ONLY_MEMORY=1`      run only the memory workload (with `REGBENCH_AUTH=0
//!   REGBENCH_S3=0` the quickest way to measure upload memory; the process holds less before it
//!   than after the other workloads, so its peak is a few MiB lower than in a full run)
//! - `REGBENCH_STOWAGE_BIN`        run this `stowage` binary instead of building the release one
//!   (to compare a build of another commit in the same run conditions)
//! - `REGBENCH_S3=0`               skip the S3 backend's run (Stowage on a moto S3 server on
//!   127.0.0.1, `$STOWAGE_TEST_PYTHON -m moto.server`; `scripts/test` installs moto)

#[path = "common/harness.rs"]
#[allow(dead_code)] // each benchmark uses part of it
mod harness;

use std::fmt::Write as _;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt as _;
use harness::*;
use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::{Client, StatusCode};

const DISTRIBUTION_BIN: &str = "/usr/bin/docker-registry";
/// Chunked upload: size of one PATCH.
const PATCH_SIZE: usize = 64 * MIB;
/// Download: runs per registry; the median is reported.
const DOWNLOAD_RUNS: usize = 3;
/// Request bodies are streamed in pieces of this size.
const STREAM_PIECE: usize = MIB;

// ---------------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------------

struct Settings {
    blob_size: usize,
    parallel_uploads: usize,
    parallel_size: usize,
    with_auth: bool,
    rate_secs: Duration,
    images: usize,
    stowage_is_distribution: bool,
    stowage_log: String,
    only_memory: bool,
}

impl Settings {
    fn from_env() -> Self {
        fn num(name: &str, default: u64) -> u64 {
            match std::env::var(name) {
                Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
                Err(_) => default,
            }
        }
        Settings {
            blob_size: num("REGBENCH_BLOB_MIB", 1024) as usize * MIB,
            parallel_uploads: num("REGBENCH_PARALLEL_UPLOADS", 32) as usize,
            parallel_size: num("REGBENCH_PARALLEL_MIB", 256) as usize * MIB,
            with_auth: std::env::var("REGBENCH_AUTH").map_or(true, |v| v != "0"),
            rate_secs: Duration::from_secs_f64(num("REGBENCH_RATE_SECS", 10) as f64),
            images: num("REGBENCH_IMAGES", 1000) as usize,
            stowage_is_distribution: std::env::var("REGBENCH_STOWAGE").is_ok_and(|v| v == "distribution"),
            stowage_log: std::env::var("REGBENCH_STOWAGE_LOG").unwrap_or_else(|_| "error".into()),
            only_memory: std::env::var("REGBENCH_ONLY_MEMORY").is_ok_and(|v| v == "1"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Server processes
// ---------------------------------------------------------------------------------------------

fn start_distribution(label: &'static str) -> Server {
    let tmp = tempfile::Builder::new()
        .prefix("bench-distribution-")
        .tempdir()
        .expect("create temp dir");
    let root = tmp.path().join("data");
    std::fs::create_dir_all(&root).expect("create data dir");
    let port = free_port();
    // The stock Debian config, minus auth, with the in-memory blob descriptor cache kept (that is
    // how Distribution is normally deployed), access log off and log level error.
    let config = format!(
        "version: 0.1\n\
         log:\n  level: error\n  accesslog:\n    disabled: true\n\
         storage:\n  cache:\n    blobdescriptor: inmemory\n  filesystem:\n    rootdirectory: {}\n  \
         delete:\n    enabled: true\n  redirect:\n    disable: true\n\
         http:\n  addr: 127.0.0.1:{port}\n",
        root.display()
    );
    let config_path = tmp.path().join("config.yml");
    std::fs::write(&config_path, config).expect("write distribution config");
    let log = tmp.path().join("registry.log");
    let log_file = std::fs::File::create(&log).expect("create log file");
    let mut cmd = Command::new(DISTRIBUTION_BIN);
    // Distribution reads REGISTRY_* variables as config overrides: start from the file alone.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("REGISTRY_") {
            cmd.env_remove(k);
        }
    }
    let child = cmd
        .arg("serve")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("dup log file"))
        .stderr(log_file)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {DISTRIBUTION_BIN}: {e}"));
    let mut server = Server {
        label,
        child,
        url: format!("http://127.0.0.1:{port}"),
        log,
        tmp,
        client: client(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!(
                "{label}: docker-registry exited ({status}) before serving; log:\n{}",
                server.log_tail()
            );
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        if Instant::now() > deadline {
            panic!(
                "{label}: docker-registry is not listening on port {port} after 30 s; log:\n{}",
                server.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

fn start_stowage(bin: &Path, log_level: &str) -> Server {
    start_stowage_with(bin, log_level, "Stowage", &[])
}

/// [`harness::start_stowage_with`] with `storage.upload_memory` from `REGBENCH_UPLOAD_MEMORY_MIB`
/// when set (`envs` may still override it).
fn start_stowage_with(bin: &Path, log_level: &str, label: &'static str, envs: &[(&str, String)]) -> Server {
    let mut all: Vec<(&str, String)> = std::env::var("REGBENCH_UPLOAD_MEMORY_MIB")
        .ok()
        .and_then(|m| m.parse::<usize>().ok())
        .map(|m| ("STOWAGE_STORAGE__UPLOAD_MEMORY", (m * MIB).to_string()))
        .into_iter()
        .collect();
    all.extend(envs.iter().cloned());
    harness::start_stowage_with(bin, log_level, label, &all)
}

/// The user the authenticated target's workloads run as.
const BENCH_USER: &str = "bench";
const BENCH_PASSWORD: &str = "bench-password-0123456789";
/// Repositories the workloads use: the authenticated client's token covers all of them.
const BENCH_REPOS: &[&str] = &[
    "bench/monolithic",
    "bench/chunked",
    "bench/small",
    "bench/images",
    "bench/parallel",
];

/// Stowage with authentication on, as it ships (the default policy: signed-in users pull and
/// push), and a user `bench` made with the CLI. Call [`sign_in`] before using its client.
fn start_stowage_auth(bin: &Path, log_level: &str) -> Server {
    let envs = [
        ("STOWAGE_AUTH__ENABLED", "true".to_string()),
        // One token for the whole run, as a client would keep one for its lifetime.
        ("STOWAGE_AUTH__TOKEN_TTL_SECS", "86400".to_string()),
    ];
    let server = start_stowage_with(bin, log_level, "Stowage auth", &envs);
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("STOWAGE_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .args(["user", "add", BENCH_USER])
        .env("STOWAGE_DATA_DIR", server.tmp.path().join("data"))
        .env("RUST_LOG", "error")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {} user add: {e}", bin.display()));
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("piped stdin");
        writeln!(stdin, "{BENCH_PASSWORD}").expect("write the password");
    }
    let out = child.wait_with_output().expect("stowage user add");
    assert!(
        out.status.success(),
        "stowage user add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    server
}

/// The token flow as docker speaks it: `GET /v2/` for the challenge, then the realm with Basic
/// credentials and one scope per repository; the server's client then sends that token on
/// every request.
async fn sign_in(s: &mut Server) {
    let c = client();
    let resp = c.get(s.v2("")).send().await.expect("GET /v2/");
    assert_eq!(
        resp.status(),
        StatusCode::UNAUTHORIZED,
        "{}: GET /v2/ without credentials",
        s.label
    );
    let challenge = resp
        .headers()
        .get_all("www-authenticate")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("Bearer "))
        .expect("a Bearer challenge")
        .to_owned();
    let param = |key: &str| {
        challenge
            .split(&format!("{key}=\""))
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_else(|| panic!("no {key} in {challenge}"))
            .to_owned()
    };
    let (realm, service) = (param("realm"), param("service"));
    let mut query = vec![("service".to_string(), service)];
    for repo in BENCH_REPOS {
        query.push(("scope".into(), format!("repository:{repo}:pull,push")));
    }
    let resp = c
        .get(&realm)
        .query(&query)
        .basic_auth(BENCH_USER, Some(BENCH_PASSWORD))
        .send()
        .await
        .expect("GET token");
    assert_eq!(resp.status(), StatusCode::OK, "{}: token", s.label);
    let body: serde_json::Value = resp.json().await.expect("token JSON");
    let token = body["token"].as_str().expect("token").to_owned();
    let mut headers = reqwest::header::HeaderMap::new();
    let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).expect("header value");
    value.set_sensitive(true);
    headers.insert(reqwest::header::AUTHORIZATION, value);
    s.client = client_builder().default_headers(headers).build().expect("client");
}

/// A request body that streams `data` in `STREAM_PIECE` pieces (zero-copy slices).
fn streamed_body(data: Bytes) -> reqwest::Body {
    let len = data.len();
    let pieces = (0..len)
        .step_by(STREAM_PIECE)
        .map(move |start| Ok::<_, std::io::Error>(data.slice(start..(start + STREAM_PIECE).min(len))));
    reqwest::Body::wrap_stream(futures_util::stream::iter(pieces))
}

// ---------------------------------------------------------------------------------------------
// Client operations (identical for both registries; the small-image ones are in `harness`)
// ---------------------------------------------------------------------------------------------

/// POST, then PUT ?digest= with the whole blob as a streamed body.
async fn upload_monolithic(c: &Client, base: &str, repo: &str, blob: &Blob) -> Res<()> {
    let url = start_upload(c, base, repo).await?;
    let resp = c
        .put(with_digest(&url, &blob.digest))
        .header(CONTENT_TYPE, "application/octet-stream")
        .header(CONTENT_LENGTH, blob.data.len())
        .body(streamed_body(blob.data.clone()))
        .send()
        .await?;
    expect_status(resp, StatusCode::CREATED, "PUT ?digest= (monolithic)").await?;
    Ok(())
}

/// POST, PATCH `PATCH_SIZE` chunks with Content-Range, then PUT ?digest= with no body.
async fn upload_chunked(c: &Client, base: &str, repo: &str, blob: &Blob) -> Res<()> {
    let mut url = start_upload(c, base, repo).await?;
    let len = blob.data.len();
    for start in (0..len).step_by(PATCH_SIZE) {
        let end = (start + PATCH_SIZE).min(len);
        let resp = c
            .patch(&url)
            .header(CONTENT_TYPE, "application/octet-stream")
            .header("Content-Range", format!("{start}-{}", end - 1))
            .header(CONTENT_LENGTH, end - start)
            .body(streamed_body(blob.data.slice(start..end)))
            .send()
            .await?;
        let resp = expect_status(resp, StatusCode::ACCEPTED, "PATCH chunk").await?;
        url = location(base, &resp)?;
    }
    let resp = c
        .put(with_digest(&url, &blob.digest))
        .header(CONTENT_LENGTH, 0)
        .send()
        .await?;
    expect_status(resp, StatusCode::CREATED, "PUT ?digest= (after PATCHes)").await?;
    Ok(())
}

/// GET the blob, stream and discard the body; returns the number of bytes received.
async fn download(c: &Client, base: &str, repo: &str, digest: &str) -> Res<u64> {
    let resp = c.get(v2(base, &format!("{repo}/blobs/{digest}"))).send().await?;
    let resp = expect_status(resp, StatusCode::OK, "GET blob").await?;
    let mut stream = resp.bytes_stream();
    let mut n = 0u64;
    while let Some(chunk) = stream.next().await {
        n += chunk?.len() as u64;
    }
    Ok(n)
}

// ---------------------------------------------------------------------------------------------
// Workloads
// ---------------------------------------------------------------------------------------------

fn progress(s: &Server, what: &str, m: &Measured, unit: &str) {
    eprintln!(
        "[bench] {:<13} {what:<28} {:>10.1} {unit:<6} ({:.2} s; CPU s: server {:.2}, client {:.2}, \
         other {:.2}; server VmHWM {:.1} MiB{})",
        s.label,
        m.value,
        m.secs,
        m.server_cpu,
        m.client_cpu,
        m.other_cpu,
        s.vm_hwm_kib().unwrap_or(0) as f64 / 1024.0,
        if m.errors > 0 {
            format!(", {} ERRORS", m.errors)
        } else {
            String::new()
        }
    );
}

async fn w_upload(c: &Client, s: &Server, blob: &Blob, chunked: bool) -> Measured {
    settle().await;
    let repo = if chunked { "bench/chunked" } else { "bench/monolithic" };
    let mark = CpuMark::now(s);
    let r = if chunked {
        upload_chunked(c, &s.url, repo, blob).await
    } else {
        upload_monolithic(c, &s.url, repo, blob).await
    };
    let mut m = mark.finish(s, blob.data.len() as f64, 1e6, 0);
    if let Err(e) = r {
        eprintln!("[bench] {}: upload failed: {e}", s.label);
        m.value = f64::NAN;
        m.errors = 1;
    }
    let what = if chunked {
        "1 GiB upload, chunked"
    } else {
        "1 GiB upload, monolithic"
    };
    progress(s, what, &m, "MB/s");
    m
}

/// Downloads the blob `DOWNLOAD_RUNS` times and keeps the median run.
async fn w_download(c: &Client, s: &Server, blob: &Blob) -> Measured {
    let mut runs = Vec::new();
    for _ in 0..DOWNLOAD_RUNS {
        settle().await;
        let mark = CpuMark::now(s);
        let r = download(c, &s.url, "bench/chunked", &blob.digest).await;
        let mut m = mark.finish(s, blob.data.len() as f64, 1e6, 0);
        match r {
            Ok(n) if n == blob.data.len() as u64 => {}
            Ok(n) => {
                eprintln!("[bench] {}: download got {n} bytes, want {}", s.label, blob.data.len());
                m.value = f64::NAN;
                m.errors = 1;
            }
            Err(e) => {
                eprintln!("[bench] {}: download failed: {e}", s.label);
                m.value = f64::NAN;
                m.errors = 1;
            }
        }
        progress(s, "1 GiB download", &m, "MB/s");
        if m.errors > 0 {
            return m;
        }
        runs.push(m);
    }
    runs.sort_by(|a, b| a.value.total_cmp(&b.value));
    runs[runs.len() / 2]
}

async fn w_manifest_get(c: &Client, s: &Server, img: &Image, secs: Duration) -> Measured {
    w_manifest_get_conns(c, s, img, secs, RATE_CONNS).await
}

/// Manifest GETs one after the other on one connection: latency, not concurrency.
async fn w_manifest_get_single(c: &Client, s: &Server, img: &Image, secs: Duration) -> Measured {
    w_manifest_get_conns(c, s, img, secs, 1).await
}

async fn w_manifest_get_conns(c: &Client, s: &Server, img: &Image, secs: Duration, conns: usize) -> Measured {
    settle().await;
    let url = s.v2(&format!("bench/small/manifests/{}", img.tag));
    let want = img.manifest.clone();
    // Sanity check: byte-exact manifest.
    let body = c
        .get(&url)
        .header(ACCEPT, MANIFEST_ACCEPT)
        .send()
        .await
        .expect("GET manifest");
    assert_eq!(body.status(), StatusCode::OK, "{}: GET manifest", s.label);
    assert_eq!(
        body.bytes().await.expect("manifest body"),
        want,
        "{}: manifest bytes",
        s.label
    );
    let c = c.clone();
    let m = request_rate_with(s, secs, conns, move || {
        let (c, url, want) = (c.clone(), url.clone(), want.len());
        async move {
            let resp = c.get(&url).header(ACCEPT, MANIFEST_ACCEPT).send().await?;
            let resp = expect_status(resp, StatusCode::OK, "GET manifest").await?;
            let body = resp.bytes().await?;
            if body.len() != want {
                return Err(format!("manifest body {} bytes, want {want}", body.len()).into());
            }
            Ok(())
        }
    })
    .await;
    progress(s, &format!("manifest GET, {conns} conns"), &m, "req/s");
    m
}

async fn w_blob_head(c: &Client, s: &Server, img: &Image, secs: Duration) -> Measured {
    settle().await;
    let url = s.v2(&format!("bench/small/blobs/{}", img.layer.digest));
    let size = img.layer.data.len().to_string();
    let c = c.clone();
    let m = request_rate(s, secs, move || {
        let (c, url, size) = (c.clone(), url.clone(), size.clone());
        async move {
            let resp = c.head(&url).send().await?;
            let resp = expect_status(resp, StatusCode::OK, "HEAD blob").await?;
            let len = resp.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok());
            if len != Some(size.as_str()) {
                return Err(format!("HEAD Content-Length {len:?}, want {size}").into());
            }
            Ok(())
        }
    })
    .await;
    progress(s, "blob HEAD, 64 conns", &m, "req/s");
    m
}

/// `n` concurrent monolithic uploads of `blob` (one stream each, as many CI jobs pushing a
/// large layer at once); the server's peak RSS during them, from a VmHWM reset just before
/// (`/proc/<pid>/clear_refs`, as root; otherwise the peak since the server started).
async fn w_parallel_uploads(s: &Server, blob: &Arc<Blob>, n: usize) -> (Measured, Option<u64>) {
    settle().await;
    let reset = std::fs::write(format!("/proc/{}/clear_refs", s.pid()), "5").is_ok();
    if !reset {
        eprintln!(
            "[bench] {}: cannot reset the peak RSS (not root?): reporting the peak since start",
            s.label
        );
    }
    let mark = CpuMark::now(s);
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (c, base, blob) = (s.client.clone(), s.url.clone(), blob.clone());
        tasks.push(tokio::spawn(async move {
            upload_monolithic(&c, &base, "bench/parallel", &blob).await
        }));
    }
    let mut errors = 0;
    for t in tasks {
        if let Err(e) = t.await.expect("upload task panicked") {
            if errors == 0 {
                eprintln!("[bench] {}: parallel upload failed: {e}", s.label);
            }
            errors += 1;
        }
    }
    let m = mark.finish(s, (blob.data.len() * n) as f64, 1e6, errors);
    let peak = s.vm_hwm_kib();
    progress(s, &format!("{n} parallel uploads"), &m, "MB/s");
    (m, peak)
}

async fn w_image_pushes(c: &Client, s: &Server, images: &Arc<Vec<Image>>) -> Measured {
    settle().await;
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mark = CpuMark::now(s);
    let deadline = mark.at + IMAGE_DEADLINE;
    let mut tasks = Vec::new();
    for _ in 0..IMAGE_WORKERS {
        let (c, images, next, done, errors) = (c.clone(), images.clone(), next.clone(), done.clone(), errors.clone());
        let base = s.url.clone();
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
                            eprintln!("[bench] image push failed: {e}");
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
    let m = mark.finish(s, n as f64, 1.0, errors.load(Ordering::Relaxed));
    if n < images.len() {
        eprintln!("[bench] {}: only {n} of {} images pushed", s.label, images.len());
    }
    // Spot check: the last image is there.
    let last = &images[images.len() - 1];
    let resp = c
        .get(s.v2(&format!("bench/images/manifests/{}", last.tag)))
        .header(ACCEPT, MANIFEST_ACCEPT)
        .send()
        .await
        .expect("GET pushed manifest");
    if resp.status() != StatusCode::OK {
        eprintln!(
            "[bench] {}: pushed manifest {} answers {}",
            s.label,
            last.tag,
            resp.status()
        );
    }
    progress(s, "small image pushes, 16 cl.", &m, "img/s");
    m
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

struct Row {
    name: &'static str,
    dist: Measured,
    stow: Measured,
    /// Stowage with authentication on (when that target ran).
    auth: Option<Measured>,
    /// Minimum Stowage/Distribution ratio.
    goal: f64,
}

/// Largest cost of authentication accepted on a request-rate workload: auth-on at least this
/// share of auth-off.
const AUTH_GOAL: f64 = 0.9;

fn fmt_value(m: &Measured) -> String {
    if m.value.is_nan() {
        "FAILED".into()
    } else if m.errors > 0 {
        format!("{:.1} ({} err)", m.value, m.errors)
    } else {
        format!("{:.1}", m.value)
    }
}

fn report(
    rows: &[Row],
    rss_1g: (Option<u64>, Option<u64>),
    rss_end: (Option<u64>, Option<u64>),
    stow_label: &str,
) -> String {
    let mut out = String::new();
    let mib = |k: Option<u64>| k.map_or("n/a".to_string(), |k| format!("{:.1}", k as f64 / 1024.0));
    let _ = writeln!(
        out,
        "| {:<40} | {:>14} | {:>14} | {:>7} | {:<18} | {:<4} | {:>16} | {:>9} | {:>8} | {:<4} |",
        "workload", "Distribution", stow_label, "ratio", "goal", "met", "Stowage auth on", "vs Dist.", "on/off", "met"
    );
    let _ = writeln!(
        out,
        "|{:-<42}|{:->16}|{:->16}|{:->9}|{:-<20}|{:-<6}|{:->18}|{:->11}|{:->10}|{:-<6}|",
        "", "", "", "", "", "", "", "", "", ""
    );
    for r in rows {
        let ratio = r.stow.value / r.dist.value;
        let met = if ratio.is_nan() || r.stow.errors > 0 {
            "NO"
        } else if ratio >= r.goal {
            "yes"
        } else {
            "NO"
        };
        let (auth, vs_dist, on_off, auth_met) = match &r.auth {
            Some(a) => {
                let on_off = a.value / r.stow.value;
                // The goal applies to the request-rate workloads, where auth is per request.
                let auth_met = if !(r.name.contains("req/s") || r.name.contains("img/s")) {
                    ""
                } else if on_off >= AUTH_GOAL && a.errors == 0 {
                    "yes"
                } else {
                    "NO"
                };
                (
                    fmt_value(a),
                    format!("{:.2}x", a.value / r.dist.value),
                    format!("{on_off:.2}"),
                    auth_met,
                )
            }
            None => ("-".into(), "-".into(), "-".into(), ""),
        };
        let _ = writeln!(
            out,
            "| {:<40} | {:>14} | {:>14} | {:>6.2}x | {:<18} | {:<4} | {:>16} | {:>9} | {:>8} | {:<4} |",
            r.name,
            fmt_value(&r.dist),
            fmt_value(&r.stow),
            ratio,
            format!(">= {}x", r.goal),
            met,
            auth,
            vs_dist,
            on_off,
            auth_met
        );
    }
    let rss_met = match rss_1g.1 {
        Some(k) if k < 64 * 1024 => "yes",
        _ => "NO",
    };
    let _ = writeln!(
        out,
        "(auth on: a real user, and a Bearer token from the token flow on every request; the goal \
         is on/off >= {AUTH_GOAL} on the request-rate rows. Distribution runs without authentication.)"
    );
    let _ = writeln!(
        out,
        "| {:<40} | {:>14} | {:>14} | {:>7} | {:<18} | {:<4} |",
        "peak RSS after 1 GiB workloads (MiB)",
        mib(rss_1g.0),
        mib(rss_1g.1),
        "",
        "Stowage < 64 MiB",
        rss_met
    );
    let _ = writeln!(
        out,
        "| {:<40} | {:>14} | {:>14} | {:>7} | {:<18} | {:<4} |",
        "peak RSS at end of run (MiB)",
        mib(rss_end.0),
        mib(rss_end.1),
        "",
        "(reference)",
        ""
    );
    out
}

fn s3_report(rows: &[Row], s3: &[Measured; 3], rss_1g: (Option<u64>, Option<u64>), rss_s3: Option<u64>) -> String {
    let mut out = String::new();
    let mib = |k: Option<u64>| k.map_or("n/a".to_string(), |k| format!("{:.1}", k as f64 / 1024.0));
    let _ = writeln!(
        out,
        "| {:<40} | {:>18} | {:>14} | {:>14} |",
        "workload", "Distribution (fs)", "Stowage (fs)", "Stowage (S3)"
    );
    let _ = writeln!(out, "|{:-<42}|{:->20}|{:->16}|{:->16}|", "", "", "", "");
    for (r, m) in rows.iter().zip(s3.iter()) {
        let _ = writeln!(
            out,
            "| {:<40} | {:>18} | {:>14} | {:>14} |",
            r.name,
            fmt_value(&r.dist),
            fmt_value(&r.stow),
            fmt_value(m)
        );
    }
    let _ = writeln!(
        out,
        "| {:<40} | {:>18} | {:>14} | {:>14} |",
        "peak RSS after 1 GiB workloads (MiB)",
        mib(rss_1g.0),
        mib(rss_1g.1),
        mib(rss_s3)
    );
    out
}

fn cpu_report(rows: &[Row], stow_label: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| {:<40} | {:>16} | {:>16} | {:>16} | {:>15} | {:>15} |",
        "server CPU per operation", "Distribution", stow_label, "Stowage auth on", "client CPU %", "other CPU %"
    );
    let _ = writeln!(
        out,
        "|{:-<42}|{:->18}|{:->18}|{:->18}|{:->17}|{:->17}|",
        "", "", "", "", "", ""
    );
    for r in rows {
        let (unit, scale, per) = if r.name.contains("MB/s") {
            ("ms/GiB", 1e3, (1u64 << 30) as f64)
        } else {
            ("us/op", 1e6, 1.0)
        };
        let per_op = |m: &Measured| {
            if m.ops > 0.0 {
                format!("{:.1} {unit}", m.server_cpu / (m.ops / per) * scale)
            } else {
                "n/a".into()
            }
        };
        let _ = writeln!(
            out,
            "| {:<40} | {:>16} | {:>16} | {:>16} | {:>6.0} / {:>6.0} | {:>6.0} / {:>6.0} |",
            r.name,
            per_op(&r.dist),
            per_op(&r.stow),
            r.auth.as_ref().map_or("-".into(), per_op),
            r.dist.client_cpu / r.dist.secs * 100.0,
            r.stow.client_cpu / r.stow.secs * 100.0,
            r.dist.other_cpu / r.dist.secs * 100.0,
            r.stow.other_cpu / r.stow.secs * 100.0,
        );
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------------

/// Rounds of the overhead measurement; each runs every configuration once, in turn, so that a
/// change in the machine's load falls on all of them alike. The median round is reported.
const OVERHEAD_ROUNDS: usize = 5;

/// `REGBENCH_OVERHEAD=1`: manifest GET at `RATE_CONNS` connections against Stowage with metrics
/// and the access log off, metrics on, and both on (the access log written at `info` to a
/// file, as in production). Prints requests per second and server CPU per request.
fn overhead_main(bin: &Path, settings: &Settings) -> ExitCode {
    type Config<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);
    let configs: [Config; 3] = [
        (
            "metrics off, access log off",
            "error",
            &[("STOWAGE_METRICS__ENABLED", "false")],
        ),
        ("metrics on, access log off", "error", &[]),
        ("metrics on, access log on (info)", "info", &[]),
    ];
    let small = Image::small(usize::MAX, "latest".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut results: Vec<Vec<(f64, f64)>> = vec![Vec::new(); configs.len()];
    for round in 0..OVERHEAD_ROUNDS {
        for (i, (label, log, envs)) in configs.iter().enumerate() {
            let envs: Vec<(&str, String)> = envs.iter().map(|(k, v)| (*k, v.to_string())).collect();
            let server = start_stowage_with(bin, log, "Stowage", &envs);
            let m = rt.block_on(async {
                let c = client();
                push_image(&c, &server.url, "bench/small", &small)
                    .await
                    .unwrap_or_else(|e| panic!("push small image: {e}"));
                w_manifest_get(&c, &server, &small, settings.rate_secs).await
            });
            let cpu_us = m.server_cpu / m.ops.max(1.0) * 1e6;
            eprintln!(
                "[overhead] round {} {label}: {:.0} req/s, {cpu_us:.1} µs server CPU per request, {} errors",
                round + 1,
                m.value,
                m.errors
            );
            results[i].push((m.value, cpu_us));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (mut base_rate, mut base_cpu) = (0.0, 0.0);
    println!(
        "| manifest GET, {RATE_CONNS} conns, median of {OVERHEAD_ROUNDS} | req/s | server CPU µs/req | CPU vs. both off |"
    );
    println!("|---|---:|---:|---:|");
    for (i, (label, _, _)) in configs.iter().enumerate() {
        let rate = median(&mut results[i].iter().map(|r| r.0).collect());
        let cpu = median(&mut results[i].iter().map(|r| r.1).collect());
        if i == 0 {
            (base_rate, base_cpu) = (rate, cpu);
        }
        println!(
            "| {label} | {rate:.0} ({:+.1} %) | {cpu:.1} | {:+.1} % |",
            (rate / base_rate - 1.0) * 100.0,
            (cpu / base_cpu - 1.0) * 100.0
        );
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let settings = Settings::from_env();
    if std::env::var("REGBENCH_OVERHEAD").is_ok_and(|v| v == "1") {
        return overhead_main(&build_stowage("REGBENCH_STOWAGE_BIN"), &settings);
    }
    if !Path::new(DISTRIBUTION_BIN).exists() {
        eprintln!(
            "error: {DISTRIBUTION_BIN} is missing. This benchmark compares Stowage with CNCF \
             Distribution; install it with `apt-get install docker-registry` and run again."
        );
        return ExitCode::from(2);
    }
    let stowage_bin = if settings.stowage_is_distribution {
        None
    } else {
        Some(build_stowage("REGBENCH_STOWAGE_BIN"))
    };

    let machine = machine_info();
    let dist_version = command_version(Path::new(DISTRIBUTION_BIN), &["--version"]);
    let stow_version = match &stowage_bin {
        Some(bin) => command_version(bin, &["--version"]),
        None => "(replaced by a second Distribution: REGBENCH_STOWAGE=distribution)".into(),
    };

    eprintln!("[bench] generating test data (not timed)");
    let size = settings.blob_size;
    let mono = Blob::random(size, 0x1111);
    let chunked = Blob::random(size, 0x2222);
    let small = Image::small(usize::MAX, "latest".into());
    let images: Arc<Vec<Image>> = Arc::new(
        (0..settings.images)
            .map(|i| Image::small(i, format!("img-{i:05}")))
            .collect(),
    );

    eprintln!("[bench] starting registries");
    let dist = start_distribution("Distribution");
    let stow = match &stowage_bin {
        Some(bin) => start_stowage(bin, &settings.stowage_log),
        None => start_distribution("Dist-as-Stow"),
    };
    let mut auth = match &stowage_bin {
        Some(bin) if settings.with_auth => Some(start_stowage_auth(bin, &settings.stowage_log)),
        _ => None,
    };
    for s in [&dist, &stow].into_iter().chain(auth.as_ref()) {
        eprintln!(
            "[bench] {} at {} (pid {}, VmHWM {:.1} MiB)",
            s.label,
            s.url,
            s.pid(),
            s.vm_hwm_kib().unwrap_or(0) as f64 / 1024.0
        );
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Some(a) = auth.as_mut() {
        rt.block_on(sign_in(a));
    }
    let started = Instant::now();
    let outcome = rt.block_on(async {
        tokio::select! {
            r = run(&settings, &dist, &stow, auth.as_ref(), &mono, &chunked, &small, &images) => Some(r),
            _ = tokio::signal::ctrl_c() => None,
        }
    });
    let Some(Outcome {
        rows,
        rss_1g,
        rss_end,
        parallel,
    }) = outcome
    else {
        eprintln!("[bench] interrupted; stopping the registries");
        return ExitCode::from(130);
    };
    let blob_label = if size == 1 << 30 {
        "1 GiB".to_string()
    } else {
        format!("{} MiB", size / MIB)
    };
    println!();
    println!("Stowage vs CNCF Distribution, all traffic on 127.0.0.1 (client and servers share the machine)");
    println!("machine:      {machine}");
    println!("Distribution: {dist_version}");
    println!("Stowage:      {stow_version}");
    println!(
        "client:       reqwest 0.13 (HTTP/1.1), {RATE_CONNS} conns for rates ({}s + {}s warm-up), \
         {IMAGE_WORKERS} clients for pushes; blobs {blob_label}, PATCH {} MiB; MB = 10^6 bytes",
        settings.rate_secs.as_secs_f64(),
        RATE_WARMUP.as_secs_f64(),
        PATCH_SIZE / MIB
    );
    println!();
    if !rows.is_empty() {
        print!("{}", report(&rows, rss_1g, rss_end, stow.label));
        println!();
        print!("{}", cpu_report(&rows, stow.label));
        println!();
    }
    if !parallel.is_empty() {
        println!(
            "Memory with {} uploads of {} MiB at once (monolithic PUT each; peak RSS from a VmHWM reset \
             just before):",
            settings.parallel_uploads,
            settings.parallel_size / MIB
        );
        println!();
        println!("| {:<14} | {:>12} | {:>18} |", "registry", "MB/s", "peak RSS (MiB)");
        println!("|{:-<16}|{:->14}|{:->20}|", "", "", "");
        for (label, m, peak) in &parallel {
            println!(
                "| {label:<14} | {:>12} | {:>18} |",
                fmt_value(m),
                peak.map_or("n/a".into(), |k| format!("{:.1}", k as f64 / 1024.0))
            );
        }
        println!();
    }
    // Printed above before the S3 run, so that a failure there loses nothing measured.
    // The S3 backend: the large-blob workloads against Stowage with its blobs on a moto S3
    // server on loopback, after the fs servers are done (they stay up, idle).
    let s3_rows = match (&stowage_bin, std::env::var("REGBENCH_S3").as_deref()) {
        (Some(_), Ok("0")) => None,
        (Some(_), _) if settings.only_memory => None,
        (Some(bin), _) => {
            eprintln!("[bench] starting moto (S3) and Stowage on S3");
            let moto = start_moto();
            let envs = s3_envs(&moto.host, "bench");
            let s3 = start_stowage_with(bin, &settings.stowage_log, "Stowage-S3", &envs);
            let c = client();
            let (m1, m2, m3) = rt.block_on(async {
                let m1 = w_upload(&c, &s3, &mono, false).await;
                let m2 = w_upload(&c, &s3, &chunked, true).await;
                let m3 = w_download(&c, &s3, &chunked).await;
                (m1, m2, m3)
            });
            let rss = s3.vm_hwm_kib();
            drop(s3);
            drop(moto);
            Some(([m1, m2, m3], rss))
        }
        (None, _) => None,
    };
    drop(rt);
    let disk = (dist.disk_usage(), stow.disk_usage());
    let stow_label = stow.label;
    drop(auth);
    drop(stow);
    drop(dist);

    if let Some((s3, rss)) = &s3_rows {
        println!("S3 backend (Stowage with its blobs on moto's S3 server on 127.0.0.1; moto is a Python");
        println!("server holding objects in memory, so these figures measure moto as much as Stowage):");
        println!();
        print!("{}", s3_report(&rows, s3, rss_1g, *rss));
        println!();
    }
    let disturbed: Vec<&str> = rows
        .iter()
        .filter(|r| [&r.dist, &r.stow].iter().any(|m| m.other_cpu / m.secs > 0.5))
        .map(|r| r.name)
        .collect();
    if !disturbed.is_empty() {
        println!(
            "WARNING: more than half a core was busy outside the two servers and the client during: {}. \
             Something else ran on the machine (or the kernel's writeback threads were busy): treat those \
             rates with care and compare server CPU per operation instead.",
            disturbed.join("; ")
        );
    }
    println!(
        "data dir size at end: Distribution {:.1} MiB, {} {:.1} MiB; total run {:.0} s \
         (of which {:.0} s waiting for an idle machine)",
        disk.0 as f64 / MIB as f64,
        stow_label,
        disk.1 as f64 / MIB as f64,
        started.elapsed().as_secs_f64(),
        QUIET_WAITED_MS.load(Ordering::Relaxed) as f64 / 1000.0
    );
    ExitCode::SUCCESS
}

type RssPair = (Option<u64>, Option<u64>);

/// What one run measured: the rows, the peak RSS after the 1 GiB workloads and at the end, and
/// the memory workload (each registry's rate and peak RSS).
struct Outcome {
    rows: Vec<Row>,
    rss_1g: RssPair,
    rss_end: RssPair,
    parallel: Vec<(&'static str, Measured, Option<u64>)>,
}

#[allow(clippy::too_many_arguments)]
async fn run(
    settings: &Settings,
    dist: &Server,
    stow: &Server,
    auth: Option<&Server>,
    mono: &Blob,
    chunked: &Blob,
    small: &Image,
    images: &Arc<Vec<Image>>,
) -> Outcome {
    let mut targets = vec![dist, stow];
    targets.extend(auth);
    for s in &targets {
        let resp = s.client.get(s.v2("")).send().await.expect("GET /v2/");
        assert_eq!(resp.status(), StatusCode::OK, "{}: GET /v2/", s.label);
    }
    let secs = settings.rate_secs;
    let mut rows = Vec::new();
    // Each workload against every target in turn; a row from the figures.
    let row = |name: &'static str, goal: f64, m: Vec<Measured>| Row {
        name,
        dist: m[0],
        stow: m[1],
        auth: m.get(2).copied(),
        goal,
    };

    if settings.only_memory {
        let blob = Arc::new(Blob::random(settings.parallel_size, 0x3333));
        let mut parallel = Vec::new();
        for s in [dist, stow] {
            let (m, peak) = w_parallel_uploads(s, &blob, settings.parallel_uploads).await;
            parallel.push((s.label, m, peak));
        }
        return Outcome {
            rows,
            rss_1g: (None, None),
            rss_end: (None, None),
            parallel,
        };
    }
    let mut m = Vec::new();
    for s in &targets {
        m.push(w_upload(&s.client, s, mono, false).await);
    }
    rows.push(row("1 GiB upload, monolithic (MB/s)", 1.2, std::mem::take(&mut m)));
    for s in &targets {
        m.push(w_upload(&s.client, s, chunked, true).await);
    }
    rows.push(row("1 GiB upload, chunked 64 MiB (MB/s)", 1.2, std::mem::take(&mut m)));
    for s in &targets {
        m.push(w_download(&s.client, s, chunked).await);
    }
    rows.push(row("1 GiB download (MB/s)", 1.0, std::mem::take(&mut m)));
    let rss_1g = (dist.vm_hwm_kib(), stow.vm_hwm_kib());

    for s in &targets {
        push_image(&s.client, &s.url, "bench/small", small)
            .await
            .unwrap_or_else(|e| panic!("{}: push small image: {e}", s.label));
    }
    for s in &targets {
        m.push(w_manifest_get(&s.client, s, small, secs).await);
    }
    rows.push(row(
        "manifest GET by tag, 64 conns (req/s)",
        5.0,
        std::mem::take(&mut m),
    ));
    for s in &targets {
        m.push(w_manifest_get_single(&s.client, s, small, secs).await);
    }
    rows.push(row("manifest GET by tag, 1 conn (req/s)", 5.0, std::mem::take(&mut m)));
    for s in &targets {
        m.push(w_blob_head(&s.client, s, small, secs).await);
    }
    rows.push(row("blob HEAD, 64 conns (req/s)", 5.0, std::mem::take(&mut m)));
    for s in &targets {
        m.push(w_image_pushes(&s.client, s, images).await);
    }
    rows.push(row(
        "small image pushes, 16 clients (img/s)",
        3.0,
        std::mem::take(&mut m),
    ));
    let rss_end = (dist.vm_hwm_kib(), stow.vm_hwm_kib());

    // Memory under many uploads at once: Distribution and Stowage (authentication does not
    // change how an upload is buffered). The blob is made here and dropped after.
    let mut parallel = Vec::new();
    if settings.parallel_uploads > 0 {
        let blob = Arc::new(Blob::random(settings.parallel_size, 0x3333));
        for s in [dist, stow] {
            let (m, peak) = w_parallel_uploads(s, &blob, settings.parallel_uploads).await;
            parallel.push((s.label, m, peak));
        }
    }
    Outcome {
        rows,
        rss_1g,
        rss_end,
        parallel,
    }
}

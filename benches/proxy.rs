//! Pull-through cache throughput (issue 16): a pull from an upstream Stowage directly, the first
//! pull through a mirroring Stowage (cold: the mirror fetches and stores), a pull of the cached
//! copy, and, as the reference for the cached pull, a pull of the same image pushed to a hosted
//! repository of the mirror itself.
//!
//! Run with `cargo bench --bench proxy` (release build; it first runs `cargo build --release
//! --bin stowage`). Both servers are `stowage serve` processes on 127.0.0.1, local disk, no
//! authentication, each in a fresh temporary data directory removed at the end; the mirror's
//! `[[proxy]]` entry maps `hub/` to the upstream with `tag_ttl = "1h"` (no re-validation while
//! the benchmark runs).
//!
//! Workloads:
//! - **large**: one image with one 1 GiB layer. A pull is the manifest `GET` by tag, then the
//!   config and the layer `GET`s, the bodies streamed and discarded (as the registry benchmark's
//!   download). Direct, cached and hosted are the median of 3 pulls; cold is one pull (the
//!   manifest `GET` fetches and stores every blob before it answers, so its time is the
//!   upstream transfer plus the store, then the layer is served from the store). A second
//!   1 GiB layer is pulled cold by its blob `GET` alone, which streams it from the tee while it
//!   is fetched (what a client sees that asks for the blob first).
//! - **small**: 200 images of a ~1 KiB config and a 4 KiB layer, each in its own repository,
//!   pulled (manifest by tag, config, layer) by 16 clients. Direct, cached and hosted run over
//!   all images for at least 5 s each (cycling), in three interleaved rounds (the median of
//!   each); cold is one pass over the 200 (after a warm-up pass of direct and hosted).
//!
//! Output: MB/s (body bytes of blobs and manifests) and images/s, and the ratios cached/direct,
//! cold/direct and cached/hosted.
//!
//! Knobs: `PROXYBENCH_BLOB_MIB` (default 1024), `PROXYBENCH_IMAGES` (default 200),
//! `PROXYBENCH_CLIENTS` (default 16), `PROXYBENCH_SECS` (default 5).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt as _;
use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::{Client, StatusCode};
use sha2::Digest as _;

const MIB: usize = 1 << 20;
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const LARGE_RUNS: usize = 3;
const SMALL_ROUNDS: usize = 3;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

fn num(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

// ---------------------------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------------------------

/// A `stowage serve` on 127.0.0.1; killed, and its data directory removed, on drop.
struct Server {
    child: Child,
    url: String,
    tmp: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(bin: &Path, config: Option<&str>) -> Server {
        let tmp = tempfile::Builder::new()
            .prefix("bench-proxy-")
            .tempdir()
            .expect("create temp dir");
        let log = std::fs::File::create(tmp.path().join("stowage.log")).expect("create log file");
        let mut cmd = Command::new(bin);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("STOWAGE_") {
                cmd.env_remove(k);
            }
        }
        if let Some(config) = config {
            let path = tmp.path().join("stowage.toml");
            std::fs::write(&path, config).expect("write config");
            cmd.env("STOWAGE_CONFIG", path);
        }
        let mut child = cmd
            .arg("serve")
            .env("STOWAGE_LISTEN", "127.0.0.1:0")
            .env("STOWAGE_DATA_DIR", tmp.path().join("data"))
            .env("STOWAGE_AUTH__ENABLED", "false")
            .env(
                "RUST_LOG",
                std::env::var("PROXYBENCH_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
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
        let host = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| {
            let log = std::fs::read_to_string(tmp.path().join("stowage.log")).unwrap_or_default();
            panic!("stowage did not start within 60 s:\n{log}")
        });
        Server {
            child,
            url: format!("http://{host}"),
            tmp,
        }
    }

    fn v2(&self, path: &str) -> String {
        format!("{}/v2/{path}", self.url)
    }
}

/// Builds the release `stowage` binary (a no-op when it is fresh) and returns its path.
fn build_stowage() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("[proxy bench] cargo build --release --bin stowage");
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
    target_dir.join("release").join("stowage")
}

fn machine_info() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!("nproc {cpus}, CPU {model}, load average before run {}", load.join(" "))
}

// ---------------------------------------------------------------------------------------------
// Data and client operations
// ---------------------------------------------------------------------------------------------

/// wyrand: a fast, deterministic PRNG (not for cryptography).
struct WyRand(u64);

impl WyRand {
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
            let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
            let v = (((t >> 64) ^ t) as u64).to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

struct Blob {
    data: Bytes,
    digest: String,
}

impl Blob {
    fn new(data: Vec<u8>) -> Blob {
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&data)));
        Blob {
            data: data.into(),
            digest,
        }
    }

    fn random(size: usize, seed: u64) -> Blob {
        let mut data = vec![0u8; size];
        WyRand(seed).fill(&mut data);
        Blob::new(data)
    }
}

/// An image of one config and one layer, in repository `repo` under tag `v1`.
struct Image {
    repo: String,
    config: Blob,
    layer: Blob,
    manifest: Bytes,
}

impl Image {
    fn new(repo: String, layer: Blob, seed: u64) -> Image {
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["SEED={seed}"],"Labels":{{"padding":"{}"}}}},"rootfs":{{"type":"layers","diff_ids":[]}}}}"#,
            "x".repeat(900)
        );
        let config = Blob::new(config.into_bytes());
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.digest, "size": config.data.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer.digest, "size": layer.data.len()}],
        }))
        .expect("serialise manifest");
        Image {
            repo,
            config,
            layer,
            manifest: manifest.into(),
        }
    }

    fn bytes(&self) -> u64 {
        (self.config.data.len() + self.layer.data.len() + self.manifest.len()) as u64
    }
}

fn client() -> Client {
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .http1_only()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(64)
        .timeout(Duration::from_secs(300))
        .build()
        .expect("build reqwest client")
}

async fn expect(resp: reqwest::Response, want: StatusCode, what: &str) -> Res<reqwest::Response> {
    if resp.status() == want {
        return Ok(resp);
    }
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    Err(format!("{what}: expected {want}, got {status}: {body}").into())
}

async fn push_blob(c: &Client, s: &Server, repo: &str, blob: &Blob) -> Res<()> {
    let resp = c.post(s.v2(&format!("{repo}/blobs/uploads/"))).send().await?;
    let resp = expect(resp, StatusCode::ACCEPTED, "POST upload").await?;
    let location = resp
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or("no Location")?
        .to_owned();
    let url = if location.starts_with('/') {
        format!("{}{location}", s.url)
    } else {
        location
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    let resp = c
        .put(format!("{url}{sep}digest={}", blob.digest))
        .header(CONTENT_TYPE, "application/octet-stream")
        .header(CONTENT_LENGTH, blob.data.len())
        .body(blob.data.clone())
        .send()
        .await?;
    expect(resp, StatusCode::CREATED, "PUT blob").await?;
    Ok(())
}

async fn push_image(c: &Client, s: &Server, repo: &str, img: &Image) -> Res<()> {
    push_blob(c, s, repo, &img.config).await?;
    push_blob(c, s, repo, &img.layer).await?;
    let resp = c
        .put(s.v2(&format!("{repo}/manifests/v1")))
        .header(CONTENT_TYPE, OCI_MANIFEST)
        .body(img.manifest.clone())
        .send()
        .await?;
    expect(resp, StatusCode::CREATED, "PUT manifest").await?;
    Ok(())
}

/// GET and discard a body; returns its length.
async fn drain(c: &Client, url: &str, what: &str) -> Res<u64> {
    let resp = c.get(url).header(ACCEPT, OCI_MANIFEST).send().await?;
    let resp = expect(resp, StatusCode::OK, what).await?;
    let mut stream = resp.bytes_stream();
    let mut n = 0u64;
    while let Some(piece) = stream.next().await {
        n += piece?.len() as u64;
    }
    Ok(n)
}

/// Pulls `repo:v1` from `base` as a client does (manifest, then config and layer); returns the
/// bytes received, checked against the image's sizes.
async fn pull(c: &Client, base: &str, repo: &str, img: &Image) -> Res<u64> {
    let mut n = drain(c, &format!("{base}/v2/{repo}/manifests/v1"), "GET manifest").await?;
    for blob in [&img.config, &img.layer] {
        n += drain(c, &format!("{base}/v2/{repo}/blobs/{}", blob.digest), "GET blob").await?;
    }
    if n != img.bytes() {
        return Err(format!("pulled {n} bytes of {repo}, expected {}", img.bytes()).into());
    }
    Ok(n)
}

// ---------------------------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------------------------

/// The median by MB/s.
fn median(mut rates: Vec<Rate>) -> Rate {
    rates.sort_by(|a, b| a.mb_s.total_cmp(&b.mb_s));
    rates[rates.len() / 2]
}

#[derive(Clone, Copy)]
struct Rate {
    mb_s: f64,
    images_s: f64,
}

impl Rate {
    fn of(bytes: u64, images: usize, took: Duration) -> Rate {
        let secs = took.as_secs_f64();
        Rate {
            mb_s: bytes as f64 / 1e6 / secs,
            images_s: images as f64 / secs,
        }
    }
}

/// The median (by MB/s) of `LARGE_RUNS` pulls of `img` from `base/repo`.
async fn large_median(c: &Client, base: &str, repo: &str, img: &Image) -> Rate {
    let mut rates = Vec::new();
    for _ in 0..LARGE_RUNS {
        let started = Instant::now();
        let n = pull(c, base, repo, img).await.expect("large pull");
        rates.push(Rate::of(n, 1, started.elapsed()));
    }
    median(rates)
}

/// `clients` workers pull the images from `base`, under `prefix` + each image's repository,
/// cycling over them until `min` has passed and every image was pulled at least once.
async fn small_rate(
    c: &Client,
    base: &str,
    prefix: &str,
    images: &Arc<Vec<Image>>,
    clients: usize,
    min: Duration,
) -> Rate {
    let next = Arc::new(AtomicUsize::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..clients {
        let (c, base, prefix) = (c.clone(), base.to_owned(), prefix.to_owned());
        let (images, next, bytes) = (images.clone(), next.clone(), bytes.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= images.len() && started.elapsed() >= min {
                    break;
                }
                let img = &images[i % images.len()];
                let n = pull(&c, &base, &format!("{prefix}{}", img.repo), img)
                    .await
                    .expect("small pull");
                bytes.fetch_add(n, Ordering::Relaxed);
            }
        }));
    }
    for w in workers {
        w.await.expect("worker");
    }
    let took = started.elapsed();
    let pulled = next.load(Ordering::Relaxed).saturating_sub(clients);
    Rate::of(bytes.load(Ordering::Relaxed), pulled, took)
}

fn row(out: &mut String, what: &str, direct: Rate, cold: Rate, cached: Rate, hosted: Rate) {
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "| {what} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {:.2} | {:.2} | {:.2} |",
        direct.mb_s,
        direct.images_s,
        cold.mb_s,
        cold.images_s,
        cached.mb_s,
        cached.images_s,
        hosted.mb_s,
        hosted.images_s,
        cached.mb_s / direct.mb_s,
        cold.mb_s / direct.mb_s,
        cached.mb_s / hosted.mb_s,
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let blob_size = num("PROXYBENCH_BLOB_MIB", 1024) as usize * MIB;
    let n_images = num("PROXYBENCH_IMAGES", 200) as usize;
    let clients = num("PROXYBENCH_CLIENTS", 16) as usize;
    let min = Duration::from_secs(num("PROXYBENCH_SECS", 5));
    let bin = build_stowage();
    let machine = machine_info();
    let bench_started = Instant::now();

    eprintln!("[proxy bench] generating data");
    let large = Image::new("big/app".into(), Blob::random(blob_size, 1), 1);
    let tee = Image::new("big/tee".into(), Blob::random(blob_size, 2), 2);
    let small: Arc<Vec<Image>> = Arc::new(
        (0..n_images)
            .map(|i| {
                let mut layer = vec![0u8; 4096];
                WyRand(0x5eed_0000 + i as u64).fill(&mut layer);
                Image::new(format!("small/i{i}"), Blob::new(layer), 1000 + i as u64)
            })
            .collect(),
    );

    let upstream = Server::start(&bin, None);
    let mirror = Server::start(
        &bin,
        Some(&format!(
            "[[proxy]]\nprefix = \"hub/\"\nurl = \"{}\"\ntag_ttl = \"1h\"\n",
            upstream.url
        )),
    );
    let c = client();
    eprintln!("[proxy bench] pushing to the upstream and to the mirror's hosted repositories");
    for img in [&large, &tee] {
        push_image(&c, &upstream, &img.repo, img).await.expect("push upstream");
    }
    push_image(&c, &mirror, &large.repo, &large).await.expect("push hosted");
    for img in small.iter() {
        push_image(&c, &upstream, &img.repo, img).await.expect("push upstream");
        push_image(&c, &mirror, &img.repo, img).await.expect("push hosted");
    }
    let (up, down) = (upstream.url.clone(), mirror.url.clone());

    eprintln!("[proxy bench] large image");
    // One warm-up pull of the direct path, so that neither side pays first-touch costs.
    pull(&c, &up, &large.repo, &large).await.expect("warm-up");
    let direct = large_median(&c, &up, &large.repo, &large).await;
    let started = Instant::now();
    let n = pull(&c, &down, &format!("hub/{}", large.repo), &large)
        .await
        .expect("cold pull");
    let cold = Rate::of(n, 1, started.elapsed());
    let started = Instant::now();
    let n = drain(
        &c,
        &mirror.v2(&format!("hub/{}/blobs/{}", tee.repo, tee.layer.digest)),
        "cold blob GET",
    )
    .await
    .expect("cold blob GET");
    let tee_rate = Rate::of(n, 1, started.elapsed());
    let cached = large_median(&c, &down, &format!("hub/{}", large.repo), &large).await;
    let hosted = large_median(&c, &down, &large.repo, &large).await;
    // The cached pull again after the hosted one, to see the order does not matter.
    let cached_again = large_median(&c, &down, &format!("hub/{}", large.repo), &large).await;

    eprintln!("[proxy bench] small images");
    small_rate(&c, &up, "", &small, clients, Duration::ZERO).await;
    small_rate(&c, &down, "", &small, clients, Duration::ZERO).await;
    let s_cold = small_rate(&c, &down, "hub/", &small, clients, Duration::ZERO).await;
    // Interleaved rounds (direct, cached, hosted) x SMALL_ROUNDS, the median of each: the
    // machine's load drifts over a run, and the order must not decide the ratios.
    let (mut direct_r, mut cached_r, mut hosted_r) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..SMALL_ROUNDS {
        direct_r.push(small_rate(&c, &up, "", &small, clients, min).await);
        cached_r.push(small_rate(&c, &down, "hub/", &small, clients, min).await);
        hosted_r.push(small_rate(&c, &down, "", &small, clients, min).await);
    }
    let (s_direct, s_cached, s_hosted) = (median(direct_r), median(cached_r), median(hosted_r));

    let mut out = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(out, "\n## Pull-through cache ({machine})\n");
    let _ = writeln!(
        out,
        "| workload (MB/s / images/s) | direct from upstream | cold through mirror | cached through mirror | hosted on mirror | cached/direct | cold/direct | cached/hosted |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|");
    row(
        &mut out,
        &format!("{} MiB single-layer image", blob_size / MIB),
        direct,
        cold,
        cached,
        hosted,
    );
    row(
        &mut out,
        &format!("{n_images} small images, {clients} clients"),
        s_direct,
        s_cold,
        s_cached,
        s_hosted,
    );
    let _ = writeln!(
        out,
        "\ncold blob GET streamed from the tee ({} MiB, blob first): {:.1} MB/s ({:.2}x direct)",
        blob_size / MIB,
        tee_rate.mb_s,
        tee_rate.mb_s / direct.mb_s
    );
    let _ = writeln!(
        out,
        "cached large pull measured again after the hosted one: {:.1} MB/s",
        cached_again.mb_s
    );
    let _ = writeln!(
        out,
        "disk: upstream {} MiB, mirror {} MiB; run took {:.0} s",
        dir_size(upstream.tmp.path()) / MIB as u64,
        dir_size(mirror.tmp.path()) / MIB as u64,
        bench_started.elapsed().as_secs_f64()
    );
    print!("{out}");
}

fn dir_size(path: &Path) -> u64 {
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

//! Web UI page latency at scale, against a release `stowage` on 127.0.0.1 with authentication
//! on (anonymous pull of everything, one user who may push):
//!
//! - `big/app`: 10,000 tags, each its own image (a shared config naming a platform, a layer
//!   of its own), and an index of two of them;
//! - 2,000 more repositories (`proj-NNNN/app`), one tagged image each;
//! - `spack/cache`: a Spack build cache of 50,000 spec images (the generator of
//!   `benches/spack.rs`, `benches/common/spack_specs.rs`).
//!
//! Everything is pushed through the registry API, 16 clients at a time. Then every UI page type
//! is fetched `UIBENCH_SAMPLES` times (default 200) one after another on one keep-alive
//! connection, by an anonymous viewer and by a signed-in one (session cookie from the sign-in
//! form), and p50/p99/max latency (request sent to body read) is printed per page type. Goal:
//! every page's p99 under 100 ms. A page type stops early after `UIBENCH_PAGE_SECS` (default
//! 20) per viewer, so that a slow page bounds the run; the table gives the GETs made.
//!
//! Run with `cargo bench --bench ui`. `UIBENCH_TAGS`, `UIBENCH_REPOS`, `UIBENCH_SPECS` shrink
//! the registry for a quick look.

#[path = "common/spack_specs.rs"]
mod spack_specs;

use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use spack_specs::{hash, sha256, spec_image};

const CLIENTS: usize = 16;
const USER: &str = "bench";
const PASSWORD: &str = "bench-password";
const BIG: &str = "big/app";
const SPACK: &str = "spack/cache";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";

const CONFIG: &str = r#"
[auth]
enabled = true
anonymous_pull = ["**"]

[[auth.rules]]
repositories = ["**"]
users = ["bench"]
actions = ["pull", "push", "delete"]
"#;

struct Stowage {
    child: Child,
    base: String,
    /// An API token of `USER` for pushing.
    token: String,
    _dir: tempfile::TempDir,
}

impl Drop for Stowage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds the release `stowage` binary (a no-op when it is fresh) and returns its path.
fn build_stowage() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--bin", "stowage"])
        .current_dir(root)
        .stdin(Stdio::null())
        .status()
        .expect("run cargo build");
    assert!(status.success(), "`cargo build --release --bin stowage` failed");
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    target.join("release").join("stowage")
}

fn start() -> Stowage {
    let bin = build_stowage();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("stowage.toml");
    std::fs::write(&config, CONFIG).expect("write config");
    let data = dir.path().join("data");
    let mut add = Command::new(&bin)
        .args(["user", "add", USER])
        .env("STOWAGE_DATA_DIR", &data)
        .env("STOWAGE_CONFIG", &config)
        .env("RUST_LOG", "error")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("run stowage user add");
    add.stdin
        .take()
        .expect("stdin")
        .write_all(format!("{PASSWORD}\n").as_bytes())
        .expect("write password");
    assert!(add.wait().expect("user add").success(), "stowage user add failed");
    // Pushes use an API token: a password is checked with argon2 under a bounded number of
    // concurrent checks, which 16 pushing clients would exhaust (429).
    let token = Command::new(&bin)
        .args(["token", "create", "--user", USER, "--name", "bench", "--scope", "**:*"])
        .env("STOWAGE_DATA_DIR", &data)
        .env("STOWAGE_CONFIG", &config)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .output()
        .expect("run stowage token create");
    assert!(token.status.success(), "stowage token create failed");
    let token = String::from_utf8_lossy(&token.stdout)
        .split_whitespace()
        .find(|w| w.starts_with("stw_"))
        .expect("the token's secret")
        .to_owned();
    let mut child = Command::new(&bin)
        .arg("serve")
        .env("STOWAGE_LISTEN", "127.0.0.1:0")
        .env("STOWAGE_DATA_DIR", &data)
        .env("STOWAGE_CONFIG", &config)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start stowage");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let base = loop {
        let line = lines.next().expect("stowage exited").expect("read stdout");
        if let Some(url) = line.split("listening on ").nth(1) {
            break url.split_whitespace().next().unwrap_or_default().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Stowage {
        child,
        base,
        token,
        _dir: dir,
    }
}

/// A registry API client signed in with Basic credentials.
#[derive(Clone)]
struct Api {
    http: reqwest::Client,
    base: String,
    auth: String,
}

impl Api {
    async fn blob(&self, repo: &str, body: Vec<u8>) -> (String, usize) {
        let (digest, size) = (sha256(&body), body.len());
        let resp = self
            .http
            .post(format!("{}/v2/{repo}/blobs/uploads/?digest={digest}", self.base))
            .header("Authorization", &self.auth)
            .body(body)
            .send()
            .await
            .expect("POST blob");
        assert_eq!(resp.status(), 201, "blob upload to {repo}");
        (digest, size)
    }

    async fn manifest(&self, repo: &str, reference: &str, media_type: &str, body: Vec<u8>) -> (String, usize) {
        let (digest, size) = (sha256(&body), body.len());
        let resp = self
            .http
            .put(format!("{}/v2/{repo}/manifests/{reference}", self.base))
            .header("Authorization", &self.auth)
            .header("Content-Type", media_type)
            .body(body)
            .send()
            .await
            .expect("PUT manifest");
        assert_eq!(resp.status(), 201, "manifest PUT {repo}:{reference}");
        (digest, size)
    }

    /// An image of the shared config (already in `repo`) and one layer of its own; its
    /// manifest's digest and size.
    async fn image(&self, repo: &str, tag: &str, config: &(String, usize), layer: Vec<u8>) -> (String, usize) {
        let (layer, size) = self.blob(repo, layer).await;
        let body = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.0, "size": config.1},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": size}],
        }))
        .expect("manifest");
        self.manifest(repo, tag, MANIFEST, body).await
    }
}

fn image_config(arch: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"architecture": arch, "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": []}, "config": {"Env": ["PATH=/usr/bin"]}}))
    .expect("config")
}

/// Runs `job(i)` for `i` in `0..n` on `CLIENTS` concurrent tasks.
async fn concurrently<F, Fut>(n: usize, job: F)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let job = Arc::new(job);
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (next, job) = (next.clone(), job.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                job(i).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("push task");
    }
}

/// What the fill leaves for the pages to show.
struct Filled {
    image: String,
    index: String,
}

async fn fill(api: &Api, tags: usize, repos: usize, specs: usize) -> Filled {
    let t = Instant::now();
    let amd = api.blob(BIG, image_config("amd64")).await;
    let arm = api.blob(BIG, image_config("arm64")).await;
    {
        let (api, amd) = (api.clone(), amd.clone());
        concurrently(tags, move |i| {
            let (api, amd) = (api.clone(), amd.clone());
            async move {
                api.image(
                    BIG,
                    &format!("t-{i:05}"),
                    &amd,
                    format!("layer of big/app t-{i:05}").into_bytes(),
                )
                .await;
            }
        })
        .await;
    }
    let image = api
        .image(BIG, "t-00000", &amd, b"layer of big/app t-00000".to_vec())
        .await;
    let arm_image = api
        .image(BIG, "arm-only", &arm, b"layer of the arm64 image".to_vec())
        .await;
    let children = [(&image, "amd64"), (&arm_image, "arm64")].map(|((digest, size), arch)| {
        json!({"mediaType": MANIFEST, "digest": digest, "size": size,
               "platform": {"os": "linux", "architecture": arch}})
    });
    let index =
        serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": INDEX, "manifests": children})).expect("index");
    let (index, _) = api.manifest(BIG, "multi", INDEX, index).await;
    let image = image.0;
    eprintln!("[bench] {tags} tags in {BIG} in {:.1} s", t.elapsed().as_secs_f64());

    let t = Instant::now();
    {
        let api = api.clone();
        concurrently(repos, move |i| {
            let api = api.clone();
            async move {
                let repo = format!("proj-{i:04}/app");
                let config = api.blob(&repo, image_config("amd64")).await;
                api.image(&repo, "latest", &config, format!("layer of {repo}").into_bytes())
                    .await;
            }
        })
        .await;
    }
    eprintln!("[bench] {repos} repositories in {:.1} s", t.elapsed().as_secs_f64());

    let t = Instant::now();
    {
        let api = api.clone();
        concurrently(specs, move |i| {
            let api = api.clone();
            async move {
                let img = spec_image(i);
                for (_, body) in img.blobs {
                    api.blob(SPACK, body).await;
                }
                api.manifest(SPACK, &img.tag, MANIFEST, img.manifest).await;
            }
        })
        .await;
    }
    eprintln!("[bench] {specs} Spack specs in {:.1} s", t.elapsed().as_secs_f64());
    Filled { image, index }
}

/// A session cookie for `USER`, from the sign-in form.
async fn sign_in(http: &reqwest::Client, base: &str) -> String {
    let resp = http.get(format!("{base}/ui/login")).send().await.expect("GET login");
    let cookies = set_cookies(&resp);
    let page = resp.text().await.expect("login page");
    let marker = r#"name="csrf" value=""#;
    let at = page.find(marker).expect("a CSRF token") + marker.len();
    let csrf = &page[at..at + page[at..].find('"').expect("end of token")];
    let resp = http
        .post(format!("{base}/ui/login"))
        .header("Cookie", &cookies)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!("csrf={csrf}&username={USER}&password={PASSWORD}"))
        .send()
        .await
        .expect("POST login");
    assert!(resp.status().is_redirection(), "sign-in: {}", resp.status());
    let session = set_cookies(&resp);
    assert!(!session.is_empty(), "no session cookie");
    session
}

fn set_cookies(resp: &reqwest::Response) -> String {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok()?.split(';').next().map(str::to_owned))
        .collect::<Vec<_>>()
        .join("; ")
}

/// `samples` GETs of `path`, one after another, stopping early once `budget` has passed (a
/// slow page must not hold the run for hours); sorted latencies.
async fn measure(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    cookie: Option<&str>,
    samples: usize,
    budget: Duration,
) -> Vec<Duration> {
    let mut out = Vec::with_capacity(samples);
    let begun = Instant::now();
    for _ in 0..samples {
        if begun.elapsed() > budget {
            break;
        }
        let started = Instant::now();
        let mut req = http.get(format!("{base}{path}"));
        if let Some(c) = cookie {
            req = req.header("Cookie", c);
        }
        let resp = req.send().await.expect("GET page");
        let status = resp.status();
        let body = resp.bytes().await.expect("page body");
        out.push(started.elapsed());
        assert_eq!(status, 200, "GET {path}: {}", String::from_utf8_lossy(&body));
    }
    out.sort();
    out
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("ui benchmark: run it with `cargo bench --bench ui`");
        return;
    }
    let num = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let tags = num("UIBENCH_TAGS", 10_000).max(100);
    let repos = num("UIBENCH_REPOS", 2_000).max(100);
    let specs = num("UIBENCH_SPECS", 50_000).max(1_000);
    let samples = num("UIBENCH_SAMPLES", 200).max(10);
    let budget = Duration::from_secs(num("UIBENCH_PAGE_SECS", 20) as u64);
    let server = start();
    let base = server.base.clone();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let basic = {
        use base64::Engine as _;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{}", server.token))
        )
    };
    let api = Api {
        http: http.clone(),
        base: base.clone(),
        auth: basic,
    };
    let t = Instant::now();
    let filled = fill(&api, tags, repos, specs).await;
    let fill_secs = t.elapsed().as_secs_f64();

    let deep_tag = format!("t-{:05}", tags - 100);
    let deep_repo = format!("proj-{:04}/app", repos - 100);
    let probe = 4242 % specs;
    let pages: Vec<(&str, String)> = vec![
        ("repositories, first page", "/ui/".into()),
        ("repositories, filtered (`q=-19`)", "/ui/?q=-19".into()),
        (
            "repositories, deep keyset page",
            format!("/ui/?after={}", deep_repo.replace('/', "%2F")),
        ),
        ("repository (all tags), first page", format!("/ui/repos/{BIG}")),
        (
            "repository, deep keyset page",
            format!("/ui/repos/{BIG}?after={deep_tag}"),
        ),
        ("repository, filtered (`q=t-0999`)", format!("/ui/repos/{BIG}?q=t-0999")),
        (
            "manifest of an image",
            format!("/ui/repos/{BIG}/-/manifests/{}", filled.image),
        ),
        (
            "manifest of an index",
            format!("/ui/repos/{BIG}/-/manifests/{}", filled.index),
        ),
        ("Spack search, first page", format!("/ui/repos/{SPACK}/-/spack")),
        (
            "Spack search, filtered by name",
            format!("/ui/repos/{SPACK}/-/spack?name=pkg{probe}"),
        ),
        (
            "Spack search, deep page",
            // Keyset paging: the page after the 100th-from-last spec tag in tag order.
            {
                let mut tags: Vec<String> = (0..specs)
                    .map(|i| format!("pkg{i}-1.0-{}.spack", spack_specs::hash(i)))
                    .collect();
                tags.sort();
                format!("/ui/repos/{SPACK}/-/spack?after={}", tags[specs.saturating_sub(101)])
            },
        ),
        ("Spack spec page", format!("/ui/repos/{SPACK}/-/spack/{}", hash(probe))),
    ];
    let session = sign_in(&http, &base).await;
    let home = http
        .get(format!("{base}/ui/"))
        .header("Cookie", &session)
        .send()
        .await
        .expect("GET /ui/");
    let home = home.text().await.expect("page");
    assert!(
        home.contains(&format!(r#"id="signed-in-user">{USER}<"#)),
        "not signed in: {home}"
    );
    // Warm up: one GET of each page (and the connection).
    for (_, path) in &pages {
        measure(&http, &base, path, None, 1, budget).await;
    }
    let mut rows = Vec::new();
    for (name, path) in &pages {
        let anon = measure(&http, &base, path, None, samples, budget).await;
        let signed = measure(&http, &base, path, Some(&session), samples, budget).await;
        rows.push((name, anon, signed));
    }
    let p = |v: &[Duration], q: usize| ms(v[(v.len() * q / 100).min(v.len() - 1)]);
    println!();
    println!(
        "UI pages: {BIG} with {tags} tags, {repos} more repositories, {SPACK} with {specs} specs \
         (filled in {fill_secs:.0} s); {samples} GETs per page and viewer"
    );
    println!();
    println!("| page | anonymous p50 / p99 / max (ms) | signed in p50 / p99 / max (ms) | GETs | p99 < 100 ms |");
    println!("|---|---:|---:|---:|---|");
    let mut all_met = true;
    for (name, anon, signed) in &rows {
        let met = p(anon, 99) < 100.0 && p(signed, 99) < 100.0;
        all_met &= met;
        println!(
            "| {name} | {:.1} / {:.1} / {:.1} | {:.1} / {:.1} / {:.1} | {} + {} | {} |",
            p(anon, 50),
            p(anon, 99),
            ms(anon[anon.len() - 1]),
            p(signed, 50),
            p(signed, 99),
            ms(signed[signed.len() - 1]),
            anon.len(),
            signed.len(),
            if met { "met" } else { "**missed**" }
        );
    }
    println!();
    println!("every page p99 < 100 ms: {}", if all_met { "met" } else { "MISSED" });
}

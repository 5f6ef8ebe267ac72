//! Spack build cache costs at scale, against a release `stowage` on 127.0.0.1:
//!
//! 1. manifest-PUT latency of spec images with 1,000 specs already in the repository, and again
//!    with `SPACKBENCH_SPECS` (the push path must not grow with the repository: goal within 20%);
//! 2. the time to serve a freshly changed `index.spack` at that size (manifest GET, which
//!    rebuilds the index, then the index blob; goal under one second), and an unchanged one;
//! 3. the server's peak RSS (VmHWM).
//!
//! Run with `cargo bench --bench spack`. `SPACKBENCH_SPECS` (default 50000; 500000 for the
//! figures in the README) and `SPACKBENCH_SAMPLES` (default 200) set the sizes;
//! `SPACKBENCH_DATA=<dir>` keeps the server's data there, so that later runs reuse the filled
//! catalog (the 500,000-spec fill takes about half an hour here). Specs are
//! synthetic but shaped like real ones: a ~1 KiB node each, a DAG of the package, two shared
//! dependencies and an external, pushed as Spack pushes (layer and config blobs, then the
//! manifest under its tag).
//!
//! The fill: the first 1,000 specs and every measured push go over HTTP. The specs in between
//! are written straight into the stopped server's catalog (`fill_catalog`): the rows a push
//! records (blob and link rows, manifest, references, tag, and the Spack rows from the server's
//! own `spack::parse_config`), in transactions of 20,000 specs with the catalog's triggers
//! running, so that the catalog is the one pushes would have built (without the blob objects,
//! which nothing here reads). Pushing 500,000 specs over HTTP would take most of an hour here.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[path = "common/spack_specs.rs"]
mod spack_specs;

use spack_specs::spec_image;

const REPO: &str = "spack/bench";
const CLIENTS: usize = 16;

struct Stowage {
    child: Child,
    base: String,
    dir: Data,
}

/// The server's data directory: a temporary one, or `SPACKBENCH_DATA` (kept between runs).
enum Data {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl Data {
    fn path(&self) -> &std::path::Path {
        match self {
            Data::Temp(d) => d.path(),
            Data::Kept(p) => p,
        }
    }
}

impl Drop for Stowage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn build() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--bin", "stowage"])
        .current_dir(&root)
        .status()
        .expect("cargo build");
    assert!(status.success(), "building stowage failed");
}

/// Starts the release server on `dir`.
fn start(dir: Data) -> Stowage {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new(root.join("target/release/stowage"))
        .arg("serve")
        .env("STOWAGE_LISTEN", "127.0.0.1:0")
        .env("STOWAGE_DATA_DIR", dir.path())
        // The costs measured here are the catalog's, not authentication's.
        .env("STOWAGE_AUTH__ENABLED", "false")
        // Errors, and each index build's stage times (printed below).
        .env("RUST_LOG", "error,stowage::registry::spack=info")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start stowage");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let base = loop {
        let line = lines.next().expect("stowage exited").expect("read stdout");
        if let Some(url) = line.split("listening on ").nth(1) {
            break url.trim().to_owned();
        }
    };
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if line.contains("spack index built") {
                eprintln!("server: {line}");
            }
        }
    });
    Stowage { child, base, dir }
}

/// Stops the server gracefully and hands back its data directory.
fn stop(mut server: Stowage) -> Data {
    let pid = server.child.id().to_string();
    let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
    assert!(sent.success(), "kill -TERM {pid}");
    server.child.wait().expect("wait for stowage");
    // Drop would kill it again; the directory is all that is left to keep.
    let dir = Data::Temp(tempfile::tempdir().expect("placeholder dir"));
    std::mem::replace(&mut server.dir, dir)
}

/// Records specs `from..to` in the stopped server's catalog as their pushes would (see the
/// module doc).
fn fill_catalog(data: &std::path::Path, from: usize, to: usize) {
    let mut db = rusqlite::Connection::open(data.join("catalog.db")).expect("open catalog");
    db.execute_batch("PRAGMA foreign_keys = ON; PRAGMA synchronous = OFF;")
        .expect("pragmas");
    let repo_id: i64 = db
        .query_row("SELECT id FROM repositories WHERE name = ?1", [REPO], |r| r.get(0))
        .expect("repository");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let mut i = from;
    while i < to {
        let end = (i + 20_000).min(to);
        let tx = db.transaction().expect("transaction");
        for i in i..end {
            record_spec(&tx, repo_id, now, i);
        }
        tx.commit().expect("commit");
        i = end;
    }
    // Leave the catalog as a server leaves it, not with a WAL of gigabytes for the server's
    // checkpointer to copy while the pushes are timed.
    db.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        .expect("checkpoint");
}

fn record_spec(c: &rusqlite::Connection, repo_id: i64, now: i64, i: usize) {
    use rusqlite::params;
    let img = spec_image(i);
    for (digest, body) in &img.blobs {
        c.prepare_cached("INSERT INTO blobs (digest, size, created_at) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING")
            .and_then(|mut s| s.execute(params![digest, body.len() as i64, now]))
            .expect("blob row");
        c.prepare_cached(
            "INSERT INTO repo_blobs (repo_id, digest, linked_at) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
        )
        .and_then(|mut s| s.execute(params![repo_id, digest, now]))
        .expect("blob link");
    }
    let (layer, config) = (&img.blobs[0], &img.blobs[1]);
    let manifest_id: i64 = c
        .prepare_cached(
            "INSERT INTO manifests (repo_id, digest, media_type, size, content, artifact_type, created_at, touched_at)
             VALUES (?1, ?2, 'application/vnd.oci.image.manifest.v1+json', ?3, ?4,
                     'application/vnd.oci.image.config.v1+json', ?5, ?5) RETURNING id",
        )
        .and_then(|mut s| {
            s.query_row(
                params![
                    repo_id,
                    spack_specs::sha256(&img.manifest),
                    img.manifest.len() as i64,
                    img.manifest,
                    now
                ],
                |r| r.get(0),
            )
        })
        .expect("manifest row");
    for (kind, digest) in [("config", &config.0), ("layer", &layer.0)] {
        c.prepare_cached("INSERT INTO manifest_refs (manifest_id, digest, kind) VALUES (?1, ?2, ?3)")
            .and_then(|mut s| s.execute(params![manifest_id, digest, kind]))
            .expect("manifest ref");
    }
    c.prepare_cached("INSERT INTO tags (repo_id, name, manifest_id, updated_at) VALUES (?1, ?2, ?3, ?4)")
        .and_then(|mut s| s.execute(params![repo_id, img.tag, manifest_id, now]))
        .expect("tag row");
    let spec = stowage::spack::parse_config(&config.1).expect("a spec config");
    for n in &spec.nodes {
        let added = c
            .prepare_cached(
                "INSERT INTO spack_nodes (repo_id, hash, name, version, platform, os, target, compiler, external, node)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT DO NOTHING",
            )
            .and_then(|mut s| {
                s.execute(params![
                    repo_id, n.hash, n.name, n.version, n.platform, n.os, n.target, n.compiler, n.external, n.json
                ])
            })
            .expect("node row");
        if added > 0 {
            for (dep, types) in &n.dependencies {
                c.prepare_cached(
                    "INSERT INTO spack_deps (repo_id, hash, dep_hash, deptypes) VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
                )
                .and_then(|mut s| s.execute(params![repo_id, n.hash, dep, types]))
                .expect("edge row");
            }
        }
    }
    let root = &spec.nodes[0];
    c.prepare_cached(
        "INSERT INTO spack_specs (repo_id, tag, hash, manifest_id, layout_version, name, version, platform, os, target, compiler)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )
    .and_then(|mut s| {
        s.execute(params![
            repo_id, img.tag, spec.hash, manifest_id, spec.layout_version, root.name, root.version, root.platform,
            root.os, root.target, root.compiler
        ])
    })
    .expect("spec row");
    for n in &spec.nodes {
        c.prepare_cached("INSERT INTO spack_closure (repo_id, tag, hash) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING")
            .and_then(|mut s| s.execute(params![repo_id, img.tag, n.hash]))
            .expect("closure row");
    }
}

async fn push_blobs(http: &reqwest::Client, base: &str, blobs: Vec<(String, Vec<u8>)>) {
    for (digest, body) in blobs {
        let resp = http
            .post(format!("{base}/v2/{REPO}/blobs/uploads/?digest={digest}"))
            .body(body)
            .send()
            .await
            .expect("POST blob");
        assert_eq!(resp.status(), 201);
    }
}

async fn put_manifest(http: &reqwest::Client, base: &str, tag: &str, manifest: Vec<u8>) -> Duration {
    let started = Instant::now();
    let resp = http
        .put(format!("{base}/v2/{REPO}/manifests/{tag}"))
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest)
        .send()
        .await
        .expect("PUT manifest");
    assert_eq!(resp.status(), 201);
    started.elapsed()
}

/// Pushes specs `from..to` with `CLIENTS` concurrent clients.
async fn fill(http: &reqwest::Client, base: &str, from: usize, to: usize) {
    let next = Arc::new(AtomicUsize::new(from));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (http, base, next) = (http.clone(), base.to_owned(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= to {
                    break;
                }
                let img = spec_image(i);
                push_blobs(&http, &base, img.blobs).await;
                put_manifest(&http, &base, &img.tag, img.manifest).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("push task");
    }
}

/// Latency of `samples` manifest PUTs of new specs, blobs uploaded beforehand, one at a time.
async fn sample_puts(http: &reqwest::Client, base: &str, first: usize, samples: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(samples);
    for i in first..first + samples {
        let img = spec_image(i);
        push_blobs(http, base, img.blobs).await;
        out.push(put_manifest(http, base, &img.tag, img.manifest).await);
    }
    out.sort();
    out
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn summary(v: &[Duration]) -> (f64, f64, f64) {
    let mean = v.iter().map(|d| d.as_secs_f64()).sum::<f64>() / v.len() as f64 * 1000.0;
    (mean, ms(v[v.len() / 2]), ms(v[v.len() * 95 / 100]))
}

async fn serve_index(http: &reqwest::Client, base: &str) -> (Duration, Duration, usize) {
    let started = Instant::now();
    let resp = http
        .get(format!("{base}/v2/{REPO}/manifests/index.spack"))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .expect("GET index.spack");
    assert_eq!(resp.status(), 200);
    let manifest: serde_json::Value = resp.json().await.expect("manifest");
    let manifest_time = started.elapsed();
    let digest = manifest["layers"][0]["digest"].as_str().expect("layer").to_owned();
    let blob = http
        .get(format!("{base}/v2/{REPO}/blobs/{digest}"))
        .send()
        .await
        .expect("GET blob");
    assert_eq!(blob.status(), 200);
    // Read as a client streams it, without collecting it (which would time reallocations).
    let mut blob = blob;
    let mut bytes = 0;
    while let Some(chunk) = blob.chunk().await.expect("index bytes") {
        bytes += chunk.len();
    }
    (manifest_time, started.elapsed(), bytes)
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("spack benchmark: run it with `cargo bench --bench spack`");
        return;
    }
    let num = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let total = num("SPACKBENCH_SPECS", 50_000);
    let samples = num("SPACKBENCH_SAMPLES", 200);
    build();
    // `SPACKBENCH_DATA`: a directory kept between runs. Once it holds a filled catalog (its
    // `spackbench-specs` file says how many specs), later runs skip the fill and measure the
    // large repository at once (each run adds `2 * SPACKBENCH_SAMPLES + 1` specs to it).
    let kept = std::env::var_os("SPACKBENCH_DATA").map(PathBuf::from);
    let marker = kept.as_ref().map(|d| d.join("spackbench-specs"));
    let filled: Option<usize> = marker
        .as_ref()
        .and_then(|m| std::fs::read_to_string(m).ok())
        .and_then(|s| s.trim().parse().ok());
    let data = || match &kept {
        Some(d) => {
            std::fs::create_dir_all(d).expect("SPACKBENCH_DATA");
            Data::Kept(d.clone())
        }
        None => Data::Temp(tempfile::tempdir().expect("temp dir")),
    };
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .build()
        .expect("client");

    // The small repository is always a fresh one, so that every run prints the ratio.
    let server = start(Data::Temp(tempfile::tempdir().expect("temp dir")));
    let base = server.base.clone();
    let t = Instant::now();
    fill(&http, &base, 0, 1_000).await;
    println!("filled 1,000 specs over HTTP in {:.1} s", t.elapsed().as_secs_f64());
    let small = sample_puts(&http, &base, 1_000, samples).await;

    let (server, to) = match filled {
        Some(n) => {
            drop(server);
            println!("reusing the catalog in SPACKBENCH_DATA ({n} specs)");
            let t = Instant::now();
            let server = start(data());
            println!("server up in {:.1} s", t.elapsed().as_secs_f64());
            (server, n)
        }
        None => {
            let dir = match kept {
                // Start the kept directory from this repository's first 1,000 specs.
                Some(_) => {
                    drop(server);
                    let server = start(data());
                    fill(&http, &server.base, 0, 1_000).await;
                    sample_puts(&http, &server.base, 1_000, samples).await;
                    stop(server)
                }
                None => stop(server),
            };
            let t = Instant::now();
            let data = dir.path().to_owned();
            let (from, to) = (1_000 + samples, total.max(1_000 + samples));
            tokio::task::spawn_blocking(move || fill_catalog(&data, from, to))
                .await
                .expect("fill");
            println!(
                "recorded specs {from}..{to} in the catalog in {:.1} s",
                t.elapsed().as_secs_f64()
            );
            (start(dir), to)
        }
    };
    let base = server.base.clone();
    let large = sample_puts(&http, &base, to, samples).await;

    let hwm_before = vm_hwm_mib(server.child.id());
    // The first read after the restart: the catalog's pages come from the OS page cache.
    let (fresh_manifest, fresh_total, bytes) = serve_index(&http, &base).await;
    let (warm_manifest, warm_total, _) = serve_index(&http, &base).await;
    // One more push, then the index again: the common case of a cache in use.
    sample_puts(&http, &base, to + samples, 1).await;
    let (again_manifest, again_total, _) = serve_index(&http, &base).await;
    let hwm_after = vm_hwm_mib(server.child.id());
    let total = to + samples;
    if let Some(m) = &marker {
        std::fs::write(m, (total + 1).to_string()).expect("write the spec count");
    }

    let (l_mean, l_p50, l_p95) = summary(&large);
    println!();
    println!("| measurement | value | goal |");
    println!("|---|---|---|");
    let (s_mean, s_p50, s_p95) = summary(&small);
    println!(
        "| spec manifest PUT, 1,000 specs in repo | mean {s_mean:.2} ms, p50 {s_p50:.2} ms, p95 {s_p95:.2} ms | |"
    );
    println!(
        "| spec manifest PUT, {} specs in repo | mean {l_mean:.2} ms, p50 {l_p50:.2} ms, p95 {l_p95:.2} ms | |",
        total - samples
    );
    println!(
        "| PUT latency ratio (large / small, mean) | {:.2}x | <= 1.20x |",
        l_mean / s_mean
    );
    println!(
        "| freshly changed index.spack, {} specs ({:.1} MB), first read after restart | manifest {:.0} ms, manifest + blob {:.0} ms | < 1000 ms |",
        total,
        bytes as f64 / 1e6,
        ms(fresh_manifest),
        ms(fresh_total)
    );
    println!(
        "| freshly changed index.spack after one more push, {} specs | manifest {:.0} ms, manifest + blob {:.0} ms | < 1000 ms |",
        total + 1,
        ms(again_manifest),
        ms(again_total)
    );
    println!(
        "| unchanged index.spack | manifest {:.1} ms, manifest + blob {:.0} ms | |",
        ms(warm_manifest),
        ms(warm_total)
    );
    println!(
        "| server peak RSS (VmHWM) before / after building and serving the index | {:.1} / {:.1} MiB | |",
        hwm_before, hwm_after
    );
}

/// Peak resident memory of process `pid` so far, in MiB (`NaN` if unreadable).
fn vm_hwm_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

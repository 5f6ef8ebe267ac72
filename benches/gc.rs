//! Garbage collection at scale: one collection pass over a catalog of 1,000,000 blob links and
//! 100,000 manifests, and the worst stall it causes a writer running beside it (goal: no write
//! waits more than 50 ms on it).
//!
//! Run with `cargo bench --bench gc`. The catalog is built directly with SQL (100 repositories
//! of 1,000 manifests, each with a config and nine layers of its own); a tenth of the manifests
//! are untagged and past the grace period, and one link in twenty is unreferenced and past it,
//! so the pass has real work: it removes those manifests and links and forgets the blobs. The
//! blob objects are not created (the pass's storage deletions then fail fast and are only
//! logged): what is measured is the catalog's side, which is what can stall writers.
//!
//! The writer beside it links a blob in a loop through the same catalog API an upload uses,
//! each write a durable group commit, and records each write's latency before and during the
//! pass. `GCBENCH_MANIFESTS` (default 100000) shrinks it for a quick look; `GCBENCH_PAUSE`
//! sets the collector's pause after each write job (default `registry::WRITE_PAUSE`).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rusqlite::{Connection, params};
use stowage::config::Config;
use stowage::oci::{Digest, RepoName};
use stowage::registry::GcOptions;

const REPOS: usize = 100;
const REFS_PER_MANIFEST: usize = 10;
const STALL_GOAL: Duration = Duration::from_millis(50);

fn hex(n: u64, salt: u64) -> String {
    // Distinct, digest-shaped names; the bench never hashes content.
    format!(
        "sha256:{:016x}{:016x}{:016x}{:016x}",
        n,
        salt,
        n ^ 0x5a5a,
        salt ^ 0xa5a5
    )
}

/// Builds the catalog's rows directly; returns (links, manifests, garbage manifests, garbage links).
fn populate(path: &Path, manifests: usize) -> (usize, usize, usize, usize) {
    let mut conn = Connection::open(path).expect("open catalog");
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = OFF; PRAGMA foreign_keys = OFF;")
        .expect("pragmas");
    let old = 1_000_000_000i64; // 2001: long past any grace period
    let tx = conn.transaction().expect("transaction");
    let (mut links, mut garbage_manifests, mut garbage_links) = (0, 0, 0);
    {
        let mut repo = tx
            .prepare("INSERT INTO repositories (id, name, created_at) VALUES (?1, ?2, ?3)")
            .expect("prepare");
        let mut blob = tx
            .prepare("INSERT INTO blobs (digest, size, created_at) VALUES (?1, 1024, ?2)")
            .expect("prepare");
        let mut link = tx
            .prepare("INSERT INTO repo_blobs (repo_id, digest, linked_at) VALUES (?1, ?2, ?3)")
            .expect("prepare");
        let mut manifest = tx
            .prepare(
                "INSERT INTO manifests (id, repo_id, digest, media_type, size, content, created_at, touched_at)
                 VALUES (?1, ?2, ?3, 'application/vnd.oci.image.manifest.v1+json', 600, ?4, ?5, ?5)",
            )
            .expect("prepare");
        let mut reference = tx
            .prepare("INSERT INTO manifest_refs (manifest_id, digest, kind) VALUES (?1, ?2, ?3)")
            .expect("prepare");
        let mut tag = tx
            .prepare("INSERT INTO tags (repo_id, name, manifest_id, updated_at) VALUES (?1, ?2, ?3, ?4)")
            .expect("prepare");
        let content = vec![b'x'; 600];
        for r in 0..REPOS {
            repo.execute(params![r as i64 + 1, format!("bench/repo{r}"), old])
                .expect("repo");
        }
        for m in 0..manifests {
            let repo_id = (m % REPOS) as i64 + 1;
            let id = m as i64 + 1;
            manifest
                .execute(params![id, repo_id, hex(m as u64, 1), content, old])
                .expect("manifest");
            if m % 10 == 0 {
                garbage_manifests += 1; // untagged
            } else {
                tag.execute(params![repo_id, format!("t{m}"), id, old]).expect("tag");
            }
            for k in 0..REFS_PER_MANIFEST {
                let digest = hex(m as u64, 100 + k as u64);
                blob.execute(params![digest, old]).expect("blob");
                link.execute(params![repo_id, digest, old]).expect("link");
                links += 1;
                // One link in twenty is left unreferenced: an upload whose manifest never came.
                if (m * REFS_PER_MANIFEST + k) % 20 == 19 {
                    garbage_links += 1;
                } else {
                    let kind = if k == 0 { "config" } else { "layer" };
                    reference.execute(params![id, digest, kind]).expect("ref");
                }
            }
        }
    }
    tx.commit().expect("commit");
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); ANALYZE;")
        .expect("checkpoint");
    (links, manifests, garbage_manifests, garbage_links)
}

#[derive(Default)]
struct Latencies(Vec<Duration>);

impl Latencies {
    fn summary(&mut self) -> String {
        if self.0.is_empty() {
            return "no writes".to_owned();
        }
        self.0.sort();
        let at = |q: f64| self.0[((self.0.len() - 1) as f64 * q) as usize];
        format!(
            "{} writes, median {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.0.len(),
            at(0.5).as_secs_f64() * 1e3,
            at(0.99).as_secs_f64() * 1e3,
            self.0[self.0.len() - 1].as_secs_f64() * 1e3
        )
    }

    fn max(&self) -> Duration {
        self.0.iter().copied().max().unwrap_or_default()
    }
}

/// Links blobs in a loop until `stop`; returns each write's latency.
async fn writer(catalog: stowage::catalog::Catalog, stop: Arc<AtomicBool>, salt: u64) -> Latencies {
    let repo: RepoName = "bench/writer".parse().expect("repo name");
    let mut lat = Latencies::default();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let digest: Digest = format!("sha256:{:032x}{:032x}", salt, n).parse().expect("digest");
        let started = Instant::now();
        catalog.link_blob(&repo, &digest, 1).await.expect("write");
        lat.0.push(started.elapsed());
    }
    lat
}

#[tokio::main]
async fn main() {
    let manifests: usize = std::env::var("GCBENCH_MANIFESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let config = Config {
        data_dir: dir.path().to_owned(),
        ..Config::default()
    };

    // The schema, from the real migrations; then the rows.
    let catalog = stowage::catalog::Catalog::open(&config.catalog_path()).expect("catalog");
    catalog.close();
    drop(catalog);
    let started = Instant::now();
    let (links, manifests, garbage_manifests, garbage_links) = populate(&config.catalog_path(), manifests);
    println!(
        "catalog: {links} links, {manifests} manifests ({garbage_manifests} untagged, {garbage_links} links unreferenced) built in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let registry = stowage::server::open(&config).await.expect("open registry");
    let catalog = registry.catalog().clone();

    // Warm-up (caches, the first checkpoints after opening), then the writer alone for two
    // seconds as the baseline.
    let stop = Arc::new(AtomicBool::new(false));
    let warm = tokio::spawn(writer(catalog.clone(), stop.clone(), 3));
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    warm.await.expect("writer");
    let stop = Arc::new(AtomicBool::new(false));
    let base = tokio::spawn(writer(catalog.clone(), stop.clone(), 1));
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut baseline = base.await.expect("writer");

    // The pass, with the writer beside it. `GCBENCH_PAUSE` overrides the collector's pause
    // after each write job (a multiple of the job's time; 0: none).
    let write_pause = std::env::var("GCBENCH_PAUSE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(stowage::registry::WRITE_PAUSE);
    eprintln!("[gc bench] write pause factor {write_pause}");
    let stop = Arc::new(AtomicBool::new(false));
    let during = tokio::spawn(writer(catalog.clone(), stop.clone(), 2));
    let started = Instant::now();
    let report = registry
        .collect_garbage(GcOptions {
            grace: Duration::from_secs(3600),
            untagged_manifests: true,
            orphan_interval: Duration::from_secs(86_400),
            dry_run: false,
            write_pause,
        })
        .await
        .expect("collection pass");
    let pass = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut beside = during.await.expect("writer");

    println!(
        "pass: {:.2} s; removed {} manifests, {} links, {} blobs",
        pass.as_secs_f64(),
        report.manifests,
        report.links,
        report.blobs
    );
    println!("writer alone:        {}", baseline.summary());
    println!("writer beside the pass: {}", beside.summary());
    let worst = beside.max();
    println!(
        "worst write stall during the pass: {:.1} ms (goal: at most {} ms) {}",
        worst.as_secs_f64() * 1e3,
        STALL_GOAL.as_millis(),
        if worst <= STALL_GOAL { "MET" } else { "NOT MET" }
    );
    assert_eq!(
        report.manifests as usize, garbage_manifests,
        "every untagged manifest removed"
    );
}

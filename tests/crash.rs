//! Crash safety: 64 clients push OCI images and Spack spec images at once; at a random moment
//! the server gets SIGKILL, and is started again on the same data, three times. Whatever the
//! server acknowledged before a crash is there after it: every manifest (by digest, and by tag
//! unless a later push of the tag may have replaced it), every blob it references and every
//! acknowledged blob, hashing to its digest; the Spack index lists exactly the spec tags
//! present; and `stowage fsck` finds nothing bad in the data at the end.
//!
//! The moments and the pushed bytes come from one seed, printed at the start; `CRASH_SEED=<n>`
//! runs the same schedule again (the interleaving of 64 clients still varies from run to run).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::rng::Rng;
use common::spack::{in_buildcache, spec_hash};
use common::{TestServer, sha256};
use futures_util::StreamExt as _;
use serde_json::json;

const PUSHERS: usize = 64;
/// Every `SPACK_EVERY`th pusher pushes Spack spec images; the others OCI images.
const SPACK_EVERY: usize = 4;
const CRASHES: usize = 3;
/// Each round waits until this many manifests were acknowledged in it (the pushers are under
/// way), then a random time in `KILL_MS` (milliseconds), then sends SIGKILL.
const WARM_UP_MANIFESTS: u64 = 16;
const KILL_MS: std::ops::Range<u64> = 0..2000;
/// Tags each image pusher cycles through: later pushes of a tag replace earlier ones.
const TAGS_PER_PUSHER: u64 = 3;
/// Layers shared between pushers (pushed concurrently by several of them: deduplication).
const SHARED_LAYERS: u64 = 6;
const SPACK_REPO: &str = "crash/spack";
/// Requests checked at once after a restart.
const VERIFY_PARALLEL: usize = 16;

/// The last push of a tag the server acknowledged, and the pushes of it sent since then
/// without an answer (cut short by a crash: each may or may not have landed).
#[derive(Default)]
struct TagState {
    acked: Option<String>,
    unanswered: Vec<String>,
}

/// An acknowledged manifest PUT.
struct AckedManifest {
    repo: String,
    digest: String,
    /// Config and layer digests.
    blobs: Vec<String>,
}

/// Everything the server acknowledged, across all rounds.
#[derive(Default)]
struct Ledger {
    manifests: Vec<AckedManifest>,
    /// (repository, digest) of every acknowledged blob upload.
    blobs: BTreeSet<(String, String)>,
    tags: BTreeMap<(String, String), TagState>,
    blob_acks: u64,
    manifest_acks: u64,
}

/// Why a push stopped: the server went away (expected, it was killed).
struct Gone;

/// One pusher's state, kept across rounds.
struct Pusher {
    id: usize,
    rng: Rng,
    seq: u64,
    /// Spack pushers: the spec numbers pushed so far (re-pushed now and then).
    specs: Vec<usize>,
}

struct Ctx {
    url: String,
    http: reqwest::Client,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
    next_spec: Arc<AtomicUsize>,
    seed: u64,
}

impl Ctx {
    fn v2(&self, path: &str) -> String {
        format!("{}/v2/{path}", self.url)
    }

    /// A request's response, or `Gone` when the server is not there (killed).
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, Gone> {
        req.send().await.map_err(|_| Gone)
    }

    fn expect(&self, resp: &reqwest::Response, status: u16, what: &str) {
        assert_eq!(
            resp.status().as_u16(),
            status,
            "{what} (seed {}, {})",
            self.seed,
            resp.url()
        );
    }

    /// Uploads a blob in one of the three ways clients do, chosen by `how`; records the 201.
    async fn push_blob(&self, repo: &str, data: &[u8], how: u64) -> Result<String, Gone> {
        let digest = sha256(data);
        let what = format!("blob upload of {digest} ({} bytes) to {repo}", data.len());
        let resp = match how % 3 {
            // Monolithic: POST ?digest= with the body.
            0 => {
                self.send(
                    self.http
                        .post(self.v2(&format!("{repo}/blobs/uploads/?digest={digest}")))
                        .header("Content-Type", "application/octet-stream")
                        .body(data.to_vec()),
                )
                .await?
            }
            // POST, then PUT ?digest= with the body.
            1 => {
                let location = self.open_session(repo).await?;
                self.send(
                    self.http
                        .put(format!("{}{location}?digest={digest}", self.url))
                        .header("Content-Type", "application/octet-stream")
                        .body(data.to_vec()),
                )
                .await?
            }
            // POST, PATCH chunks, then an empty PUT ?digest=.
            _ => {
                let location = self.open_session(repo).await?;
                let chunk = (data.len() / 3).max(1);
                let mut offset = 0;
                for piece in data.chunks(chunk) {
                    let resp = self
                        .send(
                            self.http
                                .patch(format!("{}{location}", self.url))
                                .header("Content-Type", "application/octet-stream")
                                .header("Content-Range", format!("{offset}-{}", offset + piece.len() - 1))
                                .body(piece.to_vec()),
                        )
                        .await?;
                    self.expect(&resp, 202, &format!("PATCH of {what}"));
                    offset += piece.len();
                }
                self.send(self.http.put(format!("{}{location}?digest={digest}", self.url)))
                    .await?
            }
        };
        self.expect(&resp, 201, &what);
        let mut ledger = self.ledger.lock().expect("ledger");
        ledger.blobs.insert((repo.to_owned(), digest.clone()));
        ledger.blob_acks += 1;
        Ok(digest)
    }

    async fn open_session(&self, repo: &str) -> Result<String, Gone> {
        let resp = self
            .send(self.http.post(self.v2(&format!("{repo}/blobs/uploads/"))))
            .await?;
        self.expect(&resp, 202, &format!("POST of an upload session in {repo}"));
        Ok(resp.headers()["location"].to_str().expect("Location").to_owned())
    }

    /// PUTs a manifest under `tag`; records the attempt before sending, the 201 after.
    async fn push_manifest(&self, repo: &str, tag: &str, body: Vec<u8>, blobs: Vec<String>) -> Result<(), Gone> {
        let digest = sha256(&body);
        let key = (repo.to_owned(), tag.to_owned());
        self.ledger
            .lock()
            .expect("ledger")
            .tags
            .entry(key.clone())
            .or_default()
            .unanswered
            .push(digest.clone());
        let resp = self
            .send(
                self.http
                    .put(self.v2(&format!("{repo}/manifests/{tag}")))
                    .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                    .body(body),
            )
            .await?;
        self.expect(&resp, 201, &format!("manifest PUT {repo}:{tag}"));
        let mut ledger = self.ledger.lock().expect("ledger");
        let state = ledger.tags.entry(key).or_default();
        state.acked = Some(digest.clone());
        state.unanswered.clear();
        ledger.manifests.push(AckedManifest {
            repo: repo.to_owned(),
            digest,
            blobs,
        });
        ledger.manifest_acks += 1;
        Ok(())
    }
}

fn manifest(config: (&str, usize), layers: &[(String, usize)]) -> Vec<u8> {
    let layers: Vec<_> = layers
        .iter()
        .map(|(d, s)| json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s}))
        .collect();
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.0, "size": config.1},
        "layers": layers,
    }))
    .expect("manifest")
}

impl Pusher {
    /// One OCI image: a config, 1-3 layers (some shared with other pushers, a few over one S3
    /// part), the manifest under one of this pusher's tags.
    async fn push_image(&mut self, ctx: &Ctx) -> Result<(), Gone> {
        self.seq += 1;
        let repo = format!("crash/img{}", self.id % 16);
        let tag = format!("p{}-t{}", self.id, self.seq % TAGS_PER_PUSHER);
        let mut layers = Vec::new();
        for _ in 0..self.rng.range(1..4) {
            let data = match self.rng.below(20) {
                0..=4 => {
                    let k = self.rng.below(SHARED_LAYERS);
                    Rng(ctx.seed ^ (k + 1).wrapping_mul(0xa076_1d64_78bd_642f)).bytes(32 * 1024 + k as usize)
                }
                5 => {
                    let len = self.rng.range(5 * 1024 * 1024..6 * 1024 * 1024) as usize;
                    self.rng.bytes(len)
                }
                _ => {
                    let len = self.rng.range(1..64 * 1024) as usize;
                    self.rng.bytes(len)
                }
            };
            let how = self.rng.next();
            let digest = ctx.push_blob(&repo, &data, how).await?;
            layers.push((digest, data.len()));
        }
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []},
            "config": {"Labels": {"pusher": self.id.to_string(), "seq": self.seq.to_string()}},
        }))
        .expect("config");
        let how = self.rng.next();
        let config_digest = ctx.push_blob(&repo, &config, how).await?;
        let body = manifest((&config_digest, config.len()), &layers);
        let mut blobs: Vec<String> = layers.into_iter().map(|(d, _)| d).collect();
        blobs.push(config_digest);
        ctx.push_manifest(&repo, &tag, body, blobs).await
    }

    /// One Spack spec image (a new spec, or now and then one of this pusher's earlier specs
    /// pushed again with another config), then sometimes a read of `index.spack`, which makes
    /// the server build the index.
    async fn push_spec(&mut self, ctx: &Ctx) -> Result<(), Gone> {
        self.seq += 1;
        let i = if !self.specs.is_empty() && self.rng.below(5) == 0 {
            self.specs[self.rng.below(self.specs.len() as u64) as usize]
        } else {
            let i = ctx.next_spec.fetch_add(1, Ordering::Relaxed);
            self.specs.push(i);
            i
        };
        let layer = self.rng.bytes(self.rng.clone().range(100..20_000) as usize);
        let how = self.rng.next();
        let layer_digest = ctx.push_blob(SPACK_REPO, &layer, how).await?;
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []}, "config": {"Env": []},
            "spec": {"_meta": {"version": 5}, "nodes": [spec_node(i)]},
            "buildcache_layout_version": 3,
            "binary_cache_checksum": {"hash_algorithm": "sha256", "hash": &layer_digest[7..]},
            "archive_timestamp": format!("pusher {} seq {}", self.id, self.seq),
        }))
        .expect("config");
        let how = self.rng.next();
        let config_digest = ctx.push_blob(SPACK_REPO, &config, how).await?;
        let body = manifest((&config_digest, config.len()), &[(layer_digest.clone(), layer.len())]);
        ctx.push_manifest(SPACK_REPO, &spec_tag(i), body, vec![layer_digest, config_digest])
            .await?;
        if self.rng.below(4) == 0 {
            let resp = ctx
                .send(ctx.http.get(ctx.v2(&format!("{SPACK_REPO}/manifests/index.spack"))))
                .await?;
            ctx.expect(&resp, 200, "GET index.spack");
            resp.bytes().await.map_err(|_| Gone)?;
        }
        Ok(())
    }
}

fn spec_tag(i: usize) -> String {
    format!("pkg{i}-1.0-{}.spack", spec_hash(i))
}

fn spec_node(i: usize) -> serde_json::Value {
    json!({"name": format!("pkg{i}"), "version": "1.0",
           "arch": {"platform": "linux", "platform_os": "debian12", "target": "x86_64"},
           "parameters": {"build_system": "generic", "cflags": []},
           "namespace": "builtin", "hash": spec_hash(i)})
}

/// The hash in a spec tag `<name>-<version>-<hash>.spack`.
fn hash_of_tag(tag: &str) -> String {
    let stem = tag.trim_end_matches(".spack");
    stem.rsplit('-').next().unwrap_or_default().to_owned()
}

/// Runs the pushers against the server at `url` until it goes away or `stop` is set.
async fn run_round(ctx: Arc<Ctx>, pushers: Vec<Pusher>) -> Vec<Pusher> {
    let tasks: Vec<_> = pushers
        .into_iter()
        .map(|mut p| {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                while !ctx.stop.load(Ordering::Relaxed) {
                    let pushed = if p.id.is_multiple_of(SPACK_EVERY) {
                        p.push_spec(&ctx).await
                    } else {
                        p.push_image(&ctx).await
                    };
                    if pushed.is_err() {
                        break;
                    }
                }
                p
            })
        })
        .collect();
    let mut back = Vec::new();
    for t in tasks {
        back.push(t.await.expect("a pusher failed (see its panic above)"));
    }
    back
}

/// GETs a blob and checks that it hashes to its digest.
async fn check_blob(http: &reqwest::Client, url: &str, repo: &str, digest: &str, why: &str) {
    let resp = http
        .get(format!("{url}/v2/{repo}/blobs/{digest}"))
        .send()
        .await
        .expect("GET blob");
    assert_eq!(resp.status(), 200, "{why}: blob {repo}@{digest} is served");
    let body = resp.bytes().await.expect("blob body");
    assert_eq!(
        sha256(&body),
        digest,
        "{why}: blob {repo}@{digest} hashes to its digest"
    );
}

/// Everything acknowledged so far is there, intact.
async fn verify(server: &TestServer, http: &reqwest::Client, ledger: &Ledger, round: usize) {
    let url = server.url.clone();
    // Manifests by digest, and the blobs they reference.
    let manifests = futures_util::stream::iter(&ledger.manifests)
        .map(|m| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let resp = http
                    .get(format!("{url}/v2/{}/manifests/{}", m.repo, m.digest))
                    .header("Accept", "application/vnd.oci.image.manifest.v1+json")
                    .send()
                    .await
                    .expect("GET manifest");
                assert_eq!(
                    resp.status(),
                    200,
                    "after crash {round}: acknowledged manifest {}@{} is readable",
                    m.repo,
                    m.digest
                );
                let body = resp.bytes().await.expect("manifest body");
                assert_eq!(sha256(&body), m.digest, "manifest {}@{} bytes", m.repo, m.digest);
            }
        })
        .buffer_unordered(VERIFY_PARALLEL);
    manifests.collect::<Vec<()>>().await;
    let mut blobs: BTreeSet<(&str, &str)> = ledger
        .manifests
        .iter()
        .flat_map(|m| m.blobs.iter().map(|b| (m.repo.as_str(), b.as_str())))
        .collect();
    blobs.extend(ledger.blobs.iter().map(|(r, d)| (r.as_str(), d.as_str())));
    let why = format!("after crash {round}");
    futures_util::stream::iter(&blobs)
        .map(|(repo, digest)| check_blob(http, &url, repo, digest, &why))
        .buffer_unordered(VERIFY_PARALLEL)
        .collect::<Vec<()>>()
        .await;

    // Tags: the last acknowledged push, or a later one that was cut short but landed.
    let tags = futures_util::stream::iter(&ledger.tags)
        .map(|((repo, tag), state)| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let resp = http
                    .get(format!("{url}/v2/{repo}/manifests/{tag}"))
                    .header("Accept", "application/vnd.oci.image.manifest.v1+json")
                    .send()
                    .await
                    .expect("GET tag");
                if resp.status() == 404 {
                    assert!(
                        state.acked.is_none(),
                        "after crash {round}: acknowledged tag {repo}:{tag} is gone"
                    );
                    return;
                }
                assert_eq!(resp.status(), 200, "GET {repo}:{tag}");
                let got = resp.headers()["docker-content-digest"]
                    .to_str()
                    .expect("digest header")
                    .to_owned();
                let allowed: Vec<&String> = state.acked.iter().chain(&state.unanswered).collect();
                assert!(
                    allowed.contains(&&got),
                    "after crash {round}: {repo}:{tag} is {got}, expected one of {allowed:?}"
                );
            }
        })
        .buffer_unordered(VERIFY_PARALLEL);
    tags.collect::<Vec<()>>().await;

    // The Spack index lists exactly the spec tags present, and every acknowledged one is.
    let listed: serde_json::Value = http
        .get(format!("{url}/v2/{SPACK_REPO}/tags/list"))
        .send()
        .await
        .expect("tags/list")
        .json()
        .await
        .expect("tags JSON");
    let present: BTreeSet<String> = listed["tags"]
        .as_array()
        .expect("tags")
        .iter()
        .filter_map(|t| t.as_str())
        .filter(|t| *t != "index.spack")
        .map(str::to_owned)
        .collect();
    for ((repo, tag), state) in &ledger.tags {
        if repo == SPACK_REPO && state.acked.is_some() {
            assert!(present.contains(tag), "after crash {round}: spec tag {tag} is listed");
        }
    }
    let (_, index) = common::spack::served_index(server, SPACK_REPO).await;
    let indexed: BTreeSet<String> = in_buildcache(&index).into_iter().collect();
    let expected: BTreeSet<String> = present.iter().map(|t| hash_of_tag(t)).collect();
    assert_eq!(
        indexed, expected,
        "after crash {round}: the Spack index lists exactly the spec tags present"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_pushes_survive_kill_9_under_load() {
    let started = Instant::now();
    let seed: u64 = match std::env::var("CRASH_SEED") {
        Ok(s) => s.parse().expect("CRASH_SEED is a number"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    };
    eprintln!("crash test seed {seed} (CRASH_SEED={seed} repeats the schedule)");
    let mut schedule = Rng(seed);
    let mut server = TestServer::start();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let next_spec = Arc::new(AtomicUsize::new(0));
    let mut pushers: Vec<Pusher> = (0..PUSHERS)
        .map(|id| Pusher {
            id,
            rng: Rng(seed ^ (id as u64 + 1).wrapping_mul(0xe703_7ed1_a0b4_28db)),
            seq: 0,
            specs: Vec::new(),
        })
        .collect();

    let mut verify_times = Vec::new();
    for round in 1..=CRASHES {
        let ctx = Arc::new(Ctx {
            url: server.url.clone(),
            http: http.clone(),
            ledger: ledger.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            next_spec: next_spec.clone(),
            seed,
        });
        let kill_after = Duration::from_millis(schedule.range(KILL_MS));
        let acks = || {
            let l = ledger.lock().expect("ledger");
            (l.manifest_acks, l.blob_acks)
        };
        let before = acks();
        let round_started = Instant::now();
        let round_task = tokio::spawn(run_round(ctx.clone(), pushers));
        while acks().0 < before.0 + WARM_UP_MANIFESTS {
            assert!(
                round_started.elapsed() < Duration::from_secs(60) && !round_task.is_finished(),
                "round {round}: the pushers did not get under way"
            );
            // Polls a condition; not a wait standing in for one.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let warm = round_started.elapsed();
        tokio::time::sleep(kill_after).await;
        // SIGKILL while the pushers are mid-flight; they stop at their next failed request.
        server.kill();
        ctx.stop.store(true, Ordering::Relaxed);
        pushers = round_task.await.expect("round");
        let after = acks();
        eprintln!(
            "round {round}: {WARM_UP_MANIFESTS} manifests after {warm:?}, SIGKILL {kill_after:?} later; \
             {} manifests and {} blobs acknowledged in the round",
            after.0 - before.0,
            after.1 - before.1
        );
        server.crash_and_restart();
        let verify_started = Instant::now();
        let snapshot = std::mem::take(&mut *ledger.lock().expect("ledger"));
        verify(&server, &http, &snapshot, round).await;
        verify_times.push(verify_started.elapsed());
        *ledger.lock().expect("ledger") = snapshot;
    }

    let ledger = ledger.lock().expect("ledger");
    eprintln!(
        "{} manifest and {} blob uploads acknowledged; verification after each crash took {:?}; {:?} in all",
        ledger.manifest_acks,
        ledger.blob_acks,
        verify_times,
        started.elapsed()
    );
    // Nothing bad in the data: every recorded blob's object is there and hashes right.
    assert!(server.terminate().success(), "graceful stop");
    let (code, out, err) = server.fsck(&[]);
    assert_eq!(code, 0, "fsck after the crashes: {out}{err}");
    assert!(out.contains(" 0 bad") && out.contains(" 0 unreadable"), "{out}");
}

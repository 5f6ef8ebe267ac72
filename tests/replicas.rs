//! Issue 17's acceptance test: three Stowage processes on 127.0.0.1 share one PostgreSQL
//! database and one S3 bucket. 32 clients push OCI images and Spack specs through different
//! replicas while others delete tags and manifests, and every replica collects garbage every
//! second with no grace period. One replica gets SIGKILL mid-run: its clients retry on another
//! replica and finish what they were doing, and an upload started on it resumes on another.
//!
//! Afterwards, through every replica still up:
//! - every tag pushed and not deleted names its last acknowledged manifest (or a later push that
//!   was cut short by the kill and landed), every deleted tag is gone, and tags/list holds
//!   exactly those tags;
//! - every acknowledged manifest that a live tag names is readable by digest, every manifest
//!   deleted by digest is gone, and every blob referenced by a manifest still stored is
//!   readable and hashes to its digest (with no grace period, a blob no manifest references may
//!   rightly be gone: only referenced blobs must stay);
//! - the Spack index (`index.spack`, as the server serves it) lists exactly the spec tags
//!   present, and those are exactly the spec tags pushed and not deleted.
//!
//! During the run, a client that got a manifest acknowledged reads it back by digest, with its
//! blobs, through another replica (a write acknowledged by one replica is visible to all). A
//! client a replica does not answer moves on to the next one and retries there; a chunked
//! upload continues from the offset the new replica reports for the same upload URL.
//!
//! Twice the test holds garbage-collection leadership itself (the advisory lock a replica takes
//! for each pass), so that no replica collects meanwhile: from the resumed upload's closing PUT
//! to the manifest that keeps its blob (with no grace period an unreferenced blob may go at any
//! pass), and while verifying (so that a manifest no tag names is not collected between the
//! reads of it and of its blobs). Before verifying it lets two passes run over the final state.
//!
//! The test runs on S3 and PostgreSQL whatever `STOWAGE_TEST_BACKEND` and
//! `STOWAGE_TEST_CATALOG` say: replicas need both (the fs backend holds a single-node lock, and a
//! SQLite catalog lives in one data directory). A missing PostgreSQL or moto fails it.
//! `scripts/test` runs it in the S3/PostgreSQL pass only (the first pass would run the very
//! same configuration again).
//!
//! The pushed bytes and the clients' choices come from one seed, printed at the start;
//! `REPLICAS_SEED=<n>` repeats them (the interleaving of 32 clients still varies).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::rng::Rng;
use common::spack::{FixtureRepo, in_buildcache, served_index, spec_hash};
use common::sql::{CatalogSql, Value};
use common::{Backend, Catalog, S3_PART_SIZE, TestServer, metric, sha256, wait_until};
use futures_util::StreamExt as _;
use serde_json::json;
use stowage::catalog::postgres::GC_LEADER_LOCK;
use tokio::sync::mpsc;

const REPLICAS: usize = 3;
const CLIENTS: usize = 32;
/// How long the clients push; the kill comes about a third of the way in.
const LOAD: Duration = Duration::from_secs(24);
/// How long at least they push after the kill (however long the warm-up took), so that every
/// pusher of the killed replica finds it gone and moves on.
const AFTER_KILL: Duration = Duration::from_secs(8);
/// The replica killed mid-run.
const KILLED: usize = 1;
/// Manifests acknowledged before the kill scenario starts (the clients are under way).
const WARM_UP_MANIFESTS: u64 = 40;
/// Attempts of one operation (each failed attempt moved the client to another replica, or
/// found a replica busy) before the test gives up.
const MAX_ATTEMPTS: u32 = 30;
/// How long one image may keep losing its blobs to the collector before the test gives up.
const PUSH_DEADLINE: Duration = Duration::from_secs(60);
const SPACK_REPO: &str = "replicas/spack";
const RESUME_REPO: &str = "replicas/resume";
const IMAGE_REPOS: usize = 5;
/// Layers several clients push to several repositories at once (deduplicated by digest).
const SHARED_LAYERS: u64 = 6;
/// Tags each image client cycles through: a later push of a tag replaces the earlier one,
/// whose manifest the collector then removes.
const TAGS_PER_CLIENT: u64 = 3;
/// Requests at once while verifying.
const VERIFY_PARALLEL: usize = 16;
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Every replica: collection every second with no grace period, the storage sweep for objects
/// the catalog does not know every other second, superseded Spack index blobs after 2 s.
const GC_ENVS: &[(&str, &str)] = &[
    ("STOWAGE_GC__INTERVAL_SECS", "1"),
    ("STOWAGE_GC__GRACE_SECS", "0"),
    ("STOWAGE_GC__ORPHAN_INTERVAL_SECS", "2"),
    ("STOWAGE_GC__SPACK_INDEX_GRACE_SECS", "2"),
];

/// What the replicas acknowledged about one tag.
#[derive(Default)]
struct TagState {
    /// The last push acknowledged.
    acked: Option<String>,
    /// Pushes sent since then without an answer (cut short by the kill: each may have landed).
    unanswered: Vec<String>,
    /// A delete of the tag (or of its manifest by digest) was acknowledged; it is never pushed
    /// again.
    deleted: bool,
}

/// An acknowledged manifest PUT.
struct AckedManifest {
    repo: String,
    digest: String,
    /// Config and layer digests.
    blobs: Vec<String>,
}

/// Everything the replicas acknowledged.
#[derive(Default)]
struct Ledger {
    manifests: Vec<AckedManifest>,
    tags: BTreeMap<(String, String), TagState>,
    /// Manifests deleted by digest (repository, digest).
    deleted_digests: BTreeSet<(String, String)>,
    /// Blob uploads acknowledged (repository, digest). With no grace period, those no stored
    /// manifest references may rightly be gone by the end.
    blobs: BTreeSet<(String, String)>,
    /// Blob uploads acknowledged: monolithic POST, POST + PUT, POST + PATCHes + PUT.
    blob_acks: [u64; 3],
    image_pushes: u64,
    spec_pushes: u64,
    tag_deletes: u64,
    digest_deletes: u64,
}

/// Counters of what went wrong on the way (and was retried).
#[derive(Default)]
struct Stats {
    /// Requests the killed replica did not answer (the client moved on to another).
    killed_errors: AtomicU64,
    /// Requests a live replica did not answer (none expected; each is printed).
    live_errors: AtomicU64,
    /// 503 answers (retried after a pause).
    unavailable: AtomicU64,
    /// Manifest PUTs refused with MANIFEST_BLOB_UNKNOWN: the collector (no grace period) took
    /// the blobs between their upload and the manifest; the client pushed them again.
    blob_unknown: AtomicU64,
    /// The most attempts one image took (see `blob_unknown`).
    most_push_attempts: AtomicU64,
    /// Chunked uploads continued on another replica from the offset it reported.
    sessions_resumed: AtomicU64,
    /// Acknowledged manifests read back through another replica, with their blobs.
    cross_reads: AtomicU64,
    index_reads: AtomicU64,
}

/// A manifest handed to the deleters once acknowledged; nobody pushes its tag again.
struct Doomed {
    repo: String,
    tag: String,
    digest: String,
}

struct Ctx {
    /// Base URL of each replica.
    urls: Vec<String>,
    http: reqwest::Client,
    ledger: Mutex<Ledger>,
    stats: Stats,
    stop: AtomicBool,
    /// Set just before the replica `KILLED` gets SIGKILL.
    killed: AtomicBool,
    /// Set when the test ends, a failure included (see [`Teardown`]).
    tearing_down: AtomicBool,
    next_spec: AtomicUsize,
    seed: u64,
}

/// The replica a client talked to did not answer (or answered 503): the operation is retried,
/// on the replica the client has moved on to.
struct Gone;

/// A manifest PUT was refused because a blob it references is gone.
struct BlobUnknown;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Images,
    Specs,
    Deletes,
}

/// 20 image pushers, 8 Spack spec pushers, 4 deleters.
fn role(id: usize) -> Role {
    match id % 8 {
        0 | 4 => Role::Specs,
        7 => Role::Deletes,
        _ => Role::Images,
    }
}

/// One client: a replica it talks to (round-robin at first, the next one after a failure),
/// and its own random choices.
struct Client {
    id: usize,
    replica: usize,
    rng: Rng,
    seq: u64,
    /// Spack pushers: the specs pushed and not handed to the deleters (pushed again now and then).
    specs: Vec<usize>,
}

/// Panics with the body when `resp` does not have one of `want`; returns it otherwise.
async fn check(resp: reqwest::Response, want: &[u16], what: &str) -> reqwest::Response {
    if want.contains(&resp.status().as_u16()) {
        return resp;
    }
    let (status, url) = (resp.status(), resp.url().clone());
    let body = resp.text().await.unwrap_or_default();
    panic!("{what}: {status} from {url}, expected {want:?}: {body}");
}

/// The offset a session response's `Range: 0-<last>` reports (`0-0` is read as 0: the
/// sessions here never stop at one byte, every PATCH sending at least two).
fn range_end(resp: &reqwest::Response) -> usize {
    let range = resp.headers()["range"].to_str().expect("Range header");
    let last: usize = range
        .strip_prefix("0-")
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("Range {range:?}"));
    if last == 0 { 0 } else { last + 1 }
}

fn manifest(config: (&str, usize), layers: &[(String, usize)]) -> Vec<u8> {
    let layers: Vec<_> = layers
        .iter()
        .map(|(d, s)| json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s}))
        .collect();
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.0, "size": config.1},
        "layers": layers,
    }))
    .expect("manifest")
}

/// The config and layer digests a manifest references.
fn blobs_of(body: &[u8]) -> Vec<String> {
    let m: serde_json::Value = serde_json::from_slice(body).expect("manifest JSON");
    let mut blobs: Vec<String> = m["layers"]
        .as_array()
        .map(|ls| {
            ls.iter()
                .filter_map(|l| l["digest"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if let Some(config) = m["config"]["digest"].as_str() {
        blobs.push(config.to_owned());
    }
    blobs
}

fn spec_tag(i: usize) -> String {
    format!("pkg{i}-1.0-{}.spack", spec_hash(i))
}

/// The hash of one of the five dependencies every spec shares (never pushed as specs of their
/// own: the index lists them, not in the build cache).
fn dep_hash(k: usize) -> String {
    format!("zlib{k}").repeat(8)[..32].to_owned()
}

/// Spec `i`'s nodes: the spec, which links one of the shared dependencies, and that dependency.
fn spec_nodes(i: usize) -> serde_json::Value {
    let k = i % 5;
    let arch = json!({"platform": "linux", "platform_os": "debian12", "target": "x86_64"});
    json!([
        {"name": format!("pkg{i}"), "version": "1.0", "arch": arch,
         "parameters": {"build_system": "generic", "cflags": []}, "namespace": "builtin",
         "dependencies": [{"name": format!("zlib{k}"), "hash": dep_hash(k),
                           "parameters": {"deptypes": ["build", "link"], "virtuals": []}}],
         "hash": spec_hash(i)},
        {"name": format!("zlib{k}"), "version": "1.3", "arch": arch,
         "parameters": {"build_system": "generic"}, "namespace": "builtin", "hash": dep_hash(k)},
    ])
}

/// The hash in a spec tag `<name>-<version>-<hash>.spack`.
fn hash_of_tag(tag: &str) -> String {
    let stem = tag.trim_end_matches(".spack");
    stem.rsplit('-').next().unwrap_or_default().to_owned()
}

impl Client {
    fn base<'a>(&self, ctx: &'a Ctx) -> &'a str {
        &ctx.urls[self.replica]
    }

    fn v2(&self, ctx: &Ctx, path: &str) -> String {
        format!("{}/v2/{path}", self.base(ctx))
    }

    /// The replica did not answer: counts it and moves on to the next replica.
    fn failed(&mut self, ctx: &Ctx, e: &reqwest::Error) -> Gone {
        if ctx.tearing_down.load(Ordering::Relaxed) {
            // The replicas are being stopped: nothing to report.
        } else if self.replica == KILLED && ctx.killed.load(Ordering::Relaxed) {
            ctx.stats.killed_errors.fetch_add(1, Ordering::Relaxed);
        } else {
            ctx.stats.live_errors.fetch_add(1, Ordering::Relaxed);
            eprintln!(
                "client {}: live replica {} did not answer: {e:?}",
                self.id, self.replica
            );
        }
        self.replica = (self.replica + 1) % REPLICAS;
        Gone
    }

    /// Sends a request: the response, or `Gone` when the replica did not answer (the client
    /// then talks to the next one) or answered 503 (after a pause).
    async fn send(&mut self, ctx: &Ctx, req: reqwest::RequestBuilder) -> Result<reqwest::Response, Gone> {
        match req.send().await {
            Ok(resp) if resp.status() == 503 => {
                ctx.stats.unavailable.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
                Err(Gone)
            }
            Ok(resp) => Ok(resp),
            Err(e) => Err(self.failed(ctx, &e)),
        }
    }

    /// A response's body, or `Gone` when the replica died while sending it.
    async fn body(&mut self, ctx: &Ctx, resp: reqwest::Response) -> Result<bytes::Bytes, Gone> {
        match resp.bytes().await {
            Ok(b) => Ok(b),
            Err(e) => Err(self.failed(ctx, &e)),
        }
    }

    async fn open_session(&mut self, ctx: &Ctx, repo: &str) -> Result<String, Gone> {
        let req = ctx.http.post(self.v2(ctx, &format!("{repo}/blobs/uploads/")));
        let resp = self.send(ctx, req).await?;
        let resp = check(resp, &[202], &format!("POST of an upload session in {repo}")).await;
        Ok(resp.headers()["location"].to_str().expect("Location").to_owned())
    }

    /// Uploads a blob in one of the three ways clients do (chosen at random), retrying on
    /// another replica when one does not answer. Returns its digest.
    async fn push_blob(&mut self, ctx: &Ctx, repo: &str, data: &[u8]) -> String {
        let how = self.rng.below(3) as usize;
        let digest = sha256(data);
        for _ in 0..MAX_ATTEMPTS {
            let pushed = match how {
                0 => self.push_monolithic(ctx, repo, data, &digest).await,
                1 => self.push_post_put(ctx, repo, data, &digest).await,
                _ => self.push_chunked(ctx, repo, data, &digest).await,
            };
            if pushed.is_ok() {
                let mut ledger = ctx.ledger.lock().expect("ledger");
                ledger.blob_acks[how] += 1;
                ledger.blobs.insert((repo.to_owned(), digest.clone()));
                return digest;
            }
        }
        panic!(
            "client {}: blob {digest} could not be pushed to {repo} in {MAX_ATTEMPTS} attempts (seed {})",
            self.id, ctx.seed
        );
    }

    /// `POST ?digest=` with the body.
    async fn push_monolithic(&mut self, ctx: &Ctx, repo: &str, data: &[u8], digest: &str) -> Result<(), Gone> {
        let req = ctx
            .http
            .post(self.v2(ctx, &format!("{repo}/blobs/uploads/?digest={digest}")))
            .header("Content-Type", "application/octet-stream")
            .body(data.to_vec());
        let resp = self.send(ctx, req).await?;
        check(resp, &[201], &format!("monolithic upload of {digest} to {repo}")).await;
        Ok(())
    }

    /// `POST`, then `PUT ?digest=` with the body. A failure starts over with a new session.
    async fn push_post_put(&mut self, ctx: &Ctx, repo: &str, data: &[u8], digest: &str) -> Result<(), Gone> {
        let location = self.open_session(ctx, repo).await?;
        let req = ctx
            .http
            .put(format!("{}{location}?digest={digest}", self.base(ctx)))
            .header("Content-Type", "application/octet-stream")
            .body(data.to_vec());
        let resp = self.send(ctx, req).await?;
        check(resp, &[201], &format!("PUT upload of {digest} to {repo}")).await;
        Ok(())
    }

    /// `POST`, PATCHes of a third of the blob, an empty `PUT ?digest=`. When a replica does
    /// not answer after the session opened, the client asks the next one for the session's
    /// offset (a `GET` on the upload URL: any replica resumes a session from the catalog) and
    /// continues from there.
    async fn push_chunked(&mut self, ctx: &Ctx, repo: &str, data: &[u8], digest: &str) -> Result<(), Gone> {
        let location = self.open_session(ctx, repo).await?;
        // At least 2 bytes a PATCH: a session at offset 1 reports `Range: 0-0`, as one at 0 does.
        let chunk = (data.len() / 3).max(2);
        let mut offset = 0;
        let mut attempts = 0;
        // What happened to the session so far, for the messages of a failure.
        let mut story = String::new();
        loop {
            attempts += 1;
            assert!(
                attempts <= MAX_ATTEMPTS,
                "client {}: upload {location} did not finish in {MAX_ATTEMPTS} attempts (seed {})",
                self.id,
                ctx.seed
            );
            let was = self.replica;
            let closing = match self
                .send_rest(ctx, &location, data, &mut offset, chunk, digest, &story)
                .await
            {
                Ok(()) => return Ok(()),
                Err(closing) => closing,
            };
            // Resume wherever the client is now: ask for the session's offset until a replica
            // answers.
            let resp = loop {
                let req = ctx.http.get(format!("{}{location}", self.base(ctx)));
                if let Ok(resp) = self.send(ctx, req).await {
                    break resp;
                }
                attempts += 1;
                assert!(
                    attempts <= MAX_ATTEMPTS,
                    "client {}: status of {location} got no answer",
                    self.id
                );
            };
            if resp.status() == 404 && closing {
                // The closing PUT may have landed before the replica died: then the blob is
                // there, and the session is rightly gone.
                let head = loop {
                    let req = ctx.http.head(self.v2(ctx, &format!("{repo}/blobs/{digest}")));
                    if let Ok(head) = self.send(ctx, req).await {
                        break head;
                    }
                    attempts += 1;
                    assert!(
                        attempts <= MAX_ATTEMPTS,
                        "client {}: HEAD {digest} got no answer",
                        self.id
                    );
                };
                if head.status() == 200 {
                    return Ok(());
                }
                // Not committed after all: the session is gone with the data; start over.
                return Err(Gone);
            }
            let resp = check(
                resp,
                &[204],
                &format!(
                    "client {}: status of upload {location} (acknowledged POST) on replica {}",
                    self.id, self.replica
                ),
            )
            .await;
            let reported = range_end(&resp);
            assert!(
                reported <= offset,
                "client {}: upload {location} reports {reported} bytes, more than the {offset} sent",
                self.id
            );
            story.push_str(&format!(
                "; {} on replica {was} got no answer, replica {} reported {reported} of the {offset} bytes sent",
                if closing { "the closing PUT" } else { "a PATCH" },
                self.replica
            ));
            eprintln!("client {}: upload {location} of {digest}{story}", self.id);
            offset = reported;
            ctx.stats.sessions_resumed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// PATCHes `data[offset..]` in chunks, then the closing PUT. `Err(true)` when the PUT got
    /// no answer, `Err(false)` when a PATCH did not. `story` is what happened to the session
    /// before (for the message of a failure).
    #[allow(clippy::too_many_arguments)]
    async fn send_rest(
        &mut self,
        ctx: &Ctx,
        location: &str,
        data: &[u8],
        offset: &mut usize,
        chunk: usize,
        digest: &str,
        story: &str,
    ) -> Result<(), bool> {
        while *offset < data.len() {
            let end = (*offset + chunk).min(data.len());
            let req = ctx
                .http
                .patch(format!("{}{location}", self.base(ctx)))
                .header("Content-Type", "application/octet-stream")
                .header("Content-Range", format!("{}-{}", *offset, end - 1))
                .body(data[*offset..end].to_vec());
            let resp = self.send(ctx, req).await.map_err(|Gone| false)?;
            let what = format!(
                "PATCH {}-{} of {location} on replica {}{story}",
                *offset,
                end - 1,
                self.replica
            );
            let resp = check(resp, &[202], &what).await;
            assert_eq!(range_end(&resp), end, "PATCH of {location}: the offset reported");
            *offset = end;
        }
        let req = ctx.http.put(format!("{}{location}?digest={digest}", self.base(ctx)));
        let resp = self.send(ctx, req).await.map_err(|Gone| true)?;
        let what = format!(
            "closing PUT of {location} ({digest}) on replica {}{story}",
            self.replica
        );
        check(resp, &[201], &what).await;
        Ok(())
    }

    /// PUTs a manifest under `tag` until a replica answers; records the attempt before sending
    /// and the 201 after. `BlobUnknown` when a referenced blob is gone (the caller pushes the
    /// blobs again).
    async fn push_manifest(
        &mut self,
        ctx: &Ctx,
        repo: &str,
        tag: &str,
        body: &[u8],
        media_type: &str,
    ) -> Result<String, BlobUnknown> {
        let digest = sha256(body);
        let key = (repo.to_owned(), tag.to_owned());
        for _ in 0..MAX_ATTEMPTS {
            ctx.ledger
                .lock()
                .expect("ledger")
                .tags
                .entry(key.clone())
                .or_default()
                .unanswered
                .push(digest.clone());
            let req = ctx
                .http
                .put(self.v2(ctx, &format!("{repo}/manifests/{tag}")))
                .header("Content-Type", media_type)
                .body(body.to_vec());
            let Ok(resp) = self.send(ctx, req).await else { continue };
            if resp.status() == 400 {
                let text = resp.text().await.unwrap_or_default();
                assert!(
                    text.contains("MANIFEST_BLOB_UNKNOWN"),
                    "manifest PUT {repo}:{tag} refused: {text}"
                );
                ctx.stats.blob_unknown.fetch_add(1, Ordering::Relaxed);
                return Err(BlobUnknown);
            }
            check(resp, &[201], &format!("manifest PUT {repo}:{tag}")).await;
            let mut ledger = ctx.ledger.lock().expect("ledger");
            let state = ledger.tags.entry(key).or_default();
            assert!(!state.deleted, "{repo}:{tag} pushed after its delete");
            state.acked = Some(digest.clone());
            state.unanswered.clear();
            ledger.manifests.push(AckedManifest {
                repo: repo.to_owned(),
                digest: digest.clone(),
                blobs: blobs_of(body),
            });
            return Ok(digest);
        }
        panic!(
            "client {}: manifest {repo}:{tag} got no answer in {MAX_ATTEMPTS} attempts (seed {})",
            self.id, ctx.seed
        );
    }

    /// A helper for one request stream of this client (a layer pushed beside others), with
    /// choices of its own.
    fn fork(&mut self) -> Client {
        Client {
            id: self.id,
            replica: self.replica,
            rng: Rng(self.rng.next()),
            seq: self.seq,
            specs: Vec::new(),
        }
    }

    /// Pushes `blobs` side by side (as clients push layers), then the manifest; again while
    /// the collector takes blobs between the two (with no grace period, an unreferenced blob
    /// may go at the next pass). Returns the manifest's digest.
    async fn push_with_blobs(
        &mut self,
        ctx: &Ctx,
        repo: &str,
        tag: &str,
        blobs: &[&[u8]],
        body: &[u8],
        media_type: &str,
    ) -> String {
        let started = Instant::now();
        for attempt in 1.. {
            let helpers: Vec<Client> = blobs.iter().map(|_| self.fork()).collect();
            let ended_on =
                futures_util::future::join_all(helpers.into_iter().zip(blobs).map(|(mut h, data)| async move {
                    h.push_blob(ctx, repo, data).await;
                    h.replica
                }))
                .await;
            // A helper that found the replica gone moved on: so does the client.
            if let Some(&moved) = ended_on.iter().find(|&&r| r != self.replica) {
                self.replica = moved;
            }
            if let Ok(digest) = self.push_manifest(ctx, repo, tag, body, media_type).await {
                ctx.stats.most_push_attempts.fetch_max(attempt, Ordering::Relaxed);
                return digest;
            }
            assert!(
                started.elapsed() < PUSH_DEADLINE,
                "client {}: {repo}:{tag} lost its blobs to the collector {attempt} times in {PUSH_DEADLINE:?} (seed {})",
                self.id,
                ctx.seed
            );
        }
        unreachable!()
    }

    /// Reads an acknowledged manifest back by digest through another replica, with its blobs
    /// under 1 MiB: a write one replica acknowledged is visible on every other, and the
    /// collector never takes the blobs of a tagged manifest. Skipped when that replica is down.
    async fn read_elsewhere(&mut self, ctx: &Ctx, repo: &str, digest: &str, body: &[u8], blobs: &[(&str, &[u8])]) {
        let other = (self.replica + 1 + self.rng.below(REPLICAS as u64 - 1) as usize) % REPLICAS;
        let base = &ctx.urls[other];
        let Ok(resp) = ctx
            .http
            .get(format!("{base}/v2/{repo}/manifests/{digest}"))
            .header("Accept", OCI_MANIFEST)
            .send()
            .await
        else {
            return;
        };
        let resp = check(
            resp,
            &[200],
            &format!(
                "manifest {repo}@{digest}, acknowledged by replica {}, read on replica {other}",
                self.replica
            ),
        )
        .await;
        let Ok(got) = resp.bytes().await else { return };
        assert_eq!(got.as_ref(), body, "{repo}@{digest} read on replica {other}");
        for (digest, data) in blobs.iter().filter(|(_, d)| d.len() < 1024 * 1024) {
            let Ok(resp) = ctx.http.get(format!("{base}/v2/{repo}/blobs/{digest}")).send().await else {
                return;
            };
            let resp = check(
                resp,
                &[200],
                &format!("blob {repo}@{digest} of a tagged manifest, read on replica {other}"),
            )
            .await;
            let Ok(got) = resp.bytes().await else { return };
            assert_eq!(got.as_ref(), *data, "blob {repo}@{digest} read on replica {other}");
        }
        ctx.stats.cross_reads.fetch_add(1, Ordering::Relaxed);
    }

    /// One OCI image: 1-3 layers (some shared with other clients and repositories, now and then
    /// one over an S3 part), a config, the manifest under one of this client's tags or, a
    /// quarter of the time, under a tag of its own that goes to the deleters.
    async fn push_image(&mut self, ctx: &Ctx, doomed: &mpsc::UnboundedSender<Doomed>) {
        self.seq += 1;
        let repo = format!("replicas/img{}", self.id % IMAGE_REPOS);
        let to_delete = self.rng.below(4) == 0;
        let tag = if to_delete {
            format!("c{}-d{}", self.id, self.seq)
        } else {
            format!("c{}-t{}", self.id, self.seq % TAGS_PER_CLIENT)
        };
        let mut data = Vec::new();
        for _ in 0..self.rng.range(1..4) {
            data.push(match self.rng.below(30) {
                0..=7 => {
                    let k = self.rng.below(SHARED_LAYERS);
                    Rng(ctx.seed ^ (k + 1).wrapping_mul(0xa076_1d64_78bd_642f)).bytes(32 * 1024 + k as usize)
                }
                8 => {
                    let len = self.rng.range(S3_PART_SIZE as u64..S3_PART_SIZE as u64 + 1024 * 1024);
                    self.rng.bytes(len as usize)
                }
                _ => {
                    let len = self.rng.range(2..64 * 1024);
                    self.rng.bytes(len as usize)
                }
            });
        }
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []},
            "config": {"Labels": {"client": self.id.to_string(), "seq": self.seq.to_string()}},
        }))
        .expect("config");
        let layers: Vec<(String, usize)> = data.iter().map(|d| (sha256(d), d.len())).collect();
        let body = manifest((&sha256(&config), config.len()), &layers);
        let mut blobs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        blobs.push(&config);
        let digest = self
            .push_with_blobs(ctx, &repo, &tag, &blobs, &body, OCI_MANIFEST)
            .await;
        ctx.ledger.lock().expect("ledger").image_pushes += 1;
        if self.rng.below(3) == 0 {
            let named: Vec<(String, &[u8])> = blobs.iter().map(|d| (sha256(d), *d)).collect();
            let named: Vec<(&str, &[u8])> = named.iter().map(|(n, d)| (n.as_str(), *d)).collect();
            self.read_elsewhere(ctx, &repo, &digest, &body, &named).await;
        }
        if to_delete {
            let _ = doomed.send(Doomed { repo, tag, digest });
        }
    }

    /// One Spack spec image: a new spec or, now and then, one of this client's earlier specs
    /// again (another config, as `spack buildcache push --force` makes); a sixth of the new
    /// ones go to the deleters. Then sometimes a read of `index.spack`, which makes the replica
    /// build the index.
    async fn push_spec(&mut self, ctx: &Ctx, doomed: &mpsc::UnboundedSender<Doomed>) {
        self.seq += 1;
        let again = !self.specs.is_empty() && self.rng.below(5) == 0;
        let i = if again {
            self.specs[self.rng.below(self.specs.len() as u64) as usize]
        } else {
            ctx.next_spec.fetch_add(1, Ordering::Relaxed)
        };
        let to_delete = !again && self.rng.below(6) == 0;
        let layer = {
            let len = self.rng.range(100..20_000) as usize;
            self.rng.bytes(len)
        };
        let layer_digest = sha256(&layer);
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []}, "config": {"Env": []},
            "spec": {"_meta": {"version": 5}, "nodes": spec_nodes(i)},
            "buildcache_layout_version": 3,
            "binary_cache_checksum": {"hash_algorithm": "sha256", "hash": &layer_digest[7..]},
            "archive_timestamp": format!("client {} seq {}", self.id, self.seq),
        }))
        .expect("config");
        let body = manifest((&sha256(&config), config.len()), &[(layer_digest, layer.len())]);
        let tag = spec_tag(i);
        let digest = self
            .push_with_blobs(ctx, SPACK_REPO, &tag, &[&layer, &config], &body, OCI_MANIFEST)
            .await;
        ctx.ledger.lock().expect("ledger").spec_pushes += 1;
        if to_delete {
            let _ = doomed.send(Doomed {
                repo: SPACK_REPO.to_owned(),
                tag,
                digest,
            });
        } else if !again {
            self.specs.push(i);
        }
        if self.rng.below(4) == 0 {
            self.read_index(ctx).await;
        }
    }

    /// `GET index.spack` (the replica builds the index if it is stale), retried elsewhere.
    async fn read_index(&mut self, ctx: &Ctx) {
        for _ in 0..MAX_ATTEMPTS {
            let req = ctx
                .http
                .get(self.v2(ctx, &format!("{SPACK_REPO}/manifests/index.spack")))
                .header("Accept", OCI_MANIFEST);
            let Ok(resp) = self.send(ctx, req).await else { continue };
            let what = format!("GET index.spack on replica {}", self.replica);
            let resp = check(resp, &[200], &what).await;
            if self.body(ctx, resp).await.is_ok() {
                ctx.stats.index_reads.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        panic!(
            "client {}: index.spack got no answer in {MAX_ATTEMPTS} attempts",
            self.id
        );
    }

    /// The specs of the Spack fixture (a real build cache: `http-noauth/spack_buildcache`, the
    /// one the Spack tests push) into the Spack repository, beside the generated ones.
    async fn push_fixture(&mut self, ctx: &Ctx, fixture: &FixtureRepo) {
        let mut order: Vec<_> = fixture.manifests.iter().filter(|(t, _)| *t != "index.spack").collect();
        // Image manifests before the indexes that may list them.
        order.sort_by_key(|(_, (body, _))| body.windows(11).any(|w| w == b"\"manifests\""));
        for (tag, (body, media_type)) in order {
            let wanted = blobs_of(body);
            let blobs: Vec<&[u8]> = wanted.iter().map(|d| fixture.blobs[d].as_slice()).collect();
            self.push_with_blobs(ctx, SPACK_REPO, tag, &blobs, body, media_type)
                .await;
            ctx.ledger.lock().expect("ledger").spec_pushes += 1;
        }
    }

    /// Deletes what the pushers hand over, by tag or by digest, until they are all done.
    async fn delete_doomed(&mut self, ctx: &Ctx, rx: &tokio::sync::Mutex<mpsc::UnboundedReceiver<Doomed>>) {
        loop {
            let Some(d) = rx.lock().await.recv().await else { return };
            let by_digest = self.rng.below(2) == 0;
            let reference = if by_digest { &d.digest } else { &d.tag };
            let mut retried = false;
            let mut attempts = 0;
            loop {
                attempts += 1;
                assert!(attempts <= MAX_ATTEMPTS, "DELETE {}:{reference} got no answer", d.repo);
                let req = ctx
                    .http
                    .delete(self.v2(ctx, &format!("{}/manifests/{reference}", d.repo)));
                let Ok(resp) = self.send(ctx, req).await else {
                    retried = true;
                    continue;
                };
                // A retried delete may find its first attempt landed.
                let ok: &[u16] = if retried { &[202, 404] } else { &[202] };
                check(resp, ok, &format!("DELETE {}:{reference}", d.repo)).await;
                break;
            }
            let mut ledger = ctx.ledger.lock().expect("ledger");
            ledger
                .tags
                .get_mut(&(d.repo.clone(), d.tag.clone()))
                .expect("a doomed tag was pushed")
                .deleted = true;
            if by_digest {
                ledger.deleted_digests.insert((d.repo, d.digest));
                ledger.digest_deletes += 1;
            } else {
                ledger.tag_deletes += 1;
            }
        }
    }
}

/// Stops the clients when the test ends, a failure included: the replicas are dropped after it
/// (declared before it), and clients still running at that moment then say nothing of the
/// replicas going away.
struct Teardown(Arc<Ctx>);

impl Drop for Teardown {
    fn drop(&mut self) {
        self.0.tearing_down.store(true, Ordering::Relaxed);
        self.0.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs client `id` until the test stops the load.
async fn run_client(
    ctx: Arc<Ctx>,
    id: usize,
    doomed: Option<mpsc::UnboundedSender<Doomed>>,
    rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Doomed>>>,
    fixture: Option<Arc<FixtureRepo>>,
) -> (Role, usize) {
    let mut client = Client {
        id,
        replica: id % REPLICAS,
        rng: Rng(ctx.seed ^ (id as u64 + 1).wrapping_mul(0xe703_7ed1_a0b4_28db)),
        seq: 0,
        specs: Vec::new(),
    };
    match (role(id), doomed) {
        (Role::Deletes, _) => client.delete_doomed(&ctx, &rx).await,
        (role, Some(doomed)) => {
            if let Some(fixture) = fixture {
                client.push_fixture(&ctx, &fixture).await;
            }
            while !ctx.stop.load(Ordering::Relaxed) {
                match role {
                    Role::Specs => client.push_spec(&ctx, &doomed).await,
                    _ => client.push_image(&ctx, &doomed).await,
                }
            }
        }
        (role, None) => unreachable!("{role:?} client without a sender"),
    }
    (role(id), client.replica)
}

/// Collection passes that ended well (`ok`) or not (`failed`) on `servers`.
async fn gc_passes(servers: &[&TestServer], kind: &str) -> u64 {
    let mut n = 0.0;
    for s in servers {
        n += metric(s, "stowage_gc_passes_total", &[&format!("kind=\"{kind}\"")]).await;
    }
    n as u64
}

/// Garbage-collection leadership held by the test (the advisory lock a replica takes for each
/// pass): no replica collects while it is held. Taking it waits for a pass under way to end.
struct GcPaused(CatalogSql);

impl GcPaused {
    fn take(server: &TestServer) -> GcPaused {
        let sql = server.catalog_sql();
        tokio::task::block_in_place(|| sql.execute("SELECT pg_advisory_lock(?1)", &[GC_LEADER_LOCK.into()]));
        GcPaused(sql)
    }

    fn release(self) {
        let released = tokio::task::block_in_place(|| {
            self.0
                .query_rows("SELECT pg_advisory_unlock(?1)", &[GC_LEADER_LOCK.into()])
        });
        assert_eq!(released, [[Value::Int(1)]], "the test held collection leadership");
    }
}

/// The mid-run scenario: a chunked upload opened on replica `KILLED` (POST, one PATCH of a
/// whole S3 part and a tail), SIGKILL to that replica, then on another replica a status
/// request for the offset, PATCH from there, the closing PUT; the blob is then read through
/// both remaining replicas and a manifest referencing it is pushed (so that it stays).
async fn upload_resumed_after_kill(ctx: &Ctx, replicas: &mut [TestServer]) -> (String, String, usize, usize) {
    let http = &ctx.http;
    let (x, y, z) = (KILLED, (KILLED + 1) % REPLICAS, (KILLED + 2) % REPLICAS);
    let blob = Rng(ctx.seed ^ 0x005e_ed0f_b10b).bytes(2 * S3_PART_SIZE + 12_345);
    let digest = sha256(&blob);
    let resp = http
        .post(replicas[x].v2(&format!("{RESUME_REPO}/blobs/uploads/")))
        .send()
        .await
        .expect("POST on the replica about to be killed");
    let resp = check(resp, &[202], "POST of the session to resume").await;
    let location = resp.headers()["location"].to_str().expect("Location").to_owned();
    let first = S3_PART_SIZE + 2 * 1024 * 1024;
    let resp = http
        .patch(format!("{}{location}", replicas[x].url))
        .header("Content-Type", "application/octet-stream")
        .header("Content-Range", format!("0-{}", first - 1))
        .body(blob[..first].to_vec())
        .send()
        .await
        .expect("PATCH on the replica about to be killed");
    let resp = check(resp, &[202], "PATCH of the session to resume").await;
    assert_eq!(range_end(&resp), first);

    ctx.killed.store(true, Ordering::Relaxed);
    replicas[x].kill();
    eprintln!("replica {x} killed (SIGKILL) with upload {location} at {first} bytes");

    // Another replica resumes the session from the catalog's checkpoint: every whole S3 part
    // is durable at the end of a PATCH; the tail may have been only in the dead process.
    let resp = http
        .get(format!("{}{location}", replicas[y].url))
        .send()
        .await
        .expect("GET upload status");
    let resp = check(
        resp,
        &[204],
        &format!("status of upload {location} (opened on the killed replica {x}) on replica {y}"),
    )
    .await;
    let resumed = range_end(&resp);
    assert!(
        (S3_PART_SIZE..=first).contains(&resumed),
        "replica {y} reports {resumed} bytes of upload {location}: at least the whole part sent, at most the {first} bytes sent"
    );
    let resp = http
        .patch(format!("{}{location}", replicas[y].url))
        .header("Content-Type", "application/octet-stream")
        .header("Content-Range", format!("{resumed}-{}", blob.len() - 1))
        .body(blob[resumed..].to_vec())
        .send()
        .await
        .expect("PATCH after the resume");
    let resp = check(
        resp,
        &[202],
        &format!("PATCH of upload {location} on replica {y} from {resumed}"),
    )
    .await;
    assert_eq!(range_end(&resp), blob.len());

    // No collection between the closing PUT and the manifest that keeps the blob: with no grace
    // period, a blob no manifest references may go at any moment.
    let paused = GcPaused::take(&replicas[y]);
    let resp = http
        .put(format!("{}{location}?digest={digest}", replicas[y].url))
        .send()
        .await
        .expect("closing PUT after the resume");
    let resp = check(
        resp,
        &[201],
        &format!("closing PUT of upload {location} on replica {y}"),
    )
    .await;
    assert_eq!(resp.headers()["docker-content-digest"], digest.as_str());
    for r in [y, z] {
        let resp = http
            .get(replicas[r].v2(&format!("{RESUME_REPO}/blobs/{digest}")))
            .send()
            .await
            .expect("GET the resumed blob");
        let resp = check(resp, &[200], &format!("the resumed blob on replica {r}")).await;
        let body = resp.bytes().await.expect("resumed blob body");
        assert_eq!(sha256(&body), digest, "the resumed blob read on replica {r}");
    }
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = sha256(config);
    let resp = http
        .post(replicas[z].v2(&format!("{RESUME_REPO}/blobs/uploads/?digest={config_digest}")))
        .body(config.to_vec())
        .send()
        .await
        .expect("POST config");
    check(resp, &[201], "config of the resumed blob's manifest").await;
    let body = manifest((&config_digest, config.len()), &[(digest.clone(), blob.len())]);
    let resp = http
        .put(replicas[z].v2(&format!("{RESUME_REPO}/manifests/resumed")))
        .header("Content-Type", OCI_MANIFEST)
        .body(body.clone())
        .send()
        .await
        .expect("PUT manifest");
    check(resp, &[201], "manifest of the resumed blob").await;
    paused.release();
    let mut ledger = ctx.ledger.lock().expect("ledger");
    let state = ledger
        .tags
        .entry((RESUME_REPO.to_owned(), "resumed".to_owned()))
        .or_default();
    state.acked = Some(sha256(&body));
    ledger.blobs.insert((RESUME_REPO.to_owned(), digest.clone()));
    ledger.blobs.insert((RESUME_REPO.to_owned(), config_digest));
    ledger.manifests.push(AckedManifest {
        repo: RESUME_REPO.to_owned(),
        digest: sha256(&body),
        blobs: blobs_of(&body),
    });
    (location, digest, first, resumed)
}

/// What verification through one replica found.
#[derive(Default, Debug)]
struct Verified {
    live_tags: usize,
    deleted_tags: usize,
    manifests_read: usize,
    /// Acknowledged manifests no tag names any more (replaced, or their tag deleted) that the
    /// collector has not removed yet.
    unneeded_left: usize,
    blobs_read: usize,
    /// Distinct acknowledged blob uploads, and how many of them a stored manifest references
    /// (all of those were read back).
    acked_blobs: usize,
    acked_blobs_referenced: usize,
    spec_tags: usize,
    index_installs: usize,
}

/// GETs `path` on `url`; the status and body.
async fn get(http: &reqwest::Client, url: &str, path: &str) -> (u16, bytes::Bytes, Option<String>) {
    let resp = http
        .get(format!("{url}/v2/{path}"))
        .header("Accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}/v2/{path}: {e}"));
    let status = resp.status().as_u16();
    let digest = resp
        .headers()
        .get("docker-content-digest")
        .map(|v| v.to_str().expect("digest header").to_owned());
    let body = resp
        .bytes()
        .await
        .unwrap_or_else(|e| panic!("body of {url}/v2/{path}: {e}"));
    (status, body, digest)
}

/// Everything the ledger says is there, through the replica `server`.
async fn verify(server: &TestServer, http: &reqwest::Client, ledger: &Ledger) -> Verified {
    let url = server.url.as_str();
    let mut found = Verified::default();

    // Tags: each names its last acknowledged manifest (or a later push cut short by the kill
    // that landed); deleted ones are gone.
    let tags: Vec<(String, String, Option<String>)> = futures_util::stream::iter(&ledger.tags)
        .map(|((repo, tag), state)| async move {
            let (status, _, digest) = get(http, url, &format!("{repo}/manifests/{tag}")).await;
            if state.deleted {
                assert_eq!(status, 404, "{url}: deleted tag {repo}:{tag} is gone");
                return (repo.clone(), tag.clone(), None);
            }
            assert_eq!(status, 200, "{url}: tag {repo}:{tag} is there");
            let digest = digest.expect("Docker-Content-Digest");
            let allowed: Vec<&String> = state.acked.iter().chain(&state.unanswered).collect();
            assert!(
                state.acked.is_some() && allowed.contains(&&digest),
                "{url}: {repo}:{tag} is {digest}, expected one of {allowed:?}"
            );
            (repo.clone(), tag.clone(), Some(digest))
        })
        .buffer_unordered(VERIFY_PARALLEL)
        .collect()
        .await;
    let live: BTreeSet<(String, String)> = tags
        .iter()
        .filter_map(|(repo, _, d)| d.clone().map(|d| (repo.clone(), d)))
        .collect();
    found.live_tags = live.len();
    found.deleted_tags = tags.iter().filter(|(_, _, d)| d.is_none()).count();

    // tags/list of every repository holds exactly the live tags: none lost, none extra.
    let mut repos: BTreeSet<&str> = ledger.tags.keys().map(|(r, _)| r.as_str()).collect();
    let (status, body, _) = get(http, url, "_catalog?n=1000").await;
    assert_eq!(status, 200, "{url}: _catalog");
    let listed: serde_json::Value = serde_json::from_slice(&body).expect("catalog JSON");
    let listed: Vec<String> = listed["repositories"]
        .as_array()
        .expect("repositories")
        .iter()
        .map(|r| r.as_str().expect("name").to_owned())
        .collect();
    for r in &listed {
        repos.insert(r.as_str());
    }
    for repo in repos {
        let (status, body, _) = get(http, url, &format!("{repo}/tags/list")).await;
        let listed: BTreeSet<String> = if status == 404 {
            BTreeSet::new()
        } else {
            assert_eq!(status, 200, "{url}: {repo}/tags/list");
            let v: serde_json::Value = serde_json::from_slice(&body).expect("tags JSON");
            v["tags"]
                .as_array()
                .map(|ts| ts.iter().map(|t| t.as_str().expect("tag").to_owned()).collect())
                .unwrap_or_default()
        };
        let expected: BTreeSet<String> = tags
            .iter()
            .filter(|(r, _, d)| r == repo && d.is_some())
            .map(|(_, t, _)| t.clone())
            .collect();
        let listed: BTreeSet<String> = listed.into_iter().filter(|t| t != "index.spack").collect();
        assert_eq!(listed, expected, "{url}: the tags of {repo}");
    }

    // Manifests by digest: those a live tag names are there, those deleted by digest are
    // gone; the others may have been collected. Every one still there is checked with its blobs.
    let manifests: Vec<(&AckedManifest, bool)> = futures_util::stream::iter(&ledger.manifests)
        .map(|m| {
            let live = live.contains(&(m.repo.clone(), m.digest.clone()));
            let deleted = ledger.deleted_digests.contains(&(m.repo.clone(), m.digest.clone()));
            async move {
                let (status, body, _) = get(http, url, &format!("{}/manifests/{}", m.repo, m.digest)).await;
                match status {
                    200 => {
                        assert!(
                            !deleted,
                            "{url}: manifest {}@{} deleted by digest is served",
                            m.repo, m.digest
                        );
                        assert_eq!(sha256(&body), m.digest, "{url}: manifest {}@{} bytes", m.repo, m.digest);
                        assert_eq!(blobs_of(&body), m.blobs);
                        (m, true)
                    }
                    404 => {
                        assert!(
                            !live,
                            "{url}: manifest {}@{}, named by a live tag, is gone",
                            m.repo, m.digest
                        );
                        (m, false)
                    }
                    s => panic!("{url}: manifest {}@{}: {s}", m.repo, m.digest),
                }
            }
        })
        .buffer_unordered(VERIFY_PARALLEL)
        .collect()
        .await;
    let stored: Vec<&AckedManifest> = manifests.iter().filter(|(_, there)| *there).map(|(m, _)| *m).collect();
    // A manifest pushed twice counts once.
    let stored_digests: BTreeSet<(String, String)> =
        stored.iter().map(|m| (m.repo.clone(), m.digest.clone())).collect();
    found.manifests_read = stored_digests.len();
    found.unneeded_left = stored_digests.difference(&live).count();

    // Every blob a stored manifest references is there and hashes to its digest.
    let blobs: BTreeSet<(&str, &str)> = stored
        .iter()
        .flat_map(|m| m.blobs.iter().map(move |b| (m.repo.as_str(), b.as_str())))
        .collect();
    found.blobs_read = blobs.len();
    found.acked_blobs = ledger.blobs.len();
    found.acked_blobs_referenced = ledger
        .blobs
        .iter()
        .filter(|(repo, digest)| blobs.contains(&(repo.as_str(), digest.as_str())))
        .count();
    futures_util::stream::iter(blobs)
        .map(|(repo, digest)| async move {
            let (status, body, _) = get(http, url, &format!("{repo}/blobs/{digest}")).await;
            assert_eq!(
                status, 200,
                "{url}: blob {repo}@{digest}, referenced by a stored manifest, is there"
            );
            assert_eq!(
                sha256(&body),
                digest,
                "{url}: blob {repo}@{digest} hashes to its digest"
            );
        })
        .buffer_unordered(VERIFY_PARALLEL)
        .collect::<Vec<()>>()
        .await;

    // The Spack index lists exactly the spec tags present, and those are the spec tags pushed
    // and not deleted: 0 lost, 0 extra.
    let (status, body, _) = get(http, url, &format!("{SPACK_REPO}/tags/list")).await;
    assert_eq!(status, 200, "{url}: {SPACK_REPO}/tags/list");
    let v: serde_json::Value = serde_json::from_slice(&body).expect("tags JSON");
    let present: BTreeSet<String> = v["tags"]
        .as_array()
        .expect("tags")
        .iter()
        .filter_map(|t| t.as_str())
        .filter(|t| *t != "index.spack")
        .map(str::to_owned)
        .collect();
    let pushed: BTreeSet<String> = ledger
        .tags
        .iter()
        .filter(|((repo, _), state)| repo == SPACK_REPO && !state.deleted)
        .map(|((_, tag), _)| tag.clone())
        .collect();
    assert_eq!(
        present, pushed,
        "{url}: the spec tags present are those pushed and not deleted"
    );
    let (_, index) = served_index(server, SPACK_REPO).await;
    let indexed: BTreeSet<String> = in_buildcache(&index).into_iter().collect();
    let expected: BTreeSet<String> = present.iter().map(|t| hash_of_tag(t)).collect();
    let lost: Vec<&String> = expected.difference(&indexed).collect();
    let extra: Vec<&String> = indexed.difference(&expected).collect();
    assert!(
        lost.is_empty() && extra.is_empty(),
        "{url}: the Spack index lists exactly the {} spec tags present: {} lost {lost:?}, {} extra {extra:?}",
        expected.len(),
        lost.len(),
        extra.len()
    );
    found.spec_tags = present.len();
    found.index_installs = index["database"]["installs"].as_object().map_or(0, |i| i.len());
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_share_one_catalog_and_bucket_under_load() {
    let started = Instant::now();
    let seed: u64 = match std::env::var("REPLICAS_SEED") {
        Ok(s) => s.parse().expect("REPLICAS_SEED is a number"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    };
    eprintln!("replicas test seed {seed} (REPLICAS_SEED={seed} repeats the choices)");

    // S3 and PostgreSQL, whatever the environment says: replicas need both.
    let first = TestServer::start_on_backend_and_catalog(Backend::S3, Catalog::Postgres, GC_ENVS);
    let mut replicas = vec![first];
    for _ in 1..REPLICAS {
        let next = TestServer::start_sharing(&replicas[0], GC_ENVS);
        replicas.push(next);
    }
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");

    // One registry: what one replica stores, every other serves. The probe blob is referenced by
    // no manifest, so collection (zero grace) is paused while it is read.
    let paused = GcPaused::take(&replicas[0]);
    let probe = b"stored through replica 0";
    let probe_digest = common::push_blob(&replicas[0], "replicas/probe", probe).await;
    for r in &replicas[1..] {
        let resp = http
            .get(r.v2(&format!("replicas/probe/blobs/{probe_digest}")))
            .send()
            .await
            .expect("GET");
        assert_eq!(resp.status(), 200, "{}: a blob pushed through replica 0", r.url);
    }
    paused.release();
    eprintln!("{REPLICAS} replicas up in {:?}", started.elapsed());
    for (i, r) in replicas.iter().enumerate() {
        eprintln!("replica {i}: {}", r.url);
    }

    let ctx = Arc::new(Ctx {
        urls: replicas.iter().map(|r| r.url.clone()).collect(),
        http: http.clone(),
        ledger: Mutex::new(Ledger::default()),
        stats: Stats::default(),
        stop: AtomicBool::new(false),
        killed: AtomicBool::new(false),
        tearing_down: AtomicBool::new(false),
        next_spec: AtomicUsize::new(0),
        seed,
    });
    let _teardown = Teardown(ctx.clone());
    let fixture = Arc::new(FixtureRepo::load("http-noauth", "spack_buildcache"));
    let (doomed_tx, doomed_rx) = mpsc::unbounded_channel::<Doomed>();
    let doomed_rx = Arc::new(tokio::sync::Mutex::new(doomed_rx));
    let load_started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let tx = (role(id) != Role::Deletes).then(|| doomed_tx.clone());
            // The first Spack client pushes the fixture's specs first.
            let fixture = (id == 0).then(|| fixture.clone());
            tokio::spawn(run_client(ctx.clone(), id, tx, doomed_rx.clone(), fixture))
        })
        .collect();
    drop(doomed_tx);

    // Under way: manifests acknowledged, and collection passes running.
    let acked = || ctx.ledger.lock().expect("ledger").manifests.len() as u64;
    wait_until("the clients are under way", || async {
        assert!(
            clients.iter().all(|c| !c.is_finished()),
            "a client ended early (see its panic above)"
        );
        acked() >= WARM_UP_MANIFESTS
    })
    .await;
    let all: Vec<&TestServer> = replicas.iter().collect();
    wait_until("a collection pass ran", || async { gc_passes(&all, "ok").await >= 1 }).await;
    let passes_on_killed_before = gc_passes(&[&replicas[KILLED]], "ok").await;
    eprintln!(
        "warm-up: {} manifests after {:?}; kill scenario starts",
        acked(),
        load_started.elapsed()
    );
    let (location, resumed_digest, sent, resumed) = upload_resumed_after_kill(&ctx, &mut replicas).await;
    eprintln!(
        "upload {location} ({resumed_digest}): {sent} bytes sent to the killed replica, resumed at {resumed} on replica {}",
        (KILLED + 1) % REPLICAS
    );

    let rest = LOAD.saturating_sub(load_started.elapsed()).max(AFTER_KILL);
    tokio::time::sleep(rest).await;
    ctx.stop.store(true, Ordering::Relaxed);
    let mut ended_on = Vec::new();
    for c in clients {
        ended_on.push(c.await.expect("a client failed (see its panic above)"));
    }
    let load_time = load_started.elapsed();
    // Every pusher kept going after the kill, so each found out and moved on (a deleter with
    // nothing to delete after the kill may not have).
    assert!(
        ended_on.iter().all(|&(role, r)| role == Role::Deletes || r != KILLED),
        "every pusher moved off the killed replica: {ended_on:?}"
    );
    let stats = &ctx.stats;
    assert!(
        stats.killed_errors.load(Ordering::Relaxed) > 0,
        "the kill cut clients short (they then retried on another replica)"
    );

    // Let the collector run over the final state: two passes begun at least a second after the
    // last write (its cutoff is whole seconds).
    let live: Vec<&TestServer> = replicas
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != KILLED)
        .map(|(_, r)| r)
        .collect();
    let load_end = Instant::now();
    wait_until("a second passed since the last write", || async {
        load_end.elapsed() > Duration::from_millis(1100)
    })
    .await;
    let passes_then = gc_passes(&live, "ok").await;
    wait_until("two more collection passes ran", || async {
        gc_passes(&live, "ok").await >= passes_then + 2
    })
    .await;

    // Verify through every replica still up, with collection paused (so that a manifest seen is
    // not collected while its blobs are read).
    let verify_started = Instant::now();
    let paused = GcPaused::take(live[0]);
    let ledger = std::mem::take(&mut *ctx.ledger.lock().expect("ledger"));
    let mut results = Vec::new();
    for server in &live {
        results.push((server.url.clone(), verify(server, &http, &ledger).await));
    }
    paused.release();
    let verify_time = verify_started.elapsed();

    let ok_passes = gc_passes(&live, "ok").await + passes_on_killed_before;
    let failed_passes = gc_passes(&live, "failed").await;
    eprintln!(
        "load {load_time:?} with {CLIENTS} clients on {REPLICAS} replicas (replica {KILLED} killed mid-run); \
         verification {verify_time:?}; {:?} in all",
        started.elapsed()
    );
    eprintln!(
        "pushes: {} images, {} Spack specs ({} of them the fixture's), {} manifests in all; \
         blob uploads: {} monolithic, {} POST+PUT, {} chunked",
        ledger.image_pushes,
        ledger.spec_pushes,
        fixture.spec_tags().len(),
        ledger.manifests.len(),
        ledger.blob_acks[0],
        ledger.blob_acks[1],
        ledger.blob_acks[2]
    );
    eprintln!(
        "deletes: {} by tag, {} by digest; collection: {ok_passes} passes ({passes_on_killed_before} on the killed \
         replica before the kill), {failed_passes} failed",
        ledger.tag_deletes, ledger.digest_deletes
    );
    eprintln!(
        "retries: {} requests the killed replica did not answer, {} a live one did not, {} answered 503, \
         {} manifests pushed again after the collector took their blobs (at most {} attempts for one), \
         {} chunked uploads resumed on another replica; {} manifests read back through another replica, \
         {} index reads",
        stats.killed_errors.load(Ordering::Relaxed),
        stats.live_errors.load(Ordering::Relaxed),
        stats.unavailable.load(Ordering::Relaxed),
        stats.blob_unknown.load(Ordering::Relaxed),
        stats.most_push_attempts.load(Ordering::Relaxed),
        stats.sessions_resumed.load(Ordering::Relaxed),
        stats.cross_reads.load(Ordering::Relaxed),
        stats.index_reads.load(Ordering::Relaxed)
    );
    for (url, v) in &results {
        eprintln!("verified through {url}: {v:?}");
    }
    assert_eq!(failed_passes, 0, "no collection pass failed on a live replica");
}

//! Uploads under storage faults (issue 9): a failed write, sync, completion or publish at every
//! stage of a monolithic, a POST + PUT, a chunked and a streamed upload never yields a 201 for
//! wrong bytes, ends the session, leaves no served blob that does not hash to its digest, and
//! once the fault clears the same blob pushes correctly to the same and another repository.
//! Plus the issue's own reproduction, and a real full disk (a small tmpfs). And one Spack case
//! (issue 16): a merged `index.spack` whose upload fails answers, instead of hanging.
//!
//! The faults are injected through the test-only `/_stowage/faults` route of a binary built with
//! `--features fault-injection` (`scripts/test` does). **Without it these tests fail**, loudly:
//! a binary that cannot inject the faults cannot show that the registry survives them.
//! The tmpfs test needs no injection but needs root to mount (CI runs as root); it fails, never
//! skips, when it cannot mount.
mod common;

use std::path::{Path, PathBuf};

use common::oci::header;
use common::{Backend, S3_PART_SIZE, TestServer, client, sha256};
use serde_json::{Value, json};

/// Part size on local disk: the smallest allowed, so that small blobs span several parts.
const FS_PART_SIZE: usize = 64 * 1024;

/// A fault a scenario injects.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// A part write of the upload fails.
    Write(Part),
    /// The `n`th checkpoint sync (end of a PATCH) fails.
    Sync(u64),
    /// Completing the staged object (final fsync / multipart completion) fails.
    Complete,
    /// The copy that publishes the blob fails.
    Publish,
}

/// Which part write fails.
#[derive(Debug, Clone, Copy)]
enum Part {
    First,
    /// The one halfway through the upload's part writes.
    Middle,
    Last,
}

/// How a client uploads a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `POST ?digest=` with the whole body.
    Monolithic,
    /// `POST`, then `PUT ?digest=` with the whole body.
    PostPut,
    /// `POST`, `PATCH`es with `Content-Range` of 1.5 parts each, then an empty `PUT`.
    Chunked,
    /// `POST`, one `PATCH` without `Content-Range` (streamed), then an empty `PUT`.
    Streamed,
}

/// Deterministic pseudo-random bytes (distinct blobs for distinct seeds).
fn blob(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A response: status, OCI error code (if it has an error body), and the session headers.
struct Answer {
    status: u16,
    code: Option<String>,
    body: String,
    location: Option<String>,
    range: Option<String>,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.body)
    }
}

impl Answer {
    /// The end offset (exclusive) its `Range` header reports.
    fn range_end(&self) -> u64 {
        self.range
            .as_deref()
            .and_then(|r| r.split_once('-'))
            .and_then(|(_, end)| end.parse::<u64>().ok())
            .map_or(0, |e| e + 1)
    }
}

/// Sends `req`. A request the server cut off while the client still sent the body (it may
/// answer an error before reading everything) is an answer with status 0.
async fn send(req: reqwest::RequestBuilder) -> Answer {
    match req.send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let location = header(&resp, "location");
            let range = header(&resp, "range");
            let body = resp.text().await.unwrap_or_default();
            let code = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_owned));
            Answer {
                status,
                code,
                body,
                location,
                range,
            }
        }
        Err(e) => Answer {
            status: 0,
            code: None,
            body: format!("request failed: {e}"),
            location: None,
            range: None,
        },
    }
}

/// One server and what the scenarios need to know about it.
struct Env {
    server: TestServer,
    part: usize,
}

impl Env {
    fn start() -> Self {
        Self::start_with_part(FS_PART_SIZE)
    }

    /// A server whose uploads are written in `fs_part` parts on local disk (S3: 5 MiB).
    fn start_with_part(fs_part: usize) -> Self {
        let backend = common::backend();
        let part = match backend {
            Backend::Fs => fs_part,
            Backend::S3 => S3_PART_SIZE,
        };
        let part_env = part.to_string();
        let server = TestServer::start_with(&[("STOWAGE_STORAGE__PART_SIZE", &part_env)]);
        Env { server, part }
    }

    fn url(&self, path: &str) -> String {
        let path = path.trim_start_matches('/');
        format!("{}/{path}", self.server.url)
    }

    /// Replaces the fault rules. Fails the test when the binary has no fault route.
    async fn set_faults(&self, rules: Value) {
        let resp = client()
            .put(self.url("/_stowage/faults"))
            .json(&json!({ "rules": rules }))
            .send()
            .await
            .expect("PUT /_stowage/faults");
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        assert!(
            status != 404 && status != 405,
            "the stowage binary has no fault-injection route ({status} on PUT /_stowage/faults): \
             these tests need a binary built with `--features fault-injection` \
             (run `cargo test --features fault-injection --test faults`, as scripts/test does)"
        );
        assert_eq!(status, 200, "setting fault rules: {body}");
    }

    async fn clear_faults(&self) {
        let resp = client()
            .delete(self.url("/_stowage/faults"))
            .send()
            .await
            .expect("DELETE /_stowage/faults");
        assert_eq!(resp.status(), 204, "clearing fault rules");
    }

    /// The rules and their counters.
    async fn fault_state(&self) -> Vec<Value> {
        let v: Value = client()
            .get(self.url("/_stowage/faults"))
            .send()
            .await
            .expect("GET /_stowage/faults")
            .json()
            .await
            .expect("fault state JSON");
        v["rules"].as_array().cloned().unwrap_or_default()
    }

    /// How many part writes an upload of `len` bytes in `mode` makes, measured with a rule that
    /// never fires.
    async fn writes_per_upload(&self, mode: Mode, len: usize) -> u64 {
        self.set_faults(json!([{ "op": "staging.write", "after": 1u64 << 40 }]))
            .await;
        let data = blob(len, 0xCA11B);
        let outcome = upload(self, "calibrate", mode, &data).await;
        assert!(outcome.created(), "calibration upload in {mode:?}: {outcome:?}");
        let seen = self.fault_state().await[0]["seen"].as_u64().unwrap_or(0);
        self.clear_faults().await;
        seen
    }

    fn blob_url(&self, repo: &str, digest: &str) -> String {
        self.server.v2(&format!("{repo}/blobs/{digest}"))
    }

    /// Whether `repo` serves `digest`; a served blob must hash to its digest.
    async fn served(&self, repo: &str, digest: &str) -> bool {
        let resp = client()
            .get(self.blob_url(repo, digest))
            .send()
            .await
            .expect("GET blob");
        match resp.status().as_u16() {
            200 => {
                let body = resp.bytes().await.unwrap_or_else(|e| {
                    panic!("{repo} serves {digest} but its body breaks off (shorter than announced): {e}")
                });
                assert_eq!(
                    sha256(&body),
                    digest,
                    "{repo} serves {} bytes for {digest} that do not hash to it",
                    body.len()
                );
                true
            }
            404 => false,
            other => panic!("GET {repo}@{digest}: unexpected {other}"),
        }
    }

    async fn head_status(&self, repo: &str, digest: &str) -> u16 {
        client()
            .head(self.blob_url(repo, digest))
            .send()
            .await
            .expect("HEAD blob")
            .status()
            .as_u16()
    }
}

/// How an upload ended.
#[derive(Debug)]
struct Outcome {
    /// The session URL, for uploads that opened one.
    session: Option<String>,
    /// Every answer, in order; the upload stops at the first one that is not a success.
    answers: Vec<(String, Answer)>,
}

impl Outcome {
    fn last(&self) -> &Answer {
        &self.answers.last().expect("at least one request").1
    }

    fn created(&self) -> bool {
        self.last().status == 201
    }
}

/// Uploads `data` to `repo` the way `mode` says, stopping at the first failed request.
async fn upload(env: &Env, repo: &str, mode: Mode, data: &[u8]) -> Outcome {
    let digest = sha256(data);
    let uploads = env.server.v2(&format!("{repo}/blobs/uploads/"));
    let mut out = Outcome {
        session: None,
        answers: Vec::new(),
    };
    let octets = |req: reqwest::RequestBuilder| req.header("Content-Type", "application/octet-stream");
    if mode == Mode::Monolithic {
        let a = send(octets(client().post(format!("{uploads}?digest={digest}"))).body(data.to_vec())).await;
        out.answers.push(("POST ?digest=".into(), a));
        return out;
    }
    let a = send(client().post(&uploads).header("Content-Length", "0")).await;
    assert_eq!(a.status, 202, "POST opens a session: {a:?}");
    let session = format!("{}{}", env.server.url, a.location.as_deref().unwrap_or_default());
    out.session = Some(session.clone());
    out.answers.push(("POST".into(), a));
    let put = format!("{session}?digest={digest}");
    match mode {
        Mode::Monolithic => unreachable!(),
        Mode::PostPut => {
            let a = send(octets(client().put(&put)).body(data.to_vec())).await;
            out.answers.push(("PUT with body".into(), a));
            return out;
        }
        Mode::Chunked => {
            let chunk = env.part + env.part / 2;
            let mut start = 0;
            for piece in data.chunks(chunk) {
                let end = start + piece.len() - 1;
                let a = send(
                    octets(client().patch(&session))
                        .header("Content-Range", format!("{start}-{end}"))
                        .body(piece.to_vec()),
                )
                .await;
                let ok = a.status == 202;
                out.answers.push((format!("PATCH {start}-{end}"), a));
                if !ok {
                    return out;
                }
                start = end + 1;
            }
        }
        Mode::Streamed => {
            let a = send(octets(client().patch(&session)).body(data.to_vec())).await;
            let ok = a.status == 202;
            out.answers.push(("PATCH (streamed)".into(), a));
            if !ok {
                return out;
            }
        }
    }
    let a = send(client().put(&put).header("Content-Length", "0")).await;
    out.answers.push(("PUT".into(), a));
    out
}

/// The fault rule for `fault` with `error`, for an upload making `writes` part writes.
fn rule(fault: Fault, error: &str, writes: u64) -> Value {
    match fault {
        Fault::Write(part) => {
            let n = match part {
                Part::First => 0,
                Part::Middle => writes / 2,
                Part::Last => writes - 1,
            };
            json!({ "op": "staging.write", "after": n, "times": 1, "error": error })
        }
        Fault::Sync(n) => json!({ "op": "staging.sync", "after": n, "times": 1, "error": error }),
        Fault::Complete => json!({ "op": "staging.complete", "times": 1, "error": error }),
        Fault::Publish => json!({ "op": "store.copy", "path": "blobs/", "times": 1, "error": error }),
    }
}

/// The answer a request whose storage failed with `error` must get.
fn assert_failure_answer(a: &Answer, error: &str, context: &str) {
    match error {
        "enospc" => {
            assert_eq!(a.status, 507, "{context}: a full disk answers 507: {a:?}");
            assert_eq!(a.code.as_deref(), Some("UNAVAILABLE"), "{context}: {a:?}");
            assert!(a.body.contains("storage is full"), "{context}: message: {a:?}");
        }
        _ => {
            assert_eq!(a.status, 500, "{context}: a storage error answers 500: {a:?}");
            assert_eq!(
                a.code.as_deref(),
                Some("BLOB_UPLOAD_INVALID"),
                "{context}: the upload is ended: {a:?}"
            );
        }
    }
}

/// After a fault ended a session: every later request on it is 404 `BLOB_UPLOAD_UNKNOWN`, and
/// a client that carries on never gets a 201 for wrong bytes.
async fn assert_session_ended(env: &Env, session: &str, repo: &str, data: &[u8], context: &str) {
    let digest = sha256(data);
    let status = send(client().get(session)).await;
    // A client resumes from the offset the status reports, as the issue's client did; an
    // unknown session is probed with a small chunk.
    let (offset, rest) = if status.status == 204 {
        let offset = (status.range_end() as usize).min(data.len());
        (offset, &data[offset..])
    } else {
        (0, &data[..data.len().min(1024)])
    };
    let patch = send(
        client()
            .patch(session)
            .header("Content-Type", "application/octet-stream")
            .header(
                "Content-Range",
                format!("{offset}-{}", (offset + rest.len()).saturating_sub(1)),
            )
            .body(rest.to_vec()),
    )
    .await;
    let put = send(
        client()
            .put(format!("{session}?digest={digest}"))
            .header("Content-Length", "0"),
    )
    .await;
    // Integrity first: a 201 must be for the right bytes.
    if put.status == 201 {
        assert!(
            env.served(repo, &digest).await,
            "{context}: PUT after the fault answered 201 but the blob is not served"
        );
    }
    for (what, a) in [("status GET", &status), ("PATCH", &patch), ("PUT", &put)] {
        assert_eq!(
            (a.status, a.code.as_deref()),
            (404, Some("BLOB_UPLOAD_UNKNOWN")),
            "{context}: {what} on the ended session: {a:?}"
        );
    }
}

/// Runs every fault of `faults` against uploads in `mode`, each on a blob of its own.
async fn run_faults(mode: Mode, faults: &[(&str, Fault, &str)]) {
    let env = Env::start();
    // Two parts and a tail: at least three part writes (first, middle, last) in every mode.
    let len = env.part * 2 + FS_PART_SIZE / 2;
    let writes = env.writes_per_upload(mode, len).await;
    assert!(
        writes >= 3,
        "{mode:?}: a blob of 2 parts and a tail takes at least 3 part writes, saw {writes}"
    );
    for (i, (stage, fault, error)) in faults.iter().enumerate() {
        let context = format!("{mode:?}, {stage} fails ({error})");
        let repo = format!("faults/{i}");
        let data = blob(len, 1000 + i as u64);
        let digest = sha256(&data);
        env.set_faults(json!([rule(*fault, error, writes)])).await;

        let outcome = upload(&env, &repo, mode, &data).await;
        let fired = env.fault_state().await[0]["fired"].as_u64().unwrap_or(0);
        assert_eq!(fired, 1, "{context}: the fault was injected once ({outcome:?})");
        // Never a 201 for bytes that were not all stored.
        if outcome.created() {
            assert!(env.served(&repo, &digest).await, "{context}: 201 but not served");
        }
        assert_failure_answer(
            outcome.last(),
            error,
            &format!("{context}: {}", outcome.answers.last().unwrap().0),
        );
        env.clear_faults().await;
        if let Some(session) = &outcome.session {
            assert_session_ended(&env, session, &repo, &data, &context).await;
        }
        assert!(
            !env.served(&repo, &digest).await,
            "{context}: a blob whose upload failed is served"
        );
        assert_eq!(
            env.head_status(&repo, &digest).await,
            404,
            "{context}: HEAD of the failed blob"
        );
        assert!(
            !env.server.has_staged_uploads(),
            "{context}: the ended upload's staged data is deleted"
        );

        // The fault cleared: the same blob pushes correctly, here and in another repository.
        let again = upload(&env, &repo, mode, &data).await;
        assert!(again.created(), "{context}: pushing again after the fault: {again:?}");
        assert!(env.served(&repo, &digest).await, "{context}: served after the push");
        let other = format!("{repo}-other");
        let elsewhere = upload(&env, &other, Mode::Monolithic, &data).await;
        assert!(elsewhere.created(), "{context}: pushing to {other}: {elsewhere:?}");
        assert!(env.served(&other, &digest).await, "{context}: served from {other}");
    }
}

#[tokio::test]
async fn a_failed_monolithic_upload_publishes_nothing_and_the_blob_pushes_again() {
    run_faults(
        Mode::Monolithic,
        &[
            ("the first part write", Fault::Write(Part::First), "io"),
            ("a middle part write", Fault::Write(Part::Middle), "enospc"),
            ("the last part write", Fault::Write(Part::Last), "io"),
            ("the completion", Fault::Complete, "enospc"),
            ("the publish copy", Fault::Publish, "io"),
        ],
    )
    .await;
}

#[tokio::test]
async fn a_failed_post_and_put_upload_ends_its_session() {
    run_faults(
        Mode::PostPut,
        &[
            ("the first part write", Fault::Write(Part::First), "enospc"),
            ("a middle part write", Fault::Write(Part::Middle), "io"),
            ("the last part write", Fault::Write(Part::Last), "enospc"),
            ("the completion", Fault::Complete, "io"),
            ("the publish copy", Fault::Publish, "enospc"),
        ],
    )
    .await;
}

#[tokio::test]
async fn a_failed_chunked_upload_ends_its_session() {
    run_faults(
        Mode::Chunked,
        &[
            ("the first part write", Fault::Write(Part::First), "io"),
            ("a middle part write", Fault::Write(Part::Middle), "enospc"),
            ("the last part write", Fault::Write(Part::Last), "io"),
            ("the sync at the end of the first PATCH", Fault::Sync(0), "enospc"),
            ("the sync at the end of the second PATCH", Fault::Sync(1), "io"),
            ("the completion", Fault::Complete, "enospc"),
            ("the publish copy", Fault::Publish, "io"),
        ],
    )
    .await;
}

#[tokio::test]
async fn a_failed_streamed_patch_ends_its_session() {
    run_faults(
        Mode::Streamed,
        &[
            ("the first part write", Fault::Write(Part::First), "enospc"),
            ("a middle part write", Fault::Write(Part::Middle), "io"),
            ("the last part write", Fault::Write(Part::Last), "enospc"),
            ("the sync at the end of the PATCH", Fault::Sync(0), "io"),
            ("the completion", Fault::Complete, "enospc"),
            ("the publish copy", Fault::Publish, "io"),
        ],
    )
    .await;
}

/// Issue 9, item 1, as reported: part size 1 MiB, a 10 MiB blob, the PATCH of the first 3 MiB
/// fails for lack of space, the client asks the status, sends the rest and PUTs. That must never
/// be a 201 with a corrupt blob, and the blob pushes correctly (to another repository too)
/// once space is back. On S3 (5 MiB parts) the first PATCH carries 6 MiB so that it writes a part.
#[tokio::test]
async fn issue_9_reproduction_a_failed_patch_never_publishes_a_corrupt_blob() {
    let env = Env::start_with_part(1024 * 1024);
    let data = blob(10 * 1024 * 1024, 9);
    let digest = sha256(&data);
    let (first, fault) = match env.server.backend {
        // The second 1 MiB part of the first PATCH fails: "one MiB block differs".
        Backend::Fs => (3 * 1024 * 1024, 1),
        Backend::S3 => (6 * 1024 * 1024, 0),
    };
    let a = send(
        client()
            .post(env.server.v2("issue9/blobs/uploads/"))
            .header("Content-Length", "0"),
    )
    .await;
    assert_eq!(a.status, 202, "{a:?}");
    let session = format!("{}{}", env.server.url, a.location.as_deref().unwrap_or_default());
    env.set_faults(json!([{ "op": "staging.write", "after": fault, "times": 1, "error": "enospc" }]))
        .await;
    let patch = send(
        client()
            .patch(&session)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", format!("0-{}", first - 1))
            .body(data[..first].to_vec()),
    )
    .await;
    assert_eq!(env.fault_state().await[0]["fired"], 1, "the fault was injected");
    env.clear_faults().await;
    // The client asks the status, sends the rest from there and PUTs; integrity checked first.
    assert_session_ended(&env, &session, "issue9", &data, "issue 9 reproduction").await;
    assert_failure_answer(&patch, "enospc", "the PATCH whose part write failed");
    assert!(!env.served("issue9", &digest).await, "the failed blob is not served");

    for repo in ["issue9", "issue9-other"] {
        let again = upload(&env, repo, Mode::Chunked, &data).await;
        assert!(again.created(), "pushing to {repo} once space is back: {again:?}");
        assert!(env.served(repo, &digest).await, "{repo} serves the blob");
    }
}

/// A blob stored before is neither replaced nor hidden by a failed push of the same bytes, and a
/// failed read is an error, never wrong bytes.
#[tokio::test]
async fn a_failed_push_or_read_leaves_a_stored_blob_intact() {
    let env = Env::start();
    let data = blob(env.part * 5 / 2, 77);
    let digest = sha256(&data);
    assert!(upload(&env, "kept/a", Mode::Monolithic, &data).await.created());

    for (op, n) in [("staging.write", 1), ("staging.complete", 0)] {
        env.set_faults(json!([{ "op": op, "after": n, "times": 1 }])).await;
        let failed = upload(&env, "kept/b", Mode::PostPut, &data).await;
        assert_eq!(env.fault_state().await[0]["fired"], 1, "{op}: fault injected");
        env.clear_faults().await;
        assert_failure_answer(failed.last(), "io", op);
        assert!(
            env.served("kept/a", &digest).await,
            "{op}: the stored blob is still served"
        );
        assert_eq!(
            env.head_status("kept/a", &digest).await,
            200,
            "{op}: HEAD of the stored blob"
        );
        assert!(
            !env.served("kept/b", &digest).await,
            "{op}: not linked into the failed repository"
        );
    }

    env.set_faults(json!([{ "op": "store.get", "path": "blobs/", "times": 1 }]))
        .await;
    let resp = client().get(env.blob_url("kept/a", &digest)).send().await.expect("GET");
    assert_eq!(resp.status(), 500, "a failed read is an error");
    assert_eq!(env.fault_state().await[0]["fired"], 1, "store.get fault injected");
    env.clear_faults().await;
    assert!(env.served("kept/a", &digest).await, "served again once the read works");
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(bytes: usize) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("blobs");
        std::fs::create_dir(&path).expect("mount point");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(&path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "the disk-full test mounts a {bytes}-byte tmpfs and needs root for it (CI runs as \
             root); `mount -t tmpfs` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { path, _dir: dir }
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = std::process::Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Still busy (a server that did not exit yet): detach it so nothing is left mounted.
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// A real full disk: the blob store on a 6 MiB tmpfs (the catalog elsewhere), pushes until the
/// disk fills. The failing upload gets 507 `UNAVAILABLE`, nothing corrupt is served, and once a
/// file is deleted to free space the same blob pushes correctly. Always on local disk.
#[tokio::test]
async fn a_full_disk_answers_507_and_the_blob_pushes_once_space_is_freed() {
    const MIB: usize = 1024 * 1024;
    let tmpfs = Tmpfs::mount(6 * MIB);
    // Ballast to delete later, so that freeing space does not touch the registry's files.
    let ballast = tmpfs.path().join("ballast");
    std::fs::write(&ballast, vec![0u8; 2 * MIB]).expect("write ballast");
    let root = tmpfs.path().join("store");
    let root_env = root.display().to_string();
    let part = FS_PART_SIZE.to_string();
    let server = TestServer::start_on(
        Backend::Fs,
        &[
            ("STOWAGE_STORAGE__PATH", root_env.as_str()),
            ("STOWAGE_STORAGE__PART_SIZE", part.as_str()),
        ],
    );
    let env = Env {
        server,
        part: FS_PART_SIZE,
    };

    let mut stored = Vec::new();
    let mut failed = None;
    // 4 MiB free: the fifth 1 MiB blob at the latest cannot fit.
    for i in 0..8u64 {
        let data = blob(MIB, 500 + i);
        let outcome = upload(&env, "full", Mode::Streamed, &data).await;
        if outcome.created() {
            stored.push(data);
            continue;
        }
        failed = Some((data, outcome));
        break;
    }
    let Some((data, outcome)) = failed else {
        panic!("8 MiB of blobs fitted on a 6 MiB tmpfs holding 2 MiB of ballast");
    };
    assert!(!stored.is_empty(), "some blobs fit before the disk filled");
    let digest = sha256(&data);
    assert_failure_answer(
        outcome.last(),
        "enospc",
        &format!(
            "the upload that filled the disk ({})",
            outcome.answers.last().unwrap().0
        ),
    );
    if let Some(session) = &outcome.session {
        assert_session_ended(&env, session, "full", &data, "disk full").await;
    }
    assert!(
        !env.served("full", &digest).await,
        "the blob that did not fit is not served"
    );
    for d in &stored {
        assert!(
            env.served("full", &sha256(d)).await,
            "a blob stored before the disk filled"
        );
    }
    let leftovers = std::fs::read_dir(root.join("uploads")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(leftovers, 0, "the failed upload's staging file is deleted");

    std::fs::remove_file(&ballast).expect("free space");
    for repo in ["full", "full-other"] {
        let again = upload(&env, repo, Mode::Streamed, &data).await;
        assert!(again.created(), "pushing to {repo} once space is free: {again:?}");
        assert!(env.served(repo, &digest).await, "{repo} serves the blob");
    }
    drop(env);
    drop(tmpfs);
}

/// A merged Spack index (`[[spack.merge]]`, `registry::proxy::spack`) whose upload fails
/// part-way answers an error instead of hanging: the merge task sees its consumer gone. Before,
/// the failed writer kept the channel's receiver alive, and the merge task blocked for ever in
/// a full channel (16 pieces of 1 MiB) holding the repository's build lock. Once the fault
/// clears, the same index builds.
#[tokio::test]
async fn a_merged_spack_index_whose_upload_fails_answers_and_builds_once_the_fault_clears() {
    const FAKE_SPECS: usize = 150_000;
    let upstream = TestServer::start();
    // A fallback index of ~45 MB (far more than the 16 MiB the channel holds), pushed as an
    // ordinary tag of a repository without specs.
    let mut installs = serde_json::Map::new();
    for i in 0..FAKE_SPECS {
        let hash = format!("{i:032}");
        installs.insert(
            hash.clone(),
            json!({"spec": {"name": "fake", "version": "1", "hash": hash, "padding": "x".repeat(200)},
                   "ref_count": 0, "in_buildcache": true}),
        );
    }
    let index = json!({"database": {"version": "8", "installs": installs}})
        .to_string()
        .into_bytes();
    drop(installs);
    let layer = common::push_blob(&upstream, "big/cache", &index).await;
    let config = common::push_blob(&upstream, "big/cache", b"{}").await;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": index.len()}]
    });
    let resp = client()
        .put(upstream.v2("big/cache/manifests/index.spack"))
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.to_string())
        .send()
        .await
        .expect("PUT index");
    assert_eq!(resp.status(), 201);

    let dir = tempfile::tempdir().expect("temp dir");
    let config_file = dir.path().join("mirror.toml");
    std::fs::write(
        &config_file,
        format!(
            "[[proxy]]\nprefix = \"up/\"\nurl = \"{}\"\ntag_ttl = \"10m\"\ntimeout_secs = 30\n\n\
             [[spack.merge]]\nrepository = \"spack/buildcache\"\nfallbacks = [\"up/big/cache\"]\n",
            upstream.url
        ),
    )
    .expect("write mirror config");
    let part = match common::backend() {
        Backend::Fs => FS_PART_SIZE,
        Backend::S3 => S3_PART_SIZE,
    }
    .to_string();
    let mirror = TestServer::start_with(&[
        ("STOWAGE_CONFIG", config_file.to_str().expect("utf-8")),
        ("STOWAGE_STORAGE__PART_SIZE", part.as_str()),
    ]);
    let env = Env {
        server: mirror,
        part: 0,
    };
    // The fallback's index cached in the mirror (its blob fetched with it), then the site's own
    // specs pushed into the hosted repository by a real Spack push (capture 01).
    let resp = client()
        .get(env.server.v2("up/big/cache/manifests/index.spack"))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .expect("GET fallback index");
    assert_eq!(resp.status(), 200, "the fallback's index");
    common::replay::Replayer::new(&env.server).replay("01").await;

    // Every part write of the merged index's upload fails after the first.
    env.set_faults(json!([{ "op": "staging.write", "after": 1 }])).await;
    let patient = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .expect("client");
    let resp = patient
        .get(env.server.v2("spack/buildcache/manifests/index.spack"))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .expect("the index read answers (it hung before the fix)");
    assert!(
        resp.status().is_server_error(),
        "a failed build is an error: {}",
        resp.status()
    );
    let fired: u64 = env.fault_state().await.iter().filter_map(|r| r["fired"].as_u64()).sum();
    assert!(fired >= 1, "the fault happened");

    // The fault cleared: the build lock was released, the index builds and lists both sides.
    env.clear_faults().await;
    let (_, merged) = common::spack::served_index(&env.server, "spack/buildcache").await;
    let listed = common::spack::in_buildcache(&merged);
    assert_eq!(
        listed.len(),
        FAKE_SPECS + 4,
        "the fallback's specs and the four pushed (libb and its dependencies)"
    );
    assert!(
        listed.contains(&"zgl5yzcqzdnkd7scv2tq3qoi5fyw7vh3".to_owned()),
        "libb, pushed"
    );
}

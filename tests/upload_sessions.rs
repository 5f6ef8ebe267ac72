//! Upload sessions under concurrency and abuse, against the real binary on the selected backend:
//!
//! - requests fired at a session while its closing PUT commits (status GETs, retried PUTs,
//!   PATCHes) never produce a 201 for bytes that do not hash to the digest, never two 201s for
//!   one session, and leave the session gone afterwards;
//! - only the user who opened a session may use it;
//! - the number of sessions is bounded, in total and per user: the refused ones get 429 with
//!   `Retry-After` (never a 500), other users keep uploading, and the registry keeps answering
//!   under a 1,024 descriptor limit.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::oci::assert_error;
use common::{TestServer, client, sha256};

/// Trials per race test: stopped early after `RACE_BUDGET`, but at least `MIN_TRIALS` must run.
const MAX_TRIALS: usize = 400;
const MIN_TRIALS: usize = 100;
const RACE_BUDGET: Duration = Duration::from_secs(40);

/// Bytes that differ from trial to trial (so no trial is satisfied by deduplication).
fn blob(trial: usize, len: usize) -> Vec<u8> {
    common::rng::seeded_bytes(trial as u64, len)
}

async fn open_session(http: &reqwest::Client, server: &TestServer, repo: &str) -> String {
    let resp = http
        .post(server.v2(&format!("{repo}/blobs/uploads/")))
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 202, "open a session");
    let location = resp.headers()["location"].to_str().expect("location").to_owned();
    format!("{}{}", server.url, location)
}

fn with_query(location: &str, query: &str) -> String {
    let sep = if location.contains('?') { '&' } else { '?' };
    format!("{location}{sep}{query}")
}

/// Fetches a blob and checks it is exactly `data`'s bytes.
async fn assert_blob_is(http: &reqwest::Client, server: &TestServer, repo: &str, digest: &str, len: usize) {
    let resp = http
        .get(server.v2(&format!("{repo}/blobs/{digest}")))
        .send()
        .await
        .expect("GET blob");
    assert_eq!(resp.status(), 200, "GET {digest}");
    let body = resp.bytes().await.expect("blob body");
    assert_eq!(body.len(), len, "served length of {digest}");
    assert_eq!(sha256(&body), digest, "served bytes of {digest} do not hash to it");
}

#[derive(Clone, Copy, Debug)]
enum Close {
    /// The whole blob in the closing PUT.
    PutWithBody,
    /// The whole blob in one PATCH, then an empty closing PUT.
    PatchThenPut,
}

/// Statuses a racing request may get, by kind; anything else (a 500 above all) fails the test.
async fn check_racer(kind: &str, resp: reqwest::Response) -> u16 {
    let status = resp.status().as_u16();
    let ok: &[u16] = match kind {
        "status" => &[204, 404],
        "put" => &[201, 400, 404, 416],
        "patch" => &[202, 400, 404, 416],
        _ => &[],
    };
    assert!(
        ok.contains(&status),
        "racing {kind} got {status}: {}",
        resp.text().await.unwrap_or_default()
    );
    status
}

async fn race_closing_put(close: Close) {
    let server = TestServer::start();
    let http = client();
    let repo = "race/blob";
    let len = 4 * 1024 * 1024;
    let started = Instant::now();
    let mut trials = 0;
    let mut committed = 0;
    while trials < MAX_TRIALS && (started.elapsed() < RACE_BUDGET || trials < MIN_TRIALS) {
        let data = blob(trials, len);
        let digest = sha256(&data);
        let location = open_session(&http, &server, repo).await;
        let put_body = match close {
            Close::PutWithBody => data.clone(),
            Close::PatchThenPut => {
                let resp = http
                    .patch(&location)
                    .header("Content-Type", "application/octet-stream")
                    .body(data.clone())
                    .send()
                    .await
                    .expect("PATCH");
                assert_eq!(resp.status(), 202, "PATCH the blob");
                Vec::new()
            }
        };
        let done = Arc::new(AtomicBool::new(false));
        let mut racers = Vec::new();
        for kind in ["status", "put", "patch"] {
            let (http, location, done, digest) = (http.clone(), location.clone(), done.clone(), digest.clone());
            racers.push(tokio::spawn(async move {
                let mut created = 0;
                // A PATCH or PUT that wins the session before the closing PUT ends it (a
                // digest mismatch, which is fine but races nothing); let the PUT start first.
                if kind != "status" {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                loop {
                    let finished = done.load(Ordering::Acquire);
                    let resp = match kind {
                        "status" => http.get(&location).send().await,
                        "put" => {
                            http.put(with_query(&location, &format!("digest={digest}")))
                                .send()
                                .await
                        }
                        _ => {
                            http.patch(&location)
                                .header("Content-Type", "application/octet-stream")
                                .body(vec![7u8])
                                .send()
                                .await
                        }
                    };
                    let resp = resp.expect("racing request");
                    if check_racer(kind, resp).await == 201 {
                        created += 1;
                    }
                    if finished {
                        return created;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }));
        }
        let resp = http
            .put(with_query(&location, &format!("digest={digest}")))
            .header("Content-Type", "application/octet-stream")
            .body(put_body)
            .send()
            .await
            .expect("closing PUT");
        let status = resp.status().as_u16();
        assert!(
            [201, 400, 404].contains(&status),
            "closing PUT got {status}: {}",
            resp.text().await.unwrap_or_default()
        );
        done.store(true, Ordering::Release);
        let mut created = usize::from(status == 201);
        for r in racers {
            created += r.await.expect("racer");
        }
        assert!(
            created <= 1,
            "trial {trials}: {created} PUTs answered 201 for one session"
        );
        if created == 1 {
            committed += 1;
            assert_blob_is(&http, &server, repo, &digest, len).await;
        }
        // The session is gone for good, whoever committed it.
        let resp = http.get(&location).send().await.expect("status after commit");
        if created == 1 {
            assert_error(resp, 404, &["BLOB_UPLOAD_UNKNOWN"]).await;
        }
        trials += 1;
    }
    assert!(trials >= MIN_TRIALS, "only {trials} trials ran");
    // Most trials must actually commit, or the race was never exercised.
    assert!(committed * 2 >= trials, "only {committed} of {trials} trials committed");
    eprintln!("{close:?}: {trials} trials, {committed} committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_racing_a_closing_put_with_body_never_publish_wrong_bytes() {
    race_closing_put(Close::PutWithBody).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_racing_a_closing_put_after_patches_never_publish_wrong_bytes() {
    race_closing_put(Close::PatchThenPut).await;
}

/// After a request on a session that is then cancelled, nothing on it works any more.
#[tokio::test]
async fn a_cancelled_or_committed_session_is_gone() {
    let server = TestServer::start();
    let http = client();
    let data = blob(1, 1000);
    let digest = sha256(&data);
    let location = open_session(&http, &server, "gone/blob").await;
    let resp = http
        .put(with_query(&location, &format!("digest={digest}")))
        .body(data.clone())
        .send()
        .await
        .expect("PUT");
    assert_eq!(resp.status(), 201);
    for resp in [
        http.get(&location).send().await,
        http.patch(&location).body(vec![1u8]).send().await,
        http.put(with_query(&location, &format!("digest={digest}")))
            .send()
            .await,
        http.delete(&location).send().await,
    ] {
        assert_error(resp.expect("request"), 404, &["BLOB_UPLOAD_UNKNOWN"]).await;
    }
    let location = open_session(&http, &server, "gone/blob").await;
    assert_eq!(http.delete(&location).send().await.expect("DELETE").status(), 204);
    assert_error(
        http.get(&location).send().await.expect("GET"),
        404,
        &["BLOB_UPLOAD_UNKNOWN"],
    )
    .await;
}

// --- Authentication: owners and limits ---------------------------------------------------------

/// Runs `stowage <args>` on the server's data directory with `stdin`.
fn stowage(server: &TestServer, args: &[&str], stdin: &str) {
    common::run_cli(server.data_dir(), args, stdin);
}

/// Starts a server with authentication on, and admin users `alice` and `bob`.
fn auth_server(envs: &[(&str, &str)]) -> TestServer {
    let mut all = vec![("STOWAGE_AUTH__ENABLED", "true")];
    all.extend_from_slice(envs);
    let server = TestServer::start_with(&all);
    for user in ["alice", "bob"] {
        stowage(&server, &["user", "add", user, "--admin"], &format!("{user}-pw\n"));
    }
    server
}

/// A bearer token for `user` with push on `repo` (one password check, then cheap requests).
async fn bearer(server: &TestServer, user: &str, repo: &str) -> String {
    let resp = client()
        .get(format!("{}/token", server.url))
        .basic_auth(user, Some(format!("{user}-pw")))
        .query(&[
            ("service", "stowage"),
            ("scope", &format!("repository:{repo}:pull,push")),
        ])
        .send()
        .await
        .expect("token");
    assert_eq!(resp.status(), 200, "token for {user}");
    let json: serde_json::Value = resp.json().await.expect("token json");
    json["token"].as_str().expect("token").to_owned()
}

#[tokio::test]
async fn only_the_user_who_opened_a_session_may_use_it() {
    let server = auth_server(&[]);
    let http = client();
    let repo = "owned/blob";
    let (alice, bob) = (bearer(&server, "alice", repo).await, bearer(&server, "bob", repo).await);
    let resp = http
        .post(server.v2(&format!("{repo}/blobs/uploads/")))
        .bearer_auth(&alice)
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 202);
    let location = format!(
        "{}{}",
        server.url,
        resp.headers()["location"].to_str().expect("location")
    );
    let data = blob(2, 4096);
    let digest = sha256(&data);
    let put = with_query(&location, &format!("digest={digest}"));
    for resp in [
        http.get(&location).bearer_auth(&bob).send().await,
        http.patch(&location).bearer_auth(&bob).body(data.clone()).send().await,
        http.put(&put).bearer_auth(&bob).body(data.clone()).send().await,
        http.delete(&location).bearer_auth(&bob).send().await,
    ] {
        assert_error(resp.expect("bob's request"), 404, &["BLOB_UPLOAD_UNKNOWN"]).await;
    }
    let resp = http.put(&put).bearer_auth(&alice).body(data).send().await.expect("PUT");
    assert_eq!(resp.status(), 201, "alice finishes her own session");
}

/// Starts `stowage serve` under a descriptor limit of `nofile` (soft and hard).
fn server_with_nofile(nofile: u64) -> TestServer {
    TestServer::start_with_rlimit_nofile(&[("STOWAGE_AUTH__ENABLED", "true")], nofile)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upload_sessions_are_bounded_per_user_and_in_total() {
    let server = server_with_nofile(1024);
    for user in ["alice", "bob"] {
        stowage(&server, &["user", "add", user, "--admin"], &format!("{user}-pw\n"));
    }
    let repo = "bounded/blob";
    let alice = bearer(&server, "alice", repo).await;
    let bob = bearer(&server, "bob", repo).await;
    let http = client();
    // Alice abandons 5,000 sessions, 32 at a time.
    let opened = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut refused = 0usize;
    let url = server.v2(&format!("{repo}/blobs/uploads/"));
    for _ in 0..(5000 / 32) {
        let mut batch = Vec::new();
        for _ in 0..32 {
            let (http, url, alice) = (http.clone(), url.clone(), alice.clone());
            batch.push(tokio::spawn(async move {
                http.post(&url).bearer_auth(&alice).send().await.expect("POST")
            }));
        }
        for b in batch {
            let resp = b.await.expect("task");
            match resp.status().as_u16() {
                202 => opened
                    .lock()
                    .expect("lock")
                    .push(resp.headers()["location"].to_str().expect("location").to_owned()),
                429 => {
                    let retry: u64 = resp.headers()["retry-after"]
                        .to_str()
                        .expect("retry-after")
                        .parse()
                        .expect("seconds");
                    assert!(retry > 0);
                    assert_error(resp, 429, &["TOOMANYREQUESTS"]).await;
                    refused += 1;
                }
                other => panic!(
                    "opening a session got {other}: {}",
                    resp.text().await.unwrap_or_default()
                ),
            }
        }
    }
    let opened = std::mem::take(&mut *opened.lock().expect("lock"));
    assert!(refused > 0, "5,000 sessions under 1,024 descriptors were never refused");
    assert!(
        opened.len() < 1024,
        "{} sessions open under 1,024 descriptors",
        opened.len()
    );
    eprintln!("alice: {} sessions opened, {refused} refused", opened.len());
    // Bob still uploads, and the registry answers everything else.
    let data = blob(3, 300_000);
    let digest = sha256(&data);
    let resp = http
        .post(server.v2(&format!("{repo}/blobs/uploads/?digest={digest}")))
        .bearer_auth(&bob)
        .body(data.clone())
        .send()
        .await
        .expect("bob's single-request upload");
    assert_eq!(resp.status(), 201);
    let resp = http.post(&url).bearer_auth(&bob).send().await.expect("bob POST");
    assert_eq!(resp.status(), 202, "bob opens a session while alice holds hers");
    let location = format!(
        "{}{}",
        server.url,
        resp.headers()["location"].to_str().expect("location")
    );
    let resp = http
        .put(with_query(&location, &format!("digest={digest}")))
        .bearer_auth(&bob)
        .body(data)
        .send()
        .await
        .expect("bob PUT");
    assert_eq!(resp.status(), 201);
    // Once alice cancels her sessions, she can open new ones.
    for location in &opened {
        let resp = http
            .delete(format!("{}{}", server.url, location))
            .bearer_auth(&alice)
            .send()
            .await
            .expect("DELETE");
        assert_eq!(resp.status(), 204);
    }
    let resp = http.post(&url).bearer_auth(&alice).send().await.expect("POST");
    assert_eq!(resp.status(), 202, "alice opens a session after cancelling hers");
}

//! Upload sessions shared by replicas: two Stowage processes on one PostgreSQL catalog and one
//! S3 bucket, whatever `STOWAGE_TEST_BACKEND` and `STOWAGE_TEST_CATALOG` say (with SQLite or
//! local disk there is one server, and nothing to share). The test fails, never skips, when
//! PostgreSQL or the S3 server is missing.
//!
//! - A session's requests may reach either replica in any order, chunks with and without
//!   `Content-Range`, and a replica holding an old copy of the session appends where the
//!   session really is; a session finished on one replica is unknown on the other.
//! - Two PATCHes at the same offset on two replicas at once: exactly one is taken.
//! - `kill -9` of the replica a session was used on: the other reports every byte the first
//!   acknowledged (the tail under the store's smallest part included) and finishes the blob.
//! - A replica whose database lock on a session is lost mid-request (its lock connection ended
//!   by the server) while the other replica moves the session on: the first one's request is
//!   refused and records nothing, and the session finishes with exactly the bytes acknowledged.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::oci::assert_error;
use common::sql::Value;
use common::{Backend, Catalog, TestServer, client, sha256, wait_until};
use futures_util::StreamExt as _;
use tokio::sync::mpsc;

const MIB: usize = 1024 * 1024;

/// Two replicas sharing a catalog and a bucket.
fn replicas() -> (TestServer, TestServer) {
    let a = TestServer::start_on_backend_and_catalog(Backend::S3, Catalog::Postgres, &[]);
    let b = TestServer::start_sharing(&a, &[]);
    (a, b)
}

/// Bytes that differ with `seed`.
fn data(seed: u64, len: usize) -> Vec<u8> {
    common::rng::seeded_bytes(seed, len)
}

/// Opens a session on `server`; its path (`/v2/…`), which every replica serves.
async fn open(http: &reqwest::Client, server: &TestServer, repo: &str) -> String {
    let resp = http
        .post(server.v2(&format!("{repo}/blobs/uploads/")))
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 202, "open a session");
    resp.headers()["location"].to_str().expect("location").to_owned()
}

fn at(server: &TestServer, path: &str) -> String {
    format!("{}{path}", server.url)
}

/// A PATCH of `body` (with `Content-Range` from `start` when given).
async fn patch(
    http: &reqwest::Client,
    server: &TestServer,
    path: &str,
    body: impl Into<reqwest::Body>,
    len: usize,
    start: Option<usize>,
) -> reqwest::Response {
    let mut req = http
        .patch(at(server, path))
        .header("content-type", "application/octet-stream")
        .header("content-length", len.to_string());
    if let Some(start) = start {
        req = req.header("content-range", format!("{start}-{}", start + len - 1));
    }
    req.body(body).send().await.expect("PATCH")
}

/// The end of the `Range` a response reports, as an offset (bytes held).
fn held(resp: &reqwest::Response) -> usize {
    let range = resp.headers()["range"].to_str().expect("range");
    let end: usize = range.strip_prefix("0-").expect("0-N").parse().expect("N");
    end + 1
}

/// The offset a status request reports.
async fn status(http: &reqwest::Client, server: &TestServer, path: &str) -> usize {
    let resp = http.get(at(server, path)).send().await.expect("GET status");
    assert_eq!(resp.status(), 204, "status of {path} on {}", server.url);
    held(&resp)
}

async fn finish(http: &reqwest::Client, server: &TestServer, path: &str, digest: &str, last: Vec<u8>) {
    let sep = if path.contains('?') { '&' } else { '?' };
    let resp = http
        .put(format!("{}{sep}digest={digest}", at(server, path)))
        .header("content-type", "application/octet-stream")
        .body(last)
        .send()
        .await
        .expect("PUT");
    let status = resp.status();
    assert_eq!(status, 201, "closing PUT: {}", resp.text().await.unwrap_or_default());
}

/// Fetches a blob from `server` and checks it is exactly `expected`.
async fn assert_blob(http: &reqwest::Client, server: &TestServer, repo: &str, expected: &[u8]) {
    let digest = sha256(expected);
    let resp = http
        .get(server.v2(&format!("{repo}/blobs/{digest}")))
        .send()
        .await
        .expect("GET blob");
    assert_eq!(resp.status(), 200, "GET {digest} on {}", server.url);
    let body = resp.bytes().await.expect("body");
    assert_eq!(body.len(), expected.len(), "length of {digest} on {}", server.url);
    assert_eq!(sha256(&body), digest, "bytes of {digest} on {}", server.url);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_continues_on_whichever_replica_a_request_reaches() {
    let (a, b) = replicas();
    let http = client();
    let repo = "shared/hops";
    let blob = data(1, 10 * MIB);
    let (c1, c2, c3, c4) = (3 * MIB, 7 * MIB, 9 * MIB, 10 * MIB);

    let path = open(&http, &a, repo).await;
    // Under the store's smallest part: before sessions were shared, only A's memory held it.
    let resp = patch(&http, &a, &path, blob[..c1].to_vec(), c1, Some(0)).await;
    assert_eq!(resp.status(), 202);
    assert_eq!(held(&resp), c1);
    assert_eq!(status(&http, &b, &path).await, c1, "B sees what A acknowledged");

    let resp = patch(&http, &b, &path, blob[c1..c2].to_vec(), c2 - c1, Some(c1)).await;
    assert_eq!(resp.status(), 202, "B continues A's session");
    assert_eq!(held(&resp), c2);
    assert_eq!(status(&http, &a, &path).await, c2, "A sees what B acknowledged");

    // A's copy of the session is old now; a chunk without Content-Range (as docker sends
    // them) must land where the session is, not where A last left it.
    let resp = patch(&http, &a, &path, blob[c2..c3].to_vec(), c3 - c2, None).await;
    assert_eq!(resp.status(), 202, "A takes the session back");
    assert_eq!(held(&resp), c3);

    // And a chunk at A's old offset is refused on B, which reports where the session is.
    let resp = patch(&http, &b, &path, blob[c1..c2].to_vec(), c2 - c1, Some(c1)).await;
    assert_eq!(resp.status(), 416, "a chunk at a stale offset");
    assert_eq!(held(&resp), c3);

    finish(&http, &b, &path, &sha256(&blob), blob[c3..c4].to_vec()).await;
    assert_blob(&http, &a, repo, &blob).await;
    assert_blob(&http, &b, repo, &blob).await;

    // Finished on B: A's copy must not bring it back.
    let resp = patch(&http, &a, &path, b"more".to_vec(), 4, None).await;
    assert_error(resp, 404, &["BLOB_UPLOAD_UNKNOWN"]).await;
    let resp = http.get(at(&a, &path)).send().await.expect("GET status");
    assert_error(resp, 404, &["BLOB_UPLOAD_UNKNOWN"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_patching_one_session_at_once_take_one_chunk() {
    let (a, b) = replicas();
    let http = client();
    let repo = "shared/race";
    for trial in 0..4u64 {
        let path = open(&http, &a, repo).await;
        let first = data(100 + trial, MIB);
        let other = data(200 + trial, MIB);
        // A's body arrives slowly, so that B's PATCH comes while A's is in progress.
        let pieces: Vec<Bytes> = first.chunks(128 * 1024).map(Bytes::copy_from_slice).collect();
        let slow = futures_util::stream::iter(pieces).then(|piece| async move {
            tokio::time::sleep(Duration::from_millis(120)).await;
            Ok::<_, std::io::Error>(piece)
        });
        let (ra, rb) = tokio::join!(
            patch(&http, &a, &path, reqwest::Body::wrap_stream(slow), MIB, Some(0)),
            async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                patch(&http, &b, &path, other.clone(), MIB, Some(0)).await
            }
        );
        let (sa, sb) = (ra.status().as_u16(), rb.status().as_u16());
        // Whichever came first is taken; the other is refused (a stale offset, or busy), never
        // also appended, and the session is never lost.
        let taken = match (sa, sb) {
            (202, 416 | 400) => &first,
            (416 | 400, 202) => &other,
            _ => panic!("trial {trial}: exactly one of two chunks at one offset must be taken, got {sa} and {sb}"),
        };
        assert_eq!(status(&http, &b, &path).await, MIB);
        assert_eq!(status(&http, &a, &path).await, MIB);
        let tail = data(300 + trial, 4096);
        let mut whole = taken.clone();
        whole.extend_from_slice(&tail);
        finish(&http, &b, &path, &sha256(&whole), tail).await;
        assert_blob(&http, &a, repo, &whole).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_survives_kill_9_of_its_replica() {
    let (mut a, b) = replicas();
    let http = client();
    let repo = "shared/killed";
    let blob = data(7, 9 * MIB);
    let path = open(&http, &a, repo).await;
    // More than one part, and a tail under the smallest part.
    let first = 6 * MIB + 12345;
    let resp = patch(&http, &a, &path, blob[..first].to_vec(), first, Some(0)).await;
    assert_eq!(resp.status(), 202);
    assert_eq!(held(&resp), first);
    a.kill();

    assert_eq!(
        status(&http, &b, &path).await,
        first,
        "every acknowledged byte survives"
    );
    let resp = patch(
        &http,
        &b,
        &path,
        blob[first..8 * MIB].to_vec(),
        8 * MIB - first,
        Some(first),
    )
    .await;
    assert_eq!(resp.status(), 202);
    finish(&http, &b, &path, &sha256(&blob), blob[8 * MIB..].to_vec()).await;
    assert_blob(&http, &b, repo, &blob).await;
}

/// The backend (process id) of a PostgreSQL session holding the database lock of the upload
/// session at `path`, if one does.
fn upload_lock_holder(server: &TestServer, path: &str) -> Option<i64> {
    let id: String = path
        .rsplit('/')
        .next()
        .and_then(|last| last.split('?').next())
        .expect("an upload id")
        .replace('-', "");
    let key = stowage::catalog::locks::upload_key(&id);
    // A bigint advisory key shows as its high and low 32 bits.
    let (high, low) = (key >> 32 & 0xffff_ffff, key & 0xffff_ffff);
    let rows = tokio::task::block_in_place(|| {
        server.catalog_sql().query_rows(
            "SELECT pid::bigint FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1
                AND classid::bigint = ?1 AND objid::bigint = ?2",
            &[high.into(), low.into()],
        )
    });
    match rows.as_slice() {
        [] => None,
        [row] => Some(row[0].int()),
        more => panic!("one upload lock held by {} sessions", more.len()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_lost_the_session_lock_mid_request_records_nothing() {
    let (a, b) = replicas();
    let http = client();
    let repo = "shared/lost-lock";
    let path = open(&http, &a, repo).await;
    // One whole part and a tail.
    let first = data(40, 6 * MIB);
    let resp = patch(&http, &a, &path, first.clone(), first.len(), Some(0)).await;
    assert_eq!(resp.status(), 202);

    // A's next PATCH arrives slowly; while A holds the session's lock, its lock connection is
    // ended (as a failover or a network cut would), which releases the lock in the database.
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|piece| (Ok::<_, std::io::Error>(piece), rx))
    });
    let lost = data(41, 6 * MIB);
    let slow = {
        let (http, a, path) = (http.clone(), a.url.clone(), path.clone());
        let len = lost.len();
        tokio::spawn(async move {
            http.patch(format!("{a}{path}"))
                .header("content-type", "application/octet-stream")
                .header("content-length", len.to_string())
                .header("content-range", format!("{}-{}", 6 * MIB, 6 * MIB + len - 1))
                .body(reqwest::Body::wrap_stream(body))
                .send()
                .await
                .expect("A's PATCH")
        })
    };
    tx.send(Bytes::copy_from_slice(&lost[..MIB]))
        .await
        .expect("first piece");
    let mut holder = None;
    wait_until("A holds the session's lock", || {
        holder = upload_lock_holder(&a, &path);
        std::future::ready(holder.is_some())
    })
    .await;
    let ended = tokio::task::block_in_place(|| {
        a.catalog_sql().query_rows(
            "SELECT pg_terminate_backend(?1::int)::int",
            &[holder.expect("a holder").into()],
        )
    });
    assert_eq!(ended, [[Value::Int(1)]], "A's lock connection ended");

    // B takes the session on from what A last recorded.
    let taken = data(42, MIB / 2);
    let resp = patch(&http, &b, &path, taken.clone(), taken.len(), Some(6 * MIB)).await;
    assert_eq!(resp.status(), 202, "B continues the session A no longer holds");
    assert_eq!(held(&resp), 6 * MIB + MIB / 2);

    // A's request ends now: it must not be acknowledged, nor move the session.
    for piece in lost[MIB..].chunks(MIB) {
        tx.send(Bytes::copy_from_slice(piece)).await.expect("a piece");
    }
    drop(tx);
    let resp = slow.await.expect("A's PATCH task");
    assert_error(resp, 400, &["BLOB_UPLOAD_INVALID"]).await;
    assert_eq!(
        status(&http, &a, &path).await,
        6 * MIB + MIB / 2,
        "the session as B left it"
    );
    assert_eq!(status(&http, &b, &path).await, 6 * MIB + MIB / 2);

    let last = data(43, MIB);
    let mut whole = first;
    whole.extend_from_slice(&taken);
    whole.extend_from_slice(&last);
    finish(&http, &b, &path, &sha256(&whole), last).await;
    assert_blob(&http, &a, repo, &whole).await;
    assert_blob(&http, &b, repo, &whole).await;
}

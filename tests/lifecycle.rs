//! Process life cycle: graceful shutdown finishes in-flight requests, and data acknowledged
//! before a shutdown is there after a restart.

mod common;

use bytes::Bytes;
use common::{Backend, S3_PART_SIZE, TestServer, client, push_image, sha256};
use futures_util::StreamExt;
use tokio::sync::mpsc;

#[tokio::test]
async fn sigterm_lets_an_in_flight_upload_finish() {
    let mut server = TestServer::start();
    let blob: Vec<u8> = (0..9 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let digest = sha256(&blob);

    // Stream the body by hand so the request is provably in flight when the signal arrives.
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(tokio_stream(rx));
    let url = server.v2(&format!("life/blobs/uploads/?digest={digest}"));
    let request = tokio::spawn(async move { client().post(url).body(body).send().await });

    // More than one part: on S3 the multipart upload exists once the first part is written.
    let (first, rest) = blob.split_at(S3_PART_SIZE + 1024 * 1024);
    tx.send(Ok(Bytes::copy_from_slice(first)))
        .await
        .expect("send first part");
    // The server stages an upload's data (a file under storage/uploads/, a multipart upload on
    // S3) once it has read part of the body: then the request is in flight. Signal then.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !server.has_staged_uploads() {
        assert!(std::time::Instant::now() < deadline, "the upload never started");
        tokio::task::yield_now().await;
    }
    server.signal_terminate();
    for chunk in rest.chunks(256 * 1024) {
        tx.send(Ok(Bytes::copy_from_slice(chunk))).await.expect("send part");
    }
    drop(tx);

    let resp = request.await.expect("join").expect("upload response");
    assert_eq!(resp.status(), 201, "an upload in flight during SIGTERM completes");
    let status = server.wait_exit();
    assert!(status.success(), "graceful shutdown exits 0, got {status:?}");

    // The acknowledged blob is there after a restart.
    server.crash_and_restart();
    let got = client()
        .get(server.v2(&format!("life/blobs/{digest}")))
        .send()
        .await
        .expect("GET");
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.expect("body").as_ref(), blob.as_slice());
}

#[tokio::test]
async fn graceful_restart_keeps_manifests_and_tags() {
    let mut server = TestServer::start();
    let (digest, body) = push_image(&server, "keep/me", "v1", b"layer").await;
    let status = server.terminate();
    assert!(status.success(), "graceful shutdown exits 0, got {status:?}");
    server.crash_and_restart();
    let resp = client()
        .get(server.v2("keep/me/manifests/v1"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["docker-content-digest"], digest.as_str());
    assert_eq!(resp.bytes().await.expect("body").as_ref(), body.as_slice());
}

fn tokio_stream(
    mut rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

/// Appends `data` at `offset` with a PATCH; returns the new offset the server reports.
async fn patch(server: &TestServer, location: &str, offset: u64, data: &[u8]) -> u64 {
    let resp = client()
        .patch(format!("{}{location}", server.url))
        .header("Content-Type", "application/octet-stream")
        .header(
            "Content-Range",
            format!("{}-{}", offset, offset + data.len() as u64 - 1),
        )
        .body(data.to_vec())
        .send()
        .await
        .expect("PATCH");
    assert_eq!(resp.status(), 202, "PATCH at {offset}");
    range_end(&resp)
}

/// The offset a session response's `Range: 0-<last>` reports.
fn range_end(resp: &reqwest::Response) -> u64 {
    let range = resp.headers()["range"].to_str().expect("Range header");
    let last: u64 = range
        .strip_prefix("0-")
        .and_then(|l| l.parse().ok())
        .expect("Range 0-N");
    if last == 0 { 0 } else { last + 1 }
}

/// The offset a restarted server reports for a session: what it has durably stored.
async fn status(server: &TestServer, location: &str) -> u64 {
    let resp = client()
        .get(format!("{}{location}", server.url))
        .send()
        .await
        .expect("GET upload status");
    assert_eq!(resp.status(), 204, "upload status after restart");
    range_end(&resp)
}

#[tokio::test]
async fn a_chunked_upload_resumes_after_a_crash() {
    let mut server = TestServer::start();
    let blob: Vec<u8> = (0..20 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let digest = sha256(&blob);
    let resp = client()
        .post(server.v2("resume/me/blobs/uploads/"))
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 202);
    let location = resp.headers()["location"].to_str().expect("Location").to_string();

    // Two chunks of 6 MiB, then the server dies (SIGKILL) with the session open.
    let chunk = 6 * 1024 * 1024;
    let mut offset = patch(&server, &location, 0, &blob[..chunk]).await;
    offset = patch(&server, &location, offset, &blob[offset as usize..2 * chunk]).await;
    assert_eq!(offset, 2 * chunk as u64);
    server.crash_and_restart();

    // The restarted server reports what it durably holds: on local disk every completed PATCH;
    // on S3 with SQLite the whole 5 MiB parts (the 2 MiB tail of the second PATCH was only in
    // memory); on S3 with PostgreSQL every completed PATCH too (shared sessions move the tail
    // to its tail object at the end of each request).
    let resumed = status(&server, &location).await;
    let expected = match (server.backend, server.catalog) {
        (Backend::S3, common::Catalog::Sqlite) => 2 * S3_PART_SIZE as u64,
        _ => 2 * chunk as u64,
    };
    assert_eq!(resumed, expected, "offset reported after the restart");

    // A chunk that does not start there is refused; one that does continues the upload.
    let wrong = client()
        .patch(format!("{}{location}", server.url))
        .header("Content-Range", format!("{}-{}", resumed + 1, resumed + 10))
        .body(vec![0u8; 10])
        .send()
        .await
        .expect("PATCH");
    assert_eq!(wrong.status(), 416);
    let offset = patch(&server, &location, resumed, &blob[resumed as usize..]).await;
    assert_eq!(offset, blob.len() as u64);
    let sep = if location.contains('?') { '&' } else { '?' };
    let done = client()
        .put(format!("{}{location}{sep}digest={digest}", server.url))
        .send()
        .await
        .expect("PUT");
    assert_eq!(done.status(), 201, "closing PUT after resuming");
    assert_eq!(done.headers()["docker-content-digest"], digest.as_str());

    let got = client()
        .get(server.v2(&format!("resume/me/blobs/{digest}")))
        .send()
        .await
        .expect("GET");
    assert_eq!(got.status(), 200);
    let body = got.bytes().await.expect("body");
    assert_eq!(sha256(&body), digest, "the resumed blob has the right digest");
    assert!(!server.has_staged_uploads(), "nothing staged is left behind");
}

#[tokio::test]
async fn a_session_survives_a_graceful_restart_too() {
    let mut server = TestServer::start();
    let resp = client()
        .post(server.v2("resume/graceful/blobs/uploads/"))
        .send()
        .await
        .expect("POST");
    let location = resp.headers()["location"].to_str().expect("Location").to_string();
    let blob: Vec<u8> = (0..S3_PART_SIZE + 3 * 1024 * 1024 + 5)
        .map(|i| (i % 251) as u8)
        .collect();
    // One whole S3 part and a tail too small to be one, which S3 staging holds in memory.
    let first = S3_PART_SIZE + 1024 * 1024 + 3;
    patch(&server, &location, 0, &blob[..first]).await;
    let status_code = server.terminate();
    assert!(status_code.success());
    server.crash_and_restart();
    // Local disk wrote the whole PATCH; on S3 the stop moved the tail into a tail object.
    assert_eq!(status(&server, &location).await, first as u64);
    patch(&server, &location, first as u64, &blob[first..]).await;
    let digest = sha256(&blob);
    let done = client()
        .put(format!("{}{location}?digest={digest}", server.url))
        .send()
        .await
        .expect("PUT");
    assert_eq!(done.status(), 201);
    let got = client()
        .get(server.v2(&format!("resume/graceful/blobs/{digest}")))
        .send()
        .await
        .expect("GET");
    let body = got.bytes().await.expect("body");
    assert_eq!(sha256(&body), digest, "the resumed blob has the right digest");
    assert!(!server.has_staged_uploads(), "nothing staged is left behind");
}

#[tokio::test]
async fn abandoned_sessions_expire_with_their_data_after_a_restart() {
    let mut server = TestServer::start();
    let resp = client()
        .post(server.v2("expire/me/blobs/uploads/"))
        .send()
        .await
        .expect("POST");
    let location = resp.headers()["location"].to_str().expect("Location").to_string();
    let blob = vec![1u8; S3_PART_SIZE + 1024];
    patch(&server, &location, 0, &blob).await;
    assert!(server.has_staged_uploads(), "the session's data is staged");

    // Restarted with a zero timeout, the server expires the session at start-up.
    server.crash_and_restart_with(&[("STOWAGE_REGISTRY__UPLOAD_TIMEOUT_SECS", "0")]);
    let resp = client()
        .get(format!("{}{location}", server.url))
        .send()
        .await
        .expect("GET status");
    assert_eq!(resp.status(), 404, "an expired session is unknown");
    assert!(!server.has_staged_uploads(), "an expired session's data is removed");
}

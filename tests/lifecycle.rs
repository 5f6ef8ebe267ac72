//! Process life cycle: graceful shutdown finishes in-flight requests, and data acknowledged
//! before a shutdown is there after a restart.

mod common;

use bytes::Bytes;
use common::{TestServer, client, push_image, sha256};
use futures_util::StreamExt;
use tokio::sync::mpsc;

#[tokio::test]
async fn sigterm_lets_an_in_flight_upload_finish() {
    let mut server = TestServer::start();
    let blob: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let digest = sha256(&blob);

    // Stream the body by hand so the request is provably in flight when the signal arrives.
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(tokio_stream(rx));
    let url = server.v2(&format!("life/blobs/uploads/?digest={digest}"));
    let request = tokio::spawn(async move { client().post(url).body(body).send().await });

    let (first, rest) = blob.split_at(1024 * 1024);
    tx.send(Ok(Bytes::copy_from_slice(first)))
        .await
        .expect("send first part");
    // The server stages an upload's data under storage/uploads/ from the moment it starts
    // reading the body: once that exists, the request is in flight. Signal then.
    let uploads = server.data_dir().join("storage/uploads");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !has_files(&uploads) {
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

fn has_files(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(false)
}

fn tokio_stream(
    mut rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

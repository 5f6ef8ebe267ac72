//! The upload memory budget (`storage.upload_memory`): many uploads at once share a budget of
//! two parts and every one of them completes with the right bytes (they wait for memory instead
//! of allocating it); an upload that finds no memory within the configured wait gets 503
//! `UNAVAILABLE` with `Retry-After` and keeps its session; and every reservation is given back.
//! Runs on the backend `STOWAGE_TEST_BACKEND` names (parts are 5 MiB at least on S3).

mod common;

use std::io::Write;
use std::net::TcpStream;

use common::{Backend, S3_PART_SIZE, TestServer, backend, client, sha256, wait_until};
use futures_util::StreamExt;

/// Part size and budget (two parts) on this backend.
fn sizes() -> (usize, usize) {
    let part = match backend() {
        Backend::Fs => 256 * 1024,
        Backend::S3 => S3_PART_SIZE,
    };
    (part, 2 * part)
}

fn start(extra: &[(&str, &str)]) -> TestServer {
    let (part, budget) = sizes();
    let (part, budget) = (part.to_string(), budget.to_string());
    let mut envs = vec![
        ("STOWAGE_STORAGE__PART_SIZE", part.as_str()),
        ("STOWAGE_STORAGE__UPLOAD_MEMORY", budget.as_str()),
    ];
    envs.extend_from_slice(extra);
    TestServer::start_with(&envs)
}

async fn metric(server: &TestServer, name: &str) -> f64 {
    let url = format!("{}/metrics", server.url);
    let text = client()
        .get(url)
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} is not exported"))
}

/// Deterministic, incompressible-looking content for upload `i`.
fn content(i: usize, len: usize) -> Vec<u8> {
    let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn open_session(server: &TestServer, repo: &str) -> String {
    let resp = client()
        .post(server.v2(&format!("{repo}/blobs/uploads/")))
        .send()
        .await
        .expect("POST upload");
    assert_eq!(resp.status(), 202);
    let location = resp.headers()["location"].to_str().expect("location").to_owned();
    if location.starts_with("http") {
        location
    } else {
        format!("{}{location}", server.url)
    }
}

fn with_digest(location: &str, digest: &str) -> String {
    let sep = if location.contains('?') { '&' } else { '?' };
    format!("{location}{sep}digest={digest}")
}

async fn assert_blob(server: &TestServer, repo: &str, digest: &str, data: &[u8]) {
    let resp = client()
        .get(server.v2(&format!("{repo}/blobs/{digest}")))
        .send()
        .await
        .expect("GET blob");
    assert_eq!(resp.status(), 200, "{digest}");
    let body = resp.bytes().await.expect("blob body");
    assert_eq!(body.len(), data.len(), "{digest}");
    assert_eq!(sha256(&body), digest, "stored bytes hash to their digest");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_beyond_the_budget_wait_for_memory_and_all_complete_whole() {
    let server = start(&[]);
    let (part, budget) = sizes();
    let (uploads, len) = match backend() {
        Backend::Fs => (16, 2 * 1024 * 1024 + 12_345),
        Backend::S3 => (5, 2 * S3_PART_SIZE + 54_321),
    };
    let repo = "memory/many";
    let mut sessions = Vec::new();
    for i in 0..uploads {
        sessions.push((i, open_session(&server, repo).await));
    }
    // Every body streamed at once in 64 KiB chunks: together they want many times the budget.
    let tasks: Vec<_> = sessions
        .into_iter()
        .map(|(i, location)| {
            tokio::spawn(async move {
                let data = content(i, len);
                let digest = sha256(&data);
                let chunks: Vec<Vec<u8>> = data.chunks(64 * 1024).map(<[u8]>::to_vec).collect();
                let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks).map(Ok::<_, std::io::Error>));
                let resp = client()
                    .put(with_digest(&location, &digest))
                    .header("content-type", "application/octet-stream")
                    .body(body)
                    .send()
                    .await
                    .expect("PUT upload");
                assert_eq!(resp.status(), 201, "upload {i}: {:?}", resp.text().await);
                (digest, data)
            })
        })
        .collect();
    let mut blobs = Vec::new();
    for t in tasks {
        blobs.push(t.await.expect("upload task"));
    }
    for (digest, data) in &blobs {
        assert_blob(&server, repo, digest, data).await;
    }
    let peak = metric(&server, "stowage_upload_memory_peak_bytes").await;
    assert!(
        peak > 0.0 && peak <= budget as f64,
        "peak {peak} within the budget {budget}"
    );
    assert!(
        metric(&server, "stowage_upload_memory_waits_total").await > 0.0,
        "{uploads} uploads of {len} bytes in parts of {part} had to wait for a budget of {budget}"
    );
    assert_eq!(metric(&server, "stowage_upload_memory_timeouts_total").await, 0.0);
    assert_eq!(
        metric(&server, "stowage_upload_memory_limit_bytes").await,
        budget as f64
    );
    // Every part written gave its memory back (idle parts kept for reuse hold theirs).
    assert_eq!(
        metric(&server, "stowage_upload_memory_reserved_bytes").await,
        metric(&server, "stowage_upload_memory_pooled_bytes").await
    );
}

/// Opens a PATCH whose body stops after `sent` of its `len` bytes; the socket is kept open.
fn stalled_patch(server: &TestServer, location: &str, len: usize, sent: usize) -> TcpStream {
    let path = location.strip_prefix(&server.url).unwrap_or(location);
    let mut s = TcpStream::connect(&server.host).expect("connect");
    write!(
        s,
        "PATCH {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {len}\r\n\r\n",
        server.host
    )
    .expect("PATCH head");
    s.write_all(&vec![7u8; sent]).expect("PATCH body");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_without_memory_in_time_gets_503_and_keeps_its_session() {
    let server = start(&[
        ("STOWAGE_STORAGE__UPLOAD_MEMORY_WAIT_SECS", "1"),
        ("STOWAGE_SERVER__BODY_IDLE_TIMEOUT_SECS", "120"),
    ]);
    let (_, budget) = sizes();
    let repo = "memory/busy";
    // Two clients that start a body and stop: each holds a part's reservation (on local disk a
    // part is one 256 KiB step here), so between them they hold the whole budget.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let location = open_session(&server, repo).await;
        stalled.push(stalled_patch(&server, &location, 64 << 20, 100_000));
    }
    wait_until("the stalled clients hold the whole budget", || async {
        metric(&server, "stowage_upload_memory_reserved_bytes").await == budget as f64
    })
    .await;

    let location = open_session(&server, repo).await;
    let data = content(99, 64 * 1024);
    let resp = client()
        .patch(&location)
        .header("content-type", "application/octet-stream")
        .body(data.clone())
        .send()
        .await
        .expect("PATCH without memory");
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"), "{:?}", resp.headers());
    let body = resp.text().await.expect("error body");
    assert!(
        body.contains("\"UNAVAILABLE\"") && body.contains("too many uploads"),
        "{body}"
    );
    assert!(metric(&server, "stowage_upload_memory_timeouts_total").await >= 1.0);

    // The session is still there, with nothing of the refused body in it.
    let status = client().get(&location).send().await.expect("upload status");
    assert_eq!(status.status(), 204);
    assert_eq!(status.headers()["range"], "0-0");

    // The stalled clients go away; their memory comes back and the upload completes.
    drop(stalled);
    wait_until("the stalled uploads' memory is given back", || async {
        metric(&server, "stowage_upload_memory_reserved_bytes").await
            == metric(&server, "stowage_upload_memory_pooled_bytes").await
    })
    .await;
    let digest = sha256(&data);
    let resp = client()
        .put(with_digest(&location, &digest))
        .header("content-type", "application/octet-stream")
        .body(data.clone())
        .send()
        .await
        .expect("PUT upload");
    assert_eq!(resp.status(), 201, "{:?}", resp.text().await);
    assert_blob(&server, repo, &digest, &data).await;
}

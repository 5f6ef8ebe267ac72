//! The upload memory budget (`storage.upload_memory`): many uploads at once share a budget of
//! two parts and every one of them completes with the right bytes (they wait for memory instead
//! of allocating it); an upload that finds no memory within the configured wait gets 503
//! `UNAVAILABLE` with `Retry-After` and keeps its session; clients that start a body and stall
//! give their memory back (local disk), so hundreds of them do not hold up a fast upload; and
//! every reservation is given back. Runs on the backend `STOWAGE_TEST_BACKEND` names (parts are
//! 5 MiB at least on S3, and a stalled S3 upload keeps its part's memory).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

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

/// Opens a PATCH whose body stops after `first` of its `len` bytes; the socket is kept open.
fn stalled_patch(server: &TestServer, location: &str, len: usize, first: &[u8]) -> TcpStream {
    let path = location.strip_prefix(&server.url).unwrap_or(location);
    let mut s = TcpStream::connect(&server.host).expect("connect");
    write!(
        s,
        "PATCH {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {len}\r\n\r\n",
        server.host
    )
    .expect("PATCH head");
    s.write_all(first).expect("PATCH body");
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
    // Clients that start a body and hold memory: on S3 a stalled upload keeps its whole part,
    // so two of them hold the budget; on local disk a stalled body gives its memory back, so
    // it takes clients that keep sending a byte now and then (each holds a 64 KiB step, the
    // first a whole 256 KiB part; the ones that find no memory hold nothing and wait).
    let (holders, dribble) = match backend() {
        Backend::Fs => (8, true),
        Backend::S3 => (2, false),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let mut stalled = Vec::new();
    let mut dribblers = Vec::new();
    for _ in 0..holders {
        let location = open_session(&server, repo).await;
        let s = stalled_patch(&server, &location, 64 << 20, &[7u8; 100_000]);
        if dribble {
            let (mut s, stop) = (s.try_clone().expect("clone socket"), Arc::clone(&stop));
            dribblers.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) && s.write_all(b"d").is_ok() {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }));
        }
        stalled.push(s);
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
    stop.store(true, Ordering::Relaxed);
    for d in dribblers {
        d.join().expect("dribbler");
    }
    for s in &stalled {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
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

/// Finishes a PATCH opened by [`stalled_patch`] with the rest of `data`; returns the status.
fn finish_patch(mut s: TcpStream, rest: &[u8]) -> u16 {
    s.write_all(rest).expect("rest of the PATCH body");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("PATCH status line");
    line.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_clients_give_their_memory_back_and_a_fast_upload_goes_ahead() {
    let (part, _) = sizes();
    // An upload holds at most the part it fills and MAX_IN_FLIGHT (2) parts being written: a
    // budget with room for that and more means the fast upload below never waits for its own
    // parts, so any wait it makes is one the stalled clients cause.
    // On local disk 100 stalled clients in a budget of twelve 256 KiB parts (their bodies hold
    // about 7 MB): idle ones give their memory back once less than half the budget is free
    // (or someone waits), so they hold at most half of it and the fast upload's three parts
    // fit in the rest. On S3 a stalled upload keeps its whole part (documented), so there the
    // budget fits the stalled ones and four more parts: what is shown is that the rest of the
    // budget stays usable.
    let (slow, len, budget) = match backend() {
        Backend::Fs => (100, 300_000, 12 * part),
        Backend::S3 => (2, part + 300_000, (2 + 4) * part),
    };
    let budget_env = budget.to_string();
    // A long wait for memory, so that no stalled client gets 503 however slowly a loaded
    // machine drains them; the fast upload's waits are asserted from the metrics instead.
    let server = start(&[
        ("STOWAGE_STORAGE__UPLOAD_MEMORY", budget_env.as_str()),
        ("STOWAGE_STORAGE__UPLOAD_MEMORY_WAIT_SECS", "300"),
        ("STOWAGE_SERVER__BODY_IDLE_TIMEOUT_SECS", "300"),
    ]);
    let repo = "memory/slow";
    // Sessions opened 16 at a time (each POST waits for its catalog row to be durable).
    let locations: Vec<String> = futures_util::stream::iter(0..slow)
        .map(|_| open_session(&server, repo))
        .buffered(16)
        .collect()
        .await;
    let mut clients = Vec::new();
    for (i, location) in locations.into_iter().enumerate() {
        let data = content(1000 + i, len + i);
        // Some stop within the first block, most past a few blocks, a few past a part.
        let sent = match i % 4 {
            0 => 1 + i,
            1 => part + 4096 + i,
            _ => 10_000 + 97 * i,
        }
        .min(len - 1);
        let s = stalled_patch(&server, &location, data.len(), &data[..sent]);
        s.set_read_timeout(Some(Duration::from_secs(60))).expect("read timeout");
        clients.push((location, data, sent, s));
    }
    // On local disk the stalled bodies put the budget under pressure (more than half of it
    // reserved at some point), and idle ones give their memory back until at most half is held
    // (idle parts kept for reuse count as free); on S3 each keeps the one part it is filling.
    wait_until("the stalled uploads hold no more than documented", || async {
        let held = metric(&server, "stowage_upload_memory_reserved_bytes").await
            - metric(&server, "stowage_upload_memory_pooled_bytes").await;
        match backend() {
            Backend::Fs => {
                metric(&server, "stowage_upload_memory_peak_bytes").await > (budget / 2) as f64
                    && held <= (budget / 2) as f64
            }
            Backend::S3 => held == (slow * part) as f64,
        }
    })
    .await;

    // A fast upload of several parts goes through at once, without running into the wait.
    let parts = match backend() {
        Backend::Fs => 8,
        Backend::S3 => 3,
    };
    let data = content(7, parts * part + 4321);
    let digest = sha256(&data);
    let location = open_session(&server, repo).await;
    let waits_before = metric(&server, "stowage_upload_memory_waits_total").await;
    let resp = client()
        .put(with_digest(&location, &digest))
        .header("content-type", "application/octet-stream")
        .body(data.clone())
        .send()
        .await
        .expect("PUT fast upload");
    assert_eq!(resp.status(), 201, "{:?}", resp.text().await);
    assert_eq!(
        metric(&server, "stowage_upload_memory_waits_total").await,
        waits_before,
        "the fast upload waited for memory the stalled clients held"
    );
    assert_eq!(metric(&server, "stowage_upload_memory_timeouts_total").await, 0.0);
    assert_blob(&server, repo, &digest, &data).await;

    // The stalled clients send the rest; every upload holds exactly its bytes.
    let finishing = clients.into_iter().map(|(location, data, sent, s)| {
        let server = &server;
        async move {
            let (status, data) = tokio::task::spawn_blocking(move || (finish_patch(s, &data[sent..]), data))
                .await
                .expect("finish task");
            assert_eq!(status, 202, "PATCH of {location}");
            let digest = sha256(&data);
            let resp = client()
                .put(with_digest(&location, &digest))
                .send()
                .await
                .expect("PUT closing the upload");
            assert_eq!(resp.status(), 201, "{:?}", resp.text().await);
            assert_blob(server, repo, &digest, &data).await;
        }
    });
    futures_util::stream::iter(finishing)
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    assert_eq!(metric(&server, "stowage_upload_memory_timeouts_total").await, 0.0);
    assert_eq!(
        metric(&server, "stowage_upload_memory_reserved_bytes").await,
        metric(&server, "stowage_upload_memory_pooled_bytes").await
    );
}

//! Load tests: slow and idle clients must not starve or exhaust the registry.
//!
//! Each test starts the real binary (on the backend `STOWAGE_TEST_BACKEND` names) with a file
//! descriptor limit of its choosing and drives it with raw TCP clients on 127.0.0.1 that behave
//! badly on purpose: they request a large blob and stop reading, send request heads or bodies
//! and then stall or dribble, or hold connections open. Meanwhile a well-behaved client checks
//! that the registry still answers promptly. Every loop is bounded in count and time.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Backend, TestServer};

/// Descriptors the test process may need (a few thousand client sockets).
fn raise_own_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read or write the struct on this stack frame.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    assert!(
        lim.rlim_cur >= 4096,
        "the tests need a hard descriptor limit of at least 4096"
    );
}

/// Sends a GET with `Connection: close` and reads the whole answer; returns the status and how
/// long it took.
fn timed_get(host: &str, path: &str) -> (u16, Duration) {
    let started = Instant::now();
    let mut s = TcpStream::connect(host).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).expect("read answer");
    (status_of(&resp), started.elapsed())
}

fn status_of(resp: &[u8]) -> u16 {
    String::from_utf8_lossy(resp)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Opens a connection that asks for `path` and reads `at_least` bytes of the answer, then
/// stops reading (the stream is returned, still open).
fn stalled_download(host: &str, path: &str, at_least: usize) -> TcpStream {
    let mut s = TcpStream::connect(host).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
    let mut got = 0;
    let mut buf = [0u8; 4096];
    while got < at_least {
        let n = s.read(&mut buf).expect("read the start of a download");
        assert!(n > 0, "download closed after {got} bytes");
        if got == 0 {
            assert_eq!(status_of(&buf[..n]), 200, "{}", String::from_utf8_lossy(&buf[..n]));
        }
        got += n;
    }
    s
}

/// Pushes an image with a `layer_size`-byte layer as `load/big:v1`; returns the layer digest.
async fn push_big_image(server: &TestServer, layer_size: usize) -> String {
    let layer: Vec<u8> = (0..layer_size).map(|i| (i * 7 % 251) as u8).collect();
    common::push_image(server, "load/big", "v1", &layer).await;
    common::sha256(&layer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_downloads_leave_tags_and_manifests_answering() {
    raise_own_limit();
    let server = TestServer::start_with_nofile(&[], (8192, 8192));
    // On S3 every download is one GET to the test's S3 server (moto), which holds the whole
    // object in memory per request: 1,000 × 16 MiB would be 16 GiB there, not in Stowage. A
    // 1 MiB layer still outgrows what the registry and the sockets buffer for each client.
    let (clients, layer_size) = match server.backend {
        Backend::Fs => (1000, 16 << 20),
        Backend::S3 => (1000, 1 << 20),
    };
    let digest = push_big_image(&server, layer_size).await;
    let host = server.host.clone();
    let blob = format!("/v2/load/big/blobs/{digest}");
    let baseline_rss = server.proc_status("VmRSS");

    let check = |what: &str| {
        for path in ["/v2/load/big/tags/list", "/v2/load/big/manifests/v1"] {
            let (status, took) = timed_get(&host, path);
            assert_eq!(status, 200, "{what}: GET {path}");
            assert!(took < Duration::from_secs(1), "{what}: GET {path} took {took:?}");
        }
    };

    let started = Instant::now();
    let mut stalled = Vec::with_capacity(clients);
    let mut max_threads = 0;
    for i in 0..clients {
        stalled.push(stalled_download(&host, &blob, 4096));
        if i % 100 == 99 {
            check(&format!("after {} slow downloads", i + 1));
            max_threads = max_threads.max(server.proc_status("Threads"));
        }
    }
    let opened = started.elapsed();
    // Every download is open and stalled; keep asking for a few seconds.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        check("with every slow download open");
        max_threads = max_threads.max(server.proc_status("Threads"));
    }
    let threads = server.proc_status("Threads");
    let rss = server.proc_status("VmRSS");
    eprintln!(
        "{clients} slow downloads of {layer_size} bytes opened in {opened:?}: threads {threads} (max seen \
         {max_threads}), RSS {baseline_rss} KiB before, {rss} KiB with them open"
    );
    // Two HTTP workers, the actix system, the catalog's writer and 8 readers, and at most 32
    // blocking threads for reads in flight; before, each stalled download held its own.
    assert!(max_threads <= 64, "threads: {max_threads}");
    // Per stalled download: what the HTTP layer buffers for the connection (at most its 1 MiB
    // write buffer and one 512 KiB piece) and at most one read-ahead piece from a 32 MiB budget
    // shared by all. Measured: ~1.2 MiB per client.
    let per_client_kib = rss.saturating_sub(baseline_rss) / clients as u64;
    assert!(per_client_kib <= 1700, "RSS per stalled download: {per_client_kib} KiB");
    drop(stalled);
    check("after the slow downloads went away");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_dribbling_token_requests_are_cut_off_while_others_are_served() {
    raise_own_limit();
    let server = TestServer::start_with_nofile(
        &[
            ("STOWAGE_SERVER__REQUEST_HEAD_TIMEOUT_SECS", "2"),
            ("STOWAGE_SERVER__BODY_IDLE_TIMEOUT_SECS", "2"),
            ("STOWAGE_SERVER__SMALL_BODY_TIMEOUT_SECS", "4"),
        ],
        (1024, 1024),
    );
    let host = server.host.clone();
    // 240 bad clients, within the 298 connections the budget allows under 1,024 descriptors.
    const EACH: usize = 80;
    let head = |len: usize| {
        format!(
            "POST /token HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
             Content-Length: {len}\r\n\r\ngrant_type=password&username=x"
        )
    };
    let connect = |first: &str| {
        let mut s = TcpStream::connect(&host).expect("connect");
        s.write_all(first.as_bytes()).expect("send");
        s.set_nonblocking(true).unwrap();
        s
    };
    // Three kinds of bad client: a head that never ends, a body that stops, a body that comes
    // one byte every half second (never idle for long, but never done).
    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Kind {
        Head,
        Stalled,
        Dribbling,
    }
    let mut clients: Vec<(Kind, TcpStream, Vec<u8>, Option<Duration>)> = Vec::new();
    let started = Instant::now();
    for _ in 0..EACH {
        clients.push((
            Kind::Head,
            connect(&format!("POST /token HTTP/1.1\r\nHost: {host}\r\n")),
            Vec::new(),
            None,
        ));
        clients.push((Kind::Stalled, connect(&head(1000)), Vec::new(), None));
        clients.push((Kind::Dribbling, connect(&head(100_000)), Vec::new(), None));
    }
    let deadline = started + Duration::from_secs(20);
    let mut last_dribble = Instant::now();
    let mut served = 0;
    while clients.iter().any(|c| c.3.is_none()) {
        assert!(Instant::now() < deadline, "bad clients still connected after 20 s");
        if last_dribble.elapsed() >= Duration::from_millis(500) {
            for (kind, s, _, done) in &mut clients {
                if *kind == Kind::Dribbling && done.is_none() {
                    let _ = s.write(b"a");
                }
            }
            last_dribble = Instant::now();
        }
        for (_, s, resp, done) in &mut clients {
            if done.is_some() {
                continue;
            }
            let mut buf = [0u8; 4096];
            match s.read(&mut buf) {
                Ok(0) => *done = Some(started.elapsed()),
                Ok(n) => resp.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => *done = Some(started.elapsed()),
            }
        }
        // A well-behaved client is served meanwhile.
        let (status, took) = timed_get(&host, "/v2/");
        assert_eq!(status, 200);
        assert!(
            took < Duration::from_secs(1),
            "GET /v2/ took {took:?} among slow clients"
        );
        served += 1;
    }
    for (kind, _, resp, done) in &clients {
        let text = String::from_utf8_lossy(resp);
        let done = done.expect("closed");
        match kind {
            Kind::Head => assert_eq!(status_of(resp), 408, "unfinished head: {text}"),
            Kind::Stalled | Kind::Dribbling => {
                assert_eq!(status_of(resp), 400, "{kind:?} body: {text}");
                assert!(text.contains("form not received in time"), "{kind:?} body: {text}");
            }
        }
        // Cut off by their timeout (2 s idle or head, 4 s in total), not by the test's end.
        let limit = if *kind == Kind::Dribbling { 4 } else { 2 };
        assert!(
            done >= Duration::from_secs(limit) && done < Duration::from_secs(limit + 6),
            "{kind:?} closed after {done:?}"
        );
    }
    eprintln!(
        "{} bad clients cut off; {served} good requests answered meanwhile",
        clients.len()
    );
    let (status, _) = timed_get(&host, "/v2/");
    assert_eq!(status, 200);
}

#[test]
fn the_soft_descriptor_limit_is_raised_to_the_hard_limit() {
    let server = TestServer::start_with_nofile(&[], (512, 4096));
    assert_eq!(server.nofile_limits(), (4096, 4096));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait_and_are_served_once_others_close() {
    raise_own_limit();
    const CAP: usize = 20;
    let server = TestServer::start_with_nofile(&[("STOWAGE_SERVER__MAX_CONNECTIONS", "20")], (4096, 4096));
    let digest = push_big_image(&server, 16 << 20).await;
    let host = server.host.clone();
    let blob = format!("/v2/load/big/blobs/{digest}");
    // The pushes' connections are closed once the client is gone; wait until the server lets
    // CAP downloads in at once.
    let mut held: Vec<TcpStream> = (0..CAP).map(|_| stalled_download(&host, &blob, 4096)).collect();
    // One more: the kernel accepts the connection, the server does not take it yet.
    let mut extra = TcpStream::connect(&host).expect("connect beyond the cap");
    write!(extra, "GET /v2/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    extra.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut buf = [0u8; 1024];
    match extra.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("a connection beyond the cap was served: {other:?}"),
    }
    // Some downloads go away: the waiting connection is served, and so are new ones.
    held.truncate(CAP - 5);
    extra.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut resp = Vec::new();
    extra.read_to_end(&mut resp).expect("answer once a slot is free");
    assert_eq!(status_of(&resp), 200, "{}", String::from_utf8_lossy(&resp));
    let (status, took) = timed_get(&host, "/v2/load/big/tags/list");
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(1), "{took:?}");
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_body_fails_with_an_oci_error_and_frees_the_connection() {
    let server = TestServer::start_with(&[("STOWAGE_SERVER__BODY_IDLE_TIMEOUT_SECS", "2")]);
    let resp = common::client()
        .post(server.v2("load/up/blobs/uploads/"))
        .send()
        .await
        .expect("POST upload");
    assert_eq!(resp.status(), 202);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let path = location.strip_prefix(&server.url).unwrap_or(&location).to_owned();
    let host = server.host.clone();
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(&host).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(
            s,
            "PATCH {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n\
             Content-Length: 1048576\r\n\r\n"
        )
        .unwrap();
        s.write_all(&[1u8; 1000]).unwrap();
        let started = Instant::now();
        let mut resp = Vec::new();
        // The server answers and closes the connection: read to the end.
        s.read_to_end(&mut resp).expect("answer to a stalled PATCH");
        (resp, started.elapsed())
    })
    .await
    .unwrap();
    let (resp, took) = answer;
    let text = String::from_utf8_lossy(&resp);
    assert_eq!(status_of(&resp), 400, "{text}");
    assert!(
        text.contains("BLOB_UPLOAD_INVALID") && text.contains("no body data for 2 s"),
        "{text}"
    );
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "{took:?}"
    );
    // The registry still takes uploads.
    common::push_blob(&server, "load/up", b"after a stalled upload").await;
}

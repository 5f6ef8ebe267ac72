//! Operating Stowage: the `/livez` and `/readyz` probes (anonymous with authentication on;
//! `/readyz` turns 503 while the catalog cannot be written and while the server drains before
//! a stop), request ids in responses and in the access log, and read-only maintenance mode
//! (every write refused with 503 `UNAVAILABLE`, every read served), entered by configuration
//! and by `SIGUSR1`, left by `SIGUSR2`; and, on PostgreSQL, a server whose database sessions
//! were all cut (as a database restart or failover cuts them) answers the very next requests.

mod common;

use std::process::Command;

use common::sql::Value;
use common::{Catalog, STDERR_FILE_ENV, TestServer, client, push_blob, push_image, sha256, wait_until};

async fn status_of(url: &str) -> (u16, String) {
    let resp = client().get(url).send().await.expect("GET");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

fn signal(server: &TestServer, sig: &str) {
    let sent = Command::new("kill")
        .args([&format!("-{sig}"), &server.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -{sig}");
}

fn base(server: &TestServer) -> String {
    server.v2("").trim_end_matches("/v2/").to_owned()
}

#[tokio::test]
async fn probes_answer_without_credentials_with_auth_on() {
    let server = TestServer::start_with(&[("STOWAGE_AUTH__ENABLED", "true")]);
    let base = base(&server);
    assert_eq!(status_of(&server.v2("")).await.0, 401, "auth is on");
    assert_eq!(status_of(&format!("{base}/livez")).await, (200, "ok\n".to_owned()));
    assert_eq!(status_of(&format!("{base}/readyz")).await, (200, "ok\n".to_owned()));
    let head = client().head(format!("{base}/readyz")).send().await.expect("HEAD");
    assert_eq!(head.status(), 200);
}

/// A write lock held on the catalog from outside (as a stuck writer or a locked file would)
/// makes `/readyz` say the catalog cannot be written; releasing it makes it ready again. On
/// SQLite the lock is a `BEGIN IMMEDIATE` transaction on the file; on PostgreSQL the advisory
/// lock every write transaction of the server takes first (`WRITE_LOCK`), held here by a
/// session of its own (session-level, so it blocks the server's transaction-level one).
#[tokio::test]
async fn readyz_fails_while_the_catalog_cannot_be_written() {
    use stowage::catalog::postgres::WRITE_LOCK;
    let server = TestServer::start();
    let base = base(&server);
    assert_eq!(status_of(&format!("{base}/readyz")).await.0, 200);
    let holder = server.catalog_sql();
    match server.catalog {
        Catalog::Sqlite => holder.execute_batch("BEGIN IMMEDIATE"),
        Catalog::Postgres => {
            holder.execute("SELECT pg_advisory_lock(?1)", &[WRITE_LOCK.into()]);
        }
    }
    // The last answer is cached for a second; the check then waits up to 5 s for the writer.
    wait_until("readyz reports the catalog", || async {
        let (status, body) = status_of(&format!("{base}/readyz")).await;
        status == 503 && body.contains("catalog not writable")
    })
    .await;
    assert_eq!(status_of(&format!("{base}/livez")).await.0, 200, "alive all the same");
    match server.catalog {
        Catalog::Sqlite => holder.execute_batch("ROLLBACK"),
        Catalog::Postgres => {
            let released = holder.query_rows("SELECT pg_advisory_unlock(?1)", &[WRITE_LOCK.into()]);
            assert_eq!(released, [[Value::Int(1)]], "the lock was held");
        }
    }
    wait_until("readyz is ready again", || async {
        status_of(&format!("{base}/readyz")).await.0 == 200
    })
    .await;
    drop(holder);
}

/// After SIGTERM, `/readyz` answers 503 while requests are still served for
/// `server.shutdown_delay_secs`; then the server stops.
#[tokio::test]
async fn readyz_fails_while_draining_before_a_stop() {
    let mut server = TestServer::start_with(&[("STOWAGE_SERVER__SHUTDOWN_DELAY_SECS", "3")]);
    let base = base(&server);
    assert_eq!(status_of(&format!("{base}/readyz")).await.0, 200);
    let digest = push_blob(&server, "ops/drain", b"before the stop").await;
    server.signal_terminate();
    wait_until("readyz reports the stop", || async {
        status_of(&format!("{base}/readyz")).await == (503, "not ready: shutting down\n".to_owned())
    })
    .await;
    let resp = client()
        .get(server.v2(&format!("ops/drain/blobs/{digest}")))
        .send()
        .await
        .expect("GET while draining");
    assert_eq!(resp.status(), 200, "requests are still served while draining");
    let status = server.wait_exit();
    assert!(status.success(), "graceful stop: {status:?}");
}

/// Every response carries a request id (the client's, when it sent a sane one), and the access
/// log line of the request carries the same id, the route, the repository and the status.
#[tokio::test]
async fn request_ids_reach_the_response_and_the_access_log() {
    let log = tempfile::NamedTempFile::new().expect("log file");
    let log_path = log.path().to_str().expect("utf-8 path").to_owned();
    let server = TestServer::start_with(&[(STDERR_FILE_ENV, &log_path), ("RUST_LOG", "info")]);
    let digest = push_blob(&server, "ops/log", b"logged").await;
    let resp = client()
        .get(server.v2(&format!("ops/log/blobs/{digest}")))
        .header("X-Request-Id", "test-request-42")
        .send()
        .await
        .expect("GET blob");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "test-request-42");
    let resp = client()
        .get(server.v2("ops/log/manifests/missing"))
        .header("X-Request-Id", "bad id with spaces")
        .send()
        .await
        .expect("GET manifest");
    assert_eq!(resp.status(), 404);
    let generated = resp.headers()["x-request-id"].to_str().expect("ascii").to_owned();
    assert_eq!(generated.len(), 32, "a fresh id replaces an unusable one: {generated}");

    // Access lines are written by the log's own thread, a moment after the response.
    wait_until("both requests are in the access log", || async {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        text.contains("test-request-42") && text.contains(&generated)
    })
    .await;
    let text = std::fs::read_to_string(&log_path).expect("read log");
    let line = text
        .lines()
        .find(|l| l.contains("test-request-42") && l.contains("stowage::access"))
        .unwrap_or_else(|| panic!("no access line for the request in:\n{text}"));
    for part in [
        "method=GET",
        "route=/v2/{name}/blobs/{digest}",
        "repo=ops/log",
        "status=200",
        "bytes_out=6",
    ] {
        assert!(line.contains(part), "{part} missing from {line}");
    }
    assert!(
        text.lines().any(|l| l.contains(&generated) && l.contains("status=404")),
        "the generated id is logged:\n{text}"
    );
}

/// Read-only mode, from the configuration: pulls work, every kind of write is refused with
/// 503 `UNAVAILABLE` and a message, and the stored data is untouched.
#[tokio::test]
async fn read_only_mode_refuses_writes_and_serves_reads() {
    let mut server = TestServer::start();
    let (manifest, _) = push_image(&server, "ops/ro", "v1", b"stored before").await;
    let layer = push_blob(&server, "ops/ro", b"a blob").await;
    server.crash_and_restart_with(&[("STOWAGE_REGISTRY__READ_ONLY", "true")]);

    let http = client();
    let refused = [
        http.post(server.v2("ops/ro/blobs/uploads/")),
        http.post(server.v2(&format!("ops/ro/blobs/uploads/?digest={}", sha256(b"x"))))
            .body("x"),
        http.put(server.v2("ops/ro/manifests/v2"))
            .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            .body("{}"),
        http.delete(server.v2("ops/ro/manifests/v1")),
        http.delete(server.v2(&format!("ops/ro/blobs/{layer}"))),
    ];
    for req in refused {
        let resp = req.send().await.expect("write");
        assert_eq!(resp.status(), 503);
        let body: serde_json::Value = resp.json().await.expect("OCI error body");
        assert_eq!(body["errors"][0]["code"], "UNAVAILABLE", "{body}");
        assert!(
            body["errors"][0]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("read-only"),
            "{body}"
        );
    }
    for path in [
        "ops/ro/manifests/v1".to_owned(),
        format!("ops/ro/manifests/{manifest}"),
        format!("ops/ro/blobs/{layer}"),
        "ops/ro/tags/list".to_owned(),
    ] {
        let resp = http
            .get(server.v2(&path))
            .header("Accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await
            .expect("read");
        assert_eq!(resp.status(), 200, "{path} is served in read-only mode");
    }
    assert_eq!(status_of(&format!("{}/readyz", base(&server))).await.0, 200);
}

/// `SIGUSR1` enters read-only mode and `SIGUSR2` leaves it, without a restart.
#[tokio::test]
async fn signals_enter_and_leave_read_only_mode() {
    let server = TestServer::start();
    push_blob(&server, "ops/sig", b"writable").await;
    signal(&server, "USR1");
    wait_until("writes are refused", || async {
        let resp = client()
            .post(server.v2("ops/sig/blobs/uploads/"))
            .send()
            .await
            .expect("POST");
        resp.status() == 503
    })
    .await;
    signal(&server, "USR2");
    wait_until("writes are accepted", || async {
        let resp = client()
            .post(server.v2("ops/sig/blobs/uploads/"))
            .send()
            .await
            .expect("POST");
        resp.status() == 202
    })
    .await;
    push_blob(&server, "ops/sig", b"writable again").await;
}

/// Every session a server holds on its PostgreSQL database is terminated, as a database
/// restart or a failover ends them. The catalog threads only find out when they next use their
/// connection: a read or a write that finds its connection closed before it ran anything is
/// run again on a new one, so no request after the cut gets a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_its_database_sessions_are_cut_the_next_requests_are_served() {
    let server = TestServer::start_on_catalog(Catalog::Postgres, &[]);
    let (manifest, _) = push_image(&server, "cut/app", "v1", b"layer before the cut").await;
    let before = push_blob(&server, "cut/app", b"blob before the cut").await;
    let sql = server.catalog_sql();
    let ended = tokio::task::block_in_place(|| {
        sql.query_rows(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 10000))
               FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'stowage'",
            &[],
        )
    });
    // The writer, eight readers, the poller and the lock connection, at the least.
    let ended = ended[0][0].int();
    assert!(ended >= 10, "ended {ended} sessions");

    let http = client();
    for round in 0..24 {
        for url in [
            server.v2(&format!("cut/app/blobs/{before}")),
            server.v2("cut/app/tags/list"),
            server.v2(&format!("cut/app/manifests/{manifest}")),
        ] {
            let resp = http.get(&url).send().await.expect("GET");
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            assert_eq!(status, 200, "round {round}: GET {url}: {body}");
        }
    }
    let after = push_blob(&server, "cut/app", b"blob after the cut").await;
    let (_, body) = common::get_blob(&server, "cut/app", &after).await;
    assert_eq!(body, b"blob after the cut");
}

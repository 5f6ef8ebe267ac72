//! Robustness: malformed input of every kind is answered with a 4xx OCI error (never a 5xx, never
//! a crash), the server stays healthy, concurrent writers don't corrupt state, and everything
//! pushed survives a crash (SIGKILL) byte-exact.
mod common;

use std::time::Duration;

use common::{TestServer, client, push_blob, push_image, sha256};
use reqwest::{Method, Response};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

const SPEC_CODES: &[&str] = &[
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "TAG_INVALID",
    "MANIFEST_UNVERIFIED",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "TOOMANYREQUESTS",
];

fn header(resp: &Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().expect("ascii header").to_string())
}

/// Checks a JSON OCI error body: `errors[0].code` in `codes`.
fn check_error_body(what: &str, ct: &str, body: &[u8], codes: &[&str]) {
    let text = String::from_utf8_lossy(body);
    assert!(
        ct.starts_with("application/json"),
        "{what}: error Content-Type {ct:?} (body: {text})"
    );
    let v: Value =
        serde_json::from_slice(body).unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e}): {text}"));
    let code = v["errors"][0]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no errors[0].code in {text}"));
    assert!(
        codes.contains(&code),
        "{what}: errors[0].code {code:?} not in {codes:?} (body: {text})"
    );
}

/// Asserts `resp` is one of the `(status, codes)` alternatives, with a JSON OCI error body.
async fn assert_error_one_of(what: &str, resp: Response, alternatives: &[(u16, &[&str])]) {
    let status = resp.status().as_u16();
    let ct = header(&resp, "content-type").unwrap_or_default();
    let body = resp.bytes().await.expect("read body");
    let Some((_, codes)) = alternatives.iter().find(|(s, _)| *s == status) else {
        panic!(
            "{what}: status {status}, expected one of {alternatives:?} (body: {})",
            String::from_utf8_lossy(&body)
        );
    };
    check_error_body(what, &ct, &body, codes);
}

async fn assert_error(what: &str, resp: Response, status: u16, codes: &[&str]) {
    assert_error_one_of(what, resp, &[(status, codes)]).await;
}

/// The server answers the version check and still accepts a push.
async fn assert_healthy(server: &TestServer) {
    let resp = client()
        .get(server.v2(""))
        .send()
        .await
        .expect("server still reachable");
    assert_eq!(resp.status(), 200, "server healthy");
    push_blob(server, "health/check", b"still alive").await;
}

/// A parsed raw HTTP/1.1 response.
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(pos) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_line = String::from_utf8_lossy(&data[..pos]).to_string();
        let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16).unwrap_or(0);
        data = &data[pos + 2..];
        if size == 0 || data.len() < size {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
}

/// Sends raw bytes over a fresh TCP connection and reads until the server closes it. Returns
/// `None` when the server closed the connection without any response.
async fn raw_exchange(server: &TestServer, request: &[u8], shutdown_write: bool) -> Option<RawResponse> {
    let mut stream = TcpStream::connect(&server.host).await.expect("connect");
    // The server may answer and close before reading everything (e.g. an oversized request).
    let _ = stream.write_all(request).await;
    if shutdown_write {
        let _ = stream.shutdown().await;
    }
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "server neither answered nor closed the connection within 30 s"
    );
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status: u16 = status_line.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let mut body = buf[end + 4..].to_vec();
    let resp = RawResponse {
        status,
        headers,
        body: Vec::new(),
    };
    if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        body = dechunk(&body);
    }
    Some(RawResponse { body, ..resp })
}

async fn raw(server: &TestServer, request: &[u8]) -> RawResponse {
    raw_exchange(server, request, false).await.expect("a response")
}

fn request(method: &str, path: &str, extra_headers: &str, body: &[u8]) -> Vec<u8> {
    let mut r =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra_headers}\r\n").into_bytes();
    r.extend_from_slice(body);
    r
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(99);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn with_query(url: &str, kv: &str) -> String {
    if url.contains('?') {
        format!("{url}&{kv}")
    } else {
        format!("{url}?{kv}")
    }
}

fn location(server: &TestServer, resp: &Response) -> String {
    let loc = header(resp, "location").expect("Location");
    if loc.starts_with("http") {
        loc
    } else {
        format!("{}{loc}", server.url)
    }
}

async fn start_upload(server: &TestServer, repo: &str) -> String {
    let resp = client()
        .post(server.v2(&format!("{repo}/blobs/uploads/")))
        .header("Content-Length", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    location(server, &resp)
}

async fn put_manifest(server: &TestServer, repo: &str, reference: &str, content_type: &str, body: Vec<u8>) -> Response {
    client()
        .put(server.v2(&format!("{repo}/manifests/{reference}")))
        .header("Content-Type", content_type)
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn malformed_names_are_400_name_invalid_on_every_endpoint() {
    let server = TestServer::start();
    let d = sha256(b"x");
    let c = client();
    for name in [
        "UPPER", "a..b", "-lead", "trail-", "a___b", "a/_b", "a/b/C", "a.-b", "a%20b", "a%00b",
    ] {
        let cases: Vec<(Method, String)> = vec![
            (Method::GET, format!("{name}/tags/list")),
            (Method::GET, format!("{name}/manifests/latest")),
            (Method::PUT, format!("{name}/manifests/latest")),
            (Method::DELETE, format!("{name}/manifests/{d}")),
            (Method::GET, format!("{name}/blobs/{d}")),
            (Method::DELETE, format!("{name}/blobs/{d}")),
            (Method::POST, format!("{name}/blobs/uploads/")),
            (Method::GET, format!("{name}/referrers/{d}")),
        ];
        for (method, path) in cases {
            let resp = c
                .request(method.clone(), server.v2(&path))
                .body(Vec::new())
                .send()
                .await
                .unwrap();
            assert_error(&format!("{method} {path}"), resp, 400, &["NAME_INVALID"]).await;
        }
    }
    assert_healthy(&server).await;
}

#[tokio::test]
async fn malformed_manifest_references_are_rejected() {
    let server = TestServer::start();
    let (_, body) = push_image(&server, "rob/ref", "v1", b"l").await;
    let long = "a".repeat(5000);
    for reference in [
        "-x",
        ".x",
        "a+b",
        "sha256:",
        "sha256:zz",
        "md5:abc",
        "a:b:c",
        "%00",
        "%FF%FE",
        long.as_str(),
    ] {
        let resp = put_manifest(&server, "rob/ref", reference, OCI_MANIFEST, body.clone()).await;
        assert_error(
            &format!("PUT manifests/{reference}"),
            resp,
            400,
            &["TAG_INVALID", "MANIFEST_INVALID", "DIGEST_INVALID"],
        )
        .await;
        let resp = client()
            .get(server.v2(&format!("rob/ref/manifests/{reference}")))
            .send()
            .await
            .unwrap();
        assert_error_one_of(
            &format!("GET manifests/{reference}"),
            resp,
            &[
                (400, &["TAG_INVALID", "MANIFEST_INVALID", "DIGEST_INVALID"]),
                (404, &["MANIFEST_UNKNOWN"]),
            ],
        )
        .await;
        let resp = client()
            .delete(server.v2(&format!("rob/ref/manifests/{reference}")))
            .send()
            .await
            .unwrap();
        assert_error_one_of(
            &format!("DELETE manifests/{reference}"),
            resp,
            &[
                (400, &["TAG_INVALID", "MANIFEST_INVALID", "DIGEST_INVALID"]),
                (404, &["MANIFEST_UNKNOWN"]),
            ],
        )
        .await;
    }
    assert_healthy(&server).await;
}

#[tokio::test]
async fn malformed_digests_in_upload_queries_are_400_digest_invalid() {
    let server = TestServer::start();
    let c = client();
    for bad in [
        "",
        "garbage",
        "sha256:",
        "sha256:xyz",
        "sha256:abc",
        "sha256%3Aabc",
        "sha999:abcd",
    ] {
        let resp = c
            .post(server.v2(&format!("rob/dig/blobs/uploads/?digest={bad}")))
            .body(b"data".to_vec())
            .send()
            .await
            .unwrap();
        assert_error(&format!("POST ?digest={bad}"), resp, 400, &["DIGEST_INVALID"]).await;
        let url = start_upload(&server, "rob/dig").await;
        let resp = c
            .put(with_query(&url, &format!("digest={bad}")))
            .body(b"data".to_vec())
            .send()
            .await
            .unwrap();
        assert_error(&format!("PUT ?digest={bad}"), resp, 400, &["DIGEST_INVALID"]).await;
    }
    assert_healthy(&server).await;
}

#[tokio::test]
async fn malformed_mount_digest_is_rejected_or_falls_back_to_upload() {
    let server = TestServer::start();
    for bad in ["garbage", "sha256:xyz"] {
        let resp = client()
            .post(server.v2(&format!("rob/mount/blobs/uploads/?mount={bad}&from=rob/src")))
            .header("Content-Length", "0")
            .send()
            .await
            .unwrap();
        if resp.status() == 202 {
            assert!(header(&resp, "location").is_some());
        } else {
            assert_error(&format!("mount={bad}"), resp, 400, &["DIGEST_INVALID"]).await;
        }
    }
    // Malformed `from` with a valid digest.
    let resp = client()
        .post(server.v2(&format!(
            "rob/mount/blobs/uploads/?mount={}&from=BAD..NAME",
            sha256(b"x")
        )))
        .header("Content-Length", "0")
        .send()
        .await
        .unwrap();
    if resp.status() == 202 {
        assert!(header(&resp, "location").is_some());
    } else {
        assert_error("from=BAD..NAME", resp, 400, &["NAME_INVALID"]).await;
    }
    assert_healthy(&server).await;
}

#[tokio::test]
async fn malformed_content_range_is_rejected_and_session_unchanged() {
    let server = TestServer::start();
    let url = start_upload(&server, "rob/cr").await;
    for range in [
        "abc",
        "-4",
        "0-",
        "0-4x",
        "4-0",
        "0--4",
        "0-3",
        "0-9",
        "99999999999999999999-99999999999999999999",
        "0-18446744073709551615",
        "18446744073709551615-0",
    ] {
        let resp = client()
            .patch(&url)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", range)
            .body(b"hello".to_vec())
            .send()
            .await
            .unwrap();
        assert_error_one_of(
            &format!("PATCH Content-Range: {range}"),
            resp,
            &[
                (400, &["BLOB_UPLOAD_INVALID", "SIZE_INVALID"]),
                (416, &["BLOB_UPLOAD_INVALID", "SIZE_INVALID"]),
            ],
        )
        .await;
        // Nothing was appended.
        let resp = client().get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 204, "session survives a rejected chunk ({range})");
        assert_eq!(
            header(&resp, "range").as_deref(),
            Some("0-0"),
            "no bytes committed after {range}"
        );
    }
    // The session still completes correctly.
    let resp = client()
        .patch(&url)
        .header("Content-Range", "0-4")
        .body(b"hello".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let url = location(&server, &resp);
    let digest = sha256(b"hello");
    let resp = client()
        .put(with_query(&url, &format!("digest={digest}")))
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_healthy(&server).await;
}

#[tokio::test]
async fn malformed_and_overflowing_blob_ranges_never_fail_the_server() {
    let server = TestServer::start();
    let data = b"0123456789";
    let digest = push_blob(&server, "rob/range", data).await;
    for range in [
        "bytes=99999999999999999999-",
        "bytes=0-99999999999999999999",
        "bytes=-99999999999999999999",
        "bytes=18446744073709551615-18446744073709551615",
        "bytes=18446744073709551615-",
        "bytes=-18446744073709551615",
        "bytes=0-1,3-4",
        "bytes=0-1,,",
        "bytes=-0",
        "bytes=é-ü",
        "bytes=0-1 garbage",
    ] {
        let resp = client()
            .get(server.v2(&format!("rob/range/blobs/{digest}")))
            .header("Range", range)
            .send()
            .await
            .unwrap();
        match resp.status().as_u16() {
            200 => assert_eq!(
                resp.bytes().await.unwrap().as_ref(),
                data,
                "{range}: 200 must be the whole blob"
            ),
            206 => {
                let cr = header(&resp, "content-range").unwrap_or_default();
                let ct = header(&resp, "content-type").unwrap_or_default();
                assert!(
                    cr.starts_with("bytes ") || ct.starts_with("multipart/byteranges"),
                    "{range}: 206 {cr:?} {ct:?}"
                );
            }
            416 => {
                let ct = header(&resp, "content-type").unwrap_or_default();
                let body = resp.bytes().await.unwrap();
                check_error_body(range, &ct, &body, SPEC_CODES);
            }
            s => panic!("Range {range:?} -> {s}"),
        }
    }
    assert_healthy(&server).await;
}

#[tokio::test]
async fn odd_paths_are_4xx_with_error_body() {
    let server = TestServer::start();
    push_image(&server, "rob/paths", "v1", b"l").await;
    let c = client();
    for path in [
        "%FF%FE/tags/list",
        "rob/paths%00/tags/list",
        "rob/paths/blobs/..%2F..%2Fcatalog.db",
        "rob/paths/blobs/sha256:..%2F..%2F..%2Fetc%2Fpasswd",
        "rob/paths/manifests/..%2F..%2Fx",
        "rob/paths/blobs/uploads/..%2F..%2Fx",
        "rob/paths/blobs/uploads/%FF",
        "rob/paths/tags/list/extra",
        "rob/paths/manifests/",
        "rob/paths/blobs/",
        "rob/paths/referrers/",
        "/tags/list",
    ] {
        let resp = c.get(server.v2(path)).send().await.unwrap();
        let status = resp.status().as_u16();
        assert!((400..500).contains(&status), "GET /v2/{path} -> {status}");
        let ct = header(&resp, "content-type").unwrap_or_default();
        let body = resp.bytes().await.unwrap();
        check_error_body(path, &ct, &body, SPEC_CODES);
    }
    assert_healthy(&server).await;
}

#[tokio::test]
async fn raw_path_traversal_and_invalid_bytes_are_rejected() {
    let server = TestServer::start();
    push_image(&server, "rob/raw", "v1", b"l").await;
    let mut targets: Vec<Vec<u8>> = vec![
        b"/v2/../../../../etc/passwd".to_vec(),
        b"/v2/rob/raw/../../../../etc/passwd/tags/list".to_vec(),
        b"/v2/rob/raw/blobs/../../../catalog.db".to_vec(),
        b"/v2/rob/raw/blobs/sha256:../../../catalog.db".to_vec(),
        b"/v2/./rob/raw/tags/list/..".to_vec(),
    ];
    let mut invalid = b"/v2/rob/".to_vec();
    invalid.extend_from_slice(&[0xFF, 0xFE, 0x80]);
    invalid.extend_from_slice(b"/tags/list");
    targets.push(invalid);
    for target in targets {
        let mut req = b"GET ".to_vec();
        req.extend_from_slice(&target);
        req.extend_from_slice(b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let resp = raw(&server, &req).await;
        let shown = String::from_utf8_lossy(&target);
        assert!((400..500).contains(&resp.status), "GET {shown} -> {}", resp.status);
        if !resp.body.is_empty() && resp.status != 400 {
            check_error_body(
                &shown,
                resp.header("content-type").unwrap_or(""),
                &resp.body,
                SPEC_CODES,
            );
        }
    }
    assert_healthy(&server).await;
}

#[tokio::test]
async fn unknown_http_method_is_rejected() {
    let server = TestServer::start();
    for method in ["BREW", "PROPFIND", "TRACE"] {
        let resp = raw(&server, &request(method, "/v2/", "", b"")).await;
        assert!(
            [400, 404, 405, 501].contains(&resp.status),
            "{method} /v2/ -> {}",
            resp.status
        );
    }
    assert_healthy(&server).await;
}

#[tokio::test]
async fn bad_pagination_parameters_are_4xx_or_clamped() {
    let server = TestServer::start();
    push_image(&server, "rob/pages", "v1", b"l").await;
    let long_last = "z".repeat(10_000);
    let queries: Vec<String> = vec![
        "n=-1".into(),
        "n=abc".into(),
        "n=1.5".into(),
        "n=99999999999999999999999999".into(),
        "n=18446744073709551615".into(),
        "n=9223372036854775807".into(),
        "n=4294967295".into(),
        "n=%FF".into(),
        "n=1&n=2".into(),
        format!("last={long_last}"),
        "last=%FF%FE".into(),
    ];
    for base in ["rob/pages/tags/list", "_catalog"] {
        for q in &queries {
            let resp = client().get(format!("{}?{q}", server.v2(base))).send().await.unwrap();
            let status = resp.status().as_u16();
            let shown = format!("{base}?{}", &q[..q.len().min(40)]);
            match status {
                200 => {
                    let v: Value = resp.json().await.unwrap();
                    let key = if base == "_catalog" { "repositories" } else { "tags" };
                    assert!(v[key].is_array(), "{shown}: {v}");
                }
                400 => {
                    let ct = header(&resp, "content-type").unwrap_or_default();
                    let body = resp.bytes().await.unwrap();
                    check_error_body(&shown, &ct, &body, SPEC_CODES);
                }
                s => panic!("{shown} -> {s}"),
            }
        }
        // Negative and non-numeric n are never silently accepted as something else.
        for q in ["n=-1", "n=abc"] {
            let resp = client().get(format!("{}?{q}", server.v2(base))).send().await.unwrap();
            assert_eq!(resp.status(), 400, "{base}?{q}");
        }
    }
    // Huge n returns everything (no overflow when computing n+1).
    let resp = client()
        .get(server.v2("rob/pages/tags/list?n=18446744073709551615"))
        .send()
        .await
        .unwrap();
    if resp.status() == 200 {
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["tags"], json!(["v1"]));
    }
    assert_healthy(&server).await;
}

#[tokio::test]
async fn post_with_digest_and_no_body_headers_is_rejected() {
    // No Content-Length and no Transfer-Encoding: the body is empty.
    let server = TestServer::start();
    let digest = sha256(b"hello");
    let resp = raw(
        &server,
        &request("POST", &format!("/v2/rob/nocl/blobs/uploads/?digest={digest}"), "", b""),
    )
    .await;
    assert!([400, 411].contains(&resp.status), "-> {}", resp.status);
    check_error_body(
        "POST without Content-Length",
        resp.header("content-type").unwrap_or(""),
        &resp.body,
        &["DIGEST_INVALID", "SIZE_INVALID", "BLOB_UPLOAD_INVALID"],
    );
    let resp = client()
        .get(server.v2(&format!("rob/nocl/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_healthy(&server).await;
}

#[tokio::test]
async fn manifest_put_without_body_is_400_manifest_invalid() {
    let server = TestServer::start();
    let resp = raw(
        &server,
        &request(
            "PUT",
            "/v2/rob/nobody/manifests/v1",
            &format!("Content-Type: {OCI_MANIFEST}\r\n"),
            b"",
        ),
    )
    .await;
    assert!([400, 411].contains(&resp.status), "-> {}", resp.status);
    check_error_body(
        "PUT manifest without body",
        resp.header("content-type").unwrap_or(""),
        &resp.body,
        &["MANIFEST_INVALID", "SIZE_INVALID"],
    );
    assert_healthy(&server).await;
}

#[tokio::test]
async fn chunked_transfer_encoding_uploads_are_accepted() {
    let server = TestServer::start();
    let data = pattern(100_000, 1);
    let digest = sha256(&data);
    let pieces: Vec<Result<bytes::Bytes, std::io::Error>> = data
        .chunks(9_999)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    let resp = client()
        .post(server.v2(&format!("rob/te/blobs/uploads/?digest={digest}")))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(pieces)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let resp = client()
        .get(server.v2(&format!("rob/te/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.bytes().await.unwrap().as_ref(), data.as_slice());
}

#[tokio::test]
async fn truncated_upload_body_does_not_create_blob() {
    let server = TestServer::start();
    let data = pattern(1000, 2);
    let digest = sha256(&data);
    // Announce 1000 bytes, send 400, then close.
    let req = request(
        "POST",
        &format!("/v2/rob/trunc/blobs/uploads/?digest={digest}"),
        "Content-Length: 1000\r\nContent-Type: application/octet-stream\r\n",
        &data[..400],
    );
    if let Some(resp) = raw_exchange(&server, &req, true).await {
        assert!((400..500).contains(&resp.status), "truncated body -> {}", resp.status);
    }
    // The same through a session PUT.
    let url = start_upload(&server, "rob/trunc").await;
    let path = url.strip_prefix(&server.url).unwrap().to_string();
    let req = request(
        "PUT",
        &with_query(&path, &format!("digest={digest}")),
        "Content-Length: 1000\r\n",
        &data[..400],
    );
    if let Some(resp) = raw_exchange(&server, &req, true).await {
        assert!((400..500).contains(&resp.status), "truncated PUT -> {}", resp.status);
    }
    // And a truncated manifest.
    let req = request(
        "PUT",
        "/v2/rob/trunc/manifests/v1",
        "Content-Length: 5000\r\n",
        b"{\"schemaVersion\":2",
    );
    if let Some(resp) = raw_exchange(&server, &req, true).await {
        assert!(
            (400..500).contains(&resp.status),
            "truncated manifest -> {}",
            resp.status
        );
    }
    let resp = client()
        .get(server.v2(&format!("rob/trunc/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404, "a truncated upload must not become a blob");
    let resp = client().get(server.v2("rob/trunc/manifests/v1")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_healthy(&server).await;
}

#[tokio::test]
async fn oversized_chunked_manifest_is_413() {
    let server = TestServer::start();
    let big = vec![b' '; 5 * 1024 * 1024];
    let pieces: Vec<Result<bytes::Bytes, std::io::Error>> = big
        .chunks(64 * 1024)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    let resp = client()
        .put(server.v2("rob/huge/manifests/v1"))
        .header("Content-Type", OCI_MANIFEST)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(pieces)))
        .send()
        .await;
    // The server may answer early and close; reqwest then reports a send error.
    if let Ok(resp) = resp {
        assert_error(
            "5 MiB chunked manifest",
            resp,
            413,
            &["MANIFEST_INVALID", "SIZE_INVALID"],
        )
        .await;
    }
    assert_healthy(&server).await;
}

/// A manifest body that breaks off mid-way (a malformed chunk) is a bad manifest, not a bad
/// blob upload, and not a server error.
#[tokio::test]
async fn malformed_chunked_manifest_body_is_400_manifest_invalid() {
    let server = TestServer::start();
    let req = request(
        "PUT",
        "/v2/rob/cut/manifests/v1",
        &format!("Content-Type: {OCI_MANIFEST}\r\nTransfer-Encoding: chunked\r\n"),
        b"5\r\n{\"sch\r\nzz-not-a-chunk-size\r\n",
    );
    // The server may also just close a connection whose framing is broken.
    if let Some(resp) = raw_exchange(&server, &req, true).await {
        assert_eq!(resp.status, 400, "{}", String::from_utf8_lossy(&resp.body));
        let body: serde_json::Value = serde_json::from_slice(&resp.body).expect("OCI error JSON");
        assert_eq!(body["errors"][0]["code"], "MANIFEST_INVALID", "{body}");
    }
    let resp = client()
        .get(server.v2("rob/cut/manifests/v1"))
        .header("Accept", OCI_MANIFEST)
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 404, "nothing was stored");
    assert_healthy(&server).await;
}

#[tokio::test]
async fn deeply_nested_json_manifest_is_400_manifest_invalid() {
    let server = TestServer::start();
    let depth = 100_000;
    let mut body = Vec::with_capacity(depth * 2 + 40);
    body.extend_from_slice(b"{\"schemaVersion\":2,\"x\":");
    body.extend(std::iter::repeat_n(b'[', depth));
    body.extend(std::iter::repeat_n(b']', depth));
    body.push(b'}');
    let resp = put_manifest(&server, "rob/deep", "v1", OCI_MANIFEST, body).await;
    assert_error("deep JSON", resp, 400, &["MANIFEST_INVALID"]).await;
    assert_healthy(&server).await;
}

#[tokio::test]
async fn type_confused_manifests_are_400_manifest_invalid() {
    let server = TestServer::start();
    let config = br#"{"os":"linux"}"#;
    let cd = push_blob(&server, "rob/types", config).await;
    let good_config =
        json!({"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()});
    let cases = vec![
        json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": good_config, "layers": "nope"}),
        json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": [], "layers": []}),
        json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"mediaType": "x/y", "digest": cd, "size": -1}, "layers": []}),
        json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"mediaType": "x/y", "digest": cd, "size": "14"}, "layers": []}),
        json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"mediaType": "x/y", "digest": 5, "size": 14}, "layers": []}),
        json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"mediaType": "x/y", "size": 14}, "layers": []}),
        json!({"schemaVersion": 2, "mediaType": 7, "config": good_config, "layers": []}),
        json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": good_config, "layers": [null]}),
        json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": good_config, "layers": [], "subject": "sha256:abc"}),
        json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": good_config, "layers": [], "annotations": [1]}),
        json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": {}}),
        json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [{"mediaType": OCI_MANIFEST, "digest": "bad", "size": 1}]}),
        json!({"schemaVersion": 2.5, "mediaType": OCI_MANIFEST, "config": good_config, "layers": []}),
        json!({"schemaVersion": 18446744073709551615u64, "mediaType": OCI_MANIFEST, "config": good_config, "layers": []}),
    ];
    for (i, case) in cases.into_iter().enumerate() {
        let ct = case["mediaType"].as_str().unwrap_or(OCI_MANIFEST).to_string();
        let resp = put_manifest(
            &server,
            "rob/types",
            &format!("case{i}"),
            &ct,
            serde_json::to_vec(&case).unwrap(),
        )
        .await;
        assert_error(
            &format!("case {i}: {case}"),
            resp,
            400,
            &["MANIFEST_INVALID", "DIGEST_INVALID"],
        )
        .await;
    }
    let malformed_digest = json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "x/y", "digest": "sha256:nothex", "size": 14}, "layers": [],
    });
    let resp = put_manifest(
        &server,
        "rob/types",
        "digest",
        OCI_MANIFEST,
        serde_json::to_vec(&malformed_digest).unwrap(),
    )
    .await;
    assert_error(
        "malformed config digest",
        resp,
        400,
        &["MANIFEST_INVALID", "DIGEST_INVALID"],
    )
    .await;
    assert_healthy(&server).await;
}

#[tokio::test]
async fn oversized_request_line_and_headers_are_rejected() {
    let server = TestServer::start();
    let long_name = "a".repeat(100_000);
    let resp = raw_exchange(
        &server,
        &request("GET", &format!("/v2/{long_name}/tags/list"), "", b""),
        false,
    )
    .await;
    if let Some(resp) = resp {
        assert!((400..500).contains(&resp.status), "100 KB path -> {}", resp.status);
    }
    let big_header = format!("X-Junk: {}\r\n", "j".repeat(200_000));
    let resp = raw_exchange(&server, &request("GET", "/v2/", &big_header, b""), false).await;
    if let Some(resp) = resp {
        assert!((400..500).contains(&resp.status), "200 KB header -> {}", resp.status);
    }
    assert_healthy(&server).await;
}

#[tokio::test]
async fn concurrent_pushes_of_the_same_blob_all_succeed() {
    let server = TestServer::start();
    let data = pattern(300_000, 3);
    let digest = sha256(&data);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let url = server.v2(&format!("rob/race{}/blobs/uploads/?digest={digest}", i % 2));
        let data = data.clone();
        tasks.push(tokio::spawn(async move {
            client().post(url).body(data).send().await.unwrap().status().as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 201);
    }
    for repo in ["rob/race0", "rob/race1"] {
        let resp = client()
            .get(server.v2(&format!("{repo}/blobs/{digest}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.bytes().await.unwrap().as_ref(), data.as_slice());
    }
}

#[tokio::test]
async fn concurrent_patches_to_one_session_do_not_corrupt_it() {
    let server = TestServer::start();
    let url = start_upload(&server, "rob/patchrace").await;
    let mut tasks = Vec::new();
    for i in 0..4u8 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let resp = client()
                .patch(url)
                .header("Content-Range", "0-999")
                .body(vec![i; 1000])
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let loc = resp.headers().get("location").map(|v| v.to_str().unwrap().to_string());
            let body = resp.bytes().await.unwrap();
            (i, status, loc, body)
        }));
    }
    let mut winner = None;
    for t in tasks {
        let (i, status, loc, body) = t.await.unwrap();
        match status {
            202 => {
                assert!(winner.is_none(), "two PATCHes at offset 0 both accepted");
                winner = Some((i, loc.unwrap()));
            }
            400 | 409 | 416 => check_error_body(
                "losing PATCH",
                "application/json",
                &body,
                &["BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN"],
            ),
            s => panic!("concurrent PATCH -> {s}: {}", String::from_utf8_lossy(&body)),
        }
    }
    let (i, loc) = winner.expect("one PATCH wins");
    let data = vec![i; 1000];
    let url = if loc.starts_with("http") {
        loc
    } else {
        format!("{}{loc}", server.url)
    };
    let resp = client()
        .put(with_query(&url, &format!("digest={}", sha256(&data))))
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let resp = client()
        .get(server.v2(&format!("rob/patchrace/blobs/{}", sha256(&data))))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.bytes().await.unwrap().as_ref(), data.as_slice());
}

#[tokio::test]
async fn concurrent_manifest_puts_to_one_tag_leave_a_consistent_tag() {
    let server = TestServer::start();
    let mut bodies = Vec::new();
    for i in 0..6 {
        let (_, body) = push_image(
            &server,
            "rob/tagrace",
            &format!("seed{i}"),
            format!("layer {i}").as_bytes(),
        )
        .await;
        bodies.push(body);
    }
    let mut tasks = Vec::new();
    for body in bodies.clone() {
        let url = server.v2("rob/tagrace/manifests/latest");
        tasks.push(tokio::spawn(async move {
            client()
                .put(url)
                .header("Content-Type", OCI_MANIFEST)
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 201);
    }
    let resp = client()
        .get(server.v2("rob/tagrace/manifests/latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let digest = header(&resp, "docker-content-digest").unwrap();
    let got = resp.bytes().await.unwrap();
    assert_eq!(sha256(&got), digest);
    assert!(
        bodies.iter().any(|b| b.as_slice() == got.as_ref()),
        "latest points to one of the pushed manifests"
    );
}

#[tokio::test]
async fn everything_survives_a_crash_byte_exact() {
    let mut server = TestServer::start();
    let (d1, m1) = push_image(&server, "dur/app", "v1", b"first layer").await;
    let (d2, m2) = push_image(&server, "dur/app", "v2", b"second layer").await;
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": d1, "size": m1.len()},
            {"mediaType": OCI_MANIFEST, "digest": d2, "size": m2.len()},
        ],
    }))
    .unwrap();
    let resp = put_manifest(&server, "dur/app", "multi", OCI_INDEX, index.clone()).await;
    assert_eq!(resp.status(), 201);

    // A chunked blob in another repository.
    let big = pattern(3 * 1024 * 1024 + 17, 4);
    let big_digest = sha256(&big);
    let url = start_upload(&server, "dur/other").await;
    let resp = client()
        .patch(&url)
        .header("Content-Range", format!("0-{}", 2 * 1024 * 1024 - 1))
        .body(big[..2 * 1024 * 1024].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let url = location(&server, &resp);
    let resp = client()
        .put(with_query(&url, &format!("digest={big_digest}")))
        .body(big[2 * 1024 * 1024..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);

    // A deleted tag stays deleted.
    let resp = put_manifest(&server, "dur/app", "gone", OCI_MANIFEST, m1.clone()).await;
    assert_eq!(resp.status(), 201);
    let resp = client()
        .delete(server.v2("dur/app/manifests/gone"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);

    server.crash_and_restart();

    for (reference, body, ct) in [
        ("v1", &m1, OCI_MANIFEST),
        (d1.as_str(), &m1, OCI_MANIFEST),
        ("v2", &m2, OCI_MANIFEST),
        ("multi", &index, OCI_INDEX),
    ] {
        let resp = client()
            .get(server.v2(&format!("dur/app/manifests/{reference}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "manifest {reference} after crash");
        assert_eq!(header(&resp, "content-type").as_deref(), Some(ct));
        assert_eq!(header(&resp, "docker-content-digest"), Some(sha256(body)));
        assert_eq!(
            resp.bytes().await.unwrap().as_ref(),
            body.as_slice(),
            "{reference} byte-exact"
        );
    }
    let resp = client().get(server.v2("dur/app/manifests/gone")).send().await.unwrap();
    assert_eq!(resp.status(), 404, "deleted tag stays deleted");
    let resp = client()
        .get(server.v2(&format!("dur/other/blobs/{big_digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        sha256(&resp.bytes().await.unwrap()),
        big_digest,
        "chunked blob byte-exact after crash"
    );
    let m1v: Value = serde_json::from_slice(&m1).unwrap();
    for d in [
        m1v["config"]["digest"].as_str().unwrap(),
        m1v["layers"][0]["digest"].as_str().unwrap(),
    ] {
        let resp = client()
            .get(server.v2(&format!("dur/app/blobs/{d}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(sha256(&resp.bytes().await.unwrap()), d);
    }
    let resp = client().get(server.v2("dur/app/tags/list")).send().await.unwrap();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["tags"], json!(["multi", "v1", "v2"]));
    let resp = client().get(server.v2("_catalog")).send().await.unwrap();
    let v: Value = resp.json().await.unwrap();
    assert!(v["repositories"].as_array().unwrap().contains(&json!("dur/app")), "{v}");

    // And the registry keeps working on the recovered state.
    push_image(&server, "dur/app", "v3", b"third layer").await;
    assert_healthy(&server).await;
}

#[tokio::test]
async fn half_finished_upload_before_crash_does_not_make_blob_visible() {
    let mut server = TestServer::start();
    let data = pattern(10_000, 5);
    let digest = sha256(&data);
    let url = start_upload(&server, "dur/half").await;
    let resp = client()
        .patch(&url)
        .header("Content-Range", "0-4999")
        .body(data[..5000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let path = location(&server, &resp).strip_prefix(&server.url).unwrap().to_string();

    server.crash_and_restart();

    let resp = client()
        .get(server.v2(&format!("dur/half/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_error("blob after crash", resp, 404, &["BLOB_UNKNOWN", "NAME_UNKNOWN"]).await;
    // The session is either gone or resumable from what was durably stored: on local disk
    // exactly where it was; on S3 with SQLite from the last whole part (here none: the 5,000
    // bytes were still in memory); on S3 with PostgreSQL (sessions shared by replicas, whose
    // tail goes to its tail object at the end of every request) exactly where it was. The
    // client learns which from the status's `Range`.
    let url = format!("{}{path}", server.url);
    let resp = client().get(&url).send().await.unwrap();
    match resp.status().as_u16() {
        404 => assert_error("session after crash", resp, 404, &["BLOB_UPLOAD_UNKNOWN"]).await,
        204 => {
            let range = header(&resp, "range");
            let expected = match (server.backend, server.catalog) {
                (common::Backend::S3, common::Catalog::Sqlite) => "0-0",
                _ => "0-4999",
            };
            assert_eq!(range.as_deref(), Some(expected));
            let offset = if expected == "0-0" { 0 } else { 5000 };
            let resp = client()
                .patch(&url)
                .header("Content-Range", format!("{offset}-9999"))
                .body(data[offset..].to_vec())
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 202);
            let url = location(&server, &resp);
            let resp = client()
                .put(with_query(&url, &format!("digest={digest}")))
                .body(Vec::new())
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 201);
            let resp = client()
                .get(server.v2(&format!("dur/half/blobs/{digest}")))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.bytes().await.unwrap().as_ref(), data.as_slice());
        }
        s => panic!("session after crash -> {s}"),
    }
    assert_healthy(&server).await;
}

#[tokio::test]
async fn rejected_upload_before_crash_stays_invisible() {
    let mut server = TestServer::start();
    let claimed = sha256(b"claimed");
    let resp = client()
        .post(server.v2(&format!("dur/rejected/blobs/uploads/?digest={claimed}")))
        .body(b"actual".to_vec())
        .send()
        .await
        .unwrap();
    assert_error("wrong digest", resp, 400, &["DIGEST_INVALID"]).await;
    server.crash_and_restart();
    for d in [claimed, sha256(b"actual")] {
        let resp = client()
            .get(server.v2(&format!("dur/rejected/blobs/{d}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404);
    }
    assert_healthy(&server).await;
}

#[tokio::test]
async fn repeated_crashes_keep_data() {
    let mut server = TestServer::start();
    let mut pushed = Vec::new();
    for round in 0..3 {
        let (digest, body) = push_image(
            &server,
            "dur/rounds",
            &format!("r{round}"),
            format!("layer {round}").as_bytes(),
        )
        .await;
        pushed.push((format!("r{round}"), digest, body));
        server.crash_and_restart();
        for (tag, digest, body) in &pushed {
            let resp = client()
                .get(server.v2(&format!("dur/rounds/manifests/{tag}")))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200, "{tag} after crash {round}");
            assert_eq!(header(&resp, "docker-content-digest").as_ref(), Some(digest));
            assert_eq!(resp.bytes().await.unwrap().as_ref(), body.as_slice());
        }
    }
}

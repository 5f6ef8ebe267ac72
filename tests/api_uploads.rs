//! Blob uploads: single POST (end-4b), POST+PUT (end-4a, end-6), chunked PATCH (end-5), upload
//! status (end-13), cancel, cross-repository mount (end-11), and de-duplication.
mod common;

use common::oci::{assert_error, header, sha512};

use bytes::Bytes;
use common::{TestServer, client, push_blob, sha256};
use reqwest::Response;

/// Absolute URL for a `Location` header value (relative per the contract, absolute allowed).
fn absolute(server: &TestServer, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        location.to_string()
    } else {
        format!("{}{location}", server.url)
    }
}

fn location(server: &TestServer, resp: &Response) -> String {
    absolute(server, &header(resp, "location").expect("Location header"))
}

/// Appends a query parameter to a URL that may already have a query string.
fn with_query(url: &str, kv: &str) -> String {
    if url.contains('?') {
        format!("{url}&{kv}")
    } else {
        format!("{url}?{kv}")
    }
}

/// Starts an upload session (`POST` with `Content-Length: 0`) and returns its absolute URL.
async fn start_upload(server: &TestServer, repo: &str) -> String {
    let resp = client()
        .post(server.v2(&format!("{repo}/blobs/uploads/")))
        .header("Content-Length", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202, "POST upload session");
    location(server, &resp)
}

async fn patch_chunk(url: &str, range: Option<&str>, data: &[u8]) -> Response {
    let mut req = client()
        .patch(url)
        .header("Content-Type", "application/octet-stream")
        .body(data.to_vec());
    if let Some(range) = range {
        req = req.header("Content-Range", range);
    }
    req.send().await.unwrap()
}

async fn get_blob(server: &TestServer, repo: &str, digest: &str) -> Response {
    client()
        .get(server.v2(&format!("{repo}/blobs/{digest}")))
        .send()
        .await
        .unwrap()
}

async fn assert_blob(server: &TestServer, repo: &str, digest: &str, data: &[u8]) {
    let resp = get_blob(server, repo, digest).await;
    assert_eq!(resp.status(), 200, "GET {repo}@{digest}");
    assert_eq!(header(&resp, "docker-content-digest").as_deref(), Some(digest));
    let body = resp.bytes().await.unwrap();
    assert_eq!(body.len(), data.len(), "blob length");
    assert!(body.as_ref() == data, "blob bytes differ");
}

async fn assert_no_blob(server: &TestServer, repo: &str, digest: &str) {
    let resp = get_blob(server, repo, digest).await;
    assert_error(resp, 404, &["BLOB_UNKNOWN"]).await;
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn single_post_with_digest_creates_blob() {
    let server = TestServer::start();
    let data = b"single post body";
    let digest = sha256(data);
    let resp = client()
        .post(server.v2(&format!("up/single/blobs/uploads/?digest={digest}")))
        .header("Content-Type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(header(&resp, "docker-content-digest").as_deref(), Some(digest.as_str()));
    let blob_url = location(&server, &resp);
    let resp = client().get(&blob_url).send().await.unwrap();
    assert_eq!(resp.status(), 200, "Location {blob_url} is a pullable blob URL");
    assert_eq!(resp.bytes().await.unwrap().as_ref(), data);
    assert_blob(&server, "up/single", &digest, data).await;
}

#[tokio::test]
async fn single_post_with_wrong_digest_is_400_and_blob_not_visible() {
    let server = TestServer::start();
    let claimed = sha256(b"claimed");
    let resp = client()
        .post(server.v2(&format!("up/single/blobs/uploads/?digest={claimed}")))
        .body(b"actual".to_vec())
        .send()
        .await
        .unwrap();
    assert_error(resp, 400, &["DIGEST_INVALID"]).await;
    assert_no_blob(&server, "up/single", &claimed).await;
    assert_no_blob(&server, "up/single", &sha256(b"actual")).await;
}

#[tokio::test]
async fn post_starts_session_with_relative_location_and_uuid() {
    let server = TestServer::start();
    let resp = client()
        .post(server.v2("up/session/blobs/uploads/"))
        .header("Content-Length", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let uuid = header(&resp, "docker-upload-uuid").expect("Docker-Upload-UUID header");
    assert!(!uuid.is_empty());
    let loc = header(&resp, "location").expect("Location");
    assert!(
        loc.starts_with("/v2/up/session/blobs/uploads/"),
        "relative Location {loc}"
    );
    // The Location and Docker-Upload-UUID name the same session (hyphenation aside).
    assert!(
        loc.replace('-', "").contains(&uuid.replace('-', "")),
        "Location {loc} contains the session id {uuid}"
    );
    // Two sessions get different ids.
    let resp2 = client()
        .post(server.v2("up/session/blobs/uploads/"))
        .header("Content-Length", "0")
        .send()
        .await
        .unwrap();
    assert_ne!(header(&resp2, "docker-upload-uuid"), Some(uuid));
}

#[tokio::test]
async fn post_then_put_monolithic_upload() {
    let server = TestServer::start();
    let data = pattern(100_000, 1);
    let digest = sha256(&data);
    let url = start_upload(&server, "up/mono").await;
    let resp = client()
        .put(with_query(&url, &format!("digest={digest}")))
        .header("Content-Type", "application/octet-stream")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(header(&resp, "docker-content-digest").as_deref(), Some(digest.as_str()));
    let blob_url = location(&server, &resp);
    assert!(
        blob_url.ends_with(&format!("/v2/up/mono/blobs/{digest}")),
        "blob Location {blob_url}"
    );
    assert_blob(&server, "up/mono", &digest, &data).await;
}

#[tokio::test]
async fn chunked_upload_with_content_range() {
    let server = TestServer::start();
    let data = pattern(30, 2);
    let digest = sha256(&data);
    let url = start_upload(&server, "up/chunked").await;

    let resp = patch_chunk(&url, Some("0-9"), &data[..10]).await;
    assert_eq!(resp.status(), 202);
    assert_eq!(header(&resp, "range").as_deref(), Some("0-9"));
    assert!(header(&resp, "docker-upload-uuid").is_some());
    let loc = header(&resp, "location").expect("Location on PATCH");
    assert!(loc.starts_with("/v2/up/chunked/blobs/uploads/"), "{loc}");
    let url = absolute(&server, &loc);

    let resp = patch_chunk(&url, Some("10-24"), &data[10..25]).await;
    assert_eq!(resp.status(), 202);
    assert_eq!(header(&resp, "range").as_deref(), Some("0-24"));
    let url = location(&server, &resp);

    let resp = patch_chunk(&url, Some("25-29"), &data[25..]).await;
    assert_eq!(resp.status(), 202);
    assert_eq!(header(&resp, "range").as_deref(), Some("0-29"));
    let url = location(&server, &resp);

    let resp = client()
        .put(with_query(&url, &format!("digest={digest}")))
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert!(header(&resp, "location").is_some());
    assert_blob(&server, "up/chunked", &digest, &data).await;
}

#[tokio::test]
async fn out_of_order_chunk_is_416_with_range_header() {
    let server = TestServer::start();
    let data = pattern(30, 3);
    let url = start_upload(&server, "up/order").await;
    let resp = patch_chunk(&url, Some("0-9"), &data[..10]).await;
    assert_eq!(resp.status(), 202);
    let url = location(&server, &resp);

    // Gap: starts at 20 instead of 10.
    let resp = patch_chunk(&url, Some("20-29"), &data[20..]).await;
    assert_eq!(resp.status(), 416);
    assert_eq!(
        header(&resp, "range").as_deref(),
        Some("0-9"),
        "416 reports the current range"
    );
    assert_error(resp, 416, &["BLOB_UPLOAD_INVALID"]).await;

    // Overlap: starts at 5.
    let resp = patch_chunk(&url, Some("5-14"), &data[5..15]).await;
    assert_eq!(resp.status(), 416);
    assert_error(resp, 416, &["BLOB_UPLOAD_INVALID"]).await;

    // The session is still usable at the right offset.
    let resp = client().get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(header(&resp, "range").as_deref(), Some("0-9"));
    let resp = patch_chunk(&url, Some("10-29"), &data[10..]).await;
    assert_eq!(resp.status(), 202);
    let url = location(&server, &resp);
    let digest = sha256(&data);
    let resp = client()
        .put(with_query(&url, &format!("digest={digest}")))
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_blob(&server, "up/order", &digest, &data).await;
}

#[tokio::test]
async fn duplicate_chunk_is_416_and_original_location_still_works() {
    let server = TestServer::start();
    let data = pattern(42, 13);
    let digest = sha256(&data);
    let original = start_upload(&server, "up/dup").await;
    let resp = patch_chunk(&original, Some("0-21"), &data[..22]).await;
    assert_eq!(resp.status(), 202);
    assert_eq!(header(&resp, "range").as_deref(), Some("0-21"));
    // Resending the same chunk to the POST's Location is out of order.
    let resp = patch_chunk(&original, Some("0-21"), &data[..22]).await;
    assert_eq!(resp.status(), 416);
    assert_eq!(header(&resp, "range").as_deref(), Some("0-21"));
    assert!(header(&resp, "location").is_some(), "416 carries Location");
    assert_error(resp, 416, &["BLOB_UPLOAD_INVALID"]).await;
    // The original Location still resolves to the session.
    let resp = client().get(&original).send().await.unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(header(&resp, "range").as_deref(), Some("0-21"));
    let url = location(&server, &resp);
    let resp = patch_chunk(&url, Some("22-41"), &data[22..]).await;
    assert_eq!(resp.status(), 202);
    let url = location(&server, &resp);
    let resp = client()
        .put(with_query(&url, &format!("digest={digest}")))
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_blob(&server, "up/dup", &digest, &data).await;
}

#[tokio::test]
async fn put_with_wrong_offset_final_chunk_is_416() {
    let server = TestServer::start();
    let data = pattern(30, 14);
    let digest = sha256(&data);
    let url = start_upload(&server, "up/putoffset").await;
    let resp = patch_chunk(&url, Some("0-9"), &data[..10]).await;
    assert_eq!(resp.status(), 202);
    let url = location(&server, &resp);
    let resp = client()
        .put(with_query(&url, &format!("digest={digest}")))
        .header("Content-Range", "20-29")
        .body(data[20..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 416);
    assert_error(resp, 416, &["BLOB_UPLOAD_INVALID"]).await;
    assert_no_blob(&server, "up/putoffset", &digest).await;
    // The session survives and can be finished properly.
    let resp = client().get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(header(&resp, "range").as_deref(), Some("0-9"));
    let resp = client()
        .put(with_query(&url, &format!("digest={digest}")))
        .header("Content-Range", "10-29")
        .body(data[10..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_blob(&server, "up/putoffset", &digest, &data).await;
}

#[tokio::test]
async fn first_chunk_not_starting_at_zero_is_416() {
    let server = TestServer::start();
    let url = start_upload(&server, "up/order").await;
    let resp = patch_chunk(&url, Some("5-9"), b"abcde").await;
    assert_eq!(resp.status(), 416);
    assert_error(resp, 416, &["BLOB_UPLOAD_INVALID"]).await;
}

#[tokio::test]
async fn streamed_patch_without_content_range() {
    let server = TestServer::start();
    let data = pattern(50_000, 4);
    let digest = sha256(&data);
    let url = start_upload(&server, "up/stream").await;
    let resp = patch_chunk(&url, None, &data[..20_000]).await;
    assert_eq!(resp.status(), 202);
    assert_eq!(header(&resp, "range").as_deref(), Some("0-19999"));
    let url = location(&server, &resp);
    // A second streamed PATCH appends.
    let resp = patch_chunk(&url, None, &data[20_000..]).await;
    assert_eq!(resp.status(), 202);
    assert_eq!(header(&resp, "range").as_deref(), Some("0-49999"));
    let url = location(&server, &resp);
    let resp = client()
        .put(with_query(&url, &format!("digest={digest}")))
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_blob(&server, "up/stream", &digest, &data).await;
}

#[tokio::test]
async fn streamed_patch_with_chunked_transfer_encoding() {
    let server = TestServer::start();
    let data = pattern(200_000, 5);
    let digest = sha256(&data);
    let url = start_upload(&server, "up/te").await;
    let pieces: Vec<Result<Bytes, std::io::Error>> =
        data.chunks(7_777).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(pieces));
    let resp = client()
        .patch(&url)
        .header("Content-Type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(header(&resp, "range").as_deref(), Some("0-199999"));
    let url = location(&server, &resp);
    let resp = client()
        .put(with_query(&url, &format!("digest={digest}")))
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_blob(&server, "up/te", &digest, &data).await;
}

#[tokio::test]
async fn get_upload_status_returns_204_with_range_and_location() {
    let server = TestServer::start();
    let url = start_upload(&server, "up/status").await;
    let resp = client().get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 204, "status of a fresh session");
    assert!(header(&resp, "location").is_some());
    assert!(header(&resp, "docker-upload-uuid").is_some());
    // Range is present even before any byte was uploaded (conformance accepts `0-0`).
    assert_eq!(
        header(&resp, "range").as_deref(),
        Some("0-0"),
        "Range of an empty session"
    );

    let resp = patch_chunk(&url, Some("0-4"), b"hello").await;
    assert_eq!(resp.status(), 202);
    let url = location(&server, &resp);
    let resp = client().get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(header(&resp, "range").as_deref(), Some("0-4"));
    let loc = header(&resp, "location").expect("Location on status");
    assert!(loc.starts_with("/v2/up/status/blobs/uploads/"), "{loc}");
    assert!(resp.bytes().await.unwrap().is_empty());
}

#[tokio::test]
async fn delete_upload_cancels_session() {
    let server = TestServer::start();
    let url = start_upload(&server, "up/cancel").await;
    let resp = patch_chunk(&url, Some("0-4"), b"hello").await;
    assert_eq!(resp.status(), 202);
    let url = location(&server, &resp);
    let resp = client().delete(&url).send().await.unwrap();
    assert_eq!(resp.status(), 204);
    let resp = client().get(&url).send().await.unwrap();
    assert_error(resp, 404, &["BLOB_UPLOAD_UNKNOWN"]).await;
    let resp = patch_chunk(&url, Some("5-9"), b"world").await;
    assert_error(resp, 404, &["BLOB_UPLOAD_UNKNOWN"]).await;
    let digest = sha256(b"hello");
    let resp = client()
        .put(with_query(&url, &format!("digest={digest}")))
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    assert_error(resp, 404, &["BLOB_UPLOAD_UNKNOWN"]).await;
    assert_no_blob(&server, "up/cancel", &digest).await;
    let resp = client().delete(&url).send().await.unwrap();
    assert_error(resp, 404, &["BLOB_UPLOAD_UNKNOWN"]).await;
}

#[tokio::test]
async fn put_with_wrong_digest_is_400_digest_invalid_and_blob_not_visible() {
    let server = TestServer::start();
    let data = b"the real bytes";
    let claimed = sha256(b"something else");
    let url = start_upload(&server, "up/wrong").await;
    let resp = client()
        .put(with_query(&url, &format!("digest={claimed}")))
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_error(resp, 400, &["DIGEST_INVALID"]).await;
    assert_no_blob(&server, "up/wrong", &claimed).await;
    assert_no_blob(&server, "up/wrong", &sha256(data)).await;
}

#[tokio::test]
async fn chunked_upload_with_wrong_final_digest_is_rejected() {
    let server = TestServer::start();
    let url = start_upload(&server, "up/wrong").await;
    let resp = patch_chunk(&url, Some("0-4"), b"hello").await;
    assert_eq!(resp.status(), 202);
    let url = location(&server, &resp);
    let claimed = sha256(b"hellp");
    let resp = client()
        .put(with_query(&url, &format!("digest={claimed}")))
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    assert_error(resp, 400, &["DIGEST_INVALID"]).await;
    assert_no_blob(&server, "up/wrong", &claimed).await;
    assert_no_blob(&server, "up/wrong", &sha256(b"hello")).await;
}

#[tokio::test]
async fn put_without_digest_is_400_digest_invalid() {
    let server = TestServer::start();
    let url = start_upload(&server, "up/nodigest").await;
    let resp = client().put(&url).body(b"data".to_vec()).send().await.unwrap();
    assert_error(resp, 400, &["DIGEST_INVALID"]).await;
}

#[tokio::test]
async fn put_with_malformed_digest_is_400_digest_invalid() {
    let server = TestServer::start();
    let url = start_upload(&server, "up/baddigest").await;
    let resp = client()
        .put(with_query(&url, "digest=sha256:nothex"))
        .body(b"data".to_vec())
        .send()
        .await
        .unwrap();
    assert_error(resp, 400, &["DIGEST_INVALID"]).await;
}

#[tokio::test]
async fn put_with_final_chunk_in_body_completes_upload() {
    let server = TestServer::start();
    let data = pattern(40, 6);
    let digest = sha256(&data);
    let url = start_upload(&server, "up/final").await;
    let resp = patch_chunk(&url, Some("0-24"), &data[..25]).await;
    assert_eq!(resp.status(), 202);
    let url = location(&server, &resp);
    let resp = client()
        .put(with_query(&url, &format!("digest={digest}")))
        .header("Content-Type", "application/octet-stream")
        .header("Content-Range", "25-39")
        .body(data[25..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_blob(&server, "up/final", &digest, &data).await;
}

#[tokio::test]
async fn put_with_final_chunk_without_content_range_completes_upload() {
    let server = TestServer::start();
    let data = pattern(40, 7);
    let digest = sha256(&data);
    let url = start_upload(&server, "up/final").await;
    let resp = patch_chunk(&url, None, &data[..10]).await;
    assert_eq!(resp.status(), 202);
    let url = location(&server, &resp);
    let resp = client()
        .put(with_query(&url, &format!("digest={digest}")))
        .body(data[10..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_blob(&server, "up/final", &digest, &data).await;
}

#[tokio::test]
async fn completed_upload_session_is_gone() {
    let server = TestServer::start();
    let data = b"done";
    let digest = sha256(data);
    let url = start_upload(&server, "up/done").await;
    let resp = client()
        .put(with_query(&url, &format!("digest={digest}")))
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let resp = client().get(&url).send().await.unwrap();
    assert_error(resp, 404, &["BLOB_UPLOAD_UNKNOWN"]).await;
    let resp = patch_chunk(&url, None, b"more").await;
    assert_error(resp, 404, &["BLOB_UPLOAD_UNKNOWN"]).await;
}

#[tokio::test]
async fn unknown_upload_uuid_is_404_blob_upload_unknown() {
    let server = TestServer::start();
    push_blob(&server, "up/unknown", b"x").await;
    let url = server.v2("up/unknown/blobs/uploads/3f1e0d2c-8b7a-4c6d-9e5f-0a1b2c3d4e5f");
    let c = client();
    let resp = c.get(&url).send().await.unwrap();
    assert_error(resp, 404, &["BLOB_UPLOAD_UNKNOWN"]).await;
    let resp = patch_chunk(&url, Some("0-2"), b"abc").await;
    assert_error(resp, 404, &["BLOB_UPLOAD_UNKNOWN"]).await;
    let resp = c
        .put(format!("{url}?digest={}", sha256(b"abc")))
        .body(b"abc".to_vec())
        .send()
        .await
        .unwrap();
    assert_error(resp, 404, &["BLOB_UPLOAD_UNKNOWN"]).await;
    let resp = c.delete(&url).send().await.unwrap();
    assert_error(resp, 404, &["BLOB_UPLOAD_UNKNOWN"]).await;
    // Not even UUID-shaped.
    let resp = c
        .get(server.v2("up/unknown/blobs/uploads/not-a-uuid"))
        .send()
        .await
        .unwrap();
    assert_error(resp, 404, &["BLOB_UPLOAD_UNKNOWN"]).await;
}

#[tokio::test]
async fn upload_session_is_bound_to_its_repository() {
    let server = TestServer::start();
    let url = start_upload(&server, "up/owner").await;
    let moved = url.replace("/v2/up/owner/", "/v2/up/intruder/");
    assert_ne!(moved, url);
    let resp = client().get(&moved).send().await.unwrap();
    assert_error(resp, 404, &["BLOB_UPLOAD_UNKNOWN"]).await;
    let digest = sha256(b"abc");
    let resp = client()
        .put(with_query(&moved, &format!("digest={digest}")))
        .body(b"abc".to_vec())
        .send()
        .await
        .unwrap();
    assert_error(resp, 404, &["BLOB_UPLOAD_UNKNOWN"]).await;
    // The original session still works.
    let resp = client().get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 204);
}

#[tokio::test]
async fn zero_byte_blob_single_post() {
    let server = TestServer::start();
    let digest = push_blob(&server, "up/empty", b"").await;
    assert_eq!(
        digest,
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    let resp = client()
        .head(server.v2(&format!("up/empty/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-length").as_deref(), Some("0"));
    assert_blob(&server, "up/empty", &digest, b"").await;
}

#[tokio::test]
async fn zero_byte_blob_post_then_put() {
    let server = TestServer::start();
    let digest = sha256(b"");
    let url = start_upload(&server, "up/empty").await;
    let resp = client()
        .put(with_query(&url, &format!("digest={digest}")))
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_blob(&server, "up/empty", &digest, b"").await;
}

#[tokio::test]
async fn large_chunked_upload_spanning_storage_parts() {
    // Larger than the default 8 MiB part size, in uneven chunks.
    let server = TestServer::start();
    let data = pattern(18 * 1024 * 1024 + 123, 8);
    let digest = sha256(&data);
    let mut url = start_upload(&server, "up/large").await;
    let mut offset = 0;
    for size in [7 * 1024 * 1024 + 1, 9 * 1024 * 1024 - 7, 1024 * 1024] {
        let end = offset + size;
        let resp = patch_chunk(&url, Some(&format!("{offset}-{}", end - 1)), &data[offset..end]).await;
        assert_eq!(resp.status(), 202);
        assert_eq!(header(&resp, "range"), Some(format!("0-{}", end - 1)));
        url = location(&server, &resp);
        offset = end;
    }
    let resp = client()
        .put(with_query(&url, &format!("digest={digest}")))
        .header("Content-Range", format!("{offset}-{}", data.len() - 1))
        .body(data[offset..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_blob(&server, "up/large", &digest, &data).await;
}

#[tokio::test]
async fn small_part_size_chunked_upload_round_trips() {
    let server = TestServer::start_with(&[("STOWAGE_STORAGE__PART_SIZE", "65536")]);
    let data = pattern(1_000_000, 9);
    let digest = sha256(&data);
    let mut url = start_upload(&server, "up/parts").await;
    for (i, chunk) in data.chunks(150_001).enumerate() {
        let start = i * 150_001;
        let resp = patch_chunk(&url, Some(&format!("{start}-{}", start + chunk.len() - 1)), chunk).await;
        assert_eq!(resp.status(), 202);
        url = location(&server, &resp);
    }
    let resp = client()
        .put(with_query(&url, &format!("digest={digest}")))
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_blob(&server, "up/parts", &digest, &data).await;
}

#[tokio::test]
async fn cross_repository_mount_from_holder_is_201() {
    let server = TestServer::start();
    let data = b"mount me";
    let digest = push_blob(&server, "mount/src", data).await;
    let resp = client()
        .post(server.v2(&format!("mount/dst/blobs/uploads/?mount={digest}&from=mount/src")))
        .header("Content-Length", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(header(&resp, "docker-content-digest").as_deref(), Some(digest.as_str()));
    let blob_url = location(&server, &resp);
    assert!(
        blob_url.ends_with(&format!("/v2/mount/dst/blobs/{digest}")),
        "{blob_url}"
    );
    assert_blob(&server, "mount/dst", &digest, data).await;
    // The source keeps it.
    assert_blob(&server, "mount/src", &digest, data).await;
}

#[tokio::test]
async fn mount_from_repository_without_the_blob_starts_upload_session() {
    let server = TestServer::start();
    let data = b"not in the source";
    let digest = sha256(data);
    push_blob(&server, "mount/src", b"unrelated").await;
    push_blob(&server, "mount/elsewhere", data).await;
    let resp = client()
        .post(server.v2(&format!("mount/dst/blobs/uploads/?mount={digest}&from=mount/src")))
        .header("Content-Length", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202, "a failed mount falls back to an upload session");
    let url = location(&server, &resp);
    assert!(url.contains("/v2/mount/dst/blobs/uploads/"), "{url}");
    assert_no_blob(&server, "mount/dst", &digest).await;
    // The session is a real one.
    let resp = client()
        .put(with_query(&url, &format!("digest={digest}")))
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_blob(&server, "mount/dst", &digest, data).await;
}

#[tokio::test]
async fn mount_from_unknown_repository_starts_upload_session() {
    let server = TestServer::start();
    let digest = sha256(b"whatever");
    let resp = client()
        .post(server.v2(&format!("mount/dst/blobs/uploads/?mount={digest}&from=does/not/exist")))
        .header("Content-Length", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert!(header(&resp, "location").is_some());
    assert_no_blob(&server, "mount/dst", &digest).await;
}

#[tokio::test]
async fn automatic_mount_without_from() {
    let server = TestServer::start();
    let data = b"auto mount";
    let digest = push_blob(&server, "mount/somewhere", data).await;
    let resp = client()
        .post(server.v2(&format!("mount/auto/blobs/uploads/?mount={digest}")))
        .header("Content-Length", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_blob(&server, "mount/auto", &digest, data).await;

    // A blob nobody has: upload session.
    let missing = sha256(b"nobody has this");
    let resp = client()
        .post(server.v2(&format!("mount/auto/blobs/uploads/?mount={missing}")))
        .header("Content-Length", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_no_blob(&server, "mount/auto", &missing).await;
}

#[tokio::test]
async fn same_blob_in_two_repositories_is_deduplicated_and_independent() {
    let server = TestServer::start();
    let data = pattern(10_000, 10);
    let d1 = push_blob(&server, "dedup/one", &data).await;
    let d2 = push_blob(&server, "dedup/two", &data).await;
    assert_eq!(d1, d2);
    // Pushing the same blob to the same repository again is fine.
    push_blob(&server, "dedup/one", &data).await;
    assert_blob(&server, "dedup/one", &d1, &data).await;
    assert_blob(&server, "dedup/two", &d1, &data).await;
    let resp = client()
        .delete(server.v2(&format!("dedup/one/blobs/{d1}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_no_blob(&server, "dedup/one", &d1).await;
    assert_blob(&server, "dedup/two", &d1, &data).await;
}

#[tokio::test]
async fn concurrent_upload_sessions_do_not_interfere() {
    let server = TestServer::start();
    let a = pattern(5_000, 11);
    let b = pattern(5_000, 12);
    let ua = start_upload(&server, "up/concurrent").await;
    let ub = start_upload(&server, "up/concurrent").await;
    assert_ne!(ua, ub);
    let ra = patch_chunk(&ua, Some("0-2499"), &a[..2500]).await;
    let rb = patch_chunk(&ub, Some("0-2499"), &b[..2500]).await;
    assert_eq!(ra.status(), 202);
    assert_eq!(rb.status(), 202);
    let ua = location(&server, &ra);
    let ub = location(&server, &rb);
    let ra = patch_chunk(&ua, Some("2500-4999"), &a[2500..]).await;
    let rb = patch_chunk(&ub, Some("2500-4999"), &b[2500..]).await;
    let ua = location(&server, &ra);
    let ub = location(&server, &rb);
    for (url, data) in [(&ua, &a), (&ub, &b)] {
        let resp = client()
            .put(with_query(url, &format!("digest={}", sha256(data))))
            .body(Vec::new())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
    }
    assert_blob(&server, "up/concurrent", &sha256(&a), &a).await;
    assert_blob(&server, "up/concurrent", &sha256(&b), &b).await;
}

#[tokio::test]
async fn chunked_upload_finished_with_sha512_digest() {
    let server = TestServer::start();
    let data = pattern(100_000, 15);
    let digest = sha512(&data);
    let url = start_upload(&server, "up/sha512").await;
    let resp = patch_chunk(&url, Some("0-59999"), &data[..60_000]).await;
    assert_eq!(resp.status(), 202);
    let url = location(&server, &resp);
    let resp = patch_chunk(&url, None, &data[60_000..]).await;
    assert_eq!(resp.status(), 202);
    let url = location(&server, &resp);
    let resp = client()
        .put(with_query(&url, &format!("digest={digest}")))
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(header(&resp, "docker-content-digest").as_deref(), Some(digest.as_str()));
    assert_blob(&server, "up/sha512", &digest, &data).await;
}

#[tokio::test]
async fn post_then_put_with_wrong_sha512_digest_is_400() {
    let server = TestServer::start();
    let claimed = sha512(b"claimed");
    let url = start_upload(&server, "up/sha512").await;
    let resp = client()
        .put(with_query(&url, &format!("digest={claimed}")))
        .body(b"actual".to_vec())
        .send()
        .await
        .unwrap();
    assert_error(resp, 400, &["DIGEST_INVALID"]).await;
    assert_no_blob(&server, "up/sha512", &claimed).await;
}

#[tokio::test]
async fn mount_of_sha512_blob() {
    let server = TestServer::start();
    let data = b"sha512 mount";
    let digest = sha512(data);
    let resp = client()
        .post(server.v2(&format!("mount/src512/blobs/uploads/?digest={digest}")))
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let resp = client()
        .post(server.v2(&format!("mount/dst512/blobs/uploads/?mount={digest}&from=mount/src512")))
        .header("Content-Length", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_blob(&server, "mount/dst512", &digest, data).await;
}

//! Blobs: GET/HEAD (end-2), Range requests (RFC 9110), DELETE (end-10), error codes, sha512
//! digests, and per-repository visibility.
mod common;

use common::oci::{SPEC_CODES, assert_error, header, sha512};

use common::{TestServer, client, push_blob, sha256};
use reqwest::Response;

const DATA: &[u8] = b"0123456789abcdefghij"; // 20 bytes

async fn get_range(server: &TestServer, repo: &str, digest: &str, range: &str) -> Response {
    client()
        .get(server.v2(&format!("{repo}/blobs/{digest}")))
        .header("Range", range)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn get_blob_returns_exact_bytes_with_digest_and_length() {
    let server = TestServer::start();
    let data: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let digest = push_blob(&server, "blobs/get", &data).await;
    let resp = client()
        .get(server.v2(&format!("blobs/get/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "docker-content-digest").as_deref(), Some(digest.as_str()));
    assert_eq!(
        header(&resp, "content-length").as_deref(),
        Some(data.len().to_string().as_str())
    );
    assert_eq!(
        header(&resp, "docker-distribution-api-version").as_deref(),
        Some("registry/2.0")
    );
    let body = resp.bytes().await.unwrap();
    assert_eq!(body.as_ref(), data.as_slice());
}

#[tokio::test]
async fn head_blob_returns_length_and_digest_without_body() {
    let server = TestServer::start();
    let digest = push_blob(&server, "blobs/head", DATA).await;
    let resp = client()
        .head(server.v2(&format!("blobs/head/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "docker-content-digest").as_deref(), Some(digest.as_str()));
    assert_eq!(header(&resp, "content-length").as_deref(), Some("20"));
    assert!(resp.bytes().await.unwrap().is_empty());
}

#[tokio::test]
async fn get_unknown_blob_is_404_blob_unknown() {
    let server = TestServer::start();
    push_blob(&server, "blobs/unknown", DATA).await;
    let missing = sha256(b"never pushed");
    let resp = client()
        .get(server.v2(&format!("blobs/unknown/blobs/{missing}")))
        .send()
        .await
        .unwrap();
    assert_error(resp, 404, &["BLOB_UNKNOWN"]).await;
}

#[tokio::test]
async fn get_blob_in_unknown_repository_is_404() {
    let server = TestServer::start();
    let missing = sha256(b"never pushed");
    let resp = client()
        .get(server.v2(&format!("no/such/repo/blobs/{missing}")))
        .send()
        .await
        .unwrap();
    assert_error(resp, 404, &["BLOB_UNKNOWN", "NAME_UNKNOWN"]).await;
}

#[tokio::test]
async fn head_unknown_blob_is_404() {
    let server = TestServer::start();
    push_blob(&server, "blobs/unknown", DATA).await;
    let missing = sha256(b"never pushed");
    let resp = client()
        .head(server.v2(&format!("blobs/unknown/blobs/{missing}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn blob_is_readable_only_through_repositories_that_hold_it() {
    let server = TestServer::start();
    let digest = push_blob(&server, "holder", DATA).await;
    push_blob(&server, "other", b"something else").await;
    let c = client();
    let resp = c
        .get(server.v2(&format!("holder/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = c.get(server.v2(&format!("other/blobs/{digest}"))).send().await.unwrap();
    assert_error(resp, 404, &["BLOB_UNKNOWN"]).await;
    let resp = c
        .head(server.v2(&format!("other/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let resp = c
        .get(server.v2(&format!("holder/sub/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_error(resp, 404, &["BLOB_UNKNOWN", "NAME_UNKNOWN"]).await;
}

#[tokio::test]
async fn range_request_returns_206_with_content_range() {
    let server = TestServer::start();
    let digest = push_blob(&server, "blobs/range", DATA).await;
    let resp = get_range(&server, "blobs/range", &digest, "bytes=2-5").await;
    assert_eq!(resp.status(), 206);
    assert_eq!(header(&resp, "content-range").as_deref(), Some("bytes 2-5/20"));
    assert_eq!(header(&resp, "content-length").as_deref(), Some("4"));
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &DATA[2..=5]);
}

/// Blobs larger than the server's read pieces (512 KiB, recycled between downloads), read whole
/// and in ranges that start and end inside pieces, while other downloads run: every body must be
/// exactly its own blob's bytes.
#[tokio::test]
async fn concurrent_multi_piece_downloads_return_their_own_bytes() {
    const PIECE: usize = 512 * 1024;
    let server = TestServer::start();
    let blobs: Vec<Vec<u8>> = (0..3u32)
        .map(|k| {
            (0..(5 * PIECE as u32 + 12_345 * (k + 1)))
                .map(|i| (i.wrapping_mul(2_654_435_761).rotate_left(k + 3) >> 24) as u8)
                .collect()
        })
        .collect();
    let mut digests = Vec::new();
    for blob in &blobs {
        digests.push(push_blob(&server, "blobs/pieces", blob).await);
    }
    let ranges = [
        None,
        Some((PIECE - 1, PIECE)),
        Some((PIECE + 100, 3 * PIECE + 7)),
        Some((3, 4 * PIECE - 1)),
        Some((2 * PIECE, 5 * PIECE + 10)),
    ];
    let mut tasks = Vec::new();
    for round in 0..2 {
        for (blob, digest) in blobs.iter().zip(&digests) {
            for range in ranges {
                let (url, blob) = (server.v2(&format!("blobs/pieces/blobs/{digest}")), blob.clone());
                tasks.push(tokio::spawn(async move {
                    let mut req = client().get(url);
                    if let Some((a, b)) = range {
                        req = req.header("Range", format!("bytes={a}-{b}"));
                    }
                    let resp = req.send().await.unwrap();
                    let want = match range {
                        None => &blob[..],
                        Some((a, b)) => &blob[a..=b],
                    };
                    assert_eq!(resp.status(), if range.is_some() { 206 } else { 200 });
                    let body = resp.bytes().await.unwrap();
                    assert_eq!(body.len(), want.len(), "round {round}, range {range:?}");
                    assert!(body.as_ref() == want, "round {round}, range {range:?}: wrong bytes");
                }));
            }
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn range_request_single_byte_and_whole_blob() {
    let server = TestServer::start();
    let digest = push_blob(&server, "blobs/range", DATA).await;
    let resp = get_range(&server, "blobs/range", &digest, "bytes=0-0").await;
    assert_eq!(resp.status(), 206);
    assert_eq!(header(&resp, "content-range").as_deref(), Some("bytes 0-0/20"));
    assert_eq!(resp.bytes().await.unwrap().as_ref(), b"0");
    let resp = get_range(&server, "blobs/range", &digest, "bytes=0-19").await;
    assert_eq!(resp.status(), 206);
    assert_eq!(header(&resp, "content-range").as_deref(), Some("bytes 0-19/20"));
    assert_eq!(resp.bytes().await.unwrap().as_ref(), DATA);
}

#[tokio::test]
async fn open_ended_range_returns_rest_of_blob() {
    let server = TestServer::start();
    let digest = push_blob(&server, "blobs/range", DATA).await;
    let resp = get_range(&server, "blobs/range", &digest, "bytes=15-").await;
    assert_eq!(resp.status(), 206);
    assert_eq!(header(&resp, "content-range").as_deref(), Some("bytes 15-19/20"));
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &DATA[15..]);
}

#[tokio::test]
async fn suffix_range_returns_last_bytes() {
    let server = TestServer::start();
    let digest = push_blob(&server, "blobs/range", DATA).await;
    let resp = get_range(&server, "blobs/range", &digest, "bytes=-3").await;
    assert_eq!(resp.status(), 206);
    assert_eq!(header(&resp, "content-range").as_deref(), Some("bytes 17-19/20"));
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &DATA[17..]);
}

#[tokio::test]
async fn range_end_past_blob_end_is_clamped() {
    let server = TestServer::start();
    let digest = push_blob(&server, "blobs/range", DATA).await;
    let resp = get_range(&server, "blobs/range", &digest, "bytes=10-1000").await;
    assert_eq!(resp.status(), 206);
    assert_eq!(header(&resp, "content-range").as_deref(), Some("bytes 10-19/20"));
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &DATA[10..]);
}

#[tokio::test]
async fn range_starting_past_blob_end_is_416() {
    let server = TestServer::start();
    let digest = push_blob(&server, "blobs/range", DATA).await;
    for range in ["bytes=20-25", "bytes=100-", "bytes=20-"] {
        let resp = get_range(&server, "blobs/range", &digest, range).await;
        assert_eq!(resp.status(), 416, "{range}");
        // RFC 9110 §15.5.17: a 416 to a byte-range request SHOULD send Content-Range: bytes */len.
        assert_eq!(header(&resp, "content-range").as_deref(), Some("bytes */20"), "{range}");
        assert_error(resp, 416, SPEC_CODES).await;
    }
}

#[tokio::test]
async fn range_with_end_before_start_is_416() {
    // RFC 9110 §14.1.1: last-pos < first-pos makes the byte-range-spec invalid; §14.2: an invalid
    // ranges-specifier SHOULD get 416 (the OCI conformance suite expects 416 for `bytes=500-0`).
    let server = TestServer::start();
    let digest = push_blob(&server, "blobs/range", DATA).await;
    let resp = get_range(&server, "blobs/range", &digest, "bytes=10-0").await;
    assert_eq!(resp.status(), 416);
    assert_error(resp, 416, SPEC_CODES).await;
}

#[tokio::test]
async fn malformed_range_is_ignored_or_416() {
    // RFC 9110 §14.2: a server MAY ignore Range; an invalid ranges-specifier SHOULD get 416.
    let server = TestServer::start();
    let digest = push_blob(&server, "blobs/range", DATA).await;
    for range in [
        "bytes=abc",
        "bytes=5-2",
        "bytes=",
        "bytes=--1",
        "bytes=1-2-3",
        "bytes=x-5",
        "bytes 0-5",
    ] {
        let resp = get_range(&server, "blobs/range", &digest, range).await;
        match resp.status().as_u16() {
            200 => assert_eq!(
                resp.bytes().await.unwrap().as_ref(),
                DATA,
                "{range}: 200 must be the whole blob"
            ),
            416 => {
                assert_error(resp, 416, SPEC_CODES).await;
            }
            s => panic!("Range {range:?} -> {s}, expected 200 (ignored) or 416"),
        }
    }
}

#[tokio::test]
async fn range_with_unknown_unit_is_ignored() {
    // RFC 9110 §14.2: "An origin server MUST ignore a Range header field that contains a range
    // unit it does not understand."
    let server = TestServer::start();
    let digest = push_blob(&server, "blobs/range", DATA).await;
    let resp = get_range(&server, "blobs/range", &digest, "items=0-5").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), DATA);
}

#[tokio::test]
async fn range_on_unknown_blob_is_404() {
    let server = TestServer::start();
    push_blob(&server, "blobs/range", DATA).await;
    let resp = get_range(&server, "blobs/range", &sha256(b"nope"), "bytes=0-1").await;
    assert_error(resp, 404, &["BLOB_UNKNOWN"]).await;
}

#[tokio::test]
async fn blob_get_advertises_range_support() {
    let server = TestServer::start();
    let digest = push_blob(&server, "blobs/range", DATA).await;
    let resp = client()
        .get(server.v2(&format!("blobs/range/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "accept-ranges").as_deref(), Some("bytes"));
}

#[tokio::test]
async fn delete_blob_returns_202_then_blob_is_gone() {
    let server = TestServer::start();
    let digest = push_blob(&server, "blobs/del", DATA).await;
    let c = client();
    let resp = c
        .delete(server.v2(&format!("blobs/del/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let resp = c
        .get(server.v2(&format!("blobs/del/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_error(resp, 404, &["BLOB_UNKNOWN"]).await;
    let resp = c
        .head(server.v2(&format!("blobs/del/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    // Deleting again: not found.
    let resp = c
        .delete(server.v2(&format!("blobs/del/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_error(resp, 404, &["BLOB_UNKNOWN"]).await;
}

#[tokio::test]
async fn delete_unknown_blob_is_404_blob_unknown() {
    let server = TestServer::start();
    push_blob(&server, "blobs/del", DATA).await;
    let resp = client()
        .delete(server.v2(&format!("blobs/del/blobs/{}", sha256(b"nope"))))
        .send()
        .await
        .unwrap();
    assert_error(resp, 404, &["BLOB_UNKNOWN"]).await;
}

#[tokio::test]
async fn delete_blob_in_one_repository_keeps_it_in_another() {
    let server = TestServer::start();
    let digest = push_blob(&server, "first", DATA).await;
    push_blob(&server, "second", DATA).await;
    let c = client();
    let resp = c
        .delete(server.v2(&format!("first/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let resp = c
        .get(server.v2(&format!("second/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), DATA);
    let resp = c.get(server.v2(&format!("first/blobs/{digest}"))).send().await.unwrap();
    assert_error(resp, 404, &["BLOB_UNKNOWN"]).await;
}

#[tokio::test]
async fn blob_can_be_pushed_again_after_delete() {
    let server = TestServer::start();
    let digest = push_blob(&server, "blobs/again", DATA).await;
    let resp = client()
        .delete(server.v2(&format!("blobs/again/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    push_blob(&server, "blobs/again", DATA).await;
    let resp = client()
        .get(server.v2(&format!("blobs/again/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), DATA);
}

#[tokio::test]
async fn delete_blob_when_delete_disabled_is_405_unsupported() {
    let server = TestServer::start_with(&[("STOWAGE_REGISTRY__DELETE_ENABLED", "false")]);
    let digest = push_blob(&server, "blobs/nodel", DATA).await;
    let resp = client()
        .delete(server.v2(&format!("blobs/nodel/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_error(resp, 405, &["UNSUPPORTED"]).await;
    let resp = client()
        .get(server.v2(&format!("blobs/nodel/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "blob survives a refused delete");
}

#[tokio::test]
async fn malformed_digest_is_400_digest_invalid() {
    let server = TestServer::start();
    push_blob(&server, "blobs/bad", DATA).await;
    let c = client();
    for bad in [
        "notadigest",
        "sha256:",
        "sha256:abc",
        "sha256:zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
        // Upper-case hex is not allowed for sha256 (image-spec descriptor.md).
        "sha256:ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789",
        // sha256 hex one character too long.
        "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0",
        ":0123456789abcdef",
        "sha512:abcd",
    ] {
        let resp = c
            .get(server.v2(&format!("blobs/bad/blobs/{bad}")))
            .send()
            .await
            .unwrap();
        assert_error(resp, 400, &["DIGEST_INVALID"]).await;
        let resp = c
            .delete(server.v2(&format!("blobs/bad/blobs/{bad}")))
            .send()
            .await
            .unwrap();
        assert_error(resp, 400, &["DIGEST_INVALID"]).await;
        let resp = c
            .head(server.v2(&format!("blobs/bad/blobs/{bad}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "HEAD {bad}");
    }
}

#[tokio::test]
async fn unsupported_digest_algorithm_is_rejected() {
    let server = TestServer::start();
    push_blob(&server, "blobs/bad", DATA).await;
    let resp = client()
        .get(server.v2("blobs/bad/blobs/md5:0123456789abcdef0123456789abcdef"))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    match status {
        400 => assert_error(resp, 400, &["DIGEST_INVALID", "UNSUPPORTED"]).await,
        404 => assert_error(resp, 404, &["BLOB_UNKNOWN"]).await,
        s => panic!("md5 digest -> {s}"),
    };
}

#[tokio::test]
async fn sha512_blob_round_trip() {
    let server = TestServer::start();
    let data = b"content addressed with sha512";
    let digest = sha512(data);
    let c = client();
    let resp = c
        .post(server.v2(&format!("blobs/sha512/blobs/uploads/?digest={digest}")))
        .header("Content-Type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let resp = c
        .get(server.v2(&format!("blobs/sha512/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "docker-content-digest").as_deref(), Some(digest.as_str()));
    assert_eq!(resp.bytes().await.unwrap().as_ref(), data);
    let resp = c
        .head(server.v2(&format!("blobs/sha512/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header(&resp, "content-length").as_deref(),
        Some(data.len().to_string().as_str())
    );
}

#[tokio::test]
async fn sha512_upload_with_wrong_content_is_400_digest_invalid() {
    let server = TestServer::start();
    let digest = sha512(b"the real content");
    let resp = client()
        .post(server.v2(&format!("blobs/sha512/blobs/uploads/?digest={digest}")))
        .header("Content-Type", "application/octet-stream")
        .body(b"other content".to_vec())
        .send()
        .await
        .unwrap();
    assert_error(resp, 400, &["DIGEST_INVALID"]).await;
    let resp = client()
        .get(server.v2(&format!("blobs/sha512/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn sha512_and_sha256_of_same_content_are_distinct_blobs() {
    let server = TestServer::start();
    let d256 = push_blob(&server, "blobs/algos", DATA).await;
    let d512 = sha512(DATA);
    let c = client();
    let resp = c
        .get(server.v2(&format!("blobs/algos/blobs/{d512}")))
        .send()
        .await
        .unwrap();
    assert_error(resp, 404, &["BLOB_UNKNOWN"]).await;
    let resp = c
        .post(server.v2(&format!("blobs/algos/blobs/uploads/?digest={d512}")))
        .body(DATA.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    for d in [&d256, &d512] {
        let resp = c
            .get(server.v2(&format!("blobs/algos/blobs/{d}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "docker-content-digest").as_deref(), Some(d.as_str()));
    }
}

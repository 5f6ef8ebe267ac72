//! What only the S3 backend does: blob downloads redirected to a presigned URL of the object
//! store. These tests start an S3-backed server whatever `STOWAGE_TEST_BACKEND` says; the rest
//! of the suite runs on S3 too when it says `s3`.

mod common;

use common::{Backend, TestServer, client, push_blob};

#[tokio::test]
async fn blob_gets_redirect_to_a_presigned_url_when_configured() {
    let server = TestServer::start_on(
        Backend::S3,
        &[
            ("STOWAGE_STORAGE__S3__REDIRECT", "true"),
            ("STOWAGE_STORAGE__S3__REDIRECT_EXPIRY_SECS", "120"),
        ],
    );
    let blob: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    let digest = push_blob(&server, "redirect/me", &blob).await;

    let resp = client()
        .get(server.v2(&format!("redirect/me/blobs/{digest}")))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 307, "large pulls go to the object store");
    assert_eq!(resp.headers()["docker-content-digest"], digest.as_str());
    let location = resp.headers()["location"].to_str().expect("Location").to_string();
    let bucket = server.bucket.as_deref().expect("bucket");
    assert!(location.contains(&format!("/{bucket}/blobs/sha256/")), "{location}");
    assert!(location.contains("X-Amz-Signature="), "a signed URL: {location}");
    assert!(location.contains("X-Amz-Expires=120"), "short-lived: {location}");

    // The store serves the whole blob and ranges of it from that URL.
    let whole = client().get(&location).send().await.expect("GET presigned");
    assert_eq!(whole.status(), 200);
    assert_eq!(whole.bytes().await.expect("body").as_ref(), blob.as_slice());
    let part = client()
        .get(&location)
        .header("Range", "bytes=1000-1999")
        .send()
        .await
        .expect("GET presigned range");
    assert_eq!(part.status(), 206);
    assert_eq!(part.bytes().await.expect("body").as_ref(), &blob[1000..2000]);

    // HEAD is answered by the registry; access control still applies before any redirect.
    let head = client()
        .head(server.v2(&format!("redirect/me/blobs/{digest}")))
        .send()
        .await
        .expect("HEAD");
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], blob.len().to_string().as_str());
    let other = client()
        .get(server.v2(&format!("redirect/other/blobs/{digest}")))
        .send()
        .await
        .expect("GET from another repository");
    assert_eq!(other.status(), 404);
}

#[tokio::test]
async fn blobs_stream_through_with_ranges_by_default() {
    let server = TestServer::start_on(Backend::S3, &[]);
    let blob: Vec<u8> = (0..12 * 1024 * 1024u32).map(|i| (i % 241) as u8).collect();
    let digest = push_blob(&server, "stream/me", &blob).await;
    let resp = client()
        .get(server.v2(&format!("stream/me/blobs/{digest}")))
        .header("Range", "bytes=5242870-5242889")
        .send()
        .await
        .expect("GET range");
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.bytes().await.expect("body").as_ref(), &blob[5_242_870..5_242_890]);
}

#[tokio::test]
async fn a_bucket_that_is_missing_stops_start_up_loudly() {
    // Not a skip: the registry refuses to run on storage it cannot use.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stowage"))
        .arg("serve")
        .env("STOWAGE_LISTEN", "127.0.0.1:0")
        .env("STOWAGE_DATA_DIR", tempfile::tempdir().expect("tmp").path())
        .env("STOWAGE_STORAGE__BACKEND", "s3")
        .output()
        .expect("run stowage");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("storage.s3.bucket"));
}

/// Blobs larger than `storage.s3.max_copy_size` (S3's CopyObject stops at 5 GiB) are published
/// by streaming the staged upload into a multipart upload; smaller ones by a server-side copy.
/// Both read back byte-exact, and nothing staged is left behind.
#[tokio::test]
async fn blobs_beyond_the_copy_limit_are_published_by_a_streamed_copy() {
    let server = TestServer::start_on(Backend::S3, &[("STOWAGE_STORAGE__S3__MAX_COPY_SIZE", "6291456")]);
    let big: Vec<u8> = (0..(12 * 1024 * 1024 + 7u32))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let small: Vec<u8> = (0..100_000u32).map(|i| (i % 241) as u8).collect();
    for (what, blob) in [("streamed", &big), ("copied", &small)] {
        let digest = push_blob(&server, "copy/limit", blob).await;
        let resp = client()
            .get(server.v2(&format!("copy/limit/blobs/{digest}")))
            .send()
            .await
            .expect("GET");
        assert_eq!(resp.status(), 200, "{what}");
        let body = resp.bytes().await.expect("body");
        assert_eq!(body.len(), blob.len(), "{what}");
        assert!(body.as_ref() == blob.as_slice(), "{what}: bytes differ");
    }
    // Pushing the big blob again (another repository) finds it stored and copies nothing.
    let digest = push_blob(&server, "copy/again", &big).await;
    let resp = client()
        .head(server.v2(&format!("copy/again/blobs/{digest}")))
        .send()
        .await
        .expect("HEAD");
    assert_eq!(resp.status(), 200);
    assert!(!server.has_staged_uploads(), "staged uploads left behind");
}

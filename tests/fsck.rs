//! `stowage fsck`: finds blobs whose stored object went bad behind the server's back, and with
//! `--repair` quarantines them so that the next push stores good bytes again; and the data
//! directory's lock, which keeps a second server and a repair away from a running server.

mod common;

use common::{TestServer, client, get_blob, push_blob, push_image, sha256};

/// Deterministic bytes, different per `seed`.
fn bytes(seed: u32, len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_add(seed.wrapping_mul(7919)).wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

#[tokio::test]
async fn fsck_reports_and_repair_quarantines_corrupt_blobs_that_then_push_again() {
    let mut server = TestServer::start();
    let layer = bytes(1, 300 * 1024);
    let (manifest_digest, manifest) = push_image(&server, "fsck/app", "v1", &layer).await;
    let layer_digest = sha256(&layer);
    // The same layer in a second repository: one object, two links.
    push_blob(&server, "fsck/other", &layer).await;
    let short = bytes(2, 64 * 1024);
    let short_digest = push_blob(&server, "fsck/app", &short).await;
    let gone = bytes(3, 1000);
    let gone_digest = push_blob(&server, "fsck/app", &gone).await;
    let good = bytes(4, 5000);
    let good_digest = push_blob(&server, "fsck/app", &good).await;

    let (code, out, err) = server.fsck(&[]);
    assert_eq!(code, 0, "a healthy store is clean: {out}{err}");
    assert!(out.contains("fsck: 5 blobs"), "summary counts every blob: {out}");
    assert!(out.contains(" 0 bad"), "{out}");

    // Same length, other bytes; a truncated object; a deleted one.
    let mut flipped = layer.clone();
    flipped[1234] ^= 0xff;
    server.corrupt_blob_object(&layer_digest, &flipped);
    server.corrupt_blob_object(&short_digest, &short[..1000]);
    server.remove_blob_object(&gone_digest);

    // Verifying runs beside the live server and finds all three.
    let (code, out, err) = server.fsck(&["--jobs", "2"]);
    assert_eq!(code, 1, "bad blobs make fsck fail: {out}{err}");
    assert!(
        out.contains(&format!(
            "{layer_digest}: wrong digest: the stored bytes hash to {}",
            sha256(&flipped)
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "{short_digest}: wrong size: 65536 bytes recorded, 1000 stored"
        )),
        "{out}"
    );
    assert!(out.contains(&format!("{gone_digest}: missing")), "{out}");
    assert!(!out.contains(&good_digest), "a good blob is not reported: {out}");
    assert!(
        out.contains("fsck: 5 blobs") && out.contains("3 bad (1 missing, 1 wrong size, 1 wrong digest)"),
        "{out}"
    );
    let checked = 300 * 1024 + 1000 + 5000 + config_len();
    assert!(
        out.contains(&format!(" {checked} bytes checked")),
        "bytes read and hashed: {out}"
    );

    // Repairing needs the server stopped: the data directory's lock says so, and nothing moves.
    let (code, out, err) = server.fsck(&["--repair"]);
    assert_eq!(code, 2, "repair beside a live server is refused: {out}{err}");
    assert!(
        err.contains("in use by another stowage process") && err.contains("`stowage serve`"),
        "{err}"
    );
    assert!(server.blob_object_exists(&layer_digest), "nothing was quarantined");
    assert!(server.quarantined_objects().is_empty());

    assert!(server.terminate().success());
    let (code, out, err) = server.fsck(&["--repair"]);
    assert_eq!(code, 1, "repair still reports what it found: {out}{err}");
    assert!(out.contains(&format!("{layer_digest}: quarantined to")), "{out}");
    assert!(out.contains(&format!("{short_digest}: quarantined to")), "{out}");
    assert!(
        out.contains(&format!(
            "{layer_digest}: forgotten by the catalog (was linked to 2 repositories)"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("{gone_digest}: forgotten by the catalog")),
        "{out}"
    );
    assert!(out.contains("2 quarantined, 3 forgotten, 0 repairs failed"), "{out}");
    let mut quarantined = server.quarantined_objects();
    quarantined.sort();
    let hex = |d: &str| d.trim_start_matches("sha256:").to_owned();
    let mut want = [hex(&layer_digest), hex(&short_digest)];
    want.sort();
    assert_eq!(quarantined.len(), 2, "{quarantined:?}");
    for (key, hex) in quarantined.iter().zip(&want) {
        assert!(
            key.starts_with(&format!("quarantine/sha256/{hex}.")),
            "quarantine/<algorithm>/<hex>.<unix time>: {key}"
        );
    }
    assert!(!server.blob_object_exists(&layer_digest), "the bad object left blobs/");
    let (code, out, err) = server.fsck(&[]);
    assert_eq!(code, 0, "after the repair the store is clean: {out}{err}");
    assert!(out.contains("fsck: 2 blobs"), "{out}");

    server.crash_and_restart();
    // The manifest stays readable; its forgotten layer is unknown until pushed again.
    let resp = client()
        .get(server.v2("fsck/app/manifests/v1"))
        .send()
        .await
        .expect("GET manifest");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["docker-content-digest"], manifest_digest.as_str());
    assert_eq!(resp.bytes().await.expect("body").as_ref(), manifest.as_slice());
    assert_eq!(get_blob(&server, "fsck/app", &layer_digest).await.0, 404);
    assert_eq!(get_blob(&server, "fsck/other", &layer_digest).await.0, 404);

    // Pushed again, the blob is stored afresh: deduplication no longer trusts the bad object.
    push_blob(&server, "fsck/other", &layer).await;
    push_blob(&server, "fsck/app", &short).await;
    let (status, body) = get_blob(&server, "fsck/other", &layer_digest).await;
    assert_eq!(status, 200);
    assert_eq!(sha256(&body), layer_digest, "the re-pushed blob serves the right bytes");
    let (status, body) = get_blob(&server, "fsck/app", &short_digest).await;
    assert_eq!((status, body.len()), (200, short.len()));
    assert_eq!(sha256(&body), short_digest);
    let (status, body) = get_blob(&server, "fsck/app", &good_digest).await;
    assert_eq!((status, body), (200, good));
    let (code, out, err) = server.fsck(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("fsck: 4 blobs"), "{out}");
}

/// The config blob `push_image` pushes.
fn config_len() -> usize {
    br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#.len()
}

#[tokio::test]
async fn a_second_server_on_the_same_data_directory_refuses_to_start() {
    let mut server = TestServer::start();
    push_blob(&server, "lock/me", b"still here").await;
    let out = server
        .stowage_command(&["serve"])
        .env("STOWAGE_LISTEN", "127.0.0.1:0")
        .output()
        .expect("run a second stowage serve");
    assert!(!out.status.success(), "the second server must not run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use by another stowage process") && err.contains("only one server"),
        "a clear error: {err}"
    );
    assert_eq!(get_blob(&server, "lock/me", &sha256(b"still here")).await.0, 200);

    // The lock dies with its holder, SIGKILL included: a restart after a crash is not refused.
    server.crash_and_restart();
    assert_eq!(get_blob(&server, "lock/me", &sha256(b"still here")).await.0, 200);
}

/// A corrupt Spack index blob: repair forgets it and marks the index stale, so the next read of
/// `index.spack` builds and stores it again, and the served index hashes to its digest.
#[tokio::test]
async fn a_repaired_spack_index_blob_is_rebuilt_on_the_next_read() {
    use common::spack::{FixtureRepo, in_buildcache, push_fixture, served_index};
    let mut server = TestServer::start();
    let fixture = FixtureRepo::load("http-noauth", "spack_buildcache");
    push_fixture(&server, "fsck/spack", &fixture).await;
    let (manifest, index) = served_index(&server, "fsck/spack").await;
    let index_digest = manifest["layers"][0]["digest"]
        .as_str()
        .expect("index layer")
        .to_owned();
    server.corrupt_blob_object(&index_digest, b"{\"not\": \"the index\"}");

    assert!(server.terminate().success());
    let (code, out, err) = server.fsck(&["--repair"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains(&format!("{index_digest}: quarantined to")), "{out}");
    server.crash_and_restart();

    let (rebuilt_manifest, rebuilt) = served_index(&server, "fsck/spack").await;
    assert_eq!(rebuilt_manifest, manifest, "the same index, stored again");
    assert_eq!(in_buildcache(&rebuilt), in_buildcache(&index));
    let (code, out, err) = server.fsck(&[]);
    assert_eq!(code, 0, "{out}{err}");
}

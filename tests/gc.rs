//! Garbage collection: unreferenced blobs leave their repositories after the grace period and
//! leave storage once no repository links them; referenced blobs, shared blobs and fresh
//! uploads stay; objects the catalog does not know are removed; and collection running beside
//! pushes never leaves a manifest with a missing blob.

mod common;

use std::time::{Duration, Instant};

use common::{Backend, TestServer, client, push_blob, sha256};

/// Collection every second; `grace` seconds of grace.
fn gc_server(backend: Backend, grace: &str) -> TestServer {
    TestServer::start_on(
        backend,
        &[("STOWAGE_GC__INTERVAL_SECS", "1"), ("STOWAGE_GC__GRACE_SECS", grace)],
    )
}

/// Polls `done` every 200 ms until it holds; fails after 60 s (collection runs every second).
/// The pause is between polls of a condition, never a wait standing in for one.
async fn wait_until<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !done().await {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn blob_status(server: &TestServer, repo: &str, digest: &str) -> u16 {
    blob_status_with(&client(), server, repo, digest).await
}

async fn blob_status_with(http: &reqwest::Client, server: &TestServer, repo: &str, digest: &str) -> u16 {
    http.get(server.v2(&format!("{repo}/blobs/{digest}")))
        .send()
        .await
        .expect("GET blob")
        .status()
        .as_u16()
}

/// Pushes a one-layer image as `push_image` does, again when collection (with no grace
/// period) removed its blobs between their upload and the manifest: the manifest PUT then
/// answers `MANIFEST_BLOB_UNKNOWN`, and a client pushes the blobs again. Returns the manifest's
/// digest and bytes.
async fn push_image_again_if_collected(server: &TestServer, repo: &str, tag: &str, layer: &[u8]) -> (String, Vec<u8>) {
    let http = client();
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    for _attempt in 0..10 {
        let config_digest = push_blob(server, repo, config).await;
        let layer_digest = push_blob(server, repo, layer).await;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": layer_digest, "size": layer.len()}],
        }))
        .expect("manifest");
        let resp = http
            .put(server.v2(&format!("{repo}/manifests/{tag}")))
            .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            .body(manifest.clone())
            .send()
            .await
            .expect("PUT manifest");
        match resp.status().as_u16() {
            201 => return (sha256(&manifest), manifest),
            400 => {
                let body = resp.text().await.unwrap_or_default();
                assert!(body.contains("MANIFEST_BLOB_UNKNOWN"), "unexpected refusal: {body}");
            }
            s => panic!("manifest PUT answered {s}"),
        }
    }
    panic!("{repo}:{tag} could not be pushed in 10 attempts");
}

/// The config and layer digests of a manifest.
fn blobs_of(manifest: &[u8]) -> (String, String) {
    let m: serde_json::Value = serde_json::from_slice(manifest).expect("manifest JSON");
    let config = m["config"]["digest"].as_str().expect("config").to_owned();
    let layer = m["layers"][0]["digest"].as_str().expect("layer").to_owned();
    (config, layer)
}

#[tokio::test]
async fn unreferenced_blobs_are_collected_and_referenced_ones_kept() {
    let server = gc_server(common::backend(), "0");
    let (app, app_manifest) = push_image_again_if_collected(&server, "gc/app", "v1", b"layer of app").await;
    let (_, other_manifest) = push_image_again_if_collected(&server, "gc/other", "v1", b"layer of other").await;
    let (config, app_layer) = blobs_of(&app_manifest);
    let (other_config, other_layer) = blobs_of(&other_manifest);
    assert_eq!(config, other_config, "both images share their config blob");
    let lone = push_blob(&server, "gc/app", b"uploaded, never referenced").await;

    wait_until("the unreferenced blob is gone", || async {
        blob_status(&server, "gc/app", &lone).await == 404 && !server.blob_object_exists(&lone)
    })
    .await;
    for (repo, digest) in [("gc/app", &config), ("gc/app", &app_layer), ("gc/other", &other_layer)] {
        assert_eq!(
            blob_status(&server, repo, digest).await,
            200,
            "{repo} {digest} is referenced"
        );
        assert!(server.blob_object_exists(digest));
    }

    // Deleting gc/app's manifest frees its layer everywhere and its config in gc/app only: the
    // config is still referenced by gc/other's manifest.
    let resp = client()
        .delete(server.v2(&format!("gc/app/manifests/{app}")))
        .send()
        .await
        .expect("DELETE manifest");
    assert_eq!(resp.status(), 202);
    wait_until("the deleted image's blobs are gone", || async {
        blob_status(&server, "gc/app", &app_layer).await == 404
            && blob_status(&server, "gc/app", &config).await == 404
            && !server.blob_object_exists(&app_layer)
    })
    .await;
    assert_eq!(
        blob_status(&server, "gc/other", &config).await,
        200,
        "shared config kept"
    );
    assert_eq!(blob_status(&server, "gc/other", &other_layer).await, 200);
    assert!(server.blob_object_exists(&config));
}

#[tokio::test]
async fn objects_the_catalog_does_not_know_are_removed() {
    let server = gc_server(common::backend(), "0");
    let (_, manifest) = push_image_again_if_collected(&server, "gc/orphans", "v1", b"a kept layer").await;
    let (_, layer) = blobs_of(&manifest);
    let orphan = sha256(b"published, then the server crashed before linking it");
    server.plant_blob_object(&orphan, Duration::from_secs(3600));
    assert!(server.blob_object_exists(&orphan));
    wait_until("the orphan object is gone", || async {
        !server.blob_object_exists(&orphan)
    })
    .await;
    assert_eq!(blob_status(&server, "gc/orphans", &layer).await, 200);
    assert!(server.blob_object_exists(&layer));
}

/// With a grace period, a fresh unreferenced upload survives collection passes (an orphan
/// planted afterwards shows that passes ran). Local disk only: only there can an object be
/// planted with an old date.
#[tokio::test]
async fn fresh_unreferenced_blobs_survive_the_grace_period() {
    let server = gc_server(Backend::Fs, "3600");
    let fresh = push_blob(&server, "gc/grace", b"pushed a moment ago, manifest to follow").await;
    let orphan = sha256(b"an old orphan");
    server.plant_blob_object(&orphan, Duration::from_secs(7200));
    wait_until("a pass removed the old orphan", || async {
        !server.blob_object_exists(&orphan)
    })
    .await;
    assert_eq!(
        blob_status(&server, "gc/grace", &fresh).await,
        200,
        "within the grace period"
    );
    assert!(server.blob_object_exists(&fresh));
}

/// Pushes race collection with no grace period: blobs may vanish between their upload and the
/// manifest (the manifest PUT then fails and the client pushes again, as real clients do), but
/// a manifest once stored never lacks a blob, and every blob reads back byte-exact. The layers
/// are shared, so uploads keep publishing digests that collection is deleting.
#[tokio::test]
async fn collection_beside_pushes_never_breaks_a_stored_image() {
    let server = std::sync::Arc::new(gc_server(common::backend(), "0"));
    let layers: Vec<Vec<u8>> = (0..4)
        .map(|i| format!("shared layer {i}").repeat(100).into_bytes())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut tasks = Vec::new();
    for worker in 0..6 {
        let (server, layers) = (server.clone(), layers.clone());
        tasks.push(tokio::spawn(async move {
            let http = client();
            let mut kept = Vec::new();
            let mut n = 0;
            while Instant::now() < deadline {
                n += 1;
                let repo = format!("gc/race{}", worker % 3);
                let tag = format!("w{worker}-{n}");
                let layer = &layers[n % layers.len()];
                let mut stored = false;
                for _attempt in 0..10 {
                    let config = format!(r#"{{"architecture":"amd64","os":"linux","n":"{tag}"}}"#).into_bytes();
                    let config_digest = push_blob(&server, &repo, &config).await;
                    let layer_digest = push_blob(&server, &repo, layer).await;
                    let manifest = serde_json::json!({
                        "schemaVersion": 2,
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                   "digest": config_digest, "size": config.len()},
                        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                    "digest": layer_digest, "size": layer.len()}],
                    });
                    let resp = http
                        .put(server.v2(&format!("{repo}/manifests/{tag}")))
                        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                        .body(serde_json::to_vec(&manifest).expect("manifest"))
                        .send()
                        .await
                        .expect("PUT manifest");
                    match resp.status().as_u16() {
                        201 => {
                            stored = true;
                            kept.push((repo.clone(), config, config_digest, layer.clone(), layer_digest));
                            break;
                        }
                        400 => {
                            let body = resp.text().await.unwrap_or_default();
                            assert!(body.contains("MANIFEST_BLOB_UNKNOWN"), "unexpected refusal: {body}");
                        }
                        s => panic!("manifest PUT answered {s}"),
                    }
                }
                assert!(stored, "{tag} could not be stored in 10 attempts");
            }
            kept
        }));
    }
    let mut images = Vec::new();
    for t in tasks {
        images.extend(t.await.expect("pusher"));
    }
    assert!(images.len() >= 6, "every pusher stored images");
    // Let a whole pass run over the final state: an object planted now is gone once a pass
    // has listed it, and a second one planted after that once a pass that began later has.
    for n in 0..2 {
        let marker = sha256(format!("pass marker {n}").as_bytes());
        server.plant_blob_object(&marker, Duration::from_secs(3600));
        wait_until("a collection pass ran", || async {
            !server.blob_object_exists(&marker)
        })
        .await;
    }
    for (repo, config, config_digest, layer, layer_digest) in images {
        for (data, digest) in [(config, config_digest), (layer, layer_digest)] {
            let resp = client()
                .get(server.v2(&format!("{repo}/blobs/{digest}")))
                .send()
                .await
                .expect("GET blob");
            assert_eq!(resp.status(), 200, "{repo} {digest} of a stored image");
            assert_eq!(resp.bytes().await.expect("body").as_ref(), data.as_slice(), "{digest}");
        }
    }
}

/// More unreferenced blobs than one catalog batch (500) are all collected.
#[tokio::test]
async fn collection_works_through_many_batches() {
    use futures_util::StreamExt;
    let server = std::sync::Arc::new(gc_server(common::backend(), "0"));
    let blobs: Vec<Vec<u8>> = (0..1_100)
        .map(|i| format!("unreferenced blob {i}").into_bytes())
        .collect();
    // One client for all (building one per request costs more than the request).
    let http = client();
    let digests: Vec<String> = futures_util::stream::iter(blobs.iter())
        .map(|blob| {
            let (server, http) = (server.clone(), http.clone());
            async move {
                let digest = sha256(blob);
                let resp = http
                    .post(server.v2(&format!("gc/many/blobs/uploads/?digest={digest}")))
                    .body(blob.clone())
                    .send()
                    .await
                    .expect("POST blob");
                assert_eq!(resp.status(), 201);
                digest
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    wait_until("every blob is gone", || async {
        for d in [&digests[0], &digests[550], &digests[1_099]] {
            if blob_status_with(&http, &server, "gc/many", d).await != 404 {
                return false;
            }
        }
        true
    })
    .await;
    // Every one, including those pushed while a pass ran (the next pass takes them).
    for d in &digests {
        wait_until("each blob is gone", || async {
            blob_status_with(&http, &server, "gc/many", d).await == 404 && !server.blob_object_exists(d)
        })
        .await;
    }
}

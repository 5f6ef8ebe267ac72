//! Garbage collection: unreferenced blobs leave their repositories after the grace period and
//! leave storage once no repository links them; referenced blobs, shared blobs and fresh
//! uploads stay; objects the catalog does not know are removed; and collection running beside
//! pushes never leaves a manifest with a missing blob.

mod common;

use std::time::{Duration, Instant};

use common::{Backend, TestServer, client, push_blob, sha256, wait_until};

/// Collection every second; `grace` seconds of grace.
fn gc_server(backend: Backend, grace: &str) -> TestServer {
    TestServer::start_on(
        backend,
        &[
            ("STOWAGE_GC__INTERVAL_SECS", "1"),
            ("STOWAGE_GC__ORPHAN_INTERVAL_SECS", "1"),
            ("STOWAGE_GC__GRACE_SECS", grace),
        ],
    )
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
/// a tag always names the manifest pushed to it last, that manifest never lacks a blob, and
/// every blob reads back byte-exact. The layers are shared, so uploads keep publishing digests
/// that collection is deleting, and tags are re-pushed, so collection keeps removing the
/// manifests they named before.
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
            // Each worker re-pushes its own three tags over and over: every push leaves the
            // tag's previous manifest untagged, for collection to remove.
            let mut kept = std::collections::HashMap::new();
            let mut n = 0;
            while Instant::now() < deadline {
                n += 1;
                let repo = format!("gc/race{}", worker % 3);
                let tag = format!("w{worker}-{}", n % 3);
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
                    let body = serde_json::to_vec(&manifest).expect("manifest");
                    let resp = http
                        .put(server.v2(&format!("{repo}/manifests/{tag}")))
                        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                        .body(body.clone())
                        .send()
                        .await
                        .expect("PUT manifest");
                    match resp.status().as_u16() {
                        201 => {
                            stored = true;
                            let image = (body, config, config_digest, layer.clone(), layer_digest);
                            kept.insert((repo.clone(), tag.clone()), image);
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
    for ((repo, tag), (manifest, config, config_digest, layer, layer_digest)) in images {
        let resp = client()
            .get(server.v2(&format!("{repo}/manifests/{tag}")))
            .header("Accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await
            .expect("GET manifest");
        assert_eq!(resp.status(), 200, "{repo}:{tag}");
        assert_eq!(
            resp.bytes().await.expect("body").as_ref(),
            manifest.as_slice(),
            "{repo}:{tag} is the last push"
        );
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

/// Status of `GET /v2/<repo>/manifests/<reference>`.
async fn manifest_status(server: &TestServer, repo: &str, reference: &str) -> u16 {
    client()
        .get(server.v2(&format!("{repo}/manifests/{reference}")))
        .header(
            "Accept",
            "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
        )
        .send()
        .await
        .expect("GET manifest")
        .status()
        .as_u16()
}

/// PUTs `manifest` (JSON) under `reference`; returns its digest.
async fn put_manifest(server: &TestServer, repo: &str, reference: &str, manifest: serde_json::Value) -> String {
    let media_type = manifest["mediaType"].as_str().expect("mediaType").to_owned();
    let body = serde_json::to_vec(&manifest).expect("manifest");
    let resp = client()
        .put(server.v2(&format!("{repo}/manifests/{reference}")))
        .header("Content-Type", media_type)
        .body(body.clone())
        .send()
        .await
        .expect("PUT manifest");
    assert_eq!(resp.status(), 201, "PUT {repo}:{reference}");
    sha256(&body)
}

async fn delete_manifest(server: &TestServer, repo: &str, reference: &str) {
    let resp = client()
        .delete(server.v2(&format!("{repo}/manifests/{reference}")))
        .send()
        .await
        .expect("DELETE manifest");
    assert_eq!(resp.status(), 202, "DELETE {repo}:{reference}");
}

/// Waits until a whole collection pass ran after this call: an unreferenced blob pushed now
/// goes in the first pass that begins after it (no grace period), so two of them, the second
/// pushed after the first is gone, prove that a pass began and ended meanwhile.
async fn wait_for_whole_pass(server: &TestServer, repo: &str) {
    for n in 0..2 {
        let marker = push_blob(server, repo, format!("pass marker {n} {:?}", Instant::now()).as_bytes()).await;
        wait_until("a collection pass ran", || async {
            blob_status(server, repo, &marker).await == 404
        })
        .await;
    }
}

/// A one-layer image manifest over blobs pushed to `repo`, with an optional subject.
async fn image_manifest(
    server: &TestServer,
    repo: &str,
    layer: &[u8],
    subject: Option<(&str, usize)>,
) -> serde_json::Value {
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let config_digest = push_blob(server, repo, config).await;
    let layer_digest = push_blob(server, repo, layer).await;
    let mut m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest, "size": layer.len()}],
    });
    if let Some((digest, size)) = subject {
        m["subject"] = serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": size,
        });
        m["artifactType"] = serde_json::json!("application/vnd.example.signature");
    }
    m
}

/// A re-pushed tag leaves its old manifest untagged: the manifest goes one grace period after
/// the tag moved and its layer one grace period after that (a client that saw either has that
/// long to use it), never sooner; the image the tag names now stays whole.
#[tokio::test]
async fn a_re_pushed_tag_releases_the_old_manifest_and_layers_after_the_grace_period() {
    const GRACE: Duration = Duration::from_secs(2);
    let server = gc_server(common::backend(), "2");
    let repo = "gc/repush";
    let (old, old_manifest) = push_image_again_if_collected(&server, repo, "latest", b"old build's layer").await;
    let (_, old_layer) = blobs_of(&old_manifest);
    let moved = Instant::now();
    let (new, new_manifest) = push_image_again_if_collected(&server, repo, "latest", b"new build's layer").await;
    assert_ne!(old, new);

    let (manifest_gone, layer_gone) = (std::cell::Cell::new(None), std::cell::Cell::new(None));
    wait_until("the old manifest and its layer are gone", || async {
        let manifest = manifest_status(&server, repo, &old).await;
        let layer = blob_status(&server, repo, &old_layer).await;
        if manifest == 404 && manifest_gone.get().is_none() {
            manifest_gone.set(Some(moved.elapsed()));
        }
        if manifest == 200 {
            assert_eq!(layer, 200, "the layer of a stored manifest is never collected");
        }
        if layer == 404 && layer_gone.get().is_none() {
            layer_gone.set(Some(moved.elapsed()));
        }
        manifest == 404 && layer == 404 && !server.blob_object_exists(&old_layer)
    })
    .await;
    let (manifest_gone, layer_gone) = (
        manifest_gone.get().expect("seen gone"),
        layer_gone.get().expect("seen gone"),
    );
    assert!(
        manifest_gone > GRACE,
        "old manifest removed {manifest_gone:?} after its tag moved"
    );
    assert!(
        layer_gone > 2 * GRACE,
        "old layer removed {layer_gone:?} after its tag moved"
    );

    assert_eq!(manifest_status(&server, repo, "latest").await, 200);
    assert_eq!(manifest_status(&server, repo, &new).await, 200);
    let (config, layer) = blobs_of(&new_manifest);
    for digest in [&config, &layer] {
        let resp = client()
            .get(server.v2(&format!("{repo}/blobs/{digest}")))
            .send()
            .await
            .expect("GET blob");
        assert_eq!(resp.status(), 200, "{digest} of the tagged image");
        assert_eq!(&sha256(&resp.bytes().await.expect("body")), digest);
    }
}

/// Untagged manifests that something keeps stay: an index's children while the index is
/// tagged, and the referrers (and referrers of referrers) of a kept manifest. Referrers of a
/// removed manifest go with it, an untagged stray goes, and untagging the index frees its
/// children.
#[tokio::test]
async fn index_children_and_referrers_of_kept_manifests_survive() {
    // Set up with an hour's grace (no grace would collect blobs between their upload and the
    // manifest that references them), then collect with none.
    let mut server = gc_server(common::backend(), "3600");
    let repo = "gc/keep";
    // An index tagged `multi` over two untagged platform manifests.
    let amd = image_manifest(&server, repo, b"amd64 layer", None).await;
    let arm = image_manifest(&server, repo, b"arm64 layer", None).await;
    let (amd_len, arm_len) = (
        serde_json::to_vec(&amd).expect("json").len(),
        serde_json::to_vec(&arm).expect("json").len(),
    );
    let amd = put_manifest(&server, repo, &sha256(&serde_json::to_vec(&amd).expect("json")), amd).await;
    let arm = put_manifest(&server, repo, &sha256(&serde_json::to_vec(&arm).expect("json")), arm).await;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": amd, "size": amd_len,
             "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": arm, "size": arm_len,
             "platform": {"architecture": "arm64", "os": "linux"}},
        ],
    });
    let index = put_manifest(&server, repo, "multi", index).await;

    // A tagged image with a signature, and a signature of that signature (both untagged).
    let (image, image_body) = push_image_again_if_collected(&server, repo, "app", b"app layer").await;
    let sig = image_manifest(&server, repo, b"signature", Some((&image, image_body.len()))).await;
    let sig_body = serde_json::to_vec(&sig).expect("json");
    let sig = put_manifest(&server, repo, &sha256(&sig_body), sig).await;
    let sig2 = image_manifest(&server, repo, b"countersignature", Some((&sig, sig_body.len()))).await;
    let sig2 = put_manifest(&server, repo, &sha256(&serde_json::to_vec(&sig2).expect("json")), sig2).await;

    // An image whose tag is deleted, with a signature: both go. And an untagged stray.
    let (gone, gone_body) = push_image_again_if_collected(&server, repo, "old", b"old layer").await;
    let gone_sig = image_manifest(&server, repo, b"old signature", Some((&gone, gone_body.len()))).await;
    let gone_sig = put_manifest(
        &server,
        repo,
        &sha256(&serde_json::to_vec(&gone_sig).expect("json")),
        gone_sig,
    )
    .await;
    delete_manifest(&server, repo, "old").await;
    let stray = image_manifest(&server, repo, b"stray layer", None).await;
    let stray = put_manifest(
        &server,
        repo,
        &sha256(&serde_json::to_vec(&stray).expect("json")),
        stray,
    )
    .await;
    server.crash_and_restart_with(&[("STOWAGE_GC__GRACE_SECS", "0")]);

    wait_until("the untagged image, its signature and the stray are gone", || async {
        manifest_status(&server, repo, &gone).await == 404
            && manifest_status(&server, repo, &gone_sig).await == 404
            && manifest_status(&server, repo, &stray).await == 404
    })
    .await;
    wait_for_whole_pass(&server, repo).await;
    for (what, digest) in [
        ("index", &index),
        ("amd64 child", &amd),
        ("arm64 child", &arm),
        ("image", &image),
        ("signature", &sig),
        ("countersignature", &sig2),
    ] {
        assert_eq!(
            manifest_status(&server, repo, digest).await,
            200,
            "{what} {digest} is kept"
        );
    }
    let referrers: serde_json::Value = client()
        .get(server.v2(&format!("{repo}/referrers/{image}")))
        .send()
        .await
        .expect("GET referrers")
        .json()
        .await
        .expect("referrers JSON");
    assert_eq!(referrers["manifests"][0]["digest"], sig.as_str(), "{referrers}");

    // Untagged, the index goes, and then its children.
    delete_manifest(&server, repo, "multi").await;
    wait_until("the index and its children are gone", || async {
        manifest_status(&server, repo, &index).await == 404
            && manifest_status(&server, repo, &amd).await == 404
            && manifest_status(&server, repo, &arm).await == 404
    })
    .await;
    assert_eq!(
        manifest_status(&server, repo, &sig2).await,
        200,
        "the image's referrers stay"
    );
}

/// `gc.untagged_manifests = false`: untagged manifests stay.
#[tokio::test]
async fn untagged_manifest_collection_can_be_turned_off() {
    let mut server = TestServer::start_on(
        common::backend(),
        &[
            ("STOWAGE_GC__INTERVAL_SECS", "1"),
            ("STOWAGE_GC__GRACE_SECS", "3600"),
            ("STOWAGE_GC__UNTAGGED_MANIFESTS", "false"),
        ],
    );
    let repo = "gc/off";
    let stray = image_manifest(&server, repo, b"kept stray", None).await;
    let stray = put_manifest(
        &server,
        repo,
        &sha256(&serde_json::to_vec(&stray).expect("json")),
        stray,
    )
    .await;
    server.crash_and_restart_with(&[("STOWAGE_GC__GRACE_SECS", "0")]);
    wait_for_whole_pass(&server, repo).await;
    wait_for_whole_pass(&server, repo).await;
    assert_eq!(manifest_status(&server, repo, &stray).await, 200);
}

/// A Spack build cache's current index manifest is never tagged, yet collection, even with no
/// grace period, keeps it and its blob.
#[tokio::test]
async fn the_current_spack_index_is_kept() {
    use common::spack::{FixtureRepo, push_fixture, served_index};
    let mut server = gc_server(common::backend(), "3600");
    let repo = "gc/spack";
    let fixture = FixtureRepo::load("http-noauth", "spack_buildcache");
    push_fixture(&server, repo, &fixture).await;
    let (first, _) = served_index(&server, repo).await;
    server.crash_and_restart_with(&[("STOWAGE_GC__GRACE_SECS", "0")]);
    wait_for_whole_pass(&server, repo).await;
    wait_for_whole_pass(&server, repo).await;
    let (again, index) = served_index(&server, repo).await;
    assert_eq!(
        first, again,
        "the current index survived collection and was not rebuilt"
    );
    assert_eq!(index, fixture.spack_index().expect("fixture index"));
}

/// A superseded index's blob goes `gc.spack_index_grace_secs` after the new index was
/// published, not a whole grace period (here an hour) later, and not before.
#[tokio::test]
async fn a_superseded_spack_index_blob_is_removed_promptly() {
    use common::spack::{FixtureRepo, push_fixture, served_index};
    const INDEX_GRACE: Duration = Duration::from_secs(2);
    let server = TestServer::start_on(
        common::backend(),
        &[
            ("STOWAGE_GC__GRACE_SECS", "3600"),
            ("STOWAGE_GC__SPACK_INDEX_GRACE_SECS", "2"),
        ],
    );
    let repo = "gc/spack";
    let fixture = FixtureRepo::load("http-noauth", "spack_buildcache");
    push_fixture(&server, repo, &fixture).await;
    let (first, _) = served_index(&server, repo).await;
    let old_blob = first["layers"][0]["digest"].as_str().expect("layer").to_owned();

    // A spec leaves: the next read builds a new index and supersedes the old one.
    let spec = fixture.spec_tags().into_iter().next().expect("a spec tag");
    delete_manifest(&server, repo, &spec).await;
    let superseded = Instant::now();
    let (second, _) = served_index(&server, repo).await;
    assert_ne!(first, second);
    let gone_after = std::cell::Cell::new(None);
    wait_until("the superseded index blob is gone", || async {
        let gone = blob_status(&server, repo, &old_blob).await == 404;
        if gone && gone_after.get().is_none() {
            gone_after.set(Some(superseded.elapsed()));
        }
        gone && !server.blob_object_exists(&old_blob)
    })
    .await;
    let gone_after = gone_after.get().expect("seen gone");
    assert!(
        gone_after > INDEX_GRACE,
        "superseded index blob removed after {gone_after:?}"
    );
    let (third, _) = served_index(&server, repo).await;
    assert_eq!(second, third, "the current index stays");
}

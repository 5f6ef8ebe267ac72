//! Manifests: PUT/GET/HEAD/DELETE (end-3, end-7, end-9) for OCI image manifests and indexes and
//! Docker schema2 manifests and manifest lists; validation and error codes.
mod common;

use common::oci::{assert_error, header};

use common::{TestServer, client, push_blob, push_image, sha256};
use reqwest::Response;
use serde_json::{Value, json};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

async fn put_manifest(server: &TestServer, repo: &str, reference: &str, content_type: &str, body: &[u8]) -> Response {
    client()
        .put(server.v2(&format!("{repo}/manifests/{reference}")))
        .header("Content-Type", content_type)
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
}

async fn put_ok(server: &TestServer, repo: &str, reference: &str, content_type: &str, body: &[u8]) -> String {
    let resp = put_manifest(server, repo, reference, content_type, body).await;
    let status = resp.status();
    let digest = header(&resp, "docker-content-digest");
    let loc = header(&resp, "location");
    let text = resp.text().await.unwrap();
    assert_eq!(status, 201, "PUT {repo}:{reference}: {text}");
    assert_eq!(
        digest.as_deref(),
        Some(sha256(body).as_str()),
        "Docker-Content-Digest on PUT"
    );
    assert!(loc.is_some(), "Location on manifest PUT");
    sha256(body)
}

async fn get_manifest(server: &TestServer, repo: &str, reference: &str) -> Response {
    client()
        .get(server.v2(&format!("{repo}/manifests/{reference}")))
        .header(
            "Accept",
            [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST].join(", "),
        )
        .send()
        .await
        .unwrap()
}

/// GET by `reference` answers exactly `body` with the given Content-Type, digest and length.
async fn assert_manifest(server: &TestServer, repo: &str, reference: &str, content_type: &str, body: &[u8]) {
    let resp = get_manifest(server, repo, reference).await;
    assert_eq!(resp.status(), 200, "GET {repo}/manifests/{reference}");
    assert_eq!(
        header(&resp, "content-type").as_deref(),
        Some(content_type),
        "Content-Type"
    );
    assert_eq!(
        header(&resp, "docker-content-digest"),
        Some(sha256(body)),
        "Docker-Content-Digest"
    );
    assert_eq!(
        header(&resp, "content-length"),
        Some(body.len().to_string()),
        "Content-Length"
    );
    let got = resp.bytes().await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(body),
        "byte-exact manifest"
    );
    assert_eq!(got.as_ref(), body);
}

async fn assert_no_manifest(server: &TestServer, repo: &str, reference: &str) {
    let resp = get_manifest(server, repo, reference).await;
    assert_error(resp, 404, &["MANIFEST_UNKNOWN"]).await;
    let resp = client()
        .head(server.v2(&format!("{repo}/manifests/{reference}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404, "HEAD {repo}/manifests/{reference}");
}

async fn tags(server: &TestServer, repo: &str) -> Vec<String> {
    let resp = client()
        .get(server.v2(&format!("{repo}/tags/list")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    match &v["tags"] {
        Value::Null => vec![],
        Value::Array(a) => a.iter().map(|t| t.as_str().unwrap().to_string()).collect(),
        other => panic!("tags is {other}"),
    }
}

/// Pushes a config and a layer blob and returns an OCI image manifest (pretty-printed with an
/// odd layout so that byte-exactness is observable) referencing them.
async fn oci_manifest(server: &TestServer, repo: &str, seed: &str) -> Vec<u8> {
    let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":"{seed}"}}"#);
    let layer = format!("layer bytes for {seed}");
    let cd = push_blob(server, repo, config.as_bytes()).await;
    let ld = push_blob(server, repo, layer.as_bytes()).await;
    format!(
        "{{\n  \"schemaVersion\" : 2,\n\t\"mediaType\": \"{OCI_MANIFEST}\",\n  \"config\": {{\"mediaType\": \"{OCI_CONFIG}\", \"digest\": \"{cd}\", \"size\": {}}},\n  \"layers\": [ {{ \"mediaType\": \"{OCI_LAYER}\", \"size\": {}, \"digest\": \"{ld}\" }} ],\n  \"annotations\": {{\"seed\": \"{seed}\"}}\n}}\n",
        config.len(),
        layer.len()
    )
    .into_bytes()
}

async fn docker_manifest(server: &TestServer, repo: &str, seed: &str) -> Vec<u8> {
    let config = format!(r#"{{"architecture":"arm64","os":"linux","docker":"{seed}"}}"#);
    let layer = format!("docker layer {seed}");
    let cd = push_blob(server, repo, config.as_bytes()).await;
    let ld = push_blob(server, repo, layer.as_bytes()).await;
    serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "size": config.len(), "digest": cd},
        "layers": [{"mediaType": DOCKER_LAYER, "size": layer.len(), "digest": ld}],
    }))
    .unwrap()
}

fn index_of(media_type: &str, child_type: &str, children: &[&[u8]]) -> Vec<u8> {
    let manifests: Vec<Value> = children
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({
                "mediaType": child_type,
                "digest": sha256(c),
                "size": c.len(),
                "platform": {"architecture": if i == 0 { "amd64" } else { "arm64" }, "os": "linux"},
            })
        })
        .collect();
    serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": media_type, "manifests": manifests})).unwrap()
}

#[tokio::test]
async fn oci_manifest_round_trip_by_tag_and_digest() {
    let server = TestServer::start();
    let body = oci_manifest(&server, "man/oci", "a").await;
    let digest = put_ok(&server, "man/oci", "v1", OCI_MANIFEST, &body).await;
    assert_manifest(&server, "man/oci", "v1", OCI_MANIFEST, &body).await;
    assert_manifest(&server, "man/oci", &digest, OCI_MANIFEST, &body).await;
}

#[tokio::test]
async fn manifest_put_location_is_pullable() {
    let server = TestServer::start();
    let body = oci_manifest(&server, "man/loc", "a").await;
    let resp = put_manifest(&server, "man/loc", "v1", OCI_MANIFEST, &body).await;
    assert_eq!(resp.status(), 201);
    let loc = header(&resp, "location").unwrap();
    let url = if loc.starts_with("http") {
        loc
    } else {
        format!("{}{loc}", server.url)
    };
    let resp = client().get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200, "GET {url}");
    assert_eq!(resp.bytes().await.unwrap().as_ref(), body.as_slice());
}

#[tokio::test]
async fn head_manifest_returns_headers_without_body() {
    let server = TestServer::start();
    let body = oci_manifest(&server, "man/head", "a").await;
    let digest = put_ok(&server, "man/head", "v1", OCI_MANIFEST, &body).await;
    for reference in ["v1", digest.as_str()] {
        let resp = client()
            .head(server.v2(&format!("man/head/manifests/{reference}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "docker-content-digest"), Some(digest.clone()));
        assert_eq!(header(&resp, "content-length"), Some(body.len().to_string()));
        assert_eq!(header(&resp, "content-type").as_deref(), Some(OCI_MANIFEST));
        assert!(resp.bytes().await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn oci_index_round_trip() {
    let server = TestServer::start();
    let m1 = oci_manifest(&server, "man/index", "amd").await;
    let m2 = oci_manifest(&server, "man/index", "arm").await;
    let d1 = put_ok(&server, "man/index", &sha256(&m1), OCI_MANIFEST, &m1).await;
    put_ok(&server, "man/index", &sha256(&m2), OCI_MANIFEST, &m2).await;
    let index = index_of(OCI_INDEX, OCI_MANIFEST, &[&m1, &m2]);
    let digest = put_ok(&server, "man/index", "multi", OCI_INDEX, &index).await;
    assert_manifest(&server, "man/index", "multi", OCI_INDEX, &index).await;
    assert_manifest(&server, "man/index", &digest, OCI_INDEX, &index).await;
    assert_manifest(&server, "man/index", &d1, OCI_MANIFEST, &m1).await;
}

#[tokio::test]
async fn oci_index_of_indexes_is_accepted() {
    let server = TestServer::start();
    let m1 = oci_manifest(&server, "man/nested", "x").await;
    put_ok(&server, "man/nested", &sha256(&m1), OCI_MANIFEST, &m1).await;
    let inner = index_of(OCI_INDEX, OCI_MANIFEST, &[&m1]);
    put_ok(&server, "man/nested", &sha256(&inner), OCI_INDEX, &inner).await;
    let outer = index_of(OCI_INDEX, OCI_INDEX, &[&inner]);
    put_ok(&server, "man/nested", "outer", OCI_INDEX, &outer).await;
    assert_manifest(&server, "man/nested", "outer", OCI_INDEX, &outer).await;
}

#[tokio::test]
async fn docker_schema2_manifest_round_trip() {
    let server = TestServer::start();
    let body = docker_manifest(&server, "man/docker", "a").await;
    let digest = put_ok(&server, "man/docker", "latest", DOCKER_MANIFEST, &body).await;
    assert_manifest(&server, "man/docker", "latest", DOCKER_MANIFEST, &body).await;
    assert_manifest(&server, "man/docker", &digest, DOCKER_MANIFEST, &body).await;
}

#[tokio::test]
async fn docker_manifest_list_round_trip() {
    let server = TestServer::start();
    let m1 = docker_manifest(&server, "man/dlist", "amd").await;
    let m2 = docker_manifest(&server, "man/dlist", "arm").await;
    put_ok(&server, "man/dlist", &sha256(&m1), DOCKER_MANIFEST, &m1).await;
    put_ok(&server, "man/dlist", &sha256(&m2), DOCKER_MANIFEST, &m2).await;
    let list = index_of(DOCKER_LIST, DOCKER_MANIFEST, &[&m1, &m2]);
    let digest = put_ok(&server, "man/dlist", "latest", DOCKER_LIST, &list).await;
    assert_manifest(&server, "man/dlist", "latest", DOCKER_LIST, &list).await;
    assert_manifest(&server, "man/dlist", &digest, DOCKER_LIST, &list).await;
}

#[tokio::test]
async fn put_by_digest_stores_without_tag() {
    let server = TestServer::start();
    let body = oci_manifest(&server, "man/bydigest", "a").await;
    let digest = put_ok(&server, "man/bydigest", &sha256(&body), OCI_MANIFEST, &body).await;
    assert_manifest(&server, "man/bydigest", &digest, OCI_MANIFEST, &body).await;
    assert!(tags(&server, "man/bydigest").await.is_empty());
}

#[tokio::test]
async fn put_by_digest_not_matching_body_is_400_digest_invalid() {
    let server = TestServer::start();
    let body = oci_manifest(&server, "man/mismatch", "a").await;
    let wrong = sha256(b"some other manifest");
    let resp = put_manifest(&server, "man/mismatch", &wrong, OCI_MANIFEST, &body).await;
    assert_error(resp, 400, &["DIGEST_INVALID"]).await;
    assert_no_manifest(&server, "man/mismatch", &wrong).await;
    assert_no_manifest(&server, "man/mismatch", &sha256(&body)).await;
}

#[tokio::test]
async fn put_by_sha512_digest_reference() {
    use sha2::Digest as _;
    let server = TestServer::start();
    let body = oci_manifest(&server, "man/sha512", "a").await;
    let d512 = format!("sha512:{}", hex::encode(sha2::Sha512::digest(&body)));
    let resp = put_manifest(&server, "man/sha512", &d512, OCI_MANIFEST, &body).await;
    assert_eq!(resp.status(), 201);
    assert_eq!(
        header(&resp, "docker-content-digest"),
        Some(d512.clone()),
        "digest MUST equal the client's"
    );
    let resp = get_manifest(&server, "man/sha512", &d512).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), body.as_slice());
}

#[tokio::test]
async fn missing_layer_blob_is_400_manifest_blob_unknown() {
    let server = TestServer::start();
    let config = br#"{"os":"linux"}"#;
    let cd = push_blob(&server, "man/missing", config).await;
    let body = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cd, "size": config.len()},
        "layers": [{"mediaType": OCI_LAYER, "digest": sha256(b"not pushed"), "size": 10}],
    }))
    .unwrap();
    let resp = put_manifest(&server, "man/missing", "v1", OCI_MANIFEST, &body).await;
    assert_error(resp, 400, &["MANIFEST_BLOB_UNKNOWN"]).await;
    assert_no_manifest(&server, "man/missing", "v1").await;
}

#[tokio::test]
async fn missing_config_blob_is_400_manifest_blob_unknown() {
    let server = TestServer::start();
    let layer = b"a layer";
    let ld = push_blob(&server, "man/missing", layer).await;
    let body = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256(b"no config"), "size": 9},
        "layers": [{"mediaType": OCI_LAYER, "digest": ld, "size": layer.len()}],
    }))
    .unwrap();
    let resp = put_manifest(&server, "man/missing", "v1", OCI_MANIFEST, &body).await;
    assert_error(resp, 400, &["MANIFEST_BLOB_UNKNOWN"]).await;
}

#[tokio::test]
async fn blob_held_only_by_another_repository_is_manifest_blob_unknown() {
    let server = TestServer::start();
    let body = oci_manifest(&server, "man/owner", "a").await;
    let resp = put_manifest(&server, "man/stranger", "v1", OCI_MANIFEST, &body).await;
    assert_error(resp, 400, &["MANIFEST_BLOB_UNKNOWN"]).await;
}

#[tokio::test]
async fn index_referencing_unknown_manifest_is_400_manifest_blob_unknown() {
    let server = TestServer::start();
    let m1 = oci_manifest(&server, "man/badindex", "a").await;
    put_ok(&server, "man/badindex", &sha256(&m1), OCI_MANIFEST, &m1).await;
    let never_pushed = oci_manifest(&server, "man/badindex", "b").await;
    let index = index_of(OCI_INDEX, OCI_MANIFEST, &[&m1, &never_pushed]);
    let resp = put_manifest(&server, "man/badindex", "multi", OCI_INDEX, &index).await;
    assert_error(resp, 400, &["MANIFEST_BLOB_UNKNOWN"]).await;
    assert_no_manifest(&server, "man/badindex", "multi").await;
}

#[tokio::test]
async fn docker_list_referencing_unknown_manifest_is_400_manifest_blob_unknown() {
    let server = TestServer::start();
    let never_pushed = docker_manifest(&server, "man/badlist", "a").await;
    let list = index_of(DOCKER_LIST, DOCKER_MANIFEST, &[&never_pushed]);
    let resp = put_manifest(&server, "man/badlist", "latest", DOCKER_LIST, &list).await;
    assert_error(resp, 400, &["MANIFEST_BLOB_UNKNOWN"]).await;
}

#[tokio::test]
async fn non_distributable_layers_may_be_missing() {
    let server = TestServer::start();
    let config = br#"{"os":"windows"}"#;
    let cd = push_blob(&server, "man/foreign", config).await;
    let body = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cd, "size": config.len()},
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            "digest": sha256(b"foreign base layer"),
            "size": 1234,
            "urls": ["https://example.invalid/layer"],
        }],
    }))
    .unwrap();
    put_ok(&server, "man/foreign", "oci", OCI_MANIFEST, &body).await;

    let docker = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "digest": cd, "size": config.len()},
        "layers": [{
            "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            "digest": sha256(b"windows base"),
            "size": 4321,
            "urls": ["https://example.invalid/windows"],
        }],
    }))
    .unwrap();
    put_ok(&server, "man/foreign", "docker", DOCKER_MANIFEST, &docker).await;
    assert_manifest(&server, "man/foreign", "docker", DOCKER_MANIFEST, &docker).await;
}

#[tokio::test]
async fn invalid_json_is_400_manifest_invalid() {
    let server = TestServer::start();
    push_blob(&server, "man/invalid", b"x").await;
    for body in [
        &b"{not json"[..],
        b"",
        b"[]",
        b"\"string\"",
        b"null",
        b"{\"schemaVersion\": 2,}",
    ] {
        let resp = put_manifest(&server, "man/invalid", "v1", OCI_MANIFEST, body).await;
        assert_error(resp, 400, &["MANIFEST_INVALID"]).await;
    }
    assert_no_manifest(&server, "man/invalid", "v1").await;
}

#[tokio::test]
async fn wrong_or_missing_schema_version_is_400_manifest_invalid() {
    let server = TestServer::start();
    let body = oci_manifest(&server, "man/schema", "a").await;
    let mut v: Value = serde_json::from_slice(&body).unwrap();
    for sv in [json!(1), json!(3), json!("2"), Value::Null] {
        if sv.is_null() {
            v.as_object_mut().unwrap().remove("schemaVersion");
        } else {
            v["schemaVersion"] = sv.clone();
        }
        let bad = serde_json::to_vec(&v).unwrap();
        let resp = put_manifest(&server, "man/schema", "v1", OCI_MANIFEST, &bad).await;
        assert_error(resp, 400, &["MANIFEST_INVALID"]).await;
    }
}

#[tokio::test]
async fn image_manifest_without_config_is_400_manifest_invalid() {
    let server = TestServer::start();
    let ld = push_blob(&server, "man/noconfig", b"layer").await;
    let body = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "layers": [{"mediaType": OCI_LAYER, "digest": ld, "size": 5}],
    }))
    .unwrap();
    let resp = put_manifest(&server, "man/noconfig", "v1", OCI_MANIFEST, &body).await;
    assert_error(resp, 400, &["MANIFEST_INVALID"]).await;
}

#[tokio::test]
async fn manifest_over_4_mib_is_413() {
    let server = TestServer::start();
    let config = br#"{"os":"linux"}"#;
    let cd = push_blob(&server, "man/big", config).await;
    let build = |pad: usize| {
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": cd, "size": config.len()},
            "layers": [],
            "annotations": {"pad": "x".repeat(pad)},
        }))
        .unwrap()
    };
    let overhead = build(0).len();
    let limit = 4 * 1024 * 1024;
    let exact = build(limit - overhead);
    assert_eq!(exact.len(), limit);
    // Exactly 4 MiB is accepted ("SHOULD expect to be able to support manifest pushes of at least
    // 4 megabytes").
    put_ok(&server, "man/big", "exact", OCI_MANIFEST, &exact).await;
    assert_manifest(&server, "man/big", "exact", OCI_MANIFEST, &exact).await;
    let over = build(limit - overhead + 1);
    let resp = put_manifest(&server, "man/big", "over", OCI_MANIFEST, &over).await;
    assert_error(resp, 413, &["MANIFEST_INVALID", "SIZE_INVALID"]).await;
    assert_no_manifest(&server, "man/big", "over").await;
}

#[tokio::test]
async fn configured_manifest_size_limit_is_enforced() {
    let server = TestServer::start_with(&[("STOWAGE_REGISTRY__MAX_MANIFEST_SIZE", "2000")]);
    let config = br#"{"os":"linux"}"#;
    let cd = push_blob(&server, "man/limit", config).await;
    let build = |pad: usize| {
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": cd, "size": config.len()},
            "layers": [],
            "annotations": {"pad": "y".repeat(pad)},
        }))
        .unwrap()
    };
    let overhead = build(0).len();
    put_ok(&server, "man/limit", "fits", OCI_MANIFEST, &build(2000 - overhead)).await;
    let resp = put_manifest(&server, "man/limit", "over", OCI_MANIFEST, &build(2001 - overhead)).await;
    assert_error(resp, 413, &["MANIFEST_INVALID", "SIZE_INVALID"]).await;
}

#[tokio::test]
async fn invalid_tag_is_400() {
    let server = TestServer::start();
    let body = oci_manifest(&server, "man/tags", "a").await;
    let too_long = "t".repeat(129);
    for tag in [
        "-leading-dash",
        ".leading-dot",
        "has+plus",
        "has%20space",
        "ümlaut",
        too_long.as_str(),
    ] {
        let resp = put_manifest(&server, "man/tags", tag, OCI_MANIFEST, &body).await;
        assert_error(resp, 400, &["TAG_INVALID", "MANIFEST_INVALID"]).await;
    }
    assert!(tags(&server, "man/tags").await.is_empty());
}

#[tokio::test]
async fn tag_edge_cases_that_are_valid() {
    let server = TestServer::start();
    let body = oci_manifest(&server, "man/tags", "a").await;
    let longest = format!("_{}", "T".repeat(127));
    for tag in ["_underscore", "UPPER.case-1_2", "0", longest.as_str()] {
        put_ok(&server, "man/tags", tag, OCI_MANIFEST, &body).await;
        assert_manifest(&server, "man/tags", tag, OCI_MANIFEST, &body).await;
    }
}

#[tokio::test]
async fn invalid_repository_name_is_400_name_invalid() {
    let server = TestServer::start();
    let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
    for name in [
        "Upper", "a..b", "-a", "a-", "a___b", "a._b", "_a", "a/-b", "a/B/c", "a/",
    ] {
        let resp = put_manifest(&server, name, "v1", OCI_MANIFEST, body).await;
        assert_error(resp, 400, &["NAME_INVALID"]).await;
        let resp = get_manifest(&server, name, "v1").await;
        assert_error(resp, 400, &["NAME_INVALID"]).await;
    }
}

#[tokio::test]
async fn repository_name_edge_cases_that_are_valid() {
    let server = TestServer::start();
    for name in ["a__b", "a---b", "a.b", "a_b/c-d/e.f", "0/1/2"] {
        let (digest, body) = push_image(&server, name, "v1", name.as_bytes()).await;
        assert_manifest(&server, name, "v1", OCI_MANIFEST, &body).await;
        assert_manifest(&server, name, &digest, OCI_MANIFEST, &body).await;
    }
}

#[tokio::test]
async fn unknown_manifest_is_404_manifest_unknown() {
    let server = TestServer::start();
    push_image(&server, "man/unknown", "v1", b"l").await;
    assert_no_manifest(&server, "man/unknown", "v2").await;
    assert_no_manifest(&server, "man/unknown", &sha256(b"nothing")).await;
}

#[tokio::test]
async fn manifest_in_unknown_repository_is_404() {
    let server = TestServer::start();
    let resp = get_manifest(&server, "never/pushed", "latest").await;
    assert_error(resp, 404, &["MANIFEST_UNKNOWN", "NAME_UNKNOWN"]).await;
}

#[tokio::test]
async fn manifest_is_scoped_to_its_repository() {
    let server = TestServer::start();
    let (digest, _) = push_image(&server, "man/here", "v1", b"l").await;
    push_image(&server, "man/there", "v2", b"m").await;
    assert_no_manifest(&server, "man/there", &digest).await;
    assert_no_manifest(&server, "man/there", "v1").await;
}

#[tokio::test]
async fn tag_can_be_repointed() {
    let server = TestServer::start();
    let m1 = oci_manifest(&server, "man/repoint", "one").await;
    let m2 = oci_manifest(&server, "man/repoint", "two").await;
    let d1 = put_ok(&server, "man/repoint", "latest", OCI_MANIFEST, &m1).await;
    assert_manifest(&server, "man/repoint", "latest", OCI_MANIFEST, &m1).await;
    put_ok(&server, "man/repoint", "latest", OCI_MANIFEST, &m2).await;
    assert_manifest(&server, "man/repoint", "latest", OCI_MANIFEST, &m2).await;
    // The old manifest is still reachable by digest.
    assert_manifest(&server, "man/repoint", &d1, OCI_MANIFEST, &m1).await;
    assert_eq!(tags(&server, "man/repoint").await, ["latest"]);
}

#[tokio::test]
async fn putting_same_manifest_twice_is_idempotent() {
    let server = TestServer::start();
    let body = oci_manifest(&server, "man/twice", "a").await;
    put_ok(&server, "man/twice", "v1", OCI_MANIFEST, &body).await;
    put_ok(&server, "man/twice", "v1", OCI_MANIFEST, &body).await;
    put_ok(&server, "man/twice", &sha256(&body), OCI_MANIFEST, &body).await;
    assert_manifest(&server, "man/twice", "v1", OCI_MANIFEST, &body).await;
    assert_eq!(tags(&server, "man/twice").await, ["v1"]);
}

#[tokio::test]
async fn deleting_a_tag_removes_only_the_tag() {
    let server = TestServer::start();
    let body = oci_manifest(&server, "man/deltag", "a").await;
    let digest = put_ok(&server, "man/deltag", "one", OCI_MANIFEST, &body).await;
    put_ok(&server, "man/deltag", "two", OCI_MANIFEST, &body).await;
    let resp = client()
        .delete(server.v2("man/deltag/manifests/one"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_no_manifest(&server, "man/deltag", "one").await;
    assert_manifest(&server, "man/deltag", "two", OCI_MANIFEST, &body).await;
    assert_manifest(&server, "man/deltag", &digest, OCI_MANIFEST, &body).await;
    assert_eq!(tags(&server, "man/deltag").await, ["two"]);
}

#[tokio::test]
async fn deleting_by_digest_removes_manifest_and_its_tags() {
    let server = TestServer::start();
    let body = oci_manifest(&server, "man/deldigest", "a").await;
    let other = oci_manifest(&server, "man/deldigest", "b").await;
    let digest = put_ok(&server, "man/deldigest", "one", OCI_MANIFEST, &body).await;
    put_ok(&server, "man/deldigest", "two", OCI_MANIFEST, &body).await;
    put_ok(&server, "man/deldigest", "keep", OCI_MANIFEST, &other).await;
    let resp = client()
        .delete(server.v2(&format!("man/deldigest/manifests/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_no_manifest(&server, "man/deldigest", &digest).await;
    assert_no_manifest(&server, "man/deldigest", "one").await;
    assert_no_manifest(&server, "man/deldigest", "two").await;
    assert_manifest(&server, "man/deldigest", "keep", OCI_MANIFEST, &other).await;
    assert_eq!(tags(&server, "man/deldigest").await, ["keep"]);
}

#[tokio::test]
async fn manifest_can_be_pushed_again_after_delete() {
    let server = TestServer::start();
    let body = oci_manifest(&server, "man/again", "a").await;
    let digest = put_ok(&server, "man/again", "v1", OCI_MANIFEST, &body).await;
    let resp = client()
        .delete(server.v2(&format!("man/again/manifests/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    put_ok(&server, "man/again", "v1", OCI_MANIFEST, &body).await;
    assert_manifest(&server, "man/again", "v1", OCI_MANIFEST, &body).await;
}

#[tokio::test]
async fn deleting_unknown_manifest_is_404_manifest_unknown() {
    let server = TestServer::start();
    push_image(&server, "man/delunknown", "v1", b"l").await;
    let c = client();
    let resp = c
        .delete(server.v2(&format!("man/delunknown/manifests/{}", sha256(b"x"))))
        .send()
        .await
        .unwrap();
    assert_error(resp, 404, &["MANIFEST_UNKNOWN"]).await;
    let resp = c
        .delete(server.v2("man/delunknown/manifests/nosuchtag"))
        .send()
        .await
        .unwrap();
    assert_error(resp, 404, &["MANIFEST_UNKNOWN"]).await;
}

#[tokio::test]
async fn manifest_without_media_type_uses_put_content_type() {
    let server = TestServer::start();
    let config = br#"{"os":"linux"}"#;
    let cd = push_blob(&server, "man/nomt", config).await;
    let body = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "config": {"mediaType": OCI_CONFIG, "digest": cd, "size": config.len()},
        "layers": [],
    }))
    .unwrap();
    put_ok(&server, "man/nomt", "v1", OCI_MANIFEST, &body).await;
    assert_manifest(&server, "man/nomt", "v1", OCI_MANIFEST, &body).await;
    let resp = client().head(server.v2("man/nomt/manifests/v1")).send().await.unwrap();
    assert_eq!(header(&resp, "content-type").as_deref(), Some(OCI_MANIFEST));
}

#[tokio::test]
async fn index_without_media_type_uses_put_content_type() {
    let server = TestServer::start();
    let m1 = oci_manifest(&server, "man/nomtidx", "a").await;
    put_ok(&server, "man/nomtidx", &sha256(&m1), OCI_MANIFEST, &m1).await;
    let body = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": sha256(&m1), "size": m1.len()}],
    }))
    .unwrap();
    put_ok(&server, "man/nomtidx", "idx", OCI_INDEX, &body).await;
    assert_manifest(&server, "man/nomtidx", "idx", OCI_INDEX, &body).await;
}

#[tokio::test]
async fn content_type_parameters_are_not_echoed() {
    let server = TestServer::start();
    let config = br#"{"os":"linux"}"#;
    let cd = push_blob(&server, "man/params", config).await;
    let body = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "config": {"mediaType": OCI_CONFIG, "digest": cd, "size": config.len()},
        "layers": [],
    }))
    .unwrap();
    put_ok(
        &server,
        "man/params",
        "v1",
        &format!("{OCI_MANIFEST}; charset=utf-8"),
        &body,
    )
    .await;
    assert_manifest(&server, "man/params", "v1", OCI_MANIFEST, &body).await;
}

#[tokio::test]
async fn media_type_field_wins_over_content_type_on_get() {
    // The manifest's own mediaType determines the GET Content-Type (contract).
    let server = TestServer::start();
    let body = oci_manifest(&server, "man/mtwins", "a").await;
    let resp = put_manifest(&server, "man/mtwins", "v1", OCI_MANIFEST, &body).await;
    assert_eq!(resp.status(), 201);
    let resp = get_manifest(&server, "man/mtwins", "v1").await;
    assert_eq!(header(&resp, "content-type").as_deref(), Some(OCI_MANIFEST));
}

#[tokio::test]
async fn artifact_manifest_with_empty_config_and_no_layers() {
    let server = TestServer::start();
    let empty = b"{}";
    let ed = push_blob(&server, "man/artifact", empty).await;
    assert_eq!(
        ed,
        "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    );
    let body = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.thing.v1",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": ed, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.empty.v1+json", "digest": ed, "size": 2}],
    }))
    .unwrap();
    put_ok(&server, "man/artifact", "thing", OCI_MANIFEST, &body).await;
    assert_manifest(&server, "man/artifact", "thing", OCI_MANIFEST, &body).await;
}

#[tokio::test]
async fn delete_manifest_when_delete_disabled_is_405_unsupported() {
    let server = TestServer::start_with(&[("STOWAGE_REGISTRY__DELETE_ENABLED", "false")]);
    let (digest, body) = push_image(&server, "man/nodelete", "v1", b"l").await;
    let c = client();
    let resp = c.delete(server.v2("man/nodelete/manifests/v1")).send().await.unwrap();
    assert_error(resp, 405, &["UNSUPPORTED"]).await;
    let resp = c
        .delete(server.v2(&format!("man/nodelete/manifests/{digest}")))
        .send()
        .await
        .unwrap();
    assert_error(resp, 405, &["UNSUPPORTED"]).await;
    assert_manifest(&server, "man/nodelete", "v1", OCI_MANIFEST, &body).await;
    assert_manifest(&server, "man/nodelete", &digest, OCI_MANIFEST, &body).await;
}

#[tokio::test]
async fn many_tags_on_many_manifests() {
    let server = TestServer::start();
    let mut expected = Vec::new();
    for i in 0..10 {
        let body = oci_manifest(&server, "man/many", &format!("m{i}")).await;
        let tag = format!("t{i:02}");
        put_ok(&server, "man/many", &tag, OCI_MANIFEST, &body).await;
        expected.push((tag, body));
    }
    for (tag, body) in &expected {
        assert_manifest(&server, "man/many", tag, OCI_MANIFEST, body).await;
    }
    let names: Vec<String> = expected.iter().map(|(t, _)| t.clone()).collect();
    assert_eq!(tags(&server, "man/many").await, names);
}

#[tokio::test]
async fn deleting_manifest_keeps_its_blobs() {
    let server = TestServer::start();
    let (digest, body) = push_image(&server, "man/keepblobs", "v1", b"layer to keep").await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    let resp = client()
        .delete(server.v2(&format!("man/keepblobs/manifests/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    for d in [
        v["config"]["digest"].as_str().unwrap(),
        v["layers"][0]["digest"].as_str().unwrap(),
    ] {
        let resp = client()
            .get(server.v2(&format!("man/keepblobs/blobs/{d}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "blob {d} survives manifest deletion");
        let resp = client()
            .delete(server.v2(&format!("man/keepblobs/blobs/{d}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
    }
}

#[tokio::test]
async fn manifest_with_data_and_unknown_fields_is_stored_verbatim() {
    let server = TestServer::start();
    let config = b"{\n\t\"author\": \"someone\",\n\t\"os\": \"linux\"\n}";
    let layer = b"layer with custom fields";
    let cd = push_blob(&server, "man/custom", config).await;
    let ld = push_blob(&server, "man/custom", layer).await;
    use base64_free::encode;
    let body = format!(
        "{{\"schemaVersion\":2,\"mediaType\":\"{OCI_MANIFEST}\",\"config\":{{\"mediaType\":\"{OCI_CONFIG}\",\"digest\":\"{cd}\",\"size\":{},\"data\":\"{}\",\"newUnspecifiedField\":\"aGVsbG8gd29ybGQ=\"}},\"layers\":[{{\"mediaType\":\"{OCI_LAYER}\",\"digest\":\"{ld}\",\"size\":{},\"newUnspecifiedField\":null}}],\"x-unknown-top-level\":{{\"nested\":[1,2,3]}}}}",
        config.len(),
        encode(config),
        layer.len()
    )
    .into_bytes();
    let digest = put_ok(&server, "man/custom", "v1", OCI_MANIFEST, &body).await;
    assert_manifest(&server, "man/custom", "v1", OCI_MANIFEST, &body).await;
    assert_manifest(&server, "man/custom", &digest, OCI_MANIFEST, &body).await;
}

#[tokio::test]
async fn empty_index_is_accepted() {
    let server = TestServer::start();
    push_blob(&server, "man/emptyidx", b"x").await;
    let body = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})).unwrap();
    put_ok(&server, "man/emptyidx", "empty", OCI_INDEX, &body).await;
    assert_manifest(&server, "man/emptyidx", "empty", OCI_INDEX, &body).await;
}

/// Minimal standard base64 (the `data` field of a descriptor), to avoid a dependency.
mod base64_free {
    pub fn encode(input: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in input.chunks(3) {
            let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

#[tokio::test]
async fn get_and_head_of_syntactically_invalid_tag_is_404() {
    // The conformance suite (01_pull) GETs and HEADs `.INVALID_MANIFEST_NAME` and requires 404.
    let server = TestServer::start();
    push_image(&server, "man/invalidget", "v1", b"l").await;
    let resp = get_manifest(&server, "man/invalidget", ".INVALID_MANIFEST_NAME").await;
    assert_error(resp, 404, &["MANIFEST_UNKNOWN"]).await;
    let resp = client()
        .head(server.v2("man/invalidget/manifests/.INVALID_MANIFEST_NAME"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn blob_digest_is_not_a_manifest() {
    let server = TestServer::start();
    let (_, body) = push_image(&server, "man/notmanifest", "v1", b"just a layer").await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    let layer = v["layers"][0]["digest"].as_str().unwrap();
    assert_no_manifest(&server, "man/notmanifest", layer).await;
}

#[tokio::test]
async fn manifest_with_sha512_blobs() {
    use sha2::Digest as _;
    let server = TestServer::start();
    let config = br#"{"os":"linux","sha":"512"}"#;
    let layer = b"sha512 layer";
    let mut digests = Vec::new();
    for data in [&config[..], &layer[..]] {
        let d = format!("sha512:{}", hex::encode(sha2::Sha512::digest(data)));
        let resp = client()
            .post(server.v2(&format!("man/sha512blobs/blobs/uploads/?digest={d}")))
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        digests.push(d);
    }
    let body = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": digests[0], "size": config.len()},
        "layers": [{"mediaType": OCI_LAYER, "digest": digests[1], "size": layer.len()}],
    }))
    .unwrap();
    put_ok(&server, "man/sha512blobs", "v1", OCI_MANIFEST, &body).await;
    assert_manifest(&server, "man/sha512blobs", "v1", OCI_MANIFEST, &body).await;
    // The same manifest pointing at a sha512 digest nobody pushed is rejected.
    let missing = format!("sha512:{}", hex::encode(sha2::Sha512::digest(b"missing")));
    let bad = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": digests[0], "size": config.len()},
        "layers": [{"mediaType": OCI_LAYER, "digest": missing, "size": 7}],
    }))
    .unwrap();
    let resp = put_manifest(&server, "man/sha512blobs", "bad", OCI_MANIFEST, &bad).await;
    assert_error(resp, 400, &["MANIFEST_BLOB_UNKNOWN"]).await;
}

#[tokio::test]
async fn manifest_referencing_deleted_blob_is_manifest_blob_unknown() {
    let server = TestServer::start();
    let body = oci_manifest(&server, "man/deletedblob", "a").await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    let layer = v["layers"][0]["digest"].as_str().unwrap();
    let resp = client()
        .delete(server.v2(&format!("man/deletedblob/blobs/{layer}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let resp = put_manifest(&server, "man/deletedblob", "v1", OCI_MANIFEST, &body).await;
    assert_error(resp, 400, &["MANIFEST_BLOB_UNKNOWN"]).await;
}

#[tokio::test]
async fn referrers_tag_schema_tag_is_a_valid_tag() {
    let server = TestServer::start();
    let body = oci_manifest(&server, "man/reftag", "a").await;
    let tag = format!("sha256-{}", &sha256(b"subject")[7..]);
    assert_eq!(tag.len(), 71);
    put_ok(&server, "man/reftag", &tag, OCI_MANIFEST, &body).await;
    assert_manifest(&server, "man/reftag", &tag, OCI_MANIFEST, &body).await;
}

/// Manifest lookups are remembered between requests; what was remembered is never served once
/// a change has been acknowledged. While readers keep the tag's lookup hot, a writer moves the
/// tag 60 times and then deletes it: the first GET after each acknowledged change sees exactly
/// that change (by tag, and by digest after the manifest is deleted).
#[tokio::test]
async fn remembered_lookups_never_outlive_an_acknowledged_change() {
    let server = TestServer::start();
    let repo = "cache/hot";
    let (first, first_body) = push_image(&server, repo, "v1", b"first layer").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Background readers: keep every lookup remembered, all the time.
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (stop, url) = (stop.clone(), server.v2(&format!("{repo}/manifests/v1")));
        readers.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let resp = c.get(&url).header("Accept", OCI_MANIFEST).send().await.unwrap();
                assert!(resp.status() == 200 || resp.status() == 404, "{}", resp.status());
                resp.bytes().await.unwrap();
            }
        }));
    }
    assert_manifest(&server, repo, &first, OCI_MANIFEST, &first_body).await;
    let mut last = (first, first_body);
    for i in 0..60 {
        let (digest, body) = push_image(&server, repo, "v1", format!("layer {i}").as_bytes()).await;
        assert_manifest(&server, repo, "v1", OCI_MANIFEST, &body).await;
        assert_manifest(&server, repo, "v1", OCI_MANIFEST, &body).await;
        assert_manifest(&server, repo, &digest, OCI_MANIFEST, &body).await;
        last = (digest, body);
    }
    // A deleted tag, then a deleted manifest: unknown from the next request on.
    let resp = client()
        .delete(server.v2(&format!("{repo}/manifests/v1")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_no_manifest(&server, repo, "v1").await;
    assert_manifest(&server, repo, &last.0, OCI_MANIFEST, &last.1).await;
    let resp = client()
        .delete(server.v2(&format!("{repo}/manifests/{}", last.0)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_no_manifest(&server, repo, &last.0).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
}

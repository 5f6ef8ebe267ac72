//! Referrers API (end-12a, end-12b) and the `OCI-Subject` response header.
mod common;

use common::oci::{assert_error, header};

use common::{TestServer, client, push_blob, push_image, sha256};
use serde_json::{Value, json};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const EMPTY: &str = "application/vnd.oci.empty.v1+json";
const SBOM: &str = "application/vnd.example.sbom.v1";
const SIG: &str = "application/vnd.example.signature.v1";

fn descriptor(media_type: &str, body: &[u8]) -> Value {
    json!({"mediaType": media_type, "digest": sha256(body), "size": body.len()})
}

/// An artifact manifest (empty config) with `subject`, optional `artifactType` and annotations.
async fn artifact(
    server: &TestServer,
    repo: &str,
    subject: &Value,
    artifact_type: Option<&str>,
    annotations: Value,
) -> Vec<u8> {
    let ed = push_blob(server, repo, b"{}").await;
    let payload = format!("payload {annotations}");
    let ld = push_blob(server, repo, payload.as_bytes()).await;
    let mut m = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": EMPTY, "digest": ed, "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": ld, "size": payload.len()}],
        "subject": subject,
        "annotations": annotations,
    });
    if let Some(t) = artifact_type {
        m["artifactType"] = json!(t);
    }
    serde_json::to_vec(&m).unwrap()
}

/// PUTs a manifest by digest, asserts 201 and returns the response's OCI-Subject header.
async fn put_by_digest(server: &TestServer, repo: &str, content_type: &str, body: &[u8]) -> Option<String> {
    let resp = client()
        .put(server.v2(&format!("{repo}/manifests/{}", sha256(body))))
        .header("Content-Type", content_type)
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    let subject = header(&resp, "oci-subject");
    let status = resp.status();
    assert_eq!(status, 201, "PUT manifest: {}", resp.text().await.unwrap());
    subject
}

/// GET referrers; asserts 200 + index Content-Type and returns (index, OCI-Filters-Applied).
async fn referrers(server: &TestServer, repo: &str, digest: &str, query: &str) -> (Value, Option<String>) {
    let resp = client()
        .get(server.v2(&format!("{repo}/referrers/{digest}{query}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "referrers of {digest}{query}");
    assert_eq!(header(&resp, "content-type").as_deref(), Some(OCI_INDEX));
    let filters = header(&resp, "oci-filters-applied");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["schemaVersion"], 2, "{v}");
    assert_eq!(v["mediaType"], OCI_INDEX, "{v}");
    assert!(v["manifests"].is_array(), "manifests MUST be a list: {v}");
    (v, filters)
}

fn find<'a>(index: &'a Value, digest: &str) -> Option<&'a Value> {
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["digest"] == digest)
}

fn count(index: &Value) -> usize {
    index["manifests"].as_array().unwrap().len()
}

#[tokio::test]
async fn put_with_subject_answers_oci_subject_header() {
    let server = TestServer::start();
    let (subject_digest, subject_body) = push_image(&server, "ref/hdr", "v1", b"layer").await;
    let subject = descriptor(OCI_MANIFEST, &subject_body);
    let sbom = artifact(&server, "ref/hdr", &subject, Some(SBOM), json!({"k": "v"})).await;
    let got = put_by_digest(&server, "ref/hdr", OCI_MANIFEST, &sbom).await;
    assert_eq!(got.as_deref(), Some(subject_digest.as_str()));
}

#[tokio::test]
async fn put_without_subject_has_no_oci_subject_header() {
    let server = TestServer::start();
    let (_, body) = push_image(&server, "ref/nohdr", "v1", b"layer").await;
    let resp = client()
        .put(server.v2("ref/nohdr/manifests/v2"))
        .header("Content-Type", OCI_MANIFEST)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert!(header(&resp, "oci-subject").is_none());
}

#[tokio::test]
async fn referrers_list_descriptors_with_artifact_type_and_annotations() {
    let server = TestServer::start();
    let (subject_digest, subject_body) = push_image(&server, "ref/list", "v1", b"layer").await;
    let subject = descriptor(OCI_MANIFEST, &subject_body);
    let ann = json!({"org.opencontainers.image.created": "2024-01-01T00:00:00Z", "org.example.sbom.format": "json"});
    let sbom = artifact(&server, "ref/list", &subject, Some(SBOM), ann.clone()).await;
    let sig = artifact(
        &server,
        "ref/list",
        &subject,
        Some(SIG),
        json!({"org.example.fp": "abcd"}),
    )
    .await;
    put_by_digest(&server, "ref/list", OCI_MANIFEST, &sbom).await;
    put_by_digest(&server, "ref/list", OCI_MANIFEST, &sig).await;

    let (index, filters) = referrers(&server, "ref/list", &subject_digest, "").await;
    assert!(filters.is_none(), "no filter requested, no OCI-Filters-Applied");
    assert_eq!(count(&index), 2, "{index}");
    let d = find(&index, &sha256(&sbom)).expect("sbom listed");
    assert_eq!(d["mediaType"], OCI_MANIFEST);
    assert_eq!(d["size"], sbom.len());
    assert_eq!(d["artifactType"], SBOM);
    assert_eq!(d["annotations"], ann);
    let d = find(&index, &sha256(&sig)).expect("signature listed");
    assert_eq!(d["artifactType"], SIG);
    assert_eq!(d["annotations"]["org.example.fp"], "abcd");
}

#[tokio::test]
async fn artifact_type_filter_applies_and_sets_header() {
    let server = TestServer::start();
    let (subject_digest, subject_body) = push_image(&server, "ref/filter", "v1", b"layer").await;
    let subject = descriptor(OCI_MANIFEST, &subject_body);
    let sbom = artifact(&server, "ref/filter", &subject, Some(SBOM), json!({"n": "1"})).await;
    let sig = artifact(&server, "ref/filter", &subject, Some(SIG), json!({"n": "2"})).await;
    put_by_digest(&server, "ref/filter", OCI_MANIFEST, &sbom).await;
    put_by_digest(&server, "ref/filter", OCI_MANIFEST, &sig).await;

    let (index, filters) = referrers(
        &server,
        "ref/filter",
        &subject_digest,
        "?artifactType=application%2Fvnd.example.sbom.v1",
    )
    .await;
    assert_eq!(filters.as_deref(), Some("artifactType"));
    assert_eq!(count(&index), 1, "{index}");
    assert_eq!(index["manifests"][0]["digest"], sha256(&sbom));

    // Unencoded slash works too.
    let (index, filters) = referrers(&server, "ref/filter", &subject_digest, &format!("?artifactType={SIG}")).await;
    assert_eq!(filters.as_deref(), Some("artifactType"));
    assert_eq!(count(&index), 1);
    assert_eq!(index["manifests"][0]["digest"], sha256(&sig));

    // A filter that matches nothing yields an empty list.
    let (index, filters) = referrers(
        &server,
        "ref/filter",
        &subject_digest,
        "?artifactType=application%2Fnone",
    )
    .await;
    assert_eq!(filters.as_deref(), Some("artifactType"));
    assert_eq!(count(&index), 0);
}

#[tokio::test]
async fn unknown_subject_is_200_with_empty_manifests() {
    let server = TestServer::start();
    push_image(&server, "ref/empty", "v1", b"layer").await;
    let (index, _) = referrers(&server, "ref/empty", &sha256(b"no such subject"), "").await;
    assert_eq!(index["manifests"], json!([]));
}

#[tokio::test]
async fn subject_without_referrers_is_200_with_empty_manifests() {
    let server = TestServer::start();
    let (digest, _) = push_image(&server, "ref/none", "v1", b"layer").await;
    let (index, _) = referrers(&server, "ref/none", &digest, "").await;
    assert_eq!(index["manifests"], json!([]));
}

#[tokio::test]
async fn invalid_digest_is_400() {
    let server = TestServer::start();
    push_image(&server, "ref/bad", "v1", b"layer").await;
    for bad in ["notadigest", "sha256:xyz", "sha256:abc", "latest"] {
        let resp = client()
            .get(server.v2(&format!("ref/bad/referrers/{bad}")))
            .send()
            .await
            .unwrap();
        assert_error(resp, 400, &["DIGEST_INVALID"]).await;
    }
}

#[tokio::test]
async fn artifact_type_defaults_to_config_media_type() {
    let server = TestServer::start();
    let (subject_digest, subject_body) = push_image(&server, "ref/cfg", "v1", b"layer").await;
    let config = br#"{"signature":"xyz"}"#;
    let config_type = "application/vnd.example.sig.config.v1+json";
    let cd = push_blob(&server, "ref/cfg", config).await;
    let body = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": config_type, "digest": cd, "size": config.len()},
        "layers": [],
        "subject": descriptor(OCI_MANIFEST, &subject_body),
    }))
    .unwrap();
    put_by_digest(&server, "ref/cfg", OCI_MANIFEST, &body).await;
    let (index, _) = referrers(&server, "ref/cfg", &subject_digest, "").await;
    let d = find(&index, &sha256(&body)).expect("listed");
    assert_eq!(d["artifactType"], config_type);
    // Filtering uses the derived artifactType.
    let (index, _) = referrers(
        &server,
        "ref/cfg",
        &subject_digest,
        "?artifactType=application%2Fvnd.example.sig.config.v1%2Bjson",
    )
    .await;
    assert_eq!(count(&index), 1);
}

#[tokio::test]
async fn index_referrer_without_artifact_type_omits_it() {
    let server = TestServer::start();
    let (subject_digest, subject_body) = push_image(&server, "ref/idx", "v1", b"layer").await;
    let (child_digest, child_body) = push_image(&server, "ref/idx", "child", b"child layer").await;
    let with_type = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "artifactType": SBOM,
        "manifests": [descriptor(OCI_MANIFEST, &child_body)],
        "subject": descriptor(OCI_MANIFEST, &subject_body),
        "annotations": {"kind": "typed"},
    }))
    .unwrap();
    let without_type = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": child_digest, "size": child_body.len()}],
        "subject": descriptor(OCI_MANIFEST, &subject_body),
        "annotations": {"kind": "untyped"},
    }))
    .unwrap();
    assert_eq!(
        put_by_digest(&server, "ref/idx", OCI_INDEX, &with_type).await,
        Some(subject_digest.clone())
    );
    put_by_digest(&server, "ref/idx", OCI_INDEX, &without_type).await;
    let (index, _) = referrers(&server, "ref/idx", &subject_digest, "").await;
    assert_eq!(count(&index), 2);
    let d = find(&index, &sha256(&with_type)).unwrap();
    assert_eq!(d["mediaType"], OCI_INDEX);
    assert_eq!(d["artifactType"], SBOM);
    assert_eq!(d["annotations"]["kind"], "typed");
    let d = find(&index, &sha256(&without_type)).unwrap();
    assert_eq!(d["mediaType"], OCI_INDEX);
    assert!(
        d.get("artifactType").is_none_or(|t| t.is_null() || t == ""),
        "artifactType omitted: {d}"
    );
    assert_eq!(d["annotations"]["kind"], "untyped");
}

#[tokio::test]
async fn referrer_may_be_pushed_before_its_subject() {
    let server = TestServer::start();
    let absent = br#"{"schemaVersion":2,"imaginary":true}"#;
    let subject = descriptor(OCI_MANIFEST, absent);
    let sbom = artifact(&server, "ref/early", &subject, Some(SBOM), json!({})).await;
    let got = put_by_digest(&server, "ref/early", OCI_MANIFEST, &sbom).await;
    assert_eq!(got, Some(sha256(absent)));
    let (index, _) = referrers(&server, "ref/early", &sha256(absent), "").await;
    assert_eq!(count(&index), 1);
    assert_eq!(index["manifests"][0]["digest"], sha256(&sbom));
}

#[tokio::test]
async fn tagged_referrer_is_listed() {
    let server = TestServer::start();
    let (subject_digest, subject_body) = push_image(&server, "ref/tagged", "v1", b"layer").await;
    let sbom = artifact(
        &server,
        "ref/tagged",
        &descriptor(OCI_MANIFEST, &subject_body),
        Some(SBOM),
        json!({}),
    )
    .await;
    let resp = client()
        .put(server.v2("ref/tagged/manifests/sbom"))
        .header("Content-Type", OCI_MANIFEST)
        .body(sbom.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(header(&resp, "oci-subject"), Some(subject_digest.clone()));
    let (index, _) = referrers(&server, "ref/tagged", &subject_digest, "").await;
    assert!(find(&index, &sha256(&sbom)).is_some());
}

#[tokio::test]
async fn deleting_referrer_removes_it_from_list() {
    let server = TestServer::start();
    let (subject_digest, subject_body) = push_image(&server, "ref/del", "v1", b"layer").await;
    let subject = descriptor(OCI_MANIFEST, &subject_body);
    let sbom = artifact(&server, "ref/del", &subject, Some(SBOM), json!({"a": "1"})).await;
    let sig = artifact(&server, "ref/del", &subject, Some(SIG), json!({"a": "2"})).await;
    put_by_digest(&server, "ref/del", OCI_MANIFEST, &sbom).await;
    put_by_digest(&server, "ref/del", OCI_MANIFEST, &sig).await;
    let resp = client()
        .delete(server.v2(&format!("ref/del/manifests/{}", sha256(&sbom))))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let (index, _) = referrers(&server, "ref/del", &subject_digest, "").await;
    assert_eq!(count(&index), 1, "{index}");
    assert!(find(&index, &sha256(&sbom)).is_none());
    assert!(find(&index, &sha256(&sig)).is_some());
}

#[tokio::test]
async fn deleting_tag_of_referrer_keeps_it_listed() {
    let server = TestServer::start();
    let (subject_digest, subject_body) = push_image(&server, "ref/deltag", "v1", b"layer").await;
    let sbom = artifact(
        &server,
        "ref/deltag",
        &descriptor(OCI_MANIFEST, &subject_body),
        Some(SBOM),
        json!({}),
    )
    .await;
    let resp = client()
        .put(server.v2("ref/deltag/manifests/sbom"))
        .header("Content-Type", OCI_MANIFEST)
        .body(sbom.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let resp = client()
        .delete(server.v2("ref/deltag/manifests/sbom"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let (index, _) = referrers(&server, "ref/deltag", &subject_digest, "").await;
    assert!(
        find(&index, &sha256(&sbom)).is_some(),
        "the manifest still exists by digest"
    );
}

#[tokio::test]
async fn referrers_are_scoped_to_repository() {
    let server = TestServer::start();
    let (subject_digest, subject_body) = push_image(&server, "ref/one", "v1", b"layer").await;
    push_image(&server, "ref/two", "v1", b"layer").await;
    let sbom = artifact(
        &server,
        "ref/one",
        &descriptor(OCI_MANIFEST, &subject_body),
        Some(SBOM),
        json!({}),
    )
    .await;
    put_by_digest(&server, "ref/one", OCI_MANIFEST, &sbom).await;
    let (index, _) = referrers(&server, "ref/two", &subject_digest, "").await;
    assert_eq!(count(&index), 0, "{index}");
}

#[tokio::test]
async fn referrers_of_other_subject_are_not_listed() {
    let server = TestServer::start();
    let (d1, b1) = push_image(&server, "ref/sep", "one", b"layer one").await;
    let (d2, b2) = push_image(&server, "ref/sep", "two", b"layer two").await;
    let a1 = artifact(
        &server,
        "ref/sep",
        &descriptor(OCI_MANIFEST, &b1),
        Some(SBOM),
        json!({"s": "1"}),
    )
    .await;
    let a2 = artifact(
        &server,
        "ref/sep",
        &descriptor(OCI_MANIFEST, &b2),
        Some(SBOM),
        json!({"s": "2"}),
    )
    .await;
    put_by_digest(&server, "ref/sep", OCI_MANIFEST, &a1).await;
    put_by_digest(&server, "ref/sep", OCI_MANIFEST, &a2).await;
    let (index, _) = referrers(&server, "ref/sep", &d1, "").await;
    assert_eq!(count(&index), 1);
    assert_eq!(index["manifests"][0]["digest"], sha256(&a1));
    let (index, _) = referrers(&server, "ref/sep", &d2, "").await;
    assert_eq!(count(&index), 1);
    assert_eq!(index["manifests"][0]["digest"], sha256(&a2));
}

#[tokio::test]
async fn same_referrer_pushed_twice_is_listed_once() {
    let server = TestServer::start();
    let (subject_digest, subject_body) = push_image(&server, "ref/twice", "v1", b"layer").await;
    let sbom = artifact(
        &server,
        "ref/twice",
        &descriptor(OCI_MANIFEST, &subject_body),
        Some(SBOM),
        json!({}),
    )
    .await;
    put_by_digest(&server, "ref/twice", OCI_MANIFEST, &sbom).await;
    put_by_digest(&server, "ref/twice", OCI_MANIFEST, &sbom).await;
    let (index, _) = referrers(&server, "ref/twice", &subject_digest, "").await;
    assert_eq!(count(&index), 1, "{index}");
}

#[tokio::test]
async fn referrers_on_unknown_repository_is_200_empty_index() {
    // "If the registry supports the referrers API, the registry MUST NOT return a 404 Not Found to a
    // referrers API requests."
    let server = TestServer::start();
    let (index, _) = referrers(&server, "never/pushed", &sha256(b"whatever"), "").await;
    assert_eq!(index["manifests"], json!([]));
}

#[tokio::test]
async fn referrers_stay_listed_after_subject_is_deleted() {
    let server = TestServer::start();
    let (subject_digest, subject_body) = push_image(&server, "ref/orphan", "v1", b"layer").await;
    let sbom = artifact(
        &server,
        "ref/orphan",
        &descriptor(OCI_MANIFEST, &subject_body),
        Some(SBOM),
        json!({}),
    )
    .await;
    put_by_digest(&server, "ref/orphan", OCI_MANIFEST, &sbom).await;
    let resp = client()
        .delete(server.v2(&format!("ref/orphan/manifests/{subject_digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    // The referrer still exists and still has that subject.
    let resp = client()
        .get(server.v2(&format!("ref/orphan/manifests/{}", sha256(&sbom))))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (index, _) = referrers(&server, "ref/orphan", &subject_digest, "").await;
    assert!(find(&index, &sha256(&sbom)).is_some(), "{index}");
}

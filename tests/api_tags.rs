//! Tag listing (end-8a, end-8b): full list, `n`, `last`, `Link`, and errors.
mod common;

use common::oci::{assert_error, header};

use common::{TestServer, client, push_image};
use serde_json::Value;

/// Tags pushed in a scrambled order; byte-wise (and, here, also case-insensitive) sorted:
const SORTED: [&str; 7] = ["1.0", "1.1", "10", "2", "alpha", "beta", "latest"];

async fn setup(repo: &str) -> TestServer {
    let server = TestServer::start();
    let (digest, body) = push_image(&server, repo, "latest", b"layer").await;
    for tag in ["beta", "10", "1.1", "alpha", "2", "1.0"] {
        let resp = client()
            .put(server.v2(&format!("{repo}/manifests/{tag}")))
            .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        assert_eq!(header(&resp, "docker-content-digest").as_deref(), Some(digest.as_str()));
    }
    server
}

/// GET tags/list with `query`; returns (name, tags, Link target).
async fn list(server: &TestServer, repo: &str, query: &str) -> (String, Vec<String>, Option<String>) {
    let resp = client()
        .get(format!("{}{query}", server.v2(&format!("{repo}/tags/list"))))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "tags/list{query}");
    let ct = header(&resp, "content-type").unwrap_or_default();
    assert!(ct.starts_with("application/json"), "Content-Type {ct:?}");
    let link = header(&resp, "link");
    let v: Value = resp.json().await.unwrap();
    let tags = v["tags"]
        .as_array()
        .unwrap_or_else(|| panic!("tags must be an array: {v}"))
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    (v["name"].as_str().unwrap_or_default().to_string(), tags, link)
}

#[tokio::test]
async fn full_tag_list_is_sorted_with_repository_name() {
    let server = setup("tags/full").await;
    let (name, tags, link) = list(&server, "tags/full", "").await;
    assert_eq!(name, "tags/full");
    assert_eq!(tags, SORTED);
    assert!(link.is_none(), "no Link without n when everything is returned");
}

#[tokio::test]
async fn n_limits_results_and_sets_link() {
    let server = setup("tags/n").await;
    let (_, tags, link) = list(&server, "tags/n", "?n=3").await;
    assert_eq!(tags, ["1.0", "1.1", "10"]);
    assert_eq!(
        link.as_deref(),
        Some("</v2/tags/n/tags/list?n=3&last=10>; rel=\"next\"")
    );
}

#[tokio::test]
async fn following_links_walks_all_tags() {
    let server = setup("tags/walk").await;
    let mut all = Vec::new();
    let mut query = "?n=2".to_string();
    let mut pages = 0;
    loop {
        let (_, tags, link) = list(&server, "tags/walk", &query).await;
        assert!(tags.len() <= 2);
        all.extend(tags);
        pages += 1;
        assert!(pages <= 10, "pagination does not terminate");
        let Some(link) = link else { break };
        assert!(link.ends_with("; rel=\"next\""), "{link}");
        let target = &link[link.find('<').unwrap() + 1..link.find('>').unwrap()];
        let prefix = "/v2/tags/walk/tags/list";
        assert!(target.starts_with(prefix), "{target}");
        query = target[prefix.len()..].to_string();
    }
    assert_eq!(all, SORTED);
    assert_eq!(pages, 4, "7 tags in pages of 2");
}

#[tokio::test]
async fn last_returns_tags_after_last() {
    let server = setup("tags/last").await;
    let (_, tags, _) = list(&server, "tags/last", "?last=alpha").await;
    assert_eq!(tags, ["beta", "latest"]);
    let (_, tags, link) = list(&server, "tags/last", "?n=2&last=10").await;
    assert_eq!(tags, ["2", "alpha"]);
    assert_eq!(
        link.as_deref(),
        Some("</v2/tags/last/tags/list?n=2&last=alpha>; rel=\"next\"")
    );
    // `last` need not be an existing tag.
    let (_, tags, _) = list(&server, "tags/last", "?n=2&last=b").await;
    assert_eq!(tags, ["beta", "latest"]);
    let (_, tags, link) = list(&server, "tags/last", "?last=latest").await;
    assert!(tags.is_empty());
    assert!(link.is_none());
}

#[tokio::test]
async fn n_zero_returns_empty_list_without_link() {
    let server = setup("tags/zero").await;
    let (name, tags, link) = list(&server, "tags/zero", "?n=0").await;
    assert_eq!(name, "tags/zero");
    assert!(tags.is_empty());
    assert!(link.is_none(), "n=0 MUST NOT include a Link header");
}

#[tokio::test]
async fn n_at_least_count_returns_all_without_link() {
    let server = setup("tags/all").await;
    for q in ["?n=7", "?n=100"] {
        let (_, tags, link) = list(&server, "tags/all", q).await;
        assert_eq!(tags, SORTED, "{q}");
        assert!(link.is_none(), "{q}: nothing remains, no Link");
    }
    let (_, tags, link) = list(&server, "tags/all", "?n=6").await;
    assert_eq!(tags, &SORTED[..6]);
    assert!(link.is_some());
}

#[tokio::test]
async fn unknown_repository_is_404_name_unknown() {
    let server = TestServer::start();
    push_image(&server, "exists", "v1", b"l").await;
    let resp = client()
        .get(server.v2("does/not/exist/tags/list"))
        .send()
        .await
        .unwrap();
    assert_error(resp, 404, &["NAME_UNKNOWN"]).await;
    let resp = client()
        .get(server.v2("does/not/exist/tags/list?n=5"))
        .send()
        .await
        .unwrap();
    assert_error(resp, 404, &["NAME_UNKNOWN"]).await;
}

#[tokio::test]
async fn invalid_repository_name_is_400_name_invalid() {
    let server = TestServer::start();
    let resp = client().get(server.v2("Bad_Name/tags/list")).send().await.unwrap();
    assert_error(resp, 400, &["NAME_INVALID"]).await;
}

#[tokio::test]
async fn deleted_tag_disappears_from_list() {
    let server = setup("tags/del").await;
    let resp = client()
        .delete(server.v2("tags/del/manifests/alpha"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let (_, tags, _) = list(&server, "tags/del", "").await;
    let expected: Vec<&str> = SORTED.iter().copied().filter(|t| *t != "alpha").collect();
    assert_eq!(tags, expected);
}

#[tokio::test]
async fn tags_are_scoped_to_repository() {
    let server = TestServer::start();
    push_image(&server, "scope/a", "only-a", b"a").await;
    push_image(&server, "scope/a/b", "only-ab", b"b").await;
    let (_, tags, _) = list(&server, "scope/a", "").await;
    assert_eq!(tags, ["only-a"]);
    let (name, tags, _) = list(&server, "scope/a/b", "").await;
    assert_eq!(name, "scope/a/b");
    assert_eq!(tags, ["only-ab"]);
}

#[tokio::test]
async fn repository_with_only_untagged_manifests_lists_no_tags() {
    let server = TestServer::start();
    let (digest, _) = push_image(&server, "tags/untagged", "temp", b"l").await;
    let resp = client()
        .delete(server.v2("tags/untagged/manifests/temp"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let resp = client()
        .get(server.v2(&format!("tags/untagged/manifests/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = client().get(server.v2("tags/untagged/tags/list")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["name"], "tags/untagged");
    assert!(
        v["tags"].is_null() || v["tags"].as_array().is_some_and(|a| a.is_empty()),
        "no tags expected: {v}"
    );
}

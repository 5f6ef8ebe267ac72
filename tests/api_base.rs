//! Base API: `/v2/` version check (end-1), the `Docker-Distribution-API-Version` header, unknown
//! routes, and `GET /v2/_catalog` with `n`/`last`/`Link` pagination.
mod common;

use common::oci::{SPEC_CODES, assert_error, header};

use common::{TestServer, client, push_image};
use reqwest::{Method, Response};
use serde_json::Value;

/// Extracts the target of a `Link: <...>; rel="next"` header.
fn next_link(resp: &Response) -> Option<String> {
    let link = header(resp, "link")?;
    assert!(
        link.contains("rel=\"next\""),
        "Link header without rel=\"next\": {link}"
    );
    let start = link.find('<').expect("Link has <");
    let end = link.find('>').expect("Link has >");
    Some(link[start + 1..end].to_string())
}

async fn catalog(server: &TestServer, query: &str) -> (Vec<String>, Option<String>) {
    let resp = client()
        .get(format!("{}{query}", server.v2("_catalog")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "GET _catalog{query}");
    let ct = header(&resp, "content-type").unwrap_or_default();
    assert!(ct.starts_with("application/json"), "catalog Content-Type {ct:?}");
    let link = next_link(&resp);
    let v: Value = resp.json().await.unwrap();
    let repos = v["repositories"]
        .as_array()
        .unwrap_or_else(|| panic!("repositories must be an array: {v}"))
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    (repos, link)
}

#[tokio::test]
async fn ping_returns_200_with_api_version_header() {
    let server = TestServer::start();
    let resp = client().get(server.v2("")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header(&resp, "docker-distribution-api-version").as_deref(),
        Some("registry/2.0")
    );
}

#[tokio::test]
async fn head_ping_returns_200_with_api_version_header() {
    let server = TestServer::start();
    let resp = client().head(server.v2("")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header(&resp, "docker-distribution-api-version").as_deref(),
        Some("registry/2.0")
    );
}

#[tokio::test]
async fn api_version_header_on_success_and_not_found_responses() {
    let server = TestServer::start();
    let (digest, _) = push_image(&server, "hdr/repo", "v1", b"layer").await;
    let c = client();
    for url in [
        server.v2("hdr/repo/manifests/v1"),
        server.v2(&format!("hdr/repo/blobs/{digest}")),
        server.v2("hdr/repo/tags/list"),
        server.v2("_catalog"),
        server.v2("hdr/repo/manifests/missing"),
        server.v2("nope/tags/list"),
    ] {
        let resp = c.get(&url).send().await.unwrap();
        assert_eq!(
            header(&resp, "docker-distribution-api-version").as_deref(),
            Some("registry/2.0"),
            "GET {url} -> {}",
            resp.status()
        );
    }
}

#[tokio::test]
async fn unknown_route_under_v2_is_404_with_error_body() {
    let server = TestServer::start();
    let resp = client()
        .get(server.v2("some/repo/nonsense/thing"))
        .send()
        .await
        .unwrap();
    assert_error(resp, 404, SPEC_CODES).await;
}

#[tokio::test]
async fn route_outside_v2_is_404() {
    let server = TestServer::start();
    let resp = client().get(format!("{}/v1/_ping", server.url)).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    // `/` is the web UI's: a redirect to `/ui/` (see tests/ui.rs).
    let resp = client().get(format!("{}/", server.url)).send().await.unwrap();
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/ui/");
}

#[tokio::test]
async fn unsupported_method_on_known_route_is_rejected_with_error_body() {
    let server = TestServer::start();
    push_image(&server, "meth/repo", "v1", b"layer").await;
    let resp = client()
        .request(Method::POST, server.v2("meth/repo/tags/list"))
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    assert!(status == 404 || status == 405, "POST tags/list -> {status}");
    assert_error(resp, status, SPEC_CODES).await;
}

#[tokio::test]
async fn catalog_of_empty_registry_is_empty_list() {
    let server = TestServer::start();
    let (repos, link) = catalog(&server, "").await;
    assert!(repos.is_empty(), "{repos:?}");
    assert!(link.is_none());
}

#[tokio::test]
async fn catalog_lists_repositories_sorted() {
    let server = TestServer::start();
    for repo in ["zeta", "alpha/one", "alpha", "mid/deep/name"] {
        push_image(&server, repo, "latest", repo.as_bytes()).await;
    }
    let (repos, link) = catalog(&server, "").await;
    assert_eq!(repos, ["alpha", "alpha/one", "mid/deep/name", "zeta"]);
    assert!(link.is_none(), "no Link when everything fits");
}

#[tokio::test]
async fn catalog_lists_each_repository_once() {
    let server = TestServer::start();
    push_image(&server, "dup", "a", b"one").await;
    push_image(&server, "dup", "b", b"two").await;
    let (repos, _) = catalog(&server, "").await;
    assert_eq!(repos, ["dup"]);
}

#[tokio::test]
async fn catalog_pagination_with_n_and_link() {
    let server = TestServer::start();
    let names = ["a", "b", "c", "d", "e"];
    for repo in names {
        push_image(&server, repo, "latest", repo.as_bytes()).await;
    }
    let (page, link) = catalog(&server, "?n=2").await;
    assert_eq!(page, ["a", "b"]);
    let link = link.expect("Link header when more repositories remain");
    assert!(link.starts_with("/v2/_catalog?"), "Link target {link}");
    assert!(link.contains("n=2"), "Link keeps n: {link}");
    assert!(link.contains("last=b"), "Link carries last: {link}");

    // Follow the links to the end.
    let mut all = page;
    let mut next = Some(link);
    let mut pages = 1;
    while let Some(target) = next {
        let resp = client().get(format!("{}{target}", server.url)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        next = next_link(&resp);
        let v: Value = resp.json().await.unwrap();
        let page: Vec<String> = v["repositories"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_string())
            .collect();
        assert!(page.len() <= 2);
        all.extend(page);
        pages += 1;
        assert!(pages <= 5, "pagination does not terminate");
    }
    assert_eq!(all, names);
    assert_eq!(pages, 3);
}

#[tokio::test]
async fn catalog_no_link_when_last_page_is_exactly_full() {
    let server = TestServer::start();
    for repo in ["a", "b", "c", "d"] {
        push_image(&server, repo, "latest", repo.as_bytes()).await;
    }
    let (page, link) = catalog(&server, "?n=4").await;
    assert_eq!(page, ["a", "b", "c", "d"]);
    assert!(link.is_none(), "no Link when nothing remains: {link:?}");
    let (page, link) = catalog(&server, "?n=2&last=b").await;
    assert_eq!(page, ["c", "d"]);
    assert!(link.is_none(), "no Link when nothing remains: {link:?}");
}

#[tokio::test]
async fn catalog_last_without_n_starts_after_last() {
    let server = TestServer::start();
    for repo in ["a", "b", "c"] {
        push_image(&server, repo, "latest", repo.as_bytes()).await;
    }
    let (page, _) = catalog(&server, "?last=a").await;
    assert_eq!(page, ["b", "c"]);
    // `last` need not name an existing repository.
    let (page, _) = catalog(&server, "?last=bb").await;
    assert_eq!(page, ["c"]);
    let (page, link) = catalog(&server, "?last=c").await;
    assert!(page.is_empty());
    assert!(link.is_none());
}

#[tokio::test]
async fn catalog_n_zero_is_empty_without_link() {
    let server = TestServer::start();
    push_image(&server, "a", "latest", b"a").await;
    let (page, link) = catalog(&server, "?n=0").await;
    assert!(page.is_empty());
    assert!(link.is_none());
}

#[tokio::test]
async fn catalog_n_larger_than_count_returns_all() {
    let server = TestServer::start();
    for repo in ["a", "b"] {
        push_image(&server, repo, "latest", repo.as_bytes()).await;
    }
    let (page, link) = catalog(&server, "?n=100").await;
    assert_eq!(page, ["a", "b"]);
    assert!(link.is_none());
}

#[tokio::test]
async fn catalog_default_page_size_is_configurable() {
    let server = TestServer::start_with(&[("STOWAGE_REGISTRY__CATALOG_PAGE_SIZE", "2")]);
    for repo in ["a", "b", "c"] {
        push_image(&server, repo, "latest", repo.as_bytes()).await;
    }
    let (page, link) = catalog(&server, "").await;
    assert_eq!(page, ["a", "b"]);
    let link = link.expect("Link when the default page is full and more remain");
    assert!(link.contains("last=b"), "{link}");
}

#[tokio::test]
async fn catalog_invalid_n_is_400() {
    let server = TestServer::start();
    for q in ["?n=abc", "?n=-1"] {
        let resp = client()
            .get(format!("{}{q}", server.v2("_catalog")))
            .send()
            .await
            .unwrap();
        assert_error(resp, 400, SPEC_CODES).await;
    }
}

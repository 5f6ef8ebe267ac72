//! The server-maintained Spack index, checked against the indexes real Spack built.

mod common;

use common::spack::{FixtureRepo, in_buildcache, push_fixture, served_index};
use common::{TestServer, client};

/// For every fixture repository with an index, the index Stowage serves after the same tags
/// were pushed equals the one Spack's `update-index` wrote (as JSON values).
#[tokio::test]
async fn served_index_equals_spacks_for_every_fixture_repository() {
    let server = TestServer::start();
    for (mode, repo) in [
        ("http-noauth", "spack_buildcache"),
        ("basic-tls", "spack_tls"),
        ("bearer-tls", "spack_token"),
        ("bearer-tls", "spack_v023"),
    ] {
        let fixture = FixtureRepo::load(mode, repo);
        let target = format!("{mode}/{}", repo.replace('_', "-"));
        push_fixture(&server, &target, &fixture).await;
        let (manifest, index) = served_index(&server, &target).await;
        let expected = fixture.spack_index().expect("fixture has an index");
        assert_eq!(index, expected, "index of {mode}/{repo}");
        assert_eq!(
            manifest["config"]["digest"],
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        assert_eq!(manifest["config"]["size"], 2);
    }
}

/// A `.spack` tag without a spec (`push --tag`) stays a plain image, left out of the index;
/// Docker-format spec images are indexed like OCI ones.
#[tokio::test]
async fn spec_less_spack_tags_are_left_out() {
    let server = TestServer::start();
    let fixture = FixtureRepo::load("basic-tls", "spack_tls-docker");
    push_fixture(&server, "docker/cache", &fixture).await;
    let (_, index) = served_index(&server, "docker/cache").await;
    let reference = FixtureRepo::load("basic-tls", "spack_tls")
        .spack_index()
        .expect("reference index");
    assert_eq!(in_buildcache(&index), in_buildcache(&reference), "same five specs");
    assert!(
        fixture.spec_tags().contains(&"bundle.spack".to_owned()),
        "fixture has the spec-less tag"
    );
    // The spec-less image itself is still served as an ordinary image.
    let resp = client()
        .get(server.v2("docker/cache/manifests/bundle.spack"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 200);
}

/// Old clients (layout 2) read database version 7 only; a cache written only by 1.x gets 8.
#[tokio::test]
async fn database_version_follows_the_oldest_layout() {
    let server = TestServer::start();
    push_fixture(&server, "old", &FixtureRepo::load("bearer-tls", "spack_v023")).await;
    push_fixture(&server, "new", &FixtureRepo::load("http-noauth", "spack_buildcache")).await;
    assert_eq!(served_index(&server, "old").await.1["database"]["version"], "7");
    assert_eq!(served_index(&server, "new").await.1["database"]["version"], "8");
    // Mixed: one v0.23 spec pushed into the 1.x cache turns it to 7.
    let old = FixtureRepo::load("bearer-tls", "spack_v023");
    push_fixture(&server, "new", &old).await;
    assert_eq!(served_index(&server, "new").await.1["database"]["version"], "7");
}

/// Deleting the built index manifest by digest does not break `index.spack`: it is rebuilt.
#[tokio::test]
async fn a_deleted_index_manifest_is_rebuilt() {
    let server = TestServer::start();
    let fixture = FixtureRepo::load("http-noauth", "spack_buildcache");
    push_fixture(&server, "cache", &fixture).await;
    let resp = client()
        .get(server.v2("cache/manifests/index.spack"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 200);
    let digest = resp.headers()["docker-content-digest"]
        .to_str()
        .expect("digest")
        .to_owned();
    let resp = client()
        .delete(server.v2(&format!("cache/manifests/{digest}")))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(resp.status(), 202);
    let (_, index) = served_index(&server, "cache").await;
    assert_eq!(index, fixture.spack_index().expect("fixture index"));
}

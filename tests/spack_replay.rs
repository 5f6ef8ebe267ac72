//! Replays of real Spack sessions (tests/fixtures/spack-oci/requests/*.jsonl) against Stowage.
//!
//! Each test starts a fresh server, rebuilds the state the capture started from (by replaying the
//! earlier captures of the same registry in order, and pushing base images the capture pulled
//! from), then replays the capture with `common::replay::Replayer`, which checks every status and
//! header Spack relies on. After every push the served `index.spack` must list exactly the spec
//! tags' hashes as `in_buildcache`.

mod common;

use common::replay::{EMPTY_CONFIG_DIGEST, Replayer, pushed_manifests, tag_hash};
use common::spack::{FixtureRepo, in_buildcache, push_fixture, served_index};
use common::{TestServer, client, sha256};

// DAG hashes of the 1.2.0.dev0 builds (README "Provenance").
const APPC: &str = "cbhp76umblq6t7nayg4dzofb4p63de3f";
const LIBB: &str = "zgl5yzcqzdnkd7scv2tq3qoi5fyw7vh3";
const LIBA: &str = "3vaqv4q37uunzetmg437xpx7ssadj3dh";
const GCC_RUNTIME: &str = "6ncciihz43s6lzi6zn52bxhu7ixu53u4";
const COMPILER_WRAPPER: &str = "dioyrijxsehyuerhuyhoobduwxjym7b3";
/// What `push libb` uploads: libb, its link dependencies and the build-only compiler-wrapper.
const LIBB_CLOSURE: &[&str] = &[LIBB, LIBA, GCC_RUNTIME, COMPILER_WRAPPER];
const ALL_FIVE: &[&str] = &[APPC, LIBB, LIBA, GCC_RUNTIME, COMPILER_WRAPPER];
// The v0.23.1 builds (no compiler-wrapper).
const V023: &[&str] = &[
    "sjwgkh5a34jtk2djdhppl7fxqcmva6e5",
    "kmajeogxm5kkqkh2ys3sj4awlrphcsjy",
    "kuy7ghr3xo2bom5ylg2qx35es2lx64kc",
    "qvnbqmq4iob2qjjyq4ofhpbvmaiwg5xh",
];

const HTTP_REPO: &str = "spack/buildcache";
const TLS_REPO: &str = "spack/tls";
const DOCKER_REPO: &str = "spack/tls-docker";

/// Replays the `oci+http` registry's history (captures 01, 02, 03, 05, 06, 07) up to and
/// including `last`, checking the index after each push.
async fn replay_http_noauth_through(r: &mut Replayer<'_>, last: &str) {
    for (capture, after) in [
        ("01", Some(LIBB_CLOSURE)),
        ("02", Some(ALL_FIVE)),
        ("03", Some(ALL_FIVE)),
        ("05", None),
        ("06", Some(ALL_FIVE)),
        ("07", Some(ALL_FIVE)),
    ] {
        r.replay(capture).await;
        if let Some(expected) = after {
            r.check_index(HTTP_REPO, expected).await;
        }
        if capture == last {
            return;
        }
    }
    panic!("no capture {last} in the oci+http history");
}

/// The https + Basic registry's `spack/tls` history: 11, then 12 (after the base image it pulls
/// from is in place), replayed over plain HTTP without auth.
async fn replay_tls_through(server: &TestServer, r: &mut Replayer<'_>, last: &str) {
    r.replay("11").await;
    r.check_index(TLS_REPO, LIBB_CLOSURE).await;
    if last == "11" {
        return;
    }
    push_fixture(server, "base/tiny", &FixtureRepo::load("basic-tls", "base_tiny")).await;
    r.replay("12").await;
    r.check_index(TLS_REPO, ALL_FIVE).await;
    assert_eq!(last, "12", "no capture {last} in the spack/tls push history");
}

/// `spack buildcache push ocicache libb` into an empty registry, without `--update-index`.
#[tokio::test]
async fn replay_01_push_without_index() {
    let server = TestServer::start();
    let mut r = Replayer::new(&server);
    replay_http_noauth_through(&mut r, "01").await;
    // Spack wrote no index; Stowage's is there anyway and lists the four specs.
    let tags = r.tags(HTTP_REPO).await;
    assert!(tags.contains("index.spack"), "tags/list lists index.spack: {tags:?}");
}

/// `push --update-index appc`: four specs skipped by manifest and config GETs, appc pushed, then
/// update-index (tags/list, manifests, configs, index blob, `{}` blob, client PUT of
/// `index.spack`).
#[tokio::test]
async fn replay_02_push_with_update_index() {
    let server = TestServer::start();
    let mut r = Replayer::new(&server);
    replay_http_noauth_through(&mut r, "02").await;
}

/// Standalone `update-index` from a fresh client: fetches every manifest and config, PUTs
/// `index.spack` again.
#[tokio::test]
async fn replay_03_update_index() {
    let server = TestServer::start();
    let mut r = Replayer::new(&server);
    replay_http_noauth_through(&mut r, "03").await;
}

/// `spack install --cache-only appc` over `oci+http`: install by tag (manifest, then layer).
#[tokio::test]
async fn replay_05_install_by_tag() {
    let server = TestServer::start();
    let mut r = Replayer::new(&server);
    replay_http_noauth_through(&mut r, "05").await;
}

/// Pushing again when everything is present: only manifest GETs, all 200.
#[tokio::test]
async fn replay_06_push_again_everything_skipped() {
    let server = TestServer::start();
    let mut r = Replayer::new(&server);
    replay_http_noauth_through(&mut r, "06").await;
}

/// `push --force liba`: no existence check, layers found by HEAD, new configs, manifests
/// overwritten. The index stays complete, and the tags now name the re-pushed manifests.
#[tokio::test]
async fn replay_07_force_repush_keeps_the_index_complete() {
    let server = TestServer::start();
    let mut r = Replayer::new(&server);
    replay_http_noauth_through(&mut r, "06").await;
    // The index was built and read before the re-push (check_index after 06) ...
    r.replay("07").await;
    // ... and is still complete after it.
    let index = r.check_index(HTTP_REPO, ALL_FIVE).await;
    // The re-pushed specs are indexed with their (unchanged) spec nodes.
    let reference = FixtureRepo::load("http-noauth", "spack_buildcache")
        .spack_index()
        .expect("fixture index");
    assert_eq!(index, reference, "index after --force equals the one Spack built");
    // Tags name the manifests PUT by the re-push, byte for byte.
    let http = client();
    for (tag, body) in pushed_manifests("07") {
        let resp = http
            .get(server.v2(&format!("{HTTP_REPO}/manifests/{tag}")))
            .header("Accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await
            .expect("GET manifest");
        assert_eq!(resp.status(), 200, "{tag}");
        let served = resp.bytes().await.expect("body");
        assert_eq!(sha256(&served), sha256(&body), "{tag} names the re-pushed manifest");
    }
}

/// `push --update-index --base-image 127.0.0.1:5002/base/tiny:1 appc` (captured over https with
/// Basic auth; replayed over plain HTTP without auth): base manifest and config GET, base layer
/// HEAD, GET and re-upload, then update-index.
#[tokio::test]
async fn replay_12_push_with_a_base_image() {
    let server = TestServer::start();
    let mut r = Replayer::new(&server);
    replay_tls_through(&server, &mut r, "12").await;
    // appc's manifest starts with the base layer.
    let resp = client()
        .get(server.v2(&format!("{TLS_REPO}/manifests/appc-0.3-{APPC}.spack")))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .expect("GET appc");
    assert_eq!(resp.status(), 200);
    let manifest: serde_json::Value = resp.json().await.expect("manifest JSON");
    assert_eq!(
        manifest["layers"][0]["digest"],
        "sha256:5959f0a7eb3a18f1cde78896cade75201929cbf318555d9ee05ca8e0fdb47b66"
    );
}

/// `spack buildcache list` twice from a fresh client (13: index manifest and blob, then the
/// manifest only), then a clean `spack install --cache-only appc` (14): index manifest, then per
/// spec manifest, config and `layers[-1]`.
#[tokio::test]
async fn replay_14_clean_install() {
    let server = TestServer::start();
    let mut r = Replayer::new(&server);
    replay_tls_through(&server, &mut r, "12").await;
    r.replay("13").await;
    r.replay("14").await;
}

/// `push --base-image …/base/tiny-docker:1 --tag appc-bundle appc` into an empty repository:
/// Docker v2 media types throughout, plus a spec-less `--tag` manifest.
#[tokio::test]
async fn replay_15_docker_base_image_and_tag() {
    let server = TestServer::start();
    push_fixture(
        &server,
        "base/tiny-docker",
        &FixtureRepo::load("basic-tls", "base_tiny-docker"),
    )
    .await;
    let mut r = Replayer::new(&server);
    r.replay("15").await;
    r.check_index(DOCKER_REPO, ALL_FIVE).await;
    assert!(r.tags(DOCKER_REPO).await.contains("appc-bundle"));
}

/// `spack buildcache list` (16), then `spack install --cache-only appc` (17) from the Docker-format
/// cache Spack never indexed: Stowage serves an index anyway, and the install by tag gets the
/// Docker manifests with their exact media type.
#[tokio::test]
async fn replay_17_install_docker_format() {
    let server = TestServer::start();
    push_fixture(
        &server,
        "base/tiny-docker",
        &FixtureRepo::load("basic-tls", "base_tiny-docker"),
    )
    .await;
    let mut r = Replayer::new(&server);
    r.replay("15").await;
    r.replay("16").await;
    r.replay("17").await;
    r.check_index(DOCKER_REPO, ALL_FIVE).await;
}

/// `push --update-index appc` by Spack v0.23.1 (layout 2, DB version 7), captured with Bearer
/// tokens; the token-server records and 401s are skipped.
#[tokio::test]
async fn replay_30_v023_client() {
    let server = TestServer::start();
    let mut r = Replayer::new(&server);
    r.replay("30").await;
    let index = r.check_index("spack/v023", V023).await;
    assert_eq!(index["database"]["version"], "7", "v0.23 reads DB version 7 only");
    let reference = FixtureRepo::load("bearer-tls", "spack_v023")
        .spack_index()
        .expect("fixture index");
    assert_eq!(index, reference, "served index equals the one v0.23.1 built");
}

/// Uploads `index_json` as Spack's update-index does (index blob, `{}` config, manifest PUT)
/// and returns the status of the manifest PUT.
async fn client_put_index(server: &TestServer, repo: &str, index_json: &[u8]) -> u16 {
    let index_digest = common::push_blob(server, repo, index_json).await;
    let config_digest = common::push_blob(server, repo, b"{}").await;
    assert_eq!(config_digest, EMPTY_CONFIG_DIGEST);
    let manifest = format!(
        concat!(
            r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","schemaVersion":2,"#,
            r#""config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},"#,
            r#""layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":{}}}]}}"#
        ),
        config_digest,
        index_digest,
        index_json.len()
    );
    let resp = client()
        .put(server.v2(&format!("{repo}/manifests/index.spack")))
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone().into_bytes())
        .send()
        .await
        .expect("PUT index.spack");
    resp.status().as_u16()
}

/// A client `PUT index.spack` (update-index) is accepted with 201, but the served index stays the
/// server's and complete, even when the client's index is stale (the update-index race of
/// PROTOCOL.md §7), whether or not the server's index was read before.
#[tokio::test]
async fn client_put_of_index_spack_keeps_the_servers_index() {
    let server = TestServer::start();
    let fixture = FixtureRepo::load("http-noauth", "spack_buildcache");
    let mut stale = fixture.spack_index().expect("fixture index");
    stale["database"]["installs"]
        .as_object_mut()
        .expect("installs")
        .remove(APPC);
    let stale = serde_json::to_vec(&stale).expect("serialise");

    for read_first in [false, true] {
        let repo = if read_first {
            "cache/read-first"
        } else {
            "cache/put-first"
        };
        push_fixture(&server, repo, &fixture).await;
        if read_first {
            let (_, index) = served_index(&server, repo).await;
            assert_eq!(in_buildcache(&index).len(), 5);
        }
        let status = client_put_index(&server, repo, &stale).await;
        assert_eq!(status, 201, "{repo}: client PUT index.spack");
        let (_, index) = served_index(&server, repo).await;
        let mut expected: Vec<String> = ALL_FIVE.iter().map(|s| s.to_string()).collect();
        expected.sort();
        assert_eq!(in_buildcache(&index), expected, "{repo}: served index is complete");
        assert_eq!(
            index,
            fixture.spack_index().expect("fixture index"),
            "{repo}: not the client's stale index"
        );
        // The tag list still names index.spack once.
        let resp = client()
            .get(server.v2(&format!("{repo}/tags/list")))
            .send()
            .await
            .expect("tags");
        let tags: serde_json::Value = resp.json().await.expect("tags JSON");
        let count = tags["tags"]
            .as_array()
            .expect("tags")
            .iter()
            .filter(|t| *t == "index.spack")
            .count();
        assert_eq!(count, 1, "{repo}: index.spack listed once: {tags}");
    }
}

/// Deleting a spec tag takes it out of the index (its node stays, as a dependency of the specs
/// still there, with `in_buildcache: false`); pushing it again puts it back.
#[tokio::test]
async fn deleting_a_spec_tag_removes_it_from_the_index() {
    let server = TestServer::start();
    let fixture = FixtureRepo::load("http-noauth", "spack_buildcache");
    push_fixture(&server, HTTP_REPO, &fixture).await;
    let mut r = Replayer::new(&server);
    r.check_index(HTTP_REPO, ALL_FIVE).await;

    let liba_tag = fixture
        .spec_tags()
        .into_iter()
        .find(|t| tag_hash(t) == LIBA)
        .expect("liba tag");
    let resp = client()
        .delete(server.v2(&format!("{HTTP_REPO}/manifests/{liba_tag}")))
        .send()
        .await
        .expect("DELETE tag");
    assert_eq!(resp.status(), 202, "DELETE {liba_tag}");
    assert!(!r.tags(HTTP_REPO).await.contains(&liba_tag));
    let index = r
        .check_index(HTTP_REPO, &[APPC, LIBB, GCC_RUNTIME, COMPILER_WRAPPER])
        .await;
    assert_eq!(
        index["database"]["installs"][LIBA]["in_buildcache"], false,
        "liba stays listed as libb's dependency, not in the build cache"
    );

    let (body, ct) = &fixture.manifests[&liba_tag];
    let resp = client()
        .put(server.v2(&format!("{HTTP_REPO}/manifests/{liba_tag}")))
        .header("Content-Type", ct.as_str())
        .body(body.clone())
        .send()
        .await
        .expect("PUT tag");
    assert_eq!(resp.status(), 201);
    r.check_index(HTTP_REPO, ALL_FIVE).await;
}

//! Proxied Spack buildcaches (issue 16): a Stowage whose `up/` prefix mirrors a second Stowage
//! holding a Spack buildcache, built there by replaying the fixture captures of real Spack
//! sessions (`common::replay`). The mirror's `index.spack` is the upstream's index merged with
//! the specs cached in the mirror (`registry::proxy::spack`).
//!
//! Both servers are real `stowage serve` processes on 127.0.0.1, on the blob backend
//! `STOWAGE_TEST_BACKEND` names.

mod common;

use std::time::{Duration, Instant};

use common::replay::{Replayer, is_spec_tag, tag_hash};
use common::spack::{in_buildcache, served_index};
use common::{TestServer, client, metric, sha256, wait_until};
use serde_json::{Value, json};

const APPC: &str = "cbhp76umblq6t7nayg4dzofb4p63de3f";
const LIBB: &str = "zgl5yzcqzdnkd7scv2tq3qoi5fyw7vh3";
const LIBA: &str = "3vaqv4q37uunzetmg437xpx7ssadj3dh";
const GCC_RUNTIME: &str = "6ncciihz43s6lzi6zn52bxhu7ixu53u4";
const COMPILER_WRAPPER: &str = "dioyrijxsehyuerhuyhoobduwxjym7b3";
const LIBB_CLOSURE: &[&str] = &[LIBB, LIBA, GCC_RUNTIME, COMPILER_WRAPPER];
const ALL_FIVE: &[&str] = &[APPC, LIBB, LIBA, GCC_RUNTIME, COMPILER_WRAPPER];

/// The repository the captures push to, at the upstream.
const REPO: &str = "spack/buildcache";

/// The annotation naming the upstream index a merged index was built from.
const UPSTREAM_ANNOTATION: &str = "org.stowage.spack.upstream-index";

/// An upstream in open mode and a mirror of it under `up/`.
struct Pair {
    upstream: TestServer,
    mirror: TestServer,
    _dir: tempfile::TempDir,
}

impl Pair {
    /// With `extra` lines added to the mirror's `[[proxy]]` entry.
    fn start(tag_ttl: &str, extra: &str) -> Pair {
        Self::start_with(tag_ttl, extra, &[])
    }

    /// With `envs` set for the mirror besides its configuration file.
    fn start_with(tag_ttl: &str, extra: &str, envs: &[(&str, &str)]) -> Pair {
        let upstream = TestServer::start();
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("mirror.toml");
        std::fs::write(
            &config,
            format!(
                "[[proxy]]\nprefix = \"up/\"\nurl = \"{}\"\ntag_ttl = \"{tag_ttl}\"\ntimeout_secs = 5\n{extra}",
                upstream.url
            ),
        )
        .expect("write mirror config");
        let mut all = vec![("STOWAGE_CONFIG", config.to_str().expect("utf-8"))];
        all.extend_from_slice(envs);
        let mirror = TestServer::start_with(&all);
        Pair {
            upstream,
            mirror,
            _dir: dir,
        }
    }
}

fn sorted(hashes: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = hashes.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// The spec tags of `repo` at `server`, by DAG hash.
async fn spec_tags(server: &TestServer, repo: &str) -> std::collections::BTreeMap<String, String> {
    let resp = client()
        .get(server.v2(&format!("{repo}/tags/list")))
        .send()
        .await
        .expect("GET tags/list");
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.expect("tags json");
    v["tags"]
        .as_array()
        .expect("tags")
        .iter()
        .filter_map(Value::as_str)
        .filter(|t| is_spec_tag(t))
        .map(|t| (tag_hash(t), t.to_owned()))
        .collect()
}

/// GET of a manifest; returns the status, the body and the `Docker-Content-Digest`.
async fn get_manifest(server: &TestServer, repo: &str, reference: &str) -> (u16, Vec<u8>, Option<String>) {
    let resp = client()
        .get(server.v2(&format!("{repo}/manifests/{reference}")))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .expect("GET manifest");
    let status = resp.status().as_u16();
    let digest = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (status, resp.bytes().await.expect("body").to_vec(), digest)
}

/// The `index.spack` manifest digest `server` serves for `repo`.
async fn index_digest(server: &TestServer, repo: &str) -> String {
    let (status, _, digest) = get_manifest(server, repo, "index.spack").await;
    assert_eq!(status, 200, "{repo} index.spack");
    digest.expect("Docker-Content-Digest")
}

/// The upstream's index lists exactly `hashes` as in the buildcache.
async fn in_index(server: &TestServer, repo: &str) -> Vec<String> {
    in_buildcache(&served_index(server, repo).await.1)
}

#[tokio::test]
async fn a_proxied_buildcache_serves_the_upstream_index_merged_with_the_specs_cached_here() {
    let ttl = Duration::from_secs(4);
    let pair = Pair::start("4s", "");
    let mirrored = format!("up/{REPO}");
    let mut upstream = Replayer::new(&pair.upstream);
    upstream.replay("01").await;
    upstream.check_index(REPO, LIBB_CLOSURE).await;

    // Nothing cached yet: the upstream's index, as it is.
    let read_at = Instant::now();
    assert_eq!(in_index(&pair.mirror, &mirrored).await, sorted(LIBB_CLOSURE));
    assert_eq!(
        index_digest(&pair.mirror, &mirrored).await,
        index_digest(&pair.upstream, REPO).await,
        "with no spec cached the mirror serves the upstream's index manifest"
    );

    // appc pushed upstream: not seen before tag_ttl.
    upstream.replay("02").await;
    upstream.check_index(REPO, ALL_FIVE).await;
    assert_eq!(in_index(&pair.mirror, &mirrored).await, sorted(LIBB_CLOSURE));
    assert!(
        read_at.elapsed() < ttl,
        "the machine was too slow to check the index within tag_ttl ({:?})",
        read_at.elapsed()
    );

    // libb pulled through: a merged index is built, naming the upstream index it merged.
    let tags = spec_tags(&pair.upstream, REPO).await;
    let libb_tag = tags[LIBB].clone();
    let (status, _, _) = get_manifest(&pair.mirror, &mirrored, &libb_tag).await;
    assert_eq!(status, 200, "libb pulled through");
    let (manifest, index) = served_index(&pair.mirror, &mirrored).await;
    assert!(
        manifest["annotations"][UPSTREAM_ANNOTATION].is_string(),
        "a merged index: {manifest}"
    );
    assert_eq!(
        in_buildcache(&index),
        sorted(LIBB_CLOSURE),
        "appc still unseen within tag_ttl"
    );
    // Read again: not rebuilt.
    let built = metric(&pair.mirror, "stowage_spack_index_builds_total", &[]).await;
    assert!(built >= 1.0, "a merged index was built");
    let merged = index_digest(&pair.mirror, &mirrored).await;
    assert_eq!(index_digest(&pair.mirror, &mirrored).await, merged);
    served_index(&pair.mirror, &mirrored).await;
    assert_eq!(
        metric(&pair.mirror, "stowage_spack_index_builds_total", &[]).await,
        built,
        "reads do not rebuild"
    );

    // After tag_ttl the upstream's new index is merged in.
    wait_until("appc is listed by the mirror", || async {
        in_index(&pair.mirror, &mirrored).await == sorted(ALL_FIVE)
    })
    .await;
    assert!(read_at.elapsed() >= ttl, "appc seen before tag_ttl");

    // The upstream deletes libb and appc: appc (never cached) goes, libb (cached) stays.
    for hash in [LIBB, APPC] {
        let resp = client()
            .delete(pair.upstream.v2(&format!("{REPO}/manifests/{}", tags[hash])))
            .send()
            .await
            .expect("DELETE");
        assert_eq!(resp.status(), 202, "upstream delete of {hash}");
    }
    let up_index = in_index(&pair.upstream, REPO).await;
    assert!(!up_index.contains(&LIBB.to_owned()) && !up_index.contains(&APPC.to_owned()));
    wait_until("appc leaves the mirror's index", || async {
        !in_index(&pair.mirror, &mirrored).await.contains(&APPC.to_owned())
    })
    .await;
    let (manifest, index) = served_index(&pair.mirror, &mirrored).await;
    assert_eq!(
        in_buildcache(&index),
        sorted(LIBB_CLOSURE),
        "the cached libb stays listed"
    );
    assert_eq!(
        manifest["annotations"][UPSTREAM_ANNOTATION].as_str(),
        Some(index_digest(&pair.upstream, REPO).await.as_str()),
        "merged from the upstream's current index"
    );
    let libb = &index["database"]["installs"][LIBB];
    assert_eq!(libb["spec"]["hash"], LIBB, "libb's spec as it was pushed");
    assert_eq!(
        index["database"]["installs"][LIBA]["ref_count"], 1,
        "liba is needed by libb"
    );

    // The upstream gone: the merged index is still served, with its blob.
    let mut pair = pair;
    pair.upstream.kill();
    let (_, stale) = served_index(&pair.mirror, &mirrored).await;
    assert_eq!(in_buildcache(&stale), sorted(LIBB_CLOSURE));
}

/// A valid index of one fake spec.
fn fake_index(hash: &str) -> Vec<u8> {
    json!({"database": {"version": "8", "installs": {
        hash: {"spec": {"name": "fake", "version": "1", "hash": hash}, "ref_count": 0, "in_buildcache": true}
    }}})
    .to_string()
    .into_bytes()
}

/// Pushes `index` as `repo:index.spack` at `server` (a repository with no spec: an ordinary
/// tag there), in the shape Spack writes.
async fn push_index(server: &TestServer, repo: &str, index: &[u8]) -> String {
    let http = client();
    let layer = common::push_blob(server, repo, index).await;
    let config = common::push_blob(server, repo, b"{}").await;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": index.len()}]
    })
    .to_string();
    let resp = http
        .put(server.v2(&format!("{repo}/manifests/index.spack")))
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .await
        .expect("PUT index");
    assert_eq!(resp.status(), 201);
    sha256(manifest.as_bytes())
}

/// The status and OCI error code of a GET of `index.spack`.
async fn index_error(server: &TestServer, repo: &str) -> (u16, String, String) {
    let resp = client()
        .get(server.v2(&format!("{repo}/manifests/index.spack")))
        .send()
        .await
        .expect("GET index");
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    (
        status,
        body["errors"][0]["code"].as_str().unwrap_or_default().to_owned(),
        body["errors"][0]["message"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test]
async fn a_corrupt_or_oversized_upstream_index_is_an_upstream_error_or_the_stale_copy() {
    let pair = Pair::start("1s", "max_spack_index_size = \"1KiB\"\n");

    // Corrupt, never cached: 502 UNAVAILABLE naming the problem.
    push_index(&pair.upstream, "corrupt/cache", b"{\"database\": not json").await;
    let (status, code, message) = index_error(&pair.mirror, "up/corrupt/cache").await;
    assert_eq!((status, code.as_str()), (502, "UNAVAILABLE"), "{message}");
    assert!(message.contains("not a valid Spack index"), "{message}");

    // Oversized, never cached: 502, before its blob is fetched.
    let mut big = fake_index("aaaa");
    big.extend(std::iter::repeat_n(b' ', 2048));
    let big_layer = sha256(&big);
    push_index(&pair.upstream, "big/cache", &big).await;
    let (status, code, message) = index_error(&pair.mirror, "up/big/cache").await;
    assert_eq!((status, code.as_str()), (502, "UNAVAILABLE"), "{message}");
    assert!(message.contains("max_spack_index_size"), "{message}");
    let resp = client()
        .head(pair.mirror.v2(&format!("up/big/cache/blobs/{big_layer}")))
        .send()
        .await
        .expect("HEAD");
    assert_eq!(resp.status(), 200, "the upstream still has it (asked upstream)");

    // A good index cached, then replaced upstream by a corrupt one: the good one stays served.
    let good = push_index(&pair.upstream, "site/cache", &fake_index("bbbb")).await;
    assert_eq!(index_digest(&pair.mirror, "up/site/cache").await, good);
    let bad = push_index(&pair.upstream, "site/cache", b"[1, 2, 3]").await;
    assert_ne!(good, bad);
    // Past tag_ttl a read asks the upstream again, refuses the new index and serves the old
    // one, counted as a stale serve; until then the old one is served as fresh. Either way: the
    // good one.
    wait_until(
        "the mirror re-validated index.spack and served the stale copy",
        || async {
            assert_eq!(index_digest(&pair.mirror, "up/site/cache").await, good);
            metric(&pair.mirror, "stowage_proxy_stale_serves_total", &[]).await >= 1.0
        },
    )
    .await;
    assert_eq!(index_digest(&pair.mirror, "up/site/cache").await, good);

    // The refused index is not fetched again: each re-validation (after tag_ttl) is a HEAD
    // that finds the refused digest, and the tag then counts as fresh for tag_ttl.
    let upstream_manifest_requests = |method: &'static str| {
        let upstream = &pair.upstream;
        async move {
            metric(
                upstream,
                "registry_http_requests_total",
                &[&format!("method=\"{method}\""), "handler=\"manifest\""],
            )
            .await
        }
    };
    let (gets, heads) = (
        upstream_manifest_requests("get").await,
        upstream_manifest_requests("head").await,
    );
    wait_until("the mirror re-validated index.spack twice more", || async {
        assert_eq!(index_digest(&pair.mirror, "up/site/cache").await, good);
        upstream_manifest_requests("head").await >= heads + 2.0
    })
    .await;
    assert_eq!(
        upstream_manifest_requests("get").await,
        gets,
        "the refused index was not fetched again"
    );
}

/// Blob and manifest GETs the upstream answered 200 (what the mirror fetched).
async fn upstream_fetches(upstream: &TestServer) -> f64 {
    let mut n = 0.0;
    for handler in ["blob", "manifest"] {
        n += metric(
            upstream,
            "registry_http_requests_total",
            &["method=\"get\"", "code=\"200\"", &format!("handler=\"{handler}\"")],
        )
        .await;
    }
    n
}

// The v0.23.1 builds, pushed into the hosted repository.
const V023: &[&str] = &[
    "sjwgkh5a34jtk2djdhppl7fxqcmva6e5",
    "kmajeogxm5kkqkh2ys3sj4awlrphcsjy",
    "kuy7ghr3xo2bom5ylg2qx35es2lx64kc",
    "qvnbqmq4iob2qjjyq4ofhpbvmaiwg5xh",
];

#[tokio::test]
async fn a_hosted_buildcache_with_a_proxied_fallback_lists_both_and_installs_through_it() {
    // The hosted repository is the one the install capture asks for (`spack/buildcache`);
    // its fallback mirrors the upstream's buildcache of the same name.
    let mut pair = Pair::start(
        "10m",
        &format!("\n[[spack.merge]]\nrepository = \"{REPO}\"\nfallbacks = [\"up/{REPO}\"]\n"),
    );
    let mut upstream = Replayer::new(&pair.upstream);
    upstream.replay("01").await;
    upstream.replay("02").await;
    upstream.check_index(REPO, ALL_FIVE).await;

    // The site's own specs: the v0.23.1 buildcache, as real Spack pushed it.
    common::spack::push_fixture(
        &pair.mirror,
        REPO,
        &common::spack::FixtureRepo::load("bearer-tls", "spack_v023"),
    )
    .await;
    let mut both: Vec<&str> = ALL_FIVE.to_vec();
    both.extend_from_slice(V023);
    let (manifest, index) = served_index(&pair.mirror, REPO).await;
    assert_eq!(
        in_buildcache(&index),
        sorted(&both),
        "the hosted specs and the upstream's"
    );
    assert!(
        manifest["annotations"][UPSTREAM_ANNOTATION]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("up/{REPO}@sha256:"))),
        "built from the fallback's index: {manifest}"
    );
    let built = metric(&pair.mirror, "stowage_spack_index_builds_total", &[]).await;
    let merged = index_digest(&pair.mirror, REPO).await;
    assert_eq!(
        index_digest(&pair.mirror, REPO).await,
        merged,
        "not rebuilt per request"
    );
    assert_eq!(
        metric(&pair.mirror, "stowage_spack_index_builds_total", &[]).await,
        built,
        "reads do not rebuild"
    );

    // An install-shaped session against the hosted repository: every spec comes from the
    // upstream through the fallback.
    let before = upstream_fetches(&pair.upstream).await;
    Replayer::new(&pair.mirror).replay("05").await;
    let fetched = upstream_fetches(&pair.upstream).await - before;
    assert!(fetched > 0.0, "the specs were fetched from the upstream");
    // Again: all from the mirror's cache.
    Replayer::new(&pair.mirror).replay("05").await;
    assert_eq!(
        upstream_fetches(&pair.upstream).await - before,
        fetched,
        "each spec fetched from the upstream once"
    );
    // The fallback is a pull-through cache: it holds what was fetched, the hosted repository
    // gained nothing.
    let cached = spec_tags(&pair.mirror, &format!("up/{REPO}")).await;
    assert!(cached.contains_key(APPC), "appc cached in the fallback: {cached:?}");
    let hosted = spec_tags(&pair.mirror, REPO).await;
    assert!(
        !hosted.contains_key(APPC),
        "the hosted repository holds its own specs only"
    );

    // The upstream stopped: the same install still succeeds, from the cache.
    pair.upstream.kill();
    Replayer::new(&pair.mirror).replay("05").await;
    // A spec neither side has is still unknown, not an error.
    let (status, _, _) = get_manifest(&pair.mirror, REPO, "nothing-1.0-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.spack").await;
    assert_eq!(
        status, 502,
        "with the upstream down an uncached tag is an upstream error"
    );
}

#[tokio::test]
async fn a_fallback_is_pulled_with_the_hosted_repositorys_permission_and_pushes_link_its_blobs() {
    let pair = Pair::start_with(
        "10m",
        &format!(
            "\n[[spack.merge]]\nrepository = \"site/cache\"\nfallbacks = [\"up/{REPO}\"]\n\n[auth]\nenabled = true\n\n\
             [[auth.rules]]\nrepositories = [\"site/cache\"]\nusers = [\"site\"]\nactions = [\"pull\", \"push\"]\n"
        ),
        &[("STOWAGE_AUTH__ENABLED", "true")],
    );
    common::run_cli(pair.mirror.data_dir(), &["user", "add", "site"], "site-pw\n");
    let mut upstream = Replayer::new(&pair.upstream);
    upstream.replay("01").await;
    let tags = spec_tags(&pair.upstream, REPO).await;
    let http = client();
    let get = |path: String| {
        http.get(pair.mirror.v2(&path))
            .header("Accept", "application/vnd.oci.image.manifest.v1+json")
    };

    // Pull on site/cache is enough; the fallback itself is not open to this user, nor is
    // site/cache to anonymous clients.
    let libb = format!("site/cache/manifests/{}", tags[LIBB]);
    let resp = get(libb.clone())
        .basic_auth("site", Some("site-pw"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 200, "through the fallback");
    let manifest: Value = resp.json().await.expect("manifest");
    let resp = get(libb).send().await.expect("GET");
    assert_eq!(resp.status(), 401, "anonymous");
    let resp = get(format!("up/{REPO}/manifests/{}", tags[LIBB]))
        .basic_auth("site", Some("site-pw"))
        .send()
        .await
        .expect("GET");
    assert!(
        [401, 403].contains(&resp.status().as_u16()),
        "the fallback by its own name: {}",
        resp.status()
    );
    let layer = manifest["layers"][0]["digest"].as_str().expect("layer").to_owned();
    let resp = get(format!("site/cache/blobs/{layer}"))
        .basic_auth("site", Some("site-pw"))
        .send()
        .await
        .expect("GET blob");
    assert_eq!(resp.status(), 200);
    assert_eq!(sha256(&resp.bytes().await.expect("blob")), layer);

    // A push whose blobs a HEAD found in the fallback (so the client did not upload them):
    // liba's manifest, never fetched by the mirror, pushed to site/cache under a tag of its own.
    let (status, body, _) = get_manifest(&pair.upstream, REPO, &tags[LIBA]).await;
    assert_eq!(status, 200);
    let liba: Value = serde_json::from_slice(&body).expect("liba manifest");
    for d in [&liba["config"]["digest"], &liba["layers"][0]["digest"]] {
        let resp = http
            .head(
                pair.mirror
                    .v2(&format!("site/cache/blobs/{}", d.as_str().expect("digest"))),
            )
            .basic_auth("site", Some("site-pw"))
            .send()
            .await
            .expect("HEAD");
        assert_eq!(resp.status(), 200, "found through the fallback");
    }
    let resp = http
        .put(pair.mirror.v2("site/cache/manifests/liba-copy"))
        .basic_auth("site", Some("site-pw"))
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .body(body.clone())
        .send()
        .await
        .expect("PUT");
    assert_eq!(resp.status(), 201, "the fallback's blobs were linked for the push");
    let resp = http
        .put(pair.mirror.v2(&format!("up/{REPO}/manifests/liba-copy")))
        .basic_auth("site", Some("site-pw"))
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .body(body)
        .send()
        .await
        .expect("PUT");
    assert!(
        resp.status().is_client_error(),
        "the fallback stays read-only: {}",
        resp.status()
    );
}

#[tokio::test]
async fn a_hosted_buildcache_takes_pushes_and_lists_its_own_specs_while_its_fallbacks_upstream_is_down() {
    let mut pair = Pair::start(
        "10m",
        &format!("\n[[spack.merge]]\nrepository = \"{REPO}\"\nfallbacks = [\"up/{REPO}\"]\n"),
    );
    let mut upstream = Replayer::new(&pair.upstream);
    upstream.replay("01").await;
    upstream.replay("02").await;
    upstream.check_index(REPO, ALL_FIVE).await;
    // Stopped before the mirror ever read from it: the fallback has nothing cached.
    let upstream_addr = pair.upstream.url.trim_start_matches("http://").to_owned();
    pair.upstream.kill();

    // A real Spack push (capture 01) into the hosted repository: every blob is `HEAD`ed
    // first, and Spack aborts on any answer but 200 or 404. The fallback's upstream cannot be
    // asked, so the blobs are simply not there (404) and get uploaded.
    let mismatches = Replayer::new(&pair.mirror)
        .replay_capture(&common::replay::Capture::load("01"))
        .await;
    // The existence check of each spec's manifest answers the fallback's upstream error; Spack
    // counts any error there as "missing" (PROTOCOL.md, push step 1), so that is no failure.
    let unexpected: Vec<&String> = mismatches
        .iter()
        .filter(|m| !(m.contains(" GET /v2/") && m.contains("/manifests/") && m.contains("status 502, captured 404")))
        .collect();
    assert!(
        unexpected.is_empty(),
        "the push differs from the capture:\n  {}",
        unexpected.iter().map(|m| m.as_str()).collect::<Vec<_>>().join("\n  ")
    );
    let pushed = spec_tags(&pair.mirror, REPO).await;
    assert_eq!(
        pushed.keys().cloned().collect::<Vec<_>>(),
        sorted(LIBB_CLOSURE),
        "every spec of the push stored in the hosted repository"
    );

    // A blob neither side has: 404 `BLOB_UNKNOWN`, not a 502, on HEAD and GET.
    let missing = format!("sha256:{}", "0".repeat(64));
    for method in [reqwest::Method::HEAD, reqwest::Method::GET] {
        let resp = client()
            .request(method.clone(), pair.mirror.v2(&format!("{REPO}/blobs/{missing}")))
            .send()
            .await
            .expect("blob request");
        assert_eq!(resp.status(), 404, "{method} of an unknown blob");
        if method == reqwest::Method::GET {
            let body: Value = resp.json().await.expect("error body");
            assert_eq!(body["errors"][0]["code"], "BLOB_UNKNOWN", "{body}");
        }
    }

    // The hosted index with the fallback unavailable and nothing cached from it: the site's
    // own specs, not a 502.
    let (manifest, index) = served_index(&pair.mirror, REPO).await;
    assert_eq!(in_buildcache(&index), sorted(LIBB_CLOSURE), "its own specs");
    assert_eq!(
        manifest["annotations"][UPSTREAM_ANNOTATION],
        format!("up/{REPO}@unavailable"),
        "built without the fallback: {manifest}"
    );
    let built = metric(&pair.mirror, "stowage_spack_index_builds_total", &[]).await;
    served_index(&pair.mirror, REPO).await;
    assert_eq!(
        metric(&pair.mirror, "stowage_spack_index_builds_total", &[]).await,
        built,
        "not rebuilt per read while it is down"
    );

    // The upstream back (same address): the next read merges its index in.
    pair.upstream
        .crash_and_restart_with(&[("STOWAGE_LISTEN", upstream_addr.as_str())]);
    assert_eq!(
        pair.upstream.url,
        format!("http://{upstream_addr}"),
        "restarted on its address"
    );
    let (manifest, index) = served_index(&pair.mirror, REPO).await;
    assert_eq!(in_buildcache(&index), sorted(ALL_FIVE), "its own and the upstream's");
    assert!(
        manifest["annotations"][UPSTREAM_ANNOTATION]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("up/{REPO}@sha256:"))),
        "rebuilt from the fallback's index: {manifest}"
    );
}

#[tokio::test]
async fn a_proxied_buildcache_whose_upstream_is_down_at_its_first_index_read_lists_its_cached_specs() {
    let mut pair = Pair::start("10m", "");
    let mirrored = format!("up/{REPO}");
    let mut upstream = Replayer::new(&pair.upstream);
    upstream.replay("01").await;
    upstream.replay("02").await;
    upstream.check_index(REPO, ALL_FIVE).await;
    // One spec pulled through; the index never read.
    let tags = spec_tags(&pair.upstream, REPO).await;
    let (status, _, _) = get_manifest(&pair.mirror, &mirrored, &tags[LIBA]).await;
    assert_eq!(status, 200, "liba pulled through");
    let upstream_addr = pair.upstream.url.trim_start_matches("http://").to_owned();
    pair.upstream.kill();

    // No merged index yet and no upstream index cached: the cached spec alone, not a 502.
    let (manifest, index) = served_index(&pair.mirror, &mirrored).await;
    assert_eq!(in_buildcache(&index), sorted(&[LIBA]), "the spec cached here");
    assert_eq!(
        manifest["annotations"][UPSTREAM_ANNOTATION], "unavailable",
        "{manifest}"
    );

    // The upstream back: the next read merges its index in.
    pair.upstream
        .crash_and_restart_with(&[("STOWAGE_LISTEN", upstream_addr.as_str())]);
    let (manifest, index) = served_index(&pair.mirror, &mirrored).await;
    assert_eq!(in_buildcache(&index), sorted(ALL_FIVE), "the upstream's specs too");
    assert!(
        manifest["annotations"][UPSTREAM_ANNOTATION]
            .as_str()
            .is_some_and(|a| a.starts_with("sha256:")),
        "rebuilt from the upstream's index: {manifest}"
    );
}

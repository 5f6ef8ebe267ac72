//! Pull-through caching (`[[proxy]]`, issue 16): a Stowage whose `hub/` prefix mirrors a
//! second Stowage, the upstream, which has authentication on, so that every fetch goes through
//! the token flow (`WWW-Authenticate: Bearer` → `/token` with the mirror's Basic credentials →
//! retry with the token).
//!
//! Both servers are real `stowage serve` processes on 127.0.0.1, on the blob backend
//! `STOWAGE_TEST_BACKEND` names. Upstream fetches are counted at the upstream, from its
//! `registry_http_requests_total`. `skopeo` (installed by `scripts/test`) must be present: these
//! tests never skip a missing client.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::tools::{ContainersWorld, output_within, require_tool};
use common::{TestServer, metric, run_cli, sha256, wait_until};
use serde_json::{Value, json};

const UPSTREAM_CONFIG: &str = r#"
[auth]
enabled = true

[[auth.rules]]
repositories = ["**"]
users = ["alice"]
actions = ["pull", "push", "delete"]

[[auth.rules]]
repositories = ["**"]
users = ["mirror"]
actions = ["pull"]
"#;

/// An upstream with authentication on (`alice` pushes, `mirror` may only pull) and a
/// downstream in open mode mirroring it under `hub/`.
struct Pair {
    upstream: TestServer,
    downstream: TestServer,
    _dir: tempfile::TempDir,
}

impl Pair {
    fn start(tag_ttl: &str) -> Pair {
        Self::start_with(tag_ttl, false)
    }

    /// With `tls`, the upstream serves HTTPS with a self-signed certificate, which the mirror
    /// is given as its `ca_file`.
    fn start_with(tag_ttl: &str, tls: bool) -> Pair {
        Self::start_full(tag_ttl, tls, "")
    }

    /// With `extra` lines added to the mirror's `[[proxy]]` entry.
    fn start_full(tag_ttl: &str, tls: bool, extra: &str) -> Pair {
        Self::start_full_on(common::catalog(), tag_ttl, tls, extra)
    }

    /// [`Pair::start_full`] with the mirror's catalog on `engine`, whatever the environment says.
    fn start_full_on(engine: common::Catalog, tag_ttl: &str, tls: bool, extra: &str) -> Pair {
        let dir = tempfile::tempdir().expect("temp dir");
        let up_config = dir.path().join("upstream.toml");
        std::fs::write(&up_config, UPSTREAM_CONFIG).expect("write upstream config");
        let mut envs = vec![
            (
                "STOWAGE_CONFIG".to_owned(),
                up_config.to_str().expect("utf-8").to_owned(),
            ),
            ("STOWAGE_AUTH__ENABLED".to_owned(), "true".to_owned()),
        ];
        let mut ca_line = String::new();
        if tls {
            let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("generate certificate");
            let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
            std::fs::write(&cert, ck.cert.pem()).expect("write cert");
            std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write key");
            envs.push(("STOWAGE_TLS__CERT".into(), cert.to_str().expect("utf-8").into()));
            envs.push(("STOWAGE_TLS__KEY".into(), key.to_str().expect("utf-8").into()));
            ca_line = format!("ca_file = \"{}\"\n", cert.display());
        }
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let upstream = TestServer::start_with(&envs);
        assert_eq!(upstream.url.starts_with("https://"), tls, "{}", upstream.url);
        for (name, password) in [("alice", "alice-pw"), ("mirror", "mirror-pw")] {
            run_cli(upstream.data_dir(), &["user", "add", name], &format!("{password}\n"));
        }
        let password_file = dir.path().join("mirror.password");
        std::fs::write(&password_file, "mirror-pw\n").expect("write password file");
        let down_config = dir.path().join("downstream.toml");
        std::fs::write(
            &down_config,
            format!(
                "[[proxy]]\nprefix = \"hub/\"\nurl = \"{}\"\nusername = \"mirror\"\npassword_file = \"{}\"\n\
                 tag_ttl = \"{tag_ttl}\"\ntimeout_secs = 5\n{ca_line}{extra}",
                upstream.url,
                password_file.display()
            ),
        )
        .expect("write downstream config");
        let downstream =
            TestServer::start_on_catalog(engine, &[("STOWAGE_CONFIG", down_config.to_str().expect("utf-8"))]);
        Pair {
            upstream,
            downstream,
            _dir: dir,
        }
    }

    /// Points the mirror's `[[proxy]]` entry at the upstream's current URL (it changes when
    /// the upstream restarts) and restarts the mirror.
    fn point_mirror_at_upstream(&mut self) {
        let path = self._dir.path().join("downstream.toml");
        let text = std::fs::read_to_string(&path).expect("read downstream config");
        let text: Vec<String> = text
            .lines()
            .map(|l| {
                if l.starts_with("url = ") {
                    format!("url = \"{}\"", self.upstream.url)
                } else {
                    l.to_owned()
                }
            })
            .collect();
        std::fs::write(&path, text.join("\n")).expect("write downstream config");
        self.downstream.crash_and_restart();
    }

    fn down(&self, path: &str) -> String {
        self.downstream.v2(&format!("hub/{path}"))
    }
}

/// An HTTP client that follows no redirects and trusts the test upstream's self-signed
/// certificate (the mirror itself is given it as `ca_file`).
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .tls_danger_accept_invalid_certs(true)
        .build()
        .expect("build reqwest client")
}

/// An image pushed to the upstream.
struct Image {
    manifest: String,
    config: (String, Vec<u8>),
    layer: (String, Vec<u8>),
}

async fn push_blob_as_alice(server: &TestServer, repo: &str, data: &[u8]) -> String {
    let digest = sha256(data);
    let resp = client()
        .post(server.v2(&format!("{repo}/blobs/uploads/?digest={digest}")))
        .basic_auth("alice", Some("alice-pw"))
        .header("Content-Type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .expect("POST blob");
    assert_eq!(resp.status(), 201, "blob POST of {digest} to the upstream");
    digest
}

/// Pushes an OCI image (config naming `seed`, one layer) to the upstream as alice.
async fn push_upstream(server: &TestServer, repo: &str, tag: &str, layer: Vec<u8>, seed: &str) -> Image {
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []},
        "config": {"Labels": {"seed": seed}},
    }))
    .expect("config");
    let config_digest = push_blob_as_alice(server, repo, &config).await;
    let layer_digest = push_blob_as_alice(server, repo, &layer).await;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer.len()}],
    }))
    .expect("manifest");
    let resp = client()
        .put(server.v2(&format!("{repo}/manifests/{tag}")))
        .basic_auth("alice", Some("alice-pw"))
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .await
        .expect("PUT manifest");
    assert_eq!(resp.status(), 201, "manifest PUT {repo}:{tag} to the upstream");
    Image {
        manifest: sha256(&manifest),
        config: (config_digest, config),
        layer: (layer_digest, layer),
    }
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Status, `Docker-Content-Digest` and body of a GET.
async fn get(url: &str) -> (u16, Option<String>, Vec<u8>) {
    let resp = client()
        .get(url)
        .header(
            "Accept",
            "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
        )
        .send()
        .await
        .expect("GET");
    let status = resp.status().as_u16();
    let digest = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (status, digest, resp.bytes().await.expect("body").to_vec())
}

/// The OCI error code of an error body.
fn error_code(body: &[u8]) -> String {
    let v: Value =
        serde_json::from_slice(body).unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(body)));
    v["errors"][0]["code"].as_str().expect("an OCI error").to_owned()
}

fn error_message(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).expect("JSON");
    v["errors"][0]["message"].as_str().unwrap_or_default().to_owned()
}

/// Blob GETs the upstream answered 200 (what the mirror fetched).
async fn upstream_blob_fetches(pair: &Pair) -> f64 {
    metric(
        &pair.upstream,
        "registry_http_requests_total",
        &["method=\"get\"", "code=\"200\"", "handler=\"blob\""],
    )
    .await
}

/// Pulls an image through the mirror with plain HTTP, checking every byte against its digest.
async fn pull_over_http(pair: &Pair, repo: &str, reference: &str, image: &Image) {
    let (status, digest, body) = get(&pair.down(&format!("{repo}/manifests/{reference}"))).await;
    assert_eq!(
        status,
        200,
        "manifest {repo}:{reference}: {}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(digest.as_deref(), Some(image.manifest.as_str()));
    assert_eq!(sha256(&body), image.manifest, "the manifest's bytes are the upstream's");
    for (d, bytes) in [&image.config, &image.layer] {
        let (status, _, body) = get(&pair.down(&format!("{repo}/blobs/{d}"))).await;
        assert_eq!(status, 200, "blob {d}");
        assert_eq!(&sha256(&body), d, "blob bytes hash to the digest");
        assert_eq!(&body, bytes);
    }
}

fn require_skopeo() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("skopeo"))
        .find(|c| c.is_file())
        .unwrap_or_else(|| {
            panic!("`skopeo` is not installed; `scripts/test` installs it (apt-get install skopeo). Never skipped.")
        })
}

/// `skopeo copy` from the mirror into an OCI layout, returning the layout's directory.
fn skopeo_pull(skopeo: &Path, scratch: &Path, source: &str, name: &str) -> PathBuf {
    let auth = scratch.join("auth.json");
    std::fs::write(&auth, r#"{"auths":{}}"#).expect("auth file");
    let dest = scratch.join(name);
    let mut cmd = Command::new(skopeo);
    cmd.args([
        "--insecure-policy",
        "copy",
        "--preserve-digests",
        "--src-tls-verify=false",
        source,
    ])
    .arg(format!("oci:{}:pulled", dest.display()))
    .env("REGISTRY_AUTH_FILE", &auth)
    .env("TMPDIR", scratch);
    let out = output_within(&mut cmd);
    assert!(
        out.status.success(),
        "skopeo copy {source}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dest
}

fn layout_blob(layout: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("sha256");
    std::fs::read(layout.join("blobs/sha256").join(hex)).expect("blob in the layout")
}

#[tokio::test]
async fn pulls_through_by_tag_and_digest_with_http_and_skopeo_storing_each_blob_once() {
    let pair = Pair::start("5m");
    let image = push_upstream(&pair.upstream, "lib/app", "v1", pseudo_random(300_000, 1), "app").await;

    pull_over_http(&pair, "lib/app", "v1", &image).await;
    for (d, _) in [&image.config, &image.layer] {
        assert!(pair.downstream.blob_object_exists(d), "{d} is stored at the mirror");
    }
    let fetched = upstream_blob_fetches(&pair).await;
    assert_eq!(fetched, 2.0, "config and layer fetched once each");
    // The mirror asked the upstream's token endpoint, as the mirror user.
    assert!(
        metric(
            &pair.upstream,
            "stowage_auth_tokens_issued_total",
            &["kind=\"registry\""]
        )
        .await
            >= 1.0
    );

    // By digest, and again by tag: served from the cache.
    pull_over_http(&pair, "lib/app", &image.manifest, &image).await;
    pull_over_http(&pair, "lib/app", "v1", &image).await;
    assert_eq!(upstream_blob_fetches(&pair).await, fetched, "nothing fetched again");

    // skopeo, by tag and by digest.
    let skopeo = require_skopeo();
    let scratch = tempfile::tempdir().expect("scratch");
    let host = &pair.downstream.host;
    for (name, source) in [
        ("by-tag", format!("docker://{host}/hub/lib/app:v1")),
        ("by-digest", format!("docker://{host}/hub/lib/app@{}", image.manifest)),
    ] {
        let layout = skopeo_pull(&skopeo, scratch.path(), &source, name);
        assert_eq!(layout_blob(&layout, &image.manifest), {
            let (_, _, body) = get(&pair.down(&format!("lib/app/manifests/{}", image.manifest))).await;
            body
        });
        assert_eq!(
            layout_blob(&layout, &image.layer.0),
            image.layer.1,
            "{name}: layer bytes"
        );
    }
    assert_eq!(
        upstream_blob_fetches(&pair).await,
        fetched,
        "skopeo was served from the cache"
    );

    // A second image, pulled by digest first: fetched on demand as well.
    let other = push_upstream(&pair.upstream, "lib/other", "v1", pseudo_random(1000, 2), "other").await;
    pull_over_http(&pair, "lib/other", &other.manifest, &other).await;
    let (status, _, body) = get(&pair.down("lib/missing/manifests/v1")).await;
    assert_eq!((status, error_code(&body)), (404, "MANIFEST_UNKNOWN".to_owned()));
}

#[tokio::test]
async fn upstream_down_serves_cached_tags_and_digests_and_refuses_uncached_ones() {
    let mut pair = Pair::start("1s");
    let image = push_upstream(&pair.upstream, "lib/app", "v1", pseudo_random(5000, 3), "app").await;
    push_upstream(&pair.upstream, "lib/app", "v2", pseudo_random(5000, 4), "app2").await;
    pull_over_http(&pair, "lib/app", "v1", &image).await;

    pair.upstream.kill();
    // Wait out the tag's TTL (counted from the end of its validation, which the pull above
    // waited for), so the next pull must re-validate it with the dead upstream.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    pull_over_http(&pair, "lib/app", "v1", &image).await;
    pull_over_http(&pair, "lib/app", &image.manifest, &image).await;
    let stale = metric(
        &pair.downstream,
        "stowage_proxy_stale_serves_total",
        &["upstream=\"hub/\""],
    )
    .await;
    assert!(stale >= 1.0, "stale serves counted: {stale}");
    assert!(
        metric(
            &pair.downstream,
            "stowage_proxy_upstream_requests_total",
            &["outcome=\"unreachable\""]
        )
        .await
            >= 1.0
    );

    for uncached in [
        "lib/app/manifests/v2",
        "lib/app/manifests/sha256:0000000000000000000000000000000000000000000000000000000000000000",
    ] {
        let (status, _, body) = get(&pair.down(uncached)).await;
        assert_eq!(status, 502, "{uncached}: {}", String::from_utf8_lossy(&body));
        assert_eq!(error_code(&body), "UNAVAILABLE");
        assert!(
            error_message(&body).contains("could not be reached"),
            "{}",
            error_message(&body)
        );
    }
    let (status, _, body) = get(&pair.down(&format!("lib/app/blobs/{}", sha256(b"never pushed")))).await;
    assert_eq!((status, error_code(&body)), (502, "UNAVAILABLE".to_owned()));
}

#[tokio::test]
async fn a_moved_upstream_tag_is_seen_after_tag_ttl_and_not_before() {
    let ttl = Duration::from_secs(4);
    let pair = Pair::start("4s");
    let first = push_upstream(&pair.upstream, "lib/app", "latest", pseudo_random(2000, 5), "first").await;
    // The second image goes up under another tag before the timed window, so that moving
    // `latest` inside it is one manifest PUT (pushing blobs to a moto-backed upstream on a
    // loaded machine could take longer than the TTL on its own).
    let second = push_upstream(&pair.upstream, "lib/app", "next", pseudo_random(2000, 6), "second").await;
    assert_ne!(first.manifest, second.manifest);
    let second_body = {
        let resp = client()
            .get(pair.upstream.v2("lib/app/manifests/next"))
            .basic_auth("alice", Some("alice-pw"))
            .header("Accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await
            .expect("GET manifest");
        assert_eq!(resp.status(), 200, "the upstream serves its own tag");
        resp.bytes().await.expect("manifest body").to_vec()
    };

    // The mirror validates `latest` at this manifest GET; the TTL runs from here.
    let validated = Instant::now();
    let (status, digest, _) = get(&pair.down("lib/app/manifests/latest")).await;
    assert_eq!((status, digest.as_deref()), (200, Some(first.manifest.as_str())));
    let resp = client()
        .put(pair.upstream.v2("lib/app/manifests/latest"))
        .basic_auth("alice", Some("alice-pw"))
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .body(second_body)
        .send()
        .await
        .expect("PUT manifest");
    assert_eq!(resp.status(), 201, "latest moved at the upstream");
    let (status, digest, _) = get(&pair.down("lib/app/manifests/latest")).await;
    assert!(
        validated.elapsed() < ttl,
        "three requests took longer than the TTL: the machine is too slow for this check"
    );
    assert_eq!(
        (status, digest.as_deref()),
        (200, Some(first.manifest.as_str())),
        "old digest before tag_ttl"
    );
    pull_over_http(&pair, "lib/app", "latest", &first).await;

    wait_until("the mirror serves the moved tag", || async {
        let (_, digest, _) = get(&pair.down("lib/app/manifests/latest")).await;
        if digest.as_deref() == Some(second.manifest.as_str()) {
            assert!(validated.elapsed() >= ttl, "the moved tag was seen before tag_ttl");
            true
        } else {
            false
        }
    })
    .await;
    pull_over_http(&pair, "lib/app", "latest", &second).await;
    // The old image stays available by digest.
    pull_over_http(&pair, "lib/app", &first.manifest, &first).await;
}

/// An upstream 404 is remembered for `miss_ttl`: asking again for a blob or a tag the upstream
/// lacks (by `HEAD` or `GET`) costs no upstream request until then, and what the upstream has
/// gained meanwhile is served once the entry expires.
#[tokio::test]
async fn an_upstream_miss_is_remembered_for_miss_ttl() {
    let ttl = Duration::from_secs(10);
    let pair = Pair::start_full("5m", false, "miss_ttl = \"10s\"\n");
    let layer = pseudo_random(3000, 21);
    let digest = sha256(&layer);
    let upstream_404s = || metric(&pair.upstream, "registry_http_requests_total", &["code=\"404\""]);
    let remembered = || {
        metric(
            &pair.downstream,
            "stowage_proxy_upstream_requests_total",
            &["outcome=\"not_found_remembered\""],
        )
    };
    let (before, remembered_before) = (upstream_404s().await, remembered().await);
    let asked = Instant::now();
    let http = client();
    for _ in 0..5 {
        let head = http
            .head(pair.down(&format!("lib/app/blobs/{digest}")))
            .send()
            .await
            .expect("HEAD");
        assert_eq!(head.status(), 404);
        let (status, _, body) = get(&pair.down(&format!("lib/app/blobs/{digest}"))).await;
        assert_eq!((status, error_code(&body)), (404, "BLOB_UNKNOWN".to_owned()));
        let (status, _, body) = get(&pair.down("lib/app/manifests/later")).await;
        assert_eq!((status, error_code(&body)), (404, "MANIFEST_UNKNOWN".to_owned()));
    }
    assert_eq!(
        upstream_404s().await - before,
        2.0,
        "one upstream request for the blob (HEAD and GET share it) and one for the tag"
    );
    assert_eq!(remembered().await - remembered_before, 13.0);

    // The upstream gains both; the mirror still remembers them missing.
    let image = push_upstream(&pair.upstream, "lib/app", "later", layer, "later").await;
    let (status, _, _) = get(&pair.down("lib/app/manifests/later")).await;
    assert!(
        asked.elapsed() < ttl,
        "pushing one small image took longer than miss_ttl: the machine is too slow for this check"
    );
    assert_eq!(status, 404, "a remembered miss is answered from memory");

    wait_until("the tag is served once the miss expires", || async {
        let (status, _, _) = get(&pair.down("lib/app/manifests/later")).await;
        if status == 200 {
            assert!(asked.elapsed() >= ttl, "the miss was forgotten before miss_ttl");
        }
        status == 200
    })
    .await;
    pull_over_http(&pair, "lib/app", "later", &image).await;
}

#[tokio::test]
async fn concurrent_pulls_of_one_uncached_blob_share_one_upstream_fetch() {
    let pair = Pair::start("5m");
    let big = push_upstream(&pair.upstream, "lib/big", "v1", pseudo_random(24 << 20, 7), "big").await;
    let also = push_upstream(&pair.upstream, "lib/big", "v2", pseudo_random(24 << 20, 8), "also").await;
    let (digest, bytes) = &big.layer;
    let before = upstream_blob_fetches(&pair).await;

    let url = pair.down(&format!("lib/big/blobs/{digest}"));
    let pulls = (0..16).map(|_| {
        let url = url.clone();
        async move {
            let started = Instant::now();
            let resp = client().get(&url).send().await.expect("GET blob");
            let answered = Instant::now();
            let status = resp.status().as_u16();
            (status, resp.bytes().await.expect("body").to_vec(), started, answered)
        }
    });
    let done = futures_util::future::join_all(pulls).await;
    for (status, body, _, _) in &done {
        assert_eq!(*status, 200);
        assert_eq!(&sha256(body), digest);
        assert_eq!(body.len(), bytes.len());
    }
    // Every pull was waiting at once (the last one started before the first was answered), so
    // each could have fetched the blob itself without the single flight.
    let last_start = done.iter().map(|d| d.2).max().expect("pulls");
    let first_answer = done.iter().map(|d| d.3).min().expect("pulls");
    assert!(last_start < first_answer, "the pulls overlapped");
    assert_eq!(
        upstream_blob_fetches(&pair).await - before,
        1.0,
        "16 pulls, one upstream fetch"
    );

    // A client that gives up does not abort the fetch: it completes and is stored.
    let (digest, bytes) = &also.layer;
    let url = pair.down(&format!("lib/big/blobs/{digest}"));
    let mut resp = client().get(&url).send().await.expect("GET blob");
    assert_eq!(resp.status(), 200);
    assert!(resp.chunk().await.expect("first piece").is_some());
    drop(resp);
    wait_until("the abandoned fetch is stored", || async {
        pair.downstream.blob_object_exists(digest)
    })
    .await;
    let (status, _, body) = get(&url).await;
    assert_eq!((status, body.len()), (200, bytes.len()));
    assert_eq!(&sha256(&body), digest);
    assert_eq!(
        upstream_blob_fetches(&pair).await - before,
        2.0,
        "the abandoned fetch was the only one"
    );
}

/// A GET of a blob through the mirror: status, `Content-Length`, and the body, or why it
/// could not be read to its end.
async fn get_blob_body(url: &str) -> (u16, Option<u64>, Result<Vec<u8>, String>) {
    let resp = client().get(url).send().await.expect("GET blob");
    let status = resp.status().as_u16();
    let length = resp.content_length();
    let body = resp.bytes().await.map(|b| b.to_vec()).map_err(|e| format!("{e:?}"));
    (status, length, body)
}

/// The files in the mirror's tee spool directory.
fn spool_files(server: &TestServer) -> Vec<PathBuf> {
    match std::fs::read_dir(server.data_dir().join("proxy-spool")) {
        Ok(entries) => entries.map(|e| e.expect("spool entry").path()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("reading the spool directory: {e}"),
    }
}

#[tokio::test]
async fn a_corrupt_upstream_blob_streamed_through_the_tee_aborts_the_body_and_is_not_cached() {
    let pair = Pair::start("5m");
    let image = push_upstream(&pair.upstream, "lib/bad", "v1", pseudo_random(3 << 20, 9), "bad").await;
    let (digest, bytes) = &image.layer;
    // Same length, other bytes: only the digest can tell.
    pair.upstream
        .corrupt_blob_object(digest, &pseudo_random(bytes.len(), 10));
    let url = pair.down(&format!("lib/bad/blobs/{digest}"));

    // Two clients at once share the fetch; both see the body cut off, never a clean end.
    let (a, b) = tokio::join!(get_blob_body(&url), get_blob_body(&url));
    for (status, length, body) in [a, b] {
        assert_eq!(status, 200, "the tee answers before the digest is known");
        assert_eq!(length, Some(bytes.len() as u64), "Content-Length is the upstream's");
        let err = body.expect_err("a corrupt blob's body must not end cleanly");
        assert!(!err.is_empty());
    }
    assert_eq!(upstream_blob_fetches(&pair).await, 1.0, "one fetch for both clients");
    assert!(!pair.downstream.blob_object_exists(digest), "nothing cached");
    wait_until("the spool file is removed", || async {
        spool_files(&pair.downstream).is_empty()
    })
    .await;

    // Asked again, it is fetched again (nothing was cached) and refused again.
    let (status, _, body) = get_blob_body(&url).await;
    assert_eq!(status, 200);
    assert!(body.is_err());
    assert!(!pair.downstream.blob_object_exists(digest), "nothing cached");
    // The image's manifest cannot be stored without its layer: the whole fetch is refused.
    let (status, _, body) = get(&pair.down("lib/bad/manifests/v1")).await;
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
    assert_eq!(error_code(&body), "UNAVAILABLE");
    assert!(
        error_message(&body).contains("does not match digest"),
        "{}",
        error_message(&body)
    );
    let (status, _, body) = get(&pair.down(&format!("lib/bad/blobs/{}", image.config.0))).await;
    assert_eq!(status, 200, "the intact config blob was cached");
    assert_eq!(body, image.config.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_pulls_of_an_uncached_256_mib_blob_stream_from_one_fetch_in_bounded_memory() {
    const SIZE: usize = 256 << 20;
    const CLIENTS: usize = 50;
    /// Clients that disconnect after their first piece, while the fetch is under way.
    const QUITTERS: usize = 5;
    let pair = Pair::start("5m");
    let image = push_upstream(&pair.upstream, "lib/huge", "v1", pseudo_random(SIZE, 15), "huge").await;
    let digest = image.layer.0.clone();
    drop(image);
    let before = upstream_blob_fetches(&pair).await;
    let url = pair.down(&format!("lib/huge/blobs/{digest}"));

    let first_piece = std::sync::Arc::new(tokio::sync::Notify::new());
    let started = Instant::now();
    let pulls: Vec<_> = (0..CLIENTS + QUITTERS)
        .map(|i| {
            let (url, first_piece) = (url.clone(), first_piece.clone());
            tokio::spawn(async move {
                use sha2::Digest as _;
                let mut resp = client().get(&url).send().await.expect("GET blob");
                assert_eq!(resp.status(), 200);
                let length = resp.content_length();
                let mut hasher = sha2::Sha256::new();
                let mut received = 0u64;
                while let Some(piece) = resp.chunk().await.expect("the body streams to its end") {
                    if received == 0 {
                        first_piece.notify_one();
                    }
                    received += piece.len() as u64;
                    if i >= CLIENTS {
                        // Disconnects mid-tee.
                        return None;
                    }
                    hasher.update(&piece);
                }
                Some((length, received, format!("sha256:{}", hex::encode(hasher.finalize()))))
            })
        })
        .collect();
    first_piece.notified().await;
    let first_byte_after = started.elapsed();
    assert!(
        !pair.downstream.blob_object_exists(&digest),
        "a client got bytes before the blob was stored: streamed while fetched"
    );
    let mut complete = 0;
    for pull in pulls {
        if let Some((length, received, got)) = pull.await.expect("client task") {
            assert_eq!(length, Some(SIZE as u64), "Content-Length is the blob's size");
            assert_eq!(received, SIZE as u64);
            assert_eq!(got, digest, "the bytes hash to the digest");
            complete += 1;
        }
    }
    let all_done_after = started.elapsed();
    assert_eq!(complete, CLIENTS);
    assert_eq!(
        upstream_blob_fetches(&pair).await - before,
        1.0,
        "{} pulls, one upstream fetch",
        CLIENTS + QUITTERS
    );
    assert!(pair.downstream.blob_object_exists(&digest), "the blob is stored");
    let status = std::fs::read_to_string(format!("/proc/{}/status", pair.downstream.pid())).expect("proc status");
    let hwm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    println!(
        "tee: {CLIENTS} clients (+{QUITTERS} quitting) of one uncached {} MiB blob: first byte after {:?}, \
         all complete after {:?}, mirror peak RSS {} MiB",
        SIZE >> 20,
        first_byte_after,
        all_done_after,
        hwm_kib / 1024
    );
    assert!(hwm_kib < 400 * 1024, "the mirror's peak RSS is {} MiB", hwm_kib / 1024);
    wait_until("the spool file is removed", || async {
        spool_files(&pair.downstream).is_empty()
    })
    .await;
}

#[tokio::test]
async fn head_and_range_of_an_uncached_blob() {
    let pair = Pair::start("5m");
    let image = push_upstream(&pair.upstream, "lib/app", "v1", pseudo_random(2 << 20, 16), "ranged").await;
    let (digest, bytes) = &image.layer;
    let url = pair.down(&format!("lib/app/blobs/{digest}"));

    // HEAD asks the upstream's HEAD: the size, nothing fetched.
    let resp = client().head(&url).send().await.expect("HEAD");
    assert_eq!(resp.status(), 200);
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(header("content-length"), Some(bytes.len().to_string()));
    assert_eq!(header("docker-content-digest").as_deref(), Some(digest.as_str()));
    assert_eq!(upstream_blob_fetches(&pair).await, 0.0, "HEAD fetched nothing");
    assert!(!pair.downstream.blob_object_exists(digest));
    let missing = pair.down(&format!("lib/app/blobs/{}", sha256(b"not upstream")));
    let resp = client().head(&missing).send().await.expect("HEAD");
    assert_eq!(resp.status(), 404);

    // A range of an uncached blob is served from the tee of the fetch it starts.
    let resp = client()
        .get(&url)
        .header("Range", "bytes=1000-1999")
        .send()
        .await
        .expect("ranged GET");
    assert_eq!(resp.status(), 206);
    assert_eq!(
        resp.headers().get("content-range").and_then(|v| v.to_str().ok()),
        Some(format!("bytes 1000-1999/{}", bytes.len()).as_str())
    );
    assert_eq!(resp.bytes().await.expect("body").as_ref(), &bytes[1000..2000]);
    // Served once the fetch was verified; it stored the whole blob.
    assert!(pair.downstream.blob_object_exists(digest));
    assert_eq!(upstream_blob_fetches(&pair).await, 1.0);
    let resp = client()
        .get(&url)
        .header("Range", "bytes=-10")
        .send()
        .await
        .expect("ranged GET");
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.bytes().await.expect("body").as_ref(), &bytes[bytes.len() - 10..]);
    assert_eq!(upstream_blob_fetches(&pair).await, 1.0, "served from the cache");
}

#[tokio::test]
async fn spool_files_left_by_a_crash_are_swept_at_start() {
    let mut pair = Pair::start("5m");
    let spool = pair.downstream.data_dir().join("proxy-spool");
    std::fs::create_dir_all(&spool).expect("spool dir");
    std::fs::write(spool.join("left-over"), b"partial blob").expect("plant a spool file");
    // A directory (not something the tee makes, but start-up must not fail on it).
    std::fs::create_dir_all(spool.join("a-dir/nested")).expect("plant a directory");
    std::fs::write(spool.join("a-dir/nested/file"), b"x").expect("plant a nested file");
    pair.downstream.crash_and_restart();
    assert!(spool_files(&pair.downstream).is_empty(), "swept before serving");
    let image = push_upstream(&pair.upstream, "lib/app", "v1", pseudo_random(5000, 17), "swept").await;
    pull_over_http(&pair, "lib/app", "v1", &image).await;
}

#[tokio::test]
async fn pushes_and_deletes_into_a_proxied_prefix_are_refused() {
    let pair = Pair::start("5m");
    let image = push_upstream(&pair.upstream, "lib/app", "v1", pseudo_random(1000, 11), "app").await;
    pull_over_http(&pair, "lib/app", "v1", &image).await;
    let c = client();
    let data = b"local bytes";
    let digest = sha256(data);
    let refusals = [
        c.post(pair.down("lib/app/blobs/uploads/")),
        c.post(pair.down(&format!("lib/app/blobs/uploads/?digest={digest}")))
            .body(data.to_vec()),
        c.post(pair.down(&format!("lib/app/blobs/uploads/?mount={}", image.layer.0))),
        c.put(pair.down("lib/app/manifests/v2"))
            .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            .body(get(&pair.down("lib/app/manifests/v1")).await.2),
        c.delete(pair.down("lib/app/manifests/v1")),
        c.delete(pair.down(&format!("lib/app/blobs/{}", image.layer.0))),
    ];
    for request in refusals {
        let resp = request.send().await.expect("request");
        let status = resp.status().as_u16();
        let body = resp.bytes().await.expect("body");
        assert_eq!((status, error_code(&body)), (405, "UNSUPPORTED".to_owned()));
        assert!(
            error_message(&body).contains("pull-through cache"),
            "{}",
            error_message(&body)
        );
    }
    pull_over_http(&pair, "lib/app", "v1", &image).await;
    // Outside the prefix the mirror is an ordinary registry.
    common::push_image(&pair.downstream, "local/app", "v1", data).await;
}

#[tokio::test]
async fn read_only_maintenance_serves_only_cached_content() {
    let pair = Pair::start("1s");
    let image = push_upstream(&pair.upstream, "lib/app", "v1", pseudo_random(3000, 12), "app").await;
    push_upstream(&pair.upstream, "lib/app", "v2", pseudo_random(3000, 13), "app2").await;
    pull_over_http(&pair, "lib/app", "v1", &image).await;
    let fetched = upstream_blob_fetches(&pair).await;

    let status = Command::new("kill")
        .args(["-USR1", &pair.downstream.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    wait_until("the mirror is read-only", || async {
        let resp = client()
            .post(pair.downstream.v2("local/app/blobs/uploads/"))
            .send()
            .await
            .expect("POST");
        resp.status() == 503
    })
    .await;
    // Past the TTL the cached tag is still served (not re-validated); nothing new is fetched.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    pull_over_http(&pair, "lib/app", "v1", &image).await;
    let (status, _, body) = get(&pair.down("lib/app/manifests/v2")).await;
    assert_eq!((status, error_code(&body)), (503, "UNAVAILABLE".to_owned()));
    assert_eq!(upstream_blob_fetches(&pair).await, fetched);
}

#[tokio::test]
async fn pulls_through_an_https_upstream_trusted_through_ca_file() {
    let pair = Pair::start_with("5m", true);
    let image = push_upstream(&pair.upstream, "lib/app", "v1", pseudo_random(4000, 14), "tls").await;
    pull_over_http(&pair, "lib/app", "v1", &image).await;
    assert_eq!(upstream_blob_fetches(&pair).await, 2.0);

    // Without the CA the upstream's certificate is not trusted: a clear 502, nothing cached.
    let config = pair._dir.path().join("no-ca.toml");
    std::fs::write(
        &config,
        format!(
            "[[proxy]]\nprefix = \"hub/\"\nurl = \"{}\"\ntimeout_secs = 5\n",
            pair.upstream.url
        ),
    )
    .expect("write config");
    let untrusting = TestServer::start_with(&[("STOWAGE_CONFIG", config.to_str().expect("utf-8"))]);
    let (status, _, body) = get(&untrusting.v2("hub/lib/app/manifests/v1")).await;
    assert_eq!((status, error_code(&body)), (502, "UNAVAILABLE".to_owned()));
    assert!(
        error_message(&body).contains("could not be reached"),
        "{}",
        error_message(&body)
    );
}

/// A tar archive holding one regular file (ustar), a layer any engine can unpack.
fn tar_with_file(name: &str, data: &[u8]) -> Vec<u8> {
    let mut header = [0u8; 512];
    header[..name.len()].copy_from_slice(name.as_bytes());
    header[100..108].copy_from_slice(b"0000644\0");
    header[108..116].copy_from_slice(b"0000000\0");
    header[116..124].copy_from_slice(b"0000000\0");
    header[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
    header[136..148].copy_from_slice(b"00000000000\0");
    header[148..156].copy_from_slice(b"        ");
    header[156] = b'0';
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut out = header.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512 + 1024, 0);
    out
}

/// An image a container engine can unpack: an uncompressed tar layer named in the config's
/// `diff_ids`, as an OCI manifest, built here.
fn unpackable_image(seed: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let layer = tar_with_file("hello.txt", format!("hello from {seed}\n").as_bytes());
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha256(&layer)]},
        "config": {"Labels": {"seed": seed}},
    }))
    .expect("config");
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha256(&layer), "size": layer.len()}],
    }))
    .expect("manifest");
    (config, layer, manifest)
}

/// Pushes an [`unpackable_image`] to a Stowage upstream as alice.
async fn push_unpackable(server: &TestServer, repo: &str, tag: &str, seed: &str) -> Image {
    let (config, layer, manifest) = unpackable_image(seed);
    push_blob_as_alice(server, repo, &config).await;
    push_blob_as_alice(server, repo, &layer).await;
    let resp = client()
        .put(server.v2(&format!("{repo}/manifests/{tag}")))
        .basic_auth("alice", Some("alice-pw"))
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .await
        .expect("PUT manifest");
    assert_eq!(resp.status(), 201, "manifest PUT {repo}:{tag}");
    Image {
        manifest: sha256(&manifest),
        config: (sha256(&config), config),
        layer: (sha256(&layer), layer),
    }
}

/// Runs a command to its end (at most 120 s), failing the test if it fails.
fn run_ok(cmd: &mut Command) -> String {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().expect("poll").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A containerd of this test alone: root, state and sockets in a temp dir; killed on drop.
struct Containerd {
    child: std::process::Child,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl Containerd {
    fn start() -> Containerd {
        let dir = tempfile::Builder::new()
            .prefix("stowage-ctd-")
            .tempdir()
            .expect("temp dir");
        let socket = dir.path().join("c.sock");
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.internal.v1.opt\"]\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{ttrpc}\"\n\
             [debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n",
            root = dir.path().join("root").display(),
            state = dir.path().join("state").display(),
            sock = socket.display(),
            ttrpc = dir.path().join("t.sock").display(),
        );
        std::fs::write(dir.path().join("config.toml"), config).expect("write config.toml");
        let log = std::fs::File::create(dir.path().join("containerd.log")).expect("log");
        let child = Command::new(require_tool("containerd"))
            .arg("--config")
            .arg(dir.path().join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn containerd");
        let mut ctd = Containerd { child, socket, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = ctd.child.try_wait().expect("poll containerd") {
                panic!("containerd exited ({status}):\n{}", ctd.log());
            }
            let answers = ctd.socket.exists()
                && ctd
                    .ctr(&["version"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
            if answers {
                return ctd;
            }
            assert!(Instant::now() < deadline, "containerd did not start:\n{}", ctd.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    fn ctr(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(require_tool("ctr"));
        cmd.arg("--address").arg(&self.socket).args(["-n", "test"]).args(args);
        cmd
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_through_the_ns_mirror_form_of_hosts_toml() {
    let pair = Pair::start_full("5m", false, "namespaces = [\"docker.io\"]\n");
    let image = push_unpackable(&pair.upstream, "library/tiny", "v1", "ctr").await;

    // containerd, told by hosts.toml that the mirror serves docker.io (plain HTTP, no
    // override_path); the default server is a closed port, so nothing else can answer.
    let hosts = tempfile::tempdir().expect("hosts dir");
    std::fs::create_dir_all(hosts.path().join("docker.io")).expect("mkdir");
    std::fs::write(
        hosts.path().join("docker.io/hosts.toml"),
        format!(
            "server = \"http://127.0.0.1:9\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            pair.downstream.host
        ),
    )
    .expect("hosts.toml");
    let hosts_dir = hosts.path().to_str().expect("utf-8").to_owned();
    let listed = tokio::task::spawn_blocking(move || {
        let ctd = Containerd::start();
        run_ok(&mut ctd.ctr(&["images", "pull", "--hosts-dir", &hosts_dir, "docker.io/library/tiny:v1"]));
        run_ok(&mut ctd.ctr(&["images", "ls"]))
    })
    .await
    .expect("ctr");
    let line = listed
        .lines()
        .find(|l| l.starts_with("docker.io/library/tiny:v1"))
        .unwrap_or_else(|| panic!("not pulled:\n{listed}"));
    assert!(
        line.contains(&image.manifest),
        "containerd got another manifest: {line}"
    );
    assert_eq!(upstream_blob_fetches(&pair).await, 2.0, "fetched through the mirror");
    for (d, _) in [&image.config, &image.layer] {
        assert!(pair.downstream.blob_object_exists(d), "{d} is cached under the mirror");
    }

    // The same over plain HTTP, for a tag not cached yet.
    let other = push_unpackable(&pair.upstream, "library/tiny", "v2", "http").await;
    let base = format!("{}/v2/library/tiny", pair.downstream.url);
    let (status, digest, _) = get(&format!("{base}/manifests/v2?ns=docker.io")).await;
    assert_eq!((status, digest.as_deref()), (200, Some(other.manifest.as_str())));
    let (status, _, body) = get(&format!("{base}/blobs/{}?ns=DOCKER.IO", other.layer.0)).await;
    assert_eq!((status, &body), (200, &other.layer.1));
    let resp = client()
        .head(format!("{base}/blobs/{}?ns=docker.io", other.config.0))
        .send()
        .await
        .expect("HEAD");
    assert_eq!(resp.status(), 200);
    // Without `ns`, or with one no entry names, the name is a hosted repository's.
    for url in [
        format!("{base}/manifests/v2"),
        format!("{base}/manifests/v2?ns=quay.io"),
    ] {
        let (status, _, body) = get(&url).await;
        assert_eq!(
            (status, error_code(&body)),
            (404, "MANIFEST_UNKNOWN".to_owned()),
            "{url}"
        );
    }
    // The cached copy is the proxied repository's.
    let (status, digest, _) = get(&pair.down("library/tiny/manifests/v2")).await;
    assert_eq!((status, digest.as_deref()), (200, Some(other.manifest.as_str())));
}

/// Debian's `docker-registry` (CNCF Distribution 2.8) with htpasswd authentication, on
/// 127.0.0.1; killed on drop.
struct Distribution {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Distribution {
    fn start(users: &[(&str, &str)]) -> Distribution {
        let dir = tempfile::tempdir().expect("temp dir");
        // A bcrypt line per user, from libxcrypt through Python's `crypt` (cost 4: Distribution
        // checks it on every request).
        let mut htpasswd = String::new();
        for (user, password) in users {
            let out = Command::new(require_tool("python3"))
                .args([
                    "-W",
                    "ignore",
                    "-c",
                    "import crypt, sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)))",
                    password,
                ])
                .output()
                .expect("run python3");
            let hash = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            assert!(
                out.status.success() && hash.starts_with("$2"),
                "python3 could not make a bcrypt hash: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            htpasswd.push_str(&format!("{user}:{hash}\n"));
        }
        std::fs::write(dir.path().join("htpasswd"), htpasswd).expect("htpasswd");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        std::fs::write(
            dir.path().join("config.yml"),
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n  secret: test-secret\n\
                 auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                dir.path().join("data").display(),
                dir.path().join("htpasswd").display()
            ),
        )
        .expect("config.yml");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log");
        let child = Command::new(require_tool("docker-registry"))
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("spawn docker-registry");
        Distribution {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    async fn wait_ready(&mut self) {
        let url = format!("{}/v2/", self.url);
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("poll") {
                panic!("docker-registry exited ({status})");
            }
            if client().get(&url).send().await.is_ok_and(|r| r.status() == 401) {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "docker-registry did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Pushes a blob as `user` (POST, then PUT with the digest).
    async fn push_blob(&self, repo: &str, data: &[u8], user: (&str, &str)) -> String {
        let digest = sha256(data);
        let resp = client()
            .post(format!("{}/v2/{repo}/blobs/uploads/", self.url))
            .basic_auth(user.0, Some(user.1))
            .send()
            .await
            .expect("POST");
        assert_eq!(resp.status(), 202);
        let location = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .expect("Location")
            .to_owned();
        let location = if location.starts_with('/') {
            format!("{}{location}", self.url)
        } else {
            location
        };
        let separator = if location.contains('?') { '&' } else { '?' };
        let resp = client()
            .put(format!("{location}{separator}digest={digest}"))
            .basic_auth(user.0, Some(user.1))
            .header("Content-Type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .expect("PUT");
        assert_eq!(resp.status(), 201, "blob PUT to docker-registry");
        digest
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_through_a_distribution_upstream_with_htpasswd_by_tag_and_digest_with_skopeo() {
    let alice = ("alice", "alice-pw");
    let mut upstream = Distribution::start(&[alice, ("mirror", "mirror-pw")]);
    upstream.wait_ready().await;
    let (config, layer, manifest) = unpackable_image("distribution");
    upstream.push_blob("lib/app", &config, alice).await;
    let layer_digest = upstream.push_blob("lib/app", &layer, alice).await;
    let resp = client()
        .put(format!("{}/v2/lib/app/manifests/v1", upstream.url))
        .basic_auth(alice.0, Some(alice.1))
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .await
        .expect("PUT manifest");
    assert_eq!(resp.status(), 201, "manifest PUT to docker-registry");
    let manifest_digest = sha256(&manifest);

    let dir = tempfile::tempdir().expect("temp dir");
    let password_file = dir.path().join("mirror.password");
    std::fs::write(&password_file, "mirror-pw\n").expect("password file");
    let config_file = dir.path().join("mirror.toml");
    std::fs::write(
        &config_file,
        format!(
            "[[proxy]]\nprefix = \"dist/\"\nurl = \"{}\"\nusername = \"mirror\"\npassword_file = \"{}\"\ntimeout_secs = 5\n",
            upstream.url,
            password_file.display()
        ),
    )
    .expect("mirror config");
    let mirror = TestServer::start_with(&[("STOWAGE_CONFIG", config_file.to_str().expect("utf-8"))]);

    let skopeo = require_skopeo();
    let host = mirror.host.clone();
    let scratch = tempfile::tempdir().expect("scratch");
    for (name, source) in [
        ("by-tag", format!("docker://{host}/dist/lib/app:v1")),
        ("by-digest", format!("docker://{host}/dist/lib/app@{manifest_digest}")),
    ] {
        let layout = skopeo_pull(&skopeo, scratch.path(), &source, name);
        assert_eq!(layout_blob(&layout, &manifest_digest), manifest, "{name}: manifest");
        assert_eq!(layout_blob(&layout, &layer_digest), layer, "{name}: layer bytes");
    }
    for d in [&layer_digest, &sha256(&config)] {
        assert!(mirror.blob_object_exists(d), "{d} is stored at the mirror");
    }

    // The upstream gone, everything is served from the cache.
    drop(upstream);
    let layout = skopeo_pull(
        &skopeo,
        scratch.path(),
        &format!("docker://{host}/dist/lib/app@{manifest_digest}"),
        "cached",
    );
    assert_eq!(layout_blob(&layout, &layer_digest), layer);
}

/// The store is what matters: a tee whose spool cannot be made still stores the blob, and the
/// client is served from the store.
#[tokio::test]
async fn a_spool_that_cannot_be_made_still_stores_and_serves_the_blob() {
    let pair = Pair::start("5m");
    let image = push_upstream(&pair.upstream, "lib/app", "v1", pseudo_random(200_000, 18), "nospool").await;
    let (digest, bytes) = &image.layer;
    // The spool directory's place taken by a file: no spool file can be made.
    let spool = pair.downstream.data_dir().join("proxy-spool");
    let _ = std::fs::remove_dir_all(&spool);
    std::fs::write(&spool, b"in the way").expect("plant a file");
    let url = pair.down(&format!("lib/app/blobs/{digest}"));
    let (status, _, body) = get(&url).await;
    assert_eq!(status, 200);
    assert_eq!(&body, bytes);
    assert!(pair.downstream.blob_object_exists(digest), "stored");
    assert!(!pair.downstream.has_staged_uploads(), "nothing staged is left behind");
    assert_eq!(upstream_blob_fetches(&pair).await, 1.0);
    std::fs::remove_file(&spool).expect("remove the file");
}

/// Sends a blob GET over a raw connection and reads nothing back: the server's writes fill the
/// socket buffers and stall, as with a client at TCP zero window.
async fn stalled_blob_get(server: &TestServer, path: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let authority = server.url.strip_prefix("http://").expect("plain HTTP mirror");
    let mut stream = tokio::net::TcpStream::connect(authority).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send the GET");
    stream
}

/// Reads a whole HTTP/1.1 response from a raw connection: status and body (up to the end of
/// the connection; the request asked `Connection: close`).
async fn read_raw_response(mut stream: tokio::net::TcpStream) -> (u16, Option<usize>, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut all = Vec::new();
    // A cut connection is an error or an early end: what was read is then checked as short.
    let _ = stream.read_to_end(&mut all).await;
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").expect("response headers");
    let head = String::from_utf8_lossy(&all[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_owned())
        })
        .and_then(|v| v.parse().ok());
    (status, length, all[split + 4..].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_hold_neither_upstream_permits_nor_spools() {
    const PERMITS: usize = 2;
    let pair = Pair::start_full("1s", false, &format!("max_concurrent_requests = {PERMITS}\n"));
    // A cached tag, to be re-validated while the stalled clients wait.
    let first = push_upstream(&pair.upstream, "lib/tagged", "v1", pseudo_random(5000, 40), "first").await;
    pull_over_http(&pair, "lib/tagged", "v1", &first).await;
    // Bigger than what the loopback socket buffers hold, so a client that does not read stalls
    // the server's writes mid-blob.
    let mut stalled = Vec::new();
    let mut layers = Vec::new();
    for i in 0..PERMITS {
        let image = push_upstream(
            &pair.upstream,
            "lib/stall",
            &format!("v{i}"),
            pseudo_random(32 << 20, 41 + i as u64),
            &format!("stall{i}"),
        )
        .await;
        let (digest, _) = &image.layer;
        stalled.push(stalled_blob_get(&pair.downstream, &format!("/v2/hub/lib/stall/blobs/{digest}")).await);
        layers.push(image.layer);
    }
    // Every fetch completes and is stored whatever its client does.
    for (digest, _) in &layers {
        wait_until("the stalled clients' blobs are stored", || async {
            pair.downstream.blob_object_exists(digest)
        })
        .await;
    }

    // The upstream's permits are free: another uncached blob is fetched ...
    let other = push_upstream(&pair.upstream, "lib/other", "v1", pseudo_random(1 << 20, 50), "other").await;
    let (digest, bytes) = &other.layer;
    let (status, _, body) = tokio::time::timeout(
        Duration::from_secs(30),
        get(&pair.down(&format!("lib/other/blobs/{digest}"))),
    )
    .await
    .expect("an uncached blob is fetched while clients are stalled");
    assert_eq!(status, 200);
    assert_eq!(&body, bytes);
    // ... and a tag moved upstream is re-validated and seen.
    let moved = push_upstream(&pair.upstream, "lib/tagged", "v1", pseudo_random(5000, 51), "moved").await;
    let url = pair.down("lib/tagged/manifests/v1");
    wait_until("the moved tag is re-validated while clients are stalled", || async {
        match tokio::time::timeout(Duration::from_secs(5), get(&url)).await {
            Ok((200, digest, _)) => digest.as_deref() == Some(moved.manifest.as_str()),
            _ => false,
        }
    })
    .await;

    // The spools went with their fetches.
    wait_until("the spools are removed while their clients are stalled", || async {
        spool_files(&pair.downstream).is_empty()
    })
    .await;

    // The stalled clients still get their whole blobs, now from the store.
    for (stream, (digest, bytes)) in stalled.into_iter().zip(&layers) {
        let (status, length, body) = tokio::time::timeout(Duration::from_secs(60), read_raw_response(stream))
            .await
            .expect("the stalled client reads to the end");
        assert_eq!((status, length), (200, Some(bytes.len())));
        assert_eq!(body.len(), bytes.len(), "the whole blob");
        assert_eq!(&sha256(&body), digest);
    }
    assert!(spool_files(&pair.downstream).is_empty());
}

/// A request without a `Host` header (HTTP/2's form; this build of actix speaks HTTP/1 only, so
/// an HTTP/1.0 request in absolute form stands for it) names its host only in the URI's
/// authority: the `?ns=` rewrite must keep it, or the token realm falls back to a default host.
#[tokio::test]
async fn the_ns_mirror_form_keeps_the_uri_authority_for_the_token_realm() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("stowage.toml");
    // The upstream is never reached: the request is refused before (no credentials).
    std::fs::write(
        &config,
        "[[proxy]]\nprefix = \"dockerhub/\"\nurl = \"http://127.0.0.1:9\"\nnamespaces = [\"docker.io\"]\n",
    )
    .expect("write config");
    let server = TestServer::start_with(&[
        ("STOWAGE_CONFIG", config.to_str().expect("utf-8")),
        ("STOWAGE_AUTH__ENABLED", "true"),
    ]);
    let authority = server.url.strip_prefix("http://").expect("plain HTTP");
    let mut stream = tokio::net::TcpStream::connect(authority).await.expect("connect");
    let request = "GET http://mirror.example:5443/v2/library/alpine/manifests/3.20?ns=docker.io HTTP/1.0\r\n\r\n";
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read the response");
    let response = String::from_utf8_lossy(&response).into_owned();
    assert!(
        response.starts_with("HTTP/1.0 401") || response.starts_with("HTTP/1.1 401"),
        "{response}"
    );
    let challenge = response
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("www-authenticate: bearer"))
        .unwrap_or_else(|| panic!("a Bearer challenge: {response}"));
    assert!(
        challenge.contains("realm=\"http://mirror.example:5443/token\""),
        "the realm names the host the client asked: {challenge}"
    );
    assert!(
        challenge.contains("repository:dockerhub/library/alpine:pull"),
        "the scope names the rewritten repository: {challenge}"
    );
}

/// Seconds since the epoch.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Upstream GETs answered 200 by handler (`manifest` or `blob`): what the mirror fetched.
async fn upstream_gets(upstream: &TestServer, handler: &str) -> f64 {
    metric(
        upstream,
        "registry_http_requests_total",
        &["method=\"get\"", "code=\"200\"", &format!("handler=\"{handler}\"")],
    )
    .await
}

/// Runs `stowage gc [--dry-run]` on the (stopped) mirror's data; returns its stdout lines.
fn offline_gc(server: &TestServer, dry_run: bool) -> Vec<String> {
    let mut args = vec!["gc"];
    if dry_run {
        args.push("--dry-run");
    }
    let out = output_within(&mut server.stowage_command(&args));
    assert!(
        out.status.success(),
        "stowage {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `[[proxy]] max_size`: with a cap a bit above two images, three images pulled through and
/// the first pulled again, a collection pass evicts the least recently pulled one (the
/// second): the dry run lists it (`evict` line with its bytes) and removes nothing, the real
/// pass removes it, with its tag, and a later pass deletes its blobs; the other two are served
/// from the cache with the upstream stopped while the evicted one is not; with the upstream
/// back, the evicted image is fetched again (one upstream manifest fetch). A hosted
/// repository larger than the cap is never touched.
#[tokio::test]
async fn a_size_cap_evicts_the_least_recently_pulled_image_and_refetches_it_on_demand() {
    const LAYER: usize = 100_000;
    // Each image is its layer, a config of about 150 bytes and a manifest of about 450.
    let cap = 2 * LAYER + LAYER / 2;
    // `max_size` needs the server's collector on; a day between its passes leaves the passes
    // to this test's `stowage gc` runs, with the server stopped.
    let extra = format!("max_size = {cap}\n\n[gc]\ninterval_secs = 86400\ngrace_secs = 0\n");
    // The passes are `stowage gc` runs (and a dry run), which work on a SQLite catalog only
    // (with PostgreSQL the replicas collect: docs/postgres.md).
    let mut pair = Pair::start_full_on(common::Catalog::Sqlite, "1h", false, &extra);
    let mut images = Vec::new();
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        let layer = pseudo_random(LAYER, 100 + i as u64);
        images.push(push_upstream(&pair.upstream, &format!("lib/{name}"), "v1", layer, name).await);
    }
    // A hosted repository on the mirror, larger than the cap on its own.
    let (hosted, _) = common::push_image(&pair.downstream, "local/app", "v1", &pseudo_random(3 * LAYER, 7)).await;

    for (name, image) in ["a", "b", "c"].iter().zip(&images) {
        pull_over_http(&pair, &format!("lib/{name}"), "v1", image).await;
    }
    // Pull times are recorded to the second: A's second pull is strictly later than C's.
    let c_pulled = unix_now();
    wait_until("the clock passed the second C was pulled in", || async move {
        unix_now() > c_pulled
    })
    .await;
    pull_over_http(&pair, "lib/a", "v1", &images[0]).await;
    assert_eq!(
        upstream_gets(&pair.upstream, "manifest").await,
        3.0,
        "each image fetched once"
    );

    // A graceful stop writes the recorded pulls; `stowage gc` needs the server stopped.
    assert!(pair.downstream.terminate().success());
    let b = &images[1];
    let b_bytes = {
        let manifest = client()
            .get(pair.upstream.v2(&format!("lib/b/manifests/{}", b.manifest)))
            .basic_auth("alice", Some("alice-pw"))
            .header("Accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await
            .expect("GET manifest upstream")
            .bytes()
            .await
            .expect("manifest body");
        assert_eq!(sha256(&manifest), b.manifest);
        (manifest.len() + b.config.1.len() + b.layer.1.len()) as u64
    };
    let evict_b = format!("evict\thub/lib/b\t{}\t{b_bytes}", b.manifest);
    let dry = offline_gc(&pair.downstream, true);
    let evictions: Vec<&String> = dry.iter().filter(|l| l.starts_with("evict\t")).collect();
    assert_eq!(evictions, [&evict_b], "the dry run lists B's eviction only: {dry:?}");
    let real = offline_gc(&pair.downstream, false);
    let evictions: Vec<&String> = real.iter().filter(|l| l.starts_with("evict\t")).collect();
    assert_eq!(
        evictions,
        [&evict_b],
        "the pass evicts what the dry run listed: {real:?}"
    );
    // The evicted blobs wait out the grace period (0 s here: the next second) and then go.
    let evicted_at = unix_now();
    wait_until("a second passed since the eviction", || async move {
        unix_now() > evicted_at
    })
    .await;
    let later = offline_gc(&pair.downstream, false);
    for (digest, bytes) in [&b.layer, &b.config] {
        let line = format!("blob\t{digest}\t{}", bytes.len());
        assert!(
            real.contains(&line) || later.contains(&line),
            "B's blob {digest} deleted by a pass: {real:?} {later:?}"
        );
        assert!(
            !pair.downstream.blob_object_exists(digest),
            "B's blob {digest} left storage"
        );
    }
    for image in [&images[0], &images[2]] {
        assert!(
            pair.downstream.blob_object_exists(&image.layer.0),
            "A's and C's layers stay"
        );
    }

    // Upstream stopped: A and C (by tag and digest) and the hosted image are served here; B
    // is not cached any more, so the mirror must ask the dead upstream.
    pair.downstream.crash_and_restart();
    pair.upstream.kill();
    for (name, image) in [("a", &images[0]), ("c", &images[2])] {
        pull_over_http(&pair, &format!("lib/{name}"), "v1", image).await;
        pull_over_http(&pair, &format!("lib/{name}"), &image.manifest, image).await;
    }
    for reference in ["v1", b.manifest.as_str()] {
        let (status, _, body) = get(&pair.down(&format!("lib/b/manifests/{reference}"))).await;
        assert_eq!(
            status,
            502,
            "B:{reference} is not served from the cache: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let (status, digest, _) = get(&pair.downstream.v2("local/app/manifests/v1")).await;
    assert_eq!(
        (status, digest.as_deref()),
        (200, Some(hosted.as_str())),
        "the hosted image stays"
    );

    // Upstream back (a new process on the same data, so its counters start at 0): B is
    // fetched again, once, and then served from the cache.
    pair.upstream.crash_and_restart();
    pair.point_mirror_at_upstream();
    pull_over_http(&pair, "lib/b", "v1", b).await;
    pull_over_http(&pair, "lib/b", &b.manifest, b).await;
    assert_eq!(
        upstream_gets(&pair.upstream, "manifest").await,
        1.0,
        "B's manifest fetched once"
    );
    assert_eq!(
        upstream_gets(&pair.upstream, "blob").await,
        2.0,
        "B's config and layer fetched once each"
    );

    // The eviction is in the audit trail, by `gc`, with the tag it removed.
    let out = output_within(&mut pair.downstream.stowage_command(&["audit", "--user", "gc", "--json"]));
    assert!(out.status.success());
    let rows: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .filter(|r: &Value| r["action"] == "proxy.evict")
        .collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["repository"], "hub/lib/b", "{rows:?}");
    assert_eq!(rows[0]["digest"], b.manifest.as_str(), "{rows:?}");
}

/// The server's own collection passes evict too: with passes every second and a cap a bit
/// above two images, three images pulled through one after another (each in its own second,
/// the recording's precision) leave the first evicted, counted in
/// `stowage_proxy_evictions_total`, and `stowage_proxy_cached_bytes{prefix="hub/"}` at the two
/// others' bytes.
#[tokio::test]
async fn the_servers_collection_passes_evict_and_report_the_cached_bytes() {
    const LAYER: usize = 100_000;
    let cap = 2 * LAYER + LAYER / 2;
    let extra = format!("max_size = {cap}\n\n[gc]\ninterval_secs = 1\ngrace_secs = 0\n");
    let pair = Pair::start_full("1h", false, &extra);
    let mut images = Vec::new();
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        let layer = pseudo_random(LAYER, 200 + i as u64);
        images.push(push_upstream(&pair.upstream, &format!("lib/{name}"), "v1", layer, name).await);
    }
    for (name, image) in ["a", "b", "c"].iter().zip(&images) {
        let pulled = unix_now();
        pull_over_http(&pair, &format!("lib/{name}"), "v1", image).await;
        wait_until("the next second", || async move { unix_now() > pulled }).await;
    }
    let image_bytes = |image: &Image| (image.config.1.len() + image.layer.1.len()) as f64;
    wait_until("a pass evicted one image", || async {
        metric(&pair.downstream, "stowage_proxy_evictions_total", &[]).await >= 1.0
            && metric(&pair.downstream, "stowage_proxy_cached_bytes", &["prefix=\"hub/\""]).await <= cap as f64
    })
    .await;
    assert_eq!(
        metric(&pair.downstream, "stowage_proxy_evictions_total", &[]).await,
        1.0
    );
    let cached = metric(&pair.downstream, "stowage_proxy_cached_bytes", &["prefix=\"hub/\""]).await;
    let (b, c) = (image_bytes(&images[1]), image_bytes(&images[2]));
    // The two images' blobs plus their two manifests (a few hundred bytes each).
    assert!(
        cached > b + c && cached < b + c + 2000.0,
        "cached {cached}, images {b} + {c}"
    );
    let rows: Value = client()
        .get(format!("{}/stowage/v1/audit?user=gc", pair.downstream.url))
        .send()
        .await
        .expect("GET audit")
        .json()
        .await
        .expect("audit JSON");
    let evicted: Vec<&str> = rows["entries"]
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r["action"] == "proxy.evict")
        .filter_map(|r| r["repository"].as_str())
        .collect();
    assert_eq!(evicted, ["hub/lib/a"], "{rows}");

    // Within its tag's `tag_ttl` (validated at the first pull), the evicted tag is not answered
    // 404 from that mark: it is fetched again.
    let fetched = upstream_gets(&pair.upstream, "manifest").await;
    pull_over_http(&pair, "lib/a", "v1", &images[0]).await;
    assert_eq!(upstream_gets(&pair.upstream, "manifest").await, fetched + 1.0);
}

// ---------------------------------------------------------------------------------------------
// podman as a pull-through client
// ---------------------------------------------------------------------------------------------

/// A podman of its own (`common::tools::ContainersWorld`) with the given `registries.conf`.
/// Each pull uses a fresh one, so that podman finds nothing locally and asks for every blob.
struct Podman {
    world: ContainersWorld,
}

impl Podman {
    /// `registries` is the whole `registries.conf`.
    fn new(registries: &str) -> Podman {
        Podman {
            world: ContainersWorld::new(Some(registries)),
        }
    }

    /// `podman args…` in this podman's world; returns its output, whatever its status.
    fn run(&self, args: &[&str]) -> std::process::Output {
        output_within(self.world.command("podman").args(args))
    }

    /// `podman pull` of `image` (insecure registries come from `registries.conf`), then the
    /// digest podman recorded for it and the bytes of `/hello.txt` in its root filesystem.
    fn pull(&self, image: &str) -> (String, String) {
        let out = self.run(&["pull", "--quiet", image]);
        assert!(
            out.status.success(),
            "podman pull {image}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = self.run(&["image", "inspect", "--format", "{{.Digest}}", image]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let digest = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        // The unpacked layer, read through podman's own mount of the image.
        let out = self.run(&["image", "mount", image]);
        assert!(
            out.status.success(),
            "podman image mount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mountpoint = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let hello = std::fs::read_to_string(Path::new(&mountpoint).join("hello.txt")).expect("hello.txt in the image");
        (digest, hello)
    }

    /// `podman pull` that must fail; returns its standard error.
    fn pull_fails(&self, image: &str) -> String {
        let out = self.run(&["pull", "--quiet", image]);
        assert!(!out.status.success(), "podman pull {image} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

/// `registries.conf` with the mirror as an insecure (plain HTTP) registry.
fn insecure_registries_conf(host: &str) -> String {
    format!("[[registry]]\nlocation = \"{host}\"\ninsecure = true\n")
}

/// podman pulls through the `hub/` prefix by tag and by digest (each into fresh storage, so
/// every blob is asked for): it gets the upstream's manifest and the layer's file; the mirror
/// fetched each blob once and stored it (fsck verifies the stored bytes against their
/// digests). A tag the upstream lacks gets podman's "manifest unknown". With the upstream
/// stopped, podman still pulls the cached tag and digest, and an uncached tag fails with the
/// mirror's 502 (the upstream named), not a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_pulls_through_by_tag_and_digest_and_from_the_cache_with_the_upstream_down() {
    let mut pair = Pair::start("1s");
    let image = push_unpackable(&pair.upstream, "lib/tiny", "v1", "podman").await;
    push_unpackable(&pair.upstream, "lib/tiny", "v2", "never-pulled").await;
    let host = pair.downstream.host.clone();
    let registries = insecure_registries_conf(&host);
    let by_tag = format!("{host}/hub/lib/tiny:v1");
    let by_digest = format!("{host}/hub/lib/tiny@{}", image.manifest);

    let pulls = |refs: Vec<String>, registries: String| {
        tokio::task::spawn_blocking(move || {
            refs.iter()
                .map(|r| Podman::new(&registries).pull(r))
                .collect::<Vec<_>>()
        })
    };
    let got = pulls(vec![by_tag.clone(), by_digest.clone()], registries.clone())
        .await
        .expect("podman");
    for (digest, hello) in &got {
        assert_eq!(digest, &image.manifest, "podman got the upstream's manifest");
        assert_eq!(hello, "hello from podman\n");
    }
    assert_eq!(
        upstream_gets(&pair.upstream, "blob").await,
        2.0,
        "each blob fetched once"
    );
    assert_eq!(
        upstream_gets(&pair.upstream, "manifest").await,
        1.0,
        "the manifest fetched once"
    );
    for (d, _) in [&image.config, &image.layer] {
        assert!(pair.downstream.blob_object_exists(d), "{d} is stored at the mirror");
    }
    let (code, out, err) = pair.downstream.fsck(&[]);
    assert_eq!(code, 0, "fsck of the mirror: {out}{err}");

    let missing = format!("{host}/hub/lib/tiny:nope");
    let err = tokio::task::spawn_blocking({
        let registries = registries.clone();
        move || Podman::new(&registries).pull_fails(&missing)
    })
    .await
    .expect("podman");
    assert!(
        err.contains("manifest unknown"),
        "podman on a tag the upstream lacks: {err}"
    );

    pair.upstream.kill();
    // Past the tag's TTL (1 s from its validation), so the tag pull asks the dead upstream.
    let validated = Instant::now();
    wait_until("the tag's TTL passed", || async move {
        validated.elapsed() > Duration::from_millis(1100)
    })
    .await;
    let got = pulls(vec![by_tag, by_digest], registries.clone())
        .await
        .expect("podman");
    for (digest, hello) in &got {
        assert_eq!(digest, &image.manifest, "served from the cache");
        assert_eq!(hello, "hello from podman\n");
    }
    // podman names the status only (it shows no body of a 5xx); the body, which names the
    // upstream, is the mirror's OCI error.
    let uncached = format!("{host}/hub/lib/tiny:v2");
    let err = tokio::task::spawn_blocking(move || Podman::new(&registries).pull_fails(&uncached))
        .await
        .expect("podman");
    assert!(
        err.contains("reading manifest v2") && err.contains("502 Bad Gateway"),
        "podman on an uncached tag with the upstream down: {err}"
    );
    let (status, _, body) = get(&pair.down("lib/tiny/manifests/v2")).await;
    assert_eq!((status, error_code(&body)), (502, "UNAVAILABLE".to_owned()));
    assert!(
        error_message(&body).contains("could not be reached"),
        "{}",
        error_message(&body)
    );
}

/// podman with the mirror as a `[[registry.mirror]]` of another registry (`location =
/// "127.0.0.1:PORT/hub/lib"`, the prefix in the location): `podman pull
/// registry.test/lib/tiny:v1` (the registry itself a closed port, so only the mirror can
/// answer) and by digest get the upstream's image, fetched through the mirror once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_uses_the_proxy_prefix_as_a_registries_conf_mirror() {
    let pair = Pair::start("5m");
    let image = push_unpackable(&pair.upstream, "lib/tiny", "v1", "mirror").await;
    let registries = format!(
        "[[registry]]\nprefix = \"registry.test/lib\"\nlocation = \"127.0.0.1:9/lib\"\ninsecure = true\n\n\
         [[registry.mirror]]\nlocation = \"{}/hub/lib\"\ninsecure = true\n",
        pair.downstream.host
    );
    let refs = [
        "registry.test/lib/tiny:v1".to_owned(),
        format!("registry.test/lib/tiny@{}", image.manifest),
    ];
    let got = tokio::task::spawn_blocking(move || {
        refs.iter()
            .map(|r| Podman::new(&registries).pull(r))
            .collect::<Vec<_>>()
    })
    .await
    .expect("podman");
    for (digest, hello) in &got {
        assert_eq!(digest, &image.manifest, "podman got the upstream's manifest");
        assert_eq!(hello, "hello from mirror\n");
    }
    assert_eq!(
        upstream_gets(&pair.upstream, "blob").await,
        2.0,
        "each blob fetched once"
    );
    for (d, _) in [&image.config, &image.layer] {
        assert!(pair.downstream.blob_object_exists(d), "{d} is stored at the mirror");
    }
}

// ---------------------------------------------------------------------------------------------
// A full spool disk
// ---------------------------------------------------------------------------------------------

/// A tmpfs mounted over a directory for the test's duration; unmounted (lazily, so that a file
/// still open cannot keep it) on drop, and a failed unmount is printed (a drop cannot fail the
/// test, and may run while it panics). A test binary killed with SIGKILL never drops it: the
/// tmpfs then stays mounted over the leaked temporary directory (at most its size in memory)
/// until unmounted by hand (`findmnt -t tmpfs | grep proxy-spool` lists it).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: usize) -> Tmpfs {
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir),
        );
        Tmpfs(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        match Command::new("umount").arg("-l").arg(&self.0).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "the test tmpfs on {} was not unmounted ({}): {}; unmount it by hand",
                self.0.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!(
                "the test tmpfs on {} was not unmounted (running umount: {e}); unmount it by hand",
                self.0.display()
            ),
        }
    }
}

/// An upstream of a few blobs, served over raw HTTP/1.1 on 127.0.0.1: a `GET` of
/// `/v2/<any>/blobs/<digest>` answers 200 with the blob's whole `Content-Length` and sends its
/// first `head` bytes, then waits for [`PausingUpstream::resume`] of that blob before it sends
/// the rest. Anything else is 404. Counts the blob GETs it answered.
struct PausingUpstream {
    url: String,
    /// One gate per blob, in the order given.
    resume: Vec<tokio::sync::watch::Sender<bool>>,
    gets: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl PausingUpstream {
    /// `blobs`: each blob with the bytes it sends before waiting for `resume` of its index.
    async fn start(blobs: Vec<(Vec<u8>, usize)>) -> PausingUpstream {
        use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
        type Blob = (String, Vec<u8>, usize, tokio::sync::watch::Receiver<bool>);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let gets = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut resume = Vec::new();
        let blobs: std::sync::Arc<Vec<Blob>> = std::sync::Arc::new(
            blobs
                .into_iter()
                .map(|(b, head)| {
                    let (gate, resumed) = tokio::sync::watch::channel(false);
                    resume.push(gate);
                    (sha256(&b), b, head, resumed)
                })
                .collect(),
        );
        let counter = gets.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (blobs, counter) = (blobs.clone(), counter.clone());
                tokio::spawn(async move {
                    let mut stream = tokio::io::BufReader::new(stream);
                    let mut request = String::new();
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        request.push_str(&line);
                    }
                    let found = blobs
                        .iter()
                        .find(|(d, _, _, _)| request.starts_with("GET ") && request.contains(&format!("/blobs/{d} ")));
                    let stream = stream.get_mut();
                    let Some((digest, blob, head, resumed)) = found else {
                        let _ = stream
                            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                            .await;
                        return;
                    };
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let header = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\
                         Docker-Content-Digest: {digest}\r\nConnection: close\r\n\r\n",
                        blob.len()
                    );
                    if stream.write_all(header.as_bytes()).await.is_err()
                        || stream.write_all(&blob[..*head]).await.is_err()
                    {
                        return;
                    }
                    let _ = stream.flush().await;
                    let _ = resumed.clone().wait_for(|r| *r).await;
                    let _ = stream.write_all(&blob[*head..]).await;
                    let _ = stream.flush().await;
                });
            }
        });
        PausingUpstream { url, resume, gets }
    }

    fn gets(&self) -> usize {
        self.gets.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Lets the responses for blob `index` send their rest.
    fn resume(&self, index: usize) {
        self.resume[index].send(true).expect("resume the upstream");
    }
}

/// The tee's spool on a full disk: a 4 MiB tmpfs mounted over the mirror's spool directory,
/// an 8 MiB blob whose upstream pauses after its first 2 MiB. The client has its first bytes
/// (so it reads from the tee), then the tmpfs is filled up and the upstream resumes: the
/// spool write fails, and the client's body is cut short of its `Content-Length` (a read
/// error, not a clean short body). The registry still answers; the fetch went on and stored
/// the blob with the right bytes (fsck), and its spool file is gone. With the space back, a
/// later pull gets the whole blob from the store without a second upstream fetch, and another
/// uncached blob (3 MiB, its upstream paused after 1 MiB) streams through the tee again: its
/// client has a first piece and its spool file exists while the upstream is paused (so the
/// body comes from the tee, not from the store after the fetch), then it reads it to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_disk_cuts_the_tee_readers_and_the_fetch_still_stores_the_blob() {
    use futures_util::StreamExt as _;
    const MIB: usize = 1 << 20;
    let blob = pseudo_random(8 * MIB, 31);
    let digest = sha256(&blob);
    let later = pseudo_random(3 * MIB, 32);
    let upstream = PausingUpstream::start(vec![(blob.clone(), 2 * MIB), (later.clone(), MIB)]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("mirror.toml");
    std::fs::write(
        &config,
        format!(
            "[[proxy]]\nprefix = \"hub/\"\nurl = \"{}\"\ntimeout_secs = 30\n",
            upstream.url
        ),
    )
    .expect("write config");
    let mirror = TestServer::start_with(&[("STOWAGE_CONFIG", config.to_str().expect("utf-8"))]);
    let spool_dir = mirror.data_dir().join("proxy-spool");
    assert!(spool_dir.is_dir(), "the spool directory exists once the server runs");
    let _tmpfs = Tmpfs::mount(&spool_dir, 4 * MIB);

    let url = mirror.v2(&format!("hub/lib/big/blobs/{digest}"));
    let resp = client().get(&url).send().await.expect("GET blob");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.content_length(), Some(blob.len() as u64));
    let mut body = resp.bytes_stream();
    let mut received = body.next().await.expect("a first piece").expect("first piece").len();
    assert!(received > 0 && received <= 2 * MIB);

    // Fill what is left of the tmpfs, then let the upstream send the rest.
    let filler = spool_dir.join("filler");
    {
        use std::io::Write as _;
        let mut file = std::fs::File::create(&filler).expect("create filler");
        let piece = vec![0u8; 64 * 1024];
        loop {
            match file.write_all(&piece) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
    }
    upstream.resume(0);
    let mut cut = None;
    while let Some(piece) = body.next().await {
        match piece {
            Ok(p) => received += p.len(),
            Err(e) => {
                cut = Some(format!("{e:?}"));
                break;
            }
        }
    }
    assert!(
        received < blob.len(),
        "the client got {received} of {} bytes",
        blob.len()
    );
    let cut = cut.unwrap_or_else(|| panic!("the body ended cleanly after {received} bytes"));
    println!("client cut after {received} bytes: {cut}");

    // The registry answers; the fetch went on to store the blob, and its spool file is gone.
    let resp = client().get(mirror.v2("")).send().await.expect("GET /v2/");
    assert_eq!(resp.status(), 200);
    wait_until("the blob is stored and its spool removed", || async {
        mirror.blob_object_exists(&digest) && spool_files(&mirror) == [filler.clone()]
    })
    .await;

    // Space back: the blob is served whole from the store (no second fetch), and a new blob
    // streams through the tee.
    std::fs::remove_file(&filler).expect("remove filler");
    let (status, length, body) = get_blob_body(&url).await;
    assert_eq!((status, length), (200, Some(blob.len() as u64)));
    assert_eq!(sha256(&body.expect("the whole blob")), digest);
    assert_eq!(upstream.gets(), 1, "fetched once");
    let later_url = mirror.v2(&format!("hub/lib/big/blobs/{}", sha256(&later)));
    let resp = tokio::time::timeout(Duration::from_secs(30), client().get(&later_url).send())
        .await
        .expect("the response starts while the upstream is paused (streamed, not stored first)")
        .expect("GET the other blob");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.content_length(), Some(later.len() as u64));
    let mut body = resp.bytes_stream();
    let first = body.next().await.expect("a first piece").expect("first piece");
    assert!(!first.is_empty() && first.len() <= MIB);
    assert_eq!(
        spool_files(&mirror).len(),
        1,
        "its spool file, while the upstream is paused"
    );
    assert!(!mirror.blob_object_exists(&sha256(&later)), "not stored yet");
    upstream.resume(1);
    let mut received = first.to_vec();
    while let Some(piece) = body.next().await {
        received.extend_from_slice(&piece.expect("the rest of the body"));
    }
    assert_eq!(received, later, "the whole blob through the tee");
    assert_eq!(upstream.gets(), 2);
    let (code, out, err) = mirror.fsck(&[]);
    assert_eq!(code, 0, "fsck: the stored bytes hash to their digests: {out}{err}");
}

/// `max_size` with `gc.enabled = false` stops the start with a config error naming the entry:
/// the server would never evict, and a real `stowage gc` refuses to run beside it.
#[test]
fn max_size_without_the_collector_stops_the_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("mirror.toml");
    std::fs::write(
        &config,
        "[[proxy]]\nprefix = \"ghcr/\"\nurl = \"http://127.0.0.1:19\"\n\n\
         [[proxy]]\nprefix = \"hub/\"\nurl = \"http://127.0.0.1:9\"\nmax_size = \"1GiB\"\n\n\
         [gc]\nenabled = false\n",
    )
    .expect("write config");
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_stowage"))
            .arg("serve")
            .env("STOWAGE_CONFIG", &config)
            .env("STOWAGE_DATA_DIR", dir.path().join("data"))
            .env("STOWAGE_LISTEN", "127.0.0.1:0"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the server refused to start: {err}");
    assert!(
        err.contains("proxy[1].max_size needs gc.enabled = true"),
        "the error names the entry and the fix: {err}"
    );
    assert!(
        !dir.path().join("data").join("catalog.db").exists(),
        "refused before opening the catalog"
    );
}

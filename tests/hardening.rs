//! Hardening of the catalog and of smaller paths (issue 9, item 7), through the real binary:
//! owner-only catalog and key files, start-up cleanup of what a crash left behind, a bounded
//! `/v2/_catalog`, linear Spack spec recording, and size checks of an index's children.

mod common;

use std::time::{Duration, Instant};

use common::oci::assert_error;
use common::{TestServer, client, push_blob, push_image};
use serde_json::json;

/// A DAG hash (32 base-32 characters) for node `i`.
fn node_hash(i: usize) -> String {
    let alphabet = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..32)
        .map(|_| {
            let c = alphabet[(x % 32) as usize] as char;
            x = x.rotate_left(5) ^ 0x5bd1_e995;
            c
        })
        .collect()
}

/// A Spack 1.x spec config with `n` nodes: node `i` depends on node `i + 1` and, like every
/// package Spack 1.x builds, on the compiler (the last node) for the `c`/`cxx` virtuals.
fn big_spec_config(n: usize, layer_digest: &str) -> Vec<u8> {
    let compiler = node_hash(n - 1);
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n - 1 {
        let mut deps = vec![json!({"name":"gcc","hash":compiler,
            "parameters":{"deptypes":["build"],"virtuals":["c","cxx"]}})];
        if i + 2 < n {
            deps.push(json!({"name":format!("pkg{}", i + 1),"hash":node_hash(i + 1),
                "parameters":{"deptypes":["build","link"],"virtuals":[]}}));
        }
        nodes.push(json!({"name":format!("pkg{i}"),"version":"1.0",
            "arch":{"platform":"linux","platform_os":"debian12","target":"zen2"},
            "dependencies":deps,"hash":node_hash(i)}));
    }
    nodes.push(
        json!({"name":"gcc","version":"12.2.0","arch":{"platform":"linux","platform_os":"debian12",
        "target":"x86_64"},"external":{"path":"/usr"},"hash":compiler}),
    );
    serde_json::to_vec(&json!({"architecture":"amd64","os":"linux",
        "rootfs":{"type":"layers","diff_ids":[]},"config":{"Env":[]},
        "spec":{"_meta":{"version":5},"nodes":nodes},"buildcache_layout_version":3,
        "binary_cache_checksum":{"hash_algorithm":"sha256","hash":&layer_digest[7..]}}))
    .expect("config")
}

/// Recording a spec with tens of thousands of nodes is linear in its node count. Each node's
/// compiler used to be found by a search of the whole node list: 20,000 nodes took 29 s of a
/// debug build's CPU, and the 30,000 here need over a minute that way, against 4 to 7 s now.
/// The bound (40 s) is generous for the linear version (7 s at a load average of 10 on two
/// cores) and out of reach for the quadratic one even on an idle machine.
/// Every node is then recorded with its compiler.
#[tokio::test]
async fn spack_spec_with_30000_nodes_is_recorded_in_linear_time() {
    let n: usize = std::env::var("TEST_SPACK_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30_000);
    let server = TestServer::start();
    let repo = "cache/big";
    let layer = b"tarball of pkg0".to_vec();
    let layer_digest = push_blob(&server, repo, &layer).await;
    let config = big_spec_config(n, &layer_digest);
    let config_digest = push_blob(&server, repo, &config).await;
    let manifest = serde_json::to_vec(&json!({"mediaType":"application/vnd.oci.image.manifest.v1+json",
        "schemaVersion":2,
        "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":config_digest,"size":config.len()},
        "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":layer_digest,"size":layer.len()}]}))
    .expect("manifest");
    let tag = format!("pkg0-1.0-{}.spack", node_hash(0));
    let started = Instant::now();
    let resp = client()
        .put(server.v2(&format!("{repo}/manifests/{tag}")))
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .timeout(Duration::from_secs(120))
        .body(manifest)
        .send()
        .await
        .expect("PUT spec manifest");
    let took = started.elapsed();
    assert_eq!(resp.status(), 201, "spec manifest PUT");
    eprintln!("recorded a spec of {n} nodes ({} bytes) in {took:?}", config.len());
    assert!(took < Duration::from_secs(40), "recording {n} nodes took {took:?}");
    // Every node is recorded with the compiler it was built with.
    let resp = client()
        .get(server.url.clone() + &format!("/stowage/v1/spack/{repo}/specs/{}", node_hash(0)))
        .send()
        .await
        .expect("GET spec");
    assert_eq!(resp.status(), 200, "GET spec");
    let detail: serde_json::Value = resp.json().await.expect("spec json");
    assert_eq!(detail["spec"]["compiler"], "gcc@12.2.0");
    assert_eq!(detail["spec"]["dependencies"].as_array().map(Vec::len), Some(n - 1));
}

/// PUTs `body` as a manifest of `media_type` and returns the response.
async fn put_manifest(
    server: &TestServer,
    repo: &str,
    reference: &str,
    media_type: &str,
    body: &[u8],
) -> reqwest::Response {
    client()
        .put(server.v2(&format!("{repo}/manifests/{reference}")))
        .header("Content-Type", media_type)
        .body(body.to_vec())
        .send()
        .await
        .expect("PUT manifest")
}

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// An index whose child descriptor gives a size other than the stored child manifest's is
/// refused with `MANIFEST_INVALID` naming the child; so is an image manifest whose blob
/// descriptor's size differs from the stored blob's. The right sizes are accepted.
#[tokio::test]
async fn descriptor_sizes_must_match_stored_children_and_blobs() {
    let server = TestServer::start();
    let repo = "sizes/app";
    let (child_digest, child) = push_image(&server, repo, "child", b"layer of the child").await;
    let index = |size: usize| {
        serde_json::to_vec(&json!({"schemaVersion":2,"mediaType":OCI_INDEX,
            "manifests":[{"mediaType":OCI_MANIFEST,"digest":child_digest,"size":size,
                          "platform":{"architecture":"amd64","os":"linux"}}]}))
        .expect("index")
    };
    for wrong in [child.len() + 1, child.len() - 1, 0] {
        let resp = put_manifest(&server, repo, "multi", OCI_INDEX, &index(wrong)).await;
        let body = assert_error(resp, 400, &["MANIFEST_INVALID"]).await;
        let message = body["errors"][0]["message"].as_str().unwrap_or_default().to_owned()
            + &body["errors"][0]["detail"].to_string();
        assert!(message.contains(&child_digest), "error names the child: {body}");
    }
    let resp = put_manifest(&server, repo, "multi", OCI_INDEX, &index(child.len())).await;
    assert_eq!(resp.status(), 201, "index with the right child size");

    // Blob descriptors: the config and a layer with a wrong size.
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = push_blob(&server, repo, config).await;
    let layer = b"a layer".to_vec();
    let layer_digest = push_blob(&server, repo, &layer).await;
    let image = |config_size: usize, layer_size: usize| {
        serde_json::to_vec(&json!({"schemaVersion":2,"mediaType":OCI_MANIFEST,
            "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":config_digest,"size":config_size},
            "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":layer_digest,"size":layer_size}]}))
        .expect("image")
    };
    for (body, named) in [
        (image(config.len() + 1, layer.len()), &config_digest),
        (image(config.len(), layer.len() + 7), &layer_digest),
    ] {
        let resp = put_manifest(&server, repo, "img", OCI_MANIFEST, &body).await;
        let err = assert_error(resp, 400, &["MANIFEST_INVALID"]).await;
        assert!(err.to_string().contains(named.as_str()), "error names the blob: {err}");
    }
    let resp = put_manifest(&server, repo, "img", OCI_MANIFEST, &image(config.len(), layer.len())).await;
    assert_eq!(resp.status(), 201, "image with the right sizes");
}

/// Permission bits of a path.
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// The catalog (it holds password hashes) and the signing keys are owner-only: created 0600
/// in directories Stowage creates 0700, and restricted at start-up when found readable by
/// others. The process umask is the common 022, under which files are created 0644 unless the
/// server asks for less.
///
/// On the SQLite catalog whatever `STOWAGE_TEST_CATALOG` says: its files are what is checked
/// (a PostgreSQL catalog has no file in the data directory; its server keeps its own files).
#[tokio::test]
async fn catalog_and_key_files_are_owner_only() {
    // SAFETY: umask has no memory-safety preconditions.
    unsafe { libc::umask(0o022) };
    let mut server = TestServer::start_on_catalog(common::Catalog::Sqlite, &[]);
    push_blob(&server, "perm/app", b"a blob makes the catalog write").await;
    let data = server.data_dir().to_owned();
    let catalog = data.join("catalog.db");
    let companions = [data.join("catalog.db-wal"), data.join("catalog.db-shm")];
    let key_dir = data.join("auth/keys");
    assert_eq!(mode(&data), 0o700, "data directory created by stowage");
    assert_eq!(mode(&data.join("auth")), 0o700, "auth directory");
    assert_eq!(mode(&key_dir), 0o700, "key directory");
    assert_eq!(mode(&catalog), 0o600, "catalog.db");
    for f in &companions {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    let keys: Vec<_> = std::fs::read_dir(&key_dir)
        .expect("key dir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(keys.len(), 1, "one generated key: {keys:?}");
    assert_eq!(mode(&keys[0]), 0o600, "signing key");

    // Files an older version or an operator left readable by everyone are restricted at start.
    let status = server.terminate();
    assert!(status.success(), "clean stop: {status}");
    set_mode(&catalog, 0o644);
    set_mode(&keys[0], 0o644);
    for f in companions.iter().filter(|f| f.exists()) {
        set_mode(f, 0o644);
    }
    server.crash_and_restart();
    push_blob(&server, "perm/app", b"another write after the restart").await;
    assert_eq!(mode(&catalog), 0o600, "catalog.db after restart");
    for f in &companions {
        assert_eq!(mode(f), 0o600, "{} after restart", f.display());
    }
    assert_eq!(mode(&keys[0]), 0o600, "signing key after restart");
}

/// Starts an upload session; returns its path (`/v2/<repo>/blobs/uploads/<id>`) and id.
async fn open_session(server: &TestServer, repo: &str) -> (String, String) {
    let resp = client()
        .post(server.v2(&format!("{repo}/blobs/uploads/")))
        .header("Content-Length", "0")
        .send()
        .await
        .expect("POST upload");
    assert_eq!(resp.status(), 202, "POST upload session");
    let path = resp.headers()["location"].to_str().expect("Location").to_owned();
    assert!(path.starts_with("/v2/"), "relative Location {path}");
    let id = path.rsplit('/').next().unwrap_or_default().to_owned();
    (path, id)
}

async fn patch(server: &TestServer, path: &str, range: &str, data: &[u8]) -> reqwest::Response {
    client()
        .patch(format!("{}{path}", server.url))
        .header("Content-Type", "application/octet-stream")
        .header("Content-Range", range)
        .body(data.to_vec())
        .send()
        .await
        .expect("PATCH")
}

/// Ids of the upload sessions the catalog records.
fn recorded_sessions(server: &TestServer) -> Vec<String> {
    server
        .catalog_sql()
        .query_rows("SELECT id FROM uploads ORDER BY id", &[])
        .iter()
        .map(|r| r[0].text().to_owned())
        .collect()
}

/// A restart after a crash clears what the crash left: session rows whose staged data is gone
/// (local disk: the file), sessions that expired while the server was down, and empty
/// `uploads/<id>/` directories; a session with its data intact still resumes and completes.
#[tokio::test]
async fn restart_clears_orphan_sessions_and_empty_upload_dirs() {
    let mut server = TestServer::start();
    let repo = "restart/app";
    let first = b"the first half of a blob, ".to_vec();
    let second = b"and the second half".to_vec();
    let (resumable, resumable_id) = open_session(&server, repo).await;
    assert_eq!(
        patch(&server, &resumable, &format!("0-{}", first.len() - 1), &first)
            .await
            .status(),
        202
    );
    let (expired, expired_id) = open_session(&server, repo).await;
    let (lost, lost_id) = open_session(&server, repo).await;
    assert_eq!(patch(&server, &lost, "0-3", b"data").await.status(), 202);
    let mut all = vec![resumable_id.clone(), expired_id.clone(), lost_id.clone()];
    all.sort();
    assert_eq!(recorded_sessions(&server), all);

    let status = server.terminate();
    assert!(status.success(), "clean stop: {status}");
    // The expired session was last used two days ago (the timeout is 24 h).
    let aged = server.catalog_sql().execute(
        "UPDATE uploads SET updated_at = updated_at - 172800 WHERE id = ?1",
        &[(&expired_id).into()],
    );
    assert_eq!(aged, 1, "age the session");
    let uploads = server.data_dir().join("storage/uploads");
    let empty_dirs = [
        uploads.join("0b5ca1ab1e0000000000000000000001"),
        uploads.join("not-an-upload-id"),
    ];
    if server.backend == common::Backend::Fs {
        // What a crash leaves on local disk: a staging file gone with its session's row still
        // recorded (it died between the two), and empty upload directories.
        std::fs::remove_file(uploads.join(&lost_id).join("data")).expect("remove staging file");
        for d in &empty_dirs {
            std::fs::create_dir_all(d).expect("mkdir");
        }
    }
    server.crash_and_restart();

    let mut left = vec![resumable_id.clone()];
    if server.backend != common::Backend::Fs {
        // A multipart upload cannot be listed: its session stays until it expires.
        left.push(lost_id.clone());
        left.sort();
    }
    assert_eq!(recorded_sessions(&server), left, "sessions recorded after the restart");
    if server.backend == common::Backend::Fs {
        for d in empty_dirs
            .iter()
            .chain([&uploads.join(&lost_id), &uploads.join(&expired_id)])
        {
            assert!(!d.exists(), "{} is removed at start-up", d.display());
        }
        assert!(uploads.join(&resumable_id).join("data").exists(), "resumable data kept");
    }
    let mut gone = vec![&expired];
    if server.backend == common::Backend::Fs {
        gone.push(&lost);
    }
    for gone in gone {
        let resp = client()
            .get(format!("{}{gone}", server.url))
            .send()
            .await
            .expect("status GET");
        assert_error(resp, 404, &["BLOB_UPLOAD_UNKNOWN"]).await;
    }
    // The intact session resumes from what was durably staged (all of the first chunk on local
    // disk; on S3 nothing, as a chunk below the part size stays in memory) and completes.
    let resp = client()
        .get(format!("{}{resumable}", server.url))
        .send()
        .await
        .expect("status GET");
    assert_eq!(resp.status(), 204, "status of the resumable session");
    let range = resp.headers()["range"].to_str().expect("Range").to_owned();
    let end: usize = range
        .strip_prefix("0-")
        .and_then(|e| e.parse().ok())
        .expect("Range 0-N");
    // "0-0" is what the registry reports for an empty session (the first chunk is longer).
    let offset = if end == 0 { 0 } else { end + 1 };
    if server.backend == common::Backend::Fs {
        assert_eq!(offset, first.len(), "durable offset on local disk");
    }
    let whole = [first, second].concat();
    let rest = &whole[offset..];
    let resp = patch(&server, &resumable, &format!("{offset}-{}", whole.len() - 1), rest).await;
    assert_eq!(resp.status(), 202, "PATCH after restart");
    let digest = common::sha256(&whole);
    let resp = client()
        .put(format!("{}{resumable}?digest={digest}", server.url))
        .send()
        .await
        .expect("closing PUT");
    assert_eq!(resp.status(), 201, "closing PUT after restart");
    let resp = client()
        .get(server.v2(&format!("{repo}/blobs/{digest}")))
        .send()
        .await
        .expect("GET blob");
    assert_eq!(resp.bytes().await.expect("body").as_ref(), whole.as_slice());
}

/// Private repositories put straight into the catalog (pushing 100,000 would take long).
const PRIVATE_REPOS: usize = 100_000;

/// Anonymous `/v2/_catalog` on a registry with 100,000 private repositories and two public ones
/// sorted after them: `n=0` answers at once, and paging with `n=1` reaches both public
/// repositories through `Link` headers, each answer a bounded amount of work. The filtered
/// listing used to run one catalog query per repository (per two with `n=1`) until it found
/// one to show: 23 s for the first `n=1` page here.
#[tokio::test]
async fn anonymous_catalog_listing_is_bounded_whatever_the_repository_count() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("stowage.toml");
    std::fs::write(&config, "[auth]\nanonymous_pull = [\"p/public\", \"z/public\"]\n").expect("config");
    let mut server = TestServer::start_with(&[
        ("STOWAGE_CONFIG", config.to_str().expect("utf-8 path")),
        ("STOWAGE_AUTH__ENABLED", "true"),
    ]);
    // Answering a request means the server runs (and handles SIGTERM).
    let resp = client().get(server.v2("")).send().await.expect("GET /v2/");
    assert_eq!(resp.status(), 401, "GET /v2/ anonymously with auth on");
    let status = server.terminate();
    assert!(status.success(), "clean stop: {status}");
    {
        let db = server.catalog_sql();
        db.execute(
            "INSERT INTO repositories (name, created_at) VALUES ('p/public', 0), ('z/public', 0)",
            &[],
        );
        // m/private000000 to m/private099999, generated in one statement on either engine.
        let added = db.execute(
            "WITH RECURSIVE n(i, padded) AS (
                 SELECT CAST(0 AS BIGINT), CAST('000000' AS TEXT)
                 UNION ALL
                 SELECT i + 1, '000000' || (i + 1) FROM n WHERE i + 1 < ?1
             )
             INSERT INTO repositories (name, created_at)
             SELECT 'm/private' || substr(padded, length(padded) - 5), 0 FROM n ORDER BY i",
            &[(PRIVATE_REPOS as i64).into()],
        );
        assert_eq!(added, PRIVATE_REPOS as u64);
    }
    server.crash_and_restart();
    let http = client();
    let get = |query: String| {
        let http = http.clone();
        let url = format!("{}{query}", server.v2("_catalog"));
        async move {
            let started = Instant::now();
            let resp = http.get(&url).send().await.expect("GET _catalog");
            let took = started.elapsed();
            assert_eq!(resp.status(), 200, "GET {url}");
            let link = resp
                .headers()
                .get("link")
                .map(|l| l.to_str().expect("ascii").to_owned());
            let body: serde_json::Value = resp.json().await.expect("json");
            let repos: Vec<String> = body["repositories"]
                .as_array()
                .expect("repositories")
                .iter()
                .map(|r| r.as_str().expect("name").to_owned())
                .collect();
            (repos, link, took)
        }
    };
    let (repos, link, took) = get("?n=0".into()).await;
    assert!(repos.is_empty() && link.is_none(), "n=0: {repos:?} {link:?}");
    eprintln!("anonymous ?n=0 over {PRIVATE_REPOS} repositories: {took:?}");
    assert!(took < Duration::from_secs(2), "n=0 took {took:?}");

    let mut listed = Vec::new();
    let mut query = "?n=1".to_owned();
    let mut requests = 0;
    let mut slowest = Duration::ZERO;
    loop {
        let (repos, link, took) = get(query).await;
        requests += 1;
        slowest = slowest.max(took);
        assert!(repos.len() <= 1, "n=1 page: {repos:?}");
        listed.extend(repos);
        let Some(link) = link else { break };
        let target = link
            .strip_prefix("</v2/_catalog")
            .and_then(|l| l.split_once('>'))
            .map(|(q, _)| q.to_owned())
            .unwrap_or_else(|| panic!("Link {link}"));
        query = target;
        assert!(requests < 100, "paging does not end: {listed:?}, next {query}");
    }
    eprintln!("anonymous paging with n=1: {requests} requests, slowest {slowest:?}");
    assert_eq!(listed, ["p/public", "z/public"]);
    assert!(slowest < Duration::from_secs(2), "slowest page took {slowest:?}");
}

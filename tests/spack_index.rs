//! The server-maintained Spack index, checked against the indexes real Spack built.

mod common;

use common::spack::{FixtureRepo, in_buildcache, push_fixture, served_index};
use common::{TestServer, client, sha256};

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

/// The index blob as served (its bytes hash to the manifest's layer digest).
async fn served_index_bytes(server: &TestServer, repo: &str) -> Vec<u8> {
    let http = client();
    let resp = http
        .get(server.v2(&format!("{repo}/manifests/index.spack")))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .expect("GET index.spack");
    assert_eq!(resp.status(), 200);
    let manifest: serde_json::Value = resp.json().await.expect("manifest");
    let digest = manifest["layers"][0]["digest"].as_str().expect("layer").to_owned();
    let resp = http
        .get(server.v2(&format!("{repo}/blobs/{digest}")))
        .send()
        .await
        .expect("GET blob");
    assert_eq!(resp.status(), 200);
    let bytes = resp.bytes().await.expect("bytes").to_vec();
    assert_eq!(sha256(&bytes), digest, "the index blob hashes to its digest");
    bytes
}

/// The index of `repo` serialised from the catalog as Stowage did before the kept figures of
/// migration 0015: every node in some spec tag's DAG, with correlated counts (in the order the
/// nodes were recorded, as the index lists them since migration 0016).
fn correlated_index(server: &TestServer, repo: &str) -> Vec<u8> {
    let db = server.catalog_sql();
    let repo_id = db.query_i64("SELECT id FROM repositories WHERE name = ?1", &[repo.into()]);
    let min_layout = db.query_row(
        "SELECT MIN(layout_version) FROM spack_specs WHERE repo_id = ?1",
        &[repo_id.into()],
    )[0]
    .opt_int();
    let version = if min_layout.is_some_and(|l| l < 3) { "7" } else { "8" };
    let mut out = format!("{{\"database\":{{\"version\":\"{version}\",\"installs\":{{");
    let rows = db.query_rows(
        "SELECT n.hash, n.node,
                (SELECT COUNT(*) FROM spack_deps d
                  WHERE d.repo_id = n.repo_id AND d.dep_hash = n.hash
                    AND EXISTS (SELECT 1 FROM spack_closure c2 WHERE c2.repo_id = d.repo_id AND c2.hash = d.hash)),
                EXISTS (SELECT 1 FROM spack_specs s WHERE s.repo_id = n.repo_id AND s.hash = n.hash)
           FROM spack_nodes n
          WHERE n.repo_id = ?1
            AND EXISTS (SELECT 1 FROM spack_closure c WHERE c.repo_id = n.repo_id AND c.hash = n.hash)
          ORDER BY n.id",
        &[repo_id.into()],
    );
    for (i, row) in rows.iter().enumerate() {
        let (hash, node, ref_count, in_buildcache) = (row[0].text(), row[1].text(), row[2].int(), row[3].flag());
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            "{}:{{\"spec\":{node},\"ref_count\":{ref_count},\"in_buildcache\":{in_buildcache}}}",
            serde_json::Value::String(hash.to_owned())
        ));
    }
    out.push_str("}}}");
    out.into_bytes()
}

async fn delete(server: &TestServer, path: &str) {
    let resp = client().delete(server.v2(path)).send().await.expect("DELETE");
    assert_eq!(resp.status(), 202, "DELETE {path}");
}

async fn put_manifest(server: &TestServer, repo: &str, tag: &str, (body, ct): &(Vec<u8>, String)) {
    let resp = client()
        .put(server.v2(&format!("{repo}/manifests/{tag}")))
        .header("Content-Type", ct.as_str())
        .body(body.clone())
        .send()
        .await
        .expect("PUT manifest");
    assert_eq!(resp.status(), 201, "PUT {tag}");
}

/// The index built from the kept figures is byte for byte the serialisation with counts made
/// afresh from the catalog, through pushes, a tag delete, a manifest delete (cascading to its
/// tag), re-pushes and a mixed-layout cache; and `stowage fsck` finds every kept figure right.
#[tokio::test]
async fn the_index_from_kept_figures_is_the_correlated_serialisation_byte_for_byte() {
    let server = TestServer::start();
    let fixture = FixtureRepo::load("http-noauth", "spack_buildcache");
    push_fixture(&server, "cache", &fixture).await;
    let check = |what: &'static str| {
        let server = &server;
        async move {
            let served = served_index_bytes(server, "cache").await;
            let expected = correlated_index(server, "cache");
            assert!(
                served == expected,
                "{what}: served {} bytes, expected {} bytes:\n{}\n{}",
                served.len(),
                expected.len(),
                String::from_utf8_lossy(&served),
                String::from_utf8_lossy(&expected)
            );
        }
    };
    check("pushed").await;

    // The spec with the smallest DAG (a dependency of others here) loses its tag.
    let tags = fixture.spec_tags();
    let mut by_deps: Vec<(usize, String)> = tags
        .iter()
        .map(|t| {
            let (body, _) = &fixture.manifests[t];
            let m: serde_json::Value = serde_json::from_slice(body).expect("manifest");
            let config = &fixture.blobs[m["config"]["digest"].as_str().expect("config")];
            let c: serde_json::Value = serde_json::from_slice(config).expect("config");
            (c["spec"]["nodes"].as_array().map_or(0, |n| n.len()), t.clone())
        })
        .collect();
    by_deps.sort();
    let (leaf, root) = (by_deps[0].1.clone(), by_deps[by_deps.len() - 1].1.clone());
    delete(&server, &format!("cache/manifests/{leaf}")).await;
    check("a dependency's tag deleted").await;
    // The spec with the largest DAG goes by manifest digest: its tag cascades, and the nodes
    // only it held leave the index.
    let digest = sha256(&fixture.manifests[&root].0);
    delete(&server, &format!("cache/manifests/{digest}")).await;
    check("the largest spec's manifest deleted").await;
    put_manifest(&server, "cache", &root, &fixture.manifests[&root]).await;
    put_manifest(&server, "cache", &leaf, &fixture.manifests[&leaf]).await;
    check("both pushed again").await;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&served_index_bytes(&server, "cache").await).expect("JSON"),
        fixture.spack_index().expect("fixture index"),
        "back to Spack's own index"
    );
    // An old-layout spec turns the database version to 7 (the kept old-layout count).
    push_fixture(&server, "cache", &FixtureRepo::load("bearer-tls", "spack_v023")).await;
    check("a v0.23 cache pushed on top").await;

    let (code, out, err) = server.fsck(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("fsck: 1 Spack build caches' index figures recounted: 0 wrong"),
        "{out}"
    );
}

/// Kept figures that went wrong behind the server's back are found by `stowage fsck`, set to
/// the recount by `--repair`, and the next read of `index.spack` rebuilds the right index.
#[tokio::test]
async fn fsck_finds_and_repairs_wrong_index_figures() {
    let mut server = TestServer::start();
    let fixture = FixtureRepo::load("http-noauth", "spack_buildcache");
    push_fixture(&server, "cache", &fixture).await;
    let before = served_index_bytes(&server, "cache").await;
    server.terminate();
    {
        let db = server.catalog_sql();
        let hashes: Vec<String> = db
            .query_rows(
                "SELECT hash FROM spack_nodes WHERE closure_refs > 0 ORDER BY hash LIMIT 2",
                &[],
            )
            .iter()
            .map(|r| r[0].text().to_owned())
            .collect();
        assert_eq!(hashes.len(), 2);
        let corrupted = db.execute(
            "UPDATE spack_nodes SET ref_count = ref_count + 3 WHERE hash = ?1",
            &[(&hashes[0]).into()],
        );
        assert_eq!(corrupted, 1, "corrupt ref_count");
        let corrupted = db.execute(
            "UPDATE spack_nodes SET closure_refs = 0 WHERE hash = ?1",
            &[(&hashes[1]).into()],
        );
        assert_eq!(corrupted, 1, "corrupt closure_refs");
        let corrupted = db.execute("UPDATE spack_index SET specs = specs + 1, built_generation = NULL", &[]);
        assert_eq!(corrupted, 1, "corrupt specs");
    }
    let (code, out, err) = server.fsck(&[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("spack cache cache: 2 nodes' index figures differ from the recount; specs kept 6 (0 of layout < 3), recounted 5 (0)"),
        "{out}"
    );
    assert!(out.contains("index figures recounted: 1 wrong;"), "{out}");
    // Like a repaired blob, a repair reports what it found wrong: the run still fails.
    let (code, out, err) = server.fsck(&["--repair"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("spack cache cache: index figures set to the recount"),
        "{out}"
    );
    let (code, out, err) = server.fsck(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("index figures recounted: 0 wrong"), "{out}");
    server.crash_and_restart();
    assert!(
        served_index_bytes(&server, "cache").await == before,
        "the same index again"
    );
}

/// What a client pushes for one spec: `(digest, bytes)` of its blobs, its tag, its manifest.
type SpecImage = (Vec<(String, Vec<u8>)>, String, Vec<u8>);

/// A spec image of `width + 1` new nodes (package `wide{i}` and its private dependencies), all
/// depending on one shared node `base` (whose `ref_count` then changes with every push, as a
/// compiler runtime's does in a real cache): enough rows to span several of the index's
/// 512-rowid segments with a few pushes.
fn wide_spec(i: usize, width: usize) -> SpecImage {
    wide_spec_with(i, width, true)
}

/// [`wide_spec`], with or without the shared `base` node (without it, a spec's rows are its own
/// `width + 1` and a push changes no other segment).
fn wide_spec_with(i: usize, width: usize, with_base: bool) -> SpecImage {
    let h = |name: &str| {
        let digest = sha256(name.as_bytes());
        digest[7..39]
            .chars()
            .map(|c| {
                if c.is_ascii_digit() {
                    (b'a' + c as u8 - b'0') as char
                } else {
                    c
                }
            })
            .collect::<String>()
    };
    let node = |name: &str, deps: &[String]| {
        serde_json::json!({"name": name, "version": "1.0",
            "arch": {"platform": "linux", "platform_os": "debian12", "target": "x86_64"},
            "namespace": "builtin", "parameters": {"build_system": "generic", "padding": "x".repeat(700)},
            "dependencies": deps.iter().map(|d| serde_json::json!({"name": d, "hash": h(d),
                "parameters": {"deptypes": ["build", "link"], "virtuals": []}})).collect::<Vec<_>>(),
            "hash": h(name)})
    };
    let root = format!("wide{i}");
    let private: Vec<String> = (0..width).map(|j| format!("wide{i}-dep{j}")).collect();
    let base: Vec<String> = if with_base { vec!["base".to_owned()] } else { Vec::new() };
    let mut root_deps = private.clone();
    root_deps.extend(base.iter().cloned());
    let mut nodes = vec![node(&root, &root_deps)];
    nodes.extend(private.iter().map(|p| node(p, &base)));
    if with_base {
        nodes.push(node("base", &[]));
    }
    let layer = format!("tarball of {root}").into_bytes();
    let config = serde_json::to_vec(&serde_json::json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": []}, "config": {"Env": []},
        "spec": {"_meta": {"version": 5}, "nodes": nodes}, "buildcache_layout_version": 3,
        "binary_cache_checksum": {"hash_algorithm": "sha256", "hash": &sha256(&layer)[7..]}}))
    .expect("config");
    let manifest = serde_json::to_vec(&serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha256(&layer), "size": layer.len()}]}))
    .expect("manifest");
    let tag = format!("{root}-1.0-{}.spack", h(&root));
    (vec![(sha256(&layer), layer), (sha256(&config), config)], tag, manifest)
}

async fn push_wide(server: &TestServer, repo: &str, i: usize, width: usize) -> String {
    push_image(server, repo, wide_spec(i, width)).await
}

async fn push_image(server: &TestServer, repo: &str, (blobs, tag, manifest): SpecImage) -> String {
    for (_, data) in &blobs {
        common::push_blob(server, repo, data).await;
    }
    put_manifest(
        server,
        repo,
        &tag,
        &(manifest, "application/vnd.oci.image.manifest.v1+json".to_owned()),
    )
    .await;
    tag
}

/// The current index blob's digest, and whether the catalog records it as a composite and with
/// how many pieces.
fn index_blob(server: &TestServer, repo: &str) -> (String, bool, i64) {
    let row = server.catalog_sql().query_row(
        "SELECT r.digest, b.composite, (SELECT count(*) FROM blob_pieces p WHERE p.digest = r.digest)
           FROM spack_index i JOIN repositories repo ON repo.id = i.repo_id
           JOIN manifests m ON m.repo_id = i.repo_id AND m.digest = i.manifest_digest
           JOIN manifest_refs r ON r.manifest_id = m.id AND r.kind = 'layer'
           JOIN blobs b ON b.digest = r.digest
          WHERE repo.name = ?1",
        &[repo.into()],
    );
    (row[0].text().to_owned(), row[1].flag(), row[2].int())
}

/// The served index of `repo`, checked against the full serialisation from the catalog.
async fn check_against_full(server: &TestServer, repo: &str, what: String) -> Vec<u8> {
    let served = served_index_bytes(server, repo).await;
    let expected = correlated_index(server, repo);
    assert!(
        served == expected,
        "{what}: served {} bytes, expected {} bytes",
        served.len(),
        expected.len()
    );
    served
}

/// An index rebuilt from the segments that changed, composed with the runs of earlier builds
/// (a composite blob), is byte for byte the full serialisation, through pushes that change the
/// first and the last segments, a deleted tag and a manifest pushed again; it is served whole,
/// by range across its pieces and by HEAD; garbage collection keeps every piece a current index
/// names and removes the superseded ones; `stowage fsck` hashes it through its pieces.
#[tokio::test]
async fn an_index_composed_of_changed_segments_is_the_full_serialisation_byte_for_byte() {
    let mut server = TestServer::start();
    let repo = "wide/cache";
    // 14 specs of 100 nodes: about 1,400 rows, three segments.
    let mut tags = Vec::new();
    for i in 0..14 {
        tags.push(push_wide(&server, repo, i, 99).await);
    }
    check_against_full(&server, repo, "first build".into()).await;
    let (_, composite, _) = index_blob(&server, repo);
    assert!(!composite, "the first build writes the whole index");

    // One more spec: its rows and `base`'s count change; the segments between are named.
    tags.push(push_wide(&server, repo, 14, 99).await);
    let served = check_against_full(&server, repo, "one spec more".into()).await;
    let (digest, composite, pieces) = index_blob(&server, repo);
    assert!(
        composite && pieces >= 3,
        "an incremental build is a composite: {pieces} pieces"
    );

    // Ranges across the pieces, and HEAD.
    let http = client();
    let len = served.len() as u64;
    for (a, b) in [
        (0, 9),
        (1, len / 2),
        (len / 3, 2 * len / 3),
        (len - 100, len - 1),
        (5, len - 1),
    ] {
        let resp = http
            .get(server.v2(&format!("{repo}/blobs/{digest}")))
            .header("Range", format!("bytes={a}-{b}"))
            .send()
            .await
            .expect("GET range");
        assert_eq!(resp.status(), 206, "bytes={a}-{b}");
        let body = resp.bytes().await.expect("body");
        assert!(body[..] == served[a as usize..=b as usize], "bytes={a}-{b}");
    }
    let head = http
        .head(server.v2(&format!("{repo}/blobs/{digest}")))
        .send()
        .await
        .expect("HEAD");
    assert_eq!(head.status(), 200);
    assert_eq!(
        head.headers()["content-length"].to_str().expect("length"),
        len.to_string()
    );

    // A deleted tag (an early segment), then the same manifest pushed again, then more specs.
    delete(&server, &format!("{repo}/manifests/{}", tags[1])).await;
    check_against_full(&server, repo, "a tag deleted".into()).await;
    let (blobs, tag, manifest) = wide_spec(1, 99);
    assert_eq!(tag, tags[1]);
    for (_, data) in &blobs {
        common::push_blob(&server, repo, data).await;
    }
    put_manifest(
        &server,
        repo,
        &tag,
        &(manifest, "application/vnd.oci.image.manifest.v1+json".to_owned()),
    )
    .await;
    check_against_full(&server, repo, "pushed again".into()).await;
    for i in 15..18 {
        push_wide(&server, repo, i, 99).await;
        check_against_full(&server, repo, format!("spec {i}")).await;
    }

    // Collection (every second, no grace: from a restart after SIGKILL, so that no push races
    // it) keeps what the current index names and takes the superseded composites: wait until
    // only the current one is left, then read it again.
    server.crash_and_restart_with(&[("STOWAGE_GC__INTERVAL_SECS", "1"), ("STOWAGE_GC__GRACE_SECS", "0")]);
    let composites = || {
        server
            .catalog_sql()
            .query_i64("SELECT count(*) FROM blobs WHERE composite = 1", &[])
    };
    common::wait_until("the superseded composites are collected", || {
        let left = composites();
        async move { left <= 1 }
    })
    .await;
    check_against_full(&server, repo, "after collection".into()).await;

    server.kill();
    let (code, out, err) = server.fsck(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(" 0 bad ") && out.contains(" 0 unreadable"), "{out}");

    // A damaged piece: `fsck` finds it and the composite made of it; `--repair` forgets both,
    // and the next read builds the whole index again.
    let (digest, _, _) = index_blob(&server, repo);
    let piece = server.catalog_sql().query_string(
        "SELECT piece FROM blob_pieces WHERE digest = ?1 ORDER BY len DESC LIMIT 1",
        &[(&digest).into()],
    );
    server.corrupt_blob_object(&piece, b"not the index");
    let (_, out, _) = server.fsck(&[]);
    assert!(out.contains(&format!("{piece}: wrong size")), "{out}");
    assert!(out.contains(&format!("{digest}: ")), "the composite made of it: {out}");
    let (_, out, err) = server.fsck(&["--repair"]);
    assert!(out.contains("1 forgotten, 0 repairs failed"), "{out}{err}");
    server.crash_and_restart();
    let served = check_against_full(&server, repo, "rebuilt after the repair".into()).await;
    assert!(!served.is_empty());
    // The same bytes as the composite it replaces (so the same digest), now one object.
    let (rebuilt, composite, _) = index_blob(&server, repo);
    assert!(!composite && rebuilt == digest, "a full build after the repair");
    assert!(server.blob_object_exists(&rebuilt));
}

/// The recorded index layout (the catalog holds one repository's): (segment, blob, comma).
fn layout(server: &TestServer) -> Vec<(i64, String, bool)> {
    server
        .catalog_sql()
        .query_rows("SELECT seg, blob, comma FROM spack_index_layout ORDER BY seg", &[])
        .iter()
        .map(|r| (r[0].int(), r[1].text().to_owned(), r[2].flag()))
        .collect()
}

/// A segment's run is reused with exactly the `,` its place needs: when the segment before it
/// empties, the next one's run is named one byte later (no `,` before the index's first entry);
/// when the segment before it fills again, the run that lacks its `,` is written again. Specs
/// of 511 and 512 rows without a shared node fill segments 0, 1 and 2 exactly, so each change
/// touches one segment.
#[tokio::test]
async fn reused_runs_get_the_comma_their_place_needs() {
    let server = TestServer::start();
    let repo = "commas/cache";
    // Row ids start at 1: 511 rows fill segment 0 (ids 1-511), then 512 rows per segment.
    let first = push_image(&server, repo, wide_spec_with(0, 510, false)).await;
    push_image(&server, repo, wide_spec_with(1, 511, false)).await;
    push_image(&server, repo, wide_spec_with(2, 511, false)).await;
    check_against_full(&server, repo, "first build".into()).await;
    let (_, composite, _) = index_blob(&server, repo);
    assert!(!composite, "the first build is a full one");

    // Segment 0 empties: segment 1's run loses its `,`.
    delete(&server, &format!("{repo}/manifests/{first}")).await;
    check_against_full(&server, repo, "the first segment emptied".into()).await;
    let (_, composite, _) = index_blob(&server, repo);
    assert!(composite, "segments 1 and 2 reused");
    let rows = layout(&server);
    assert_eq!(
        rows.iter().map(|(seg, _, comma)| (*seg, *comma)).collect::<Vec<_>>(),
        vec![(1, false), (2, true)],
        "segment 1 is first now, named one byte later"
    );
    assert_eq!(rows[0].1, rows[1].1, "both named in the first build's blob");
    let first_build = rows[0].1.clone();
    assert!(server.blob_object_exists(&first_build));

    // Segment 0 fills again: segment 1's run (recorded without its `,`) is written again.
    let again = push_image(&server, repo, wide_spec_with(0, 510, false)).await;
    assert_eq!(again, first);
    check_against_full(&server, repo, "the first segment filled again".into()).await;
    // The bytes are the first build's again (so is the digest, whose plain blob serves them);
    // the layout shows what the build did: segments 0 and 1 written, segment 2 reused.
    let layout = layout(&server);
    assert_eq!(layout.len(), 3, "{layout:?}");
    assert_eq!(
        layout.iter().map(|(seg, _, comma)| (*seg, *comma)).collect::<Vec<_>>(),
        vec![(0, false), (1, true), (2, true)]
    );
    assert_eq!(layout[0].1, layout[1].1, "segments 0 and 1 written by the last build");
    assert_ne!(
        layout[1].1, layout[2].1,
        "segment 2 named where an earlier build wrote it"
    );
}

/// A full build whose bytes are those of a composite the catalog still records (here: every
/// segment changed and came back as it was) is the index, served from its own object: the
/// composite's row becomes a plain blob when that object is published.
#[tokio::test]
async fn a_whole_index_with_the_bytes_of_a_recorded_composite_is_served() {
    let server = TestServer::start();
    let repo = "wide/cache";
    let mut tags = Vec::new();
    for i in 0..14 {
        tags.push(push_wide(&server, repo, i, 99).await);
    }
    check_against_full(&server, repo, "first build".into()).await;
    tags.push(push_wide(&server, repo, 14, 99).await);
    check_against_full(&server, repo, "one spec more".into()).await;
    let (digest, composite, _) = index_blob(&server, repo);
    assert!(composite);
    // Segments 1 (spec 7), 2 (spec 14) and 0 (`base`) change, then come back as they were.
    for i in [7usize, 14] {
        delete(&server, &format!("{repo}/manifests/{}", tags[i])).await;
    }
    for i in [7usize, 14] {
        push_wide(&server, repo, i, 99).await;
    }
    check_against_full(&server, repo, "every segment back as it was".into()).await;
    let (again, composite, pieces) = index_blob(&server, repo);
    assert_eq!(again, digest, "the same bytes");
    assert!(!composite && pieces == 0, "now one object");
    assert!(server.blob_object_exists(&again));
    check_against_full(&server, repo, "read again".into()).await;
}

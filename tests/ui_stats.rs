//! The figures of the UI's repositories page (tag count and stored bytes), which the catalog
//! keeps per repository instead of recounting on every view (`migrations/0013_repo_stats.sql`):
//! right after pushes, re-pushes, cross-repository mounts, tag and manifest deletes, garbage
//! collection and retention; back-filled by the migration on an existing catalog; checked and
//! repaired by `stowage fsck`. And the platform of a single image, read from its config at push
//! time, on the repository page.
//!
//! Expected figures are computed here from what was pushed: each distinct blob a repository
//! links counted once, plus its manifests' bytes.

mod common;

use std::collections::BTreeMap;

use common::{Catalog, TestServer, UNDO_MIGRATIONS_13_TO_19, client, push_blob, sha256, wait_until};
use serde_json::json;

const CONFIG_MT: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_MT: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const MANIFEST_MT: &str = "application/vnd.oci.image.manifest.v1+json";

/// Retention keeps one tag in `stats/ret`; collection is off until a test turns it on.
const RETENTION: &str = r#"
[[gc.retention]]
repositories = ["stats/ret"]
keep_last = 1
"#;

/// What a test expects a repository to hold: blobs linked (digest -> size), manifests
/// (digest -> size), tags.
#[derive(Default, Clone)]
struct Expected {
    blobs: BTreeMap<String, u64>,
    manifests: BTreeMap<String, u64>,
    tags: u64,
}

impl Expected {
    fn bytes(&self) -> u64 {
        self.blobs.values().sum::<u64>() + self.manifests.values().sum::<u64>()
    }
}

/// Pushes an image of `config` (with media type `config_mt`) and `layers` under `reference`;
/// returns the manifest's digest and size, and records what it linked in `exp`.
async fn push(
    server: &TestServer,
    repo: &str,
    reference: &str,
    config_mt: &str,
    config: &[u8],
    layers: &[impl AsRef<[u8]>],
    exp: &mut Expected,
) -> (String, u64) {
    let config_digest = push_blob(server, repo, config).await;
    exp.blobs.insert(config_digest.clone(), config.len() as u64);
    let mut descriptors = Vec::new();
    for layer in layers {
        let layer = layer.as_ref();
        let digest = push_blob(server, repo, layer).await;
        exp.blobs.insert(digest.clone(), layer.len() as u64);
        descriptors.push(json!({"mediaType": LAYER_MT, "digest": digest, "size": layer.len()}));
    }
    let body = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MT,
        "config": {"mediaType": config_mt, "digest": config_digest, "size": config.len()},
        "layers": descriptors,
    }))
    .expect("manifest JSON");
    let resp = client()
        .put(server.v2(&format!("{repo}/manifests/{reference}")))
        .header("Content-Type", MANIFEST_MT)
        .body(body.clone())
        .send()
        .await
        .expect("PUT manifest");
    assert_eq!(resp.status(), 201, "PUT {repo}:{reference}");
    let digest = sha256(&body);
    exp.manifests.insert(digest.clone(), body.len() as u64);
    (digest, body.len() as u64)
}

async fn delete(server: &TestServer, repo: &str, reference: &str) {
    let resp = client()
        .delete(server.v2(&format!("{repo}/manifests/{reference}")))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(resp.status(), 202, "DELETE {repo}:{reference}");
}

async fn page(server: &TestServer, path: &str) -> String {
    let resp = client()
        .get(format!("{}{path}", server.url))
        .send()
        .await
        .expect("GET page");
    assert_eq!(resp.status(), 200, "GET {path}");
    resp.text().await.expect("page text")
}

/// The repositories page's figures of `repo` (tags, exact stored bytes), `None` when it is not
/// listed.
async fn figures(server: &TestServer, repo: &str) -> Option<(u64, u64)> {
    let html = page(server, &format!("/ui/?q={repo}")).await;
    let at = html.find(&format!("href=\"/ui/repos/{repo}\""))?;
    let row = &html[at..html[at..].find("</tr>").map(|e| at + e).expect("end of row")];
    let tags = row
        .split("<td class=\"num\">")
        .nth(1)
        .and_then(|t| t.split('<').next())
        .expect("tags cell");
    let bytes = row
        .split("title=\"")
        .nth(1)
        .and_then(|t| t.split(" bytes\"").next())
        .expect("bytes cell");
    Some((tags.parse().expect("tag count"), bytes.parse().expect("byte count")))
}

async fn assert_figures(server: &TestServer, repo: &str, exp: &Expected, when: &str) {
    assert_eq!(
        figures(server, repo).await,
        Some((exp.tags, exp.bytes())),
        "{repo} after {when}: (tags, bytes)"
    );
}

fn fsck_clean(server: &TestServer, when: &str) -> String {
    let (code, out, err) = server.fsck(&[]);
    assert_eq!(code, 0, "fsck after {when}: {out}{err}");
    assert!(out.contains("figures recounted: 0 wrong"), "{out}");
    out
}

/// What [`pushes_mounts_and_deletes`] pushed: the config every image shares, the second
/// layer, the manifest of `stats/app:v1`, the size of `stats/ret:b`'s manifest, and what each
/// repository holds.
struct Pushed {
    cfg: &'static [u8],
    l2: Vec<u8>,
    m1: String,
    size_b: u64,
    app: Expected,
    mirror: Expected,
    ret: Expected,
}

/// Pushes, re-pushes, a cross-repository mount, a tag delete and a manifest delete into
/// `stats/app`, `stats/mirror` and `stats/ret`, checking the figures after each; then fsck
/// agrees with them.
async fn pushes_mounts_and_deletes(server: &TestServer) -> Pushed {
    let cfg: &'static [u8] = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let (l1, l2) = (vec![1u8; 3000], vec![2u8; 5000]);
    let mut app = Expected::default();
    let (m1, _) = push(server, "stats/app", "v1", CONFIG_MT, cfg, &[&l1], &mut app).await;
    app.tags = 1;
    assert_figures(server, "stats/app", &app, "the first push").await;

    // The same manifest under a second tag: one more tag, no more bytes; pushing the same
    // blobs and manifest again changes nothing.
    push(server, "stats/app", "v2", CONFIG_MT, cfg, &[&l1], &mut app).await;
    push(server, "stats/app", "v1", CONFIG_MT, cfg, &[&l1], &mut app).await;
    app.tags = 2;
    assert_figures(server, "stats/app", &app, "a second tag and re-pushes").await;

    // A second image sharing the config: its layer and manifest count, the config once.
    let (m3, _) = push(server, "stats/app", "v3", CONFIG_MT, cfg, &[&l1, &l2], &mut app).await;
    app.tags = 3;
    assert_figures(server, "stats/app", &app, "an image sharing blobs").await;

    // A cross-repository mount links the blob to the target only.
    let l1_digest = sha256(&l1);
    let resp = client()
        .post(server.v2(&format!("stats/mirror/blobs/uploads/?mount={l1_digest}&from=stats/app")))
        .send()
        .await
        .expect("mount");
    assert_eq!(resp.status(), 201, "mount");
    let mut mirror = Expected::default();
    mirror.blobs.insert(l1_digest.clone(), l1.len() as u64);
    assert_figures(server, "stats/mirror", &mirror, "a mount").await;
    assert_figures(server, "stats/app", &app, "a mount from it").await;

    // Deleting a tag: one tag fewer, its manifest stays (v1 names it).
    delete(server, "stats/app", "v2").await;
    app.tags = 2;
    assert_figures(server, "stats/app", &app, "a tag delete").await;
    // Deleting a manifest: its tag and bytes go; its blobs stay linked until collected.
    delete(server, "stats/app", &m3).await;
    app.tags = 1;
    app.manifests.remove(&m3);
    assert_figures(server, "stats/app", &app, "a manifest delete").await;

    // Two images for retention, alike in every size, so that whichever it keeps the figures
    // are the same.
    let mut ret = Expected::default();
    push(server, "stats/ret", "a", CONFIG_MT, cfg, &[&[3u8; 700]], &mut ret).await;
    let (_, size_b) = push(server, "stats/ret", "b", CONFIG_MT, cfg, &[&[4u8; 700]], &mut ret).await;
    ret.tags = 2;
    assert_figures(server, "stats/ret", &ret, "pushes").await;
    let out = fsck_clean(server, "pushes and deletes");
    assert!(out.contains("3 repositories' figures recounted"), "{out}");
    Pushed {
        cfg,
        l2,
        m1,
        size_b,
        app,
        mirror,
        ret,
    }
}

fn retention_config(dir: &tempfile::TempDir) -> String {
    let config = dir.path().join("stowage.toml");
    std::fs::write(&config, RETENTION).expect("write config");
    config.to_str().expect("utf-8 path").to_owned()
}

#[tokio::test]
async fn repository_figures_follow_pushes_mounts_deletes_gc_and_retention() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = retention_config(&dir);
    let mut server = TestServer::start_with(&[("STOWAGE_CONFIG", &config), ("STOWAGE_GC__ENABLED", "false")]);
    let Pushed {
        cfg,
        l2,
        m1,
        size_b,
        mut app,
        ..
    } = pushes_mounts_and_deletes(&server).await;

    // Collection and retention: the tag retention drops, the manifests no tag names and the
    // links no manifest references go, each figure with them.
    server.crash_and_restart_with(&[
        ("STOWAGE_GC__ENABLED", "true"),
        ("STOWAGE_GC__INTERVAL_SECS", "1"),
        ("STOWAGE_GC__GRACE_SECS", "1"),
        ("STOWAGE_GC__UNTAGGED_MANIFESTS", "true"),
    ]);
    app.blobs.remove(&sha256(&l2));
    let mirror = Expected::default();
    let mut kept_ret = Expected {
        tags: 1,
        ..Expected::default()
    };
    kept_ret.blobs.insert(sha256(cfg), cfg.len() as u64);
    kept_ret.blobs.insert(sha256(&[3u8; 700]), 700);
    kept_ret.manifests.insert("kept".into(), size_b);
    for (repo, exp) in [("stats/app", &app), ("stats/mirror", &mirror), ("stats/ret", &kept_ret)] {
        let want = Some((exp.tags, exp.bytes()));
        wait_until(&format!("{repo}'s figures are collected"), || async {
            figures(&server, repo).await == want
        })
        .await;
    }
    assert_eq!(app.manifests.keys().collect::<Vec<_>>(), vec![&m1]);

    // The figures survive a restart, and fsck agrees with every one.
    server.kill();
    fsck_clean(&server, "collection and retention");

    // Figures gone wrong behind the catalog's back: fsck reports them, --repair recounts.
    let spoiled = server.catalog_sql().execute(
        "UPDATE repositories SET tag_count = 7, blob_bytes = blob_bytes + 1 WHERE name = 'stats/app'",
        &[],
    );
    assert_eq!(spoiled, 1, "spoil the figures");
    let (code, out, _) = server.fsck(&[]);
    assert_eq!(code, 1, "wrong figures fail fsck: {out}");
    assert!(
        out.contains("repository stats/app: figures kept 7 tags")
            && out.contains(&format!(
                "recounted 1 tags, {} blob bytes",
                app.blobs.values().sum::<u64>()
            ))
            && out.contains("figures recounted: 1 wrong"),
        "{out}"
    );
    let (code, out, _) = server.fsck(&["--repair"]);
    assert_eq!(code, 1, "a repair run reports what it found: {out}");
    assert!(out.contains("1 wrong, 1 repaired"), "{out}");
    fsck_clean(&server, "the repair");
    server.crash_and_restart_with(&[("STOWAGE_GC__ENABLED", "false")]);
    assert_figures(&server, "stats/app", &app, "the repair").await;
    assert_figures(&server, "stats/ret", &kept_ret, "the repair").await;
    assert_figures(&server, "stats/mirror", &mirror, "the repair").await;
}

/// A catalog from before the figures were kept gets them back-filled by the migration (13).
///
/// On the SQLite catalog whatever `STOWAGE_TEST_CATALOG` says: the catalog is rolled back
/// through SQLite's migration history (PostgreSQL's schema starts at SQLite's version 17).
#[tokio::test]
async fn the_figures_migration_back_fills_an_existing_catalog() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = retention_config(&dir);
    let mut server = TestServer::start_on_catalog(
        Catalog::Sqlite,
        &[("STOWAGE_CONFIG", &config), ("STOWAGE_GC__ENABLED", "false")],
    );
    let Pushed { app, mirror, ret, .. } = pushes_mounts_and_deletes(&server).await;
    server.kill();
    // Migrations after 12 undone, newest first: the figures (13) among them.
    server.catalog_sql().execute_batch(&format!(
        "{UNDO_MIGRATIONS_13_TO_19}
         PRAGMA user_version = 12;",
    ));
    server.crash_and_restart();
    assert_figures(&server, "stats/app", &app, "the back-fill").await;
    assert_figures(&server, "stats/ret", &ret, "the back-fill").await;
    assert_figures(&server, "stats/mirror", &mirror, "the back-fill").await;
    server.kill();
    fsck_clean(&server, "the back-fill");
}

#[tokio::test]
async fn the_repository_page_shows_a_single_images_platform() {
    let server = TestServer::start();
    let mut exp = Expected::default();
    let arm = br#"{"architecture":"arm64","variant":"v8","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    push(&server, "plat/app", "arm", CONFIG_MT, arm, &[b"arm layer"], &mut exp).await;
    let amd = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    push(
        &server,
        "plat/app",
        "amd",
        "application/vnd.docker.container.image.v1+json",
        amd,
        &[b"amd layer"],
        &mut exp,
    )
    .await;
    // An artifact whose config happens to look like an image config is not an image.
    let art = br#"{"architecture":"s390x","os":"linux"}"#;
    push(
        &server,
        "plat/app",
        "art",
        "application/vnd.example.thing+json",
        art,
        &[b"x"],
        &mut exp,
    )
    .await;
    // An image whose config names no platform.
    push(
        &server,
        "plat/app",
        "bare",
        CONFIG_MT,
        b"{}",
        &[b"bare layer"],
        &mut exp,
    )
    .await;

    let html = page(&server, "/ui/repos/plat/app").await;
    let row = |tag: &str| {
        let at = html
            .find(&format!(">{tag}</a>"))
            .unwrap_or_else(|| panic!("row of {tag}: {html}"));
        html[at..at + html[at..].find("</tr>").expect("end of row")].to_owned()
    };
    assert!(
        row("arm").contains(r#"<small class="platforms">linux/arm64/v8</small>"#),
        "{}",
        row("arm")
    );
    assert!(
        row("amd").contains(r#"<small class="platforms">linux/amd64</small>"#),
        "{}",
        row("amd")
    );
    for tag in ["art", "bare"] {
        assert!(!row(tag).contains("platforms"), "{}", row(tag));
    }
    assert!(!html.contains("s390x"), "{html}");
}

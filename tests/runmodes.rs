//! The one-off run modes on real data directories, on the configured blob backend:
//! `stowage gc --dry-run` beside a running server lists exactly what the following real
//! `stowage gc` deletes (retention deletions, unneeded manifests, blobs, orphaned objects,
//! superseded Spack index blobs) and
//! deletes nothing itself; a real pass and `stowage migrate` refuse while a server runs, naming
//! the alternative; `stowage migrate` applies each pending migration once and says which. On a
//! PostgreSQL catalog a real `stowage gc` runs beside the server.

mod common;

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::spack::{FixtureRepo, push_fixture, served_index};
use common::{TestServer, UNDO_MIGRATIONS_13_TO_19, client, push_blob, push_image, sha256, wait_until};

const CONFIG: &str = r#"
[gc]
# The server never collects by itself here: only the one-off passes do.
enabled = false
grace_secs = 0
spack_index_grace_secs = 0

[[gc.retention]]
repositories = ["ret/*"]
keep_last = 1
"#;

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs()
}

/// Exit code, stdout and stderr of a finished command.
fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().expect("run stowage");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The lines of a listing, sorted.
fn sorted_lines(s: &str) -> Vec<String> {
    let mut lines: Vec<String> = s.lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

async fn status(url: String) -> u16 {
    client().get(url).send().await.expect("GET").status().as_u16()
}

/// A server on `engine` with [`CONFIG`] (its file in the returned directory, kept as long).
fn start_with_config(engine: common::Catalog) -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("stowage.toml");
    std::fs::write(&config, CONFIG).expect("write config");
    let server = TestServer::start_on_catalog(engine, &[("STOWAGE_CONFIG", config.to_str().expect("utf-8"))]);
    (dir, server)
}

/// Pushes an image to `repo` as `v1` and deletes the tag: its manifest's digest.
async fn push_untagged(server: &TestServer, repo: &str) -> String {
    let (digest, _) = push_image(server, repo, "v1", format!("{repo} layer").as_bytes()).await;
    let resp = client()
        .delete(server.v2(&format!("{repo}/manifests/v1")))
        .send()
        .await
        .expect("DELETE tag");
    assert_eq!(resp.status(), 202);
    digest
}

#[tokio::test]
async fn dry_run_lists_exactly_what_the_real_pass_then_deletes() {
    // `stowage gc --dry-run` (a pass on a copy of the catalog) runs on a SQLite catalog only,
    // so this runs on SQLite always; the next test runs a real pass on PostgreSQL.
    let (_dir, mut server) = start_with_config(common::Catalog::Sqlite);

    let (kept, kept_body) = push_image(&server, "keep/app", "v1", b"kept layer").await;
    let (old, _) = push_image(&server, "ret/app", "old", b"old layer").await;
    // Retention orders tags by push time in seconds: `new` is pushed a second later.
    let pushed = unix_now();
    wait_until("the clock passes the first push", || async { unix_now() > pushed }).await;
    let (new, _) = push_image(&server, "ret/app", "new", b"new layer").await;
    let gone = push_untagged(&server, "gone/app").await;
    let lone = push_blob(&server, "lone/app", b"a blob no manifest references").await;
    // A Spack build cache whose index was rebuilt: the old index blob is superseded.
    let fixture = FixtureRepo::load("http-noauth", "spack_buildcache");
    push_fixture(&server, "spack/cache", &fixture).await;
    let (first_index, _) = served_index(&server, "spack/cache").await;
    let old_index_blob = first_index["layers"][0]["digest"].as_str().expect("layer").to_owned();
    let spec = fixture.spec_tags().into_iter().next().expect("a spec tag");
    let resp = client()
        .delete(server.v2(&format!("spack/cache/manifests/{spec}")))
        .send()
        .await
        .expect("DELETE spec tag");
    assert_eq!(resp.status(), 202);
    let (second_index, _) = served_index(&server, "spack/cache").await;
    assert_ne!(first_index, second_index, "the index was rebuilt");
    let orphan = sha256(b"an object the catalog never recorded");
    server.plant_blob_object(&orphan, Duration::from_secs(7200));
    // Everything above happened before the passes' cutoff (grace 0: "now") once the clock moves on.
    let written = unix_now();
    wait_until("the clock passes the last write", || async { unix_now() > written }).await;

    // Beside the running server: the dry run lists, the real pass and migrate refuse.
    let (code, dry, err) = run(&mut server.stowage_command(&["gc", "--dry-run"]));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("nothing was deleted"), "{err}");
    let (code, out, err) = run(&mut server.stowage_command(&["gc"]));
    assert_ne!(code, 0, "a real pass beside a server: {out}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("needs the server stopped") && err.contains("--dry-run"),
        "{err}"
    );
    let (code, _, err) = run(&mut server.stowage_command(&["migrate"]));
    assert_ne!(code, 0);
    assert!(err.contains("`stowage migrate` needs the server stopped"), "{err}");

    let expected = [
        format!("retention\tret/app\told\t{old}\t"),
        format!("manifest\tgone/app\t{gone}"),
        format!("blob\t{lone}\t"),
        format!("orphan\t{orphan}"),
        format!("spack-index-blob\t{old_index_blob}\t"),
    ];
    for e in &expected {
        assert!(
            dry.lines().any(|l| l.starts_with(e.as_str())),
            "dry run lacks {e:?}:\n{dry}"
        );
    }
    assert!(!dry.contains(&kept) && !dry.contains(&new), "{dry}");
    // The dry run changed nothing: the objects are there, the catalog still serves the tag.
    assert!(server.blob_object_exists(&lone) && server.blob_object_exists(&orphan));
    assert_eq!(status(server.v2("ret/app/manifests/old")).await, 200);
    let (_, audit, _) = run(&mut server.stowage_command(&["audit", "--user", "retention"]));
    assert_eq!(audit, "", "a dry run records nothing");

    assert!(server.terminate().success());
    let (code, real, err) = run(&mut server.stowage_command(&["gc"]));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("gc: removed"), "{err}");
    assert_eq!(
        sorted_lines(&real),
        sorted_lines(&dry),
        "the dry run listed what the pass deleted"
    );

    assert!(!server.blob_object_exists(&lone), "the unreferenced blob is gone");
    assert!(!server.blob_object_exists(&orphan), "the orphan is gone");
    assert!(
        !server.blob_object_exists(&old_index_blob),
        "the superseded index blob is gone"
    );
    let (config_digest, layer_digest) = {
        let m: serde_json::Value = serde_json::from_slice(&kept_body).expect("manifest");
        (
            m["config"]["digest"].as_str().expect("config").to_owned(),
            m["layers"][0]["digest"].as_str().expect("layer").to_owned(),
        )
    };
    assert!(server.blob_object_exists(&config_digest) && server.blob_object_exists(&layer_digest));

    // Retention's and the collector's deletions are in the audit trail.
    let (_, audit, _) = run(&mut server.stowage_command(&["audit", "--json", "--user", "retention"]));
    let rows: Vec<serde_json::Value> = audit.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    assert_eq!(rows.len(), 1, "{audit}");
    assert_eq!(
        (&rows[0]["repository"], &rows[0]["tag"]),
        (&"ret/app".into(), &"old".into())
    );
    assert_eq!(rows[0]["digest"], old.as_str());
    let (_, audit, _) = run(&mut server.stowage_command(&["audit", "--user", "gc", "--repo", "gone/app"]));
    assert!(audit.contains("gc.manifest\tgc\t") && audit.contains(&gone), "{audit}");

    // The registry serves what stayed.
    server.crash_and_restart();
    assert_eq!(status(server.v2("keep/app/manifests/v1")).await, 200);
    assert_eq!(status(server.v2("ret/app/manifests/new")).await, 200);
    assert_eq!(status(server.v2("ret/app/manifests/old")).await, 404);
    assert_eq!(status(server.v2(&format!("gone/app/manifests/{gone}"))).await, 404);
    assert_eq!(status(server.v2(&format!("keep/app/blobs/{layer_digest}"))).await, 200);
    let (third_index, _) = served_index(&server, "spack/cache").await;
    assert_eq!(third_index, second_index, "the current index stayed");
}

/// With PostgreSQL the locks a pass needs are database locks: a real `stowage gc` runs beside
/// the running server, as one more replica would, and removes what it lists; `--dry-run`
/// (a pass on a copy of the catalog file) is refused, saying so.
#[tokio::test]
async fn on_postgres_a_real_pass_runs_beside_the_server() {
    let (_dir, server) = start_with_config(common::Catalog::Postgres);
    let (_, kept_body) = push_image(&server, "keep/app", "v1", b"kept layer").await;
    let gone = push_untagged(&server, "gone/app").await;
    let lone = push_blob(&server, "lone/app", b"a blob no manifest references").await;
    let written = unix_now();
    wait_until("the clock passes the last write", || async { unix_now() > written }).await;

    let (code, out, err) = run(&mut server.stowage_command(&["gc", "--dry-run"]));
    assert_ne!(code, 0, "a dry run on PostgreSQL: {out}");
    assert!(err.contains("works on a SQLite catalog only"), "{err}");

    let (code, out, err) = run(&mut server.stowage_command(&["gc"]));
    assert_eq!(code, 0, "a real pass beside the server: {err}");
    assert!(err.contains("gc: removed"), "{err}");
    for line in [format!("manifest\tgone/app\t{gone}"), format!("blob\t{lone}\t")] {
        assert!(
            out.lines().any(|l| l.starts_with(&line)),
            "the pass lists {line:?}:\n{out}"
        );
    }
    assert!(!server.blob_object_exists(&lone), "the unreferenced blob is gone");
    assert_eq!(status(server.v2(&format!("gone/app/manifests/{gone}"))).await, 404);

    // The server serves what stayed, blobs included.
    let m: serde_json::Value = serde_json::from_slice(&kept_body).expect("manifest");
    assert_eq!(status(server.v2("keep/app/manifests/v1")).await, 200);
    for blob in [&m["config"]["digest"], &m["layers"][0]["digest"]] {
        let digest = blob.as_str().expect("digest");
        assert!(server.blob_object_exists(digest), "{digest} is kept");
        assert_eq!(status(server.v2(&format!("keep/app/blobs/{digest}"))).await, 200);
    }
}

/// `stowage <args>` on `data_dir`, with its SQLite catalog (`catalog.db` in it), whatever
/// `STOWAGE_TEST_CATALOG` says.
fn stowage(data_dir: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    run(Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args(args)
        .env("STOWAGE_DATA_DIR", data_dir)
        .env_remove("STOWAGE_CATALOG__URL")
        .env("RUST_LOG", "warn"))
}

/// On a SQLite catalog whatever `STOWAGE_TEST_CATALOG` says (no catalog setting: the data
/// directory's `catalog.db`): it checks SQLite's migration history (`user_version`, rolled back
/// by hand); `tests/pg_schema.rs` checks the PostgreSQL migrations.
#[tokio::test]
async fn migrate_applies_each_pending_migration_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let (code, out, err) = stowage(&data, &["migrate"]);
    assert_eq!(code, 0, "{err}");
    let applied: Vec<&str> = out.lines().collect();
    assert!(applied.len() >= 10, "{out}");
    for (i, line) in applied.iter().enumerate() {
        assert!(line.starts_with(&format!("applied migration {}: ", i + 1)), "{out}");
    }
    assert!(applied[9].contains("Audit trail"), "{out}");
    let latest = applied.len();
    assert!(err.contains(&format!("from schema version 0 to {latest}")), "{err}");

    let (code, out, err) = stowage(&data, &["migrate"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "", "nothing pending");
    assert!(err.contains(&format!("already at schema version {latest}")), "{err}");

    // A catalog from before the audit trail gets exactly that migration and the later ones
    // (undone here by hand, newest first).
    {
        let db = rusqlite::Connection::open(data.join("catalog.db")).expect("open catalog");
        // Undo every migration after 9, newest first: the Spack index figures, image platforms, repository figures, the
        // Spack search columns, the cache generations, the audit trail.
        db.execute_batch(&format!(
            "{UNDO_MIGRATIONS_13_TO_19}
             DROP INDEX spack_specs_by_name; DROP INDEX spack_specs_by_compiler;
             DROP INDEX spack_specs_by_target; DROP INDEX spack_specs_by_os; DROP INDEX spack_specs_facets;
             ALTER TABLE spack_specs DROP COLUMN name; ALTER TABLE spack_specs DROP COLUMN version;
             ALTER TABLE spack_specs DROP COLUMN platform; ALTER TABLE spack_specs DROP COLUMN os;
             ALTER TABLE spack_specs DROP COLUMN target; ALTER TABLE spack_specs DROP COLUMN compiler;
             DROP TRIGGER users_added_auth_epoch; DROP TRIGGER users_changed_auth_epoch;
             DROP TRIGGER users_removed_auth_epoch; DROP TRIGGER api_tokens_added_auth_epoch;
             DROP TRIGGER api_tokens_changed_auth_epoch; DROP TRIGGER api_tokens_removed_auth_epoch;
             DROP TABLE auth_epoch;
             DROP TRIGGER tags_added_content_epoch; DROP TRIGGER tags_changed_content_epoch;
             DROP TRIGGER tags_removed_content_epoch; DROP TRIGGER manifests_added_content_epoch;
             DROP TRIGGER manifests_changed_content_epoch; DROP TRIGGER manifests_removed_content_epoch;
             DROP TABLE content_epoch;
             DROP TABLE audit_log; PRAGMA user_version = 9;",
        ))
        .expect("roll back to version 9");
    }
    let (code, out, err) = stowage(&data, &["migrate"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), latest - 9, "{out}");
    assert!(lines[0].starts_with("applied migration 10: Audit trail"), "{out}");
    let (code, out, _) = stowage(&data, &["audit"]);
    assert_eq!((code, out.as_str()), (0, ""), "an empty, readable audit trail");

    // `stowage audit` on a catalog that was never migrated says what to do.
    let fresh = dir.path().join("fresh");
    std::fs::create_dir_all(&fresh).expect("mkdir");
    rusqlite::Connection::open(fresh.join("catalog.db")).expect("create an empty catalog");
    let (code, _, err) = stowage(&fresh, &["audit"]);
    assert_eq!(code, 1);
    assert!(err.contains("stowage migrate"), "{err}");
}

//! Retention rules and Spack keep-lists, through the real binary: each keep condition keeps
//! exactly what it says and the rest goes; the first matching rule applies; `dry_run` rules
//! delete nothing; `stowage spack prune --dry-run` lists exactly what the collector then
//! deletes; a kept Spack environment keeps its whole link/run closure while its siblings are
//! pruned; expired keep-lists stop counting and are removed; immutable tags are never deleted.
//!
//! Ages are made without sleeping: the server is stopped (gracefully, which also writes the
//! pulls it recorded), push times are moved into the past in its catalog (SQLite or
//! PostgreSQL), and the server is started again with the rules and a collection pass every
//! second.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use common::spack::{FixtureRepo, push_fixture, served_index};
use common::{TestServer, client, push_image, wait_until};
use serde_json::{Value, json};

const APPC: &str = "cbhp76umblq6t7nayg4dzofb4p63de3f";
const LIBB: &str = "zgl5yzcqzdnkd7scv2tq3qoi5fyw7vh3";
const LIBA: &str = "3vaqv4q37uunzetmg437xpx7ssadj3dh";
const GCC_RUNTIME: &str = "6ncciihz43s6lzi6zn52bxhu7ixu53u4";
const COMPILER_WRAPPER: &str = "dioyrijxsehyuerhuyhoobduwxjym7b3";
const DAY: i64 = 86_400;

fn write_config(dir: &Path, toml: &str) -> PathBuf {
    let path = dir.join("retention.toml");
    std::fs::write(&path, toml).expect("write config");
    path
}

async fn tags(server: &TestServer, repo: &str) -> BTreeSet<String> {
    let resp = client()
        .get(server.v2(&format!("{repo}/tags/list")))
        .send()
        .await
        .expect("GET tags");
    assert_eq!(resp.status(), 200, "tags of {repo}");
    let body: Value = resp.json().await.expect("tags JSON");
    body["tags"]
        .as_array()
        .map(|t| t.iter().filter_map(|t| t.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// Moves tags' push times `ago` seconds into the past (the server must be stopped).
fn backdate(server: &TestServer, repo: &str, tags: &[(&str, i64)]) {
    let db = server.catalog_sql();
    for (tag, ago) in tags {
        let n = db.execute(
            "UPDATE tags SET updated_at = ?3 WHERE name = ?2
                AND repo_id = (SELECT id FROM repositories WHERE name = ?1)",
            &[repo.into(), (*tag).into(), (now() - ago).into()],
        );
        assert_eq!(n, 1, "{repo}:{tag}");
    }
}

/// Runs `stowage spack prune --dry-run` with the rules in `config`; returns its lines as
/// (repository, tag) -> (digest, reason).
fn prune_preview(server: &TestServer, config: &Path) -> BTreeMap<(String, String), (String, String)> {
    let out = server
        .stowage_command(&["spack", "prune", "--dry-run"])
        .env("STOWAGE_CONFIG", config)
        .output()
        .expect("run stowage spack prune");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "prune failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            assert_eq!(f.len(), 4, "repository, tag, digest, reason: {line}");
            ((f[0].to_owned(), f[1].to_owned()), (f[2].to_owned(), f[3].to_owned()))
        })
        .collect()
}

const RULES: &str = r#"
[[gc.retention]]
repositories = ["ret/app"]
keep_last = 2
keep_tags = ["release-*"]

[[gc.retention]]
repositories = ["ret/**"]
keep_pushed_within = "1d"

[[gc.retention]]
repositories = ["pulls/*"]
keep_pulled_within = "1d"

[[gc.retention]]
repositories = ["dry/*"]
keep_last = 1
dry_run = true

[[immutable_tags]]
repositories = ["ret/lib"]
tags = ["frozen"]
"#;

#[tokio::test]
async fn rules_keep_what_they_say_and_the_preview_lists_exactly_what_goes() {
    let mut server = TestServer::start();
    let mut digests = BTreeMap::new();
    for (repo, tag) in [
        ("ret/app", "t1"),
        ("ret/app", "t2"),
        ("ret/app", "t3"),
        ("ret/app", "t4"),
        ("ret/app", "t5"),
        ("ret/app", "release-1"),
        ("ret/lib", "old"),
        ("ret/lib", "fresh"),
        ("ret/lib", "frozen"),
        ("pulls/a", "pulled"),
        ("pulls/a", "headed"),
        ("pulls/a", "unpulled"),
        ("dry/x", "a"),
        ("dry/x", "b"),
        ("other/x", "ancient"),
    ] {
        let (digest, _) = push_image(&server, repo, tag, format!("layer of {repo}:{tag}").as_bytes()).await;
        digests.insert((repo.to_owned(), tag.to_owned()), digest);
    }
    // Pulls: one by tag (GET), one by digest (HEAD).
    let http = client();
    let resp = http
        .get(server.v2("pulls/a/manifests/pulled"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 200);
    let headed = &digests[&("pulls/a".to_owned(), "headed".to_owned())];
    let resp = http
        .head(server.v2(&format!("pulls/a/manifests/{headed}")))
        .send()
        .await
        .expect("HEAD");
    assert_eq!(resp.status(), 200);

    // A graceful stop writes the recorded pulls.
    assert!(server.terminate().success());
    let pulled: Vec<(String, Option<i64>)> = server
        .catalog_sql()
        .query_rows(
            "SELECT t.name, m.pulled_at FROM tags t JOIN manifests m ON m.id = t.manifest_id
               JOIN repositories r ON r.id = t.repo_id WHERE r.name = 'pulls/a' ORDER BY t.name",
            &[],
        )
        .iter()
        .map(|r| (r[0].text().to_owned(), r[1].opt_int()))
        .collect();
    assert_eq!(pulled.len(), 3);
    for (tag, at) in &pulled {
        match tag.as_str() {
            "unpulled" => assert_eq!(*at, None, "never pulled"),
            _ => assert!(
                at.is_some_and(|at| (now() - at).abs() < 600),
                "{tag} pulled just now: {at:?}"
            ),
        }
    }

    backdate(
        &server,
        "ret/app",
        &[
            ("t1", 50 * DAY),
            ("t2", 40 * DAY),
            ("t3", 30 * DAY),
            ("t4", 20 * DAY),
            ("t5", 10 * DAY),
            ("release-1", 60 * DAY),
        ],
    );
    // `frozen` is as old as `old`, but immutable: retention never deletes it.
    backdate(&server, "ret/lib", &[("old", 10 * DAY), ("frozen", 10 * DAY)]);
    backdate(
        &server,
        "pulls/a",
        &[("pulled", 10 * DAY), ("headed", 10 * DAY), ("unpulled", 10 * DAY)],
    );
    backdate(&server, "dry/x", &[("a", 10 * DAY), ("b", 5 * DAY)]);
    backdate(&server, "other/x", &[("ancient", 1000 * DAY)]);

    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), RULES);
    let preview = prune_preview(&server, &config);
    let expected_gone = [
        ("ret/app", "t1"),
        ("ret/app", "t2"),
        ("ret/app", "t3"),
        ("ret/lib", "old"),
        ("pulls/a", "unpulled"),
    ];
    let listed: BTreeSet<(String, String)> = preview.keys().cloned().collect();
    let mut expected_listed: BTreeSet<(String, String)> = expected_gone
        .iter()
        .map(|(r, t)| (r.to_string(), t.to_string()))
        .collect();
    expected_listed.insert(("dry/x".into(), "a".into()));
    assert_eq!(listed, expected_listed, "preview: {preview:#?}");
    for (key, (digest, why)) in &preview {
        assert_eq!(digest, &digests[key], "{key:?}");
        assert!(why.starts_with("rule "), "{why}");
    }
    assert!(
        preview[&("ret/app".into(), "t3".into())]
            .1
            .contains("rule 1: not among the last 2 pushed")
    );
    assert!(
        preview[&("pulls/a".into(), "unpulled".into())]
            .1
            .contains("never pulled")
    );

    // The collector, every second, with the same rules.
    let config_env = config.to_string_lossy().into_owned();
    server.crash_and_restart_with(&[("STOWAGE_CONFIG", &config_env), ("STOWAGE_GC__INTERVAL_SECS", "1")]);
    wait_until("the rules deleted their tags", || async {
        let mut all_gone = true;
        for (repo, tag) in expected_gone {
            all_gone &= !tags(&server, repo).await.contains(tag);
        }
        all_gone
    })
    .await;
    // Everything else is still there: what the preview listed is exactly what went (apart from
    // the dry_run rule's, which only logs).
    assert_eq!(tags(&server, "ret/app").await, set(&["t4", "t5", "release-1"]));
    assert_eq!(tags(&server, "ret/lib").await, set(&["fresh", "frozen"]));
    assert_eq!(tags(&server, "pulls/a").await, set(&["pulled", "headed"]));
    assert_eq!(
        tags(&server, "dry/x").await,
        set(&["a", "b"]),
        "a dry_run rule deletes nothing"
    );
    assert_eq!(
        tags(&server, "other/x").await,
        set(&["ancient"]),
        "no rule matches other/x"
    );
    let resp = client()
        .get(server.v2("ret/app/manifests/t1"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 404, "a deleted tag is unknown");
}

async fn keep(server: &TestServer, repo: &str, body: Value) -> (u16, Value) {
    let resp = client()
        .post(format!("{}/stowage/v1/spack/{repo}/keep", server.url))
        .json(&body)
        .send()
        .await
        .expect("POST keep");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn keep_names(server: &TestServer, repo: &str) -> Vec<String> {
    let resp = client()
        .get(format!("{}/stowage/v1/spack/{repo}/keep", server.url))
        .send()
        .await
        .expect("GET keep");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("JSON");
    body["keep"]
        .as_array()
        .expect("keep")
        .iter()
        .map(|k| k["name"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn spec_tag(name: &str, version: &str, hash: &str) -> String {
    format!("{name}-{version}-{hash}.spack")
}

#[tokio::test]
async fn a_kept_environment_keeps_its_link_run_closure_and_keep_lists_expire() {
    let mut server = TestServer::start();
    let repo = "spack/cache";
    push_fixture(&server, repo, &FixtureRepo::load("http-noauth", "spack_buildcache")).await;
    let all_specs = set(&[
        &spec_tag("appc", "0.3", APPC),
        &spec_tag("libb", "2.1", LIBB),
        &spec_tag("liba", "1.0", LIBA),
        &spec_tag("gcc-runtime", "12.2.0", GCC_RUNTIME),
        &spec_tag("compiler-wrapper", "1.0", COMPILER_WRAPPER),
        "index.spack",
    ]);
    assert_eq!(tags(&server, repo).await, all_specs);

    // The environment, by its spack.lock (as text); a second list keeps the build-only sibling.
    let lockfile = json!({
        "_meta": {"file-type": "spack-lockfile", "lockfile-version": 5},
        "roots": [{"hash": APPC, "spec": "appc"}],
        "concrete_specs": {},
    })
    .to_string();
    let (status, body) = keep(
        &server,
        repo,
        json!({"name": "env", "expires_in": 3600, "lockfile": lockfile}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["hashes"], 1);
    let (status, body) = keep(
        &server,
        repo,
        json!({"name": "short", "expires_in": 3600, "hashes": [COMPILER_WRAPPER]}),
    )
    .await;
    assert_eq!(status, 201, "{body}");

    // Bad requests are refused with an OCI error.
    for (bad, code) in [
        (
            json!({"name": "x", "expires_in": 1000 * DAY, "hashes": [APPC]}),
            "MANIFEST_INVALID",
        ),
        (json!({"name": "x", "hashes": [APPC]}), "MANIFEST_INVALID"),
        (
            json!({"name": "x", "expires_at": 1, "hashes": [APPC]}),
            "MANIFEST_INVALID",
        ),
        (
            json!({"name": "x", "expires_in": 60, "hashes": ["NOT-A-HASH"]}),
            "DIGEST_INVALID",
        ),
        (json!({"name": "x", "expires_in": 60, "hashes": []}), "MANIFEST_INVALID"),
        (
            json!({"name": "x", "expires_in": 60, "lockfile": {"no": "roots"}}),
            "MANIFEST_INVALID",
        ),
        (
            json!({"name": "../x", "expires_in": 60, "hashes": [APPC]}),
            "MANIFEST_INVALID",
        ),
    ] {
        let (status, body) = keep(&server, repo, bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["errors"][0]["code"], code, "{bad}: {body}");
    }
    let (status, body) = keep(
        &server,
        "spack/nothing",
        json!({"name": "x", "expires_in": 60, "hashes": [APPC]}),
    )
    .await;
    assert_eq!(
        (status, body["errors"][0]["code"].as_str()),
        (404, Some("NAME_UNKNOWN"))
    );
    let resp = client()
        .delete(format!("{}/stowage/v1/spack/{repo}/keep/nonesuch", server.url))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(resp.status(), 404);
    assert_eq!(keep_names(&server, repo).await, ["env", "short"]);

    assert!(server.terminate().success());
    // Pushed yesterday: a tag pushed in the second a pass plans is left for the next one.
    let spec_tags: Vec<&str> = all_specs
        .iter()
        .map(String::as_str)
        .filter(|t| *t != "index.spack")
        .collect();
    backdate(&server, repo, &spec_tags.iter().map(|t| (*t, DAY)).collect::<Vec<_>>());
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(
        dir.path(),
        "[[gc.retention]]\nrepositories = [\"spack/**\"]\nkeep_tags = [\"pinned-*\"]\n",
    );
    assert!(
        prune_preview(&server, &config).is_empty(),
        "both keep-lists keep every spec"
    );
    // "short" expires (moved into the past while the server is stopped): it stops counting.
    let n = server.catalog_sql().execute(
        "UPDATE spack_keep SET expires_at = ?1 WHERE name = 'short'",
        &[(now() - 1).into()],
    );
    assert_eq!(n, 1);
    let preview = prune_preview(&server, &config);
    let sibling = spec_tag("compiler-wrapper", "1.0", COMPILER_WRAPPER);
    assert_eq!(
        preview.keys().cloned().collect::<Vec<_>>(),
        [(repo.to_owned(), sibling.clone())],
        "only the build-only sibling goes: {preview:#?}"
    );

    let config_env = config.to_string_lossy().into_owned();
    server.crash_and_restart_with(&[("STOWAGE_CONFIG", &config_env), ("STOWAGE_GC__INTERVAL_SECS", "1")]);
    wait_until("the sibling is pruned and the expired keep-list removed", || async {
        !tags(&server, repo).await.contains(&sibling) && keep_names(&server, repo).await == ["env"]
    })
    .await;
    let mut kept = all_specs.clone();
    kept.remove(&sibling);
    assert_eq!(tags(&server, repo).await, kept, "the environment's closure stays");
    // Every node the environment links or runs against is still installable from the cache.
    let resp = client()
        .get(format!("{}/stowage/v1/spack/{repo}/specs/{APPC}", server.url))
        .send()
        .await
        .expect("GET spec");
    assert_eq!(resp.status(), 200);
    let spec: Value = resp.json().await.expect("JSON");
    assert_eq!(
        spec["missing_dependencies"],
        json!([COMPILER_WRAPPER]),
        "only the build-only dependency is gone"
    );
    let (_, index) = served_index(&server, repo).await;
    assert_eq!(
        common::spack::in_buildcache(&index),
        [APPC, GCC_RUNTIME, LIBA, LIBB]
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>(),
        "the served index lists the closure"
    );

    // Without the keep-list nothing keeps the environment: it goes too, and the server's index
    // stays (empty).
    let resp = client()
        .delete(format!("{}/stowage/v1/spack/{repo}/keep/env", server.url))
        .send()
        .await
        .expect("DELETE keep");
    assert_eq!(resp.status(), 204);
    wait_until("the unkept specs are pruned", || async {
        tags(&server, repo).await == set(&["index.spack"])
    })
    .await;
    let (_, index) = served_index(&server, repo).await;
    assert!(common::spack::in_buildcache(&index).is_empty());
}

#[tokio::test]
async fn keep_lists_need_pull_to_list_and_push_to_change() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(
        dir.path(),
        r#"
[[auth.rules]]
repositories = ["**"]
users = ["*"]
actions = ["pull"]

[[auth.rules]]
repositories = ["spack/**"]
users = ["pusher"]
actions = ["pull", "push"]
"#,
    );
    let server = TestServer::start_with(&[
        ("STOWAGE_CONFIG", config.to_str().expect("utf-8 path")),
        ("STOWAGE_AUTH__ENABLED", "true"),
    ]);
    for name in ["reader", "pusher"] {
        common::run_cli(server.data_dir(), &["user", "add", name], &format!("{name}-pw\n"));
    }
    // The repository exists once something is pushed to it.
    let blob = b"a blob";
    let resp = client()
        .post(server.v2(&format!("spack/c/blobs/uploads/?digest={}", common::sha256(blob))))
        .basic_auth("pusher", Some("pusher-pw"))
        .body(blob.to_vec())
        .send()
        .await
        .expect("POST blob");
    assert_eq!(resp.status(), 201);

    let url = format!("{}/stowage/v1/spack/spack/c/keep", server.url);
    let body = json!({"name": "ci", "expires_in": 60, "hashes": [APPC]});
    let as_user = |req: reqwest::RequestBuilder, user: &str| req.basic_auth(user, Some(format!("{user}-pw")));
    let resp = client().get(&url).send().await.expect("GET");
    assert_eq!(resp.status(), 401, "anonymous clients are challenged");
    let resp = as_user(client().post(&url).json(&body), "reader")
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 403, "creating needs push");
    let err: Value = resp.json().await.expect("JSON");
    assert_eq!(err["errors"][0]["code"], "DENIED");
    let resp = as_user(client().post(&url).json(&body), "pusher")
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 201);
    let resp = as_user(client().get(&url), "reader").send().await.expect("GET");
    assert_eq!(resp.status(), 200, "listing needs pull");
    let listed: Value = resp.json().await.expect("JSON");
    assert_eq!(listed["keep"][0]["name"], "ci");
    assert_eq!(listed["keep"][0]["created_by"], "pusher");
    assert_eq!(listed["keep"][0]["hashes"], json!([APPC]));
    assert_eq!(listed["keep"][0]["expired"], false);
    let resp = as_user(client().delete(format!("{url}/ci")), "reader")
        .send()
        .await
        .expect("DELETE");
    assert_eq!(resp.status(), 403, "deleting needs push");
    let resp = as_user(client().delete(format!("{url}/ci")), "pusher")
        .send()
        .await
        .expect("DELETE");
    assert_eq!(resp.status(), 204);
}

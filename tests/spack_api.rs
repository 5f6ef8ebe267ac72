//! The Spack JSON API (`/stowage/v1/spack/…`): search (filters, keyset pages), one spec with
//! its DAG, reverse dependencies (direct, transitive, paged, refused without pull), missing
//! hashes.

mod common;

use common::spack::{FixtureRepo, push_fixture};
use common::{TestServer, client, run_cli};
use serde_json::{Value, json};

const APPC: &str = "cbhp76umblq6t7nayg4dzofb4p63de3f";
const LIBB: &str = "zgl5yzcqzdnkd7scv2tq3qoi5fyw7vh3";
const LIBA: &str = "3vaqv4q37uunzetmg437xpx7ssadj3dh";
const GCC_EXTERNAL: &str = "h4z3tnjr2qb4dfhzgezlqzgputgvwydy";
/// gcc-runtime's hash: liba, libb and appc depend on it.
const GCC_RUNTIME_PREFIX: &str = "gcc-runtime-";

async fn get(server: &TestServer, path: &str) -> (u16, Value) {
    let resp = client()
        .get(format!("{}/stowage/v1/spack/{path}", server.url))
        .send()
        .await
        .expect("GET");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("JSON body"))
}

fn names(body: &Value) -> Vec<String> {
    body["specs"]
        .as_array()
        .expect("specs")
        .iter()
        .map(|s| s["name"].as_str().unwrap_or_default().to_owned())
        .collect()
}

async fn cache() -> TestServer {
    let server = TestServer::start();
    push_fixture(
        &server,
        "spack/cache",
        &FixtureRepo::load("http-noauth", "spack_buildcache"),
    )
    .await;
    server
}

#[tokio::test]
async fn lists_and_filters_specs() {
    let server = cache().await;
    let (status, all) = get(&server, "spack/cache/specs").await;
    assert_eq!(status, 200);
    assert_eq!(names(&all), ["appc", "compiler-wrapper", "gcc-runtime", "liba", "libb"]);
    let appc = &all["specs"][0];
    assert_eq!(appc["hash"], APPC);
    assert_eq!(appc["version"], "0.3");
    assert_eq!(appc["tag"], format!("appc-0.3-{APPC}.spack"));
    assert_eq!(appc["target"], "zen2");
    assert_eq!(appc["os"], "debian12");
    assert_eq!(appc["compiler"], "gcc@12.2.0");
    assert_eq!(appc["layout_version"], 3);

    assert_eq!(names(&get(&server, "spack/cache/specs?name=libb").await.1), ["libb"]);
    assert_eq!(
        names(&get(&server, "spack/cache/specs?name=liba&version=1.0").await.1),
        ["liba"]
    );
    assert!(names(&get(&server, "spack/cache/specs?name=liba&version=9").await.1).is_empty());
    assert_eq!(names(&get(&server, "spack/cache/specs?hash=zgl5").await.1), ["libb"]);
    assert_eq!(
        names(&get(&server, "spack/cache/specs?arch=linux-debian12-zen2").await.1).len(),
        5
    );
    assert!(names(&get(&server, "spack/cache/specs?target=skylake").await.1).is_empty());
    // The compiler is the dependency providing the c/cxx/fortran virtuals; gcc-runtime only
    // has gcc as a plain build dependency, so it names none.
    assert_eq!(
        names(&get(&server, "spack/cache/specs?compiler=gcc").await.1),
        ["appc", "liba", "libb"]
    );
    assert_eq!(
        names(&get(&server, "spack/cache/specs?compiler=gcc@12.2.0").await.1).len(),
        3
    );
    assert!(names(&get(&server, "spack/cache/specs?compiler=gcc@13").await.1).is_empty());
    assert_eq!(
        names(&get(&server, "spack/cache/specs?limit=2&offset=1").await.1),
        ["compiler-wrapper", "gcc-runtime"]
    );
    // Keyset pages: `after` the last tag of a page.
    let (_, first) = get(&server, "spack/cache/specs?limit=2").await;
    assert_eq!(names(&first), ["appc", "compiler-wrapper"]);
    let last = first["specs"][1]["tag"].as_str().expect("tag").to_owned();
    let (_, second) = get(&server, &format!("spack/cache/specs?limit=2&after={last}")).await;
    assert_eq!(names(&second), ["gcc-runtime", "liba"]);
    assert_eq!(
        names(
            &get(&server, &format!("spack/cache/specs?compiler=gcc&after={last}"))
                .await
                .1
        ),
        ["liba", "libb"]
    );
}

#[tokio::test]
async fn shows_a_spec_with_its_dependencies_and_what_is_missing() {
    let server = cache().await;
    let (status, body) = get(&server, &format!("spack/cache/specs/{APPC}")).await;
    assert_eq!(status, 200);
    let spec = &body["spec"];
    assert_eq!(spec["name"], "appc");
    assert_eq!(spec["node"]["hash"], APPC);
    let deps = spec["dependencies"].as_array().expect("dependencies");
    let by_name = |n: &str| deps.iter().find(|d| d["name"] == n).cloned().unwrap_or(Value::Null);
    assert_eq!(deps.len(), 6, "the whole DAG but appc itself");
    assert_eq!(by_name("libb")["in_buildcache"], true);
    assert_eq!(by_name("libb")["deptypes"], json!(["build", "link"]));
    assert_eq!(
        by_name("liba")["deptypes"],
        Value::Null,
        "liba is an indirect dependency"
    );
    assert_eq!(by_name("gcc")["external"], true);
    assert_eq!(by_name("gcc")["in_buildcache"], false);
    assert_eq!(body["missing_dependencies"], json!([]));

    // Remove libb's image: appc's DAG now misses it.
    let resp = client()
        .delete(server.v2(&format!("spack/cache/manifests/libb-2.1-{LIBB}.spack")))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(resp.status(), 202);
    let (_, body) = get(&server, &format!("spack/cache/specs/{APPC}")).await;
    assert_eq!(body["missing_dependencies"], json!([LIBB]));
}

#[tokio::test]
async fn reports_missing_hashes_in_one_query() {
    let server = cache().await;
    let ask = json!({ "hashes": [APPC, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", LIBA, GCC_EXTERNAL] });
    let resp = client()
        .post(format!("{}/stowage/v1/spack/spack/cache/missing", server.url))
        .json(&ask)
        .send()
        .await
        .expect("POST missing");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("JSON");
    assert_eq!(
        body["missing"],
        json!(["aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", GCC_EXTERNAL])
    );

    // An unknown repository lacks everything.
    let resp = client()
        .post(format!("{}/stowage/v1/spack/no/such/missing", server.url))
        .json(&json!({ "hashes": [APPC] }))
        .send()
        .await
        .expect("POST missing");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.expect("JSON")["missing"], json!([APPC]));
}

#[tokio::test]
async fn bad_input_gets_oci_errors() {
    let server = cache().await;
    let code = |v: &Value| v["errors"][0]["code"].as_str().unwrap_or_default().to_owned();
    let (status, body) = get(&server, "spack/cache/specs?hash=NOT-A-HASH").await;
    assert_eq!((status, code(&body).as_str()), (400, "DIGEST_INVALID"));
    let (status, body) = get(&server, "spack/cache/specs?limit=-1").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = get(&server, "no/such/repo/specs").await;
    assert_eq!((status, code(&body).as_str()), (404, "NAME_UNKNOWN"));
    let (status, body) = get(&server, "spack/cache/specs/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa").await;
    assert_eq!((status, code(&body).as_str()), (404, "MANIFEST_UNKNOWN"));
    for bad in ["not json", r#"{"hashes":"x"}"#, r#"{"hashes":["UPPER"]}"#] {
        let resp = client()
            .post(format!("{}/stowage/v1/spack/spack/cache/missing", server.url))
            .body(bad)
            .send()
            .await
            .expect("POST");
        assert_eq!(resp.status(), 400, "{bad}");
    }
}

/// The hash of the spec tagged `<prefix>…` in the fixture.
fn fixture_hash(prefix: &str) -> String {
    let fixture = FixtureRepo::load("http-noauth", "spack_buildcache");
    let tag = fixture
        .spec_tags()
        .into_iter()
        .find(|t| t.starts_with(prefix))
        .expect("the fixture has that spec");
    tag.trim_end_matches(".spack")
        .rsplit('-')
        .next()
        .expect("tag ends in its hash")
        .to_owned()
}

fn dependent_names(body: &Value) -> Vec<String> {
    body["dependents"]
        .as_array()
        .expect("dependents")
        .iter()
        .map(|d| d["name"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn lists_dependents_direct_and_transitive_in_pages() {
    let server = cache().await;
    // appc -> libb -> liba: liba's only direct dependent is libb; appc depends on it through libb.
    let (status, body) = get(&server, &format!("spack/cache/specs/{LIBA}/dependents")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(dependent_names(&body), ["libb"]);
    assert_eq!(body["dependents"][0]["hash"], LIBB);
    assert_eq!(body["dependents"][0]["deptypes"], json!(["build", "link"]));
    assert_eq!(body["dependents"][0]["tag"], format!("libb-2.1-{LIBB}.spack"));
    assert_eq!(body["next"], Value::Null);
    assert_eq!(body["transitive"], false);
    let (_, body) = get(&server, &format!("spack/cache/specs/{LIBA}/dependents?transitive=1")).await;
    assert_eq!(dependent_names(&body), ["appc", "libb"]);
    assert_eq!(
        body["dependents"][0]["deptypes"],
        Value::Null,
        "appc is no direct dependent"
    );
    // Nothing depends on the root.
    let (_, body) = get(&server, &format!("spack/cache/specs/{APPC}/dependents?transitive=1")).await;
    assert!(dependent_names(&body).is_empty());

    // gcc-runtime: appc, liba and libb depend on it directly; paged one at a time, each page's
    // `next` leads to the following one and the pages together list each once.
    let runtime = fixture_hash(GCC_RUNTIME_PREFIX);
    for transitive in ["0", "1"] {
        let mut seen = Vec::new();
        let mut after = String::new();
        for _ in 0..10 {
            let (status, body) = get(
                &server,
                &format!("spack/cache/specs/{runtime}/dependents?transitive={transitive}&limit=1&after={after}"),
            )
            .await;
            assert_eq!(status, 200, "{body}");
            seen.extend(dependent_names(&body));
            match body["next"].as_str() {
                Some(next) => after = next.to_owned(),
                None => break,
            }
        }
        seen.sort();
        assert_eq!(seen, ["appc", "liba", "libb"], "transitive={transitive}");
    }

    // An external dependency the cache lacks still has its dependents listed.
    let (status, body) = get(
        &server,
        &format!("spack/cache/specs/{GCC_EXTERNAL}/dependents?transitive=1"),
    )
    .await;
    assert_eq!(status, 200);
    assert!(dependent_names(&body).contains(&"appc".to_owned()), "{body}");

    // Removing libb's image: it is no cached dependent any more.
    let resp = client()
        .delete(server.v2(&format!("spack/cache/manifests/libb-2.1-{LIBB}.spack")))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(resp.status(), 202);
    let (_, body) = get(&server, &format!("spack/cache/specs/{LIBA}/dependents")).await;
    assert!(dependent_names(&body).is_empty(), "{body}");
    let (_, body) = get(&server, &format!("spack/cache/specs/{LIBA}/dependents?transitive=1")).await;
    assert_eq!(dependent_names(&body), ["appc"]);
}

#[tokio::test]
async fn dependents_refuse_bad_input_and_unknown_hashes() {
    let server = cache().await;
    let code = |v: &Value| v["errors"][0]["code"].as_str().unwrap_or_default().to_owned();
    let (status, body) = get(&server, "spack/cache/specs/NOT-A-HASH/dependents").await;
    assert_eq!((status, code(&body).as_str()), (400, "DIGEST_INVALID"));
    let (status, body) = get(&server, &format!("spack/cache/specs/{LIBA}/dependents?limit=0")).await;
    assert_eq!(status, 400, "{body}");
    assert!(!code(&body).is_empty(), "an OCI error: {body}");
    let (status, body) = get(&server, &format!("spack/cache/specs/{LIBA}/dependents?transitive=yes")).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = get(&server, &format!("spack/cache/specs/{LIBA}/dependents?after=%3Cx%3E")).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = get(&server, "spack/cache/specs/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/dependents").await;
    assert_eq!((status, code(&body).as_str()), (404, "MANIFEST_UNKNOWN"));
    let (status, body) = get(&server, &format!("no/such/specs/{LIBA}/dependents")).await;
    assert_eq!(status, 404, "{body}");
}

#[tokio::test]
async fn dependents_need_pull_on_the_repository() {
    let mut server = cache().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("stowage.toml");
    std::fs::write(
        &config,
        r#"
[auth]
enabled = true

[[auth.rules]]
repositories = ["spack/**"]
users = ["reader"]
actions = ["pull"]
"#,
    )
    .expect("write config");
    for user in ["reader", "outsider"] {
        run_cli(server.data_dir(), &["user", "add", user], &format!("{user}-pw\n"));
    }
    server.crash_and_restart_with(&[
        ("STOWAGE_CONFIG", config.to_str().expect("utf-8 path")),
        ("STOWAGE_AUTH__ENABLED", "true"),
    ]);
    let url = format!("{}/stowage/v1/spack/spack/cache/specs/{LIBA}/dependents", server.url);
    let resp = client().get(&url).send().await.expect("GET");
    assert_eq!(resp.status(), 401, "anonymous");
    assert!(resp.headers().contains_key("www-authenticate"));
    let resp = client()
        .get(&url)
        .basic_auth("outsider", Some("outsider-pw"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 403, "a user without pull is refused");
    let body: Value = resp.json().await.expect("OCI error body");
    assert_eq!(body["errors"][0]["code"], "DENIED", "{body}");
    let resp = client()
        .get(&url)
        .basic_auth("reader", Some("reader-pw"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 200);
    assert_eq!(dependent_names(&resp.json::<Value>().await.expect("JSON")), ["libb"]);
}

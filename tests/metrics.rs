//! Prometheus metrics at `/metrics`: every family is present, and each moves when the thing it
//! counts happens (a push, a pull, an index build, a collection pass, a failed login, a token);
//! the endpoint can require a bearer secret, can live on its own address, and can be turned
//! off. Runs on the backend `STOWAGE_TEST_BACKEND` names.

mod common;

use common::spack::{FixtureRepo, push_fixture, served_index};
use common::{TestServer, client, push_blob, push_image, run_cli, sha256, wait_until};

fn base(server: &TestServer) -> String {
    server.v2("").trim_end_matches("/v2/").to_owned()
}

async fn scrape_at(url: &str) -> String {
    let resp = client().get(url).send().await.expect("GET /metrics");
    assert_eq!(resp.status(), 200, "/metrics");
    let ct = resp.headers()["content-type"]
        .to_str()
        .expect("content type")
        .to_owned();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    let text = resp.text().await.expect("body");
    assert!(text.ends_with("# EOF\n"), "a complete exposition");
    text
}

async fn scrape(server: &TestServer) -> String {
    scrape_at(&format!("{}/metrics", base(server))).await
}

/// The sum of the samples of series `name` whose labels contain every one of `labels`
/// (`key="value"` each); `None` when there is no such sample.
fn value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, v) = line.rsplit_once(' ').expect("sample line");
        let (n, l) = series.split_once('{').unwrap_or((series, ""));
        if n == name && labels.iter().all(|want| l.contains(want)) {
            *found.get_or_insert(0.0) += v.parse::<f64>().expect("sample value");
        }
    }
    found
}

fn has_family(text: &str, family: &str) -> bool {
    text.lines().any(|l| l.starts_with(&format!("# TYPE {family} ")))
}

/// Every family the README documents.
const FAMILIES: &[&str] = &[
    "registry_http_requests",
    "registry_http_request_duration_seconds",
    "registry_http_in_flight_requests",
    "registry_storage_action_seconds",
    "stowage_blob_uploaded_bytes",
    "stowage_blob_downloaded_bytes",
    "stowage_upload_sessions_open",
    "stowage_upload_memory_limit_bytes",
    "stowage_upload_memory_reserved_bytes",
    "stowage_upload_memory_peak_bytes",
    "stowage_upload_memory_pooled_bytes",
    "stowage_upload_memory_waits",
    "stowage_upload_memory_timeouts",
    "stowage_repositories",
    "stowage_blobs",
    "stowage_manifests",
    "stowage_stored_bytes",
    "stowage_catalog_write_queue_depth",
    "stowage_catalog_commit_seconds",
    "stowage_catalog_commit_failures",
    "stowage_catalog_statement_reprepares",
    "stowage_blocking_tasks_in_flight",
    "stowage_blocking_tasks",
    "stowage_auth_failed_logins",
    "stowage_auth_tokens_issued",
    "stowage_gc_passes",
    "stowage_gc_pass_duration_seconds",
    "stowage_gc_freed_bytes",
    "stowage_gc_deleted",
    "stowage_gc_last_pass_timestamp_seconds",
    "stowage_spack_index_builds",
    "stowage_spack_index_build_duration_seconds",
    "stowage_spack_specs",
    "stowage_spack_index_generation_lag",
    "stowage_log_lines_dropped",
    "stowage_proxy_upstream_requests",
    "stowage_proxy_stale_serves",
    "stowage_proxy_evictions",
    "stowage_proxy_cached_bytes",
];

#[tokio::test]
async fn every_family_is_present_and_moves_with_pushes_pulls_builds_and_collection() {
    let server = TestServer::start_with(&[
        ("STOWAGE_GC__INTERVAL_SECS", "1"),
        // Long enough for a push's blobs to be referenced by its manifest before a pass.
        ("STOWAGE_GC__GRACE_SECS", "5"),
    ]);
    let before = scrape(&server).await;
    let uploaded0 = value(&before, "stowage_blob_uploaded_bytes_total", &[]).unwrap_or(0.0);

    // A push: upload bytes, storage actions, catalog commits, manifest PUT requests.
    let layer = vec![7u8; 300_000];
    push_image(&server, "metrics/app", "v1", &layer).await;
    let digest = sha256(&layer);
    let text = scrape(&server).await;
    assert!(value(&text, "stowage_blob_uploaded_bytes_total", &[]).unwrap_or(0.0) >= uploaded0 + 300_000.0);
    let puts = value(
        &text,
        "registry_http_requests_total",
        &["method=\"put\"", "code=\"201\"", "handler=\"manifest\""],
    );
    assert_eq!(puts, Some(1.0), "one manifest PUT counted:\n{text}");
    assert!(
        value(
            &text,
            "registry_http_request_duration_seconds_count",
            &["handler=\"blob_upload\""]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    for action in ["publish", "stat"] {
        assert!(
            value(
                &text,
                "registry_storage_action_seconds_count",
                &[&format!("action=\"{action}\"")]
            )
            .unwrap_or(0.0)
                >= 1.0,
            "storage action {action}:\n{text}"
        );
    }
    assert!(value(&text, "stowage_catalog_commit_seconds_count", &[]).unwrap_or(0.0) >= 1.0);
    assert!(value(&text, "stowage_blocking_tasks_total", &[]).unwrap_or(0.0) >= 1.0);
    assert_eq!(
        value(&text, "registry_http_in_flight_requests", &["handler=\"manifest\""]),
        Some(0.0)
    );
    // Catalog counts, read when scraped at most every 5 s.
    wait_until("the catalog counts show the image", || async {
        let text = scrape(&server).await;
        value(&text, "stowage_manifests", &[]) == Some(1.0)
            && value(&text, "stowage_blobs", &[]) == Some(2.0)
            && value(&text, "stowage_repositories", &[]) == Some(1.0)
            && value(&text, "stowage_stored_bytes", &[]).unwrap_or(0.0) >= 300_000.0
    })
    .await;

    // A pull: bytes downloaded, counted as sent.
    let got = client()
        .get(server.v2(&format!("metrics/app/blobs/{digest}")))
        .send()
        .await
        .expect("GET blob")
        .bytes()
        .await
        .expect("body");
    assert_eq!(got.len(), layer.len());
    let text = scrape(&server).await;
    assert!(value(&text, "stowage_blob_downloaded_bytes_total", &[]).unwrap_or(0.0) >= 300_000.0);
    assert!(value(&text, "registry_storage_action_seconds_count", &["action=\"get\""]).unwrap_or(0.0) >= 1.0);

    // Garbage: a blob nothing references, and a re-pushed tag's old manifest and layer.
    let orphan = push_blob(&server, "metrics/app", b"nobody references this").await;
    push_image(&server, "metrics/app", "v1", &[8u8; 1000]).await;
    wait_until("a pass collects the old image and the lone blob", || async {
        let text = scrape(&server).await;
        value(&text, "stowage_gc_deleted_total", &["kind=\"manifest\""]).unwrap_or(0.0) >= 1.0
            && value(&text, "stowage_gc_deleted_total", &["kind=\"blob\""]).unwrap_or(0.0) >= 2.0
    })
    .await;
    assert_eq!(
        client()
            .head(server.v2(&format!("metrics/app/blobs/{orphan}")))
            .send()
            .await
            .expect("HEAD")
            .status(),
        404
    );
    let text = scrape(&server).await;
    assert!(value(&text, "stowage_gc_passes_total", &["kind=\"ok\""]).unwrap_or(0.0) >= 1.0);
    assert!(value(&text, "stowage_gc_pass_duration_seconds_count", &[]).unwrap_or(0.0) >= 1.0);
    assert!(value(&text, "stowage_gc_freed_bytes_total", &[]).unwrap_or(0.0) >= 300_000.0);
    assert!(value(&text, "stowage_gc_last_pass_timestamp_seconds", &[]).unwrap_or(0.0) > 1.7e9);
    assert!(value(&text, "registry_http_requests_total", &["handler=\"ops\""]).unwrap_or(0.0) >= 1.0);
    // A family with labels appears once it has a series: these have theirs in the other
    // tests (tokens need auth on, Spack series a build cache, proxy series an upstream:
    // `tests/proxy.rs`).
    for family in FAMILIES.iter().filter(|f| {
        !f.starts_with("stowage_spack_") && !f.starts_with("stowage_proxy_") && **f != "stowage_auth_tokens_issued"
    }) {
        assert!(has_family(&text, family), "family {family} missing:\n{text}");
    }
    // Nothing is labelled by digest or tag.
    assert!(!text.contains("sha256:"), "no digest in any label");
    assert!(!text.contains("v1\""), "no tag in any label");
}

/// Index builds, and the catalog-derived Spack gauges: specs per repository and the generation
/// lag, which a push raises and the next index read (the build) clears.
#[tokio::test]
async fn spack_specs_and_generation_lag_per_repository() {
    let server = TestServer::start();
    let fixture = FixtureRepo::load("http-noauth", "spack_buildcache");
    push_fixture(&server, "cache/one", &fixture).await;
    let specs = fixture.spec_tags().len() as f64;
    assert!(specs > 0.0);
    // The gauges are read from the catalog at most every 5 s: poll until they show.
    wait_until("the specs of cache/one are counted", || async {
        let text = scrape(&server).await;
        value(&text, "stowage_spack_specs", &["repository=\"cache/one\""]) == Some(specs)
            && value(
                &text,
                "stowage_spack_index_generation_lag",
                &["repository=\"cache/one\""],
            )
            .unwrap_or(0.0)
                >= 1.0
    })
    .await;
    served_index(&server, "cache/one").await;
    let text = scrape(&server).await;
    for family in FAMILIES.iter().filter(|f| f.starts_with("stowage_spack_")) {
        assert!(has_family(&text, family), "family {family} missing:\n{text}");
    }
    assert_eq!(value(&text, "stowage_spack_index_builds_total", &[]), Some(1.0));
    assert_eq!(
        value(&text, "stowage_spack_index_build_duration_seconds_count", &[]),
        Some(1.0)
    );
    wait_until("the built index clears the lag", || async {
        let text = scrape(&server).await;
        value(
            &text,
            "stowage_spack_index_generation_lag",
            &["repository=\"cache/one\""],
        ) == Some(0.0)
    })
    .await;
}

#[tokio::test]
async fn failed_logins_and_issued_tokens_are_counted() {
    let server = TestServer::start_with(&[("STOWAGE_AUTH__ENABLED", "true")]);
    run_cli(server.data_dir(), &["user", "add", "ci"], "a long enough password\n");
    let base = base(&server);
    let token = |user: &'static str, password: &'static str| {
        let url = format!("{base}/token?service=stowage&scope=repository:x/y:pull");
        async move {
            client()
                .get(url)
                .basic_auth(user, Some(password))
                .send()
                .await
                .expect("GET /token")
                .status()
                .as_u16()
        }
    };
    assert_eq!(token("ci", "wrong password").await, 401);
    assert_eq!(token("ci", "a long enough password").await, 200);
    let text = scrape(&server).await;
    assert!(has_family(&text, "stowage_auth_tokens_issued"));
    assert_eq!(
        value(&text, "stowage_auth_failed_logins_total", &[]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "stowage_auth_tokens_issued_total", &["kind=\"registry\""]),
        Some(1.0)
    );
    assert!(
        value(
            &text,
            "registry_http_requests_total",
            &["handler=\"token\"", "code=\"401\""]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    // The failed login reaches the audit trail through its own write path; the queue gauge
    // counts that job too, so it is back at 0 (never below) once the row is written.
    wait_until("the failed login is in the audit trail", || async {
        let out = run_cli(server.data_dir(), &["audit", "--json"], "");
        String::from_utf8_lossy(&out.stdout).contains("login.failed")
    })
    .await;
    let text = scrape(&server).await;
    assert_eq!(
        value(&text, "stowage_catalog_write_queue_depth", &[]),
        Some(0.0),
        "{text}"
    );
}

#[tokio::test]
async fn a_token_file_makes_metrics_need_the_bearer_secret() {
    let dir = tempfile::tempdir().expect("temp dir");
    let secret = "prometheus-scrape-secret-0123456789";
    let file = dir.path().join("metrics-token");
    std::fs::write(&file, format!("{secret}\n")).expect("write secret");
    let server = TestServer::start_with(&[("STOWAGE_METRICS__TOKEN_FILE", file.to_str().expect("utf-8"))]);
    let url = format!("{}/metrics", base(&server));
    let anonymous = client().get(&url).send().await.expect("GET");
    assert_eq!(anonymous.status(), 401);
    let body: serde_json::Value = anonymous.json().await.expect("OCI error body");
    assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED");
    let wrong = client()
        .get(&url)
        .bearer_auth("not-the-secret")
        .send()
        .await
        .expect("GET");
    assert_eq!(wrong.status(), 401);
    let right = client().get(&url).bearer_auth(secret).send().await.expect("GET");
    assert_eq!(right.status(), 200);
    assert!(right.text().await.expect("body").contains("registry_http_requests"));
}

/// A free port on 127.0.0.1 (released again at once: the server binds it next).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[tokio::test]
async fn metrics_can_live_on_their_own_address_or_be_turned_off() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let server = TestServer::start_with(&[("STOWAGE_METRICS__LISTEN", &listen)]);
    let main = client()
        .get(format!("{}/metrics", base(&server)))
        .send()
        .await
        .expect("GET");
    assert_eq!(main.status(), 404, "not on the main listener");
    push_image(&server, "side/app", "v1", b"layer").await;
    let text = scrape_at(&format!("http://{listen}/metrics")).await;
    assert_eq!(
        value(
            &text,
            "registry_http_requests_total",
            &["method=\"put\"", "handler=\"manifest\""]
        ),
        Some(1.0),
        "counts the main listener's requests"
    );
    let ready = client()
        .get(format!("http://{listen}/readyz"))
        .send()
        .await
        .expect("GET");
    assert_eq!(ready.status(), 200, "probes on the metrics listener too");
    drop(server);

    let off = TestServer::start_with(&[("STOWAGE_METRICS__ENABLED", "false")]);
    let resp = client()
        .get(format!("{}/metrics", base(&off)))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 404);
}

#[test]
fn an_empty_token_file_stops_the_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("metrics-token");
    std::fs::write(&file, "\n").expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stowage"))
        .arg("serve")
        .env("STOWAGE_LISTEN", "127.0.0.1:0")
        .env("STOWAGE_DATA_DIR", dir.path().join("data"))
        .env("STOWAGE_METRICS__TOKEN_FILE", &file)
        .output()
        .expect("run stowage");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("metrics.token_file"), "{err}");
}

/// The Grafana dashboard in `contrib/grafana/stowage.json` queries only series that exist:
/// each metric name in its expressions is one of the families above, with the suffix its type
/// gives (`_total`, `_bucket`, `_sum`, `_count`), and every family is on some panel.
#[test]
fn the_grafana_dashboard_queries_only_series_that_exist() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/grafana/stowage.json");
    let dashboard: serde_json::Value = serde_json::from_slice(&std::fs::read(path).expect("dashboard")).expect("JSON");
    let mut used = std::collections::BTreeSet::new();
    let panels = dashboard["panels"].as_array().expect("panels");
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            for (start, _) in expr.match_indices(['r', 's']) {
                let rest = &expr[start..];
                if !(rest.starts_with("registry_") || rest.starts_with("stowage_"))
                    || expr[..start].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
                {
                    continue;
                }
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let family = ["_total", "_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| FAMILIES.contains(f)))
                    .or_else(|| FAMILIES.iter().copied().find(|f| *f == name))
                    .unwrap_or_else(|| panic!("panel {:?} queries unknown series {name}", panel["title"]));
                used.insert(family.to_owned());
            }
        }
    }
    for family in FAMILIES {
        assert!(used.contains(*family), "no panel shows {family}");
    }
}

/// The catalog's cached statements stay prepared: a workload of pushes (by tag and by digest,
/// a Spack build cache) and many pulls (manifests by tag and digest, blob HEADs, tag lists,
/// referrers, the Spack index) leaves `stowage_catalog_statement_reprepares_total` at 0. A
/// query whose plan depends on what is bound to it would be parsed and planned again on every
/// run (it was, for every join, before the planner stability guarantee was turned on), and
/// the counter would show hundreds here.
#[tokio::test]
async fn hot_catalog_queries_are_never_prepared_again() {
    let server = TestServer::start();
    let mut images = Vec::new();
    for (repo, tag) in [("hot/a", "v1"), ("hot/a", "v2"), ("hot/b", "v1"), ("hot/b", "latest")] {
        let layer = format!("{repo}:{tag}").repeat(100).into_bytes();
        let (manifest_digest, _) = push_image(&server, repo, tag, &layer).await;
        images.push((repo, tag, manifest_digest, sha256(&layer)));
    }
    let fixture = FixtureRepo::load("http-noauth", "spack_buildcache");
    push_fixture(&server, "hot/spack", &fixture).await;
    served_index(&server, "hot/spack").await;

    // Enough reads for every reader thread to count its statements several times over.
    let c = client();
    let mut rounds = futures_util::StreamExt::buffer_unordered(
        futures_util::StreamExt::map(futures_util::stream::iter(0..2_000usize), |i| {
            let c = c.clone();
            let (repo, tag, manifest, blob) = images[i % images.len()].clone();
            let url = match i % 6 {
                0 => server.v2(&format!("{repo}/manifests/{tag}")),
                1 => server.v2(&format!("{repo}/manifests/{manifest}")),
                2 => server.v2(&format!("{repo}/blobs/{blob}")),
                3 => server.v2(&format!("{repo}/tags/list")),
                4 => server.v2(&format!("{repo}/referrers/{manifest}")),
                _ => server.v2("hot/spack/manifests/index.spack"),
            };
            async move {
                let req = if i % 6 == 2 { c.head(&url) } else { c.get(&url) };
                let status = req
                    .header("accept", "application/vnd.oci.image.manifest.v1+json")
                    .send()
                    .await
                    .expect("request")
                    .status();
                assert!(status.is_success(), "{url}: {status}");
            }
        }),
        8,
    );
    while futures_util::StreamExt::next(&mut rounds).await.is_some() {}
    // A few more pushes after the reads, so the writer's statements run again too.
    for tag in ["v3", "v4", "v5"] {
        push_image(&server, "hot/a", tag, b"one more").await;
    }

    let text = scrape(&server).await;
    assert_eq!(
        value(&text, "stowage_catalog_statement_reprepares_total", &[]),
        Some(0.0),
        "cached catalog statements were prepared again:\n{text}"
    );
}

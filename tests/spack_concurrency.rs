//! Many Spack clients at once: the server-maintained index never loses or invents a spec.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::spack::{in_buildcache, served_index, spec_hash};
use common::{TestServer, client, sha256};
use serde_json::json;
use tokio::sync::{Mutex, mpsc};

const SPECS: usize = 1000;
const PUSHERS: usize = 32;
const CHAOS: usize = 4;
/// Specs 0..SHARED are dependencies of all the others.
const SHARED: usize = 50;

fn node(i: usize) -> serde_json::Value {
    let mut deps = vec![json!({"name": "glibc", "hash": "glibcglibcglibcglibcglibcglibc22",
                               "parameters": {"deptypes": ["link"], "virtuals": ["libc"]}})];
    if i >= SHARED {
        deps.push(
            json!({"name": format!("pkg{}", i % SHARED), "hash": spec_hash(i % SHARED),
                         "parameters": {"deptypes": ["build", "link"], "virtuals": []}}),
        );
    }
    // Real nodes carry variants and more; the padding also takes the index past the 1 MiB
    // pieces the server streams it in.
    json!({"name": format!("pkg{i}"), "version": "1.0",
           "arch": {"platform": "linux", "platform_os": "debian12", "target": "x86_64"},
           "parameters": {"build_system": "generic", "cflags": [], "note": format!("{i:0>1000}")},
           "namespace": "builtin", "dependencies": deps, "hash": spec_hash(i)})
}

fn glibc() -> serde_json::Value {
    json!({"name": "glibc", "version": "2.36", "arch": {"platform": "linux", "platform_os": "debian12",
           "target": "x86_64"}, "external": {"path": "/usr"}, "hash": "glibcglibcglibcglibcglibcglibc22"})
}

fn tag(i: usize) -> String {
    format!("pkg{i}-1.0-{}.spack", spec_hash(i))
}

/// Pushes spec `i` (layer, config, manifest) as Spack does; `round` changes the config bytes
/// (like `archive_timestamp` on a `--force` re-push).
async fn push_spec(server: &TestServer, http: &reqwest::Client, i: usize, round: u32) {
    let layer = format!("layer of pkg{i}").into_bytes();
    let layer_digest = sha256(&layer);
    let mut nodes = vec![node(i)];
    if i >= SHARED {
        nodes.push(node(i % SHARED));
    }
    nodes.push(glibc());
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": []}, "config": {"Env": []},
        "spec": {"_meta": {"version": 5}, "nodes": nodes},
        "buildcache_layout_version": 3,
        "binary_cache_checksum": {"hash_algorithm": "sha256", "hash": &layer_digest[7..]},
        "archive_timestamp": format!("round {round}"),
    }))
    .expect("config");
    let config_digest = sha256(&config);
    for (digest, body) in [(&layer_digest, layer.clone()), (&config_digest, config.clone())] {
        let resp = http
            .post(server.v2(&format!("spack/race/blobs/uploads/?digest={digest}")))
            .body(body)
            .send()
            .await
            .expect("POST blob");
        assert_eq!(resp.status(), 201);
    }
    let manifest = serde_json::to_vec(&json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer.len()}],
    }))
    .expect("manifest");
    let resp = http
        .put(server.v2(&format!("spack/race/manifests/{}", tag(i))))
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest)
        .send()
        .await
        .expect("PUT manifest");
    assert_eq!(resp.status(), 201, "push of spec {i}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_pushes_deletes_and_repushes_keep_the_index_exact() {
    let server = Arc::new(TestServer::start());
    let http = client();
    // Shared dependencies first, as a real pipeline would have them.
    for i in 0..SHARED {
        push_spec(&server, &http, i, 0).await;
    }

    let next = Arc::new(AtomicUsize::new(SHARED));
    let (to_chaos, chaos_rx) = mpsc::unbounded_channel::<usize>();
    let chaos_rx = Arc::new(Mutex::new(chaos_rx));
    let deleted = |i: usize| i.is_multiple_of(20) && i >= SHARED;
    let repushed = |i: usize| i % 20 == 1 && i >= SHARED;

    let mut tasks = Vec::new();
    for _ in 0..PUSHERS {
        let (server, http, next, to_chaos) = (server.clone(), http.clone(), next.clone(), to_chaos.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= SPECS {
                    break;
                }
                push_spec(&server, &http, i, 0).await;
                if deleted(i) || repushed(i) {
                    let _ = to_chaos.send(i);
                }
            }
        }));
    }
    drop(to_chaos);
    for _ in 0..CHAOS {
        let (server, http, rx) = (server.clone(), http.clone(), chaos_rx.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(i) = rx.lock().await.recv().await else { break };
                if deleted(i) {
                    let resp = http
                        .delete(server.v2(&format!("spack/race/manifests/{}", tag(i))))
                        .send()
                        .await
                        .expect("DELETE");
                    assert_eq!(resp.status(), 202, "delete of spec {i}");
                } else {
                    push_spec(&server, &http, i, 1).await;
                }
                // Readers build the index while writers keep changing it.
                let resp = http
                    .get(server.v2("spack/race/manifests/index.spack"))
                    .send()
                    .await
                    .expect("GET index");
                assert_eq!(resp.status(), 200);
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }

    let expected: BTreeSet<String> = (0..SPECS).filter(|&i| !deleted(i)).map(spec_hash).collect();
    let (manifest, index) = served_index(&server, "spack/race").await;
    let index_size = manifest["layers"][0]["size"].as_u64().expect("index size");
    assert!(
        index_size > 1024 * 1024,
        "the index spans several streamed pieces: {index_size} bytes"
    );
    let listed: BTreeSet<String> = in_buildcache(&index).into_iter().collect();
    assert_eq!(listed.len(), expected.len(), "no spec missing or extra");
    assert_eq!(listed, expected);
    let installs = index["database"]["installs"].as_object().expect("installs");
    assert_eq!(installs["glibcglibcglibcglibcglibcglibc22"]["in_buildcache"], false);
    assert_eq!(
        installs["glibcglibcglibcglibcglibcglibc22"]["ref_count"],
        expected.len()
    );
    assert_eq!(installs.len(), expected.len() + 1);

    let tags: serde_json::Value = http
        .get(server.v2("spack/race/tags/list"))
        .send()
        .await
        .expect("tags/list")
        .json()
        .await
        .expect("tags JSON");
    let spec_tags: BTreeSet<String> = tags["tags"]
        .as_array()
        .expect("tags")
        .iter()
        .filter_map(|t| t.as_str())
        .filter(|t| *t != "index.spack")
        .map(str::to_owned)
        .collect();
    let expected_tags: BTreeSet<String> = (0..SPECS).filter(|&i| !deleted(i)).map(tag).collect();
    assert_eq!(spec_tags, expected_tags, "tags/list agrees with the index");
}

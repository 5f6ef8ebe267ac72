//! Spack fixtures: repositories and request logs captured from real Spack against CNCF
//! Distribution (see tests/fixtures/spack-oci/README.md), loaded and pushed for replay.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{TestServer, client, sha256};

/// `tests/fixtures/spack-oci`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spack-oci")
}

/// One repository as Spack left it in the registry the fixtures were captured from.
pub struct FixtureRepo {
    pub dir: PathBuf,
    /// tag -> (manifest bytes, served content type)
    pub manifests: BTreeMap<String, (Vec<u8>, String)>,
    /// digest -> bytes
    pub blobs: BTreeMap<String, Vec<u8>>,
}

impl FixtureRepo {
    /// Loads `registries/<mode>/<repo>`, e.g. `("http-noauth", "spack_buildcache")`.
    pub fn load(mode: &str, repo: &str) -> FixtureRepo {
        let dir = fixtures().join("registries").join(mode).join(repo);
        let summary: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("summary.json")).expect("summary.json")).expect("summary");
        let mut manifests = BTreeMap::new();
        for (tag, info) in summary["tags"].as_object().expect("tags") {
            let body = std::fs::read(dir.join("manifests").join(format!("{tag}.json"))).expect("manifest file");
            let ct = info["content_type"].as_str().expect("content_type").to_owned();
            assert_eq!(
                sha256(&body),
                info["manifest_digest"].as_str().expect("digest"),
                "fixture {tag}"
            );
            manifests.insert(tag.clone(), (body, ct));
        }
        let mut blobs = BTreeMap::new();
        for entry in std::fs::read_dir(dir.join("blobs")).expect("blobs dir") {
            let path = entry.expect("entry").path();
            let data = std::fs::read(&path).expect("blob");
            let digest = sha256(&data);
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
            assert!(
                name.starts_with(&digest.replace(':', "-")),
                "fixture blob {name} has digest {digest}"
            );
            blobs.insert(digest, data);
        }
        FixtureRepo { dir, manifests, blobs }
    }

    /// The index blob Spack built for this repository, if it has one, as JSON.
    pub fn spack_index(&self) -> Option<serde_json::Value> {
        let (body, _) = self.manifests.get("index.spack")?;
        let manifest: serde_json::Value = serde_json::from_slice(body).expect("index manifest");
        let digest = manifest["layers"][0]["digest"].as_str().expect("index layer");
        Some(serde_json::from_slice(&self.blobs[digest]).expect("index json"))
    }

    /// Tags that name spec images, as Spack's `tag_is_spec` has it.
    pub fn spec_tags(&self) -> Vec<String> {
        self.manifests
            .keys()
            .filter(|t| t.ends_with(".spack") && *t != "index.spack")
            .cloned()
            .collect()
    }
}

/// Pushes every blob, then every manifest but `index.spack`, of a fixture repository into `repo`.
pub async fn push_fixture(server: &TestServer, repo: &str, fixture: &FixtureRepo) {
    let http = client();
    for (digest, data) in &fixture.blobs {
        let resp = http
            .post(server.v2(&format!("{repo}/blobs/uploads/?digest={digest}")))
            .body(data.clone())
            .send()
            .await
            .expect("POST blob");
        assert_eq!(resp.status(), 201, "blob {digest}");
    }
    // Image manifests before the indexes that may list them (base images).
    let mut order: Vec<_> = fixture.manifests.iter().filter(|(t, _)| *t != "index.spack").collect();
    order.sort_by_key(|(_, (body, _))| body.windows(11).any(|w| w == b"\"manifests\""));
    for (tag, (body, ct)) in order {
        let resp = http
            .put(server.v2(&format!("{repo}/manifests/{tag}")))
            .header("Content-Type", ct.as_str())
            .body(body.clone())
            .send()
            .await
            .expect("PUT manifest");
        assert_eq!(resp.status(), 201, "manifest {tag}");
    }
}

/// Fetches the index Stowage serves for `repo`: the `index.spack` manifest, then its layer.
pub async fn served_index(server: &TestServer, repo: &str) -> (serde_json::Value, serde_json::Value) {
    let http = client();
    let resp = http
        .get(server.v2(&format!("{repo}/manifests/index.spack")))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .expect("GET index.spack");
    assert_eq!(resp.status(), 200, "index.spack manifest");
    let manifest: serde_json::Value = resp.json().await.expect("manifest json");
    let digest = manifest["layers"][0]["digest"]
        .as_str()
        .expect("layer digest")
        .to_owned();
    let resp = http
        .get(server.v2(&format!("{repo}/blobs/{digest}")))
        .send()
        .await
        .expect("GET index blob");
    assert_eq!(resp.status(), 200, "index blob");
    assert!(
        resp.headers().get("content-encoding").is_none(),
        "index blob is served raw"
    );
    let bytes = resp.bytes().await.expect("index bytes");
    assert_eq!(sha256(&bytes), digest, "index blob digest");
    (manifest, serde_json::from_slice(&bytes).expect("index is JSON"))
}

/// Hashes listed with `in_buildcache: true` in an index.
pub fn in_buildcache(index: &serde_json::Value) -> Vec<String> {
    let mut v: Vec<String> = index["database"]["installs"]
        .as_object()
        .expect("installs")
        .iter()
        .filter(|(_, r)| r["in_buildcache"] == serde_json::Value::Bool(true))
        .map(|(h, _)| h.clone())
        .collect();
    v.sort();
    v
}

/// A Spack-style 32-character hash (Spack's base32 alphabet) for spec `i`, the same for the
/// same `i`.
pub fn spec_hash(i: usize) -> String {
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

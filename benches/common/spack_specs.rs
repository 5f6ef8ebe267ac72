//! Synthetic Spack spec images, shared by the benchmarks (`spack`, `ui`): spec `i` is package
//! `pkg{i}@1.0`, a ~1 KiB node each, its DAG holding two shared dependencies (among the first
//! [`SHARED`] specs) and an external `glibc`, pushed as Spack pushes (layer and config blobs,
//! then the manifest under its `.spack` tag). Deterministic: the same `i` gives the same bytes.

use serde_json::json;
use sha2::Digest as _;

/// Specs `0..SHARED` are the dependencies every later spec shares.
pub const SHARED: usize = 100;

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

pub fn hash(i: usize) -> String {
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

const GLIBC: &str = "glibcglibcglibcglibcglibcglibc22";

fn node(i: usize) -> serde_json::Value {
    let mut deps = vec![json!({"name":"glibc","hash":GLIBC,"parameters":{"deptypes":["link"],"virtuals":["libc"]}})];
    if i >= SHARED {
        for d in [i % SHARED, (i / 7) % SHARED] {
            deps.push(json!({"name":format!("pkg{d}"),"hash":hash(d),"parameters":{"deptypes":["build","link"],"virtuals":[]}}));
        }
    }
    json!({"name":format!("pkg{i}"),"version":"1.0",
           "arch":{"platform":"linux","platform_os":"debian12","target":{"name":"zen2","vendor":"AuthenticAMD",
             "features":["avx","avx2","bmi1","bmi2","fma","sse4_1","sse4_2"],"generation":0,"parents":["zen"]}},
           "namespace":"builtin","parameters":{"build_system":"autotools","cflags":[],"cppflags":[],"cxxflags":[],
             "fflags":[],"ldflags":[],"ldlibs":[]},
           "package_hash":"q2rk2ibjyixyovjks3huspa2gqfkl7b2q2l4efx54262chl3icjq====",
           "dependencies":deps,"annotations":{"original_specfile_version":5},"hash":hash(i)})
}

/// What Spack uploads for one spec.
pub struct SpecImage {
    /// `(digest, bytes)` of the layer and the config.
    pub blobs: Vec<(String, Vec<u8>)>,
    pub tag: String,
    pub manifest: Vec<u8>,
}

/// Blobs and manifest of spec `i`.
pub fn spec_image(i: usize) -> SpecImage {
    let layer = format!("tarball of pkg{i}").into_bytes();
    let mut nodes = vec![node(i)];
    if i >= SHARED {
        nodes.push(node(i % SHARED));
        if (i / 7) % SHARED != i % SHARED {
            nodes.push(node((i / 7) % SHARED));
        }
    }
    nodes.push(
        json!({"name":"glibc","version":"2.36","arch":{"platform":"linux","platform_os":"debian12",
        "target":"x86_64"},"external":{"path":"/usr"},"hash":GLIBC}),
    );
    let config = serde_json::to_vec(&json!({"architecture":"amd64","os":"linux",
        "rootfs":{"type":"layers","diff_ids":[]},"config":{"Env":[]},
        "spec":{"_meta":{"version":5},"nodes":nodes},"buildcache_layout_version":3,
        "binary_cache_checksum":{"hash_algorithm":"sha256","hash":&sha256(&layer)[7..]}}))
    .expect("config");
    let manifest = serde_json::to_vec(&json!({"mediaType":"application/vnd.oci.image.manifest.v1+json","schemaVersion":2,
        "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":sha256(&config),"size":config.len()},
        "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":sha256(&layer),"size":layer.len()}]}))
    .expect("manifest");
    let tag = format!("pkg{i}-1.0-{}.spack", hash(i));
    SpecImage {
        blobs: vec![(sha256(&layer), layer), (sha256(&config), config)],
        tag,
        manifest,
    }
}

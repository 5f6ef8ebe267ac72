//! Real registry clients round-tripping content through a real `stowage serve`:
//!
//! * `skopeo` (Debian package): copies a multi-layer OCI image layout into the registry and back
//!   out again, byte for byte, plus `inspect`, `list-tags`, retagging, cross-repository copies and
//!   a multi-platform index.
//! * the ORAS Python SDK (PyPI package `oras`): `tests/clients/oras_roundtrip.py` pushes artifacts
//!   and referrers and checks the referrers API.
//! * the `oci-client` crate: push, pull, tags, manifests, configs and referrers from Rust.
//!
//! The external tools are installed by `scripts/test`. When one is missing these tests FAIL with a
//! message saying so: they never pass without having talked to the server.

mod common;

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{TestServer, sha256};
use serde_json::{Value, json};

/// How long one external client command may take before the test gives up on it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

// ---------------------------------------------------------------------------------------------
// External tools
// ---------------------------------------------------------------------------------------------

/// Finds `name` on `PATH`, or fails the test saying how to get it.
fn require_tool(name: &str, how: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "required client tool `{name}` is not installed (not found on PATH). \
         `scripts/test` installs it ({how}); these tests never skip a missing client."
    );
}

/// The Python interpreter that has the `oras` package: `$ORAS_TEST_PYTHON` or `python3`.
fn require_python_with_oras() -> String {
    let python = std::env::var("ORAS_TEST_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let out = Command::new(&python)
        .args([
            "-c",
            "import oras.client, oras.version; print(oras.version.__version__)",
        ])
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(out) if out.status.success() => python,
        Ok(out) => panic!(
            "the Python package `oras` is not importable with `{python}`: {}\n\
             `scripts/test` installs it (pip install oras); set ORAS_TEST_PYTHON to pick \
             another interpreter. These tests never skip a missing client.",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "cannot run `{python}` ({e}); `scripts/test` installs Python's `oras` package. \
             These tests never skip a missing client."
        ),
    }
}

/// Runs `cmd` (stdin closed) with a time limit; fails the test if it does not finish in time or
/// exits non-zero, showing what it printed.
fn run(cmd: &mut Command) -> Output {
    let out = run_unchecked(cmd);
    assert!(
        out.status.success(),
        "command failed ({}): {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Like [`run`], but returns the output whatever the exit status.
fn run_unchecked(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(COMMAND_TIMEOUT) {
        Ok(out) => out.unwrap_or_else(|e| panic!("waiting for {cmd:?}: {e}")),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("{cmd:?} did not finish within {COMMAND_TIMEOUT:?}");
        }
    }
}

/// `skopeo` with the options every call here needs: no signature policy (the images are built
/// by the test) and a private, empty auth file so the host's credentials play no part.
fn skopeo(skopeo: &Path, scratch: &Path) -> Command {
    let auth = scratch.join("auth.json");
    if !auth.exists() {
        std::fs::write(&auth, r#"{"auths":{}}"#).expect("write skopeo auth file");
    }
    let mut cmd = Command::new(skopeo);
    cmd.arg("--insecure-policy")
        .env("REGISTRY_AUTH_FILE", &auth)
        .env("TMPDIR", scratch);
    cmd
}

// ---------------------------------------------------------------------------------------------
// Deterministic content: tar archives, gzip, pseudo-random bytes
// ---------------------------------------------------------------------------------------------

/// Deterministic pseudo-random bytes (xorshift64*), so every run pushes the same blobs.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A ustar archive holding `files` (regular files, mode 0644, mtime 0), written by hand.
fn tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    fn octal(field: &mut [u8], value: u64) {
        let width = field.len() - 1;
        let text = format!("{value:0width$o}");
        field[..width].copy_from_slice(text.as_bytes());
        field[width] = 0;
    }
    let mut out = Vec::new();
    for (name, data) in files {
        assert!(name.len() < 100, "tar name too long: {name}");
        let mut header = [0u8; 512];
        header[..name.len()].copy_from_slice(name.as_bytes());
        octal(&mut header[100..108], 0o644);
        octal(&mut header[108..116], 0);
        octal(&mut header[116..124], 0);
        octal(&mut header[124..136], data.len() as u64);
        octal(&mut header[136..148], 0);
        header[156] = b'0';
        header[257..263].copy_from_slice(b"ustar\0");
        header[263..265].copy_from_slice(b"00");
        header[265..269].copy_from_slice(b"root");
        header[297..301].copy_from_slice(b"root");
        header[148..156].copy_from_slice(b"        ");
        let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
        let text = format!("{sum:06o}\0 ");
        header[148..156].copy_from_slice(text.as_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut table = [0u32; 256];
    for (i, entry) in table.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
        *entry = c;
    }
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// A valid gzip member holding `data` in stored (uncompressed) deflate blocks: deterministic,
/// needs no compression library, and every gzip reader accepts it.
fn gzip(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
    let mut chunks = data.chunks(65_535).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        out.push(u8::from(last));
        let len = chunk.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

fn hex_of(digest: &str) -> &str {
    digest
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("not a sha256 digest: {digest}"))
}

// ---------------------------------------------------------------------------------------------
// OCI image layouts
// ---------------------------------------------------------------------------------------------

/// An OCI image layout directory being written.
struct LayoutWriter {
    dir: PathBuf,
}

impl LayoutWriter {
    fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir.join("blobs/sha256")).expect("create layout dirs");
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).expect("write oci-layout");
        LayoutWriter { dir: dir.to_path_buf() }
    }

    /// Stores `data` under blobs/sha256 and returns its descriptor.
    fn blob(&self, media_type: &str, data: &[u8]) -> Value {
        let digest = sha256(data);
        std::fs::write(self.dir.join("blobs/sha256").join(hex_of(&digest)), data).expect("write blob");
        json!({ "mediaType": media_type, "digest": digest, "size": data.len() })
    }

    /// Writes a single-platform image (config + the given gzip layers) and returns the manifest
    /// descriptor. `tars` are the uncompressed layer archives.
    fn image(&self, arch: &str, tars: &[Vec<u8>]) -> Value {
        let diff_ids: Vec<String> = tars.iter().map(|t| sha256(t)).collect();
        let config = json!({
            "architecture": arch,
            "os": "linux",
            "created": "2024-01-01T00:00:00Z",
            "config": { "Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/true"] },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
            "history": tars.iter().enumerate().map(|(i, _)| json!({
                "created": "2024-01-01T00:00:00Z",
                "created_by": format!("stowage test layer {i}"),
            })).collect::<Vec<_>>(),
        });
        let config_desc = self.blob(
            "application/vnd.oci.image.config.v1+json",
            &serde_json::to_vec(&config).unwrap(),
        );
        let layers: Vec<Value> = tars
            .iter()
            .map(|t| self.blob("application/vnd.oci.image.layer.v1.tar+gzip", &gzip(t)))
            .collect();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_desc,
            "layers": layers,
            "annotations": { "org.opencontainers.image.title": format!("stowage-{arch}") },
        });
        let mut desc = self.blob(
            "application/vnd.oci.image.manifest.v1+json",
            &serde_json::to_vec_pretty(&manifest).unwrap(),
        );
        desc["platform"] = json!({ "architecture": arch, "os": "linux" });
        desc
    }

    /// Writes index.json naming `desc` as `tag`.
    fn finish(&self, tag: &str, desc: &Value) {
        let mut entry = desc.clone();
        if entry["mediaType"] == "application/vnd.oci.image.manifest.v1+json" {
            entry.as_object_mut().unwrap().remove("platform");
        }
        entry["annotations"] = json!({ "org.opencontainers.image.ref.name": tag });
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [entry],
        });
        std::fs::write(self.dir.join("index.json"), serde_json::to_vec(&index).unwrap()).expect("write index.json");
    }
}

/// The digest index.json of the layout at `dir` gives for `tag`.
fn layout_ref(dir: &Path, tag: &str) -> String {
    let index: Value = serde_json::from_slice(&std::fs::read(dir.join("index.json")).expect("read index.json"))
        .expect("parse index.json");
    index["manifests"]
        .as_array()
        .expect("index.json manifests")
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no {tag} in {}: {index}", dir.display()))["digest"]
        .as_str()
        .expect("digest string")
        .to_string()
}

/// All blobs of the layout at `dir`, by digest, each checked against its name.
fn layout_blobs(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut blobs = BTreeMap::new();
    for entry in std::fs::read_dir(dir.join("blobs/sha256")).expect("list blobs") {
        let path = entry.expect("dir entry").path();
        let mut data = Vec::new();
        std::fs::File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut data))
            .expect("read blob");
        let name = format!("sha256:{}", path.file_name().unwrap().to_string_lossy().into_owned());
        assert_eq!(sha256(&data), name, "blob {} is corrupt", path.display());
        blobs.insert(name, data);
    }
    blobs
}

/// Blobs reachable from the manifest or index `digest` in `blobs` (itself included).
fn reachable(blobs: &BTreeMap<String, Vec<u8>>, digest: &str) -> Vec<String> {
    let data = blobs
        .get(digest)
        .unwrap_or_else(|| panic!("blob {digest} missing from layout"));
    let doc: Value = serde_json::from_slice(data).expect("manifest JSON");
    let mut out = vec![digest.to_string()];
    if let Some(children) = doc["manifests"].as_array() {
        for child in children {
            out.extend(reachable(blobs, child["digest"].as_str().unwrap()));
        }
    } else {
        out.push(doc["config"]["digest"].as_str().unwrap().to_string());
        for layer in doc["layers"].as_array().expect("layers") {
            out.push(layer["digest"].as_str().unwrap().to_string());
        }
    }
    out.sort();
    out.dedup();
    out
}

fn three_layer_tars() -> Vec<Vec<u8>> {
    vec![
        tar(&[
            ("etc/os-release", b"NAME=stowage-test\nVERSION=1\n"),
            ("etc/hostname", b"stowage\n"),
        ]),
        tar(&[
            ("usr/lib/data.bin", &pseudo_random(3 * 1024 * 1024 + 17, 1)),
            ("usr/lib/small.bin", &pseudo_random(1000, 2)),
        ]),
        tar(&[("app/hello.txt", b"hello from stowage\n")]),
    ]
}

fn parse_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "expected JSON on stdout ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

// ---------------------------------------------------------------------------------------------
// skopeo
// ---------------------------------------------------------------------------------------------

#[test]
fn skopeo_copies_multi_layer_image_in_and_out_byte_exact() {
    let skopeo_bin = require_tool("skopeo", "apt-get install skopeo");
    let server = TestServer::start();
    let tmp = tempfile::tempdir().expect("temp dir");
    let scratch = tmp.path();
    let src = scratch.join("src");
    let back = scratch.join("back");
    let by_digest = scratch.join("by-digest");

    let layout = LayoutWriter::new(&src);
    let manifest_desc = layout.image("amd64", &three_layer_tars());
    layout.finish("v1", &manifest_desc);
    let manifest_digest = manifest_desc["digest"].as_str().unwrap().to_string();
    let src_blobs = layout_blobs(&src);
    assert_eq!(src_blobs.len(), 5, "config + 3 layers + manifest");
    let manifest: Value = serde_json::from_slice(&src_blobs[&manifest_digest]).unwrap();
    let layer_digests: Vec<String> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    let config_digest = manifest["config"]["digest"].as_str().unwrap().to_string();

    let remote = format!("docker://{}/clients/skopeo", server.host);

    // Push: OCI layout -> registry.
    run(skopeo(&skopeo_bin, scratch).args([
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", src.display()),
        &format!("{remote}:v1"),
    ]));

    // Pull: registry -> a fresh OCI layout.
    run(skopeo(&skopeo_bin, scratch).args([
        "copy",
        "--preserve-digests",
        "--src-tls-verify=false",
        &format!("{remote}:v1"),
        &format!("oci:{}:v1", back.display()),
    ]));
    assert_eq!(
        layout_ref(&back, "v1"),
        manifest_digest,
        "pulled manifest digest differs from the pushed one"
    );
    let back_blobs = layout_blobs(&back);
    assert_eq!(
        back_blobs.keys().collect::<Vec<_>>(),
        src_blobs.keys().collect::<Vec<_>>(),
        "pulled layout has a different set of blobs"
    );
    for (digest, data) in &src_blobs {
        assert!(back_blobs[digest] == *data, "blob {digest} differs");
    }

    // inspect: the registry's view of the image.
    let inspect = parse_json(&run(skopeo(&skopeo_bin, scratch).args([
        "inspect",
        "--tls-verify=false",
        &format!("{remote}:v1"),
    ])));
    assert_eq!(inspect["Digest"], manifest_digest.as_str(), "{inspect}");
    assert_eq!(inspect["Architecture"], "amd64", "{inspect}");
    assert_eq!(inspect["Os"], "linux", "{inspect}");
    assert_eq!(inspect["Layers"], json!(layer_digests), "{inspect}");
    assert_eq!(inspect["RepoTags"], json!(["v1"]), "{inspect}");

    // inspect --raw gives the manifest bytes as pushed; --config --raw the config bytes.
    let raw =
        run(skopeo(&skopeo_bin, scratch).args(["inspect", "--raw", "--tls-verify=false", &format!("{remote}:v1")]));
    assert!(
        raw.stdout == src_blobs[&manifest_digest],
        "inspect --raw is not the pushed manifest: {}",
        String::from_utf8_lossy(&raw.stdout)
    );
    let raw_config = run(skopeo(&skopeo_bin, scratch).args([
        "inspect",
        "--config",
        "--raw",
        "--tls-verify=false",
        &format!("{remote}:v1"),
    ]));
    assert!(
        raw_config.stdout == src_blobs[&config_digest],
        "inspect --config --raw is not the pushed config: {}",
        String::from_utf8_lossy(&raw_config.stdout)
    );

    // Registry-to-registry: a new tag in the same repository, and a copy into another
    // repository (skopeo tries a cross-repository blob mount).
    let mirror = format!("docker://{}/clients/mirror", server.host);
    for dest in [format!("{remote}:v2"), format!("{mirror}:latest")] {
        run(skopeo(&skopeo_bin, scratch).args([
            "copy",
            "--preserve-digests",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            &format!("{remote}:v1"),
            &dest,
        ]));
    }

    let tags = parse_json(&run(skopeo(&skopeo_bin, scratch).args([
        "list-tags",
        "--tls-verify=false",
        &remote,
    ])));
    assert_eq!(tags["Tags"], json!(["v1", "v2"]), "{tags}");
    let tags = parse_json(&run(skopeo(&skopeo_bin, scratch).args([
        "list-tags",
        "--tls-verify=false",
        &mirror,
    ])));
    assert_eq!(tags["Tags"], json!(["latest"]), "{tags}");

    // Pull the mirror by digest: same manifest, same blobs.
    run(skopeo(&skopeo_bin, scratch).args([
        "copy",
        "--preserve-digests",
        "--src-tls-verify=false",
        &format!("{mirror}@{manifest_digest}"),
        &format!("oci:{}:pinned", by_digest.display()),
    ]));
    assert_eq!(layout_ref(&by_digest, "pinned"), manifest_digest);
    assert_eq!(layout_blobs(&by_digest), src_blobs);

    // Docker schema 2: skopeo converts the manifest (so its digest changes) but keeps the layer
    // blobs; the registry must store and serve the Docker media type.
    let docker = format!("docker://{}/clients/docker", server.host);
    run(skopeo(&skopeo_bin, scratch).args([
        "copy",
        "--format",
        "v2s2",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", src.display()),
        &format!("{docker}:v1"),
    ]));
    let raw =
        run(skopeo(&skopeo_bin, scratch).args(["inspect", "--raw", "--tls-verify=false", &format!("{docker}:v1")]));
    let v2s2: Value = serde_json::from_slice(&raw.stdout).expect("schema 2 manifest JSON");
    assert_eq!(
        v2s2["mediaType"], "application/vnd.docker.distribution.manifest.v2+json",
        "{v2s2}"
    );
    let v2s2_layers: Vec<&Value> = v2s2["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| &l["digest"])
        .collect();
    assert_eq!(json!(v2s2_layers), json!(layer_digests), "{v2s2}");
    let inspect = parse_json(&run(skopeo(&skopeo_bin, scratch).args([
        "inspect",
        "--tls-verify=false",
        &format!("{docker}:v1"),
    ])));
    assert_eq!(inspect["Digest"], sha256(&raw.stdout).as_str(), "{inspect}");
    let from_docker = scratch.join("from-docker");
    run(skopeo(&skopeo_bin, scratch).args([
        "copy",
        "--src-tls-verify=false",
        &format!("{docker}:v1"),
        &format!("oci:{}:v1", from_docker.display()),
    ]));
    let docker_blobs = layout_blobs(&from_docker);
    for digest in &layer_digests {
        assert!(
            docker_blobs.get(digest) == src_blobs.get(digest),
            "layer {digest} changed through the schema 2 copy"
        );
    }

    // Deleting the mirror's manifest removes it there only: the original repository, which
    // shares every blob with it, still copies out whole.
    run(skopeo(&skopeo_bin, scratch).args(["delete", "--tls-verify=false", &format!("{mirror}:latest")]));
    let gone = run_unchecked(skopeo(&skopeo_bin, scratch).args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("{mirror}@{manifest_digest}"),
    ]));
    assert!(
        !gone.status.success(),
        "deleted manifest still served: {}",
        String::from_utf8_lossy(&gone.stdout)
    );
    let after = scratch.join("after-delete");
    run(skopeo(&skopeo_bin, scratch).args([
        "copy",
        "--preserve-digests",
        "--src-tls-verify=false",
        &format!("{remote}:v2"),
        &format!("oci:{}:v2", after.display()),
    ]));
    assert_eq!(layout_ref(&after, "v2"), manifest_digest);
    assert_eq!(layout_blobs(&after), src_blobs);
}

#[test]
fn skopeo_copies_multi_platform_index_with_all() {
    let skopeo_bin = require_tool("skopeo", "apt-get install skopeo");
    let server = TestServer::start();
    let tmp = tempfile::tempdir().expect("temp dir");
    let scratch = tmp.path();
    let src = scratch.join("src");
    let back = scratch.join("back");

    let layout = LayoutWriter::new(&src);
    let shared = tar(&[("etc/shared", b"same layer in both images\n")]);
    let amd64 = layout.image("amd64", &[shared.clone(), tar(&[("bin/app", &pseudo_random(4096, 3))])]);
    let arm64 = layout.image("arm64", &[shared, tar(&[("bin/app", &pseudo_random(4096, 4))])]);
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [amd64, arm64],
    });
    let index_desc = layout.blob(
        "application/vnd.oci.image.index.v1+json",
        &serde_json::to_vec(&index).unwrap(),
    );
    layout.finish("multi", &index_desc);
    let index_digest = index_desc["digest"].as_str().unwrap().to_string();
    let src_blobs = layout_blobs(&src);
    let expected = reachable(&src_blobs, &index_digest);
    assert_eq!(expected.len(), 1 + 2 * 2 + 3, "index, 2 manifests, 2 configs, 3 layers");

    let remote = format!("docker://{}/clients/multi", server.host);
    run(skopeo(&skopeo_bin, scratch).args([
        "copy",
        "--all",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &format!("oci:{}:multi", src.display()),
        &format!("{remote}:latest"),
    ]));
    run(skopeo(&skopeo_bin, scratch).args([
        "copy",
        "--all",
        "--preserve-digests",
        "--src-tls-verify=false",
        &format!("{remote}:latest"),
        &format!("oci:{}:multi", back.display()),
    ]));
    assert_eq!(layout_ref(&back, "multi"), index_digest);
    let back_blobs = layout_blobs(&back);
    assert_eq!(reachable(&back_blobs, &index_digest), expected);
    for digest in &expected {
        assert!(back_blobs[digest] == src_blobs[digest], "blob {digest} differs");
    }

    let raw =
        run(skopeo(&skopeo_bin, scratch).args(["inspect", "--raw", "--tls-verify=false", &format!("{remote}:latest")]));
    assert!(
        raw.stdout == src_blobs[&index_digest],
        "inspect --raw is not the pushed index: {}",
        String::from_utf8_lossy(&raw.stdout)
    );
    // Without --raw, skopeo resolves the index to the platform it is asked for (its `Digest` stays
    // the digest of what the tag names: the index).
    let inspect = parse_json(&run(skopeo(&skopeo_bin, scratch).args([
        "--override-arch",
        "arm64",
        "--override-os",
        "linux",
        "inspect",
        "--tls-verify=false",
        &format!("{remote}:latest"),
    ])));
    assert_eq!(inspect["Digest"], index_digest.as_str(), "{inspect}");
    assert_eq!(inspect["Architecture"], "arm64", "{inspect}");
    let arm64_manifest: Value = serde_json::from_slice(&src_blobs[arm64["digest"].as_str().unwrap()]).unwrap();
    let arm64_layers: Vec<&Value> = arm64_manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| &l["digest"])
        .collect();
    assert_eq!(inspect["Layers"], json!(arm64_layers), "{inspect}");
}

// ---------------------------------------------------------------------------------------------
// ORAS Python SDK
// ---------------------------------------------------------------------------------------------

#[test]
fn oras_python_sdk_pushes_artifacts_and_referrers() {
    let python = require_python_with_oras();
    let server = TestServer::start();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/oras_roundtrip.py");
    let tmp = tempfile::tempdir().expect("temp dir");
    let out = run_unchecked(
        Command::new(&python)
            .arg(&script)
            .arg(&server.host)
            .arg(tmp.path())
            .env("PYTHONUNBUFFERED", "1")
            .env("HOME", tmp.path()),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "oras_roundtrip.py failed ({}):\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        out.status
    );
    let summary_line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("ORAS_ROUNDTRIP_OK "))
        .unwrap_or_else(|| panic!("no ORAS_ROUNDTRIP_OK line:\n{stdout}\n{stderr}"));
    let summary: Value = serde_json::from_str(summary_line).expect("summary JSON");

    // Cross-check the script's claims against the server directly.
    let subject = summary["subject"].as_str().expect("subject digest");
    let referrers = summary["referrers"].as_object().expect("referrers map");
    assert_eq!(referrers.len(), 2, "{summary}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let resp = common::client()
            .get(server.v2(&format!("oras/artifacts/referrers/{subject}")))
            .send()
            .await
            .expect("GET referrers");
        assert_eq!(resp.status(), 200);
        let index: Value = resp.json().await.expect("referrers JSON");
        let listed: BTreeMap<String, String> = index["manifests"]
            .as_array()
            .expect("manifests")
            .iter()
            .map(|m| {
                (
                    m["digest"].as_str().unwrap().to_string(),
                    m["artifactType"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        for (digest, artifact_type) in referrers {
            assert_eq!(
                listed.get(digest).map(String::as_str),
                artifact_type.as_str(),
                "referrer {digest} in {index}"
            );
        }
    });
}

// ---------------------------------------------------------------------------------------------
// oci-client crate
// ---------------------------------------------------------------------------------------------

mod oci {
    use super::*;
    use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
    use oci_client::manifest::{
        IMAGE_CONFIG_MEDIA_TYPE, IMAGE_LAYER_GZIP_MEDIA_TYPE, IMAGE_LAYER_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
        OciDescriptor, OciImageManifest, OciManifest,
    };
    use oci_client::secrets::RegistryAuth;
    use oci_client::{Client, Reference};

    fn client(monolithic: bool) -> Client {
        Client::new(ClientConfig {
            protocol: ClientProtocol::Http,
            use_monolithic_push: monolithic,
            ..Default::default()
        })
    }

    fn reference(server: &TestServer, rest: &str) -> Reference {
        format!("{}/{rest}", server.host)
            .parse()
            .unwrap_or_else(|e| panic!("bad reference {rest}: {e}"))
    }

    #[tokio::test]
    async fn oci_client_push_pull_tags_manifest_config_referrers() {
        let server = TestServer::start();
        let auth = RegistryAuth::Anonymous;
        let chunked = client(false);
        let monolithic = client(true);
        let v1 = reference(&server, "clients/oci-client:v1");

        let config_bytes = serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": { "type": "layers", "diff_ids": [] },
        }))
        .unwrap();
        let small_tar = tar(&[("hello.txt", b"hello oci-client\n")]);
        // Larger than the client's 4 MiB chunk, so the chunked push takes several PATCHes.
        let big_tar = tar(&[("big.bin", &pseudo_random(9 * 1024 * 1024 + 5, 7))]);
        let layers = vec![
            ImageLayer::oci_v1_gzip(gzip(&small_tar), None),
            ImageLayer::oci_v1(big_tar.clone(), None),
        ];
        let config = Config::oci_v1(config_bytes.clone(), None);
        let pushed = chunked
            .push(&v1, &layers, config.clone(), &auth, None)
            .await
            .expect("oci-client push (chunked uploads)");
        assert!(pushed.manifest_url.contains("/v2/clients/oci-client/manifests/"));

        // The same image again under v2, this time with monolithic uploads.
        let v2 = reference(&server, "clients/oci-client:v2");
        monolithic
            .push(&v2, &layers, config.clone(), &auth, None)
            .await
            .expect("oci-client push (monolithic uploads)");

        // Pull it back.
        let image = chunked
            .pull(&v1, &auth, vec![IMAGE_LAYER_MEDIA_TYPE, IMAGE_LAYER_GZIP_MEDIA_TYPE])
            .await
            .expect("oci-client pull");
        assert_eq!(image.layers.len(), 2);
        // oci-client returns layers in the order their downloads finish, not manifest order.
        for sent in &layers {
            let got = image
                .layers
                .iter()
                .find(|l| l.sha256_digest() == sent.sha256_digest())
                .unwrap_or_else(|| panic!("layer {} not pulled", sent.sha256_digest()));
            assert_eq!(got.media_type, sent.media_type);
            assert!(got.data == sent.data, "layer bytes differ");
        }
        assert!(image.config.data == config_bytes, "config bytes differ");
        assert_eq!(image.config.media_type, IMAGE_CONFIG_MEDIA_TYPE);
        let digest = image.digest.clone().expect("pulled manifest digest");

        // The raw manifest hashes to that digest, and HEAD agrees.
        let (raw, raw_digest) = chunked
            .pull_manifest_raw(&v1, &auth, &[OCI_IMAGE_MEDIA_TYPE])
            .await
            .expect("pull_manifest_raw");
        assert_eq!(raw_digest, digest);
        assert_eq!(sha256(&raw), digest);
        assert_eq!(
            chunked
                .fetch_manifest_digest(&v1, &auth)
                .await
                .expect("fetch_manifest_digest"),
            digest
        );
        assert_eq!(
            chunked
                .fetch_manifest_digest(&v2, &auth)
                .await
                .expect("fetch_manifest_digest v2"),
            digest,
            "same image under v2 must have the same digest"
        );

        // Manifest and config, by tag and by digest.
        let (manifest, m_digest, config_text) = chunked
            .pull_manifest_and_config(&v1, &auth)
            .await
            .expect("pull_manifest_and_config");
        assert_eq!(m_digest, digest);
        assert_eq!(config_text.as_bytes(), &config_bytes[..]);
        assert_eq!(manifest.layers.len(), 2);
        assert_eq!(manifest.config.digest, sha256(&config_bytes));
        let pinned = reference(&server, &format!("clients/oci-client@{digest}"));
        let (by_digest, pinned_digest) = chunked
            .pull_manifest(&pinned, &auth)
            .await
            .expect("pull_manifest by digest");
        assert_eq!(pinned_digest, digest);
        match by_digest {
            OciManifest::Image(m) => assert_eq!(
                m.layers.iter().map(|l| &l.digest).collect::<Vec<_>>(),
                manifest.layers.iter().map(|l| &l.digest).collect::<Vec<_>>()
            ),
            other => panic!("expected an image manifest, got {other:?}"),
        }

        // Blob existence.
        for layer in &manifest.layers {
            assert!(
                chunked.blob_exists(&v1, &layer.digest).await.expect("HEAD blob"),
                "{} should exist",
                layer.digest
            );
        }
        assert!(
            !chunked
                .blob_exists(&v1, &sha256(b"never pushed"))
                .await
                .expect("HEAD missing blob")
        );

        // A blob streamed in chunks with no monolithic fallback.
        let streamed = pseudo_random(5 * 1024 * 1024 + 3, 8);
        let pieces: Vec<oci_client::errors::Result<bytes::Bytes>> = streamed
            .chunks(1024 * 1024)
            .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
            .collect();
        let resp = chunked
            .push_blob_stream_chunked(&v1, futures_util::stream::iter(pieces))
            .await
            .expect("push_blob_stream_chunked");
        assert_eq!(resp.blob_digest, sha256(&streamed));
        assert_eq!(resp.size, streamed.len() as u64);
        let mut pulled = Vec::new();
        chunked
            .pull_blob(&v1, resp.blob_digest.as_str(), &mut pulled)
            .await
            .expect("pull streamed blob");
        assert!(pulled == streamed, "streamed blob differs");

        // Tags, whole and paginated.
        let tags = chunked.list_tags(&v1, &auth, None, None).await.expect("list_tags");
        assert_eq!(tags.name, "clients/oci-client");
        assert_eq!(tags.tags, ["v1", "v2"]);
        let page = chunked
            .list_tags(&v1, &auth, Some(1), None)
            .await
            .expect("list_tags n=1");
        assert_eq!(page.tags, ["v1"]);
        let page = chunked
            .list_tags(&v1, &auth, Some(1), Some("v1"))
            .await
            .expect("list_tags n=1 last=v1");
        assert_eq!(page.tags, ["v2"]);

        // A referrer (artifact with a subject) pushed by digest, then found via the referrers API.
        let empty_digest = sha256(b"{}");
        chunked
            .push_blob(&v1, bytes::Bytes::from_static(b"{}"), &empty_digest)
            .await
            .expect("push empty config");
        let payload = b"signature bytes".to_vec();
        chunked
            .push_blob(&v1, payload.clone(), &sha256(&payload))
            .await
            .expect("push referrer payload");
        let referrer = OciImageManifest {
            schema_version: 2,
            media_type: Some(OCI_IMAGE_MEDIA_TYPE.to_string()),
            artifact_type: Some("application/vnd.stowage.test.signature".to_string()),
            config: OciDescriptor {
                media_type: "application/vnd.oci.empty.v1+json".to_string(),
                digest: empty_digest,
                size: 2,
                ..Default::default()
            },
            layers: vec![OciDescriptor {
                media_type: "application/octet-stream".to_string(),
                digest: sha256(&payload),
                size: payload.len() as i64,
                ..Default::default()
            }],
            subject: Some(OciDescriptor {
                media_type: OCI_IMAGE_MEDIA_TYPE.to_string(),
                digest: digest.clone(),
                size: raw.len() as i64,
                ..Default::default()
            }),
            annotations: None,
        };
        let referrer_ref = reference(&server, "clients/oci-client:sig");
        chunked
            .push_manifest(&referrer_ref, &OciManifest::Image(referrer))
            .await
            .expect("push referrer manifest");
        let referrer_digest = chunked
            .fetch_manifest_digest(&referrer_ref, &auth)
            .await
            .expect("referrer digest");
        let index = chunked.pull_referrers(&pinned, None).await.expect("pull_referrers");
        let found: Vec<(&str, Option<&str>)> = index
            .manifests
            .iter()
            .map(|m| (m.digest.as_str(), m.artifact_type.as_deref()))
            .collect();
        assert_eq!(
            found,
            [(referrer_digest.as_str(), Some("application/vnd.stowage.test.signature"))]
        );

        // The catalog lists the repository.
        let catalog = chunked.catalog(&v1, &auth, None, None).await.expect("catalog");
        assert_eq!(catalog.repositories, ["clients/oci-client"]);
    }
}

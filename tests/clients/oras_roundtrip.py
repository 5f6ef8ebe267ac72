#!/usr/bin/env python3
"""Round-trips OCI artifacts and referrers through a registry with the ORAS Python SDK.

Usage: oras_roundtrip.py HOST:PORT WORKDIR

Run by tests/clients.rs against a fresh `stowage serve` over plain HTTP. It:
  1. pushes an artifact (two files, a config with its own media type, so the artifact type is
     the config's media type) with chunked blob uploads, and pulls it back;
  2. pushes a referrer of it with the SDK (`subject=`), tagged;
  3. pushes a second referrer by digest only, with an explicit `artifactType`, an empty config
     and annotations, as a raw manifest;
  4. pulls both referrers back and checks their contents;
  5. lists referrers of the first artifact (oras-py has no referrers call, so plain HTTP with
     urllib), with and without an artifactType filter, and of a manifest that has none.
On success the last line is `ORAS_ROUNDTRIP_OK {json summary}`; on failure it exits 1 saying
what differed.
"""

import hashlib
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

import oras.client
import oras.defaults
import oras.oci
import oras.provider

# The SDK retries failed requests with sleeps of 4 s, 5 s, 11 s, ... which would turn a server
# bug into minutes of waiting. Call the undecorated function so failures show at once.
oras.provider.Registry.do_request = oras.provider.Registry.do_request.__wrapped__

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
ARTIFACT_CONFIG_TYPE = "application/vnd.stowage.test.config.v1+json"
SIGNATURE_CONFIG_TYPE = "application/vnd.stowage.test.signature.config.v1+json"
SBOM_TYPE = "application/vnd.stowage.test.sbom.v1+json"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"


class CheckFailed(Exception):
    pass


def check(cond, message):
    if not cond:
        raise CheckFailed(message)


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pseudo_random(n, seed):
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


def http(method, url, data=None, headers=None):
    """Plain HTTP request; returns (status, headers, body) for any status."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def main():
    host, workdir = sys.argv[1], sys.argv[2]
    base = f"http://{host}"
    repo = "oras/artifacts"
    target = f"{host}/{repo}"
    client = oras.client.OrasClient(hostname=host, insecure=True, tls_verify=False)

    files = {
        "readme.txt": (b"hello from the ORAS Python SDK\n", "text/plain"),
        "data.bin": (pseudo_random(300 * 1024 + 11, "data"), "application/octet-stream"),
    }
    push_dir = os.path.join(workdir, "push")
    os.makedirs(push_dir)
    os.chdir(push_dir)
    for name, (content, _) in files.items():
        with open(name, "wb") as f:
            f.write(content)
    config_bytes = json.dumps({"tool": "stowage-test", "kind": "artifact"}).encode()
    with open("config.json", "wb") as f:
        f.write(config_bytes)

    # 1. The subject artifact, chunked uploads of 64 KiB (data.bin takes several PATCHes).
    resp = client.push(
        target=f"{target}:v1",
        files=[f"{name}:{mt}" for name, (_, mt) in files.items()],
        manifest_config=f"config.json:{ARTIFACT_CONFIG_TYPE}",
        manifest_annotations={"org.opencontainers.image.description": "stowage oras test"},
        do_chunked=True,
        chunk_size=64 * 1024,
        quiet=True,
    )
    check(resp.status_code == 201, f"manifest PUT v1: {resp.status_code} {resp.text}")
    subject_digest = resp.headers.get("Docker-Content-Digest")
    check(subject_digest, f"no Docker-Content-Digest on manifest PUT: {dict(resp.headers)}")

    status, headers, subject_raw = http(
        "GET", f"{base}/v2/{repo}/manifests/v1", headers={"Accept": OCI_MANIFEST}
    )
    check(status == 200, f"GET manifest v1: {status} {subject_raw[:300]!r}")
    check(sha256(subject_raw) == subject_digest, "manifest bytes do not hash to their digest")
    check(
        headers.get("Content-Type") == OCI_MANIFEST,
        f"manifest Content-Type {headers.get('Content-Type')!r}",
    )
    check(headers.get("Docker-Content-Digest") == subject_digest, "GET digest header differs")
    subject_manifest = json.loads(subject_raw)
    check(subject_manifest["config"]["mediaType"] == ARTIFACT_CONFIG_TYPE, "config mediaType lost")
    check(subject_manifest["config"]["digest"] == sha256(config_bytes), "config digest lost")

    pull_dir = os.path.join(workdir, "pull-v1")
    pulled = client.pull(target=f"{target}:v1", outdir=pull_dir)
    check(
        sorted(os.path.basename(p) for p in pulled) == sorted(files),
        f"pulled files {pulled}",
    )
    for name, (content, _) in files.items():
        with open(os.path.join(pull_dir, name), "rb") as f:
            check(f.read() == content, f"pulled {name} differs")
    config_blob = client.get_blob(f"{target}:v1", sha256(config_bytes))
    check(config_blob.status_code == 200, f"GET config blob: {config_blob.status_code}")
    check(config_blob.content == config_bytes, "config blob differs")

    subject = oras.oci.Subject(
        mediaType=OCI_MANIFEST, digest=subject_digest, size=len(subject_raw)
    )

    # 2. A referrer pushed with the SDK, tagged; its artifact type is its config's media type.
    sig_bytes = b"-----BEGIN SIGNATURE-----\nnot really\n-----END SIGNATURE-----\n"
    with open("signature.txt", "wb") as f:
        f.write(sig_bytes)
    with open("sigconfig.json", "wb") as f:
        f.write(b'{"signer":"stowage-test"}')
    resp = client.push(
        target=f"{target}:signature",
        files=["signature.txt:application/vnd.stowage.test.signature"],
        manifest_config=f"sigconfig.json:{SIGNATURE_CONFIG_TYPE}",
        subject=subject,
        quiet=True,
    )
    check(resp.status_code == 201, f"referrer PUT: {resp.status_code} {resp.text}")
    sig_digest = resp.headers.get("Docker-Content-Digest")
    check(sig_digest, "no Docker-Content-Digest on referrer PUT")
    check(
        resp.headers.get("OCI-Subject") == subject_digest,
        f"referrer PUT must answer OCI-Subject: {subject_digest}; headers {dict(resp.headers)}",
    )

    # 3. A referrer with an explicit artifactType, empty config, pushed by digest only.
    sbom_bytes = json.dumps({"packages": [{"name": "stowage", "version": "0.1.0"}]}).encode()
    for blob, media_type in ((b"{}", EMPTY_TYPE), (sbom_bytes, SBOM_TYPE)):
        path = "blob.tmp"
        with open(path, "wb") as f:
            f.write(blob)
        layer = {"mediaType": media_type, "digest": sha256(blob), "size": len(blob)}
        up = client.upload_blob(path, f"{target}:unused", layer)
        check(up.status_code in (200, 201), f"blob upload {media_type}: {up.status_code}")
    sbom_annotations = {
        "org.opencontainers.image.created": "2024-01-01T00:00:00Z",
        "org.example.sbom.format": "stowage-test",
    }
    sbom_manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": SBOM_TYPE,
        "config": {"mediaType": EMPTY_TYPE, "digest": sha256(b"{}"), "size": 2},
        "layers": [{"mediaType": SBOM_TYPE, "digest": sha256(sbom_bytes), "size": len(sbom_bytes)}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject_digest, "size": len(subject_raw)},
        "annotations": sbom_annotations,
    }
    sbom_raw = json.dumps(sbom_manifest, separators=(",", ":")).encode()
    sbom_digest = sha256(sbom_raw)
    status, headers, body = http(
        "PUT",
        f"{base}/v2/{repo}/manifests/{sbom_digest}",
        data=sbom_raw,
        headers={"Content-Type": OCI_MANIFEST},
    )
    check(status == 201, f"PUT sbom referrer by digest: {status} {body[:300]!r}")
    check(headers.get("Docker-Content-Digest") == sbom_digest, "sbom digest header differs")
    check(
        headers.get("OCI-Subject") == subject_digest,
        f"referrer PUT must answer OCI-Subject: {subject_digest}; headers {dict(headers)}",
    )

    # 4. Pull both referrers back.
    sig_dir = os.path.join(workdir, "pull-signature")
    pulled = client.pull(target=f"{target}:signature", outdir=sig_dir)
    check([os.path.basename(p) for p in pulled] == ["signature.txt"], f"pulled {pulled}")
    with open(os.path.join(sig_dir, "signature.txt"), "rb") as f:
        check(f.read() == sig_bytes, "pulled signature differs")
    sig_manifest = client.get_manifest(f"{target}@{sig_digest}")
    check(sig_manifest.get("subject", {}).get("digest") == subject_digest, "signature subject lost")

    got = client.get_manifest(f"{target}@{sbom_digest}")
    check(got == sbom_manifest, f"sbom manifest differs: {got}")
    status, headers, raw = http(
        "GET", f"{base}/v2/{repo}/manifests/{sbom_digest}", headers={"Accept": OCI_MANIFEST}
    )
    check(status == 200 and raw == sbom_raw, f"sbom manifest bytes differ: {status} {raw[:200]!r}")
    sbom_dir = os.path.join(workdir, "pull-sbom")
    pulled = client.pull(target=f"{target}@{sbom_digest}", outdir=sbom_dir)
    check(len(pulled) == 1, f"pulled {pulled}")
    with open(pulled[0], "rb") as f:
        check(f.read() == sbom_bytes, "pulled sbom differs")

    # 5. The referrers API.
    expected = {sig_digest: SIGNATURE_CONFIG_TYPE, sbom_digest: SBOM_TYPE}
    status, headers, body = http("GET", f"{base}/v2/{repo}/referrers/{subject_digest}")
    check(status == 200, f"GET referrers: {status} {body[:300]!r}")
    ctype = (headers.get("Content-Type") or "").split(";")[0].strip()
    check(ctype == OCI_INDEX, f"referrers Content-Type {headers.get('Content-Type')!r}")
    index = json.loads(body)
    check(index.get("schemaVersion") == 2, f"referrers schemaVersion: {index}")
    check(index.get("mediaType") == OCI_INDEX, f"referrers mediaType: {index}")
    listed = {m["digest"]: m for m in index.get("manifests", [])}
    check(set(listed) == set(expected), f"referrers {sorted(listed)} != {sorted(expected)}")
    for digest, artifact_type in expected.items():
        entry = listed[digest]
        check(entry.get("artifactType") == artifact_type, f"artifactType of {digest}: {entry}")
        check(entry.get("mediaType") == OCI_MANIFEST, f"mediaType of {digest}: {entry}")
    check(listed[sig_digest].get("size") > 0, f"size of signature: {listed[sig_digest]}")
    check(listed[sbom_digest].get("size") == len(sbom_raw), f"size of sbom: {listed[sbom_digest]}")
    check(
        listed[sbom_digest].get("annotations") == sbom_annotations,
        f"referrer annotations must be copied from the manifest: {listed[sbom_digest]}",
    )

    query = urllib.parse.urlencode({"artifactType": SBOM_TYPE})
    status, headers, body = http("GET", f"{base}/v2/{repo}/referrers/{subject_digest}?{query}")
    check(status == 200, f"GET filtered referrers: {status} {body[:300]!r}")
    filtered = [m["digest"] for m in json.loads(body).get("manifests", [])]
    applied = headers.get("OCI-Filters-Applied")
    # Filtering is optional in the spec, but a registry that filters must say so.
    if applied is None:
        check(sorted(filtered) == sorted(expected), f"unfiltered referrers: {filtered}")
        print("note: server does not apply the artifactType filter")
    else:
        check(applied == "artifactType", f"OCI-Filters-Applied header: {applied!r}")
        check(filtered == [sbom_digest], f"filtered referrers: {filtered}")

    status, headers, body = http("GET", f"{base}/v2/{repo}/referrers/{sbom_digest}")
    check(status == 200, f"GET referrers of a manifest with none: {status} {body[:300]!r}")
    check(json.loads(body).get("manifests") == [], f"expected no referrers: {body[:300]!r}")

    tags = client.get_tags(target)
    check(sorted(tags) == ["signature", "v1"], f"tags {tags}")

    summary = {"subject": subject_digest, "referrers": expected, "tags": sorted(tags)}
    print("ORAS_ROUNDTRIP_OK " + json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    try:
        main()
    except CheckFailed as e:
        print(f"oras_roundtrip.py: CHECK FAILED: {e}", file=sys.stderr)
        sys.exit(1)

#!/usr/bin/env python3
"""Drives the ORAS Python SDK against a registry with authentication on.

Usage:
  oras_auth.py roundtrip HOST:PORT WORKDIR USER SECRET REPO
  oras_auth.py push      HOST:PORT WORKDIR USER SECRET REPO
  oras_auth.py anonymous HOST:PORT WORKDIR USER SECRET REPO

Run by tests/oras_auth.rs against a fresh `stowage serve`: over plain HTTP (`insecure=True`),
or, when ORAS_TEST_CA names a CA certificate file, over HTTPS verified against it (the SDK's
`tls_verify=<path>`). SECRET is a password or an API token. Both modes use the SDK as the README's recipe does: the `basic` auth
backend (oras-py's token backend keeps the first token it gets and asks for another only after
a 403, never after a 401 `insufficient_scope`), and `login` with a config file in WORKDIR.
oras-py's `login` only writes the credentials to that file; the registry first sees them on
the next request.

roundtrip: login; push two files as REPO:v1 and one as REPO:v2; pull v1 back (files equal, and
  the manifest served hashes to the digest the push reported); list tags; delete v2 with
  `delete_tag`; list tags again; logout; a pull after logout must be refused. The last line is
  `ORAS_AUTH_OK {json}` with the digests and tag lists.
push: login, then push REPO:v1, which the test expects to be refused. Exits 0 printing
  `ORAS_PUSH_OK` if it was not; otherwise exits 1 printing `ORAS_PUSH_REFUSED <the SDK's
  exception>`, whose text carries the registry's error body, as a user would see it.
anonymous: login and push REPO:v1 (REPO in `auth.anonymous_pull`), then a new client that never
  logged in, with the SDK's default (token) auth backend, pulls it back; prints
  `ORAS_ANONYMOUS_OK`.
Any failed check exits 2 saying what differed.
"""

import hashlib
import json
import os
import sys

import oras.client
import oras.provider

# The SDK retries a request that raised (not one that was refused) with sleeps of 4 s, 5 s,
# 11 s, ...; call the undecorated function so a server bug fails at once instead of after
# minutes. Refusals (401/403) never go through that path.
oras.provider.Registry.do_request = oras.provider.Registry.do_request.__wrapped__

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


class CheckFailed(Exception):
    pass


def check(cond, message):
    if not cond:
        raise CheckFailed(message)


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def logged_in_client(host, workdir, user, secret):
    ca = os.environ.get("ORAS_TEST_CA")
    client = oras.client.OrasClient(
        hostname=host, insecure=not ca, tls_verify=ca or False, auth_backend="basic"
    )
    status = client.login(
        username=user,
        password=secret,
        hostname=host,
        tls_verify=bool(ca),
        config_path=os.path.join(workdir, "config.json"),
    )
    check(status.get("Status") == "Login Succeeded", f"login: {status}")
    return client


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def served_manifest(client, target):
    """The raw manifest the registry serves for `target`, and its digest header."""
    container = client.get_container(target)
    url = f"{client.prefix}://{container.manifest_url()}"
    resp = client.do_request(url, "GET", headers={"Accept": OCI_MANIFEST})
    check(resp.status_code == 200, f"GET manifest {target}: {resp.status_code} {resp.text[:300]}")
    return resp.content, resp.headers.get("Docker-Content-Digest")


def roundtrip(host, workdir, user, secret, repo):
    client = logged_in_client(host, workdir, user, secret)
    target = f"{host}/{repo}"
    push_dir = os.path.join(workdir, "push")
    os.makedirs(push_dir)
    os.chdir(push_dir)
    files = {"hello.txt": b"hello from oras with credentials\n", "data.bin": os.urandom(70_000)}
    for name, data in files.items():
        write(name, data)
    write("v2.txt", b"second version\n")

    resp = client.push(target=f"{target}:v1", files=list(files), quiet=True)
    check(resp.status_code == 201, f"push v1: {resp.status_code} {resp.text[:300]}")
    pushed = resp.headers.get("Docker-Content-Digest")
    check(pushed, f"no Docker-Content-Digest on push: {dict(resp.headers)}")
    resp = client.push(target=f"{target}:v2", files=["v2.txt"], quiet=True)
    check(resp.status_code == 201, f"push v2: {resp.status_code} {resp.text[:300]}")

    pull_dir = os.path.join(workdir, "pull")
    got = client.pull(target=f"{target}:v1", outdir=pull_dir)
    check(sorted(os.path.basename(p) for p in got) == sorted(files), f"pulled {got}")
    for name, data in files.items():
        with open(os.path.join(pull_dir, name), "rb") as f:
            check(f.read() == data, f"pulled {name} differs")
    raw, header = served_manifest(client, f"{target}:v1")
    pulled = sha256(raw)
    check(pulled == pushed, f"pulled manifest {pulled} != pushed {pushed}")
    check(header == pushed, f"Docker-Content-Digest {header} != pushed {pushed}")

    tags_before = sorted(client.get_tags(target))
    check(tags_before == ["v1", "v2"], f"tags {tags_before}")
    deleted = client.delete_tags(target, "v2")
    check(deleted == ["v2"], f"delete_tags: {deleted}")
    tags_after = sorted(client.get_tags(target))
    check(tags_after == ["v1"], f"tags after delete {tags_after}")

    client.logout(host)
    try:
        client.pull(target=f"{target}:v1", outdir=os.path.join(workdir, "after-logout"))
        refused_after_logout = False
    except Exception as e:  # the SDK raises ValueError on a refused request
        print(f"pull after logout refused: {e}", file=sys.stderr)
        refused_after_logout = True
    check(refused_after_logout, "a pull after logout must be refused")

    summary = {
        "pushed": pushed,
        "pulled": pulled,
        "tags_before": tags_before,
        "tags_after": tags_after,
    }
    print("ORAS_AUTH_OK " + json.dumps(summary, sort_keys=True))


def push(host, workdir, user, secret, repo):
    client = logged_in_client(host, workdir, user, secret)
    os.chdir(workdir)
    write("refused.txt", b"this push should be refused\n")
    try:
        resp = client.push(target=f"{host}/{repo}:v1", files=["refused.txt"], quiet=True)
    except Exception as e:
        print(f"ORAS_PUSH_REFUSED {e}")
        sys.exit(1)
    if resp.status_code != 201:
        print(f"ORAS_PUSH_REFUSED manifest PUT answered {resp.status_code}: {resp.text[:300]}")
        sys.exit(1)
    print("ORAS_PUSH_OK")


def anonymous(host, workdir, user, secret, repo):
    client = logged_in_client(host, workdir, user, secret)
    os.chdir(workdir)
    write("public.txt", b"anyone may pull this\n")
    resp = client.push(target=f"{host}/{repo}:v1", files=["public.txt"], quiet=True)
    check(resp.status_code == 201, f"push: {resp.status_code} {resp.text[:300]}")
    ca = os.environ.get("ORAS_TEST_CA")
    anonymous = oras.client.OrasClient(hostname=host, insecure=not ca, tls_verify=ca or False)
    got = anonymous.pull(target=f"{host}/{repo}:v1", outdir=os.path.join(workdir, "pulled"))
    check([os.path.basename(p) for p in got] == ["public.txt"], f"pulled {got}")
    with open(got[0], "rb") as f:
        check(f.read() == b"anyone may pull this\n", "the pulled file differs")
    print("ORAS_ANONYMOUS_OK")


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    check(len(args) == 5, f"usage: oras_auth.py {mode} HOST WORKDIR USER SECRET REPO")
    {"roundtrip": roundtrip, "push": push, "anonymous": anonymous}[mode](*args)


if __name__ == "__main__":
    try:
        main()
    except CheckFailed as e:
        print(f"oras_auth.py: CHECK FAILED: {e}", file=sys.stderr)
        sys.exit(2)

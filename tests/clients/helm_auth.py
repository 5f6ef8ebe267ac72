#!/usr/bin/env python3
"""Drives Helm (PyPI `helm-python-sdk`: Helm's Go SDK behind a C ABI; no `helm` binary) against a
registry with authentication on.

Usage:
  helm_auth.py roundtrip HOST:PORT WORKDIR USER SECRET
  helm_auth.py login     HOST:PORT WORKDIR USER SECRET
  helm_auth.py push      HOST:PORT WORKDIR USER SECRET
  helm_auth.py anonymous HOST:PORT WORKDIR USER SECRET

Run by tests/helm.rs against a fresh `stowage serve`: over plain HTTP (`plain_http=True`, as
`helm … --plain-http`), or, when HELM_TEST_CA names the server's CA certificate, over HTTPS.
Helm's Go code verifies the certificate against the file in SSL_CERT_FILE, which the test sets
to the same CA (the SDK has no `--ca-file` option; its only other TLS switch skips
verification, which this driver never uses). SECRET is a password or an API token. Credentials
live in WORKDIR/registry.json, never in the machine's Helm configuration.

Every mode first makes a small chart `stowage-demo` 0.1.0 (Chart.yaml, values.yaml and one
ConfigMap template) and packages it (`helm package`).

roundtrip: `helm registry login`; `helm push` to oci://HOST/charts; the tags of
  oci://HOST/charts/stowage-demo; the manifest digest it resolves to; `helm pull` into a new
  directory (the archive must be byte for byte the one pushed); `helm show chart` and
  `show values` of the remote chart; `helm template` of the pulled archive (the ConfigMap
  carries the chart's value); `helm registry logout`, after which a pull by a new client (the
  next `helm` command) must be refused. The
  last line is `HELM_AUTH_OK {json}` with the digests and tags.
login: `helm registry login` only, which the test expects to be refused: exits 0 printing
  `HELM_LOGIN_OK` if it was not, else exits 1 printing `HELM_LOGIN_REFUSED <the SDK's error>`.
push: login, then push, which the test expects to be refused: exits 0 printing `HELM_PUSH_OK`
  if it was not, else exits 1 printing `HELM_PUSH_REFUSED <the SDK's error>`.
anonymous: login and push to oci://HOST/public/charts (an `auth.anonymous_pull` repository),
  then a new client that never logged in pulls it back (the archive must be the one pushed) and
  shows it; printing `HELM_ANONYMOUS_OK`.
The SDK's errors carry the registry's error message, as `helm` prints it. Any failed check exits
2 saying what differed.
"""

import hashlib
import json
import os
import sys

import helm_python as helm

CHART = "stowage-demo"
VERSION = "0.1.0"

CHART_YAML = f"""apiVersion: v2
name: {CHART}
description: A chart made by Stowage's tests
type: application
version: {VERSION}
appVersion: "1.0"
"""
VALUES_YAML = """greeting: hello from stowage
"""
CONFIGMAP = """apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}-greeting
data:
  greeting: {{ .Values.greeting | quote }}
"""


class CheckFailed(Exception):
    pass


def check(cond, message):
    if not cond:
        raise CheckFailed(message)


def sha256_file(path):
    with open(path, "rb") as f:
        return "sha256:" + hashlib.sha256(f.read()).hexdigest()


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def make_chart(workdir):
    """Writes the chart's files and packages it; returns the archive's path."""
    src = os.path.join(workdir, "src", CHART)
    write(os.path.join(src, "Chart.yaml"), CHART_YAML)
    write(os.path.join(src, "values.yaml"), VALUES_YAML)
    write(os.path.join(src, "templates", "configmap.yaml"), CONFIGMAP)
    dist = os.path.join(workdir, "dist")
    os.makedirs(dist)
    archive = helm.package(src, destination=dist)
    check(os.path.basename(archive) == f"{CHART}-{VERSION}.tgz", f"packaged {archive}")
    return archive


class Registry:
    """A registry client for HOST, plain HTTP unless HELM_TEST_CA is set."""

    def __init__(self, host, workdir):
        self.host = host
        self.plain = not os.environ.get("HELM_TEST_CA")
        self.client = helm.RegistryClient(
            plain_http=self.plain, credentials_file=os.path.join(workdir, "registry.json")
        )

    def login(self, user, secret):
        self.client.login(self.host, user, secret, plain_http=self.plain)

    def push(self, archive, path="charts"):
        return self.client.push(archive, f"oci://{self.host}/{path}", plain_http=self.plain)

    def pull(self, destination, path="charts"):
        os.makedirs(destination)
        self.client.pull(
            f"oci://{self.host}/{path}/{CHART}",
            version=VERSION,
            destination=destination,
            plain_http=self.plain,
        )
        return os.path.join(destination, f"{CHART}-{VERSION}.tgz")


def roundtrip(host, workdir, user, secret):
    archive = make_chart(workdir)
    reg = Registry(host, workdir)
    reg.login(user, secret)
    with open(os.path.join(workdir, "registry.json")) as f:
        check(host in json.load(f).get("auths", {}), "login stores the credentials")
    reg.push(archive)

    ref = f"oci://{host}/charts/{CHART}"
    tags = reg.client.tags(ref)
    check(tags == [VERSION], f"tags {tags}")
    manifest = reg.client.resolve(f"{ref}:{VERSION}")
    check(manifest.get("digest", "").startswith("sha256:"), f"resolve: {manifest}")

    pulled = reg.pull(os.path.join(workdir, "pulled"))
    with open(archive, "rb") as a, open(pulled, "rb") as b:
        check(a.read() == b.read(), "the pulled archive differs from the pushed one")
    chart_digest = helm.digest(pulled)
    check(chart_digest == sha256_file(archive), f"helm digest {chart_digest}")

    shown = reg.client.show(f"{ref}:{VERSION}", output_format="chart", plain_http=reg.plain)
    check(f"name: {CHART}" in shown and f"version: {VERSION}" in shown, f"show chart: {shown}")
    values = reg.client.show(f"{ref}:{VERSION}", output_format="values", plain_http=reg.plain)
    check("greeting: hello from stowage" in values, f"show values: {values}")

    rendered = helm.Chart.load(pulled).render(name="demo", namespace="default")
    configmap = rendered.get(f"{CHART}/templates/configmap.yaml", "")
    check("name: demo-greeting" in configmap, f"template: {rendered}")
    check('greeting: "hello from stowage"' in configmap, f"template: {configmap}")

    reg.client.logout(host)
    with open(os.path.join(workdir, "registry.json")) as f:
        check(host not in json.load(f).get("auths", {}), "logout removes the credentials")
    # A new client, as the next `helm` command would be: the logged-out one keeps the token it
    # holds in memory.
    try:
        Registry(host, workdir).pull(os.path.join(workdir, "after-logout"))
        refused = None
    except helm.HelmError as e:
        refused = str(e)
    check(refused is not None, "a pull after logout must be refused")
    print(f"pull after logout refused: {refused}", file=sys.stderr)

    summary = {
        "manifest": manifest["digest"],
        "chart": chart_digest,
        "tags": tags,
        "after_logout": refused,
    }
    print("HELM_AUTH_OK " + json.dumps(summary, sort_keys=True))


def login(host, workdir, user, secret):
    make_chart(workdir)
    try:
        Registry(host, workdir).login(user, secret)
    except helm.HelmError as e:
        print(f"HELM_LOGIN_REFUSED {e}")
        sys.exit(1)
    print("HELM_LOGIN_OK")


def push(host, workdir, user, secret):
    archive = make_chart(workdir)
    reg = Registry(host, workdir)
    reg.login(user, secret)
    try:
        reg.push(archive)
    except helm.HelmError as e:
        print(f"HELM_PUSH_REFUSED {e}")
        sys.exit(1)
    print("HELM_PUSH_OK")


def anonymous(host, workdir, user, secret):
    archive = make_chart(workdir)
    pusher = Registry(host, workdir)
    pusher.login(user, secret)
    pusher.push(archive, path="public/charts")
    anonymous = Registry(host, os.path.join(workdir, "anonymous"))
    pulled = anonymous.pull(os.path.join(workdir, "pulled"), path="public/charts")
    with open(archive, "rb") as a, open(pulled, "rb") as b:
        check(a.read() == b.read(), "the anonymously pulled archive differs from the pushed one")
    shown = anonymous.client.show(
        f"oci://{host}/public/charts/{CHART}:{VERSION}", output_format="chart", plain_http=anonymous.plain
    )
    check(f"name: {CHART}" in shown, f"show chart: {shown}")
    print("HELM_ANONYMOUS_OK")


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    check(len(args) == 4, f"usage: helm_auth.py {mode} HOST WORKDIR USER SECRET")
    modes = {"roundtrip": roundtrip, "login": login, "push": push, "anonymous": anonymous}
    modes[mode](*args)


if __name__ == "__main__":
    try:
        main()
    except CheckFailed as e:
        print(f"helm_auth.py: CHECK FAILED: {e}", file=sys.stderr)
        sys.exit(2)

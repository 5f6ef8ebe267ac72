#!/usr/bin/env python3
"""Lints, renders and validates the Helm chart charts/stowage, for tests/chart.rs.

Usage:
  chart_check.py CHART_DIR OUT_DIR KUBE_VERSION

Helm's own code does the chart work: PyPI `helm-python-sdk` (Helm's Go SDK behind a C ABI;
Debian has no `helm`): `helm lint --strict --kube-version` and `helm template` (which checks the
values against values.schema.json first, as `helm install` does). Every rendered object is then
validated with PyPI `kubernetes-validate` against the strict JSON schemas (unknown fields are
errors) of Kubernetes KUBE_VERSION. That tool has schemas for the Kubernetes API only: objects of
other APIs (the Prometheus Operator's ServiceMonitor, Gateway API's HTTPRoute) are listed as
`"validated": false` with the reason, and tests/chart.rs checks their fields itself.

For each value set (below, and the chart's examples/replicas.yaml) it writes OUT_DIR/<set>.toml,
the stowage.toml of the rendered ConfigMap, for the test to load with the real binary
(`stowage check-config`), and OUT_DIR/<set>.json, the rendered objects. Then it checks that each
wrong value set is refused by the schema, both by `validate_schema` and by rendering, and that
each failing value set (accepted by the schema) is refused by the chart's own `fail` with its
message.

The last line of stdout is `CHART_CHECK_OK {json}` with, per value set, the lint messages and
each object's kind, name and whether it was validated; per wrong value set the refusal; per
failing value set the chart's message.
Exits 1 (printing the reason) on any lint error or warning, render failure, invalid object,
wrong value that is accepted, or failing value set that renders or fails for another reason.
"""

import json
import os
import sys

import helm_python as helm
import kubernetes_validate
import yaml

RELEASE = "reg"
NAMESPACE = "registry"

# The value sets the chart is rendered with.
VALUE_SETS = {
    "defaults": {},
    "s3-ingress-servicemonitor": {
        "storage": {
            "backend": "s3",
            "s3": {
                "bucket": "stowage-blobs",
                "prefix": "prod",
                "region": "eu-west-1",
                "endpoint": "http://minio.minio.svc:9000",
                "pathStyle": True,
                "existingSecret": "stowage-s3",
            },
        },
        "persistence": {"size": "5Gi", "storageClass": "fast"},
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "hosts": [{"host": "registry.example.org", "paths": [{"path": "/", "pathType": "Prefix"}]}],
            "tls": [{"secretName": "registry-tls", "hosts": ["registry.example.org"]}],
        },
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "config": {
            "gc": {"grace_secs": 7200, "retention": [{"repositories": ["ci/**"], "keep_last": 10}]},
            "auth": {"anonymous_pull": ["public/**"]},
        },
    },
    "tls-bootstrap": {
        "tls": {"enabled": True, "existingSecret": "stowage-tls"},
        "auth": {
            "bootstrapAdmin": {"enabled": True, "user": "admin", "existingSecret": "stowage-admin"},
            "bootstrapToken": {
                "enabled": True,
                "name": "ci",
                "scopes": ["ci/**:pull,push"],
                "expiresInDays": 90,
                "existingSecret": "stowage-ci-token",
            },
        },
    },
    "httproute-networkpolicy-pdb": {
        "ingress": {"enabled": False},
        "httpRoute": {
            "enabled": True,
            "parentRefs": [{"name": "public", "namespace": "gateways", "sectionName": "https"}],
            "hostnames": ["registry.example.org"],
            "timeouts": {"request": "0s"},
        },
        "networkPolicy": {
            "enabled": True,
            "ingressFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateways"}}}],
            "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}],
        },
        "podDisruptionBudget": {"enabled": True},
        "persistence": {"enabled": False},
    },
    # Several replicas: a Deployment on PostgreSQL and S3, the signing key and an old key for
    # rotation from Secrets, behind an Ingress.
    "replicas": {
        "replicaCount": 3,
        "catalog": {
            "postgres": {
                "enabled": True,
                "url": "postgres://stowage@postgres.db.svc:5432/stowage",
                "existingSecret": "stowage-db",
                "passwordKey": "db-password",
            }
        },
        "storage": {
            "backend": "s3",
            "s3": {
                "bucket": "stowage-blobs",
                "endpoint": "http://minio.minio.svc:9000",
                "pathStyle": True,
                "existingSecret": "stowage-s3",
            },
        },
        "auth": {
            "signingKey": {"existingSecret": "stowage-signing", "key": "ed25519.pem"},
            "verifyKeys": [{"existingSecret": "stowage-signing-2025", "key": "ed25519.pem"}],
            "bootstrapAdmin": {"enabled": True, "existingSecret": "stowage-admin"},
        },
        "ingress": {"enabled": True, "className": "nginx"},
        "config": {"gc": {"grace_secs": 7200}},
    },
    # The Deployment with one replica (no budget), the URL from the Secret too, authentication
    # off (no signing key needed), spread over zones instead of nodes, a bounded data directory.
    "deployment-url-secret-no-auth": {
        "catalog": {"postgres": {"enabled": True, "existingSecret": "stowage-db", "urlKey": "url"}},
        "storage": {"backend": "s3", "s3": {"bucket": "stowage-blobs"}},
        "auth": {"enabled": False},
        "service": {"sessionAffinity": "ClientIP"},
        "deployment": {
            "spreadOverNodes": False,
            "topologySpreadConstraints": [
                {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule"}
            ],
            "dataSizeLimit": "10Gi",
        },
    },
    # PostgreSQL with the fs backend: still the one-pod StatefulSet on its volume; a signing key
    # from a Secret works there too.
    "postgres-single-node": {
        "catalog": {
            "postgres": {
                "enabled": True,
                "url": "postgres://stowage@postgres.db.svc:5432/stowage?sslmode=require",
                "existingSecret": "stowage-db",
                "caKey": "ca.pem",
            }
        },
        "auth": {"signingKey": {"existingSecret": "stowage-signing"}},
    },
}

PG = {"enabled": True, "url": "postgres://stowage@postgres.db.svc:5432/stowage", "existingSecret": "stowage-db"}
S3 = {"backend": "s3", "s3": {"bucket": "stowage-blobs"}}
SIGNING = {"signingKey": {"existingSecret": "stowage-signing"}}

# Values the schema accepts but the chart refuses to render (its `fail`), with a part of the
# message the refusal must contain.
FAILING_RENDERS = {
    "replicas-without-postgres": (
        {"replicaCount": 2, "storage": S3, "auth": SIGNING},
        "replicaCount=2 needs the catalog on PostgreSQL",
    ),
    "replicas-without-s3": (
        {"replicaCount": 2, "catalog": {"postgres": PG}, "auth": SIGNING},
        "replicaCount=2 needs storage.backend=s3",
    ),
    "replicas-without-signing-key": (
        {"replicaCount": 3, "catalog": {"postgres": PG}, "storage": S3},
        "auth.enabled needs auth.signingKey.existingSecret",
    ),
    "deployment-without-signing-key": (
        {"replicaCount": 1, "catalog": {"postgres": PG}, "storage": S3},
        "auth.enabled needs auth.signingKey.existingSecret",
    ),
    "postgres-without-url": (
        {"catalog": {"postgres": {"enabled": True, "existingSecret": "stowage-db"}}},
        "catalog.postgres.enabled needs the database's URL",
    ),
    "postgres-url-and-urlKey": (
        {"catalog": {"postgres": dict(PG, urlKey="url")}},
        "set one of url and urlKey",
    ),
    "postgres-url-with-password": (
        {"catalog": {"postgres": dict(PG, url="postgres://stowage:hunter2@postgres.db.svc/stowage")}},
        "catalog.postgres.url must not hold the password",
    ),
    "postgres-ca-without-tls": (
        {"catalog": {"postgres": dict(PG, caKey="ca.pem")}},
        "does not say sslmode=require",
    ),
}

# Wrong values the schema must refuse, with a word the refusal must contain.
WRONG_VALUES = {
    "string-replicaCount": ({"replicaCount": "1"}, "replicaCount"),
    "zero-replicas": ({"replicaCount": 0}, "replicaCount"),
    "unknown-backend": ({"storage": {"backend": "gcs"}}, "backend"),
    "s3-without-bucket": ({"storage": {"backend": "s3"}}, "bucket"),
    "bootstrap-admin-without-secret": ({"auth": {"bootstrapAdmin": {"enabled": True}}}, "existingSecret"),
    "misspelt-key": ({"persistance": {"size": "1Gi"}}, "persistance"),
    "bad-size": ({"persistence": {"size": "lots"}}, "size"),
    "postgres-without-secret": ({"catalog": {"postgres": dict(PG, existingSecret="")}}, "existingSecret"),
    "verify-key-without-secret": ({"auth": {"verifyKeys": [{"key": "old.pem"}]}}, "existingSecret"),
    "unknown-session-affinity": ({"service": {"sessionAffinity": "Cookie"}}, "sessionAffinity"),
}


def fail(msg):
    print(f"CHART_CHECK_FAILED {msg}")
    sys.exit(1)


def check_set(chart_dir, out_dir, kube_version, name, values):
    lint = helm.lint(chart_dir, values, strict=True, kube_version=kube_version)
    serious = [m for m in lint.get("messages", []) if m.get("severity", 0) >= 2]
    if lint.get("errors") or serious:
        fail(f"{name}: helm lint: {json.dumps(lint)}")
    chart = helm.Chart.load(chart_dir)
    try:
        rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    except helm.HelmError as e:
        fail(f"{name}: helm template: {e}")
    objects = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append(doc)
    report = []
    for obj in objects:
        entry = {
            "apiVersion": obj.get("apiVersion"),
            "kind": obj.get("kind"),
            "name": obj.get("metadata", {}).get("name"),
        }
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
            entry["validated"] = True
        except kubernetes_validate.SchemaNotFoundError:
            entry["validated"] = False
            entry["reason"] = (
                f"kubernetes-validate has no schema for {entry['apiVersion']} {entry['kind']} "
                f"(not a Kubernetes API)"
            )
        except kubernetes_validate.ValidationError as e:
            fail(f"{name}: {entry['kind']}/{entry['name']} is invalid for Kubernetes {kube_version}: {e}")
        report.append(entry)
    config = [o for o in objects if o.get("kind") == "ConfigMap"]
    if len(config) != 1 or "stowage.toml" not in config[0].get("data", {}):
        fail(f"{name}: no ConfigMap with stowage.toml")
    with open(os.path.join(out_dir, f"{name}.toml"), "w") as f:
        f.write(config[0]["data"]["stowage.toml"])
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(objects, f)
    return {"lint": lint.get("messages", []), "objects": report}


def check_wrong(chart_dir, name, values, word):
    chart = helm.Chart.load(chart_dir)
    try:
        chart.validate_schema(values)
        fail(f"{name}: the schema accepted {values}")
    except helm.HelmValuesError as e:
        refusal = str(e)
    if word not in refusal:
        fail(f"{name}: the refusal does not name {word!r}: {refusal}")
    try:
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        fail(f"{name}: rendering accepted {values}")
    except helm.HelmError:
        pass
    return refusal


def check_failing(chart_dir, name, values, message):
    chart = helm.Chart.load(chart_dir)
    try:
        chart.validate_schema(values)
    except helm.HelmValuesError as e:
        fail(f"{name}: the schema refused {values} before the chart could: {e}")
    try:
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        fail(f"{name}: rendering accepted {values}")
    except helm.HelmError as e:
        refusal = str(e)
    if message not in refusal:
        fail(f"{name}: the refusal does not say {message!r}: {refusal}")
    return refusal


def main():
    if len(sys.argv) != 4:
        print(__doc__)
        sys.exit(2)
    chart_dir, out_dir, kube_version = sys.argv[1:]
    result = {
        "helm": helm.helm_sdk_version(),
        "kube_version": kube_version,
        "sets": {},
        "wrong": {},
        "failing": {},
    }
    sets = dict(VALUE_SETS)
    # The example of the chart's README, as a user passes it (`-f examples/replicas.yaml`).
    with open(os.path.join(chart_dir, "examples", "replicas.yaml")) as f:
        sets["example-replicas"] = yaml.safe_load(f)
    for name, values in sets.items():
        result["sets"][name] = check_set(chart_dir, out_dir, kube_version, name, values)
    for name, (values, word) in WRONG_VALUES.items():
        result["wrong"][name] = check_wrong(chart_dir, name, values, word)
    for name, (values, message) in FAILING_RENDERS.items():
        result["failing"][name] = check_failing(chart_dir, name, values, message)
    print("CHART_CHECK_OK " + json.dumps(result))


if __name__ == "__main__":
    main()

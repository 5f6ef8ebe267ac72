#!/usr/bin/env python3
"""Renders contrib/grafana/stowage.json as a picture from real data (docs/img/dashboard.png).

Grafana is not packaged for Debian, so this draws the dashboard itself: it starts a Stowage
binary and a real Prometheus (Debian's `prometheus`) scraping it every second, drives a
workload (image pushes and re-pushes, manifest and blob pulls, failed logins, Spack caches
pushed from the test fixtures and their index read), then runs every panel's PromQL through
Prometheus's range-query API and plots the answers with matplotlib in the dashboard's grid.
Panel titles, queries, units and layout all come from the dashboard JSON.

    python3 contrib/grafana/preview.py --stowage target/release/stowage --out docs/img/dashboard.png

Needs: prometheus on PATH, matplotlib (pip). Everything runs on 127.0.0.1 in a temp dir.
"""

import argparse
import base64
import hashlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(ROOT, "tests/fixtures/spack-oci/registries/http-noauth/spack_buildcache")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, headers=None, auth=None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


def sha(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


class Registry:
    def __init__(self, base, auth):
        self.base, self.auth = base, auth
        self.token = {}

    def bearer(self, repo):
        if repo not in self.token:
            q = urllib.parse.urlencode({"service": "stowage", "scope": f"repository:{repo}:pull,push,delete"})
            st, body, _ = http("GET", f"{self.base}/token?{q}", auth=self.auth)
            assert st == 200, (st, body)
            self.token[repo] = json.loads(body)["token"]
        return {"Authorization": "Bearer " + self.token[repo]}

    def req(self, method, repo, path, body=None, headers=None):
        h = dict(self.bearer(repo))
        h.update(headers or {})
        return http(method, f"{self.base}/v2/{repo}/{path}", body, h)

    def blob(self, repo, data):
        d = sha(data)
        st, _, _ = self.req("POST", repo, f"blobs/uploads/?digest={d}", data,
                            {"Content-Type": "application/octet-stream"})
        assert st == 201, st
        return d

    def image(self, repo, tag, layer):
        config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [sha(layer)]}}).encode()
        cd, ld = self.blob(repo, config), self.blob(repo, layer)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": len(layer)}],
        }).encode()
        st, _, _ = self.req("PUT", repo, f"manifests/{tag}", manifest,
                            {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        assert st == 201, st
        return ld

    def spack_fixture(self, repo):
        summary = json.load(open(os.path.join(FIXTURE, "summary.json")))
        for name in os.listdir(os.path.join(FIXTURE, "blobs")):
            self.blob(repo, open(os.path.join(FIXTURE, "blobs", name), "rb").read())
        tags = [t for t in summary["tags"] if t != "index.spack"]
        tags.sort(key=lambda t: b'"manifests"' in open(os.path.join(FIXTURE, "manifests", t + ".json"), "rb").read())
        for tag in tags:
            body = open(os.path.join(FIXTURE, "manifests", tag + ".json"), "rb").read()
            st, _, _ = self.req("PUT", repo, f"manifests/{tag}", body,
                                {"Content-Type": summary["tags"][tag]["content_type"]})
            assert st == 201, (tag, st)


def workload(reg, base, seconds, stop):
    rnd = random.Random(7)
    end = time.time() + seconds
    layers = {}
    reg.spack_fixture("spack/cache")
    reg.req("GET", "spack/cache", "manifests/index.spack", headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})

    def pushes():
        i = 0
        while time.time() < end and not stop.is_set():
            repo = f"ci/app{i % 4}"
            tag = f"build-{i % 12}"  # tags are re-pushed: the old images become garbage
            layers[(repo, tag)] = reg.image(repo, tag, os.urandom(rnd.randint(50_000, 2_000_000)))
            i += 1
            time.sleep(0.2)

    def pulls():
        while time.time() < end and not stop.is_set():
            if not layers:
                time.sleep(0.1)
                continue
            (repo, tag), layer = rnd.choice(list(layers.items()))
            reg.req("GET", repo, f"manifests/{tag}", headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
            reg.req("GET", repo, f"blobs/{layer}")

    def logins():
        while time.time() < end and not stop.is_set():
            # Another name than the workload's user, and seldom: the limiter would lock it out.
            http("GET", f"{base}/token?service=stowage", auth="mallory:guess")
            time.sleep(12)

    def spack():
        time.sleep(seconds / 2)
        reg.spack_fixture("spack/nightly")
        time.sleep(10)
        reg.req("GET", "spack/nightly", "manifests/index.spack", headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})

    threads = [threading.Thread(target=f) for f in (pushes, pulls, pulls, pulls, logins, spack)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def query(prom, expr, start, end, step):
    expr = (expr.replace("$__rate_interval", "15s").replace("$__range", "3m")
            .replace("[1h]", "[3m]").replace('"$job"', '".*"'))
    q = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    st, body, _ = http("GET", f"{prom}/api/v1/query_range?{q}")
    data = json.loads(body)
    if data.get("status") != "success":
        raise SystemExit(f"Prometheus refused {expr!r}: {data}")
    return data["data"]["result"]


def legend(fmt, metric):
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt) or "value"


def scale(unit, v):
    """A value and its unit suffix for a stat panel."""
    if unit == "bytes":
        for u in ["B", "KiB", "MiB", "GiB", "TiB"]:
            if abs(v) < 1024:
                return f"{v:.1f} {u}"
            v /= 1024
    if unit == "percentunit":
        return f"{v * 100:.2f} %"
    if unit == "s":
        return f"{v:.0f} s"
    if unit == "reqps":
        return f"{v:.1f} req/s"
    return f"{v:,.0f}"


def render(dashboard, prom, start, end, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    unit_h = 0.42
    fig = plt.figure(figsize=(24, rows * unit_h), dpi=70, facecolor="#111217")
    step = max(1, int((end - start) / 200))
    for p in panels:
        g = p["gridPos"]
        left, width = g["x"] / 24, g["w"] / 24
        bottom, height = 1 - (g["y"] + g["h"]) / rows, g["h"] / rows
        if p["type"] == "row":
            fig.text(left + 0.005, bottom + height / 2, p["title"], color="#d8d9da", fontsize=15, weight="bold", va="center")
            continue
        ax = fig.add_axes([left + 0.006, bottom + 0.012, width - 0.012, height - 0.04], facecolor="#181b1f")
        ax.set_title(p["title"], color="#d8d9da", fontsize=12, loc="left")
        for s in ax.spines.values():
            s.set_color("#2c3235")
        ax.tick_params(colors="#8e8e8e", labelsize=8)
        unit = p["fieldConfig"]["defaults"].get("unit", "short")
        if p["type"] == "stat":
            res = query(prom, p["targets"][0]["expr"], start, end, step)
            v = float(res[0]["values"][-1][1]) if res else float("nan")
            ax.text(0.5, 0.45, scale(unit, v), color="#73bf69", fontsize=22, ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        for t in p["targets"]:
            for series in query(prom, t["expr"], start, end, step):
                xs = [float(x) - start for x, _ in series["values"]]
                ys = [float(y) for _, y in series["values"]]
                ax.plot(xs, ys, linewidth=1.2, label=legend(t.get("legendFormat", ""), series["metric"]))
        ax.set_xlim(0, end - start)
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        if all(min(line.get_ydata(), default=0) >= 0 for line in ax.lines):
            ax.set_ylim(bottom=0, top=max([max(l.get_ydata(), default=0) for l in ax.lines] + [0]) * 1.15 or 1)
        ax.grid(color="#2c3235", linewidth=0.5)
        if ax.lines:
            ax.legend(fontsize=7, loc="upper left", facecolor="#181b1f", edgecolor="#2c3235", labelcolor="#d8d9da", ncol=2)
        else:
            ax.text(0.5, 0.5, "no data", color="#8e8e8e", ha="center", transform=ax.transAxes)
        ax.set_ylabel({"reqps": "req/s", "Bps": "B/s", "bytes": "bytes", "s": "seconds", "percentunit": "ratio"}.get(unit, ""), color="#8e8e8e", fontsize=8)
    fig.savefig(out, facecolor=fig.get_facecolor())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stowage", required=True)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs/img/dashboard.png"))
    ap.add_argument("--seconds", type=int, default=150)
    args = ap.parse_args()
    dashboard = json.load(open(os.path.join(ROOT, "contrib/grafana/stowage.json")))
    tmp = tempfile.mkdtemp(prefix="stowage-dashboard-")
    procs = []
    try:
        port, prom_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("STOWAGE_")}
        data = os.path.join(tmp, "data")
        subprocess.run([args.stowage, "user", "add", "ci", "--admin", "--data-dir", data],
                       input=b"preview-password\n", env=env, check=True, capture_output=True)
        env.update({
            "STOWAGE_LISTEN": f"127.0.0.1:{port}", "STOWAGE_DATA_DIR": data,
            "STOWAGE_GC__INTERVAL_SECS": "10", "STOWAGE_GC__GRACE_SECS": "20",
            "STOWAGE_GC__SPACK_INDEX_GRACE_SECS": "20", "RUST_LOG": "warn",
        })
        procs.append(subprocess.Popen([args.stowage, "serve"], env=env, stdout=subprocess.DEVNULL))
        config = os.path.join(tmp, "prometheus.yml")
        with open(config, "w") as f:
            f.write(f"global: {{ scrape_interval: 1s }}\nscrape_configs:\n"
                    f"  - job_name: stowage\n    static_configs: [{{ targets: ['127.0.0.1:{port}'] }}]\n")
        procs.append(subprocess.Popen(["prometheus", f"--config.file={config}",
                                       f"--storage.tsdb.path={tmp}/tsdb",
                                       f"--web.listen-address=127.0.0.1:{prom_port}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        base, prom = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{prom_port}"
        for _ in range(100):
            try:
                if http("GET", f"{base}/livez")[0] == 200 and http("GET", f"{prom}/-/ready")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        start = time.time()
        workload(Registry(base, "ci:preview-password"), base, args.seconds, threading.Event())
        time.sleep(5)
        end = time.time()
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        render(dashboard, prom, start, end, args.out)
        print(f"wrote {args.out}")
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

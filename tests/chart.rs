//! The Helm chart `charts/stowage` (issue 13), checked with Helm's own code and the Kubernetes
//! API schemas, and its rendered configuration loaded by the real binary.
//!
//! `tests/clients/chart_check.py` (PyPI `helm-python-sdk`, Helm's Go SDK, and
//! `kubernetes-validate`, both pinned in `scripts/test`) lints the chart (`--strict`, for
//! [`KUBE_VERSION`]), renders it for four value sets (defaults; S3 + Ingress + ServiceMonitor;
//! TLS + bootstrap admin and token from Secrets; HTTPRoute + NetworkPolicy + PDB without
//! persistence), validates every rendered object against the strict schemas of Kubernetes
//! [`KUBE_VERSION`], and has the schema refuse wrong values (a string `replicaCount`, two
//! replicas, an unknown backend, …). kubernetes-validate knows only the Kubernetes API: the
//! ServiceMonitor and HTTPRoute are checked here field by field instead (their port and
//! backend must match the Service the chart makes).
//!
//! Here: the objects each set must make and what they must say (one replica, the security
//! context, probes, secrets mounted where the configuration reads them), and each set's
//! `stowage.toml` loaded by `stowage check-config`, the server's own loader.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// The Kubernetes version the chart is linted for and its objects validated against.
const KUBE_VERSION: &str = "1.37.0";

/// The result of one chart_check.py run.
struct Checked {
    report: Value,
    out: tempfile::TempDir,
}

impl Checked {
    fn objects(&self, set: &str) -> Vec<Value> {
        let text = std::fs::read(self.out.path().join(format!("{set}.json"))).expect("rendered objects");
        serde_json::from_slice::<Vec<Value>>(&text).expect("objects JSON")
    }

    fn one(&self, set: &str, kind: &str) -> Value {
        let all: Vec<Value> = self.objects(set).into_iter().filter(|o| o["kind"] == kind).collect();
        assert_eq!(all.len(), 1, "{set}: one {kind}, not {}", all.len());
        all.into_iter().next().expect("one")
    }

    /// `stowage check-config` on the set's stowage.toml: the configuration it would serve with.
    fn loaded_config(&self, set: &str) -> toml::Value {
        let path = self.out.path().join(format!("{set}.toml"));
        let out = Command::new(env!("CARGO_BIN_EXE_stowage"))
            .arg("check-config")
            .arg("--config")
            .arg(&path)
            .env_remove("STOWAGE_BOOTSTRAP_ADMIN_PASSWORD")
            .stdin(Stdio::null())
            .output()
            .expect("run stowage check-config");
        let file = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            out.status.success(),
            "{set}: stowage refuses the chart's stowage.toml: {}\n{file}",
            String::from_utf8_lossy(&out.stderr)
        );
        toml::from_str(&String::from_utf8_lossy(&out.stdout)).expect("check-config prints TOML")
    }
}

fn run_chart_check() -> Checked {
    let python = std::env::var("ORAS_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().expect("temp dir");
    let mut cmd = Command::new(&python);
    cmd.arg(root.join("tests/clients/chart_check.py"))
        .arg(root.join("charts/stowage"))
        .arg(out.path())
        .arg(KUBE_VERSION)
        .env("PYTHONUNBUFFERED", "1")
        .env("HOME", out.path());
    let output = common::dockerd::output_within(&mut cmd, Duration::from_secs(300));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("No module named"),
        "{python} lacks a module (scripts/test installs helm-python-sdk and kubernetes-validate): {stderr}"
    );
    assert!(output.status.success(), "chart_check.py failed:\n{stdout}\n{stderr}");
    let line = stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("CHART_CHECK_OK "))
        .unwrap_or_else(|| panic!("no CHART_CHECK_OK line:\n{stdout}\n{stderr}"));
    Checked {
        report: serde_json::from_str(line).expect("report JSON"),
        out,
    }
}

mod common;

fn container(sts: &Value) -> &Value {
    let c = &sts["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["name"], "stowage");
    c
}

fn env_of<'a>(c: &'a Value, name: &str) -> Option<&'a Value> {
    c["env"].as_array()?.iter().find(|e| e["name"] == name)
}

fn volume<'a>(sts: &'a Value, name: &str) -> Option<&'a Value> {
    sts["spec"]["template"]["spec"]["volumes"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == name)
}

fn mount_path<'a>(c: &'a Value, volume: &str) -> Option<&'a str> {
    c["volumeMounts"].as_array()?.iter().find(|m| m["name"] == volume)?["mountPath"].as_str()
}

/// A table path in a loaded configuration (`["auth", "bootstrap_admin", "user"]`).
fn at<'a>(config: &'a toml::Value, path: &[&str]) -> &'a toml::Value {
    path.iter().fold(config, |v, k| {
        v.get(k).unwrap_or_else(|| panic!("no {path:?} in {config}"))
    })
}

#[test]
fn the_chart_lints_renders_valid_objects_and_its_schema_refuses_wrong_values() {
    let checked = run_chart_check();
    let report = &checked.report;
    assert_eq!(report["kube_version"], KUBE_VERSION);

    // Every object of every set: validated against Kubernetes' schemas, or (only the CRD kinds)
    // reported as having none.
    let expected_kinds: [(&str, &[&str]); 4] = [
        (
            "defaults",
            &["ConfigMap", "Service", "Service", "ServiceAccount", "StatefulSet"],
        ),
        (
            "s3-ingress-servicemonitor",
            &[
                "ConfigMap",
                "Ingress",
                "Service",
                "Service",
                "ServiceAccount",
                "ServiceMonitor",
                "StatefulSet",
            ],
        ),
        (
            "tls-bootstrap",
            &["ConfigMap", "Service", "Service", "ServiceAccount", "StatefulSet"],
        ),
        (
            "httproute-networkpolicy-pdb",
            &[
                "ConfigMap",
                "HTTPRoute",
                "NetworkPolicy",
                "PodDisruptionBudget",
                "Service",
                "Service",
                "ServiceAccount",
                "StatefulSet",
            ],
        ),
    ];
    for (set, kinds) in expected_kinds {
        let objects = report["sets"][set]["objects"].as_array().expect("objects");
        let mut got: Vec<&str> = objects.iter().map(|o| o["kind"].as_str().expect("kind")).collect();
        got.sort_unstable();
        assert_eq!(got, kinds, "{set}");
        for o in objects {
            let crd = matches!(o["kind"].as_str(), Some("ServiceMonitor" | "HTTPRoute"));
            assert_eq!(o["validated"], !crd, "{set}: {o}");
        }
    }

    // Defaults: one replica on a volume, hardened, probed.
    let sts = checked.one("defaults", "StatefulSet");
    assert_eq!(sts["spec"]["replicas"], 1);
    let pod = &sts["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsUser"], 10001);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["automountServiceAccountToken"], false);
    let c = container(&sts);
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["scheme"], "HTTP");
    assert!(c["resources"]["requests"]["memory"].is_string());
    let claim = &sts["spec"]["volumeClaimTemplates"][0];
    assert_eq!(claim["metadata"]["name"], "data");
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "20Gi");
    assert_eq!(mount_path(c, "data"), Some("/var/lib/stowage"));
    let config = checked.loaded_config("defaults");
    assert_eq!(at(&config, &["storage", "backend"]).as_str(), Some("fs"));
    assert_eq!(at(&config, &["data_dir"]).as_str(), Some("/var/lib/stowage"));
    assert_eq!(at(&config, &["listen"]).as_str(), Some("0.0.0.0:5000"));
    assert_eq!(at(&config, &["auth", "enabled"]).as_bool(), Some(true));

    // S3 from values, credentials from the existing Secret; Ingress for large uploads;
    // ServiceMonitor on the Service's port.
    let set = "s3-ingress-servicemonitor";
    let sts = checked.one(set, "StatefulSet");
    let c = container(&sts);
    for (var, key) in [
        ("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
        ("AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"),
    ] {
        let e = env_of(c, var).unwrap_or_else(|| panic!("{var} in {c}"));
        assert_eq!(e["valueFrom"]["secretKeyRef"]["name"], "stowage-s3");
        assert_eq!(e["valueFrom"]["secretKeyRef"]["key"], key);
    }
    let config = checked.loaded_config(set);
    assert_eq!(at(&config, &["storage", "backend"]).as_str(), Some("s3"));
    assert_eq!(
        at(&config, &["storage", "s3", "bucket"]).as_str(),
        Some("stowage-blobs")
    );
    assert_eq!(
        at(&config, &["storage", "s3", "endpoint"]).as_str(),
        Some("http://minio.minio.svc:9000")
    );
    assert_eq!(at(&config, &["storage", "s3", "path_style"]).as_bool(), Some(true));
    // values.config is merged in, integers stay integers.
    assert_eq!(at(&config, &["gc", "grace_secs"]).as_integer(), Some(7200));
    assert_eq!(at(&config, &["gc", "retention"])[0]["keep_last"].as_integer(), Some(10));
    assert_eq!(at(&config, &["auth", "anonymous_pull"])[0].as_str(), Some("public/**"));
    let ingress = checked.one(set, "Ingress");
    let notes = &ingress["metadata"]["annotations"];
    assert_eq!(notes["nginx.ingress.kubernetes.io/proxy-body-size"], "0");
    assert_eq!(notes["nginx.ingress.kubernetes.io/proxy-request-buffering"], "off");
    let service = checked
        .objects(set)
        .into_iter()
        .find(|o| o["kind"] == "Service" && o["spec"]["clusterIP"] != "None")
        .expect("the Service");
    let backend = &ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"];
    assert_eq!(backend["name"], service["metadata"]["name"]);
    assert_eq!(backend["port"]["name"], service["spec"]["ports"][0]["name"]);
    let monitor = checked.one(set, "ServiceMonitor");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], service["spec"]["ports"][0]["name"]);
    assert_eq!(endpoint["path"], "/metrics");
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("selector")
    {
        assert_eq!(
            &service["metadata"]["labels"][k], v,
            "the ServiceMonitor selects the Service"
        );
    }

    // TLS in the pod, bootstrap admin and token from Secrets mounted where the config reads them.
    let set = "tls-bootstrap";
    let sts = checked.one(set, "StatefulSet");
    let c = container(&sts);
    assert_eq!(c["readinessProbe"]["httpGet"]["scheme"], "HTTPS");
    assert_eq!(c["livenessProbe"]["httpGet"]["scheme"], "HTTPS");
    assert_eq!(
        volume(&sts, "tls").expect("tls volume")["secret"]["secretName"],
        "stowage-tls"
    );
    let config = checked.loaded_config(set);
    let tls_dir = mount_path(c, "tls").expect("tls mount");
    assert_eq!(
        at(&config, &["tls", "cert"]).as_str(),
        Some(format!("{tls_dir}/tls.crt").as_str())
    );
    assert_eq!(
        at(&config, &["tls", "key"]).as_str(),
        Some(format!("{tls_dir}/tls.key").as_str())
    );
    for (vol, secret, key, path, setting) in [
        (
            "bootstrap-admin",
            "stowage-admin",
            "password",
            "password",
            ["bootstrap_admin", "password_file"],
        ),
        (
            "bootstrap-token",
            "stowage-ci-token",
            "token",
            "token",
            ["bootstrap_token", "secret_file"],
        ),
    ] {
        let v = volume(&sts, vol).unwrap_or_else(|| panic!("{vol} volume"));
        assert_eq!(v["secret"]["secretName"], secret);
        assert_eq!(v["secret"]["items"][0]["key"], key);
        let file = format!("{}/{}", mount_path(c, vol).expect("mount"), path);
        assert_eq!(
            at(&config, &["auth", setting[0], setting[1]]).as_str(),
            Some(file.as_str())
        );
    }
    assert_eq!(
        at(&config, &["auth", "bootstrap_admin", "user"]).as_str(),
        Some("admin")
    );
    assert_eq!(
        at(&config, &["auth", "bootstrap_token", "expires_in_days"]).as_integer(),
        Some(90)
    );
    assert_eq!(
        at(&config, &["auth", "bootstrap_token", "scopes"])[0].as_str(),
        Some("ci/**:pull,push")
    );

    // HTTPRoute to the Service; NetworkPolicy on the registry port; PDB; no persistence.
    let set = "httproute-networkpolicy-pdb";
    let route = checked.one(set, "HTTPRoute");
    assert_eq!(route["apiVersion"], "gateway.networking.k8s.io/v1");
    assert_eq!(route["spec"]["parentRefs"][0]["name"], "public");
    assert_eq!(route["spec"]["hostnames"][0], "registry.example.org");
    let rule = &route["spec"]["rules"][0];
    assert_eq!(rule["backendRefs"][0]["name"], "reg-stowage");
    assert_eq!(rule["backendRefs"][0]["port"], 5000);
    assert_eq!(rule["timeouts"]["request"], "0s");
    assert_eq!(rule["matches"][0]["path"]["type"], "PathPrefix");
    let policy = checked.one(set, "NetworkPolicy");
    assert_eq!(policy["spec"]["ingress"][0]["ports"][0]["port"], "registry");
    assert_eq!(checked.one(set, "PodDisruptionBudget")["spec"]["minAvailable"], 1);
    let sts = checked.one(set, "StatefulSet");
    assert!(sts["spec"]["volumeClaimTemplates"].is_null());
    assert!(volume(&sts, "data").expect("data volume")["emptyDir"].is_object());
    checked.loaded_config(set);

    // Wrong values are refused by values.schema.json, naming what is wrong.
    let wrong = report["wrong"].as_object().expect("wrong");
    for (name, word) in [
        ("string-replicaCount", "got string, want integer"),
        ("two-replicas", "replicaCount"),
        ("unknown-backend", "value must be one of 'fs', 's3'"),
        ("s3-without-bucket", "bucket"),
        ("bootstrap-admin-without-secret", "existingSecret"),
        ("misspelt-key", "persistance"),
        ("bad-size", "size"),
    ] {
        let refusal = wrong[name].as_str().unwrap_or_else(|| panic!("{name} not checked"));
        assert!(refusal.contains(word), "{name}: {refusal}");
    }
}

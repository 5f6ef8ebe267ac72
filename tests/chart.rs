//! The Helm chart `charts/stowage` (issues 13 and 17), checked with Helm's own code and the
//! Kubernetes API schemas, and its rendered configuration loaded by the real binary.
//!
//! `tests/clients/chart_check.py` (PyPI `helm-python-sdk`, Helm's Go SDK, and
//! `kubernetes-validate`, both pinned in `scripts/test`) lints the chart (`--strict`, for
//! [`KUBE_VERSION`]), renders it for eight value sets (defaults; S3 + Ingress + ServiceMonitor;
//! TLS + bootstrap admin and token from Secrets; HTTPRoute + NetworkPolicy + PDB without
//! persistence; three replicas on PostgreSQL and S3 with the token keys from Secrets; the
//! Deployment with the database URL from a Secret and authentication off; PostgreSQL with the fs
//! backend; the chart's `examples/replicas.yaml`), validates every rendered object against the
//! strict schemas of Kubernetes [`KUBE_VERSION`], has the schema refuse wrong values (a string
//! `replicaCount`, no replicas, an unknown backend, …) and the chart's own `fail` refuse what
//! cannot run (replicas without PostgreSQL, without S3, without a shared signing key, …).
//! kubernetes-validate knows only the Kubernetes API: the ServiceMonitor and HTTPRoute are
//! checked here field by field instead (their port and backend must match the Service the chart
//! makes).
//!
//! Here: the objects each set must make and what they must say (the replica count, the security
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
        self.loaded_config_with(set, &[])
    }

    /// The same, with `env` set as the pod's environment sets it (values the pod takes from
    /// Secrets: `STOWAGE_CATALOG__URL`).
    fn loaded_config_with(&self, set: &str, env: &[(&str, &str)]) -> toml::Value {
        let path = self.out.path().join(format!("{set}.toml"));
        let out = Command::new(env!("CARGO_BIN_EXE_stowage"))
            .arg("check-config")
            .arg("--config")
            .arg(&path)
            .env_remove("STOWAGE_BOOTSTRAP_ADMIN_PASSWORD")
            .env_remove("STOWAGE_CATALOG__URL")
            .envs(env.iter().copied())
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

    /// The set's stowage.toml as the chart wrote it (before the server's defaults).
    fn rendered_config(&self, set: &str) -> toml::Value {
        let text = std::fs::read_to_string(self.out.path().join(format!("{set}.toml"))).expect("rendered stowage.toml");
        toml::from_str(&text).expect("the chart writes TOML")
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

fn init_container(workload: &Value) -> &Value {
    let c = &workload["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(c["name"], "check-config");
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

fn mount<'a>(c: &'a Value, volume: &str) -> &'a Value {
    c["volumeMounts"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == volume))
        .unwrap_or_else(|| panic!("no mount of {volume} in {c}"))
}

/// The file a Secret key lands in: `mount/path` of the item of `source` (a `secret` volume
/// source, or one source of a projected volume) that holds `key` of Secret `secret`.
fn secret_file(c: &Value, volume_name: &str, source: &Value, secret: &str, key: &str) -> String {
    let name = source.get("secretName").or_else(|| source.get("name"));
    assert_eq!(name, Some(&Value::from(secret)), "{volume_name}: {source}");
    let item = source["items"]
        .as_array()
        .and_then(|items| items.iter().find(|i| i["key"] == key))
        .unwrap_or_else(|| panic!("{volume_name}: no item for key {key} in {source}"));
    let dir = mount_path(c, volume_name).unwrap_or_else(|| panic!("{volume_name} is not mounted"));
    format!("{dir}/{}", item["path"].as_str().expect("item path"))
}

fn service_of(objects: &[Value]) -> &Value {
    let services: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "Service" && o["spec"]["clusterIP"] != "None")
        .collect();
    assert_eq!(services.len(), 1, "one load-balancing Service");
    services[0]
}

/// Whether `selector` (matchLabels, or a Service's selector) selects the pods of `workload`.
fn selects(selector: &Value, workload: &Value) -> bool {
    let labels = &workload["spec"]["template"]["metadata"]["labels"];
    let pairs = selector.as_object().expect("selector labels");
    !pairs.is_empty() && pairs.iter().all(|(k, v)| &labels[k] == v)
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
    let expected_kinds: [(&str, &[&str]); 8] = [
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
        (
            "replicas",
            &[
                "ConfigMap",
                "Deployment",
                "Ingress",
                "PodDisruptionBudget",
                "Service",
                "ServiceAccount",
            ],
        ),
        (
            "deployment-url-secret-no-auth",
            &["ConfigMap", "Deployment", "Service", "ServiceAccount"],
        ),
        (
            "postgres-single-node",
            &["ConfigMap", "Service", "Service", "ServiceAccount", "StatefulSet"],
        ),
        (
            "example-replicas",
            &[
                "ConfigMap",
                "Deployment",
                "Ingress",
                "PodDisruptionBudget",
                "Service",
                "ServiceAccount",
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
        ("zero-replicas", "replicaCount"),
        ("unknown-backend", "value must be one of 'fs', 's3'"),
        ("s3-without-bucket", "bucket"),
        ("bootstrap-admin-without-secret", "existingSecret"),
        ("misspelt-key", "persistance"),
        ("bad-size", "size"),
        ("postgres-without-secret", "/catalog/postgres/existingSecret"),
        ("verify-key-without-secret", "missing property 'existingSecret'"),
        ("unknown-session-affinity", "sessionAffinity"),
    ] {
        let refusal = wrong[name].as_str().unwrap_or_else(|| panic!("{name} not checked"));
        assert!(refusal.contains(word), "{name}: {refusal}");
    }
}

/// `replicaCount > 1` (issue 17): a Deployment of that many pods sharing the PostgreSQL catalog
/// and the S3 bucket, the database password and the token keys from Secrets mounted as files,
/// a budget, a rolling update that never drops below the count, pods spread over nodes, the same
/// probes and hardening as the StatefulSet, a Service that keeps a client on one replica; and
/// the chart's refusal of replicas that could not share what they need.
#[test]
fn the_replicas_mode_is_a_deployment_on_postgres_and_s3_with_keys_from_secrets() {
    let checked = run_chart_check();
    let single = checked.one("defaults", "StatefulSet");

    let set = "replicas";
    let objects = checked.objects(set);
    assert!(
        objects.iter().all(|o| o["kind"] != "StatefulSet"),
        "no StatefulSet beside the Deployment"
    );
    let deploy = checked.one(set, "Deployment");
    assert_eq!(deploy["spec"]["replicas"], 3);
    assert_eq!(deploy["spec"]["strategy"]["type"], "RollingUpdate");
    assert_eq!(deploy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    assert_eq!(deploy["spec"]["strategy"]["rollingUpdate"]["maxSurge"], 1);
    assert!(selects(&deploy["spec"]["selector"]["matchLabels"], &deploy));
    let pod = &deploy["spec"]["template"]["spec"];
    let single_pod = &single["spec"]["template"]["spec"];
    let c = container(&deploy);
    let single_c = container(&single);
    // The single-node mode's probes and hardening, unchanged.
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        assert!(c[probe]["httpGet"].is_object(), "{probe}");
        assert_eq!(c[probe], single_c[probe], "{probe}");
    }
    assert_eq!(c["securityContext"], single_c["securityContext"]);
    assert_eq!(pod["securityContext"], single_pod["securityContext"]);
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(init_container(&deploy)["args"], serde_json::json!(["check-config"]));
    // No claim: the data directory (lock file, proxy spool) is the pod's own emptyDir.
    assert!(deploy["spec"]["volumeClaimTemplates"].is_null());
    assert_eq!(
        volume(&deploy, "data").expect("data volume")["emptyDir"],
        serde_json::json!({})
    );
    assert_eq!(mount_path(c, "data"), Some("/var/lib/stowage"));
    let spread = &pod["topologySpreadConstraints"];
    assert_eq!(spread.as_array().map(Vec::len), Some(1), "{spread}");
    assert_eq!(spread[0]["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(spread[0]["whenUnsatisfiable"], "ScheduleAnyway");
    assert_eq!(spread[0]["maxSkew"], 1);
    assert!(selects(&spread[0]["labelSelector"]["matchLabels"], &deploy));
    assert_eq!(spread[0]["matchLabelKeys"], serde_json::json!(["pod-template-hash"]));

    // The configuration the pods get: PostgreSQL and S3, the password and the keys as files
    // mounted from the Secrets, read-only, owner-only (the kubelet adds the fsGroup's read).
    let config = checked.loaded_config(set);
    assert_eq!(
        at(&config, &["catalog", "url"]).as_str(),
        Some("postgres://stowage@postgres.db.svc:5432/stowage")
    );
    assert_eq!(at(&config, &["storage", "backend"]).as_str(), Some("s3"));
    assert_eq!(
        at(&config, &["storage", "s3", "bucket"]).as_str(),
        Some("stowage-blobs")
    );
    assert_eq!(at(&config, &["auth", "enabled"]).as_bool(), Some(true));
    assert_eq!(at(&config, &["gc", "grace_secs"]).as_integer(), Some(7200));
    assert!(env_of(c, "STOWAGE_CATALOG__URL").is_none());
    let rendered = checked.rendered_config(set);
    let catalog = at(&rendered, &["catalog"]).as_table().expect("[catalog]");
    let mut keys: Vec<&str> = catalog.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["password_file", "url"], "no password in the ConfigMap");

    let db = volume(&deploy, "catalog").expect("catalog volume");
    assert_eq!(db["secret"]["defaultMode"], 0o400);
    let password_file = secret_file(c, "catalog", &db["secret"], "stowage-db", "db-password");
    assert_eq!(
        at(&config, &["catalog", "password_file"]).as_str(),
        Some(password_file.as_str())
    );
    assert_eq!(mount(c, "catalog")["readOnly"], true);

    let keys = volume(&deploy, "auth-keys").expect("auth-keys volume");
    assert_eq!(keys["projected"]["defaultMode"], 0o400);
    assert_eq!(mount(c, "auth-keys")["readOnly"], true);
    let sources = keys["projected"]["sources"].as_array().expect("sources");
    assert_eq!(sources.len(), 2, "{keys}");
    let signing = secret_file(c, "auth-keys", &sources[0]["secret"], "stowage-signing", "ed25519.pem");
    assert_eq!(at(&config, &["auth", "signing_key"]).as_str(), Some(signing.as_str()));
    let old = secret_file(
        c,
        "auth-keys",
        &sources[1]["secret"],
        "stowage-signing-2025",
        "ed25519.pem",
    );
    let verify = at(&config, &["auth", "verify_keys"]).as_array().expect("verify_keys");
    assert_eq!(verify.len(), 1);
    assert_eq!(verify[0].as_str(), Some(old.as_str()));
    assert_ne!(signing, old);
    // The bootstrap admin as in the single-node mode (every replica tries; one creates it).
    assert!(at(&config, &["auth", "bootstrap_admin", "password_file"]).is_str());

    // A budget of one pod down at a time; a Service over every replica, with no affinity (any
    // replica continues any upload session), and an Ingress that does not hash clients.
    let pdb = checked.one(set, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert!(pdb["spec"]["minAvailable"].is_null());
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"], &deploy));
    let service = service_of(&objects);
    assert!(selects(&service["spec"]["selector"], &deploy));
    assert!(service["spec"]["sessionAffinity"].is_null(), "{service}");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "registry");
    let ingress = checked.one(set, "Ingress");
    assert_eq!(
        ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"],
        "0"
    );
    assert!(ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"].is_null());
    assert_eq!(
        ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"],
        service["metadata"]["name"]
    );
    // The single-node Service has no affinity: byte-for-byte what it was.
    let single_service = service_of(&checked.objects("defaults")).clone();
    assert!(single_service["spec"]["sessionAffinity"].is_null());

    // The README's example: three replicas, loaded by the server as PostgreSQL and S3.
    let set = "example-replicas";
    assert_eq!(checked.one(set, "Deployment")["spec"]["replicas"], 3);
    let config = checked.loaded_config(set);
    assert!(at(&config, &["catalog", "url"]).is_str());
    assert_eq!(at(&config, &["storage", "backend"]).as_str(), Some("s3"));
    assert!(at(&config, &["auth", "signing_key"]).is_str());

    // The URL from the Secret (both containers, so that check-config sees what serve sees);
    // one replica: a Deployment still, with no budget; no keys with authentication off.
    let set = "deployment-url-secret-no-auth";
    let deploy = checked.one(set, "Deployment");
    assert_eq!(deploy["spec"]["replicas"], 1);
    assert!(checked.objects(set).iter().all(|o| o["kind"] != "PodDisruptionBudget"));
    for c in [container(&deploy), init_container(&deploy)] {
        let url = env_of(c, "STOWAGE_CATALOG__URL").unwrap_or_else(|| panic!("the URL in {c}"));
        assert_eq!(url["valueFrom"]["secretKeyRef"]["name"], "stowage-db");
        assert_eq!(url["valueFrom"]["secretKeyRef"]["key"], "url");
    }
    let rendered = checked.rendered_config(set);
    assert!(at(&rendered, &["catalog"]).get("url").is_none());
    let url = "postgres://stowage@postgres.db.svc:5432/stowage";
    let config = checked.loaded_config_with(set, &[("STOWAGE_CATALOG__URL", url)]);
    assert_eq!(at(&config, &["catalog", "url"]).as_str(), Some(url));
    assert_eq!(
        at(&config, &["catalog", "password_file"]).as_str(),
        Some("/etc/stowage/catalog/password")
    );
    assert_eq!(at(&config, &["storage", "backend"]).as_str(), Some("s3"));
    assert_eq!(at(&config, &["auth", "enabled"]).as_bool(), Some(false));
    assert!(at(&config, &["auth"]).get("signing_key").is_none());
    assert!(volume(&deploy, "auth-keys").is_none());
    assert_eq!(
        volume(&deploy, "data").expect("data volume")["emptyDir"]["sizeLimit"],
        "10Gi"
    );
    let spread = &deploy["spec"]["template"]["spec"]["topologySpreadConstraints"];
    assert_eq!(spread.as_array().map(Vec::len), Some(1), "{spread}");
    assert_eq!(spread[0]["topologyKey"], "topology.kubernetes.io/zone");
    assert!(selects(&spread[0]["labelSelector"]["matchLabels"], &deploy));
    // Affinity on request, with its timeout.
    let service = service_of(&checked.objects(set)).clone();
    assert_eq!(service["spec"]["sessionAffinity"], "ClientIP");
    assert_eq!(
        service["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"],
        10800
    );

    // PostgreSQL with the fs backend stays the one-pod StatefulSet on its volume.
    let set = "postgres-single-node";
    let sts = checked.one(set, "StatefulSet");
    assert_eq!(sts["spec"]["replicas"], 1);
    assert_eq!(sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"], "data");
    let c = container(&sts);
    let config = checked.loaded_config(set);
    assert_eq!(at(&config, &["storage", "backend"]).as_str(), Some("fs"));
    assert_eq!(
        at(&config, &["catalog", "url"]).as_str(),
        Some("postgres://stowage@postgres.db.svc:5432/stowage?sslmode=require")
    );
    let db = volume(&sts, "catalog").expect("catalog volume");
    let password_file = secret_file(c, "catalog", &db["secret"], "stowage-db", "password");
    assert_eq!(
        at(&config, &["catalog", "password_file"]).as_str(),
        Some(password_file.as_str())
    );
    // TLS to the database: the CA bundle from the same Secret.
    let ca_file = secret_file(c, "catalog", &db["secret"], "stowage-db", "ca.pem");
    assert_eq!(
        at(&config, &["catalog", "tls_ca_file"]).as_str(),
        Some(ca_file.as_str())
    );
    let keys = volume(&sts, "auth-keys").expect("auth-keys volume");
    let signing = secret_file(
        c,
        "auth-keys",
        &keys["projected"]["sources"][0]["secret"],
        "stowage-signing",
        "signing-key.pem",
    );
    assert_eq!(at(&config, &["auth", "signing_key"]).as_str(), Some(signing.as_str()));

    // What cannot run is refused by the chart, with the reason (the schema accepts the values).
    let failing = checked.report["failing"].as_object().expect("failing");
    for (name, message) in [
        (
            "replicas-without-postgres",
            "replicaCount=2 needs the catalog on PostgreSQL",
        ),
        ("replicas-without-s3", "replicaCount=2 needs storage.backend=s3"),
        (
            "replicas-without-signing-key",
            "auth.enabled needs auth.signingKey.existingSecret",
        ),
        (
            "deployment-without-signing-key",
            "auth.enabled needs auth.signingKey.existingSecret",
        ),
        ("postgres-without-url", "needs the database's URL"),
        ("postgres-url-and-urlKey", "set one of url and urlKey"),
        ("postgres-url-with-password", "must not hold the password"),
        ("postgres-ca-without-tls", "does not say sslmode=require"),
    ] {
        let refusal = failing[name].as_str().unwrap_or_else(|| panic!("{name} not checked"));
        assert!(refusal.contains(message), "{name}: {refusal}");
        assert!(!refusal.contains("hunter2"), "{name}: the refusal repeats the password");
    }
}

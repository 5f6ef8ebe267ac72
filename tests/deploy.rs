//! Deploying Stowage (issue 13): first-start bootstrap, `stowage healthcheck`, the container
//! image, the compose file and the systemd unit, each driven through the real binary and the
//! real tools.
//!
//! - Bootstrap (`[auth.bootstrap_admin]`, `[auth.bootstrap_token]`, `auth::bootstrap`), over real
//!   HTTP on the configured blob backend: the admin's password from a file or
//!   `STOWAGE_BOOTSTRAP_ADMIN_PASSWORD` logs in at `/v2/`; a restart with another password in
//!   the file changes nothing (the first one still works); the API token whose secret the
//!   operator put in a file pushes within its scopes and is never revived once revoked; weak
//!   secrets, a password in the TOML file and a missing password source stop the server with a
//!   clear message; no secret ever appears in the server's log.
//! - `stowage healthcheck`: exit 0 while `/livez` answers (plain and TLS), 1 otherwise.
//! - The image: built from the repository's `Dockerfile` (`prebuilt` stage, this build's
//!   binary, a runtime base `docker import`ed from the host's libraries) by a real dockerd
//!   (`common::dockerd`), run with a bootstrap password file and the chart's hardening
//!   (read-only root, no capabilities), pushed to and pulled from with skopeo, restarted with
//!   its data kept, its process's UID and capabilities checked, its health check turning
//!   `healthy`.
//! - `docker-compose.yml`: `docker-compose config` (Debian's v1) and the service's settings
//!   loaded by `stowage check-config` (not started: MinIO's image cannot be pulled here).
//! - `contrib/stowage.service`: `systemd-analyze verify` and `security`; the sysusers file.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use common::{STDERR_FILE_ENV, TestServer, client, dockerd, run_cli, sha256};

/// A random token secret of the shape `stowage token create` makes (`stw_` + 43 base64url).
fn random_token_secret() -> String {
    let mut bytes = Vec::with_capacity(32);
    bytes.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    bytes.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    format!("stw_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// A configuration directory: `stowage.toml` with auth on and the bootstrap sections, the
/// password and token files beside it, and the server log's path.
struct Bootstrap {
    dir: tempfile::TempDir,
    token: String,
}

impl Bootstrap {
    fn new(password: Option<&str>, token_secret: &str) -> Bootstrap {
        let dir = tempfile::tempdir().expect("temp dir");
        let pw_file = dir.path().join("admin-password");
        let token_file = dir.path().join("ci-token");
        let mut toml = String::from("[auth]\nenabled = true\n\n[auth.bootstrap_admin]\nuser = \"root-admin\"\n");
        if let Some(pw) = password {
            std::fs::write(&pw_file, format!("{pw}\n")).expect("write password file");
            toml += &format!("password_file = {:?}\n", pw_file.to_str().expect("utf-8"));
        }
        toml += &format!(
            "\n[auth.bootstrap_token]\nname = \"ci\"\nscopes = [\"ci/**:pull,push\"]\nexpires_in_days = 30\nsecret_file = {:?}\n",
            token_file.to_str().expect("utf-8")
        );
        std::fs::write(&token_file, format!("{token_secret}\n")).expect("write token file");
        std::fs::write(dir.path().join("stowage.toml"), toml).expect("write config");
        Bootstrap {
            dir,
            token: token_secret.to_owned(),
        }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("stowage.toml")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn set_password(&self, pw: &str) {
        std::fs::write(self.dir.path().join("admin-password"), format!("{pw}\n")).expect("rewrite password");
    }

    fn start(&self, extra: &[(&str, &str)]) -> TestServer {
        let config = self.config();
        let log = self.log();
        let mut envs = vec![
            ("STOWAGE_CONFIG", config.to_str().expect("utf-8")),
            ("STOWAGE_AUTH__ENABLED", "true"),
            ("RUST_LOG", "info"),
            (STDERR_FILE_ENV, log.to_str().expect("utf-8")),
        ];
        envs.extend_from_slice(extra);
        TestServer::start_with(&envs)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).expect("server log")
    }
}

/// `GET /v2/` with Basic credentials; the status.
async fn v2_status(server: &TestServer, user: &str, password: &str) -> u16 {
    client()
        .get(server.v2(""))
        .basic_auth(user, Some(password))
        .send()
        .await
        .expect("GET /v2/")
        .status()
        .as_u16()
}

/// Pushes a small image to `repo:tag` with Basic credentials (an API token as the password);
/// the status of each request (blob, config, manifest) that was not 201, or `None` when all were.
async fn push_with(server: &TestServer, user: &str, password: &str, repo: &str, tag: &str) -> Option<u16> {
    let http = client();
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#.to_vec();
    let layer = format!("layer of {repo}:{tag}").into_bytes();
    for data in [&config, &layer] {
        let digest = sha256(data);
        let resp = http
            .post(server.v2(&format!("{repo}/blobs/uploads/?digest={digest}")))
            .basic_auth(user, Some(password))
            .header("Content-Type", "application/octet-stream")
            .body(data.clone())
            .send()
            .await
            .expect("POST blob");
        if resp.status() != 201 {
            return Some(resp.status().as_u16());
        }
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha256(&layer), "size": layer.len()}],
    });
    let resp = http
        .put(server.v2(&format!("{repo}/manifests/{tag}")))
        .basic_auth(user, Some(password))
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .body(serde_json::to_vec(&manifest).expect("manifest"))
        .send()
        .await
        .expect("PUT manifest");
    (resp.status() != 201).then(|| resp.status().as_u16())
}

fn assert_no_secret(log: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!log.contains(s), "the server log holds a secret ({} bytes)", s.len());
    }
}

#[tokio::test]
async fn bootstrap_admin_and_token_from_files_are_created_once_and_never_reset() {
    let first = "first-Password-1234";
    let second = "second-Password-5678";
    let b = Bootstrap::new(Some(first), &random_token_secret());
    let mut server = b.start(&[]);

    assert_eq!(
        v2_status(&server, "root-admin", first).await,
        200,
        "the file's password logs in"
    );
    assert_eq!(v2_status(&server, "root-admin", "wrong-password!!").await, 401);
    assert_eq!(
        push_with(&server, "ci", &b.token, "ci/app", "v1").await,
        None,
        "the token pushes"
    );
    assert_eq!(
        push_with(&server, "ci", &b.token, "other/app", "v1").await,
        Some(403),
        "outside its scopes the token is refused"
    );
    let listed = run_cli(server.data_dir(), &["token", "list"], "");
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed
            .lines()
            .any(|l| l.contains("root-admin") && l.contains(" ci ") && l.contains("ci/**:pull,push")),
        "{listed}"
    );
    let log = b.log_text();
    assert!(log.contains("bootstrap admin created"), "{log}");
    assert!(log.contains("bootstrap token created"), "{log}");

    // Restart with another password in the file: nothing changes.
    b.set_password(second);
    server.crash_and_restart();
    assert_eq!(
        v2_status(&server, "root-admin", first).await,
        200,
        "the first password still works"
    );
    assert_eq!(
        v2_status(&server, "root-admin", second).await,
        401,
        "the file's new one does not"
    );
    assert_eq!(push_with(&server, "ci", &b.token, "ci/app", "v2").await, None);
    let log = b.log_text();
    assert!(log.contains("bootstrap admin exists; left as it is"), "{log}");
    assert!(
        log.contains("bootstrap token with this secret exists; left as it is"),
        "{log}"
    );

    // A password changed by the operator is not reset either.
    run_cli(
        server.data_dir(),
        &["user", "passwd", "root-admin"],
        "changed-by-hand-999\n",
    );
    server.crash_and_restart();
    assert_eq!(v2_status(&server, "root-admin", "changed-by-hand-999").await, 200);
    assert_eq!(v2_status(&server, "root-admin", first).await, 401);

    // A revoked token is not revived by a restart.
    run_cli(
        server.data_dir(),
        &["token", "revoke", "ci", "--user", "root-admin"],
        "",
    );
    server.crash_and_restart();
    assert_eq!(push_with(&server, "ci", &b.token, "ci/app", "v3").await, Some(401));
    assert!(b.log_text().contains("revoked; not created again"));

    // An admin removed on purpose while another admin exists is not brought back.
    run_cli(
        server.data_dir(),
        &["user", "add", "other-admin", "--admin"],
        "other-admin-pw\n",
    );
    run_cli(server.data_dir(), &["user", "remove", "root-admin"], "");
    b.set_password(first);
    server.crash_and_restart();
    assert_eq!(v2_status(&server, "root-admin", first).await, 401);
    let log = b.log_text();
    assert!(log.contains("bootstrap admin not created: other admins exist"), "{log}");
    assert!(log.contains("bootstrap token not created: no such user"), "{log}");

    assert_no_secret(&b.log_text(), &[first, second, &b.token]);
}

#[tokio::test]
async fn bootstrap_password_from_the_environment() {
    let pw = "from-the-Environment-42";
    let b = Bootstrap::new(None, &random_token_secret());
    let server = b.start(&[("STOWAGE_BOOTSTRAP_ADMIN_PASSWORD", pw)]);
    assert_eq!(v2_status(&server, "root-admin", pw).await, 200);
    let log = b.log_text();
    assert!(
        log.contains("bootstrap admin created") && log.contains("STOWAGE_BOOTSTRAP_ADMIN_PASSWORD"),
        "{log}"
    );
    assert_no_secret(&log, &[pw, &b.token]);
}

/// Runs `stowage serve` with `config` expecting it to refuse to start; its exit code and stderr.
fn refused_start(config: &Path, envs: &[(&str, &str)]) -> (i32, String) {
    let data = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_stowage"))
        .arg("serve")
        .env("STOWAGE_CONFIG", config)
        .env("STOWAGE_DATA_DIR", data.path())
        .env("STOWAGE_LISTEN", "127.0.0.1:0")
        .env("STOWAGE_AUTH__ENABLED", "true")
        .env_remove("STOWAGE_BOOTSTRAP_ADMIN_PASSWORD")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run stowage");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn weak_or_missing_secrets_stop_the_server_with_a_clear_message() {
    let pw = "good-enough-Password-1";
    for (secret, says) in [
        (format!("stw_{}", "A".repeat(43)), "too regular"),
        ("stw_tooShort".to_owned(), "43 to 256 characters"),
        (
            "ci-token-without-the-prefix-0123456789abcdefghijklmn".to_owned(),
            "must start with",
        ),
    ] {
        let b = Bootstrap::new(Some(pw), &secret);
        let (code, err) = refused_start(&b.config(), &[]);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("bootstrap token secret in") && err.contains(says), "{err}");
        assert!(!err.contains(&secret), "the refusal echoes the secret: {err}");
    }

    let b = Bootstrap::new(Some("short"), &random_token_secret());
    let (code, err) = refused_start(&b.config(), &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("bootstrap admin password from file") && err.contains("too short"),
        "{err}"
    );

    // A password written into the TOML file is not a setting: a configuration error (exit 2).
    let b = Bootstrap::new(Some(pw), &random_token_secret());
    let toml = std::fs::read_to_string(b.config()).expect("config");
    std::fs::write(
        b.config(),
        toml.replace(
            "user = \"root-admin\"\n",
            "user = \"root-admin\"\npassword = \"inline-Password-1\"\n",
        ),
    )
    .expect("rewrite config");
    let (code, err) = refused_start(&b.config(), &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("unknown field: found `password`") && err.contains("password_file"),
        "{err}"
    );

    // No password source at all, or two: a configuration error (exit 2) before anything starts.
    let b = Bootstrap::new(None, &random_token_secret());
    let (code, err) = refused_start(&b.config(), &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("auth.bootstrap_admin needs password_file or the environment variable"),
        "{err}"
    );
    let b = Bootstrap::new(Some(pw), &random_token_secret());
    let (code, err) = refused_start(&b.config(), &[("STOWAGE_BOOTSTRAP_ADMIN_PASSWORD", pw)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not both"), "{err}");
}

/// Runs `stowage healthcheck <args>` with `envs`; its exit code and stderr.
fn healthcheck(args: &[&str], envs: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_stowage"))
        .arg("healthcheck")
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run stowage healthcheck");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn healthcheck_exits_0_while_the_server_answers_and_1_when_it_does_not() {
    let mut server = TestServer::start_with(&[("STOWAGE_AUTH__ENABLED", "true")]);
    let livez = format!("{}/livez", server.url);
    assert_eq!(healthcheck(&["--url", &livez], &[]), (0, String::new()));
    // Without --url: /livez where the configuration says the server listens.
    assert_eq!(healthcheck(&[], &[("STOWAGE_LISTEN", &server.host)]).0, 0);
    // A route that needs credentials answers 401: unhealthy.
    let (code, err) = healthcheck(&["--url", &server.v2("")], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("answered 401"), "{err}");
    server.kill();
    let (code, err) = healthcheck(&["--url", &livez, "--timeout-secs", "2"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("connecting to"), "{err}");
    let (code, err) = healthcheck(&["--url", "ftp://x"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("expected an http:// or https:// URL"), "{err}");
}

#[test]
fn healthcheck_speaks_tls_to_a_tls_server() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ck = rcgen::generate_simple_self_signed(vec!["registry.example.org".to_owned()]).expect("certificate");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).expect("write cert");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write key");
    let (cert, key) = (cert.to_str().expect("utf-8"), key.to_str().expect("utf-8"));
    let tls = [("STOWAGE_TLS__CERT", cert), ("STOWAGE_TLS__KEY", key)];
    let server = TestServer::start_with(&tls);
    assert!(server.url.starts_with("https://"), "{}", server.url);
    let mut envs = tls.to_vec();
    envs.push(("STOWAGE_LISTEN", &server.host));
    assert_eq!(healthcheck(&[], &envs), (0, String::new()));
    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = format!("http://{}/livez", server.host);
    assert_eq!(healthcheck(&["--url", &plain], &[]).0, 1);
}

// ---------------------------------------------------------------------------------------------
// The container image (Dockerfile), built and run by a real dockerd (`common::dockerd`)
// ---------------------------------------------------------------------------------------------

/// How long one docker or skopeo command may take.
const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(180);
/// The UID and GID the image runs as.
const IMAGE_UID: &str = "10001";

/// A docker CLI for the test engine, with its own configuration directory.
struct Docker {
    host: &'static str,
    config: tempfile::TempDir,
}

impl Docker {
    fn new() -> Docker {
        Docker {
            host: dockerd::engine(),
            config: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// `docker <args>`: its output, whether it succeeded or not.
    fn run(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = dockerd::docker_cmd(self.host, self.config.path());
        // The CLI without buildx uses the engine's own (legacy) builder; say so, not guess.
        cmd.env("DOCKER_BUILDKIT", "0").args(args);
        dockerd::output_within(&mut cmd, COMMAND_TIMEOUT)
    }

    /// `docker <args>`, which must succeed; its stdout, trimmed.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "docker {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// The runtime base image, made from the host: the binary's shared libraries (as `ldd` lists
/// them, at the same paths), the CA certificates, and `/tmp`. No shell, no package manager: the
/// distroless/cc shape. Imported once per test binary as `local/stowage-runtime:test`.
fn runtime_base(docker: &Docker) -> &'static str {
    static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    const TAG: &str = "local/stowage-runtime:test";
    DONE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("rootfs");
        let ldd = Command::new("ldd")
            .arg(env!("CARGO_BIN_EXE_stowage"))
            .output()
            .expect("run ldd");
        assert!(ldd.status.success(), "ldd: {}", String::from_utf8_lossy(&ldd.stderr));
        let mut files: Vec<PathBuf> = String::from_utf8_lossy(&ldd.stdout)
            .lines()
            .filter_map(|l| {
                let path = l.split("=>").last()?.split_whitespace().next()?;
                path.starts_with('/').then(|| PathBuf::from(path))
            })
            .collect();
        assert!(files.len() >= 3, "ldd found too few libraries: {files:?}");
        files.push(PathBuf::from("/etc/ssl/certs/ca-certificates.crt"));
        for f in &files {
            let to = root.join(f.strip_prefix("/").expect("absolute"));
            std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
            std::fs::copy(f, &to).unwrap_or_else(|e| panic!("copy {}: {e}", f.display()));
        }
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&tmp).expect("mkdir tmp");
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o1777)).expect("chmod tmp");
        dockerd::import_rootfs(docker.host, &root, TAG).expect("import the runtime base");
    });
    TAG
}

/// Builds the image from the repository's Dockerfile through its `prebuilt` stage, with this
/// build's `stowage` binary and the locally made runtime base; returns its tag.
fn build_image(docker: &Docker) -> String {
    let base = runtime_base(docker);
    let ctx = tempfile::tempdir().expect("temp dir");
    let dockerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile");
    std::fs::copy(&dockerfile, ctx.path().join("Dockerfile")).expect("copy Dockerfile");
    let bin = ctx.path().join("stowage");
    if std::fs::hard_link(env!("CARGO_BIN_EXE_stowage"), &bin).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_stowage"), &bin).expect("copy the binary");
    }
    let tag = format!("local/stowage:test-{}", uuid::Uuid::new_v4().simple());
    docker.ok(&[
        "build",
        "--target",
        "prebuilt",
        "--build-arg",
        &format!("RUNTIME_IMAGE={base}"),
        "--build-arg",
        "STOWAGE_BINARY=stowage",
        "--build-arg",
        "REVISION=test",
        "-t",
        &tag,
        ctx.path().to_str().expect("utf-8"),
    ]);
    tag
}

/// A container (and its data volume) removed when dropped.
struct Container<'a> {
    docker: &'a Docker,
    name: String,
    volume: String,
    image: String,
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = self.docker.run(&["rm", "-f", &self.name]);
        let _ = self.docker.run(&["volume", "rm", "-f", &self.volume]);
        let _ = self.docker.run(&["rmi", "-f", &self.image]);
    }
}

/// A free TCP port on 127.0.0.1 (the container uses the host's network: the test engine has no
/// bridge).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// `skopeo` with no signature policy (the images are made by the test) and a private auth file.
fn skopeo(scratch: &Path, args: &[&str]) -> String {
    let auth = scratch.join("auth.json");
    if !auth.exists() {
        std::fs::write(&auth, r#"{"auths":{}}"#).expect("write skopeo auth file");
    }
    let mut cmd = Command::new("skopeo");
    cmd.arg("--insecure-policy")
        .args(args)
        .env("REGISTRY_AUTH_FILE", &auth)
        .env("TMPDIR", scratch);
    let out = dockerd::output_within(&mut cmd, COMMAND_TIMEOUT);
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `Uid:` and `Gid:` lines of `/proc/<pid>/status` (real, effective, saved, filesystem).
fn proc_ids(pid: &str) -> (String, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    (field("Uid:"), field("Gid:"))
}

#[tokio::test]
async fn the_image_bootstraps_an_admin_serves_skopeo_keeps_data_runs_as_non_root_and_turns_healthy() {
    let docker = Docker::new();
    let image = build_image(&docker);

    // What the image says about itself.
    let config: serde_json::Value =
        serde_json::from_str(&docker.ok(&["image", "inspect", "--format", "{{json .Config}}", &image]))
            .expect("image config");
    assert_eq!(config["User"], "10001:10001", "{config}");
    assert!(config["Volumes"].get("/var/lib/stowage").is_some(), "{config}");
    assert_eq!(
        config["Healthcheck"]["Test"],
        serde_json::json!(["CMD", "/usr/local/bin/stowage", "healthcheck"]),
        "{config}"
    );
    assert_eq!(
        config["Labels"]["org.opencontainers.image.title"], "Stowage",
        "{config}"
    );
    assert_eq!(
        config["Labels"]["org.opencontainers.image.revision"], "test",
        "{config}"
    );
    assert!(
        config["Env"]
            .as_array()
            .is_some_and(|e| e.iter().any(|v| v == "STOWAGE_DATA_DIR=/var/lib/stowage")),
        "{config}"
    );

    // The bootstrap password, as a mounted secret readable by the image's user only.
    let secrets = tempfile::tempdir().expect("temp dir");
    let scratch = secrets.path();
    let pw = "container-Admin-pw-1";
    let pw_file = scratch.join("admin-password");
    std::fs::write(&pw_file, format!("{pw}\n")).expect("write password");
    std::os::unix::fs::chown(&pw_file, Some(10001), Some(10001)).expect("chown password file");
    std::fs::set_permissions(&pw_file, std::os::unix::fs::PermissionsExt::from_mode(0o400)).expect("chmod");

    let port = free_port();
    let host = format!("127.0.0.1:{port}");
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let container = Container {
        docker: &docker,
        name: format!("stowage-deploy-{suffix}"),
        volume: format!("stowage-data-{suffix}"),
        image: image.clone(),
    };
    docker.ok(&[
        "run",
        "-d",
        "--name",
        &container.name,
        "--network",
        "host",
        // The Helm chart's hardening: read-only root file system (only the data volume and /tmp
        // writable), no capabilities, no privilege escalation.
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        // The image's own check, run every second instead of every ten, so the test is quick.
        "--health-interval",
        "1s",
        "-e",
        &format!("STOWAGE_LISTEN={host}"),
        "-e",
        "STOWAGE_AUTH__BOOTSTRAP_ADMIN__USER=admin",
        "-e",
        "STOWAGE_AUTH__BOOTSTRAP_ADMIN__PASSWORD_FILE=/run/secrets/admin-password",
        "-v",
        &format!("{}:/run/secrets/admin-password:ro", pw_file.display()),
        "-v",
        &format!("{}:/var/lib/stowage", container.volume),
        &image,
    ]);
    let http = client();
    let livez = format!("http://{host}/livez");
    let answers = || async { http.get(&livez).send().await.is_ok_and(|r| r.status().is_success()) };
    common::wait_until("the container answers /livez", answers).await;

    // The process inside runs as the image's user, not root, with no capabilities.
    let pid = docker.ok(&["inspect", "--format", "{{.State.Pid}}", &container.name]);
    let (uid, gid) = proc_ids(&pid);
    let all = |id: &str| [id; 4].join(" ");
    assert_eq!((uid, gid), (all(IMAGE_UID), all(IMAGE_UID)), "pid {pid}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    for caps in ["CapEff:", "CapPrm:"] {
        let value = status.lines().find_map(|l| l.strip_prefix(caps)).map(str::trim);
        assert_eq!(value, Some("0000000000000000"), "{caps} of pid {pid}");
    }
    assert!(
        status.lines().any(|l| l.starts_with("NoNewPrivs:") && l.ends_with('1')),
        "{status}"
    );

    // Auth is on: nothing without credentials; the bootstrap admin logs in.
    let v2 = format!("http://{host}/v2/");
    assert_eq!(http.get(&v2).send().await.expect("GET /v2/").status(), 401);
    let login = http
        .get(&v2)
        .basic_auth("admin", Some(pw))
        .send()
        .await
        .expect("GET /v2/");
    assert_eq!(login.status(), 200);

    // skopeo pushes an image (the runtime base, saved from the engine) and pulls it back.
    let archive = scratch.join("image.tar");
    docker.ok(&["save", "-o", archive.to_str().expect("utf-8"), runtime_base(&docker)]);
    let creds = format!("admin:{pw}");
    let remote = format!("docker://{host}/deploy/runtime:v1");
    skopeo(
        scratch,
        &[
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            &creds,
            &format!("docker-archive:{}", archive.display()),
            &remote,
        ],
    );
    let back = scratch.join("back");
    skopeo(
        scratch,
        &[
            "copy",
            "--src-tls-verify=false",
            "--src-creds",
            &creds,
            &remote,
            &format!("dir:{}", back.display()),
        ],
    );
    let inspect = |scratch: &Path| -> serde_json::Value {
        serde_json::from_str(&skopeo(
            scratch,
            &["inspect", "--tls-verify=false", "--creds", &creds, &remote],
        ))
        .expect("skopeo inspect JSON")
    };
    let pushed = inspect(scratch);
    let digest = pushed["Digest"].as_str().expect("digest").to_owned();
    // `dir:` keeps the manifest as served: its bytes hash to the pushed digest, and every layer
    // it lists arrived whole.
    let manifest = std::fs::read(back.join("manifest.json")).expect("pulled manifest");
    assert_eq!(sha256(&manifest), digest, "pulled what was pushed");
    let parsed: serde_json::Value = serde_json::from_slice(&manifest).expect("manifest JSON");
    let layers = parsed["layers"].as_array().expect("layers");
    assert!(!layers.is_empty());
    for layer in layers {
        let d = layer["digest"].as_str().expect("layer digest");
        let bytes = std::fs::read(back.join(d.trim_start_matches("sha256:"))).expect("pulled layer");
        assert_eq!(sha256(&bytes), d);
    }

    // Docker's health check (the image's `stowage healthcheck`) turns healthy.
    let health =
        || async { docker.ok(&["inspect", "--format", "{{.State.Health.Status}}", &container.name]) == "healthy" };
    common::wait_until("the container is healthy", health).await;

    // Restart: the data is still there, the admin is not made again, and no secret was logged.
    docker.ok(&["restart", &container.name]);
    common::wait_until("the restarted container answers /livez", answers).await;
    assert_eq!(
        inspect(scratch)["Digest"],
        digest.as_str(),
        "the image survived the restart"
    );
    let out = docker.run(&["logs", &container.name]);
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(logs.contains("bootstrap admin created"), "{logs}");
    assert!(logs.contains("bootstrap admin exists; left as it is"), "{logs}");
    assert!(!logs.contains(pw), "the password is in the container's log");
    let restarted_pid = docker.ok(&["inspect", "--format", "{{.State.Pid}}", &container.name]);
    assert_ne!(restarted_pid, pid);
    assert_eq!(proc_ids(&restarted_pid).0, all(IMAGE_UID));
}

// ---------------------------------------------------------------------------------------------
// docker-compose.yml, checked by Debian's docker-compose (v1); MinIO's image cannot be pulled
// here, so the file is not started.
// ---------------------------------------------------------------------------------------------

/// `docker-compose config` of the repository's docker-compose.yml (with no `.env` values in the
/// environment), as JSON.
fn compose_config() -> serde_json::Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new("docker-compose");
    cmd.arg("-f").arg(root.join("docker-compose.yml")).arg("config");
    for var in [
        "MINIO_ROOT_USER",
        "MINIO_ROOT_PASSWORD",
        "STOWAGE_ADMIN_USER",
        "STOWAGE_BUILDER_IMAGE",
        "STOWAGE_RUNTIME_IMAGE",
    ] {
        cmd.env_remove(var);
    }
    let out = dockerd::output_within(&mut cmd, COMMAND_TIMEOUT);
    assert!(
        out.status.success(),
        "docker-compose config (scripts/test installs Debian's docker-compose): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // YAML to JSON with the PyYAML that kubernetes-validate brings (scripts/test installs it).
    let python = std::env::var("ORAS_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut child = Command::new(&python)
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), &out.stdout).expect("write YAML");
    let json = child.wait_with_output().expect("python");
    assert!(json.status.success(), "{}", String::from_utf8_lossy(&json.stderr));
    serde_json::from_slice(&json.stdout).expect("compose config as JSON")
}

#[test]
fn compose_file_is_valid_pinned_health_checked_and_bootstraps_the_admin_from_a_secret() {
    let config = compose_config();
    let services = config["services"].as_object().expect("services");
    let mut names: Vec<&str> = services.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["create-bucket", "minio", "stowage"]);

    // Every image is pinned to a version, never `latest` or no tag.
    for (name, service) in services {
        let image = service["image"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} has no image"));
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
        assert!(
            !tag.is_empty() && tag != "latest" && !tag.contains('/'),
            "{name}: {image} is not pinned"
        );
    }
    // The long-running services have health checks; Stowage's is its own subcommand.
    assert_eq!(services["minio"]["healthcheck"]["test"][0], "CMD");
    assert_eq!(
        services["stowage"]["healthcheck"]["test"],
        serde_json::json!(["CMD", "/usr/local/bin/stowage", "healthcheck"])
    );
    assert_eq!(
        services["stowage"]["depends_on"]["create-bucket"]["condition"],
        "service_completed_successfully"
    );
    assert_eq!(
        services["create-bucket"]["depends_on"]["minio"]["condition"],
        "service_healthy"
    );
    assert!(services["stowage"]["build"]["args"]["RUNTIME_IMAGE"].is_string());

    // The bootstrap admin's password is a compose secret, mounted where the setting points.
    let stowage = &services["stowage"];
    assert_eq!(stowage["secrets"][0]["source"], "stowage-admin-password");
    assert!(
        config["secrets"]["stowage-admin-password"]["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("secrets/admin-password"))
    );
    let env = stowage["environment"].as_object().expect("environment");
    assert_eq!(
        env["STOWAGE_AUTH__BOOTSTRAP_ADMIN__PASSWORD_FILE"],
        "/run/secrets/stowage-admin-password"
    );

    // Stowage's own loader takes the service's settings (the data directory aside).
    let data = tempfile::tempdir().expect("temp dir");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stowage"));
    cmd.arg("check-config").env_remove("STOWAGE_BOOTSTRAP_ADMIN_PASSWORD");
    for (k, v) in env {
        if k.starts_with("STOWAGE_") {
            cmd.env(k, v.as_str().expect("string value"));
        }
    }
    let out = cmd
        .env("STOWAGE_DATA_DIR", data.path())
        .output()
        .expect("run check-config");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let loaded: toml::Value = toml::from_str(&String::from_utf8_lossy(&out.stdout)).expect("TOML");
    assert_eq!(loaded["storage"]["backend"].as_str(), Some("s3"));
    assert_eq!(loaded["storage"]["s3"]["endpoint"].as_str(), Some("http://minio:9000"));
    assert_eq!(loaded["auth"]["bootstrap_admin"]["user"].as_str(), Some("admin"));
}

// ---------------------------------------------------------------------------------------------
// contrib/stowage.service, checked by systemd's own tools (the unit is not started here: the
// test machines have no systemd as PID 1)
// ---------------------------------------------------------------------------------------------

#[test]
fn systemd_unit_verifies_and_is_sandboxed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("contrib/stowage.service")).expect("unit");
    for setting in [
        "User=stowage",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/stowage",
        "StateDirectory=stowage",
        "LimitNOFILE=",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "LoadCredential=admin-password:",
        "STOWAGE_AUTH__BOOTSTRAP_ADMIN__PASSWORD_FILE=%d/admin-password",
    ] {
        assert!(unit.contains(setting), "the unit lacks {setting:?}");
    }
    // `verify` checks that ExecStart's binary exists: point it at this build's, nothing else
    // changed.
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = dir.path().join("stowage.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/stowage", env!("CARGO_BIN_EXE_stowage")),
    )
    .expect("copy unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("run systemd-analyze (Debian's systemd package)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // systemd's own exposure score, 0 (locked down) to 10 (unprotected); "OK" is below 2.
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&copy)
        .output()
        .expect("run systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for stowage.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(score <= 2.0, "exposure {score}:\n{text}");

    // The sysusers.d file makes the user the unit runs as.
    let sysroot = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir_all(sysroot.path().join("etc")).expect("etc");
    let out = Command::new("systemd-sysusers")
        .arg("--root")
        .arg(sysroot.path())
        .arg(root.join("contrib/stowage.sysusers"))
        .output()
        .expect("run systemd-sysusers");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let passwd = std::fs::read_to_string(sysroot.path().join("etc/passwd")).expect("passwd");
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("stowage:") && l.ends_with(":/var/lib/stowage:/usr/sbin/nologin")),
        "{passwd}"
    );
}

#[test]
fn the_prebuilt_target_without_a_binary_fails_naming_it() {
    let docker = Docker::new();
    let base = runtime_base(&docker);
    let ctx = tempfile::tempdir().expect("temp dir");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile"),
        ctx.path().join("Dockerfile"),
    )
    .expect("copy Dockerfile");
    let out = docker.run(&[
        "build",
        "--target",
        "prebuilt",
        "--build-arg",
        &format!("RUNTIME_IMAGE={base}"),
        ctx.path().to_str().expect("utf-8"),
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("/in/stowage"), "{text}");
}

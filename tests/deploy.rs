//! Deploying Stowage (issue 13), over real HTTP against the real binary.
//!
//! First-start bootstrap (`[auth.bootstrap_admin]`, `[auth.bootstrap_token]`, `auth::bootstrap`):
//! the admin's password from a file or `STOWAGE_BOOTSTRAP_ADMIN_PASSWORD` logs in at `/v2/`; a
//! restart with another password in the file changes nothing (the first one still works); the
//! API token whose secret the operator put in a file pushes within its scopes and is never
//! revived once revoked; weak secrets and a missing password source stop the server with a
//! clear message; and no secret ever appears in the server's log.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use common::{STDERR_FILE_ENV, TestServer, client, run_cli, sha256};

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

//! The ORAS Python SDK (PyPI `oras`, pinned in `scripts/test`) against a real `stowage serve`
//! with authentication on, over plain HTTP and native TLS (issue 10).
//!
//! Each test starts its own server with users `alice` (password `alice-pw`; may pull, push and
//! delete everywhere) and `bob` (`bob-pw`; no rules) and runs `tests/clients/oras_auth.py`,
//! which uses the SDK as the README's recipe does (`auth_backend="basic"`, `login` with a
//! config file). The script's claims (digests, tags) are checked against the server directly.
//! Python is `$ORAS_TEST_PYTHON` or `python3`; a missing SDK fails the test, never skips it.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{TestServer, run_cli};
use serde_json::Value;

/// How long one run of the driver may take before the test gives up on it.
const DRIVER_TIMEOUT: Duration = Duration::from_secs(120);

const CONFIG: &str = r#"
[auth]
enabled = true

[[auth.rules]]
repositories = ["**"]
users = ["alice"]
actions = ["pull", "push", "delete"]
"#;

/// A server with authentication on, and the files it was started with.
struct Setup {
    server: TestServer,
    _dir: tempfile::TempDir,
    /// The CA certificate (self-signed server certificate) when serving TLS.
    ca: Option<std::path::PathBuf>,
}

impl Setup {
    fn start(tls: bool) -> Setup {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("stowage.toml");
        std::fs::write(&config, CONFIG).expect("write config");
        let mut envs = vec![
            ("STOWAGE_CONFIG".to_owned(), config.to_str().expect("utf-8").to_owned()),
            ("STOWAGE_AUTH__ENABLED".to_owned(), "true".to_owned()),
        ];
        let mut ca = None;
        if tls {
            let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("generate certificate");
            let cert = dir.path().join("cert.pem");
            let key = dir.path().join("key.pem");
            std::fs::write(&cert, ck.cert.pem()).expect("write cert");
            std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write key");
            envs.push(("STOWAGE_TLS__CERT".into(), cert.to_str().expect("utf-8").into()));
            envs.push(("STOWAGE_TLS__KEY".into(), key.to_str().expect("utf-8").into()));
            ca = Some(cert);
        }
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let server = TestServer::start_with(&envs);
        assert_eq!(server.url.starts_with("https://"), tls, "{}", server.url);
        for name in ["alice", "bob"] {
            run_cli(server.data_dir(), &["user", "add", name], &format!("{name}-pw\n"));
        }
        Setup { server, _dir: dir, ca }
    }

    /// A new API token of `user` named `name` for `scope` (`<pattern>:<actions>`).
    fn token(&self, user: &str, name: &str, scope: &str) -> String {
        let out = run_cli(
            self.server.data_dir(),
            &["token", "create", "--user", user, "--name", name, "--scope", scope],
            "",
        );
        String::from_utf8(out.stdout).expect("utf-8").trim().to_owned()
    }

    /// Runs `oras_auth.py <mode> <host> <workdir> <user> <secret> <repo>`.
    fn driver(&self, mode: &str, user: &str, secret: &str, repo: &str) -> Driven {
        let python = std::env::var("ORAS_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/oras_auth.py");
        let work = tempfile::tempdir().expect("temp dir");
        let mut cmd = Command::new(&python);
        cmd.arg(&script)
            .args([mode, &self.server.host])
            .arg(work.path())
            .args([user, secret, repo])
            .env("PYTHONUNBUFFERED", "1")
            // Never the machine's ~/.docker/config.json.
            .env("HOME", work.path())
            .env_remove("ORAS_USER")
            .env_remove("ORAS_PASS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(ca) = &self.ca {
            cmd.env("ORAS_TEST_CA", ca);
        }
        let started = Instant::now();
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {python}: {e} (scripts/test installs the oras SDK)"));
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let out: Output = match rx.recv_timeout(DRIVER_TIMEOUT) {
            Ok(out) => out.expect("wait for the driver"),
            Err(_) => {
                let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
                panic!("oras_auth.py {mode} did not finish within {DRIVER_TIMEOUT:?}");
            }
        };
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !stderr.contains("No module named 'oras'"),
            "the oras SDK is missing for {python} (scripts/test installs it):\n{stderr}"
        );
        Driven {
            code: out.status.code(),
            text: format!("--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"),
            stdout,
            took: started.elapsed(),
        }
    }

    /// An HTTP client that trusts the server's certificate, if any.
    fn http(&self) -> reqwest::Client {
        let mut b = reqwest::Client::builder();
        if let Some(ca) = &self.ca {
            let pem = std::fs::read(ca).expect("read cert");
            b = b.add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("parse cert"));
        }
        b.build().expect("client")
    }

    /// The digest Stowage serves for `repo:tag`, and the repository's tags (as alice).
    async fn served(&self, repo: &str, tag: &str) -> (String, Vec<String>) {
        let http = self.http();
        let resp = http
            .head(self.server.v2(&format!("{repo}/manifests/{tag}")))
            .basic_auth("alice", Some("alice-pw"))
            .header("Accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await
            .expect("HEAD manifest");
        assert_eq!(resp.status(), 200, "HEAD {repo}:{tag}");
        let digest = resp.headers()["docker-content-digest"]
            .to_str()
            .expect("ascii")
            .to_owned();
        let tags: Value = http
            .get(self.server.v2(&format!("{repo}/tags/list")))
            .basic_auth("alice", Some("alice-pw"))
            .send()
            .await
            .expect("GET tags")
            .json()
            .await
            .expect("tags JSON");
        let tags = tags["tags"]
            .as_array()
            .expect("tags")
            .iter()
            .map(|t| t.as_str().expect("tag").to_owned())
            .collect();
        (digest, tags)
    }
}

/// What one run of the driver did.
struct Driven {
    code: Option<i32>,
    stdout: String,
    /// stdout and stderr, for messages.
    text: String,
    took: Duration,
}

/// Login, push, pull (digest unchanged), tag list, delete, logout, as `user` with `secret`;
/// the script's digests and tags are cross-checked against the server.
async fn round_trip(s: &Setup, user: &str, secret: &str, repo: &str) {
    let run = s.driver("roundtrip", user, secret, repo);
    assert_eq!(run.code, Some(0), "oras_auth.py roundtrip failed:\n{}", run.text);
    let summary: Value = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("ORAS_AUTH_OK "))
        .map(|l| serde_json::from_str(l).expect("summary JSON"))
        .unwrap_or_else(|| panic!("no ORAS_AUTH_OK line:\n{}", run.text));
    let (served, tags) = s.served(repo, "v1").await;
    assert_eq!(
        summary["pushed"],
        served.as_str(),
        "the SDK reports the digest Stowage serves"
    );
    assert_eq!(
        summary["pulled"],
        served.as_str(),
        "the pulled digest is the pushed one"
    );
    assert_eq!(summary["tags_before"], serde_json::json!(["v1", "v2"]));
    assert_eq!(summary["tags_after"], serde_json::json!(["v1"]));
    assert_eq!(tags, ["v1"], "the deleted tag is gone on the server too");
}

/// A push that must be refused at once, with `message` in what the user sees (the SDK raises
/// an exception whose text holds the error body).
fn refused_push(s: &Setup, user: &str, secret: &str, repo: &str, message: &str) {
    let run = s.driver("push", user, secret, repo);
    eprintln!("refused push took {:?}:\n{}", run.took, run.text);
    assert_eq!(run.code, Some(1), "the push must be refused:\n{}", run.text);
    assert!(
        run.stdout.contains("ORAS_PUSH_REFUSED"),
        "refused by the registry, not by a failed check:\n{}",
        run.text
    );
    assert!(
        run.text.contains(message),
        "the SDK's output carries Stowage's message {message:?}:\n{}",
        run.text
    );
    assert!(run.took < Duration::from_secs(30), "refused at once: {:?}", run.took);
}

#[tokio::test]
async fn login_push_pull_tags_delete_logout_with_a_password() {
    let s = Setup::start(false);
    round_trip(&s, "alice", "alice-pw", "demo/oras").await;
}

#[tokio::test]
async fn login_push_pull_tags_delete_logout_with_an_api_token() {
    let s = Setup::start(false);
    let token = s.token("alice", "oras", "demo/**:pull,push,delete");
    round_trip(&s, "ci", &token, "demo/oras-token").await;
}

#[tokio::test]
async fn login_push_pull_tags_delete_logout_over_native_tls() {
    let s = Setup::start(true);
    round_trip(&s, "alice", "alice-pw", "demo/oras-tls").await;
}

#[tokio::test]
async fn a_wrong_password_is_refused_with_stowage_s_message() {
    let s = Setup::start(false);
    refused_push(
        &s,
        "alice",
        "not-the-password",
        "demo/oras",
        "wrong user name or password",
    );
}

#[tokio::test]
async fn a_token_for_another_repository_is_refused_on_push_with_its_message() {
    let s = Setup::start(false);
    let token = s.token("alice", "other", "other/**:pull,push");
    refused_push(
        &s,
        "alice",
        &token,
        "demo/oras",
        "the API token's scopes do not grant push on repository demo/oras",
    );
}

#[tokio::test]
async fn a_user_without_push_rights_is_refused_with_the_reason() {
    let s = Setup::start(false);
    refused_push(
        &s,
        "bob",
        "bob-pw",
        "demo/oras",
        "user bob may not push on repository demo/oras",
    );
}

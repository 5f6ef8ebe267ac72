//! Shared by the client tests that run a Python driver against a server with authentication on
//! (`tests/helm.rs`, `tests/oras_auth.rs`, each `#[path]`-including this file next to `mod
//! common;`): the server, its users and API tokens, its certificate, and running the driver
//! with a time limit.
//!
//! The server has users `alice` (password `alice-pw`; may pull, push and delete everywhere) and
//! `bob` (`bob-pw`; no rules), and `public/**` in `auth.anonymous_pull`, so bob, like anyone,
//! may only pull there. Over TLS its certificate is self-signed for 127.0.0.1 and doubles as the
//! CA the clients are given. Python is `$ORAS_TEST_PYTHON` or `python3` (`scripts/test`
//! installs the SDKs for it); a missing SDK fails the test, never skips it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{TestServer, run_cli};

/// How long one run of a driver may take before the test gives up on it.
pub const DRIVER_TIMEOUT: Duration = Duration::from_secs(120);

const CONFIG: &str = r#"
[auth]
enabled = true
anonymous_pull = ["public/**"]

[[auth.rules]]
repositories = ["**"]
users = ["alice"]
actions = ["pull", "push", "delete"]
"#;

/// A server with authentication on, and the files it was started with.
pub struct Setup {
    pub server: TestServer,
    _dir: tempfile::TempDir,
    /// The CA certificate (the self-signed server certificate) when serving TLS.
    pub ca: Option<PathBuf>,
}

/// What one run of a driver did.
pub struct Driven {
    pub code: Option<i32>,
    pub stdout: String,
    /// stdout and stderr, for messages.
    pub text: String,
    pub took: Duration,
}

impl Setup {
    pub fn start(tls: bool) -> Setup {
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
    pub fn token(&self, user: &str, name: &str, scope: &str) -> String {
        let out = run_cli(
            self.server.data_dir(),
            &["token", "create", "--user", user, "--name", name, "--scope", scope],
            "",
        );
        String::from_utf8(out.stdout).expect("utf-8").trim().to_owned()
    }

    /// Revokes `user`'s API token `name`.
    pub fn revoke(&self, user: &str, name: &str) {
        run_cli(self.server.data_dir(), &["token", "revoke", name, "--user", user], "");
    }

    /// Runs `python3 tests/clients/<script> <args>` in a fresh work directory (also its `HOME`,
    /// so that no client reads the machine's configuration) with `envs`, giving up after
    /// [`DRIVER_TIMEOUT`]. `module` is the SDK it imports, to tell a missing SDK apart.
    pub fn driver(&self, script: &str, module: &str, args: &[&str], envs: &[(&str, OsString)]) -> Driven {
        let python = std::env::var("ORAS_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients").join(script);
        let work = tempfile::tempdir().expect("temp dir");
        let mut cmd = Command::new(&python);
        cmd.arg(&script)
            .arg(args[0])
            .arg(&self.server.host)
            .arg(work.path())
            .args(&args[1..])
            .env("PYTHONUNBUFFERED", "1")
            .env("HOME", work.path())
            // oras-py's basic backend would take credentials from these.
            .env_remove("ORAS_USER")
            .env_remove("ORAS_PASS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let started = Instant::now();
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {python}: {e} (scripts/test installs the Python SDKs)"));
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let out: Output = match rx.recv_timeout(DRIVER_TIMEOUT) {
            Ok(out) => out.expect("wait for the driver"),
            Err(_) => {
                let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
                panic!("{} {args:?} did not finish within {DRIVER_TIMEOUT:?}", script.display());
            }
        };
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !stderr.contains(&format!("No module named '{module}'")),
            "the Python package providing {module} is missing for {python} (scripts/test installs it):\n{stderr}"
        );
        Driven {
            code: out.status.code(),
            text: format!("--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"),
            stdout,
            took: started.elapsed(),
        }
    }

    /// An HTTP client that trusts the server's certificate, if any.
    pub fn http(&self) -> reqwest::Client {
        let mut b = reqwest::Client::builder();
        if let Some(ca) = &self.ca {
            let pem = std::fs::read(ca).expect("read cert");
            b = b.add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("parse cert"));
        }
        b.build().expect("client")
    }

    /// The digest Stowage serves for `repo:tag`, and the repository's tags (asked as alice).
    pub async fn served(&self, repo: &str, tag: &str) -> (String, Vec<String>) {
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

/// The JSON after `marker` on a line of `run`'s stdout.
pub fn summary(run: &Driven, marker: &str) -> Value {
    run.stdout
        .lines()
        .find_map(|l| l.strip_prefix(marker))
        .map(|l| serde_json::from_str(l.trim()).expect("summary JSON"))
        .unwrap_or_else(|| panic!("no {marker} line:\n{}", run.text))
}

/// Asserts that `run` was refused by the registry (exit 1 with `marker` on stdout, not a failed
/// check), at once, with `message` in what the user sees.
pub fn assert_refused(run: &Driven, marker: &str, message: &str) {
    eprintln!("refused in {:?}:\n{}", run.took, run.text);
    assert_eq!(run.code, Some(1), "must be refused:\n{}", run.text);
    assert!(
        run.stdout.contains(marker),
        "refused by the registry, not by a failed check:\n{}",
        run.text
    );
    assert!(
        run.text.contains(message),
        "the client's output carries {message:?}:\n{}",
        run.text
    );
    assert!(run.took < Duration::from_secs(30), "refused at once: {:?}", run.took);
}

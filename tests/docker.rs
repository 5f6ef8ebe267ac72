//! A real docker engine against a real `stowage serve` with authentication on (issue 10).
//!
//! The test binary starts one `dockerd` (Debian's `docker.io`) for all its tests, through
//! `common::dockerd` (its own data root and socket, no iptables rules or bridge, stopped at
//! exit; see there). The docker CLI (`docker` on `PATH`, or `$DOCKER_TEST_CLI`) talks to it through
//! `DOCKER_HOST`, with `DOCKER_CONFIG` set to a temporary directory per test, so logins never
//! reach the machine's `~/.docker`. dockerd treats every registry in 127.0.0.0/8 as insecure, so
//! plain HTTP needs no daemon setting; over TLS it trusts the CA put in
//! `/etc/docker/certs.d/<host:port>/ca.crt` (created and removed by the TLS test).
//!
//! The image pushed is made locally: a root filesystem with `/bin/busybox` from Debian's
//! `busybox-static`, `docker import`ed once as `local/busybox:1`. Nothing comes from the
//! internet. When dockerd or the CLI is missing or cannot start, the tests FAIL saying so.

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::dockerd::{self, docker_cli, docker_cmd};
use common::{TestServer, client, run_cli};
use serde_json::Value;

/// How long one docker command may take before the test gives up on it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

const CONFIG: &str = r#"
[auth]
enabled = true
anonymous_pull = ["public/**"]

[[auth.rules]]
repositories = ["**"]
users = ["alice"]
actions = ["pull", "push"]

[[auth.rules]]
repositories = ["immutable/release"]
users = ["alice"]
actions = ["overwrite"]

[[immutable_tags]]
repositories = ["immutable/**"]
tags = ["v*"]
"#;

// ---------------------------------------------------------------------------------------------
// The engine (shared with tests/deploy.rs: `common::dockerd`) and the image every test pushes
// ---------------------------------------------------------------------------------------------

static BUSYBOX: OnceLock<Result<(), String>> = OnceLock::new();

/// The shared engine's `DOCKER_HOST`, starting it and importing `local/busybox:1` (and
/// `local/busybox:arm64`) on first use. Panics with the reason when it cannot.
fn engine() -> &'static str {
    let host = dockerd::engine();
    if let Err(why) = BUSYBOX.get_or_init(|| import_busybox(host)) {
        panic!("{why}");
    }
    host
}

/// busybox and two links to it, imported from a tar.
fn import_busybox(host: &str) -> Result<(), String> {
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        return Err("/bin/busybox is missing: scripts/test installs Debian's busybox-static".into());
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let root = dir.path().join("rootfs");
    std::fs::create_dir_all(root.join("bin")).map_err(|e| e.to_string())?;
    std::fs::copy(busybox, root.join("bin/busybox")).map_err(|e| e.to_string())?;
    for link in ["sh", "ls"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(link)).map_err(|e| e.to_string())?;
    }
    // Two imports make two images (their creation times differ): the second stands for another
    // platform in the manifest list test (dockerd 20.10 ignores `import --platform` unless
    // experimental, so the list is annotated instead).
    for tag in ["local/busybox:1", "local/busybox:arm64"] {
        dockerd::import_rootfs(host, &root, tag)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// One test's docker client and registry
// ---------------------------------------------------------------------------------------------

/// A docker CLI with its own configuration directory, and a registry with auth on.
struct Setup {
    server: TestServer,
    _config: tempfile::TempDir,
    docker_config: tempfile::TempDir,
    host: &'static str,
}

/// The result of one docker command: exit success and everything it printed.
struct Run {
    ok: bool,
    text: String,
    took: Duration,
}

impl Setup {
    /// A registry with `alice` (password `alice-pw`, may push and pull everything) and `bob`
    /// (`bob-pw`, no rules: may pull `public/**` only, as anyone may), over TLS when `tls` has
    /// a certificate and key.
    fn start(tls: Option<(&Path, &Path)>) -> Setup {
        let host = engine();
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("stowage.toml");
        std::fs::write(&path, CONFIG).expect("write config");
        let mut envs = vec![
            ("STOWAGE_CONFIG".to_owned(), path.to_str().expect("utf-8").to_owned()),
            ("STOWAGE_AUTH__ENABLED".to_owned(), "true".to_owned()),
        ];
        if let Some((cert, key)) = tls {
            envs.push(("STOWAGE_TLS__CERT".into(), cert.to_str().expect("utf-8").into()));
            envs.push(("STOWAGE_TLS__KEY".into(), key.to_str().expect("utf-8").into()));
        }
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let server = TestServer::start_with(&envs);
        for name in ["alice", "bob"] {
            run_cli(server.data_dir(), &["user", "add", name], &format!("{name}-pw\n"));
        }
        Setup {
            server,
            _config: dir,
            docker_config: tempfile::tempdir().expect("temp dir"),
            host,
        }
    }

    /// An API token of `user` for `scope` (`<pattern>:<actions>`).
    fn token(&self, user: &str, scope: &str) -> String {
        let out = run_cli(
            self.server.data_dir(),
            &["token", "create", "--user", user, "--name", "docker", "--scope", scope],
            "",
        );
        String::from_utf8(out.stdout).expect("utf-8").trim().to_owned()
    }

    /// `registry-host:port/<path>`.
    fn image(&self, path: &str) -> String {
        format!("{}/{path}", self.server.host)
    }

    /// Runs `docker <args>` (with `stdin`), giving up after `COMMAND_TIMEOUT`.
    fn docker(&self, args: &[&str], stdin: &str) -> Run {
        let mut cmd = docker_cmd(self.host, self.docker_config.path());
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot run the docker CLI `{}`: {e} (scripts/test installs docker.io)",
                docker_cli()
            )
        });
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let out: Output = match rx.recv_timeout(COMMAND_TIMEOUT) {
            Ok(out) => out.expect("wait for docker"),
            Err(_) => {
                let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
                panic!("docker {args:?} did not finish within {COMMAND_TIMEOUT:?}");
            }
        };
        Run {
            ok: out.status.success(),
            text: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            took: started.elapsed(),
        }
    }

    /// Runs `docker <args>` and asserts it succeeded; returns its output.
    fn ok(&self, args: &[&str]) -> String {
        let run = self.docker(args, "");
        assert!(run.ok, "docker {args:?} failed:\n{}", run.text);
        run.text
    }

    fn login(&self, user: &str, password: &str) -> Run {
        self.docker(
            &["login", &self.server.host, "-u", user, "--password-stdin"],
            &format!("{password}\n"),
        )
    }

    /// The digest Stowage serves for `repo:tag` (asked with alice's Basic credentials).
    async fn served_digest(&self, repo: &str, tag: &str, http: &reqwest::Client) -> String {
        let basic = base64::engine::general_purpose::STANDARD.encode("alice:alice-pw");
        let resp = http
            .head(self.server.v2(&format!("{repo}/manifests/{tag}")))
            .header("Authorization", format!("Basic {basic}"))
            .header(
                "Accept",
                "application/vnd.docker.distribution.manifest.v2+json, \
                 application/vnd.docker.distribution.manifest.list.v2+json, \
                 application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
            )
            .send()
            .await
            .expect("HEAD manifest");
        assert_eq!(resp.status(), 200, "HEAD {repo}:{tag}");
        resp.headers()["docker-content-digest"]
            .to_str()
            .expect("ascii")
            .to_owned()
    }

    /// Tags `local/busybox:1` as `<registry>/<repo>:<tag>` and pushes it; returns the digest
    /// docker reports.
    fn push(&self, repo: &str, tag: &str) -> String {
        let image = self.image(&format!("{repo}:{tag}"));
        self.ok(&["tag", "local/busybox:1", &image]);
        let out = self.ok(&["push", &image]);
        digest_in(&out, "digest: ").unwrap_or_else(|| panic!("push prints the digest:\n{out}"))
    }

    /// Removes the local tag, pulls it back and returns the digest docker reports.
    fn rmi_and_pull(&self, repo: &str, tag: &str) -> String {
        let image = self.image(&format!("{repo}:{tag}"));
        self.ok(&["rmi", &image]);
        let out = self.ok(&["pull", &image]);
        let digest = digest_in(&out, "Digest: ").unwrap_or_else(|| panic!("pull prints the digest:\n{out}"));
        // The image is back under its name.
        self.ok(&["image", "inspect", &image]);
        digest
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        // Untag what this test made, so the shared engine does not accumulate names.
        let Ok(out) = docker_cmd(self.host, self.docker_config.path())
            .args(["image", "ls", "--format", "{{.Repository}}:{{.Tag}}"])
            .output()
        else {
            return;
        };
        let mine: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with(&format!("{}/", self.server.host)))
            .map(str::to_owned)
            .collect();
        if !mine.is_empty() {
            let _ = docker_cmd(self.host, self.docker_config.path())
                .arg("rmi")
                .args(&mine)
                .output();
        }
    }
}

/// The `sha256:…` after `marker` in docker's output.
fn digest_in(out: &str, marker: &str) -> Option<String> {
    let rest = &out[out.find(marker)? + marker.len()..];
    let digest: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == ':')
        .collect();
    digest.starts_with("sha256:").then_some(digest)
}

/// Login, push, rmi, pull with the digest unchanged, logout: as `user` with `password`.
async fn round_trip(s: &Setup, user: &str, password: &str, repo: &str) {
    let login = s.login(user, password);
    assert!(login.ok, "docker login failed:\n{}", login.text);
    assert!(login.text.contains("Login Succeeded"), "{}", login.text);
    let pushed = s.push(repo, "1");
    let served = s.served_digest(repo, "1", &client()).await;
    assert_eq!(pushed, served, "docker reports the digest Stowage serves");
    let pulled = s.rmi_and_pull(repo, "1");
    assert_eq!(pulled, served, "the pulled digest is the pushed one");
    let out = s.ok(&["logout", &s.server.host]);
    assert!(out.contains("Removing login credentials"), "{out}");
    // Logged out, the private repository is closed again.
    s.ok(&["rmi", &s.image(&format!("{repo}:1"))]);
    let run = s.docker(&["pull", &s.image(&format!("{repo}:1"))], "");
    assert!(!run.ok, "a pull after logout must fail:\n{}", run.text);
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn login_push_pull_logout_with_a_password() {
    let s = Setup::start(None);
    round_trip(&s, "alice", "alice-pw", "demo/busybox").await;
}

#[tokio::test]
async fn login_push_pull_with_an_api_token_as_the_password() {
    let s = Setup::start(None);
    let token = s.token("alice", "demo/**:pull,push");
    round_trip(&s, "alice", &token, "demo/app").await;
}

#[tokio::test]
async fn anonymous_pull_of_an_anonymous_pull_repository() {
    let s = Setup::start(None);
    let login = s.login("alice", "alice-pw");
    assert!(login.ok, "{}", login.text);
    let pushed = s.push("public/busybox", "1");
    s.ok(&["logout", &s.server.host]);
    let pulled = s.rmi_and_pull("public/busybox", "1");
    assert_eq!(pulled, pushed);
    // With no login, a push is still refused.
    let image = s.image("public/busybox:2");
    s.ok(&["tag", "local/busybox:1", &image]);
    let run = s.docker(&["push", &image], "");
    assert!(!run.ok, "an anonymous push must fail:\n{}", run.text);
    assert!(
        run.text.contains("authentication required: log in"),
        "the output says what is missing:\n{}",
        run.text
    );
}

#[tokio::test]
async fn a_wrong_password_is_refused_with_stowage_s_message() {
    let s = Setup::start(None);
    let run = s.login("alice", "not-the-password");
    eprintln!("wrong password:\n{}", run.text);
    assert!(!run.ok, "login with a wrong password must fail:\n{}", run.text);
    assert!(
        run.text.contains("wrong user name or password"),
        "docker shows Stowage's message:\n{}",
        run.text
    );
}

#[tokio::test]
async fn a_token_for_another_repository_is_refused_at_once_on_push() {
    let s = Setup::start(None);
    let token = s.token("alice", "other/**:pull,push");
    let login = s.login("alice", &token);
    assert!(login.ok, "a valid token logs in, whatever its scopes:\n{}", login.text);
    let image = s.image("demo/busybox:1");
    s.ok(&["tag", "local/busybox:1", &image]);
    let run = s.docker(&["push", &image], "");
    eprintln!("refused push took {:?}:\n{}", run.took, run.text);
    assert!(!run.ok, "a push outside the token's scopes must fail:\n{}", run.text);
    assert!(
        run.took < Duration::from_secs(20),
        "the refusal is at once, not after docker's retries: {:?}\n{}",
        run.took,
        run.text
    );
    assert!(
        run.text
            .contains("the API token's scopes do not grant push on repository demo/busybox"),
        "the output names the problem:\n{}",
        run.text
    );
}

#[tokio::test]
async fn a_user_without_push_rights_is_refused_at_once_with_the_reason() {
    let s = Setup::start(None);
    let login = s.login("bob", "bob-pw");
    assert!(login.ok, "{}", login.text);
    let image = s.image("demo/busybox:1");
    s.ok(&["tag", "local/busybox:1", &image]);
    let run = s.docker(&["push", &image], "");
    assert!(!run.ok, "bob may not push:\n{}", run.text);
    assert!(run.took < Duration::from_secs(20), "{:?}\n{}", run.took, run.text);
    assert!(
        run.text.contains("user bob may not push on repository demo/busybox"),
        "the output names the problem:\n{}",
        run.text
    );
}

#[tokio::test]
async fn a_changed_push_to_an_immutable_tag_is_refused_at_once_with_the_reason() {
    let s = Setup::start(None);
    let login = s.login("alice", "alice-pw");
    assert!(login.ok, "{}", login.text);
    let pushed = s.push("immutable/app", "v1");
    // The unchanged image again: allowed.
    assert_eq!(s.push("immutable/app", "v1"), pushed);
    // Another image under the same tag (`local/busybox:arm64` is a second import).
    let image = s.image("immutable/app:v1");
    s.ok(&["tag", "local/busybox:arm64", &image]);
    let run = s.docker(&["push", &image], "");
    eprintln!("refused push took {:?}:\n{}", run.took, run.text);
    assert!(!run.ok, "moving an immutable tag must fail:\n{}", run.text);
    assert!(run.took < Duration::from_secs(20), "{:?}\n{}", run.took, run.text);
    assert!(
        run.text.contains("tag v1 in repository immutable/app is immutable"),
        "the output names the problem:\n{}",
        run.text
    );
    assert_eq!(s.served_digest("immutable/app", "v1", &client()).await, pushed);
    // Where alice has `overwrite`, docker's token (asked for pull,push) carries it.
    let first = s.push("immutable/release", "v1");
    let image = s.image("immutable/release:v1");
    s.ok(&["tag", "local/busybox:arm64", &image]);
    let out = s.ok(&["push", &image]);
    let moved = digest_in(&out, "digest: ").unwrap_or_else(|| panic!("push prints the digest:\n{out}"));
    assert_ne!(moved, first);
    assert_eq!(s.served_digest("immutable/release", "v1", &client()).await, moved);
}

#[tokio::test]
async fn manifest_inspect_and_a_two_platform_list() {
    let s = Setup::start(None);
    let login = s.login("alice", "alice-pw");
    assert!(login.ok, "{}", login.text);
    let amd64 = s.push("demo/multi", "amd64");
    let arm = s.image("demo/multi:arm64");
    s.ok(&["tag", "local/busybox:arm64", &arm]);
    s.ok(&["push", &arm]);

    let out = s.ok(&["manifest", "inspect", "--insecure", &s.image("demo/multi:amd64")]);
    let manifest: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(manifest["schemaVersion"], 2, "{out}");
    assert_eq!(manifest["layers"].as_array().map(Vec::len), Some(1), "{out}");

    let list = s.image("demo/multi:1");
    s.ok(&[
        "manifest",
        "create",
        "--insecure",
        &list,
        &s.image("demo/multi:amd64"),
        &arm,
    ]);
    s.ok(&["manifest", "annotate", "--arch", "arm64", &list, &arm]);
    let out = s.ok(&["manifest", "push", "--insecure", &list]);
    let pushed = digest_in(&out, "").unwrap_or_else(|| panic!("manifest push prints the digest:\n{out}"));
    assert_eq!(pushed, s.served_digest("demo/multi", "1", &client()).await);

    let out = s.ok(&["manifest", "inspect", "--insecure", &list]);
    let index: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let entries = index["manifests"].as_array().expect("a list");
    let platforms: Vec<&str> = entries
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().expect("architecture"))
        .collect();
    assert_eq!(platforms, ["amd64", "arm64"], "{out}");
    assert_eq!(entries[0]["digest"], amd64.as_str());
    // docker pulls the list's entry for its own platform.
    s.ok(&["pull", &list]);
}

/// `/etc/docker/certs.d/<host:port>/`, removed on drop.
struct CertsD(PathBuf);

impl Drop for CertsD {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn login_push_pull_over_native_tls() {
    let certs = tempfile::tempdir().expect("temp dir");
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("generate certificate");
    let pem = ck.cert.pem();
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    std::fs::write(&cert, &pem).expect("write cert");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write key");
    let s = Setup::start(Some((&cert, &key)));
    assert!(s.server.url.starts_with("https://"), "{}", s.server.url);
    let certs_d = CertsD(Path::new("/etc/docker/certs.d").join(&s.server.host));
    std::fs::create_dir_all(&certs_d.0).expect("create the certs.d directory");
    std::fs::write(certs_d.0.join("ca.crt"), &pem).expect("write ca.crt");

    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).expect("parse cert"))
        .build()
        .expect("client");
    let login = s.login("alice", "alice-pw");
    assert!(login.ok, "docker login over TLS failed:\n{}", login.text);
    let pushed = s.push("demo/tls", "1");
    assert_eq!(pushed, s.served_digest("demo/tls", "1", &http).await);
    let pulled = s.rmi_and_pull("demo/tls", "1");
    assert_eq!(pulled, pushed);
    s.ok(&["logout", &s.server.host]);
}

#[tokio::test]
async fn a_revoked_or_expired_api_token_is_refused_at_once_with_the_reason() {
    let s = Setup::start(None);
    // Revoked after login: docker's next push fails at once, saying the token was revoked.
    let token = s.token("alice", "demo/**:pull,push");
    let login = s.login("alice", &token);
    assert!(login.ok, "{}", login.text);
    run_cli(
        s.server.data_dir(),
        &["token", "revoke", "docker", "--user", "alice"],
        "",
    );
    let image = s.image("demo/busybox:1");
    s.ok(&["tag", "local/busybox:1", &image]);
    let run = s.docker(&["push", &image], "");
    eprintln!("push with a revoked token took {:?}:\n{}", run.took, run.text);
    assert!(!run.ok, "a push with a revoked token must fail:\n{}", run.text);
    assert!(run.took < Duration::from_secs(20), "{:?}\n{}", run.took, run.text);
    let revoked = r#"the API token "docker" of user alice has been revoked"#;
    assert!(
        run.text.contains(revoked),
        "the output names the problem:\n{}",
        run.text
    );
    // And a login with it says the same.
    let run = s.login("alice", &token);
    assert!(!run.ok, "{}", run.text);
    assert!(run.text.contains(revoked), "login names the problem:\n{}", run.text);

    // An expired token's login says it expired.
    let out = run_cli(
        s.server.data_dir(),
        &[
            "token",
            "create",
            "--user",
            "alice",
            "--name",
            "short",
            "--scope",
            "demo/**:pull",
            "--expires-in-days",
            "0",
        ],
        "",
    );
    let short = String::from_utf8(out.stdout).expect("utf-8").trim().to_owned();
    let run = s.login("alice", &short);
    assert!(!run.ok, "{}", run.text);
    assert!(
        run.text.contains(r#"the API token "short" of user alice has expired"#),
        "login names the problem:\n{}",
        run.text
    );
}

//! Container engines against a real `stowage serve` with authentication on, over plain HTTP on
//! 127.0.0.1 and (podman, containerd) over native TLS with a self-signed certificate they are
//! given (podman `--cert-dir`, ctr `--hosts-dir`): podman and buildah (Debian packages, vfs
//! storage) and containerd driven by `ctr`.
//!
//! Images are made here, never pulled from the internet: a one-file root filesystem holding
//! `/bin/busybox` from Debian's `busybox-static`, committed with `buildah from scratch` +
//! `buildah copy` + `buildah commit`.
//!
//! Nothing touches the machine's own engine state: each podman/buildah test has its own
//! `storage.conf` (driver `vfs`, graphroot and runroot in a temp dir, via
//! `CONTAINERS_STORAGE_CONF`), `containers.conf` (`tmp_dir` there, no event log), auth file
//! (`REGISTRY_AUTH_FILE`), `HOME` and `XDG_RUNTIME_DIR`, and runs each command in a private mount
//! namespace with its own dir over root's blob-info cache (`/var/lib/containers/cache`).
//! containerd runs once per test binary (`OnceLock`) with its own `config.toml` whose root, state
//! and sockets are in a temp dir (and without the CRI and `/opt/containerd` plugins); it is
//! killed and its dir removed when the test process exits.
//!
//! The tools are installed by `scripts/test`. A missing tool, or a containerd that does not
//! start, FAILS these tests: they never pass without having talked to the server.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::tools::{ContainersWorld, output_within, require_tool};
use common::{TestServer, run_cli as stowage, sha256};

/// Who may do what: `alice` pulls and pushes everywhere, `bob` only pulls; `public/**` is open
/// for anonymous pulls.
const CONFIG: &str = r#"
[auth]
enabled = true
anonymous_pull = ["public/**"]

[[auth.rules]]
repositories = ["**"]
users = ["alice"]
actions = ["pull", "push"]

[[auth.rules]]
repositories = ["**"]
users = ["bob"]
actions = ["pull"]
"#;

const ALICE_PW: &str = "alice-pw";

/// A Stowage server with authentication on and the users of `CONFIG`, over plain HTTP or
/// native TLS.
struct Registry {
    server: TestServer,
    _config: tempfile::TempDir,
    /// With TLS: the dir holding `ca.crt` (the server's self-signed certificate), as podman,
    /// buildah and skopeo take it with `--cert-dir`.
    cert_dir: Option<PathBuf>,
}

impl Registry {
    fn start() -> Registry {
        Self::start_on(false)
    }

    /// Serves HTTPS with a self-signed certificate for 127.0.0.1.
    fn start_tls() -> Registry {
        Self::start_on(true)
    }

    fn start_on(tls: bool) -> Registry {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("stowage.toml");
        std::fs::write(&path, CONFIG).expect("write config");
        let mut envs = vec![
            ("STOWAGE_CONFIG", path.to_str().expect("utf-8 path").to_owned()),
            ("STOWAGE_AUTH__ENABLED", "true".to_owned()),
        ];
        let cert_dir = tls.then(|| {
            let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("generate certificate");
            let certs = dir.path().join("certs");
            std::fs::create_dir_all(&certs).expect("mkdir certs");
            std::fs::write(certs.join("ca.crt"), ck.cert.pem()).expect("write ca.crt");
            let key = dir.path().join("key.pem");
            std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write key");
            let cert = certs.join("ca.crt");
            envs.push(("STOWAGE_TLS__CERT", cert.to_str().expect("utf-8 path").to_owned()));
            envs.push(("STOWAGE_TLS__KEY", key.to_str().expect("utf-8 path").to_owned()));
            certs
        });
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let server = TestServer::start_with(&envs);
        assert_eq!(server.url.starts_with("https://"), tls, "served at {}", server.url);
        stowage(server.data_dir(), &["user", "add", "alice"], &format!("{ALICE_PW}\n"));
        stowage(server.data_dir(), &["user", "add", "bob"], "bob-pw\n");
        Registry {
            server,
            _config: dir,
            cert_dir,
        }
    }

    /// How podman, buildah and skopeo reach this server: `--tls-verify=false` for plain HTTP,
    /// `--cert-dir=<dir with ca.crt>` for TLS (verified).
    fn tls_flag(&self) -> String {
        match &self.cert_dir {
            None => "--tls-verify=false".to_owned(),
            Some(dir) => format!("--cert-dir={}", dir.display()),
        }
    }

    fn host(&self) -> &str {
        &self.server.host
    }

    /// `127.0.0.1:PORT/<repo>`.
    fn image(&self, repo: &str) -> String {
        format!("{}/{repo}", self.server.host)
    }

    /// An API token of alice's with `scope` (e.g. `demo/**:pull,push`).
    fn token(&self, name: &str, scope: &str) -> String {
        let out = stowage(
            self.server.data_dir(),
            &["token", "create", "--user", "alice", "--name", name, "--scope", scope],
            "",
        );
        String::from_utf8(out.stdout).expect("utf-8").trim().to_owned()
    }

    /// The manifest bytes Stowage serves for `repo:reference` (read with skopeo as alice).
    fn raw_manifest(&self, repo_ref: &str) -> Vec<u8> {
        run(Command::new(require_tool("skopeo")).args([
            "inspect",
            "--raw",
            &self.tls_flag(),
            "--creds",
            &format!("alice:{ALICE_PW}"),
            &format!("docker://{}", self.image(repo_ref)),
        ]))
        .stdout
    }

    /// The digest of the manifest Stowage serves for `repo:reference`.
    fn digest(&self, repo_ref: &str) -> String {
        sha256(&self.raw_manifest(repo_ref))
    }
}

// ---------------------------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------------------------

/// Runs `cmd`; fails the test if it exits non-zero, showing what it printed.
fn run(cmd: &mut Command) -> Output {
    let out = output_within(cmd);
    assert!(
        out.status.success(),
        "command failed ({}): {cmd:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

// ---------------------------------------------------------------------------------------------
// podman and buildah with throwaway state
// ---------------------------------------------------------------------------------------------

/// A private podman/buildah world (see `common::tools::ContainersWorld`), using the system's
/// `registries.conf`.
struct Engine {
    world: ContainersWorld,
}

impl Engine {
    fn new() -> Engine {
        Engine {
            world: ContainersWorld::new(None),
        }
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.world.path(sub)
    }

    /// A podman or buildah command in this engine's world.
    fn command(&self, tool: &str) -> Command {
        self.world.command(tool)
    }

    fn podman(&self, args: &[&str]) -> Output {
        run(self.command("podman").args(args))
    }

    fn buildah(&self, args: &[&str]) -> Output {
        run(self.command("buildah").args(args))
    }

    /// Commits a local image `localhost/<name>` holding `/bin/busybox` and a file naming it, for
    /// `arch`; returns nothing (the image is in this engine's storage).
    fn build_image(&self, name: &str, arch: &str) {
        let busybox = Path::new("/bin/busybox");
        assert!(
            busybox.is_file(),
            "/bin/busybox is missing: `scripts/test` installs Debian's busybox-static"
        );
        let rootfs = self.path(&format!("rootfs-{name}"));
        std::fs::create_dir_all(rootfs.join("bin")).expect("mkdir rootfs");
        std::fs::copy(busybox, rootfs.join("bin/busybox")).expect("copy busybox");
        std::fs::write(rootfs.join("name"), format!("{name} {arch}\n")).expect("write name");
        let container = stdout(&self.buildah(&["from", "scratch"]));
        let rootfs = format!("{}/", rootfs.display());
        self.buildah(&["copy", &container, &rootfs, "/"]);
        self.buildah(&[
            "config",
            "--arch",
            arch,
            "--os",
            "linux",
            "--cmd",
            "/bin/busybox",
            &container,
        ]);
        self.buildah(&["commit", "--quiet", "--rm", &container, &format!("localhost/{name}")]);
    }

    /// `podman login` to `reg` with the secret on stdin; returns the command's output.
    fn login(&self, reg: &Registry, user: &str, secret: &str) -> Output {
        let mut child = self
            .command("podman")
            .args(["login", &reg.tls_flag(), reg.host(), "-u", user, "--password-stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn podman login");
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin
                .write_all(format!("{secret}\n").as_bytes())
                .expect("write password");
        }
        child.wait_with_output().expect("wait for podman login")
    }

    fn auth_file(&self) -> String {
        std::fs::read_to_string(self.path("auth.json")).expect("read auth.json")
    }
}

// ---------------------------------------------------------------------------------------------
// podman
// ---------------------------------------------------------------------------------------------

#[test]
fn podman_logs_in_pushes_pulls_and_logs_out() {
    podman_round_trip(&Registry::start());
}

#[test]
fn podman_logs_in_pushes_pulls_and_logs_out_over_tls() {
    podman_round_trip(&Registry::start_tls());
}

/// login with a password, push, tag list, catalog, rmi, pull (digest unchanged), logout, and an
/// anonymous push refused.
fn podman_round_trip(reg: &Registry) {
    let tls = reg.tls_flag();
    let engine = Engine::new();
    engine.build_image("app:v1", "amd64");
    let remote = reg.image("demo/app:v1");

    let login = engine.login(reg, "alice", ALICE_PW);
    assert!(
        login.status.success(),
        "podman login: {}",
        String::from_utf8_lossy(&login.stderr)
    );
    assert!(stdout(&login).contains("Login Succeeded"), "{}", stdout(&login));
    assert!(engine.auth_file().contains(reg.host()), "login stored no credentials");

    engine.podman(&["push", &tls, "localhost/app:v1", &remote]);
    let served = reg.digest("demo/app:v1");

    // Tag list and catalog through podman's search (with the stored credentials). search has
    // no --cert-dir: over TLS it skips verification (it still speaks HTTPS first).
    let tags = stdout(&engine.podman(&["search", "--tls-verify=false", "--list-tags", &reg.image("demo/app")]));
    println!("podman search --list-tags:\n{tags}");
    assert!(
        tags.lines().any(|l| l.split_whitespace().nth(1) == Some("v1")),
        "tags: {tags}"
    );
    let catalog = stdout(&engine.podman(&["search", "--tls-verify=false", &format!("{}/", reg.host())]));
    println!("podman search (catalog):\n{catalog}");
    assert!(catalog.contains(&reg.image("demo/app")), "catalog: {catalog}");

    engine.podman(&["rmi", "localhost/app:v1"]);
    engine.podman(&["pull", &tls, &remote]);
    let pulled = stdout(&engine.podman(&["image", "inspect", "--format", "{{.Digest}}", &remote]));
    assert_eq!(pulled, served, "podman pulled another manifest than Stowage serves");

    engine.podman(&["logout", reg.host()]);
    assert!(
        !engine.auth_file().contains(reg.host()),
        "logout left credentials behind"
    );
    // Logged out, a push is refused (alice's repository is not anonymous).
    let refused = output_within(
        engine
            .command("podman")
            .args(["push", &tls, &remote, &reg.image("demo/app:anon")]),
    );
    assert!(!refused.status.success(), "an anonymous push succeeded");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("authentication required"),
        "anonymous push refused with: {err}"
    );
}

#[test]
fn podman_logs_in_with_an_api_token_and_pushes() {
    let reg = Registry::start();
    let engine = Engine::new();
    engine.build_image("tok:v1", "amd64");
    let token = reg.token("ci", "ci/**:pull,push");
    assert!(token.starts_with("stw_"), "token create printed {token:?}");

    let login = engine.login(&reg, "alice", &token);
    assert!(
        login.status.success(),
        "podman login with a token: {}",
        String::from_utf8_lossy(&login.stderr)
    );
    engine.podman(&[
        "push",
        "--tls-verify=false",
        "localhost/tok:v1",
        &reg.image("ci/tok:v1"),
    ]);
    let manifest: serde_json::Value = serde_json::from_slice(&reg.raw_manifest("ci/tok:v1")).expect("json");
    assert_eq!(manifest["layers"].as_array().map(Vec::len), Some(1), "{manifest}");

    // The token's scope does not cover another repository: the push is refused at once.
    let started = Instant::now();
    let refused = output_within(engine.command("podman").args([
        "push",
        "--tls-verify=false",
        "localhost/tok:v1",
        &reg.image("demo/tok:v1"),
    ]));
    assert!(!refused.status.success(), "a push outside the token's scope succeeded");
    let err = String::from_utf8_lossy(&refused.stderr);
    // podman's first request there is a HEAD of a blob, whose 403 has no body: podman names
    // the repository and the status itself.
    assert!(
        err.contains("demo/tok") && err.contains("403 (Forbidden)"),
        "push outside the token's scope refused with: {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the refusal took {:?}",
        started.elapsed()
    );
}

#[test]
fn podman_login_with_a_wrong_password_is_refused() {
    let reg = Registry::start();
    let engine = Engine::new();
    let out = engine.login(&reg, "alice", "not-the-password");
    assert!(!out.status.success(), "a wrong password logged in");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid username/password"),
        "wrong password refused with: {err}"
    );
    assert!(
        !engine.auth_file().contains(reg.host()),
        "a failed login stored credentials"
    );

    // A pull with wrong credentials shows Stowage's own reason.
    let out = output_within(engine.command("podman").args([
        "pull",
        "--tls-verify=false",
        "--creds",
        "alice:not-the-password",
        &reg.image("demo/app:v1"),
    ]));
    assert!(!out.status.success(), "a pull with a wrong password succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("wrong user name or password"),
        "wrong password refused with: {err}"
    );
}

#[test]
fn podman_pushes_a_multi_arch_index() {
    let reg = Registry::start();
    let engine = Engine::new();
    engine.build_image("multi-amd64:v1", "amd64");
    engine.build_image("multi-arm64:v1", "arm64");
    let login = engine.login(&reg, "alice", ALICE_PW);
    assert!(
        login.status.success(),
        "podman login: {}",
        String::from_utf8_lossy(&login.stderr)
    );

    engine.podman(&["manifest", "create", "localhost/multi:v1"]);
    for image in ["localhost/multi-amd64:v1", "localhost/multi-arm64:v1"] {
        engine.podman(&[
            "manifest",
            "add",
            "localhost/multi:v1",
            &format!("containers-storage:{image}"),
        ]);
    }
    engine.podman(&[
        "manifest",
        "push",
        "--all",
        "--tls-verify=false",
        "localhost/multi:v1",
        &format!("docker://{}", reg.image("demo/multi:v1")),
    ]);

    let index: serde_json::Value = serde_json::from_slice(&reg.raw_manifest("demo/multi:v1")).expect("json");
    let media = index["mediaType"].as_str().unwrap_or_default();
    assert!(
        media == "application/vnd.oci.image.index.v1+json"
            || media == "application/vnd.docker.distribution.manifest.list.v2+json",
        "not an index: {index}"
    );
    let manifests = index["manifests"].as_array().expect("manifests");
    let mut arches: Vec<&str> = manifests
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().unwrap_or_default())
        .collect();
    arches.sort_unstable();
    assert_eq!(arches, ["amd64", "arm64"], "{index}");
    // Every child manifest is served under its digest.
    for m in manifests {
        let digest = m["digest"].as_str().expect("digest");
        assert_eq!(reg.digest(&format!("demo/multi@{digest}")), digest);
    }
}

#[test]
fn podman_pulls_anonymously_from_an_anonymous_pull_repository() {
    let reg = Registry::start();
    let served = push_with_podman(&reg, "public/anon:v1");
    let engine = Engine::new();
    engine.podman(&["pull", "--tls-verify=false", &reg.image("public/anon:v1")]);
    let pulled = stdout(&engine.podman(&[
        "image",
        "inspect",
        "--format",
        "{{.Digest}}",
        &reg.image("public/anon:v1"),
    ]));
    assert_eq!(pulled, served, "podman pulled another manifest than Stowage serves");
    // Outside `anonymous_pull`, the same anonymous pull is refused.
    push_with_podman(&reg, "demo/anon:v1");
    let refused =
        output_within(
            engine
                .command("podman")
                .args(["pull", "--tls-verify=false", &reg.image("demo/anon:v1")]),
        );
    assert!(
        !refused.status.success(),
        "an anonymous pull of a private repository succeeded"
    );
    // podman shows only the code when the message is the code's default text.
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("demo/anon") && err.contains("unauthorized"),
        "anonymous pull refused with: {err}"
    );
}

// ---------------------------------------------------------------------------------------------
// buildah
// ---------------------------------------------------------------------------------------------

#[test]
fn buildah_pushes_with_creds() {
    buildah_push(&Registry::start());
}

#[test]
fn buildah_pushes_with_creds_over_tls() {
    buildah_push(&Registry::start_tls());
}

/// `buildah push --creds` as alice lands the image; bob, who may only pull, is refused.
fn buildah_push(reg: &Registry) {
    let tls = reg.tls_flag();
    let engine = Engine::new();
    engine.build_image("bud:v1", "amd64");
    engine.buildah(&[
        "push",
        &tls,
        "--creds",
        &format!("alice:{ALICE_PW}"),
        "localhost/bud:v1",
        &format!("docker://{}", reg.image("demo/bud:v1")),
    ]);
    let manifest: serde_json::Value = serde_json::from_slice(&reg.raw_manifest("demo/bud:v1")).expect("json");
    assert_eq!(manifest["layers"].as_array().map(Vec::len), Some(1), "{manifest}");

    let refused = output_within(engine.command("buildah").args([
        "push",
        &tls,
        "--creds",
        "bob:bob-pw",
        "localhost/bud:v1",
        &format!("docker://{}", reg.image("demo/bud:bob")),
    ]));
    assert!(!refused.status.success(), "bob pushed without push rights");
    let err = String::from_utf8_lossy(&refused.stderr);
    // The blobs are already there (bob may pull them); the manifest is refused.
    assert!(
        err.contains("uploading manifest bob to") && err.contains("demo/bud: denied"),
        "bob's push refused with: {err}"
    );
}

// ---------------------------------------------------------------------------------------------
// containerd
// ---------------------------------------------------------------------------------------------

/// The test binary's containerd: started on first use, killed (and its dir removed) at exit.
struct Containerd {
    child: Mutex<Option<Child>>,
    dir: PathBuf,
    socket: PathBuf,
}

static CONTAINERD: OnceLock<Containerd> = OnceLock::new();

impl Containerd {
    fn get() -> &'static Containerd {
        CONTAINERD.get_or_init(Containerd::start)
    }

    fn start() -> Containerd {
        let bin = require_tool("containerd");
        let dir = tempfile::Builder::new()
            .prefix("stowage-ctd-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let socket = dir.join("c.sock");
        // Not needed here: the CRI plugin, and the `opt` plugin, which would create
        // /opt/containerd.
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.internal.v1.opt\"]\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{ttrpc}\"\n\
             [debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = socket.display(),
            ttrpc = dir.join("t.sock").display(),
        );
        std::fs::write(dir.join("config.toml"), config).expect("write config.toml");
        let log = std::fs::File::create(dir.join("containerd.log")).expect("create log");
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn containerd");
        // SAFETY: registers a plain `extern "C"` function with no arguments.
        unsafe { libc::atexit(stop_containerd) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("poll containerd") {
                let log = std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default();
                panic!("containerd exited ({status}) before it was ready:\n{log}");
            }
            if socket.exists()
                && Command::new(require_tool("ctr"))
                    .arg("--address")
                    .arg(&socket)
                    .arg("version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let log = std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default();
                panic!("containerd did not answer on {} within 30 s:\n{log}", socket.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Containerd {
            child: Mutex::new(Some(child)),
            dir,
            socket,
        }
    }

    /// A `ctr` command against this containerd in namespace `test`.
    fn ctr(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(require_tool("ctr"));
        cmd.arg("--address").arg(&self.socket).args(["-n", "test"]).args(args);
        cmd
    }

    fn stop(&self) {
        let child = self.child.lock().map(|mut c| c.take()).unwrap_or_default();
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
    }
}

extern "C" fn stop_containerd() {
    if let Some(containerd) = CONTAINERD.get() {
        containerd.stop();
    }
}

/// Pushes a podman-built image to `repo:tag` as alice; returns the digest Stowage serves.
fn push_with_podman(reg: &Registry, repo_tag: &str) -> String {
    let engine = Engine::new();
    engine.build_image("ctd:v1", "amd64");
    engine.podman(&[
        "push",
        &reg.tls_flag(),
        "--creds",
        &format!("alice:{ALICE_PW}"),
        "localhost/ctd:v1",
        &reg.image(repo_tag),
    ]);
    reg.digest(repo_tag)
}

/// The digest containerd recorded for `image` (from `ctr images ls`).
fn ctr_digest(ctd: &Containerd, image: &str) -> String {
    let out = run(&mut ctd.ctr(&["images", "ls"]));
    stdout(&out)
        .lines()
        .find(|l| l.split_whitespace().next() == Some(image))
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with("sha256:")))
        .unwrap_or_else(|| panic!("{image} not in `ctr images ls`:\n{}", stdout(&out)))
        .to_owned()
}

#[test]
fn containerd_pulls_and_pushes_with_a_password() {
    let reg = Registry::start();
    let ctd = Containerd::get();
    let served = push_with_podman(&reg, "demo/ctd:v1");
    let user = format!("alice:{ALICE_PW}");
    let source = reg.image("demo/ctd:v1");

    run(&mut ctd.ctr(&["images", "pull", "--plain-http", "--user", &user, &source]));
    assert_eq!(ctr_digest(ctd, &source), served, "containerd pulled another manifest");

    let target = reg.image("copies/ctd:v2");
    run(&mut ctd.ctr(&["images", "tag", "--force", &source, &target]));
    run(&mut ctd.ctr(&["images", "push", "--plain-http", "--user", &user, &target]));
    assert_eq!(
        reg.digest("copies/ctd:v2"),
        served,
        "containerd pushed another manifest"
    );

    // A wrong password is refused.
    let refused = output_within(&mut ctd.ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--user",
        "alice:wrong",
        &reg.image("demo/ctd:v1"),
    ]));
    assert!(!refused.status.success(), "containerd pulled with a wrong password");
    let err = String::from_utf8_lossy(&refused.stderr);
    // containerd 1.6 shows the status of the refused token request, not its body.
    assert!(
        err.contains("failed to fetch oauth token") && err.contains("401 Unauthorized"),
        "wrong password refused with: {err}"
    );
}

#[test]
fn containerd_pulls_anonymously_from_an_anonymous_pull_repository() {
    let reg = Registry::start();
    let ctd = Containerd::get();
    let served = push_with_podman(&reg, "public/ctd:v1");
    let source = reg.image("public/ctd:v1");
    run(&mut ctd.ctr(&["images", "pull", "--plain-http", &source]));
    assert_eq!(ctr_digest(ctd, &source), served, "containerd pulled another manifest");
}

#[test]
fn containerd_pulls_and_pushes_over_tls() {
    let reg = Registry::start_tls();
    let ctd = Containerd::get();
    let served = push_with_podman(&reg, "demo/ctd:v1");
    // ctr 1.6 speaks plain HTTP to 127.0.0.1 unless a hosts dir says otherwise.
    let ca = reg.cert_dir.as_ref().expect("TLS").join("ca.crt");
    let hosts = tempfile::tempdir().expect("temp dir");
    let host_dir = hosts.path().join(reg.host());
    std::fs::create_dir_all(&host_dir).expect("mkdir hosts dir");
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!(
            "server = \"https://{host}\"\n[host.\"https://{host}\"]\n  ca = \"{ca}\"\n",
            host = reg.host(),
            ca = ca.display()
        ),
    )
    .expect("write hosts.toml");
    let hosts = hosts.path().to_str().expect("utf-8 path");
    let user = format!("alice:{ALICE_PW}");
    let source = reg.image("demo/ctd:v1");

    run(&mut ctd.ctr(&["images", "pull", "--hosts-dir", hosts, "--user", &user, &source]));
    assert_eq!(ctr_digest(ctd, &source), served, "containerd pulled another manifest");

    let target = reg.image("copies/ctd:tls");
    run(&mut ctd.ctr(&["images", "tag", "--force", &source, &target]));
    run(&mut ctd.ctr(&["images", "push", "--hosts-dir", hosts, "--user", &user, &target]));
    assert_eq!(
        reg.digest("copies/ctd:tls"),
        served,
        "containerd pushed another manifest"
    );
}

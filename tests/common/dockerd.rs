//! One `dockerd` per test binary (Debian's `docker.io`), for the tests that need a real engine
//! (`tests/docker.rs`, `tests/deploy.rs`).
//!
//! [`engine`] starts it on first use: as root, on a unix socket in a temporary directory, with
//! its own `--data-root`, `--exec-root` and `--pidfile`, and no iptables rules or bridge (so
//! containers use `--network host`), so it touches nothing of the machine's own engine. The
//! docker CLI (`docker` on `PATH`, or `$DOCKER_TEST_CLI`) talks to it through `DOCKER_HOST`
//! ([`docker_cmd`], with a `DOCKER_CONFIG` directory the caller gives). When dockerd or the
//! CLI is missing or cannot start, the tests FAIL saying so; they never skip.
//!
//! The engine is stopped (SIGTERM, which also stops the containerd it started; SIGKILL after
//! 20 s) and its directories removed when the test binary exits: a static is never dropped, so
//! the guard runs from an `atexit` handler.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A `dockerd` started by this test binary.
struct Dockerd {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The containerd dockerd started stops with it; if it outlived a killed dockerd, end it.
        let pidfile = self.dir.path().join("exec/containerd/containerd.pid");
        if let Ok(pid) = std::fs::read_to_string(&pidfile) {
            let pid = pid.trim();
            if !pid.is_empty() && Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        // Layers under overlay2 may still be mounted; unmount anything below the temp dir.
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
            let root = self.dir.path().to_string_lossy().into_owned();
            let mut points: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split(' ').nth(1))
                .filter(|p| p.starts_with(&root))
                .collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in points {
                let _ = Command::new("umount").arg(p).status();
            }
        }
    }
}

static DOCKERD: OnceLock<Result<String, String>> = OnceLock::new();
static GUARD: Mutex<Option<Dockerd>> = Mutex::new(None);

extern "C" fn stop_dockerd() {
    if let Ok(mut guard) = GUARD.lock() {
        guard.take();
    }
}

/// The shared engine's `DOCKER_HOST`, starting it on first use. Panics with the reason when it
/// cannot start.
pub fn engine() -> &'static str {
    match DOCKERD.get_or_init(start_dockerd) {
        Ok(host) => host,
        Err(why) => panic!("{why}"),
    }
}

fn start_dockerd() -> Result<String, String> {
    let dockerd = find_tool("dockerd").ok_or(
        "`dockerd` is not installed: scripts/test installs Debian's docker.io; \
         these tests never skip a missing engine",
    )?;
    if !is_root() {
        return Err("dockerd must run as root for these tests (it does on the test machines)".into());
    }
    let dir = tempfile::Builder::new()
        .prefix("stowage-dockerd-")
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))?;
    let sock = dir.path().join("docker.sock");
    let host = format!("unix://{}", sock.display());
    // The CLI's configuration while the engine is set up (tests use their own).
    let cli_config = dir.path().join("cli-config");
    let log_path = dir.path().join("dockerd.log");
    let log = std::fs::File::create(&log_path).map_err(|e| format!("dockerd log: {e}"))?;
    let log2 = log.try_clone().map_err(|e| format!("dockerd log: {e}"))?;
    let mut cmd = Command::new(&dockerd);
    cmd.arg("--data-root")
        .arg(dir.path().join("data"))
        .arg("--exec-root")
        .arg(dir.path().join("exec"))
        .arg("--pidfile")
        .arg(dir.path().join("dockerd.pid"))
        .arg("-H")
        .arg(&host)
        .args(["--iptables=false", "--ip6tables=false", "--bridge=none"])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    if !overlay_available() {
        cmd.arg("--storage-driver=vfs");
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", dockerd.display()))?;
    let started = Dockerd { child, dir };
    // From here on the engine is stopped when the test binary exits.
    *GUARD.lock().map_err(|_| "dockerd guard poisoned")? = Some(started);
    // SAFETY: registers a plain `extern "C" fn()` with the C library; called once at exit.
    unsafe {
        libc::atexit(stop_dockerd);
    }

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ping = docker_cmd(&host, &cli_config)
            .args(["version", "--format", "{{.Server.Version}}"])
            .output();
        if let Ok(out) = &ping
            && out.status.success()
        {
            break;
        }
        let exited = GUARD
            .lock()
            .ok()
            .and_then(|mut g| g.as_mut().and_then(|d| d.child.try_wait().ok().flatten()));
        if exited.is_some() || Instant::now() > deadline {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(format!(
                "dockerd did not start ({}); the end of its log:\n{}",
                match exited {
                    Some(status) => format!("it exited: {status}"),
                    None => "no answer within 60 s".into(),
                },
                tail.join("\n")
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    Ok(host)
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn overlay_available() -> bool {
    std::fs::read_to_string("/proc/filesystems").is_ok_and(|f| f.lines().any(|l| l.ends_with("\toverlay")))
}

pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|c| c.is_file())
}

/// The docker CLI: `$DOCKER_TEST_CLI`, or `docker` on `PATH`.
pub fn docker_cli() -> String {
    std::env::var("DOCKER_TEST_CLI").unwrap_or_else(|_| "docker".into())
}

/// A docker CLI command for the engine at `host`, with its configuration (logins) in the
/// directory `config`, never the machine's `~/.docker`.
pub fn docker_cmd(host: &str, config: &Path) -> Command {
    let mut cmd = Command::new(docker_cli());
    cmd.env("DOCKER_HOST", host)
        .env("DOCKER_CLI_EXPERIMENTAL", "enabled")
        .env_remove("DOCKER_CONTEXT")
        .env_remove("DOCKER_TLS_VERIFY")
        .env("DOCKER_CONFIG", config)
        .stdin(Stdio::null());
    cmd
}

/// Makes the directory `root` into a tar and `docker import`s it as `tag` on the engine at
/// `host` (a base image made locally: nothing is pulled).
pub fn import_rootfs(host: &str, root: &Path, tag: &str) -> Result<(), String> {
    let tar = root.with_extension("tar");
    let out = Command::new("tar")
        .arg("-C")
        .arg(root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .output()
        .map_err(|e| format!("tar: {e}"))?;
    if !out.status.success() {
        return Err(format!("tar: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let config = tempfile::tempdir().map_err(|e| e.to_string())?;
    let out = docker_cmd(host, config.path())
        .arg("import")
        .arg(&tar)
        .arg(tag)
        .output()
        .map_err(|e| format!("docker import: {e}"))?;
    let _ = std::fs::remove_file(&tar);
    if !out.status.success() {
        return Err(format!("docker import {tag}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(())
}

/// Runs `cmd` to completion, capturing its output; panics when it takes longer than `timeout`
/// (killing it) or cannot be started.
#[allow(unused_imports)] // only the binaries that run docker use it
pub use super::tools::output_within_for as output_within;

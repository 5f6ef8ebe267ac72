//! External tools the tests drive: finding them, running them with a time limit, and a
//! private podman/buildah world.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// How long one external command may take before it is killed and fails the test.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Where containers/image keeps its blob-info cache when it runs as root.
pub const SYSTEM_BLOB_INFO_CACHE: &str = "/var/lib/containers/cache";

/// Finds `name` on `PATH`, or fails the test saying how to get it (never skipped).
pub fn require_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "required tool `{name}` is not installed (not found on PATH); `scripts/test` \
                 installs it (Debian packages podman, buildah, containerd, busybox-static, \
                 skopeo). These tests never skip a missing tool."
            )
        })
}

/// Runs `cmd` (stdin closed, output captured) and returns its output, whatever its status; a
/// command still running after [`COMMAND_TIMEOUT`] is killed and fails the test, instead of
/// hanging the whole test binary.
pub fn output_within(cmd: &mut Command) -> Output {
    output_within_for(cmd, COMMAND_TIMEOUT)
}

/// [`output_within`] with a time limit of its own.
pub fn output_within_for(cmd: &mut Command, timeout: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pid = child.id();
    let (done, finished) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let out = child.wait_with_output();
        let _ = done.send(());
        out
    });
    if finished.recv_timeout(timeout).is_err() {
        // SAFETY: kill(2) of the child started above, which the waiter has not reaped (it
        // reports right after reaping, and has not reported).
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        panic!("{cmd:?} did not finish within {timeout:?}");
    }
    waiter.join().expect("waiter thread").expect("wait for the command")
}

/// A private podman/buildah world: vfs storage, its own `containers.conf`, auth file, HOME and
/// runtime dir, and (optionally) `registries.conf`, all in a temp dir.
pub struct ContainersWorld {
    dir: tempfile::TempDir,
    registries: bool,
}

impl ContainersWorld {
    /// With `registries`, that is the whole `registries.conf` of this world; without, the
    /// system's is used.
    pub fn new(registries: Option<&str>) -> ContainersWorld {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        for sub in ["graph", "run", "home", "xdg", "libpod", "blob-info-cache"] {
            std::fs::create_dir_all(root.join(sub)).expect("mkdir");
        }
        std::fs::write(
            root.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                root.join("graph").display(),
                root.join("run").display()
            ),
        )
        .expect("write storage.conf");
        // podman as root keeps its locks and event log under /run/libpod by default.
        std::fs::write(
            root.join("containers.conf"),
            format!(
                "[engine]\ntmp_dir = \"{}\"\nevents_logger = \"none\"\n",
                root.join("libpod").display()
            ),
        )
        .expect("write containers.conf");
        if let Some(text) = registries {
            std::fs::write(root.join("registries.conf"), text).expect("write registries.conf");
        }
        // podman refuses an auth file that does not exist.
        std::fs::write(root.join("auth.json"), "{}").expect("write auth.json");
        ContainersWorld {
            dir,
            registries: registries.is_some(),
        }
    }

    /// A file or directory of this world.
    pub fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub)
    }

    /// `tool` (podman or buildah) in this world. Run as root, containers/image keeps a
    /// blob-info cache in [`SYSTEM_BLOB_INFO_CACHE`] that no flag or variable moves, so the
    /// command runs in a mount namespace of its own where this world's empty dir is mounted
    /// there.
    pub fn command(&self, tool: &str) -> Command {
        use std::os::unix::ffi::OsStrExt as _;
        use std::os::unix::process::CommandExt as _;
        let mut cmd = Command::new(require_tool(tool));
        cmd.env("CONTAINERS_STORAGE_CONF", self.path("storage.conf"))
            .env("CONTAINERS_CONF", self.path("containers.conf"))
            .env("REGISTRY_AUTH_FILE", self.path("auth.json"))
            .env("HOME", self.path("home"))
            .env("XDG_RUNTIME_DIR", self.path("xdg"));
        if self.registries {
            cmd.env("CONTAINERS_REGISTRIES_CONF", self.path("registries.conf"));
        } else {
            cmd.env_remove("CONTAINERS_REGISTRIES_CONF");
        }
        // The mount point must exist (containers/image would create it on first use anyway).
        std::fs::create_dir_all(SYSTEM_BLOB_INFO_CACHE).expect("create the mount point");
        let cstr = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).expect("path without NUL");
        let root = cstr(Path::new("/"));
        let source = cstr(&self.path("blob-info-cache"));
        let target = cstr(Path::new(SYSTEM_BLOB_INFO_CACHE));
        // SAFETY: only async-signal-safe system calls on memory owned by the closure, in the
        // child between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let none = std::ptr::null();
                if libc::unshare(libc::CLONE_NEWNS) != 0
                    || libc::mount(
                        none,
                        root.as_ptr(),
                        none,
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) != 0
                    || libc::mount(source.as_ptr(), target.as_ptr(), none, libc::MS_BIND, std::ptr::null()) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }
}

//! Servers started under a chosen file-descriptor limit, and what the kernel says about a
//! running server (threads, memory, limits), for the load tests.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::{Backend, TestServer, backend, host_of};

impl TestServer {
    /// Starts a server like `start_with`, under a soft and hard `RLIMIT_NOFILE` of `nofile`
    /// (set in the child before it runs the binary). A `crash_and_restart` drops the limit.
    pub fn start_with_nofile(envs: &[(&str, &str)], nofile: (u64, u64)) -> Self {
        let backend = backend();
        let tmp = tempfile::tempdir().expect("create temp dir");
        let data_dir = tmp.path().join("data");
        let bucket = (backend == Backend::S3).then(super::backend::new_bucket);
        let mut all = bucket.as_deref().map(super::backend::s3_envs).unwrap_or_default();
        all.extend(envs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stowage"));
        cmd.arg("serve")
            .env("STOWAGE_LISTEN", "127.0.0.1:0")
            .env("STOWAGE_DATA_DIR", &data_dir)
            .env("STOWAGE_AUTH__ENABLED", "false")
            .env(
                "RUST_LOG",
                std::env::var("TEST_STOWAGE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in &all {
            cmd.env(k, v);
        }
        let (soft, hard) = nofile;
        // SAFETY: setrlimit is async-signal-safe and only reads the struct on this stack.
        unsafe {
            cmd.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: soft as libc::rlim_t,
                    rlim_max: hard as libc::rlim_t,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn stowage");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent && let Some(rest) = line.split("listening on ").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or_default().to_string());
                    sent = true;
                }
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!("stowage did not report its listening address within 60 s");
            }
        };
        let host = host_of(&url);
        TestServer {
            child,
            url,
            host,
            data_dir,
            _tmp: Some(tmp),
            envs: all,
            backend,
            bucket,
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A field of `/proc/<pid>/status` (e.g. `Threads`, `VmRSS` in KiB), as a number.
    pub fn proc_status(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("read /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{}/status", self.pid()))
    }

    /// The soft and hard `RLIMIT_NOFILE` of the running server (`/proc/<pid>/limits`).
    pub fn nofile_limits(&self) -> (u64, u64) {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.pid())).expect("read /proc limits");
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .expect("Max open files line");
        let nums: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        (nums[0], nums[1])
    }
}

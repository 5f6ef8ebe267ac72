//! Servers started under a chosen file-descriptor limit, and what the kernel says about a
//! running server (threads, memory, limits), for the load tests.

use super::TestServer;

impl TestServer {
    /// Starts a server like `start_with`, under a soft and hard `RLIMIT_NOFILE` of `nofile`
    /// (set in the child before it runs the binary), on this start and every restart.
    pub fn start_with_nofile(envs: &[(&str, &str)], nofile: (u64, u64)) -> Self {
        let limit = format!("{}:{}", nofile.0, nofile.1);
        let mut all = envs.to_vec();
        all.push((super::RLIMIT_NOFILE_ENV, &limit));
        Self::start_with(&all)
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

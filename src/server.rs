//! Start-up and shutdown of `stowage serve`, and the data directory's lock.
//!
//! `stowage serve` holds an exclusive advisory lock ([`DataDirLock`], `flock` on
//! `<data_dir>/stowage.lock`) for its whole life: a second server on the same data directory
//! refuses to start, and so do `stowage fsck --repair`, which must not move blob objects
//! while a server publishes them (the server's per-digest locks are in-process), a real
//! `stowage gc` pass (for the same reason) and `stowage migrate` (see `runmodes`). The kernel
//! releases the lock when the process exits in any way, `kill -9` included, so a crash never
//! leaves a stale lock behind. Commands that only read, or that write through the catalog's
//! own locking (`user`, `token`, verify-only `fsck`), do not take it.
//!
//! File descriptors: start-up raises the soft `RLIMIT_NOFILE` to the hard limit (systemd's
//! default soft limit of 1,024 is far too few for a registry) and divides what it allows in a
//! [`DescriptorBudget`]: a fixed reserve for the process itself (catalog, listeners, logs), then
//! two thirds for client connections (each may hold a second descriptor: the blob file or store
//! connection it streams from) and one third for open upload sessions (two each on local
//! disk). Connections beyond `server.max_connections` wait in the listen backlog, so
//! `accept()` never fails for want of descriptors.

use std::path::Path;
use std::time::Duration;

use actix_web::{App, HttpServer, middleware, web};

use crate::config::{Backend, Config, TlsConfig};
use crate::registry::{Registry, SessionLimits, Settings};
use crate::storage::BlobStore;

/// How much response body actix gathers before writing to the socket. Its default (32 KiB) is
/// below the 512 KiB pieces blobs are read in, and below its own 128 KiB retention limit only for
/// small bodies: every blob piece then regrew a fresh write buffer. At 1 MiB the buffer is kept
/// and filled with whole pieces, which halved server CPU per GiB downloaded (1.1 s to 0.53 s).
/// Only connections that stream large bodies grow their buffer this far.
const H1_WRITE_BUFFER: usize = 1024 * 1024;

/// Descriptors kept for everything but clients and upload sessions: the catalog's connections
/// (three each: database, WAL, shared memory), listeners, the epoll and signal descriptors,
/// log files, TLS key files and S3 connections of background work.
const RESERVED_DESCRIPTORS: u64 = 128;

/// Soft descriptor limit tried when the hard limit is unlimited (Linux's default `nr_open`).
const UNLIMITED_NOFILE: u64 = 1 << 20;

/// How the file descriptors the process may open are shared out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorBudget {
    /// The soft `RLIMIT_NOFILE` the budget is drawn from.
    pub limit: u64,
    /// Client connections open at once (each counted with a second descriptor for what it
    /// streams): the default of `server.max_connections`.
    pub connections: usize,
    /// Upload sessions open at once (two descriptors each on local disk).
    pub upload_sessions: usize,
}

impl DescriptorBudget {
    /// The budget under a soft limit of `limit` descriptors.
    pub fn for_limit(limit: u64) -> Self {
        let reserved = RESERVED_DESCRIPTORS.min(limit / 4);
        let available = limit.saturating_sub(reserved);
        let third = usize::try_from(available / 3).unwrap_or(usize::MAX);
        DescriptorBudget {
            limit,
            connections: third.max(1),
            upload_sessions: (third / 2).max(1),
        }
    }

    /// The budget under the process's current soft limit.
    pub fn current() -> Self {
        Self::for_limit(nofile_limits().map(|(soft, _)| soft).unwrap_or(1024))
    }
}

/// The soft and hard `RLIMIT_NOFILE`.
#[allow(clippy::unnecessary_cast)] // rlim_t is u64 on 64-bit Linux, narrower elsewhere
fn nofile_limits() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given, which lives on this stack frame.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((lim.rlim_cur as u64, lim.rlim_max as u64))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (logging both) and returns the budget
/// under the limit now in force.
#[allow(clippy::unnecessary_cast)] // rlim_t is u64 on 64-bit Linux, narrower elsewhere
pub fn raise_descriptor_limit() -> DescriptorBudget {
    let (soft, hard) = match nofile_limits() {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the file-descriptor limit");
            return DescriptorBudget::current();
        }
    };
    let target = if hard == libc::RLIM_INFINITY as u64 {
        UNLIMITED_NOFILE
    } else {
        hard
    };
    if soft < target {
        let lim = libc::rlimit {
            rlim_cur: target as libc::rlim_t,
            rlim_max: hard as libc::rlim_t,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            let e = std::io::Error::last_os_error();
            tracing::warn!(soft, hard, error = %e, "cannot raise the file-descriptor limit");
        }
    }
    let budget = DescriptorBudget::current();
    tracing::info!(
        soft_before = soft,
        soft = budget.limit,
        hard,
        connections = budget.connections,
        upload_sessions = budget.upload_sessions,
        "file-descriptor limit"
    );
    budget
}

/// How often idle upload sessions are looked for.
const EXPIRY_SWEEP: Duration = Duration::from_secs(60);

/// The lock file in the data directory.
pub const LOCK_FILE: &str = "stowage.lock";

/// An exclusive advisory lock on a data directory (see the module doc); released when dropped
/// or when the process ends.
#[derive(Debug)]
pub struct DataDirLock {
    _file: std::fs::File,
}

impl DataDirLock {
    /// Whether another process (a running server) holds the lock of `data_dir` now. Blocking
    /// file I/O, for the CLI.
    pub fn held_elsewhere(data_dir: &Path) -> bool {
        use std::os::fd::AsRawFd as _;
        let Ok(file) = std::fs::File::open(data_dir.join(LOCK_FILE)) else {
            return false;
        };
        // SAFETY: flock only acts on the descriptor, which `file` owns; a shared lock taken
        // here is released when `file` is closed at the end of this function.
        let free = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0;
        !free
    }

    /// Takes the lock of `data_dir` (created if missing) without waiting, for `purpose` (what
    /// the holder is, written into the lock file with its pid for the next one's error
    /// message). Fails with a message that names the holder when another process has it.
    /// Blocking file I/O: call it off the async executor.
    pub fn acquire(data_dir: &Path, purpose: &str) -> Result<DataDirLock, String> {
        use std::io::{Read as _, Seek as _, Write as _};
        use std::os::fd::AsRawFd as _;
        use std::os::unix::fs::DirBuilderExt as _;
        // Owner-only, like everything Stowage creates there (the catalog holds password hashes).
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(|e| format!("creating the data directory {}: {e}", data_dir.display()))?;
        let path = data_dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| format!("opening the lock file {}: {e}", path.display()))?;
        // SAFETY: flock only acts on the descriptor, which `file` owns for as long as the lock.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(format!("locking {}: {err}", path.display()));
            }
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.split_whitespace().collect::<Vec<_>>().as_slice() {
                [pid, what] => format!(" (`stowage {what}`, pid {pid})"),
                _ => String::new(),
            };
            return Err(format!(
                "the data directory {} is in use by another stowage process{holder}: only one server \
                 may run on a data directory, and `fsck --repair` needs the server stopped (lock file {})",
                data_dir.display(),
                path.display()
            ));
        }
        let recorded = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{} {purpose}", std::process::id()));
        if let Err(e) = recorded {
            tracing::warn!(path = %path.display(), error = %e, "writing the lock file's holder failed");
        }
        Ok(DataDirLock { _file: file })
    }
}

/// Opens the blob store described by `config`.
pub async fn open_store(config: &Config) -> Result<BlobStore, Box<dyn std::error::Error>> {
    let part_size = config.storage.part_size;
    let store = match config.storage.backend {
        Backend::Fs => {
            let path = config.storage_path();
            crate::metrics::spawn_blocking(move || BlobStore::local(path, part_size)).await??
        }
        Backend::S3 => crate::storage::s3::open(&config.storage.s3, part_size)?,
    };
    Ok(store.with_upload_memory(
        config.storage.upload_memory(),
        Duration::from_secs(config.storage.upload_memory_wait_secs),
    ))
}

/// The registry's settings as `config` describes them.
pub fn settings(config: &Config) -> Settings {
    Settings {
        delete_enabled: config.registry.delete_enabled,
        max_manifest_size: config.registry.max_manifest_size,
        upload_timeout: Duration::from_secs(config.registry.upload_timeout_secs),
        catalog_page_size: config.registry.catalog_page_size,
        upload_sessions: session_limits(config, DescriptorBudget::current()),
        immutable_tags: crate::auth::ImmutableTags::new(config.immutable_tags.clone()),
        retention: config.gc.retention.clone(),
        keep_list_max: Duration::from_secs(config.gc.keep_list_max_secs),
        proxy_caps: config
            .proxy
            .iter()
            .filter_map(|p| Some((p.prefix.clone(), p.max_size?.bytes())))
            .collect(),
    }
}

/// Opens the catalog and the blob store described by `config`.
pub async fn open(config: &Config) -> Result<Registry, Box<dyn std::error::Error>> {
    let catalog_config = config.clone();
    let catalog = crate::metrics::spawn_blocking(move || crate::catalog::open_configured(&catalog_config, true))
        .await?
        .map_err(|e| e as Box<dyn std::error::Error>)?;
    let store = open_store(config).await?;
    let settings = settings(config);
    tracing::info!(
        total = settings.upload_sessions.total,
        per_user = settings.upload_sessions.per_identity,
        "upload session limits"
    );
    let proxies = crate::proxy::Proxies::from_config(&config.proxy)?;
    let spool_dir = config.data_dir.join(crate::registry::SPOOL_DIR);
    if !proxies.is_empty() {
        // Spool files of fetches a previous process did not finish.
        let swept = crate::registry::sweep_spool_dir(&spool_dir).await?;
        if swept > 0 {
            tracing::info!(files = swept, "removed proxy spool files left by a previous run");
        }
    }
    let registry = Registry::new(catalog, store, settings)
        .with_proxies(proxies, &spool_dir)
        .with_spack_merge(&config.spack.merge)?;
    registry.set_read_only(config.registry.read_only);
    // Upload sessions recorded in the catalog resume, unless they expired or lost their data;
    // anything else staged is left over from uploads that cannot.
    registry.clean_up_uploads_at_start().await?;
    Ok(registry)
}

/// The upload-session limits: as configured, but within the descriptor budget's share for
/// sessions (two descriptors each on local disk). The per-user limit keeps its ratio to the
/// total, so one user can never hold every session.
fn session_limits(config: &Config, budget: DescriptorBudget) -> SessionLimits {
    let configured = config.registry.max_upload_sessions.max(1);
    let total = configured.min(budget.upload_sessions);
    let per_user = config.registry.max_upload_sessions_per_user.max(1);
    let per_identity = if total < configured {
        (per_user.saturating_mul(total) / configured).max(1)
    } else {
        per_user
    };
    SessionLimits {
        total,
        per_identity: per_identity.min(total),
    }
}

/// The rustls server configuration for `[tls]`, or `None` for plain HTTP.
/// Reads the certificate and key (blocking file reads: run it off the executor).
fn tls_config(tls: &TlsConfig) -> Result<Option<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (cert, key) = match (&tls.cert, &tls.key) {
        (None, None) => return Ok(None),
        (Some(c), Some(k)) => (c, k),
        _ => return Err("tls.cert and tls.key must be set together".to_owned()),
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("reading tls.cert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("tls.cert {} holds no certificate", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("reading tls.key {}: {e}", key.display()))?;
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("tls.cert and tls.key: {e}"))?;
    Ok(Some(config))
}

/// Who may read `/metrics`: reads `metrics.token_file` (off the executor) when set. An empty
/// or unreadable file is a start-up error, never an open endpoint.
async fn metrics_access(cfg: &crate::config::MetricsConfig) -> Result<crate::http::MetricsAccess, String> {
    let secret = match cfg.token_file.clone() {
        None => None,
        Some(path) => {
            let read = crate::metrics::spawn_blocking(move || {
                std::fs::read_to_string(&path)
                    .map_err(|e| format!("reading metrics.token_file {}: {e}", path.display()))
            })
            .await
            .map_err(|e| e.to_string())??;
            let secret = read.trim().to_owned();
            if secret.len() < 16 {
                return Err("metrics.token_file must hold a secret of at least 16 characters".to_owned());
            }
            Some(secret)
        }
    };
    Ok(crate::http::MetricsAccess::new(
        secret.as_deref(),
        cfg.max_repository_series,
    ))
}

/// Seconds in-flight requests get to finish once the server stops accepting.
const SHUTDOWN_TIMEOUT_SECS: u64 = 30;

/// Signals: `SIGUSR1` enters read-only mode and `SIGUSR2` leaves it; `SIGTERM` or `SIGINT`
/// starts draining (`/readyz` answers 503), keeps serving for `delay`, then stops the server
/// gracefully (in-flight requests get [`SHUTDOWN_TIMEOUT_SECS`]).
async fn handle_signals(registry: Registry, server: actix_web::dev::ServerHandle, delay: Duration) {
    use tokio::signal::unix::{SignalKind, signal};
    let streams = (|| {
        Ok::<_, std::io::Error>((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
            signal(SignalKind::user_defined1())?,
            signal(SignalKind::user_defined2())?,
        ))
    })();
    let (mut term, mut int, mut usr1, mut usr2) = match streams {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for signals; stopping");
            server.stop(true).await;
            return;
        }
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = usr1.recv() => { registry.set_read_only(true); }
            _ = usr2.recv() => { registry.set_read_only(false); }
        }
    }
    registry.start_draining();
    tracing::info!(
        delay_secs = delay.as_secs(),
        "stopping: /readyz answers 503 from now on; new requests are served until the delay is over"
    );
    tokio::time::sleep(delay).await;
    tracing::info!("no longer accepting connections; finishing the requests in flight");
    server.stop(true).await;
}

/// Serves until SIGINT/SIGTERM, then finishes in-flight requests and closes the catalog.
pub async fn serve(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    #[cfg(feature = "fault-injection")]
    tracing::warn!(
        "built with the test-only `fault-injection` feature: anyone can make storage fail through \
         the unauthenticated /_stowage/faults route; never serve real users with this build"
    );
    // Held until this function returns: after the catalog is closed.
    let data_dir = config.data_dir.clone();
    let _lock = crate::metrics::spawn_blocking(move || DataDirLock::acquire(&data_dir, "serve")).await??;
    let budget = raise_descriptor_limit();
    let registry = open(&config).await?;
    tracing::info!(
        data_dir = %config.data_dir.display(),
        storage = %match config.storage.backend {
            Backend::Fs => config.storage_path().display().to_string(),
            Backend::S3 => format!("s3://{}/{}", config.storage.s3.bucket, config.storage.s3.prefix),
        },
        delete_enabled = config.registry.delete_enabled,
        "registry opened"
    );
    // The first start's admin and CI token, before anything else runs (see `auth::bootstrap`).
    crate::auth::bootstrap::run(&config.auth, registry.catalog())
        .await
        .map_err(|e| format!("bootstrap: {e}"))?;

    let sweeper = {
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EXPIRY_SWEEP);
            loop {
                tick.tick().await;
                registry.expire_uploads().await;
            }
        })
    };

    let pull_flusher = {
        let registry = registry.clone();
        tokio::spawn(async move {
            let every = crate::registry::retention::FLUSH_EVERY;
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tick.tick().await;
                // Read-only mode: the times wait in memory until the catalog may be written.
                if !registry.is_read_only() {
                    registry.flush_pulls().await;
                }
            }
        })
    };

    // Pulls of proxied content: every few seconds, or at once when their map fills.
    let proxy_pull_flusher = {
        let registry = registry.clone();
        tokio::spawn(async move {
            let every = crate::registry::proxy_lru::FLUSH_EVERY;
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = registry.proxy_pulls_filled() => {}
                }
                if !registry.is_read_only() {
                    registry.flush_proxy_pulls().await;
                }
            }
        })
    };

    // Old audit rows go at start-up and hourly after (`catalog::audit`).
    let audit_pruner = {
        let registry = registry.clone();
        let days = config.audit.retention_days;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(crate::catalog::audit::PRUNE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if days == 0 || registry.is_read_only() {
                    continue;
                }
                match registry.catalog().prune_audit_older_than(days).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(rows = n, retention_days = days, "audit: old rows deleted"),
                    Err(e) => tracing::warn!(error = %e, "audit: deleting old rows failed; retrying next time"),
                }
            }
        })
    };

    if !config.gc.enabled && !config.gc.retention.is_empty() {
        tracing::warn!(
            "gc.retention rules are configured but gc.enabled is false: they apply only when `stowage gc` runs, and a real pass refuses to run while the server is up (stop it first)"
        );
    }
    let collector = config.gc.enabled.then(|| {
        let registry = registry.clone();
        let every = Duration::from_secs(config.gc.interval_secs.max(1));
        let opts = crate::registry::GcOptions {
            grace: Duration::from_secs(config.gc.grace_secs),
            untagged_manifests: config.gc.untagged_manifests,
            orphan_interval: Duration::from_secs(config.gc.orphan_interval_secs),
            dry_run: false,
            write_pause: crate::registry::WRITE_PAUSE,
        };
        tracing::info!(
            interval_secs = every.as_secs(),
            grace_secs = opts.grace.as_secs(),
            untagged_manifests = opts.untagged_manifests,
            orphan_interval_secs = opts.orphan_interval.as_secs(),
            retention_rules = config.gc.retention.len(),
            "garbage collection on"
        );
        registry.schedule_gc(every, opts.grace);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if registry.is_read_only() {
                    tracing::info!("read-only mode: garbage collection skipped");
                    continue;
                }
                // With PostgreSQL, one replica collects at a time (`registry::gc`, "Replicas").
                let _leader = match registry.lead_gc().await {
                    Ok(Some(leader)) => leader,
                    Ok(None) => {
                        tracing::debug!("garbage collection: another replica is collecting; skipped");
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "garbage collection: cannot take leadership; retrying next time");
                        continue;
                    }
                };
                let started = std::time::Instant::now();
                match registry.collect_garbage(opts).await {
                    Ok(r) if r.is_empty() => tracing::debug!("garbage collection: nothing to remove"),
                    Ok(r) => tracing::info!(
                        manifests = r.manifests,
                        links = r.links,
                        blobs = r.blobs,
                        bytes = r.bytes,
                        orphans = r.orphans,
                        duration_ms = started.elapsed().as_millis() as u64,
                        "garbage collected"
                    ),
                    Err(e) => tracing::warn!(error = %e, "garbage collection failed; retrying next time"),
                }
            }
        })
    });
    // Superseded Spack index blobs leave soon after their grace, not at the next full pass.
    let index_collector = config.gc.enabled.then(|| {
        let registry = registry.clone();
        let grace = Duration::from_secs(config.gc.spack_index_grace_secs);
        let every = (grace / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if registry.is_read_only() {
                    continue;
                }
                match registry.collect_superseded_indexes(grace).await {
                    Ok(r) if r.is_empty() => {}
                    Ok(r) => tracing::info!(
                        links = r.links,
                        blobs = r.blobs,
                        bytes = r.bytes,
                        "superseded spack index blobs removed"
                    ),
                    Err(e) => tracing::warn!(error = %e, "removing superseded spack index blobs failed"),
                }
            }
        })
    });

    let auth = crate::auth::Auth::open(
        &config.auth,
        &config.data_dir,
        registry.catalog().clone(),
        Duration::from_secs(config.registry.upload_timeout_secs),
    )
    .await
    .map_err(|e| format!("setting up authentication: {e}"))?;
    if auth.enabled() {
        tracing::info!(
            service = auth.service(),
            kid = auth.signing_kid(),
            "authentication on; push and delete need credentials; {}",
            auth.policy().describe_anonymous()
        );
    } else {
        tracing::warn!("authentication is OFF (auth.enabled = false): anyone may pull, push and delete");
    }

    let limits = &config.server;
    crate::http::set_body_timeouts(crate::http::BodyTimeouts {
        idle: Duration::from_secs(limits.body_idle_timeout_secs),
        small_total: Duration::from_secs(limits.small_body_timeout_secs),
    });
    let max_connections = match limits.max_connections {
        0 => budget.connections,
        n => n,
    };
    // actix counts connections per worker thread: give each an equal share of the total.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_worker = max_connections.div_ceil(workers).max(1);
    tracing::info!(
        max_connections,
        workers,
        request_head_timeout_secs = limits.request_head_timeout_secs,
        keep_alive_secs = limits.keep_alive_secs,
        body_idle_timeout_secs = limits.body_idle_timeout_secs,
        small_body_timeout_secs = limits.small_body_timeout_secs,
        "connection limits"
    );

    let metrics_on = config.metrics.enabled;
    crate::metrics::get().set_enabled(metrics_on);
    let metrics_access = web::Data::new(metrics_access(&config.metrics).await?);
    let metrics_here = metrics_on && config.metrics.listen.is_none();
    let data = web::Data::new(registry.clone());
    let auth = web::Data::new(auth);
    let ui = match config.ui.enabled {
        true => Some(web::Data::new(
            crate::ui::Ui::new(&config.ui).ok_or("setting up the web UI: the random source failed")?,
        )),
        false => None,
    };
    let (app_data, app_metrics) = (data.clone(), metrics_access.clone());
    let server = HttpServer::new(move || {
        let app = App::new()
            .app_data(app_data.clone())
            .app_data(auth.clone())
            .app_data(app_metrics.clone())
            // Innermost: the access log shows the path as the client sent it.
            .wrap(middleware::from_fn(crate::http::mirror_namespace))
            .wrap(middleware::from_fn(crate::http::access))
            .wrap(crate::http::default_headers());
        match &ui {
            Some(ui) => app.app_data(ui.clone()).configure(crate::ui::routes),
            None => app,
        }
        .configure(|cfg| {
            if metrics_here {
                crate::http::metrics_route(cfg);
            }
            crate::http::routes(cfg);
        })
    })
    .shutdown_timeout(SHUTDOWN_TIMEOUT_SECS)
    .h1_write_buffer_size(H1_WRITE_BUFFER)
    // Nagle's algorithm held back the small write that ends a response (a manifest, a config
    // blob) until the client acknowledged the previous one, which clients delay by up to 40 ms:
    // on a kept-alive connection, a small GET after a large one took 41-50 ms instead of
    // under 1 ms. Responses are written whole or in large pieces, so nothing is gained by
    // coalescing (Go's net/http, and so Distribution, turn it off too).
    .tcp_nodelay(true)
    .workers(workers)
    .max_connections(per_worker)
    .client_request_timeout(Duration::from_secs(limits.request_head_timeout_secs))
    .keep_alive(Duration::from_secs(limits.keep_alive_secs));
    let tls_settings = config.tls.clone();
    let tls = crate::metrics::spawn_blocking(move || tls_config(&tls_settings)).await??;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let server = match tls {
        Some(tls) => server.bind_rustls_0_23(config.listen, tls)?,
        None => server.bind(config.listen)?,
    };
    for addr in server.addrs() {
        println!("stowage listening on {scheme}://{addr}");
        tracing::info!(%addr, scheme, "listening");
    }
    let server = server.disable_signals().run();
    // The metrics listener: plain HTTP, two workers, stopped with the main server.
    let metrics_server = match config.metrics.listen.filter(|_| metrics_on) {
        Some(addr) => {
            let (data, access) = (data.clone(), metrics_access.clone());
            let s = HttpServer::new(move || {
                App::new()
                    .app_data(data.clone())
                    .app_data(access.clone())
                    .configure(crate::http::metrics_listener_routes)
            })
            .workers(1)
            .max_connections(64)
            .disable_signals()
            .shutdown_timeout(1)
            .bind(addr)?;
            for addr in s.addrs() {
                println!("stowage metrics listening on http://{addr}");
                tracing::info!(%addr, "metrics listening");
            }
            Some(s.run())
        }
        None => None,
    };
    let metrics_handle = metrics_server.as_ref().map(|s| s.handle());
    let metrics_task = metrics_server.map(tokio::spawn);
    let signals = tokio::spawn(handle_signals(
        registry.clone(),
        server.handle(),
        Duration::from_secs(limits.shutdown_delay_secs),
    ));
    server.await?;
    signals.abort();
    if let Some(handle) = metrics_handle {
        handle.stop(true).await;
    }
    if let Some(task) = metrics_task {
        let _ = task.await;
    }

    sweeper.abort();
    for task in [collector, index_collector].into_iter().flatten() {
        task.abort();
    }
    pull_flusher.abort();
    proxy_pull_flusher.abort();
    audit_pruner.abort();
    registry.flush_pulls().await;
    registry.flush_proxy_pulls().await;
    // Sessions left open keep the bytes past their last part (S3) for after the restart.
    let spilled = registry.spill_idle_uploads(Duration::ZERO).await;
    if spilled > 0 {
        tracing::info!(sessions = spilled, "kept the buffered bytes of open upload sessions");
    }
    let catalog = registry.catalog().clone();
    crate::metrics::spawn_blocking(move || catalog.close()).await?;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_released_on_drop() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let held = DataDirLock::acquire(&data, "serve").expect("first lock");
        let err = DataDirLock::acquire(&data, "fsck").expect_err("second lock");
        assert!(
            err.contains(&format!("(`stowage serve`, pid {})", std::process::id())),
            "names the holder: {err}"
        );
        drop(held);
        DataDirLock::acquire(&data, "fsck").expect("free again once dropped");
    }

    #[test]
    fn budget_keeps_a_reserve_and_splits_the_rest() {
        let b = DescriptorBudget::for_limit(1024);
        assert_eq!((b.connections, b.upload_sessions), (298, 149));
        // Two descriptors per connection and per session, plus the reserve, fit the limit.
        let used = RESERVED_DESCRIPTORS as usize + 2 * b.connections + 2 * b.upload_sessions;
        assert!(used <= 1024, "{used}");
        let small = DescriptorBudget::for_limit(64);
        assert!(small.connections >= 1 && small.upload_sessions >= 1);
        assert_eq!(DescriptorBudget::for_limit(1 << 20).connections, 349_482);
    }
}

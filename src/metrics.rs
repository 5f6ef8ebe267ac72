//! Prometheus metrics: one process-wide set of series, served at `/metrics` (see
//! `http::ops::metrics`) in the OpenMetrics text format by `prometheus-client`.
//!
//! Names follow Distribution's where they mean the same thing, so dashboards built for it work:
//!
//! | series | labels | what |
//! |---|---|---|
//! | `registry_http_requests_total` | method, code, handler | requests answered |
//! | `registry_http_request_duration_seconds` | method, handler | time to the response head |
//! | `registry_http_in_flight_requests` | handler | requests being handled |
//! | `registry_storage_action_seconds` | driver, action | blob store operations |
//!
//! and the `stowage_*` series listed in the README ("Metrics"). `handler` is one of a fixed set
//! of names ([`handler_of`]), `method` one of the HTTP methods the API uses or `other`, `code`
//! the status: label cardinality is bounded by construction. Nothing is labelled by digest, tag,
//! user or client. Per-repository series exist only for Spack build caches, and only for the
//! first `metrics.max_repository_series` of them by name; the rest are summed under
//! `repository="_other"`.
//!
//! Counters and histograms are updated where the event happens (lock-free atomics, or one short
//! mutex per histogram). Gauges that describe stored state (blob and manifest counts, stored
//! bytes, Spack specs and generation lag) are read from the catalog when scraped, at most once
//! per [`STATE_MAX_AGE`] however often scrapes come, on a catalog reader thread.
//!
//! The set is process-global ([`get`]): metrics are recorded deep in the storage, catalog and
//! auth layers, and threading a handle through each would couple every layer to this one for no
//! gain; one process is one registry.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// How long the catalog-derived gauges may be old when scraped.
pub const STATE_MAX_AGE: Duration = Duration::from_secs(5);

/// Buckets of request and storage latencies, in seconds: 0.5 ms to about 65 s.
fn latency_buckets() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 18,
    ))
}

/// Buckets of long operations (GC passes, index builds), in seconds: 10 ms to about 1.5 h.
fn long_buckets() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.01, 3.0, 13,
    ))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: &'static str,
    pub code: u16,
    pub handler: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    pub method: &'static str,
    pub handler: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandlerLabels {
    pub handler: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StorageLabels {
    pub driver: &'static str,
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// A request to a `[[proxy]]` upstream: its prefix (a configured, bounded set) and outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
    pub outcome: &'static str,
}

/// A `[[proxy]]` upstream, by its prefix.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamOnlyLabels {
    pub upstream: String,
}

/// A `[[proxy]]` prefix with a `max_size` (a configured, bounded set).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PrefixLabels {
    pub prefix: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RepoLabels {
    pub repository: String,
}

/// Every series the process exports.
pub struct Metrics {
    registry: Registry,
    /// Whether request metrics are recorded (`metrics.enabled`).
    enabled: AtomicBool,
    pub http_requests: Family<RequestLabels, Counter>,
    pub http_duration: Family<DurationLabels, Histogram, fn() -> Histogram>,
    pub http_in_flight: Family<HandlerLabels, Gauge>,
    pub storage_action: Family<StorageLabels, Histogram, fn() -> Histogram>,
    pub bytes_uploaded: Counter,
    pub bytes_downloaded: Counter,
    pub upload_sessions: Gauge,
    pub upload_memory_limit: Gauge,
    pub upload_memory_reserved: Gauge,
    pub upload_memory_peak: Gauge,
    pub upload_memory_pooled: Gauge,
    pub upload_memory_waits: Counter,
    pub upload_memory_timeouts: Counter,
    pub repositories: Gauge,
    pub blobs: Gauge,
    pub manifests: Gauge,
    pub stored_bytes: Gauge,
    pub catalog_queue: Gauge,
    pub catalog_commit: Histogram,
    pub catalog_commits_failed: Counter,
    pub catalog_reprepares: Counter,
    pub blocking_in_flight: Gauge,
    pub blocking_tasks: Counter,
    pub failed_logins: Counter,
    pub tokens_issued: Family<KindLabels, Counter>,
    pub gc_passes: Family<KindLabels, Counter>,
    pub gc_duration: Histogram,
    pub gc_freed_bytes: Counter,
    pub gc_deleted: Family<KindLabels, Counter>,
    pub gc_last_pass: Gauge,
    pub spack_builds: Counter,
    pub spack_build_duration: Histogram,
    pub spack_specs: Family<RepoLabels, Gauge>,
    pub spack_lag: Family<RepoLabels, Gauge>,
    pub log_dropped: Counter,
    pub upstream_requests: Family<UpstreamLabels, Counter>,
    pub proxy_stale_serves: Family<UpstreamOnlyLabels, Counter>,
    pub proxy_evictions: Counter,
    pub proxy_cached_bytes: Family<PrefixLabels, Gauge>,
    /// Log lines dropped already added to `log_dropped`.
    log_dropped_seen: std::sync::atomic::AtomicU64,
    /// When the catalog-derived gauges were last read, for [`Metrics::state_is_stale`].
    state_read: std::sync::Mutex<Option<Instant>>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Self {
        let mut r = Registry::default();
        let m = Metrics {
            enabled: AtomicBool::new(true),
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(latency_buckets),
            http_in_flight: Family::default(),
            storage_action: Family::new_with_constructor(latency_buckets),
            bytes_uploaded: Counter::default(),
            bytes_downloaded: Counter::default(),
            upload_sessions: Gauge::default(),
            upload_memory_limit: Gauge::default(),
            upload_memory_reserved: Gauge::default(),
            upload_memory_peak: Gauge::default(),
            upload_memory_pooled: Gauge::default(),
            upload_memory_waits: Counter::default(),
            upload_memory_timeouts: Counter::default(),
            repositories: Gauge::default(),
            blobs: Gauge::default(),
            manifests: Gauge::default(),
            stored_bytes: Gauge::default(),
            catalog_queue: Gauge::default(),
            catalog_commit: latency_buckets(),
            catalog_commits_failed: Counter::default(),
            catalog_reprepares: Counter::default(),
            blocking_in_flight: Gauge::default(),
            blocking_tasks: Counter::default(),
            failed_logins: Counter::default(),
            tokens_issued: Family::default(),
            gc_passes: Family::default(),
            gc_duration: long_buckets(),
            gc_freed_bytes: Counter::default(),
            gc_deleted: Family::default(),
            gc_last_pass: Gauge::default(),
            spack_builds: Counter::default(),
            spack_build_duration: long_buckets(),
            spack_specs: Family::default(),
            spack_lag: Family::default(),
            log_dropped: Counter::default(),
            upstream_requests: Family::default(),
            proxy_stale_serves: Family::default(),
            proxy_evictions: Counter::default(),
            proxy_cached_bytes: Family::default(),
            log_dropped_seen: std::sync::atomic::AtomicU64::new(0),
            state_read: std::sync::Mutex::new(None),
            registry: Registry::default(),
        };
        r.register(
            "registry_http_requests",
            "HTTP requests answered, by method, status code and handler",
            m.http_requests.clone(),
        );
        r.register_with_unit(
            "registry_http_request_duration",
            "Time from a request's arrival to its response head, by method and handler",
            Unit::Seconds,
            m.http_duration.clone(),
        );
        r.register(
            "registry_http_in_flight_requests",
            "Requests being handled, by handler",
            m.http_in_flight.clone(),
        );
        r.register_with_unit(
            "registry_storage_action",
            "Blob store operations, by driver and action (a read is timed to its first byte)",
            Unit::Seconds,
            m.storage_action.clone(),
        );
        r.register_with_unit(
            "stowage_blob_uploaded",
            "Blob bytes received in uploads",
            Unit::Bytes,
            m.bytes_uploaded.clone(),
        );
        r.register_with_unit(
            "stowage_blob_downloaded",
            "Blob bytes sent to clients (redirected downloads not included)",
            Unit::Bytes,
            m.bytes_downloaded.clone(),
        );
        r.register(
            "stowage_upload_sessions_open",
            "Upload sessions open",
            m.upload_sessions.clone(),
        );
        r.register_with_unit(
            "stowage_upload_memory_limit",
            "The upload memory budget (storage.upload_memory)",
            Unit::Bytes,
            m.upload_memory_limit.clone(),
        );
        r.register_with_unit(
            "stowage_upload_memory_reserved",
            "Upload memory reserved by parts being received or written",
            Unit::Bytes,
            m.upload_memory_reserved.clone(),
        );
        r.register_with_unit(
            "stowage_upload_memory_peak",
            "The most upload memory reserved at once since the process started",
            Unit::Bytes,
            m.upload_memory_peak.clone(),
        );
        r.register_with_unit(
            "stowage_upload_memory_pooled",
            "Upload memory held by idle part buffers kept for reuse (part of what is reserved)",
            Unit::Bytes,
            m.upload_memory_pooled.clone(),
        );
        r.register(
            "stowage_upload_memory_waits",
            "Times an upload waited for upload memory (back-pressure on its connection)",
            m.upload_memory_waits.clone(),
        );
        r.register(
            "stowage_upload_memory_timeouts",
            "Upload requests answered 503 because no upload memory came free in time",
            m.upload_memory_timeouts.clone(),
        );
        r.register(
            "stowage_repositories",
            "Repositories in the catalog",
            m.repositories.clone(),
        );
        r.register("stowage_blobs", "Distinct blobs stored", m.blobs.clone());
        r.register(
            "stowage_manifests",
            "Manifests in the catalog, all repositories",
            m.manifests.clone(),
        );
        r.register_with_unit(
            "stowage_stored",
            "Bytes of the distinct blobs stored",
            Unit::Bytes,
            m.stored_bytes.clone(),
        );
        r.register(
            "stowage_catalog_write_queue_depth",
            "Catalog write jobs waiting for the writer",
            m.catalog_queue.clone(),
        );
        r.register_with_unit(
            "stowage_catalog_commit",
            "Catalog commits (one per batch of writes, fsync included)",
            Unit::Seconds,
            m.catalog_commit.clone(),
        );
        r.register(
            "stowage_catalog_commit_failures",
            "Catalog commits that failed",
            m.catalog_commits_failed.clone(),
        );
        r.register(
            "stowage_catalog_statement_reprepares",
            "Times a cached catalog statement was parsed and planned again (expected to stay 0)",
            m.catalog_reprepares.clone(),
        );
        r.register(
            "stowage_blocking_tasks_in_flight",
            "Blocking tasks (file I/O, hashing, password checks) running or queued on the blocking pool",
            m.blocking_in_flight.clone(),
        );
        r.register(
            "stowage_blocking_tasks",
            "Blocking tasks started on the blocking pool",
            m.blocking_tasks.clone(),
        );
        r.register(
            "stowage_auth_failed_logins",
            "Sign-ins refused for a wrong user name, password or API token",
            m.failed_logins.clone(),
        );
        r.register(
            "stowage_auth_tokens_issued",
            "Tokens issued, by kind (registry: /token bearer tokens; api: API tokens created)",
            m.tokens_issued.clone(),
        );
        r.register(
            "stowage_gc_passes",
            "Garbage-collection passes, by outcome (ok, failed)",
            m.gc_passes.clone(),
        );
        r.register_with_unit(
            "stowage_gc_pass_duration",
            "Garbage-collection passes",
            Unit::Seconds,
            m.gc_duration.clone(),
        );
        r.register_with_unit(
            "stowage_gc_freed",
            "Bytes of blob objects garbage collection deleted",
            Unit::Bytes,
            m.gc_freed_bytes.clone(),
        );
        r.register(
            "stowage_gc_deleted",
            "What garbage collection and retention deleted, by kind (blob, manifest, spack_index, \
             orphan, retention_tag)",
            m.gc_deleted.clone(),
        );
        r.register(
            "stowage_gc_last_pass_timestamp_seconds",
            "Unix time the last successful garbage-collection pass ended",
            m.gc_last_pass.clone(),
        );
        r.register(
            "stowage_spack_index_builds",
            "Spack index.spack builds",
            m.spack_builds.clone(),
        );
        r.register_with_unit(
            "stowage_spack_index_build_duration",
            "Spack index.spack builds",
            Unit::Seconds,
            m.spack_build_duration.clone(),
        );
        r.register(
            "stowage_spack_specs",
            "Spec tags in a Spack build cache, by repository",
            m.spack_specs.clone(),
        );
        r.register(
            "stowage_spack_index_generation_lag",
            "Changes to a Spack build cache's specs not yet in its built index.spack (built on the next read)",
            m.spack_lag.clone(),
        );
        r.register(
            "stowage_log_lines_dropped",
            "Log lines dropped because standard error was not read fast enough",
            m.log_dropped.clone(),
        );
        r.register(
            "stowage_proxy_upstream_requests",
            "Requests to a pull-through upstream, by upstream prefix and outcome (ok, not_found, \
             rate_limited, unauthorized, error, unreachable; not_found_remembered: a 404 answered \
             from memory, no request sent)",
            m.upstream_requests.clone(),
        );
        r.register(
            "stowage_proxy_stale_serves",
            "Proxied tags served from the local copy because the upstream could not re-validate them, by upstream prefix",
            m.proxy_stale_serves.clone(),
        );
        r.register(
            "stowage_proxy_evictions",
            "Cached manifests of proxied repositories evicted by garbage collection to keep a prefix under its max_size",
            m.proxy_evictions.clone(),
        );
        r.register(
            "stowage_proxy_cached_bytes",
            "Bytes the cached content of a proxied prefix with a max_size takes (distinct referenced blobs plus manifests), after the last collection pass's eviction",
            m.proxy_cached_bytes.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// Turns request metrics on or off (`metrics.enabled`); the rest are always kept.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// Whether request metrics are recorded.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// The exposition, in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let dropped = crate::logging::dropped_lines();
        let seen = self.log_dropped_seen.swap(dropped, Ordering::Relaxed);
        self.log_dropped.inc_by(dropped.saturating_sub(seen));
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Whether the catalog-derived gauges are older than [`STATE_MAX_AGE`]; marks them read
    /// now when they are, so that of concurrent scrapes only one reads the catalog.
    pub fn claim_state_refresh(&self) -> bool {
        let Ok(mut read) = self.state_read.lock() else {
            return false;
        };
        match *read {
            Some(at) if at.elapsed() < STATE_MAX_AGE => false,
            _ => {
                *read = Some(Instant::now());
                true
            }
        }
    }

    /// Times one blob store operation.
    pub fn storage(&self, driver: &'static str, action: &'static str, started: Instant) {
        self.storage_action
            .get_or_create(&StorageLabels { driver, action })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Counts `n` things of `kind` deleted by collection or retention.
    pub fn deleted(&self, kind: &'static str, n: u64) {
        if n > 0 {
            self.gc_deleted.get_or_create(&KindLabels { kind }).inc_by(n);
        }
    }
}

/// Runs `f` on tokio's blocking pool, counted in `stowage_blocking_tasks*`. Use it instead of
/// `tokio::task::spawn_blocking` everywhere.
pub fn spawn_blocking<F, R>(f: F) -> tokio::task::JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let m = get();
    m.blocking_tasks.inc();
    m.blocking_in_flight.inc();
    /// Decrements the in-flight gauge however the task ends (panics included).
    struct Done;
    impl Drop for Done {
        fn drop(&mut self) {
            get().blocking_in_flight.dec();
        }
    }
    let done = Done;
    tokio::task::spawn_blocking(move || {
        let _done = done;
        f()
    })
}

/// The Distribution handler name of a request path (`base`, `catalog`, `tags`, `manifest`,
/// `blob`, `blob_upload`, `blob_upload_chunk`, `referrers`), or Stowage's own (`token`,
/// `spack`, `ops`, `ui`, `other`). Read from the end of the path, since a repository name may
/// itself contain `blobs` or `manifests` as a component; never allocates.
pub fn handler_of(path: &str) -> &'static str {
    if let Some(rest) = path.strip_prefix("/v2") {
        if rest.is_empty() || rest == "/" {
            return "base";
        }
        if rest == "/_catalog" {
            return "catalog";
        }
        if rest.ends_with("/tags/list") {
            return "tags";
        }
        let trimmed = rest.strip_suffix('/').unwrap_or(rest);
        let mut parts = trimmed.rsplit('/');
        let last = parts.next().unwrap_or("");
        let second = parts.next().unwrap_or("");
        let third = parts.next().unwrap_or("");
        return match (third, second, last) {
            (_, "blobs", "uploads") => "blob_upload",
            ("blobs", "uploads", _) => "blob_upload_chunk",
            (_, "manifests", _) => "manifest",
            (_, "blobs", _) => "blob",
            (_, "referrers", _) => "referrers",
            _ => "other",
        };
    }
    if path == "/token" {
        "token"
    } else if path.starts_with("/stowage/v1/spack/") {
        "spack"
    } else if path.starts_with("/stowage/") {
        "admin"
    } else if matches!(path, "/livez" | "/readyz" | "/metrics") {
        "ops"
    } else if path == "/" || path.starts_with("/ui") {
        "ui"
    } else {
        "other"
    }
}

/// The method label: one of the methods the API uses, lower-case as Distribution writes it.
pub fn method_label(method: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *method {
        Method::GET => "get",
        Method::HEAD => "head",
        Method::PUT => "put",
        Method::POST => "post",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        Method::OPTIONS => "options",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handlers_are_read_from_the_end_of_the_path() {
        for (path, handler) in [
            ("/v2", "base"),
            ("/v2/", "base"),
            ("/v2/_catalog", "catalog"),
            ("/v2/a/b/tags/list", "tags"),
            ("/v2/a/manifests/latest", "manifest"),
            ("/v2/blobs/manifests/x/manifests/sha256:ab", "manifest"),
            ("/v2/manifests/blobs/sha256:ab", "blob"),
            ("/v2/a/blobs/uploads/", "blob_upload"),
            ("/v2/a/blobs/uploads", "blob_upload"),
            ("/v2/a/blobs/uploads/0f3e", "blob_upload_chunk"),
            ("/v2/a/referrers/sha256:ab", "referrers"),
            ("/v2/a/unknown", "other"),
            ("/token", "token"),
            ("/stowage/v1/spack/cache/specs", "spack"),
            ("/metrics", "ops"),
            ("/readyz", "ops"),
            ("/ui/repositories", "ui"),
            ("/favicon.ico", "other"),
        ] {
            assert_eq!(handler_of(path), handler, "{path}");
        }
    }

    #[test]
    fn the_exposition_names_distributions_series() {
        let m = get();
        m.http_requests
            .get_or_create(&RequestLabels {
                method: "get",
                code: 200,
                handler: "manifest",
            })
            .inc();
        m.storage("filesystem", "stat", Instant::now());
        let text = m.encode();
        assert!(
            text.contains("registry_http_requests_total{method=\"get\",code=\"200\",handler=\"manifest\"} "),
            "{text}"
        );
        assert!(
            text.contains("registry_storage_action_seconds_count{driver=\"filesystem\",action=\"stat\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}

//! Configuration: one serde struct, layered defaults → TOML file → `STOWAGE_*` environment
//! variables (nested keys joined with `__`, e.g. `STOWAGE_REGISTRY__DELETE_ENABLED=false`) →
//! command-line flags. `stowage serve` needs no file: the defaults run a registry on
//! 127.0.0.1:5000 with SQLite and blobs under `./stowage-data`.
//!
//! A commented template of every setting is `stowage.example.toml` at the repository root.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Every setting of `stowage serve`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address and port to listen on. Port 0 picks a free port (printed at start-up).
    pub listen: SocketAddr,
    /// Directory for the catalog (`catalog.db`) and, with the `fs` backend, the blobs.
    pub data_dir: PathBuf,
    /// Where the catalog lives: SQLite under `data_dir` (the default), or PostgreSQL.
    pub catalog: CatalogConfig,
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub registry: RegistryConfig,
    pub tls: TlsConfig,
    pub auth: AuthConfig,
    /// Tags that may not be moved or deleted (`[[immutable_tags]]` with `repositories` and
    /// `tags`), except by identities with the `overwrite` action. See `auth::immutable`.
    pub immutable_tags: Vec<crate::auth::ImmutableTagRule>,
    /// Pull-through caches of upstream registries (`[[proxy]]`): repositories under `prefix`
    /// are read-only mirrors of `url`. See [`ProxyConfig`] and `docs/proxy.md`.
    pub proxy: Vec<ProxyConfig>,
    /// Spack build caches: hosted repositories that fall back to proxied ones
    /// (`[[spack.merge]]`). See [`SpackConfig`].
    pub spack: SpackConfig,
    pub gc: GcConfig,
    pub audit: AuditConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub ui: UiConfig,
}

/// The catalog's database (`[catalog]`). Unset `url`: SQLite, `<data_dir>/catalog.db`.
/// A `postgres://` URL: PostgreSQL, which several replicas can share (`docs/postgres.md`).
/// The password never comes from this file: from `password_file` (e.g. a mounted Kubernetes
/// Secret) or the environment variable `password_env` names, read at start-up.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CatalogConfig {
    /// `postgres://user@host:5432/stowage` (or the `host=… dbname=…` form); no password here.
    pub url: Option<String>,
    /// A file holding the database password (one line; surrounding whitespace is ignored).
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the database password.
    pub password_env: Option<String>,
    /// With `sslmode=require` in `url`: the CA certificates (PEM) the server's certificate must
    /// chain to. Unset: the system's trust store.
    pub tls_ca_file: Option<PathBuf>,
}

impl CatalogConfig {
    fn validate(&self) -> Result<(), String> {
        if self.password_file.is_some() && self.password_env.is_some() {
            return Err("catalog: set one of password_file and password_env, not both".into());
        }
        let Some(url) = &self.url else {
            if self.password_file.is_some() || self.password_env.is_some() {
                return Err("catalog: a password needs catalog.url (SQLite has none)".into());
            }
            if self.tls_ca_file.is_some() {
                return Err("catalog: tls_ca_file needs catalog.url (SQLite has none)".into());
            }
            return Ok(());
        };
        let parsed = crate::catalog::postgres::parse_url(url)?;
        if parsed.get_password().is_some() {
            return Err(
                "catalog.url must not hold the password: use catalog.password_file or catalog.password_env".into(),
            );
        }
        Ok(())
    }

    /// The password `password_file` or `password_env` holds, if either is set.
    pub fn password(&self) -> Result<Option<String>, String> {
        if let Some(file) = &self.password_file {
            let text =
                std::fs::read_to_string(file).map_err(|e| format!("catalog.password_file {}: {e}", file.display()))?;
            return Ok(Some(text.trim().to_owned()));
        }
        if let Some(var) = &self.password_env {
            let value = std::env::var(var).map_err(|_| format!("catalog.password_env: {var} is not set"))?;
            return Ok(Some(value));
        }
        Ok(None)
    }
}

/// Prometheus metrics at `/metrics` (the series: `crate::metrics` and the README).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `/metrics` and record request metrics. Off: no `/metrics` route, and requests
    /// skip the per-request counters (storage, catalog and GC series are still kept).
    pub enabled: bool,
    /// Serve `/metrics` on this address only (plain HTTP, no other route but the probes),
    /// instead of on `listen`: keeps metrics off the public port.
    pub listen: Option<SocketAddr>,
    /// A file holding a secret: `/metrics` then needs `Authorization: Bearer <secret>`
    /// (Prometheus: `authorization: { credentials_file: … }`). Unset: anonymous.
    pub token_file: Option<PathBuf>,
    /// Spack build caches given series of their own (`repository` label), first by name;
    /// the others are summed under `repository="_other"`.
    pub max_repository_series: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: None,
            token_file: None,
            max_repository_series: 50,
        }
    }
}

/// The audit trail (`catalog::audit`): who pushed, deleted, or changed users and tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Days an audit row is kept; older rows are deleted hourly, a bounded batch at a time.
    /// 0 keeps them forever.
    pub retention_days: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig { retention_days: 365 }
    }
}

/// Connections and their time limits: what one client may hold, and for how long.
///
/// Request heads are limited by the HTTP layer itself (not configurable): at most 96 header
/// fields and 128 KiB for the request line and headers together, beyond which the request is
/// answered 431 and the connection closed. Registry clients send a few KiB at most (a bearer
/// token is the largest header), so these bound the memory an unfinished head can take.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Most client connections open at once. Beyond it new connections wait in the listen
    /// backlog until one closes. 0: derived from the file-descriptor limit at start-up (a third
    /// of the descriptors left after a reserve, since each connection may hold a second one
    /// for the blob it streams; see the README).
    pub max_connections: usize,
    /// Seconds a client has to send a request's line and headers once it starts one; a slower
    /// client is answered 408 and disconnected.
    pub request_head_timeout_secs: u64,
    /// Seconds an idle keep-alive connection stays open.
    pub keep_alive_secs: u64,
    /// Seconds a request body may go without a byte arriving while the server waits for it;
    /// the request then fails with 400 (an OCI error saying the body stalled) and its
    /// connection closes. Counts only time the server is waiting on the client.
    pub body_idle_timeout_secs: u64,
    /// Seconds a small body read whole (a token request form, a manifest, a Spack JSON
    /// document) may take in total, however steadily it trickles in.
    pub small_body_timeout_secs: u64,
    /// Seconds the server keeps serving after `SIGTERM` while `/readyz` answers 503, so that
    /// a load balancer (a Kubernetes Service) stops sending it requests before it stops
    /// accepting them. 0: stop accepting at once.
    pub shutdown_delay_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 0,
            request_head_timeout_secs: 10,
            keep_alive_secs: 30,
            body_idle_timeout_secs: 30,
            small_body_timeout_secs: 60,
            shutdown_delay_secs: 0,
        }
    }
}

/// Garbage collection, run by the server in the background (the rules: `registry::gc`).
///
/// A manifest that no tag names and nothing else keeps is removed `grace_secs` after it lost
/// its last tag (or was pushed untagged). A blob stays linked to a repository while a manifest
/// of that repository references it; an unreferenced link older than `grace_secs` (counted
/// from the upload, the mount, or the deletion of the last manifest referencing it) is
/// removed, and a blob no repository links any more is deleted from storage. The grace period
/// covers pushes in progress (blobs are uploaded before the manifest that references them)
/// and pulls of a manifest whose tag just moved.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcConfig {
    /// Run garbage collection.
    pub enabled: bool,
    /// Seconds between two runs (the first runs this long after start-up).
    pub interval_secs: u64,
    /// Seconds an unneeded manifest or an unreferenced blob link is kept.
    pub grace_secs: u64,
    /// Collect manifests that no tag names and that nothing else keeps (an index that lists
    /// them, a subject they refer to, a Spack build cache whose current index they are).
    pub untagged_manifests: bool,
    /// Seconds a superseded Spack index blob is kept for readers given the old index.
    pub spack_index_grace_secs: u64,
    /// Seconds between two listings of storage for objects the catalog does not record.
    pub orphan_interval_secs: u64,
    /// Longest a Spack keep-list may be kept, from its creation (`expires_at`/`expires_in`
    /// beyond it are refused).
    pub keep_list_max_secs: u64,
    /// Retention rules (`[[gc.retention]]`), applied by each collection pass before it
    /// collects; the first rule whose `repositories` match a repository applies to it. See
    /// [`RetentionRule`] and the README's "Retention" section.
    pub retention: Vec<RetentionRule>,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            enabled: true,
            interval_secs: 3600,
            grace_secs: 24 * 3600,
            untagged_manifests: true,
            spack_index_grace_secs: 600,
            orphan_interval_secs: 24 * 3600,
            keep_list_max_secs: 90 * 24 * 3600,
            retention: Vec::new(),
        }
    }
}

/// One retention rule: in the repositories it matches, every tag is deleted unless one of the
/// rule's keep conditions (or a live Spack keep-list) keeps it. A rule needs at least one keep
/// condition. Deleting a tag leaves its manifest untagged, for the collector to remove after
/// the grace period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionRule {
    /// Repository patterns, as in `auth.rules` (`*` within a component, `**` across).
    pub repositories: Vec<crate::auth::scope::Pattern>,
    /// Keep the N most recently pushed tags (by push time; ties by name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    /// Keep tags pushed within this period (seconds, or a number with a unit: `90d`, `12h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_pushed_within: Option<Period>,
    /// Keep tags whose manifest was pulled (GET or HEAD, by tag or digest) within this period.
    /// Pulls are recorded to within about an hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_pulled_within: Option<Period>,
    /// Keep tags matching any of these globs (`*` matches any run of characters).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep_tags: Vec<crate::auth::scope::Pattern>,
    /// Only log what the rule would delete.
    #[serde(default)]
    pub dry_run: bool,
}

impl RetentionRule {
    fn validate(&self, index: usize) -> Result<(), String> {
        let at = format!("gc.retention[{index}]");
        if self.repositories.is_empty() || self.repositories.iter().any(|p| p.as_str().is_empty()) {
            return Err(format!("{at}.repositories must list one or more non-empty patterns"));
        }
        if self.keep_last == Some(0) {
            return Err(format!(
                "{at}.keep_last must be at least 1 (leave it out to keep no tag by count)"
            ));
        }
        if self.keep_tags.iter().any(|p| p.as_str().is_empty()) {
            return Err(format!("{at}.keep_tags must not hold an empty pattern"));
        }
        if self.keep_last.is_none()
            && self.keep_pushed_within.is_none()
            && self.keep_pulled_within.is_none()
            && self.keep_tags.is_empty()
        {
            return Err(format!(
                "{at} needs at least one of keep_last, keep_pushed_within, keep_pulled_within, keep_tags \
                 (a rule without one would delete every tag)"
            ));
        }
        Ok(())
    }
}

/// One upstream registry mirrored under a repository prefix (`[[proxy]]`): a pull of
/// `<prefix><name>` is served from the local copy, fetched from `<url>/v2/<name>/…` when it is
/// missing (see `docs/proxy.md`). Repositories under `prefix` are read-only.
///
/// Credentials never come from this file: the password is read from `password_file` or the
/// environment variable `password_env` at start-up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Repository prefix, ending in `/` (e.g. `dockerhub/`): `dockerhub/library/alpine` is
    /// `library/alpine` at the upstream. Prefixes of two entries must not overlap.
    pub prefix: String,
    /// The upstream's base URL (`https://registry-1.docker.io`); `http://` is allowed.
    pub url: String,
    /// User name for the upstream (Basic credentials, also sent to its token endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// File holding the upstream password or token (trailing newline ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the upstream password or token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// PEM file of CA certificates trusted for the upstream, besides the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Accept any TLS certificate from the upstream (testing only: anyone on the path can then
    /// serve content; digests still protect content fetched by digest, not tags).
    #[serde(default)]
    pub insecure_skip_verify: bool,
    /// How long a proxied tag is served from the local copy before it is checked again with an
    /// upstream `HEAD` (seconds, or a number with a unit: `5m`).
    #[serde(default = "default_tag_ttl")]
    pub tag_ttl: Period,
    /// How long an upstream "not found" (a 404 to a manifest or blob request) is remembered:
    /// the same request is answered "unknown" from memory until then, without asking again.
    #[serde(default = "default_miss_ttl")]
    pub miss_ttl: Period,
    /// Seconds to connect to the upstream, and most seconds between two reads of a response.
    #[serde(default = "default_proxy_timeout")]
    pub timeout_secs: u64,
    /// Most requests in flight to this upstream at once (further ones wait). A blob being
    /// streamed to clients from its spool file (the tee) holds its request's place until the
    /// last of them is done.
    #[serde(default = "default_proxy_concurrency")]
    pub max_concurrent_requests: usize,
    /// Registry host names this entry mirrors for containerd's mirror form: a request
    /// `/v2/library/alpine/manifests/3.20?ns=docker.io` is served as
    /// `<prefix>library/alpine` of the entry naming `docker.io`. Unset: the upstream URL's
    /// host (with its port, if any), and also `docker.io` for `registry-1.docker.io`; `[]`:
    /// none. Unique across entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<Vec<String>>,
    /// Most bytes this entry's cached content may take (bytes, or a number with a unit:
    /// `50GiB`, `500MB`); unset: no cap. Each collection pass evicts the least recently pulled
    /// manifests of the prefix until its content fits (see `docs/proxy.md`, "Size cap").
    /// Needs `gc.enabled` (checked in [`Config::validate`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<ByteSize>,
    /// Largest upstream Spack `index.spack` blob read to merge with the specs cached here
    /// (bytes, or a number with a unit); a larger one is refused as an upstream error (the
    /// merged index built last is served meanwhile, if any). The merge holds the upstream
    /// index in memory once.
    #[serde(default = "default_max_spack_index_size")]
    pub max_spack_index_size: ByteSize,
}

/// `[spack]`: Spack build caches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpackConfig {
    /// Hosted repositories whose `index.spack` also lists proxied repositories' specs, and
    /// whose pulls fall back to them (`[[spack.merge]]`).
    pub merge: Vec<SpackMergeConfig>,
}

/// One `[[spack.merge]]` entry: a hosted buildcache backed by pull-through caches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpackMergeConfig {
    /// The hosted repository (not under a `[[proxy]]` prefix) clients use as their mirror.
    pub repository: String,
    /// Proxied repositories (under a `[[proxy]]` prefix), in priority order: their index
    /// entries are listed in the repository's `index.spack` (its own specs win), and a
    /// manifest or blob it does not hold is looked up in them, in this order. Anyone who may
    /// pull `repository` can pull through them.
    pub fallbacks: Vec<String>,
}

impl SpackConfig {
    /// Each repository is a valid name outside every proxy prefix, named once; each fallback a
    /// valid repository under a prefix, named once per entry. (No cycle can form: a
    /// fallback is proxied and a merged repository is not.)
    fn validate(&self, proxies: &[ProxyConfig]) -> Result<(), String> {
        let proxied = |name: &str| proxies.iter().any(|p| name.starts_with(p.prefix.as_str()));
        for (i, m) in self.merge.iter().enumerate() {
            let at = format!("spack.merge[{i}]");
            if m.repository.parse::<crate::oci::RepoName>().is_err() {
                return Err(format!(
                    "{at}.repository {:?} is not a valid repository name",
                    m.repository
                ));
            }
            if proxied(&m.repository) {
                return Err(format!(
                    "{at}.repository {:?} is under a [[proxy]] prefix: it must be a hosted repository",
                    m.repository
                ));
            }
            if self.merge[..i].iter().any(|o| o.repository == m.repository) {
                return Err(format!(
                    "{at}.repository {:?} is named by two [[spack.merge]] entries",
                    m.repository
                ));
            }
            if m.fallbacks.is_empty() {
                return Err(format!("{at}.fallbacks is empty: name at least one proxied repository"));
            }
            for (j, f) in m.fallbacks.iter().enumerate() {
                if f.parse::<crate::oci::RepoName>().is_err() {
                    return Err(format!("{at}.fallbacks[{j}] {f:?} is not a valid repository name"));
                }
                if !proxied(f) {
                    return Err(format!(
                        "{at}.fallbacks[{j}] {f:?} is not under any [[proxy]] prefix: fallbacks must be pull-through repositories"
                    ));
                }
                if m.fallbacks[..j].contains(f) {
                    return Err(format!("{at}.fallbacks names {f:?} twice"));
                }
            }
        }
        Ok(())
    }
}

fn default_max_spack_index_size() -> ByteSize {
    ByteSize(1 << 30)
}

fn default_tag_ttl() -> Period {
    Period(300)
}

fn default_miss_ttl() -> Period {
    Period(30)
}

fn default_proxy_timeout() -> u64 {
    30
}

fn default_proxy_concurrency() -> usize {
    16
}

impl ProxyConfig {
    /// The namespaces (`?ns=` values) this entry answers for: as configured, else the
    /// upstream URL's host, with its port only when it is not the scheme's default (`docker.io`
    /// too for Docker Hub's `registry-1.docker.io`). Lower case. None for a URL that does not
    /// parse (refused by validation anyway).
    pub fn namespaces(&self) -> Vec<String> {
        if let Some(explicit) = &self.namespaces {
            return explicit.iter().map(|n| n.to_ascii_lowercase()).collect();
        }
        let Ok(url) = reqwest::Url::parse(&self.url) else {
            return Vec::new();
        };
        let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
            return Vec::new();
        };
        // `port()` is None for the scheme's default port, written or not.
        let host = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        }
        .to_ascii_lowercase();
        let mut names = vec![host];
        if names[0] == "registry-1.docker.io" {
            names.push("docker.io".to_owned());
        }
        names
    }

    /// Checks one entry (`index` counts from 0).
    fn validate(&self, index: usize) -> Result<(), String> {
        let at = format!("proxy[{index}]");
        let prefix = self.prefix.as_str();
        let body = prefix.strip_suffix('/').unwrap_or("");
        if body.is_empty() || body.parse::<crate::oci::RepoName>().is_err() {
            return Err(format!(
                "{at}.prefix must be a repository name followed by `/` (e.g. \"dockerhub/\"), not {prefix:?}"
            ));
        }
        let url = self.url.as_str();
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"))
            .unwrap_or("");
        let host = rest.trim_end_matches('/');
        if host.is_empty() || host.contains(['/', '?', '#', '@']) || host.contains(char::is_whitespace) {
            return Err(format!(
                "{at}.url must be an http:// or https:// URL of the registry's root (e.g. \"https://ghcr.io\"), not {url:?}"
            ));
        }
        match (&self.username, &self.password_file, &self.password_env) {
            (Some(_), Some(_), Some(_)) => {
                return Err(format!("{at}: set one of password_file and password_env, not both"));
            }
            (Some(_), None, None) => {
                return Err(format!("{at}.username needs password_file or password_env"));
            }
            (None, Some(_), _) | (None, _, Some(_)) => {
                return Err(format!("{at}: a password needs a username"));
            }
            _ => {}
        }
        if self
            .username
            .as_deref()
            .is_some_and(|u| u.is_empty() || u.contains(':'))
        {
            return Err(format!("{at}.username must be non-empty and hold no `:`"));
        }
        if self.timeout_secs == 0 {
            return Err(format!("{at}.timeout_secs must be at least 1"));
        }
        if self.max_concurrent_requests == 0 {
            return Err(format!("{at}.max_concurrent_requests must be at least 1"));
        }
        for ns in self.namespaces.iter().flatten() {
            let valid = !ns.is_empty()
                && ns.len() <= 255
                && ns
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
            if !valid {
                return Err(format!(
                    "{at}.namespaces must hold registry host names (e.g. \"docker.io\", \"host:5000\"), not {ns:?}"
                ));
            }
        }
        Ok(())
    }

    /// Checks every entry, and that no prefix is a prefix of another's.
    fn validate_all(entries: &[ProxyConfig]) -> Result<(), String> {
        for (i, p) in entries.iter().enumerate() {
            p.validate(i)?;
        }
        for (i, a) in entries.iter().enumerate() {
            for (j, b) in entries.iter().enumerate() {
                if i != j && b.prefix.starts_with(a.prefix.as_str()) {
                    return Err(format!(
                        "proxy[{i}].prefix {:?} and proxy[{j}].prefix {:?} overlap: a repository would belong to both",
                        a.prefix, b.prefix
                    ));
                }
                if i < j
                    && let Some(ns) = a.namespaces().into_iter().find(|n| b.namespaces().contains(n))
                {
                    return Err(format!(
                        "proxy[{i}] and proxy[{j}] both answer for namespace {ns:?} (`?ns=`); set `namespaces` \
                         on one of them (an unset list defaults to the URL's host)"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A size in bytes, written as an integer (`1048576`) or as a number with one unit suffix:
/// `B`, decimal `KB`, `MB`, `GB`, `TB` or binary `KiB`, `MiB`, `GiB`, `TiB` (`50GiB`; case is
/// ignored, so `kb` is `KB`; a space may separate the number and the unit). At least one byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(u64);

impl ByteSize {
    pub fn bytes(self) -> u64 {
        self.0
    }

    /// Parses `50GiB`, `500MB`, `1024` and the like.
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        let text = s.trim();
        let invalid = || {
            format!("invalid size {text:?}: expected bytes or a number with B, KB, MB, GB, TB, KiB, MiB, GiB or TiB")
        };
        let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
            Some(i) => text.split_at(i),
            None => (text, "b"),
        };
        let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "b" => 1,
            "kb" => 1000,
            "mb" => 1000 * 1000,
            "gb" => 1000 * 1000 * 1000,
            "tb" => 1000 * 1000 * 1000 * 1000,
            "kib" => 1 << 10,
            "mib" => 1 << 20,
            "gib" => 1 << 30,
            "tib" => 1 << 40,
            _ => return Err(invalid()),
        };
        let n: u64 = number.parse().map_err(|_| invalid())?;
        let bytes = n
            .checked_mul(scale)
            .ok_or_else(|| format!("size {text:?} is too large"))?;
        Self::from_bytes(bytes)
    }

    fn from_bytes(bytes: u64) -> Result<ByteSize, String> {
        if bytes == 0 || bytes > i64::MAX as u64 {
            return Err(format!("a size must be between 1 byte and 2^63 - 1 bytes, not {bytes}"));
        }
        Ok(ByteSize(bytes))
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        for (unit, scale) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if b.is_multiple_of(scale) {
                return write!(f, "{}{unit}", b / scale);
            }
        }
        write!(f, "{b}B")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => ByteSize::from_bytes(n),
            Raw::Text(t) => ByteSize::parse(&t),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// A period: whole seconds, written as an integer (`86400`) or as a number with one unit
/// suffix: `s`, `m`, `h`, `d` or `w` (`90d`, `12h`). At least one second, at most 100 years.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period(u64);

/// Longest period accepted (100 years).
const MAX_PERIOD_SECS: u64 = 100 * 365 * 24 * 3600;

impl Period {
    pub fn secs(self) -> u64 {
        self.0
    }

    /// Parses `90d`, `12h`, `30m`, `45s`, `2w` or plain seconds.
    pub fn parse(s: &str) -> Result<Period, String> {
        let s = s.trim();
        let (number, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
            Some(i) => s.split_at(i),
            None => (s, "s"),
        };
        let scale = match unit.trim() {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            "w" => 7 * 86_400,
            _ => {
                return Err(format!(
                    "invalid period {s:?}: expected seconds or a number with s, m, h, d or w"
                ));
            }
        };
        let n: u64 = number
            .parse()
            .map_err(|_| format!("invalid period {s:?}: expected seconds or a number with s, m, h, d or w"))?;
        Self::from_secs(n.saturating_mul(scale))
    }

    fn from_secs(secs: u64) -> Result<Period, String> {
        if !(1..=MAX_PERIOD_SECS).contains(&secs) {
            return Err(format!("a period must be between 1 s and 100 years, not {secs} s"));
        }
        Ok(Period(secs))
    }
}

impl std::fmt::Display for Period {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.0;
        for (unit, scale) in [("w", 7 * 86_400), ("d", 86_400), ("h", 3600), ("m", 60)] {
            if s.is_multiple_of(scale) {
                return write!(f, "{}{unit}", s / scale);
            }
        }
        write!(f, "{s}s")
    }
}

impl Serialize for Period {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Period, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(n) => Period::from_secs(n),
            Raw::Text(t) => Period::parse(&t),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// HTTPS. With both `cert` and `key` set, `listen` serves HTTPS only (Spack sends credentials
/// and reads build cache indexes only over `oci://`, which is HTTPS).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM file with the server certificate, followed by any intermediates.
    pub cert: Option<PathBuf>,
    /// PEM file with the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
}

/// Where blob bytes are kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Storage backend: `fs` (local disk, under `path`) or `s3` (S3 or an S3-compatible
    /// store, configured in `[storage.s3]`).
    pub backend: Backend,
    /// Root directory of the `fs` backend. Default: `<data_dir>/storage`.
    pub path: Option<PathBuf>,
    /// Size of the parts an upload is written in, in bytes (64 KiB to 1 GiB). Bounds the memory
    /// each upload in progress uses (about three parts). With `s3` it is at least 5 MiB (S3's
    /// smallest part). On local disk, a multiple of 4 KiB lets parts be written with direct I/O.
    pub part_size: usize,
    /// Memory every upload's part buffers are reserved from, in bytes, whatever the number of
    /// uploads. An upload that finds it spent waits (its connection is back-pressured) until
    /// other uploads' parts are written. Default: 8 MiB on `fs`, or two parts if `part_size`
    /// is raised past its 8 MiB default (at least 512 KiB: parts are reserved in 64 KiB steps,
    /// and an upload whose body is idle for 200 ms gives its memory back when someone waits or
    /// less than half the budget is free), 256 MiB on `s3` (at least two parts: an upload
    /// filling a part holds all of it, stalled or not).
    pub upload_memory: Option<usize>,
    /// Longest wait for upload memory; past it the request is answered 503 `UNAVAILABLE`
    /// with `Retry-After`, and its upload session keeps what it received.
    pub upload_memory_wait_secs: u64,
    /// The `s3` backend's settings.
    pub s3: S3Config,
}

impl StorageConfig {
    /// `upload_memory`, or the backend's default. On `fs` the default is never under two
    /// parts, so that raising `part_size` past its default does not leave every part written
    /// in pieces of a sixteenth of the budget.
    pub fn upload_memory(&self) -> usize {
        use crate::storage::memory;
        self.upload_memory.unwrap_or(match self.backend {
            Backend::Fs if self.part_size > DEFAULT_PART_SIZE => 2 * self.part_size,
            Backend::Fs => memory::DEFAULT_LOCAL_BYTES,
            Backend::S3 => memory::DEFAULT_OBJECT_STORE_BYTES,
        })
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Fs,
    S3,
}

/// The `s3` backend. Credentials never come from this file: they are taken from the standard
/// AWS environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_SESSION_TOKEN`), else from an AWS credentials file (`credentials_file`, or
/// `AWS_SHARED_CREDENTIALS_FILE`), else from web identity (`AWS_WEB_IDENTITY_TOKEN_FILE` with
/// `AWS_ROLE_ARN`) or the instance/container metadata service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// Bucket holding the blobs (required with `backend = "s3"`; it must exist).
    pub bucket: String,
    /// Key prefix inside the bucket, e.g. `stowage` (empty: the bucket's root).
    pub prefix: String,
    /// Region of the bucket (S3-compatible stores usually accept any).
    pub region: String,
    /// Endpoint URL of an S3-compatible store, e.g. `http://minio:9000`. Default: AWS's.
    /// `http://` endpoints are allowed.
    pub endpoint: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`) instead of virtual-hosted style
    /// (`bucket.endpoint/key`); most S3-compatible stores need it.
    pub path_style: bool,
    /// AWS shared credentials file (INI) to read the access key from, instead of the
    /// environment. Holds the secret, so it is named here, never inlined.
    pub credentials_file: Option<PathBuf>,
    /// Profile to read from the credentials file.
    pub profile: String,
    /// Answer blob GETs with a 307 redirect to a presigned URL of the object, so that large
    /// pulls do not pass through the registry. Off: blobs stream through (with `Range`).
    pub redirect: bool,
    /// Seconds a presigned download URL stays valid.
    pub redirect_expiry_secs: u64,
    /// Endpoint URL clients use to reach the store, when it differs from `endpoint` (e.g. the
    /// store is `http://minio:9000` inside a compose network but `http://localhost:9000` to
    /// clients). Presigned URLs are signed for this host.
    pub public_endpoint: Option<String>,
    /// Largest blob published with a server-side copy (S3's CopyObject limit is 5 GiB). A
    /// larger one is streamed through the registry into a multipart upload instead.
    pub max_copy_size: u64,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            bucket: String::new(),
            prefix: String::new(),
            region: "us-east-1".into(),
            endpoint: None,
            path_style: false,
            credentials_file: None,
            profile: "default".into(),
            redirect: false,
            redirect_expiry_secs: 300,
            public_endpoint: None,
            max_copy_size: 5 * 1024 * 1024 * 1024,
        }
    }
}

/// Registry behaviour.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Allow DELETE of manifests, tags and blobs. When false they answer 405 `UNSUPPORTED`.
    pub delete_enabled: bool,
    /// Start in read-only maintenance mode (pulls only; `SIGUSR2` leaves it, `SIGUSR1` enters
    /// it again). See `registry::maintenance`.
    pub read_only: bool,
    /// Largest manifest accepted, in bytes (the OCI spec asks registries to take 4 MiB).
    pub max_manifest_size: usize,
    /// Seconds an upload session may sit idle before it is cancelled and its data removed.
    /// Sessions are kept in the catalog, so this counts across restarts too.
    pub upload_timeout_secs: u64,
    /// Entries per `/v2/_catalog` page when the client does not pass `n`.
    pub catalog_page_size: u64,
    /// Upload sessions open at once, in total (lowered to fit the descriptor limit: each
    /// session on local disk holds two descriptors). Beyond it a POST gets 429.
    pub max_upload_sessions: usize,
    /// Upload sessions one user may hold open at once (scaled down with the total).
    pub max_upload_sessions_per_user: usize,
}

/// Authentication and access control. See the README's "Authentication" section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Check credentials and the access policy. `false` turns authentication off entirely:
    /// every client may pull, push and delete everything (development and tests only).
    pub enabled: bool,
    /// The `service` of challenges and the audience of tokens.
    pub service: String,
    /// The issuer of tokens.
    pub issuer: String,
    /// The token endpoint's URL as clients reach it. Default: built per request from the scheme
    /// and host the client used (`<scheme>://<host>/token`).
    pub realm: Option<String>,
    /// Seconds a registry token stays valid.
    pub token_ttl_secs: u64,
    /// Seconds a refresh token (`docker login`'s identity token) stays valid.
    pub refresh_token_ttl_secs: u64,
    /// PEM file with the Ed25519 private key that signs tokens. Default: keys generated in
    /// `<data_dir>/auth/keys/` (see `stowage key rotate`).
    pub signing_key: Option<PathBuf>,
    /// More PEM files (private or public Ed25519 keys) whose tokens are still accepted, e.g. the
    /// previous `signing_key` after a rotation.
    pub verify_keys: Vec<PathBuf>,
    /// Addresses of reverse proxies whose `X-Forwarded-Proto`/`X-Forwarded-Host`/
    /// `X-Forwarded-For` are believed. Requests from anywhere else have those headers ignored.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Repository patterns anyone may pull without credentials (`*` within one path
    /// component, `**` across components). Empty: none.
    pub anonymous_pull: Vec<crate::auth::Pattern>,
    /// Who may do what where (`[[auth.rules]]` with `repositories`, `users`, `actions`).
    /// Empty: every signed-in user may pull and push everywhere. Admins may always do
    /// everything, deletion included.
    pub rules: Vec<crate::auth::Rule>,
    /// Failed password logins one client address may have for one user name before backoff
    /// starts (an address may fail three times as often across all names). Nothing is counted
    /// per user name alone, and API tokens are never throttled. See `auth::limiter`.
    pub max_failed_logins: u32,
    /// Seconds of the first block once the allowance is spent; each further failure doubles it.
    pub failed_login_backoff_secs: u64,
    /// Longest block, in seconds.
    pub failed_login_backoff_max_secs: u64,
    /// Seconds after its last failure (and the end of its block) that an address or a
    /// (user, address) pair is forgotten.
    pub failed_login_window_secs: u64,
    /// Password verifications run at once. Each holds argon2's memory cost (19 MiB with the
    /// parameters stowage hashes with), so this bounds their memory: 4 × 19 MiB = 76 MiB by
    /// default. Attempts beyond it wait up to two seconds, then get 429 before any hashing.
    pub max_concurrent_hashes: u32,
    /// Seconds after a registry token expired that it is still accepted to continue an upload
    /// session it could have started (a long upload outliving its token); at most
    /// `registry.upload_timeout_secs`. 0: an expired token is never accepted.
    pub upload_token_grace_secs: u64,
    /// An admin user created on the first start (`[auth.bootstrap_admin]`), so that a fresh
    /// deployment needs no shell. See `auth::bootstrap`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_admin: Option<BootstrapAdmin>,
    /// An API token created on the first start (`[auth.bootstrap_token]`), with a secret the
    /// operator chose, so that CI can be given it. See `auth::bootstrap`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_token: Option<BootstrapToken>,
}

/// The environment variable a bootstrap admin's password may be given in, instead of
/// `auth.bootstrap_admin.password_file`. Read directly, never as a setting.
pub const BOOTSTRAP_PASSWORD_ENV: &str = "STOWAGE_BOOTSTRAP_ADMIN_PASSWORD";

/// `[auth.bootstrap_admin]`: an admin created when the server starts and no such user exists
/// (and no other admin does). Its password never comes from this file or the command line:
/// from `password_file` (e.g. a mounted Kubernetes Secret), else from the environment variable
/// `STOWAGE_BOOTSTRAP_ADMIN_PASSWORD`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapAdmin {
    /// The admin's user name.
    pub user: String,
    /// File holding the password (one line; a trailing newline is ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

/// `[auth.bootstrap_token]`: an API token created when the server starts and neither a token of
/// this name nor one with this secret exists for the user. Its secret is read from
/// `secret_file`, never from this file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapToken {
    /// The user the token acts for. Default: `auth.bootstrap_admin.user`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The token's name (as `stowage token create --name`).
    pub name: String,
    /// What it may do, as `stowage token create --scope`: `<repository pattern>:<actions>`.
    pub scopes: Vec<String>,
    /// Days until it expires, counted from its creation (default: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_days: Option<u32>,
    /// File holding the secret: `stw_` followed by 43 to 256 base64url characters, as random
    /// as `stowage token create` makes them (the README shows how to make one).
    pub secret_file: PathBuf,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            enabled: true,
            service: "stowage".into(),
            issuer: "stowage".into(),
            realm: None,
            token_ttl_secs: 300,
            refresh_token_ttl_secs: 30 * 24 * 3600,
            signing_key: None,
            verify_keys: Vec::new(),
            trusted_proxies: Vec::new(),
            anonymous_pull: Vec::new(),
            rules: Vec::new(),
            max_failed_logins: 5,
            failed_login_backoff_secs: 1,
            failed_login_backoff_max_secs: 300,
            failed_login_window_secs: 900,
            max_concurrent_hashes: 4,
            upload_token_grace_secs: 900,
            bootstrap_admin: None,
            bootstrap_token: None,
        }
    }
}

/// The web UI at `/ui/` (see `ui`): the same users and policy as the registry API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UiConfig {
    /// Serve the web UI at `/ui/` (and redirect `/` there). Off: both answer 404.
    pub enabled: bool,
    /// Seconds a UI session lasts after sign-in (at least 60). Sessions live in memory: a
    /// restart signs everyone out.
    pub session_ttl_secs: u64,
    /// Most UI sessions at once (at least 1); signing in beyond it ends the oldest session.
    pub max_sessions: usize,
}

impl Default for UiConfig {
    fn default() -> Self {
        UiConfig {
            enabled: true,
            session_ttl_secs: 8 * 3600,
            max_sessions: 10_000,
        }
    }
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`. Levels come from `RUST_LOG` (default `info`).
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 5000)),
            data_dir: PathBuf::from("./stowage-data"),
            catalog: CatalogConfig::default(),
            server: ServerConfig::default(),
            storage: StorageConfig::default(),
            registry: RegistryConfig::default(),
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            immutable_tags: Vec::new(),
            proxy: Vec::new(),
            spack: SpackConfig::default(),
            gc: GcConfig::default(),
            audit: AuditConfig::default(),
            log: LogConfig::default(),
            metrics: MetricsConfig::default(),
            ui: UiConfig::default(),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: Backend::Fs,
            path: None,
            part_size: DEFAULT_PART_SIZE,
            upload_memory: None,
            upload_memory_wait_secs: crate::storage::memory::DEFAULT_WAIT.as_secs(),
            s3: S3Config::default(),
        }
    }
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            delete_enabled: true,
            read_only: false,
            max_manifest_size: 4 * 1024 * 1024,
            upload_timeout_secs: 24 * 3600,
            catalog_page_size: 1000,
            max_upload_sessions: 4096,
            max_upload_sessions_per_user: 1024,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
        }
    }
}

/// Values given on the command line, applied last.
#[derive(Debug, Default, Serialize)]
pub struct CliOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
}

/// The names of the top-level settings and sections (`listen`, `storage`, …).
fn top_level_keys() -> Vec<String> {
    match serde_json::to_value(Config::default()) {
        Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

/// Default `storage.part_size`.
pub const DEFAULT_PART_SIZE: usize = 8 * 1024 * 1024;

/// Bounds of `storage.part_size`: each upload in progress holds about three parts in memory.
const MIN_PART_SIZE: usize = 64 * 1024;
const MAX_PART_SIZE: usize = 1024 * 1024 * 1024;
/// Most concurrent password verifications: 1,024 × 19 MiB is already 19 GiB.
const MAX_CONCURRENT_HASHES: u32 = 1024;

impl Config {
    /// Loads the layered configuration.
    pub fn load(file: Option<&Path>, cli: CliOverrides) -> Result<Config, Box<figment::Error>> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            fig = fig.merge(Toml::file_exact(file));
        }
        // Only variables that name a setting are read: other STOWAGE_* variables in the
        // environment (a test harness's, a wrapper script's) are none of the server's business.
        let sections = top_level_keys();
        let env = Env::prefixed("STOWAGE_").split("__").filter(move |key| {
            let key = key.as_str().to_ascii_lowercase();
            let key = key.as_str();
            sections.iter().any(|s| {
                key == s
                    || key
                        .strip_prefix(s.as_str())
                        .is_some_and(|rest| rest.starts_with("__") || rest.starts_with('.'))
            })
        });
        let config: Config = fig
            .merge(env)
            .merge(Serialized::defaults(cli))
            .extract()
            .map_err(Box::new)?;
        config.validate().map_err(|e| Box::new(figment::Error::from(e)))?;
        Ok(config)
    }

    /// Checks the settings a type cannot express.
    fn validate(&self) -> Result<(), String> {
        self.catalog.validate()?;
        if self.metrics.listen.is_some_and(|m| m == self.listen) {
            return Err("metrics.listen must differ from listen (leave it out to serve /metrics on listen)".to_owned());
        }
        if self.audit.retention_days > MAX_PERIOD_SECS / 86_400 {
            return Err("audit.retention_days must be at most 36500 (100 years); 0 keeps rows forever".to_owned());
        }
        if self.gc.interval_secs == 0 {
            return Err("gc.interval_secs must be at least 1".to_owned());
        }
        if self.gc.orphan_interval_secs == 0 {
            return Err("gc.orphan_interval_secs must be at least 1".to_owned());
        }
        if self.ui.session_ttl_secs < 60 {
            return Err("ui.session_ttl_secs must be at least 60".to_owned());
        }
        if self.ui.max_sessions == 0 {
            return Err("ui.max_sessions must be at least 1".to_owned());
        }
        if self.gc.keep_list_max_secs == 0 {
            return Err("gc.keep_list_max_secs must be at least 1".to_owned());
        }
        for (i, rule) in self.gc.retention.iter().enumerate() {
            rule.validate(i)?;
        }
        let server = &self.server;
        for (key, secs) in [
            ("server.request_head_timeout_secs", server.request_head_timeout_secs),
            ("server.keep_alive_secs", server.keep_alive_secs),
            ("server.body_idle_timeout_secs", server.body_idle_timeout_secs),
            ("server.small_body_timeout_secs", server.small_body_timeout_secs),
        ] {
            if secs == 0 {
                return Err(format!("{key} must be at least 1"));
            }
        }
        let part = self.storage.part_size;
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&part) {
            return Err(format!(
                "storage.part_size must be between {MIN_PART_SIZE} (64 KiB) and {MAX_PART_SIZE} (1 GiB) bytes, not {part}"
            ));
        }
        // On S3 two parts at least, so that one upload can fill a part while another is
        // written; on local disk a few reservation steps (parts there need not be whole).
        let memory = self.storage.upload_memory();
        match self.storage.backend {
            Backend::Fs if memory < crate::storage::memory::MIN_LOCAL_BYTES => {
                return Err(format!(
                    "storage.upload_memory must be at least {} bytes (512 KiB) with the fs backend, not {memory}",
                    crate::storage::memory::MIN_LOCAL_BYTES
                ));
            }
            Backend::S3 if memory < 2 * part.max(crate::storage::staging::S3_MIN_PART) => {
                return Err(format!(
                    "storage.upload_memory must be at least two parts ({} bytes with this part size) with the s3 backend, not {memory}",
                    2 * part.max(crate::storage::staging::S3_MIN_PART)
                ));
            }
            _ => {}
        }
        if self.storage.upload_memory_wait_secs == 0 {
            return Err("storage.upload_memory_wait_secs must be at least 1".to_owned());
        }
        let auth = &self.auth;
        if auth.max_failed_logins == 0 {
            return Err("auth.max_failed_logins must be at least 1".to_owned());
        }
        if auth.failed_login_backoff_secs == 0 || auth.failed_login_backoff_max_secs < auth.failed_login_backoff_secs {
            return Err(format!(
                "auth.failed_login_backoff_secs must be at least 1 and at most auth.failed_login_backoff_max_secs, not {} (max {})",
                auth.failed_login_backoff_secs, auth.failed_login_backoff_max_secs
            ));
        }
        if !(1..=MAX_CONCURRENT_HASHES).contains(&auth.max_concurrent_hashes) {
            return Err(format!(
                "auth.max_concurrent_hashes must be between 1 and {MAX_CONCURRENT_HASHES} (each verification holds 19 MiB), not {}",
                auth.max_concurrent_hashes
            ));
        }
        crate::auth::ImmutableTags::validate(&self.immutable_tags)?;
        ProxyConfig::validate_all(&self.proxy)?;
        // Only the server's own collection passes can apply a cap while it serves: a real
        // `stowage gc` refuses to run beside a running server.
        if !self.gc.enabled
            && let Some(i) = self.proxy.iter().position(|p| p.max_size.is_some())
        {
            return Err(format!(
                "proxy[{i}].max_size needs gc.enabled = true: the server's collection passes evict \
                 the cache down to the cap, and a real `stowage gc` does not run while the server is up"
            ));
        }
        self.spack.validate(&self.proxy)?;
        crate::auth::bootstrap::validate(auth)?;
        Ok(())
    }

    /// Root of the `fs` storage backend.
    pub fn storage_path(&self) -> PathBuf {
        self.storage
            .path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("storage"))
    }

    /// Path of the SQLite catalog.
    pub fn catalog_path(&self) -> PathBuf {
        self.data_dir.join("catalog.db")
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail API returns its own large error type
mod tests {
    use super::*;

    // Every test that loads a configuration runs inside a figment `Jail`: jails run one at a
    // time, so no test sees another's environment variables.

    #[test]
    fn example_file_parses_to_the_defaults() {
        figment::Jail::expect_with(|_| {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("stowage.example.toml");
            let from_file = Config::load(Some(&path), CliOverrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(
                toml::to_string(&from_file).ok(),
                toml::to_string(&Config::default()).ok()
            );
            Ok(())
        });
    }

    #[test]
    fn audit_retention_is_read_and_bounded() {
        figment::Jail::expect_with(|jail| {
            assert_eq!(Config::default().audit.retention_days, 365);
            jail.set_env("STOWAGE_AUDIT__RETENTION_DAYS", "0");
            let forever = Config::load(None, CliOverrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(forever.audit.retention_days, 0);
            jail.set_env("STOWAGE_AUDIT__RETENTION_DAYS", "40000");
            let err = Config::load(None, CliOverrides::default())
                .expect_err("too long")
                .to_string();
            assert!(err.contains("audit.retention_days"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn part_size_out_of_bounds_is_rejected() {
        figment::Jail::expect_with(|jail| {
            for bad in ["0", "1000", "2147483648"] {
                jail.set_env("STOWAGE_STORAGE__PART_SIZE", bad);
                let err = Config::load(None, CliOverrides::default()).expect_err(bad).to_string();
                assert!(err.contains("storage.part_size"), "{bad}: {err}");
            }
            jail.set_env("STOWAGE_STORAGE__PART_SIZE", "65536");
            let ok = Config::load(None, CliOverrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(ok.storage.part_size, 65536);
            Ok(())
        });
    }

    #[test]
    fn upload_memory_defaults_and_floors_depend_on_the_backend() {
        figment::Jail::expect_with(|jail| {
            let fs = Config::load(None, CliOverrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(fs.storage.upload_memory, None);
            assert_eq!(fs.storage.upload_memory(), 8 * 1024 * 1024);
            // The fs default is 8 MiB up to the default part size, then two parts.
            for (part, budget) in [
                (65536, 8 * 1024 * 1024),
                (8 * 1024 * 1024, 8 * 1024 * 1024),
                (8 * 1024 * 1024 + 4096, 2 * (8 * 1024 * 1024 + 4096)),
                (64 * 1024 * 1024, 128 * 1024 * 1024),
            ] {
                jail.set_env("STOWAGE_STORAGE__PART_SIZE", part.to_string());
                let ok = Config::load(None, CliOverrides::default()).map_err(|e| e.to_string())?;
                assert_eq!(ok.storage.upload_memory, None);
                assert_eq!(ok.storage.upload_memory(), budget, "part size {part}");
            }
            jail.set_env("STOWAGE_STORAGE__PART_SIZE", "8388608");
            jail.set_env("STOWAGE_STORAGE__BACKEND", "s3");
            jail.set_env("STOWAGE_STORAGE__S3__BUCKET", "b");
            let s3 = Config::load(None, CliOverrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(s3.storage.upload_memory(), 256 * 1024 * 1024);
            // S3: two parts, 5 MiB at least each whatever part_size says.
            jail.set_env("STOWAGE_STORAGE__PART_SIZE", "1048576");
            jail.set_env("STOWAGE_STORAGE__UPLOAD_MEMORY", "10485759");
            let err = Config::load(None, CliOverrides::default()).expect_err("s3").to_string();
            assert!(err.contains("at least two parts (10485760 bytes"), "{err}");
            jail.set_env("STOWAGE_STORAGE__UPLOAD_MEMORY", "10485760");
            let ok = Config::load(None, CliOverrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(ok.storage.upload_memory(), 10 * 1024 * 1024);
            // Local disk, an explicit budget: a few 64 KiB steps, whatever the part size.
            jail.set_env("STOWAGE_STORAGE__BACKEND", "fs");
            jail.set_env("STOWAGE_STORAGE__PART_SIZE", "67108864");
            jail.set_env("STOWAGE_STORAGE__UPLOAD_MEMORY", "524287");
            let err = Config::load(None, CliOverrides::default())
                .expect_err("too small")
                .to_string();
            assert!(
                err.contains("storage.upload_memory must be at least 524288 bytes (512 KiB) with the fs backend"),
                "{err}"
            );
            jail.set_env("STOWAGE_STORAGE__UPLOAD_MEMORY", "524288");
            let ok = Config::load(None, CliOverrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(ok.storage.upload_memory(), 512 * 1024);
            jail.set_env("STOWAGE_STORAGE__BACKEND", "fs");
            jail.set_env("STOWAGE_STORAGE__UPLOAD_MEMORY_WAIT_SECS", "0");
            let err = Config::load(None, CliOverrides::default())
                .expect_err("wait")
                .to_string();
            assert!(err.contains("storage.upload_memory_wait_secs"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn login_limits_are_validated() {
        figment::Jail::expect_with(|jail| {
            for (key, bad) in [
                ("STOWAGE_AUTH__MAX_CONCURRENT_HASHES", "0"),
                ("STOWAGE_AUTH__MAX_CONCURRENT_HASHES", "5000"),
                ("STOWAGE_AUTH__MAX_FAILED_LOGINS", "0"),
                ("STOWAGE_AUTH__FAILED_LOGIN_BACKOFF_SECS", "0"),
                ("STOWAGE_AUTH__FAILED_LOGIN_BACKOFF_SECS", "600"),
            ] {
                jail.clear_env();
                jail.set_env(key, bad);
                let err = Config::load(None, CliOverrides::default()).expect_err(bad).to_string();
                let setting = key.trim_start_matches("STOWAGE_AUTH__").to_ascii_lowercase();
                assert!(err.contains(&format!("auth.{setting}")), "{key}={bad}: {err}");
            }
            jail.clear_env();
            jail.set_env("STOWAGE_AUTH__MAX_CONCURRENT_HASHES", "2");
            let ok = Config::load(None, CliOverrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(ok.auth.max_concurrent_hashes, 2);
            Ok(())
        });
    }

    #[test]
    fn ui_settings_are_read_and_validated() {
        figment::Jail::expect_with(|jail| {
            for (key, bad) in [("SESSION_TTL_SECS", "59"), ("MAX_SESSIONS", "0")] {
                jail.clear_env();
                jail.set_env(format!("STOWAGE_UI__{key}"), bad);
                let err = Config::load(None, CliOverrides::default()).expect_err(bad).to_string();
                assert!(
                    err.contains(&format!("ui.{}", key.to_ascii_lowercase())),
                    "{key}={bad}: {err}"
                );
            }
            jail.clear_env();
            jail.create_file("ui.toml", "[ui]\nenabled = false\nsession_ttl_secs = 600\n")?;
            jail.set_env("STOWAGE_UI__MAX_SESSIONS", "5");
            let c = Config::load(Some(Path::new("ui.toml")), CliOverrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(
                (c.ui.enabled, c.ui.session_ttl_secs, c.ui.max_sessions),
                (false, 600, 5)
            );
            Ok(())
        });
    }

    #[test]
    fn zero_timeouts_are_rejected() {
        figment::Jail::expect_with(|jail| {
            for key in [
                "REQUEST_HEAD_TIMEOUT_SECS",
                "KEEP_ALIVE_SECS",
                "BODY_IDLE_TIMEOUT_SECS",
                "SMALL_BODY_TIMEOUT_SECS",
            ] {
                jail.clear_env();
                jail.set_env(format!("STOWAGE_SERVER__{key}"), "0");
                let err = Config::load(None, CliOverrides::default()).expect_err(key).to_string();
                assert!(
                    err.contains(&format!("server.{}", key.to_ascii_lowercase())),
                    "{key}: {err}"
                );
            }
            jail.clear_env();
            jail.set_env("STOWAGE_SERVER__MAX_CONNECTIONS", "500");
            jail.set_env("STOWAGE_SERVER__BODY_IDLE_TIMEOUT_SECS", "5");
            let c = Config::load(None, CliOverrides::default()).map_err(|e| e.to_string())?;
            assert_eq!((c.server.max_connections, c.server.body_idle_timeout_secs), (500, 5));
            Ok(())
        });
    }

    #[test]
    fn retention_rules_parse_and_are_validated() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "ok.toml",
                r#"
                [[gc.retention]]
                repositories = ["spack/**"]
                keep_last = 3
                keep_pushed_within = "2w"
                keep_pulled_within = 86400
                keep_tags = ["release-*"]
                dry_run = true
                "#,
            )?;
            let c = Config::load(Some(Path::new("ok.toml")), CliOverrides::default()).map_err(|e| e.to_string())?;
            let rule = &c.gc.retention[0];
            assert_eq!(rule.keep_last, Some(3));
            assert_eq!(rule.keep_pushed_within.map(Period::secs), Some(14 * 86_400));
            assert_eq!(rule.keep_pulled_within.map(Period::secs), Some(86_400));
            assert!(rule.dry_run && rule.keep_tags[0].matches("release-1.0"));
            // check-config prints it back in a form that loads again.
            let printed = toml::to_string(&c).map_err(|e| e.to_string())?;
            jail.create_file("again.toml", &printed)?;
            let again =
                Config::load(Some(Path::new("again.toml")), CliOverrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(again.gc.retention, c.gc.retention);

            for (body, says) in [
                ("repositories = [\"a\"]", "needs at least one of keep_last"),
                ("repositories = [\"a\"]\nkeep_last = 0", "keep_last must be at least 1"),
                ("repositories = []\nkeep_last = 1", "repositories must list"),
                ("repositories = [\"a\"]\nkeep_pushed_within = \"9x\"", "invalid period"),
                ("repositories = [\"a\"]\nkeep_pushed_within = 0", "between 1 s"),
                ("repositories = [\"a\"]\nkeep_pushed_within = \"d\"", "invalid period"),
                ("repositories = [\"a\"]\nkeep_lats = 1", "unknown field"),
            ] {
                jail.create_file("bad.toml", &format!("[[gc.retention]]\n{body}\n"))?;
                let err = Config::load(Some(Path::new("bad.toml")), CliOverrides::default())
                    .expect_err(body)
                    .to_string();
                assert!(err.contains(says), "{body}: {err}");
            }
            Ok(())
        });
    }

    #[test]
    fn periods_parse_and_print() {
        for (text, secs) in [
            ("45", 45),
            ("45s", 45),
            ("30m", 1800),
            ("12h", 43_200),
            ("90d", 7_776_000),
            ("2w", 1_209_600),
        ] {
            assert_eq!(Period::parse(text).map(Period::secs), Ok(secs), "{text}");
        }
        assert_eq!(Period::parse("90d").map(|p| p.to_string()), Ok("90d".to_owned()));
        assert_eq!(Period::parse("61").map(|p| p.to_string()), Ok("61s".to_owned()));
        for bad in ["", "h", "1y", "-1d", "1.5d", "99999999999999999999d"] {
            assert!(Period::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "[registry]\ndelete_enabeld = false\n")?;
            assert!(Config::load(Some(Path::new("bad.toml")), CliOverrides::default()).is_err());
            Ok(())
        });
    }

    #[test]
    fn immutable_tag_rules_are_read_and_validated() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "ok.toml",
                "[[immutable_tags]]\nrepositories = [\"prod/**\"]\ntags = [\"v*\"]\n\n\
                 [[immutable_tags]]\nrepositories = [\"spack/*\"]\n",
            )?;
            let c = Config::load(Some(Path::new("ok.toml")), CliOverrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(c.immutable_tags.len(), 2);
            assert_eq!(c.immutable_tags[0].tags[0].as_str(), "v*");
            assert_eq!(c.immutable_tags[1].tags[0].as_str(), "*");
            for (bad, expect) in [
                ("[[immutable_tags]]\nrepositories = []\n", "immutable_tags rule 1"),
                (
                    "[[immutable_tags]]\nrepositories = [\"a\"]\ntags = []\n",
                    "immutable_tags rule 1",
                ),
                (
                    "[[immutable_tags]]\nrepositories = [\"a\"]\ntags = [\"v/1\"]\n",
                    "tag pattern",
                ),
                ("[[immutable_tags]]\nrepository = [\"a\"]\n", "repository"),
            ] {
                jail.create_file("bad.toml", bad)?;
                let err = Config::load(Some(Path::new("bad.toml")), CliOverrides::default())
                    .expect_err(bad)
                    .to_string();
                assert!(err.contains(expect), "{bad}: {err}");
            }
            Ok(())
        });
    }

    #[test]
    fn sizes_parse_with_units() {
        for (text, bytes) in [
            ("1024", 1024),
            ("1B", 1),
            ("3 KB", 3000),
            ("2kib", 2048),
            ("500MB", 500_000_000),
            ("50GiB", 50 << 30),
            ("1TB", 1_000_000_000_000),
            ("2TiB", 2 << 40),
        ] {
            assert_eq!(ByteSize::parse(text).map(ByteSize::bytes), Ok(bytes), "{text}");
        }
        for text in ["", "GiB", "1.5GiB", "0", "10 GiBs", "1e9"] {
            assert!(ByteSize::parse(text).is_err(), "{text}");
        }
        assert_eq!(ByteSize::parse("50GiB").unwrap().to_string(), "50GiB");
        assert_eq!(ByteSize::parse("1000").unwrap().to_string(), "1000B");
    }

    #[test]
    fn spack_merge_entries_are_read_and_validated() {
        figment::Jail::expect_with(|jail| {
            let proxy = "[[proxy]]\nprefix = \"up/\"\nurl = \"https://r.example\"\n";
            jail.create_file(
                "ok.toml",
                &format!("{proxy}\n[[spack.merge]]\nrepository = \"site/cache\"\nfallbacks = [\"up/a\", \"up/b\"]\n"),
            )?;
            let c = Config::load(Some(Path::new("ok.toml")), CliOverrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(c.spack.merge.len(), 1);
            assert_eq!(c.spack.merge[0].repository, "site/cache");
            assert_eq!(c.spack.merge[0].fallbacks, ["up/a", "up/b"]);
            let printed = toml::to_string(&c).map_err(|e| e.to_string())?;
            jail.create_file("again.toml", &printed)?;
            let again =
                Config::load(Some(Path::new("again.toml")), CliOverrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(again.spack, c.spack);
            for (body, says) in [
                (
                    "repository = \"up/x\"\nfallbacks = [\"up/a\"]",
                    "must be a hosted repository",
                ),
                (
                    "repository = \"site/c\"\nfallbacks = [\"other/a\"]",
                    "is not under any [[proxy]] prefix",
                ),
                ("repository = \"site/c\"\nfallbacks = []", "fallbacks is empty"),
                (
                    "repository = \"Site\"\nfallbacks = [\"up/a\"]",
                    "not a valid repository name",
                ),
                (
                    "repository = \"site/c\"\nfallbacks = [\"up/A\"]",
                    "not a valid repository name",
                ),
                ("repository = \"site/c\"\nfallbacks = [\"up/a\", \"up/a\"]", "twice"),
                (
                    "repository = \"site/c\"\nfallbacks = [\"up/a\"]\n[[spack.merge]]\nrepository = \"site/c\"\nfallbacks = [\"up/b\"]",
                    "named by two",
                ),
                (
                    "repository = \"site/c\"\nfallbacks = [\"up/a\"]\nextra = 1",
                    "unknown field",
                ),
            ] {
                jail.create_file("bad.toml", &format!("{proxy}\n[[spack.merge]]\n{body}\n"))?;
                let err = Config::load(Some(Path::new("bad.toml")), CliOverrides::default())
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                assert!(err.contains(says), "{body:?}: {err}");
            }
            Ok(())
        });
    }

    #[test]
    fn proxy_entries_are_read_and_validated() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "ok.toml",
                r#"
                [[proxy]]
                prefix = "dockerhub/"
                url = "https://registry-1.docker.io"
                username = "me"
                password_env = "HUB_TOKEN"
                tag_ttl = "10m"
                max_size = "50GiB"

                [[proxy]]
                prefix = "ghcr/"
                url = "http://127.0.0.1:5001/"
                ca_file = "/etc/ssl/ca.pem"
                "#,
            )?;
            let c = Config::load(Some(Path::new("ok.toml")), CliOverrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(c.proxy.len(), 2);
            assert_eq!(c.proxy[0].tag_ttl.secs(), 600);
            assert_eq!(c.proxy[0].miss_ttl.secs(), 30);
            assert_eq!(c.proxy[0].password_env.as_deref(), Some("HUB_TOKEN"));
            assert_eq!(c.proxy[1].tag_ttl.secs(), 300);
            assert_eq!(c.proxy[0].max_size.map(ByteSize::bytes), Some(50 << 30));
            assert_eq!(c.proxy[1].max_size, None);
            assert_eq!(c.proxy[1].max_spack_index_size.bytes(), 1 << 30);
            assert_eq!(c.proxy[1].timeout_secs, 30);
            assert_eq!(c.proxy[1].max_concurrent_requests, 16);
            assert!(!c.proxy[1].insecure_skip_verify);
            assert_eq!(c.proxy[0].namespaces(), ["registry-1.docker.io", "docker.io"]);
            assert_eq!(c.proxy[1].namespaces(), ["127.0.0.1:5001"]);
            // check-config prints it back in a form that loads again.
            let printed = toml::to_string(&c).map_err(|e| e.to_string())?;
            jail.create_file("again.toml", &printed)?;
            let again =
                Config::load(Some(Path::new("again.toml")), CliOverrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(again.proxy, c.proxy);

            let url = "url = \"https://r.example\"";
            for (body, says) in [
                (format!("prefix = \"hub\"\n{url}"), "proxy[0].prefix must be"),
                (format!("prefix = \"/\"\n{url}"), "proxy[0].prefix must be"),
                (format!("prefix = \"Hub/\"\n{url}"), "proxy[0].prefix must be"),
                (
                    "prefix = \"hub/\"\nurl = \"ftp://x\"".to_owned(),
                    "proxy[0].url must be",
                ),
                (
                    "prefix = \"hub/\"\nurl = \"https://x/v2\"".to_owned(),
                    "proxy[0].url must be",
                ),
                (
                    format!("prefix = \"hub/\"\n{url}\nusername = \"u\""),
                    "needs password_file",
                ),
                (
                    format!("prefix = \"hub/\"\n{url}\npassword_env = \"P\""),
                    "needs a username",
                ),
                (
                    format!("prefix = \"hub/\"\n{url}\nusername = \"u\"\npassword_env = \"P\"\npassword_file = \"f\""),
                    "not both",
                ),
                (
                    format!("prefix = \"hub/\"\n{url}\npassword = \"secret\""),
                    "unknown field",
                ),
                (format!("prefix = \"hub/\"\n{url}\ntag_ttl = 0"), "between 1 s"),
                (format!("prefix = \"hub/\"\n{url}\nmiss_ttl = 0"), "between 1 s"),
                (format!("prefix = \"hub/\"\n{url}\nmax_size = 0"), "between 1 byte"),
                (
                    format!("prefix = \"hub/\"\n{url}\nmax_spack_index_size = 0"),
                    "between 1 byte",
                ),
                (
                    format!("prefix = \"hub/\"\n{url}\nmax_size = \"5 parsecs\""),
                    "invalid size",
                ),
                (format!("prefix = \"hub/\"\n{url}\nmax_size = \"-1GB\""), "invalid size"),
                (
                    format!("prefix = \"hub/\"\n{url}\nmax_size = \"99999999TiB\""),
                    "too large",
                ),
                (format!("prefix = \"hub/\"\n{url}\ntimeout_secs = 0"), "timeout_secs"),
                (
                    format!("prefix = \"hub/\"\n{url}\n\n[[proxy]]\nprefix = \"hub/lib/\"\n{url}"),
                    "overlap",
                ),
                (
                    format!("prefix = \"a/\"\n{url}\n\n[[proxy]]\nprefix = \"b/\"\n{url}"),
                    "both answer for namespace \"r.example\"",
                ),
                (
                    format!(
                        "prefix = \"a/\"\n{url}\nnamespaces = [\"docker.io\"]\n\n[[proxy]]\nprefix = \"b/\"\n\
                         url = \"https://registry-1.docker.io\""
                    ),
                    "both answer for namespace \"docker.io\"",
                ),
                (
                    format!("prefix = \"a/\"\n{url}\nnamespaces = [\"docker.io/x\"]"),
                    "namespaces must hold registry host names",
                ),
                (
                    format!("prefix = \"hub/\"\n{url}\nmax_size = \"1GiB\"\n\n[gc]\nenabled = false"),
                    "proxy[0].max_size needs gc.enabled = true",
                ),
            ] {
                jail.create_file("bad.toml", &format!("[[proxy]]\n{body}\n"))?;
                let err = Config::load(Some(Path::new("bad.toml")), CliOverrides::default())
                    .expect_err(&body)
                    .to_string();
                assert!(err.contains(says), "{body}: {err}");
            }
            // The same host twice is fine once one entry names its namespaces.
            jail.create_file(
                "twice.toml",
                "[[proxy]]\nprefix = \"a/\"\nurl = \"https://r.example\"\n\n\
                 [[proxy]]\nprefix = \"b/\"\nurl = \"https://r.example\"\nnamespaces = []\n",
            )?;
            let c = Config::load(Some(Path::new("twice.toml")), CliOverrides::default()).map_err(|e| e.to_string())?;
            assert!(c.proxy[1].namespaces().is_empty());
            Ok(())
        });
    }

    #[test]
    fn environment_overrides_and_unrelated_variables_are_ignored() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("STOWAGE_LISTEN", "127.0.0.1:6000");
            jail.set_env("STOWAGE_REGISTRY__DELETE_ENABLED", "false");
            jail.set_env("STOWAGE_TEST_LOG", "debug");
            let c = Config::load(None, CliOverrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(c.listen.port(), 6000);
            assert!(!c.registry.delete_enabled);
            Ok(())
        });
    }

    #[test]
    fn default_namespaces_come_from_the_parsed_url() {
        let entry = |url: &str| toml::from_str::<ProxyConfig>(&format!("prefix = \"p/\"\nurl = {url:?}")).unwrap();
        assert_eq!(entry("https://Ghcr.io").namespaces(), ["ghcr.io"]);
        assert_eq!(entry("https://ghcr.io:443").namespaces(), ["ghcr.io"]);
        assert_eq!(entry("http://host:80/").namespaces(), ["host"]);
        assert_eq!(entry("https://host:8443/").namespaces(), ["host:8443"]);
        assert_eq!(entry("http://host:443").namespaces(), ["host:443"]);
        assert_eq!(entry("https://host/some/path").namespaces(), ["host"]);
        assert_eq!(entry("http://[::1]:5000").namespaces(), ["[::1]:5000"]);
        assert_eq!(
            entry("https://registry-1.docker.io:443/").namespaces(),
            ["registry-1.docker.io", "docker.io"]
        );
        assert!(entry("not a url").namespaces().is_empty());
    }
}

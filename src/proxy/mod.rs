//! The client side of pull-through caching: speaking to `[[proxy]]` upstream registries as an
//! OCI client does. What is cached, when, and how concurrent pulls share a fetch is the
//! registry service's business (`registry::proxy`); this module only fetches.
//!
//! The exchange with an upstream, per request:
//!
//! ```text
//! GET /v2/library/alpine/manifests/3.20            (with a cached token for the scope, if any)
//! ← 401  WWW-Authenticate: Bearer realm="https://auth.example/token",service="reg",scope="repository:library/alpine:pull"
//! GET https://auth.example/token?service=reg&scope=repository:library/alpine:pull
//!     (Authorization: Basic … when the entry has credentials)
//! ← 200  {"token":"…","expires_in":300}
//! GET /v2/library/alpine/manifests/3.20            Authorization: Bearer …   (retried once)
//! ```
//!
//! A `Basic` challenge is answered with the configured credentials. Tokens are cached per
//! (upstream, scope) until shortly before they expire. Redirects (to blob storage) are
//! followed, at most [`MAX_REDIRECTS`], and the `Authorization` header is not sent to another
//! host. Each request waits for one of the upstream's `max_concurrent_requests` permits, held
//! until its response body is consumed or dropped; connecting and every read are bounded by
//! `timeout_secs`.
//!
//! Invariants: upstream credentials and tokens never leave this module except in requests to
//! the upstream and its token realm, and are never logged. Every failure is an
//! [`UpstreamError`] (a 404 is `Ok(None)`), which the HTTP edge answers 502 `UNAVAILABLE`, or
//! 429 `TOOMANYREQUESTS` for a rate-limited upstream.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, TryStreamExt};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::ProxyConfig;
use crate::oci::{Digest, Reference, RepoName, media};

/// Redirects followed for one request.
pub const MAX_REDIRECTS: usize = 5;

/// Largest token response read.
const TOKEN_RESPONSE_LIMIT: usize = 64 * 1024;

/// Lifetime assumed for a token whose response names none (the spec's default is 60 s).
const DEFAULT_TOKEN_SECS: u64 = 60;

/// A cached token is dropped this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(10);

/// Most tokens cached per upstream (one per repository pulled); beyond it expired ones are
/// dropped, and if none has expired the cache is emptied.
const MAX_CACHED_TOKENS: usize = 10_000;

/// The manifest media types asked for, most preferred first.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// Why an upstream could not serve a request. Its `Display` is what clients are told: it names
/// the upstream's URL, never its credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("the upstream registry {upstream} could not be reached: {reason}")]
    Unreachable { upstream: String, reason: String },
    #[error("the upstream registry {upstream} is rate-limiting this registry; try again later")]
    RateLimited { upstream: String },
    #[error("the upstream registry {upstream} refused this registry's credentials")]
    Refused { upstream: String },
    #[error("the upstream registry {upstream} answered with status {status}")]
    Failed { upstream: String, status: u16 },
    #[error(
        "the upstream registry {upstream} served content that does not match digest {expected}; nothing was cached"
    )]
    DigestMismatch { upstream: String, expected: Digest },
    #[error("the upstream registry {upstream} served an invalid response: {reason}")]
    Invalid { upstream: String, reason: String },
}

impl UpstreamError {
    /// The `outcome` label of `stowage_proxy_upstream_requests`.
    fn outcome(&self) -> &'static str {
        match self {
            UpstreamError::Unreachable { .. } => "unreachable",
            UpstreamError::RateLimited { .. } => "rate_limited",
            UpstreamError::Refused { .. } => "unauthorized",
            _ => "error",
        }
    }
}

/// Every configured upstream, matched by repository prefix, or by namespace for containerd's
/// mirror form (`?ns=docker.io`).
#[derive(Default, Debug)]
pub struct Proxies {
    upstreams: Vec<Arc<Upstream>>,
    /// Prefix by namespace (unique across entries: checked in `config`).
    namespaces: HashMap<String, String>,
}

impl Proxies {
    /// Builds a client per entry, reading passwords from their files or variables.
    pub fn from_config(entries: &[ProxyConfig]) -> Result<Proxies, String> {
        let upstreams = entries
            .iter()
            .map(|e| Upstream::new(e).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let namespaces = entries
            .iter()
            .flat_map(|e| e.namespaces().into_iter().map(|ns| (ns, e.prefix.clone())))
            .collect();
        Ok(Proxies { upstreams, namespaces })
    }

    /// The prefix of the entry mirroring registry `namespace` (a `?ns=` value, any case).
    pub fn prefix_for_namespace(&self, namespace: &str) -> Option<&str> {
        self.namespaces.get(&namespace.to_ascii_lowercase()).map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    /// The upstream serving `repo`, with the repository's name there; `None` for a hosted
    /// repository. Prefixes do not overlap (checked in `config`), so at most one matches.
    pub fn route(&self, repo: &RepoName) -> Option<(Arc<Upstream>, String)> {
        self.upstreams.iter().find_map(|u| {
            repo.as_str()
                .strip_prefix(u.prefix.as_str())
                .filter(|rest| !rest.is_empty())
                .map(|rest| (u.clone(), rest.to_owned()))
        })
    }
}

/// One upstream registry and the state of the conversation with it.
pub struct Upstream {
    /// The repository prefix it is mirrored under (the metrics' `upstream` label).
    prefix: String,
    /// Base URL without a trailing `/`.
    base: String,
    client: reqwest::Client,
    /// User name and password, sent only to the upstream and its token realm.
    credentials: Option<(String, String)>,
    /// `Authorization` values by scope, with when they stop being used.
    tokens: Mutex<HashMap<String, (String, Instant)>>,
    permits: Arc<Semaphore>,
    tag_ttl: Duration,
    /// Requests the upstream answered 404 lately (see [`Misses`]), and for how long each is
    /// remembered.
    misses: Mutex<Misses>,
    miss_ttl: Duration,
    /// Largest upstream `index.spack` blob merged (see `registry::proxy::spack`).
    max_spack_index_size: u64,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("prefix", &self.prefix)
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// Most upstream 404s remembered per upstream (about 150 bytes each).
const MAX_MISSES: usize = 10_000;

/// Upstream 404s, by `<repository>/<path>`, with when each was answered: a puller asking again
/// and again for a manifest or blob the upstream does not have (a tag not pushed yet, a
/// digest a client made up, a Spack client `HEAD`ing every blob before a push into a hosted
/// repository with fallbacks) costs one upstream request per `miss_ttl`, not one per request.
/// Bounded: past [`MAX_MISSES`] the oldest is forgotten first. A hit that the upstream gains
/// meanwhile is seen once the entry expires.
#[derive(Default)]
struct Misses {
    at: HashMap<String, Instant>,
    /// Insertion order, for forgetting the oldest (an entry re-inserted stands here twice; the
    /// stale one is skipped when it comes up).
    order: std::collections::VecDeque<(String, Instant)>,
}

impl Misses {
    fn fresh(&mut self, key: &str, ttl: Duration) -> bool {
        match self.at.get(key) {
            Some(at) if at.elapsed() < ttl => true,
            Some(_) => {
                self.at.remove(key);
                false
            }
            None => false,
        }
    }

    fn insert(&mut self, key: String, now: Instant) {
        self.at.insert(key.clone(), now);
        self.order.push_back((key, now));
        while self.order.len() > MAX_MISSES {
            if let Some((old, at)) = self.order.pop_front()
                && self.at.get(&old) == Some(&at)
            {
                self.at.remove(&old);
            }
        }
    }
}

/// A successful upstream response, holding its concurrency permit until dropped.
pub struct Fetched {
    response: reqwest::Response,
    permit: OwnedSemaphorePermit,
}

/// A blob response being read: its bytes, the length the upstream announced
/// (`Content-Length`, when it sent one) and the request's concurrency permit.
pub struct UpstreamBlob {
    pub length: Option<u64>,
    pub body: std::pin::Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>,
    pub permit: Arc<OwnedSemaphorePermit>,
}

/// A manifest as the upstream served it, checked against its digest.
pub struct UpstreamManifest {
    pub digest: Digest,
    pub content_type: Option<String>,
    pub body: Bytes,
}

fn read_password(entry: &ProxyConfig) -> Result<Option<String>, String> {
    let at = format!("proxy {:?}", entry.prefix);
    if let Some(path) = &entry.password_file {
        let text = std::fs::read_to_string(Path::new(path))
            .map_err(|e| format!("{at}: reading password_file {}: {e}", path.display()))?;
        return Ok(Some(text.trim_end_matches(['\r', '\n']).to_owned()));
    }
    if let Some(var) = &entry.password_env {
        let value = std::env::var(var).map_err(|_| format!("{at}: environment variable {var} is not set"))?;
        return Ok(Some(value));
    }
    Ok(None)
}

impl Upstream {
    fn new(entry: &ProxyConfig) -> Result<Upstream, String> {
        let at = format!("proxy {:?}", entry.prefix);
        let timeout = Duration::from_secs(entry.timeout_secs);
        let mut builder = reqwest::Client::builder()
            .connect_timeout(timeout)
            .read_timeout(timeout)
            .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS))
            .user_agent(concat!("stowage/", env!("CARGO_PKG_VERSION"), " (pull-through cache)"));
        if let Some(ca) = &entry.ca_file {
            let pem = std::fs::read(ca).map_err(|e| format!("{at}: reading ca_file {}: {e}", ca.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("{at}: ca_file {} holds no usable certificate: {e}", ca.display()))?;
            builder = builder.tls_certs_merge(certs);
        }
        if entry.insecure_skip_verify {
            tracing::warn!(upstream = %entry.prefix, "TLS certificates of this upstream are not verified");
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        let client = builder.build().map_err(|e| format!("{at}: {e}"))?;
        let credentials = match (&entry.username, read_password(entry)?) {
            (Some(user), Some(password)) => Some((user.clone(), password)),
            _ => None,
        };
        Ok(Upstream {
            prefix: entry.prefix.clone(),
            base: entry.url.trim_end_matches('/').to_owned(),
            client,
            credentials,
            tokens: Mutex::new(HashMap::new()),
            permits: Arc::new(Semaphore::new(entry.max_concurrent_requests)),
            tag_ttl: Duration::from_secs(entry.tag_ttl.secs()),
            misses: Mutex::new(Misses::default()),
            miss_ttl: Duration::from_secs(entry.miss_ttl.secs()),
            max_spack_index_size: entry.max_spack_index_size.bytes(),
        })
    }

    /// The upstream's base URL (named in error messages).
    pub fn url(&self) -> &str {
        &self.base
    }

    /// The prefix this upstream is mirrored under.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// How long a proxied tag is served before it is checked again.
    pub fn tag_ttl(&self) -> Duration {
        self.tag_ttl
    }

    /// Largest upstream Spack index blob that is read to be merged.
    pub fn max_spack_index_size(&self) -> u64 {
        self.max_spack_index_size
    }

    /// Whether `key` was answered 404 less than `miss_ttl` ago.
    fn remembered_miss(&self, key: &str) -> bool {
        let Ok(mut misses) = self.misses.lock() else {
            return false;
        };
        misses.fresh(key, self.miss_ttl)
    }

    fn remember_miss(&self, key: String) {
        if let Ok(mut misses) = self.misses.lock() {
            misses.insert(key, Instant::now());
        }
    }

    fn count(&self, outcome: &'static str) {
        crate::metrics::get()
            .upstream_requests
            .get_or_create(&crate::metrics::UpstreamLabels {
                upstream: self.prefix.clone(),
                outcome,
            })
            .inc();
    }

    fn failed(&self, e: UpstreamError) -> UpstreamError {
        self.count(e.outcome());
        e
    }

    fn unreachable(&self, e: &reqwest::Error) -> UpstreamError {
        // The chain says why (refused, timed out, TLS); the URL is the upstream's own.
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            reason.push_str(": ");
            reason.push_str(&s.to_string());
            source = s.source();
        }
        self.failed(UpstreamError::Unreachable {
            upstream: self.base.clone(),
            reason,
        })
    }

    fn invalid(&self, reason: impl Into<String>) -> UpstreamError {
        self.failed(UpstreamError::Invalid {
            upstream: self.base.clone(),
            reason: reason.into(),
        })
    }

    fn basic(&self) -> Option<String> {
        self.credentials.as_ref().map(|(user, password)| {
            let raw = format!("{user}:{password}");
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
        })
    }

    fn cached_auth(&self, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock().ok()?;
        tokens
            .get(scope)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(value, _)| value.clone())
    }

    fn cache_auth(&self, scope: &str, value: String, until: Instant) {
        if let Ok(mut tokens) = self.tokens.lock() {
            if tokens.len() >= MAX_CACHED_TOKENS {
                let now = Instant::now();
                tokens.retain(|_, (_, until)| *until > now);
                if tokens.len() >= MAX_CACHED_TOKENS {
                    tokens.clear();
                }
            }
            tokens.insert(scope.to_owned(), (value, until));
        }
    }

    /// Sends a request for `path` under `/v2/<repo>/`, answering an authentication challenge
    /// once. `Ok(None)` for a 404.
    async fn send(
        &self,
        method: Method,
        repo: &str,
        path: &str,
        accept: Option<&str>,
    ) -> Result<Option<Fetched>, UpstreamError> {
        // A HEAD and a GET of the same path share their answer: absent is absent.
        let miss_key = format!("{repo}/{path}");
        if self.remembered_miss(&miss_key) {
            self.count("not_found_remembered");
            return Ok(None);
        }
        let url = format!("{}/v2/{repo}/{path}", self.base);
        let scope = format!("repository:{repo}:pull");
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| self.invalid("the upstream client is shutting down"))?;
        let mut auth = self.cached_auth(&scope);
        let mut challenged = false;
        loop {
            let mut request = self.client.request(method.clone(), &url);
            if let Some(a) = accept {
                request = request.header(ACCEPT, a);
            }
            if let Some(value) = &auth {
                request = request.header(AUTHORIZATION, value);
            }
            let response = request.send().await.map_err(|e| self.unreachable(&e))?;
            let status = response.status();
            match status {
                StatusCode::UNAUTHORIZED if !challenged => {
                    challenged = true;
                    auth = Some(self.authorize(&response, &scope).await?);
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    return Err(self.failed(UpstreamError::Refused {
                        upstream: self.base.clone(),
                    }));
                }
                StatusCode::NOT_FOUND => {
                    self.count("not_found");
                    self.remember_miss(miss_key);
                    return Ok(None);
                }
                StatusCode::TOO_MANY_REQUESTS => {
                    return Err(self.failed(UpstreamError::RateLimited {
                        upstream: self.base.clone(),
                    }));
                }
                s if s.is_success() => {
                    self.count("ok");
                    return Ok(Some(Fetched { response, permit }));
                }
                s => {
                    return Err(self.failed(UpstreamError::Failed {
                        upstream: self.base.clone(),
                        status: s.as_u16(),
                    }));
                }
            }
        }
    }

    /// Answers the challenge of a 401: a token from the realm named (Bearer), or the configured
    /// credentials (Basic). Returns the `Authorization` value to retry with.
    async fn authorize(&self, response: &reqwest::Response, scope: &str) -> Result<String, UpstreamError> {
        let refused = || UpstreamError::Refused {
            upstream: self.base.clone(),
        };
        let challenges: Vec<Challenge> = response
            .headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(Challenge::parse)
            .collect();
        if let Some(bearer) = challenges.iter().find(|c| c.scheme.eq_ignore_ascii_case("bearer")) {
            let realm = bearer
                .param("realm")
                .ok_or_else(|| self.invalid("a Bearer challenge without a realm"))?;
            if !(realm.starts_with("https://") || realm.starts_with("http://")) {
                return Err(self.invalid("a Bearer challenge whose realm is not an http(s) URL"));
            }
            let scope_asked = bearer.param("scope").unwrap_or(scope);
            let mut query = vec![("scope", scope_asked)];
            if let Some(service) = bearer.param("service") {
                query.push(("service", service));
            }
            let separator = if realm.contains('?') { '&' } else { '?' };
            let query: Vec<String> = query.iter().map(|(k, v)| format!("{k}={}", form_encode(v))).collect();
            let url = format!("{realm}{separator}{}", query.join("&"));
            let mut request = self.client.get(&url);
            if let Some(basic) = self.basic() {
                request = request.header(AUTHORIZATION, basic);
            }
            let reply = request.send().await.map_err(|e| self.unreachable(&e))?;
            match reply.status() {
                s if s.is_success() => {}
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => return Err(self.failed(refused())),
                StatusCode::TOO_MANY_REQUESTS => {
                    return Err(self.failed(UpstreamError::RateLimited {
                        upstream: self.base.clone(),
                    }));
                }
                s => {
                    return Err(self.failed(UpstreamError::Failed {
                        upstream: self.base.clone(),
                        status: s.as_u16(),
                    }));
                }
            }
            let body = read_limited(reply, TOKEN_RESPONSE_LIMIT)
                .await
                .map_err(|e| self.token_read_error(e))?;
            #[derive(serde::Deserialize)]
            struct TokenReply {
                token: Option<String>,
                access_token: Option<String>,
                expires_in: Option<u64>,
            }
            let parsed: TokenReply =
                serde_json::from_slice(&body).map_err(|e| self.invalid(format!("token response: {e}")))?;
            let token = parsed
                .token
                .or(parsed.access_token)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| self.invalid("a token response without a token"))?;
            let value = format!("Bearer {token}");
            let lifetime = Duration::from_secs(parsed.expires_in.unwrap_or(DEFAULT_TOKEN_SECS).max(1));
            if let Some(until) = Instant::now().checked_add(lifetime.saturating_sub(TOKEN_MARGIN))
                && lifetime > TOKEN_MARGIN
            {
                self.cache_auth(scope, value.clone(), until);
            }
            return Ok(value);
        }
        if challenges.iter().any(|c| c.scheme.eq_ignore_ascii_case("basic"))
            && let Some(basic) = self.basic()
        {
            // Basic credentials do not expire: keep them for the scope for a while.
            self.cache_auth(scope, basic.clone(), Instant::now() + Duration::from_secs(3600));
            return Ok(basic);
        }
        Err(self.failed(refused()))
    }

    fn token_read_error(&self, e: ReadError) -> UpstreamError {
        match e {
            ReadError::TooLarge => self.invalid("a token response larger than 64 KiB"),
            ReadError::Transport(e) => self.unreachable(&e),
        }
    }

    /// The digest the upstream's tag names now (`HEAD`), or `Ok(None)` if the tag is unknown
    /// there. `Some(None)`: it exists but the upstream did not say its digest.
    pub async fn head_manifest(&self, repo: &str, tag: &str) -> Result<Option<Option<Digest>>, UpstreamError> {
        let Some(fetched) = self
            .send(Method::HEAD, repo, &format!("manifests/{tag}"), Some(MANIFEST_ACCEPT))
            .await?
        else {
            return Ok(None);
        };
        let digest = fetched
            .response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Digest>().ok());
        drop(fetched.permit);
        Ok(Some(digest))
    }

    /// A manifest, by tag or digest, at most `limit` bytes, checked against its digest: the
    /// one asked for, else the one the upstream names (`Docker-Content-Digest`), else its
    /// SHA-256 is taken as its digest.
    pub async fn get_manifest(
        &self,
        repo: &str,
        reference: &Reference,
        limit: usize,
    ) -> Result<Option<UpstreamManifest>, UpstreamError> {
        let Some(fetched) = self
            .send(
                Method::GET,
                repo,
                &format!("manifests/{reference}"),
                Some(MANIFEST_ACCEPT),
            )
            .await?
        else {
            return Ok(None);
        };
        let headers = fetched.response.headers();
        let content_type = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned())
            .filter(|v| !v.is_empty());
        let named = headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Digest>().ok());
        let body = read_limited(fetched.response, limit).await.map_err(|e| match e {
            ReadError::TooLarge => self.invalid(format!("a manifest larger than {limit} bytes")),
            ReadError::Transport(e) => self.unreachable(&e),
        })?;
        let expected = match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(_) => named,
        };
        let digest = match expected {
            Some(expected) => {
                if expected.compute_like(&body) != expected {
                    return Err(self.failed(UpstreamError::DigestMismatch {
                        upstream: self.base.clone(),
                        expected,
                    }));
                }
                expected
            }
            None => Digest::sha256_of(&body),
        };
        Ok(Some(UpstreamManifest {
            digest,
            content_type,
            body,
        }))
    }

    /// A blob's bytes as a stream, with the length the upstream announced; `Ok(None)` if the
    /// upstream does not have it. The caller verifies the digest. The request's permit is held
    /// by the stream until it ends or is dropped, and by every clone of [`UpstreamBlob::permit`]
    /// (the tee keeps one while its spool file exists, so spools count toward
    /// `max_concurrent_requests`).
    pub async fn get_blob(&self, repo: &str, digest: &Digest) -> Result<Option<UpstreamBlob>, UpstreamError> {
        let Some(Fetched { response, permit }) = self.send(Method::GET, repo, &format!("blobs/{digest}"), None).await?
        else {
            return Ok(None);
        };
        let length = response.content_length();
        let permit = Arc::new(permit);
        let held = permit.clone();
        let upstream = self.base.clone();
        let stream = response
            .bytes_stream()
            .map_err(move |e| std::io::Error::other(format!("reading from the upstream {upstream}: {e}")))
            .inspect_ok(move |_| {
                let _held = &held;
            });
        Ok(Some(UpstreamBlob {
            length,
            body: Box::pin(stream),
            permit,
        }))
    }

    /// A blob's size as the upstream's `HEAD` gives it (`Content-Length`), without fetching it;
    /// `Ok(None)` if the upstream does not have it, `Ok(Some(None))` if it did not say the size.
    /// A `Docker-Content-Digest` naming another digest is an invalid answer.
    pub async fn head_blob(&self, repo: &str, digest: &Digest) -> Result<Option<Option<u64>>, UpstreamError> {
        let Some(fetched) = self.send(Method::HEAD, repo, &format!("blobs/{digest}"), None).await? else {
            return Ok(None);
        };
        let headers = fetched.response.headers();
        let named = headers.get("docker-content-digest").and_then(|v| v.to_str().ok());
        if let Some(named) = named
            && named != digest.to_string()
        {
            return Err(self.invalid(format!("HEAD of blob {digest} named the digest {named:?}")));
        }
        // `content_length()` is the body's length, which a HEAD does not have: read the header.
        let size = headers
            .get(reqwest::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        Ok(Some(size))
    }

    /// The media types a manifest of this upstream may be stored as.
    pub fn accepts(content_type: Option<&str>) -> bool {
        matches!(
            content_type,
            None | Some(media::OCI_MANIFEST | media::OCI_INDEX | media::DOCKER_MANIFEST | media::DOCKER_LIST)
        )
    }
}

enum ReadError {
    TooLarge,
    Transport(reqwest::Error),
}

/// Reads a whole body of at most `limit` bytes.
async fn read_limited(mut response: reqwest::Response, limit: usize) -> Result<Bytes, ReadError> {
    if response.content_length().is_some_and(|l| l > limit as u64) {
        return Err(ReadError::TooLarge);
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(ReadError::Transport)? {
        if body.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Percent-encodes a query value (`application/x-www-form-urlencoded`, space as `%20`).
fn form_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One `WWW-Authenticate` challenge: `Bearer realm="…",service="…",scope="…"`.
#[derive(Debug, PartialEq, Eq)]
struct Challenge {
    scheme: String,
    params: Vec<(String, String)>,
}

impl Challenge {
    fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Parses one header value holding one challenge (quoted values may hold commas).
    fn parse(header: &str) -> Option<Challenge> {
        let header = header.trim();
        let (scheme, mut rest) = match header.split_once(char::is_whitespace) {
            Some((s, r)) => (s, r.trim_start()),
            None => (header, ""),
        };
        if scheme.is_empty() {
            return None;
        }
        let mut params = Vec::new();
        while !rest.is_empty() {
            let (key, after) = rest.split_once('=')?;
            let key = key.trim().trim_start_matches(',').trim().to_owned();
            let after = after.trim_start();
            let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
                let mut value = String::new();
                let mut chars = quoted.char_indices();
                let mut end = None;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some((_, escaped)) = chars.next() {
                                value.push(escaped);
                            }
                        }
                        '"' => {
                            end = Some(i + 1);
                            break;
                        }
                        c => value.push(c),
                    }
                }
                (value, &quoted[end?..])
            } else {
                let end = after.find(',').unwrap_or(after.len());
                (after[..end].trim().to_owned(), &after[end..])
            };
            params.push((key, value));
            rest = remaining.trim_start().trim_start_matches(',').trim_start();
        }
        Some(Challenge {
            scheme: scheme.to_owned(),
            params,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#,
        )
        .expect("parses");
        assert_eq!(c.scheme, "Bearer");
        assert_eq!(c.param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c.param("service"), Some("registry.docker.io"));
        assert_eq!(c.param("scope"), Some("repository:library/alpine:pull,push"));
        let c = Challenge::parse(r#"Basic realm="a \"quoted\" realm""#).expect("parses");
        assert_eq!(
            (c.scheme.as_str(), c.param("realm")),
            ("Basic", Some(r#"a "quoted" realm"#))
        );
        let c = Challenge::parse("Bearer realm=https://h/token, service=s").expect("parses");
        assert_eq!(
            (c.param("realm"), c.param("service")),
            (Some("https://h/token"), Some("s"))
        );
        assert_eq!(Challenge::parse("Basic").map(|c| c.params.len()), Some(0));
        assert!(Challenge::parse(r#"Bearer realm="unterminated"#).is_none());
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(form_encode("repository:a/b:pull"), "repository%3Aa%2Fb%3Apull");
        assert_eq!(form_encode("x y"), "x%20y");
    }

    #[test]
    fn misses_expire_and_stay_bounded() {
        let mut misses = Misses::default();
        let ttl = Duration::from_secs(30);
        let now = Instant::now();
        misses.insert("a/blobs/x".into(), now);
        assert!(misses.fresh("a/blobs/x", ttl));
        assert!(!misses.fresh("a/blobs/y", ttl));
        let old = now.checked_sub(Duration::from_secs(31)).expect("an instant 31 s ago");
        misses.insert("a/manifests/t".into(), old);
        assert!(!misses.fresh("a/manifests/t", ttl), "expired");
        assert!(
            !misses.at.contains_key("a/manifests/t"),
            "an expired entry is dropped when seen"
        );
        for i in 0..MAX_MISSES + 100 {
            misses.insert(format!("r/blobs/{i}"), now);
        }
        assert!(misses.order.len() <= MAX_MISSES && misses.at.len() <= MAX_MISSES);
        assert!(!misses.fresh("a/blobs/x", ttl), "the oldest forgotten first");
        assert!(misses.fresh(&format!("r/blobs/{}", MAX_MISSES + 99), ttl));
        // Re-inserting a key keeps one live entry for it.
        misses.insert("r/blobs/5000".into(), now);
        misses.insert("r/blobs/5000".into(), now);
        assert!(misses.at.len() <= MAX_MISSES);
    }

    fn entry(prefix: &str) -> ProxyConfig {
        ProxyConfig {
            prefix: prefix.into(),
            url: "http://127.0.0.1:9/".into(),
            username: None,
            password_file: None,
            password_env: None,
            ca_file: None,
            insecure_skip_verify: false,
            tag_ttl: crate::config::Period::parse("5m").expect("period"),
            miss_ttl: crate::config::Period::parse("30s").expect("period"),
            timeout_secs: 5,
            max_concurrent_requests: 2,
            namespaces: None,
            max_size: None,
            max_spack_index_size: crate::config::ByteSize::parse("1GiB").expect("size"),
        }
    }

    #[test]
    fn repositories_route_by_prefix() {
        let proxies = Proxies::from_config(&[entry("hub/"), entry("ghcr/")]).expect("builds");
        let route = |name: &str| {
            proxies
                .route(&name.parse().expect("name"))
                .map(|(u, r)| (u.prefix().to_owned(), r))
        };
        assert_eq!(
            route("hub/library/alpine"),
            Some(("hub/".into(), "library/alpine".into()))
        );
        assert_eq!(route("ghcr/o/r"), Some(("ghcr/".into(), "o/r".into())));
        assert_eq!(route("hubble/x"), None);
        assert_eq!(route("hub"), None);
        assert_eq!(route("local/app"), None);
    }

    #[test]
    fn namespaces_name_their_entry() {
        let mut docker = entry("dockerhub/");
        docker.url = "https://registry-1.docker.io".into();
        let mut quay = entry("quay/");
        quay.namespaces = Some(vec!["Quay.IO".into()]);
        let proxies = Proxies::from_config(&[docker, quay]).expect("builds");
        assert_eq!(proxies.prefix_for_namespace("docker.io"), Some("dockerhub/"));
        assert_eq!(proxies.prefix_for_namespace("registry-1.docker.io"), Some("dockerhub/"));
        assert_eq!(proxies.prefix_for_namespace("quay.io"), Some("quay/"));
        // An explicit list replaces the default (the URL's host).
        assert_eq!(proxies.prefix_for_namespace("127.0.0.1:9"), None);
        assert_eq!(proxies.prefix_for_namespace("ghcr.io"), None);
    }

    #[test]
    fn a_missing_password_stops_start_up() {
        let mut e = entry("hub/");
        e.username = Some("u".into());
        e.password_env = Some("STOWAGE_TEST_SURELY_UNSET_PASSWORD_VARIABLE".into());
        let err = Proxies::from_config(&[e]).expect_err("refused");
        assert!(err.contains("is not set"), "{err}");
    }
}

//! What operators and their machinery see: health probes, the access log with request ids, and
//! the read-only refusal (see `registry::maintenance`).
//!
//! - `GET /livez`: 200 while the process answers HTTP; no checks, no credentials.
//! - `GET /readyz`: 200 when the server can take traffic, 503 with the reason when it cannot
//!   (draining before a stop, catalog not writable, storage unreachable); no credentials, and
//!   at most one real check a second however many probes arrive.
//! - Every request gets an id: the client's `X-Request-Id` if it sent a sane one (1 to 128
//!   visible ASCII characters), otherwise a fresh UUID. It is returned in `X-Request-Id`, and
//!   every log line written while the request is handled carries it (a `request` span).
//! - One access-log line per request, at `info` under the target `stowage::access` (so that
//!   `RUST_LOG=info,stowage::access=off` silences it): method, route, repository, status,
//!   bytes in and out (as declared by `Content-Length`; a streamed body without one logs 0 in and
//!   its size hint out), duration, user and API token id, client address and request id. Never
//!   a header value, so never a credential. Server errors are logged at `warn`.
//! - Request metrics (`crate::metrics`): in-flight, count and duration per handler, recorded
//!   here for every request, including those refused before a handler runs.
//! - `GET /metrics`: the Prometheus exposition; anonymous unless `metrics.token_file` is set,
//!   then only with `Authorization: Bearer <that secret>` (401 otherwise, in the OCI error
//!   format). On `listen`, or alone on `metrics.listen`.

use std::time::Instant;

use actix_web::body::{BodySize, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{HttpMessage, HttpResponse, web};
use tracing::Instrument;

use crate::auth::{Identity, Principal};
use crate::error::Error;
use crate::registry::Registry;

/// The target of access-log lines (`crate::logging` writes them without blocking).
pub const ACCESS_TARGET: &str = "stowage::access";

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// `GET /livez`.
pub async fn livez() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((CONTENT_TYPE, "text/plain; charset=utf-8"))
        .body("ok\n")
}

/// `GET /readyz`.
pub async fn readyz(registry: web::Data<Registry>) -> HttpResponse {
    match registry.readiness().await {
        Ok(()) => HttpResponse::Ok()
            .insert_header((CONTENT_TYPE, "text/plain; charset=utf-8"))
            .body("ok\n"),
        Err(why) => HttpResponse::ServiceUnavailable()
            .insert_header((CONTENT_TYPE, "text/plain; charset=utf-8"))
            .body(format!("not ready: {why}\n")),
    }
}

/// Who may read `/metrics`: the hash of the configured bearer secret, or anyone.
#[derive(Clone)]
pub struct MetricsAccess {
    /// SHA-256 of the secret; compared hash to hash, so the comparison's timing says nothing
    /// about the secret.
    token: Option<[u8; 32]>,
    max_repository_series: usize,
}

impl MetricsAccess {
    pub fn new(secret: Option<&str>, max_repository_series: usize) -> Self {
        MetricsAccess {
            token: secret.map(sha256),
            max_repository_series,
        }
    }
}

fn sha256(s: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(s.as_bytes()).into()
}

/// `GET /metrics`.
pub async fn metrics(
    req: actix_web::HttpRequest,
    registry: web::Data<Registry>,
    access: web::Data<MetricsAccess>,
) -> HttpResponse {
    if let Some(expected) = &access.token {
        let given = req
            .headers()
            .get(actix_web::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| sha256(t.trim()));
        if given.as_ref() != Some(expected) {
            return HttpResponse::Unauthorized()
                .insert_header((CONTENT_TYPE, "application/json"))
                .insert_header(("WWW-Authenticate", "Bearer realm=\"metrics\""))
                .body(super::error_body(
                    crate::error::Code::Unauthorized,
                    "/metrics needs the bearer token configured in metrics.token_file",
                    None,
                ));
        }
    }
    let text = registry.metrics_exposition(access.max_repository_series).await;
    HttpResponse::Ok()
        .insert_header((
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ))
        .body(text)
}

/// Counts a request in flight until dropped (however the request ends).
struct InFlight(&'static str);

impl InFlight {
    fn start(handler: &'static str) -> Self {
        crate::metrics::get()
            .http_in_flight
            .get_or_create(&crate::metrics::HandlerLabels { handler })
            .inc();
        InFlight(handler)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        crate::metrics::get()
            .http_in_flight
            .get_or_create(&crate::metrics::HandlerLabels { handler: self.0 })
            .dec();
    }
}

/// The id of a request: the client's, when sane, or a new one.
fn request_id(req: &ServiceRequest) -> String {
    req.headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::new_v4().simple().to_string(), str::to_owned)
}

fn is_write(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH | Method::DELETE)
}

/// Assigns the request id, refuses writes in read-only mode, and writes the access-log line.
pub async fn access(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::EitherBody<impl MessageBody>>, actix_web::Error> {
    let started = Instant::now();
    let id = request_id(&req);
    // At error level, so that the span (and with it the id) is on every line logged, however
    // high `RUST_LOG` sets the threshold: a warning from a failed upload still names its request.
    let span = tracing::error_span!("request", request_id = %id);
    // For the audit trail (`http::audit`).
    req.extensions_mut().insert(super::audit::RequestId(id.clone()));
    let method = req.method().clone();
    let path = req.path().to_owned();
    let metered = crate::metrics::get().enabled();
    let handler = crate::metrics::handler_of(&path);
    let in_flight = metered.then(|| InFlight::start(handler));
    let bytes_in = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let read_only = req.app_data::<web::Data<Registry>>().is_some_and(|r| r.is_read_only());
    let mut resp = if read_only && is_write(&method) && (path.starts_with("/v2/") || path.starts_with("/stowage/v1/")) {
        req.error_response(Error::ReadOnly).map_into_right_body()
    } else {
        next.call(req).instrument(span.clone()).await?.map_into_left_body()
    };
    if let Ok(value) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID, value);
    }
    let status = resp.status().as_u16();
    if metered {
        let m = crate::metrics::get();
        let method = crate::metrics::method_label(&method);
        m.http_requests
            .get_or_create(&crate::metrics::RequestLabels {
                method,
                code: status,
                handler,
            })
            .inc();
        m.http_duration
            .get_or_create(&crate::metrics::DurationLabels { method, handler })
            .observe(started.elapsed().as_secs_f64());
    }
    drop(in_flight);
    let failed = resp.status().is_server_error();
    // The line's fields cost allocations: only when the line is written.
    let wanted = if failed {
        tracing::enabled!(target: "stowage::access", tracing::Level::WARN)
    } else {
        tracing::enabled!(target: "stowage::access", tracing::Level::INFO)
    };
    if !wanted {
        return Ok(resp);
    }
    let request = resp.request();
    // The pattern without its regular expressions: `/v2/{name}/blobs/{digest}`.
    let route = request
        .match_pattern()
        .map_or_else(|| path.clone(), |p| p.replace(":.+", ""));
    let repo = request.match_info().get("name").unwrap_or("");
    let client = match request.app_data::<web::Data<crate::auth::Auth>>() {
        Some(auth) => super::auth::client_ip(auth, request).to_string(),
        None => request.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default(),
    };
    let extensions = request.extensions();
    let (user, token) = match extensions.get::<Principal>().map(|p| &p.identity) {
        Some(Identity::User { name, token, .. }) => (name.as_str(), token.as_ref().map(|(id, _)| *id)),
        Some(Identity::Anonymous) => ("-anonymous-", None),
        _ => ("", None),
    };
    let bytes_out = match resp.response().body().size() {
        BodySize::Sized(n) => n,
        _ => 0,
    };
    let duration_ms = (started.elapsed().as_secs_f64() * 1e4).round() / 10.0;
    let _in_span = span.enter();
    if failed {
        tracing::warn!(
            target: "stowage::access", %method, %route, %repo, status, bytes_in, bytes_out, duration_ms,
            %user, token, %client, request_id = %id, "request failed"
        );
    } else {
        tracing::info!(
            target: "stowage::access", %method, %route, %repo, status, bytes_in, bytes_out, duration_ms,
            %user, token, %client, request_id = %id, "request"
        );
    }
    drop(extensions);
    Ok(resp)
}

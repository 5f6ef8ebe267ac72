//! containerd's registry-mirror form. A containerd (or kubelet) `hosts.toml` that names this
//! registry as a mirror of `docker.io`, without `override_path`, asks
//!
//! ```text
//! GET /v2/library/alpine/manifests/3.20?ns=docker.io
//! GET /v2/library/alpine/blobs/sha256:…?ns=docker.io
//! ```
//!
//! The request is rewritten, before routing, to the `[[proxy]]` entry whose `namespaces` hold
//! the `ns` value: with `prefix = "dockerhub/"`, `/v2/dockerhub/library/alpine/manifests/3.20`.
//! Everything after (authorisation, the audit trail, the handlers) sees only the rewritten
//! name. A request whose `ns` no entry names, or without `ns`, is left as it is (a hosted
//! repository of that name, as Distribution ignores `ns`).

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Uri;
use actix_web::middleware::Next;
use actix_web::web;

use crate::registry::Registry;

/// The rewriting middleware (registered on the whole app, so that it runs before routing).
pub async fn mirror_namespace(
    mut req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    if let Some(uri) = namespaced(&req) {
        req.match_info_mut().get_mut().update(&uri);
        req.head_mut().uri = uri;
    }
    next.call(req).await
}

/// The URI a `?ns=` request is served as, if an entry mirrors its namespace.
fn namespaced(req: &ServiceRequest) -> Option<Uri> {
    let query = req.query_string();
    if !query.contains("ns=") {
        return None;
    }
    let rest = req.path().strip_prefix("/v2/")?;
    // `/v2/`, `/v2/_catalog`: not a repository.
    if rest.is_empty() || rest.starts_with('_') {
        return None;
    }
    let pairs = web::Query::<Vec<(String, String)>>::from_query(query).ok()?;
    let ns = pairs.iter().find(|(k, _)| k == "ns").map(|(_, v)| v.as_str())?;
    let registry = req.app_data::<web::Data<Registry>>()?;
    let prefix = registry.mirror_prefix(ns)?;
    // Only the path changes: the scheme and authority stay (over HTTP/2 the authority is the
    // only name of the host the client asked, e.g. for the token realm).
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(format!("/v2/{prefix}{rest}?{query}").parse().ok()?);
    Uri::from_parts(parts).ok()
}

//! HTTP wiring: the route table, the headers every response carries; request ids, the access
//! log, probes and the read-only refusal are in `ops`; containerd's `?ns=` mirror form in
//! `mirror`.
//!
//! One file per OCI resource; each handler extracts and validates its inputs (`extract`), calls
//! one [`Registry`] method, and maps the result. Errors become OCI error bodies in `error`.

mod audit;
mod auth;
mod blobs;
mod error;
mod extract;
mod listing;
mod manifests;
mod mirror;
mod ops;
mod spack_api;
mod uploads;

use actix_web::http::header::CONTENT_TYPE;
use actix_web::middleware::{DefaultHeaders, from_fn};
use actix_web::{HttpResponse, web};

/// For the web UI (`crate::ui`): the same client address, base URL and audit records as the
/// registry API.
pub use audit::{actor, record_denied, record_login_failure};
pub use auth::Guard;
pub use auth::{base_url, client_ip};
pub use error::error_body;
pub use extract::{BodyTimeouts, query, query_param, read_limited, set_body_timeouts};
pub use mirror::mirror_namespace;
pub use ops::{ACCESS_TARGET, MetricsAccess, access};

use crate::error::Code;
use crate::registry::Registry;

/// Wraps a resource in the authentication check for `guard` (see `auth`).
macro_rules! protect {
    ($guard:expr) => {
        from_fn(move |req, next| auth::protect($guard, req, next))
    };
}

/// Registers every route on an actix app. Each resource states what its requests need
/// ([`Guard`]); the token endpoint is `/token`.
pub fn routes(cfg: &mut web::ServiceConfig) {
    const NAME: &str = "/v2/{name:.+}";
    // Test-only, unauthenticated: see `crate::faults`. Absent from builds without the feature.
    #[cfg(feature = "fault-injection")]
    cfg.service(
        web::resource("/_stowage/faults")
            .get(faults::get)
            .put(faults::put)
            .delete(faults::delete)
            .default_service(web::to(method_not_allowed)),
    );
    cfg.service(
        web::resource("/livez")
            .get(ops::livez)
            .head(ops::livez)
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/readyz")
            .get(ops::readyz)
            .head(ops::readyz)
            .default_service(web::to(method_not_allowed)),
    );
    cfg.service(
        web::resource("/token")
            .get(auth::token_get)
            .post(auth::token_post)
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource(["/v2", "/v2/"])
            .wrap(protect!(Guard::Base))
            .get(base)
            .head(base)
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/v2/_catalog")
            .wrap(protect!(Guard::Catalog))
            .get(listing::catalog)
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource(format!("{NAME}/tags/list"))
            .wrap(protect!(Guard::Read))
            .get(listing::tags)
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource(format!("{NAME}/manifests/{{reference}}"))
            .wrap(protect!(Guard::Manifests))
            .get(manifests::get)
            .head(manifests::head)
            .put(manifests::put)
            .delete(manifests::delete)
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource([format!("{NAME}/blobs/uploads/"), format!("{NAME}/blobs/uploads")])
            .wrap(protect!(Guard::UploadStart))
            .post(uploads::start)
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource(format!("{NAME}/blobs/uploads/{{uuid}}"))
            .wrap(protect!(Guard::UploadSession))
            .get(uploads::status)
            .patch(uploads::patch)
            .put(uploads::finish)
            .delete(uploads::cancel)
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource(format!("{NAME}/blobs/{{digest}}"))
            .wrap(protect!(Guard::Blobs))
            .get(blobs::get)
            .head(blobs::head)
            .delete(blobs::delete)
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource(format!("{NAME}/referrers/{{digest}}"))
            .wrap(protect!(Guard::Read))
            .get(listing::referrers)
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/stowage/v1/spack/{name:.+}/specs/{hash}/dependents")
            .wrap(protect!(Guard::Read))
            .get(spack_api::dependents)
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/stowage/v1/spack/{name:.+}/specs/{hash}")
            .wrap(protect!(Guard::Read))
            .get(spack_api::spec)
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/stowage/v1/spack/{name:.+}/specs")
            .wrap(protect!(Guard::Read))
            .get(spack_api::specs)
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/stowage/v1/spack/{name:.+}/keep/{keep}")
            .wrap(protect!(Guard::SpackKeep))
            .delete(spack_api::keep_delete)
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/stowage/v1/spack/{name:.+}/keep")
            .wrap(protect!(Guard::SpackKeep))
            .get(spack_api::keep_list)
            .post(spack_api::keep_create)
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/stowage/v1/audit")
            .wrap(protect!(Guard::Base))
            .get(audit::list)
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/stowage/v1/spack/{name:.+}/missing")
            .wrap(protect!(Guard::Read))
            .post(spack_api::missing)
            .default_service(web::to(method_not_allowed)),
    )
    .default_service(web::to(not_found));
}

/// `/metrics` (see `ops`); registered by the server only when metrics are on, on the main
/// listener or on `metrics.listen`.
pub fn metrics_route(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/metrics")
            .get(ops::metrics)
            .default_service(web::to(method_not_allowed)),
    );
}

/// The routes of the separate metrics listener (`metrics.listen`): `/metrics` and the probes.
pub fn metrics_listener_routes(cfg: &mut web::ServiceConfig) {
    metrics_route(cfg);
    cfg.service(web::resource("/livez").get(ops::livez).head(ops::livez))
        .service(web::resource("/readyz").get(ops::readyz).head(ops::readyz))
        .default_service(web::to(not_found));
}

/// Headers on every response.
pub fn default_headers() -> DefaultHeaders {
    DefaultHeaders::new().add(("Docker-Distribution-API-Version", "registry/2.0"))
}

/// `/v2/`: the API version check.
async fn base() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((CONTENT_TYPE, "application/json"))
        .body("{}")
}

async fn not_found() -> HttpResponse {
    HttpResponse::NotFound()
        .insert_header((CONTENT_TYPE, "application/json"))
        .body(error_body(Code::Unsupported, "no such endpoint", None))
}

async fn method_not_allowed() -> HttpResponse {
    HttpResponse::MethodNotAllowed()
        .insert_header((CONTENT_TYPE, "application/json"))
        .body(error_body(
            Code::Unsupported,
            "method not allowed on this endpoint",
            None,
        ))
}

/// The body of a HEAD response: none, while `no_chunking(len)` on the builder states the
/// `Content-Length` the matching GET would have (actix drops a manual header on empty bodies).
fn empty_body() -> futures_util::stream::Empty<Result<bytes::Bytes, std::io::Error>> {
    futures_util::stream::empty()
}

/// `/_stowage/faults`: the fault-injection rules (feature `fault-injection`, tests only).
#[cfg(feature = "fault-injection")]
mod faults {
    use actix_web::HttpResponse;
    use actix_web::http::header::CONTENT_TYPE;

    use crate::error::Code;
    use crate::faults::{self, Rule, Rules};

    fn state() -> HttpResponse {
        HttpResponse::Ok().json(Rules { rules: faults::state() })
    }

    pub async fn get() -> HttpResponse {
        state()
    }

    pub async fn put(body: bytes::Bytes) -> HttpResponse {
        match serde_json::from_slice::<Rules<Rule>>(&body) {
            Ok(rules) => {
                faults::set(rules.rules);
                state()
            }
            Err(e) => HttpResponse::BadRequest()
                .insert_header((CONTENT_TYPE, "application/json"))
                .body(super::error_body(
                    Code::Unsupported,
                    &format!("invalid fault rules: {e}"),
                    None,
                )),
        }
    }

    pub async fn delete() -> HttpResponse {
        faults::clear();
        HttpResponse::NoContent().finish()
    }
}

/// Keeps the type of the registry handle named in one place for `main`.
pub type State = web::Data<Registry>;

//! Turns [`Error`] into the spec's error response: status, OCI JSON body, and the headers some
//! errors carry (`Range` and `Location` on an out-of-order chunk, `Content-Range` on an
//! unsatisfiable byte range, `WWW-Authenticate` on a 401, `Retry-After` on a 429). Internal errors
//! are logged here, once, and reported generically, except a full storage, which is reported as
//! such ([`STORAGE_FULL`], 507 `UNAVAILABLE`).

use actix_web::http::StatusCode;
use actix_web::http::header::{CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE, RETRY_AFTER, WWW_AUTHENTICATE};
use actix_web::{HttpResponse, ResponseError};

use crate::error::{Code, Error};

/// Seconds a client is asked to wait when the catalog's database is out of reach (a
/// PostgreSQL failover or restart takes seconds).
const CATALOG_RETRY_AFTER_SECS: u64 = 5;

/// What a client is told when the storage is full (507 `UNAVAILABLE`).
pub const STORAGE_FULL: &str = "the registry's storage is full: the data was not stored";

/// `Range` header value for an upload holding `offset` bytes (`0-<last>`; `0-0` when empty, as
/// clients expect the header to be present).
pub fn upload_range(offset: u64) -> String {
    format!("0-{}", offset.saturating_sub(1))
}

/// The OCI error body for one error.
pub fn error_body(code: Code, message: &str, detail: Option<serde_json::Value>) -> String {
    let mut entry = serde_json::json!({ "code": code.as_str(), "message": message });
    if let Some(d) = detail {
        entry["detail"] = d;
    }
    serde_json::json!({ "errors": [entry] }).to_string()
}

impl ResponseError for Error {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        let message = match self {
            Error::Internal(inner) | Error::UploadFailed(inner) if inner.is_storage_full() => {
                tracing::error!(error = %inner, "storage full while serving a request");
                match self {
                    Error::UploadFailed(_) => {
                        format!("{STORAGE_FULL}; the upload was ended: start it again once space has been freed")
                    }
                    _ => format!("{STORAGE_FULL}; retry once space has been freed"),
                }
            }
            Error::Internal(inner) | Error::UploadFailed(inner) if inner.is_catalog_unavailable() => {
                tracing::error!(error = %inner, "catalog unavailable while serving a request");
                "the registry's catalog database is unavailable; retry shortly".to_owned()
            }
            Error::Internal(inner) => {
                tracing::error!(error = %inner, "internal error while serving a request");
                "internal server error".to_owned()
            }
            Error::UploadFailed(inner) => {
                tracing::error!(error = %inner, "an upload failed and was ended");
                self.to_string()
            }
            other => other.to_string(),
        };
        let mut resp = HttpResponse::build(self.status_code());
        resp.insert_header((CONTENT_TYPE, "application/json"));
        match self {
            Error::UploadOutOfOrder { repo, id, offset } => {
                resp.insert_header((LOCATION, super::uploads::upload_location(repo, *id)));
                resp.insert_header((RANGE, upload_range(*offset)));
            }
            Error::RangeNotSatisfiable { size } => {
                resp.insert_header((CONTENT_RANGE, format!("bytes */{size}")));
            }
            Error::Unauthorized(challenge) => {
                for value in challenge.header_values() {
                    resp.append_header((WWW_AUTHENTICATE, value));
                }
            }
            Error::TooManyLogins { retry_after }
            | Error::LoginsBusy { retry_after }
            | Error::TooManyUploads { retry_after }
            | Error::UploadMemoryBusy { retry_after } => {
                resp.insert_header((RETRY_AFTER, retry_after.to_string()));
            }
            _ if self.is_catalog_unavailable() => {
                resp.insert_header((RETRY_AFTER, CATALOG_RETRY_AFTER_SECS.to_string()));
            }
            _ => {}
        }
        resp.body(error_body(self.code(), &message, self.detail()))
    }
}

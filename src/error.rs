//! The registry's error type and the one table of OCI error codes.
//!
//! Every failure a request can meet is a variant of [`Error`]. Each variant maps to exactly one
//! OCI error code ([`Code`]) and HTTP status in [`Error::code`] / [`Code::status`]; the HTTP layer
//! turns that into the spec's JSON body (`{"errors":[{"code","message","detail"}]}`) in one place
//! (`http::error`). Internal failures (storage, catalog) are logged once there with their cause and
//! answered with a generic message, so no internal detail reaches a client.
//!
//! One internal failure is told to the client: **the storage is full** (`ENOSPC`/`EDQUOT` from
//! the disk, found anywhere in an error's chain, including inside an `object_store` error, or
//! SQLite's `SQLITE_FULL`) is answered 507 with code `UNAVAILABLE` and a message saying so
//! ([`Internal::is_storage_full`]), since the client can do nothing about it but wait or tell
//! the operator.

use std::borrow::Cow;

use crate::oci::Digest;

/// OCI distribution error codes (spec section "Error Codes": a response's code MUST be one of
/// these), plus `UNKNOWN` for internal failures, which answer 500 and never come from bad input,
/// and `UNAVAILABLE` (Distribution's code for a registry that cannot serve the request now).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    TagInvalid,
    Unavailable,
    Unknown,
}

impl Code {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::BlobUnknown => "BLOB_UNKNOWN",
            Code::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            Code::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            Code::DigestInvalid => "DIGEST_INVALID",
            Code::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            Code::ManifestInvalid => "MANIFEST_INVALID",
            Code::ManifestUnknown => "MANIFEST_UNKNOWN",
            Code::NameInvalid => "NAME_INVALID",
            Code::NameUnknown => "NAME_UNKNOWN",
            Code::SizeInvalid => "SIZE_INVALID",
            Code::Unauthorized => "UNAUTHORIZED",
            Code::Denied => "DENIED",
            Code::Unsupported => "UNSUPPORTED",
            Code::TooManyRequests => "TOOMANYREQUESTS",
            Code::TagInvalid => "TAG_INVALID",
            Code::Unavailable => "UNAVAILABLE",
            Code::Unknown => "UNKNOWN",
        }
    }

    /// The HTTP status this code is answered with unless the variant overrides it.
    pub fn status(self) -> u16 {
        match self {
            Code::BlobUnknown | Code::BlobUploadUnknown | Code::ManifestUnknown | Code::NameUnknown => 404,
            Code::BlobUploadInvalid
            | Code::DigestInvalid
            | Code::ManifestBlobUnknown
            | Code::ManifestInvalid
            | Code::NameInvalid
            | Code::SizeInvalid
            | Code::TagInvalid => 400,
            Code::Unauthorized => 401,
            Code::Denied => 403,
            Code::Unsupported => 405,
            Code::TooManyRequests => 429,
            Code::Unknown => 500,
            Code::Unavailable => 503,
        }
    }
}

/// Everything that can go wrong while serving a registry request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("blob unknown to registry")]
    BlobUnknown(Option<Digest>),
    #[error("blob upload unknown to registry")]
    UploadUnknown,
    /// A chunk that does not start where the upload ends (answered 416 with the current `Range`).
    #[error("upload chunk does not start at the upload's current offset {offset}")]
    UploadOutOfOrder {
        repo: crate::oci::RepoName,
        id: uuid::Uuid,
        offset: u64,
    },
    #[error("blob upload invalid: {0}")]
    UploadInvalid(&'static str),
    /// Another request is using the upload session.
    #[error("blob upload invalid: another request is using this upload session; retry when it has finished")]
    UploadBusy,
    /// Another replica moved the upload session on while this request ran (this replica's
    /// database lock on it was lost); what the request sent was not kept.
    #[error(
        "blob upload invalid: another server moved this upload session on while this request ran; what it sent was not kept: ask for the session's offset and continue from there"
    )]
    UploadMoved,
    /// Storing an upload's data failed; the session was ended and its data deleted.
    #[error("blob upload invalid: the upload could not be stored and was ended; start it again")]
    UploadFailed(Internal),
    /// The limit of open upload sessions is reached (429 with `Retry-After`).
    #[error("too many upload sessions are open; finish or cancel some, or try again later")]
    TooManyUploads { retry_after: u64 },
    /// No upload memory came free within `storage.upload_memory_wait_secs` (503 with
    /// `Retry-After`); the session keeps what it received before.
    #[error(
        "the server is receiving too many uploads at once to take more of this one now; retry later (an upload session continues from its current offset)"
    )]
    UploadMemoryBusy { retry_after: u64 },
    #[error("provided digest did not match uploaded content")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("invalid digest: {0}")]
    DigestInvalid(&'static str),
    #[error("manifest references a blob or manifest unknown to the repository")]
    ManifestBlobUnknown(Digest),
    #[error("manifest invalid: {0}")]
    ManifestInvalid(Cow<'static, str>),
    #[error("manifest is larger than the limit of {limit} bytes")]
    ManifestTooLarge { limit: usize },
    #[error("manifest unknown to registry")]
    ManifestUnknown,
    #[error("invalid repository name")]
    NameInvalid,
    #[error("invalid tag")]
    TagInvalid,
    #[error("repository name not known to registry")]
    NameUnknown,
    #[error("provided length did not match content length")]
    SizeInvalid,
    #[error("requested range not satisfiable")]
    RangeNotSatisfiable { size: u64 },
    #[error("invalid pagination parameter: {0}")]
    PaginationInvalid(&'static str),
    #[error("the operation is unsupported: {0}")]
    Unsupported(&'static str),
    #[error("request body could not be read: {0}")]
    BodyRead(String),
    /// Credentials are missing, wrong, or lack the scope needed (401 with the challenge).
    #[error("{}", .0.message)]
    Unauthorized(Box<crate::auth::Challenge>),
    /// The identity may not do this (403).
    /// The message names the identity, action and repository (see `auth::denial`).
    #[error("{0}")]
    Denied(String),
    /// A write would move or delete a tag an `[[immutable_tags]]` rule protects (403 `DENIED`);
    /// the message names the tag, the repository and the rule (see `auth::immutable`).
    #[error("{0}")]
    TagImmutable(Box<crate::auth::ImmutableTagRefusal>),
    /// A token request the endpoint cannot serve (400).
    #[error("invalid token request: {0}")]
    TokenRequestInvalid(&'static str),
    /// Too many failed logins from this client address, or for this user from it (429 with
    /// `Retry-After`).
    #[error("too many failed logins from your address; try again in {retry_after} s (API tokens are not affected)")]
    TooManyLogins { retry_after: u64 },
    /// Too many password checks at once (429 with `Retry-After`).
    #[error("too many logins are being checked at once; try again in {retry_after} s")]
    LoginsBusy { retry_after: u64 },
    /// The registry is in read-only maintenance mode (503).
    #[error(
        "the registry is read-only for maintenance: pulls work, pushes and deletes are refused until it is writable again"
    )]
    ReadOnly,
    /// A pull-through upstream (`[[proxy]]`) could not serve content not cached here: 502
    /// `UNAVAILABLE`, or 429 `TOOMANYREQUESTS` when it rate-limits (see `proxy`).
    #[error("{0}")]
    Upstream(crate::proxy::UpstreamError),
    #[error("internal error: {0}")]
    Internal(#[from] Internal),
}

/// A failure inside the server (storage, catalog, task panics). Never shown to clients.
#[derive(Debug, thiserror::Error)]
pub enum Internal {
    #[error("storage: {0}")]
    Storage(#[from] object_store::Error),
    #[error("catalog: {0}")]
    Catalog(#[from] crate::catalog::db::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("background task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    /// The catalog's database cannot be reached now (answered 503 `UNAVAILABLE`).
    #[error("catalog unavailable: {0}")]
    CatalogUnavailable(&'static str),
    #[error("{0}")]
    Other(&'static str),
}

impl Internal {
    /// Whether this failure is the storage (blob disk, staging disk or catalog) being full:
    /// an `ENOSPC` or `EDQUOT` anywhere in the error's chain (`object_store` wraps the disk's
    /// errors in its own), or SQLite's `SQLITE_FULL`.
    pub fn is_storage_full(&self) -> bool {
        match self {
            Internal::Storage(e) => chain_is_storage_full(e),
            Internal::Catalog(e) => chain_is_storage_full(e),
            Internal::Io(e) => chain_is_storage_full(e),
            Internal::Join(_) | Internal::Other(_) | Internal::CatalogUnavailable(_) => false,
        }
    }

    /// Whether this failure is the catalog's database being out of reach for now (a
    /// PostgreSQL server down, restarting or out of connections): the request may be retried.
    pub fn is_catalog_unavailable(&self) -> bool {
        match self {
            Internal::Catalog(e) => e.is_unavailable(),
            Internal::CatalogUnavailable(_) => true,
            _ => false,
        }
    }
}

/// Walks `err` and its sources (and what an `io::Error` wraps) for a full disk.
fn chain_is_storage_full(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ) {
                return true;
            }
            // A custom io::Error's `source` skips the error it wraps: look at that one too.
            if let Some(inner) = io.get_ref()
                && chain_is_storage_full(inner)
            {
                return true;
            }
        }
        if let Some(sql) = e.downcast_ref::<rusqlite::Error>()
            && sql.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
        {
            return true;
        }
        // Transparent: its `source` is the wrapped error's source, not that error.
        if let Some(db) = e.downcast_ref::<crate::catalog::db::Error>()
            && db.is_disk_full()
        {
            return true;
        }
        next = e.source();
    }
    false
}

impl From<crate::auth::ImmutableTagRefusal> for Error {
    fn from(r: crate::auth::ImmutableTagRefusal) -> Self {
        Error::TagImmutable(Box::new(r))
    }
}

impl From<object_store::Error> for Error {
    fn from(e: object_store::Error) -> Self {
        Error::Internal(Internal::Storage(e))
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Internal(Internal::Catalog(e.into()))
    }
}

impl From<crate::catalog::db::Error> for Error {
    fn from(e: crate::catalog::db::Error) -> Self {
        Error::Internal(Internal::Catalog(e))
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Internal(Internal::Io(e))
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Internal(Internal::Join(e))
    }
}

impl Error {
    /// The OCI error code this error is reported as.
    pub fn code(&self) -> Code {
        if self.is_storage_full() || self.is_catalog_unavailable() {
            return Code::Unavailable;
        }
        match self {
            Error::BlobUnknown(_) => Code::BlobUnknown,
            Error::UploadUnknown => Code::BlobUploadUnknown,
            Error::UploadOutOfOrder { .. }
            | Error::UploadInvalid(_)
            | Error::UploadBusy
            | Error::UploadMoved
            | Error::UploadFailed(_) => Code::BlobUploadInvalid,
            Error::DigestMismatch { .. } | Error::DigestInvalid(_) => Code::DigestInvalid,
            Error::ManifestBlobUnknown(_) => Code::ManifestBlobUnknown,
            Error::ManifestInvalid(_) | Error::ManifestTooLarge { .. } => Code::ManifestInvalid,
            Error::ManifestUnknown => Code::ManifestUnknown,
            Error::NameInvalid => Code::NameInvalid,
            Error::TagInvalid => Code::TagInvalid,
            Error::NameUnknown => Code::NameUnknown,
            Error::SizeInvalid => Code::SizeInvalid,
            // No spec code names an unsatisfiable range; the requested size is what is wrong.
            Error::RangeNotSatisfiable { .. } => Code::SizeInvalid,
            Error::PaginationInvalid(_) => Code::Unsupported,
            Error::BodyRead(_) => Code::BlobUploadInvalid,
            Error::Unsupported(_) => Code::Unsupported,
            Error::Unauthorized(_) => Code::Unauthorized,
            Error::Denied(_) | Error::TagImmutable(_) => Code::Denied,
            Error::TokenRequestInvalid(_) => Code::Unsupported,
            Error::TooManyLogins { .. } | Error::LoginsBusy { .. } | Error::TooManyUploads { .. } => {
                Code::TooManyRequests
            }
            Error::ReadOnly | Error::UploadMemoryBusy { .. } => Code::Unavailable,
            Error::Upstream(crate::proxy::UpstreamError::RateLimited { .. }) => Code::TooManyRequests,
            Error::Upstream(_) => Code::Unavailable,
            Error::Internal(_) => Code::Unknown,
        }
    }

    /// Whether this is the storage being full (answered 507 `UNAVAILABLE`, whichever variant
    /// carries the failure).
    pub fn is_storage_full(&self) -> bool {
        matches!(self, Error::Internal(i) | Error::UploadFailed(i) if i.is_storage_full())
    }

    /// Whether the catalog's database is out of reach for now (503 `UNAVAILABLE` with
    /// `Retry-After`, whichever variant carries the failure).
    pub fn is_catalog_unavailable(&self) -> bool {
        matches!(self, Error::Internal(i) | Error::UploadFailed(i) if i.is_catalog_unavailable())
    }

    /// HTTP status, where a variant differs from its code's usual one.
    pub fn status(&self) -> u16 {
        match self {
            // 507 Insufficient Storage: what a full disk is, rather than UNAVAILABLE's usual 503.
            _ if self.is_storage_full() => 507,
            _ if self.is_catalog_unavailable() => 503,
            Error::UploadOutOfOrder { .. } => 416,
            Error::ManifestTooLarge { .. } => 413,
            // The server failed, not the client's request.
            Error::UploadFailed(_) => 500,
            Error::RangeNotSatisfiable { .. } => 416,
            Error::PaginationInvalid(_) | Error::TokenRequestInvalid(_) => 400,
            // 502 Bad Gateway: the upstream failed, not this registry or the client.
            Error::Upstream(u) if !matches!(u, crate::proxy::UpstreamError::RateLimited { .. }) => 502,
            other => other.code().status(),
        }
    }

    /// The `detail` member of the error body, where there is something useful to say.
    pub fn detail(&self) -> Option<serde_json::Value> {
        match self {
            Error::BlobUnknown(Some(d)) | Error::ManifestBlobUnknown(d) => {
                Some(serde_json::json!({ "digest": d.to_string() }))
            }
            Error::DigestMismatch { expected, actual } => Some(serde_json::json!({
                "expected": expected.to_string(),
                "actual": actual.to_string(),
            })),
            Error::ManifestTooLarge { limit } => Some(serde_json::json!({ "limit": limit })),
            Error::RangeNotSatisfiable { size } => Some(serde_json::json!({ "size": size })),
            Error::TagImmutable(r) => Some(serde_json::json!({
                "repository": r.repo,
                "tag": r.tag,
                "rule": r.rule,
            })),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn enospc() -> std::io::Error {
        std::io::Error::from_raw_os_error(libc::ENOSPC)
    }

    #[test]
    fn an_unreachable_catalog_is_503_unavailable() {
        let e = Error::Internal(Internal::CatalogUnavailable("catalog transaction could not start"));
        assert!(e.is_catalog_unavailable());
        assert_eq!((e.status(), e.code().as_str()), (503, "UNAVAILABLE"));
        let other = Error::Internal(Internal::Other("x"));
        assert!(!other.is_catalog_unavailable());
        assert_eq!(other.status(), 500);
    }

    #[test]
    fn a_full_disk_anywhere_in_the_chain_is_507_unavailable() {
        let cases: Vec<Error> = vec![
            enospc().into(),
            std::io::Error::from_raw_os_error(libc::EDQUOT).into(),
            // object_store wraps the disk's error (as its local store and the staging file do).
            object_store::Error::Generic {
                store: "staging",
                source: Box::new(enospc()),
            }
            .into(),
            // An io::Error wrapping another io::Error (`io::Error::other`).
            std::io::Error::other(enospc()).into(),
            rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
                Some("database or disk is full".into()),
            )
            .into(),
        ];
        let ended = Error::UploadFailed(Internal::Io(enospc()));
        for e in cases.into_iter().chain([ended]) {
            assert!(e.is_storage_full(), "{e:?}");
            assert_eq!(e.code(), Code::Unavailable, "{e:?}");
            assert_eq!(e.code().as_str(), "UNAVAILABLE");
            assert_eq!(e.status(), 507, "{e:?}");
        }
    }

    #[test]
    fn an_immutable_tag_refusal_is_403_denied_with_its_message_and_detail() {
        let e = Error::from(crate::auth::ImmutableTagRefusal {
            repo: "prod/app".into(),
            tag: "v1".into(),
            rule: "immutable_tags rule 1: tags v* in repositories prod/**".into(),
            change: crate::auth::TagChange::Delete,
        });
        assert_eq!((e.code(), e.status()), (Code::Denied, 403));
        assert!(
            e.to_string().starts_with("tag v1 in repository prod/app is immutable"),
            "{e}"
        );
        let detail = e.detail().expect("detail");
        assert_eq!(
            (&detail["tag"], &detail["repository"]),
            (&"v1".into(), &"prod/app".into())
        );
    }

    #[test]
    fn upstream_failures_are_502_unavailable_or_429() {
        use crate::proxy::UpstreamError;
        let upstream = "http://127.0.0.1:1".to_owned();
        let e = Error::Upstream(UpstreamError::Unreachable {
            upstream: upstream.clone(),
            reason: "connection refused".into(),
        });
        assert_eq!((e.code(), e.status()), (Code::Unavailable, 502));
        assert!(e.to_string().contains("could not be reached"), "{e}");
        let e = Error::Upstream(UpstreamError::RateLimited { upstream });
        assert_eq!((e.code(), e.status()), (Code::TooManyRequests, 429));
    }

    #[test]
    fn other_internal_failures_stay_500_unknown() {
        let cases: Vec<Error> = vec![
            std::io::Error::from_raw_os_error(libc::EIO).into(),
            object_store::Error::Generic {
                store: "s3",
                source: Box::new(std::io::Error::from_raw_os_error(libc::EIO)),
            }
            .into(),
            rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY), None).into(),
            Error::Internal(Internal::Other("x")),
        ];
        for e in cases {
            assert!(!e.is_storage_full(), "{e:?}");
            assert_eq!((e.code(), e.status()), (Code::Unknown, 500), "{e:?}");
        }
    }
}

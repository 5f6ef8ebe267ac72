//! Request parsing shared by the handlers: path parameters, query strings, range headers and
//! bodies, each turned into a typed value or the right OCI error.

use actix_web::HttpRequest;
use actix_web::http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderName};
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};

use crate::error::{Error, Result};
use crate::oci::{Digest, Reference, RepoName};
use crate::registry::ChunkRange;
use crate::registry::blobs::ByteRange;

/// The `{name}` path parameter as a validated repository name.
pub fn repo(req: &HttpRequest) -> Result<RepoName> {
    req.match_info().get("name").unwrap_or_default().parse()
}

/// A named path parameter as a digest.
pub fn digest_param(req: &HttpRequest, param: &str) -> Result<Digest> {
    req.match_info().get(param).unwrap_or_default().parse()
}

/// The `{reference}` path parameter.
pub fn reference(req: &HttpRequest) -> Result<Reference> {
    req.match_info().get("reference").unwrap_or_default().parse()
}

/// The query string as key/value pairs (percent-decoded). A malformed query yields no pairs.
pub fn query(req: &HttpRequest) -> Vec<(String, String)> {
    actix_web::web::Query::<Vec<(String, String)>>::from_query(req.query_string())
        .map(|q| q.into_inner())
        .unwrap_or_default()
}

/// First value of a query parameter.
pub fn query_param<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn header_str<'a>(req: &'a HttpRequest, name: &HeaderName) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// `Content-Length`, when present and well-formed.
pub fn content_length(req: &HttpRequest) -> Option<u64> {
    header_str(req, &CONTENT_LENGTH).and_then(|v| v.trim().parse().ok())
}

/// `Content-Type`, when present.
pub fn content_type(req: &HttpRequest) -> Option<String> {
    header_str(req, &CONTENT_TYPE).map(str::to_owned)
}

/// An upload chunk's `Content-Range: <start>-<end>`. `Ok(None)` when absent, `Err(())` when
/// malformed.
pub fn chunk_range(req: &HttpRequest) -> std::result::Result<Option<ChunkRange>, ()> {
    let Some(raw) = req.headers().get("content-range") else {
        return Ok(None);
    };
    let raw = raw.to_str().map_err(|_| ())?.trim();
    let (a, b) = raw.split_once('-').ok_or(())?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    if !digits(a) || !digits(b) {
        return Err(());
    }
    let start = a.parse().map_err(|_| ())?;
    let end = b.parse().map_err(|_| ())?;
    if end < start {
        return Err(());
    }
    Ok(Some(ChunkRange { start, end }))
}

/// A blob GET's `Range: bytes=…`. Absent or of another unit: `Ok(None)` (serve it whole).
/// A `bytes` range that does not parse, or asks for several ranges, is unsatisfiable.
pub fn byte_range(req: &HttpRequest) -> std::result::Result<Option<ByteRange>, ()> {
    let Some(raw) = req.headers().get("range") else {
        return Ok(None);
    };
    let raw = raw.to_str().map_err(|_| ())?.trim();
    let Some(spec) = raw.strip_prefix("bytes=") else {
        return Ok(None);
    };
    let spec = spec.trim();
    if spec.contains(',') {
        return Err(());
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let num = |s: &str| -> std::result::Result<u64, ()> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            return Err(());
        }
        s.parse().map_err(|_| ())
    };
    Ok(Some(match (a.trim(), b.trim()) {
        ("", n) => ByteRange::Suffix(num(n)?),
        (s, "") => ByteRange::From {
            start: num(s)?,
            end: None,
        },
        (s, e) => ByteRange::From {
            start: num(s)?,
            end: Some(num(e)?),
        },
    }))
}

/// A request body as a stream of `io::Result<Bytes>`, for the services.
pub fn body_stream(payload: actix_web::web::Payload) -> impl Stream<Item = std::io::Result<Bytes>> + Unpin {
    payload.map(|r| r.map_err(std::io::Error::other))
}

/// Reads a whole (small) body, refusing more than `limit` bytes.
pub async fn read_limited(mut payload: actix_web::web::Payload, limit: usize) -> Result<Bytes> {
    let mut buf = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| Error::BodyRead(e.to_string()))?;
        if buf.len() + chunk.len() > limit {
            return Err(Error::ManifestTooLarge { limit });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

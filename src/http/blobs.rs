//! `/v2/<name>/blobs/<digest>`: GET (with `Range`, or a 307 to the object store when downloads
//! are redirected), HEAD, DELETE.

use actix_web::http::header::{ACCEPT_RANGES, CONTENT_RANGE, CONTENT_TYPE, ETAG, LOCATION};
use actix_web::{HttpRequest, HttpResponse, web};

use super::extract;
use crate::error::{Error, Result};
use crate::registry::Registry;

const DIGEST_HEADER: &str = "Docker-Content-Digest";

pub async fn get(req: HttpRequest, reg: web::Data<Registry>) -> Result<HttpResponse> {
    let repo = extract::repo(&req)?;
    let digest = extract::digest_param(&req, "digest")?;
    // A hosted Spack buildcache with fallbacks (`[[spack.merge]]`) may serve it from one.
    let repo = reg.blob_source(&repo, &digest).await?;
    if let Some(url) = reg.blob_redirect(&repo, &digest).await? {
        // The store answers the client's `Range` itself.
        return Ok(HttpResponse::TemporaryRedirect()
            .insert_header((LOCATION, url))
            .insert_header((DIGEST_HEADER, digest.to_string()))
            .finish());
    }
    let range = match extract::byte_range(&req) {
        Ok(r) => r,
        Err(()) => {
            let size = reg.blob_size(&repo, &digest).await?;
            return Err(Error::RangeNotSatisfiable { size });
        }
    };
    let blob = reg.get_blob(&repo, &digest, range).await?;
    let mut resp = match &blob.range {
        Some(r) => {
            let mut b = HttpResponse::PartialContent();
            b.insert_header((CONTENT_RANGE, format!("bytes {}-{}/{}", r.start, r.end - 1, blob.size)));
            b
        }
        None => HttpResponse::Ok(),
    };
    let len = blob.range.as_ref().map_or(blob.size, |r| r.end - r.start);
    resp.insert_header((CONTENT_TYPE, "application/octet-stream"))
        .insert_header((DIGEST_HEADER, digest.to_string()))
        .insert_header((ETAG, format!("\"{digest}\"")))
        .insert_header((ACCEPT_RANGES, "bytes"))
        .no_chunking(len);
    Ok(resp.streaming(blob.body))
}

pub async fn head(req: HttpRequest, reg: web::Data<Registry>) -> Result<HttpResponse> {
    let repo = extract::repo(&req)?;
    let digest = extract::digest_param(&req, "digest")?;
    let repo = reg.blob_source(&repo, &digest).await?;
    let size = reg.blob_size(&repo, &digest).await?;
    Ok(HttpResponse::Ok()
        .insert_header((CONTENT_TYPE, "application/octet-stream"))
        .insert_header((DIGEST_HEADER, digest.to_string()))
        .insert_header((ETAG, format!("\"{digest}\"")))
        .insert_header((ACCEPT_RANGES, "bytes"))
        .no_chunking(size)
        .streaming(super::empty_body()))
}

pub async fn delete(req: HttpRequest, reg: web::Data<Registry>) -> Result<HttpResponse> {
    let repo = extract::repo(&req)?;
    let digest = extract::digest_param(&req, "digest")?;
    reg.delete_blob(&repo, &digest, &super::audit::actor(&req)).await?;
    Ok(HttpResponse::Accepted().finish())
}

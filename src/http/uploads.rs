//! `/v2/<name>/blobs/uploads/…`: POST (session, single request, mount), PATCH, PUT, GET
//! status, DELETE.

use actix_web::http::header::{LOCATION, RANGE};
use actix_web::{HttpMessage as _, HttpRequest, HttpResponse, web};
use uuid::Uuid;

use super::error::upload_range;
use super::extract;
use crate::auth::{Auth, Principal};
use crate::error::{Error, Result};
use crate::oci::{Digest, RepoName};
use crate::registry::{Chunk, Registry};

/// Where a session is addressed (relative, so it works behind any proxy).
pub(super) fn upload_location(repo: &RepoName, id: Uuid) -> String {
    format!("/v2/{repo}/blobs/uploads/{}", id.simple())
}

/// The user a request acts as: an upload session belongs to the user who opened it.
fn who(req: &HttpRequest) -> Option<String> {
    req.extensions()
        .get::<Principal>()
        .and_then(|p| p.user().map(str::to_owned))
}

fn upload_id(req: &HttpRequest) -> Result<Uuid> {
    req.match_info()
        .get("uuid")
        .and_then(|u| Uuid::try_parse(u).ok())
        .ok_or(Error::UploadUnknown)
}

/// 202 with the headers of an open session at `offset`.
fn session_response(
    mut builder: actix_web::HttpResponseBuilder,
    repo: &RepoName,
    id: Uuid,
    offset: u64,
) -> HttpResponse {
    builder
        .insert_header((LOCATION, upload_location(repo, id)))
        .insert_header((RANGE, upload_range(offset)))
        .insert_header(("Docker-Upload-UUID", id.hyphenated().to_string()))
        .finish()
}

fn blob_created(repo: &RepoName, digest: &Digest) -> HttpResponse {
    HttpResponse::Created()
        .insert_header((LOCATION, format!("/v2/{repo}/blobs/{digest}")))
        .insert_header(("Docker-Content-Digest", digest.to_string()))
        .finish()
}

fn digest_query(q: &[(String, String)]) -> Result<Option<Digest>> {
    extract::query_param(q, "digest").map(str::parse).transpose()
}

pub async fn start(
    req: HttpRequest,
    reg: web::Data<Registry>,
    auth: web::Data<Auth>,
    body: web::Payload,
) -> Result<HttpResponse> {
    let repo = extract::repo(&req)?;
    let q = extract::query(&req);
    if let Some(mount) = extract::query_param(&q, "mount") {
        let digest: Digest = mount.parse()?;
        // An unusable `from` is treated like an unknown source: fall back to a session.
        let from = extract::query_param(&q, "from").and_then(|f| f.parse::<RepoName>().ok());
        let has_from = extract::query_param(&q, "from").is_some();
        // A source the caller may not read is treated like one that lacks the blob.
        let permitted = super::auth::may_mount_from(&auth, &req, &repo, from.as_ref())?;
        if permitted && (from.is_some() || !has_from) && reg.mount_blob(&repo, &digest, from.as_ref()).await? {
            return Ok(blob_created(&repo, &digest));
        }
    } else if let Some(digest) = digest_query(&q)? {
        reg.upload_whole(&repo, &digest, extract::body_stream(body)).await?;
        return Ok(blob_created(&repo, &digest));
    }
    let id = reg.start_upload(&repo, who(&req).as_deref()).await?;
    Ok(session_response(HttpResponse::Accepted(), &repo, id, 0))
}

pub async fn status(req: HttpRequest, reg: web::Data<Registry>) -> Result<HttpResponse> {
    let repo = extract::repo(&req)?;
    let id = upload_id(&req)?;
    let offset = reg.upload_offset(&repo, id, who(&req).as_deref()).await?;
    Ok(session_response(HttpResponse::NoContent(), &repo, id, offset))
}

/// The chunk range of a PATCH or PUT; a malformed one is answered like an out-of-order chunk.
async fn chunk_range(
    req: &HttpRequest,
    reg: &Registry,
    repo: &RepoName,
    id: Uuid,
) -> Result<Option<crate::registry::ChunkRange>> {
    match extract::chunk_range(req) {
        Ok(r) => Ok(r),
        Err(()) => {
            let offset = reg.upload_offset(repo, id, who(req).as_deref()).await?;
            Err(Error::UploadOutOfOrder {
                repo: repo.clone(),
                id,
                offset,
            })
        }
    }
}

pub async fn patch(req: HttpRequest, reg: web::Data<Registry>, body: web::Payload) -> Result<HttpResponse> {
    let repo = extract::repo(&req)?;
    let id = upload_id(&req)?;
    let range = chunk_range(&req, &reg, &repo, id).await?;
    let chunk = Chunk {
        range,
        content_length: extract::content_length(&req),
        body: extract::body_stream(body),
    };
    let offset = reg.upload_chunk(&repo, id, who(&req).as_deref(), chunk).await?;
    Ok(session_response(HttpResponse::Accepted(), &repo, id, offset))
}

pub async fn finish(req: HttpRequest, reg: web::Data<Registry>, body: web::Payload) -> Result<HttpResponse> {
    let repo = extract::repo(&req)?;
    let id = upload_id(&req)?;
    let digest =
        digest_query(&extract::query(&req))?.ok_or(Error::DigestInvalid("the digest query parameter is required"))?;
    let range = chunk_range(&req, &reg, &repo, id).await?;
    let chunk = Chunk {
        range,
        content_length: extract::content_length(&req),
        body: extract::body_stream(body),
    };
    reg.finish_upload(&repo, id, who(&req).as_deref(), &digest, chunk)
        .await?;
    Ok(blob_created(&repo, &digest))
}

pub async fn cancel(req: HttpRequest, reg: web::Data<Registry>) -> Result<HttpResponse> {
    let repo = extract::repo(&req)?;
    let id = upload_id(&req)?;
    reg.cancel_upload(&repo, id, who(&req).as_deref()).await?;
    Ok(HttpResponse::NoContent().finish())
}

//! `/v2/<name>/manifests/<reference>`: GET, HEAD, PUT, DELETE.
//!
//! PUT and DELETE pass on whether the caller has the `overwrite` action on the repository; the
//! catalog decides, in its write transaction, whether an immutable tag needs it.

use actix_web::http::header::{CONTENT_TYPE, ETAG, LOCATION};
use actix_web::{HttpRequest, HttpResponse, web};

use super::extract;
use crate::auth::{Auth, Overwrite};
use crate::error::{Error, Result};
use crate::oci::Reference;
use crate::registry::Registry;

/// A reference on a read: a malformed tag can name nothing, so it is simply unknown.
fn read_reference(req: &HttpRequest) -> Result<Reference> {
    extract::reference(req).map_err(|e| match e {
        Error::TagInvalid => Error::ManifestUnknown,
        other => other,
    })
}

async fn lookup(req: HttpRequest, reg: web::Data<Registry>, with_content: bool) -> Result<HttpResponse> {
    let repo = extract::repo(&req)?;
    let reference = read_reference(&req)?;
    let served = match &reference {
        Reference::Tag(t) if t.as_str() == crate::spack::INDEX_TAG => reg.spack_index(&repo, with_content).await?,
        _ => None,
    };
    let m = match served {
        Some(m) => m,
        None => match reg.get_manifest(&repo, &reference, with_content).await {
            // A hosted Spack buildcache with fallbacks (`[[spack.merge]]`) looks there next.
            Err(Error::ManifestUnknown) if reg.spack_fallbacks(&repo).is_some() => {
                reg.fallback_manifest(&repo, &reference, with_content).await?
            }
            other => other?,
        },
    };
    let mut resp = HttpResponse::Ok();
    resp.insert_header((CONTENT_TYPE, m.media_type))
        .insert_header(("Docker-Content-Digest", m.digest.clone()))
        .insert_header((ETAG, format!("\"{}\"", m.digest)));
    Ok(match m.content {
        Some(body) => resp.body(body),
        None => resp.no_chunking(m.size).streaming(super::empty_body()),
    })
}

pub async fn get(req: HttpRequest, reg: web::Data<Registry>) -> Result<HttpResponse> {
    lookup(req, reg, true).await
}

pub async fn head(req: HttpRequest, reg: web::Data<Registry>) -> Result<HttpResponse> {
    lookup(req, reg, false).await
}

/// Whether the caller may overwrite immutable tags of `repo`.
fn overwrite(req: &HttpRequest, auth: &Auth, repo: &crate::oci::RepoName) -> Overwrite {
    match super::auth::principal(req) {
        Some(who) => auth.overwrite(&who, repo.as_str()),
        None => Overwrite::Refused,
    }
}

pub async fn put(
    req: HttpRequest,
    reg: web::Data<Registry>,
    auth: web::Data<Auth>,
    body: web::Payload,
) -> Result<HttpResponse> {
    let repo = extract::repo(&req)?;
    let reference = extract::reference(&req)?;
    let limit = reg.settings().max_manifest_size;
    if extract::content_length(&req).is_some_and(|l| l > limit as u64) {
        return Err(Error::ManifestTooLarge { limit });
    }
    let body = extract::read_limited(body, limit).await.map_err(|e| match e {
        // The upload code would be wrong here: no blob upload is involved.
        Error::BodyRead(why) => Error::ManifestInvalid(format!("manifest body could not be read: {why}").into()),
        other => other,
    })?;
    let overwrite = overwrite(&req, &auth, &repo);
    // Blobs a client found in a fallback (`[[spack.merge]]`) and did not upload.
    reg.link_fallback_blobs(&repo, &body, extract::content_type(&req).as_deref())
        .await?;
    let out = reg
        .put_manifest(
            &repo,
            reference,
            extract::content_type(&req),
            body,
            overwrite,
            &super::audit::actor(&req),
        )
        .await?;
    let mut resp = HttpResponse::Created();
    resp.insert_header((LOCATION, format!("/v2/{repo}/manifests/{}", out.digest)))
        .insert_header(("Docker-Content-Digest", out.digest.to_string()));
    if let Some(subject) = out.subject {
        resp.insert_header(("OCI-Subject", subject.to_string()));
    }
    Ok(resp.finish())
}

pub async fn delete(req: HttpRequest, reg: web::Data<Registry>, auth: web::Data<Auth>) -> Result<HttpResponse> {
    let repo = extract::repo(&req)?;
    let reference = read_reference(&req)?;
    let overwrite = overwrite(&req, &auth, &repo);
    reg.delete_manifest(&repo, &reference, overwrite, &super::audit::actor(&req))
        .await?;
    Ok(HttpResponse::Accepted().finish())
}

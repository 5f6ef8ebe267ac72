//! The Spack API beside `/v2/`: search a build cache's specs, show one spec with its dependency
//! DAG, and ask which of a list of hashes a cache lacks (for CI deciding what to build).
//!
//! ```text
//! GET  /stowage/v1/spack/<repo>/specs?name=&version=&hash=&platform=&os=&target=&arch=&compiler=&limit=&offset=
//! GET  /stowage/v1/spack/<repo>/specs/<hash>
//! POST /stowage/v1/spack/<repo>/missing      {"hashes":["<hash>",…]}  ->  {"missing":[…]}
//! ```

use actix_web::http::header::CONTENT_TYPE;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;

use super::extract;
use crate::catalog::SpecQuery;
use crate::error::{Error, Result};
use crate::registry::Registry;

/// Results per page when `limit` is absent, and the most a page may hold.
const DEFAULT_LIMIT: u64 = 100;
const MAX_LIMIT: u64 = 10_000;
/// Most hashes one `missing` query may ask about.
const MAX_HASHES: usize = 100_000;

fn valid_hash(h: &str) -> bool {
    !h.is_empty() && h.len() <= 64 && h.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

fn json(body: serde_json::Value) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((CONTENT_TYPE, "application/json"))
        .body(body.to_string())
}

pub async fn specs(req: HttpRequest, reg: web::Data<Registry>) -> Result<HttpResponse> {
    let repo = extract::repo(&req)?;
    let q = extract::query(&req);
    let get = |k: &str| extract::query_param(&q, k).filter(|v| !v.is_empty()).map(str::to_owned);
    let number = |k: &str, default: u64| -> Result<u64> {
        match extract::query_param(&q, k) {
            None | Some("") => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| Error::PaginationInvalid("limit and offset must be non-negative integers")),
        }
    };
    let hash_prefix = get("hash");
    if hash_prefix.as_deref().is_some_and(|h| !valid_hash(h)) {
        return Err(Error::DigestInvalid("a Spack hash is lower-case letters and digits"));
    }
    let (mut platform, mut os, mut target) = (get("platform"), get("os"), get("target"));
    if let Some(arch) = get("arch") {
        // platform-os-target, as `spack arch` prints it.
        let mut parts = arch.splitn(3, '-');
        platform = parts.next().map(str::to_owned);
        os = parts.next().map(str::to_owned);
        target = parts.next().map(str::to_owned);
    }
    let query = SpecQuery {
        name: get("name"),
        version: get("version"),
        hash_prefix,
        platform,
        os,
        target,
        compiler: get("compiler"),
        limit: number("limit", DEFAULT_LIMIT)?.min(MAX_LIMIT),
        offset: number("offset", 0)?,
    };
    let specs = reg
        .catalog()
        .spack_specs(&repo, query)
        .await?
        .ok_or(Error::NameUnknown)?;
    Ok(json(serde_json::json!({ "repository": repo.as_str(), "specs": specs })))
}

pub async fn spec(req: HttpRequest, reg: web::Data<Registry>) -> Result<HttpResponse> {
    let repo = extract::repo(&req)?;
    let hash = req.match_info().get("hash").unwrap_or_default().to_owned();
    if !valid_hash(&hash) {
        return Err(Error::DigestInvalid("a Spack hash is lower-case letters and digits"));
    }
    let spec = reg
        .catalog()
        .spack_spec(&repo, hash)
        .await?
        .ok_or(Error::ManifestUnknown)?;
    let missing: Vec<&str> = spec
        .dependencies
        .iter()
        .filter(|d| !d.in_buildcache && !d.external)
        .map(|d| d.hash.as_str())
        .collect();
    Ok(json(
        serde_json::json!({ "spec": spec, "missing_dependencies": missing }),
    ))
}

#[derive(Deserialize)]
struct MissingRequest {
    hashes: Vec<String>,
}

pub async fn missing(req: HttpRequest, reg: web::Data<Registry>, body: web::Payload) -> Result<HttpResponse> {
    let repo = extract::repo(&req)?;
    let body = extract::read_limited(body, 8 * 1024 * 1024)
        .await
        .map_err(|e| match e {
            Error::ManifestTooLarge { .. } => Error::SizeInvalid,
            other => other,
        })?;
    let request: MissingRequest = serde_json::from_slice(&body)
        .map_err(|_| Error::ManifestInvalid("expected a JSON body {\"hashes\": [\"<hash>\", …]}".into()))?;
    if request.hashes.len() > MAX_HASHES {
        return Err(Error::SizeInvalid);
    }
    if request.hashes.iter().any(|h| !valid_hash(h)) {
        return Err(Error::DigestInvalid("a Spack hash is lower-case letters and digits"));
    }
    let hashes = request.hashes.clone();
    let missing = reg
        .catalog()
        .spack_missing(&repo, request.hashes)
        .await?
        .unwrap_or(hashes);
    Ok(json(serde_json::json!({ "missing": missing })))
}

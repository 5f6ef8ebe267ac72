//! The Spack API beside `/v2/`: search a build cache's specs, show one spec with its dependency
//! DAG, and ask which of a list of hashes a cache lacks (for CI deciding what to build).
//!
//! ```text
//! GET  /stowage/v1/spack/<repo>/specs?name=&version=&hash=&platform=&os=&target=&arch=&compiler=&limit=&after=&offset=
//! GET  /stowage/v1/spack/<repo>/specs/<hash>
//! GET  /stowage/v1/spack/<repo>/specs/<hash>/dependents?transitive=1&limit=&after=
//!      -> {"repository","hash","transitive","dependents":[{hash,name,version,tag,deptypes}],"next"}
//! POST /stowage/v1/spack/<repo>/missing      {"hashes":["<hash>",…]}  ->  {"missing":[…]}
//! ```
//!
//! Searches list specs in tag order; `after` (the last tag of a page) asks for the next page
//! without the cost of `offset`. Dependents are the cached specs depending on a node of the
//! cache (a spec, or a dependency it lacks): directly, or with `transitive=1` anywhere in their
//! DAG; `next`, when not null, is the `after` of the following page. Both are index range scans
//! (see `catalog::spack`), so neither is bounded by anything but `limit`.
//!
//! And keep-lists, which retention honours (see `registry::retention`): a named set of spec
//! hashes kept, with their link/run dependency closure, until it expires. Listing needs pull on
//! the repository; creating, replacing and deleting need push.
//!
//! ```text
//! POST   /stowage/v1/spack/<repo>/keep   {"name":"ci-2026-11","expires_in":1209600,"hashes":["<hash>",…]}
//!                                        or {"name":…,"expires_at":<unix s>,"lockfile":<spack.lock, JSON or text>}
//!                                        -> 201 {"name","expires_at","hashes":<count>}
//! GET    /stowage/v1/spack/<repo>/keep   -> {"keep":[{"name","created_at","expires_at","created_by","hashes":[…],"expired"}]}
//! DELETE /stowage/v1/spack/<repo>/keep/<name>  -> 204
//! ```
//!
//! A lockfile contributes the hashes of its `roots` (`{"roots":[{"hash":…,"spec":…}],…}`); the
//! closure brings in the rest. Exactly one of `expires_at` and `expires_in` is required, and the
//! expiry may be at most `gc.keep_list_max_secs` ahead. POSTing an existing name replaces it.

use actix_web::http::header::CONTENT_TYPE;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;

use super::extract;
use crate::catalog::SpecQuery;
use crate::config::Period;
use crate::error::{Error, Result};
use crate::registry::Registry;

/// Results per page when `limit` is absent, and the most a page may hold.
const DEFAULT_LIMIT: u64 = 100;
const MAX_LIMIT: u64 = 10_000;
/// Most hashes one `missing` query may ask about.
const MAX_HASHES: usize = 100_000;
/// Most hashes one keep-list may name: it is stored in one write transaction (about 20 ms at
/// this size). Its roots are enough: the closure brings in their dependencies.
const MAX_KEEP_HASHES: usize = 10_000;
/// Largest keep-list request body: a `spack.lock` of a large environment is a few MiB.
const MAX_KEEP_BODY: usize = 32 * 1024 * 1024;
/// Longest keep-list name.
const MAX_KEEP_NAME: usize = 128;

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
        after: get("after"),
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

/// `GET …/specs/<hash>/dependents`: the cached specs depending on `hash`, in keyset pages.
pub async fn dependents(req: HttpRequest, reg: web::Data<Registry>) -> Result<HttpResponse> {
    let repo = extract::repo(&req)?;
    let hash = req.match_info().get("hash").unwrap_or_default().to_owned();
    if !valid_hash(&hash) {
        return Err(Error::DigestInvalid("a Spack hash is lower-case letters and digits"));
    }
    let q = extract::query(&req);
    let transitive = match extract::query_param(&q, "transitive") {
        None | Some("" | "0" | "false") => false,
        Some("1" | "true") => true,
        Some(_) => return Err(Error::PaginationInvalid("transitive is 1 or 0")),
    };
    let limit = match extract::query_param(&q, "limit") {
        None | Some("") => DEFAULT_LIMIT,
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or(Error::PaginationInvalid("limit must be a positive integer"))?
            .min(MAX_LIMIT),
    };
    // A cursor is a hash (direct) or a spec tag (transitive): letters, digits and `-_.`.
    let after = extract::query_param(&q, "after").filter(|a| !a.is_empty());
    if after.is_some_and(|a| {
        a.len() > 256
            || !a
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    }) {
        return Err(Error::PaginationInvalid("after is the \"next\" of a previous page"));
    }
    let page = reg
        .catalog()
        .spack_dependents(&repo, hash.clone(), transitive, after.map(str::to_owned), limit)
        .await?
        .ok_or(Error::ManifestUnknown)?;
    Ok(json(serde_json::json!({
        "repository": repo.as_str(),
        "hash": hash,
        "transitive": transitive,
        "dependents": page.dependents,
        "next": page.next,
    })))
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeepRequest {
    name: String,
    expires_at: Option<i64>,
    expires_in: Option<u64>,
    hashes: Option<Vec<String>>,
    lockfile: Option<serde_json::Value>,
}

fn keep_invalid(why: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::ManifestInvalid(why.into())
}

/// A keep-list name: 1 to 128 letters, digits, `.`, `_` and `-`, starting with a letter or digit.
fn valid_keep_name(name: &str) -> bool {
    name.len() <= MAX_KEEP_NAME
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The root hashes of a `spack.lock` (the JSON document, or its text in a string).
fn lockfile_roots(lockfile: serde_json::Value) -> Result<Vec<String>> {
    let doc = match lockfile {
        serde_json::Value::String(text) => {
            serde_json::from_str(&text).map_err(|_| keep_invalid("lockfile is not a spack.lock: it is not JSON"))?
        }
        other => other,
    };
    let roots = doc
        .get("roots")
        .and_then(|r| r.as_array())
        .ok_or_else(|| keep_invalid("lockfile is not a spack.lock: it has no \"roots\" list"))?;
    roots
        .iter()
        .map(|r| {
            r.get("hash")
                .and_then(|h| h.as_str())
                .map(str::to_owned)
                .ok_or_else(|| keep_invalid("lockfile is not a spack.lock: a root has no \"hash\""))
        })
        .collect()
}

pub async fn keep_create(req: HttpRequest, reg: web::Data<Registry>, body: web::Payload) -> Result<HttpResponse> {
    let repo = extract::repo(&req)?;
    let body = extract::read_limited(body, MAX_KEEP_BODY).await.map_err(|e| match e {
        Error::ManifestTooLarge { .. } => Error::SizeInvalid,
        other => other,
    })?;
    let request: KeepRequest = serde_json::from_slice(&body).map_err(|e| {
        keep_invalid(format!(
            "expected a JSON body {{\"name\", \"expires_at\" or \"expires_in\", \"hashes\" or \"lockfile\"}}: {e}"
        ))
    })?;
    if !valid_keep_name(&request.name) {
        return Err(keep_invalid(
            "a keep-list name is 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit",
        ));
    }
    let hashes = match (request.hashes, request.lockfile) {
        (Some(h), None) => h,
        (None, Some(lock)) => lockfile_roots(lock)?,
        _ => return Err(keep_invalid("give exactly one of \"hashes\" and \"lockfile\"")),
    };
    if hashes.is_empty() {
        return Err(keep_invalid("a keep-list needs at least one hash"));
    }
    if hashes.len() > MAX_KEEP_HASHES {
        return Err(keep_invalid(format!(
            "a keep-list names at most {MAX_KEEP_HASHES} hashes (its roots: their dependencies are kept with them)"
        )));
    }
    if hashes.iter().any(|h| !valid_hash(h)) {
        return Err(Error::DigestInvalid("a Spack hash is lower-case letters and digits"));
    }
    let now = crate::catalog::now();
    let max = reg.settings().keep_list_max.as_secs();
    let max_at = now.saturating_add(i64::try_from(max).unwrap_or(i64::MAX));
    let expires_at = match (request.expires_at, request.expires_in) {
        (Some(at), None) => at,
        (None, Some(secs)) => now.saturating_add(i64::try_from(secs).unwrap_or(i64::MAX)),
        _ => return Err(keep_invalid("give exactly one of \"expires_at\" and \"expires_in\"")),
    };
    if expires_at <= now || expires_at > max_at {
        let most = Period::parse(&max.to_string()).map_or_else(|_| format!("{max}s"), |p| p.to_string());
        return Err(keep_invalid(format!(
            "the expiry must be in the future and at most {most} ({max} s, gc.keep_list_max_secs) ahead"
        )));
    }
    let created_by = super::auth::principal(&req).and_then(|p| p.user().map(str::to_owned));
    let count = hashes.len();
    let name = request.name;
    if !reg
        .catalog()
        .put_keep_list(&repo, name.clone(), expires_at, created_by.clone(), hashes)
        .await?
    {
        return Err(Error::NameUnknown);
    }
    tracing::info!(repo = %repo, keep_list = %name, hashes = count, expires_at, user = created_by, "Spack keep-list stored");
    Ok(HttpResponse::Created()
        .insert_header((CONTENT_TYPE, "application/json"))
        .body(serde_json::json!({ "name": name, "expires_at": expires_at, "hashes": count }).to_string()))
}

pub async fn keep_list(req: HttpRequest, reg: web::Data<Registry>) -> Result<HttpResponse> {
    let repo = extract::repo(&req)?;
    let lists = reg.catalog().keep_lists(&repo).await?.ok_or(Error::NameUnknown)?;
    let now = crate::catalog::now();
    let lists: Vec<serde_json::Value> = lists
        .into_iter()
        .map(|l| {
            let expired = l.expires_at <= now;
            let mut v = serde_json::json!(l);
            v["expired"] = serde_json::Value::Bool(expired);
            v
        })
        .collect();
    Ok(json(serde_json::json!({ "repository": repo.as_str(), "keep": lists })))
}

pub async fn keep_delete(req: HttpRequest, reg: web::Data<Registry>) -> Result<HttpResponse> {
    let repo = extract::repo(&req)?;
    let name = req.match_info().get("keep").unwrap_or_default().to_owned();
    if !valid_keep_name(&name) || !reg.catalog().delete_keep_list(&repo, name.clone()).await? {
        return Err(Error::ManifestUnknown);
    }
    tracing::info!(repo = %repo, keep_list = %name, "Spack keep-list deleted");
    Ok(HttpResponse::NoContent().finish())
}

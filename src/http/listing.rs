//! Listings: `/v2/<name>/tags/list`, `/v2/_catalog` (both paginated with `n`/`last` and a
//! relative `Link` header), and `/v2/<name>/referrers/<digest>`.
//!
//! `/v2/_catalog` lists only the repositories the caller may pull. The filter runs inside one
//! catalog query that examines at most `max(n + 1, CATALOG_SCAN)` names, whatever the number
//! of repositories: when that bound is reached before the page fills, the answer holds what was
//! found (possibly nothing) and a `Link` to continue after the last name examined, so a client
//! that follows `Link` headers (as the spec asks) still sees every repository it may pull.
//! `n=0` answers an empty list without a query.

use actix_web::http::header::{CONTENT_TYPE, LINK};
use actix_web::{HttpRequest, HttpResponse, web};

use super::extract;
use crate::auth::Auth;
use crate::error::{Error, Result};
use crate::oci::media;
use crate::registry::Registry;

/// `n` and `last` of a paginated listing.
struct Page {
    n: Option<u64>,
    last: Option<String>,
}

fn page(req: &HttpRequest) -> Result<Page> {
    let q = extract::query(req);
    let n = match extract::query_param(&q, "n") {
        None | Some("") => None,
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| Error::PaginationInvalid("n must be a non-negative integer"))?,
        ),
    };
    let last = extract::query_param(&q, "last")
        .filter(|l| !l.is_empty())
        .map(str::to_owned);
    Ok(Page { n, last })
}

/// Most repository names one `/v2/_catalog` request examines, beyond a page larger than this.
const CATALOG_SCAN: u64 = 10_000;

/// The `Link` to the page after `last`.
fn next_link(base: &str, n: u64, last: &str) -> String {
    format!("<{base}?n={n}&last={last}>; rel=\"next\"")
}

/// Trims a page fetched with one extra entry and builds its `Link`, if more remain.
fn paginate(mut items: Vec<String>, n: Option<u64>, base: &str) -> (Vec<String>, Option<String>) {
    let Some(n) = n else { return (items, None) };
    if (items.len() as u64) <= n {
        return (items, None);
    }
    items.truncate(n as usize);
    let link = items.last().map(|last| next_link(base, n, last));
    (items, link)
}

fn json_with_link(body: serde_json::Value, link: Option<String>) -> HttpResponse {
    let mut resp = HttpResponse::Ok();
    resp.insert_header((CONTENT_TYPE, "application/json"));
    if let Some(link) = link {
        resp.insert_header((LINK, link));
    }
    resp.body(body.to_string())
}

pub async fn tags(req: HttpRequest, reg: web::Data<Registry>) -> Result<HttpResponse> {
    let repo = extract::repo(&req)?;
    let page = page(&req)?;
    let fetch = page.n.map(|n| n.saturating_add(1));
    let tags = reg
        .catalog()
        .tags(&repo, page.last, fetch)
        .await?
        .ok_or(Error::NameUnknown)?;
    let (tags, link) = paginate(tags, page.n, &format!("/v2/{repo}/tags/list"));
    Ok(json_with_link(
        serde_json::json!({ "name": repo.as_str(), "tags": tags }),
        link,
    ))
}

/// `/v2/_catalog`: the repositories the caller may pull, paginated over that filtered list.
pub async fn catalog(req: HttpRequest, reg: web::Data<Registry>, auth: web::Data<Auth>) -> Result<HttpResponse> {
    const BASE: &str = "/v2/_catalog";
    let page = page(&req)?;
    let n = page.n.unwrap_or(reg.settings().catalog_page_size);
    let who = super::auth::principal(&req);
    let (Some(who), true) = (who, n > 0) else {
        return Ok(json_with_link(serde_json::json!({ "repositories": [] }), None));
    };
    let fetch = n.saturating_add(1);
    let auth = auth.into_inner();
    let listing = reg
        .catalog()
        .visible_repositories(page.last, fetch, fetch.max(CATALOG_SCAN), move |r| {
            auth.may_list(&who, r)
        })
        .await?;
    let (repos, link) = paginate(listing.names, Some(n), BASE);
    let link = link.or_else(|| listing.resume_after.map(|last| next_link(BASE, n, &last)));
    Ok(json_with_link(serde_json::json!({ "repositories": repos }), link))
}

pub async fn referrers(req: HttpRequest, reg: web::Data<Registry>) -> Result<HttpResponse> {
    let repo = extract::repo(&req)?;
    let digest = extract::digest_param(&req, "digest")?;
    let q = extract::query(&req);
    let artifact_type = extract::query_param(&q, "artifactType")
        .filter(|a| !a.is_empty())
        .map(str::to_owned);
    let filtered = artifact_type.is_some();
    let referrers = reg.catalog().referrers(&repo, &digest, artifact_type).await?;
    let manifests: Vec<serde_json::Value> = referrers
        .into_iter()
        .map(|r| {
            let mut d = serde_json::json!({ "mediaType": r.media_type, "digest": r.digest, "size": r.size });
            if let Some(a) = r.artifact_type {
                d["artifactType"] = a.into();
            }
            if let Some(ann) = r
                .annotations
                .and_then(|a| serde_json::from_str::<serde_json::Value>(&a).ok())
            {
                d["annotations"] = ann;
            }
            d
        })
        .collect();
    let body = serde_json::json!({ "schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": manifests });
    let mut resp = HttpResponse::Ok();
    resp.insert_header((CONTENT_TYPE, media::OCI_INDEX));
    if filtered {
        resp.insert_header(("OCI-Filters-Applied", "artifactType"));
    }
    Ok(resp.body(body.to_string()))
}

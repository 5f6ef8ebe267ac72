//! Listings: `/v2/<name>/tags/list`, `/v2/_catalog` (both paginated with `n`/`last` and a
//! relative `Link` header), and `/v2/<name>/referrers/<digest>`.

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

/// Trims a page fetched with one extra entry and builds its `Link`, if more remain.
fn paginate(mut items: Vec<String>, n: Option<u64>, base: &str) -> (Vec<String>, Option<String>) {
    let Some(n) = n else { return (items, None) };
    if (items.len() as u64) <= n {
        return (items, None);
    }
    items.truncate(n as usize);
    let link = items
        .last()
        .map(|last| format!("<{base}?n={n}&last={last}>; rel=\"next\""));
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
    let page = page(&req)?;
    let n = page.n.unwrap_or(reg.settings().catalog_page_size);
    let batch = n.saturating_add(1);
    let mut repos = Vec::new();
    let mut last = page.last;
    loop {
        let fetched = reg.catalog().repositories(last.clone(), batch).await?;
        let exhausted = (fetched.len() as u64) < batch;
        last = fetched.last().cloned();
        repos.extend(fetched.into_iter().filter(|r| super::auth::may_list(&auth, &req, r)));
        if exhausted || repos.len() as u64 >= batch {
            break;
        }
    }
    let (repos, link) = paginate(repos, Some(n), "/v2/_catalog");
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

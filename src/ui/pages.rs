//! The UI's page handlers and their templates (`web/templates/`). Each handler resolves the
//! viewer, checks the policy through `Auth`, calls one catalog query or registry service, and
//! renders a template; see the module doc of `ui` for the routes and the rules. The Spack
//! pages are in `spack`.

use std::collections::BTreeMap;

use actix_web::http::StatusCode;
use actix_web::http::header::SET_COOKIE;
use actix_web::{HttpRequest, HttpResponse, web};
use askama::Template;

use super::{UiError, Viewer, assets, html, see_other, session, set_cookie, view};
use crate::auth::{Action, Auth, AuthFail, Identity, Refusal};
use crate::error::{Error, Internal};
use crate::oci::{Digest, Reference, RepoName, Tag};
use crate::registry::Registry;

/// Rows per page unless `n` says otherwise, and the most `n` may ask.
const PAGE: u64 = 50;
const MAX_PAGE: u64 = 500;
/// Most repository names one repositories page examines (see `catalog::ui`).
const SCAN: u64 = 10_000;
/// Longest filter accepted.
const MAX_FILTER: usize = 256;
/// Largest form accepted (sign-in, sign-out, delete).
const MAX_FORM: usize = 8 * 1024;
/// Most tags listed on a manifest page.
const MAX_MANIFEST_TAGS: u64 = 100;

type Page = Result<HttpResponse, UiError>;

/// Config media types of container images (not artifact types of their own).
const IMAGE_CONFIGS: &[&str] = &[
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

/// What every page's frame shows: who is signed in, the sign-out form, the asset URLs.
pub struct Chrome {
    pub user: Option<String>,
    /// The viewer is an admin (the header links the admin pages).
    pub admin: bool,
    pub csrf: String,
    pub auth_enabled: bool,
    pub css: String,
    pub htmx: String,
    pub script: String,
}

impl Chrome {
    pub(super) fn new(viewer: Option<&Viewer>, csrf: String, auth_enabled: bool) -> Chrome {
        Chrome {
            user: viewer.and_then(|v| v.user.clone()),
            admin: viewer.is_some_and(|v| super::admin::is_admin(&v.principal)),
            csrf,
            auth_enabled,
            css: assets::url("style.css"),
            htmx: assets::url("htmx.min.js"),
            script: assets::url("ui.js"),
        }
    }
}

pub(super) fn render(t: &impl Template) -> Result<String, UiError> {
    t.render().map_err(|e| {
        tracing::error!(error = %e, "rendering a UI template failed");
        UiError::Failed
    })
}

/// The query parameters of a listing page.
struct ListQuery {
    filter: String,
    after: Option<String>,
    n: u64,
}

fn list_query(req: &HttpRequest) -> Result<ListQuery, UiError> {
    let q = crate::http::query(req);
    let filter = crate::http::query_param(&q, "q").unwrap_or_default().trim().to_owned();
    if filter.len() > MAX_FILTER {
        return Err(UiError::BadRequest("the filter is too long (256 bytes at most)"));
    }
    let after = crate::http::query_param(&q, "after")
        .filter(|a| !a.is_empty())
        .map(str::to_owned);
    let n = match crate::http::query_param(&q, "n") {
        None | Some("") => PAGE,
        Some(v) => v
            .parse::<u64>()
            .map_err(|_| UiError::BadRequest("n must be a positive integer"))?
            .clamp(1, MAX_PAGE),
    };
    Ok(ListQuery { filter, after, n })
}

/// The link to the page after `last`, keeping the filter and page size.
fn next_link(base: &str, q: &ListQuery, last: &str) -> String {
    let mut link = format!("{base}?after={}", view::query_value(last));
    if !q.filter.is_empty() {
        link.push_str(&format!("&q={}", view::query_value(&q.filter)));
    }
    if q.n != PAGE {
        link.push_str(&format!("&n={}", q.n));
    }
    link
}

/// `host[:port]` as the client reached the server, for pull lines.
pub(super) fn registry_host(auth: &Auth, req: &HttpRequest) -> String {
    let base = crate::http::base_url(auth, req);
    base.split_once("://").map_or(base.clone(), |(_, h)| h.to_owned())
}

// ---- Repositories --------------------------------------------------------------------------

struct RepoRow {
    name: String,
    tags: u64,
    size: String,
    /// The exact byte count behind `size` (shown on hover).
    bytes: u64,
    last_push: String,
}

#[derive(Template)]
#[template(path = "repositories.html")]
struct RepositoriesPage {
    chrome: Chrome,
    filter: String,
    rows: Vec<RepoRow>,
    next: Option<String>,
    anonymous: bool,
}

/// `GET /ui/`.
pub async fn repositories(
    req: HttpRequest,
    reg: web::Data<Registry>,
    auth: web::Data<Auth>,
    ui: web::Data<super::Ui>,
) -> Page {
    let viewer = Viewer::of(&req, &auth, &ui).await?;
    let q = list_query(&req)?;
    let who = viewer.principal.clone();
    let keep_auth = auth.clone().into_inner();
    let page = reg
        .catalog()
        .repository_summaries(
            q.after.clone(),
            Some(q.filter.clone()),
            q.n + 1,
            (q.n + 1).max(SCAN),
            move |r| keep_auth.may_list(&who, r),
        )
        .await?;
    let mut repos = page.repositories;
    let mut next = None;
    if repos.len() as u64 > q.n {
        repos.truncate(q.n as usize);
        next = repos.last().map(|r| next_link("/ui/", &q, &r.name));
    } else if let Some(resume) = page.resume_after {
        next = Some(next_link("/ui/", &q, &resume));
    }
    let rows = repos
        .into_iter()
        .map(|r| RepoRow {
            tags: r.tags,
            size: view::size(r.stored_bytes),
            bytes: r.stored_bytes,
            last_push: r.last_push.map(view::time).unwrap_or_else(|| "never".to_owned()),
            name: r.name,
        })
        .collect();
    let page = RepositoriesPage {
        chrome: Chrome::new(Some(&viewer), viewer.csrf(&ui), auth.enabled()),
        filter: q.filter,
        rows,
        next,
        anonymous: matches!(viewer.principal.identity, Identity::Anonymous),
    };
    Ok(html(&viewer, StatusCode::OK, render(&page)?))
}

// ---- One repository ------------------------------------------------------------------------

struct TagView {
    /// An index's platforms (`linux/amd64, linux/arm64/v8`), or a single image's (from its
    /// config, recorded at push time); empty when unknown.
    platforms: String,
    name: String,
    digest: String,
    short_digest: String,
    media_type: String,
    artifact_type: Option<String>,
    size: String,
    pushed_at: String,
    pulls: Vec<(&'static str, String)>,
}

#[derive(Template)]
#[template(path = "repository.html")]
struct RepositoryPage {
    chrome: Chrome,
    repo: String,
    filter: String,
    tags: Vec<TagView>,
    next: Option<String>,
    can_delete: bool,
    deleted: Option<String>,
    /// The repository is a Spack build cache (it has a server-maintained index).
    spack: bool,
}

/// The repository of a UI path, if the viewer may pull it (404 otherwise, whether or not it
/// exists).
pub(super) fn readable_repo(req: &HttpRequest, auth: &Auth, viewer: &Viewer) -> Result<RepoName, UiError> {
    let repo = req
        .match_info()
        .get("name")
        .and_then(|n| n.parse::<RepoName>().ok())
        .ok_or(UiError::NotFound)?;
    auth.authorize(&viewer.principal, repo.as_str(), Action::Pull)
        .map_err(|_| UiError::NotFound)?;
    Ok(repo)
}

/// The platforms an index lists, `os/architecture[/variant]`, comma-separated.
fn index_platforms(content: &[u8]) -> String {
    let json: serde_json::Value = serde_json::from_slice(content).unwrap_or(serde_json::Value::Null);
    json.get("manifests")
        .and_then(|m| m.as_array())
        .map(|m| {
            m.iter()
                .filter_map(|d| descriptor(d).platform)
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn short(digest: &str) -> String {
    let hex = digest.split_once(':').map_or(digest, |(_, h)| h);
    hex.chars().take(12).collect()
}

/// `GET /ui/repos/<name>`.
pub async fn repository(
    req: HttpRequest,
    reg: web::Data<Registry>,
    auth: web::Data<Auth>,
    ui: web::Data<super::Ui>,
) -> Page {
    let viewer = Viewer::of(&req, &auth, &ui).await?;
    let repo = readable_repo(&req, &auth, &viewer)?;
    let q = list_query(&req)?;
    let mut rows = reg
        .catalog()
        .tag_rows(&repo, q.after.clone(), Some(q.filter.clone()), q.n + 1)
        .await?
        .ok_or(UiError::NotFound)?;
    let base = format!("/ui/repos/{repo}");
    let next = if rows.len() as u64 > q.n {
        rows.truncate(q.n as usize);
        rows.last().map(|r| next_link(&base, &q, &r.name))
    } else {
        None
    };
    let host = registry_host(&auth, &req);
    let tags = rows
        .into_iter()
        .map(|r| TagView {
            platforms: match (r.index_content.as_deref(), r.platform) {
                (Some(index), _) => index_platforms(index),
                (None, platform) => platform.unwrap_or_default(),
            },
            pulls: view::pull_lines(&host, repo.as_str(), &format!(":{}", r.name)),
            short_digest: short(&r.digest),
            size: view::size(r.manifest_size + r.content_size),
            pushed_at: view::time(r.pushed_at),
            name: r.name,
            digest: r.digest,
            media_type: r.media_type,
            // The catalog records an image's config media type as its artifact type: only a
            // real artifact's type is worth showing.
            artifact_type: r.artifact_type.filter(|a| !IMAGE_CONFIGS.contains(&a.as_str())),
        })
        .collect();
    let can_delete =
        reg.settings().delete_enabled && auth.authorize(&viewer.principal, repo.as_str(), Action::Delete).is_ok();
    let deleted = crate::http::query_param(&crate::http::query(&req), "deleted")
        .filter(|t| t.parse::<Tag>().is_ok())
        .map(str::to_owned);
    let page = RepositoryPage {
        chrome: Chrome::new(Some(&viewer), viewer.csrf(&ui), auth.enabled()),
        repo: repo.to_string(),
        filter: q.filter,
        tags,
        next,
        can_delete,
        deleted,
        spack: reg.catalog().spack_index_state(&repo).await?.is_some(),
    };
    Ok(html(&viewer, StatusCode::OK, render(&page)?))
}

// ---- One manifest --------------------------------------------------------------------------

/// A descriptor as the manifest page shows it.
struct DescriptorView {
    media_type: String,
    digest: String,
    size: String,
    artifact_type: Option<String>,
    platform: Option<String>,
    annotations: Vec<(String, String)>,
}

pub(super) fn text_of(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn annotations_of(v: Option<&serde_json::Value>) -> Vec<(String, String)> {
    match v {
        Some(serde_json::Value::Object(map)) => map.iter().map(|(k, v)| (k.clone(), text_of(v))).collect(),
        _ => Vec::new(),
    }
}

fn descriptor(v: &serde_json::Value) -> DescriptorView {
    let s = |key: &str| v.get(key).map(text_of).unwrap_or_default();
    let platform = v.get("platform").map(|p| {
        let part = |key: &str| p.get(key).and_then(|x| x.as_str()).unwrap_or_default().to_owned();
        let mut out = format!("{}/{}", part("os"), part("architecture"));
        let variant = part("variant");
        if !variant.is_empty() {
            out.push('/');
            out.push_str(&variant);
        }
        let version = part("os.version");
        if !version.is_empty() {
            out.push_str(&format!(" ({version})"));
        }
        out
    });
    DescriptorView {
        media_type: s("mediaType"),
        digest: s("digest"),
        size: view::size(v.get("size").and_then(|x| x.as_u64()).unwrap_or(0)),
        artifact_type: v.get("artifactType").map(text_of),
        platform,
        annotations: annotations_of(v.get("annotations")),
    }
}

struct ReferrerView {
    digest: String,
    media_type: String,
    size: String,
    annotations: Vec<(String, String)>,
}

#[derive(Template)]
#[template(path = "manifest.html")]
struct ManifestPage {
    chrome: Chrome,
    repo: String,
    digest: String,
    media_type: String,
    size: String,
    artifact_type: Option<String>,
    tags: Vec<String>,
    /// The config descriptor (none for an index).
    config: Vec<DescriptorView>,
    layers: Vec<DescriptorView>,
    children: Vec<DescriptorView>,
    subject: Option<DescriptorView>,
    annotations: Vec<(String, String)>,
    referrers: Vec<(String, Vec<ReferrerView>)>,
    pulls: Vec<(&'static str, String)>,
}

/// `GET /ui/repos/<name>/-/manifests/<digest>`.
pub async fn manifest(
    req: HttpRequest,
    reg: web::Data<Registry>,
    auth: web::Data<Auth>,
    ui: web::Data<super::Ui>,
) -> Page {
    let viewer = Viewer::of(&req, &auth, &ui).await?;
    let repo = readable_repo(&req, &auth, &viewer)?;
    let digest = req
        .match_info()
        .get("digest")
        .and_then(|d| d.parse::<Digest>().ok())
        .ok_or(UiError::NotFound)?;
    let record = reg
        .catalog()
        .manifest(&repo, &Reference::Digest(digest.clone()), true)
        .await?
        .ok_or(UiError::NotFound)?;
    let content = record.content.unwrap_or_default();
    let json: serde_json::Value = serde_json::from_slice(&content).unwrap_or(serde_json::Value::Null);
    let list = |key: &str| -> Vec<DescriptorView> {
        json.get(key)
            .and_then(|v| v.as_array())
            .map(|a| a.iter().map(descriptor).collect())
            .unwrap_or_default()
    };
    let referrers = reg.catalog().referrers(&repo, &digest, None).await?;
    let mut grouped: BTreeMap<String, Vec<ReferrerView>> = BTreeMap::new();
    for r in referrers {
        let annotations = r
            .annotations
            .as_deref()
            .and_then(|a| serde_json::from_str::<serde_json::Value>(a).ok());
        grouped
            .entry(r.artifact_type.unwrap_or_else(|| "(no artifact type)".to_owned()))
            .or_default()
            .push(ReferrerView {
                digest: r.digest,
                media_type: r.media_type,
                size: view::size(r.size),
                annotations: annotations_of(annotations.as_ref()),
            });
    }
    let tags = reg
        .catalog()
        .tags_of_manifest(&repo, digest.to_string(), MAX_MANIFEST_TAGS)
        .await?;
    let host = registry_host(&auth, &req);
    let page = ManifestPage {
        chrome: Chrome::new(Some(&viewer), viewer.csrf(&ui), auth.enabled()),
        repo: repo.to_string(),
        digest: record.digest.clone(),
        media_type: record.media_type,
        size: view::size(record.size),
        artifact_type: json.get("artifactType").map(text_of),
        tags,
        config: json.get("config").map(descriptor).into_iter().collect(),
        layers: list("layers"),
        children: list("manifests"),
        subject: json.get("subject").map(descriptor),
        annotations: annotations_of(json.get("annotations")),
        referrers: grouped.into_iter().collect(),
        pulls: view::pull_lines(&host, repo.as_str(), &format!("@{}", record.digest)),
    };
    Ok(html(&viewer, StatusCode::OK, render(&page)?))
}

// ---- Forms ---------------------------------------------------------------------------------

pub(super) async fn read_form(body: web::Payload) -> Result<Vec<(String, String)>, UiError> {
    let body = crate::http::read_limited(body, MAX_FORM).await.map_err(|e| match e {
        Error::BodyRead(_) => UiError::BadRequest("the form did not arrive in time, or is unreadable"),
        _ => UiError::BadRequest("the form is too large"),
    })?;
    let text = std::str::from_utf8(&body).map_err(|_| UiError::BadRequest("the form is not UTF-8"))?;
    web::Query::<Vec<(String, String)>>::from_query(text)
        .map(|q| q.into_inner())
        .map_err(|_| UiError::BadRequest("the form is malformed"))
}

/// `POST /ui/repos/<name>/-/tags/<tag>/delete`: deletes the tag (not its manifest), as
/// `DELETE /v2/<name>/manifests/<tag>` does.
pub async fn delete_tag(
    req: HttpRequest,
    body: web::Payload,
    reg: web::Data<Registry>,
    auth: web::Data<Auth>,
    ui: web::Data<super::Ui>,
) -> Page {
    let viewer = Viewer::of(&req, &auth, &ui).await?;
    let form = read_form(body).await?;
    viewer.check_csrf(&ui, &form)?;
    let repo = readable_repo(&req, &auth, &viewer)?;
    let tag = req
        .match_info()
        .get("tag")
        .and_then(|t| t.parse::<Tag>().ok())
        .ok_or(UiError::NotFound)?;
    if let Err(refusal) = auth.authorize(&viewer.principal, repo.as_str(), Action::Delete) {
        let message = match refusal {
            Refusal::Denied(m) => m,
            _ => format!("sign in as a user who may delete in repository {repo}"),
        };
        crate::http::record_denied(&req, &viewer.principal, repo.as_str(), Action::Delete, &message);
        return Err(UiError::Forbidden(message));
    }
    if reg.is_read_only() {
        return Err(Error::ReadOnly.into());
    }
    let overwrite = auth.overwrite(&viewer.principal, repo.as_str());
    reg.delete_manifest(
        &repo,
        &Reference::Tag(tag.clone()),
        overwrite,
        &crate::http::actor(&req),
    )
    .await
    .map_err(|e| match e {
        Error::ManifestUnknown => UiError::NotFound,
        other => other.into(),
    })?;
    tracing::info!(repo = %repo, tag = %tag, user = viewer.user.as_deref().unwrap_or(""), "tag deleted through the web UI");
    Ok(see_other(&format!("/ui/repos/{repo}?deleted={tag}")))
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    chrome: Chrome,
    error: Option<String>,
    username: String,
}

fn login_page(
    viewer: &Viewer,
    ui: &super::Ui,
    auth: &Auth,
    status: StatusCode,
    error: Option<String>,
    username: String,
) -> Page {
    let page = LoginPage {
        chrome: Chrome::new(Some(viewer), viewer.csrf(ui), auth.enabled()),
        error,
        username,
    };
    Ok(html(viewer, status, render(&page)?))
}

/// `GET /ui/login`.
pub async fn login_form(req: HttpRequest, auth: web::Data<Auth>, ui: web::Data<super::Ui>) -> Page {
    let viewer = Viewer::of(&req, &auth, &ui).await?;
    login_page(&viewer, &ui, &auth, StatusCode::OK, None, String::new())
}

/// `POST /ui/login`: `username`, `password`, `csrf`. A right password starts a session and
/// goes to the repositories page; a wrong one shows the form again (401); throttled attempts
/// are answered 429 with `Retry-After`, as on `/token`.
pub async fn login(req: HttpRequest, body: web::Payload, auth: web::Data<Auth>, ui: web::Data<super::Ui>) -> Page {
    let viewer = Viewer::of(&req, &auth, &ui).await?;
    let form = read_form(body).await?;
    viewer.check_csrf(&ui, &form)?;
    if !auth.enabled() {
        return Ok(see_other("/ui/"));
    }
    let user = crate::http::query_param(&form, "username")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let password = crate::http::query_param(&form, "password")
        .unwrap_or_default()
        .to_owned();
    if user.is_empty() || password.is_empty() {
        let error = Some("Enter your user name and password.".to_owned());
        return login_page(&viewer, &ui, &auth, StatusCode::BAD_REQUEST, error, user);
    }
    if crate::auth::password::is_token_secret(&password) {
        let error = Some("Sign in with your password; API tokens are for clients.".to_owned());
        return login_page(&viewer, &ui, &auth, StatusCode::UNAUTHORIZED, error, user);
    }
    let client = crate::http::client_ip(&auth, &req);
    let identity = match auth.login(&user, password, client).await {
        Ok(identity) => identity,
        Err(AuthFail::Refused(Refusal::TooManyAttempts(retry_after))) => {
            return Err(Error::TooManyLogins { retry_after }.into());
        }
        Err(AuthFail::Refused(Refusal::Busy(retry_after))) => {
            return Err(Error::LoginsBusy { retry_after }.into());
        }
        Err(fail @ AuthFail::Refused(_)) => {
            crate::http::record_login_failure(&req, &user, &fail);
            let error = Some("Wrong user name or password.".to_owned());
            return login_page(&viewer, &ui, &auth, StatusCode::UNAUTHORIZED, error, user);
        }
        Err(AuthFail::Internal(e)) => return Err(e.into()),
    };
    let Identity::User { name, epoch, .. } = identity else {
        return Err(Error::from(Internal::Other("a password login gave no user")).into());
    };
    // A new id at every sign-in (a session id is never carried over), and the one this browser
    // held before, if any, ends.
    if let Some(old) = &viewer.session {
        ui.sessions.remove(old);
    }
    let id = ui
        .sessions
        .create(&name, epoch)
        .ok_or_else(|| Error::from(Internal::Other("the random source failed")))?;
    tracing::info!(user = %name, %client, "signed in to the web UI");
    let mut resp = see_other("/ui/");
    let cookie = set_cookie(
        session::SESSION_COOKIE,
        &id,
        Some(ui.sessions.ttl().as_secs()),
        viewer.secure,
    );
    resp.headers_mut().append(
        SET_COOKIE,
        cookie
            .parse()
            .map_err(|_| Error::from(Internal::Other("a session cookie is not a header value")))?,
    );
    Ok(resp)
}

/// `POST /ui/logout`: ends the session (it no longer works, whoever holds the cookie).
pub async fn logout(req: HttpRequest, body: web::Payload, auth: web::Data<Auth>, ui: web::Data<super::Ui>) -> Page {
    let viewer = Viewer::of(&req, &auth, &ui).await?;
    let form = read_form(body).await?;
    viewer.check_csrf(&ui, &form)?;
    let mut resp = see_other("/ui/");
    if let Some(id) = &viewer.session {
        ui.sessions.remove(id);
        tracing::info!(user = viewer.user.as_deref().unwrap_or(""), "signed out of the web UI");
        let clear = set_cookie(session::SESSION_COOKIE, "", Some(0), viewer.secure);
        resp.headers_mut().append(
            SET_COOKIE,
            clear
                .parse()
                .map_err(|_| Error::from(Internal::Other("a cookie is not a header value")))?,
        );
    }
    Ok(resp)
}

/// Anything else under `/ui/`.
pub async fn not_found() -> Page {
    Err(UiError::NotFound)
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    chrome: Chrome,
    status: u16,
    reason: &'a str,
    message: &'a str,
}

/// The HTML of an error page (no viewer: an error page shows no account).
pub fn error_page(status: StatusCode, message: &str) -> String {
    let page = ErrorPage {
        chrome: Chrome::new(None, String::new(), false),
        status: status.as_u16(),
        reason: status.canonical_reason().unwrap_or("Error"),
        message,
    };
    page.render().unwrap_or_else(|_| "error".to_owned())
}

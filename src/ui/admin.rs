//! The admin pages (`/ui/admin/…`): users, API tokens, the audit trail, garbage collection.
//!
//! Only admins signed in with their password see them (an admin's session; see
//! [`is_admin`]): anyone else, anonymous or signed in, is answered 403 on every admin URL, GET
//! and POST alike, and the header shows them no Admin link. A POST checks its CSRF token
//! first, then the role, then does one thing through the accounts service
//! (`auth::accounts`, the same service and rules as `stowage user …` / `stowage token …`),
//! and answers 303 to the page to see next (with a notice in the query: names and ids only).
//! A refused change is answered as the UI's error page with its status (400 bad input, 403
//! one's own account, 404 no such user or token, 409 a name taken, 429 hashing busy).
//!
//! A token's secret is shown once: on the page answering the creating POST (200, not a
//! redirect, so it never travels in a URL; `Cache-Control: no-store`, as on every UI page),
//! and nowhere afterwards: only its hash is stored. Removing a user needs a confirmation page
//! (a plain GET form, so it works without JavaScript).

use actix_web::http::StatusCode;
use actix_web::http::header::CACHE_CONTROL;
use actix_web::{HttpRequest, HttpResponse, web};
use askama::Template;

use super::pages::{Chrome, read_form, render};
use super::{UiError, Viewer, html, see_other, view};
use crate::auth::accounts::{self, Accounts, Caller, NewToken, TokenStatus};
use crate::auth::{Auth, Grant, Identity, Principal};
use crate::catalog::audit::{self, AuditQuery};
use crate::registry::Registry;

type Page = Result<HttpResponse, UiError>;

/// Audit rows per page.
const AUDIT_PAGE: usize = 50;
/// Users or tokens per page.
const LIST_PAGE: usize = 100;
/// Longest audit filter value accepted.
const MAX_FILTER: usize = 256;

/// Whether `who` may use the admin pages: an admin signed in with their password (not an API
/// token, whose scopes are for the registry API).
pub fn is_admin(who: &Principal) -> bool {
    matches!(
        &who.identity,
        Identity::User {
            admin: true,
            token: None,
            ..
        }
    )
}

/// The viewer of an admin page, refused (403) unless an admin.
async fn admin(req: &HttpRequest, auth: &Auth, ui: &super::Ui) -> Result<Viewer, UiError> {
    let viewer = Viewer::of(req, auth, ui).await?;
    require_admin(&viewer, auth)?;
    Ok(viewer)
}

fn require_admin(viewer: &Viewer, auth: &Auth) -> Result<(), UiError> {
    if !auth.enabled() {
        return Err(UiError::Forbidden(
            "Authentication is off on this registry: there are no accounts to manage here.".into(),
        ));
    }
    match &viewer.user {
        _ if is_admin(&viewer.principal) => Ok(()),
        Some(user) => Err(UiError::Forbidden(format!(
            "{user} is not an admin: the admin pages are for admins."
        ))),
        None => Err(UiError::Forbidden("Sign in as an admin to see the admin pages.".into())),
    }
}

/// An admin's form post: the viewer and the form, after the CSRF check and then the role.
async fn admin_post(
    req: &HttpRequest,
    body: web::Payload,
    auth: &Auth,
    ui: &super::Ui,
) -> Result<(Viewer, Vec<(String, String)>, Caller), UiError> {
    let viewer = Viewer::of(req, auth, ui).await?;
    let form = read_form(body).await?;
    viewer.check_csrf(ui, &form)?;
    require_admin(&viewer, auth)?;
    let caller = Caller::user(viewer.user.as_deref().unwrap_or_default(), crate::http::actor(req));
    Ok((viewer, form, caller))
}

fn accounts_of(reg: &Registry, auth: &Auth) -> Accounts {
    Accounts::new(reg.catalog().clone(), auth.hasher())
}

fn field<'a>(form: &'a [(String, String)], key: &str) -> &'a str {
    crate::http::query_param(form, key).unwrap_or_default()
}

/// The `{name}` of the path (a user name; 404 if it cannot be one).
fn user_in_path(req: &HttpRequest) -> Result<String, UiError> {
    req.match_info()
        .get("user")
        .filter(|n| accounts::valid_user_name(n))
        .map(str::to_owned)
        .ok_or(UiError::NotFound)
}

/// The notice a page shows after a change (`?done=<what>&name=<name>`).
fn notice(req: &HttpRequest) -> Option<String> {
    let q = crate::http::query(req);
    let name = crate::http::query_param(&q, "name").unwrap_or_default();
    let text = match crate::http::query_param(&q, "done")? {
        "added" => format!("Added user {name}."),
        "password" => format!("Changed the password of {name}; their sessions and registry tokens have ended."),
        "admin" => format!("{name} is an admin."),
        "unadmin" => format!("{name} is no longer an admin."),
        "removed" => format!("Removed user {name} and their API tokens."),
        "revoked" => format!("Revoked token {name}."),
        _ => return None,
    };
    Some(text)
}

fn done(page: &str, what: &str, name: &str) -> HttpResponse {
    see_other(&format!("{page}?done={what}&name={}", view::query_value(name)))
}

// ---- Users -----------------------------------------------------------------------------------

struct UserRow {
    name: String,
    admin: bool,
    created: String,
    live_tokens: u64,
    is_self: bool,
}

#[derive(Template)]
#[template(path = "admin_users.html")]
struct UsersPage {
    chrome: Chrome,
    tab: &'static str,
    notice: Option<String>,
    rows: Vec<UserRow>,
    next: Option<String>,
}

/// `GET /ui/admin/users`: users by name, 100 a page (`after`).
pub async fn users(
    req: HttpRequest,
    reg: web::Data<Registry>,
    auth: web::Data<Auth>,
    ui: web::Data<super::Ui>,
) -> Page {
    let viewer = admin(&req, &auth, &ui).await?;
    let q = crate::http::query(&req);
    let after = crate::http::query_param(&q, "after").filter(|a| !a.is_empty());
    let mut users = accounts_of(&reg, &auth).users_page(after, LIST_PAGE + 1).await?;
    let next = (users.len() > LIST_PAGE).then(|| {
        users.truncate(LIST_PAGE);
        let last = users.last().map(|u| u.name.as_str()).unwrap_or_default();
        format!("/ui/admin/users?after={}", view::query_value(last))
    });
    let rows = users
        .into_iter()
        .map(|u| UserRow {
            is_self: viewer.user.as_deref() == Some(u.name.as_str()),
            name: u.name,
            admin: u.admin,
            created: view::time(u.created_at),
            live_tokens: u.live_tokens,
        })
        .collect();
    let page = UsersPage {
        chrome: Chrome::new(Some(&viewer), viewer.csrf(&ui), true),
        tab: "users",
        notice: notice(&req),
        rows,
        next,
    };
    Ok(html(&viewer, StatusCode::OK, render(&page)?))
}

/// `POST /ui/admin/users`: `name`, `password`, `again`, `admin` (a checkbox).
pub async fn add_user(
    req: HttpRequest,
    body: web::Payload,
    reg: web::Data<Registry>,
    auth: web::Data<Auth>,
    ui: web::Data<super::Ui>,
) -> Page {
    let (_, form, caller) = admin_post(&req, body, &auth, &ui).await?;
    let name = field(&form, "name").trim();
    let password = field(&form, "password");
    accounts::check_new_password(password, Some(field(&form, "again")))?;
    let admin = !field(&form, "admin").is_empty();
    accounts_of(&reg, &auth)
        .add_user(&caller, name, password.to_owned(), admin)
        .await?;
    tracing::info!(user = %name, admin, by = caller.user.as_deref().unwrap_or(""), "user added through the web UI");
    Ok(done("/ui/admin/users", "added", name))
}

#[derive(Template)]
#[template(path = "admin_user.html")]
struct UserPage {
    chrome: Chrome,
    tab: &'static str,
    notice: Option<String>,
    user: UserRow,
}

async fn user_row(reg: &Registry, auth: &Auth, viewer: &Viewer, name: &str) -> Result<UserRow, UiError> {
    let u = accounts_of(reg, auth).user(name).await?.ok_or(UiError::NotFound)?;
    Ok(UserRow {
        is_self: viewer.user.as_deref() == Some(u.name.as_str()),
        name: u.name,
        admin: u.admin,
        created: view::time(u.created_at),
        live_tokens: u.live_tokens,
    })
}

/// `GET /ui/admin/users/<name>`: reset the password, give or take the admin role, remove.
pub async fn user(req: HttpRequest, reg: web::Data<Registry>, auth: web::Data<Auth>, ui: web::Data<super::Ui>) -> Page {
    let viewer = admin(&req, &auth, &ui).await?;
    let name = user_in_path(&req)?;
    let page = UserPage {
        chrome: Chrome::new(Some(&viewer), viewer.csrf(&ui), true),
        tab: "users",
        notice: notice(&req),
        user: user_row(&reg, &auth, &viewer, &name).await?,
    };
    Ok(html(&viewer, StatusCode::OK, render(&page)?))
}

/// `POST /ui/admin/users/<name>/password`: `password`, `again`.
pub async fn set_password(
    req: HttpRequest,
    body: web::Payload,
    reg: web::Data<Registry>,
    auth: web::Data<Auth>,
    ui: web::Data<super::Ui>,
) -> Page {
    let (_, form, caller) = admin_post(&req, body, &auth, &ui).await?;
    let name = user_in_path(&req)?;
    let password = field(&form, "password");
    accounts::check_new_password(password, Some(field(&form, "again")))?;
    accounts_of(&reg, &auth)
        .set_password(&caller, &name, password.to_owned())
        .await?;
    tracing::info!(user = %name, by = caller.user.as_deref().unwrap_or(""), "password changed through the web UI");
    Ok(done(&format!("/ui/admin/users/{name}"), "password", &name))
}

/// `POST /ui/admin/users/<name>/admin`: `admin` = `true` gives the role, `false` takes it.
pub async fn set_admin(
    req: HttpRequest,
    body: web::Payload,
    reg: web::Data<Registry>,
    auth: web::Data<Auth>,
    ui: web::Data<super::Ui>,
) -> Page {
    let (_, form, caller) = admin_post(&req, body, &auth, &ui).await?;
    let name = user_in_path(&req)?;
    let admin = match field(&form, "admin") {
        "true" => true,
        "false" => false,
        _ => return Err(UiError::BadRequest("admin must be true or false")),
    };
    accounts_of(&reg, &auth).set_admin(&caller, &name, admin).await?;
    tracing::info!(user = %name, admin, by = caller.user.as_deref().unwrap_or(""), "admin role changed through the web UI");
    Ok(done(
        &format!("/ui/admin/users/{name}"),
        if admin { "admin" } else { "unadmin" },
        &name,
    ))
}

#[derive(Template)]
#[template(path = "admin_remove.html")]
struct RemovePage {
    chrome: Chrome,
    tab: &'static str,
    user: UserRow,
}

/// `GET /ui/admin/users/<name>/remove`: the confirmation step.
pub async fn remove_form(
    req: HttpRequest,
    reg: web::Data<Registry>,
    auth: web::Data<Auth>,
    ui: web::Data<super::Ui>,
) -> Page {
    let viewer = admin(&req, &auth, &ui).await?;
    let name = user_in_path(&req)?;
    let page = RemovePage {
        chrome: Chrome::new(Some(&viewer), viewer.csrf(&ui), true),
        tab: "users",
        user: user_row(&reg, &auth, &viewer, &name).await?,
    };
    Ok(html(&viewer, StatusCode::OK, render(&page)?))
}

/// `POST /ui/admin/users/<name>/remove`: removes the user and their API tokens.
pub async fn remove_user(
    req: HttpRequest,
    body: web::Payload,
    reg: web::Data<Registry>,
    auth: web::Data<Auth>,
    ui: web::Data<super::Ui>,
) -> Page {
    let (_, _, caller) = admin_post(&req, body, &auth, &ui).await?;
    let name = user_in_path(&req)?;
    accounts_of(&reg, &auth).remove_user(&caller, &name).await?;
    tracing::info!(user = %name, by = caller.user.as_deref().unwrap_or(""), "user removed through the web UI");
    Ok(done("/ui/admin/users", "removed", &name))
}

// ---- API tokens ------------------------------------------------------------------------------

struct TokenRow {
    id: i64,
    user: String,
    name: String,
    scopes: String,
    created: String,
    expires: String,
    last_used: String,
    status: &'static str,
    live: bool,
}

/// The token just created, on the page answering its POST only.
struct Created {
    id: i64,
    user: String,
    name: String,
    scopes: String,
    expires: String,
    secret: String,
}

#[derive(Template)]
#[template(path = "admin_tokens.html")]
struct TokensPage {
    chrome: Chrome,
    tab: &'static str,
    notice: Option<String>,
    created: Option<Created>,
    /// The user the create form is filled in for (`?user=`).
    for_user: String,
    rows: Vec<TokenRow>,
    next: Option<String>,
}

async fn tokens_page(
    req: &HttpRequest,
    reg: &Registry,
    auth: &Auth,
    ui: &super::Ui,
    viewer: &Viewer,
    created: Option<NewToken>,
) -> Page {
    let q = crate::http::query(req);
    let before = match crate::http::query_param(&q, "before").filter(|b| !b.is_empty()) {
        None => None,
        Some(b) => Some(
            b.parse::<i64>()
                .map_err(|_| UiError::BadRequest("before must be a token id"))?,
        ),
    };
    let mut tokens = accounts_of(reg, auth).tokens_page(before, LIST_PAGE + 1).await?;
    let next = (tokens.len() > LIST_PAGE).then(|| {
        tokens.truncate(LIST_PAGE);
        format!("/ui/admin/tokens?before={}", tokens.last().map_or(0, |t| t.id))
    });
    let for_user = crate::http::query_param(&q, "user")
        .filter(|u| accounts::valid_user_name(u))
        .unwrap_or_default()
        .to_owned();
    let now = crate::catalog::now();
    let rows = tokens
        .into_iter()
        .map(|t| {
            let status = TokenStatus::of(&t, now);
            TokenRow {
                id: t.id,
                scopes: accounts::scopes_text(&t).join(" "),
                user: t.user,
                name: t.name,
                created: view::time(t.created_at),
                expires: t.expires_at.map_or_else(|| "never".to_owned(), view::time),
                last_used: t.last_used_at.map_or_else(|| "never".to_owned(), view::time),
                status: status.as_str(),
                live: status == TokenStatus::Live,
            }
        })
        .collect();
    let page = TokensPage {
        chrome: Chrome::new(Some(viewer), viewer.csrf(ui), true),
        tab: "tokens",
        notice: notice(req),
        created: created.map(|t| Created {
            id: t.id,
            scopes: t.grants.iter().map(Grant::to_string).collect::<Vec<_>>().join(" "),
            expires: t.expires_at.map_or_else(|| "never".to_owned(), view::time),
            user: t.user,
            name: t.name,
            secret: t.secret,
        }),
        for_user,
        rows,
        next,
    };
    let mut resp = html(viewer, StatusCode::OK, render(&page)?);
    resp.headers_mut().insert(
        CACHE_CONTROL,
        actix_web::http::header::HeaderValue::from_static("no-store"),
    );
    Ok(resp)
}

/// `GET /ui/admin/tokens`: every token, newest first (never a secret), 100 a page (`before`).
pub async fn tokens(
    req: HttpRequest,
    reg: web::Data<Registry>,
    auth: web::Data<Auth>,
    ui: web::Data<super::Ui>,
) -> Page {
    let viewer = admin(&req, &auth, &ui).await?;
    tokens_page(&req, &reg, &auth, &ui, &viewer, None).await
}

/// `POST /ui/admin/tokens`: `user`, `name`, `scopes` (separated by spaces or lines, each as
/// `--scope` takes it), `expires_in_days` (empty: never). Answers the tokens page with the
/// secret, this once.
pub async fn create_token(
    req: HttpRequest,
    body: web::Payload,
    reg: web::Data<Registry>,
    auth: web::Data<Auth>,
    ui: web::Data<super::Ui>,
) -> Page {
    let (viewer, form, caller) = admin_post(&req, body, &auth, &ui).await?;
    let user = field(&form, "user").trim();
    let name = field(&form, "name").trim();
    let scopes: Vec<String> = field(&form, "scopes").split_whitespace().map(str::to_owned).collect();
    let days = match field(&form, "expires_in_days").trim() {
        "" => None,
        d => Some(
            d.parse::<u64>()
                .map_err(|_| UiError::BadRequest("the expiry is a whole number of days, or empty for none"))?,
        ),
    };
    let token = accounts_of(&reg, &auth)
        .create_token(&caller, user, name, &scopes, days)
        .await?;
    tracing::info!(user = %token.user, token_id = token.id, by = caller.user.as_deref().unwrap_or(""), "API token created through the web UI");
    tokens_page(&req, &reg, &auth, &ui, &viewer, Some(token)).await
}

/// `POST /ui/admin/tokens/<id>/revoke`.
pub async fn revoke_token(
    req: HttpRequest,
    body: web::Payload,
    reg: web::Data<Registry>,
    auth: web::Data<Auth>,
    ui: web::Data<super::Ui>,
) -> Page {
    let (_, _, caller) = admin_post(&req, body, &auth, &ui).await?;
    let id = req
        .match_info()
        .get("id")
        .filter(|i| i.parse::<i64>().is_ok())
        .ok_or(UiError::NotFound)?
        .to_owned();
    accounts_of(&reg, &auth).revoke_token(&caller, None, &id).await?;
    tracing::info!(token_id = %id, by = caller.user.as_deref().unwrap_or(""), "API token revoked through the web UI");
    Ok(done("/ui/admin/tokens", "revoked", &id))
}

// ---- Audit trail -----------------------------------------------------------------------------

struct AuditView {
    time: String,
    action: String,
    actor: String,
    token: String,
    repository: String,
    reference: String,
    client: String,
    detail: String,
}

#[derive(Template)]
#[template(path = "admin_audit.html")]
struct AuditPage {
    chrome: Chrome,
    tab: &'static str,
    user: String,
    repo: String,
    since: String,
    rows: Vec<AuditView>,
    next: Option<String>,
}

/// `GET /ui/admin/audit`: `user` (the actor), `repo`, `since` (RFC 3339 or a period such as
/// `24h`), `before` (the keyset cursor), newest first, as `/stowage/v1/audit` reads them.
pub async fn audit(
    req: HttpRequest,
    reg: web::Data<Registry>,
    auth: web::Data<Auth>,
    ui: web::Data<super::Ui>,
) -> Page {
    let viewer = admin(&req, &auth, &ui).await?;
    let q = crate::http::query(&req);
    let get = |k: &str| {
        crate::http::query_param(&q, k)
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    let (user, repo, since_text) = (get("user"), get("repo"), get("since"));
    if [&user, &repo, &since_text]
        .iter()
        .any(|v| v.as_ref().is_some_and(|v| v.len() > MAX_FILTER))
    {
        return Err(UiError::BadRequest("a filter is too long (256 bytes at most)"));
    }
    let since = since_text
        .as_deref()
        .map(|s| audit::parse_since(s, crate::catalog::now()))
        .transpose()
        .map_err(|_| {
            UiError::BadRequest("since must be an RFC 3339 time (2026-11-30T12:00:00Z) or a period such as 24h")
        })?;
    let before = get("before")
        .map(|b| b.parse::<i64>())
        .transpose()
        .map_err(|_| UiError::BadRequest("before must be a row id"))?;
    let page = reg
        .catalog()
        .audit(AuditQuery {
            repo: repo.clone(),
            user: user.clone(),
            since,
            before,
            limit: AUDIT_PAGE,
        })
        .await?;
    let next = page.next_cursor.map(|cursor| {
        let mut link = format!("/ui/admin/audit?before={cursor}");
        for (k, v) in [("user", &user), ("repo", &repo), ("since", &since_text)] {
            if let Some(v) = v {
                link.push_str(&format!("&{k}={}", view::query_value(v)));
            }
        }
        link
    });
    let rows = page
        .entries
        .into_iter()
        .map(|r| AuditView {
            time: r.time.replace('T', " ").replace('Z', " UTC"),
            action: r.action,
            token: match (r.token_id, r.token_name) {
                (Some(id), Some(name)) => format!("token {id} ({name})"),
                (Some(id), None) => format!("token {id}"),
                _ => String::new(),
            },
            actor: r.actor,
            repository: r.repository.unwrap_or_default(),
            reference: r.tag.or(r.digest).unwrap_or_default(),
            client: r.client.unwrap_or_default(),
            detail: r.detail.map(|d| d.to_string()).unwrap_or_default(),
        })
        .collect();
    let page = AuditPage {
        chrome: Chrome::new(Some(&viewer), viewer.csrf(&ui), true),
        tab: "audit",
        user: user.unwrap_or_default(),
        repo: repo.unwrap_or_default(),
        since: since_text.unwrap_or_default(),
        rows,
        next,
    };
    Ok(html(&viewer, StatusCode::OK, render(&page)?))
}

// ---- Garbage collection ----------------------------------------------------------------------

struct LastPass {
    started: String,
    duration_ms: u128,
    failed: Option<String>,
    manifests: u64,
    links: u64,
    blobs: u64,
    freed: String,
    orphans: u64,
}

#[derive(Template)]
#[template(path = "admin_gc.html")]
struct GcPage {
    chrome: Chrome,
    tab: &'static str,
    enabled: bool,
    interval: String,
    grace: String,
    running_since: Option<String>,
    last: Option<LastPass>,
    next: Option<String>,
}

/// A duration for a person: `45 s`, `10 min`, `2 h 30 min`, `1 d`.
fn period(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 if s.is_multiple_of(60) => format!("{} min", s / 60),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ if s.is_multiple_of(86_400) => format!("{} d", s / 86_400),
        _ if s.is_multiple_of(3600) => format!("{} h", s / 3600),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

/// `GET /ui/admin/gc`: the collector's schedule, the running pass, the last pass.
pub async fn gc(req: HttpRequest, reg: web::Data<Registry>, auth: web::Data<Auth>, ui: web::Data<super::Ui>) -> Page {
    let viewer = admin(&req, &auth, &ui).await?;
    let status = reg.gc_status();
    let page = GcPage {
        chrome: Chrome::new(Some(&viewer), viewer.csrf(&ui), true),
        tab: "gc",
        enabled: status.schedule.is_some(),
        interval: status.schedule.map(|s| period(s.interval)).unwrap_or_default(),
        grace: status.schedule.map(|s| period(s.grace)).unwrap_or_default(),
        running_since: status.running_since.map(view::time),
        last: status.last.map(|p| {
            let report = p.outcome.as_ref().ok().copied().unwrap_or_default();
            LastPass {
                started: view::time(p.started_at),
                duration_ms: p.duration.as_millis(),
                failed: p.outcome.err(),
                manifests: report.manifests,
                links: report.links,
                blobs: report.blobs,
                freed: view::size(report.bytes),
                orphans: report.orphans,
            }
        }),
        next: status.next_at.map(view::time),
    };
    Ok(html(&viewer, StatusCode::OK, render(&page)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_read_well() {
        assert_eq!(period(std::time::Duration::from_secs(1)), "1 s");
        assert_eq!(period(std::time::Duration::from_secs(600)), "10 min");
        assert_eq!(period(std::time::Duration::from_secs(90)), "1 min 30 s");
        assert_eq!(period(std::time::Duration::from_secs(86_400)), "1 d");
        assert_eq!(period(std::time::Duration::from_secs(7200)), "2 h");
        assert_eq!(period(std::time::Duration::from_secs(9000)), "2 h 30 min");
    }
}

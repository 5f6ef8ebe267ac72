//! The web UI, served by `stowage serve` at `/ui/` (`/` redirects there): server-rendered HTML
//! from the askama templates of `web/templates/` (compiled into the binary and checked at build
//! time; every value is HTML-escaped by the engine unless a template says otherwise, and none
//! does), a small stylesheet and script, and the vendored htmx (`assets`). Every page works
//! without JavaScript; htmx only turns links and forms into in-place updates (`hx-boost`) and
//! filters lists as one types.
//!
//! askama rather than minijinja: its templates are compiled with the crate and checked against
//! the structs that fill them (a misspelt field is a build error, never a 500 at run time),
//! rendering needs no template parser at run time, and `.html` templates escape by default.
//!
//! Routes (all under the security headers of [`security_headers`]):
//! - `GET /ui/` repositories: name, tags, stored size, last push; filter `q`, keyset pages
//!   (`after`, `n`).
//! - `GET /ui/repos/<name>` a repository's tags: digest, media type, size, pushed-at, pull
//!   lines, a delete button for those allowed; filter and pages as above.
//! - `GET /ui/repos/<name>/-/manifests/<digest>` a manifest: config and layers, an index's
//!   platforms, referrers grouped by artifact type, annotations, the tags naming it.
//! - `POST /ui/repos/<name>/-/tags/<tag>/delete` deletes a tag (the registry's own deletion,
//!   immutable tags and `registry.delete_enabled` included).
//! - `GET /ui/repos/<name>/-/spack` a Spack build cache: its index generation and size, the
//!   `spack mirror add` line, specs searched by name, version, compiler, target and os with
//!   facet counts, in keyset pages (`spack`; the Spack API's queries).
//! - `GET /ui/repos/<name>/-/spack/<hash>` one spec: variants, its dependency DAG drawn as SVG
//!   (`dag`) and listed with which nodes the cache holds and which it lacks, the cached specs
//!   depending on it, the `spack mirror add` and `spack install` lines (`spack`).
//! - `GET`/`POST /ui/login`, `POST /ui/logout`; `GET /ui/assets/<hash>/<file>`.
//! - The admin pages (`admin`), for admins signed in with their password only (403 to anyone
//!   else, GET and POST alike; the header's Admin link shows only to them):
//!   - `GET /ui/admin/users` users (name, admin, created, live tokens; keyset pages by
//!     `after`); `POST` adds one
//!     (name, password twice, admin box);
//!   - `GET /ui/admin/users/<name>` a user: `POST …/password` resets the password,
//!     `POST …/admin` gives or takes the role, `GET`/`POST …/remove` confirms and removes;
//!     nobody removes themself or takes their own role;
//!   - `GET /ui/admin/tokens` every API token (user, name, scopes, expiry, last use, status;
//!     keyset pages by `before`; `?user=` fills in the create form);
//!     `POST` creates one and answers 200 with its secret, the only time it is shown (never in
//!     a URL, never stored); `POST /ui/admin/tokens/<id>/revoke` revokes one;
//!   - `GET /ui/admin/audit` the audit trail (filters `user`, `repo`, `since`; keyset pages by
//!     `before`), as `/stowage/v1/audit` reads it;
//!   - `GET /ui/admin/gc` garbage collection: schedule, running pass, last pass, next pass
//!     (`Registry::gc_status`).
//!
//!   Account changes go through `auth::accounts`, the service `stowage user`/`stowage token`
//!   call: one copy of the rules, each change audited with the admin as actor.
//!
//! A repository's sub-pages follow `/-/`: no repository name has a component `-` alone, so
//! `/ui/repos/a/-/…` can never be the page of a repository named `a/-/…`.
//!
//! Who sees what: the same users and policy as the registry API (`crate::auth`). A viewer is
//! anonymous, a user signed in through a session (`session`), or anyone when authentication is
//! off. Listings keep what `Auth::may_list` accepts; a repository or manifest page needs
//! `Auth::authorize(pull)` and answers 404 otherwise, so a page never reveals that a repository
//! the viewer may not pull exists; a delete needs `Auth::authorize(delete)`. The UI runs the
//! registry's services and catalog queries (`catalog::ui` holds the queries only it asks);
//! it holds no rule of its own.
//!
//! Changes are the registry's own, so the audit trail records them as it records the API's:
//! a tag deleted here is recorded for the signed-in user (`http::actor`), a delete the policy
//! refuses as a denied delete, a wrong password as a failed login.
//!
//! Forms: every POST carries a CSRF token bound to the viewer's cookie (`session`); a post
//! without it, or with one for another cookie, is refused with 403 before anything else.
//! Sign-in attempts go through `Auth::login`, so the failed-login limiter of `/token` throttles
//! them (429 with `Retry-After`). Errors are answered as HTML pages with the status the
//! registry API would give (internal errors logged once and reported generically).

mod admin;
mod assets;
mod dag;
mod pages;
mod session;
mod spack;
mod view;

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::http::header::{CONTENT_TYPE, LOCATION, RETRY_AFTER, SET_COOKIE};
use actix_web::middleware::DefaultHeaders;
use actix_web::{HttpMessage as _, HttpRequest, HttpResponse, ResponseError, web};

use crate::auth::{Auth, Identity, Principal, Via};
use crate::config::UiConfig;
use crate::error::Error;

pub use session::Sessions;

/// The UI's state, shared by every worker.
pub struct Ui {
    sessions: Sessions,
}

impl Ui {
    /// The UI as configured; `None` if the system's random source fails.
    pub fn new(config: &UiConfig) -> Option<Ui> {
        Some(Ui {
            sessions: Sessions::new(
                Duration::from_secs(config.session_ttl_secs.max(60)),
                config.max_sessions,
            )?,
        })
    }
}

/// The policy the UI's pages are served under: scripts and styles only from this origin (no
/// inline script or style, no `eval`), no framing, forms posting only here.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The headers of every UI response (a response may set its own `Cache-Control`).
fn security_headers() -> DefaultHeaders {
    DefaultHeaders::new()
        .add(("Content-Security-Policy", CONTENT_SECURITY_POLICY))
        .add(("X-Content-Type-Options", "nosniff"))
        .add(("Referrer-Policy", "same-origin"))
        .add(("X-Frame-Options", "DENY"))
        .add(("Cross-Origin-Opener-Policy", "same-origin"))
        .add(("Cache-Control", "no-store"))
}

/// Registers the UI's routes (only when `ui.enabled`; the caller decides).
pub fn routes(cfg: &mut web::ServiceConfig) {
    const REPO: &str = "/repos/{name:.+}";
    cfg.service(web::resource("/").get(root))
        .service(web::resource("/ui").get(root))
        .service(
            web::scope("/ui")
                .wrap(security_headers())
                .service(web::resource("/").get(pages::repositories))
                .service(web::resource("/assets/{hash}/{file}").get(assets::serve))
                .service(web::resource("/login").get(pages::login_form).post(pages::login))
                .service(web::resource("/logout").post(pages::logout))
                .service(web::resource(format!("{REPO}/-/manifests/{{digest}}")).get(pages::manifest))
                .service(web::resource(format!("{REPO}/-/tags/{{tag}}/delete")).post(pages::delete_tag))
                .service(web::resource(format!("{REPO}/-/spack/{{hash}}")).get(spack::spec))
                .service(web::resource(format!("{REPO}/-/spack")).get(spack::search))
                .service(web::resource(REPO).get(pages::repository))
                // The admin pages (see `admin`).
                .service(web::resource("/admin").get(admin_root))
                .service(web::resource("/admin/").get(admin_root))
                .service(web::resource("/admin/users").get(admin::users).post(admin::add_user))
                .service(web::resource("/admin/users/{user}").get(admin::user))
                .service(web::resource("/admin/users/{user}/password").post(admin::set_password))
                .service(web::resource("/admin/users/{user}/admin").post(admin::set_admin))
                .service(
                    web::resource("/admin/users/{user}/remove")
                        .get(admin::remove_form)
                        .post(admin::remove_user),
                )
                .service(
                    web::resource("/admin/tokens")
                        .get(admin::tokens)
                        .post(admin::create_token),
                )
                .service(web::resource("/admin/tokens/{id}/revoke").post(admin::revoke_token))
                .service(web::resource("/admin/audit").get(admin::audit))
                .service(web::resource("/admin/gc").get(admin::gc))
                .default_service(web::to(pages::not_found)),
        );
}

/// `/` and `/ui`: to the repositories page.
async fn root() -> HttpResponse {
    see_other("/ui/")
}

/// `/ui/admin`: to the users page (which refuses non-admins).
async fn admin_root() -> HttpResponse {
    see_other("/ui/admin/users")
}

/// A 303 to `location` (after a form post, the browser fetches it with GET).
fn see_other(location: &str) -> HttpResponse {
    HttpResponse::SeeOther().insert_header((LOCATION, location)).finish()
}

/// Who is looking at a page, and the cookie their forms' CSRF tokens are bound to.
pub struct Viewer {
    pub principal: Principal,
    /// The signed-in user's name.
    pub user: Option<String>,
    /// The session id, when signed in.
    session: Option<String>,
    /// The pre-session cookie (`stowage_csrf`) otherwise.
    anonymous_cookie: Option<String>,
    /// The pre-session cookie was made for this response (no form can carry its token yet).
    fresh_cookie: bool,
    /// Cookies to set on the response (a new pre-session cookie; clearing an ended session).
    set_cookies: Vec<String>,
    /// Whether the browser reached the server over HTTPS (cookies get `Secure`).
    secure: bool,
}

fn cookie<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
    req.headers()
        .get_all(actix_web::http::header::COOKIE)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// A `Set-Cookie` value: `HttpOnly`, `SameSite=Strict`, `Path=/`, `Secure` over HTTPS.
fn set_cookie(name: &str, value: &str, max_age: Option<u64>, secure: bool) -> String {
    let mut c = format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict");
    if let Some(age) = max_age {
        c.push_str(&format!("; Max-Age={age}"));
    }
    if secure {
        c.push_str("; Secure");
    }
    c
}

impl Viewer {
    /// Resolves the viewer of `req`: the session's user (looked up through `Auth`'s cache under
    /// the credentials generation: a removed user or a changed password ends the session at its
    /// next request), else anonymous (or open when authentication is off).
    /// The identity is left in the request's extensions, as the registry's authentication
    /// middleware leaves it, for the access log and the audit trail.
    async fn of(req: &HttpRequest, auth: &Auth, ui: &Ui) -> Result<Viewer, UiError> {
        let secure = crate::http::base_url(auth, req).starts_with("https://");
        let mut viewer = Viewer {
            principal: if auth.enabled() {
                Principal {
                    identity: Identity::Anonymous,
                    via: Via::Nothing,
                }
            } else {
                Principal::open()
            },
            user: None,
            session: None,
            anonymous_cookie: None,
            fresh_cookie: false,
            set_cookies: Vec::new(),
            secure,
        };
        if let Some(id) = cookie(req, session::SESSION_COOKIE).filter(|v| session::plausible_token(v))
            && let Some(s) = ui.sessions.get(id)
        {
            match auth.current_user(&s.user).await? {
                Some(user) if auth.enabled() && user.credentials_epoch == s.epoch => {
                    viewer.principal = Principal {
                        identity: Identity::User {
                            name: user.name.clone(),
                            admin: user.admin,
                            token: None,
                            epoch: user.credentials_epoch,
                        },
                        via: Via::Basic,
                    };
                    viewer.user = Some(user.name);
                    viewer.session = Some(id.to_owned());
                    req.extensions_mut().insert(viewer.principal.clone());
                    return Ok(viewer);
                }
                _ => {
                    ui.sessions.remove(id);
                    viewer
                        .set_cookies
                        .push(set_cookie(session::SESSION_COOKIE, "", Some(0), secure));
                }
            }
        }
        match cookie(req, session::LOGIN_COOKIE).filter(|v| session::plausible_token(v)) {
            Some(v) => viewer.anonymous_cookie = Some(v.to_owned()),
            None => {
                let fresh = session::random_token()
                    .ok_or_else(|| Error::from(crate::error::Internal::Other("the random source failed")))?;
                viewer
                    .set_cookies
                    .push(set_cookie(session::LOGIN_COOKIE, &fresh, None, secure));
                viewer.anonymous_cookie = Some(fresh);
                viewer.fresh_cookie = true;
            }
        }
        req.extensions_mut().insert(viewer.principal.clone());
        Ok(viewer)
    }

    /// The CSRF token of this viewer's forms.
    fn csrf(&self, ui: &Ui) -> String {
        match (&self.session, &self.anonymous_cookie) {
            (Some(id), _) => ui.sessions.csrf_token(session::Purpose::Session, id),
            (None, Some(c)) => ui.sessions.csrf_token(session::Purpose::SignIn, c),
            (None, None) => String::new(),
        }
    }

    /// Refuses a form whose CSRF token is not this viewer's (403).
    fn check_csrf(&self, ui: &Ui, form: &[(String, String)]) -> Result<(), UiError> {
        let token = crate::http::query_param(form, "csrf").unwrap_or_default();
        let ok = match (&self.session, &self.anonymous_cookie) {
            (Some(id), _) => ui.sessions.csrf_valid(session::Purpose::Session, id, token),
            (None, Some(c)) if !self.fresh_cookie => ui.sessions.csrf_valid(session::Purpose::SignIn, c, token),
            _ => false,
        };
        if ok { Ok(()) } else { Err(UiError::Csrf) }
    }
}

/// An error answered as an HTML page.
#[derive(Debug)]
pub enum UiError {
    /// 404: no such page, repository or manifest, or one the viewer may not see.
    NotFound,
    /// 400: a malformed query or form, with what is wrong.
    BadRequest(&'static str),
    /// 403 with a message for a person.
    Forbidden(String),
    /// A form without its CSRF token, or with another's (403).
    Csrf,
    /// Any registry error, answered with its status and message.
    Registry(Error),
    /// An account change refused or failed (the admin pages).
    Account(crate::auth::accounts::AccountError),
    /// A failure of the UI itself (a template that did not render), logged where it happened:
    /// 500 without details.
    Failed,
}

impl From<Error> for UiError {
    fn from(e: Error) -> Self {
        UiError::Registry(e)
    }
}

impl From<crate::auth::accounts::AccountError> for UiError {
    fn from(e: crate::auth::accounts::AccountError) -> Self {
        match e {
            crate::auth::accounts::AccountError::Internal(e) => UiError::Registry(e),
            other => UiError::Account(other),
        }
    }
}

impl std::fmt::Display for UiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UiError::NotFound => f.write_str("not found"),
            UiError::BadRequest(m) => f.write_str(m),
            UiError::Forbidden(m) => f.write_str(m),
            UiError::Csrf => f.write_str("the form's CSRF token is missing or invalid"),
            UiError::Registry(e) => e.fmt(f),
            UiError::Account(e) => e.fmt(f),
            UiError::Failed => f.write_str("internal server error"),
        }
    }
}

impl ResponseError for UiError {
    fn status_code(&self) -> StatusCode {
        match self {
            UiError::NotFound => StatusCode::NOT_FOUND,
            UiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            UiError::Forbidden(_) | UiError::Csrf => StatusCode::FORBIDDEN,
            UiError::Registry(e) => StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            UiError::Account(e) => {
                use crate::auth::accounts::AccountError as A;
                match e {
                    A::UserExists(_) | A::TokenNameTaken { .. } => StatusCode::CONFLICT,
                    A::NoUser(_) | A::NoToken(_) => StatusCode::NOT_FOUND,
                    A::OwnAccount(_) => StatusCode::FORBIDDEN,
                    A::Busy => StatusCode::TOO_MANY_REQUESTS,
                    A::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
                    A::InvalidUserName
                    | A::PasswordsDiffer
                    | A::EmptyPassword
                    | A::LongPassword
                    | A::TokenLikePassword
                    | A::InvalidTokenName
                    | A::InvalidScope(_)
                    | A::ScopeCount
                    | A::InvalidExpiry => StatusCode::BAD_REQUEST,
                }
            }
            UiError::Failed => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let message = match self {
            UiError::NotFound => "There is no such page, or you may not see it.".to_owned(),
            UiError::Csrf => "The form was refused: its CSRF token is missing or does not belong to this browser's \
                 session. Reload the page and try again."
                .to_owned(),
            UiError::BadRequest(m) => (*m).to_owned(),
            UiError::Forbidden(m) => m.clone(),
            UiError::Registry(Error::Internal(inner)) => {
                tracing::error!(error = %inner, "internal error while serving a UI page");
                "Internal server error.".to_owned()
            }
            UiError::Failed | UiError::Account(crate::auth::accounts::AccountError::Internal(_)) => {
                "Internal server error.".to_owned()
            }
            UiError::Registry(e) => e.to_string(),
            UiError::Account(e) => {
                let mut m = e.to_string();
                if let Some(first) = m.get(..1) {
                    let upper = first.to_uppercase();
                    m.replace_range(..1, &upper);
                }
                m.push('.');
                m
            }
        };
        let mut resp = HttpResponse::build(status);
        if let UiError::Registry(
            Error::TooManyLogins { retry_after }
            | Error::LoginsBusy { retry_after }
            | Error::TooManyUploads { retry_after },
        ) = self
        {
            resp.insert_header((RETRY_AFTER, retry_after.to_string()));
        }
        if let UiError::Account(crate::auth::accounts::AccountError::Busy) = self {
            resp.insert_header((RETRY_AFTER, "1"));
        }
        resp.insert_header((CONTENT_TYPE, "text/html; charset=utf-8"))
            .body(pages::error_page(status, &message))
    }
}

/// An HTML page with the viewer's cookies.
fn html(viewer: &Viewer, status: StatusCode, body: String) -> HttpResponse {
    let mut resp = HttpResponse::build(status);
    for c in &viewer.set_cookies {
        resp.append_header((SET_COOKIE, c.as_str()));
    }
    resp.insert_header((CONTENT_TYPE, "text/html; charset=utf-8"))
        .body(body)
}

//! Authentication on the HTTP side: which action each route needs, the credentials a request
//! carries, the challenge a refused request gets, and the token endpoint (`/token`).
//!
//! Every resource in the route table is wrapped in [`protect`] with a [`Guard`] that says what
//! its methods need (pull, push, delete, or just an identity). The middleware resolves the
//! request's [`Principal`] through [`Auth`], checks it, and leaves it in the request's
//! extensions for the few handlers that look further (catalog filtering, cross-repository
//! mounts). Handlers themselves never deal with credentials.
//!
//! Refusals: no credentials where anonymous clients may not go, bad credentials, an invalid
//! token, or a token lacking the action (`error="insufficient_scope"`) answer 401 with
//! `WWW-Authenticate: Bearer realm="<scheme>://<host>/token",service="…",scope="…"` (plus a
//! `Basic realm` challenge on plain HTTP for repository requests, never on `/v2/`: see
//! [`refuse`]); an identity the policy refuses gets 403 `DENIED` whose message names the user
//! (or the API token's scopes), the action and the repository, never the code's default text,
//! which docker takes for a passing failure and retries a push on for ~50 s;
//! a password attempt throttled after failures from its address, or one that finds every
//! verification permit taken, gets 429 `TOOMANYREQUESTS` with `Retry-After` (see `auth::limiter`).
//! The error body's message says which. A 401's message says what is wrong for a person (see
//! `unauthorized_message`): no credentials, wrong ones, a revoked or expired API token (named),
//! an expired or invalid registry token, or, with `insufficient_scope`, the repository and
//! action the token does not grant.
//! The realm is built from the scheme and host the client used; `X-Forwarded-Proto`/`-Host`/
//! `-For` are believed only from `auth.trusted_proxies`.

use std::net::IpAddr;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use actix_web::middleware::Next;
use actix_web::{HttpMessage as _, HttpRequest, HttpResponse, web};
use base64::Engine as _;

use super::extract;
use crate::auth::{Action, Auth, AuthFail, Challenge, Credentials, Identity, Principal, Refusal, Scope, VerifyError};
use crate::error::{Error, Internal, Result};
use crate::oci::RepoName;

/// What the requests to one resource need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// `/v2/`: any valid identity; anonymous clients are challenged (so `docker login` checks
    /// credentials here).
    Base,
    /// `/v2/_catalog`: any identity, anonymous included; the listing is filtered.
    Catalog,
    /// Manifests: GET/HEAD pull, PUT push, DELETE delete (moving or deleting an immutable tag
    /// also needs `overwrite`, checked by the catalog in the write's transaction).
    Manifests,
    /// Blobs: GET/HEAD pull, DELETE delete.
    Blobs,
    /// Opening an upload: push.
    UploadStart,
    /// An open upload session: push, with tokens that expired during the upload accepted.
    UploadSession,
    /// Read-only repository resources (tags, referrers, the Spack API): pull.
    Read,
    /// Spack keep-lists: GET pull, POST and DELETE push.
    SpackKeep,
}

/// What one request needs.
enum Need {
    Nothing,
    Identity { challenge_anonymous: bool },
    Repo { action: Action, session: bool },
}

impl Guard {
    fn need(self, method: &Method) -> Need {
        let read = method == Method::GET || method == Method::HEAD;
        let repo = |action| Need::Repo { action, session: false };
        match self {
            Guard::Base => Need::Identity {
                challenge_anonymous: true,
            },
            Guard::Catalog => Need::Identity {
                challenge_anonymous: false,
            },
            Guard::Manifests | Guard::Blobs if read => repo(Action::Pull),
            Guard::Manifests if method == Method::PUT => repo(Action::Push),
            Guard::Manifests | Guard::Blobs if method == Method::DELETE => repo(Action::Delete),
            Guard::UploadStart if method == Method::POST => repo(Action::Push),
            Guard::UploadSession => Need::Repo {
                action: Action::Push,
                session: true,
            },
            Guard::Read => repo(Action::Pull),
            Guard::SpackKeep if read => repo(Action::Pull),
            Guard::SpackKeep if method == Method::POST || method == Method::DELETE => repo(Action::Push),
            // Anything else is answered 405 by the resource.
            _ => Need::Nothing,
        }
    }
}

/// The scope a challenge asks for, for `action` on `repo`.
fn challenge_scope(repo: &RepoName, action: Action) -> String {
    match action {
        Action::Pull => format!("repository:{repo}:pull"),
        Action::Push => format!("repository:{repo}:pull,push"),
        Action::Delete => format!("repository:{repo}:delete"),
        // No route needs it (the catalog checks it on the tag writes that need it).
        Action::Overwrite => format!("repository:{repo}:pull,push,overwrite"),
    }
}

/// Middleware: resolves and checks the request's identity for `guard`.
pub async fn protect(
    guard: Guard,
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> std::result::Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let need = guard.need(req.method());
    if matches!(need, Need::Nothing) {
        return Ok(next.call(req).await?.map_into_left_body());
    }
    let resolved = match req.app_data::<web::Data<Auth>>() {
        Some(auth) => resolve(auth, req.request(), need).await,
        None => Err(Internal::Other("authentication is not configured").into()),
    };
    match resolved {
        Ok(principal) => {
            req.extensions_mut().insert(principal);
            Ok(next.call(req).await?.map_into_left_body())
        }
        Err(e) => Ok(req.error_response(e).map_into_right_body()),
    }
}

async fn resolve(auth: &Auth, req: &HttpRequest, need: Need) -> Result<Principal> {
    if !auth.enabled() {
        return Ok(Principal::open());
    }
    let (repo, action, session) = match need {
        Need::Repo { action, session } => {
            // A malformed name names nothing; the handler answers NAME_INVALID.
            let repo = req.match_info().get("name").and_then(|n| n.parse::<RepoName>().ok());
            (repo, Some(action), session)
        }
        _ => (None, None, false),
    };
    let scope = repo.as_ref().zip(action).map(|(r, a)| challenge_scope(r, a));
    let creds = credentials(req);
    let anonymous_request = matches!(creds, Credentials::None);
    let claimed = basic_user(&creds);
    let principal = auth
        .authenticate(creds, client_ip(auth, req), session)
        .await
        .map_err(|f| {
            if let Some(user) = &claimed {
                super::audit::record_login_failure(req, user, &f);
            }
            refuse(auth, req, f, scope.clone())
        })?;
    match (need, repo, action) {
        (
            Need::Identity {
                challenge_anonymous: true,
            },
            _,
            _,
        ) if anonymous_request => {
            return Err(refuse(auth, req, Refusal::NeedCredentials.into(), None));
        }
        (_, Some(repo), Some(action)) => {
            auth.authorize(&principal, repo.as_str(), action).map_err(|r| {
                if let Refusal::Denied(message) = &r {
                    super::audit::record_denied(req, &principal, repo.as_str(), action, message);
                }
                refuse(auth, req, r.into(), scope)
            })?;
        }
        _ => {}
    }
    Ok(principal)
}

/// The error a refusal is answered with.
fn refuse(auth: &Auth, req: &HttpRequest, fail: AuthFail, scope: Option<String>) -> Error {
    let refusal = match fail {
        AuthFail::Internal(e) => return e,
        AuthFail::Refused(r) => r,
    };
    let error = match &refusal {
        Refusal::Denied(message) => return Error::Denied(message.clone()),
        Refusal::TooManyAttempts(retry_after) => {
            return Error::TooManyLogins {
                retry_after: *retry_after,
            };
        }
        Refusal::Busy(retry_after) => {
            return Error::LoginsBusy {
                retry_after: *retry_after,
            };
        }
        Refusal::InvalidToken(why) => {
            tracing::debug!(reason = %why, "refused a registry token");
            Some("invalid_token")
        }
        Refusal::InsufficientScope { .. } => Some("insufficient_scope"),
        Refusal::NeedCredentials
        | Refusal::BadCredentials
        | Refusal::TokenRevoked { .. }
        | Refusal::TokenExpired { .. } => None,
    };
    let message = unauthorized_message(&refusal, "registry token");
    let base = base_url(auth, req);
    let realm = auth.realm().map_or_else(|| format!("{base}/token"), str::to_owned);
    // Basic is offered next to Bearer only over plain HTTP (where Spack refuses an http token
    // realm and falls back to Basic) and only on repository requests, never on `/v2/` or the
    // catalog. Docker learns a registry's challenges from its `/v2/` ping and then runs the
    // handler of every scheme it saw on every request: after `docker login` it holds an
    // identity token and no password, so a Basic challenge there made its Basic handler fail
    // each push and pull before it was sent. Spack never asks `/v2/`; it reads the challenge
    // of each refused repository request.
    let basic = realm.starts_with("http://") && scope.is_some();
    Error::Unauthorized(Box::new(Challenge {
        message,
        basic,
        realm,
        service: auth.service().to_owned(),
        scope,
        error,
        bearer: true,
    }))
}

/// The user name of Basic credentials (for the audit trail of a failed login).
fn basic_user(creds: &Credentials) -> Option<String> {
    match creds {
        Credentials::Basic { user, .. } => Some(user.clone()),
        _ => None,
    }
}

/// The credentials of a request's `Authorization` header. A header that cannot be parsed
/// counts as wrong credentials, never as none, with one exception: a Bearer value that cannot
/// be a registry token at all (no `.`; Homebrew sends `Bearer QQ==` for its anonymous pulls)
/// is no credential, so it gets what an anonymous client gets.
pub fn credentials(req: &HttpRequest) -> Credentials {
    let Some(value) = req.headers().get(AUTHORIZATION) else {
        return Credentials::None;
    };
    let value = value.to_str().unwrap_or_default().trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_default();
        let (user, password) = decoded.split_once(':').unwrap_or(("", ""));
        Credentials::Basic {
            user: user.to_owned(),
            password: password.to_owned(),
        }
    } else if scheme.eq_ignore_ascii_case("bearer") {
        if rest.contains('.') {
            Credentials::Bearer(rest.to_owned())
        } else {
            Credentials::None
        }
    } else {
        Credentials::Bearer(String::new())
    }
}

fn forwarded<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(',').next().unwrap_or_default().trim())
        .filter(|v| !v.is_empty())
}

fn from_trusted_proxy(auth: &Auth, req: &HttpRequest) -> bool {
    req.peer_addr().is_some_and(|p| auth.trusts_proxy(p.ip()))
}

/// The client's address: the peer, or behind a trusted proxy the nearest untrusted address in
/// `X-Forwarded-For`.
pub fn client_ip(auth: &Auth, req: &HttpRequest) -> IpAddr {
    let peer = req.peer_addr().map_or(IpAddr::from([0, 0, 0, 0]), |p| p.ip());
    if !auth.trusts_proxy(peer) {
        return peer;
    }
    let chain = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    chain
        .rsplit(',')
        .filter_map(|a| a.trim().parse::<IpAddr>().ok())
        .find(|a| !auth.trusts_proxy(*a))
        .unwrap_or(peer)
}

/// Whether a host header value is safe to echo into a challenge.
fn plausible_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'_'))
}

/// `<scheme>://<host>` as the client reached the server.
pub fn base_url(auth: &Auth, req: &HttpRequest) -> String {
    let trusted = from_trusted_proxy(auth, req);
    let scheme = match trusted.then(|| forwarded(req, "x-forwarded-proto")).flatten() {
        Some(p) if p.eq_ignore_ascii_case("https") => "https",
        Some(p) if p.eq_ignore_ascii_case("http") => "http",
        _ if req.app_config().secure() => "https",
        _ => "http",
    };
    let host = trusted
        .then(|| forwarded(req, "x-forwarded-host"))
        .flatten()
        .or_else(|| req.headers().get(HOST).and_then(|h| h.to_str().ok()))
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .filter(|h| plausible_host(h))
        .map_or_else(|| req.app_config().host().to_owned(), str::to_owned);
    format!("{scheme}://{host}")
}

/// The identity the middleware resolved for this request (open when auth is off).
pub fn principal(req: &HttpRequest) -> Option<Principal> {
    req.extensions().get::<Principal>().cloned()
}

// ---- The token endpoint ------------------------------------------------------------------

/// The message of a 401 for a request without credentials where anonymous clients may not go.
const NEED_CREDENTIALS: &str = "authentication required: log in with a user name and password or an API token";

/// The message of a 401 for wrong credentials.
const WRONG_CREDENTIALS: &str = "wrong user name or password (or an unknown API token)";

/// The message of a 401: what is wrong with the credentials, for a person. Never the code's
/// default text ("authentication required"), which docker reduces to a bare "unauthorized"
/// and, on a push, retries for ~50 s. `jwt` says which kind of signed token was refused
/// ("registry token" on a request, "refresh token" at the token endpoint).
fn unauthorized_message(refusal: &Refusal, jwt: &str) -> String {
    match refusal {
        Refusal::NeedCredentials => NEED_CREDENTIALS.to_owned(),
        Refusal::TokenRevoked { user, name } => {
            format!("the API token {name:?} of user {user} has been revoked: use another token")
        }
        Refusal::TokenExpired { user, name } => {
            format!("the API token {name:?} of user {user} has expired: create a new one")
        }
        Refusal::InvalidToken(VerifyError::Expired) => {
            format!("the {jwt} has expired: log in again or fetch a new one from the token endpoint")
        }
        Refusal::InvalidToken(why) => format!("the {jwt} is invalid ({why}): log in again"),
        Refusal::InsufficientScope { repo, action } => format!(
            "the registry token does not grant {} on repository {repo}: fetch a token for that scope",
            action.as_str()
        ),
        Refusal::Denied(message) => message.clone(),
        Refusal::BadCredentials | Refusal::TooManyAttempts(_) | Refusal::Busy(_) => WRONG_CREDENTIALS.to_owned(),
    }
}

/// A refusal from the token endpoint itself: a 401 for wrong credentials, a 429 when throttled.
fn token_refusal(auth: &Auth, fail: AuthFail) -> Error {
    match fail {
        AuthFail::Internal(e) => e,
        AuthFail::Refused(Refusal::TooManyAttempts(retry_after)) => Error::TooManyLogins { retry_after },
        AuthFail::Refused(Refusal::Busy(retry_after)) => Error::LoginsBusy { retry_after },
        AuthFail::Refused(refusal) => Error::Unauthorized(Box::new(Challenge {
            message: unauthorized_message(&refusal, "refresh token"),
            realm: String::new(),
            service: auth.service().to_owned(),
            scope: None,
            error: None,
            bearer: false,
            basic: true,
        })),
    }
}

fn token_json(resp: &crate::auth::TokenResponse) -> Result<HttpResponse> {
    let body = serde_json::to_string(resp).map_err(|_| Internal::Other("serialising a token failed"))?;
    Ok(HttpResponse::Ok()
        .insert_header((CONTENT_TYPE, "application/json"))
        .insert_header(("Cache-Control", "no-store"))
        .body(body))
}

fn values<'a>(pairs: &'a [(String, String)], key: &'a str) -> impl Iterator<Item = &'a str> {
    pairs.iter().filter(move |(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Most scopes one token request may ask for: a client asks for the repositories of one push
/// or pull (a handful, a few dozen with cross-repository mounts); more only makes tokens (and
/// what verifying and remembering them costs) grow.
const MAX_SCOPES: usize = 100;

/// The scopes a token request asks for; too many is a bad request.
fn requested_scopes<'a>(values: impl IntoIterator<Item = &'a str>) -> Result<Vec<Scope>> {
    let scopes = Scope::parse_all(values);
    if scopes.len() > MAX_SCOPES {
        return Err(Error::TokenRequestInvalid(
            "too many scopes in one token request (at most 100)",
        ));
    }
    Ok(scopes)
}

/// `GET /token?service=&scope=…&client_id=&offline_token=`, with HTTP Basic credentials or none
/// (an anonymous token, granting what anonymous clients may do).
pub async fn token_get(req: HttpRequest, auth: web::Data<Auth>) -> Result<HttpResponse> {
    let q = extract::query(&req);
    let scopes = requested_scopes(values(&q, "scope"))?;
    let offline = extract::query_param(&q, "offline_token").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let principal = match credentials(&req) {
        creds @ Credentials::Basic { .. } if auth.enabled() => {
            let claimed = basic_user(&creds).unwrap_or_default();
            auth.authenticate(creds, client_ip(&auth, &req), false)
                .await
                .map_err(|f| {
                    super::audit::record_login_failure(&req, &claimed, &f);
                    token_refusal(&auth, f)
                })?
        }
        _ if auth.enabled() => Principal {
            identity: Identity::Anonymous,
            via: crate::auth::Via::Nothing,
        },
        _ => Principal::open(),
    };
    token_json(&auth.issue(&principal, &scopes, offline)?)
}

/// Largest token request form accepted.
const MAX_FORM: usize = 64 * 1024;

/// `POST /token`, the OAuth2 form docker and containerd use: `grant_type=password` with
/// `username`/`password`, or `grant_type=refresh_token` with `refresh_token`; `scope` (space
/// separated), `service`, `client_id`, `access_type=offline` (asks for a refresh token).
pub async fn token_post(req: HttpRequest, auth: web::Data<Auth>, body: web::Payload) -> Result<HttpResponse> {
    let body = extract::read_limited(body, MAX_FORM).await.map_err(|e| match e {
        Error::BodyRead(_) => Error::TokenRequestInvalid("form not received in time, or unreadable"),
        _ => Error::TokenRequestInvalid("form too large"),
    })?;
    let form = std::str::from_utf8(&body).map_err(|_| Error::TokenRequestInvalid("form is not UTF-8"))?;
    let pairs = web::Query::<Vec<(String, String)>>::from_query(form)
        .map(|q| q.into_inner())
        .map_err(|_| Error::TokenRequestInvalid("malformed form"))?;
    let scopes = requested_scopes(values(&pairs, "scope"))?;
    let offline = extract::query_param(&pairs, "access_type") == Some("offline");
    let principal = if !auth.enabled() {
        Principal::open()
    } else {
        match extract::query_param(&pairs, "grant_type") {
            Some("password") => {
                let user = extract::query_param(&pairs, "username").unwrap_or_default().to_owned();
                let password = extract::query_param(&pairs, "password").unwrap_or_default().to_owned();
                auth.authenticate(
                    Credentials::Basic {
                        user: user.clone(),
                        password,
                    },
                    client_ip(&auth, &req),
                    false,
                )
                .await
                .map_err(|f| {
                    super::audit::record_login_failure(&req, &user, &f);
                    token_refusal(&auth, f)
                })?
            }
            Some("refresh_token") => {
                let token = extract::query_param(&pairs, "refresh_token").unwrap_or_default();
                auth.refresh(token).await.map_err(|f| token_refusal(&auth, f))?
            }
            _ => {
                return Err(Error::TokenRequestInvalid(
                    "grant_type must be password or refresh_token",
                ));
            }
        }
    };
    token_json(&auth.issue(&principal, &scopes, offline)?)
}

/// Whether this request may mount a blob from `from` (from any repository when `None`) into
/// `repo`: it needs pull there. Mounting from anywhere is left to admins once authentication
/// is on, as it would reveal blobs of repositories the caller cannot read.
///
/// A registry token that lacks pull on `from`, where its identity has it, is answered with a
/// 401 challenge naming both scopes (`from`'s pull and `repo`'s push), as Distribution does:
/// clients that take their scopes from the challenge (docker) then fetch a token that mounts.
/// Anything else that may not read `from` is not an error: the caller gets a session instead.
pub fn may_mount_from(auth: &Auth, req: &HttpRequest, repo: &RepoName, from: Option<&RepoName>) -> Result<bool> {
    let Some(who) = principal(req) else { return Ok(false) };
    match (&who.identity, from) {
        (Identity::Open, _) => Ok(true),
        (
            Identity::User {
                admin: true,
                token: None,
                ..
            },
            None,
        ) => Ok(true),
        (_, None) => Ok(false),
        (_, Some(from)) => match auth.authorize(&who, from.as_str(), Action::Pull) {
            Ok(()) => Ok(true),
            Err(refusal @ Refusal::InsufficientScope { .. }) => {
                let scope = format!(
                    "{} {}",
                    challenge_scope(from, Action::Pull),
                    challenge_scope(repo, Action::Push)
                );
                Err(refuse(auth, req, refusal.into(), Some(scope)))
            }
            Err(_) => Ok(false),
        },
    }
}

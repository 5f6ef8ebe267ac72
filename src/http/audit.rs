//! The audit trail on the HTTP side: who a request's changes are recorded for ([`actor`]), the
//! refusals the edge records (denied pushes and deletes, failed logins), and the admin-only
//! endpoint that reads the trail.
//!
//! ```text
//! GET /stowage/v1/audit?repo=<name>&user=<actor>&since=<RFC 3339 | 24h>&limit=<1..1000>&cursor=<id>
//!   -> 200 {"entries":[{"id","time","action","repository","tag","digest","actor","token_id",
//!                       "token_name","client","request_id","detail"},…],"next_cursor":<id>|null}
//!      Link: </stowage/v1/audit?…&cursor=<id>>; rel="next"   (when more rows remain)
//! ```
//!
//! Newest first; `cursor` is the `next_cursor` of the previous page (rows with a lower id), so
//! a client that follows `Link` (or `next_cursor`) sees every row once, even while new rows
//! arrive. Only admins signed in as themselves (password or a registry token from one, not an
//! API token) may read it: anyone else gets 403 `DENIED`, anonymous clients the usual 401
//! challenge. With authentication off, anyone may. The endpoint only reads; other methods are
//! answered 405 `UNSUPPORTED`.

use actix_web::http::header::{CONTENT_TYPE, LINK};
use actix_web::{HttpMessage as _, HttpRequest, HttpResponse, web};

use super::extract;
use crate::auth::{Auth, AuthFail, Identity, Principal, Refusal};
use crate::catalog::audit::{self, Action, Actor, AuditQuery, Event};
use crate::error::{Error, Result};
use crate::registry::Registry;

/// Rows per page when `limit` is absent.
const DEFAULT_LIMIT: usize = 100;

/// A request's id, as `ops::access` assigned it.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Who a request acts as, for the audit trail: the identity the authentication middleware
/// resolved (anonymous when there is none), the API token behind it, the client's address and
/// the request id.
pub fn actor(req: &HttpRequest) -> Actor {
    let principal = req.extensions().get::<Principal>().cloned();
    actor_of(req, principal.as_ref())
}

/// [`actor`] for `principal`, before the middleware has attached it to the request.
fn actor_of(req: &HttpRequest, principal: Option<&Principal>) -> Actor {
    let (name, token) = match principal.map(|p| &p.identity) {
        Some(Identity::User { name, token, .. }) => (name.clone(), token.as_ref().map(|(id, _)| *id)),
        _ => ("anonymous".to_owned(), None),
    };
    Actor {
        name,
        token,
        ..edge(req)
    }
}

/// An actor with only the request's address and id filled in.
fn edge(req: &HttpRequest) -> Actor {
    let client = match req.app_data::<web::Data<Auth>>() {
        Some(auth) => super::auth::client_ip(auth, req).to_string(),
        None => req.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default(),
    };
    Actor {
        name: String::new(),
        token: None,
        client: Some(client),
        request_id: req.extensions().get::<RequestId>().map(|r| r.0.clone()),
    }
}

fn catalog(req: &HttpRequest) -> Option<crate::catalog::Catalog> {
    req.app_data::<web::Data<Registry>>().map(|r| r.catalog().clone())
}

/// Records a refused push or delete (the policy's 403) of `who` on `repo`.
pub fn record_denied(req: &HttpRequest, who: &Principal, repo: &str, action: crate::auth::Action, message: &str) {
    let action = match action {
        crate::auth::Action::Push => Action::DeniedPush,
        crate::auth::Action::Delete | crate::auth::Action::Overwrite => Action::DeniedDelete,
        crate::auth::Action::Pull => return,
    };
    if let Some(catalog) = catalog(req) {
        let event = Event::new(action)
            .repo(repo)
            .detail(serde_json::json!({ "message": message }));
        catalog.audit_refusal(&actor_of(req, Some(who)), event);
    }
}

/// Records a failed login as `user` (the name the client gave) if `fail` is one: wrong
/// credentials, or an API token that was revoked or has expired. Throttled attempts are not
/// recorded (the failures that led to them were).
pub fn record_login_failure(req: &HttpRequest, user: &str, fail: &AuthFail) {
    let reason = match fail {
        AuthFail::Refused(Refusal::BadCredentials) => "wrong user name or password, or an unknown API token".to_owned(),
        AuthFail::Refused(Refusal::TokenRevoked { name, .. }) => format!("API token {name:?} is revoked"),
        AuthFail::Refused(Refusal::TokenExpired { name, .. }) => format!("API token {name:?} has expired"),
        _ => return,
    };
    if let Some(catalog) = catalog(req) {
        // A token secret typed as the user name is not kept.
        let name: String = if crate::auth::password::is_token_secret(user) {
            String::new()
        } else {
            user.chars().take(128).collect()
        };
        let actor = Actor {
            name: if name.is_empty() { "anonymous".to_owned() } else { name },
            ..edge(req)
        };
        catalog.audit_refusal(
            &actor,
            Event::new(Action::LoginFailed).detail(serde_json::json!({ "reason": reason })),
        );
    }
}

/// `GET /stowage/v1/audit`.
pub async fn list(req: HttpRequest, reg: web::Data<Registry>) -> Result<HttpResponse> {
    match super::auth::principal(&req).map(|p| p.identity) {
        Some(Identity::Open) => {}
        Some(Identity::User {
            admin: true,
            token: None,
            ..
        }) => {}
        Some(Identity::User { name, .. }) => {
            return Err(Error::Denied(format!(
                "{name} may not read the audit trail: it is for admins signed in with their password, not an API token"
            )));
        }
        _ => return Err(Error::Denied("anonymous clients may not read the audit trail".into())),
    }
    let pairs = extract::query(&req);
    let get = |k: &str| extract::query_param(&pairs, k).filter(|v| !v.is_empty());
    let limit = match get("limit") {
        None => DEFAULT_LIMIT,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=audit::MAX_PAGE).contains(n))
            .ok_or(Error::PaginationInvalid("limit must be an integer from 1 to 1000"))?,
    };
    let before = get("cursor")
        .map(|v| {
            v.parse::<i64>()
                .map_err(|_| Error::PaginationInvalid("cursor must be a next_cursor value"))
        })
        .transpose()?;
    let since = get("since")
        .map(|v| {
            audit::parse_since(v, crate::catalog::now()).map_err(|_| {
                Error::PaginationInvalid(
                    "since must be an RFC 3339 time (2026-11-30T12:00:00Z) or a period such as 24h",
                )
            })
        })
        .transpose()?;
    let q = AuditQuery {
        repo: get("repo").map(str::to_owned),
        user: get("user").map(str::to_owned),
        since,
        before,
        limit,
    };
    let page = reg.catalog().audit(q).await?;
    let mut resp = HttpResponse::Ok();
    resp.insert_header((CONTENT_TYPE, "application/json"));
    if let Some(next) = page.next_cursor {
        let mut query: Vec<(String, String)> = pairs.into_iter().filter(|(k, _)| k != "cursor").collect();
        query.push(("cursor".into(), next.to_string()));
        let encoded = query
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        resp.insert_header((LINK, format!("</stowage/v1/audit?{encoded}>; rel=\"next\"")));
    }
    let body =
        serde_json::to_string(&page).map_err(|_| crate::error::Internal::Other("serialising audit rows failed"))?;
    Ok(resp.body(body))
}

/// Percent-encodes a query component (everything but unreserved characters).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

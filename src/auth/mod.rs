//! Authentication and access control, without HTTP: who a request comes from ([`Principal`]),
//! what it may do ([`Auth::authorize`]), and the registry tokens the token endpoint hands out.
//!
//! - [`scope`]: actions, scopes (`repository:<name>:pull,push`), repository patterns.
//! - [`policy`]: who may do what where (anonymous pull, rules, admins, API token scopes).
//! - [`password`]: argon2id password hashes and API token secrets.
//! - [`keys`], [`jwt`]: Ed25519 signing keys and the tokens they sign.
//! - [`limiter`]: failed-login throttling per client address and per (user, address), shared
//!   by the replicas of a PostgreSQL catalog.
//! - [`bootstrap`]: the admin user and API token created on the first start.
//! - [`accounts`]: adding, changing and removing users and API tokens (the CLI and the UI).
//! - [`immutable`]: `[[immutable_tags]]` rules and who may overwrite them (the `overwrite` action).
//!
//! Credentials a request may carry: none (anonymous); HTTP Basic with a user's password or an
//! API token secret as the password; a Bearer registry token from the token endpoint. Users and
//! API tokens live in the catalog (`catalog::auth`). What a request's credentials stand for is
//! checked on every request, through [`cache`]: a registry token's signature is verified once
//! and its times on every use; a user or API token read from the catalog is reused only while
//! the catalog's credentials generation has not moved, and every change of a user or token
//! moves it before the change is acknowledged. So removing a user, changing a password or
//! revoking a token takes effect on the next request, and a client repeating its credentials
//! costs a hash-map lookup, not a signature check and a catalog read.
//!
//! Password checks, on every route and on `/token` alike ([`Auth::login`]), in this order:
//! 1. An API token secret (`stw_…`) is looked up by its SHA-256 and never throttled.
//! 2. The [`limiter`] admits the attempt or refuses it (429) before anything else is done
//!    (with a PostgreSQL catalog, after one read of the failures every replica shares).
//! 3. A password verified in the last five minutes against the same stored hash is accepted
//!    from memory (Spack sends Basic credentials with every request).
//! 4. Otherwise argon2 verifies it on the blocking pool, holding one of
//!    `auth.max_concurrent_hashes` permits for the whole verification (the permit moves into
//!    the blocking task, so a client that goes away does not free it early); an attempt that
//!    cannot get a permit within [`HASH_WAIT`] is refused (429) without hashing. An unknown
//!    user is verified against a dummy hash, so that both cases cost the same.
//!
//! Every refusal has a reason a person can read ([`Refusal`]), never only the code's default
//! text: wrong credentials; an API token that was revoked or has expired (naming the token and
//! its user: whoever presents it holds its secret); a registry token that has expired or does
//! not verify (saying which); a registry token that lacks an action (naming the repository and
//! the action); an identity the policy refuses (naming who, what and where); throttled after
//! failures or too many verifications at once (429 `TOOMANYREQUESTS` with `Retry-After`). The
//! HTTP layer turns each into its status and message (`http::auth`).
//!
//! A registry token that has expired is accepted only to continue an upload session, and only
//! within `auth.upload_token_grace_secs` of its expiry (bounded by the upload timeout); the
//! upload layer makes sure the session is the token's user's own.

pub mod accounts;
pub mod bootstrap;
pub mod cache;
pub mod immutable;
pub mod jwt;
pub mod keys;
pub mod limiter;
pub mod password;
pub mod policy;
pub mod scope;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::Digest as _;

pub use immutable::{
    ImmutableTagRefusal, ImmutableTagRule, ImmutableTags, Overwrite, Overwritten, TagChange, TagLocks,
};
pub use jwt::{Claims, TokenUse, VerifyError};
pub use keys::KeySet;
pub use policy::{Policy, Rule, Subject};
pub use scope::{Action, Grant, Pattern, Scope, TagPattern};

use crate::catalog::Catalog;
use crate::catalog::auth::ApiTokenRecord;
use crate::config::AuthConfig;
use crate::error::{Error, Internal};

/// How long a verified password is remembered (the stored hash is still re-read each time, so
/// a password change or user removal takes effect at once).
const LOGIN_CACHE_TTL: Duration = Duration::from_secs(300);
const LOGIN_CACHE_MAX: usize = 10_000;
/// An API token's last-used time is written at most this often.
const TOUCH_INTERVAL_SECS: i64 = 60;
/// Longest a password attempt waits for a verification permit before it is refused.
pub const HASH_WAIT: Duration = Duration::from_secs(2);
/// Refused password checks are reported at most this often.
const BUSY_WARNING_INTERVAL_SECS: u64 = 10;

/// Credentials found on a request.
#[derive(Clone)]
pub enum Credentials {
    None,
    Basic { user: String, password: String },
    Bearer(String),
}

impl std::fmt::Debug for Credentials {
    // Never prints a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::None => f.write_str("None"),
            Credentials::Basic { user, .. } => write!(f, "Basic({user}, <redacted>)"),
            Credentials::Bearer(_) => f.write_str("Bearer(<redacted>)"),
        }
    }
}

/// Who is acting.
#[derive(Debug, Clone)]
pub enum Identity {
    /// Authentication is off: everything is allowed.
    Open,
    Anonymous,
    User {
        name: String,
        admin: bool,
        /// The API token the user acts through, with its scopes.
        token: Option<(i64, Vec<Grant>)>,
        /// The user's credentials epoch, when signed in with the password (0 through a token).
        epoch: i64,
    },
}

/// How the identity was established.
#[derive(Debug, Clone)]
pub enum Via {
    Nothing,
    Basic,
    Bearer(Arc<Claims>),
}

/// An authenticated request's identity.
#[derive(Debug, Clone)]
pub struct Principal {
    pub identity: Identity,
    pub via: Via,
}

impl Principal {
    pub fn open() -> Principal {
        Principal {
            identity: Identity::Open,
            via: Via::Nothing,
        }
    }

    fn subject(&self) -> Option<Subject<'_>> {
        match &self.identity {
            Identity::Open => None,
            Identity::Anonymous => Some(Subject::Anonymous),
            Identity::User { name, admin, token, .. } => Some(Subject::User {
                name,
                admin: *admin,
                scopes: token.as_ref().map(|(_, s)| s.as_slice()),
            }),
        }
    }

    /// The user's name, if signed in.
    pub fn user(&self) -> Option<&str> {
        match &self.identity {
            Identity::User { name, .. } => Some(name),
            _ => None,
        }
    }
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No credentials, and anonymous clients may not do this: challenge.
    NeedCredentials,
    /// Wrong password, unknown user, or an unknown API token.
    BadCredentials,
    /// An API token (used as the password, or behind a registry token) that was revoked.
    TokenRevoked { user: String, name: String },
    /// An API token (used as the password, or behind a registry token) past its expiry.
    TokenExpired { user: String, name: String },
    /// A registry token that does not verify.
    InvalidToken(VerifyError),
    /// A valid registry token that lacks `action` on `repo`; a new token would carry it.
    InsufficientScope { repo: String, action: Action },
    /// The identity may not do this at all; the message says who may not do what where (a
    /// message of its own also keeps docker from taking the refusal for a passing failure: it
    /// retries a push for ~50 s on an error that carries only the code's default text).
    Denied(String),
    /// Too many failed logins from this address (for this user); retry after this many seconds.
    TooManyAttempts(u64),
    /// Too many password verifications at once; retry after this many seconds.
    Busy(u64),
}

/// A refusal or an internal failure.
#[derive(Debug)]
pub enum AuthFail {
    Refused(Refusal),
    Internal(Error),
}

impl From<Error> for AuthFail {
    fn from(e: Error) -> Self {
        AuthFail::Internal(e)
    }
}

impl From<Refusal> for AuthFail {
    fn from(r: Refusal) -> Self {
        AuthFail::Refused(r)
    }
}

/// The token endpoint's answer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TokenResponse {
    pub token: String,
    pub access_token: String,
    pub expires_in: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
}

/// The authentication service; cheap to clone.
#[derive(Clone)]
pub struct Auth {
    inner: Arc<Inner>,
}

struct Inner {
    enabled: bool,
    realm: Option<String>,
    trusted_proxies: Vec<IpAddr>,
    service: String,
    issuer: String,
    token_ttl: u64,
    refresh_ttl: u64,
    /// How long after its token expired an upload session may still be continued with it.
    session_grace: u64,
    keys: KeySet,
    policy: Policy,
    catalog: Catalog,
    limiter: limiter::Limiter,
    /// Permits for password verifications (each holds argon2's memory while it runs).
    hashes: Arc<tokio::sync::Semaphore>,
    max_hashes: u32,
    /// Password checks refused for want of a permit since the last warning, and when that was.
    busy_refusals: std::sync::atomic::AtomicU64,
    busy_warned_at: std::sync::atomic::AtomicU64,
    /// A hash to verify against when the user does not exist, so that both cases take as long.
    dummy_hash: String,
    /// sha256(user, password) -> (the PHC hash it verified against, when).
    login_cache: Mutex<HashMap<[u8; 32], (String, Instant)>>,
    /// API token id -> when its last-used time was last written.
    touched: Mutex<HashMap<i64, i64>>,
    /// Verified tokens and identities (see [`cache`]).
    cache: cache::AuthCache,
}

fn now_secs() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// What the catalog says of an API token, if it is live: a revoked one is refused saying so,
/// one with unreadable scopes as bad credentials. (Expiry is checked at each use.)
fn live_token(rec: ApiTokenRecord) -> Result<cache::CachedToken, Refusal> {
    if rec.revoked_at.is_some() {
        return Err(Refusal::TokenRevoked {
            user: rec.user,
            name: rec.name,
        });
    }
    let scopes: Vec<Grant> = serde_json::from_str(&rec.scopes).map_err(|_| {
        tracing::error!(token_id = rec.id, "an API token's scopes in the catalog are unreadable");
        Refusal::BadCredentials
    })?;
    Ok(cache::CachedToken {
        id: rec.id,
        user: rec.user,
        name: rec.name,
        user_admin: rec.user_admin,
        expires_at: rec.expires_at,
        scopes,
    })
}

/// Runs CPU-heavy work on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Error> {
    Ok(crate::metrics::spawn_blocking(f).await?)
}

impl Auth {
    /// Sets up authentication as configured: loads (or generates) the signing keys.
    /// `upload_timeout` bounds how long after its expiry a token may continue an upload.
    pub async fn open(
        config: &AuthConfig,
        data_dir: &Path,
        catalog: Catalog,
        upload_timeout: Duration,
    ) -> Result<Auth, keys::KeyError> {
        let dir = keys::key_dir(data_dir);
        if config.enabled && config.signing_key.is_none() && catalog.locks().is_some() {
            // Each replica would sign with a key of its own data directory, and tokens one
            // issues would be refused by the others.
            tracing::warn!(
                keys = %dir.display(),
                "auth.signing_key is not set: with a PostgreSQL catalog every replica must sign with one shared \
                 key (a secret mounted at auth.signing_key, older ones in auth.verify_keys); this server uses \
                 its own"
            );
        }
        let signing = config.signing_key.clone();
        let verify = config.verify_keys.clone();
        let keys = crate::metrics::spawn_blocking(move || KeySet::load(&dir, signing.as_deref(), &verify, now_secs()))
            .await
            .map_err(|e| e.to_string())??;
        let dummy_hash = blocking(|| password::hash("stowage: no such user"))
            .await
            .map_err(|e| e.to_string())??;
        let limiter = limiter::Limiter::new(limiter::Settings {
            free: config.max_failed_logins,
            backoff: Duration::from_secs(config.failed_login_backoff_secs.max(1)),
            backoff_max: Duration::from_secs(config.failed_login_backoff_max_secs),
            forget_after: Duration::from_secs(config.failed_login_window_secs),
            max_entries: limiter::MAX_ENTRIES,
        });
        // Replicas of a PostgreSQL catalog share their failed logins (see `limiter`); SQLite
        // has one process, and its logins no catalog work.
        let limiter = match catalog.engine().await.map_err(|e| e.to_string())? {
            crate::catalog::db::Engine::Postgres => limiter.shared_through(catalog.clone()),
            crate::catalog::db::Engine::Sqlite => limiter,
        };
        Ok(Auth {
            inner: Arc::new(Inner {
                enabled: config.enabled,
                realm: config.realm.clone(),
                trusted_proxies: config.trusted_proxies.clone(),
                service: config.service.clone(),
                issuer: config.issuer.clone(),
                token_ttl: config.token_ttl_secs.max(1),
                refresh_ttl: config.refresh_token_ttl_secs.max(1),
                session_grace: config.upload_token_grace_secs.min(upload_timeout.as_secs()),
                keys,
                policy: Policy::new(config.anonymous_pull.clone(), config.rules.clone()),
                catalog,
                limiter,
                hashes: Arc::new(tokio::sync::Semaphore::new(
                    usize::try_from(config.max_concurrent_hashes.max(1)).unwrap_or(1),
                )),
                max_hashes: config.max_concurrent_hashes.max(1),
                busy_refusals: std::sync::atomic::AtomicU64::new(0),
                busy_warned_at: std::sync::atomic::AtomicU64::new(0),
                dummy_hash,
                login_cache: Mutex::new(HashMap::new()),
                touched: Mutex::new(HashMap::new()),
                cache: cache::AuthCache::new(),
            }),
        })
    }

    pub fn enabled(&self) -> bool {
        self.inner.enabled
    }

    /// A password hasher drawing on the permits sign-in verifications use
    /// (`auth.max_concurrent_hashes` in all): a flood of password changes cannot take more CPU
    /// and memory than a flood of sign-ins.
    pub fn hasher(&self) -> password::Hasher {
        password::Hasher::sharing(self.inner.hashes.clone(), HASH_WAIT)
    }

    /// The configured token realm, if not derived per request.
    pub fn realm(&self) -> Option<&str> {
        self.inner.realm.as_deref()
    }

    /// Whether forwarding headers from `peer` are believed.
    pub fn trusts_proxy(&self, peer: IpAddr) -> bool {
        self.inner.trusted_proxies.contains(&peer)
    }

    pub fn service(&self) -> &str {
        &self.inner.service
    }

    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    pub fn signing_kid(&self) -> &str {
        self.inner.keys.signing_kid()
    }

    /// Resolves a request's credentials. `continuing_upload` accepts a registry token that has
    /// expired within `auth.upload_token_grace_secs`: an upload is authorised when its session
    /// starts.
    pub async fn authenticate(
        &self,
        creds: Credentials,
        client: IpAddr,
        continuing_upload: bool,
    ) -> Result<Principal, AuthFail> {
        if !self.inner.enabled {
            return Ok(Principal::open());
        }
        match creds {
            Credentials::None => Ok(Principal {
                identity: Identity::Anonymous,
                via: Via::Nothing,
            }),
            Credentials::Basic { user, password } => {
                let identity = self.login(&user, password, client).await?;
                Ok(Principal {
                    identity,
                    via: Via::Basic,
                })
            }
            Credentials::Bearer(token) => {
                let claims = self.verified_token(&token, continuing_upload)?;
                let identity = self.identity_of(&claims).await?;
                Ok(Principal {
                    identity,
                    via: Via::Bearer(claims),
                })
            }
        }
    }

    /// A registry token's claims, if it verifies: its signature, issuer, audience and use once
    /// (then remembered by the token's SHA-256 until it can no longer be accepted), its times
    /// on every call (`continuing_upload` allows `auth.upload_token_grace_secs` past expiry).
    fn verified_token(&self, token: &str, continuing_upload: bool) -> Result<Arc<Claims>, Refusal> {
        let grace = continuing_upload.then_some(self.inner.session_grace);
        let key: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        let now = now_secs();
        if let Some(claims) = self.inner.cache.token(&key, now) {
            jwt::check_times(&claims, grace, now).map_err(Refusal::InvalidToken)?;
            return Ok(claims);
        }
        let claims = jwt::verify(
            &self.inner.keys,
            token,
            &self.inner.issuer,
            &self.inner.service,
            TokenUse::Access,
            grace,
        )
        .map_err(Refusal::InvalidToken)?;
        let claims = Arc::new(claims);
        let until = claims
            .exp
            .saturating_add(jwt::LEEWAY_SECS)
            .saturating_add(self.inner.session_grace);
        // Memory is bounded by entries and by their size: an unusually large token is
        // verified on every use instead.
        if token.len() <= cache::MAX_TOKEN_BYTES {
            self.inner.cache.remember_token(key, Arc::clone(&claims), until, now);
        }
        Ok(claims)
    }

    /// The identity a verified token stands for, as it is now (the user must still exist, the
    /// API token must still be live).
    async fn identity_of(&self, claims: &Claims) -> Result<Identity, AuthFail> {
        if claims.sub.is_empty() {
            return Ok(Identity::Anonymous);
        }
        if let Some(tid) = claims.tid {
            let token = self.api_token(tid).await?;
            if token.user != claims.sub {
                return Err(Refusal::InvalidToken(VerifyError::WrongUse).into());
            }
            return self.token_identity(token, None).map_err(AuthFail::from);
        }
        let user = self.current_user(&claims.sub).await?;
        let user = user.ok_or(Refusal::BadCredentials)?;
        if claims.epoch != user.credentials_epoch {
            return Err(Refusal::InvalidToken(VerifyError::Superseded).into());
        }
        Ok(Identity::User {
            name: user.name,
            admin: user.admin,
            token: None,
            epoch: user.credentials_epoch,
        })
    }

    /// A user as the catalog has them now (through the cache; `None`: no such user).
    pub async fn current_user(&self, name: &str) -> Result<Option<cache::CachedUser>, Error> {
        // The generation is read before the catalog is: see the invariants of `cache`.
        let epoch = self.inner.catalog.auth_epoch();
        let now = now_secs();
        if let Some(user) = self.inner.cache.user(name, epoch, now) {
            return Ok(Some(user));
        }
        let Some(rec) = self.inner.catalog.user(name).await? else {
            return Ok(None);
        };
        let user = cache::CachedUser {
            name: rec.name,
            admin: rec.admin,
            credentials_epoch: rec.credentials_epoch,
            password_hash: rec.password_hash,
        };
        self.inner.cache.remember_user(user.clone(), epoch, now);
        Ok(Some(user))
    }

    /// A live API token by id (through the cache); a missing, revoked or unreadable one is
    /// refused, and never remembered.
    async fn api_token(&self, id: i64) -> Result<cache::CachedToken, AuthFail> {
        let epoch = self.inner.catalog.auth_epoch();
        let now = now_secs();
        if let Some(token) = self.inner.cache.api_token(id, epoch, now) {
            return Ok(token);
        }
        let rec = self.inner.catalog.api_token(id).await?;
        let rec = rec.ok_or(Refusal::InvalidToken(VerifyError::WrongUse))?;
        let token = live_token(rec)?;
        self.inner.cache.remember_api_token(token.clone(), None, epoch, now);
        Ok(token)
    }

    /// The identity of a live API token; an expired one is refused saying so (and forgotten).
    fn token_identity(&self, token: cache::CachedToken, secret_hash: Option<&str>) -> Result<Identity, Refusal> {
        let now = now_secs() as i64;
        if token.expires_at.is_some_and(|e| e <= now) {
            self.inner.cache.forget_api_token(token.id, secret_hash);
            return Err(Refusal::TokenExpired {
                user: token.user,
                name: token.name,
            });
        }
        self.touch(token.id, now);
        Ok(Identity::User {
            name: token.user,
            admin: token.user_admin,
            token: Some((token.id, token.scopes)),
            epoch: 0,
        })
    }

    /// Records an API token's use, at most once a minute, off the request's path.
    fn touch(&self, id: i64, now: i64) {
        let due = match self.inner.touched.lock() {
            Ok(mut t) => {
                let last = t.get(&id).copied().unwrap_or(0);
                if now - last >= TOUCH_INTERVAL_SECS {
                    t.insert(id, now);
                    true
                } else {
                    false
                }
            }
            Err(_) => false,
        };
        if due {
            let catalog = self.inner.catalog.clone();
            tokio::spawn(async move {
                if let Err(e) = catalog.touch_api_token(id, now).await {
                    tracing::warn!(token_id = id, error = %e, "recording an API token's use failed");
                }
            });
        }
    }

    /// Checks a user name and password (or API token secret): throttled per address and per
    /// (user, address), bounded in concurrent verifications, and in constant time whether or
    /// not the user exists. API token secrets are never throttled.
    pub async fn login(&self, user: &str, password: String, client: IpAddr) -> Result<Identity, AuthFail> {
        if password::is_token_secret(&password) {
            let hash = password::token_hash(&password);
            let epoch = self.inner.catalog.auth_epoch();
            let now = now_secs();
            let token = match self.inner.cache.secret(&hash, epoch, now) {
                Some(token) => Ok(token),
                None => match self.inner.catalog.api_token_by_hash(hash.clone()).await? {
                    Some(rec) => live_token(rec).inspect(|token| {
                        self.inner
                            .cache
                            .remember_api_token(token.clone(), Some(hash.clone()), epoch, now);
                    }),
                    None => {
                        crate::metrics::get().failed_logins.inc();
                        tracing::info!(user, %client, "failed login: unknown API token");
                        return Err(Refusal::BadCredentials.into());
                    }
                },
            };
            return token
                .and_then(|t| self.token_identity(t, Some(&hash)))
                .map_err(|refusal| {
                    crate::metrics::get().failed_logins.inc();
                    tracing::info!(user, %client, reason = ?refusal, "failed login: unusable API token");
                    refusal.into()
                });
        }
        let attempt = limiter::Attempt::new(client, user);
        let pending = self.inner.limiter.admit(attempt).await.map_err(|retry_after| {
            // Refusals cost nothing and may come by the thousand: debug only. The failures that
            // led to them were logged at info, and the limiter bounds those.
            tracing::debug!(user, %client, retry_after, "login refused: too many failed logins from this address");
            Refusal::TooManyAttempts(retry_after)
        })?;
        match self.check_password(user, password).await {
            Ok(Some(identity)) => {
                pending.succeed().await;
                Ok(identity)
            }
            Ok(None) => {
                pending.fail().await;
                crate::metrics::get().failed_logins.inc();
                tracing::info!(user, %client, "failed login: wrong user name or password");
                Err(Refusal::BadCredentials.into())
            }
            Err(e) => {
                // Nothing was verified: the attempt does not count.
                pending.release();
                Err(e)
            }
        }
    }

    async fn check_password(&self, user: &str, password: String) -> Result<Option<Identity>, AuthFail> {
        let record = self.current_user(user).await?;
        let key: [u8; 32] = {
            let mut h = sha2::Sha256::new();
            h.update(user.as_bytes());
            h.update([0]);
            h.update(password.as_bytes());
            h.finalize().into()
        };
        if let Some(rec) = &record {
            let cached = self.inner.login_cache.lock().ok().is_some_and(|c| {
                c.get(&key)
                    .is_some_and(|(phc, at)| *phc == rec.password_hash && at.elapsed() < LOGIN_CACHE_TTL)
            });
            if cached {
                return Ok(Some(Identity::User {
                    name: rec.name.clone(),
                    admin: rec.admin,
                    token: None,
                    epoch: rec.credentials_epoch,
                }));
            }
        }
        let phc = record
            .as_ref()
            .map_or_else(|| self.inner.dummy_hash.clone(), |r| r.password_hash.clone());
        let permit = tokio::time::timeout(HASH_WAIT, self.inner.hashes.clone().acquire_owned())
            .await
            .map_err(|_| {
                self.warn_busy();
                Refusal::Busy(1)
            })?
            .map_err(|_| Error::from(Internal::Other("the password verification semaphore is closed")))?;
        let ok = blocking(move || {
            let _permit = permit;
            password::verify(&password, &phc)
        })
        .await?;
        match record {
            Some(rec) if ok => {
                if let Ok(mut cache) = self.inner.login_cache.lock() {
                    if cache.len() >= LOGIN_CACHE_MAX {
                        cache.clear();
                    }
                    cache.insert(key, (rec.password_hash.clone(), Instant::now()));
                }
                Ok(Some(Identity::User {
                    name: rec.name,
                    admin: rec.admin,
                    token: None,
                    epoch: rec.credentials_epoch,
                }))
            }
            _ => Ok(None),
        }
    }

    /// Logs that password checks are being refused for want of a permit: at most once every
    /// [`BUSY_WARNING_INTERVAL_SECS`], with the number refused since the last warning.
    fn warn_busy(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.inner.busy_refusals.fetch_add(1, Relaxed);
        let now = now_secs();
        let last = self.inner.busy_warned_at.load(Relaxed);
        if now.saturating_sub(last) >= BUSY_WARNING_INTERVAL_SECS
            && self
                .inner
                .busy_warned_at
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            let refused = self.inner.busy_refusals.swap(0, Relaxed);
            tracing::warn!(
                refused,
                permits = self.inner.max_hashes,
                "password checks refused with 429: every verification permit was taken for 2 s \
                 (auth.max_concurrent_hashes); a burst of logins or an attack on passwords"
            );
        }
    }

    /// Whether `who` may do `action` on repository `repo`, and if not, how to refuse.
    ///
    /// No identity gets less than an anonymous client: pulling a repository of
    /// `auth.anonymous_pull` is allowed whatever the request's token covers.
    pub fn authorize(&self, who: &Principal, repo: &str, action: Action) -> Result<(), Refusal> {
        let Some(subject) = who.subject() else { return Ok(()) };
        if action == Action::Pull && self.inner.policy.public(repo) {
            return Ok(());
        }
        let allowed = self.inner.policy.allows(subject, repo, action);
        let anonymous = matches!(subject, Subject::Anonymous);
        match &who.via {
            Via::Bearer(claims) if allowed && claims.grants(repo, action) => Ok(()),
            Via::Bearer(_) if allowed => Err(Refusal::InsufficientScope {
                repo: repo.to_owned(),
                action,
            }),
            _ if allowed => Ok(()),
            _ if anonymous => Err(Refusal::NeedCredentials),
            _ => Err(Refusal::Denied(denial(subject, &self.inner.policy, repo, action))),
        }
    }

    /// Whether `who` may overwrite (move or delete) immutable tags of `repo`: whether it has the
    /// `overwrite` action there. With authentication off nobody may (see `auth::immutable`).
    pub fn overwrite(&self, who: &Principal, repo: &str) -> Overwrite {
        if matches!(who.identity, Identity::Open) || self.authorize(who, repo, Action::Overwrite).is_err() {
            return Overwrite::Refused;
        }
        Overwrite::Allowed {
            by: who.user().unwrap_or("anonymous").to_owned(),
        }
    }

    /// Whether `who` may see `repo` in listings (the catalog).
    pub fn may_list(&self, who: &Principal, repo: &str) -> bool {
        who.subject()
            .is_none_or(|s| self.inner.policy.allows(s, repo, Action::Pull))
    }

    /// Issues a registry token for the scopes asked, granting of each only what `who` may do
    /// (never refusing a request for more). Where `push` is granted and `who` also has
    /// `overwrite`, the token carries `overwrite` too: clients ask for `pull,push` only, and an
    /// identity allowed to overwrite immutable tags could otherwise never do so through them.
    /// With `offline`, a signed-in user also gets a refresh token.
    pub fn issue(&self, who: &Principal, scopes: &[Scope], offline: bool) -> Result<TokenResponse, Error> {
        let subject = who.subject().unwrap_or(Subject::Anonymous);
        let mut access: Vec<jwt::AccessEntry> = Vec::new();
        for scope in scopes {
            match scope {
                Scope::Repository { name, actions } => {
                    if name.parse::<crate::oci::RepoName>().is_err() {
                        continue;
                    }
                    let mut granted = match who.identity {
                        Identity::Open => actions.clone(),
                        _ => self.inner.policy.allowed_actions(subject, name, actions),
                    };
                    if granted.contains(&Action::Push)
                        && !granted.contains(&Action::Overwrite)
                        && !matches!(who.identity, Identity::Open)
                        && self.inner.policy.allows(subject, name, Action::Overwrite)
                    {
                        granted.push(Action::Overwrite);
                    }
                    if granted.is_empty() {
                        continue;
                    }
                    match access.iter_mut().find(|e| e.kind == "repository" && e.name == *name) {
                        Some(e) => {
                            for a in granted {
                                if !e.actions.iter().any(|x| x == a.as_str()) {
                                    e.actions.push(a.as_str().to_owned());
                                }
                            }
                        }
                        None => access.push(jwt::AccessEntry::repository(name, &granted)),
                    }
                }
                Scope::Catalog => {
                    if !access.iter().any(|e| e.kind == "registry") {
                        access.push(jwt::AccessEntry::catalog());
                    }
                }
            }
        }
        let (sub, tid, epoch) = match &who.identity {
            Identity::User { name, token, epoch, .. } => (name.clone(), token.as_ref().map(|(id, _)| *id), *epoch),
            _ => (String::new(), None, 0),
        };
        let now = now_secs();
        let claims = Claims {
            iss: self.inner.issuer.clone(),
            sub: sub.clone(),
            aud: self.inner.service.clone(),
            exp: now + self.inner.token_ttl,
            nbf: now,
            iat: now,
            jti: uuid::Uuid::new_v4().simple().to_string(),
            access,
            tid,
            token_use: TokenUse::Access,
            epoch,
        };
        let sign = |c: &Claims| {
            jwt::sign(&self.inner.keys, c).map_err(|_| Error::from(Internal::Other("signing a token failed")))
        };
        let token = sign(&claims)?;
        let refresh_token = if offline && !sub.is_empty() {
            let refresh = Claims {
                exp: now + self.inner.refresh_ttl,
                jti: uuid::Uuid::new_v4().simple().to_string(),
                access: Vec::new(),
                token_use: TokenUse::Refresh,
                ..claims
            };
            Some(sign(&refresh)?)
        } else {
            None
        };
        crate::metrics::get()
            .tokens_issued
            .get_or_create(&crate::metrics::KindLabels { kind: "registry" })
            .inc();
        Ok(TokenResponse {
            access_token: token.clone(),
            token,
            expires_in: self.inner.token_ttl,
            refresh_token,
        })
    }

    /// The identity a refresh token (OAuth2 `grant_type=refresh_token`) stands for.
    pub async fn refresh(&self, refresh_token: &str) -> Result<Principal, AuthFail> {
        let claims = jwt::verify(
            &self.inner.keys,
            refresh_token,
            &self.inner.issuer,
            &self.inner.service,
            TokenUse::Refresh,
            None,
        )
        .map_err(Refusal::InvalidToken)?;
        if claims.sub.is_empty() {
            return Err(Refusal::BadCredentials.into());
        }
        let identity = self.identity_of(&claims).await?;
        Ok(Principal {
            identity,
            via: Via::Basic,
        })
    }
}

/// The message of a 403 `DENIED`: who may not do what on which repository. When the user's role
/// would allow it, the API token's scopes are what refuse, and the message says so.
fn denial(subject: Subject<'_>, policy: &Policy, repo: &str, action: Action) -> String {
    match subject {
        Subject::User { name, admin, scopes } => {
            let role = Subject::User {
                name,
                admin,
                scopes: None,
            };
            if scopes.is_some() && policy.allows(role, repo, action) {
                format!(
                    "the API token's scopes do not grant {} on repository {repo}",
                    action.as_str()
                )
            } else {
                format!("user {name} may not {} on repository {repo}", action.as_str())
            }
        }
        Subject::Anonymous => format!("anonymous clients may not {} on repository {repo}", action.as_str()),
    }
}

/// A `WWW-Authenticate` challenge, as the HTTP layer sends it with a 401.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// What went wrong, for a person (the error body's `message`): never the code's default
    /// text, and naming the repository and action where a token's scope is what is missing.
    pub message: String,
    /// The token endpoint's URL.
    pub realm: String,
    pub service: String,
    /// The scope the request needs (`repository:<name>:pull`), when it names one.
    pub scope: Option<String>,
    /// `invalid_token` or `insufficient_scope`, when a token was presented.
    pub error: Option<&'static str>,
    /// Offer Bearer (the token flow); false only on the token endpoint itself.
    pub bearer: bool,
    /// Also offer Basic (plain-HTTP set-ups, where clients will not fetch tokens from an http
    /// realm; and the token endpoint).
    pub basic: bool,
}

impl Challenge {
    /// The header values, Bearer first.
    pub fn header_values(&self) -> Vec<String> {
        let mut bearer = format!("Bearer realm=\"{}\",service=\"{}\"", self.realm, self.service);
        if let Some(scope) = &self.scope {
            bearer.push_str(&format!(",scope=\"{scope}\""));
        }
        if let Some(error) = self.error {
            bearer.push_str(&format!(",error=\"{error}\""));
        }
        let mut out = Vec::new();
        if self.bearer {
            out.push(bearer);
        }
        if self.basic {
            // The same realm as the Bearer challenge: clients that join both headers into one
            // and read the last `realm` (oras-py, via requests) still find the token endpoint.
            let realm = if self.bearer { &self.realm } else { &self.service };
            out.push(format!("Basic realm=\"{realm}\""));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_denial_names_the_user_or_the_token_the_action_and_the_repository() {
        let policy = Policy::new(
            vec![],
            vec![Rule {
                repositories: vec![Pattern::new("demo/**")],
                users: vec!["alice".into()],
                actions: vec![Action::Pull, Action::Push],
            }],
        );
        let alice = |scopes| Subject::User {
            name: "alice",
            admin: false,
            scopes,
        };
        let grants = [Grant::parse("other/**:pull,push").expect("grant")];
        assert_eq!(
            denial(alice(Some(&grants)), &policy, "demo/app", Action::Push),
            "the API token's scopes do not grant push on repository demo/app"
        );
        // Outside her rules the token is not what refuses.
        assert_eq!(
            denial(alice(Some(&grants)), &policy, "else/app", Action::Push),
            "user alice may not push on repository else/app"
        );
        assert_eq!(
            denial(alice(None), &policy, "demo/app", Action::Delete),
            "user alice may not delete on repository demo/app"
        );
        assert_eq!(
            denial(Subject::Anonymous, &policy, "demo/app", Action::Pull),
            "anonymous clients may not pull on repository demo/app"
        );
    }
}

//! Accounts: adding, changing and removing users and API tokens. The one service both
//! `stowage user …` / `stowage token …` (`crate::admin`) and the web UI's admin pages
//! (`crate::ui::admin`) call; neither holds a rule of its own.
//!
//! The rules, each in one place here:
//! - a user name is 1-128 letters, digits, `.`, `-`, `_` or `@` ([`valid_user_name`]), so a
//!   name is never markup, a path or a scope separator;
//! - a password is not empty and does not look like an API token secret (`stw_…`: a client
//!   presenting it would be taken for a token), and is hashed with argon2id through a
//!   [`Hasher`], whose permits the server shares with sign-in verifications
//!   (`Auth::hasher`, `auth.max_concurrent_hashes`): hashing is CPU and memory a client can
//!   ask for, and stays bounded however many password changes arrive;
//! - a token name is 1-128 characters, not all digits (revoking takes an id or a name);
//!   scopes are `<repository pattern>:<actions>` ([`Grant::parse`]); an expiry is a number of
//!   days from now; the secret is generated here, returned once to the caller and only its
//!   hash is stored;
//! - a user acting through the UI cannot remove themself or take their own admin role (the
//!   last admin could otherwise lock everyone out of the admin pages by a slip).
//!
//! Who acts is a [`Caller`]: the audit trail's [`Actor`] (every change is recorded by the
//! catalog in the transaction that makes it, see `catalog::auth`) and, for a signed-in user,
//! their name for the rule above. Callers check that the caller may manage accounts (an admin,
//! or the operator at the command line); this module does not look at roles.
//!
//! # Changes of credentials: one function each
//!
//! Every change that must end what a credential grants goes through exactly one function here:
//! [`Accounts::set_password`], [`Accounts::set_admin`], [`Accounts::remove_user`] and
//! [`Accounts::revoke_token`]. What `Auth` remembers of users and tokens (`auth::cache`) needs
//! no step of theirs: the catalog's triggers move the credentials generation in the transaction
//! that makes each change, and the catalog publishes it before the change is acknowledged, so
//! the request after it is checked against the catalog again.

use crate::auth::Grant;
use crate::auth::password::{self, HashError, Hasher};
use crate::catalog::Catalog;
use crate::catalog::audit::Actor;
use crate::catalog::auth::{ApiTokenRecord, NewTokenError, UserSummary};
use crate::error::Error;

/// Longest user or token name.
pub const MAX_NAME: usize = 128;
/// Longest password accepted (argon2 takes any length; a bound keeps a form's cost bounded).
pub const MAX_PASSWORD: usize = 1024;
/// Most scopes one token may carry.
pub const MAX_SCOPES: usize = 64;
/// Longest expiry, in days (a century: beyond it, "never" says it better).
pub const MAX_EXPIRY_DAYS: u64 = 36_500;

/// Whether `name` is a valid user name.
pub fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'@'))
}

/// Whether `name` is a valid token name.
pub fn valid_token_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME && !name.bytes().all(|b| b.is_ascii_digit())
}

/// Checks a new password given twice (the second as typed again, when the caller asked twice).
pub fn check_new_password(password: &str, again: Option<&str>) -> Result<(), AccountError> {
    if again.is_some_and(|a| a != password) {
        return Err(AccountError::PasswordsDiffer);
    }
    if password.is_empty() {
        return Err(AccountError::EmptyPassword);
    }
    if password.len() > MAX_PASSWORD {
        return Err(AccountError::LongPassword);
    }
    if password::is_token_secret(password) {
        return Err(AccountError::TokenLikePassword);
    }
    Ok(())
}

/// Why an account change was refused or failed. `Display` is a sentence for a person.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("a user name is 1-128 letters, digits, '.', '-', '_' or '@'")]
    InvalidUserName,
    #[error("the passwords differ")]
    PasswordsDiffer,
    #[error("empty password")]
    EmptyPassword,
    #[error("the password is too long (1024 bytes at most)")]
    LongPassword,
    #[error("a password may not start with {:?}", password::TOKEN_PREFIX)]
    TokenLikePassword,
    #[error("user {0} exists")]
    UserExists(String),
    #[error("no user {0}")]
    NoUser(String),
    /// The caller would remove themself or take their own admin role.
    #[error("{0}")]
    OwnAccount(&'static str),
    #[error("a token name is 1-128 characters, not all digits")]
    InvalidTokenName,
    /// A scope that does not parse, with why.
    #[error("{0}")]
    InvalidScope(String),
    #[error("a token needs one or more scopes (at most 64)")]
    ScopeCount,
    #[error("the expiry is a whole number of days, at most 36500 (0: expired at once), or none")]
    InvalidExpiry,
    #[error("{user} already has a live token named {name}")]
    TokenNameTaken { user: String, name: String },
    /// No single live token has this id or name.
    #[error("no single live token {0}")]
    NoToken(String),
    /// Every hashing permit stayed taken (retry in a second).
    #[error("too many password hashes at once; try again in a moment")]
    Busy,
    /// The catalog or the hasher failed.
    #[error(transparent)]
    Internal(#[from] Error),
}

impl From<HashError> for AccountError {
    fn from(e: HashError) -> Self {
        match e {
            HashError::Busy => AccountError::Busy,
            HashError::Failed(m) => {
                tracing::error!(error = %m, "hashing a password failed");
                AccountError::Internal(Error::from(crate::error::Internal::Other("hashing a password failed")))
            }
        }
    }
}

/// Who is changing accounts.
#[derive(Debug, Clone)]
pub struct Caller {
    /// For the audit trail.
    pub actor: Actor,
    /// The signed-in user acting, if any (the operator at the command line is none).
    pub user: Option<String>,
}

impl Caller {
    /// The operator at the command line (`Actor::cli`).
    pub fn cli() -> Caller {
        Caller {
            actor: Actor::cli(),
            user: None,
        }
    }

    /// A signed-in user, recorded as `actor`.
    pub fn user(name: &str, actor: Actor) -> Caller {
        Caller {
            actor,
            user: Some(name.to_owned()),
        }
    }

    fn is(&self, name: &str) -> bool {
        self.user.as_deref() == Some(name)
    }
}

/// A token just created: its secret is here and nowhere else.
pub struct NewToken {
    pub id: i64,
    pub user: String,
    pub name: String,
    pub grants: Vec<Grant>,
    pub expires_at: Option<i64>,
    /// Shown once to whoever created the token; only its hash is stored.
    pub secret: String,
}

impl std::fmt::Debug for NewToken {
    // Never prints the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewToken")
            .field("id", &self.id)
            .field("user", &self.user)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A token's state at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenStatus {
    Live,
    Expired,
    Revoked(i64),
}

impl TokenStatus {
    pub fn of(t: &ApiTokenRecord, now: i64) -> TokenStatus {
        match (t.revoked_at, t.expires_at) {
            (Some(r), _) => TokenStatus::Revoked(r),
            (None, Some(e)) if e <= now => TokenStatus::Expired,
            _ => TokenStatus::Live,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TokenStatus::Live => "live",
            TokenStatus::Expired => "expired",
            TokenStatus::Revoked(_) => "revoked",
        }
    }
}

/// A token's scopes as `stowage token create --scope` takes them (`?` if the stored list does
/// not parse).
pub fn scopes_text(t: &ApiTokenRecord) -> Vec<String> {
    serde_json::from_str::<Vec<Grant>>(&t.scopes)
        .map(|g| g.iter().map(Grant::to_string).collect())
        .unwrap_or_else(|_| vec!["?".into()])
}

/// The accounts service over a catalog, hashing through `hasher`.
#[derive(Clone)]
pub struct Accounts {
    catalog: Catalog,
    hasher: Hasher,
}

impl Accounts {
    pub fn new(catalog: Catalog, hasher: Hasher) -> Accounts {
        Accounts { catalog, hasher }
    }

    async fn hash(&self, password: String) -> Result<String, AccountError> {
        check_new_password(&password, None)?;
        Ok(self.hasher.hash(password).await?)
    }

    /// Adds a user with `password` (checked with [`check_new_password`] by the caller when it
    /// asked twice; checked again here).
    pub async fn add_user(
        &self,
        caller: &Caller,
        name: &str,
        password: String,
        admin: bool,
    ) -> Result<(), AccountError> {
        if !valid_user_name(name) {
            return Err(AccountError::InvalidUserName);
        }
        let hash = self.hash(password).await?;
        if !self.catalog.create_user(name, hash, admin, &caller.actor).await? {
            return Err(AccountError::UserExists(name.to_owned()));
        }
        Ok(())
    }

    /// Whether there is a user `name` (so the command line asks for a password only then).
    pub async fn user_exists(&self, name: &str) -> Result<bool, AccountError> {
        Ok(self.catalog.user(name).await?.is_some())
    }

    /// Replaces a user's password. A new credentials epoch ends their registry tokens and UI
    /// sessions signed in with the old one.
    pub async fn set_password(&self, caller: &Caller, name: &str, password: String) -> Result<(), AccountError> {
        let hash = self.hash(password).await?;
        if !self.catalog.set_password(name, hash, &caller.actor).await? {
            return Err(AccountError::NoUser(name.to_owned()));
        }
        Ok(())
    }

    /// Gives (`true`) or takes the admin role. Taking one's own is refused.
    pub async fn set_admin(&self, caller: &Caller, name: &str, admin: bool) -> Result<(), AccountError> {
        if !admin && caller.is(name) {
            return Err(AccountError::OwnAccount(
                "you cannot take your own admin role: ask another admin",
            ));
        }
        if !self.catalog.set_admin(name, admin, &caller.actor).await? {
            return Err(AccountError::NoUser(name.to_owned()));
        }
        Ok(())
    }

    /// Removes a user and their API tokens (their sessions end at their next request, as the
    /// user is looked up again). Removing oneself is refused.
    pub async fn remove_user(&self, caller: &Caller, name: &str) -> Result<(), AccountError> {
        if caller.is(name) {
            return Err(AccountError::OwnAccount(
                "you cannot remove yourself: ask another admin",
            ));
        }
        if !self.catalog.remove_user(name, &caller.actor).await? {
            return Err(AccountError::NoUser(name.to_owned()));
        }
        Ok(())
    }

    /// Every user, by name.
    pub async fn users(&self) -> Result<Vec<UserSummary>, AccountError> {
        Ok(self.catalog.users().await?)
    }

    /// One user, if there is one by that name.
    pub async fn user(&self, name: &str) -> Result<Option<UserSummary>, AccountError> {
        Ok(self.catalog.user_summary(name).await?)
    }

    /// A page of users by name, after `after`.
    pub async fn users_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<UserSummary>, AccountError> {
        Ok(self.catalog.users_page(after, limit).await?)
    }

    /// A page of every user's API tokens, newest first, below id `before`.
    pub async fn tokens_page(&self, before: Option<i64>, limit: usize) -> Result<Vec<ApiTokenRecord>, AccountError> {
        Ok(self.catalog.api_tokens_page(before, limit).await?)
    }

    /// Creates an API token for `user`: `scopes` as `--scope` takes them, an expiry in days
    /// (none: never). The returned secret is the only copy.
    pub async fn create_token(
        &self,
        caller: &Caller,
        user: &str,
        name: &str,
        scopes: &[String],
        expires_in_days: Option<u64>,
    ) -> Result<NewToken, AccountError> {
        if !valid_token_name(name) {
            return Err(AccountError::InvalidTokenName);
        }
        if scopes.is_empty() || scopes.len() > MAX_SCOPES {
            return Err(AccountError::ScopeCount);
        }
        let grants = scopes
            .iter()
            .map(|s| Grant::parse(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(AccountError::InvalidScope)?;
        if expires_in_days.is_some_and(|d| d > MAX_EXPIRY_DAYS) {
            return Err(AccountError::InvalidExpiry);
        }
        let scopes_json = serde_json::to_string(&grants)
            .map_err(|_| Error::from(crate::error::Internal::Other("serialising token scopes failed")))?;
        let expires_at = expires_in_days.map(|d| crate::catalog::now().saturating_add((d * 86_400) as i64));
        let secret = password::new_token_secret().map_err(|m| {
            tracing::error!(error = %m, "making a token secret failed");
            Error::from(crate::error::Internal::Other("the random source failed"))
        })?;
        let created = self
            .catalog
            .create_api_token(
                user,
                name,
                password::token_hash(&secret),
                scopes_json,
                expires_at,
                &caller.actor,
            )
            .await?;
        match created {
            Ok(id) => Ok(NewToken {
                id,
                user: user.to_owned(),
                name: name.to_owned(),
                grants,
                expires_at,
                secret,
            }),
            Err(NewTokenError::UnknownUser) => Err(AccountError::NoUser(user.to_owned())),
            Err(NewTokenError::NameTaken) => Err(AccountError::TokenNameTaken {
                user: user.to_owned(),
                name: name.to_owned(),
            }),
        }
    }

    /// API tokens, of one user or all, newest first (never their secrets).
    pub async fn list_tokens(&self, user: Option<&str>) -> Result<Vec<ApiTokenRecord>, AccountError> {
        Ok(self.catalog.api_tokens(user).await?)
    }

    /// Revokes a live token by id (digits) or name (of `user`'s tokens when given); effective
    /// at once (every request looks its token up).
    pub async fn revoke_token(
        &self,
        caller: &Caller,
        user: Option<&str>,
        id_or_name: &str,
    ) -> Result<(), AccountError> {
        if self.catalog.revoke_api_token(user, id_or_name, &caller.actor).await? == 0 {
            return Err(AccountError::NoToken(id_or_name.to_owned()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_passwords() {
        assert!(valid_user_name("a.b-c_d@e"));
        assert!(!valid_user_name(""));
        assert!(!valid_user_name("<b>"));
        assert!(!valid_user_name(&"a".repeat(129)));
        assert!(valid_token_name("ci <1>"));
        assert!(!valid_token_name("123"));
        assert!(!valid_token_name(""));
        assert!(check_new_password("pw", Some("pw")).is_ok());
        assert!(matches!(
            check_new_password("pw", Some("px")),
            Err(AccountError::PasswordsDiffer)
        ));
        assert!(matches!(check_new_password("", None), Err(AccountError::EmptyPassword)));
        assert!(matches!(
            check_new_password("stw_x", None),
            Err(AccountError::TokenLikePassword)
        ));
        assert_eq!(
            AccountError::TokenLikePassword.to_string(),
            "a password may not start with \"stw_\""
        );
    }
}

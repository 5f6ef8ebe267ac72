//! First-start bootstrap: the admin user and the CI API token a fresh deployment needs, created
//! by `stowage serve` itself, so that nobody has to `exec` into a container to make the first
//! user.
//!
//! ```toml
//! [auth.bootstrap_admin]
//! user = "admin"
//! password_file = "/run/secrets/stowage-admin-password"   # or STOWAGE_BOOTSTRAP_ADMIN_PASSWORD
//!
//! [auth.bootstrap_token]
//! name = "ci"                          # user: default auth.bootstrap_admin.user
//! scopes = ["ci/**:pull,push"]
//! expires_in_days = 90                 # default: never
//! secret_file = "/run/secrets/stowage-ci-token"
//! ```
//!
//! Invariants:
//! - Secrets never come from argv or the TOML file: the password from `password_file` or the
//!   environment variable [`BOOTSTRAP_PASSWORD_ENV`] (not both; empty counts as unset), the
//!   token's secret from `secret_file`. They are never logged; the log says what was done, to
//!   whom, and where the secret came from.
//! - Idempotent, and never undoes an operator's later change. The admin is created only when
//!   no user of that name exists *and* no other admin does: an existing user is left exactly as
//!   it is (a password changed since is not reset), and an admin removed on purpose while other
//!   admins remain is not brought back. The token is created only when no token, live, expired
//!   or revoked, has the file's secret, and the user has no live token of that name: a revoked
//!   or expired secret is never revived by a restart, and a token whose secret was changed in
//!   the file while the old one lives is left alone (with a warning). A token whose user does
//!   not exist (removed since, or never made) is not created, with a warning, and the server
//!   starts anyway.
//! - Shapes are checked when the configuration is loaded ([`validate`]: names, scopes, where
//!   the secrets come from); contents when they are read at start-up ([`run`]): a password of
//!   [`MIN_PASSWORD_LEN`] to [`MAX_SECRET_LEN`] characters on one line that does not look like
//!   a token secret; a token secret of the form `stw_` + 43 to 256 base64url characters with
//!   at least [`MIN_DISTINCT`] different ones. A weak or malformed secret stops the server with
//!   a message naming the file and the rule, never the secret.
//! - File reads and password hashing run on the blocking pool; catalog calls go through the
//!   catalog's own pool.

use std::path::{Path, PathBuf};

use crate::auth::{Grant, password};
use crate::catalog::Catalog;
use crate::catalog::auth::NewTokenError;
use crate::config::{AuthConfig, BOOTSTRAP_PASSWORD_ENV, BootstrapAdmin, BootstrapToken};

/// Shortest bootstrap password accepted.
pub const MIN_PASSWORD_LEN: usize = 12;
/// Longest secret (password or token) accepted; a longer file is refused unread.
pub const MAX_SECRET_LEN: usize = 1024;
/// Characters after `stw_` in a bootstrap token secret: at least 256 bits of base64url.
const TOKEN_BODY_MIN: usize = 43;
const TOKEN_BODY_MAX: usize = 256;
/// Different characters a token secret's body must hold at least: a random 43-character
/// base64url string has about 31, so only a made-up one (`aaaa…`, `abab…`) falls below.
pub const MIN_DISTINCT: usize = 16;

/// Checks the bootstrap settings that need no file: names, scopes, expiry, and that the
/// admin's password has exactly one source.
pub fn validate(auth: &AuthConfig) -> Result<(), String> {
    if let Some(admin) = &auth.bootstrap_admin {
        if !crate::auth::accounts::valid_user_name(&admin.user) {
            return Err(format!(
                "auth.bootstrap_admin.user {:?}: a user name is 1-128 letters, digits, '.', '-', '_' or '@'",
                admin.user
            ));
        }
        let from_env = password_from_env().is_some();
        match (&admin.password_file, from_env) {
            (Some(_), true) => {
                return Err(format!(
                    "auth.bootstrap_admin: the password comes from password_file or from \
                     {BOOTSTRAP_PASSWORD_ENV}, not both"
                ));
            }
            (None, false) => {
                return Err(format!(
                    "auth.bootstrap_admin needs password_file or the environment variable {BOOTSTRAP_PASSWORD_ENV} \
                     (the password is never read from the configuration file)"
                ));
            }
            _ => {}
        }
    }
    if let Some(token) = &auth.bootstrap_token {
        if token_user(auth, token).is_none() {
            return Err("auth.bootstrap_token.user is required when there is no auth.bootstrap_admin".to_owned());
        }
        if let Some(user) = &token.user
            && !crate::auth::accounts::valid_user_name(user)
        {
            return Err(format!("auth.bootstrap_token.user {user:?} is not a valid user name"));
        }
        if token.name.is_empty() || token.name.len() > 128 || token.name.bytes().all(|b| b.is_ascii_digit()) {
            return Err("auth.bootstrap_token.name must be 1-128 characters, not all digits".to_owned());
        }
        if token.scopes.is_empty() {
            return Err(
                "auth.bootstrap_token.scopes must list one or more scopes, e.g. \"ci/**:pull,push\"".to_owned(),
            );
        }
        for s in &token.scopes {
            Grant::parse(s).map_err(|e| format!("auth.bootstrap_token.scopes: {e}"))?;
        }
        if token.expires_in_days == Some(0) {
            return Err("auth.bootstrap_token.expires_in_days must be at least 1 (leave it out: never)".to_owned());
        }
    }
    Ok(())
}

/// The password in [`BOOTSTRAP_PASSWORD_ENV`]; an empty variable counts as unset (compose
/// files and shells often set one empty).
fn password_from_env() -> Option<std::ffi::OsString> {
    std::env::var_os(BOOTSTRAP_PASSWORD_ENV).filter(|v| !v.is_empty())
}

/// The user a bootstrap token belongs to.
fn token_user<'a>(auth: &'a AuthConfig, token: &'a BootstrapToken) -> Option<&'a str> {
    token
        .user
        .as_deref()
        .or(auth.bootstrap_admin.as_ref().map(|a| a.user.as_str()))
}

/// Creates the bootstrap admin and token that are configured and missing (see the module
/// doc). Fails when a secret cannot be read or is refused, or the catalog fails.
pub async fn run(auth: &AuthConfig, catalog: &Catalog) -> Result<(), String> {
    if let Some(admin) = &auth.bootstrap_admin {
        bootstrap_admin(admin, catalog).await?;
    }
    if let Some(token) = &auth.bootstrap_token {
        let user = token_user(auth, token).ok_or("auth.bootstrap_token.user is not set")?;
        bootstrap_token(user, token, catalog).await?;
    }
    Ok(())
}

async fn bootstrap_admin(admin: &BootstrapAdmin, catalog: &Catalog) -> Result<(), String> {
    let user = admin.user.as_str();
    if catalog.user(user).await.map_err(|e| e.to_string())?.is_some() {
        tracing::info!(user, "bootstrap admin exists; left as it is");
        return Ok(());
    }
    let admins: Vec<String> = catalog
        .users()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|u| u.admin)
        .map(|u| u.name)
        .collect();
    if !admins.is_empty() {
        tracing::warn!(
            user,
            admins = %admins.join(","),
            "bootstrap admin not created: other admins exist (it was removed, or admins were made by hand); \
             remove auth.bootstrap_admin from the configuration"
        );
        return Ok(());
    }
    let (source, pw) = match &admin.password_file {
        Some(path) => {
            let pw = read_secret(path.clone(), "auth.bootstrap_admin.password_file").await?;
            (format!("file {}", path.display()), pw)
        }
        None => {
            let pw = password_from_env()
                .ok_or_else(|| format!("{BOOTSTRAP_PASSWORD_ENV} is not set"))?
                .into_string()
                .map_err(|_| format!("{BOOTSTRAP_PASSWORD_ENV} is not UTF-8"))?;
            (format!("environment variable {BOOTSTRAP_PASSWORD_ENV}"), pw)
        }
    };
    check_password(&pw).map_err(|e| format!("bootstrap admin password from {source}: {e}"))?;
    let hash = tokio::task::spawn_blocking(move || password::hash(&pw))
        .await
        .map_err(|e| e.to_string())??;
    if catalog
        .create_user(user, hash, true, &crate::catalog::audit::Actor::system("bootstrap"))
        .await
        .map_err(|e| e.to_string())?
    {
        tracing::info!(user, password_from = %source, "bootstrap admin created");
    } else {
        tracing::info!(user, "bootstrap admin exists; left as it is");
    }
    Ok(())
}

async fn bootstrap_token(user: &str, token: &BootstrapToken, catalog: &Catalog) -> Result<(), String> {
    let name = token.name.as_str();
    let file = token.secret_file.display().to_string();
    let secret = read_secret(token.secret_file.clone(), "auth.bootstrap_token.secret_file").await?;
    check_token_secret(&secret).map_err(|e| format!("bootstrap token secret in {file}: {e}"))?;
    let hash = password::token_hash(&secret);
    drop(secret);
    let now = crate::catalog::now();
    if let Some(existing) = catalog
        .api_token_by_hash(hash.clone())
        .await
        .map_err(|e| e.to_string())?
    {
        let state = match (existing.revoked_at, existing.expires_at) {
            (Some(_), _) => "revoked; not created again (put a new secret in the file)",
            (None, Some(e)) if e <= now => "expired; not created again (put a new secret in the file)",
            _ => "exists; left as it is",
        };
        tracing::info!(
            id = existing.id,
            token = %existing.name,
            user = %existing.user,
            "bootstrap token with this secret {state}"
        );
        return Ok(());
    }
    let live_same_name = catalog
        .api_tokens(Some(user))
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|t| t.name == name && t.revoked_at.is_none() && t.expires_at.is_none_or(|e| e > now));
    if let Some(t) = live_same_name {
        tracing::warn!(
            id = t.id,
            token = name,
            user,
            secret_file = %file,
            "bootstrap token not created: the user has a live token of this name with another secret; \
             revoke it (`stowage token revoke`) to have the file's secret installed at the next start"
        );
        return Ok(());
    }
    let grants = token
        .scopes
        .iter()
        .map(|s| Grant::parse(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("auth.bootstrap_token.scopes: {e}"))?;
    let scopes_json = serde_json::to_string(&grants).map_err(|e| e.to_string())?;
    let expires_at = token
        .expires_in_days
        .map(|d| now.saturating_add(i64::from(d).saturating_mul(86_400)));
    match catalog
        .create_api_token(
            user,
            name,
            hash,
            scopes_json,
            expires_at,
            &crate::catalog::audit::Actor::system("bootstrap"),
        )
        .await
        .map_err(|e| e.to_string())?
    {
        Ok(id) => {
            let scopes: Vec<String> = grants.iter().map(Grant::to_string).collect();
            tracing::info!(
                id,
                token = name,
                user,
                scopes = %scopes.join(" "),
                expires_at,
                secret_from = %format!("file {file}"),
                "bootstrap token created"
            );
            Ok(())
        }
        Err(NewTokenError::UnknownUser) => {
            // Not fatal: the user may have been removed on purpose after the first start.
            tracing::warn!(
                token = name,
                user,
                "bootstrap token not created: no such user (create it, or make it auth.bootstrap_admin)"
            );
            Ok(())
        }
        Err(NewTokenError::NameTaken) => {
            tracing::warn!(
                token = name,
                user,
                "bootstrap token not created: the name was taken meanwhile"
            );
            Ok(())
        }
    }
}

/// Reads a one-line secret from `path` (the setting `what` names it), on the blocking pool.
/// A trailing newline is dropped; a larger file than [`MAX_SECRET_LEN`] is refused.
async fn read_secret(path: PathBuf, what: &'static str) -> Result<String, String> {
    tokio::task::spawn_blocking(move || read_secret_file(&path, what))
        .await
        .map_err(|e| e.to_string())?
}

fn read_secret_file(path: &Path, what: &str) -> Result<String, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_LEN as u64 + 3)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|_| format!("{what} {}: not UTF-8 text", path.display()))?;
    let line = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    if line.len() > MAX_SECRET_LEN {
        return Err(format!("{what} {}: longer than {MAX_SECRET_LEN} bytes", path.display()));
    }
    if line.contains(['\n', '\r']) {
        return Err(format!("{what} {}: must hold one line", path.display()));
    }
    Ok(line.to_owned())
}

/// Whether a bootstrap password is acceptable (never echoes it).
pub fn check_password(pw: &str) -> Result<(), String> {
    let chars = pw.chars().count();
    if chars < MIN_PASSWORD_LEN {
        return Err(format!("too short ({chars} characters; at least {MIN_PASSWORD_LEN})"));
    }
    if pw.len() > MAX_SECRET_LEN {
        return Err(format!("longer than {MAX_SECRET_LEN} bytes"));
    }
    if password::is_token_secret(pw) {
        return Err(format!("a password may not start with {:?}", password::TOKEN_PREFIX));
    }
    if pw.chars().any(char::is_control) {
        return Err("holds control characters".to_owned());
    }
    Ok(())
}

/// Whether a bootstrap token secret has the shape and variety of a random one (never echoes it).
pub fn check_token_secret(secret: &str) -> Result<(), String> {
    let hint =
        "make one with: printf 'stw_%s\\n' \"$(head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\\n')\"";
    let Some(body) = secret.strip_prefix(password::TOKEN_PREFIX) else {
        return Err(format!("must start with {:?}; {hint}", password::TOKEN_PREFIX));
    };
    if !(TOKEN_BODY_MIN..=TOKEN_BODY_MAX).contains(&body.len()) {
        return Err(format!(
            "needs {TOKEN_BODY_MIN} to {TOKEN_BODY_MAX} characters after {:?}, not {}; {hint}",
            password::TOKEN_PREFIX,
            body.len()
        ));
    }
    if !body
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "only base64url characters (A-Z a-z 0-9 - _) may follow {:?}; {hint}",
            password::TOKEN_PREFIX
        ));
    }
    let mut seen = [false; 256];
    for b in body.bytes() {
        seen[usize::from(b)] = true;
    }
    let distinct = seen.iter().filter(|s| **s).count();
    if distinct < MIN_DISTINCT {
        return Err(format!(
            "too regular to be random ({distinct} different characters; a random one has about 30, at least \
             {MIN_DISTINCT} are required); {hint}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_secrets_are_checked_for_shape_and_variety() {
        let made = password::new_token_secret().unwrap();
        check_token_secret(&made).unwrap();
        let a43 = format!("stw_{}", "a".repeat(43));
        let ab = format!("stw_{}", "ab".repeat(30));
        for (bad, says) in [
            ("secret", "must start with"),
            ("stw_short", "43 to 256"),
            (a43.as_str(), "too regular"),
            (ab.as_str(), "too regular"),
            (&format!("{made}+/"), "base64url"),
        ] {
            let err = check_token_secret(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
            assert!(!err.contains(bad) || bad == "secret", "echoes the secret: {err}");
        }
    }

    #[test]
    fn passwords_are_checked() {
        check_password("correct horse battery").unwrap();
        assert!(check_password("short").unwrap_err().contains("too short"));
        assert!(
            check_password("stw_0123456789abcdef")
                .unwrap_err()
                .contains("may not start")
        );
        assert!(check_password("with a\ttab inside").unwrap_err().contains("control"));
    }

    #[test]
    fn secret_files_lose_one_trailing_newline_and_must_be_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        for (content, want) in [
            ("pw\n", Ok("pw")),
            ("pw\r\n", Ok("pw")),
            ("pw", Ok("pw")),
            ("pw\n\n", Err("one line")),
            ("a\nb", Err("one line")),
        ] {
            std::fs::write(&p, content).unwrap();
            match (read_secret_file(&p, "x"), want) {
                (Ok(got), Ok(w)) => assert_eq!(got, w),
                (Err(e), Err(w)) => assert!(e.contains(w), "{content:?}: {e}"),
                (got, w) => panic!("{content:?}: {got:?}, wanted {w:?}"),
            }
        }
        std::fs::write(&p, "x".repeat(MAX_SECRET_LEN + 10)).unwrap();
        assert!(read_secret_file(&p, "x").unwrap_err().contains("longer than"));
        assert!(read_secret_file(&dir.path().join("missing"), "x").is_err());
    }
}

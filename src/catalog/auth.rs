//! Users and API tokens (`users`, `api_tokens`, migration 0004).
//!
//! Only hashes are stored: argon2id PHC strings for passwords, SHA-256 for token secrets (the
//! `auth` module makes both). Token scopes are kept as the JSON the `auth` module gives.
//! Every change to a user or token is recorded in the audit trail in its own transaction
//! (`catalog::audit`), naming the user and token, never a hash.

use super::db::{self, OptionalExtension, params};

use super::audit::{self, Action, Actor, Event};
use super::{Catalog, now};
use crate::error::Result;

/// A user as login needs it.
#[derive(Debug, Clone)]
pub struct UserRecord {
    pub id: i64,
    pub name: String,
    pub password_hash: String,
    pub admin: bool,
    /// Changes with every password change; tokens signed in with an older one are refused.
    pub credentials_epoch: i64,
}

/// A new credentials epoch: random, positive and never 0 (the value of users and tokens from
/// before epochs existed).
fn new_epoch() -> i64 {
    let bits = (uuid::Uuid::new_v4().as_u128() as u64) >> 1;
    bits.max(1) as i64
}

/// A user as `stowage user list` shows it.
#[derive(Debug, Clone)]
pub struct UserSummary {
    pub name: String,
    pub admin: bool,
    pub created_at: i64,
    pub live_tokens: u64,
}

/// An API token's row (never its secret).
#[derive(Debug, Clone)]
pub struct ApiTokenRecord {
    pub id: i64,
    pub user: String,
    pub user_admin: bool,
    pub name: String,
    /// JSON list of grants.
    pub scopes: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

/// Why a token could not be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewTokenError {
    UnknownUser,
    NameTaken,
}

const TOKEN_COLUMNS: &str = "t.id, u.name, u.admin, t.name, t.scopes, t.created_at, t.expires_at, t.last_used_at, \
                             t.revoked_at";

fn token_record(r: &db::Row<'_>) -> db::Result<ApiTokenRecord> {
    Ok(ApiTokenRecord {
        id: r.get(0)?,
        user: r.get(1)?,
        user_admin: r.get::<_, i64>(2)? != 0,
        name: r.get(3)?,
        scopes: r.get(4)?,
        created_at: r.get(5)?,
        expires_at: r.get(6)?,
        last_used_at: r.get(7)?,
        revoked_at: r.get(8)?,
    })
}

impl Catalog {
    /// Adds a user; `false` if the name is taken. Audited for `actor`, like every change below.
    pub async fn create_user(&self, name: &str, password_hash: String, admin: bool, actor: &Actor) -> Result<bool> {
        let (name, actor) = (name.to_owned(), actor.clone());
        self.write(move |c| {
            let t = now();
            let n = c.execute(
                "INSERT INTO users (name, password_hash, admin, created_at, updated_at, credentials_epoch)
                 VALUES (?1, ?2, ?3, ?4, ?4, ?5)
                 ON CONFLICT (name) DO NOTHING",
                params![name, password_hash, admin as i64, t, new_epoch()],
            )?;
            if n == 1 {
                let detail = serde_json::json!({ "user": name, "admin": admin });
                audit::record(c, &actor, &Event::new(Action::UserAdd).detail(detail), t)?;
            }
            Ok(n == 1)
        })
        .await
    }

    /// Replaces a user's password hash and credentials epoch (ending the tokens issued on the
    /// old password); `false` if there is no such user.
    pub async fn set_password(&self, name: &str, password_hash: String, actor: &Actor) -> Result<bool> {
        let (name, actor) = (name.to_owned(), actor.clone());
        self.write(move |c| {
            let n = c.execute(
                "UPDATE users SET password_hash = ?2, updated_at = ?3, credentials_epoch = ?4 WHERE name = ?1",
                params![name, password_hash, now(), new_epoch()],
            )?;
            if n == 1 {
                let detail = serde_json::json!({ "user": name });
                audit::record(c, &actor, &Event::new(Action::UserPasswd).detail(detail), now())?;
            }
            Ok(n == 1)
        })
        .await
    }

    /// Gives or takes the admin role; `false` if there is no such user.
    pub async fn set_admin(&self, name: &str, admin: bool, actor: &Actor) -> Result<bool> {
        let (name, actor) = (name.to_owned(), actor.clone());
        self.write(move |c| {
            let n = c.execute(
                "UPDATE users SET admin = ?2, updated_at = ?3 WHERE name = ?1",
                params![name, admin as i64, now()],
            )?;
            if n == 1 {
                let detail = serde_json::json!({ "user": name, "admin": admin });
                audit::record(c, &actor, &Event::new(Action::UserAdmin).detail(detail), now())?;
            }
            Ok(n == 1)
        })
        .await
    }

    /// Removes a user and their API tokens; `false` if there is no such user.
    pub async fn remove_user(&self, name: &str, actor: &Actor) -> Result<bool> {
        let (name, actor) = (name.to_owned(), actor.clone());
        self.write(move |c| {
            let n = c.execute("DELETE FROM users WHERE name = ?1", params![name])?;
            if n == 1 {
                let detail = serde_json::json!({ "user": name });
                audit::record(c, &actor, &Event::new(Action::UserRemove).detail(detail), now())?;
            }
            Ok(n == 1)
        })
        .await
    }

    /// A user by name.
    pub async fn user(&self, name: &str) -> Result<Option<UserRecord>> {
        let name = name.to_owned();
        self.read(move |c| {
            Ok(c.query_row(
                "SELECT id, name, password_hash, admin, credentials_epoch FROM users WHERE name = ?1",
                params![name],
                |r| {
                    Ok(UserRecord {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        password_hash: r.get(2)?,
                        admin: r.get::<_, i64>(3)? != 0,
                        credentials_epoch: r.get(4)?,
                    })
                },
            )
            .optional()?)
        })
        .await
    }

    /// Every user, by name.
    pub async fn users(&self) -> Result<Vec<UserSummary>> {
        self.read(|c| {
            let mut stmt = c.prepare(
                "SELECT u.name, u.admin, u.created_at,
                        (SELECT count(*) FROM api_tokens t WHERE t.user_id = u.id AND t.revoked_at IS NULL)
                 FROM users u ORDER BY u.name",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(UserSummary {
                    name: r.get(0)?,
                    admin: r.get::<_, i64>(1)? != 0,
                    created_at: r.get(2)?,
                    live_tokens: r.get::<_, i64>(3)?.max(0) as u64,
                })
            })?;
            Ok(rows.collect::<db::Result<Vec<_>>>()?)
        })
        .await
    }

    /// One user as [`Catalog::users`] lists them.
    pub async fn user_summary(&self, name: &str) -> Result<Option<UserSummary>> {
        let name = name.to_owned();
        self.read(move |c| {
            Ok(c.query_row(
                "SELECT u.name, u.admin, u.created_at,
                        (SELECT count(*) FROM api_tokens t WHERE t.user_id = u.id AND t.revoked_at IS NULL)
                 FROM users u WHERE u.name = ?1",
                params![name],
                |r| {
                    Ok(UserSummary {
                        name: r.get(0)?,
                        admin: r.get::<_, i64>(1)? != 0,
                        created_at: r.get(2)?,
                        live_tokens: r.get::<_, i64>(3)?.max(0) as u64,
                    })
                },
            )
            .optional()?)
        })
        .await
    }

    /// Up to `limit` users by name after `after` (a keyset page: the name index, then one
    /// indexed count per user).
    pub async fn users_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<UserSummary>> {
        let after = after.map(str::to_owned);
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT u.name, u.admin, u.created_at,
                        (SELECT count(*) FROM api_tokens t WHERE t.user_id = u.id AND t.revoked_at IS NULL)
                 FROM users u WHERE CAST(?1 AS TEXT) IS NULL OR u.name > ?1 ORDER BY u.name LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![after, limit as i64], |r| {
                Ok(UserSummary {
                    name: r.get(0)?,
                    admin: r.get::<_, i64>(1)? != 0,
                    created_at: r.get(2)?,
                    live_tokens: r.get::<_, i64>(3)?.max(0) as u64,
                })
            })?;
            Ok(rows.collect::<db::Result<Vec<_>>>()?)
        })
        .await
    }

    /// Up to `limit` API tokens of every user with an id below `before`, newest first (a
    /// keyset page).
    pub async fn api_tokens_page(&self, before: Option<i64>, limit: usize) -> Result<Vec<ApiTokenRecord>> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {TOKEN_COLUMNS} FROM api_tokens t JOIN users u ON u.id = t.user_id
                 WHERE CAST(?1 AS BIGINT) IS NULL OR t.id < ?1 ORDER BY t.id DESC LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![before, limit as i64], token_record)?;
            Ok(rows.collect::<db::Result<Vec<_>>>()?)
        })
        .await
    }

    /// Records a new API token for `user`; returns its id.
    pub async fn create_api_token(
        &self,
        user: &str,
        name: &str,
        secret_hash: String,
        scopes: String,
        expires_at: Option<i64>,
        actor: &Actor,
    ) -> Result<std::result::Result<i64, NewTokenError>> {
        let (user, name, actor) = (user.to_owned(), name.to_owned(), actor.clone());
        self.write(move |c| {
            let Some(user_id) = c
                .query_row("SELECT id FROM users WHERE name = ?1", params![user], |r| {
                    r.get::<_, i64>(0)
                })
                .optional()?
            else {
                return Ok(Err(NewTokenError::UnknownUser));
            };
            let taken: bool = c.query_row(
                "SELECT EXISTS (SELECT 1 FROM api_tokens WHERE user_id = ?1 AND name = ?2 AND revoked_at IS NULL)",
                params![user_id, name],
                |r| r.get(0),
            )?;
            if taken {
                return Ok(Err(NewTokenError::NameTaken));
            }
            let id: i64 = c.query_row(
                "INSERT INTO api_tokens (user_id, name, secret_hash, scopes, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
                params![user_id, name, secret_hash, scopes, now(), expires_at],
                |r| r.get(0),
            )?;
            let scopes = serde_json::from_str::<serde_json::Value>(&scopes).unwrap_or(serde_json::Value::Null);
            let detail = serde_json::json!({
                "user": user, "token_id": id, "token_name": name, "scopes": scopes, "expires_at": expires_at,
            });
            audit::record(c, &actor, &Event::new(Action::TokenCreate).detail(detail), now())?;
            Ok(Ok(id))
        })
        .await
        .inspect(|created| {
            if created.is_ok() {
                crate::metrics::get()
                    .tokens_issued
                    .get_or_create(&crate::metrics::KindLabels { kind: "api" })
                    .inc();
            }
        })
    }

    /// API tokens, of one user or all, newest first.
    pub async fn api_tokens(&self, user: Option<&str>) -> Result<Vec<ApiTokenRecord>> {
        let user = user.map(str::to_owned);
        self.read(move |c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {TOKEN_COLUMNS} FROM api_tokens t JOIN users u ON u.id = t.user_id
                 WHERE CAST(?1 AS TEXT) IS NULL OR u.name = ?1 ORDER BY t.id DESC"
            ))?;
            let rows = stmt.query_map(params![user], token_record)?;
            Ok(rows.collect::<db::Result<Vec<_>>>()?)
        })
        .await
    }

    /// The token whose secret hashes to `secret_hash`.
    pub async fn api_token_by_hash(&self, secret_hash: String) -> Result<Option<ApiTokenRecord>> {
        self.read(move |c| {
            Ok(c.query_row(
                &format!(
                    "SELECT {TOKEN_COLUMNS} FROM api_tokens t JOIN users u ON u.id = t.user_id WHERE t.secret_hash = ?1"
                ),
                params![secret_hash],
                token_record,
            )
            .optional()?)
        })
        .await
    }

    /// A token by id.
    pub async fn api_token(&self, id: i64) -> Result<Option<ApiTokenRecord>> {
        self.read(move |c| {
            Ok(c.query_row(
                &format!("SELECT {TOKEN_COLUMNS} FROM api_tokens t JOIN users u ON u.id = t.user_id WHERE t.id = ?1"),
                params![id],
                token_record,
            )
            .optional()?)
        })
        .await
    }

    /// Revokes a live token, by id (given as digits) or by name (of `user`'s tokens when given).
    /// Returns how many were revoked (0 or 1; more only for a name several users share, without
    /// `user`, which is refused: 0 and nothing changes).
    pub async fn revoke_api_token(&self, user: Option<&str>, id_or_name: &str, actor: &Actor) -> Result<usize> {
        let user = user.map(str::to_owned);
        let actor = actor.clone();
        let key = id_or_name.to_owned();
        self.write(move |c| {
            let id: Option<i64> = key.parse().ok();
            let matching: Vec<(i64, String, String)> = {
                let mut stmt = c.prepare(
                    "SELECT t.id, t.name, u.name FROM api_tokens t JOIN users u ON u.id = t.user_id
                     WHERE t.revoked_at IS NULL AND (t.id = ?1 OR t.name = ?2) AND (CAST(?3 AS TEXT) IS NULL OR u.name = ?3)",
                )?;
                let rows = stmt.query_map(params![id, key, user], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                rows.collect::<db::Result<Vec<_>>>()?
            };
            let [(token_id, token_name, owner)] = matching.as_slice() else {
                return Ok(0);
            };
            c.execute(
                "UPDATE api_tokens SET revoked_at = ?2 WHERE id = ?1",
                params![token_id, now()],
            )?;
            let detail = serde_json::json!({ "user": owner, "token_id": token_id, "token_name": token_name });
            audit::record(c, &actor, &Event::new(Action::TokenRevoke).detail(detail), now())?;
            Ok(1)
        })
        .await
    }

    /// Records that a token was used at `at`.
    pub async fn touch_api_token(&self, id: i64, at: i64) -> Result<()> {
        self.write(move |c| {
            c.execute(
                "UPDATE api_tokens SET last_used_at = ?2 WHERE id = ?1 AND (last_used_at IS NULL OR last_used_at < ?2)",
                params![id, at],
            )?;
            Ok(())
        })
        .await
    }
}

//! The admin run modes: `stowage user …`, `stowage token …`, `stowage key rotate`.
//!
//! They work on the catalog and key directory of the configured data directory, beside a
//! running server or without one (SQLite takes the concurrent writer). Passwords are read from
//! a prompt with echo off, or from stdin's first line when stdin is not a terminal; never from
//! the command line. An API token's secret is printed once, on stdout; only its hash is kept.

use std::io::{BufRead as _, IsTerminal as _, Write as _};

use crate::auth::{Grant, keys, password};
use crate::catalog::Catalog;
use crate::catalog::auth::NewTokenError;
use crate::cli::{KeyCommand, TokenCommand, UserCommand};
use crate::config::Config;

type Outcome = Result<(), Box<dyn std::error::Error>>;

async fn open_catalog(config: &Config) -> Result<Catalog, Box<dyn std::error::Error>> {
    let path = config.catalog_path();
    Ok(tokio::task::spawn_blocking(move || Catalog::open(&path)).await??)
}

/// Reads a line from the terminal with echo off.
fn prompt_hidden(prompt: &str) -> std::io::Result<String> {
    let mut err = std::io::stderr();
    write!(err, "{prompt}")?;
    err.flush()?;
    let fd = libc::STDIN_FILENO;
    // SAFETY: termios is plain data; tcgetattr fills it or fails, and we restore what we read.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    let have_tty = unsafe { libc::tcgetattr(fd, &mut saved) } == 0;
    if have_tty {
        let mut quiet = saved;
        quiet.c_lflag &= !libc::ECHO;
        quiet.c_lflag |= libc::ECHONL;
        // SAFETY: as above.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) };
    }
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    if have_tty {
        // SAFETY: restores the settings read above.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
    }
    read?;
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}

/// A new password: prompted twice on a terminal, else the first line of stdin.
fn read_new_password() -> Result<String, Box<dyn std::error::Error>> {
    let pw = if std::io::stdin().is_terminal() {
        let a = prompt_hidden("Password: ")?;
        let b = prompt_hidden("Again: ")?;
        if a != b {
            return Err("the passwords differ".into());
        }
        a
    } else {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        line.trim_end_matches(['\n', '\r']).to_owned()
    };
    if pw.is_empty() {
        return Err("empty password".into());
    }
    if password::is_token_secret(&pw) {
        return Err(format!("a password may not start with {:?}", password::TOKEN_PREFIX).into());
    }
    Ok(pw)
}

async fn hash_password(pw: String) -> Result<String, Box<dyn std::error::Error>> {
    Ok(tokio::task::spawn_blocking(move || password::hash(&pw)).await??)
}

fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'@'))
}

/// A unix time as `YYYY-MM-DD HH:MM:SS` (UTC).
fn time(t: i64) -> String {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    // Civil-from-days (H. Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

pub async fn user(cmd: UserCommand, config: impl Fn(&crate::cli::ServeArgs) -> Config) -> Outcome {
    match cmd {
        UserCommand::Add { at, name, admin } => {
            if !valid_user_name(&name) {
                return Err("a user name is 1-128 letters, digits, '.', '-', '_' or '@'".into());
            }
            let catalog = open_catalog(&config(&at)).await?;
            let hash = hash_password(read_new_password()?).await?;
            let added = catalog.create_user(&name, hash, admin).await?;
            catalog.close();
            if !added {
                return Err(format!("user {name} exists (use `stowage user passwd`)").into());
            }
            eprintln!("added user {name}{}", if admin { " (admin)" } else { "" });
        }
        UserCommand::Passwd { at, name } => {
            let catalog = open_catalog(&config(&at)).await?;
            if catalog.user(&name).await?.is_none() {
                return Err(format!("no user {name}").into());
            }
            let hash = hash_password(read_new_password()?).await?;
            let changed = catalog.set_password(&name, hash).await?;
            catalog.close();
            if !changed {
                return Err(format!("no user {name}").into());
            }
            eprintln!("changed the password of {name}");
        }
        UserCommand::Admin { at, name, revoke } => {
            let catalog = open_catalog(&config(&at)).await?;
            let changed = catalog.set_admin(&name, !revoke).await?;
            catalog.close();
            if !changed {
                return Err(format!("no user {name}").into());
            }
            if revoke {
                eprintln!("{name} is no longer an admin");
            } else {
                eprintln!("{name} is an admin");
            }
        }
        UserCommand::Remove { at, name } => {
            let catalog = open_catalog(&config(&at)).await?;
            let removed = catalog.remove_user(&name).await?;
            catalog.close();
            if !removed {
                return Err(format!("no user {name}").into());
            }
            eprintln!("removed user {name} and their API tokens");
        }
        UserCommand::List { at } => {
            let catalog = open_catalog(&config(&at)).await?;
            let users = catalog.users().await?;
            catalog.close();
            println!("{:<24} {:<6} {:<20} TOKENS", "NAME", "ADMIN", "CREATED");
            for u in users {
                println!(
                    "{:<24} {:<6} {:<20} {}",
                    u.name,
                    if u.admin { "yes" } else { "no" },
                    time(u.created_at),
                    u.live_tokens
                );
            }
        }
    }
    Ok(())
}

pub async fn token(cmd: TokenCommand, config: impl Fn(&crate::cli::ServeArgs) -> Config) -> Outcome {
    match cmd {
        TokenCommand::Create {
            at,
            user,
            name,
            scopes,
            expires_in_days,
        } => {
            if name.is_empty() || name.len() > 128 || name.bytes().all(|b| b.is_ascii_digit()) {
                return Err("a token name is 1-128 characters, not all digits".into());
            }
            let grants = scopes.iter().map(|s| Grant::parse(s)).collect::<Result<Vec<_>, _>>()?;
            let scopes_json = serde_json::to_string(&grants)?;
            let expires_at = expires_in_days.map(|d| {
                crate::catalog::now().saturating_add(i64::try_from(d.saturating_mul(86_400)).unwrap_or(i64::MAX))
            });
            let secret = password::new_token_secret()?;
            let catalog = open_catalog(&config(&at)).await?;
            let created = catalog
                .create_api_token(&user, &name, password::token_hash(&secret), scopes_json, expires_at)
                .await?;
            catalog.close();
            let id = match created {
                Ok(id) => id,
                Err(NewTokenError::UnknownUser) => return Err(format!("no user {user}").into()),
                Err(NewTokenError::NameTaken) => {
                    return Err(format!("{user} already has a live token named {name}").into());
                }
            };
            let scopes: Vec<String> = grants.iter().map(Grant::to_string).collect();
            eprintln!(
                "created token {id} ({name}) for {user}, scopes {}, {}; the secret is shown only now:",
                scopes.join(" "),
                expires_at.map_or("no expiry".to_owned(), |e| format!("expires {}", time(e)))
            );
            println!("{secret}");
        }
        TokenCommand::List { at, user } => {
            let catalog = open_catalog(&config(&at)).await?;
            let tokens = catalog.api_tokens(user.as_deref()).await?;
            catalog.close();
            println!(
                "{:<6} {:<16} {:<20} {:<20} {:<20} {:<20} SCOPES",
                "ID", "USER", "NAME", "EXPIRES", "LAST USED", "STATUS"
            );
            let now = crate::catalog::now();
            for t in tokens {
                let scopes = serde_json::from_str::<Vec<Grant>>(&t.scopes)
                    .map(|g| g.iter().map(Grant::to_string).collect::<Vec<_>>().join(" "))
                    .unwrap_or_else(|_| "?".into());
                let status = match (t.revoked_at, t.expires_at) {
                    (Some(r), _) => format!("revoked {}", time(r)),
                    (None, Some(e)) if e <= now => "expired".to_owned(),
                    _ => "live".to_owned(),
                };
                println!(
                    "{:<6} {:<16} {:<20} {:<20} {:<20} {:<20} {}",
                    t.id,
                    t.user,
                    t.name,
                    t.expires_at.map_or("never".into(), time),
                    t.last_used_at.map_or("never".into(), time),
                    status,
                    scopes
                );
            }
        }
        TokenCommand::Revoke { at, token, user } => {
            let catalog = open_catalog(&config(&at)).await?;
            let n = catalog.revoke_api_token(user.as_deref(), &token).await?;
            catalog.close();
            if n == 0 {
                return Err(format!("no single live token {token} (give its id, or --user)").into());
            }
            eprintln!("revoked token {token}");
        }
    }
    Ok(())
}

pub async fn key(cmd: KeyCommand, config: impl Fn(&crate::cli::ServeArgs) -> Config) -> Outcome {
    match cmd {
        KeyCommand::Rotate { at } => {
            let config = config(&at);
            if config.auth.signing_key.is_some() {
                return Err(
                    "auth.signing_key is set: rotate by pointing it at a new key and listing the old one in \
                            auth.verify_keys"
                        .into(),
                );
            }
            let dir = keys::key_dir(&config.data_dir);
            let now = jsonwebtoken::get_current_timestamp();
            let retain = config.auth.token_ttl_secs.max(config.auth.refresh_token_ttl_secs);
            let kid = keys::add_key(&dir, now).map_err(|e| e.to_string())?;
            let pruned = keys::prune(&dir, now, retain).map_err(|e| e.to_string())?;
            eprintln!(
                "new signing key {kid} in {}; restart the server to sign with it ({pruned} retired key(s) removed)",
                dir.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_times() {
        assert_eq!(super::time(0), "1970-01-01 00:00:00");
        assert_eq!(super::time(1_700_000_000), "2023-11-14 22:13:20");
    }
}

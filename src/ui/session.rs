//! Web UI sessions and CSRF tokens, in memory.
//!
//! A session is created by signing in with a user's password (`Auth::login`: the same users,
//! the same failed-login limiter as `/token`). Its id is 32 random bytes, sent to the browser
//! as the cookie `stowage_session` (`HttpOnly`, `SameSite=Strict`, `Path=/`, `Secure` when the
//! browser reached the server over HTTPS) and kept here only as its SHA-256, so the table
//! holds nothing a browser could present. A session records its user and that user's
//! credentials epoch: every request looks the user up again, so removing the user or changing
//! their password ends their sessions at once. A session ends at sign-out (removed from the
//! table), `ui.session_ttl_secs` after sign-in, or when the process restarts.
//!
//! The table is bounded: at most `ui.max_sessions` sessions, and [`MAX_PER_USER`] per user;
//! signing in beyond either bound ends the oldest session concerned (expired ones first).
//!
//! CSRF: every form carries a token that is an HMAC-SHA256, under a key drawn at start-up, of
//! the cookie the form is bound to: the session cookie for signed-in forms (sign-out, delete, the admin forms),
//! or, for the sign-in form, a random pre-session cookie `stowage_csrf` set when the form is
//! shown. A post whose token does not verify against its cookie is refused (403), so a page
//! of another site can neither forge a form (it cannot read the token) nor log a browser in
//! to an account of its choosing. `SameSite=Strict` cookies are a second line.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aws_lc_rs::{hmac, rand};
use base64::Engine as _;
use sha2::Digest as _;

/// Most sessions one user holds at once.
pub const MAX_PER_USER: usize = 32;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "stowage_session";
/// The pre-session cookie the sign-in form's CSRF token is bound to.
pub const LOGIN_COOKIE: &str = "stowage_csrf";

/// What a CSRF token is for: the same cookie never yields the same token for two purposes.
#[derive(Debug, Clone, Copy)]
pub enum Purpose {
    SignIn,
    Session,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Purpose::SignIn => b"stowage-ui sign-in\0",
            Purpose::Session => b"stowage-ui session\0",
        }
    }
}

/// A live session.
#[derive(Debug, Clone)]
pub struct Session {
    pub user: String,
    /// The user's credentials epoch at sign-in.
    pub epoch: i64,
    created: Instant,
}

/// The session table and the CSRF key.
pub struct Sessions {
    table: Mutex<HashMap<[u8; 32], Session>>,
    ttl: Duration,
    max: usize,
    csrf_key: hmac::Key,
}

/// 32 random bytes, base64url without padding (43 characters).
pub fn random_token() -> Option<String> {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes).ok()?;
    Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// Whether a cookie value has the shape [`random_token`] gives (anything else is ignored).
pub fn plausible_token(value: &str) -> bool {
    value.len() == 43
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn key_of(id: &str) -> [u8; 32] {
    sha2::Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    /// An empty table; `None` if the system's random source fails.
    pub fn new(ttl: Duration, max: usize) -> Option<Sessions> {
        let mut key = [0u8; 32];
        rand::fill(&mut key).ok()?;
        Some(Sessions {
            table: Mutex::new(HashMap::new()),
            ttl,
            max: max.max(1),
            csrf_key: hmac::Key::new(hmac::HMAC_SHA256, &key),
        })
    }

    /// How long a session lives.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a session for `user` and returns its id (the cookie value); `None` if the random
    /// source fails.
    pub fn create(&self, user: &str, epoch: i64) -> Option<String> {
        self.create_at(user, epoch, Instant::now())
    }

    fn create_at(&self, user: &str, epoch: i64, now: Instant) -> Option<String> {
        let id = random_token()?;
        let mut table = self.table();
        let ttl = self.ttl;
        table.retain(|_, s| now.saturating_duration_since(s.created) < ttl);
        let theirs = table.values().filter(|s| s.user == user).count();
        if theirs >= MAX_PER_USER {
            evict_oldest(&mut table, |s| s.user == user);
        }
        if table.len() >= self.max {
            evict_oldest(&mut table, |_| true);
            tracing::warn!(
                max = self.max,
                "the web UI session table is full: ended the oldest session"
            );
        }
        table.insert(
            key_of(&id),
            Session {
                user: user.to_owned(),
                epoch,
                created: now,
            },
        );
        Some(id)
    }

    /// The live session with this id.
    pub fn get(&self, id: &str) -> Option<Session> {
        self.get_at(id, Instant::now())
    }

    fn get_at(&self, id: &str, now: Instant) -> Option<Session> {
        if !plausible_token(id) {
            return None;
        }
        let key = key_of(id);
        let mut table = self.table();
        let session = table.get(&key)?;
        if now.saturating_duration_since(session.created) >= self.ttl {
            table.remove(&key);
            return None;
        }
        Some(session.clone())
    }

    /// Ends a session (sign-out, or a session whose user changed).
    pub fn remove(&self, id: &str) {
        self.table().remove(&key_of(id));
    }

    /// The CSRF token bound to `cookie` for `purpose`.
    pub fn csrf_token(&self, purpose: Purpose, cookie: &str) -> String {
        let mut ctx = hmac::Context::with_key(&self.csrf_key);
        ctx.update(purpose.label());
        ctx.update(cookie.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(ctx.sign().as_ref())
    }

    /// Whether `token` is the CSRF token bound to `cookie` for `purpose` (in constant time).
    pub fn csrf_valid(&self, purpose: Purpose, cookie: &str, token: &str) -> bool {
        let Ok(tag) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token) else {
            return false;
        };
        let mut msg = Vec::with_capacity(purpose.label().len() + cookie.len());
        msg.extend_from_slice(purpose.label());
        msg.extend_from_slice(cookie.as_bytes());
        hmac::verify(&self.csrf_key, &msg, &tag).is_ok()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.table().len()
    }
}

fn evict_oldest(table: &mut HashMap<[u8; 32], Session>, which: impl Fn(&Session) -> bool) {
    let oldest = table
        .iter()
        .filter(|(_, s)| which(s))
        .min_by_key(|(_, s)| s.created)
        .map(|(k, _)| *k);
    if let Some(k) = oldest {
        table.remove(&k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_end_at_sign_out() {
        let s = Sessions::new(Duration::from_secs(60), 100).unwrap();
        let now = Instant::now();
        let id = s.create_at("alice", 7, now).unwrap();
        assert_eq!(s.get_at(&id, now).unwrap().user, "alice");
        assert!(s.get_at(&id, now + Duration::from_secs(60)).is_none(), "expired");
        let id = s.create_at("alice", 7, now).unwrap();
        s.remove(&id);
        assert!(s.get_at(&id, now).is_none(), "signed out");
        assert!(s.get_at("not-a-token", now).is_none());
    }

    #[test]
    fn the_table_is_bounded_overall_and_per_user() {
        let s = Sessions::new(Duration::from_secs(3600), 40).unwrap();
        let now = Instant::now();
        let first = s.create_at("bob", 1, now).unwrap();
        for i in 1..MAX_PER_USER + 5 {
            s.create_at("bob", 1, now + Duration::from_millis(i as u64)).unwrap();
        }
        assert_eq!(s.len(), MAX_PER_USER);
        assert!(s.get_at(&first, now).is_none(), "bob's oldest session ended");
        for i in 0..100 {
            s.create_at(&format!("u{i}"), 1, now + Duration::from_secs(1)).unwrap();
        }
        assert_eq!(s.len(), 40);
    }

    #[test]
    fn csrf_tokens_are_bound_to_their_cookie_and_purpose() {
        let s = Sessions::new(Duration::from_secs(60), 10).unwrap();
        let t = s.csrf_token(Purpose::Session, "cookie-a");
        assert!(s.csrf_valid(Purpose::Session, "cookie-a", &t));
        assert!(!s.csrf_valid(Purpose::Session, "cookie-b", &t));
        assert!(!s.csrf_valid(Purpose::SignIn, "cookie-a", &t));
        assert!(!s.csrf_valid(Purpose::Session, "cookie-a", ""));
        assert!(!s.csrf_valid(Purpose::Session, "cookie-a", "%%%"));
        // Another process (another key) does not accept it.
        let other = Sessions::new(Duration::from_secs(60), 10).unwrap();
        assert!(!other.csrf_valid(Purpose::Session, "cookie-a", &t));
    }
}

//! Password hashing (argon2id, PHC strings) and API token secrets.
//!
//! Both hashing and verifying are CPU-heavy by design: callers run them on the blocking pool,
//! bounded by a [`Hasher`]'s permits (the server shares one set between sign-in verifications
//! in `Auth::login` and the password changes of `auth::accounts`, `auth.max_concurrent_hashes`
//! in all).
//! API token secrets are 256 random bits, `stw_` + base64url; only their SHA-256 is stored
//! (a slow hash adds nothing to a secret with that much entropy, and lets a request find its
//! token with one indexed lookup).

use std::sync::Arc;
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine as _;
use sha2::Digest as _;

/// Prefix of every API token secret.
pub const TOKEN_PREFIX: &str = "stw_";

/// An argon2id PHC hash of `password` (default parameters: 19 MiB, 2 passes).
pub fn hash(password: &str) -> Result<String, String> {
    let mut raw = [0u8; 16];
    aws_lc_rs::rand::fill(&mut raw).map_err(|_| "no randomness for a password salt".to_owned())?;
    let salt = SaltString::encode_b64(&raw).map_err(|e| format!("encoding a salt failed: {e}"))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("hashing a password failed: {e}"))
}

/// Why a bounded hash was not made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashError {
    /// No permit came free within the wait: too many hashes at once (retry after a second).
    Busy,
    /// The hasher itself failed (no randomness, a closed semaphore).
    Failed(String),
}

/// Hashes passwords on the blocking pool, at most as many at once as it has permits: argon2
/// takes 19 MiB and tens of milliseconds of a core per hash, a bounded resource the server
/// shares between sign-ins and password changes. Cloning shares the permits.
#[derive(Clone)]
pub struct Hasher {
    permits: Arc<tokio::sync::Semaphore>,
    wait: Duration,
}

impl Hasher {
    /// A hasher with permits of its own (the command line: one).
    pub fn new(permits: usize, wait: Duration) -> Hasher {
        Hasher::sharing(Arc::new(tokio::sync::Semaphore::new(permits.max(1))), wait)
    }

    /// A hasher drawing on `permits`, shared with whoever else holds them (`Auth`).
    pub fn sharing(permits: Arc<tokio::sync::Semaphore>, wait: Duration) -> Hasher {
        Hasher { permits, wait }
    }

    /// The argon2id hash of `password`, made on the blocking pool while holding a permit (it
    /// moves into the blocking task, so a caller that goes away does not free it early).
    pub async fn hash(&self, password: String) -> Result<String, HashError> {
        let permit = tokio::time::timeout(self.wait, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| HashError::Busy)?
            .map_err(|_| HashError::Failed("the password hashing semaphore is closed".into()))?;
        crate::metrics::spawn_blocking(move || {
            let _permit = permit;
            hash(&password)
        })
        .await
        .map_err(|e| HashError::Failed(e.to_string()))?
        .map_err(HashError::Failed)
    }
}

/// Whether `password` matches the PHC hash. A malformed hash never matches.
pub fn verify(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok(),
        Err(_) => false,
    }
}

/// A new API token secret.
pub fn new_token_secret() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| "no randomness for a token secret".to_owned())?;
    Ok(format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

/// Whether a presented password has the shape of an API token secret.
pub fn is_token_secret(s: &str) -> bool {
    s.starts_with(TOKEN_PREFIX)
}

/// The stored form of a token secret.
pub fn token_hash(secret: &str) -> String {
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_verify() {
        let h = hash("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify("correct horse", &h));
        assert!(!verify("wrong", &h));
        assert!(!verify("x", "not a hash"));
    }

    #[tokio::test]
    async fn the_hasher_is_bounded_by_its_shared_permits() {
        let permits = Arc::new(tokio::sync::Semaphore::new(1));
        let hasher = Hasher::sharing(permits.clone(), Duration::from_millis(200));
        let h = hasher.hash("pw".into()).await.unwrap();
        assert!(verify("pw", &h));
        // Another holder (a sign-in being verified) takes the only permit: refused, not queued
        // forever, and nothing hashed.
        let held = permits.clone().acquire_owned().await.unwrap();
        assert_eq!(hasher.hash("pw".into()).await, Err(HashError::Busy));
        drop(held);
        assert!(hasher.hash("pw".into()).await.is_ok());
    }

    #[test]
    fn token_secrets() {
        let a = new_token_secret().unwrap();
        let b = new_token_secret().unwrap();
        assert_ne!(a, b);
        assert!(is_token_secret(&a) && a.len() == 4 + 43);
        assert_eq!(token_hash(&a).len(), 64);
    }
}

//! Password hashing (argon2id, PHC strings) and API token secrets.
//!
//! Both hashing and verifying are CPU-heavy by design: callers run them on the blocking pool.
//! API token secrets are 256 random bits, `stw_` + base64url; only their SHA-256 is stored
//! (a slow hash adds nothing to a secret with that much entropy, and lets a request find its
//! token with one indexed lookup).

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

    #[test]
    fn token_secrets() {
        let a = new_token_secret().unwrap();
        let b = new_token_secret().unwrap();
        assert_ne!(a, b);
        assert!(is_token_secret(&a) && a.len() == 4 + 43);
        assert_eq!(token_hash(&a).len(), 64);
    }
}

//! Registry tokens: JWTs signed with Ed25519 (`EdDSA`), in the shape CNCF Distribution's token
//! server issues, so that the claims read the same to anyone who knows that protocol:
//!
//! ```text
//! header  {"alg":"EdDSA","typ":"JWT","kid":"3f9a…"}
//! claims  {"iss":"stowage","sub":"alice","aud":"stowage","exp":…,"nbf":…,"iat":…,"jti":"…",
//!          "access":[{"type":"repository","name":"spack/cache","actions":["pull","push"]}],
//!          "use":"access"}
//! ```
//!
//! `sub` is empty for anonymous tokens. `tid` names the API token a token was issued through,
//! so that revoking it takes effect at once; `epoch`, on tokens issued on a password, is the
//! user's credentials epoch, so that changing the password ends them. `use` tells access tokens from the refresh tokens
//! handed to `docker login` (which carry no `access`); one is never accepted as the other.
//! Verification accepts only `EdDSA` with a known `kid`, and checks the signature, issuer,
//! audience (the service), `exp` and `nbf`.

use jsonwebtoken::{Algorithm, Header, Validation};
use serde::{Deserialize, Serialize};

use super::keys::KeySet;
use super::scope::Action;

/// Seconds of clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TokenUse {
    #[default]
    Access,
    Refresh,
}

/// One entry of the `access` claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessEntry {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

impl AccessEntry {
    pub fn repository(name: &str, actions: &[Action]) -> AccessEntry {
        AccessEntry {
            kind: "repository".into(),
            name: name.to_owned(),
            actions: actions.iter().map(|a| a.as_str().to_owned()).collect(),
        }
    }

    pub fn catalog() -> AccessEntry {
        AccessEntry {
            kind: "registry".into(),
            name: "catalog".into(),
            actions: vec!["*".into()],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: u64,
    pub nbf: u64,
    pub iat: u64,
    pub jti: String,
    #[serde(default)]
    pub access: Vec<AccessEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tid: Option<i64>,
    #[serde(default, rename = "use")]
    pub token_use: TokenUse,
    /// The user's credentials epoch when the token was issued on a password (0: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: i64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

impl Claims {
    /// Whether the `access` claim grants `action` on repository `repo`.
    pub fn grants(&self, repo: &str, action: Action) -> bool {
        self.access
            .iter()
            .any(|e| e.kind == "repository" && e.name == repo && e.actions.iter().any(|a| a == action.as_str()))
    }
}

/// Why a token was refused. Every variant is answered the same way (401 `invalid_token`); the
/// distinction is for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("malformed token or unsupported algorithm")]
    Malformed,
    #[error("token signed with an unknown key")]
    UnknownKey,
    #[error("bad token signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("token issued by someone else")]
    WrongIssuer,
    #[error("token meant for another service")]
    WrongAudience,
    #[error("wrong kind of token")]
    WrongUse,
    #[error("token issued before the user's password changed")]
    Superseded,
}

/// Signs `claims` with the current key.
pub fn sign(keys: &KeySet, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(keys.signing.kid.clone());
    jsonwebtoken::encode(&header, claims, &keys.signing.encoding)
}

/// Verifies a token of the given use. `expired_grace` accepts a token that expired less than
/// that many seconds ago (an upload session continuing after its token ran out).
pub fn verify(
    keys: &KeySet,
    token: &str,
    issuer: &str,
    audience: &str,
    token_use: TokenUse,
    expired_grace: Option<u64>,
) -> Result<Claims, VerifyError> {
    use jsonwebtoken::errors::ErrorKind;
    let header = jsonwebtoken::decode_header(token).map_err(|_| VerifyError::Malformed)?;
    if header.alg != Algorithm::EdDSA {
        return Err(VerifyError::Malformed);
    }
    let kid = header.kid.ok_or(VerifyError::UnknownKey)?;
    let key = keys.verifier(&kid).ok_or(VerifyError::UnknownKey)?;
    let mut v = Validation::new(Algorithm::EdDSA);
    v.algorithms = vec![Algorithm::EdDSA];
    v.leeway = LEEWAY_SECS;
    v.validate_nbf = true;
    v.validate_exp = true;
    v.set_issuer(&[issuer]);
    v.set_audience(&[audience]);
    v.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
    if let Some(grace) = expired_grace {
        v.leeway = LEEWAY_SECS.saturating_add(grace);
    }
    let data = jsonwebtoken::decode::<Claims>(token, key, &v).map_err(|e| match e.kind() {
        ErrorKind::InvalidSignature => VerifyError::BadSignature,
        ErrorKind::ExpiredSignature => VerifyError::Expired,
        ErrorKind::ImmatureSignature => VerifyError::NotYetValid,
        ErrorKind::InvalidIssuer => VerifyError::WrongIssuer,
        ErrorKind::InvalidAudience => VerifyError::WrongAudience,
        _ => VerifyError::Malformed,
    })?;
    // The grace widened the leeway for `nbf` as well; hold `nbf` to the usual leeway.
    let now = jsonwebtoken::get_current_timestamp();
    if data.claims.nbf > now.saturating_add(LEEWAY_SECS) {
        return Err(VerifyError::NotYetValid);
    }
    if data.claims.token_use != token_use {
        return Err(VerifyError::WrongUse);
    }
    Ok(data.claims)
}

/// The time checks of [`verify`], for claims whose signature verified earlier: expired
/// (beyond `expired_grace` when given) or not yet valid, with the same leeway.
pub fn check_times(claims: &Claims, expired_grace: Option<u64>, now: u64) -> Result<(), VerifyError> {
    let leeway = LEEWAY_SECS.saturating_add(expired_grace.unwrap_or(0));
    if claims.exp < now.saturating_sub(leeway) {
        return Err(VerifyError::Expired);
    }
    if claims.nbf > now.saturating_add(LEEWAY_SECS) {
        return Err(VerifyError::NotYetValid);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::*;

    fn keys(dir: &std::path::Path) -> KeySet {
        KeySet::load(&dir.join("k"), None, &[], 1).unwrap()
    }

    fn claims(now: u64) -> Claims {
        Claims {
            iss: "stowage".into(),
            sub: "alice".into(),
            aud: "svc".into(),
            exp: now + 300,
            nbf: now,
            iat: now,
            jti: "j".into(),
            access: vec![AccessEntry::repository("a/b", &[Action::Pull])],
            tid: None,
            token_use: TokenUse::Access,
            epoch: 0,
        }
    }

    fn b64(data: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
    }

    fn check(keys: &KeySet, token: &str) -> Result<Claims, VerifyError> {
        verify(keys, token, "stowage", "svc", TokenUse::Access, None)
    }

    #[test]
    fn epoch_is_omitted_when_zero_and_reads_as_zero_when_absent() {
        let c = claims(1_000);
        let json = serde_json::to_value(&c).unwrap();
        assert!(json.get("epoch").is_none(), "{json}");
        let back: Claims = serde_json::from_value(json).unwrap();
        assert_eq!(back.epoch, 0);
        let with = Claims { epoch: 42, ..c };
        assert_eq!(serde_json::to_value(&with).unwrap()["epoch"], 42);
    }

    #[test]
    fn round_trip_and_forgeries() {
        let tmp = tempfile::tempdir().unwrap();
        let keys = keys(tmp.path());
        let now = jsonwebtoken::get_current_timestamp();
        let good = sign(&keys, &claims(now)).unwrap();
        let c = check(&keys, &good).unwrap();
        assert!(c.grants("a/b", Action::Pull));
        assert!(!c.grants("a/b", Action::Push));
        assert!(!c.grants("a/c", Action::Pull));

        // alg none.
        let payload = b64(&serde_json::to_vec(&claims(now)).unwrap());
        let none = format!("{}.{payload}.", b64(br#"{"alg":"none","typ":"JWT"}"#));
        assert_eq!(check(&keys, &none), Err(VerifyError::Malformed));
        // HMAC keyed with the public key.
        let kid = keys.signing_kid().to_owned();
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some(kid.clone());
        let public = b64(b"whatever-the-public-key-is");
        let hs = jsonwebtoken::encode(
            &h,
            &claims(now),
            &jsonwebtoken::EncodingKey::from_secret(public.as_bytes()),
        )
        .unwrap();
        assert_eq!(check(&keys, &hs), Err(VerifyError::Malformed));
        // Another key claiming our kid.
        let other = KeySet::load(&tmp.path().join("other"), None, &[], 1).unwrap();
        let mut h = Header::new(Algorithm::EdDSA);
        h.kid = Some(kid);
        let forged = jsonwebtoken::encode(&h, &claims(now), &other.signing.encoding).unwrap();
        assert_eq!(check(&keys, &forged), Err(VerifyError::BadSignature));
        // Another key with its own kid.
        assert_eq!(
            check(&keys, &sign(&other, &claims(now)).unwrap()),
            Err(VerifyError::UnknownKey)
        );
        // Wrong issuer, audience, expired, not yet valid.
        let mut c = claims(now);
        c.iss = "evil".into();
        assert_eq!(check(&keys, &sign(&keys, &c).unwrap()), Err(VerifyError::WrongIssuer));
        let mut c = claims(now);
        c.aud = "elsewhere".into();
        assert_eq!(check(&keys, &sign(&keys, &c).unwrap()), Err(VerifyError::WrongAudience));
        let mut c = claims(now);
        c.exp = now - 60;
        let expired = sign(&keys, &c).unwrap();
        assert_eq!(check(&keys, &expired), Err(VerifyError::Expired));
        assert!(verify(&keys, &expired, "stowage", "svc", TokenUse::Access, Some(3600)).is_ok());
        let mut c = claims(now);
        c.nbf = now + 600;
        c.exp = now + 900;
        let early = sign(&keys, &c).unwrap();
        assert_eq!(check(&keys, &early), Err(VerifyError::NotYetValid));
        assert_eq!(
            verify(&keys, &early, "stowage", "svc", TokenUse::Access, Some(3600)),
            Err(VerifyError::NotYetValid)
        );
        // Tampered payload (more access), original signature.
        let parts: Vec<&str> = good.split('.').collect();
        let mut c = claims(now);
        c.access[0].actions.push("push".into());
        let tampered = format!("{}.{}.{}", parts[0], b64(&serde_json::to_vec(&c).unwrap()), parts[2]);
        assert_eq!(check(&keys, &tampered), Err(VerifyError::BadSignature));
        // A refresh token is not an access token.
        let mut c = claims(now);
        c.token_use = TokenUse::Refresh;
        assert_eq!(check(&keys, &sign(&keys, &c).unwrap()), Err(VerifyError::WrongUse));
        assert_eq!(check(&keys, "not-a-jwt"), Err(VerifyError::Malformed));
    }

    /// The times checked on a remembered token agree with what `verify` decides.
    #[test]
    fn check_times_agrees_with_verify() {
        let dir = tempfile::tempdir().unwrap();
        let keys = keys(dir.path());
        let now = jsonwebtoken::get_current_timestamp();
        for (exp_offset, nbf_offset, grace) in [
            (300i64, 0i64, None),
            (-3, 0, None),
            (-60, 0, None),
            (-60, -120, Some(120)),
            (-300, -400, Some(120)),
            (300, 3, None),
            (300, 60, None),
            (300, 60, Some(600)),
        ] {
            let mut c = claims(now);
            c.exp = now.saturating_add_signed(exp_offset);
            c.nbf = now.saturating_add_signed(nbf_offset);
            let token = sign(&keys, &c).unwrap();
            let verified = verify(&keys, &token, "stowage", "svc", TokenUse::Access, grace).map(|_| ());
            assert_eq!(
                check_times(&c, grace, now),
                verified,
                "exp {exp_offset:+}, nbf {nbf_offset:+}, grace {grace:?}"
            );
        }
    }
}

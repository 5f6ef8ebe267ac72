//! Token signing keys: Ed25519 (JWS `EdDSA`), in PKCS#8 PEM files.
//!
//! Without `auth.signing_key`, keys live in `<data_dir>/auth/keys/` as `key-<unix seconds>.pem`,
//! created with mode 0600 in a 0700 directory (and `auth/` is created 0700 too). A key file
//! there found readable by group or others is changed to 0600 at start-up, with a warning; an
//! explicit `auth.signing_key` is the operator's file and only warned about. The newest signs; every key in the directory
//! verifies, so after `stowage key rotate` (which adds a newer key) tokens signed with the
//! previous key stay valid until they expire. The first start generates the first key.
//!
//! A key's `kid` (carried in each token's header) is the first 16 hex digits of the SHA-256 of
//! its raw public key.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
use base64::Engine as _;
use jsonwebtoken::{DecodingKey, EncodingKey};
use sha2::Digest as _;

/// A key that can sign, with its id.
pub struct SigningKey {
    pub kid: String,
    pub(super) encoding: EncodingKey,
}

/// The keys tokens are signed and verified with.
pub struct KeySet {
    pub(super) signing: SigningKey,
    pub(super) verifying: Vec<(String, DecodingKey)>,
}

pub type KeyError = Box<dyn std::error::Error + Send + Sync>;

/// A fresh Ed25519 key as PKCS#8 PEM.
pub fn generate_pem() -> Result<String, KeyError> {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| "generating an Ed25519 key failed")?;
    Ok(to_pem("PRIVATE KEY", doc.as_ref()))
}

fn to_pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The DER inside the first PEM block with this label.
fn from_pem(pem: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin)? + begin.len();
    let stop = start + pem[start..].find(&end)?;
    let b64: String = pem[start..stop].split_whitespace().collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

/// The key id of a raw Ed25519 public key.
pub fn kid_of(public: &[u8]) -> String {
    hex::encode(&sha2::Sha256::digest(public)[..8])
}

/// DER prefix of an Ed25519 SubjectPublicKeyInfo; the 32-byte key follows.
const SPKI_ED25519_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// A key read from a PEM file: a private key (signs and verifies) or a public one (verifies).
enum LoadedKey {
    Private {
        kid: String,
        pkcs8: Vec<u8>,
        public: Vec<u8>,
    },
    Public {
        kid: String,
        public: Vec<u8>,
    },
}

fn load_pem(path: &Path) -> Result<LoadedKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    if let Some(der) = from_pem(&text, "PRIVATE KEY") {
        let pair = Ed25519KeyPair::from_pkcs8(&der)
            .map_err(|e| format!("{}: not an Ed25519 PKCS#8 key: {e}", path.display()))?;
        let public = pair.public_key().as_ref().to_vec();
        return Ok(LoadedKey::Private {
            kid: kid_of(&public),
            pkcs8: der,
            public,
        });
    }
    if let Some(der) = from_pem(&text, "PUBLIC KEY")
        && der.len() == 44
        && der[..12] == SPKI_ED25519_PREFIX
    {
        let public = der[12..].to_vec();
        return Ok(LoadedKey::Public {
            kid: kid_of(&public),
            public,
        });
    }
    Err(format!("{}: no Ed25519 PRIVATE KEY or PUBLIC KEY PEM block", path.display()).into())
}

/// Where generated keys live.
pub fn key_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("auth").join("keys")
}

/// Key files in the directory, oldest first, with the time each was created.
fn key_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, KeyError> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(format!("reading {}: {e}", dir.display()).into()),
    };
    for entry in entries {
        let path = entry?.path();
        let created = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("key-"))
            .and_then(|n| n.strip_suffix(".pem"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(created) = created {
            out.push((created, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Writes a new key into `dir` (0600, directory 0700); returns its kid.
pub fn add_key(dir: &Path, now: u64) -> Result<String, KeyError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    // A second key in the same second gets the next free name: names must stay ordered.
    let mut stamp = now;
    if let Some((last, _)) = key_files(dir)?.last() {
        stamp = stamp.max(last + 1);
    }
    let path = dir.join(format!("key-{stamp:012}.pem"));
    let pem = generate_pem()?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    file.write_all(pem.as_bytes())?;
    file.sync_all()?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    match load_pem(&path)? {
        LoadedKey::Private { kid, .. } => Ok(kid),
        LoadedKey::Public { .. } => Err("generated key did not load".into()),
    }
}

/// Removes keys superseded more than `retain_secs` ago (tokens they signed have expired).
/// Returns how many were removed.
pub fn prune(dir: &Path, now: u64, retain_secs: u64) -> Result<usize, KeyError> {
    let files = key_files(dir)?;
    let mut removed = 0;
    for pair in files.windows(2) {
        let (_, path) = &pair[0];
        let (successor_created, _) = pair[1];
        if now.saturating_sub(successor_created) > retain_secs {
            std::fs::remove_file(path).map_err(|e| format!("removing {}: {e}", path.display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

impl KeySet {
    /// Loads the signing key (`signing_key`, else the newest in `dir`, generating one when the
    /// directory has none) and every key that verifies (`dir`'s keys and `verify_keys`).
    pub fn load(dir: &Path, signing_key: Option<&Path>, verify_keys: &[PathBuf], now: u64) -> Result<KeySet, KeyError> {
        let mut files: Vec<PathBuf> = Vec::new();
        if signing_key.is_none() {
            if key_files(dir)?.is_empty() {
                let kid = add_key(dir, now)?;
                tracing::info!(kid, dir = %dir.display(), "generated a token signing key");
            }
            files.extend(key_files(dir)?.into_iter().map(|(_, p)| p));
            for path in &files {
                let mode = std::fs::metadata(path)?.permissions().mode() & 0o7777;
                if mode & 0o077 != 0 {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                        .map_err(|e| format!("restricting {}: {e}", path.display()))?;
                    tracing::warn!(path = %path.display(), was = format!("{mode:o}"), "signing key was readable by other users; changed its mode to 600");
                }
            }
        }
        if let Some(path) = signing_key {
            let mode = std::fs::metadata(path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o7777), "auth.signing_key is readable by other users; chmod 600 it");
            }
        }
        // The signer comes last: the explicit key, or the newest file.
        let signer_path = signing_key.map(Path::to_path_buf).or_else(|| files.last().cloned());
        let signer_path = signer_path.ok_or("no signing key")?;
        let mut verifying = Vec::new();
        for path in files.iter().chain(verify_keys) {
            let (kid, public) = match load_pem(path)? {
                LoadedKey::Private { kid, public, .. } | LoadedKey::Public { kid, public } => (kid, public),
            };
            verifying.push((kid, DecodingKey::from_ed_der(&public)));
        }
        let signing = match load_pem(&signer_path)? {
            LoadedKey::Private { kid, pkcs8, public } => {
                if !verifying.iter().any(|(k, _)| *k == kid) {
                    verifying.push((kid.clone(), DecodingKey::from_ed_der(&public)));
                }
                SigningKey {
                    kid,
                    encoding: EncodingKey::from_ed_der(&pkcs8),
                }
            }
            LoadedKey::Public { .. } => {
                return Err(format!("{}: the signing key must be a private key", signer_path.display()).into());
            }
        };
        Ok(KeySet { signing, verifying })
    }

    /// The id of the key that signs new tokens.
    pub fn signing_kid(&self) -> &str {
        &self.signing.kid
    }

    pub(super) fn verifier(&self, kid: &str) -> Option<&DecodingKey> {
        self.verifying.iter().find(|(k, _)| k == kid).map(|(_, key)| key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_rotate_prune() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = key_dir(tmp.path());
        let first = KeySet::load(&dir, None, &[], 1000).unwrap();
        let mode = std::fs::metadata(dir.join("key-000000001000.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Loading again reuses the key.
        assert_eq!(
            KeySet::load(&dir, None, &[], 1001).unwrap().signing_kid(),
            first.signing_kid()
        );
        let new_kid = add_key(&dir, 2000).unwrap();
        let rotated = KeySet::load(&dir, None, &[], 2001).unwrap();
        assert_eq!(rotated.signing_kid(), new_kid);
        assert!(rotated.verifier(first.signing_kid()).is_some());
        assert_eq!(prune(&dir, 2100, 300).unwrap(), 0);
        assert_eq!(prune(&dir, 2400, 300).unwrap(), 1);
        let pruned = KeySet::load(&dir, None, &[], 2401).unwrap();
        assert!(pruned.verifier(first.signing_kid()).is_none());
    }

    #[test]
    fn key_files_and_directories_are_owner_only() {
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let tmp = tempfile::tempdir().unwrap();
        let dir = key_dir(tmp.path());
        KeySet::load(&dir, None, &[], 1000).unwrap();
        assert_eq!(mode(&tmp.path().join("auth")), 0o700);
        assert_eq!(mode(&dir), 0o700);
        let key = dir.join("key-000000001000.pem");
        assert_eq!(mode(&key), 0o600);
        // A key another tool left readable by everyone is restricted at the next start.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        KeySet::load(&dir, None, &[], 1001).unwrap();
        assert_eq!(mode(&key), 0o600);
    }
}

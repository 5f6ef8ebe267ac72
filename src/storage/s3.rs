//! The `s3` backend: S3 or an S3-compatible store through `object_store`'s AWS client.
//!
//! Credentials, in the order the AWS SDKs use: the environment (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`); a shared credentials file
//! (`storage.s3.credentials_file` or `AWS_SHARED_CREDENTIALS_FILE`, profile
//! `storage.s3.profile` or `AWS_PROFILE`); web identity (`AWS_WEB_IDENTITY_TOKEN_FILE` +
//! `AWS_ROLE_ARN`) and the instance or container metadata service, which `object_store`
//! handles itself. The configuration file never holds a secret.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder};

use super::BlobStore;
use crate::config::S3Config;

/// Why the `s3` backend could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum S3SetupError {
    #[error("storage.s3.bucket must be set with storage.backend = \"s3\"")]
    NoBucket,
    #[error("reading the AWS credentials file {path}: {source}")]
    CredentialsFile { path: String, source: std::io::Error },
    #[error("the AWS credentials file {path} has no access key for profile {profile:?}")]
    NoProfile { path: String, profile: String },
    #[error("S3 client: {0}")]
    Client(#[from] object_store::Error),
}

/// Access key read from a credentials file.
#[derive(Debug, PartialEq, Eq)]
struct FileCredentials {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
}

/// Reads `profile` from an AWS shared credentials file (INI: `[profile]`, `key = value`).
fn parse_credentials(text: &str, profile: &str) -> Option<FileCredentials> {
    let mut in_profile = false;
    let (mut id, mut secret, mut token) = (None, None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim();
            in_profile = name == profile || name.strip_prefix("profile ") == Some(profile);
            continue;
        }
        if !in_profile {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().to_string();
            match k.trim() {
                "aws_access_key_id" => id = Some(v),
                "aws_secret_access_key" => secret = Some(v),
                "aws_session_token" => token = Some(v),
                _ => {}
            }
        }
    }
    Some(FileCredentials {
        access_key_id: id?,
        secret_access_key: secret?,
        session_token: token,
    })
}

fn builder(cfg: &S3Config, endpoint: Option<&str>) -> Result<AmazonS3Builder, S3SetupError> {
    if cfg.bucket.is_empty() {
        return Err(S3SetupError::NoBucket);
    }
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(&cfg.bucket)
        .with_region(&cfg.region)
        .with_virtual_hosted_style_request(!cfg.path_style);
    if let Some(endpoint) = endpoint {
        b = b
            .with_endpoint(endpoint)
            .with_allow_http(endpoint.starts_with("http://"));
    }
    let env_keys = std::env::var_os("AWS_ACCESS_KEY_ID").is_some_and(|v| !v.is_empty());
    let file = cfg
        .credentials_file
        .clone()
        .or_else(|| std::env::var_os("AWS_SHARED_CREDENTIALS_FILE").map(Into::into));
    if let (false, Some(file)) = (env_keys, file) {
        let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| cfg.profile.clone());
        let creds = read_credentials(&file, &profile)?;
        b = b
            .with_access_key_id(creds.access_key_id)
            .with_secret_access_key(creds.secret_access_key);
        if let Some(token) = creds.session_token {
            b = b.with_token(token);
        }
    }
    Ok(b)
}

fn read_credentials(file: &Path, profile: &str) -> Result<FileCredentials, S3SetupError> {
    let path = file.display().to_string();
    let text = std::fs::read_to_string(file).map_err(|source| S3SetupError::CredentialsFile {
        path: path.clone(),
        source,
    })?;
    parse_credentials(&text, profile).ok_or(S3SetupError::NoProfile {
        path,
        profile: profile.to_string(),
    })
}

/// The blob store for `storage.s3`, uploading in parts of `part_size` bytes.
pub fn open(cfg: &S3Config, part_size: usize) -> Result<BlobStore, S3SetupError> {
    let s3: Arc<AmazonS3> = Arc::new(builder(cfg, cfg.endpoint.as_deref())?.build()?);
    #[cfg(feature = "fault-injection")]
    let (objects, multipart) = {
        let faulty = Arc::new(crate::faults::FaultyStore::new(AmazonS3::clone(&s3)));
        (faulty.clone(), faulty)
    };
    #[cfg(not(feature = "fault-injection"))]
    let (objects, multipart) = (s3.clone(), s3.clone());
    let mut store = BlobStore::new(objects, multipart, part_size)
        .with_prefix(&cfg.prefix)
        .with_max_copy(cfg.max_copy_size);
    if cfg.redirect {
        let signer: Arc<AmazonS3> = match &cfg.public_endpoint {
            Some(public) => Arc::new(builder(cfg, Some(public))?.build()?),
            None => s3,
        };
        store = store.with_redirects(signer, Duration::from_secs(cfg.redirect_expiry_secs));
    }
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_profile_from_a_credentials_file() {
        let text = "[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = s1\n\n\
                    [profile ci]\n# comment\naws_access_key_id=AKIDCI\naws_secret_access_key=s2\naws_session_token = t\n";
        assert_eq!(
            parse_credentials(text, "default"),
            Some(FileCredentials {
                access_key_id: "AKIDDEFAULT".into(),
                secret_access_key: "s1".into(),
                session_token: None
            })
        );
        assert_eq!(
            parse_credentials(text, "ci").map(|c| (c.access_key_id, c.session_token)),
            Some(("AKIDCI".into(), Some("t".into())))
        );
        assert_eq!(parse_credentials(text, "missing"), None);
    }
}

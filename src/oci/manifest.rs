//! Manifest parsing and validation for the four manifest formats the registry stores:
//!
//! | media type                                                  | shape  |
//! |-------------------------------------------------------------|--------|
//! | `application/vnd.oci.image.manifest.v1+json`                | image  |
//! | `application/vnd.oci.image.index.v1+json`                   | index  |
//! | `application/vnd.docker.distribution.manifest.v2+json`      | image  |
//! | `application/vnd.docker.distribution.manifest.list.v2+json` | index  |
//!
//! An image manifest names a `config` blob and `layers` blobs; an index names child `manifests`.
//! Either may carry a `subject` (OCI 1.1 referrers), `artifactType` and `annotations`:
//!
//! ```json
//! {"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
//!  "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:…","size":7023},
//!  "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:…","size":32654}],
//!  "subject":{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:…","size":7682}}
//! ```
//!
//! The served media type is the manifest's own `mediaType` field; when it has none (umoci writes
//! OCI manifests without it), the `Content-Type` of the PUT, or failing that the OCI type its
//! shape implies. The bytes themselves are never rewritten: they are stored and served as pushed.

use std::borrow::Cow;

use serde::Deserialize;

use crate::error::Error;
use crate::oci::{Digest, media};

/// One `{mediaType, digest, size}` entry of a manifest.
#[derive(Debug, Clone)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    /// The descriptor has `urls` or a non-distributable media type: its blob may live elsewhere.
    pub foreign: bool,
}

/// Whether a manifest lists blobs (image) or other manifests (index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Image,
    Index,
}

/// What the registry needs to know about a manifest to validate and catalogue it.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// Media type to store and serve as `Content-Type`.
    pub media_type: String,
    pub shape: Shape,
    pub config: Option<Descriptor>,
    /// Layers of an image manifest.
    pub layers: Vec<Descriptor>,
    /// Children of an index.
    pub manifests: Vec<Descriptor>,
    pub subject: Option<Descriptor>,
    /// `artifactType`, or for an image manifest without one, its config's media type (spec rule
    /// for the referrers API).
    pub artifact_type: Option<String>,
    /// The manifest's `annotations` object, as JSON text, if any.
    pub annotations: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<serde_json::Value>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<RawDescriptor>,
    layers: Option<Vec<RawDescriptor>>,
    manifests: Option<Vec<RawDescriptor>>,
    subject: Option<RawDescriptor>,
    annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    media_type: Option<String>,
    digest: Option<String>,
    size: Option<serde_json::Value>,
    urls: Option<Vec<String>>,
}

fn invalid(msg: impl Into<Cow<'static, str>>) -> Error {
    Error::ManifestInvalid(msg.into())
}

impl RawDescriptor {
    fn validate(self, what: &'static str) -> Result<Descriptor, Error> {
        let media_type = self
            .media_type
            .filter(|m| !m.is_empty())
            .ok_or_else(|| invalid(format!("{what} descriptor has no mediaType")))?;
        let digest = self
            .digest
            .ok_or_else(|| invalid(format!("{what} descriptor has no digest")))?
            .parse::<Digest>()
            .map_err(|_| invalid(format!("{what} descriptor has an invalid digest")))?;
        let size = self
            .size
            .as_ref()
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| invalid(format!("{what} descriptor needs a non-negative integer size")))?;
        let foreign = self.urls.is_some_and(|u| !u.is_empty())
            || media_type.contains("nondistributable")
            || media_type == "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
        Ok(Descriptor {
            media_type,
            digest,
            size,
            foreign,
        })
    }
}

/// Strips parameters (`; charset=…`) and whitespace from a `Content-Type` value.
pub fn bare_media_type(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or_default().trim()
}

fn shape_of(media_type: &str) -> Option<Shape> {
    match media_type {
        media::OCI_MANIFEST | media::DOCKER_MANIFEST => Some(Shape::Image),
        media::OCI_INDEX | media::DOCKER_LIST => Some(Shape::Index),
        _ => None,
    }
}

/// Parses and checks a manifest body pushed with the given `Content-Type` header.
pub fn parse(body: &[u8], content_type: Option<&str>) -> Result<Manifest, Error> {
    let raw: RawManifest =
        serde_json::from_slice(body).map_err(|e| invalid(format!("manifest is not valid JSON: {e}")))?;
    let header_type = content_type.map(bare_media_type).filter(|t| !t.is_empty());

    if matches!(header_type, Some(media::DOCKER_SCHEMA1 | media::DOCKER_SCHEMA1_SIGNED))
        || raw.schema_version.as_ref().and_then(serde_json::Value::as_i64) == Some(1)
    {
        return Err(invalid(
            "Docker schema 1 manifests are not supported; push schema 2 or OCI",
        ));
    }
    if raw.schema_version.as_ref().and_then(serde_json::Value::as_i64) != Some(2) {
        return Err(invalid("schemaVersion must be 2"));
    }

    let media_type = match (raw.media_type.as_deref(), header_type) {
        (Some(field), header) => {
            if shape_of(field).is_none() {
                return Err(invalid(format!("unsupported manifest mediaType {field:?}")));
            }
            if let Some(h) = header.filter(|h| shape_of(h).is_some())
                && h != field
            {
                return Err(invalid("Content-Type does not match the manifest's mediaType"));
            }
            field.to_owned()
        }
        (None, Some(h)) if shape_of(h).is_some() => h.to_owned(),
        // No usable type anywhere: infer from the shape, as the OCI spec allows the field to be
        // absent in image manifests and indexes.
        (None, _) if raw.manifests.is_some() => media::OCI_INDEX.to_owned(),
        (None, _) if raw.config.is_some() => media::OCI_MANIFEST.to_owned(),
        (None, _) => return Err(invalid("cannot tell the manifest's media type")),
    };
    let shape = shape_of(&media_type).ok_or_else(|| invalid("unsupported manifest media type"))?;

    let subject = raw.subject.map(|s| s.validate("subject")).transpose()?;
    let annotations = raw.annotations.map(|a| serde_json::Value::Object(a).to_string());

    let manifest = match shape {
        Shape::Image => {
            if raw.manifests.is_some() {
                return Err(invalid("an image manifest cannot list manifests"));
            }
            let config = raw
                .config
                .ok_or_else(|| invalid("image manifest has no config"))?
                .validate("config")?;
            let layers = raw
                .layers
                .ok_or_else(|| invalid("image manifest has no layers"))?
                .into_iter()
                .map(|d| d.validate("layer"))
                .collect::<Result<Vec<_>, _>>()?;
            let artifact_type = raw.artifact_type.clone().or_else(|| Some(config.media_type.clone()));
            Manifest {
                media_type,
                shape,
                config: Some(config),
                layers,
                manifests: Vec::new(),
                subject,
                artifact_type,
                annotations,
            }
        }
        Shape::Index => {
            if raw.config.is_some() || raw.layers.is_some() {
                return Err(invalid("an index cannot have config or layers"));
            }
            let manifests = raw
                .manifests
                .ok_or_else(|| invalid("index has no manifests"))?
                .into_iter()
                .map(|d| d.validate("manifest"))
                .collect::<Result<Vec<_>, _>>()?;
            Manifest {
                media_type,
                shape,
                config: None,
                layers: Vec::new(),
                manifests,
                subject,
                artifact_type: raw.artifact_type,
                annotations,
            }
        }
    };
    Ok(manifest)
}

impl Manifest {
    /// Blobs that must be present in the repository before this manifest is accepted.
    pub fn required_blobs(&self) -> impl Iterator<Item = &Descriptor> {
        self.config.iter().chain(self.layers.iter().filter(|d| !d.foreign))
    }
}

/// The fields of an image config (OCI `config.v1` or Docker `container.image.v1`) that name its
/// platform; the others are skipped unread.
#[derive(Deserialize)]
struct RawImageConfig {
    os: Option<String>,
    architecture: Option<String>,
    variant: Option<String>,
}

/// The platform an image config names, `os/architecture[/variant]`; `None` when the bytes are
/// not a JSON object naming both an OS and an architecture.
pub fn config_platform(config: &[u8]) -> Option<String> {
    let raw: RawImageConfig = serde_json::from_slice(config).ok()?;
    let (os, arch) = (
        raw.os.filter(|s| !s.is_empty())?,
        raw.architecture.filter(|s| !s.is_empty())?,
    );
    Some(match raw.variant.filter(|v| !v.is_empty()) {
        Some(v) => format!("{os}/{arch}/{v}"),
        None => format!("{os}/{arch}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn image_without_media_type_uses_header_or_shape() {
        let body = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{D}","size":0}},"layers":[]}}"#
        );
        let m = parse(body.as_bytes(), Some(media::DOCKER_MANIFEST)).unwrap();
        assert_eq!(m.media_type, media::DOCKER_MANIFEST);
        let m = parse(body.as_bytes(), Some("application/json")).unwrap();
        assert_eq!(m.media_type, media::OCI_MANIFEST);
        assert_eq!(
            m.artifact_type.as_deref(),
            Some("application/vnd.oci.image.config.v1+json")
        );
    }

    #[test]
    fn rejects_bad_manifests() {
        for body in [
            "not json",
            "{}",
            r#"{"schemaVersion":1}"#,
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#,
            r#"{"schemaVersion":2,"mediaType":"text/plain","config":{}}"#,
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"x","digest":"sha256:zz","size":1}]}"#,
        ] {
            assert!(
                matches!(parse(body.as_bytes(), None), Err(Error::ManifestInvalid(_))),
                "{body}"
            );
        }
    }

    #[test]
    fn mismatched_content_type_is_rejected() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[]}}"#,
            media::OCI_INDEX
        );
        assert!(parse(body.as_bytes(), Some(media::OCI_INDEX)).is_ok());
        assert!(parse(body.as_bytes(), Some(media::OCI_MANIFEST)).is_err());
    }

    #[test]
    fn reads_a_config_platform() {
        let cfg = br#"{"architecture":"arm64","variant":"v8","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"history":[{"created_by":"x"}]}"#;
        assert_eq!(config_platform(cfg).as_deref(), Some("linux/arm64/v8"));
        assert_eq!(
            config_platform(br#"{"architecture":"amd64","os":"linux"}"#).as_deref(),
            Some("linux/amd64")
        );
        for bad in [
            &b"{}"[..],
            b"[]",
            b"not json",
            br#"{"os":"linux"}"#,
            br#"{"os":"","architecture":"amd64"}"#,
            br#"{"os":1,"architecture":"x"}"#,
        ] {
            assert_eq!(config_platform(bad), None);
        }
    }
}

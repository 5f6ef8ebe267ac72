//! Content digests (`algorithm:hex`), restricted to the algorithms the registry can verify.
//!
//! The spec's grammar allows any `algorithm:encoded`; a registry must reject digests it cannot
//! verify, so only `sha256` (64 hex digits) and `sha512` (128 hex digits), lower-case, parse.

use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

use crate::error::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A verified-syntax digest. `Display` gives the wire form `sha256:…`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

impl Digest {
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The lower-case hex encoding, without the algorithm prefix.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// sha256 of a byte slice held in memory (manifests; never blobs).
    pub fn sha256_of(data: &[u8]) -> Digest {
        Digest {
            algorithm: Algorithm::Sha256,
            hex: hex::encode(sha2::Sha256::digest(data)),
        }
    }

    /// sha256 of a buffer too large to hash on an async worker thread.
    pub async fn sha256_of_blocking(data: bytes::Bytes) -> Result<Digest, Error> {
        crate::metrics::spawn_blocking(move || Digest::sha256_of(&data))
            .await
            .map_err(|e| Error::Internal(crate::error::Internal::Join(e)))
    }

    /// Digest of `data` with this digest's algorithm.
    pub fn compute_like(&self, data: &[u8]) -> Digest {
        let mut h = Hasher::new(self.algorithm);
        h.update(data);
        h.finish()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex)
    }
}

impl FromStr for Digest {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let (alg, hex) = s.split_once(':').ok_or(Error::DigestInvalid("missing ':' separator"))?;
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => return Err(Error::DigestInvalid("unsupported digest algorithm")),
        };
        if hex.len() != algorithm.hex_len() {
            return Err(Error::DigestInvalid("wrong length for the digest algorithm"));
        }
        if !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(Error::DigestInvalid("digest must be lower-case hex"));
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_owned(),
        })
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// An incremental hash for either supported algorithm.
#[derive(Clone)]
pub enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        match self {
            Hasher::Sha256(_) => Algorithm::Sha256,
            Hasher::Sha512(_) => Algorithm::Sha512,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    /// The hash state after the bytes hashed so far, to persist with an upload session.
    pub fn save(&self) -> Vec<u8> {
        use sha2::digest::common::hazmat::SerializableState;
        match self {
            Hasher::Sha256(h) => h.serialize().to_vec(),
            Hasher::Sha512(h) => h.serialize().to_vec(),
        }
    }

    /// A hasher from a state [`Hasher::save`] produced; `None` if `state` is not one.
    pub fn restore(algorithm: Algorithm, state: &[u8]) -> Option<Hasher> {
        use sha2::digest::common::hazmat::SerializableState;
        Some(match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::deserialize(state.try_into().ok()?).ok()?),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::deserialize(state.try_into().ok()?).ok()?),
        })
    }

    pub fn finish(self) -> Digest {
        let algorithm = self.algorithm();
        let hex = match self {
            Hasher::Sha256(h) => hex::encode(h.finalize()),
            Hasher::Sha512(h) => hex::encode(h.finalize()),
        };
        Digest { algorithm, hex }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let ok = format!("sha256:{}", "a".repeat(64));
        assert_eq!(ok.parse::<Digest>().map(|d| d.to_string()).ok(), Some(ok));
        assert!(format!("sha512:{}", "0".repeat(128)).parse::<Digest>().is_ok());
        for bad in [
            "",
            "sha256",
            "sha256:",
            "md5:abcd",
            &format!("sha256:{}", "A".repeat(64)),
            &format!("sha256:{}", "a".repeat(63)),
            &format!("sha256:{}", "g".repeat(64)),
            &format!("sha512:{}", "a".repeat(64)),
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn hash_state_round_trips() {
        for algorithm in [Algorithm::Sha256, Algorithm::Sha512] {
            let mut whole = Hasher::new(algorithm);
            whole.update(b"hello, world");
            let mut first = Hasher::new(algorithm);
            first.update(b"hello, ");
            let mut resumed = Hasher::restore(algorithm, &first.save()).expect("state restores");
            resumed.update(b"world");
            assert_eq!(resumed.finish(), whole.finish());
        }
        assert!(Hasher::restore(Algorithm::Sha256, b"junk").is_none());
    }

    #[test]
    fn hashes_known_value() {
        assert_eq!(
            Digest::sha256_of(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}

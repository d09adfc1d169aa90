use std::path::{Path, PathBuf};

use base64::Engine;

/// The secret kas and GitLab share to sign `Gitlab-Kas-Api-Request` JWTs.
///
/// Stored like GitLab's `.gitlab_kas_secret`: base64 text decoding to exactly 32 bytes.
/// Debug output never shows the bytes.
#[derive(Clone)]
pub struct SharedSecret(Vec<u8>);

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read secret file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("secret file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

pub const SECRET_LEN: usize = 32;

impl SharedSecret {
    pub fn from_file(path: &Path) -> Result<Self, SecretError> {
        let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_base64(text.trim()).map_err(|message| SecretError::Invalid {
            path: path.to_owned(),
            message,
        })
    }

    pub fn from_base64(text: &str) -> Result<Self, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| format!("not valid base64: {e}"))?;
        if bytes.len() != SECRET_LEN {
            return Err(format!(
                "decodes to {} bytes, expected exactly {SECRET_LEN}",
                bytes.len()
            ));
        }
        Ok(Self(bytes))
    }

    /// A fresh random secret, for the local stack and tests.
    pub fn generate() -> Self {
        let bytes: [u8; SECRET_LEN] = rand::random();
        Self(bytes.to_vec())
    }

    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.0)
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for SharedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedSecret(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_length_is_rejected() {
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 16]);
        assert!(SharedSecret::from_base64(&short)
            .unwrap_err()
            .contains("16 bytes"));
        assert!(SharedSecret::from_base64("%%%").is_err());
    }

    #[test]
    fn round_trips() {
        let s = SharedSecret::generate();
        let back = SharedSecret::from_base64(&s.to_base64()).unwrap();
        assert_eq!(s.bytes(), back.bytes());
        assert_eq!(format!("{s:?}"), "SharedSecret(..)");
    }
}

//! What the TOML policy files (limits, rules) share: how they are read and how their
//! errors name the file.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// For TOML errors the message carries line, column and key.
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// Reads `path` and hands its text and a label for errors to `parse`.
pub fn load<T>(
    path: &Path,
    parse: impl FnOnce(&str, &str) -> Result<T, PolicyFileError>,
) -> Result<T, PolicyFileError> {
    let label = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| PolicyFileError::Read {
        path: label.clone(),
        source,
    })?;
    parse(&label, &text)
}

/// An error about the file labelled `label`.
pub fn invalid(label: &str, message: impl Into<String>) -> PolicyFileError {
    PolicyFileError::Invalid {
        path: label.to_owned(),
        message: message.into(),
    }
}

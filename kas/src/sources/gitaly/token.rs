//! Gitaly's v2 authentication token: `v2.<hex HMAC-SHA256(secret, ts)>.<ts>`, where `ts` is
//! the current Unix time in seconds. The raw secret comes from GitLab (`gitaly_info.token`);
//! kas signs a fresh token for every call, and Gitaly accepts it within ±30 s of its clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How far a token's time may be from the verifier's clock (Gitaly's own window).
pub const TOKEN_VALIDITY: Duration = Duration::from_secs(30);

fn signature(secret: &[u8], message: &str) -> Hmac<Sha256> {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any size"));
    mac.update(message.as_bytes());
    mac
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The token for `unix_seconds`.
pub fn v2_token_at(secret: &[u8], unix_seconds: u64) -> String {
    let ts = unix_seconds.to_string();
    let sig = signature(secret, &ts).finalize().into_bytes();
    format!("v2.{}.{ts}", hex(&sig))
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A token for now.
pub fn v2_token(secret: &[u8]) -> String {
    v2_token_at(secret, now_unix())
}

/// Why a presented token was refused; maps onto the gRPC codes Gitaly answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Missing or not a v2 token at all: UNAUTHENTICATED.
    #[error("authentication required")]
    Missing,
    /// Well-formed, but the signature or the time is wrong: PERMISSION_DENIED.
    #[error("permission denied")]
    Denied,
}

impl From<TokenError> for tonic::Status {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Missing => tonic::Status::unauthenticated(e.to_string()),
            TokenError::Denied => tonic::Status::permission_denied(e.to_string()),
        }
    }
}

/// Checks an `authorization` metadata value (`Bearer v2....`) the way Gitaly does.
pub fn verify_v2_authorization(
    header: Option<&str>,
    secret: &[u8],
    now_unix_seconds: u64,
) -> Result<(), TokenError> {
    let token = header
        .and_then(|h| h.strip_prefix("Bearer "))
        .ok_or(TokenError::Missing)?;
    let rest = token.strip_prefix("v2.").ok_or(TokenError::Missing)?;
    let (sig, ts) = rest.split_once('.').ok_or(TokenError::Missing)?;
    let sig = unhex(sig).ok_or(TokenError::Missing)?;
    signature(secret, ts)
        .verify_slice(&sig)
        .map_err(|_| TokenError::Denied)?;
    let issued: u64 = ts.parse().map_err(|_| TokenError::Denied)?;
    if issued.abs_diff(now_unix_seconds) > TOKEN_VALIDITY.as_secs() {
        return Err(TokenError::Denied);
    }
    Ok(())
}

/// [`verify_v2_authorization`] against the current clock.
pub fn verify_v2_authorization_now(header: Option<&str>, secret: &[u8]) -> Result<(), TokenError> {
    verify_v2_authorization(header, secret, now_unix())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VECTOR: &str =
        "v2.4b227f8831b3763d066901751ad4c583ed08832bf1924a4ec50c2e871b1e8586.1700000000";

    #[test]
    fn matches_the_reference_vector() {
        assert_eq!(v2_token_at(b"secret", 1_700_000_000), VECTOR);
    }

    #[test]
    fn verification_accepts_its_window_and_refuses_the_rest() {
        let header = format!("Bearer {VECTOR}");
        let ok = |now| verify_v2_authorization(Some(&header), b"secret", now);
        assert_eq!(ok(1_700_000_000), Ok(()));
        assert_eq!(ok(1_700_000_030), Ok(()));
        assert_eq!(ok(1_699_999_970), Ok(()));
        assert_eq!(ok(1_700_000_031), Err(TokenError::Denied));
        assert_eq!(
            verify_v2_authorization(Some(&header), b"other", 1_700_000_000),
            Err(TokenError::Denied)
        );
        for bad in [
            None,
            Some("Bearer secret"),
            Some("v2.00.1"),
            Some("Bearer v2.zz.1"),
        ] {
            assert_eq!(
                verify_v2_authorization(bad, b"secret", 1_700_000_000),
                Err(TokenError::Missing),
                "{bad:?}"
            );
        }
        // A fresh token verifies now.
        let fresh = format!("Bearer {}", v2_token(b"k"));
        assert_eq!(verify_v2_authorization_now(Some(&fresh), b"k"), Ok(()));
    }
}

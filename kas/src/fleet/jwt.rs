//! JWTs other parties present to kas: kas pods to each other on the private API (HS256,
//! issuer and audience `gitlab-kas`, valid 5 s), GitLab on the API port (audience
//! `gitlab-kas`; the issuer is GitLab's host and not checked, as real kas).

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::gitlab::SharedSecret;

pub const KAS_ISSUER: &str = "gitlab-kas";
pub const KAS_AUDIENCE: &str = "gitlab-kas";
/// Validity of a private-API JWT (real kas: 5 s), and the not-before skew.
const VALIDITY_SECS: u64 = 5;
const SKEW_SECS: u64 = 5;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    iat: u64,
    nbf: u64,
    exp: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A JWT for another kas pod's private API.
pub fn sign_private_api(secret: &SharedSecret) -> Result<String, String> {
    sign(secret, KAS_ISSUER)
}

/// A JWT as GitLab sends to the API port (for tests and the GitLab stand-in).
pub fn sign(secret: &SharedSecret, issuer: &str) -> Result<String, String> {
    let now = now();
    let claims = Claims {
        iss: issuer.into(),
        aud: KAS_AUDIENCE.into(),
        iat: now,
        nbf: now.saturating_sub(SKEW_SECS),
        exp: now + VALIDITY_SECS,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.bytes()),
    )
    .map_err(|e| format!("cannot sign a kas JWT: {e}"))
}

/// Checks `authorization: Bearer <jwt>`: HMAC signature (HS256/384/512), audience
/// `gitlab-kas`, time window, and the issuer when `issuer` is given.
pub fn verify(
    metadata: &tonic::metadata::MetadataMap,
    secret: &SharedSecret,
    issuer: Option<&str>,
) -> Result<(), tonic::Status> {
    let unauthenticated = || tonic::Status::unauthenticated("unauthenticated");
    let header = metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(unauthenticated)?;
    let (scheme, token) = header.split_once(' ').ok_or_else(unauthenticated)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(unauthenticated());
    }
    let mut validation = Validation::new(Algorithm::HS256);
    validation.algorithms = vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
    validation.set_audience(&[KAS_AUDIENCE]);
    if let Some(issuer) = issuer {
        validation.set_issuer(&[issuer]);
        validation.set_required_spec_claims(&["exp", "aud", "iss"]);
    } else {
        validation.set_required_spec_claims(&["exp", "aud"]);
    }
    validation.validate_nbf = true;
    validation.leeway = SKEW_SECS;
    jsonwebtoken::decode::<serde_json::Value>(
        token.trim(),
        &DecodingKey::from_secret(secret.bytes()),
        &validation,
    )
    .map(|_| ())
    .map_err(|e| {
        tracing::debug!(error = %e, "JWT refused");
        unauthenticated()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(token: &str) -> tonic::metadata::MetadataMap {
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert("authorization", format!("Bearer {token}").parse().unwrap());
        md
    }

    #[test]
    fn issuer_and_secret_are_checked() {
        let secret = SharedSecret::generate();
        let kas = sign_private_api(&secret).unwrap();
        verify(&md(&kas), &secret, Some(KAS_ISSUER)).unwrap();
        let gitlab = sign(&secret, "gitlab.example.com").unwrap();
        verify(&md(&gitlab), &secret, None).unwrap();
        assert!(verify(&md(&gitlab), &secret, Some(KAS_ISSUER)).is_err());
        assert!(verify(&md(&kas), &SharedSecret::generate(), None).is_err());
        assert!(verify(&tonic::metadata::MetadataMap::new(), &secret, None).is_err());
    }
}

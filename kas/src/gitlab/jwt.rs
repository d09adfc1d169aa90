//! The `Gitlab-Kas-Api-Request` JWT that proves to GitLab a request comes from kas.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::SharedSecret;

pub const JWT_HEADER: &str = "Gitlab-Kas-Api-Request";
pub const JWT_ISSUER: &str = "gitlab-kas";
pub const JWT_AUDIENCE: &str = "gitlab";
/// GitLab's kas client uses these: short validity, small clock-skew allowance.
const VALIDITY_SECS: u64 = 30;
const NOT_BEFORE_SKEW_SECS: u64 = 5;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiRequestClaims {
    pub iss: String,
    pub aud: Vec<String>,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn sign_api_request_jwt(secret: &SharedSecret) -> Result<String, String> {
    let now = now_secs();
    let claims = ApiRequestClaims {
        iss: JWT_ISSUER.into(),
        aud: vec![JWT_AUDIENCE.into()],
        iat: now,
        nbf: now.saturating_sub(NOT_BEFORE_SKEW_SECS),
        exp: now + VALIDITY_SECS,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.bytes()),
    )
    .map_err(|e| format!("cannot sign GitLab API JWT: {e}"))
}

/// What GitLab does with the header: HS256 signature, issuer, audience and time window.
/// Used by the GitLab stand-in and by tests that check what kas sent.
pub fn verify_api_request_jwt(
    token: &str,
    secret: &SharedSecret,
) -> Result<ApiRequestClaims, String> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_issuer(&[JWT_ISSUER]);
    validation.set_audience(&[JWT_AUDIENCE]);
    validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud"]);
    validation.validate_nbf = true;
    validation.leeway = 0;
    jsonwebtoken::decode::<ApiRequestClaims>(
        token,
        &DecodingKey::from_secret(secret.bytes()),
        &validation,
    )
    .map(|data| data.claims)
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_token_verifies_only_with_the_same_secret() {
        let secret = SharedSecret::generate();
        let jwt = sign_api_request_jwt(&secret).unwrap();
        let claims = verify_api_request_jwt(&jwt, &secret).unwrap();
        assert_eq!(claims.iss, JWT_ISSUER);
        assert_eq!(claims.aud, vec![JWT_AUDIENCE.to_string()]);
        assert!(claims.exp - claims.iat <= 30);
        assert!(verify_api_request_jwt(&jwt, &SharedSecret::generate()).is_err());
    }
}

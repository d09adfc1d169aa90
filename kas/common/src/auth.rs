//! The agent token in `authorization: Bearer <token>`.
//!
//! kas authenticates with it and the edge keys per-token limits on it: if the two parsed it
//! differently, a client could pick a spelling (`BEARER`, extra spaces) that kas accepts but
//! the edge does not recognise, and walk around its per-token limit.

/// Why an `authorization` value carries no agent token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BearerError {
    /// Not `<scheme> <token>`.
    Malformed,
    /// A scheme other than `Bearer` (any case).
    NotBearer,
    /// `Bearer` followed by nothing but whitespace.
    Empty,
}

impl std::fmt::Display for BearerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BearerError::Malformed => "authorization must be `Bearer <token>`",
            BearerError::NotBearer => "authorization scheme must be `Bearer`",
            BearerError::Empty => "authorization carries an empty bearer token",
        })
    }
}

impl std::error::Error for BearerError {}

/// The token of an `authorization` value: scheme `Bearer` in any case, one space, then the
/// token with surrounding whitespace trimmed.
pub fn bearer_token(value: &str) -> Result<&str, BearerError> {
    let (scheme, token) = value.split_once(' ').ok_or(BearerError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(BearerError::NotBearer);
    }
    match token.trim() {
        "" => Err(BearerError::Empty),
        token => Ok(token),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_in_any_case_and_token_trimmed() {
        for value in [
            "Bearer t0k",
            "bearer t0k",
            "BEARER t0k",
            "BeArEr   t0k  ",
            "Bearer \tt0k",
        ] {
            assert_eq!(bearer_token(value), Ok("t0k"), "{value:?}");
        }
    }

    #[test]
    fn anything_else_is_not_a_token() {
        assert_eq!(bearer_token("Bearer"), Err(BearerError::Malformed));
        assert_eq!(bearer_token("t0k"), Err(BearerError::Malformed));
        assert_eq!(bearer_token("Basic dXNlcg=="), Err(BearerError::NotBearer));
        assert_eq!(bearer_token(" Bearer t0k"), Err(BearerError::NotBearer));
        assert_eq!(bearer_token("Bearer    "), Err(BearerError::Empty));
    }
}

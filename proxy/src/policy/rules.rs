//! Header rules from `policies/rules.toml`: deny requests whose headers match, like a Cloud
//! Armor expression `request.headers['User-Agent'].contains('badUser')`. Checked per request
//! (a websocket upgrade, each gRPC stream); answered 403, or `grpc-status: 7` for gRPC.
//!
//! ```toml
//! [[deny]]
//! name = "bad-user-agent"       # shows in logs and metrics
//! header = "user-agent"         # case-insensitive
//! contains = "badUser"          # or: equals = "...", prefix = "..."
//! preview = false               # true: count and log matches, do not block
//! ```

use std::path::Path;

use serde::Deserialize;

use crate::policy::file::{self as policy_file, PolicyFileError};

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    deny: Vec<RuleSpec>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    name: String,
    header: String,
    #[serde(default)]
    contains: Option<String>,
    #[serde(default)]
    equals: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    preview: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Match {
    Contains(String),
    Equals(String),
    Prefix(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    header: http::HeaderName,
    matcher: Match,
    pub preview: bool,
}

impl Rule {
    fn matches(&self, headers: &http::HeaderMap) -> bool {
        headers.get_all(&self.header).iter().any(|value| {
            let value = String::from_utf8_lossy(value.as_bytes());
            match &self.matcher {
                Match::Contains(s) => value.contains(s.as_str()),
                Match::Equals(s) => value == s.as_str(),
                Match::Prefix(s) => value.starts_with(s.as_str()),
            }
        })
    }
}

/// A parsed rules file; the first matching rule decides.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeaderRules {
    rules: Vec<Rule>,
}

impl HeaderRules {
    pub fn parse(label: &str, text: &str) -> Result<Self, PolicyFileError> {
        let invalid = |message: String| policy_file::invalid(label, message);
        let file: RulesFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let mut rules = Vec::with_capacity(file.deny.len());
        for (i, spec) in file.deny.into_iter().enumerate() {
            let at = format!("deny[{i}] ({:?})", spec.name);
            let header =
                http::HeaderName::from_bytes(spec.header.trim().as_bytes()).map_err(|_| {
                    invalid(format!(
                        "{at}: field `header`: {:?} is not a header name",
                        spec.header
                    ))
                })?;
            let matcher = match (spec.contains, spec.equals, spec.prefix) {
                (Some(s), None, None) => Match::Contains(s),
                (None, Some(s), None) => Match::Equals(s),
                (None, None, Some(s)) => Match::Prefix(s),
                _ => {
                    return Err(invalid(format!(
                        "{at}: exactly one of `contains`, `equals`, `prefix` is required"
                    )))
                }
            };
            if matches!(&matcher, Match::Contains(s) | Match::Prefix(s) if s.is_empty()) {
                return Err(invalid(format!(
                    "{at}: an empty pattern would match every request"
                )));
            }
            rules.push(Rule {
                name: spec.name,
                header,
                matcher,
                preview: spec.preview,
            });
        }
        Ok(Self { rules })
    }

    pub fn load(path: &Path) -> Result<Self, PolicyFileError> {
        policy_file::load(path, Self::parse)
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The first rule whose header matches.
    pub fn check(&self, headers: &http::HeaderMap) -> Option<&Rule> {
        self.rules.iter().find(|r| r.matches(headers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(ua: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::USER_AGENT, ua.parse().unwrap());
        h
    }

    #[test]
    fn matches_like_a_cloud_armor_expression() {
        let rules = HeaderRules::parse(
            "rules.toml",
            "[[deny]]\nname = \"bad\"\nheader = \"User-Agent\"\ncontains = \"badUser\"\n\
             [[deny]]\nname = \"old-agent\"\nheader = \"user-agent\"\nprefix = \"gitlab-agent/v15.\"\npreview = true\n",
        )
        .unwrap();
        assert_eq!(rules.check(&headers("x badUser y")).unwrap().name, "bad");
        let old = rules.check(&headers("gitlab-agent/v15.1.0/abc")).unwrap();
        assert!(old.preview);
        assert!(rules.check(&headers("gitlab-agent/v17.0.0/abc")).is_none());
        assert!(rules.check(&http::HeaderMap::new()).is_none());
    }

    #[test]
    fn bad_files_name_the_rule_and_field() {
        for (text, needle) in [
            (
                "[[deny]]\nname = \"a\"\nheader = \"bad header\"\ncontains = \"x\"\n",
                "field `header`",
            ),
            (
                "[[deny]]\nname = \"a\"\nheader = \"ua\"\n",
                "exactly one of",
            ),
            (
                "[[deny]]\nname = \"a\"\nheader = \"ua\"\ncontains = \"\"\n",
                "every request",
            ),
            ("[[deny]]\nname = \"a\"\nheadr = \"ua\"\n", "headr"),
        ] {
            let err = HeaderRules::parse("rules.toml", text)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(needle) && err.starts_with("rules.toml"),
                "{err}"
            );
        }
    }
}

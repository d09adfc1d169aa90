//! kas's `HeaderExtra` turned into `Impersonate-*` headers, as agentk does by handing the
//! `ImpersonationConfig` to client-go: `Impersonate-User`, one `Impersonate-Group` per
//! group, `Impersonate-Uid`, one `Impersonate-Extra-<key>` per value with the key
//! percent-encoded where a header name cannot carry it (`agent.gitlab.com/id` →
//! `agent.gitlab.com%2Fid`). Doing it here puts that mapping under test too, though the
//! contract at kas's boundary is the `HeaderExtra` itself.

use http::{HeaderMap, HeaderName, HeaderValue};
use kas_proto::kubernetes_api::{HeaderExtra, ImpersonationConfig};
use kas_proto::HEADER_EXTRA_TYPE_URL;
use prost::Message as _;

/// The impersonation kas asked for: `None` without an `extra`, `Err` if `extra` is not a
/// `HeaderExtra` that decodes.
pub fn config(extra: Option<&prost_types::Any>) -> Result<Option<ImpersonationConfig>, String> {
    let Some(any) = extra else {
        return Ok(None);
    };
    if any.type_url != HEADER_EXTRA_TYPE_URL {
        return Err(format!("unexpected extra type {:?}", any.type_url));
    }
    let extra = HeaderExtra::decode(any.value.as_slice())
        .map_err(|e| format!("HeaderExtra does not decode: {e}"))?;
    Ok(extra.imp_config.filter(|c| !is_empty(c)))
}

fn is_empty(c: &ImpersonationConfig) -> bool {
    c.username.is_empty() && c.groups.is_empty() && c.uid.is_empty() && c.extra.is_empty()
}

/// Whether the request impersonates on its own (client-side `--as`).
pub fn requested_by_client(headers: &HeaderMap) -> bool {
    headers
        .keys()
        .any(|k| k.as_str().starts_with("impersonate-"))
}

/// Adds the headers client-go sends for `config`.
pub fn apply(config: &ImpersonationConfig, headers: &mut HeaderMap) -> Result<(), String> {
    let mut add = |name: &str, value: &str| -> Result<(), String> {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| format!("impersonation header name {name:?}: {e}"))?;
        let value = HeaderValue::from_str(value)
            .map_err(|e| format!("impersonation header value {value:?}: {e}"))?;
        headers.append(name, value);
        Ok(())
    };
    if !config.username.is_empty() {
        add("Impersonate-User", &config.username)?;
    }
    if !config.uid.is_empty() {
        add("Impersonate-Uid", &config.uid)?;
    }
    for group in &config.groups {
        add("Impersonate-Group", group)?;
    }
    for extra in &config.extra {
        let name = format!("Impersonate-Extra-{}", escape_key(&extra.key));
        for value in &extra.val {
            add(&name, value)?;
        }
    }
    Ok(())
}

/// client-go's escaping of extra keys: every byte that is not a header-name token byte, and
/// `%` itself, as `%XX`.
fn escape_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        let token = b.is_ascii_alphanumeric() || b"!#$&'*+-.^_`|~".contains(&b);
        if token {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kas_proto::kubernetes_api::ExtraKeyVal;

    #[test]
    fn maps_like_client_go() {
        let config = ImpersonationConfig {
            username: "gitlab:ci_job:7".into(),
            groups: vec!["gitlab:ci_job".into(), "gitlab:project:3".into()],
            uid: "u-1".into(),
            extra: vec![ExtraKeyVal {
                key: "agent.gitlab.com/id".into(),
                val: vec!["42".into(), "x%y".into()],
            }],
        };
        let mut headers = HeaderMap::new();
        apply(&config, &mut headers).unwrap();
        assert_eq!(headers["impersonate-user"], "gitlab:ci_job:7");
        assert_eq!(headers["impersonate-uid"], "u-1");
        let groups: Vec<_> = headers.get_all("impersonate-group").iter().collect();
        assert_eq!(groups, ["gitlab:ci_job", "gitlab:project:3"]);
        let extra: Vec<_> = headers
            .get_all("impersonate-extra-agent.gitlab.com%2fid")
            .iter()
            .collect();
        assert_eq!(extra, ["42", "x%y"]);
        assert_eq!(escape_key("a%b c"), "a%25b%20c");
    }

    #[test]
    fn decodes_only_header_extra() {
        let extra = HeaderExtra {
            imp_config: Some(ImpersonationConfig {
                username: "u".into(),
                ..Default::default()
            }),
        };
        let any = prost_types::Any {
            type_url: HEADER_EXTRA_TYPE_URL.into(),
            value: extra.encode_to_vec(),
        };
        assert_eq!(config(Some(&any)).unwrap().unwrap().username, "u");
        assert!(config(None).unwrap().is_none());
        let wrong = prost_types::Any {
            type_url: "type.googleapis.com/other".into(),
            value: vec![],
        };
        assert!(config(Some(&wrong)).is_err());
        let garbage = prost_types::Any {
            type_url: HEADER_EXTRA_TYPE_URL.into(),
            value: vec![0xff, 0xff],
        };
        assert!(config(Some(&garbage)).is_err());
    }
}

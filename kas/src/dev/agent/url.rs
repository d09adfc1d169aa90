//! The request URL the agent rebuilds from kas's decoded path and query, escaped as Go's
//! `net/url` does (agentk sets `URL.Path` and `URL.RawQuery = query.Encode()`).

use std::collections::{BTreeMap, HashMap};

use kas_proto::prototool::Values;

/// `base` (no trailing slash needed) + escaped `path` + `?` + encoded `query`.
pub fn build(base: &str, path: &str, query: &HashMap<String, Values>) -> String {
    let mut url = base.trim_end_matches('/').to_owned();
    if !path.starts_with('/') {
        url.push('/');
    }
    url.push_str(&escape_path(path));
    let encoded = encode_query(query);
    if !encoded.is_empty() {
        url.push('?');
        url.push_str(&encoded);
    }
    url
}

/// Keys sorted, each key's values in order, as `url.Values.Encode`.
pub fn encode_query(query: &HashMap<String, Values>) -> String {
    let sorted: BTreeMap<_, _> = query.iter().collect();
    let mut parts = Vec::new();
    for (key, values) in sorted {
        for value in &values.value {
            parts.push(format!("{}={}", escape_query(key), escape_query(value)));
        }
    }
    parts.join("&")
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~')
}

/// Query component: space as `+`, everything not unreserved as `%XX`.
fn escape_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b' ' => out.push('+'),
            b if unreserved(b) => out.push(char::from(b)),
            b => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Path: `/` and the characters a path segment may hold stay, the rest as `%XX`.
fn escape_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let keep = unreserved(b)
            || matches!(
                b,
                b'/' | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b':'
                    | b'@'
            );
        if keep {
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

    fn values(v: &[&str]) -> Values {
        Values {
            value: v.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn rebuilds_like_go() {
        let query = HashMap::from([
            ("watch".to_owned(), values(&["1"])),
            ("command".to_owned(), values(&["sh", "-c", "exit 3"])),
            ("labelSelector".to_owned(), values(&["app=web,tier in (a)"])),
        ]);
        assert_eq!(
            build("http://h:1/", "/api/v1/namespaces/a b/pods", &query),
            "http://h:1/api/v1/namespaces/a%20b/pods?command=sh&command=-c&command=exit+3\
             &labelSelector=app%3Dweb%2Ctier+in+%28a%29&watch=1"
        );
        assert_eq!(
            build("http://h:1", "/version", &HashMap::new()),
            "http://h:1/version"
        );
    }
}

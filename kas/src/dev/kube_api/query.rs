//! Query strings, decoded leniently: a stand-in must not fail on odd input, so a malformed
//! escape is kept as it came.

/// `a=1&b=x%20y&c` → `[("a","1"), ("b","x y"), ("c","")]`.
pub fn pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

/// The first value of `name`.
pub fn get(query: &str, name: &str) -> Option<String> {
    pairs(query)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

/// Whether `name` is set to a true value (`1`, `true`), as the API server parses booleans.
pub fn flag(query: &str, name: &str) -> bool {
    matches!(
        get(query, name).as_deref(),
        Some("1" | "true" | "True" | "TRUE")
    )
}

/// Percent-decoding with `+` as space (form encoding, as Go's `url.ParseQuery`).
pub fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_pairs_and_keeps_bad_escapes() {
        assert_eq!(
            pairs("command=sh&command=-c&command=exit%203&x=a+b&flag&bad=%zz&end=%4"),
            vec![
                ("command".into(), "sh".into()),
                ("command".into(), "-c".into()),
                ("command".into(), "exit 3".into()),
                ("x".into(), "a b".into()),
                ("flag".into(), String::new()),
                ("bad".into(), "%zz".into()),
                ("end".into(), "%4".into()),
            ]
        );
        assert!(flag("watch=1", "watch"));
        assert!(flag("a=2&watch=true", "watch"));
        assert!(!flag("watch=0", "watch"));
    }
}

//! The names discovery and the blocklist ConfigMap send to DNS or the Kubernetes API,
//! checked when the configuration is validated (here, so `check` needs nothing from the
//! upstream or policy layers): a name that cannot be valid is a configuration error
//! (`kas-edge check` and start-up), not a retry loop that keeps the edge unready.

/// A Kubernetes DNS-1123 label: namespaces and port names. 1–63 characters of lower-case
/// letters, digits and `-`, starting and ending with a letter or digit.
pub fn dns_label(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 63 {
        return Err("must be 1-63 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("only lower-case letters, digits and '-' are allowed");
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

/// A Service name (DNS-1035 label): a DNS-1123 label that starts with a letter.
pub fn service_name(s: &str) -> Result<(), &'static str> {
    dns_label(s)?;
    if !s.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err("a Service name must start with a lower-case letter");
    }
    Ok(())
}

/// A Kubernetes object name (DNS-1123 subdomain), such as a ConfigMap's: at most 253
/// characters, dot-separated DNS-1123 labels.
pub fn object_name(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 253 {
        return Err("must be 1-253 characters");
    }
    s.split('.')
        .try_for_each(dns_label)
        .map_err(|_| "lower-case letters, digits, '-' and '.', each dot-separated part starting and ending with a letter or digit")
}

/// A ConfigMap key: 1–253 letters, digits, `-`, `_` or `.`, and not `.` or `..`.
pub fn configmap_key(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 253 {
        return Err("must be 1-253 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("only letters, digits, '-', '_' and '.' are allowed");
    }
    if s == "." || s == ".." {
        return Err("must not be '.' or '..'");
    }
    Ok(())
}

/// A host name the system resolver can look up (or an IP address literal): dot-separated
/// labels of 1–63 letters, digits, `-` or `_`, at most 253 characters, one optional
/// trailing dot. No port, scheme or path.
pub fn dns_name(s: &str) -> Result<(), &'static str> {
    if s.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    if s.is_empty() {
        return Err("must not be empty");
    }
    if s.contains(':') {
        return Err("a host name only: the port goes in discovery.port");
    }
    let name = s.strip_suffix('.').unwrap_or(s);
    if name.is_empty() || name.len() > 253 {
        return Err("must be 1-253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("every dot-separated label must be 1-63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("only letters, digits, '-', '_' and '.' are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label must not start or end with '-'");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_service_names() {
        for good in ["kas", "kas-1", "a", "0ns"] {
            assert!(dns_label(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Kas",
            "kas_1",
            "-kas",
            "kas-",
            "kas.svc",
            &"k".repeat(64),
        ] {
            assert!(dns_label(bad).is_err(), "{bad}");
        }
        assert!(service_name("kas").is_ok());
        assert!(service_name("0kas").is_err());
    }

    #[test]
    fn object_names_and_configmap_keys() {
        let longest = format!("{0}.{0}.{0}.{1}", "k".repeat(63), "k".repeat(61));
        for good in ["kas-edge-blocklist", "a", "kas.edge.v1", &longest] {
            assert!(object_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Kas",
            "kas_edge",
            "kas..edge",
            ".kas",
            "kas-",
            &format!("{longest}k"),
        ] {
            assert!(object_name(bad).is_err(), "{bad}");
        }
        for good in ["blocklist.txt", "BLOCK_list-1", ".hidden"] {
            assert!(configmap_key(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "a b", &"k".repeat(254)] {
            assert!(configmap_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn host_names() {
        for good in [
            "kas",
            "kas.gitlab.svc.cluster.local.",
            "_agent._tcp.kas",
            "KAS.example",
            "192.0.2.1",
            "2001:db8::1",
        ] {
            assert!(dns_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "kas..svc",
            ".kas",
            "kas:8150",
            "http://kas",
            "kas svc",
            "-kas",
            "kas-.svc",
            "kas/x",
            "ka\u{e9}s",
        ] {
            assert!(dns_name(bad).is_err(), "{bad:?}");
        }
        assert!(dns_name(&format!("{}.x", "a".repeat(64))).is_err());
        let long = vec!["a".repeat(63); 4].join(".");
        assert!(dns_name(&long).is_err(), "255 characters");
    }
}

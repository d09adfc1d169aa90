//! Reading numbers out of a Prometheus text exposition, as the tests assert on them.

/// The sum of every sample whose series starts with `prefix`: a full series name with its
/// labels (`edge_requests_total{protocol="grpc",status="200"}`), or a name with some of its
/// labels (`edge_policy_blocked_total{reason="blocklist"`) to add up the rest. 0 when none.
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The value of the unlabelled series `name`, if it is there.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP edge_ready 1 while ready.\n\
                        edge_ready 1\n\
                        edge_ready_total 7\n\
                        edge_blocked{reason=\"a\",source=\"x\"} 2\n\
                        edge_blocked{reason=\"a\",source=\"y\"} 3\n\
                        edge_blocked{reason=\"b\",source=\"x\"} 5\n";

    #[test]
    fn sums_the_series_under_a_prefix() {
        assert_eq!(metric(TEXT, "edge_blocked{reason=\"a\""), 5.0);
        assert_eq!(metric(TEXT, "edge_blocked{reason=\"b\",source=\"x\"}"), 5.0);
        assert_eq!(metric(TEXT, "edge_missing"), 0.0);
    }

    #[test]
    fn reads_one_unlabelled_series_exactly() {
        assert_eq!(metric_value(TEXT, "edge_ready"), Some(1.0));
        assert_eq!(metric_value(TEXT, "edge_ready_total"), Some(7.0));
        assert_eq!(metric_value(TEXT, "edge_missing"), None);
    }
}

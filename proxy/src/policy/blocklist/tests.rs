use super::*;
use proptest::prelude::*;
use std::cmp::Reverse;
use std::net::{Ipv4Addr, Ipv6Addr};

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn net(text: &str) -> IpNet {
    text.parse().unwrap()
}

fn list(text: &str) -> Blocklist {
    Blocklist::parse("blocklist.txt", text).unwrap()
}

fn problems(text: &str) -> Vec<(usize, LineProblem)> {
    let err = Blocklist::parse("blocklist.txt", text).unwrap_err();
    err.bad_lines()
        .iter()
        .map(|bad| (bad.line, bad.problem.clone()))
        .collect()
}

/// The verdict reduced to (kind, deciding line) for easy comparison.
fn outcome(verdict: Verdict<'_>) -> (char, Option<usize>) {
    match verdict {
        Verdict::Allow => ('A', None),
        Verdict::Deny(e) => ('D', Some(e.line)),
        Verdict::Preview(e) => ('P', Some(e.line)),
    }
}

#[test]
fn empty_and_comment_only_files_allow_everyone() {
    for text in ["", "\n\n", "# nothing yet\n   \n\t# indented comment\n"] {
        let list = list(text);
        assert!(list.is_empty());
        assert_eq!(list.check(ip("192.0.2.1")), Verdict::Allow);
        assert_eq!(list.check(ip("2001:db8::1")), Verdict::Allow);
    }
}

#[test]
fn bare_addresses_and_networks_deny() {
    let list = list(
        "192.0.2.7\n198.51.100.0/24 # scraping, INC-1234, until 2025-07-01\n\
             2001:db8::1\n2001:db8:1::/48\n",
    );
    assert_eq!(list.len(), 4);
    let Verdict::Deny(entry) = list.check(ip("198.51.100.77")) else {
        panic!("expected deny");
    };
    assert_eq!(
        entry,
        &Entry {
            net: net("198.51.100.0/24"),
            kind: EntryKind::Deny,
            line: 2,
            note: Some("scraping, INC-1234, until 2025-07-01".to_owned()),
        }
    );
    assert_eq!(outcome(list.check(ip("192.0.2.7"))), ('D', Some(1)));
    assert_eq!(outcome(list.check(ip("192.0.2.8"))), ('A', None));
    assert_eq!(outcome(list.check(ip("2001:db8::1"))), ('D', Some(3)));
    assert_eq!(outcome(list.check(ip("2001:db8::2"))), ('A', None));
    assert_eq!(outcome(list.check(ip("2001:db8:1:ff::9"))), ('D', Some(4)));
    assert_eq!(list.check(ip("192.0.2.7")).entry().unwrap().note, None);
}

#[test]
fn ipv4_mapped_clients_match_ipv4_entries() {
    let list = list("192.0.2.0/24\n::ffff:203.0.113.0/120\n");
    assert!(list.check(ip("::ffff:192.0.2.9")).is_deny());
    assert!(list.check(ip("203.0.113.5")).is_deny());
    assert!(list.check(ip("::ffff:203.0.113.5")).is_deny());
    let entry = list.check(ip("203.0.113.5")).entry().unwrap().clone();
    assert_eq!(entry.net, net("203.0.113.0/24"));
    // Only the mapped form counts, not the deprecated compatible one.
    assert!(!list.check(ip("::192.0.2.9")).is_deny());
}

#[test]
fn most_specific_entry_wins_and_allow_wins_ties() {
    let list = list(
        "10.0.0.0/8\n\
             allow 10.1.0.0/16\n\
             10.1.2.0/24\n\
             allow 10.1.2.3\n\
             172.16.0.0/12\n\
             allow 172.16.0.0/12\n\
             172.16.0.0/12\n",
    );
    assert_eq!(outcome(list.check(ip("10.9.9.9"))), ('D', Some(1)));
    assert_eq!(outcome(list.check(ip("10.1.9.9"))), ('A', None));
    assert_eq!(outcome(list.check(ip("10.1.2.9"))), ('D', Some(3)));
    assert_eq!(outcome(list.check(ip("10.1.2.3"))), ('A', None));
    assert_eq!(outcome(list.check(ip("172.20.0.1"))), ('A', None));
    assert_eq!(list.len(), 7);
}

#[test]
fn duplicate_entries_report_the_first_line() {
    let list = list("192.0.2.0/24 # first\n192.0.2.0/24 # second\n");
    let entry = list.check(ip("192.0.2.1")).entry().unwrap().clone();
    assert_eq!((entry.line, entry.note.as_deref()), (1, Some("first")));
}

#[test]
fn previews_report_but_never_change_the_outcome() {
    let list = list(
        "preview 192.0.2.0/24 # trying it out\n\
             allow 192.0.2.128/25\n\
             198.51.100.0/24\n\
             preview 198.51.100.0/28\n\
             preview 203.0.113.0/24\n\
             203.0.113.0/24\n\
             allow 2001:db8::/32\n\
             preview 2001:db8:5::/48\n",
    );
    let Verdict::Preview(entry) = list.check(ip("192.0.2.1")) else {
        panic!("expected preview");
    };
    assert_eq!(entry.kind, EntryKind::Preview);
    assert_eq!(entry.note.as_deref(), Some("trying it out"));
    // An allow more specific than the preview means it would not block.
    assert_eq!(outcome(list.check(ip("192.0.2.200"))), ('A', None));
    // A preview inside an enforced deny does not unblock anyone.
    assert_eq!(outcome(list.check(ip("198.51.100.1"))), ('D', Some(3)));
    // A deny for the same network outranks the preview.
    assert_eq!(outcome(list.check(ip("203.0.113.1"))), ('D', Some(6)));
    // A preview more specific than an allow would block.
    assert_eq!(outcome(list.check(ip("2001:db8:5::1"))), ('P', Some(8)));
    assert_eq!(outcome(list.check(ip("2001:db8:6::1"))), ('A', None));
}

#[test]
fn keywords_are_case_insensitive_and_whitespace_is_flexible() {
    let list = list(
        "  ALLOW\t192.0.2.1  \r\nPreView 192.0.2.0/24\r\n\
             EveryThing ::/0#no space before the comment\n",
    );
    assert_eq!(outcome(list.check(ip("192.0.2.1"))), ('A', None));
    assert_eq!(outcome(list.check(ip("192.0.2.2"))), ('P', Some(2)));
    let entry = list.check(ip("2001:db8::1")).entry().unwrap().clone();
    assert_eq!(entry.line, 3);
    assert_eq!(entry.note.as_deref(), Some("no space before the comment"));
}

#[test]
fn byte_order_mark_is_ignored() {
    let list = list("\u{feff}192.0.2.1\n");
    assert!(list.check(ip("192.0.2.1")).is_deny());
}

#[test]
fn everything_needs_the_marker() {
    assert_eq!(
        problems("0.0.0.0/0\npreview ::/0\n::ffff:0:0/96\nallow 0.0.0.0/0\n"),
        vec![
            (
                1,
                LineProblem::CoversEverything {
                    token: "0.0.0.0/0".into(),
                    family: "IPv4"
                }
            ),
            (
                2,
                LineProblem::CoversEverything {
                    token: "::/0".into(),
                    family: "IPv6"
                }
            ),
            (
                3,
                LineProblem::CoversEverything {
                    token: "::ffff:0:0/96".into(),
                    family: "IPv4"
                }
            ),
            (
                4,
                LineProblem::CoversEverything {
                    token: "0.0.0.0/0".into(),
                    family: "IPv4"
                }
            ),
        ]
    );
    let list = list(
        "everything 0.0.0.0/0  # incident 123\n\
             preview everything ::/0\n\
             allow 192.0.2.1\n",
    );
    assert_eq!(outcome(list.check(ip("8.8.8.8"))), ('D', Some(1)));
    assert_eq!(outcome(list.check(ip("::ffff:8.8.8.8"))), ('D', Some(1)));
    assert_eq!(outcome(list.check(ip("192.0.2.1"))), ('A', None));
    assert_eq!(outcome(list.check(ip("2001:db8::1"))), ('P', Some(2)));
    assert_eq!(
        problems("everything 10.0.0.0/8\n"),
        vec![(1, LineProblem::NeedlessEverything("10.0.0.0/8".into()))]
    );
}

#[test]
fn host_bits_are_refused_with_a_suggestion() {
    let err = Blocklist::parse("blocklist.txt", "10.1.2.3/8\n2001:db8::1/32\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        "blocklist.txt:1: \"10.1.2.3/8\" has host bits set, did you mean 10.0.0.0/8\n\
             blocklist.txt:2: \"2001:db8::1/32\" has host bits set, did you mean 2001:db8::/32"
    );
}

#[test]
fn every_bad_line_is_reported() {
    let text = "# header\n192.0.2.1\n\
                    10.0.0.300\n\
                    deny 192.0.2.2\n\
                    192.0.2.3 allow\n\
                    192.0.2.4 extra\n\
                    allow allow 192.0.2.5\n\
                    allow preview 192.0.2.6\n\
                    allow # nothing\n\
                    10.0.0.0/33\n\
                    10.0.0.0/\n\
                    10.0.0.0/x\n\
                    2001:db8::/129\n\
                    fe80::1%eth0\n\
                    10.0.0.0/8 10.0.0.0/8\n";
    let err = Blocklist::parse("blocklist.txt", text).unwrap_err();
    let lines: Vec<_> = err.bad_lines().iter().map(|b| b.line).collect();
    assert_eq!(lines, (3..=15).collect::<Vec<_>>());
    assert_eq!(err.bad_lines()[0].text, "10.0.0.300");
    let shown = err.to_string();
    let shown: Vec<&str> = shown.lines().collect();
    assert_eq!(
            shown,
            [
                "blocklist.txt:3: \"10.0.0.300\" is not an IP address or CIDR",
                "blocklist.txt:4: unknown keyword \"deny\"; expected allow, preview or everything before the address",
                "blocklist.txt:5: keyword \"allow\" must come before the address \"192.0.2.3\"",
                "blocklist.txt:6: unexpected \"extra\" after the address; only a # comment may follow it",
                "blocklist.txt:7: keyword \"allow\" appears twice",
                "blocklist.txt:8: \"preview\" applies only to deny entries and cannot be combined with \"allow\"",
                "blocklist.txt:9: keywords but no address",
                "blocklist.txt:10: \"10.0.0.0/33\" has a prefix length outside 0..=32",
                "blocklist.txt:11: \"10.0.0.0/\" is not an IP address or CIDR",
                "blocklist.txt:12: \"10.0.0.0/x\" is not an IP address or CIDR",
                "blocklist.txt:13: \"2001:db8::/129\" has a prefix length outside 0..=128",
                "blocklist.txt:14: \"fe80::1%eth0\" is not an IP address or CIDR",
                "blocklist.txt:15: unexpected \"10.0.0.0/8\" after the address; only a # comment may follow it",
            ]
        );
}

#[test]
fn display_is_capped_but_every_line_is_kept() {
    let text = "bad.\n".repeat(MAX_DISPLAYED_BAD_LINES + 5);
    let err = Blocklist::parse("b", &text).unwrap_err();
    assert_eq!(err.bad_lines().len(), MAX_DISPLAYED_BAD_LINES + 5);
    let shown = err.to_string();
    assert_eq!(shown.lines().count(), MAX_DISPLAYED_BAD_LINES + 1);
    assert!(shown.ends_with("b: ... and 5 more bad lines"), "{shown}");
}

#[test]
fn size_limits() {
    let long = format!("192.0.2.1 # {}\n10.0.0.1\n", "x".repeat(MAX_LINE_BYTES));
    let err = Blocklist::parse("b", &long).unwrap_err();
    assert_eq!(err.bad_lines().len(), 1);
    let bad = &err.bad_lines()[0];
    assert_eq!(bad.line, 1);
    assert!(bad.text.len() < 100 && bad.text.ends_with("..."));
    assert_eq!(
        err.to_string(),
        format!(
            "b:1: line is {} bytes long, over the limit of 4096 bytes",
            MAX_LINE_BYTES + 12
        )
    );
    // Exactly at the limit is fine.
    let at_limit = format!("192.0.2.1 #{}", "x".repeat(MAX_LINE_BYTES - 11));
    assert_eq!(at_limit.len(), MAX_LINE_BYTES);
    assert_eq!(list(&at_limit).len(), 1);

    let huge = vec![b'#'; MAX_FILE_BYTES + 1];
    let err = parse_bytes("b", &huge).unwrap_err();
    assert!(matches!(err, BlocklistError::TooLarge { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "b: the blocklist is 16777217 bytes, over the limit of 16777216 bytes"
    );
}

#[test]
fn invalid_utf8_is_a_line_error() {
    let err = parse_bytes("b", b"192.0.2.1\n10.0.0.1 # caf\xe9\n").unwrap_err();
    assert_eq!(err.to_string(), "b:2: line is not valid UTF-8");
    assert_eq!(err.bad_lines()[0].text, "10.0.0.1 # caf\u{fffd}");
}

fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("blocklist-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn load_file_labels_errors_with_the_path() {
    let dir = scratch_dir("load");
    let path = dir.join("blocklist.txt");
    std::fs::write(&path, "192.0.2.1\n10.0.0.300\n").unwrap();
    let err = load_file(&path).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}:2: \"10.0.0.300\" is not an IP address or CIDR",
            path.display()
        )
    );

    std::fs::write(&path, "192.0.2.1\n").unwrap();
    assert!(load_file(&path).unwrap().check(ip("192.0.2.1")).is_deny());

    let missing = dir.join("missing.txt");
    let err = load_file(&missing).unwrap_err();
    assert!(matches!(err, BlocklistError::Read { .. }));
    assert!(
        err.to_string().starts_with(&format!(
            "{}: cannot read the blocklist: ",
            missing.display()
        )),
        "{err}"
    );

    let big = dir.join("big.txt");
    let file = std::fs::File::create(&big).unwrap();
    file.set_len(MAX_FILE_BYTES as u64 + 10).unwrap();
    drop(file);
    let err = load_file(&big).unwrap_err();
    assert!(
        matches!(err, BlocklistError::TooLarge { size, .. } if size == MAX_FILE_BYTES as u64 + 10)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn digest_follows_the_text_and_fits_a_prometheus_sample() {
    let a = list("192.0.2.1\n");
    assert_eq!(a.digest(), content_digest(b"192.0.2.1\n"));
    assert_eq!(a.digest(), list("192.0.2.1\n").digest());
    // Same entries, different text: a different list as far as replicas go.
    assert_ne!(a.digest(), list("192.0.2.1  # note\n").digest());
    assert_ne!(
        list("").digest(),
        0,
        "an empty list from a source is not 'no list'"
    );
    assert_eq!(Blocklist::default().digest(), 0);
    for text in ["", "x", "192.0.2.1\n"] {
        let d = content_digest(text.as_bytes());
        assert!(d < 1 << 52, "{d:x}");
        assert_eq!(d as f64 as u64, d, "exact as an f64");
    }
    assert!(format!("{a:?}").contains("digest"));

    fn send_sync<T: Send + Sync>() {}
    send_sync::<Blocklist>();
}

#[test]
fn addresses_and_lines_for_edits() {
    assert_eq!(parse_address("192.0.2.7").unwrap(), net("192.0.2.7/32"));
    assert_eq!(
        parse_address("::ffff:192.0.2.7").unwrap(),
        net("192.0.2.7/32")
    );
    assert_eq!(
        parse_address("10.1.2.3/8").unwrap_err().to_string(),
        "\"10.1.2.3/8\" has host bits set, did you mean 10.0.0.0/8"
    );
    assert_eq!(
        line_entry("allow 198.51.100.9  # partner\r"),
        Some((net("198.51.100.9/32"), EntryKind::Allow))
    );
    assert_eq!(line_entry("# 192.0.2.1"), None);
    assert_eq!(line_entry("10.0.0.300"), None);
}

#[test]
fn ranges_are_merged_and_cover_the_edges() {
    let list = list(
        "0.0.0.0/8\n0.0.0.0/16\n255.255.255.255\n10.0.0.0/9\n10.128.0.0/9\n\
             everything ::/0\nallow ffff::/16\n",
    );
    assert_eq!(outcome(list.check(ip("0.0.0.0"))), ('D', Some(2)));
    assert_eq!(outcome(list.check(ip("0.1.0.0"))), ('D', Some(1)));
    assert_eq!(outcome(list.check(ip("1.0.0.0"))), ('A', None));
    assert_eq!(outcome(list.check(ip("255.255.255.254"))), ('A', None));
    assert_eq!(outcome(list.check(ip("255.255.255.255"))), ('D', Some(3)));
    assert_eq!(outcome(list.check(ip("10.127.255.255"))), ('D', Some(4)));
    assert_eq!(outcome(list.check(ip("10.128.0.0"))), ('D', Some(5)));
    assert_eq!(outcome(list.check(ip("::"))), ('D', Some(6)));
    assert_eq!(outcome(list.check(ip("fffe:ffff::"))), ('D', Some(6)));
    assert_eq!(outcome(list.check(ip("ffff:ffff::"))), ('A', None));
    assert_eq!(
        outcome(list.check(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"))),
        ('A', None)
    );
    // Adjacent ranges with the same verdict are stored once.
    let list = super::tests::list("allow 10.0.0.0/8\nallow 10.1.0.0/16\n");
    assert_eq!(list.v4.starts, vec![0]);
    let list = super::tests::list("10.0.0.0/9\n10.128.0.0/9\n# x\n11.0.0.0/8\n");
    assert_eq!(
        list.v4.starts,
        vec![0, 0x0A00_0000, 0x0A80_0000, 0x0B00_0000, 0x0C00_0000]
    );
    let list = super::tests::list("preview 10.0.0.0/8\npreview 10.1.0.0/16\n");
    assert_eq!(list.v4.starts.len(), 5);
}

/// The reference the table must agree with: a linear scan applying the
/// rules of the module documentation literally.
fn naive(model: &[(IpNet, EntryKind, usize)], client: IpAddr) -> (char, Option<usize>) {
    let client = canonical(client);
    let best = |with_previews: bool| {
        model
            .iter()
            .filter(|(n, k, _)| (with_previews || *k != EntryKind::Preview) && n.contains(&client))
            .max_by_key(|(n, k, line)| (n.prefix_len(), k.rank(), Reverse(*line)))
    };
    match (best(false), best(true)) {
        (Some((_, EntryKind::Deny, line)), _) => ('D', Some(*line)),
        (_, Some((_, EntryKind::Preview, line))) => ('P', Some(*line)),
        _ => ('A', None),
    }
}

#[derive(Debug, Clone)]
struct GenEntry {
    net: IpNet,
    kind: EntryKind,
    /// Write an IPv4 network in its IPv4-mapped IPv6 form.
    mapped: bool,
    /// Write a full-length network as a bare address.
    bare: bool,
    shout: bool,
    everything_first: bool,
    comment_before: bool,
    note: Option<String>,
}

// Small address pools so that generated networks overlap a lot.
fn pool_v4() -> impl Strategy<Value = Ipv4Addr> {
    (0u8..4, 0u8..4, any::<u8>()).prop_map(|(b, c, d)| Ipv4Addr::new(10, b, c, d))
}

fn pool_v6() -> impl Strategy<Value = Ipv6Addr> {
    (0u16..4, 0u16..4, 0u16..4).prop_map(|(a, b, c)| Ipv6Addr::new(0x2001, 0xdb8, a, 0, 0, 0, b, c))
}

fn gen_net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (pool_v4(), prop_oneof![0u8..=32, 14u8..=32]).prop_map(|(a, len)| IpNet::new(
            IpAddr::V4(a),
            len
        )
        .unwrap()
        .trunc()),
        (pool_v6(), prop_oneof![0u8..=128, 30u8..=50, 94u8..=128]).prop_map(|(a, len)| IpNet::new(
            IpAddr::V6(a),
            len
        )
        .unwrap()
        .trunc()),
    ]
}

fn gen_entry() -> impl Strategy<Value = GenEntry> {
    (
        gen_net(),
        prop_oneof![
            Just(EntryKind::Deny),
            Just(EntryKind::Allow),
            Just(EntryKind::Preview)
        ],
        any::<[bool; 5]>(),
        proptest::option::of("[ -~]{0,20}"),
    )
        .prop_map(|(net, kind, flags, note)| GenEntry {
            net,
            kind,
            mapped: flags[0],
            bare: flags[1],
            shout: flags[2],
            everything_first: flags[3],
            comment_before: flags[4],
            note,
        })
}

fn render(entries: &[GenEntry]) -> (String, Vec<(IpNet, EntryKind, usize)>) {
    let mut text = String::new();
    let mut model = Vec::new();
    let mut line = 0;
    for e in entries {
        if e.comment_before {
            text.push_str("# a comment line\n\n");
            line += 2;
        }
        let mut words = Vec::new();
        let everything = e.net.prefix_len() == 0;
        if everything && e.everything_first {
            words.push("everything".to_owned());
        }
        match e.kind {
            EntryKind::Deny => {}
            EntryKind::Allow => words.push("allow".to_owned()),
            EntryKind::Preview => words.push("preview".to_owned()),
        }
        if everything && !e.everything_first {
            words.push("everything".to_owned());
        }
        if e.shout {
            words = words.iter().map(|w| w.to_uppercase()).collect();
        }
        let address = match e.net {
            IpNet::V4(v4) if e.mapped => {
                format!("{}/{}", v4.addr().to_ipv6_mapped(), v4.prefix_len() + 96)
            }
            n if e.bare && n.prefix_len() == n.max_prefix_len() => n.addr().to_string(),
            n => n.to_string(),
        };
        words.push(address);
        text.push_str(&words.join(if e.shout { "\t " } else { " " }));
        if let Some(note) = &e.note {
            text.push_str(" #");
            text.push_str(note);
        }
        text.push('\n');
        line += 1;
        model.push((e.net, e.kind, line));
    }
    (text, model)
}

fn gen_client() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        pool_v4().prop_map(IpAddr::V4),
        pool_v4().prop_map(|a| IpAddr::V6(a.to_ipv6_mapped())),
        pool_v6().prop_map(IpAddr::V6),
        any::<Ipv4Addr>().prop_map(IpAddr::V4),
        any::<Ipv6Addr>().prop_map(IpAddr::V6),
    ]
}

/// Tokens that reach every branch of the line parser.
fn gen_token() -> impl Strategy<Value = String> {
    prop_oneof![
        prop_oneof![
            Just("allow"),
            Just("PREVIEW"),
            Just("everything"),
            Just("deny"),
            Just("#"),
            Just("0.0.0.0/0"),
            Just("::/0"),
            Just("10.0.0.0/8"),
            Just("10.1.2.3/8"),
            Just("::ffff:10.0.0.0/104"),
            Just("2001:db8::/32"),
            Just("1.2.3.4/99"),
            Just("\r"),
            Just("\u{feff}"),
        ]
        .prop_map(str::to_owned),
        "[0-9a-fA-F:./]{0,12}",
        any::<String>(),
    ]
}

proptest! {
    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        let _ = Blocklist::parse("p", &text);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_bytes("p", &bytes);
    }

    #[test]
    fn token_soup_never_panics_and_errors_name_real_lines(
        lines in proptest::collection::vec(proptest::collection::vec(gen_token(), 0..5), 0..8),
    ) {
        let text = lines.iter().map(|l| l.join(" ")).collect::<Vec<_>>().join("\n");
        let line_count = text.split('\n').count();
        match Blocklist::parse("p", &text) {
            Ok(list) => prop_assert!(list.len() <= line_count),
            Err(err) => {
                prop_assert!(!err.bad_lines().is_empty());
                for bad in err.bad_lines() {
                    prop_assert!(bad.line >= 1 && bad.line <= line_count);
                }
                let _ = err.to_string();
            }
        }
    }

    #[test]
    fn table_agrees_with_linear_scan(
        entries in proptest::collection::vec(gen_entry(), 0..60),
        clients in proptest::collection::vec(gen_client(), 1..64),
    ) {
        let (text, model) = render(&entries);
        let list = Blocklist::parse("generated", &text)
            .map_err(|e| TestCaseError::fail(format!("{e}\n---\n{text}")))?;
        prop_assert_eq!(list.len(), model.len());
        // Also probe the edges of every generated network.
        let edges = model.iter().flat_map(|(n, _, _)| [n.network(), n.broadcast()]);
        for client in clients.iter().copied().chain(edges) {
            prop_assert_eq!(outcome(list.check(client)), naive(&model, client), "client {}", client);
        }
    }
}

//! What `kas-edge block` and `unblock` do to a blocklist's text: pure functions from the
//! text in force to the text to write, so the same edit applies to a file and to a
//! ConfigMap value, and can be re-applied to a newer text after a concurrent change.
//!
//! Every result is parsed before it is returned: an edit never produces a list the edge
//! would reject. `block` refuses a network an `allow` line for the same network would keep
//! open, and names narrower `allow` lines inside it, which stay exempt.
//!
//! `block` appends two lines, the reason with who and when as a comment, then the entry:
//!
//! ```text
//! # kas-edge block 2026-12-01T10:00:00Z by alice@laptop: INC-1234 credential stuffing
//! 203.0.113.7  # INC-1234 credential stuffing
//! ```
//!
//! `unblock` removes the entries for exactly that network and the `# kas-edge block` line
//! right above each.

use std::fmt;

use ipnet::IpNet;

use super::blocklist::{line_entry, Blocklist, BlocklistError, EntryKind, LineProblem};

/// How the comment line `block` writes starts; `unblock` removes it with its entry.
pub const BLOCK_MARKER: &str = "# kas-edge block ";

/// An edit's result: the text to write, or why nothing needs writing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edited {
    Changed { text: String, summary: String },
    Unchanged(String),
}

#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// The problem names the argument as written.
    #[error("{1}")]
    Address(String, LineProblem),
    #[error("--reason must be one line of text")]
    Reason,
    #[error("the list in force does not parse, fix it first:\n{0}")]
    Unparseable(BlocklistError),
    #[error(
        "{} is not blocked by an entry of its own but by line {line} ({}): unblock {1}, or \
         block less", Written(*.net), Written(*.covering)
    )]
    CoveredBy {
        net: IpNet,
        line: usize,
        covering: IpNet,
    },
    #[error("line {line} (`allow {}`) would keep it open: remove that line first", Written(*.net))]
    Allowed { net: IpNet, line: usize },
    #[error(
        "{} stays blocked by line {line} ({}) after removing its own entries; nothing changed",
        Written(*.net), Written(*.covering)
    )]
    StillBlocked {
        net: IpNet,
        line: usize,
        covering: IpNet,
    },
    #[error("the edited list does not parse (a bug in kas-edge; nothing was written):\n{0}")]
    Invalid(BlocklistError),
}

/// Parses an ADDRESS or CIDR argument as a blocklist line would be.
pub fn parse_target(arg: &str) -> Result<IpNet, EditError> {
    super::blocklist::parse_address(arg.trim()).map_err(|p| EditError::Address(arg.to_owned(), p))
}

/// Who ran the command and when, for the comment line.
#[derive(Debug, Clone)]
pub struct Stamp {
    pub by: String,
    /// RFC 3339, UTC, seconds.
    pub at: String,
}

impl Stamp {
    /// A fixed stamp for tests.
    #[cfg(test)]
    pub(crate) fn fixed() -> Self {
        Self {
            by: "alice@laptop".into(),
            at: "2026-12-01T10:00:00Z".into(),
        }
    }

    /// Now, by `by` or else the login name and host.
    pub fn now(by: Option<String>) -> Self {
        let by = by.unwrap_or_else(|| {
            let user = std::env::var("USER")
                .or_else(|_| std::env::var("LOGNAME"))
                .unwrap_or_else(|_| "unknown".to_owned());
            match hostname() {
                Some(host) => format!("{user}@{host}"),
                None => user,
            }
        });
        Self {
            by,
            at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        }
    }
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

/// The network as written in a list: a bare address for a single host.
struct Written(IpNet);

impl fmt::Display for Written {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.prefix_len() == self.0.max_prefix_len() {
            write!(f, "{}", self.0.addr())
        } else {
            write!(f, "{}", self.0)
        }
    }
}

/// One line of the text with what it holds.
struct Line<'a> {
    number: usize,
    text: &'a str,
    entry: Option<(IpNet, EntryKind)>,
}

/// `text` parsed whole (an error if it would be rejected), and line by line.
fn lines(text: &str) -> Result<(Blocklist, Vec<Line<'_>>), EditError> {
    let list = Blocklist::parse("blocklist", text).map_err(EditError::Unparseable)?;
    let lines = text
        .split('\n')
        .enumerate()
        .map(|(i, t)| Line {
            number: i + 1,
            text: t,
            entry: line_entry(t),
        })
        .collect();
    Ok((list, lines))
}

/// Adds a deny entry for `net` with `reason`, unless an entry for it already denies.
pub fn block(text: &str, net: IpNet, reason: &str, stamp: &Stamp) -> Result<Edited, EditError> {
    let reason = reason.trim();
    if reason.is_empty() || reason.contains(['\n', '\r']) {
        return Err(EditError::Reason);
    }
    let (_, lines) = lines(text)?;
    if let Some(line) = lines
        .iter()
        .find(|l| l.entry == Some((net, EntryKind::Deny)))
    {
        return Ok(Edited::Unchanged(format!(
            "{} is already blocked (line {})",
            Written(net),
            line.number
        )));
    }
    if let Some(line) = lines
        .iter()
        .find(|l| l.entry == Some((net, EntryKind::Allow)))
    {
        return Err(EditError::Allowed {
            net,
            line: line.number,
        });
    }
    let mut new = text.to_owned();
    if !new.is_empty() && !new.ends_with('\n') {
        new.push('\n');
    }
    new.push_str(&format!(
        "{BLOCK_MARKER}{} by {}: {reason}\n{}  # {reason}\n",
        stamp.at,
        stamp.by,
        Written(net)
    ));
    Blocklist::parse("blocklist", &new).map_err(EditError::Invalid)?;
    let mut summary = format!("blocked {}", Written(net));
    // Narrower allow lines inside the network stay exempt: say so.
    let exempt: Vec<String> = lines
        .iter()
        .filter_map(|l| match l.entry {
            Some((inner, EntryKind::Allow)) if net.contains(&inner) => {
                Some(format!("line {} allows {}", l.number, Written(inner)))
            }
            _ => None,
        })
        .collect();
    if !exempt.is_empty() {
        summary.push_str(&format!(" (except: {})", exempt.join(", ")));
    }
    Ok(Edited::Changed { text: new, summary })
}

/// Removes the deny entries for exactly `net` (and the `# kas-edge block` line above
/// each). Refuses, changing nothing, when `net` would stay blocked by a broader entry.
pub fn unblock(text: &str, net: IpNet) -> Result<Edited, EditError> {
    let (list, lines) = lines(text)?;
    let own: Vec<usize> = lines
        .iter()
        .filter(|l| l.entry == Some((net, EntryKind::Deny)))
        .map(|l| l.number)
        .collect();
    if own.is_empty() {
        return match list.check(net.network()) {
            super::blocklist::Verdict::Deny(entry) => Err(EditError::CoveredBy {
                net,
                line: entry.line,
                covering: entry.net,
            }),
            _ => Ok(Edited::Unchanged(format!(
                "{} is not blocked",
                Written(net)
            ))),
        };
    }
    let mut drop: Vec<usize> = own.clone();
    for &n in &own {
        // Line n is lines[n - 1]; the one above it lines[n - 2].
        let above = n.checked_sub(2).and_then(|i| lines.get(i));
        if let Some(above) = above.filter(|a| a.text.starts_with(BLOCK_MARKER)) {
            drop.push(above.number);
        }
    }
    let kept: Vec<&str> = lines
        .iter()
        .filter(|l| !drop.contains(&l.number))
        .map(|l| l.text)
        .collect();
    let new = kept.join("\n");
    let list = Blocklist::parse("blocklist", &new).map_err(EditError::Invalid)?;
    if let super::blocklist::Verdict::Deny(entry) = list.check(net.network()) {
        return Err(EditError::StillBlocked {
            net,
            line: entry.line,
            covering: entry.net,
        });
    }
    let removed: Vec<String> = own.iter().map(usize::to_string).collect();
    Ok(Edited::Changed {
        text: new,
        summary: format!(
            "unblocked {} (removed line {})",
            Written(net),
            removed.join(", ")
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp() -> Stamp {
        Stamp::fixed()
    }

    fn net(s: &str) -> IpNet {
        parse_target(s).unwrap()
    }

    fn changed(edited: Edited) -> (String, String) {
        match edited {
            Edited::Changed { text, summary } => (text, summary),
            Edited::Unchanged(why) => panic!("unchanged: {why}"),
        }
    }

    const HEAD: &str = "# production blocklist\n198.51.100.0/24  # scraping\n";

    #[test]
    fn block_appends_the_reason_line_and_the_entry() {
        let (text, summary) =
            changed(block(HEAD, net("203.0.113.7"), " INC-1234 stuffing ", &stamp()).unwrap());
        assert_eq!(
            text,
            format!(
                "{HEAD}# kas-edge block 2026-12-01T10:00:00Z by alice@laptop: INC-1234 stuffing\n\
                 203.0.113.7  # INC-1234 stuffing\n"
            )
        );
        assert_eq!(summary, "blocked 203.0.113.7");
        let list = Blocklist::parse("b", &text).unwrap();
        let verdict = list.check("203.0.113.7".parse().unwrap());
        assert_eq!(
            verdict.entry().and_then(|e| e.note.as_deref()),
            Some("INC-1234 stuffing")
        );

        // A text without a final newline, an empty one, a network.
        let (text, _) = changed(block("192.0.2.1", net("2001:db8::/48"), "r", &stamp()).unwrap());
        assert!(text.starts_with("192.0.2.1\n# kas-edge block "), "{text}");
        assert!(text.ends_with("\n2001:db8::/48  # r\n"), "{text}");
        let (text, _) = changed(block("", net("192.0.2.9/32"), "r", &stamp()).unwrap());
        assert!(
            text.starts_with(BLOCK_MARKER) && text.ends_with("192.0.2.9  # r\n"),
            "{text}"
        );
    }

    #[test]
    fn block_twice_changes_nothing_and_blocks_on_top_of_other_edits() {
        let (once, _) = changed(block(HEAD, net("203.0.113.7"), "a", &stamp()).unwrap());
        assert_eq!(
            block(&once, net("203.0.113.7"), "again", &stamp()).unwrap(),
            Edited::Unchanged("203.0.113.7 is already blocked (line 4)".into())
        );
        // A second operator's block on the first one's result: both entries stay.
        let (twice, _) = changed(block(&once, net("203.0.113.8"), "b", &stamp()).unwrap());
        let list = Blocklist::parse("b", &twice).unwrap();
        for ip in ["203.0.113.7", "203.0.113.8", "198.51.100.1"] {
            assert!(list.check(ip.parse().unwrap()).is_deny(), "{ip}");
        }
    }

    #[test]
    fn block_refuses_what_would_not_hold() {
        assert_eq!(
            parse_target("10.1.2.3/8").unwrap_err().to_string(),
            "\"10.1.2.3/8\" has host bits set, did you mean 10.0.0.0/8"
        );
        assert!(parse_target("everything").is_err());
        for reason in ["", "  ", "two\nlines"] {
            assert!(
                matches!(
                    block(HEAD, net("192.0.2.1"), reason, &stamp()),
                    Err(EditError::Reason)
                ),
                "{reason:?}"
            );
        }
        let allowed = format!("{HEAD}allow 192.0.2.1\n");
        assert_eq!(
            block(&allowed, net("192.0.2.1"), "r", &stamp())
                .unwrap_err()
                .to_string(),
            "line 3 (`allow 192.0.2.1`) would keep it open: remove that line first"
        );
        let broken = format!("{HEAD}10.0.0.300\n");
        let err = block(&broken, net("192.0.2.1"), "r", &stamp())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("fix it first") && err.contains(":3: \"10.0.0.300\""),
            "{err}"
        );
    }

    #[test]
    fn block_names_narrower_allows_it_keeps() {
        let text = format!("{HEAD}allow 203.0.113.9  # partner\n");
        let (_, summary) = changed(block(&text, net("203.0.113.0/24"), "r", &stamp()).unwrap());
        assert_eq!(
            summary,
            "blocked 203.0.113.0/24 (except: line 3 allows 203.0.113.9)"
        );
    }

    #[test]
    fn unblock_removes_its_entries_and_their_reason_lines() {
        let (blocked, _) = changed(block(HEAD, net("203.0.113.7"), "a", &stamp()).unwrap());
        let hand = format!("{blocked}# by hand\n203.0.113.7\n");
        let (text, summary) = changed(unblock(&hand, net("203.0.113.7")).unwrap());
        assert_eq!(text, format!("{HEAD}# by hand\n"));
        assert_eq!(summary, "unblocked 203.0.113.7 (removed line 4, 6)");
        assert_eq!(
            unblock(&text, net("203.0.113.7")).unwrap(),
            Edited::Unchanged("203.0.113.7 is not blocked".into())
        );
    }

    #[test]
    fn unblock_refuses_what_a_broader_entry_still_blocks() {
        assert_eq!(
            unblock(HEAD, net("198.51.100.7")).unwrap_err().to_string(),
            "198.51.100.7 is not blocked by an entry of its own but by line 2 (198.51.100.0/24): \
             unblock 198.51.100.0/24, or block less"
        );
        let both = format!("{HEAD}198.51.100.7\n");
        assert_eq!(
            unblock(&both, net("198.51.100.7")).unwrap_err().to_string(),
            "198.51.100.7 stays blocked by line 2 (198.51.100.0/24) after removing its own entries; nothing changed"
        );
        // The whole network goes; a preview or allow line for it is not a block.
        let (text, _) = changed(unblock(HEAD, net("198.51.100.0/24")).unwrap());
        assert_eq!(text, "# production blocklist\n");
    }
}

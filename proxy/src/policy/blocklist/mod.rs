//! The operator-edited IP blocklist consulted on every TCP accept.
//!
//! Operators edit this file by hand during incidents, so the format is small,
//! line-oriented and strict: a typo must be reported, never guessed at, and a
//! file with any bad line is rejected as a whole so the edge keeps running on
//! the last good list instead of half of a new one.
//!
//! # File format
//!
//! ```text
//! # Blank lines and lines whose first non-blank character is '#' are ignored.
//! 192.0.2.7                     # a bare address means /32 (or /128 for IPv6)
//! 198.51.100.0/24               # scraping, INC-1234, until 2025-07-01
//! 2001:db8::/32
//! allow 198.51.100.9            # partner NAT inside the range above
//! preview 203.0.113.0/24        # would block: watch the logs first
//! everything 0.0.0.0/0          # incident 123: refuse every IPv4 agent
//! ```
//!
//! Each entry line is `[KEYWORD ...] ADDRESS[/PREFIX] [# NOTE]`:
//!
//! - Tokens are separated by whitespace. Keywords are case-insensitive and
//!   must come before the address; anything else on the line is an error.
//! - Without a keyword the entry denies every client inside the network.
//! - `allow` exempts the network from broader denies.
//! - `preview` marks a deny that is only reported, never enforced, so a new
//!   entry can be tried against live traffic before it blocks anyone. Only
//!   deny entries can be previews.
//! - `everything` must accompany any entry that matches a whole address
//!   family (`0.0.0.0/0`, `::/0`, `::ffff:0:0/96`) and is refused anywhere
//!   else: a stray `/0` would cut off every agent, so it has to be spelled
//!   out on purpose.
//! - Whatever follows the first `#` is kept, trimmed, as the entry's note so
//!   logs and metrics can say why a client was blocked.
//! - The network must be canonical: `10.1.2.3/8` is refused with a hint
//!   (`did you mean 10.0.0.0/8`) because such a line usually means the
//!   operator typed the wrong prefix length, not that they wanted a /8.
//!
//! # Which entry decides
//!
//! The most specific (longest prefix) matching entry decides; between entries
//! for the same network, `allow` beats a deny, which beats a preview. Preview
//! entries never change whether a client is blocked: a client is reported as
//! [`Verdict::Preview`] when it is not blocked today but would be if the
//! preview entries were turned into denies.
//!
//! IPv4 clients that reach an IPv6 socket as IPv4-mapped addresses
//! (`::ffff:192.0.2.7`) are matched against the IPv4 entries, and entries
//! written in that mapped form are stored as the IPv4 networks they denote.
//! IPv6 entries shorter than /96 never match IPv4 clients.
//!
//! Files over [`MAX_FILE_BYTES`] and lines over [`MAX_LINE_BYTES`] are
//! refused: such sizes mean the wrong file was pointed at, and the limits
//! bound the memory a reload can take.

use std::fmt;
use std::io::Read;
use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;

use crate::support::net::{canonical, unmap};

/// Largest blocklist file accepted.
pub const MAX_FILE_BYTES: usize = 16 * 1024 * 1024;

/// Longest line accepted, not counting the line ending.
pub const MAX_LINE_BYTES: usize = 4 * 1024;

/// Bad lines shown by `Display`; a wholly wrong file (say, a binary) would
/// otherwise produce a log message as large as the file. All bad lines stay
/// available through [`BlocklistError::bad_lines`].
const MAX_DISPLAYED_BAD_LINES: usize = 100;

/// How much of an overlong or undecodable line is kept for the error report.
const EXCERPT_BYTES: usize = 80;

/// What an entry does to the clients it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    Deny,
    Allow,
    Preview,
}

impl EntryKind {
    /// Precedence between entries for the same network.
    fn rank(self) -> u8 {
        match self {
            EntryKind::Allow => 2,
            EntryKind::Deny => 1,
            EntryKind::Preview => 0,
        }
    }
}

/// One line of the file, kept so a verdict can name the line that caused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The network as matched; IPv4-mapped IPv6 entries appear as IPv4.
    pub net: IpNet,
    pub kind: EntryKind,
    /// 1-based line number in the file.
    pub line: usize,
    /// The trailing comment, trimmed; `None` when absent or empty.
    pub note: Option<String>,
}

/// The outcome of [`Blocklist::check`]. The entry is borrowed from the table
/// so the per-accept lookup never allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// No entry matched, or an `allow` entry won.
    Allow,
    /// The client must be refused because of this entry.
    Deny(&'a Entry),
    /// The client is let through, but this preview entry would block it.
    Preview(&'a Entry),
}

impl<'a> Verdict<'a> {
    pub fn is_deny(&self) -> bool {
        matches!(self, Verdict::Deny(_))
    }

    /// The entry worth reporting, if any.
    pub fn entry(&self) -> Option<&'a Entry> {
        match *self {
            Verdict::Allow => None,
            Verdict::Deny(entry) | Verdict::Preview(entry) => Some(entry),
        }
    }
}

/// An immutable, parsed blocklist.
///
/// CIDR networks either nest or are disjoint, so each address family is
/// flattened at parse time into sorted, disjoint address ranges that carry
/// their final verdict. A lookup is then one binary search, O(log n) however
/// many entries and prefix lengths the file has, with all the precedence
/// rules already applied.
#[derive(Default)]
pub struct Blocklist {
    /// The entries a verdict can name, indexed by [`Decision`].
    entries: Vec<Entry>,
    v4: Ranges<u32>,
    v6: Ranges<u128>,
    len: usize,
    /// [`content_digest`] of the text this list was parsed from; 0 for the empty default.
    digest: u64,
}

impl fmt::Debug for Blocklist {
    // The derived form would print every entry: far too much for a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Blocklist")
            .field("len", &self.len)
            .field("v4_ranges", &self.v4.starts.len())
            .field("v6_ranges", &self.v6.starts.len())
            .field("digest", &format_args!("{:013x}", self.digest))
            .finish()
    }
}

impl Blocklist {
    /// Parses a whole file; `label` names it in error messages.
    pub fn parse(label: &str, text: &str) -> Result<Blocklist, BlocklistError> {
        parse_bytes(label, text.as_bytes())
    }

    /// Number of entry lines in the file, including ones for networks that
    /// another line also names.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// [`content_digest`] of the text this list was parsed from (0 for
    /// [`Blocklist::default`]): equal on every replica that holds the same text.
    pub fn digest(&self) -> u64 {
        self.digest
    }

    pub fn check(&self, ip: IpAddr) -> Verdict<'_> {
        let decision = match canonical(ip) {
            IpAddr::V4(addr) => self.v4.find(u32::from(addr)),
            IpAddr::V6(addr) => self.v6.find(u128::from(addr)),
        };
        // A missing entry would be a bug in `build_ranges`, not bad input.
        match decision {
            Decision::Allow => Verdict::Allow,
            Decision::Deny(i) => self.entries.get(i).map_or(Verdict::Allow, Verdict::Deny),
            Decision::Preview(i) => self.entries.get(i).map_or(Verdict::Allow, Verdict::Preview),
        }
    }
}

/// The first 52 bits of the SHA-256 of a blocklist's text as read (file bytes or the
/// ConfigMap value): the same on every replica and in `kas-edge blocklist show`, and exact
/// as a Prometheus sample (a float holds 53 bits), so replicas can be compared with one
/// query on `edge_blocklist_content_hash`.
pub fn content_digest(bytes: &[u8]) -> u64 {
    use sha2::{Digest, Sha256};
    let sum = Sha256::digest(bytes);
    let mut first = [0u8; 8];
    first.copy_from_slice(&sum[..8]);
    u64::from_be_bytes(first) >> 12
}

/// A `kas-edge block`/`unblock` argument: an address or a canonical network, checked with
/// the words a bad line gets.
pub fn parse_address(token: &str) -> Result<IpNet, LineProblem> {
    parse_network(token)
}

/// The network and kind of one line of a blocklist, or `None` for a blank or comment line
/// (and for a line that does not parse, which [`Blocklist::parse`] reports).
pub fn line_entry(line: &str) -> Option<(IpNet, EntryKind)> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    parse_line(line).ok().flatten().map(|l| (l.net, l.kind))
}

/// Reads and parses the file at `path`, which also labels error messages.
pub fn load_file(path: &Path) -> Result<Blocklist, BlocklistError> {
    let label = path.display().to_string();
    let read_error = |error| BlocklistError::Read {
        label: label.clone(),
        error,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    // Refuse an oversized file before reading any of it.
    let size = file.metadata().map_err(read_error)?.len();
    if size > MAX_FILE_BYTES as u64 {
        return Err(BlocklistError::TooLarge {
            label,
            size,
            limit: MAX_FILE_BYTES,
        });
    }
    // Read one byte past the limit so a file that grows after the size check
    // is still caught by `parse_bytes`.
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    parse_bytes(&label, &bytes)
}

/// Why a blocklist was rejected.
#[derive(Debug, thiserror::Error)]
pub enum BlocklistError {
    #[error("{label}: cannot read the blocklist: {error}")]
    Read {
        label: String,
        error: std::io::Error,
    },
    #[error("{label}: the blocklist is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        label: String,
        size: u64,
        limit: usize,
    },
    /// Every bad line, so one reload attempt shows everything to fix.
    #[error("{}", BadLinesDisplay::new(.label, .lines))]
    BadLines {
        label: String,
        lines: Vec<LineError>,
    },
}

impl BlocklistError {
    /// The bad lines, empty when the whole file was refused.
    pub fn bad_lines(&self) -> &[LineError] {
        match self {
            BlocklistError::BadLines { lines, .. } => lines,
            BlocklistError::Read { .. } | BlocklistError::TooLarge { .. } => &[],
        }
    }
}

struct BadLinesDisplay<'a> {
    label: &'a str,
    lines: &'a [LineError],
}

impl<'a> BadLinesDisplay<'a> {
    fn new(label: &'a str, lines: &'a [LineError]) -> BadLinesDisplay<'a> {
        BadLinesDisplay { label, lines }
    }
}

impl fmt::Display for BadLinesDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let label = self.label;
        for (shown, bad) in self.lines.iter().take(MAX_DISPLAYED_BAD_LINES).enumerate() {
            if shown > 0 {
                writeln!(f)?;
            }
            write!(f, "{label}:{}: {}", bad.line, bad.problem)?;
        }
        if let Some(hidden) = self.lines.len().checked_sub(MAX_DISPLAYED_BAD_LINES) {
            if hidden > 0 {
                write!(f, "\n{label}: ... and {hidden} more bad lines")?;
            }
        }
        Ok(())
    }
}

/// A line that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// 1-based line number.
    pub line: usize,
    /// The line as written, shortened when it was overlong or not UTF-8.
    pub text: String,
    pub problem: LineProblem,
}

/// What is wrong with a line, phrased for the operator who wrote it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineProblem {
    #[error("{0:?} is not an IP address or CIDR")]
    NotAnAddress(String),
    #[error("{token:?} has a prefix length outside 0..={max}")]
    BadPrefixLength { token: String, max: u8 },
    #[error("{token:?} has host bits set, did you mean {suggestion}")]
    HostBitsSet { token: String, suggestion: IpNet },
    #[error("unknown keyword {0:?}; expected allow, preview or everything before the address")]
    UnknownKeyword(String),
    #[error("keyword {keyword:?} must come before the address {address:?}")]
    KeywordAfterAddress { keyword: String, address: String },
    #[error("keyword {0:?} appears twice")]
    RepeatedKeyword(String),
    #[error("unexpected {0:?} after the address; only a # comment may follow it")]
    TrailingText(String),
    #[error("keywords but no address")]
    MissingAddress,
    #[error("\"preview\" applies only to deny entries and cannot be combined with \"allow\"")]
    PreviewAllow,
    #[error(
        "{token:?} matches every {family} client; write the keyword \"everything\" \
         before the address if that is really intended"
    )]
    CoversEverything { token: String, family: &'static str },
    #[error("\"everything\" marks an entry that matches every client, but {0:?} does not")]
    NeedlessEverything(String),
    #[error("line is {len} bytes long, over the limit of {limit} bytes", limit = MAX_LINE_BYTES)]
    LineTooLong { len: usize },
    #[error("line is not valid UTF-8")]
    NotUtf8,
}

fn parse_bytes(label: &str, bytes: &[u8]) -> Result<Blocklist, BlocklistError> {
    if bytes.len() > MAX_FILE_BYTES {
        return Err(BlocklistError::TooLarge {
            label: label.to_owned(),
            size: bytes.len() as u64,
            limit: MAX_FILE_BYTES,
        });
    }
    let digest = content_digest(bytes);
    // Editors on Windows like to start files with a byte order mark.
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut builder = Builder::default();
    let mut bad = Vec::new();
    for (index, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = index + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        match parse_raw_line(raw) {
            Ok(None) => {}
            Ok(Some(parsed)) => builder.add(Entry {
                net: parsed.net,
                kind: parsed.kind,
                line,
                note: parsed.note,
            }),
            Err(problem) => bad.push(LineError {
                line,
                text: excerpt(raw),
                problem,
            }),
        }
    }
    if bad.is_empty() {
        Ok(builder.finish(digest))
    } else {
        Err(BlocklistError::BadLines {
            label: label.to_owned(),
            lines: bad,
        })
    }
}

fn excerpt(raw: &[u8]) -> String {
    match std::str::from_utf8(raw) {
        Ok(text) if raw.len() <= MAX_LINE_BYTES => text.to_owned(),
        _ => {
            let head = raw.get(..EXCERPT_BYTES).unwrap_or(raw);
            let mut text = String::from_utf8_lossy(head).into_owned();
            if head.len() < raw.len() {
                text.push_str("...");
            }
            text
        }
    }
}

struct ParsedLine {
    net: IpNet,
    kind: EntryKind,
    note: Option<String>,
}

fn parse_raw_line(raw: &[u8]) -> Result<Option<ParsedLine>, LineProblem> {
    if raw.len() > MAX_LINE_BYTES {
        return Err(LineProblem::LineTooLong { len: raw.len() });
    }
    let line = std::str::from_utf8(raw).map_err(|_| LineProblem::NotUtf8)?;
    parse_line(line)
}

fn parse_line(line: &str) -> Result<Option<ParsedLine>, LineProblem> {
    let (content, note) = line.split_once('#').unwrap_or((line, ""));
    let mut allow = false;
    let mut preview = false;
    let mut everything = false;
    let mut address: Option<(&str, IpNet)> = None;
    for token in content.split_whitespace() {
        let flag = if token.eq_ignore_ascii_case("allow") {
            Some(&mut allow)
        } else if token.eq_ignore_ascii_case("preview") {
            Some(&mut preview)
        } else if token.eq_ignore_ascii_case("everything") {
            Some(&mut everything)
        } else {
            None
        };
        match (flag, address) {
            (Some(_), Some((written, _))) => {
                return Err(LineProblem::KeywordAfterAddress {
                    keyword: token.to_owned(),
                    address: written.to_owned(),
                })
            }
            (Some(flag), None) => {
                if *flag {
                    return Err(LineProblem::RepeatedKeyword(token.to_owned()));
                }
                *flag = true;
            }
            (None, Some(_)) => return Err(LineProblem::TrailingText(token.to_owned())),
            (None, None) => {
                // No address is made of letters alone; calling it a keyword
                // gives a better hint for slips like `deny 1.2.3.4`.
                if token.bytes().all(|b| b.is_ascii_alphabetic()) {
                    return Err(LineProblem::UnknownKeyword(token.to_owned()));
                }
                address = Some((token, parse_network(token)?));
            }
        }
    }
    let Some((written, net)) = address else {
        return if allow || preview || everything {
            Err(LineProblem::MissingAddress)
        } else {
            Ok(None)
        };
    };
    let kind = match (allow, preview) {
        (true, true) => return Err(LineProblem::PreviewAllow),
        (true, false) => EntryKind::Allow,
        (false, true) => EntryKind::Preview,
        (false, false) => EntryKind::Deny,
    };
    match (net.prefix_len() == 0, everything) {
        (true, false) => {
            return Err(LineProblem::CoversEverything {
                token: written.to_owned(),
                family: if net.addr().is_ipv4() { "IPv4" } else { "IPv6" },
            })
        }
        (false, true) => return Err(LineProblem::NeedlessEverything(written.to_owned())),
        _ => {}
    }
    let note = note.trim();
    Ok(Some(ParsedLine {
        net,
        kind,
        note: (!note.is_empty()).then(|| note.to_owned()),
    }))
}

fn parse_network(token: &str) -> Result<IpNet, LineProblem> {
    let not_an_address = || LineProblem::NotAnAddress(token.to_owned());
    let (addr_text, prefix_text) = match token.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (token, None),
    };
    let addr: IpAddr = addr_text.parse().map_err(|_| not_an_address())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix_text {
        None => max,
        Some(text) => {
            if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                return Err(not_an_address());
            }
            text.parse::<u8>()
                .ok()
                .filter(|&len| len <= max)
                .ok_or_else(|| LineProblem::BadPrefixLength {
                    token: token.to_owned(),
                    max,
                })?
        }
    };
    let net = IpNet::new(addr, prefix).map_err(|_| LineProblem::BadPrefixLength {
        token: token.to_owned(),
        max,
    })?;
    let network = net.trunc();
    if network.addr() != addr {
        return Err(LineProblem::HostBitsSet {
            token: token.to_owned(),
            suggestion: network,
        });
    }
    Ok(unmap(network))
}

/// An address as an integer, so that networks become integer ranges.
trait Key: Copy + Ord {
    const ZERO: Self;
    fn successor(self) -> Option<Self>;
}

impl Key for u32 {
    const ZERO: u32 = 0;
    fn successor(self) -> Option<u32> {
        self.checked_add(1)
    }
}

impl Key for u128 {
    const ZERO: u128 = 0;
    fn successor(self) -> Option<u128> {
        self.checked_add(1)
    }
}

/// A verdict with the entry as an index into [`Blocklist::entries`], so the
/// ranges stay small and `Copy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Allow,
    Deny(usize),
    Preview(usize),
}

/// Disjoint ranges of one address family: `decisions[i]` holds from
/// `starts[i]` up to the next start. When not empty, `starts[0]` is zero.
struct Ranges<K> {
    starts: Vec<K>,
    decisions: Vec<Decision>,
}

impl<K> Default for Ranges<K> {
    fn default() -> Ranges<K> {
        Ranges {
            starts: Vec::new(),
            decisions: Vec::new(),
        }
    }
}

impl<K: Key> Ranges<K> {
    fn find(&self, key: K) -> Decision {
        let after = self.starts.partition_point(|&start| start <= key);
        after
            .checked_sub(1)
            .and_then(|i| self.decisions.get(i))
            .copied()
            .unwrap_or(Decision::Allow)
    }

    /// Appends a range starting at `start`, which must not precede the
    /// previous start. A range starting at the same address replaces the
    /// previous one, and one with the same decision merges into it.
    fn push(&mut self, start: K, decision: Decision) {
        if self.starts.last() == Some(&start) {
            self.starts.pop();
            self.decisions.pop();
        }
        if self.decisions.last() != Some(&decision) {
            self.starts.push(start);
            self.decisions.push(decision);
        }
    }
}

/// A network as the inclusive integer range it covers.
struct Pending<K> {
    first: K,
    last: K,
    entry: Entry,
}

#[derive(Default)]
struct Builder {
    v4: Vec<Pending<u32>>,
    v6: Vec<Pending<u128>>,
    len: usize,
}

impl Builder {
    fn add(&mut self, entry: Entry) {
        self.len += 1;
        match entry.net {
            IpNet::V4(net) => self.v4.push(Pending {
                first: u32::from(net.network()),
                last: u32::from(net.broadcast()),
                entry,
            }),
            IpNet::V6(net) => self.v6.push(Pending {
                first: u128::from(net.network()),
                last: u128::from(net.broadcast()),
                entry,
            }),
        }
    }

    fn finish(self, digest: u64) -> Blocklist {
        let mut entries = Vec::new();
        let v4 = build_ranges(self.v4, &mut entries);
        let v6 = build_ranges(self.v6, &mut entries);
        Blocklist {
            entries,
            v4,
            v6,
            len: self.len,
            digest,
        }
    }
}

/// A network on the path from the whole address space down to the one
/// being added, while sweeping through the sorted networks.
struct Frame<K> {
    last: K,
    /// The innermost allow or deny around here, if it is a deny.
    enforced_deny: Option<usize>,
    decision: Decision,
}

fn build_ranges<K: Key>(mut nets: Vec<Pending<K>>, entries: &mut Vec<Entry>) -> Ranges<K> {
    // Outer networks before the ones they contain; for the same network the
    // deciding entry first: allow, then deny, then preview, then the
    // earliest line, as an operator reading top-down would expect.
    nets.sort_unstable_by(|a, b| {
        a.first
            .cmp(&b.first)
            .then(b.last.cmp(&a.last))
            .then(b.entry.kind.rank().cmp(&a.entry.kind.rank()))
            .then(a.entry.line.cmp(&b.entry.line))
    });
    nets.dedup_by(|later, kept| {
        let same = later.first == kept.first && later.last == kept.last;
        if same {
            tracing::debug!(
                line = later.entry.line,
                kept = kept.entry.line,
                net = %later.entry.net,
                "blocklist entry shadowed by another entry for the same network"
            );
        }
        same
    });

    let mut ranges = Ranges::default();
    ranges.push(K::ZERO, Decision::Allow);
    let mut path: Vec<Frame<K>> = Vec::new();
    let close = |path: &mut Vec<Frame<K>>, ranges: &mut Ranges<K>| {
        if let Some(done) = path.pop() {
            if let Some(after) = done.last.successor() {
                let outer = path.last().map_or(Decision::Allow, |f| f.decision);
                ranges.push(after, outer);
            }
        }
    };
    for net in nets {
        // Networks nest or are disjoint, so whatever is left on the path
        // after this contains `net` entirely.
        while path.last().is_some_and(|top| top.last < net.first) {
            close(&mut path, &mut ranges);
        }
        let index = entries.len();
        let outer_deny = path.last().and_then(|f| f.enforced_deny);
        let enforced_deny = match net.entry.kind {
            EntryKind::Deny => Some(index),
            EntryKind::Allow => None,
            EntryKind::Preview => outer_deny,
        };
        let decision = match (enforced_deny, net.entry.kind) {
            (Some(deny), _) => Decision::Deny(deny),
            (None, EntryKind::Preview) => Decision::Preview(index),
            (None, _) => Decision::Allow,
        };
        path.push(Frame {
            last: net.last,
            enforced_deny,
            decision,
        });
        ranges.push(net.first, decision);
        entries.push(net.entry);
    }
    while !path.is_empty() {
        close(&mut path, &mut ranges);
    }
    ranges
}

#[cfg(test)]
mod tests;

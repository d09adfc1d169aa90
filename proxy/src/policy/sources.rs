//! The blocklist in force: one list per source — the file (`policies.blocklist`) and the
//! ConfigMap watched through the Kubernetes API (`policies.blocklist_configmap`) — each
//! replaced on its own, consulted together.
//!
//! A client is refused when either list denies it: an `allow` line exempts clients from
//! the broader denies of its own list only, so an edit of one source can never lift a
//! block the other holds. Preview entries are reported when no list denies.

use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::blocklist::{Blocklist, Verdict};
use crate::support::sync::lock;

/// Where a blocklist comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlocklistSource {
    /// `policies.blocklist`: a file, watched on disk.
    File,
    /// `policies.blocklist_configmap`: a ConfigMap key, watched through the Kubernetes API.
    ConfigMap,
}

impl BlocklistSource {
    pub const ALL: [BlocklistSource; 2] = [BlocklistSource::File, BlocklistSource::ConfigMap];

    /// The `source` label of the per-source metrics.
    pub fn label(self) -> &'static str {
        match self {
            BlocklistSource::File => "file",
            BlocklistSource::ConfigMap => "configmap",
        }
    }

    fn index(self) -> usize {
        match self {
            BlocklistSource::File => 0,
            BlocklistSource::ConfigMap => 1,
        }
    }
}

impl fmt::Display for BlocklistSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// One list per source; a source without a list (not configured, or not loaded yet) blocks
/// nobody.
#[derive(Debug, Default, Clone)]
pub struct Blocklists {
    by_source: [Option<Arc<Blocklist>>; 2],
}

impl Blocklists {
    /// The strongest verdict of any list: a deny, else a preview, else allow.
    pub fn check(&self, ip: IpAddr) -> Verdict<'_> {
        let mut verdict = Verdict::Allow;
        for list in self.by_source.iter().flatten() {
            match list.check(ip) {
                deny @ Verdict::Deny(_) => return deny,
                preview @ Verdict::Preview(_) if verdict == Verdict::Allow => verdict = preview,
                _ => {}
            }
        }
        verdict
    }

    /// Entry lines in force, over every source.
    pub fn len(&self) -> usize {
        self.by_source.iter().flatten().map(|l| l.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The list from `source`, if it has one.
    pub fn get(&self, source: BlocklistSource) -> Option<&Blocklist> {
        self.by_source[source.index()].as_deref()
    }

    fn with(&self, source: BlocklistSource, list: Blocklist) -> Blocklists {
        let mut next = self.clone();
        next.by_source[source.index()] = Some(Arc::new(list));
        next
    }
}

/// Whether a connection from `ip`, allowed under `old`, must now be closed. Connections
/// that were already denied were closed at accept, and previews never close anything.
pub fn newly_blocked(old: &Blocklists, new: &Blocklists, ip: IpAddr) -> bool {
    new.check(ip).is_deny() && !old.check(ip).is_deny()
}

/// The lists in force, read on every TCP accept without a lock (`ArcSwap`), replaced one
/// source at a time.
#[derive(Default)]
pub struct SharedBlocklists {
    current: ArcSwap<Blocklists>,
    /// Serialises replacements, so each one's `(old, new)` pair chains onto the previous
    /// and what follows a replacement (closing connections, metrics) happens in order.
    replacing: Mutex<()>,
}

impl SharedBlocklists {
    pub fn new(lists: Blocklists) -> SharedBlocklists {
        SharedBlocklists {
            current: ArcSwap::from_pointee(lists),
            replacing: Mutex::new(()),
        }
    }

    /// The cheapest way to consult the lists; hold the guard only briefly.
    pub fn load(&self) -> arc_swap::Guard<Arc<Blocklists>> {
        self.current.load()
    }

    /// Installs `list` as `source`'s and, before any other replacement, runs `then` with
    /// the lists before and after (to close what the change newly blocks).
    pub fn replace<R>(
        &self,
        source: BlocklistSource,
        list: Blocklist,
        then: impl FnOnce(&Blocklists, &Blocklists) -> R,
    ) -> R {
        let _one_at_a_time = lock(&self.replacing);
        let old = self.current.load_full();
        let new = Arc::new(old.with(source, list));
        self.current.store(new.clone());
        then(&old, &new)
    }
}

impl fmt::Debug for SharedBlocklists {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SharedBlocklists")
            .field(&*self.current.load())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn list(text: &str) -> Blocklist {
        Blocklist::parse("blocklist.txt", text).unwrap()
    }

    #[test]
    fn either_source_blocks_and_an_allow_exempts_within_its_own_list_only() {
        let shared = SharedBlocklists::default();
        assert_eq!(shared.load().check(ip("192.0.2.1")), Verdict::Allow);
        shared.replace(
            BlocklistSource::File,
            list("192.0.2.0/24\nallow 192.0.2.9\npreview 198.51.100.0/24\n"),
            |_, _| (),
        );
        shared.replace(
            BlocklistSource::ConfigMap,
            list("192.0.2.9  # INC-7\n203.0.113.0/24\n"),
            |_, _| (),
        );
        let lists = shared.load();
        assert!(lists.check(ip("192.0.2.1")).is_deny(), "file");
        assert!(lists.check(ip("203.0.113.5")).is_deny(), "configmap");
        // The file's allow does not lift the ConfigMap's deny.
        let Verdict::Deny(entry) = lists.check(ip("192.0.2.9")) else {
            panic!("allowed by the other list");
        };
        assert_eq!(entry.note.as_deref(), Some("INC-7"));
        assert!(matches!(
            lists.check(ip("198.51.100.1")),
            Verdict::Preview(_)
        ));
        assert_eq!(lists.check(ip("10.0.0.1")), Verdict::Allow);
        assert_eq!(lists.len(), 5);
        assert_eq!(
            lists.get(BlocklistSource::ConfigMap).map(Blocklist::len),
            Some(2)
        );
        assert!(format!("{shared:?}").contains("len: 3"));
    }

    #[test]
    fn a_replacement_reports_exactly_the_newly_blocked() {
        let shared = SharedBlocklists::default();
        shared.replace(BlocklistSource::File, list("192.0.2.0/24\n"), |_, _| ());
        let client = ip("198.51.100.7");
        let (newly, already, never, reverse) = shared.replace(
            BlocklistSource::ConfigMap,
            list("198.51.100.0/24\n192.0.2.1\n"),
            |old, new| {
                (
                    newly_blocked(old, new, client),
                    newly_blocked(old, new, ip("192.0.2.1")),
                    newly_blocked(old, new, ip("203.0.113.1")),
                    newly_blocked(new, old, client),
                )
            },
        );
        assert!(newly);
        assert!(!already, "the file already denied it");
        assert!(!never);
        assert!(!reverse, "unblocked, not blocked");
        // Replacing a source keeps the other's list.
        shared.replace(BlocklistSource::ConfigMap, list(""), |old, new| {
            assert!(newly_blocked(&Blocklists::default(), new, ip("192.0.2.5")));
            assert!(!newly_blocked(old, new, client));
        });
        assert!(!shared.load().check(client).is_deny());

        fn send_sync<T: Send + Sync>() {}
        send_sync::<SharedBlocklists>();
    }
}

//! React when operator-edited files change (certificates, the IP blocklist, rate-limit
//! policies) without restarting the edge.
//!
//! The parent directories are watched rather than the files themselves, because the ways
//! these files really change replace the inode: editors write a temporary file and rename
//! it over the original, and Kubernetes updates a mounted ConfigMap or Secret by swapping
//! the `..data` symlink in the mount directory (the configured path is a symlink
//! `file -> ..data/file` that never changes itself). An inotify watch on the file would
//! keep pointing at the old inode and go silent after the first such update.
//!
//! Events come in bursts (a rename-and-replace is several events; a Kubernetes swap is a
//! handful more), so they are coalesced: the callback runs once the directory has been
//! quiet for the debounce interval, or at the latest ten intervals after the first event,
//! so a file that is rewritten continuously is still picked up.
//!
//! Some volume types (network filesystems, some CSI drivers) and inotify queue overflows
//! lose events. An optional polling safety net compares each file's fingerprint (size,
//! modification time, device and inode of the symlink-resolved file) every few seconds.
//!
//! The callback runs on one dedicated OS thread per watcher, never on a tokio worker: the
//! callers do blocking file I/O (re-reading PEM files, policy files) and the watcher may
//! be created before, or outside of, any runtime. One thread also means the callback is
//! never called concurrently with itself.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};

/// A continuously rewritten file must still be reloaded at some point, so coalescing
/// stops extending the wait after this many debounce intervals.
const MAX_DELAY_FACTOR: u32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum FileWatchError {
    #[error("no files to watch")]
    NoPaths,
    #[error("cannot watch {}: the path has no file name", .0.display())]
    NotAFile(PathBuf),
    #[error("cannot resolve {}: {source}", path.display())]
    Resolve { path: PathBuf, source: io::Error },
    #[error("cannot start the file watcher: {0}")]
    Init(#[source] notify::Error),
    #[error("cannot watch directory {} (for {}): {source}", dir.display(), file.display())]
    Watch {
        dir: PathBuf,
        file: PathBuf,
        source: notify::Error,
    },
    #[error("cannot start the file watcher thread: {0}")]
    Thread(#[source] io::Error),
}

/// Keeps the watch alive; dropping it stops watching.
///
/// Drop does not wait for the watcher thread: a callback already running finishes on that
/// thread, but no new call starts after drop. Not joining keeps drop from blocking (or
/// deadlocking, if dropped from inside the callback) on whatever the callback does.
pub struct FileWatcher {
    // Dropped first: it owns a sender, so the thread also sees the channel disconnect.
    _events: Option<RecommendedWatcher>,
    wake: mpsc::Sender<Msg>,
    stopped: Arc<AtomicBool>,
    paths: Vec<PathBuf>,
}

impl std::fmt::Debug for FileWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileWatcher")
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

impl Drop for FileWatcher {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        // The thread may already be gone; nothing to do then.
        let _ = self.wake.send(Msg::Stop);
    }
}

/// Calls `on_change` (debounced) whenever one of `paths` may have changed, using
/// filesystem events only. See [`watch_files_with_poll`] for volumes that may lose events.
pub fn watch_files(
    paths: Vec<PathBuf>,
    debounce: Duration,
    on_change: impl Fn() + Send + 'static,
) -> Result<FileWatcher, FileWatchError> {
    start(paths, debounce, None, true, Box::new(on_change))
}

/// Like [`watch_files`], and additionally fingerprints the files every `poll_every` and
/// calls `on_change` when a fingerprint differs, in case events were lost.
pub fn watch_files_with_poll(
    paths: Vec<PathBuf>,
    debounce: Duration,
    poll_every: Duration,
    on_change: impl Fn() + Send + 'static,
) -> Result<FileWatcher, FileWatchError> {
    start(paths, debounce, Some(poll_every), true, Box::new(on_change))
}

enum Msg {
    Event(notify::Result<Event>),
    Stop,
}

type Callback = Box<dyn Fn() + Send + 'static>;

/// Which directory entries matter: per watched directory, the watched file names.
/// Entries starting with `..` in those directories always matter (Kubernetes' `..data`
/// and its timestamped targets).
#[derive(Debug, Default)]
struct Interest {
    by_dir: HashMap<PathBuf, HashSet<OsString>>,
}

impl Interest {
    fn touches(&self, event: &Event) -> bool {
        if event.need_rescan() {
            return true;
        }
        // Opening and reading (including our own callback re-reading the files) are
        // reported too; only a close after writing says anything about content.
        if let EventKind::Access(kind) = event.kind {
            if kind != AccessKind::Close(AccessMode::Write) {
                return false;
            }
        }
        event.paths.iter().any(|p| self.touches_path(p))
    }

    fn touches_path(&self, path: &Path) -> bool {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return false;
        };
        let Some(names) = self.by_dir.get(dir) else {
            return false;
        };
        names.contains(name) || name.as_encoded_bytes().starts_with(b"..")
    }
}

/// What the polling safety net compares. Metadata follows symlinks, so a Kubernetes
/// `..data` swap shows up as a different inode even when size and mtime happen to match.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fingerprint {
    Present {
        len: u64,
        modified: Option<SystemTime>,
        dev: u64,
        ino: u64,
    },
    Missing(io::ErrorKind),
}

fn fingerprint(path: &Path) -> Fingerprint {
    match std::fs::metadata(path) {
        Ok(meta) => {
            #[cfg(unix)]
            let (dev, ino) = {
                use std::os::unix::fs::MetadataExt;
                (meta.dev(), meta.ino())
            };
            #[cfg(not(unix))]
            let (dev, ino) = (0, 0);
            Fingerprint::Present {
                len: meta.len(),
                modified: meta.modified().ok(),
                dev,
                ino,
            }
        }
        Err(e) => Fingerprint::Missing(e.kind()),
    }
}

fn fingerprints(paths: &[PathBuf]) -> Vec<Fingerprint> {
    paths.iter().map(|p| fingerprint(p)).collect()
}

fn start(
    paths: Vec<PathBuf>,
    debounce: Duration,
    poll_every: Option<Duration>,
    use_events: bool,
    on_change: Callback,
) -> Result<FileWatcher, FileWatchError> {
    if paths.is_empty() {
        return Err(FileWatchError::NoPaths);
    }
    let mut interest = Interest::default();
    let mut files = Vec::with_capacity(paths.len());
    for path in paths {
        // Absolute, but deliberately not canonical: canonicalising would follow the
        // Kubernetes symlink into a `..<timestamp>` directory that is deleted on the next
        // update, which is exactly the directory not to watch.
        let abs = std::path::absolute(&path).map_err(|source| FileWatchError::Resolve {
            path: path.clone(),
            source,
        })?;
        let (Some(dir), Some(name)) = (abs.parent(), abs.file_name()) else {
            return Err(FileWatchError::NotAFile(path));
        };
        interest
            .by_dir
            .entry(dir.to_path_buf())
            .or_default()
            .insert(name.to_os_string());
        if !files.contains(&abs) {
            files.push(abs);
        }
    }

    let (tx, rx) = mpsc::channel();
    let events = if use_events {
        let events_tx = tx.clone();
        let mut watcher = notify::recommended_watcher(move |res| {
            // The receiver is gone only once the watcher is being torn down.
            let _ = events_tx.send(Msg::Event(res));
        })
        .map_err(FileWatchError::Init)?;
        for dir in interest.by_dir.keys() {
            watcher
                .watch(dir, RecursiveMode::NonRecursive)
                .map_err(|source| FileWatchError::Watch {
                    dir: dir.clone(),
                    file: files
                        .iter()
                        .find(|f| f.parent() == Some(dir.as_path()))
                        .cloned()
                        .unwrap_or_else(|| dir.clone()),
                    source,
                })?;
        }
        Some(watcher)
    } else {
        None
    };

    let stopped = Arc::new(AtomicBool::new(false));
    let worker = Worker {
        // Taken before returning, so a change right after `watch_files` returns counts.
        seen: fingerprints(&files),
        interest,
        files: files.clone(),
        debounce,
        poll_every,
        on_change,
        stopped: stopped.clone(),
    };
    thread::Builder::new()
        .name("filewatch".into())
        .spawn(move || worker.run(rx))
        .map_err(FileWatchError::Thread)?;

    tracing::debug!(files = ?files, ?debounce, ?poll_every, use_events, "watching files");
    Ok(FileWatcher {
        _events: events,
        wake: tx,
        stopped,
        paths: files,
    })
}

struct Worker {
    seen: Vec<Fingerprint>,
    interest: Interest,
    files: Vec<PathBuf>,
    debounce: Duration,
    poll_every: Option<Duration>,
    on_change: Callback,
    stopped: Arc<AtomicBool>,
}

/// Coalescing window opened by the first relevant event of a burst.
struct Pending {
    first: Instant,
    fire_at: Instant,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let mut pending: Option<Pending> = None;
        let mut next_poll = self.poll_every.map(|every| Instant::now() + every);
        let max_delay = self.debounce.saturating_mul(MAX_DELAY_FACTOR);

        loop {
            let wake_at = match (pending.as_ref().map(|p| p.fire_at), next_poll) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let msg = match wake_at {
                Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match msg {
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {}
                Ok(Msg::Event(Err(e))) => {
                    // Typically an inotify queue overflow or watch limit; the poll (if
                    // enabled) and the next event still get us there.
                    tracing::warn!(error = %e, files = ?self.files, "file watch error");
                }
                Ok(Msg::Event(Ok(event))) => {
                    if self.interest.touches(&event) {
                        tracing::trace!(?event, "watched file event");
                        let now = Instant::now();
                        pending = Some(match pending {
                            None => Pending {
                                first: now,
                                fire_at: now + self.debounce,
                            },
                            Some(p) => Pending {
                                first: p.first,
                                fire_at: (now + self.debounce).min(p.first + max_delay),
                            },
                        });
                    }
                }
            }
            if self.stopped.load(Ordering::SeqCst) {
                return;
            }

            let now = Instant::now();
            if pending.as_ref().is_some_and(|p| now >= p.fire_at) {
                pending = None;
                self.seen = fingerprints(&self.files);
                self.fire("event");
            }
            if let (Some(at), Some(every)) = (next_poll, self.poll_every) {
                if now >= at {
                    next_poll = Some(now + every);
                    let current = fingerprints(&self.files);
                    // A change already queued by events will be handled by that burst.
                    if current != self.seen && pending.is_none() {
                        self.seen = current;
                        self.fire("poll");
                    }
                }
            }
        }
    }

    fn fire(&self, trigger: &'static str) {
        if self.stopped.load(Ordering::SeqCst) {
            return;
        }
        tracing::debug!(trigger, files = ?self.files, "watched files changed");
        // A panicking callback must not end the watch: the next edit deserves another try.
        if catch_unwind(AssertUnwindSafe(|| (self.on_change)())).is_err() {
            tracing::error!(files = ?self.files, "file change callback panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::sync::atomic::AtomicUsize;

    const WAIT: Duration = Duration::from_secs(5);
    const DEBOUNCE: Duration = Duration::from_millis(100);

    fn counter_watch(
        paths: Vec<PathBuf>,
        poll: Option<Duration>,
        use_events: bool,
    ) -> (FileWatcher, mpsc::Receiver<()>) {
        let (tx, rx) = mpsc::channel();
        let w = start(
            paths,
            DEBOUNCE,
            poll,
            use_events,
            Box::new(move || {
                let _ = tx.send(());
            }),
        )
        .unwrap();
        (w, rx)
    }

    fn write_via_rename(path: &Path, content: &str) {
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, content).unwrap();
        fs::rename(&tmp, path).unwrap();
    }

    #[test]
    fn in_place_write_fires() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("blocklist.txt");
        fs::write(&file, "1.2.3.4\n").unwrap();
        let (_w, rx) = counter_watch(vec![file.clone()], None, true);
        fs::write(&file, "5.6.7.8\n").unwrap();
        rx.recv_timeout(WAIT).unwrap();
    }

    #[test]
    fn rename_over_fires() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.toml");
        fs::write(&file, "a = 1\n").unwrap();
        let (_w, rx) = counter_watch(vec![file.clone()], None, true);
        write_via_rename(&file, "a = 2\n");
        rx.recv_timeout(WAIT).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn kubernetes_data_symlink_swap_fires() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let mount = dir.path();
        fs::create_dir(mount.join("..2026_01")).unwrap();
        fs::write(mount.join("..2026_01/tls.crt"), "old").unwrap();
        symlink("..2026_01", mount.join("..data")).unwrap();
        symlink("..data/tls.crt", mount.join("tls.crt")).unwrap();
        let file = mount.join("tls.crt");
        assert_eq!(fs::read_to_string(&file).unwrap(), "old");

        let (_w, rx) = counter_watch(vec![file.clone()], None, true);
        fs::create_dir(mount.join("..2026_02")).unwrap();
        fs::write(mount.join("..2026_02/tls.crt"), "new").unwrap();
        symlink("..2026_02", mount.join("..data_tmp")).unwrap();
        fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
        fs::remove_dir_all(mount.join("..2026_01")).unwrap();

        rx.recv_timeout(WAIT).unwrap();
        assert_eq!(fs::read_to_string(&file).unwrap(), "new");
    }

    #[test]
    fn burst_is_coalesced_and_never_concurrent() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.toml");
        fs::write(&file, "0").unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let max_in_flight = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        let (c, i, m) = (calls.clone(), in_flight.clone(), max_in_flight.clone());
        let _w = watch_files(vec![file.clone()], DEBOUNCE, move || {
            let now = i.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(now, Ordering::SeqCst);
            // Slow enough that overlapping calls would show up in `max_in_flight`.
            thread::sleep(Duration::from_millis(30));
            c.fetch_add(1, Ordering::SeqCst);
            i.fetch_sub(1, Ordering::SeqCst);
            let _ = tx.send(());
        })
        .unwrap();

        for n in 1..=20 {
            write_via_rename(&file, &n.to_string());
            thread::sleep(Duration::from_millis(5));
        }
        rx.recv_timeout(WAIT).unwrap();
        // Let any trailing coalesced call land so the upper bound below is meaningful.
        thread::sleep(DEBOUNCE * 4);
        let n = calls.load(Ordering::SeqCst);
        assert!(
            (1..=5).contains(&n),
            "{n} callbacks for a burst of 20 writes"
        );
        assert_eq!(max_in_flight.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn polling_catches_changes_without_events() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("blocklist.txt");
        fs::write(&file, "1.2.3.4\n").unwrap();
        let (_w, rx) = counter_watch(vec![file.clone()], Some(Duration::from_millis(50)), false);
        write_via_rename(&file, "1.2.3.4\n5.6.7.8\n");
        rx.recv_timeout(WAIT).unwrap();
    }

    #[test]
    fn relevance_filter() {
        let mut interest = Interest::default();
        interest
            .by_dir
            .entry(PathBuf::from("/etc/tls"))
            .or_default()
            .insert("tls.crt".into());
        let ev = |kind, p: &str| Event::new(kind).add_path(PathBuf::from(p));
        let modify = EventKind::Modify(notify::event::ModifyKind::Any);
        assert!(interest.touches(&ev(modify, "/etc/tls/tls.crt")));
        assert!(interest.touches(&ev(modify, "/etc/tls/..data")));
        assert!(interest.touches(&ev(modify, "/etc/tls/..data_tmp")));
        assert!(!interest.touches(&ev(modify, "/etc/tls/other.txt")));
        assert!(!interest.touches(&ev(modify, "/etc/other/tls.crt")));
        assert!(!interest.touches(&ev(modify, "/etc/tls")));
        let open = EventKind::Access(AccessKind::Open(AccessMode::Any));
        assert!(!interest.touches(&ev(open, "/etc/tls/tls.crt")));
        let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert!(interest.touches(&ev(closed, "/etc/tls/tls.crt")));
        let rescan = Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert!(interest.touches(&rescan));
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(matches!(
            watch_files(vec![], DEBOUNCE, || {}),
            Err(FileWatchError::NoPaths)
        ));
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope/file.txt");
        let err = watch_files(vec![missing], DEBOUNCE, || {}).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}

//! Log lines written off the request path: a bounded queue in memory, drained by a thread
//! of its own into stdout.
//!
//! Writing a log line straight to stdout takes the stdout lock and a `write(2)` on the
//! thread that logs. When whatever reads stdout (a container runtime, a log shipper) falls
//! behind, the pipe fills and that write blocks: on one of pingora's worker threads it
//! stalls every connection the thread carries. Here the logging thread only copies the
//! line into the queue; the drain thread does the writing. When the queue is full the line
//! is dropped and counted (`edge_access_log_dropped_total`): a slow log consumer costs log
//! lines, never requests.
//!
//! The queue is bounded in bytes ([`QUEUE_BYTES`]), not lines, so long lines (a long
//! request path) cannot make it large. The drain thread writes through the process's
//! `std::io::stdout()`, whose lock keeps its batches and other stdout writers' lines
//! (tracing) from interleaving.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use tracing_subscriber::fmt::MakeWriter;

use crate::support::sync::lock;

/// The queue's bound: about 3,000 access lines of typical length, a burst of reconnecting
/// agents, while the consumer catches up.
pub const QUEUE_BYTES: usize = 1024 * 1024;
/// What the drain thread's spare buffer keeps between batches.
const SPARE_BYTES: usize = 64 * 1024;
/// The longest a single line may be; longer ones are dropped (and counted) whole.
pub const MAX_LINE: usize = 64 * 1024;
/// At most one "lines dropped" warning per this interval.
const DROP_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// A byte-bounded queue of whole lines and the thread that drains it.
pub struct LineQueue {
    state: Mutex<QueueState>,
    /// Signalled when lines arrive.
    filled: Condvar,
    /// Signalled when the drain thread has written everything it took.
    drained: Condvar,
    capacity: usize,
    dropped: IntCounter,
}

#[derive(Default)]
struct QueueState {
    pending: Vec<u8>,
    /// The drain thread holds a batch it has not finished writing.
    writing: bool,
}

impl LineQueue {
    /// A queue of at most `capacity` bytes drained into `out` by a new thread; lines that
    /// do not fit are counted in `dropped`.
    pub fn start(
        name: &str,
        capacity: usize,
        out: impl Write + Send + 'static,
        dropped: IntCounter,
    ) -> std::io::Result<Arc<Self>> {
        let queue = Arc::new(Self {
            state: Mutex::new(QueueState::default()),
            filled: Condvar::new(),
            drained: Condvar::new(),
            capacity,
            dropped,
        });
        let drain = queue.clone();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || drain.drain(out))?;
        Ok(queue)
    }

    /// Queues one or more whole lines without waiting; `false` (and counted as dropped)
    /// when they do not fit.
    pub fn push(&self, lines: &[u8]) -> bool {
        if lines.is_empty() {
            return true;
        }
        let mut state = lock(&self.state);
        if lines.len() > MAX_LINE || state.pending.len() + lines.len() > self.capacity {
            drop(state);
            self.dropped.inc();
            return false;
        }
        let was_empty = state.pending.is_empty();
        state.pending.extend_from_slice(lines);
        drop(state);
        if was_empty {
            self.filled.notify_one();
        }
        true
    }

    #[cfg(test)]
    fn pending_capacity(&self) -> usize {
        lock(&self.state).pending.capacity()
    }

    /// Waits until everything queued so far has been written, for at most `timeout`;
    /// `false` if it had not. For an orderly exit.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = lock(&self.state);
        while !state.pending.is_empty() || state.writing {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = match self.drained.wait_timeout(state, left) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        true
    }

    fn drain(&self, mut out: impl Write) {
        let mut batch = Vec::new();
        let mut warned_at: Option<Instant> = None;
        let mut dropped_seen = self.dropped.get();
        loop {
            {
                let mut state = lock(&self.state);
                state.writing = false;
                self.drained.notify_all();
                while state.pending.is_empty() {
                    state = match self.filled.wait(state) {
                        Ok(state) => state,
                        Err(poisoned) => poisoned.into_inner(),
                    };
                }
                std::mem::swap(&mut state.pending, &mut batch);
                state.writing = true;
            }
            if out.write_all(&batch).and_then(|()| out.flush()).is_err() {
                // Nowhere to write (stdout closed): these lines are lost too.
                let lines = batch.iter().filter(|b| **b == b'\n').count().max(1);
                self.dropped.inc_by(lines as u64);
            }
            batch.clear();
            // A burst may have grown the spare buffer (up to the whole queue, 1 MiB, and
            // its twin `pending` as much): keep what a quiet edge needs, so a burst of
            // lines (a reconnect storm, a request flood) is not held for the life of the
            // process. Growing again costs a few reallocations per burst.
            batch.shrink_to(SPARE_BYTES);
            let dropped = self.dropped.get();
            if dropped > dropped_seen
                && warned_at.is_none_or(|at| at.elapsed() >= DROP_WARNING_INTERVAL)
            {
                tracing::warn!(
                    dropped = dropped - dropped_seen,
                    "log lines dropped: stdout is not keeping up (edge_access_log_dropped_total)"
                );
                warned_at = Some(Instant::now());
                dropped_seen = dropped;
            }
        }
    }
}

/// A [`MakeWriter`] for tracing's formatter: each event's line is collected and queued
/// whole when the writer is dropped (the formatter writes one event per writer).
#[derive(Clone)]
pub struct QueueWriter {
    queue: Option<Arc<LineQueue>>,
    dropped: IntCounter,
}

impl QueueWriter {
    /// Writes into `queue`; with `None` (the drain thread could not start) every line is
    /// dropped and counted.
    pub fn new(queue: Option<Arc<LineQueue>>, dropped: IntCounter) -> Self {
        Self { queue, dropped }
    }
}

/// One event's line on its way into the queue.
pub struct LineWriter<'a> {
    target: &'a QueueWriter,
    line: Vec<u8>,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter<'_> {
    fn drop(&mut self) {
        match &self.target.queue {
            Some(queue) => {
                queue.push(&self.line);
            }
            None if !self.line.is_empty() => self.target.dropped.inc(),
            None => {}
        }
    }
}

impl<'a> MakeWriter<'a> for QueueWriter {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            target: self,
            line: Vec::with_capacity(512),
        }
    }
}

/// Lines the process's stdout queue dropped; registered in every [`super::metrics::EdgeMetrics`]
/// as `edge_access_log_dropped_total`.
pub fn stdout_dropped() -> &'static IntCounter {
    static DROPPED: OnceLock<IntCounter> = OnceLock::new();
    DROPPED.get_or_init(|| {
        IntCounter::new(
            "edge_access_log_dropped_total",
            "Log lines (access and the edge's own) dropped because stdout was not keeping up.",
        )
        .expect("valid metric")
    })
}

/// The process's stdout, written off the caller's thread (started on first use).
pub fn stdout() -> QueueWriter {
    static QUEUE: OnceLock<Option<Arc<LineQueue>>> = OnceLock::new();
    let queue = QUEUE.get_or_init(|| {
        LineQueue::start(
            "edge-log-writer",
            QUEUE_BYTES,
            std::io::stdout(),
            stdout_dropped().clone(),
        )
        // Not `tracing`: its writer may be this very queue, still being made.
        .map_err(|e| {
            eprintln!("kas-edge: cannot start the log writer thread ({e}); log lines are dropped")
        })
        .ok()
    });
    QueueWriter::new(queue.clone(), stdout_dropped().clone())
}

/// Waits (at most `timeout`) until the stdout queue has written what it holds: called
/// before the process exits so the last log lines (the drain's own among them) are not lost.
pub fn flush_stdout(timeout: Duration) -> bool {
    stdout().queue.is_none_or(|queue| queue.flush(timeout))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A writer that blocks until the test lets it go, then hands what it got to the test:
    /// a log consumer that stopped reading.
    struct Stuck {
        gate: mpsc::Receiver<()>,
        out: mpsc::Sender<Vec<u8>>,
    }

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.gate.recv();
            let _ = self.out.send(buf.to_vec());
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn counter() -> IntCounter {
        IntCounter::new("dropped", "dropped").unwrap()
    }

    #[test]
    fn a_stuck_consumer_costs_lines_not_time_and_every_kept_line_is_whole() {
        let (open_gate, gate) = mpsc::channel();
        let (out, written) = mpsc::channel();
        let dropped = counter();
        let queue = LineQueue::start(
            "test-log-writer",
            1000,
            Stuck { gate, out },
            dropped.clone(),
        )
        .unwrap();
        let line = |i: usize| format!("{{\"n\":{i:04},\"pad\":\"{}\"}}\n", "x".repeat(80));
        // The first line is taken by the drain thread, which then blocks in its write.
        assert!(queue.push(line(0).as_bytes()));
        std::thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        let kept = (1..100).filter(|i| queue.push(line(*i).as_bytes())).count();
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "pushing waited"
        );
        assert_eq!(kept, 1000 / line(0).len(), "the queue holds what fits");
        assert_eq!(dropped.get() as usize, 99 - kept);
        // The consumer recovers: every kept line arrives whole and in order.
        for _ in 0..200 {
            let _ = open_gate.send(());
        }
        assert!(queue.flush(Duration::from_secs(5)));
        let text: Vec<u8> = written.try_iter().flatten().collect();
        let text = String::from_utf8(text).unwrap();
        let numbers: Vec<usize> = text.lines().map(|l| l[5..9].parse().unwrap()).collect();
        assert_eq!(numbers, (0..=kept).collect::<Vec<_>>());
    }

    /// A burst fills the queue to nearly its 1 MiB; once it is written, neither buffer
    /// the queue swaps keeps that size (the spare one is what `pending` becomes next).
    #[test]
    fn a_burst_of_lines_leaves_no_megabyte_buffers_behind() {
        let (open_gate, gate) = mpsc::channel();
        let (out, _written) = mpsc::channel();
        let queue = LineQueue::start(
            "test-log-writer",
            QUEUE_BYTES,
            Stuck { gate, out },
            counter(),
        )
        .unwrap();
        assert!(queue.push(b"first\n"));
        std::thread::sleep(Duration::from_millis(100));
        let line = format!("{}\n", "x".repeat(1023));
        let kept = (0..900).filter(|_| queue.push(line.as_bytes())).count();
        assert_eq!(kept, 900);
        assert!(queue.pending_capacity() >= 900 * 1024);
        for _ in 0..10 {
            let _ = open_gate.send(());
        }
        assert!(queue.flush(Duration::from_secs(5)));
        // The next line goes into the buffer the drain thread wrote the burst from.
        assert!(queue.push(b"after\n"));
        let _ = open_gate.send(());
        assert!(queue.flush(Duration::from_secs(5)));
        assert!(
            queue.pending_capacity() <= SPARE_BYTES,
            "{} bytes kept",
            queue.pending_capacity()
        );
    }

    #[test]
    fn oversized_lines_are_dropped_whole() {
        let (open_gate, gate) = mpsc::channel();
        let (out, written) = mpsc::channel();
        let dropped = counter();
        let queue = LineQueue::start(
            "test-log-writer",
            4 * MAX_LINE,
            Stuck { gate, out },
            dropped.clone(),
        )
        .unwrap();
        assert!(!queue.push(&vec![b'x'; MAX_LINE + 1]));
        assert!(queue.push(b"short\n"));
        let _ = open_gate.send(());
        assert!(queue.flush(Duration::from_secs(5)));
        assert_eq!(
            written.try_iter().flatten().collect::<Vec<u8>>(),
            b"short\n"
        );
        assert_eq!(dropped.get(), 1);
    }

    #[test]
    fn tracing_events_arrive_as_one_json_line_each() {
        let (open_gate, gate) = mpsc::channel();
        let (out, written) = mpsc::channel();
        let dropped = counter();
        let queue = LineQueue::start(
            "test-log-writer",
            64 * 1024,
            Stuck { gate, out },
            dropped.clone(),
        )
        .unwrap();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(QueueWriter::new(Some(queue.clone()), dropped.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "access", path = "/a", status = 200u16);
            tracing::info!(target: "access", path = "/b", status = 404u16);
        });
        for _ in 0..10 {
            let _ = open_gate.send(());
        }
        assert!(queue.flush(Duration::from_secs(5)));
        let text = String::from_utf8(written.try_iter().flatten().collect()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[1]["target"], "access");
        assert_eq!(lines[1]["path"], "/b");
        assert_eq!(lines[1]["status"], 404);
    }
}

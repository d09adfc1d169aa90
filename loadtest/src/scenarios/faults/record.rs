//! What each fault cost, measured from counters snapshotted when it began: who was cut
//! and when every one of them was back, the requests and errors inside its window, the
//! configuration commit made during it and who missed it; and the whole run's report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use serde::Serialize;

use super::timeline::ProcSample;
use crate::agent::Fleet;
use crate::stats::Stats;

/// One fault injected and its cost.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    /// The fault's name (`kill-pod`, `rollout`, ...).
    pub kind: String,
    /// What was done, concretely (which pod, which signal, how the edge restarted).
    pub how: String,
    /// Seconds since the run started: fault injected, fault over (pod back, GitLab
    /// answering again...), window closed (every agent back, or the budget spent).
    pub start_s: f64,
    pub end_s: f64,
    pub closed_s: f64,
    /// Who was cut, the requests and errors inside the window (its fields sit at the top
    /// level of the JSON record).
    #[serde(flatten)]
    pub cost: WindowCost,
    /// The configuration commit made during the fault.
    pub commit: Option<String>,
    /// Agents not holding the latest commit at the end of the recovery time after it.
    pub commits_missed: usize,
    /// From the commit until every agent held it; `None` if one never did.
    pub commit_everywhere_after_s: Option<f64>,
    pub edge_rss_before_bytes: Option<u64>,
    pub edge_rss_peak_bytes: Option<u64>,
    pub kas_rss_peak_bytes: Option<u64>,
    /// Set when the fault could not be injected as specified (and why).
    pub pending: Option<String>,
}

/// The run: every fault, what happened outside them, and the processes over time.
#[derive(Debug, Clone, Serialize)]
pub struct FaultsReport {
    pub faults: Vec<FaultRecord>,
    /// How long after a fault ends every agent it cut must be back.
    pub backoff_budget_s: f64,
    /// Errors outside every fault window, by kind, and the operations there.
    pub quiet_errors: BTreeMap<String, u64>,
    pub quiet_operations: u64,
    pub latest_commit: String,
    pub agents: usize,
    pub agents_on_latest_commit: usize,
    pub timeline: Vec<ProcSample>,
}

/// The counters when a fault began.
pub struct WindowStart {
    pub at_s: f64,
    at_us: u64,
    cuts: Vec<u64>,
    errors: BTreeMap<String, u64>,
    operations: u64,
    k8s_sent: u64,
    k8s_ok: u64,
}

/// The counters' difference when the window closed.
#[derive(Debug, Clone, Serialize)]
pub struct WindowCost {
    /// Agents cut (or not connected) during the window.
    pub agents_disconnected: usize,
    /// From the fault's start until the last of them was back; `None` if one was not.
    pub all_back_after_s: Option<f64>,
    /// Every one back within the back-off budget after the fault ended.
    pub back_within_budget: bool,
    pub requests_sent: u64,
    pub requests_failed: u64,
    /// Errors inside the window, by kind.
    pub errors: BTreeMap<String, u64>,
    /// Fleet operations inside the window.
    pub operations: u64,
}

pub fn error_counts(stats: &Stats) -> BTreeMap<String, u64> {
    stats
        .errors
        .snapshot()
        .into_iter()
        .map(|(kind, (n, _))| (kind, n))
        .collect()
}

/// `now - before`, kinds that did not grow left out.
pub fn error_delta(
    before: &BTreeMap<String, u64>,
    now: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    now.iter()
        .filter_map(|(kind, n)| {
            let d = n.saturating_sub(before.get(kind).copied().unwrap_or(0));
            (d > 0).then(|| (kind.clone(), d))
        })
        .collect()
}

fn micros(stats: &Stats) -> u64 {
    stats.start.elapsed().as_micros() as u64
}

impl WindowStart {
    pub fn now(stats: &Stats, fleet: &Fleet) -> Self {
        Self {
            at_s: stats.elapsed_secs(),
            at_us: micros(stats),
            cuts: fleet
                .slots
                .iter()
                .map(|s| s.cuts.load(Ordering::SeqCst))
                .collect(),
            errors: error_counts(stats),
            operations: stats.operations(),
            k8s_sent: Stats::get(&stats.k8s_sent),
            k8s_ok: Stats::get(&stats.k8s_ok),
        }
    }

    /// The window's cost, now. An agent is disconnected by the fault when it was cut in
    /// the window or is not connected now; it is back when it is connected again, and in
    /// budget when that happened within `budget_s` of the fault's end.
    pub fn close(&self, stats: &Stats, fleet: &Fleet, end_s: f64, budget_s: f64) -> WindowCost {
        let (mut disconnected, mut all_back, mut last_back_us) = (0, true, self.at_us);
        for (slot, cuts_before) in fleet.slots.iter().zip(&self.cuts) {
            let cut = slot.cuts.load(Ordering::SeqCst) > *cuts_before;
            if !cut && slot.is_connected() {
                continue;
            }
            disconnected += 1;
            let ready_at = slot.ready_at_us.load(Ordering::SeqCst);
            if slot.is_connected() && ready_at > self.at_us {
                last_back_us = last_back_us.max(ready_at);
            } else {
                all_back = false;
            }
        }
        let last_back_s = last_back_us as f64 / 1e6;
        let sent = Stats::get(&stats.k8s_sent).saturating_sub(self.k8s_sent);
        let ok = Stats::get(&stats.k8s_ok).saturating_sub(self.k8s_ok);
        WindowCost {
            agents_disconnected: disconnected,
            all_back_after_s: match (disconnected, all_back) {
                (0, _) => Some(0.0),
                (_, true) => Some(round3((last_back_s - self.at_s).max(0.0))),
                (_, false) => None,
            },
            back_within_budget: all_back && last_back_s <= end_s + budget_s,
            requests_sent: sent,
            requests_failed: sent.saturating_sub(ok),
            errors: error_delta(&self.errors, &error_counts(stats)),
            operations: stats.operations().saturating_sub(self.operations),
        }
    }
}

pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("-".into(), |b| format!("{:.1}", b as f64 / 1048576.0))
}

fn secs(v: Option<f64>) -> String {
    v.map_or("not all".into(), |s| format!("{s:.1}"))
}

impl FaultRecord {
    /// The errors of the window in one cell: `kind ×n, ...`.
    pub fn errors_text(&self) -> String {
        if self.cost.errors.is_empty() {
            return "none".into();
        }
        self.cost
            .errors
            .iter()
            .map(|(k, n)| format!("{k} ×{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The memory peaks of the window from the timeline.
    pub fn add_memory(&mut self, timeline: &[ProcSample]) {
        let (start, closed) = (self.start_s, self.closed_s);
        let within = |s: &&ProcSample| s.t >= start && s.t <= closed;
        self.edge_rss_before_bytes = timeline
            .iter()
            .rev()
            .find(|s| s.t < start && s.edge_rss_bytes > 0)
            .map(|s| s.edge_rss_bytes);
        // A window shorter than the sample interval: the first sample after its start.
        let mut window: Vec<&ProcSample> = timeline.iter().filter(within).collect();
        if window.is_empty() {
            window.extend(timeline.iter().find(|s| s.t >= start));
        }
        self.edge_rss_peak_bytes = window.iter().map(|s| s.edge_rss_bytes).max();
        self.kas_rss_peak_bytes = window.iter().map(|s| s.kas_rss_bytes).max();
    }
}

impl FaultsReport {
    /// The summary's rows: one per fault, then the run's totals.
    pub fn rows(&self) -> Vec<(String, String)> {
        let mut rows = Vec::new();
        for f in &self.faults {
            let pending = f
                .pending
                .as_ref()
                .map_or(String::new(), |p| format!(" · PENDING: {p}"));
            rows.push((
                f.kind.clone(),
                format!(
                    "{} cut, all back after {} s ({}), {} of {} requests failed, {} missed commit; errors: {}{pending}",
                    f.cost.agents_disconnected,
                    secs(f.cost.all_back_after_s),
                    if f.cost.back_within_budget { "in budget" } else { "OVER BUDGET" },
                    f.cost.requests_failed,
                    f.cost.requests_sent,
                    f.commits_missed,
                    f.errors_text(),
                ),
            ));
        }
        let quiet: u64 = self.quiet_errors.values().sum();
        rows.push((
            "outside fault windows".into(),
            format!("{quiet} errors in {} operations", self.quiet_operations),
        ));
        rows.push((
            "latest configuration commit".into(),
            format!(
                "{} held by {}/{} agents",
                short(&self.latest_commit),
                self.agents_on_latest_commit,
                self.agents
            ),
        ));
        rows
    }

    /// The per-fault table in Markdown (README, results files).
    pub fn markdown(&self) -> String {
        let mut out = String::from(
            "| fault | what was done | agents cut | all back after (s) | in back-off budget | k8s requests failed / sent | commits missed | commit everywhere after (s) | edge RSS before → peak (MiB) | kas RSS peak (MiB) | errors in window |\n\
             |---|---|---:|---:|---|---:|---:|---:|---:|---:|---|\n",
        );
        for f in &self.faults {
            let how = match &f.pending {
                Some(p) => format!("{} (PENDING: {p})", f.how),
                None => f.how.clone(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} / {} | {} | {} | {} → {} | {} | {} |",
                f.kind,
                how.replace('|', "/"),
                f.cost.agents_disconnected,
                secs(f.cost.all_back_after_s),
                if f.cost.back_within_budget {
                    "yes"
                } else {
                    "NO"
                },
                f.cost.requests_failed,
                f.cost.requests_sent,
                f.commits_missed,
                secs(f.commit_everywhere_after_s),
                mib(f.edge_rss_before_bytes),
                mib(f.edge_rss_peak_bytes),
                mib(f.kas_rss_peak_bytes),
                f.errors_text().replace('|', "/"),
            );
        }
        let quiet: u64 = self.quiet_errors.values().sum();
        let _ = writeln!(
            out,
            "\nOutside the fault windows: {quiet} errors in {} operations. Latest configuration commit {} held by {}/{} agents at the end. Back-off budget {:.0} s after each fault's end.",
            self.quiet_operations,
            short(&self.latest_commit),
            self.agents_on_latest_commit,
            self.agents,
            self.backoff_budget_s
        );
        out
    }
}

fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: &str, cut: usize, back: Option<f64>) -> FaultRecord {
        FaultRecord {
            kind: kind.into(),
            how: "a | b".into(),
            start_s: 10.0,
            end_s: 12.0,
            closed_s: 15.0,
            cost: WindowCost {
                agents_disconnected: cut,
                all_back_after_s: back,
                back_within_budget: back.is_some(),
                requests_sent: 20,
                requests_failed: 1,
                errors: BTreeMap::from([("cut".to_owned(), cut as u64)]),
                operations: 40,
            },
            commit: Some("0123456789abcdef".into()),
            commits_missed: 0,
            commit_everywhere_after_s: Some(1.5),
            edge_rss_before_bytes: None,
            edge_rss_peak_bytes: None,
            kas_rss_peak_bytes: None,
            pending: None,
        }
    }

    #[test]
    fn error_delta_keeps_what_grew() {
        let before = BTreeMap::from([("a".to_owned(), 3), ("b".to_owned(), 1)]);
        let now = BTreeMap::from([
            ("a".to_owned(), 5),
            ("b".to_owned(), 1),
            ("c".to_owned(), 2),
        ]);
        assert_eq!(
            error_delta(&before, &now),
            BTreeMap::from([("a".to_owned(), 2), ("c".to_owned(), 2)])
        );
    }

    #[test]
    fn memory_peaks_come_from_the_window() {
        let sample = |t: f64, edge: u64, kas: u64| ProcSample {
            t,
            connected: 1,
            errors: 0,
            edge_rss_bytes: edge,
            edge_cpu_cores: 0.0,
            kas_rss_bytes: kas,
            kas_cpu_cores: 0.0,
        };
        let timeline = [
            sample(9.0, 100, 1000),
            sample(11.0, 300, 900),
            sample(14.0, 200, 1100),
            sample(16.0, 900, 9000),
        ];
        let mut r = record("kill-pod", 3, Some(2.0));
        r.add_memory(&timeline);
        assert_eq!(
            (
                r.edge_rss_before_bytes,
                r.edge_rss_peak_bytes,
                r.kas_rss_peak_bytes
            ),
            (Some(100), Some(300), Some(1100))
        );
    }

    #[test]
    fn markdown_has_a_row_per_fault_and_no_stray_pipes() {
        let report = FaultsReport {
            faults: vec![record("kill-pod", 3, Some(2.0)), record("rollout", 5, None)],
            backoff_budget_s: 19.0,
            quiet_errors: BTreeMap::new(),
            quiet_operations: 100,
            latest_commit: "0123456789abcdef".into(),
            agents: 5,
            agents_on_latest_commit: 5,
            timeline: Vec::new(),
        };
        let md = report.markdown();
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(rows.len(), 3, "{md}");
        // Every row has as many cells as the header.
        let cells = |l: &str| l.matches('|').count();
        assert!(rows.iter().all(|r| cells(r) == cells(rows[0])), "{md}");
        assert!(rows[2].contains("| not all | NO |"), "{md}");
        assert!(md.contains("0123456789ab held by 5/5"));
        assert_eq!(report.rows().len(), 4);
    }
}

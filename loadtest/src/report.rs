//! Results: one structure, rendered three ways — a summary table for the terminal, JSON
//! for machines and an HTML page for people. The page draws its charts as inline SVG, so
//! it opens from a file, offline, years later.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::probe::EdgeSample;

#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the run started.
    pub t: f64,
    pub phase: String,
    pub connected: i64,
    pub handshakes: u64,
    pub connects_ok: u64,
    pub errors: u64,
    pub cuts: u64,
    pub echo_ok: u64,
    pub rpc_ok: u64,
    /// Kubernetes API requests answered with success (k8s-proxy).
    pub k8s_ok: u64,
    /// Tunnels carrying a request now, when the agents hold tunnels.
    pub tunnels_busy: Option<u64>,
    pub edge: Option<EdgeSample>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Bucket {
    /// Upper bound in milliseconds; `null` for the overflow bucket.
    pub le_ms: Option<f64>,
    pub count: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub min_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub buckets: Vec<Bucket>,
}

const BUCKET_BOUNDS_MS: &[f64] = &[
    0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
    10000.0,
];

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Percentiles and fixed log-spaced buckets of a microsecond histogram; `None` if empty.
pub fn summarize(h: &Histogram<u64>) -> Option<LatencySummary> {
    if h.is_empty() {
        return None;
    }
    let mut counts = vec![0u64; BUCKET_BOUNDS_MS.len() + 1];
    for v in h.iter_recorded() {
        let value_ms = ms(h.highest_equivalent(v.value_iterated_to()));
        let i = BUCKET_BOUNDS_MS
            .iter()
            .position(|b| value_ms <= *b)
            .unwrap_or(BUCKET_BOUNDS_MS.len());
        counts[i] += v.count_at_value();
    }
    let buckets = counts
        .iter()
        .enumerate()
        .map(|(i, &count)| Bucket {
            le_ms: BUCKET_BOUNDS_MS.get(i).copied(),
            count,
        })
        .collect();
    Some(LatencySummary {
        count: h.len(),
        mean_ms: h.mean() / 1000.0,
        min_ms: ms(h.min()),
        p50_ms: ms(h.value_at_quantile(0.5)),
        p90_ms: ms(h.value_at_quantile(0.9)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
        buckets,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct Totals {
    pub agents: usize,
    pub connect_attempts: u64,
    pub handshakes: u64,
    pub connects_ok: u64,
    pub peak_connected: i64,
    pub connected_at_end: i64,
    pub unexpected_cuts: u64,
    pub expected_cuts: u64,
    pub cycles: u64,
    pub config_messages: u64,
    pub echo_sent: u64,
    pub echo_ok: u64,
    pub rpc_sent: u64,
    pub rpc_ok: u64,
    pub k8s_sent: u64,
    pub k8s_ok: u64,
    pub tunnels_opened: u64,
    pub errors: u64,
    pub operations: u64,
    pub error_rate: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorEntry {
    pub kind: String,
    pub count: u64,
    pub example: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct EdgeSummary {
    pub pids: Vec<u32>,
    pub connections_measured: Option<i64>,
    pub baseline_rss_bytes: Option<u64>,
    pub loaded_rss_bytes: Option<u64>,
    pub rss_per_connection_bytes: Option<f64>,
    pub cpu_seconds_ramp: Option<f64>,
    pub cpu_ms_per_handshake: Option<f64>,
    pub cpu_cores_hold: Option<f64>,
    pub cpu_us_per_connection_per_s: Option<f64>,
    pub open_connections: Option<f64>,
    pub active_streams: Option<f64>,
    /// hostile: right after the fleet connected (before its warm-up), before the
    /// attacks, the highest while they ran, and after they stopped and a settle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_fleet_connected_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_before_attack_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_peak_attack_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_after_attack_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_cores_attack: Option<f64>,
}

/// One attack kind of the `hostile` scenario: what the attacker tried and what the edge
/// did about it. Kept apart from [`Totals`], which are the legitimate fleet's alone.
#[derive(Debug, Clone, Serialize)]
pub struct AttackSummary {
    pub kind: String,
    pub sources: usize,
    /// Connections (or, for request_flood, inputs sent on a connection of their own).
    pub attempts: u64,
    /// Connected: TCP for silent_tcp, TLS for the others, authenticated for
    /// stalled_reader.
    pub established: u64,
    /// Ended by the edge (EOF, reset, refused during the handshake).
    pub closed_by_edge: u64,
    /// Still open when the attack stopped (we closed them).
    pub open_at_end: u64,
    /// From connected to the edge's close.
    pub close_p50_ms: Option<f64>,
    pub close_max_ms: Option<f64>,
    /// What came back: HTTP status lines, GOAWAYs.
    pub responses: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    pub error_examples: BTreeMap<String, String>,
    /// stalled_reader: bytes waiting for the readers when they read again.
    pub bytes_held: u64,
    pub elapsed_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tool: String,
    pub scenario: String,
    pub started_unix_ms: u64,
    pub elapsed_secs: f64,
    pub targets: Vec<String>,
    pub params: serde_json::Value,
    pub totals: Totals,
    pub errors: Vec<ErrorEntry>,
    pub latency: BTreeMap<String, LatencySummary>,
    /// Scenario-specific results (time until all back, cut times, achieved rate...).
    pub facts: serde_json::Map<String, serde_json::Value>,
    pub edge: Option<EdgeSummary>,
    /// hostile: the attacks, one per kind.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attacks: Vec<AttackSummary>,
    /// faults: the faults injected, their cost, and the processes over time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub faults: Option<crate::scenarios::faults::FaultsReport>,
    pub checks: Vec<Check>,
    pub passed: bool,
    pub timeline: Vec<Sample>,
}

fn fmt_value(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.3}"),
            _ => n.to_string(),
        },
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// One line of the summary: (section, name, value).
type Row = (&'static str, String, String);

/// The summary's rows as they are collected, section by section.
#[derive(Default)]
struct Rows(Vec<Row>);

impl Rows {
    fn add(&mut self, section: &'static str, name: impl Into<String>, value: impl Into<String>) {
        self.0.push((section, name.into(), value.into()));
    }
}

/// `-` for a number that was not measured, else the number as `show` writes it.
fn or_dash<T>(v: Option<T>, show: impl FnOnce(T) -> String) -> String {
    v.map_or("-".into(), show)
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    or_dash(v, |v| v.to_string())
}

fn mib(bytes: Option<u64>) -> String {
    or_dash(bytes, |b| format!("{:.1} MiB", b as f64 / 1048576.0))
}

impl Report {
    /// Rows of (section, name, value) shared by the terminal table and the HTML page.
    fn rows(&self) -> Vec<Row> {
        let mut rows = Rows::default();
        self.run_rows(&mut rows);
        totals_rows(&self.totals, &mut rows);
        for e in &self.errors {
            let value = format!("{} (e.g. {})", e.count, e.example);
            rows.add("errors", e.kind.clone(), value);
        }
        for (name, l) in &self.latency {
            let value = format!(
                "n={} p50={:.2} p90={:.2} p99={:.2} p99.9={:.2} max={:.2}",
                l.count, l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms
            );
            rows.add("latency", format!("{name} (ms)"), value);
        }
        for (k, v) in &self.facts {
            rows.add("scenario", k.replace('_', " "), fmt_value(v));
        }
        for a in &self.attacks {
            attack_rows(a, &mut rows);
        }
        if let Some(faults) = &self.faults {
            for (name, value) in faults.rows() {
                rows.add("faults", name, value);
            }
        }
        if let Some(e) = &self.edge {
            edge_rows(e, &mut rows);
        }
        for c in &self.checks {
            let verdict = if c.ok { "ok  " } else { "FAIL" };
            rows.add("checks", c.name.clone(), format!("{verdict} {}", c.detail));
        }
        rows.0
    }

    /// What ran, against what, for how long, and the verdict.
    fn run_rows(&self, rows: &mut Rows) {
        rows.add("run", "scenario", self.scenario.clone());
        rows.add("run", "targets", self.targets.join(" "));
        rows.add("run", "elapsed", format!("{:.1} s", self.elapsed_secs));
        rows.add("run", "result", if self.passed { "PASS" } else { "FAIL" });
    }

    pub fn summary_table(&self) -> String {
        let rows = self.rows();
        let width = rows
            .iter()
            .map(|(_, k, _)| k.chars().count())
            .max()
            .unwrap_or(10);
        let mut out = String::new();
        for (section, rows) in sections(&rows) {
            let rule = "─".repeat(width.saturating_sub(section.len()) + 8);
            let _ = writeln!(out, "── {section} {rule}");
            for (_, k, v) in rows {
                let _ = writeln!(out, "  {k:<width$}  {v}");
            }
        }
        out
    }

    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self).context("serializing the report")?;
        write_file(path, &text)
    }

    /// The faults scenario's table in Markdown; for other scenarios the summary in a code
    /// block.
    pub fn write_markdown(&self, path: &Path) -> anyhow::Result<()> {
        let text = match &self.faults {
            Some(faults) => faults.markdown(),
            None => format!("```\n{}```\n", self.summary_table()),
        };
        write_file(path, &text)
    }

    pub fn write_html(&self, path: &Path) -> anyhow::Result<()> {
        write_file(path, &self.html())
    }

    /// The page: verdict, charts over time, latency histograms, then the summary table.
    pub fn html(&self) -> String {
        let mut body = self.html_heading();
        if let Some(faults) = &self.faults {
            body.push_str(&faults.html());
        }
        body.push_str(&self.timeline_charts());
        body.push_str(&self.latency_charts());
        body.push_str(&self.html_table());
        html_page(&self.scenario, &body)
    }

    /// The verdict in the title, and the run in one line.
    fn html_heading(&self) -> String {
        let (verdict, color) = if self.passed {
            ("PASS", "#1a7f37")
        } else {
            ("FAIL", "#cf222e")
        };
        format!(
            "<h1>kas-loadtest: {} <span style=\"color:{color}\">{verdict}</span></h1>\
             <p>{} agents → {} · {:.1} s · error rate {:.6}</p>",
            esc(&self.scenario),
            self.totals.agents,
            esc(&self.targets.join(", ")),
            self.elapsed_secs,
            self.totals.error_rate
        )
    }

    /// Charts over the run's time: connected agents, handshake and request rates, edge
    /// memory. The request rate only for runs that sent requests, memory only when the
    /// edge was sampled.
    fn timeline_charts(&self) -> String {
        let connected: Vec<(f64, f64)> = self
            .timeline
            .iter()
            .map(|s| (s.t, s.connected as f64))
            .collect();
        let mut charts = line_chart("Connected agents", "agents", &connected, "#0969da");
        charts.push_str(&bar_series(
            "Handshakes per second",
            &rates(&self.timeline, |s| s.handshakes),
            "#8250df",
        ));
        if self.totals.rpc_sent > 0 {
            charts.push_str(&bar_series(
                "Requests answered per second",
                &rates(&self.timeline, |s| s.rpc_ok),
                "#1a7f37",
            ));
        }
        if self.totals.k8s_sent > 0 {
            charts.push_str(&bar_series(
                "Kubernetes API requests answered per second",
                &rates(&self.timeline, |s| s.k8s_ok),
                "#1a7f37",
            ));
        }
        let busy: Vec<(f64, f64)> = self
            .timeline
            .iter()
            .filter_map(|s| Some((s.t, s.tunnels_busy? as f64)))
            .collect();
        if !busy.is_empty() {
            charts.push_str(&line_chart(
                "Tunnels carrying a request",
                "tunnels",
                &busy,
                "#8250df",
            ));
        }
        let rss: Vec<(f64, f64)> = self
            .timeline
            .iter()
            .filter_map(|s| {
                let b = s.edge.as_ref()?.rss_bytes?;
                Some((s.t, b as f64 / 1048576.0))
            })
            .collect();
        if !rss.is_empty() {
            charts.push_str(&line_chart("Edge resident memory", "MiB", &rss, "#bc4c00"));
        }
        charts
    }

    /// Per latency: its percentiles in a line and its histogram.
    fn latency_charts(&self) -> String {
        let mut charts = String::new();
        for (name, l) in &self.latency {
            let labels: Vec<String> = l
                .buckets
                .iter()
                .map(|b| b.le_ms.map_or("more".into(), |v| format!("≤{v}")))
                .collect();
            let values: Vec<f64> = l.buckets.iter().map(|b| b.count as f64).collect();
            let _ = write!(
                charts,
                "<p>{} {}: p50 {:.2} ms · p90 {:.2} · p99 {:.2} · p99.9 {:.2} · max {:.2}</p>",
                l.count,
                esc(name),
                l.p50_ms,
                l.p90_ms,
                l.p99_ms,
                l.p999_ms,
                l.max_ms
            );
            charts.push_str(&bar_chart(
                &format!("{name} latency histogram (ms)"),
                &labels,
                &values,
                "#0969da",
            ));
        }
        charts
    }

    /// The terminal's summary as an HTML table, a header row per section.
    fn html_table(&self) -> String {
        let mut table = String::from("<h2>Summary</h2><table>");
        let rows = self.rows();
        for (section, rows) in sections(&rows) {
            let _ = write!(table, "<tr><th colspan=2>{}</th></tr>", esc(section));
            for (_, k, v) in rows {
                let _ = write!(table, "<tr><td>{}</td><td>{}</td></tr>", esc(k), esc(v));
            }
        }
        table.push_str("</table>");
        table
    }
}

/// The rows in runs of one section each, for the renderers that head every section.
fn sections(rows: &[Row]) -> impl Iterator<Item = (&'static str, &[Row])> {
    rows.chunk_by(|a, b| a.0 == b.0).map(|run| (run[0].0, run))
}

/// A complete page around `body`, its style inline: one file that opens offline.
fn html_page(scenario: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8>\
         <title>kas-loadtest {}</title><style>\
         body{{font:14px system-ui,sans-serif;margin:2em;max-width:900px;color:#1f2328}}\
         table{{border-collapse:collapse}}td,th{{padding:2px 10px;text-align:left;vertical-align:top}}\
         th{{background:#f6f8fa;padding-top:8px}}svg{{display:block;margin:1em 0}}\
         </style></head><body>{body}</body></html>\n",
        esc(scenario)
    )
}

/// The fleet's counters: connections (agents), what went over them (streams) and how many
/// of those operations failed (errors).
fn totals_rows(t: &Totals, rows: &mut Rows) {
    rows.add("agents", "agents", t.agents.to_string());
    rows.add("agents", "connect attempts", t.connect_attempts.to_string());
    rows.add("agents", "handshakes", t.handshakes.to_string());
    rows.add(
        "agents",
        "connected (authenticated)",
        t.connects_ok.to_string(),
    );
    rows.add("agents", "peak connected", t.peak_connected.to_string());
    rows.add("agents", "unexpected cuts", t.unexpected_cuts.to_string());
    rows.add("agents", "expected cuts", t.expected_cuts.to_string());
    rows.add("agents", "requested reconnects", t.cycles.to_string());
    let config = t.config_messages.to_string();
    rows.add("streams", "configuration messages", config);
    let echo = format!("{} / {}", t.echo_sent, t.echo_ok);
    rows.add("streams", "echo sent / answered", echo);
    rows.add(
        "streams",
        "rpc sent / ok",
        format!("{} / {}", t.rpc_sent, t.rpc_ok),
    );
    if t.k8s_sent > 0 {
        let k8s = format!("{} / {}", t.k8s_sent, t.k8s_ok);
        rows.add("streams", "k8s requests sent / ok", k8s);
    }
    if t.tunnels_opened > 0 {
        rows.add("streams", "tunnels opened", t.tunnels_opened.to_string());
    }
    let errors = format!("{} / {}", t.errors, t.operations);
    rows.add("errors", "errors / operations", errors);
    rows.add("errors", "error rate", format!("{:.6}", t.error_rate));
}

/// The edge's cost: memory and CPU, in total and per connection, and its own gauges.
fn edge_rows(e: &EdgeSummary, rows: &mut Rows) {
    let pids: Vec<String> = e.pids.iter().map(|p| p.to_string()).collect();
    rows.add("edge", "pid", pids.join(" "));
    let rss = format!(
        "{} / {}",
        mib(e.baseline_rss_bytes),
        mib(e.loaded_rss_bytes)
    );
    rows.add("edge", "rss baseline / loaded", rss);
    let rss_per_conn = or_dash(e.rss_per_connection_bytes, |b| {
        format!("{:.0} B ({:.1} KiB)", b, b / 1024.0)
    });
    rows.add("edge", "rss per connection", rss_per_conn);
    let ramp = or_dash(e.cpu_seconds_ramp, |c| format!("{c:.2} s"));
    rows.add("edge", "cpu during ramp", ramp);
    let per_handshake = or_dash(e.cpu_ms_per_handshake, |c| format!("{c:.3} ms"));
    rows.add("edge", "cpu per handshake", per_handshake);
    let hold = or_dash(e.cpu_cores_hold, |c| {
        format!("{:.1} % of a core", c * 100.0)
    });
    rows.add("edge", "cpu while holding", hold);
    let per_conn = or_dash(e.cpu_us_per_connection_per_s, |c| format!("{c:.2} µs/s"));
    rows.add("edge", "cpu per held connection", per_conn);
    if e.rss_before_attack_bytes.is_some() {
        let rss = format!(
            "{} / {} / {}",
            mib(e.rss_before_attack_bytes),
            mib(e.rss_peak_attack_bytes),
            mib(e.rss_after_attack_bytes)
        );
        rows.add("edge", "rss before / peak during / after attacks", rss);
        rows.add(
            "edge",
            "rss when the fleet had connected (before its warm-up)",
            mib(e.rss_fleet_connected_bytes),
        );
        let cpu = or_dash(e.cpu_cores_attack, |c| {
            format!("{:.1} % of a core", c * 100.0)
        });
        rows.add("edge", "cpu during the attacks", cpu);
    }
    rows.add("edge", "edge_open_connections", opt(e.open_connections));
    rows.add("edge", "edge_active_streams", opt(e.active_streams));
}

/// One attack in a line or three: what it tried, how the edge closed it, what it saw.
fn attack_rows(a: &AttackSummary, rows: &mut Rows) {
    let close = match (a.close_p50_ms, a.close_max_ms) {
        (Some(p50), Some(max)) => format!(" (after p50 {p50:.0} ms, max {max:.0} ms)"),
        _ => String::new(),
    };
    let mut line = format!(
        "{} attempts from {} sources · {} established · {} closed by the edge{close} · {} open at the end",
        a.attempts, a.sources, a.established, a.closed_by_edge, a.open_at_end
    );
    if a.bytes_held > 0 {
        let _ = write!(line, " · {} KiB held for the readers", a.bytes_held / 1024);
    }
    rows.add("attacks", a.kind.clone(), line);
    if !a.responses.is_empty() {
        let seen: Vec<String> = a
            .responses
            .iter()
            .map(|(k, n)| format!("{k} ×{n}"))
            .collect();
        rows.add("attacks", format!("{} saw", a.kind), seen.join(", "));
    }
    if !a.errors.is_empty() {
        let errors: Vec<String> = a
            .errors
            .iter()
            .map(|(k, n)| {
                let example = a.error_examples.get(k).map_or("", |e| e.as_str());
                format!("{k} ×{n} (e.g. {example})")
            })
            .collect();
        rows.add("attacks", format!("{} errors", a.kind), errors.join("; "));
    }
}

fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Per-second rates of a cumulative counter between consecutive samples.
pub(crate) fn rates(timeline: &[Sample], counter: impl Fn(&Sample) -> u64) -> Vec<(f64, f64)> {
    timeline
        .windows(2)
        .filter_map(|w| {
            let dt = w[1].t - w[0].t;
            (dt > 0.0).then(|| {
                (
                    w[1].t,
                    counter(&w[1]).saturating_sub(counter(&w[0])) as f64 / dt,
                )
            })
        })
        .collect()
}

const W: f64 = 760.0;
const H: f64 = 240.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 15.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 40.0;

/// A "nice" axis maximum (1, 2, 2.5, 5 × 10^k) at or above `v`.
pub(crate) fn nice_max(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let exp = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * exp >= v {
            return m * exp;
        }
    }
    10.0 * exp
}

pub(crate) fn fmt_tick(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v.fract().abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn frame(title: &str, y_max: f64, unit: &str) -> String {
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-size=\"11\" font-family=\"system-ui,sans-serif\">\
         <text x=\"{LEFT}\" y=\"16\" font-size=\"13\" font-weight=\"bold\">{}</text>",
        esc(title)
    );
    let plot_h = H - TOP - BOTTOM;
    for i in 0..=4 {
        let v = y_max * f64::from(i) / 4.0;
        let y = TOP + plot_h - plot_h * f64::from(i) / 4.0;
        let _ = write!(
            s,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#d0d7de\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            fmt_tick(v)
        );
    }
    let _ = write!(
        s,
        "<text x=\"12\" y=\"{:.1}\" transform=\"rotate(-90 12 {:.1})\" text-anchor=\"middle\">{}</text>",
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0,
        esc(unit)
    );
    s
}

fn line_chart(title: &str, unit: &str, points: &[(f64, f64)], color: &str) -> String {
    if points.is_empty() {
        return String::new();
    }
    let x_max = points.iter().map(|p| p.0).fold(0.0, f64::max).max(1e-9);
    let y_max = nice_max(points.iter().map(|p| p.1).fold(0.0, f64::max));
    let (plot_w, plot_h) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let mut s = frame(title, y_max, unit);
    for i in 0..=5 {
        let t = x_max * f64::from(i) / 5.0;
        let x = LEFT + plot_w * f64::from(i) / 5.0;
        let _ = write!(
            s,
            "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}s</text>",
            H - BOTTOM + 16.0,
            if x_max >= 10.0 {
                format!("{t:.0}")
            } else {
                format!("{t:.1}")
            }
        );
    }
    let path: Vec<String> = points
        .iter()
        .map(|(t, v)| {
            format!(
                "{:.1},{:.1}",
                LEFT + plot_w * t / x_max,
                TOP + plot_h - plot_h * v / y_max
            )
        })
        .collect();
    let _ = write!(
        s,
        "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">time</text></svg>",
        path.join(" "),
        LEFT + plot_w / 2.0,
        H - 6.0
    );
    s
}

/// Bars over time (one per sample interval).
fn bar_series(title: &str, points: &[(f64, f64)], color: &str) -> String {
    let labels: Vec<String> = points.iter().map(|(t, _)| format!("{t:.0}s")).collect();
    let values: Vec<f64> = points.iter().map(|p| p.1).collect();
    bar_chart(title, &labels, &values, color)
}

fn bar_chart(title: &str, labels: &[String], values: &[f64], color: &str) -> String {
    if values.is_empty() {
        return String::new();
    }
    let y_max = nice_max(values.iter().copied().fold(0.0, f64::max));
    let (plot_w, plot_h) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let mut s = frame(title, y_max, "");
    let slot = plot_w / values.len() as f64;
    // At most ~20 labels, so long runs stay readable.
    let label_every = values.len().div_ceil(20).max(1);
    for (i, v) in values.iter().enumerate() {
        let h = plot_h * v / y_max;
        let x = LEFT + slot * i as f64;
        let _ = write!(
            s,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{color}\"><title>{}: {}</title></rect>",
            x + slot * 0.1,
            TOP + plot_h - h,
            (slot * 0.8).max(0.5),
            esc(labels.get(i).map_or("", |l| l.as_str())),
            fmt_tick(*v)
        );
        if i % label_every == 0 {
            let _ = write!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                x + slot / 2.0,
                H - BOTTOM + 16.0,
                esc(labels.get(i).map_or("", |l| l.as_str()))
            );
        }
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_buckets() {
        let mut h = crate::stats::new_histogram();
        for us in 1..=1000u64 {
            h.record(us * 10).unwrap(); // 0.01 .. 10 ms
        }
        let s = summarize(&h).unwrap();
        assert_eq!(s.count, 1000);
        assert!((s.p50_ms - 5.0).abs() < 0.05, "{}", s.p50_ms);
        assert!((s.p99_ms - 9.9).abs() < 0.05, "{}", s.p99_ms);
        assert_eq!(s.buckets.iter().map(|b| b.count).sum::<u64>(), 1000);
        assert!(summarize(&crate::stats::new_histogram()).is_none());
    }

    #[test]
    fn charts_are_self_contained_svg() {
        let svg = line_chart("x<y", "n", &[(0.0, 1.0), (1.0, 3.0)], "#000");
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>") && svg.contains("x&lt;y"));
        assert!(!svg.contains("http://") || svg.contains("http://www.w3.org/2000/svg"));
        assert_eq!(nice_max(73.0), 100.0);
        assert_eq!(nice_max(2001.0), 2500.0);
    }
}

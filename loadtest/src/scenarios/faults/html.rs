//! The faults report's part of the HTML page: charts over the whole run (agents connected,
//! new errors per sample, edge and kas memory and CPU) with every fault's window shaded and
//! named on each, and the per-fault table. Inline SVG, nothing fetched at view time.

use std::fmt::Write as _;

use super::record::FaultsReport;
use super::timeline::ProcSample;
use crate::report::{esc, fmt_tick, nice_max};

const W: f64 = 860.0;
const H: f64 = 220.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 15.0;
const TOP: f64 = 34.0;
const BOTTOM: f64 = 30.0;

/// One line of a chart: its name, color and points (seconds, value).
struct Series<'a> {
    name: &'a str,
    color: &'a str,
    points: Vec<(f64, f64)>,
}

/// Fault windows: (start, closed, label).
type Marks = [(f64, f64, String)];

impl FaultsReport {
    /// The charts and the table.
    pub fn html(&self) -> String {
        let tl = &self.timeline;
        let marks: Vec<(f64, f64, String)> = self
            .faults
            .iter()
            .enumerate()
            .map(|(i, f)| {
                (
                    f.start_s,
                    f.closed_s.max(f.end_s),
                    format!("{} {}", i + 1, f.kind),
                )
            })
            .collect();
        let x_max = tl.last().map_or(1.0, |s| s.t).max(1.0);
        let pick = |f: fn(&ProcSample) -> f64| tl.iter().map(|s| (s.t, f(s))).collect::<Vec<_>>();
        let errors: Vec<(f64, f64)> = tl
            .windows(2)
            .map(|w| (w[1].t, w[1].errors.saturating_sub(w[0].errors) as f64))
            .collect();
        let mut html = String::from("<h2>Faults</h2>");
        html.push_str(&chart(
            "Agents connected",
            "agents",
            x_max,
            &marks,
            &[Series {
                name: "connected",
                color: "#0969da",
                points: pick(|s| s.connected as f64),
            }],
        ));
        html.push_str(&chart(
            "Errors (new per sample)",
            "errors",
            x_max,
            &marks,
            &[Series {
                name: "errors",
                color: "#cf222e",
                points: errors,
            }],
        ));
        html.push_str(&chart(
            "Resident memory",
            "MiB",
            x_max,
            &marks,
            &[
                Series {
                    name: "kas-edge",
                    color: "#bc4c00",
                    points: pick(|s| s.edge_rss_bytes as f64 / 1048576.0),
                },
                Series {
                    name: "kas pods (sum)",
                    color: "#8250df",
                    points: pick(|s| s.kas_rss_bytes as f64 / 1048576.0),
                },
            ],
        ));
        html.push_str(&chart(
            "CPU",
            "cores",
            x_max,
            &marks,
            &[
                Series {
                    name: "kas-edge",
                    color: "#bc4c00",
                    points: pick(|s| s.edge_cpu_cores),
                },
                Series {
                    name: "kas pods (sum)",
                    color: "#8250df",
                    points: pick(|s| s.kas_cpu_cores),
                },
            ],
        ));
        html.push_str(&self.table());
        html
    }

    fn table(&self) -> String {
        let mut t = String::from(
            "<table><tr><th>#</th><th>fault</th><th>what was done</th><th>agents cut</th>\
             <th>all back after</th><th>in budget</th><th>k8s requests failed / sent</th>\
             <th>commits missed</th><th>edge RSS before → peak</th><th>kas RSS peak</th>\
             <th>errors in window</th></tr>",
        );
        let mib =
            |b: Option<u64>| b.map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0));
        for (i, f) in self.faults.iter().enumerate() {
            let how = match &f.pending {
                Some(p) => format!("{} (PENDING: {p})", f.how),
                None => f.how.clone(),
            };
            let back = f
                .cost
                .all_back_after_s
                .map_or("not all".into(), |s| format!("{s:.1} s"));
            let budget = if f.cost.back_within_budget {
                "yes"
            } else {
                "<b style=\"color:#cf222e\">NO</b>"
            };
            let _ = write!(
                t,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{budget}</td>\
                 <td>{} / {}</td><td>{}</td><td>{} → {}</td><td>{}</td><td>{}</td></tr>",
                i + 1,
                esc(&f.kind),
                esc(&how),
                f.cost.agents_disconnected,
                back,
                f.cost.requests_failed,
                f.cost.requests_sent,
                f.commits_missed,
                mib(f.edge_rss_before_bytes),
                mib(f.edge_rss_peak_bytes),
                mib(f.kas_rss_peak_bytes),
                esc(&f.errors_text()),
            );
        }
        t.push_str("</table>");
        let quiet: u64 = self.quiet_errors.values().sum();
        let _ = write!(
            t,
            "<p>Outside the fault windows: {quiet} errors in {} operations. Back-off budget \
             {:.0} s after each fault's end.</p>",
            self.quiet_operations, self.backoff_budget_s
        );
        t
    }
}

/// A line chart over `[0, x_max]` seconds with the fault windows shaded and numbered.
fn chart(title: &str, unit: &str, x_max: f64, marks: &Marks, series: &[Series<'_>]) -> String {
    let y_max = nice_max(
        series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .fold(0.0, f64::max),
    );
    let (plot_w, plot_h) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let x = |t: f64| LEFT + plot_w * (t / x_max).clamp(0.0, 1.0);
    let y = |v: f64| TOP + plot_h - plot_h * (v / y_max).clamp(0.0, 1.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" \
         font-size=\"10\" font-family=\"system-ui,sans-serif\">\
         <text x=\"{LEFT}\" y=\"14\" font-size=\"13\" font-weight=\"bold\">{}</text>",
        esc(title)
    );
    for (start, end, label) in marks {
        let (x0, x1) = (x(*start), x(*end));
        // A narrow window shows its number alone; the table names it.
        let label = match label.split_once(' ') {
            Some((number, _)) if x1 - x0 < 6.0 * label.chars().count() as f64 + 4.0 => number,
            _ => label.as_str(),
        };
        let _ = write!(
            s,
            "<rect x=\"{x0:.1}\" y=\"{TOP}\" width=\"{:.1}\" height=\"{plot_h}\" fill=\"#fff1e5\" stroke=\"#fb8f44\" stroke-dasharray=\"3 2\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" fill=\"#bc4c00\">{}</text>",
            (x1 - x0).max(1.5),
            x0 + 2.0,
            TOP + 10.0,
            esc(label)
        );
    }
    for i in 0..=4 {
        let v = y_max * f64::from(i) / 4.0;
        let yy = y(v);
        let _ = write!(
            s,
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#d0d7de\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - RIGHT,
            LEFT - 6.0,
            yy + 4.0,
            fmt_tick(v)
        );
    }
    for i in 0..=6 {
        let t = x_max * f64::from(i) / 6.0;
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{t:.0} s</text>",
            x(t),
            H - BOTTOM + 14.0
        );
    }
    let _ = write!(
        s,
        "<text x=\"12\" y=\"{0:.1}\" transform=\"rotate(-90 12 {0:.1})\" text-anchor=\"middle\">{1}</text>",
        TOP + plot_h / 2.0,
        esc(unit)
    );
    let mut legend_x = W - RIGHT - 150.0 * series.len() as f64;
    for line in series {
        let points: Vec<String> = line
            .points
            .iter()
            .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
            .collect();
        let _ = write!(
            s,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"{}\"/>\
             <rect x=\"{legend_x:.1}\" y=\"6\" width=\"10\" height=\"10\" fill=\"{}\"/>\
             <text x=\"{:.1}\" y=\"15\">{}</text>",
            line.color,
            points.join(" "),
            line.color,
            legend_x + 14.0,
            esc(line.name)
        );
        legend_x += 150.0;
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_and_lines_are_drawn_inline() {
        let marks = vec![(10.0, 20.0, "1 kill-pod".to_owned())];
        let svg = chart(
            "Agents connected",
            "agents",
            60.0,
            &marks,
            &[Series {
                name: "connected",
                color: "#0969da",
                points: vec![(0.0, 5.0), (30.0, 10.0)],
            }],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("1 kill-pod") && svg.contains("<polyline"));
        // The window starts a sixth of the way in.
        assert!(svg.contains(&format!(
            "<rect x=\"{:.1}\"",
            LEFT + (W - LEFT - RIGHT) / 6.0
        )));
    }
}

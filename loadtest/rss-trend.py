#!/usr/bin/env python3
"""Is the edge's memory flat over a kas-loadtest run? Reads the run's JSON report (its
timeline holds the edge's RSS every second when --edge-pid is given), fits a line by least
squares to the samples of one phase after a warm-up, and prints one line: the slope, what
it adds up to over the window, and the samples' scatter around the line. The memory is
flat when the line's change over the window is within twice the scatter (a trend smaller
than the noise the samples show) or below 1 % of the mean. Exit status 0 when flat, 1 when
not, 2 when there are too few samples to say.

    loadtest/rss-trend.py REPORT.json [--phase churn] [--skip 60]
"""
import argparse
import json
import statistics
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report")
    ap.add_argument("--phase", default="churn", help="timeline phase to fit (default churn)")
    ap.add_argument("--skip", type=float, default=60.0,
                    help="seconds of the phase left out first (default 60)")
    args = ap.parse_args()
    with open(args.report) as f:
        report = json.load(f)
    points = [(s["t"], s["edge"]["rss_bytes"]) for s in report.get("timeline", [])
              if s.get("phase") == args.phase and s.get("edge") and s["edge"].get("rss_bytes")]
    if not points:
        print(f"no edge RSS samples in phase {args.phase!r} (run with --edge-pid)")
        return 2
    start = points[0][0] + args.skip
    points = [(t, r) for t, r in points if t >= start]
    if len(points) < 30:
        print(f"{len(points)} samples after the first {args.skip:.0f} s of {args.phase!r}: too few")
        return 2
    ts = [t for t, _ in points]
    rs = [r / 2**20 for _, r in points]
    t_mean, r_mean = statistics.fmean(ts), statistics.fmean(rs)
    sxx = sum((t - t_mean) ** 2 for t in ts)
    slope = sum((t - t_mean) * (r - r_mean) for t, r in zip(ts, rs)) / sxx  # MiB per s
    residuals = [r - (r_mean + slope * (t - t_mean)) for t, r in zip(ts, rs)]
    scatter = statistics.pstdev(residuals)
    window = ts[-1] - ts[0]
    change = slope * window
    third = max(1, len(rs) // 3)
    first, last = statistics.fmean(rs[:third]), statistics.fmean(rs[-third:])
    flat = abs(change) <= 2 * scatter or abs(change) <= 0.01 * r_mean
    print(
        f"edge RSS over {window / 60:.1f} min of {args.phase} ({len(rs)} samples): "
        f"slope {slope * 3600:+.2f} MiB/h, change {change:+.2f} MiB on a mean of "
        f"{r_mean:.1f} MiB, scatter (sd) {scatter:.2f} MiB; first third {first:.1f}, last "
        f"third {last:.1f} MiB; min {min(rs):.1f}, max {max(rs):.1f} MiB: "
        + ("flat" if flat else "NOT flat")
    )
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())

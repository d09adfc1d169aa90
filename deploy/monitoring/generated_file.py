"""The command line of the scripts that generate files under deploy/ (the Grafana dashboard,
the PrometheusRule): write the file, or with --check fail when the file on disk differs from
what the script would write (deploy/monitoring/test.sh runs every such check). Standard
library only.
"""

import argparse
import os
import sys


def write_or_check(description, out, render):
    """Parses --check; writes render()'s text to `out`, or compares it with `out`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true", help=f"fail if {os.path.basename(out)} differs from what this writes")
    args = parser.parse_args()
    text = render()
    rel = os.path.relpath(out)
    if args.check:
        try:
            with open(out, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = ""
        if current != text:
            sys.exit(f"{rel} is out of date: run python3 {os.path.relpath(sys.argv[0])}")
        print(f"ok: {rel} is up to date")
        return
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {rel}")

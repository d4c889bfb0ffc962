"""Full FER-2013 ingest: wall time (including Ray start) and rows/s on this machine.

Usage: .venv/bin/python bench/ingest.py [SOURCE] [--keep OUT]
Prints one line per run: a cold run into an empty folder, then a rerun that must skip every shard.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fer2013.zip"


def timed(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return time.perf_counter() - started, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("source", nargs="?", default=str(DEFAULT))
    parser.add_argument("--keep", help="write into this folder and keep it")
    args = parser.parse_args()
    out = args.keep or tempfile.mkdtemp(prefix="ferray-bench-ingest-")
    shutil.rmtree(out, ignore_errors=True)
    ferray = [sys.executable, "-m", "ferray", "ingest", "fer2013", args.source, out, "--log-level", "WARNING"]
    env_note = f"{os.cpu_count()} CPUs"
    cold, report = timed(ferray)
    rows = int(report.split("rows in:")[1].split()[0])
    print(report.rstrip())
    print(f"cold ingest: {rows} rows in {cold:.1f} s wall (process start, Ray start, listing, decode checks, writes) "
          f"= {rows / cold:.0f} rows/s on {env_note}")
    warm, report = timed(ferray)
    skipped = report.split("shards:")[1].split("\n")[0].strip()
    print(f"rerun: {warm:.1f} s wall, shards: {skipped}")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()

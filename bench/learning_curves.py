"""Plot fine-tune runs' learning curves (train and PublicTest accuracy per epoch) from their history.

Usage: .venv/bin/python bench/learning_curves.py OUT.png LABEL=MODEL_DIR [LABEL=MODEL_DIR ...]
MODEL_DIR is a `ferray train --fine-tune` output (its history.json), or its checkpoint folder while the
run is still going (the newest checkpoint's state.json).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger("learning_curves")


def history(folder: Path) -> list[dict[str, float]]:
    done = folder / "history.json"
    if done.is_file():
        return json.loads(done.read_text())
    states = sorted(folder.glob("_checkpoints/*/checkpoint_*/state.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        raise SystemExit(f"no history.json and no checkpoint under {folder}")
    return json.loads(states[-1].read_text())["history"]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("runs", nargs="+", metavar="LABEL=MODEL_DIR")
    args = parser.parse_args()
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    for spec in args.runs:
        label, _, folder = spec.partition("=")
        rows = history(Path(folder))
        epochs = [r["epoch"] for r in rows]
        line, = ax.plot(epochs, [100 * r.get("val_accuracy", float("nan")) for r in rows], marker="o", label=f"{label} val")
        ax.plot(epochs, [100 * r.get("accuracy", float("nan")) for r in rows], ls="--", color=line.get_color(),
                label=f"{label} train (augmented)")
        best = max(rows, key=lambda r: r.get("val_accuracy", 0.0))
        log.info("%s: %d epochs, best val %.2f%% at epoch %d, %.0f s an epoch", label, len(rows),
                 100 * best["val_accuracy"], best["epoch"], sum(r["seconds"] for r in rows) / len(rows))
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("FER-2013 fine-tune: Training (augmented/mixed) vs PublicTest")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(args.out, dpi=120)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()

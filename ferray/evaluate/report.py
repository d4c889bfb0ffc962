"""An evaluation's figures (confusion matrix, t-SNE, misclassified faces, reliability) and its report.md.

Figures use matplotlib's object API on the Agg canvas: no pyplot state, no backend switch at import,
safe in any worker or thread.
"""

from __future__ import annotations

import io as stdio
import math
from typing import Any, Sequence

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ferray.data.schema import LABELS
from ferray.evaluate.calibration import Reliability

DPI = 120
# One colour per class across every figure (matplotlib's tab10, colour-blind friendlier than jet).
CLASS_COLORS = ("#d62728", "#8c564b", "#9467bd", "#2ca02c", "#1f77b4", "#ff7f0e", "#7f7f7f")


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = stdio.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def _message(text: str, title: str) -> bytes:
    """A small figure saying why a plot is empty, so the report never links a missing file."""
    figure = Figure(figsize=(5, 2))
    axes = figure.add_subplot()
    axes.axis("off")
    axes.set_title(title)
    axes.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return _png(figure)


def confusion_matrix_png(counts: np.ndarray, title: str) -> bytes:
    """Counts and row percentages in every cell, like the paper's Fig. 4; colour = % of the true class."""
    counts = np.asarray(counts, np.int64)
    support = counts.sum(axis=1)
    percent = np.divide(counts * 100.0, support[:, None], out=np.zeros(counts.shape), where=support[:, None] > 0)
    figure = Figure(figsize=(8.2, 7.0))
    axes = figure.add_subplot()
    image = axes.imshow(percent, cmap="Blues", vmin=0, vmax=100)
    colorbar = figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    colorbar.set_label("% of the true class (row)")
    n = len(LABELS)
    axes.set_xticks(range(n), LABELS, rotation=35, ha="right")
    axes.set_yticks(range(n), [f"{name} (n={int(s)})" for name, s in zip(LABELS, support)])
    axes.set_xlabel("Predicted label")
    axes.set_ylabel("True label")
    axes.set_title(title)
    for row in range(n):
        for col in range(n):
            if support[row] == 0:
                text, color = "–", "#999999"
            else:
                text = f"{counts[row, col]}\n{percent[row, col]:.1f}%"
                color = "white" if percent[row, col] > 55 else "black"
            axes.text(col, row, text, ha="center", va="center", fontsize=8.5, color=color)
    return _png(figure)


def tsne_points(embeddings: np.ndarray, seed: int) -> np.ndarray:
    """2-D t-SNE of the rows (after PCA to 50 dimensions, the usual speed-up for wide embeddings)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(embeddings, np.float64)
    if x.shape[1] > 50 and len(x) > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    # Perplexity must stay below the row count; 30 is sklearn's default for larger sets.
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3.0)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                random_state=seed).fit_transform(x)


def sample_rows(n: int, limit: int, seed: int) -> np.ndarray:
    """A fixed-seed sample of at most `limit` row indices, in row order."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def tsne_png(embeddings: np.ndarray, labels: np.ndarray, seed: int, limit: int, title: str) -> tuple[bytes, int]:
    """Embeddings coloured by true class, like the paper's Fig. 5; returns (png, rows plotted)."""
    if len(labels) < 5:
        return _message(f"{len(labels)} rows: too few for t-SNE", title), 0
    picked = sample_rows(len(labels), limit, seed)
    points = tsne_points(embeddings[picked], seed)
    shown = labels[picked]
    figure = Figure(figsize=(8.0, 6.6))
    axes = figure.add_subplot()
    size = 28 if len(picked) <= 200 else 10
    for index, name in enumerate(LABELS):
        mask = shown == index
        if mask.any():
            axes.scatter(points[mask, 0], points[mask, 1], s=size, color=CLASS_COLORS[index], alpha=0.8,
                         label=f"{name} ({int(mask.sum())})", edgecolors="none")
    axes.legend(title="true class", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    axes.set_xlabel("t-SNE 1")
    axes.set_ylabel("t-SNE 2")
    axes.set_xticks([])
    axes.set_yticks([])
    sampled = f", sample of {len(picked)} of {len(labels)}" if len(picked) < len(labels) else ""
    axes.set_title(f"{title}{sampled}")
    return _png(figure), len(picked)


def pick_mistakes(labels: np.ndarray, preds: np.ndarray, confidence: np.ndarray, limit: int) -> list[int]:
    """Wrong rows, most confident first within each true class, taken round-robin across classes
    so every class with mistakes is shown."""
    queues = []
    for index in range(len(LABELS)):
        wrong = np.flatnonzero((labels == index) & (preds != labels))
        queues.append(list(wrong[np.argsort(-confidence[wrong], kind="stable")]))
    picked: list[int] = []
    while len(picked) < limit and any(queues):
        for queue in queues:
            if queue and len(picked) < limit:
                picked.append(int(queue.pop(0)))
    return picked


def _face_pixels(data: bytes | None) -> np.ndarray | None:
    if not data:
        return None
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is not None and pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
    return pixels


def misclassified_png(faces: Sequence[bytes | None], labels: np.ndarray, preds: np.ndarray, confidence: np.ndarray,
                      limit: int, title: str) -> tuple[bytes, int]:
    """A grid of wrong predictions with true and predicted labels, like the paper's Fig. 6."""
    picked = pick_mistakes(labels, preds, confidence, limit)
    wrong = int((preds != labels).sum())
    if not picked:
        return _message("no misclassified rows", title), 0
    cols = min(6, len(picked))
    rows = math.ceil(len(picked) / cols)
    figure = Figure(figsize=(cols * 1.75, rows * 2.15 + 0.5))
    for slot, index in enumerate(picked):
        axes = figure.add_subplot(rows, cols, slot + 1)
        axes.set_xticks([])
        axes.set_yticks([])
        pixels = _face_pixels(faces[index])
        if pixels is None:
            axes.text(0.5, 0.5, "no face\nin DATA", ha="center", va="center", fontsize=8)
        else:
            axes.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0, vmax=255, interpolation="bicubic")
        axes.set_title(f"true: {LABELS[labels[index]]}", fontsize=9, color="#1a7f37", pad=2)
        axes.set_xlabel(f"pred: {LABELS[preds[index]]} {confidence[index]:.2f}", fontsize=9, color="#c62828",
                        labelpad=2)
    figure.suptitle(f"{title}: {len(picked)} of {wrong} wrong, most confident first", fontsize=11)
    figure.tight_layout()
    return _png(figure), len(picked)


def reliability_png(curve: Reliability, title: str) -> bytes:
    """Reliability diagram: accuracy per confidence bin against the diagonal, rows per bin below."""
    edges = np.asarray(curve.edges)
    width = edges[1] - edges[0]
    centers = edges[:-1] + width / 2
    filled = [i for i, acc in enumerate(curve.accuracy) if acc is not None]
    figure = Figure(figsize=(6.4, 7.0))
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle="--", color="#555555", label="perfect calibration")
    accuracy = np.array([curve.accuracy[i] for i in filled], dtype=float)
    confidence = np.array([curve.confidence[i] for i in filled], dtype=float)
    top.bar(centers[filled], accuracy, width=width * 0.92, color="#1f77b4", edgecolor="#0b3d63", label="accuracy")
    # The gap each bin adds to the ECE, drawn as a line from its accuracy to its mean confidence.
    top.vlines(centers[filled], accuracy, confidence, color="#d62728", linewidth=2, zorder=3)
    top.scatter(centers[filled], confidence, marker="D", s=22, color="#d62728", zorder=3, label="mean confidence")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy in bin")
    # Above the axes: inside, it would hide whichever bin happens to sit under it.
    top.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=3, frameon=False, fontsize=9)
    figure.suptitle(f"{title}\nECE {curve.ece:.3f} ({len(curve.counts)} bins)")
    bottom.bar(centers, curve.counts, width=width * 0.92, color="#7f7f7f", edgecolor="black")
    bottom.set_xlabel("confidence (probability of the predicted class)")
    bottom.set_ylabel("rows")
    figure.tight_layout()
    return _png(figure)


# -- report.md -------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}%"


def _offsets(offsets: list[float]) -> str:
    return ", ".join(f"{name} {value:+.2f}" for name, value in zip(LABELS, offsets) if value)


def markdown(metrics: dict[str, Any]) -> str:
    """report.md: our numbers beside the paper's where one applies, then the figures and what was left out."""
    model, data, paper = metrics["model"], metrics["data"], metrics["paper"]
    calibration = metrics["calibration"]
    lines = [
        f"# Evaluation of `{model['uri']}` on `{data['uri']}`",
        "",
        f"- Model: backbone `{model['backbone']}`, trained on **{model.get('training_dataset') or 'unknown'}** "
        f"(training data fingerprint `{model.get('training_data_fingerprint')}`), model.keras sha256 "
        f"`{str(model['sha256'])[:16]}…`, temperature {metrics['inference']['temperature']:.3f}, "
        f"flip TTA {'on' if metrics['inference']['flip_tta'] else 'off'}"
        + (f", class offsets {_offsets(metrics['inference']['class_offsets'])}."
           if metrics["inference"].get("class_offsets") else "."),
        f"- Data: {', '.join(data['datasets']) or 'unknown'}, split `{data['split']}` ({data['split_rule']}), "
        f"{metrics['n']} rows scored via the {metrics['path']} path ({metrics['path_reason']}); data fingerprint "
        f"`{data['fingerprint'][:16]}…`.",
        "",
        "## Result",
        "",
        "| | accuracy | macro-F1 | rows |",
        "|---|---:|---:|---:|",
        f"| **ferray** | **{_pct(metrics['accuracy'])}** | {_pct(metrics['macro_f1'])} | {metrics['n']} |",
    ]
    if paper["applies"]:
        ref = paper["paper"]
        gap = 100 * metrics["accuracy"] - ref["accuracy"]
        lines.append(f"| paper: {ref['where']} | {ref['accuracy']:.2f}% | not reported | – |")
        lines += ["", f"Comparison: {paper['note']}. ferray {100 * metrics['accuracy']:.2f}% against the paper's "
                      f"{ref['accuracy']:.2f}% ({gap:+.2f} points, on {metrics['n']} rows)."]
    else:
        lines += ["", f"Comparison: none applies; {paper['note']}."]
    lines += ["", "The paper's numbers, for reference: "
              + "; ".join(f"{r['where']} {r['accuracy']:.2f}%" for r in metrics["paper_results"]) + "."]
    lines += ["", "## Per class", "", "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name, row in metrics["per_class"].items():
        cells = " | ".join(_pct(row[key]) for key in ("precision", "recall", "f1"))
        lines.append(f"| {name} | {cells} | {row['support']} |")
    lines += [
        "",
        f"Macro-F1 averages the {len(metrics['macro_f1_labels'])} classes present in the data "
        f"({', '.join(metrics['macro_f1_labels'])}); balanced accuracy {_pct(metrics['balanced_accuracy'])}.",
        "",
        "## Confusion matrix",
        "",
        "Rows are true classes, columns predictions; each cell holds the count and the share of its row.",
        "",
        "![confusion matrix](confusion_matrix.png)",
        "",
        "## t-SNE of the embeddings",
        "",
        f"Backbone embeddings of {metrics['figures']['tsne_rows']} rows (fixed seed {metrics['figures']['seed']}), "
        "coloured by true class.",
        "",
        "![t-SNE](tsne.png)",
        "",
        "## Misclassified faces",
        "",
        f"{metrics['figures']['misclassified_shown']} of {metrics['confusion_matrix']['wrong']} wrong predictions, "
        "the most confident first within each true class. Every prediction is in `predictions.parquet`.",
        "",
        "![misclassified](misclassified.png)",
        "",
        "## Calibration",
        "",
        f"Expected calibration error {calibration['ece']:.4f} over {calibration['bins']} equal-width bins; "
        f"negative log-likelihood {calibration['nll']:.4f}; temperature {metrics['inference']['temperature']:.3f}"
        + (" (fitted on held-out data, see ferray.json `calibration`)." if model.get("calibrated")
           else " (not calibrated)."),
        "",
        "![reliability diagram](reliability.png)",
        "",
        "## Rows left out",
        "",
        f"{data['rows_ok']} ok rows in DATA; {data['rows_outside_split']} belong to other splits; "
        f"{metrics['skipped']['total']} rows of split `{data['split']}` skipped.",
    ]
    for reason, count in sorted(metrics["skipped"]["by_reason"].items()):
        lines.append(f"- `{reason}`: {count}")
    if metrics["quarantined_upstream"]:
        lines.append("- quarantined by earlier stages (not in DATA's shards): "
                     + ", ".join(f"`{k}` {v}" for k, v in sorted(metrics["quarantined_upstream"].items())))
    command = f"ferray evaluate {model['uri']} {data['uri']} REPORT_OUT --split {data['split']}"
    lines += ["", "## Reproduce", "", "```", command, "```", ""]
    return "\n".join(lines)

"""The paper's reported accuracies, and which one (if any) an evaluation should stand beside."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class PaperResult:
    train: str
    test: str
    accuracy: float  # percent, as printed in the paper
    where: str


# EfficientNet for Human FER using Transfer Learning (shared/paper/NOTES.md). Inner results are on
# each dataset's test split (FER-2013: the 3,589-face PrivateTest); CK+ uses last frames.
RESULTS: tuple[PaperResult, ...] = (
    PaperResult("fer2013", "fer2013", 71.02, "Table 2, FER-2013 inner (PrivateTest)"),
    PaperResult("rafdb", "rafdb", 81.68, "Table 1, RAF-DB inner (test)"),
    PaperResult("rafdb", "ckplus", 78.59, "Table 3, RAF-DB → CK+"),
    PaperResult("rafdb", "fer2013", 56.10, "Table 4, RAF-DB → FER-2013"),
)

_ALIASES = {
    "fer2013": "fer2013", "fer2013-csv": "fer2013", "fer-2013": "fer2013", "fer": "fer2013",
    "rafdb": "rafdb", "raf-db": "rafdb", "raf": "rafdb",
    "ckplus": "ckplus", "ck+": "ckplus", "ckplus48": "ckplus", "ck+48": "ckplus", "ck": "ckplus",
    "jaffe": "jaffe",
}
# Looked for inside a free-form fingerprint such as `tests:fer2013-sample`; longest names first.
_TOKENS = ("fer2013", "fer-2013", "raf-db", "rafdb", "ckplus", "ck+", "jaffe")


def canonical_dataset(name: str | None) -> str | None:
    """`fer2013-csv` → `fer2013`, `CK+48` → `ckplus` …; unknown names pass through lower-cased."""
    if not name:
        return None
    key = str(name).strip().lower()
    return _ALIASES.get(key, key)


def training_dataset(meta: dict[str, Any], override: str | None = None) -> str | None:
    """The dataset a model was trained on: the override, what ferray.json records, else a name in its fingerprint."""
    if override:
        return canonical_dataset(override)
    training = meta.get("training_data") if isinstance(meta.get("training_data"), dict) else {}
    for value in (meta.get("training_dataset"), meta.get("dataset"), training.get("dataset"),
                  (meta.get("metrics") or {}).get("dataset")):
        if isinstance(value, str) and value:
            return canonical_dataset(value)
        if isinstance(value, list) and len(value) == 1:
            return canonical_dataset(value[0])
    fingerprint = str(meta.get("training_data_fingerprint") or "").lower()
    for token in _TOKENS:
        if token in fingerprint:
            return canonical_dataset(token)
    return None


def comparison(train: str | None, tested: list[str], split: str) -> dict[str, Any]:
    """The paper's number for train → test, with a sentence saying whether and how it applies."""
    datasets = sorted({canonical_dataset(d) or "unknown" for d in tested})
    test = datasets[0] if len(datasets) == 1 else None
    base: dict[str, Any] = {"train_dataset": train, "test_dataset": test, "applies": False, "paper": None}
    if train is None:
        return base | {"note": "the model's training dataset is unknown (ferray.json records none; set "
                               "evaluate.train_dataset), so no paper number is chosen"}
    if test is None:
        return base | {"note": f"DATA mixes datasets {datasets}; the paper reports one dataset at a time"}
    match = next((r for r in RESULTS if (r.train, r.test) == (train, test)), None)
    kind = "inner" if train == test else "cross-dataset"
    if match is None:
        return base | {"note": f"the paper reports no number for {train} → {test} ({kind})"}
    note = f"{kind} {train} → {test}: the paper's {match.where}"
    if train == test and split != "test":
        note += f"; the paper's number is on the test split, this evaluation is on `{split}`"
    return base | {"applies": True, "paper": asdict(match), "note": note}

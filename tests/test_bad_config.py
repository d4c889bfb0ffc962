"""Bad configuration through the real command line (`python -m ferray`, its own process, real stderr):
unknown keys, wrong types, unreachable storage, a missing model, a model whose labels do not match.

Each must exit non-zero with exactly one line on stderr, print no summary and write nothing, before
any work starts. "Before any work" is enforced, not hoped for: every run points FERRAY_RAY__ADDRESS
at a closed port, so a command that got as far as starting Ray would fail with another message.
The settings-level checks behind these lines are in tests/test_config.py; an unknown model and a
Lambda layer refused by safe mode in tests/test_model.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from ferray.model import artifact
from ferray.cli import EXIT_CANNOT_RUN, EXIT_CONFIG
from ferray.data.schema import LABELS


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens on it once the socket closes


@dataclass(frozen=True)
class Case:
    """One bad set-up: the command (placeholders filled per run), extra environment, exit status, the line's gist."""

    argv: tuple[str, ...]
    code: int
    says: str
    env: dict[str, str] = field(default_factory=dict)


CASES: dict[str, Case] = {
    "unknown key in --config": Case(("ingest", "folder", "{src}", "{out}", "--config", "{unknown_yaml}"), EXIT_CONFIG,
                                    "ingest.shard_rowz"),
    "unknown section in the environment": Case(("annotate", "default", "{src}", "{out}"), EXIT_CONFIG,
                                               "FERRAY_ANOTATE__FPS", {"FERRAY_ANOTATE__FPS": "5"}),
    "unknown field in the environment": Case(("align", "{in}", "{out}"), EXIT_CONFIG, "faces.upsampel",
                                             {"FERRAY_FACES__UPSAMPEL": "2"}),
    "wrong type in --config": Case(("align", "{in}", "{out}", "--config", "{types_yaml}"), EXIT_CONFIG,
                                   "faces.upsample"),
    "wrong type in the environment": Case(("annotate", "default", "{src}", "{out}"), EXIT_CONFIG, "annotate.fps",
                                          {"FERRAY_ANNOTATE__FPS": "fast"}),
    "unreachable storage: ingest SOURCE": Case(("ingest", "folder", "s3://nowhere/src", "{out}"), EXIT_CANNOT_RUN,
                                               "cannot reach s3://nowhere/src"),
    "unreachable storage: align OUT": Case(("align", "{in}", "s3://nowhere/aligned"), EXIT_CANNOT_RUN,
                                           "cannot reach s3://nowhere/aligned"),
    "unreachable storage: annotate SOURCE": Case(("annotate", "default", "s3://nowhere/media", "{out}"),
                                                 EXIT_CANNOT_RUN, "cannot reach s3://nowhere/media"),
    "missing model: annotate": Case(("annotate", "{missing_model}", "{src}", "{out}"), EXIT_CANNOT_RUN, "no model at"),
    "missing model: evaluate": Case(("evaluate", "{missing_model}", "{in}", "{out}"), EXIT_CANNOT_RUN, "no model at"),
    "labels do not match: annotate": Case(("annotate", "{wrong_labels}", "{src}", "{out}"), EXIT_CANNOT_RUN,
                                          "ferray's labels are"),
    "labels do not match: evaluate": Case(("evaluate", "{wrong_labels}", "{in}", "{out}"), EXIT_CANNOT_RUN,
                                          "ferray's labels are"),
}


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The inputs every case may name: a one-image SOURCE, a stage output, bad YAML, broken models."""
    root = tmp_path_factory.mktemp("bad-config")
    (root / "src" / "happy").mkdir(parents=True)
    Image.new("L", (64, 64), 100).save(root / "src" / "happy" / "a.png")
    (root / "in" / "_ferray").mkdir(parents=True)  # a finished, empty stage output
    (root / "unknown.yaml").write_text("ingest:\n  shard_rowz: 5\n")
    (root / "types.yaml").write_text("faces:\n  upsample: lots\n")
    wrong = root / "wrong-labels"
    wrong.mkdir()
    shipped = artifact.default_model_dir()
    meta = json.loads((shipped / artifact.META_FILE).read_text())
    (wrong / artifact.META_FILE).write_text(json.dumps({**meta, "labels": list(reversed(LABELS))}))
    (wrong / artifact.MODEL_FILE).symlink_to(shipped / artifact.MODEL_FILE)
    return {"src": str(root / "src"), "in": str(root / "in"), "unknown_yaml": str(root / "unknown.yaml"),
            "types_yaml": str(root / "types.yaml"), "missing_model": str(root / "no-such-model"),
            "wrong_labels": str(wrong), "root": str(root)}


def run_cli(name: str, case: Case, places: dict[str, str], port: int) -> tuple[str, subprocess.CompletedProcess[str], Path]:
    out = Path(places["root"]) / "out" / name.replace(" ", "-").replace(":", "")
    argv = [part.format(**places, out=out) for part in case.argv]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("FERRAY_", "AWS_"))}
    env.update({
        "FERRAY_RAY__ADDRESS": f"127.0.0.1:{port}",  # any Ray start fails: the command must stop before
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",  # S3 with nothing behind it
        "AWS_ACCESS_KEY_ID": "unused-key", "AWS_SECRET_ACCESS_KEY": "unused-secret", "AWS_REGION": "us-east-1",
        **case.env,
    })
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user has it: TensorFlow's start-up chatter would show
    done = subprocess.run([sys.executable, "-m", "ferray", *argv], env=env, capture_output=True, text=True,
                          timeout=180)
    return name, done, out


def test_bad_configuration_stops_before_work_with_one_line(places: dict[str, str]) -> None:
    port = closed_port()
    # Each run is its own process, mostly waiting (imports, S3 retries): a few at a time.
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda item: run_cli(item[0], item[1], places, port), CASES.items()))
    for name, done, out in results:
        case = CASES[name]
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, f"{name}: stderr was\n{done.stderr[-3000:]}"
        assert lines[0].startswith("ferray: ") and case.says in lines[0], f"{name}: {lines[0]}"
        assert done.returncode == case.code, f"{name}: exit {done.returncode}, {lines[0]}"
        assert not done.stdout.strip(), f"{name}: printed a summary"
        assert not out.exists(), f"{name}: wrote {out}"

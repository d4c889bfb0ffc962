"""Credentials never leak: ingest → align → annotate → evaluate (with calibration, which rewrites the
model's ferray.json) against the moto S3 endpoint, with distinctive fake credentials, then every
output (the bucket's objects and the local files), every log record, the printed summaries and this
Ray session's own log files are searched for them. Logging is at DEBUG, where botocore writes request
headers (the session token among them): `ferray.logs` masks the values in every record.

Models load in Keras safe mode (a Lambda layer is refused): tests/test_model.py. Archive members
never leave their archive: tests/test_bad_inputs.py.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
from PIL import Image

from conftest import SAMPLE_ZIP
from ferray.data import io
from ferray.model import artifact
from ferray.cli import main
from ferray.config import load_settings
from test_faces import SAMPLES, canvas, load_face

# What moto accepts without checking, made distinctive so that any copy of it is found.
KEY_ID = "AKIAFERRAYLEAKCHECK7"
SECRET = "ferray-fake-secret-1c6e0b7d9a4f"
TOKEN = "ferray-fake-session-token-58d2e3"


def ray_log_files() -> list[Path]:
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    return [path for path in logs.rglob("*") if path.is_file()]


def leaks(data: bytes) -> list[str]:
    return [value for value in (KEY_ID, SECRET, TOKEN) if value.encode() in data]


def test_no_credential_in_outputs_logs_or_saved_settings(ray_session: None, s3_bucket: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    # The secret and token come from the settings file (so saved settings must mask them), the key
    # id from the standard environment variable, as users set them.
    config = tmp_path / "ferray.yaml"
    config.write_text(f"storage:\n  secret_access_key: {SECRET}\n  session_token: {TOKEN}\nray:\n  progress_bars: false\n")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    storage = load_settings(config).storage.resolved()
    base = f"{s3_bucket}/secrets-{tmp_path.name}"
    io.write_bytes_atomic(f"{base}/fer2013.zip", SAMPLE_ZIP.read_bytes(), storage)
    for name in (artifact.MODEL_FILE, artifact.META_FILE):
        io.write_bytes_atomic(f"{base}/model/{name}", (artifact.default_model_dir() / name).read_bytes(), storage)
    rng = random.Random(1)
    for index in range(2):
        image, _ = canvas(load_face(SAMPLES[index]), rng)
        pixels = Image.fromarray(image)
        local = tmp_path / f"face-{index}.png"
        pixels.save(local)
        io.write_bytes_atomic(f"{base}/media/face-{index}.png", local.read_bytes(), storage)
        local.unlink()
    ray_logs_before = {path: path.stat().st_size for path in ray_log_files()}

    caplog.set_level(logging.DEBUG)  # the strictest case: every library's debug output
    flags = ["--config", str(config), "--log-level", "DEBUG"]
    annotated = tmp_path / "annotated"  # one local OUT, the rest in the bucket
    for argv in (["ingest", "fer2013", f"{base}/fer2013.zip", f"{base}/ingested"],
                 ["align", f"{base}/ingested", f"{base}/aligned"],
                 ["annotate", f"{base}/model", f"{base}/media", str(annotated)],
                 ["evaluate", f"{base}/model", f"{base}/aligned", f"{base}/report", "--calibrate-on", f"{base}/aligned"]):
        assert main([*argv, *flags]) == 0, argv
    printed = capsys.readouterr()

    fs, root = io.url_to_fs(base, storage)
    objects = {path: fs.cat_file(path) for path in fs.find(root)}
    written = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file() and path != config}
    assert f"{root}/model/{artifact.META_FILE}" in objects and f"{root}/report/report.md" in objects
    assert any(p.endswith("_ferray/annotate.json") for p in map(str, written)), "a local output was written"
    meta = io.read_json(f"{base}/model/{artifact.META_FILE}", storage)
    assert meta["calibration"]["rows"] > 0, "ferray.json was rewritten by this run"
    saved = io.read_json(f"{base}/aligned/_ferray/align.json", storage)["settings"]["storage"]
    assert saved["secret_access_key"] == saved["session_token"] == "**********", "saved settings mask secrets"

    found = {f"s3://{path}": leaks(data) for path, data in objects.items()}
    found |= {str(path): leaks(data) for path, data in written.items()}
    found["log records"] = leaks(caplog.text.encode())
    found["stdout and stderr"] = leaks((printed.out + printed.err).encode())
    for path in ray_log_files():  # what workers wrote during these runs
        with path.open("rb") as handle:
            handle.seek(ray_logs_before.get(path, 0))
            found[str(path)] = leaks(handle.read())
    assert not {where: values for where, values in found.items() if values}
    assert len(caplog.records) > 100 and len(objects) > 20, "the search covered real logs and outputs"


def test_log_records_mask_secret_values(caplog: pytest.LogCaptureFixture) -> None:
    """Any logger, message or argument: the values are masked when the record is made."""
    from ferray.config import StorageSettings
    from ferray.logs import MASK, redact, secrets_of

    storage = StorageSettings(access_key_id="AKIAUNITTESTKEY1", secret_access_key="unit-secret-3f9a", session_token="tiny")
    assert secrets_of(storage) == {"AKIAUNITTESTKEY1", "unit-secret-3f9a"}, "too short to mask safely: left alone"
    redact(secrets_of(storage))
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("botocore.endpoint").debug("headers=%s", {"X-Amz-Security-Token": "unit-secret-3f9a"})
        logging.getLogger("elsewhere").warning("key AKIAUNITTESTKEY1 in the message itself")
    assert "unit-secret-3f9a" not in caplog.text and "AKIAUNITTESTKEY1" not in caplog.text
    assert caplog.text.count(MASK) == 2

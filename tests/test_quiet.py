"""A command's default output is ferray's own: no TensorFlow, absl, CUDA or Ray Data chatter; DEBUG brings it back."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PHOTO = REPO / "ferray" / "assets" / "demo-media" / "photo_0.jpg"

# What TensorFlow's native code, absl, CUDA probing and Ray Data print when nothing stops them.
NOISE = re.compile("|".join([
    r"cudart_stub", r"absl::InitializeLog", r"cuInit", r"cuda_platform", r"oneDNN", r"TF_ENABLE_ONEDNN_OPTS",
    r"Unable to register cu", r"computation_placer", r"This TensorFlow binary is optimized",
    r"To enable the following instructions", r"cpu_feature_guard",
    r"Execution plan", r"Running Dataset", r"Total Progress", r"logging_progress", r"Progress will be logged",
    r"execution finished in", r"Started a local Ray instance", r"Token authentication is enabled",
    r"XNNPACK delegate",
]))


def _env() -> dict[str, str]:
    """The user's environment: no TensorFlow setting (conftest sets one for the suite), no cluster."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("FERRAY_") and key not in ("TF_CPP_MIN_LOG_LEVEL", "GRPC_VERBOSITY")}
    env["RAY_ADDRESS"] = ""
    return env


def _run(*argv: str) -> tuple[int, str]:
    done = subprocess.run([sys.executable, *argv], env=_env(), capture_output=True, text=True, timeout=900)
    return done.returncode, done.stdout + done.stderr


def test_default_output_is_ferrays_own_and_debug_brings_back_the_rest(tmp_path: Path) -> None:
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    shutil.copy(PHOTO, photos / PHOTO.name)

    # One real command: a local Ray, TensorFlow in the classifying worker.
    code, output = _run("-m", "ferray", "annotate", "default", str(photos), str(out))
    assert code == 0, output[-3000:]
    noise = [line for line in output.splitlines() if NOISE.search(line)]
    assert not noise, "\n".join(noise)
    assert "ferray annotate:" in output and "rows in: 1" in output, output[-3000:]
    assert len(output.splitlines()) < 25, output

    # TensorFlow in the driver, imported after the command line set logging up, as a command imports it.
    code, output = _run("-c", "import sys; from ferray import logs; logs.configure('INFO'); import tensorflow as tf;"
                              " tf.config.list_physical_devices('GPU'); sys.stderr.write('a line of our own\\n')")
    assert code == 0, output[-3000:]
    assert not [line for line in output.splitlines() if NOISE.search(line)], output
    assert "a line of our own" in output, "stderr written while or after TensorFlow loads still shows"

    # -v: the rerun has nothing to do (no Ray, no TensorFlow), but says so at DEBUG.
    code, output = _run("-m", "ferray", "annotate", "-v", "default", str(photos), str(out))
    assert code == 0, output[-3000:]
    assert re.search(r" DEBUG ferray[.:]", output), output[-3000:]

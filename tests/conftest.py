"""Session-wide test rig: one local Ray (2 CPUs), one real S3 endpoint (moto on 127.0.0.1)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Iterator

import pytest

DATA = Path(__file__).resolve().parent / "data"
REPO = DATA.parents[1]
SHARED = REPO.parent / "shared"
FER2013_ZIP = SHARED / "datasets" / "fer2013.zip"
SAMPLE_ZIP = REPO / "ferray" / "assets" / "fer2013-sample.zip"

# Quiet TensorFlow's C++ start-up chatter in workers and the driver.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 HTTP endpoint on loopback; AWS_* variables point every client at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    os.environ.update({
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-value",
        "AWS_REGION": "us-east-1",
    })
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint: str) -> str:
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket="ferray-test")
    return "s3://ferray-test"


@pytest.fixture(scope="session")
def ray_session(s3_endpoint: str) -> Iterator[None]:
    """One local Ray for the whole session; started after the S3 env so workers inherit nothing they need."""
    import ray

    # On a loaded machine Ray's raylet can miss its fixed 30 s start-up window; a second try usually fits.
    for attempt in range(4):
        try:
            ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            break
        except Exception as error:  # Ray raises a bare Exception for this one
            if "timed out during startup" not in str(error) or attempt == 3:
                raise
            ray.shutdown()
            time.sleep(10)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture()
def settings():
    from ferray.config import load_settings

    return load_settings(ray={"progress_bars": False})


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real, small ferray model artifact (see tests/model_fixture.py), built once per session."""
    from ferray.config import load_settings
    from model_fixture import build_artifact

    return build_artifact(load_settings(), tmp_path_factory.mktemp("model") / "artifact")


@pytest.fixture(scope="session")
def sample_aligned(ray_session, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The bundled 35 real FER-2013 faces, ingested and aligned (train 21, val 7, test 7); read-only for tests."""
    from ferray.cli import main
    from ferray.demo import sample_path

    out = tmp_path_factory.mktemp("sample-aligned")
    assert main(["ingest", "fer2013", str(sample_path()), str(out / "ingested"), "--log-level", "WARNING"]) == 0
    assert main(["align", str(out / "ingested"), str(out / "aligned"), "--log-level", "WARNING"]) == 0
    return str(out / "aligned")

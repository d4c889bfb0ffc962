"""The local Ray that ferray starts: what its workers print reaches the user, Ray's dashboard-less noise does not."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

# A fresh driver (the test session's Ray was started without ferray's settings): ferray's local Ray, one
# task that logs through Ray Train's own loggers what they say in a training job, and a line of the job's.
SCRIPT = textwrap.dedent("""
    import logging, time
    import ray
    from ferray.config import RaySettings
    from ferray.runtime import ensure_ray

    ensure_ray(RaySettings(num_cpus=1))

    @ray.remote
    def speak() -> None:
        import logging.config

        import ray.train._internal.storage as worker_storage
        import ray.train.v2._internal.execution.context as context
        import ray.train.v2._internal.execution.controller.placement_group_cleaner as cleaner
        import ray.train.v2._internal.execution.storage as storage

        # What Ray Train does in each worker before training: it resets every `ray.train.*` logger's level.
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False,
                                   "loggers": {"ray.train": {"level": "DEBUG"}}})
        cleaner.logger.warning("State API may be temporarily unavailable")
        storage.logger.info("Checkpoint successfully created at: somewhere")
        worker_storage.logger.info("Checkpoint successfully created at: elsewhere")
        context.logger.info("Reporting training result 1: a report")
        logging.getLogger("ferray.job").warning("the job's own warning")

    ray.get(speak.remote())
    time.sleep(2)  # worker output reaches the driver through Ray's log monitor
    ray.shutdown()
""")


def test_local_ray_workers_keep_job_warnings_and_drop_dashboard_noise() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], env={**os.environ, "RAY_ADDRESS": ""},
                          capture_output=True, text=True, timeout=180)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "the job's own warning" in output, output[-3000:]
    for noise in ("State API may be temporarily unavailable", "Checkpoint successfully created", "Reporting training result"):
        assert noise not in output, output[-3000:]


def test_a_submitted_jobs_runtime_env_merges_with_ferrays(monkeypatch) -> None:
    """In a job's driver ray.init merges ferray's runtime env into the job's and refuses two values for one
    key: ferray adds only what the job (here infra/runtime_env.yaml, plus a TensorFlow setting) leaves unset."""
    import json
    from pathlib import Path

    import yaml
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from ferray.runtime import JOB_CONFIG_VAR, SETUP_HOOK, worker_runtime_env

    job = yaml.safe_load((Path(__file__).parents[1] / "infra" / "runtime_env.yaml").read_text())
    job["env_vars"]["TF_CPP_MIN_LOG_LEVEL"] = "1"
    monkeypatch.setenv(JOB_CONFIG_VAR, json.dumps({"runtime_env": job}))
    ours = worker_runtime_env()
    assert ours is not None and ours["worker_process_setup_hook"] == SETUP_HOOK
    assert "TF_CPP_MIN_LOG_LEVEL" not in ours["env_vars"] and ours["env_vars"]["GRPC_VERBOSITY"] == "ERROR"
    merged = _merge_runtime_env(job, ours)
    assert merged is not None and merged["env_vars"]["TF_CPP_MIN_LOG_LEVEL"] == "1"

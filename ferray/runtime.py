"""Starting or joining Ray once per driver, from the `ray` settings section."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import ray

from ferray import logs
from ferray.config import RaySettings

log = logging.getLogger(__name__)

SETUP_HOOK = "ferray.logs.quiet_ray_workers"
# Set by `ray job submit` in the job's driver: the job's runtime env, which ray.init merges with its own.
JOB_CONFIG_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def ensure_ray(settings: RaySettings) -> None:
    """Join the configured cluster, or start a local Ray; reuse one already initialised.

    Below DEBUG (`ferray.logs.verbose`) Ray, Ray Data and the workers' TensorFlow start quietly;
    at DEBUG each keeps its own defaults.
    """
    verbose = logs.verbose()
    if not ray.is_initialized():
        # Inside `ray job submit` Ray sets RAY_ADDRESS: that is joining a cluster, whose size is its own.
        joining = bool(settings.address or os.environ.get("RAY_ADDRESS"))
        if not verbose:
            logs.quiet_ray_driver()
        ray.init(
            address=settings.address or None,
            num_cpus=None if joining else settings.num_cpus,
            num_gpus=None if joining else settings.num_gpus,
            include_dashboard=False,
            log_to_driver=True,
            logging_level=logging.INFO if verbose else logging.WARNING,
            runtime_env=worker_runtime_env(),
        )
        resources = ray.cluster_resources()
        log.info("ray: %s, %g CPUs, %g GPUs", "joined a cluster" if joining else "started locally",
                 resources.get("CPU", 0), resources.get("GPU", 0))
        log.debug("ray: %s", resources)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = settings.progress_bars
    context.print_on_execution_start = verbose
    if not verbose:
        logs.quiet_ray_data()


def worker_runtime_env() -> dict[str, Any] | None:
    """What ferray adds to the runtime env of the Ray it starts or joins: quiet workers, unless at DEBUG.

    Inside a submitted job ray.init merges this with the job's own runtime env and refuses two values
    for one key, so a key the job sets (`--runtime-env`) is left to the job.
    """
    if logs.verbose():
        return None
    job: dict[str, Any] = {}
    if os.environ.get(JOB_CONFIG_VAR):
        job = json.loads(os.environ[JOB_CONFIG_VAR]).get("runtime_env") or {}
    env: dict[str, Any] = {}
    if "worker_process_setup_hook" not in job:
        env["worker_process_setup_hook"] = SETUP_HOOK
    taken = job.get("env_vars") or {}
    env_vars = {name: value for name, value in logs.worker_env().items() if name not in taken}
    if env_vars:
        env["env_vars"] = env_vars
    return env or None


def configure_tensorflow(cpus: float, use_gpu: bool = True, inter_op: int | None = None) -> None:
    """Thread pools sized to the worker's CPUs, and GPU memory growth so workers can share a card.

    Call before any TensorFlow op; in a process where TensorFlow already started (tests, a reused
    worker) the thread settings stay as they were.
    """
    import tensorflow as tf

    threads = max(1, math.floor(cpus))
    try:
        # Workers spawning a pool per core each would fight for the CPUs they share.
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(inter_op or min(2, threads))
    except RuntimeError:
        pass
    for gpu in tf.config.list_physical_devices("GPU") if use_gpu else []:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))

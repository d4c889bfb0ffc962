"""Starting or joining Ray once per driver, from the `ray` settings section."""

from __future__ import annotations

import logging
import math
import os

import ray

from ferray.config import RaySettings

log = logging.getLogger(__name__)


def ensure_ray(settings: RaySettings) -> None:
    """Join the configured cluster, or start a local Ray; reuse one already initialised."""
    if not ray.is_initialized():
        # Inside `ray job submit` Ray sets RAY_ADDRESS: that is joining a cluster, whose size is its own.
        joining = bool(settings.address or os.environ.get("RAY_ADDRESS"))
        ray.init(
            address=settings.address or None,
            num_cpus=None if joining else settings.num_cpus,
            num_gpus=None if joining else settings.num_gpus,
            include_dashboard=False,
            log_to_driver=True,
            logging_level=logging.WARNING,
            # TensorFlow's C++ start-up chatter, and Ray's own monitors asking a dashboard this local
            # Ray does not run, would otherwise flood every job log.
            runtime_env=None if joining else {"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"},
                                              "worker_process_setup_hook": "ferray.logs.quiet_ray_workers"},
        )
        log.info("ray: %s", ray.cluster_resources())
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = settings.progress_bars
    context.print_on_execution_start = False


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

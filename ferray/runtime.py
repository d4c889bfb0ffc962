"""Starting or joining Ray once per driver, from the `ray` settings section."""

from __future__ import annotations

import logging
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


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))

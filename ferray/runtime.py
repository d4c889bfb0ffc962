"""Starting or joining Ray once per driver, from the `ray` settings section."""

from __future__ import annotations

import logging

import ray

from ferray.config import RaySettings

log = logging.getLogger(__name__)


def ensure_ray(settings: RaySettings) -> None:
    """Join the configured cluster, or start a local Ray; reuse one already initialised."""
    if not ray.is_initialized():
        ray.init(
            address=settings.address or None,
            num_cpus=settings.num_cpus if not settings.address else None,
            num_gpus=settings.num_gpus if not settings.address else None,
            include_dashboard=False,
            log_to_driver=True,
            logging_level=logging.WARNING,
        )
        log.info("ray: %s", ray.cluster_resources())
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = settings.progress_bars
    context.print_on_execution_start = False


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))

"""Training: the head on embeddings and the fine-tune on aligned faces, on Ray Train.

`run` is the one entry point (the CLI, jobs and the pipeline call it): it picks the path by the
settings and leaves a loadable model artifact in MODEL_OUT either way. `runs` holds what both paths
share: run naming, checkpointed state, the Ray Train run, reporting and the files a run writes.
"""

from __future__ import annotations

from typing import Any

from ferray.training.runs import EpochHook, TrainResult


def run(settings: Any, source: str, model_out: str, *, epoch_hook: EpochHook | None = None) -> TrainResult:
    """Train on SOURCE (aligned shards when `finetune.unfreeze` is set, embedded shards otherwise) and
    write the model artifact to MODEL_OUT."""
    if settings.finetune.enabled:
        from ferray.training import tune

        return tune.run(settings, source, model_out, epoch_hook=epoch_hook)
    from ferray.model import artifact
    from ferray.training import train

    result = train.run(settings, source, model_out, epoch_hook=epoch_hook)
    artifact.from_training(settings, result, model_out, source)
    return result

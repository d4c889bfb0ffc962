"""Head training on Ray Train: real embedded shards, local and S3, one and two workers, a killed worker."""

from __future__ import annotations

import os
from pathlib import Path

import keras
import numpy as np
import pyarrow as pa
import pytest
from head_data import arrays, embedded_table

from ferray.data import io
from ferray.model import head
from ferray.training import train
from ferray.config import HeadSettings, StorageSettings, TrainSettings

# The fixture is 280 training faces; ten times the paper's rate learns them in a few epochs.
FAST = dict(learning_rate=0.01, batch_size=32)


def _write_shards(table: pa.Table, out: str, storage: StorageSettings) -> str:
    """Two finished shards, as the embed stage leaves them (data, stats, marker)."""
    sink = io.ShardSink(out, storage)
    half = table.num_rows // 2
    for index, part in enumerate((table.slice(0, half), table.slice(half))):
        sink.write(f"part-{index:05d}", part, f"fixture-{index}", {"rows": part.num_rows})
    return out


def test_scan_counts_usable_rows_and_skips_the_rest(tmp_path: Path, settings) -> None:
    table = embedded_table()
    source = _write_shards(table, str(tmp_path / "embedded"), settings.storage)
    data = train.scan(source, settings.storage)
    assert [sum(data.counts[s]) for s in ("train", "val", "test")] == [280, 140, 70]
    assert data.counts["train"] == [40] * 7
    # CK+ `contempt` has no canonical class: skipped wherever it sits; CK+ rows have no split.
    assert data.skipped == {"not_ok": 0, "unlabelled": 2, "no_split": 54}
    assert data.rows == table.num_rows and data.backbone == "efficientnet-lite0"


def test_scan_refuses_what_cannot_be_trained_on(tmp_path: Path, settings) -> None:
    with pytest.raises(io.StorageError):
        train.scan(str(tmp_path / "missing"), settings.storage)
    table = embedded_table()
    backbones = ["efficientnet-b0"] * 3 + ["efficientnet-lite0"] * (table.num_rows - 3)
    mixed = table.set_column(table.schema.get_field_index("backbone"), "backbone", pa.array(backbones))
    with pytest.raises(ValueError, match="mixes embeddings"):
        train.scan(_write_shards(mixed, str(tmp_path / "mixed"), settings.storage), settings.storage)
    eight = table.set_column(table.schema.get_field_index("label"), "label", pa.array([7] * table.num_rows, pa.int8()))
    with pytest.raises(ValueError, match="outside 0..6"):
        train.scan(_write_shards(eight, str(tmp_path / "eight"), settings.storage), settings.storage)


def test_one_worker_trains_from_s3_to_s3_and_a_rerun_does_nothing(ray_session, s3_bucket: str, settings) -> None:
    table = embedded_table()
    storage = settings.storage.resolved()
    source = _write_shards(table, f"{s3_bucket}/head/embedded", storage)
    model_out = f"{s3_bucket}/head/model-1w"
    recipe = TrainSettings(workers=1, epochs=10, decay_every=5, **FAST)

    result = train.run(settings, source, model_out, train=recipe)

    assert result.rows == {"train": 280, "val": 140, "test": 70}
    assert result.skipped["unlabelled"] == 2 and result.skipped["no_split"] == 54
    assert result.epochs_run == 10 and result.starts == [0]
    history = io.read_json(io.join(model_out, train.HISTORY_FILE), storage)
    assert [row["epoch"] for row in history] == list(range(1, 11))
    # The paper's step schedule, as the workers' optimizer applied it: ×0.9 after every 5 epochs here.
    assert [row["lr"] for row in history] == pytest.approx([0.01] * 5 + [0.009] * 5)
    best = max(history, key=lambda row: row["val_accuracy"])
    assert result.best_epoch == best["epoch"] and result.val_accuracy == pytest.approx(best["val_accuracy"])
    assert result.val_accuracy >= 0.25 and result.test_accuracy is not None
    # The shipped Keras 3 head from head.npz scores what the workers' tf_keras head scored.
    weights = train.load_head_weights(model_out, storage)
    x_val, y_val = arrays(table, "val")
    assert head.accuracy(head.predict(head.head_from_weights(keras, weights), x_val), y_val) == result.val_accuracy
    assert io.exists(io.join(model_out, train.METRICS_FILE), storage)
    assert io.read_json(io.join(model_out, io.META, "train.json"), storage)["summary"]["run_name"] == result.run_name
    assert io.exists(result.checkpoints, storage) and result.checkpoints.startswith(s3_bucket)

    again = train.run(settings, source, model_out, train=recipe)
    assert again == result


@pytest.mark.slow
def test_two_workers_survive_a_killed_worker_and_resume(ray_session, tmp_path: Path, settings) -> None:
    source = _write_shards(embedded_table(), str(tmp_path / "embedded"), settings.storage)
    killed = tmp_path / "rank1-killed"

    def kill_rank1_once(rank: int, epoch: int) -> None:
        # The marker outlives the process, so the restarted worker group trains on.
        if rank == 1 and epoch == 3 and not killed.exists():
            killed.touch()
            os._exit(1)

    # Balanced class weights ride along: the weighted input pipeline under two workers.
    recipe = TrainSettings(workers=2, epochs=6, max_failures=1, class_weight="balanced", **FAST)
    result = train.run(settings, source, str(tmp_path / "model"), train=recipe, epoch_hook=kill_rank1_once)

    assert killed.exists()
    # Restarted once, from the last checkpoint Ray Train had when rank 1 died (epoch 2 or 3).
    assert len(result.starts) == 2 and result.starts[0] == 0 and 0 < result.starts[1] <= 3, result.starts
    history = io.read_json(str(tmp_path / "model" / train.HISTORY_FILE), settings.storage)
    assert [row["epoch"] for row in history] == list(range(1, 7)) and result.epochs_run == 6
    assert result.val_accuracy is not None and result.val_accuracy > 1 / 7
    assert np.load(tmp_path / "model" / train.HEAD_FILE)["w000"].shape == (1280, HeadSettings().hidden)

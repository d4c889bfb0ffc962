"""Fine-tuning the backbone (`ferray train --fine-tune K`): real faces, Ray Train, resume, a reusable backbone."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from ferray.data import io
from ferray.training import finetune, tune
from ferray.model import artifact as artifacts
from ferray.model.backbones import BACKBONE_LAYER, build_backbone
from ferray.cli import main
from ferray.config import BackboneSettings, ConfigError, StorageSettings, load_settings

# Small and quick: the point is the wiring, not the accuracy (bench/finetune.py and the shipped
# model's report measure that on all of FER-2013).
QUICK = {"input_size": 48, "epochs": 3, "batch_size": 8, "hidden": 16, "calibrate": True}


@pytest.fixture(scope="module")
def aligned(sample_aligned: str) -> str:
    return sample_aligned


def _lite0(**update) -> keras.Model:
    return build_backbone(BackboneSettings(weights="none", **update), image_size=48)


@pytest.mark.parametrize(("name", "top_two"), [("efficientnet-lite0", ("block14", "block15")),
                                              ("efficientnet-b0", ("block6d", "block7a"))])
def test_unfreeze_k_trains_only_the_top_blocks(name: str, top_two: tuple[str, str]) -> None:
    net = _lite0(name=name)
    assert not net.trainable_weights and len(finetune.blocks(net)) == finetune.N_BLOCKS
    top2 = finetune.unfreeze(net, 2)
    trainable = {layer.name.split("_")[0] for layer in finetune._all_layers(net) if layer.trainable and layer.weights}
    assert top2 > 0 and trainable == {*top_two, "top"}, trainable
    assert finetune.unfreeze(_lite0(name=name), "all") > top2 * 2


def test_bad_fine_tune_settings_fail_before_any_work(tmp_path: Path, capsys) -> None:
    with pytest.raises(ConfigError, match="16 blocks"):
        load_settings(finetune={"unfreeze": 17})
    assert load_settings(finetune={"unfreeze": "3"}).finetune.unfreeze == 3
    assert not load_settings().finetune.enabled
    code = main(["train", str(tmp_path), str(tmp_path / "m"), "--fine-tune", "all", "--workers", "2"])
    assert code == 3 and "one worker" in capsys.readouterr().err


@pytest.fixture(scope="module")
def finetuned(aligned: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, str, Any, Path]:
    """A fine-tune whose worker dies in its third epoch and resumes: (settings, model folder, result,
    the kill marker). The second-cycle test reuses it as its parent model."""
    folder = tmp_path_factory.mktemp("finetuned")
    settings = load_settings(ray={"progress_bars": False}, finetune={"unfreeze": "all", **QUICK},
                             train={"max_failures": 1})
    killed = folder / "killed"

    def kill_once(rank: int, epoch: int) -> None:
        # The marker outlives the process, so the restarted worker trains on from its checkpoint.
        if epoch == 2 and not killed.exists():
            killed.touch()
            os._exit(1)

    out = str(folder / "model")
    return settings, out, tune.run(settings, aligned, out, epoch_hook=kill_once), killed


@pytest.mark.slow
def test_fine_tune_resumes_after_a_killed_worker_and_ships_a_reusable_backbone(
        aligned: str, finetuned: tuple[Any, str, Any, Path], tmp_path: Path) -> None:
    settings, out, result, killed = finetuned
    assert killed.exists() and result.starts[0] == 0 and len(result.starts) == 2 and result.starts[1] >= 1
    history = io.read_json(io.join(out, tune.HISTORY_FILE), settings.storage)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert result.rows == {"train": 21, "val": 7, "test": 7}

    # The artifact: loads in safe mode, records TTA and temperature, names its own backbone.
    artifact = artifacts.load(out, settings.storage)
    meta = json.loads((Path(out) / artifacts.META_FILE).read_text())
    assert meta["inference"]["flip_tta"] is True and meta["inference"]["temperature"] == pytest.approx(result.temperature, abs=1e-4)
    assert "-ft" in meta["backbone"]["fingerprint"] and meta["backbone"]["weights_source"].startswith("fine-tuned from")
    assert meta["metrics"]["finetune"]["unfreeze"] == "all"

    # The backbone really changed (all layers unfrozen), and is reusable, frozen, for new heads.
    adapted = artifact.model.get_layer(BACKBONE_LAYER)
    imagenet = build_backbone(tune.backbone_settings(settings), image_size=48)
    changed = [not np.allclose(a, b) for a, b in zip(adapted.get_weights(), imagenet.get_weights())]
    assert sum(changed) > len(changed) // 2
    reused = build_backbone(BackboneSettings(weights=f"artifact:{out}", input_size=48), image_size=48)
    assert not reused.trainable_weights
    faces = np.random.default_rng(0).uniform(0, 255, (4, 48, 48, 1)).astype(np.float32)
    np.testing.assert_allclose(reused.predict(faces, verbose=0), adapted.predict(faces, verbose=0), atol=1e-5)

    # The shipped numbers are the artifact's own: evaluate reproduces the reported test accuracy.
    report = tmp_path / "report"
    assert main(["evaluate", out, aligned, str(report), "--log-level", "WARNING"]) == 0
    scored = json.loads((report / "metrics.json").read_text())
    assert scored["path"] == "faces" and scored["accuracy"] == pytest.approx(result.test_accuracy)

    # A rerun of the same job finds the finished run and does nothing.
    again = tune.run(settings, aligned, out)
    assert again.starts == result.starts and again.seconds == result.seconds


@pytest.mark.slow
def test_a_second_cycle_names_its_parent_by_fingerprint_and_its_experiment(
        aligned: str, finetuned: tuple[Any, str, Any, Path], tmp_path: Path) -> None:
    """MixUp/CutMix, square-root class weights, EMA and distillation from the earlier run on its backbone;
    the artifact names that parent by fingerprint, its teacher by version and the experiment file by name,
    never by a machine path. A run stopped mid-way and rerun with its budget lowered finishes at once
    with its best epoch so far."""
    first = finetuned[1]
    parent = json.loads((Path(first) / artifacts.META_FILE).read_text())
    config = tmp_path / "second-cycle.yaml"
    config.write_text(f"backbone: {{weights: 'artifact:{first}'}}\n"
                      "finetune: {unfreeze: all, mixup: 0.2, cutmix: 1.0, mix_prob: 1.0, ema: 0.9, class_weight: sqrt,\n"
                      f"           teachers: ['{first}'], distill: 0.5}}\n")
    recipe = {"unfreeze": "all", **QUICK, "epochs": 3}
    settings = load_settings(config, ray={"progress_bars": False}, finetune=recipe, train={"max_failures": 0})
    assert settings.finetune.ema == 0.9 and settings.config_file == "second-cycle.yaml"
    second = str(tmp_path / "second")

    def stop_in_epoch_three(rank: int, epoch: int) -> None:
        # Two epochs in, so the first epoch's checkpoint has surely been persisted (reports upload asynchronously).
        if epoch == 2:
            os._exit(1)

    with pytest.raises(Exception):
        tune.run(settings, aligned, second, epoch_hook=stop_in_epoch_three)
    trained = tmp_path / "trained-again"

    def no_epoch_expected(rank: int, epoch: int) -> None:
        trained.touch()

    lowered = load_settings(config, ray={"progress_bars": False}, finetune={**recipe, "time_budget_s": 1e-3})
    result = tune.run(lowered, aligned, second, epoch_hook=no_epoch_expected)
    assert not trained.exists(), "the rerun trained an epoch instead of finishing from its checkpoint"
    assert result.epochs_run in (1, 2) and result.stopped_early and result.starts == [0]

    text = (Path(second) / artifacts.META_FILE).read_text()
    meta = json.loads(text)
    assert str(tmp_path) not in text and first not in text and "/tmp" not in text
    assert meta["experiment"] == "second-cycle.yaml"
    assert meta["backbone"]["parent"]["fingerprint"] == parent["backbone"]["fingerprint"]
    assert meta["backbone"]["weights_source"] == f"fine-tuned from artifact:{parent['backbone']['fingerprint']}"
    assert result.finetune["cutmix"] == 1.0 and result.stop_reason == "budget"
    assert meta["metrics"]["finetune"]["teachers"] == [artifacts.version_of(first, parent)]

    # Rerun with the budget raised (none): the run trains on from its checkpoint to its last epoch.
    raised = tune.run(settings, aligned, second)
    assert raised.epochs_run == 3 and raised.starts == [0, result.epochs_run] and not raised.stopped_early


def test_mixing_keeps_labels_in_the_share_of_pixels_kept() -> None:
    from ferray.config import FineTuneSettings
    from ferray.model.head import class_weights

    rng = np.random.default_rng(0)
    x = np.stack([np.full((48, 48, 1), v, np.float32) for v in (0.0, 100.0, 200.0, 250.0)])
    y = np.eye(7, dtype=np.float32)[[0, 1, 2, 3]]
    for kind in ("mixup", "cutmix"):
        mixed, soft = finetune.mix(x, y, kind, 1.0, rng)
        np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-6)
        # Each face is made of two originals; the label says in what share.
        for face, label in zip(mixed, soft):
            values = np.array([0.0, 100.0, 200.0, 250.0])
            assert face.mean() == pytest.approx(float(label[:4] @ values), rel=1e-5)
    recipe = FineTuneSettings(unfreeze="all", batch_size=3, mixup=0.2, mix_prob=0.0)
    batches = finetune.MixedBatches(np.zeros((7, 48, 48, 1), np.uint8), np.arange(7) % 2, recipe, 7,
                                    class_weights([4, 3, 0, 0, 0, 0, 0], "sqrt"))
    xb, yb, sw = batches[0]
    assert len(batches) == 3 and xb.dtype == np.float32 and set(yb.sum(axis=1)) == {1.0}
    weights = class_weights([4, 3, 0, 0, 0, 0, 0], "sqrt")
    assert weights[1] > weights[0] and float(weights[:2] @ [4, 3]) == pytest.approx(7.0)
    assert set(np.round(sw, 5)) <= set(np.round(weights[:2], 5))


def test_distillation_targets_blend_the_label_with_the_teachers() -> None:
    """With teachers, a face's target is (1 - distill) x its one-hot label + distill x the teachers' mean
    probabilities (then mixed like any label); the two settings only come together."""
    from ferray.config import FineTuneSettings

    with pytest.raises(ConfigError, match="teachers"):
        load_settings(finetune={"unfreeze": "all", "distill": 0.5})
    with pytest.raises(ConfigError, match="teachers"):
        load_settings(finetune={"unfreeze": "all", "teachers": ["default"]})
    soft = np.random.default_rng(1).dirichlet(np.ones(7), size=5).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 6])
    recipe = FineTuneSettings(unfreeze="all", batch_size=5, teachers=["default"], distill=0.25, mix_prob=0.0, seed=3)
    batches = finetune.MixedBatches(np.zeros((5, 48, 48, 1), np.uint8), labels, recipe, 7, soft=soft)
    _, targets, _ = batches[0]
    order = batches.order
    np.testing.assert_allclose(targets, 0.75 * np.eye(7)[labels[order]] + 0.25 * soft[order], rtol=1e-6)
    with pytest.raises(ValueError, match="soft labels"):
        finetune.MixedBatches(np.zeros((5, 48, 48, 1), np.uint8), labels, recipe, 7, soft=soft[:4])


def test_teachers_give_their_calibrated_probabilities_and_their_versions(aligned: str) -> None:
    """`tune.teach` with the shipped model: its probabilities (TTA and temperature applied, as annotate
    gives them) for each face, averaged over teachers, and the version that names it in the run."""
    from ferray.model import artifact as artifacts

    faces = tune.load_faces(aligned, StorageSettings(), 48, 1)[0]["train"]
    soft, versions = tune.teach(["default", "default"], faces, StorageSettings())
    shipped = artifacts.load("default", StorageSettings())
    assert versions == [artifacts.version_of(shipped.uri, shipped.meta)] * 2
    np.testing.assert_allclose(soft, shipped.predict(faces.x.astype(np.float32)), rtol=1e-5, atol=1e-6)
    assert soft.shape == (len(faces.y), 7) and (soft.argmax(axis=1) == faces.y).mean() > 0.4

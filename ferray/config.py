"""The settings tree: defaults < YAML file (`--config`) < `FERRAY_<SECTION>__<FIELD>` environment."""

from __future__ import annotations

import contextvars
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

# The YAML file of the current load; a context variable keeps `load_settings` re-entrant.
_YAML_FILE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("ferray_yaml", default=None)


class ConfigError(ValueError):
    """A setting is missing, unknown or invalid; the message is one line naming the field."""


class Section(BaseModel):
    """Base of every settings section: frozen, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageSettings(Section):
    """Object-storage access; unset fields fall back to the standard AWS environment on the driver."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    anon: bool = False

    def resolved(self, environ: dict[str, str] | None = None) -> StorageSettings:
        """Fill unset fields from AWS_* variables, once on the driver, so workers never read env."""
        env = os.environ if environ is None else environ

        def pick(current: Any, *names: str) -> Any:
            if current is not None:
                return current
            for name in names:
                if env.get(name):
                    return env[name]
            return None

        def secret(current: SecretStr | None, name: str) -> SecretStr | None:
            return current if current is not None else (SecretStr(env[name]) if env.get(name) else None)

        return self.model_copy(
            update={
                "endpoint_url": pick(self.endpoint_url, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
                "region": pick(self.region, "AWS_REGION", "AWS_DEFAULT_REGION"),
                "access_key_id": secret(self.access_key_id, "AWS_ACCESS_KEY_ID"),
                "secret_access_key": secret(self.secret_access_key, "AWS_SECRET_ACCESS_KEY"),
                "session_token": secret(self.session_token, "AWS_SESSION_TOKEN"),
            }
        )


class RaySettings(Section):
    """Where Ray runs: empty address starts or joins a local Ray; `auto` or `ray://…` a cluster."""

    address: str = ""
    num_cpus: int | None = Field(default=None, ge=1)
    num_gpus: int | None = Field(default=None, ge=0)
    # Ray Data's progress bars; jobs keep them, tests may turn them off.
    progress_bars: bool = True


class IngestSettings(Section):
    """Dataset ingest: shard size, file guards and the carved validation split."""

    shard_rows: int = Field(default=4096, ge=1, le=1_000_000)
    max_file_bytes: int = Field(default=50 * 1024 * 1024, ge=1)
    # Larger images are refused as `decode:too_large` before their pixels are decoded.
    max_image_pixels: int = Field(default=100_000_000, ge=1)
    # Datasets whose official release has train/test only (RAF-DB) get `val` carved from train.
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    seed: int = 0


class FacesSettings(Section):
    """Dlib detection and alignment (owned by ferray.faces)."""

    size: int = Field(default=48, ge=8, le=1024)


class BackboneSettings(Section):
    """Frozen EfficientNet backbone (owned by ferray.backbone)."""

    name: str = "efficientnet-lite0"


class Settings(BaseSettings):
    """The whole validated, frozen settings tree."""

    model_config = SettingsConfigDict(
        env_prefix="FERRAY_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    storage: StorageSettings = StorageSettings()
    ray: RaySettings = RaySettings()
    ingest: IngestSettings = IngestSettings()
    faces: FacesSettings = FacesSettings()
    backbone: BackboneSettings = BackboneSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Command-line overrides (init) beat the environment, which beats the YAML file.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_file = _YAML_FILE.get()
        if yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)

    def public_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready data with every secret masked, for writing beside outputs."""
        return self.model_dump(mode="json")


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "settings"
    got = first.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    if "secret" in where or "key" in where or "token" in where:
        shown = ""
    more = len(error.errors()) - 1
    tail = f"; and {more} more" if more else ""
    return f"{where}: {first['msg']}{shown}{tail}"


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings tree once, on the driver; raise ConfigError with one clear line."""
    path: Path | None = None
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
    token = _YAML_FILE.set(path)
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise ConfigError(f"invalid setting {_describe(error)}") from None
    except (OSError, ValueError) as error:  # unreadable or malformed YAML
        raise ConfigError(f"cannot read config {path}: {str(error).splitlines()[0]}") from None
    finally:
        _YAML_FILE.reset(token)

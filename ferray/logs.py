"""Log records never carry a credential: the settings' secrets are masked in every message of the process."""

from __future__ import annotations

import logging
from typing import Any, Callable

from ferray.config import StorageSettings

MASK = "**********"
# Shorter values would mask ordinary words; real keys and tokens are 16 characters and more.
MIN_SECRET = 8


def secrets_of(storage: StorageSettings) -> set[str]:
    """The credential values of a (resolved) storage section."""
    values = (field.get_secret_value() for field in (storage.access_key_id, storage.secret_access_key,
                                                     storage.session_token) if field is not None)
    return {value for value in values if len(value) >= MIN_SECRET}


def redact(secrets: set[str]) -> None:
    """Mask `secrets` in every log record made from now on, whichever library logs and wherever it goes.

    Masking at record creation (not in one handler) also covers handlers added later and other
    libraries' loggers: botocore, at DEBUG, logs request headers, session token included.
    """
    current = logging.getLogRecordFactory()
    known: set[str] | None = getattr(current, "ferray_secrets", None)
    if known is not None:  # installed already: one more set of values to mask
        known.update(secrets)
        return
    masked = set(secrets)

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = current(*args, **kwargs)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed call: logging reports it when the record is emitted
            return record
        if any(secret in message for secret in masked):
            for secret in masked:
                message = message.replace(secret, MASK)
            record.msg, record.args = message, ()
        return record

    installed: Callable[..., logging.LogRecord] = factory
    installed.ferray_secrets = masked  # type: ignore[attr-defined]
    logging.setLogRecordFactory(installed)


# Ray Train's placement-group cleaner asks the State API, which lives in the dashboard, once a second
# whether the controller lives; a local Ray started without a dashboard answers "unavailable" every
# time, and the warning would make up most of a long training job's log. Ray Train also logs two
# lines at INFO for every epoch's checkpoint, which ferray's own epoch line already says.
QUIET_RAY_LOGGERS = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
    "ray.train.v2._internal.execution.storage": logging.WARNING,
    "ray.train._internal.storage": logging.WARNING,  # the same line, from the module a Train worker persists with
    # This module names its logger by its file's path.
    "ray/train/v2/_internal/execution/context.py": logging.WARNING,
}


def quiet_ray_workers() -> None:
    """Ray `worker_process_setup_hook` for the local Ray ferray starts (it has no dashboard).

    A filter on each logger, not its level: a Train worker later runs `logging.config.dictConfig`,
    which resets the level of every logger under `ray.train` but keeps their filters.
    """
    import os

    import ray

    root = os.path.dirname(os.path.dirname(ray.__file__))
    for name, level in QUIET_RAY_LOGGERS.items():
        logger = logging.getLogger(os.path.join(root, name) if name.endswith(".py") else name)
        logger.addFilter(lambda record, level=level: record.levelno >= level)

"""ferray's own errors: a job that cannot run, with the exit code the command line maps it to.

Record-level failures (an undecodable image, an unreadable video) are not errors of the job: they
become row statuses. Anything else that raises is a bug and surfaces with its traceback.
"""

from __future__ import annotations

from typing import ClassVar

EXIT_CONFIG = 2
EXIT_CANNOT_RUN = 3


class FerrayError(Exception):
    """A job that cannot run; `str()` is the one line the command line prints."""

    exit_code: ClassVar[int] = EXIT_CANNOT_RUN


class ConfigError(FerrayError, ValueError):
    """A setting is missing, unknown or invalid; the message is one line naming the field."""

    exit_code = EXIT_CONFIG


class InputError(FerrayError, ValueError):
    """The inputs make the job impossible (no labelled rows, the wrong kind of shards, a mixed folder)."""


class StorageError(FerrayError, OSError):
    """Storage cannot be reached or a path does not exist; the message is one line."""


class ModelError(FerrayError, ValueError):
    """A model artifact is missing, unreadable or does not fit the job."""

"""Logging: secrets masked in every record, and quiet libraries (TensorFlow, absl, Ray) unless at DEBUG."""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import tempfile
import types
from typing import Any, Callable, Iterator, Sequence

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
    """Ray `worker_process_setup_hook` of the Ray ferray starts or joins, unless at DEBUG: it runs in
    each worker before any task, so TensorFlow's import there is quiet too (`QUIET_ENV` comes with
    the runtime env's `env_vars`).

    A filter on each Ray Train logger, not its level: a Train worker later runs `logging.config.dictConfig`,
    which resets the level of every logger under `ray.train` but keeps their filters.
    """
    import ray

    quiet_tensorflow_import()
    root = os.path.dirname(os.path.dirname(ray.__file__))
    for name, level in QUIET_RAY_LOGGERS.items():
        logger = logging.getLogger(os.path.join(root, name) if name.endswith(".py") else name)
        logger.addFilter(lambda record, level=level: record.levelno >= level)


# -- quiet by default ------------------------------------------------------------------------------

# Read by TensorFlow's C++ logging and by gRPC when they start, so they must be in the environment
# before `import tensorflow`: in the driver and in every Ray worker. 3 drops TensorFlow's C++ INFO,
# WARNING and ERROR lines (on a machine without a GPU, cuInit's failure is logged as an ERROR);
# TensorFlow's Python errors still raise. oneDNN is left on: TF_ENABLE_ONEDNN_OPTS=0 would change the
# numbers, and its start-up line is an INFO line that 3 drops already.
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "GRPC_VERBOSITY": "ERROR"}

# What TensorFlow's native libraries write to stderr while they load, before they read any setting:
# absl's notice that logging is not initialised, cudart_stub's "no CUDA driver", the CPU-feature notice,
# the CUDA plugins registering twice. Only lines written while `tensorflow` is imported are matched.
IMPORT_NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|^(?:[IW]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ |\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IW] )"  # absl / TSL INFO, WARNING
    r"|cudart_stub\.cc|cuda_platform\.cc|computation_placer|Unable to register cu\w+ factory|failed call to cuInit"
    r"|oneDNN custom operations|TF_ENABLE_ONEDNN_OPTS|This TensorFlow binary is optimized"
    r"|^To enable the following instructions:"
)


def verbose() -> bool:
    """Whether this process asked for everything (ferray's loggers at DEBUG): libraries then keep their chatter."""
    return logging.getLogger("ferray").isEnabledFor(logging.DEBUG)


def configure(level: str) -> None:
    """The command line's logging: ferray's records at `level` on stderr; below DEBUG, quiet libraries.

    Call first, before anything imports TensorFlow. A variable the user set is kept.
    """
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if verbose():
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    quiet_tensorflow_import()


def worker_env() -> dict[str, str]:
    """The environment variables a Ray worker needs to start as quietly as this driver (none when verbose)."""
    return {} if verbose() else {name: os.environ.get(name, value) for name, value in QUIET_ENV.items()}


class _QuietLoader(importlib.abc.Loader):
    """TensorFlow's own loader, run with stderr (the file descriptor) sent to a file; what is not
    start-up noise is written back to stderr afterwards, in order."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.inner  # type: ignore[union-attr]
        with filtered_stderr(IMPORT_NOISE):
            self.inner.exec_module(module)


@contextlib.contextmanager
def filtered_stderr(noise: re.Pattern[str]) -> Iterator[None]:
    """stderr (the file descriptor, where native libraries write) sent to a file while inside; the lines that
    `noise` does not match are written back to stderr afterwards, in order."""
    with tempfile.TemporaryFile() as held:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace").splitlines(keepends=True)
                    if not noise.search(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


# LiteRT announces its CPU delegate once a process, on the first graph it plans, straight to stderr.
LITERT_NOISE = re.compile(r"^INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.")
_litert_planned = False


def allocate_quietly(interpreter: Any) -> None:
    """`interpreter.allocate_tensors()`; the first in this process without LiteRT's delegate notice (kept at -v)."""
    global _litert_planned
    if _litert_planned or verbose():
        interpreter.allocate_tensors()
        return
    with filtered_stderr(LITERT_NOISE):
        interpreter.allocate_tensors()
    _litert_planned = True


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` once, as the other finders would, and hands back its spec with `_QuietLoader`."""

    def find_spec(self, name: str, path: Sequence[str] | None, target: types.ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once, and never for itself
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def quiet_tensorflow_import() -> None:
    """Drop the lines TensorFlow's native libraries print while it is imported, whoever imports it first.

    No setting reaches them: they are written as the shared libraries load. A no-op once TensorFlow
    is imported.
    """
    if "tensorflow" in sys.modules or any(isinstance(f, _QuietTensorFlowFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietTensorFlowFinder())


# Ray turns token authentication on for every new local cluster and says so at each start. (Setting
# RAY_AUTH_MODE=token instead would be silent, but Ray reads it once per process, before ferray can.)
# Its warning that authentication is *off* stays.
RAY_START_NOTICES = {"ray._private.authentication.authentication_token_setup": "Token authentication is enabled"}


def quiet_ray_driver() -> None:
    """Drop Ray's start-up notices in this driver (ray.init's `logging_level` keeps its INFO lines out)."""
    for name, notice in RAY_START_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(getattr(f, "ferray_notice", None) == notice for f in logger.filters):
            keep: Any = lambda record, notice=notice: notice not in record.getMessage()
            keep.ferray_notice = notice
            logger.addFilter(keep)


def quiet_ray_data() -> None:
    """Ray Data's INFO lines (its progress tables when stdout is not a terminal, "execution finished")
    stay in its session log, off the console; its warnings still show."""
    import ray.data  # noqa: F401  (configures the `ray.data` logger and its console handler)

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(max(handler.level, logging.WARNING))

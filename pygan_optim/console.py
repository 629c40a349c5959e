"""A readable console for ``pygan-optim train``: what MMEngine prints, and what it keeps.

MMEngine's :class:`~mmengine.logging.MMLogger` writes every record twice: to a
``StreamHandler`` on stdout and to a ``FileHandler`` (``WORK_DIR/<timestamp>/<timestamp>.log``).
Quiet mode (the default of ``pygan-optim train``) adds one :class:`logging.Filter` to the
console handler only, so the log file keeps everything, and nothing else in MMEngine
changes. The filter drops:

- the three start-up dumps the Runner logs at INFO (about 240 lines for the BigGAN
  configs): the system/runtime environment, the whole config, the hook-order table;
- a few MMEngine warnings that tell a user of these configs nothing they can act on
  (:data:`NOISE`): deprecations raised inside MMEngine's own ``CheckpointHook``, a
  visualizer note about ``dataset_meta``, a parameter-scheduler note for configs without
  one, the SyncBN note of a one-process run, and the BatchNorm + gradient accumulation
  note (the BigGAN schedule accumulates on purpose; the note is in the log file).

:func:`silence_known_warnings` also ignores the Python warnings in :data:`PY_WARNINGS`
(they would go to stderr, not to MMEngine's logger).

Everything else -- iteration lines, checkpoints, other warnings, errors -- still shows.
"""
from __future__ import annotations

import logging
from typing import Iterable, List, Optional, Tuple

# Prefixes of the start-up dumps (Runner._log_env and Runner.__init__, MMEngine 0.10).
DUMPS: Tuple[str, ...] = (
    "\n" + "-" * 60 + "\nSystem environment:",
    "Config:\n",
    "Hooks will be executed in the following order:",
)

# Substrings of MMEngine messages that say nothing to the user of these configs.
NOISE: Tuple[str, ...] = (
    '"FileClient" will be deprecated in future',
    '"HardDiskBackend" is the alias of "LocalBackend"',
    "``dataset_meta`` in visualizer will be None",
    "`save_param_scheduler` is True but `self.param_schedulers` is None",
    "`resume_param_scheduler` is True but `self.param_schedulers` is None",
    "Gradient accumulative may slightly decrease performance because the model has "
    "BatchNorm layers",
    "Distributed training is not used, all SyncBatchNorm (SyncBN) layers in the model will "
    "be automatically reverted to BatchNormXd layers",
)

# Python warnings (``warnings.warn``, on stderr) silenced in quiet mode: (category, regex).
PY_WARNINGS: Tuple[Tuple[type, str], ...] = (
    # torch.load, called by MMEngine's checkpoint loader, on the variable that
    # `pygan-optim train` sets so that MMEngine can load its own checkpoints.
    (UserWarning, r"Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD detected"),
)


def silence_known_warnings() -> None:
    import warnings

    for category, regex in PY_WARNINGS:
        warnings.filterwarnings("ignore", message=regex, category=category)


class QuietConsoleFilter(logging.Filter):
    """Drops MMEngine's start-up dumps and :data:`NOISE` from one handler."""

    def __init__(self, dumps: Iterable[str] = DUMPS, noise: Iterable[str] = NOISE):
        super().__init__()
        self.dumps = tuple(dumps)
        self.noise = tuple(noise)
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        msg = record.getMessage()
        if msg.startswith(self.dumps) or any(n in msg for n in self.noise):
            self.dropped += 1
            return False
        return True


def console_handlers(logger: logging.Logger) -> List[logging.Handler]:
    """The logger's stream handlers that are not file handlers."""
    return [h for h in logger.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def file_handlers(logger: logging.Logger) -> List[logging.FileHandler]:
    return [h for h in logger.handlers if isinstance(h, logging.FileHandler)]


def make_runner_class(quiet: bool):
    """``mmengine.runner.Runner`` whose logger gets :class:`QuietConsoleFilter` on its
    console handler when ``quiet`` (the file handler is left alone). The last logger
    built is kept in ``cls.last_logger`` so that a caller can write to its log file
    even when ``from_cfg`` fails half-way."""
    from mmengine.runner import Runner

    class PyganRunner(Runner):
        last_logger: Optional[logging.Logger] = None

        def build_logger(self, *args, **kwargs):
            logger = super().build_logger(*args, **kwargs)
            if quiet:
                for h in console_handlers(logger):
                    if not any(isinstance(f, QuietConsoleFilter) for f in h.filters):
                        h.addFilter(QuietConsoleFilter())
            type(self).last_logger = logger
            return logger

    return PyganRunner


def log_to_file_only(logger: Optional[logging.Logger], level: int, text: str,
                     pathname: str = __file__, func: Optional[str] = None) -> None:
    """Write ``text`` to the logger's file handlers only (e.g. a traceback)."""
    if logger is None:
        return
    record = logger.makeRecord(logger.name, level, pathname, 0, text, None, None, func=func)
    for h in file_handlers(logger):
        if record.levelno >= h.level:
            h.handle(record)

"""What a checkpoint conversion reports, and the error it raises when it cannot go on."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from ..common import MigrationError


class CheckpointConversionError(MigrationError):
    """The checkpoint cannot be converted (always, or under ``strict=True``)."""


@dataclass
class CheckpointReport:
    """What :func:`convert_checkpoint` did.

    ``mapping``: ``(0.x key, 1.x key, detail)`` rows; ``warnings``: what was lost
    or approximated (``strict=True`` turns them into an error); ``notes``:
    informational; ``config_source``: where the 1.x config came from;
    ``checked_against_model``: whether the 1.x model itself was built and compared.
    """

    mapping: List[Tuple[str, str, str]] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    config_source: Optional[str] = None
    checked_against_model: bool = False
    iter: Optional[int] = None
    ema_steps: Optional[int] = None

    def map(self, old: str, new: str, detail: str = "") -> None:
        self.mapping.append((old, new, detail))


def fail(msg: str) -> None:
    raise CheckpointConversionError(msg)

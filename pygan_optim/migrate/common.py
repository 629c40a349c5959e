"""Shared pieces of the 0.x -> 1.x migration: the result types, the error and the context.

Every translating module receives one :class:`Ctx` and reports through it:
``warn`` (a lossy conversion; ``--strict`` turns these into a failure), ``note``
(informational), ``keep`` (a setting kept, commented out, in the output) and
``refuse`` (the config cannot be migrated at all: :class:`MigrationError`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


class MigrationError(ValueError):
    """A conversion that cannot be done faithfully (always, or under ``strict=True``).

    ``warnings`` holds the lossy conversions when the error comes from ``strict``;
    it is empty for a refusal (a config that cannot be migrated at all).
    """

    def __init__(self, message: str, warnings: Optional[List[str]] = None):
        super().__init__(message)
        self.warnings = list(warnings or [])


@dataclass
class UntranslatedItem:
    """A 0.x setting the tool could not translate; it is kept as a comment."""

    path: str  # dotted location in the 0.x config, e.g. 'data' or 'runner'
    value: Any
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class MigrationResult:
    source: str  # the 0.x config file
    config: Dict[str, Any]  # the 1.x config, plain dicts/lists/tuples
    text: str = ""  # the rendered 1.x config file
    warnings: List[str] = field(default_factory=list)  # lossy conversions
    untranslated: List[UntranslatedItem] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # informational
    family: Optional[str] = None  # the family-table row that matched (e.g. 'BigGAN')
    needs: Optional[str] = None  # 'pygan_optim' or 'mmagic': what registers the model
    checks: List[str] = field(default_factory=list)  # what the tool verified itself


class Ctx:
    """Collects what the translation steps report for one config."""

    def __init__(self, source: str):
        self.source = source
        self.warnings: List[str] = []
        self.notes: List[str] = []
        self.untranslated: List[UntranslatedItem] = []
        self.present: set = set()  # top-level keys of the 0.x config

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)

    def note(self, msg: str) -> None:
        self.notes.append(msg)

    def keep(self, path: str, value: Any, reason: str) -> None:
        self.untranslated.append(UntranslatedItem(path, value, reason))

    def refuse(self, what: str, todo: str) -> None:
        """Stop: ``what`` cannot be translated; ``todo`` says what the user must do."""
        raise MigrationError(f"cannot migrate {self.source}: {what}. {todo} "
                             f"(nothing written)")


def plain(value: Any) -> Any:
    """ConfigDicts -> dicts, recursively (lists and tuples keep their type); numpy
    numbers and arrays (`lr=np.float32(2e-4)`, a config runs as plain Python) -> the
    Python numbers and lists they hold."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()  # a numpy number, or an array as nested lists
    return value


def clean_float(x: float) -> float:
    """Drop binary noise from derived values: 1 - 0.9999 -> 0.0001."""
    return float(f"{x:.12g}")


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_pos_int(x: Any) -> bool:
    return is_int(x) and x >= 1


def type_of(cfg: Any) -> Optional[str]:
    return cfg.get("type") if isinstance(cfg, dict) else None

"""Values made loadable with ``torch.load(weights_only=True)``."""
from __future__ import annotations

from typing import Any

import torch

from .report import CheckpointReport


def safe(value: Any, path: str, report: CheckpointReport) -> Any:
    """``value`` made loadable with ``torch.load(weights_only=True)``."""
    if type(value).__module__.split(".")[0] == "numpy":  # before float: np.float64 is one
        if getattr(value, "shape", ()) != ():
            return torch.as_tensor(value)
        return value.item()
    if value is None or type(value) in (bool, int, float, str, bytes) or \
            isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        return {k: safe(v, f"{path}.{k}", report) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(safe(v, f"{path}[{i}]", report) for i, v in enumerate(value))
    report.warnings.append(f"{path}: a {type(value).__name__} object is kept as its repr() "
                           "text (not loadable with weights_only=True)")
    return repr(value)

"""State-dict key renaming: DDP-style ``module.`` prefixes removed."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Optional, Tuple

from .report import CheckpointReport


def strip_module(sd: "OrderedDict[str, Any]", meta: Dict[str, Any],
                 report: CheckpointReport) -> Tuple["OrderedDict[str, Any]", Dict[str, Any]]:
    """Removes DDP-style ``module.`` prefixes: of the whole model, then of each network.

    mmcv's ``get_state_dict`` already unwraps module wrappers, so these appear only in
    checkpoints saved from a wrapped model's own ``state_dict()``. ``meta`` is the
    state_dict's ``_metadata`` (module prefix -> version), renamed alike.
    """
    def strip(name: str, wrapper: str) -> Optional[str]:
        # 'wrapper.module.x' -> 'wrapper.x'; 'wrapper.module' -> 'wrapper'; None: drop
        # the wrapper's own entry, which the unwrapped module's replaces.
        head = wrapper + "." if wrapper else ""
        if name == head + "module":
            return wrapper
        if name.startswith(head + "module."):
            return head + name[len(head + "module."):]
        return None if name == wrapper else name

    def apply(wrapper: str, what: str):
        nonlocal sd, meta
        sd = OrderedDict((strip(k, wrapper), v) for k, v in sd.items())
        renamed = {}
        for k, v in meta.items():
            n = strip(k, wrapper)
            if n is not None:
                renamed[n] = v
        meta = renamed
        report.notes.append(what)

    if sd and all(k.startswith("module.") for k in sd):
        apply("", "the 'module.' prefix of a wrapped model (DDP) was removed")
    for top in sorted({k.split(".", 1)[0] for k in sd}):
        own = [k for k in sd if k.startswith(top + ".")]
        if own and all(k.startswith(f"{top}.module.") for k in own):
            apply(top, f"the 'module.' prefix inside '{top}' (a per-network DDP wrapper) "
                       "was removed")
    return sd, meta

"""Reading and writing checkpoint files; :func:`migrate_checkpoint` (file to file)."""
from __future__ import annotations

import os
import pickle
import re
import tempfile
from typing import Any, Optional, Tuple

import torch

from .convert import convert_checkpoint
from .report import CheckpointReport


def load_checkpoint_file(path: str) -> Tuple[dict, Optional[str]]:
    """``torch.load`` on the CPU; returns ``(checkpoint, note)``.

    Tries ``weights_only=True`` first. A 0.x checkpoint can hold other pickled
    objects (numpy scores in ``meta.hook_msgs``, ...): it is then loaded fully, and
    the note says so (convert only checkpoints you trust, as with any torch.load).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True), None
    except pickle.UnpicklingError as e:
        # torch's message is long; its "Unsupported global: GLOBAL x.y" line names the object
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        first = f"e.g. {found.group(1)}" if found else "objects weights_only refuses"
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        return ckpt, (f"{path} holds pickled objects besides tensors ({first}); it was loaded "
                      "with weights_only=False: convert only checkpoints you trust")


def save_checkpoint_file(checkpoint: dict, path: str) -> None:
    """``torch.save`` to a temporary file beside ``path``, then renamed: all or nothing."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pth")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def migrate_checkpoint(old_path: str, new_path: str, config: Any = None,
                       strict: bool = False) -> CheckpointReport:
    """Load ``old_path``, convert it, save ``new_path``; nothing is written on error."""
    old, note = load_checkpoint_file(old_path)
    new, report = convert_checkpoint(old, config=config, strict=strict)
    if note:
        report.notes.insert(0, note)
    save_checkpoint_file(new, new_path)
    return report

"""Reading a 0.x config: ``mmengine.Config.fromfile`` resolves its ``_base_`` files; the
result is returned as plain dicts, lists and tuples (no ConfigDict)."""
from __future__ import annotations

import os
from typing import Any, Dict

from .common import plain


def read_config(path: str) -> Dict[str, Any]:
    """The 0.x config at ``path`` as a plain dict; FileNotFoundError if it is absent."""
    from mmengine import Config

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such 0.x config: {path}")
    # custom_imports name the 0.x project's modules: reading the dict must not import them.
    return plain(Config.fromfile(path, import_custom_modules=False).to_dict())

"""Reading a 0.x config: ``mmengine.Config.fromfile`` resolves its ``_base_`` files; the
result is returned as plain dicts, lists and tuples (no ConfigDict)."""
from __future__ import annotations

import os
import tempfile
from typing import Any, Dict, List

from .common import plain


def read_config(path: str) -> Dict[str, Any]:
    """The 0.x config at ``path`` as a plain dict; FileNotFoundError if it is absent."""
    from mmengine import Config

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such 0.x config: {path}")
    # custom_imports name the 0.x project's modules: reading the dict must not import them.
    # A 0.x config is plain Python (mmcv ran it): with `import os.path as osp` MMEngine
    # would otherwise take it for one of its lazy-import configs, where osp.join fails.
    return plain(Config.fromfile(path, import_custom_modules=False,
                                 lazy_import=False).to_dict())


def config_files(path: str) -> List[str]:
    """The files reading ``path`` reads: itself and its ``_base_`` files, recursively,
    as absolute paths (bases in an installed package's scope left out). Uses
    MMEngine's own (private) steps, in its order: the ``{{ fileDirname }}`` and
    ``{{ $ENV:default }}`` placeholders are filled in before ``_base_`` is read."""
    from mmengine import Config

    found: List[str] = []
    todo = [os.path.abspath(path)]
    with tempfile.TemporaryDirectory() as tmp:
        while todo:
            name = todo.pop()
            if name in found or not os.path.isfile(name):
                continue
            found.append(name)
            filled = os.path.join(tmp, "filled" + os.path.splitext(name)[1])
            try:
                Config._substitute_predefined_vars(name, filled)
                Config._substitute_env_variables(filled, filled)
                for base in Config._get_base_files(filled):
                    resolved, scope = Config._get_cfg_path(base, name)
                    if scope is None:
                        todo.append(os.path.abspath(resolved))
            except Exception:  # a file that does not parse: reading it says so
                continue
    return found

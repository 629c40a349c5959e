"""Loads the compiled module, which registers the ops under ``torch.ops.pygan_optim``.

``PYGAN_OPTIM_EXTENSION=/path/to/_C.so`` loads another build of it instead (the
sanitizer builds of ``.ci/sanitize.sh``).

The module reads torch's C++ objects as the torch it was compiled against lays
them out, so it runs only with that torch version: another one is refused at
import with the versions and the command that rebuilds it, rather than failing
with an undefined symbol or, worse, reading fields that moved."""
import importlib.util
import mmap
import os
import re
import sys
from typing import Optional

import torch  # (torch's libraries must be loaded before the extension)

_REBUILD = ("rebuild it against this torch: `make build` in a checkout of pygan_optim, or "
            "`pip install --no-build-isolation --no-deps --force-reinstall .` in its source "
            "(`-e .` for an editable install)")


def _torch_release(version: str) -> str:
    """"2.13.0+cpu", "2.13.0a0+git1234" -> "2.13.0": what module.cpp writes."""
    found = re.match(r"\d+\.\d+\.\d+", version)
    return found.group(0) if found else version


def _built_with(path: Optional[str]) -> Optional[str]:
    """The torch version written into a module file (see module.cpp), if found."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            found = re.search(rb"PYGAN_OPTIM_BUILT_WITH_TORCH=([0-9.]+);", data)
            return found.group(1).decode() if found else None
    except (OSError, TypeError, ValueError):
        return None


def _check_built_with(built: Optional[str], path: Optional[str]) -> None:
    if built is not None and built != _torch_release(torch.__version__):
        raise ImportError(f"pygan_optim's compiled module ({path}) was built against torch "
                          f"{built}, but this Python runs torch {torch.__version__}: {_REBUILD}")


def _load():
    override = os.environ.get("PYGAN_OPTIM_EXTENSION")
    if override:
        spec = importlib.util.spec_from_file_location(f"{__package__}._C", override)
        if spec is None:  # a folder, or a file name no extension module has
            raise ImportError(f"PYGAN_OPTIM_EXTENSION={override!r} is not a compiled module "
                              "file (_C.cpython-*.so)")
    else:
        spec = importlib.util.find_spec(f"{__package__}._C")
    path = spec.origin if spec is not None else None
    # Before loading: its static initialisers already register the ops with torch.
    _check_built_with(_built_with(path), path)
    if override:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        from . import _C as module
    _check_built_with(getattr(module, "built_with_torch", None), path)  # (None: older builds)
    return module


_C = _load()

cuda_built = _C.cuda_built
cpu_capability = _C.cpu_capability
stream_prefetch_bytes = _C.stream_prefetch_bytes
plan_chunks = _C.plan_chunks
partition_chunks = _C.partition_chunks
DEFAULT_CHUNK_SIZE = _C.default_chunk_size
AdamPlan = _C.AdamPlan
stream_pass = _C.stream_pass
use_count = _C.use_count
grad_use_count = _C.grad_use_count
ema_walks_with = _C.ema_walks_with
same_objects = _C.same_objects
written_shares_memory = _C.written_shares_memory

"""Loads the compiled module, which registers the ops under ``torch.ops.pygan_optim``.

``PYGAN_OPTIM_EXTENSION=/path/to/_C.so`` loads another build of it instead (the
sanitizer builds of ``.ci/sanitize.sh``)."""
import importlib.util
import os
import sys

import torch  # noqa: F401  (torch's libraries must be loaded before the extension)

_override = os.environ.get("PYGAN_OPTIM_EXTENSION")
if _override:
    _spec = importlib.util.spec_from_file_location(f"{__package__}._C", _override)
    _C = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _C
    _spec.loader.exec_module(_C)
else:
    from . import _C

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

"""Loads the compiled module, which registers the ops under ``torch.ops.pygan_optim``."""
import torch  # noqa: F401  (torch's libraries must be loaded before the extension)

from . import _C

cuda_built = _C.cuda_built
cpu_capability = _C.cpu_capability
plan_chunks = _C.plan_chunks
partition_chunks = _C.partition_chunks
DEFAULT_CHUNK_SIZE = _C.default_chunk_size
AdamPlan = _C.AdamPlan

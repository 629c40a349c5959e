"""pygan_optim: fused optimizer kernels for GAN training, a drop-in for MMEngine's wrappers.

Importing the package loads the compiled ops (``torch.ops.pygan_optim.*``) and
registers its classes in MMEngine's registries.
"""
from ._interrupt import guard_cli_start as _guard_cli_start

# First, before torch: in `pygan-optim train`, a Ctrl-C while torch and MMEngine
# import gives the command's one-line message and exit 130 (nothing elsewhere).
_guard_cli_start()

from . import _ext, ops, reference
from ._ext import cpu_capability, cuda_built
from .constructors import MultiOptimWrapperConstructor
from .optim import EmaBlend, FusedAdam, FusedAdamW
from .wrappers import AmpOptimWrapper, OptimWrapper, OptimWrapperDict

__all__ = ["FusedAdam", "FusedAdamW", "EmaBlend", "OptimWrapper", "AmpOptimWrapper", "OptimWrapperDict",
           "MultiOptimWrapperConstructor", "ops", "reference", "cpu_capability", "cuda_built"]
__version__ = "0.1.0"

from . import registry as _registry  # noqa: E402  (after the classes it registers)

_registry.register_all()

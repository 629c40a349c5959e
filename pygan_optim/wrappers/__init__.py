from .amp_optim_wrapper import AmpOptimWrapper
from .optim_wrapper import OptimWrapper
from .optim_wrapper_dict import OptimWrapperDict

__all__ = ["OptimWrapper", "AmpOptimWrapper", "OptimWrapperDict"]

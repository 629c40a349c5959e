"""pygan_optim.OptimWrapperDict: MMEngine's OptimWrapperDict, re-exported.

MMEngine's Runner tells a dict of wrappers from a single one with
``isinstance(..., mmengine.optim.OptimWrapperDict)``, so ours is MMEngine's
class itself rather than a look-alike: keys/items/values, ``get_lr()`` as
``generator.lr``, per-key ``state_dict``, and update methods that raise.
"""
from mmengine.optim import OptimWrapperDict

__all__ = ["OptimWrapperDict"]

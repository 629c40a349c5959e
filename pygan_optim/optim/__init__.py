from .adam import FusedAdam, FusedAdamW
from .ema_blend import EmaBlend

__all__ = ["FusedAdam", "FusedAdamW", "EmaBlend"]

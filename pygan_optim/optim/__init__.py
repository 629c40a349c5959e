from .adam import FusedAdam, FusedAdamW

__all__ = ["FusedAdam", "FusedAdamW"]

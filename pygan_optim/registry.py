"""Registers pygan_optim's classes in MMEngine's registries, so configs can name them."""
from mmengine.registry import OPTIMIZERS


def register_all() -> None:
    from .optim import FusedAdam, FusedAdamW

    for cls in (FusedAdam, FusedAdamW):
        OPTIMIZERS.register_module(name=cls.__name__, module=cls, force=True)

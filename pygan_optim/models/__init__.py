"""BigGAN generator and discriminator, MMagic-compatible (configs, arguments, state-dict keys)."""
from .biggan_discriminator import BigGANDiscriminator
from .biggan_generator import BigGANGenerator

__all__ = ["BigGANGenerator", "BigGANDiscriminator", "register_models"]


def register_models() -> None:
    """Registers both models in MMEngine's MODELS, so configs can name them by type."""
    from mmengine.registry import MODELS

    for cls in (BigGANGenerator, BigGANDiscriminator):
        MODELS.register_module(name=cls.__name__, module=cls, force=True)

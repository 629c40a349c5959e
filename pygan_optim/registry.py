"""Registers pygan_optim's classes in MMEngine's registries, so configs can name them."""
from mmengine.registry import (DATASETS, HOOKS, MODELS, OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS,
                               OPTIMIZERS)


def register_all() -> None:
    from .constructors import MultiOptimWrapperConstructor
    from .datasets import ImageFolderDataset, SyntheticImageDataset
    from .gan import (BigGAN, BlendEmaInStepHook, DataPreprocessor, ExactResumeHook,
                      FusedExponentialMovingAverage)
    from .models import register_models
    from .optim import FusedAdam, FusedAdamW
    from .wrappers import AmpOptimWrapper, OptimWrapper

    for cls in (FusedAdam, FusedAdamW):
        OPTIMIZERS.register_module(name=cls.__name__, module=cls, force=True)
    OPTIM_WRAPPERS.register_module(name="FusedOptimWrapper", module=OptimWrapper, force=True)
    OPTIM_WRAPPERS.register_module(name="FusedAmpOptimWrapper", module=AmpOptimWrapper, force=True)
    OPTIM_WRAPPER_CONSTRUCTORS.register_module(
        name="MultiOptimWrapperConstructor", module=MultiOptimWrapperConstructor, force=True)
    for cls in (BigGAN, DataPreprocessor):
        MODELS.register_module(name=cls.__name__, module=cls, force=True)
    # A name of its own: MMagic's scope has an ExponentialMovingAverage of its own.
    MODELS.register_module(name="FusedExponentialMovingAverage",
                           module=FusedExponentialMovingAverage, force=True)
    register_models()
    for cls in (ExactResumeHook, BlendEmaInStepHook):
        HOOKS.register_module(name=cls.__name__, module=cls, force=True)
    for cls in (SyntheticImageDataset, ImageFolderDataset):
        DATASETS.register_module(name=cls.__name__, module=cls, force=True)

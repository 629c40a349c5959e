from .biggan import BigGAN
from .data_preprocessor import DataPreprocessor
from .ema import ExponentialMovingAverage
from .ema_hook import BlendEmaInStepHook

FusedExponentialMovingAverage = ExponentialMovingAverage  # the name registered in MODELS
from .resume_hook import ExactResumeHook

__all__ = ["BigGAN", "DataPreprocessor", "ExponentialMovingAverage", "FusedExponentialMovingAverage",
           "ExactResumeHook", "BlendEmaInStepHook"]

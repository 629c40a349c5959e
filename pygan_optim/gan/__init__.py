from .biggan import BigGAN
from .data_preprocessor import DataPreprocessor
from .ema import ExponentialMovingAverage
from .resume_hook import ExactResumeHook

__all__ = ["BigGAN", "DataPreprocessor", "ExponentialMovingAverage", "ExactResumeHook"]

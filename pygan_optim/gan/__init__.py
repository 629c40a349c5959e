from .biggan import BigGAN
from .data_preprocessor import DataPreprocessor
from .ema import ExponentialMovingAverage

__all__ = ["BigGAN", "DataPreprocessor", "ExponentialMovingAverage"]

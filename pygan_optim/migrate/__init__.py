"""Convert an MMGeneration 0.x GAN config into an MMEngine / MMagic 1.x config.

``migrate(old_path)`` reads the 0.x config (its ``_base_`` files resolved),
finds its family in :mod:`.families` (BigGAN, SNGAN, SAGAN, DCGAN, LSGAN, GGAN,
WGAN-GP, StyleGAN v1/v2/v3, MSPIE, PGGAN, SinGAN, CycleGAN, Pix2Pix; Improved
DDPM is refused) and returns a :class:`MigrationResult`: the 1.x config as a
plain dict, its rendered source, the lossy-conversion warnings, notes and the
settings it could not translate (kept in the file as comments). A config that
cannot be migrated raises :class:`MigrationError` naming what and what to do.
``check(result, build=...)`` verifies the text; ``write(result, path)`` saves it.

One module per concern:

* :mod:`.reader`      reading the 0.x config
* :mod:`.families`    the family table: 1.x model types and the arguments each takes
* :mod:`.schedule`    ``train_cfg`` -> step counts, accumulation, schedule model args
* :mod:`.model`       the model dict, its losses -> ``loss_config``
* :mod:`.optimizers`  optimizers -> ``optim_wrapper``; fp16 / apex -> wrapper types
* :mod:`.hooks`       the EMA hook -> ``ema_config``
* :mod:`.lr`          ``lr_config`` -> ``param_scheduler``
* :mod:`.default_hooks` ``checkpoint_config`` / ``log_config`` -> ``default_hooks``,
  ``log_processor``, ``visualizer``
* :mod:`.runtime`     ``total_iters``, ``runner``, the ``evaluation`` interval and the
  other top-level keys
* :mod:`.output`      rendering, the header, ``check`` and ``write``
* :mod:`.core`        the driver (``migrate`` / ``convert``)

Checkpoints (``pygan-optim migrate --checkpoint``) are converted by the subpackage
:mod:`.checkpoint`, which this package does not import.
"""
from .common import MigrationError, MigrationResult, UntranslatedItem
from .core import convert, migrate
from .families import Family, families, find_family
from .output import check, render, write

__all__ = ["MigrationError", "MigrationResult", "UntranslatedItem", "migrate", "convert",
           "write", "render", "check", "Family", "families", "find_family"]

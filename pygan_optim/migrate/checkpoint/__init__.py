"""Convert an MMGeneration 0.x GAN checkpoint into one MMEngine 1.x's Runner resumes.

``convert_checkpoint(old)`` converts a loaded checkpoint; ``migrate_checkpoint(old_path,
new_path)`` goes file to file (``pygan-optim migrate --checkpoint``). The key map, the
refusals and the sources are in the docstring of :mod:`.convert`.

One module per concern:

* :mod:`.convert`          the driver (``convert_checkpoint``), key by key
* :mod:`.files`            loading and saving ``.pth`` files; ``migrate_checkpoint``
* :mod:`.target`           the 1.x config (given or migrated from ``meta.config``) and its
  model, built on the meta device; the network names both versions share
* :mod:`.check`            the result checked against that model (or its own weights)
* :mod:`.state_dict`       DDP-style ``module.`` prefixes removed
* :mod:`.optimizer_state`  torch optimizer state_dicts in torch 2.x's layout
* :mod:`.loss_scaler`      the fp16 loss scaler -> a ``GradScaler`` state
* :mod:`.ema`              the EMA's ``steps`` for the resumed schedule
* :mod:`.loadable`         values made loadable with ``weights_only=True``
* :mod:`.report`           ``CheckpointReport`` and ``CheckpointConversionError``
"""
from .convert import convert_checkpoint
from .ema import ema_steps_for
from .files import load_checkpoint_file, migrate_checkpoint, save_checkpoint_file
from .report import CheckpointConversionError, CheckpointReport
from .target import EMA, NETWORKS

__all__ = ["CheckpointConversionError", "CheckpointReport", "convert_checkpoint",
           "load_checkpoint_file", "save_checkpoint_file", "migrate_checkpoint"]

"""The EMA's ``steps`` counter for a resumed run."""
from __future__ import annotations

from typing import Dict, Optional


def ema_steps_for(iters: int, model_cfg: dict, wrappers: Optional[Dict[str, dict]]) -> int:
    """The EMA's ``steps`` after ``iters`` iterations, for a resumed run that blends
    where the 0.x run would have. BigGAN's 1.x schedule (``biggan.py``, MMagic's
    BaseGAN) calls ``update_parameters`` once per generator phase
    (``discriminator_steps * D accumulative_counts`` iterations) from phase
    ``ema_config.start_iter`` on; the first call copies, a call whose ``steps`` is a
    multiple of ``interval`` blends. 0.x blends at iteration ``it`` when
    ``(it + 1 - start) % interval == 0``: with a start of 1 phase or more that is the
    1.x count of calls. With start 0 the 0.x average is a copy from iteration 0 on,
    as if phase 0 had made the copying call (1.x's first call comes at phase 1):
    one more."""
    ema = model_cfg.get("ema_config") or {}
    d_accu = int(((wrappers or {}).get("discriminator") or {}).get("accumulative_counts", 1))
    phase = int(model_cfg.get("discriminator_steps", 1)) * d_accu
    start = int(ema.get("start_iter", 0))
    return max(0, iters // phase - start + 1)

"""The 0.x fp16 loss-scaler state, as a ``torch.amp.GradScaler`` state_dict."""
from __future__ import annotations

from typing import Optional

from .loadable import safe
from .report import CheckpointReport

_GRAD_SCALER_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval",
                     "_growth_tracker")


def grad_scaler_state(old: dict, meta: dict, report: CheckpointReport) -> Optional[dict]:
    """The 0.x fp16 loss-scaler state as a ``torch.amp.GradScaler`` state_dict."""
    found = []
    if isinstance(old.get("loss_scaler"), dict):
        found.append(("loss_scaler", old["loss_scaler"]))
    fp16 = meta.get("fp16")
    if isinstance(fp16, dict) and isinstance(fp16.get("loss_scaler"), dict):
        found.append(("meta.fp16.loss_scaler", fp16["loss_scaler"]))
    if not found:
        return None
    where, sd = found[0]
    if all(k in sd for k in _GRAD_SCALER_KEYS):
        scaler = {k: sd[k] for k in _GRAD_SCALER_KEYS}
        report.map(where, "optimizer.<name>.loss_scaler", "torch GradScaler state")
        return safe(scaler, where, report)
    if "cur_scale" in sd and "scale_window" in sd:  # mmcv's own LossScaler
        if sd.get("mode") == "static":
            report.warnings.append(f"{where}: a static mmcv loss scale ({sd['cur_scale']}) is "
                                   "no state; configure it as loss_scale=<float> in the 1.x "
                                   "AmpOptimWrapper")
            return None
        factor = float(sd.get("scale_factor", 2.0))
        window = int(sd["scale_window"])
        since = int(sd.get("cur_iter", 0)) - int(sd.get("last_overflow_iter", -1)) - 1
        scaler = dict(scale=float(sd["cur_scale"]), growth_factor=factor,
                      backoff_factor=1.0 / factor, growth_interval=window,
                      _growth_tracker=max(0, since) % max(window, 1))
        report.map(where, "optimizer.<name>.loss_scaler", "mmcv LossScaler -> GradScaler")
        report.warnings.append(f"{where}: mmcv's dynamic LossScaler translated to a GradScaler "
                               "state (scale, factor and window kept; the count since the last "
                               "overflow approximated)")
        return scaler
    report.warnings.append(f"{where}: unknown loss-scaler layout {sorted(sd)}; not converted "
                           "(the 1.x loss scale restarts at its initial value)")
    return None

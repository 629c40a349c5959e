"""What the 0.x training pipeline did to images, for 1.x's DataPreprocessor.

Channel order: 0.x pipelines loaded images through mmcv's ``imfrombytes``
(BGR from its default cv2 backend, RGB only for ``flag='color'`` with
``channel_order='rgb'``, as written; MMGeneration's LoadPairedImageFromFile
does not pass its channel_order on; mmcls's CIFAR datasets give RGB arrays),
and Normalize's ``to_rgb`` swapped the channels. 1.x's DataPreprocessor
converts to ``output_channel_order``: writing the order the 0.x model saw keeps
a migrated checkpoint on the colours it was trained on (MMGeneration's BigGANs:
BGR).

Normalisation: 0.x's Normalize swapped first, then took ``(img - mean) / std``;
1.x's DataPreprocessor converts the order first, then normalises with its own
``mean``/``std`` (127.5 each by default). So Normalize's values carry over as
they are, in the same channel order (times 255 after mmedit's RescaleToZeroOne).

1.x has one order, mean and std for every image key: a pipeline that loads or
normalises its keys differently is reported as a conflict, not merged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from .common import type_of

_DEFAULT = 127.5  # 1.x DataPreprocessor's mean and std (MMagic's and ours)


@dataclass
class Preparation:
    """``order``: 'BGR' | 'RGB' | None (unknown). ``normalization``:
    dict(mean=..., std=...) to write, {} where 1.x's default is the 0.x one,
    None where unknown. ``conflict``: why one data_preprocessor cannot
    reproduce the 0.x preparation of every key (then nothing is written)."""
    order: Optional[str]
    order_why: str
    normalization: Optional[Dict[str, list]]
    normalization_why: str
    conflict: Optional[str] = None


def read_preparation(cfg: Dict[str, Any]) -> Preparation:
    dataset, steps = _train_pipeline(cfg)
    if steps is None:
        why = "no data.train pipeline to read it from"
        return Preparation(None, why, None, why)
    normalizes = [s for s in steps if _name(s).endswith("Normalize")]
    rescales = [s for s in steps if _name(s).endswith("RescaleToZeroOne")]
    loaders = [s for s in steps if _short(s) in _LOADERS]
    conflict = _conflict(normalizes, rescales, loaders)
    if conflict is not None:
        return Preparation(None, conflict, None, conflict, conflict)
    order, order_why = _order(dataset, normalizes, loaders)
    normalization, normalization_why = _normalization(steps, normalizes, rescales)
    return Preparation(order, order_why, normalization, normalization_why)


def _name(cfg: Any) -> str:
    return str(type_of(cfg) or "")


def _short(cfg: Any) -> str:
    return _name(cfg).split(".")[-1]


_LOADERS = ("LoadImageFromFile", "LoadPairedImageFromFile")


def _train_pipeline(cfg: Dict[str, Any]) -> Tuple[Any, Optional[List[dict]]]:
    """(the training dataset's config, its pipeline's steps or None)."""
    dataset = (cfg.get("data") or {}).get("train") if isinstance(cfg.get("data"), dict) else None
    while isinstance(dataset, dict) and "pipeline" not in dataset and "dataset" in dataset:
        dataset = dataset["dataset"]  # RepeatDataset and other wrappers
    pipeline = dataset.get("pipeline") if isinstance(dataset, dict) else None
    if not isinstance(pipeline, list):
        return dataset, None
    return dataset, [s for s in pipeline if isinstance(s, dict)]


def _keys(step: dict) -> Optional[frozenset]:
    """The keys a step applies to; None: not said (every image)."""
    keys = step.get("keys")
    if isinstance(keys, str):
        return frozenset([keys])
    return frozenset(keys) if isinstance(keys, (list, tuple)) else None


def _conflict(normalizes: List[dict], rescales: List[dict],
              loaders: List[dict]) -> Optional[str]:
    settings = {repr((n.get("mean"), n.get("std"), n.get("to_rgb"))) for n in normalizes}
    if len(settings) > 1:
        return f"{len(normalizes)} Normalize steps with different mean/std/to_rgb"
    if rescales:
        rescaled = [_keys(r) for r in rescales]
        covered = None if None in rescaled else frozenset().union(*rescaled)
        normalized = [_keys(n) for n in normalizes]
        needed = None if None in normalized else frozenset().union(*normalized)
        if covered is not None and (needed is None or not needed <= covered):
            return (f"RescaleToZeroOne on {sorted(covered)} only, Normalize on "
                    f"{'every key' if needed is None else sorted(needed)}")
    orders = {_loaded_order(loader)[0] for loader in loaders}
    if len(orders) > 1:
        return f"{len(loaders)} loaders giving different channel orders ({sorted(map(str, orders))})"
    return None


def _loaded_order(loader: dict) -> Tuple[Optional[str], str]:
    """The order mmcv's imfrombytes gave this loader's images, or None."""
    name = _name(loader)
    # mmgen's loaders take mmcv.imread's `flag`, mmcls's `color_type`.
    flag = loader.get("flag", loader.get("color_type", "color"))
    flag = {0: "grayscale", 1: "color", -1: "unchanged"}.get(flag, flag)
    flag = str(flag).lower()
    if flag.startswith("grayscale"):
        return None, f"{name} loads grey images (flag {flag!r}): one channel"
    if flag.startswith("unchanged"):
        return None, f"{name} keeps each file's channels (flag {flag!r})"
    backend = loader.get("backend", loader.get("imdecode_backend"))
    if backend not in (None, "cv2"):
        return None, f"{name} decodes with mmcv's {backend!r} backend"
    if _short(loader) == "LoadPairedImageFromFile":
        return "BGR", f"{name} loads BGR, whatever its channel_order (not passed to mmcv)"
    # cv2 decodes BGR; mmcv converts only this exact pair (case-sensitively).
    rgb = loader.get("flag", "color") in ("color", 1) and loader.get("channel_order") == "rgb"
    loaded = "RGB" if rgb else "BGR"
    return loaded, f"{name} loads {loaded}"


def _order(dataset: Any, normalizes: List[dict],
           loaders: List[dict]) -> Tuple[Optional[str], str]:
    if not normalizes or "to_rgb" not in normalizes[0]:
        return None, "the pipeline's Normalize does not say to_rgb"
    if loaders:
        loaded, source = _loaded_order(loaders[0])
        if loaded is None:
            return None, source
    elif "CIFAR" in _name(dataset).upper():
        loaded, source = "RGB", f"{_name(dataset)} gives RGB arrays"
    else:
        return None, f"the pipeline has no image loader and {_name(dataset)!r} is not known"
    swapped = bool(normalizes[0]["to_rgb"])
    order = {"BGR": "RGB", "RGB": "BGR"}[loaded] if swapped else loaded
    return order, f"{source}, Normalize to_rgb={swapped}"


def _normalization(steps: List[dict], normalizes: List[dict],
                   rescales: List[dict]) -> Tuple[Optional[Dict[str, list]], str]:
    if not normalizes:
        return None, "the pipeline has no Normalize step"
    normalize = normalizes[0]
    # mmedit's RescaleToZeroOne (img / 255) before Normalize, as pix2pix and
    # CycleGAN pipelines do: (img / 255 - m) / s is (img - 255 m) / (255 s).
    first = min(steps.index(n) for n in normalizes)
    if any(steps.index(r) > first for r in rescales):
        return None, "RescaleToZeroOne runs after Normalize"
    values = {}
    for key in ("mean", "std"):
        value = normalize.get(key)
        value = list(value) if isinstance(value, (list, tuple)) else [value]
        if not value or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                for v in value):
            return None, f"Normalize's {key} is {normalize.get(key)!r}, not numbers"
        values[key] = [v * 255.0 for v in value] if rescales else value
    why = (f"Normalize's mean={values['mean']}, std={values['std']}"
           + (" (after RescaleToZeroOne: its values times 255)" if rescales else ""))
    if all(v == _DEFAULT for v in values["mean"] + values["std"]):
        return {}, f"{why}: 1.x's default"
    return values, why

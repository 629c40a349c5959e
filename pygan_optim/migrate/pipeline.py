"""What the 0.x training pipeline did to images, for 1.x's DataPreprocessor.

Channel order: 0.x pipelines loaded images (LoadImageFromFile: BGR unless its
channel_order says otherwise; mmcls's CIFAR datasets give RGB arrays) and
Normalize's ``to_rgb`` swapped the channels. 1.x's DataPreprocessor converts to
``output_channel_order``: writing the order the 0.x model saw keeps a migrated
checkpoint on the colours it was trained on (MMGeneration's BigGANs: BGR).

Normalisation: 0.x's Normalize swapped first, then took ``(img - mean) / std``;
1.x's DataPreprocessor converts the order first, then normalises with its own
``mean``/``std`` (127.5 each by default). So Normalize's values carry over as
they are, in the same channel order (times 255 after mmedit's RescaleToZeroOne).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from .common import type_of


def _name(cfg: Any) -> str:
    return str(type_of(cfg) or "")

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


def _normalize_step(steps: List[dict]) -> Optional[dict]:
    return next((s for s in steps if _name(s).endswith("Normalize")), None)


def model_input_order(cfg: Dict[str, Any]) -> Tuple[Optional[str], str]:
    """('BGR' | 'RGB' | None, why) for the 0.x config's training data."""
    dataset, steps = _train_pipeline(cfg)
    if steps is None:
        return None, "no data.train pipeline to read it from"
    normalize = _normalize_step(steps)
    if normalize is None or "to_rgb" not in normalize:
        return None, "the pipeline's Normalize does not say to_rgb"
    loader = next((s for s in steps if _name(s).split(".")[-1] in _LOADERS), None)
    if loader is not None:
        # mmgen's loaders take mmcv.imread's `flag`, mmcls's `color_type`.
        flag = str(loader.get("flag", loader.get("color_type", "color"))).lower()
        if flag.startswith("grayscale"):
            return None, f"{_name(loader)} loads grey images (flag {flag!r}): one channel"
        if flag.startswith("unchanged"):
            return None, f"{_name(loader)} keeps each file's channels (flag {flag!r})"
        loaded = str(loader.get("channel_order", "bgr")).upper()
        source = f"{_name(loader)} loads {loaded}"
    elif "CIFAR" in _name(dataset).upper():
        loaded, source = "RGB", f"{_name(dataset)} gives RGB arrays"
    else:
        return None, f"the pipeline has no image loader and {_name(dataset)!r} is not known"
    if loaded not in ("BGR", "RGB"):
        return None, f"{_name(loader)} loads {loaded!r}"
    swapped = bool(normalize["to_rgb"])
    order = {"BGR": "RGB", "RGB": "BGR"}[loaded] if swapped else loaded
    return order, f"{source}, Normalize to_rgb={swapped}"


_DEFAULT = 127.5  # 1.x DataPreprocessor's mean and std (MMagic's and ours)


def model_normalization(cfg: Dict[str, Any]) -> Tuple[Optional[Dict[str, list]], str]:
    """(what to write into the data_preprocessor, why): dict(mean=..., std=...)
    from the pipeline's Normalize; {} where that is 1.x's default; None where
    the 0.x model's normalisation is unknown."""
    _, steps = _train_pipeline(cfg)
    if steps is None:
        return None, "no data.train pipeline to read it from"
    normalize = _normalize_step(steps)
    if normalize is None:
        return None, "the pipeline has no Normalize step"
    # mmedit's RescaleToZeroOne (img / 255) before Normalize, as pix2pix and
    # CycleGAN pipelines do: (img / 255 - m) / s is (img - 255 m) / (255 s).
    at = steps.index(normalize)
    rescales = [i for i, step in enumerate(steps) if _name(step).endswith("RescaleToZeroOne")]
    if any(i > at for i in rescales):
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

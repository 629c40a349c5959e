"""The channel order a 0.x model was trained on, for 1.x's DataPreprocessor.

0.x pipelines loaded images (LoadImageFromFile: BGR unless its channel_order
says otherwise; mmcls's CIFAR datasets give RGB arrays) and Normalize's
``to_rgb`` swapped the channels. 1.x's DataPreprocessor converts to
``output_channel_order``: writing the order the 0.x model saw keeps a migrated
checkpoint on the colours it was trained on (MMGeneration's BigGANs: BGR).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from .common import type_of


def _name(cfg: Any) -> str:
    return str(type_of(cfg) or "")

_LOADERS = ("LoadImageFromFile", "LoadPairedImageFromFile")


def model_input_order(cfg: Dict[str, Any]) -> Tuple[Optional[str], str]:
    """('BGR' | 'RGB' | None, why) for the 0.x config's training data."""
    dataset = (cfg.get("data") or {}).get("train") if isinstance(cfg.get("data"), dict) else None
    while isinstance(dataset, dict) and "pipeline" not in dataset and "dataset" in dataset:
        dataset = dataset["dataset"]  # RepeatDataset and other wrappers
    pipeline = dataset.get("pipeline") if isinstance(dataset, dict) else None
    if not isinstance(pipeline, list):
        return None, "no data.train pipeline to read it from"
    steps: List[dict] = [s for s in pipeline if isinstance(s, dict)]
    normalize = next((s for s in steps if _name(s).endswith("Normalize")), None)
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

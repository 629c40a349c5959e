"""DataPreprocessor: batches image/label dicts for the GAN models."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Union

import torch
from mmengine.model import BaseDataPreprocessor


class DataPreprocessor(BaseDataPreprocessor):
    """Stacks a batch, moves it to the model's device and normalises the images,
    ``(img - mean) / std`` in float whatever their dtype, as MMagic's does (the
    defaults map uint8 pixels to [-1, 1]).

    ``mean``/``std``: a number, one per channel (MMagic's configs write
    ``[127.5] * 3``), or both None for no normalisation.
    ``output_channel_order``: MMagic's option, ``'RGB'``, ``'BGR'`` or None.
    3-channel images are taken to be BGR, as MMagic takes images without a
    recorded channel order and as ImageFolderDataset loads them; ``'RGB'``
    reverses their channels (before normalising, as MMagic converts before it
    normalises), ``'BGR'`` and None leave them. MMagic's padding and key
    options are not supported.
    Input (the Runner's default collate of SyntheticImageDataset /
    ImageFolderDataset items): ``dict(inputs=dict(img=[uint8 CxHxW, ...]),
    data_samples=dict(gt_label=[int, ...]))``; stacked tensors are accepted
    too. Output: ``dict(inputs=dict(img=float Bx3xHxW), data_samples=dict(gt_label=long B))``.
    """

    def __init__(self, mean: Union[float, Sequence[float], None] = 127.5,
                 std: Union[float, Sequence[float], None] = 127.5, non_blocking: bool = False,
                 output_channel_order: Optional[str] = None, **mmagic_options):
        if mmagic_options:
            raise TypeError(f"DataPreprocessor: MMagic's option(s) {sorted(mmagic_options)} are "
                            "not supported here (supported: mean, std, output_channel_order, "
                            "non_blocking)")
        if output_channel_order not in (None, "RGB", "BGR"):
            raise ValueError(f"DataPreprocessor: output_channel_order must be 'RGB', 'BGR' or "
                             f"None, got {output_channel_order!r}")
        super().__init__(non_blocking=non_blocking)
        self.to_rgb = output_channel_order == "RGB"
        if (mean is None) != (std is None):
            raise ValueError(f"DataPreprocessor: mean and std are both None (no "
                             f"normalisation) or both given, got mean={mean!r}, std={std!r}")
        self.normalise = mean is not None
        if self.normalise:
            # Shaped to broadcast over B x C x H x W; not saved in checkpoints.
            self.register_buffer("mean", _per_channel("mean", mean), persistent=False)
            self.register_buffer("std", _per_channel("std", std), persistent=False)

    def forward(self, data: Dict[str, Any], training: bool = False) -> Dict[str, Any]:
        inputs, samples = data.get("inputs", {}), data.get("data_samples", {})
        img = inputs.get("img") if isinstance(inputs, dict) else inputs
        out_inputs, out_samples = {}, {}
        if img is not None:
            img = torch.stack(list(img)) if isinstance(img, (list, tuple)) else img
            img = img.to(self.device, non_blocking=self._non_blocking)
            if self.to_rgb and img.shape[-3] == 3:
                img = img.flip(-3)
            if self.normalise:
                channels = max(len(self.mean), len(self.std))
                if channels > 1 and img.shape[-3] != channels:
                    raise ValueError(f"DataPreprocessor: images of {img.shape[-3]} channel(s) "
                                     f"(batch shape {tuple(img.shape)}) for a mean and std of "
                                     f"{channels} values")
                img = (img.float() - self.mean) / self.std
            out_inputs["img"] = img
        label = samples.get("gt_label") if isinstance(samples, dict) else None
        if label is not None:
            label = label if isinstance(label, torch.Tensor) else torch.as_tensor(list(label))
            out_samples["gt_label"] = label.long().to(self.device, non_blocking=self._non_blocking)
        return dict(inputs=out_inputs, data_samples=out_samples)


def _per_channel(name: str, value) -> torch.Tensor:
    out = torch.as_tensor(value, dtype=torch.float32).reshape(-1, 1, 1)
    if len(out) not in (1, 3):
        raise ValueError(f"DataPreprocessor: {name} takes 1 value or 3 (one per channel), "
                         f"got {len(out)}")
    return out

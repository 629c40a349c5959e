"""DataPreprocessor: batches image/label dicts for the GAN models."""
from __future__ import annotations

from typing import Any, Dict

import torch
from mmengine.model import BaseDataPreprocessor


class DataPreprocessor(BaseDataPreprocessor):
    """Stacks a batch, moves it to the model's device and maps uint8 images to [-1, 1].

    Input (the Runner's default collate of SyntheticImageDataset /
    ImageFolderDataset items): ``dict(inputs=dict(img=[uint8 CxHxW, ...]),
    data_samples=dict(gt_label=[int, ...]))``; stacked tensors are accepted
    too. Output: ``dict(inputs=dict(img=float Bx3xHxW), data_samples=dict(gt_label=long B))``.
    """

    def __init__(self, mean: float = 127.5, std: float = 127.5, non_blocking: bool = False):
        super().__init__(non_blocking=non_blocking)
        self.mean, self.std = mean, std

    def forward(self, data: Dict[str, Any], training: bool = False) -> Dict[str, Any]:
        inputs, samples = data.get("inputs", {}), data.get("data_samples", {})
        img = inputs.get("img") if isinstance(inputs, dict) else inputs
        out_inputs, out_samples = {}, {}
        if img is not None:
            img = torch.stack(list(img)) if isinstance(img, (list, tuple)) else img
            img = img.to(self.device, non_blocking=self._non_blocking)
            if not img.is_floating_point():  # uint8 pixels
                img = (img.float() - self.mean) / self.std
            out_inputs["img"] = img
        label = samples.get("gt_label") if isinstance(samples, dict) else None
        if label is not None:
            label = label if isinstance(label, torch.Tensor) else torch.as_tensor(list(label))
            out_samples["gt_label"] = label.long().to(self.device, non_blocking=self._non_blocking)
        return dict(inputs=out_inputs, data_samples=out_samples)

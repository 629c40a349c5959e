"""Datasets whose items the Runner's default collate and DataPreprocessor understand.

Item format: ``dict(inputs=dict(img=uint8 tensor 3xHxW), data_samples=dict(gt_label=int))``.
"""
from __future__ import annotations

import os
from typing import List, Tuple

import torch
from torch.utils.data import Dataset


class SyntheticImageDataset(Dataset):
    """Deterministic random images and labels, so demos, tests and benchmarks need
    no download. Item ``i`` depends only on ``(seed, i)``."""

    def __init__(self, num_samples: int, img_size: int, num_classes: int = 0, seed: int = 0):
        if num_samples < 1 or img_size < 1:
            raise ValueError(f"num_samples ({num_samples}) and img_size ({img_size}) must be positive")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: unconditional), got {num_classes}")
        self.num_samples, self.img_size = num_samples, img_size
        self.num_classes, self.seed = num_classes, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        img = torch.randint(0, 256, (3, self.img_size, self.img_size), dtype=torch.uint8, generator=g)
        label = int(torch.randint(0, max(self.num_classes, 1), (), generator=g))
        return dict(inputs=dict(img=img), data_samples=dict(gt_label=label))


class ImageFolderDataset(Dataset):
    """Real images from ``root/<class name>/<image>`` (classes sorted by name, as
    torchvision's ImageFolder), resized on the short side and center-cropped to
    ``img_size``. Plug it into a config as
    ``dataset=dict(type='ImageFolderDataset', root='data/imagenet/train', img_size=128)``."""

    EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

    def __init__(self, root: str, img_size: int):
        self.root, self.img_size = root, img_size
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.samples: List[Tuple[str, int]] = [
            (os.path.join(root, c, f), label)
            for label, c in enumerate(self.classes)
            for f in sorted(os.listdir(os.path.join(root, c)))
            if f.lower().endswith(self.EXTENSIONS)]
        if not self.samples:
            raise FileNotFoundError(f"no images ({', '.join(self.EXTENSIONS)}) under {root}/<class>/")
        # A folder without images (often a hidden one, e.g. .ipynb_checkpoints) would
        # still take a label and shift every later class's: refused, as torchvision does.
        with_images = {label for _, label in self.samples}
        empty = [c for label, c in enumerate(self.classes) if label not in with_images]
        if empty:
            raise FileNotFoundError(f"class folder(s) without images ({', '.join(self.EXTENSIONS)}) "
                                    f"under {root}: {', '.join(empty)}; remove them or move "
                                    "them out of the dataset root")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = self.img_size / min(im.size)
            im = im.resize((max(self.img_size, round(im.width * scale)),
                            max(self.img_size, round(im.height * scale))), Image.BICUBIC)
            left, top = (im.width - self.img_size) // 2, (im.height - self.img_size) // 2
            im = im.crop((left, top, left + self.img_size, top + self.img_size))
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        img = data.view(self.img_size, self.img_size, 3).permute(2, 0, 1).contiguous()
        return dict(inputs=dict(img=img), data_samples=dict(gt_label=label))

"""Datasets whose items the Runner's default collate and DataPreprocessor understand.

Item format: ``dict(inputs=dict(img=uint8 tensor 3xHxW), data_samples=dict(gt_label=int))``.
ImageFolderDataset's images are in BGR order, as MMagic loads them.
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
    """Real images from ``root/<class name>/...``, read as MMagic 1.x's BigGAN
    ImageNet pipeline reads them (LoadImageFromFile, CenterCropLongEdge,
    Resize with backend 'pillow'), bit for bit:

    - classes are the class folders sorted by name; each one's images are found
      in it and its sub-folders, sorted by path; names starting with '.' are
      skipped: files (macOS ``._*``), as MMEngine's file listing skips them, and
      folders (``.ipynb_checkpoints``), which MMagic would list;
    - images are decoded by OpenCV (an MMEngine dependency) as MMagic decodes
      them: BGR channel order (what MMagic's and MMGeneration's BigGANs train
      on; ``output_channel_order='RGB'`` in the DataPreprocessor converts),
      EXIF orientation applied, 16-bit images reduced to 8 bits, grey
      replicated to three channels, alpha dropped;
    - the centred square of the short side is cropped and resized to
      ``img_size`` x ``img_size`` by PIL's bilinear filter.

    Plug it into a config as
    ``dataset=dict(type='ImageFolderDataset', root='data/imagenet/train', img_size=128)``
    (``img_size`` the model's output size)."""

    EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

    def __init__(self, root: str, img_size: int):
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
            raise ValueError(f"ImageFolderDataset: img_size must be a positive int (the "
                             f"model's image size), got {img_size!r}")
        self.root, self.img_size = root, img_size
        self.classes = sorted(d for d in os.listdir(root)
                              if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
        self.samples: List[Tuple[str, int]] = [
            (path, label) for label, c in enumerate(self.classes)
            for path in _image_files(os.path.join(root, c), self.EXTENSIONS)]
        if not self.samples:
            raise FileNotFoundError(f"no images ({', '.join(self.EXTENSIONS)}) under {root}/<class>/")
        # A folder without images would still take a label and shift every later
        # class's: refused, as torchvision does.
        with_images = {label for _, label in self.samples}
        empty = [c for label, c in enumerate(self.classes) if label not in with_images]
        if empty:
            raise FileNotFoundError(f"class folder(s) without images ({', '.join(self.EXTENSIONS)}) "
                                    f"under {root}: {', '.join(empty)}; remove them or move "
                                    "them out of the dataset root")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        import cv2
        import numpy as np
        from PIL import Image

        path, label = self.samples[index]
        with open(path, "rb") as f:
            encoded = np.frombuffer(f.read(), dtype=np.uint8)
        bgr = cv2.imdecode(encoded, cv2.IMREAD_COLOR) if encoded.size else None
        if bgr is None:
            raise ValueError(f"ImageFolderDataset: cannot decode {path} (empty, truncated or "
                             "not an image); remove it from the dataset root")
        h, w = bgr.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = np.ascontiguousarray(bgr[top:top + side, left:left + side])
        # PIL sees the BGR array as RGB; the filter works per channel.
        resized = np.asarray(Image.fromarray(square).resize((self.img_size, self.img_size),
                                                             Image.BILINEAR))
        img = torch.from_numpy(resized.copy()).permute(2, 0, 1).contiguous()
        return dict(inputs=dict(img=img), data_samples=dict(gt_label=label))


def _image_files(folder: str, extensions: Tuple[str, ...]) -> List[str]:
    """The images in `folder` and its sub-folders, sorted; names starting with
    '.' (files or folders) skipped."""
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(os.path.join(parent, f) for f in files
                     if not f.startswith(".") and f.lower().endswith(extensions))
    return sorted(found)

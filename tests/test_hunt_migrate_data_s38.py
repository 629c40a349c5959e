"""Hunt (session 38; every finding fixed since): does the migrated model's
data_preprocessor give the pixels the 0.x model was trained on?

Oracles: mmcv 1.x's ``imfrombytes`` (mmcv/image/io.py, v1.3-v1.7), which
MMGeneration 0.x's loaders call; MMGeneration 0.x's ``LoadPairedImageFromFile``
(mmgen/datasets/pipelines/loading.py, v0.7.3); 0.x ``Normalize`` =
``mmcv.imnormalize`` (swap BGR->RGB when ``to_rgb``, then ``(img - mean) / std``)
and ``RescaleToZeroOne`` = ``img.astype(float32) / 255``, each applied to the
``keys`` it names. 1.x's DataPreprocessor (MMagic's and pygan_optim's) has one
``output_channel_order``/``mean``/``std`` for every image key.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from pygan_optim.migrate import migrate

FAMILIES = Path(__file__).parent / "migrate_data" / "families"


def _write(tmp_path, family, pipeline, dataset):
    src = tmp_path / "cfg.py"
    src.write_text((FAMILIES / family).read_text()
                   + f"data = dict(train=dict(type={dataset!r}, pipeline={pipeline!r}))\n")
    return str(src)


def _order_matches(result, expected):
    """The written order is the 0.x one, or none is written and a note says so."""
    cfg = result.config["model"]["data_preprocessor"]
    if "output_channel_order" not in cfg:
        return any("output_channel_order not written" in n for n in result.notes)
    return cfg["output_channel_order"] == expected


def _preprocessed(preprocessor_cfg, img_chw):
    from mmengine.registry import MODELS

    import pygan_optim.gan  # noqa: F401  (registers DataPreprocessor)
    preprocessor = MODELS.build(preprocessor_cfg)
    return preprocessor(dict(inputs=dict(img=[torch.from_numpy(img_chw)])))["inputs"]["img"][0]


NORMALIZE = dict(type="Normalize", keys=["real_img"], mean=[127.5] * 3, std=[127.5] * 3,
                 to_rgb=False)


@pytest.mark.parametrize("loader, loaded", [
    # mmcv's cv2 backend (the default: LoadImageFromFile's backend=None) converts to RGB
    # only for `flag == IMREAD_COLOR and channel_order == 'rgb'`, case-sensitively:
    (dict(type="LoadImageFromFile", key="real_img", channel_order="RGB"), "BGR"),
    (dict(type="LoadImageFromFile", key="real_img", channel_order="rgb",
          flag="color_ignore_orientation"), "BGR"),
    # the tifffile backend converts nothing: the file's own (RGB) order.
    (dict(type="LoadImageFromFile", key="real_img", backend="tifffile"), "RGB"),
], ids=["uppercase-RGB", "color_ignore_orientation", "tifffile"])
def test_the_loaded_order_follows_mmcv_imfrombytes(tmp_path, loader, loaded):
    """Wrong: the loaded order is read as ``channel_order.upper()`` whatever the
    flag and backend, so these loaders are taken to give RGB (resp. BGR) and
    ``output_channel_order`` is written as that, with a note claiming it.

    0.x: mmcv.imfrombytes with the cv2 backend keeps cv2's BGR unless
    flag is exactly 'color' and channel_order exactly 'rgb' (pillow and
    turbojpeg lower-case it; tifffile never converts). With to_rgb=False the
    0.x model saw ``loaded``.

    Right: write the order mmcv gave (or, when it depends on the backend or
    files, write nothing and say so)."""
    result = migrate(_write(tmp_path, "dcgan.py", [loader, NORMALIZE],
                            "UnconditionalImageDataset"))
    assert _order_matches(result, loaded), (result.config["model"]["data_preprocessor"],
                                            [n for n in result.notes if "order" in n])
    cfg = result.config["model"]["data_preprocessor"]
    if loaded == "BGR" and "output_channel_order" in cfg:
        # The same pixels: a cv2-loaded (BGR) image, 0.x's imnormalize without a swap.
        bgr = np.random.default_rng(0).integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
        old = (bgr.astype(np.float32) - np.float32(127.5)) / np.float32(127.5)
        new = _preprocessed(cfg, np.ascontiguousarray(bgr.transpose(2, 0, 1)))
        np.testing.assert_array_equal(new.numpy(), old.transpose(2, 0, 1))


def test_paired_loader_ignores_channel_order(tmp_path):
    """Wrong: ``LoadPairedImageFromFile(channel_order='rgb')`` is taken to load
    RGB and Pix2Pix's data_preprocessor gets ``output_channel_order='RGB'``.

    0.x: MMGeneration's LoadPairedImageFromFile stores channel_order but calls
    ``mmcv.imfrombytes(img_bytes, flag=self.flag)`` without it: the pair is
    always BGR, so with to_rgb=False the 0.x model saw BGR.

    Right: BGR (the paired loader's channel_order has no effect)."""
    pipeline = [
        dict(type="LoadPairedImageFromFile", io_backend="disk", key="pair", domain_a="photo",
             domain_b="mask", flag="color", channel_order="rgb"),
        dict(type="RescaleToZeroOne", keys=["img_photo", "img_mask"]),
        dict(type="Normalize", keys=["img_photo", "img_mask"], to_rgb=False,
             mean=[0.5] * 3, std=[0.5] * 3),
    ]
    result = migrate(_write(tmp_path, "pix2pix.py", pipeline, "PairedImageDataset"))
    assert _order_matches(result, "BGR"), result.config["model"]["data_preprocessor"]


_BOTH = ["img_photo", "img_mask"]
_PAIRED = dict(type="LoadPairedImageFromFile", io_backend="disk", key="pair",
               domain_a="photo", domain_b="mask", flag="color")


@pytest.mark.parametrize("family, dataset, pipeline", [
    # img_photo: RGB, [-1, 1]; img_mask: BGR, [0, 1].
    ("pix2pix.py", "PairedImageDataset", [
        _PAIRED,
        dict(type="Normalize", keys=["img_photo"], mean=[127.5] * 3, std=[127.5] * 3,
             to_rgb=True),
        dict(type="Normalize", keys=["img_mask"], mean=[0.0] * 3, std=[255.0] * 3,
             to_rgb=False)]),
    # img_photo: (x/255 - 0.5)/0.5 in [-1, 1]; img_mask: (x - 0.5)/0.5 in [-1, 509].
    ("pix2pix.py", "PairedImageDataset", [
        _PAIRED,
        dict(type="RescaleToZeroOne", keys=["img_photo"]),
        dict(type="Normalize", keys=_BOTH, mean=[0.5] * 3, std=[0.5] * 3, to_rgb=False)]),
    # CycleGAN: img_mask loaded RGB, img_photo BGR, no swap.
    ("cyclegan.py", "UnpairedImageDataset", [
        dict(type="LoadImageFromFile", key="img_mask", flag="color", channel_order="rgb"),
        dict(type="LoadImageFromFile", key="img_photo", flag="color"),
        dict(type="RescaleToZeroOne", keys=_BOTH),
        dict(type="Normalize", keys=_BOTH, mean=[0.5] * 3, std=[0.5] * 3, to_rgb=False)]),
], ids=["two-Normalize", "RescaleToZeroOne-one-key", "two-loaders"])
def test_image_keys_prepared_differently_are_not_silently_merged(tmp_path, family, dataset,
                                                                 pipeline):
    """Wrong: the reader takes the first loader, the first Normalize and any
    RescaleToZeroOne for the whole pipeline, ignoring their ``keys``; the
    translation model's one data_preprocessor (same order/mean/std for every
    ``data_keys`` entry) is written from them with no warning, so the other
    domain is fed pixels in another order or scale than 0.x trained it on.

    0.x: each step applied only to the keys it names (see the ids' comments).

    Right: a warning that the data_preprocessor cannot reproduce both keys'
    0.x preparation (or refuse under strict)."""
    result = migrate(_write(tmp_path, family, pipeline, dataset))
    assert any("data_preprocessor" in w for w in result.warnings), (
        result.config["model"]["data_preprocessor"], result.warnings)

"""`pygan-optim migrate` carries a 0.x Normalize's mean/std into 1.x's
data_preprocessor (session 38; before, a custom one was dropped and the
migrated model trained on differently scaled pixels).

The oracle for "the same pixels" is 0.x's transform as mmcv's ``imnormalize``
defines it (swap BGR -> RGB when ``to_rgb``, then ``(img - mean) / std``),
written out here in numpy, against the migrated config's DataPreprocessor built
from the registry and run on the same image. (mmcv multiplies by 1/std in
float64 where this divides in float32: the two agree to float32 rounding; the
comparison here checks the values written, with the 1.x arithmetic.)
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from pygan_optim.migrate import migrate

DCGAN = Path(__file__).parent / "migrate_data" / "families" / "dcgan.py"


def _write(tmp_path, pipeline, dataset="UnconditionalImageDataset"):
    src = tmp_path / "cfg.py"
    src.write_text(DCGAN.read_text() + f"data = dict(train=dict(type={dataset!r}, "
                                       f"pipeline={pipeline!r}))\n")
    return str(src)


def _normalize(mean, std, to_rgb=True):
    return dict(type="Normalize", keys=["real_img"], mean=mean, std=std, to_rgb=to_rgb)


LOADER = dict(type="LoadImageFromFile", key="real_img")


def _preprocessed(preprocessor_cfg, img_chw):
    from mmengine.registry import MODELS

    import pygan_optim.gan  # noqa: F401  (registers DataPreprocessor)
    preprocessor = MODELS.build(preprocessor_cfg)
    return preprocessor(dict(inputs=dict(img=[torch.from_numpy(img_chw)])))["inputs"]["img"][0]


@pytest.mark.parametrize("mean, std, to_rgb", [
    ([0.0, 0.0, 0.0], [255.0, 255.0, 255.0], True),  # pixels to [0, 1]
    ([123.675, 116.28, 103.53], [58.395, 57.12, 57.375], True),  # ImageNet's, RGB order
    ([103.53, 116.28, 123.675], [57.375, 57.12, 58.395], False),  # the same, kept BGR
    (127, 128, True),  # single numbers
])
def test_custom_normalize_gives_the_0x_pixels(tmp_path, mean, std, to_rgb):
    result = migrate(_write(tmp_path, [LOADER, _normalize(mean, std, to_rgb)]))
    cfg = result.config["model"]["data_preprocessor"]
    as_list = (lambda v: list(v) if isinstance(v, list) else [v])
    assert cfg["mean"] == as_list(mean) and cfg["std"] == as_list(std)
    assert any("mean/std written" in n for n in result.notes)

    rng = np.random.default_rng(0)
    bgr_hwc = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)  # as cv2 loads a file
    old = bgr_hwc[..., ::-1] if to_rgb else bgr_hwc
    old = (old.astype(np.float32) - np.float32(mean)) / np.float32(std)
    new = _preprocessed(cfg, np.ascontiguousarray(bgr_hwc.transpose(2, 0, 1)))
    np.testing.assert_array_equal(new.numpy(), old.transpose(2, 0, 1))


def test_default_normalize_writes_nothing(tmp_path):
    result = migrate(_write(tmp_path, [LOADER, _normalize([127.5] * 3, [127.5] * 3)]))
    cfg = result.config["model"]["data_preprocessor"]
    assert "mean" not in cfg and "std" not in cfg
    assert not any("mean/std" in n for n in result.notes)


@pytest.mark.parametrize("pipeline, why", [
    ([LOADER], "the pipeline has no Normalize step"),
    ([LOADER, _normalize("{{mean}}", [127.5] * 3)], "Normalize's mean is '{{mean}}'"),
])
def test_unknown_normalisation_is_noted_and_the_default_kept(tmp_path, pipeline, why):
    result = migrate(_write(tmp_path, pipeline))
    cfg = result.config["model"]["data_preprocessor"]
    assert "mean" not in cfg and "std" not in cfg
    assert any("left at 1.x's default" in n and why in n for n in result.notes), result.notes


def test_per_channel_values_with_an_unknown_channel_order_warn(tmp_path):
    """No loader and an unknown dataset: the order is not written, so
    per-channel values may land on the wrong channels."""
    pipeline = [_normalize([123.675, 116.28, 103.53], [58.395, 57.12, 57.375])]
    result = migrate(_write(tmp_path, pipeline, dataset="SomeDataset"))
    cfg = result.config["model"]["data_preprocessor"]
    assert "output_channel_order" not in cfg and cfg["mean"] == [123.675, 116.28, 103.53]
    assert any("set data_preprocessor.output_channel_order by hand" in w
               for w in result.warnings)
    # Uniform values need no order: no warning.
    result = migrate(_write(tmp_path, [_normalize([0.0] * 3, [255.0] * 3)],
                            dataset="SomeDataset"))
    assert not any("output_channel_order" in w for w in result.warnings)


def test_a_given_data_preprocessor_is_left_alone(tmp_path):
    src = tmp_path / "cfg.py"
    src.write_text(DCGAN.read_text()
                   + "model['data_preprocessor'] = dict(type='DataPreprocessor', mean=1, std=2)\n"
                   + f"data = dict(train=dict(type='UnconditionalImageDataset', pipeline="
                     f"{[LOADER, _normalize([0.0] * 3, [255.0] * 3)]!r}))\n")
    cfg = migrate(str(src)).config["model"]["data_preprocessor"]
    assert cfg["mean"] == 1 and cfg["std"] == 2


def test_rescale_to_zero_one_before_normalize_scales_the_values(tmp_path):
    """mmedit's RescaleToZeroOne (img / 255) before Normalize: pix2pix's 0.5 /
    0.5 is 1.x's default (nothing written); other values are carried times
    255 and give 0.x's pixels (here the same float32 divide by 255)."""
    rescale = dict(type="RescaleToZeroOne", keys=["real_img"])
    result = migrate(_write(tmp_path, [LOADER, rescale, _normalize([0.5] * 3, [0.5] * 3)]))
    cfg = result.config["model"]["data_preprocessor"]
    assert "mean" not in cfg and "std" not in cfg

    result = migrate(_write(tmp_path, [LOADER, rescale, _normalize([0.0] * 3, [1.0] * 3)]))
    cfg = result.config["model"]["data_preprocessor"]
    assert cfg["mean"] == [0.0] * 3 and cfg["std"] == [255.0] * 3
    bgr_hwc = np.random.default_rng(1).integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    old = bgr_hwc[..., ::-1].astype(np.float32) / np.float32(255)
    new = _preprocessed(cfg, np.ascontiguousarray(bgr_hwc.transpose(2, 0, 1)))
    np.testing.assert_array_equal(new.numpy(), old.transpose(2, 0, 1))

    result = migrate(_write(tmp_path, [LOADER, _normalize([0.0] * 3, [1.0] * 3), rescale]))
    cfg = result.config["model"]["data_preprocessor"]
    assert "mean" not in cfg
    assert any("RescaleToZeroOne runs after Normalize" in n for n in result.notes)

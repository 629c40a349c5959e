"""First-use bugs a hunt found in the CLI, the data preprocessor and the README's
real-data snippet; each test failed on the code before its fix."""
import numpy as np
import pytest
import torch
from PIL import Image

from pygan_optim.gan.data_preprocessor import DataPreprocessor
from test_cli import TINY, run


def _two_pixels(dtype):
    """A 1x3x1x2 batch whose pixels are 0 and 255 in every channel."""
    return torch.tensor([0, 255], dtype=dtype).repeat(3, 1, 1).view(1, 3, 1, 2)


def _normalised(dp, img):
    return dp(dict(inputs=dict(img=img)), True)["inputs"]["img"]


def test_preprocessor_takes_per_channel_mean_and_std():
    """MMagic's configs write mean=[127.5] * 3 (a list raised TypeError)."""
    dp = DataPreprocessor(mean=[127.5, 0.0, 255.0], std=[127.5, 255.0, 255.0])
    out = _normalised(dp, _two_pixels(torch.uint8))
    # Exact in fp32: 0 and 255 minus 127.5, 0 or 255 are exact, and so are their
    # quotients by 127.5 or 255 (-1, 1, 0).
    assert out[0, :, 0].tolist() == [[-1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]]


def test_preprocessor_normalises_float_pixels_and_none_means_none():
    """MMagic normalises whatever the dtype (float pixels passed through before,
    so D saw reals in [0, 255] and fakes in [-1, 1]); mean=std=None leaves them."""
    assert _normalised(DataPreprocessor(), _two_pixels(torch.float32))[0, :, 0].tolist() == \
        [[-1.0, 1.0]] * 3
    raw = _two_pixels(torch.float32)
    assert torch.equal(_normalised(DataPreprocessor(mean=None, std=None), raw), raw)
    with pytest.raises(ValueError, match="both None"):
        DataPreprocessor(mean=None)


def test_preprocessor_takes_mmagics_output_channel_order():
    """MMagic's CIFAR-10 GAN configs set output_channel_order (a TypeError before).
    3-channel images are taken as BGR, as MMagic takes them and ImageFolderDataset
    loads them: 'RGB' reverses the channels, then each output channel is
    normalised by its own mean and std, as MMagic converts before it normalises."""
    bgr = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1)
    mean, std = [0.0, 127.5, 255.0], [255.0, 127.5, 255.0]
    rgb = _normalised(DataPreprocessor(mean=mean, std=std, output_channel_order="RGB"), bgr)
    # Exact in fp32: (51 - 0) / 255 = 0.2 rounds the same either way it is computed.
    assert rgb.flatten().tolist() == [torch.tensor(51 / 255.0).item(), 1.0, -1.0]
    same = _normalised(DataPreprocessor(mean=mean, std=std, output_channel_order="BGR"), bgr)
    assert torch.equal(same, _normalised(DataPreprocessor(mean=mean, std=std), bgr))
    with pytest.raises(ValueError, match="output_channel_order"):
        DataPreprocessor(output_channel_order="bgr")
    with pytest.raises(TypeError, match="pad_size_divisor"):
        DataPreprocessor(pad_size_divisor=32)


def test_preprocessor_refuses_mean_and_std_that_fit_no_image():
    """Two values failed at the first batch with a broadcasting error; three
    values broadcast a grey image to three channels. MMagic refuses both."""
    with pytest.raises(ValueError, match="mean takes 1 value or 3"):
        DataPreprocessor(mean=[127.5, 127.5], std=127.5)
    grey = torch.zeros(1, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"images of 1 channel\(s\) .* 3 values"):
        _normalised(DataPreprocessor(mean=[127.5] * 3, std=[127.5] * 3), grey)
    assert _normalised(DataPreprocessor(), grey).shape == (1, 1, 2, 2)


def test_malformed_cfg_option_is_a_usage_error(tmp_path):
    code, _, err = run("train", TINY, "--work-dir", str(tmp_path / "w"),
                       "--cfg-options", "train_cfg.max_iters")
    assert code == 2, err
    assert "'train_cfg.max_iters' is not KEY=VALUE" in err and "unpack" not in err


def test_a_typo_in_a_parent_key_of_cfg_options_warns(tmp_path):
    """'trian_cfg.max_iters' creates a new top-level dict silently in MMEngine."""
    code, _, err = run("train", TINY, "--work-dir", str(tmp_path / "w"),
                       "--cfg-options", "trian_cfg.max_iters=1", "train_cfg.max_iters=1")
    assert code == 0, err
    assert "--cfg-options trian_cfg.max_iters adds a new key; did you mean train_cfg?" in err


def test_the_readme_real_data_snippet_trains(tmp_path):
    """README "Real data" on top of a shipped config (before `_delete_=True`, the
    synthetic dataset's num_samples reached ImageFolderDataset: TypeError)."""
    for c in ("c0", "c1"):
        (tmp_path / "real" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((40, 36, 3), 40 * i, np.uint8)).save(
                tmp_path / "real" / c / f"{i}.png")
    cfg = tmp_path / "real_cfg.py"
    cfg.write_text(f"_base_ = ['{TINY}']\n"
                   f"train_dataloader = dict(dataset=dict(_delete_=True, type='ImageFolderDataset',"
                   f" root='{tmp_path / 'real'}', img_size=32))\n"
                   "train_cfg = dict(max_iters=1)\n")
    code, _, err = run("train", str(cfg), "--work-dir", str(tmp_path / "w"))
    assert code == 0, err


def test_a_class_folder_without_images_is_refused(tmp_path):
    """It took a label and shifted every later class's (torchvision refuses it).
    Hidden folders (.ipynb_checkpoints) are no classes, as MMEngine's listing skips them."""
    from pygan_optim.datasets import ImageFolderDataset

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / c / "0.png")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    assert ImageFolderDataset(str(tmp_path), img_size=8).classes == ["a", "b"]
    (tmp_path / "c").mkdir()
    with pytest.raises(FileNotFoundError, match=r"without images .*: c;"):
        ImageFolderDataset(str(tmp_path), img_size=8)


def test_a_negative_num_classes_is_refused():
    from pygan_optim.datasets import SyntheticImageDataset

    with pytest.raises(ValueError, match="num_classes"):
        SyntheticImageDataset(num_samples=2, img_size=4, num_classes=-1)

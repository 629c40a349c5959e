"""ImageFolderDataset against MMagic 1.x's BigGAN ImageNet pipeline
(LoadImageFromFile: OpenCV, BGR; CenterCropLongEdge; Resize with backend
'pillow', bilinear). MMagic itself needs mmcv's compiled ops and is not
installed; each test states the rule it checks. Found by the session-30 hunt:
each failed on the loader before (PIL, RGB, resize then crop, bicubic)."""
import numpy as np
import pytest
import torch
from PIL import Image

from pygan_optim.datasets import ImageFolderDataset


def _folder(tmp_path, files):
    """files: {relative path: PIL image}; returns the root."""
    root = tmp_path / "data"
    for rel, im in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path)
    return str(root)


def _pattern(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_bgr_center_crop_then_bilinear_resize(tmp_path):
    """The centred square of the short side ((w - s) // 2 from the left), then
    PIL's bilinear resize to img_size, channels in BGR order. PNG is lossless,
    so PIL's own decoding is the oracle's."""
    im = _pattern(50, 37)
    ds = ImageFolderDataset(_folder(tmp_path, {"c/0.png": im}), img_size=16)
    left = (50 - 37) // 2
    expected = np.asarray(im.crop((left, 0, left + 37, 37)).resize((16, 16), Image.BILINEAR))
    got = ds[0]["inputs"]["img"]
    assert got.dtype == torch.uint8 and got.shape == (3, 16, 16)
    assert torch.equal(got, torch.from_numpy(expected[..., ::-1].copy()).permute(2, 0, 1))


def test_exif_orientation_is_applied(tmp_path):
    """OpenCV turns the image as its EXIF orientation says (6: a quarter turn
    clockwise), as MMagic's loader does: the left half (red) ends on top."""
    im = Image.new("RGB", (64, 32), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 32, 32))
    exif = im.getexif()
    exif[0x0112] = 6
    path = tmp_path / "data" / "c" / "0.jpg"
    path.parent.mkdir(parents=True)
    im.save(path, exif=exif.tobytes(), quality=95)
    img = ImageFolderDataset(str(tmp_path / "data"), img_size=32)[0]["inputs"]["img"].int()
    top, bottom = img[:, :8].float().mean((1, 2)), img[:, -8:].float().mean((1, 2))
    assert top[2] > 200 and top[0] < 50, top  # red, in BGR order
    assert bottom[0] > 200 and bottom[2] < 50, bottom  # blue


def test_16_bit_grey_is_reduced_to_8_bits(tmp_path):
    """PIL's convert('RGB') clipped 16-bit grey at 255 (an almost white image);
    OpenCV keeps the high byte and replicates the grey."""
    grey = Image.fromarray(np.full((8, 8), 0x8000, np.uint16))
    ds = ImageFolderDataset(_folder(tmp_path, {"c/0.png": grey}), img_size=8)
    assert torch.equal(ds[0]["inputs"]["img"], torch.full((3, 8, 8), 0x80, dtype=torch.uint8))


def test_listing_walks_sub_folders_skips_hidden_names_and_takes_mmagics_extensions(tmp_path):
    img = _pattern(8, 8)
    root = _folder(tmp_path, {"a/0.png": img, "a/deep/1.tif": img, "a/2.ppm": img,
                              "a/._0.png": img, "a/.cache/3.png": img, "b/x/4.pgm": img.convert("L"),
                              ".hidden_class/5.png": img})
    ds = ImageFolderDataset(root, img_size=8)
    assert ds.classes == ["a", "b"]
    names = [(p[len(root) + 1:], label) for p, label in ds.samples]
    assert names == [("a/0.png", 0), ("a/2.ppm", 0), ("a/deep/1.tif", 0), ("b/x/4.pgm", 1)]
    for k in range(len(ds)):
        assert ds[k]["inputs"]["img"].shape == (3, 8, 8)


def test_a_file_that_cannot_be_decoded_is_named(tmp_path):
    root = _folder(tmp_path, {"c/0.png": _pattern(8, 8)})
    data = (tmp_path / "data" / "c" / "0.png").read_bytes()
    (tmp_path / "data" / "c" / "1.png").write_bytes(data[:20])
    ds = ImageFolderDataset(root, img_size=8)
    with pytest.raises(ValueError, match=r"cannot decode .*1\.png"):
        ds[1]


@pytest.mark.parametrize("bad", [0, -32, (32, 32), 32.0, "32", True])
def test_a_bad_img_size_is_refused_when_built(tmp_path, bad):
    root = _folder(tmp_path, {"c/0.png": _pattern(8, 8)})
    with pytest.raises(ValueError, match="img_size must be a positive int"):
        ImageFolderDataset(root, img_size=bad)

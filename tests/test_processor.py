"""Region preprocessing: hand-computed alpha in every geometry mode, region forms, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from alphaclip_plugins import RegionProcessor
from alphaclip_plugins.core.alpha import ALPHA_FOREGROUND

# A 3x5 mask on a 3x5 (non-square) image.
MASK = np.array([[1, 1, 0, 0, 0],
                 [1, 1, 0, 0, 0],
                 [0, 0, 0, 0, 1]], dtype=np.uint8)
IMAGE = np.full((3, 5, 3), 128, np.uint8)


def enc(m) -> torch.Tensor:
    return (torch.tensor(m, dtype=torch.float32) - 0.5) / 0.26


def test_pad_mode_hand_computed():
    # Pad to 5x5 with one zero row above and below (image centred); no resize at size 5.
    expected = enc([[0] * 5, [1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 1], [0] * 5])
    alpha = RegionProcessor(5, "pad")(IMAGE, [MASK]).alpha
    assert torch.allclose(alpha[0, 0], expected, atol=1e-6)


def test_crop_mode_hand_computed():
    # Centre square of 3x5: columns 1..3.
    expected = enc([[1, 0, 0], [1, 0, 0], [0, 0, 0]])
    alpha = RegionProcessor(3, "crop")(IMAGE, [MASK]).alpha
    assert torch.allclose(alpha[0, 0], expected, atol=1e-6)


def test_squash_mode_hand_computed():
    # Height 3 -> 5 by bilinear (half-pixel centres): source rows 0, .6r0+.4r1, r1, .4r1+.6r2, r2.
    r = MASK.astype(np.float32)
    rows = [r[0], 0.6 * r[0] + 0.4 * r[1], r[1], 0.4 * r[1] + 0.6 * r[2], r[2]]
    alpha = RegionProcessor(5, "squash")(IMAGE, [MASK]).alpha
    assert torch.allclose(alpha[0, 0], enc(np.stack(rows)), atol=1e-6)


def test_pad_mode_upsampled_hand_computed():
    # Pad to 5x5, then x2 bilinear: output i samples source (i + 0.5) / 2 - 0.5, clamped at the borders.
    padded = np.zeros((5, 5), np.float32)
    padded[1:4] = MASK
    w = np.zeros((10, 5), np.float32)
    for i in range(10):
        src = min(max((i + 0.5) / 2 - 0.5, 0), 4)
        lo = int(np.floor(src))
        hi = min(lo + 1, 4)
        w[i, lo] += 1 - (src - lo)
        w[i, hi] += src - lo
    expected = enc(w @ padded @ w.T)
    alpha = RegionProcessor(10, "pad")(IMAGE, [MASK]).alpha
    assert torch.allclose(alpha[0, 0], expected, atol=1e-5)


def test_image_and_mask_share_geometry():
    # A white 2x2 square in a black 4x8 image, masked by itself: after any geometry, the bright pixels
    # are exactly where alpha is foreground.
    img = np.zeros((4, 8, 3), np.uint8)
    img[1:3, 5:7] = 255
    mask = img[..., 0] > 0
    for mode in ("pad", "crop", "squash"):
        p = RegionProcessor(8, mode)
        batch = p(img, [mask])
        bright = batch.pixel_values[0, 0] > 0
        assert torch.equal(bright, batch.alpha[0, 0] > 0), mode


def test_box_polygon_rle_equal_the_mask():
    from pycocotools import mask as mask_utils

    img = np.zeros((30, 50, 3), np.uint8)
    m = np.zeros((30, 50), np.uint8)
    m[5:20, 10:40] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    rle_str = {"size": rle["size"], "counts": rle["counts"].decode()}
    uncompressed = {"size": [30, 50], "counts": _uncompressed_counts(m)}
    poly = {"polygon": [10, 5, 40, 5, 40, 20, 10, 20]}
    regions = [m, (10, 5, 40, 20), {"box": [10, 5, 40, 20]}, rle_str, {"rle": uncompressed}, poly]
    alpha = RegionProcessor(32, "pad")(img, regions).alpha
    for i in range(1, len(regions)):
        assert torch.equal(alpha[0], alpha[i]), regions[i]


def _uncompressed_counts(m: np.ndarray) -> list:
    flat = m.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    return counts + [run]


def test_mask_types_map_to_the_same_alpha():
    m = MASK.astype(bool)
    forms = [m, m.astype(np.uint8), m.astype(np.uint8) * 255, m.astype(np.float32), torch.from_numpy(m),
             Image.fromarray(m.astype(np.uint8) * 255), Image.fromarray(m)]
    alpha = RegionProcessor(5, "pad")(IMAGE, forms).alpha
    for i in range(1, len(forms)):
        assert torch.equal(alpha[0], alpha[i]), type(forms[i])


def test_whole_image_is_foreground_everywhere_and_batches():
    images = [IMAGE, Image.fromarray(np.zeros((7, 4, 3), np.uint8)), torch.rand(3, 9, 9)]
    batch = RegionProcessor(8)(images, [[None, MASK], None, [(0, 0, 4, 4)]])
    assert batch.pixel_values.shape == (4, 3, 8, 8) and batch.alpha.shape == (4, 1, 8, 8)
    assert batch.image_index.tolist() == [0, 0, 1, 2]
    assert torch.all(batch.alpha[0] == ALPHA_FOREGROUND) and torch.all(batch.alpha[2] == ALPHA_FOREGROUND)
    assert batch.rgba().shape == (4, 4, 8, 8)


@pytest.mark.parametrize(
    "image, region, match",
    [
        (IMAGE, np.zeros((4, 5), bool), r"mask has shape \(4, 5\) but the image is \(3, 5\)"),
        (IMAGE, MASK.astype(np.float32) * 255, r"float mask has values in \[0, 255\]"),
        (np.zeros((0, 5, 3), np.uint8), None, "empty"),
        (IMAGE, (0, 0, 6, 2), "outside the 5x3 image"),
        (IMAGE, (3, 0, 2, 2), "empty or outside"),
        (IMAGE, np.full((3, 5), np.nan, np.float32), "NaN"),
        (np.full((3, 5, 3), np.nan, np.float32), None, "NaN"),
        (IMAGE, {"size": [4, 4], "counts": "abc"}, "RLE has size"),
        (IMAGE, {"polygon": [0, 0, 9, 0, 9, 9]}, "outside"),
        (IMAGE, {"circle": 3}, "unknown region"),
        (IMAGE.astype(np.float32), None, "float image has values"),
        (Image.new("RGB", (5, 3)), Image.new("RGB", (5, 3)), "single-channel"),
    ],
)
def test_bad_input_raises_value_error(image, region, match):
    with pytest.raises(ValueError, match=match):
        RegionProcessor(8)(image, [region])


def test_unknown_mode():
    with pytest.raises(ValueError, match="mode must be"):
        RegionProcessor(8, "stretch")


def test_a_lone_region_needs_no_list():
    p = RegionProcessor(8)
    as_list = p(IMAGE, [[1, 0, 4, 2]]).alpha
    for lone in ([1, 0, 4, 2], (1, 0, 4, 2), {"box": [1, 0, 4, 2]}):
        assert torch.equal(p(IMAGE, lone).alpha, as_list)
    assert p(IMAGE, MASK).alpha.shape == (1, 1, 8, 8)

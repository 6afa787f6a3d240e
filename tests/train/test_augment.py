"""Random shift augmentation: a translation by at most `pad` pixels, shared by a camera's frames."""

import pytest
import torch
import torch.nn.functional as F

from physis.train.augment import random_shift


def _images(b=3, c=2, t=2, h=12, w=10):
    x = torch.arange(b * c * t * 3 * h * w, dtype=torch.float32).view(b, c, t, 3, h, w)
    return x, x[:, :, -1] + 0.5  # a future frame distinct from the history


def _offset(shifted: torch.Tensor, original: torch.Tensor, pad: int) -> tuple[int, int]:
    """The (row, col) offset into the replicate-padded original that reproduces `shifted`."""
    padded = F.pad(original, (pad, pad, pad, pad), mode="replicate")
    h, w = original.shape[-2:]
    hits = [(r, c) for r in range(2 * pad + 1) for c in range(2 * pad + 1)
            if torch.equal(padded[..., r:r + h, c:c + w], shifted)]
    assert len(hits) == 1, "not a translation of the original"
    return hits[0]


def test_zero_shift_is_the_identity():
    images, future = _images()
    out, fut = random_shift(images, future, 0, torch.Generator().manual_seed(0))
    assert out is images and fut is future


def test_each_camera_is_translated_within_the_pad_and_its_frames_move_together():
    images, future = _images()
    pad = 2
    out, fut = random_shift(images, future, pad, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and fut.shape == future.shape
    offsets = set()
    for b in range(images.shape[0]):
        for c in range(images.shape[1]):
            off = _offset(out[b, c, 0], images[b, c, 0], pad)
            assert _offset(out[b, c, 1], images[b, c, 1], pad) == off
            assert _offset(fut[b, c], future[b, c], pad) == off
            offsets.add(off)
    assert len(offsets) > 1  # samples and cameras draw their own offsets


def test_the_shift_is_a_function_of_the_generator_seed():
    images, future = _images()
    a = random_shift(images, future, 3, torch.Generator().manual_seed(5))
    b = random_shift(images, future, 3, torch.Generator().manual_seed(5))
    c = random_shift(images, future, 3, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_history_only_batches_work_without_a_future_frame():
    images, _ = _images()
    out, fut = random_shift(images, None, 1, torch.Generator().manual_seed(0))
    assert fut is None and out.shape == images.shape


@pytest.mark.parametrize("pad", [-1, 10])
def test_a_shift_outside_the_image_is_refused(pad):
    images, future = _images(h=10, w=10)
    with pytest.raises(ValueError, match="image shift"):
        random_shift(images, future, pad, torch.Generator())

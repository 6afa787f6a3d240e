import multiprocessing

import numpy as np
import pytest

from physis.data.synthetic import render_blob
from physis.data.video import (
    EncoderConfig,
    FrameCache,
    FrameTimestampError,
    VideoDecodeError,
    VideoEncoder,
    decode_all,
    decode_at,
)

from .conftest import psnr


@pytest.mark.parametrize("codec", ["libsvtav1", "libx264"])
def test_encode_decode_round_trip(tmp_path, codec):
    frames = render_blob(np.stack([np.linspace(-0.8, 0.8, 30)] * 2, 1), 48, 64)
    enc = VideoEncoder(tmp_path / "v.mp4", 25, 48, 64, EncoderConfig(codec=codec, preset=None))
    for f in frames:
        enc.add(f)
    enc.close()
    decoded, times = decode_all(tmp_path / "v.mp4")
    assert decoded.shape == (30, 48, 64, 3)
    np.testing.assert_allclose(times, np.arange(30) / 25, atol=1e-6)
    assert min(psnr(a, b) for a, b in zip(decoded, frames, strict=True)) >= 35
    picked = decode_at(tmp_path / "v.mp4", np.array([0.4, 0.44, 1.16]))
    assert np.array_equal(picked, decoded[[10, 11, 29]])
    cache = FrameCache(tmp_path / "cache")
    assert np.array_equal(cache.frames_at(tmp_path / "v.mp4", np.array([0.4, 1.16])), decoded[[10, 29]])
    with pytest.raises(FrameTimestampError, match=r"v.mp4: no frame within 0.0001s of timestamp 0.410000s"):
        cache.frames_at(tmp_path / "v.mp4", np.array([0.41]))


def test_encoder_rejects_wrong_frames(tmp_path):
    enc = VideoEncoder(tmp_path / "v.mp4", 10, 16, 16)
    with pytest.raises(ValueError, match="expected a frame of shape \\(16, 16, 3\\) uint8"):
        enc.add(np.zeros((16, 16, 3), np.float32))
    enc.close()


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(VideoDecodeError, match="nope.mp4: video file is missing"):
        decode_all(tmp_path / "nope.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 10)
    with pytest.raises(VideoDecodeError, match="junk.mp4"):
        decode_all(tmp_path / "junk.mp4")


def _decode_into(path, queue):
    queue.put(decode_all(path)[0].shape)


def test_a_process_forked_after_decoding_decodes_too(tmp_path):
    # a DataLoader's workers are forked from a parent that may have decoded already (PyAV 18.1.1 hung them there)
    enc = VideoEncoder(tmp_path / "v.mp4", 10, 32, 32)
    for i in range(8):
        enc.add(np.full((32, 32, 3), 20 * i, np.uint8))
    enc.close()
    assert decode_all(tmp_path / "v.mp4")[0].shape == (8, 32, 32, 3)
    fork = multiprocessing.get_context("fork")
    queue = fork.Queue()
    child = fork.Process(target=_decode_into, args=(tmp_path / "v.mp4", queue))
    child.start()
    child.join(60)
    hung = child.is_alive()
    child.kill()
    assert not hung, "a forked process hung decoding a video"
    assert child.exitcode == 0 and queue.get(timeout=5) == (8, 32, 32, 3)

"""Camera streams as mp4 through PyAV: a streaming encoder, a seeking decoder and a decoded-frame cache.

Episodes of one camera go back to back into one mp4; an episode's frame at `timestamp` sits at
`from_timestamp + timestamp` in its file. Decoding asks for timestamps and checks that the nearest
frame lies within a tolerance; a miss raises `FrameTimestampError` naming the file and timestamp.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE_S = 1e-4
os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints a banner per file otherwise; keep errors only

# Encoder library <-> the codec name a stream reports (and LeRobot records in info.json).
_CODEC_OF_ENCODER = {"libsvtav1": "av1", "libaom-av1": "av1", "libx264": "h264", "libx265": "hevc"}


def canonical_codec(encoder: str) -> str:
    return _CODEC_OF_ENCODER.get(encoder, encoder)


def encoder_for_codec(codec: str) -> str:
    return {"av1": "libsvtav1", "h264": "libx264", "hevc": "libx265"}.get(codec, codec)


class FrameTimestampError(ValueError):
    """No decoded frame lies within the tolerance of a requested timestamp."""


class VideoDecodeError(ValueError):
    """A video file is missing, truncated or not decodable."""


@dataclass(frozen=True)
class EncoderConfig:
    """mp4 encoding settings. Defaults follow the ecosystem: AV1 (SVT), yuv420p, a keyframe every 2 frames."""

    codec: str = "libsvtav1"
    pix_fmt: str = "yuv420p"
    gop: int = 2  # a short GOP keeps random access cheap
    crf: int = 30
    preset: str | None = "12"
    extra: dict[str, str] = field(default_factory=dict)

    def options(self) -> dict[str, str]:
        opts = {"g": str(self.gop), "crf": str(self.crf), **self.extra}
        if self.preset is not None:
            opts["preset"] = self.preset
        return opts

    def info_fields(self) -> dict[str, object]:
        return {"g": self.gop, "crf": self.crf, "preset": self.preset}


class VideoEncoder:
    """Encode RGB frames (H, W, 3) uint8 of one camera into one mp4 file, frame by frame."""

    def __init__(self, path: Path, fps: int, height: int, width: int, config: EncoderConfig | None = None):
        self.config = config or EncoderConfig()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fps = fps
        self.shape = (height, width, 3)
        self._container = av.open(str(self.path), mode="w", format="mp4")
        self._stream = self._container.add_stream(self.config.codec, rate=fps, options=self.config.options())
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = self.config.pix_fmt
        self._stream.codec_context.time_base = Fraction(1, fps)
        self.frames = 0  # frames written so far; the next frame's time is frames / fps
        self.bytes = 0  # bytes of encoded packets so far (the file is a little larger)

    @property
    def codec_name(self) -> str:
        return self._stream.codec_context.name

    def add(self, frame: np.ndarray) -> None:
        if frame.shape != self.shape or frame.dtype != np.uint8:
            raise ValueError(
                f"{self.path}: expected a frame of shape {self.shape} uint8, got {frame.shape} {frame.dtype}"
            )
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        vf.pts = self.frames
        vf.time_base = Fraction(1, self.fps)
        self._mux(self._stream.encode(vf))
        self.frames += 1

    def close(self) -> None:
        if self._container is None:
            return
        self._mux(self._stream.encode(None))
        self._container.close()
        self._container = None

    def _mux(self, packets) -> None:
        for packet in packets:
            self.bytes += packet.size
            self._container.mux(packet)


def _open(path: Path):
    if not path.is_file():
        raise VideoDecodeError(f"{path}: video file is missing")
    try:
        container = av.open(str(path))
    except av.FFmpegError as e:
        raise VideoDecodeError(f"{path}: cannot open video ({e})") from e
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{path}: has no video stream")
    return container


def _rgb(frame: av.VideoFrame) -> np.ndarray:
    """A decoded frame as (H, W, 3) uint8 RGB, converted on the calling thread. PyAV 17 and later convert on a pool
    of slice threads by default; with PyAV 18.1.1, a process forked after its parent had converted a frame (a
    DataLoader's worker) waited forever in the conversion, on slice threads that the fork had not copied. Frames
    of a few hundred pixels a side gain nothing from the threads, and the workers are the parallelism."""
    return frame.to_ndarray(format="rgb24", threads=1)


def decode_all(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every frame of a file: (N, H, W, 3) uint8 RGB and their times in seconds (N,)."""
    frames, times = [], []
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                frames.append(_rgb(frame))
                times.append(float(frame.pts * frame.time_base))
        except av.FFmpegError as e:
            raise VideoDecodeError(f"{path}: decoding failed after {len(frames)} frames ({e})") from e
    if not frames:
        raise VideoDecodeError(f"{path}: no frames could be decoded")
    return np.stack(frames), np.asarray(times)


def nearest_frames(times: np.ndarray, query: np.ndarray, tolerance_s: float, path: Path) -> np.ndarray:
    """Index of the frame nearest each query time; raises if one is further than the tolerance."""
    pos = np.clip(np.searchsorted(times, query), 1, len(times) - 1) if len(times) > 1 else np.zeros_like(query, int)
    left = pos - 1 if len(times) > 1 else pos
    pick = np.where(np.abs(times[left] - query) <= np.abs(times[pos] - query), left, pos)
    error = np.abs(times[pick] - query)
    bad = error > tolerance_s
    if bad.any():
        i = int(np.argmax(bad))
        raise FrameTimestampError(
            f"{path}: no frame within {tolerance_s}s of timestamp {query[i]:.6f}s (nearest frame at "
            f"{times[pick[i]]:.6f}s; the file has {len(times)} frames from {times[0]:.4f}s to {times[-1]:.4f}s)"
        )
    return pick


def decode_at(path: Path, timestamps: np.ndarray, tolerance_s: float = DEFAULT_TOLERANCE_S) -> np.ndarray:
    """Frames at the given times (T, H, W, 3) uint8 by seeking: for files too large to cache."""
    timestamps = np.asarray(timestamps, dtype=np.float64)
    lo, hi = float(timestamps.min()), float(timestamps.max())
    frames, times = [], []
    with _open(path) as container:
        stream = container.streams.video[0]
        container.seek(int(max(lo - tolerance_s, 0.0) / stream.time_base), stream=stream, backward=True)
        try:
            for frame in container.decode(stream):
                t = float(frame.pts * frame.time_base)
                frames.append(_rgb(frame))
                times.append(t)
                if t >= hi - tolerance_s:
                    break
        except av.FFmpegError as e:
            raise VideoDecodeError(f"{path}: decoding failed near {lo:.4f}s ({e})") from e
    if not frames:
        raise FrameTimestampError(f"{path}: no frames could be decoded in [{lo:.4f}s, {hi:.4f}s]")
    pick = nearest_frames(np.asarray(times), timestamps, tolerance_s, path)
    return np.stack(frames)[pick]


def default_cache_dir() -> Path:
    return Path(os.environ.get("PHYSIS_CACHE", Path.home() / ".cache" / "physis")) / "frames"


class FrameCache:
    """Decoded frames of mp4 files as uint8 memory maps on disk, so random access is a copy.

    A file is decoded once, front to back (far faster than a seek per sample); the cache is keyed
    by the file's path, size and modification time, and shared by DataLoader workers through the
    page cache.
    """

    def __init__(self, cache_dir: Path | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self._open: dict[Path, tuple[np.ndarray, np.ndarray]] = {}

    def _key(self, path: Path) -> str:
        st = path.stat()
        return hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]

    def get(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """(frames (N, H, W, 3) uint8 memmap, times (N,) seconds) of one file."""
        hit = self._open.get(path)
        if hit is not None:
            return hit
        if not path.is_file():
            raise VideoDecodeError(f"{path}: video file is missing")
        base = self.cache_dir / self._key(path)
        frames_file, times_file = base.with_suffix(".frames.npy"), base.with_suffix(".times.npy")
        if not (frames_file.is_file() and times_file.is_file()):
            self._fill(path, frames_file, times_file)
        entry = (np.load(frames_file, mmap_mode="r"), np.load(times_file))
        self._open[path] = entry
        return entry

    def _fill(self, path: Path, frames_file: Path, times_file: Path) -> None:
        log.debug("decoding %s into the frame cache", path)
        frames, times = decode_all(path)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for target, array in ((frames_file, frames), (times_file, times)):
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".tmp.npy")
            with os.fdopen(fd, "wb") as f:
                np.save(f, array)
            os.replace(tmp, target)  # workers racing on the same file each write a whole copy

    def frames_at(self, path: Path, timestamps: np.ndarray, tolerance_s: float = DEFAULT_TOLERANCE_S) -> np.ndarray:
        frames, times = self.get(path)
        return frames[nearest_frames(times, np.asarray(timestamps, dtype=np.float64), tolerance_s, path)]

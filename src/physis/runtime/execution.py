"""Execution modes: how a policy turns action chunks into one action per control step.

  open_loop  run the first `execute` actions of a chunk (the whole chunk by default), then plan again
  ensemble   plan every `execute` steps (every step by default) and blend every chunk's prediction for the
             current step with exponential weights exp(-m * i), i = 0 for the oldest prediction (as ACT does)
  rtc        real-time chunking: the next chunk is planned while the current one runs. The `delay` actions
             that run before it arrives are frozen to the current chunk's, the rest of the overlap with the
             current chunk is inpainted with weights that decay to 0, and the new chunk takes over after
             `execute` actions of the current one.

A `ChunkExecutor` holds the queue; the planner it calls (a `Policy` gives its own) maps an observation and,
for rtc, the committed actions (H, D) with their weights (H,) to a chunk (H, D) of native actions.

rtc timing, in control steps: a chunk that started running at its index `start` (0 for the first chunk, then
`delay`) asks for the next one at its index p = start + execute - delay, with the observation of that step.
The new chunk's index j is the current chunk's index p + j: j < delay is frozen, delay <= j < H - p decays,
the rest is free. Without a background thread the new chunk is planned at once and takes over right away:
its first `delay` actions are the current chunk's, so the robot sees exactly what it would with a real delay.
With `asynchronous=True` a worker thread plans while the current chunk keeps running; the new chunk takes
over `delay` steps later (or when it arrives, if later; or the caller waits when the current chunk runs out).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Mode = Literal["open_loop", "ensemble", "rtc"]
MODES = ("open_loop", "ensemble", "rtc")
# plan(obs, committed actions (H, D) or None, their weights (H,) or None) -> chunk (H, D), native actions
Planner = Callable[[Any, "np.ndarray | None", "np.ndarray | None"], np.ndarray]


@dataclass(frozen=True)
class ExecutionConfig:
    mode: Mode = "open_loop"
    """open_loop, ensemble or rtc (real-time chunking)."""
    execute: int | None = None
    """Actions run per chunk before the next one: open_loop default the horizon, ensemble 1, rtc half the horizon."""
    ensemble_decay: float = 0.01
    """ensemble: m in the weights exp(-m * i) (0: plain average)."""
    delay: int = 0
    """rtc: inference delay d in control steps: the actions that run while the next chunk is planned."""
    asynchronous: bool = False
    """rtc: plan the next chunk in a background thread while the current one runs."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"ExecutionConfig.mode: expected one of {MODES}, found {self.mode!r}")
        if self.execute is not None and self.execute < 1:
            raise ValueError(f"ExecutionConfig.execute: expected at least 1, found {self.execute}")
        if self.delay < 0:
            raise ValueError(f"ExecutionConfig.delay: expected at least 0, found {self.delay}")
        if self.ensemble_decay < 0:
            raise ValueError(f"ExecutionConfig.ensemble_decay: expected at least 0, found {self.ensemble_decay}")

    def steps_per_chunk(self, horizon: int) -> int:
        """`execute`, or the mode's default, checked against the horizon (and the delay for rtc)."""
        s = self.execute or {"open_loop": horizon, "ensemble": 1, "rtc": max(1, horizon // 2)}[self.mode]
        if s > horizon:
            raise ValueError(f"ExecutionConfig.execute: {s} actions per chunk exceeds the horizon {horizon}")
        if self.mode == "rtc" and not self.delay <= s <= horizon - self.delay:
            raise ValueError(f"ExecutionConfig: rtc needs delay <= execute <= horizon - delay; found delay "
                             f"{self.delay}, execute {s}, horizon {horizon}")
        return s


def rtc_weights(horizon: int, delay: int, overlap: int) -> np.ndarray:
    """Inpainting weights (horizon,) of a new chunk: 1 on the first `delay` steps (they run before it arrives),
    then decaying exponentially to 0 at the end of the `overlap` steps it shares with the current chunk, 0 after.

    On the soft part, with c running from just under 1 down to 1 / (overlap - delay + 1):
    w = c * (exp(c) - 1) / (e - 1), so the blend leaves the committed plan gradually.
    """
    if not 0 <= delay <= overlap <= horizon:
        raise ValueError(f"rtc_weights: expected 0 <= delay <= overlap <= horizon, found {delay}, {overlap}, {horizon}")
    w = np.zeros(horizon)
    w[:delay] = 1.0
    j = np.arange(delay, overlap)
    c = (overlap - j) / (overlap - delay + 1)
    w[delay:overlap] = c * np.expm1(c) / (math.e - 1)
    return w


class ChunkExecutor:
    """One native action per `step(obs)` from chunks a planner makes, in one of the execution modes."""

    def __init__(self, config: ExecutionConfig, plan: Planner, horizon: int) -> None:
        self.config, self.plan, self.horizon = config, plan, horizon
        self.execute = config.steps_per_chunk(horizon)
        self._pool: ThreadPoolExecutor | None = None
        self.reset()

    def reset(self) -> None:
        """A new episode: forget queued and pending chunks (a plan still running is left to finish)."""
        self._queue: deque[np.ndarray] = deque()  # open_loop
        self._chunks: deque[tuple[int, np.ndarray]] = deque()  # ensemble: (step it was planned at, chunk)
        self._t = 0
        self._chunk: np.ndarray | None = None  # rtc: the running chunk, its next index, where it started running
        self._index = self._start = 0
        self._pending: tuple[Future, int] | None = None  # rtc async: (the next chunk, the index it was asked at)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def step(self, obs: Any) -> np.ndarray:
        """The action (D,) to run now."""
        mode = self.config.mode
        action = self._open_loop(obs) if mode == "open_loop" else self._ensemble(obs) if mode == "ensemble" \
            else self._rtc(obs)
        self._t += 1
        return action

    # ------------------------------------------------------------------ modes
    def _open_loop(self, obs: Any) -> np.ndarray:
        if not self._queue:
            self._queue.extend(self._checked(self.plan(obs, None, None))[: self.execute])
        return self._queue.popleft()

    def _ensemble(self, obs: Any) -> np.ndarray:
        t = self._t
        if t % self.execute == 0:
            self._chunks.append((t, self._checked(self.plan(obs, None, None))))
        while self._chunks and t - self._chunks[0][0] >= self.horizon:
            self._chunks.popleft()  # no longer covers this step
        preds = np.stack([chunk[t - start] for start, chunk in self._chunks])  # oldest first
        w = np.exp(-self.config.ensemble_decay * np.arange(len(preds)))
        return (w[:, None] * preds).sum(0) / w.sum()

    def _rtc(self, obs: Any) -> np.ndarray:
        d, s = self.config.delay, self.execute
        if self._chunk is None:  # the first chunk: nothing runs meanwhile, so it is waited for
            self._take(self._checked(self.plan(obs, None, None)), index=0, start=0)
        p = self._start + s - d
        if self._index == p and self._pending is None:
            prefix, weights = self._committed(p)
            if self.config.asynchronous:
                self._pending = (self._worker().submit(self.plan, obs, prefix, weights), p)
            else:
                self._take(self._frozen(self.plan(obs, prefix, weights), prefix, weights), index=0, start=d)
        if self._pending is not None:
            future, asked = self._pending
            elapsed = self._index - asked  # actions of the current chunk run since the plan was asked for
            if (elapsed >= d and future.done()) or self._index >= self.horizon:
                prefix, weights = self._committed(asked)
                self._pending = None
                # a plan later than a whole chunk (only possible when execute == delay) resumes at its last action
                index = min(elapsed, self.horizon - 1)
                self._take(self._frozen(future.result(), prefix, weights), index=index, start=max(d, index))
        action = self._chunk[self._index]
        self._index += 1
        return action

    # ------------------------------------------------------------------ helpers
    def _take(self, chunk: np.ndarray, index: int, start: int) -> None:
        self._chunk, self._index, self._start = chunk, index, start

    def _committed(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        """The running chunk's actions from index p on, aligned to the next chunk (zeros past its end), and their
        inpainting weights."""
        prefix = np.zeros_like(self._chunk)
        rest = self._chunk[p:]
        prefix[: len(rest)] = rest
        return prefix, rtc_weights(self.horizon, self.config.delay, len(rest))

    def _frozen(self, chunk: np.ndarray, prefix: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """The new chunk with its frozen steps set to the committed actions bit for bit (the planner's round trip
        through the model's normalized space may differ in the last digit)."""
        chunk = self._checked(chunk).copy()
        chunk[weights == 1] = prefix[weights == 1]
        return chunk

    def _checked(self, chunk: np.ndarray) -> np.ndarray:
        chunk = np.asarray(chunk)
        if chunk.ndim != 2 or len(chunk) != self.horizon:
            raise ValueError(f"ChunkExecutor: the planner returned shape {chunk.shape}; expected ({self.horizon}, D)")
        return chunk

    def _worker(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="physis-rtc")
        return self._pool

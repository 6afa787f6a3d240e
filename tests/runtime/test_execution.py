"""Execution modes: the action sequences open loop, temporal ensembling and real-time chunking produce from a
planner, and `Policy.select_action` on the tiny checkpoint."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from physis.runtime.execution import ChunkExecutor, ExecutionConfig, rtc_weights

H = 8


class CountingPlanner:
    """Chunk n holds n * 100 + j at step j (1-D actions); records what each call was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, np.ndarray | None, np.ndarray | None]] = []

    def __call__(self, obs, prefix, weights) -> np.ndarray:
        n = len(self.calls)
        self.calls.append((obs, prefix, weights))
        return (n * 100 + np.arange(H, dtype=np.float64))[:, None]


def run(config: ExecutionConfig, steps: int, planner=None) -> tuple[list[float], CountingPlanner]:
    planner = planner or CountingPlanner()
    ex = ChunkExecutor(config, planner, H)
    return [float(ex.step(t)[0]) for t in range(steps)], planner


def test_open_loop_runs_execute_actions_per_chunk() -> None:
    actions, planner = run(ExecutionConfig("open_loop", execute=3), 7)
    assert actions == [0, 1, 2, 100, 101, 102, 200]
    assert [c[0] for c in planner.calls] == [0, 3, 6]  # planned with the observation of the step it runs at
    actions, _ = run(ExecutionConfig("open_loop"), 10)
    assert actions == [*range(8), 100, 101]


def test_ensemble_blends_every_chunk_covering_the_step() -> None:
    m = 0.5
    actions, planner = run(ExecutionConfig("ensemble", ensemble_decay=m), 10)
    assert len(planner.calls) == 10  # one chunk per step by default
    w = np.exp(-m * np.arange(H))
    for t in (0, 1, 5, 9):
        starts = [s for s in range(t + 1) if t - s < H]  # oldest first
        preds = np.array([s * 100 + (t - s) for s in starts])
        assert actions[t] == pytest.approx((w[: len(preds)] * preds).sum() / w[: len(preds)].sum())
    actions, planner = run(ExecutionConfig("ensemble", execute=4, ensemble_decay=0.0), 6)
    assert len(planner.calls) == 2 and actions[:4] == [0, 1, 2, 3]
    assert actions[4] == pytest.approx((4 + 100) / 2) and actions[5] == pytest.approx((5 + 101) / 2)


def test_rtc_weights() -> None:
    w = rtc_weights(8, 2, 6)
    assert list(w[:2]) == [1, 1] and list(w[6:]) == [0, 0]
    assert np.all(np.diff(w[1:6]) < 0) and np.all((w[2:6] > 0) & (w[2:6] < 1))
    assert list(rtc_weights(4, 0, 0)) == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="delay <= overlap"):
        rtc_weights(8, 5, 3)


def test_rtc_keeps_the_committed_prefix_exactly() -> None:
    d, s = 2, 4

    def deviating(obs, prefix, weights):  # a planner whose frozen steps are off in the last digits
        chunk = base(obs, prefix, weights)
        return chunk + 1e-9 if prefix is not None else chunk

    base = CountingPlanner()
    actions, _ = run(ExecutionConfig("rtc", execute=s, delay=d), 14, deviating)
    # chunk 0 runs 0..1 and asks for chunk 1 at its index s - d = 2 with the committed 0[2:8]
    obs, prefix, weights = base.calls[1]
    assert obs == 2 and list(prefix[:6, 0]) == [2, 3, 4, 5, 6, 7] and list(prefix[6:, 0]) == [0, 0]
    assert np.array_equal(weights, rtc_weights(H, d, 6))
    # chunk 1's first d actions are chunk 0's, bit for bit; then chunk 1 runs until its index s asks for chunk 2
    assert actions[:6] == [0, 1, 2, 3, 102 + 1e-9, 103 + 1e-9]
    obs, prefix, weights = base.calls[2]
    assert obs == 6 and list(prefix[:4, 0]) == [104 + 1e-9, 105 + 1e-9, 106 + 1e-9, 107 + 1e-9]
    assert np.array_equal(weights, rtc_weights(H, d, 4))
    assert actions[6:10] == [104 + 1e-9, 105 + 1e-9, 202 + 1e-9, 203 + 1e-9]
    assert len(base.calls) == 4 and base.calls[3][0] == 10  # one chunk per s steps


def test_rtc_in_a_background_thread() -> None:
    gate = threading.Event()
    planner = CountingPlanner()

    def slow(obs, prefix, weights):
        if prefix is not None and len(planner.calls) == 1:
            assert gate.wait(10)  # the second chunk arrives only when the test says so
        return planner(obs, prefix, weights)

    ex = ChunkExecutor(ExecutionConfig("rtc", execute=4, delay=2, asynchronous=True), slow, H)
    got = [float(ex.step(t)[0]) for t in range(5)]
    assert got == [0, 1, 2, 3, 4]  # chunk 1 (asked at step 2) is late: chunk 0 keeps running
    gate.set()
    while ex._pending is not None and not ex._pending[0].done():
        threading.Event().wait(0.01)
    got += [float(ex.step(t)[0]) for t in range(5, 8)]
    assert got[5:] == [103 + 0, 104, 105]  # takes over at its index 3 (asked 3 steps before), frozen 0..1 unused
    assert planner.calls[1][0] == 2
    ex.close()


def test_invalid_configurations_are_reported() -> None:
    with pytest.raises(ValueError, match="mode"):
        ExecutionConfig("chunked")
    with pytest.raises(ValueError, match="delay <= execute <= horizon - delay"):
        ChunkExecutor(ExecutionConfig("rtc", execute=2, delay=3), CountingPlanner(), H)
    with pytest.raises(ValueError, match="exceeds the horizon"):
        ChunkExecutor(ExecutionConfig("open_loop", execute=9), CountingPlanner(), H)
    ex = ChunkExecutor(ExecutionConfig(), lambda *_: np.zeros((3, 1)), H)
    with pytest.raises(ValueError, match=r"expected \(8, D\)"):
        ex.step({})


@pytest.fixture(scope="module")
def text_encoder():
    from physis.model.text import TextEncoder

    return TextEncoder()  # loaded once for the three policies below


@pytest.mark.parametrize("mode", ["open_loop", "ensemble", "rtc"])
def test_policy_select_action(tiny_checkpoint, text_encoder, mode) -> None:
    from physis.runtime import Policy
    from physis.sim import EnvConfig, make_env

    execution = ExecutionConfig(mode, execute=3 if mode != "ensemble" else 2, delay=1 if mode == "rtc" else 0)
    policy = Policy.from_checkpoint(tiny_checkpoint, flow_steps=2, execution=execution, text_encoder=text_encoder)
    env = make_env("metaworld/mt10", "reach-v3", EnvConfig(image_size=32))
    obs, _ = env.reset(seed=1_000_000)
    policy.reset()
    planned: list[np.ndarray] = []
    infer = policy.infer

    def spy(o, prefix=None, weights=None):
        out = infer(o, prefix, weights)
        planned.append((out["actions"], prefix, weights))
        return out

    policy.infer = spy
    actions = []
    for _ in range(7):
        a = policy.select_action(obs)
        assert a.shape == (4,) and np.all(a >= policy.lower) and np.all(a <= policy.upper)
        actions.append(a)
        obs, *_ = env.step(a)
    env.close()
    assert len(planned) == {"open_loop": 3, "ensemble": 4, "rtc": 3}[mode]
    assert policy.last_output["actions"] is planned[-1][0] and isinstance(policy.last_output["subtask"], str)
    if mode == "rtc":  # chunk 1 was asked at chunk 0's index 2 and its first action is chunk 0's index 2
        chunk0, (chunk1, prefix, weights) = planned[0][0], planned[1]
        assert weights[0] == 1 and weights[1] < 1 and np.array_equal(prefix[:6], chunk0[2:])
        assert np.allclose(chunk1[0], chunk0[2], atol=1e-5)  # the model's own output, through normalization
        assert np.array_equal(actions[2], chunk0[2]) and np.array_equal(actions[3], chunk1[1])
    policy.reset()
    assert policy.select_action(obs).shape == (4,)


def test_setting_the_execution_mode_drops_the_queued_chunk(tiny_checkpoint, text_encoder) -> None:
    from physis.runtime import Policy
    from physis.sim import EnvConfig, make_env

    policy = Policy.from_checkpoint(tiny_checkpoint, flow_steps=2, text_encoder=text_encoder)
    env = make_env("metaworld/mt10", "reach-v3", EnvConfig(image_size=32))
    obs, _ = env.reset(seed=1_000_000)
    env.close()
    calls = []
    infer = policy.infer
    policy.infer = lambda o, prefix=None, weights=None: calls.append(1) or infer(o, prefix, weights)
    policy.select_action(obs)
    policy.select_action(obs)  # open loop: the second action comes from the queued chunk
    assert len(calls) == 1
    policy.execution = ExecutionConfig("open_loop", execute=1)
    assert policy.execution.execute == 1
    policy.select_action(obs)  # the old queue is gone: a new chunk is planned
    assert len(calls) == 2
    policy.reset()
    assert policy.last_output is None

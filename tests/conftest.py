"""Shared by every test folder: headless rendering, and tiny trained checkpoints (2 MT10 demos at 32x32,
`tiny`, 4 steps; and one with the localizer) for the runtime and evaluation tests."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering for every suite, before anything imports mujoco

import dataclasses  # noqa: E402

import pytest  # noqa: E402

from physis.sim.collect import CollectConfig, collect  # noqa: E402
from physis.train.run import TrainCommand, train  # noqa: E402

TASKS = ("reach-v3", "drawer-close-v3")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(root, TrainCommand, summary): demos under root/"demos", the run (checkpoints) under root/"run"."""
    root = tmp_path_factory.mktemp("tiny-run")
    collect(CollectConfig(suite="metaworld/mt10", tasks=TASKS, episodes=1, out=root / "demos", image_size=32,
                          workers=1, progress=False))
    cmd = TrainCommand(data=(root / "demos",), out=root / "run", preset="tiny", steps=4, batch_size=4,
                       image_size=32, horizon=8, workers=0, save_every=2, log_every=1, warmup=1, progress=False)
    summary = train(cmd)
    return root, cmd, summary


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_run):
    """The run directory of the tiny checkpoint (Policy.from_checkpoint accepts it)."""
    return tiny_run[0] / "run"


@pytest.fixture(scope="session")
def localizer_run(tiny_run, tmp_path_factory):
    """The tiny run retrained (2 steps) with keypoints and the localizer, estimating object and goal positions in
    the world and relative to the hand (12 names)."""
    _, cmd, _ = tiny_run
    out = tmp_path_factory.mktemp("localizer") / "run"
    train(dataclasses.replace(cmd, out=out, steps=2, save_every=2, env_state_weight=1.0, keypoints=4,
                              localizer=True, env_state_relative=True))
    return out

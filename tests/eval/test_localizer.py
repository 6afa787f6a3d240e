"""The localizer in closed loop: each chunk's estimate scored against the simulator's truth during `physis eval`."""

from __future__ import annotations

import numpy as np
import torch

from physis.embodiment import load_embodiment
from physis.eval.localizer import LocalizerLog, pooled
from physis.eval.runner import EvalConfig, evaluate
from physis.runtime import Policy
from physis.sim import EnvConfig, make_env

WORLD = ["object_x", "object_y", "object_z", "goal_x", "goal_y", "goal_z"]
NAMES = WORLD + [f"{n}-robot" for n in WORLD] + [f"{n}-robot-near" for n in WORLD]


def test_each_name_is_scored_against_the_truth_and_near_where_its_position_is_close() -> None:
    log = LocalizerLog(NAMES, WORLD, load_embodiment("metaworld_sawyer"))
    assert [s[0] for s in log.scored] == NAMES[:12]  # near-field values are a transform: not scored
    truth = np.array([0.0, 0.6, 0.02, 0.1, 0.8, 0.2])
    hand = np.array([0.01, 0.62, 0.03, 1.0])  # eef_pos, then the gripper: 2.4 cm from the object
    estimate = np.concatenate([truth + 0.01, truth - hand[[0, 1, 2, 0, 1, 2]] - 0.002, np.zeros(6)])
    log.add(estimate, truth, hand)
    far = hand + np.array([0.3, 0.0, 0.0, 0.0])
    log.add(np.concatenate([truth, truth - far[[0, 1, 2, 0, 1, 2]] + 0.004, np.zeros(6)]), truth, far)
    summary = log.summary()
    assert summary["chunks"] == 2
    assert np.isclose(summary["mae"]["object_x"], 0.005) and np.isclose(summary["mae"]["goal_y-robot"], 0.003)
    assert summary["near_chunks"]["object_x-robot"] == 1 and summary["near_chunks"]["goal_x-robot"] == 0
    assert np.isclose(summary["near_mae"]["object_y-robot"], 0.002)  # the near chunk only
    assert "goal_x-robot" not in summary["near_mae"]  # the goal was never within 5 cm
    assert np.isclose(summary["first"]["object_x"], 0.01) and np.isclose(summary["first"]["goal_y-robot"], 0.002)

    other = LocalizerLog(NAMES, WORLD, load_embodiment("metaworld_sawyer"))
    other.add(estimate + 0.05, truth, hand)
    both = pooled([summary, None, other.summary()])
    assert both["episodes"] == 2 and both["chunks"] == 3 and both["near_chunks"]["object_x-robot"] == 2
    assert np.isclose(both["mae"]["object_x"], (0.01 + 0.0 + 0.06) / 3, atol=1e-5)  # rounded to 0.01 mm
    assert np.isclose(both["near_mae"]["object_y-robot"], (0.002 + 0.048) / 2)
    assert np.isclose(both["first"]["object_x"], (0.01 + 0.06) / 2)  # a mean over episodes
    assert pooled([None]) is None and LocalizerLog(NAMES, WORLD, load_embodiment("metaworld_sawyer")).summary() is None


def test_policy_reports_its_estimate_in_the_datas_units(localizer_run) -> None:
    policy = Policy.from_checkpoint(localizer_run, flow_steps=2)
    located: list[torch.Tensor] = []
    policy.model.prefix.localizer.register_forward_hook(lambda m, args, out: located.append(out[0].clone()))
    env = make_env("metaworld/mt10", "reach-v3", EnvConfig(image_size=32, cameras=tuple(policy.cameras)))
    obs, _ = env.reset(seed=1_000_000)
    out = policy.infer(obs)
    env.close()
    stats = policy._env_stats
    assert policy.env_state_names == tuple(NAMES[:12])
    assert out["env_state"].shape == (12,) and out["env_state"].dtype == np.float32
    np.testing.assert_allclose(out["env_state"], located[-1].numpy() * stats["std"] + stats["mean"], rtol=1e-5,
                               atol=1e-6)


def test_eval_scores_the_localizer_per_chunk_by_outcome(localizer_run, tiny_checkpoint, tmp_path) -> None:
    cfg = EvalConfig(suite="metaworld/mt10", tasks=("reach-v3",), episodes=2, out=tmp_path, checkpoint=localizer_run,
                     workers=1, image_size=32, max_steps=10, replan_every=4, videos=0, progress=False)
    task = evaluate(cfg)["tasks"]["reach-v3"]
    assert task["errors"] == 0, task["error_examples"]
    logged = [v for v in task["localizer"].values()]
    assert sum(v["episodes"] for v in logged) == 2 and sum(v["chunks"] for v in logged) == 2 * 3  # steps 0, 4, 8
    assert all(set(v["mae"]) == set(NAMES[:12]) for v in logged)
    assert all(0 < e < 5 for v in logged for e in v["mae"].values())  # metres, not normalized units
    plain = evaluate(EvalConfig(**{**cfg.__dict__, "checkpoint": tiny_checkpoint, "out": tmp_path / "plain"}))
    assert "localizer" not in plain["tasks"]["reach-v3"]  # no localizer, nothing to score

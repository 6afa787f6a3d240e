"""`physis eval`: results.json schema, parallel workers, chunk execution, and bad policies."""

import json

import numpy as np
import pytest

from physis.eval.policies import as_chunk
from physis.eval.runner import EvalConfig, evaluate
from physis.sim import ActionError
from physis.sim.seeds import EVAL_SEEDS

TASKS = ("reach-v3", "drawer-close-v3")


def test_expert_on_two_tasks_in_parallel(tmp_path):
    cfg = EvalConfig(suite="metaworld/mt10", tasks=TASKS, episodes=2, policy="expert", out=tmp_path, workers=2,
                     image_size=32, videos=1, progress=False)
    results = evaluate(cfg)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == results
    assert set(results["tasks"]) == set(TASKS)
    for name, r in results["tasks"].items():
        assert r["episodes"] == 2 and r["successes"] == 2 and r["success_rate"] == 1.0, name
        assert r["ci95"][0] < 1.0 <= r["ci95"][1]
        assert 0 < r["mean_length"] < 500
        assert r["errors"] == 0
        assert all(EVAL_SEEDS.start <= s < EVAL_SEEDS.stop for s in r["seeds"])
        assert len(r["videos"]) == 1 and (tmp_path / r["videos"][0]).stat().st_size > 1000
        assert len(r["episode_goal_distance"]) == 2 and all(d >= 0 for d in r["episode_goal_distance"])
    assert max(results["tasks"]["reach-v3"]["episode_goal_distance"]) <= 0.05  # reach succeeds within 5 cm
    assert results["mean_success"] == 1.0
    assert results["episodes_per_task"] == 2 and isinstance(results["seed"], int)
    assert results["cameras"] == ["corner", "gripper"]  # the embodiment's, as none were chosen
    assert (tmp_path / "success.png").stat().st_size > 1000


@pytest.mark.parametrize("suite", ["fetch", "hand/reach", "pointmaze/bimodal", "pusht"])
def test_expert_through_eval_on_every_suite(tmp_path, suite):
    cfg = EvalConfig(suite=suite, episodes=1, policy="expert", out=tmp_path, workers=1, image_size=0,
                     progress=False)
    results = evaluate(cfg)
    for name, r in results["tasks"].items():
        assert r["errors"] == 0, r["error_examples"]
        assert r["successes"] == 1, name
        if suite == "pointmaze/bimodal":  # the ball ends inside the goal's 0.45 m radius
            assert 0 <= r["episode_goal_distance"][0] <= 0.45
        else:
            assert "episode_goal_distance" not in r  # suites without a goal distance leave it out


class CountingPolicy:
    """Zero actions in chunks of 4; counts how often it is asked."""

    calls = 0

    def __init__(self, env):
        self.dim = env.embodiment.action_dim

    def reset(self):
        pass

    def infer(self, obs):
        CountingPolicy.calls += 1
        return {"actions": np.zeros((4, self.dim))}


class WrongShape(CountingPolicy):
    def infer(self, obs):
        return np.zeros((4, self.dim + 3))


class NaNPolicy(CountingPolicy):
    def infer(self, obs):
        return np.full((2, self.dim), np.nan)


class Crashing(CountingPolicy):
    def infer(self, obs):
        raise RuntimeError("the model fell over")


def _eval(tmp_path, policy, **kw):
    cfg = EvalConfig(suite="metaworld/mt10", tasks=("reach-v3",), episodes=kw.pop("episodes", 2),
                     policy=f"{__name__}:{policy}", out=tmp_path, workers=1, image_size=16, videos=0,
                     max_steps=8, progress=False, **kw)
    return evaluate(cfg)["tasks"]["reach-v3"]


@pytest.mark.parametrize(("replan", "calls"), [(0, 2), (1, 8), (3, 3)])
def test_chunks_run_open_loop_or_replan(tmp_path, replan, calls):
    CountingPolicy.calls = 0
    r = _eval(tmp_path, "CountingPolicy", episodes=1, replan_every=replan)
    assert r["mean_length"] == 8
    assert CountingPolicy.calls == calls
    assert r["episode_goal_distance"][0] > 0.05  # a still arm has not reached the goal


@pytest.mark.parametrize(("policy", "message"), [
    ("WrongShape", "shape (4, 7); expected [H, 4]"), ("NaNPolicy", "non-finite"), ("Crashing", "fell over"),
])
def test_a_bad_policy_fails_its_episodes_with_a_reason(tmp_path, policy, message):
    r = _eval(tmp_path, policy)
    assert r["episodes"] == 2 and r["successes"] == 0 and r["errors"] == 2
    assert message in r["error_examples"][0]["error"]


def test_as_chunk():
    assert as_chunk(np.zeros(4), 4).shape == (1, 4)
    assert as_chunk({"actions": [[1, 2], [3, 4]]}, 2).shape == (2, 2)
    for bad in (np.zeros((2, 3)), np.zeros((0, 4)), np.zeros((1, 2, 4)), [[np.inf] * 4], {"x": 1}, "abc"):
        with pytest.raises(ActionError):
            as_chunk(bad, 4)


def test_unknown_policy_and_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        evaluate(EvalConfig(suite="metaworld/mt10", out=tmp_path, checkpoint=tmp_path / "nope", progress=False))
    r = _eval(tmp_path, "NoSuchPolicy", episodes=1)
    assert "cannot import policy factory" in r["error_examples"][0]["error"]

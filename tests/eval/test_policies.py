"""Policies `physis eval` runs: a checkpoint in this process, and the same checkpoint behind the policy server."""

import json
import shutil

import pytest

from physis.eval.policies import ServerPolicy
from physis.eval.runner import EvalConfig, checkpoint_cameras, evaluate
from physis.runtime import Policy
from physis.runtime.server import PolicyServer
from physis.sim import EnvConfig, make_env

# openpi's client calls websockets' connect() outside a `with`, which websockets >= 16 warns about
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    s = PolicyServer(Policy.from_checkpoint(tiny_checkpoint), port=0, checkpoint=str(tiny_checkpoint))
    s.start_in_thread()
    yield s
    s.stop()


def test_eval_through_the_server_matches_the_checkpoint_in_process(tiny_checkpoint, server, tmp_path):
    common = dict(suite="metaworld/mt10", tasks=("reach-v3",), episodes=2, image_size=32, max_steps=20,
                  replan_every=4, workers=1, videos=0, progress=False)
    remote = evaluate(EvalConfig(out=tmp_path / "remote", server=f"ws://127.0.0.1:{server.port}", **common))
    local = evaluate(EvalConfig(out=tmp_path / "local", checkpoint=tiny_checkpoint, **common))
    assert remote["policy"] == "server" and local["policy"] == "checkpoint"
    r, lo = remote["tasks"]["reach-v3"], local["tasks"]["reach-v3"]
    assert r["errors"] == 0, r["error_examples"]
    # the same weights, noise seeds and observations: the same episodes, step for step
    assert r["episode_length"] == lo["episode_length"] and r["episode_success"] == lo["episode_success"]


def test_server_policy_checks_the_address_and_the_robot(server):
    env = make_env("fetch", "reach", EnvConfig(render=False))
    try:
        with pytest.raises(ValueError, match="expected ws://HOST:PORT"):
            ServerPolicy(f"http://127.0.0.1:{server.port}", env)
        with pytest.raises(ValueError, match="serves embodiment 'metaworld_sawyer'; this suite's robot is 'fetch'"):
            ServerPolicy(f"ws://127.0.0.1:{server.port}", env)
    finally:
        env.close()


def test_eval_renders_the_cameras_the_checkpoint_was_trained_on(tiny_checkpoint, tmp_path):
    assert checkpoint_cameras(tiny_checkpoint, "metaworld_sawyer") == ("corner", "gripper")
    assert checkpoint_cameras(tiny_checkpoint, "pointmaze") == ()
    # the same weights, as if trained on the front camera: eval must render front, not the default corner
    run = shutil.copytree(tiny_checkpoint, tmp_path / "front-run")
    for config in run.glob("checkpoints/step_*/config.json"):
        meta = json.loads(config.read_text())
        meta["cameras"]["metaworld_sawyer"] = ["front", "gripper"]
        config.write_text(json.dumps(meta))
    common = dict(suite="metaworld/mt10", tasks=("reach-v3",), episodes=1, image_size=32, max_steps=4,
                  workers=1, videos=0, progress=False, checkpoint=run)
    r = evaluate(EvalConfig(out=tmp_path / "auto", **common))["tasks"]["reach-v3"]
    assert r["errors"] == 0, r["error_examples"]
    r = evaluate(EvalConfig(out=tmp_path / "told", cameras=("corner", "gripper"), **common))["tasks"]["reach-v3"]
    assert r["errors"] == 1 and "lacks cameras ['front']" in r["error_examples"][0]["error"]


@pytest.mark.parametrize(("execution", "replan", "plans"),
                         [("open_loop", 4, 3), ("ensemble", 4, 3), ("ensemble", 0, 12), ("rtc", 4, 3)])
def test_eval_runs_a_checkpoint_in_each_execution_mode(tiny_checkpoint, tmp_path, monkeypatch, execution, replan,
                                                       plans):
    inpainted = []  # per chunk planned: whether committed actions were passed in
    original = Policy.infer_batch

    def counting(self, observations, sessions, **kw):
        inpainted.append(kw.get("prefix_actions") is not None)
        return original(self, observations, sessions, **kw)

    monkeypatch.setattr(Policy, "infer_batch", counting)
    results = evaluate(EvalConfig(suite="metaworld/mt10", tasks=("reach-v3",), episodes=1, image_size=32, max_steps=12,
                                  workers=1, videos=0, progress=False, checkpoint=tiny_checkpoint,
                                  replan_every=replan, execution=execution, out=tmp_path))
    r = results["tasks"]["reach-v3"]
    assert r["errors"] == 0, r["error_examples"]
    assert r["mean_length"] == 12 and results["execution"] == execution
    assert len(inpainted) == plans
    assert inpainted == [False] + [execution == "rtc"] * (plans - 1)  # only rtc carries the committed actions


def test_execution_modes_need_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="--execution rtc runs a checkpoint's Policy in process"):
        evaluate(EvalConfig(suite="metaworld/mt10", out=tmp_path, execution="rtc", progress=False))

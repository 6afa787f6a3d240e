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

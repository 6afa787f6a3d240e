"""adroit/relocate: the Adroit hand relocate suite, its embodiment spec and its scripted expert."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("gymnasium_robotics")

from physis.data.reader import LeRobotDataset  # noqa: E402
from physis.embodiment import EmbodimentSpec, UnifiedSpace, load_embodiment  # noqa: E402
from physis.sim.adroit import INSTRUCTIONS, LABELS, N_JOINT_CMDS, AdroitRelocateEnv, make  # noqa: E402
from physis.sim.base import ActionError, EnvConfig  # noqa: E402
from physis.sim.collect import CollectConfig, collect  # noqa: E402
from physis.sim.seeds import eval_seeds  # noqa: E402
from physis.sim.suites import get_suite, make_env  # noqa: E402

SPEC = load_embodiment("adroit_hand")


@pytest.fixture(scope="module")
def env():
    e = make("relocate", EnvConfig(image_size=32))
    yield e
    e.close()


def neutral(palm: np.ndarray | None = None) -> np.ndarray:
    """An action at the middle of every joint command, with a palm-target channel."""
    return np.concatenate([np.zeros(N_JOINT_CMDS), np.zeros(3) if palm is None else palm])


def test_registered_and_constructs(env):
    assert get_suite("adroit/relocate").embodiment == "adroit_hand"
    assert env.suite == "adroit/relocate" and env.max_steps == 200
    assert env.action_space.shape == (N_JOINT_CMDS + 3,)
    obs, info = env.reset(seed=eval_seeds(1)[0])
    assert info == {"success": False} and obs["instruction"] == INSTRUCTIONS[0]
    assert list(obs["images"]) == ["front", "side"] == [c.name for c in SPEC.cameras]
    for img in obs["images"].values():
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and img.std() > 5
    assert list(obs["state"]) == [g.name for g in SPEC.state]
    for g in SPEC.state:
        assert obs["state"][g.name].shape == (g.size,) and obs["state"][g.name].dtype == np.float32
    np.testing.assert_allclose(obs["state"]["palm_pos"], env.palm_pos, atol=1e-6)
    assert env.observation_space.contains(obs)


def test_state_hides_the_ball_and_target(env):
    """Moving the ball and the target changes the images, never the state."""
    obs, _ = env.reset(seed=eval_seeds(2)[1])
    env.model.body_pos[env.ball_body, :2] += [0.1, 0.1]
    env.model.site_pos[env.target_site] += [0.1, -0.1, 0.05]
    env.raw.set_state(env.data.qpos.copy(), env.data.qvel.copy())  # recomputes positions
    moved = env.observe()
    for k in obs["state"]:
        np.testing.assert_array_equal(obs["state"][k], moved["state"][k])
    assert any(not np.array_equal(obs["images"][c], moved["images"][c]) for c in obs["images"])


def test_steps_apply_the_joints_and_ignore_the_palm_channel(env):
    seed = eval_seeds(3)[2]
    env.reset(seed=seed)
    for _ in range(3):
        a, _, _, _, info = env.step(neutral(np.array([0.5, -0.5, 0.5])))
    env.reset(seed=seed)
    for _ in range(3):
        b, _, _, _, _ = env.step(neutral())
    for k in a["state"]:  # the palm target is recorded, not executed
        np.testing.assert_array_equal(a["state"][k], b["state"][k])
    assert "distance" in info and info["distance"] > 0.1
    close = neutral()
    close[8:N_JOINT_CMDS] = 1.0  # every finger joint to the top of its range
    env.reset(seed=seed)
    for _ in range(10):
        c, *_ = env.step(close)
    assert np.linalg.norm(c["state"]["hand_joints"] - b["state"]["hand_joints"]) > 0.5  # the fingers moved
    with pytest.raises(ActionError, match="shape"):
        env.step(np.zeros(N_JOINT_CMDS))  # the palm channel is part of the action


def test_same_seed_same_episode_and_seeds_differ(env):
    seed = eval_seeds(4)[3]
    first, _ = env.reset(seed=seed)
    ball, target = env.ball_pos, env.target_pos
    env.step(neutral())
    again, _ = env.reset(seed=seed)
    np.testing.assert_array_equal(ball, env.ball_pos)
    np.testing.assert_array_equal(target, env.target_pos)
    np.testing.assert_array_equal(first["images"]["front"], again["images"]["front"])
    balls = set()
    for s in eval_seeds(5):
        env.reset(seed=s)
        balls.add(tuple(env.ball_pos.round(4)))
    assert len(balls) == 5


def test_paraphrases_and_cameras():
    e = make_env("adroit/relocate", config=EnvConfig(render=False, paraphrase=True))
    seen = {e.reset(seed=s)[0]["instruction"] for s in range(30)}
    assert seen <= set(INSTRUCTIONS) and len(seen) > 1
    e.close()
    with pytest.raises(ValueError, match="no camera 'wrist'"):
        make("relocate", EnvConfig(cameras=("wrist",)))
    with pytest.raises(ValueError, match="one task"):
        make("door", EnvConfig(render=False))


def run_expert(e: AdroitRelocateEnv, seed: int) -> tuple[bool, list[str], np.ndarray]:
    expert = e.expert()
    obs, _ = e.reset(seed=seed)
    expert.reset()
    labels, actions, done = [], [], False
    while not done:
        action, label = expert.act(obs)
        labels.append(label)
        actions.append(action)
        obs, _, terminated, truncated, _ = e.step(action)
        done = terminated or truncated
    return e.success, labels, np.array(actions)


def test_expert_solves_eval_seeds():
    e = make("relocate", EnvConfig(render=False))
    for seed in eval_seeds(4):
        success, labels, actions = run_expert(e, seed)
        assert success, f"expert failed on seed {seed}"
        assert len(labels) < e.max_steps
        assert actions.shape[1] == SPEC.action_dim and np.all(np.abs(actions) <= 1)
        order = list(dict.fromkeys(labels))  # phases in the order first seen
        assert order == ["hover above the ball", "descend", "close the hand", "lift", "carry it to the target"]
        assert e.ball_pos[2] > 0.07  # lifted off the table (its centre rests at 0.035), not pushed
    e.close()


def test_expert_holds_the_ball_at_the_target():
    e = make("relocate", EnvConfig(render=False, terminate_on_success=False))
    _, labels, _ = run_expert(e, eval_seeds(6)[5])
    assert labels[-1] == "hold" and set(labels) <= set(LABELS)
    assert np.linalg.norm(e.ball_pos - e.target_pos) < 0.03
    e.close()


def test_collected_dataset_carries_joint_commands_palm_target_and_labels(tmp_path):
    out = tmp_path / "demos"
    summary = collect(CollectConfig(suite="adroit/relocate", episodes=1, out=out, image_size=16, workers=1,
                                    progress=False))
    assert summary.episodes == 1
    ds = LeRobotDataset(out)
    names = ds.features["action"]["names"]
    assert ds.features["action"]["shape"] == [33] and names[:2] == ["A_ARTx", "A_ARTy"]
    assert names[N_JOINT_CMDS - 1] == "A_THJ0" and names[N_JOINT_CMDS:] == ["palm_dx", "palm_dy", "palm_dz"]
    assert set(ds.video_keys) == {"observation.images.front", "observation.images.side"}
    assert set(ds.subtasks) >= {"hover above the ball", "close the hand", "carry it to the target"}
    actions = np.stack([ds[i]["action"].numpy() for i in range(len(ds))])
    palm = actions[:, N_JOINT_CMDS:]
    assert np.all(np.linalg.norm(palm, axis=1) > 0) and np.all(np.abs(palm) < 0.2)  # a real, bounded channel
    assert actions[:, 8:N_JOINT_CMDS].std(axis=0).max() > 0.5  # the fingers open and close
    meta = json.loads((out / "meta" / "embodiment.json").read_text())
    assert EmbodimentSpec.from_dict(meta) == SPEC


def test_embodiment_spec_round_trips_and_lines_up(tmp_path):
    for suffix in (".yaml", ".json"):
        path = tmp_path / f"adroit{suffix}"
        SPEC.save(path)
        assert load_embodiment(path) == SPEC
    assert (SPEC.action_dim, SPEC.state_dim) == (33, 66)
    space = UnifiedSpace.for_specs([SPEC, load_embodiment("fetch"), load_embodiment("shadow_hand")])
    act = space.action_map(SPEC).index
    eef = space.block("eef_pos")
    # the palm target shares the grippers' end-effector slots
    np.testing.assert_array_equal(act[N_JOINT_CMDS:], space.action_map(load_embodiment("fetch")).index[:3])
    assert all(eef.start <= i < eef.stop for i in act[N_JOINT_CMDS:])
    # the hand actuators of both hands sit in the same slots where they drive the same joints
    shadow = space.action_map(load_embodiment("shadow_hand")).index
    adroit_names = SPEC.action_names
    shadow_order = ["A_WRJ1", "A_WRJ0", "A_FFJ3", "A_FFJ2", "A_FFJ1", "A_MFJ3", "A_MFJ2", "A_MFJ1", "A_RFJ3", "A_RFJ2",
                    "A_RFJ1", "A_LFJ4", "A_LFJ3", "A_LFJ2", "A_LFJ1", "A_THJ4", "A_THJ3", "A_THJ2", "A_THJ1", "A_THJ0"]
    for k, name in enumerate(shadow_order):
        assert act[adroit_names.index(name)] == shadow[k], name
    # and the 24 hand joint positions in the state share shadow_hand's joint_pos slots
    np.testing.assert_array_equal(space.state_map(SPEC).index[9:33],
                                  space.state_map(load_embodiment("shadow_hand")).index[:24])

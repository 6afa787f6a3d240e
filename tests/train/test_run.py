"""`physis train` as a command: what it validates up front, and what a chosen camera subset leaves behind."""

import dataclasses
import json

import numpy as np
import pytest

from physis.cli import main
from physis.data.reader import LeRobotDataset
from physis.runtime import Policy, example_observation
from physis.train.checkpoint import load_checkpoint
from physis.train.run import train
from tests.conftest import TASKS


def test_a_negative_image_shift_is_refused_before_any_data_is_read(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"), "--image-shift", "-2"])
    assert e.value.code == 2
    assert "--image-shift must be 0 (off) or a positive number of pixels, got -2" in capsys.readouterr().out


def test_training_on_a_camera_subset_gives_a_policy_that_asks_for_those_cameras(tiny_run, tmp_path):
    _, cmd, _ = tiny_run
    sub = dataclasses.replace(cmd, out=tmp_path / "gripper-only", steps=1, save_every=1, cameras=("gripper",))
    train(sub)
    obs = example_observation(sub.out)
    assert list(obs["images"]) == ["gripper"]
    policy = Policy.from_checkpoint(sub.out)
    assert policy.infer(obs)["actions"].shape[0] == cmd.horizon


def test_a_keypoint_only_camera_is_named_and_saved_by_slot(tiny_run, tmp_path):
    _, cmd, _ = tiny_run
    run = dataclasses.replace(cmd, out=tmp_path / "kp-only", steps=1, save_every=1, keypoints=4,
                              keypoint_only_cameras=("gripper",))
    train(run)
    config = load_checkpoint(run.out, training_state=False).config
    cameras = next(iter(config["cameras"].values()))
    assert config["model"]["keypoint_only_cameras"] == [cameras.index("gripper")]
    obs = example_observation(run.out)
    assert "gripper" in obs["images"]  # the policy still asks for it
    assert Policy.from_checkpoint(run.out).infer(obs)["actions"].shape[0] == cmd.horizon
    from physis.train.run import TrainSetupError, build

    with pytest.raises(TrainSetupError, match="--keypoint-only-cameras side: each dataset must have this camera"):
        build(dataclasses.replace(run, keypoint_only_cameras=("side",)))
    with pytest.raises(TrainSetupError, match="set --keypoints too"):
        build(dataclasses.replace(run, keypoints=None))


@pytest.mark.parametrize(("localizer", "localizer_state", "relative", "teacher", "near"),
                         [(False, False, False, 0.0, 0.0), (True, False, False, 0.0, 0.0),
                          (True, True, False, 0.0, 0.0), (True, False, True, 0.5, 0.04)])
def test_the_environment_state_head_trains_from_collected_data_and_the_policy_ignores_it(tiny_run, tmp_path, localizer,
                                                                                        localizer_state, relative,
                                                                                        teacher, near):
    _, cmd, _ = tiny_run
    aux = dataclasses.replace(cmd, out=tmp_path / "aux", steps=2, save_every=2, env_state_weight=2.0,
                              first_frames_weight=3.0, localizer=localizer, keypoints=4 if localizer else None,
                              localizer_state=localizer_state, env_state_relative=relative,
                              localizer_teacher=teacher, env_state_near=near)
    summary = train(aux)
    assert "env_state" in summary["final_losses"]
    config = load_checkpoint(aux.out, training_state=False).config
    assert config["model"]["env_state_dim"] == 6 * (1 + relative + (near > 0))
    assert config["model"]["env_state_weight"] == 2.0
    assert config["data"]["env_state_relative"] is relative and config["data"]["env_state_near"] == near
    assert config["model"]["localizer"] is localizer
    assert config["model"]["localizer_state"] is localizer_state
    assert config["model"]["localizer_teacher"] == teacher
    assert config["sampling"] == {"first_frames": 8, "first_frames_weight": 3.0, "env_state_first_frames": False,
                                  "env_state_at_rest": 0.0}
    world = ["object_x", "object_y", "object_z", "goal_x", "goal_y", "goal_z"]
    assert config["env_state_names"] == world + ([f"{n}-robot" for n in world] if relative else []) + \
        ([f"{n}-robot-near" for n in world] if near else [])
    obs = example_observation(aux.out)
    assert "environment_state" not in json.dumps(sorted(obs))  # never a policy input
    assert Policy.from_checkpoint(aux.out).infer(obs)["actions"].shape[0] == cmd.horizon

    from physis.eval.heads import HeadsConfig, evaluate_heads

    r = evaluate_heads(HeadsConfig(checkpoint=aux.out, data=cmd.data[0], out=tmp_path / "heads", samples=8,
                                   batch_size=4, strip=1, progress=False, near_object=0.1 if relative else 0.0))
    names = config["env_state_names"]
    assert list(r["env_state_mae"]) == names and list(r["env_state_mean_baseline_mae"]) == names
    assert all(np.isfinite(v) and v >= 0 for v in r["env_state_mae"].values())
    assert max(r["env_state_mean_baseline_mae"].values()) < 1.0  # metres: rescaled from normalized units
    assert r["env_state_first_frames"] == 1  # every episode's first frame, and nothing else
    assert r["env_state_first_frames_samples"] == len(LeRobotDataset(cmd.data[0]).episodes) > 0
    assert list(r["env_state_first_frames_mae"]) == names
    assert all(np.isfinite(v) and v >= 0 for v in r["env_state_first_frames_mean_baseline_mae"].values())
    by_task = r["env_state_first_frames_by_task"]  # the demos were collected: collection.json names each task
    assert sorted(by_task) == sorted(TASKS) and all(t["episodes"] == 1 for t in by_task.values())
    assert list(by_task["reach-v3"]["mae"]) == names
    pull = r["env_state_first_frames_hand_pull"]  # needs the object-minus-hand values
    assert (sorted(pull) == ["object_x", "object_y", "object_z"]) if relative else pull is None
    if localizer:  # the first chunk with the localizer's estimate and with the true state in its token
        assert set(r["first_frames_action_mse"]) == {"estimate", "true_env_state"}
        assert all(np.isfinite(v) and v >= 0 for v in r["first_frames_action_mse"].values())
        assert set(by_task["reach-v3"]["action_mse"]) == {"estimate", "true_env_state"}
    else:
        assert "first_frames_action_mse" not in r and "action_mse" not in by_task["reach-v3"]
    if relative:  # the frames where the hand is within 10 cm of the object, counted here from the raw columns
        from physis.data.relative import robot_position
        from physis.embodiment import load_embodiment

        demos = LeRobotDataset(cmd.data[0])
        hand = np.asarray(demos.columns["observation.state"])[:, robot_position(load_embodiment("metaworld_sawyer"))]
        gap = np.linalg.norm(np.asarray(demos.columns["observation.environment_state"])[:, :3] - hand, axis=-1)
        assert r["env_state_near_object"] == 0.1
        assert r["env_state_near_object_samples"] == int((gap < 0.1).sum()) > 0
        assert list(r["env_state_near_object_mae"]) == names
        assert sum(t["frames"] for t in r["env_state_near_object_by_task"].values()) == int((gap < 0.1).sum())
        assert set(r["near_object_action_mse"]) == {"estimate", "true_env_state"}
    else:
        assert "env_state_near_object" not in r
        with pytest.raises(ValueError, match="trained without --env-state-relative"):
            evaluate_heads(HeadsConfig(checkpoint=aux.out, data=cmd.data[0], out=tmp_path / "heads", samples=4,
                                       batch_size=4, progress=False, first_frames=0, near_object=0.1))


def test_the_environment_state_head_needs_data_that_records_it(tmp_path):
    from physis.data.synthetic import features_for, synthetic_episode
    from physis.data.writer import DatasetWriter
    from physis.embodiment import load_embodiment
    from physis.train.run import TrainCommand, TrainSetupError, build

    spec = load_embodiment("pusht")
    with DatasetWriter.create(tmp_path / "d", fps=int(spec.fps), features=features_for(spec, (32, 32)),
                              robot_type="pusht") as w:
        w.add_episode(synthetic_episode(spec, 20, np.random.default_rng(0), (32, 32)), task="push")
    cmd = TrainCommand(data=(tmp_path / "d",), out=tmp_path / "run", preset="tiny", image_size=32,
                       env_state_weight=1.0)
    with pytest.raises(TrainSetupError, match="record observation.environment_state"):
        build(cmd)
    with pytest.raises(TrainSetupError, match="must be >= 0"):
        build(dataclasses.replace(cmd, env_state_weight=-1.0))
    with pytest.raises(TrainSetupError, match="set --env-state-weight too"):
        build(dataclasses.replace(cmd, env_state_weight=0.0, keypoints=8, localizer=True))
    with pytest.raises(TrainSetupError, match="set --keypoints K too"):
        build(dataclasses.replace(cmd, localizer=True))
    with pytest.raises(TrainSetupError, match="set --localizer too"):
        build(dataclasses.replace(cmd, localizer_state=True))
    with pytest.raises(TrainSetupError, match="--localizer-teacher replaces"):
        build(dataclasses.replace(cmd, localizer_teacher=0.5))
    with pytest.raises(TrainSetupError, match="--localizer-teacher must be a fraction"):
        build(dataclasses.replace(cmd, keypoints=8, localizer=True, localizer_teacher=2.0))
    with pytest.raises(TrainSetupError, match="--env-state-relative extends"):
        build(dataclasses.replace(cmd, env_state_weight=0.0, env_state_relative=True))
    with pytest.raises(TrainSetupError, match="--env-state-near .* without --env-state-relative"):
        build(dataclasses.replace(cmd, env_state_weight=1.0, env_state_near=0.04))
    with pytest.raises(TrainSetupError, match="--env-state-near takes a positive distance"):
        build(dataclasses.replace(cmd, env_state_weight=1.0, env_state_relative=True, env_state_near=-1.0))
    with pytest.raises(TrainSetupError, match="--first-frames-weight must be a positive number"):
        build(dataclasses.replace(cmd, first_frames_weight=0.0))
    with pytest.raises(TrainSetupError, match="--first-frames must be >= 1"):
        build(dataclasses.replace(cmd, first_frames=0))
    with pytest.raises(TrainSetupError, match="set --env-state-weight too"):
        build(dataclasses.replace(cmd, env_state_weight=0.0, env_state_first_frames=True))
    with pytest.raises(TrainSetupError, match="--env-state-at-rest must be a distance"):
        build(dataclasses.replace(cmd, env_state_at_rest=-0.01))
    with pytest.raises(TrainSetupError, match="--env-state-at-rest restricts"):
        build(dataclasses.replace(cmd, env_state_weight=0.0, env_state_at_rest=0.01))


def test_a_world_model_fraction_trains_and_is_saved_and_bad_ones_are_refused(tiny_run, tmp_path, capsys):
    _, cmd, _ = tiny_run
    thin = dataclasses.replace(cmd, out=tmp_path / "thin", steps=2, save_every=2, world_model_fraction=0.5)
    summary = train(thin)
    assert "world_model" in summary["final_losses"] and "recon" in summary["final_losses"]
    assert load_checkpoint(thin.out, training_state=False).config["model"]["world_model_fraction"] == 0.5
    for args, message in ((["--world-model-fraction", "0"], "--world-model-fraction must be in (0, 1], got 0.0"),
                          (["--world-model-fraction", "0.5", "--no-world-model"], "drop --no-world-model")):
        with pytest.raises(SystemExit) as e:
            main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"), *args])
        assert e.value.code == 2
        assert message in " ".join(capsys.readouterr().out.split())  # the console wraps long lines


def test_posttraining_on_driven_episodes_keeps_the_checkpoint_s_normalization(tiny_run, tmp_path):
    from physis.sim.collect import CollectConfig, collect
    from physis.train.run import build

    root, cmd, _ = tiny_run
    driven = tmp_path / "driven"
    collect(CollectConfig(suite="metaworld/mt10", tasks=("reach-v3",), episodes=1, out=driven, image_size=32,
                          workers=1, progress=False, driver=root / "run", replan_every=4))
    mixture = dataclasses.replace(cmd, data=(root / "demos", driven), out=tmp_path / "post", steps=1)
    base = load_checkpoint(root / "run", training_state=False).stats
    _, fresh, _ = build(mixture)
    assert fresh.stats != base  # from scratch, the statistics pool both datasets ...
    _, post, _ = build(dataclasses.replace(mixture, recipe="posttrain", init_from=root / "run"))
    assert post.stats == base  # ... posttraining keeps those the weights were trained with
    # a driven episode may end in failure: frame / length is no progress target for it
    assert post._progress_known.tolist() == [True, False]

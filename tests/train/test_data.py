"""Datasets -> model batches: keys, shapes, masks, progress, and batches as a pure function of (seed, step)."""

import numpy as np
import pytest
import torch

from physis.data.layout import DatasetFormatError
from physis.sim.collect import CollectConfig, collect
from physis.train.data import DataConfig, StepBatchSampler, TrainingData, embodiment_for


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    out = tmp_path_factory.mktemp("demos") / "mt10"
    collect(CollectConfig(suite="metaworld/mt10", tasks=("reach-v3", "drawer-close-v3"), episodes=1, out=out,
                          image_size=32, workers=1, progress=False))
    return out


@pytest.fixture(scope="module")
def data(demos):
    return TrainingData([demos], DataConfig(horizon=8, image_size=32, history=2))


def test_batch_has_the_model_keys_and_shapes(data):
    batch = next(data.batches(batch_size=4, seed=0, steps=1))
    a, s = data.space.dim, data.space.dim
    assert batch["images"].shape == (4, 2, 2, 3, 32, 32) and batch["images"].dtype == torch.float32
    assert batch["images"].min() >= 0.0 and batch["images"].max() <= 1.0
    assert batch["image_mask"].all()
    assert batch["state"].shape == (4, s) and batch["state_mask"].sum(1).eq(4).all()
    assert batch["actions"].shape == (4, 8, a) and batch["action_mask"].sum(1).eq(4).all()
    assert (batch["actions"][:, :, ~batch["action_mask"][0]] == 0).all()
    assert batch["text"].shape[0] == 4 and batch["text"].shape[2] == 384 and batch["text_mask"].any(1).all()
    assert batch["subtask_tokens"].shape == (4, 12) and batch["subtask_valid"].all()
    assert batch["future_images"].shape == (4, 2, 3, 32, 32)
    assert ((batch["progress"] >= 0) & (batch["progress"] <= 1)).all()
    assert batch["embodiment"].tolist() == [0, 0, 0, 0]
    assert batch["env_state"].shape == (4, 6) and batch["env_state_mask"].all()  # a training target only


def test_batches_are_a_function_of_seed_and_step(data):
    full = list(data.batches(batch_size=3, seed=7, steps=4))
    resumed = list(data.batches(batch_size=3, seed=7, steps=4, start_step=2))
    for a, b in zip(full[2:], resumed, strict=True):
        torch.testing.assert_close(a["actions"], b["actions"])
        torch.testing.assert_close(a["images"], b["images"])
    other = next(data.batches(batch_size=3, seed=8, steps=1))
    assert not torch.equal(other["actions"], full[0]["actions"])


def test_meta_describes_the_inputs(data, demos):
    meta = data.meta()
    assert meta["cameras"] == {"metaworld_sawyer": ["corner", "gripper"]}
    assert meta["embodiments"][0]["name"] == "metaworld_sawyer"
    assert set(meta["stats"]["metaworld_sawyer"]["stats"]) == {"observation.state", "action",
                                                               "observation.environment_state"}
    assert embodiment_for(demos).name == "metaworld_sawyer"


def test_shifted_batches_are_still_a_function_of_seed_and_step(data):
    plain = list(data.batches(batch_size=3, seed=7, steps=3))
    full = list(data.batches(batch_size=3, seed=7, steps=3, image_shift=4))
    resumed = list(data.batches(batch_size=3, seed=7, steps=3, start_step=1, image_shift=4))
    for a, b in zip(full[1:], resumed, strict=True):
        torch.testing.assert_close(a["images"], b["images"])
        torch.testing.assert_close(a["future_images"], b["future_images"])
    assert not torch.equal(plain[0]["images"], full[0]["images"])
    torch.testing.assert_close(plain[0]["actions"], full[0]["actions"])  # only the pixels move


def test_a_chosen_camera_subset_in_slot_order(data, demos):
    only = TrainingData([demos], DataConfig(horizon=8, image_size=32, history=2, cameras=("gripper",)))
    assert only.num_cameras == 1 and only.meta()["cameras"] == {"metaworld_sawyer": ["gripper"]}
    both = next(data.batches(batch_size=2, seed=3, steps=1))
    one = next(only.batches(batch_size=2, seed=3, steps=1))
    assert one["images"].shape == (2, 1, 2, 3, 32, 32)
    torch.testing.assert_close(one["images"][:, 0], both["images"][:, 1])  # gripper is slot 1 of the sorted pair
    swapped = TrainingData([demos], DataConfig(horizon=8, image_size=32, history=2, cameras=("gripper", "corner")))
    assert swapped.meta()["cameras"] == {"metaworld_sawyer": ["gripper", "corner"]}


def test_a_camera_the_dataset_lacks_is_named(demos):
    with pytest.raises(DatasetFormatError, match="front"):
        TrainingData([demos], DataConfig(horizon=8, image_size=32, cameras=("front",)))


def test_the_first_frames_of_each_episode_can_be_drawn_more_often(data):
    frame = np.asarray(data.mixture.datasets[0].columns["frame_index"])
    share = (frame < 8).mean()

    def drawn(weight):
        sampler = StepBatchSampler(data.mixture, 64, seed=3, start_step=0, steps=40, first_frames=8,
                                   first_frames_weight=weight)
        return np.concatenate([np.array(b) for b in sampler])

    uniform, boosted = drawn(1.0), drawn(5.0)
    assert abs((frame[uniform] < 8).mean() - share) < 0.05
    expected = 5 * share / (5 * share + 1 - share)
    assert abs((frame[boosted] < 8).mean() - expected) < 0.05
    assert np.array_equal(boosted, drawn(5.0))  # still a pure function of (seed, step)
    assert boosted.min() >= 0 and boosted.max() < len(frame)


def test_the_environment_state_target_can_be_kept_to_the_first_frames(data):
    plain = next(data.batches(batch_size=16, seed=5, steps=1))
    first = next(data.batches(batch_size=16, seed=5, steps=1, first_frames=8, env_state_first_frames=True))
    torch.testing.assert_close(plain["actions"], first["actions"])  # the same draws, only the mask differs
    frames = np.asarray(data.mixture.datasets[0].columns["frame_index"])
    drawn = next(iter(StepBatchSampler(data.mixture, 16, seed=5, start_step=0, steps=1)))
    early = torch.from_numpy(frames[drawn] < 8)
    assert torch.equal(first["env_state_mask"], plain["env_state_mask"] & early[:, None])
    assert early.any() and (~early).any()


def test_episode_openings_carry_no_progress_target(demos, tmp_path):
    openings = tmp_path / "openings"
    collect(CollectConfig(suite="metaworld/mt10", tasks=("reach-v3",), episodes=2, out=openings, image_size=32,
                          workers=1, progress=False, max_frames=4))
    mixed = TrainingData([demos, openings], DataConfig(horizon=8, image_size=32))
    sampler = StepBatchSampler(mixed.mixture, 32, seed=3, start_step=0, steps=1)
    offsets = np.cumsum([0] + [len(d) for d in mixed.mixture.datasets])
    raw_source = np.searchsorted(offsets, next(iter(sampler)), side="right") - 1
    batch = next(mixed.batches(batch_size=32, seed=3, steps=1))
    assert torch.equal(batch["progress_valid"], torch.from_numpy(raw_source == 0))
    assert (raw_source == 0).any() and (raw_source == 1).any()


def test_datasets_of_one_robot_share_pooled_normalization(demos, tmp_path):
    openings = tmp_path / "openings"
    collect(CollectConfig(suite="metaworld/mt10", tasks=("reach-v3",), episodes=2, out=openings, image_size=32,
                          workers=1, progress=False, max_frames=4))
    alone = TrainingData([openings], DataConfig(horizon=8, image_size=32))
    mixed = TrainingData([demos, openings], DataConfig(horizon=8, image_size=32))
    name = mixed.embodiments[0].name
    assert list(mixed.stats) == [name]  # one set per robot: the set a policy un-normalizes with
    pooled = mixed.stats[name]["stats"]["observation.state"]
    own = [alone.mixture.datasets[0].stats["observation.state"], mixed.mixture.datasets[0].stats["observation.state"]]
    assert not np.allclose(own[0]["mean"], own[1]["mean"])  # the openings alone differ from whole episodes
    counts = [float(o["count"][0]) for o in own]
    np.testing.assert_allclose(pooled["mean"], (counts[0] * own[0]["mean"] + counts[1] * own[1]["mean"]) / sum(counts))
    # Both sources are normalized with the pooled statistics: the hand's xyz of whole episodes, too.
    state = np.asarray(mixed.mixture[0]["observation.state"]).reshape(-1)[:3]
    raw = np.asarray(mixed.mixture.datasets[0][0]["observation.state"]).reshape(-1)[:3]
    mean, std = np.asarray(pooled["mean"])[:3], np.asarray(pooled["std"])[:3]
    np.testing.assert_allclose(state, (raw - mean) / std, atol=1e-4)


def test_the_object_target_can_be_kept_to_the_frames_where_it_rests(data):
    names = data.env_state_names
    env = np.asarray(data.mixture.datasets[0].columns["observation.environment_state"])
    episode = np.asarray(data.mixture.datasets[0].columns["episode_index"])
    first = {e: np.flatnonzero(episode == e)[0] for e in set(episode.tolist())}
    moved = np.linalg.norm(env[:, :3] - env[[first[e] for e in episode.tolist()], :3], axis=1) > 0.01
    assert np.array_equal(data.object_at_rest(0.01), ~moved)
    assert moved.any() and (~moved).any()  # drawer-close moves its object, reach leaves the puck where it is

    plain = next(data.batches(batch_size=32, seed=5, steps=1))
    rest = next(data.batches(batch_size=32, seed=5, steps=1, env_state_at_rest=0.01))
    torch.testing.assert_close(plain["env_state"], rest["env_state"])  # the same draws, only the mask differs
    drawn = np.asarray(next(iter(StepBatchSampler(data.mixture, 32, seed=5, start_step=0, steps=1))))
    is_object = torch.tensor([n.startswith("object_") for n in names])
    expected = plain["env_state_mask"] & ~(torch.from_numpy(moved[drawn])[:, None] & is_object)
    assert torch.equal(rest["env_state_mask"], expected)
    assert moved[drawn].any() and not rest["env_state_mask"].all()
    assert rest["env_state_mask"][:, ~is_object].all()  # the goal keeps its target everywhere
    with pytest.raises(ValueError, match="positive distance"):
        data.object_at_rest(0.0)

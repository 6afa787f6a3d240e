import numpy as np
import pytest
import torch

from physis.data.mixture import DatasetMixture, MixtureSource
from physis.data.synthetic import features_for, synthetic_episode
from physis.data.writer import DatasetWriter
from physis.embodiment import load_embodiment


def make(root, name, episodes, length, size):
    spec = load_embodiment(name)
    rng = np.random.default_rng(0)
    with DatasetWriter.create(root, fps=int(spec.fps), features=features_for(spec, size), robot_type=name) as w:
        for _ in range(episodes):
            w.add_episode(synthetic_episode(spec, length, rng, size), task=f"{name} task")
    return spec


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    sawyer = make(d / "sawyer", "metaworld_sawyer", 2, 10, (32, 32))  # 80 fps, 2 cameras
    pusht = make(d / "pusht", "pusht", 2, 30, (48, 48))  # 10 fps, 1 camera, another image size
    return DatasetMixture([MixtureSource(d / "sawyer", sawyer, weight=3.0),
                           MixtureSource(d / "pusht", pusht, normalize={"action": "min_max"})],
                          history=2, chunk=4, image_size=(32, 32), cache_dir=d / "cache")


def test_samples_share_one_unified_layout(mixture):
    a, b = mixture[0], mixture[25]
    assert (a["embodiment"], b["embodiment"]) == ("metaworld_sawyer", "pusht")
    for s in (a, b):
        assert s["action"].shape == (4, mixture.space.dim) and s["observation.state"].shape == (2, mixture.space.dim)
        assert s["observation.images"].shape == (2, 2, 3, 32, 32)
    assert a["action_mask"].sum() == 4 and b["action_mask"].sum() == 2
    assert a["image_mask"].tolist() == [True, True] and b["image_mask"].tolist() == [True, False]
    assert torch.all(b["observation.images"][1] == 0)
    assert not (a["action_mask"] & b["action_mask"]).any()  # eef/gripper vs planar slots
    assert torch.all(a["action"][:, ~a["action_mask"]] == 0)
    assert b["action"][:, b["action_mask"]].abs().max() <= 1.0 + 1e-6  # normalized with pusht's own stats


def test_windows_count_frames_of_each_dataset(mixture):
    s = mixture[20]  # pusht episode 0, frame 0
    assert s["state_is_pad"].tolist() == [True, False]
    s = mixture[18]  # sawyer episode 1, frame 8 of 10
    assert s["action_is_pad"].tolist() == [False, False, True, True]


def test_sampler_follows_weights(mixture):
    sampler = mixture.sampler(4000, generator=torch.Generator().manual_seed(0))
    sources = [mixture.locate(i)[0] for i in sampler]
    assert np.mean(np.array(sources) == 0) == pytest.approx(0.75, abs=0.03)


def test_batches_collate(mixture):
    loader = torch.utils.data.DataLoader(mixture, batch_size=6, sampler=mixture.sampler(6))
    batch = next(iter(loader))
    assert batch["action"].shape == (6, 4, mixture.space.dim) and len(batch["embodiment"]) == 6


def test_bad_sources(tmp_path, mixture):
    with pytest.raises(ValueError, match="weights must be positive"):
        DatasetMixture([MixtureSource(mixture.sources[0].root, mixture.sources[0].embodiment, weight=0)])
    with pytest.raises(ValueError, match="expects \\[2\\]"):
        DatasetMixture([MixtureSource(mixture.sources[0].root, load_embodiment("pusht"))])


def test_environment_state_is_padded_to_the_widest_source_with_a_mask(tmp_path):
    spec = load_embodiment("pusht")
    rng = np.random.default_rng(0)
    feats = {**features_for(spec, (16, 16)),
             "observation.environment_state": {"dtype": "float32", "shape": [3], "names": ["x", "y", "z"]}}
    with DatasetWriter.create(tmp_path / "with", fps=int(spec.fps), features=feats, robot_type="pusht") as w:
        ep = synthetic_episode(spec, 12, rng, (16, 16))
        w.add_episode({**ep, "observation.environment_state": rng.normal(5.0, 2.0, (12, 3)).astype(np.float32)},
                      task="t")
    make(tmp_path / "without", "pusht", 1, 12, (16, 16))
    norm = {"observation.environment_state": "mean_std", "action": "min_max"}
    mix = DatasetMixture([MixtureSource(tmp_path / "with", spec, normalize=norm),
                          MixtureSource(tmp_path / "without", spec, normalize=norm)],
                         chunk=2, image_size=(16, 16), cache_dir=tmp_path / "cache")
    assert mix.env_state_dim == 3
    a, b = mix[0], mix[12]
    assert a["env_state_mask"].tolist() == [True] * 3 and b["env_state_mask"].tolist() == [False] * 3
    assert torch.all(b["observation.environment_state"] == 0)
    values = torch.stack([mix[i]["observation.environment_state"] for i in range(12)])
    assert values.mean(0).abs().max() < 1e-4  # normalized with the source's own statistics
    only = DatasetMixture([MixtureSource(tmp_path / "without", spec, normalize=norm)], chunk=2, image_size=(16, 16),
                          cache_dir=tmp_path / "cache")
    assert only.env_state_dim == 0 and "observation.environment_state" not in only[0]

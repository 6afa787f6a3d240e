import numpy as np
import pytest
import torch

from physis.data.stats import (
    NormalizationError,
    Normalizer,
    RunningStats,
    compute_stats,
    image_values,
    merge_stats,
)


def test_running_stats_match_numpy_exactly_below_reservoir_size():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (5000, 4)) * [1, 10, 0.1, 1]
    rs = RunningStats(reservoir=10_000)
    for part in np.array_split(x, 7):
        rs.update(part)
    s = rs.result()
    np.testing.assert_allclose(s["mean"], x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s["std"], x.std(0), rtol=1e-10)
    np.testing.assert_array_equal(s["min"], x.min(0))
    np.testing.assert_array_equal(s["max"], x.max(0))
    for name, q in (("q01", 0.01), ("q10", 0.1), ("q50", 0.5), ("q90", 0.9), ("q99", 0.99)):
        np.testing.assert_allclose(s[name], np.quantile(x, q, axis=0))
    assert s["count"].tolist() == [5000]


def test_running_stats_quantiles_from_reservoir_are_close():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (200_000, 2))
    rs = RunningStats(reservoir=20_000, seed=3)
    for part in np.array_split(x, 50):
        rs.update(part)
    s = rs.result()
    np.testing.assert_allclose(s["q01"], 0.01, atol=0.004)
    np.testing.assert_allclose(s["q99"], 0.99, atol=0.004)
    np.testing.assert_allclose(s["mean"], x.mean(0), rtol=1e-12)


def test_image_stats_are_per_channel_in_unit_range():
    frames = np.zeros((4, 8, 8, 3), np.uint8)
    frames[..., 0] = 255
    frames[..., 1] = 51
    s = compute_stats(image_values(frames), is_image=True)
    assert s["mean"].shape == (3, 1, 1)
    np.testing.assert_allclose(s["mean"].ravel(), [1.0, 0.2, 0.0])


def test_merge_stats_pools_mean_and_std():
    rng = np.random.default_rng(2)
    a, b = rng.normal(0, 1, (300, 3)), rng.normal(5, 2, (100, 3))
    m = merge_stats([compute_stats(a), compute_stats(b)])
    both = np.concatenate([a, b])
    np.testing.assert_allclose(m["mean"], both.mean(0))
    np.testing.assert_allclose(m["std"], both.std(0))
    assert m["count"].tolist() == [400]


@pytest.mark.parametrize("mode", ["mean_std", "min_max", "quantile"])
def test_normalizer_round_trip_numpy_and_torch(mode):
    rng = np.random.default_rng(4)
    x = rng.normal(2, 3, (1000, 3)).astype(np.float32)
    norm = Normalizer({"action": compute_stats(x)}, {"action": mode})
    y = norm({"action": x, "task": "keep me"})["action"]
    if mode == "mean_std":
        np.testing.assert_allclose(y.mean(0), 0, atol=1e-4)
    if mode == "min_max":
        np.testing.assert_allclose([y.min(), y.max()], [-1, 1], atol=1e-5)
    if mode == "quantile":
        assert (np.abs(y) <= 1).mean() == pytest.approx(0.98, abs=0.01)
    np.testing.assert_allclose(norm.unnormalize({"action": y})["action"], x, rtol=1e-4, atol=1e-4)
    t = norm({"action": torch.from_numpy(x)})["action"]
    assert isinstance(t, torch.Tensor)
    np.testing.assert_allclose(t.numpy(), y, rtol=1e-5, atol=1e-6)


def test_normalizer_refuses_missing_stats_and_missing_features():
    stats = {"action": compute_stats(np.ones((3, 2)))}
    with pytest.raises(NormalizationError, match="feature 'observation.state' has no statistics"):
        Normalizer(stats, {"observation.state": "mean_std"})
    with pytest.raises(NormalizationError, match="needs stats \\['q01', 'q99'\\]"):
        Normalizer({"action": {"mean": np.zeros(2), "std": np.ones(2)}}, {"action": "quantile"})
    norm = Normalizer(stats, {"action": "min_max"})
    with pytest.raises(NormalizationError, match="sample has no feature 'action'"):
        norm({"observation.state": np.zeros(2)})
    with pytest.raises(ValueError, match="unknown normalization mode"):
        Normalizer(stats, {"action": "zscore"})

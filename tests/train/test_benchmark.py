"""`physis bench train`: the training step's samples/s, the loader's, and where a step goes."""

from __future__ import annotations

import dataclasses
import json

import pytest

from physis.train.benchmark import TrainBenchConfig, run


def test_bench_train_times_the_real_step_and_writes_results(tiny_run, tmp_path):
    _, cmd, _ = tiny_run
    cfg = TrainBenchConfig(**{f.name: getattr(cmd, f.name) for f in dataclasses.fields(cmd)})
    cfg = dataclasses.replace(cfg, out=tmp_path / "bench", env_state_weight=1.0, keypoints=4, localizer=True,
                              timed_steps=3, warmup_steps=1, profile_steps=1)
    r = run(cfg)
    assert r["parameters"] > 0 and r["batch_size"] == cmd.batch_size
    assert 0 < r["step_ms"]["min"] <= r["step_ms"]["p50"] <= r["step_ms"]["max"]
    assert r["samples_per_s"] == pytest.approx(cmd.batch_size / r["step_ms"]["p50"] * 1e3)
    assert r["loader_samples_per_s"] > 0 and r["peak_rss_mb"] > 0
    assert r["config"]["localizer"] is True  # the flags of `physis train`, as given
    ops = r["operations"]
    assert 0 < len(ops) <= 12 and all(0 <= op["share"] <= 1 for op in ops)
    assert any("mm" in op["name"] or "conv" in op["name"] for op in ops)  # the arithmetic shows up
    assert json.loads((tmp_path / "bench" / "results.json").read_text()) == r
    assert not (tmp_path / "bench" / "checkpoints").exists()  # a benchmark writes no checkpoint


def test_bench_train_refuses_an_empty_timing(tiny_run, tmp_path):
    _, cmd, _ = tiny_run
    cfg = TrainBenchConfig(**{f.name: getattr(cmd, f.name) for f in dataclasses.fields(cmd)})
    with pytest.raises(ValueError, match="--timed-steps must be >= 1"):
        run(dataclasses.replace(cfg, out=tmp_path / "b", timed_steps=0))


def test_physis_bench_train_takes_the_flags_of_physis_train(tiny_run, tmp_path, capsys):
    from physis.cli import main

    _, cmd, _ = tiny_run
    main(["bench", "train", "--data", str(cmd.data[0]), "--out", str(tmp_path / "b"), "--preset", "tiny",
          "--image-size", "32", "--horizon", "8", "--batch-size", "4", "--workers", "0", "--no-world-model",
          "--timed-steps", "1", "--warmup-steps", "0", "--profile-steps", "1"])
    r = json.loads((tmp_path / "b" / "results.json").read_text())
    assert r["config"]["world_model"] is False and r["samples_per_s"] > 0
    assert "samples/s" in capsys.readouterr().out

"""`physis bench latency` on the tiny preset: the JSON it writes and the FLOP count it rests on."""

from __future__ import annotations

import json

import pytest
import torch

from physis.runtime.bench_latency import LatencyBenchConfig, count_flops, matmul_floor_ms, run
from physis.runtime.fused import ISAS


def test_bench_latency_writes_every_field(tmp_path) -> None:
    cfg = LatencyBenchConfig(out=tmp_path, presets=("tiny",), steps=(2,), cache=(True, False), backends=("eager",),
                             image_size=32, repeats=3, seconds=0.5, warmup=1, threads=1, progress=False)
    result = run(cfg)
    assert json.loads((tmp_path / "results.json").read_text()) == result
    assert result["benchmark"] == "latency" and result["threads"] == 1 and result["skipped"] == []
    on, off = result["results"]
    assert (on["cache"], off["cache"]) == (True, False)
    for row in (on, off):
        assert {"preset", "backend", "steps", "cache", "batch", "cameras", "image_size", "params", "subtask_tokens",
                "p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "cpu_p50_ms", "repeats", "gflop", "floor_ms",
                "floor_dtype", "ratio_to_floor"} <= set(row)
        assert row["preset"] == "tiny" and row["backend"] == "eager" and row["steps"] == 2 and row["batch"] == 1
        assert row["cameras"] == 2 and row["repeats"] == 3 and row["floor_dtype"] == "float32"
        assert 0 < row["min_ms"] <= row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["floor_ms"] > 0 and row["ratio_to_floor"] == row["p50_ms"] / row["floor_ms"]
    assert off["gflop"] > on["gflop"] > 0  # without the cache the prefix is encoded once per step
    assert "tiny/eager" in result["setup_s"] and result["machine"]["torch"] == torch.__version__
    # which CPU and which kernel path, so that results from different machines are not compared blindly
    assert result["machine"]["cpu"] and result["machine"]["kernel_isa"] in (None, *ISAS)
    # how long the chunks were timed, and how much of the CPUs the hypervisor took meanwhile (None: not Linux)
    assert result["machine"]["timing_s"] >= sum(r["min_ms"] * r["repeats"] for r in (on, off)) / 1e3 > 0
    assert result["machine"]["steal_s"] is None or result["machine"]["steal_s"] >= 0


def test_steal_time_is_read_from_proc_stat_or_left_unknown(monkeypatch) -> None:
    from pathlib import Path

    from physis.runtime import bench_latency

    here = bench_latency.steal_seconds()
    assert here is None or here >= 0
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "cpu  10 0 5 100 0 0 0 250 0 0\ncpu0 1 2 3\n")
    assert bench_latency.steal_seconds() == 250 / bench_latency.os.sysconf("SC_CLK_TCK")
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "intr 1 2 3\n")
    assert bench_latency.steal_seconds() is None
    monkeypatch.setattr(Path, "read_text", _no_proc_stat)
    assert bench_latency.steal_seconds() is None


def _no_proc_stat(self, *args, **kwargs):
    raise OSError("no /proc/stat here")


def test_flop_count_grows_with_steps_and_counts_attention() -> None:
    from physis.model import ModelConfig, PhysisModel
    from physis.runtime.export import example_batch

    torch.manual_seed(0)
    model = PhysisModel(ModelConfig.preset("tiny", image_size=32, cameras=2, subtask=False)).eval()
    batch = example_batch(model)
    one, _, flow_one = count_flops(model, batch, 1, True, subtask=False)
    three, tokens, flow_three = count_flops(model, batch, 3, True, subtask=False)
    per_step = (three - one) // 2
    # the flow loop's share: everything after the prefix, which is the same whatever the steps
    assert 0 < flow_one < one and three - flow_three == one - flow_one
    assert count_flops(model, batch, 3, False, subtask=False)[2] == 0  # uncached: no separate flow loop
    cfg = model.config
    h, a, de, d, hidden = cfg.horizon, cfg.action_dim, cfg.expert_width, cfg.width, int(cfg.expert_width * 4)
    n_keys = batch["images"].shape[1] * cfg.patch_grid**2 + cfg.max_text_tokens + 2 + h
    # actions in (folded into the time MLP's first layer), the time MLP's second layer, out; the mask's part and
    # the fold itself: per chunk
    linear = 2 * h * (a * de + de * de + de * a)
    linear += 2 * de * de  # the step's time embedding into the time MLP (once for all H tokens)
    linear += cfg.depth * 2 * h * (de * 3 * d + d * de + 2 * de * hidden)  # qkv, proj, MLP per expert layer
    attention = cfg.depth * 2 * cfg.heads * h * n_keys * 2 * cfg.head_dim  # scores and weighted values
    assert tokens == 0 and per_step == linear + attention
    assert matmul_floor_ms(per_step, torch.float32) > 0


def test_a_cuda_device_without_cuda_is_refused(tmp_path, monkeypatch) -> None:
    import pytest

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda, but torch sees no CUDA device"):
        run(LatencyBenchConfig(out=tmp_path, presets=("tiny",), device="cuda", progress=False))
    assert not (tmp_path / "results.json").exists()


def test_the_device_is_recorded(tmp_path) -> None:
    cfg = LatencyBenchConfig(out=tmp_path, presets=("tiny",), steps=(1,), cache=(True,), backends=("eager",),
                             image_size=32, repeats=1, seconds=0.1, warmup=0, threads=1, progress=False, device="cpu")
    assert run(cfg)["machine"]["device"] == "cpu"


def test_a_pause_before_each_timed_chunk_is_slept_and_recorded(tmp_path, monkeypatch) -> None:
    import physis.runtime.bench_latency as bench

    slept: list[float] = []
    monkeypatch.setattr(bench.time, "sleep", slept.append)
    cfg = LatencyBenchConfig(out=tmp_path, presets=("tiny",), steps=(1,), cache=(True,), backends=("eager",),
                             image_size=32, repeats=3, seconds=5.0, warmup=1, threads=1, pause_ms=20,
                             progress=False)
    result = run(cfg)
    assert result["config"]["pause_ms"] == 20 and result["results"][0]["repeats"] == 3
    assert slept == [0.02] * 3  # before each timed chunk, not the warm-up
    with pytest.raises(ValueError, match="pause-ms"):
        run(LatencyBenchConfig(out=tmp_path, presets=("tiny",), pause_ms=-1, progress=False))

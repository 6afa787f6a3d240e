"""Checkpoints: round trip, pruning, atomic writes, and clear errors for broken directories."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

import physis.train.checkpoint as ckpt_mod
from physis.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint

CONFIG = {"model": {"preset": "tiny", "action_dim": 4}, "train": {"lr": 1e-3}, "embodiments": [{"name": "pusht"}],
          "unified_space": {"action": ["x", "y"]}, "subtask_vocab": ["grasp", "the", "block"]}
STATS = {"pusht": {"action": {"mean": [0.0, 1.0], "std": [1.0, 2.0]}}}


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 4, generator=g)
    return {"a.weight": w, "tied.weight": w, "a.bias": torch.randn(3, generator=g),
            "steps": torch.tensor(seed, dtype=torch.long), "half": torch.randn(2, generator=g).to(torch.bfloat16)}


def _training_state() -> dict:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    return {"optimizer": opt.state_dict(), "rng": [{"python": random.getstate(), "numpy": np.random.get_state(),
                                                    "torch": torch.get_rng_state()}]}


def _save(run, step, **kw):
    return save_checkpoint(run, step, _state(step), config=CONFIG, stats=STATS, **kw)


def test_round_trip(tmp_path):
    ts = _training_state()
    path = save_checkpoint(tmp_path, 123, _state(1), config=CONFIG, stats=STATS, ema_state=_state(2),
                           training_state=ts)
    assert path == tmp_path / "checkpoints" / "step_000123"
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "ema.safetensors", "model.safetensors",
                                                     "stats.json", "training_state.pt"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000123"
    for where in (path, tmp_path, tmp_path / "checkpoints"):
        c = load_checkpoint(where)
        assert c.path == path and c.step == 123
        assert c.model_config == CONFIG["model"] and c.train_config == CONFIG["train"]
        assert c.embodiments == CONFIG["embodiments"] and c.unified_space == CONFIG["unified_space"]
        assert c.subtask_vocab == CONFIG["subtask_vocab"] and c.stats == STATS
        for got, want in ((c.model_state, _state(1)), (c.ema_state, _state(2))):
            assert got.keys() == want.keys()
            for k in want:
                assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
        assert c.training_state["step"] == 123
        opt = c.training_state["optimizer"]
        assert torch.equal(opt["state"][0]["exp_avg"], ts["optimizer"]["state"][0]["exp_avg"])
        rng = c.training_state["rng"][0]
        assert torch.equal(rng["torch"], ts["rng"][0]["torch"]) and rng["python"] == ts["rng"][0]["python"]
        assert np.array_equal(rng["numpy"][1], ts["rng"][0]["numpy"][1])


def test_model_only_load_never_unpickles(tmp_path, monkeypatch):
    _save(tmp_path, 5, training_state=_training_state())

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_pickle)
    c = load_checkpoint(tmp_path, training_state=False)
    assert c.training_state is None and c.ema_state is None and torch.equal(c.model_state["a.bias"],
                                                                           _state(5)["a.bias"])


def test_keep_last_and_latest(tmp_path):
    for step in (10, 20, 30, 40, 50):
        _save(tmp_path, step, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000040", "step_000050"]
    assert latest_checkpoint(tmp_path) == root / "step_000050"
    # Saving a step again replaces that checkpoint whole.
    save_checkpoint(tmp_path, 50, _state(7), config=CONFIG)
    assert torch.equal(load_checkpoint(tmp_path).model_state["a.bias"], _state(7)["a.bias"])
    # Without a pointer the newest step directory is used.
    (root / "latest").unlink()
    assert latest_checkpoint(tmp_path) == root / "step_000050"
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_failed_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    first = _save(tmp_path, 1, training_state=_training_state())
    before = {p.name: p.read_bytes() for p in first.iterdir()}

    def crash(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 2, training_state=_training_state(), keep_last=1)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"]  # temp dir removed
    assert (root / "latest").read_text().strip() == "step_000001"
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert load_checkpoint(tmp_path).step == 1

    # A hard crash leaves its hidden temp dir behind: it is never mistaken for a checkpoint.
    (root / ".step_000002.tmp-dead").mkdir()
    (root / "latest").unlink()
    assert latest_checkpoint(tmp_path) == first


@pytest.mark.parametrize(("breakage", "message"), [
    ("rm config.json", "config.json is missing"),
    ("rm model.safetensors", "model.safetensors is missing"),
    ("rm ema.safetensors", "ema.safetensors is missing"),
    ("rm stats.json", "stats.json is missing"),
    ("rm training_state.pt", "training_state.pt is missing"),
    ("garble model.safetensors", "model.safetensors: not a readable safetensors file"),
    ("garble config.json", "config.json: invalid JSON"),
    ("garble training_state.pt", "training_state.pt: unreadable training state"),
    ("format", "config.json: not a physis checkpoint"),
    ("version", "config.json: unsupported checkpoint version 99"),
])
def test_broken_checkpoint_errors_name_the_file(tmp_path, breakage, message):
    path = _save(tmp_path, 3, ema_state=_state(4), training_state=_training_state())
    verb, _, name = breakage.partition(" ")
    if verb == "rm":
        (path / name).unlink()
    elif verb == "garble":
        (path / name).write_bytes(b"\x00garbage{")
    else:
        cfg = json.loads((path / "config.json").read_text())
        cfg.update({"format": "something-else"} if verb == "format" else {"version": 99})
        (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message.replace(".", r"\.")):
        load_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="no config.json and no checkpoints/step_"):
        load_checkpoint(tmp_path)

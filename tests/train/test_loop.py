"""The training loop on a small stand-in model: exact resume, schedule, recipes, logs, bf16 and 2-process DDP."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from itertools import count
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from physis.train.checkpoint import latest_checkpoint, load_checkpoint
from physis.train.loop import TrainConfig, Trainer, param_groups
from physis.train.schedule import warmup_cosine, warmup_cosine_scheduler

REPO = Path(__file__).resolve().parents[2]
META = {"model": {"preset": "stand-in"}, "embodiments": [{"name": "toy"}], "unified_space": {"action": ["x"]},
        "subtask_vocab": ["reach"], "stats": {"toy": {"mean": [0.0]}}}


class TinyPolicy(nn.Module):
    """Regresses actions from state; input noise makes every step draw from the global torch RNG."""

    def __init__(self, state_dim: int = 6, action_dim: int = 3, embodiments: int = 2) -> None:
        super().__init__()
        self.embodiment = nn.Embedding(embodiments, 16)
        self.trunk = nn.Sequential(nn.Linear(state_dim, 16), nn.LayerNorm(16), nn.GELU())
        self.head = nn.Linear(16, action_dim)
        self.camera_embed = nn.Parameter(torch.zeros(2, 16))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["state"] + 0.05 * torch.randn_like(batch["state"])
        h = self.trunk(x) + self.embodiment(batch["embodiment"]) + self.camera_embed[0]
        mse = ((self.head(h) - batch["actions"]) ** 2).mean()
        aux = h.pow(2).mean()
        return {"loss": mse + 1e-3 * aux, "mse": mse, "aux": aux}


def batch_at(seed: int, step: int, batch_size: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    state = torch.randn(batch_size, 6, generator=g)
    return {"state": state, "actions": torch.tanh(state[:, :3] * 2 - state[:, 3:]),
            "embodiment": torch.randint(0, 2, (batch_size,), generator=g)}


def batches(seed: int = 0, batch_size: int = 8, stop_after: int | None = None):
    """A batch source rebuilt from (seed, start step); `stop_after` batches simulate a killed run."""

    def source(start: int):
        for i, step in enumerate(count(start)):
            if stop_after is not None and i == stop_after:
                raise KeyboardInterrupt("killed")
            yield batch_at(seed, step, batch_size)

    return source


def make_model(seed: int = 0) -> TinyPolicy:
    torch.manual_seed(seed)
    return TinyPolicy()


def config(out: Path, **kw) -> TrainConfig:
    base = {"steps": 20, "lr": 3e-2, "warmup": 3, "ema_decay": 0.9, "log_every": 5, "save_every": 5,
            "keep_last": 2, "out": str(out), "progress": False}
    return TrainConfig(**{**base, **kw})


def test_sigterm_checkpoints_the_step_in_progress_and_resume_carries_on(tmp_path):
    def terminated_at(step: int):
        def source(start: int):
            for s in count(start):
                if s == step:
                    os.kill(os.getpid(), signal.SIGTERM)  # arrives while this step's batch is being trained on
                yield batch_at(0, s)

        return source

    previous = signal.getsignal(signal.SIGTERM)
    stopped = Trainer(make_model(), terminated_at(7), config(tmp_path / "run", save_every=5), META)
    summary = stopped.train()
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == 8
    assert load_checkpoint(tmp_path / "run").step == 8  # not 5: the steps since the last checkpoint are kept
    assert signal.getsignal(signal.SIGTERM) == previous
    resumed = Trainer(make_model(seed=99), batches(), config(tmp_path / "run", resume=True), META)
    assert resumed.start_step == 8 and resumed.train()["stopped_by"] is None
    straight = Trainer(make_model(), batches(), config(tmp_path / "straight"), META)
    straight.train()
    assert stopped.losses + resumed.losses == straight.losses


def test_resume_matches_an_uninterrupted_run(tmp_path):
    straight = Trainer(make_model(), batches(), config(tmp_path / "a"), META)
    summary = straight.train()
    assert summary["steps"] == 20 and summary["start_step"] == 0

    killed = Trainer(make_model(), batches(stop_after=17), config(tmp_path / "b", save_every=10), META)
    with pytest.raises(KeyboardInterrupt):
        killed.train()  # steps 11 to 17 ran (and step 15 was logged) but were never checkpointed
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 1')  # a line cut short by the kill
    assert load_checkpoint(tmp_path / "b").step == 10

    resumed = Trainer(make_model(seed=99), batches(), config(tmp_path / "b", resume=True), META)
    assert resumed.start_step == 10
    resumed.train()

    assert len(killed.losses) == 17 and killed.losses[:10] + resumed.losses == straight.losses
    assert straight.losses[-1] < straight.losses[0] / 3  # it learns
    for name, want in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], want), name
    for name, want in straight.ema.items():
        assert torch.equal(resumed.ema[name], want), name
    a, b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)

    # metrics.jsonl keeps one line per log step; the killed run's unsaved tail was dropped on resume.
    lines = [json.loads(ln) for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [5, 10, 15, 20]
    straight_lines = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in lines] == [r["loss"] for r in straight_lines]


def test_logs_checkpoints_and_summary(tmp_path):
    trainer = Trainer(make_model(), batches(), config(tmp_path, steps=12, save_every=0, log_every=4), META)
    summary = trainer.train()
    records = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12]
    assert {"loss", "mse", "aux", "lr", "grad_norm", "samples_per_s"} <= records[0].keys()
    assert math.isclose(records[0]["loss"], sum(trainer.losses[:4]) / 4, rel_tol=1e-9)
    assert any((tmp_path / "tb").iterdir())
    assert summary["params_total"] == summary["params_trainable"] == sum(p.numel() for p in trainer.model.parameters())
    assert summary["samples_per_s"] > 0 and summary["peak_rss_mb"] > 10 and summary["final_loss"] == trainer.losses[-1]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 12

    ckpt = load_checkpoint(tmp_path)  # save_every=0: only the final step
    assert ckpt.step == 12 and latest_checkpoint(tmp_path).name == "step_000012"
    assert ckpt.model_config == META["model"] and ckpt.stats == META["stats"] and ckpt.subtask_vocab == ["reach"]
    assert ckpt.train_config["steps"] == 12 and ckpt.train_config["recipe"] == "pretrain"
    assert ckpt.ema_state is not None
    assert not torch.equal(ckpt.ema_state["head.weight"], ckpt.model_state["head.weight"])
    model = TinyPolicy()
    model.load_state_dict(ckpt.model_state)


def test_warmup_cosine_values():
    f = warmup_cosine(warmup_steps=4, total_steps=14, floor=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0
    assert math.isclose(f(9), 0.55)  # halfway through the cosine
    assert math.isclose(f(14), 0.1) and math.isclose(f(1000), 0.1)
    assert all(f(s) >= f(s + 1) for s in range(4, 20))

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_cosine_scheduler(opt, 4, 14, 0.1)
    lrs = []
    for _ in range(15):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.5 and lrs[3] == 2.0 and math.isclose(lrs[9], 1.1) and math.isclose(lrs[14], 0.2)
    with pytest.raises(ValueError):
        warmup_cosine(2, 10, floor=1.5)


def test_adapt_trains_only_matching_parameters(tmp_path):
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, batches(), config(tmp_path, steps=5, recipe="adapt", trainable=["head.*"]), META)
    assert trainer.params_trainable == 16 * 3 + 3 and trainer.params_total > 200
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == 2
    summary = trainer.train()
    assert summary["params_trainable"] == 51
    after = model.state_dict()
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == name.startswith("head."), name

    with pytest.raises(ValueError, match="no parameter name matches"):
        Trainer(make_model(), batches(), config(tmp_path, recipe="adapt", trainable=["nothing.*"]))
    with pytest.raises(ValueError, match="needs trainable parameter patterns"):
        Trainer(make_model(), batches(), config(tmp_path, recipe="adapt"))
    with pytest.raises(ValueError, match="unknown recipe"):
        Trainer(make_model(), batches(), config(tmp_path, recipe="finetune"))


def test_posttrain_starts_from_a_checkpoint(tmp_path):
    Trainer(make_model(), batches(), config(tmp_path / "pre", steps=5), META).train()
    pre = load_checkpoint(tmp_path / "pre", training_state=False)
    trainer = Trainer(make_model(seed=3), batches(seed=1), config(tmp_path / "post", steps=1, recipe="posttrain",
                                                                   init_from=str(tmp_path / "pre")), META)
    assert trainer.start_step == 0
    assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in pre.model_state.items())


def test_no_weight_decay_on_norms_biases_embeddings():
    model = TinyPolicy()
    decay, rest = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {"trunk.0.weight", "head.weight"}
    assert {names[id(p)] for p in rest["params"]} == {"embodiment.weight", "trunk.0.bias", "trunk.1.weight",
                                                      "trunk.1.bias", "head.bias", "camera_embed"}
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0


def test_bf16_autocast_and_clipping(tmp_path):
    trainer = Trainer(make_model(), batches(), config(tmp_path, steps=6, bf16=True, clip_norm=0.01, ema_decay=0),
                      META)
    trainer.train()
    assert all(math.isfinite(x) for x in trainer.losses)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert trainer.ema is None and load_checkpoint(tmp_path).ema_state is None
    records = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0.01 for r in records)  # logged before clipping


DDP_SCRIPT = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
import torch
from safetensors.torch import save_file
from physis.train.distributed import shutdown_distributed
from physis.train.loop import Trainer
from tests.train.test_loop import META, batches, config, make_model
from pathlib import Path
out = Path(sys.argv[2])
rank = int(os.environ["RANK"])
# Every rank sees different data: equal final weights prove the gradients were averaged.
trainer = Trainer(make_model(seed=rank), batches(seed=rank), config(out, steps=8, save_every=4, log_every=2,
                                                                    ddp_find_unused=False), META)
summary = trainer.train()
save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
(out / f"summary{rank}.json").write_text(json.dumps(summary))
shutdown_distributed()
"""


def test_two_process_gloo_ddp(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(REPO), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0, w1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    start = make_model(seed=0).state_dict()
    assert not torch.equal(w0["head.weight"], start["head.weight"])
    s0, s1 = (json.loads((tmp_path / f"summary{r}.json").read_text()) for r in (0, 1))
    assert s0["world_size"] == 2 and s0["final_loss"] != s1["final_loss"]  # per-rank data, per-rank noise
    assert s1["checkpoint"] is None and s0["checkpoint"].endswith("step_000008")
    ckpt = load_checkpoint(tmp_path)
    assert len(ckpt.training_state["rng"]) == 2
    assert all(torch.equal(ckpt.model_state[k], w0[k]) for k in w0)
    # Only rank 0 logged: one line per log step.
    assert [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6, 8]

"""Training curves from a run's metrics.jsonl: the loss of every head, and the training throughput."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The heads in the order the model computes them; the colours stay the same in every plot.
HEADS = {"loss": ("total", "#222222"), "action": ("action (flow)", "#3b7dd8"),
         "world_model": ("world model", "#d8823b"), "subtask": ("subtask", "#3ba55c"),
         "progress": ("progress", "#9b59b6")}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The logged records of a run, in step order; a line cut short by a kill is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return sorted(records, key=lambda r: r["step"])


def plot_training(metrics: Path, out: Path, title: str = "") -> Path | None:
    """Loss per head (log scale) and samples/s against the step; None when nothing was logged."""
    records = read_metrics(metrics)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_speed) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [2, 1]})
    for key, (label, colour) in HEADS.items():
        values = [r.get(key) for r in records]
        if all(isinstance(v, int | float) and v > 0 for v in values):
            ax_loss.plot(steps, values, label=label, color=colour, lw=2.2 if key == "loss" else 1.4)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.legend(frameon=False, fontsize=8, ncol=2)
    ax_loss.set_title("loss per head", fontsize=10)
    speed = [r.get("samples_per_s", 0.0) for r in records]
    ax_speed.plot(steps, speed, color="#555555", lw=1.4)
    ax_speed.set_ylim(bottom=0)
    ax_speed.set_xlabel("step")
    ax_speed.set_ylabel("samples / s")
    ax_speed.set_title("throughput", fontsize=10)
    for ax in (ax_loss, ax_speed):
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out

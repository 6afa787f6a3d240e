"""What the model says it is doing, step by step, beside what the scripted expert says it is doing.

The expert drives one episode; at every step the checkpoint's Policy sees the same observation and
generates its subtask ("reason, then act"). The two label sequences, and the fraction of steps where they
agree, show whether the subtask head tracks the phases of a task on a scene it never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from physis.progress import progress_bar


@dataclass
class TraceConfig:
    checkpoint: Path
    suite: str
    task: str
    seed: int  # use a seed no demonstration came from (an evaluation seed)
    image_size: int = 96
    max_steps: int = 0  # 0: the suite's episode limit
    progress: bool = True


def subtask_trace(cfg: TraceConfig) -> dict[str, Any]:
    """{"task", "seed", "instruction", "expert": [label per step], "model": [label per step], "agreement", ...}."""
    from physis.runtime import Policy
    from physis.sim.base import EnvConfig
    from physis.sim.rollout import cached_env

    # The evaluation's environment when it ran in this process (building one, with its GL context, is slow).
    env = cached_env(cfg.suite, cfg.task, EnvConfig(image_size=cfg.image_size, max_steps=cfg.max_steps or None))
    policy = Policy.from_checkpoint(cfg.checkpoint, embodiment=env.embodiment.name)
    max_tokens = int(policy.meta["data"].get("max_subtask_tokens", 12))
    expert = env.expert()
    obs, _ = env.reset(seed=cfg.seed)
    expert.reset()
    policy.reset()
    expert_labels: list[str] = []
    model_labels: list[str] = []
    bar = progress_bar("subtask trace", "agree", cfg.progress)
    with bar:
        task = bar.add_task(cfg.task, total=env.max_steps, agree="-")
        done = False
        while not done:
            action, label = expert.act(obs)
            said = policy.infer(obs).get("subtask", "")
            # The expert's label as the model's vocabulary writes it (lower case, at most max_tokens words).
            expert_labels.append(policy.vocab.decode(policy.vocab.encode(label, max_tokens)))
            model_labels.append(said)
            obs, _, terminated, truncated, _ = env.step(env.check_action(action))
            done = terminated or truncated
            agree = sum(a == b for a, b in zip(expert_labels, model_labels, strict=True))
            bar.update(task, advance=1, agree=f"{agree}/{len(model_labels)}")
        bar.update(task, total=len(model_labels))
    success, instruction = bool(env.success), env.instruction
    agree = sum(a == b for a, b in zip(expert_labels, model_labels, strict=True))
    return {"task": cfg.task, "seed": cfg.seed, "instruction": instruction, "expert_success": success,
            "steps": len(model_labels), "agreement": agree / max(1, len(model_labels)), "agreeing_steps": agree,
            "expert": expert_labels, "model": model_labels}


def segments(labels: list[str]) -> list[tuple[int, int, str]]:
    """Runs of equal labels as (first step, last step + 1, label)."""
    runs: list[tuple[int, int, str]] = []
    for i, label in enumerate(labels):
        if runs and runs[-1][2] == label:
            runs[-1] = (runs[-1][0], i + 1, label)
        else:
            runs.append((i, i + 1, label))
    return runs
